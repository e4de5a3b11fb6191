"""The two-pass answer format: draft -> rubric findings -> <Think> reflection -> revision.

One assistant turn holds the whole transcript:

    {draft}                                          <- policy (trained)
    \\n\\n[Rubric findings on the draft]\\n             <- inserted by the pipeline (not trained)
    Scores: Harmlessness 0.20, ... (-1 worst, 1 best).
    - Hard rule broken: the judge answered "Yes" to "Does the response ...?"
    - Low grade D (poor): "How ...?"
    Reflect on these findings, then write the improved answer.
    \\n\\n<Think>
    {think}</Think>\\n\\n{revision}<end of turn>      <- policy (trained)

The draft ends where the policy stops on its own (its end-of-turn token), so pass 1 of a GRPO
rollout is an ordinary chat answer and a primed model still answers in one pass when nobody
inserts findings. The pipeline then drops that end-of-turn token and appends `findings_block`
(which ends with the forced `<Think>`); the policy continues with its reflection, `</Think>`
and the revision. Only the policy's own words are trained: the draft, and everything after the
forced `<Think>` (the reflection, `</Think>`, the revision and its end of turn).

`findings_block` verbalizes a judge `Verdict` in plain sentences: violated gates first, then
the grades whose value is negative (D and F on the default scale), worst first, capped at
`max_findings`. `parse_two_pass` splits a full transcript and
`parse_continuation` a pass-2 output; both name what is malformed instead of guessing.
"""

from __future__ import annotations

import dataclasses

from qalign_jax import rubric as rubric_lib

FINDINGS_HEADER = "[Rubric findings on the draft]"
THINK_OPEN, THINK_CLOSE = "<Think>", "</Think>"
# No literal tags here: the parser finds the reflection by the first <Think> after the header.
INSTRUCTION = "Reflect on these findings, then write the improved answer."
GRADE_WORDS = {"A": "excellent", "B": "good", "C": "adequate", "D": "poor", "F": "failing"}


def findings(rubric: rubric_lib.Rubric, verdict, *, max_findings=6):
    """Plain-sentence findings on one judged response: violated gates, then low grades.

    Args:
      rubric: the rubric the verdict answers.
      verdict: a `judge.Verdict` (answers with argmax/expected/applicable, scores).
      max_findings: the most sentences kept (gates first, then grades from the worst up);
        the rest are counted in a final "and N more" line.
    """
    gates, grades = [], []
    for q in rubric.questions:
        a = verdict.answers[q.id]
        if not a.applicable or a.argmax is None:
            continue
        if q.kind == "gate" and a.argmax == q.violation:
            gates.append(_gate_line(q))
        elif q.kind == "graded" and rubric.grades[a.argmax] < 0:  # below the scale's middle
            grades.append((a.expected, _grade_line(q, a.argmax)))
    grades.sort(key=lambda g: g[0])
    lines = gates + [text for _, text in grades]
    if len(lines) > max_findings:
        lines = lines[:max_findings] + [f"(and {len(lines) - max_findings} more)"]
    return lines


def _gate_line(q) -> str:
    return f'Hard rule broken: the judge answered "{q.violation}" to "{q.text}"'


def _grade_line(q, letter: str) -> str:
    word = f" ({GRADE_WORDS[letter]})" if letter in GRADE_WORDS else ""
    return f'Low grade {letter}{word}: "{q.text}"'


def _block(scores: str, lines: list[str]) -> str:
    bullet = "\n".join(f"- {line}" for line in lines)
    return (
        f"\n\n{FINDINGS_HEADER}\nScores: {scores} (higher is better).\n{bullet}\n"
        f"{INSTRUCTION}\n\n{THINK_OPEN}"
    )


def findings_block(rubric: rubric_lib.Rubric, verdict, *, max_findings: int = 6) -> str:
    """The inserted (untrained) text between the draft and the reflection, ending in <Think>."""
    names = {p.id: p.name for p in rubric.principles}
    scores = ", ".join(
        f"{names[pid]} {s:.2f}" if s is not None else f"{names[pid]} n/a"
        for pid, s in verdict.scores.principles.items()
    )
    lines = findings(rubric, verdict, max_findings=max_findings) or [
        "No hard rule broken and no low grade."
    ]
    return _block(scores, lines)


def findings_block_max_tokens(rubric: rubric_lib.Rubric, encode, max_findings: int = 6) -> int:
    """An upper bound on the tokens of any `findings_block` of this rubric (sizes caches)."""
    worst = min(rubric.grades, key=rubric.grades.get)
    lines = [_gate_line(q) if q.kind == "gate" else _grade_line(q, worst)
             for q in rubric.questions if q.kind in ("gate", "graded")]  # fmt: skip
    lines = sorted(lines, key=lambda t: len(encode(t)), reverse=True)[:max_findings]
    lines.append(f"(and {len(rubric.questions)} more)")
    scores = ", ".join(f"{p.name} -1.00" for p in rubric.principles)
    return len(encode(_block(scores, lines))) + 8  # + BPE merges across line boundaries


def segments(draft: str, block: str, think: str, revision: str) -> list[dict]:
    """SFT segments (`data.read_sft_jsonl`'s format) of a stitched two-pass example."""
    return [
        {"text": draft, "train": True},
        {"text": block, "train": False},
        {"text": f"{think}{THINK_CLOSE}\n\n{revision}", "train": True},
    ]


def transcript(draft: str, block: str, think: str, revision: str) -> str:
    return "".join(s["text"] for s in segments(draft, block, think, revision))


@dataclasses.dataclass(frozen=True)
class TwoPass:
    draft: str
    findings: str  # the inserted block without the markers ('' if absent)
    think: str
    revision: str
    error: str | None  # None when well formed; else what is wrong

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_continuation(text: str) -> tuple[str, str, str | None]:
    """Splits a pass-2 output (generated after the forced <Think>) into (think, revision, error)."""
    if THINK_CLOSE not in text:
        return text.strip(), "", f"the reflection is never closed with {THINK_CLOSE}"
    think, revision = text.split(THINK_CLOSE, 1)
    think, revision = think.strip(), revision.strip()
    if THINK_OPEN in revision or THINK_CLOSE in revision:
        return think, revision, "the revision contains another <Think> block"
    if not think:
        return think, revision, "the reflection is empty"
    if not revision:
        return think, revision, "the revision is empty"
    return think, revision, None


def parse_two_pass(text: str) -> TwoPass:
    """Splits a whole two-pass transcript; `error` says what is malformed."""
    if FINDINGS_HEADER not in text:
        return TwoPass(text.strip(), "", "", "", f"no {FINDINGS_HEADER!r} block after the draft")
    draft, rest = text.split(FINDINGS_HEADER, 1)
    draft = draft.strip()
    if THINK_OPEN not in rest:
        return TwoPass(draft, rest.strip(), "", "", f"no {THINK_OPEN} after the findings")
    block, after = rest.split(THINK_OPEN, 1)
    block = block.replace(INSTRUCTION, "").strip()
    think, revision, error = parse_continuation(after)
    if not draft and error is None:
        error = "the draft is empty"
    return TwoPass(draft, block, think, revision, error)
