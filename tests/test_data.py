"""data.py, losses.py and metrics.py: host-side logic checked with hand arithmetic.

A character-level fake tokenizer makes token counts and masks countable on paper; one test
uses the real embedded SmolLM2 tokenizer for the chat-template format.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import data, losses, metrics


class CharTokenizer:
    """One id per character (3 + code point % 97); the chat template is [1] + user text + [1]."""

    stop_ids = (2,)
    pad_id = 0

    def encode(self, text):
        return [3 + ord(c) % 97 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = [1]
        for m in messages:
            ids += self.encode(m["content"])
        return ids + [1]


TOK = CharTokenizer()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def seg(text, train):
    return {"text": text, "train": train}


def example(id_="a", prompt="ab", segments=(("cd", True), ("e", False), ("f", True))):
    return {"id": id_, "prompt": prompt, "segments": [seg(t, tr) for t, tr in segments]}


# ---------------------------------------------------------------------------------------------
# SFT examples.


def test_segments_are_masked_by_their_train_flag_and_end_of_turn_is_trained():
    ex = data.tokenize_sft(example(), TOK, seq_len=32, on_overflow="error")
    # [1] a b [1] | c d | e | f | <end of turn 2>
    assert ex.tokens.tolist() == [1, *TOK.encode("ab"), 1, *TOK.encode("cdef"), 2]
    assert ex.train.astype(int).tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1]
    rows = data.make_rows([ex], seq_len=12, pad_id=0)
    n = len(ex.tokens)  # 9
    assert rows["positions"][0].tolist() == list(range(n)) + [-1] * 3
    assert rows["tokens"][0, n:].tolist() == [0, 0, 0]
    # Position i predicts token i + 1 and is trained iff token i + 1 is.
    assert rows["targets"][0, : n - 1].tolist() == ex.tokens[1:].tolist()
    assert rows["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def test_completion_rows_are_one_trained_segment(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "x", "prompt": "hi", "completion": "yo"}])
    ((where, row),) = data.read_sft_jsonl(path)
    assert where == f"{path}:1"
    assert row["segments"] == [{"text": "yo", "train": True}]


def test_several_train_files_are_read_in_order_and_ids_stay_unique(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [example("x"), example("y")])
    b = write_jsonl(tmp_path / "b.jsonl", [example("z")])
    examples = data.load_sft_examples(f"{a},{b}", TOK, seq_len=32, on_overflow="error")
    assert [examples[i].id for i in range(3)] == ["x", "y", "z"]
    c = write_jsonl(tmp_path / "c.jsonl", [example("y")])
    with pytest.raises(ValueError, match=r"c.jsonl:1: id 'y' is also in .*a.jsonl:2"):
        data.load_sft_examples(f"{a},{c}", TOK, seq_len=32, on_overflow="error")


def test_system_prompt_goes_into_the_template():
    plain = data.tokenize_sft(example(), TOK, seq_len=32, on_overflow="error")
    with_sys = data.tokenize_sft(example(), TOK, seq_len=32, on_overflow="error", system_prompt="S")
    assert len(with_sys.tokens) == len(plain.tokens) + 1


def test_truncate_drops_the_tail_and_keeps_the_prompt():
    ex = data.tokenize_sft(example(), TOK, seq_len=6, on_overflow="truncate")
    assert ex.truncated and len(ex.tokens) == 6
    assert ex.train.astype(int).tolist() == [0, 0, 0, 0, 1, 1]


def test_overflow_error_names_the_id_and_length():
    with pytest.raises(
        ValueError, match=r"f.jsonl:3: id 'a' has 9 tokens \(prompt 4\), more than data.seq_len=6"
    ):
        data.tokenize_sft(example(), TOK, seq_len=6, on_overflow="error", where="f.jsonl:3")


def test_truncation_that_leaves_no_answer_is_an_error():
    with pytest.raises(ValueError, match="the prompt alone has 4 tokens"):
        data.tokenize_sft(example(), TOK, seq_len=4, on_overflow="truncate")
    # The only trained text lies past the cut.
    late = example(segments=(("xyz", False), ("w", True)))
    with pytest.raises(ValueError, match="no trained token left after truncation"):
        data.tokenize_sft(late, TOK, seq_len=6, on_overflow="truncate")


def test_unknown_overflow_mode():
    with pytest.raises(ValueError, match="data.on_overflow='drop'"):
        data.tokenize_sft(example(), TOK, seq_len=6, on_overflow="drop")


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "p", "completion": "c"}', r":2: missing field 'id'"),
        ('{"id": "b", "completion": "c"}', r":2: missing field 'prompt'"),
        ('{"id": "b", "prompt": "p"}', r":2: missing field 'segments' \(or 'completion'\)"),
        (
            '{"id": "b", "prompt": "p", "completion": "  "}',
            r":2: empty response: field 'completion' of id 'b'",
        ),
        (
            '{"id": "b", "prompt": "p", "segments": [{"text": "x", "train": false}]}',
            r":2: empty response: field 'segments'",
        ),
        ('{"id": "b", "prompt": "p", "segments": [{"text": "x"}]}', r":2: segments\[0\] must be"),
        (
            '{"id": "b", "prompt": "p", "segments": []}',
            r":2: field 'segments' must be a non-empty list",
        ),
        ('{"id": "b", "prompt": "", "completion": "c"}', r":2: field 'prompt' of id 'b' is empty"),
        ('{"id": 7, "prompt": "p", "completion": "c"}', r":2: field 'id' must be a string"),
        ('{"id": "a", "prompt": "p", "completion": "c"}', r":2: id 'a' repeats the id on line 1"),
        ('{"id": "b", "prompt": "p",', r":2: not valid JSON"),
        ('["id", "prompt"]', r":2: expected a JSON object"),
    ],
)
def test_bad_sft_rows_name_file_line_and_field(tmp_path, line, match):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"id": "a", "prompt": "p", "completion": "c"}, line]
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl" + match):
        data.read_sft_jsonl(path)


def test_real_tokenizer_reflection_format():
    from qalign_jax.models import load

    tok = load.load_tokenizer("embedded")
    row = example(
        prompt="Hi?",
        segments=(("Draft.", True), (" [findings] ", False), ("<Think>t</Think> Better.", True)),
    )
    ex = data.tokenize_sft(row, tok, seq_len=256, on_overflow="error")
    prompt = tok.decode(ex.tokens[~ex.train].tolist(), skip_special_tokens=False)
    trained = tok.decode(ex.tokens[ex.train].tolist(), skip_special_tokens=False)
    assert prompt.endswith("Hi?<|im_end|>\n<|im_start|>assistant\n [findings] ")
    assert trained == "Draft.<Think>t</Think> Better.<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Splits and prompt sets.


def test_split_by_hash_is_disjoint_deterministic_and_order_free(tmp_path):
    rows = [
        {"id": f"p{i}", "prompt": f"q{i}", "category": None, "label": "harmful"} for i in range(50)
    ]
    records = data.read_prompt_set(write_jsonl(tmp_path / "p.jsonl", rows))
    parts = data.split_by_hash(records, {"prime": 10, "grpo": 0.5, "eval": -1}, seed=0)
    assert [len(parts[k]) for k in ("prime", "grpo", "eval")] == [10, 25, 15]
    ids = [r.id for part in parts.values() for r in part]
    assert sorted(ids) == sorted(r.id for r in records)  # disjoint and complete
    again = data.split_by_hash(records[::-1], {"prime": 10, "grpo": 0.5, "eval": -1}, seed=0)
    assert {r.id for r in again["prime"]} == {r.id for r in parts["prime"]}
    other = data.split_by_hash(records, {"prime": 10, "grpo": 0.5, "eval": -1}, seed=1)
    assert {r.id for r in other["prime"]} != {r.id for r in parts["prime"]}
    with pytest.raises(ValueError, match="need 60 items but there are 50"):
        data.split_by_hash(records, {"a": 30, "b": 30}, seed=0)
    with pytest.raises(ValueError, match="-1"):
        data.split_by_hash(records, {"a": -1, "b": 3}, seed=0)


def test_source_options_keep_a_label_and_leave_out_the_eval_suites_rows(tmp_path):
    from qalign_jax import eval_suites

    path = tmp_path / "mixed.jsonl"
    rows = [{"id": f"s{i}", "prompt": f"kill a process {i}", "label": "benign"} for i in range(30)]
    rows += [{"id": f"u{i}", "prompt": f"kill a person {i}", "label": "harmful"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The eval reads 12 of the 30 benign rows (seed 0); training takes the other 18, all of them.
    held = eval_suites.read_suite(eval_suites.Suite("safe", "refusal", str(path), 12), seed=0)
    train = data.select_prompts(((str(path), -1, {"label": "benign", "holdout": 12}),), seed=3)
    assert len(held) == 12 and len(train) == 18
    assert {r.id for r in held}.isdisjoint(r.id for r in train)
    assert {r.id for r in held} | {r.id for r in train} == {f"s{i}" for i in range(30)}
    some = data.select_prompts(((str(path), 5, {"label": "benign", "holdout": 12}),), seed=3)
    assert len(some) == 5 and {r.id for r in some} <= {r.id for r in train}
    assert [r.label for r in data.select_prompts(((str(path), -1, {"label": "harmful"}),), 0)] == [
        "harmful"
    ] * 10
    with pytest.raises(ValueError, match="has 18 usable prompts; cannot take 19"):
        data.select_prompts(((str(path), 19, {"label": "benign", "holdout": 12}),), 0)
    with pytest.raises(ValueError, match="keys among"):
        data.select_prompts(((str(path), -1, {"labels": "benign"}),), 0)
    with pytest.raises(ValueError, match="no rows with label 'safe'"):
        data.select_prompts(((str(path), -1, {"label": "safe"}),), 0)
    with pytest.raises(ValueError, match="must leave some"):
        data.select_prompts(((str(path), -1, {"label": "benign", "holdout": 30}),), 0)


def test_prompt_set_errors_and_extra_fields(tmp_path):
    ok = {"id": "x", "prompt": "p", "category": None, "label": "harmful", "target": "Sure"}
    (rec,) = data.read_prompt_set(write_jsonl(tmp_path / "ok.jsonl", [ok]))
    assert rec.label == "harmful" and rec.extra == {"target": "Sure"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [ok, {"id": "y", "label": "benign"}])
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:2: field 'prompt' must be a non-empty string"
    ):
        data.read_prompt_set(bad)


# ---------------------------------------------------------------------------------------------
# Batches.


def many_examples(n):
    return [data.tokenize_sft(example(id_=f"e{i}", prompt="p" * (1 + i % 3)), TOK, seq_len=16,
                              on_overflow="error") for i in range(n)]  # fmt: skip


def test_epochs_visit_every_example_once_and_pad_the_last_batch():
    batches = data.SFTBatches(many_examples(10), seq_len=16, pad_id=0, global_batch_size=4,
                              grad_accum_steps=2, seed=3)  # fmt: skip
    assert batches.steps_per_epoch == 3
    seen = []
    for _ in range(3):
        b = batches.next()
        assert b["tokens"].shape == (2, 2, 16)  # [A, B / A, T]
        rows = b["positions"].reshape(4, 16)
        seen += [int((r >= 0).sum()) for r in rows]
    assert seen.count(0) == 2  # 10 examples in 12 slots: two empty rows, all masked
    assert batches.position == data.DataPosition(1, 0)
    assert list(batches.order(0)) != list(batches.order(1))  # reshuffled each epoch


def test_a_restored_position_gives_the_batches_that_follow_it():
    kw = dict(seq_len=16, pad_id=0, global_batch_size=4, seed=0)
    straight = data.SFTBatches(many_examples(10), **kw)
    expected = [straight.next() for _ in range(7)][5:]
    resumed = data.SFTBatches(many_examples(10), **kw)
    resumed.position = data.DataPosition.from_json(straight.position_after(5).to_json())
    for want in expected:
        got = resumed.next()
        assert all(np.array_equal(got[k], want[k]) for k in want)


def lazy_examples(tmp_path, n, seq_len=16, on_overflow="error"):
    rows = [example(id_=f"e{i}", prompt="p" * (1 + i % 3)) for i in range(n)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    return data.load_sft_examples(path, TOK, seq_len=seq_len, on_overflow=on_overflow)


@pytest.mark.parametrize("row_width", ["seq_len", "batch"])
def test_each_process_builds_and_tokenizes_only_its_rows(tmp_path, row_width):
    """Two processes' row slices of every micro-batch put together give the one-process batch,
    and with row_width='seq_len' each tokenized only the examples its rows hold ('batch' reads
    the length of every example of the batch, so each process tokenizes the whole batch)."""
    kw = dict(seq_len=16, pad_id=0, global_batch_size=8, grad_accum_steps=2, seed=1,
              row_width=row_width)  # fmt: skip
    whole = data.SFTBatches(lazy_examples(tmp_path, 10), **kw)
    halves = [lazy_examples(tmp_path, 10) for _ in range(2)]
    parts = [data.SFTBatches(ex, **kw) for ex in halves]
    for _ in range(3):  # past an epoch of 2 batches
        want = whole.next()
        got = [b.next(rows) for b, rows in zip(parts, (slice(0, 2), slice(2, 4)))]
        for k in want:
            assert got[0][k].shape == (2, 2, 16)
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got], axis=1), want[k])
    # Epoch 0: 8 + 2 rows; each process held 2 of every 4 rows of each micro-batch.
    first = [b.batch_at(data.DataPosition(0, 0), r) for b, r in zip(parts, (slice(0, 2), None))]
    assert first[1]["tokens"].shape == (2, 4, 16)
    assert whole.examples.num_tokenized == 10
    assert (
        0 < halves[0].num_tokenized < 10
        if row_width == "seq_len"
        else halves[0].num_tokenized == 10
    )


def test_rows_are_as_wide_as_each_batch_needs(tmp_path):
    """row_width='batch': each batch's rows are its longest example rounded up to 64, 96, 128,
    ... (at most seq_len), the same width in every process's slice; 'seq_len': always
    seq_len; the rows' content is the same either way."""
    rows = [example(id_=f"e{i}", prompt="p" * (10 + 40 * (i % 4))) for i in range(8)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    load = lambda: data.load_sft_examples(path, TOK, seq_len=300, on_overflow="error")  # noqa: E731
    kw = dict(seq_len=300, pad_id=0, global_batch_size=4, grad_accum_steps=2, shuffle=False)
    lengths = [len(load()[i].tokens) for i in range(8)]
    by_batch = data.SFTBatches(load(), **kw)
    fixed = data.SFTBatches(load(), row_width="seq_len", **kw)
    for b in range(2):
        want = data.length_bucket(max(lengths[4 * b : 4 * b + 4]), minimum=64)
        got, full = by_batch.next(), fixed.next()
        assert got["tokens"].shape == (2, 2, want) and full["tokens"].shape == (2, 2, 300)
        for k in got:
            np.testing.assert_array_equal(got[k], full[k][..., :want])
        assert (full["positions"][..., want:] == -1).all()  # nothing cut
        half = data.SFTBatches(load(), **kw).batch_at(data.DataPosition(0, b), slice(1, 2))
        assert half["tokens"].shape == (2, 1, want)  # the whole batch's width, not the slice's
    assert data.batch_width([70], 300) == 96 and data.batch_width([10], 300) == 64
    assert data.batch_width([290], 300) == 300 and data.batch_width([10], 300, "seq_len") == 300
    with pytest.raises(ValueError, match="row_width='longest'; use one of"):
        data.SFTBatches(load(), row_width="longest", **kw)


def test_lazy_examples_fingerprint_split_and_early_overflow_error(tmp_path):
    ex = lazy_examples(tmp_path, 6)
    assert (
        ex.fingerprint()
        == lazy_examples(tmp_path, 6).fingerprint()
        != ex.split({"eval": 2, "train": -1}, 0)["train"].fingerprint()
    )
    assert ex.num_tokenized == 0  # neither fingerprinting nor splitting tokenizes
    parts = ex.split({"eval": 2, "train": -1}, seed=0)
    ids = lambda e: [row["id"] for _, row in e.rows]  # noqa: E731
    assert sorted(ids(parts["eval"]) + ids(parts["train"])) == sorted(ids(ex))
    assert ex.fingerprint() != lazy_examples(tmp_path, 6, seq_len=17).fingerprint()
    # An example that does not fit fails when its process tokenizes the epoch, before training.
    short = data.SFTBatches(lazy_examples(tmp_path, 6, seq_len=6), seq_len=6, pad_id=0,
                            global_batch_size=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"sft\.jsonl:\d+: id 'e\d' has \d+ tokens"):
        short.tokenize_epoch(0)


# ---------------------------------------------------------------------------------------------
# Losses.


def test_sft_loss_by_hand():
    # Uniform logits over 4 classes: -log p = log 4 at every position.
    logits = jnp.zeros((1, 3, 4))
    targets = jnp.array([[1, 2, 3]])
    mask = jnp.array([[1.0, 0.0, 1.0]])
    loss, m = losses.sft_loss(logits, targets, mask)
    assert float(loss) == pytest.approx(math.log(4))
    assert float(m["nll_sum"]) == pytest.approx(2 * math.log(4))
    assert float(m["num_tokens"]) == 2
    # A confident right answer at position 0 only.
    logits = logits.at[0, 0, 1].set(100.0)
    loss, m = losses.sft_loss(logits, targets, mask, normalizer=4.0)
    assert float(loss) == pytest.approx(math.log(4) / 4, abs=1e-6)  # (0 + log 4) / 4
    assert float(m["num_correct"]) == 1


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_check_finite_names_step_loss_and_grad_norm():
    metrics.check_finite(3, 1.0, 2.0)
    with pytest.raises(
        FloatingPointError,
        match=r"step 7: non-finite loss=1.5 or grad_norm=inf.*step 5\) is intact",
    ):
        metrics.check_finite(7, 1.5, float("inf"), last_checkpoint=lambda: 5)
    with pytest.raises(FloatingPointError, match="loss=nan.*no checkpoint was saved yet"):
        metrics.check_finite(1, float("nan"), 1.0)


def test_metrics_file_drops_lines_past_the_resumed_step(tmp_path, caplog):
    w = metrics.MetricsWriter(str(tmp_path))
    for s in range(1, 6):
        w.write(s, {"train/loss": np.float32(1.0 / s)})
    w.close()
    w = metrics.MetricsWriter(str(tmp_path), resume_step=3)  # killed after a checkpoint at 3
    w.write(4, {"train/loss": 0.2})
    w.close()
    rows = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/loss"] == 0.2


def test_progress_line_has_an_eta():
    p = metrics.Progress(first_step=0, total_steps=100)
    first = p.line(1, {"train/loss": 2.0})
    assert "step 1/100" in first and "loss 2.0000" in first and "ETA ?" in first
    p._t_first -= 10.0  # pretend step 1 finished 10 s ago
    assert "ETA 1m29s" in p.line(11, {})  # 10 steps in 10 s: 1 s per step, 89 to go
    assert metrics.format_duration(3725) == "1h02m"
