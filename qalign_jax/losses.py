"""Training losses: pure functions of logits and batch arrays, float32 throughout.

Owns the objectives of every training loop, one section each:
  SFT   `sft_loss`: masked token cross-entropy (the priming stage, IterAlign's distillation).
  GRPO  `group_advantages`, `grpo_loss` (clipped ratio per token, or per sequence as GSPO;
        k3 KL to the reference; three token aggregations).
  DPO   `sequence_log_likelihood`, `dpo_loss`: the sigmoid preference loss on chosen/rejected
        pairs against a frozen reference (Rafailov et al. 2023), optionally label-smoothed.

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
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return sft_loss_from_logp(token_log_likelihood(logits, targets), correct, mask, normalizer)


def sft_loss_from_logp(logp, correct, mask, normalizer=None):
    """`sft_loss` from per-position log p(target) and argmax hits ([B, T] each), as
    `llama.token_stats` gives them without materializing the logits."""
    mask = mask.astype(jnp.float32)
    nll_sum = -jnp.sum(logp * mask)
    num_tokens = jnp.sum(mask)
    if normalizer is None:
        normalizer = num_tokens
    loss = nll_sum / jnp.maximum(normalizer, 1.0)
    metrics = {"nll_sum": nll_sum, "num_tokens": num_tokens, "num_correct": jnp.sum(correct * mask)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# GRPO.

AGGREGATIONS = ("seq_mean", "token_mean", "constant")
RATIOS = ("grpo", "gspo", "gspo_token")  # `grpo.loss`: where the importance ratio lives


def group_advantages(rewards, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True):
    """Group-normalized advantages (GRPO): (r - mean_group) / (std_group + eps).

    Args:
      rewards: [B * G] rewards, the G samples of each prompt consecutive.
      group_size: G (>= 2).
      eps: added to the std, so that a group of equal rewards gets advantages 0, not NaN.
      scale_by_std: False gives Dr. GRPO's r - mean (no division, no difficulty bias).

    Returns:
      [B * G] float32 advantages. The std is the sample std (ddof = 1), as TRL's and
      DeepSeekMath's GRPO; a group of G = 2 with rewards 0 and 1 gets -0.707 and +0.707.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}; GRPO needs G >= 2 samples per prompt.")
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards are not whole groups of {group_size}.")
    r = r.reshape(-1, group_size)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale_by_std:
        adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token KL(policy || reference) estimate k3 = exp(d) - d - 1, d = ref - policy (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def sequence_ratio(logp, old_logp, mask, *, per_token: bool = False) -> jax.Array:
    """GSPO's ratio s_i = exp(mean over row i's masked tokens of logp - old_logp), as [B, T].

    per_token=False: s_i broadcast over the row (GSPO); True: sg[s_i] * exp(logp - sg[logp])
    (GSPO-token: the same values, each token's gradient through its own log p). A row without
    trained tokens gets s = 1.
    """
    seq_tokens = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    d = jnp.where(mask > 0, logp - old_logp, 0.0)  # padding never reaches the mean
    s = jnp.exp(d.sum(axis=1, keepdims=True) / seq_tokens)  # [B, 1]
    if not per_token:
        return jnp.broadcast_to(s, logp.shape)
    return jax.lax.stop_gradient(s) * jnp.exp(logp - jax.lax.stop_gradient(logp))


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_logp: jax.Array | None = None,
    kl_beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "seq_mean",
    normalizer: float | jax.Array | None = None,
    ratio_type: str = "grpo",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped GRPO objective with an optional k3 KL penalty, as a loss to minimize.

    Per token: ratio = exp(logp - old_logp),
      obj = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) - kl_beta * k3,
    and the loss is -obj aggregated over the trained tokens by `aggregation`:
      'seq_mean':   mean over each sequence's tokens, then mean over sequences (GRPO paper);
      'token_mean': sum over all tokens / number of tokens (DAPO);
      'constant':   sum over all tokens / `normalizer` (Dr. GRPO: e.g. max length x rows).
    `normalizer` also serves gradient accumulation for 'token_mean' (pass the step's token
    count) and 'seq_mean' (pass the step's sequence count); None = this batch's own count.

    `ratio_type` (`grpo.loss`) chooses the importance ratio; clipping, KL and aggregation are
    the same for all three:
      'grpo':       per token, exp(logp_t - old_logp_t).
      'gspo':       GSPO (arXiv 2507.18071): per sequence, the geometric mean of its token
                    ratios s_i = exp(mean_t(logp - old_logp)) over the row's trained tokens,
                    clipped per sequence; every token of row i carries s_i.
      'gspo_token': GSPO-token: s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]); its value is s_i
                    (so is the clipping), its gradient flows through each token's own log p.
    (The GSPO paper clips s_i far tighter than GRPO, e.g. 3e-4 / 4e-4: set clip_low/high.)

    Args:
      logp, old_logp: [B, T] log p of the sampled tokens under the policy being trained and
        under the old policy (the training forward before this batch's first update; see
        `loops/grpo.grpo_step`).
      advantages: [B] one advantage per sequence.
      mask: [B, T] 1 on the policy's own trained tokens.
      ref_logp: [B, T] under the frozen reference (needed when kl_beta > 0).

    Returns:
      (loss [], metrics) with sums: `objective_sum`, `kl_sum`, `clipped_sum` (tokens whose
      ratio left the clip range in the direction the advantage pushes), `ratio_sum`,
      `num_tokens`, `num_seqs`.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; use one of {AGGREGATIONS}.")
    if aggregation == "constant" and normalizer is None:
        raise ValueError("aggregation='constant' needs a normalizer (e.g. max length x rows).")
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp (the reference model's log-probs).")
    if ratio_type not in RATIOS:
        raise ValueError(f"grpo.loss={ratio_type!r}; use one of {RATIOS}.")
    mask = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    if ratio_type == "grpo":
        ratio = jnp.exp(logp - old_logp)
    else:
        ratio = sequence_ratio(logp, old_logp, mask, per_token=ratio_type == "gspo_token")
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    obj = jnp.minimum(ratio * adv, clipped_ratio * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(logp)
    per_token = obj - kl_beta * kl
    num_tokens = mask.sum()
    seq_tokens = mask.sum(axis=1)
    num_seqs = (seq_tokens > 0).sum().astype(jnp.float32)
    if aggregation == "seq_mean":
        per_seq = (per_token * mask).sum(axis=1) / jnp.maximum(seq_tokens, 1.0)
        total = per_seq.sum()
        denom = num_seqs if normalizer is None else normalizer
    else:
        total = (per_token * mask).sum()
        denom = num_tokens if normalizer is None else normalizer
    loss = -total / jnp.maximum(denom, 1.0)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    metrics = {
        "objective_sum": (obj * mask).sum(),
        "kl_sum": (kl * mask).sum(),
        "clipped_sum": (clipped * mask).sum(),
        "ratio_sum": (ratio * mask).sum(),
        "num_tokens": num_tokens,
        "num_seqs": num_seqs,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# DPO.


def sequence_log_likelihood(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed log p(target) over the masked positions of each row.

    Args:
      logits: [B, T, V]; targets: [B, T] int32; mask: [B, T] 1 on the scored (answer) tokens.

    Returns:
      [B] float32 sums: log p(answer | prompt) of each row.
    """
    return jnp.sum(token_log_likelihood(logits, targets) * mask.astype(jnp.float32), axis=-1)


def dpo_loss(
    chosen_logp: jax.Array,
    rejected_logp: jax.Array,
    ref_chosen_logp: jax.Array,
    ref_rejected_logp: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    normalizer: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sigmoid DPO loss (Rafailov et al. 2023), label-smoothed as in cDPO / TRL.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) per pair,
      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
    averaged over the pairs (or divided by `normalizer`, the step's pair count, under gradient
    accumulation). At the start (policy = reference) h = 0 and the loss is log 2.

    Args:
      chosen_logp, rejected_logp: [P] summed answer log-likelihoods under the policy.
      ref_chosen_logp, ref_rejected_logp: [P] the same under the frozen reference.
      beta: the inverse temperature of the implicit reward beta * log(pi / ref).
      label_smoothing: eps in [0, 0.5): the assumed probability that a preference is flipped.

    Returns:
      (loss [], metrics) with sums over pairs: `loss_sum`, `accuracy_sum` (pairs with h > 0),
      `margin_sum` (beta h), `chosen_reward_sum`, `rejected_reward_sum`, `num_pairs`.
    """
    if beta <= 0:
        raise ValueError(f"dpo beta={beta}; it must be > 0.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}; it must be in [0, 0.5).")
    chosen_reward = beta * (chosen_logp - ref_chosen_logp).astype(jnp.float32)
    rejected_reward = beta * (rejected_logp - ref_rejected_logp).astype(jnp.float32)
    margin = chosen_reward - rejected_reward  # beta * h
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin)
    per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-margin)
    num_pairs = jnp.asarray(per_pair.shape[0], jnp.float32)
    denom = num_pairs if normalizer is None else normalizer
    loss = jnp.sum(per_pair) / jnp.maximum(denom, 1.0)
    metrics = {
        "loss_sum": jnp.sum(per_pair),
        "accuracy_sum": jnp.sum((margin > 0).astype(jnp.float32)),
        "margin_sum": jnp.sum(margin),
        "chosen_reward_sum": jnp.sum(chosen_reward),
        "rejected_reward_sum": jnp.sum(rejected_reward),
        "num_pairs": num_pairs,
    }
    return loss, metrics
