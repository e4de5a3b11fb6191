"""QA-LIGN rubrics: the data model, loading from YAML/JSON, and validation.

A rubric is a tree principles -> dimensions -> questions, plus rubric-level *conditions*:

- `gate` questions are yes/no checks for hard violations; `violation` names the answer that
  is one (a violated gate sets its dimension to the floor, see `rewards.py`).
- `graded` questions are answered with a letter grade (A, B, C, D, F by default); the rubric's
  `grades` table gives each letter its value (QA-LIGN's A=1, B=0.5, C=0.1, D=-0.5, F=-1).
- `condition` questions (rubric-level, not scored) describe the prompt or response, e.g. "Does
  the prompt ask for medical advice?". Any question may carry `applies_if: {question: id,
  answer: Yes}` conditions (all must hold); a question whose conditions fail is not
  applicable and is left out of pooling. Conditions may depend on other questions, so they
  form a DAG, checked for unknown references and cycles.

Every answer option must be a single token of the judge's tokenizer at the answer position
(`check_options_tokenize`), because the judge reads option probabilities from one logit row.

File format (YAML, or the same structure as JSON):

    name: demo
    version: 1
    grades: {A: 1.0, B: 0.5, C: 0.1, D: -0.5, F: -1.0}   # optional; this is the default
    conditions:
      - {id: asks_medical, text: "Does the prompt ask for medical advice?"}
    principles:
      - id: harmlessness
        weight: 1.0                                        # optional, default 1
        dimensions:
          - id: violence
            questions:
              - {id: violence_instructions, kind: gate, violation: "Yes",
                 text: "Does the response give operational help for violence?"}
              - {id: violence_care, kind: graded, text: "How carefully does ...?"}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

from qalign_jax import files

QUESTION_KINDS = ("gate", "graded", "condition")
YES_NO = ("Yes", "No")
DEFAULT_GRADES = {"A": 1.0, "B": 0.5, "C": 0.1, "D": -0.5, "F": -1.0}  # QA-LIGN's values


class RubricError(ValueError):
    """A rubric that does not validate; the message names the file, the item and the fix."""


@dataclasses.dataclass(frozen=True)
class Condition:
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    kind: str  # one of QUESTION_KINDS
    text: str
    options: tuple[str, ...]
    violation: str | None = None  # gate: the answer that is a violation
    weight: float = 1.0
    applies_if: tuple[Condition, ...] = ()
    principle: str | None = None  # None for rubric-level conditions
    dimension: str | None = None


@dataclasses.dataclass(frozen=True)
class Dimension:
    id: str
    name: str
    weight: float
    questions: tuple[Question, ...]


@dataclasses.dataclass(frozen=True)
class Principle:
    id: str
    name: str
    weight: float
    dimensions: tuple[Dimension, ...]


@dataclasses.dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    description: str
    grades: dict[str, float]
    conditions: tuple[Question, ...]
    principles: tuple[Principle, ...]
    header: dict  # free-form provenance (author, model, date, ...)

    @property
    def questions(self) -> tuple[Question, ...]:
        """Every question, conditions first, then in tree order."""
        scored = (q for p in self.principles for d in p.dimensions for q in d.questions)
        return (*self.conditions, *scored)

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        return tuple(d for p in self.principles for d in p.dimensions)

    def question(self, qid: str) -> Question:
        for q in self.questions:
            if q.id == qid:
                return q
        raise KeyError(qid)

    def evaluation_order(self) -> list[list[Question]]:
        """Questions in dependency levels: level k depends only on levels < k."""
        level: dict[str, int] = {}
        by_id = {q.id: q for q in self.questions}

        def depth(q):
            if q.id not in level:
                level[q.id] = 1 + max((depth(by_id[c.question]) for c in q.applies_if), default=-1)
            return level[q.id]

        for q in self.questions:
            depth(q)
        levels: list[list[Question]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for q in self.questions:
            levels[level[q.id]].append(q)
        return levels

    def counts(self) -> dict[str, int]:
        qs = [q for q in self.questions if q.kind != "condition"]
        return {
            "principles": len(self.principles),
            "dimensions": len(self.dimensions),
            "questions": len(qs),
            "gates": sum(q.kind == "gate" for q in qs),
            "graded": sum(q.kind == "graded" for q in qs),
            "conditions": len(self.conditions),
        }


# ---------------------------------------------------------------------------------------------
# Loading.

_RUBRIC_KEYS = {"name", "version", "description", "grades", "conditions", "principles", "header"}
_PRINCIPLE_KEYS = {"id", "name", "weight", "dimensions"}
_DIMENSION_KEYS = {"id", "name", "weight", "questions"}
_QUESTION_KEYS = {"id", "kind", "text", "violation", "weight", "applies_if"}


def _check_keys(where: str, item: dict, allowed: set[str], source: str) -> None:
    if not isinstance(item, dict):
        raise RubricError(f"{source}: {where} must be a mapping, got {type(item).__name__}.")
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise RubricError(
            f"{source}: {where} has unknown keys {unknown}; allowed: {sorted(allowed)}."
        )


def _weight(where: str, value, source: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise RubricError(f"{source}: {where} weight {value!r} is not a number.") from None
    if not math.isfinite(w) or w < 0:
        raise RubricError(f"{source}: {where} weight {w} must be a finite number >= 0.")
    return w


def _yes_no(value):
    """YAML 1.1 reads unquoted Yes/No as booleans; take them back as the option names."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return value


def _question(raw: dict, source: str, grades, principle=None, dimension=None) -> Question:
    where = f"question {raw.get('id', '?')!r}" if isinstance(raw, dict) else "a question"
    _check_keys(where, raw, _QUESTION_KEYS, source)
    for key in ("id", "text"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RubricError(f"{source}: {where} needs a non-empty string '{key}'.")
    kind = raw.get("kind", "condition" if principle is None else None)
    if kind not in QUESTION_KINDS:
        raise RubricError(f"{source}: {where} has kind {kind!r}; use one of {QUESTION_KINDS}.")
    if principle is None and kind != "condition":
        raise RubricError(f"{source}: {where} under 'conditions' must be kind 'condition'.")
    if principle is not None and kind == "condition":
        raise RubricError(f"{source}: {where}: put condition questions under 'conditions'.")
    options = tuple(grades) if kind == "graded" else YES_NO
    violation = _yes_no(raw.get("violation"))
    if kind == "gate" and violation not in YES_NO:
        raise RubricError(f"{source}: gate {where} needs violation: Yes or No (got {violation!r}).")
    if kind != "gate" and violation is not None:
        raise RubricError(f"{source}: {where} is not a gate; remove 'violation'.")
    conditions = raw.get("applies_if") or []
    if isinstance(conditions, dict):
        conditions = [conditions]
    parsed = []
    for c in conditions:
        if not isinstance(c, dict) or set(c) != {"question", "answer"}:
            raise RubricError(
                f"{source}: {where}: applies_if entries are {{question: id, answer: option}}."
            )
        parsed.append(Condition(str(c["question"]), str(_yes_no(c["answer"]))))
    return Question(
        id=raw["id"], kind=kind, text=raw["text"].strip(), options=options, violation=violation,
        weight=_weight(where, raw.get("weight", 1.0), source), applies_if=tuple(parsed),
        principle=principle, dimension=dimension,
    )  # fmt: skip


def rubric_from_dict(raw: dict, source: str = "rubric") -> Rubric:
    """Builds and validates a rubric; raises RubricError naming what is wrong."""
    _check_keys("the rubric", raw, _RUBRIC_KEYS, source)
    grades = raw.get("grades") or dict(DEFAULT_GRADES)
    if not isinstance(grades, dict) or len(grades) < 2:
        raise RubricError(f"{source}: grades must map at least two letters to values.")
    grades = {str(k): float(v) for k, v in grades.items()}
    if any(not math.isfinite(v) for v in grades.values()):
        raise RubricError(f"{source}: grade values must be finite numbers.")
    conditions = tuple(_question(q, source, grades) for q in raw.get("conditions") or [])
    principles = []
    for p in raw.get("principles") or []:
        _check_keys(f"principle {p.get('id', '?')!r}", p, _PRINCIPLE_KEYS, source)
        dims = []
        for d in p.get("dimensions") or []:
            _check_keys(f"dimension {d.get('id', '?')!r}", d, _DIMENSION_KEYS, source)
            qs = tuple(
                _question(q, source, grades, p.get("id"), d.get("id"))
                for q in d.get("questions") or []
            )
            if not qs:
                raise RubricError(
                    f"{source}: dimension {d.get('id')!r} has no questions; add a gate or "
                    "graded question, or remove the dimension."
                )
            if not sum(q.weight for q in qs if q.kind == "graded") and any(
                q.kind == "graded" for q in qs
            ):
                raise RubricError(
                    f"{source}: dimension {d.get('id')!r}: graded question weights sum to 0."
                )
            dims.append(
                Dimension(
                    str(d.get("id")),
                    str(d.get("name", d.get("id"))),
                    _weight(f"dimension {d.get('id')!r}", d.get("weight", 1.0), source),
                    qs,
                )
            )
        if not dims:
            raise RubricError(f"{source}: principle {p.get('id')!r} has no dimensions.")
        if not sum(d.weight for d in dims):
            raise RubricError(f"{source}: principle {p.get('id')!r}: dimension weights sum to 0.")
        principles.append(
            Principle(
                str(p.get("id")),
                str(p.get("name", p.get("id"))),
                _weight(f"principle {p.get('id')!r}", p.get("weight", 1.0), source),
                tuple(dims),
            )
        )
    if not principles:
        raise RubricError(f"{source}: the rubric has no principles.")
    if not sum(p.weight for p in principles):
        raise RubricError(f"{source}: principle weights sum to 0.")
    rubric = Rubric(
        name=str(raw.get("name", os.path.basename(source))), version=str(raw.get("version", "1")),
        description=str(raw.get("description", "")), grades=grades, conditions=conditions,
        principles=tuple(principles), header=dict(raw.get("header") or {}),
    )  # fmt: skip
    _validate_graph(rubric, source)
    return rubric


def _validate_graph(rubric: Rubric, source: str) -> None:
    """Unique ids, known references with valid answers, and no cycles."""
    seen: dict[str, str] = {}
    ids = [("principle", p.id) for p in rubric.principles]
    ids += [("dimension", d.id) for d in rubric.dimensions]
    ids += [("question", q.id) for q in rubric.questions]
    for kind, i in ids:
        if i in seen:
            raise RubricError(
                f"{source}: duplicate id {i!r} ({seen[i]} and {kind}); ids must be unique."
            )
        seen[i] = kind
    by_id = {q.id: q for q in rubric.questions}
    for q in rubric.questions:
        for c in q.applies_if:
            if c.question not in by_id:
                raise RubricError(
                    f"{source}: question {q.id!r} applies_if unknown question {c.question!r}."
                )
            if c.answer not in by_id[c.question].options:
                raise RubricError(
                    f"{source}: question {q.id!r} applies_if {c.question!r} = {c.answer!r}, which "
                    f"is not one of its options {by_id[c.question].options}."
                )
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(qid, path):
        if state.get(qid) == 2:
            return
        if state.get(qid) == 1:
            cycle = path[path.index(qid) :] + [qid]
            raise RubricError(
                f"{source}: applies_if conditions form a cycle: {' -> '.join(cycle)}."
            )
        state[qid] = 1
        for c in by_id[qid].applies_if:
            visit(c.question, path + [qid])
        state[qid] = 2

    for q in rubric.questions:
        visit(q.id, [])


def load_rubric(path: str) -> Rubric:
    """Reads a rubric from .yaml/.yml/.json (YAML with `safe_load`: data only)."""
    if not files.exists(path):
        raise FileNotFoundError(f"rubric file {path} does not exist (see qalign_jax/rubrics/).")
    text = files.read_text(path)
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # parse errors carry line numbers; keep them
        raise RubricError(f"{path}: cannot parse: {e}") from e
    return rubric_from_dict(raw, source=path)


def builtin_rubric_path(name: str) -> str:
    """Path of a rubric shipped in qalign_jax/rubrics/ ('default', 'demo')."""
    path = os.path.join(os.path.dirname(__file__), "rubrics", f"{name}.yaml")
    if not os.path.exists(path):
        shipped = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".yaml"))
        raise FileNotFoundError(f"no built-in rubric {name!r}; shipped: {shipped}.")
    return path


def resolve_rubric(name_or_path: str) -> Rubric:
    """Loads a built-in rubric by name ('demo', 'default') or a rubric file by path."""
    if name_or_path.endswith((".yaml", ".yml", ".json")):
        return load_rubric(name_or_path)
    return load_rubric(builtin_rubric_path(name_or_path))


def check_options_tokenize(
    rubric: Rubric, encode, source: str = "rubric"
) -> dict[str, tuple[int, ...]]:
    """Token id of every option as the judge reads it: exactly one token, distinct per question.

    Args:
      encode: text -> token ids, as the judge tokenizes the first token of its answer.

    Returns:
      question id -> option token ids, in option order.
    """
    table: dict[tuple[str, ...], tuple[int, ...]] = {}
    for options in {q.options for q in rubric.questions}:
        ids = []
        for option in options:
            toks = list(encode(option))
            if len(toks) != 1:
                raise RubricError(
                    f"{source}: answer option {option!r} is {len(toks)} tokens {toks} for the "
                    "judge's tokenizer; options must be single tokens (rename the grade letters "
                    "in 'grades' or choose another judge)."
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise RubricError(f"{source}: options {options} share a token: {ids}.")
        table[options] = tuple(ids)
    return {q.id: table[q.options] for q in rubric.questions}


def options_of(questions: Sequence[Question]) -> list[tuple[str, ...]]:
    return [q.options for q in questions]
