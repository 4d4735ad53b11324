"""The gold judge of docs/overoptimisation.md: a review should be positive, and should not repeat itself.

    g(y) = (VADER compound(y) + 1) / 2 × (distinct word bigrams of y) / (word bigrams of y)     in [0, 1]

VADER alone scores "best best best ..." at its maximum, so a policy that maximises any proxy of it ends where VADER
does, and no proxy can be over-optimised against it. g keeps VADER's order on varied text (the SFT policy's samples
hardly repeat a bigram) and scores degenerate text low, as a person would: the proxy reward models learn sentiment
from the labeler's pairs, and little about repetition, which those pairs rarely show. TRL's reward signature, for
reward_model.py --gold-fn, rlhf_ppo.py --gold-fn and grpo.py --reward-fn.
"""

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_VADER = SentimentIntensityAnalyzer()


def distinct_bigrams(text: str) -> float:
    """The share of the text's word bigrams that are distinct; 1 under two words."""
    words = text.split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def positive_and_varied(prompts, completions, **columns):
    """g of each completion (the prompt is not judged)."""
    return [(_VADER.polarity_scores(c)["compound"] + 1) / 2 * distinct_bigrams(c) for c in completions]
