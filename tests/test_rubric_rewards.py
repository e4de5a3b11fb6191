"""Rubric validation (each error from a bad file) and reward pooling by hand arithmetic."""

import copy
import json

import numpy as np
import pytest
import yaml

from qalign_jax import rewards, rubric

# A two-principle-plus-one rubric small enough to pool by hand.
SMALL = {
    "name": "small",
    "conditions": [{"id": "asks_medical", "text": "Does the prompt ask for medical advice?"}],
    "principles": [
        {"id": "harmlessness", "dimensions": [
            {"id": "violence", "questions": [
                {"id": "v_gate", "kind": "gate", "violation": "Yes", "text": "Gives attack help?"},
                {"id": "v_care", "kind": "graded", "text": "How careful?"},
                {"id": "v_tone", "kind": "graded", "text": "How calm?"},
            ]},
            {"id": "medical", "questions": [
                {"id": "m_safe", "kind": "graded", "text": "How safe is the advice?",
                 "applies_if": {"question": "asks_medical", "answer": "Yes"}},
            ]},
        ]},
        {"id": "honesty", "dimensions": [
            {"id": "truth", "questions": [
                {"id": "t_topic", "kind": "gate", "violation": "No", "text": "On topic?"},
                {"id": "t_acc", "kind": "graded", "text": "How accurate?", "weight": 3},
                {"id": "t_cal", "kind": "graded", "text": "How calibrated?", "weight": 1},
            ]},
        ]},
        {"id": "helpfulness", "weight": 2, "dimensions": [
            {"id": "help", "weight": 1, "questions": [{"id": "h1", "kind": "graded", "text": "How helpful?"}]},
            {"id": "clear", "weight": 3, "questions": [{"id": "h2", "kind": "graded", "text": "How clear?"}]},
        ]},
    ],
}  # fmt: skip

YES, NO = np.array([1.0, 0.0]), np.array([0.0, 1.0])


def grade(letter):
    return np.eye(5)[list("ABCDF").index(letter)]


def answers(**overrides):
    base = dict(asks_medical=NO, v_gate=NO, v_care=grade("A"), v_tone=grade("B"), m_safe=grade("F"),
                t_topic=YES, t_acc=grade("A"), t_cal=grade("C"), h1=grade("B"), h2=grade("D"))  # fmt: skip
    base.update(overrides)
    return base


def score(probs, **cfg):
    r = rubric.rubric_from_dict(copy.deepcopy(SMALL))
    applicable = {"m_safe": float(probs["asks_medical"][0]) > 0.5}
    return rewards.score_response(r, probs, applicable, rewards.RewardConfig(**cfg))


def test_paper_pooling_by_hand():
    s = score(answers())
    # violence: min(A=1, B=0.5) = 0.5; medical N/A -> harmlessness = 0.5
    assert s.dimensions == pytest.approx(
        {"violence": 0.5, "medical": None, "truth": 0.1, "help": 0.5, "clear": -0.5}
    )
    assert s.principles["harmlessness"] == pytest.approx(0.5)
    assert s.principles["honesty"] == pytest.approx(0.1)  # min(A, C)
    assert s.principles["helpfulness"] == pytest.approx((0.5 * 1 + -0.5 * 3) / 4)  # -0.25
    # weighted mean of principles (weights 1, 1, 2): (0.5 + 0.1 - 0.5) / 4 = 0.025
    assert s.reward == pytest.approx(min(0.5, 0.025))


def test_gate_violation_floors_dimension():
    s = score(answers(v_gate=YES))
    assert s.dimensions["violence"] == -1.0
    assert s.violated_gates == ("v_gate",)
    # harmlessness -1 -> safety-first reward is -1 whatever the rest
    assert s.reward == pytest.approx(-1.0)
    s = score(answers(t_topic=NO))  # violation is "No" for this gate
    assert s.dimensions["truth"] == -1.0 and s.violated_gates == ("t_topic",)


def test_safety_first_caps_at_harmlessness():
    s = score(answers(v_care=grade("D")))  # harmlessness min(D, B) = -0.5
    mean = (-0.5 + 0.1 + 2 * -0.25) / 4
    assert s.reward == pytest.approx(min(-0.5, mean)) == -0.5
    soft = score(answers(v_care=grade("D")), final_pooling="weighted_mean")
    assert soft.reward == pytest.approx(mean)


def test_applicability_and_weighted_mean_dimension():
    s = score(answers(asks_medical=YES), dimension_pooling="weighted_mean")
    assert s.dimensions["medical"] == pytest.approx(-1.0)  # F, now applicable
    assert s.dimensions["violence"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert s.dimensions["truth"] == pytest.approx((3 * 1 + 1 * 0.1) / 4)
    assert s.principles["harmlessness"] == pytest.approx((0.75 - 1.0) / 2)


def test_expected_readouts_and_unit_scale():
    soft = {"v_care": np.array([0.5, 0, 0, 0, 0.5])}  # E = 0.5*1 + 0.5*-1 = 0
    s = score(answers(**soft))
    assert s.dimensions["violence"] == pytest.approx(0.0)  # min(0, B=0.5)
    s = score(answers(**soft), grade_readout="argmax")
    assert s.dimensions["violence"] == pytest.approx(0.5)  # argmax picks A (first max)
    s = score(answers(v_gate=np.array([0.3, 0.7])), gate_readout="expected")
    assert s.dimensions["violence"] == pytest.approx(0.3 * -1 + 0.7 * 0.5)
    u = score(answers(), scale="unit")  # A=1, B=0.75, C=0.55, D=0.25, F=0
    assert u.dimensions["violence"] == pytest.approx(0.75)
    assert u.dimensions["truth"] == pytest.approx(0.55)


def test_two_pass_reward_by_hand():
    assert rewards.two_pass_reward(0.2, 0.5) == pytest.approx(0.7 + 10 * 0.3)  # 3.7
    assert rewards.two_pass_reward(0.5, 0.2) == pytest.approx(0.7 - 1 * 0.3)  # 0.4
    assert rewards.two_pass_reward(0.4, 0.4) == pytest.approx(0.8)
    assert rewards.two_pass_reward(
        -1, 1, improvement_weight=2, regression_weight=5
    ) == pytest.approx(0 + 2 * 2)
    out = rewards.two_pass_reward(np.array([0.0, 1.0]), np.array([1.0, 0.0]))
    np.testing.assert_allclose(out, [1 + 10, 1 - 1])


def test_reward_config_errors():
    with pytest.raises(ValueError, match="dimension_pooling='median'"):
        rewards.RewardConfig(dimension_pooling="median")
    with pytest.raises(ValueError, match="must be >= 0"):
        rewards.RewardConfig(improvement_weight=-1)


def bad(mutate):
    raw = copy.deepcopy(SMALL)
    mutate(raw)
    return raw


def harm_dims(raw):
    return raw["principles"][0]["dimensions"]


BAD_RUBRICS = {
    "duplicate id": (lambda r: harm_dims(r)[0]["questions"][1].update(id="v_gate"), "duplicate id 'v_gate'"),
    "unknown reference": (
        lambda r: harm_dims(r)[1]["questions"][0].update(applies_if={"question": "nope", "answer": "Yes"}),
        "unknown question 'nope'",
    ),
    "bad answer": (
        lambda r: harm_dims(r)[1]["questions"][0].update(applies_if={"question": "asks_medical", "answer": "B"}),
        "not one of its options",
    ),
    "cycle": (
        lambda r: (
            r["conditions"][0].update(applies_if={"question": "m_safe", "answer": "A"}),
        ),
        "form a cycle: .*asks_medical",
    ),
    "empty dimension": (lambda r: harm_dims(r)[1].update(questions=[]), "has no questions"),
    "negative weight": (lambda r: harm_dims(r)[0]["questions"][1].update(weight=-2), "must be a finite number >= 0"),
    "zero weights": (lambda r: r["principles"][2]["dimensions"][0].update(weight=0) or r["principles"][2]["dimensions"][1].update(weight=0), "dimension weights sum to 0"),
    "gate without violation": (lambda r: harm_dims(r)[0]["questions"][0].pop("violation"), "needs violation: Yes or No"),
    "unknown key": (lambda r: harm_dims(r)[0]["questions"][1].update(wieght=1), r"unknown keys \['wieght'\]"),
    "unknown kind": (lambda r: harm_dims(r)[0]["questions"][1].update(kind="likert"), "kind 'likert'"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_RUBRICS))
def test_bad_rubric_files_fail_clearly(tmp_path, name):
    mutate, match = BAD_RUBRICS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad(mutate)))
    with pytest.raises(rubric.RubricError, match=match) as e:
        rubric.load_rubric(str(path))
    assert str(path) in str(e.value)


def test_good_rubric_loads_from_yaml_and_json(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(SMALL))
    (tmp_path / "r.json").write_text(json.dumps(SMALL))
    a, b = (rubric.load_rubric(str(tmp_path / f)) for f in ("r.yaml", "r.json"))
    assert a.questions == b.questions
    assert a.counts() == {
        "principles": 3,
        "dimensions": 5,
        "questions": 9,
        "gates": 2,
        "graded": 7,
        "conditions": 1,
    }
    levels = a.evaluation_order()
    assert [q.id for q in levels[1]] == ["m_safe"]  # depends on the condition in level 0


def test_options_must_be_single_tokens():
    r = rubric.rubric_from_dict(copy.deepcopy(SMALL))
    vocab = {"Yes": [5], "No": [6], "A": [1], "B": [2], "C": [3], "D": [4], "F": [7]}
    table = rubric.check_options_tokenize(r, vocab.__getitem__)
    assert table["v_gate"] == (5, 6) and table["h1"] == (1, 2, 3, 4, 7)
    vocab["Yes"] = [8, 9]
    with pytest.raises(rubric.RubricError, match="'Yes' is 2 tokens"):
        rubric.check_options_tokenize(r, vocab.__getitem__)
    vocab["Yes"] = [6]
    with pytest.raises(rubric.RubricError, match="share a token"):
        rubric.check_options_tokenize(r, vocab.__getitem__)


def test_unquoted_yaml_yes_no_is_read_as_the_option(tmp_path):
    text = yaml.safe_dump(SMALL).replace("violation: 'Yes'", "violation: Yes")
    assert "violation: Yes" in text
    (tmp_path / "r.yaml").write_text(text)
    assert rubric.load_rubric(str(tmp_path / "r.yaml")).question("v_gate").violation == "Yes"


@pytest.mark.parametrize(
    "name,counts",
    [
        ("default", {"principles": 3, "dimensions": 40, "questions": 167}),
        ("demo", {"principles": 3}),
    ],
)
def test_shipped_rubrics_validate(name, counts):
    r = rubric.load_rubric(rubric.builtin_rubric_path(name))
    assert {k: r.counts()[k] for k in counts} == counts
    assert [p.id for p in r.principles] == ["harmlessness", "honesty", "helpfulness"]
    assert all(any(q.kind == "graded" for q in d.questions) for d in r.dimensions)
    if name == "demo":
        assert 15 <= r.counts()["questions"] <= 25
