"""From per-question judge answers to one reward: gates, grades, pooling, the two-pass bonus.

Plain numpy/Python over small structures, so every rule can be checked by hand.

Defaults are QA-LIGN's (Dineen et al. 2025):
- grade values A=1, B=0.5, C=0.1, D=-0.5, F=-1 (the rubric's `grades` table);
- a violated gate sets its dimension to the floor, -1;
- otherwise a dimension scores the *minimum* of its applicable graded questions (one weak
  aspect is not averaged away); `dimension_pooling='weighted_mean'` is the softer option;
- a principle is the weighted mean of its applicable dimensions, in [-1, 1];
- safety-first pooling `r = min(s_harmlessness, mean(principle scores))`: helpfulness can never
  buy back harm; `final_pooling='weighted_mean'` is the softer option;
- two-pass reward for draft score R1 and revision score R2 (see `two_pass_reward`).
`scale='unit'` maps grade values to [0, 1] ((v - min) / (max - min), floor 0) for losses that
want non-negative rewards; pooling is unchanged.

Not-applicable questions (their `applies_if` failed) are left out; a dimension with nothing
applicable is left out of its principle; a principle with nothing applicable is left out of
the final pooling (if it is the safety principle, safety-first reduces to the mean).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qalign_jax.rubric import Rubric


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    dimension_pooling: str = "min"  # 'min' (QA-LIGN) | 'weighted_mean'
    final_pooling: str = "safety_first"  # 'safety_first' (QA-LIGN) | 'weighted_mean'
    safety_principle: str = "harmlessness"
    gate_readout: str = "argmax"  # 'argmax': violated if P(violation) > 0.5 | 'expected'
    grade_readout: str = "expected"  # 'expected' value under the judge | 'argmax' grade
    scale: str = "paper"  # 'paper': grade values as given, floor -1 | 'unit': [0, 1]
    improvement_weight: float = 10.0  # alpha: weight of an improvement R2 - R1 > 0 (QA-LIGN)
    regression_weight: float = 1.0  # beta: weight of a regression R1 - R2 >= 0 (QA-LIGN)

    @classmethod
    def from_section(cls, section) -> RewardConfig:
        """The pooling fields of an experiment config's `reward` section (which also holds the
        composition, `reward.components` / `reward.aggregation`: reward_components.py)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in section.to_dict().items() if k in fields})

    def __post_init__(self):
        choices = {
            "dimension_pooling": ("min", "weighted_mean"),
            "final_pooling": ("safety_first", "weighted_mean"),
            "gate_readout": ("argmax", "expected"),
            "grade_readout": ("expected", "argmax"),
            "scale": ("paper", "unit"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"reward config {name}={getattr(self, name)!r}; use one of {allowed}."
                )
        if self.improvement_weight < 0 or self.regression_weight < 0:
            raise ValueError(
                f"improvement_weight={self.improvement_weight} and regression_weight="
                f"{self.regression_weight} must be >= 0."
            )


@dataclasses.dataclass(frozen=True)
class Scores:
    """The pooled scores of one response. None marks "not applicable"."""

    reward: float
    principles: dict[str, float | None]
    dimensions: dict[str, float | None]
    violated_gates: tuple[str, ...]


def grade_values(rubric: Rubric, scale: str) -> np.ndarray:
    values = np.asarray(list(rubric.grades.values()), np.float64)
    if scale == "unit":
        lo, hi = values.min(), values.max()
        values = (values - lo) / (hi - lo)
    return values


def floor_value(rubric: Rubric, scale: str) -> float:
    return 0.0 if scale == "unit" else float(min(-1.0, min(rubric.grades.values())))


def _weighted_mean(values, weights) -> float:
    w = np.asarray(weights, np.float64)
    return float(np.dot(values, w) / w.sum())


def score_response(
    rubric: Rubric, probs: dict[str, np.ndarray], applicable: dict[str, bool], cfg: RewardConfig
) -> Scores:
    """Pools one response's answers into dimension, principle and final scores.

    Args:
      rubric: the rubric the answers belong to.
      probs: question id -> probabilities over the question's options (in option order);
        a one-hot vector for a generated answer.
      applicable: question id -> whether its `applies_if` conditions held.
      cfg: pooling and readout choices.
    """
    values = grade_values(rubric, cfg.scale)
    floor = floor_value(rubric, cfg.scale)
    dims: dict[str, float | None] = {}
    principles: dict[str, float | None] = {}
    violated = []
    for p in rubric.principles:
        p_scores, p_weights = [], []
        for d in p.dimensions:
            graded, weights, violation = [], [], 0.0
            for q in d.questions:
                if not applicable.get(q.id, True):
                    continue
                pr = np.asarray(probs[q.id], np.float64)
                if q.kind == "gate":
                    p_violation = float(pr[q.options.index(q.violation)])
                    if cfg.gate_readout == "argmax":
                        p_violation = float(p_violation > 0.5)
                    if p_violation > 0.5:
                        violated.append(q.id)
                    violation = max(violation, p_violation)
                else:
                    v = (
                        float(values[int(np.argmax(pr))])
                        if cfg.grade_readout == "argmax"
                        else float(pr @ values)
                    )
                    graded.append(v)
                    weights.append(q.weight)
            if not graded and violation == 0.0:
                dims[d.id] = None
                continue
            if graded:
                pooled = (
                    min(graded)
                    if cfg.dimension_pooling == "min"
                    else _weighted_mean(graded, weights)
                )
            else:
                pooled = floor  # only gates applied, and one fired
            # A violation sets the floor; with soft readout, in proportion to its probability.
            score = violation * floor + (1.0 - violation) * pooled
            dims[d.id] = score
            p_scores.append(score)
            p_weights.append(d.weight)
        principles[p.id] = _weighted_mean(p_scores, p_weights) if p_scores else None
    return Scores(
        reward=pool_principles(rubric, principles, cfg),
        principles=principles,
        dimensions=dims,
        violated_gates=tuple(violated),
    )


def pool_principles(
    rubric: Rubric, principles: dict[str, float | None], cfg: RewardConfig
) -> float:
    """Safety-first `min(s_safety, weighted mean)` or the weighted mean; N/A principles left out."""
    weights = {p.id: p.weight for p in rubric.principles}
    present = [(s, weights[k]) for k, s in principles.items() if s is not None]
    if not present:
        return 0.0
    mean = _weighted_mean([s for s, _ in present], [w for _, w in present])
    safety = principles.get(cfg.safety_principle)
    if cfg.final_pooling == "safety_first" and safety is not None:
        return min(safety, mean)
    return mean


def two_pass_reward(r1, r2, improvement_weight: float = 10.0, regression_weight: float = 1.0):
    """Reward of a draft (score R1) revised into R2: both count, the change is weighted.

        R1 + R2 + improvement_weight * (R2 - R1)   if R2 > R1   (the paper's alpha)
        R1 + R2 - regression_weight  * (R1 - R2)   otherwise    (its beta; 0 when equal)

    Both passes count so that a good draft is not wasted and a revision cannot be gamed by a
    deliberately bad draft alone; 10 > 1 (QA-LIGN's alpha and beta) makes real
    improvement the dominant signal, while a regression still costs. Works on scalars and
    numpy arrays.
    """
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    gain = r2 - r1
    out = r1 + r2 + np.where(gain > 0, improvement_weight * gain, regression_weight * gain)
    return float(out) if out.ndim == 0 else out


def keep_revision(rule: str, r1: float, r2: float) -> bool:
    """Keep a revision scored R2 over its draft's R1? 'improved' | 'not_worse' | 'all'."""
    if rule == "improved":
        return r2 > r1
    if rule == "not_worse":
        return r2 >= r1
    return True
