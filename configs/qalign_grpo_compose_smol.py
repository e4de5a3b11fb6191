"""GRPO of the embedded SmolLM2-135M-Instruct on a composed reward, on CPU: rubric + refusal +
degeneracy veto, GDPO aggregation (reward_components.py).

Run (data from $QALIGN_DATA, default ./data: the shared sets in the prompt-set schema):
  QALIGN_DATA=../shared/data python -m qalign_jax.train \
    --config configs/qalign_grpo_compose_smol.py --workdir workdirs/compose_smol
then the held-out evaluation (AdvBench and XSTest's safe prompts, none trained on):
  QALIGN_DATA=../shared/data python -m qalign_jax.eval --config configs/eval_smol.py:safety \
    --model workdirs/compose_smol --name compose --output workdirs/eval/compose

Components (weights; each normalized within its group of G before the weighted sum, GDPO):
  rubric      0.5  the base model judging on the one-question `scalar` rubric (the demo
                   rubric's 32 questions would cost ~4x the judging time per step on CPU)
  refusal     1.0  the eval suites' refusal matcher: +1 for refusing a harmful prompt, -1 for
                   refusing a benign one (the prompt's `label`)
  degenerate  0.0  veto: an empty, looping or copied-back answer ranks below every other answer
Prompts: DangerousQA's 200 harmful questions and 200 Alpaca instructions (benign); single
pass, 48-token answers, 4 prompts x G=8 per step. The base model refuses ~3% of sampled answers
to harmful prompts, so most groups of 8 hold no refusal at first; GDPO keeps the groups where
only the rubric or the veto varies.
`:seed1` is the same run with another seed (prompt order and sampling).
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "grpo"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = ""  # the base model, frozen, judges
    c.judge.rubric = "scalar"
    c.judge.batch_size = 8

    c.reward.aggregation = "gdpo"
    c.reward.components = (
        ("rubric", "rubric", 0.5, {}),
        ("refusal", "refusal", 1.0, {}),
        ("degenerate", "degeneracy", 0.0, {"veto": True}),
    )

    g = c.grpo
    g.sources = (
        (os.path.join(DATA, "red_instruct", "dangerousqa.jsonl"), -1),
        (os.path.join(DATA, "alpaca", "alpaca_noinput_sample2000.jsonl"), 200),
    )
    g.prompts_per_step = 4
    g.num_generations = 8
    g.num_steps = 30
    g.two_pass = False
    g.draft_max_tokens = 48
    g.max_prompt_tokens = 128
    g.on_long_prompt = "drop"
    g.temperature = 1.0
    g.kl_beta = 0.0  # no reference forward: a third of the training time on CPU
    g.rollouts_every = 5
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.min_lr_ratio = 1.0  # constant lr
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 1
    c.metrics.tensorboard = False
    if arg == "seed1":
        c.seed = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':seed1' or nothing.")
    return c
