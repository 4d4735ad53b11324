"""sft.py: data formats and errors, loss masking, sharding, a smoke run, resume, and the transformers export."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import sft
from common import logprobs_from_logits
from conftest import assert_as_accurate

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=48, batch_size=8, max_steps=6, warmup_steps=2, eval_every=3, log_every=2,
            checkpoint_every=2, eval_examples=16, num_samples=2)  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def pc_dataset(tmp_path):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "actor", "great", "boring", "the", "a", "was"]
    rows = [{"prompt": " ".join(rng.choice(words, 5)) + ":", "completion": " " + " ".join(rng.choice(words, 8))}
            for _ in range(80)]  # fmt: skip
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
    assert not row[:n_prompt].any() and row[n_prompt : n_prompt + n_completion + 1].all() and not row[n_prompt + n_completion + 1 :].any()
    assert data["tokens"][0, n_prompt + n_completion] == eos and truncated == 0
    assert data["loss_mask"][1].sum() == data["attention_mask"][1].sum()  # plain text: every token is a target
    # the loss equals the mean NLL of exactly the completion+EOS targets
    cfg = sft.ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    graphdef, params = nnx.split(sft.Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    loss_sum, count = sft.nll(params, graphdef, batch)
    logits, _ = nnx.merge(graphdef, params)(batch["tokens"], sft.positions_from_mask(batch["attention_mask"]), batch["attention_mask"])
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


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_steps_equal_single_device(fsdp):
    assert jax.device_count() == 4
    args = sft.Args(batch_size=8, learning_rate=1e-2, warmup_steps=1)
    cfg = sft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    rng = np.random.default_rng(0)
    mask = np.arange(24)[None, None] < rng.integers(10, 25, (1, 8, 1))
    batch = {"tokens": rng.integers(0, 64, (1, 8, 24)).astype(np.int32), "attention_mask": mask, "loss_mask": mask}
    losses = {}
    for n in (1, 4):
        mesh = sft.make_mesh(n)
        graphdef, params = nnx.split(sft.Transformer(cfg, rngs=nnx.Rngs(0)))
        tx, _ = sft.make_optimizer(args)
        params = sft.shard(params, mesh, fsdp)
        opt_state = sft.shard(tx.init(params), mesh, fsdp)
        if fsdp and n == 4:
            assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
        b = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(None, "data")))
        losses[n] = []
        for _ in range(3):
            params, opt_state, metrics = sft.train_step(graphdef, tx, params, opt_state, b)
            losses[n].append(float(metrics["loss"]))
    assert losses[1][2] < losses[1][0]  # it learns
    np.testing.assert_allclose(losses[4], losses[1], atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_one_big_batch():
    args = sft.Args(learning_rate=1e-2, warmup_steps=1)
    cfg = sft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=8)  # fmt: skip
    rng = np.random.default_rng(1)
    mask = np.arange(16)[None] < rng.integers(4, 17, (8, 1))  # unequal token counts per micro-batch
    batch = {"tokens": rng.integers(0, 64, (8, 16)).astype(np.int32), "attention_mask": mask, "loss_mask": mask}
    out = []
    for accum in (1, 4):
        graphdef, params = nnx.split(sft.Transformer(cfg, rngs=nnx.Rngs(0)))
        tx, _ = sft.make_optimizer(args)
        params, _, metrics = sft.train_step(graphdef, tx, params, tx.init(params),
                                            {k: v.reshape(accum, 8 // accum, 16) for k, v in batch.items()})  # fmt: skip
        out.append((float(metrics["loss"]), params))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


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
    again = sft.main(tiny_args(tmp_path, dataset=str(pc_dataset), base_model=str(out), max_steps=2,
                               output_dir=str(tmp_path / "out2"), checkpoint_dir=str(tmp_path / "ck2")))  # fmt: skip
    assert np.isfinite(again) and (tmp_path / "out2" / "tokenizer.json").exists()


def test_resume_after_interruption_continues_from_saved_step(tmp_path, pc_dataset, monkeypatch, capsys):
    args = tiny_args(tmp_path, dataset=str(pc_dataset), max_steps=6, checkpoint_every=2)
    sft.main(tiny_args(tmp_path / "straight", dataset=str(pc_dataset), max_steps=6, checkpoint_every=2))
    straight, _ = sft.load_model(tmp_path / "straight" / "out")

    real_step, calls = sft.train_step, []

    def crashing_step(*a, **kw):
        calls.append(1)
        if len(calls) == 6:  # dies during step 6: steps 2 and 4 were checkpointed, step 5 was not
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(sft, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        sft.main(args)
    monkeypatch.setattr(sft, "train_step", real_step)
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    sft.main(sft.Args(**{**vars(args), "resume": True}))
    assert "resuming from" in (out := capsys.readouterr().out) and "at step 4" in out
    resumed, _ = sft.load_model(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_allclose(a, b, atol=1e-6)
