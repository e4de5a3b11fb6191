"""The rubric CLI and the reviewer's tools: show, check, diff and draft rubrics.

    python -m qalign_jax.rubric_tool show default [--brief]
    python -m qalign_jax.rubric_tool check default --judge embedded
    python -m qalign_jax.rubric_tool diff demo example_draft
    python -m qalign_jax.rubric_tool draft --constitution FILE.md --model embedded --out X.yaml

`show_rubric` prints a tree with counts, `check_rubric` validates beyond loading (duplicate
question texts, single-token options for a judge's tokenizer), `diff_rubrics` / `format_diff`
say what changed by id, `write_draft` writes a machine draft (`rubric_draft.draft_rubric`) as
commented YAML. Rubrics are built-in names (demo, default, ...) or file paths. Exit codes: 0 ok,
1 a rubric or input problem (the message says what to fix), 2 a usage error.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence

from absl import flags

from qalign_jax import rubric as rubric_lib
from qalign_jax import rubric_draft, structured

# ---------------------------------------------------------------------------------------------
# Inspecting: show, check, diff.


def _conditions_text(q: rubric_lib.Question) -> str:
    return " and ".join(f"{c.question}={c.answer}" for c in q.applies_if)


def _kind_counts(qs) -> str:
    gates = sum(q.kind == "gate" for q in qs)
    return f"{len(qs)} questions ({gates} gate{'s' * (gates != 1)}, {len(qs) - gates} graded)"


def show_rubric(r: rubric_lib.Rubric, questions: bool = True) -> str:
    """The rubric as a tree with counts per principle and dimension."""
    c = r.counts()
    lines = [
        f"{r.name} (version {r.version}): {c['principles']} principles, {c['dimensions']} "
        f"dimensions, {c['questions']} questions ({c['gates']} gates, {c['graded']} graded), "
        f"{c['conditions']} conditions",
        "grades: " + ", ".join(f"{k}={v:g}" for k, v in r.grades.items()),
    ]
    if r.header.get("note"):
        lines.append(f"note: {r.header['note']}")
    if r.conditions:
        lines.append("conditions:")
        for q in r.conditions:
            when = f"   [if {_conditions_text(q)}]" if q.applies_if else ""
            lines.append(f"  {q.id}: {q.text}{when}")
    for p in r.principles:
        pq = [q for d in p.dimensions for q in d.questions]
        lines.append(
            f"principle {p.id} ({p.name!r}, weight {p.weight:g}): {len(p.dimensions)} "
            f"dimensions, {_kind_counts(pq)}"
        )
        for d in p.dimensions:
            lines.append(
                f"  dimension {d.id} ({d.name!r}, weight {d.weight:g}): {_kind_counts(d.questions)}"
            )
            if not questions:
                continue
            for q in d.questions:
                kind = f"gate, violation {q.violation}" if q.kind == "gate" else "graded"
                extra = f", weight {q.weight:g}" if q.weight != 1 else ""
                when = f"   [if {_conditions_text(q)}]" if q.applies_if else ""
                lines.append(f"    - {q.id} [{kind}{extra}]: {q.text}{when}")
    return "\n".join(lines)


def check_rubric(r: rubric_lib.Rubric, encode, judge: str = "judge") -> str:
    """Validation beyond loading: duplicate question texts and single-token options for `encode`.

    Returns a one-paragraph report; raises RubricError naming the problem.
    """
    rubric_draft.check_duplicate_texts(r, r.name)
    table = rubric_lib.check_options_tokenize(r, encode, source=r.name)
    tokens = {}
    for q in r.questions:
        tokens.update(zip(q.options, table[q.id]))
    c = r.counts()
    return (
        f"ok: {r.name} validates: {c['principles']} principles, {c['dimensions']} dimensions, "
        f"{c['questions']} questions ({c['gates']} gates, {c['graded']} graded), "
        f"{c['conditions']} conditions; no duplicate ids or question texts; every answer option "
        f"is one distinct token for {judge}: "
        + ", ".join(f"{o}={t}" for o, t in sorted(tokens.items()))
    )


@dataclasses.dataclass
class RubricDiff:
    """Differences from rubric A to rubric B, by id."""

    added: dict[str, list[str]]  # 'principles' | 'dimensions' | 'questions' -> ids only in B
    removed: dict[str, list[str]]  # ... -> ids only in A
    changed: dict[str, dict[str, dict[str, tuple]]]  # kind -> id -> field -> (in A, in B)
    other: dict[str, tuple]  # rubric-level fields (grades, name) -> (in A, in B)

    @property
    def empty(self) -> bool:
        return not (
            any(self.added.values()) or any(self.removed.values()) or any(self.changed.values())
            or self.other
        )  # fmt: skip


def _question_fields(q: rubric_lib.Question) -> dict:
    return {
        "text": q.text,
        "kind": q.kind,
        "violation": q.violation,
        "weight": q.weight,
        "applies_if": _conditions_text(q) or None,
        "dimension": q.dimension,
    }


def diff_rubrics(a: rubric_lib.Rubric, b: rubric_lib.Rubric) -> RubricDiff:
    """Added, removed and changed principles, dimensions and questions (conditions included)."""
    tables = {}
    for side, r in (("a", a), ("b", b)):
        tables[side] = {
            "principles": {p.id: {"name": p.name, "weight": p.weight} for p in r.principles},
            "dimensions": {
                d.id: {"name": d.name, "weight": d.weight, "principle": p.id}
                for p in r.principles
                for d in p.dimensions
            },
            "questions": {q.id: _question_fields(q) for q in r.questions},
        }
    added, removed, changed = {}, {}, {}
    for kind in ("principles", "dimensions", "questions"):
        ta, tb = tables["a"][kind], tables["b"][kind]
        added[kind] = [i for i in tb if i not in ta]
        removed[kind] = [i for i in ta if i not in tb]
        changed[kind] = {}
        for i in ta:
            if i in tb:
                fields = {f: (ta[i][f], tb[i][f]) for f in ta[i] if ta[i][f] != tb[i][f]}
                if fields:
                    changed[kind][i] = fields
    other = {}
    for field in ("name", "grades"):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            other[field] = (va, vb)
    return RubricDiff(added, removed, changed, other)


def format_diff(diff: RubricDiff, name_a: str = "A", name_b: str = "B") -> str:
    """The diff for a reviewer: '+' only in B, '-' only in A, '~' changed (A -> B)."""
    n = {k: (len(diff.added[k]), len(diff.removed[k]), len(diff.changed[k])) for k in diff.added}
    lines = [f"--- {name_a}", f"+++ {name_b}"]
    lines.append(
        "; ".join(f"{k}: +{a} -{r} ~{c}" for k, (a, r, c) in n.items())
        + ("" if not diff.empty else " (no differences)")
    )
    for field, (va, vb) in diff.other.items():
        lines.append(f"~ rubric {field}: {va!r} -> {vb!r}")
    for kind in ("principles", "dimensions", "questions"):
        for i in diff.removed[kind]:
            lines.append(f"- {kind[:-1]} {i}")
        for i in diff.added[kind]:
            lines.append(f"+ {kind[:-1]} {i}")
        for i, fields in diff.changed[kind].items():
            for f, (va, vb) in fields.items():
                lines.append(f"~ {kind[:-1]} {i} {f}: {va!r} -> {vb!r}")
    return "\n".join(lines)


def write_draft(raw: dict, path: str, command: str) -> None:
    """Writes the draft as YAML under a comment block that says what it is and how it was made."""
    import yaml

    c = raw["header"]["counts"]
    comment = [
        f"# {raw['name']}: MACHINE DRAFT of a rubric, written by a language model; review it.",
        f"# Made with: {command}",
        f"# Counts: {c['principles']} principles, {c['dimensions']} dimensions, "
        f"{c['questions']} scored questions ({c['gates']} gates + {c['graded']} graded).",
        "# Provenance (model, sampling, prompts and their sha256, retries) is in `header`.",
        "# Format: see the module docstring of qalign_jax/rubric.py.",
        "",
    ]
    body = yaml.safe_dump(raw, sort_keys=False, width=100, allow_unicode=True)
    with open(path, "w") as f:
        f.write("\n".join(comment) + "\n" + body)


# ---------------------------------------------------------------------------------------------
# CLI commands. Each reads its arguments (rubric names) and flags and returns the exit code.


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The CLI's flags (every command's; each command reads the ones it uses)."""
    d = rubric_draft.DraftConfig
    flags.DEFINE_boolean("brief", False, "show: counts only, no question texts.", flag_values=fv)
    flags.DEFINE_string(
        "judge", "", "check/draft: judge model source whose tokenizer checks the options "
        "(check: default 'embedded'; draft: default --model).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string("constitution", "", "draft: constitution text file (.md/.txt).",
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_string("model", "embedded", "draft: drafting model source.", flag_values=fv)
    flags.DEFINE_string("out", "", "draft: output rubric path (.yaml).", flag_values=fv)
    flags.DEFINE_string("name", "", "draft: rubric name (default: the --out file's stem).",
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("dims_per_principle", d.dims_per_principle, "draft.", flag_values=fv)
    flags.DEFINE_integer("gates_per_dimension", d.gates_per_dimension, "draft.", flag_values=fv)
    flags.DEFINE_integer("questions_per_dimension", d.questions_per_dimension, "draft.",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("max_retries", d.max_retries, "draft: re-sends per item.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 128, "draft.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "draft: first attempt; 0 = greedy.", flag_values=fv)
    flags.DEFINE_float("retry_temperature", 0.7, "draft: retries.", flag_values=fv)
    flags.DEFINE_float("top_p", 0.9, "draft: retries.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "draft: sampling seed.", flag_values=fv)
    flags.DEFINE_string("note", "", "draft: extra note for the header (e.g. on quality).",
                        flag_values=fv)  # fmt: skip


class UsageError(Exception):
    """A command line that names no command, an unknown one, or the wrong arguments."""


def expect_args(command: str, args: Sequence[str], names: Sequence[str]) -> None:
    if len(args) != len(names):
        raise UsageError(
            f"{command} takes {len(names)} argument(s) ({', '.join(names) or 'none'}), got "
            f"{list(args)}: python -m qalign_jax.rubric_tool {command} {' '.join(names)}"
        )


def encode_for(judge: str):
    from qalign_jax.models import load

    return load.load_tokenizer(judge).encode


def show_command(args: Sequence[str], fv: flags.FlagValues) -> int:
    expect_args("show", args, ["RUBRIC"])
    print(show_rubric(rubric_lib.resolve_rubric(args[0]), questions=not fv.brief))
    return 0


def check_command(args: Sequence[str], fv: flags.FlagValues) -> int:
    expect_args("check", args, ["RUBRIC"])
    judge = fv.judge or "embedded"
    print(check_rubric(rubric_lib.resolve_rubric(args[0]), encode_for(judge), judge=judge))
    return 0


def diff_command(args: Sequence[str], fv: flags.FlagValues) -> int:
    expect_args("diff", args, ["OLD", "NEW"])
    diff = diff_rubrics(rubric_lib.resolve_rubric(args[0]), rubric_lib.resolve_rubric(args[1]))
    print(format_diff(diff, args[0], args[1]))
    return 0


def draft_command(args: Sequence[str], fv: flags.FlagValues) -> int:
    expect_args("draft", args, [])
    if not fv.constitution or not fv.out:
        raise UsageError("draft needs --constitution FILE and --out FILE.yaml.")
    if not fv.out.endswith((".yaml", ".yml")):
        raise ValueError(f"--out {fv.out!r} must end in .yaml or .yml.")

    from qalign_jax import sharding
    from qalign_jax.models import load

    cfg = rubric_draft.DraftConfig(
        dims_per_principle=fv.dims_per_principle,
        gates_per_dimension=fv.gates_per_dimension,
        questions_per_dimension=fv.questions_per_dimension,
        max_retries=fv.max_retries,
    )
    with open(fv.constitution) as f:
        text = f.read()
    model = load.load_model(fv.model, mesh=sharding.make_mesh((1, -1, 1)))
    gen = structured.ModelGenerator(
        model, max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
        retry_temperature=fv.retry_temperature, top_p=fv.top_p, seed=fv.seed,
    )  # fmt: skip
    judge = fv.judge or fv.model
    provenance = {
        "generated_by": "python -m qalign_jax.rubric_tool draft",
        "model": fv.model,
        "judge_checked": judge,
        "sampling": gen.settings,
    }
    if fv.note:
        provenance["quality_note"] = fv.note
    name = fv.name or os.path.splitext(os.path.basename(fv.out))[0]
    raw = rubric_draft.draft_rubric(
        text, gen, name=name, cfg=cfg, provenance=provenance, source=fv.constitution
    )
    rubric_draft.validate_draft(raw, source=fv.out, encode=encode_for(judge))
    set_flags = [f"--{name}={fv[name].value}" for name in sorted(FLAG_NAMES) if fv[name].present]
    write_draft(raw, fv.out, "python -m qalign_jax.rubric_tool draft " + shlex.join(set_flags))
    rubric_lib.load_rubric(fv.out)  # the file as written must load
    stages = ", ".join(f"{s}: {v['retries']} retries" for s, v in raw["header"]["stages"].items())
    print(f"wrote {fv.out}: {raw['header']['counts']}; {stages}", file=sys.stderr)
    return 0


COMMANDS = {
    "draft": draft_command,  # constitution -> machine-drafted rubric YAML
    "show": show_command,  # tree with counts
    "check": check_command,  # validation incl. the judge's option tokens
    "diff": diff_command,  # added/removed/changed ids between two rubrics
}
_PROBE = flags.FlagValues()
define_flags(_PROBE)
FLAG_NAMES = frozenset(_PROBE)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
    """Runs `argv` = [program, command, args...] (flags already parsed into `fv`)."""
    try:
        if len(argv) < 2 or argv[1] not in COMMANDS:
            got = repr(argv[1]) if len(argv) > 1 else "no command"
            raise UsageError(f"{got}; use one of {', '.join(COMMANDS)}")
        return COMMANDS[argv[1]](list(argv[2:]), fv)
    except UsageError as e:
        print(f"usage error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # RubricError, DraftError: say what to fix
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: Sequence[str]) -> int:
    """Parses `args` (command, arguments and flags; no program name) with fresh flags and runs
    the command: the CLI without a process, for tests and scripts."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        argv = fv(["rubric_tool", *args])
    except flags.Error as e:
        print(f"usage error: {e}", file=sys.stderr)
        return 2
    return main(argv, fv)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
