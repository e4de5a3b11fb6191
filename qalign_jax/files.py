"""Files in a workdir that is a local directory or a bucket URL (`gs://bucket/run`).

Every file a run writes or reads back (metrics, config.json, rollouts, prime and DPO data,
stage markers, eval results, IterAlign rounds) goes through these functions, so a workdir on
Cloud Storage works the same as a local one: local paths go to the OS, URLs to
`etils.epath` (gs:// through gcsfs). Checkpoints go to orbax, which writes gs:// itself
(`checkpoint.orbax_path`). Paths stay strings everywhere; `os.path.join` keeps a URL intact.

Invariants:
- A whole-file write is atomic: a reader sees the old file or the new one. Locally it is a
  temporary file renamed over the target; a Cloud Storage object becomes visible only when its
  upload completes.
- Objects cannot be appended to, so `append_text` on a URL reads the object and writes it back
  whole. The files appended to here are small (metric lines, a few sample rollouts, batches of
  judged rows), so that costs little; large outputs are written once.
- Directories on a bucket are prefixes: `makedirs` does nothing there and `isdir` is true once
  an object exists under the prefix.
"""

from __future__ import annotations

import json
import os
import shutil

from etils import epath


def is_url(path: str) -> bool:
    """`gs://...` and other `scheme://` paths (they go through epath, not the OS)."""
    return "://" in str(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries in directory `path`."""
    if is_url(path):
        return [p.name for p in epath.Path(path).iterdir()]
    return os.listdir(path)


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_url(path):
        return epath.Path(path).read_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes the whole file atomically (see the module docstring)."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """`write_text` for bytes (an image, say)."""
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def append_text(path: str, text: str) -> None:
    """Appends `text` (whole lines) to `path`, creating it; on a URL a read and a rewrite."""
    if is_url(path):
        old = read_text(path) if exists(path) else ""
        epath.Path(path).write_text(old + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str):
    return json.loads(read_text(path))


def write_json(path: str, obj, *, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in read_text(path).split("\n") if line.strip()]


def write_jsonl(path: str, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, rows) -> None:
    append_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def copy_dir(src: str, dst: str) -> None:
    """Copies local directory `src` into `dst` (a path or URL), file by file, streamed."""
    for root, _, names in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src)) if root != src else dst
        makedirs(out)
        for name in sorted(names):
            with open(os.path.join(root, name), "rb") as fin:
                with epath.Path(os.path.join(out, name)).open("wb") as fout:
                    shutil.copyfileobj(fin, fout, 64 << 20)  # shards are GBs
