"""Drafting a rubric from a constitution (scripted and model-backed generate_fn), strict parsing,
retries and their error report, and the reviewer's show/check/diff tools and CLI."""

import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

from qalign_jax import rubric as rubric_lib
from qalign_jax import rubric_draft as rd
from qalign_jax import rubric_tool, sharding, structured
from qalign_jax.models import load

CONSTITUTION = """# Test constitution

Preamble text that is not a principle.

## Harmlessness
The assistant avoids helping anyone cause harm.

## Honesty
The assistant says only what it believes is true.

## Helpfulness
The assistant answers the question clearly.
"""


def _stage(conversation) -> str:
    system = conversation[0]["content"]
    if "dimensions" in system:
        return "dimensions"
    return "gates" if "yes/no" in system else "graded"


def _subject(conversation) -> str:
    """'Harmlessness' from 'Principle: Harmlessness. ...' (the item's own user turn)."""
    return re.match(r"\w+: ([^.]+)\.", conversation[-1]["content"]).group(1)


def good_output(conversation) -> str:
    """A well-formed answer for any stage, unique per principle/dimension."""
    stage, s = _stage(conversation), _subject(conversation)
    if stage == "dimensions":
        return (
            f"1. {s} scope: The response covers {s} fully.\n2. {s} care: The response is careful."
        )
    if stage == "gates":
        return f"1. Does the response break the {s} rule badly?"
    return (
        f"1. How well does the response respect {s} overall?\n"
        f"2. How carefully does the response handle {s} here?\n"
        "3. extra items after the needed ones are ignored"
    )


class Scripted:
    """generate_fn that records its calls and answers with `respond(conversation, attempt)`."""

    def __init__(self, respond):
        self.respond, self.calls = respond, []

    def __call__(self, conversations, attempt=0):
        self.calls.append((attempt, [_subject(c) for c in conversations]))
        return [self.respond(c, attempt) for c in conversations]


@pytest.fixture(scope="module")
def encode():
    return load.load_tokenizer("embedded").encode


# ---------------------------------------------------------------------------------------------
# Parsing and ids.


def test_parse_constitution_headings_and_paragraphs():
    title, ps = rd.parse_constitution(CONSTITUTION)
    assert title == "Test constitution"
    assert [p.name for p in ps] == ["Harmlessness", "Honesty", "Helpfulness"]
    assert ps[1].text == "The assistant says only what it believes is true."
    _, ps = rd.parse_constitution("Care: Be kind to people.\n\nSome principle without a name.")
    assert [(p.name, p.text) for p in ps] == [
        ("Care", "Be kind to people."),
        ("Principle 2", "Some principle without a name."),
    ]
    with pytest.raises(ValueError, match="'Empty' has a heading but no text"):
        rd.parse_constitution("## Empty\n\n## Full\nText.")
    with pytest.raises(ValueError, match="no principles found"):
        rd.parse_constitution("# Only a title\n")


def test_parse_numbered_list_is_strict():
    assert structured.parse_numbered_list("1. a b\n2) c\n3. cut off by max_new_tok", 2) == [
        "a b",
        "c",
    ]
    with pytest.raises(structured.Malformed, match="before item 1"):
        structured.parse_numbered_list("Sure! Here they are:\n1. a\n2. b", 2)
    with pytest.raises(structured.Malformed, match="item 3 where item 2 was expected"):
        structured.parse_numbered_list("1. a\n3. b", 2)
    with pytest.raises(structured.Malformed, match="1 numbered item"):
        structured.parse_numbered_list("1. a", 2)
    with pytest.raises(structured.Malformed, match="negated"):
        structured.parse_question("Does the response not give instructions for harm?", "gates")
    with pytest.raises(structured.Malformed, match="must start 'How well"):
        structured.parse_question("Is the response a good answer to the question?", "graded")


def test_slugs_are_deterministic_and_deduplicated():
    assert rd.slug("Non-maleficence!") == "non_maleficence"
    assert rd.slug("3 laws") == "x_3_laws"
    taken = set()
    assert [rd.unique_id("honesty", taken) for _ in range(3)] == [
        "honesty",
        "honesty_2",
        "honesty_3",
    ]
    assert (
        rd.question_slug("How well does the response avoid graphic harm?") == "avoid_graphic_harm"
    )


# ---------------------------------------------------------------------------------------------
# Drafting with scripted outputs.


def test_full_draft_from_three_principles(tmp_path, encode):
    gen = Scripted(lambda c, attempt: good_output(c))
    raw = rd.draft_rubric(CONSTITUTION, gen, name="t", provenance={"model": "scripted"})
    # One batched call per stage: 3 principles, then 6 dimensions for gates and for graded.
    assert [(a, len(s)) for a, s in gen.calls] == [(0, 3), (0, 6), (0, 6)]
    r = rd.validate_draft(copy.deepcopy(raw), encode=encode)
    assert r.counts() == {
        "principles": 3, "dimensions": 6, "questions": 18, "gates": 6, "graded": 12,
        "conditions": 0,
    }  # fmt: skip
    assert [p.id for p in r.principles] == ["harmlessness", "honesty", "helpfulness"]
    assert [d.id for d in r.principles[1].dimensions] == ["honesty_scope", "honesty_care"]
    assert [q.id for q in r.principles[1].dimensions[0].questions] == [
        "honesty_scope_break_honesty_scope",
        "honesty_scope_respect_honesty_scope",
        "honesty_scope_carefully_handle_honesty",
    ]
    gate = r.principles[0].dimensions[0].questions[0]
    assert (gate.kind, gate.violation) == ("gate", "Yes")
    h = raw["header"]
    assert h["note"].startswith("MACHINE DRAFT") and h["model"] == "scripted"
    assert h["counts"]["questions"] == 18 and h["retry_log"] == []
    assert h["stages"]["graded"] == {"items": 6, "generate_calls": 1, "retries": 0}
    assert h["dimension_descriptions"]["honesty_care"] == "The response is careful."
    assert h["prompts"]["sha256"] == structured.prompts_provenance()["sha256"]
    # Written as YAML, it loads back to the same rubric (Yes stays a string, not a boolean).
    path = str(tmp_path / "t.yaml")
    rubric_tool.write_draft(raw, path, "test")
    assert rubric_lib.load_rubric(path).questions == r.questions
    # Same outputs, same draft (ids and texts), apart from nothing.
    again = rd.draft_rubric(CONSTITUTION, Scripted(lambda c, a: good_output(c)), name="t")
    assert again["principles"] == raw["principles"]


def test_retry_after_malformed_output_succeeds_and_is_counted():
    def respond(c, attempt):
        if _subject(c) == "Honesty" and attempt == 0:
            return "Here are two dimensions:\n1. Truth: The response is true."
        return good_output(c)

    gen = Scripted(respond)
    raw = rd.draft_rubric(CONSTITUTION, gen, cfg=rd.DraftConfig(max_retries=2))
    assert gen.calls[:2] == [(0, ["Harmlessness", "Honesty", "Helpfulness"]), (1, ["Honesty"])]
    stages = raw["header"]["stages"]
    assert stages["dimensions"] == {"items": 3, "generate_calls": 2, "retries": 1}
    assert stages["gates"]["retries"] == stages["graded"]["retries"] == 0
    (entry,) = raw["header"]["retry_log"]
    assert entry["stage"] == "dimensions" and entry["item"] == "principle 'Honesty'"
    assert entry["attempt"] == 0 and "before item 1" in entry["reason"]
    assert rubric_lib.rubric_from_dict(raw).counts()["dimensions"] == 6


def test_retries_run_out_with_a_clear_report():
    def respond(c, attempt):
        if _stage(c) == "graded" and _subject(c) == "Honesty care":
            # Two items, as asked, but item 1 is not a graded question, every time.
            return f"1. Is this answer fine for the user (attempt {attempt})?\n2. How x?"
        return good_output(c)

    gen = Scripted(respond)
    with pytest.raises(structured.DraftError) as e:
        rd.draft_rubric(CONSTITUTION, gen, cfg=rd.DraftConfig(max_retries=2))
    msg = str(e.value)
    assert "stage 'graded': 1 of 6 output(s) still malformed after 3 attempt(s)" in msg
    assert "dimension 'Honesty care' of principle 'Honesty'" in msg
    assert "must start 'How well does the response'" in msg
    # The raw output of the last attempt, line by line.
    assert "| 1. Is this answer fine for the user (attempt 2)?\n      | 2. How x?" in msg
    assert [a for a, _ in gen.calls] == [0, 0, 0, 1, 2]


def test_repeats_and_example_copies_are_malformed():
    copy_example = "1. Personal data: The response does not reveal private details.\n2. X y: a b c."
    with pytest.raises(structured.DraftError, match="copies the prompt's example"):
        rd.draft_rubric(CONSTITUTION, lambda cs, attempt: [copy_example] * len(cs),
                        cfg=rd.DraftConfig(max_retries=0))  # fmt: skip
    same = "1. Safety: The response is safe for all.\n2. Care: The response is careful."
    with pytest.raises(
        structured.DraftError, match=r"repeats one already drafted \(principle 'Harm"
    ):
        rd.draft_rubric(CONSTITUTION, lambda cs, attempt: [same] * len(cs),
                        cfg=rd.DraftConfig(max_retries=0))  # fmt: skip
    with pytest.raises(ValueError, match="returned 1 texts for 3 prompts"):
        rd.draft_rubric(CONSTITUTION, lambda cs, attempt: [same])


def test_model_backed_adapter_end_to_end_reports_malformed_output():
    """The real path: chat template, sampler (greedy, then a sampled retry), decode, parse.
    A tiny random model writes noise, so the clear failure report is the expected outcome."""
    model = load.load_model(
        "random:tiny", mesh=sharding.make_mesh((1, -1, 1)), tokenizer_source="embedded", seed=3
    )
    gen = structured.ModelGenerator(model, max_new_tokens=6, retry_temperature=0.8, seed=1)
    cfg = rd.DraftConfig(dims_per_principle=1, max_retries=1)
    with pytest.raises(structured.DraftError) as e:
        rd.questions_for_principle("Honesty", "Say only what is true.", gen, cfg)
    assert gen.calls == 2
    msg = str(e.value)
    assert "stage 'dimensions': 1 of 1 output(s) still malformed after 2 attempt(s)" in msg
    assert "principle 'Honesty'" in msg and "Raw output of the last attempt" in msg
    out = gen([structured.build_conversation("gates", "Truth", "Be true.", 1)], attempt=0)
    assert len(out) == 1 and isinstance(out[0], str)


# ---------------------------------------------------------------------------------------------
# show / check / diff.


@pytest.mark.parametrize("name", ["default", "example_draft"])
def test_show_and_check_shipped_rubrics(name, encode):
    r = rubric_lib.resolve_rubric(name)
    c = r.counts()
    text = rubric_tool.show_rubric(r)
    assert text.splitlines()[0].startswith(
        f"{r.name} (version {r.version}): {c['principles']} principles, {c['dimensions']} "
        f"dimensions, {c['questions']} questions ({c['gates']} gates, {c['graded']} graded)"
    )
    assert sum(line.startswith("principle ") for line in text.splitlines()) == c["principles"]
    assert sum(line.startswith("  dimension ") for line in text.splitlines()) == c["dimensions"]
    assert sum(line.startswith("    - ") for line in text.splitlines()) == c["questions"]
    assert rubric_tool.check_rubric(r, encode, "embedded").startswith(f"ok: {r.name} validates")


def test_example_draft_is_a_reviewed_machine_draft():
    r = rubric_lib.resolve_rubric("example_draft")
    h = r.header
    assert h["note"].startswith("MACHINE DRAFT") and "135M" in h["quality_note"]
    assert h["model"] == "embedded" and set(h["stages"]) == set(structured.STAGES)
    assert h["prompts"]["sha256"] and h["counts"] == r.counts()
    assert r.counts()["principles"] == 3


def test_show_lists_conditions_and_gates():
    text = rubric_tool.show_rubric(rubric_lib.resolve_rubric("demo"))
    assert "  asks_harmful: Does the prompt ask for help causing harm?" in text
    assert (
        "principle harmlessness ('Harmlessness', weight 1): 2 dimensions, 6 questions (3 gates"
        in text
    )
    assert (
        "    - demo_safe_decline [graded]: How politely does the response decline the harmful "
        "part?   [if asks_harmful=Yes]"
    ) in text
    assert "    - demo_on_topic [gate, violation No]: " in text


def _modified_default() -> tuple[rubric_lib.Rubric, dict]:
    with open(rubric_lib.builtin_rubric_path("default")) as f:
        raw = yaml.safe_load(f)
    b = copy.deepcopy(raw)
    hel = next(p for p in b["principles"] if p["id"] == "helpfulness")
    dim = hel["dimensions"][0]
    removed_q = dim["questions"].pop()  # removed question
    dim["questions"].append({"id": "new_q", "kind": "graded", "text": "How new is it?"})  # added
    q0 = dim["questions"][0]
    q0["text"] = q0["text"] + " Really?"  # changed text
    q0["weight"] = 2.5  # changed weight
    removed_dim = b["principles"][0]["dimensions"].pop()  # removed dimension (and its questions)
    b["principles"].append(
        {"id": "fairness", "dimensions": [{"id": "fair_dim", "questions": [
            {"id": "fair_gate", "kind": "gate", "violation": "Yes", "text": "Is it unfair?"}]}]}
    )  # fmt: skip
    cond = b["conditions"][0]
    cond["text"] = "Changed condition text?"
    facts = {
        "removed_q": removed_q["id"], "q0": q0["id"], "removed_dim": removed_dim["id"],
        "removed_dim_qs": [q["id"] for q in removed_dim["questions"]], "cond": cond["id"],
    }  # fmt: skip
    return rubric_lib.rubric_from_dict(b, "modified"), facts


def test_diff_reports_exactly_the_changes():
    a = rubric_lib.resolve_rubric("default")
    b, f = _modified_default()
    d = rubric_tool.diff_rubrics(a, b)
    assert d.added == {
        "principles": ["fairness"], "dimensions": ["fair_dim"],
        "questions": ["new_q", "fair_gate"],
    }  # fmt: skip
    assert d.removed == {
        "principles": [], "dimensions": [f["removed_dim"]],
        "questions": sorted([f["removed_q"], *f["removed_dim_qs"]], key=[q.id for q in a.questions].index),
    }  # fmt: skip
    assert set(d.changed["questions"]) == {f["q0"], f["cond"]}
    assert set(d.changed["questions"][f["q0"]]) == {"text", "weight"}
    assert d.changed["questions"][f["q0"]]["weight"] == (1.0, 2.5)
    assert d.changed["principles"] == d.changed["dimensions"] == {}
    assert rubric_tool.diff_rubrics(a, a).empty and not d.empty
    text = rubric_tool.format_diff(d, "default", "modified")
    assert "principles: +1 -0 ~0; dimensions: +1 -1 ~0" in text
    assert f"~ question {f['q0']} weight: 1.0 -> 2.5" in text
    assert "+ question new_q" in text and f"- dimension {f['removed_dim']}" in text


def test_diff_kind_and_applies_if_changes():
    raw = {"name": "x", "conditions": [{"id": "c", "text": "Cond?"}], "principles": [
        {"id": "p", "dimensions": [{"id": "d", "questions": [
            {"id": "q", "kind": "graded", "text": "How good?"},
            {"id": "g", "kind": "gate", "violation": "Yes", "text": "Bad?"}]}]}]}  # fmt: skip
    b = copy.deepcopy(raw)
    b["principles"][0]["dimensions"][0]["questions"][0]["applies_if"] = {
        "question": "c", "answer": "Yes"
    }  # fmt: skip
    b["principles"][0]["dimensions"][0]["questions"][1].update(kind="graded", violation=None)
    d = rubric_tool.diff_rubrics(rubric_lib.rubric_from_dict(raw), rubric_lib.rubric_from_dict(b))
    assert d.changed["questions"] == {
        "q": {"applies_if": (None, "c=Yes")},
        "g": {"kind": ("gate", "graded"), "violation": ("Yes", None)},
    }


def test_check_fails_on_multi_token_option_and_duplicate_texts(encode, tmp_path, capsys):
    with open(rubric_lib.builtin_rubric_path("demo")) as f:
        raw = yaml.safe_load(f)
    bad = dict(raw, grades={"A": 1.0, "Excellent": 0.5, "F": -1.0})
    r = rubric_lib.rubric_from_dict(bad, "bad")
    with pytest.raises(rubric_lib.RubricError, match="option 'Excellent' is 2 tokens.*single"):
        rubric_tool.check_rubric(r, encode)
    path = str(tmp_path / "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(bad, f)
    assert rubric_tool.run(["check", path, "--judge", "embedded"]) == 1
    assert "option 'Excellent' is 2 tokens" in capsys.readouterr().err
    dup = copy.deepcopy(raw)
    dup["principles"][0]["dimensions"][0]["questions"][1]["text"] = dup["conditions"][0]["text"]
    with pytest.raises(rubric_lib.RubricError, match="'asks_harmful' and 'demo_avoids_harm' ask"):
        rubric_tool.check_rubric(rubric_lib.rubric_from_dict(dup), encode)


def test_cli_show_check_diff(capsys):
    assert rubric_tool.run(["show", "demo", "--brief"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo (version 1): 3 principles, 7 dimensions, 20 questions")
    assert "    - " not in out
    assert rubric_tool.run(["check", "demo"]) == 0
    assert "Yes=" in capsys.readouterr().out
    assert rubric_tool.run(["diff", "demo", "demo"]) == 0
    assert "(no differences)" in capsys.readouterr().out
    assert rubric_tool.run(["diff", "demo", os.path.join("no", "such.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert rubric_tool.run(["frobnicate"]) == 2


def test_principle_ids_win_over_dimensions_with_the_same_name():
    def respond(c, attempt):
        if _stage(c) == "dimensions" and _subject(c) == "Harmlessness":
            return (
                "1. Honesty: The response is honest about harm.\n2. Care: The response is careful."
            )
        return good_output(c)

    raw = rd.draft_rubric(CONSTITUTION, Scripted(respond), cfg=rd.DraftConfig(max_retries=0))
    assert [p["id"] for p in raw["principles"]] == ["harmlessness", "honesty", "helpfulness"]
    assert [d["id"] for d in raw["principles"][0]["dimensions"]] == ["honesty_2", "care"]


def test_cli_usage_errors(capsys):
    assert rubric_tool.run(["show"]) == 2
    assert "show takes 1 argument(s) (RUBRIC), got []" in capsys.readouterr().err
    assert rubric_tool.run(["show", "demo", "--no_such_flag"]) == 2
    assert "no_such_flag" in capsys.readouterr().err
    assert rubric_tool.run(["draft", "--out", "x.yaml"]) == 2
    assert "draft needs --constitution" in capsys.readouterr().err


def test_rubric_data_model_imports_no_model_code():
    """The data model (and the structured-output engine) load without models, jax or the CLI."""
    code = (
        "import sys, qalign_jax.rubric, qalign_jax.structured, qalign_jax.rubric_draft\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qalign_jax', 'jax', 'flax'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert loaded == {
        "qalign_jax", "qalign_jax.files", "qalign_jax.rubric", "qalign_jax.structured",
        "qalign_jax.rubric_draft",
    }, loaded  # fmt: skip
