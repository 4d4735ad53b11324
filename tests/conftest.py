"""Test set-up: 4 fake CPU devices (for the sharding tests) and tiny random Hugging Face checkpoints."""

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Under pytest-xdist (-n N) each worker keeps to a core of its own: XLA then runs one thread per worker, not N workers
# × all cores' threads contending for the same cores.
if "PYTEST_XDIST_WORKER" in os.environ and hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % len(cores)]})
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A run compiles many identical programs (a fresh optimizer or model object per test misses jit's in-memory cache):
# XLA's persistent cache compiles each once. Each xdist worker has a directory of its own (JAX writes its entries
# unlocked); a plain pytest run uses $JAX_COMPILATION_CACHE_DIR if set (scripts/mutation_check.py gives each of its
# jobs one, reused from mutant to mutant).
if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    caches = tempfile.mkdtemp(prefix="jax_caches_")  # also holds test_multihost's subprocesses' caches
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(caches, "pytest")
    atexit.register(shutil.rmtree, caches, True)
os.environ |= {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
# The tests' programs are tiny: compiling them takes seconds, running them milliseconds. So XLA's backend (LLVM)
# optimisations are off, in subprocesses too (the suite's time: -24%). Results move by float32 rounding only
# (a tiny model's loss and gradients: 1e-9), which every tolerance here allows for.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

F32_UNIT_ROUNDOFF = 2.0**-24


def assert_as_accurate(ours, theirs, exact, factor=4.0, floor_ulps=16, what="result"):
    """Tolerances that follow from float32 error, whatever the CPU: `ours` and `theirs` are float32 results of the same
    quantity by two implementations, `exact` its float64 value. Asserts that our error is at most `factor` times
    theirs plus `floor_ulps` units of roundoff of the largest |exact| (errors of a few ulps are noise), so a test
    passes on any instruction set on which both implementations are sound, and fails if ours loses accuracy."""
    ours, theirs, exact = (np.asarray(x, np.float64) for x in (ours, theirs, exact))
    scale = np.abs(exact).max()
    err_ours, err_theirs = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
    limit = factor * err_theirs + floor_ulps * F32_UNIT_ROUNDOFF * scale
    assert err_ours <= limit, (
        f"{what}: our float32 error {err_ours:.3g} ({err_ours / scale:.2g} of max|x|) exceeds {factor}x the reference "
        f"implementation's {err_theirs:.3g} + {floor_ulps} ulps"
    )


def _randomize(model, seed):
    """Random weights of O(1) effect everywhere (HF's own init leaves biases 0 and norms 1, which would hide bugs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def make_hf_model(kind: str, path: Path, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM / Qwen2ForCausalLM saved with save_pretrained at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=1,
    )
    if kind == "llama":  # GQA, untied embeddings, Llama 3 rope theta
        config = LlamaConfig(**{**common, "rope_theta": 500000.0, "tie_word_embeddings": False, **overrides})
        model = LlamaForCausalLM(config)
    else:  # GQA, tied embeddings, q/k/v bias
        config = Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
        model = Qwen2ForCausalLM(config)
    model = _randomize(model, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", autouse=True)
def fresh_jax_caches():
    """Each test module starts with JAX's caches emptied: the compiled programs of 200 tests do not pile up in one
    process (a compilation late in a full run crashed XLA on an AVX2 EPYC, alone it did not)."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    yield


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def hf_model(request, tmp_path_factory):
    """(kind, torch model, checkpoint dir) for each supported family."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_model(request.param, path), path


def once_per_run(tmp_path_factory, name: str, build):
    """build(directory) -> paths, run once per test run: under pytest-xdist the first worker to ask builds it and the
    others wait for it and share it (a file lock in the directory the workers' temporary directories share)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    import pickle

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{root}.lock"):
        if not (root / "built.pickle").exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            (root / "built.pickle").write_bytes(pickle.dumps(build(root)))
        return pickle.loads((root / "built.pickle").read_bytes())


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    """A tiny SFT checkpoint (its own BPE tokenizer) trained a few steps on random movie-review words."""
    from test_sft import TINY, write_jsonl

    import sft

    def build(tmp):
        rng = np.random.default_rng(0)
        words = "the film was great good bad awful boring loved hated plot actor fun dull".split()
        data = write_jsonl(tmp / "d.jsonl", [{"text": " ".join(rng.choice(words, 12))} for _ in range(64)])
        flags = {**TINY, "dataset": str(data), "output_dir": str(tmp / "sft"), "checkpoint_dir": str(tmp / "ck")}
        sft.main(make_args(sft, **flags))
        return tmp / "sft"

    return once_per_run(tmp_path_factory, "tiny_sft", build)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_sft):
    """The tiny SFT checkpoint, a reward model saved from its backbone, and a prompts file."""
    from test_sft import write_jsonl

    import sft

    def build(tmp):
        shutil.copytree(tiny_sft, tmp / "sft")
        rng = np.random.default_rng(0)
        words = "the film was great good bad awful boring loved hated plot actor fun dull".split()
        rm, _ = sft.load_model(tmp / "sft", architecture="LlamaForSequenceClassification", seed=1)
        rm.cfg = sft.ModelConfig(**{**vars(rm.cfg), "reward_gain": 1.5, "reward_bias": 0.25})
        tok, eos, pad = sft.load_tokenizer(tmp / "sft")
        sft.save_model(tmp / "rm", rm, tmp / "sft", {"pad_token_id": pad, "eos_token_id": eos})
        rows = [{"prompt": " ".join(rng.choice(words, n))} for n in rng.integers(2, 6, 40)]
        return tmp, write_jsonl(tmp / "prompts.jsonl", rows)

    return once_per_run(tmp_path_factory, "ppo", build)


class RecordingWriter:
    """In place of a script's tensorboard writer (monkeypatch its summary_writer): scalars {tag: {step: value}},
    texts {tag: {step: text}}."""

    def __init__(self):
        self.scalars, self.texts = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, {})[step] = float(value)

    def add_text(self, tag, text, step=None):
        self.texts.setdefault(tag, {})[step] = text

    def close(self):
        pass


def kill_during_call(monkeypatch, module, name: str, n: int, run):
    """run() with module.<name> raising KeyboardInterrupt at its n-th call (a run killed in the middle of a step);
    module.<name> is the real function again afterwards."""
    real, calls = getattr(module, name), []

    def crashing(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, name, crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, name, real)


def read_checkpoint(directory):
    """(latest step, training state as numpy arrays) of an orbax checkpoint directory, whatever its devices."""
    import jax
    import orbax.checkpoint as ocp

    steps = [int(p.name) for p in Path(directory).iterdir() if p.name.isdigit()]
    path = Path(directory).absolute() / str(max(steps)) / "default"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    return max(steps), ckptr.restore(
        path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    )


def flat_params(tree):
    """{"layers/0/mlp/up_proj/kernel": array}: nnx parameter trees from a model, a pure dict or a checkpoint alike."""
    from flax import nnx, traverse_util

    if isinstance(tree, nnx.Module):
        tree = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
    flat = traverse_util.flatten_dict(tree)
    return {"/".join(str(k) for k in path if k != "value"): np.asarray(v) for path, v in flat.items()}


def assert_same_params(a, b, **tolerance):
    a, b = flat_params(a), flat_params(b)
    assert a.keys() == b.keys()
    for name in a:
        if tolerance:
            np.testing.assert_allclose(a[name], b[name], err_msg=name, **tolerance)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def tree_digest(path):
    """SHA-256 of every file under path (names and bytes): 'left byte-for-byte unchanged'."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def make_args(script, **flags):
    """script.Args from flags as the command line spells them: those of the appendix's Run (output_dir, seed, ...) go
    to its `run` (the script's defaults otherwise)."""
    run = flags.pop("run", None) or script.Args().run
    names = {f.name for f in dataclasses.fields(script.Run)}
    shared = {k: flags.pop(k) for k in list(flags) if k in names}
    return script.Args(**flags, run=dataclasses.replace(run, **shared))
