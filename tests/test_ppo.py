"""rlhf_ppo.py: GAE, whitening, KL, score placement, penalties, losses, adaptive KL, sharding, reward-fn, smoke run."""

import dataclasses
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same_params, kill_during_call, make_args, read_checkpoint, tree_digest
from jax.sharding import NamedSharding, PartitionSpec

import rlhf_ppo as ppo
from common import masked_mean, masked_whiten


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
    rollout = {
        "response_mask": jnp.ones((3, 2), bool),
        "logprobs": jnp.zeros((3, 2)),
        "ref_logprobs": jnp.zeros((3, 2)),
        "values": jnp.zeros((3, 2)),
        "entropy": jnp.zeros((3, 2)),
        "contains_stop": has_stop,
    }
    args = make_args(ppo, kl_estimator="k1", whiten_rewards=False, whiten_advantages=False, gamma=1.0, lam=1.0)
    adv, _, _, stats = ppo.compute_advantages(args, rollout | {"scores": scores}, 0.05)
    assert stats["objective/scores"].dtype == jnp.float32
    np.testing.assert_allclose(
        adv[:, 0], scores, atol=1e-6
    )  # gamma = lambda = 1, V = 0: the fractional score reaches t=0


def test_unset_token_flags_take_the_tokenizers_ids(tiny_pipeline):
    """--stop-token-id and --eos-token-id default to the tokenizer's EOS, --pad-token-id to its PAD; flags win."""
    tmp, prompts = tiny_pipeline
    _, eos, pad = ppo.load_tokenizer(tmp / "sft")
    a = ppo.resolve_token_ids(tiny_args(tmp, prompts), eos, pad)
    assert (a.stop_token_id, a.eos_token_id, a.pad_token_id) == (eos, eos, pad) and eos != pad
    b = ppo.resolve_token_ids(tiny_args(tmp, prompts, stop_token_id=7, eos_token_id=8, pad_token_id=9), eos, pad)
    assert (b.stop_token_id, b.eos_token_id, b.pad_token_id) == (7, 8, 9)


def test_the_adaptive_kl_coefficient_carries_from_update_to_update(tiny_pipeline, monkeypatch):
    """With --adaptive-kl, each update adapts the β that the previous update left in the state (and logs the β it
    used), not --kl-coef again."""
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts, adaptive_kl=True, kl_coef=0.1, kl_horizon=10))
    seen, real = [], ppo.adaptive_kl_coef

    def spy(kl_coef, *a):
        seen.append((kl_coef, real(kl_coef, *a)))
        return seen[-1][1]

    monkeypatch.setattr(ppo, "adaptive_kl_coef", spy)
    params = jax.tree.map(jnp.copy, s.params)
    state = {"params": params, "opt_state": s.tx.init(params), "kl_coef": jnp.float32(0.1)}
    logged = []
    for i in range(2):
        state, stats = ppo.ppo_iteration(
            s.args, s.models, s.tx, s.rows, s.tok, state, s.frozen, s.q, s.qm, jax.random.key(i)
        )
        logged.append(stats["objective/kl_coef"])
    (b0, b1), (b1_in, b2) = seen
    assert b0 == pytest.approx(0.1) and b1 != pytest.approx(0.1)  # the controller moved β
    assert b1_in == pytest.approx(b1) and float(state["kl_coef"]) == pytest.approx(b2)
    assert logged == [pytest.approx(b0), pytest.approx(b1)]


def test_adaptive_kl_controller():
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert ppo.adaptive_kl_coef(0.1, 9.0, 64, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 6.6, 64, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 64, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))


def test_clipped_losses_match_hand_computed_values(monkeypatch):
    new_logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1 against old log-prob 0; last masked
    values = jnp.array([[1.0, 0.0, 2.0, 5.0]])
    monkeypatch.setattr(ppo, "policy_and_values", lambda *a: (new_logp, jnp.zeros((1, 4)), values))
    mb = {
        "responses": jnp.zeros((1, 4), jnp.int32),
        "response_mask": jnp.array([[1, 1, 1, 0]], bool),
        "tokens": None,
        "mask": None,
        "logprobs": jnp.zeros((1, 4)),
        "values": jnp.array([[0.5, 0.5, 0.5, 0.5]]),
        "advantages": jnp.array([[1.0, -1.0, 2.0, 9.0]]),
        "returns": jnp.array([[2.0, 1.0, 1.0, 0.0]]),
    }
    args = make_args(ppo, temperature=1.0, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, value_model="reward")
    loss, stats = ppo.ppo_loss(None, args, None, mb)
    # policy: max(-A r, -A clip(r)): t0 max(-1.5, -1.2) = -1.2; t1 max(0.5, 0.8) = 0.8; t2 max(-2.2, -2.2) = -2.2
    pg = (-1.2 + 0.8 - 2.2) / 3
    # value: v_clip = 0.5 + clip(v - 0.5, +-0.2) = 0.7, 0.3, 0.7;
    # max((v-R)^2, (v_clip-R)^2) = max(1, 1.69), max(1, .49), max(1, .09)
    vf = 0.5 * (1.69 + 1.0 + 1.0) / 3
    assert float(stats["loss/policy_avg"]) == pytest.approx(pg, abs=1e-5)
    assert float(stats["loss/value_avg"]) == pytest.approx(vf, abs=1e-5)
    assert float(loss) == pytest.approx(pg + 0.1 * vf, abs=1e-5)
    # clipfrac as LHP and TRL define it: the share of tokens where the clipped term is the larger (t0, t1; not t2)
    assert float(stats["policy/clipfrac_avg"]) == pytest.approx(2 / 3, abs=1e-5)
    assert float(stats["val/clipfrac_avg"]) == pytest.approx(1 / 3, abs=1e-5)  # only t0: 1.69 > 1


# ---------------------------------------------------------------- end-to-end pieces on tiny checkpoints
def tiny_args(tmp, prompts, **kw):
    base = dict(
        sft_model=str(tmp / "sft"),
        reward_model=str(tmp / "rm"),
        dataset=str(prompts),
        response_length=6,
        batch_size=8,
        total_episodes=16,
        ppo_epochs=2,
        num_mini_batches=2,
        eval_every=1,
        eval_prompts=8,
        output_dir=str(tmp / "out"),
        checkpoint_dir=str(tmp / "ckpt"),
        learning_rate=1e-3,
    )
    return make_args(ppo, **{**base, **kw})


def setup(args, devices=1, dtype=jnp.float32):
    """What main builds before the loop, on `devices`, with the first 8 training prompts."""
    tok, eos, pad = ppo.load_tokenizer(args.sft_model)
    args = ppo.resolve_token_ids(args, eos, pad)
    models, params, frozen = ppo.load_models(args, dtype)
    queries, qmask, eval_sets = ppo.setup_data(args, tok)
    tx, _ = ppo.make_optimizer(args, 4)
    rows = NamedSharding(ppo.make_mesh(devices), PartitionSpec("data"))
    return types.SimpleNamespace(
        args=args,
        models=models,
        params=params,
        frozen=frozen,
        tok=tok,
        tx=tx,
        rows=rows,
        q=jnp.asarray(queries[:8]),
        qm=jnp.asarray(qmask[:8]),
        eval_sets=eval_sets,
    )


def rollout(s, key=0):
    return ppo.rollout(s.args, s.models, s.tok, s.params, s.frozen, s.q, s.qm, jax.random.key(key))


def update_batch(s, roll):
    """The PPO batch of one rollout, with advantages and returns."""
    adv, ret, _, _ = ppo.compute_advantages(s.args, roll, s.args.kl_coef)
    keys = ("tokens", "mask", "responses", "response_mask", "logprobs", "values")
    return {k: roll[k] for k in keys} | {"advantages": adv, "returns": ret}


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_kl_is_zero_within_float32_error_when_policy_equals_reference(tiny_pipeline, temperature):
    """log π_old comes from the sampler's logits, log π_ref from a forward pass: with policy == reference they differ
    only by float32 rounding (the two compute the same logits in a different order)."""
    tmp, prompts = tiny_pipeline
    roll = rollout(setup(tiny_args(tmp, prompts, temperature=temperature)))
    kl = (roll["logprobs"] - roll["ref_logprobs"]) * roll["response_mask"]
    assert 0 < float(jnp.abs(kl).max()) < 1e-5
    assert roll["scores"].dtype == jnp.float32 and np.isfinite(np.asarray(roll["scores"])).all()


def test_sharded_update_equals_single_device(tiny_pipeline):
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts))
    batch, results = update_batch(s, rollout(s)), []
    for n, fsdp in ((1, False), (4, False), (4, True)):
        mesh = ppo.make_mesh(n)
        rows = NamedSharding(mesh, PartitionSpec("data"))
        p = ppo.shard(jax.tree.map(jnp.copy, s.params), mesh, fsdp)
        opt_state = ppo.shard(s.tx.init(p), mesh, fsdp)
        p, _, stats = ppo.ppo_update(
            s.args, s.models, s.tx, rows, p, opt_state, jax.device_put(batch, rows), jax.random.key(0)
        )
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

    def scores_and_texts(**kw):
        s = setup(tiny_args(tmp, prompts, **kw))
        roll = rollout(s)
        return np.asarray(roll["scores"]), ppo.decode(s.tok, roll["responses"], roll["response_mask"])

    only_fn, texts = scores_and_texts(reward_model=None, value_model="shared", reward_fn="my_rewards:length")
    np.testing.assert_allclose(only_fn, [0.5 * len(t) for t in texts], atol=1e-6)
    rm_only, _ = scores_and_texts()
    both, texts = scores_and_texts(reward_fn="my_rewards:length")
    np.testing.assert_allclose(both, rm_only + [0.5 * len(t) for t in texts], atol=1e-5)
    with pytest.raises(ValueError, match="needs --reward-model"):
        ppo.check_args(tiny_args(tmp, prompts, reward_model=None, reward_fn="my_rewards:length"), 1)


def test_bad_prompt_lines_name_file_line_and_field(tmp_path, tiny_pipeline):
    tok, _, _ = ppo.load_tokenizer(tiny_pipeline[0] / "sft")
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: missing field 'prompt'"):
        ppo.read_prompts(tmp_path / "p.jsonl", tok)


def test_the_sampler_draws_at_the_rollout_temperature(tiny_pipeline):
    """At T = 1e-3 sampling is greedy: the rollout's responses equal temperature-0 decoding, and at T = 1 they
    do not. (The log-probs of the loss and of the reference at T are checked by test_ppo_reference.py.)"""
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts, temperature=1e-3))
    cold = rollout(s)
    cache = ppo.init_cache(s.models.config, 8, s.q.shape[1] + 6)
    greedy, _ = ppo.sample(
        ppo.step_function(s.models.policy),
        s.params["policy"],
        cache,
        s.q,
        s.qm,
        jax.random.key(0),
        max_new_tokens=6,
        temperature=0.0,
        stop_token_id=s.args.stop_token_id,
        pad_token_id=s.args.pad_token_id,
    )
    np.testing.assert_array_equal(cold["responses"], greedy)
    warm = rollout(setup(tiny_args(tmp, prompts, temperature=1.0)))
    assert (np.asarray(warm["responses"]) != np.asarray(greedy)).any()


def test_the_update_lowers_its_own_loss(tiny_pipeline):
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts, ppo_epochs=2, num_mini_batches=1, learning_rate=3e-4))
    batch = update_batch(s, rollout(s))
    loss = lambda p: float(ppo.ppo_loss(p, s.args, s.models, batch)[0])  # noqa: E731
    before = loss(s.params)
    new, _, stats = ppo.ppo_update(
        s.args, s.models, s.tx, s.rows, jax.tree.map(jnp.copy, s.params), s.tx.init(s.params), batch, jax.random.key(1)
    )
    assert int(stats["nonfinite"]) == 0 and loss(new) < before - 1e-3


def test_gradient_accumulation_equals_one_big_batch(tiny_pipeline):
    """2 epochs x 2 minibatches of 4 episodes: with 2 accumulated micro-batches per minibatch the update equals the one
    on whole minibatches (the token mean over the minibatch, whatever the micro-batches' token counts). Plain SGD, so
    the gradients themselves are compared."""
    tmp, prompts = tiny_pipeline
    sampled = rollout(setup(tiny_args(tmp, prompts)))
    stop = int(sampled["responses"][0, 2])  # as the stop token, the same draws end at different lengths
    s = setup(tiny_args(tmp, prompts, stop_token_id=stop))
    roll = rollout(s)
    assert len(set(np.asarray(roll["response_mask"]).sum(1).tolist())) > 1  # unequal token counts per episode
    batch, tx, out = update_batch(s, roll), optax.sgd(0.3), []
    for accum in (1, 2):
        args = dataclasses.replace(s.args, ppo_epochs=2, num_mini_batches=2, grad_accum_steps=accum)
        new, _, stats = ppo.ppo_update(
            args, s.models, tx, s.rows, jax.tree.map(jnp.copy, s.params), tx.init(s.params), batch, jax.random.key(3)
        )
        out.append((new, stats))
    for k, v in out[0][1].items():
        assert float(out[1][1][k]) == pytest.approx(float(v), rel=1e-4, abs=1e-6), k
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_fresh_key_for_every_update_and_for_sampling_and_shuffling(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    seen = {"rollout": [], "update": []}
    real_rollout, real_update = ppo.rollout, ppo.ppo_update

    def recording_rollout(*a):
        seen["rollout"].append(np.asarray(jax.random.key_data(a[-1])).tobytes())
        return real_rollout(*a)

    def recording_update(*a):
        seen["update"].append(np.asarray(jax.random.key_data(a[-1])).tobytes())
        return real_update(*a)

    monkeypatch.setattr(ppo, "rollout", recording_rollout)
    monkeypatch.setattr(ppo, "ppo_update", recording_update)
    ppo.main(
        tiny_args(
            tmp,
            prompts,
            total_episodes=24,
            eval_every=10,
            eval_prompts=2,
            output_dir=str(tmp / "out_keys"),
            checkpoint_dir=str(tmp / "ck_keys"),
        )
    )
    training = seen["rollout"][2:-2]  # between the evaluations (two sets, before and after)
    assert len(training) == len(seen["update"]) == 3
    assert len(set(training + seen["update"])) == 6  # no key used twice


def test_ppo_learns_a_programmatic_reward(tiny_pipeline, monkeypatch):
    """With --reward-fn counting "good" in the completion, 16 updates raise the held-out reward from ~0 to > 1. The
    trajectory depends on the CPU's rounding; the rate leaves a margin (seeds 0-3 reach 3.9-7.9 on an AVX2 EPYC)."""
    tmp, prompts = tiny_pipeline
    module = types.ModuleType("good_rewards")
    module.good = lambda prompts, completions: [float(c.count("good")) for c in completions]
    monkeypatch.setitem(sys.modules, "good_rewards", module)
    args = tiny_args(
        tmp,
        prompts,
        reward_model=None,
        value_model="shared",
        reward_fn="good_rewards:good",
        response_length=8,
        batch_size=16,
        total_episodes=16 * 16,
        ppo_epochs=4,
        num_mini_batches=2,
        eval_every=16,
        eval_prompts=32,
        learning_rate=3e-2,
        kl_coef=0.01,
        temperature=1.0,
        output_dir=str(tmp / "out_learn"),
        checkpoint_dir=str(tmp / "ck_learn"),
    )
    first, final = ppo.main(args)
    assert first["eval/proxy_score"] < 0.3 and final["eval/proxy_score"] > 1.0, (first, final)


@pytest.mark.parametrize("value_model", ["reward", "shared"])
def test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy(
    tiny_pipeline, value_model, monkeypatch
):
    """Killed during update 3 and resumed, a run ends with the uninterrupted run's weights, AdamW state and adaptive
    KL coefficient, bit for bit; the exported policy is that state's, and opens in transformers."""
    from transformers import AutoModelForCausalLM

    tmp, prompts = tiny_pipeline
    kw = dict(
        value_model=value_model,
        adaptive_kl=True,
        kl_horizon=100,
        kl_estimator="k3",
        whiten_rewards=True,
        missing_eos_penalty=-1.0,
        num_devices=2,
        checkpoint_every=1,
        total_episodes=24,
        eval_every=2,
    )
    straight = tiny_args(
        tmp, prompts, output_dir=str(tmp / f"s_{value_model}"), checkpoint_dir=str(tmp / f"cs_{value_model}"), **kw
    )
    ppo.main(straight)
    args = tiny_args(
        tmp, prompts, output_dir=str(tmp / f"r_{value_model}"), checkpoint_dir=str(tmp / f"cr_{value_model}"), **kw
    )
    kill_during_call(monkeypatch, ppo, "ppo_iteration", 3, lambda: ppo.main(args))
    ppo.main(make_args(ppo, **{**vars(args), "resume": True}))
    (step_a, a), (step_b, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
    assert step_a == step_b == 3 and float(a["kl_coef"]) != pytest.approx(args.kl_coef)  # β moved
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert_same_params(ppo.load_model(args.run.output_dir)[0], a["params"]["policy"])
    AutoModelForCausalLM.from_pretrained(args.run.output_dir)


def test_non_finite_rewards_or_losses_stop_the_run_and_leave_the_output_dir_unchanged(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    out = tmp / "out_nan"
    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes(b"a model trained earlier")
    digest = tree_digest(out)
    module = types.ModuleType("bad_rewards")
    module.nan = lambda prompts, completions: [float("nan")] * len(completions)
    calls = []
    module.huge_later = lambda prompts, completions: (
        calls.append(1) or [3e38 if len(calls) > 3 else 0.0] * len(completions)
    )
    monkeypatch.setitem(sys.modules, "bad_rewards", module)
    with pytest.raises(FloatingPointError, match=r"evaluation at update 0: --reward-fn bad_rewards:nan returned nan"):
        ppo.main(
            tiny_args(
                tmp, prompts, reward_fn="bad_rewards:nan", output_dir=str(out), checkpoint_dir=str(tmp / "ck_nan")
            )
        )
    assert tree_digest(out) == digest
    # finite rewards of 3e38 from the second update on: the value loss overflows; the state of update 1 is kept
    args = tiny_args(
        tmp,
        prompts,
        reward_model=None,
        value_model="shared",
        reward_fn="bad_rewards:huge_later",
        output_dir=str(out),
        checkpoint_dir=str(tmp / "ck_inf"),
        checkpoint_every=1,
        eval_every=10,
        total_episodes=32,
    )
    with pytest.raises(
        FloatingPointError, match=r"PPO update 2: non-finite PPO loss or gradient.*last good training state is step 1"
    ):
        ppo.main(args)
    assert tree_digest(out) == digest
    step, state = read_checkpoint(args.run.checkpoint_dir)
    assert step == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"temperature": 0.0}, "--temperature 0.0: must be > 0"),
        ({"batch_size": 6, "num_mini_batches": 4}, "--batch-size 6: must be divisible"),
        ({"total_episodes": 4}, "--total-episodes 4: less than one --batch-size"),
        ({"cliprange": 0.0}, "--cliprange"),
        ({"lam": 1.5}, "--lam 1.5"),
        ({"reward_model": None, "value_model": "shared"}, "--reward-model None needs a --reward-fn"),
        ({"response_length": 2100}, "more than --sft-model's context"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tiny_pipeline, override, message):
    tmp, prompts = tiny_pipeline
    with pytest.raises(ValueError, match=message):
        ppo.main(
            tiny_args(tmp, prompts, output_dir=str(tmp / "out_bad"), checkpoint_dir=str(tmp / "ck_bad"), **override)
        )


def test_a_prompts_file_that_is_not_utf8_names_file_and_line(tmp_path, tiny_pipeline):
    tok, _, _ = ppo.load_tokenizer(tiny_pipeline[0] / "sft")
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xc3"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not UTF-8 text"):
        ppo.read_prompts(tmp_path / "p.jsonl", tok)


def test_the_critic_has_its_own_learning_rate(tiny_pipeline):
    """--critic-learning-rate tiny: the value network barely moves while the policy does; and the other way round."""
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts))
    batch = update_batch(s, rollout(s))

    def moved(**rates):
        tx, _ = ppo.make_optimizer(dataclasses.replace(s.args, **rates), 1)
        new, _, _ = ppo.ppo_update(
            s.args, s.models, tx, s.rows, jax.tree.map(jnp.copy, s.params), tx.init(s.params), batch, jax.random.key(1)
        )
        return {
            part: max(
                float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new[part]), jax.tree.leaves(s.params[part]))
            )
            for part in ("policy", "value")
        }

    slow_critic, slow_policy = (
        moved(learning_rate=1e-3, critic_learning_rate=1e-9),
        moved(learning_rate=1e-9, critic_learning_rate=1e-3),
    )
    assert slow_critic["value"] < 1e-7 < 1e-4 < slow_critic["policy"]
    assert slow_policy["policy"] < 1e-7 < 1e-4 < slow_policy["value"]


def test_each_evaluation_set_has_its_own_fixed_key(tiny_pipeline, monkeypatch):
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts))
    keys, real = [], ppo.rollout
    monkeypatch.setattr(
        ppo, "rollout", lambda *a: keys.append(np.asarray(jax.random.key_data(a[-1])).tobytes()) or real(*a)
    )
    for _ in range(2):
        ppo.evaluate(s.args, s.models, s.tok, s.params, s.frozen, s.eval_sets)
    assert len(keys) == 4 and keys[0] != keys[1] and keys[:2] == keys[2:]


def test_the_shared_value_head_starts_at_zero_and_scores_stay_float32_in_bfloat16(tiny_pipeline):
    """LHP zero-initialises the value head; with --dtype bfloat16 the log-probs, values and scores stay float32."""
    tmp, prompts = tiny_pipeline
    s = setup(tiny_args(tmp, prompts, value_model="shared"))
    assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(s.params["value"]))
    roll = rollout(setup(tiny_args(tmp, prompts, dtype="bfloat16"), dtype=jnp.bfloat16))
    assert all(roll[k].dtype == jnp.float32 for k in ("logprobs", "ref_logprobs", "values", "scores"))
