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
    c.generate.prompts_file = ""  # JSONL (id, prompt, ...); overrides `prompts` if set
    c.generate.system_prompt = ""  # '' = the chat template's own default
    c.generate.batch_size = 8
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0  # 0 = greedy
    c.generate.top_k = 0  # 0 = off
    c.generate.top_p = 1.0  # 1 = off

    # Training data (`data.py`). SFT JSONL lines: {"id", "prompt", "segments": [{"text",
    # "train"}, ...]} or {"id", "prompt", "completion"}.
    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # SFT JSONL to train on (required by the sft loop)
    c.data.eval_path = ""  # held-out SFT JSONL; '' = hold out `eval_size` of train_path
    c.data.eval_size = 0  # examples held out of train_path (by a hash of seed and id); 0 = none
    c.data.max_examples = 0  # use only the first N training examples; 0 = all
    c.data.system_prompt = ""  # system message of every example; '' = the template's default
    c.data.seq_len = 1024  # tokens per batch row (chat-template prompt + answer + end of turn)
    c.data.on_overflow = "error"  # example longer than seq_len: 'error' | 'truncate' (drop tail)

    # The SFT loop (`loops/sft.py`).
    c.sft = ml_collections.ConfigDict()
    c.sft.global_batch_size = 8  # examples per optimizer step, all micro-batches together
    c.sft.grad_accum_steps = 1  # micro-batches per step (each global_batch_size / this rows)
    c.sft.num_epochs = 1  # passes over the training examples
    c.sft.num_steps = 0  # > 0: train exactly this many steps instead of num_epochs
    c.sft.eval_every = 0  # eval loss every N steps (also at step 0 and at the end); 0 = ends only
    c.sft.export_hf = True  # write the final params as a Hugging Face directory, workdir/hf
    c.sft.export_dtype = ""  # dtype of the exported weights; '' = model.param_dtype

    # AdamW with linear warmup and cosine decay, clipped by global norm (`sft.make_optimizer`).
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-5  # peak learning rate
    c.optimizer.warmup_ratio = 0.03  # fraction of the steps warming up linearly from 0
    c.optimizer.min_lr_ratio = 0.0  # final lr of the cosine decay, as a fraction of lr
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0  # decoupled; never applied to norm weights
    c.optimizer.max_grad_norm = 1.0  # clip the global gradient norm to this; 0 = no clipping

    # Checkpoints (`checkpoint.py`): orbax in workdir/ckpt, resumed automatically.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # save every N steps (and always at the end); 0 = end only
    c.checkpoint.keep = 3  # newest checkpoints kept; 0 = all
    c.checkpoint.async_save = True  # write in the background while training continues
    c.checkpoint.init = ""  # initial params: a previous stage's workdir or a HF dir ('' = model)

    # Metrics (`metrics.py`): workdir/metrics.jsonl, console, optional TensorBoard.
    c.metrics = ml_collections.ConfigDict()
    c.metrics.log_every = 1  # console progress line every N steps (JSONL gets every step)
    c.metrics.tensorboard = True  # also write workdir/tb if tensorboardX or tensorflow exists

    c.lock()
    return c
