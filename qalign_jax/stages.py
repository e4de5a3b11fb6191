"""Resumable stages: work that a rerun of the same workdir skips instead of redoing.

Two shapes, shared by the prime-data pass, the pipeline, DPO and IterAlign:

- `map_in_batches`: a map over items, a batch at a time, whose result rows (one dict with an
  `id` per item) are appended to a JSONL after each batch. A rerun reads the file back
  (`read_rows`) and only runs the items whose ids are not in it, so a killed run loses at most
  the batch in flight. A torn last line (killed mid-append) is dropped, and removed from the
  file; any other line that is not JSON is an error naming the file and line, since the file
  no longer says what was done.
- `run_once`: a stage that leaves a done marker (a small JSON file, written atomically after
  the stage's outputs). With the marker present the stage is skipped and the marker's content
  returned.

Multi-host: every process runs the same code and holds the same rows. Process 0 writes the
files; where the others read a file next they wait for it (`sharding.sync_processes`). Files go
through `files`, so a workdir may be a gs:// URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax
from absl import logging

from qalign_jax import files, sharding


def item_id(item) -> str:
    """The id of an item: a dict's "id", else its `.id` attribute."""
    return item["id"] if isinstance(item, dict) else item.id


def write_json(path: str, obj) -> None:
    """Every process calls it: process 0 writes `obj` atomically and the others wait for it."""
    if jax.process_index() == 0:
        files.write_json(path, obj)
    sharding.sync_processes(f"write {path}")


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """`write_json` for a whole JSONL file."""
    if jax.process_index() == 0:
        files.write_jsonl(path, rows)
    sharding.sync_processes(f"write {path}")


def read_rows(path: str, *, torn_last_line: bool = True) -> list[dict]:
    """The rows of a JSONL file ([] when there is none).

    Args:
      path: the file (local or URL).
      torn_last_line: the file is appended to, so its last line may be cut off by a kill: drop
        it (process 0 also rewrites the file without it). False for a file written whole, where
        any broken line is an error.

    Raises:
      ValueError naming `path:line` for a line that is not a JSON object (other than a torn last
      line); delete the file to start over.
    """
    if not files.exists(path):
        return []
    lines = files.read_text(path).split("\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not (torn_last_line and n == last):
                raise ValueError(
                    f"{path}:{n + 1} is not JSON; delete the file to start over."
                ) from e
            logging.warning("%s: dropping a torn last line", path)
            if jax.process_index() == 0:
                files.write_jsonl(path, rows)
            break
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{n + 1} is {type(row).__name__}, not a JSON object; delete the file to "
                "start over."
            )
        rows.append(row)
    return rows


def map_in_batches(
    items: Sequence,
    fn: Callable[[list, int], list[dict]],
    path: str,
    *,
    batch_size: int,
    label: str,
    on_batch: Callable[[list[dict], int, int], None] | None = None,
) -> list[dict]:
    """Runs `fn` over the items not yet in `path`, a batch at a time; returns every item's row.

    Args:
      items: dicts with an "id" or objects with `.id` (`item_id`); ids are unique.
      fn: (batch of items, index in `items` of the batch's first item) -> one row per item,
        each with the item's "id". The index lets `fn` derive its randomness from the batch's
        first item rather than from how far an earlier run got.
      path: the JSONL the rows are appended to after each batch (process 0 writes).
      batch_size: items per `fn` call.
      label: names the map in the log.
      on_batch: called after each batch with (rows so far, items run in this call, items to
        run in this call), for progress lines.

    Returns:
      The rows of `items`, in the order of `items` (rows in the file for other ids are left
      out).
    """
    if batch_size < 1:
        raise ValueError(f"{label}: batch_size={batch_size}; use 1 or more.")
    done = read_rows(path)
    done_ids = {r["id"] for r in done}
    todo = [(i, x) for i, x in enumerate(items) if item_id(x) not in done_ids]
    logging.info("%s: %d items, %d done, %d to go", label, len(items), len(done), len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        rows = fn([x for _, x in batch], batch[0][0])
        if jax.process_index() == 0:  # every process holds the rows; the file is for a resume
            files.append_jsonl(path, rows)
        done += rows
        if on_batch is not None:
            on_batch(done, start + len(batch), len(todo))
    order = {item_id(x): i for i, x in enumerate(items)}
    return sorted((r for r in done if r["id"] in order), key=lambda r: order[r["id"]])


def run_once(marker: str, fn: Callable[[], dict]) -> dict:
    """Runs the stage `fn` unless its done marker exists; returns the marker's content.

    `fn` writes the stage's outputs and returns a JSON-able dict (e.g. its seconds) that becomes
    the marker (process 0 writes it; the others wait for it).
    """
    if not files.exists(marker):
        result = fn()
        write_json(marker, result)
    return files.read_json(marker)
