"""Memory planner: bytes per device of a config's training and rollouts, and whether they fit.

  python -m qalign_jax.plan --config configs/qalign_grpo_llama3_8b.py --preset llama3_1_8b \
    --accelerator v5p --num_devices 32

  # the compiler's own bytes beside the plan: a TPU topology compiled deviceless (pip install
  # libtpu; no TPU needed), or the local devices without --topology
  JAX_PLATFORMS=cpu python -m qalign_jax.plan --config configs/sft_prime_llama3_8b.py \
    --preset llama3_1_8b --compile --topology v5p:4x4x2 --accelerator v5p

Measured (2026-12-05, libtpu 0.0.52, deviceless v5p:4x4x2 = 32 chips, Llama-3.1-8B, fp32
weights, bf16 compute, remat 'full'; bench/fit_plan_tpu.py validate), the train step's peak
per chip, plan (FIT_TPU) / compiler: SFT (configs/sft_prime_llama3_8b.py) 6.81 / 6.69 GB =
1.02 (temporaries 3.80 / 3.67); GRPO (configs/qalign_grpo_llama3_8b.py) 8.99 / 9.35 GB = 0.96
(temporaries 5.98 / 6.34). Arguments (params + Adam + batch, 3.01 GB) match exactly. With the
CPU-fitted FIT the same plans said 9.23 and 13.12 GB (1.38x, 1.40x over). Roofline on v5p
(459 TFLOP/s, 2.77 TB/s): SFT 102 model TFLOP per chip per step (132 executed with full
remat) -> >= 287 ms per step; GRPO 198 (255) -> >= 556 ms; compute-bound (the compiled bytes
take 14 and 22 ms, a lower bound), so MFU at the roofline is 77% for both: the ceiling that
full remat's recomputed forward leaves, not a projection of what the chips will reach.
With splash attention (the TPU default, 2026-12-06, FIT_TPU_SPLASH): SFT 6.55 / 6.69 GB = 0.98,
GRPO 8.89 / 9.34 GB = 0.95; the compiled bytes moved per step fall 39.5 -> 32.7 GB (SFT) and
60.1 -> 48.5 GB (GRPO). Without remat the saving is larger: 1.38 -> 0.74 GB on held-out shape 2.

Arithmetic from the config, no devices needed: the model's shapes (`--preset`, else the
config's model source, read but not loaded), dtypes, the mesh (`config.mesh.shape`, a -1 filled
from `--num_devices`), the sharding rules, batch sizes and sequence lengths. Parameters,
optimizer state and gradients are summed per parameter over its *actual* shard shape under the
rules (the same `sharding.logical_to_spec` the loops use, so replicated norms and undivisible
axes count in full). Activations and the step's temporaries follow a per-token model with two
coefficient sets (`coefficients`): FIT_TPU, fitted to the TPU compiler's `memory_analysis()`
of the SFT step (bf16 compute, deviceless v5p), when the plan targets a TPU (`--accelerator`
v4/v5e/v5p/v6e, or `--topology`); FIT, fitted to XLA:CPU in float32, otherwise (GPUs are not
fitted: XLA:GPU fuses more like TPU than CPU, so FIT over-counts there). tests/test_plan.py
checks each against its compiler on shapes it was not fitted on (CPU within 10%; TPU within
15%, run where libtpu is importable). Treat activations as an estimate; the parameter-shaped
terms are exact.

Phases (they do not coexist, the peak is the larger):
  train    policy params + Adam (mu, nu) + gradients (float32 accumulator and one micro-batch's)
           + the weights' compute-dtype copy when narrower (`model.compute_copy`)
           + activations of one micro-batch (with the config's remat; the other remat shown)
           + the frozen copies (GRPO, resident all run): model.source's weights, a primed
           reference (checkpoint.init) and a separate judge (judge.source)
  rollout  policy params + Adam + reference + judge + decode weights (the sampler's transposed
           compute-dtype copy) + the KV cache of both passes (one cache, sized for draft and
           revision) + the judge's prefix cache.
With LoRA (`model.lora.rank` > 0) the trained parameters are the adapters (float32): Adam's
moments and the gradient buffers are adapter-sized; the base is one frozen copy that is also
the KL reference and, unless checkpoint.init primes the base, the judge.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qalign_jax import plan_fits, rollouts, sampler, sharding
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import llama, load, lora

GB = 1e9

# HBM per chip / GPU memory, bytes (vendor figures).
ACCELERATORS = {
    "v4": 32 * GB,
    "v5e": 16 * GB,
    "v5p": 95 * GB,
    "v6e": 32 * GB,
    "a100-40gb": 40 * GB,
    "a100-80gb": 80 * GB,
    "h100": 80 * GB,
    "h200": 141 * GB,
}
# XLA's own buffers, fragmentation and collectives' scratch: plan to this fraction of memory.
USABLE_FRACTION = 0.9

# The activation coefficients, fitted to each compiler (see plan_fits.py).
FIT, FIT_TPU, FIT_TPU_SPLASH = plan_fits.FIT, plan_fits.FIT_TPU, plan_fits.FIT_TPU_SPLASH
TPUS = ("v4", "v5e", "v5p", "v6e")


def coefficients(accelerator: str = "", topology: str = "", attention: str = "auto") -> dict:
    """The activation model for the target: `tpu_coefficients` for a TPU (`accelerator` one of
    `TPUS`, or a `topology` to compile for), else `FIT` (XLA:CPU; GPUs are not fitted)."""
    return tpu_coefficients(attention) if accelerator in TPUS or topology else FIT


def tpu_coefficients(attention: str) -> dict:
    """`FIT_TPU_SPLASH` when the attention is splash ('auto' is, on a TPU), else `FIT_TPU`."""
    return FIT_TPU_SPLASH if attention in ("auto", "splash") else FIT_TPU


def model_config(config, preset: str = "", num_layers: int = 0) -> llama.LlamaConfig:
    """The architecture a config trains: a preset by name, else the config's model source (read,
    not loaded), with the model section's dtypes, remat, logits chunk, LoRA and attention;
    `num_layers` replaces the depth (compile-time savings, see aot.py)."""
    cfg = llama.get_preset(preset) if preset else load.describe_config(config.model)[0]
    m = config.model
    cfg = cfg.replace(
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        logits_chunk=m.logits_chunk,
        lora=lora.from_config(m.lora),
        attention=m.attention,
    )
    return cfg.replace(num_layers=num_layers) if num_layers else cfg


@dataclasses.dataclass
class Plan:
    """Bytes per device of every component, the phases, and the verdict."""

    rows: dict[str, float]  # component -> bytes per device
    train: float
    rollout: float
    peak: float
    memory: float  # bytes per device of the accelerator (0 = none chosen)
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.memory > 0 and self.peak <= USABLE_FRACTION * self.memory


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def resolve_mesh(shape, num_devices: int) -> dict[str, int]:
    """`config.mesh.shape` with its -1 filled: {'data': .., 'fsdp': .., 'tensor': ..}."""
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices <= 0 or num_devices % known:
            raise ValueError(
                f"mesh {tuple(shape)} has a -1: give --num_devices, a multiple of {known}."
            )
        shape[shape.index(-1)] = num_devices // known
    elif num_devices and math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {tuple(shape)} needs {math.prod(shape)} devices, not {num_devices}."
        )
    return dict(zip(sharding.MESH_AXES, shape))


class _ShapeOnlyMesh:
    """What `sharding.logical_to_spec` reads of a mesh: its axis sizes."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape


def shard_size(shape, spec, mesh_shape: dict[str, int]) -> int:
    """Elements of one device's shard (ceil division, as XLA pads uneven shards)."""
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= -(-dim // math.prod(mesh_shape[a] for a in axes))
    return n


def param_elements_per_device(cfg: llama.LlamaConfig, mesh_shape, rules, part: str = "all") -> int:
    """Parameter elements one device holds under the rules (replicated ones in full); `part`:
    'all', 'base' (without LoRA adapters) or 'adapters'."""
    _, abstract = llama.abstract_model(cfg)
    adapters, base = lora.split(abstract)
    abstract = {"all": abstract, "base": base, "adapters": adapters}[part]
    mesh = _ShapeOnlyMesh(mesh_shape)
    total = 0
    for var in jax_leaves(abstract):
        shape = var.get_value().shape
        spec = sharding.logical_to_spec(var.get_metadata()["logical_axes"], rules, mesh, shape)
        total += shard_size(shape, spec, mesh_shape)
    return total


def jax_leaves(state):
    import jax
    from flax import nnx

    return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _split(n: int, ways: int) -> float:
    return n / ways if n % ways == 0 else n  # an undivisible axis is replicated


def grpo_lengths(config) -> rollouts.RolloutLengths:
    """The GRPO loop's rollout lengths from its token budgets (`rollouts.rollout_lengths`).

    The prompt is taken at `grpo.max_prompt_tokens` (the loop measures the longest prompt) and
    the findings block at 48 tokens per finding plus 16 (the loop measures the rubric's; the
    demo and default rubrics' findings are shorter)."""
    g = config.grpo
    return rollouts.rollout_lengths(
        g.max_prompt_tokens, draft_max_tokens=g.draft_max_tokens,
        revision_max_tokens=g.revision_max_tokens, findings_tokens=48 * g.max_findings + 16,
        two_pass=g.two_pass,
    )  # fmt: skip


def micro_count(config) -> int:
    return config.sft.grad_accum_steps if config.loop == "sft" else config.grpo.grad_accum_steps


def activation_bytes(
    cfg: llama.LlamaConfig, rows: int, seq_len: int, mesh_shape, remat: str, fit=None
):
    """Activations of one micro-batch's forward + backward, per device (see FIT above; `fit`:
    the coefficient set, FIT by default)."""
    c = (fit or FIT)[remat]
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    tp = mesh_shape["tensor"]
    rows_here = -(-rows // batch_ways)
    tokens = rows_here * seq_len  # per device
    # The [tokens, vocab] float32 logits live whole, or `logits_chunk` positions a row at a time.
    head_tokens = min(tokens, rows_here * cfg.logits_chunk) if cfg.logits_chunk else tokens
    cb = _dtype_bytes(cfg.dtype)
    d, f = cfg.hidden_size, _split(cfg.intermediate_size, tp)
    heads, kv = _split(cfg.num_heads, tp), _split(cfg.num_kv_heads, tp)
    layer = cb * (c["d"] * d + c["f"] * f + c["qkv"] * (heads + 2 * kv) * cfg.head_dim)
    layer += 4 * c["scores"] * heads * seq_len
    vocab = _split(cfg.vocab_size, tp)
    head = 4 * c["vocab"] * vocab
    if remat == "full":  # block inputs kept, one block recomputed at a time
        per_token = c["inputs"] * cfg.num_layers * cb * d + layer
    else:
        per_token = cfg.num_layers * layer
    # Weights gathered whole over fsdp (split over tensor) in the compute dtype: a block's and
    # the head's (FIT_TPU only; on XLA:CPU these are folded into the per-token terms).
    block = d * (heads + 2 * kv) * cfg.head_dim + heads * cfg.head_dim * d + 3 * d * f
    gathered = cb * (c.get("block", 0.0) * block + c.get("head", 0.0) * d * vocab)
    return tokens * per_token + head_tokens * head + gathered


def kv_cache_bytes(cfg, rows: int, cache_len: int, mesh_shape) -> float:
    """k and v of every layer for `rows` x `cache_len` slots (compute dtype), per device."""
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    kv = _split(cfg.num_kv_heads, mesh_shape["tensor"])
    per_row = 2 * cfg.num_layers * cache_len * kv * cfg.head_dim * _dtype_bytes(cfg.dtype)
    return -(-rows // batch_ways) * per_row


def plan(
    config, cfg: llama.LlamaConfig, num_devices: int = 0, accelerator: str = "", fit=None
) -> Plan:
    """The memory plan of `config` (loop 'sft' or 'grpo') with model `cfg`; `fit`: the
    activation coefficients, by default those for the accelerator (`coefficients`)."""
    if accelerator and accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}.")
    fit = fit or coefficients(accelerator, attention=cfg.attention)
    mesh_shape = resolve_mesh(config.mesh.shape, num_devices)
    rules = tuple(config.sharding.rules)
    pb = _dtype_bytes(cfg.param_dtype)
    elems = param_elements_per_device(cfg, mesh_shape, rules, "base")
    rows, notes = {}, []
    if cfg.lora is None:
        rows["params"] = elems * pb
        mu_bytes = _dtype_bytes(config.optimizer.mu_dtype) if config.optimizer.mu_dtype else pb
        rows["optimizer (Adam mu, nu)"] = elems * (mu_bytes + pb)
        rows["gradients + step temporaries (f32)"] = fit[cfg.remat]["grads"] * elems * 4
    else:  # trained: the float32 adapters; the base is frozen (also the reference)
        adapter_elems = param_elements_per_device(cfg, mesh_shape, rules, "adapters")
        rows["params"] = elems * pb
        rows["LoRA adapters (f32)"] = adapter_elems * 4
        mu_bytes = _dtype_bytes(config.optimizer.mu_dtype) if config.optimizer.mu_dtype else 4
        rows["optimizer (Adam mu, nu)"] = adapter_elems * (mu_bytes + 4)
        rows["gradients + step temporaries (f32)"] = fit[cfg.remat]["grads"] * adapter_elems * 4
        notes.append(
            f"LoRA rank {cfg.lora.rank}: {cfg.num_lora_params / 1e6:.1f}M trained parameters "
            f"({100 * cfg.num_lora_params / cfg.num_params:.2f}% of the base); params are the "
            "frozen base, which is also the KL reference"
        )
    if config.model.compute_copy and _dtype_bytes(cfg.dtype) < pb:
        # train_state.compute_copy: the (frozen) weights cast once per step; the embedding
        # table is left as stored, counted here anyway (an upper bound).
        rows["compute copy of the weights"] = elems * _dtype_bytes(cfg.dtype)
    other = "full" if cfg.remat == "none" else "none"
    if config.loop == "sft":
        micro = config.sft.global_batch_size // config.sft.grad_accum_steps
        seq_len = config.data.seq_len
    elif config.loop == "grpo":
        g = config.grpo
        micro = g.prompts_per_step * g.num_generations // g.grad_accum_steps
        lengths = grpo_lengths(config)
        seq_len, cache_len = lengths.seq_len, lengths.cache_len
    else:
        raise ValueError(f"config.loop={config.loop!r}; the planner knows 'sft' and 'grpo'.")
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    num_keys = 4 if config.loop == "sft" else 7  # int32/float32 arrays of [A, rows, T]
    accum = micro_count(config)
    rows["batch"] = num_keys * accum * -(-micro // batch_ways) * seq_len * 4
    rows[f"activations (remat {cfg.remat})"] = activation_bytes(
        cfg, micro, seq_len, mesh_shape, cfg.remat, fit
    )
    train = sum(rows.values())
    without = activation_bytes(cfg, micro, seq_len, mesh_shape, other, fit)
    notes.append(
        f"activations with remat '{other}' instead: {without / GB:.2f} GB "
        f"({micro} rows x {seq_len} tokens per micro-batch)"
    )
    rollout = 0.0
    if config.loop == "grpo":
        g = config.grpo
        compute_elems = elems * _dtype_bytes(cfg.dtype)
        # The loop keeps model.source's weights as loaded all run when they are the judge
        # (judge.source='') or the KL reference (checkpoint.init=''), plus a primed reference
        # (checkpoint.init) and a separate judge (judge.source, assumed the policy's size).
        if cfg.lora is not None:  # the base is the reference (and the judge unless primed)
            if config.checkpoint.init and not config.judge.source:
                rows["frozen model.source weights (judge)"] = elems * pb
        else:
            if load.base_weights_used(config):
                rows["frozen model.source weights"] = elems * pb
            if config.checkpoint.init:
                rows["frozen reference (checkpoint.init)"] = elems * pb
        if config.judge.source:
            rows["judge copy (judge.source)"] = elems * pb
        frozen = sum(v for k, v in rows.items() if k.startswith(("frozen", "judge copy")))
        train += frozen
        rollout_rows = g.prompts_per_step * g.num_generations
        batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
        bucket = sampler.bucket(rollout_rows, (rollout_rows,), batch_ways)  # grpo's buckets
        rows["decode weights (compute dtype)"] = compute_elems
        second = lengths.findings_width + g.revision_max_tokens if g.two_pass else 0
        pass1 = kv_cache_bytes(cfg, bucket, cache_len - second, mesh_shape)
        both = kv_cache_bytes(cfg, bucket, cache_len, mesh_shape)
        rows["KV cache, both passes"] = both
        notes.append(
            f"KV cache: {bucket} rows x {cache_len} slots; pass 1 (prompt + draft) uses "
            f"{pass1 / GB:.2f} GB of it, pass 2 (findings + revision) the rest"
        )
        # One prefix per response and option set (Yes/No, the grades): see judge.py.
        option_sets = {q.options for q in rubric_lib.resolve_rubric(config.judge.rubric).questions}
        rows["judge prefix cache"] = kv_cache_bytes(
            cfg, config.judge.batch_size * len(option_sets), config.judge.max_context_tokens,
            mesh_shape,
        )  # fmt: skip
        rollout = (
            rows["params"] + rows.get("LoRA adapters (f32)", 0.0)
            + rows["optimizer (Adam mu, nu)"] + frozen
            + rows["decode weights (compute dtype)"] + both + rows["judge prefix cache"]
        )  # fmt: skip
    memory = ACCELERATORS.get(accelerator, 0.0)
    return Plan(rows, train, rollout, max(train, rollout), memory, notes)


ARGUMENT_ROWS = ("params", "LoRA adapters (f32)", "optimizer (Adam mu, nu)", "batch")
FROZEN_PREFIXES = ("frozen", "judge copy")


def train_step_peak(p: Plan) -> float:
    """The train step program's planned bytes: the train phase less the frozen copies (the
    reference and the judge, which are not its arguments): what `memory_analysis()` counts."""
    return p.train - sum(v for k, v in p.rows.items() if k.startswith(FROZEN_PREFIXES))


def temporaries(p: Plan) -> float:
    """The train step's planned temporaries: its peak less its arguments (params, Adam, batch):
    gradients and the optimizer's temporaries, the compute copy and the activations."""
    return train_step_peak(p) - sum(p.rows.get(k, 0.0) for k in ARGUMENT_ROWS)


# ---------------------------------------------------------------------------------------------
# Fail fast: the loops check the plan against the device before loading or sampling anything.


def device_memory() -> tuple[float, str]:
    """Bytes one local device may use and a description: the runtime's limit on a GPU/TPU; on
    CPU the host's physical memory (not what is free now: the verdict must not depend on other
    processes), shared by its local devices."""
    import jax

    dev, n = jax.local_devices()[0], jax.local_device_count()
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(
            stats["bytes_limit"]
        ), f"{dev.device_kind} ({stats['bytes_limit'] / GB:.1f} GB)"
    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return host / n, f"CPU host ({host / GB:.1f} GB of memory shared by {n} local devices)"


def fitting_settings(config, cfg: llama.LlamaConfig, num_devices: int, memory: float, fit=None):
    """[(overrides, planned peak bytes)]: for `remat` as configured and 'full', the smallest
    `grad_accum_steps` (a power-of-two multiple of today's) whose plan fits `memory`."""
    section = config.sft if config.loop == "sft" else config.grpo
    rows = (
        config.sft.global_batch_size
        if config.loop == "sft"
        else config.grpo.prompts_per_step * config.grpo.num_generations
    )
    ways = math.prod(resolve_mesh(config.mesh.shape, num_devices)[a] for a in ("data", "fsdp"))
    out = []
    for remat in dict.fromkeys((cfg.remat, "full")):
        accum = section.grad_accum_steps
        while rows % accum == 0 and (rows // accum) % ways == 0:
            trial = config.copy_and_resolve_references()
            (trial.sft if config.loop == "sft" else trial.grpo).grad_accum_steps = accum
            peak = plan(trial, cfg.replace(remat=remat), num_devices, fit=fit).peak
            if peak <= USABLE_FRACTION * memory:
                flags_ = [f"--config.{config.loop}.grad_accum_steps={accum}"]
                flags_ += [f"--config.model.remat={remat}"] if remat != cfg.remat else []
                out.append((" ".join(flags_), peak))
                break
            accum *= 2
    return out


def check_fits(
    config, loop: str, num_devices: int, memory: float | None = None, device: str = ""
) -> None:
    """Stops a run whose planned peak per device exceeds the device's memory, in seconds and
    before any weights are loaded, naming settings that would fit (`config.memory_check`:
    'error' stops, 'warn' logs, 'off'). Over 90% but under 100% only warns: the activations are
    an estimate (on XLA:CPU the plan over-counted a 12.6 GB GRPO run as 19.3 GB)."""
    mode = config.memory_check
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"config.memory_check={mode!r}; use 'error', 'warn' or 'off'.")
    if mode == "off":
        return
    if config.loop != loop:  # a stage of the pipeline: plan it as the loop it runs
        config = config.copy_and_resolve_references()
        config.loop = loop
    if memory is None:
        memory, device = device_memory()
    cfg = model_config(config)
    on_tpu = jax.default_backend() == "tpu"  # the coefficients of this chip
    fit = tpu_coefficients(cfg.attention) if on_tpu else None
    p = plan(config, cfg, num_devices, fit=fit)
    if p.peak <= USABLE_FRACTION * memory:
        return
    fixes = fitting_settings(config, cfg, num_devices, memory, fit)
    fix_text = "; ".join(f"{f} ({peak / GB:.1f} GB)" for f, peak in fixes) or (
        "none by grad_accum_steps and remat alone: fewer rows per step, shorter sequences, "
        "a larger mesh or bfloat16 weights"
    )
    message = (
        f"memory: this {config.loop} config plans {p.peak / GB:.1f} GB per device (train "
        f"{p.train / GB:.1f} GB, of which activations "
        f"{next(v for k, v in p.rows.items() if k.startswith('activations')) / GB:.1f} GB; "
        f"rollout {p.rollout / GB:.1f} GB) but each device has {memory / GB:.1f} GB "
        f"[{device}]. Settings that fit by the same plan: {fix_text}. `python -m "
        f"qalign_jax.plan --config ...` prints every term; --config.memory_check=warn runs anyway."
    )
    if mode == "error" and p.peak > memory:
        raise MemoryError(message)
    logging.warning("%s", message)


def format_plan(p: Plan, title: str) -> str:
    lines = [title]
    for name, b in p.rows.items():
        lines.append(f"  {name:<40} {b / GB:9.3f} GB")
    lines.append(f"  {'phase: train':<40} {p.train / GB:9.3f} GB")
    if p.rollout:
        lines.append(f"  {'phase: rollout':<40} {p.rollout / GB:9.3f} GB")
    lines += [f"  note: {n}" for n in p.notes]
    if p.memory:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(
            f"  peak {p.peak / GB:.2f} GB of {p.memory / GB:.0f} GB per device "
            f"({100 * p.peak / p.memory:.0f}%; plan to {USABLE_FRACTION:.0%}): {verdict}"
        )
    else:
        lines.append(f"  peak {p.peak / GB:.2f} GB per device (give --accelerator for a verdict)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --compile: the compiler's own accounting beside the arithmetic.

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) per chip, vendor figures: Google Cloud TPU
# system architecture pages (v4, v5e, v5p, v6e); NVIDIA A100, H100 SXM and H200 datasheets.
CHIPS = {
    "v4": (275e12, 1228e9),
    "v5e": (197e12, 819e9),
    "v5p": (459e12, 2765e9),
    "v6e": (918e12, 1640e9),
    "a100-40gb": (312e12, 1555e9),
    "a100-80gb": (312e12, 2039e9),
    "h100": (989e12, 3350e9),
    "h200": (989e12, 4800e9),
}


def compile_mesh(config, topology: str = ""):
    """The mesh to compile for: `topology` ('v5p:4x4x4'; needs `pip install libtpu`, no TPU)
    as a deviceless TPU mesh, else `config.mesh.shape` over the local devices."""
    if not topology:
        return sharding.make_mesh(config.mesh.shape)
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    shape = resolve_mesh(config.mesh.shape, len(topo.devices))
    return topologies.make_mesh(topo, tuple(shape.values()), tuple(shape))


def compiled_bytes(compiled) -> dict[str, float]:
    """Per-device bytes of one compiled program (`memory_analysis()`); peak = arguments +
    outputs - donated (aliased) + temporaries."""
    ma = compiled.memory_analysis()
    row = {
        "arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
        "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
    }  # fmt: skip
    row["peak"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
    return row


def compiled_cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per device from `cost_analysis()`. XLA counts a while loop's body
    once, so scanned layers and micro-batches are under-counted: read them per program."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _step_tokens(config) -> int:
    if config.loop == "sft":
        return config.sft.global_batch_size * config.data.seq_len
    return config.grpo.prompts_per_step * config.grpo.num_generations * grpo_lengths(config).seq_len


def _seq_len(config) -> int:
    return config.data.seq_len if config.loop == "sft" else grpo_lengths(config).seq_len


def train_step_flops(config, cfg: llama.LlamaConfig, num_devices: int) -> float:
    """Model FLOPs of one optimizer step per device: 6 x params x tokens (forward + backward)
    plus attention's 12 x layers x heads x head_dim x T per token, with the config's rows."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * _seq_len(config) / 2  # causal
    return (6 * cfg.num_params + attention) * _step_tokens(config) / num_devices


def hardware_step_flops(config, cfg: llama.LlamaConfig, num_devices: int) -> float:
    """FLOPs the chips execute per step per device: the model's, plus with remat 'full' the
    blocks' forward once more (2 x block params + a third of attention's, per token)."""
    model = train_step_flops(config, cfg, num_devices)
    if cfg.remat != "full":
        return model
    head = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * _seq_len(config) / 2
    return model + (2 * (cfg.num_params - head) + attention) * _step_tokens(config) / num_devices


def roofline(config, cfg: llama.LlamaConfig, num_devices: int, chip: str, moved: float):
    """(floor seconds, MFU at the roofline) of one train step on `chip`: the executed FLOPs at
    the chip's peak or `moved` bytes at its bandwidth, whichever is slower; MFU = model FLOPs /
    (peak x floor), an upper bound (no chip reaches its peak; `moved` from `cost_analysis()`
    counts a scanned loop's body once, a lower bound)."""
    peak_flops, bandwidth = CHIPS[chip]
    model = train_step_flops(config, cfg, num_devices)
    floor = max(hardware_step_flops(config, cfg, num_devices) / peak_flops, moved / bandwidth)
    return floor, model / (peak_flops * floor)


def compiled_report(
    config, cfg: llama.LlamaConfig, mesh, p: Plan, chip: str = "", train_only: bool = False
) -> str:
    """Compiles the loop's programs (`aot.py`; `train_only`: the train step alone) on `mesh`
    and prints each one's compiled bytes per device; the train step's beside the plan's
    (`train_step_peak`), and, given a chip, its roofline time and MFU."""
    from qalign_jax import aot  # aot imports this module

    kwargs = {"train_only": True} if train_only and config.loop == "grpo" else {}
    programs = aot.COMPILERS[config.loop](config, cfg, mesh, compile_=True, **kwargs)
    kind = mesh.devices.flat[0].device_kind
    lines = [f"compiled for {mesh.devices.size} x {kind}, mesh {dict(mesh.shape)}; GB per device"]
    lines.append(f"  {'program':<22}{'args':>9}{'temps':>9}{'peak':>9}{'TFLOP':>9}{'GB moved':>10}")
    for name, compiled in programs.items():
        b = compiled_bytes(compiled)
        flops, moved = compiled_cost(compiled)
        lines.append(
            f"  {name:<22}{b['arguments'] / GB:9.3f}{b['temporaries'] / GB:9.3f}"
            f"{b['peak'] / GB:9.3f}{flops / 1e12:9.3f}{moved / GB:10.3f}"
        )
    step = programs[f"{config.loop}_step"]
    planned, got = train_step_peak(p), compiled_bytes(step)
    lines.append(
        f"  train step: plan {planned / GB:.2f} GB vs compiler {got['peak'] / GB:.2f} GB "
        f"(plan / compiler = {planned / got['peak']:.2f}; temporaries plan "
        f"{temporaries(p) / GB:.2f} vs {got['temporaries'] / GB:.2f} GB)"
    )
    if chip:
        n = mesh.devices.size
        peak_flops, bandwidth = CHIPS[chip]
        model, hardware = train_step_flops(config, cfg, n), hardware_step_flops(config, cfg, n)
        moved = compiled_cost(step)[1]
        floor, mfu = roofline(config, cfg, n, chip, moved)
        lines.append(
            f"  {chip}: {peak_flops / 1e12:.0f} TFLOP/s, {bandwidth / 1e9:.0f} GB/s; model "
            f"{model / 1e12:.2f} TFLOP per device per step ({hardware / 1e12:.2f} executed with "
            f"remat '{cfg.remat}') -> >= {floor * 1e3:.1f} ms at peak (compute "
            f"{hardware / peak_flops * 1e3:.1f} ms, the compiled bytes "
            f"{moved / bandwidth * 1e3:.1f} ms); MFU at the roofline {mfu:.0%} (an upper "
            f"bound). MFU at a measured step time t: {model / peak_flops:.4f} s / t."
        )
    return "\n".join(lines)


def main(argv):
    del argv
    config = flags.FLAGS.config
    cfg = model_config(config, flags.FLAGS.preset)
    num_devices = flags.FLAGS.num_devices
    mesh = None
    if flags.FLAGS.compile:
        mesh = compile_mesh(config, flags.FLAGS.topology)
        num_devices = mesh.devices.size
    fit = coefficients(
        flags.FLAGS.accelerator, flags.FLAGS.topology if mesh is not None else "", cfg.attention
    )
    p = plan(config, cfg, num_devices, flags.FLAGS.accelerator, fit=fit)
    title = (
        f"plan: loop {config.loop}, {cfg.num_params / 1e9:.2f}B params ({cfg.param_dtype} "
        f"weights, {cfg.dtype} compute), mesh {resolve_mesh(config.mesh.shape, num_devices)}, "
        f"{flags.FLAGS.accelerator or 'no accelerator'}, activations fitted to "
        f"{'XLA:CPU' if fit is FIT else 'XLA:TPU'} ({cfg.attention} attention); bytes per device"
    )
    print(format_plan(p, title))
    if mesh is not None:
        chip = flags.FLAGS.accelerator or (
            flags.FLAGS.topology.split(":")[0] if flags.FLAGS.topology else ""
        )
        chip = chip if chip in CHIPS else ""
        print(compiled_report(config, cfg, mesh, p, chip, flags.FLAGS.train_only))


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config.", lock_config=True
    )
    _PRESET = flags.DEFINE_string(
        "preset", "", "Model preset (llama.PRESETS) instead of the source."
    )
    _DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices (chips/GPUs) in the mesh.")
    _ACCEL = flags.DEFINE_enum("accelerator", "", ["", *ACCELERATORS], "Accelerator kind.")
    _COMPILE = flags.DEFINE_bool(
        "compile", False, "Also compile the loop's programs and print the compiler's bytes."
    )
    _TRAIN_ONLY = flags.DEFINE_bool(
        "train_only", False, "With --compile: the train step alone (GRPO: not the sampler/judge)."
    )
    _TOPOLOGY = flags.DEFINE_string(
        "topology",
        "",
        "With --compile: a TPU topology ('v5p:4x4x4') compiled deviceless "
        "(pip install libtpu); default: the local devices.",
    )
    app.run(main)
