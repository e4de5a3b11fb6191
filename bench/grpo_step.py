"""GRPO step time split into sampling / judging / training, and the paper-scale projection.

  .venv/bin/python bench/grpo_step.py                 # CPU: configs/qalign_grpo_smol.py, 3 steps
  python bench/grpo_step.py --gpu-8b                  # GPU: llama3_1_8b shapes, random weights

Runs the real loop (`loops/grpo.run`) for a few steps in a temporary workdir and reads the
per-step times it logs (`time/sampling_s`, `time/judging_s`, `time/training_s`); the first step
(compilation) is left out of the averages. No baseline runs here: the comparison is the
paper's reported cost, through the projection below (GPU mode):

  rollouts in the paper's run  = 100 steps x 16 prompts x G = 5          = 8,000
  our seconds per rollout      = step time / rollouts per measured step
  projected GPU-hours          = 8,000 x seconds per rollout / 3,600 (policy + judge on 1 GPU)
Target: <= 4 H200-hours (the paper reports about 40).
"""

import argparse
import json
import os
import tempfile

import numpy as np

from qalign_jax import config as config_lib
from qalign_jax import train
from qalign_jax.metrics import read_metrics

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAPER_ROLLOUTS = 100 * 16 * 5


def load_config(name):
    return config_lib.load_file(os.path.join(ROOT, "configs", name))


def gpu_8b_config(rows: int):
    """llama3_1_8b shapes, random weights, bf16 params and Adam, on one H200 (141 GB).

    Memory: frozen initial weights (reference and judge, 16 GB) + trained params (16 GB) +
    Adam (32 GB) + gradients (16 GB) + caches and activations; it does not fit an 80 GB H100.
    The judge is the frozen initial policy (an 8B judge of the same shape, as in the paper).
    """
    c = load_config("qalign_grpo_smol.py")
    c.model.source, c.model.tokenizer = "random:llama3_1_8b", "embedded"
    c.model.param_dtype, c.model.dtype, c.model.remat = "bfloat16", "bfloat16", "full"
    c.judge.source, c.judge.rubric = "", "default"
    c.judge.batch_size, c.judge.question_chunk = 16, 64
    c.grpo.prompts_per_step, c.grpo.num_generations = rows // 5, 5
    c.grpo.draft_max_tokens, c.grpo.revision_max_tokens = 384, 640
    c.grpo.max_prompt_tokens, c.grpo.on_long_prompt = 256, "drop"
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu-8b", action="store_true")
    ap.add_argument("--rows", type=int, default=20, help="GPU: rollouts per step (B x 5)")
    args = ap.parse_args()
    config = gpu_8b_config(args.rows) if args.gpu_8b else load_config("qalign_grpo_smol.py")
    config.grpo.num_steps = args.steps
    config.grpo.export_hf = False
    config.checkpoint.every_steps = 0
    config.metrics.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        train.run(config, workdir)
        rows = [r for r in read_metrics(workdir) if "time/step_s" in r][1:]  # skip compilation
    keys = ("sampling_s", "judging_s", "training_s", "step_s")
    mean = {k: float(np.mean([r[f"time/{k}"] for r in rows])) for k in keys}
    n_rows = config.grpo.prompts_per_step * config.grpo.num_generations
    result = {"mode": "gpu_8b" if args.gpu_8b else "cpu_smol", "steps_averaged": len(rows),
              "rollouts_per_step": n_rows, **mean}  # fmt: skip
    other = mean["step_s"] - mean["sampling_s"] - mean["judging_s"] - mean["training_s"]
    print(f"{result['mode']}: {n_rows} rollouts per step, mean of {len(rows)} steps")
    for k in keys[:3]:
        print(f"  {k[:-2]:9s} {mean[k]:8.2f} s  ({100 * mean[k] / mean['step_s']:4.1f}%)")
    print(f"  other     {other:8.2f} s\n  step      {mean['step_s']:8.2f} s")
    if args.gpu_8b:
        per_rollout = mean["step_s"] / n_rows
        hours = PAPER_ROLLOUTS * per_rollout / 3600
        result.update(seconds_per_rollout=per_rollout, projected_gpu_hours=hours)
        print(f"projection: {PAPER_ROLLOUTS} rollouts x {per_rollout:.2f} s / 3600 = "
              f"{hours:.2f} GPU-hours (target <= 4 H200-hours; paper ~40)")  # fmt: skip
    out = os.path.join(ROOT, "bench", "results", f"grpo_step_{result['mode']}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", os.path.normpath(out))


if __name__ == "__main__":
    main()
