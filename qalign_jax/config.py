"""The base config: every key any experiment may set, with its default and meaning.

Experiment files in `configs/` start from `base_config()`, which is *locked*: assigning a key
that does not exist here (a typo) raises at once, and so does `--config.not.a.key=1` on the
command line. A stage that needs new settings adds them here, documented, so that one file
lists the whole surface.
"""

import ml_collections

from qalign_jax import sharding


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loop = "generate"  # which loop `qalign_jax.train` runs; see train.LOOPS
    c.seed = 0  # the one seed of a run; loops split it, steps fold in the step number
    c.distributed = "auto"  # jax.distributed.initialize(): 'auto' | 'on' | 'off'

    # The model: 'embedded' | path/to/model.gguf | path/to/hf_dir | 'random:<preset>'.
    c.model = ml_collections.ConfigDict()
    c.model.source = "embedded"
    c.model.tokenizer = ""  # tokenizer source for random-weight models ('' = none)
    c.model.param_dtype = "float32"  # storage dtype of the weights
    c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
    c.model.remat = "none"  # 'none' | 'full' | 'dots' (see llama.REMAT_POLICIES)

    # Devices: (data, fsdp, tensor); one -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES  # (logical axis, mesh axes) pairs

    # Generation (the `generate` loop and the chat CLI).
    c.generate = ml_collections.ConfigDict()
    c.generate.prompts = ("What is the capital of France?",)
    c.generate.prompts_file = ""  # JSONL with a `prompt` field; overrides `prompts` if set
    c.generate.system_prompt = ""  # '' = the chat template's own default
    c.generate.batch_size = 8
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0  # 0 = greedy
    c.generate.top_k = 0  # 0 = off
    c.generate.top_p = 1.0  # 1 = off

    c.lock()
    return c
