"""rlhf_ppo.py: GAE, whitening, KL, score placement, penalties, losses, adaptive KL, sharding, reward-fn, smoke run."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rlhf_ppo as ppo
import sft
from common import masked_mean, masked_whiten
from conftest import assert_same_params, read_checkpoint, tree_digest


def test_gae_matches_a_plain_python_loop():
    rng = np.random.default_rng(0)
    B, R, gamma, lam = 3, 7, 0.9, 0.8
    rewards, values = rng.normal(size=(B, R)).astype(np.float32), rng.normal(size=(B, R)).astype(np.float32)
    lengths = [7, 4, 1]
    mask = np.arange(R)[None] < np.array(lengths)[:, None]
    rewards = rewards * mask
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * last
            assert adv[b, t] == pytest.approx(last, abs=1e-5)
            assert ret[b, t] == pytest.approx(last + values[b, t], abs=1e-5)
        assert (np.asarray(adv[b, n:]) == 0).all()


def test_masked_whitening():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -100.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
    real = np.array([1, 2, 3, 4, 5, 6], np.float32)
    w = np.asarray(masked_whiten(x, mask))[np.asarray(mask)]
    np.testing.assert_allclose(w, (real - real.mean()) / real.std(ddof=1), atol=1e-5)
    kept = np.asarray(masked_whiten(x, mask, shift_mean=False))[np.asarray(mask)]
    np.testing.assert_allclose(kept, (real - real.mean()) / real.std(ddof=1) + real.mean(), atol=1e-5)
    assert float(masked_mean(x, mask)) == pytest.approx(3.5)


def test_kl_estimators():
    logp, ref = jnp.log(jnp.array([0.5, 0.2])), jnp.log(jnp.array([0.25, 0.4]))
    np.testing.assert_allclose(ppo.kl_per_token(logp, ref, "k1"), np.log([2.0, 0.5]), atol=1e-6)
    r = np.array([0.5, 2.0])  # pi_ref / pi
    np.testing.assert_allclose(ppo.kl_per_token(logp, ref, "k3"), (r - 1) - np.log(r), atol=1e-6)


def test_response_mask_and_reward_model_inputs():
    eos, pad, stop = 3, 0, 7
    responses = jnp.array([[5, 7, 9, 9], [5, 6, 6, 6], [3, 0, 0, 0]])
    mask = ppo.response_mask(responses, stop)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    queries = jnp.array([[0, 11], [12, 13], [0, 14]])
    qmask = jnp.array([[0, 1], [1, 1], [0, 1]], bool)
    emask = ppo.response_mask(responses, eos)
    tokens, tmask = ppo.reward_model_inputs(queries, qmask, responses, emask, eos, pad)
    # row 0: no EOS in the response -> EOS appended after its last token; row 2 ends with EOS already
    np.testing.assert_array_equal(tokens[0], [0, 11, 5, 7, 9, 9, 3])
    np.testing.assert_array_equal(tmask[0], [0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(tokens[2, 2:], [3, 0, 0, 0, 0])
    np.testing.assert_array_equal(tmask[2], [0, 1, 1, 0, 0, 0, 0])
    scores = jnp.arange(21, dtype=jnp.float32).reshape(3, 7)
    np.testing.assert_array_equal(ppo.last_token_scores(scores, tmask), [6.0, 13.0, 16.0])  # never a pad slot


def test_missing_eos_penalty_and_float_scores():
    scores = jnp.array([0.37, -1.25, 2.5], jnp.float32)
    has_stop = jnp.array([True, False, False])
    np.testing.assert_allclose(ppo.apply_missing_eos_penalty(scores, has_stop, -1.0, "replace"), [0.37, -1.0, -1.0])
    np.testing.assert_allclose(ppo.apply_missing_eos_penalty(scores, has_stop, 0.5, "subtract"), [0.37, -1.75, 2.0])
    assert ppo.apply_missing_eos_penalty(scores, has_stop, None, "replace") is scores
    rollout = {"response_mask": jnp.ones((3, 2), bool), "logprobs": jnp.zeros((3, 2)), "ref_logprobs": jnp.zeros((3, 2)),
               "values": jnp.zeros((3, 2)), "entropy": jnp.zeros((3, 2)), "contains_stop": has_stop}  # fmt: skip
    hp = ppo.AdvantageConfig("k1", False, False, 1.0, 1.0)
    adv, _, _, stats = ppo.compute_advantages(hp, rollout, scores, 0.05)
    assert stats["objective/scores"].dtype == jnp.float32
    np.testing.assert_allclose(adv[:, 0], scores, atol=1e-6)  # gamma = lambda = 1, V = 0: the fractional score reaches t=0


def test_adaptive_kl_controller():
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert ppo.adaptive_kl_coef(0.1, 9.0, 64, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 6.6, 64, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 64, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))


def test_clipped_losses_match_hand_computed_values(monkeypatch):
    new_logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1 against old log-prob 0; last masked
    values = jnp.array([[1.0, 0.0, 2.0, 5.0]])
    monkeypatch.setattr(ppo, "policy_and_values", lambda *a: (new_logp, jnp.zeros((1, 4)), values))
    mb = {"responses": jnp.zeros((1, 4), jnp.int32), "response_mask": jnp.array([[1, 1, 1, 0]], bool),
          "tokens": None, "mask": None, "logprobs": jnp.zeros((1, 4)), "values": jnp.array([[0.5, 0.5, 0.5, 0.5]]),
          "advantages": jnp.array([[1.0, -1.0, 2.0, 9.0]]), "returns": jnp.array([[2.0, 1.0, 1.0, 0.0]])}  # fmt: skip
    hp = ppo.LossConfig(temperature=1.0, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, value_model="reward")
    loss, stats = ppo.ppo_loss(None, None, hp, mb)
    # policy: max(-A r, -A clip(r)): t0 max(-1.5, -1.2) = -1.2; t1 max(0.5, 0.8) = 0.8; t2 max(-2.2, -2.2) = -2.2
    pg = (-1.2 + 0.8 - 2.2) / 3
    # value: v_clip = 0.5 + clip(v - 0.5, +-0.2) = 0.7, 0.3, 0.7; max((v-R)^2, (v_clip-R)^2) = max(1, 1.69), max(1, .49), max(1, .09)
    vf = 0.5 * (1.69 + 1.0 + 1.0) / 3
    assert float(stats["loss/policy_avg"]) == pytest.approx(pg, abs=1e-5)
    assert float(stats["loss/value_avg"]) == pytest.approx(vf, abs=1e-5)
    assert float(loss) == pytest.approx(pg + 0.1 * vf, abs=1e-5)
    # clipfrac as LHP and TRL define it: the share of tokens where the clipped term is the larger (t0, t1; not t2)
    assert float(stats["policy/clipfrac_avg"]) == pytest.approx(2 / 3, abs=1e-5)
    assert float(stats["val/clipfrac_avg"]) == pytest.approx(1 / 3, abs=1e-5)  # only t0: 1.69 > 1


# ---------------------------------------------------------------- end-to-end pieces on tiny checkpoints
def tiny_args(tmp, prompts, **kw):
    base = dict(sft_model=str(tmp / "sft"), reward_model=str(tmp / "rm"), dataset=str(prompts), response_length=6,
                batch_size=8, total_episodes=16, ppo_epochs=2, num_mini_batches=2, eval_every=1, eval_prompts=8,
                output_dir=str(tmp / "out"), checkpoint_dir=str(tmp / "ckpt"), learning_rate=1e-3)  # fmt: skip
    return ppo.Args(**{**base, **kw})


def first_rollout(args, mesh_devices=1):
    tok, eos, pad = sft.load_tokenizer(args.sft_model)
    graphdefs, params, ref, rm = ppo.load_models(args, jnp.float32)
    queries, qmask, _ = ppo.setup_data(args, tok, pad)
    tx, _ = ppo.make_optimizer(args, 1)
    ctx = ppo.make_context(args, graphdefs, params, tok, eos, pad, tx, sft.make_mesh(mesh_devices))
    roll, texts = ppo.rollout(ctx, params, ref, rm, jnp.asarray(queries[:8]), jnp.asarray(qmask[:8]), jax.random.key(0))
    return roll, texts, (graphdefs, params, ref, rm, queries, qmask, tok, eos, pad)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_kl_is_exactly_zero_when_policy_equals_reference(tiny_pipeline, temperature):
    tmp, prompts = tiny_pipeline
    roll, _, _ = first_rollout(tiny_args(tmp, prompts, temperature=temperature))
    kl = (roll["logprobs"] - roll["ref_logprobs"]) * roll["response_mask"]
    assert float(jnp.abs(kl).max()) == 0.0
    assert roll["scores"].dtype == jnp.float32 and np.isfinite(np.asarray(roll["scores"])).all()


def test_scores_are_read_at_the_last_real_token_with_a_custom_stop_token(tiny_pipeline):
    tmp, prompts = tiny_pipeline
    tok, eos, pad = sft.load_tokenizer(tmp / "sft")
    stop = tok.token_to_id("Ġthe") or tok.encode(" the").ids[0]
    args = tiny_args(tmp, prompts, stop_token_id=stop, temperature=1.0)
    roll, texts, (graphdefs, params, ref, rm, *_rest) = first_rollout(args)
    roll2 = ppo.score_rollout(graphdefs, ppo.RolloutConfig(1.0, stop, eos, pad, "reward"), params, ref, rm,
                              roll["tokens"][:, : -args.response_length], roll["mask"][:, : -args.response_length],
                              roll["responses"])  # fmt: skip
    model = nnx.merge(graphdefs.reward, rm)
    for b in range(roll["responses"].shape[0]):  # score each episode alone, unpadded: prompt + truncated response + EOS
        q = np.asarray(roll["tokens"][b, : -args.response_length])[np.asarray(roll["mask"][b, : -args.response_length])]
        r = np.asarray(roll2["responses"][b])[np.asarray(roll2["response_mask"][b])]
        seq = np.concatenate([q, r, [eos] if (len(r) == 0 or r[-1] != eos) else []]).astype(np.int32)
        scores, _ = model(jnp.asarray(seq[None]), jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), bool))
        assert float(roll2["scores"][b]) == pytest.approx(float(scores[0, -1]), abs=1e-5)
        stops = np.flatnonzero(np.asarray(roll2["responses"][b]) == stop)
        if len(stops):
            assert roll2["response_mask"][b].sum() == stops[0] + 1


def test_sharded_update_equals_single_device(tiny_pipeline):
    tmp, prompts = tiny_pipeline
    args = tiny_args(tmp, prompts)
    roll, _, (graphdefs, params, ref, rm, *_rest) = first_rollout(args)
    hp = ppo.AdvantageConfig("k1", False, True, 1.0, 0.95)
    adv, ret, _, _ = ppo.compute_advantages(hp, roll, roll["scores"], 0.05)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")}
    batch |= {"advantages": adv, "returns": ret}
    results = []
    for n, fsdp in ((1, False), (4, False), (4, True)):
        mesh = sft.make_mesh(n)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        update_hp = ppo.UpdateConfig(2, 2, 1, ppo.LossConfig(0.7, 0.2, 0.2, 0.1, "reward"), rows)
        tx, _ = ppo.make_optimizer(args, 2)
        p = sft.shard(jax.tree.map(jnp.copy, params), mesh, fsdp)
        b = jax.device_put(batch, rows)
        p, _, stats = ppo.ppo_update(graphdefs, tx, update_hp, p, sft.shard(tx.init(p), mesh, fsdp), b, jax.random.key(0))
        results.append((jax.device_get(p), {k: float(v) for k, v in stats.items()}))
    for p, stats in results[1:]:
        for k, v in stats.items():
            assert v == pytest.approx(results[0][1][k], abs=1e-5), k
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(results[0][0])):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_reward_fn_is_used_instead_of_or_added_to_the_reward_model(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    module = types.ModuleType("my_rewards")
    module.length = lambda prompts, completions: [0.5 * len(c) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    only_fn, texts, _ = first_rollout(tiny_args(tmp, prompts, reward_model=None, value_model="shared", reward_fn="my_rewards:length"))
    np.testing.assert_allclose(only_fn["scores"], [0.5 * len(t) for t in texts], atol=1e-6)
    rm_only, _, _ = first_rollout(tiny_args(tmp, prompts))
    both, texts, _ = first_rollout(tiny_args(tmp, prompts, reward_fn="my_rewards:length"))
    np.testing.assert_allclose(both["scores"], np.asarray(rm_only["scores"]) + [0.5 * len(t) for t in texts], atol=1e-5)
    with pytest.raises(ValueError, match="needs --reward-model"):
        ppo.load_models(tiny_args(tmp, prompts, reward_model=None), jnp.float32)


def test_bad_prompt_lines_name_file_line_and_field(tmp_path, tiny_pipeline):
    tok, _, _ = sft.load_tokenizer(tiny_pipeline[0] / "sft")
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: missing field 'prompt'"):
        ppo.read_prompts(tmp_path / "p.jsonl", tok)


def rollout_setup(args, devices=1):
    tok, eos, pad = sft.load_tokenizer(args.sft_model)
    graphdefs, params, ref, rm = ppo.load_models(args, jnp.float32)
    queries, qmask, _ = ppo.setup_data(args, tok, pad)
    tx, _ = ppo.make_optimizer(args, 4)
    ctx = ppo.make_context(args, graphdefs, params, tok, eos, pad, tx, sft.make_mesh(devices))
    return ctx, params, ref, rm, jnp.asarray(queries[:8]), jnp.asarray(qmask[:8])


def test_the_sampler_draws_at_the_rollout_temperature(tiny_pipeline):
    """At T = 1e-3 sampling is greedy: the rollout's responses equal temperature-0 decoding, and at T = 1 they
    do not. (The log-probs of the loss and of the reference at T are checked by test_ppo_reference.py.)"""
    tmp, prompts = tiny_pipeline
    ctx, params, ref, rm, q, qm = rollout_setup(tiny_args(tmp, prompts, temperature=1e-3))
    cold, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    cfg = ctx["policy_cfg"]
    greedy = ppo.sample(sft.step_function(ctx["graphdefs"].policy), params["policy"], sft.init_cache(cfg, 8, q.shape[1] + 6),
                        q, qm, jax.random.key(0), max_new_tokens=6, temperature=0.0, stop_token_id=ctx["rollout_hp"].stop_token_id,
                        pad_token_id=ctx["rollout_hp"].pad_id)  # fmt: skip
    np.testing.assert_array_equal(cold["responses"], greedy)
    ctx, *_ = rollout_setup(tiny_args(tmp, prompts, temperature=1.0))
    warm, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    assert (np.asarray(warm["responses"]) != np.asarray(greedy)).any()


def test_the_update_lowers_its_own_loss(tiny_pipeline):
    tmp, prompts = tiny_pipeline
    args = tiny_args(tmp, prompts, ppo_epochs=2, num_mini_batches=1, learning_rate=3e-4)
    ctx, params, ref, rm, q, qm = rollout_setup(args)
    roll, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    adv, ret, _, _ = ppo.compute_advantages(ctx["adv_hp"], roll, roll["scores"], 0.05)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")} | {"advantages": adv, "returns": ret}
    loss = lambda p: float(ppo.ppo_loss(p, ctx["graphdefs"], ctx["update_hp"].loss, batch)[0])  # noqa: E731
    before = loss(params)
    new, _, stats = ppo.ppo_update(ctx["graphdefs"], ctx["tx"], ctx["update_hp"], jax.tree.map(jnp.copy, params),
                                   ctx["tx"].init(params), batch, jax.random.key(1))  # fmt: skip
    assert int(stats["nonfinite"]) == 0 and loss(new) < before - 1e-3


def test_gradient_accumulation_equals_one_big_batch(tiny_pipeline):
    """2 epochs x 2 minibatches of 4 episodes: with 2 accumulated micro-batches per minibatch the update equals the one
    on whole minibatches (the token mean over the minibatch, whatever the micro-batches' token counts). Plain SGD, so
    the gradients themselves are compared."""
    tmp, prompts = tiny_pipeline
    ctx, params, ref, rm, q, qm = rollout_setup(tiny_args(tmp, prompts))
    sampled, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    stop = int(sampled["responses"][0, 2])  # as the stop token, the same draws end at different lengths
    ctx, params, ref, rm, q, qm = rollout_setup(tiny_args(tmp, prompts, stop_token_id=stop))
    roll, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    assert len(set(np.asarray(roll["response_mask"]).sum(1).tolist())) > 1  # unequal token counts per episode
    adv, ret, _, _ = ppo.compute_advantages(ctx["adv_hp"], roll, roll["scores"], 0.05)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")} | {"advantages": adv, "returns": ret}
    tx, out = optax.sgd(0.3), []
    for accum in (1, 2):
        hp = ctx["update_hp"]._replace(ppo_epochs=2, num_mini_batches=2, grad_accum_steps=accum)
        new, _, stats = ppo.ppo_update(ctx["graphdefs"], tx, hp, jax.tree.map(jnp.copy, params), tx.init(params), batch, jax.random.key(3))
        out.append((new, stats))
    for k, v in out[0][1].items():
        assert float(out[1][1][k]) == pytest.approx(float(v), rel=1e-4, abs=1e-6), k
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_fresh_key_for_every_update_and_for_sampling_and_shuffling(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    seen = {"rollout": [], "update": []}
    real_rollout, real_update = ppo.rollout, ppo.ppo_update

    def rollout(ctx, params, ref, rm, q, qm, key):
        seen["rollout"].append(np.asarray(jax.random.key_data(key)).tobytes())
        return real_rollout(ctx, params, ref, rm, q, qm, key)

    def update(graphdefs, tx, hp, params, opt_state, batch, key):
        seen["update"].append(np.asarray(jax.random.key_data(key)).tobytes())
        return real_update(graphdefs, tx, hp, params, opt_state, batch, key)

    monkeypatch.setattr(ppo, "rollout", rollout)
    monkeypatch.setattr(ppo, "ppo_update", update)
    ppo.main(tiny_args(tmp, prompts, total_episodes=24, eval_every=10, eval_prompts=2,
                       output_dir=str(tmp / "out_keys"), checkpoint_dir=str(tmp / "ck_keys")))  # fmt: skip
    training = seen["rollout"][2:-2]  # between the evaluations (two sets, before and after)
    assert len(training) == len(seen["update"]) == 3
    assert len(set(training + seen["update"])) == 6  # no key used twice


def test_ppo_learns_a_programmatic_reward(tiny_pipeline, monkeypatch):
    """With --reward-fn counting "good" in the completion, 16 updates raise the held-out reward from ~0 to > 1."""
    tmp, prompts = tiny_pipeline
    module = types.ModuleType("good_rewards")
    module.good = lambda prompts, completions: [float(c.count("good")) for c in completions]
    monkeypatch.setitem(sys.modules, "good_rewards", module)
    args = tiny_args(tmp, prompts, reward_model=None, value_model="shared", reward_fn="good_rewards:good",
                     response_length=8, batch_size=16, total_episodes=16 * 16, ppo_epochs=4, num_mini_batches=2,
                     eval_every=16, eval_prompts=32, learning_rate=2e-2, kl_coef=0.01, temperature=1.0,
                     output_dir=str(tmp / "out_learn"), checkpoint_dir=str(tmp / "ck_learn"))  # fmt: skip
    first, final = ppo.main(args)
    assert first["eval/proxy_score"] < 0.3 and final["eval/proxy_score"] > 1.0, (first, final)


@pytest.mark.parametrize("value_model", ["reward", "shared"])
def test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy(tiny_pipeline, value_model, monkeypatch):
    """Killed during update 3 and resumed, a run ends with the uninterrupted run's weights, AdamW state and adaptive
    KL coefficient, bit for bit; the exported policy is that state's, and opens in transformers."""
    from transformers import AutoModelForCausalLM

    tmp, prompts = tiny_pipeline
    kw = dict(value_model=value_model, adaptive_kl=True, kl_horizon=100, kl_estimator="k3", whiten_rewards=True,
              missing_eos_penalty=-1.0, num_devices=2, checkpoint_every=1, total_episodes=24, eval_every=2)  # fmt: skip
    straight = tiny_args(tmp, prompts, output_dir=str(tmp / f"s_{value_model}"), checkpoint_dir=str(tmp / f"cs_{value_model}"), **kw)
    ppo.main(straight)
    args = tiny_args(tmp, prompts, output_dir=str(tmp / f"r_{value_model}"), checkpoint_dir=str(tmp / f"cr_{value_model}"), **kw)
    real, calls = ppo.ppo_iteration, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ppo, "ppo_iteration", crashing)
    with pytest.raises(KeyboardInterrupt):
        ppo.main(args)
    monkeypatch.setattr(ppo, "ppo_iteration", real)
    ppo.main(ppo.Args(**{**vars(args), "resume": True}))
    (step_a, a), (step_b, b) = read_checkpoint(straight.checkpoint_dir), read_checkpoint(args.checkpoint_dir)
    assert step_a == step_b == 3 and float(a["kl_coef"]) != args.kl_coef  # the adaptive coefficient moved
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert_same_params(sft.load_model(args.output_dir)[0], a["params"]["policy"])
    AutoModelForCausalLM.from_pretrained(args.output_dir)


def test_non_finite_rewards_or_losses_stop_the_run_and_leave_the_output_dir_unchanged(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    out = tmp / "out_nan"
    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes(b"a model trained earlier")
    digest = tree_digest(out)
    module = types.ModuleType("bad_rewards")
    module.nan = lambda prompts, completions: [float("nan")] * len(completions)
    calls = []
    module.huge_later = lambda prompts, completions: calls.append(1) or [3e38 if len(calls) > 3 else 0.0] * len(completions)
    monkeypatch.setitem(sys.modules, "bad_rewards", module)
    with pytest.raises(FloatingPointError, match=r"evaluation before update 1: --reward-fn bad_rewards:nan returned nan"):
        ppo.main(tiny_args(tmp, prompts, reward_fn="bad_rewards:nan", output_dir=str(out), checkpoint_dir=str(tmp / "ck_nan")))
    assert tree_digest(out) == digest
    # finite rewards of 3e38 from the second update on: the value loss overflows; the state of update 1 is kept
    args = tiny_args(tmp, prompts, reward_model=None, value_model="shared", reward_fn="bad_rewards:huge_later",
                     output_dir=str(out), checkpoint_dir=str(tmp / "ck_inf"), checkpoint_every=1, eval_every=10,
                     total_episodes=32)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"PPO update 2: non-finite PPO loss or gradient.*last good training state is update 1"):
        ppo.main(args)
    assert tree_digest(out) == digest
    step, state = read_checkpoint(args.checkpoint_dir)
    assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"temperature": 0.0}, "--temperature 0.0: must be > 0"),
        ({"batch_size": 6, "num_mini_batches": 4}, "--batch-size 6: must be divisible"),
        ({"total_episodes": 4}, "--total-episodes 4: fewer than one --batch-size"),
        ({"cliprange": 0.0}, "--cliprange"),
        ({"lam": 1.5}, "--lam 1.5"),
        ({"reward_model": None, "value_model": "shared"}, "--reward-model None needs a --reward-fn"),
        ({"response_length": 2100}, "more than --sft-model's context"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tiny_pipeline, override, message):
    tmp, prompts = tiny_pipeline
    with pytest.raises(ValueError, match=message):
        ppo.main(tiny_args(tmp, prompts, output_dir=str(tmp / "out_bad"), checkpoint_dir=str(tmp / "ck_bad"), **override))


def test_a_prompts_file_that_is_not_utf8_names_file_and_line(tmp_path, tiny_pipeline):
    tok, _, _ = sft.load_tokenizer(tiny_pipeline[0] / "sft")
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xc3"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not UTF-8 text"):
        ppo.read_prompts(tmp_path / "p.jsonl", tok)


def test_the_critic_has_its_own_learning_rate(tiny_pipeline):
    """--critic-learning-rate tiny: the value network barely moves while the policy does; and the other way round."""
    tmp, prompts = tiny_pipeline
    base = tiny_args(tmp, prompts)
    ctx, params, ref, rm, q, qm = rollout_setup(base)
    roll, _ = ppo.rollout(ctx, params, ref, rm, q, qm, jax.random.key(0))
    adv, ret, _, _ = ppo.compute_advantages(ctx["adv_hp"], roll, roll["scores"], 0.05)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")} | {"advantages": adv, "returns": ret}

    def moved(**rates):
        tx, _ = ppo.make_optimizer(ppo.Args(**{**vars(base), **rates}), 1)
        new, _, _ = ppo.ppo_update(ctx["graphdefs"], tx, ctx["update_hp"], jax.tree.map(jnp.copy, params), tx.init(params), batch, jax.random.key(1))
        return {part: max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new[part]), jax.tree.leaves(params[part])))
                for part in ("policy", "value")}  # fmt: skip

    slow_critic, slow_policy = moved(learning_rate=1e-3, critic_learning_rate=1e-9), moved(learning_rate=1e-9, critic_learning_rate=1e-3)
    assert slow_critic["value"] < 1e-7 < 1e-4 < slow_critic["policy"]
    assert slow_policy["policy"] < 1e-7 < 1e-4 < slow_policy["value"]


def test_each_evaluation_set_has_its_own_fixed_key(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    ctx, params, ref, rm, _, _ = rollout_setup(tiny_args(tmp, prompts))
    _, _, eval_sets = ppo.setup_data(ctx["args"], ctx["tok"], ctx["rollout_hp"].pad_id)
    keys, real = [], ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a: keys.append(np.asarray(jax.random.key_data(a[-1])).tobytes()) or real(*a))
    writer = types.SimpleNamespace(add_scalar=lambda *a: None, add_text=lambda *a: None)
    for _ in range(2):
        ppo.evaluate(ctx, params, ref, rm, eval_sets, writer, 0)
    assert len(keys) == 4 and keys[0] != keys[1] and keys[:2] == keys[2:]


def test_the_shared_value_head_starts_at_zero_and_scores_stay_float32_in_bfloat16(tiny_pipeline):
    """LHP zero-initialises the value head; with --dtype bfloat16 the log-probs, values and scores stay float32."""
    tmp, prompts = tiny_pipeline
    _, params, _, _ = ppo.load_models(tiny_args(tmp, prompts, value_model="shared"), jnp.float32)
    assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(params["value"]))
    args = tiny_args(tmp, prompts, dtype="bfloat16")
    tok, eos, pad = sft.load_tokenizer(args.sft_model)
    graphdefs, params, ref, rm = ppo.load_models(args, jnp.bfloat16)
    queries, qmask, _ = ppo.setup_data(args, tok, pad)
    tx, _ = ppo.make_optimizer(args, 1)
    ctx = ppo.make_context(args, graphdefs, params, tok, eos, pad, tx, sft.make_mesh(1))
    roll, _ = ppo.rollout(ctx, params, ref, rm, jnp.asarray(queries[:8]), jnp.asarray(qmask[:8]), jax.random.key(0))
    assert all(roll[k].dtype == jnp.float32 for k in ("logprobs", "ref_logprobs", "values", "scores"))

