"""The `best_of_n` loop: rejection-sampling SFT data scored by the reward components, resumably.

  python -m qalign_jax.train --config configs/best_of_n_compose_smol.py --workdir workdirs/bon

For each prompt of `best_of_n.sources`, the policy (`checkpoint.init`'s weights when set, e.g.
an SFT stage's workdir, else `model.source`; the judge is always `model.source`) samples
`num_samples` single-pass answers (`rollouts.rollout`; `num_samples_by_label` sets N per prompt
label, e.g. fewer for benign prompts whose first answer is almost always kept; a label with a
smaller N packs more prompts into each sampler call, up to `batch_prompts x num_samples`
rows); `config.reward.components` score them (their weighted sum with vetoes,
`reward_components.weighted_totals`, as IterAlign's `detect='reward'`); the best answer is kept
when its reward reaches the prompt label's threshold (`min_reward_by_label`, ((label,
threshold), ...), else `min_reward`).
A priming stage for rewards the policy rarely earns: GRPO learns nothing from a group of G
samples that all score alike, and a behaviour the base model shows in 3% of its samples (a
refusal of a harmful prompt) is in few groups; N = 16 samples per prompt find it where it
exists, and SFT on the kept answers makes it common enough for GRPO to shape (RAFT, arXiv
2304.06767; rejection-sampling fine-tuning, arXiv 2308.01825).

Outputs in the workdir:
  samples.jsonl  one row per prompt: every answer with its components and total, the choice
                 (appended a batch at a time; a rerun skips the prompts already there);
  sft.jsonl      the kept (prompt, completion) pairs: the `data.train_path` of an SFT stage;
  summary.json   prompts, kept, keep rate per label, mean best and mean sample reward.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from qalign_jax import data, files, reward_components, rollouts, sharding, stages
from qalign_jax import judge as judge_lib
from qalign_jax.metrics import format_duration
from qalign_jax.models import load

SAMPLES, SFT, SUMMARY = "samples.jsonl", "sft.jsonl", "summary.json"


def threshold(config, label) -> float:
    """The reward a prompt's best answer must reach to be kept."""
    b = config.best_of_n
    return float(dict(b.min_reward_by_label).get(label, b.min_reward))


def samples_for(config, label) -> int:
    """N, the answers sampled for a prompt of this label."""
    b = config.best_of_n
    return int(dict(b.num_samples_by_label).get(label, b.num_samples))


def choose(totals: np.ndarray, min_reward: float) -> int | None:
    """The index of the best answer (the first of equal ones), or None below `min_reward`."""
    best = int(np.argmax(totals))
    return best if totals[best] >= min_reward else None


def sample_batch(config, policy, judge, components, records, prompt_ids, n, rng) -> list[dict]:
    """`n` answers per record, scored and chosen: one row per record."""
    b = config.best_of_n
    rows = [r for r in records for _ in range(n)]
    opts = rollouts.RolloutConfig(
        two_pass=False, draft_max_tokens=b.max_new_tokens, temperature=b.temperature,
        top_p=b.top_p, batch_buckets=(len(rows),),
    )  # fmt: skip
    ro = rollouts.rollout(policy, judge, rows, [prompt_ids[r.id] for r in rows], opts, rng)
    inputs = reward_components.inputs_from_rollouts(ro, opts)
    values = reward_components.score(components, inputs)
    totals = reward_components.weighted_totals(components, values).reshape(len(records), -1)
    out = []
    for i, r in enumerate(records):
        span = range(i * n, (i + 1) * n)
        best = choose(totals[i], threshold(config, r.label))
        out.append({
            "id": r.id, "prompt": r.prompt, "label": r.label,
            "answers": [ro.drafts[j] for j in span],
            "components": {c.name: [float(v) for v in values[k, span.start:span.stop]]
                           for k, c in enumerate(components)},
            "totals": [float(t) for t in totals[i]],
            "best": best, "completion": None if best is None else ro.drafts[span[best]],
        })  # fmt: skip
    return out


def summarize(rows: list[dict]) -> dict:
    labels = sorted({str(r["label"]) for r in rows})
    by_label = {}
    for label in labels:
        rs = [r for r in rows if str(r["label"]) == label]
        by_label[label] = {
            "prompts": len(rs),
            "kept": sum(r["best"] is not None for r in rs),
            "mean_best_reward": float(np.mean([max(r["totals"]) for r in rs])),
            "mean_sample_reward": float(np.mean([np.mean(r["totals"]) for r in rs])),
        }
    kept = sum(r["best"] is not None for r in rows)
    return {
        "prompts": len(rows), "kept": kept, "keep_rate": kept / len(rows) if rows else 0.0,
        "by_label": by_label,
    }  # fmt: skip


def run(config, workdir: str) -> None:
    b = config.best_of_n
    if b.num_samples < 1:
        raise ValueError(f"best_of_n.num_samples={b.num_samples}; use 1 or more.")
    for label, n in dict(b.num_samples_by_label).items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"best_of_n.num_samples_by_label[{label!r}]={n!r}; use an integer of 1 or more."
            )
    for label, value in dict(b.min_reward_by_label).items():
        if not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"best_of_n.min_reward_by_label[{label!r}]={value!r} is not a number.")
    components = reward_components.from_config(config.reward)
    records = data.select_prompts(b.sources, config.seed)
    mesh = sharding.make_mesh(config.mesh.shape)
    base_model = load.from_config(config, mesh)
    if base_model.tokenizer is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    judge = None
    if reward_components.needs_judge(components):
        judge = judge_lib.from_config(config, base_model)  # the base judges, as in GRPO
    # The sampling policy: `checkpoint.init`'s weights when set (a primed stage), else the base.
    policy, origin = load.initial_policy(config, base_model)
    logging.info("best_of_n: sampling from %s", origin)
    prompt_ids = data.chat_ids(policy.tokenizer, records, b.max_prompt_tokens, b.on_long_prompt)
    records = [r for r in records if r.id in prompt_ids]
    labels = sorted({r.label for r in records}, key=str)  # as samples_for looks them up
    unknown = [label for label in dict(b.num_samples_by_label) if label not in labels]
    if unknown:
        raise ValueError(
            f"best_of_n.num_samples_by_label: no prompt has label {unknown[0]!r}; the prompts' "
            f"labels are {labels}."
        )
    base = jax.random.key(config.seed)
    t0 = time.time()
    # Prompts by N, each group in calls of up to `batch_prompts x num_samples` rows (one group,
    # the records' order, without num_samples_by_label).
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(samples_for(config, r.label), []).append(i)

    def sample_group(n: int, indices: list[int]) -> list[dict]:
        """The rows of records[indices], N = n each, in calls of up to batch_prompts x
        num_samples rows."""
        t1 = time.time()

        def batch_rows(batch: list, first: int) -> list[dict]:
            # The key depends on the batch's first prompt, not on how far an earlier run got.
            rng = jax.random.fold_in(base, indices[first])
            return sample_batch(config, policy, judge, components, batch, prompt_ids, n, rng)

        def progress(done: list[dict], finished: int, todo: int) -> None:
            s = summarize(done)  # every row in the file so far, of all groups
            eta = format_duration((time.time() - t1) / finished * (todo - finished))
            print(f"best_of_n {len(done)}/{len(records)}  kept {s['kept']} "
                  f"({100 * s['keep_rate']:.0f}%)  {format_duration(time.time() - t0)} "
                  f"(ETA of the prompts with N={n}: {eta})", flush=True)  # fmt: skip

        return stages.map_in_batches(
            [records[i] for i in indices], batch_rows, os.path.join(workdir, SAMPLES),
            batch_size=max(1, b.batch_prompts * b.num_samples // n), label=f"best_of_n N={n}",
            on_batch=progress,
        )  # fmt: skip

    by_id = {row["id"]: row for n, indices in groups.items() for row in sample_group(n, indices)}
    done = [by_id[r.id] for r in records]
    summary = summarize(done)
    if jax.process_index() == 0:
        files.write_jsonl(
            os.path.join(workdir, SFT),
            ({"id": r["id"], "prompt": r["prompt"], "completion": r["completion"],
              "label": r["label"]} for r in done if r["best"] is not None),
        )  # fmt: skip
        files.write_json(os.path.join(workdir, SUMMARY), summary)
    print(json.dumps(summary, indent=1))
    print(f"-> {os.path.join(workdir, SFT)} ({summary['kept']} examples)")
