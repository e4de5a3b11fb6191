"""The priming-data stage: outputs, resume after a kill mid-file, prompt mix and errors.

Tiny random policy and judge with the real tokenizer (`configs/prime_data_smol.py:smoke`), so the
texts are noise but every stage (draft, judge, findings, reflection, revision, keep) runs."""

import json
import os

import pytest

from qalign_jax import data, reflection, rewards, stages, train
from qalign_jax.loops import prime_data
from tests.test_train import ROOT

CONFIG = os.path.join(ROOT, "configs", "prime_data_smol.py")


def smoke_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prime_cfg", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke")


def read_rows(workdir, name=prime_data.ROWS):
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("prime"))
    train.run(smoke_config(), workdir)
    return workdir


def test_outputs(full_run):
    rows = read_rows(full_run)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert sum(r["label"] == "harmful" for r in rows) == 2
    sft = read_rows(full_run, prime_data.SFT)
    assert [r["id"] for r in sft] == [r["id"] for r in rows if r["kept"]]
    for row in rows:
        assert row["findings"].endswith(reflection.THINK_OPEN)
        if row["error"] is None:
            assert {"revision_reward", "two_pass_reward", "segments"} <= set(row)
            text = "".join(s["text"] for s in row["segments"])
            parsed = reflection.parse_two_pass(text)
            assert parsed.ok and parsed.revision == row["revision"].strip()
    with open(os.path.join(full_run, prime_data.SUMMARY)) as f:
        summary = json.load(f)
    assert summary == json.loads(json.dumps(prime_data.summarize(rows)))


def test_restart_skips_finished_ids_and_matches(full_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "resumed")
    os.makedirs(workdir)
    rows = read_rows(full_run)
    with open(os.path.join(workdir, prime_data.ROWS), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[:2]))
        f.write(json.dumps(rows[2])[:40])  # killed mid-write: a torn last line
    calls = []
    original = prime_data.process_batch

    def counting(config, policy, reviser, judge, records, rng):
        calls.append([r.id for r in records])
        return original(config, policy, reviser, judge, records, rng)

    monkeypatch.setattr(prime_data, "process_batch", counting)
    train.run(smoke_config(), workdir)
    assert calls == [[r["id"] for r in rows[2:]]]  # only the unfinished batch
    assert read_rows(workdir) == rows  # same texts and scores as the uninterrupted run
    assert read_rows(workdir, prime_data.SFT) == read_rows(full_run, prime_data.SFT)


def test_prompt_mix_and_errors(tmp_path):
    cfg = smoke_config()
    chosen = data.select_prompts(cfg.prime.sources, seed=0)
    assert [r.label for r in chosen] == ["harmful", "harmful", "benign", "benign"]
    assert chosen != data.select_prompts(cfg.prime.sources, seed=1)
    with pytest.raises(ValueError, match="config.prime.sources is empty"):
        data.select_prompts((), 0)
    harmful = cfg.prime.sources[0][0]
    with pytest.raises(ValueError, match="has 24 usable prompts; cannot take 99"):
        data.select_prompts(((harmful, 99),), 0)
    with pytest.raises(ValueError, match="is in both"):
        data.select_prompts(((harmful, 1), (harmful, -1)), 0)
    cfg.prime.keep = "best"
    with pytest.raises(ValueError, match="use one of"):
        prime_data.run(cfg, str(tmp_path))
    bad = tmp_path / prime_data.ROWS
    bad.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match="is not JSON; delete the file"):
        stages.read_rows(str(bad))


def test_keep_rules():
    assert rewards.keep_revision("improved", 0.1, 0.2)
    assert not rewards.keep_revision("improved", 0.2, 0.2)
    assert rewards.keep_revision("not_worse", 0.2, 0.2)
    assert not rewards.keep_revision("not_worse", 0.3, 0.2)
    assert rewards.keep_revision("all", 0.9, -1.0)


def test_checkpoint_init_drafts(full_run, primed_tiny, tmp_path):
    """`checkpoint.init` (a trained stage) drafts; the judge stays model.source."""

    def drafts(workdir, config):
        train.run(config, str(tmp_path / workdir))
        return [r["draft"] for r in read_rows(str(tmp_path / workdir))]

    config = smoke_config()
    config.checkpoint.init = primed_tiny
    from_init = drafts("init", config)
    config = smoke_config()
    config.model.source = primed_tiny
    assert from_init == drafts("source", config)
    assert from_init != [r["draft"] for r in read_rows(full_run)]
