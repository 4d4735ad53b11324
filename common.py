"""The little every script shares: KV-cache sampling and log-prob utilities. Nothing else lives here.

The model code is *not* here: each script carries its own copy (so each file stands alone), and
hands its model's one-step function to `sample`.

A step function has the signature
    step_fn(params, tokens[B,T], positions[B,T], kv_mask[B,S], cache, cache_pos) -> (logits[B,T,V], cache)
where `cache` holds S key/value slots per layer, the T new tokens are written at slots
[cache_pos, cache_pos + T), and `kv_mask[b, s]` says whether slot s of row b holds a real token.
"""

from functools import partial

import jax
import jax.numpy as jnp


# ---------------------------------------------------------------- log-prob utilities
def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log π(token) under softmax(logits / T): logits [..., V], tokens [...] -> [...] float32.

    sft.py's token log-probs; head_logprobs below is the same quantity computed from the hidden states (PPO).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]



# The LM head fused with the log-prob: log pi(token) and the entropy straight from the final hidden states, a few
# positions at a time, so the [B, R, V] logits are never held (nor written and re-read) in full. The idea of the
# fused linear cross-entropy (e.g. Liger Kernel); here with a hand-written backward that recomputes each chunk's
# logits. On the benchmark workload (64 x 32 tokens, V = 4096, CPU) this made a policy loss-and-gradient ~4x faster.
def head_logprobs(hidden, head_kernel, tokens, temperature=1.0):
    """log π(token) and the entropy under softmax(hidden @ head_kernel / T), both float32 [B, R] (differentiable in
    hidden and head_kernel). hidden [B, R, D], head_kernel [D, V], tokens [B, R]. Equal to logprobs_from_logits and
    the entropy of the full logits. rlhf_ppo.py uses it for policy, reference and training log-probs alike, so all
    divide by the same sampling temperature T (with policy == reference the KL is exactly 0)."""
    B, R = tokens.shape
    chunk = max([c for c in range(1, R + 1) if R % c == 0 and B * c * head_kernel.shape[1] <= 2**20] or [1])
    return _head_logprobs(hidden, head_kernel, tokens, float(temperature), chunk)


def _split(x, c):  # [B, R, ...] -> [R / c, B, c, ...]: chunks along the sequence, so a sharded batch stays local
    return jnp.swapaxes(x.reshape(x.shape[0], -1, c, *x.shape[2:]), 0, 1)


def _merge(x):  # [R / c, B, c, ...] -> [B, R, ...]
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_softmax(h, w, tokens, temperature):
    """One chunk: tempered logits z [B, c, V], log-softmax, log π(token) [B, c], entropy [B, c]."""
    z = (h.reshape(-1, h.shape[-1]) @ w.astype(h.dtype)).astype(jnp.float32).reshape(*h.shape[:-1], -1) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    return logp, jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], -jnp.sum(jnp.exp(logp) * logp, -1)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(hidden, head_kernel, tokens, temperature, chunk):
    def one(xs):
        return _chunk_softmax(xs[0], head_kernel, xs[1], temperature)[1:]

    logp, entropy = jax.lax.map(one, (_split(hidden, chunk), _split(tokens, chunk)))
    return _merge(logp), _merge(entropy)


def _head_logprobs_fwd(hidden, head_kernel, tokens, temperature, chunk):
    return _head_logprobs(hidden, head_kernel, tokens, temperature, chunk), (hidden, head_kernel, tokens)


def _head_logprobs_bwd(temperature, chunk, residuals, cotangents):
    """d log π(y)/dz = onehot(y) - p; dH/dz = -p (log p + H); z = logits / T. Chunk by chunk, logits recomputed."""
    hidden, w, tokens = residuals

    def step(dw, xs):
        h, y, g_logp, g_entropy = xs
        logp, _, entropy = _chunk_softmax(h, w, y, temperature)
        p = jnp.exp(logp)  # [B, c, V]
        dz = g_logp[..., None] * (jax.nn.one_hot(y, p.shape[-1]) - p) - g_entropy[..., None] * p * (logp + entropy[..., None])
        dlogits = (dz / temperature).astype(h.dtype).reshape(-1, p.shape[-1])  # [B * c, V]: 2-D matmuls below
        dw = dw + jnp.dot(h.reshape(-1, h.shape[-1]).T, dlogits, preferred_element_type=jnp.float32)
        return dw, (dlogits @ w.astype(h.dtype).T).reshape(h.shape)

    xs = tuple(_split(x, chunk) for x in (hidden, tokens, *cotangents))
    dw, dhidden = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), xs)
    return _merge(dhidden), dw.astype(w.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)

def masked_mean(x, mask, axis=None):
    """Mean of x over the entries where mask is true (0 where there are none)."""
    mask = mask.astype(x.dtype)
    return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_var(x, mask, unbiased=True):
    """Variance of x over the masked entries (Bessel-corrected by default, as TRL and LHPD do)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = mask.astype(x.dtype).sum()
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------- sampling
def filter_logits(logits, top_k=0, top_p=1.0):
    """Sets to -inf the logits outside the top-k and outside the nucleus of mass top_p (Holtzman et al. 2020)."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        # the smallest logit still inside the nucleus; the most likely token is always kept
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def _next_token(logits, key, temperature, top_k, top_p):
    """Draws one token per row from logits [B, V]; temperature 0 is greedy.

    Inverse-CDF sampling: one uniform number per row, u in (0, 1], picks the first token whose cumulative probability
    reaches u. The same distribution as jax.random.categorical (Gumbel-max), which draws V numbers per row and
    reduces them with an argmax: on CPU that was ~80% of a decoding step (benchmarks/README.md). Tokens of
    probability 0 (filtered out) are never drawn: the CDF does not rise at them.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
    u = (1.0 - jax.random.uniform(key, (logits.shape[0], 1))) * cdf[:, -1:]  # [B, 1], in (0, total mass]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


@partial(
    jax.jit,
    static_argnames=("step_fn", "max_new_tokens", "temperature", "top_k", "top_p", "stop_token_id", "pad_token_id"),
)
def sample(
    step_fn,
    params,
    cache,
    prompt_tokens,
    prompt_mask,
    key,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_id: int,
    pad_token_id: int,
):
    """Autoregressive sampling with a KV cache.

    prompt_tokens, prompt_mask: [B, P], left-padded (every row ends with a real token).
    cache: the model's empty cache with S = P + max_new_tokens slots.
    Returns the new tokens [B, max_new_tokens]: each row stops at its first `stop_token_id` (kept) and is
    `pad_token_id` after it. The loop exits early once every row has stopped.
    Step i draws with jax.random.fold_in(key, i), so no key is used twice.
    """
    B, P = prompt_tokens.shape
    prompt_mask = prompt_mask.astype(bool)
    S = P + max_new_tokens  # cache slots
    slot = jnp.arange(S)
    kv_mask = jnp.zeros((B, S), bool).at[:, :P].set(prompt_mask)  # [B, S]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # [B, P]: 0 at the first real token

    logits, cache = step_fn(params, prompt_tokens, positions, kv_mask, cache, 0)  # prefill
    token = _next_token(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = token == stop_token_id
    next_pos = positions[:, -1] + 1  # [B]

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, done, out = carry
        kv = kv_mask | ((slot >= P) & (slot < P + i))[None]  # prompt slots + the i tokens generated so far
        logits, cache = step_fn(params, token[:, None], (next_pos + i - 1)[:, None], kv, cache, P + i - 1)
        new = _next_token(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)
        new = jnp.where(done, pad_token_id, new)  # finished rows emit padding
        return i + 1, cache, new, done | (new == stop_token_id), out.at[:, i].set(new)

    carry = (jnp.int32(1), cache, token, done, out)
    return jax.lax.while_loop(cond, body, carry)[-1]
