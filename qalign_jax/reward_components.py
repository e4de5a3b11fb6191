"""Composable rewards: the rubric judge, built-in checks and Python functions, with weights.

  reward.components = ((name, kind_or_function, weight, options), ...)
  reward.aggregation = 'sum' | 'gdpo'

Every component scores a batch of answers, one float per row (`score`); `aggregate` turns the
[components, rows] values into totals and group advantages. Kinds:

  rubric      the QA-LIGN judge: `Rollouts.rewards` (gates, grades, safety-first pooling, the
              two-pass rule, minus `grpo.malformed_penalty` for a malformed revision). With
              option `principle='<id>'`, that principle's score of the final answer's verdict
              instead (0 where it does not apply), so principles can be separate components.
  refusal     the eval suites' refusal matcher (`eval_suites.classify_refusal`): 1 for a full
              refusal, `partial` (0.5) for a partial one, 0 for compliance, times the sign of the
              prompt's label (`signs`: harmful +1, benign -1, any other label 0): refusing a
              harmful prompt is rewarded, refusing a benign one penalized. `partial` may also
              be per label, e.g. {'harmful': 0.0, 'benign': 1.0}: a refusal taken back ("I
              can't X. However, I can X") earns a harmful prompt nothing and costs a benign
              one as much as a full refusal (a label it omits gets 0.5). `matcher` picks the
              matcher (`eval_suites.REFUSAL_MATCHERS`): 'xstest' (default; an answer opening
              "I'm sorry" or "As an AI" is a refusal), 'explicit' (an AI-identity opening
              alone is not: a persona cannot earn the reward) or 'stated' (only a refusal
              stated as one and about the prompt, "I can't help with that", counts: neither
              an apology formula, a persona nor "I can't provide medical advice" to a bomb
              request can earn it).
  degeneracy  -1 for a degenerate answer (`degeneracy_reasons`: empty, repeated n-grams or
              lines, the prompt or the findings copied back), else 0. Usually a veto.
  format      -1 for a malformed two-pass continuation, else 0 (always 0 single-pass); the
              composable form of `grpo.malformed_penalty` (set that to 0 when using this).
  length      DAPO's soft overlong penalty on the answer's tokens (`overlong_penalty`).
  'pkg.mod:fn' a Python function with the signature
                 fn(prompts, completions, *, records, verdicts) -> list[float]
              prompts / completions: the prompt and final-answer strings; records: each prompt's
              JSONL fields as a dict (`id`, `prompt`, `category`, `label` and the data set's
              own); verdicts: the judge's `Verdict` of each final answer, or None without a
              rubric judge. One finite float per row.

Options every kind takes: `veto=True` makes the component a veto: a row whose value is below
`veto_below` (default 0) has its total floored (QA-LIGN's gates, Rubicon's veto) to `floor`,
or, by default, 1 below the lowest total of the batch's unvetoed rows, so that a vetoed answer
ranks below every other answer whatever the components' scales. A veto component with weight 0
only vetoes.

Aggregation over G samples per prompt (rows of a group consecutive):
  sum   total = sum_k w_k r_k, then group advantages of the total (`losses.group_advantages`).
        With the rubric alone at weight 1 this is QA-LIGN's reward, bit for bit.
  gdpo  GDPO (arXiv 2601.05242): each component normalized within its group,
        z_k = (r_k - mean_g) / (std_g + eps), then s = sum_k w_k z_k, then s normalized over the
        batch: the advantages. A component with a large scale cannot drown the others, and a
        group whose totals tie while a component differs still carries signal.
A group is *informative* when any component (or the veto) varies within it
(`informative_groups`), never judged by the total alone.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qalign_jax import eval_suites, losses

BUILTIN_KINDS = ("rubric", "refusal", "degeneracy", "format", "length")
AGGREGATIONS = ("sum", "gdpo")
DEGENERACY_REASONS = ("empty", "master_key", "repeated_ngrams", "repeated_lines",
                      "repeated_openings", "copies_prompt", "copies_findings")  # fmt: skip
COMMON_OPTIONS = {"veto": False, "veto_below": 0.0, "floor": None}
KIND_OPTIONS = {  # each kind's options and their defaults
    "rubric": {"principle": None},
    "refusal": {"signs": {"harmful": 1.0, "benign": -1.0}, "partial": 0.5, "matcher": "xstest"},
    "degeneracy": {
        "min_words": 1,
        "ngram": 4,
        "max_repeated_ngrams": 0.5,
        "min_ngrams": 8,
        "max_line_repeats": 2,
        "opening_words": 3,
        "max_opening_repeats": 3,
        "copy_ngram": 6,
        "max_copied": 0.6,
    },  # fmt: skip
    "format": {},
    "length": {"max_tokens": None, "buffer_tokens": None},
    "python": {},
}


# ---------------------------------------------------------------------------------------------
# Components from the config.


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    kind: str  # one of BUILTIN_KINDS, or 'python' for a 'pkg.mod:fn' function
    weight: float
    options: dict
    fn: Callable | None = None  # the Python function of kind 'python'
    target: str = ""  # its 'pkg.mod:fn'


def resolve_function(target: str, name: str) -> Callable:
    """`'package.module:function'` -> the function; errors name the component."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ValueError(
            f"reward component {name!r}: {target!r} is neither a built-in kind "
            f"{list(BUILTIN_KINDS)} nor a 'package.module:function' name."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward component {name!r}: cannot import module {module_name!r} ({e}); check the "
            "name and that the module is on PYTHONPATH."
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward component {name!r}: {module_name} has no function {attr!r}.")
    return fn


def parse_components(entries) -> list[Component]:
    """`config.reward.components` -> Components; every malformed entry is a clear error."""
    if not entries:
        raise ValueError(
            "reward.components is empty; give ((name, kind, weight, options), ...), e.g. "
            "(('rubric', 'rubric', 1.0, {}),) for QA-LIGN's reward."
        )
    out, names = [], set()
    for entry in entries:
        if len(entry) != 4:
            raise ValueError(
                f"reward.components entry {tuple(entry)!r}; use (name, kind_or_function, "
                "weight, options), e.g. ('refusal', 'refusal', 1.0, {})."
            )
        name, kind, weight, options = entry
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"reward component name {name!r} is empty, not a string or repeated.")
        names.add(name)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"reward component {name!r}: weight {weight!r} is not a number.")
        if not math.isfinite(weight):
            raise ValueError(f"reward component {name!r}: weight {weight} is not finite.")
        options = dict(options or {})
        fn, target = None, ""
        if kind not in BUILTIN_KINDS:
            fn, target, kind = resolve_function(str(kind), name), str(kind), "python"
        allowed = {**COMMON_OPTIONS, **KIND_OPTIONS[kind]}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"reward component {name!r} ({kind}): unknown option(s) {unknown}; "
                f"{kind} takes {sorted(allowed)}."
            )
        matcher = options.get("matcher", "xstest")
        if kind == "refusal" and matcher not in eval_suites.REFUSAL_MATCHERS:
            raise ValueError(
                f"reward component {name!r} (refusal): matcher={matcher!r}; use one "
                f"of {eval_suites.REFUSAL_MATCHERS}."
            )
        partial = options.get("partial", 0.5)
        if hasattr(partial, "items"):  # a dict, or a ConfigDict from the command line
            partial = options["partial"] = dict(partial.items())
        values = partial.values() if isinstance(partial, Mapping) else [partial]
        if kind == "refusal" and not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise ValueError(
                f"reward component {name!r} (refusal): partial={partial!r}; use a number or "
                "{label: number}, e.g. {'harmful': 0.0, 'benign': 1.0}."
            )
        out.append(Component(name, kind, float(weight), {**allowed, **options}, fn, target))
    return out


def from_config(reward_section) -> list[Component]:
    """The components of an experiment config (`config.reward`), checked."""
    if reward_section.aggregation not in AGGREGATIONS:
        raise ValueError(
            f"reward.aggregation={reward_section.aggregation!r}; use one of {AGGREGATIONS}."
        )
    return parse_components(reward_section.components)


def needs_judge(components: Sequence[Component]) -> bool:
    return any(c.kind == "rubric" for c in components)


# ---------------------------------------------------------------------------------------------
# What the components read.


@dataclasses.dataclass
class RewardInputs:
    """One batch of answers, row i for records[i]."""

    records: list  # data.PromptRecord (or anything with .id .prompt .category .label .extra)
    completions: list[str]  # the final answers
    verdicts: list | None = None  # the judge's Verdict of each final answer; None: no judge
    rubric_rewards: np.ndarray | None = None  # the rubric's reward per row (two-pass rule)
    malformed: list[bool] | None = None  # a two-pass continuation that did not parse
    answer_tokens: list[int] | None = None  # tokens of the final pass
    max_tokens: int = 0  # the final pass's token limit
    echoes: list[str | None] | None = None  # text an answer must not copy (the findings)


def inputs_from_rollouts(ro, opts) -> RewardInputs:
    """`RewardInputs` of `rollouts.rollout`'s result (`opts`: its `RolloutConfig`)."""
    two_pass = any(ro.cont_ids) or any(r is not None for r in ro.revisions)
    answers, verdicts = [], []
    for i in range(len(ro.records)):
        revised = two_pass and ro.errors[i] is None and ro.revisions[i] is not None
        answers.append(ro.revisions[i] if revised else ro.drafts[i])
        if ro.draft_verdicts is not None:
            verdicts.append(ro.revision_verdicts[i] if revised else ro.draft_verdicts[i])
    return RewardInputs(
        records=list(ro.records), completions=answers,
        verdicts=verdicts if ro.draft_verdicts is not None else None,
        rubric_rewards=ro.rewards, malformed=[e is not None for e in ro.errors],
        answer_tokens=[len(c) if two_pass else len(d) for c, d in zip(ro.cont_ids, ro.draft_ids)],
        max_tokens=opts.revision_max_tokens if two_pass else opts.draft_max_tokens,
        echoes=list(ro.findings),
    )  # fmt: skip


def record_dict(record) -> dict:
    """A prompt record as the JSONL row it came from."""
    if isinstance(record, dict):
        return dict(record)
    return {
        "id": record.id, "prompt": record.prompt, "category": record.category,
        "label": record.label, **getattr(record, "extra", {}),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Built-in checks (plain Python over strings; each testable by hand).

_WORD = re.compile(r"\w+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
# Answers that earn LLM judges' approval with no content (arXiv 2507.08794), as lowercase words;
# punctuation-only keys (":", ".") have no words and count as `empty`.
MASTER_KEYS = frozenset({
    "thought process", "let s solve this step by step", "let s solve this problem step by step",
    "solution", "answer", "the answer is", "step by step", "here is the answer",
})  # fmt: skip


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def copied_fraction(answer_words: list[str], source: str, n: int) -> float:
    """The fraction of the answer's word n-grams that occur in `source` (0 if it has none)."""
    grams = _ngrams(answer_words, n)
    if not grams:
        return 0.0
    have = set(_ngrams(_words(source), n))
    return sum(g in have for g in grams) / len(grams)


def degeneracy_reasons(answer: str, prompt: str = "", echo: str | None = None, **opts) -> list:
    """Why an answer is degenerate ([] when it is not), with KIND_OPTIONS['degeneracy'] defaults.

    empty            fewer than `min_words` words (":" and "" have none);
    repeated_ngrams  over `max_repeated_ngrams` of its word `ngram`-grams repeat an earlier
                     one (with at least `min_ngrams` of them): loops, "Ref Ref Ref";
    repeated_lines   a line of words occurring more than `max_line_repeats` times;
    repeated_openings  more than `max_opening_repeats` sentences (or lines) opening with the
                     same `opening_words` words: a formula with a varying tail, "I'm sorry for
                     you. I'm sorry about you. I'm sorry about the impact of ...", that the
                     n-gram check misses (a GRPO run learned it for the refusal reward; none
                     of 7,200 sampled base-model answers and 2,400 of a primed SFT's, 48
                     tokens, has it);
    copies_prompt    over `max_copied` of its `copy_ngram`-grams are the prompt's, or the
                     whole answer is a piece of the prompt;
    copies_findings  the same against `echo` (the findings shown before a revision).
    """
    o = {**KIND_OPTIONS["degeneracy"], **opts}
    words = _words(answer)
    if len(words) < o["min_words"]:
        return ["empty"]
    if " ".join(words) in MASTER_KEYS:
        return ["master_key"]
    reasons = []
    grams = _ngrams(words, o["ngram"])
    if (
        len(grams) >= o["min_ngrams"]
        and 1 - len(set(grams)) / len(grams) > o["max_repeated_ngrams"]
    ):
        reasons.append("repeated_ngrams")
    lines = collections.Counter(" ".join(_words(x)) for x in answer.splitlines())
    lines.pop("", None)
    if lines and max(lines.values()) > o["max_line_repeats"]:
        reasons.append("repeated_lines")
    n = o["opening_words"]
    openings = collections.Counter(
        tuple(w[:n]) for w in map(_words, _SENTENCE_BREAK.split(answer)) if len(w) >= n
    )
    if openings and max(openings.values()) > o["max_opening_repeats"]:
        reasons.append("repeated_openings")
    for reason, source in (("copies_prompt", prompt), ("copies_findings", echo)):
        if not source:
            continue
        n = o["copy_ngram"]
        piece = len(words) < n and f" {' '.join(words)} " in f" {' '.join(_words(source))} "
        if piece or copied_fraction(words, source, n) > o["max_copied"]:
            reasons.append(reason)
    return reasons


def refusal_value(
    answer: str,
    label: str | None,
    signs: dict,
    partial: float | Mapping[str, float],
    matcher: str = "xstest",
    prompt: str | None = None,
) -> float:
    """The refusal component of one answer (see the module docstring)."""
    if isinstance(partial, Mapping):
        partial = partial.get(label, 0.5)
    refused = {"full_refusal": 1.0, "partial_refusal": partial, "full_compliance": 0.0}[
        eval_suites.classify_refusal(answer, matcher, prompt)
    ]
    return refused * float(signs.get(label, 0.0))


def overlong_penalty(tokens, max_tokens: int, buffer_tokens: int) -> np.ndarray:
    """DAPO's soft overlong penalty: 0 up to max - buffer tokens, then linear to -1 at max."""
    tokens = np.asarray(tokens, np.float64)
    free = max_tokens - buffer_tokens
    return np.clip((free - tokens) / max(buffer_tokens, 1), -1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Scoring.


def _require(component: Component, inputs: RewardInputs, field: str, why: str):
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"reward component {component.name!r} ({component.kind}) needs {why}.")
    return value


def _score_one(c: Component, inputs: RewardInputs) -> np.ndarray:
    o, n = c.options, len(inputs.completions)
    if c.kind == "rubric":
        if o["principle"] is None:
            return np.asarray(_require(c, inputs, "rubric_rewards", "a rubric judge"), np.float64)
        verdicts = _require(c, inputs, "verdicts", "a rubric judge")
        principles = verdicts[0].scores.principles if verdicts else {}
        if verdicts and o["principle"] not in principles:
            raise ValueError(
                f"reward component {c.name!r}: the rubric has no principle {o['principle']!r}; "
                f"it has {sorted(principles)}."
            )
        return np.array([v.scores.principles[o["principle"]] or 0.0 for v in verdicts])
    if c.kind == "refusal":
        return np.array([
            refusal_value(a, row.get("label"), o["signs"], o["partial"], o["matcher"],
                          row.get("prompt"))
            for a, row in zip(inputs.completions, map(record_dict, inputs.records))
        ])  # fmt: skip
    if c.kind == "degeneracy":
        echoes = inputs.echoes or [None] * n
        opts = {k: o[k] for k in KIND_OPTIONS["degeneracy"]}
        return np.array([
            -1.0 if degeneracy_reasons(a, record_dict(r)["prompt"], e, **opts) else 0.0
            for a, r, e in zip(inputs.completions, inputs.records, echoes)
        ])  # fmt: skip
    if c.kind == "format":
        return -np.asarray(inputs.malformed or [False] * n, np.float64)
    if c.kind == "length":
        tokens = _require(c, inputs, "answer_tokens", "token counts (rollouts)")
        max_tokens = o["max_tokens"] or inputs.max_tokens
        if not max_tokens:
            raise ValueError(f"reward component {c.name!r} (length): set option max_tokens.")
        buffer = o["buffer_tokens"] if o["buffer_tokens"] is not None else max(max_tokens // 4, 1)
        return overlong_penalty(tokens, max_tokens, buffer)
    records = [record_dict(r) for r in inputs.records]
    try:
        out = c.fn(
            [r["prompt"] for r in records], list(inputs.completions),
            records=records, verdicts=inputs.verdicts,
        )  # fmt: skip
    except Exception as e:
        raise RuntimeError(f"reward component {c.name!r} ({c.target}) raised: {e!r}") from e
    try:
        return np.asarray(list(out), np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"reward component {c.name!r} ({c.target}) returned {type(out).__name__}, not a list "
            "of floats."
        ) from e


def score(components: Sequence[Component], inputs: RewardInputs) -> np.ndarray:
    """[components, rows] float64 values; a wrong length or a non-finite value names the row."""
    n = len(inputs.completions)
    rows = []
    for c in components:
        v = _score_one(c, inputs)
        if v.shape != (n,):
            raise ValueError(
                f"reward component {c.name!r} returned {v.size} values with shape {v.shape} for "
                f"{n} answers; return one float per answer."
            )
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"reward component {c.name!r} gave {v[i]} for row {i} (prompt id "
                f"{record_dict(inputs.records[i])['id']!r}); rewards must be finite."
            )
        rows.append(v)
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------
# Aggregation.


@dataclasses.dataclass
class Composed:
    names: list[str]
    weights: np.ndarray  # [K]
    values: np.ndarray  # [K, rows] raw component values
    vetoed: np.ndarray  # [rows] bool
    totals: np.ndarray  # [rows] the reward (sum: weighted sum; gdpo: s), floored where vetoed
    advantages: np.ndarray  # [rows] float32, what the loss uses
    contributions: np.ndarray  # [K, rows] each component's part of the advantages
    veto_contribution: np.ndarray  # [rows] the floor's part; with the K parts sums to advantages
    group_size: int


def vetoed_rows(components: Sequence[Component], values: np.ndarray) -> np.ndarray:
    """[rows] bool: some veto component's value is below its `veto_below`."""
    vetoed = np.zeros(values.shape[1], bool)
    for c, v in zip(components, values):
        if c.options["veto"]:
            vetoed |= v < c.options["veto_below"]
    return vetoed


def _floor(components, totals: np.ndarray, vetoed: np.ndarray) -> np.ndarray:
    if not vetoed.any():
        return totals
    floors = [c.options["floor"] for c in components if c.options["veto"]]
    if None in floors:  # below every unvetoed answer of the batch
        floor = (totals[~vetoed].min() if (~vetoed).any() else 0.0) - 1.0
    else:
        floor = min(floors)
    return np.where(vetoed, float(floor), totals)


def weighted_totals(components: Sequence[Component], values: np.ndarray) -> np.ndarray:
    """[rows] sum_k w_k r_k, floored where vetoed: one answer's reward without a group
    (IterAlign's `detect='reward'`); the rubric alone at weight 1 gives its reward exactly."""
    values = np.asarray(values, np.float64)
    w = np.array([c.weight for c in components], np.float64)
    if len(components) == 1 and w[0] == 1.0:
        totals = values[0].copy()  # QA-LIGN's reward alone: bit for bit
    else:
        totals = (w[:, None] * values).sum(axis=0)
    return _floor(components, totals, vetoed_rows(components, values))


def _centre(x: np.ndarray, group_size: int, scale) -> np.ndarray:
    """x minus its group means, divided by `scale` ([groups, 1] or a scalar)."""
    x = x.reshape(-1, group_size)
    return ((x - x.mean(axis=1, keepdims=True)) / scale).reshape(-1)


def aggregate(
    components: Sequence[Component], values: np.ndarray, group_size: int, *,
    aggregation: str = "sum", eps: float = 1e-6, scale_by_std: bool = True,
) -> Composed:  # fmt: skip
    """Totals and advantages of [K, rows] component values (see the module docstring)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"reward.aggregation={aggregation!r}; use one of {AGGREGATIONS}.")
    values = np.asarray(values, np.float64)
    k, n = values.shape
    if k != len(components):
        raise ValueError(f"{k} rows of values for {len(components)} components.")
    if group_size < 2 or n % group_size:
        raise ValueError(f"{n} rewards are not whole groups of group_size={group_size} >= 2.")
    w = np.array([c.weight for c in components], np.float64)
    vetoed = vetoed_rows(components, values)
    if aggregation == "sum":
        parts = w[:, None] * values
        totals = weighted_totals(components, values)
    else:  # gdpo: each component normalized within its group first
        grouped = values.reshape(k, -1, group_size)
        centred = grouped - grouped.mean(axis=2, keepdims=True)
        std = grouped.std(axis=2, ddof=1, keepdims=True)
        z = np.divide(centred, std + eps, out=np.zeros_like(centred), where=std > 0)
        z = (z if scale_by_std else centred).reshape(k, n)  # a constant component gives 0
        parts = w[:, None] * z
        totals = _floor(components, parts.sum(axis=0), vetoed)
    kept = np.where(vetoed, 0.0, parts)
    floored = np.where(vetoed, totals, 0.0)
    if aggregation == "sum":
        advantages = np.asarray(
            losses.group_advantages(totals, group_size, eps=eps, scale_by_std=scale_by_std)
        )
        std = totals.reshape(-1, group_size).std(axis=1, ddof=1, keepdims=True)
        scale = std + eps if scale_by_std else 1.0
        contributions = np.stack([_centre(x, group_size, scale) for x in kept])
        veto_part = _centre(floored, group_size, scale)
    else:  # gdpo: then the batch normalization
        mean, scale = totals.mean(), (totals.std() + eps) if totals.std() > 0 else 1.0
        advantages = (totals - mean) / scale
        contributions = (kept - kept.mean(axis=1, keepdims=True)) / scale
        veto_part = (floored - floored.mean()) / scale
    return Composed(
        names=[c.name for c in components], weights=w, values=values, vetoed=vetoed,
        totals=totals, advantages=np.asarray(advantages, np.float32),
        contributions=contributions, veto_contribution=veto_part, group_size=group_size,
    )  # fmt: skip


def informative_groups(composed: Composed) -> np.ndarray:
    """[groups] bool: some component, or the veto, varies within the group.

    A group whose totals tie while a component differs is informative (GDPO gives it signal);
    only a group where every component is constant carries none.
    """
    g = composed.group_size
    rows = np.concatenate([composed.values, composed.vetoed[None].astype(np.float64)])
    grouped = rows.reshape(rows.shape[0], -1, g)
    return (grouped.max(axis=2) > grouped.min(axis=2)).any(axis=0)


def compose(components, inputs: RewardInputs, group_size: int, *, aggregation: str = "sum",
            eps: float = 1e-6, scale_by_std: bool = True) -> Composed:  # fmt: skip
    """`score` then `aggregate`: one call per batch of rollouts."""
    return aggregate(
        components, score(components, inputs), group_size, aggregation=aggregation, eps=eps,
        scale_by_std=scale_by_std,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Logging.


def metrics(composed: Composed, components=(), inputs: RewardInputs | None = None) -> dict:
    """Per component: raw mean/std, its advantage part's mean |.| and std, zero-variance groups;
    with `components` and `inputs`, each degeneracy component's rate per reason."""
    g = composed.group_size
    m = {
        "reward/total_mean": float(composed.totals.mean()),
        "reward/total_std": float(composed.totals.std()),
        "reward/veto_rate": float(composed.vetoed.mean()),
        "reward/zero_variance_groups": float(1.0 - informative_groups(composed).mean()),
    }
    for name, v, part in zip(composed.names, composed.values, composed.contributions):
        grouped = v.reshape(-1, g)
        m[f"reward/{name}/mean"] = float(v.mean())
        m[f"reward/{name}/std"] = float(v.std())
        m[f"reward/{name}/adv_abs_mean"] = float(np.abs(part).mean())
        m[f"reward/{name}/adv_std"] = float(part.std())
        m[f"reward/{name}/zero_variance_groups"] = float(
            np.mean(grouped.max(axis=1) == grouped.min(axis=1))
        )
    for c in components:
        if c.kind == "degeneracy" and inputs is not None:
            for reason, rate in degeneracy_rates(c, inputs).items():
                m[f"reward/{c.name}/{reason}"] = rate
        if c.kind == "refusal" and inputs is not None:
            for label, rate in refusal_rates(c, inputs).items():
                m[f"reward/{c.name}/refused_{label}"] = rate
    return m


def refusal_rates(c: Component, inputs: RewardInputs) -> dict[str, float]:
    """Per prompt label, the fraction of answers refusal component `c`'s matcher calls a refusal
    (full or partial): whether the policy tells harmful from benign prompts, which the
    component's mean alone hides (refusing both kinds alike gives a mean near 0)."""
    by_label = collections.defaultdict(list)
    for a, r in zip(inputs.completions, inputs.records):
        row = record_dict(r)
        refused = eval_suites.classify_refusal(a, c.options["matcher"], row.get("prompt"))
        by_label[row["label"] or "none"].append(refused != "full_compliance")
    return {label: float(np.mean(v)) for label, v in sorted(by_label.items())}


def degeneracy_rates(c: Component, inputs: RewardInputs) -> dict[str, float]:
    """The fraction of answers flagged for each reason by degeneracy component `c`."""
    echoes = inputs.echoes or [None] * len(inputs.completions)
    opts = {k: c.options[k] for k in KIND_OPTIONS["degeneracy"]}
    counts = collections.Counter(
        reason
        for a, r, e in zip(inputs.completions, inputs.records, echoes)
        for reason in degeneracy_reasons(a, record_dict(r)["prompt"], e, **opts)
    )
    return {reason: counts[reason] / len(inputs.completions) for reason in DEGENERACY_REASONS}


def row_fields(composed: Composed, i: int) -> dict:
    """Row i's components, veto, total and advantage (for rollouts.jsonl)."""
    return {
        "components": {n: float(v[i]) for n, v in zip(composed.names, composed.values)},
        "vetoed": bool(composed.vetoed[i]),
        "total": float(composed.totals[i]),
        "advantage": float(composed.advantages[i]),
    }
