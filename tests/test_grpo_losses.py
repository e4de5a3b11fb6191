"""GRPO math by hand: group advantages, the clipped objective, each aggregation, the k3 KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import losses

# Two sequences of two tokens; old log-probs 0, so the ratios are exp(logp).
LOGP = jnp.log(jnp.array([[1.5, 1.0], [0.5, 1.0]]))
OLD = jnp.zeros((2, 2))
ADV = jnp.array([1.0, -1.0])
MASK = jnp.array([[1.0, 1.0], [1.0, 0.0]])
# Per-token objective, clip 0.2: row 0: min(1.5, 1.2) * 1 = 1.2 and 1.0; row 1: the ratio 0.5
# with A = -1 gives min(-0.5, -0.8) = -0.8; its second token is masked out.


def test_group_advantages_by_hand():
    adv = losses.group_advantages(np.array([0.0, 1.0]), 2)
    np.testing.assert_allclose(adv, [-0.5 / np.sqrt(0.5), 0.5 / np.sqrt(0.5)], rtol=1e-5)
    adv = losses.group_advantages(np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    np.testing.assert_allclose(adv, [-1, 0, 1, 0, 0, 0], atol=1e-5)  # sample std of 1,2,3 is 1
    adv = losses.group_advantages(np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scale_by_std=False)
    np.testing.assert_allclose(adv, [-1, 0, 1, 0, 0, 0])
    adv = losses.group_advantages(np.array([2.0, 4.0, 4.0, 6.0]), 4)  # mean 4, std sqrt(8/3)
    np.testing.assert_allclose(adv, np.array([-2, 0, 0, 2]) / np.sqrt(8 / 3), rtol=1e-5)
    with pytest.raises(ValueError, match="G >= 2"):
        losses.group_advantages(np.zeros(4), 1)
    with pytest.raises(ValueError, match="not whole groups of 3"):
        losses.group_advantages(np.zeros(4), 3)


@pytest.mark.parametrize(
    "aggregation,normalizer,expected",
    [
        ("seq_mean", None, -((1.2 + 1.0) / 2 + -0.8) / 2),  # -0.15
        ("token_mean", None, -(1.2 + 1.0 - 0.8) / 3),
        ("constant", 4.0, -(1.2 + 1.0 - 0.8) / 4),
        ("token_mean", 7.0, -(1.2 + 1.0 - 0.8) / 7),  # accumulation: the step's token count
    ],
)
def test_clipped_loss_each_aggregation(aggregation, normalizer, expected):
    loss, m = losses.grpo_loss(LOGP, OLD, ADV, MASK, aggregation=aggregation, normalizer=normalizer)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(m["clipped_sum"]) == 2  # both pushed tokens left the clip range
    assert float(m["num_tokens"]) == 3 and float(m["num_seqs"]) == 2
    assert float(m["kl_sum"]) == 0.0


def test_asymmetric_clip():
    loss, m = losses.grpo_loss(LOGP, OLD, ADV, MASK, clip_high=0.6, aggregation="token_mean")
    # row 0 token 0: the ratio 1.5 is now inside [0.8, 1.6]: objective 1.5
    assert float(loss) == pytest.approx(-(1.5 + 1.0 - 0.8) / 3, abs=1e-6)
    assert float(m["clipped_sum"]) == 1


def test_k3_kl_by_hand():
    kl = losses.k3_kl(LOGP, jnp.zeros((2, 2)))
    # d = ref - logp: for ratio 1.5, d = -log 1.5: 1/1.5 + log 1.5 - 1; for 0.5: 2 - log 2 - 1
    np.testing.assert_allclose(
        kl, [[1 / 1.5 + np.log(1.5) - 1, 0.0], [1 - np.log(2), 0.0]], atol=1e-6
    )
    assert np.all(np.asarray(losses.k3_kl(jnp.array([-3.0, 0.1]), jnp.array([-3.0, 0.1]))) == 0)
    loss, m = losses.grpo_loss(
        LOGP, OLD, ADV, MASK, ref_logp=jnp.zeros((2, 2)), kl_beta=0.1, aggregation="token_mean"
    )
    kl_terms = (1 / 1.5 + np.log(1.5) - 1) + (1 - np.log(2))
    assert float(loss) == pytest.approx(-(1.4 - 0.1 * kl_terms) / 3, abs=1e-6)
    assert float(m["kl_sum"]) == pytest.approx(kl_terms, abs=1e-6)


def test_gradient_is_zero_on_clipped_tokens():
    grad = jax.grad(lambda lp: losses.grpo_loss(lp, OLD, ADV, MASK)[0])(LOGP)
    # row 0 token 1: d(-ratio * A / 2 tokens / 2 seqs)/dlogp = -1 * 1 / 4; the clipped and the
    # masked tokens get no gradient.
    np.testing.assert_allclose(grad, [[0.0, -0.25], [0.0, 0.0]], atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="use one of"):
        losses.grpo_loss(LOGP, OLD, ADV, MASK, aggregation="sum")
    with pytest.raises(ValueError, match="needs a normalizer"):
        losses.grpo_loss(LOGP, OLD, ADV, MASK, aggregation="constant")
    with pytest.raises(ValueError, match="needs ref_logp"):
        losses.grpo_loss(LOGP, OLD, ADV, MASK, kl_beta=0.04)
