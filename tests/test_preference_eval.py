"""What reward_model.py and dpo.py show their users, against independent computations: held-out splits by prompt
(several pairs per prompt, text, conversational and implicit prompts; DPO's split is the reward model's), every
held-out metric computed on exactly the held-out pairs, the logged rewards/* and logps/* away from the reference
(β ≠ 1, a chosen side that wins on some pairs and loses on others), the flags DPO's evaluation hands to PPO's, and a
conversational pair whose side holds several messages (which tokens are the reply)."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_args
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from test_sft import write_jsonl

import dpo
import reward_model as rm
import sft

WORDS = "the film was great good bad awful boring loved hated plot actor fun dull".split()


def prompt_pairs(counts, seed):
    """Text pairs: prompt j has counts[j] pairs (distinct prompts); responses of 1-4 words; gold scores on most pairs,
    some tied, some absent."""
    rng = np.random.default_rng(seed)
    rows = []
    for j, n in enumerate(counts):
        prompt = f"{WORDS[j % len(WORDS)]} {WORDS[(j // len(WORDS) + 3 * j) % len(WORDS)]} {j}"
        for _ in range(n):
            row = {
                "prompt": prompt,
                **{s: " " + " ".join(rng.choice(WORDS, rng.integers(1, 5))) for s in ("chosen", "rejected")},
            }
            kind = rng.integers(0, 4)
            if kind:  # 0: no gold scores; 1: tied; else two scores in either order
                gold = (0.5, 0.5) if kind == 1 else tuple(np.round(rng.uniform(-1, 1, 2), 3).tolist())
                row |= {"chosen_gold": gold[0], "rejected_gold": gold[1]}
            rows.append(row)
    return rows


def prompt_of(pair):
    return json.dumps(pair["prompt"])


def assert_partition(pairs, train, val):
    """train and val are the pairs, each exactly once, in the file's order."""
    assert len(train) + len(val) == len(pairs)
    assert [p for p in pairs if any(p is q for q in train)] == train
    assert [p for p in pairs if any(p is q for q in val)] == val


# ---------------------------------------------------------------- 1. held-out splits
def test_split_by_prompt_holds_out_the_flags_fraction_of_prompts_with_all_their_pairs():
    counts = [1, 4, 2, 3] * 5  # 20 prompts, 50 pairs: a fraction of the prompts is not that fraction of the pairs
    pairs = prompt_pairs(counts, seed=0)
    for fraction, held_prompts in ((0.25, 5), (0.5, 10), (0.01, 1)):
        train, val = rm.split_by_prompt(pairs, fraction)
        assert_partition(pairs, train, val)
        val_prompts, train_prompts = {p["prompt"] for p in val}, {p["prompt"] for p in train}
        assert not val_prompts & train_prompts  # no prompt on both sides
        assert len(val_prompts) == held_prompts  # int(20 * fraction) prompts (at least one), whatever their pairs
        for prompt in val_prompts:  # every pair of a held-out prompt is held out
            assert sum(p["prompt"] == prompt for p in val) == sum(p["prompt"] == prompt for p in pairs)
        # the same prompts whatever the order of the file
        shuffled = [pairs[i] for i in np.random.default_rng(1).permutation(len(pairs))]
        assert {p["prompt"] for p in rm.split_by_prompt(shuffled, fraction)[1]} == val_prompts


def test_split_by_prompt_keys_conversations_by_all_their_messages_and_splits_implicit_prompt_pairs():
    """Six conversations, four of them ending in the same user message (a different history each): half of the
    conversations held out, each with both its pairs. Implicit-prompt pairs (one prompt, "") are split themselves."""
    last = [{"role": "user", "content": "and then?"}]
    convs = [[{"role": "user", "content": w}, {"role": "assistant", "content": "ok"}] + last for w in WORDS[:4]]
    convs += [[{"role": "user", "content": w}] for w in ("plot", "actor")]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pairs = [{"prompt": c, "chosen": reply(f"good {k}"), "rejected": reply("bad")} for c in convs for k in range(2)]
    train, val = rm.split_by_prompt(pairs, 0.5)
    assert_partition(pairs, train, val)
    held = [c for c in convs if any(p["prompt"] == c for p in val)]
    assert len(held) == 3 and len(val) == 6  # int(6 * 0.5) conversations, with both their pairs
    assert not any(p["prompt"] == q["prompt"] for p in val for q in train)

    implicit = [{"prompt": "", "chosen": f" good {k}", "rejected": " bad"} for k in range(10)]
    train, val = rm.split_by_prompt(implicit, 0.3)
    assert_partition(implicit, train, val)
    assert (len(train), len(val)) == (7, 3)


def test_dpo_and_the_reward_model_split_tokenise_and_hold_out_the_same_pairs(tmp_path, tiny_sft):
    """From a file with several pairs per prompt and --val-fraction 0.25 in both scripts: identical train and held-out
    arrays; the held-out rows are all the pairs of 5 of the 20 prompts, none of whose prompts is trained on; DPO's
    response mask is the response's tokens and EOS, read back as text."""
    counts = [1, 4, 2, 3] * 5
    rows = prompt_pairs(counts, seed=2)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    d_train, d_val = dpo.load_preferences(
        make_args(dpo, dataset=str(path), val_fraction=0.25, max_seq_len=32), tok, eos, pad
    )
    _, r_train, r_val = rm.load_pairs(
        make_args(rm, dataset=str(path), val_fraction=0.25, max_seq_len=32), tok, eos, pad
    )
    for ours, theirs in ((d_train, r_train), (d_val, r_val)):
        assert set(ours) == set(theirs) | {"response_mask"}
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

    def read_back(data):  # -> [(prompt, chosen, rejected)] decoded from the arrays
        text = lambda side, i, m: tok.decode(data["tokens"][side, i][m].tolist(), skip_special_tokens=False)  # noqa: E731
        out = []
        for i in range(data["tokens"].shape[1]):
            m, resp = data["mask"][:, i], data["response_mask"][:, i]
            assert text(0, i, m[0] & ~resp[0]) == text(1, i, m[1] & ~resp[1])  # one prompt per pair
            out.append((text(0, i, m[0] & ~resp[0]), text(0, i, resp[0]), text(1, i, resp[1])))
        return out

    train, val = read_back(d_train), read_back(d_val)
    expected = [(r["prompt"], r["chosen"] + "<|endoftext|>", r["rejected"] + "<|endoftext|>") for r in rows]
    assert sorted(train + val) == sorted(expected)  # each pair once; the response mask is exactly response + EOS
    held = {p for p, _, _ in val}
    assert len(held) == 5 and not held & {p for p, _, _ in train}
    assert len(val) == sum(
        n for r_prompt, n in zip(dict.fromkeys(r["prompt"] for r in rows), counts) if r_prompt in held
    )
    gold = {
        (r["prompt"], r["chosen"] + "<|endoftext|>"): (r.get("chosen_gold", np.nan), r.get("rejected_gold", np.nan))
        for r in rows
    }
    for i, (p, c, _) in enumerate(val):  # the gold scores travel with their held-out pair, chosen first
        np.testing.assert_array_equal(d_val["gold"][:, i], np.float32(gold[p, c]))


def test_max_train_pairs_keeps_the_first_n_training_pairs_and_the_same_held_out_pairs(tmp_path, tiny_sft):
    """--max-train-pairs 6 on 20 prompts of 1-4 pairs (6 ends inside a prompt's pairs): the training arrays are the
    file's first 6 pairs whose prompt is not held out, in file order; the held-out arrays are those without the flag;
    every training pair is allowed, 0 and one more are refused, naming the flag."""
    rows = prompt_pairs([1, 4, 2, 3] * 5, seed=3)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok, eos, pad = sft.load_tokenizer(tiny_sft)

    def load(**flags):
        return rm.load_pairs(
            make_args(rm, dataset=str(path), val_fraction=0.25, max_seq_len=32, **flags), tok, eos, pad
        )

    def texts(data, side):  # prompt + response + EOS of each pair, decoded
        return [
            tok.decode(t[m].tolist(), skip_special_tokens=False)
            for t, m in zip(data["tokens"][side], data["mask"][side])
        ]

    _, full_train, full_val = load()
    train_pairs, train, val = load(max_train_pairs=6)
    for k in full_val:
        np.testing.assert_array_equal(val[k], full_val[k], err_msg=k)
    text = lambda r, side: r["prompt"] + r[side] + "<|endoftext|>"  # noqa: E731
    held_prompts = {r["prompt"] for r in rows if text(r, "chosen") in texts(full_val, 0)}
    kept = [r for r in rows if r["prompt"] not in held_prompts][:6]
    assert len(held_prompts) == 5 and train["tokens"].shape[1] == len(train_pairs) == 6
    assert texts(train, 0) == [text(r, "chosen") for r in kept]
    assert texts(train, 1) == [text(r, "rejected") for r in kept]
    n = full_train["tokens"].shape[1]
    assert n > 6 and texts(load(max_train_pairs=n)[1], 1) == texts(full_train, 1)
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=rf"--max-train-pairs {bad}: must be in \[1, {n}\]"):
            load(max_train_pairs=bad)


# ---------------------------------------------------------------- naive references
def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, mask):
    """The model's plain forward pass (logits or scores), positions 0, 1, ... (right padding)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nnx.merge(graphdef, params)(tokens, positions, mask)[0]


def naive_rows(model, rows, L=40):
    """The model's outputs on rows of token ids (right-padded to L in one batch): [n, ...] each."""
    tokens = np.array([r + [0] * (L - len(r)) for r in rows], np.int32)
    mask = np.arange(L)[None] < np.array([len(r) for r in rows])[:, None]
    out = np.asarray(forward(*nnx.split(model), tokens, mask))
    return [out[i, : len(r)] for i, r in enumerate(rows)]


def naive_logps(model, rows, starts):
    """float64 Σ_{t >= start} log π(row[t] | row[:t]): the response tokens' log-probs from the full logits."""
    return np.array(
        [
            sum(lp[t - 1, row[t]] for t in range(start, len(row)))
            for row, start, lp in zip(rows, starts, map(log_softmax64, naive_rows(model, rows)))
        ]
    )


def text_rows(tok, eos, pairs):
    """-> rows [2][N] (prompt ids + response ids + EOS, tokenised piece by piece) and the prompts' lengths [N]."""
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731 (this tokenizer has no BOS)
    rows = [[enc(p["prompt"]) + enc(p[side]) + [eos] for p in pairs] for side in ("chosen", "rejected")]
    return rows, [len(enc(p["prompt"])) for p in pairs]


def perturbed(params, scale, seed):
    """A policy different from the reference: every weight plus N(0, scale²) noise."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def gold_of(pairs):
    return np.array([[p.get(f"{s}_gold", np.nan) for p in pairs] for s in ("chosen", "rejected")], np.float64)


# ---------------------------------------------------------------- 2-3. the reward model's metrics
@pytest.fixture(scope="module")
def score_model(tiny_sft):
    model, _ = sft.load_model(tiny_sft, architecture="LlamaForSequenceClassification", seed=3)
    return model


def naive_scores(model, rows):
    return np.array([s[-1] for s in naive_rows(model, rows)], np.float64)  # read at the EOS, the last token


def test_reward_model_metrics_equal_a_naive_computation(tiny_sft, score_model):
    """preference_loss's metrics (train/rm/*) — a train step's over 2 accumulated micro-batches — and evaluate's
    (eval/rm/*, in batches of 3 with the last one padded) against scores of each row alone, on pairs whose chosen side
    wins on some and loses on others, with gold scores tied, absent and disagreeing with the labels."""
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    pairs = prompt_pairs([2, 3, 1, 2], seed=4)  # 8 pairs
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 32)
    rows, _ = text_rows(tok, eos, pairs)
    for side in (0, 1):
        assert [t[m].tolist() for t, m in zip(data["tokens"][side], data["mask"][side])] == rows[side]
    r_c, r_r = naive_scores(score_model, rows[0]), naive_scores(score_model, rows[1])
    margin, gold = r_c - r_r, gold_of(pairs)
    gold_margin = gold[0] - gold[1]
    strict = ~np.isnan(gold_margin) & (gold_margin != 0)
    assert 0 < np.mean(margin > 0) < 1 and np.mean(margin > 0) != 0.5 and strict.sum() >= 3

    graphdef, params = nnx.split(score_model)
    idx = np.arange(8).reshape(2, 4)  # [A, B]
    batch = {k: np.moveaxis(v[:, idx], 1, 0) for k, v in data.items()}  # [A, 2, B, ...], as main builds it
    _, _, metrics = rm.train_step(
        graphdef, optax.sgd(0.1), jax.tree.map(jnp.copy, params), optax.sgd(0.1).init(params), batch, jax.random.key(0)
    )
    m = {k: float(v) for k, v in metrics.items()}
    assert m["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-margin))), abs=1e-5)
    assert m["accuracy"] == pytest.approx(np.mean(margin > 0))
    assert m["chosen_rewards"] == pytest.approx(r_c.mean(), abs=1e-5)
    assert m["rejected_rewards"] == pytest.approx(r_r.mean(), abs=1e-5)
    assert m["margin"] == pytest.approx(margin.mean(), abs=1e-5)
    # the gold counts of each micro-batch, averaged over the two
    assert m["gold_count"] * 2 == strict.sum()
    assert m["gold_accuracy_sum"] * 2 == np.sum(((margin > 0) == (gold_margin > 0))[strict])

    val = {k: v[:, 1:] for k, v in data.items()}  # 7 held-out pairs, scored 3 at a time
    sharding = NamedSharding(rm.make_mesh(1), PartitionSpec("data"))
    ev = rm.evaluate(graphdef, params, val, sharding, 3)
    vm, vs = margin[1:], strict[1:]
    assert ev["accuracy"] == pytest.approx(np.mean(vm > 0))
    assert ev["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-vm))), abs=1e-5)
    assert ev["gold_pairs"] == vs.sum()
    assert ev["gold_accuracy"] == pytest.approx(np.mean((vm > 0)[vs] == (gold_margin[1:] > 0)[vs]))


def linear_warmup_decay(peak, total, step):
    """The learning rate of optimizer step `step` (0-based): warm-up over max(1, total // 10) steps, then decay to 0."""
    warmup = max(1, total // 10)
    return peak * step / warmup if step < warmup else peak * (1 - (step - warmup) / (total - warmup))


def reward_model_held_out(output_dir, tok, eos, val_pairs):
    """eval/rm/* of the exported reward model on exactly val_pairs, naively: each raw score (the normalisation taken
    off) read at the EOS of its row alone; the accuracy strict, the loss −log σ(margin), the gold accuracy on the
    pairs with untied gold scores."""
    model, cfg = sft.load_model(output_dir)
    (chosen, rejected), _ = text_rows(tok, eos, val_pairs)
    margin = (naive_scores(model, chosen) - naive_scores(model, rejected)) / cfg.reward_gain
    gold_margin = gold_of(val_pairs)[0] - gold_of(val_pairs)[1]
    strict = ~np.isnan(gold_margin) & (gold_margin != 0)
    return {
        "accuracy": np.mean(margin > 0),
        "loss": np.mean(np.log1p(np.exp(-margin))),
        "gold_accuracy": np.mean((margin > 0)[strict] == (gold_margin > 0)[strict]),
        "gold_pairs": int(strict.sum()),
    }


# ---------------------------------------------------------------- 2-4. DPO's metrics
@pytest.fixture(scope="module")
def dpo_setup(tiny_sft):
    """8 text pairs tokenised as dpo.py reads them, the reference (the SFT model), a policy different from it, and
    each one's naive log π of every side [2, N] with the responses' lengths [2, N]."""
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    pairs = prompt_pairs([2, 3, 1, 2], seed=6)
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 32, None, True)
    rows, starts = text_rows(tok, eos, pairs)
    for side in (0, 1):
        assert [t[m].tolist() for t, m in zip(data["tokens"][side], data["mask"][side])] == rows[side]
    reference, _ = sft.load_model(tiny_sft)
    graphdef, ref_params = nnx.split(reference)
    params = perturbed(ref_params, 0.05, seed=1)
    policy = nnx.merge(graphdef, params)
    ref = np.array([naive_logps(reference, rows[s], starts) for s in (0, 1)])
    logps = np.array([naive_logps(policy, rows[s], starts) for s in (0, 1)])
    lengths = np.array([[len(r) - s for r, s in zip(rows[side], starts)] for side in (0, 1)])
    return dict(data=data, pairs=pairs, graphdef=graphdef, params=params, ref=ref, logps=logps, lengths=lengths)


def naive_losses(loss_type, beta, eps, logps, ref, lengths):
    rho = logps - ref  # [2, N]
    h = rho[0] - rho[1]
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    return (rho[0] / lengths[0] - rho[1] / lengths[1] - 1 / (2 * beta)) ** 2


def test_dpo_train_step_logs_trls_metrics_away_from_the_reference(dpo_setup):
    """A step of 2 accumulated micro-batches of 4 pairs, with a policy that is not the reference and β = 0.7 (the
    chosen side ahead on 3 or 5 of the 8 pairs, not 0, 4 or 8): loss, rewards/* (β log π/π_ref, batch means, chosen
    − rejected) and logps/* (summed over the response) equal the naive float64 values."""
    s = dpo_setup
    rewards = 0.7 * (s["logps"] - s["ref"])
    acc = np.mean(rewards[0] > rewards[1])
    assert acc not in (0.0, 0.5, 1.0), acc
    idx = np.arange(8).reshape(2, 4)  # [A, B]
    data = s["data"] | {"ref_logps": s["ref"].astype(np.float32)}
    batch = {k: np.moveaxis(v[:, idx], 1, 0) for k, v in data.items()}  # [A, 2, B, ...], as main builds it
    tx = optax.sgd(1e-3)
    args = make_args(dpo, beta=0.7, batch_size=4, grad_accum_steps=2)
    params = jax.tree.map(jnp.copy, s["params"])
    _, _, metrics = dpo.train_step(args, s["graphdef"], tx, params, tx.init(params), None, batch, jax.random.key(0))
    m = {k: float(v) for k, v in metrics.items()}
    losses = naive_losses("sigmoid", 0.7, 0.0, s["logps"], s["ref"], s["lengths"])
    assert m["loss"] == pytest.approx(losses.mean(), rel=1e-4, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(rewards[0].mean(), abs=1e-4)
    assert m["rewards/rejected"] == pytest.approx(rewards[1].mean(), abs=1e-4)
    assert m["rewards/accuracies"] == acc
    assert m["rewards/margins"] == pytest.approx((rewards[0] - rewards[1]).mean(), abs=1e-4)
    assert m["logps/chosen"] == pytest.approx(s["logps"][0].mean(), abs=1e-3)
    assert m["logps/rejected"] == pytest.approx(s["logps"][1].mean(), abs=1e-3)


def test_dpo_held_out_preference_metrics_equal_a_naive_computation(dpo_setup):
    """preference_accuracy on 7 held-out pairs scored 3 at a time (the last batch padded), a policy that is not the
    reference, β = 0.7, each loss: eval/loss (the mean), eval/rewards/accuracies (strictly ahead), margins (chosen −
    rejected) and gold_accuracies (the sign of the gold margin, untied pairs only) against float64 values."""
    s = dpo_setup
    val = {k: v[:, 1:] for k, v in s["data"].items()} | {"ref_logps": s["ref"][:, 1:].astype(np.float32)}
    logps, ref, lengths = s["logps"][:, 1:], s["ref"][:, 1:], s["lengths"][:, 1:]
    margin = 0.7 * ((logps[0] - ref[0]) - (logps[1] - ref[1]))
    gold = gold_of(s["pairs"][1:])
    gold_margin = gold[0] - gold[1]
    untied = ~np.isnan(gold_margin) & (gold_margin != 0)
    assert 0 < np.mean(margin > 0) < 1 and untied.sum() >= 3 and (~untied).any()
    assert np.any(np.sign(margin[untied]) == np.sign(gold_margin[untied]))
    assert not np.all(np.sign(margin[untied]) == np.sign(gold_margin[untied]))
    sharding = NamedSharding(dpo.make_mesh(1), PartitionSpec(None, "data"))
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)):
        args = make_args(dpo, loss_type=loss_type, beta=0.7, label_smoothing=eps, batch_size=3)
        ev = dpo.preference_accuracy(args, s["graphdef"], s["params"], val, sharding)
        losses = naive_losses(loss_type, 0.7, eps, logps, ref, lengths)
        assert ev["eval/loss"] == pytest.approx(losses.mean(), rel=1e-4, abs=1e-5), (loss_type, eps)
        assert ev["eval/rewards/accuracies"] == pytest.approx(np.mean(margin > 0))
        assert ev["eval/rewards/margins"] == pytest.approx(margin.mean(), abs=1e-4)
        assert ev["eval/rewards/gold_accuracies"] == pytest.approx(
            np.mean(np.sign(margin[untied]) == np.sign(gold_margin[untied]))
        )


def gold_chars(prompts, completions):  # a gold judge that reads both arguments (--gold-fn)
    return [0.1 * len(c) - 0.01 * len(p) for p, c in zip(prompts, completions)]


def test_dpo_evaluates_as_rlhf_ppo_does(tiny_pipeline):
    """DPO's evaluation (its own code, dpo.py imports no other script) gives rlhf_ppo.py's metrics and samples table
    for the same policy and flags: a policy away from the reference (KL > 0), the reward model and --gold-fn scoring,
    --eval-dataset prompts, a temperature and response length off PPO's defaults; without a reward model, a proxy
    score of 0 in both."""
    import test_ppo_reference

    import rlhf_ppo as ppo

    tmp, prompts = tiny_pipeline
    tok, _, pad = dpo.load_tokenizer(tmp / "sft")
    policy = test_ppo_reference.perturbed(nnx.split(dpo.load_model(tmp / "sft")[0])[1], jax.random.key(5), 0.05)
    flags = dict(sft_model=str(tmp / "sft"), prompt_tokens=5, eval_prompts=6, eval_dataset=str(prompts))
    flags |= dict(response_length=9, temperature=0.9, num_sample_rows=4, gold_fn="test_preference_eval:gold_chars")
    # the EOS: the token the policy samples most, so that responses end at different positions, some never
    pargs = make_args(ppo, **flags, reward_model=None, value_model="shared", stop_token_id=-1)
    pargs = ppo.resolve_token_ids(pargs, -1, pad)
    models, params, _ = ppo.load_models(pargs, jnp.float32)
    queries, query_mask = ppo.evaluation_sets(pargs, tok, None)["heldout"]
    key = jax.random.fold_in(jax.random.key(1234), 0)  # the evaluation's key of its first set
    drawn = ppo.generate(pargs, models, params | {"policy": policy}, queries, query_mask, key)[0]
    eos = int(np.bincount(np.asarray(drawn).ravel()).argmax())
    for reward_model in (str(tmp / "rm"), None):
        flags["reward_model"] = reward_model
        pargs = ppo.resolve_token_ids(make_args(ppo, **flags, value_model="shared"), eos, pad)
        models, params, frozen = ppo.load_models(pargs, jnp.float32)
        theirs, their_table = ppo.evaluate(
            pargs, models, tok, params | {"policy": policy}, frozen, ppo.evaluation_sets(pargs, tok, None)
        )
        args = make_args(dpo, **flags)
        model, cfg = dpo.load_model(args.sft_model)
        graphdef = nnx.split(model)[0]
        reward = nnx.split(dpo.load_model(reward_model)[0]) if reward_model else (None, None)
        frozen = {"ref": frozen["ref"], "reward": reward[1]}
        eval_sets = dpo.evaluation_sets(args, tok, pad, None)
        ours, our_table = dpo.sample_and_judge(
            args, graphdef, reward[0], cfg, tok, policy, frozen, eval_sets, (eos, pad)
        )
        assert set(ours) == set(theirs) and our_table == their_table
        for k in theirs:
            assert ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6), k
        assert abs(theirs["eval/kl"]) > 0.01 and (theirs["eval/proxy_score"] != 0) == (reward_model is not None)
    stops = (np.asarray(drawn) == eos).any(1)
    assert 0 < stops.sum() < len(stops)  # some responses stop before the end, some never


def test_dpo_summary_prints_each_evaluation_value_under_its_name():
    keys = ("eval/rewards/accuracies", "eval/rewards/gold_accuracies", "eval/gold_score", "eval/proxy_score", "eval/kl")
    metrics = {k: 0.1 * (i + 1) + 0.01234 for i, k in enumerate(keys)} | {"eval/loss": 9.0, "eval/heldout/kl": 8.0}
    assert dpo.summary(metrics) == (
        "rewards/accuracies 0.1123, rewards/gold_accuracies 0.2123, gold_score 0.3123, proxy_score 0.4123, kl 0.5123"
    )


# ---------------------------------------------------------------- 5. a side of several messages
# a chat template of short role markers (the tiny tokenizer has no chat template): "u:text<eos>\n" per message
TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def test_a_side_of_several_messages_is_all_of_them_after_the_generation_prompt(tmp_path, tiny_sft):
    """A chosen side [assistant, user, assistant] (explicit prompt) and an implicit prompt of three messages: each
    row is the prompt rendered with the generation prompt + the rest of the rendered conversation through its last
    EOS; the response mask (what DPO scores, TRL's completion) is exactly that rest, the later user turn included, and
    DPO's log π sums exactly those tokens (against the rendering written out by hand)."""
    tok, eos, pad = sft.load_tokenizer(tiny_sft)
    chat = rm.ChatTemplate(TEMPLATE, (("eos_token", "<|endoftext|>"),), "test")
    msg = lambda role, text: {"role": role, "content": text}  # noqa: E731
    history = [msg("user", "the plot"), msg("assistant", "fun"), msg("user", "and the actor")]
    rows = [
        {
            "prompt": [msg("user", "the film")],
            "chosen": [msg("assistant", "great fun"), msg("user", "why"), msg("assistant", "the plot")],
            "rejected": [msg("assistant", "dull")],
        },
        {"chosen": history + [msg("assistant", "great")], "rejected": history + [msg("assistant", "awful boring")]},
    ]
    pairs = rm.read_pairs(write_jsonl(tmp_path / "chat.jsonl", rows), tok.get_vocab_size(), chat)
    E = "<|endoftext|>"
    prompts = [f"u:the film{E}\na:", f"u:the plot{E}\na:fun{E}\nu:and the actor{E}\na:"]
    replies = [[f"great fun{E}\nu:why{E}\na:the plot{E}", f"dull{E}"], [f"great{E}", f"awful boring{E}"]]
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 40, chat, with_response_mask=True)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    text = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    expected_rows, starts = [[], []], [[], []]
    for i, (prompt, sides) in enumerate(zip(prompts, replies)):
        for side, reply in enumerate(sides):
            row = enc(prompt + reply)
            assert row[: len(enc(prompt))] == enc(prompt)  # the prompt's tokens start the conversation's
            tokens, m, resp = (data[k][side, i] for k in ("tokens", "mask", "response_mask"))
            assert tokens[m].tolist() == row and text(tokens[resp]) == reply and text(tokens[m & ~resp]) == prompt
            assert resp.sum() == len(row) - len(enc(prompt)) and not (resp & ~m).any()
            expected_rows[side].append(row), starts[side].append(len(enc(prompt)))
    model, _ = sft.load_model(tiny_sft)
    graphdef, params = nnx.split(model)
    for side in (0, 1):
        ours, lengths = jax.jit(dpo.sequence_logps, static_argnums=0)(
            graphdef, params, *(data[k][side] for k in ("tokens", "mask", "response_mask"))
        )
        np.testing.assert_allclose(ours, naive_logps(model, expected_rows[side], starts[side]), rtol=0, atol=1e-4)
        assert lengths.tolist() == [len(r) - s for r, s in zip(expected_rows[side], starts[side])]
    # the reward model reads each row at the EOS that ends the last reply
    m = data["mask"]
    last = m & ~np.concatenate([m[..., 1:], np.zeros_like(m[..., :1])], axis=-1)
    assert (last.sum(-1) == 1).all() and (data["tokens"][last] == eos).all()
