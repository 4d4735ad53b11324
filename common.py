"""The little every script shares: KV-cache sampling and log-prob utilities. Nothing else lives here.

The model code is *not* here: each script carries its own copy (so each file stands alone), and
hands its model's one-step function to `sample`.

A step function has the signature
    step_fn(params, tokens[B,T], positions[B,T], kv_mask[B,S], cache, cache_pos) -> (logits[B,1,V], cache)
with the logits of the last of the T positions (the next token's), where `cache` holds S key/value slots per
layer, the T new tokens are written at slots
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
# positions at a time, so the [B, R, V] logits are never held in full (the idea of Liger Kernel's fused linear
# cross-entropy). Each chunk is rematerialised (jax.checkpoint): the backward pass recomputes its logits and
# differentiates the same log_softmax as the unfused form, so the gradients are as accurate as the unfused ones on
# every CPU (benchmarks/README.md: a hand-written backward lost ~40x accuracy on AVX2-only CPUs).
def head_logprobs(hidden, head_kernel, tokens, temperature=1.0):
    """log π(token) and the entropy under softmax(hidden @ head_kernel / T), both float32 [B, R] (differentiable in
    hidden and head_kernel). hidden [B, R, D], head_kernel [D, V], tokens [B, R]. Equal to logprobs_from_logits and
    the entropy of the full logits. rlhf_ppo.py and grpo.py use it for the reference's and the training log-probs,
    at the same sampling temperature T as the sampler's own log-probs (common.sample), their π_old."""
    B, R = tokens.shape
    c = max([c for c in range(1, R + 1) if R % c == 0 and B * c * head_kernel.shape[1] <= 2**20] or [1])

    @jax.checkpoint
    def chunk(xs):  # h [B, c, D], y [B, c] -> log π(y), entropy [B, c]
        h, y = xs
        z = (h.reshape(-1, h.shape[-1]) @ head_kernel.astype(h.dtype)).astype(jnp.float32) / temperature  # [B * c, V]
        logp = jax.nn.log_softmax(z.reshape(*y.shape, -1), axis=-1)  # [B, c, V]
        return jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    logp, entropy = jax.lax.map(chunk, (_chunks(hidden, c), _chunks(tokens, c)))
    return _unchunk(logp), _unchunk(entropy)


def _chunks(x, c):  # [B, R, ...] -> [R / c, B, c, ...]: chunks along the sequence, so a sharded batch stays local
    return jnp.swapaxes(x.reshape(x.shape[0], -1, c, *x.shape[2:]), 0, 1)


def _unchunk(x):  # [R / c, B, c] -> [B, R]
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1)


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
def _next_token(logits, key, temperature):
    """Draws one token per row from logits [B, V]; temperature 0 is greedy. -> the tokens [B] and their log-probs [B]
    under softmax(logits / T) (under softmax(logits) when greedy), float32.

    Inverse-CDF sampling: one uniform number per row, u in (0, 1], picks the first token whose cumulative probability
    reaches u. The same distribution as jax.random.categorical (Gumbel-max), which draws V numbers per row and
    reduces them with an argmax, much slower on CPU (benchmarks/README.md). Tokens of probability 0 are never
    drawn: the CDF does not rise at them.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32) / (temperature or 1.0), axis=-1)  # [B, V]
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
        u = (1.0 - jax.random.uniform(key, (logits.shape[0], 1))) * cdf[:, -1:]  # [B, 1], in (0, total mass]
        token = jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)
    # log p of the drawn token, from the same probs: a separate log_softmax changed XLA's fusion of the softmax and
    # so a few draws in a million; a drawn token holds at least an ulp of the CDF: log p is as precise as log_softmax.
    return token, jnp.log(jnp.take_along_axis(probs, token[:, None], axis=-1)[:, 0])


@partial(
    jax.jit,
    static_argnames=("step_fn", "max_new_tokens", "temperature", "stop_token_id", "pad_token_id"),
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
    stop_token_id: int,
    pad_token_id: int,
):
    """Autoregressive sampling with a KV cache.

    prompt_tokens, prompt_mask: [B, P], left-padded (every row ends with a real token).
    cache: the model's empty cache with S = P + max_new_tokens slots.
    Returns the new tokens [B, max_new_tokens]: each row stops at its first `stop_token_id` (kept) and is
    `pad_token_id` after it; and each new token's log-prob under the sampling distribution softmax(logits / T),
    float32 [B, max_new_tokens], 0 after the stop. These are log π_old of PPO and GRPO: the same numbers as a
    forward pass over prompt + response gives, within float32 error (tests/test_ppo_reference.py), without its FLOPs
    (TRL takes them from generate's scores the same way). The loop exits early once every row has stopped.
    Step i draws with jax.random.fold_in(key, i), so no key is used twice.
    """
    B, P = prompt_tokens.shape
    prompt_mask = prompt_mask.astype(bool)
    S = P + max_new_tokens  # cache slots
    slot = jnp.arange(S)
    kv_mask = jnp.zeros((B, S), bool).at[:, :P].set(prompt_mask)  # [B, S]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # [B, P]: 0 at the first real token

    logits, cache = step_fn(params, prompt_tokens, positions, kv_mask, cache, 0)  # prefill
    token, logp = _next_token(logits[:, -1], jax.random.fold_in(key, 0), temperature)
    out = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(logp)
    done = token == stop_token_id
    next_pos = positions[:, -1] + 1  # [B]

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, done, (out, logprobs) = carry
        kv = kv_mask | ((slot >= P) & (slot < P + i))[None]  # prompt slots + the i tokens generated so far
        logits, cache = step_fn(params, token[:, None], (next_pos + i - 1)[:, None], kv, cache, P + i - 1)
        new, logp = _next_token(logits[:, -1], jax.random.fold_in(key, i), temperature)
        new, logp = jnp.where(done, pad_token_id, new), jnp.where(done, 0.0, logp)  # finished rows emit padding
        return i + 1, cache, new, done | (new == stop_token_id), (out.at[:, i].set(new), logprobs.at[:, i].set(logp))

    carry = (jnp.int32(1), cache, token, done, (out, logprobs))
    return jax.lax.while_loop(cond, body, carry)[-1]
