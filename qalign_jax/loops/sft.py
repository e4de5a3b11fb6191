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
- SFT draws no random numbers (no dropout; shuffling is numpy seeded by (seed, epoch)); the
  RNG key is saved anyway, so every loop's checkpoint has the same layout.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from qalign_jax import checkpoint, data, losses, metrics, sharding
from qalign_jax.checkpoint import TrainState
from qalign_jax.models import hf, llama

BATCH_KEYS = ("tokens", "positions", "targets", "loss_mask")


# ---------------------------------------------------------------------------------------------
# Optimizer, shardings, the step.


def make_optimizer(opt_cfg, total_steps: int):
    """AdamW with linear warmup and cosine decay, after global-norm clipping.

    Weight decay skips the norm weights (`*layernorm*`, `norm`), as Hugging Face does.
    Returns (optax transformation, schedule: step -> lr).
    """
    warmup_steps = int(round(opt_cfg.warmup_ratio * total_steps))
    if warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt_cfg.lr,
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=opt_cfg.lr * opt_cfg.min_lr_ratio,
        )
    else:  # the same curve; optax's warmup variant logs a warning for a 0-step warmup
        schedule = optax.cosine_decay_schedule(
            opt_cfg.lr, decay_steps=max(total_steps, 1), alpha=opt_cfg.min_lr_ratio
        )

    def decay_mask(params):
        def not_norm(path, _):
            return not any("norm" in str(getattr(k, "key", "")) for k in path)

        return jax.tree_util.tree_map_with_path(not_norm, params)

    adamw = optax.adamw(
        schedule,
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=decay_mask,
    )
    if opt_cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.max_grad_norm), adamw), schedule
    return adamw, schedule


def state_shardings(abstract_params, tx, mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract train state with shardings, the shardings) from the parameters' shapes.

    Adam's moments take their parameter's sharding (`optax.tree_map_params`); counters are
    replicated.
    """
    param_sh = sharding.param_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract_opt,
        param_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
    return checkpoint.with_shardings(shapes, shardings), shardings


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    """[A, B / A, T] batch arrays: micro-batch rows over (data, fsdp)."""
    spec = PartitionSpec(None, ("data", "fsdp"), None)
    return {k: NamedSharding(mesh, spec) for k in BATCH_KEYS}


def local_rows(global_batch_size: int, grad_accum_steps: int, mesh) -> slice:
    """The rows of each micro-batch that this process's devices hold (all, on one process)."""
    shape = (grad_accum_steps, global_batch_size // grad_accum_steps, 1)
    return sharding.process_rows(batch_shardings(mesh)["tokens"], shape, axis=1)


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict:
    """Host arrays (the same global batch on every process) to global device arrays; each
    process passes only the rows its devices hold (`sharding.put_global`)."""
    return {k: sharding.put_global(v, shardings[k]) for k, v in batch.items()}


def put_local_batch(batch: dict, shardings: dict[str, NamedSharding], micro_rows: int) -> dict:
    """This process's rows of a batch ([A, local rows, T], see `local_rows`) as global arrays
    of [A, micro_rows, T]: each process built only its own rows."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], v, (v.shape[0], micro_rows, *v.shape[2:])
        )
        for k, v in batch.items()
    }


def init_state(params, tx) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def accumulate_grads(loss_fn, params, batch, param_sh):
    """float32 gradient sum and summed aux of `loss_fn(params, micro) -> (loss, sums)` over the
    micro-batches of `batch` (its leading axis), as one `lax.scan`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grads, micro):
        (_, sums), g = grad_fn(params, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        # Pin the carry to the parameters' sharding: an unsharded fp32 gradient of an 8B
        # model would not fit on one device.
        return jax.lax.with_sharding_constraint(grads, param_sh), sums

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, param_sh)
    grads, sums = jax.lax.scan(accumulate, zeros, batch)
    return grads, jax.tree.map(jnp.sum, sums)


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, param_sh, mesh, rules):
    """One optimizer update from the micro-batches of `batch`.

    Args:
      state: the train state (donated).
      batch: `tokens, positions, targets, loss_mask`, each [A, B / A, T].

    Returns:
      (new state, metrics: loss, accuracy, grad_norm (before clipping), lr, trained_tokens).
    """
    with sharding.use_rules(mesh, rules):
        num_tokens = jnp.sum(batch["loss_mask"])  # trained tokens of the whole step

        def loss_fn(params, micro):
            logits, _ = llama.forward(graphdef, params, micro["tokens"], micro["positions"])
            return losses.sft_loss(
                logits, micro["targets"], micro["loss_mask"], normalizer=num_tokens
            )

        grads, sums = accumulate_grads(loss_fn, state.params, batch, param_sh)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    denom = jnp.maximum(num_tokens, 1.0)
    step_metrics = {
        "loss": sums["nll_sum"] / denom,
        "accuracy": sums["num_correct"] / denom,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "trained_tokens": num_tokens,
        "tokens": jnp.sum(batch["positions"] >= 0),  # every real token of the step
    }
    return TrainState(state.step + 1, params, opt_state), step_metrics


def eval_step(params, batch, *, graphdef, mesh, rules):
    """Sums of the loss pieces over the micro-batches of `batch` (no gradient)."""
    with sharding.use_rules(mesh, rules):

        def one(_, micro):
            logits, _ = llama.forward(graphdef, params, micro["tokens"], micro["positions"])
            return None, losses.sft_loss(logits, micro["targets"], micro["loss_mask"])[1]

        _, sums = jax.lax.scan(one, None, batch)
    return jax.tree.map(jnp.sum, sums)


def jit_train_step(graphdef, tx, schedule, state_sh: TrainState, mesh, rules):
    """`train_step` jitted once: state shardings in and out, the state donated."""
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule, param_sh=state_sh.params,
        mesh=mesh, rules=tuple(rules),
    )  # fmt: skip
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def evaluate(eval_fn, params, eval_batches, batch_sh, micro_rows: int) -> dict[str, float]:
    """`eval/loss` and `eval/accuracy`: token means over every eval batch (this process's rows
    of each, `put_local_batch`)."""
    totals = {"nll_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for batch in eval_batches:
        sums = jax.device_get(eval_fn(params, put_local_batch(batch, batch_sh, micro_rows)))
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
    rules = tuple(config.sharding.rules)
    cfg, tokenizer = checkpoint.describe_model(config.model)
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
    tx, schedule = make_optimizer(config.optimizer, total_steps)
    graphdef, abstract_params = llama.abstract_model(cfg)
    abstract_state, state_sh = state_shardings(abstract_params, tx, mesh, rules)
    batch_sh = batch_shardings(mesh)

    # Restore or init, in the order of checkpoint.py.
    manager = checkpoint.make_manager(
        workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    make_state = jax.jit(
        functools.partial(init_state, tx=tx), out_shardings=state_sh, donate_argnums=(0,)
    )
    load_params = functools.partial(
        checkpoint.initial_params, cfg, state_sh.params, source=config.model.source,
        init=config.checkpoint.init, mesh=mesh, rules=rules, seed=config.seed,
    )  # fmt: skip
    state, meta, origin = checkpoint.restore_or_init(
        manager, abstract_state, make_state, load_params
    )
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
    step_fn = jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules)
    eval_fn = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, mesh=mesh, rules=rules),
        in_shardings=(state_sh.params, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )

    writer = metrics.MetricsWriter(
        workdir, resume_step=first_step, tensorboard=config.metrics.tensorboard
    )
    progress = metrics.Progress(first_step, total_steps)
    eval_every, save_every = sft_cfg.eval_every, config.checkpoint.every_steps
    writer.write(first_step, {
        "run/first_step": first_step, "run/total_steps": total_steps, "run/origin": origin,
        "data/epoch": batches.position.epoch, "data/index": batches.position.index,
        "run/num_params": cfg.num_params,
    })  # fmt: skip
    if jax.process_index() == 0:
        print(f"sft: {origin}; steps {first_step} -> {total_steps}, data at {batches.position}")

    try:
        if eval_batches and first_step == 0:
            writer.write(0, evaluate(eval_fn, state.params, eval_batches, batch_sh, micro_rows))
        for step in range(first_step, total_steps):
            t0 = time.perf_counter()
            state, m = step_fn(state, put_local_batch(batches.next(rows), batch_sh, micro_rows))
            m = jax.device_get(m)  # the one sync per step: check before saving anything
            done = step + 1  # updates done: the step number of this line and checkpoint
            metrics.check_finite(
                done, float(m["loss"]), float(m["grad_norm"]),
                last_checkpoint=lambda: checkpoint.latest_step(manager),
            )  # fmt: skip
            step_s = time.perf_counter() - t0
            row = {f"train/{k}": float(v) for k, v in m.items()}
            row.update({
                "time/step_s": step_s, "train/tokens_per_s": float(m["tokens"]) / step_s,
                "data/epoch": done / batches.steps_per_epoch,
            })  # fmt: skip
            writer.write(done, row)
            is_last = done == total_steps
            if done % config.metrics.log_every == 0 or is_last:
                progress.print(done, row)

            if eval_batches and (is_last or (eval_every and done % eval_every == 0)):
                eval_row = evaluate(eval_fn, state.params, eval_batches, batch_sh, micro_rows)
                writer.write(done, eval_row)
                progress.print(done, eval_row)

            if is_last or (save_every and done % save_every == 0):
                writer.flush()  # the metric lines up to a checkpoint survive a kill
                checkpoint.save(manager, state, {
                    "step": done, "data": batches.position.to_json(),
                    "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                    "data_fingerprint": fingerprint, "total_steps": total_steps,
                })  # fmt: skip
    finally:
        manager.wait_until_finished()  # never exit with a save half written
        manager.close()
        writer.close()

    if sft_cfg.export_hf:
        out = os.path.join(workdir, "hf")
        hf.export_hf(out, cfg, state.params, tokenizer, dtype=sft_cfg.export_dtype or None)
        print(f"exported Hugging Face weights to {out}")
