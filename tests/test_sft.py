"""sft.py: data formats and errors, loss masking, sharding, a smoke run, resume, and the transformers export."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_as_accurate, assert_same_params, kill_during_call, read_checkpoint, tree_digest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import sft
from common import logprobs_from_logits

TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=48,
    batch_size=8,
    max_steps=6,
    warmup_steps=2,
    eval_every=3,
    log_every=2,
    checkpoint_every=2,
    eval_examples=16,
    num_samples=2,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def pc_dataset(tmp_path):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "actor", "great", "boring", "the", "a", "was"]
    rows = [
        {"prompt": " ".join(rng.choice(words, 5)) + ":", "completion": " " + " ".join(rng.choice(words, 8))}
        for _ in range(80)
    ]
    return write_jsonl(tmp_path / "pc.jsonl", rows)


def tiny_args(tmp_path, **kw):
    return sft.Args(**{**TINY, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"), **kw})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "bad.jsonl:2: invalid JSON"),
        ('{"prompt": "p"}', "bad.jsonl:2: missing field 'completion'"),
        ('{"completion": "c"}', "bad.jsonl:2: missing field 'prompt'"),
        ('{"text": "   "}', "bad.jsonl:2: field 'text' must be a non-empty string"),
        ('{"prompt": "p", "completion": 3}', "bad.jsonl:2: field 'completion' must be a non-empty string"),
        ('["text"]', "bad.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(ValueError, match=message):
        sft.read_jsonl(path)


def test_text_and_prompt_completion_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, "", {"prompt": "q", "completion": "r"}])
    assert sft.read_jsonl(path) == [{"prompt": "", "completion": "a b"}, {"prompt": "q", "completion": "r"}]


def test_loss_only_on_completion_tokens(tmp_path, pc_dataset):
    tok = sft.train_tokenizer([e["prompt"] + e["completion"] for e in sft.read_jsonl(pc_dataset)], 300, tmp_path)
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    assert eos != pad
    examples = [{"prompt": "good film:", "completion": " great plot"}, {"prompt": "", "completion": "bad actor"}]
    data, truncated = sft.tokenize(tok, examples, eos, pad, 16)
    n_prompt = len(tok.encode("good film:").ids)
    n_completion = len(tok.encode(" great plot", add_special_tokens=False).ids)
    row = data["loss_mask"][0]
    assert (
        not row[:n_prompt].any()
        and row[n_prompt : n_prompt + n_completion + 1].all()
        and not row[n_prompt + n_completion + 1 :].any()
    )
    assert data["tokens"][0, n_prompt + n_completion] == eos and truncated == 0
    assert data["loss_mask"][1].sum() == data["attention_mask"][1].sum()  # plain text: every token is a target
    # the loss equals the mean NLL of exactly the completion+EOS targets
    cfg = sft.ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    graphdef, params = nnx.split(sft.Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    loss_sum, count = sft.nll(params, graphdef, batch)
    logits, _ = nnx.merge(graphdef, params)(
        batch["tokens"], sft.positions_from_mask(batch["attention_mask"]), batch["attention_mask"]
    )
    logp = np.asarray(logprobs_from_logits(logits[:, :-1], batch["tokens"][:, 1:]))
    targets = data["loss_mask"][:, 1:]
    np.testing.assert_allclose(float(loss_sum), -logp[targets].sum(), rtol=1e-5)
    assert int(count) == targets.sum() == n_completion + 1 + data["loss_mask"][1].sum() - 1


def test_truncation_is_reported(tmp_path, capsys, pc_dataset):
    tok = sft.train_tokenizer(["a b c d e f g"], 300, tmp_path)
    data, truncated = sft.tokenize(tok, [{"prompt": "", "completion": "a b c d e f g " * 20}], 0, 1, 8)
    assert truncated == 1 and data["attention_mask"].all()
    sft.load_data(tiny_args(tmp_path, dataset=str(pc_dataset), max_seq_len=8), tok, 0, 1)
    assert "truncated to 8 tokens" in capsys.readouterr().out


def tiny_model_and_batch(seed=0, accum=1, rows=8, length=24, vocab=64):
    """A tiny random model and a batch [accum, rows / accum, length] with unequal token counts per row."""
    cfg = sft.ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    rng = np.random.default_rng(seed)
    mask = np.arange(length)[None] < rng.integers(4, length + 1, (rows, 1))
    loss_mask = mask & (np.arange(length)[None] >= rng.integers(0, 3, (rows, 1)))  # a few prompt tokens masked
    batch = {
        "tokens": rng.integers(0, vocab, (rows, length)).astype(np.int32),
        "attention_mask": mask,
        "loss_mask": loss_mask,
    }
    return sft.Transformer(cfg, rngs=nnx.Rngs(seed)), {
        k: v.reshape(accum, rows // accum, length) for k, v in batch.items()
    }


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_steps_equal_single_device(fsdp):
    """Four real AdamW steps (no warm-up: every step moves the weights) on 1 and on 4 devices."""
    assert jax.device_count() == 4
    tx, _ = sft.make_optimizer(sft.Args(batch_size=8, learning_rate=1e-2, warmup_steps=0, max_steps=4))
    out = {}
    for n in (1, 4):
        mesh = sft.make_mesh(n)
        model, batch = tiny_model_and_batch()
        graphdef, params = nnx.split(model)
        params = sft.shard(params, mesh, fsdp)
        opt_state = sft.shard(tx.init(params), mesh, fsdp)
        if fsdp and n == 4:
            assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves((params, opt_state)))
        b = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(None, "data")))
        losses = []
        for _ in range(4):
            params, opt_state, metrics = sft.train_step(graphdef, tx, params, opt_state, b)
            losses.append(float(metrics["loss"]))
        out[n] = losses, jax.device_get(params)
    assert out[1][0][3] < out[1][0][0]  # it learns
    np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    """Three real steps with 4 accumulated micro-batches of unequal token counts equal three steps on the whole
    batch (the token mean over all micro-batches, not a mean of per-micro-batch means). Plain SGD, so the
    comparison is of the gradients themselves, not of Adam's normalisation of them."""
    tx = optax.sgd(0.5)
    out = []
    for accum in (1, 4):
        model, batch = tiny_model_and_batch(seed=1, accum=accum)
        graphdef, params = nnx.split(model)
        opt_state, losses = tx.init(params), []
        for _ in range(3):
            params, opt_state, metrics = sft.train_step(graphdef, tx, params, opt_state, batch)
            losses.append(float(metrics["loss"]))
        out.append((losses, params))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_a_step_lowers_its_own_loss():
    model, batch = tiny_model_and_batch(seed=2)
    graphdef, params = nnx.split(model)
    tx, _ = sft.make_optimizer(sft.Args(learning_rate=1e-2, warmup_steps=0))
    before = sft.nll(params, graphdef, {k: v[0] for k, v in batch.items()})
    params, _, _ = sft.train_step(graphdef, tx, params, tx.init(params), batch)
    after = sft.nll(params, graphdef, {k: v[0] for k, v in batch.items()})
    assert float(after[0]) < float(before[0]) - 0.01 and int(after[1]) == int(before[1])


def test_a_non_finite_step_leaves_the_state_unchanged():
    model, batch = tiny_model_and_batch(seed=3)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 1e30, params)  # overflows to inf / NaN in the forward pass
    tx, _ = sft.make_optimizer(sft.Args(learning_rate=1e-2, warmup_steps=0))
    opt_state = tx.init(params)
    new_params, new_opt_state, metrics = sft.train_step(graphdef, tx, jax.tree.map(jnp.copy, params), opt_state, batch)
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    for a, b in zip(jax.tree.leaves((new_params, new_opt_state)), jax.tree.leaves((params, tx.init(params)))):
        np.testing.assert_array_equal(a, b)


def test_smoke_run_exports_a_transformers_checkpoint(tmp_path, pc_dataset):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loss = sft.main(tiny_args(tmp_path, dataset=str(pc_dataset), num_devices=2))
    assert np.isfinite(loss)
    out = tmp_path / "out"
    ours, cfg = sft.load_model(out)
    tok, eos, pad = sft.load_tokenizer(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "good film: great plot"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (eos, pad) and eos != pad
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([tok.encode(text).ids])
    with torch.no_grad():
        theirs, exact = (m(torch.tensor(ids)).logits.numpy() for m in (hf, copy.deepcopy(hf).double()))
    mine = np.asarray(ours(jnp.asarray(ids), sft.positions_from_mask(jnp.ones_like(ids)), jnp.ones_like(ids))[0])
    assert_as_accurate(mine, theirs, exact, what="exported model's logits")
    # fine-tuning the exported checkpoint as a --base-model works too (with its own tokenizer)
    again = sft.main(
        tiny_args(
            tmp_path,
            dataset=str(pc_dataset),
            base_model=str(out),
            max_steps=2,
            output_dir=str(tmp_path / "out2"),
            checkpoint_dir=str(tmp_path / "ck2"),
        )
    )
    assert np.isfinite(again) and (tmp_path / "out2" / "tokenizer.json").exists()


def test_resume_after_interruption_gives_the_uninterrupted_run_exactly(tmp_path, pc_dataset, monkeypatch, capsys):
    """A run killed during step 6 (state saved at steps 2 and 4) and resumed ends with the weights and optimizer state
    of an uninterrupted run, bit for bit; a new run refuses to overwrite the unfinished state; the exported model is
    the trained state."""
    straight = tiny_args(tmp_path / "straight", dataset=str(pc_dataset), max_steps=6, checkpoint_every=2)
    sft.main(straight)
    args = tiny_args(tmp_path, dataset=str(pc_dataset), max_steps=6, checkpoint_every=2)
    # dies during step 6: steps 2 and 4 were checkpointed, step 5 was not
    kill_during_call(monkeypatch, sft, "train_step", 6, lambda: sft.main(args))
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="unfinished run"):
        sft.main(args)
    capsys.readouterr()
    sft.main(sft.Args(**{**vars(args), "resume": True}))
    assert "resuming from" in (out := capsys.readouterr().out) and "at step 4" in out
    (step_a, a), (step_b, b) = read_checkpoint(straight.checkpoint_dir), read_checkpoint(args.checkpoint_dir)
    assert step_a == step_b == 6
    assert {int(c) for c in jax.tree.leaves(a["opt_state"]) if np.asarray(c).dtype.kind == "i"} == {6}  # 6 steps taken
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # parameters and AdamW state
        np.testing.assert_array_equal(x, y)
    assert_same_params(sft.load_model(tmp_path / "out")[0], a["params"])  # the export is the trained state
    assert_same_params(sft.load_model(tmp_path / "straight" / "out")[0], a["params"])


def test_a_diverging_run_stops_and_leaves_the_output_dir_unchanged(tmp_path, pc_dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a model trained earlier")
    digest = tree_digest(out)
    args = tiny_args(tmp_path, dataset=str(pc_dataset), learning_rate=1e12, max_steps=6, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite loss .* was not written"):
        sft.main(args)
    assert tree_digest(out) == digest
    step, state = read_checkpoint(args.checkpoint_dir)  # the last good state is finite and resumable
    assert step >= 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_save_model_refuses_non_finite_weights(tmp_path):
    model, _ = tiny_model_and_batch()
    sft.save_model(tmp_path / "m", model)
    digest = tree_digest(tmp_path / "m")
    model.layers[0].mlp.up_proj.kernel[...] = model.layers[0].mlp.up_proj.kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="up_proj.*non-finite"):
        sft.save_model(tmp_path / "m", model)
    assert tree_digest(tmp_path / "m") == digest


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_size": 6, "num_devices": 4}, "--batch-size 6"),
        ({"max_seq_len": 1}, "--max-seq-len 1"),
        ({"learning_rate": 0.0}, "--learning-rate"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"hidden_size": 30}, "--hidden-size 30"),
        ({"num_kv_heads": 3}, "--num-kv-heads 3"),
        ({"max_seq_len": 4096}, "--max-seq-len 4096: more than the model's context"),
        ({"batch_size": 128}, "more than the 72 training examples"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tmp_path, pc_dataset, override, message):
    with pytest.raises(ValueError, match=message):
        sft.main(tiny_args(tmp_path, dataset=str(pc_dataset), **override))


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        sft.read_jsonl(path)
