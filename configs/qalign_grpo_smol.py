"""QA-LIGN GRPO of the embedded SmolLM2-135M-Instruct on CPU: two-pass rollouts, demo rubric.

Run (after the priming stages, or alone from the base model):
  python -m qalign_jax.train --config configs/qalign_grpo_smol.py --workdir workdirs/grpo_smol \
    --config.checkpoint.init=workdirs/sft_smol \
    --config.grpo.priming_data=workdirs/prime_smol/prime_data.jsonl
Each step: 2 prompts x G=4 samples; the policy drafts (48 tokens), the base model (frozen)
judges the drafts on the demo rubric, the findings are inserted, the policy reflects and
revises (160 tokens), the judge scores the revisions; two-pass reward (alpha 10, beta 1), group
advantages, one update of the clipped objective with KL 0.04 to the reference. Prompts: the
16 bundled in configs/data/grpo_prompts.jsonl (8 harmful, 8 benign), disjoint from the
priming prompts (checked against grpo.priming_data when it is set).
`:demo` (4 steps, revision 96 tokens) is the GRPO stage of `make demo`.
`:scalar` is the scalar-reward baseline (judge.rubric='scalar'), `:single` the single-pass
ablation. `:gspo` trains with GSPO's sequence ratio (arXiv 2507.18071, its clip range);
`:dapo` with DAPO's recipe (arXiv 2503.14476): clip-higher, token-mean loss, no KL, dynamic
sampling (resample) and the soft overlong penalty.
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "grpo"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)

    c.judge.source = ""  # the base model, frozen, judges
    c.judge.rubric = "demo"
    c.judge.batch_size = 8
    # Soft gates: the 135M judge answers "Yes" to some gate of nearly every response, so with
    # argmax gates (the paper's) every reward hits the floor and the group advantages are all 0.
    c.reward.gate_readout = "expected"

    g = c.grpo
    g.sources = ((os.path.join(DATA, "grpo_prompts.jsonl"), -1),)  # 16, none used for priming
    g.on_overlap = "error"
    g.prompts_per_step = 2
    g.num_generations = 4
    g.num_steps = 10
    g.two_pass = True
    g.draft_max_tokens = 48
    g.revision_max_tokens = 160  # the primed policy reflects at length before </Think>
    g.max_prompt_tokens = 96
    g.temperature = 1.0
    g.max_findings = 4
    g.kl_beta = 0.04
    g.rollouts_every = 5
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.min_lr_ratio = 1.0  # constant lr
    c.checkpoint.every_steps = 5
    c.checkpoint.keep = 2
    if arg == "scalar":  # the paper's baseline: one holistic judge question, all else the same
        c.judge.rubric = "scalar"
    elif arg == "single":  # the ablation without reflection
        g.two_pass = False
    elif arg == "gspo":  # sequence-level ratio, clipped per sequence; the paper's tight range
        g.loss = "gspo"
        g.clip_low, g.clip_high = 3e-4, 4e-4
    elif arg == "dapo":
        g.clip_low, g.clip_high = 0.2, 0.28
        g.aggregation = "token_mean"
        g.kl_beta = 0.0
        g.dynamic_sampling = "resample"
        g.max_resample_rounds = 2
        g.overlong = "soft_penalty"
        g.overlong_cache_tokens = 32  # of revision_max_tokens = 160
    elif arg == "demo":  # `make demo`'s GRPO stage (configs/qalign_pipeline_smol.py)
        g.num_steps = 4
        g.grad_accum_steps = 2  # with the pipeline's remat 'full' and logits_chunk: peak memory
        c.judge.batch_size = 4  # the judge's scoring temporaries: 1.0 GB instead of 2.0 (plan)
        g.revision_max_tokens = 96
        g.rollouts_every = 2
        c.checkpoint.every_steps = 2
        c.checkpoint.keep = 1
    elif arg:
        raise ValueError(
            f"unknown config argument {arg!r}; use ':scalar', ':single', ':gspo', ':dapo', "
            "':demo' or nothing."
        )
    return c
