"""Data: SFT examples, prompt sets, disjoint splits, and fixed-shape batches.

Owns reading and validating the JSONL files the loops train on, turning them into token ids
with loss masks, and cutting them into batches whose order is a pure function of
`(seed, epoch, batch index)`, so a resumed run continues from a saved position without
replaying the data.

SFT JSONL, one example per line (`read_sft_jsonl`):
  {"id": str, "prompt": str, "segments": [{"text": str, "train": bool}, ...]}
  {"id": str, "prompt": str, "completion": str}        (one trained segment)
The prompt is rendered with the tokenizer's chat template (user turn, optional system prompt,
the assistant header) and is never trained; each segment's text is encoded on its own and
appended with its `train` flag; the end-of-turn id (`tokenizer.stop_ids[0]`, `<|im_end|>` for
SmolLM2) closes the answer and is trained. Segments serve QA-LIGN's reflection format: the
draft is trained, the inserted rubric critique is not, `<Think>` + revision is trained.

Prompt sets (`read_prompt_set`): the shared schema `{"id", "prompt", "category", "label"}`
(extra fields kept), split into disjoint named parts by `split_by_hash`.

Multi-host: `load_sft_examples` reads and validates every row on every process (cheap) but
tokenizes an example only when a batch row needs it (`SFTExamples`), and `SFTBatches` builds
only the rows a process's devices hold, so each process tokenizes its share of the data.
The batch order depends only on `(seed, epoch, batch index)`, not on the process count.

Batches (`SFTBatches`): rows of `seq_len` tokens, right-padded (position -1, loss mask 0).
Packing several examples into one row is deliberately absent: the model masks attention by
positions only (a key is visible when its position is <= the query's, within a row), so two
examples in one row would attend to each other; packing needs a block-causal mask the model
does not have. Padding costs compute, not correctness.

Invariants: every error about a file names `path:line` and the field; an example that would
train on nothing is an error, never silently skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qalign_jax import files

OVERFLOW_MODES = ("truncate", "error")


# ---------------------------------------------------------------------------------------------
# SFT examples.


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenized example.

    Attributes:
      id: the example's id from the file.
      tokens: [L] int32 ids: chat-template prompt, segments, end of turn.
      train: [L] bool, True where the token is a training target (predicted from the tokens
        before it); False on the prompt and on untrained segments.
      truncated: the tail was dropped to fit `seq_len`.
    """

    id: str
    tokens: np.ndarray
    train: np.ndarray
    truncated: bool = False


def _check_overflow_mode(on_overflow: str) -> None:
    if on_overflow not in OVERFLOW_MODES:
        raise ValueError(f"data.on_overflow={on_overflow!r}; use one of {OVERFLOW_MODES}.")


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def read_json_objects(path: str):
    """Yields (`path:line`, object) per non-blank line of a JSONL file; errors name the line."""
    for n, line in enumerate(files.read_text(path).split("\n"), 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(where, f"not valid JSON ({e.msg} at column {e.colno}).")
        if not isinstance(row, dict):
            _fail(where, f"expected a JSON object, got {type(row).__name__}.")
        yield where, row


def read_sft_jsonl(path: str) -> list[tuple[str, dict]]:
    """Validated rows of an SFT file, each as (`path:line`, row with `segments`).

    A `completion` row becomes one trained segment. Raises ValueError naming `path:line` and
    the field for: a line that is not a JSON object, a missing or non-string `id`/`prompt`,
    neither `segments` nor `completion`, a malformed segment, no non-empty trained text, or a
    repeated id.
    """
    rows, seen = [], {}
    for where, row in read_json_objects(path):
        for field in ("id", "prompt"):
            if field not in row:
                _fail(where, f"missing field {field!r} (each line needs 'id' and 'prompt').")
            if not isinstance(row[field], str):
                _fail(where, f"field {field!r} must be a string, got {row[field]!r:.60}.")
        if not row["prompt"].strip():
            _fail(where, f"field 'prompt' of id {row['id']!r} is empty.")
        if row["id"] in seen:
            _fail(where, f"id {row['id']!r} repeats the id on line {seen[row['id']]}.")
        seen[row["id"]] = where.rsplit(":", 1)[1]
        if "segments" in row:
            segments = row["segments"]
            if not isinstance(segments, list) or not segments:
                _fail(where, "field 'segments' must be a non-empty list of {text, train}.")
            for i, seg in enumerate(segments):
                ok = isinstance(seg, dict) and isinstance(seg.get("text"), str)
                if not ok or not isinstance(seg.get("train"), bool):
                    _fail(
                        where,
                        f"segments[{i}] must be {{'text': str, 'train': bool}}, got {seg!r:.80}.",
                    )
        elif "completion" in row:
            if not isinstance(row["completion"], str):
                _fail(where, "field 'completion' must be a string.")
            segments = [{"text": row["completion"], "train": True}]
        else:
            _fail(where, "missing field 'segments' (or 'completion'): nothing to train on.")
        if not any(seg["train"] and seg["text"].strip() for seg in segments):
            field = "segments" if "segments" in row else "completion"
            _fail(
                where,
                f"empty response: field {field!r} of id {row['id']!r} has no non-empty "
                "trained text.",
            )
        rows.append((where, {"id": row["id"], "prompt": row["prompt"], "segments": segments}))
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


def tokenize_sft(
    row: dict,
    tokenizer,
    *,
    seq_len: int,
    on_overflow: str,
    system_prompt: str = "",
    where: str = "",
) -> SFTExample:
    """Token ids and train flags of one validated row (see the module docstring).

    Args:
      row: `{"id", "prompt", "segments"}` from `read_sft_jsonl`.
      tokenizer: a `models.tokenizer.Tokenizer` (`apply_chat_template`, `encode`, `stop_ids`).
      seq_len: the most tokens an example may have (a batch row's length).
      on_overflow: 'truncate' drops the tail (the prompt is kept whole), 'error' raises.
      system_prompt: '' = the chat template's default.
      where: `path:line` for messages.

    Returns:
      An `SFTExample` of at most `seq_len` tokens with at least one trained target.
    """
    _check_overflow_mode(on_overflow)
    where = where or f"id {row['id']!r}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": row["prompt"]})
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    flags = [False] * len(ids)
    prompt_len = len(ids)
    for seg in row["segments"]:
        seg_ids = tokenizer.encode(seg["text"])
        ids += seg_ids
        flags += [seg["train"]] * len(seg_ids)
    ids.append(tokenizer.stop_ids[0])  # end of turn: the model must learn to stop
    flags.append(True)
    truncated = False
    if len(ids) > seq_len:
        if on_overflow == "error":
            _fail(
                where,
                f"id {row['id']!r} has {len(ids)} tokens (prompt {prompt_len}), more than "
                f"data.seq_len={seq_len}; raise data.seq_len, shorten the example, or set "
                "data.on_overflow='truncate' to drop the tail.",
            )
        if prompt_len >= seq_len:
            _fail(
                where,
                f"id {row['id']!r}: the prompt alone has {prompt_len} tokens, not fewer than "
                f"data.seq_len={seq_len}, so truncation would leave nothing to train on; raise "
                "data.seq_len or drop the example.",
            )
        ids, flags, truncated = ids[:seq_len], flags[:seq_len], True
    if not any(flags):
        _fail(where, f"id {row['id']!r} has no trained token left after truncation.")
    return SFTExample(
        id=row["id"],
        tokens=np.asarray(ids, np.int32),
        train=np.asarray(flags, bool),
        truncated=truncated,
    )


class SFTExamples(Sequence):
    """Validated SFT rows, each tokenized (`tokenize_sft`) on first access and kept.

    Reading every row is cheap; tokenizing is not, and on a pod each process tokenizes only
    the examples its batch rows hold (`SFTBatches.batch_at(..., rows=)`).
    """

    def __init__(self, rows: list[tuple[str, dict]], tokenizer, **tokenize_kw):
        _check_overflow_mode(tokenize_kw.get("on_overflow"))  # now, not at the first example
        self.rows = rows
        self.tokenizer = tokenizer
        self.tokenize_kw = tokenize_kw
        self._done: dict[int, SFTExample] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SFTExample:
        if i not in self._done:
            where, row = self.rows[i]
            self._done[i] = tokenize_sft(row, self.tokenizer, where=where, **self.tokenize_kw)
        return self._done[i]

    @property
    def num_tokenized(self) -> int:
        return len(self._done)

    @property
    def num_truncated(self) -> int:
        """Truncated examples among those tokenized so far."""
        return sum(ex.truncated for ex in self._done.values())

    def split(self, sizes: dict[str, int | float], seed: int) -> dict[str, SFTExamples]:
        """`split_by_hash` on the ids, without tokenizing anything."""
        parts = split_by_hash(self.rows, sizes, seed, key=lambda r: r[1]["id"])
        return {k: SFTExamples(v, self.tokenizer, **self.tokenize_kw) for k, v in parts.items()}

    def fingerprint(self) -> str:
        """A short hash of the rows, the tokenization settings and the tokenizer (the token ids
        of a probe conversation): a resumed run checks that it sees the same data."""
        h = hashlib.sha256(json.dumps([row for _, row in self.rows], sort_keys=True).encode())
        h.update(json.dumps(self.tokenize_kw, sort_keys=True).encode())
        probe = {"id": "probe", "prompt": "Hi?", "segments": [{"text": "Hello.", "train": True}]}
        h.update(tokenize_sft(probe, self.tokenizer, **self.tokenize_kw).tokens.tobytes())
        return h.hexdigest()[:16]


def load_sft_examples(
    path: str,
    tokenizer,
    *,
    seq_len: int,
    on_overflow: str,
    system_prompt: str = "",
    max_examples: int = 0,
) -> SFTExamples:
    """`read_sft_jsonl` (the first `max_examples` rows if > 0), tokenized on first access.

    `path` may name several files, comma-separated ("a.jsonl,b.jsonl": e.g. two rounds of
    rejection sampling): their rows in that order; an id may appear in only one of them.
    """
    rows, first = [], {}
    for part in [p.strip() for p in path.split(",") if p.strip()]:
        for where, row in read_sft_jsonl(part):
            if row["id"] in first:
                _fail(where, f"id {row['id']!r} is also in {first[row['id']]}.")
            first[row["id"]] = where
            rows.append((where, row))
    if max_examples > 0:
        rows = rows[:max_examples]
    return SFTExamples(
        rows, tokenizer, seq_len=seq_len, on_overflow=on_overflow, system_prompt=system_prompt
    )


# ---------------------------------------------------------------------------------------------
# Prompt sets and splits.


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt of the shared schema; `extra` keeps the data set's own fields."""

    id: str
    prompt: str
    category: str | None
    label: str | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_prompt_set(path: str) -> list[PromptRecord]:
    """Rows of a prompt-set JSONL (`id, prompt, category, label`); errors name `path:line`."""
    records, seen = [], {}
    for where, row in read_json_objects(path):
        for field in ("id", "prompt"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                _fail(where, f"field {field!r} must be a non-empty string.")
        for field in ("category", "label"):
            if row.get(field) is not None and not isinstance(row[field], str):
                _fail(where, f"field {field!r} must be a string or null.")
        if row["id"] in seen:
            _fail(where, f"id {row['id']!r} repeats the id on line {seen[row['id']]}.")
        seen[row["id"]] = where.rsplit(":", 1)[1]
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "category", "label")}
        records.append(
            PromptRecord(row["id"], row["prompt"], row.get("category"), row.get("label"), extra)
        )
    if not records:
        raise ValueError(f"{path} holds no prompts.")
    return records


SOURCE_OPTIONS = ("label", "holdout", "holdout_seed")


def select_prompts(sources, seed: int) -> list[PromptRecord]:
    """The prompt mix: `count` prompts (or all, -1) of each (path, count[, options]) source.

    options (a dict, optional):
      label: keep only rows with this `label` (e.g. 'benign' from XSTest's mixed file).
      holdout: leave out the `holdout` rows that an eval suite of that count reads from the same
        (label-filtered) rows: the first `holdout` by `split_by_hash(holdout_seed)`, exactly as
        `eval_suites.read_suite` picks them, so a run can train on a set's other prompts.
      holdout_seed: the eval's seed (default 0, the eval configs' seed).
    """
    if not sources:
        raise ValueError(
            "config.prime.sources is empty; give ((prompt-set JSONL, count), ...), e.g. "
            "(('configs/data/prime_prompts.jsonl', -1),)."
        )
    chosen, seen = [], {}
    for entry in sources:
        if len(entry) not in (2, 3) or not isinstance(entry[1], int):
            raise ValueError(
                f"prompt source {entry!r}; use (path, count) or (path, count, options dict)."
            )
        path, count = entry[:2]
        records = _filtered_source(path, entry[2] if len(entry) == 3 else {})
        if count != -1 and not 0 < count <= len(records):
            raise ValueError(f"{path} has {len(records)} usable prompts; cannot take {count}.")
        part = records if count == -1 else split_by_hash(records, {"p": count}, seed)["p"]
        for r in part:
            if r.id in seen:
                raise ValueError(f"prompt id {r.id!r} is in both {seen[r.id]} and {path}.")
            seen[r.id] = path
        chosen += part
    return chosen


def _filtered_source(path: str, options) -> list[PromptRecord]:
    """A source's rows after its options (`select_prompts`)."""
    if not isinstance(options, dict) or set(options) - set(SOURCE_OPTIONS):
        raise ValueError(
            f"prompt source {path}: options {options!r}; use a dict with keys among "
            f"{SOURCE_OPTIONS}."
        )
    records = read_prompt_set(path)
    if "label" in options:
        records = [r for r in records if r.label == options["label"]]
        if not records:
            raise ValueError(f"{path} has no rows with label {options['label']!r}.")
    holdout = options.get("holdout", 0)
    if holdout:
        if not 0 < holdout < len(records):
            raise ValueError(
                f"{path}: holdout={holdout} must leave some of its {len(records)} rows to train on."
            )
        sizes = {"held": holdout, "rest": -1}
        records = split_by_hash(records, sizes, options.get("holdout_seed", 0))["rest"]
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


def check_label_mix(records, mix, per_step: int) -> dict[str, list]:
    """The prompts by label for `prompts_for_step_by_label(mix=mix)`, checked: the counts are
    whole numbers summing to `per_step`, every label of the prompts is in `mix` (0 leaves its
    prompts out) and each label drawn from has prompts."""
    mix = dict(mix.items())
    by_label = {label: [] for label in mix}
    for r in records:
        label = r.label if r.label is not None else "none"
        if label not in by_label:
            raise ValueError(
                f"grpo.label_mix={mix} has no count for label {label!r} (prompt {r.id!r}); "
                f"give every label of the prompts a count (0 leaves them out; 'none' = no label)."
            )
        by_label[label].append(r)
    counts = list(mix.values())
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise ValueError(f"grpo.label_mix={mix}: counts must be whole numbers >= 0.")
    if sum(counts) != per_step:
        raise ValueError(
            f"grpo.label_mix={mix} draws {sum(counts)} prompts per step; the counts must sum "
            f"to grpo.prompts_per_step={per_step}."
        )
    empty = [label for label, n in mix.items() if n and not by_label[label]]
    if empty:
        raise ValueError(f"grpo.label_mix={mix}: no prompts have label(s) {empty}.")
    short = {label: len(by_label[label]) for label, n in mix.items() if n > len(by_label[label])}
    if short:
        raise ValueError(
            f"grpo.label_mix={mix} draws more prompts of a label per step than there are "
            f"(prompts per label: {short}), so a step would repeat a prompt; lower its count "
            "or add prompts of that label."
        )
    return by_label


def prompts_for_step_by_label(records, step: int, per_step: int, seed: int, mix) -> list:
    """`mix[label]` prompts of each label per step, each label its own `prompts_for_step`
    stream (seeded by seed and the label's name, so neither the order of `mix` nor another
    label's count changes it): every step holds the same harmful-to-benign ratio, where a
    uniform draw gives 6 benign and 2 harmful in one step and the reverse in the next."""
    by_label = check_label_mix(records, mix, per_step)
    out = []
    for label, n in mix.items():
        if n:
            stream = seed * 1009 + zlib.crc32(label.encode())
            out += prompts_for_step(by_label[label], step, n, stream)
    return out


def draw_prompts(records, step: int, per_step: int, seed: int, label_mix=None) -> list:
    """The `per_step` prompts of `step`: a uniform draw (`prompts_for_step`), or `label_mix`
    of each label (`prompts_for_step_by_label`) when one is given (`grpo.label_mix`)."""
    if label_mix:
        return prompts_for_step_by_label(records, step, per_step, seed, label_mix)
    return prompts_for_step(records, step, per_step, seed)


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
            f"{len(long)} prompts exceed max_prompt_tokens={max_tokens} (e.g. "
            f"{long[:3]}); raise it or set on_long_prompt='drop'."
        )
    return out


def split_by_hash(
    items: Sequence,
    sizes: dict[str, int | float],
    seed: int,
    key: Callable[[Any], str] = lambda item: item.id,
) -> dict[str, list]:
    """Disjoint named parts of `items`, deterministic in `(seed, ids)`, not in file order.

    Items are ordered by sha256 of `"{seed}:{id}"` and cut into consecutive parts in the order
    of `sizes`; an item's part depends only on the ids present, so reordering the file changes
    nothing. Within a part, the file order is kept.

    Args:
      items: records with unique ids.
      sizes: part name -> a count (int >= 0), a fraction of `len(items)` (float in (0, 1]),
        or -1 for everything left (at most one, and last).
      seed: a different seed gives a different split.
      key: the id of an item.

    Returns:
      {name: [items]} for every name in `sizes`.
    """
    ids = [key(item) for item in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"split_by_hash: id {dup!r} occurs more than once; ids must be unique.")
    counts = {}
    for name, size in sizes.items():
        if size == -1:
            counts[name] = -1
        elif isinstance(size, float):
            if not 0 < size <= 1:
                raise ValueError(f"split {name!r}: fraction {size} must be in (0, 1].")
            counts[name] = int(round(size * len(items)))
        elif isinstance(size, int) and size >= 0:
            counts[name] = size
        else:
            raise ValueError(
                f"split {name!r}: size {size!r} must be an int >= 0, a fraction or -1."
            )
    rest = [name for name, c in counts.items() if c == -1]
    if len(rest) > 1 or (rest and list(counts)[-1] != rest[0]):
        raise ValueError(f"split sizes {sizes}: -1 ('the rest') may appear once, on the last part.")
    fixed = sum(c for c in counts.values() if c != -1)
    if fixed > len(items):
        raise ValueError(f"split sizes {sizes} need {fixed} items but there are {len(items)}.")
    order = sorted(
        range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest()
    )
    parts, start = {}, 0
    for name, count in counts.items():
        count = len(items) - start if count == -1 else count
        chosen = sorted(order[start : start + count])
        parts[name] = [items[i] for i in chosen]
        start += count
    return parts


# ---------------------------------------------------------------------------------------------
# Batches.

ROW_WIDTHS = ("batch", "seq_len")


def length_bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to 2^k or 1.5 * 2^k: shapes (and compiles) repeat, padding <= 33%."""
    n = max(n, minimum)
    p = 1 << (n - 1).bit_length()
    return 3 * p // 4 if n <= 3 * p // 4 and p >= 4 else p


def batch_width(lengths, seq_len: int, row_width: str = "batch") -> int:
    """The width of a batch's rows: `seq_len` (row_width='seq_len'), or the batch's longest
    row (`lengths`, tokens) rounded up by `length_bucket` (at least 64, at most seq_len): rows as
    wide as the batch needs, one train-step compile per width, and the widths are few
    (64, 96, 128, 192, ...)."""
    if row_width not in ROW_WIDTHS:
        raise ValueError(f"row_width={row_width!r}; use one of {ROW_WIDTHS}.")
    if row_width == "seq_len":
        return seq_len
    return min(seq_len, length_bucket(max(lengths, default=1), minimum=64))


def make_rows(
    examples: Sequence[SFTExample | None], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded model rows of the examples, shifted for next-token prediction; None gives
    an empty row (all padding), which fills up an epoch's last batch.

    Returns arrays of shape [len(examples), seq_len]:
      tokens: int32 input ids, `pad_id` on padding.
      positions: int32 0.. over the example, -1 on padding (the model masks by position).
      targets: int32 the next token (`tokens` shifted left by one), 0 where there is none.
      loss_mask: float32 1 where the target is trained (the target's own train flag).
    """
    n = len(examples)
    rows = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "positions": np.full((n, seq_len), -1, np.int32),
        "targets": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
    }
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        length = len(ex.tokens)
        if length > seq_len:
            raise ValueError(f"example {ex.id!r} has {length} tokens > seq_len={seq_len}.")
        rows["tokens"][i, :length] = ex.tokens
        rows["positions"][i, :length] = np.arange(length)
        rows["targets"][i, : length - 1] = ex.tokens[1:]
        rows["loss_mask"][i, : length - 1] = ex.train[1:]
    return rows


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the next batch starts: `index` counts batches within `epoch`."""

    epoch: int = 0
    index: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_json(cls, d: dict) -> DataPosition:
        return cls(int(d["epoch"]), int(d["index"]))


class SFTBatches:
    """Epochs of shuffled, fixed-shape SFT batches, addressable by `DataPosition`.

    Every epoch visits every example once, in the order `permutation(seed, epoch)`; the last
    batch of an epoch is filled up with empty rows (positions -1, loss mask 0) rather than
    dropping examples, so an epoch is `ceil(n / global_batch_size)` steps. A batch holds
    `grad_accum_steps` micro-batches: arrays [A, global_batch_size / A, W], W = seq_len or,
    with row_width='batch', the batch's longest example bucketed (`batch_width`; the same W in
    every process: it is taken over the whole batch).

    `next()` returns the batch at `position` and advances it; `position` is saved with each
    checkpoint and set directly on resume (nothing is replayed). `rows` (a slice of the
    micro-batch axis) builds only those rows of every micro-batch: a process's share, whose
    examples alone get tokenized with row_width='seq_len' (with 'batch' every process reads
    the lengths of the whole batch, tokenizing its examples once: cheap next to a step).
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        *,
        seq_len: int,
        pad_id: int,
        global_batch_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        row_width: str = "batch",
    ):
        if not examples:
            raise ValueError("SFTBatches: no examples.")
        if global_batch_size % grad_accum_steps:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"grad_accum_steps={grad_accum_steps}; each step splits the batch into that "
                "many equal micro-batches."
            )
        batch_width((), seq_len, row_width)  # checks the option
        self.examples = examples
        self.seq_len = seq_len
        self.row_width = row_width
        self.pad_id = pad_id
        self.num_examples = len(examples)
        self.global_batch_size = global_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = math.ceil(self.num_examples / global_batch_size)
        self.position = DataPosition()

    def order(self, epoch: int) -> np.ndarray:
        """[n] the example indices of `epoch`, in visiting order."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def batch_at(self, position: DataPosition, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The batch at `position`: arrays [A, B / A, W] (A = grad_accum_steps), or
        [A, len(rows), W] with `rows` of each micro-batch."""
        if not 0 <= position.index < self.steps_per_epoch:
            raise ValueError(
                f"data position {position} is outside an epoch of {self.steps_per_epoch} batches."
            )
        everyone = self._chosen(position, None)
        width = self.seq_len
        if self.row_width == "batch":  # every process's rows: its examples get tokenized
            lengths = [len(self.examples[i].tokens) for i in everyone.ravel() if i >= 0]
            width = batch_width(lengths, self.seq_len)
        chosen = everyone if rows is None else everyone[:, rows]
        made = make_rows([None if i < 0 else self.examples[i] for i in chosen.ravel()],
                         width, self.pad_id)  # fmt: skip
        return {name: arr.reshape(*chosen.shape, -1) for name, arr in made.items()}

    def _chosen(self, position: DataPosition, rows: slice | None) -> np.ndarray:
        """[A, rows] example indices of the batch at `position`; -1 for an empty row (the
        epoch's last batch is filled up with them)."""
        b, a = self.global_batch_size, self.grad_accum_steps
        chosen = np.full(b, -1)
        picked = self.order(position.epoch)[position.index * b : (position.index + 1) * b]
        chosen[: len(picked)] = picked
        return chosen.reshape(a, b // a)[:, slice(None) if rows is None else rows]

    def next(self, rows: slice | None = None) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.position, rows)
        index = self.position.index + 1
        if index == self.steps_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        else:
            self.position = DataPosition(self.position.epoch, index)
        return batch

    def tokenize_epoch(self, epoch: int, rows: slice | None = None) -> None:
        """Tokenizes now the examples that `rows` of `epoch`'s batches hold, so that a bad
        example stops the run before training, not hours into it."""
        for index in range(self.steps_per_epoch):
            for i in self._chosen(DataPosition(epoch, index), rows).ravel():
                if i >= 0:
                    self.examples[i]  # tokenizes it (SFTExamples)

    def position_after(self, steps: int) -> DataPosition:
        """The position after `steps` batches from the start (to check a restored position)."""
        return DataPosition(steps // self.steps_per_epoch, steps % self.steps_per_epoch)

    def all_batches(self, rows: slice | None = None) -> list[dict[str, np.ndarray]]:
        """One pass over the examples in order (evaluation)."""
        return [self.batch_at(DataPosition(0, i), rows) for i in range(self.steps_per_epoch)]
