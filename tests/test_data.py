"""The data rules every stage shares: the IMDB splits, their cleaning, and how prompts are encoded."""

import json

import numpy as np
import pytest
from conftest import make_args
from test_sft import write_jsonl
from tokenizers import processors

import reward_model as rm
import rlhf_ppo as ppo
import sft


def test_the_imdb_splits_are_disjoint_cleaned_and_the_same_in_every_script():
    splits = {s: sft.movie_reviews(s) for s in ("train", "labeler", "eval", "rotten_tomatoes")}
    assert [len(splits[s]) for s in splits] == [22_412, 1_992, 499, 8_530]
    assert not set(splits["train"]) & set(splits["labeler"]) and not set(splits["eval"]) & (
        set(splits["train"]) | set(splits["labeler"])
    )
    assert not any("<br" in t for texts in splits.values() for t in texts)
    for script in (rm, ppo):  # the copies in the appendix of each script
        assert script.movie_reviews("eval") == splits["eval"]


@pytest.fixture
def bos_tokenizer(tmp_path):
    """A Llama-style tokenizer that adds a BOS token to every encoding with special tokens."""
    tok = sft.train_tokenizer(["the film was great", "a dull plot", "good actor"] * 20, 300, tmp_path / "tok")
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>"}))
    tok, eos, pad = sft.load_tokenizer(tmp_path / "tok")
    assert tok.encode("the film").ids[0] == bos
    return tok, bos, eos, pad


def test_every_stage_starts_its_sequences_with_the_tokenizers_bos(tmp_path, bos_tokenizer, monkeypatch):
    """SFT trains on BOS + text; the labeler's, the normalisation's and PPO's prompts, and the reward model's pairs,
    start the same way (one rule: sft.encode_prompts). Each split is cut to its first 20 texts."""
    tok, bos, eos, pad = bos_tokenizer
    for script in (ppo, rm):
        monkeypatch.setattr(script, "movie_reviews", lambda split, f=script.movie_reviews: f(split)[:20])
    data, _ = sft.tokenize(
        tok, [{"prompt": "", "completion": "the film"}, {"prompt": "a plot:", "completion": " good"}], eos, pad, 16
    )
    assert (data["tokens"][:, 0] == bos).all() and not data["loss_mask"][:, 0].any()
    labeler_prompts = sft.encode_prompts(tok, sft.movie_reviews("labeler")[:5], 8)
    assert all(p[0] == bos and len(p) == 9 for p in labeler_prompts)
    pairs, _ = rm.tokenize_pairs(tok, [{"prompt": "the film", "chosen": " good", "rejected": " dull"}], eos, pad, 16)
    assert (pairs["tokens"][:, 0, 0] == bos).all()
    assert all(p[0] == bos for p in rm.ppo_prompts(make_args(rm), tok, [])[:5])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the film"}, {"prompt": "a dull plot was"}])
    for dataset in (None, str(prompts)):
        queries, mask, eval_sets = ppo.setup_data(
            make_args(ppo, dataset=dataset, eval_prompts=4, pad_token_id=pad), tok
        )
        for q, m in [(queries, mask), *eval_sets.values()]:
            first_real = np.asarray(q)[np.arange(len(q)), np.argmax(np.asarray(m), axis=1)]
            assert (first_real == bos).all()


def rows_of(queries, mask):
    """Left-padded prompts [N, P] -> a list of token-id lists (the real tokens of each row)."""
    return [list(q[m]) for q, m in zip(np.asarray(queries), np.asarray(mask, bool))]


def test_each_stage_reads_the_split_its_docstring_names(tmp_path, tiny_sft, monkeypatch):
    """PPO trains on the openings of the training reviews and evaluates on those of the held-out reviews and of Rotten
    Tomatoes, the first --eval-prompts of each in order; --dataset and --eval-dataset replace them. The reward model's
    normalisation prompts are PPO's. Each split is cut to its first 20 texts (a BPE of 300 tokens encodes the 22,412
    training reviews slowly); each expected list is encoded here from movie_reviews, not by the code under test."""
    tok, _, pad = sft.load_tokenizer(tiny_sft)
    prefix = tok.encode("", add_special_tokens=True).ids
    first = {s: sft.movie_reviews(s)[:20] for s in ("train", "labeler", "eval", "rotten_tomatoes")}
    for script in (ppo, rm):
        monkeypatch.setattr(script, "movie_reviews", first.__getitem__)
    encode = lambda texts, n=None: [prefix + tok.encode(t, add_special_tokens=False).ids[:n] for t in texts]
    args = make_args(ppo, sft_model=str(tiny_sft), prompt_tokens=5, eval_prompts=7, pad_token_id=pad)
    queries, mask, eval_sets = ppo.setup_data(args, tok)
    assert rows_of(queries, mask) == encode(first["train"], 5)
    assert list(eval_sets) == ["heldout", "rotten_tomatoes"]
    assert rows_of(*eval_sets["heldout"]) == encode(first["eval"][:7], 5)
    assert rows_of(*eval_sets["rotten_tomatoes"]) == encode(first["rotten_tomatoes"][:7], 5)
    assert rm.ppo_prompts(make_args(rm, prompt_tokens=5), tok, []) == encode(first["train"], 5)

    texts = ["the film was great", "a dull plot", "good actor", "bad", "the plot was fun"]
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": t} for t in texts[:2]])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": t} for t in texts[2:]])
    args = make_args(
        ppo, **{**vars(args), "dataset": str(train_file), "eval_dataset": str(eval_file), "eval_prompts": 2}
    )
    queries, mask, eval_sets = ppo.setup_data(args, tok)
    assert rows_of(queries, mask) == encode(texts[:2])
    assert list(eval_sets) == ["heldout"] and rows_of(*eval_sets["heldout"]) == encode(texts[2:4])
