"""The memory planner's activation coefficients (`plan.activation_bytes`), one set per
compiler and attention: FIT (XLA:CPU, float32), FIT_TPU (XLA:TPU, reference attention) and
FIT_TPU_SPLASH (XLA:TPU, Pallas splash attention). `plan.coefficients` picks one for a target.
"""

# Per-token activation model, fitted (non-negative least squares, fp32) to the SFT step's
# `memory_analysis()` on 8 CPU devices over 20 shapes: a 4-layer D=128 model and variants with
# V x4, D x2, F x4, L x2, rows x2, T x2, each with remat 'none' and 'full'; fit error <= 8%.
# Units: values of each width kept per token (d: D, f: F, qkv: (N + 2K) * H, all in the
# compute dtype; scores: N * T and vocab: V, float32), `inputs`: the D-wide block input kept
# per layer by remat, `grads`: parameter-sized float32 buffers of the step (gradient
# accumulator, a micro-batch's gradients, clipping and Adam's temporaries).
FIT = {
    "none": dict(grads=5.1, d=4.5, f=6.7, qkv=2.0, scores=2.5, vocab=1.5, inputs=0.0),
    "full": dict(grads=2.6, d=4.9, f=7.2, qkv=2.0, scores=1.2, vocab=1.3, inputs=1.0),
}
FIT["dots"] = FIT["none"]  # not fitted: counted as 'none', an upper bound

# The same model fitted to the TPU compiler (libtpu 0.0.52, deviceless v5p, 2026-12-05): the SFT
# step's `memory_analysis()` temporaries (less the compute copy, counted apart) with fp32
# weights and bf16 compute on 4 chips (v5p:2x2x1; 8 for two points), over 31 shapes: a 4-layer
# D=256 model (V 4096, F 768, 4 heads of 64, 8 rows x 512 tokens) and variants with V x4, D x2,
# F x4, L x2, rows x2, T x2 and x4, heads x2, V and T x2, D and F x2, tensor parallel 2, 8 chips,
# each with remat 'none' and 'full', and at T x4 heads x2, D and F x2, V x4 with 'full'.
# Non-negative least squares weighted by 1 / sqrt(bytes); `grads`, `inputs` and `block` (one
# block's weights gathered over fsdp in the compute dtype) held at 1, their physical counts (at
# small shapes they are too few bytes to fit; at 8B they are gigabytes), `head` at 0. Fit error:
# 'none' within 5%; 'full' within 12% at T=2048 but up to 1.8x at T <= 1024 (XLA:TPU keeps
# relatively less of a small recomputed block), so it is fitted to the long-sequence regime
# of the configs. Held out: 4 shapes (every dimension changed, 4 and 8 chips) within 8% of the
# compiled peak, the 8B SFT and GRPO steps on v5p:4x4x2 within 4% (plan.py's docstring). Rerun
# and print with bench/fit_plan_tpu.py (collect fit, then fit; validate for the held-out).
# XLA:TPU fuses a block's elementwise work into its matmuls and keeps bf16 at 2 bytes: far
# fewer D- and F-wide values per token are live than on XLA:CPU.
FIT_TPU = {
    "none": dict(
        grads=1.0, d=6.98, f=5.74, qkv=0.0, scores=1.73, vocab=1.03, inputs=1.0, block=1.0, head=0.0
    ),
    "full": dict(
        grads=1.0, d=0.0, f=0.0, qkv=0.0, scores=1.83, vocab=0.32, inputs=1.0, block=1.0, head=0.0
    ),
}
FIT_TPU["dots"] = FIT_TPU["none"]
# The same fit with Pallas splash attention (`model.attention` 'splash', and 'auto' on a TPU;
# 2026-12-06, bench/fit_plan_tpu.py fit:splash over the same 31 points compiled with splash):
# the [N, T, T] scores are never stored (scores ~ 0; the kernel keeps one log-sum-exp per head
# and token). Fit error: 'none' within 7%; 'full' within 15% but D x2 and D, F x2 (1.23, 1.34
# over: small shapes, where the fixed terms weigh most).
FIT_TPU_SPLASH = {
    "none": dict(
        grads=1.0,
        d=5.29,
        f=5.59,
        qkv=4.59,
        scores=0.03,
        vocab=1.07,
        inputs=1.0,
        block=1.0,
        head=0.0,
    ),
    "full": dict(
        grads=1.0, d=0.0, f=0.0, qkv=0.0, scores=0.02, vocab=0.99, inputs=1.0, block=1.0, head=0.0
    ),
}
FIT_TPU_SPLASH["dots"] = FIT_TPU_SPLASH["none"]
