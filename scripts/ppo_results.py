"""The README's PPO results table and curves, from the tensorboard logs that scripts/ppo_sweep.sh leaves in runs/.

    python scripts/ppo_results.py [--runs runs] [--png results/ppo_curves.png]

Reads the event files directly (tensorboardX's protobufs; no TensorFlow), prints a markdown table of held-out
gold (VADER) and proxy (reward model) scores of the SFT policy (episode 0) and the final PPO policy, the final KL
and the PPO wall time (from results/logs), mean ± sample standard deviation (ddof = 1) over seeds, and draws
proxy score, gold score and KL
against episodes (mean over seeds, one line per --kl-coef). Needs matplotlib for the PNG.
"""

import argparse
import re
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
from tensorboardX.proto import event_pb2


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files of one run
    (records of: 8-byte length, 4-byte CRC, event, 4-byte CRC)."""
    scalars = defaultdict(list)
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return scalars


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--logs", default="results/logs")
    parser.add_argument("--png", default="results/ppo_curves.png")
    args = parser.parse_args()
    runs = defaultdict(dict)  # kl -> seed -> scalars (the newest run of each pair)
    for run_dir in sorted(Path(args.runs).glob("ppo_kl*__*__*")):
        kl, seed = re.match(r"ppo_kl([\d.]+)__(\d+)__", run_dir.name).groups()
        scalars = read_scalars(run_dir)
        if len(scalars.get("eval/gold_score", [])) >= 2:  # skip runs that have not finished an evaluation
            runs[kl][seed] = scalars
    print(
        "| `--kl-coef` | seeds | SFT gold | PPO gold | Δ gold | SFT proxy | PPO proxy "
        "| final KL (nats) | PPO wall time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kl in sorted(runs, key=float):
        rows = defaultdict(list)
        for seed, s in runs[kl].items():
            rows["sft_gold"].append(s["eval/gold_score"][0][1])
            rows["ppo_gold"].append(s["eval/gold_score"][-1][1])
            rows["sft_proxy"].append(s["eval/proxy_score"][0][1])
            rows["ppo_proxy"].append(s["eval/proxy_score"][-1][1])
            rows["kl"].append(s["eval/kl"][-1][1])
            log = Path(args.logs) / f"ppo_kl{kl}_s{seed}.log"
            match = re.search(r"PPO \d+ updates in (\d+)s", log.read_text()) if log.exists() else None
            rows["time"].append(float(match.group(1)) if match else float("nan"))
        rows["delta"] = list(np.array(rows["ppo_gold"]) - np.array(rows["sft_gold"]))
        f = lambda k, d=3, rows=rows: f"{np.mean(rows[k]):.{d}f} ± {np.std(rows[k], ddof=1):.{d}f}"  # sample std
        print(
            f"| {kl} | {len(runs[kl])} | {f('sft_gold')} | {f('ppo_gold')} | {f('delta')} | {f('sft_proxy')} | "
            f"{f('ppo_proxy')} | {f('kl', 2)} | {f('time', 0)} |"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (tag, title) in zip(
        axes,
        [
            ("eval/proxy_score", "proxy score (reward model)"),
            ("eval/gold_score", "gold score (VADER)"),
            ("eval/kl", "KL to SFT (nats)"),
        ],
    ):
        for kl in sorted(runs, key=float):
            curves = [np.array(s[tag]) for s in runs[kl].values()]
            n = min(len(c) for c in curves)
            ax.plot(curves[0][:n, 0], np.mean([c[:n, 1] for c in curves], axis=0), marker="o", label=f"β = {kl}")
        ax.set_title(title)
        ax.set_xlabel("episodes")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("PPO on the IMDB sentiment task: held-out prompts (IMDB + Rotten Tomatoes), mean over seeds")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
