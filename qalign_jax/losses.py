"""Training losses: pure functions of logits and batch arrays, float32 throughout.

Owns the objectives of every training loop, one section each:
  SFT   `sft_loss`: masked token cross-entropy (the priming stage, IterAlign's distillation).
  GRPO  (a later stage): group-normalized advantages, clipped ratio, KL to the reference.
  DPO   (a later stage): the preference loss on chosen/rejected pairs.

Invariants:
- Inputs are `[B, T, V]` float32 logits (the model returns float32 logits whatever its compute
  dtype) and `[B, T]` targets and masks; the math runs in float32.
- Each loss returns `(loss, metrics)` where `metrics` holds *sums* (of log-likelihoods, tokens,
  correct predictions), never means, so that micro-batches, devices and eval batches combine
  exactly by adding, whatever the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Shared pieces.


def token_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) of every position.

    Args:
      logits: [B, T, V] unnormalized scores (any float dtype; computed in float32).
      targets: [B, T] int32 target ids.

    Returns:
      [B, T] float32 log-probabilities of the targets.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return target_logits - log_z


# ---------------------------------------------------------------------------------------------
# SFT.


def sft_loss(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    normalizer: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross-entropy over the positions where `mask` is 1.

    Args:
      logits: [B, T, V] logits of the next token at every position.
      targets: [B, T] int32 next-token ids (the input shifted left by one).
      mask: [B, T] 1 where the target is trained, 0 for prompt, untrained segments and padding.
      normalizer: the token count to divide by; None = `mask.sum()`. Gradient accumulation
        passes the trained-token count of the *whole* step, so that the micro-batch losses add
        up to the token mean of the global batch however it is split.

    Returns:
      (loss [] float32, metrics) with metrics `nll_sum` (sum of -log p over trained tokens),
      `num_tokens` (trained tokens) and `num_correct` (trained tokens whose argmax is the
      target), all float32 sums.
    """
    mask = mask.astype(jnp.float32)
    nll = -token_log_likelihood(logits, targets)  # [B, T]
    nll_sum = jnp.sum(nll * mask)
    num_tokens = jnp.sum(mask)
    if normalizer is None:
        normalizer = num_tokens
    loss = nll_sum / jnp.maximum(normalizer, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"nll_sum": nll_sum, "num_tokens": num_tokens, "num_correct": jnp.sum(correct * mask)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# GRPO: added by the GRPO stage.

# ---------------------------------------------------------------------------------------------
# DPO: added by the DPO stage.
