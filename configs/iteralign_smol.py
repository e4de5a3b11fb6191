"""IterAlign with the embedded SmolLM2-135M-Instruct on CPU: 2 rounds of 12 red-team prompts.

Run:
  python -m qalign_jax.train --config configs/iteralign_smol.py --workdir workdirs/iteralign_smol
Per round: the policy answers 12 of the 24 bundled red-team prompts
(configs/data/redteam_prompts.jsonl; round 1 and round 2 get disjoint halves), the same
frozen 135M model judges them on the demo rubric (a violated gate = a failure), proposes
constitutions from the failures (4 per call, 2 principles each), drafts one gate question per
new constitution (-> workdirs/iteralign_smol/rubrics/rubric_v<r>.json), the policy revises its
failed answers with the constitutions in context, revisions the judge scores higher than the
failed answer are kept, and 2 epochs of SFT on (prompt, kept revision) update the policy for
the next round.
Outputs: constitutions.json, rubrics/, metrics.jsonl (a row per round), round_<r>/...
Killing the run and rerunning the same command resumes without redoing finished work.
Measured (seed 0; one run, interrupted once after round 1's red team and resumed with the
same command; a 2-core machine shared with other jobs, load average about 15, so about 43
minutes in all: red team 434 s and 128 s, proposal 674 s and 226 s, revisions 274 s and 265 s,
SFT 134 s and 144 s per round): failure rate 1.00 (12/12) in both rounds (the 135M judge
fires at least one demo-rubric gate on every answer); constitutions +1 per round (2 of 3
proposer batches per round skipped after 3 attempts: the model copies the examples' names;
round 2 merged one duplicate); revisions kept 2/12 and 4/12 (none passes the gates); SFT loss
1.30 -> 0.89 and 1.09 -> 0.78 (2 steps each). The constitutions are what a 135M model writes
(e.g. "Check facts: The assistant is wrong, it's not possible to stop taking your heart
medicine without consulting a doctor."): the run exercises the pipeline, it does not align
the model.

`:smoke` (tests): a tiny random policy/judge with the real tokenizer, 4 prompts per round,
sampled answers, every answer counted as a failure (detect='reward' with failure_reward=2),
all revisions kept, 2 SFT steps per round.
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "iteralign"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = ""  # the frozen base model judges
    c.judge.rubric = "demo"
    c.judge.batch_size = 8
    c.judge.max_context_tokens = 512

    ia = c.iteralign
    ia.sources = ((os.path.join(DATA, "redteam_prompts.jsonl"), -1),)
    ia.prompts_per_round = 12
    ia.max_rounds = 2
    ia.stop_failure_rate = 0.05
    ia.batch_size = 12
    ia.answer_max_tokens = 64
    ia.temperature = 0.0
    ia.detect = "gates"
    ia.proposer = ""  # on CPU the embedded model proposes too; pods use a larger model
    ia.proposer_max_tokens = 64
    ia.max_retries = 2
    ia.failures_per_call = 4
    ia.constitutions_per_call = 2
    ia.revision_max_tokens = 64
    # The 135M judge flags nearly every answer (a gate fires), revisions included, so 'passes'
    # would keep nothing here; keep revisions the judge scores higher than the failed answer.
    ia.keep = "improved"
    ia.gates_per_constitution = 1

    c.data.seq_len = 256  # chat prompt (with the default system prompt) + a 64-token revision
    c.data.on_overflow = "truncate"
    c.sft.global_batch_size = 4
    c.sft.num_epochs = 2
    c.sft.export_hf = False  # each round's weights are its orbax checkpoint (round_<r>/sft)
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_ratio = 0.0
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 1
    c.metrics.tensorboard = False

    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        ia.prompts_per_round = 4
        ia.batch_size = 4
        ia.answer_max_tokens = 8
        ia.revision_max_tokens = 8
        ia.temperature = 1.0  # greedy random weights pick a token that decodes to nothing
        ia.proposer_max_tokens = 8
        ia.detect = "reward"
        ia.failure_reward = 2.0  # every answer fails: random weights, the stages must all run
        ia.failures_per_call = 2
        ia.keep = "all"
        c.data.seq_len = 128
        c.sft.global_batch_size = 8  # divisible by the 8 fake devices of the tests
        c.sft.num_epochs = 0
        c.sft.num_steps = 2
        c.optimizer.lr = 1e-3
        c.checkpoint.async_save = False
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing.")
    return c
