"""The one PPO workload that every implementation runs (issue 5), at two model sizes (issue 17), and its random models.

Imported by the runner and by each implementation's bench script (each in its own virtual environment), so it
needs nothing beyond numpy; `make_models` additionally needs torch + transformers (it runs in the TRL environment).
The size is the environment variable BENCH_SIZE (`tiny`, the default, or `medium`), read once at import, so every
bench script runs either size unchanged: `BENCH_SIZE=medium python bench_ours.py`.
"""

import json
import os
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / ".work"  # models and per-run results (git-ignored)

COMMON = dict(  # Llama architecture, untied embeddings, random init with seed 0
    vocab_size=4096,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
SIZES = {
    "tiny": dict(  # 1.85 M parameters: the workload of issue 5
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
    "medium": dict(  # 13.8 M parameters: large enough that the matmuls, not per-op overhead, set the time on a CPU
        hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6
    ),
}
SIZE = os.environ.get("BENCH_SIZE", "tiny")
if SIZE not in SIZES:
    raise SystemExit(f"BENCH_SIZE={SIZE!r}: expected one of {', '.join(SIZES)}")
MODEL = COMMON | SIZES[SIZE]
MODELS = WORK / "models" / SIZE  # policy/ and reward/, made by make_models
SEED = 0
BATCH = 64  # prompts (episodes) per PPO iteration
PROMPT_LEN = 16  # random tokens per prompt
RESPONSE_LEN = 32  # exactly this many new tokens: no stop token, no early exit
TEMPERATURE = 0.7  # no top-k / top-p
PPO_EPOCHS = 4
NUM_MINI_BATCHES = 1  # 4 epochs over 1 minibatch of 64
KL_COEF = 0.05
CLIPRANGE = 0.2
VF_COEF = 0.1
GAMMA = 1.0
LAM = 0.95
LR = 1e-5
PAD, EOS = 0, 1  # special tokens; prompts use the other ids


def cpu_description() -> str:
    """The CPU every figure was measured on: model, cores, and its widest vector ISA (speed ratios depend on it: the
    same workload measured 2.3-2.8x TRL's speed on an AVX-512 EPYC and 1.5x on an AVX2-only one)."""
    import os
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{model or platform.machine()}, {isa}, {len(os.sched_getaffinity(0))} cores"


def prompts(iteration: int) -> np.ndarray:
    """Prompt token ids of one PPO iteration, [BATCH, PROMPT_LEN] int32, from ids 2..vocab-1."""
    rng = np.random.default_rng([SEED, iteration])
    return rng.integers(2, MODEL["vocab_size"], (BATCH, PROMPT_LEN)).astype(np.int32)


def word(i: int) -> str:
    return "<pad>" if i == PAD else "</s>" if i == EOS else f"w{i}"


def make_tokenizer(path: Path):
    """A word-level tokenizer whose token i is the word "w{i}": any id sequence round-trips through text exactly
    (the peers that take text prompts get the same 16 token ids as the ones that take ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(MODEL["vocab_size"])}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": MODEL["max_position_embeddings"],
            }
        )
    )
    (path / "special_tokens_map.json").write_text(json.dumps(special))


def make_models(root: Path = MODELS):
    """policy/ (LlamaForCausalLM) and reward/ (LlamaForSequenceClassification, 1 label; also the value model's
    initialisation), both random with torch seed 0, saved with save_pretrained (safetensors, float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    for name, cls, extra in (
        ("policy", LlamaForCausalLM, {}),
        ("reward", LlamaForSequenceClassification, {"num_labels": 1}),
    ):
        torch.manual_seed(SEED)
        model = cls(LlamaConfig(**MODEL, **extra, torch_dtype="float32"))
        (root / name).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(root / name)
        make_tokenizer(root / name)
    print(f"models written to {root}")


if __name__ == "__main__":
    make_models()
