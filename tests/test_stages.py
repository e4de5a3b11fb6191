"""Resumable stages: a batched map that appends rows and skips finished ids on a rerun, torn and
corrupt JSONL files, and a stage with a done marker."""

import json

import pytest

from qalign_jax import stages


def square_rows(calls):
    def fn(batch, first):
        calls.append(([x["id"] for x in batch], first))
        return [{"id": x["id"], "sq": x["v"] * x["v"], "first": first} for x in batch]

    return fn


ITEMS = [{"id": f"p{i}", "v": i} for i in range(5)]  # values 0..4


def test_map_in_batches_runs_all_then_skips_finished_ids(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    calls, seen = [], []
    rows = stages.map_in_batches(
        ITEMS, square_rows(calls), path, batch_size=2, label="t",
        on_batch=lambda done, finished, todo: seen.append((len(done), finished, todo)),
    )  # fmt: skip
    assert [r["sq"] for r in rows] == [0, 1, 4, 9, 16]
    assert calls == [(["p0", "p1"], 0), (["p2", "p3"], 2), (["p4"], 4)]
    assert seen == [(2, 2, 5), (4, 4, 5), (5, 5, 5)]
    assert len(stages.read_rows(path)) == 5
    # A rerun runs nothing and returns the same rows.
    calls.clear()
    again = stages.map_in_batches(ITEMS, square_rows(calls), path, batch_size=2, label="t")
    assert calls == [] and again == rows


def test_map_in_batches_resumes_after_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    # An earlier run finished p0 and p3, and was killed while appending p1.
    path.write_text(
        json.dumps({"id": "p3", "sq": 9, "first": 3}) + "\n"
        + json.dumps({"id": "p0", "sq": 0, "first": 0}) + "\n"
        + json.dumps({"id": "p1", "sq": 1})[:10]
    )  # fmt: skip
    calls = []
    rows = stages.map_in_batches(ITEMS, square_rows(calls), str(path), batch_size=2, label="t")
    # Items left: p1 (index 1), p2 (2), p4 (4): batches [p1, p2] from index 1, [p4] from 4.
    assert calls == [(["p1", "p2"], 1), (["p4"], 4)]
    assert [(r["id"], r["sq"], r["first"]) for r in rows] == [
        ("p0", 0, 0), ("p1", 1, 1), ("p2", 4, 1), ("p3", 9, 3), ("p4", 16, 4),
    ]  # fmt: skip
    # The torn line is gone from the file: 2 old rows + 3 new ones, every line JSON.
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and [json.loads(x)["id"] for x in lines] == [
        "p3", "p0", "p1", "p2", "p4",
    ]  # fmt: skip


def test_read_rows_errors_for_a_corrupt_file(tmp_path):
    assert stages.read_rows(str(tmp_path / "missing.jsonl")) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not JSON; delete the file"):
        stages.read_rows(str(bad))
    bad.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is list, not a JSON object"):
        stages.read_rows(str(bad))
    # A file written whole has no torn line: its broken last line is an error too.
    bad.write_text('{"id": 1}\n{"id": 2')
    assert stages.read_rows(str(bad)) == [{"id": 1}]
    bad.write_text('{"id": 1}\n{"id": 2')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not JSON"):
        stages.read_rows(str(bad), torn_last_line=False)


def test_map_in_batches_rejects_a_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="t: batch_size=0; use 1 or more"):
        stages.map_in_batches(ITEMS, square_rows([]), str(tmp_path / "r.jsonl"), batch_size=0,
                              label="t")  # fmt: skip


def test_run_once_writes_a_marker_and_skips_the_stage_after(tmp_path):
    marker = str(tmp_path / "done.json")
    runs = []

    def stage():
        runs.append(1)
        return {"seconds": 2.5}

    assert stages.run_once(marker, stage) == {"seconds": 2.5}
    assert json.loads(open(marker).read()) == {"seconds": 2.5}
    assert stages.run_once(marker, stage) == {"seconds": 2.5}
    assert runs == [1]  # the second call found the marker


def test_item_id():
    class Record:
        id = "r7"

    assert stages.item_id({"id": "d3"}) == "d3" and stages.item_id(Record()) == "r7"
