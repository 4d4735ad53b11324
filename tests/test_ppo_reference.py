"""One PPO iteration of rlhf_ppo.py against a deliberately naive reference written from the papers.

The reference runs the model on each episode alone (no padding mask, no batching, the full [T, V] logits), and does
the RL arithmetic in float64 numpy with Python loops over rows and tokens:

    L_b      = responses truncated after the first stop token (N+ details "truncate after the EOS")
    logπ_t   = log softmax(logits(prompt + response[:t]) / T)[response[t]]          for policy and reference
    V_t      = value model at the same position (the state before token t)
    score    = reward model at the last token of prompt + response[:L_b] + EOS; missing stop -> the penalty
    r_t      = -β KL_t (+ score at t = L_b - 1)        KL_t = k1 or k3 of (logπ_t, logπref_t)
    A_t      = GAE(γ, λ) of r and V; returns = A + V (before whitening); A whitened over the real tokens
    loss     = mean_t max(-A r, -A clip(r, 1±ε)) + c_v · ½ mean_t max((V' - R)², (clip(V', V ± ε_v) - R)²)

and its gradient in closed form (∂loss/∂logπ'_t, ∂loss/∂V'_t), mapped to the parameters by the vjp of the same
naive per-episode forward. Everything is compared tensor by tensor with the real code path (rollout,
compute_advantages, ppo_loss) on a tiny model whose policy differs from the reference (non-zero KL), at T = 0.7,
with the stop token at different positions and rows without it.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rlhf_ppo as ppo

R = 6  # response tokens


def perturbed(tree, key, scale):
    """tree + scale * N(0, 1) per leaf: a policy that is not the reference, a value net that is not the RM."""
    keys = jax.random.split(key, len(jax.tree.leaves(tree)))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(jax.tree.leaves(tree), keys)]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@jax.jit
def full_forward(graphdef, params, seq):
    """Logits [T, V] (or scores [T]) of one unpadded sequence seq [T]: the model's own __call__, no padding."""
    return nnx.merge(graphdef, params)(seq[None], jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), bool))[0][0]


@partial(jax.jit, static_argnames=("graphdefs", "value_model", "temperature"))
def next_token_logprobs_and_values(graphdefs, value_model, params, seq, temperature):
    """At each position i of one unpadded sequence seq [T]: log π(seq[i + 1] | seq[:i + 1]) and V(seq[:i + 1])."""
    policy = nnx.merge(graphdefs.policy, params["policy"])
    h, _ = policy.hidden_states(seq[None], jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), bool))
    logits = policy.head(h)[0]  # [T, V], the full logits
    if value_model == "shared":  # a value head on the policy's last hidden state
        values = nnx.merge(graphdefs.value, params["value"])(h)[0, :, 0]
    else:
        values = full_forward(graphdefs.value, params["value"], seq)
    logps = jax.nn.log_softmax(logits[:-1] / temperature)[jnp.arange(len(seq) - 1), seq[1:]]
    return logps, values[:-1]


class Naive:
    """The reference: per-episode forward passes, loops over rows and tokens. Each episode runs alone, followed by
    filler tokens up to one common length (one compiled program for all): a causal model's earlier positions do not
    see them, and only positions inside the episode are read."""

    def __init__(self, args, graphdefs, eos):
        self.args, self.graphdefs, self.eos = args, graphdefs, eos

    def filled(self, episodes, seq):
        width = max(len(p) for p, _ in episodes) + self.args.response_length + 1
        return jnp.asarray(np.pad(np.asarray(seq), (0, width - len(seq))), jnp.int32)

    def forward(self, params, episodes):
        """[(prompt ids, truncated response ids)] -> per row: logπ_t [L], V_t [L] (jnp, differentiable in params);
        the position P - 1 + t predicts response token t."""
        out = []
        for prompt, resp in episodes:
            seq = self.filled(episodes, np.concatenate([prompt, resp]))
            logps, values = next_token_logprobs_and_values(
                self.graphdefs, self.args.value_model, params, seq, self.args.temperature
            )
            P, L = len(prompt), len(resp)
            out.append((logps[P - 1 : P - 1 + L], values[P - 1 : P - 1 + L]))
        return out

    def ref_logprobs(self, ref_params, episodes):
        out = []
        for prompt, resp in episodes:
            logits = full_forward(
                self.graphdefs.policy, ref_params, self.filled(episodes, np.concatenate([prompt, resp]))
            )
            logp = log_softmax64(np.asarray(logits) / self.args.temperature)
            out.append(np.array([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(resp)]))
        return out

    def scores(self, rm_params, episodes, has_stop):
        out = []
        for (prompt, resp), stop in zip(episodes, has_stop):
            seq = list(prompt) + list(resp) + ([] if len(resp) and resp[-1] == self.eos else [self.eos])
            score = float(full_forward(self.graphdefs.reward, rm_params, self.filled(episodes, seq))[len(seq) - 1])
            penalty = self.args.missing_eos_penalty
            out.append(score if stop or penalty is None else penalty)
        return np.array(out)

    def kl(self, logp, ref):
        if self.args.kl_estimator == "k1":
            return logp - ref
        return np.expm1(ref - logp) - (ref - logp)  # k3 = (r - 1) - log r, r = π_ref / π

    def advantages(self, logps, refs, values, scores, kl_coef):
        """-> per-row rewards, advantages (raw), returns; then advantages whitened over all real tokens."""
        a = self.args
        rewards, advs, rets = [], [], []
        for logp, ref, v, score in zip(logps, refs, values, scores):
            L = len(logp)
            r = np.array([-kl_coef * self.kl(logp[t], ref[t]) for t in range(L)])
            r[L - 1] += score
            adv, last = np.zeros(L), 0.0
            for t in reversed(range(L)):
                next_v = v[t + 1] if t + 1 < L else 0.0
                last = r[t] + a.gamma * next_v - v[t] + a.gamma * a.lam * last
                adv[t] = last
            rewards.append(r), advs.append(adv), rets.append(adv + v)
        flat = np.concatenate(advs)
        whitened = [(x - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) for x in advs]
        return rewards, whitened, rets

    def loss_and_cotangents(self, new_logps, new_values, old_logps, old_values, advs, rets):
        """The PPO loss and its closed-form derivatives in each new log-prob and value."""
        a = self.args
        N = sum(len(x) for x in advs)
        pg = vf = pg_clipped = vf_clipped = 0.0
        g_logp, g_v = [], []
        for lp, v, olp, ov, A, ret in zip(new_logps, new_values, old_logps, old_values, advs, rets):
            gl, gv = np.zeros(len(lp)), np.zeros(len(lp))
            for t in range(len(lp)):
                ratio = np.exp(lp[t] - olp[t])
                unclipped, clipped = -A[t] * ratio, -A[t] * np.clip(ratio, 1 - a.cliprange, 1 + a.cliprange)
                pg += max(unclipped, clipped) / N
                pg_clipped += (clipped > unclipped) / N  # LHP / TRL's clipfrac: where the clipped term is the larger
                gl[t] = -A[t] * ratio / N if unclipped >= clipped else 0.0  # the clipped branch has no gradient
                v_clip = ov[t] + np.clip(v[t] - ov[t], -a.cliprange_value, a.cliprange_value)
                plain, clip = (v[t] - ret[t]) ** 2, (v_clip - ret[t]) ** 2
                vf += 0.5 * max(plain, clip) / N
                vf_clipped += (clip > plain) / N
                gv[t] = a.vf_coef * (v[t] - ret[t]) / N if plain >= clip else 0.0
            g_logp.append(gl), g_v.append(gv)
        return (
            pg + a.vf_coef * vf,
            {
                "loss/policy_avg": pg,
                "loss/value_avg": vf,
                "policy/clipfrac_avg": pg_clipped,
                "val/clipfrac_avg": vf_clipped,
            },
            g_logp,
            g_v,
        )


def forward_logprobs(args, models, params, queries, qmask, responses):
    """log π(response token) [B, R] by rlhf_ppo's batched forward pass, 0 after the stop: what the sampler returns
    with responses it sampled (test_sampler_logprobs_equal_the_naive_forward checks that)."""
    m, tokens, mask = ppo.truncated_episodes(queries, qmask, responses, args.stop_token_id, args.pad_token_id)
    return jnp.where(
        m, ppo.response_logprobs(models.policy, params["policy"], tokens, mask, responses, args.temperature), 0.0
    )


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampler_logprobs_equal_the_naive_forward(tiny_pipeline, temperature):
    """Step 1 keeps log π_old from the sampler's own logits instead of a second forward pass: on sampled responses
    (stopping at different positions), they equal the naive per-episode forward pass's within float32 error, and
    are 0 after the stop token."""
    from test_ppo import tiny_args

    tmp, prompts = tiny_pipeline
    tok, eos, pad = ppo.load_tokenizer(tmp / "sft")
    args = ppo.resolve_token_ids(tiny_args(tmp, prompts, temperature=temperature, response_length=12), eos, pad)
    models, params, _ = ppo.load_models(args, jnp.float32)
    params = perturbed(params, jax.random.key(1), 0.05)
    queries, qmask, _ = ppo.setup_data(args, tok)
    queries, qmask = jnp.asarray(queries[:16]), jnp.asarray(qmask[:16])
    never = dataclasses.replace(args, stop_token_id=-1)
    stop = int(
        np.bincount(
            np.asarray(ppo.generate(never, models, params, queries, qmask, jax.random.key(3))[0]).ravel()
        ).argmax()
    )
    args = dataclasses.replace(args, stop_token_id=stop)  # the most frequent token: rows stop at varied positions
    responses, logprobs = ppo.generate(args, models, params, queries, qmask, jax.random.key(3))
    m = np.asarray(ppo.response_mask(responses, stop))
    lengths = m.sum(1)
    assert len(set(lengths)) >= 3 and lengths.max() == 12  # rows stop at different positions, some never
    naive = Naive(args, models, eos)
    episodes = [
        (np.asarray(q)[np.asarray(k)], np.asarray(r)[:n]) for q, k, r, n in zip(queries, qmask, responses, lengths)
    ]
    for b, (lp, _) in enumerate(naive.forward(params, episodes)):
        np.testing.assert_allclose(np.asarray(logprobs[b, : lengths[b]]), np.asarray(lp), rtol=0, atol=2e-5)
    assert (np.asarray(logprobs)[~m] == 0).all() and (np.asarray(logprobs)[m] < 0).all()


def planted_responses(sampled, stop):
    """Sampled tokens with the stop token planted at varied positions: at 0, 2, the last slot, twice (the first
    counts), and rows without it."""
    out = np.where(sampled == stop, stop + 1, sampled)  # no accidental stops
    for row, positions in {0: [0], 1: [2], 2: [R - 1], 4: [3, 4], 6: [1]}.items():
        out[row, positions] = stop
    return out  # rows 3, 5, 7: no stop token


@pytest.mark.parametrize("kl_estimator, value_model", [("k1", "reward"), ("k3", "shared")])
def test_one_ppo_iteration_equals_the_naive_reference(tiny_pipeline, monkeypatch, kl_estimator, value_model):
    from test_ppo import tiny_args

    tmp, prompts = tiny_pipeline
    tok, eos, pad = ppo.load_tokenizer(tmp / "sft")
    stop = tok.token_to_id("Ġthe") or tok.encode(" the").ids[0]
    args = tiny_args(
        tmp,
        prompts,
        temperature=0.7,
        kl_coef=0.3,
        kl_estimator=kl_estimator,
        value_model=value_model,
        stop_token_id=stop,
        missing_eos_penalty=-1.5,
        response_length=R,
        gamma=0.9,
        lam=0.8,
        cliprange=0.1,
        cliprange_value=0.02,
        vf_coef=0.3,
    )
    args = ppo.resolve_token_ids(args, eos, pad)
    models, params, frozen = ppo.load_models(args, jnp.float32)
    ref_params, rm_params = frozen["ref"], frozen["reward"]
    params = perturbed(params, jax.random.key(1), 0.05)  # policy != reference: KL != 0; values != RM scores
    queries, qmask, _ = ppo.setup_data(args, tok)
    queries, qmask = jnp.asarray(queries[:8]), jnp.asarray(qmask[:8])

    sampled = np.asarray(ppo.generate(args, models, params, queries, qmask, jax.random.key(0))[0])
    responses = jnp.asarray(planted_responses(sampled, stop))
    planted = responses, forward_logprobs(args, models, params, queries, qmask, responses)  # what the sampler returns
    monkeypatch.setattr(ppo, "generate", lambda *a: planted)
    roll = ppo.rollout(args, models, tok, params, frozen, queries, qmask, jax.random.key(0))
    advantages, returns, rewards, roll_stats = ppo.compute_advantages(args, roll, args.kl_coef)

    naive = Naive(args, models, eos)
    lengths = [list(r).index(stop) + 1 if stop in r else R for r in np.asarray(responses)]
    episodes = [
        (np.asarray(q)[np.asarray(m)], np.asarray(r)[:n]) for q, m, r, n in zip(queries, qmask, responses, lengths)
    ]
    fwd = naive.forward(params, episodes)
    logps, values = [np.asarray(lp, np.float64) for lp, _ in fwd], [np.asarray(v, np.float64) for _, v in fwd]
    refs = naive.ref_logprobs(ref_params, episodes)
    scores = naive.scores(rm_params, episodes, [n < R or r[-1] == stop for r, n in zip(np.asarray(responses), lengths)])
    n_rewards, n_advs, n_rets = naive.advantages(logps, refs, values, scores, args.kl_coef)
    assert max(np.abs(lp - ref).max() for lp, ref in zip(logps, refs)) > 0.05  # a real KL, not policy == reference
    assert sorted(set(lengths)) == [1, 2, 3, 4, R]

    def padded(rows):  # per-row lists -> [B, R], zero after each row's end
        out = np.zeros((len(rows), R))
        for b, x in enumerate(rows):
            out[b, : len(x)] = x
        return out

    close = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(roll["response_mask"]).sum(1), lengths)
    np.testing.assert_array_equal(
        roll["contains_stop"], [n < R or r[-1] == stop for r, n in zip(np.asarray(responses), lengths)]
    )
    np.testing.assert_allclose(np.asarray(roll["scores"]), scores, **close)
    m = np.asarray(roll["response_mask"])
    for name, real, ref in (
        ("logprobs", roll["logprobs"], logps),
        ("ref_logprobs", roll["ref_logprobs"], refs),
        ("values", roll["values"], values),
    ):
        np.testing.assert_allclose(np.asarray(real) * m, padded(ref), err_msg=name, **close)
    np.testing.assert_allclose(np.asarray(rewards), padded(n_rewards), err_msg="per-token rewards", **close)
    np.testing.assert_allclose(np.asarray(advantages), padded(n_advs), err_msg="advantages", **close)
    np.testing.assert_allclose(np.asarray(returns) * m, padded(n_rets), err_msg="returns", **close)
    n_kl = np.mean([naive.kl(lp, ref).sum() for lp, ref in zip(logps, refs)])
    assert float(roll_stats["objective/kl"]) == pytest.approx(n_kl, rel=1e-4, abs=1e-5)
    assert float(roll_stats["objective/entropy"]) == pytest.approx(np.mean([-lp.sum() for lp in logps]), rel=1e-4)
    assert float(roll_stats["objective/scores"]) == pytest.approx(scores.mean(), rel=1e-4, abs=1e-5)

    # the loss and its gradient at new weights, against the episodes' old log-probs and values
    new_params = perturbed(params, jax.random.key(2), 0.03)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")}
    batch |= {"advantages": advantages, "returns": returns}
    (loss, stats), grads = jax.value_and_grad(ppo.ppo_loss, has_aux=True)(new_params, args, models, batch)
    new = naive.forward(new_params, episodes)
    n_loss, n_stats, g_logp, g_v = naive.loss_and_cotangents(
        [np.asarray(lp, np.float64) for lp, _ in new],
        [np.asarray(v, np.float64) for _, v in new],
        logps,
        values,
        n_advs,
        n_rets,
    )
    assert n_stats["policy/clipfrac_avg"] > 0 and n_stats["val/clipfrac_avg"] > 0  # both clips engage
    for name, value in n_stats.items():
        assert float(stats[name]) == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert float(loss) == pytest.approx(n_loss, rel=1e-4, abs=1e-5)
    _, vjp = jax.vjp(lambda p: naive.forward(p, episodes), new_params)
    (n_grads,) = vjp([(jnp.asarray(gl, jnp.float32), jnp.asarray(gv, jnp.float32)) for gl, gv in zip(g_logp, g_v)])
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(n_grads))
    for (path, g), n_g in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(n_grads)):
        np.testing.assert_allclose(g, n_g, atol=1e-3 * scale, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
