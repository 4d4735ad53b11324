"""Mutation check: do the tests notice when something is connected wrongly?

Each mutant below is a one-line change of the kind a careful reviewer worries about (a flipped sign, a swapped
argument, a wrong temperature, an off-by-one slice, a key used twice, a guard removed). Each is applied alone to a
fresh copy of the repository, and only the tests that should catch it are run there: the mutant is *killed* if they
fail, *survived* if they pass. Every mutant must be killed. Not part of CI (about an hour on 2 CPU cores); run it after
changing algorithm code, and add mutants of what you wrote.

    python scripts/mutation_check.py                 # every mutant, then a table
    python scripts/mutation_check.py -k kl -k sft    # the mutants whose name contains "kl" or "sft"

Before the mutants, the same tests run on the unmodified copy and must pass (else a "kill" would mean nothing).
A mutant whose text is not found exactly once stops the script: the list is stale.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = "tests/test_ppo_reference.py"  # the naive reference of one PPO iteration
T_PPO, T_SFT, T_RM, T_MODEL, T_REAL, T_MH, T_DPO, T_GRPO = (
    "tests/test_ppo.py::",
    "tests/test_sft.py::",
    "tests/test_reward_model.py::",
    "tests/test_model.py::",
    "tests/test_real_model.py::",
    "tests/test_multihost.py::",
    "tests/test_dpo.py::",
    "tests/test_grpo.py::",
)
G_ADV = T_GRPO + "test_grpo_and_rloo_advantages_equal_their_formulas"
G_LOSS = T_GRPO + "test_each_loss_type_equals_its_formula_computed_by_hand"
G_NAIVE = T_GRPO + "test_the_loss_and_its_gradient_equal_a_naive_full_logits_reference"
G_ASYNC = T_GRPO + "test_staleness_0_is_the_synchronous_loop_and_1_samples_with_the_previous_weights"
G_LEARN = T_GRPO + "test_grpo_learns_a_reward_function_and_the_evaluation_starts_at_the_sft_policy"
G_REWARDS = T_GRPO + "test_reward_functions_get_their_columns_and_none_adds_nothing"
G_ITER = T_GRPO + "test_num_iterations_are_steps_on_the_same_batch_and_a_nan_loss_leaves_the_weights"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # ---- KL penalty
    Mutant("kl: sign of the penalty flipped", "rlhf_ppo.py",
           "    non_score_reward = -kl_coef * kl", "    non_score_reward = kl_coef * kl", (REF,)),
    Mutant("kl: not masked after the stop token", "rlhf_ppo.py",
           "args.kl_estimator) * mask\n", "args.kl_estimator)\n", (REF,)),
    Mutant("kl: arguments swapped (ref, policy)", "rlhf_ppo.py",
           "kl_per_token(rollout[\"logprobs\"], rollout[\"ref_logprobs\"], args.kl_estimator)",
           "kl_per_token(rollout[\"ref_logprobs\"], rollout[\"logprobs\"], args.kl_estimator)", (REF,)),
    Mutant("kl: k1 and k3 swapped", "rlhf_ppo.py",
           'return -log_ratio if estimator == "k1" else', 'return -log_ratio if estimator == "k3" else', (REF,)),
    # ---- temperature
    Mutant("temperature: training log-probs in the loss at T = 1", "rlhf_ppo.py",
           "policy_and_values(args, models, params, mb[\"tokens\"], mb[\"mask\"], mb[\"responses\"])",
           "policy_and_values(dataclasses.replace(args, temperature=1.0), models, params, mb[\"tokens\"], mb[\"mask\"], mb[\"responses\"])", (REF,)),
    Mutant("temperature: sampler at T = 1", "rlhf_ppo.py",
           "        temperature=args.temperature,\n        stop_token_id",
           "        temperature=1.0,\n        stop_token_id", (T_PPO + "test_the_sampler_draws_at_the_rollout_temperature",)),
    Mutant("temperature: reference log-probs at T = 1", "rlhf_ppo.py",
           "frozen[\"ref\"], tokens, mask, responses, args.temperature)", "frozen[\"ref\"], tokens, mask, responses, 1.0)", (REF,)),
    Mutant("temperature: fused head ignores T", "common.py",
           ".astype(jnp.float32) / temperature  # [B * c, V]", ".astype(jnp.float32)  # [B * c, V]", (REF,)),
    # ---- score placement and the reward model's input
    Mutant("score: added at slot -1, not the last real token", "rlhf_ppo.py",
           "    last = jnp.maximum(mask.sum(1) - 1, 0)", "    last = jnp.full(mask.shape[0], mask.shape[1] - 1)", (REF,)),
    Mutant("score: reward model read at the last slot, pad or not", "rlhf_ppo.py",
           "    last = jnp.argmax(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)",
           "    last = jnp.full(mask.shape[0], mask.shape[1] - 1)", (REF,)),
    Mutant("score: no EOS appended to a response that lacks it", "rlhf_ppo.py",
           "    append = (length == 0) | (last != eos_id)", "    append = length == 0", (REF,)),
    Mutant("stop token: mask excludes the stop token itself", "rlhf_ppo.py",
           "    return (jnp.cumsum(is_stop, axis=1) - is_stop) == 0", "    return jnp.cumsum(is_stop, axis=1) == 0", (REF,)),
    Mutant("stop token: contains_stop needs every token to be it", "rlhf_ppo.py",
           '"contains_stop": jnp.any(', '"contains_stop": jnp.all(', (REF,)),
    Mutant("missing-EOS penalty on the rows that have the stop token", "rlhf_ppo.py",
           "    return jnp.where(contains_stop, scores,", "    return jnp.where(~contains_stop, scores,", (REF,)),
    # ---- values, returns, whitening
    Mutant("values: read one position late", "rlhf_ppo.py",
           "value.head(value.hidden_states(tokens, positions, mask)[0][:, -R - 1 : -1])",
           "value.head(value.hidden_states(tokens, positions, mask)[0][:, -R:])", (REF,)),
    Mutant("returns: from the whitened advantages", "rlhf_ppo.py",
           "        advantages = masked_whiten(advantages, mask) * mask",
           '        advantages = masked_whiten(advantages, mask) * mask; returns = advantages + rollout["values"]', (REF,)),
    Mutant("whitening: padding included", "rlhf_ppo.py",
           "        advantages = masked_whiten(advantages, mask) * mask",
           "        advantages = masked_whiten(advantages, jnp.ones_like(mask)) * mask", (REF,)),
    Mutant("value clip: --cliprange instead of --cliprange-value", "rlhf_ppo.py",
           "jnp.clip(values - mb[\"values\"], -args.cliprange_value, args.cliprange_value)",
           "jnp.clip(values - mb[\"values\"], -args.cliprange, args.cliprange)", (REF,)),
    # ---- the PPO loss and update
    Mutant("policy loss: min instead of max (pessimistic bound lost)", "rlhf_ppo.py",
           "    pg_loss = token_mean(jnp.maximum(pg_losses, pg_losses2))", "    pg_loss = token_mean(jnp.minimum(pg_losses, pg_losses2))", (REF,)),
    Mutant("ratio: old / new", "rlhf_ppo.py",
           '    log_ratio = new_logprobs - mb["logprobs"]', '    log_ratio = mb["logprobs"] - new_logprobs', (REF,)),
    Mutant("PPO update: gradient ascent", "rlhf_ppo.py",
           "new = (optax.apply_updates(params, updates), new_opt_state)",
           "new = (jax.tree.map(jnp.subtract, params, updates), new_opt_state)",
           (T_PPO + "test_the_update_lowers_its_own_loss",)),
    Mutant("PPO accumulation: micro-batch token count, not the minibatch's", "rlhf_ppo.py",
           '        num_tokens = batch["response_mask"][idx.reshape(-1)].sum()',
           '        num_tokens = batch["response_mask"][idx[0]].sum()', (T_PPO + "test_gradient_accumulation_equals_one_big_batch",)),
    Mutant("PPO guard: a non-finite update is applied", "rlhf_ppo.py",
           '        finite = jnp.isfinite(stats.pop("loss")) & jnp.isfinite(optax.tree.norm(grads))',
           '        finite = jnp.isfinite(stats.pop("loss")) | True',
           (T_PPO + "test_non_finite_rewards_or_losses_stop_the_run_and_leave_the_output_dir_unchanged",)),
    Mutant("PPO guard: a NaN --reward-fn is not named", "rlhf_ppo.py",
           "    if not np.isfinite(out).all():", "    if False:",
           (T_PPO + "test_non_finite_rewards_or_losses_stop_the_run_and_leave_the_output_dir_unchanged",)),
    Mutant("settings: --temperature 0 accepted", "rlhf_ppo.py",
           "        (args.temperature > 0, f\"--temperature", "        (True, f\"--temperature",
           (T_PPO + "test_settings_that_cannot_work_are_refused_naming_the_flag",)),
    # ---- PRNG
    Mutant("PRNG: one key for every sampler step", "common.py",
           "jax.random.fold_in(key, i), temperature)", "jax.random.fold_in(key, 0), temperature)",
           (T_MODEL + "test_every_sampler_step_draws_with_a_fresh_key",)),
    Mutant("PRNG: one key for every PPO update", "rlhf_ppo.py",
           "            key = jax.random.fold_in(jax.random.key(args.seed), update)",
           "            key = jax.random.key(args.seed)", (T_PPO + "test_a_fresh_key_for_every_update_and_for_sampling_and_shuffling",)),
    Mutant("PRNG: the same key for sampling and shuffling", "rlhf_ppo.py",
           "    gen_key, update_key = jax.random.split(key)", "    gen_key = update_key = key",
           (T_PPO + "test_a_fresh_key_for_every_update_and_for_sampling_and_shuffling",)),
    # ---- sampler
    Mutant("sampler: never stops at the stop token", "common.py",
           "return i + 1, cache, new, done | (new == stop_token_id), (out", "return i + 1, cache, new, done, (out",
           (T_MODEL + "test_sampler_stops_at_eos_pads_after_and_exits_early",)),
    Mutant("sampler: decoding positions off by one", "common.py",
           "(next_pos + i - 1)[:, None], kv, cache, P + i - 1)", "(next_pos + i)[:, None], kv, cache, P + i - 1)",
           (T_MODEL + "test_greedy_sampling_equals_transformers_generate",)),
    # ---- log π_old from the sampler (issue 17)
    Mutant("sampler log-probs: at T = 1, not the sampling temperature", "common.py",
           "jnp.log(jnp.take_along_axis(probs, token", "jnp.log(jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), token",
           (REF + "::test_sampler_logprobs_equal_the_naive_forward", T_MODEL + "test_sampled_frequencies_follow_the_tempered_softmax")),
    Mutant("sampler log-probs: of the most likely token, not the drawn one", "common.py",
           "jnp.take_along_axis(probs, token[:, None], axis=-1)", "jnp.take_along_axis(probs, jnp.argmax(probs, axis=-1)[:, None], axis=-1)",
           (REF + "::test_sampler_logprobs_equal_the_naive_forward", T_MODEL + "test_sampled_frequencies_follow_the_tempered_softmax")),
    Mutant("sampler log-probs: stored one slot early", "common.py",
           "logprobs.at[:, i].set(logp)", "logprobs.at[:, i - 1].set(logp)",
           (REF + "::test_sampler_logprobs_equal_the_naive_forward",)),
    Mutant("sampler log-probs: not 0 after the stop", "common.py",
           "jnp.where(done, 0.0, logp)", "logp",
           (REF + "::test_sampler_logprobs_equal_the_naive_forward", T_MODEL + "test_sampler_stops_at_eos_pads_after_and_exits_early")),
    Mutant("PPO rollout: π_old is the reference's log-probs", "rlhf_ppo.py",
           '"logprobs": logprobs, "ref_logprobs": ref_logprobs,', '"logprobs": ref_logprobs, "ref_logprobs": ref_logprobs,', (REF,)),
    Mutant("PPO rollout: the shared value head read one position late", "rlhf_ppo.py",
           "        policy_hidden = policy_hidden[:, -R - 1 : -1]  # [B, R, D]", "        policy_hidden = policy_hidden[:, -R:]  # [B, R, D]",
           (REF,)),
    # ---- PPO resume and export
    Mutant("PPO iteration: β restarts from --kl-coef every update", "rlhf_ppo.py",
           "kl_coef = float(state[\"kl_coef\"])", "kl_coef = args.kl_coef",
           (T_PPO + "test_the_adaptive_kl_coefficient_carries_from_update_to_update",)),
    Mutant("PPO resume: the adaptive KL coefficient restarts", "rlhf_ppo.py",
           'args.resume)\n    rows = NamedSharding', 'args.resume)\n    state["kl_coef"] = jnp.float32(args.kl_coef)\n    rows = NamedSharding',
           (T_PPO + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy",)),
    Mutant("PPO export: the reference weights are written", "rlhf_ppo.py",
           "nnx.merge(models.policy, gather(state[\"params\"][\"policy\"]))", "nnx.merge(models.policy, gather(frozen[\"ref\"]))",
           (T_PPO + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy",)),
    # ---- SFT
    Mutant("sft: loss on prompt tokens too", "sft.py",
           '    target_mask = batch["loss_mask"][:, 1:]', '    target_mask = batch["attention_mask"][:, 1:]',
           (T_SFT + "test_loss_only_on_completion_tokens",)),
    Mutant("sft: gradient ascent", "sft.py",
           "    new = (optax.apply_updates(params, updates), new_opt_state)",
           "    new = (jax.tree.map(jnp.subtract, params, updates), new_opt_state)", (T_SFT + "test_a_step_lowers_its_own_loss",)),
    Mutant("sft accumulation: divided by the first micro-batch's tokens", "sft.py",
           "    count = jnp.maximum(count.sum(), 1)", "    count = jnp.maximum(count[0], 1)",
           (T_SFT + "test_gradient_accumulation_equals_one_big_batch",)),
    Mutant("sft guard: a non-finite step is applied", "sft.py",
           '    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])',
           '    finite = jnp.isfinite(metrics["loss"]) | True', (T_SFT + "test_a_non_finite_step_leaves_the_state_unchanged",)),
    Mutant("sft guard: a diverging run goes on", "sft.py",
           "    if not (math.isfinite(loss) and math.isfinite(grad_norm)):", "    if False:",
           (T_SFT + "test_a_diverging_run_stops_and_leaves_the_output_dir_unchanged",)),
    Mutant("sft resume: starts again from step 0", "sft.py",
           "args=ocp.args.StandardRestore(abstract)), ckpt.latest_step()", "args=ocp.args.StandardRestore(abstract)), 0",
           (T_SFT + "test_resume_after_interruption_gives_the_uninterrupted_run_exactly",)),
    Mutant("sft resume: optimizer state not restored", "sft.py",
           "    state, start = restore_latest(ckpt, state, args.resume)\n",
           "    state, start = restore_latest(ckpt, state, args.resume)\n    state[\"opt_state\"] = shard(jax.jit(tx.init)(state[\"params\"]), mesh, args.fsdp)\n",
           (T_SFT + "test_resume_after_interruption_gives_the_uninterrupted_run_exactly",)),
    Mutant("sft resume: a new run overwrites an unfinished one", "sft.py",
           '        if not (directory / "FINISHED").exists() and any(', "        if False and any(",
           (T_SFT + "test_resume_after_interruption_gives_the_uninterrupted_run_exactly",)),
    Mutant("sft export: the initial weights are written", "sft.py",
           "export, args, nnx.merge(graphdef, gather(state[\"params\"])), tok_dir, overrides)",
           "export, args, model, tok_dir, overrides)",
           (T_SFT + "test_resume_after_interruption_gives_the_uninterrupted_run_exactly",)),
    Mutant("export: non-finite weights written", "sft.py",
           "        if not np.isfinite(w).all():  # a NaN never", "        if False:  # a NaN never",
           (T_SFT + "test_save_model_refuses_non_finite_weights",)),
    Mutant("HF export: kernels not transposed to torch's [out, in]", "sft.py",
           "        tensors[name] = np.ascontiguousarray(w.T if transpose else w)", "        tensors[name] = np.ascontiguousarray(w)",
           (T_MODEL + "test_save_load_roundtrip_is_exact",)),
    Mutant("data: a file that is not UTF-8 is read as Latin-1", "sft.py",
           '                line = raw.decode("utf-8")', '                line = raw.decode("latin-1")',
           (T_SFT + "test_a_file_that_is_not_utf8_names_file_and_line",)),
    # ---- sharding
    Mutant("sharding: --num-devices ignored (one device)", "sft.py",
           "    devices = jax.devices()[: num_devices or len(jax.devices())]", "    devices = jax.devices()[:1]",
           (T_SFT + "test_sharded_steps_equal_single_device",)),
    Mutant("sharding: --fsdp ignored (replicated)", "sft.py",
           "        if not fsdp or n == 1 or not dims:", "        if True:", (T_SFT + "test_sharded_steps_equal_single_device",)),
    # ---- reward model
    Mutant("labeler: chosen and rejected swapped", "reward_model.py",
           "    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)",
           "    chosen, rejected = np.where(a_wins, b, a), np.where(a_wins, a, b)",
           (T_RM + "test_the_simulated_labeler_prefers_the_higher_gold_score",)),
    Mutant("pair tensors: rejected first", "reward_model.py",
           "\"tokens\": np.stack([widen(ct, pad_id), widen(rt, pad_id)]),",
           "\"tokens\": np.stack([widen(rt, pad_id), widen(ct, pad_id)]),",
           (T_RM + "test_pair_tensors_and_held_out_accuracy_keep_chosen_first",)),
    Mutant("held-out accuracy: margin rejected - chosen", "reward_model.py",
           "    margin, gold_margin = r[:N] - r[N:],", "    margin, gold_margin = r[N:] - r[:N],",
           (T_RM + "test_pair_tensors_and_held_out_accuracy_keep_chosen_first",)),
    Mutant("reward model: gradient ascent", "reward_model.py",
           "    new = (optax.apply_updates(params, updates), new_opt_state)",
           "    new = (jax.tree.map(jnp.subtract, params, updates), new_opt_state)",
           (T_RM + "test_a_step_lowers_the_preference_loss_and_a_non_finite_one_changes_nothing",)),
    Mutant("reward model: loss prefers the rejected", "reward_model.py",
           '        "loss": -jax.nn.log_sigmoid(margin).mean(),', '        "loss": -jax.nn.log_sigmoid(-margin).mean(),',
           (T_RM + "test_the_reward_model_learns_a_token_rule",)),
    Mutant("reward model: read at the first real token", "reward_model.py",
           "    last = jnp.argmax(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)  # [B]",
           "    last = jnp.argmax(mask, axis=1)  # [B]", (T_RM + "test_reward_is_read_at_last_real_token_whatever_the_padding",)),
    Mutant("reward model accumulation: gradients summed, not averaged", "reward_model.py",
           '    grads = jax.tree.map(lambda g: g / batch["tokens"].shape[0], grads)', "    grads = jax.tree.map(lambda g: g, grads)",
           (T_RM + "test_gradient_accumulation_equals_one_big_batch",)),
    Mutant("reward model: normalised by the variance, not the std", "reward_model.py",
           "    gain = 1.0 / float(raw.std() + 1e-8)", "    gain = 1.0 / float(raw.var() + 1e-8)",
           (T_RM + "test_normalisation_is_fitted_on_ppo_prompts_at_ppo_temperature",)),
    Mutant("reward model resume: optimizer state not restored", "reward_model.py",
           "    state, start = restore_latest(ckpt, state, args.resume)\n",
           "    state, start = restore_latest(ckpt, state, args.resume)\n    state[\"opt_state\"] = shard(jax.jit(tx.init)(state[\"params\"]), mesh, args.fsdp)\n",
           (T_RM + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_model",)),
    # ---- data rules and the reward model's inputs (issue 10)
    Mutant("normalisation: sampled at the labeler's temperature, not PPO's", "reward_model.py",
           "        args.norm_temperature,\n        eos_id,",
           "        args.temperature,\n        eos_id,",
           (T_RM + "test_normalisation_is_fitted_on_ppo_prompts_at_ppo_temperature",)),
    Mutant("normalisation: the first prompts, not a random sample", "reward_model.py",
           "    prompts = [prompts[i] for i in rng.choice(len(prompts), min(args.norm_prompts, len(prompts)), replace=False)]",
           "    prompts = prompts[: args.norm_prompts]", (T_RM + "test_normalisation_is_fitted_on_ppo_prompts_at_ppo_temperature",)),
    Mutant("normalisation: on the labeler's prompts, not PPO's", "reward_model.py",
           '        return encode_prompts(tok, movie_reviews("train"), args.prompt_tokens)',
           '        return encode_prompts(tok, movie_reviews("labeler"), args.prompt_tokens)',
           (T_RM + "test_the_default_normalisation_prompts_are_ppos_default_prompts",)),
    Mutant("BOS: prompts encoded without the tokenizer's prefix", "sft.py",
           '    prefix = tok.encode("", add_special_tokens=True).ids', "    prefix = []",
           ("tests/test_data.py::test_every_stage_starts_its_sequences_with_the_tokenizers_bos",)),
    Mutant("BOS: PPO's prompts encoded without special tokens", "rlhf_ppo.py",
           "    openings = lambda split: encode_prompts(tok, movie_reviews(split), args.prompt_tokens)\n",
           "    openings = lambda split: [e.ids[: args.prompt_tokens] for e in tok.encode_batch(movie_reviews(split), add_special_tokens=False)]\n",
           ("tests/test_data.py::test_every_stage_starts_its_sequences_with_the_tokenizers_bos",)),
    Mutant("reward model: re-tokenises the text of sampled pairs", "reward_model.py",
           '    texts = [i for i, p in enumerate(pairs) if "prompt_ids" not in p and isinstance(p["prompt"], str)]', "    texts = list(range(len(pairs)))",
           (T_RM + "test_pairs_with_token_ids_train_on_those_ids",)),
    Mutant("labeler: chosen and rejected ids swapped", "reward_model.py",
           "\"chosen_ids\": responses[c],\n                \"rejected_ids\": responses[r],", "\"chosen_ids\": responses[r],\n                \"rejected_ids\": responses[c],",
           (T_RM + "test_the_simulated_labeler_prefers_the_higher_gold_score",)),
    Mutant("reward model input: a second EOS after a sampled one", "reward_model.py",
           "        full = r if r and r[-1] == eos_id else r + [eos_id]", "        full = r + [eos_id]",
           (T_RM + "test_implicit_prompt_and_left_truncation",)),
    Mutant("splits: repeated IMDB reviews not removed", "sft.py",
           '    imdb = list(dict.fromkeys(t for t, r in zip(clean, rows) if r["source"] == "imdb"))',
           '    imdb = [t for t, r in zip(clean, rows) if r["source"] == "imdb"]',
           ("tests/test_data.py::test_the_imdb_splits_are_disjoint_cleaned_and_the_same_in_every_script",)),
    Mutant("splits: PPO's evaluation prompts are the labeler's", "sft.py",
           '        "eval": imdb[::10][::5],', '        "eval": imdb[::10][1::5],',
           ("tests/test_data.py::test_the_imdb_splits_are_disjoint_cleaned_and_the_same_in_every_script",)),
    # ---- metric definitions, critic learning rate, evaluation keys, value head (issue 10)
    Mutant("clipfrac: |ratio - 1| > eps, not where the clipped term wins", "rlhf_ppo.py",
           '        "policy/clipfrac_avg": token_mean((pg_losses2 > pg_losses).astype(jnp.float32)),',
           '        "policy/clipfrac_avg": token_mean((jnp.abs(ratio - 1) > hp.cliprange).astype(jnp.float32)),', (REF,)),
    Mutant("value clipfrac: |v - v_old| > eps", "rlhf_ppo.py",
           '        "val/clipfrac_avg": token_mean((vf_losses2 > vf_losses1).astype(jnp.float32)),',
           '        "val/clipfrac_avg": token_mean((jnp.abs(values - mb["values"]) > hp.cliprange_value).astype(jnp.float32)),', (REF,)),
    Mutant("objective/entropy: the reference's -log pi, not the policy's", "rlhf_ppo.py",
           '        "objective/entropy": (-rollout["logprobs"] * mask).sum(1).mean(),',
           '        "objective/entropy": (-rollout["ref_logprobs"] * mask).sum(1).mean(),', (REF,)),
    Mutant("critic learning rate ignored", "rlhf_ppo.py",
           '    rates = {"policy": args.learning_rate, "value": critic_lr}', '    rates = {"policy": args.learning_rate, "value": args.learning_rate}',
           (T_PPO + "test_the_critic_has_its_own_learning_rate",)),
    Mutant("evaluation: one key for both sets", "rlhf_ppo.py",
           "        key = jax.random.fold_in(jax.random.key(1234), i)", "        key = jax.random.key(1234)",
           (T_PPO + "test_each_evaluation_set_has_its_own_fixed_key",)),
    Mutant("shared value head: random, not zero, initialisation", "rlhf_ppo.py",
           "kernel_init=nnx.initializers.zeros,", "kernel_init=nnx.initializers.normal(0.02),",
           (T_PPO + "test_the_shared_value_head_starts_at_zero_and_scores_stay_float32_in_bfloat16",)),
    # ---- issue 11: the restructured orchestration
    Mutant("token ids: the stop token defaults to PAD, not EOS", "rlhf_ppo.py",
           "stop = args.stop_token_id if args.stop_token_id is not None else eos_id",
           "stop = args.stop_token_id if args.stop_token_id is not None else pad_id",
           (T_PPO + "test_unset_token_flags_take_the_tokenizers_ids",)),
    Mutant("token ids: the reward model's EOS defaults to PAD", "rlhf_ppo.py",
           "eos = args.eos_token_id if args.eos_token_id is not None else eos_id",
           "eos = args.eos_token_id if args.eos_token_id is not None else pad_id", (REF,)),
    Mutant("sft main: each step's new state is dropped", "sft.py",
           '            state = {"params": params, "opt_state": opt_state}\n', "            state = dict(state)\n",
           (T_SFT + "test_resume_after_interruption_gives_the_uninterrupted_run_exactly",)),
    Mutant("reward model main: each step's new state is dropped", "reward_model.py",
           '            state = {"params": params, "opt_state": opt_state}\n', "            state = dict(state)\n",
           (T_RM + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_model",)),
    Mutant("PPO iteration: adaptive β not carried to the next update", "rlhf_ppo.py",
           '"kl_coef": kl_coef}, stats', '"kl_coef": state["kl_coef"]}, stats',
           (T_PPO + "test_the_adaptive_kl_coefficient_carries_from_update_to_update",
            T_PPO + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy")),
    # ---- chat templates and the conversational formats (the real model's tests)
    Mutant("chat: the generation prompt trained with the assistant's turn", "sft.py",
           "before, through = chat.render(messages[:i], True), chat.render(messages[: i + 1])",
           "before, through = chat.render(messages[:i], False), chat.render(messages[: i + 1])",
           (T_REAL + "test_conversational_sft_trains_on_the_assistant_turns_only",)),
    Mutant("chat: a completion's prompt turns trained too", "sft.py",
           'first = 0 if "messages" in row else len(row["prompt"])', "first = 0",
           (T_REAL + "test_conversational_sft_trains_on_the_assistant_turns_only",)),
    Mutant("chat: EOS appended to conversations", "sft.py",
           'rows.append(encode_chat(tok, chat, e["messages"], first_trained=e["first_trained"]))',
           'rows.append(tuple(x + y for x, y in zip(encode_chat(tok, chat, e["messages"], first_trained=e["first_trained"]), ([eos_id], [True]))))',
           (T_REAL + "test_conversational_sft_trains_on_the_assistant_turns_only",)),
    Mutant("chat: the special-token variables not passed to the template", "sft.py",
           "add_generation_prompt=add_generation_prompt, **dict(self.special_tokens)\n",
           "add_generation_prompt=add_generation_prompt\n",
           (T_REAL + "test_chat_template_renders_and_encodes_as_transformers_does",)),
    Mutant("chat: the tokenizer's special tokens added to the rendered text", "sft.py",
           "enc = tok.encode(text, add_special_tokens=False)", "enc = tok.encode(text, add_special_tokens=True)",
           (T_REAL + "test_chat_template_renders_and_encodes_as_transformers_does",)),
    Mutant("chat pairs: response not cut after the EOS ending its turn", "reward_model.py",
           "return p, (r[: len(r) - r[::-1].index(eos_id)] if eos_id in r else r)", "return p, r",
           (T_REAL + "test_conversational_pairs_and_prompts_are_scored_as_ppo_samples_them",)),
    Mutant("chat prompts: PPO's rendered without the generation prompt", "rlhf_ppo.py",
           "prompts.append(encode_chat(tok, chat, messages, add_generation_prompt=True)[0])",
           "prompts.append(encode_chat(tok, chat, messages, add_generation_prompt=False)[0])",
           (T_REAL + "test_conversational_pairs_and_prompts_are_scored_as_ppo_samples_them",)),
    Mutant("PPO evaluation: VADER even with --gold-fn", "rlhf_ppo.py",
           "gold = call_reward_fn(args.gold_fn, prompts, texts, \"--gold-fn\") if args.gold_fn else vader_scores(texts)",
           "gold = vader_scores(texts)", (T_REAL + "test_one_ppo_update_on_smollm2_with_a_reward_fn",)),
    Mutant("PPO evaluation: --eval-dataset ignored", "rlhf_ppo.py",
           "    if args.eval_dataset:\n", "    if False:\n", (T_REAL + "test_one_ppo_update_on_smollm2_with_a_reward_fn",)),
    # ---- several processes (--distributed)
    Mutant("multi-host: every process writes tensorboard logs", "sft.py",
           "    if jax.process_index() != 0:\n        return NoWriter()", "    if False:\n        return NoWriter()",
           (T_MH + "test_sft_two_processes_train_as_one_over_two_devices_and_resume_exactly",)),
    Mutant("multi-host: process 0's error not told to the others", "sft.py",
           "broadcast_one_to_all(np.int32(error is not None))", "broadcast_one_to_all(np.int32(0))",
           (T_MH + "test_sft_two_processes_train_as_one_over_two_devices_and_resume_exactly",)),
    Mutant("multi-host: arrays of several processes gathered untiled", "sft.py",
           "process_allgather(x, tiled=True)", "process_allgather(x)",
           (T_MH + "test_sft_two_processes_train_as_one_over_two_devices_and_resume_exactly",)),
    Mutant("multi-host: the simulated labeler samples on every process", "reward_model.py",
           'on_process_0("the simulated labeler", simulate_labeler, args,', "simulate_labeler(args,",
           (T_MH + "test_reward_model_two_processes_label_once_and_train_as_one_over_two_devices",)),
    Mutant("multi-host: --reward-fn reads only this process's rows", "rlhf_ppo.py",
           "zip(gather(tokens), gather(mask))", "zip(np.asarray(tokens.addressable_data(0)), np.asarray(mask.addressable_data(0)))",
           (T_MH + "test_ppo_two_processes_train_as_one_over_two_devices",)),
    Mutant("multi-host: β left on one device", "rlhf_ppo.py",
           "    kl_coef = jax.device_put(np.float32(kl_coef), NamedSharding(rows.mesh, PartitionSpec()))",
           "    kl_coef = jnp.float32(kl_coef)",
           (T_MH + "test_ppo_two_processes_train_as_one_over_two_devices",)),
    # ---- DPO
    Mutant("dpo: the sign of h flipped", "dpo.py",
           "    h = ratios[0] - ratios[1]", "    h = ratios[1] - ratios[0]",
           (T_DPO + "test_each_loss_equals_its_formula_computed_by_hand",)),
    Mutant("dpo: chosen and rejected swapped after the forward pass", "dpo.py",
           "    return logps.reshape(2, B), lengths.reshape(2, B)", "    return logps.reshape(2, B)[::-1], lengths.reshape(2, B)[::-1]",
           (T_DPO + "test_dpo_learns_the_preferred_side_and_the_evaluation_starts_at_the_sft_policy",)),
    Mutant("dpo: the reference on the fly is the policy being trained", "dpo.py",
           'else frozen_logps(graphdef, ref_params, mb)', 'else frozen_logps(graphdef, params, mb)',
           (T_DPO + "test_the_reference_stays_frozen_precomputed_or_on_the_fly",)),
    Mutant("dpo: the prompt's tokens scored too", "dpo.py",
           "    scored = response_mask[:, 1:]", "    scored = mask[:, 1:]",
           (T_DPO + "test_sequence_logps_sum_exactly_the_response_tokens",)),
    Mutant("dpo: each token's log-prob read one position late", "dpo.py",
           "head_logprobs(h, model.head_kernel(), tokens[:, 1:])[0]", "head_logprobs(h[:, 1:], model.head_kernel(), tokens[:, 2:])[0]",
           (T_DPO + "test_sequence_logps_sum_exactly_the_response_tokens",)),
    Mutant("ipo: log-ratios not divided by the response length", "dpo.py",
           "        mean_ratios = ratios / jnp.maximum(lengths, 1)", "        mean_ratios = ratios",
           (T_DPO + "test_each_loss_equals_its_formula_computed_by_hand",)),
    Mutant("cdpo: --label-smoothing ignored", "dpo.py",
           "        eps = args.label_smoothing", "        eps = 0.0",
           (T_DPO + "test_each_loss_equals_its_formula_computed_by_hand",)),
    Mutant("dpo metrics: rewards/accuracies counts ties", "dpo.py",
           '"rewards/accuracies": (chosen > rejected).mean()', '"rewards/accuracies": (chosen >= rejected).mean()',
           (T_DPO + "test_a_step_from_the_reference_logs_trls_metrics_and_moves_toward_the_chosen_side",)),
    Mutant("dpo metrics: logps/chosen is the rejected side's", "dpo.py",
           '"logps/chosen": logps[:, 0].mean()', '"logps/chosen": logps[:, 1].mean()',
           (T_DPO + "test_a_step_from_the_reference_logs_trls_metrics_and_moves_toward_the_chosen_side",)),
    Mutant("dpo evaluation: held-out accuracy counts ties", "dpo.py",
           '"eval/rewards/accuracies": float(np.mean(margin > 0))', '"eval/rewards/accuracies": float(np.mean(margin >= 0))',
           (T_DPO + "test_dpo_learns_the_preferred_side_and_the_evaluation_starts_at_the_sft_policy",)),
    Mutant("dpo evaluation: samples the SFT policy", "dpo.py",
           '{"policy": state["params"], "value": value}', '{"policy": ref_params, "value": value}',
           (T_DPO + "test_dpo_learns_the_preferred_side_and_the_evaluation_starts_at_the_sft_policy",)),
    Mutant("dpo: held-out split differs from the reward model's", "dpo.py",
           "    val_fraction: float = 0.1\n", "    val_fraction: float = 0.2\n",
           (T_DPO + "test_the_held_out_split_is_the_reward_models",)),
    Mutant("dpo export: the initial weights are written", "dpo.py",
           'export, args, nnx.merge(graphdef, gather(state["params"])), args.sft_model)', "export, args, policy, args.sft_model)",
           (T_DPO + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy",)),
    Mutant("dpo resume: the optimizer state restarts", "dpo.py",
           "    state, start = restore_latest(ckpt, state, args.resume)\n",
           "    state, start = restore_latest(ckpt, state, args.resume)\n    state[\"opt_state\"] = shard(jax.jit(tx.init)(state[\"params\"]), mesh, args.fsdp)\n",
           (T_DPO + "test_resume_gives_the_uninterrupted_run_and_the_export_is_the_trained_policy",)),
    Mutant("dpo: --beta ignored by hinge", "dpo.py",
           "        losses = jax.nn.relu(1.0 - args.beta * h)", "        losses = jax.nn.relu(1.0 - h)",
           (T_DPO + "test_each_loss_equals_its_formula_computed_by_hand",)),
    Mutant("dpo evaluation: a tie counts as agreeing with a gold-worse chosen side", "dpo.py",
           "np.sign(margin[untied]) == np.sign(gold_margin[untied])", "(margin[untied] > 0) == (gold_margin[untied] > 0)",
           (T_DPO + "test_dpo_learns_the_preferred_side_and_the_evaluation_starts_at_the_sft_policy",)),
    # ---- GRPO (grpo.py): advantages, loss, rewards, staleness
    Mutant("grpo advantage: the batch's mean as the baseline, not the group's", "grpo.py",
           "        baseline = grouped.mean(1, keepdims=True)", "        baseline = grouped.mean()", (G_ADV,)),
    Mutant("grpo advantage: RLOO's baseline divides by G", "grpo.py",
           "(grouped.sum(1, keepdims=True) - grouped) / (G - 1)", "(grouped.sum(1, keepdims=True) - grouped) / G",
           (G_ADV,)),
    Mutant("grpo advantage: --advantage rloo and grpo swapped", "grpo.py",
           '    if args.advantage == "grpo":', '    if args.advantage == "rloo":', (G_ADV,)),
    Mutant("grpo advantage: the group std without Bessel's correction", "grpo.py",
           "jnp.repeat(grouped.std(1, ddof=1), G)", "jnp.repeat(grouped.std(1), G)", (G_ADV,)),
    Mutant("grpo advantage: group stds tiled, not repeated (another group's std)", "grpo.py",
           "jnp.repeat(grouped.std(1, ddof=1), G)", "jnp.tile(grouped.std(1, ddof=1), G)", (G_ADV,)),
    Mutant("grpo advantage: --scale-rewards batch does not scale", "grpo.py",
           "        return advantages / (rewards.std(ddof=1) + 1e-4)", "        return advantages", (G_ADV,)),
    Mutant("grpo loss: ratio inverted (π_old / π_θ)", "grpo.py",
           'ratio = jnp.exp(logprobs - batch["old_logprobs"])', 'ratio = jnp.exp(batch["old_logprobs"] - logprobs)',
           (G_LOSS,)),
    Mutant("grpo loss: ratio to the current policy, not the sampler (TRL's on-policy shortcut)", "grpo.py",
           'ratio = jnp.exp(logprobs - batch["old_logprobs"])', "ratio = jnp.exp(logprobs - jax.lax.stop_gradient(logprobs))",
           (G_NAIVE,)),
    Mutant("grpo loss: max of the surrogates, not min", "grpo.py",
           "per_token = -jnp.minimum(ratio * A,", "per_token = -jnp.maximum(ratio * A,", (G_LOSS,)),
    Mutant("grpo loss: --epsilon-high ignored", "grpo.py",
           "jnp.clip(ratio, 1 - args.epsilon, 1 + eps_high) * A)", "jnp.clip(ratio, 1 - args.epsilon, 1 + args.epsilon) * A)",
           (G_LOSS,)),
    Mutant("grpo loss: k3 of the inverse ratio (π_θ / π_ref)", "grpo.py",
           '    log_ref_ratio = batch["ref_logprobs"] - logprobs', '    log_ref_ratio = logprobs - batch["ref_logprobs"]',
           (G_LOSS,)),
    Mutant("grpo loss: β·KL not added", "grpo.py",
           "        per_token = per_token + args.beta * kl", "        per_token = per_token", (G_LOSS,)),
    Mutant("grpo loss: tokens after the stop token counted", "grpo.py",
           '    m = batch["completion_mask"]\n    logprobs, entropy', '    m = jnp.ones_like(batch["completion_mask"])\n    logprobs, entropy',
           (G_LOSS,)),
    Mutant("grpo loss: --loss-type grpo without the per-sequence length", "grpo.py",
           "loss = ((per_token * m).sum(1) / jnp.maximum(m.sum(1), 1)).mean()", "loss = (per_token * m).sum(1).mean()",
           (G_LOSS,)),
    Mutant("grpo loss: --loss-type bnpo over every slot, not the real tokens", "grpo.py",
           "loss = (per_token * m).sum() / jnp.maximum(m.sum(), 1)", "loss = (per_token * m).sum() / m.size", (G_LOSS,)),
    Mutant("grpo loss: --loss-type dr_grpo without R", "grpo.py",
           "(per_token * m).sum() / (m.shape[0] * args.response_length)", "(per_token * m).sum() / m.shape[0]", (G_LOSS,)),
    Mutant("grpo loss: training log-probs at T = 1", "grpo.py",
           'batch["completions"], args.temperature\n    )\n    ratio',
           'batch["completions"], 1.0\n    )\n    ratio', (G_NAIVE,)),
    Mutant("grpo sampling: the sampler at T = 1", "grpo.py",
           "        temperature=args.temperature,\n        stop_token_id=args.stop_token_id,\n        pad_token_id=args.pad_token_id,\n    )  # 2",
           "        temperature=1.0,\n        stop_token_id=args.stop_token_id,\n        pad_token_id=args.pad_token_id,\n    )  # 2",
           (T_GRPO + "test_the_sampler_draws_at_the_training_temperature",)),
    Mutant("grpo sampling: completions drawn from the frozen reference", "grpo.py",
           "        step_function(graphdef),\n        params,", '        step_function(graphdef),\n        frozen["ref"],',
           (G_LEARN,)),
    Mutant("grpo sampling: π_old not the sampler's log-probs", "grpo.py",
           "queries, query_mask, completions, old_logprobs, with_ref\n    )  # 2, 3", "queries, query_mask, completions, 0 * old_logprobs, with_ref\n    )  # 2, 3",
           (G_NAIVE,)),
    Mutant("grpo sampling: the reference's log-probs skipped with β > 0", "grpo.py",
           "args, graphdef, reward_graphdef, tok, params, frozen, queries, query_mask, columns, key, args.beta > 0",
           "args, graphdef, reward_graphdef, tok, params, frozen, queries, query_mask, columns, key, False", (G_NAIVE,)),
    Mutant("grpo step 1: prompts tiled, not repeated (a group of different prompts)", "grpo.py",
           "idx = np.repeat(batch_indices(", "idx = np.tile(batch_indices(", (G_NAIVE,)),
    Mutant("grpo step 1: the columns not repeated with their prompts", "grpo.py",
           "{k: [v[i] for i in idx] for k, v in columns.items()}", "{k: v[: len(idx)] for k, v in columns.items()}",
           (G_ASYNC,)),
    Mutant("grpo rewards: --reward-weights ignored", "grpo.py",
           "np.nansum(per_function * weights, axis=1)", "np.nansum(per_function, axis=1)", (G_REWARDS,)),
    Mutant("grpo rewards: None counted as 0 in the function's statistics", "grpo.py",
           "out[i, j] = np.nan if v is None else v", "out[i, j] = 0.0 if v is None else v", (G_REWARDS,)),
    Mutant("grpo update: --num-iterations ignored (one step per batch)", "grpo.py",
           "length=args.num_iterations)", "length=1)", (G_ITER,)),
    Mutant("grpo update: a non-finite step applied", "grpo.py",
           "        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)",
           "        finite = jnp.isfinite(optax.tree.norm(params))", (G_ITER,)),
    Mutant("grpo staleness: batches sampled with the newest weights whatever k", "grpo.py",
           "                version = max(step - self.k, first)", "                version = step", (G_ASYNC,)),
    Mutant("grpo staleness: the same sampling key at every step", "grpo.py",
           "        key = jax.random.fold_in(jax.random.key(args.seed), step)\n        return rollout",
           "        key = jax.random.key(args.seed)\n        return rollout", (G_ASYNC,)),
    # ---- issue 25: PPO evaluation, metrics and the adaptive KL controller
    # (end of I25-PPO)
    # ---- issue 25: reward model and DPO: splits, held-out metrics, rewards/*, multi-message pairs
    # (end of I25-PREF)
    # ---- issue 25: SFT: held-out examples and evaluation
    # (end of I25-SFT)
    # ---- issue 25: GRPO: reward sources together, evaluation and logged metrics
    # (end of I25-GRPO)
]  # fmt: skip


def repo_copy() -> Path:
    """A fresh copy of the files git knows (tracked, and untracked but not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    dst = Path(tempfile.mkdtemp(prefix="mutant_"))
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def run_tests(repo: Path, tests, timeout: int) -> tuple[int, float, str]:
    """-> (pytest's exit code, seconds, the last lines of its output); exit 124 on timeout."""
    t = time.time()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        code, out = 124, "timeout"
    return code, time.time() - t, "\n".join(out.strip().splitlines()[-3:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-k", action="append", default=[], help="only the mutants whose name contains this (repeatable)"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    cli = parser.parse_args()
    mutants = [m for m in MUTANTS if not cli.k or any(k.lower() in m.name.lower() for k in cli.k)]
    for m in mutants:  # a stale mutant is an error, not a survivor
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            sys.exit(f"mutant {m.name!r}: its text occurs {count} times in {m.file}, not once; update the list")

    tests = sorted({t for m in mutants for t in m.tests})
    base = repo_copy()
    code, secs, tail = run_tests(base, tests, cli.timeout * 2)
    shutil.rmtree(base)
    if code != 0:
        sys.exit(f"the tests fail without any mutant (exit {code}, {secs:.0f}s); fix them first:\n{tail}")
    print(f"baseline: {len(tests)} test targets pass unmodified ({secs:.0f}s)", flush=True)

    rows = []
    for i, m in enumerate(mutants, 1):
        repo = repo_copy()
        path = repo / m.file
        path.write_text(path.read_text().replace(m.old, m.new))
        code, secs, tail = run_tests(repo, m.tests, cli.timeout)
        shutil.rmtree(repo)
        result = {0: "SURVIVED", 1: "killed"}.get(code, f"error (exit {code})")
        rows.append((m, result, secs))
        print(
            f"[{i}/{len(mutants)}] {result:8s} {secs:5.0f}s  {m.name}"
            + (f"\n    {tail}" if code not in (0, 1) else ""),
            flush=True,
        )

    print("\n| # | mutant | file | tests | result |\n|---|---|---|---|---|")
    for i, (m, result, secs) in enumerate(rows, 1):
        tests = ", ".join(t.split("::")[-1] if "::" in t else Path(t).name for t in m.tests)
        print(f"| {i} | {m.name} | {m.file} | {tests} | {result} ({secs:.0f}s) |")
    killed = sum(r == "killed" for _, r, _ in rows)
    print(
        f"\n{killed} of {len(rows)} mutants killed"
        + ("" if killed == len(rows) else f"; {len(rows) - killed} NOT killed")
    )
    sys.exit(0 if killed == len(rows) else 1)


if __name__ == "__main__":
    main()
