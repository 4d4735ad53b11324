#!/usr/bin/env bash
# The frontier's DPO runs: --beta in {0.03, 0.1, 0.3} x seeds {1, 2, 3}, after `python sft.py && python reward_model.py`
# (the same preference pairs, data/imdb_pairs.jsonl). Logs go to results/logs/, tensorboard runs to
# runs/dpo_beta<beta>__<seed>__<time>/; then `python scripts/frontier.py` (with scripts/ppo_sweep.sh and
# scripts/best_of_n.py) draws results/frontier.png.
set -euo pipefail
mkdir -p results/logs
for beta in 0.03 0.1 0.3; do
  for seed in 1 2 3; do
    python dpo.py --beta "$beta" --seed "$seed" --exp-name "dpo_beta$beta" \
      --output-dir "models/dpo_beta${beta}_s$seed" --checkpoint-dir "checkpoints/dpo_beta${beta}_s$seed" \
      > "results/logs/dpo_beta${beta}_s$seed.log" 2>&1
    tail -3 "results/logs/dpo_beta${beta}_s$seed.log"
  done
done
