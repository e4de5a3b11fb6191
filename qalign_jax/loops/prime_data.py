"""The `prime_data` loop: builds QA-LIGN's reflection-priming set, resumably.

For each prompt of the configured mix (`config.prime.sources`, chosen by a hash of the seed
and the ids, so a later stage can take a disjoint set with `data.split_by_hash`):

  1. the policy (`checkpoint.init`'s weights when set, else `model.source`) drafts an answer;
  2. the judge (always `model.source`) scores the draft on the rubric;
  3. the findings are verbalized (`reflection.findings_block`, ending in a forced <Think>);
  4. the reviser (the policy itself, or a stronger model) writes the reflection up to
     </Think> (closed for it if it runs out of tokens), then the revision;
  5. the judge scores the revision;
  6. the example is kept by `config.prime.keep` ('not_worse': R2 >= R1 by default).

Outputs in the workdir:
  prime_data.jsonl  one row per prompt with every part and every score, appended a batch at a
                    time (a restarted run skips the ids already there);
  prime_sft.jsonl   the kept examples as SFT segments (`reflection.segments`), rewritten at the
                    end: the `data.train_path` of the SFT priming stage;
  summary.json      size, keep rate, malformed count, mean draft vs revision scores.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from qalign_jax import data, files, reflection, rewards, rollouts, sharding, stages
from qalign_jax import judge as judge_lib
from qalign_jax.metrics import format_duration
from qalign_jax.models import load

KEEP_RULES = ("improved", "not_worse", "all")
ROWS, SFT, SUMMARY = "prime_data.jsonl", "prime_sft.jsonl", "summary.json"


def process_batch(config, policy, reviser, judge, records, rng) -> list[dict]:
    """Draft, judge, findings, reflection + revision, judge again: one row per record.

    `rollouts.rollout` with the reviser writing pass 2 from text (even when it is the policy):
    its reflection is closed with </Think> after `prime.think_max_tokens`."""
    p, tok = config.prime, policy.tokenizer
    opts = rollouts.RolloutConfig(
        two_pass=True, draft_max_tokens=p.draft_max_tokens,
        revision_max_tokens=p.revision_max_tokens, think_max_tokens=p.think_max_tokens,
        temperature=p.temperature, top_p=p.top_p, max_findings=p.max_findings,
    )  # fmt: skip
    chats = [tok.apply_chat_template([{"role": "user", "content": r.prompt}]) for r in records]
    k_draft, k_revision = jax.random.split(rng)
    ro = rollouts.rollout(policy, judge, records, chats, opts, k_draft, k_revision, reviser=reviser)
    drafts, draft_v, rev_v = ro.drafts, ro.draft_verdicts, ro.revision_verdicts
    rows = []
    for i, r in enumerate(records):
        think, revision, error = ro.thinks[i], ro.revisions[i], ro.errors[i]
        if not drafts[i] and error is None:
            error = "the draft is empty"
        r1 = draft_v[i].scores.reward
        row = {
            "id": r.id, "prompt": r.prompt, "category": r.category, "label": r.label,
            "draft": drafts[i], "draft_finish": ro.draft_finish[i],
            "draft_reward": r1, "draft_principles": draft_v[i].scores.principles,
            "draft_violated_gates": list(draft_v[i].scores.violated_gates),
            "findings": ro.findings[i], "think": think, "revision": revision, "error": error,
        }  # fmt: skip
        if rev_v[i] is not None and error is None:
            r2 = rev_v[i].scores.reward
            row.update(
                revision_reward=r2,
                revision_principles=rev_v[i].scores.principles,
                revision_violated_gates=list(rev_v[i].scores.violated_gates),
                two_pass_reward=rewards.two_pass_reward(
                    r1, r2, judge.reward_cfg.improvement_weight, judge.reward_cfg.regression_weight
                ),
                kept=rewards.keep_revision(config.prime.keep, r1, r2),
                segments=reflection.segments(drafts[i], ro.findings[i], think, revision),
            )
        else:
            row.update(kept=False)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Size, keep rate and mean scores of the finished rows."""
    well = [r for r in rows if r["error"] is None]
    kept = [r for r in rows if r["kept"]]

    def mean(rs, key):
        return float(np.mean([r[key] for r in rs])) if rs else None

    def principle_means(rs, key):
        names = sorted({k for r in rs for k in r[key]})
        out = {}
        for name in names:
            vals = [r[key][name] for r in rs if r[key].get(name) is not None]
            out[name] = float(np.mean(vals)) if vals else None
        return out

    return {
        "prompts": len(rows),
        "malformed": len(rows) - len(well),
        "kept": len(kept),
        "keep_rate": len(kept) / len(rows) if rows else 0.0,
        "draft_reward_mean": mean(well, "draft_reward"),
        "revision_reward_mean": mean(well, "revision_reward"),
        "improved_fraction": (
            float(np.mean([r["revision_reward"] > r["draft_reward"] for r in well]))
            if well
            else None
        ),
        "kept_draft_reward_mean": mean(kept, "draft_reward"),
        "kept_revision_reward_mean": mean(kept, "revision_reward"),
        "draft_principles": principle_means(well, "draft_principles"),
        "revision_principles": principle_means(well, "revision_principles"),
        "errors": sorted({r["error"] for r in rows if r["error"]}),
    }


def run(config, workdir: str) -> None:
    if config.prime.keep not in KEEP_RULES:
        raise ValueError(f"config.prime.keep={config.prime.keep!r}; use one of {KEEP_RULES}.")
    records = data.select_prompts(config.prime.sources, config.seed)
    rows_path = os.path.join(workdir, ROWS)
    mesh = sharding.make_mesh(config.mesh.shape)
    base_model = load.from_config(config, mesh)
    if base_model.tokenizer is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    judge = judge_lib.from_config(config, base_model)  # model.source judges, as in GRPO
    policy, origin = load.initial_policy(config, base_model)  # checkpoint.init's, when set
    logging.info("prime_data: drafting with %s", origin)
    reviser = policy
    if config.prime.reviser:
        reviser = load.load_model(
            config.prime.reviser, mesh=mesh, rules=config.sharding.rules,
            param_dtype=config.model.param_dtype, dtype=config.model.dtype, seed=config.seed,
            tokenizer_source=config.prime.reviser_tokenizer or None,
        )  # fmt: skip

    base = jax.random.key(config.seed)
    t0 = time.time()

    def batch_rows(batch: list, first: int) -> list[dict]:
        # The key depends on the batch's first prompt, not on how far an earlier run got.
        rng = jax.random.fold_in(base, first)
        return process_batch(config, policy, reviser, judge, batch, rng)

    def progress(done: list[dict], finished: int, todo: int) -> None:
        elapsed = time.time() - t0
        eta = elapsed / finished * (todo - finished)
        s = summarize(done)
        print(
            f"prime_data {len(done)}/{len(records)}  kept {s['kept']} "
            f"({100 * s['keep_rate']:.0f}%)  draft {s['draft_reward_mean'] or 0:+.3f} -> "
            f"revision {s['revision_reward_mean'] or 0:+.3f}  {format_duration(elapsed)} "
            f"(ETA {format_duration(eta)})",
            flush=True,
        )

    done = stages.map_in_batches(
        records, batch_rows, rows_path, batch_size=config.prime.batch_size, label="prime_data",
        on_batch=progress,
    )  # fmt: skip
    summary = summarize(done)
    if jax.process_index() == 0:
        files.write_jsonl(
            os.path.join(workdir, SFT),
            ({"id": r["id"], "prompt": r["prompt"], "segments": r["segments"]}
             for r in done if r["kept"]),
        )  # fmt: skip
        files.write_json(os.path.join(workdir, SUMMARY), summary)
    print(json.dumps(summary, indent=1))
    print(f"-> {os.path.join(workdir, SFT)} ({summary['kept']} examples)")
