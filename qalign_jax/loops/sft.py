"""The SFT loop: supervised fine-tuning on masked chat examples, e.g. QA-LIGN's priming.

  python -m qalign_jax.train --config configs/sft_prime_smol.py --workdir workdirs/sft_smol

`run(config, workdir)` reads top to bottom: mesh, model shapes, data, optimizer, state shapes
and shardings, restore or init, jit, then `for step in range(first_step, total_steps)`: batch,
step, finiteness check, log, eval, checkpoint; finally the Hugging Face export.

Decisions:
- One optimizer update per step. Gradient accumulation is a `lax.scan` over the step's
  micro-batches inside the jitted step (batch arrays [A, B / A, T]), and the loss is the token
  mean over the whole step's trained tokens, so the update does not depend on the split.
- Mixed precision by config: `model.param_dtype='float32'` keeps fp32 master weights and Adam
  moments, `model.dtype='bfloat16'` computes in bf16 (the model casts at use); the loss and the
  accumulated gradients are float32.
- FSDP and tensor parallelism come from the mesh and the rules; the step is jitted once with
  the state's shardings in and out, and the state is donated (it is the largest buffer).
- The host fetches each step's metrics (one sync per step) to check the loss and gradient
  norm before anything from that step is saved.
- LoRA (`model.lora.rank` > 0): the state holds the adapters and their Adam moments only;
  the base weights are loaded at every start (also on resume) and passed to the step frozen.
- SFT draws no random numbers (no dropout; shuffling is numpy seeded by (seed, epoch)); the
  RNG key is saved anyway, so every loop's checkpoint has the same layout.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from qalign_jax import checkpoint, data, losses, metrics, plan, sharding, train_state
from qalign_jax.checkpoint import TrainState
from qalign_jax.models import llama, load

BATCH_KEYS = ("tokens", "positions", "targets", "loss_mask")


# ---------------------------------------------------------------------------------------------
# Optimizer, shardings, the step.


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """[A, B / A, T] batch arrays: micro-batch rows over (data, fsdp)."""
    return train_state.micro_shardings(mesh, dict.fromkeys(BATCH_KEYS, 3))


def local_rows(global_batch_size: int, grad_accum_steps: int, mesh) -> slice:
    """The rows of each micro-batch that this process's devices hold (all, on one process)."""
    return train_state.local_rows(batch_shardings(mesh)["tokens"], global_batch_size,
                                  grad_accum_steps)  # fmt: skip


def train_step(state: TrainState, batch, frozen=None, *, graphdef, tx, schedule, param_sh,
               compute_dtype=None):  # fmt: skip
    """One optimizer update from the micro-batches of `batch`.

    Args:
      state: the train state (donated).
      batch: `tokens, positions, targets, loss_mask`, each [A, B / A, T].
      frozen: the frozen base weights under LoRA (state.params are the adapters), else None.
      compute_dtype: the weights are cast to it once (`train_state.compute_copy`), or None.

    Returns:
      (new state, metrics: loss, accuracy, grad_norm (before clipping), lr, trained_tokens).
    """
    num_tokens = jnp.sum(batch["loss_mask"])  # trained tokens of the whole step

    def loss_fn(weights, micro):
        stats = llama.token_stats(
            graphdef, weights, micro["tokens"], micro["positions"], micro["targets"], correct=True
        )
        return losses.sft_loss_from_logp(
            stats["logp"], stats["correct"], micro["loss_mask"], normalizer=num_tokens
        )

    grads, sums = train_state.accumulate_grads(
        loss_fn, state.params, batch, param_sh, frozen, compute_dtype
    )
    new_state, grad_norm = train_state.apply_grads(state, grads, tx)
    denom = jnp.maximum(num_tokens, 1.0)
    step_metrics = {
        "loss": sums["nll_sum"] / denom,
        "accuracy": sums["num_correct"] / denom,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "trained_tokens": num_tokens,
        "tokens": jnp.sum(batch["positions"] >= 0),  # every real token of the step
    }
    return new_state, step_metrics


def eval_step(params, batch, *, graphdef):
    """Sums of the loss pieces over the micro-batches of `batch` (no gradient)."""

    def one(_, micro):
        stats = llama.token_stats(
            graphdef, params, micro["tokens"], micro["positions"], micro["targets"], correct=True
        )
        return None, losses.sft_loss_from_logp(stats["logp"], stats["correct"], micro["loss_mask"])[
            1
        ]

    _, sums = jax.lax.scan(one, None, batch)
    return jax.tree.map(jnp.sum, sums)


def jit_train_step(graphdef, tx, schedule, state_sh: TrainState, mesh, rules, frozen_sh=None,
                   compute_dtype=None):  # fmt: skip
    """`train_step` jitted once (`train_state.jit_step`); `frozen_sh`: the base's shardings
    under LoRA."""
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             param_sh=state_sh.params, compute_dtype=compute_dtype)  # fmt: skip
    return train_state.jit_step(
        step, state_sh, batch_shardings(mesh), mesh, rules, "sft_step", frozen_sh
    )


def evaluate(eval_fn, params, eval_batches, batch_sh, micro_rows: int) -> dict[str, float]:
    """`eval/loss` and `eval/accuracy`: token means over every eval batch (this process's rows
    of each, `put_local_batch`)."""
    totals = {"nll_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for batch in eval_batches:
        local = train_state.put_local_batch(batch, batch_sh, micro_rows)
        sums = jax.device_get(eval_fn(params, local))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    denom = max(totals["num_tokens"], 1.0)
    return {
        "eval/loss": totals["nll_sum"] / denom,
        "eval/accuracy": totals["num_correct"] / denom,
        "eval/tokens": totals["num_tokens"],
    }


# ---------------------------------------------------------------------------------------------
# Data.


def read_examples(config, tokenizer) -> tuple[list, list]:
    """(train, eval) examples: `data.eval_path`, else `eval_size` held out of the train file."""
    d = config.data
    if not d.train_path:
        raise ValueError("config.data.train_path is empty; the sft loop needs an SFT JSONL.")
    kw = dict(seq_len=d.seq_len, on_overflow=d.on_overflow, system_prompt=d.system_prompt)
    examples = data.load_sft_examples(d.train_path, tokenizer, max_examples=d.max_examples, **kw)
    if d.eval_path:
        return examples, data.load_sft_examples(d.eval_path, tokenizer, **kw)
    if d.eval_size >= len(examples):
        raise ValueError(
            f"data.eval_size={d.eval_size} leaves no training examples of {len(examples)}."
        )
    parts = examples.split({"eval": d.eval_size, "train": -1}, config.seed)
    return parts["train"], parts["eval"]


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config, workdir: str) -> None:
    sft_cfg = config.sft

    # Mesh, then the model's shapes and tokenizer (no weights are read here).
    mesh = sharding.make_mesh(config.mesh.shape)
    plan.check_fits(config, "sft", mesh.size)  # seconds, before any weights or rollouts
    rules = tuple(config.sharding.rules)
    cfg, tokenizer = load.describe_config(config.model)
    if tokenizer is None:
        raise ValueError(
            f"model {config.model.source!r} has no tokenizer; set config.model.tokenizer "
            "(e.g. 'embedded') for random-weight models."
        )

    # Data: validated rows, a held-out split, batches; tokenized where this process needs them.
    train_examples, eval_examples = read_examples(config, tokenizer)
    if sft_cfg.grad_accum_steps < 1 or sft_cfg.global_batch_size % sft_cfg.grad_accum_steps:
        raise ValueError(
            f"sft.global_batch_size={sft_cfg.global_batch_size} must be a multiple of "
            f"sft.grad_accum_steps={sft_cfg.grad_accum_steps} (>= 1)."
        )
    sharding.check_batch_divisible(sft_cfg.global_batch_size // sft_cfg.grad_accum_steps, mesh)
    batch_kw = dict(
        seq_len=config.data.seq_len, pad_id=tokenizer.pad_id,
        global_batch_size=sft_cfg.global_batch_size, grad_accum_steps=sft_cfg.grad_accum_steps,
        row_width=config.data.row_width,
    )  # fmt: skip
    micro_rows = sft_cfg.global_batch_size // sft_cfg.grad_accum_steps
    rows = local_rows(sft_cfg.global_batch_size, sft_cfg.grad_accum_steps, mesh)
    batches = data.SFTBatches(train_examples, seed=config.seed, **batch_kw)
    eval_batches = (
        data.SFTBatches(eval_examples, shuffle=False, **batch_kw).all_batches(rows)
        if eval_examples
        else []
    )
    total_steps = sft_cfg.num_steps or sft_cfg.num_epochs * batches.steps_per_epoch
    if total_steps <= 0:
        raise ValueError("nothing to train: set sft.num_epochs or sft.num_steps to at least 1.")
    fingerprint = train_examples.fingerprint()

    # Optimizer, then the state's shapes and shardings.
    tx, schedule = train_state.make_optimizer(config.optimizer, total_steps)
    policy_cfg = train_state.policy_config(cfg, config.model)  # cfg, or with LoRA adapters
    graphdef, abstract_params = llama.abstract_model(policy_cfg)
    abstract_trained, abstract_frozen = train_state.split_trainable(abstract_params)
    abstract_state, state_sh = train_state.state_shardings(abstract_trained, tx, mesh, rules)
    batch_sh = batch_shardings(mesh)

    # Restore or init, in the order of checkpoint.py.
    manager = checkpoint.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    make_state = train_state.jit_init_state(tx, state_sh)
    load_kw = dict(source=config.model.source, init=config.checkpoint.init, mesh=mesh,
                   rules=rules, seed=config.seed)  # fmt: skip
    load_params = functools.partial(load.initial_params, cfg, state_sh.params, **load_kw)
    frozen = frozen_sh = None
    if abstract_frozen is not None:  # LoRA: the base is loaded at every start, adapters fresh
        frozen_sh = sharding.param_shardings(abstract_frozen, mesh, rules)
        frozen, base_origin = load.initial_params(cfg, frozen_sh, **load_kw)

        def load_params():
            adapters, adapters_origin = train_state.initial_adapters(
                policy_cfg, config.model, config.seed, state_sh.params
            )
            return adapters, f"{base_origin} + {adapters_origin}"

    state, meta, origin = checkpoint.restore_or_init(
        manager, abstract_state, make_state, load_params
    )
    train_state.check_lora_meta(meta, policy_cfg, manager.directory)
    rng = jax.random.key(config.seed)
    first_step = 0
    if meta is not None:
        first_step = int(meta["step"])
        if meta["data_fingerprint"] != fingerprint:
            raise ValueError(
                f"{manager.directory}: the checkpoint was trained on different data (fingerprint "
                f"{meta['data_fingerprint']}, now {fingerprint}); data.* or the tokenizer changed "
                "since. Use a new workdir, or restore the data settings."
            )
        batches.position = data.DataPosition.from_json(meta["data"])  # restored, not replayed
        rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    if batches.position != batches.position_after(first_step):
        raise ValueError(
            f"checkpoint step {first_step} is at data position {batches.position}, but "
            f"{batches.steps_per_epoch} batches per epoch put it at "
            f"{batches.position_after(first_step)}: sft.global_batch_size changed since."
        )

    # This process's examples of the current epoch, tokenized now: a bad one stops the run here.
    batches.tokenize_epoch(batches.position.epoch, rows)
    logging.info(
        "data: %d train / %d eval examples, %d steps per epoch, %d steps; process %d of %d holds "
        "rows %d:%d of each micro-batch and tokenized %d train (%d truncated) + %d eval examples",
        len(train_examples), len(eval_examples), batches.steps_per_epoch, total_steps,
        jax.process_index(), jax.process_count(), rows.start, rows.stop,
        train_examples.num_tokenized, train_examples.num_truncated,
        eval_examples.num_tokenized if eval_examples else 0,
    )  # fmt: skip

    # Jit once.
    step_fn = jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules, frozen_sh,
                             train_state.compute_dtype(config.model))  # fmt: skip
    frozen_args = () if frozen is None else (frozen,)
    eval_fn = sharding.jit(
        functools.partial(eval_step, graphdef=graphdef), mesh=mesh, rules=rules,
        in_shardings=(train_state.full_params(state_sh.params, frozen_sh), batch_sh),
        out_shardings=sharding.replicated(mesh), name="sft_eval",
    )  # fmt: skip

    writer = metrics.MetricsWriter(
        workdir, resume_step=first_step, tensorboard=config.metrics.tensorboard
    )
    progress = metrics.Progress(first_step, total_steps)
    eval_every, save_every = sft_cfg.eval_every, config.checkpoint.every_steps
    writer.write(first_step, {
        "run/first_step": first_step, "run/total_steps": total_steps, "run/origin": origin,
        "data/epoch": batches.position.epoch, "data/index": batches.position.index,
        "run/num_params": cfg.num_params, "run/num_trained_params": sum(
            x.size for x in jax.tree.leaves(state.params)),
    })  # fmt: skip
    if jax.process_index() == 0:
        print(f"sft: {origin}; steps {first_step} -> {total_steps}, data at {batches.position}")

    with train_state.closing(manager, writer):
        if eval_batches and first_step == 0:
            full = train_state.full_params(state.params, frozen)
            writer.write(0, evaluate(eval_fn, full, eval_batches, batch_sh, micro_rows))
        for step in range(first_step, total_steps):
            t0 = time.perf_counter()
            host = batches.next(rows)  # [A, rows, W]: W per batch (data.row_width)
            batch = train_state.put_local_batch(host, batch_sh, micro_rows)
            state, m = step_fn(state, batch, *frozen_args)
            m = jax.device_get(m)  # the one sync per step: checked before anything is saved
            done = step + 1  # updates done: the step number of this line and checkpoint
            step_s = time.perf_counter() - t0
            row = {f"train/{k}": float(v) for k, v in m.items()}
            row.update({
                "time/step_s": step_s, "train/tokens_per_s": float(m["tokens"]) / step_s,
                "data/epoch": done / batches.steps_per_epoch,
                "train/row_width": host["tokens"].shape[-1],
            })  # fmt: skip
            train_state.end_step(
                done, m, row, total_steps=total_steps, log_every=config.metrics.log_every,
                manager=manager, writer=writer, progress=progress,
            )  # fmt: skip
            is_last = done == total_steps
            if eval_batches and (is_last or (eval_every and done % eval_every == 0)):
                full = train_state.full_params(state.params, frozen)
                eval_row = evaluate(eval_fn, full, eval_batches, batch_sh, micro_rows)
                writer.write(done, eval_row)
                progress.print(done, eval_row)
            train_state.save_if_due(done, total_steps, save_every, manager, writer, state, {
                "data": batches.position.to_json(),
                "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                "data_fingerprint": fingerprint,
                **train_state.lora_meta(policy_cfg, config),
            })  # fmt: skip

    if sft_cfg.export_hf:
        train_state.export_final(
            workdir, config, graphdef, state.params, frozen, cfg, policy_cfg, tokenizer,
            sft_cfg.export_dtype or None,
        )  # fmt: skip
