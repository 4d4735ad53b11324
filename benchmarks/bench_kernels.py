"""Our hot paths in isolation, on the benchmark workload's model and batch:

1. sampling: the KV-cache sampler (common.sample, what rlhf_ppo.py runs) against a no-cache sampler that recomputes
   the full forward pass over the whole sequence for every new token; tokens/s of each.
2. the PPO train step (rlhf_ppo.ppo_update: 4 epochs x 1 minibatch of 64, forward + backward of policy and value,
   AdamW) in FLOP/s, against a plain large float32 matmul on the same machine (the practical peak).
   FLOPs are XLA's own count (compiled cost analysis) of one loss-and-gradient pass over the batch (per device,
   times the devices), times the number of passes.
3. log π_old: the sampler's own log-probs (what the rollout keeps) against a forward pass over prompt + response
   (what it computed before issue 17): the largest difference over the batch's tokens, and of the ratio π / π_old.
The model size is BENCH_SIZE (workload.py).

    benchmarks/.venvs/ours/bin/python benchmarks/bench_kernels.py [--num-devices 2]

The last stdout line is `RESULT {json}` for benchmarks/run.py.
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import workload as W  # noqa: E402
from bench_ours import prompts, setup  # noqa: E402
from flax import nnx  # noqa: E402

import rlhf_ppo as rp  # noqa: E402
from common import _next_token  # noqa: E402


def best_of(fn, repeats):
    """Median seconds of `repeats` calls after one warm-up call; fn() must block on its result."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(repeats):
    """FLOP/s of a plain float32 n x n matmul, best over a few sizes: the practical peak of this machine."""
    best, matmul = 0.0, jax.jit(jnp.dot)
    for n in (1024, 2048, 4096):
        a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
        best = max(best, 2 * n**3 / best_of(lambda a=a, b=b: matmul(a, b).block_until_ready(), repeats))
    return best


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature"))
def sample_no_cache(graphdef, params, prompt_tokens, prompt_mask, key, *, max_new_tokens, temperature):
    """The baseline: every new token recomputes the transformer over the whole sequence (a fixed [B, P + R] buffer
    with a causal mask, so the shapes never change); the LM head runs on the last position only (as HF generate's
    logits_to_keep), so the baseline does not waste work the KV cache would not also save."""
    B, P = prompt_tokens.shape
    model = nnx.merge(graphdef, params)
    tokens = jnp.concatenate([prompt_tokens, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)  # [B, P + R]
    mask = jnp.concatenate([prompt_mask, jnp.zeros((B, max_new_tokens), bool)], axis=1)

    def body(i, carry):
        tokens, mask = carry
        h, _ = model.hidden_states(tokens, rp.positions_from_mask(mask), mask)  # [B, P + R, D]: all positions again
        logits = model.head(h[:, P + i - 1][:, None])[:, 0]  # [B, V]: the LM head only where it is needed
        new, _ = _next_token(logits, jax.random.fold_in(key, i), temperature)
        return tokens.at[:, P + i].set(new), mask.at[:, P + i].set(True)

    return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, mask))[0][:, P:]


def sampler_speeds(args, models, params, q, qm, repeats):
    """tokens/s of the KV-cache sampler (rlhf_ppo.generate) and of the full-recompute one."""
    key = jax.random.key(0)
    cached = best_of(lambda: jax.block_until_ready(rp.generate(args, models, params, q, qm, key)), repeats)
    no_cache = best_of(
        lambda: sample_no_cache(
            models.policy, params["policy"], q, qm, key, max_new_tokens=W.RESPONSE_LEN, temperature=W.TEMPERATURE
        ).block_until_ready(),
        repeats,
    )
    n = q.shape[0] * W.RESPONSE_LEN
    return n / cached, n / no_cache


def update_batch(args, models, tok, params, frozen, q, qm):
    """One rollout and its advantages: the batch rlhf_ppo.ppo_update trains on, and the rollout."""
    roll = rp.rollout(args, models, tok, params, frozen, q, qm, jax.random.key(0))
    advantages, returns, _, _ = rp.compute_advantages(args, roll, args.kl_coef)
    batch = {k: roll[k] for k in ("tokens", "mask", "responses", "response_mask", "logprobs", "values")}
    return batch | {"advantages": advantages, "returns": returns}, roll


def update_flops(args, models, params, batch):
    """FLOPs of one rlhf_ppo.ppo_update call: XLA's count of one loss-and-gradient pass, times the passes."""
    grad = jax.jit(jax.grad(rp.ppo_loss, has_aux=True), static_argnums=(1, 2))
    cost = grad.lower(params, args, models, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts one device's share of the partitioned program; the minibatches of an epoch see the whole batch once
    return cost["flops"] * jax.device_count() * args.ppo_epochs


def train_step_flops(args, models, tx, rows, params, opt_state, batch, repeats):
    """-> (FLOP/s, FLOPs per ppo_update call, seconds per call) of rlhf_ppo.ppo_update."""
    flops = update_flops(args, models, params, batch)
    state = {"params": jax.tree.map(jnp.copy, params), "opt_state": jax.tree.map(jnp.copy, opt_state)}  # donated below

    def step():
        p, o = state["params"], state["opt_state"]
        state["params"], state["opt_state"], stats = rp.ppo_update(
            args, models, tx, rows, p, o, batch, jax.random.key(0)
        )
        jax.block_until_ready(stats)

    seconds = best_of(step, repeats)
    return flops / seconds, flops, seconds


def sampler_logprob_error(args, models, params, roll):
    """max |log π_sampler − log π_forward| over the rollout's response tokens, and max |π_forward / π_sampler − 1|."""
    forward = rp.response_logprobs(
        models.policy, params["policy"], roll["tokens"], roll["mask"], roll["responses"], args.temperature
    )
    diff = jnp.where(roll["response_mask"], forward - roll["logprobs"], 0.0)
    return float(jnp.abs(diff).max()), float(jnp.abs(jnp.expm1(diff)).max())


def main(cli):
    (args, models, tx, rows, tok), state, frozen, mesh = setup(cli.num_devices)
    params, opt_state = state["params"], state["opt_state"]
    q, qm = prompts(0, mesh)
    batch, roll = update_batch(args, models, tok, params, frozen, q, qm)

    logprob_error, ratio_error = sampler_logprob_error(args, models, params, roll)
    cached, no_cache = sampler_speeds(args, models, params, q, qm, cli.repeats)
    step_flops, flops, seconds = train_step_flops(args, models, tx, rows, params, opt_state, batch, cli.repeats)
    peak = matmul_flops(cli.repeats)
    result = {
        "num_devices": cli.num_devices,
        "kv_cache_tok_s": cached,
        "no_cache_tok_s": no_cache,
        "train_step_flop_s": step_flops,
        "train_step_flops": flops,
        "train_step_s": seconds,
        "matmul_flop_s": peak,
        "sampler_logprob_max_abs_diff": logprob_error,
        "sampler_ratio_max_abs_diff": ratio_error,
    }
    print(
        f"sampler: KV cache {cached:,.0f} tok/s, no cache {no_cache:,.0f} tok/s ({cached / no_cache:.1f}x); train step "
        f"{flops / 1e9:.1f} GFLOP in {seconds:.3f}s = {step_flops / 1e9:.1f} GFLOP/s, matmul {peak / 1e9:.1f} GFLOP/s "
        f"({step_flops / peak:.0%}); log π_old, sampler vs forward pass: max |diff| {logprob_error:.2e}",
        file=sys.stderr,
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-devices", type=int, default=1, help="fake XLA CPU devices; the batch is split over them")
    main(parser.parse_args())
