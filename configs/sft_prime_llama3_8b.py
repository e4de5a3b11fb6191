"""QA-LIGN priming SFT of Llama-3.1-8B-Instruct on a Cloud TPU v5p-64 slice (one epoch).

Run on every host of the slice (all hosts take part in every program):
  gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd qalign_jax && \
    .venv/bin/python -m qalign_jax.train --config configs/sft_prime_llama3_8b.py \
    --workdir gs://BUCKET/workdirs/sft_prime_8b \
    --config.model.source=/mnt/shared/models/Llama-3.1-8B-Instruct \
    --config.data.train_path=/mnt/shared/data/qalign_priming.jsonl"
The model source is a local Hugging Face directory (safetensors) on every host and the workdir
gs://BUCKET/... or a filesystem every host sees (NFS/Filestore): orbax writes each host's
shards there and process 0 writes metrics.jsonl and the final bf16 Hugging Face export,
workdir/hf. The training set is the priming-data stage's output
(configs/prime_data_llama3_8b.py writes <workdir>/prime_sft.jsonl); without the flag,
train_path defaults to the 40 hand-written examples in configs/data/ (a 2-step run that only
checks the plumbing).

Mesh: v5p-64 = 32 chips (4 per host, 8 hosts), each 95 GB HBM and 459 TFLOP/s dense bf16.
Pure FSDP: mesh (data, fsdp, tensor) = (1, 32, 1); every parameter and Adam moment is split 32
ways along its `embed` dimension; the batch (32 rows, one per chip) is split the same way.

Memory per chip (8.03e9 parameters, fp32 master weights, bf16 compute, remat 'full'):
  params fp32             8.03e9 * 4 B = 32.1 GB / 32 = 1.00 GB
  Adam mu + nu fp32       2 * 32.1 GB  = 64.2 GB / 32 = 2.01 GB
  gradients fp32          accumulator + one micro-batch's = 2 * 1.00 GB   = 2.01 GB
  optimizer temporaries   about one parameter-sized buffer               ~ 1.0 GB
  gathered bf16 weights   one block (218M * 2 B = 0.44 GB), double-buffered ~ 0.9 GB
  activations, 1 x 2048 tokens per chip:
    block inputs kept by remat: 32 layers * 2048 * 4096 * 2 B            = 0.54 GB
    one block recomputed: attention scores fp32 [32, 2048, 2048] 0.54 GB,
      probabilities and their gradients ~1 GB, MLP [2048, 14336] x 3 bf16 0.18 GB ~ 1.7 GB
    logits fp32 [2048, 128256] 1.05 GB, log-softmax and its gradient        ~ 3.2 GB
  total                                                                   ~ 12-13 GB of 95 GB
so the per-chip micro-batch could grow to 4 rows (global batch 128) before memory matters.

Expected step time (32 rows * 2048 tokens = 65,536 tokens per step):
  model FLOPs  = 6 * 8.03e9 * 65,536                     = 3.16e15 per step
  slice peak   = 32 chips * 459e12 FLOP/s                = 1.47e16 FLOP/s
  at an assumed 40% MFU: 3.16e15 / (1.47e16 * 0.40)      = 0.54 s per step
  (0.72 s at 30% MFU; full remat recomputes the forward, so 40% MFU is ~53% of the hardware's
  FLOPs; attention's 12 * L * T * 4096 FLOPs per token add 7% to the model FLOPs.)
One epoch of ~500 priming examples is 16 steps, about 10 s of training, plus about 2-3 min of
compilation, about a minute per checkpoint (96 GB of fp32 state) and the 16 GB bf16 export.
These are estimates from the arithmetic above, not measurements.

`:smoke` runs the same config shrunk to a tiny random model on a laptop CPU (2 steps).
"""

import os

from qalign_jax import config as base

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base.base_config()
    c.loop = "sft"
    c.seed = 0
    c.model.source = "Llama-3.1-8B-Instruct"  # a local HF directory; override on the command line
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.shape = (1, -1, 1)  # (1, 32, 1) on a v5p-64

    c.data.train_path = os.path.join(DATA, "sft_reflection_example.jsonl")
    c.data.eval_size = 16
    c.data.seq_len = 2048  # QA-LIGN's longest sequences are 1,536 tokens
    c.data.on_overflow = "truncate"

    c.sft.global_batch_size = 32  # one row per chip
    c.sft.grad_accum_steps = 1
    c.sft.num_epochs = 1  # QA-LIGN primes for one epoch
    c.sft.eval_every = 8
    c.sft.export_dtype = "bfloat16"
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.max_grad_norm = 1.0
    c.checkpoint.every_steps = 8
    c.checkpoint.keep = 2

    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"
        c.model.dtype = "float32"
        c.data.seq_len = 128
        c.data.eval_size = 4
        c.sft.global_batch_size = 8
        c.sft.num_steps = 2
        c.sft.export_dtype = ""
        c.checkpoint.every_steps = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing.")
    return c
