"""Runs every benchmark in turn, each alone on the machine and in its own virtual environment, at both model sizes of
workload.py, and prints one set of tables per size.

    bash benchmarks/setup.sh            # once: benchmarks/.venvs/{ours,trl,tunix}
    python3 benchmarks/run.py           # ~25 min on a 2-core CPU (tiny ~10, medium ~15); needs only numpy

For each size (BENCH_SIZE, workload.py):
1. PPO iterations on the identical workload: ours (on 1 and on 2 fake XLA CPU devices and in bf16 at the tiny size),
   TRL 1.12.0's PPOTrainer and Tunix 0.1.7's PPO learner; warm-up iterations each, then timed ones, in rounds that
   take the implementations in turn (the timings of all rounds are pooled). Each reports the whole iteration, the
   generation inside it, and the PPO update alone (its epochs: forward, backward, optimizer).
2. Our hot paths (bench_kernels.py): KV-cache vs no-cache sampling, our update's FLOPs (XLA's count) and FLOP/s,
   the machine's float32 matmul rate, and how far the sampler's log-probs are from a forward pass's.
The update's GFLOP/s of every implementation is that one FLOP count (the same work for all: our update's, which
runs the LM head on the response positions only) over its measured update time.
The raw results go to benchmarks/.work/results.json, each run's output to benchmarks/.work/logs/.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
PPO_RUNS = {  # key: (venv, script, extra arguments)
    "ours": ("ours", "bench_ours.py", []),
    "ours-2dev": ("ours", "bench_ours.py", ["--num-devices", "2"]),
    "ours-bf16": ("ours", "bench_ours.py", ["--dtype", "bfloat16"]),
    "trl": ("trl", "bench_trl.py", []),
    "tunix": ("tunix", "bench_tunix.py", []),
}
KERNEL_RUNS = {"kernels": [], "kernels-2dev": ["--num-devices", "2"]}
SIZES = {  # per size: warm-up and timed iterations per round, rounds, the runs (a medium iteration takes ~20-40 s)
    "tiny": dict(warmup=2, iters=10, rounds=2, runs=[*PPO_RUNS, *KERNEL_RUNS]),
    "medium": dict(warmup=1, iters=3, rounds=2, runs=["ours", "trl", "tunix", "kernels"]),
}


def run(size: str, name: str, venv: str, script: str, args: list[str]) -> dict:
    """One benchmark process at BENCH_SIZE=size; -> the JSON of its last `RESULT ` line (its output goes to
    .work/logs)."""
    python = HERE / ".venvs" / venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python}: missing; run `bash benchmarks/setup.sh` first")
    print(f"running {size} {name}: {script} {' '.join(args)}", file=sys.stderr, flush=True)
    t = time.time()
    env = os.environ | {"BENCH_SIZE": size}
    proc = subprocess.run([str(python), script, *args], cwd=HERE, capture_output=True, text=True, env=env)
    log = WORK / "logs" / f"{size}-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{size} {name} failed (exit {proc.returncode}); see {log}:\n{proc.stderr[-2000:]}")
    print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT ") :])


def merge(a: dict, b: dict) -> dict:
    """Two rounds of one implementation: timings concatenated, the larger peak RSS, the later metrics."""
    out = {
        **b,
        **{k: a[k] + b[k] for k in ("iter_s", "gen_s", "update_s", "train_s")},
        "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
    }
    if "compiles_in_timed_iterations" in a:
        out["compiles_in_timed_iterations"] = a["compiles_in_timed_iterations"] + b["compiles_in_timed_iterations"]
    return out


def ppo_table(results: dict, kernels: dict) -> str:
    """One row per implementation; the update's GFLOP/s uses our update's FLOP count (kernels) for every row."""
    ours = statistics.median(results["ours"]["iter_s"])
    flops, peak = (kernels["train_step_flops"], kernels["matmul_flop_s"]) if kernels else (None, None)
    rows = [
        "| implementation | s/iteration median (min–max) | episodes/s | generation s | rest s | of which update s "
        "| update GFLOP/s (of matmul) | peak RSS MB | time / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        med, train = statistics.median(r["iter_s"]), statistics.median(r["train_s"])
        rate = f"{flops / train / 1e9:.0f} ({flops / train / peak:.0%})" if flops else "–"
        rows.append(
            f"| {r['name']} | {med:.2f} ({min(r['iter_s']):.2f}–{max(r['iter_s']):.2f}) | {64 / med:.1f} "
            f"| {statistics.median(r['gen_s']):.2f} ({statistics.median(r['gen_s']) / med:.0%}) "
            f"| {statistics.median(r['update_s']):.2f} | {train:.2f} | {rate} | {r['peak_rss_mb']:.0f} "
            f"| {med / ours:.2f}× |"
        )
    return "\n".join(rows)


def kernel_table(results: dict) -> str:
    rows = [
        "| devices | KV-cache sampler tok/s | no-cache sampler tok/s | ratio | update GFLOP (XLA) | update GFLOP/s "
        "| matmul GFLOP/s | update / matmul | log π_old: sampler − forward, max abs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rows.append(
            f"| {r['num_devices']} | {r['kv_cache_tok_s']:,.0f} | {r['no_cache_tok_s']:,.0f} "
            f"| {r['kv_cache_tok_s'] / r['no_cache_tok_s']:.1f}× | {r['train_step_flops'] / 1e9:.1f} "
            f"| {r['train_step_flop_s'] / 1e9:.1f} | {r['matmul_flop_s'] / 1e9:.1f} "
            f"| {r['train_step_flop_s'] / r['matmul_flop_s']:.0%} | {r['sampler_logprob_max_abs_diff']:.1e} |"
        )
    return "\n".join(rows)


def run_size(size: str, cli) -> dict:
    """All the runs of one size -> {"ppo": {key: result}, "kernels": {key: result}}."""
    plan = SIZES[size]
    warmup, iters, rounds = (cli.warmup or plan["warmup"]), (cli.iters or plan["iters"]), (cli.rounds or plan["rounds"])
    wanted = [k for k in plan["runs"] if cli.only is None or k in cli.only]
    models = WORK / "models" / size
    if not (models / "reward" / "config.json").exists():  # the shared random models, made with transformers
        env = os.environ | {"BENCH_SIZE": size}
        subprocess.run([str(HERE / ".venvs" / "trl" / "bin" / "python"), "workload.py"], cwd=HERE, check=True, env=env)
    ppo = {}
    for round_ in range(rounds):  # rounds interleave the implementations, so slow drifts of the machine hit all
        for k, (venv, script, extra) in PPO_RUNS.items():
            if k in wanted:
                r = run(size, f"{k}-{round_}", venv, script, [*extra, "--warmup", str(warmup), "--iters", str(iters)])
                ppo[k] = merge(ppo[k], r) if k in ppo else r
    kernels = {k: run(size, k, "ours", "bench_kernels.py", v) for k, v in KERNEL_RUNS.items() if k in wanted}
    return {"ppo": ppo, "kernels": kernels, "warmup": warmup, "iters": iters, "rounds": rounds}


def report(size: str, out: dict, machine: str):
    ppo, kernels = out["ppo"], out["kernels"]
    print(
        f"\n## {size}: PPO iteration on the workload of benchmarks/workload.py ({machine}; {out['rounds']} rounds x "
        f"{out['iters']} timed iterations after {out['warmup']} warm-up; episodes/s = 64 / median s per iteration; "
        "rest = iteration − generation: scoring passes, advantages and the update)\n"
    )
    if "ours" in ppo:
        print(ppo_table(ppo, kernels.get("kernels")))
    for name, r in ppo.items():
        for d in r.get("differences", []):
            print(f"- {name}: {d}")
        if "compiles_in_timed_iterations" in r:
            print(f"- {name}: XLA compilations during the timed iterations: {r['compiles_in_timed_iterations']}")
    if kernels:
        print(f"\n## {size}: our hot paths (bench_kernels.py; {machine})\n\n" + kernel_table(kernels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES), help="model sizes to run")
    parser.add_argument("--warmup", type=int, help="untimed PPO iterations per run (default: per size, SIZES)")
    parser.add_argument("--iters", type=int, help="timed PPO iterations per run (default: per size)")
    parser.add_argument("--rounds", type=int, help="rounds of all PPO runs, one implementation after another")
    parser.add_argument("--only", nargs="*", help=f"a subset of the runs: {', '.join([*PPO_RUNS, *KERNEL_RUNS])}")
    cli = parser.parse_args()
    results = {size: run_size(size, cli) for size in cli.sizes}
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    sys.path.insert(0, str(HERE))
    from workload import cpu_description

    machine = cpu_description()
    for size, out in results.items():
        report(size, out, machine)


if __name__ == "__main__":
    main()
