"""reward_model.py: Bradley–Terry loss, reward read-out under padding, normalisation, export, labeler, smoke run."""

import copy
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import (
    RecordingWriter,
    assert_as_accurate,
    assert_same_params,
    kill_during_call,
    make_args,
    read_checkpoint,
    tree_digest,
)
from flax import nnx
from test_sft import write_jsonl

import reward_model as rm
import sft


def tiny_score_model(seed=0, **cfg_kw):
    cfg = sft.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        architecture="LlamaForSequenceClassification",
        **cfg_kw,
    )
    return sft.Transformer(cfg, rngs=nnx.Rngs(seed))


def test_loss_and_accuracy_match_hand_computed_values(monkeypatch):
    margins = np.array([2.0, -1.0, 0.5], np.float32)
    monkeypatch.setattr(
        rm, "rewards", lambda params, graphdef, tokens, mask, key: jnp.concatenate([jnp.asarray(margins), jnp.zeros(3)])
    )
    batch = {
        "tokens": jnp.zeros((2, 3, 4), jnp.int32),
        "mask": jnp.ones((2, 3, 4), bool),
        "gold": jnp.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.5]]),
    }
    loss, m = rm.preference_loss(None, None, batch)
    # -log sigmoid(2) = 0.126928, -log sigmoid(-1) = 1.313262, -log sigmoid(0.5) = 0.474077
    assert float(loss) == pytest.approx((0.126928 + 1.313262 + 0.474077) / 3, abs=1e-5)
    assert float(m["accuracy"]) == pytest.approx(2 / 3)
    assert float(m["margin"]) == pytest.approx(0.5) and float(m["chosen_rewards"]) == pytest.approx(0.5)
    assert int(m["gold_count"]) == 2 and int(m["gold_accuracy_sum"]) == 2  # the tied gold pair is not counted


def test_reward_is_read_at_last_real_token_whatever_the_padding():
    model = tiny_score_model()
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, 64, n) for n in (9, 5, 7)]
    L = 12
    right = np.zeros((3, L), np.int32)
    left = np.zeros((3, L), np.int32)
    rmask, lmask = np.zeros((3, L), bool), np.zeros((3, L), bool)
    for i, s in enumerate(seqs):
        right[i, : len(s)], rmask[i, : len(s)] = s, True
        left[i, L - len(s) :], lmask[i, L - len(s) :] = s, True
    r_right = np.asarray(rm.rewards(params, graphdef, jnp.asarray(right), jnp.asarray(rmask)))
    r_left = np.asarray(rm.rewards(params, graphdef, jnp.asarray(left), jnp.asarray(lmask)))
    np.testing.assert_allclose(r_right, r_left, atol=1e-5)
    for i, s in enumerate(seqs):  # = the score of the last position of the unpadded sequence
        alone, _ = model(jnp.asarray(s[None]), jnp.arange(len(s))[None], jnp.ones((1, len(s)), bool))
        assert r_right[i] == pytest.approx(float(alone[0, -1]), abs=1e-5)
    right[0, 9:] = 7  # what sits in the pad slots does not matter
    np.testing.assert_allclose(
        np.asarray(rm.rewards(params, graphdef, jnp.asarray(right), jnp.asarray(rmask))), r_right, atol=1e-6
    )


def test_head_initialisation_scale():
    w = np.asarray(nnx.state(tiny_score_model())["score"]["kernel"][...])
    assert w.shape == (32, 1) and 0.5 / np.sqrt(33) < w.std() < 1.5 / np.sqrt(33)


def test_labeler_label_rate_matches_bradley_terry():
    rng = np.random.default_rng(0)
    n = 40_000
    for diff, tau in ((0.1, 0.1), (-0.3, 0.2), (0.0, 0.1)):
        labels = rm.bradley_terry_labels(np.full(n, 0.2 + diff, np.float32), np.full(n, 0.2, np.float32), tau, rng)
        p = 1 / (1 + np.exp(-diff / tau))
        assert abs(labels.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), (diff, tau, labels.mean(), p)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a"}', "pairs.jsonl:2: missing field 'rejected'"),
        ('{"chosen": "", "rejected": "b"}', "pairs.jsonl:2: field 'chosen' must be a non-empty string"),
        ('{"prompt": 1, "chosen": "a", "rejected": "b"}', "pairs.jsonl:2: field 'prompt' must be a non-empty string"),
        ('{"chosen": "a", "rejected": ["b"]}', "pairs.jsonl:2: field 'rejected' must be a non-empty string"),
        ("not json", "pairs.jsonl:2: invalid JSON"),
    ],
)
def test_bad_pair_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(ValueError, match=message):
        rm.read_pairs(path)


def test_implicit_prompt_and_left_truncation(tmp_path):
    tok = sft.train_tokenizer(["one two three four five six seven eight nine ten"] * 5, 300, tmp_path)
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    pairs = rm.read_pairs(write_jsonl(tmp_path / "p.jsonl", [{"chosen": "one two", "rejected": "three"}]))
    assert pairs[0]["prompt"] == ""
    prompt = "one two three four five six seven eight nine ten"
    p_ids, r_ids = tok.encode(prompt).ids, tok.encode(" ten").ids
    tokens, mask, truncated, response_mask = rm.tokenize([p_ids, [5], [5]], [r_ids, [7, 8], [7, eos]], eos, pad, 6)
    assert truncated.tolist() == [True, False, False]
    assert tokens[0].tolist() == p_ids[-(5 - len(r_ids)) :] + r_ids + [
        eos
    ]  # prompt cut on the left, response + EOS kept
    assert tokens[1, :4].tolist() == [5, 7, 8, eos] and mask[1].sum() == 4
    assert tokens[2, :3].tolist() == [5, 7, eos] and mask[2].sum() == 3  # a sampled response ending with EOS: no second
    assert response_mask[1].tolist() == [False, True, True, True, False, False]  # response + EOS: what DPO scores
    assert response_mask[0].sum() == len(r_ids) + 1 and response_mask[0, -1]


def test_export_opens_in_transformers_with_the_same_raw_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_score_model(seed=3)
    sft.save_model(tmp_path / "rm", model, None, {"pad_token_id": 0})
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokens = np.random.default_rng(1).integers(1, 64, (2, 7))
    tokens[1, 5:] = 0  # right padding: transformers pools at the last non-pad token
    mask = tokens != 0
    graphdef, params = nnx.split(model)
    ours = np.asarray(rm.rewards(params, graphdef, jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        theirs, exact = (
            m(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int))).logits[:, 0].numpy()
            for m in (hf, copy.deepcopy(hf).double())
        )
    assert_as_accurate(ours, theirs, exact, what="scores")
    # the normalisation lives in config.json: our loader applies it, transformers reads the raw score
    model.cfg = sft.ModelConfig(**{**vars(model.cfg), "reward_gain": 2.0, "reward_bias": -0.5})
    sft.save_model(tmp_path / "rm2", model, None, {"pad_token_id": 0})
    again, cfg = sft.load_model(tmp_path / "rm2")
    assert (cfg.reward_gain, cfg.reward_bias) == (2.0, -0.5)
    g2, p2 = nnx.split(again)
    normalised = np.asarray(rm.rewards(p2, g2, jnp.asarray(tokens), jnp.asarray(mask)))
    assert_as_accurate(normalised, 2.0 * theirs - 0.5, 2.0 * exact - 0.5, what="normalised scores")


def test_the_held_out_metrics_on_scores_given_by_hand(monkeypatch):
    """evaluate's definitions, each score given by hand (the row's first token id − 5): accuracy counts a strict win of
    the chosen side (a tie is an error), the loss is −log σ(chosen − rejected), the gold accuracy and its pair count
    cover the pairs with known, untied gold scores."""
    chosen, rejected = [7, 5, 6, 4, 5], [6, 5, 8, 3, 5]  # margins 1, 0, -2, 1, 0
    tokens = np.repeat(np.array([chosen, rejected])[:, :, None], 3, axis=2)  # [2, 5, 3]: the pairs' sides, 3 tokens
    gold = np.array([[1.0, 0.3, 0.0, np.nan, 2.0], [0.0, 0.1, 1.0, 0.5, 2.0]])  # untied and known: pairs 0, 1, 2
    monkeypatch.setattr(rm, "score_all", lambda graphdef, params, tokens, *a: tokens[:, 0].astype(np.float64) - 5)
    ev = rm.evaluate(None, None, {"tokens": tokens, "mask": np.ones_like(tokens, bool), "gold": gold}, None, 4)
    loss = np.mean([math.log1p(math.exp(-m)) for m in (1, 0, -2, 1, 0)])
    assert ev == {"accuracy": 0.4, "loss": pytest.approx(loss, rel=1e-9), "gold_accuracy": 2 / 3, "gold_pairs": 3}


def test_smoke_run_with_simulated_labeler(tmp_path, tiny_sft, capsys):
    from transformers import AutoModelForSequenceClassification

    args = make_args(
        rm,
        sft_model=str(tiny_sft),
        output_dir=str(tmp_path / "rm"),
        checkpoint_dir=str(tmp_path / "ck"),
        pairs_file=str(tmp_path / "pairs.jsonl"),
        num_prompts=64,
        response_length=8,
        batch_size=16,
        num_epochs=2,
        eval_every=4,
        log_every=2,
        norm_prompts=48,
        max_seq_len=24,
        num_devices=2,
    )
    ev = rm.main(args)
    assert "normalisation (gain_bias): raw rewards of 48 SFT samples" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(rows) == 64 * args.pairs_per_prompt and {
        "prompt",
        "chosen",
        "rejected",
        "chosen_gold",
        "rejected_gold",
    } <= set(rows[0])
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["gold_pairs"] >= 0
    model, cfg = sft.load_model(tmp_path / "rm")
    assert cfg.is_score_model and cfg.reward_gain > 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.pad_token_id is not None  # transformers needs it to pool at the last real token
    # the labeler's file reused as --dataset gives the same held-out pairs; the finished checkpoint dir is reused
    ev2 = rm.main(
        make_args(rm, **{**vars(args), "dataset": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "rm2")})
    )
    assert ev2["gold_pairs"] == ev["gold_pairs"]


def test_normalisation_is_fitted_on_the_given_prompts_at_ppo_temperature(tmp_path, tiny_sft, monkeypatch):
    """mean 0 / std 1 (or mean 0) on samples of the given prompts (ppo_prompts' draw), at --norm-temperature."""
    policy, _ = sft.load_model(tiny_sft)
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    score_model, _ = sft.load_model(tiny_sft, architecture="LlamaForSequenceClassification", seed=5)
    graphdef, params = nnx.split(score_model)
    prompts = sft.encode_prompts(
        tok, [f"the film {w} {v}" for w in "was is had got made".split() for v in "a the".split()]
    )
    sharding = jax.sharding.NamedSharding(sft.make_mesh(1), jax.sharding.PartitionSpec())
    seen, real = [], rm.sample_continuations
    monkeypatch.setattr(rm, "sample_continuations", lambda *a, **k: seen.append(a) or real(*a, **k))
    for mode in ("gain_bias", "bias"):
        args = make_args(
            rm, normalize=mode, response_length=6, batch_size=8, max_seq_len=16, norm_prompts=4, norm_temperature=0.6
        )
        gain, bias, raw = rm.fit_normalization(
            args, graphdef, params, policy, eos, pad, prompts, sharding, jax.random.key(0)
        )
        normalised = gain * raw + bias
        assert abs(normalised.mean()) < 1e-5 and len(raw) == 10
        assert (abs(normalised.std() - 1) < 1e-4) if mode == "gain_bias" else (gain == 1.0)
    sampled, temperature = seen[-1][3], seen[-1][6]
    assert temperature == 0.6 and sampled == prompts


def test_the_normalisation_prompts_are_a_random_draw_of_ppos_prompts(tmp_path, tiny_sft, monkeypatch):
    """Each script's own movie_reviews, cut to the first 50 texts of each split (the 22,412 training reviews encode
    slowly with a BPE of 300 tokens): ppo_prompts is PPO's default prompts, and with n, n of them drawn at random
    (not the first n, not in order), for the embedded data, a --norm-dataset and the training pairs alike."""
    import rlhf_ppo as ppo

    assert len(sft.movie_reviews("train")) == 22_412
    for script in (ppo, rm):
        monkeypatch.setattr(script, "movie_reviews", lambda split, f=script.movie_reviews: f(split)[:50])
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    ours = rm.ppo_prompts(make_args(rm, sft_model=str(tiny_sft)), tok, [])
    queries, mask, _ = ppo.setup_data(make_args(ppo, sft_model=str(tiny_sft), pad_token_id=pad), tok)
    assert len(ours) == len(queries) == 50
    assert [q[m].tolist() for q, m in zip(queries, mask)] == ours
    texts = [f"the film {w} {v}" for w in "was is had got made".split() for v in "a the".split()]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in texts])
    pairs = [{"prompt": t, "chosen": " good", "rejected": " bad"} for t in texts]  # their prompts: 10 distinct texts
    for every, kw, train_pairs in [
        (ours, {}, []),
        (sft.encode_prompts(tok, texts), dict(norm_dataset=str(prompts)), pairs),
        (sft.encode_prompts(tok, texts), dict(dataset="pairs.jsonl"), pairs),
    ]:
        drawn = rm.ppo_prompts(make_args(rm, sft_model=str(tiny_sft), **kw), tok, train_pairs, eos, n=8)
        assert len(drawn) == 8 and all(p in every for p in drawn) and len({tuple(p) for p in drawn}) == 8
        assert drawn != every[:8] and drawn != [p for p in every if p in drawn]  # not the first, not in order


def test_pairs_with_token_ids_train_on_those_ids(tmp_path, tiny_sft):
    """The labeler's sampled ids are what the reward model reads, not a re-tokenisation of their text."""
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    odd = [tok.token_to_id(c) for c in ("Ġ", "t", "h", "e")]  # " the" byte by byte, not as the policy would encode it
    assert tok.encode(tok.decode(odd), add_special_tokens=False).ids != odd
    rows = [
        {
            "prompt": "a",
            "chosen": tok.decode(odd),
            "rejected": "b",
            "prompt_ids": [7],
            "chosen_ids": odd,
            "rejected_ids": [9, eos],
        }
    ]
    pairs = rm.read_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tok.get_vocab_size())
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 16)
    assert data["tokens"][0, 0][data["mask"][0, 0]].tolist() == [7, *odd, eos]
    assert data["tokens"][1, 0][data["mask"][1, 0]].tolist() == [7, 9, eos]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "chosen_ids": [10**6]}])
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'chosen_ids' must be a list of token ids"):
        rm.read_pairs(bad, tok.get_vocab_size())


# ---------------------------------------------------------------- wiring: orientation, direction, accumulation, resume
def rule_pairs(n, seed):
    """Synthetic preferences that follow one token rule: the chosen response contains "great", the rejected "awful"."""
    rng = np.random.default_rng(seed)
    words = "the film was plot actor fun dull boring loved hated".split()
    rows = []
    for _ in range(n):
        prompt, base = " ".join(rng.choice(words, 3)), list(rng.choice(words, 4))
        good, bad = base.copy(), base.copy()
        i = int(rng.integers(0, 5))
        good.insert(i, "great"), bad.insert(i, "awful")
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + " ".join(good),
                "rejected": " " + " ".join(bad),
                "chosen_gold": 1.0,
                "rejected_gold": 0.0,
            }
        )
    return rows


def rm_args(tmp_path, tiny_sft, **kw):
    base = dict(
        sft_model=str(tiny_sft),
        output_dir=str(tmp_path / "rm"),
        checkpoint_dir=str(tmp_path / "ck"),
        batch_size=16,
        num_epochs=2,
        eval_every=5,
        log_every=5,
        checkpoint_every=2,
        max_seq_len=24,
        norm_prompts=16,
        response_length=6,
        learning_rate=3e-3,
    )
    return make_args(rm, **{**base, **kw})


def test_the_reward_model_learns_a_token_rule(tmp_path, tiny_sft, monkeypatch, capsys):
    """Trained on pairs whose chosen side has "great" where the rejected has "awful", the reward model ranks
    held-out pairs right (orientation of the pairs, the loss and the update direction end to end). The held-out
    metrics returned, logged (eval/rm/*) and printed are a naive scoring of exactly the held-out pairs (split by
    prompt: several pairs share one) by the exported model; train/rm/lr is the rate each logged step used."""
    from test_preference_eval import linear_warmup_decay, reward_model_held_out

    rows = rule_pairs(480, seed=0)
    # two held-out pairs labelled against the rule: only the held-out metrics see them (an error, a large loss)
    for row in rm.split_by_prompt(rows, rm.Args().val_fraction)[1][:2]:
        row |= dict(chosen=row["rejected"], rejected=row["chosen"], chosen_gold=0.0, rejected_gold=1.0)
    data = write_jsonl(tmp_path / "rule.jsonl", rows)
    recorder = RecordingWriter()
    monkeypatch.setattr(rm, "summary_writer", lambda args: recorder)
    args = rm_args(tmp_path, tiny_sft, dataset=str(data), num_epochs=3)
    ev = rm.main(args)
    assert ev["accuracy"] >= 0.9 and ev["gold_accuracy"] >= 0.9, ev
    train_pairs, val_pairs = rm.split_by_prompt(rows, args.val_fraction)  # (tests/test_preference_eval.py pins it)
    tok, eos, _ = sft.load_tokenizer(tiny_sft)
    expected, total = reward_model_held_out(args.run.output_dir, tok, eos, val_pairs), 3 * (len(train_pairs) // 16)
    assert ev["gold_pairs"] == expected["gold_pairs"] == len(val_pairs)
    for k in ("accuracy", "loss", "gold_accuracy"):
        assert ev[k] == pytest.approx(expected[k], abs=1e-4), k
        assert recorder.scalars[f"eval/rm/{k}"][total] == pytest.approx(expected[k], abs=1e-4), k
    assert set(recorder.scalars["train/rm/lr"]) == {*range(5, total + 1, 5), total}
    for step, value in recorder.scalars["train/rm/lr"].items():
        assert value == pytest.approx(linear_warmup_decay(args.learning_rate, total, step - 1), rel=1e-5), step
    assert (
        f"held-out: accuracy {ev['accuracy']:.4f} (labels), {ev['gold_accuracy']:.4f} (gold ordering, "
        f"{len(val_pairs)} untied pairs); {len(train_pairs)} training pairs" in capsys.readouterr().out
    )


def test_pair_tensors_and_held_out_accuracy_keep_chosen_first(tmp_path, tiny_sft, monkeypatch):
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    pairs = [
        {"prompt": "the film", "chosen": " was great", "rejected": " was awful"},
        {"prompt": "a plot", "chosen": " fun", "rejected": " dull dull", "chosen_gold": 0.9, "rejected_gold": 0.1},
    ]
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 16)
    for side, name in enumerate(("chosen", "rejected")):
        for i, p in enumerate(pairs):
            ids = data["tokens"][side, i][data["mask"][side, i]].tolist()
            assert tok.decode(ids[:-1]) == p["prompt"] + p[name] and ids[-1] == eos
    np.testing.assert_array_equal(np.isnan(data["gold"][:, 0]), [True, True])
    np.testing.assert_allclose(data["gold"][:, 1], [0.9, 0.1])
    # held-out accuracy: chosen rewards are the first N of the scored rows
    monkeypatch.setattr(rm, "score_all", lambda *a, **k: np.array([1.0, -2.0, 0.0, 3.0]))  # chosen 1, -2; rejected 0, 3
    ev = rm.evaluate(None, None, data, None, 4)
    assert ev["accuracy"] == 0.5 and ev["gold_accuracy"] == 0.0 and ev["gold_pairs"] == 1


def test_the_simulated_labeler_prefers_the_higher_gold_score(tmp_path, tiny_sft, monkeypatch):
    """With a noiseless labeler (tau -> 0) every chosen response has the higher (or equal) gold score. The tiny
    model's text is mostly neutral to VADER, so the gold judge here is the text's length."""
    monkeypatch.setattr(rm, "vader_scores", lambda texts: np.array([len(t) for t in texts], np.float32))
    policy, _ = sft.load_model(tiny_sft)
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    args = rm_args(
        tmp_path,
        tiny_sft,
        labeler_tau=1e-6,
        num_prompts=32,
        pairs_per_prompt=2,
        pairs_file=str(tmp_path / "pairs.jsonl"),
    )
    rm.simulate_labeler(args, policy, tok, eos, pad, jax.random.key(0))
    rows = [json.loads(line) for line in open(args.pairs_file)]
    gold = np.array([[r["chosen_gold"], r["rejected_gold"]] for r in rows])
    assert len(rows) == 64 and (gold[:, 0] >= gold[:, 1]).all() and (gold[:, 0] > gold[:, 1]).sum() >= 20
    for r in rows:  # the sampled ids are kept, with their text for people to read
        assert r["chosen"] == tok.decode(r["chosen_ids"]) and r["rejected"] == tok.decode(r["rejected_ids"])
        assert r["prompt_ids"] == sft.encode_prompts(tok, [r["prompt"]])[0]


def parity_gold(prompts, completions):
    """A gold judge that reads both arguments: the completion's length, counted negative after odd-length prompts."""
    return [len(c) * (-1.0) ** len(p) for p, c in zip(prompts, completions)]


def test_the_simulated_labeler_judges_with_gold_fn(tmp_path, tiny_sft):
    """--gold-fn: each pair's gold scores are the function's of its own prompt and responses (the prompt's parity
    flips the sign), and the noiseless labeler chooses by them; a function returning the wrong number of scores, or a
    non-finite one, is refused naming the flag."""
    policy, _ = sft.load_model(tiny_sft)
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    args = rm_args(tmp_path, tiny_sft, labeler_tau=1e-6, num_prompts=24, pairs_per_prompt=2,
                   pairs_file=str(tmp_path / "pairs.jsonl"), gold_fn="test_reward_model:parity_gold")  # fmt: skip
    rm.simulate_labeler(args, policy, tok, eos, pad, jax.random.key(0))
    rows = [json.loads(line) for line in open(args.pairs_file)]
    for r in rows:
        assert [r["chosen_gold"], r["rejected_gold"]] == parity_gold([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert r["chosen_gold"] >= r["rejected_gold"]
    signs = {np.sign(r["chosen_gold"]) for r in rows if r["chosen_gold"] != r["rejected_gold"]}
    assert signs == {-1.0, 1.0} and sum(r["chosen_gold"] > r["rejected_gold"] for r in rows) >= 20
    assert rm.gold_scores(None, ["a"], ["great fun"]) == pytest.approx(rm.vader_scores(["great fun"]))
    for bad in ("test_reward_model:wrong_length_gold", "test_reward_model:nan_gold"):
        with pytest.raises(ValueError, match=f"--gold-fn {bad}: returned"):
            rm.gold_scores(bad, ["a", "b"], ["c", "d"])


def wrong_length_gold(prompts, completions):
    return [0.0]


def nan_gold(prompts, completions):
    return [0.0, float("nan")]


def tiny_pair_batch(accum=1, rows=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(12)[None, None] < rng.integers(3, 13, (2, rows, 1))
    batch = {
        "tokens": rng.integers(1, 64, (2, rows, 12)).astype(np.int32),
        "mask": mask,
        "gold": rng.normal(size=(2, rows)).astype(np.float32),
    }
    return {k: np.moveaxis(v.reshape(2, accum, rows // accum, *v.shape[2:]), 1, 0) for k, v in batch.items()}


def test_gradient_accumulation_equals_one_big_batch():
    """Three SGD steps with 2 accumulated micro-batches equal three steps on the whole batch."""
    tx, out = optax.sgd(0.5), []
    for accum in (1, 2):
        graphdef, params = nnx.split(tiny_score_model(seed=4))
        opt_state, batch, losses = tx.init(params), tiny_pair_batch(accum), []
        for _ in range(3):
            params, opt_state, metrics = rm.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
            losses.append(float(metrics["loss"]))
        out.append((losses, params))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)  # float32 sums in another order
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_step_lowers_the_preference_loss_and_a_non_finite_one_changes_nothing():
    graphdef, params = nnx.split(tiny_score_model(seed=5))
    batch = tiny_pair_batch()
    tx, _ = rm.make_optimizer(make_args(rm, learning_rate=1e-2), 100)
    tx = optax.chain(tx, optax.scale(1.0))
    loss = lambda p: float(rm.preference_loss(p, graphdef, {k: v[0] for k, v in batch.items()})[0])  # noqa: E731
    opt_state = tx.init(params)
    for _ in range(3):  # the first steps of the warm-up
        before = loss(params)
        params, opt_state, _ = rm.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
    assert loss(params) < before
    huge = jax.tree.map(lambda x: x * 1e30, params)
    out_params, out_state, metrics = rm.train_step(
        graphdef, tx, *jax.tree.map(jnp.copy, (huge, opt_state)), batch, jax.random.key(0)
    )
    assert not (np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])))
    for a, b in zip(jax.tree.leaves((out_params, out_state)), jax.tree.leaves((huge, opt_state))):
        np.testing.assert_array_equal(a, b)


def test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_model(tmp_path, tiny_sft, monkeypatch):
    data = write_jsonl(tmp_path / "rule.jsonl", rule_pairs(160, seed=1))
    straight = rm_args(tmp_path / "a", tiny_sft, dataset=str(data))
    rm.main(straight)
    args = rm_args(tmp_path / "b", tiny_sft, dataset=str(data))
    kill_during_call(monkeypatch, rm, "train_step", 12, lambda: rm.main(args))  # of 16 steps; state saved every 2
    with pytest.raises(FileExistsError, match="unfinished run"):
        rm.main(args)
    rm.main(make_args(rm, **{**vars(args), "resume": True}))
    (step_a, a), (step_b, b) = read_checkpoint(straight.run.checkpoint_dir), read_checkpoint(args.run.checkpoint_dir)
    assert step_a == step_b == 16
    assert {int(c) for c in jax.tree.leaves(a["opt_state"]) if np.asarray(c).dtype.kind == "i"} == {16}  # 16 steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    exported, cfg = sft.load_model(tmp_path / "b" / "rm")
    assert_same_params(exported, a["params"])
    assert cfg.reward_gain != 1.0 and cfg.reward_bias != 0.0  # the normalisation is in the export


def test_a_diverging_run_stops_and_leaves_the_output_dir_unchanged(tmp_path, tiny_sft):
    data = write_jsonl(tmp_path / "rule.jsonl", rule_pairs(64, seed=2))
    out = tmp_path / "rm"
    out.mkdir()
    (out / "config.json").write_text("{}")
    digest = tree_digest(out)
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite"):
        rm.main(rm_args(tmp_path, tiny_sft, dataset=str(data), learning_rate=1e30, max_grad_norm=1e30))
    assert tree_digest(out) == digest


@pytest.mark.parametrize(
    "override, message",
    [
        ({"batch_size": 6, "num_devices": 4}, "--batch-size 6"),
        ({"labeler_tau": 0.0}, "--labeler-tau"),
        ({"temperature": 0.0}, "--temperature"),
        ({"num_epochs": 0}, "--num-epochs"),
        ({"batch_size": 256}, "more than the .* training pairs"),
        ({"max_seq_len": 4096}, "more than the model's context"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_flag(tmp_path, tiny_sft, override, message):
    data = write_jsonl(tmp_path / "rule.jsonl", rule_pairs(64, seed=3))
    if "max_seq_len" in override:  # pairs that long: one very long prompt
        rows = rule_pairs(63, seed=3) + [{"prompt": "the " * 3000, "chosen": " a", "rejected": " b"}]
        data = write_jsonl(tmp_path / "rule.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        rm.main(rm_args(tmp_path, tiny_sft, dataset=str(data), **override))


def test_a_pairs_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"chosen": "a", "rejected": "b"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2: not UTF-8 text"):
        rm.read_pairs(path)
