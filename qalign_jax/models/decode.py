"""`llama.Llama`'s one-token decode step, in a feature-major layout for speed.

The sampler's prefill and `extend` run the model's own `Llama.hidden` with its `KVCache`.
Decode (one new token per row per step, the bulk of a rollout) runs this named
implementation of the same block instead, because of how XLA:CPU lays out its matmuls:
measured on a 2-core CPU with SmolLM2-135M (bench/README.md), `W[out, in] @ x[in, B]` runs
1.3-3x faster than `x[B, in] @ W[in, out]` (the tied head 2-3x), and XLA cannot get the first
form from the model's `[in, out]` kernels without a transpose per step. So this step keeps
activations feature-major (`[D, B]`) and reads weights that `prepare_weights` transposed once
per sampling call: q/k/v fused per kv head, gate/up fused, all stacked over layers and run
under `jax.lax.scan` like the model (compile time and memory do not grow with depth).

Invariants:
- Same numerics as `llama._block_forward`, op for op: RMSNorm, RoPE and softmax in float32,
  matmuls in the compute dtype, the same mask value. `tests/test_llama.py` pins the two
  together over every model variant (tied/untied head, MHA/GQA/MQA, Llama-3 RoPE scaling,
  fp32 and bf16).
- `DecodeCache` is `llama.KVCache` with keys as `[L, B, K, H, S]` and values as
  `[L, B, K, S, H]`, so attention needs no transpose; `to_decode_cache` / `from_decode_cache`
  convert once per sampling call. Each step writes one slot per layer in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from qalign_jax import sharding
from qalign_jax.models import llama, lora


class DecodeWeights(NamedTuple):
    """The model's weights laid out for decode, every block weight stacked over L layers.

    qkv [L, K, G+2, H, D] (G query heads, then k, then v, per kv head); o [L, D, N*H];
    gate_up [L, 2, F, D]; down [L, D, F]; norms [L, D]; final_norm [D]; embed [V, D];
    head [V, D] (the embedding when tied). All in the compute dtype except the norms, which
    stay as stored.
    """

    input_norm: jax.Array
    qkv: jax.Array
    o: jax.Array
    post_norm: jax.Array
    gate_up: jax.Array
    down: jax.Array
    final_norm: jax.Array
    embed: jax.Array
    head: jax.Array


# Logical axes (see `sharding.py`): tensor-parallel over kv heads / mlp / vocab when sampling.
WEIGHT_LOGICAL_AXES = DecodeWeights(
    input_norm=("layers", "norm"),
    qkv=("layers", "kv_heads", None, "head_dim", "embed"),
    o=("layers", "embed", "heads"),
    post_norm=("layers", "norm"),
    gate_up=("layers", None, "mlp", "embed"),
    down=("layers", "embed", "mlp"),
    final_norm=("norm",),
    embed=("vocab", "embed"),
    head=("vocab", "embed"),
)


class DecodeCache(NamedTuple):
    """A `llama.KVCache` in decode layout: k [L, B, K, H, S], v [L, B, K, S, H]."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array  # [B, S]
    index: jax.Array  # []


def to_decode_cache(cache: llama.KVCache) -> DecodeCache:
    return DecodeCache(
        cache.k.transpose(0, 1, 3, 4, 2), cache.v.transpose(0, 1, 3, 2, 4), cache.positions,
        cache.index,
    )  # fmt: skip


def from_decode_cache(cache: DecodeCache) -> llama.KVCache:
    return llama.KVCache(
        cache.k.transpose(0, 1, 4, 2, 3), cache.v.transpose(0, 1, 3, 2, 4), cache.positions,
        cache.index,
    )  # fmt: skip


def prepare_weights(graphdef, params, mesh=None, rules=None) -> DecodeWeights:
    """Transposes and fuses the parameters once for decode (pure; jit it).

    LoRA adapters are folded into their kernels here (W + scale * A @ B), so decode runs the
    adapted model at the plain model's speed. Costs one pass over the weights and a second
    copy of them while sampling; the sampler returns them with its result so that a
    continuation reuses them. With a mesh, the copy is
    laid out tensor-parallel and replicated over data/fsdp (the rows of a sampling batch are
    split over those axes instead).
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config
    dt = cfg.dtype
    num_layers, d, kh, h = cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kh
    att, mlp = model.layers.self_attn, model.layers.mlp
    kernel = lora.merged_kernel  # the kernel itself, or with LoRA adapters folded in
    q = kernel(att.q_proj, 1).reshape(num_layers, d, kh, g, h)
    k = kernel(att.k_proj, 1).reshape(num_layers, d, kh, 1, h)
    v = kernel(att.v_proj, 1).reshape(num_layers, d, kh, 1, h)
    qkv = jnp.concatenate([q, k, v], axis=3).transpose(0, 2, 3, 4, 1)  # [L, K, G+2, H, D]
    o = kernel(att.o_proj, 2).reshape(num_layers, cfg.num_heads * h, d).transpose(0, 2, 1)
    gate_up = jnp.stack([kernel(mlp.gate_proj, 1), kernel(mlp.up_proj, 1)], axis=1)
    embed = model.embed_tokens.embedding[...].astype(dt)
    weights = DecodeWeights(
        input_norm=model.layers.input_layernorm.weight[...],
        qkv=qkv.astype(dt),
        o=o.astype(dt),
        post_norm=model.layers.post_attention_layernorm.weight[...],
        gate_up=gate_up.transpose(0, 1, 3, 2).astype(dt),  # [L, 2, F, D]
        down=kernel(mlp.down_proj, 1).transpose(0, 2, 1).astype(dt),  # [L, D, F]
        final_norm=model.norm.weight[...],
        embed=embed,
        head=embed if cfg.tie_word_embeddings else model.lm_head.kernel[...].T.astype(dt),
    )
    if mesh is None:
        return weights
    rules = tuple((name, None if name == "embed" else axes) for name, axes in rules)
    return jax.tree.map(
        lambda axes, w: jax.lax.with_sharding_constraint(
            w, NamedSharding(mesh, sharding.logical_to_spec(axes, rules, mesh, w.shape))
        ),
        WEIGHT_LOGICAL_AXES,
        weights,
        is_leaf=lambda x: isinstance(x, tuple) and not hasattr(x, "_fields"),
    )


def _rms_norm(x, weight, eps):
    """`llama.RMSNorm` over the feature axis 0 of x [D, B]."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + eps)
    return weight.astype(x.dtype)[:, None] * y.astype(x.dtype)


def _rope(x, cos, sin):
    """Rotate-half RoPE on x [..., H, B] with cos/sin [H, B] (`llama.apply_rope`, transposed)."""
    x1, x2 = jnp.split(x, 2, axis=-2)
    return x * cos + jnp.concatenate([-x2, x1], axis=-2) * sin


def decode_step(cfg: llama.LlamaConfig, w: DecodeWeights, tokens, positions, cache: DecodeCache):
    """One new token per row through every layer.

    Args:
      tokens, positions: [B] int32 (position -1: a finished or padding row, attends to nothing).
      cache: the decode cache; this step writes slot `cache.index` of every layer.

    Returns:
      (logits [B, V] float32, the cache with this token written and `index` advanced).
    """
    dt = cfg.dtype
    b = tokens.shape[0]
    kh, h = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kh
    index = cache.index
    k_pos = jax.lax.dynamic_update_slice(cache.positions, positions[:, None], (0, index))
    x = jnp.take(w.embed, tokens, axis=0).T  # [D, B]
    freqs = jnp.asarray(llama.rope_inv_frequencies(cfg))[:, None] * positions.astype(jnp.float32)
    cos = jnp.concatenate([jnp.cos(freqs)] * 2, axis=0).astype(dt)  # [H, B], shared by layers
    sin = jnp.concatenate([jnp.sin(freqs)] * 2, axis=0).astype(dt)
    mask = llama.attention_mask(positions[:, None], k_pos)[:, None, None, 0]  # [B, 1, 1, S]
    scale = np.float32(1.0 / np.sqrt(h))

    def block(carry, layer):
        x, ks, vs, i = carry
        input_norm, qkv_w, o_w, post_norm, gate_up_w, down_w = layer
        hn = _rms_norm(x, input_norm, cfg.rms_norm_eps)
        qkv = jnp.einsum("KCHD,DB->KCHB", qkv_w, hn)  # [K, G+2, H, B]: one matmul
        q = _rope(qkv[:, :g], cos, sin).transpose(3, 0, 1, 2)  # [B, K, G, H]
        k = _rope(qkv[:, g], cos, sin).transpose(2, 0, 1)  # [B, K, H]
        v = qkv[:, g + 1].transpose(2, 0, 1)  # [B, K, H]
        # Write this token's slot of layer i in place, then read the layer's keys and values.
        ks = jax.lax.dynamic_update_slice(
            ks, k[None, ..., None].astype(ks.dtype), (i, 0, 0, 0, index)
        )
        vs = jax.lax.dynamic_update_slice(
            vs, v[None, :, :, None].astype(vs.dtype), (i, 0, 0, index, 0)
        )
        kc = jax.lax.dynamic_index_in_dim(ks, i, keepdims=False).astype(dt)  # [B, K, H, S]
        vc = jax.lax.dynamic_index_in_dim(vs, i, keepdims=False).astype(dt)  # [B, K, S, H]
        scores = jnp.einsum("BKGH,BKHS->BKGS", q, kc, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * scale, llama._MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("BKGS,BKSH->BKGH", probs, vc)  # [B, K, G, H]
        x = x + o_w @ out.reshape(b, -1).T
        hn = _rms_norm(x, post_norm, cfg.rms_norm_eps)
        gu = jnp.einsum("CFD,DB->CFB", gate_up_w, hn)  # [2, F, B]: one matmul
        x = x + down_w @ (jax.nn.silu(gu[0]) * gu[1])
        return (x, ks, vs, i + 1), None

    layers = (w.input_norm, w.qkv, w.o, w.post_norm, w.gate_up, w.down)
    (x, ks, vs, _), _ = jax.lax.scan(block, (x, cache.k, cache.v, jnp.int32(0)), layers)
    x = _rms_norm(x, w.final_norm, cfg.rms_norm_eps)
    logits = jnp.einsum("VD,DB->VB", w.head, x, preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the transpose into the head matmul, which would turn
    # it back into the slow `x @ head.T` form (measured 1.3-1.4x slower on CPU).
    logits = jax.lax.optimization_barrier(logits).T
    return logits, DecodeCache(ks, vs, k_pos, index + 1)
