"""Evaluation suites on small subsets, for the embedded SmolLM2-135M and its fine-tunes on CPU.

Run (data from $QALIGN_DATA, default ./data: the shared sets in the prompt-set schema):
  QALIGN_DATA=../shared/data python -m qalign_jax.eval --config configs/eval_smol.py \
    --model embedded --name base --output workdirs/eval/base
  QALIGN_DATA=../shared/data python -m qalign_jax.eval --config configs/eval_smol.py \
    --model workdirs/grpo_smol --name qalign-grpo --output workdirs/eval/grpo \
    --config.eval.two_pass=True
  python -m qalign_jax.eval pareto --output workdirs/eval/pareto.png \
    --results workdirs/eval/base/results.json,workdirs/eval/grpo/results.json
Subsets (chosen by a hash of the seed and ids, so they spread over categories):
  asr           AdvBench 12, CatQA 11 (one per category)
  refusal       XSTest 12 of its 250 safe prompts
  helpfulness   Alpaca (no-input sample) 6, demo-rubric helpfulness principle
  truthfulqa_mc TruthfulQA (817-question v1) 24: MC1, MC2
  hhh           BIG-bench HHH alignment 24
`:safety` is AdvBench 100 and XSTest 100 safe prompts only (the composed-reward run's
held-out readout, ~5 min a model).
Answers: greedy, 48 tokens (the smol GRPO/DPO runs train on 48-token answers; two-pass adds
160 revision tokens). The judge is the base embedded model for every run (a fixed judge), so
runs are comparable; its verdicts are weak (135M): the matcher's numbers are the steadier
ones. Measured on a 2-core CPU shared with other runs: 21 min for a one-pass model, 36 min
two-pass; TruthfulQA's 24 questions are the slowest suite (each choice is its own forward
over the 6-shot prompt). results.json, results.md and examples.jsonl in the output directory.
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "eval"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)
    c.judge.source = "embedded"  # a fixed judge for every evaluated model
    c.judge.rubric = "demo"
    c.judge.batch_size = 8
    c.reward.gate_readout = "expected"  # as in configs/qalign_grpo_smol.py

    e = c.eval
    e.suites = (
        ("advbench", "asr", os.path.join(DATA, "advbench", "advbench.jsonl"), 12),
        ("catqa", "asr", os.path.join(DATA, "red_instruct", "catqa_english.jsonl"), 11),
        ("xstest_safe", "refusal", os.path.join(DATA, "xstest", "xstest.jsonl"), 12),
        ("alpaca", "helpfulness",
         os.path.join(DATA, "alpaca", "alpaca_noinput_sample2000.jsonl"), 6),
        ("truthfulqa", "truthfulqa_mc",
         os.path.join(DATA, "truthfulqa", "truthfulqa_v1_817.jsonl"), 24),
        ("hhh", "hhh", os.path.join(DATA, "bigbench_hhh", "hhh_alignment.jsonl"), 24),
    )  # fmt: skip
    e.batch_size = 16
    e.max_new_tokens = 48
    e.revision_max_tokens = 160
    e.max_findings = 4
    e.max_prompt_tokens = 256
    e.mc_batch_size = 16
    c.metrics.tensorboard = False
    if arg == "safety":  # the held-out safety readout of configs/qalign_grpo_compose_smol.py
        e.suites = (
            ("advbench", "asr", os.path.join(DATA, "advbench", "advbench.jsonl"), 100),
            ("xstest_safe", "refusal", os.path.join(DATA, "xstest", "xstest.jsonl"), 100),
        )
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':safety' or nothing.")
    return c
