"""Steady-state tokens/s of sft.py's train step on the default tiny model, for 1 vs N (fake) devices.

    python benchmarks/sft_throughput.py                       # the devices JAX sees
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/sft_throughput.py

Random tokens, batch [--batch-size, --seq-len], data parallel over all devices; prints one line.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from workload import cpu_description  # noqa: E402

import sft  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    a = parser.parse_args()
    args = sft.Args()
    cfg = sft.ModelConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
    )
    graphdef, params = nnx.split(sft.Transformer(cfg, rngs=nnx.Rngs(0)))
    tx, _ = sft.make_optimizer(args)
    mesh = sft.make_mesh()
    params = sft.shard(params, mesh)
    opt_state = sft.shard(tx.init(params), mesh)
    rng = np.random.default_rng(0)
    shape = (1, a.batch_size, a.seq_len)
    batch = {
        "tokens": rng.integers(0, 4096, shape).astype(np.int32),
        "attention_mask": np.ones(shape, bool),
        "loss_mask": np.ones(shape, bool),
    }
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(None, "data")))
    for _ in range(2):  # compile + warm-up
        params, opt_state, m = sft.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(a.steps):
        params, opt_state, m = sft.train_step(graphdef, tx, params, opt_state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / a.steps
    print(
        f"{jax.device_count()} device(s), batch {a.batch_size} x {a.seq_len}: {dt:.3f} s/step, "
        f"{a.batch_size * a.seq_len / dt:,.0f} tokens/s ({cpu_description()})"
    )


if __name__ == "__main__":
    main()
