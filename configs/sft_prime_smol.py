"""QA-LIGN priming SFT of the embedded SmolLM2-135M-Instruct on CPU (draft -> <Think> -> revision).

Run (27 steps of about 10-40 s on a 2-core CPU, plus about a minute of loading and compiling;
the measured run below took 20 minutes on a machine shared with other jobs):
  python -m qalign_jax.train --config configs/sft_prime_smol.py --workdir workdirs/sft_smol
Trains 3 epochs over the 36 training examples of configs/data/sft_reflection_example.jsonl
(4 held out for eval), batch 4 x 256 tokens, fp32, AdamW lr 1e-4 (10% warmup, cosine to 1e-5).
Only the draft and the `<Think>` + revision segments are trained; the inserted rubric findings
are not. Measured (seed 0): train loss 4.16 at the first step, 1.27 at the last; mean train loss
per epoch 3.27, 2.03, 1.54; eval loss 3.49 before training, 2.56 after epoch 1, 2.39 after
epochs 2 and 3 (eval token accuracy 0.37 -> 0.52). Checkpoints go to workdirs/sft_smol/ckpt
(every 9 steps, newest 2 kept), metrics to metrics.jsonl, the final weights to workdirs/sft_smol/hf
as a Hugging Face directory that `configs/generate_smol.py` loads with
--config.model.source=workdirs/sft_smol/hf. Killing the run and rerunning the same command
resumes from the newest checkpoint.

`:demo`: the second stage of `make demo` (configs/qalign_pipeline_smol.py), which points
data.train_path at the priming stage's prime_sft.jsonl: 3 epochs, 2 examples held out.
`:best_of_n`: SFT on the rejection-sampling data of configs/best_of_n_compose_smol.py (the
composed-reward run's priming): 2 epochs, batch 8 x 128 tokens, lr 3e-5. Two rounds' files
train together as `--config.data.train_path=workdirs/bon1/sft.jsonl,workdirs/bon2/sft.jsonl`
(376 rows: 12 min, 5.3 GB peak RSS on the 2-core CPU).
`:smoke` (tests; about 30 s): a tiny random Llama sized to the real tokenizer
(`random:tiny` + `model.tokenizer='embedded'`), 16 training examples truncated to 128 tokens,
20 steps of batch 8 at a high learning rate, so the loss visibly falls by overfitting.
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "sft"
    c.seed = 0
    c.model.source = "embedded"
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # bf16 matmuls are slower than fp32 on most CPUs
    c.mesh.shape = (1, -1, 1)

    c.data.train_path = os.path.join(DATA, "sft_reflection_example.jsonl")
    c.data.eval_size = 4
    c.data.seq_len = 256  # the examples have 141-212 tokens with the default system prompt
    c.data.on_overflow = "error"

    c.sft.global_batch_size = 4
    c.sft.grad_accum_steps = 1
    c.sft.num_epochs = 3
    c.sft.eval_every = 9  # once per epoch
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.max_grad_norm = 1.0
    c.checkpoint.every_steps = 9
    c.checkpoint.keep = 2

    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        c.data.max_examples = 20
        c.data.eval_size = 2
        c.data.seq_len = 128  # cut the answers' tails: a quarter of the cost of 256
        c.data.on_overflow = "truncate"
        c.sft.global_batch_size = 8  # divisible by the 8 fake devices of the tests
        c.sft.num_epochs = 0
        c.sft.num_steps = 20
        c.sft.eval_every = 10
        c.optimizer.lr = 3e-3
        c.checkpoint.every_steps = 5
        c.checkpoint.keep = 2
    elif arg == "demo":  # `make demo`'s stage: trains on the priming stage's kept examples
        c.data.eval_size = 2
        c.data.seq_len = 384
        c.data.on_overflow = "truncate"
        c.sft.num_epochs = 3
        c.sft.eval_every = 0
        c.checkpoint.every_steps = 0
        c.checkpoint.keep = 1
    elif arg == "best_of_n":  # on best_of_n's sft.jsonl (configs/best_of_n_compose_smol.py)
        c.data.train_path = "workdirs/bon_smol/sft.jsonl"
        c.data.eval_size = 8
        c.data.seq_len = 128  # prompt + a 48-token answer
        c.data.on_overflow = "truncate"
        c.sft.global_batch_size = 8
        c.sft.num_epochs = 2
        c.sft.eval_every = 0
        c.optimizer.lr = 3e-5
        c.checkpoint.every_steps = 0
        c.checkpoint.keep = 1
    elif arg:
        raise ValueError(
            f"unknown config argument {arg!r}; use ':smoke', ':demo', ':best_of_n' or nothing."
        )
    return c
