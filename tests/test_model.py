"""The Llama/Qwen2 model against Hugging Face transformers, and the KV-cache sampler of common.py."""

import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import F32_UNIT_ROUNDOFF, assert_as_accurate
from flax import nnx

import sft
from common import sample


def torch_logits(model, tokens, mask=None):
    with torch.no_grad():
        t = torch.tensor(np.asarray(tokens), dtype=torch.long)
        m = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=t, attention_mask=m).logits.numpy()


def torch_float64(model):
    """The same transformers model in float64: the exact reference of the float32 parity tests."""
    return copy.deepcopy(model).double()


def our_logits(model, tokens, mask):
    mask = jnp.asarray(mask)
    return np.asarray(model(jnp.asarray(tokens), sft.positions_from_mask(mask), mask)[0])


def test_logits_match_transformers(hf_model):
    kind, torch_model, path = hf_model
    model, cfg = sft.load_model(path)
    assert cfg.tie_word_embeddings == (kind == "qwen2") and cfg.qkv_bias == (kind == "qwen2")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 17))
    ours, theirs = our_logits(model, tokens, np.ones_like(tokens, bool)), torch_logits(torch_model, tokens)
    exact = torch_logits(torch_float64(torch_model), tokens)
    assert exact.std() > 0.5  # the comparison is not between near-zero logits
    assert_as_accurate(ours, theirs, exact, what=f"{kind} logits")


def test_left_padding_gives_unpadded_logits(hf_model):
    _, torch_model, path = hf_model
    model, cfg = sft.load_model(path)
    rng = np.random.default_rng(1)
    long, short = rng.integers(4, cfg.vocab_size, 12), rng.integers(4, cfg.vocab_size, 7)
    tokens = np.stack([long, np.concatenate([np.zeros(5, int), short])])  # row 1 left-padded with 5 pads
    mask = np.stack([np.ones(12, bool), np.arange(12) >= 5])
    padded = our_logits(model, tokens, mask)
    alone = our_logits(model, short[None], np.ones((1, 7), bool))
    torch64 = torch_float64(torch_model)
    for ours, seq in ((padded[1, 5:], short), (alone[0], short), (padded[0], long)):  # each against its sequence alone
        assert_as_accurate(ours, torch_logits(torch_model, seq[None])[0], torch_logits(torch64, seq[None])[0])
    assert np.isfinite(padded).all()  # fully masked pad rows must not produce NaN


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from conftest import make_hf_model

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    torch_model = make_hf_model("llama", tmp_path, rope_scaling=scaling)
    model, _ = sft.load_model(tmp_path)
    tokens = np.random.default_rng(2).integers(0, 96, (1, 60))  # well past the original context
    assert_as_accurate(
        our_logits(model, tokens, np.ones_like(tokens, bool)),
        torch_logits(torch_model, tokens),
        torch_logits(torch_float64(torch_model), tokens),
    )


def test_bad_checkpoints_raise_clear_errors(tmp_path, hf_model):
    _, _, path = hf_model
    with pytest.raises(FileNotFoundError, match="config.json"):
        sft.load_model(tmp_path)
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 81}))
    with pytest.raises(ValueError, match="mlp.*shape"):
        sft.load_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="architectures"):
        sft.load_model(bad)


def test_save_load_roundtrip_is_exact(tmp_path, hf_model):
    _, torch_model, path = hf_model
    model, cfg = sft.load_model(path)
    sft.save_model(tmp_path / "out", model)
    again, _ = sft.load_model(tmp_path / "out")
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9))
    mask = np.ones_like(tokens, bool)
    np.testing.assert_array_equal(our_logits(model, tokens, mask), our_logits(again, tokens, mask))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(torch_model, tokens), atol=1e-6)


def test_kv_cache_logits_equal_full_forward(hf_model):
    _, torch_model, path = hf_model
    model, cfg = sft.load_model(path)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(4)
    tokens = rng.integers(4, cfg.vocab_size, (2, 14))
    mask = np.ones((2, 14), bool)
    mask[1, :3] = False  # left padding in row 1
    full = our_logits(model, tokens, mask)
    theirs = torch_logits(torch_model, tokens, mask)
    exact = torch_logits(torch_float64(torch_model), tokens, mask)
    real = mask.copy()  # pad positions attend to nothing; their logits are meaningless in every implementation
    assert_as_accurate(full[real], theirs[real], exact[real], what="full forward")
    positions = sft.positions_from_mask(jnp.asarray(mask))
    cache = sft.init_cache(cfg, 2, 20)
    kv = np.zeros((2, 20), bool)
    kv[:, :8] = mask[:, :8]
    logits, cache = sft.model_apply(graphdef, params, tokens[:, :8], positions[:, :8], kv, cache, 0)  # prefill 8
    assert logits.shape[1] == 1  # the last position's alone: the 8th token's
    cached = [np.asarray(logits)]
    for t in range(8, 14):  # then one token at a time
        kv[:, t] = True
        logits, cache = sft.model_apply(graphdef, params, tokens[:, t : t + 1], positions[:, t : t + 1], kv, cache, t)
        cached.append(np.asarray(logits))
    cached, real = np.concatenate(cached, axis=1), real[:, 7:14]  # [B, 7, V]: positions 7..13
    assert_as_accurate(cached[real], theirs[:, 7:14][real], exact[:, 7:14][real], what="KV-cache forward")


def test_greedy_sampling_equals_transformers_generate(hf_model):
    _, torch_model, path = hf_model
    model, cfg = sft.load_model(path)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, cfg.vocab_size, (2, 6))
    tokens[1, :2] = 0
    mask = np.ones((2, 6), bool)
    mask[1, :2] = False
    ours, _ = sample(
        partial(sft.model_apply, graphdef),
        params,
        sft.init_cache(cfg, 2, 6 + 12),
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=12,
        temperature=0.0,
        stop_token_id=3,
        pad_token_id=0,
    )
    with torch.no_grad():
        theirs = torch_model.generate(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(int)),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=3,
            pad_token_id=0,
        )[:, 6:]
    theirs = np.pad(theirs.numpy(), ((0, 0), (0, 12 - theirs.shape[1])))  # HF stops early once all rows ended
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def counting_step_fn(vocab, calls):
    """A fake model whose next token is previous token + 1 (probability 1 − 15 e^-16 ≈ 1 − 1.7e-6: log-probs ≈ −1.7e-6,
    not 0), counting its calls."""

    def step_fn(params, tokens, positions, kv_mask, cache, cache_pos):
        jax.debug.callback(lambda: calls.append(1))
        return jax.nn.one_hot((tokens + 1) % vocab, vocab) * 16.0, cache

    return step_fn


def test_sampler_stops_at_eos_pads_after_and_exits_early():
    calls = []
    step_fn = counting_step_fn(16, calls)
    prompts = np.array([[0, 5], [0, 8], [9, 2]])  # continue 6,7,8,.. / 9,10,.. / 3,4,..
    mask = np.array([[False, True], [False, True], [True, True]])
    cache = {"k": jnp.zeros((3, 2 + 50, 1))}
    out, logprobs = sample(
        step_fn,
        None,
        cache,
        prompts,
        mask,
        jax.random.key(0),
        max_new_tokens=50,
        temperature=1.0,
        stop_token_id=10,
        pad_token_id=15,
    )
    out, logprobs = np.asarray(out), np.asarray(logprobs)
    np.testing.assert_array_equal(out[0, :6], [6, 7, 8, 9, 10, 15])  # stop token kept, padding after it
    np.testing.assert_array_equal(out[1, :3], [9, 10, 15])
    np.testing.assert_array_equal(out[2, :8], [3, 4, 5, 6, 7, 8, 9, 10])
    assert (out[:, 8:] == 15).all()
    expected = np.where(out != 15, -15 * np.exp(-16.0), 0.0)  # each token's log-prob; 0 after the stop
    np.testing.assert_allclose(logprobs, expected, rtol=0, atol=2.5e-7)  # float32 rounding of logsumexp ≈ 16
    assert (logprobs[out != 15] < 0).all()
    jax.effects_barrier()
    assert len(calls) == 8  # prefill + 7 decode steps: the loop ended when the last row stopped, not at 50


def test_every_sampler_step_draws_with_a_fresh_key():
    """From uniform logits over 1,000 tokens, 40 steps of one row: a key reused across steps would draw one token
    again and again; fresh keys give (almost surely) many distinct ones, and another key other tokens."""

    def uniform(params, tokens, positions, kv_mask, cache, cache_pos):
        return jnp.zeros((*tokens.shape, 1000)), cache

    def draw(key):
        out, _ = sample(
            uniform,
            None,
            {"k": jnp.zeros((1, 41))},
            np.array([[5]]),
            np.array([[True]]),
            key,
            max_new_tokens=40,
            temperature=1.0,
            stop_token_id=-1,
            pad_token_id=0,
        )
        return np.asarray(out)[0]

    a, b = draw(jax.random.key(0)), draw(jax.random.key(1))
    assert len(set(a.tolist())) > 30 and (a != b).mean() > 0.9


def test_sampled_frequencies_follow_the_tempered_softmax():
    """50,000 draws of one step from fixed logits: each token's frequency is within 4 standard errors of
    softmax(logits / T), and a token of probability 0 is never drawn."""
    from common import _next_token

    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)) * 0.7, (50_000, 1))  # at T = 0.7: softmax = probs
    draws, logp = [np.asarray(x) for x in _next_token(logits, jax.random.key(0), 0.7)]
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_array_less(np.abs(freq - probs), 4 * np.sqrt(probs * (1 - probs) / len(draws)))
    np.testing.assert_allclose(logp, np.log(probs)[draws], rtol=1e-5)  # log π_old of PPO / GRPO: at T, of the draw
    greedy, greedy_logp = _next_token(logits, jax.random.key(0), 0.0)
    assert (np.asarray(greedy) == 0).all() and np.allclose(greedy_logp, np.log(jax.nn.softmax(logits[0]))[0])
    without_last = np.asarray(_next_token(logits.at[:, 5].set(-jnp.inf), jax.random.key(1), 0.7)[0])
    assert without_last.max() == 4 and (without_last == 4).sum() > 0


def test_sampler_compiles_once_per_model(tmp_path):
    """The jitted sampler takes its step function as a static argument: sft.step_function returns the same object
    for a graphdef every time, so rollouts with fresh weights and keys reuse one compilation (a fresh
    functools.partial per call would recompile every rollout)."""
    from conftest import make_hf_model

    make_hf_model("llama", tmp_path)
    model, cfg = sft.load_model(tmp_path)
    graphdef, params = nnx.split(model)
    sample._clear_cache()
    for i in range(3):
        params = jax.tree.map(lambda x: x * 1.01, params)  # new weights, as after each PPO update
        sample(
            sft.step_function(graphdef),
            params,
            sft.init_cache(cfg, 2, 3 + 4),
            np.ones((2, 3), np.int32),
            np.ones((2, 3), bool),
            jax.random.key(i),
            max_new_tokens=4,
            temperature=1.0,
            stop_token_id=3,
            pad_token_id=0,
        )
    assert sample._cache_size() == 1


@pytest.mark.parametrize("shape", [(4, 6, 16, 50), (3, 7, 8, 300_000)])  # one chunk; 7 chunks of 1 position
def test_fused_head_logprobs_are_as_accurate_as_the_unfused_ones_with_gradients(shape):
    """common.head_logprobs (chunked LM head + log-softmax, rematerialised per chunk) against float64:
    - its log-probs and entropies within the typical rounding error of a float32 sum of V terms, sqrt(V) u |x|
      (Higham & Mary 2019), plus a few ulps: how far from float64 a sound float32 implementation lands;
    - its gradients in the hidden states and head weights, through log-probs and entropy, at most 4x as far from
      float64 as those of log_softmax of the full logits. A hand-written backward once passed on AVX-512 and was
      ~40x less accurate than the unfused form on AVX2-only CPUs."""
    from common import head_logprobs

    B, R, D, V = shape
    k = jax.random.split(jax.random.key(0), 5)
    h, w = jax.random.normal(k[0], (B, R, D)), jax.random.normal(k[1], (D, V)) * 0.5
    tokens = jax.random.randint(k[2], (B, R), 0, V)
    a, e = jax.random.normal(k[3], (B, R)), jax.random.normal(k[4], (B, R))

    def unfused(h, w):
        full = jax.nn.log_softmax((h @ w) / 0.7, axis=-1)  # [B, R, V], in h's dtype (float64 for the exact one)
        return jnp.take_along_axis(full, tokens[..., None], axis=-1)[..., 0], -jnp.sum(jnp.exp(full) * full, axis=-1)

    def objective(h, w, fn):
        logp, entropy = fn(h, w)
        return jnp.sum(a.astype(h.dtype) * logp) + jnp.sum(e.astype(h.dtype) * entropy)

    def fused(h, w):
        return head_logprobs(h, w, tokens, 0.7)

    with jax.enable_x64(True):
        h64, w64 = h.astype(jnp.float64), w.astype(jnp.float64)
        exact_values, exact_grads = unfused(h64, w64), jax.grad(objective, (0, 1))(h64, w64, unfused)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((exact_values, exact_grads)))
    for name, ours, exact in zip(("log-probs", "entropies"), fused(h, w), exact_values):
        ours, exact = np.asarray(ours, np.float64), np.asarray(exact)
        bound = (np.sqrt(V) + 16) * F32_UNIT_ROUNDOFF * np.maximum(np.abs(exact), 1.0)
        assert (np.abs(ours - exact) <= bound).all(), (name, np.abs(ours - exact).max(), bound.min())
    ours, theirs = (jax.grad(objective, (0, 1))(h, w, fn) for fn in (fused, unfused))
    for name, *grads in zip(("d hidden", "d head"), ours, theirs, exact_grads):
        assert_as_accurate(*grads, what=name)


def test_model_copies_are_identical():
    """The appendix (model, Hugging Face I/O, devices, checkpoints, shared data) is duplicated in each script on
    purpose, so that each file stands alone; the copies must not drift."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    start, end = "# ==== APPENDIX", "# ==== END APPENDIX ===="
    copies = {}
    for script in ("sft.py", "reward_model.py", "rlhf_ppo.py", "dpo.py", "grpo.py"):
        if (root / script).exists():
            text = (root / script).read_text()
            assert text.count(start) == 1 and text.count(end) == 1, script
            copies[script] = text[text.index(start) : text.index(end)]
    assert "sft.py" in copies
    for script, text in copies.items():
        assert text == copies["sft.py"], f"the appendix of {script} differs from sft.py's"
