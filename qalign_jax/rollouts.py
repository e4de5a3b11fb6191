"""QA-LIGN's rollout, two-pass or single-pass, as one function with one typed result.

  draft      the policy answers the chat prompt (`sampler.generate`, with per-token logprobs);
  judge      the judge scores the draft on the rubric (R1);
  findings   the verdict in plain sentences (`reflection.findings_block`, ending in a forced
             <Think>) replaces the draft's end-of-turn;
  revision   the policy continues from the draft's KV cache (`sampler.continue_generation`)
             with its reflection, </Think> and the revised answer; the judge scores it (R2).

Single pass stops after the draft (judged when a judge is given); the draft keeps its
end-of-turn, since it is the whole answer. `rollout` serves every caller through
`RolloutConfig`: GRPO (sampled, trained on), DPO pairs (single pass), evaluation (greedy,
drafts judged only for their findings), priming data (a `reviser` model writes pass 2) and the
pipeline's before/after evaluation.

Invariants:
  - Continuing from the cache, row i's policy saw exactly
    `prompt_ids + draft_ids + suffix_ids + cont_ids`, and `draft_logp` / `cont_logp` are the
    sampler's log-probabilities of `draft_ids` / `cont_ids` in that context, so
    `sequence_ids`, `trained_mask` and `sampler_logp` are the trainer's rows as they are.
  - With a `reviser`, pass 2 is written from text (the reviser's own chat template of the
    prompt, then the draft and findings re-encoded), so another model or tokenizer can write
    it: its reflection stops at </Think> (closed for it after `think_max_tokens`), then the
    revision is sampled. Pass 2 is text only then: `suffix_ids` and `cont_ids` are empty.
  - A continuation that does not parse (`reflection.parse_continuation`) has an `errors` entry,
    is not judged, and counts as R2 = R1 minus `malformed_penalty` in `rewards`.
  - Cache and training-row sizes come from `rollout_lengths` only (also used by the memory
    planner and the AOT compiler).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import numpy as np

from qalign_jax import judge as judge_lib
from qalign_jax import reflection, sampler
from qalign_jax import rewards as rewards_lib


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """What one rollout call does; see `from_grpo_config` for the GRPO loop's."""

    two_pass: bool = True
    draft_max_tokens: int = 128
    revision_max_tokens: int = 192  # pass 2: reflection + </Think> + revision
    think_max_tokens: int = 96  # reviser only: the reflection, then </Think> is forced
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_findings: int = 6  # findings sentences shown after the draft
    judge_revisions: bool = True  # two-pass with a judge: also score the revisions (R2)
    malformed_penalty: float = 0.0  # subtracted from the reward of a malformed revision
    batch_buckets: tuple[int, ...] = ()  # sampler batch buckets; () = the sampler's default
    cache_len: int = 0  # KV cache slots; 0 = `rollout_lengths` of this call's prompts


def from_grpo_config(g, **overrides) -> RolloutConfig:
    """The GRPO loop's rollouts (`config.grpo`): every sampler batch has B x G rows."""
    opts = RolloutConfig(
        two_pass=bool(g.two_pass), draft_max_tokens=g.draft_max_tokens,
        revision_max_tokens=g.revision_max_tokens, temperature=g.temperature, top_p=g.top_p,
        max_findings=g.max_findings, malformed_penalty=g.malformed_penalty,
        batch_buckets=(g.prompts_per_step * g.num_generations,),
    )  # fmt: skip
    return dataclasses.replace(opts, **overrides)


# ---------------------------------------------------------------------------------------------
# Lengths.


class RolloutLengths(NamedTuple):
    prompt_width: int  # the prompt bucket the sampler left-pads to
    findings_tokens: int  # the findings block's bound (as given); 0 single-pass
    findings_width: int  # its bucket (pass 2's prefill); 0 single-pass
    cache_len: int  # KV cache slots for both passes
    seq_len: int  # a training row (prompt, draft, findings, continuation), a multiple of 64


def rollout_lengths(
    longest_prompt: int, *, draft_max_tokens: int, revision_max_tokens: int = 0,
    findings_tokens: int = 0, two_pass: bool = True,
) -> RolloutLengths:  # fmt: skip
    """Cache and training-row lengths of rollouts whose longest prompt has `longest_prompt` tokens.

    cache_len = bucket(prompt) + draft_max_tokens [+ bucket(findings) + revision_max_tokens];
    seq_len = prompt + draft_max_tokens [+ findings + revision_max_tokens], rounded up to 64.
    The bracketed terms are two-pass only. Buckets are `SamplerConfig.prompt_buckets`.

    Args:
      longest_prompt: tokens of the longest chat prompt.
      findings_tokens: an upper bound on a findings block
        (`reflection.findings_block_max_tokens`).
    """
    buckets = sampler.SamplerConfig.prompt_buckets
    prompt_width = sampler.bucket(longest_prompt, buckets)
    findings_tokens = findings_tokens if two_pass else 0
    findings_width = sampler.bucket(findings_tokens, buckets) if two_pass else 0
    second = findings_width + revision_max_tokens if two_pass else 0
    cache_len = prompt_width + draft_max_tokens + second
    tokens = longest_prompt + draft_max_tokens
    tokens += findings_tokens + revision_max_tokens if two_pass else 0
    seq_len = -(-tokens // 64) * 64
    return RolloutLengths(prompt_width, findings_tokens, findings_width, cache_len, seq_len)


def measure_lengths(opts: RolloutConfig, tokenizer, rubric, prompt_ids) -> RolloutLengths:
    """`rollout_lengths` of these prompts and the rubric's longest findings block."""
    findings = 0
    if opts.two_pass:
        findings = reflection.findings_block_max_tokens(rubric, tokenizer.encode, opts.max_findings)
    return rollout_lengths(
        max(len(ids) for ids in prompt_ids), draft_max_tokens=opts.draft_max_tokens,
        revision_max_tokens=opts.revision_max_tokens, findings_tokens=findings,
        two_pass=opts.two_pass,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The rollout.


@dataclasses.dataclass
class Rollouts:
    """One call's rollouts, row i for records[i]; pass-2 fields are empty/None single-pass."""

    records: list
    prompt_ids: list[list[int]]
    draft_ids: list[list[int]]  # the policy's draft (no end-of-turn in two-pass mode)
    draft_logp: list[np.ndarray]  # [len(draft_ids[i])] sampler log-probabilities
    draft_finish: list[str]  # the sampler's finish reason: 'eos' | 'stop_sequence' | 'length'
    suffix_ids: list[list[int]]  # the inserted findings block (ends in <Think>); not trained
    cont_ids: list[list[int]]  # pass 2: reflection, </Think>, revision, end of turn
    cont_logp: list[np.ndarray]
    cont_finish: list[str | None]  # pass 2's finish reason (a reviser's: its revision's)
    drafts: list[str]  # decoded, stripped
    findings: list[str | None]  # the findings block text
    thinks: list[str | None]  # the parsed reflection
    revisions: list[str | None]  # the parsed revision ('' if none); check `errors`
    errors: list[str | None]  # why the continuation is malformed; None when well formed
    draft_verdicts: list | None  # None without a judge
    revision_verdicts: list  # None where malformed, not judged or single-pass
    rewards: np.ndarray | None  # float64 [rows]: R1 single-pass, else the two-pass reward
    # (with the malformed penalty); None when a pass was not judged
    sequence_ids: list[list[int]]  # prompt + draft + suffix + continuation
    trained_mask: list[np.ndarray]  # bool over sequence_ids: the policy's own tokens
    sampler_logp: list[np.ndarray]  # float32 over sequence_ids; 0 where not trained
    new_tokens: int  # tokens the sampler generated, both passes
    timings: dict  # seconds: 'sampling', 'judging'


def _sampler_config(opts: RolloutConfig, tok, max_new_tokens: int, **kw) -> sampler.SamplerConfig:
    buckets = {"batch_buckets": opts.batch_buckets} if opts.batch_buckets else {}
    return sampler.SamplerConfig(
        max_new_tokens=max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
        stop_ids=tuple(tok.stop_ids), **buckets, **kw,
    )  # fmt: skip


def _text(tok, ids, reason) -> str:
    return tok.decode(ids[:-1] if reason == "eos" else ids)


def revise_from_text(reviser, contexts: list[list[int]], opts: RolloutConfig, rng):
    """A reviser's pass 2 from token contexts that end in the forced <Think>.

    Returns (what follows <Think>: reflection, </Think>, revision; the revisions' finish
    reasons; tokens generated)."""
    tok = reviser.tokenizer
    k1, k2 = jax.random.split(rng)
    stop = sampler.encode_stop_sequences(tok, (reflection.THINK_CLOSE,))
    think_cfg = _sampler_config(opts, tok, opts.think_max_tokens, stop_sequences=stop)
    out = sampler.generate(reviser, contexts, think_cfg, k1)
    thinks = []
    for ids, reason in zip(out.tokens, out.finish_reasons):
        text = _text(tok, ids, reason)
        if reason != "stop_sequence":  # ran out or ended its turn: close the reflection
            text = text.rstrip() + reflection.THINK_CLOSE
        thinks.append(text + "\n\n")
    second = [c + tok.encode(t) for c, t in zip(contexts, thinks)]
    rev = sampler.generate(
        reviser, second, _sampler_config(opts, tok, opts.revision_max_tokens), k2
    )
    texts = [t + _text(tok, ids, r) for t, ids, r in zip(thinks, rev.tokens, rev.finish_reasons)]
    return texts, list(rev.finish_reasons), int(out.lengths.sum() + rev.lengths.sum())


def rollout(
    policy, judge, records, prompt_ids, opts: RolloutConfig, draft_rng, revision_rng=None, *,
    reviser=None,
) -> Rollouts:  # fmt: skip
    """Samples (and judges) one rollout per record.

    Args:
      policy: a `load.LoadedModel` (with its tokenizer) that writes the drafts and, without a
        reviser, pass 2.
      judge: a `judge.Judge` scoring drafts and revisions, or None (single pass only: no
        verdicts, no rewards).
      records: rows with a `.prompt` (the judge's prompt text); repeat a record for G samples.
      prompt_ids: the chat-template token ids of each row.
      opts: a `RolloutConfig`.
      draft_rng, revision_rng: keys of pass 1 and pass 2 (revision_rng: two-pass only).
      reviser: a model that writes pass 2 from text instead of continuing the policy's cache.

    Returns:
      `Rollouts`, rows in input order.
    """
    n, tok = len(records), policy.tokenizer
    if len(prompt_ids) != n:
        raise ValueError(f"{len(prompt_ids)} prompt id lists for {n} records; give one per row.")
    if opts.two_pass and (judge is None or revision_rng is None):
        raise ValueError(
            "a two-pass rollout needs a judge (its findings start pass 2) and revision_rng; "
            "pass both, or set RolloutConfig(two_pass=False)."
        )
    timings = {"sampling": 0.0, "judging": 0.0}
    cache_len = opts.cache_len
    if not cache_len:
        continued = opts.two_pass and reviser is None
        rubric = judge.rubric if continued else None
        cache_len = measure_lengths(
            dataclasses.replace(opts, two_pass=continued), tok, rubric, prompt_ids
        ).cache_len
    t0 = time.perf_counter()
    first = sampler.generate(
        policy, prompt_ids,
        _sampler_config(opts, tok, opts.draft_max_tokens, max_cache_len=cache_len), draft_rng,
    )  # fmt: skip
    timings["sampling"] += time.perf_counter() - t0
    new_tokens = int(first.lengths.sum())
    # Two-pass: the draft's end of turn gives way to the findings; single pass: it is trained.
    keep = list(first.lengths)
    if opts.two_pass:
        keep = [k - (r == "eos") for k, r in zip(first.lengths, first.finish_reasons)]
    draft_ids = [list(t[:k]) for t, k in zip(first.tokens, keep)]
    draft_logp = [np.asarray(lp[:k]) for lp, k in zip(first.logprobs, keep)]
    drafts = [tok.decode(t).strip() for t in draft_ids]
    draft_verdicts = None
    if judge is not None:
        t0 = time.perf_counter()
        draft_verdicts = judge_lib.score_pairs(
            judge, [(r.prompt, d) for r, d in zip(records, drafts)]
        )
        timings["judging"] += time.perf_counter() - t0
    empty = [[] for _ in range(n)]
    none = [None] * n
    ro = Rollouts(
        records=list(records), prompt_ids=[list(p) for p in prompt_ids], draft_ids=draft_ids,
        draft_logp=draft_logp, draft_finish=list(first.finish_reasons), suffix_ids=empty,
        cont_ids=[[] for _ in range(n)], cont_logp=[np.zeros(0, np.float32)] * n,
        cont_finish=list(none), drafts=drafts, findings=list(none), thinks=list(none),
        revisions=list(none), errors=list(none),
        draft_verdicts=draft_verdicts, revision_verdicts=list(none), rewards=None,
        sequence_ids=[], trained_mask=[], sampler_logp=[], new_tokens=new_tokens, timings=timings,
    )  # fmt: skip
    if draft_verdicts is not None:
        ro.rewards = np.array([v.scores.reward for v in draft_verdicts])
    if opts.two_pass:
        _second_pass(ro, policy, judge, opts, first, keep, revision_rng, reviser)
    _assemble(ro)
    return ro


def _second_pass(ro: Rollouts, policy, judge, opts, first, keep, rng, reviser) -> None:
    """Findings, reflection and revision (from the draft's cache, or by the reviser), judged."""
    tok, n = policy.tokenizer, len(ro.records)
    ro.findings = [
        reflection.findings_block(judge.rubric, v, max_findings=opts.max_findings)
        for v in ro.draft_verdicts
    ]
    t0 = time.perf_counter()
    if reviser is None:
        ro.suffix_ids = [tok.encode(b) for b in ro.findings]
        second = sampler.continue_generation(
            policy, first, ro.suffix_ids, _sampler_config(opts, tok, opts.revision_max_tokens),
            rng, keep=np.asarray(keep),
        )  # fmt: skip
        ro.cont_ids = [list(t) for t in second.tokens]
        ro.cont_logp = [np.asarray(lp) for lp in second.logprobs]
        ro.cont_finish = list(second.finish_reasons)
        texts = [tok.decode(t) for t in ro.cont_ids]
        ro.new_tokens += int(second.lengths.sum())
    else:
        rtok = reviser.tokenizer
        contexts = [
            rtok.apply_chat_template([{"role": "user", "content": r.prompt}]) + rtok.encode(d + b)
            for r, d, b in zip(ro.records, ro.drafts, ro.findings)
        ]
        texts, ro.cont_finish, generated = revise_from_text(reviser, contexts, opts, rng)
        ro.new_tokens += generated
    ro.timings["sampling"] += time.perf_counter() - t0
    parsed = [reflection.parse_continuation(t) for t in texts]
    ro.thinks = [think for think, _, _ in parsed]
    ro.revisions = [rev for _, rev, _ in parsed]
    ro.errors = [err for _, _, err in parsed]
    if not opts.judge_revisions:
        ro.rewards = None  # R1 alone is not a two-pass reward
        return
    ok = [i for i in range(n) if ro.errors[i] is None]
    t0 = time.perf_counter()
    scored = judge_lib.score_pairs(judge, [(ro.records[i].prompt, ro.revisions[i]) for i in ok])
    ro.timings["judging"] += time.perf_counter() - t0
    r1 = ro.rewards
    r2 = r1.copy()  # a malformed revision counts as no change ...
    for i, v in zip(ok, scored):
        ro.revision_verdicts[i], r2[i] = v, v.scores.reward
    rcfg = judge.reward_cfg
    reward = np.asarray(
        rewards_lib.two_pass_reward(r1, r2, rcfg.improvement_weight, rcfg.regression_weight),
        np.float64,
    )
    malformed = np.array([v is None for v in ro.revision_verdicts])
    ro.rewards = reward - opts.malformed_penalty * malformed  # ... and pays the penalty


def _assemble(ro: Rollouts) -> None:
    """Each row's whole sequence, which tokens the policy wrote, and their sampler logprobs."""
    for i in range(len(ro.records)):
        parts = [  # (ids, trained, sampler logprobs)
            (ro.prompt_ids[i], False, None),
            (ro.draft_ids[i], True, ro.draft_logp[i]),
            (ro.suffix_ids[i], False, None),
            (ro.cont_ids[i], True, ro.cont_logp[i]),
        ]
        ro.sequence_ids.append([t for ids, _, _ in parts for t in ids])
        ro.trained_mask.append(np.concatenate([np.full(len(ids), t, bool) for ids, t, _ in parts]))
        ro.sampler_logp.append(
            np.concatenate([
                np.zeros(len(ids), np.float32) if lp is None else np.asarray(lp, np.float32)
                for ids, _, lp in parts
            ])
        )  # fmt: skip


def final_answers(ro: Rollouts) -> list[str]:
    """The answer of each row: the revision when well formed, else the draft."""
    return [
        d if rev is None or err is not None else rev
        for d, rev, err in zip(ro.drafts, ro.revisions, ro.errors)
    ]


# ---------------------------------------------------------------------------------------------
# Logging.


def rollout_metrics(ro: Rollouts, rubric) -> dict[str, float]:
    """Reward statistics, per-principle draft/revision scores, gates, lengths, malformed.

    An unjudged (single-pass, judge None) rollout has only its lengths and finish reasons."""
    m = {
        "rollout/draft_tokens": float(np.mean([len(t) for t in ro.draft_ids])),
        "rollout/draft_truncated": float(np.mean([r == "length" for r in ro.draft_finish])),
        # The training guard against judge exploits: answers that are no answer (empty, ":", a
        # lone master key, the prompt echoed: `judge.substantive_reasons`), whether or not
        # `judge.substantive_gate` vetoes them.
        "rollout/not_substantive_rate": float(
            np.mean(
                [
                    bool(judge_lib.substantive_reasons(r.prompt, a))
                    for r, a in zip(ro.records, final_answers(ro))
                ]
            )
        ),  # fmt: skip
    }
    if ro.draft_verdicts is None:
        return m
    if ro.rewards is not None:
        m["rollout/reward_mean"] = float(ro.rewards.mean())
        m["rollout/reward_std"] = float(ro.rewards.std())
    m["rollout/draft_score"] = float(np.mean([v.scores.reward for v in ro.draft_verdicts]))
    m["rollout/draft_gate_violation_rate"] = float(
        np.mean([bool(v.scores.violated_gates) for v in ro.draft_verdicts])
    )
    revised = [v for v in ro.revision_verdicts if v is not None]
    for p in rubric.principles:
        vals = [v.scores.principles[p.id] for v in ro.draft_verdicts]
        vals = [x for x in vals if x is not None]
        if vals:
            m[f"draft/{p.id}"] = float(np.mean(vals))
        vals = [v.scores.principles[p.id] for v in revised]
        vals = [x for x in vals if x is not None]
        if vals:
            m[f"revision/{p.id}"] = float(np.mean(vals))
    if any(ro.cont_ids):
        m["rollout/continuation_tokens"] = float(np.mean([len(t) for t in ro.cont_ids]))
        m["rollout/malformed_fraction"] = float(np.mean([e is not None for e in ro.errors]))
    if revised:
        pairs = [
            (d.scores.reward, v.scores.reward)
            for d, v in zip(ro.draft_verdicts, ro.revision_verdicts)
            if v is not None
        ]
        m["rollout/revision_score"] = float(np.mean([r2 for _, r2 in pairs]))
        m["rollout/improved_fraction"] = float(np.mean([r2 > r1 for r1, r2 in pairs]))
        m["rollout/revision_gate_violation_rate"] = float(
            np.mean([bool(v.scores.violated_gates) for v in revised])
        )
    return m


def rollout_rows(ro: Rollouts, judge, step: int, count: int) -> list[dict]:
    """The first `count` rollouts with their judge reports (GRPO's rollouts.jsonl)."""
    rows = []
    for i in range(min(count, len(ro.records))):
        r = ro.records[i]
        revision = ro.revisions[i] if ro.errors[i] is None else None
        rows.append({
            "step": step, "id": r.id, "prompt": r.prompt, "draft": ro.drafts[i],
            "revision": revision, "error": ro.errors[i],
            "reward": float(ro.rewards[i]) if ro.rewards is not None else None,
            "draft_report": (
                judge_lib.report_row(judge, r.prompt, ro.drafts[i], ro.draft_verdicts[i])
                if ro.draft_verdicts is not None else None
            ),
            "revision_report": (
                judge_lib.report_row(judge, r.prompt, ro.revisions[i], ro.revision_verdicts[i])
                if ro.revision_verdicts[i] is not None else None
            ),
        })  # fmt: skip
    return rows
