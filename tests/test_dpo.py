"""The DPO baseline: the loss by hand, pairs and masks, a smoke run with exact resume, errors.

Tiny random policy and judge with the real tokenizer (`configs/dpo_smol.py:smoke`)."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import data, losses, metrics, train
from qalign_jax.loops import dpo
from tests.test_train import ROOT


def smoke_config():
    spec = importlib.util.spec_from_file_location(
        "dpo_cfg", os.path.join(ROOT, "configs", "dpo_smol.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke")


def test_dpo_loss_by_hand():
    chosen, rejected = jnp.array([-10.0, -12.0]), jnp.array([-11.0, -10.0])
    ref_c, ref_r = jnp.array([-10.5, -12.0]), jnp.array([-10.5, -11.0])
    loss, m = losses.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    # Pair 1: rewards 0.5 * 0.5 = 0.25 and 0.5 * -0.5 = -0.25, margin 0.5:
    #   -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077.
    # Pair 2: rewards 0 and 0.5 * 1 = 0.5, margin -0.5: log(1 + e^0.5) = 0.974077.
    assert float(loss) == pytest.approx((0.474077 + 0.974077) / 2, abs=1e-6)
    assert float(m["accuracy_sum"]) == 1.0 and float(m["num_pairs"]) == 2.0
    assert float(m["margin_sum"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["chosen_reward_sum"]) == pytest.approx(0.25)
    assert float(m["rejected_reward_sum"]) == pytest.approx(0.25)
    # Label smoothing 0.1 on pair 1: 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077.
    loss, _ = losses.dpo_loss(chosen[:1], rejected[:1], ref_c[:1], ref_r[:1], beta=0.5,
                              label_smoothing=0.1)  # fmt: skip
    assert float(loss) == pytest.approx(0.524077, abs=1e-6)
    # Policy = reference: log 2, whatever the log-likelihoods.
    loss, _ = losses.dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    # The gradient raises the chosen answer: dL/dchosen = -beta * sigmoid(-margin).
    g = jax.grad(lambda c: losses.dpo_loss(c, rejected[:1], ref_c[:1], ref_r[:1], beta=0.5)[0])(
        chosen[:1]
    )
    assert float(g[0]) == pytest.approx(-0.5 / (1 + math.exp(0.5)), abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(chosen, rejected, ref_c, ref_r, label_smoothing=0.5)


def test_best_and_worst_and_ties():
    assert dpo.best_and_worst(np.array([0.1, 0.5, -0.2, 0.5]), 0.0) == (1, 2)
    assert dpo.best_and_worst(np.array([0.3, 0.3, 0.3]), 0.0) is None
    assert dpo.best_and_worst(np.array([0.3, 0.35]), 0.1) is None


def test_pair_rows_mask_the_answer_only():
    pair = {"id": "a", "prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}
    r = dpo.pair_rows([pair], "chosen", 8, pad_id=0)
    assert r["tokens"][0, :4].tolist() == [5, 6, 7, 8]
    assert r["targets"][0, :4].tolist() == [6, 7, 8, 9]
    assert r["mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # targets 8 and 9
    assert r["positions"][0].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    r = dpo.pair_rows([pair], "rejected", 8, pad_id=0)
    assert r["mask"][0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="seq_len"):
        dpo.pair_rows([pair], "chosen", 3, pad_id=0)


def test_smoke_run_pairs_loss_and_exact_resume(tmp_path):
    config = smoke_config()
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    with open(os.path.join(workdir, dpo.PAIRS_FILE)) as f:
        pairs = [json.loads(line) for line in f]
    assert 1 <= len(pairs) <= 8
    for p in pairs:
        assert p["chosen_reward"] == max(p["rewards"]) > p["rejected_reward"] == min(p["rewards"])
        assert len(p["rewards"]) == config.dpo.num_generations
    rows = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]  # lr 1e-3 on the same few pairs
    assert all(0.0 <= r["train/accuracy"] <= 1.0 for r in rows)
    longest = lambda ps: [len(p["prompt_ids"]) + max(len(p["chosen_ids"]),  # noqa: E731
                                                     len(p["rejected_ids"])) for p in ps]  # fmt: skip
    seq_len = -(-max(longest(pairs)) // 64) * 64
    for r in rows:  # each step's rows as wide as its pairs need (data.row_width='batch')
        step_pairs = data.prompts_for_step(pairs, r["step"] - 1, config.dpo.pairs_per_step,
                                           config.seed)  # fmt: skip
        want = data.batch_width([n - 1 for n in longest(step_pairs)], seq_len)
        assert r["train/row_width"] == want <= seq_len

    # Resume: the same command with more steps reuses the pairs (no sampling) and continues
    # from the checkpoint at step 3 (the data order is a pure function of the step, as GRPO's).
    config.dpo.num_steps = 4
    train.run(config, workdir)
    with open(os.path.join(workdir, dpo.PAIRS_FILE)) as f:
        assert [json.loads(line) for line in f] == pairs
    resumed = [r for r in metrics.read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:3] == rows  # the first run's lines are kept, step 4 appended
    assert resumed[3]["train/loss"] < rows[0]["train/loss"]


def test_bad_configs_say_what_to_fix(tmp_path):
    config = smoke_config()
    config.dpo.num_generations = 1
    with pytest.raises(ValueError, match="G >= 2"):
        train.run(config, str(tmp_path / "a"))
    config = smoke_config()
    config.dpo.grad_accum_steps = 3
    with pytest.raises(ValueError, match="multiple of dpo.grad_accum_steps"):
        train.run(config, str(tmp_path / "b"))
    os.makedirs(tmp_path / "c")
    with open(tmp_path / "c" / dpo.PAIRS_FILE, "w") as f:
        f.write('{"id": "x", "prompt_ids": [1]}\n')
    with pytest.raises(ValueError, match="missing fields.*delete it to resample"):
        dpo.read_pairs(str(tmp_path / "c" / dpo.PAIRS_FILE))


def test_read_pairs_names_a_broken_line(tmp_path):
    path = tmp_path / dpo.PAIRS_FILE
    good = '{"id": "x", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}\n'
    path.write_text(good + '{"id": "y", "prompt')  # written whole: a cut line is corruption
    with pytest.raises(ValueError, match=r"pairs.jsonl:2 is not JSON; delete the file"):
        dpo.read_pairs(str(path))
    path.write_text(good)
    assert [p["id"] for p in dpo.read_pairs(str(path))] == ["x"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no pairs; delete it to resample"):
        dpo.read_pairs(str(path))


def scripted_rollout(rows, rewards, drafts):
    """A single-pass `rollouts.Rollouts`-like result with given rubric rewards and drafts."""
    from types import SimpleNamespace

    n = len(rows)
    return SimpleNamespace(
        records=list(rows), rewards=np.asarray(rewards, np.float64), drafts=list(drafts),
        draft_ids=[[7, k] for k in range(n)], cont_ids=[[] for _ in range(n)],
        revisions=[None] * n, errors=[None] * n, findings=[None] * n, draft_verdicts=None,
        timings={"sampling": 1.0, "judging": 2.0},
    )  # fmt: skip


def test_pairs_are_ranked_by_the_composed_reward(tmp_path, monkeypatch):
    """With a refusal component, the refusing answer of a harmful prompt is chosen over a
    compliant one whatever the rubric says; no judge is needed without a rubric component."""
    from qalign_jax import data, rollouts

    config = smoke_config()
    config.dpo.num_generations, config.dpo.sample_batch_prompts = 2, 2
    config.reward.components = (("refusal", "refusal", 1.0, {}),)
    records = [data.PromptRecord(f"p{i}", f"prompt {i}", None, "harmful") for i in range(2)]
    judges = []

    def fake_rollout(policy, judge, rows, ids, opts, rng, *a, **kw):
        judges.append(judge)
        return scripted_rollout(rows, [1.0, 0.0] * 2,
                                ["Sure, here is how.", "I'm sorry, I can't help."] * 2)  # fmt: skip

    monkeypatch.setattr(rollouts, "rollout", fake_rollout)
    pairs, _ = dpo.make_pairs(config, None, "a judge", records, {r.id: [1] for r in records},
                              jax.random.key(0), str(tmp_path / dpo.SAMPLES_FILE))  # fmt: skip
    assert [p["chosen"] for p in pairs] == ["I'm sorry, I can't help."] * 2
    assert [p["chosen_reward"] for p in pairs] == [1.0, 1.0] and judges == [None]


def test_pair_sampling_resumes_after_the_last_finished_batch(tmp_path, monkeypatch):
    """`make_pairs` appends each batch's outcomes; a rerun samples only the unfinished batches,
    with the keys a fresh run gives them (fold_in of the batch's first prompt index)."""
    from qalign_jax import data, rollouts

    config = smoke_config()
    d = config.dpo
    d.num_generations, d.sample_batch_prompts, d.min_margin = 2, 2, 0.0
    records = [data.PromptRecord(f"p{i}", f"prompt {i}", "c", "harmful") for i in range(5)]
    prompt_ids = {r.id: [1, 2, 3] for r in records}
    calls = []

    def fake_rollout(policy, judge, rows, ids, opts, rng, *a, **kw):
        first = int(rows[0].id[1:])
        calls.append((first, int(jax.random.key_data(rng)[-1])))
        # Prompt i's two answers score (i, 0): a pair, except prompt 0's (0, 0), a tie.
        rewards = np.array([float(int(r.id[1:])) if j == 0 else 0.0
                            for r in rows[::2] for j in range(2)])  # fmt: skip
        return scripted_rollout(rows, rewards, [f"answer {k}" for k in range(len(rows))])

    monkeypatch.setattr(rollouts, "rollout", fake_rollout)
    rng = jax.random.key(3)
    path = str(tmp_path / dpo.SAMPLES_FILE)
    fresh, stats = dpo.make_pairs(config, None, None, records, prompt_ids, rng, path)
    assert [p["id"] for p in fresh] == ["p1", "p2", "p3", "p4"]  # p0 is a tie
    assert stats["pairs/ties_skipped"] == 1 and stats["time/judging_s"] == pytest.approx(6.0)
    fresh_calls = list(calls)
    assert [c[0] for c in fresh_calls] == [0, 2, 4]

    # Killed after the first batch: only prompts 2.. are sampled again, with the same keys.
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:2]) + "\n")
    calls.clear()
    resumed, _ = dpo.make_pairs(config, None, None, records, prompt_ids, rng, path)
    assert calls == fresh_calls[1:]
    assert resumed == fresh
