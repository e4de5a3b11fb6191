"""The one rollout: lengths by hand, the result's rows and masks, two-pass vs single-pass, the
revision continuing the draft's cache, the reviser path, errors.

Tiny random policy and judge with the real tokenizer (configs/qalign_grpo_smoke.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from qalign_jax import data, reflection, rollouts, sampler, sharding
from qalign_jax import judge as judge_lib
from qalign_jax.loops import grpo
from qalign_jax.models import load
from tests.test_grpo import smoke_config

G = 4


@pytest.fixture(scope="module")
def setup():
    config = smoke_config()
    mesh = sharding.make_mesh(config.mesh.shape)
    policy = load.from_config(config, mesh)
    judge = judge_lib.from_config(config, policy)
    records = grpo.read_prompts(config)
    ids = data.chat_ids(policy.tokenizer, records, 64, "error")
    rows = [r for r in records[:2] for _ in range(G)]
    return config, policy, judge, rows, [ids[r.id] for r in rows]


def test_lengths_by_hand():
    # Two-pass: prompt 40 -> bucket 64, findings 100 -> bucket 128;
    # cache 64 + 128 + 128 + 192 = 512; row 40 + 128 + 100 + 192 = 460 -> 512 (multiple of 64).
    two = rollouts.rollout_lengths(
        40, draft_max_tokens=128, revision_max_tokens=192, findings_tokens=100
    )
    assert two == rollouts.RolloutLengths(64, 100, 128, 512, 512)
    # Single pass ignores the findings and the revision: cache 64 + 128, row 168 -> 192.
    one = rollouts.rollout_lengths(
        40, draft_max_tokens=128, revision_max_tokens=192, findings_tokens=100, two_pass=False
    )
    assert one == rollouts.RolloutLengths(64, 0, 0, 192, 192)
    # A prompt of 16 is exactly a bucket: cache 16 + 8 = 24, row 24 -> 64. Past the largest
    # bucket (8192), a multiple of it: 9000 -> 16384; row 9000 -> 9024.
    assert rollouts.rollout_lengths(16, draft_max_tokens=8, two_pass=False)[3:] == (24, 64)
    past = rollouts.rollout_lengths(9000, draft_max_tokens=0, two_pass=False)
    assert past.prompt_width == 16384 and past.seq_len == 9024


def test_two_pass_rows_masks_and_rewards(setup):
    config, policy, judge, rows, ids = setup
    tok = policy.tokenizer
    opts = rollouts.from_grpo_config(config.grpo)
    ro = rollouts.rollout(policy, judge, rows, ids, opts, *jax.random.split(jax.random.key(1)))
    n = len(rows)
    for field in ("draft_ids", "draft_logp", "draft_finish", "suffix_ids", "cont_ids",
                  "cont_logp", "cont_finish", "drafts", "findings", "thinks", "revisions", "errors",
                  "draft_verdicts", "revision_verdicts", "sequence_ids", "trained_mask",
                  "sampler_logp"):  # fmt: skip
        assert len(getattr(ro, field)) == n, field
    assert ro.rewards.shape == (n,) and ro.rewards.dtype == np.float64
    generated = 0
    for i in range(n):
        assert len(ro.draft_ids[i]) <= opts.draft_max_tokens
        assert len(ro.draft_logp[i]) == len(ro.draft_ids[i])
        assert len(ro.cont_logp[i]) == len(ro.cont_ids[i]) <= opts.revision_max_tokens
        assert not set(tok.stop_ids) & set(ro.draft_ids[i])  # the end of turn gave way
        assert ro.findings[i].endswith(reflection.THINK_OPEN)
        assert ro.suffix_ids[i] == tok.encode(ro.findings[i])
        parts = [ids[i], ro.draft_ids[i], ro.suffix_ids[i], ro.cont_ids[i]]
        assert ro.sequence_ids[i] == [t for p in parts for t in p]
        a, b = len(ids[i]), len(ids[i]) + len(ro.draft_ids[i])
        c = b + len(ro.suffix_ids[i])
        expected = np.zeros(len(ro.sequence_ids[i]), bool)
        expected[a:b] = expected[c:] = True
        np.testing.assert_array_equal(ro.trained_mask[i], expected)
        np.testing.assert_array_equal(ro.sampler_logp[i][a:b], ro.draft_logp[i])
        np.testing.assert_array_equal(ro.sampler_logp[i][c:], ro.cont_logp[i])
        assert not ro.sampler_logp[i][~expected].any()
        generated += len(ro.draft_ids[i]) + (ro.draft_finish[i] == "eos") + len(ro.cont_ids[i])
        # Malformed (random text rarely closes </Think>): not judged, R2 = R1 less the penalty.
        r1 = ro.draft_verdicts[i].scores.reward
        if ro.errors[i] is not None:
            assert ro.revision_verdicts[i] is None
            assert ro.rewards[i] == pytest.approx(2 * r1 - opts.malformed_penalty)
        else:
            assert ro.revision_verdicts[i] is not None
    assert ro.new_tokens == generated
    assert ro.timings["sampling"] > 0 and ro.timings["judging"] > 0


def test_revision_continues_the_drafts_cache(setup):
    """Pass 2 equals a fresh generate of prompt + draft + findings with the revision key."""
    config, policy, judge, rows, ids = setup
    opts = rollouts.from_grpo_config(config.grpo, batch_buckets=())
    k_draft, k_revision = jax.random.split(jax.random.key(3))
    ro = rollouts.rollout(policy, judge, rows, ids, opts, k_draft, k_revision)
    contexts = [p + d + s for p, d, s in zip(ids, ro.draft_ids, ro.suffix_ids)]
    cfg = sampler.SamplerConfig(
        max_new_tokens=opts.revision_max_tokens, temperature=opts.temperature, top_p=opts.top_p,
        stop_ids=tuple(policy.tokenizer.stop_ids),
    )  # fmt: skip
    fresh = sampler.generate(policy, contexts, cfg, k_revision)
    assert ro.cont_ids == fresh.tokens
    for a, b in zip(ro.cont_logp, fresh.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_single_pass_is_the_two_pass_draft_with_its_end_of_turn(setup):
    config, policy, judge, rows, ids = setup
    greedy = dict(temperature=0.0, cache_len=512)  # one cache size: the same pass 1
    two = rollouts.from_grpo_config(config.grpo, **greedy)
    one = dataclasses.replace(two, two_pass=False)
    k_draft, k_revision = jax.random.split(jax.random.key(4))
    a = rollouts.rollout(policy, judge, rows, ids, two, k_draft, k_revision)
    b = rollouts.rollout(policy, judge, rows, ids, one, k_draft)
    for i in range(len(rows)):
        eos = a.draft_finish[i] == "eos"  # single pass keeps (and trains) its end of turn
        assert b.draft_ids[i][: len(a.draft_ids[i])] == a.draft_ids[i]
        assert len(b.draft_ids[i]) == len(a.draft_ids[i]) + eos
        assert b.draft_finish[i] == a.draft_finish[i]
        assert b.sequence_ids[i] == ids[i] + b.draft_ids[i] and b.trained_mask[i].sum() == len(
            b.draft_ids[i]
        )
    assert b.suffix_ids == b.cont_ids == [[]] * len(rows)
    assert b.revisions == b.errors == b.revision_verdicts == b.cont_finish == [None] * len(rows)
    np.testing.assert_allclose(b.rewards, [v.scores.reward for v in b.draft_verdicts])
    # Without a judge: no verdicts, no rewards (evaluation's single pass).
    c = rollouts.rollout(policy, None, rows, ids, one, k_draft)
    assert c.draft_ids == b.draft_ids and c.draft_verdicts is None and c.rewards is None
    assert rollouts.final_answers(c) == c.drafts


def test_reviser_writes_pass_two_from_text(setup):
    config, policy, judge, rows, ids = setup
    opts = rollouts.RolloutConfig(draft_max_tokens=8, revision_max_tokens=6, think_max_tokens=4,
                                  temperature=0.7, top_p=0.95, max_findings=2)  # fmt: skip
    ro = rollouts.rollout(
        policy, judge, rows[:G], ids[:G], opts, *jax.random.split(jax.random.key(5)),
        reviser=policy,
    )  # fmt: skip
    assert ro.suffix_ids == ro.cont_ids == [[]] * G  # text only
    assert all(f in sampler.FINISH_REASONS for f in ro.cont_finish)
    assert all(f.endswith(reflection.THINK_OPEN) for f in ro.findings)
    # The reflection is closed for the reviser, so every continuation has its </Think>.
    assert all(e != "the reflection is never closed with </Think>" for e in ro.errors)
    assert all(t is not None for t in ro.thinks)
    assert ro.sequence_ids == [p + d for p, d in zip(ids[:G], ro.draft_ids)]


def test_final_answers_and_errors(setup):
    config, policy, judge, rows, ids = setup
    opts = rollouts.from_grpo_config(config.grpo)
    single = dataclasses.replace(opts, two_pass=False)
    ro = rollouts.rollout(policy, None, rows[:2], ids[:2], single, jax.random.key(6))
    ro = dataclasses.replace(ro, drafts=["d0", "d1"], revisions=["r0", "r1"], errors=[None, "bad"])
    assert rollouts.final_answers(ro) == ["r0", "d1"]
    # The exploit guard counts non-answers among the final answers: here "Thought process:".
    guard = dataclasses.replace(ro, revisions=["Thought process:", "r1"])
    assert rollouts.rollout_metrics(guard, judge.rubric)["rollout/not_substantive_rate"] == 0.5
    assert rollouts.rollout_metrics(ro, judge.rubric)["rollout/not_substantive_rate"] == 0.0
    with pytest.raises(ValueError, match="needs a judge"):
        rollouts.rollout(policy, None, rows[:2], ids[:2], opts, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a judge .* and revision_rng"):
        rollouts.rollout(policy, judge, rows[:2], ids[:2], opts, jax.random.key(0))
    with pytest.raises(ValueError, match="1 prompt id lists for 2 records"):
        rollouts.rollout(policy, judge, rows[:2], ids[:1], opts, jax.random.key(0))
