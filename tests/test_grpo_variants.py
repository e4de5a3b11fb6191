"""DAPO's batch shaping by hand: zero-variance groups, the resampling bound, overlong rows."""

import os
import types

import numpy as np
import pytest

from qalign_jax import config as base
from qalign_jax import data, grpo_variants, reward_components, rollouts

SMOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "qalign_grpo_smol.py")  # fmt: skip
RUBRIC = reward_components.parse_components([("rubric", "rubric", 1.0, {})])


def fake_rollouts(rewards, tag, finish=None, cont_finish=None):
    """Rollouts of len(rewards) rows whose drafts are named `tag<i>`."""
    n = len(rewards)
    finish = finish or ["eos"] * n
    return rollouts.Rollouts(
        records=[data.PromptRecord(id=f"{tag}{i // 2}", prompt=f"p{tag}{i // 2}", category="x", label=None)
                 for i in range(n)],
        prompt_ids=[[1]] * n, draft_ids=[[2, 3]] * n, draft_logp=[np.zeros(2)] * n,
        draft_finish=list(finish), suffix_ids=[[]] * n, cont_ids=[[]] * n,
        cont_logp=[np.zeros(0)] * n, cont_finish=list(cont_finish or [None] * n),
        drafts=[f"{tag}{i}" for i in range(n)], findings=[None] * n, thinks=[None] * n,
        revisions=[None] * n, errors=[None] * n, draft_verdicts=None, revision_verdicts=[None] * n,
        rewards=np.asarray(rewards, np.float64), sequence_ids=[[1, 2, 3]] * n,
        trained_mask=[np.array([0, 1, 1], bool)] * n, sampler_logp=[np.zeros(3)] * n,
        new_tokens=2 * n, timings={"sampling": 1.0, "judging": 0.5},
    )  # fmt: skip


def score(ro):
    return reward_components.aggregate(RUBRIC, ro.rewards[None], 2)


def grpo_cfg(**kw):
    g = base.base_config().grpo
    for k, v in kw.items():
        g[k] = v
    return g


def test_defaults_are_the_papers():
    g = base.base_config().grpo
    assert (g.loss, g.dynamic_sampling, g.overlong) == ("grpo", "off", "keep")


def test_zero_variance_groups_are_masked_only_when_asked():
    ro = fake_rollouts([1, 1, 0, 1, 2, 2], "a")  # groups of 2: tie, varies, tie
    composed = score(ro)
    assert reward_components.informative_groups(composed).tolist() == [False, True, False]
    off = grpo_variants.masked_rows(ro, composed, grpo_cfg())
    drop = grpo_variants.masked_rows(ro, composed, grpo_cfg(dynamic_sampling="drop"))
    assert off.tolist() == [False] * 6
    assert drop.tolist() == [True, True, False, False, True, True]
    m = grpo_variants.step_metrics(ro, drop, 2 / 3, 0)
    assert m["grpo/masked_rows"] == 4 and m["grpo/zero_variance_fraction"] == pytest.approx(2 / 3)


def test_resample_keeps_informative_groups_within_the_bound():
    first = fake_rollouts([1, 1, 0, 1], "a")  # B = 2 groups: a0 ties, a1 varies
    extra = {1: fake_rollouts([2, 2, 3, 3], "b"), 2: fake_rollouts([0, 5, 1, 1], "c")}
    calls = []

    def draw(r):
        calls.append(r)
        return extra[r]

    got = grpo_variants.resample(first, score(first), draw, score, 2, max_rounds=2)
    assert calls == [1, 2] and got.rounds == 2 and got.extra_prompts == 4
    assert got.rollouts.drafts == ["a2", "a3", "c0", "c1"]  # a1, then c0: both vary
    assert [r.id for r in got.rollouts.records] == ["a1", "a1", "c0", "c0"]
    np.testing.assert_array_equal(got.rollouts.rewards, [0, 1, 0, 5])
    assert got.zero_variance_fraction == pytest.approx(4 / 6)  # a0, b0, b1, c1 of 6 groups
    assert got.rollouts.new_tokens == 24 and got.rollouts.timings["sampling"] == 3.0

    calls.clear()  # the bound: one extra call, then filled with the first zero-variance group
    got = grpo_variants.resample(first, score(first), draw, score, 2, max_rounds=1)
    assert calls == [1] and got.extra_prompts == 2
    assert got.rollouts.drafts == ["a2", "a3", "a0", "a1"]
    assert got.zero_variance_fraction == pytest.approx(3 / 4)
    assert reward_components.informative_groups(score(got.rollouts)).tolist() == [True, False]

    full = fake_rollouts([0, 1, 2, 3], "a")  # already B informative groups: no draw
    got = grpo_variants.resample(full, score(full), lambda r: 1 / 0, score, 2, max_rounds=5)
    assert got.rounds == 0 and got.rollouts.drafts == full.drafts


def test_resample_prompts_are_a_pure_function_of_seed_step_and_round():
    records = [types.SimpleNamespace(id=str(i)) for i in range(10)]
    a = grpo_variants.resample_prompts(records, 3, 1, 2, 0, 2)
    assert a == grpo_variants.resample_prompts(records, 3, 1, 2, 0, 2)
    assert a != grpo_variants.resample_prompts(records, 3, 2, 2, 0, 2)
    assert a != data.prompts_for_step(records, 3, 2, 0)  # not the main stream's


def test_resample_prompts_keep_the_label_mix():
    """Under `grpo.label_mix` each round's extra prompts hold the step's ratio of labels (a
    uniform draw from 2 harmful and 8 benign prompts would mostly add benign ones)."""
    records = [types.SimpleNamespace(id=str(i), label="harmful" if i < 2 else "benign")
               for i in range(10)]  # fmt: skip
    mix = {"harmful": 1, "benign": 1}
    for step in range(6):
        for r in (1, 2):
            more = grpo_variants.resample_prompts(records, step, r, 2, 0, 2, mix)
            assert sorted(x.label for x in more) == ["benign", "harmful"]
            assert more == grpo_variants.resample_prompts(records, step, r, 2, 0, 2, mix)
    main = data.prompts_for_step_by_label(records, 3, 2, 0, mix)
    assert grpo_variants.resample_prompts(records, 3, 1, 2, 0, 2, mix) != main


def test_truncated_rows_read_the_final_pass():
    ro = fake_rollouts(
        [0, 1, 2, 3], "a", finish=["length", "eos", "length", "eos"],
        cont_finish=["eos", "length", None, None],
    )  # fmt: skip
    assert grpo_variants.truncated_rows(ro).tolist() == [False, True, True, False]
    masked = grpo_variants.masked_rows(ro, score(ro), grpo_cfg(overlong="mask"))
    assert masked.tolist() == [False, True, True, False]
    m = grpo_variants.step_metrics(ro, masked, 0.0, 0)
    assert m["grpo/truncated_fraction"] == 0.5 and m["grpo/masked_rows"] == 2


def test_soft_overlong_penalty_is_added_to_the_reward():
    g = grpo_cfg(overlong="soft_penalty", overlong_cache_tokens=20)
    components = grpo_variants.with_overlong_penalty(RUBRIC, g)
    assert [c.name for c in components] == ["rubric", "overlong"]
    assert grpo_variants.with_overlong_penalty(RUBRIC, grpo_cfg()) == RUBRIC
    inputs = reward_components.RewardInputs(
        records=[data.PromptRecord(id="x", prompt="p", category="c", label=None)] * 4,
        completions=["a", "b", "c", "d"], rubric_rewards=np.array([1.0, 1.0, 1.0, 1.0]),
        answer_tokens=[50, 80, 90, 100], max_tokens=100,
    )  # fmt: skip
    composed = reward_components.compose(components, inputs, 4)
    # 0 up to 100 - 20 = 80 tokens, then linear to -1 at the limit: 0, 0, -0.5, -1.
    np.testing.assert_allclose(composed.totals, [1.0, 1.0, 0.5, 0.0])
    std = np.std([1.0, 1.0, 0.5, 0.0], ddof=1)
    np.testing.assert_allclose(
        composed.advantages, (np.array([1.0, 1.0, 0.5, 0.0]) - 0.625) / (std + 1e-6), rtol=1e-5
    )
    quarter = grpo_variants.with_overlong_penalty(RUBRIC, grpo_cfg(overlong="soft_penalty"))
    composed = reward_components.compose(quarter, inputs, 4)  # cache 0: a quarter, 25 tokens
    np.testing.assert_allclose(composed.totals, [1.0, 0.8, 0.4, 0.0])


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("loss", "ppo", r"grpo.loss='ppo'; use one of \('grpo', 'gspo', 'gspo_token'\)"),
        ("dynamic_sampling", "dapo", "grpo.dynamic_sampling='dapo'; use one of"),
        ("overlong", "cut", "grpo.overlong='cut'; use one of"),
        ("max_resample_rounds", -1, "must be >= 0"),
        ("overlong_cache_tokens", -4, "a quarter of the final pass"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        grpo_variants.check_config(grpo_cfg(**{field: value}))


def test_smol_config_recipes():
    gspo = base.load_file(SMOL + ":gspo").grpo
    dapo = base.load_file(SMOL + ":dapo").grpo
    for g in (gspo, dapo):
        grpo_variants.check_config(g)
    assert (gspo.loss, gspo.clip_low, gspo.clip_high) == ("gspo", 3e-4, 4e-4)
    assert (dapo.dynamic_sampling, dapo.overlong, dapo.kl_beta) == ("resample", "soft_penalty", 0)
    with pytest.raises(ValueError, match="':gspo', ':dapo'"):
        base.load_file(SMOL + ":gpso")
