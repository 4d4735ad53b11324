"""Reward-model over-optimisation in miniature: Gao, Schulman & Hilton (2023) on the embedded task
(docs/overoptimisation.md).

    python sft.py                               # the SFT policy (models/sft)
    python scripts/overoptimisation.py          # every run below, then the fits, the JSON and the figure
    python scripts/overoptimisation.py --plot   # the fits, the table and the figure from results/overoptimisation.json

The gold reward g is scripts/gold.py's: VADER sentiment times the share of distinct word bigrams (VADER alone scores
"best best best ..." highest, so no proxy of it can be over-optimised; the docs page shows this). A simulated labeler
judges the SFT policy's pairs by g (reward_model.py --gold-fn, into data/overopt_pairs.jsonl), and the proxies are
reward models trained on the first N of its training pairs (--max-train-pairs N, into models/overopt_rm_<N>; "all":
every pair), so they differ in their data alone; each one's held-out accuracies are read from its log.
Against each proxy:

1. Best-of-n from the SFT policy: K = --bon-samples samples on each of the first --bon-prompts held-out openings,
   scored once by every proxy and by g. Best-of-n's mean gold and proxy score for every n is the unbiased estimator
   over those samples (Nakano et al. 2021, as Gao et al.): with the samples sorted by the proxy, the i-th is the best
   of n with probability C(i − 1, n − 1) / C(K, n). Its KL is log n − (n − 1)/n (an upper bound: Beirami et al. 2024).
2. RL (RUNS): PPO (rlhf_ppo.py --gold-fn g) with β = 0 and 0.01, and GRPO (grpo.py --reward-model, β = 0, learning
   rate 3e-4; g at weight 0 is only logged), each evaluated every few updates: the gold score, the proxy score and
   the KL to the SFT policy (k1 summed over the response, on the policy's samples at T = 0.7).
3. Gao et al.'s functional forms, fitted by least squares to the gold score's gain over the SFT policy, d = √KL:
   best-of-n R(d) = d (α − β d), peaking at d* = α / (2β); RL R(d) = d (α − β log d), peaking at d* = exp(α/β − 1).

Every evaluation is on the same 256 held-out IMDB openings at T = 0.7 (PPO's eval/heldout set, GRPO's eval set;
best-of-n: the first of them).
Runs already in results/overoptimisation.json are kept unless --rerun; results/logs/overoptimisation/ holds the logs.
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gold import positive_and_varied  # scripts/, beside this file: g
from grpo_variants import cpu, run_script  # the CPU model and its ISA; one script's run
from ppo_results import read_scalars  # the tensorboard reader
from scipy.special import gammaln

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rlhf_ppo as ppo  # noqa: E402

RESULTS, LOGS = ROOT / "results" / "overoptimisation.json", ROOT / "results" / "logs" / "overoptimisation"
GOLD = "scripts.gold:positive_and_varied"
LABELER = ["--gold-fn", GOLD, "--labeler-tau", "0.05", "--pairs-file", "data/overopt_pairs.jsonl"]  # τ: g is in [0, 1]
PROXIES = {"1000": 1000, "2000": 2000, "all": None}  # name -> --max-train-pairs (None: every pair)
SEEDS = {"1000": (1, 2), "2000": (1,), "all": (1,)}  # the weakest proxy twice: its peak against the seed noise
RUNS = [("ppo", 0.0), ("ppo", 0.01), ("grpo", 0.0)]  # (method, β); seeds after the first: the β = 0 runs only
PPO_FLAGS = ["--total-episodes", "5120", "--eval-every", "4", "--gold-fn", GOLD]  # 80 updates of 64 episodes
GRPO_FLAGS = ["--max-steps", "150", "--eval-every", "6", "--beta", "0", "--learning-rate", "3e-4"]  # 64 per step
GRPO_FLAGS += ["--reward-fn", GOLD, "--reward-weights", "0", "1"]  # the gold score logged, not trained on


def proxy_dir(name: str) -> Path:
    return ROOT / "models" / f"overopt_rm_{name}"


def train_proxy(name: str) -> dict:
    """reward_model.py with the labeler of g and --max-train-pairs N -> its held-out accuracies, from its log. The first
    one samples and labels the pairs; --resume, with a fresh checkpoint directory, makes the others read them."""
    log = LOGS / f"proxy_{name}.log"
    if not (proxy_dir(name) / "config.json").exists():
        ckpt = Path(tempfile.mkdtemp(prefix="proxy_"))
        flags = LABELER + ["--resume", "--checkpoint-dir", str(ckpt), "--output-dir", str(proxy_dir(name))]
        flags += ["--exp-name", f"overopt_rm_{name}"]
        flags += ["--max-train-pairs", str(PROXIES[name])] if PROXIES[name] else []
        with open(log, "w") as f:
            subprocess.run([sys.executable, "reward_model.py", *flags], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           check=True)  # fmt: skip
        shutil.rmtree(ckpt)
    acc = re.search(
        r"held-out: accuracy ([\d.]+) \(labels\), ([\d.]+) \(gold ordering.*?(\d+) training pairs", log.read_text()
    )
    return {"train_pairs": int(acc.group(3)), "accuracy": float(acc.group(1)), "gold_accuracy": float(acc.group(2))}


# ---------------------------------------------------------------- 1. best-of-n
@partial(jax.jit, static_argnums=0)
def proxy_scores(graphdef, params, tokens, mask):
    """The (normalised) reward model's score at the last real token of each row."""
    scores, _ = nnx.merge(graphdef, params)(tokens, ppo.positions_from_mask(mask), mask)
    return ppo.last_token_scores(scores, mask)


def bon_samples(names: list[str], num_prompts: int, num_samples: int, seed: int, copies: int = 8):
    """num_samples samples from the SFT policy on each of the first num_prompts held-out IMDB openings (`copies` of the
    prompts per sampler call), each scored by every proxy and by g -> gold [K, P], {name: proxy [K, P]}."""
    pargs = ppo.Args(reward_model=None, value_model="shared")
    tok, eos_id, pad_id = ppo.load_tokenizer(pargs.sft_model)
    pargs = ppo.resolve_token_ids(pargs, eos_id, pad_id)
    models, params, _ = ppo.load_models(pargs, jnp.float32)
    held_out = ppo.evaluation_sets(pargs, tok, ppo.ChatTemplate.load(pargs.sft_model))["heldout"]
    queries, query_mask = (x[:num_prompts] for x in held_out)
    q, qm = np.tile(queries, (copies, 1)), np.tile(query_mask, (copies, 1))
    rms = {name: nnx.split(ppo.load_model(proxy_dir(name), flag="--reward-model")[0]) for name in names}
    gold, proxy = [], {name: [] for name in names}
    for call in range(num_samples // copies):
        responses, _ = ppo.generate(pargs, models, params, q, qm, jax.random.fold_in(jax.random.key(seed), call))
        resp_mask = ppo.response_mask(responses, pargs.stop_token_id)
        tokens, mask = ppo.reward_model_inputs(q, qm, responses, resp_mask, eos_id, pad_id)
        for name, (graphdef, rm_params) in rms.items():
            proxy[name].append(np.asarray(proxy_scores(graphdef, rm_params, tokens, mask)).reshape(copies, -1))
        texts = ppo.decode(tok, responses, resp_mask)
        gold.append(np.asarray(positive_and_varied(None, texts), np.float32).reshape(copies, -1))
    return np.concatenate(gold), {name: np.concatenate(p) for name, p in proxy.items()}


def best_of_n(gold, proxy, ns):
    """The unbiased estimator of best-of-n's mean gold and proxy score from K samples per prompt (gold, proxy [K, P]):
    sorted by the proxy, sample i (1-based) is the best of n drawn without replacement with probability
    C(i − 1, n − 1) / C(K, n). -> [(n, gold, proxy)]."""
    K = proxy.shape[0]
    order = np.argsort(proxy, axis=0, kind="stable")
    g, p = np.take_along_axis(gold, order, 0), np.take_along_axis(proxy, order, 0)
    i = np.arange(1, K + 1)
    out = []
    for n in ns:
        log_w = gammaln(i) - gammaln(n) - gammaln(i - n + 1) - (gammaln(K + 1) - gammaln(n + 1) - gammaln(K - n + 1))
        w = np.where(i >= n, np.exp(np.where(i >= n, log_w, 0.0)), 0.0)  # sums to 1 over i
        out.append((n, float((w @ g).mean()), float((w @ p).mean())))
    return out


# ---------------------------------------------------------------- 2. RL
def held_out_curve(method: str, scalars) -> list[dict]:
    """A run's evaluations on the 256 held-out IMDB openings, from its tensorboard scalars (tag -> [(step, value)]):
    PPO's eval/heldout/* against episodes; GRPO's (g its weight-0 reward) against steps of 64 completions.
    -> [{episodes, kl, gold, proxy}]."""
    if method == "ppo":
        tags = {k: f"eval/heldout/{v}" for k, v in {"gold": "gold_score", "proxy": "proxy_score", "kl": "kl"}.items()}
    else:
        g = GOLD.split(":")[1]
        tags = {"gold": f"eval/rewards/{g}/mean", "proxy": "eval/rewards/reward_model/mean", "kl": "eval/kl"}
    s, per_step = {k: dict(scalars[tag]) for k, tag in tags.items()}, 1 if method == "ppo" else 64
    return [
        {"episodes": step * per_step, "kl": s["kl"][step], "gold": s["gold"][step], "proxy": s["proxy"][step]}
        for step in sorted(s["gold"])
    ]


def rl_run(method: str, name: str, beta: float, seed: int) -> dict:
    """One rlhf_ppo.py or grpo.py run against the proxy -> its held-out curve [{episodes, kl, gold, proxy}]."""
    label = f"{method}_{name}_b{beta}_s{seed}"
    script, flags = (
        ("rlhf_ppo.py", PPO_FLAGS + ["--kl-coef", str(beta)]) if method == "ppo" else ("grpo.py", GRPO_FLAGS)
    )
    flags = flags + ["--reward-model", str(proxy_dir(name))]
    run_dir, wall = run_script(script, flags, f"overopt_{label}", seed, LOGS / f"{label}.log")
    curve = held_out_curve(method, read_scalars(run_dir))
    return {"method": method, "proxy": name, "beta": beta, "seed": seed, "wall_s": round(wall), "curve": curve}


# ---------------------------------------------------------------- 3. fits
def fit(points, form: str) -> dict:
    """Least squares of the gold gain R over the start against d = √KL (points: (kl, gain)): R = d (α − β d) (bon) or
    R = d (α − β log d) (rl); both linear in α, β. -> alpha, beta, the peak d* (None: the fit has none) and its
    gain, the points' largest d and R²."""
    kl, gain = np.array(points, float).T
    d = np.sqrt(np.maximum(kl, 0.0))
    keep = d > 0  # R(0) = 0 in both forms
    d, gain = d[keep], gain[keep]
    x = np.stack([d, -d * d if form == "bon" else -d * np.log(d)], 1)
    (alpha, beta), *_ = np.linalg.lstsq(x, gain, rcond=None)
    curve = lambda d: d * (alpha - beta * (d if form == "bon" else np.log(d)))  # noqa: E731
    peak = None
    if beta > 0 and (form == "bon" or alpha / beta < 700):  # else exp overflows: no peak in any range
        peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    r2 = 1 - ((gain - x @ [alpha, beta]) ** 2).sum() / ((gain - gain.mean()) ** 2).sum()
    return {"alpha": float(alpha), "beta": float(beta), "peak_sqrt_kl": peak, "peak_gain": float(curve(peak))
            if peak else None, "max_sqrt_kl": float(d.max()), "r2": float(r2)}  # fmt: skip


def fits(results) -> list[dict]:
    """One fit per (method, proxy, β), the gain measured from each run's own start (best-of-n: n = 1)."""
    groups = {}
    for run in results["runs"]:
        start = run["curve"][0]["gold"]
        key = (run["method"], run["proxy"], run["beta"])
        groups.setdefault(key, []).extend((c["kl"], c["gold"] - start) for c in run["curve"])
    return [
        {"method": m, "proxy": p, "beta_kl": b, **fit(points, "bon" if m == "bon" else "rl")}
        for (m, p, b), points in groups.items()
    ]


def table(results) -> str:
    """Per run: the start, the peak (the best gold score) and the end, as markdown."""
    rows = ["| method | proxy (pairs, gold acc.) | β | seed | gold: start → peak (√KL) → end | proxy: start → end | "
            "KL at end | fit α, β (R²) | fit peak √KL |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fit_of = {(f["method"], f["proxy"], f["beta_kl"]): f for f in results["fits"]}
    for run in results["runs"]:
        c, f, px = run["curve"], fit_of[run["method"], run["proxy"], run["beta"]], results["proxies"][run["proxy"]]
        best = max(c, key=lambda x: x["gold"])
        peak = "none" if f["peak_sqrt_kl"] is None else f"{f['peak_sqrt_kl']:.3g}"
        peak += " (beyond the data)" if f["peak_sqrt_kl"] and f["peak_sqrt_kl"] > f["max_sqrt_kl"] else ""
        rows.append(
            f"| {run['method']} | {run['proxy']} ({px['train_pairs']}, {px['gold_accuracy']:.3f}) | {run['beta']} "
            f"| {run['seed']} | {c[0]['gold']:.3f} → {best['gold']:.3f} ({math.sqrt(best['kl']):.2f}) → "
            f"{c[-1]['gold']:.3f} | {c[0]['proxy']:.3f} → {c[-1]['proxy']:.3f} | {c[-1]['kl']:.2f} "
            f"| {f['alpha']:.3f}, {f['beta']:.3f} ({f['r2']:.2f}) | {peak} |"
        )
    return "\n".join(rows)


def plot(results, out: Path):
    """Gold (top) and proxy (bottom) against √KL, one column per method, one colour per proxy; the fits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    colours = {name: f"C{i}" for i, name in enumerate(results["proxies"])}
    fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 8), squeeze=False, sharey="row")
    fit_of = {(f["method"], f["proxy"], f["beta_kl"]): f for f in results["fits"]}
    for col, method in enumerate(methods):
        for run in (r for r in results["runs"] if r["method"] == method):
            c, px = run["curve"], results["proxies"][run["proxy"]]
            d = np.sqrt(np.maximum([x["kl"] for x in c], 0))
            style = "-" if run["beta"] == 0 else ":"
            label = f"{run['proxy']} pairs (gold acc. {px['gold_accuracy']:.2f})"
            label += f", β {run['beta']}" if method == "ppo" else ""
            kw = {"color": colours[run["proxy"]], "linestyle": style, "marker": "o", "markersize": 2}
            axes[0, col].plot(d, [x["gold"] for x in c], label=label if run["seed"] == 1 else None, **kw)
            axes[1, col].plot(d, [x["proxy"] for x in c], **kw)
            f = fit_of[method, run["proxy"], run["beta"]]
            if run["seed"] == 1:
                grid = np.linspace(1e-3, d.max(), 100)
                shape = grid if method == "bon" else np.log(grid)
                axes[0, col].plot(grid, c[0]["gold"] + grid * (f["alpha"] - f["beta"] * shape), "--",
                                  color=colours[run["proxy"]], linewidth=1, alpha=0.7)  # fmt: skip
        title = {"bon": "best-of-n (SFT samples)", "ppo": "PPO (rlhf_ppo.py)", "grpo": "GRPO (grpo.py, β = 0)"}[method]
        axes[0, col].set_title(title)
        axes[1, col].set_xlabel("√KL to the SFT policy (√nats)")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel("gold score g (VADER × distinct bigrams), held out")
    axes[1, 0].set_ylabel("proxy score (the reward model), held out")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Reward-model over-optimisation on the embedded task; dashed: Gao et al.'s forms ({results['cpu']})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", action="store_true", help="no runs: the fits, table and figure from the JSON")
    parser.add_argument("--rerun", action="store_true", help="run again the runs already in the JSON")
    parser.add_argument("--bon-samples", type=int, default=1024, help="K: samples per prompt for best-of-n")
    parser.add_argument("--bon-prompts", type=int, default=128, help="best-of-n: the first held-out IMDB openings")
    parser.add_argument("--png", type=Path, default=ROOT / "results" / "overoptimisation.png")
    cli = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and not cli.rerun else {"runs": []}
    if not cli.plot:
        LOGS.mkdir(parents=True, exist_ok=True)
        results |= {
            "cpu": cpu(),
            "ppo_flags": PPO_FLAGS,
            "grpo_flags": GRPO_FLAGS,
            "bon_samples": cli.bon_samples,
            "bon_prompts": cli.bon_prompts,
        }
        results["proxies"] = {name: train_proxy(name) for name in PROXIES}
        done = {(r["method"], r["proxy"], r["beta"], r["seed"]) for r in results["runs"]}

        def record(run):
            results["runs"] = [r for r in results["runs"] if r is not run] + [run]
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(run["curve"][-1] | {k: run[k] for k in ("method", "proxy", "beta", "seed")}), flush=True)

        if not any(k[0] == "bon" for k in done):
            t0 = time.time()
            gold, proxy = bon_samples(list(PROXIES), cli.bon_prompts, cli.bon_samples, seed=1)
            ns = [2**j for j in range(int(math.log2(cli.bon_samples)) + 1)]
            for name in PROXIES:
                curve = [{"n": n, "kl": math.log(n) - (n - 1) / n, "gold": g, "proxy": p}
                         for n, g, p in best_of_n(gold, proxy[name], ns)]  # fmt: skip
                wall = round(time.time() - t0)  # the samples and every proxy's scores
                record({"method": "bon", "proxy": name, "beta": 0.0, "seed": 1, "wall_s": wall, "curve": curve})
        for name in PROXIES:
            for seed in SEEDS[name]:
                for method, beta in RUNS:
                    if (method, name, beta, seed) not in done and (seed == SEEDS[name][0] or beta == 0):
                        record(rl_run(method, name, beta, seed))
    results["fits"] = fits(results)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['cpu']}\n{table(results)}")
    plot(results, cli.png)


if __name__ == "__main__":
    main()
