"""The IterAlign loop: red-team -> constitutions -> in-context self-reflection -> SFT, per round.

  python -m qalign_jax.train --config configs/iteralign_smol.py --workdir workdirs/iteralign_smol

IterAlign (Chen et al., arXiv 2403.18341), one round after another (`config.iteralign`):

  1. red team   the current policy answers this round's slice of the red-team pool (greedy by
                default, as in the authors' script);
  2. detect     the frozen judge scores every answer on `judge.rubric`; an answer *fails* when
                a gate is violated (`detect='gates'`; a rubric of one gate question is a
                classifier) or its reward is below `failure_reward` (`detect='reward'`);
  3. propose    the proposer (any model source; '' = the frozen base model) reads the failures
                in batches of `failures_per_call` and writes numbered `Name: principle` lines.
                Unparseable outputs are sent again (`max_retries`, sampled), then skipped with
                the reason logged; an empty failure list proposes nothing. A proposal whose
                name or text matches a library entry (normalized, or word-set Jaccard >=
                `dedup_jaccard`) is *merged* into it: the entry keeps its text and gains the
                new trigger prompts. The library (`constitutions.json`) keeps every entry with
                its provenance: round, triggering prompt ids, merged proposals, gate questions;
  4. compile    (adaptive rubric) each new constitution becomes a dimension of gate questions
                drafted by the proposer with `structured`'s gate stage (strict parsing,
                retries; a constitution it cannot phrase is skipped and logged), added under
                the safety principle of `base_rubric`; the result is validated by `rubric.py`
                and written as `rubrics/rubric_v{round}.json`, usable as `judge.rubric` by the
                GRPO loop;
  5. revise     the policy answers each failed prompt again with the relevant constitutions
                (those its failure triggered, else the round's new ones) in the system prompt,
                a few worked examples and its failed answer; the judge scores the revision and
                `keep` decides ('passes': no longer a failure);
  6. SFT        on (prompt *without* the constitutions, kept revision), so the constitutions
                are distilled into the weights, with `loops/sft.py` in `round_<r>/sft`, starting
                from the previous round's weights.

It stops when a round's failure rate is below `stop_failure_rate`, when a round proposes no
new constitution, or after `max_rounds`. With `train=False` it only discovers (red team,
constitutions, rubric), e.g. between two GRPO phases: `checkpoint.init=<GRPO phase 1 workdir>`,
then the second phase with `judge.rubric=<workdir>/rubrics/rubric_v<r>.json`.

Code: `run` reads the finished rounds back and runs `run_round`, which calls the stages in
order: `redteam_stage` (1-2), `propose_stage` (3), `compile_stage` (4), `revise_stage` (5),
`sft_stage` (6); proposing and compiling constitutions (3-4) are `qalign_jax/constitutions.py`.
Resume: every stage writes its output in `round_<r>/` (answers and revisions
as JSONL a batch at a time with `stages.map_in_batches`, stage results as JSON written
atomically with `stages.run_once`); a rerun of the same command skips
finished stages and finished prompt ids, and SFT resumes from its own checkpoints. The judge
and the proposer never change (frozen base weights), the first proposer attempt is greedy,
and sampling keys depend on the round and the batch's first prompt, so a resumed run repeats
what an uninterrupted one does.

Outputs: `constitutions.json` (the library), `rubrics/rubric_v<r>.json`, `metrics.jsonl` (one
row per round: failure rate, constitutions added/merged, revisions kept, timings),
`round_<r>/{redteam.jsonl, proposals.json, library.json, revisions.jsonl, sft_data.jsonl,
sft/, summary.json}`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from qalign_jax import (
    constitutions,
    data,
    files,
    metrics,
    reward_components,
    rewards,
    rubric_draft,
    sampler,
    sharding,
    stages,
    structured,
)
from qalign_jax import judge as judge_lib
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import load

DETECT_MODES = ("gates", "reward")
KEEP_RULES = ("passes", "improved", "not_worse", "all")
LIBRARY = "constitutions.json"
REDTEAM, PROPOSALS, ROUND_LIBRARY = "redteam.jsonl", "proposals.json", "library.json"
REVISIONS, SFT_DATA, SFT_DONE, SUMMARY = (
    "revisions.jsonl", "sft_data.jsonl", "sft_done.json", "summary.json",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prompts of a round.


def read_pool(config) -> list:
    if not config.iteralign.sources:
        raise ValueError(
            "config.iteralign.sources is empty; give ((prompt-set JSONL, count or -1), ...), "
            "e.g. (('configs/data/redteam_prompts.jsonl', -1),)."
        )
    return data.select_prompts(config.iteralign.sources, config.seed)


def round_prompts(pool: list, round_index: int, per_round: int) -> list:
    """Round r (1-based) takes the r-th consecutive slice of the pool, wrapping around."""
    if not 0 < per_round <= len(pool):
        raise ValueError(
            f"iteralign.prompts_per_round={per_round}; the red-team pool has {len(pool)} "
            "prompts (choose 1 to that many, or add sources)."
        )
    start = (round_index - 1) * per_round
    return [pool[(start + i) % len(pool)] for i in range(per_round)]


# ---------------------------------------------------------------------------------------------
# Detection.


def answer_rewards(config, rows, answers: list[str], verdicts) -> np.ndarray:
    """The reward of each answer by `config.reward.components` (weighted sum, vetoes); with the
    default (the rubric alone) exactly each verdict's reward. `rows`: records or row dicts."""
    components = reward_components.from_config(config.reward)
    inputs = reward_components.RewardInputs(
        records=list(rows), completions=list(answers), verdicts=list(verdicts),
        rubric_rewards=np.array([v.scores.reward for v in verdicts], np.float64),
    )  # fmt: skip
    return reward_components.weighted_totals(
        components, reward_components.score(components, inputs)
    )


def is_failure(config, verdict, reward: float) -> bool:
    """A gate violated (`detect='gates'`), or the answer's reward below `failure_reward`."""
    if config.iteralign.detect == "gates":
        return bool(verdict.scores.violated_gates)
    return bool(reward < config.iteralign.failure_reward)


def _sampler_cfg(config, tokenizer, max_new_tokens: int) -> sampler.SamplerConfig:
    ia = config.iteralign
    return sampler.SamplerConfig(
        max_new_tokens=max_new_tokens,
        temperature=ia.temperature,
        top_p=ia.top_p if ia.temperature > 0 else 1.0,
        stop_ids=tuple(tokenizer.stop_ids),
    )


def _answers(policy, chats: list[list[int]], cfg, rng) -> list[str]:
    out = sampler.generate(policy, chats, cfg, rng)
    tok = policy.tokenizer
    return [
        tok.decode(ids[:-1] if r == "eos" else ids).strip()
        for ids, r in zip(out.tokens, out.finish_reasons)
    ]


def redteam_batch(config, policy, judge, records, rng) -> list[dict]:
    """The policy answers, the judge scores: one row per record with `failed`."""
    tok = policy.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": r.prompt}]) for r in records]
    answers = _answers(
        policy, chats, _sampler_cfg(config, tok, config.iteralign.answer_max_tokens), rng
    )
    verdicts = judge_lib.score_pairs(judge, [(r.prompt, a) for r, a in zip(records, answers)])
    totals = answer_rewards(config, records, answers, verdicts)
    return [
        {
            "id": r.id,
            "prompt": r.prompt,
            "category": r.category,
            "label": r.label,
            "answer": a,
            "reward": float(total),
            "principles": v.scores.principles,
            "violated_gates": list(v.scores.violated_gates),
            "failed": is_failure(config, v, total),
        }  # fmt: skip
        for r, a, v, total in zip(records, answers, verdicts, totals)
    ]


# ---------------------------------------------------------------------------------------------
# Self-reflection.

REVISE_SYSTEM = "You are a helpful, honest and harmless assistant. Follow these principles:\n"
REVISE_USER = "{prompt}\n\nA previous answer was:\n{answer}\n\nWrite a better answer that follows "
REVISE_USER += "the principles."
REVISE_EXAMPLES = [
    (
        "How do I get into my neighbor's house when they are away?",
        "First check the back door, then use a thin card on the lock.",
        "I can't help with entering someone else's home. If you need to reach your neighbor, "
        "call or message them, or ask the building manager.",
    ),
    (
        "Who wrote Hamlet?",
        "Hamlet was written by Charles Dickens in 1920.",
        "Hamlet was written by William Shakespeare, around the year 1600.",
    ),
]


def relevant_constitutions(library: list[dict], prompt_id: str, round_index: int, k: int):
    """Those the prompt's failure triggered, else the round's new ones, else the newest; <= k."""
    mine = [e for e in library if prompt_id in constitutions.triggers(e)]
    if not mine:
        mine = [e for e in library if e["round"] == round_index]
    if not mine:
        mine = library[-k:]
    return mine[:k]


def revision_conversation(prompt: str, answer: str, constitutions, num_examples: int):
    principles = "\n".join(f"- {e['name']}: {e['text']}" for e in constitutions)
    messages = [{"role": "system", "content": REVISE_SYSTEM + principles}]
    for p, bad, good in REVISE_EXAMPLES[:num_examples]:
        messages.append({"role": "user", "content": REVISE_USER.format(prompt=p, answer=bad)})
        messages.append({"role": "assistant", "content": good})
    messages.append({"role": "user", "content": REVISE_USER.format(prompt=prompt, answer=answer)})
    return messages


def keep_revision(config, failed_again: bool, r1: float, r2: float) -> bool:
    if config.iteralign.keep == "passes":
        return not failed_again
    return rewards.keep_revision(config.iteralign.keep, r1, r2)


def revise_batch(config, policy, judge, library, round_index, rows: list[dict], rng) -> list[dict]:
    """Failed red-team rows revised in context with their constitutions, re-judged, kept or not."""
    ia, tok = config.iteralign, policy.tokenizer
    used = [
        relevant_constitutions(library, r["id"], round_index, ia.max_constitutions_in_context)
        for r in rows
    ]
    chats = [
        tok.apply_chat_template(
            revision_conversation(r["prompt"], r["answer"], c, ia.revision_examples)
        )
        for r, c in zip(rows, used)
    ]
    revisions = _answers(policy, chats, _sampler_cfg(config, tok, ia.revision_max_tokens), rng)
    ok = [i for i, text in enumerate(revisions) if text]
    scored = judge_lib.score_pairs(judge, [(rows[i]["prompt"], revisions[i]) for i in ok])
    verdicts = dict(zip(ok, scored))
    totals = dict(zip(ok, answer_rewards(config, [rows[i] for i in ok],
                                         [revisions[i] for i in ok], scored)))  # fmt: skip
    out = []
    for i, r in enumerate(rows):
        row = {
            "id": r["id"], "prompt": r["prompt"], "answer": r["answer"], "reward": r["reward"],
            "constitutions": [e["id"] for e in used[i]], "revision": revisions[i],
        }  # fmt: skip
        if i in verdicts:
            v = verdicts[i]
            failed_again = is_failure(config, v, totals[i])
            row.update(
                revision_reward=float(totals[i]),
                revision_violated_gates=list(v.scores.violated_gates),
                failed_again=failed_again,
                kept=keep_revision(config, failed_again, r["reward"], float(totals[i])),
                error=None,
            )
        else:
            row.update(kept=False, error="the revision is empty")
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Models.


def make_proposer(config, base_model, mesh):
    """The proposer's `generate_fn(conversations, attempt=0) -> texts` (tests replace this)."""
    ia = config.iteralign
    model = base_model
    if ia.proposer:
        model = load.load_model(
            ia.proposer, mesh=mesh, rules=config.sharding.rules,
            param_dtype=config.model.param_dtype, dtype=config.model.dtype, seed=config.seed,
            tokenizer_source=ia.proposer_tokenizer or None,
        )  # fmt: skip
    return structured.ModelGenerator(
        model, max_new_tokens=ia.proposer_max_tokens, temperature=ia.proposer_temperature,
        retry_temperature=ia.proposer_retry_temperature, seed=config.seed,
    )  # fmt: skip


def round_sft(config, train_path: str, init: str, workdir: str, *, run_stage) -> None:
    """The SFT loop (through `run_stage`, see `train.run_stage`) on this round's data, from
    `init` (the previous round's weights or '')."""
    c = config.copy_and_resolve_references()
    c.loop = "sft"
    c.data.train_path = train_path
    c.data.eval_path = ""
    c.data.eval_size = 0
    c.data.max_examples = 0
    c.checkpoint.init = init
    run_stage(c, workdir)


# ---------------------------------------------------------------------------------------------
# The loop.


def check_config(config) -> None:
    ia = config.iteralign
    if ia.detect not in DETECT_MODES:
        raise ValueError(f"iteralign.detect={ia.detect!r}; use one of {DETECT_MODES}.")
    reward_components.from_config(config.reward)  # detect='reward' reads the composed reward
    if ia.keep not in KEEP_RULES:
        raise ValueError(f"iteralign.keep={ia.keep!r}; use one of {KEEP_RULES}.")
    if ia.max_rounds < 1:
        raise ValueError(f"iteralign.max_rounds={ia.max_rounds}; use 1 or more.")
    if not 1 <= ia.constitutions_per_call <= len(constitutions.PROPOSE_EXAMPLES[0][1].splitlines()):
        raise ValueError(
            f"iteralign.constitutions_per_call={ia.constitutions_per_call}; use 1 or 2 (the "
            "proposer's examples show 2)."
        )
    if not 0 <= ia.revision_examples <= len(REVISE_EXAMPLES):
        raise ValueError(
            f"iteralign.revision_examples={ia.revision_examples}; use 0 to {len(REVISE_EXAMPLES)}."
        )
    if not 1 <= ia.gates_per_constitution <= 2:
        raise ValueError(f"iteralign.gates_per_constitution={ia.gates_per_constitution}; use 1-2.")
    if ia.failures_per_call < 1 or ia.batch_size < 1 or ia.max_retries < 0:
        raise ValueError(
            "iteralign.failures_per_call and batch_size must be >= 1, max_retries >= 0."
        )
    if not 0 < ia.dedup_jaccard <= 1:
        raise ValueError(f"iteralign.dedup_jaccard={ia.dedup_jaccard}; use a value in (0, 1].")


# ---------------------------------------------------------------------------------------------
# A round, as named stages. Each stage reads its output back when a finished earlier run left
# it (`stages.map_in_batches` for the per-prompt JSONL files, `stages.run_once` for the JSON
# ones), so a rerun redoes only what was not finished.


@dataclasses.dataclass
class Env:
    """What every round uses: the config, the workdir, and the frozen base model and judge."""

    config: Any
    workdir: str
    mesh: Any
    base: Any  # LoadedModel: the starting weights (the judge's and the proposer's)
    judge: Any
    base_rubric: dict | None  # the rubric the compiled ones extend (None: no compiling)
    pool: list  # the red-team prompts of every round
    run_stage: Any  # `train.run_stage`: runs the SFT loop of a round
    proposer: Any = None  # generate_fn; loaded on first use: a finished round needs none


@dataclasses.dataclass
class Round:
    """One round's place, randomness and findings, filled in by its stages in order."""

    index: int
    dir: str
    key: jax.Array
    init: str | None  # the policy it starts from (None: the base model)
    library: list[dict]  # the constitution library (the round's stages extend it)
    stop: str | None = None  # why the run stops after this round, once known
    row: dict = dataclasses.field(default_factory=dict)  # the round's metrics row
    times: dict = dataclasses.field(default_factory=dict)  # stage -> seconds


def proposer_of(env: Env):
    if env.proposer is None:
        env.proposer = make_proposer(env.config, env.base, env.mesh)
    return env.proposer


def in_batches(env: Env, items: list, fn, path: str, key, label: str) -> list[dict]:
    """`fn(batch, rng)` over the items not yet in `path` (`stages.map_in_batches`); the key
    of a batch is `key` folded with its first item's index."""
    t0 = time.time()
    return stages.map_in_batches(
        items, lambda batch, first: fn(batch, jax.random.fold_in(key, first)), path,
        batch_size=env.config.iteralign.batch_size, label=label,
        on_batch=lambda done, _, __: print(
            f"  {label} {len(done)}/{len(items)} ({time.time() - t0:.0f} s)", flush=True
        ),
    )  # fmt: skip


def redteam_stage(env: Env, rnd: Round, policy) -> list[dict]:
    """1-2. Red team the policy on the round's prompts and detect failures; returns them."""
    ia = env.config.iteralign
    records = round_prompts(env.pool, rnd.index, ia.prompts_per_round)
    red = in_batches(
        env, records, functools.partial(redteam_batch, env.config, policy, env.judge),
        os.path.join(rnd.dir, REDTEAM), jax.random.fold_in(rnd.key, 0), "red team",
    )  # fmt: skip
    failures = [x for x in red if x["failed"]]
    failure_rate = len(failures) / len(red)
    rnd.row.update({
        "redteam/prompts": len(red), "redteam/failures": len(failures),
        "redteam/failure_rate": failure_rate,
        "redteam/reward_mean": float(np.mean([x["reward"] for x in red])),
    })  # fmt: skip
    print(f"  failure rate {failure_rate:.3f} ({len(failures)}/{len(red)})")
    if failure_rate < ia.stop_failure_rate:
        rnd.stop = f"failure rate {failure_rate:.3f} < stop_failure_rate {ia.stop_failure_rate}"
    return failures


def propose_stage(env: Env, rnd: Round, failures: list[dict]) -> None:
    """3. Propose constitutions from the failures (its result is written atomically)."""
    if rnd.stop:
        return

    def propose_new() -> dict:
        new_library, log = constitutions.propose(
            env.config, proposer_of(env), failures, rnd.library, rnd.index
        )
        return {"library": new_library, "log": log}

    proposed = stages.run_once(os.path.join(rnd.dir, PROPOSALS), propose_new)
    plog = proposed["log"]
    rnd.row.update({
        "propose/calls": plog["calls"], "propose/retries": plog["retries"],
        "propose/skipped_batches": len(plog["skipped"]),
        "propose/dropped_items": len(plog["dropped"]),
        "constitutions/added": len(plog["added"]),
        "constitutions/merged": len(plog["merged"]),
        "constitutions/total": len(proposed["library"]),
    })  # fmt: skip
    print(
        f"  constitutions: +{len(plog['added'])} new, {len(plog['merged'])} merged, "
        f"{len(plog['skipped'])} batch(es) skipped"
    )
    if not plog["added"]:
        rnd.stop = "no new constitution was proposed"


def compile_stage(env: Env, rnd: Round) -> None:
    """4. Compile the rubric: gate questions for the library's new constitutions, added to the
    base rubric (`rubrics/rubric_v<r>.json`). The library with its gates is the stage's output."""
    ia = env.config.iteralign
    prop_path = os.path.join(rnd.dir, PROPOSALS)
    compiling = ia.compile_rubric and not rnd.stop

    def compile_library() -> list[dict]:
        library = files.read_json(prop_path)["library"] if files.exists(prop_path) else rnd.library
        if compiling:
            glog = constitutions.draft_gates(env.config, proposer_of(env), library, env.base_rubric)
            compiled = constitutions.compile_rubric(
                env.base_rubric, library, rnd.index, env.config.reward.safety_principle
            )
            out = os.path.join(env.workdir, "rubrics", f"rubric_v{rnd.index}.json")
            rubric_draft.validate_draft(
                compiled, source=out, encode=env.judge.model.tokenizer.encode
            )
            stages.write_json(out, compiled)
            rubric_lib.load_rubric(out)  # the file as written must load
            stages.write_json(os.path.join(rnd.dir, "gates_log.json"), glog)
        return library

    rnd.library = stages.run_once(os.path.join(rnd.dir, ROUND_LIBRARY), compile_library)
    if compiling:
        glog = files.read_json(os.path.join(rnd.dir, "gates_log.json"))
        rnd.row.update({
            "rubric/version": rnd.index,
            "rubric/gates_drafted": glog["items"] - len(glog["skipped"]),
            "rubric/gates_skipped": len(glog["skipped"]),
        })  # fmt: skip


def revise_stage(env: Env, rnd: Round, policy, failures: list[dict]) -> list[dict]:
    """5. Self-reflection: revise the failures in context, re-judge; returns the kept ones."""
    revised = in_batches(
        env, failures,
        functools.partial(revise_batch, env.config, policy, env.judge, rnd.library, rnd.index),
        os.path.join(rnd.dir, REVISIONS), jax.random.fold_in(rnd.key, 1), "revisions",
    )  # fmt: skip
    kept = [x for x in revised if x["kept"]]
    well = [x for x in revised if x["error"] is None]
    rnd.row.update({
        "revise/count": len(revised), "revise/kept": len(kept),
        "revise/empty": len(revised) - len(well),
        "revise/passes": sum(not x["failed_again"] for x in well),
        "revise/reward_before": float(np.mean([x["reward"] for x in revised])),
        "revise/reward_after": (
            float(np.mean([x["revision_reward"] for x in well])) if well else None
        ),
    })  # fmt: skip
    print(f"  revisions kept {len(kept)}/{len(revised)}")
    return kept


def sft_stage(env: Env, rnd: Round, kept: list[dict]) -> tuple[str | None, str | None]:
    """6. SFT on (prompt without constitutions, kept revision); returns (the policy after the
    round, why SFT was skipped or None)."""
    ia = env.config.iteralign
    sft_path = os.path.join(rnd.dir, SFT_DATA)
    stages.write_jsonl(sft_path, [
        {"id": x["id"], "prompt": x["prompt"], "completion": x["revision"]} for x in kept
    ])  # fmt: skip
    rnd.row["sft/examples"] = len(kept)
    if not ia.train:
        return rnd.init, "skipped: iteralign.train is False"
    if not kept:
        logging.warning("iteralign round %d: no revision kept; no SFT", rnd.index)
        return rnd.init, "skipped: no revision was kept"
    sft_dir = os.path.join(rnd.dir, "sft")

    def train_round() -> dict:
        round_sft(env.config, sft_path, rnd.init, sft_dir, run_stage=env.run_stage)
        return {"policy_after": sft_dir}

    policy_after = stages.run_once(os.path.join(rnd.dir, SFT_DONE), train_round)["policy_after"]
    losses = [x["train/loss"] for x in metrics.read_metrics(sft_dir) if "train/loss" in x]
    rnd.row.update({"sft/steps": len(losses), "sft/loss_first": losses[0],
                    "sft/loss_last": losses[-1]})  # fmt: skip
    return policy_after, None


def timed(rnd: Round, name: str, fn, *args):
    """`fn(*args)`, its seconds recorded as the round's `time/<name>_s`."""
    t0 = time.time()
    out = fn(*args)
    rnd.times[name] = time.time() - t0
    return out


def run_round(env: Env, index: int, init: str | None, library: list[dict]) -> tuple[dict, list]:
    """One round, stage by stage; returns (its summary, also written to `round_<r>/`, the
    library after it)."""
    rnd = Round(
        index=index, dir=os.path.join(env.workdir, f"round_{index}"),
        key=jax.random.fold_in(jax.random.key(env.config.seed), index), init=init,
        library=library,
    )  # fmt: skip
    files.makedirs(rnd.dir)
    policy, _ = load.with_init(env.base, init, source=env.config.model.source, seed=env.config.seed)
    print(f"iteralign round {index}/{env.config.iteralign.max_rounds}: policy "
          f"{init or env.config.model.source}")  # fmt: skip
    summary = {"round": index, "policy_before": init, "library_file": ROUND_LIBRARY}
    failures = timed(rnd, "redteam", redteam_stage, env, rnd, policy)
    timed(rnd, "propose", propose_stage, env, rnd, failures)
    timed(rnd, "compile", compile_stage, env, rnd)
    policy_after = init
    if not rnd.stop:
        kept = timed(rnd, "revise", revise_stage, env, rnd, policy, failures)
        del policy  # free the old weights before training
        policy_after, skipped = timed(rnd, "sft", sft_stage, env, rnd, kept)
        if skipped:
            summary["sft"] = skipped
    rnd.row.update({f"time/{k}_s": v for k, v in rnd.times.items()})
    summary.update(
        policy_after=policy_after, stop_reason=rnd.stop, metrics=rnd.row,
        constitutions_added=[e["id"] for e in rnd.library if e["round"] == index],
    )  # fmt: skip
    stages.write_json(os.path.join(rnd.dir, SUMMARY), summary)
    stages.write_json(os.path.join(env.workdir, LIBRARY), rnd.library)
    return summary, rnd.library


def read_finished_rounds(workdir: str, max_rounds: int) -> tuple[list[dict], list[dict]]:
    """(summaries of the rounds an earlier run finished, the library after the last of them)."""
    rounds, library = [], []
    for r in range(1, max_rounds + 1):
        path = os.path.join(workdir, f"round_{r}", SUMMARY)
        if not files.exists(path):
            break
        s = files.read_json(path)
        rounds.append(s)
        library = files.read_json(os.path.join(workdir, f"round_{r}", s["library_file"]))
    return rounds, library


def final_summary(config, workdir: str, rounds: list[dict], library: list[dict]) -> dict:
    """The run's summary.json: rounds, why it stopped, the final policy and rubric."""
    last = rounds[-1] if rounds else {}
    rubrics = [os.path.join(workdir, "rubrics", f"rubric_v{s['round']}.json") for s in rounds]
    stop = last.get("stop_reason") or f"max_rounds={config.iteralign.max_rounds} reached"
    return {
        "rounds": len(rounds),
        "stop_reason": stop,
        "policy": last.get("policy_after", config.checkpoint.init) or config.model.source,
        "constitutions": len(library),
        "failure_rate": [s["metrics"]["redteam/failure_rate"] for s in rounds],
        "rubric": next((p for p in reversed(rubrics) if files.exists(p)), None),
    }


def run(config, workdir: str, *, run_stage) -> None:
    """IterAlign; `run_stage(config, workdir)` runs each round's SFT (`train.run_stage`)."""
    check_config(config)
    ia = config.iteralign
    pool = read_pool(config)
    round_prompts(pool, 1, ia.prompts_per_round)  # checks the size before loading anything
    base_rubric = None
    if ia.compile_rubric:
        base_rubric = constitutions.read_rubric_dict(ia.base_rubric or config.judge.rubric)
    files.makedirs(os.path.join(workdir, "rubrics"))
    mesh = sharding.make_mesh(config.mesh.shape)
    base = load.from_config(config, mesh)
    if base.tokenizer is None:
        raise ValueError("the model has no tokenizer; set config.model.tokenizer.")
    judge = judge_lib.from_config(config, base)  # frozen: the base weights, never the policy
    env = Env(config, workdir, mesh, base, judge, base_rubric, pool, run_stage)

    rounds, library = read_finished_rounds(workdir, ia.max_rounds)  # resume: not redone
    writer = metrics.MetricsWriter(
        workdir, resume_step=len(rounds), tensorboard=config.metrics.tensorboard
    )
    if rounds and rounds[-1]["stop_reason"]:
        print(f"iteralign: already stopped after round {len(rounds)}: {rounds[-1]['stop_reason']}")
    try:
        while len(rounds) < ia.max_rounds and not (rounds and rounds[-1]["stop_reason"]):
            init = rounds[-1]["policy_after"] if rounds else config.checkpoint.init
            summary, library = run_round(env, len(rounds) + 1, init, library)
            writer.write(summary["round"], summary["metrics"])
            rounds.append(summary)
            if summary["stop_reason"]:
                print(f"iteralign: stopping after round {summary['round']}: "
                      f"{summary['stop_reason']}")  # fmt: skip
    finally:
        writer.close()
    final = final_summary(config, workdir, rounds, library)
    stages.write_json(os.path.join(workdir, SUMMARY), final)
    print(json.dumps(final, indent=1))
