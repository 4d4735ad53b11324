"""Our PPO (rlhf_ppo.py) on the benchmark workload: seconds per PPO iteration, split into generation and the rest.

    benchmarks/.venvs/ours/bin/python benchmarks/bench_ours.py [--warmup 2 --iters 5 --num-devices 1]

An iteration is exactly what rlhf_ppo.py's main loop runs per update (`rlhf_ppo.ppo_iteration`): KV-cache sampling,
one scoring pass each of policy, value, reference and reward model, KL-shaped rewards + GAE, and all PPO epochs
in one compiled call, ending with the statistics on the host. The generation time is taken by wrapping
`rlhf_ppo.generate` (the sampled tokens are waited for), the update's (train_s) by wrapping `rlhf_ppo.ppo_update`
(all epochs, waited for). XLA compilations during the timed iterations are counted (there should be none). The
model size is BENCH_SIZE (workload.py). The last stdout line is `RESULT {json}` for benchmarks/run.py.
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import workload as W  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import rlhf_ppo as rp  # noqa: E402

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
)


def setup(num_devices: int = 1, dtype: str = "float32", num_iterations: int = 10):
    """rlhf_ppo.py's own set-up with the workload's settings, on `num_devices` (fake) CPU devices
    -> (args, models, tx, rows, tok), the training state, the frozen weights {"ref", "reward"}, mesh."""
    jax.config.update("jax_num_cpu_devices", num_devices)  # before the first use of the CPU backend
    models = W.MODELS
    args = rp.Args(
        sft_model=str(models / "policy"),
        reward_model=str(models / "reward"),
        value_model="reward",
        response_length=W.RESPONSE_LEN,
        temperature=W.TEMPERATURE,
        stop_token_id=-1,  # -1: never stops
        kl_coef=W.KL_COEF,
        cliprange=W.CLIPRANGE,
        cliprange_value=W.CLIPRANGE,
        vf_coef=W.VF_COEF,
        gamma=W.GAMMA,
        lam=W.LAM,
        batch_size=W.BATCH,
        num_mini_batches=W.NUM_MINI_BATCHES,
        ppo_epochs=W.PPO_EPOCHS,
        learning_rate=W.LR,
        total_episodes=W.BATCH * num_iterations,
        run=rp.Run("bench", "/tmp/bench_out", "/tmp/bench_ck", dtype=dtype, num_devices=num_devices, seed=W.SEED),
    )
    mesh = rp.make_mesh(args.run.num_devices)
    tok, eos_id, pad_id = rp.load_tokenizer(args.sft_model)
    args = rp.resolve_token_ids(args, eos_id, pad_id)
    models, params, frozen = rp.load_models(args, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    tx, _ = rp.make_optimizer(args, num_iterations)
    params, frozen = rp.shard(params, mesh), rp.shard(frozen, mesh)
    state = {
        "params": params,
        "opt_state": rp.shard(jax.jit(tx.init)(params), mesh),
        "kl_coef": jnp.float32(args.kl_coef),
    }
    rows = NamedSharding(mesh, PartitionSpec("data"))
    return (args, models, tx, rows, tok), state, frozen, mesh


def prompts(i: int, mesh):
    """The workload's prompts of iteration i and their mask, split over the devices."""
    q = W.prompts(i)
    return jax.device_put((q, q != W.PAD), NamedSharding(mesh, PartitionSpec("data")))


def timed(fn, seconds: list):
    """fn, with the wall time of each call (until its outputs are ready) appended to `seconds`."""

    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*a, **kw))
        seconds.append(time.perf_counter() - t)
        return out

    return wrapper


def main(cli):
    static, state, frozen, mesh = setup(cli.num_devices, cli.dtype, cli.warmup + cli.iters)
    gen_s, train_s, iter_s = [], [], []
    rp.generate, rp.ppo_update = timed(rp.generate, gen_s), timed(rp.ppo_update, train_s)
    for i in range(cli.warmup + cli.iters):
        if i == cli.warmup:
            compiles_before = len(COMPILES)
        q, qm = prompts(i, mesh)
        t = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(W.SEED), i)
        state, stats = rp.ppo_iteration(*static, state, frozen, q, qm, key)
        iter_s.append(time.perf_counter() - t)
        print(
            f"iteration {i}: {iter_s[-1]:.3f}s (generation {gen_s[-1]:.3f}s) kl {stats['objective/kl']:.4f} "
            f"score {stats['objective/scores']:.4f}",
            file=sys.stderr,
        )
    n, devices = cli.warmup, f"{cli.num_devices} device{'s' * (cli.num_devices > 1)}"
    result = {
        "name": f"ours: rlhf_ppo.py (JAX {jax.__version__} CPU, {devices}, {cli.dtype})",
        "iter_s": iter_s[n:],
        "gen_s": gen_s[n:],
        "update_s": [a - b for a, b in zip(iter_s[n:], gen_s[n:])],
        "train_s": train_s[n:],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compiles_in_timed_iterations": len(COMPILES) - compiles_before,
        "differences": [],
        "metrics": {
            k: stats[k] for k in ("objective/kl", "objective/scores", "policy/approxkl_avg", "loss/policy_avg")
        },
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--num-devices", type=int, default=1, help="fake XLA CPU devices; the batch is split over them")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    main(parser.parse_args())
