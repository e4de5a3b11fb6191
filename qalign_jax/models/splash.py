"""Pallas splash attention (TPU) for the training forward: causal, grouped-query, padding masked.

`llama._attend` calls `attend` when `model.attention` is 'splash' ('auto' on a TPU mesh) and
the forward has neither a KV cache nor a shared prefix: the training steps and the log-prob
forwards. The sampler's prefill and decode and the judge's shared-prefix scoring keep the
reference einsums.

Masking. The kernel's mask is causal by index plus segment ids: a row's real tokens
(position >= 0) are segment 1, padding is segment 0, and a query sees keys of its own segment.
That equals the reference's positional mask (key position in [0, query position]) on every
real query as long as positions increase along each row over its real tokens: one sequence
per row, padding (-1) anywhere. Every row layout in this package has that form. Padding
queries attend to earlier padding and their outputs are never read.

Layout. Keys and values are never repeated for grouped-query attention: the MHA kernel takes
q [N, T, H] and k, v [K, T, H] and serves query head i from kv head i // (N / K), the
convention of `llama._attend`. Rows are vmapped; sequences are padded to a multiple of 128
(the kernel's lane width) as segment-0 padding and cut back after. Under a mesh the call is a
`shard_map` over the batch mesh axes and, where the kv heads divide, the head axis (a Pallas
call is not partitioned by XLA); the kernel sees each device's rows and heads.

Off a TPU the same kernel runs in Pallas' interpreter: exact, for the parity tests, and orders
of magnitude slower than the reference; do not train with it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec

from qalign_jax import sharding

LANES = 128  # sequence lengths are padded to a multiple of this (the kernel's block unit)
_BLOCKS = (512, 256, 128)  # the largest that divides the padded length is every block size


def _libs():
    """jax's splash kernel and mask modules, imported on first use (they pull in Pallas)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel,
            splash_attention_mask,
        )
    except ImportError as e:
        raise ImportError(
            f"attention='splash' needs jax's Pallas splash kernel (jax {jax.__version__}: {e}); "
            "use attention='xla' or 'auto'."
        ) from e
    return splash_attention_kernel, splash_attention_mask


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, seq_len: int, interpret: bool):
    """The splash kernel for `num_heads` query heads over `seq_len` (a multiple of LANES)
    causal positions, with forward and backward block sizes."""
    kernel_lib, mask_lib = _libs()
    block = next(b for b in _BLOCKS if seq_len % b == 0)
    sizes = kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((seq_len, seq_len))] * num_heads)
    with jax.ensure_compile_time_eval():  # concrete mask tables, reusable across traces
        return kernel_lib.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _local(q, k, v, positions, *, interpret: bool):
    """Splash attention on one device's rows. q [B, T, N, H]; k, v [B, T, K, H]; positions
    [B, T] (-1: padding) -> [B, T, N, H]."""
    t, n, h = q.shape[1:]
    pad = -t % LANES
    segments = (positions >= 0).astype(jnp.int32)
    q = q * jnp.asarray(1.0 / np.sqrt(h), q.dtype)  # the kernel does not scale the scores
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)))  # segment 0: padding
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, H]
    kernel = _kernel(n, t + pad, interpret)
    segment_ids = _libs()[0].SegmentIds

    def one_row(q, k, v, seg):
        return kernel(q, k, v, segment_ids=segment_ids(q=seg, kv=seg))

    out = jax.vmap(one_row)(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t]


@functools.cache
def _warn_interpreter(platform: str):
    logging.warning(
        "attention='splash' on %s runs Pallas' interpreter (parity tests only: far slower than "
        "attention='xla')",
        platform,
    )


def attend(q, k, v, positions, platform: str):
    """Causal grouped-query attention by the splash kernel; see the module docstring.

    q: [B, T, N, H]; k, v: [B, T, K, H]; positions: [B, T] -> [B, T, N, H]. `platform`: the
    devices' platform ('tpu' runs the compiled kernel, anything else the interpreter).
    """
    interpret = platform != "tpu"
    if interpret:
        _warn_interpreter(platform)
    run = functools.partial(_local, interpret=interpret)
    active = sharding.active()
    if active is None or active[0].size == 1:
        return run(q, k, v, positions)
    mesh, rules = active
    # batch and kv heads as the rules place them; q's heads go with their kv heads
    spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), rules, mesh, k.shape)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, positions)
