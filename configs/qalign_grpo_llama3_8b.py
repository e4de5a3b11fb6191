"""QA-LIGN GRPO of Llama-3.1-8B-Instruct with the paper's settings, on a Cloud TPU v5p-64 slice.

Run on every host (the policy, primed by configs/sft_prime_llama3_8b.py, and the judge as local
Hugging Face directories; the workdir on a filesystem every host sees):
  python -m qalign_jax.train --config configs/qalign_grpo_llama3_8b.py \
    --workdir /mnt/shared/workdirs/grpo_8b \
    --config.model.source=/mnt/shared/models/Llama-3.1-8B-Instruct \
    --config.checkpoint.init=/mnt/shared/workdirs/sft_prime_8b \
    --config.judge.source=/mnt/shared/models/Llama-3.1-8B-judge \
    --config.grpo.priming_data=/mnt/shared/workdirs/prime_8b/prime_data.jsonl
Paper settings: 1,600 prompts disjoint from the 500 priming prompts (an overlap is an error),
G = 5 samples per prompt, 100 steps (16 prompts x 5 = 80 rollouts per step), the default
167-question rubric, two-pass rollouts, alpha 10, beta 1, KL 0.04, lr 1e-6, bf16 compute with
fp32 master weights, sequences up to 1,536 tokens. Prompts: AdvBench, HarmfulQA and
CategoricalHarmfulQA from $QALIGN_DATA (default ./data) stand in for WildJailbreak.

Mesh (data, fsdp, tensor) = (1, 16, 2) on 32 chips (95 GB HBM each): the 80 rollout rows
must divide over data x fsdp, so FSDP is 16-way and the rest is tensor parallel (heads, MLP);
(1, 16, 4) on 64 chips. `python -m qalign_jax.aot` compiles this config for a 64-device mesh
(tests/test_aot.py). Memory per chip (every parameter is still split 32 ways):
  policy params fp32 + Adam mu, nu            32.1 GB x 3 / 32 = 3.0 GB
  gradients fp32                               32.1 GB / 32     = 1.0 GB
  primed reference and judge, frozen, in model.param_dtype (fp32; model.source's own
    weights are not loaded: both roles are taken)  2 x 32.1 GB / 32 = 2.0 GB
  sampler KV cache, 80 rows x 1,536 slots x 32 layers x 8 kv heads x 128 x 2 (k, v) x 2 B
                                               = 32 GB / 32     = 1.0 GB
  judge prefix caches (16 responses x 2 option sets x 1,024) and question chunks (16 x 64 x 44)
                                               ~ 11 GB / 32     ~ 0.3 GB
  training activations, remat 'full', 80 rows x 1,536 tokens / 32 chips (4 rows per chip):
    block inputs 32 x 4 x 1,536 x 4,096 x 2 B = 1.6 GB; logits and log-softmax (fp32,
    4 x 1,536 x 128,256 x 4 B x ~3) ~ 9.5 GB; one recomputed block ~ 2 GB  ~ 13 GB
  total ~ 21 GB of 95 GB.
These are estimates from the arithmetic above, not measurements.
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "grpo"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # a local HF directory; override on the command line
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.shape = (1, 16, -1)  # 80 rows per step: fsdp must divide 80

    c.judge.source = "Llama-3.1-8B-judge"
    c.judge.rubric = "default"
    c.judge.batch_size = 16
    c.judge.question_chunk = 64

    g = c.grpo
    g.sources = (
        (os.path.join(DATA, "advbench", "advbench.jsonl"), -1),
        (os.path.join(DATA, "red_instruct", "harmfulqa.jsonl"), 830),
        (os.path.join(DATA, "red_instruct", "catqa_english.jsonl"), 250),
    )
    g.priming_data = ""  # set to the priming stage's prime_data.jsonl (see above)
    g.on_overlap = "error"
    g.prompts_per_step = 16
    g.num_generations = 5
    g.num_steps = 100
    g.two_pass = True
    g.draft_max_tokens = 384
    g.revision_max_tokens = 640
    g.max_prompt_tokens = 256
    g.on_long_prompt = "drop"
    g.temperature = 1.0
    g.kl_beta = 0.04
    g.grad_accum_steps = 1
    g.rollouts_every = 10
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.1
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; this config takes none.")
    return c
