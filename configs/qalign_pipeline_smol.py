"""The QA-LIGN pipeline end to end on the embedded SmolLM2-135M-Instruct, on a CPU: `make demo`.

Run:
  python -m qalign_jax.train --config configs/qalign_pipeline_smol.py --workdir workdirs/demo
Four stages (`qalign_jax/loops/pipeline.py`), each a normal config run at its `:demo` size:
  1. priming data (configs/prime_data_smol.py:demo): 16 bundled prompts (8 harmful, 8 benign);
     the model drafts, judges itself on the demo rubric, reflects after `<Think>` and revises;
     revisions not worse than their drafts are kept.
  2. SFT priming (configs/sft_prime_smol.py:demo) on the kept examples.
  3. GRPO (configs/qalign_grpo_smol.py:demo) from the primed weights: two-pass rollouts judged
     by the base model, 2 prompts x G=4 per step.
  4. before/after: the base model and the final policy answer 8 held-out prompts
     (configs/data/eval_prompts.jsonl) greedily, two-pass, judged on the demo rubric.
The console shows each stage's progress and a summary at the end; outputs are in
workdirs/demo/{1_prime,2_sft,3_grpo,4_eval} and workdirs/demo/summary.json. Rerunning the
command resumes (finished stages are skipped). Measured (seed 0, a quiet 2-core AMD EPYC,
2026-12-06, remat 'full', logits_chunk 64, the GRPO judge 4 responses per prefill,
`/usr/bin/time -v`): with MALLOC_ARENA_MAX=2 (as `make demo` sets it) 10m55s in all and a peak
resident memory of 5.9 GB; without it 10m04s and 6.8 GB, the GRPO stage's memory growing ~1.4 GB
over its 4 steps (glibc keeping freed memory in per-thread arenas). Priming 1m44s-2m15s (11/16
kept), SFT 2m21s (9 steps, loss 1.21 -> 0.51), GRPO 4m39s-5m05s (4 steps of ~60 s: sampling
13 s, judging 14 s, training 31 s), before/after ~1m. 2026-12-05: 7.6 GB; 2026-12-04, remat
'none': 16.8 GB.
Each stage's full-size config runs alone.
`:smoke` (tests): a tiny random model with the real tokenizer through the same four stages.
"""

import os

from qalign_jax import config as base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    c = base.base_config()
    c.loop = "pipeline"
    c.seed = 0
    c.model.source = "embedded"
    # Recompute each layer's activations in the backward pass: the GRPO stage's train step
    # plans 5.0 GB instead of 16.7 GB (`python -m qalign_jax.plan`), for one more forward.
    c.model.remat = "full"
    c.model.logits_chunk = 64  # the training losses' head 64 positions at a time (memory)
    c.mesh.shape = (1, -1, 1)
    size = "demo"
    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        size = "smoke"
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing.")
    c.pipeline.prime = os.path.join(HERE, f"prime_data_smol.py:{size}")
    c.pipeline.sft = os.path.join(HERE, f"sft_prime_smol.py:{size}")
    grpo = "qalign_grpo_smoke.py" if size == "smoke" else "qalign_grpo_smol.py:demo"
    c.pipeline.grpo = os.path.join(HERE, grpo)
    c.pipeline.eval_sources = ((os.path.join(HERE, "data", "eval_prompts.jsonl"), -1),)
    return c
