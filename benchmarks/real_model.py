"""Throughput of a real checkpoint on this machine: KV-cache sampling and SFT training, with peak memory and the CPU.

    python benchmarks/real_model.py models/smollm2-135m-instruct

Sampling: --sample-batch prompts of --prompt-len tokens, --new-tokens new tokens each (common.sample, the sampler
every script uses; no early stop: the stop token is set to -1). Training: sft.train_step (forward, backward, AdamW)
on --train-batch sequences of --seq-len tokens. Each is compiled and run once before --iters timed runs; the median
is reported. Peak memory is the process's maximum resident set size (compilation included).
"""

import argparse
import resource
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench_kernels import best_of  # noqa: E402
from workload import cpu_description  # noqa: E402

import sft  # noqa: E402
from common import sample  # noqa: E402


def main(cli):
    model, cfg = sft.load_model(cli.model)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    B, P, N = cli.sample_batch, cli.prompt_len, cli.new_tokens
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)

    def run_sampler():
        cache = sft.init_cache(cfg, B, P + N)
        out, _ = sample(sft.step_function(graphdef), params, cache, prompts, jnp.ones((B, P), bool), jax.random.key(0),
                     max_new_tokens=N, temperature=1.0, stop_token_id=-1, pad_token_id=0)  # fmt: skip
        jax.block_until_ready(out)

    t_sample = best_of(run_sampler, cli.iters)
    print(f"sampling: batch {B}, prompt {P}, {N} new tokens: {t_sample:.2f} s -> {B * N / t_sample:,.0f} tokens/s")

    args = sft.Args(batch_size=cli.train_batch, max_seq_len=cli.seq_len, learning_rate=1e-5, warmup_steps=0)
    tx, _ = sft.make_optimizer(args)
    L = cli.seq_len
    tokens = rng.integers(0, cfg.vocab_size, (1, cli.train_batch, L)).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens, bool), "loss_mask": np.ones_like(tokens, bool)}
    state = {"params": params, "opt_state": jax.jit(tx.init)(params)}

    def run_step():
        state["params"], state["opt_state"], metrics = sft.train_step(
            graphdef, tx, state["params"], state["opt_state"], batch, jax.random.key(0)
        )
        jax.block_until_ready(metrics["loss"])

    t_step = best_of(run_step, cli.iters)
    n = cli.train_batch * L
    print(f"SFT train step: {cli.train_batch} x {L} tokens: {t_step:.2f} s -> {n / t_step:,.0f} tokens/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak memory (max RSS): {peak:.2f} GiB; {sum(x.size for x in jax.tree.leaves(params)):,} parameters")
    print(f"CPU: {cpu_description()}; jax {jax.__version__}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a Hugging Face checkpoint directory")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3)
    main(parser.parse_args())
