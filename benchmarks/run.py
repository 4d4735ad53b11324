"""Runs every benchmark in turn, each alone on the machine and in its own virtual environment, and prints one table.

    bash benchmarks/setup.sh            # once: benchmarks/.venvs/{ours,trl,tunix}
    python benchmarks/run.py            # ~15 min on a 2-core CPU; any Python 3 runs it (standard library only)

1. PPO iterations on the identical workload (workload.py): ours on 1 and on 2 fake XLA CPU devices and in bf16,
   TRL 1.12.0's PPOTrainer and Tunix 0.1.7's PPO learner; `--warmup` iterations each, then `--iters` timed ones,
   in `--rounds` rounds that take the implementations in turn (the timings of all rounds are pooled).
2. Our hot paths (bench_kernels.py) on 1 and 2 fake devices: KV-cache vs no-cache sampling, and the PPO train
   step's FLOP/s against a plain large matmul's.
The raw results go to benchmarks/.work/results.json, each run's output to benchmarks/.work/logs/.
"""

import argparse
import json
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


def run(name: str, venv: str, script: str, args: list[str]) -> dict:
    """One benchmark process; -> the JSON of its last `RESULT ` line (its full output is kept in .work/logs)."""
    python = HERE / ".venvs" / venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python}: missing; run `bash benchmarks/setup.sh` first")
    print(f"running {name}: {script} {' '.join(args)}", file=sys.stderr, flush=True)
    t = time.time()
    proc = subprocess.run([str(python), script, *args], cwd=HERE, capture_output=True, text=True)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    (WORK / "logs" / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(
            f"{name} failed (exit {proc.returncode}); see {WORK / 'logs' / (name + '.log')}:\n{proc.stderr[-2000:]}"
        )
    print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT ") :])


def merge(a: dict, b: dict) -> dict:
    """Two rounds of one implementation: timings concatenated, the larger peak RSS, the later metrics."""
    out = {
        **b,
        **{k: a[k] + b[k] for k in ("iter_s", "gen_s", "update_s")},
        "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
    }
    if "compiles_in_timed_iterations" in a:
        out["compiles_in_timed_iterations"] = a["compiles_in_timed_iterations"] + b["compiles_in_timed_iterations"]
    return out


def ppo_table(results: dict) -> str:
    ours = statistics.median(results["ours"]["iter_s"])
    rows = [
        "| implementation | s/iteration median (min–max) | episodes/s | generation s | rest (scoring + update) s "
        "| peak RSS MB | time / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        med = statistics.median(r["iter_s"])
        rows.append(
            f"| {r['name']} | {med:.2f} ({min(r['iter_s']):.2f}–{max(r['iter_s']):.2f}) | {64 / med:.1f} "
            f"| {statistics.median(r['gen_s']):.2f} ({statistics.median(r['gen_s']) / med:.0%}) "
            f"| {statistics.median(r['update_s']):.2f} | {r['peak_rss_mb']:.0f} | {med / ours:.2f}× |"
        )
    return "\n".join(rows)


def kernel_table(results: dict) -> str:
    rows = [
        "| devices | KV-cache sampler tok/s | no-cache sampler tok/s | ratio | train step GFLOP/s | "
        "matmul GFLOP/s | train step / matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        rows.append(
            f"| {r['num_devices']} | {r['kv_cache_tok_s']:,.0f} | {r['no_cache_tok_s']:,.0f} "
            f"| {r['kv_cache_tok_s'] / r['no_cache_tok_s']:.1f}× | {r['train_step_flop_s'] / 1e9:.1f} "
            f"| {r['matmul_flop_s'] / 1e9:.1f} | {r['train_step_flop_s'] / r['matmul_flop_s']:.0%} |"
        )
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed PPO iterations per implementation")
    parser.add_argument("--iters", type=int, default=10, help="timed PPO iterations per implementation")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of all PPO runs, one implementation after another"
    )
    parser.add_argument("--only", nargs="*", default=[*PPO_RUNS, *KERNEL_RUNS], help="a subset of the runs")
    cli = parser.parse_args()
    if not (WORK / "models" / "reward" / "config.json").exists():  # the shared random models, made with transformers
        subprocess.run([str(HERE / ".venvs" / "trl" / "bin" / "python"), "workload.py"], cwd=HERE, check=True)
    ppo = {}
    for round_ in range(cli.rounds):  # rounds interleave the implementations, so slow drifts of the machine hit all
        for k, (venv, script, extra) in PPO_RUNS.items():
            if k in cli.only:
                r = run(f"{k}-{round_}", venv, script, [*extra, "--warmup", str(cli.warmup), "--iters", str(cli.iters)])
                ppo[k] = merge(ppo[k], r) if k in ppo else r
    kernels = {k: run(k, "ours", "bench_kernels.py", v) for k, v in KERNEL_RUNS.items() if k in cli.only}
    (WORK / "results.json").write_text(json.dumps({"ppo": ppo, "kernels": kernels}, indent=1))
    sys.path.insert(0, str(HERE))
    from workload import cpu_description

    machine = cpu_description()
    print(
        f"\nPPO iteration on the workload of benchmarks/workload.py ({machine}; "
        f"{cli.rounds} rounds x {cli.iters} timed "
        f"iterations after {cli.warmup} warm-up; episodes/s = 64 / median s per iteration)\n"
    )
    if "ours" in ppo:
        print(ppo_table(ppo))
    for name, r in ppo.items():
        for d in r.get("differences", []):
            print(f"- {name}: {d}")
        if "compiles_in_timed_iterations" in r:
            print(f"- {name}: XLA compilations during the timed iterations: {r['compiles_in_timed_iterations']}")
    if kernels:
        print(f"\nOur hot paths (bench_kernels.py; {machine})\n\n" + kernel_table(kernels))


if __name__ == "__main__":
    main()
