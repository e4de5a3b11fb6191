"""Metrics: one JSONL per run, a console progress line, an optional TensorBoard sink.

Owns how a loop reports: `MetricsWriter` appends `{"step": s, "area/name": value, ...}` lines
to `workdir/metrics.jsonl` (keys such as `train/loss`, `train/grad_norm`, `train/lr`,
`time/step_s`, `train/tokens_per_s`, `eval/loss`), mirrors numbers to TensorBoard when a writer
package is importable, and `Progress` formats the console line with an ETA. `check_finite`
stops a run loudly on a non-finite loss or gradient norm.

Invariants:
- Only process 0 writes; other processes get a writer that does nothing (every process may
  call it, so loops need no `if process_index == 0` around logging).
- A metric line for step s describes the update that produced step s (s updates done). On
  resume from a checkpoint at step c, lines with step > c (work the killed run lost) are
  dropped, so the file reads as one uninterrupted run.
- TensorBoard is optional: `tensorboardX` or `tensorflow` if importable, else off, logged once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
from absl import logging

from qalign_jax import files

METRICS_FILE = "metrics.jsonl"


def _to_python(value):
    """JSON-friendly scalars: numpy/jax scalars to int or float."""
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value)
        if value.ndim:
            raise ValueError(f"metrics must be scalars, got shape {value.shape}.")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _open_tensorboard(logdir: str):
    """A `(name, value, step)` scalar writer, or None when no TensorBoard package is installed."""
    try:
        from tensorboardX import SummaryWriter  # light: no TensorFlow needed

        writer = SummaryWriter(logdir)
        return writer.add_scalar, writer.flush, writer.close
    except ImportError:
        pass
    try:
        import tensorflow as tf

        writer = tf.summary.create_file_writer(logdir)

        def add_scalar(name, value, step):
            with writer.as_default():
                tf.summary.scalar(name, value, step=step)

        return add_scalar, writer.flush, writer.close
    except ImportError:
        return None


class MetricsWriter:
    """Appends metric lines to `workdir/metrics.jsonl` (and TensorBoard), from process 0.

    Args:
      workdir: the run's directory.
      resume_step: the step the run starts from; existing lines past it are dropped (see the
        module docstring). 0 for a fresh run (an old file is then kept: it is truncated past 0).
      tensorboard: also write TensorBoard event files to `workdir/tb` when possible.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        # Lines go out at once to a local file; to a bucket at most every 30 s, at `flush` (the
        # loops flush before each checkpoint) and at close, since an append there rewrites
        # the object (`files.append_text`).
        self._pending: list[str] = []
        self._flush_every_s = 30.0 if files.is_url(workdir) else 0.0
        self._flushed_at = time.monotonic()
        if not self.active:
            return
        if files.exists(self.path):
            rows = files.read_jsonl(self.path)
            files.write_jsonl(self.path, [r for r in rows if r.get("step", 0) <= resume_step])
        if tensorboard:
            self._tb = _open_tensorboard(os.path.join(workdir, "tb"))
            if self._tb is None:
                logging.info(
                    "TensorBoard is off: neither tensorboardX nor tensorflow is installed "
                    "(metrics still go to %s).",
                    self.path,
                )

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """One line `{"step": step, "time": unix seconds, **metrics}`; numbers go to TB too."""
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        self._pending.append(json.dumps(row) + "\n")
        if time.monotonic() - self._flushed_at >= self._flush_every_s:
            self.flush()
        if self._tb is not None:
            add_scalar = self._tb[0]
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    add_scalar(k, v, int(step))

    def flush(self) -> None:
        """Appends the pending lines to the file."""
        if self._pending:
            files.append_text(self.path, "".join(self._pending))
            self._pending = []
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self._tb is not None:
            self._tb[1]()
            self._tb[2]()


def read_metrics(workdir: str) -> list[dict]:
    """Every line of `workdir/metrics.jsonl` (tests, notebooks)."""
    return files.read_jsonl(os.path.join(workdir, METRICS_FILE))


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12s`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """The console line: step, loss, lr, grad norm, speed and ETA.

    The ETA averages the steps since the first one this process ran, excluding that first step
    (it includes compilation).
    """

    def __init__(self, first_step: int, total_steps: int):
        self.first_step = first_step
        self.total_steps = total_steps
        self._t_first = None  # time the first step of this process finished

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        if self._t_first is None or step <= self.first_step + 1:
            self._t_first = now
            eta = float("nan")
        else:
            per_step = (now - self._t_first) / (step - self.first_step - 1)
            eta = per_step * (self.total_steps - step)
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"step {step}/{self.total_steps} ({pct:.0f}%)"]
        for key, fmt in (
            ("rollout/reward_mean", "reward {:+.3f}"),
            ("train/loss", "loss {:.4f}"),
            ("train/kl", "kl {:.4f}"),
            ("train/lr", "lr {:.2e}"),
            ("train/grad_norm", "gnorm {:.3f}"),
            ("time/step_s", "{:.2f} s/step"),
            ("train/tokens_per_s", "{:,.0f} tok/s"),
            ("eval/loss", "eval loss {:.4f}"),
            ("eval/accuracy", "eval accuracy {:.3f}"),
        ):
            if key in metrics:
                parts.append(fmt.format(float(metrics[key])))
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def print(self, step: int, metrics: Mapping[str, float]) -> None:
        if jax.process_index() == 0:
            print(self.line(step, metrics), flush=True)


def check_finite(
    step: int,
    loss: float,
    grad_norm: float,
    *,
    last_checkpoint: int | Callable[[], int | None] | None = None,
) -> None:
    """Raises FloatingPointError, naming the step, loss and grad norm, if either is not finite.

    Args:
      step: the step whose update produced these numbers.
      loss, grad_norm: host floats of that step.
      last_checkpoint: the newest saved step (it is left as it is), for the message; or a
        function returning it, called only on failure (it may wait for a save in flight).
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    if callable(last_checkpoint):
        last_checkpoint = last_checkpoint()
    where = (
        f"the last good checkpoint (step {last_checkpoint}) is intact and a rerun of the same "
        "command resumes from it"
        if last_checkpoint is not None
        else "no checkpoint was saved yet"
    )
    raise FloatingPointError(
        f"step {step}: non-finite loss={loss} or grad_norm={grad_norm}; stopping before saving "
        f"anything from this step ({where}). Usual fixes: a lower optimizer.lr, more warmup "
        "(optimizer.warmup_ratio), optimizer.max_grad_norm > 0, or bfloat16 -> float32 params."
    )
