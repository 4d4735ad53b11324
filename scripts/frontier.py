"""The gold-vs-KL frontier: what PPO, DPO and best-of-n buy per nat of KL to the SFT policy.

    bash scripts/ppo_sweep.sh && bash scripts/dpo_sweep.sh && python scripts/best_of_n.py
    python scripts/frontier.py [--png results/frontier.png]

Reads the final evaluation of every run from results/logs (ppo_kl<β>_s<seed>.log, dpo_beta<β>_s<seed>.log: the
line "final: ...") and best-of-n from results/best_of_n.json; all are measured on the same held-out prompts (256
IMDB and 256 Rotten Tomatoes openings) by the same code (rlhf_ppo.evaluate). Prints a markdown table (mean ± sample
standard deviation over seeds) and draws gold and proxy score against √KL (Gao et al. 2023's axis). Needs
matplotlib.
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def final_line(log: Path) -> dict[str, float]:
    """gold, proxy and KL of a run's final evaluation (both summary formats rlhf_ppo.py has printed)."""
    line = [x for x in log.read_text().splitlines() if x.startswith("final:")][-1]
    value = lambda name: float(re.search(rf"{name} ([-\d.]+)", line).group(1))  # noqa: E731  the first: the mean
    return {"gold_score": value(r"gold(?:_score)?"), "proxy_score": value(r"proxy(?:_score)?"), "kl": value("kl")}


def runs(pattern: str) -> dict[float, list[dict]]:
    """β -> the final evaluations of its seeds, from results/logs/<method><β>_s<seed>.log."""
    out = defaultdict(list)
    for log in sorted((ROOT / "results/logs").glob(pattern)):
        beta = float(re.search(r"(?:kl|beta)([\d.]+)_s\d+\.log$", log.name).group(1))
        out[beta].append(final_line(log))
    return dict(sorted(out.items()))


def stats(rows: list[dict], key: str) -> tuple[float, float]:
    x = np.array([r[key] for r in rows])
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def table(methods: dict[str, dict]) -> str:
    lines = ["| method | setting | seeds | KL (nats) | gold score | proxy score |", "|---|---|---|---|---|---|"]
    for name, settings in methods.items():
        for setting, rows in settings.items():
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in (stats(rows, k) for k in ("kl", "gold_score", "proxy_score"))]
            lines.append(f"| {name} | {setting} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(methods: dict[str, dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for (name, settings), color in zip(methods.items(), ("C0", "C1", "C2")):
        kl = np.array([stats(rows, "kl")[0] for rows in settings.values()])
        for ax, key in zip(axes, ("gold_score", "proxy_score")):
            mean, std = (np.array(v) for v in zip(*(stats(rows, key) for rows in settings.values())))
            ax.errorbar(np.sqrt(kl), mean, yerr=std, marker="o", color=color, label=name, capsize=3)
            for x, y, setting in zip(np.sqrt(kl), mean, settings):
                ax.annotate(str(setting), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes[0].set(xlabel="√KL to the SFT policy (√nats)", ylabel="gold score (VADER)", title="gold")
    axes[1].set(xlabel="√KL to the SFT policy (√nats)", ylabel="proxy score (reward model)", title="proxy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--png", default=str(ROOT / "results/frontier.png"))
    parser.add_argument("--best-of-n", default=str(ROOT / "results/best_of_n.json"))
    cli = parser.parse_args()
    best = defaultdict(list)
    for row in json.loads(Path(cli.best_of_n).read_text()):
        best[f"n = {row['n']}"].append(row)
    methods = {
        "PPO (β = --kl-coef)": {f"β = {b}": rows for b, rows in runs("ppo_kl*_s*.log").items()},
        "DPO (β = --beta)": {f"β = {b}": rows for b, rows in runs("dpo_beta*_s*.log").items()},
        "best-of-n": dict(best),
    }
    print(table(methods))
    plot(methods, Path(cli.png))
    print(f"-> {cli.png}")


if __name__ == "__main__":
    main()
