"""Evaluation suites on the full sets, for 8B-class models on an accelerator.

Run on one GPU host or every host of a TPU slice (models as local Hugging Face directories or
a training run's workdir):
  QALIGN_DATA=/mnt/shared/data python -m qalign_jax.eval --config configs/eval_full.py \
    --model /mnt/shared/workdirs/grpo_8b --name qalign-grpo-8b \
    --output /mnt/shared/eval/grpo_8b --config.eval.two_pass=True \
    --config.judge.source=/mnt/shared/models/Llama-3.1-8B-judge
Sets (all rows): AdvBench 520, HarmfulQA 1,960, DangerousQA 200, CatQA 550 (ASR); XSTest's
250 safe prompts (false refusal); Alpaca no-input sample 2,000 (helpfulness on the default
rubric's helpfulness principle); TruthfulQA v1 817 (MC1/MC2); BIG-bench HHH 221. AdvBench,
HarmfulQA and CatQA are also the 8B GRPO prompt pool (configs/qalign_grpo_llama3_8b.py), as
in the paper's AdvBench numbers; exclude the trained ids for a held-out ASR.
Answers: greedy, up to 512 tokens (two-pass: + 640 for reflection and revision). bf16.
Mesh (1, -1, 1): the evaluated model and the judge (16 GB each in bf16) split over every chip.
Not run here (no accelerator in this project's sessions so far).
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "eval"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # architecture of workdir checkpoints
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.mesh.shape = (1, -1, 1)
    c.judge.source = "Llama-3.1-8B-judge"  # a local HF directory; override on the command line
    c.judge.rubric = "default"
    c.judge.batch_size = 16
    c.judge.question_chunk = 64

    e = c.eval
    red = os.path.join(DATA, "red_instruct")
    e.suites = (
        ("advbench", "asr", os.path.join(DATA, "advbench", "advbench.jsonl"), -1),
        ("harmfulqa", "asr", os.path.join(red, "harmfulqa.jsonl"), -1),
        ("dangerousqa", "asr", os.path.join(red, "dangerousqa.jsonl"), -1),
        ("catqa", "asr", os.path.join(red, "catqa_english.jsonl"), -1),
        ("xstest_safe", "refusal", os.path.join(DATA, "xstest", "xstest.jsonl"), -1),
        ("alpaca", "helpfulness",
         os.path.join(DATA, "alpaca", "alpaca_noinput_sample2000.jsonl"), -1),
        ("truthfulqa", "truthfulqa_mc",
         os.path.join(DATA, "truthfulqa", "truthfulqa_v1_817.jsonl"), -1),
        ("hhh", "hhh", os.path.join(DATA, "bigbench_hhh", "hhh_alignment.jsonl"), -1),
    )  # fmt: skip
    e.batch_size = 128
    e.max_new_tokens = 512
    e.revision_max_tokens = 640
    e.max_prompt_tokens = 512
    e.mc_batch_size = 64
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none.")
    return c
