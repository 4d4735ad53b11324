"""LoRA (Hu et al. 2021) in every script: the adapter model against the base, against its merged export and against
PEFT's own LoRA (transformers + peft), the frozen base and the optimizer state, π_ref as the base with the adapters off,
resume, every script's run, and the errors."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import kill_during_call, make_args, make_hf_model, read_checkpoint
from flax import nnx, traverse_util
from test_sft import TINY, write_jsonl

import dpo
import grpo
import reward_model as rm
import rlhf_ppo as ppo
import sft

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def lora_run(rank=4, alpha=8.0, targets=ALL, **kw):
    return sft.Run("t", "out", "ck", lora_rank=rank, lora_alpha=alpha, lora_targets=targets, **kw)


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()}


def randomize_adapters(model, seed=0):
    """A and B drawn at random (B is 0 at init): the adapters then change every targeted projection's output."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32), state))
    return model


def logits(model, ids):
    ids = jnp.asarray(ids)
    return np.asarray(model(ids, sft.positions_from_mask(jnp.ones_like(ids)), jnp.ones_like(ids))[0])


IDS = np.array([[5, 17, 42, 9, 7, 3, 11, 60], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_at_init_the_lora_model_is_the_base_bit_for_bit(hf_model):
    _, _, path = hf_model
    base, _ = sft.load_model(path)
    lora, cfg = sft.load_model(path, lora=lora_run(rank=4, targets="q_proj,v_proj,down_proj"))
    np.testing.assert_array_equal(logits(lora, IDS), logits(base, IDS))
    adapters = flat(nnx.state(lora, nnx.LoRAParam))
    assert len(adapters) == 2 * 3 * cfg.num_hidden_layers  # A and B of 3 projections in each layer
    for path_, w in adapters.items():
        if path_[-1] == "lora_b":
            assert w.shape[0] == 4 and not w.any()  # B [r, out] = 0
        else:  # A [in, r] ~ U(±1/√in), PEFT's Kaiming-uniform
            bound = 1 / np.sqrt(w.shape[0])
            assert w.shape[1] == 4 and np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound


def test_the_merged_export_and_peft_give_the_adapter_models_logits(hf_model, tmp_path):
    """Trained adapters (random A, B): the merged checkpoint opened by transformers, and the PEFT adapter loaded by
    peft onto the base, give our LoRA model's logits; the merged weight is W + (α / r) B A of the saved tensors."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    kind, _, path = hf_model
    model, _ = sft.load_model(path, lora=lora_run(rank=4, alpha=12.0))
    ours = logits(randomize_adapters(model), IDS)
    assert np.abs(ours - logits(sft.load_model(path)[0], IDS)).max() > 0.05  # the adapters matter
    sft.save_model(tmp_path / "out", model, adapter_base=str(path))
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12.0, ALL.split(","))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(torch.tensor(IDS)).logits.numpy()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "out" / "adapter")
        theirs = peft.eval()(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(merged, ours, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-4)
    base, out = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    A, B = (adapter[f"base_model.model.{name}.lora_{x}.weight"].astype(np.float64) for x in "AB")  # [r, in], [out, r]
    np.testing.assert_allclose(out[name + ".weight"], base[name + ".weight"] + 12.0 / 4 * B @ A, atol=1e-6)
    assert kind in ("llama", "qwen2")


def test_a_reward_models_adapter_and_score_head_load_in_peft_as_seq_cls(hf_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    kind, _, path = hf_model
    arch = "Qwen2ForSequenceClassification" if kind == "qwen2" else "LlamaForSequenceClassification"
    model, _ = sft.load_model(path, architecture=arch, seed=3, lora=lora_run(rank=2))
    ours = logits(randomize_adapters(model), IDS)[:, -1]  # the score at the last token
    sft.save_model(tmp_path / "out", model, adapter_base=str(path))
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=0)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()(torch.tensor(IDS)).logits
    np.testing.assert_allclose(theirs.numpy()[:, 0], ours, atol=2e-5, rtol=1e-4)


def test_the_reference_is_the_base_with_the_adapters_off(hf_model):
    _, _, path = hf_model
    model, _ = sft.load_model(path, lora=lora_run())
    graphdef, params = nnx.split(randomize_adapters(model))
    off = nnx.merge(graphdef, sft.reference(params))
    np.testing.assert_array_equal(logits(off, IDS), logits(sft.load_model(path)[0], IDS))
    copy = jax.tree.map(jnp.copy, params)
    assert sft.reference(params, copy) is copy  # a reference copy, where there is one, is used as it is
    # PPO and GRPO read π_ref through it: with random adapters their reference log-probs are the base model's
    responses = jnp.asarray(IDS[:, 4:])
    tokens, mask = jnp.asarray(IDS), jnp.ones(IDS.shape, bool)
    base_graph, base_params = nnx.split(sft.load_model(path)[0])
    want = ppo.response_logprobs(base_graph, base_params, tokens, mask, responses, 0.7)
    got = ppo.response_logprobs(graphdef, ppo.reference(params, None), tokens, mask, responses, 0.7)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(ppo.response_logprobs(graphdef, params, tokens, mask, responses, 0.7), want, atol=1e-3)


def test_lora_dropout_drops_the_adapters_input_alone_with_a_key_of_each_adapters_own(hf_model):
    """--lora-dropout p = 0.25 against float64 numpy: y = x W + (α / r) ((x ⊙ m / (1 − p)) A) B, m ~ Bernoulli(1 − p)
    from the adapter's key; each adapter gets its own key; without a key (evaluation, sampling, π_ref), no dropout."""
    _, _, path = hf_model
    model, cfg = sft.load_model(path, lora=lora_run(rank=4, alpha=8.0, lora_dropout=0.25))
    plain = logits(randomize_adapters(model), IDS)
    np.testing.assert_array_equal(logits(sft.lora_dropout(model, None), IDS), plain)
    dropped = logits(sft.lora_dropout(model, jax.random.key(3)), IDS)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(logits(model, IDS), dropped)  # the same key, the same units dropped
    keys = [np.asarray(jax.random.key_data(m.dropout_key)) for _, m in nnx.iter_modules(model)
            if isinstance(m, sft.LoRALinear)]  # fmt: skip
    assert len(keys) == 7 * cfg.num_hidden_layers and len({k.tobytes() for k in keys}) == len(keys)
    up = model.layers[1].mlp.up_proj
    x = np.random.default_rng(0).normal(size=(64, cfg.hidden_size)).astype(np.float32)
    keep = np.asarray(jax.random.bernoulli(up.dropout_key, 0.75, x.shape))
    assert 0.7 < keep.mean() < 0.8
    w, a, b = (np.asarray(v[...], np.float64) for v in (up.kernel, up.lora_a, up.lora_b))
    want = x @ w + 8.0 / 4 * ((x * keep / 0.75) @ a) @ b
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    off, _ = sft.load_model(path, lora=lora_run(rank=4, alpha=8.0))  # --lora-dropout 0: a key changes nothing
    adapters = [
        m for _, m in nnx.iter_modules(sft.lora_dropout(off, jax.random.key(3))) if isinstance(m, sft.LoRALinear)
    ]
    assert adapters and all(m.dropout_key is None for m in adapters)
    streams = [sft.dropout_key(jax.random.key(0), s) for s in (0, 1)] + list(jax.random.split(jax.random.key(0), 3))
    assert len({np.asarray(jax.random.key_data(k)).tobytes() for k in streams}) == 5  # a step's own, apart


@pytest.mark.parametrize("script", [sft, rm])
def test_only_the_adapters_and_a_score_head_train_and_the_base_stays_bit_identical(hf_model, script):
    _, _, path = hf_model
    arch = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[hf_model[0]]
    graphdef, params = nnx.split(
        sft.load_model(path, architecture=arch if script is rm else None, lora=lora_run(rank=2, targets="q_proj"))[0]
    )
    before = flat(params)
    tx = optax.adam(1e-2)
    opt_state = tx.init(sft.split_trained(params)[0])
    trained = {k for k in before if k[-1] in ("lora_a", "lora_b") or k[0] == "score"}
    assert sum(x.size for x in jax.tree.leaves(opt_state)) == 1 + 2 * sum(before[k].size for k in trained)  # m, v
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 90, (2, 4, 10)).astype(np.int32)
    if script is sft:
        batch = {
            "tokens": tokens,
            "attention_mask": np.ones_like(tokens, bool),
            "loss_mask": np.ones_like(tokens, bool),
        }
    else:
        pairs = rng.integers(4, 90, (2, 2, 4, 10)).astype(np.int32)
        batch = {"tokens": pairs, "mask": np.ones_like(pairs, bool), "gold": np.zeros((2, 2, 4), np.float32)}
    for _ in range(3):
        params, opt_state, metrics = script.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
    after = flat(params)
    assert np.isfinite(float(metrics["loss"]))
    for k in before:
        if k in trained:
            assert not np.array_equal(before[k], after[k]), k
        else:
            np.testing.assert_array_equal(before[k], after[k], err_msg=str(k))
    assert any(k[0] == "score" for k in trained) == (script is rm)


def test_resume_is_bit_exact_with_lora(tmp_path, tiny_sft, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the film", "completion": f" was {w}"} for w in "ab" * 20])
    flags = dict(base_model=str(tiny_sft), dataset=str(data), max_seq_len=16, batch_size=8, max_steps=4, lora_rank=2)
    flags |= dict(lora_dropout=0.25)  # the units dropped in a step are the step's: the same after a resume
    flags |= dict(warmup_steps=1, eval_every=4, num_samples=0, checkpoint_every=2, learning_rate=1e-2)
    straight = make_args(sft, **flags, output_dir=str(tmp_path / "a"), checkpoint_dir=str(tmp_path / "ca"))
    sft.main(straight)
    args = make_args(sft, **flags, output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "cb"))
    kill_during_call(monkeypatch, sft, "train_step", 4, lambda: sft.main(args))  # dies in step 4; step 2 is saved
    sft.main(make_args(sft, **{**vars(args), "resume": True}))
    (_, a), (_, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
    adapters = sum(x.size for k, x in traverse_util.flatten_dict(a["params"]).items() if "lora" in str(k))
    moments = sum(x.size for x in jax.tree.leaves(a["opt_state"]) if np.asarray(x).dtype.kind == "f")
    assert moments == 2 * adapters > 0  # AdamW's m and v of the adapters, nothing of the base


SMOKE = {
    "sft.py": lambda p, tmp: (
        dict(base_model=p / "sft", dataset=write_jsonl(tmp / "d.jsonl", [{"text": "a b"}] * 40))
        | dict(max_seq_len=16, batch_size=8, max_steps=2, warmup_steps=1, eval_every=2, num_samples=0)
    ),
    "reward_model.py": lambda p, tmp: (
        dict(sft_model=p / "sft", dataset=tmp / "pairs.jsonl", batch_size=16)
        | dict(num_epochs=1, max_seq_len=24, norm_prompts=16, response_length=6, eval_every=1)
    ),
    "rlhf_ppo.py": lambda p, tmp: (
        dict(sft_model=p / "sft", reward_model=p / "rm", dataset=p / "prompts.jsonl")
        | dict(response_length=6, batch_size=8, total_episodes=16, ppo_epochs=1, eval_prompts=8, eval_every=2)
    ),
    "dpo.py": lambda p, tmp: (
        dict(sft_model=p / "sft", reward_model=p / "rm", dataset=tmp / "pairs.jsonl")
        | dict(max_seq_len=24, batch_size=16, max_steps=2, eval_prompts=8, eval_every=2, response_length=6)
    ),
    "grpo.py": lambda p, tmp: (
        dict(sft_model=p / "sft", dataset=p / "prompts.jsonl", eval_dataset=p / "prompts.jsonl")
        | dict(response_length=6, group_size=4, batch_size=8, max_steps=2, eval_prompts=8, eval_every=2)
    ),
}


@pytest.mark.parametrize("script", list(SMOKE))
def test_each_script_trains_adapters_on_the_targets_alone_and_exports_both(
    script, tmp_path, tiny_pipeline, capsys, monkeypatch
):
    """Each script runs with --lora-rank on the attention's q and v projections: its merged export differs from the
    base in those weights (and a reward model's score head) and nowhere else, and the PEFT adapter is written. Its
    training forward passes get --lora-dropout keys: the policy's, and PPO's value model's, a key of its own."""
    pipeline, _ = tiny_pipeline
    words = "the film was great good bad awful boring".split()
    rows = [
        {"prompt": f"{words[i % 8]} {words[(i + 3) % 8]}", "chosen": " good", "rejected": " bad"} for i in range(48)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    flags = SMOKE[script](pipeline, tmp_path) | dict(lora_rank=2, lora_alpha=64.0, lora_targets="q_proj,v_proj")
    flags |= dict(output_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ck", num_devices=1, learning_rate=0.05)
    module = {"sft.py": sft, "reward_model.py": rm, "rlhf_ppo.py": ppo, "dpo.py": dpo, "grpo.py": grpo}[script]
    dropped, lora_dropout = [], module.lora_dropout  # the models the training steps trace with a dropout key

    def spy(model, key):
        dropped.extend([] if key is None else [model.cfg.is_score_model])
        return lora_dropout(model, key)

    monkeypatch.setattr(module, "lora_dropout", spy)
    flags |= dict(lora_dropout=0.1)
    module.main(
        make_args(module, **{k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}, save_adapter=True)
    )
    printed = capsys.readouterr().out
    from safetensors.numpy import load_file

    base_dir = pipeline / "sft"
    base, out = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    changed = {k for k in out if k not in base or not np.array_equal(out[k], base[k])}
    assert {k.split(".")[-2] for k in changed} == {"q_proj", "v_proj"} | (
        {"score"} if script == "reward_model.py" else set()
    )
    adapter = json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_dir) and adapter["r"] == 2 and adapter["lora_dropout"] == 0.1
    score_model = script == "reward_model.py"  # PPO: the policy and the value model (a reward model's copy)
    assert set(dropped) == ({False, True} if script == "rlhf_ppo.py" else {score_model})
    if script in ("rlhf_ppo.py", "dpo.py"):  # π_ref, the base: the trained policy's final KL to it is not 0
        assert float(re.search(r"^final: .*?kl (-?[\d.]+)", printed, re.M).group(1)) > 1e-3, printed[-1500:]


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (dict(lora_rank=-1), "--lora-rank -1: must be >= 0"),
        (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha 0.0: must be > 0"),
        (dict(lora_rank=4, lora_targets="q_proj,qkv"), r"--lora-targets q_proj,qkv: \['qkv'\] not among"),
        (dict(save_adapter=True), "--save-adapter needs --lora-rank > 0"),
        (dict(lora_rank=4, lora_dropout=1.0), r"--lora-dropout 1.0: must be in \[0, 1\)"),
    ],
)
def test_bad_lora_flags_are_refused_at_start_up_naming_the_flag(run, message, tmp_path):
    bad = sft.Run("t", str(tmp_path / "out"), str(tmp_path / "ck"), **run)
    with pytest.raises(ValueError, match=message):
        sft.init_devices(bad)


def test_lora_from_scratch_and_on_non_float_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--lora-rank: LoRA adapts a pretrained --base-model"):
        sft.main(
            make_args(sft, **TINY, lora_rank=4, output_dir=str(tmp_path / "o"), checkpoint_dir=str(tmp_path / "c"))
        )
    from safetensors.numpy import load_file, save_file

    make_hf_model("llama", tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = np.clip(tensors[name] * 100, -127, 127).astype(np.int8)  # as a quantised checkpoint stores it
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=f"--base-model {tmp_path / 'm'}: '{name}' is int8; only float weights"):
        sft.load_model(tmp_path / "m", flag="--base-model", lora=lora_run())


def random_adapters(params, seed=0):
    rng = np.random.default_rng(seed)
    lora = nnx.filter_state(params, nnx.LoRAParam)
    return nnx.merge_state(params, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32), lora))


def test_ppo_grpo_and_dpo_read_pi_ref_as_the_sft_model_with_lora(tiny_pipeline, tmp_path):
    """With LoRA there is no reference copy: PPO's and GRPO's reference log-probs and DPO's implicit rewards, with
    trained (random) adapters, are those of the SFT model loaded without adapters."""
    from test_grpo import setup_from
    from test_grpo import tiny_args as grpo_args
    from test_ppo import setup as ppo_setup
    from test_ppo import tiny_args as ppo_args

    pipeline, prompts = tiny_pipeline
    base_graph, base_params = nnx.split(sft.load_model(pipeline / "sft")[0])
    base_logprobs = lambda tokens, mask, responses, T: ppo.response_logprobs(  # noqa: E731
        base_graph, base_params, tokens, mask, responses, T
    )
    s = ppo_setup(ppo_args(pipeline, prompts, lora_rank=2))
    assert s.frozen["ref"] is None
    params = s.params | {"policy": random_adapters(s.params["policy"])}
    responses, logprobs = ppo.generate(s.args, s.models, params, s.q, s.qm, jax.random.key(0))
    roll = ppo.score_rollout(s.args, s.models, params, s.frozen, s.q, s.qm, responses, logprobs)
    want = base_logprobs(roll["tokens"], roll["mask"], responses, s.args.temperature)
    np.testing.assert_allclose(roll["ref_logprobs"], want, atol=1e-5)
    assert np.abs(np.asarray(roll["logprobs"] - roll["ref_logprobs"])[np.asarray(roll["response_mask"])]).max() > 0.01

    args, tok, graphdef, params, frozen, train = setup_from(
        grpo_args(pipeline / "sft", tmp_path, prompts, lora_rank=2, reward_fn=("length_band",), reward_weights=None)
    )
    assert frozen["ref"] is None
    q, qm, columns = grpo.prompt_batch(args, train, 0)
    batch, *_ = grpo.sample_and_score(
        args, graphdef, None, tok, random_adapters(params), frozen, q, qm, columns, jax.random.key(1), True
    )
    want = base_logprobs(batch["tokens"], batch["mask"], batch["completions"], args.temperature)
    np.testing.assert_allclose(batch["ref_logprobs"], want, atol=1e-5)

    words = "the film was great good bad awful boring".split()
    rows = [
        {"prompt": f"{words[i % 8]} {words[(i + 3) % 8]}", "chosen": " good", "rejected": " bad"} for i in range(24)
    ]
    flags = dict(dataset=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), max_seq_len=24, batch_size=4, beta=0.5)
    dargs = make_args(dpo, sft_model=str(pipeline / "sft"), reference="on-the-fly", lora_rank=2, **flags)
    tok, eos, pad = dpo.load_tokenizer(dargs.sft_model)
    data = dpo.load_preferences(dargs, tok, eos, pad)[0]
    pairs = {k: v[:, :4] for k, v in data.items()}  # [2, 4, ...]
    graphdef, params = nnx.split(dpo.load_model(dargs.sft_model, lora=dargs.run)[0])
    params = random_adapters(params)
    ratio = dpo.pair_logps(graphdef, params, pairs)[0] - dpo.pair_logps(base_graph, base_params, pairs)[0]
    tx = optax.sgd(0.0)  # train_step donates params: they are read before
    step = dpo.train_step(dargs, graphdef, tx, params, tx.init(sft.split_trained(params)[0]), None,
                          jax.tree.map(lambda x: x[None], pairs), jax.random.key(0))[2]  # fmt: skip
    np.testing.assert_allclose(step["rewards/chosen"], 0.5 * ratio[0].mean(), rtol=1e-4, atol=1e-6)
    assert abs(float(step["rewards/chosen"])) > 1e-3
