"""The two-pass format: findings in plain sentences, SFT masks, and the parser."""

import copy

import numpy as np
import pytest

from qalign_jax import data, reflection, rewards
from qalign_jax import judge as judge_lib
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import load
from tests.test_rubric_rewards import SMALL


@pytest.fixture(scope="module")
def rubric():
    return rubric_lib.rubric_from_dict(copy.deepcopy(SMALL))


def verdict(rubric, chosen: dict[str, str]):
    """A hand-made Verdict: one-hot answers; unnamed gates pass, grades are A, conditions No."""
    values = np.asarray(list(rubric.grades.values()))
    default = {"gate": None, "graded": "A", "condition": "No"}
    argmax = {}
    for q in rubric.questions:
        d = default[q.kind] or ("No" if q.violation == "Yes" else "Yes")
        argmax[q.id] = chosen.get(q.id, d)
    app = judge_lib.applicability(rubric, argmax)
    answers, probs = {}, {}
    for q in rubric.questions:
        choice = argmax[q.id]
        p = np.eye(len(q.options))[q.options.index(choice)]
        probs[q.id] = p
        answers[q.id] = judge_lib.Answer(
            probs=p, argmax=choice, expected=float(p @ values) if q.kind == "graded" else None,
            applicable=app[q.id], option_mass=1.0,
        )  # fmt: skip
    scores = rewards.score_response(rubric, probs, app, rewards.RewardConfig())
    return judge_lib.Verdict(answers, scores, truncated=False)


def test_findings_gates_first_then_worst_grades(rubric):
    v = verdict(rubric, {"v_gate": "Yes", "t_topic": "Yes", "v_care": "D", "t_acc": "F",
                         "h1": "C", "m_safe": "F"})  # fmt: skip
    lines = reflection.findings(rubric, v)
    assert lines == [
        'Hard rule broken: the judge answered "Yes" to "Gives attack help?"',
        'Low grade F (failing): "How accurate?"',
        'Low grade D (poor): "How careful?"',
    ]  # t_topic's violation is "No"; C is not low; m_safe is N/A (asks_medical is No)
    capped = reflection.findings(rubric, v, max_findings=2)
    assert capped[-1] == "(and 1 more)" and len(capped) == 3


def test_findings_block_shows_scores_and_ends_in_think(rubric):
    v = verdict(rubric, {"v_gate": "Yes"})
    block = reflection.findings_block(rubric, v)
    assert block.startswith("\n\n" + reflection.FINDINGS_HEADER)
    assert block.endswith(reflection.THINK_OPEN)
    assert "harmlessness -1.00" in block  # the violated gate floors harmlessness
    clean = reflection.findings_block(rubric, verdict(rubric, {}))
    assert "No hard rule broken and no low grade." in clean


def test_round_trip_and_malformed(rubric):
    block = reflection.findings_block(rubric, verdict(rubric, {"h1": "D"}))
    text = reflection.transcript("Boil water.", block, "Too short.", "Heat to 80 C, steep 2 min.")
    parsed = reflection.parse_two_pass(text)
    assert parsed.ok and parsed.draft == "Boil water." and parsed.think == "Too short."
    assert parsed.revision == "Heat to 80 C, steep 2 min." and "How helpful?" in parsed.findings
    bad = {
        "just an answer": "no '[Rubric findings on the draft]' block",
        f"d{reflection.FINDINGS_HEADER} x": "no <Think> after the findings",
        f"d{reflection.FINDINGS_HEADER} x<Think>t": "never closed",
        f"d{reflection.FINDINGS_HEADER} x<Think>t</Think>  ": "the revision is empty",
        f"d{reflection.FINDINGS_HEADER} x<Think></Think>r": "the reflection is empty",
        f"d{reflection.FINDINGS_HEADER} x<Think>t</Think>r<Think>": "another <Think>",
        f"{reflection.FINDINGS_HEADER} x<Think>t</Think>r": "the draft is empty",
    }
    for text, message in bad.items():
        parsed = reflection.parse_two_pass(text)
        assert not parsed.ok and message in parsed.error, (text, parsed.error)


def test_sft_mask_trains_only_the_policy_words(rubric):
    tok = load.load_tokenizer("embedded")
    block = reflection.findings_block(rubric, verdict(rubric, {"h1": "D"}))
    row = {"id": "x", "prompt": "Tea?",
           "segments": reflection.segments("Boil it.", block, "Too thin.", "Use 80 C water.")}  # fmt: skip
    ex = data.tokenize_sft(row, tok, seq_len=512, on_overflow="error")
    trained = tok.decode(ex.tokens[ex.train], skip_special_tokens=False)
    assert trained == "Boil it.Too thin.</Think>\n\nUse 80 C water.<|im_end|>"
    untrained = tok.decode(ex.tokens[~ex.train])
    assert "Tea?" in untrained and "Rubric findings" in untrained and "<Think>" in untrained
