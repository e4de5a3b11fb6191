"""The best_of_n loop: the best of N samples by the composed reward, kept by label threshold,
resumable; a tiny random policy with the real tokenizer."""

import json
import os

import numpy as np
import pytest

from qalign_jax import config as base
from qalign_jax import train
from qalign_jax.loops import best_of_n

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "configs", "data", "grpo_prompts.jsonl")  # 8 harmful, 8 benign


def word_count(prompts, completions, *, records, verdicts):
    """A reward that prefers longer answers: harmful prompts' answers count negative."""
    sign = [-1.0 if r["label"] == "harmful" else 1.0 for r in records]
    return [s * len(c.split()) for s, c in zip(sign, completions)]


def tiny_config():
    c = base.base_config()
    c.loop = "best_of_n"
    c.model.source = "random:tiny"
    c.model.tokenizer = "embedded"
    c.mesh.shape = (1, -1, 1)
    c.reward.components = (("words", "tests.test_best_of_n:word_count", 1.0, {}),)
    b = c.best_of_n
    b.sources = ((PROMPTS, 6),)
    b.num_samples = 4
    b.batch_prompts = 2
    b.max_new_tokens = 6
    b.max_prompt_tokens = 64
    b.min_reward_by_label = (("harmful", -100.0), ("benign", 3.0))
    return c


def test_choose_takes_the_first_best_at_or_above_the_threshold():
    assert best_of_n.choose(np.array([0.0, 2.0, 2.0, 1.0]), 2.0) == 1
    assert best_of_n.choose(np.array([0.0, 1.0]), 1.5) is None


def test_best_of_n_keeps_the_best_answer_and_resumes(tmp_path):
    config = tiny_config()
    train.run(config, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / best_of_n.SAMPLES)]
    assert len(rows) == 6
    for r in rows:
        assert len(r["answers"]) == 4 and len(r["totals"]) == 4
        assert r["totals"] == r["components"]["words"]
        want = best_of_n.choose(np.array(r["totals"]), best_of_n.threshold(config, r["label"]))
        assert r["best"] == want
        if want is not None:
            assert r["completion"] == r["answers"][want]
            assert max(r["totals"]) >= (3.0 if r["label"] == "benign" else -100.0)
    sft = [json.loads(x) for x in open(tmp_path / best_of_n.SFT)]
    assert [s["id"] for s in sft] == [r["id"] for r in rows if r["best"] is not None]
    summary = json.load(open(tmp_path / best_of_n.SUMMARY))
    assert summary["prompts"] == 6 and summary["kept"] == len(sft)
    # A rerun finds every prompt done and samples nothing.
    before = (tmp_path / best_of_n.SAMPLES).read_text()
    train.run(config, str(tmp_path))
    assert (tmp_path / best_of_n.SAMPLES).read_text() == before


def test_best_of_n_samples_per_label_in_calls_of_equal_rows(tmp_path, monkeypatch):
    """`num_samples_by_label`: N per label, a smaller N packing more prompts per call; the
    outputs keep the prompts' order, and a run stopped in its second group resumes to the same
    rows."""
    from qalign_jax import rollouts

    calls = []
    rollout = rollouts.rollout

    def spy(policy, judge, rows, *args, **kwargs):
        calls.append(sorted({r.label for r in rows}) + [len(rows)])
        return rollout(policy, judge, rows, *args, **kwargs)

    monkeypatch.setattr(rollouts, "rollout", spy)
    prompts = [json.loads(x) for x in open(PROMPTS)]  # 8 harmful, then 8 benign
    mixed = tmp_path / "mixed.jsonl"  # benign first, the labels alternating
    mixed.write_text("".join(json.dumps(p) + "\n" for pair in zip(prompts[8:], prompts[:8])
                             for p in pair))  # fmt: skip
    config = tiny_config()
    config.best_of_n.sources = ((str(mixed), -1),)
    config.best_of_n.num_samples_by_label = (("benign", 2),)
    workdir = tmp_path / "run"
    train.run(config, str(workdir))
    rows = [json.loads(x) for x in open(workdir / best_of_n.SAMPLES)]
    for r in rows:
        assert len(r["answers"]) == (2 if r["label"] == "benign" else 4)
        assert len(r["totals"]) == len(r["answers"]) == len(r["components"]["words"])
    # 2 prompts x 4 answers per call; the benign prompts 4 x 2, so half the calls
    assert calls == [["benign", 8]] * 2 + [["harmful", 8]] * 4
    assert [r["label"] for r in rows] == ["benign"] * 8 + ["harmful"] * 8  # sampled by group
    sft = [json.loads(x) for x in open(workdir / best_of_n.SFT)]
    order = [p["id"] for p in map(json.loads, mixed.read_text().splitlines())]
    kept = {r["id"] for r in rows if r["best"] is not None}
    assert [s["id"] for s in sft] == [i for i in order if i in kept]  # the prompts' order
    summary = json.load(open(workdir / best_of_n.SUMMARY))
    assert (
        summary["by_label"]["benign"]["prompts"] == 8 == summary["by_label"]["harmful"]["prompts"]
    )
    # Stopped after the second group's first call: the rerun samples its last call alike.
    before = (workdir / best_of_n.SAMPLES).read_text()
    lines = before.splitlines(keepends=True)
    (workdir / best_of_n.SAMPLES).write_text("".join(lines[:-2]))
    calls.clear()
    train.run(config, str(workdir))
    assert calls == [["harmful", 8]]
    assert (workdir / best_of_n.SAMPLES).read_text() == before


def test_best_of_n_config_errors(tmp_path):
    config = tiny_config()
    config.best_of_n.num_samples = 0
    with pytest.raises(ValueError, match="num_samples=0"):
        train.run(config, str(tmp_path))
    config = tiny_config()
    config.best_of_n.num_samples_by_label = (("benign", 0),)
    with pytest.raises(ValueError, match=r"num_samples_by_label\['benign'\]=0"):
        train.run(config, str(tmp_path))
    config = tiny_config()
    config.best_of_n.num_samples_by_label = (("benigm", 2),)
    with pytest.raises(ValueError, match=r"no prompt has label 'benigm'.*'benign', 'harmful'"):
        train.run(config, str(tmp_path))
    config = tiny_config()
    config.reward.components = (("x", "refusal", 1.0, {"bogus": 1}),)
    with pytest.raises(ValueError, match="unknown option"):
        train.run(config, str(tmp_path))


def test_best_of_n_samples_from_checkpoint_init(tmp_path, primed_tiny):
    """`checkpoint.init` (a primed stage's weights) is the sampling policy, not model.source."""

    def answers(workdir, **overrides):
        config = tiny_config()
        for key, value in overrides.items():
            setattr(config.model if key == "source" else config.checkpoint, key, value)
        train.run(config, str(tmp_path / workdir))
        return [json.loads(x)["answers"] for x in open(tmp_path / workdir / best_of_n.SAMPLES)]

    from_init = answers("init", init=primed_tiny)
    assert from_init == answers("source", source=primed_tiny)  # the primed weights sampled
    assert from_init != answers("base")  # and they are not model.source's
