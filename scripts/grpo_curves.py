"""The curves of a grpo.py run, read from its tensorboard log: reward per function, loss, KL, completion length.

python scripts/grpo_curves.py runs/grpo__1__<time> results/grpo_curves.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ppo_results import read_scalars  # noqa: E402  (scripts/, beside this file: the tensorboard reader)


def main(run_dir: Path, out: Path):
    s = read_scalars(run_dir)
    functions = sorted(k for k in s if k.startswith("rewards/") and k.endswith("/mean"))
    panels = [
        ("reward per function (training batches)", functions + ["reward"]),
        ("held-out reward per function", sorted(k for k in s if k.startswith("eval/reward"))),
        ("loss", ["loss"]),
        ("KL to the SFT policy", ["kl", "eval/kl"]),
        ("completion length (tokens)", ["completions/mean_length", "eval/completions/mean_length"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    axes = axes.ravel()
    axes[-1].axis("off")
    for ax, (title, tags) in zip(axes, panels):
        for tag in tags:
            if tag in s:
                steps, values = zip(*sorted(s[tag]))
                ax.plot(
                    steps,
                    values,
                    label=tag.removeprefix("rewards/").removesuffix("/mean"),
                    marker="o" if tag.startswith("eval/") else None,
                    markersize=3,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[3].text(0.02, 0.98, "kl: token mean of k3 (training)\neval/kl: sequence k1 (held out)", fontsize=7,
                 transform=axes[3].transAxes, va="top")  # fmt: skip
    fig.suptitle(f"grpo.py, {run_dir.name}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    main(args.run_dir, args.out)
