"""GRPO math by hand: group advantages, the clipped objective, each aggregation, the k3 KL,
GSPO's sequence ratio (and its token variant)."""

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
    with pytest.raises(ValueError, match=r"grpo.loss='gpso'; use one of"):
        losses.grpo_loss(LOGP, OLD, ADV, MASK, ratio_type="gpso")


# GSPO, 2 rows x 3 tokens, old log-probs 0: row 0 has log-ratios 0.3, 0, 0.3 (mean 0.2, so
# s_0 = e^0.2 = 1.2214) and A = +1; row 1 has -0.3, 0 and a masked third token whose log p (5.0)
# must not count (mean -0.15, s_1 = e^-0.15 = 0.8607) and A = -1.
G_LOGP = jnp.array([[0.3, 0.0, 0.3], [-0.3, 0.0, 5.0]])
G_OLD = jnp.zeros((2, 3))
G_MASK = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
S0, S1 = np.exp(0.2), np.exp(-0.15)


@pytest.mark.parametrize("ratio_type", ["gspo", "gspo_token"])
def test_gspo_sequence_ratio_and_clipping_by_hand(ratio_type):
    def loss_of(lp, clip_high, aggregation="seq_mean"):
        return losses.grpo_loss(
            lp, G_OLD, ADV, G_MASK, clip_high=clip_high, ratio_type=ratio_type,
            aggregation=aggregation,
        )  # fmt: skip

    ratio = losses.sequence_ratio(G_LOGP, G_OLD, G_MASK, per_token=ratio_type == "gspo_token")
    np.testing.assert_allclose(ratio, [[S0] * 3, [S1] * 3], rtol=1e-6)
    # clip_high 0.2: s_0 = 1.2214 > 1.2 with A > 0 is clipped (objective 1.2 on each token, no
    # gradient); s_1 = 0.8607 is inside [0.8, 1.2]: objective -s_1 on each of its 2 tokens.
    loss, m = loss_of(G_LOGP, 0.2)
    assert float(loss) == pytest.approx(-(1.2 - S1) / 2, abs=1e-6)
    assert float(m["clipped_sum"]) == 3  # the whole of row 0
    assert float(m["ratio_sum"]) == pytest.approx(3 * S0 + 2 * S1, abs=1e-5)
    # d loss / d logp_1t = -(1/2 seqs) * d(-s_1)/d logp_1t = s_1 / 2 * (1/2 tokens), the same
    # on both of row 1's tokens (per-token GRPO would give e^-0.3 / 4 and 1/4).
    grad = jax.grad(lambda lp: loss_of(lp, 0.2)[0])(G_LOGP)
    np.testing.assert_allclose(grad, [[0, 0, 0], [S1 / 4, S1 / 4, 0]], atol=1e-6)
    # clip_high 0.5: row 0 unclipped, d loss / d logp_0t = -(1/2) * s_0 * (1/3 tokens).
    loss, m = loss_of(G_LOGP, 0.5)
    assert float(loss) == pytest.approx(-(S0 - S1) / 2, abs=1e-6)
    assert float(m["clipped_sum"]) == 0
    grad = jax.grad(lambda lp: loss_of(lp, 0.5)[0])(G_LOGP)
    np.testing.assert_allclose(grad, [[-S0 / 6] * 3, [S1 / 4, S1 / 4, 0]], atol=1e-6)
    # token_mean: the sequence objective on each of the 5 tokens: (3 s_0 - 2 s_1) / 5;
    # gradient on row 1: -(1/5) * 2 tokens * (-s_1 / 2) = s_1 / 5 per token.
    loss, _ = loss_of(G_LOGP, 0.5, "token_mean")
    assert float(loss) == pytest.approx(-(3 * S0 - 2 * S1) / 5, abs=1e-6)
    grad = jax.grad(lambda lp: loss_of(lp, 0.5, "token_mean")[0])(G_LOGP)
    np.testing.assert_allclose(grad, [[-S0 / 5] * 3, [S1 / 5, S1 / 5, 0]], atol=1e-6)


def test_gspo_token_gradient_flows_through_each_token_and_kl_is_unchanged():
    # With one advantage per row the two variants agree in value and gradient (the paper's
    # remark); GSPO-token's ratio is sg[s] * exp(logp - sg[logp]): d ratio_t / d logp_u is
    # s * [t == u], where GSPO's is s / |y| for every u of the row.
    jac_tok = jax.jacobian(lambda lp: losses.sequence_ratio(lp, G_OLD, G_MASK, per_token=True))
    jac_seq = jax.jacobian(lambda lp: losses.sequence_ratio(lp, G_OLD, G_MASK))
    jt, js = np.asarray(jac_tok(G_LOGP)), np.asarray(jac_seq(G_LOGP))
    assert jt[0, 1, 0, 1] == pytest.approx(S0, rel=1e-6) and jt[0, 1, 0, 0] == 0
    assert js[0, 1, 0, 0] == pytest.approx(S0 / 3, rel=1e-6)
    assert js[1, 0, 1, 2] == 0  # the masked token is not in s_1
    ref = jnp.zeros((2, 3))
    for ratio_type in ("grpo", "gspo", "gspo_token"):
        _, m = losses.grpo_loss(
            G_LOGP, G_OLD, ADV, G_MASK, ref_logp=ref, kl_beta=0.1, ratio_type=ratio_type
        )
        kl = (np.exp(-0.3) + 0.3 - 1) * 2 + (np.exp(0.3) - 0.3 - 1)  # k3 with d = -logp
        assert float(m["kl_sum"]) == pytest.approx(kl, abs=1e-6)


def test_grpo_ratio_is_the_default_and_bit_identical():
    a = losses.grpo_loss(LOGP, OLD, ADV, MASK, kl_beta=0.1, ref_logp=OLD)
    b = losses.grpo_loss(LOGP, OLD, ADV, MASK, kl_beta=0.1, ref_logp=OLD, ratio_type="grpo")
    assert float(a[0]) == float(b[0]) and float(a[0]) != 0
