"""Best-of-n sampling from the SFT policy, picked by the reward model: the frontier's baseline without training.

    python scripts/best_of_n.py [--seeds 1 2 3] [--max-n 64] [--out results/best_of_n.json]

For each held-out prompt of rlhf_ppo.py's evaluation (the same sets, sampler, temperature and judges, imported), draws
--max-n responses from the SFT policy; best-of-n keeps, of the first n, the one the reward model scores highest, for
n = 1, 2, 4, ..., --max-n. Its KL to the sampling policy is log n − (n − 1)/n (Stiennon et al. 2020;
Gao et al. 2023), the policy being the SFT policy at the evaluation temperature, the KL rlhf_ppo.py and dpo.py report.
Writes the mean gold and proxy score of the picked responses per n and seed to --out.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlhf_ppo as ppo  # noqa: E402


def best_of_n(pargs, models, tok, params, frozen, eval_sets, max_n: int, seed: int):
    """-> {n: (gold, proxy)}: means over every evaluation prompt of the picked response's scores."""
    proxy, gold = [], []  # each [max_n, prompts], the evaluation sets one after the other
    for k in range(max_n):
        p_k, g_k = [], []
        for i, (queries, query_mask) in enumerate(eval_sets.values()):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), k)
            roll = ppo.rollout(pargs, models, tok, params, frozen, queries, query_mask, key)
            p_k.append(np.asarray(roll["scores"]))
            texts = ppo.decode(tok, roll["responses"], roll["response_mask"])
            prompts = ppo.decode(tok, queries, query_mask)
            judge = pargs.gold_fn
            g_k.append(ppo.call_reward_fn(judge, prompts, texts, "--gold-fn") if judge else ppo.vader_scores(texts))
        proxy.append(np.concatenate(p_k)), gold.append(np.concatenate(g_k))
    proxy, gold = np.stack(proxy), np.stack(gold)
    out, n = {}, 1
    while n <= max_n:
        pick = np.argmax(proxy[:n], axis=0)  # [prompts]: the reward model's favourite of the first n
        cols = np.arange(proxy.shape[1])
        out[n] = (float(gold[pick, cols].mean()), float(proxy[pick, cols].mean()))
        n *= 2
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft-model", default="models/sft")
    parser.add_argument("--reward-model", default="models/reward")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-n", type=int, default=64)
    parser.add_argument("--out", default="results/best_of_n.json")
    cli = parser.parse_args()
    pargs = ppo.Args(sft_model=cli.sft_model, reward_model=cli.reward_model, value_model="shared")
    tok, eos_id, pad_id = ppo.load_tokenizer(cli.sft_model)
    pargs = ppo.resolve_token_ids(pargs, eos_id, pad_id)
    models, params, frozen = ppo.load_models(pargs, jax.numpy.float32)
    _, _, eval_sets = ppo.setup_data(pargs, tok)
    rows = []
    for seed in cli.seeds:
        t0 = time.time()
        for n, (gold, proxy) in best_of_n(pargs, models, tok, params, frozen, eval_sets, cli.max_n, seed).items():
            kl = math.log(n) - (n - 1) / n
            rows.append({"n": n, "seed": seed, "gold_score": gold, "proxy_score": proxy, "kl": kl})
            print(f"seed {seed} n {n:3d}: gold {gold:.4f} proxy {proxy:.4f} kl {kl:.3f}")
        print(f"seed {seed}: {time.time() - t0:.0f}s")
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
