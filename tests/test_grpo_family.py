"""grpo.py's GRPO family (issue 28): DAPO's loss, dynamic sampling and overlong penalty, GSPO's sequence ratio,
REINFORCE++-baseline's per-token advantages, truncated-completion masking and the top-entropy tokens, each against the
formula computed by hand and, where it touches the loss, against float64 loops over a real batch of the tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RecordingWriter, make_args
from flax import nnx
from test_grpo import (  # noqa: F401 (fixtures)
    ADV,
    LOGP,
    MASK,
    OLD,
    REF,
    chars_value,
    i25_rewards,
    loss_by_hand,
    naive_episodes,
    naive_token_statistics,
    perturbed,
    prompts_with_answers,
    rewards_module,
    setup_from,
    stopping_pipeline,
    tiny_args,
)

import grpo


def hand_loss(monkeypatch, entropy=None, **flags):
    """grpo_loss on the arrays of test_grpo (log π given directly, as the entropy), with `flags`."""
    ent = jnp.zeros_like(jnp.asarray(LOGP)) if entropy is None else jnp.asarray(entropy)
    monkeypatch.setattr(grpo, "completion_logprobs", lambda graphdef, params, *a: (params, ent))
    args = make_args(grpo, response_length=3, **{"epsilon": 0.2, **flags})
    batch = {"tokens": None, "mask": None, "completions": None, "completion_mask": jnp.asarray(MASK)}
    batch |= {"old_logprobs": jnp.asarray(OLD), "ref_logprobs": jnp.asarray(REF), "advantages": jnp.asarray(ADV)}
    batch["contains_stop"] = jnp.asarray([True, False])  # the first completion stopped, the second was cut at R
    return grpo.grpo_loss(jnp.asarray(LOGP), args, None, batch)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_dapo_normalises_by_every_active_token_of_the_batch(beta, monkeypatch):
    loss, _ = hand_loss(monkeypatch, loss_type="dapo", beta=beta, epsilon_high=0.28)
    assert float(loss) == pytest.approx(loss_by_hand("bnpo", beta, 0.2, 0.28), rel=1e-5)
    if beta == 0.0:  # by hand: the 5 real tokens' clipped terms summed, over 5 (not per row, not B·R = 6)
        terms = [-0.8 * 1.28, -0.8 * np.exp(-0.1), 1.5 * 0.8, 1.5 * np.exp(0.1), 1.5 * 0.8]
        assert float(loss) == pytest.approx(sum(terms) / 5, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_clips_one_ratio_per_completion_the_exp_of_its_mean_token_log_ratio(loss_type, monkeypatch):
    """s_1 = exp((0.5 − 0.1) / 2) = e^0.2 (inside 1.28, A > 0); s_2 = exp((−0.5 + 0.1 − 1) / 3) (below 0.8, A < 0:
    clipped); β·k3 stays per token."""
    loss, stats = hand_loss(
        monkeypatch, importance_sampling_level="sequence", loss_type=loss_type, beta=0.1, epsilon_high=0.28
    )
    s = [np.exp(0.2), np.exp(-1.4 / 3)]
    seq = [-min(s[0] * 0.8, 0.8 * min(s[0], 1.28)), -min(s[1] * -1.5, -1.5 * max(s[1], 0.8))]
    assert seq[1] == pytest.approx(1.5 * 0.8)  # the second completion's ratio is clipped
    k3 = np.exp(REF - LOGP) - (REF - LOGP) - 1
    terms = (np.array(seq)[:, None] + 0.1 * k3) * MASK
    expected = np.mean(terms.sum(1) / MASK.sum(1)) if loss_type == "grpo" else terms.sum() / MASK.sum()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # TRL's clip ratios at the sequence level: fractions of completions (the token-level ones would be 2/5, 1/5)
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(1 / 2)
    assert float(stats["clip_ratio/high_mean"]) == 0.0
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(1 / 2)


def test_gspo_takes_the_papers_epsilons_unless_given():
    args = grpo.with_defaults(make_args(grpo, importance_sampling_level="sequence"), eos_id=3, pad_id=0)
    assert (args.epsilon, args.epsilon_high) == (3e-4, 4e-4)
    args = grpo.with_defaults(make_args(grpo, importance_sampling_level="sequence", epsilon=1e-3), 3, 0)
    assert (args.epsilon, args.epsilon_high) == (1e-3, 4e-4)
    args = grpo.with_defaults(make_args(grpo), 3, 0)
    assert (args.epsilon, args.epsilon_high, args.scale_rewards) == (0.2, None, "group")
    assert grpo.with_defaults(make_args(grpo, advantage="reinforce_pp"), 3, 0).scale_rewards == "batch"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_a_truncated_completion_counts_nothing_in_the_loss(loss_type, monkeypatch):
    loss, stats = hand_loss(monkeypatch, mask_truncated_completions=True, loss_type=loss_type, beta=0.1)
    k3 = np.exp(REF[0, :2] - LOGP[0, :2]) - (REF[0, :2] - LOGP[0, :2]) - 1
    row1 = np.array([-0.8 * min(np.exp(0.5), 1.2), -0.8 * np.exp(-0.1)]) + 0.1 * k3  # the stopped completion alone
    assert float(loss) == pytest.approx(row1.sum() / 2 / (2 if loss_type == "grpo" else 1), rel=1e-5)
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(1 / 2)  # over the 2 tokens that count
    assert float(stats["clip_ratio/low_mean"]) == 0.0


def test_only_the_top_entropy_quantile_of_the_real_tokens_carries_the_loss(monkeypatch):
    """Real tokens' entropies 0.1, 0.9 | 0.5, 0.3, 0.7 (the padding's 5.0 does not count): the 0.5 quantile (linear, as
    torch.quantile) is 0.5, so the tokens of 0.9, 0.5 and 0.7 carry the loss, normalised by all 5 real tokens."""
    entropy = [[0.1, 0.9, 5.0], [0.5, 0.3, 0.7]]
    loss, _ = hand_loss(monkeypatch, entropy, top_entropy_quantile=0.5, loss_type="bnpo", beta=0.0)
    terms = [-0.8 * np.exp(-0.1), 1.5 * 0.8, 1.5 * 0.8]  # (0, 1), (1, 0), (1, 2)
    assert float(loss) == pytest.approx(sum(terms) / 5, rel=1e-5)
    full, _ = hand_loss(monkeypatch, entropy, top_entropy_quantile=1.0, loss_type="bnpo", beta=0.0)
    assert float(full) == pytest.approx(loss_by_hand("bnpo", 0.0, 0.2, 0.2), rel=1e-5)


def reinforce_pp_by_hand(rewards, G, beta, old, ref, mask, whiten=True):
    """REINFORCE++-baseline as float64 loops: r − mean(group) at the last token, −β(old − ref) at each, returns to go,
    then (x − mean) / sqrt(population var) over the real tokens."""
    B, R = mask.shape
    out = np.zeros((B, R))
    for i in range(B):
        group = rewards[i // G * G : i // G * G + G]
        n = int(mask[i].sum())
        for t in range(n):
            out[i, t] = sum(-beta * (old[i, s] - ref[i, s]) for s in range(t, n)) + rewards[i] - np.mean(group)
    if whiten:
        values = out[mask]
        out = np.where(mask, (out - values.mean()) / max(values.var(), 1e-8) ** 0.5, 0.0)
    return out


@pytest.mark.parametrize("beta, scale", [(0.0, None), (0.5, None), (0.5, "none")])
def test_reinforce_pp_advantages_equal_the_papers_returns_computed_by_hand(beta, scale):
    rng = np.random.default_rng(0)
    mask = np.arange(5)[None] < np.array([5, 2, 4, 1, 5, 3])[:, None]  # early stops and full-length ones
    old, ref = rng.normal(-2, 0.5, (6, 5)), rng.normal(-2, 0.5, (6, 5))
    rewards = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])  # two groups of 3
    args = grpo.with_defaults(
        make_args(grpo, group_size=3, advantage="reinforce_pp", beta=beta, scale_rewards=scale), 3, 0
    )
    batch = {"completion_mask": jnp.asarray(mask), "old_logprobs": jnp.asarray(old, jnp.float32)}
    batch["ref_logprobs"] = jnp.asarray(ref, jnp.float32)
    ours = grpo.reinforce_pp_advantages(args, jnp.asarray(rewards, jnp.float32), batch)
    expected = reinforce_pp_by_hand(rewards, 3, beta, old, ref, mask, whiten=scale is None)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    if beta == 0.0 and scale is None:  # the returns are the centred reward at every token: −4/3, −1/3, 5/3; −1, −1, 2
        centred = np.array([-4 / 3, -1 / 3, 5 / 3, -1, -1, 2])[:, None] * np.ones(5)
        values = centred[mask]
        assert float(ours[1, 0]) == pytest.approx((-1 / 3 - values.mean()) / values.std(), rel=1e-4)


def test_the_overlong_penalty_is_dapos_eq_13():
    args = make_args(grpo, response_length=24, overlong_buffer=4, overlong_penalty_factor=0.5)
    np.testing.assert_allclose(
        grpo.overlong_penalty(args, np.array([10, 20, 21, 23, 24])), [0, 0, -0.125, -0.375, -0.5]
    )
    assert grpo.overlong_penalty(make_args(grpo, response_length=24), np.array([24])) == 0.0


# ---------------------------------------------------------------- on a real batch of the tiny model
def family_args(stopping_pipeline, **flags):
    sft_path, _, train_path, _ = stopping_pipeline
    base = dict(sft_model=str(sft_path), dataset=str(train_path), reward_fn=("grpo_i25_rewards:first_group_flat",),
                response_length=6, group_size=4, batch_size=12, temperature=1.0, beta=0.3, num_devices=1)  # fmt: skip
    return make_args(grpo, **{**base, **flags})


def naive_family_loss(args, A, logp, old, ref, entropy, rows, stopped):
    """Step 6 with every option, as float64 loops over the real tokens -> loss, clip_ratio/region_mean."""
    B, R = logp.shape
    counts = [
        len(r["completion"]) if (stopped[i] or not args.mask_truncated_completions) else 0 for i, r in enumerate(rows)
    ]
    real = [(i, t) for i in range(B) for t in range(counts[i])]
    threshold = np.quantile([entropy[i, t] for i, t in real], 1 - args.top_entropy_quantile)
    seq = [np.exp(np.mean([logp[i, t] - old[i, t] for t in range(counts[i])])) if counts[i] else 1.0 for i in range(B)]
    eh = args.epsilon_high or args.epsilon
    terms, clipped = np.zeros((B, R)), {}
    for i, t in real:
        rho = seq[i] if args.importance_sampling_level == "sequence" else np.exp(logp[i, t] - old[i, t])
        a = A[i, t] if A.ndim == 2 else A[i]
        term = -min(rho * a, min(max(rho, 1 - args.epsilon), 1 + eh) * a)
        clipped[(i, t) if A.ndim == 2 or args.importance_sampling_level == "token" else i] = (
            rho < 1 - args.epsilon and a < 0) or (rho > 1 + eh and a > 0)  # fmt: skip
        if args.advantage != "reinforce_pp":
            term += args.beta * (np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1)
        terms[i, t] = term * (entropy[i, t] >= threshold)
    if args.loss_type == "grpo":
        loss = np.mean([terms[i].sum() / max(counts[i], 1) for i in range(B)])
    else:  # bnpo, dapo
        loss = terms.sum() / sum(counts)
    return loss, np.mean(list(clipped.values()))


@pytest.mark.parametrize(
    "flags",
    [
        dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28),
        dict(importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.01, loss_type="grpo"),
        dict(mask_truncated_completions=True, top_entropy_quantile=0.3, loss_type="bnpo", epsilon=0.2),
        dict(advantage="reinforce_pp", loss_type="dapo", epsilon=0.2),
    ],
    ids=["dapo", "gspo", "masked-top-entropy", "reinforce_pp"],
)
def test_each_variant_s_loss_gradient_and_advantages_at_a_moved_policy_equal_naive_loops(
    stopping_pipeline, i25_rewards, flags
):
    """A batch sampled by the SFT policy (completions that stop early and ones cut at R), the policy moved and a
    different reference: the advantages (REINFORCE++: from the naive log-probs), the loss and the clip ratio equal
    float64 loops; the gradient equals that of a plain full-logits JAX loss."""
    args, tok, graphdef, params, frozen, train = setup_from(family_args(stopping_pipeline, **flags))
    frozen = {"ref": perturbed(frozen["ref"], 1, 0.02), "reward": None}
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, _ = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(5))
    moved = perturbed(params, 2, 0.02)
    rows = naive_episodes(tok, q, qm, np.asarray(batch["completions"]), args.stop_token_id)
    stopped = [r["completion"][-1] == args.stop_token_id for r in rows]
    assert 0 < sum(stopped) < len(rows)  # both kinds
    logp, entropy = naive_token_statistics(nnx.merge(graphdef, moved), rows, 1.0, 6)
    ref, _ = naive_token_statistics(nnx.merge(graphdef, frozen["ref"]), rows, 1.0, 6)
    old, _ = naive_token_statistics(nnx.merge(graphdef, params), rows, 1.0, 6)
    A = np.asarray(batch["advantages"], np.float64)
    if args.advantage == "reinforce_pp":
        rewards = np.array([1.0 if r["prompt"] == rows[0]["prompt"] else chars_value(r["text"]) for r in rows])
        mask = np.arange(6)[None] < np.array([len(r["completion"]) for r in rows])[:, None]
        np.testing.assert_allclose(A, reinforce_pp_by_hand(rewards, 4, 0.3, old, ref, mask), rtol=1e-3, atol=1e-3)
    loss, clipped = naive_family_loss(args, A, logp, old, ref, entropy, rows, stopped)
    assert 0 < clipped < 1  # some ratios clipped, not all
    ours, stats = grpo.grpo_loss(moved, args, graphdef, batch)
    assert abs(loss) > 1e-4 and float(ours) == pytest.approx(loss, rel=2e-4, abs=1e-6)
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(clipped, rel=1e-4)
    grads = jax.grad(lambda p: grpo.grpo_loss(p, args, graphdef, batch)[0])(moved)
    naive_grads = jax.grad(lambda p: plain_loss(args, graphdef, p, batch))(moved)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(naive_grads)):
        np.testing.assert_allclose(g, h, rtol=1e-3, atol=1e-5)


def plain_loss(args, graphdef, params, batch):
    """Step 6 from the model's full logits, written plainly (jax, for the gradient)."""
    tokens, mask, m = batch["tokens"], batch["mask"], batch["completion_mask"]
    if args.mask_truncated_completions:
        m = m & batch["contains_stop"][:, None]
    R = m.shape[1]
    logits, _ = nnx.merge(graphdef, params)(tokens, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), mask)
    logp_all = jax.nn.log_softmax(logits[:, -R - 1 : -1] / args.temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, -R:, None], axis=-1)[..., 0]
    entropy = jax.lax.stop_gradient(-(jnp.exp(logp_all) * logp_all).sum(-1))
    d = logp - batch["old_logprobs"]
    if args.importance_sampling_level == "sequence":
        d = jnp.broadcast_to((d * m).sum(1, keepdims=True) / jnp.maximum(m.sum(1, keepdims=True), 1), d.shape)
    A = batch["advantages"] if batch["advantages"].ndim == 2 else batch["advantages"][:, None]
    eh = args.epsilon_high or args.epsilon
    terms = -jnp.minimum(jnp.exp(d) * A, jnp.clip(jnp.exp(d), 1 - args.epsilon, 1 + eh) * A)
    if args.advantage != "reinforce_pp":
        k = batch["ref_logprobs"] - logp
        terms = terms + args.beta * (jnp.exp(k) - k - 1)
    threshold = jnp.quantile(entropy[np.asarray(m)], 1 - args.top_entropy_quantile)
    terms = terms * m * (entropy >= threshold)
    if args.loss_type == "grpo":
        return jnp.mean(terms.sum(1) / jnp.maximum(m.sum(1), 1))
    return terms.sum() / m.sum()


# ---------------------------------------------------------------- dynamic sampling and the overlong penalty
def naive_rounds(args, tok, graphdef, params, frozen, train, key, rounds):
    """Each round j of step 0 sampled alone, as a plain loop: its prompts (step + j · max_steps), the j-th key folded
    in; -> the rows (tokens, completions) and rewards (first_group_flat, by hand) of all rounds."""
    plain = dataclasses.replace(args, dynamic_sampling=False)
    tokens, completions, rewards = [], [], []
    for j in range(rounds):
        q, qm, columns = grpo.prompt_batch(args, train, 0, j)
        b, _ = grpo.rollout(plain, graphdef, None, tok, params, frozen, q, qm, columns,
                            jax.random.fold_in(key, j) if j else key)  # fmt: skip
        rows = naive_episodes(tok, q, qm, np.asarray(b["completions"]), args.stop_token_id)
        rewards += [1.0 if r["prompt_text"] == rows[0]["prompt_text"] else chars_value(r["text"]) for r in rows]
        tokens.append(np.asarray(b["tokens"]))
        completions.append(np.asarray(b["completions"]))
    return np.concatenate(tokens), np.concatenate(completions), np.array(rewards)


@pytest.mark.parametrize("max_rounds", [4, 1])
def test_dynamic_sampling_keeps_the_first_informative_groups_of_as_many_rounds_as_needed(
    stopping_pipeline, i25_rewards, max_rounds
):
    """first_group_flat gives each round's first group equal rewards: 2 of 3 groups per round are informative, so a
    second round is needed; with one round at most, the flat group fills the batch (advantages 0)."""
    args = family_args(stopping_pipeline, dynamic_sampling=True, max_sampling_rounds=max_rounds, max_steps=5)
    args, tok, graphdef, params, frozen, train = setup_from(args)
    key = jax.random.key(7)
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    more = lambda j: grpo.prompt_batch(args, train, 0, j)  # noqa: E731
    batch, stats = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, key, more)
    rounds = min(2, max_rounds)
    tokens, completions, rewards = naive_rounds(args, tok, graphdef, params, frozen, train, key, rounds)
    groups = rewards.reshape(-1, 4)
    informative = [g for g in range(len(groups)) if groups[g].max() > groups[g].min()]
    assert informative[:3] == ([1, 2, 4] if max_rounds > 1 else [1, 2])  # the flat first groups are dropped
    keep = (informative + [g for g in range(len(groups)) if g not in informative])[:3]
    rows = np.concatenate([np.arange(4) + 4 * g for g in keep])
    np.testing.assert_array_equal(batch["tokens"], tokens[rows])
    np.testing.assert_array_equal(batch["completions"], completions[rows])
    assert not np.array_equal(tokens[:12], tokens[12:24]) if rounds > 1 else True  # round 1 samples other prompts
    assert stats["sampling/rounds"] == rounds
    assert stats["frac_reward_zero_std"] == pytest.approx(np.mean(groups.std(1) == 0))
    assert stats["reward"] == pytest.approx(rewards[rows].mean(), rel=1e-5)
    kept = rewards[rows].reshape(-1, 4)
    A = (kept - kept.mean(1, keepdims=True)) / (kept.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(batch["advantages"], A.reshape(-1), rtol=1e-4, atol=1e-5)


def test_the_overlong_penalty_enters_the_reward_and_its_mean_is_logged(stopping_pipeline, i25_rewards):
    args = family_args(stopping_pipeline, overlong_buffer=3, overlong_penalty_factor=2.0, scale_rewards="none")
    args, tok, graphdef, params, frozen, train = setup_from(args)
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, stats = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(3))
    rows = naive_episodes(tok, q, qm, np.asarray(batch["completions"]), args.stop_token_id)
    lengths = [len(r["completion"]) for r in rows]
    penalty = [0.0 if n <= 3 else 2.0 * (3 - n) / 3 for n in lengths]
    assert len(set(penalty)) >= 2  # lengths on both sides of R − L_cache
    rewards = np.array([1.0 if r["prompt"] == rows[0]["prompt"] else chars_value(r["text"]) for r in rows])
    assert stats["rewards/overlong_penalty/mean"] == pytest.approx(np.mean(penalty), rel=1e-5)
    assert stats["reward"] == pytest.approx(np.mean(rewards + penalty), rel=1e-5)
    grouped = (rewards + penalty).reshape(-1, 4)
    np.testing.assert_allclose(batch["advantages"], (grouped - grouped.mean(1, keepdims=True)).reshape(-1), atol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(importance_sampling_level="sequence", advantage="reinforce_pp"),
         "--importance-sampling-level sequence .* --advantage reinforce_pp"),
        (dict(importance_sampling_level="sequence", top_entropy_quantile=0.2),
         "--importance-sampling-level sequence .* --top-entropy-quantile 0.2"),
        (dict(advantage="reinforce_pp", scale_rewards="group"), "--advantage reinforce_pp .*--scale-rewards"),
        (dict(top_entropy_quantile=0.0), "--top-entropy-quantile 0.0: must be in"),
        (dict(max_sampling_rounds=0), "--max-sampling-rounds 0"),
        (dict(overlong_buffer=7), "--overlong-buffer 7: must be in \\[0, --response-length 6\\]"),
        (dict(overlong_penalty_factor=-1.0), "--overlong-penalty-factor -1.0"),
        (dict(epsilon=0.0), "--epsilon, --epsilon-high: must be > 0"),
    ],
)  # fmt: skip
def test_impossible_combinations_are_refused_naming_the_flags(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module, override, message
):
    with pytest.raises(ValueError, match=message):
        grpo.main(tiny_args(tiny_sft, tmp_path, prompts_with_answers, **override))


def test_main_samples_each_later_round_from_that_steps_own_prompts_and_logs_the_rounds(
    stopping_pipeline, i25_rewards, tmp_path, monkeypatch
):
    """--dynamic-sampling through main: round j of step s draws the prompts of prompt_batch(s, j); the rounds and the
    zero-std fraction are logged at every step."""
    writer, handed, rollout = RecordingWriter(), {}, grpo.rollout
    monkeypatch.setattr(grpo, "summary_writer", lambda args: writer)

    def spy(*a):  # (args, ..., queries, query_mask, columns, key, more)
        handed[len(handed)] = (np.asarray(a[6]), np.asarray(a[10](1)[0]), np.asarray(a[10](2)[0]))
        return rollout(*a)

    monkeypatch.setattr(grpo, "rollout", spy)
    flags = dict(
        dynamic_sampling=True, max_steps=2, eval_every=2, eval_prompts=4, eval_dataset=str(stopping_pipeline[3])
    )
    args = family_args(
        stopping_pipeline, output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck"), **flags
    )
    grpo.main(args)
    args, *_, train = setup_from(args)
    for step in range(2):
        expected = [grpo.prompt_batch(args, train, step, j)[0] for j in range(3)]
        assert [e.tolist() for e in expected] == [h.tolist() for h in handed[step]]
    assert not np.array_equal(handed[0][0], handed[0][1]) and not np.array_equal(handed[0][1], handed[1][1])
    assert writer.scalars["sampling/rounds"] == {1: 2.0, 2: 2.0}  # first_group_flat: each round's first group is flat
    assert set(writer.scalars["frac_reward_zero_std"]) == {1, 2}
