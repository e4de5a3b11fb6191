"""The judge: shared-prefix logit scoring against per-question full forwards, determinism,
applicability, generate-then-parse, and clear errors. Tiny random judge with the real
(embedded) tokenizer, so prompts, options and the chat template are the real ones."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qalign_jax import judge as judge_lib
from qalign_jax import rubric as rubric_lib
from qalign_jax import sharding
from qalign_jax.models import load
from tests.test_rubric_rewards import SMALL

PAIRS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt; knead, proof, and bake at 230C."),
    ("Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
    ("What is 2+2?", "4"),
    ("How can I pick a lock?", "I can't help with breaking into property you don't own."),
    ("Summarize the causes of World War I in two sentences, please, with the key alliances.",
     "Militarism, alliances, imperialism and nationalism raised tensions; the assassination of "
     "Archduke Franz Ferdinand in 1914 set off a chain of alliance obligations."),
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load.load_model(
        "random:tiny", mesh=sharding.make_mesh((1, -1, 1)), tokenizer_source="embedded", seed=3
    )


@pytest.fixture(scope="module")
def judge(model):
    rubric = rubric_lib.rubric_from_dict(copy.deepcopy(SMALL))
    return judge_lib.build_judge(
        model, rubric, judge_lib.JudgeConfig(batch_size=2, question_chunk=4)
    )


@pytest.fixture(scope="module")
def full_judge(model, judge):
    """Scores every question, applicable or not (the judge above skips N/A ones)."""
    cfg = judge_lib.JudgeConfig(batch_size=2, question_chunk=4, skip_inapplicable=False)
    return judge_lib.build_judge(model, judge.rubric, cfg)


def full_forward_probs(judge, prompt, response):
    """Reference: each question with its own full context, one uncached forward each."""
    m = judge.model
    fwd = jax.jit(lambda p, t: nnx.merge(m.graphdef, p)(t, jnp.arange(t.shape[1])[None])[0])
    ids, _ = judge_lib._context_ids(judge, prompt, response)
    out = []
    for qi, suffix in enumerate(judge.suffix_ids):
        context = ids + judge.header_ids[judge.option_set[qi]] + suffix
        logits = np.asarray(fwd(m.params, jnp.asarray([context])))[0, -1]
        logp = jax.nn.log_softmax(logits)
        opt = np.asarray(logp)[judge.option_ids[qi][judge.option_valid[qi]]]
        out.append(np.exp(opt - np.logaddexp.reduce(opt)))
    return out


def test_shared_prefix_equals_full_forward(full_judge):
    verdicts = judge_lib.score_pairs(full_judge, PAIRS[:3])
    for (prompt, response), v in zip(PAIRS[:3], verdicts):
        ref = full_forward_probs(full_judge, prompt, response)
        for q, r in zip(full_judge.rubric.questions, ref):
            np.testing.assert_allclose(v.answers[q.id].probs, r, atol=1e-5)


def test_shared_system_prefix_equals_prefilling_it_per_pair(model, full_judge):
    """The chat head prefilled once and extended per pair (default) scores as the old path that
    prefilled it inside every pair's context; the cache holds the same positions either way."""
    cfg = dataclasses.replace(full_judge.cfg, share_system_prefix=False)
    old = judge_lib.build_judge(model, full_judge.rubric, cfg)
    assert full_judge.cfg.share_system_prefix and len(full_judge.head_ids) > 20
    for a, b in zip(judge_lib.score_pairs(full_judge, PAIRS), judge_lib.score_pairs(old, PAIRS)):
        for qid, x in a.answers.items():
            np.testing.assert_allclose(x.probs, b.answers[qid].probs, atol=1e-5)
            assert x.option_mass == pytest.approx(b.answers[qid].option_mass, abs=1e-5)
    contexts = [judge_lib._context_ids(full_judge, *p)[0] for p in PAIRS[:2]]
    (shared, *_), lengths = judge_lib._prefill_batch(full_judge, contexts, share_head=True)
    (per_pair, *_), old_lengths = judge_lib._prefill_batch(full_judge, contexts, share_head=False)
    np.testing.assert_array_equal(lengths, old_lengths)
    for row in range(2):  # the same positions filled, in order: head, context, header
        real = np.asarray(shared.positions[row])[np.asarray(shared.positions[row]) >= 0]
        np.testing.assert_array_equal(real, np.arange(lengths[0, row]))
        old_real = np.asarray(per_pair.positions[row])
        np.testing.assert_array_equal(old_real[old_real >= 0], real)


def test_judge_reads_the_question_under_its_option_header(judge):
    """The text of a gate and a graded question, as the judge model reads it."""
    ids, truncated = judge_lib._context_ids(judge, *PAIRS[2])
    decode = judge.model.tokenizer.decode
    assert not truncated and len(judge.header_ids) == 2  # Yes/No, then the grades
    for qi, q in enumerate(judge.rubric.questions):
        header = judge.header_ids[judge.option_set[qi]]
        text = decode(ids + header + judge.suffix_ids[qi], False)
        hint = "Yes/No" if q.kind != "graded" else "A-F"
        assert text.endswith(f"### Question ({hint})\n{q.text}<|im_end|>\n<|im_start|>assistant\n")
        assert "### User prompt\nWhat is 2+2?\n\n### Assistant response\n4\n\n" in text


@pytest.mark.parametrize("cap", [1, 3, 64])
def test_question_chunks_cover_each_question_once(cap):
    lengths = [int(x) for x in np.random.default_rng(cap).integers(5, 40, size=37)]
    chunks = judge_lib._chunks(lengths, cap)
    seen = sorted(i for idx, _, _ in chunks for i in idx)
    assert seen == list(range(len(lengths)))
    for idx, rows, width in chunks:
        assert len(idx) <= rows <= max(cap, 8) and len(idx) <= cap
        assert max(lengths[i] for i in idx) <= width < max(lengths[i] for i in idx) + 4
    assert judge_lib._chunks([], cap) == []


def test_scores_independent_of_order_batch_and_padding(model, judge):
    base = judge_lib.score_pairs(judge, PAIRS)
    order = [4, 2, 0, 3, 1]
    for cfg in (dict(batch_size=1, question_chunk=3), dict(batch_size=5, question_chunk=9)):
        other = judge_lib.build_judge(model, judge.rubric, judge_lib.JudgeConfig(**cfg))
        shuffled = judge_lib.score_pairs(other, [PAIRS[i] for i in order])
        for j, i in enumerate(order):
            for qid, a in base[i].answers.items():
                b = shuffled[j].answers[qid]
                assert (a.probs is None) == (b.probs is None) and a.applicable == b.applicable
                if a.probs is not None:
                    np.testing.assert_allclose(b.probs, a.probs, atol=1e-5)
            assert shuffled[j].scores.reward == pytest.approx(base[i].scores.reward, abs=1e-5)


def test_report_fields_and_applicability(full_judge):
    judge = full_judge
    v = judge_lib.score_pairs(judge, PAIRS[:1])[0]
    for q in judge.rubric.questions:
        a = v.answers[q.id]
        assert a.probs.shape == (len(q.options),)
        assert a.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert a.argmax == q.options[int(np.argmax(a.probs))]
        assert 0.0 < a.option_mass <= 1.0
        assert (a.expected is None) == (q.kind != "graded")
    asks = v.answers["asks_medical"].argmax == "Yes"
    assert v.answers["m_safe"].applicable == asks
    assert (v.scores.dimensions["medical"] is None) == (not asks)
    row = judge_lib.report_row(judge, *PAIRS[0], v)
    assert set(row["questions"]) == {q.id for q in judge.rubric.questions}


def test_skipping_inapplicable_questions(model, judge, full_judge):
    """A question whose condition failed is not computed; every other verdict is unchanged."""
    full = judge_lib.score_pairs(full_judge, PAIRS[:1])[0]
    unmet = "No" if full.answers["asks_medical"].argmax == "Yes" else "Yes"
    spec = copy.deepcopy(SMALL)
    medical = spec["principles"][0]["dimensions"][1]["questions"][0]
    assert medical["id"] == "m_safe"
    medical["applies_if"]["answer"] = unmet
    rubric = rubric_lib.rubric_from_dict(spec)
    runs = {}
    for skip in (True, False):
        cfg = judge_lib.JudgeConfig(batch_size=1, question_chunk=4, skip_inapplicable=skip)
        j = judge_lib.build_judge(model, rubric, cfg)
        runs[skip] = (judge_lib.score_pairs(j, PAIRS[:1])[0], j.stats["questions_scored"])
    (skipped, n_skip), (computed, n_all) = runs[True], runs[False]
    assert (n_skip, n_all) == (len(rubric.questions) - 1, len(rubric.questions))
    assert skipped.answers["m_safe"].probs is None and not skipped.answers["m_safe"].applicable
    assert computed.answers["m_safe"].probs is not None
    assert skipped.scores.reward == pytest.approx(computed.scores.reward, abs=1e-6)
    assert skipped.scores.dimensions["medical"] is None
    for qid, a in computed.answers.items():
        if qid != "m_safe":
            np.testing.assert_allclose(skipped.answers[qid].probs, a.probs, atol=1e-5)


def test_applicability_dag_by_hand(judge):
    r = judge.rubric
    argmax = {q.id: q.options[0] for q in r.questions}  # everything "Yes" / "A"
    assert judge_lib.applicability(r, argmax)["m_safe"] is True
    argmax["asks_medical"] = "No"
    assert judge_lib.applicability(r, argmax)["m_safe"] is False


@pytest.mark.parametrize(
    "text,options,expected",
    [
        ("Yes.", ("Yes", "No"), 0),
        ("no, it does not", ("Yes", "No"), 1),
        ("Nope", ("Yes", "No"), None),
        ("B", tuple("ABCDF"), 1),
        ("Grade: C", tuple("ABCDF"), 2),
        ("a", tuple("ABCDF"), None),  # single letters are matched case-sensitively
        ("", ("Yes", "No"), None),
    ],
)
def test_parse_answer(text, options, expected):
    assert judge_lib.parse_answer(text, options) == expected


def test_generate_mode_runs_and_gives_one_hot_or_uniform(model, judge):
    gen = judge_lib.build_judge(
        model, judge.rubric, judge_lib.JudgeConfig(mode="generate", question_chunk=16)
    )
    v = judge_lib.score_pairs(gen, PAIRS[:1])[0]
    for q in gen.rubric.questions:
        p = v.answers[q.id].probs
        if p is None:  # inapplicable, skipped
            assert not v.answers[q.id].applicable
            continue
        assert p.max() == 1.0 or np.allclose(p, 1.0 / len(q.options))
        assert isinstance(v.answers[q.id].text, str)


def test_long_context_errors_or_truncates(model, judge):
    long = ("word " * 3000, "answer " * 3000)
    strict = judge_lib.build_judge(
        model, judge.rubric, judge_lib.JudgeConfig(max_context_tokens=256, on_long_context="error")
    )
    with pytest.raises(ValueError, match="max_context_tokens=256"):
        judge_lib.score_pairs(strict, [("hi", long[1])])
    lenient = judge_lib.build_judge(
        model, judge.rubric, judge_lib.JudgeConfig(max_context_tokens=256)
    )
    v = judge_lib.score_pairs(lenient, [("hi", long[1])])[0]
    assert v.truncated
    with pytest.raises(ValueError, match="judge prompt alone"):
        judge_lib.score_pairs(lenient, [long])


def test_judge_config_errors():
    with pytest.raises(ValueError, match="use 'logits' or 'generate'"):
        judge_lib.JudgeConfig(mode="vibes")


def test_cli_writes_report(tmp_path):
    import json
    import os
    import subprocess
    import sys

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS[:2]))
    out = tmp_path / "report.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "qalign_jax.judge", "--rubric", "demo", "--input", str(inp),
         "--output", str(out), "--model", "random:tiny", "--tokenizer", "embedded"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]["principles"]) == {
        "harmlessness",
        "honesty",
        "helpfulness",
    }
    assert "Harmlessness" in res.stdout and "questions/s" in res.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    res = subprocess.run(
        [sys.executable, "-m", "qalign_jax.judge", "--input", str(bad), "--output", str(out),
         "--model", "random:tiny", "--tokenizer", "embedded"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0 and "needs string fields 'prompt' and 'response'" in res.stderr
