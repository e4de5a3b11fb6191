"""QA-LIGN reflection-priming data for Llama-3.1-8B-Instruct (the paper's setting: 500 prompts).

Run on every host of a TPU slice (or one GPU host) with the models as local HF directories:
  python -m qalign_jax.train --config configs/prime_data_llama3_8b.py \
    --workdir /mnt/shared/workdirs/prime_8b \
    --config.model.source=/mnt/shared/models/Llama-3.1-8B-Instruct \
    --config.judge.source=/mnt/shared/models/Llama-3.1-8B-judge
Prompt mix (500): 250 AdvBench + 150 HarmfulQA harmful requests and 100 Alpaca benign
instructions, chosen by a hash of the seed and ids, so the GRPO stage can take disjoint ones.
Data files are read from $QALIGN_DATA (default ./data) in the shared prompt-set schema.
The policy drafts and writes its own reflection and revision (set `prime.reviser` to a
stronger model's directory to have it write them instead); the judge answers the default
167-question rubric. Then SFT with configs/sft_prime_llama3_8b.py and
--config.data.train_path=<workdir>/prime_sft.jsonl.

Mesh (data, fsdp, tensor) = (1, -1, 1): policy and judge weights (bf16, 16 GB each) are split
over every chip; sampling is memory-bound, so a v5p-8 (4 chips) or one 80 GB GPU suffices.
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "prime_data"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # a local HF directory; override on the command line
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = "Llama-3.1-8B-judge"  # the judge's HF directory (paper: uncensored 8B)
    c.judge.rubric = "default"
    c.judge.batch_size = 16
    c.judge.question_chunk = 64

    c.prime.sources = (
        (os.path.join(DATA, "advbench", "advbench.jsonl"), 250),
        (os.path.join(DATA, "red_instruct", "harmfulqa.jsonl"), 150),
        (os.path.join(DATA, "alpaca", "alpaca_noinput_sample2000.jsonl"), 100),
    )
    c.prime.batch_size = 64
    c.prime.draft_max_tokens = 384
    c.prime.think_max_tokens = 256
    c.prime.revision_max_tokens = 512
    c.prime.temperature = 0.7
    c.prime.keep = "not_worse"
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none.")
    return c
