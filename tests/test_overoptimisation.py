"""scripts/overoptimisation.py (docs/overoptimisation.md), against independent computations: the best-of-n estimator
against an enumeration of every subset of samples, Gao et al.'s fits against the coefficients that made the points,
the held-out curves read from each script's logged tags, and GRPO's held-out prompts against rlhf_ppo.py's."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import overoptimisation as oo  # noqa: E402

import grpo  # noqa: E402
import rlhf_ppo as ppo  # noqa: E402


def test_best_of_n_is_the_mean_over_every_subset_of_n_samples():
    """K = 7 samples of 3 prompts: for each n, the float64 mean over all C(7, n) subsets of the gold and proxy score
    of the subset's proxy-best sample; n = 1 is the samples' mean and n = K the best sample's."""
    rng = np.random.default_rng(0)
    gold, proxy = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    got = oo.best_of_n(gold, proxy, range(1, 8))
    for n, g, p in got:
        picks = [[s[np.argmax(proxy[list(s), j])] for s in itertools.combinations(range(7), n)] for j in range(3)]
        want_g = np.mean([np.mean([gold[i, j] for i in picks[j]]) for j in range(3)])
        want_p = np.mean([np.mean([proxy[i, j] for i in picks[j]]) for j in range(3)])
        assert (g, p) == pytest.approx((want_g, want_p), abs=1e-12), n
    assert got[0][1] == pytest.approx(gold.mean()) and got[-1][1] == pytest.approx(
        gold[proxy.argmax(0), [0, 1, 2]].mean()
    )


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fits_recover_the_coefficients_that_made_the_points_and_their_peak(form):
    """Points R(d) = d (α − β d) or d (α − β log d) at d = √KL, the start first: the fit returns α and β, the peak
    (d* = α / 2β, or exp(α/β − 1) where R' = 0) and R(d*); the gain is measured from each run's start, which differs
    between the two runs pooled."""
    alpha, beta = 0.9, 0.35
    shape = (lambda d: d) if form == "bon" else np.log
    runs = []
    for start in (0.1, -0.2):
        d = np.linspace(0, 4, 12)
        gold = start + d * (alpha - beta * shape(np.where(d > 0, d, 1)))
        runs.append({"method": "bon" if form == "bon" else "ppo", "proxy": "250", "beta": 0.0,
                     "curve": [{"kl": float(x * x), "gold": float(g)} for x, g in zip(d, gold)]})  # fmt: skip
    (f,) = oo.fits({"runs": runs})
    assert (f["alpha"], f["beta"]) == pytest.approx((alpha, beta), rel=1e-9)
    peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert f["peak_sqrt_kl"] == pytest.approx(peak, rel=1e-9)
    assert f["peak_gain"] == pytest.approx(peak * (alpha - beta * shape(peak)), rel=1e-9)
    assert f["r2"] == pytest.approx(1.0) and f["max_sqrt_kl"] == pytest.approx(4.0)
    rising = [{**r, "curve": [{**c, "gold": c["kl"]} for c in r["curve"]]} for r in runs]  # no peak: β ≤ 0
    assert oo.fits({"runs": rising})[0]["peak_sqrt_kl"] is None


def test_held_out_curves_read_each_scripts_held_out_tags():
    """PPO: eval/heldout/* against episodes (not the means over both evaluation sets); GRPO: eval/kl and the means of
    the reward model and of g (not the weighted total), against steps of 64 completions."""
    ppo_tags = {f"eval/{s}{k}": [(0, v), (320, v + 1)] for s, v in (("heldout/", 0.5), ("", 9.0))
                for k in ("gold_score", "proxy_score", "kl")}  # fmt: skip
    assert oo.held_out_curve("ppo", ppo_tags) == [
        {"episodes": 0, "kl": 0.5, "gold": 0.5, "proxy": 0.5},
        {"episodes": 320, "kl": 1.5, "gold": 1.5, "proxy": 1.5},
    ]
    grpo_tags = {"eval/kl": [(5, 3.0)], "eval/rewards/reward_model/mean": [(5, 1.25)], "eval/reward": [(5, 7.0)],
                 "eval/rewards/positive_and_varied/mean": [(5, 0.8)]}  # fmt: skip
    assert oo.held_out_curve("grpo", grpo_tags) == [{"episodes": 320, "kl": 3.0, "gold": 0.8, "proxy": 1.25}]


def test_grpo_evaluates_on_the_held_out_prompts_of_rlhf_ppo(tiny_sft):
    """GRPO's default evaluation set is rlhf_ppo.py's eval/heldout set, token for token."""
    tok, _, pad = ppo.load_tokenizer(tiny_sft)
    p_args = make_args(ppo, sft_model=str(tiny_sft), pad_token_id=pad)
    theirs = ppo.evaluation_sets(p_args, tok, None)["heldout"]
    g_args = make_args(grpo, sft_model=str(tiny_sft), pad_token_id=pad)
    ours = grpo.load_prompts(g_args, tok, None, None, "eval", g_args.eval_prompts)
    assert theirs[0].shape == (p_args.eval_prompts, p_args.prompt_tokens) == (g_args.eval_prompts, g_args.prompt_tokens)
    for x, y in zip(ours[:2], theirs, strict=True):
        np.testing.assert_array_equal(x, y)
