"""QA-LIGN GRPO of Llama-3.1-8B-Instruct with LoRA adapters, on one 80 GB GPU (H100/A100-80GB).

  python -m qalign_jax.train --config configs/qalign_grpo_llama3_8b_lora.py \
    --workdir workdirs/grpo_8b_lora \
    --config.model.source=/models/Llama-3.1-8B-Instruct

The paper's GRPO settings (configs/qalign_grpo_llama3_8b.py: 16 prompts x G = 5, two-pass,
167-question rubric, KL 0.04, 100 steps) with rank-16 adapters on every projection instead of
full fine-tuning. One frozen bfloat16 copy of the base is the policy's base, the KL reference
(adapters off) and the judge (the paper's judge is the same base model; judge.source = ''), so
the weights are held once; Adam and the gradients are the adapters' (42M parameters, 0.5%).
The run writes the merged weights to workdir/hf and the adapters as a PEFT directory to
workdir/adapter. checkpoint.init is left empty: a primed (SFT) base would be a second frozen
copy beside the judge (+16 GB: peak 71.8 GB, 90%, at the edge of the plan's margin). Prime
with LoRA instead and pass its adapters, --config.model.lora.init=<sft workdir>/adapter: the
start and the KL reference are then the base with those adapters, still one base copy.

Memory per device, `python -m qalign_jax.plan --config configs/qalign_grpo_llama3_8b_lora.py
--preset llama3_1_8b --accelerator h100 --num_devices 1` (estimates: the parameter-shaped rows
are exact, activations come from the CPU fit of plan.py):
  params (the frozen base, bf16)              16.06 GB
  LoRA adapters (f32)                          0.17 GB
  optimizer (Adam mu, nu)                      0.34 GB
  gradients + step temporaries (f32)           0.44 GB
  activations (remat full)                    11.34 GB  (8 rows x 1,600 tokens per micro-batch)
  decode weights (compute dtype)              16.06 GB  (the sampler's merged, transposed copy)
  KV cache, both passes                       18.79 GB  (80 rows x 1,792 slots)
  judge prefix cache                           4.30 GB
  phase: train 28.3 GB; phase: rollout 55.7 GB; peak 55.7 GB of 80 GB (70%): fits.
Full fine-tuning of the same step on one device (configs/qalign_grpo_llama3_8b.py with
--config.mesh.shape="(1,1,1)", grad_accum_steps 10, logits_chunk 256): fp32 master weights,
Adam, gradients and two frozen copies, peak 255 GB: does not fit.
`:v5p`: the same run on a v5p-8 slice (4 chips, mesh (1, 4, 1)): peak 14.2 GB per chip.
"""

import os

from qalign_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    # the full fine-tuning run's settings (prompts, rubric, rollouts, KL, schedule), then LoRA's
    c = config_lib.load_file(os.path.join(HERE, "qalign_grpo_llama3_8b.py"))
    c.model.param_dtype = "bfloat16"  # the frozen base; the adapters are float32 regardless
    c.model.logits_chunk = 256  # the [rows, T, 128k] float32 logits never exist whole
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    c.mesh.shape = (1, -1, 1)
    c.judge.source = ""  # the base model judges (adapters off): no second copy
    c.grpo.grad_accum_steps = 10  # 8 rows per micro-batch
    c.optimizer.lr = 1e-5  # LoRA takes a larger step than full fine-tuning's 1e-6
    if arg == "v5p":
        c.mesh.shape = (1, 4, 1)  # 80 rollout rows over 4 chips
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'v5p' or none.")
    return c
