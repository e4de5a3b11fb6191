"""The DPO baseline for the embedded SmolLM2-135M-Instruct on CPU, on the GRPO smol prompts.

Run (from the primed SFT checkpoint, as configs/qalign_grpo_smol.py):
  python -m qalign_jax.train --config configs/dpo_smol.py --workdir workdirs/dpo_smol \
    --config.checkpoint.init=workdirs/sft_smol_primed
The starting policy samples G=4 answers (48 tokens, temperature 1) for each of the 16 bundled
GRPO prompts (configs/data/grpo_prompts.jsonl: 8 harmful, 8 benign); the base model judges
them on the demo rubric (soft gates, as the GRPO smol config); best vs worst of each prompt
makes a pair (ties skipped); then 2 epochs of sigmoid DPO (beta 0.1, 4 pairs per step, lr 1e-5
constant, as GRPO smol) against the frozen starting policy. Measured (from the primed SFT
checkpoint): 16 pairs, 0 ties, mean best - worst reward gap 0.19; 8 steps, loss 0.693 at step
1 (policy = reference), ~0.70 through epoch 1, 0.21 at step 8 with pair accuracy 1.0 (epoch 2
revisits the same 16 pairs). 25 min on a shared, overloaded 2-core CPU (load ~14), 19 of them
judging the 64 answers. On a quiet one with the shared-header judge, started from `embedded`
(no primed checkpoint): 3m37s in all, pairs in 2 min (sampling 25 s, judging 93 s for the 64
answers), 16 pairs, gap 0.25, then 8 steps of ~8.6 s, loss 0.693 -> 0.162. Writes pairs.jsonl,
pairs_summary.json, metrics.jsonl, ckpt/ and hf/ in the workdir.
`:smoke` is a short run with a tiny random policy and judge on the one-question scalar rubric
(tests).
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "dpo"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = ""  # the base model, frozen, judges (as in GRPO)
    c.judge.rubric = "demo"
    c.judge.batch_size = 8
    c.reward.gate_readout = "expected"  # soft gates: see configs/qalign_grpo_smol.py

    d = c.dpo
    d.sources = ((os.path.join(DATA, "grpo_prompts.jsonl"), -1),)
    d.num_generations = 4
    d.max_new_tokens = 48
    d.max_prompt_tokens = 96
    d.temperature = 1.0
    d.sample_batch_prompts = 8
    d.beta = 0.1
    d.pairs_per_step = 4
    d.num_epochs = 2
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.min_lr_ratio = 1.0  # constant lr
    c.checkpoint.every_steps = 4
    c.checkpoint.keep = 2
    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        d.sources = ((os.path.join(DATA, "prime_harmful.jsonl"), 4),
                     (os.path.join(DATA, "prime_benign.jsonl"), 4))  # fmt: skip
        d.max_new_tokens = 8
        c.judge.rubric = "scalar"  # one question: seconds, and rewards still vary
        d.max_prompt_tokens = 64
        d.pairs_per_step = 8
        d.num_steps = 3
        d.export_hf = False
        c.optimizer.lr = 1e-3
        c.checkpoint.every_steps = 1
        c.checkpoint.async_save = False
        c.metrics.tensorboard = False
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing.")
    return c
