"""SFT train-step benchmark: tokens/s and model FLOPs utilization (MFU) of the jitted step.

  .venv/bin/python bench/sft_step.py            # CPU: SmolLM2-135M shape, fp32, 4 x 256 tokens
  .venv/bin/python bench/sft_step.py --gpu      # GPU: llama3_2_1b shape, fp32 master weights +
                                                #   bf16 compute, 8 x 2048 tokens (2 micro-batches)

Times `loops/sft.py`'s own jitted step (forward, backward, AdamW update; the state donated)
after compilation, on random weights of the model's shape (the values do not change the cost)
and full-length rows (no padding, every target trained), over all local devices as an FSDP
mesh. Prints, side by side with its baselines measured in the same run:
  - peak: this machine's matmul FLOP/s, measured with a large jnp matmul in the step's compute
    dtype (numpy's fp32 matmul printed too); on a GPU also the nominal dense bf16 peak (H100
    SXM: 989 TFLOP/s), which is what the MFU target (>= 45% on an H100) refers to.
  - MFU = 6 * N * tokens/s / peak, N = parameters that take part in matmuls (the tied output
    head counts once, the embedding lookup does not); also with attention's
    12 * L * T * (heads * head_dim) FLOPs per token (PaLM's accounting; the model computes the
    full T x T scores, so these FLOPs are really spent).
  - the step against a forward pass on the same batch (ideal ratio about 3; about 4 with full
    rematerialization).
Writes bench/results/sft_step.json (or --out).
"""

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from qalign_jax import config as base
from qalign_jax import sharding, train_state
from qalign_jax.loops import sft
from qalign_jax.models import llama

NOMINAL_PEAK = {"gpu": 989e12}  # H100 SXM dense bf16 (no sparsity)


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n jnp matmul in `dtype` on the default device (best of repeats)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def numpy_peak(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_params(cfg: llama.LlamaConfig) -> int:
    """Parameters used in matmuls: blocks' projections plus the output head."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * d * f) + cfg.vocab_size * d


def full_batch(accum, rows, seq_len, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(accum, rows, seq_len + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (accum, rows, seq_len))
    return {
        "tokens": tokens[..., :-1],
        "positions": np.ascontiguousarray(positions),
        "targets": tokens[..., 1:],
        "loss_mask": np.ones((accum, rows, seq_len), np.float32),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="llama3_2_1b at bf16 on a GPU")
    ap.add_argument("--preset", default=None, help="model preset (default by mode)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (all micro-batches)")
    ap.add_argument("--seq_len", type=int, default=None)
    ap.add_argument("--accum", type=int, default=None, help="micro-batches per step")
    ap.add_argument("--param_dtype", default="float32")
    ap.add_argument("--dtype", default=None, help="compute dtype (default by mode)")
    ap.add_argument("--remat", default=None, help="none | full | dots (default by mode)")
    ap.add_argument(
        "--attention",
        default="xla",
        help="auto | xla | dot_product | cudnn | splash (llama.ATTENTION)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "sft_step.json")
    )
    args = ap.parse_args()

    mode = "gpu" if args.gpu else "cpu"
    defaults = {
        "cpu": dict(
            preset="smollm2_135m",
            batch=4,
            seq_len=256,
            accum=1,
            dtype="float32",
            remat="none",
            steps=3,
        ),
        "gpu": dict(
            preset="llama3_2_1b",
            batch=8,
            seq_len=2048,
            accum=2,
            dtype="bfloat16",
            remat="dots",
            steps=10,
        ),
    }[mode]
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    backend = jax.default_backend()
    if args.gpu and backend != "gpu":
        raise SystemExit(
            f"--gpu asked for, but JAX's backend is {backend!r}: install jax[cuda12] on a GPU machine."
        )

    cfg = llama.get_preset(opts["preset"]).replace(
        param_dtype=args.param_dtype,
        dtype=opts["dtype"],
        remat=opts["remat"],
        attention=args.attention,
    )
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.DEFAULT_RULES
    devices = jax.device_count()
    print(
        f"{mode}: {cfg.num_params / 1e6:.1f}M-param {opts['preset']}, params {cfg.param_dtype}, "
        f"compute {cfg.dtype}, remat {cfg.remat}, attention {cfg.attention}; batch {opts['batch']} x {opts['seq_len']} "
        f"({opts['accum']} micro-batches) on {devices} x {jax.devices()[0].device_kind}"
    )

    # Baselines: the machine's matmul throughput.
    peak_dtype = cfg.dtype
    measured_peak = matmul_peak(peak_dtype, 2048 if mode == "cpu" else 8192)
    np_peak = numpy_peak()
    peak = NOMINAL_PEAK.get(mode, measured_peak)

    # The step, exactly as the loop builds it.
    opt = base.base_config().optimizer
    opt.warmup_ratio = 0.0
    graphdef, abstract = llama.abstract_model(cfg)
    tx, schedule = train_state.make_optimizer(opt, total_steps=1000)
    _, state_sh = train_state.state_shardings(abstract, tx, mesh, rules)
    with sharding.use_rules(mesh, rules):
        params = llama.init_params(cfg, seed=0, shardings=state_sh.params)
    state = jax.jit(functools.partial(train_state.init_state, tx=tx), out_shardings=state_sh,
                    donate_argnums=(0,))(params)  # fmt: skip
    step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules)
    batch_sh = sft.batch_shardings(mesh)
    rows = opts["batch"] // opts["accum"]
    batch = train_state.put_batch(
        full_batch(opts["accum"], rows, opts["seq_len"], cfg.vocab_size), batch_sh
    )

    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)  # one more warm step
    jax.block_until_ready(m)
    times = []
    for _ in range(opts["steps"]):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    # Forward only, same micro-batches (the loss, no gradient).
    eval_fn = sharding.jit(functools.partial(sft.eval_step, graphdef=graphdef), mesh=mesh,
                           rules=rules, in_shardings=(state_sh.params, batch_sh))  # fmt: skip
    jax.block_until_ready(eval_fn(state.params, batch))
    fwd = []
    for _ in range(opts["steps"]):
        t0 = time.perf_counter()
        jax.block_until_ready(eval_fn(state.params, batch))
        fwd.append(time.perf_counter() - t0)
    forward_s = float(np.median(fwd))

    tokens = opts["batch"] * opts["seq_len"]
    tokens_per_s = tokens / step_s
    n_matmul = matmul_params(cfg)
    flops_6n = 6 * n_matmul * tokens_per_s
    attn_per_token = 12 * cfg.num_layers * opts["seq_len"] * cfg.num_heads * cfg.head_dim
    flops_attn = flops_6n + attn_per_token * tokens_per_s
    result = {
        "mode": mode,
        "device": f"{devices} x {jax.devices()[0].device_kind}",
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **opts,
        "param_dtype": cfg.param_dtype,
        "num_params": cfg.num_params,
        "matmul_params": n_matmul,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_times_s": times,
        "forward_s": forward_s,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s_6N": flops_6n,
        "model_flops_per_s_with_attention": flops_attn,
        "peak_flops_per_s": peak,
        "peak_source": "nominal" if mode in NOMINAL_PEAK else f"measured jnp {peak_dtype} matmul",
        "measured_jnp_matmul_flops_per_s": measured_peak,
        "measured_numpy_fp32_matmul_flops_per_s": np_peak,
        "mfu_6N": flops_6n / peak,
        "mfu_with_attention": flops_attn / peak,
        "mfu_6N_vs_numpy_peak": flops_6n / np_peak,
        "step_over_forward": step_s / forward_s,
        "final_loss": float(m["loss"]),
    }
    print(
        f"compile {compile_s:.1f} s; step {step_s:.3f} s (median of {len(times)}), forward {forward_s:.3f} s "
        f"-> step / forward = {step_s / forward_s:.2f} (ideal ~3, ~4 with full remat)"
    )
    print(
        f"tokens/s {tokens_per_s:,.0f}; model FLOP/s (6N) {flops_6n / 1e9:,.1f} G, with attention "
        f"{flops_attn / 1e9:,.1f} G"
    )
    print(
        f"peak: jnp {peak_dtype} matmul {measured_peak / 1e9:,.1f} GFLOP/s, numpy fp32 matmul "
        f"{np_peak / 1e9:,.1f} GFLOP/s"
        + (f", nominal {peak / 1e12:.0f} TFLOP/s" if mode in NOMINAL_PEAK else "")
    )
    print(
        f"MFU (6N) {100 * result['mfu_6N']:.1f}% of {result['peak_source']} peak "
        f"({100 * result['mfu_with_attention']:.1f}% with attention; "
        f"{100 * result['mfu_6N_vs_numpy_peak']:.1f}% of the numpy peak)"
    )
    if mode == "gpu":
        print(f"target on H100: MFU >= 45% -> {'met' if result['mfu_6N'] >= 0.45 else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
