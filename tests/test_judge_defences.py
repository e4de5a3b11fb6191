"""The judge's defences (`judge_defences.py`): the substantive-answer gate, contextual
calibration and its length-matched variant, by hand and on the tiny random judge."""

import copy

import numpy as np
import pytest

from qalign_jax import judge as judge_lib
from qalign_jax import judge_defences, sharding
from qalign_jax import judge_robustness as rob
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import load
from tests.test_judge_robustness import BASE, PROMPT
from tests.test_rubric_rewards import SMALL


@pytest.fixture(scope="module")
def rubric():
    return rubric_lib.rubric_from_dict(copy.deepcopy(SMALL))


@pytest.fixture(scope="module")
def model():
    return load.load_model(
        "random:tiny", mesh=sharding.make_mesh((1, -1, 1)), tokenizer_source="embedded", seed=3
    )


def test_substantive_reasons(rubric):
    text = judge_defences.rubric_text(rubric)
    for response, reason in [
        ("", "empty"), (":", "empty"), ("Thought process:", "master_key"),
        ("Let's solve this step by step.", "master_key"), ("Solution", "master_key"),
        (PROMPT, "echoes_prompt"),
    ]:  # fmt: skip
        assert judge_defences.substantive_reasons(PROMPT, response, text) == [reason], response
    long_prompt = "Please explain in detail how I should bake a loaf of sourdough bread at home."
    assert judge_defences.substantive_reasons(long_prompt, long_prompt, text) == ["echoes_prompt"]
    real_rubric = rubric_lib.resolve_rubric("demo")
    echo = rob.build_echo_rubric(PROMPT, BASE, rob.scored_question_texts(real_rubric))
    assert judge_defences.substantive_reasons(
        PROMPT, echo, judge_defences.rubric_text(real_rubric)
    ) == ["echoes_rubric"]
    for fine in ["4", "Knead, proof and bake at 230C.", BASE, rob.build_padded(PROMPT, BASE, [])]:
        assert judge_defences.substantive_reasons(PROMPT, fine, text) == [], fine


def test_gate_vetoes_non_answers_and_keeps_answers(model, rubric):
    cfg = judge_lib.JudgeConfig(batch_size=2, question_chunk=4)
    plain = judge_lib.build_judge(model, rubric, cfg)
    gated = rob._variant(plain, substantive_gate=True)
    pairs = [(PROMPT, "Thought process:"), (PROMPT, "Knead the dough, proof, and bake it.")]
    before, after = judge_lib.score_pairs(plain, pairs), judge_lib.score_pairs(gated, pairs)
    assert after[0].scores.reward == -1.0 and set(after[0].scores.principles.values()) == {-1.0}
    assert after[0].scores.violated_gates[-1] == judge_defences.SUBSTANTIVE_GATE
    for qid, a in after[0].answers.items():  # the judge's answers are kept
        assert a.argmax == before[0].answers[qid].argmax
        np.testing.assert_array_equal(a.probs, before[0].answers[qid].probs)
    assert after[1].scores == before[1].scores


def test_calibrate_by_hand():
    probs = np.array([[[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.2, 0.3, 0.5]]])  # [B=1, Q=3, O=3]
    prior = np.array([[0.8, 0.2, 0.0], [0.8, 0.2, 0.0], [0.5, 0.3, 0.2]])
    valid = np.array([[True, True, False]] * 2 + [[True, True, True]])
    out = judge_defences.calibrate(probs, prior, valid)
    # q0: 1, 1 -> 0.5, 0.5; q1: 0.75, 2 -> 3/11, 8/11; q2: 0.4, 1, 2.5 -> / 3.9
    np.testing.assert_allclose(out[0, 0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out[0, 1], [3 / 11, 8 / 11, 0.0])
    np.testing.assert_allclose(out[0, 2], np.array([0.4, 1.0, 2.5]) / 3.9)


def test_calibrated_judge_is_uniform_on_the_content_free_pair(model, rubric):
    cfg = judge_lib.JudgeConfig(batch_size=2, question_chunk=4, skip_inapplicable=False)
    plain = judge_lib.build_judge(model, rubric, cfg)
    calibrated = rob._variant(plain, calibrate=True)
    (v,) = judge_lib.score_pairs(calibrated, [judge_defences.CONTENT_FREE])
    for q in rubric.questions:
        np.testing.assert_allclose(v.answers[q.id].probs, 1 / len(q.options), atol=1e-5)
    (raw,) = judge_lib.score_pairs(plain, [judge_defences.CONTENT_FREE])
    assert max(np.ptp(a.probs) for a in raw.answers.values()) > 1e-3  # the random judge has a bias
    with pytest.raises(ValueError, match="calibrate needs mode='logits'"):
        judge_lib.JudgeConfig(mode="generate", calibrate=True)
    cached = judge_lib.JudgeConfig(cache_entries=10)
    ns = judge_lib._namespace(judge_lib.build_judge(model, rubric, cached))
    with_cal = rob._variant(judge_lib.build_judge(model, rubric, cached), calibrate=True)
    assert judge_lib._namespace(with_cal) != ns


def test_calibrate_by_hand_with_a_prior_per_pair():
    probs = np.array([[[0.6, 0.4]], [[0.6, 0.4]]])  # [B=2, Q=1, O=2], the same answer twice
    prior = np.array([[[0.5, 0.5]], [[0.75, 0.25]]])  # [B, Q, O]: one prior per pair
    out = judge_defences.calibrate(probs, prior, np.array([[True, True]]))
    # pair 0: 1.2, 0.8 -> 0.6, 0.4; pair 1: 0.8, 1.6 -> 1/3, 2/3
    np.testing.assert_allclose(out[0, 0], [0.6, 0.4])
    np.testing.assert_allclose(out[1, 0], [1 / 3, 2 / 3])


def test_neutral_response_by_hand(monkeypatch):
    chars = lambda text: list(text)  # noqa: E731  one token per character
    monkeypatch.setattr(judge_defences, "NEUTRAL_TEXT", "N/A")
    assert judge_defences.neutral_response(chars, "".join, 10) == "N/A\nN/A\nN/"
    assert judge_defences.neutral_response(chars, "".join, 8) == "N/A\nN/A"  # the last \n strips
    assert judge_defences.neutral_response(chars, "".join, 3) == "N/A"


def test_length_prior_by_hand():
    """Bucket 0 or <= shortest: the content-free prior; above: times neutral(b) / neutral(16)."""
    on = {  # the fake judge's answers [Q=1, O=2] by the response it is shown
        "N/A": [[0.8, 0.2]],
        judge_defences.neutral_response(list, "".join, 16): [[0.5, 0.5]],
        judge_defences.neutral_response(list, "".join, 48): [[0.2, 0.8]],
    }
    seen = []

    def option_probs(judge, pair):
        seen.append(pair[1])
        return np.array(on[pair[1]])

    tok = type("Tok", (), {"encode": staticmethod(list), "decode": staticmethod("".join)})
    judge = type("J", (), {"model": type("M", (), {"params": object(), "tokenizer": tok})})()
    judge.memo = {}
    prior = lambda bucket: judge_defences.content_free_probs(judge, option_probs, bucket)  # noqa: E731
    np.testing.assert_allclose(prior(0), [[0.8, 0.2]])
    np.testing.assert_allclose(prior(16), [[0.8, 0.2]])  # short: as without length matching
    np.testing.assert_allclose(prior(48), [[0.8 * 0.2 / 0.5, 0.2 * 0.8 / 0.5]])  # 0.32, 0.32
    np.testing.assert_allclose(prior(48), [[0.32, 0.32]])
    assert len(seen) == 3  # each pair judged once (memo)
    assert sorted(judge.memo["priors"]) == [0, 16, 48]


def test_length_calibrated_judge_divides_out_the_neutral_length_effect(model, rubric):
    cfg = judge_lib.JudgeConfig(batch_size=2, question_chunk=4, skip_inapplicable=False)
    plain = judge_lib.build_judge(model, rubric, cfg)
    by_length = rob._variant(plain, calibrate=True, calibrate_length=True)
    calibrated = rob._variant(plain, calibrate=True)
    tok = model.tokenizer
    long = judge_defences.neutral_response(tok.encode, tok.decode, 48)
    short = judge_defences.neutral_response(tok.encode, tok.decode, 16)
    assert judge_lib.length_bucket(len(tok.encode(long))) == 48
    assert judge_lib.length_bucket(len(tok.encode(short))) == 16
    pairs = [(PROMPT, BASE), ("N/A", long), ("N/A", short)]
    got = judge_lib.score_pairs(by_length, pairs)
    assert sorted(by_length.memo["priors"]) == [0, 16, 48]
    (same,) = judge_lib.score_pairs(calibrated, [(PROMPT, BASE)])  # BASE: the shortest bucket
    for q in rubric.questions:  # batch and padding differ: float rounding only
        np.testing.assert_allclose(got[0].answers[q.id].probs, same.answers[q.id].probs, atol=1e-5)
    raw = judge_lib.score_pairs(plain, [judge_defences.CONTENT_FREE, *pairs[1:]])
    for q in rubric.questions:
        cf, _, p_short = (v.answers[q.id].probs for v in raw)
        # The long neutral response, divided by cf * long / short, reads as the short one
        # divided by cf: what the judge gives for length alone is gone.
        expected = p_short / cf
        np.testing.assert_allclose(got[1].answers[q.id].probs, expected / expected.sum(),
                                   rtol=1e-4)  # fmt: skip
        np.testing.assert_allclose(got[2].answers[q.id].probs, expected / expected.sum(),
                                   rtol=1e-4)  # fmt: skip
    assert (
        max(
            np.ptp(raw[1].answers[q.id].probs - raw[2].answers[q.id].probs)
            for q in rubric.questions
        )
        > 1e-3
    )  # fmt: skip  (the judge does see the length)


def test_length_calibration_is_off_by_default_keyed_and_needs_calibrate(model, rubric):
    from qalign_jax import config as config_lib

    assert judge_lib.JudgeConfig().calibrate_length is False
    assert config_lib.base_config().judge.calibrate_length is False
    assert judge_lib.config_of(config_lib.base_config().judge) == judge_lib.JudgeConfig()
    with pytest.raises(ValueError, match="calibrate_length .* set calibrate=True too"):
        judge_lib.JudgeConfig(calibrate_length=True)
    base = judge_lib.build_judge(model, rubric, judge_lib.JudgeConfig(cache_entries=10))
    calibrated = judge_lib._namespace(rob._variant(base, calibrate=True))
    by_length = judge_lib._namespace(rob._variant(base, calibrate=True, calibrate_length=True))
    assert len({judge_lib._namespace(base), calibrated, by_length}) == 3
