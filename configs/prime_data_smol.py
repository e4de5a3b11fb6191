"""QA-LIGN reflection-priming data with the embedded SmolLM2-135M-Instruct on CPU.

Run:
  python -m qalign_jax.train --config configs/prime_data_smol.py --workdir workdirs/prime_smol
The policy drafts an answer to each of the 48 bundled prompts (24 harmful, 24 benign;
configs/data/prime_*.jsonl), the same model judges it on the demo rubric, the findings are
inserted, the policy writes `<Think>` + revision, the judge scores the revision, and examples
whose revision is not worse than the draft are kept. Outputs: prime_data.jsonl (everything),
prime_sft.jsonl (the SFT set for configs/sft_prime_smol.py via
--config.data.train_path=workdirs/prime_smol/prime_sft.jsonl), summary.json.
Killing the run and rerunning the same command skips the prompts already done.

`:demo`: 16 prompts and shorter generations, the first stage of `make demo`.
`:smoke` (tests): a tiny random policy and judge with the real tokenizer, 4 prompts, short
generations.
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "prime_data"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = ""  # the policy judges itself (one model in memory)
    c.judge.rubric = "demo"
    c.judge.batch_size = 8

    c.prime.sources = (
        (os.path.join(DATA, "prime_harmful.jsonl"), 24),
        (os.path.join(DATA, "prime_benign.jsonl"), 24),
    )
    c.prime.batch_size = 8
    c.prime.draft_max_tokens = 96
    c.prime.think_max_tokens = 64
    c.prime.revision_max_tokens = 96
    c.prime.temperature = 0.7
    c.prime.top_p = 0.95
    c.prime.keep = "not_worse"

    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        c.prime.sources = (
            (os.path.join(DATA, "prime_harmful.jsonl"), 2),
            (os.path.join(DATA, "prime_benign.jsonl"), 2),
        )
        c.prime.batch_size = 2
        c.prime.draft_max_tokens = 12
        c.prime.think_max_tokens = 8
        c.prime.revision_max_tokens = 12
        c.prime.keep = "all"
    elif (
        arg == "demo"
    ):  # the size of `make demo`'s pipeline stage (configs/qalign_pipeline_smol.py)
        c.prime.sources = (
            (os.path.join(DATA, "prime_harmful.jsonl"), 8),
            (os.path.join(DATA, "prime_benign.jsonl"), 8),
        )
        c.prime.draft_max_tokens = 64
        c.prime.think_max_tokens = 48
        c.prime.revision_max_tokens = 64
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke', ':demo' or nothing.")
    return c
