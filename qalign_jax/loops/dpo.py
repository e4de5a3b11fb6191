"""The DPO baseline: judge-ranked pairs from the policy's own samples, sigmoid DPO, frozen ref.

  python -m qalign_jax.train --config configs/dpo_smol.py --workdir workdirs/dpo_smol

The QA-LIGN paper compares against DPO on the same prompts and judge. This loop builds that
baseline from the pieces the GRPO loop uses, in two stages:

  pairs   (offline, once) the starting policy (= the frozen reference) samples G answers per
          prompt (`rollouts.rollout`, single pass), scored by `config.reward.components`
          (by default the frozen judge on the rubric: `Scores.reward`, safety-first pooled;
          reward_components.py composes others, totals as the GRPO loop's); each prompt's
          best answer is `chosen` and its worst `rejected`. Prompts whose best and worst
          rewards differ by <= `dpo.min_margin` (ties) are skipped and counted. Written to
          `workdir/pairs.jsonl` with token ids, every sample's reward and the texts, so a rerun
          (or a resume) reuses the pairs instead of sampling again.
  train   the reference's summed answer log-likelihoods are computed once per pair; then
          `for step in range(first_step, total_steps)`: `dpo.pairs_per_step` pairs (epochs of
          a (seed, epoch)-seeded permutation, a pure function of the step, as in GRPO), the
          sigmoid DPO loss (`losses.dpo_loss`) with `dpo.beta`, and the shared loop core
          (`train_state.py`: AdamW, gradient accumulation, orbax checkpoints with exact
          resume, the Hugging Face export).

Decisions: the pairs are sampled once, from the starting policy, as in standard (offline) DPO
on on-policy data; iterated/online DPO (resampling from the trained policy) is not done here.
The answers are single-pass (no `<Think>` revision): DPO is the paper's single-pass baseline.
The judge is the base model (`judge.source=''`), as in the GRPO loop; the reference is the
policy at the start (`checkpoint.init`'s weights when set).
"""

from __future__ import annotations

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
    losses,
    metrics,
    reward_components,
    rollouts,
    sharding,
    stages,
    train_state,
)
from qalign_jax import judge as judge_lib
from qalign_jax.checkpoint import TrainState
from qalign_jax.models import llama, load

PAIRS_FILE = "pairs.jsonl"  # the pairs, written whole once sampling has finished
SAMPLES_FILE = "pair_samples.jsonl"  # each prompt's outcome (a pair or a tie), per batch
SIDES = ("chosen", "rejected")
ROW_KEYS = ("tokens", "positions", "targets", "mask")
BATCH_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ROW_KEYS) + ("ref_chosen", "ref_rejected")


# ---------------------------------------------------------------------------------------------
# Pairs (host side).


def best_and_worst(rewards: np.ndarray, min_margin: float) -> tuple[int, int] | None:
    """(chosen index, rejected index) of one prompt's G rewards, or None for a tie.

    The first of equal maxima (minima) is taken, so the choice is deterministic.
    """
    rewards = np.asarray(rewards, np.float64)
    best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
    if rewards[best] - rewards[worst] <= min_margin:
        return None
    return best, worst


def make_pairs(
    config, policy, judge, records, prompt_ids, rng, samples_path: str
) -> tuple[list[dict], dict]:
    """Samples G answers per prompt, judges them and keeps best vs worst; returns (pairs, stats).

    Prompts are sampled `dpo.sample_batch_prompts` at a time (x G rows per sampler call); each
    batch's outcome (a pair or a tie per prompt) is appended to `samples_path`, so a killed run
    resumes after its last finished batch (`stages.map_in_batches`). A batch's key is
    `fold_in(rng, index of its first prompt)`, whatever an earlier run finished.
    """
    d = config.dpo
    components = reward_components.from_config(config.reward)
    judge = judge if reward_components.needs_judge(components) else None
    opts = rollouts.RolloutConfig(
        two_pass=False, draft_max_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p
    )

    def sample(batch, first_index: int) -> list[dict]:
        rows = [r for r in batch for _ in range(d.num_generations)]
        ro = rollouts.rollout(
            policy, judge, rows, [prompt_ids[r.id] for r in rows], opts,
            jax.random.fold_in(rng, first_index),
        )  # fmt: skip
        composed = reward_components.compose(
            components, reward_components.inputs_from_rollouts(ro, opts), d.num_generations,
            aggregation=config.reward.aggregation,
        )  # fmt: skip
        rewards = composed.totals.reshape(len(batch), -1)
        seconds = {k: ro.timings[k] / len(batch) for k in ("sampling", "judging")}
        out = []
        for i, r in enumerate(batch):
            choice = best_and_worst(rewards[i], d.min_margin)
            pair = None
            if choice is not None:
                w, lo = (i * d.num_generations + j for j in choice)
                pair = {
                    "id": r.id, "prompt": r.prompt, "category": r.category, "label": r.label,
                    "prompt_ids": prompt_ids[r.id],
                    "chosen_ids": ro.draft_ids[w], "rejected_ids": ro.draft_ids[lo],
                    "chosen": ro.drafts[w], "rejected": ro.drafts[lo],
                    "chosen_reward": float(rewards[i, choice[0]]),
                    "rejected_reward": float(rewards[i, choice[1]]),
                    "rewards": [float(x) for x in rewards[i]],
                }  # fmt: skip
            out.append({"id": r.id, "pair": pair, "seconds": seconds})
        return out

    done = stages.map_in_batches(
        records, sample, samples_path, batch_size=d.sample_batch_prompts, label="dpo pairs"
    )
    pairs = [row["pair"] for row in done if row["pair"] is not None]
    ties = [row["id"] for row in done if row["pair"] is None]
    stats = {
        "pairs/prompts": len(records), "pairs/kept": len(pairs), "pairs/ties_skipped": len(ties),
        "pairs/sampled": len(records) * d.num_generations,
        "pairs/mean_reward": float(np.mean([x for p in pairs for x in p["rewards"]] or [0.0])),
        "pairs/mean_gap": float(
            np.mean([p["chosen_reward"] - p["rejected_reward"] for p in pairs] or [0.0])
        ),
        "time/sampling_s": sum(row["seconds"]["sampling"] for row in done),
        "time/judging_s": sum(row["seconds"]["judging"] for row in done),
    }  # fmt: skip
    if ties:
        logging.info("dpo: %d prompts skipped as ties (e.g. %s)", len(ties), ties[:3])
    return pairs, stats


def read_pairs(path: str) -> list[dict]:
    """The pairs of an earlier run of this workdir; a broken file is an error, not resampled."""
    pairs = stages.read_rows(path, torn_last_line=False)  # written whole: no torn line
    for n, row in enumerate(pairs, 1):
        missing = [k for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids") if k not in row]
        if missing:
            raise ValueError(f"{path}: pair {n}: missing fields {missing}; delete it to resample.")
    if not pairs:
        raise ValueError(f"{path} holds no pairs; delete it to resample.")
    return pairs


def pair_rows(pairs: list[dict], side: str, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """[P, seq_len] next-token arrays of prompt + answer; the mask covers the answer only."""
    n = len(pairs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    positions = np.full((n, seq_len), -1, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for i, p in enumerate(pairs):
        prompt, answer = list(p["prompt_ids"]), list(p[f"{side}_ids"])
        seq = prompt + answer
        length = len(seq) - 1
        if length > seq_len:
            raise ValueError(f"pair {p['id']} {side}: {len(seq)} tokens > seq_len {seq_len} + 1.")
        tokens[i, :length] = seq[:-1]
        targets[i, :length] = seq[1:]
        positions[i, :length] = np.arange(length)
        mask[i, len(prompt) - 1 : length] = 1.0  # the targets that are answer tokens
    return {"tokens": tokens, "positions": positions, "targets": targets, "mask": mask}


def training_batch(pairs: list[dict], seq_len: int, pad_id: int, ref: np.ndarray) -> dict:
    """The step's arrays: `chosen_*`, `rejected_*` rows and the reference sums `ref` [P, 2]."""
    batch = {}
    for side in SIDES:
        for k, v in pair_rows(pairs, side, seq_len, pad_id).items():
            batch[f"{side}_{k}"] = v
    batch["ref_chosen"] = ref[:, 0].astype(np.float32)
    batch["ref_rejected"] = ref[:, 1].astype(np.float32)
    return batch


# ---------------------------------------------------------------------------------------------
# The jitted pieces.


def answer_logprobs(params, tokens, positions, targets, mask, *, graphdef):
    """[rows] summed log p(answer | prompt)."""
    logp = llama.token_stats(graphdef, params, tokens, positions, targets)["logp"]
    return jnp.sum(logp * mask, axis=-1)


def dpo_step(state: TrainState, batch, frozen=None, *, graphdef, tx, schedule, param_sh,
             dpo_cfg, compute_dtype=None):  # fmt: skip
    """One optimizer update on the step's micro-batches of pairs; metrics are step means.
    `frozen`: the base weights under LoRA (`state.params` are the adapters), else None;
    `compute_dtype`: the weights are cast to it once (`train_state.compute_copy`), or None."""
    d = dpo_cfg
    num_pairs = float(batch["ref_chosen"].shape[0] * batch["ref_chosen"].shape[1])

    def loss_fn(weights, micro):
        # Chosen and rejected rows in one forward: [2P, T].
        rows = {k: jnp.concatenate([micro[f"chosen_{k}"], micro[f"rejected_{k}"]]) for k in
                ROW_KEYS}  # fmt: skip
        logp = answer_logprobs(
            weights, rows["tokens"], rows["positions"], rows["targets"], rows["mask"],
            graphdef=graphdef,
        )  # fmt: skip
        chosen, rejected = jnp.split(logp, 2)
        return losses.dpo_loss(
            chosen, rejected, micro["ref_chosen"], micro["ref_rejected"], beta=d.beta,
            label_smoothing=d.label_smoothing, normalizer=num_pairs,
        )  # fmt: skip

    grads, sums = train_state.accumulate_grads(
        loss_fn, state.params, batch, param_sh, frozen, compute_dtype
    )
    new_state, grad_norm = train_state.apply_grads(state, grads, tx)
    step_metrics = {
        "loss": sums["loss_sum"] / num_pairs,
        "accuracy": sums["accuracy_sum"] / num_pairs,
        "margin": sums["margin_sum"] / num_pairs,
        "chosen_reward": sums["chosen_reward_sum"] / num_pairs,
        "rejected_reward": sums["rejected_reward_sum"] / num_pairs,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
    }
    return new_state, step_metrics


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """[A, P / A, ...] arrays: pairs over (data, fsdp)."""
    return train_state.micro_shardings(
        mesh, {k: 2 if k.startswith("ref_") else 3 for k in BATCH_KEYS}
    )


def jit_dpo_step(graphdef, tx, schedule, state_sh: TrainState, dpo_cfg, mesh, rules,
                 frozen_sh=None, compute_dtype=None):  # fmt: skip
    """`dpo_step` jitted once (`train_state.jit_step`); `frozen_sh`: the base's shardings
    under LoRA."""
    step = functools.partial(dpo_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             param_sh=state_sh.params, dpo_cfg=dpo_cfg,
                             compute_dtype=compute_dtype)  # fmt: skip
    return train_state.jit_step(
        step, state_sh, batch_shardings(mesh), mesh, rules, "dpo_step", frozen_sh
    )


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config, workdir: str) -> None:
    d = config.dpo
    if d.num_generations < 2:
        raise ValueError(f"dpo.num_generations={d.num_generations}; best vs worst needs G >= 2.")
    if d.grad_accum_steps < 1 or d.pairs_per_step % d.grad_accum_steps:
        raise ValueError(
            f"dpo.pairs_per_step={d.pairs_per_step} must be a multiple of "
            f"dpo.grad_accum_steps={d.grad_accum_steps} (>= 1)."
        )

    # Mesh; the base model (judge) and the starting policy (also the frozen reference; not
    # loaded when it is neither, see load.base_model).
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = tuple(config.sharding.rules)
    sharding.check_batch_divisible(d.pairs_per_step // d.grad_accum_steps, mesh)
    base = load.base_model(config, mesh)
    tok, cfg = base.tokenizer, base.cfg
    if tok is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    judge = judge_lib.from_config(config, base)
    graphdef, abstract_params = llama.abstract_model(cfg)
    param_sh = sharding.param_shardings(abstract_params, mesh, rules)
    reference, start = load.initial_policy(config, base)
    # LoRA (model.lora): the policy is adapters on the reference's arrays as its frozen base,
    # neither copied nor donated; the reference (the policy at the start) is that base with
    # adapters off, or with model.lora.init's adapters.
    policy_cfg = train_state.policy_config(cfg, config.model)
    policy_graphdef, policy_abstract = llama.abstract_model(policy_cfg)
    abstract_trained, abstract_frozen = train_state.split_trainable(policy_abstract)
    frozen = frozen_sh = None
    if abstract_frozen is not None:
        frozen, frozen_sh = reference.params, param_sh
        adapter_sh = sharding.param_shardings(abstract_trained, mesh, rules)
        start_adapters, adapters_origin = train_state.initial_adapters(
            policy_cfg, config.model, config.seed, adapter_sh
        )
        start = f"{start} + {adapters_origin}"
        if config.model.lora.init:
            reference = train_state.policy_model(
                reference, policy_cfg, policy_graphdef, start_adapters, frozen
            )
            graphdef = policy_graphdef
            param_sh = train_state.full_params(adapter_sh, frozen_sh)

    # Stage 1: pairs (reused when the workdir has them; sampling resumes per batch).
    pairs_path = os.path.join(workdir, PAIRS_FILE)
    if files.exists(pairs_path):
        pairs = read_pairs(pairs_path)
        logging.info("dpo: %d pairs from %s", len(pairs), pairs_path)
    else:
        records = data.select_prompts(d.sources, config.seed)
        prompt_ids = data.chat_ids(tok, records, d.max_prompt_tokens, d.on_long_prompt)
        records = [r for r in records if r.id in prompt_ids]
        pairs, stats = make_pairs(
            config, reference, judge, records, prompt_ids,
            jax.random.fold_in(jax.random.key(config.seed), 1 << 20),
            os.path.join(workdir, SAMPLES_FILE),
        )  # fmt: skip
        if not pairs:
            raise ValueError(
                f"no preference pairs: all {len(records)} prompts were ties (best - worst <= "
                f"dpo.min_margin={d.min_margin}); raise dpo.num_generations or the temperature."
            )
        if jax.process_index() == 0:
            files.write_jsonl(pairs_path, pairs)
            files.write_json(os.path.join(workdir, "pairs_summary.json"), stats)
        print("dpo pairs: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    if len(pairs) < d.pairs_per_step:
        raise ValueError(f"{len(pairs)} pairs < dpo.pairs_per_step={d.pairs_per_step}.")
    total_steps = d.num_steps or max(1, d.num_epochs * len(pairs) // d.pairs_per_step)
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                  for p in pairs)  # fmt: skip
    seq_len = -(-longest // 64) * 64

    # The reference's answer log-likelihoods, once per pair.
    row_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    ref_fn = sharding.jit(
        functools.partial(answer_logprobs, graphdef=graphdef), mesh=mesh, rules=rules,
        in_shardings=(param_sh, row_sh, row_sh, row_sh, row_sh),
        out_shardings=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), name="answer_logprobs",
    )  # fmt: skip
    chunk = d.pairs_per_step // d.grad_accum_steps
    padded = pairs + pairs[: (-len(pairs)) % chunk]  # whole chunks; the repeats are dropped
    ref = np.zeros((len(padded), 2), np.float32)
    for s in range(0, len(padded), chunk):
        for j, side in enumerate(SIDES):
            rows = pair_rows(padded[s : s + chunk], side, seq_len, tok.pad_id)
            rows = train_state.put_batch(rows, dict.fromkeys(ROW_KEYS, row_sh))
            ref[s : s + chunk, j] = jax.device_get(ref_fn(reference.params, *rows.values()))
    ref = ref[: len(pairs)]
    index_of = {p["id"]: i for i, p in enumerate(pairs)}

    # Optimizer state: restore or init (from the reference's weights; with LoRA, the starting
    # adapters).
    tx, schedule = train_state.make_optimizer(config.optimizer, total_steps)
    abstract_state, state_sh = train_state.state_shardings(abstract_trained, tx, mesh, rules)
    manager = checkpoint.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    make_state = train_state.jit_init_state(tx, state_sh)

    def load_params():  # a copy: the state is donated, the reference must survive
        return jax.tree.map(jnp.copy, reference.params if frozen is None else start_adapters), start

    state, meta, origin = checkpoint.restore_or_init(
        manager, abstract_state, make_state, load_params
    )
    train_state.check_lora_meta(meta, policy_cfg, manager.directory)
    frozen_args = () if frozen is None else (frozen,)
    first_step = int(meta["step"]) if meta is not None else 0
    if meta is not None and meta.get("num_pairs") != len(pairs):
        raise ValueError(
            f"{manager.directory}: the checkpoint was trained on {meta.get('num_pairs')} pairs, "
            f"{pairs_path} has {len(pairs)}; use a new workdir or restore the pairs file."
        )
    step_fn = jit_dpo_step(policy_graphdef, tx, schedule, state_sh, d, mesh, rules, frozen_sh,
                           train_state.compute_dtype(config.model))  # fmt: skip
    batch_sh = batch_shardings(mesh)

    writer = metrics.MetricsWriter(
        workdir, resume_step=first_step, tensorboard=config.metrics.tensorboard
    )
    progress = metrics.Progress(first_step, total_steps)
    base_rng = jax.random.key(config.seed)
    if jax.process_index() == 0:
        print(f"dpo: {origin}; {len(pairs)} pairs, steps {first_step} -> {total_steps}, "
              f"{d.pairs_per_step} pairs per step, beta {d.beta}, seq_len {seq_len}")  # fmt: skip
    with train_state.closing(manager, writer):
        for step in range(first_step, total_steps):
            t0 = time.perf_counter()
            chosen = data.prompts_for_step(pairs, step, d.pairs_per_step, config.seed)
            idx = np.array([index_of[p["id"]] for p in chosen])
            width = data.batch_width(  # rows as wide as this step's pairs need
                [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) - 1
                 for p in chosen], seq_len, config.data.row_width,
            )  # fmt: skip
            host = training_batch(chosen, width, tok.pad_id, ref[idx])
            micro = train_state.split_micro(host, d.grad_accum_steps)
            state, m = step_fn(state, train_state.put_batch(micro, batch_sh), *frozen_args)
            m = jax.device_get(m)
            done = step + 1
            row = {f"train/{k}": float(v) for k, v in m.items()}
            row.update({"time/step_s": time.perf_counter() - t0, "train/row_width": width})
            train_state.end_step(
                done, m, row, total_steps=total_steps, log_every=config.metrics.log_every,
                manager=manager, writer=writer, progress=progress,
            )  # fmt: skip
            train_state.save_if_due(
                done, total_steps, config.checkpoint.every_steps, manager, writer, state,
                {"rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
                 "num_pairs": len(pairs), **train_state.lora_meta(policy_cfg, config)},
            )  # fmt: skip

    if d.export_hf:
        train_state.export_final(
            workdir, config, policy_graphdef, state.params, frozen, cfg, policy_cfg, tok
        )
