"""rlhf_ppo.py: what users read. The evaluation (eval/*, the gold judge's inputs, the held-out KL, the samples table,
the printed summaries, what main returns), the objective/* and policy/* statistics away from step 0 (policy != the
reference, ratios != 1, clipping, responses stopping at different positions, β > 0 and β = 0), and the adaptive KL
controller through main, each against an independent computation (hand values, float64 loops, naive forward passes).
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RecordingWriter, make_args, read_checkpoint
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from test_ppo import setup, tiny_args
from test_ppo_reference import log_softmax64, perturbed

import rlhf_ppo as ppo

GOLD_CALLS = []  # (prompts, completions) of every call of gold_judge


def gold_judge(prompts, completions):
    """The --gold-fn of these tests: records what it is given; its score depends on both the prompt and the
    completion (quarters: exact in float32, and in the table's two decimals)."""
    GOLD_CALLS.append((list(prompts), list(completions)))
    return [len(p.split()) - 0.25 * len(c) for p, c in zip(prompts, completions)]


def hand_gold(prompts, completions):
    return np.array([len(p.split()) - 0.25 * len(c) for p, c in zip(prompts, completions)])


def first_stop_lengths(responses, stop):
    """Real response tokens of each row: up to and including the first stop token (all of them without one)."""
    out = []
    for row in np.asarray(responses).tolist():
        out.append(row.index(stop) + 1 if stop in row else len(row))
    return out


# ---------------------------------------------------------------- objective/*: compute_advantages
def rollout_case(rng, lengths, R):
    """A constructed rollout: rows ending at `lengths` (the first without its stop token), a policy that is not the
    reference, and garbage after each row's end (where the mask must hide it)."""
    B = len(lengths)
    m = np.arange(R)[None] < np.array(lengths)[:, None]
    logprobs = np.where(m, -rng.uniform(0.2, 2.5, (B, R)), -7.0).astype(np.float32)
    ref = np.where(m, logprobs + rng.normal(0, 0.6, (B, R)), -3.0).astype(np.float32)
    return {
        "response_mask": jnp.asarray(m),
        "logprobs": jnp.asarray(logprobs),
        "ref_logprobs": jnp.asarray(ref),
        "values": jnp.asarray(rng.normal(size=(B, R)).astype(np.float32)),
        "scores": jnp.asarray(np.array([0.5, -1.25, 2.0, 0.75, 3.5][:B], np.float32)),
        "contains_stop": jnp.asarray(np.array([False] + [True] * (B - 1))),
    }


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("kl_coef", [0.3, 0.0])
def test_objective_statistics_equal_their_definitions_with_and_without_the_kl_penalty(kl_estimator, kl_coef):
    """objective/kl, /entropy, /non_score_reward, /rlhf_reward, /scores and val/num_eos_tokens of a batch whose rows
    stop at different positions and whose policy is not the reference: per-episode sums over the real response tokens,
    averaged over episodes; with β = 0 the KL is still measured while the penalty and its reward are 0."""
    rng = np.random.default_rng(7)
    lengths, R = [5, 2, 1, 3], 5
    roll = rollout_case(rng, lengths, R)
    args = make_args(ppo, kl_estimator=kl_estimator, whiten_rewards=False, gamma=0.9, lam=0.8)
    _, _, _, stats = ppo.compute_advantages(args, roll, kl_coef)
    lp, ref = np.asarray(roll["logprobs"], np.float64), np.asarray(roll["ref_logprobs"], np.float64)
    scores = np.asarray(roll["scores"], np.float64)
    kl_sums, entropies = [], []
    for b, n in enumerate(lengths):
        total = 0.0
        for t in range(n):
            log_r = ref[b, t] - lp[b, t]  # log(π_ref / π)
            total += -log_r if kl_estimator == "k1" else (np.exp(log_r) - 1) - log_r
        kl_sums.append(total)
        entropies.append(-sum(lp[b, t] for t in range(n)))
    kl_sums = np.array(kl_sums)
    expected = {
        "objective/kl": kl_sums.mean(),
        "objective/entropy": np.mean(entropies),
        "objective/non_score_reward": np.mean(-kl_coef * kl_sums),
        "objective/rlhf_reward": np.mean(scores - kl_coef * kl_sums),
        "objective/scores": scores.mean(),
        "val/num_eos_tokens": 3,
    }
    assert abs(expected["objective/kl"]) > 0.1  # a real KL: a penalty of β = 0.3 is visible
    for k, v in expected.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    if kl_coef == 0:
        assert float(stats["objective/non_score_reward"]) == 0.0
        assert float(stats["objective/rlhf_reward"]) == pytest.approx(float(stats["objective/scores"]), abs=1e-6)


# ---------------------------------------------------------------- policy/*, val/*, loss/*: ppo_loss and ppo_update
def minibatch_case(rng, lengths, R):
    """Old log-probs, values, advantages and returns, and the new policy's log-probs, entropy and values: ratios on
    both sides of the clip range, values moved past ±ε_v; garbage after each row's end."""
    B = len(lengths)
    m = np.arange(R)[None] < np.array(lengths)[:, None]
    garbage = lambda x, g: np.where(m, x, g).astype(np.float32)  # noqa: E731
    old = -rng.uniform(0.2, 2.0, (B, R))
    mb = {
        "responses": jnp.asarray(rng.integers(0, 10, (B, R)).astype(np.int32)),
        "response_mask": jnp.asarray(m),
        "tokens": jnp.zeros((B, 3), jnp.int32),
        "mask": jnp.ones((B, 3), bool),
        "logprobs": jnp.asarray(garbage(old, 0.0)),
        "values": jnp.asarray(garbage(rng.normal(size=(B, R)), 4.0)),
        "advantages": jnp.asarray(garbage(rng.normal(size=(B, R)), 9.0)),
        "returns": jnp.asarray(garbage(rng.normal(size=(B, R)), -9.0)),
    }
    new = {
        "logprobs": garbage(old + rng.uniform(-0.5, 0.5, (B, R)), 3.0),
        "entropy": garbage(rng.uniform(0.5, 3.0, (B, R)), 50.0),
        "values": garbage(np.asarray(mb["values"]) + rng.normal(0, 0.4, (B, R)), -20.0),
    }
    return mb, new


def naive_ppo_stats(args, mb, new, num_tokens=None):
    """The PPO losses and statistics by a float64 loop over the real tokens (LHP / TRL's definitions)."""
    m = np.asarray(mb["response_mask"])
    n = m.sum() if num_tokens is None else num_tokens
    old_lp, old_v = np.asarray(mb["logprobs"], np.float64), np.asarray(mb["values"], np.float64)
    A, ret = np.asarray(mb["advantages"], np.float64), np.asarray(mb["returns"], np.float64)
    lp, ent, v = (np.asarray(new[k], np.float64) for k in ("logprobs", "entropy", "values"))
    s = dict.fromkeys(["pg", "vf", "approxkl", "clipfrac", "entropy", "vclipfrac", "ratio"], 0.0)
    for b, t in zip(*np.nonzero(m)):
        ratio = np.exp(lp[b, t] - old_lp[b, t])
        unclipped, clipped = -A[b, t] * ratio, -A[b, t] * min(max(ratio, 1 - args.cliprange), 1 + args.cliprange)
        s["pg"] += max(unclipped, clipped)
        s["clipfrac"] += clipped > unclipped
        s["approxkl"] += 0.5 * (lp[b, t] - old_lp[b, t]) ** 2
        s["entropy"] += ent[b, t]
        s["ratio"] += ratio
        v_clip = old_v[b, t] + min(max(v[b, t] - old_v[b, t], -args.cliprange_value), args.cliprange_value)
        plain, clip = (v[b, t] - ret[b, t]) ** 2, (v_clip - ret[b, t]) ** 2
        s["vf"] += 0.5 * max(plain, clip)
        s["vclipfrac"] += clip > plain
    s = {k: x / n for k, x in s.items()}
    return s["pg"] + args.vf_coef * s["vf"], {
        "policy/approxkl_avg": s["approxkl"],
        "policy/clipfrac_avg": s["clipfrac"],
        "policy/entropy_avg": s["entropy"],
        "loss/policy_avg": s["pg"],
        "loss/value_avg": s["vf"],
        "val/clipfrac_avg": s["vclipfrac"],
        "val/ratio": s["ratio"],
    }


PPO_ARGS = make_args(ppo, temperature=1.0, cliprange=0.2, cliprange_value=0.1, vf_coef=0.3, value_model="reward")


def test_ppo_loss_statistics_at_a_policy_away_from_the_rollouts(monkeypatch):
    """Every policy/*, val/* and loss/* statistic of ppo_loss where the new policy is not the rollout's (ratios on
    both sides of 1 ± ε, some clipped, values clipped) and rows end at different positions: token means over the
    real tokens, against a float64 loop; with num_tokens (a micro-batch of a larger minibatch), sums / num_tokens."""
    rng = np.random.default_rng(3)
    mb, new = minibatch_case(rng, [5, 2, 3, 1], 5)
    monkeypatch.setattr(
        ppo, "policy_and_values", lambda *a: tuple(jnp.asarray(new[k]) for k in ("logprobs", "entropy", "values"))
    )
    for num_tokens in (None, 17):
        loss, stats = ppo.ppo_loss(None, PPO_ARGS, None, mb, num_tokens)
        n_loss, n_stats = naive_ppo_stats(PPO_ARGS, mb, new, num_tokens)
        assert 0 < n_stats["policy/clipfrac_avg"] < 0.6 and 0 < n_stats["val/clipfrac_avg"] < 0.8  # clips engage
        assert abs(n_stats["val/ratio"] - 1) > 0.01 and n_stats["policy/approxkl_avg"] > 0.01
        assert set(stats) == set(n_stats)
        for k, v in n_stats.items():
            assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), (k, num_tokens)
        assert float(loss) == pytest.approx(n_loss, rel=1e-5, abs=1e-6)


def test_the_update_reports_the_token_means_of_its_minibatches(monkeypatch):
    """ppo_update's statistics: the minibatch's token means (its micro-batches' token sums added), averaged over the
    epochs. A policy whose outputs are a fixed function of the response tokens and a zero learning rate make each
    epoch's minibatch (here the whole batch, in 2 micro-batches) see the same numbers, known by a float64 loop."""
    rng = np.random.default_rng(5)
    B, R, V = 4, 5, 10
    mb, _ = minibatch_case(rng, [5, 2, 1, 3], R)
    responses, m = np.asarray(mb["responses"]), np.asarray(mb["response_mask"])
    old, shift = rng.uniform(-2.0, -0.2, V), rng.permutation(np.linspace(-0.45, 0.45, V))  # ratios exp(±0.45)
    entropy, values = rng.uniform(0.5, 3.0, V), rng.normal(size=V)
    mb["logprobs"] = jnp.asarray(np.where(m, old[responses], 0.0), jnp.float32)
    new = {"logprobs": old[responses] + shift[responses], "entropy": entropy[responses], "values": values[responses]}

    def policy_and_values(args, models, params, tokens, mask, responses, key=None):
        f32 = lambda x: jnp.asarray(x, jnp.float32)[responses]  # noqa: E731
        return f32(old) + f32(shift) + 0 * params["w"], f32(entropy), f32(values) + 0 * params["w"]

    monkeypatch.setattr(ppo, "policy_and_values", policy_and_values)
    args = make_args(ppo,
        temperature=1.0, cliprange=0.2, cliprange_value=0.1, vf_coef=0.3, ppo_epochs=3, num_mini_batches=1,
        grad_accum_steps=2, batch_size=B, exp_name="i25-ppo-update-stats",
    )  # fmt: skip
    tx = optax.sgd(0.0)
    params = {"w": jnp.zeros((), jnp.float32)}
    rows = NamedSharding(ppo.make_mesh(1), PartitionSpec("data"))
    _, _, stats = ppo.ppo_update(args, None, tx, rows, params, tx.init(params), mb, jax.random.key(0))
    _, n_stats = naive_ppo_stats(args, mb, new)
    assert 0 < n_stats["policy/clipfrac_avg"] < 1 and abs(n_stats["val/ratio"] - 1) > 0.01
    assert int(stats.pop("nonfinite")) == 0 and set(stats) == set(n_stats)
    for k, v in n_stats.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k


# ---------------------------------------------------------------- the printed summaries
def test_summary_prints_the_pooled_means_and_with_full_each_sets_gold_score():
    metrics = {
        "eval/heldout/proxy_score": 1.0,
        "eval/heldout/gold_score": 0.25,
        "eval/heldout/kl": 0.5,
        "eval/rotten_tomatoes/proxy_score": 2.0,
        "eval/rotten_tomatoes/gold_score": -1.0,
        "eval/rotten_tomatoes/kl": 1.5,
        "eval/proxy_score": 1.23456,
        "eval/gold_score": -0.5,
        "eval/kl": 0.0123,
    }
    line = "eval/proxy_score 1.2346, eval/gold_score -0.5000, eval/kl 0.0123"
    assert ppo.summary(metrics) == line
    full = line + " (eval/heldout/gold_score 0.2500, eval/rotten_tomatoes/gold_score -1.0000)"
    assert ppo.summary(metrics, full=True) == full


# ---------------------------------------------------------------- the evaluation, on the tiny checkpoints
@pytest.fixture(scope="module")
def moved(tiny_pipeline):
    """What main builds (test_ppo.setup) with β = 0, --gold-fn gold_judge, a policy that is not the reference, two
    evaluation sets of unequal size (3 and 5 prompts), and as the stop token the token the evaluation's draws (with no
    stop token) hold most often, so that its responses end at different positions (some never)."""
    tmp, prompts = tiny_pipeline
    args = tiny_args(
        tmp, prompts, kl_coef=0.0, gold_fn="test_ppo_eval:gold_judge", stop_token_id=-1, num_mini_batches=1
    )
    s = setup(args)
    s.params = {"policy": perturbed(s.params["policy"], jax.random.key(1), 0.05), "value": s.params["value"]}
    q, qm = np.asarray(s.q), np.asarray(s.qm)
    s.eval_sets = {"small": (q[:3], qm[:3]), "large": (q[3:8], qm[3:8])}
    drawn = [  # the keys evaluate() uses: the same draws up to the first stop token, whatever it is
        ppo.generate(s.args, s.models, s.params, queries, qmask, jax.random.fold_in(jax.random.key(1234), i))[0]
        for i, (queries, qmask) in enumerate(s.eval_sets.values())
    ]
    stop = int(np.bincount(np.concatenate([np.asarray(d).ravel() for d in drawn])).argmax())
    s.args = dataclasses.replace(s.args, stop_token_id=stop)
    return s


@partial(jax.jit, static_argnums=0)
def forward_rows(graphdef, params, seqs):
    """The model's own __call__ on unpadded-on-the-left rows seqs [N, L] (positions 0..L-1, every token attended:
    causal attention, so what follows a row's real tokens cannot change their outputs)."""
    N, L = seqs.shape
    return nnx.merge(graphdef, params)(seqs, jnp.broadcast_to(jnp.arange(L), (N, L)), jnp.ones((N, L), bool))[0]


def naive_episodes(s, queries, qmask, responses):
    """(prompt ids, response ids up to the first stop) per row, by a Python loop."""
    lengths = first_stop_lengths(responses, s.args.stop_token_id)
    return [(np.asarray(q)[np.asarray(k)], np.asarray(r)[:n]) for q, k, r, n in zip(queries, qmask, responses, lengths)]


def right_padded(seqs, length=32):
    out = np.zeros((len(seqs), length), np.int32)
    for b, x in enumerate(seqs):
        out[b, : len(x)] = x
    return jnp.asarray(out)


def naive_kl_scores_entropy(s, episodes):
    """Per episode: Σ_t log π(y_t) − log π_ref(y_t) over its real tokens (full logits / T, float64 log-softmax), the
    reward model's score at the EOS after the response, and Σ_t −log π(y_t)."""
    seqs = right_padded([np.concatenate([p, r]) for p, r in episodes])
    logp = {
        who: log_softmax64(np.asarray(forward_rows(s.models.policy, params, seqs)) / s.args.temperature)
        for who, params in (("policy", s.params["policy"]), ("ref", s.frozen["ref"]))
    }
    eos = s.args.eos_token_id
    rm_seqs = [list(p) + list(r) + ([] if len(r) and r[-1] == eos else [eos]) for p, r in episodes]
    rm = np.asarray(forward_rows(s.models.reward, s.frozen["reward"], right_padded(rm_seqs)))
    kl, scores, entropy = [], [], []
    for b, (p, r) in enumerate(episodes):
        lp = [logp["policy"][b, len(p) - 1 + t, tok] for t, tok in enumerate(r)]
        ref = [logp["ref"][b, len(p) - 1 + t, tok] for t, tok in enumerate(r)]
        kl.append(sum(lp) - sum(ref))
        entropy.append(-sum(lp))
        scores.append(rm[b, len(rm_seqs[b]) - 1])
    return np.array(kl), np.array(scores, np.float64), np.array(entropy)


def test_evaluate_reports_each_sets_means_and_the_pooled_means_of_the_gold_judge_on_the_completions(moved, monkeypatch):
    """evaluate() on two held-out sets of unequal size (3 and 5 prompts), a policy that is not the reference and
    responses that stop at different positions: the gold judge is given the decoded prompts and completions (not
    prompt + completion); eval/<set>/* are each set's means of the proxy score (the reward model), the gold score and
    the KL Σ_t log π − log π_ref over each response's real tokens (naive per-episode forward passes); eval/* are the
    means over all episodes of both sets (not the mean of the two set means); the samples table holds each set's
    first --num-sample-rows episodes, their columns aligned."""
    s = moved
    eval_sets = s.eval_sets
    rolls, real = [], ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a: rolls.append(real(*a)) or rolls[-1])
    GOLD_CALLS.clear()
    metrics, table = ppo.evaluate(s.args, s.models, s.tok, s.params, s.frozen, eval_sets)

    expected, pooled, table_rows = {}, {"proxy_score": [], "gold_score": [], "kl": []}, []
    all_lengths = []
    for (name, (queries, qmask)), roll, (seen_prompts, seen_completions) in zip(eval_sets.items(), rolls, GOLD_CALLS):
        episodes = naive_episodes(s, queries, qmask, roll["responses"])
        all_lengths += [len(r) for _, r in episodes]
        prompts = [s.tok.decode(p.tolist()) for p, _ in episodes]
        completions = [s.tok.decode(r.tolist()) for _, r in episodes]
        assert seen_prompts == prompts and seen_completions == completions  # the completions alone
        kl, proxy, _ = naive_kl_scores_entropy(s, episodes)
        gold = hand_gold(prompts, completions)
        for k, v in (("proxy_score", proxy), ("gold_score", gold), ("kl", kl)):
            expected[f"eval/{name}/{k}"] = v.mean()
            pooled[k] += list(v)
        table_rows += list(zip(prompts, completions, proxy, gold))[: s.args.num_sample_rows]
    R = s.args.response_length
    assert len(GOLD_CALLS) == 2 and len(set(all_lengths)) >= 3 and min(all_lengths) < R and R in all_lengths
    for k, v in pooled.items():
        expected[f"eval/{k}"] = np.mean(v)
        assert np.mean(v) != pytest.approx(np.mean([expected[f"eval/{n}/{k}"] for n in eval_sets]), abs=1e-3), k
    assert abs(expected["eval/kl"]) > 1e-2  # the policy is not the reference
    assert list(metrics) == list(expected)
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, rel=1e-4, abs=2e-5), k

    lines = table.split("\n")
    assert lines[:2] == ["|prompt|completion|proxy|gold|", "|-|-|-|-|"] and len(lines) == 2 + 2 * 2
    for line, (p, c, proxy, gold) in zip(lines[2:], table_rows):
        cells = line.split("|")
        assert cells[1:3] == [p.replace("\n", " "), c.replace("\n", " ")] and cells[4] == f"{gold:.2f}"
        assert float(cells[3]) == pytest.approx(proxy, abs=0.0051)


def test_with_kl_coef_0_the_kl_is_still_measured_and_the_penalty_is_0(moved, monkeypatch):
    """A PPO iteration with β = 0 (policy != reference, responses ending at different positions): objective/kl and
    objective/entropy are the per-episode sums of the naive forward passes, averaged; objective/scores the reward
    model's mean; objective/non_score_reward is 0 and objective/rlhf_reward the scores' mean; β stays 0."""
    s = moved
    queries, qmask = (jnp.asarray(x) for x in s.eval_sets["small"])
    rolls, real, generate = [], ppo.rollout, ppo.generate
    monkeypatch.setattr(ppo, "rollout", lambda *a: rolls.append(real(*a)) or rolls[-1])
    eval_key = jax.random.fold_in(jax.random.key(1234), 0)  # the draws of the evaluation: stops at varied positions
    monkeypatch.setattr(ppo, "generate", lambda *a: generate(*a[:-1], eval_key))
    params = jax.tree.map(jnp.copy, s.params)  # ppo_update donates its params
    state = {"params": params, "opt_state": s.tx.init(params), "kl_coef": jnp.float32(0.0)}
    state, stats = ppo.ppo_iteration(
        s.args, s.models, s.tx, s.rows, s.tok, state, s.frozen, queries, qmask, jax.random.key(7)
    )
    episodes = naive_episodes(s, queries, qmask, rolls[0]["responses"])
    kl, scores, entropy = naive_kl_scores_entropy(s, episodes)
    lengths = [len(r) for _, r in episodes]
    assert len(set(lengths)) >= 2 and abs(kl.mean()) > 1e-2
    assert stats["objective/kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=2e-5)
    assert stats["objective/entropy"] == pytest.approx(entropy.mean(), rel=1e-4)
    assert stats["objective/scores"] == pytest.approx(scores.mean(), rel=1e-4, abs=2e-5)
    assert stats["val/num_eos_tokens"] == sum(r[-1] == s.args.stop_token_id for _, r in episodes)
    assert stats["objective/non_score_reward"] == 0.0 and stats["objective/kl_coef"] == 0.0
    assert stats["objective/rlhf_reward"] == pytest.approx(stats["objective/scores"], abs=1e-6)
    assert float(state["kl_coef"]) == 0.0


# ---------------------------------------------------------------- main: adaptive β, first / final, what is printed
def test_main_adapts_beta_by_ziegler_and_returns_and_prints_the_first_and_final_evaluations(
    tiny_pipeline, monkeypatch, capsys
):
    """A run of 4 updates of 8 episodes with --adaptive-kl (β₀ = 0.1, target 6, horizon 10), fed the KL sequence 12,
    6.6, 3, 5.4 (beyond the clip, inside it above and below the target, beyond it below): each update's rewards use
    β_t, logged as objective/kl_coef, with β_{t+1} = β_t (1 + clip(KL_t / 6 − 1, ±0.2) · 8 / 10) (Ziegler et al. 2019
    §2.2, n_steps = the batch size), by a hand loop; the checkpoint holds β_4. main returns the evaluations before and
    after training (the final one of the trained policy), logs them as eval/* and prints them ("start:", "final:")."""
    tmp, prompts = tiny_pipeline
    args = tiny_args(
        tmp, prompts, adaptive_kl=True, kl_coef=0.1, kl_target=6.0, kl_horizon=10, total_episodes=32,
        eval_every=10, eval_prompts=2, checkpoint_every=1, gold_fn="test_ppo_eval:gold_judge",
        output_dir=str(tmp / "out_i25_ppo"), checkpoint_dir=str(tmp / "ck_i25_ppo"),
    )  # fmt: skip
    fed, used, real = [12.0, 6.6, 3.0, 5.4], [], ppo.compute_advantages

    def feeding(args, roll, kl_coef):  # the β each update's rewards use, and the KL it reports
        advantages, returns, rewards, stats = real(args, roll, kl_coef)
        used.append(float(kl_coef))
        return advantages, returns, rewards, stats | {"objective/kl": jnp.float32(fed[len(used) - 1])}

    writer = RecordingWriter()
    monkeypatch.setattr(ppo, "compute_advantages", feeding)
    monkeypatch.setattr(ppo, "summary_writer", lambda args: writer)
    GOLD_CALLS.clear()
    first, final = ppo.main(args)
    printed = capsys.readouterr().out

    betas = [0.1]
    for kl in fed:  # β is kept as a float32 between updates
        e = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        betas.append(float(np.float32(betas[-1] * (1.0 + e * 8 / 10))))
    assert used == pytest.approx(betas[:4], rel=1e-6)
    logged = writer.scalars
    assert logged["objective/kl_coef"] == pytest.approx({8 * (t + 1): b for t, b in enumerate(betas[:4])}, rel=1e-6)
    assert logged["objective/kl"] == pytest.approx({8 * (t + 1): kl for t, kl in enumerate(fed)}, rel=1e-6)
    step, state = read_checkpoint(args.run.checkpoint_dir)
    assert step == 4 and float(state["kl_coef"]) == pytest.approx(betas[4], rel=1e-6)

    # the evaluations: before training and of the trained (exported) policy; the gold judge saw 2 sets x 2 calls
    assert len(GOLD_CALLS) == 4
    for ev, calls in ((first, GOLD_CALLS[:2]), (final, GOLD_CALLS[2:])):
        golds = [hand_gold(p, c) for p, c in calls]
        assert ev["eval/gold_score"] == pytest.approx(np.concatenate(golds).mean(), abs=1e-6)
        assert [ev["eval/heldout/gold_score"], ev["eval/rotten_tomatoes/gold_score"]] == pytest.approx(
            [g.mean() for g in golds], abs=1e-6
        )
    assert abs(first["eval/kl"]) < 1e-4 < abs(final["eval/kl"])  # the policy starts at the reference and moves
    s = setup(args)
    trained = {"policy": nnx.state(ppo.load_model(args.run.output_dir)[0], nnx.Param), "value": s.params["value"]}
    for ev, params in ((first, s.params), (final, trained)):
        again, _ = ppo.evaluate(s.args, s.models, s.tok, params, s.frozen, s.eval_sets)
        assert ev == pytest.approx(again, rel=1e-4, abs=1e-5)
    for ev, step in ((first, 0), (final, 32)):
        assert {k: logged[k][step] for k in ev} == ev

    def line(ev):  # the summary by hand: the pooled means, then each set's gold score
        pooled = ", ".join(f"eval/{k} {ev[f'eval/{k}']:.4f}" for k in ("proxy_score", "gold_score", "kl"))
        sets = ", ".join(
            f"eval/{n}/gold_score {ev[f'eval/{n}/gold_score']:.4f}" for n in ("heldout", "rotten_tomatoes")
        )
        return pooled, f"{pooled} ({sets})"

    assert f"at update 0: {line(first)[0]}\n" in printed
    assert f"\nstart: {line(first)[1]}\nfinal: {line(final)[1]}\n" in printed
