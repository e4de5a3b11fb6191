"""The QA-LIGN pipeline in one command: priming data -> SFT priming -> GRPO -> before/after.

Each stage is an ordinary experiment config file that also runs alone
(`config.pipeline.prime / sft / grpo`, 'path/to/config.py[:arg]'). The pipeline runs them in
`workdir/1_prime`, `2_sft`, `3_grpo` and wires each stage's outputs into the next:

  1_prime/prime_sft.jsonl    -> the SFT stage's data.train_path
  2_sft (its checkpoints)    -> the GRPO stage's checkpoint.init (policy and KL reference)
  1_prime/prime_data.jsonl   -> the GRPO stage's grpo.priming_data (prompts kept disjoint)

The pipeline's own `model` and `mesh` replace every stage's, so `--config.model.source=...`
moves the whole pipeline to another model. Then `4_eval` compares the base model with the
final policy on held-out prompts (`pipeline.eval_sources`): greedy two-pass rollouts (the
GRPO stage's lengths and rubric) judged by the base model, written to `4_eval/eval.jsonl`
and summarized in `summary.json` and on the console.

Resuming: a finished stage leaves `done.json` and is skipped; an interrupted one resumes on
its own (prime_data skips finished prompts, SFT and GRPO restore their newest checkpoint), so
rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time

import jax

from qalign_jax import config as config_lib
from qalign_jax import data, files, metrics, rollouts, sharding
from qalign_jax import judge as judge_lib
from qalign_jax import stages as stages_lib
from qalign_jax.models import llama, load

STAGES = ("prime", "sft", "grpo")


def stage_configs(config, workdir: str) -> dict:
    """{stage: (its workdir, its config with the pipeline's wiring applied)}."""
    dirs = {
        "prime": os.path.join(workdir, "1_prime"),
        "sft": os.path.join(workdir, "2_sft"),
        "grpo": os.path.join(workdir, "3_grpo"),
    }
    loops = {"prime": "prime_data", "sft": "sft", "grpo": "grpo"}
    out = {}
    for stage in STAGES:
        spec = config.pipeline[stage]
        if not spec:
            raise ValueError(
                f"config.pipeline.{stage} is empty; set it to the stage's config file, e.g. "
                f"'configs/{loops[stage]}_smol.py'."
            )
        c = config_lib.load_file(spec)
        if c.loop != loops[stage]:
            raise ValueError(
                f"config.pipeline.{stage}={spec!r} is a {c.loop!r} config; the {stage} stage "
                f"needs loop={loops[stage]!r}."
            )
        c.model = config.model.copy_and_resolve_references()
        c.mesh = config.mesh.copy_and_resolve_references()
        out[stage] = [dirs[stage], c]
    prime_dir = dirs["prime"]
    out["sft"][1].data.train_path = os.path.join(prime_dir, "prime_sft.jsonl")
    out["grpo"][1].checkpoint.init = dirs["sft"]
    out["grpo"][1].grpo.priming_data = os.path.join(prime_dir, "prime_data.jsonl")
    return {k: tuple(v) for k, v in out.items()}


def _stage_summary(stage: str, workdir: str) -> dict:
    """A few numbers that say what a finished stage did."""
    if stage == "prime":
        s = files.read_json(os.path.join(workdir, "summary.json"))
        return {k: s[k] for k in ("prompts", "kept", "draft_reward_mean", "revision_reward_mean")}
    rows = metrics.read_metrics(workdir)
    if stage == "sft":
        train = [r["train/loss"] for r in rows if "train/loss" in r]
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        return {
            "steps": len(train),
            "train_loss_first": train[0], "train_loss_last": train[-1],
            "eval_loss_first": evals[0] if evals else None,
            "eval_loss_last": evals[-1] if evals else None,
        }  # fmt: skip
    rewards = [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r]
    return {"steps": len(rewards), "reward_first": rewards[0], "reward_last": rewards[-1]}


def _check_prime_output(workdir: str) -> None:
    path = os.path.join(workdir, "prime_sft.jsonl")
    if not files.read_jsonl(path):
        raise ValueError(
            f"the priming stage kept no examples ({path} is empty), so there is nothing to "
            "prime on; use more prime.sources prompts or prime.keep='all' in its config."
        )


def evaluate(config, eval_sources, final: str, workdir: str) -> dict:
    """Greedy rollouts of the base model and the final policy (`final`: a workdir or HF dir)
    on held-out prompts, with `config`'s (the GRPO stage's) lengths, rubric and judge."""
    c = config.copy_and_resolve_references()
    c.grpo.temperature, c.grpo.top_p = 0.0, 1.0
    mesh = sharding.make_mesh(c.mesh.shape)
    rules = tuple(c.sharding.rules)
    base = load.from_config(c, mesh)
    judge = judge_lib.from_config(c, base)
    records = data.select_prompts(eval_sources, c.seed)
    prompt_ids = data.chat_ids(base.tokenizer, records, c.grpo.max_prompt_tokens, "drop")
    records = [r for r in records if r.id in prompt_ids]
    if not records:
        raise ValueError("config.pipeline.eval_sources gave no prompts that fit; check it.")
    opts = rollouts.from_grpo_config(c.grpo)
    shardings = sharding.param_shardings(llama.abstract_model(base.cfg)[1], mesh, rules)
    final_params, origin = load.initial_params(
        base.cfg, shardings, source=c.model.source, init=final,
        mesh=mesh, rules=rules, seed=c.seed,
    )  # fmt: skip
    policies = {"base": base, "final": dataclasses.replace(base, params=final_params)}
    results = {"prompts": len(records), "final_params": origin, "policies": {}}
    rows = []
    for name, policy in policies.items():
        ro = rollouts.rollout(
            policy, judge, records, [prompt_ids[r.id] for r in records], opts,
            *jax.random.split(jax.random.key(c.seed)),
        )  # fmt: skip
        results["policies"][name] = rollouts.rollout_metrics(ro, judge.rubric)
        rows += [
            {"policy": name, **row} for row in rollouts.rollout_rows(ro, judge, 0, len(records))
        ]
    if jax.process_index() == 0:
        files.write_jsonl(os.path.join(workdir, "eval.jsonl"), rows)
    return results


def _table(eval_results: dict) -> str:
    """One row per policy: rewards, malformed revisions, gate violations, principle scores."""
    policies = eval_results["policies"]
    cols = [("reward", "rollout/reward_mean"), ("draft", "rollout/draft_score"),
            ("revision", "rollout/revision_score"), ("malformed", "rollout/malformed_fraction"),
            ("gate viol.", "rollout/draft_gate_violation_rate")]  # fmt: skip
    principles = sorted({k[6:] for m in policies.values() for k in m if k.startswith("draft/")})
    cols += [(p[:11], f"draft/{p}") for p in principles]
    lines = [f"  {'policy':8s}" + "".join(f"{name:>12s}" for name, _ in cols)]
    for policy, m in policies.items():
        cells = "".join(f"{m[key]:12.3f}" if key in m else f"{'-':>12s}" for _, key in cols)
        lines.append(f"  {policy:8s}{cells}")
    lines.append("  (draft columns: the first answer; principle scores are the drafts')")
    return "\n".join(lines)


def _run_one(run_stage, stage: str, stage_cfg, stage_dir: str, i: int) -> dict:
    """Runs one training stage into `stage_dir`; returns its done marker (seconds)."""
    print(f"pipeline [{i + 1}/4] {stage} -> {stage_dir}")
    t0 = time.perf_counter()
    files.makedirs(stage_dir)
    if jax.process_index() == 0:
        files.write_text(
            os.path.join(stage_dir, "config.json"), stage_cfg.to_json_best_effort(indent=1)
        )
    run_stage(stage_cfg, stage_dir)
    # The next stage compiles its own programs: drop this one's (and what they hold) first, so
    # the pipeline's peak memory is its largest stage's, not their sum.
    jax.clear_caches()
    gc.collect()
    return {"seconds": time.perf_counter() - t0}


def run(config, workdir: str, *, run_stage) -> None:
    """The pipeline; `run_stage(config, workdir)` runs one stage's loop (`train.run_stage`)."""
    t_start = time.perf_counter()
    stages = stage_configs(config, workdir)
    summary = {"stages": {}}
    for i, stage in enumerate(STAGES):
        stage_dir, stage_cfg = stages[stage]
        done = os.path.join(stage_dir, "done.json")
        if stage == "sft":
            _check_prime_output(stages["prime"][0])
        if files.exists(done):
            print(f"pipeline [{i + 1}/4] {stage}: done already ({stage_dir}), skipped")
        seconds = stages_lib.run_once(
            done, functools.partial(_run_one, run_stage, stage, stage_cfg, stage_dir, i)
        )["seconds"]
        summary["stages"][stage] = {"seconds": seconds, **_stage_summary(stage, stage_dir)}

    eval_dir = os.path.join(workdir, "4_eval")
    files.makedirs(eval_dir)
    print(f"pipeline [4/4] eval -> {eval_dir}")
    t0 = time.perf_counter()
    grpo_dir, grpo_cfg = stages["grpo"]
    # The export (read from local disk only); else the newest checkpoint, wherever it is.
    final = os.path.join(grpo_dir, "hf")
    final = final if not files.is_url(final) and os.path.isdir(final) else grpo_dir
    summary["eval"] = evaluate(grpo_cfg, config.pipeline.eval_sources, final, eval_dir)
    summary["eval"]["seconds"] = time.perf_counter() - t0
    summary["seconds"] = time.perf_counter() - t_start
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "summary.json"), summary)
        print(report(summary, workdir))


def report(summary: dict, workdir: str) -> str:
    s = summary["stages"]
    p, t, g = s["prime"], s["sft"], s["grpo"]
    fmt = metrics.format_duration
    lines = [
        f"QA-LIGN pipeline finished in {fmt(summary['seconds'])} ({workdir})",
        f"  1 priming data  {fmt(p['seconds']):>8s}  {p['kept']}/{p['prompts']} examples kept; "
        f"draft reward {p['draft_reward_mean']:+.3f}, revision {p['revision_reward_mean']:+.3f}",
        f"  2 SFT priming   {fmt(t['seconds']):>8s}  {t['steps']} steps; train loss "
        f"{t['train_loss_first']:.3f} -> {t['train_loss_last']:.3f}"
        + (f"; eval loss {t['eval_loss_first']:.3f} -> {t['eval_loss_last']:.3f}"
           if t["eval_loss_first"] is not None else ""),
        f"  3 GRPO          {fmt(g['seconds']):>8s}  {g['steps']} steps; reward "
        f"{g['reward_first']:+.3f} (first step) -> {g['reward_last']:+.3f} (last step)",
        f"  4 before/after  {fmt(summary['eval']['seconds']):>8s}  "
        f"{summary['eval']['prompts']} held-out prompts, greedy, two-pass, judged by the base "
        "model:",
        _table(summary["eval"]),
        "Outputs: 1_prime/prime_data.jsonl (priming examples), 2_sft/hf (primed weights), "
        "3_grpo/hf (final weights), 3_grpo/rollouts.jsonl, 4_eval/eval.jsonl (answers + judge "
        "reports), summary.json.",
    ]  # fmt: skip
    return "\n".join(lines)
