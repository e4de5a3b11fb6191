"""The DPO baseline for Llama-3.1-8B-Instruct, on the QA-LIGN GRPO prompts and judge.

Run on every host of a TPU slice (or one 8-GPU host), models as local HF directories:
  python -m qalign_jax.train --config configs/dpo_llama3_8b.py \
    --workdir /mnt/shared/workdirs/dpo_8b \
    --config.model.source=/mnt/shared/models/Llama-3.1-8B-Instruct \
    --config.checkpoint.init=/mnt/shared/workdirs/sft_prime_8b \
    --config.judge.source=/mnt/shared/models/Llama-3.1-8B-judge
The starting policy samples G = 5 answers (384 tokens, temperature 1) for each of the 1,600
GRPO prompts (configs/qalign_grpo_llama3_8b.py's mix); the judge scores them on the default
167-question rubric; best vs worst per prompt (ties skipped) gives up to 1,600 pairs; then one
epoch of sigmoid DPO, beta 0.1, 32 pairs per step (~50 steps), lr 5e-7 with warmup and
cosine, against the frozen starting policy.

Mesh (data, fsdp, tensor) = (1, 32, 1) on 32 chips (95 GB HBM each). Memory per chip:
  policy params fp32 + Adam mu, nu            32.1 GB x 3 / 32 = 3.0 GB
  gradients fp32                               32.1 GB / 32     = 1.0 GB
  primed reference and judge, frozen, in model.param_dtype (fp32; model.source's own
    weights are not loaded: both roles are taken)  2 x 32.1 GB / 32 = 2.0 GB
  sampler KV cache, 80 rows x 640 slots x 32 layers x 8 x 128 x 2 x 2 B = 6.7 GB / 32 = 0.2 GB
  training activations, remat 'full', 64 rows (32 pairs) x 1,024 tokens / 32 chips (2 rows
    per chip): block inputs 32 x 2 x 1,024 x 4,096 x 2 B = 0.5 GB; logits and log-softmax
    (fp32, 2 x 1,024 x 128,256 x 4 B x ~3) ~ 3.2 GB; one recomputed block ~ 1 GB  ~ 5 GB
  total ~ 12 GB of 95 GB. Estimates from this arithmetic, not measurements.
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "dpo"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # a local HF directory; override on the command line
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = "Llama-3.1-8B-judge"
    c.judge.rubric = "default"
    c.judge.batch_size = 16
    c.judge.question_chunk = 64

    d = c.dpo
    d.sources = (
        (os.path.join(DATA, "advbench", "advbench.jsonl"), -1),
        (os.path.join(DATA, "red_instruct", "harmfulqa.jsonl"), 830),
        (os.path.join(DATA, "red_instruct", "catqa_english.jsonl"), 250),
    )
    d.num_generations = 5
    d.max_new_tokens = 384
    d.max_prompt_tokens = 256
    d.on_long_prompt = "drop"
    d.temperature = 1.0
    d.sample_batch_prompts = 16
    d.beta = 0.1
    d.pairs_per_step = 32  # must divide over the 32-chip fsdp axis
    d.num_epochs = 1
    c.optimizer.lr = 5e-7
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.min_lr_ratio = 0.0
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none.")
    return c
