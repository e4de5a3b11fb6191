"""The judge cache: verdicts remembered across `judge.score_pairs` calls and, optionally, runs.

What is stored is a pair's *record*: every question's option probabilities, option mass,
generated text and applicability, whether the context was truncated, and the seconds it took.
The pooled `rewards.Scores` are recomputed from the record on every read, so ablations of the
reward config (pooling, scales, gates) replay the same judge answers.

A record is keyed by its namespace (`namespace`) and the pair (`pair_key`). The namespace is a
hash of everything that shapes the answers:
- the judge weights (`weights_fingerprint`: each parameter leaf's path, shape and dtype plus
  16 values sampled at fixed, evenly spaced flat positions; cheap for an 8B model, and any
  training step moves every sampled value; a full hash would read every weight);
- the rubric (questions, options, applicability; its free-form `header` is left out);
- the judge template: the tokenized system prompt and chat template head, each option set's
  header and each question's suffix, and `TEMPLATE_VERSION` (bump it when the readout changes);
- the judge config fields that change answers (mode, context budget, truncation, skipping,
  generation settings). Batch sizes are left out: logit scores do not depend on them.

Replays are exact: records hold Python floats converted from the computed float32/float64
values (JSON round-trips them bit for bit), and a fresh verdict is built from the record
whether it was just computed or replayed.

On disk (`cache_dir`, a local path or `gs://` through `files`): `<cache_dir>/<namespace>/`
holds JSONL shards, one written per call that computed new pairs (objects cannot be
appended to), `{"key": ..., "record": ...}` per line; a judge loads its namespace's shards the
first time it looks something up. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import uuid

import jax
import numpy as np

from qalign_jax import files

TEMPLATE_VERSION = 1  # bump when the judge's readout changes in a way the namespace misses
_SAMPLES_PER_LEAF = 16


@dataclasses.dataclass
class CacheStats:
    """Counts since the judge was built (the GRPO loop logs `metrics()` per step)."""

    hits: int = 0  # pairs replayed from an earlier call or from cache_dir
    duplicates: int = 0  # repeats of a pair inside one call (computed once)
    misses: int = 0  # pairs computed
    saved_s: float = 0.0  # what the hits and duplicates cost when they were computed
    computed_s: float = 0.0  # judge seconds spent computing the misses

    def hit_rate(self) -> float:
        total = self.hits + self.duplicates + self.misses
        return (self.hits + self.duplicates) / total if total else 0.0

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        return {
            f"{prefix}cache_hit_rate": self.hit_rate(),
            f"{prefix}cache_hits": float(self.hits + self.duplicates),
            f"{prefix}cache_saved_s": self.saved_s,
        }


def weights_fingerprint(params) -> str:
    """A cheap, deterministic hash of a parameter pytree (see the module docstring)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(leaf.shape)
        h.update(f"{jax.tree_util.keystr(path)}|{shape}|{leaf.dtype};".encode())
        size = int(np.prod(shape))
        if size == 0:
            continue
        flat = np.unique(np.linspace(0, size - 1, _SAMPLES_PER_LEAF).astype(np.int64))
        index = np.unravel_index(flat, shape) if shape else ()
        values = np.asarray(jax.device_get(leaf[index] if shape else leaf), np.float32)
        h.update(values.tobytes())
    return h.hexdigest()[:20]


def namespace(weights: str, rubric, template_ids: list, answer_cfg: dict) -> str:
    """The hash that every record of one (weights, rubric, template, config) shares."""
    rubric_fields = {f.name: getattr(rubric, f.name) for f in dataclasses.fields(rubric)}
    rubric_fields.pop("header", None)
    blob = json.dumps(
        {
            "weights": weights,
            "rubric": json.dumps(rubric_fields, default=_jsonable, sort_keys=True),
            "template": template_ids,
            "template_version": TEMPLATE_VERSION,
            "config": answer_cfg,
        },
        sort_keys=True,
        default=_jsonable,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def pair_key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:32]


def make_record(answers: dict, truncated: bool, seconds: float) -> dict:
    """answers: question id -> (probs array or None, option mass, text, applicable)."""
    return {
        "truncated": bool(truncated),
        "seconds": float(seconds),
        "answers": {
            qid: {
                "probs": None if p is None else [float(x) for x in p],
                "dtype": None if p is None else np.asarray(p).dtype.name,
                "mass": float(mass),
                "text": text,
                "applicable": bool(applicable),
            }
            for qid, (p, mass, text, applicable) in answers.items()
        },
    }


def record_probs(answer: dict) -> np.ndarray | None:
    """A record answer's probabilities as the array they were computed as."""
    return None if answer["probs"] is None else np.asarray(answer["probs"], answer["dtype"])


class VerdictCache:
    """Records by pair key for one namespace; in memory (the newest `max_entries`) and in
    `cache_dir` when set. `use(ns)` switches namespace (and reloads from disk)."""

    def __init__(self, max_entries: int, cache_dir: str = ""):
        self.max_entries, self.cache_dir = max_entries, cache_dir
        self.ns: str | None = None
        self.records: dict[str, dict] = {}
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shards = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def use(self, ns: str) -> None:
        if ns == self.ns:
            return
        self.ns, self.records = ns, {}
        if not self.cache_dir:
            return
        folder = os.path.join(self.cache_dir, ns)
        if not files.isdir(folder):
            return
        for name in sorted(files.listdir(folder)):
            if name.endswith(".jsonl"):
                for row in files.read_jsonl(os.path.join(folder, name)):
                    self._remember(row["key"], row["record"])

    def get(self, key: str) -> dict | None:
        return self.records.get(key) if self.enabled else None

    def put(self, items: list[tuple[str, dict]]) -> None:
        if not self.enabled or not items:
            return
        for key, record in items:
            self._remember(key, record)
        if self.cache_dir and jax.process_index() == 0:
            folder = os.path.join(self.cache_dir, self.ns)
            files.makedirs(folder)
            self._shards += 1
            path = os.path.join(folder, f"{self._writer}-{self._shards:06d}.jsonl")
            files.write_jsonl(path, [{"key": k, "record": r} for k, r in items])

    def _remember(self, key: str, record: dict) -> None:
        self.records.pop(key, None)
        self.records[key] = record
        while len(self.records) > self.max_entries:
            del self.records[next(iter(self.records))]  # the oldest
