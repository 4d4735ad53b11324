"""A small conversational task for the real-model demo (README "A real model on a 2-core CPU"): two-digit addition.

    python scripts/arithmetic.py data/arithmetic    # sft.jsonl (TRL "messages"), prompts.jsonl and eval.jsonl
    python rlhf_ppo.py ... --dataset data/arithmetic/prompts.jsonl --reward-fn scripts.arithmetic:reward \
        --eval-dataset data/arithmetic/eval.jsonl --gold-fn scripts.arithmetic:reward
    python grpo.py ... --dataset data/arithmetic/prompts.jsonl --reward-fn scripts.arithmetic:final_number \
        --eval-dataset data/arithmetic/eval.jsonl         # the prompts carry an "answer" column

SmolLM2-135M-Instruct gets many of these wrong ("What is 12 + 35?" -> "12 + 35 = 50"), so SFT on worked answers and PPO
with an exact-answer reward each have something to learn, and the gold check is exact. The prompt files carry each
question's sum as an "answer" column, which grpo.py hands to its reward functions.
"""

import argparse
import json
import random
import re
from pathlib import Path

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 if the first number after the last "=" of the completion (or its first number, without "=") is the sum
    asked for in the prompt's last question, else 0.0 (the --reward-fn signature of rlhf_ppo.py)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        a, b = map(int, QUESTION.findall(prompt)[-1])
        numbers = re.findall(r"-?\d+", completion.rsplit("=", 1)[-1])
        out.append(float(bool(numbers) and int(numbers[0]) == a + b))
    return out


def final_number(prompts: list[str], completions: list[str], answer: list[int], **columns) -> list[float]:
    """1.0 if the last number in the completion is the row's `answer` column, else 0.0 (grpo.py's --reward-fn
    signature, TRL's: the dataset's other fields arrive as keyword arguments)."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion.replace(",", ""))
        out.append(float(bool(numbers) and int(numbers[-1]) == int(expected)))
    return out


def main(out_dir: Path, n_sft: int, n_prompts: int, seed: int, n_eval: int = 200):
    """Distinct questions: n_sft worked conversations for SFT, then n_prompts for PPO, then n_eval held out."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sft.jsonl", "w") as f:
        for a, b in pairs[:n_sft]:
            user = {"role": "user", "content": question(a, b)}
            f.write(json.dumps({"messages": [user, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}) + "\n")
    for name, questions in (
        ("prompts", pairs[n_sft : n_sft + n_prompts]),
        ("eval", pairs[n_sft + n_prompts :][:n_eval]),
    ):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for a, b in questions:
                prompt = [{"role": "user", "content": question(a, b)}]
                f.write(json.dumps({"prompt": prompt, "answer": a + b}) + "\n")
    print(f"wrote {out_dir}: sft.jsonl ({n_sft} conversations), prompts.jsonl ({n_prompts}), eval.jsonl ({n_eval})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--n-prompts", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out_dir, args.n_sft, args.n_prompts, args.seed, args.n_eval)
