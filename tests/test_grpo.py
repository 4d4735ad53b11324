"""grpo.py: advantages and losses against hand-computed values, the loss and its gradient against a naive full-logits
reference, reward functions' columns and None, bounded staleness against plain loops, learning, resume, refusals."""

import dataclasses
import functools
import json
import re
import statistics
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RecordingWriter, assert_same_params, kill_during_call, make_args, read_checkpoint
from flax import nnx
from test_sft import write_jsonl

import grpo

REWARDS = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0]  # two groups of G = 3


def by_hand(advantage, scale):
    """Step 5 written out with Python's statistics module (stdev: the sample std, as torch.std)."""
    out = []
    groups = [REWARDS[:3], REWARDS[3:]]
    for group in groups:
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            a = r - (statistics.mean(group) if advantage == "grpo" else statistics.mean(others))
            std = {"group": statistics.stdev(group), "batch": statistics.stdev(REWARDS), "none": None}[scale]
            out.append(a if std is None else a / (std + 1e-4))
    return out


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_and_rloo_advantages_equal_their_formulas(advantage, scale):
    args = make_args(grpo, group_size=3, advantage=advantage, scale_rewards=scale)
    ours = grpo.group_advantages(args, jnp.asarray(REWARDS))
    np.testing.assert_allclose(ours, by_hand(advantage, scale), rtol=1e-5, atol=1e-6)
    # pinned: the first completion of [1, 2, 4]: mean 7/3, std √(7/3); RLOO's baseline (2 + 4) / 2
    pinned = {("grpo", "none"): -4 / 3, ("rloo", "none"): -2.0, ("grpo", "group"): -4 / 3 / (7 / 3) ** 0.5}
    if (advantage, scale) in pinned:
        assert float(ours[0]) == pytest.approx(pinned[advantage, scale], rel=1e-4)


LOGP = np.array([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]])  # [B, R]: log π_θ
OLD = np.array([[-1.5, -1.9, -0.5], [-0.2, -1.3, -2.0]])  # log π_old: ratios e^0.5, e^-0.1, 1; e^-0.5, e^0.1, e^-1
REF = np.array([[-1.2, -2.5, -0.1], [-0.7, -1.0, -2.5]])
MASK = np.array([[1, 1, 0], [1, 1, 1]], bool)  # the first completion stopped after 2 tokens
ADV = np.array([0.8, -1.5])


def loss_by_hand(loss_type, beta, eps, eps_high):
    terms, lengths = [], MASK.sum(1)
    for i in range(2):
        row = []
        for t in range(3):
            rho = np.exp(LOGP[i, t] - OLD[i, t])
            surrogate = -min(rho * ADV[i], np.clip(rho, 1 - eps, 1 + eps_high) * ADV[i])
            kl = np.exp(REF[i, t] - LOGP[i, t]) - (REF[i, t] - LOGP[i, t]) - 1
            row.append((surrogate + beta * kl) * MASK[i, t])
        terms.append(row)
    terms = np.array(terms)
    return {
        "grpo": np.mean(terms.sum(1) / lengths),
        "bnpo": terms.sum() / lengths.sum(),
        "dr_grpo": terms.sum() / (2 * 3),
    }[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, None), (0.1, 0.28)])
def test_each_loss_type_equals_its_formula_computed_by_hand(loss_type, beta, eps_high, monkeypatch):
    """The clipped surrogate (clip-higher included), β·k3 and the three normalisations, with log π given directly."""
    monkeypatch.setattr(grpo, "completion_logprobs", lambda graphdef, params, *a: (params, jnp.zeros_like(params)))
    args = make_args(grpo, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=eps_high, response_length=3)
    batch = {"tokens": None, "mask": None, "completions": None, "completion_mask": jnp.asarray(MASK)}
    batch |= {"old_logprobs": jnp.asarray(OLD), "ref_logprobs": jnp.asarray(REF), "advantages": jnp.asarray(ADV)}
    loss, stats = grpo.grpo_loss(jnp.asarray(LOGP), args, None, batch)
    assert float(loss) == pytest.approx(loss_by_hand(loss_type, beta, 0.2, eps_high or 0.2), rel=1e-5)
    # TRL's clip ratios over the 5 real tokens: ratio e^0.5 with A > 0 is above 1.2 (and 1.28); e^-0.5, e^-1 with
    # A < 0 are below 0.8
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(2 / 5)
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(3 / 5)
    if loss_type == "grpo" and beta == 0.0:  # pinned by hand: ratios e^0.5 and e^-0.5, e^-1 clipped to 1.2 and 0.8
        row1 = -0.8 * (1.2 + np.exp(-0.1)) / 2
        row2 = 1.5 * (0.8 + np.exp(0.1) + 0.8) / 3
        assert float(loss) == pytest.approx((row1 + row2) / 2, rel=1e-5)


# ---------------------------------------------------------------- on the tiny SFT checkpoint
WORDS = "the film was great good bad awful boring loved hated plot actor fun dull".split()


@pytest.fixture(scope="module")
def prompts_with_answers(tmp_path_factory):
    """40 prompts, each with an "answer" column equal to its text (so a reward function can check the alignment)."""
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(2, 6, 40)]
    path = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": r, "answer": r, "index": i} for i, r in enumerate(rows)])


@pytest.fixture
def rewards_module(monkeypatch):
    """Reward functions in TRL's signature, importable as grpo_test_rewards:..."""
    module = types.ModuleType("grpo_test_rewards")

    def aligned_good(prompts, completions, answer, index, **columns):  # the columns belong to their prompts
        assert [" ".join(p.split()) for p in prompts] == answer, "columns not aligned with the prompts"
        return [float(c.count("good")) for c in completions]

    def only_long(prompts, completions, **columns):  # does not apply to short completions
        return [None if len(c.split()) < 3 else float(len(c.split())) / 10 for c in completions]

    module.aligned_good, module.only_long = aligned_good, only_long
    module.good = lambda prompts, completions, **columns: [float(c.count("good")) for c in completions]
    module.chars = lambda prompts, completions, **columns: [len(c) / 10 for c in completions]  # varies in every group
    monkeypatch.setitem(sys.modules, "grpo_test_rewards", module)
    return module


def tiny_args(tiny_sft, tmp, prompts, **kw):
    base = dict(
        sft_model=str(tiny_sft),
        dataset=str(prompts),
        eval_dataset=str(prompts),
        reward_fn=("grpo_test_rewards:aligned_good", "grpo_test_rewards:only_long"),
        reward_weights=(1.0, 0.5),
        response_length=6,
        group_size=4,
        batch_size=8,
        max_steps=3,
        beta=0.1,
        num_iterations=2,
        learning_rate=1e-2,
        temperature=1.0,
        eval_every=3,
        eval_prompts=8,
        num_devices=1,
        output_dir=str(tmp / "out"),
        checkpoint_dir=str(tmp / "ckpt"),
    )
    return make_args(grpo, **{**base, **kw})


def test_reward_functions_get_their_columns_and_none_adds_nothing(rewards_module):
    args = make_args(
        grpo, reward_fn=("grpo_test_rewards:aligned_good", "grpo_test_rewards:only_long"), reward_weights=(2, 1)
    )
    prompts, completions = ["a b", "c"], ["good good", "good x y z"]
    per_function = grpo.call_reward_fns(args, prompts, completions, {"answer": ["a b", "c"], "index": [0, 1]})
    np.testing.assert_allclose(per_function, [[2.0, np.nan], [1.0, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(grpo.total_reward(args, per_function), [4.0, 2.4])  # the None adds 0
    with pytest.raises(AssertionError, match="not aligned"):
        grpo.call_reward_fns(args, prompts, completions, {"answer": ["c", "a b"], "index": [0, 1]})
    rewards_module.good = lambda p, c, **k: [1.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        grpo.call_reward_fns(make_args(grpo, reward_fn=("grpo_test_rewards:good",)), prompts, completions, {})
    rewards_module.good = lambda p, c, **k: [1.0, float("nan")]
    with pytest.raises(FloatingPointError, match="grpo_test_rewards:good returned nan for the completion 'good x y z'"):
        grpo.call_reward_fns(make_args(grpo, reward_fn=("grpo_test_rewards:good",)), prompts, completions, {})


def perturbed(tree, seed: int, scale: float = 0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def naive_logprobs(args, graphdef, params, batch):
    """log π(y_t | x, y_<t) from the model's full logits / T at the position before each completion token. [B, R]"""
    tokens, mask, R = batch["tokens"], batch["mask"], batch["completion_mask"].shape[1]
    logits, _ = nnx.merge(graphdef, params)(tokens, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), mask)
    logp_all = jax.nn.log_softmax(logits[:, -R - 1 : -1].astype(jnp.float32) / args.temperature, axis=-1)
    return jnp.take_along_axis(logp_all, tokens[:, -R:, None], axis=-1)[..., 0]


def naive_loss(args, graphdef, params, batch):
    """Step 6 written plainly, as in the module docstring."""
    m = batch["completion_mask"]
    logp = naive_logprobs(args, graphdef, params, batch)
    ratio = jnp.exp(logp - batch["old_logprobs"])
    A = batch["advantages"][:, None]
    eps_high = args.epsilon_high or args.epsilon
    d = batch["ref_logprobs"] - logp
    terms = -jnp.minimum(ratio * A, jnp.clip(ratio, 1 - args.epsilon, 1 + eps_high) * A) + args.beta * (
        jnp.exp(d) - d - 1
    )
    terms = terms * m
    if args.loss_type == "grpo":
        return jnp.mean(terms.sum(1) / m.sum(1))
    if args.loss_type in ("bnpo", "dapo"):
        return terms.sum() / m.sum()
    return terms.sum() / (m.shape[0] * args.response_length)


def setup_from(args):
    """What main builds before its loop, on one device: the args completed, the tokenizer, the models, the
    training prompts."""
    tok, eos, pad = grpo.load_tokenizer(args.sft_model)
    args = grpo.with_defaults(args, eos, pad)
    graphdef, _, params, frozen = grpo.load_models(args, jnp.float32, grpo.make_mesh(1))
    return args, tok, graphdef, params, frozen, grpo.load_prompts(args, tok, None, args.dataset, "train")


def tiny_setup(tiny_sft, tmp_path, prompts, **kw):
    return setup_from(tiny_args(tiny_sft, tmp_path, prompts, **kw))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_the_loss_and_its_gradient_equal_a_naive_full_logits_reference(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module, loss_type
):
    """A real rollout of the tiny policy, then the policy moved (ratio ≠ 1) and a different reference (KL ≠ 0): the
    loss and its gradient equal the naive computation's."""
    args, tok, graphdef, params, frozen, train = tiny_setup(
        tiny_sft, tmp_path, prompts_with_answers, loss_type=loss_type, epsilon_high=0.28, temperature=0.7
    )
    frozen = {"ref": perturbed(frozen["ref"], 1), "reward": None}
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    G, P = args.group_size, q.shape[1]
    groups = q.reshape(-1, G, P)  # step 1: G consecutive copies of each prompt, different prompts
    assert (groups == groups[:, :1]).all() and (groups[0, 0] != groups[1, 0]).any()
    batch, _ = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(0))
    m = batch["completion_mask"]  # step 3: the sampler's and the reference's log-probs, by the naive loop
    np.testing.assert_allclose(batch["old_logprobs"] * m, naive_logprobs(args, graphdef, params, batch) * m, atol=1e-4)
    np.testing.assert_allclose(
        batch["ref_logprobs"] * m, naive_logprobs(args, graphdef, frozen["ref"], batch) * m, atol=1e-4
    )
    assert float(jnp.abs(batch["ref_logprobs"] - batch["old_logprobs"]).max()) > 0.01
    assert float(jnp.abs(batch["advantages"]).max()) > 0.1  # the rewards differ within a group
    moved = perturbed(params, 2)
    (loss, _), grads = jax.value_and_grad(grpo.grpo_loss, has_aux=True)(moved, args, graphdef, batch)
    naive, naive_grads = jax.value_and_grad(lambda p: naive_loss(args, graphdef, p, batch))(moved)
    assert abs(float(loss)) > 1e-3 and float(loss) == pytest.approx(float(naive), rel=1e-4, abs=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(naive_grads)):
        np.testing.assert_allclose(g, h, rtol=1e-3, atol=1e-5)


def test_the_sampler_draws_at_the_training_temperature(tiny_sft, tmp_path, prompts_with_answers, rewards_module):
    """At T = 1e-3 the G completions of a prompt are nearly all the greedy one (the tiny model has near-ties); at
    T = 1 most differ from their group's first."""
    alike = {}
    for temperature in (1e-3, 1.0):
        args, tok, graphdef, params, frozen, train = tiny_setup(
            tiny_sft, tmp_path, prompts_with_answers, temperature=temperature, batch_size=32
        )
        q, qm, columns = grpo.prompt_batch(args, train, 0)
        batch, _ = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(0))
        groups = np.asarray(batch["completions"]).reshape(-1, args.group_size, args.response_length)
        alike[temperature] = (groups == groups[:, :1]).all(2).mean()  # rows equal to their group's first
    assert alike[1e-3] >= 0.9 and alike[1.0] <= 0.5, alike


def test_num_iterations_are_steps_on_the_same_batch_and_a_nan_loss_leaves_the_weights(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module
):
    """μ = 3 equals three μ = 1 updates on the batch (the ratio to the same sampler); a NaN advantage leaves the
    weights and the optimizer state as they were, and grpo_step stops the run."""
    args, tok, graphdef, params, frozen, train = tiny_setup(tiny_sft, tmp_path, prompts_with_answers, num_iterations=3)
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, _ = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(0))
    tx = optax.sgd(0.5)
    three, _, stats3 = grpo.grpo_update(args, graphdef, tx, params, tx.init(params), batch, jax.random.key(0))
    one, args1, stats1 = params, make_args(grpo, **{**vars(args), "num_iterations": 1}), []
    for _ in range(3):
        one, _, stats = grpo.grpo_update(args1, graphdef, tx, one, tx.init(params), batch, jax.random.key(0))
        stats1.append(stats)
    assert_same_params(nnx.to_pure_dict(three), nnx.to_pure_dict(one), rtol=1e-5, atol=1e-6)
    # the logged statistics of μ = 3 iterations: each the mean of the three iterations' values (which differ)
    assert abs(float(stats1[2]["loss"]) - float(stats1[0]["loss"])) > 1e-3 and stats3.keys() == stats1[0].keys()
    for k in stats3:
        assert float(stats3[k]) == pytest.approx(np.mean([float(s[k]) for s in stats1]), rel=1e-4, abs=1e-6), k
    assert not np.allclose(jax.tree.leaves(one)[0], jax.tree.leaves(params)[0])
    bad = batch | {"advantages": batch["advantages"].at[0].set(jnp.nan)}
    state = {"params": params, "opt_state": tx.init(params)}
    same, _, stats = grpo.grpo_update(args, graphdef, tx, params, tx.init(params), bad, jax.random.key(0))
    assert_same_params(nnx.to_pure_dict(same), nnx.to_pure_dict(params))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        grpo.grpo_step(args, graphdef, tx, state, bad, 0, 0)


def plain_loop(args, lag: int):
    """Steps 1-6 written as one sequential loop, the batch of step s sampled by the weights after max(s − lag, 0)
    steps: what --max-staleness lag must compute, without threads."""
    args, tok, graphdef, params, frozen, train = setup_from(args)
    tx = grpo.make_optimizer(args)
    opt_state, history = tx.init(params), [params]
    for step in range(args.max_steps):
        q, qm, columns = grpo.prompt_batch(args, train, step)
        key = jax.random.fold_in(jax.random.key(args.run.seed), step)
        sampler = history[max(step - lag, 0)]
        batch, _ = grpo.rollout(args, graphdef, None, tok, sampler, frozen, q, qm, columns, key)
        params, opt_state, _ = grpo.grpo_update(args, graphdef, tx, params, opt_state, batch, jax.random.key(0))
        history.append(params)
    return nnx.to_pure_dict(params)


def test_staleness_0_is_the_synchronous_loop_and_1_samples_with_the_previous_weights(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module
):
    """main with --max-staleness 0 ends at the plain loop's weights; with 1, at those of the plain loop whose batch s
    is sampled by the weights of step s − 1 (the ratio then to those weights); the two differ."""
    finals, fns = {}, tuple(f"grpo_test_rewards:{f}" for f in ("aligned_good", "only_long", "chars"))
    for k in (0, 1):  # chars: no group's rewards are all equal (with only the others, a batch can have no signal)
        kw = dict(
            max_staleness=k, checkpoint_dir=str(tmp_path / f"ck{k}"), reward_fn=fns, reward_weights=(1.0, 0.5, 0.3)
        )
        args = tiny_args(tiny_sft, tmp_path, prompts_with_answers, **kw)
        grpo.main(args)
        step, state = read_checkpoint(args.run.checkpoint_dir)
        assert step == 3
        assert_same_params(state["params"], plain_loop(args, lag=k), rtol=0, atol=1e-6)
        finals[k] = state["params"]
    diff = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
    assert diff > 1e-4


def test_grpo_learns_a_reward_function_and_the_evaluation_starts_at_the_sft_policy(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module
):
    """Rewarding "good": 16 steps raise the held-out reward from ~0 to > 1; step 0's KL to the SFT policy is 0."""
    args = tiny_args(
        tiny_sft,
        tmp_path,
        prompts_with_answers,
        reward_fn=("grpo_test_rewards:good",),
        reward_weights=(),
        response_length=8,
        batch_size=32,
        max_steps=16,
        eval_every=16,
        eval_prompts=32,
        learning_rate=2e-2,
        beta=0.01,
    )
    first, final = grpo.main(args)
    assert abs(first["eval/kl"]) < 1e-4  # policy == reference: the sampler's log-probs against a forward pass
    assert first["eval/rewards/good/mean"] == first["eval/reward"]
    assert first["eval/reward"] < 0.3 and final["eval/reward"] > 1.0, (first, final)
    assert final["eval/kl"] > 0.1


def test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module, monkeypatch
):
    """Killed during step 3 and resumed, a run ends with the uninterrupted run's weights and AdamW state, bit for bit
    (two devices); the exported policy is that state's."""
    kw = dict(max_steps=4, checkpoint_every=1, num_devices=2, eval_every=2)
    straight = tiny_args(tiny_sft, tmp_path / "a", prompts_with_answers, **kw)
    grpo.main(straight)
    args = tiny_args(tiny_sft, tmp_path / "b", prompts_with_answers, **kw)
    kill_during_call(monkeypatch, grpo, "grpo_step", 3, lambda: grpo.main(args))
    assert read_checkpoint(args.run.checkpoint_dir)[0] == 2
    grpo.main(make_args(grpo, **{**vars(args), "resume": True}))
    (step_a, a), (step_b, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
    assert step_a == step_b == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert_same_params(grpo.load_model(args.run.output_dir)[0], a["params"])


def test_an_error_in_the_rollout_thread_stops_the_run(tiny_sft, tmp_path, prompts_with_answers, rewards_module):
    """A reward function failing in the background thread is raised by main (no hang); a non-finite reward names the
    function; the output dir is not written."""
    calls = []

    def failing(prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the reward server is down")
        return [0.0] * len(completions)

    rewards_module.failing = failing
    args = tiny_args(
        tiny_sft, tmp_path, prompts_with_answers, reward_fn=("grpo_test_rewards:failing",), max_staleness=1
    )
    with pytest.raises(RuntimeError, match="the reward server is down"):
        grpo.main(dataclasses.replace(args, reward_weights=()))
    rewards_module.failing = lambda p, c, **k: [float("inf")] * len(c)
    with pytest.raises(FloatingPointError, match="grpo_test_rewards:failing returned inf"):
        grpo.main(make_args(grpo, **{**vars(args), "reward_weights": (), "checkpoint_dir": str(tmp_path / "ck2")}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(group_size=1), "--group-size 1: must be >= 2"),
        (dict(batch_size=10), "--batch-size 10: must be a multiple of --group-size 4"),
        (dict(reward_weights=(1.0,)), "--reward-weights 1.0: 1 weights for 2 rewards"),
        (dict(reward_fn=("grpo_test_rewards:missing",), reward_weights=()), "has no function missing"),
        (dict(num_iterations=0), "--num-iterations 0"),
        (dict(max_staleness=-1), "--max-staleness -1"),
        (dict(temperature=0.0), "--temperature 0.0"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(
    tiny_sft, tmp_path, prompts_with_answers, rewards_module, override, message
):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grpo.main(tiny_args(tiny_sft, tmp_path, prompts_with_answers, **override))


def test_a_dataset_row_with_other_columns_names_file_and_line(tiny_sft, tmp_path, rewards_module):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film", "answer": "1"}, {"prompt": "a plot"}])
    with pytest.raises(ValueError, match=r"p.jsonl:2: fields \[\] differ from the first row's \['answer'\]"):
        grpo.main(tiny_args(tiny_sft, tmp_path, path))


def test_the_default_task_uses_the_built_in_rewards(tmp_path):
    args = grpo.with_defaults(make_args(grpo), eos_id=3, pad_id=0)
    assert args.reward_fn == grpo.BUILT_IN_REWARDS and (args.stop_token_id, args.pad_token_id) == (3, 0)
    texts = ["what a wonderful, great film", "terrible terrible terrible terrible", "ok"]
    sentiment = grpo.positive_sentiment([""] * 3, texts)
    assert sentiment[0] > 0.8 and sentiment[1] < 0.2 and all(0 <= s <= 1 for s in sentiment)
    assert grpo.length_band([""] * 4, ["w " * 4, "w " * 12, "w " * 20, "w " * 30]) == [0.5, 1.0, 0.5, 0.0]
    assert grpo.no_repetition([""] * 3, texts) == [1.0, pytest.approx(1 / 3), None]
    assert grpo.with_defaults(make_args(grpo, reward_model="rm"), 3, 0).reward_fn == ()
    args = grpo.with_defaults(make_args(grpo, stop_token_id=5, eos_token_id=6, pad_token_id=7), eos_id=3, pad_id=0)
    assert (args.stop_token_id, args.eos_token_id, args.pad_token_id) == (5, 6, 7)  # flags win over the tokenizer's


def test_built_in_rewards_are_named_alone_and_the_rollout_helpers_give_rlhf_ppos_arrays(rewards_module):
    """grpo.py imports no other script. Its built-in reward functions are found by their name alone (whatever the file
    is called), a module's by module:function; its truncation after the stop token, the reward model's input rows
    (prompt + completion + EOS unless it ends with EOS) and the last-token read equal rlhf_ppo.py's on completions
    that stop early, at the last slot, at the first, and never."""
    import rlhf_ppo as ppo

    builtin = [grpo.reward_function(name) for name in grpo.BUILT_IN_REWARDS]
    assert builtin == [grpo.positive_sentiment, grpo.length_band, grpo.no_repetition]
    assert grpo.reward_function("grpo_test_rewards:good") is sys.modules["grpo_test_rewards"].good
    assert grpo.reward_function("main") is None and grpo.reward_function("grpo_test_rewards:nothing") is None
    rng = np.random.default_rng(0)
    queries, qmask = jnp.asarray(rng.integers(3, 9, (4, 5))), jnp.asarray(rng.random((4, 5)) < 0.7)
    completions = rng.integers(3, 9, (4, 6))
    completions[0, 2] = completions[1, 5] = completions[3, 0] = 2  # row 2 never stops
    completions = jnp.asarray(completions)
    for stop, eos in ((2, 2), (2, 8)):  # EOS = the stop token, or a token some completions end with
        ours = grpo.truncated_episodes(queries, qmask, completions, stop, 0)
        theirs = ppo.truncated_episodes(queries, qmask, completions, stop, 0)
        for x, y in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(x, y)
        rm_ours = grpo.reward_model_inputs(queries, qmask, completions, ours[0], eos, 0)
        rm_theirs = ppo.reward_model_inputs(queries, qmask, completions, theirs[0], eos, 0)
        for x, y in zip(rm_ours, rm_theirs, strict=True):
            np.testing.assert_array_equal(x, y)
        scores = jnp.asarray(rng.normal(size=rm_ours[1].shape), jnp.float32)
        np.testing.assert_array_equal(
            grpo.last_token_scores(scores, rm_ours[1]), ppo.last_token_scores(scores, rm_theirs[1])
        )
    assert np.asarray(ours[0]).sum(1).tolist() == [3, 6, 6, 1]  # through the stop token; row 2 keeps every slot


# ---------------------------------------------------------------- issue 25: what users read (logs, evaluation, prints)
# Each logged or printed number against a naive recomputation: per-row forward passes of unpadded sequences (right
# padding only: causal), Python loops over the completions, the reward functions' own values.
WEIGHTS = (-0.5, 2.0, -1.5)  # --reward-weights: chars (short completions preferred), sparse, then the reward model


@pytest.fixture(scope="module")
def stopping_pipeline(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline's SFT policy with its EOS row of the (tied) head turned towards the prompts' mean hidden state,
    so that completions stop at different positions (many at once, some later, many never within R = 6); its reward
    model; 40 training prompts (column src "train") and 9 other prompts held out (src "eval")."""
    tmp, prompts = tiny_pipeline
    out = tmp_path_factory.mktemp("grpo_i25")
    tok, eos, pad = grpo.load_tokenizer(tmp / "sft")
    model, _ = grpo.load_model(tmp / "sft")
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    q, qm = grpo.left_pad([tok.encode(t).ids for t in texts], pad)
    h = np.asarray(model.hidden_states(jnp.asarray(q), jnp.asarray(np.maximum(qm.cumsum(1) - 1, 0)), qm)[0])[qm]
    mu = h.mean(0)
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...].at[eos].set(jnp.asarray(4.0 * mu / (mu @ mu)))
    grpo.save_model(out / "sft", model, tmp / "sft", {"pad_token_id": pad, "eos_token_id": eos})
    train = write_jsonl(out / "train.jsonl", [{"prompt": t, "src": "train"} for t in texts])
    rng = np.random.default_rng(5)
    held_out = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(2, 6, 9)]
    held_out = write_jsonl(out / "eval.jsonl", [{"prompt": t, "src": "eval"} for t in held_out])
    return out / "sft", tmp / "rm", train, held_out


def chars_value(text):
    return len(text) / 4


def sparse_value(text):  # None (does not apply) for the empty completions and a third of the others
    return None if len(text) % 3 == 0 else float(len(text) % 5) - 0.7


@pytest.fixture
def i25_rewards(monkeypatch):
    """Reward functions of known values that record what they are given: importable as grpo_i25_rewards:..."""
    module, calls = types.ModuleType("grpo_i25_rewards"), []

    def chars(prompts, completions, src, **columns):
        calls.append((list(prompts), list(completions), list(src)))
        return [chars_value(c) for c in completions]

    module.chars, module.calls = chars, calls
    module.sparse = lambda prompts, completions, **columns: [sparse_value(c) for c in completions]
    module.never = lambda prompts, completions, **columns: [None] * len(completions)
    module.first_group_flat = lambda prompts, completions, **columns: [
        1.0 if p == prompts[0] else chars_value(c) for p, c in zip(prompts, completions)
    ]
    monkeypatch.setitem(sys.modules, "grpo_i25_rewards", module)
    return module


@functools.cache
def jitted_apply(graphdef):
    return jax.jit(
        lambda params, tokens: nnx.merge(graphdef, params)(
            tokens, jnp.broadcast_to(jnp.arange(32), tokens.shape), tokens >= 0
        )[0]
    )


def naive_forward(model, sequences):
    """The model's output (logits [L, V] or scores [L]) for each token list, float64: rows right-padded to 32 tokens
    (causal: the padding cannot reach the real positions), positions 0, 1, ..., 16 rows a call (one compilation)."""
    assert max(map(len, sequences)) <= 32
    graphdef, params = nnx.split(model)
    out = []
    for i in range(0, len(sequences), 16):
        chunk = sequences[i : i + 16]
        tokens = np.ones((16, 32), np.int32)
        for j, s in enumerate(chunk):
            tokens[j, : len(s)] = s
        logits = np.asarray(jitted_apply(graphdef)(params, jnp.asarray(tokens)), np.float64)
        out += [o[: len(s)] for o, s in zip(logits, chunk)]
    return out


def naive_episodes(tok, queries, query_mask, completions, stop):
    """Per row: the prompt's token ids, the completion's up to and with its first stop token, its text, the prompt's."""
    rows = []
    for q, qm, c in zip(queries, query_mask, completions):
        c = [int(t) for t in c]
        n = next((t + 1 for t, y in enumerate(c) if y == stop), len(c))
        prompt = [int(t) for t in q[qm]]
        rows.append(
            {"prompt": prompt, "completion": c[:n], "text": tok.decode(c[:n]), "prompt_text": tok.decode(prompt)}
        )
    return rows


def naive_rm_scores(rm, rows, eos):
    """The reward model's score at the last token of prompt + completion + EOS (unless the completion ends with it)."""
    seqs = [
        r["prompt"] + r["completion"] + ([eos] if not r["completion"] or r["completion"][-1] != eos else [])
        for r in rows
    ]
    return [s[-1] for s in naive_forward(rm, seqs)]


def naive_sequence_logprobs(model, rows, temperature):
    """Σ_t log softmax(logits / T)[y_t] over each completion's real tokens."""
    out = []
    for r, logits in zip(rows, naive_forward(model, [r["prompt"] + r["completion"] for r in rows])):
        total = 0.0
        for t, y in enumerate(r["completion"]):
            z = logits[len(r["prompt"]) - 1 + t] / temperature
            total += z[y] - z.max() - np.log(np.exp(z - z.max()).sum())
        out.append(total)
    return np.array(out)


def naive_sources(rows, rm_scores):
    """[B, 3] of chars, sparse (NaN: None), reward model; the total with WEIGHTS in this order (a None adds 0)."""
    per = np.array(
        [[chars_value(r["text"]), np.nan if sparse_value(r["text"]) is None else sparse_value(r["text"]), s]
         for r, s in zip(rows, rm_scores)]
    )  # fmt: skip
    total = [WEIGHTS[0] * a + (0.0 if np.isnan(b) else WEIGHTS[1] * b) + WEIGHTS[2] * c for a, b, c in per]
    return per, np.array(total)


def test_grpo_with_a_reward_model_and_reward_functions_logs_evaluates_and_prints_their_definitions(
    stopping_pipeline, i25_rewards, monkeypatch, capsys, tmp_path
):
    """--reward-fn chars, sparse and --reward-model together, weights -0.5, 2, -1.5 (the functions', then the model's),
    β = 0, staleness 1: every logged rewards/*, reward*, completions/* value, each evaluation's eval/* (on the held-out
    prompts, with the reference read for eval/kl although training never reads it), the printed summary and the
    before/after table, against a naive recomputation from the sampled tokens."""
    sft_path, rm_path, train_path, eval_path = stopping_pipeline
    writer, sampled, real_sample = RecordingWriter(), {"train": [], "eval": []}, grpo.sample
    monkeypatch.setattr(grpo, "summary_writer", lambda args: writer)

    def recording_sample(step_fn, params, cache, queries, query_mask, key, **kw):
        out = real_sample(step_fn, params, cache, queries, query_mask, key, **kw)
        kind = "train" if queries.shape[0] == 8 else "eval"  # B = 8 for training, 6 held-out prompts
        sampled[kind].append((np.asarray(queries), np.asarray(query_mask), np.asarray(out[0])))
        return out

    monkeypatch.setattr(grpo, "sample", recording_sample)
    args = make_args(
        grpo,
        sft_model=str(sft_path),
        reward_model=str(rm_path),
        reward_fn=("grpo_i25_rewards:chars", "grpo_i25_rewards:sparse"),
        reward_weights=WEIGHTS,
        dataset=str(train_path),
        eval_dataset=str(eval_path),
        response_length=6,
        group_size=4,
        batch_size=8,
        max_steps=3,
        beta=0.0,
        max_staleness=1,
        learning_rate=3e-3,
        temperature=1.0,
        eval_every=2,
        eval_prompts=6,
        num_sample_rows=2,
        num_devices=1,
        output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    first, final = grpo.main(args)
    printed = capsys.readouterr().out
    tok, eos, _ = grpo.load_tokenizer(sft_path)
    rm, policy, reference = (
        grpo.load_model(rm_path)[0],
        grpo.load_model(args.run.output_dir)[0],
        grpo.load_model(sft_path)[0],
    )
    names = ("chars", "sparse", "reward_model")
    log = writer.scalars

    # the reward functions get the completions' texts and their prompts' columns: training then held-out prompts
    train_calls = [c for c in i25_rewards.calls if c[2][0] == "train"]
    eval_calls = [c for c in i25_rewards.calls if c[2][0] == "eval"]
    assert len(sampled["train"]) == len(train_calls) == 3 and len(sampled["eval"]) == len(eval_calls) == 3
    assert all(set(c[2]) == {"train"} for c in train_calls) and all(set(c[2]) == {"eval"} for c in eval_calls)
    held_out = [json.loads(line)["prompt"] for line in Path(eval_path).read_text().splitlines()][:6]

    # training: the batch of step s (logged at s + 1), staleness 0, 1, 1
    stops, nones = [], []
    for s, ((q, qm, comp), call) in enumerate(zip(sampled["train"], train_calls)):
        rows = naive_episodes(tok, q, qm, comp, eos)
        assert call[0] == [r["prompt_text"] for r in rows] and call[1] == [r["text"] for r in rows]
        per, total = naive_sources(rows, naive_rm_scores(rm, rows, eos))
        groups = total.reshape(-1, 4)
        lengths = [len(r["completion"]) for r in rows]
        expected = {
            "reward": total.mean(),
            "reward_std": np.mean([statistics.stdev(g) for g in groups]),
            "frac_reward_zero_std": np.mean([len(set(g)) == 1 for g in groups]),
            "completions/mean_length": np.mean(lengths),
            "completions/clipped_ratio": np.mean([eos not in r["completion"] for r in rows]),
            "staleness": [0, 1, 1][s],
        }
        for name, col in zip(names, per.T):
            if not np.isnan(col).all():
                real = col[~np.isnan(col)]
                expected[f"rewards/{name}/mean"] = real.mean()
                expected[f"rewards/{name}/std"] = real.std(ddof=1)
        for k, v in expected.items():
            assert log[k][s + 1] == pytest.approx(v, rel=1e-4, abs=1e-4), (k, s)
        stops.append(set(lengths))
        nones.append(np.isnan(per[:, 1]).mean())
    assert any(len(lengths) >= 3 for lengths in stops) and 0 < np.mean(nones) < 1  # a discriminating case
    logged = {k for k in log if not k.startswith("eval/")}
    assert logged >= {"loss", "grad_norm", "entropy", "clip_ratio/low_mean", "steps_per_s"}
    assert "kl" not in logged and all(set(log[k]) == {1, 2, 3} for k in logged)  # β = 0: no reference in training

    # evaluation at steps 0, 2 and 3 (--eval-every 2 and the last step) on the first 6 held-out prompts
    evaluations, sparse_nans = {}, []
    for step, (q, qm, comp), call in zip((0, 2, 3), sampled["eval"], eval_calls):
        rows = naive_episodes(tok, q, qm, comp, eos)
        assert [" ".join(r["prompt_text"].split()) for r in rows] == held_out
        assert call[1] == [r["text"] for r in rows]
        lengths = {len(r["completion"]) for r in rows}
        assert step != 3 or (min(lengths) < 6 and 6 in lengths), lengths  # some stop early (eval/kl's mask matters)
        per, total = naive_sources(rows, naive_rm_scores(rm, rows, eos))
        sparse_nans.append(np.nanmean(per[:, 1]) != np.mean(np.nan_to_num(per[:, 1])))  # a None counts in no mean
        expected = {
            "eval/reward": total.mean(),
            "eval/completions/mean_length": np.mean([len(r["completion"]) for r in rows]),
        }
        expected |= {f"eval/rewards/{n}/mean": np.nanmean(col) for n, col in zip(names, per.T)}
        if step in (0, 3):  # Σ_t log π / π_ref over the real tokens (the policy of step 3: the exported one)
            kl = naive_sequence_logprobs(policy if step else reference, rows, 1.0)
            expected["eval/kl"] = np.mean(kl - naive_sequence_logprobs(reference, rows, 1.0))
        assert {k for k in log if k.startswith("eval/")} == set(first) == set(final) == set(expected) | {"eval/kl"}
        for k, v in expected.items():
            assert log[k][step] == pytest.approx(v, rel=1e-4, abs=2e-4), (k, step)
        evaluations[step] = rows, total, expected
    assert any(sparse_nans)  # a discriminating case: a held-out mean that skips the Nones
    assert first == {k: log[k][0] for k in first} and final == {k: log[k][3] for k in final}
    assert final["eval/kl"] > 0.02 and abs(first["eval/kl"]) < 1e-4

    # printed: the first evaluation's summary, then the before/after table (also logged as text)
    line = next(x for x in printed.splitlines() if x.startswith("40 training prompts, 3 steps; setup "))
    pairs = dict(p.rsplit(" ", 1) for p in re.sub(r".* setup \d+s; ", "", line).split(", "))
    want = {k.removeprefix("eval/").removeprefix("rewards/"): v for k, v in evaluations[0][2].items()}
    assert pairs.keys() == want.keys()
    for k, v in want.items():
        assert float(pairs[k]) == pytest.approx(v, abs=2e-4), k
    table = writer.texts["eval/before_after"][None]
    assert table in printed
    lines = table.split("\n")  # (not splitlines: a completion may hold a \r or \x1c, which clean() leaves)
    assert lines[:2] == ["| held-out | before | after |", "|-|-|-|"]
    metric_rows = {r.split(" | ")[0][2:]: r.split(" | ")[1:] for r in lines[2 : 2 + len(first)]}
    assert metric_rows.keys() == {k.removeprefix("eval/") for k in first}
    for k, (before, after) in metric_rows.items():
        assert float(before) == pytest.approx(evaluations[0][2]["eval/" + k], abs=2e-3), k
        assert float(after.removesuffix(" |")) == pytest.approx(evaluations[3][2]["eval/" + k], abs=2e-3), k
    samples = lines[2 + len(first) + 1 :]
    assert samples[:2] == ["| prompt | before (reward) | after (reward) |", "|-|-|-|"] and len(samples) == 4
    clean = lambda text: text.replace("|", "/").replace("\n", " ")  # noqa: E731
    (rows0, total0, _), (rows3, total3, _) = evaluations[0], evaluations[3]
    for i, row in enumerate(samples[2:]):
        head = f"| {clean(rows0[i]['prompt_text'])} | {clean(rows0[i]['text'])} ("
        assert row.startswith(head), (row, head)
        r0, rest = row[len(head) :].split(") | ", 1)
        tail = f"{clean(rows3[i]['text'])} ("
        assert rest.startswith(tail) and rest.endswith(") |"), (rest, tail)
        assert float(r0) == pytest.approx(total0[i], abs=6e-3)
        assert float(rest[len(tail) : -3]) == pytest.approx(total3[i], abs=6e-3)


def test_rollout_statistics_with_a_group_of_equal_rewards_and_a_function_that_never_applies(
    stopping_pipeline, i25_rewards, tmp_path
):
    """Three groups, the first's rewards all equal (frac_reward_zero_std 1/3, its std 0 in reward_std's mean, its
    advantages 0), completions stopping at different positions; a function that returns None for every completion
    adds nothing and is not logged."""
    sft_path, _, train_path, _ = stopping_pipeline
    args = make_args(
        grpo,
        sft_model=str(sft_path),
        dataset=str(train_path),
        reward_fn=("grpo_i25_rewards:never", "grpo_i25_rewards:first_group_flat"),
        reward_weights=(5.0, 1.5),
        response_length=6,
        group_size=4,
        batch_size=12,
        temperature=1.0,
        num_devices=1,
    )
    args, tok, graphdef, params, frozen, train = setup_from(args)
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, stats = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(3))
    rows = naive_episodes(tok, q, qm, np.asarray(batch["completions"]), args.stop_token_id)
    lengths = [len(r["completion"]) for r in rows]
    np.testing.assert_array_equal(np.asarray(batch["completion_mask"]).sum(1), lengths)
    values = [1.0 if r["prompt_text"] == rows[0]["prompt_text"] else chars_value(r["text"]) for r in rows]
    groups = [values[i : i + 4] for i in range(0, 12, 4)]
    stds = [statistics.stdev(g) for g in groups]
    assert stds[0] == 0 and min(stds[1:]) > 0.1 and 1 < len(set(lengths)) and 6 in lengths  # discriminating
    rewards = [1.5 * v for v in values]
    expected = {
        "reward": statistics.mean(rewards),
        "reward_std": statistics.mean(1.5 * s for s in stds),
        "frac_reward_zero_std": 1 / 3,
        "completions/mean_length": statistics.mean(lengths),
        "completions/clipped_ratio": statistics.mean(args.stop_token_id not in r["completion"] for r in rows),
        "rewards/first_group_flat/mean": statistics.mean(values),
        "rewards/first_group_flat/std": statistics.stdev(values),
    }
    assert stats.keys() == expected.keys()
    for k, v in expected.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    scaled = [[1.5 * x for x in g] for g in groups]
    advantages = [(r - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in scaled for r in g]
    np.testing.assert_allclose(batch["advantages"], advantages, rtol=1e-4, atol=1e-5)


def naive_token_statistics(model, rows, temperature, R):
    """Per completion token (float64 [B, R], 0 after the stop): log softmax(logits / T)[y_t] and the entropy there."""
    logp, entropy = np.zeros((len(rows), R)), np.zeros((len(rows), R))
    for i, (r, logits) in enumerate(zip(rows, naive_forward(model, [r["prompt"] + r["completion"] for r in rows]))):
        for t, y in enumerate(r["completion"]):
            z = logits[len(r["prompt"]) - 1 + t] / temperature
            lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            logp[i, t], entropy[i, t] = lp[y], -(np.exp(lp) * lp).sum()
    return logp, entropy


def test_the_logged_update_statistics_at_a_moved_policy_equal_naive_loops(stopping_pipeline, i25_rewards, tmp_path):
    """A batch sampled by the SFT policy (completions stopping at different positions), the policy moved away from it
    and from a different reference: entropy, kl (β > 0), the three clip ratios (ε 0.2, ε_high 0.28), loss and
    grad_norm (the step of SGD(0.5) / 0.5) of grpo_update equal naive loops over the real tokens."""
    sft_path, _, train_path, _ = stopping_pipeline
    args = make_args(
        grpo,
        sft_model=str(sft_path),
        dataset=str(train_path),
        reward_fn=("grpo_i25_rewards:first_group_flat",),
        response_length=6,
        group_size=4,
        batch_size=12,
        temperature=1.0,
        beta=0.3,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="grpo",
        num_devices=1,
    )
    args, tok, graphdef, params, frozen, train = setup_from(args)
    frozen = {"ref": perturbed(frozen["ref"], 1, 0.02), "reward": None}
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, _ = grpo.rollout(args, graphdef, None, tok, params, frozen, q, qm, columns, jax.random.key(5))
    moved = perturbed(params, 2, 0.02)
    rows = naive_episodes(tok, q, qm, np.asarray(batch["completions"]), args.stop_token_id)
    logp, entropy = naive_token_statistics(nnx.merge(graphdef, moved), rows, 1.0, 6)
    ref, _ = naive_token_statistics(nnx.merge(graphdef, frozen["ref"]), rows, 1.0, 6)
    old, _ = naive_token_statistics(nnx.merge(graphdef, params), rows, 1.0, 6)
    A = np.asarray(batch["advantages"], np.float64)
    real = [(i, t) for i, r in enumerate(rows) for t in range(len(r["completion"]))]
    ratio = {(i, t): np.exp(logp[i, t] - old[i, t]) for i, t in real}
    low = [ratio[i, t] < 0.8 and A[i] < 0 for i, t in real]
    high = [ratio[i, t] > 1.28 and A[i] > 0 for i, t in real]
    k3 = [np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 for i, t in real]
    per_row = [[] for _ in rows]  # ℓ_{i,t} of --loss-type grpo: a mean per completion, then over the batch
    for (i, t), kl in zip(real, k3):
        rho = ratio[i, t]
        per_row[i].append(-min(rho * A[i], min(max(rho, 0.8), 1.28) * A[i]) + 0.3 * kl)
    expected = {
        "entropy": np.mean([entropy[i, t] for i, t in real]),
        "kl": np.mean(k3),
        "clip_ratio/low_mean": np.mean(low),
        "clip_ratio/high_mean": np.mean(high),
        "clip_ratio/region_mean": np.mean(np.logical_or(low, high)),
        "loss": np.mean([np.mean(r) for r in per_row]),
    }
    wrong_side = [(ratio[i, t] < 0.8 and A[i] > 0) or (ratio[i, t] > 1.2 and A[i] < 0) for i, t in real]
    assert 0 < sum(low) and 0 < sum(high) and sum(low) + sum(high) < len(real) < 0.9 * A.size * 6  # discriminating
    assert any(wrong_side) and any(1.2 < r <= 1.28 for r in ratio.values())  # the sign of A and ε_high matter
    tx = optax.sgd(0.5)
    stepped, _, stats = grpo.grpo_update(args, graphdef, tx, moved, tx.init(moved), batch, jax.random.key(0))
    expected["grad_norm"] = float(optax.tree.norm(jax.tree.map(lambda a, b: (a - b) / 0.5, stepped, moved)))
    assert stats.keys() == expected.keys()
    for k, v in expected.items():
        assert float(stats[k]) == pytest.approx(v, rel=2e-4, abs=1e-5), k


def test_the_printed_summary_and_before_after_table_written_out_by_hand():
    """summary: one line of every metric without its eval/ and rewards/ prefixes; before_after: the first evaluation's
    metrics beside the final one's (NaN where the final lacks one), then each sample row's prompt, its completion and
    total reward before and after, with | and newlines out of the cells."""
    first = {"eval/reward": 1.0, "eval/kl": -0.00004, "eval/rewards/a/mean": 0.25}
    final = {"eval/reward": 2.5, "eval/kl": 0.125}
    assert grpo.summary(first) == "reward 1.0000, kl -0.0000, a/mean 0.2500"
    before = [("p|1", "x\ny", 0.5), ("p2", "z", -1.0)]
    after = [("p|1", "u", 0.754), ("p2", "w|", 3.0)]
    assert grpo.before_after(first, final, before, after) == (
        "| held-out | before | after |\n|-|-|-|\n"
        "| reward | 1.000 | 2.500 |\n| kl | -0.000 | 0.125 |\n| rewards/a/mean | 0.250 | nan |\n\n"
        "| prompt | before (reward) | after (reward) |\n|-|-|-|\n"
        "| p/1 | x y (0.50) | u (0.75) |\n| p2 | z (-1.00) | w/ (3.00) |"
    )
