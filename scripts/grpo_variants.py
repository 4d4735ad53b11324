"""The GRPO family side by side (docs/grpo-variants.md): each variant of grpo.py on one task, with the same seeds,
budget of completions and held-out evaluation; then one table and results/grpo_variants.png.

    python scripts/grpo_variants.py imdb --seeds 1 2 3      # the default task (after python sft.py)
    python scripts/grpo_variants.py arithmetic --seeds 1    # SmolLM2-135M-Instruct's sums (docs/results.md, RLVR)
    python scripts/grpo_variants.py plot                    # the tables and the figure from results/grpo_variants.json

Each run is `python grpo.py <task's flags> <variant's flags> --seed s`, timed around the process, with its output in
results/logs/grpo_variants/. Its tensorboard log gives the held-out curve: eval/reward, eval/kl (the sequence KL to
the SFT policy) and eval/completions/mean_length against the completions sampled (B per step, × the sampling rounds
of --dynamic-sampling). A task's runs replace its entry in results/grpo_variants.json, with the CPU they ran on.
"""

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ppo_results import read_scalars  # scripts/, beside this file: the tensorboard reader

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "grpo_variants.json"
VARIANTS = {  # each one's defining flags; everything else as the task's flags
    "grpo": ["--loss-type", "grpo"],  # DeepSeekMath: group-normalised, per-sequence token means
    "dr_grpo": ["--loss-type", "dr_grpo", "--scale-rewards", "none"],  # Dr. GRPO
    "dapo": ["--loss-type", "dapo", "--epsilon-high", "0.28"],  # DAPO's token-level loss and clip-higher
    "gspo": ["--importance-sampling-level", "sequence", "--loss-type", "grpo"],  # GSPO: s_i, ε 3e-4 / 4e-4
    "rloo": ["--advantage", "rloo", "--loss-type", "grpo"],  # RLOO's leave-one-out baseline
    "reinforce_pp": ["--advantage", "reinforce_pp", "--loss-type", "dapo"],  # REINFORCE++-baseline, OpenRLHF's loss
    "dapo_dynamic": ["--loss-type", "dapo", "--epsilon-high", "0.28", "--dynamic-sampling"],  # + dynamic sampling
}
TASKS = {
    # μ = 2 optimizer steps per batch, so that the ratio leaves 1 and the clip (ε, ε_high, GSPO's) acts
    "imdb": (["--max-steps", "100", "--eval-every", "25", "--num-iterations", "2"], list(VARIANTS)),
    "arithmetic": (
        ["--sft-model", "models/smollm2-135m-instruct", "--reward-fn", "scripts.arithmetic:final_number",
         "--dataset", "data/arithmetic/prompts.jsonl", "--eval-dataset", "data/arithmetic/eval.jsonl",
         "--eval-prompts", "200", "--response-length", "32", "--group-size", "8", "--batch-size", "32",
         "--max-steps", "16", "--eval-every", "8", "--beta", "0", "--learning-rate", "1e-5", "--num-iterations", "2"],
        ["grpo", "dapo", "gspo", "rloo"],
    ),
}  # fmt: skip


def cpu() -> str:
    """The CPU model and its widest vector ISA (results depend on both)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    isa = "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else platform.machine()
    return f"{model.group(1) if model else platform.processor()}, {isa}"


def run_script(script: str, flags: list[str], exp_name: str, seed: int, log: Path) -> tuple[Path, float]:
    """`python <script> <flags> --seed <seed> --exp-name <exp_name>`, its model and checkpoints in a temporary directory
    (removed after), its output in `log` -> its tensorboard run directory and its wall seconds."""
    out = Path(tempfile.mkdtemp(prefix="run_"))
    flags = [*flags, "--seed", str(seed), "--exp-name", exp_name]
    flags += ["--output-dir", str(out / "model"), "--checkpoint-dir", str(out / "ckpt")]
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, script, *flags], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    shutil.rmtree(out)
    return max((ROOT / "runs").glob(f"{exp_name}__{seed}__*"), key=lambda p: p.stat().st_mtime), wall


def run(task: str, variant: str, seed: int, logs: Path):
    """One grpo.py run -> its held-out curve and wall times."""
    flags, log = TASKS[task][0] + VARIANTS[variant], logs / f"{task}_{variant}_s{seed}.log"
    run_dir, wall = run_script("grpo.py", flags, f"grpo_{task}_{variant}", seed, log)
    s = read_scalars(run_dir)
    per_step = dict(s.get("sampling/rounds", []))  # --dynamic-sampling: rounds of B completions per step
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 64
    curve = []
    for step, reward in sorted(s["eval/reward"]):
        completions = batch * sum(per_step.get(t, 1) for t in range(1, step + 1))
        kl, length = dict(s["eval/kl"])[step], dict(s["eval/completions/mean_length"])[step]
        curve.append({"step": step, "completions": completions, "reward": reward, "kl": kl, "length": length})
    grpo_s = float(re.search(r"GRPO \d+ steps in (\d+)s", log.read_text()).group(1))
    zero_std = float(np.mean([v for _, v in s["frac_reward_zero_std"]]))
    return {"variant": variant, "seed": seed, "wall_s": round(wall, 1), "grpo_s": grpo_s,
            "frac_reward_zero_std": zero_std, "curve": curve}  # fmt: skip


def table(task: str, entry) -> str:
    """Mean ± sample std over seeds of each variant's last evaluation, as markdown."""
    head = "held-out reward | KL to the start (nats) | length (tokens) | completions | wall time (s)"
    rows = [f"| {task}: variant | {head} |", "|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in entry["runs"]):
        runs = [r for r in entry["runs"] if r["variant"] == variant]
        last = [r["curve"][-1] for r in runs]

        def stat(values, digits):
            v = np.asarray(values, float)
            return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")

        first = runs[0]["curve"][0]["reward"]
        rows.append(
            f"| {variant} | {first:.3f} → {stat([c['reward'] for c in last], 3)} | {stat([c['kl'] for c in last], 2)} "
            f"| {stat([c['length'] for c in last], 1)} | {stat([c['completions'] for c in last], 0)} "
            f"| {stat([r['wall_s'] for r in runs], 0)} |"
        )
    return "\n".join(rows)


def plot(results, out: Path):
    """Per task, the held-out reward against the completions sampled (top) and against the KL to the SFT policy
    (bottom): the mean over seeds, a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8.5), squeeze=False)
    for col, task in enumerate(tasks):
        entry, seeds = results["tasks"][task], len({r["seed"] for r in results["tasks"][task]["runs"]})
        for variant in dict.fromkeys(r["variant"] for r in entry["runs"]):
            curves = [r["curve"] for r in entry["runs"] if r["variant"] == variant]
            y = np.array([[c["reward"] for c in curve] for curve in curves])
            for ax, key in zip(axes[:, col], ("completions", "kl")):
                x = np.mean([[c[key] for c in curve] for curve in curves], 0)
                line = ax.plot(x, y.mean(0), marker="o", markersize=3, label=variant)[0]
                if len(curves) > 1:
                    ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.12)
        for ax, xlabel in zip(axes[:, col], ("completions sampled", "KL to the starting policy (nats per completion)")):
            ax.set_title(f"{task}: {seeds} seed(s), mean (band: min-max over seeds)", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out reward" if task == "imdb" else "held-out final number correct")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"grpo.py's variants ({results['tasks'][tasks[0]]['cpu']})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=[*TASKS, "plot"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", help="a subset of the task's variants (default: all of them)")
    parser.add_argument("--png", type=Path, default=ROOT / "results" / "grpo_variants.png")
    cli = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"tasks": {}}
    if cli.task != "plot":
        logs = ROOT / "results" / "logs" / "grpo_variants"
        logs.mkdir(parents=True, exist_ok=True)
        entry = {"cpu": cpu(), "flags": TASKS[cli.task][0], "variants": {}, "runs": []}
        for seed in cli.seeds:  # seeds outermost: a time-out leaves whole seeds
            for variant in cli.variants or TASKS[cli.task][1]:
                entry["variants"][variant] = VARIANTS[variant]
                entry["runs"].append(run(cli.task, variant, seed, logs))
                print(json.dumps(entry["runs"][-1]["curve"][-1] | {"variant": variant, "seed": seed}), flush=True)
                results["tasks"][cli.task] = entry
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for task, entry in results["tasks"].items():
        print(f"\n{entry['cpu']}\n" + table(task, entry))
    plot(results, cli.png)


if __name__ == "__main__":
    main()
