"""The judge's command line (the judge itself is judge.py).

  python -m qalign_jax.judge --rubric demo --input responses.jsonl --output report.jsonl
(`--model` any supported model source; default the embedded SmolLM2). Input rows need
`prompt` and `response`; the report has one row per response with every question's verdict
(`judge.report_row`), and a table of mean scores per principle and dimension is printed.
  python -m qalign_jax.judge robustness --rubric demo --model embedded --output DIR
judges attacks and honest references (`judge_robustness.py`) into a report in DIR.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags, logging

from qalign_jax import rubric as rubric_lib
from qalign_jax import sharding
from qalign_jax.judge import Judge, JudgeConfig, Verdict, build_judge, report_row, score_pairs
from qalign_jax.models import load


def summary_table(judge: Judge, verdicts: list[Verdict]) -> str:
    """Mean score per principle and dimension (N/A left out), as aligned text."""
    lines = [f"{'principle / dimension':<40} {'mean':>7} {'n':>4}"]
    for p in judge.rubric.principles:
        vals = [
            v.scores.principles[p.id] for v in verdicts if v.scores.principles[p.id] is not None
        ]
        lines.append(f"{p.name:<40} {np.mean(vals) if vals else float('nan'):>7.3f} {len(vals):>4}")
        for d in p.dimensions:
            dv = [
                v.scores.dimensions[d.id] for v in verdicts if v.scores.dimensions[d.id] is not None
            ]
            lines.append(f"  {d.name:<38} {np.mean(dv) if dv else float('nan'):>7.3f} {len(dv):>4}")
    rewards_ = [v.scores.reward for v in verdicts]
    lines.append(f"{'reward':<40} {np.mean(rewards_):>7.3f} {len(rewards_):>4}")
    return "\n".join(lines)


def main(argv):
    f = flags.FLAGS
    if argv[1:] == ["robustness"]:
        from qalign_jax import judge_robustness

        return judge_robustness.main(f)
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; the one subcommand is 'robustness'.")
    if not f.input or not f.output:
        raise ValueError("--input and --output are required (or run the 'robustness' subcommand).")
    rubric = rubric_lib.resolve_rubric(f.rubric)
    model = load.load_model(f.model, mesh=sharding.make_mesh((1, -1, 1)), dtype=f.dtype,
                            tokenizer_source=f.tokenizer or None)  # fmt: skip
    judge = build_judge(model, rubric, JudgeConfig(mode=f.mode, batch_size=f.batch_size))
    rows = [json.loads(line) for line in open(f.input) if line.strip()]
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(
                f"{f.input}:{n}: each line needs string fields 'prompt' and 'response'."
            )
    pairs = [(r["prompt"], r["response"]) for r in rows]
    t0 = time.time()
    verdicts = score_pairs(judge, pairs, jax.random.key(f.seed))
    elapsed = time.time() - t0
    with open(f.output, "w") as out:
        for (p, r), v in zip(pairs, verdicts):
            out.write(json.dumps(report_row(judge, p, r, v)) + "\n")
    n_q = len(rubric.questions) * len(pairs)
    print(summary_table(judge, verdicts))
    print(f"{len(pairs)} responses x {len(rubric.questions)} questions in {elapsed:.1f}s "
          f"({n_q / elapsed:.1f} questions/s, mode {f.mode}) -> {f.output}")  # fmt: skip
    logging.info("done")


def define_flags():
    flags.DEFINE_string("rubric", "demo", "Built-in rubric name (demo, default) or a rubric file.")
    flags.DEFINE_string("input", None, "JSONL with 'prompt' and 'response' per line.")
    flags.DEFINE_string(
        "output", None, "Per-response, per-question JSONL report (robustness: a directory)."
    )
    # The robustness subcommand (`judge_robustness.py`).
    flags.DEFINE_string("prompts", "", "robustness: prompts JSONL; '' = the bundled mix.")
    flags.DEFINE_integer("max_prompts", 0, "robustness: use the first N prompts; 0 = all.")
    flags.DEFINE_string(
        "defences",
        "none,gate,quote,quote+gate,all",
        "robustness: settings to report, of none, gate, quote, quote+gate, calibrate, all, "
        "all+length (judge_robustness.SETTINGS).",
    )
    flags.DEFINE_float("threshold", 0.5, "robustness: a score >= this passes (false positive).")
    flags.DEFINE_string("attack_base", "refusal", "robustness: the answer injections extend.")
    flags.DEFINE_bool("option_probe", True, "robustness: rejudge references, options reversed.")
    flags.DEFINE_bool("append", False, "robustness: add to the verdicts already in --output.")
    flags.DEFINE_string("model", "embedded", "Judge model source (see models/load.py).")
    flags.DEFINE_string("tokenizer", "", "Tokenizer source for random-weight judges.")
    flags.DEFINE_string("mode", "logits", "'logits' (shared prefix) or 'generate' (naive).")
    flags.DEFINE_string("dtype", "float32", "Compute dtype.")
    flags.DEFINE_integer("batch_size", 4, "Responses per prefill.")
    flags.DEFINE_integer("seed", 0, "Seed (generate mode with temperature > 0).")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
