"""QA-LIGN GRPO smoke run for tests: a tiny random policy and judge with the real tokenizer.

  python -m qalign_jax.train --config configs/qalign_grpo_smoke.py --workdir /tmp/grpo_smoke
Seconds per step on a CPU; the texts are noise but every stage runs: draft, judge, findings,
continuation from the draft's cache, judge, two-pass reward, advantages, update, checkpoint.
`:single` is the single-pass ablation.
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "grpo"
    c.seed = 0
    c.model.source = "random:tiny"
    c.model.tokenizer = "embedded"
    c.mesh.shape = (1, -1, 1)
    c.judge.rubric = "demo"
    c.judge.batch_size = 8
    c.reward.gate_readout = "expected"  # soft gates: a random judge still gives varied rewards

    g = c.grpo
    g.sources = ((os.path.join(DATA, "grpo_prompts.jsonl"), 8),)  # none are priming prompts
    g.prompts_per_step = 2
    g.num_generations = 4
    g.num_steps = 3
    g.draft_max_tokens = 8
    g.revision_max_tokens = 8
    g.max_prompt_tokens = 64
    g.max_findings = 2
    g.rollouts_every = 2
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_ratio = 0.0
    c.checkpoint.every_steps = 1
    c.checkpoint.keep = 3
    c.checkpoint.async_save = False
    c.metrics.tensorboard = False
    if arg == "single":
        g.two_pass = False
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':single' or nothing.")
    return c
