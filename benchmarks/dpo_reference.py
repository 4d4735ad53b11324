"""DPO's reference log-probs: precomputed once per pair, or recomputed at every step? Measured on the default data.

    python benchmarks/dpo_reference.py [--sft-model models/sft] [--dataset data/imdb_pairs.jsonl]

Times dpo.train_step on the default batch (--batch-size pairs of the training data) with π_ref's log-probs read
from the batch (precompute) and computed inside the step (on-the-fly), and the one-off pass that precomputes them
for every training pair (dpo.frozen_logps in batches). Each is compiled and run once before --iters timed runs; the
median is reported. A run of E epochs of S steps costs: precompute = pass + E·S·t_pre, on the fly = E·S·t_otf.
"""

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import jax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench_kernels import best_of  # noqa: E402
from workload import cpu_description  # noqa: E402

import dpo  # noqa: E402
import reward_model as rm  # noqa: E402


def step(args, graphdef, tx, params, ref_params, batch):
    """One DPO step from the SFT weights (the same step every time: each timed call starts from the same state)."""
    _, _, metrics = dpo.train_step(
        args, graphdef, tx, jax.tree.map(jax.numpy.copy, params), tx.init(params), ref_params, batch, jax.random.key(0)
    )
    jax.block_until_ready(metrics)


def main(cli):
    args = dpo.Args(sft_model=cli.sft_model, dataset=cli.dataset)
    mesh = dpo.make_mesh(1)
    policy, _ = dpo.load_model(args.sft_model)
    tok, eos, pad = dpo.load_tokenizer(args.sft_model)
    train, _ = dpo.load_preferences(args, tok, eos, pad)
    graphdef, params = nnx.split(policy)
    ref_params = jax.tree.map(jax.numpy.copy, params)
    pairs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    t = time.perf_counter()
    train["ref_logps"] = dpo.in_batches(partial(dpo.frozen_logps, graphdef, ref_params), train, pairs, args.batch_size)
    precompute_pass = time.perf_counter() - t  # includes its one compilation
    N, steps = train["tokens"].shape[1], train["tokens"].shape[1] // args.batch_size
    batch = jax.tree.map(lambda x: x[None], {k: v[:, : args.batch_size] for k, v in train.items()})  # [1, 2, B, ...]
    tx, _ = rm.make_optimizer(args, 100)
    times = {}
    for mode in ("precompute", "on-the-fly"):
        times[mode] = best_of(
            partial(step, dataclasses.replace(args, reference=mode), graphdef, tx, params, ref_params, batch), cli.iters
        )
    print(f"CPU: {cpu_description()}; jax {jax.__version__}, float32")
    print(f"{N} training pairs, batch {args.batch_size} pairs ({batch['tokens'].shape[-1]} tokens per row)")
    print(f"precompute pass over all pairs: {precompute_pass:.1f} s (with its compilation)")
    for mode, t in times.items():
        print(f"train step, reference {mode}: {1000 * t:.0f} ms")
    for epochs in (1, 3):
        pre = precompute_pass + epochs * steps * times["precompute"]
        otf = epochs * steps * times["on-the-fly"]
        print(f"{epochs} epoch(s) of {steps} steps: precompute {pre:.0f} s, on the fly {otf:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft-model", default="models/sft")
    parser.add_argument("--dataset", default="data/imdb_pairs.jsonl")
    parser.add_argument("--iters", type=int, default=10)
    main(parser.parse_args())
