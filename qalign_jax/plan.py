"""Memory planner: bytes per device of a config's training and rollouts, and whether they fit.

  python -m qalign_jax.plan --config configs/qalign_grpo_llama3_8b.py --preset llama3_1_8b \
    --accelerator v5p --num_devices 32

Arithmetic from the config, no devices needed: the model's shapes (`--preset`, else the
config's model source, read but not loaded), dtypes, the mesh (`config.mesh.shape`, a -1 filled
from `--num_devices`), the sharding rules, batch sizes and sequence lengths. Parameters,
optimizer state and gradients are summed per parameter over its *actual* shard shape under the
rules (the same `sharding.logical_to_spec` the loops use, so replicated norms and undivisible
axes count in full). Activations and the step's temporaries follow a per-token model whose
coefficients were fitted to `compiled.memory_analysis()` of the SFT step on CPU in float32
(tests/test_plan.py checks the plan against memory_analysis within 10% on shapes it was not
fitted on). XLA on TPU/GPU fuses differently, and CPU computes bfloat16 in float32 (its
temporaries barely shrink), while the plan counts bfloat16 activations at 2 bytes as on
TPU/GPU: treat activations as an estimate; the parameter-shaped terms are exact.

Phases (they do not coexist, the peak is the larger):
  train    policy params + Adam (mu, nu) + gradients (float32 accumulator and one micro-batch's)
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

from absl import app, flags
from ml_collections import config_flags

from qalign_jax import rollouts, sampler, sharding
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


def activation_bytes(cfg: llama.LlamaConfig, rows: int, seq_len: int, mesh_shape, remat: str):
    """Activations of one micro-batch's forward + backward, per device (see FIT above)."""
    c = FIT[remat]
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
    head = 4 * c["vocab"] * _split(cfg.vocab_size, tp)
    if remat == "full":  # block inputs kept, one block recomputed at a time
        per_token = c["inputs"] * cfg.num_layers * cb * d + layer
    else:
        per_token = cfg.num_layers * layer
    return tokens * per_token + head_tokens * head


def kv_cache_bytes(cfg, rows: int, cache_len: int, mesh_shape) -> float:
    """k and v of every layer for `rows` x `cache_len` slots (compute dtype), per device."""
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    kv = _split(cfg.num_kv_heads, mesh_shape["tensor"])
    per_row = 2 * cfg.num_layers * cache_len * kv * cfg.head_dim * _dtype_bytes(cfg.dtype)
    return -(-rows // batch_ways) * per_row


def plan(config, cfg: llama.LlamaConfig, num_devices: int = 0, accelerator: str = "") -> Plan:
    """The memory plan of `config` (loop 'sft' or 'grpo') with model `cfg`."""
    if accelerator and accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}.")
    mesh_shape = resolve_mesh(config.mesh.shape, num_devices)
    rules = tuple(config.sharding.rules)
    pb = _dtype_bytes(cfg.param_dtype)
    elems = param_elements_per_device(cfg, mesh_shape, rules, "base")
    rows, notes = {}, []
    if cfg.lora is None:
        rows["params"] = elems * pb
        rows["optimizer (Adam mu, nu)"] = 2 * elems * pb
        rows["gradients + step temporaries (f32)"] = FIT[cfg.remat]["grads"] * elems * 4
    else:  # trained: the float32 adapters; the base is frozen (also the reference)
        adapter_elems = param_elements_per_device(cfg, mesh_shape, rules, "adapters")
        rows["params"] = elems * pb
        rows["LoRA adapters (f32)"] = adapter_elems * 4
        rows["optimizer (Adam mu, nu)"] = 2 * adapter_elems * 4
        rows["gradients + step temporaries (f32)"] = FIT[cfg.remat]["grads"] * adapter_elems * 4
        notes.append(
            f"LoRA rank {cfg.lora.rank}: {cfg.num_lora_params / 1e6:.1f}M trained parameters "
            f"({100 * cfg.num_lora_params / cfg.num_params:.2f}% of the base); params are the "
            "frozen base, which is also the KL reference"
        )
    other = "full" if cfg.remat == "none" else "none"
    if config.loop == "sft":
        micro = config.sft.global_batch_size // config.sft.grad_accum_steps
        seq_len = config.data.seq_len
    elif config.loop == "grpo":
        g = config.grpo
        micro = g.prompts_per_step * g.num_generations // g.grad_accum_steps
        lengths = grpo_lengths(config)
        seq_len, cache_len, block = lengths.seq_len, lengths.cache_len, lengths.findings_tokens
    else:
        raise ValueError(f"config.loop={config.loop!r}; the planner knows 'sft' and 'grpo'.")
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    num_keys = 4 if config.loop == "sft" else 7  # int32/float32 arrays of [A, rows, T]
    accum = micro_count(config)
    rows["batch"] = num_keys * accum * -(-micro // batch_ways) * seq_len * 4
    rows[f"activations (remat {cfg.remat})"] = activation_bytes(
        cfg, micro, seq_len, mesh_shape, cfg.remat
    )
    train = sum(rows.values())
    without = activation_bytes(cfg, micro, seq_len, mesh_shape, other)
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
        pass1 = kv_cache_bytes(cfg, bucket, cache_len - g.revision_max_tokens - block, mesh_shape)
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


def main(argv):
    del argv
    config = flags.FLAGS.config
    if flags.FLAGS.preset:
        cfg = llama.get_preset(flags.FLAGS.preset)
    else:
        cfg = load.describe_config(config.model)[0]
    m = config.model
    cfg = cfg.replace(
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        logits_chunk=m.logits_chunk,
        lora=lora.from_config(m.lora),
    )
    p = plan(config, cfg, flags.FLAGS.num_devices, flags.FLAGS.accelerator)
    mesh = resolve_mesh(config.mesh.shape, flags.FLAGS.num_devices)
    title = (
        f"plan: loop {config.loop}, {cfg.num_params / 1e9:.2f}B params ({cfg.param_dtype} "
        f"weights, {cfg.dtype} compute), mesh {mesh}, "
        f"{flags.FLAGS.accelerator or 'no accelerator'}; bytes per device"
    )
    print(format_plan(p, title))


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config.", lock_config=True
    )
    _PRESET = flags.DEFINE_string(
        "preset", "", "Model preset (llama.PRESETS) instead of the source."
    )
    _DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices (chips/GPUs) in the mesh.")
    _ACCEL = flags.DEFINE_enum("accelerator", "", ["", *ACCELERATORS], "Accelerator kind.")
    app.run(main)
