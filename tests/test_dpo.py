"""dpo.py: the losses against hand-computed values, sequence log-probs against a naive loop, the reference frozen and
precomputed as on the fly, learning the preferred side, the reward model's split, the evaluation, resume, export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RecordingWriter, assert_same_params, kill_during_call, make_args, read_checkpoint
from flax import nnx
from test_reward_model import rule_pairs
from test_sft import write_jsonl

import dpo
import reward_model as rm

LOGPS = np.array([[-3.0, -7.5, -2.0], [-5.0, -6.0, -2.5]])  # [2, B]: chosen, rejected
REF = np.array([[-4.0, -7.0, -2.2], [-4.5, -6.5, -2.0]])
LENGTHS = np.array([[2, 5, 1], [4, 3, 1]])


def sigmoid_loss(h, beta, eps=0.0):
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


@pytest.mark.parametrize(
    "loss_type, label_smoothing, expected",
    [
        ("sigmoid", 0.0, lambda h, hbar, b: sigmoid_loss(h, b)),
        ("sigmoid", 0.2, lambda h, hbar, b: sigmoid_loss(h, b, 0.2)),
        ("hinge", 0.0, lambda h, hbar, b: max(0.0, 1 - b * h)),
        ("ipo", 0.0, lambda h, hbar, b: (hbar - 1 / (2 * b)) ** 2),
    ],
)
def test_each_loss_equals_its_formula_computed_by_hand(loss_type, label_smoothing, expected):
    beta = 0.5
    args = make_args(dpo, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    losses, rewards = dpo.dpo_loss(args, jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(LENGTHS))
    for i in range(LOGPS.shape[1]):
        rho_w, rho_l = LOGPS[0, i] - REF[0, i], LOGPS[1, i] - REF[1, i]
        h, hbar = rho_w - rho_l, rho_w / LENGTHS[0, i] - rho_l / LENGTHS[1, i]
        assert float(losses[i]) == pytest.approx(expected(h, hbar, beta), rel=1e-5), i
        assert rewards[:, i].tolist() == pytest.approx([beta * rho_w, beta * rho_l], rel=1e-6)  # β log π/π_ref
    # the first pair by hand: ρ_w = 1, ρ_l = −0.5, h = 1.5, h̄ = 1/2 + 0.5/4
    pinned = {("sigmoid", 0.0): 0.386871, ("sigmoid", 0.2): 0.536871, ("hinge", 0.0): 0.25, ("ipo", 0.0): 0.140625}
    assert float(losses[0]) == pytest.approx(pinned[loss_type, label_smoothing], abs=1e-6)


def test_sigmoid_loss_falls_as_the_chosen_side_gains_probability():
    """The sign and the orientation: more log-probability on y_w (or less on y_l) lowers every loss."""
    for loss_type in ("sigmoid", "hinge", "ipo"):
        args = make_args(dpo, loss_type=loss_type, beta=0.1)
        base = dpo.dpo_loss(args, jnp.asarray(LOGPS), jnp.asarray(REF), jnp.asarray(LENGTHS))[0]
        up = dpo.dpo_loss(args, jnp.asarray(LOGPS + [[0.5], [0.0]]), jnp.asarray(REF), jnp.asarray(LENGTHS))[0]
        down = dpo.dpo_loss(args, jnp.asarray(LOGPS - [[0.0], [0.5]]), jnp.asarray(REF), jnp.asarray(LENGTHS))[0]
        assert (up <= base).all() and (down <= base).all() and (up < base).any(), loss_type


@pytest.fixture(scope="module")
def rule_data(tiny_sft, tmp_path_factory):
    """Pairs that follow a token rule (chosen has "great", rejected "awful"), a quarter of them against the gold
    ordering, tokenised as dpo.py reads them."""
    tmp = tmp_path_factory.mktemp("dpo_data")
    rows = rule_pairs(160, seed=1)
    for row in rows[::4]:  # a label the gold judge disagrees with, as the simulated labeler's noisy ones
        row["chosen_gold"], row["rejected_gold"] = row["rejected_gold"], row["chosen_gold"]
    path = write_jsonl(tmp / "rule.jsonl", rows)
    tok, eos, pad = dpo.load_tokenizer(tiny_sft)
    train, val = dpo.load_preferences(make_args(dpo, dataset=str(path), max_seq_len=24), tok, eos, pad)
    return path, train, val


def naive_logps(model, tokens, mask, response_mask):
    """log π(y|x) by a loop over the model's full logits (float64 log-softmax): [N, L] -> [N]."""
    logits, _ = model(jnp.asarray(tokens), dpo.positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return np.array(
        [
            sum(logp[i, t - 1, tokens[i, t]] for t in np.flatnonzero(response_mask[i]) if t > 0)
            for i in range(len(tokens))
        ]
    )


def test_sequence_logps_sum_exactly_the_response_tokens(tiny_sft, rule_data):
    """Against a naive loop over the full logits: log π(y_t | x, y_<t) summed over the response and its EOS only."""
    _, train, _ = rule_data
    model, _ = dpo.load_model(tiny_sft)
    graphdef, params = nnx.split(model)
    tokens, mask, resp = (train[k][:, :4].reshape(8, -1) for k in ("tokens", "mask", "response_mask"))
    ours, lengths = dpo.sequence_logps(graphdef, params, tokens, mask, resp)
    for i in range(len(tokens)):
        start, end = np.flatnonzero(resp[i])[[0, -1]]
        assert resp[i].sum() == end - start + 1 and tokens[i, end] == dpo.load_tokenizer(tiny_sft)[1]  # ends at EOS
        assert start > 0 and lengths[i] == end - start + 1
    np.testing.assert_allclose(ours, naive_logps(model, tokens, mask, resp), rtol=0, atol=1e-4)


def test_a_step_from_the_reference_logs_trls_metrics_and_moves_toward_the_chosen_side(tiny_sft, rule_data):
    """At the reference every implicit reward is 0 up to float32 rounding (the reference's log-probs come from another
    compiled program, whose rounding depends on the CPU): loss log 2, logps/* the mean summed log-probs; on pairs
    whose two sides are the same sequence every margin is exactly 0, and no pair counts as accurate (strictly higher
    only); the step raises log π(y_w) − log π(y_l) on the batch it saw."""
    _, train, _ = rule_data
    model, _ = dpo.load_model(tiny_sft)
    graphdef, params = nnx.split(model)
    args, tx = make_args(dpo, batch_size=16), optax.adam(1e-2)  # (the real schedule's first step has lr 0, as HF's)
    batch = {k: v[:, :16] for k, v in train.items()}
    batch["ref_logps"] = np.asarray(dpo.frozen_logps(graphdef, params, batch))
    logps = np.asarray(dpo.pair_logps(graphdef, params, batch)[0])
    step = lambda batch: dpo.train_step(  # noqa: E731
        args,
        graphdef,
        tx,
        jax.tree.map(jnp.copy, params),
        tx.init(params),
        None,
        jax.tree.map(lambda x: x[None], batch),
        jax.random.key(0),
    )  # [A = 1, 2, B, ...]
    new, _, metrics = step(batch)
    m = {k: float(v) for k, v in metrics.items()}
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(m[f"rewards/{k}"]) for k in ("chosen", "rejected", "margins")) < 1e-5
    assert (m["logps/chosen"], m["logps/rejected"]) == pytest.approx(tuple(logps.mean(1)), abs=1e-4)
    tied = {k: v[[0, 0]] for k, v in batch.items()}  # rejected := chosen, ref_logps too
    m = {k: float(v) for k, v in step(tied)[2].items()}
    assert m["rewards/margins"] == m["rewards/accuracies"] == 0.0 and m["rewards/chosen"] == m["rewards/rejected"]
    after = np.asarray(dpo.pair_logps(graphdef, new, batch)[0])
    assert (after[0] - after[1]).mean() > (logps[0] - logps[1]).mean() + 0.1


def test_the_held_out_split_is_the_reward_models(tiny_sft, rule_data):
    path, _, val = rule_data
    tok, eos, pad = dpo.load_tokenizer(tiny_sft)
    _, _, rm_val = rm.load_pairs(make_args(rm, dataset=str(path), max_seq_len=24), tok, eos, pad)
    np.testing.assert_array_equal(val["tokens"], rm_val["tokens"])


def dpo_args(tmp, tiny_pipeline, data, **kw):
    pipeline, _ = tiny_pipeline
    base = dict(
        sft_model=str(pipeline / "sft"),
        reward_model=str(pipeline / "rm"),
        dataset=str(data),
        output_dir=str(tmp / "dpo"),
        checkpoint_dir=str(tmp / "ck"),
        max_seq_len=24,
        batch_size=16,
        max_steps=6,
        learning_rate=3e-3,
        beta=0.5,
        eval_every=3,
        log_every=2,
        checkpoint_every=2,
        eval_prompts=8,
        response_length=6,
    )
    return make_args(dpo, **{**base, **kw})


def test_dpo_learns_the_preferred_side_and_the_evaluation_starts_at_the_sft_policy(
    tmp_path, tiny_pipeline, rule_data, monkeypatch, capsys
):
    """On pairs that follow a rule, the held-out implicit reward orders most pairs right after a few steps; at step 0
    the policy is the reference, so the sampled KL is 0 (within float32 error) and the scores are PPO's own evaluation
    of the SFT policy. The final held-out metrics (returned, logged under eval/ and printed) are those of exactly the
    held-out pairs, computed naively from the exported policy and the SFT model; lr is the rate of each logged step."""
    from test_preference_eval import linear_warmup_decay

    import rlhf_ppo as ppo

    path, _, _ = rule_data
    recorder = RecordingWriter()
    monkeypatch.setattr(dpo, "summary_writer", lambda args: recorder)
    args = dpo_args(tmp_path, tiny_pipeline, path, max_steps=30, eval_every=30)
    first, final = dpo.main(args)
    printed = capsys.readouterr().out
    assert abs(first["eval/kl"]) < 1e-4  # the sampler's log-probs against a forward pass: float32 rounding only
    # every margin exactly 0: nothing is ordered, by the labels or the gold scores
    assert first["eval/rewards/accuracies"] == first["eval/rewards/gold_accuracies"] == 0.0
    assert final["eval/rewards/accuracies"] >= 0.9 and 0.5 < final["eval/rewards/gold_accuracies"] < 1.0
    assert final["eval/rewards/margins"] > 0 and final["eval/kl"] > 0.01  # sampled from the trained policy
    tok, eos, pad = dpo.load_tokenizer(args.sft_model)
    flags = ("sft_model", "reward_model", "prompt_tokens", "eval_prompts", "eval_dataset", "response_length")
    flags += ("temperature", "gold_fn", "num_sample_rows")
    pargs = ppo.resolve_token_ids(
        make_args(ppo, **{k: getattr(args, k) for k in flags}, value_model="shared"), eos, pad
    )
    models, params, frozen = ppo.load_models(pargs, jnp.float32)
    expected, _ = ppo.evaluate(pargs, models, tok, params, frozen, ppo.evaluation_sets(pargs, tok, None))
    for k in ("eval/gold_score", "eval/proxy_score"):
        assert first[k] == pytest.approx(expected[k], abs=1e-5), k
    # measured without dpo.py's own log-prob code: the exported policy moved toward the chosen side of held-out pairs
    _, _, val = rule_data
    trained, sft_model = dpo.load_model(args.run.output_dir)[0], dpo.load_model(args.sft_model)[0]

    def margins(model):  # log π(y_w|x) − log π(y_l|x) of each held-out pair
        return np.subtract(
            *(naive_logps(model, *(val[k][side] for k in ("tokens", "mask", "response_mask"))) for side in (0, 1))
        )

    h = margins(trained) - margins(sft_model)  # ρ_w − ρ_l of each held-out pair
    assert np.mean(h > 1.0) >= 0.9
    margin, gold = args.beta * h, val["gold"][0].astype(np.float64) - val["gold"][1]
    untied = ~np.isnan(gold) & (gold != 0)
    expected = {
        "eval/loss": np.mean(np.log1p(np.exp(-margin))),
        "eval/rewards/accuracies": np.mean(margin > 0),
        "eval/rewards/margins": np.mean(margin),
        "eval/rewards/gold_accuracies": np.mean(np.sign(margin[untied]) == np.sign(gold[untied])),
    }
    for k, v in expected.items():
        assert final[k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
    for k, v in final.items():  # everything evaluated is logged at its step, the sampled scores included
        assert recorder.scalars[k][0] == pytest.approx(first[k]) and recorder.scalars[k][30] == pytest.approx(v), k
    assert {"eval/gold_score", "eval/proxy_score", "eval/kl"} <= set(final)
    for step, value in recorder.scalars["lr"].items():
        assert value == pytest.approx(linear_warmup_decay(args.learning_rate, 30, step - 1), rel=1e-5), step
    assert set(recorder.scalars["lr"]) == set(range(2, 31, 2))
    for label, ev in (("start", first), ("final", final)):
        assert f"{label}: " + dpo.summary(ev) + "\n" in printed
    assert f"final: rewards/accuracies {expected['eval/rewards/accuracies']:.4f}, " in printed


def test_the_reference_stays_frozen_precomputed_or_on_the_fly(tmp_path, tiny_pipeline, rule_data):
    """Three steps with π_ref's log-probs precomputed and recomputed at every step give the same policy; the
    reference recomputed after training is the SFT model's."""
    path, _, _ = rule_data
    a = dpo_args(tmp_path / "a", tiny_pipeline, path, max_steps=3, eval_every=100)
    b = dpo_args(tmp_path / "b", tiny_pipeline, path, max_steps=3, eval_every=100, reference="on-the-fly")
    dpo.main(a), dpo.main(b)
    (_, sa), (_, sb) = read_checkpoint(a.run.checkpoint_dir), read_checkpoint(b.run.checkpoint_dir)
    for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    sft_params = nnx.split(dpo.load_model(a.sft_model)[0])[1]
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sft_params)))


def test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy(
    tmp_path, tiny_pipeline, rule_data, monkeypatch
):
    from transformers import AutoModelForCausalLM

    path, _, _ = rule_data
    straight = dpo_args(tmp_path / "a", tiny_pipeline, path)
    dpo.main(straight)
    args = dpo_args(tmp_path / "b", tiny_pipeline, path)
    kill_during_call(monkeypatch, dpo, "train_step", 5, lambda: dpo.main(args))  # of 6 steps; saved every 2
    with pytest.raises(FileExistsError, match="unfinished run"):
        dpo.main(args)
    dpo.main(make_args(dpo, **{**vars(args), "resume": True}))
    (step_a, a), (step_b, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
    assert step_a == step_b == 6
    assert {int(c) for c in jax.tree.leaves(a["opt_state"]) if np.asarray(c).dtype.kind == "i"} == {6}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert_same_params(dpo.load_model(args.run.output_dir)[0], a["params"])
    AutoModelForCausalLM.from_pretrained(args.run.output_dir)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"beta": 0.0}, "--beta 0.0"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "--label-smoothing 0.1: only with --loss-type sigmoid"),
        ({"label_smoothing": 0.5}, r"--label-smoothing 0.5: must be in \[0, 0.5\)"),
        ({"batch_size": 6, "num_devices": 4}, "--batch-size 6"),
        ({"batch_size": 512}, "fewer than one step"),
        ({"dataset": "missing.jsonl"}, "--dataset missing.jsonl: not found"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tmp_path, tiny_pipeline, rule_data, override, message):
    path, _, _ = rule_data
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        dpo.main(dpo_args(tmp_path, tiny_pipeline, path, **override))
