"""GRPO step time split into sampling / judging / training, and the paper-scale projection.

  .venv/bin/python bench/grpo_step.py                 # CPU: configs/qalign_grpo_smol.py, 3 steps
  .venv/bin/python bench/grpo_step.py --vs-trl        # CPU: ours against TRL's GRPOTrainer
  python bench/grpo_step.py --gpu-8b                  # GPU: llama3_1_8b shapes, random weights

Runs the real loop (`loops/grpo.run`) for a few steps in a temporary workdir and reads the
per-step times it logs (`time/sampling_s`, `time/judging_s`, `time/training_s`); the first step
(compilation) is left out of the averages. No baseline runs here: the comparison is the
paper's reported cost, through the projection below (GPU mode):

  rollouts in the paper's run  = 100 steps x 16 prompts x G = 5          = 8,000
  our seconds per rollout      = step time / rollouts per measured step
  projected GPU-hours          = 8,000 x seconds per rollout / 3,600 (policy + judge on 1 GPU)
Target: <= 4 H200-hours (the paper reports about 40).

`--vs-trl` runs our loop and TRL's `GRPOTrainer` one after the other in this process, on the
same model, prompts, shape and reward (`vs_trl_config`): the embedded SmolLM2-135M in fp32,
16 prompts x G = 4 single-pass completions of at most 64 tokens, KL 0.04 to a frozen reference,
one update per batch, lr 1e-5. TRL's reward function calls our judge (the one-question `scalar`
rubric on the same frozen model), so judging is the same work on both sides and the comparison
is sampling + training. Each side's step is split into sampling / judging / training; TRL's by
timing its `model.generate` calls and the reward function inside each optimizer step. Both use
`--threads` CPU threads (torch's intra-op pool; XLA:CPU's own). Never run this under the
tests' 8-fake-device XLA flag.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from qalign_jax import config as config_lib
from qalign_jax import train
from qalign_jax.loops import grpo as grpo_loop
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


def vs_trl_config():
    """The 2026-12-04 comparison shape: single pass, 16 x G=4, <= 64 new tokens, scalar judge."""
    c = load_config("qalign_grpo_smol.py")
    c.judge.rubric = "scalar"
    g = c.grpo
    g.two_pass, g.prompts_per_step, g.num_generations = False, 16, 4
    g.draft_max_tokens, g.max_prompt_tokens = 64, 96
    g.rollouts_every = 0
    c.mesh.shape = (1, -1, 1)
    return c


def mean_split(rows: list[dict]) -> dict:
    keys = ("sampling_s", "judging_s", "training_s", "step_s")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def run_ours(config, workdir: str) -> list[dict]:
    """Per-step times of our loop (`time/*` in its metrics), compilation step included."""
    train.run(config, workdir)
    rows = [r for r in read_metrics(workdir) if "time/step_s" in r]
    return [{k: r[f"time/{k}"] for k in ("sampling_s", "judging_s", "training_s", "step_s")}
            | {"row_width": r.get("train/row_width"), "span_width": r.get("train/span_width")} for r in rows]  # fmt: skip


def run_trl(config, workdir: str, threads: int) -> list[dict]:
    """Per-step times of TRL's GRPOTrainer at `config`'s shape, compilation-free by nature."""
    import datasets
    import torch
    import transformers
    import trl

    from qalign_jax import judge as judge_lib
    from qalign_jax import sharding
    from qalign_jax.models import hf, load

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    g = config.grpo
    mesh = sharding.make_mesh(config.mesh.shape)
    ours = load.from_config(config, mesh)  # the judge's weights, and the policy's HF copy
    hf_dir = os.path.join(workdir, "hf")
    hf.export_hf(hf_dir, ours.cfg, ours.params, ours.tokenizer)
    judge = judge_lib.from_config(config, ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    prompts = [r.prompt for r in grpo_loop.read_prompts(config)]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                          for p in prompts])  # fmt: skip
    timers = {"sampling_s": 0.0, "judging_s": 0.0}

    def reward(prompts, completions, **unused):
        t0 = time.perf_counter()
        pairs = [(p[-1]["content"], c[-1]["content"]) for p, c in zip(prompts, completions)]
        scores = [v.scores.reward for v in judge_lib.score_pairs(judge, pairs)]
        timers["judging_s"] += time.perf_counter() - t0
        return scores

    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        timers["sampling_s"] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    steps = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timers.update(sampling_s=0.0, judging_s=0.0, t0=time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - timers["t0"]
            t = {k: timers[k] for k in ("sampling_s", "judging_s")}
            steps.append({**t, "step_s": step_s, "training_s": step_s - sum(t.values())})

    rows = g.prompts_per_step * g.num_generations
    args = trl.GRPOConfig(
        output_dir=os.path.join(workdir, "trl"), max_steps=g.num_steps, learning_rate=1e-5,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=g.num_generations, max_completion_length=g.draft_max_tokens,
        temperature=g.temperature, beta=g.kl_beta, num_iterations=1, loss_type="grpo",
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        seed=config.seed, lr_scheduler_type="constant", warmup_steps=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimes()])  # fmt: skip
    trainer.train()
    return steps


def matmul_shapes(cfg, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the training step's matmuls for `tokens` rows: each projection forward and
    its two backward products (input gradient, weight gradient), and the output head's."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {}
    for name, (k, n) in {"qkv": (d, qkv), "o": (d, d), "gate+up": (d, 2 * f), "down": (f, d),
                         "head": (d, v)}.items():  # fmt: skip
        shapes[f"{name} fwd"] = (tokens, k, n)
        shapes[f"{name} dx"] = (tokens, n, k)
        shapes[f"{name} dw"] = (k, tokens, n)
    return shapes


def matmul_bench(cfg, tokens: int, threads: int, reps: int = 3) -> dict:
    """GFLOP/s of XLA:CPU (a jitted jnp.dot) and PyTorch (torch.mm) on each training matmul
    shape, float32, `threads` threads, best of `reps`."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, (m, k, n) in matmul_shapes(cfg, tokens).items():
        a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        dot = jax.jit(jnp.dot)
        dot(ja, jb).block_until_ready()
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch.mm(ta, tb)
        times = {"xla": [], "torch": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            dot(ja, jb).block_until_ready()
            times["xla"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.mm(ta, tb)
            times["torch"].append(time.perf_counter() - t0)
        flop = 2.0 * m * k * n
        out[name] = {side: flop / min(t) / 1e9 for side, t in times.items()}
        print(f"  {name:12s} [{m}x{k}] @ [{k}x{n}]  XLA {out[name]['xla']:6.1f}  "
              f"torch {out[name]['torch']:6.1f} GFLOP/s", flush=True)  # fmt: skip
    return out


def vs_trl(args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("unset XLA_FLAGS: the fake-device flag slows XLA:CPU several-fold.")
    config = vs_trl_config()
    config.model.remat, config.grpo.grad_accum_steps = args.remat, args.grad_accum
    config.grpo.num_steps = args.steps
    config.grpo.export_hf = False
    config.checkpoint.every_steps = 0
    config.metrics.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        ours = run_ours(config, os.path.join(workdir, "ours"))
        theirs = run_trl(config, os.path.join(workdir, "trl"), args.threads)
    a, b = mean_split(ours[1:]), mean_split(theirs[1:])  # the first step compiles / warms up
    print(
        f"GRPO step, {config.grpo.prompts_per_step} prompts x G={config.grpo.num_generations}"
        f", <= {config.grpo.draft_max_tokens} new tokens, mean of steps 2..{args.steps}"
    )
    print(f"  {'':10s} {'ours':>9s} {'TRL':>9s} {'TRL/ours':>9s}")
    for k in ("sampling_s", "judging_s", "training_s", "step_s"):
        print(f"  {k[:-2]:10s} {a[k]:8.2f}s {b[k]:8.2f}s {b[k] / a[k]:8.2f}x")
    from qalign_jax.models import load

    cfg, _ = load.describe_config(config.model)
    widths = [r["row_width"] for r in ours[1:]]
    tokens = config.grpo.prompts_per_step * config.grpo.num_generations * max(widths)
    print(f"training matmuls at {tokens} tokens (our rows), float32, {args.threads} threads:")
    matmuls = matmul_bench(cfg, tokens, args.threads)
    return {"mode": "vs_trl", "threads": args.threads, "load_avg": os.getloadavg(),
            "remat": args.remat, "grad_accum": args.grad_accum,
            "matmuls": matmuls,
            "ours_steps": ours, "trl_steps": theirs, "ours": a, "trl": b,
            "speedup_step": b["step_s"] / a["step_s"],
            "speedup_training": b["training_s"] / a["training_s"]}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu-8b", action="store_true")
    ap.add_argument("--rows", type=int, default=20, help="GPU: rollouts per step (B x 5)")
    ap.add_argument("--vs-trl", action="store_true", help="CPU: against TRL's GRPOTrainer")
    ap.add_argument("--threads", type=int, default=2, help="--vs-trl: CPU threads per side")
    ap.add_argument("--remat", default="full", help="--vs-trl: our model.remat (TRL: its "
                    "default gradient checkpointing)")  # fmt: skip
    ap.add_argument("--grad-accum", type=int, default=1, help="--vs-trl: our grad_accum_steps")
    args = ap.parse_args()
    if args.vs_trl:
        return write_result(vs_trl(args))
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
    write_result(result)


def write_result(result: dict) -> None:
    out = os.path.join(ROOT, "bench", "results", f"grpo_step_{result['mode']}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", os.path.normpath(out))


if __name__ == "__main__":
    main()
