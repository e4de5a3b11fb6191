"""The GRPO loop: QA-LIGN's two-pass rollouts judged by the rubric, group advantages, updates.

  python -m qalign_jax.train --config configs/qalign_grpo_smol.py --workdir workdirs/grpo_smol

`run(config, workdir)` reads top to bottom: mesh, policy and reference, judge, prompts, state
shapes and shardings, restore or init, jit, then `for step in range(first_step, num_steps)`:

  rollouts  B prompts x G samples, `rollouts.rollout` (rollouts.py). Pass 1: the policy drafts
            (sampler, with per-token logprobs); the judge scores the drafts (R1). Pass 2
            (two_pass): the draft's end-of-turn gives way to the verbalized findings and a
            forced <Think>, and the policy continues from the draft's KV cache with its
            reflection, </Think> and revision; the judge scores the revisions (R2).
  rewards   `reward.components` (reward_components.py); by default the rubric alone:
            `rewards.two_pass_reward(R1, R2, ...)` (single pass: R1), where a revision that
            does not parse counts as R2 = R1 minus grpo.malformed_penalty. (With the paper's
            beta = 1 the reward is 2 * R2 whenever R2 <= R1, so a fixed floor for malformed
            revisions would give every malformed rollout the same reward and no signal.)
            Other components (refusal, degeneracy veto, Python functions, ...) are summed with
            weights, or GDPO-normalized per component (`reward.aggregation`).
  update    group-normalized advantages (`reward_components.aggregate`), then `num_iterations`
            optimizer updates of the clipped objective with the k3 KL to the frozen reference
            (`losses.grpo_loss`), on the policy's own tokens only (draft and continuation; not
            the prompt, not the inserted findings). The old policy's log-probabilities come
            from the training forward (`grpo_step`); the sampler's are only compared with
            them (`train/sampler_logp_gap`). `grpo.loss='gspo'|'gspo_token'` takes the ratio
            per sequence instead (GSPO).
  shaping   `grpo_variants.py` (DAPO): zero-variance groups dropped from the loss or resampled
            (`grpo.dynamic_sampling`), truncated rows masked or softly penalized
            (`grpo.overlong`); the batch stays B x G rows.

The scalar-reward baseline of the paper is the same loop with `judge.rubric='scalar'` (one
holistic 0-9 question instead of the rubric). The judge is frozen: `judge.source=''` judges
with `model.source`'s weights as loaded (the base model), never with the policy being trained.
The KL reference is the policy at the start of RL (`checkpoint.init`'s primed weights when
set, else the same arrays as the judge). With LoRA (`model.lora.rank` > 0) the reference's
weights are also the policy's frozen base: only the adapters (and their Adam state) are
trained, and the base, the reference and (without checkpoint.init) the judge are one copy.

Exact resume: the state (params, Adam, step) is checkpointed with orbax; rollout keys are
`fold_in(seed, step)` and the prompts of step s are a pure function of (seed, s), so a
restarted run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from qalign_jax import (
    checkpoint,
    data,
    files,
    grpo_variants,
    losses,
    metrics,
    plan,
    reward_components,
    rollouts,
    sharding,
    stages,
    train_state,
)
from qalign_jax import judge as judge_lib
from qalign_jax.checkpoint import TrainState
from qalign_jax.models import llama, load

BATCH_KEYS = (
    "tokens", "positions", "span_start", "targets", "loss_mask", "old_logp", "sampler_logp",
    "ref_logp", "advantages",
)  # fmt: skip
ROWS_IN = ("tokens", "positions", "span_start", "targets")  # `token_logprobs`' arguments
ROW_KEYS = ("span_start", "advantages")  # one number per row; the rest are [rows, T] or [rows, S]
OVERLAP_MODES = ("error", "exclude")


# ---------------------------------------------------------------------------------------------
# Prompts.


def read_prompts(config) -> list[data.PromptRecord]:
    """The RL prompt set, checked (or filtered) against the priming prompts."""
    g = config.grpo
    if g.on_overlap not in OVERLAP_MODES:
        raise ValueError(f"grpo.on_overlap={g.on_overlap!r}; use one of {OVERLAP_MODES}.")
    records = data.select_prompts(g.sources, config.seed)
    if g.priming_data:
        if not files.exists(g.priming_data):
            raise FileNotFoundError(
                f"grpo.priming_data={g.priming_data} does not exist; run the priming stage "
                "first, or set grpo.priming_data='' to skip the disjointness check."
            )
        primed = {r["id"] for r in stages.read_rows(g.priming_data)}
        overlap = [r.id for r in records if r.id in primed]
        if overlap and g.on_overlap == "error":
            raise ValueError(
                f"{len(overlap)} GRPO prompts were also priming prompts ({g.priming_data}), "
                f"e.g. {overlap[:3]}; QA-LIGN keeps the two sets disjoint. Choose other prompts "
                "or set grpo.on_overlap='exclude' to drop them."
            )
        records = [r for r in records if r.id not in primed]
    if len(records) < g.prompts_per_step:
        raise ValueError(
            f"{len(records)} GRPO prompts < grpo.prompts_per_step={g.prompts_per_step}."
        )
    if g.label_mix:
        data.check_label_mix(records, g.label_mix, g.prompts_per_step)
    return records


def step_prompts(records, step: int, g, seed: int) -> list:
    """The B prompts of `step`: a uniform draw, or `grpo.label_mix` prompts of each label."""
    return data.draw_prompts(records, step, g.prompts_per_step, seed, g.label_mix)


# ---------------------------------------------------------------------------------------------
# Training rows (host side); the rollouts themselves are `rollouts.rollout`.


def row_width(ro: rollouts.Rollouts, seq_len: int) -> int:
    """The width of this step's training rows: its longest row rounded up to 2^k or 1.5 * 2^k
    (at least 64; `data.length_bucket`), at most `seq_len`, the longest a rollout can make.

    Rows as wide as the batch needs rather than the config's maximum; the train step compiles
    once per width, and the widths are few (about 2 log2(seq_len / 64) + 1)."""
    longest = max(len(seq) - 1 for seq in ro.sequence_ids)
    return min(seq_len, data.length_bucket(longest, minimum=64))


def span_width(ro: rollouts.Rollouts, width: int) -> int:
    """The width S of the trained spans: the batch's longest span from a row's first trained
    target to its last, rounded up as the rows (`data.length_bucket`, at least 16), at most
    the row width. The output head runs on these S positions of each row only."""
    longest = max(_trained_span(trained)[1] for trained in ro.trained_mask)
    return min(width, data.length_bucket(longest, minimum=16))


def _trained_span(trained) -> tuple[int, int]:
    """(first trained target, positions from it to the last trained one); targets are ids[1:]."""
    where = np.flatnonzero(np.asarray(trained[1:]))
    return (int(where[0]), int(where[-1] - where[0] + 1)) if where.size else (0, 1)


def training_batch(
    ro: rollouts.Rollouts, advantages: np.ndarray, seq_len: int, pad_id: int, span: int = 0
):
    """Next-token rows: tokens and positions [rows, seq_len]; the per-target arrays (targets,
    loss_mask, sampler_logp, old_logp) [rows, S] over each row's span `span_start ..
    span_start + S - 1`, S = `span` (0: S = seq_len, span_start = 0). The loss mask covers
    draft and continuation only.

    `sampler_logp` holds the sampler's log-probabilities of the trained tokens: a diagnostic
    (their gap to the training forward is logged); `old_logp` is filled by the loop when
    num_iterations > 1 (see `grpo_step`).
    """
    n, span = len(ro.prompt_ids), span or seq_len
    tokens = np.full((n, seq_len), pad_id, np.int32)
    positions = np.full((n, seq_len), -1, np.int32)
    start = np.zeros(n, np.int32)
    targets = np.full((n, span), pad_id, np.int32)
    mask = np.zeros((n, span), np.float32)
    sampled = np.zeros((n, span), np.float32)
    for i in range(n):
        seq, trained, logp = ro.sequence_ids[i], ro.trained_mask[i], ro.sampler_logp[i]
        length = len(seq) - 1
        if length > seq_len:
            raise ValueError(f"rollout {i} has {len(seq)} tokens > seq_len {seq_len} + 1.")
        first, extent = _trained_span(trained)
        if extent > span:
            raise ValueError(f"rollout {i} trains {extent} positions > span {span}.")
        tokens[i, :length] = seq[:-1]
        positions[i, :length] = np.arange(length)
        start[i] = min(first, seq_len - span)
        end = min(length, start[i] + span)
        targets[i, : end - start[i]] = seq[start[i] + 1 : end + 1]
        mask[i, : end - start[i]] = trained[start[i] + 1 : end + 1]
        sampled[i, : end - start[i]] = logp[start[i] + 1 : end + 1]
    return {
        "tokens": tokens, "positions": positions, "span_start": start, "targets": targets,
        "loss_mask": mask, "sampler_logp": sampled, "old_logp": np.zeros_like(sampled),
        "advantages": np.asarray(advantages, np.float32),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The jitted pieces.


def logp_temperature(grpo_cfg) -> float:
    """The temperature of the loss's log-probabilities (policy, old and reference): the
    rollouts' sampling temperature, so that the ratio, the gradient and the KL term refer to
    the distribution the tokens were drawn from (1 for greedy rollouts)."""
    return grpo_cfg.temperature if grpo_cfg.temperature > 0 else 1.0


def token_logprobs(params, tokens, positions, span_start, targets, *, graphdef, temperature=1.0):
    """[rows, S] log p(target) on the rows' spans under `params` (the frozen reference, or the
    policy before its first update when num_iterations > 1), at `temperature`."""
    return llama.token_stats(
        graphdef, params, tokens, positions, targets, start=span_start, temperature=temperature
    )["logp"]


def grpo_step(state: TrainState, batch, frozen=None, *, graphdef, tx, schedule, param_sh,
              grpo_cfg, compute_dtype=None):  # fmt: skip
    """One optimizer update on the step's micro-batches; metrics are step totals.

    The importance ratio's denominator comes from the training forward, never the sampler's
    decode path: with one update per batch (num_iterations = 1) it is this forward itself under
    `stop_gradient`, so the ratio is exactly 1 (the policy gradient); with more, the loop fills
    `old_logp` with `token_logprobs` of the policy before the first update. `frozen`: the
    base weights under LoRA (`state.params` are the adapters), else None; `compute_dtype`: the
    weights are cast to it once (`train_state.compute_copy`), or None.
    """
    g = grpo_cfg
    num_tokens = jnp.sum(batch["loss_mask"])
    num_seqs = jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=-1)).astype(jnp.float32)
    normalizer = {
        "seq_mean": num_seqs,
        "token_mean": num_tokens,
        "constant": float(batch["loss_mask"].shape[0] * batch["loss_mask"].shape[1])
        * batch["loss_mask"].shape[2],
    }[g.aggregation]

    def loss_fn(weights, micro):
        stats = llama.token_stats(
            graphdef, weights, micro["tokens"], micro["positions"], micro["targets"],
            start=micro["span_start"], entropy=True, temperature=logp_temperature(g),
        )  # fmt: skip
        logp = stats["logp"]
        fixed = jax.lax.stop_gradient(logp)
        old_logp = fixed if g.num_iterations == 1 else micro["old_logp"]
        loss, sums = losses.grpo_loss(
            logp, old_logp, micro["advantages"], micro["loss_mask"],
            ref_logp=micro["ref_logp"] if g.kl_beta > 0 else None, kl_beta=g.kl_beta,
            clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
            normalizer=normalizer, ratio_type=g.loss,
        )  # fmt: skip
        entropy = jax.lax.stop_gradient(stats["entropy"])
        sums["entropy_sum"] = jnp.sum(entropy * micro["loss_mask"])
        sums["loss_sum"] = loss
        gap = jnp.abs(fixed - micro["sampler_logp"]) * micro["loss_mask"]
        sums["sampler_gap_sum"] = jnp.sum(gap)  # the decode path against this forward
        return loss, sums

    grads, sums = train_state.accumulate_grads(
        loss_fn, state.params, batch, param_sh, frozen, compute_dtype
    )
    new_state, grad_norm = train_state.apply_grads(state, grads, tx)
    denom = jnp.maximum(sums["num_tokens"], 1.0)
    step_metrics = {
        "loss": sums["loss_sum"],
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "kl": sums["kl_sum"] / denom,
        "clip_fraction": sums["clipped_sum"] / denom,
        "ratio_mean": sums["ratio_sum"] / denom,
        "entropy": sums["entropy_sum"] / denom,
        "sampler_logp_gap": sums["sampler_gap_sum"] / denom,
        "trained_tokens": sums["num_tokens"],
    }
    return new_state, step_metrics


def jit_grpo_step(graphdef, tx, schedule, state_sh: TrainState, grpo_cfg, mesh, rules,
                  frozen_sh=None, compute_dtype=None):  # fmt: skip
    """`grpo_step` jitted once (`train_state.jit_step`); `frozen_sh`: the base's shardings
    under LoRA."""
    step = functools.partial(grpo_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             param_sh=state_sh.params, grpo_cfg=grpo_cfg,
                             compute_dtype=compute_dtype)  # fmt: skip
    return train_state.jit_step(
        step, state_sh, batch_shardings(mesh), mesh, rules, "grpo_step", frozen_sh
    )


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """[A, rows / A, ...] arrays: rows over (data, fsdp)."""
    return train_state.micro_shardings(mesh, {k: 2 if k in ROW_KEYS else 3 for k in BATCH_KEYS})


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config, workdir: str) -> None:
    g = config.grpo
    if g.num_generations < 2:
        raise ValueError(
            f"grpo.num_generations={g.num_generations}; group advantages need G >= 2 samples "
            "per prompt."
        )
    rows_per_step = g.prompts_per_step * g.num_generations
    if g.grad_accum_steps < 1 or rows_per_step % g.grad_accum_steps:
        raise ValueError(
            f"B x G = {rows_per_step} rollouts per step must be a multiple of "
            f"grpo.grad_accum_steps={g.grad_accum_steps}."
        )
    if g.rollouts_shown < -1:
        raise ValueError(
            f"grpo.rollouts_shown={g.rollouts_shown}; use a count >= 0 or -1 (every rollout)."
        )

    components = reward_components.from_config(config.reward)  # checked before any loading
    grpo_variants.check_config(g)
    components = grpo_variants.with_overlong_penalty(components, g)

    # Mesh; the policy's initial weights (also the frozen reference and, by default, judge;
    # not loaded when neither, see load.base_model).
    mesh = sharding.make_mesh(config.mesh.shape)
    plan.check_fits(config, "grpo", mesh.size)  # seconds, before any weights or rollouts
    rules = tuple(config.sharding.rules)
    sharding.check_batch_divisible(rows_per_step // g.grad_accum_steps, mesh)
    initial = load.base_model(config, mesh)
    tok = initial.tokenizer
    if tok is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    cfg = initial.cfg
    judge = judge_lib.from_config(config, initial)
    # Rollouts are judged when a pass needs it: the rubric component, or two-pass findings.
    rollout_judge = judge if g.two_pass or reward_components.needs_judge(components) else None

    # Prompts, and the longest sequence a rollout can make.
    records = read_prompts(config)
    prompt_ids = data.chat_ids(tok, records, g.max_prompt_tokens, g.on_long_prompt)
    records = [r for r in records if r.id in prompt_ids]
    opts = rollouts.from_grpo_config(g)
    lengths = rollouts.measure_lengths(opts, tok, judge.rubric, prompt_ids.values())
    cache_len, seq_len = lengths.cache_len, lengths.seq_len
    opts = dataclasses.replace(opts, cache_len=cache_len)  # one cache size: one compile
    logging.info("grpo: %d prompts, seq_len %d, cache %d", len(records), seq_len, cache_len)

    # Optimizer and state shapes; restore or init.
    tx, schedule = train_state.make_optimizer(config.optimizer, g.num_steps * g.num_iterations)
    policy_cfg = train_state.policy_config(cfg, config.model)  # cfg, or with LoRA adapters
    graphdef, abstract_params = llama.abstract_model(policy_cfg)
    abstract_trained, abstract_frozen = train_state.split_trainable(abstract_params)
    abstract_state, state_sh = train_state.state_shardings(abstract_trained, tx, mesh, rules)
    manager = checkpoint.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    make_state = train_state.jit_init_state(tx, state_sh)

    # The KL reference is the policy at the start of RL; the judge stays the base model.
    reference, start = load.initial_policy(config, initial)
    frozen = frozen_sh = None
    if abstract_frozen is None:  # full fine-tuning

        def load_params():  # a copy: the train state is donated, the reference must survive
            return jax.tree.map(jnp.copy, reference.params), start

    else:  # LoRA: the reference's arrays are the frozen base (never donated, never copied)
        frozen, frozen_sh = reference.params, sharding.param_shardings(abstract_frozen, mesh, rules)
        start_adapters, adapters_origin = train_state.initial_adapters(
            policy_cfg, config.model, config.seed, state_sh.params
        )

        def load_params():  # a copy: the state is donated, the start may be the reference's
            return jax.tree.map(jnp.copy, start_adapters), f"{start} + {adapters_origin}"

    state, meta, origin = checkpoint.restore_or_init(
        manager, abstract_state, make_state, load_params
    )
    train_state.check_lora_meta(meta, policy_cfg, manager.directory)
    first_step = int(meta["step"]) if meta is not None else 0
    frozen_args = () if frozen is None else (frozen,)

    # Jit once.
    batch_sh = batch_shardings(mesh)
    step_fn = jit_grpo_step(graphdef, tx, schedule, state_sh, g, mesh, rules, frozen_sh,
                            train_state.compute_dtype(config.model))  # fmt: skip
    row_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    rows_sh = {k: sharding.batch_sharding(mesh, 1 if k in ROW_KEYS else 2) for k in ROWS_IN}
    logp_fn = sharding.jit(  # the policy's (old) log-probabilities
        functools.partial(token_logprobs, graphdef=graphdef, temperature=logp_temperature(g)),
        mesh=mesh, rules=rules,
        in_shardings=(train_state.full_params(state_sh.params, frozen_sh), *rows_sh.values()),
        out_shardings=row_sh, name="token_logprobs",
    )  # fmt: skip
    # The reference's: the policy at the start of RL; with LoRA the base with adapters off,
    # or with the adapters of model.lora.init.
    ref_logp_fn, ref_params = logp_fn, reference.params
    if frozen is not None and config.model.lora.init:
        ref_params = train_state.full_params(start_adapters, frozen)
    elif frozen is not None:
        ref_logp_fn = sharding.jit(
            functools.partial(token_logprobs, graphdef=reference.graphdef,
                              temperature=logp_temperature(g)),
            mesh=mesh, rules=rules, in_shardings=(frozen_sh, *rows_sh.values()),
            out_shardings=row_sh, name="ref_token_logprobs",
        )  # fmt: skip

    writer = metrics.MetricsWriter(
        workdir, resume_step=first_step, tensorboard=config.metrics.tensorboard
    )
    progress = metrics.Progress(first_step, g.num_steps)
    base_rng = jax.random.key(config.seed)
    if jax.process_index() == 0:
        mode = "two-pass" if g.two_pass else "single-pass"
        print(f"grpo: {origin}; steps {first_step} -> {g.num_steps}, B={g.prompts_per_step} "
              f"x G={g.num_generations}, {mode}")  # fmt: skip
    rollouts_path = os.path.join(workdir, "rollouts.jsonl")

    def score(r_ro):  # a batch of rollouts' reward inputs and composed rewards
        inputs = reward_components.inputs_from_rollouts(r_ro, opts)
        return inputs, reward_components.compose(
            components, inputs, g.num_generations, aggregation=config.reward.aggregation,
            eps=g.adv_eps, scale_by_std=g.scale_adv_by_std,
        )  # fmt: skip

    widths = set()  # the (row, span) widths seen: one train-step compile each
    with train_state.closing(manager, writer):
        for step in range(first_step, g.num_steps):
            t0 = time.perf_counter()
            batch_records = step_prompts(records, step, g, config.seed)
            rows = [r for r in batch_records for _ in range(g.num_generations)]
            policy = train_state.policy_model(initial, policy_cfg, graphdef, state.params, frozen)
            k_draft, k_revision = jax.random.split(jax.random.fold_in(base_rng, step))
            ro = rollouts.rollout(
                policy, rollout_judge, rows, [prompt_ids[r.id] for r in rows], opts, k_draft,
                k_revision,
            )  # fmt: skip
            reward_in, composed = score(ro)
            zero_variance = float(1.0 - reward_components.informative_groups(composed).mean())
            extra_prompts = 0
            if g.dynamic_sampling == "resample":  # DAPO: more prompts until B groups vary

                def draw(r, step=step, policy=policy):  # round r's B x G extra rollouts
                    more = grpo_variants.resample_prompts(
                        records, step, r, g.prompts_per_step, config.seed, g.max_resample_rounds,
                        g.label_mix,
                    )  # fmt: skip
                    more = [x for x in more for _ in range(g.num_generations)]
                    key = jax.random.fold_in(jax.random.fold_in(base_rng, step), r)
                    return rollouts.rollout(
                        policy, rollout_judge, more, [prompt_ids[x.id] for x in more], opts,
                        *jax.random.split(key),
                    )  # fmt: skip

                picked = grpo_variants.resample(
                    ro, composed, draw, lambda r_ro: score(r_ro)[1], g.prompts_per_step,
                    g.max_resample_rounds,
                )  # fmt: skip
                ro, extra_prompts = picked.rollouts, picked.extra_prompts
                zero_variance = picked.zero_variance_fraction
                reward_in, composed = score(ro)
            adv = composed.advantages
            masked = grpo_variants.masked_rows(ro, composed, g)
            t_train = time.perf_counter()
            width = row_width(ro, seq_len)
            span = span_width(ro, width)
            widths.add((width, span))
            host = training_batch(ro, adv, width, tok.pad_id, span)
            host["loss_mask"][masked] = 0.0  # out of the loss and of its normalizer
            rows_in = None  # placed only when a forward below needs the rows
            if g.num_iterations > 1 or g.kl_beta > 0:
                rows_in = tuple(train_state.put_batch(
                    {k: host[k] for k in ROWS_IN}, rows_sh
                ).values())  # fmt: skip
            if g.num_iterations > 1:  # the old policy: the training forward before any update
                full = train_state.full_params(state.params, frozen)
                host["old_logp"] = sharding.to_host(logp_fn(full, *rows_in))
            host["ref_logp"] = (
                sharding.to_host(ref_logp_fn(ref_params, *rows_in))
                if g.kl_beta > 0
                else np.zeros_like(host["old_logp"])
            )
            micro = train_state.split_micro(host, g.grad_accum_steps)
            for iteration in range(g.num_iterations):
                state, m = step_fn(state, train_state.put_batch(micro, batch_sh), *frozen_args)
                m = jax.device_get(m)
                if iteration == 0:  # before any update of this batch: the sampler's own gap
                    sampler_gap = m["sampler_logp_gap"]
                if iteration < g.num_iterations - 1:  # the last one is checked by end_step
                    metrics.check_finite(
                        step + 1, float(m["loss"]), float(m["grad_norm"]),
                        last_checkpoint=lambda: checkpoint.latest_step(manager),
                    )  # fmt: skip
            done = step + 1
            row = {f"train/{k}": float(v) for k, v in m.items()}
            row["train/sampler_logp_gap"] = float(sampler_gap)
            row.update({"train/row_width": width, "train/span_width": span,
                        "train/row_widths_compiled": len(widths)})  # fmt: skip
            row.update(rollouts.rollout_metrics(ro, judge.rubric))
            row.update(reward_components.metrics(composed, components, reward_in))
            row.update(judge.cache_stats.metrics())  # cumulative since the judge was built
            row.update(grpo_variants.step_metrics(ro, masked, zero_variance, extra_prompts))
            row.update({
                "time/step_s": time.perf_counter() - t0,
                "time/sampling_s": ro.timings["sampling"], "time/judging_s": ro.timings["judging"],
                "time/training_s": time.perf_counter() - t_train,
            })  # fmt: skip
            train_state.end_step(
                done, m, row, total_steps=g.num_steps, log_every=config.metrics.log_every,
                manager=manager, writer=writer, progress=progress,
            )  # fmt: skip
            if (
                jax.process_index() == 0
                and g.rollouts_every
                and (done % g.rollouts_every == 0 or done == g.num_steps)
            ):
                count = len(ro.records) if g.rollouts_shown == -1 else g.rollouts_shown
                shown = rollouts.rollout_rows(ro, judge, done, count)
                for i, shown_row in enumerate(shown):
                    shown_row.update(reward_components.row_fields(composed, i))
                files.append_jsonl(rollouts_path, shown)
            train_state.save_if_due(
                done, g.num_steps, config.checkpoint.every_steps, manager, writer, state,
                {"rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
                 "num_prompts": len(records),
                 **train_state.lora_meta(policy_cfg, config)},
            )  # fmt: skip

    if g.export_hf:
        train_state.export_final(
            workdir, config, graphdef, state.params, frozen, cfg, policy_cfg, tok
        )
