"""IterAlign for Llama-3.1-8B-Instruct with a larger proposer (pod / GPU host).

Run on every host of a TPU slice (or one GPU host) with the models as local HF directories:
  python -m qalign_jax.train --config configs/iteralign_llama3_8b.py \
    --workdir /mnt/shared/workdirs/iteralign_8b \
    --config.model.source=/mnt/shared/models/Llama-3.1-8B-Instruct \
    --config.judge.source=/mnt/shared/models/Llama-3.1-8B-judge \
    --config.iteralign.proposer=/mnt/shared/models/Llama-3.1-70B-Instruct
Red-team pool (the IterAlign paper's kind of prompts): 1,000 HH-RLHF red-team openers,
600 HarmfulQA and all 200 DangerousQA questions, read from $QALIGN_DATA (default ./data) in
the shared prompt-set schema; 20 prompts per round as in the authors' script (greedy answers),
up to 10 rounds. The judge flags failures with the default 167-question rubric's gates; the
proposer (a separate, larger model; the authors used GPT-3.5/4 as the oracle) reads 10
failures per call; revisions that pass the gates are kept; SFT 3 epochs, lr 2e-6, cosine,
3% warmup (the authors' settings). Expected: a falling failure rate over rounds and a library
of a few dozen constitutions; not yet run at this scale.

Mesh (1, -1, 1): policy, judge and proposer share one mesh and take turns (see DESIGN.md: no
transfers between disjoint meshes on pods). bf16 weights: 16 + 16 + 140 GB for an 8B policy,
an 8B judge and a 70B proposer, plus the SFT state (fp32 master weights and Adam moments of
the 8B policy, about 100 GB) during SFT: a v5p-64 or a host of 8 H200s.
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "iteralign"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # a local HF directory; override on the command line
    c.model.param_dtype = "float32"  # fp32 master weights for SFT; bf16 compute
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = "Llama-3.1-8B-judge"
    c.judge.rubric = "default"
    c.judge.batch_size = 16

    ia = c.iteralign
    ia.sources = (
        (os.path.join(DATA, "hh_rlhf", "hh_rlhf_harmless_test_prompts.jsonl"), 1000),
        (os.path.join(DATA, "red_instruct", "harmfulqa.jsonl"), 600),
        (os.path.join(DATA, "red_instruct", "dangerousqa.jsonl"), -1),
    )
    ia.prompts_per_round = 20
    ia.max_rounds = 10
    ia.stop_failure_rate = 0.05
    ia.batch_size = 20
    ia.answer_max_tokens = 384
    ia.temperature = 0.0
    ia.detect = "gates"
    ia.proposer = "Llama-3.1-70B-Instruct"  # a separate, larger model's HF directory
    ia.proposer_max_tokens = 256
    ia.failures_per_call = 10
    ia.constitutions_per_call = 2
    ia.revision_max_tokens = 384
    ia.keep = "passes"
    ia.gates_per_constitution = 2

    c.data.seq_len = 1024
    c.data.on_overflow = "truncate"
    c.sft.global_batch_size = 16
    c.sft.num_epochs = 3
    c.sft.export_hf = True
    c.optimizer.lr = 2e-6
    c.optimizer.warmup_ratio = 0.03
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 1
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none.")
    return c
