"""sft.py: data formats and errors, loss masking, sharding, a smoke run, resume, and the transformers export."""

import copy
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    RecordingWriter,
    assert_as_accurate,
    assert_same_params,
    kill_during_call,
    make_args,
    read_checkpoint,
    tree_digest,
)
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
    return make_args(
        sft, **{**TINY, "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ckpt"), **kw}
    )


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


def test_the_logged_samples_prompts_are_the_untrained_tokens_or_a_texts_first_8():
    """A prompt (loss from token 4, or 2) gives its untrained tokens; a text, trained from token 0 or after a BOS (from
    token 1), gives its first 8 tokens, not a lone BOS; only the first n held-out examples."""
    tokens, loss_mask = np.arange(50).reshape(5, 10), np.zeros((5, 10), bool)
    for row, first in enumerate([0, 1, 4, 2, 3]):
        loss_mask[row, first:] = True
    expected = [list(range(8)), list(range(10, 18)), [20, 21, 22, 23], [30, 31]]
    assert sft.sample_prompt_ids({"tokens": tokens, "loss_mask": loss_mask}, 4) == expected


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
    tx, _ = sft.make_optimizer(make_args(sft, batch_size=8, learning_rate=1e-2, warmup_steps=0, max_steps=4))
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
            params, opt_state, metrics = sft.train_step(graphdef, tx, params, opt_state, b, jax.random.key(0))
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
            params, opt_state, metrics = sft.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
            losses.append(float(metrics["loss"]))
        out.append((losses, params))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_a_step_lowers_its_own_loss():
    model, batch = tiny_model_and_batch(seed=2)
    graphdef, params = nnx.split(model)
    tx, _ = sft.make_optimizer(make_args(sft, learning_rate=1e-2, warmup_steps=0))
    before = sft.nll(params, graphdef, {k: v[0] for k, v in batch.items()})
    params, _, _ = sft.train_step(graphdef, tx, params, tx.init(params), batch, jax.random.key(0))
    after = sft.nll(params, graphdef, {k: v[0] for k, v in batch.items()})
    assert float(after[0]) < float(before[0]) - 0.01 and int(after[1]) == int(before[1])


def test_a_non_finite_step_leaves_the_state_unchanged():
    model, batch = tiny_model_and_batch(seed=3)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 1e30, params)  # overflows to inf / NaN in the forward pass
    tx, _ = sft.make_optimizer(make_args(sft, learning_rate=1e-2, warmup_steps=0))
    opt_state = tx.init(params)
    new_params, new_opt_state, metrics = sft.train_step(
        graphdef, tx, jax.tree.map(jnp.copy, params), opt_state, batch, jax.random.key(0)
    )
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    for a, b in zip(jax.tree.leaves((new_params, new_opt_state)), jax.tree.leaves((params, tx.init(params)))):
        np.testing.assert_array_equal(a, b)


def test_smoke_run_exports_a_transformers_checkpoint(tmp_path, pc_dataset, monkeypatch, capsys):
    """A run on 2 devices: every number it logs and prints at the end (check_what_sft_logs_and_prints), then the
    export opened by transformers, then a --base-model run on it, in the finished run's checkpoint dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = tiny_args(tmp_path, dataset=str(pc_dataset), num_devices=2)
    loss, record = run_recorded(monkeypatch, capsys, args)
    check_what_sft_logs_and_prints(args, loss, record, sft.load_tokenizer(tmp_path / "out"))
    monkeypatch.undo()
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
    # fine-tuning the exported checkpoint as a --base-model works too (with its own tokenizer); the first run's
    # checkpoint dir is marked finished, so this run may replace it; its last step, off the --checkpoint-every grid,
    # is saved too
    args = tiny_args(tmp_path, dataset=str(pc_dataset), base_model=str(out), max_steps=3, output_dir=str(out) + "2")
    again = sft.main(args)
    assert np.isfinite(again) and (tmp_path / "out2" / "tokenizer.json").exists()
    assert read_checkpoint(args.run.checkpoint_dir)[0] == 3 and args.run.checkpoint_every == 2
    assert (Path(args.run.checkpoint_dir) / "FINISHED").read_text() == f"exported to {args.run.output_dir}\n"


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
    sft.main(make_args(sft, **{**vars(args), "resume": True}))
    assert "resuming from" in (out := capsys.readouterr().out) and "at step 4" in out
    (step_a, a), (step_b, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
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
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite loss .* was not written") as error:
        sft.main(args)
    kept = f"in {Path(args.run.checkpoint_dir).absolute()} (--resume), and {args.run.output_dir} was not written"
    assert kept in str(error.value)
    assert tree_digest(out) == digest
    step, state = read_checkpoint(args.run.checkpoint_dir)  # the last good state is finite and resumable
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


# ---------------------------------------------------------------- issue 25: held-out examples, evaluation, logs
# A chat template that writes no EOS (`eos` is never defined); the cut-off test drops that condition, so the tokenizer's
# EOS ends each assistant turn.
SPLIT_CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tagged_rows(fmt, n):
    """n JSONL rows of format fmt, row i tagged "exII" at its start, with prompts and completions of unequal lengths
    (so that a short --max-seq-len leaves some examples whole, some truncated, some with no completion token)."""
    rows = []
    for i in range(n):
        words = " ".join(["good film", "bad plot", "the actor"][j % 3] for j in range(i % 5))
        tail = " ".join(["dull", "fun", "great plot"][j % 3] for j in range(1 + i % 4))
        if fmt == "text":
            rows.append({"text": f"ex{i:02d} {words} {tail}"})
        elif fmt == "prompt/completion":
            rows.append({"prompt": f"ex{i:02d} {words}:", "completion": f" {tail}"})
        elif i % 2:  # conversational: TRL's prompt/completion lists and messages, alternately
            prompt = [{"role": "system", "content": f"ex{i:02d} be brief"}, {"role": "user", "content": words or "hi"}]
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": tail}]})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"ex{i:02d} {words}"},
                        {"role": "assistant", "content": tail},
                    ]
                }
            )
    return rows


def decoded_tags(tok, data):
    """The example tag ("exII" -> II) of each row of tokenized data, read back from its decoded tokens."""
    import re

    tags = []
    for tokens, mask in zip(data["tokens"], data["attention_mask"]):
        found = re.findall(r"ex(\d\d)", tok.decode(tokens[mask].tolist()))
        assert len(found) == 1
        tags.append(int(found[0]))
    return tags


@pytest.mark.parametrize("fmt", ["text", "prompt/completion", "conversational"])
@pytest.mark.parametrize("val_fraction, n_val", [(0.3, 6), (0.01, 1)])  # int(23 x 0.3) = 6 (round: 7); max(1, 0)
def test_the_held_out_examples_of_a_dataset_are_disjoint_sized_and_fixed(tmp_path, capsys, fmt, val_fraction, n_val):
    """load_data on a --dataset of 23 examples: the held-out side has int(23 x --val-fraction) examples (at least 1)
    of the file's, none of them trained on, and the two sides hold every example once; the split is the same on
    every call and for every --seed (a later run with another seed must not evaluate on what an earlier one trained
    on), and it is shuffled (neither the file's head nor its tail). The examples are identified by tags decoded from
    the returned token arrays, so the arrays are checked, not just the lists. The lines load_data prints for each side
    (examples, loss tokens, truncated, with no completion token left, conversations with no EOS) are counted
    independently from the raw strings, with --max-seq-len 12 truncating some."""
    N, L = 23, 24 if fmt == "conversational" else 12
    rows = tagged_rows(fmt, N)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = sft.train_tokenizer([json.dumps(r) for r in rows], 300, tmp_path / "tok")
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    chat = sft.ChatTemplate(SPLIT_CHAT, (("eos_token", "<|endoftext|>"),), "test template")
    sides = []
    for seed in (1, 2):
        capsys.readouterr()
        args = tiny_args(tmp_path, dataset=str(path), val_fraction=val_fraction, max_seq_len=L, seed=seed)
        train, val = sft.load_data(args, tok, eos, pad, chat)
        sides.append((decoded_tags(tok, train), decoded_tags(tok, val)))
        printed = capsys.readouterr().out
    (train_tags, val_tags), again = sides
    assert again == (train_tags, val_tags)  # deterministic, whatever the seed
    assert len(val_tags) == n_val and len(train_tags) == N - n_val
    assert not set(train_tags) & set(val_tags) and sorted(train_tags + val_tags) == list(range(N))
    assert set(val_tags) not in ({*range(n_val)}, {*range(N - n_val, N)})  # shuffled before the split
    # the printed counts, per side, from the raw strings
    for name, tags in (("train", train_tags), ("val", val_tags)):
        if fmt == "conversational":
            # this template writes no EOS: every conversation of the side is reported
            assert f"{name}: {len(tags)} examples, " in printed
            assert f"warning: {len(tags)} {name} conversations train on no EOS token" in printed
            continue
        assert "warning" not in printed
        lengths = []  # (prompt tokens, prompt + completion + EOS tokens)
        for i in tags:
            p, c = rows[i].get("prompt", ""), rows[i].get("text", rows[i].get("completion"))
            n_p = len(tok.encode(p).ids)
            lengths.append((n_p, n_p + len(tok.encode(c, add_special_tokens=False).ids) + 1))
        loss_tokens = sum(max(0, min(n, L) - n_p) for n_p, n in lengths)
        truncated = sum(n > L for _, n in lengths)
        empty = sum(n_p >= L for n_p, _ in lengths)
        line = f"{name}: {len(tags)} examples, {loss_tokens} loss tokens; {truncated} truncated to {L} tokens"
        assert line + (f", {empty} with no completion token left (no loss)\n" if empty else "\n") in printed
    if fmt == "prompt/completion":  # the data hold every case: whole, truncated, and left with no completion token
        n_p = [len(tok.encode(r["prompt"]).ids) for r in rows]
        n = [m + len(tok.encode(r["completion"], add_special_tokens=False).ids) + 1 for m, r in zip(n_p, rows)]
        assert min(n) <= L < max(n) and max(n_p) >= L > min(n_p)


def test_conversations_whose_eos_is_cut_off_are_counted_per_side(tmp_path, capsys):
    """With a template that ends assistant turns with EOS, the warning counts exactly the held-out (and the training)
    conversations whose EOS falls past --max-seq-len (their rendered text's tokens counted independently)."""
    N, L = 23, 24
    rows = tagged_rows("conversational", N)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = sft.train_tokenizer([json.dumps(r) for r in rows], 300, tmp_path / "tok")
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    template = SPLIT_CHAT.replace(" and eos %}", " %}")
    chat = sft.ChatTemplate(template, (("eos_token", "<|endoftext|>"),), "test template")
    train, val = sft.load_data(
        tiny_args(tmp_path, dataset=str(path), val_fraction=0.3, max_seq_len=L), tok, eos, pad, chat
    )
    printed = capsys.readouterr().out
    cut = {}
    for i, r in enumerate(rows):
        messages = r.get("messages") or r["prompt"] + r["completion"]
        text = "".join(
            f"<{m['role']}>{m['content']}" + ("<|endoftext|>" if m["role"] == "assistant" else "") + "\n"
            for m in messages
        )
        ids = tok.encode(text, add_special_tokens=False).ids
        cut[i] = ids.index(eos) >= L
    assert 0 < sum(cut.values()) < N
    for name, data in (("train", train), ("val", val)):
        n_cut = sum(cut[i] for i in decoded_tags(tok, data))
        warning = f"warning: {n_cut} {name} conversations train on no EOS token"
        assert (warning in printed) == (n_cut > 0), (name, n_cut, printed)


def test_without_a_dataset_the_held_out_examples_are_the_eval_reviews(tmp_path, monkeypatch, capsys):
    """The embedded data: SFT trains on movie_reviews("train") and holds out movie_reviews("eval") (the reviews no
    stage trains on; tests/test_data.py checks the real splits are disjoint), whole and in order, whatever
    --val-fraction says: every split is replaced by tagged stand-ins, and the returned arrays are decoded."""
    names = ("train", "labeler", "eval", "rotten_tomatoes")
    splits = {
        s: [f"ex{10 * k + i:02d} {s} review {'good ' * i}" for i in range(3 + 2 * k)] for k, s in enumerate(names)
    }
    monkeypatch.setattr(sft, "movie_reviews", lambda split: splits[split])
    tok = sft.train_tokenizer([t for texts in splits.values() for t in texts], 300, tmp_path / "tok")
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    train, val = sft.load_data(tiny_args(tmp_path, val_fraction=0.5), tok, eos, pad)
    assert decoded_tags(tok, train) == [0, 1, 2] and decoded_tags(tok, val) == [20, 21, 22, 23, 24, 25, 26]
    assert capsys.readouterr().out.startswith("train: 3 examples, ")


@partial(jax.jit, static_argnums=0)
def plain_logits(graphdef, params, tokens):
    """The model's logits [B, T, V] with positions 0, 1, ... and no padding mask."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nnx.merge(graphdef, params)(tokens, positions, jnp.ones(tokens.shape, bool))[0]


def naive_target_nlls(graphdef, params, rows, T=None):
    """Per row [(ids, trained)], the float64 -log p(ids[t] | ids[:t]) of each trained target t >= 1: the logits of a
    right-padded batch with plain positions 0, 1, ... and no padding mask (causal attention never lets a real token
    see the padding after it), then a float64 log-softmax, target by target in a Python loop."""
    T = T or max(len(ids) for ids, _ in rows)
    tokens = np.array([list(ids) + [0] * (T - len(ids)) for ids, _ in rows], np.int32)
    logits = plain_logits(graphdef, params, jnp.asarray(tokens))
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return [
        [-logp[b, t - 1, ids[t]] for t in range(1, len(ids)) if trained[t]] for b, (ids, trained) in enumerate(rows)
    ]


def token_mean(nlls):
    """The mean over every target of every row (a list of lists)."""
    return sum(map(sum, nlls)) / sum(map(len, nlls))


@pytest.mark.parametrize("eval_examples, n", [(5, 5), (0, 7), (100, 7)])
def test_evaluate_is_the_token_mean_nll_of_the_first_eval_examples(eval_examples, n):
    """evaluate() over 7 held-out examples of unequal lengths, prompts masked, in batches of 3 (the last one padded):
    the float64 token mean of -log p over the completion targets of the first --eval-examples of them (0: all; more
    than there are: all), not a mean of per-batch or per-example means, not over prompt tokens, not over the padding
    rows. The plausible wrong values are checked to differ, so the test discriminates."""
    rng = np.random.default_rng(5)
    model, _ = tiny_model_and_batch(seed=4)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)  # larger logits: unequal per-token losses
    L, lengths, prompts = 20, [20, 3, 15, 6, 11, 2, 18], [4, 1, 0, 2, 9, 1, 3]
    rows = [(rng.integers(0, 64, m).tolist(), [t >= p for t in range(m)]) for m, p in zip(lengths, prompts)]
    data = {
        "tokens": np.array([ids + [7] * (L - len(ids)) for ids, _ in rows], np.int32),
        "attention_mask": np.arange(L)[None] < np.array(lengths)[:, None],
        "loss_mask": np.array([tr + [False] * (L - len(tr)) for _, tr in rows]),
    }
    args = make_args(sft, batch_size=3, eval_examples=eval_examples)
    got = sft.evaluate(graphdef, params, data, args, NamedSharding(sft.make_mesh(1), PartitionSpec("data")))
    nlls = naive_target_nlls(graphdef, params, rows)
    right = token_mean(nlls[:n])
    np.testing.assert_allclose(got, right, rtol=2e-6)
    # what a wrong wiring would give differs from it
    all_tokens = naive_target_nlls(graphdef, params, [(ids, [True] * len(ids)) for ids, _ in rows])
    wrong = {
        "mean of per-example means": np.mean([np.mean(x) for x in nlls[:n]]),
        "mean of per-batch means": np.mean([token_mean(nlls[i : min(i + 3, n)]) for i in range(0, n, 3)]),
        "prompt tokens too": token_mean(all_tokens[:n]),
        "one example less": token_mean(nlls[: n - 1]),
        "one example more": token_mean(nlls[: n + 1]) if n < 7 else None,
        "the last n": token_mean(nlls[-n:]) if n < 7 else None,
        "padding repeats the last example": token_mean(nlls[:n] + nlls[n - 1 : n] * (-n % 3)),
    }
    for what, value in wrong.items():
        assert value is None or abs(value - right) > 1e-3 * right, what


def run_recorded(monkeypatch, capsys, args):
    """sft.main(args) with its inputs and outputs recorded: the examples of each side as load_data tokenizes them,
    each train_step's batch, parameters before and after and metrics, each sample_texts call (parameters, prompts,
    key, texts), the writer's logs and stdout. sft's clock advances by exactly 1 s per train_step (and never
    otherwise), so tokens/s is a count."""
    import time
    import types

    record = {"examples": [], "steps": [], "samples": [], "writer": RecordingWriter()}
    clock = [1000.0]
    real_tokenize, real_train_step, real_sample_texts = sft.tokenize, sft.train_step, sft.sample_texts

    def tokenize(tok, examples, *a, **kw):
        record["examples"].append(list(examples))
        return real_tokenize(tok, examples, *a, **kw)

    def train_step(graphdef, tx, params, opt_state, batch, key):
        before, batch_np = jax.device_get(params), jax.device_get(batch)  # before the step donates them
        clock[0] += 1.0
        params, opt_state, metrics = real_train_step(graphdef, tx, params, opt_state, batch, key)
        record["graphdef"] = graphdef
        record["steps"].append((before, batch_np, jax.device_get(params), jax.device_get(metrics)))
        return params, opt_state, metrics

    def sample_texts(step_fn, params, cfg, tok, eos_id, pad_id, prompts, key, **kw):
        texts = real_sample_texts(step_fn, params, cfg, tok, eos_id, pad_id, prompts, key, **kw)
        record["samples"].append((jax.device_get(params), prompts, np.asarray(jax.random.key_data(key)), texts))
        return texts

    monkeypatch.setattr(sft, "tokenize", tokenize)
    monkeypatch.setattr(sft, "train_step", train_step)
    monkeypatch.setattr(sft, "sample_texts", sample_texts)
    monkeypatch.setattr(sft, "summary_writer", lambda args: record["writer"])
    monkeypatch.setattr(sft, "time", types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime))
    capsys.readouterr()
    loss = sft.main(args)
    record["stdout"] = capsys.readouterr().out
    return loss, record


@partial(jax.jit, static_argnums=0)
def plain_token_mean_grads(graphdef, params, tokens, trained):
    """Gradient of the token mean of -log p over the trained targets (plain positions, no padding mask)."""

    def loss(p):
        logp = jax.nn.log_softmax(plain_logits(graphdef, p, tokens)[:, :-1].astype(jnp.float32))
        target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return -(target_logp * trained[:, 1:]).sum() / trained[:, 1:].sum()

    return jax.grad(loss)(params)


def check_what_sft_logs_and_prints(args, loss, record, tokenizer):
    """Every number a run logs and prints at the end, each against its definition computed independently:
    train/loss: the token mean of -log p over the trained targets of the step's batch under the parameters before
      the step (float64 loop); train/grad_norm: the global norm of that mean's gradient; train/lr: the warm-up +
      cosine formula at the step taken; train/tokens_per_sec: the real (not only trained) tokens of the steps since
      the last log, per second; eval/loss: the token mean over the completion targets of the held-out examples (the
      first --eval-examples; each tokenized here by hand), under the parameters after that step; its printed lines
      and the returned value; samples: continuations, by the parameters of that step, of the prompts of the first
      --num-samples held-out examples, a fresh key each evaluation, logged as **prompt**continuation and printed at
      the end. Every batch holds only training examples, and the two sides share none."""
    tok, eos, pad = tokenizer
    train_ex, val_ex = record["examples"]
    assert not {tuple(e.items()) for e in train_ex} & {tuple(e.items()) for e in val_ex}

    def by_hand(e):  # (ids, trained): BPE of the prompt, of the completion, EOS; the loss on completion and EOS
        p, c = tok.encode(e["prompt"]).ids, tok.encode(e["completion"], add_special_tokens=False).ids
        assert len(p) + len(c) + 1 <= args.max_seq_len
        return p + c + [eos], [False] * len(p) + [True] * (len(c) + 1)

    train_ids, val_rows = {tuple(by_hand(e)[0]) for e in train_ex}, [by_hand(e) for e in val_ex]
    graphdef, L, logs = record["graphdef"], args.max_seq_len, record["writer"].scalars
    logged_steps = [k for k in range(1, args.max_steps + 1) if k % args.log_every == 0 or k == args.max_steps]
    eval_steps = [k for k in range(1, args.max_steps + 1) if k % args.eval_every == 0 or k == args.max_steps]
    assert {tag: sorted(v) for tag, v in logs.items()} == {
        **{f"train/{m}": logged_steps for m in ("loss", "grad_norm", "lr", "tokens_per_sec")},
        "eval/loss": eval_steps,
    }
    assert len(record["steps"]) == args.max_steps and len(logged_steps) >= 2 and len(eval_steps) >= 2
    tokens_since_log = 0
    for k, (before, batch, _, _) in enumerate(record["steps"], 1):
        batch = {key: v.reshape(-1, L) for key, v in batch.items()}
        rows = [
            (t[m].tolist(), lm[m].tolist())
            for t, m, lm in zip(*(batch[x] for x in ("tokens", "attention_mask", "loss_mask")))
        ]
        assert all(tuple(ids) in train_ids for ids, _ in rows)  # training examples only
        tokens_since_log += sum(len(ids) for ids, _ in rows)
        if k not in logged_steps:
            continue
        np.testing.assert_allclose(
            logs["train/loss"][k], token_mean(naive_target_nlls(graphdef, before, rows, L)), rtol=2e-6
        )
        tokens = np.array([ids + [pad] * (L - len(ids)) for ids, _ in rows], np.int32)
        trained = np.array([tr + [False] * (L - len(tr)) for _, tr in rows])
        grads = plain_token_mean_grads(graphdef, before, jnp.asarray(tokens), jnp.asarray(trained))
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
        np.testing.assert_allclose(logs["train/grad_norm"][k], norm, rtol=1e-4)
        t, peak, end, W = k - 1, args.learning_rate, 0.1 * args.learning_rate, args.warmup_steps
        D = max(args.max_steps, W + 1)
        lr = peak * t / W if t < W else end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (t - W) / (D - W)))
        np.testing.assert_allclose(logs["train/lr"][k], lr, rtol=1e-6)
        elapsed = k - (max((s for s in logged_steps if s < k), default=0))  # seconds: one per step
        np.testing.assert_allclose(logs["train/tokens_per_sec"][k], tokens_since_log / elapsed, rtol=1e-6)
        tokens_since_log = 0
    n_eval = len(val_rows) if args.eval_examples == 0 else min(args.eval_examples, len(val_rows))
    prompts = [tok.encode(e["prompt"]).ids for e in val_ex[: args.num_samples]]
    assert len(record["samples"]) == len(eval_steps) and len({s[2].tobytes() for s in record["samples"]}) == len(
        eval_steps
    )
    for k, (params, sample_prompts, _, texts) in zip(eval_steps, record["samples"]):
        after = record["steps"][k - 1][2]
        expected = token_mean(naive_target_nlls(graphdef, after, val_rows[:n_eval], L))
        np.testing.assert_allclose(logs["eval/loss"][k], expected, rtol=2e-6)
        assert f"step {k}: eval/loss {logs['eval/loss'][k]:.4f}" in record["stdout"]
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after)):
            np.testing.assert_array_equal(a, b)
        assert [list(p) for p in sample_prompts] == prompts and len(texts) == args.num_samples
        logged = "\n\n".join(f"**{e['prompt']}**{t}" for e, t in zip(val_ex, texts))
        assert record["writer"].texts["samples"][k] == logged
    assert loss == logs["eval/loss"][eval_steps[-1]]
    assert f"held-out loss {loss:.4f} nats/token;" in record["stdout"]
    final = "".join(f"--- {e['prompt']!r} -> {t!r}\n" for e, t in zip(val_ex, record["samples"][-1][3]))
    assert record["stdout"].endswith(final)
