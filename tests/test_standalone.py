"""Each script stands alone: copied with common.py, and nothing else, into an empty directory, it lists its flags and
trains 2 steps on the tiny models, writing a model (no script imports another; grpo.py's built-in rewards are found
by name in the copy)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_args
from test_sft import TINY, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("sft.py", "reward_model.py", "rlhf_ppo.py", "dpo.py", "grpo.py")


def test_no_script_imports_another():
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        assert not re.search(r"^\s*(import|from)\s+(sft|reward_model|rlhf_ppo|dpo|grpo)\b", text, re.M), script


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """48 preference pairs over 12 prompts."""
    words = "the film was great good bad awful boring loved hated plot actor fun dull".split()
    rows = [
        {"prompt": f"{words[i]} {words[(i + 3) % 14]}", "chosen": f" {words[j % 5 + 3]}", "rejected": f" {words[j]}"}
        for i in range(12)
        for j in range(4)
    ]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def run_alone(script: str, where: Path, *flags) -> subprocess.CompletedProcess:
    """`python script flags` in `where`, holding only the script and common.py, with no PYTHONPATH."""
    where.mkdir(exist_ok=True)
    for f in (script, "common.py"):
        shutil.copy(ROOT / f, where / f)
    assert sorted(p.name for p in where.iterdir() if p.suffix == ".py") == sorted({script, "common.py"})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR")}
    env |= {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, script, *map(str, flags)]
    return subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=600)


def cli(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_copied_alone_with_common_py_runs(script, tmp_path, tiny_pipeline, pairs_file):
    pipeline, prompts = tiny_pipeline
    sft, rm = pipeline / "sft", pipeline / "rm"
    common = dict(output_dir=tmp_path / "model", checkpoint_dir=tmp_path / "ck", num_devices=1)
    flags = {
        "sft.py": {**TINY, "dataset": write_jsonl(tmp_path / "d.jsonl", [{"text": "the film was good"}] * 40)}
        | dict(max_steps=2, warmup_steps=1, eval_every=2, num_samples=0),
        "reward_model.py": dict(sft_model=sft, dataset=pairs_file, batch_size=16, num_epochs=1, max_seq_len=24)
        | dict(norm_prompts=16, response_length=6, eval_every=1),
        "rlhf_ppo.py": dict(sft_model=sft, reward_model=rm, dataset=prompts, response_length=6, batch_size=8)
        | dict(total_episodes=16, ppo_epochs=1, num_mini_batches=1, eval_prompts=8, eval_every=2),
        "dpo.py": dict(sft_model=sft, reward_model=rm, dataset=pairs_file, max_seq_len=24, batch_size=16)
        | dict(max_steps=2, eval_prompts=8, eval_every=2, response_length=6),
        "grpo.py": dict(sft_model=sft, dataset=prompts, eval_dataset=prompts, response_length=6, group_size=4)
        | dict(batch_size=8, max_steps=2, eval_prompts=8, eval_every=2),
    }[script]
    shown = run_alone(script, tmp_path / "alone", "--help")
    assert shown.returncode == 0 and "--output-dir" in shown.stdout, shown.stderr[-3000:]
    ran = run_alone(script, tmp_path / "alone", *cli(**flags, **common))
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_dir_that_cannot_be_written_is_refused_at_start_up(script, tmp_path):
    import importlib

    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_file").chmod(0o755)  # a file anyone may write and execute is still no directory
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(PermissionError, match="--output-dir .*a_file/model: cannot be written"):
        module.main(make_args(module, output_dir=str(tmp_path / "a_file" / "model")))  # before anything else is read
    assert not (tmp_path / "a_file").is_dir()


def test_a_missing_checkpoint_is_named_by_the_flag_of_the_script_that_was_run(tmp_path, tiny_pipeline, pairs_file):
    import dpo
    import sft

    pipeline, _ = tiny_pipeline
    with pytest.raises(FileNotFoundError, match="--reward-model .*missing_rm: .*config.json not found"):
        dpo.main(
            make_args(dpo,
                sft_model=str(pipeline / "sft"), reward_model=str(tmp_path / "missing_rm"), dataset=str(pairs_file),
                output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck"), max_seq_len=24, batch_size=16,
            )
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--base-model .*missing_base: .*config.json not found"):
        sft.main(make_args(sft, base_model=str(tmp_path / "missing_base"), output_dir=str(tmp_path / "out2")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_shared_flags_keep_their_names_and_are_logged_with_the_scripts_own(script, monkeypatch, tmp_path):
    """The appendix's Run holds the flags every script shares; the command line spells them as before (--output-dir,
    not --run.output-dir), and the hyper-parameter table that tensorboard shows lists them with the script's own."""
    import importlib

    import jax.numpy as jnp
    import tyro

    module = importlib.import_module(script.removesuffix(".py"))
    args = tyro.cli(module.Args, args=["--output-dir", "x", "--seed", "7", "--fsdp", "--eval-every", "3"])
    assert (args.run.output_dir, args.run.seed, args.run.fsdp, args.eval_every) == ("x", 7, True, 3)
    assert tyro.cli(module.Args, args=["--dtype", "bfloat16"]).run.compute_dtype == jnp.bfloat16
    assert args.run.compute_dtype == jnp.float32
    assert module.Args().run.output_dir == "models/" + {"reward_model.py": "reward", "rlhf_ppo.py": "ppo"}.get(
        script, script.removesuffix(".py")
    )
    texts = {}
    fake = type(
        "Writer", (), {"__init__": lambda self, logdir: None, "add_text": lambda self, k, v: texts.update({k: v})}
    )
    monkeypatch.setattr(module, "SummaryWriter", fake)
    module.summary_writer(args)
    rows = dict(re.findall(r"^\|(\w+)\|(.*)\|$", texts["hyperparameters"], re.M))
    assert (rows["output_dir"], rows["seed"], rows["fsdp"], rows["eval_every"]) == ("x", "7", "True", "3")
    assert rows.pop("param") == "value" and "run" not in rows and len(rows) == len(vars(args)) - 1 + len(vars(args.run))
