"""Where our PPO update's time goes: a per-op profile of rlhf_ppo.ppo_update (4 epochs) on the benchmark workload.

    BENCH_SIZE=medium benchmarks/.venvs/ours/bin/python benchmarks/profile_update.py [--trace /tmp/update_trace]

Prints the update's median seconds over 3 calls, its FLOP/s (XLA's count, as bench_kernels.py) against the machine's
float32 matmul rate, then the XLA ops of one traced call (jax.profiler.trace's perfetto trace), their durations summed
by op name without the numeric suffix (ops on several threads overlap, so the shares are of the summed op time).
"""

import argparse
import collections
import glob
import gzip
import json
import re

import jax
from bench_kernels import matmul_flops, train_step_flops, update_batch
from bench_ours import prompts, setup

import rlhf_ppo as rp

RUNTIME = ("$", "Pjit", "CommonPjRt", "Allocate", "Handle", "Parse", "ThunkExecutor", "SlinkyThreadPool")


def main(cli):
    (args, models, tx, rows, tok), state, frozen, mesh = setup(1)
    q, qm = prompts(0, mesh)
    batch, _ = update_batch(args, models, tok, state["params"], frozen, q, qm)
    rate, flops, seconds = train_step_flops(args, models, tx, rows, state["params"], state["opt_state"], batch, 3)
    peak = matmul_flops(3)
    print(f"update {seconds:.3f} s: {flops / 1e9:.0f} GFLOP, {rate / 1e9:.1f} GFLOP/s = {rate / peak:.0%} of the "
          f"float32 matmul rate, {peak / 1e9:.1f}")  # fmt: skip
    with jax.profiler.trace(cli.trace, create_perfetto_trace=True):  # the state is donated: not used after
        params, opt_state = state["params"], state["opt_state"]
        jax.block_until_ready(rp.ppo_update(args, models, tx, rows, params, opt_state, batch, jax.random.key(0)))
    events = json.load(gzip.open(sorted(glob.glob(f"{cli.trace}/**/perfetto_trace.json.gz", recursive=True))[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(RUNTIME):
            name = re.sub(r"\.\d+$", "", e["name"])
            total[name] += e.get("dur", 0) / 1e3
            count[name] += 1
    summed = sum(total.values())
    print(f"| XLA op | ms | share of {summed:.0f} ms | calls |\n|---|---|---|---|")
    for name, ms in total.most_common(cli.top):
        print(f"| {name} | {ms:.0f} | {ms / summed:.1%} | {count[name]} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default="/tmp/update_trace", help="where jax.profiler writes the trace")
    parser.add_argument("--top", type=int, default=12, help="the op names printed")
    main(parser.parse_args())
