"""Checkpoints: orbax in `workdir/ckpt`, exact resume, and where a run's first state comes from.

A checkpoint at step s holds three items:
  params     the model parameters (an `nnx.State` of arrays), each restored onto its sharding;
  opt_state  the optimizer state (Adam moments and counters);
  meta       JSON: `step`, the data position (`data`: epoch and batch index), the RNG key data
             (`rng`), and a fingerprint of the training data, so a killed run resumes exactly:
             the same parameters, the same next batch, the same random stream.
With LoRA (`model.lora.rank` > 0) `params` and `opt_state` hold the adapters only and meta's
`lora` records rank, alpha, targets and the base's source (the base is read from it at every
start); such a checkpoint is not a full model (`restore_params` says so; use the run's merged
export `workdir/hf`).
Later stages read only `params` from a previous stage's directory (`restore_params`).

Where the state comes from, in this order (`restore_or_init`):
  1. the newest finished checkpoint in `workdir/ckpt` (resume; optimizer state and data too);
  2. `config.checkpoint.init`: a previous stage's workdir (or its `ckpt` dir), or a Hugging
     Face directory (params only; fresh optimizer);
  3. the imported model source, `config.model.source` (a GGUF or Hugging Face directory);
  4. random init (`random:<preset>` sources: tests, smoke runs).

Invariants: shapes first: restores and initial loads target abstract arrays with shardings,
so no tensor is ever whole on one device. A checkpoint becomes visible (`latest_step`) only
once orbax has finalized it (written to a temporary directory, then renamed), so a run killed
mid-save leaves the previous checkpoint as the newest one; the temporary directory is removed
when the next run opens the manager. Loops call `wait_until_finished` before exiting, normally
or by an exception.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import shutil
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from qalign_jax import files

CKPT_DIR = "ckpt"


class TrainState(NamedTuple):
    """What a training step updates: a pytree, donated to and returned by the jitted step."""

    step: jax.Array  # [] int32: optimizer updates done
    params: nnx.State
    opt_state: Any  # optax state


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs carrying their target shardings (the abstract tree a restore fills)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


class _OrbaxInfoFilter(std_logging.Filter):
    """Drops orbax's INFO lines (dozens per save); its warnings and errors still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in (
            record.pathname or ""
        )


def _quiet_orbax_logs() -> None:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OrbaxInfoFilter) for f in handler.filters):
        handler.addFilter(_OrbaxInfoFilter())


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's manager on `workdir/ckpt`, keeping the newest `keep` checkpoints (0 = all).

    Saving is decided by the loop (every N steps and at the end), so every `save` call saves.
    """
    _quiet_orbax_logs()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        save_interval_steps=1,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
    )
    manager = ocp.CheckpointManager(orbax_path(os.path.join(workdir, CKPT_DIR)), options=options)
    # Orbax removes those leftovers in a background thread and waits for it only before the next
    # save; wait now, so a run that stops before saving does not race the thread at exit.
    getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    return manager


def check_free_space(directory: str, tree, step: int) -> None:
    """One clear error before orbax starts when a local disk cannot hold the checkpoint (a full
    disk mid-save gave hundreds of lines of tracebacks and a hung process); the checkpoints
    already there stay. `tree`'s bytes (every array, whole) plus 5% is what is asked for."""
    if "://" in directory:
        return  # object stores have no free-space figure
    need = 1.05 * sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))
    path = directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the directory may not exist before the first save
    free = shutil.disk_usage(path).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"checkpoint of step {step} needs about {need / 1e9:.2f} GB in {directory} but only "
            f"{free / 1e9:.2f} GB is free there. Free space, give --workdir on a larger disk, or "
            "lower config.checkpoint.keep; the checkpoints already saved are untouched.",
        )


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
    """Saves `state` and `meta` as step `meta['step']`.

    With async saving this returns once the arrays are copied off the devices (so the caller may
    donate them to the next step) and writes in the background.
    """
    step = int(meta["step"])
    check_free_space(str(manager.directory), (state.params, state.opt_state), step)
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint (waits for a save in flight first)."""
    manager.wait_until_finished()
    return manager.latest_step()


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: TrainState
) -> tuple[TrainState, dict]:
    """The state and meta of checkpoint `step`, each array on its sharding in `abstract_state`."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    meta = restored.meta
    step_array = jax.device_put(jnp.asarray(meta["step"], jnp.int32), abstract_state.step.sharding)
    return TrainState(step_array, restored.params, restored.opt_state), meta


def orbax_path(path: str) -> str:
    """The directory orbax is given for checkpoint directory `path`: a gs:// URL as it is
    (orbax writes it through tensorstore's gcs driver), a local path made absolute (orbax
    refuses relative ones)."""
    return path if files.is_url(path) else os.path.abspath(path)


def find_checkpoint_dir(path: str) -> str | None:
    """`path` or `path/ckpt` if it holds orbax checkpoints (numbered step directories)."""
    for candidate in (os.path.join(path, CKPT_DIR), path):
        where = orbax_path(candidate)
        if files.isdir(where) and any(d.isdigit() for d in files.listdir(where)):
            return candidate
    return None


def restore_params(path: str, abstract_params: nnx.State) -> tuple[nnx.State, int]:
    """The parameters of the newest checkpoint under `path` (a stage's workdir or its ckpt dir).

    Returns (params on the shardings of `abstract_params`, the checkpoint's step).
    """
    ckpt_dir = find_checkpoint_dir(path)
    if ckpt_dir is None:
        raise FileNotFoundError(
            f"{path} holds no orbax checkpoints (in {path}/{CKPT_DIR} or {path})."
        )
    manager = ocp.CheckpointManager(
        orbax_path(ckpt_dir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint.")
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
    except (ValueError, KeyError) as e:
        lora = _read_meta(manager, step).get("lora")
        if lora:
            raise ValueError(
                f"{ckpt_dir}/{step} holds LoRA adapters only (rank {lora['rank']} on the base "
                f"{lora['base']!r}), not a full model: use the run's merged export "
                f"({path}/hf, sft/grpo/dpo.export_hf) as the source or checkpoint.init."
            ) from e
        raise ValueError(
            f"{ckpt_dir}/{step}: its params do not fit this run's model (config.model.source "
            f"must name the architecture the previous stage trained): {e}"
        ) from e
    finally:
        manager.close()
    return restored.params, step


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def read_meta(path: str) -> dict:
    """The JSON meta of the newest checkpoint under `path` (a workdir or its ckpt dir)."""
    ckpt_dir = find_checkpoint_dir(path)
    if ckpt_dir is None:
        raise FileNotFoundError(f"{path} holds no orbax checkpoints.")
    manager = ocp.CheckpointManager(
        orbax_path(ckpt_dir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    try:
        return _read_meta(manager, manager.latest_step())
    finally:
        manager.close()


def restore_or_init(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    make_state: Callable[[nnx.State], TrainState],
    load_params: Callable[[], tuple[nnx.State, str]],
) -> tuple[TrainState, dict | None, str]:
    """Resumes from `manager`'s newest checkpoint, else starts from `load_params()`.

    Args:
      manager: the run's checkpoint manager (`make_manager`).
      abstract_state: shapes and shardings of the train state (`with_shardings`).
      make_state: params -> a fresh `TrainState` (step 0, new optimizer state).
      load_params: steps 2-4 of the order (`models/load.initial_params`); called only
        without a checkpoint to resume.

    Returns:
      (state, meta of the restored checkpoint or None for a fresh start, origin text).
    """
    step = manager.latest_step()
    if step is not None:
        state, meta = restore(manager, step, abstract_state)
        origin = f"resumed from {manager.directory}/{step}"
    else:
        params, origin = load_params()
        state, meta = make_state(params), None
    logging.info("train state: %s", origin)
    return state, meta, origin
