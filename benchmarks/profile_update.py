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
import statistics
import time

import jax
import jax.numpy as jnp
from bench_kernels import matmul_flops, update_batch, update_flops
from bench_ours import prompts, setup

import rlhf_ppo as rp

RUNTIME = ("$", "Pjit", "CommonPjRt", "Allocate", "Handle", "Parse", "ThunkExecutor", "SlinkyThreadPool")


def main(cli):
    (args, models, tx, rows, tok), state, frozen, mesh = setup(1)
    q, qm = prompts(0, mesh)
    batch, _ = update_batch(args, models, tok, state["params"], frozen, q, qm)
    flops = update_flops(args, models, state["params"], batch)
    st = {"params": jax.tree.map(jnp.copy, state["params"]), "opt_state": jax.tree.map(jnp.copy, state["opt_state"])}

    def update():
        st["params"], st["opt_state"], stats = rp.ppo_update(
            args, models, tx, rows, st["params"], st["opt_state"], batch, jax.random.key(0)
        )
        jax.block_until_ready(stats)

    update()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        update()
        times.append(time.perf_counter() - t)
    seconds, peak = statistics.median(times), matmul_flops(3)
    rate = flops / seconds
    print(f"update {seconds:.3f} s (calls {', '.join(f'{t:.3f}' for t in times)}): {flops / 1e9:.0f} GFLOP, "
          f"{rate / 1e9:.1f} GFLOP/s = {rate / peak:.0%} of the float32 matmul rate, {peak / 1e9:.1f}")  # fmt: skip
    with jax.profiler.trace(cli.trace, create_perfetto_trace=True):
        update()
    events = json.load(gzip.open(sorted(glob.glob(f"{cli.trace}/**/perfetto_trace.json.gz", recursive=True))[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(RUNTIME):
            total[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0) / 1e3
            count[re.sub(r"\.\d+$", "", e["name"])] += 1
    summed = sum(total.values())
    print(f"| XLA op | ms | share of {summed:.0f} ms | calls |\n|---|---|---|---|")
    for name, ms in total.most_common(cli.top):
        print(f"| {name} | {ms:.0f} | {ms / summed:.1%} | {count[name]} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default="/tmp/update_trace", help="where jax.profiler writes the trace")
    parser.add_argument("--top", type=int, default=12, help="the op names printed")
    main(parser.parse_args())
