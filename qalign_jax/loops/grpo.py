"""The GRPO loop: QA-LIGN's two-pass rollouts judged by the rubric, group advantages, updates.

  python -m qalign_jax.train --config configs/qalign_grpo_smol.py --workdir workdirs/grpo_smol

`run(config, workdir)` reads top to bottom: mesh, policy and reference, judge, prompts, state
shapes and shardings, restore or init, jit, then `for step in range(first_step, num_steps)`:

  rollouts  B prompts x G samples. Pass 1: the policy drafts (sampler, with per-token
            logprobs). The judge scores the drafts (R1). Pass 2 (two_pass): each draft's
            end-of-turn is dropped, the verbalized findings and a forced <Think> are appended,
            and the policy continues from the draft's KV cache with its reflection, </Think>
            and revision (`sampler.continue_generation`). The judge scores the revisions (R2).
  rewards   `rewards.two_pass_reward(R1, R2, alpha, beta)` (single pass: R1); a revision that
            does not parse counts as R2 = R1 minus grpo.malformed_penalty. (With the paper's
            beta = 1 the reward is 2 * R2 whenever R2 <= R1, so a fixed floor for malformed
            revisions would give every malformed rollout the same reward and no signal.)
  update    group-normalized advantages (`losses.group_advantages`), then `num_iterations`
            optimizer updates of the clipped objective with the k3 KL to the frozen reference
            (`losses.grpo_loss`), on the policy's own tokens only (draft and continuation; not
            the prompt, not the inserted findings). The sampler's logprobs are the old policy.

The scalar-reward baseline of the paper is the same loop with `judge.rubric='scalar'` (one
holistic 0-9 question instead of the rubric). The judge is frozen: `judge.source=''` judges
with `model.source`'s weights as loaded (the base model), never with the policy being trained.
The KL reference is the policy at the start of RL (`checkpoint.init`'s primed weights when
set, else the same arrays as the judge).

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
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from qalign_jax import (
    checkpoint,
    data,
    files,
    losses,
    metrics,
    reflection,
    rewards,
    sampler,
    sharding,
    stages,
)
from qalign_jax import judge as judge_lib
from qalign_jax.checkpoint import TrainState
from qalign_jax.loops import prime_data, sft
from qalign_jax.models import hf, llama

BATCH_KEYS = ("tokens", "positions", "targets", "loss_mask", "old_logp", "ref_logp", "advantages")
OVERLAP_MODES = ("error", "exclude")


# ---------------------------------------------------------------------------------------------
# Prompts.


def read_prompts(config) -> list[data.PromptRecord]:
    """The RL prompt set, checked (or filtered) against the priming prompts."""
    g = config.grpo
    if g.on_overlap not in OVERLAP_MODES:
        raise ValueError(f"grpo.on_overlap={g.on_overlap!r}; use one of {OVERLAP_MODES}.")
    records = prime_data.select_prompts(g.sources, config.seed)
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
    return records


def prompts_for_step(records, step: int, per_step: int, seed: int):
    """The prompts of `step`: epochs of a (seed, epoch)-seeded permutation, a pure function."""
    out, orders = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(k, len(records))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(len(records))
        out.append(records[orders[epoch][index]])
    return out


def chat_ids(tokenizer, records, max_tokens: int, on_long: str) -> dict[str, list[int]]:
    """Chat-template token ids per prompt id; over-long prompts are an error or dropped."""
    out, long = {}, []
    for r in records:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}])
        if len(ids) > max_tokens:
            long.append((r.id, len(ids)))
        else:
            out[r.id] = ids
    if long and on_long == "error":
        raise ValueError(
            f"{len(long)} prompts exceed grpo.max_prompt_tokens={max_tokens} (e.g. "
            f"{long[:3]}); raise it or set grpo.on_long_prompt='drop'."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Rollouts and rewards (host side).


@dataclasses.dataclass
class Rollouts:
    """B * G rollouts of one step, in row order (the G samples of a prompt consecutive)."""

    records: list
    prompt_ids: list[list[int]]
    draft_ids: list[list[int]]  # kept draft tokens (no end-of-turn in two-pass mode)
    draft_logp: list[np.ndarray]
    suffix_ids: list[list[int]]  # the inserted findings (+ <Think>); [] in single-pass mode
    cont_ids: list[list[int]]  # pass-2 tokens (reflection, </Think>, revision, end of turn)
    cont_logp: list[np.ndarray]
    drafts: list[str]
    revisions: list[str | None]
    errors: list[str | None]
    draft_verdicts: list
    revision_verdicts: list  # None where malformed or single pass
    rewards: np.ndarray
    timings: dict


def _sampler_cfg(config, tok, max_new_tokens: int, cache_len: int = 0) -> sampler.SamplerConfig:
    g = config.grpo
    return sampler.SamplerConfig(
        batch_buckets=(g.prompts_per_step * g.num_generations,),  # every step: B x G rows
        max_new_tokens=max_new_tokens,
        temperature=config.grpo.temperature,
        top_p=config.grpo.top_p,
        stop_ids=tuple(tok.stop_ids),
        max_cache_len=cache_len,
    )


def rollout_lengths(g, tok, judge, prompt_ids) -> tuple[int, int]:
    """(sampler cache length, training row length) for rollouts of these prompts."""
    block = (
        reflection.findings_block_max_tokens(judge.rubric, tok.encode, g.max_findings)
        if g.two_pass
        else 0
    )
    longest_prompt = max(len(ids) for ids in prompt_ids)
    cache_len = sampler.bucket(longest_prompt, sampler.SamplerConfig.prompt_buckets)
    cache_len += g.draft_max_tokens
    if g.two_pass:
        cache_len += sampler.bucket(block, sampler.SamplerConfig.prompt_buckets)
        cache_len += g.revision_max_tokens
    seq_len = -(-(longest_prompt + g.draft_max_tokens + block + g.revision_max_tokens) // 64) * 64
    return cache_len, seq_len


def rollout(config, policy, judge, records, prompt_ids, rng, cache_len) -> Rollouts:
    """Samples, judges and rewards B * G two-pass (or single-pass) rollouts."""
    g, tok = config.grpo, policy.tokenizer
    rcfg = judge.reward_cfg
    timings = {"sampling": 0.0, "judging": 0.0}
    k1, k2 = jax.random.split(rng)
    t0 = time.perf_counter()
    first = sampler.generate(
        policy, prompt_ids, _sampler_cfg(config, tok, g.draft_max_tokens, cache_len), k1
    )
    timings["sampling"] += time.perf_counter() - t0
    keep = [n - (r == "eos") for n, r in zip(first.lengths, first.finish_reasons)]
    if not g.two_pass:  # the draft is the answer: train on it with its end of turn
        keep = list(first.lengths)
    draft_ids = [list(t[:k]) for t, k in zip(first.tokens, keep)]
    draft_logp = [np.asarray(lp[:k]) for lp, k in zip(first.logprobs, keep)]
    drafts = [tok.decode(t).strip() for t in draft_ids]
    pairs = [(r.prompt, d) for r, d in zip(records, drafts)]
    t0 = time.perf_counter()
    v1 = judge_lib.score_pairs(judge, pairs)
    timings["judging"] += time.perf_counter() - t0
    r1 = np.array([v.scores.reward for v in v1])
    n = len(records)
    if not g.two_pass:
        return Rollouts(
            records, prompt_ids, draft_ids, draft_logp, [[]] * n, [[]] * n,
            [np.zeros(0, np.float32)] * n, drafts, [None] * n, [None] * n, v1, [None] * n, r1,
            timings,
        )  # fmt: skip

    blocks = [reflection.findings_block(judge.rubric, v, max_findings=g.max_findings) for v in v1]
    suffix_ids = [tok.encode(b) for b in blocks]
    t0 = time.perf_counter()
    second = sampler.continue_generation(
        policy, first, suffix_ids, _sampler_cfg(config, tok, g.revision_max_tokens), k2,
        keep=np.asarray(keep),
    )  # fmt: skip
    timings["sampling"] += time.perf_counter() - t0
    cont_ids = [list(t) for t in second.tokens]
    cont_logp = [np.asarray(lp) for lp in second.logprobs]
    parsed = [reflection.parse_continuation(tok.decode(t)) for t in cont_ids]
    revisions = [rev if err is None else None for _, rev, err in parsed]
    errors = [err for _, _, err in parsed]
    ok = [i for i, rev in enumerate(revisions) if rev]
    t0 = time.perf_counter()
    scored = judge_lib.score_pairs(judge, [(records[i].prompt, revisions[i]) for i in ok])
    timings["judging"] += time.perf_counter() - t0
    v2 = [None] * n
    r2 = r1.copy()  # a malformed revision counts as no change ...
    for i, v in zip(ok, scored):
        v2[i], r2[i] = v, v.scores.reward
    reward = np.asarray(rewards.two_pass_reward(r1, r2, rcfg.alpha, rcfg.beta), np.float64)
    malformed = np.array([v is None for v in v2])
    reward = reward - g.malformed_penalty * malformed  # ... and pays the penalty
    return Rollouts(
        records, prompt_ids, draft_ids, draft_logp, suffix_ids, cont_ids, cont_logp, drafts,
        revisions, errors, v1, v2, reward, timings,
    )  # fmt: skip


def training_batch(ro: Rollouts, advantages: np.ndarray, seq_len: int, pad_id: int):
    """[rows, seq_len] next-token arrays; the loss mask covers draft and continuation only."""
    n = len(ro.prompt_ids)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    positions = np.full((n, seq_len), -1, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    old = np.zeros((n, seq_len), np.float32)
    for i in range(n):
        parts = [  # (ids, trained, old logprobs)
            (ro.prompt_ids[i], False, None),
            (ro.draft_ids[i], True, ro.draft_logp[i]),
            (ro.suffix_ids[i], False, None),
            (ro.cont_ids[i], True, ro.cont_logp[i]),
        ]
        seq = [t for ids, _, _ in parts for t in ids]
        if len(seq) - 1 > seq_len:
            raise ValueError(f"rollout {i} has {len(seq)} tokens > seq_len {seq_len} + 1.")
        trained = np.concatenate([np.full(len(ids), t, bool) for ids, t, _ in parts])
        logp = np.concatenate(
            [lp if lp is not None else np.zeros(len(ids), np.float32) for ids, _, lp in parts]
        )
        length = len(seq) - 1
        tokens[i, :length] = seq[:-1]
        targets[i, :length] = seq[1:]
        positions[i, :length] = np.arange(length)
        mask[i, :length] = trained[1:]
        old[i, :length] = logp[1:]
    return {
        "tokens": tokens, "positions": positions, "targets": targets, "loss_mask": mask,
        "old_logp": old, "advantages": np.asarray(advantages, np.float32),
    }  # fmt: skip


def split_micro(batch: dict, accum: int) -> dict:
    """[rows, ...] -> [accum, rows / accum, ...] (the jitted step scans over the first axis)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The jitted pieces.


def ref_logprobs(params, tokens, positions, targets, *, graphdef, mesh, rules):
    """[rows, T] log p(target) under the frozen reference."""
    with sharding.use_rules(mesh, rules):
        logits, _ = llama.forward(graphdef, params, tokens, positions)
        return losses.token_log_likelihood(logits, targets)


def grpo_step(state: TrainState, batch, *, graphdef, tx, schedule, param_sh, g, mesh, rules):
    """One optimizer update on the step's micro-batches; metrics are step totals."""
    with sharding.use_rules(mesh, rules):
        num_tokens = jnp.sum(batch["loss_mask"])
        num_seqs = jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=-1)).astype(jnp.float32)
        normalizer = {
            "seq_mean": num_seqs,
            "token_mean": num_tokens,
            "constant": float(batch["loss_mask"].shape[0] * batch["loss_mask"].shape[1])
            * batch["loss_mask"].shape[2],
        }[g.aggregation]

        def loss_fn(params, micro):
            logits, _ = llama.forward(graphdef, params, micro["tokens"], micro["positions"])
            logp = losses.token_log_likelihood(logits, micro["targets"])
            loss, sums = losses.grpo_loss(
                logp, micro["old_logp"], micro["advantages"], micro["loss_mask"],
                ref_logp=micro["ref_logp"] if g.kl_beta > 0 else None, kl_beta=g.kl_beta,
                clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
                normalizer=normalizer,
            )  # fmt: skip
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            entropy = -jnp.sum(probs * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)
            sums["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(entropy * micro["loss_mask"]))
            sums["loss_sum"] = loss
            return loss, sums

        grads, sums = sft.accumulate_grads(loss_fn, state.params, batch, param_sh)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    denom = jnp.maximum(sums["num_tokens"], 1.0)
    step_metrics = {
        "loss": sums["loss_sum"],
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "kl": sums["kl_sum"] / denom,
        "clip_fraction": sums["clipped_sum"] / denom,
        "ratio_mean": sums["ratio_sum"] / denom,
        "entropy": sums["entropy_sum"] / denom,
        "trained_tokens": sums["num_tokens"],
    }
    return TrainState(state.step + 1, params, opt_state), step_metrics


def jit_grpo_step(graphdef, tx, schedule, state_sh: TrainState, g, mesh, rules):
    """`grpo_step` jitted once: state shardings in and out, the state donated."""
    step = functools.partial(
        grpo_step, graphdef=graphdef, tx=tx, schedule=schedule, param_sh=state_sh.params,
        g=g, mesh=mesh, rules=tuple(rules),
    )  # fmt: skip
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """[A, rows / A, ...] arrays: rows over (data, fsdp)."""
    out = {}
    for k in BATCH_KEYS:
        extra = (None,) if k != "advantages" else ()
        out[k] = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *extra))
    return out


# ---------------------------------------------------------------------------------------------
# Logging helpers.


def rollout_metrics(ro: Rollouts, rubric) -> dict[str, float]:
    """Reward statistics, per-principle draft/revision scores, gates, lengths, malformed."""
    m = {
        "rollout/reward_mean": float(ro.rewards.mean()),
        "rollout/reward_std": float(ro.rewards.std()),
    }
    m["rollout/draft_score"] = float(np.mean([v.scores.reward for v in ro.draft_verdicts]))
    m["rollout/draft_gate_violation_rate"] = float(
        np.mean([bool(v.scores.violated_gates) for v in ro.draft_verdicts])
    )
    m["rollout/draft_tokens"] = float(np.mean([len(t) for t in ro.draft_ids]))
    revised = [v for v in ro.revision_verdicts if v is not None]
    for p in rubric.principles:
        vals = [v.scores.principles[p.id] for v in ro.draft_verdicts]
        vals = [x for x in vals if x is not None]
        if vals:
            m[f"draft/{p.id}"] = float(np.mean(vals))
        vals = [v.scores.principles[p.id] for v in revised]
        vals = [x for x in vals if x is not None]
        if vals:
            m[f"revision/{p.id}"] = float(np.mean(vals))
    if any(ro.cont_ids):
        m["rollout/continuation_tokens"] = float(np.mean([len(t) for t in ro.cont_ids]))
        m["rollout/malformed_fraction"] = float(np.mean([e is not None for e in ro.errors]))
    if revised:
        pairs = [
            (d.scores.reward, v.scores.reward)
            for d, v in zip(ro.draft_verdicts, ro.revision_verdicts)
            if v is not None
        ]
        m["rollout/revision_score"] = float(np.mean([r2 for _, r2 in pairs]))
        m["rollout/improved_fraction"] = float(np.mean([r2 > r1 for r1, r2 in pairs]))
        m["rollout/revision_gate_violation_rate"] = float(
            np.mean([bool(v.scores.violated_gates) for v in revised])
        )
    return m


def rollout_rows(ro: Rollouts, judge, step: int, count: int) -> list[dict]:
    """A few rollouts with their judge reports, for rollouts.jsonl."""
    rows = []
    for i in range(min(count, len(ro.records))):
        r = ro.records[i]
        rows.append({
            "step": step, "id": r.id, "prompt": r.prompt, "draft": ro.drafts[i],
            "revision": ro.revisions[i], "error": ro.errors[i], "reward": float(ro.rewards[i]),
            "draft_report": judge_lib.report_row(
                judge, r.prompt, ro.drafts[i], ro.draft_verdicts[i]
            ),
            "revision_report": (
                judge_lib.report_row(judge, r.prompt, ro.revisions[i], ro.revision_verdicts[i])
                if ro.revision_verdicts[i] is not None else None
            ),
        })  # fmt: skip
    return rows


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

    # Mesh; the policy's initial weights (also the frozen reference and, by default, judge;
    # not loaded when neither, see checkpoint.base_model).
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(config.sharding.rules)
    sharding.check_batch_divisible(rows_per_step // g.grad_accum_steps, mesh)
    initial = checkpoint.base_model(config, mesh)
    tok = initial.tokenizer
    if tok is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    cfg = initial.cfg
    judge = judge_lib.from_config(config, initial)

    # Prompts, and the longest sequence a rollout can make.
    records = read_prompts(config)
    prompt_ids = chat_ids(tok, records, g.max_prompt_tokens, g.on_long_prompt)
    records = [r for r in records if r.id in prompt_ids]
    cache_len, seq_len = rollout_lengths(g, tok, judge, prompt_ids.values())
    logging.info("grpo: %d prompts, seq_len %d, cache %d", len(records), seq_len, cache_len)

    # Optimizer and state shapes; restore or init.
    tx, schedule = sft.make_optimizer(config.optimizer, g.num_steps * g.num_iterations)
    graphdef, abstract_params = llama.abstract_model(cfg)
    abstract_state, state_sh = sft.state_shardings(abstract_params, tx, mesh, rules)
    manager = checkpoint.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    make_state = jax.jit(
        functools.partial(sft.init_state, tx=tx), out_shardings=state_sh, donate_argnums=(0,)
    )

    # The KL reference is the policy at the start of RL; the judge stays the base model.
    reference, start = initial, f"the policy {config.model.source}"
    if config.checkpoint.init:
        params, start = checkpoint.initial_params(
            cfg, state_sh.params, source=config.model.source, init=config.checkpoint.init,
            mesh=mesh, rules=rules, seed=config.seed,
        )  # fmt: skip
        reference = dataclasses.replace(initial, params=params)
    state, meta, origin = checkpoint.restore_or_init(
        manager, abstract_state, make_state,
        # A copy: the train state is donated, the reference must survive.
        lambda: (jax.tree.map(jnp.copy, reference.params), start),
    )  # fmt: skip
    first_step = int(meta["step"]) if meta is not None else 0

    # Jit once.
    batch_sh = batch_shardings(mesh)
    step_fn = jit_grpo_step(graphdef, tx, schedule, state_sh, g, mesh, rules)
    row_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    ref_fn = jax.jit(
        functools.partial(ref_logprobs, graphdef=graphdef, mesh=mesh, rules=rules),
        in_shardings=(state_sh.params, row_sh, row_sh, row_sh),
        out_shardings=row_sh,
    )

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

    try:
        for step in range(first_step, g.num_steps):
            t0 = time.perf_counter()
            batch_records = prompts_for_step(records, step, g.prompts_per_step, config.seed)
            rows = [r for r in batch_records for _ in range(g.num_generations)]
            policy = dataclasses.replace(initial, params=state.params)
            ro = rollout(
                config, policy, judge, rows, [prompt_ids[r.id] for r in rows],
                jax.random.fold_in(base_rng, step), cache_len,
            )  # fmt: skip
            adv = np.asarray(
                losses.group_advantages(
                    ro.rewards, g.num_generations, eps=g.adv_eps, scale_by_std=g.scale_adv_by_std
                )
            )
            t_train = time.perf_counter()
            host = training_batch(ro, adv, seq_len, tok.pad_id)
            if g.kl_beta > 0:
                rows_in = sft.put_batch(
                    {k: host[k] for k in ("tokens", "positions", "targets")},
                    dict.fromkeys(("tokens", "positions", "targets"), row_sh),
                )
                host["ref_logp"] = sharding.to_host(ref_fn(reference.params, *rows_in.values()))
            else:
                host["ref_logp"] = np.zeros_like(host["old_logp"])
            micro = split_micro(host, g.grad_accum_steps)
            for _ in range(g.num_iterations):
                state, m = step_fn(state, sft.put_batch(micro, batch_sh))
                m = jax.device_get(m)
                metrics.check_finite(
                    step + 1, float(m["loss"]), float(m["grad_norm"]),
                    last_checkpoint=lambda: checkpoint.latest_step(manager),
                )  # fmt: skip
            done = step + 1
            row = {f"train/{k}": float(v) for k, v in m.items()}
            row.update(rollout_metrics(ro, judge.rubric))
            row.update({
                "time/step_s": time.perf_counter() - t0,
                "time/sampling_s": ro.timings["sampling"], "time/judging_s": ro.timings["judging"],
                "time/training_s": time.perf_counter() - t_train,
            })  # fmt: skip
            writer.write(done, row)
            if done % config.metrics.log_every == 0 or done == g.num_steps:
                progress.print(done, row)
            if (
                jax.process_index() == 0
                and g.rollouts_every
                and (done % g.rollouts_every == 0 or done == g.num_steps)
            ):
                files.append_jsonl(rollouts_path, rollout_rows(ro, judge, done, 2))
            if done == g.num_steps or (
                config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0
            ):
                writer.flush()  # the metric lines up to a checkpoint survive a kill
                checkpoint.save(manager, state, {
                    "step": done, "rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
                    "num_prompts": len(records), "total_steps": g.num_steps,
                })  # fmt: skip
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()

    if g.export_hf:
        out = os.path.join(workdir, "hf")
        hf.export_hf(out, cfg, state.params, tok)
        print(f"exported Hugging Face weights to {out}")
