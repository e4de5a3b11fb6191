"""The judge cache (`judge_cache.py`, `judge.score_pairs`): in-call duplicates judged once,
hits and misses counted by hand, results identical with the cache on or off, invalidation when
the rubric or the weights change, and replay from a cache_dir by a second judge."""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest

from qalign_jax import judge as judge_lib
from qalign_jax import judge_cache, rewards, sharding
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import load
from tests.test_judge import PAIRS
from tests.test_rubric_rewards import SMALL

A, B, C, D = PAIRS[0], PAIRS[1], PAIRS[2], PAIRS[3]


def load_tiny(seed):
    return load.load_model(
        "random:tiny", mesh=sharding.make_mesh((1, -1, 1)), tokenizer_source="embedded", seed=seed
    )


@pytest.fixture(scope="module")
def model():
    return load_tiny(3)


@pytest.fixture(scope="module")
def rubric():
    return rubric_lib.rubric_from_dict(copy.deepcopy(SMALL))


def make_judge(model, rubric, **cfg):
    cfg = {"batch_size": 2, "question_chunk": 4, **cfg}
    return judge_lib.build_judge(model, rubric, judge_lib.JudgeConfig(**cfg))


def assert_same(a, b, atol=0.0):
    """Verdicts equal: bit for bit (atol=0) or up to float rounding (the logit judge's scores
    move by ~1e-7 with the other pairs of its batch; a replay has its first batch's)."""
    assert a.truncated == b.truncated and a.scores.violated_gates == b.scores.violated_gates
    assert a.scores.reward == pytest.approx(b.scores.reward, abs=atol, rel=0)
    for qid, x in a.answers.items():
        y = b.answers[qid]
        assert (x.argmax, x.applicable) == (y.argmax, y.applicable)
        assert x.option_mass == pytest.approx(y.option_mass, abs=atol, rel=0)
        assert (x.probs is None) == (y.probs is None)
        if x.probs is not None:
            assert x.probs.dtype == y.probs.dtype
            np.testing.assert_allclose(x.probs, y.probs, atol=atol, rtol=0)
    if atol == 0:
        assert a.scores == b.scores


def test_duplicates_in_one_call_are_judged_once(model, rubric):
    judge = make_judge(model, rubric)
    verdicts = judge_lib.score_pairs(judge, [A, B, A, A, C])
    stats = judge.cache_stats
    assert (stats.duplicates, stats.misses, stats.hits) == (2, 3, 0)
    assert stats.saved_s > 0 and stats.hit_rate() == pytest.approx(2 / 5)
    assert_same(verdicts[0], verdicts[2])
    assert_same(verdicts[0], verdicts[3])
    assert verdicts[0] is not verdicts[2]  # each position gets its own Verdict
    unique = judge_lib.score_pairs(make_judge(model, rubric), [A, B, C])
    for v, u in zip([verdicts[0], verdicts[1], verdicts[4]], unique):
        assert_same(v, u)


def test_hits_misses_and_results_identical_with_cache_on_or_off(model, rubric):
    on, off = make_judge(model, rubric, cache_entries=100), make_judge(model, rubric)
    calls = [[A, B, A], [A, D], [D, B, C]]
    first_on = None
    for n, pairs in enumerate(calls):
        verdicts_on = judge_lib.score_pairs(on, pairs)
        first_on = first_on or verdicts_on
        for v, w in zip(verdicts_on, judge_lib.score_pairs(off, pairs)):
            assert_same(v, w, atol=0 if n == 0 else 1e-5)  # n > 0: replays were batched apart
    assert_same(verdicts_on[1], first_on[1])  # B replayed bit for bit
    # on: call 1 computes A, B (A repeated); call 2 replays A, computes D; call 3 replays D, B
    s = on.cache_stats
    assert (s.misses, s.duplicates, s.hits) == (4, 1, 3)
    assert s.hit_rate() == pytest.approx(4 / 8)
    assert (off.cache_stats.misses, off.cache_stats.hits) == (7, 0)
    metrics = s.metrics()
    assert metrics["judge/cache_hit_rate"] == pytest.approx(0.5)
    assert metrics["judge/cache_hits"] == 4 and metrics["judge/cache_saved_s"] > 0


def test_memory_cache_keeps_the_newest_entries():
    cache = judge_cache.VerdictCache(max_entries=2)
    cache.use("ns")
    cache.put([("a", {"n": 1}), ("b", {"n": 2})])
    cache.put([("c", {"n": 3})])
    assert cache.get("a") is None and cache.get("b") == {"n": 2} and cache.get("c") == {"n": 3}
    cache.use("other")  # another namespace starts empty
    assert cache.get("c") is None


def test_namespace_changes_with_rubric_weights_and_config(model, rubric):
    base = make_judge(model, rubric, cache_entries=10)
    ns = judge_lib._namespace(base)
    assert judge_lib._namespace(make_judge(model, rubric, cache_entries=10, batch_size=5)) == ns
    raw = copy.deepcopy(SMALL)
    raw["principles"][0]["dimensions"][0]["questions"][0]["text"] += " Be strict."
    edited = rubric_lib.rubric_from_dict(raw)
    assert judge_lib._namespace(make_judge(model, edited, cache_entries=10)) != ns
    assert judge_lib._namespace(make_judge(load_tiny(4), rubric, cache_entries=10)) != ns
    assert judge_lib._namespace(make_judge(load_tiny(3), rubric, cache_entries=10)) == ns
    longer = make_judge(model, rubric, cache_entries=10, max_context_tokens=512)
    assert judge_lib._namespace(longer) != ns
    assert rubric.header is not None  # provenance is left out of the key
    renamed = dataclasses.replace(rubric, header={"author": "someone else"})
    assert judge_lib._namespace(make_judge(model, renamed, cache_entries=10)) == ns


def test_weights_fingerprint_sees_a_sampled_value_change(model):
    fp = judge_cache.weights_fingerprint(model.params)
    assert fp == judge_cache.weights_fingerprint(model.params) and len(fp) == 20
    arrays = {"w": np.arange(100, dtype=np.float32).reshape(10, 10)}
    base = judge_cache.weights_fingerprint(arrays)
    moved = {"w": arrays["w"].copy()}
    moved["w"][9, 9] += 1.0  # the last element is always sampled
    assert judge_cache.weights_fingerprint(moved) != base
    assert judge_cache.weights_fingerprint({"w": arrays["w"].astype(np.float16)}) != base


def test_edited_rubric_or_new_weights_miss_the_cache_dir(model, rubric, tmp_path):
    first = make_judge(model, rubric, cache_entries=10, cache_dir=str(tmp_path))
    judge_lib.score_pairs(first, [A])
    raw = copy.deepcopy(SMALL)
    raw["grades"] = {"A": 1.0, "B": 0.5, "C": 0.0, "D": -0.5, "F": -1.0}
    other_rubric = make_judge(
        model, rubric_lib.rubric_from_dict(raw), cache_entries=10, cache_dir=str(tmp_path)
    )
    other_weights = make_judge(load_tiny(4), rubric, cache_entries=10, cache_dir=str(tmp_path))
    same = make_judge(model, rubric, cache_entries=10, cache_dir=str(tmp_path))
    for judge, hits in ((other_rubric, 0), (other_weights, 0), (same, 1)):
        judge_lib.score_pairs(judge, [A])
        assert (judge.cache_stats.hits, judge.cache_stats.misses) == (hits, 1 - hits)
    assert len(os.listdir(tmp_path)) == 3  # one namespace each: rubric, weights, the first


def test_replay_from_cache_dir_equals_computing(model, rubric, tmp_path):
    writer = make_judge(model, rubric, cache_entries=100, cache_dir=str(tmp_path))
    computed = judge_lib.score_pairs(writer, PAIRS)
    (ns,) = os.listdir(tmp_path)
    (shard,) = os.listdir(tmp_path / ns)
    rows = [json.loads(line) for line in (tmp_path / ns / shard).read_text().splitlines()]
    assert len(rows) == len(PAIRS) and set(rows[0]) == {"key", "record"}
    reader = make_judge(model, rubric, cache_entries=100, cache_dir=str(tmp_path))
    replayed = judge_lib.score_pairs(reader, PAIRS[::-1])
    assert (reader.cache_stats.hits, reader.cache_stats.misses) == (len(PAIRS), 0)
    assert "questions_scored" not in reader.stats  # nothing was computed
    assert reader.cache_stats.saved_s == pytest.approx(writer.cache_stats.computed_s)
    for v, w in zip(computed, replayed[::-1]):
        assert_same(v, w)
    # A reader with another reward config replays the same answers and pools them its way.
    unit = judge_lib.build_judge(
        model, rubric, writer.cfg, rewards.RewardConfig(scale="unit", final_pooling="weighted_mean")
    )
    pooled = judge_lib.score_pairs(unit, PAIRS)
    assert unit.cache_stats.hits == len(PAIRS)
    fresh = judge_lib.build_judge(model, rubric, judge_lib.JudgeConfig(), unit.reward_cfg)
    for v, w in zip(pooled, judge_lib.score_pairs(fresh, PAIRS)):
        assert v.scores.reward == pytest.approx(w.scores.reward, abs=1e-5)
    assert any(v.scores.reward != w.scores.reward for v, w in zip(pooled, computed))


def test_sampled_generate_mode_is_never_reused(model, rubric):
    judge = make_judge(model, rubric, mode="generate", generate_temperature=1.0, cache_entries=10)
    judge_lib.score_pairs(judge, [C, C])
    judge_lib.score_pairs(judge, [C])
    s = judge.cache_stats
    assert (s.misses, s.hits, s.duplicates) == (3, 0, 0)


def test_cache_config_errors():
    with pytest.raises(ValueError, match="needs cache_entries >= 1"):
        judge_lib.JudgeConfig(cache_dir="/tmp/x")


def test_replay_from_a_bucket(model, rubric, tmp_path, monkeypatch):
    """cache_dir on gs:// (served by tests/fake_gcs.py): one shard per call, replayed."""
    from tests import fake_gcs

    fake_gcs.install(str(tmp_path / "gcs"), monkeypatch)
    url = "gs://b/judge_cache"
    writer = make_judge(model, rubric, cache_entries=10, cache_dir=url)
    computed = judge_lib.score_pairs(writer, [A, B])
    judge_lib.score_pairs(writer, [B, C])  # B from memory, C computed: a second shard
    shards = fake_gcs.objects(str(tmp_path / "gcs"), "b/judge_cache")
    assert len(shards) == 2 and all(s.endswith(".jsonl") for s in shards)
    reader = make_judge(model, rubric, cache_entries=10, cache_dir=url)
    replayed = judge_lib.score_pairs(reader, [A, B, C])
    assert (reader.cache_stats.hits, reader.cache_stats.misses) == (3, 0)
    assert_same(replayed[0], computed[0])
    assert_same(replayed[1], computed[1])
