"""DAPO's batch shaping for the GRPO loop: dynamic sampling and overlong rollouts.

Host-side functions of `rollouts.Rollouts` and `reward_components.Composed`, called by
`loops/grpo.run` between the rewards and the training rows (config fields in `config.grpo`):

  dynamic_sampling  'off' (the paper's) | 'drop' | 'resample' (DAPO, arXiv 2503.14476). A group
                    of G samples is *informative* when some reward component (or the veto)
                    varies within it (`reward_components.informative_groups`); a zero-variance
                    group has advantages 0 but still counts in the loss's normalizer and KL.
                    'drop' masks such groups out of the loss; 'resample' first rolls out more
                    prompts (`resample`, at most max_resample_rounds extra rollout calls of B
                    prompts each, the prompts a pure function of (seed, step, round) so that a
                    resumed run repeats them) and keeps the first B informative groups, filling
                    the rest with zero-variance ones, masked. The batch stays B x G rows: one
                    compile of the sampler and of the update.
  overlong          'keep' (the paper's) | 'mask': rows cut by the length limit (finish reason
                    'length' in the final pass, `truncated_rows`) are masked out of the loss |
                    'soft_penalty': DAPO's soft overlong penalty is added to the reward as a
                    `length` component named 'overlong' (`with_overlong_penalty`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qalign_jax import data, losses, reward_components

DYNAMIC_SAMPLING = ("off", "drop", "resample")
OVERLONG = ("keep", "mask", "soft_penalty")
RESAMPLE_SEED_OFFSET = 1_000_003  # the extra prompts' stream: prompts_for_step's, seed + this


def check_config(g) -> None:
    """Clear errors for the `grpo.loss / dynamic_sampling / overlong` fields."""
    for field, allowed in (("loss", losses.RATIOS), ("dynamic_sampling", DYNAMIC_SAMPLING),
                           ("overlong", OVERLONG)):  # fmt: skip
        if g[field] not in allowed:
            raise ValueError(f"grpo.{field}={g[field]!r}; use one of {allowed}.")
    if g.max_resample_rounds < 0:
        raise ValueError(f"grpo.max_resample_rounds={g.max_resample_rounds}; it must be >= 0.")
    if g.overlong_cache_tokens < 0:
        raise ValueError(
            f"grpo.overlong_cache_tokens={g.overlong_cache_tokens}; it must be >= 0 (0 = a "
            "quarter of the final pass's token limit)."
        )


def with_overlong_penalty(components, g) -> list:
    """`components` plus ('overlong', 'length', 1.0) when grpo.overlong = 'soft_penalty'."""
    if g.overlong != "soft_penalty":
        return list(components)
    entry = ("overlong", "length", 1.0, {"buffer_tokens": g.overlong_cache_tokens or None})
    return list(components) + reward_components.parse_components([entry])


def truncated_rows(ro) -> np.ndarray:
    """[rows] bool: the final pass (the continuation two-pass, else the draft) hit its limit."""
    return np.array([
        (c if c is not None else d) == "length" for d, c in zip(ro.draft_finish, ro.cont_finish)
    ], bool)  # fmt: skip


def masked_rows(ro, composed, g) -> np.ndarray:
    """[rows] bool: the rows kept out of the loss (zero-variance groups, truncated rows)."""
    out = np.zeros(len(ro.records), bool)
    if g.dynamic_sampling != "off":
        out |= np.repeat(~reward_components.informative_groups(composed), composed.group_size)
    if g.overlong == "mask":
        out |= truncated_rows(ro)
    return out


# ---------------------------------------------------------------------------------------------
# Resampling.


def resample_prompts(records, step: int, round_index: int, per_step: int, seed: int,
                     max_rounds: int, label_mix=None) -> list:  # fmt: skip
    """The B extra prompts of `step`'s round r >= 1: a pure function of (seed, step, r), drawn
    as the step's own prompts are: uniformly, or `label_mix` of each label (`grpo.label_mix`)."""
    index = step * max_rounds + round_index - 1
    return data.draw_prompts(records, index, per_step, seed + RESAMPLE_SEED_OFFSET, label_mix)


def join_rollouts(parts: list):
    """One `Rollouts` of the rows of `parts` in order (new_tokens and timings summed)."""
    if len(parts) == 1:
        return parts[0]
    values = {}
    for f in dataclasses.fields(parts[0]):
        vs = [getattr(p, f.name) for p in parts]
        if isinstance(vs[0], list):
            values[f.name] = [x for v in vs for x in v]
        elif isinstance(vs[0], np.ndarray):
            values[f.name] = np.concatenate(vs)
        elif isinstance(vs[0], dict):
            values[f.name] = {k: sum(v[k] for v in vs) for k in vs[0]}
        elif isinstance(vs[0], int):
            values[f.name] = sum(vs)
        else:  # None (no judge): the same in every part
            values[f.name] = vs[0]
    return type(parts[0])(**values)


def take_rows(ro, rows):
    """The `Rollouts` of `rows` (indices), in that order; counters and timings kept whole."""
    values = {}
    for f in dataclasses.fields(ro):
        v = getattr(ro, f.name)
        if isinstance(v, list):
            values[f.name] = [v[i] for i in rows]
        elif isinstance(v, np.ndarray):
            values[f.name] = v[np.asarray(rows, int)]
        else:
            values[f.name] = v
    return type(ro)(**values)


@dataclasses.dataclass
class Resampled:
    rollouts: object  # rollouts.Rollouts, B x G rows
    extra_prompts: int  # prompts drawn beyond the step's B
    rounds: int  # extra rollout calls made
    zero_variance_fraction: float  # of every group drawn this step


def resample(ro, composed, draw, score, num_groups: int, max_rounds: int) -> Resampled:
    """DAPO's dynamic sampling: up to `max_rounds` extra draws until `num_groups` groups vary.

    Args:
      ro, composed: the step's own rollouts (B groups of G) and their rewards.
      draw: round r (1, 2, ...) -> the `Rollouts` of that round's B x G extra rows.
      score: Rollouts -> `Composed` (the step's reward composition).
      num_groups: B; max_rounds: the bound on extra rollout calls.

    Returns:
      `Resampled` whose rollouts are the first B informative groups in draw order, then (when
      fewer were found) the first zero-variance ones: always B x G rows.
    """
    g = composed.group_size
    parts, informative = [ro], [reward_components.informative_groups(composed)]
    rounds = 0
    while sum(int(i.sum()) for i in informative) < num_groups and rounds < max_rounds:
        rounds += 1
        extra = draw(rounds)
        parts.append(extra)
        informative.append(reward_components.informative_groups(score(extra)))
    flags = np.concatenate(informative)
    order = np.concatenate([np.flatnonzero(flags), np.flatnonzero(~flags)])[:num_groups]
    rows = (order[:, None] * g + np.arange(g)[None]).reshape(-1)
    return Resampled(
        rollouts=take_rows(join_rollouts(parts), rows), extra_prompts=rounds * num_groups,
        rounds=rounds, zero_variance_fraction=float(1.0 - flags.mean()),
    )  # fmt: skip


def step_metrics(ro, masked: np.ndarray, zero_variance_fraction: float, extra_prompts: int):
    """The `grpo/` metrics of one step."""
    return {
        "grpo/zero_variance_fraction": zero_variance_fraction,
        "grpo/extra_prompts": float(extra_prompts),
        "grpo/truncated_fraction": float(truncated_rows(ro).mean()),
        "grpo/masked_rows": float(masked.sum()),
    }
