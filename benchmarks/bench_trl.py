"""TRL 1.12.0's PPOTrainer on the shared PPO workload (workload.py), on CPU torch.

    cd benchmarks && .venvs/trl/bin/python bench_trl.py [--warmup 2] [--iters 5] [--threads N]

What is measured: the wall-clock time of each PPO iteration = one rollout of 64 prompts (sampling 32 new tokens,
then the no-grad forward passes of the reference policy, value model and reward model) + 4 PPO epochs over one
minibatch of 64 (policy and value model trained jointly by one AdamW).

How: `PPOTrainer.train()` runs warmup + iters iterations, one per dataset batch. A `TrainerCallback` stamps
on_train_begin and every on_step_end; iteration k lasts from stamp k to stamp k+1 (TRL's own per-step logging and
gc.collect() calls fall inside). Generation is timed by replacing the module-level `batch_generation` that
`trl.experimental.ppo.ppo_trainer` calls (PPO lives in `trl.experimental.ppo` in 1.12.0) with a timing wrapper,
which also checks that every rollout is exactly the workload's prompts plus 32 new tokens. update_s = iter_s -
gen_s (the rollout's scoring passes and advantages, the PPO epochs, TRL's logging and gc.collect() calls).

train_s is the PPO update alone: from the iteration's first call of the module-level `forward` on the policy-and-
value wrapper (the first epoch's joint policy + value forward: the rollout calls `forward` only on the reference
policy and scores values and rewards through `get_reward`, so the stamp follows the scoring passes and the
advantages) to the iteration's on_step_end stamp. It covers the 4 epochs' forward, backward, AdamW step and no-grad
loss statistics, plus TRL's metric gathering after them (a few reductions, .item() calls, the log call and the
scheduler step: about 1 ms at the tiny size). torch on CPU is synchronous, so each stamp follows the work before it.

The first `warmup` iterations are discarded. Peak RSS is the process's ru_maxrss (models + optimizer included).

The last stdout line is `RESULT {json}` (see `result`), which the benchmark runner parses.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
)

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import workload as W  # noqa: E402

transformers.logging.set_verbosity_error()  # deprecation notices of TRL's generate() call
transformers.logging.disable_progress_bar()  # "Loading weights" bars
warnings.filterwarnings("ignore", category=FutureWarning)  # is_gradient_checkpointing renamed, in TRL's wrapper
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "experimental" import warning
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
    from trl.experimental.ppo import ppo_trainer as ppo_module  # noqa: E402

NAME = "TRL 1.12.0 PPOTrainer (torch 2.13.0 CPU)"
MODELS = W.MODELS
SANITY_METRICS = (
    "objective/kl",
    "objective/scores",
    "policy/approxkl_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "objective/entropy",
    "val/num_eos_tokens",
)

# What TRL does differently from the workload, or does in its own way (fixed by TRL 1.12.0's code, not by us).
DIFFERENCES = [
    "sampling temperature is 0.7 + 1e-7 (TRL adds 1e-7 to the temperature, in generation and in the PPO forward)",
    "old-policy logprobs come from generate()'s output scores (no separate policy forward pass after sampling); "
    "the rollout runs 3 extra forward passes: reference policy, value model, reward model",
    "a sampled pad id (0) inside a response is treated as end of response by TRL (positions after it are masked "
    "out of the loss and pad tokens are masked out of attention); eos (1) is an ordinary token (stop_token=None)",
    "policy and value model are separate Llama backbones optimised by one torch AdamW (fused, betas 0.9/0.999, "
    "eps 1e-8, weight decay 0), no gradient clipping (TRL's PPO loop never clips), constant learning rate "
    "(lr_scheduler_type='constant'; TRL's default would be linear decay)",
    "TRL's DataLoader is hard-coded shuffle=True; the benchmark replaces trainer.dataloader with an unshuffled one "
    "so iteration i gets workload.prompts(i) (checked)",
    "each iteration also includes TRL's per-step metric logging (.item() syncs) and two gc.collect() calls",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=2, help="iterations run but not reported")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args()


def load_models():
    """policy, ref (second load of policy), reward, value (second load of reward), all float32, and the tokenizer."""
    lm = lambda: AutoModelForCausalLM.from_pretrained(MODELS / "policy", dtype=torch.float32)  # noqa: E731
    rm = lambda: AutoModelForSequenceClassification.from_pretrained(MODELS / "reward", dtype=torch.float32)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "policy")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (W.PAD, W.EOS)
    return dict(model=lm(), ref_model=lm(), reward_model=rm(), value_model=rm(), processing_class=tokenizer)


def prompt_dataset(n_iters: int) -> Dataset:
    """Iteration i's batch is rows [64 i, 64 (i + 1)) = workload.prompts(i)."""
    ids = np.concatenate([W.prompts(i) for i in range(n_iters)]).astype(np.int64)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def ppo_config(n_iters: int) -> PPOConfig:
    return PPOConfig(
        output_dir="/tmp/bench_trl_output",
        total_episodes=W.BATCH * n_iters,
        per_device_train_batch_size=W.BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=W.NUM_MINI_BATCHES,
        num_ppo_epochs=W.PPO_EPOCHS,
        local_rollout_forward_batch_size=W.BATCH,
        response_length=W.RESPONSE_LEN,
        temperature=W.TEMPERATURE,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        kl_coef=W.KL_COEF,
        kl_estimator="k1",
        cliprange=W.CLIPRANGE,
        cliprange_value=W.CLIPRANGE,
        vf_coef=W.VF_COEF,
        gamma=W.GAMMA,
        lam=W.LAM,
        whiten_rewards=False,
        learning_rate=W.LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        bf16=False,  # TRL's config would default to bf16=True
        fp16=False,
        activation_checkpointing=False,  # TRL's config would default to gradient_checkpointing=True
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        num_sample_generations=0,
        logging_steps=1,
        disable_tqdm=True,
        seed=W.SEED,
    )


class GenerationTimer:
    """Replaces ppo_trainer.batch_generation with a wrapper that times it and checks its input and output."""

    def __init__(self):
        self.seconds, self.eos_tokens, self.pad_tokens = [], 0, 0
        self.original = ppo_module.batch_generation
        ppo_module.batch_generation = self

    def __call__(self, model, queries, *args, **kwargs):
        start = time.perf_counter()
        query_responses, logits = self.original(model, queries, *args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        self.check(len(self.seconds) - 1, queries, query_responses, logits)
        return query_responses, logits

    def check(self, iteration, queries, query_responses, logits):
        expected = torch.as_tensor(W.prompts(iteration), dtype=queries.dtype)
        assert torch.equal(queries.cpu(), expected), f"iteration {iteration}: not workload.prompts({iteration})"
        assert query_responses.shape == (W.BATCH, W.PROMPT_LEN + W.RESPONSE_LEN), query_responses.shape
        assert logits.shape[:2] == (W.BATCH, W.RESPONSE_LEN), logits.shape
        responses = query_responses[:, W.PROMPT_LEN :]
        self.eos_tokens += int((responses == W.EOS).sum())
        self.pad_tokens += int((responses == W.PAD).sum())


class UpdateTimer:
    """Replaces ppo_trainer.forward with a wrapper that stamps each iteration's first forward pass of the policy-and-
    value wrapper: train() calls it only in the PPO epochs, after the rollout's scoring and advantages."""

    def __init__(self, generation: GenerationTimer):
        self.generation, self.starts = generation, []
        self.original = ppo_module.forward
        ppo_module.forward = self

    def __call__(self, model, *args, **kwargs):
        # The rollout's ref pass calls forward(ref_policy, ...); the epochs call forward(model, ...) on the wrapper.
        if isinstance(model, ppo_module.PolicyAndValueWrapper) and len(self.starts) < len(self.generation.seconds):
            self.starts.append(time.perf_counter())
        return self.original(model, *args, **kwargs)


class IterationTimer(TrainerCallback):
    """Wall-clock stamps at train begin and at every step end; keeps the last metrics TRL logged."""

    def __init__(self, generation: GenerationTimer):
        self.generation, self.stamps, self.last_logs = generation, [], {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.last_logs = dict(logs or {})

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
        k = len(self.stamps) - 1
        print(
            f"iteration {k}: {self.stamps[-1] - self.stamps[-2]:.3f} s (generation {self.generation.seconds[-1]:.3f} s)"
            f", objective/kl {self.last_logs.get('objective/kl', float('nan')):.4f}",
            flush=True,
        )

    @property
    def seconds(self):
        return np.diff(self.stamps).tolist()


def make_trainer(n_iters: int, callback: TrainerCallback) -> PPOTrainer:
    dataset = prompt_dataset(n_iters)
    trainer = PPOTrainer(args=ppo_config(n_iters), train_dataset=dataset, callbacks=[callback], **load_models())
    trainer.remove_callback(PrinterCallback)  # it prints every step's metric dict; IterationTimer prints one line
    # TRL builds its DataLoader with shuffle=True; train() only reads self.dataloader, so give it one in order.
    trainer.dataloader = DataLoader(
        dataset, batch_size=W.BATCH, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
    )
    return trainer


def result(iters, gens, trains, generation: GenerationTimer, logs: dict) -> dict:
    differences = list(DIFFERENCES)
    if generation.pad_tokens:
        differences.append(
            f"{generation.pad_tokens} pad token(s) sampled over all iterations: TRL ended those responses there"
        )
    metrics = {k: float(logs[k]) for k in SANITY_METRICS if k in logs}
    metrics["sampled_eos_tokens_all_iters"] = float(generation.eos_tokens)
    metrics["sampled_pad_tokens_all_iters"] = float(generation.pad_tokens)
    return {
        "name": NAME,
        "iter_s": iters,
        "gen_s": gens,
        "update_s": [i - g for i, g in zip(iters, gens)],
        "train_s": trains,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "differences": differences,
        "metrics": metrics,
    }


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_iters = args.warmup + args.iters
    generation = GenerationTimer()
    update = UpdateTimer(generation)
    timer = IterationTimer(generation)
    make_trainer(n_iters, timer).train()
    counts = (len(timer.seconds), len(generation.seconds), len(update.starts))
    assert counts == (n_iters,) * 3, counts
    iters, gens = timer.seconds[args.warmup :], generation.seconds[args.warmup :]
    # Iteration k's update runs from its first policy-and-value forward to its step-end stamp (stamps[k + 1]).
    trains = [end - start for start, end in zip(update.starts, timer.stamps[1:])][args.warmup :]
    print("RESULT " + json.dumps(result(iters, gens, trains, generation, timer.last_logs)), flush=True)


if __name__ == "__main__":
    main()
