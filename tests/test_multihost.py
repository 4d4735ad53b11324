"""Multi-process runs (--distributed), as on a cluster: two processes on localhost, one CPU device each, joined by
jax.distributed (gloo collectives), give the training state of one process over two devices; a run interrupted and
resumed gives the uninterrupted run's. The one-process runs are the in-process reference (conftest's fake devices)."""

import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_same_params, make_args, read_checkpoint
from test_ppo import tiny_args as ppo_args
from test_sft import TINY, pc_dataset  # noqa: F401 (a fixture)

import reward_model as rm
import rlhf_ppo as ppo
import sft

WORKER = str(Path(__file__).with_name("multihost_worker.py"))
SLURM_PORTS = 65536 - 2**12  # jax's SLURM detection puts the coordinator on this port + SLURM_JOB_ID % 4096


def free_port():
    while True:
        port = SLURM_PORTS + random.randrange(2**12)
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
                return port
            except OSError:
                continue


def cli_flags(args) -> list[str]:
    """The command line that gives these Args (tyro's spelling)."""
    flags = []
    for name, value in ({k: v for k, v in vars(args).items() if k != "run"} | vars(args.run)).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def launch(script: str, args, cwd: Path, crash="-", slurm=False, fails=False, pythonpath="") -> list[str]:
    """Runs `script` with `args` as two processes with one CPU device each -> their outputs; asserts that both exit
    with 0 (fails: both with an error, none left waiting for the other). Process i works in cwd/process<i> (as on its
    own host) and writes its output to cwd/process<i>.log. With slurm the processes find each other from SLURM's
    variables, as under srun; otherwise from the three explicit flags. pythonpath: where --reward-fn modules are."""
    port, procs, logs = free_port(), [], [cwd / f"process{i}.log" for i in range(2)]
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": xla + " --xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        env["JAX_COMPILATION_CACHE_DIR"] += f"_process{i}"  # process i's own, kept from launch to launch
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
        flags = cli_flags(args) + ["--distributed"]
        if slurm:
            slurm_env = dict(SLURM_JOB_ID=port - SLURM_PORTS, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=2)
            env |= {k: str(v) for k, v in (slurm_env | {"SLURM_PROCID": i, "SLURM_LOCALID": i}).items()}
        else:
            flags += ["--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        (cwd / f"process{i}").mkdir(parents=True, exist_ok=True)
        with open(logs[i], "w") as log:
            command = [sys.executable, WORKER, script, crash, *flags]
            procs.append(subprocess.Popen(command, cwd=cwd / f"process{i}", env=env, stdout=log, stderr=log))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outputs = [log.read_text() for log in logs]
    for i, (code, out) in enumerate(zip(codes, outputs)):
        assert (code != 0) == fails, f"process {i} exited with {code}:\n{out[-3000:]}"
    return outputs


def printed(pattern: str, outputs: list[str]) -> str:
    """The line matching `pattern`, which every process printed identically."""
    lines = [re.findall(pattern, out) for out in outputs]
    assert lines[0] and all(x == lines[0] for x in lines), lines
    return lines[0][-1]


def assert_same_state(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_sft_two_processes_train_as_one_over_two_devices_and_resume_exactly(tmp_path, pc_dataset):  # noqa: F811
    def args(name, **kw):
        out, ck = str(tmp_path / name / "out"), str(tmp_path / name / "ck")
        return make_args(sft, **{**TINY, "dataset": str(pc_dataset), "output_dir": out, "checkpoint_dir": ck, **kw})

    one = args("one", num_devices=2)
    loss = sft.main(one)
    two = args("two")
    outputs = launch("sft", two, tmp_path / "two", slurm=True)  # found each other as under srun
    assert abs(float(printed(r"held-out loss ([\d.]+)", outputs)) - loss) < 1e-4
    assert (tmp_path / "two/process0/runs").is_dir() and not (tmp_path / "two/process1/runs").exists()  # logs: once
    (step_one, state_one), (step_two, state_two) = (read_checkpoint(a.run.checkpoint_dir) for a in (one, two))
    assert step_one == step_two == TINY["max_steps"]
    assert_same_state(state_two, state_one)
    assert_same_params(sft.load_model(two.run.output_dir)[0], state_two["params"])  # the export is the trained state

    resumed = args("resumed")
    launch("sft", resumed, tmp_path / "resumed", crash="train_step:6", fails=True)  # killed in step 6; saved at 2, 4
    assert read_checkpoint(resumed.run.checkpoint_dir)[0] == 4
    outputs = launch("sft", resumed, tmp_path / "refused", fails=True)  # process 0 refuses; neither waits forever
    assert "FileExistsError" in outputs[0] and "unfinished run" in outputs[0]
    assert "process 0 failed in preparing --checkpoint-dir" in outputs[1]
    launch("sft", make_args(sft, **{**vars(resumed), "resume": True}), tmp_path / "resumed")
    step, state = read_checkpoint(resumed.run.checkpoint_dir)
    assert step == TINY["max_steps"]
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state_two), strict=True):
        np.testing.assert_array_equal(x, y)


def test_reward_model_two_processes_label_once_and_train_as_one_over_two_devices(tmp_path, tiny_sft):
    def args(name, **kw):
        return make_args(
            rm,
            sft_model=str(tiny_sft),
            output_dir=str(tmp_path / name / "rm"),
            checkpoint_dir=str(tmp_path / name / "ck"),
            pairs_file=str(tmp_path / name / "pairs.jsonl"),
            num_prompts=16,
            response_length=6,
            batch_size=8,
            num_epochs=1,
            eval_every=2,
            log_every=2,
            norm_prompts=16,
            max_seq_len=24,
            **kw,
        )

    one = args("one", num_devices=2)
    ev = rm.main(one)
    two = args("two")
    outputs = launch("reward_model", two, tmp_path / "two")
    assert Path(two.pairs_file).read_text() == Path(one.pairs_file).read_text()  # the simulated labeler's pairs,
    assert "simulated labeler:" in outputs[0] and "simulated labeler:" not in outputs[1]  # sampled by process 0 only
    accuracy = printed(r"held-out: accuracy ([\d.]+)", outputs)
    assert float(accuracy) == pytest.approx(ev["accuracy"], abs=1e-4)
    (step_one, state_one), (step_two, state_two) = (read_checkpoint(a.run.checkpoint_dir) for a in (one, two))
    assert step_one == step_two > 0
    assert_same_state(state_two, state_one)
    (_, cfg_one), (_, cfg_two) = sft.load_model(one.run.output_dir), sft.load_model(two.run.output_dir)
    assert cfg_two.reward_gain == pytest.approx(cfg_one.reward_gain, rel=1e-5)  # the normalisation, fitted once
    assert cfg_two.reward_bias == pytest.approx(cfg_one.reward_bias, rel=1e-5, abs=1e-6)


def test_ppo_two_processes_train_as_one_over_two_devices(tmp_path, tiny_pipeline, monkeypatch):
    """With the reward model and a --reward-fn, whose texts are gathered from both processes' rows."""
    tmp, prompts = tiny_pipeline
    (tmp_path / "word_rewards.py").write_text(
        "def great(prompts, completions):\n"
        "    return [c.count('great') - 0.1 * len(c.split()) + 0.01 * len(p) for p, c in zip(prompts, completions)]\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    kw = dict(adaptive_kl=True, kl_horizon=100, checkpoint_every=1, total_episodes=16, eval_every=1)
    kw |= dict(reward_fn="word_rewards:great")

    def args(name, **more):
        out, ck = str(tmp_path / name / "out"), str(tmp_path / name / "ck")
        return ppo_args(tmp, prompts, output_dir=out, checkpoint_dir=ck, **kw, **more)

    one = args("one", num_devices=2)
    _, final = ppo.main(one)
    two = args("two")
    outputs = launch("rlhf_ppo", two, tmp_path / "two", pythonpath=tmp_path)
    gold = printed(r"final: .*eval/gold_score ([-\d.]+)", outputs)  # the same evaluation on both processes
    assert float(gold) == pytest.approx(final["eval/gold_score"], abs=1e-4)
    (step_one, state_one), (step_two, state_two) = (read_checkpoint(a.run.checkpoint_dir) for a in (one, two))
    assert step_one == step_two == 2 and float(state_two["kl_coef"]) != pytest.approx(one.kl_coef)  # β moved
    assert_same_state(state_two, state_one)
