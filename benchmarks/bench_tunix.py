"""Benchmark of Google Tunix 0.1.7's PPO (tunix.rl.ppo.PPOLearner on an RLCluster) on the shared workload.

What runs: the workload of workload.py (64 prompts of 16 random tokens per iteration, exactly 32 sampled tokens at
temperature 0.7, a reward model, KL penalty 0.05 in the reward, GAE, 4 PPO epochs over one minibatch of 64) on the
tiny random Llama checkpoints in .work/models, loaded into Tunix's own Llama3 model (tunix.models.llama3):
policy and reference from policy/, critic (value) and reward from reward/ (backbone + its `score.weight` head),
every role on the same 1-device CPU mesh, float32, vanilla (Tunix sampler) rollout engine.

How it is timed: Tunix's learner.train() runs the whole loop; one PPO iteration is one "global step"
(learner._run_global_step: rollout + reference/old log-probs + values + rewards + GAE, then 4 x (actor step,
critic step)). Its end is timestamped after jax.block_until_ready on the actor and critic parameters, and an
iteration's time is the wall time between consecutive boundaries (so anything Tunix does between global steps
counts too). Generation time is the wall time of RLCluster.generate (the Tunix sampler: prefill + KV-cached decode
loop + detokenisation; its token outputs are host numpy arrays, so it is synchronous). update_s = iter_s - gen_s.

train_s is the PPO update alone: from the iteration's first RLCluster.update_actor call (stamped on entry, after
jax.block_until_ready on the training example it is given) to the iteration's synchronised end above. In Tunix's
_run_all_micro_batch_steps a worker thread runs the rollout, its scoring passes (reference and old log-probs,
values, reward) and GAE (which reads the advantages back to host) and, as actor and rollout share one mesh (no
async rollout), enqueues the example for the 4 epochs only after all of that; the trainer thread then runs
4 x (update_actor, update_critic), each one PeftTrainer.train step over the minibatch (jitted train step, metric
buffering). So no rollout or scoring work overlaps the interval; after the last update_critic it only holds the
join of the finished worker thread. What Tunix does between global steps (weight-sync check, perf/metric export)
falls outside it, in update_s.

The first --warmup iterations (jit compilation) are discarded. Peak RSS is ru_maxrss of this process.

Usage: .venvs/tunix/bin/python bench_tunix.py [--warmup 2] [--iters 5]
The last stdout line is `RESULT {json}` (name, iter_s, gen_s, update_s, train_s, peak_rss_mb, differences, metrics).
"""

import argparse
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import workload as W  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from tunix.models import safetensors_loader  # noqa: E402
from tunix.models.llama3 import model as llama_lib  # noqa: E402
from tunix.models.llama3 import params as llama_params  # noqa: E402
from tunix.rl import algo_core, function_registry  # noqa: E402
from tunix.rl import common as rl_common  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.ppo import ppo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402

NAME = "Tunix 0.1.7 PPO (JAX CPU)"
MODELS = W.MODELS
NO_STOP_TOKEN = W.MODEL["vocab_size"]  # an id the model can never sample: generation never stops early
VALUE_LOSS = "ppo_times_vf_coef"

CONFIG = llama_lib.ModelConfig(
    num_layers=W.MODEL["num_hidden_layers"],
    vocab_size=W.MODEL["vocab_size"],
    embed_dim=W.MODEL["hidden_size"],
    hidden_dim=W.MODEL["intermediate_size"],
    num_heads=W.MODEL["num_attention_heads"],
    head_dim=W.MODEL["hidden_size"] // W.MODEL["num_attention_heads"],
    num_kv_heads=W.MODEL["num_key_value_heads"],
    rope_theta=int(W.MODEL["rope_theta"]),
    norm_eps=W.MODEL["rms_norm_eps"],
    weight_tying=False,
)

DIFFERENCES = [
    "Tunix's PPO builds the per-token reward tensor with jnp.zeros_like(completion_ids), i.e. int32, so the "
    "reward-model score added at the last token is truncated to an integer (|score| < 1 here: lost entirely); "
    "patched here so that tensor is float32",
    "Tunix's Llama3 attention calls apply_rope without config.rope_theta (so always theta=1e6); patched here to "
    "use theta=10000 like the checkpoints",
    "Tunix computes old-policy log-probs (rollout) and the training log-probs without the sampling temperature but "
    "the reference log-probs with it; patched here so all three use logits/0.7 (KL is 0 when policy == reference)",
    "critic is a separate model with its own optimizer (Tunix has no shared actor-critic loss); vf_coef 0.1 is "
    "applied by registering a value loss = 0.1 * Tunix's 'ppo' value loss (with Adam this barely matters)",
    "each PPO epoch is one actor step followed by one critic step (Tunix alternates them per minibatch)",
    "optimizer: clip_by_global_norm(1.0) + adamw(lr 1e-5, eps 1e-5, weight_decay 0), constant learning rate",
    "KL penalty in the reward with Tunix's kl_method='kl' (logp - ref_logp) per token, beta 0.05, fixed",
    "advantages whitened over the batch (Tunix's GAE estimator always does); rewards not whitened",
    "reward = reward-model score at the last non-pad completion token; a completion token equal to the pad id (0) "
    "is masked out like padding (Tunix derives the completion mask from pad ids; rare with random weights)",
    "rollout stop token set to an id outside the vocabulary so every completion is exactly 32 tokens",
    "prompts go through Tunix as text (word-level tokenizer, exact round trip); BOS prepending disabled so the "
    "prompt is exactly the 16 workload ids",
    "sampling key is set to PRNGKey(iteration) per rollout (Tunix's default is PRNGKey(0) for every rollout)",
]


# ----------------------------------------------------------------------------------------------------------------
# Workarounds / adaptations (monkeypatches of Tunix 0.1.7)
# ----------------------------------------------------------------------------------------------------------------


class _FloatZerosLike:
    """jax.numpy for tunix.rl.ppo.ppo_learner, except that zeros_like defaults to float32 (its only use there is
    the reward tensor, which it otherwise builds as int32 from the completion ids)."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def zeros_like(x, dtype=None, **kwargs):
        return jnp.zeros_like(x, dtype=jnp.float32 if dtype is None else dtype, **kwargs)


def patch_tunix():
    """See DIFFERENCES: float reward tensor, rope theta, sampling temperature in every log-prob, vf_coef-scaled
    value loss."""
    ppo_learner.jnp = _FloatZerosLike()
    llama_lib.apply_rope = functools.partial(llama_lib.apply_rope, rope_theta=CONFIG.rope_theta)

    logps = rl_common.compute_per_token_logps

    def logps_at_sampling_temperature(*args, temperature=None, **kwargs):
        return logps(*args, temperature=W.TEMPERATURE if temperature is None else temperature, **kwargs)

    rl_common.compute_per_token_logps = logps_at_sampling_temperature

    @function_registry.register_value_loss_fn(VALUE_LOSS)
    def value_loss(model, train_example, clip_range_value, pad_id, eos_id):
        loss, aux = algo_core.ppo_value_loss_fn(model, train_example, clip_range_value, pad_id, eos_id)
        return W.VF_COEF * loss, aux


class WordTokenizer:
    """The checkpoints' HF tokenizer behind Tunix's plain tokenizer interface, with no BOS to prepend."""

    def __init__(self, path):
        self.hf = AutoTokenizer.from_pretrained(path)

    def encode(self, text, **kwargs):
        return self.hf.encode(str(text), add_special_tokens=False)  # Tunix hands over numpy strings

    def decode(self, ids, **kwargs):
        return self.hf.decode(ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return W.EOS

    def pad_id(self):
        return W.PAD


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class Llama3Scorer(llama_lib.Llama3):
    """Llama3 backbone whose output head is a [hidden, 1] score head: per-token scalar scores [B, T, 1], which is
    what Tunix's critic/reward path (common.compute_score) expects. Loaded from an HF LlamaForSequenceClassification
    checkpoint (its `score.weight` becomes the head). Accepts and ignores `segment_ids`, which compute_score passes
    in addition to the attention mask."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.lm_head = llama_lib.Einsum(
            einsum_str="BTD,DV->BTV", shape=(config.embed_dim, 1), rngs=rngs, sharding=config.shd_config.emb_dv
        )

    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
        return super().__call__(input_tokens, positions, cache, attention_mask)


def scorer_key_mapping(config):
    return {**llama_params._get_key_and_transform_mapping(config), r"score\.weight": ("lm_head.w", ((1, 0), None))}


def load_models(mesh):
    policy_dir, reward_dir = str(MODELS / "policy"), str(MODELS / "reward")
    load_lm = functools.partial(
        llama_params.create_model_from_safe_tensors, config=CONFIG, mesh=mesh, dtype=jnp.float32
    )
    load_scorer = functools.partial(
        safetensors_loader.load_and_create_model,
        file_dir=reward_dir,
        model_class=Llama3Scorer,
        config=CONFIG,
        key_mapping=scorer_key_mapping,
        mesh=mesh,
        dtype=jnp.float32,
    )
    return dict(actor=load_lm(policy_dir), reference=load_lm(policy_dir), critic=load_scorer(), reward=load_scorer())


# ----------------------------------------------------------------------------------------------------------------
# Tunix setup
# ----------------------------------------------------------------------------------------------------------------


def optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(W.LR, eps=1e-5, weight_decay=0.0))


def build_learner(num_iterations):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=W.RESPONSE_LEN,
        temperature=W.TEMPERATURE,
        top_p=1.0,
        top_k=None,
        max_prompt_length=W.PROMPT_LEN,
        kv_cache_size=W.PROMPT_LEN + W.RESPONSE_LEN,
        eos_tokens=[NO_STOP_TOKEN],
        data_type=jnp.float32,
    )
    training_config = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer(),
        critic_optimizer=optimizer(),
        eval_every_n_steps=10**9,
        max_steps=W.PPO_EPOCHS * W.NUM_MINI_BATCHES * num_iterations,
        mini_batch_size=W.BATCH // W.NUM_MINI_BATCHES,
        metrics_logging_options=None,
        checkpoint_root_directory=None,
        pbar_description=None,
    )
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in rl_cluster_lib.Role},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=training_config,
        rollout_config=rollout_config,
    )
    cluster = rl_cluster_lib.RLCluster(
        **load_models(mesh), tokenizer=WordTokenizer(str(MODELS / "policy")), cluster_config=cluster_config
    )
    ppo_config = ppo_learner.PPOConfig(
        num_iterations=W.PPO_EPOCHS,
        gamma=W.GAMMA,
        gae_lambda=W.LAM,
        beta=W.KL_COEF,
        epsilon=W.CLIPRANGE,
        clip_range_value=W.CLIPRANGE,
        kl_method="kl",
        entropy_coef=None,
        value_loss_fn=VALUE_LOSS,
    )
    return ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=ppo_config)


def dataset(num_iterations):
    """One batch of 64 text prompts per iteration; iteration i uses workload.prompts(i)."""
    text = lambda row: " ".join(W.word(int(t)) for t in row)  # noqa: E731
    return [{"prompts": [text(row) for row in W.prompts(i)]} for i in range(num_iterations)]


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def instrument(learner, timings):
    """Wraps RLCluster.generate (generation time, fresh sampling key per rollout), RLCluster.update_actor and
    update_critic (start of the iteration's PPO update) and learner._run_global_step (one PPO iteration; its end is
    a synchronised timestamp)."""
    cluster = learner.rl_cluster
    generate, global_step = cluster.generate, learner._run_global_step

    def timed_generate(*args, **kwargs):
        cluster.cluster_config.rollout_config.seed = jax.random.PRNGKey(len(timings["gen"]))
        start = time.perf_counter()
        out = jax.block_until_ready(generate(*args, **kwargs))
        timings["gen"].append(time.perf_counter() - start)
        return out

    def timed_global_step(*args, **kwargs):
        if not timings["ends"]:
            timings["ends"].append(time.perf_counter())
        global_step(*args, **kwargs)
        jax.block_until_ready((nnx.state(cluster.actor_trainer.model), nnx.state(cluster.critic_trainer.model)))
        timings["ends"].append(time.perf_counter())
        n, seconds = len(timings["ends"]) - 1, timings["ends"][-1] - timings["ends"][-2]
        print(f"iteration {n}: {seconds:.2f} s (generation {timings['gen'][-1]:.2f} s)", flush=True)

    cluster.generate = timed_generate
    cluster.update_actor = stamp_first_update(cluster.update_actor, timings)
    cluster.update_critic = stamp_first_update(cluster.update_critic, timings)
    learner._run_global_step = timed_global_step


def stamp_first_update(update, timings):
    """Wraps an actor/critic update so that the iteration's first one stamps timings["train_start"]: one stamp per
    rollout, taken once its training example is computed (JAX is asynchronous), before any training work."""

    def first_update_stamped(train_ds, *args, **kwargs):
        if len(timings["train_start"]) < len(timings["gen"]):
            jax.block_until_ready(train_ds)
            timings["train_start"].append(time.perf_counter())
        return update(train_ds, *args, **kwargs)

    return first_update_stamped


def last_metrics(cluster):
    """Values Tunix logged for the last iteration (in-memory metrics logger; no backends, nothing on disk)."""
    logger = cluster._rl_metrics_logger
    wanted = {
        "score": ("rewards", "score/mean"),
        "reward": ("rewards", "reward/mean"),
        "kl": ("rewards", "reward_kl_penalty"),
        "pg_loss": ("actor", "loss"),
        "pg_clipfrac": ("actor", "pg_clipfrac"),
        "vf_loss": ("critic", "loss"),
        "vf_clipfrac": ("critic", "vf_clipfrac"),
        "completion_len": ("generation", "completions/mean_length"),
    }
    out = {}
    for key, (prefix, name) in wanted.items():
        if logger.metric_exists(prefix, name, "train"):
            out[key] = float(np.asarray(logger.get_metric_history(prefix, name, "train"))[-1])
    if "vf_loss" in out:
        out["vf_loss"] /= W.VF_COEF  # report the unscaled clipped value loss
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    total = args.warmup + args.iters

    patch_tunix()
    learner = build_learner(total)
    timings = {"gen": [], "ends": [], "train_start": []}
    instrument(learner, timings)
    learner.train(dataset(total))

    iter_s = np.diff(timings["ends"])[args.warmup :].tolist()
    gen_s = timings["gen"][args.warmup : total]
    # Iteration k's update runs from its first update_actor to its end (ends[k + 1]).
    train_s = [end - start for start, end in zip(timings["train_start"], timings["ends"][1:])][args.warmup :]
    assert len(iter_s) == len(gen_s) == len(train_s) == args.iters, (len(iter_s), len(gen_s), len(train_s))
    result = {
        "name": NAME,
        "iter_s": iter_s,
        "gen_s": gen_s,
        "update_s": [i - g for i, g in zip(iter_s, gen_s)],
        "train_s": train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "differences": DIFFERENCES,
        "metrics": last_metrics(learner.rl_cluster),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
