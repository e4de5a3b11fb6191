"""The `prime_data` loop: builds QA-LIGN's reflection-priming set, resumably.

For each prompt of the configured mix (`config.prime.sources`, chosen by a hash of the seed
and the ids, so a later stage can take a disjoint set with `data.split_by_hash`):

  1. the policy drafts an answer;
  2. the judge scores the draft on the rubric;
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

from qalign_jax import data, files, reflection, rewards, sampler, sharding, stages
from qalign_jax import judge as judge_lib
from qalign_jax.metrics import format_duration
from qalign_jax.models import load

KEEP_RULES = ("improved", "not_worse", "all")
ROWS, SFT, SUMMARY = "prime_data.jsonl", "prime_sft.jsonl", "summary.json"


def select_prompts(sources, seed: int) -> list[data.PromptRecord]:
    """The prompt mix: `count` prompts (or all, -1) of each (path, count) source."""
    if not sources:
        raise ValueError(
            "config.prime.sources is empty; give ((prompt-set JSONL, count), ...), e.g. "
            "(('configs/data/prime_prompts.jsonl', -1),)."
        )
    chosen, seen = [], {}
    for entry in sources:
        if len(entry) != 2 or not isinstance(entry[1], int):
            raise ValueError(f"config.prime.sources entry {entry!r}; use (path, count).")
        path, count = entry
        records = data.read_prompt_set(path)
        if count != -1 and not 0 < count <= len(records):
            raise ValueError(f"{path} has {len(records)} prompts; cannot take {count}.")
        part = records if count == -1 else data.split_by_hash(records, {"p": count}, seed)["p"]
        for r in part:
            if r.id in seen:
                raise ValueError(f"prompt id {r.id!r} is in both {seen[r.id]} and {path}.")
            seen[r.id] = path
        chosen += part
    return chosen


def _sampler_cfg(config, tokenizer, max_new_tokens: int, stop: tuple = ()):
    return sampler.SamplerConfig(
        max_new_tokens=max_new_tokens,
        temperature=config.prime.temperature,
        top_p=config.prime.top_p,
        stop_ids=tuple(tokenizer.stop_ids),
        stop_sequences=sampler.encode_stop_sequences(tokenizer, stop) if stop else (),
    )


def _text(tokenizer, ids, reason) -> str:
    return tokenizer.decode(ids[:-1] if reason == "eos" else ids)


def revise(config, reviser, contexts: list[list[int]], rng) -> list[str]:
    """Reflection then revision for each context (which ends in the forced <Think>).

    Returns what follows <Think>: the reflection, </Think>, and the revision.
    """
    tok = reviser.tokenizer
    k1, k2 = jax.random.split(rng)
    think_cfg = _sampler_cfg(
        config, tok, config.prime.think_max_tokens, stop=(reflection.THINK_CLOSE,)
    )
    out = sampler.generate(reviser, contexts, think_cfg, k1)
    thinks = []
    for ids, reason in zip(out.tokens, out.finish_reasons):
        text = _text(tok, ids, reason)
        if reason != "stop_sequence":  # ran out or ended its turn: close the reflection
            text = text.rstrip() + reflection.THINK_CLOSE
        thinks.append(text + "\n\n")
    rev_cfg = _sampler_cfg(config, tok, config.prime.revision_max_tokens)
    second = [c + tok.encode(t) for c, t in zip(contexts, thinks)]
    out = sampler.generate(reviser, second, rev_cfg, k2)
    return [t + _text(tok, ids, r) for t, ids, r in zip(thinks, out.tokens, out.finish_reasons)]


def keep_example(rule: str, r1: float, r2: float) -> bool:
    if rule == "improved":
        return r2 > r1
    if rule == "not_worse":
        return r2 >= r1
    return True


def process_batch(config, policy, reviser, judge, records, rng) -> list[dict]:
    """Draft, judge, findings, reflection + revision, judge again: one row per record."""
    tok = policy.tokenizer
    k_draft, k_rev = jax.random.split(rng)
    chats = [tok.apply_chat_template([{"role": "user", "content": r.prompt}]) for r in records]
    out = sampler.generate(
        policy, chats, _sampler_cfg(config, tok, config.prime.draft_max_tokens), k_draft
    )
    drafts = [_text(tok, ids, r).strip() for ids, r in zip(out.tokens, out.finish_reasons)]
    draft_v = judge_lib.score_pairs(judge, [(r.prompt, d) for r, d in zip(records, drafts)])
    blocks = [
        reflection.findings_block(judge.rubric, v, max_findings=config.prime.max_findings)
        for v in draft_v
    ]
    rtok = reviser.tokenizer
    contexts = [
        rtok.apply_chat_template([{"role": "user", "content": r.prompt}]) + rtok.encode(d + b)
        for r, d, b in zip(records, drafts, blocks)
    ]
    continuations = revise(config, reviser, contexts, k_rev)
    parsed = [reflection.parse_continuation(c) for c in continuations]
    rev_pairs = [(r.prompt, rev) for r, (_, rev, _) in zip(records, parsed)]
    ok = [i for i, (_, rev, err) in enumerate(parsed) if err is None and rev]
    rev_v = dict(zip(ok, judge_lib.score_pairs(judge, [rev_pairs[i] for i in ok])))
    rows = []
    for i, r in enumerate(records):
        think, revision, error = parsed[i]
        if not drafts[i] and error is None:
            error = "the draft is empty"
        r1 = draft_v[i].scores.reward
        row = {
            "id": r.id, "prompt": r.prompt, "category": r.category, "label": r.label,
            "draft": drafts[i], "draft_finish": out.finish_reasons[i],
            "draft_reward": r1, "draft_principles": draft_v[i].scores.principles,
            "draft_violated_gates": list(draft_v[i].scores.violated_gates),
            "findings": blocks[i], "think": think, "revision": revision, "error": error,
        }  # fmt: skip
        if i in rev_v and error is None:
            r2 = rev_v[i].scores.reward
            row.update(
                revision_reward=r2,
                revision_principles=rev_v[i].scores.principles,
                revision_violated_gates=list(rev_v[i].scores.violated_gates),
                two_pass_reward=rewards.two_pass_reward(
                    r1, r2, judge.reward_cfg.alpha, judge.reward_cfg.beta
                ),
                kept=keep_example(config.prime.keep, r1, r2),
                segments=reflection.segments(drafts[i], blocks[i], think, revision),
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
    records = select_prompts(config.prime.sources, config.seed)
    rows_path = os.path.join(workdir, ROWS)
    mesh = sharding.make_mesh(config.mesh.shape)
    policy = load.from_config(config, mesh)
    if policy.tokenizer is None:
        raise ValueError("the policy has no tokenizer; set config.model.tokenizer.")
    reviser = policy
    if config.prime.reviser:
        reviser = load.load_model(
            config.prime.reviser, mesh=mesh, rules=config.sharding.rules,
            param_dtype=config.model.param_dtype, dtype=config.model.dtype, seed=config.seed,
            tokenizer_source=config.prime.reviser_tokenizer or None,
        )  # fmt: skip
    judge = judge_lib.from_config(config, policy)

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
