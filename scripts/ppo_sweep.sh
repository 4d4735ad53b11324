#!/usr/bin/env bash
# The README's PPO results: --kl-coef in {0.01, 0.05, 0.2} x seeds {1, 2, 3}, after `python sft.py && python reward_model.py`.
# Logs go to results/logs/, tensorboard runs to runs/ppo_kl<beta>__<seed>__<time>/; then
#   python scripts/ppo_results.py   # the table and results/ppo_curves.png
set -euo pipefail
mkdir -p results/logs
for kl in 0.01 0.05 0.2; do
  for seed in 1 2 3; do
    python rlhf_ppo.py --kl-coef "$kl" --seed "$seed" --exp-name "ppo_kl$kl" \
      --output-dir "models/ppo_kl${kl}_s$seed" --checkpoint-dir "checkpoints/ppo_kl${kl}_s$seed" \
      > "results/logs/ppo_kl${kl}_s$seed.log" 2>&1
    tail -3 "results/logs/ppo_kl${kl}_s$seed.log"
  done
done
