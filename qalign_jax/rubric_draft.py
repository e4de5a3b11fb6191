"""Drafting a rubric from a written constitution with a model.

Constitution -> principles -> dimensions -> gate and graded questions, each stage one batch of
structured prompts run through `structured.run_stage` (strict parsing and retries; its module
docstring has the stages' output formats and the retry rules). Every retry is recorded in the
draft's `header.stages` and `header.retry_log`. The reviewer's tools and the CLI
(`python -m qalign_jax.rubric_tool draft|show|check|diff`) live in `rubric_tool.py`.

Constitution format (`parse_constitution`): markdown-ish text.
  - An optional first `# Title` line (the rubric's description); `<!-- ... -->` is dropped.
  - Either one `## Name` heading per principle, its text being everything up to the next
    `##` heading (text before the first `##` is a preamble and is not drafted); or, when there
    is no `##` heading, one principle per blank-line-separated paragraph, written
    `Name: text` (a paragraph without a short `Name:` prefix is named `Principle <n>`).

Ids are slugs of names (`slug`): principles and dimensions from their names, questions from
their dimension's id plus the first content words of their text; all deduplicated across the
rubric with `_2`, `_3`, ... in drafting order, so the same outputs always give the same ids.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Sequence

from qalign_jax import rubric as rubric_lib
from qalign_jax.structured import (
    STAGES,
    GenerateFn,
    StageLog,
    build_conversation,
    norm,
    prompts_provenance,
    run_stage,
)

MACHINE_DRAFT_NOTE = (
    "MACHINE DRAFT: every dimension and question below was written by a language model from "
    "the constitution and checked only for format. Review, edit and freeze it (check it with "
    "`python -m qalign_jax.rubric_tool check`, compare versions with `... diff`) before "
    "training or evaluating with it."
)


# ---------------------------------------------------------------------------------------------
# Constitution.


@dataclasses.dataclass(frozen=True)
class ConstitutionPrinciple:
    name: str
    text: str


def parse_constitution(
    text: str, source: str = "constitution"
) -> tuple[str, list[ConstitutionPrinciple]]:
    """(title, principles) of a constitution in the format of the module docstring."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    lines = text.splitlines()
    title = ""
    if lines and lines[0].startswith("# "):
        title = lines.pop(0)[2:].strip()
    principles: list[ConstitutionPrinciple] = []
    if any(line.startswith("## ") for line in lines):
        name, body = None, []
        for line in [*lines, "## <end>"]:
            if line.startswith("## "):
                if name is not None:
                    body_text = " ".join(" ".join(body).split())
                    if not body_text:
                        raise ValueError(
                            f"{source}: principle {name!r} has a heading but no text; write a "
                            "few sentences under it or remove the heading."
                        )
                    principles.append(ConstitutionPrinciple(name, body_text))
                name, body = line[3:].strip(), []
            elif name is not None:
                body.append(line)
    else:
        for para in re.split(r"\n\s*\n", "\n".join(lines)):
            para = " ".join(para.split())
            if not para:
                continue
            m = re.match(r"([^:.?!]{1,60}):\s+(.+)", para)
            if m:
                principles.append(ConstitutionPrinciple(m.group(1).strip(), m.group(2)))
            else:
                principles.append(ConstitutionPrinciple(f"Principle {len(principles) + 1}", para))
    if not principles:
        raise ValueError(
            f"{source}: no principles found; write one '## Name' heading per principle followed "
            "by its text, or one 'Name: text' paragraph per principle."
        )
    return title, principles


# ---------------------------------------------------------------------------------------------
# Ids.


def slug(name: str, max_len: int = 40) -> str:
    """Lowercase snake_case id of a name: 'Non-maleficence!' -> 'non_maleficence'."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    s = s[:max_len].rstrip("_") or "item"
    return f"x_{s}" if s[0].isdigit() else s


def unique_id(base: str, taken: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, ... whichever is first free; records it in `taken`."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


_QUESTION_STOPWORDS = set(
    "a an the how well does do did is are was were has have can could will would should the "
    "response responses it its of to and or in on for with by from that this any as be".split()
)


def question_slug(text: str, words: int = 3) -> str:
    """First content words of a question: 'How well does it avoid harm?' -> 'avoid_harm'."""
    content = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _QUESTION_STOPWORDS]
    return slug("_".join(content[:words]))


# ---------------------------------------------------------------------------------------------
# Drafting.


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    dims_per_principle: int = 2
    gates_per_dimension: int = 1
    questions_per_dimension: int = 2  # graded questions
    max_retries: int = 3

    def __post_init__(self):
        for name in ("dims_per_principle", "questions_per_dimension"):
            if not 1 <= getattr(self, name) <= 3:
                raise ValueError(f"{name}={getattr(self, name)}; use 1 to 3 (the prompts show 3).")
        if not 0 <= self.gates_per_dimension <= 2:
            raise ValueError(f"gates_per_dimension={self.gates_per_dimension}; use 0 to 2.")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries}; use 0 or more.")


def draft_principles(
    principles: Sequence[ConstitutionPrinciple],
    generate_fn: GenerateFn,
    cfg: DraftConfig = DraftConfig(),
    *,
    taken_ids: set[str] | None = None,
    seen: dict[str, str] | None = None,
) -> tuple[list[dict], dict[str, StageLog]]:
    """Principles -> dimensions -> questions, each stage one batched `generate_fn` call.

    Args:
      principles: names and texts (IterAlign passes its discovered constitution here).
      taken_ids / seen: ids and normalized items already in the rubric being extended, so new
        ids and questions do not collide with them (both are updated).

    Returns:
      (principle dicts in `rubric_from_dict`'s format, stage name -> StageLog).
    """
    taken_ids = set() if taken_ids is None else taken_ids
    seen = {} if seen is None else seen
    logs = {stage: StageLog() for stage in STAGES}
    labels = [f"principle {p.name!r}" for p in principles]
    convs = [
        build_conversation("dimensions", p.name, p.text, cfg.dims_per_principle) for p in principles
    ]
    dims = run_stage(
        "dimensions", labels, convs, [cfg.dims_per_principle] * len(principles), generate_fn,
        max_retries=cfg.max_retries, seen=seen, log=logs["dimensions"],
    )  # fmt: skip
    flat = [(p, name, desc) for p, ds in zip(principles, dims) for name, desc in ds]
    questions = {}
    for stage, count in (
        ("gates", cfg.gates_per_dimension),
        ("graded", cfg.questions_per_dimension),
    ):
        if count == 0:
            questions[stage] = [[] for _ in flat]
            continue
        questions[stage] = run_stage(
            stage,
            [f"dimension {name!r} of principle {p.name!r}" for p, name, _ in flat],
            [build_conversation(stage, name, desc, count) for _, name, desc in flat],
            [count] * len(flat),
            generate_fn,
            max_retries=cfg.max_retries,
            seen=seen,
            log=logs[stage],
        )
    # Principle ids first, so a dimension that shares a principle's name gets the suffix.
    pids = [unique_id(slug(p.name), taken_ids) for p in principles]
    out, k = [], 0
    for p, pid, ds in zip(principles, pids, dims):
        dim_dicts = []
        for name, desc in ds:
            did = unique_id(slug(name), taken_ids)
            qs = [
                {"id": unique_id(f"{did}_{question_slug(text)}", taken_ids), "kind": "gate",
                 "violation": "Yes", "text": text}
                for text in questions["gates"][k]
            ] + [
                {"id": unique_id(f"{did}_{question_slug(text)}", taken_ids), "kind": "graded",
                 "text": text}
                for text in questions["graded"][k]
            ]  # fmt: skip
            dim_dicts.append({"id": did, "name": name, "description": desc, "questions": qs})
            k += 1
        out.append({"id": pid, "name": p.name, "dimensions": dim_dicts})
    return out, logs


def questions_for_principle(
    name: str, text: str, generate_fn: GenerateFn, cfg: DraftConfig = DraftConfig(), **kw
) -> dict:
    """One principle dict (dimensions, questions) for one principle text; see draft_principles."""
    principles, _ = draft_principles([ConstitutionPrinciple(name, text)], generate_fn, cfg, **kw)
    return principles[0]


def draft_rubric(
    constitution_text: str,
    generate_fn: GenerateFn,
    *,
    name: str = "draft",
    cfg: DraftConfig = DraftConfig(),
    provenance: dict | None = None,
    source: str = "constitution",
) -> dict:
    """A validated rubric dict (what `rubric_from_dict` accepts) drafted from a constitution.

    Args:
      constitution_text: text in the format of the module docstring.
      generate_fn: (conversations, attempt=0) -> texts, e.g. a `ModelGenerator`.
      name: the rubric's name.
      cfg: counts per principle/dimension and max_retries.
      provenance: extra header entries (model source, sampling settings, paths, notes).

    Returns:
      The rubric as a dict, with the draft's provenance in `header`; descriptions of
      dimensions are kept under `header.dimension_descriptions` (the format has no field).
    Raises:
      DraftError: an output stayed malformed after `cfg.max_retries` retries.
      RubricError: the draft does not validate (should not happen; reported, not hidden).
    """
    title, principles = parse_constitution(constitution_text, source)
    drafted, logs = draft_principles(principles, generate_fn, cfg)
    descriptions = {}
    for p in drafted:
        for d in p["dimensions"]:
            descriptions[d["id"]] = d.pop("description")
    rubric = {
        "name": name,
        "version": 1,
        "description": (
            f"Machine draft from {title or source}: {len(principles)} principles "
            f"({', '.join(p.name for p in principles)}). Review before use."
        ),
        "header": {},
        "principles": drafted,
    }
    counts = rubric_lib.rubric_from_dict(rubric, source=f"draft of {source}").counts()
    rubric["header"] = {
        "note": MACHINE_DRAFT_NOTE,
        **(provenance or {}),
        "date": datetime.date.today().isoformat(),
        "constitution": {
            "source": source,
            "sha256": hashlib.sha256(constitution_text.encode()).hexdigest(),
            "principles": {p.name: p.text for p in principles},
        },
        "draft_config": dataclasses.asdict(cfg),
        "counts": counts,
        "stages": {
            s: {"items": g.items, "generate_calls": g.calls, "retries": g.retries}
            for s, g in logs.items()
        },
        "retry_log": [
            {"stage": s, **r, "output": r["output"][:300]}
            for s, g in logs.items()
            for r in g.rejected
        ],
        "dimension_descriptions": descriptions,
        "prompts": prompts_provenance(),
    }
    validate_draft(rubric, source=f"draft of {source}")
    return rubric


def validate_draft(raw: dict, source: str = "draft", encode=None) -> rubric_lib.Rubric:
    """rubric.py's validation plus duplicate question texts and (given `encode`) option tokens."""
    r = rubric_lib.rubric_from_dict(raw, source=source)
    check_duplicate_texts(r, source)
    if encode is not None:
        rubric_lib.check_options_tokenize(r, encode, source=source)
    return r


def check_duplicate_texts(r: rubric_lib.Rubric, source: str) -> None:
    first: dict[str, str] = {}
    for q in r.questions:
        key = norm(q.text)
        if key in first:
            raise rubric_lib.RubricError(
                f"{source}: questions {first[key]!r} and {q.id!r} ask the same thing "
                f"({q.text!r}); reword or remove one."
            )
        first[key] = q.id
