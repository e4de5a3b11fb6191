"""The shared loop core: what SFT, GRPO and DPO do alike with their train state.

Each loop (`loops/sft.py`, `loops/grpo.py`, `loops/dpo.py`) still reads top to bottom and
owns its step's loss; these functions are the pieces they share, in the order a loop uses them:

  make_optimizer, state_shardings   AdamW + schedule; the state's shapes and shardings
  jit_init_state, jit_step          compiled once with `sharding.jit` (the state donated)
  micro_shardings, split_micro,     a step's batch: [A micro-batches, rows / A, ...] arrays,
  put_batch, put_local_batch          rows over (data, fsdp), placed from the host
  compute_dtype, compute_copy       mixed precision: the weights cast once per step
  accumulate_grads, apply_grads     inside the step: summed float32 gradients, one update
  end_step, save, closing, export_hf  the tail: check, log, checkpoint when due, close, export

LoRA (`model.lora.rank` > 0, models/lora.py): the train state's `params` are the adapters
only (so are Adam's moments and the gradients); the frozen base is a separate `frozen`
argument of the jitted step, never donated, shared with the KL reference and the judge:
  policy_config, split_trainable    the LoRA architecture; (trained, frozen) abstract params
  initial_adapters                  fresh adapters, or a PEFT directory's (`model.lora.init`)
  full_params, policy_model         adapters + base as one parameter tree / a runnable model
  merged_params, lora_meta          export weights (adapters folded in); what a checkpoint records
  export_peft                       the adapters as a PEFT directory, `workdir/adapter`

No loop imports another loop; the train state itself (`TrainState`) and orbax live in
`checkpoint.py`, the model's weights in `models/load.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qalign_jax import checkpoint, metrics, sharding
from qalign_jax.checkpoint import TrainState
from qalign_jax.models import hf, llama, lora

# ---------------------------------------------------------------------------------------------
# Optimizer and state.


def make_optimizer(opt_cfg, total_steps: int):
    """AdamW with linear warmup and cosine decay, after global-norm clipping.

    Weight decay skips the norm weights (`*layernorm*`, `norm`), as Hugging Face does.
    `opt_cfg.mu_dtype` ('' = the parameters' dtype) stores Adam's first moment narrower, e.g.
    'bfloat16' (optax has no such option for the second moment, whose squares need range).
    Returns (optax transformation, schedule: step -> lr).
    """
    if opt_cfg.mu_dtype not in ("", "float32", "bfloat16"):
        raise ValueError(
            f"optimizer.mu_dtype={opt_cfg.mu_dtype!r}; use '' (the parameters' dtype), "
            "'float32' or 'bfloat16'."
        )
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
        mu_dtype=opt_cfg.mu_dtype or None,
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


def init_state(params, tx) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def jit_init_state(tx, state_sh: TrainState):
    """params -> a fresh `TrainState` on `state_sh` (the params are donated)."""
    return sharding.jit(functools.partial(init_state, tx=tx), mesh=None, rules=None,
                        out_shardings=state_sh, donate_argnums=(0,), name="init_state")  # fmt: skip


def jit_step(step, state_sh: TrainState, batch_sh: dict, mesh, rules, name: str, frozen_sh=None):
    """`step(state, batch) -> (state, metrics)` compiled once: the state's shardings in and
    out (donated: it is the largest buffer), the batch's in, metrics replicated. With LoRA
    (`frozen_sh`: the base's shardings) it is `step(state, batch, frozen)`, the frozen base
    not donated (the reference and the judge read the same arrays)."""
    in_sh = (state_sh, batch_sh) if frozen_sh is None else (state_sh, batch_sh, frozen_sh)
    return sharding.jit(
        step, mesh=mesh, rules=rules, in_shardings=in_sh,
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,), name=name,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# LoRA: trained adapters on a frozen base.


def policy_config(cfg: llama.LlamaConfig, model_cfg) -> llama.LlamaConfig:
    """The trained architecture: `cfg` (the base, as loaded) with `model_cfg.lora` applied."""
    return cfg.replace(lora=lora.from_config(model_cfg.lora))


def split_trainable(abstract_params):
    """(trained, frozen) parts of the policy's parameters: (adapters, base) with LoRA, else
    (all, None)."""
    adapters, base = lora.split(abstract_params)
    if not jax.tree.leaves(adapters):
        return abstract_params, None
    return adapters, base


def initial_adapters(policy_cfg: llama.LlamaConfig, model_cfg, seed: int, shardings):
    """The adapters a LoRA run starts from, on `shardings`: `model_cfg.lora.init`'s PEFT
    directory, else fresh ones (A random, B zero). Returns (adapters, origin text)."""
    init = model_cfg.lora.init
    if not init:
        fresh = llama.init_adapters(policy_cfg, seed, shardings)
        return fresh, f"fresh LoRA adapters (rank {policy_cfg.lora.rank})"
    theirs = hf.read_peft_config(init)
    if theirs != policy_cfg.lora:
        raise ValueError(
            f"model.lora.init={init}: its adapters are rank {theirs.rank}, alpha {theirs.alpha}, "
            f"targets {','.join(theirs.targets)}; set model.lora.rank/alpha/targets to match "
            f"(now {policy_cfg.lora.rank}, {policy_cfg.lora.alpha}, "
            f"{','.join(policy_cfg.lora.targets)})."
        )
    return hf.load_peft_adapters(init, policy_cfg, shardings), f"LoRA adapters of {init}"


def full_params(trained, frozen):
    """The policy's whole parameter tree (or shardings tree): trained + frozen (no copy)."""
    return trained if frozen is None else lora.combine(trained, frozen)


def policy_model(base_model, cfg, graphdef, trained, frozen):
    """`base_model` (a `load.LoadedModel`) running the trained policy: its params replaced,
    and with LoRA its architecture too (`cfg`, `graphdef` with adapters, over the same base
    arrays)."""
    if frozen is None:
        return dataclasses.replace(base_model, params=trained)
    return dataclasses.replace(
        base_model, cfg=cfg, graphdef=graphdef, params=full_params(trained, frozen)
    )


def merged_params(graphdef, trained, frozen):
    """The plain model's weights of the policy (export, later stages): with LoRA the adapters
    folded into the base kernels (`llama.merge_adapters`, one jitted pass), else `trained`."""
    if frozen is None:
        return trained
    merge = jax.jit(llama.merge_adapters, static_argnums=0)
    return merge(graphdef, full_params(trained, frozen))


def lora_meta(cfg: llama.LlamaConfig, config) -> dict:
    """What a checkpoint records of the adapters (nothing without LoRA): rank, alpha, targets
    and the base's source (`checkpoint.init`, else `model.source`), so a resume checks them and
    a reader knows the params are adapters."""
    if cfg.lora is None:
        return {}
    spec, base = cfg.lora, config.checkpoint.init or config.model.source
    return {"lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
                     "base": base}}  # fmt: skip


def check_lora_meta(meta: dict | None, cfg: llama.LlamaConfig, directory: str) -> None:
    """On resume: the checkpoint's adapters (or their absence) must match `model.lora`."""
    if meta is None:
        return
    saved = meta.get("lora")
    saved = None if saved is None else {k: v for k, v in saved.items() if k != "base"}
    now = None if cfg.lora is None else dataclasses.asdict(cfg.lora)
    now = now and {**now, "targets": list(cfg.lora.targets)}
    if saved != now:
        raise ValueError(
            f"{directory}: the checkpoint was trained with LoRA {saved}, this run's model.lora "
            f"is {now} (None: full fine-tuning); restore model.lora or use a new workdir."
        )


# ---------------------------------------------------------------------------------------------
# A step's batch: [A, rows / A, ...] (A micro-batches; the step scans over them).


def micro_shardings(mesh, ndims: dict[str, int]) -> dict[str, NamedSharding]:
    """{key: sharding} for [A, rows / A, ...] arrays of `ndims[key]` dims: rows over
    (data, fsdp), everything else whole."""
    return {
        k: NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *(None,) * (n - 2)))
        for k, n in ndims.items()
    }


def split_micro(batch: dict, accum: int) -> dict:
    """[rows, ...] -> [accum, rows / accum, ...] (the jitted step scans over the first axis)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict:
    """Host arrays (the same global batch on every process) to global device arrays; each
    process passes only the rows its devices hold (`sharding.put_global`)."""
    return {k: sharding.put_global(v, shardings[k]) for k, v in batch.items()}


def local_rows(batch_sh: NamedSharding, global_batch_size: int, grad_accum_steps: int) -> slice:
    """The rows of each micro-batch that this process's devices hold (all, on one process)."""
    shape = (grad_accum_steps, global_batch_size // grad_accum_steps, 1)
    return sharding.process_rows(batch_sh, shape, axis=1)


def put_local_batch(batch: dict, shardings: dict[str, NamedSharding], micro_rows: int) -> dict:
    """This process's rows of a batch ([A, local rows, T], see `local_rows`) as global arrays
    of [A, micro_rows, T]: each process built only its own rows."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], v, (v.shape[0], micro_rows, *v.shape[2:])
        )
        for k, v in batch.items()
    }


# ---------------------------------------------------------------------------------------------
# Inside the jitted step.


def compute_dtype(model_cfg) -> str | None:
    """The dtype a train step casts its weights to once (`compute_copy`), or None: the
    config's compute dtype when `model.compute_copy` is on, else per use in each forward."""
    return model_cfg.dtype if model_cfg.compute_copy else None


def _is_embedding(path) -> bool:
    return any(getattr(k, "key", None) == "embed_tokens" for k in path)


def compute_copy(params, dtype: str | None):
    """`params` cast to the compute `dtype` (a no-op for None, for leaves already as narrow,
    and for the embedding table).

    The model casts each weight to its compute dtype where it uses it (`llama.Proj`, the norms,
    the head), so a step of A micro-batches (and remat's recomputation) would cast every
    weight A to 2A times; cast once, before the micro-batch loop, the forward sees the same
    numbers and the gradients are the same (a cast's VJP casts the cotangent back). The token
    embedding stays as stored: its rows are gathered, and their gradients scatter-added over
    every token, which should sum in float32.
    """
    if params is None or dtype is None:
        return params
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        narrower = jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > dtype.itemsize
        return x.astype(dtype) if narrower and not _is_embedding(path) else x

    return jax.tree_util.tree_map_with_path(cast, params)


def accumulate_grads(loss_fn, params, batch, param_sh, frozen=None, dtype: str | None = None):
    """float32 gradient sum with respect to `params` and summed aux of
    `loss_fn(weights, micro) -> (loss, sums)` over the micro-batches of `batch` (its leading
    axis), as one `lax.scan`. `weights` is the policy's whole tree: `params` plus the
    `frozen` base under LoRA (`full_params`), both cast once to `dtype` (`compute_copy`)."""
    trained = jax.lax.with_sharding_constraint(compute_copy(params, dtype), param_sh)
    frozen = compute_copy(frozen, dtype)

    def weights_loss(trained, micro):
        return loss_fn(full_params(trained, frozen), micro)

    grad_fn = jax.value_and_grad(weights_loss, has_aux=True)

    def accumulate(grads, micro):
        (_, sums), g = grad_fn(trained, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        # Pin the carry to the parameters' sharding: an unsharded fp32 gradient of an 8B
        # model would not fit on one device.
        return jax.lax.with_sharding_constraint(grads, param_sh), sums

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, param_sh)
    grads, sums = jax.lax.scan(accumulate, zeros, batch)
    return grads, jax.tree.map(jnp.sum, sums)


def apply_grads(state: TrainState, grads, tx) -> tuple[TrainState, jax.Array]:
    """One optimizer update: (the next state, the gradients' global norm before clipping)."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), grad_norm


# ---------------------------------------------------------------------------------------------
# The end of a step, and of the run.


def end_step(done: int, m: dict, row: dict, *, total_steps: int, log_every: int, manager,
             writer: metrics.MetricsWriter, progress: metrics.Progress) -> None:  # fmt: skip
    """After update `done`: stop loudly on a non-finite loss or gradient (before anything is
    saved), then log `row` (to the metrics file; to the console every `log_every` steps)."""
    metrics.check_finite(
        done, float(m["loss"]), float(m["grad_norm"]),
        last_checkpoint=lambda: checkpoint.latest_step(manager),
    )  # fmt: skip
    writer.write(done, row)
    if done % log_every == 0 or done == total_steps:
        progress.print(done, row)


def save_if_due(done: int, total_steps: int, every_steps: int, manager, writer, state, meta):
    """Checkpoints after the last step and every `every_steps` (0: only the last); the metric
    lines up to a checkpoint are flushed first, so they survive a kill."""
    if done == total_steps or (every_steps and done % every_steps == 0):
        writer.flush()
        checkpoint.save(manager, state, {"step": done, "total_steps": total_steps, **meta})


@contextlib.contextmanager
def closing(manager, writer: metrics.MetricsWriter):
    """Whatever happens in the loop: wait for a save in flight (never exit with one half
    written), then close the checkpoint manager and the metrics."""
    try:
        yield
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()


def export_hf(workdir: str, cfg, params, tokenizer, dtype: str | None = None) -> None:
    """The final weights as a Hugging Face directory, `workdir/hf`."""
    out = os.path.join(workdir, "hf")
    hf.export_hf(out, cfg, params, tokenizer, dtype=dtype)
    print(f"exported Hugging Face weights to {out}")


def export_final(workdir: str, config, graphdef, params, frozen, cfg, policy_cfg, tokenizer,
                 dtype: str | None = None) -> None:  # fmt: skip
    """A loop's final weights: full weights in `workdir/hf` (LoRA adapters merged in) and, with
    LoRA (`frozen` is the base), the adapters as a PEFT directory in `workdir/adapter`."""
    export_hf(workdir, cfg, merged_params(graphdef, params, frozen), tokenizer, dtype)
    if frozen is not None:
        base_source = config.checkpoint.init or config.model.source
        export_peft(workdir, policy_cfg, params, base_source)


def export_peft(workdir: str, policy_cfg, adapters, base: str) -> None:
    """The LoRA adapters as a PEFT adapter directory, `workdir/adapter` (beside the merged
    `workdir/hf`), for `peft.PeftModel.from_pretrained` on the base model `base`."""
    out = os.path.join(workdir, "adapter")
    hf.export_peft(out, policy_cfg, adapters, base_model=base)
    print(f"exported PEFT LoRA adapters to {out}")
