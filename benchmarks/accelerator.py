"""Our steps on whatever device JAX finds, in one command and one table (benchmarks/README.md, "On an accelerator").

    python -u benchmarks/accelerator.py --size tiny    # any CPU, under 3 minutes
    python -u benchmarks/accelerator.py --size 0.5b    # a GPU: Qwen2.5-0.5B's shape, random weights (no download)

Compute in bfloat16 with float32 master weights (the scripts' --dtype bfloat16), through the scripts' own functions.
Each row is printed as soon as it is measured, and the rows so far are written to $OUT/accelerator.json when OUT is
set, so that a time-out keeps the earlier ones. In order:

1. the ceilings, measured: a bf16 matrix product's FLOP/s and a device-to-device copy's bandwidth (bytes read and
   written); and the device's named dense bf16 peak where known (PEAKS);
2. an SFT step (sft.train_step): tokens/s, and MFU = 6·N·tokens/s over the peak (the named one, else the measured
   matmul rate; N the policy's parameters, attention's own FLOPs left out);
3. KV-cache sampling (rlhf_ppo.generate): 64 prompts × 128 new tokens: tokens/s, and the seconds per new token against
   the bound of reading the weights once per token (their bytes over the measured bandwidth);
4. one PPO iteration (rlhf_ppo.ppo_iteration: sampling, the scoring passes, GAE, 4 epochs of update): its parts, and
   the update's MFU from XLA's FLOP count of one loss-and-gradient pass;
5. one GRPO step (grpo.rollout, then grpo.grpo_step), the reward model as the reward;
6. for every row, the seconds spent compiling (apart from the timing), the compilations after the first call (0
   expected), and the peak device memory so far (host RSS on a CPU).
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (first: bench_kernels' JAX_PLATFORMS=cpu default comes after jax has read its config)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from bench_kernels import update_batch, update_flops  # noqa: E402
from bench_ours import timed  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import grpo  # noqa: E402
import rlhf_ppo as rp  # noqa: E402
import sft  # noqa: E402

SIZES = {  # ModelConfig fields; "0.5b" is Qwen2.5-0.5B's config.json
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=32, tie_word_embeddings=False),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, qkv_bias=True,
                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, architecture="Qwen2ForCausalLM"),
}  # fmt: skip
WORKLOADS = {  # rows per batch, prompt and new tokens of the sampler, PPO and GRPO; SFT's batch and length
    "tiny": dict(batch=64, prompt=16, new=128, sft_batch=16, sft_len=256, repeats=3),
    "0.5b": dict(batch=64, prompt=16, new=128, sft_batch=16, sft_len=1024, repeats=3),
}
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, by the device kind's name
EOS, PAD = 1, 0
COMPILES = []  # (seconds) of each XLA compilation
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None
)


class NoText:
    """A tokenizer stand-in: the random models' tokens have no text, and no reward function reads any."""

    def decode_batch(self, rows):
        return [""] * len(rows)


def measure(fn, repeats: int) -> dict:
    """fn() (blocking on its result) once to compile, then `repeats` times: the median seconds, the compile seconds
    of the first call, and the compilations during the timed calls."""
    n0, t0 = len(COMPILES), time.perf_counter()
    fn()
    first, compile_s, n1 = time.perf_counter() - t0, sum(COMPILES[n0:]), len(COMPILES)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "first_s": first, "compile_s": compile_s, "recompiles": len(COMPILES) - n1}


def peak_memory_gib() -> float:
    """Peak device memory in use so far (GPU, TPU), or the process's peak RSS (CPU), in GiB."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ceilings(on_gpu: bool, repeats: int) -> dict:
    """The measured bf16 matmul rate (n × n × n, n = 8192 on a GPU) and copy bandwidth (bytes read + written)."""
    n = 8192 if on_gpu else 1024
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.bfloat16)
    mm = measure(lambda: jax.jit(jnp.dot)(a, b).block_until_ready(), repeats)
    x = jax.random.normal(jax.random.key(1), ((2**30 if on_gpu else 2**26) // 4,), jnp.float32)  # 1 GiB / 64 MiB
    cp = measure(lambda: jax.jit(lambda x: x + 1)(x).block_until_ready(), repeats)  # float32: no CPU bf16 emulation
    return {"matmul_flop_s": 2 * n**3 / mm["s"], "bandwidth_b_s": 2 * x.nbytes / cp["s"]}


def build(size: str):
    """The policy (ForCausalLM) and a reward model (ForSequenceClassification, also the value network's start), random,
    bf16 compute over float32 weights -> the policy's config and graphdefs / params as rlhf_ppo.load_models gives."""
    cfg = rp.ModelConfig(**SIZES[size])
    score_cfg = dataclasses.replace(
        cfg, architecture=cfg.architecture.replace("ForCausalLM", "ForSequenceClassification")
    )
    policy = nnx.split(rp.Transformer(cfg, jnp.bfloat16, rngs=nnx.Rngs(0)))
    reward = nnx.split(rp.Transformer(score_cfg, jnp.bfloat16, rngs=nnx.Rngs(1)))
    models = rp.Models(policy[0], reward[0], reward[0], cfg)
    params = {"policy": policy[1], "value": jax.tree.map(jnp.copy, reward[1])}
    return models, params, {"ref": jax.tree.map(jnp.copy, policy[1]), "reward": reward[1]}


def row(rows: list, name: str, **values):
    """Prints one row as soon as it is measured, and writes the rows so far to $OUT/accelerator.json."""
    rows.append({"row": name, **values, "peak_memory_gib": peak_memory_gib()})
    cells = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items() if k != "row")
    print(f"| {name} | {cells} |", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "accelerator.json").write_text(json.dumps(rows, indent=1) + "\n")


def bench_sft(models, params, mesh, w, peak, rows):
    """sft.train_step on [1, B, L] random tokens: tokens/s and MFU."""
    tx = optax.adamw(1e-5)
    state = {"params": jax.tree.map(jnp.copy, params["policy"])}  # train_step donates them
    state["opt_state"] = rp.shard(jax.jit(tx.init)(state["params"]), mesh)  # as sft.py: else the 2nd step recompiles
    tokens = jax.random.randint(jax.random.key(2), (1, w["sft_batch"], w["sft_len"]), 2, models.config.vocab_size)
    batch = {"tokens": tokens, "attention_mask": tokens > 0, "loss_mask": tokens > 0}

    def step():
        state["params"], state["opt_state"], m = sft.train_step(
            models.policy, tx, state["params"], state["opt_state"], batch, jax.random.key(0)
        )
        jax.block_until_ready(m)

    t = measure(step, w["repeats"])
    n = sum(x.size for x in jax.tree.leaves(params["policy"]))
    tok_s = tokens.size / t["s"]
    row(rows, "SFT step", params_m=n / 1e6, tokens_per_s=tok_s, mfu=6 * n * tok_s / peak, **t)


def bench_sampler(args, models, params, mesh, w, bandwidth, rows):
    """rlhf_ppo.generate: w["batch"] prompts, w["new"] new tokens; s per new token against the weight-read bound."""
    q, qm = prompts(w, mesh, 3)
    t = measure(
        lambda: jax.block_until_ready(rp.generate(args, models, params, q, qm, jax.random.key(0))), w["repeats"]
    )
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params["policy"]))
    per_token, bound = t["s"] / w["new"], weight_bytes / bandwidth
    row(rows, "sampling", tokens_per_s=w["batch"] * w["new"] / t["s"], s_per_new_token=per_token,
        weight_read_bound_s=bound, of_bound=bound / per_token, **t)  # fmt: skip


def prompts(w, mesh, seed):
    q = jax.random.randint(jax.random.key(seed), (w["batch"], w["prompt"]), 2, 200)
    return jax.device_put((q, q > 0), NamedSharding(mesh, PartitionSpec("data")))


def bench_ppo(args, models, params, frozen, mesh, w, peak, rows):
    """One rlhf_ppo.ppo_iteration, its generation and update timed inside it (as benchmarks/bench_ours.py), and the
    update's FLOPs: XLA's count of one loss-and-gradient pass, times the epochs."""
    tx, _ = rp.make_optimizer(args, 10**6)
    rowsh = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.tree.map(jnp.copy, params)  # ppo_update donates them
    state = {
        "params": params,
        "opt_state": rp.shard(jax.jit(tx.init)(params), mesh),
        "kl_coef": jnp.float32(args.kl_coef),
    }
    parts = {"generate": [], "ppo_update": []}
    for name in parts:
        fn = getattr(rp, name)
        setattr(rp, name, timed(fn, parts[name]))
    q, qm = prompts(w, mesh, 4)

    def iteration():
        state.update(rp.ppo_iteration(args, models, tx, rowsh, NoText(), state, frozen, q, qm, jax.random.key(0))[0])

    t = measure(iteration, w["repeats"])
    update_s, gen_s = statistics.median(parts["ppo_update"][1:]), statistics.median(parts["generate"][1:])
    batch, _ = update_batch(args, models, NoText(), state["params"], frozen, q, qm)
    flops = update_flops(args, models, state["params"], batch)
    row(rows, "PPO iteration", generation_s=gen_s, rest_s=t["s"] - gen_s, update_s=update_s,
        update_tflop=flops / 1e12, update_mfu=flops / update_s / peak, **t)  # fmt: skip


def bench_grpo(models, params, frozen, mesh, w, rows):
    """grpo.rollout (sampling, π_ref, the reward model's score, group advantages) then grpo.grpo_step."""
    args = grpo.Args(reward_model="random", response_length=w["new"], batch_size=w["batch"], stop_token_id=-1,
                     run=grpo.Run("bench", "/tmp/bench_out", "/tmp/bench_ck", dtype="bfloat16"))  # fmt: skip
    args = grpo.with_defaults(args, EOS, PAD)
    tx = grpo.make_optimizer(args)
    state = {"params": jax.tree.map(jnp.copy, params["policy"])}
    state["opt_state"] = rp.shard(jax.jit(tx.init)(state["params"]), mesh)
    q, qm = prompts(w, mesh, 5)
    graph = models.policy
    fz = {"ref": frozen["ref"], "reward": frozen["reward"]}
    parts = {"rollout_s": [], "update_s": []}

    def step():
        t = time.perf_counter()
        batch, _ = grpo.rollout(args, graph, models.reward, NoText(), state["params"], fz, q, qm, {}, jax.random.key(0))
        parts["rollout_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        state.update(grpo.grpo_step(args, graph, tx, state, batch, 0, 0)[0])
        jax.block_until_ready(state)
        parts["update_s"].append(time.perf_counter() - t)

    t = measure(step, w["repeats"])
    row(rows, "GRPO step", **{k: statistics.median(v[1:]) for k, v in parts.items()}, **t)


def main(cli):
    w, rows, device = WORKLOADS[cli.size], [], jax.devices()[0]
    on_gpu = device.platform == "gpu"
    mesh = rp.make_mesh(1)
    ceil = ceilings(on_gpu, w["repeats"])
    named = next((v for k, v in PEAKS.items() if k in device.device_kind), None)
    peak = named or ceil["matmul_flop_s"]
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, --size {cli.size}", flush=True)
    print("| row | values |\n|---|---|", flush=True)
    row(rows, "ceilings", device=device.device_kind, named_peak_tflop_s=(named or 0) / 1e12,
        matmul_tflop_s=ceil["matmul_flop_s"] / 1e12, bandwidth_gb_s=ceil["bandwidth_b_s"] / 1e9,
        mfu_over="named peak" if named else "measured matmul rate")  # fmt: skip
    models, params, frozen = build(cli.size)
    params, frozen = rp.shard(params, mesh), rp.shard(frozen, mesh)
    args = rp.Args(sft_model="random", reward_model="random", response_length=w["new"], stop_token_id=-1,
                   batch_size=w["batch"], total_episodes=w["batch"],
                   run=rp.Run("bench", "/tmp/bench_out", "/tmp/bench_ck", dtype="bfloat16"))  # fmt: skip
    args = rp.resolve_token_ids(args, EOS, PAD)
    bench_sft(models, params, mesh, w, peak, rows)
    bench_sampler(args, models, params, mesh, w, ceil["bandwidth_b_s"], rows)
    bench_ppo(args, models, params, frozen, mesh, w, peak, rows)
    bench_grpo(models, params, frozen, mesh, w, rows)
    print(f"compilations in all: {len(COMPILES)}, {sum(COMPILES):.1f}s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    main(parser.parse_args())
