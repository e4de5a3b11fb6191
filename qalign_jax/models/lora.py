"""Low-rank adapters (LoRA) on the model's projections: config, parameter type, split and merge.

With `model.lora.rank` = r > 0, every targeted projection `W` of `llama.Llama` (by Hugging
Face name: q/k/v/o_proj, gate/up/down_proj) also holds two `LoraParam` factors, `lora_a`
(its input axes x r, normal init) and `lora_b` (r x its output axes, zero init), and computes
`x @ W + (alpha / r) * (x @ A) @ B`. The adapters live *inside* the model, so training,
prefill and decode (the sampler merges them into its decode layout, `decode.prepare_weights`)
all run the same forward.

Invariants:
- A LoRA model's base parameters have the same paths, shapes and shardings as the plain
  model's (`split` separates them by the `LoraParam` type): one loaded base serves as the
  policy's base, the KL reference and the judge (those two run the plain model's graphdef on
  the same arrays: adapters off, no second copy).
- B starts at zero, so a fresh LoRA model computes exactly the base model.
- Adapters carry logical axes (the rank axis unsharded, the others as their base kernel's),
  so they shard like their base matrices.
- No dropout on the adapters (RL and priming here run without dropout anywhere).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraParam(nnx.Param):
    """A LoRA factor: the only trained parameters when LoRA is on."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scale and targets of the adapters. Hashable: part of the static `LlamaConfig`."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        # One spelling per set of targets (in TARGETS order): configs compare equal by value.
        object.__setattr__(
            self,
            "targets",
            tuple(t for t in TARGETS if t in self.targets)
            + tuple(sorted(set(self.targets) - set(TARGETS))),
        )
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank}; use >= 1 (model.lora.rank=0 turns LoRA off).")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"model.lora.targets={self.targets}: {unknown or 'empty'}; choose among {TARGETS}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def from_config(lora_cfg) -> LoraConfig | None:
    """The `model.lora` section as a `LoraConfig`, or None when `rank` is 0 (off)."""
    if not lora_cfg.rank:
        return None
    targets = lora_cfg.targets
    targets = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else targets
    return LoraConfig(int(lora_cfg.rank), float(lora_cfg.alpha), tuple(targets))


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a LoRA model's parameters; the base has the plain model's paths."""
    adapters, base = nnx.split_state(params, LoraParam, ...)
    return adapters, base


def combine(adapters: nnx.State, base: nnx.State) -> nnx.State:
    """The LoRA model's parameters from its two parts (no array is copied)."""
    return nnx.merge_state(base, adapters)


def project(proj, x, num_in: int, dtype):
    """`x @ kernel` (+ the adapters' low-rank update) contracting x's last `num_in` axes with the
    kernel's first `num_in`. `proj` is an `llama.Proj` (unstacked: inside the layer scan)."""
    kernel = proj.kernel[...].astype(dtype)
    y = jnp.tensordot(x, kernel, axes=num_in)
    if getattr(proj, "lora_a", None) is None:
        return y
    xa = jnp.tensordot(x, proj.lora_a[...].astype(dtype), axes=num_in)  # [..., r]
    delta = jnp.tensordot(xa, proj.lora_b[...].astype(dtype), axes=1)  # [..., *out]
    return y + (proj.lora_scale * delta).astype(y.dtype)


def merged_kernel(proj, num_in: int, stacked: bool = True):
    """The projection's kernel with its adapters folded in, W + (alpha / r) * A @ B, in the
    kernel's dtype (the product in float32). `stacked`: a leading layers axis on all three."""
    kernel = proj.kernel[...]
    if getattr(proj, "lora_a", None) is None:
        return kernel
    a = proj.lora_a[...].astype(jnp.float32)
    b = proj.lora_b[...].astype(jnp.float32)
    lead = 1 if stacked else 0
    in_shape = kernel.shape[lead : lead + num_in]
    out_shape = kernel.shape[lead + num_in :]
    a2 = a.reshape(*kernel.shape[:lead], -1, a.shape[-1])  # [(L,) in, r]
    b2 = b.reshape(*kernel.shape[:lead], b.shape[lead], -1)  # [(L,) r, out]
    delta = jnp.matmul(a2, b2).reshape(*kernel.shape[:lead], *in_shape, *out_shape)
    return (kernel.astype(jnp.float32) + proj.lora_scale * delta).astype(kernel.dtype)
