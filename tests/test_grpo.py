"""The GRPO loop: rollout logprobs and masks, sharded step, exact resume, clear errors.

Tiny random policy and judge with the real tokenizer (configs/qalign_grpo_smoke.py)."""

import copy
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from qalign_jax import data, rollouts, sharding, train, train_state
from qalign_jax import judge as judge_lib
from qalign_jax.loops import grpo
from qalign_jax.models import llama, load
from tests.test_sft import assert_trees_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(arg=None):
    path = os.path.join(ROOT, "configs", "qalign_grpo_smoke.py")
    spec = importlib.util.spec_from_file_location("grpo_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.fixture(scope="module")
def setup():
    config = smoke_config()
    mesh = sharding.make_mesh(config.mesh.shape)
    policy = load.from_config(config, mesh)
    judge = judge_lib.from_config(config, policy)
    records = grpo.read_prompts(config)
    ids = data.chat_ids(policy.tokenizer, records, 64, "error")
    return config, policy, judge, records, ids


def grpo_rollout(config, policy, judge, rows, ids, seed, cache_len):
    """The GRPO loop's rollout call."""
    opts = rollouts.from_grpo_config(config.grpo, cache_len=cache_len)
    k_draft, k_revision = jax.random.split(jax.random.key(seed))
    return rollouts.rollout(policy, judge, rows, ids, opts, k_draft, k_revision)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_and_mask_match_the_training_forward(setup, temperature):
    """The sampler's logprobs (a diagnostic now) equal a training forward's within 2e-4, at the
    sampling temperature: log softmax(logits / T)."""
    config, policy, judge, records, ids = setup
    config = copy.deepcopy(config)
    config.grpo.temperature = temperature
    rows = [r for r in records[:2] for _ in range(4)]
    ro = grpo_rollout(config, policy, judge, rows, [ids[r.id] for r in rows], 1, cache_len=512)
    assert ro.rewards.shape == (8,) and all(len(s) > 0 for s in ro.suffix_ids)
    width = grpo.row_width(ro, 384)  # the batch's longest row, bucketed: narrower than 384
    assert width < 384 and width == judge_lib.length_bucket(
        max(len(s) for s in ro.sequence_ids) - 1, minimum=64
    )
    span = grpo.span_width(ro, width)  # draft, findings and continuation: all but the prompt
    longest = max(len(ro.draft_ids[i]) + len(ro.suffix_ids[i]) + len(ro.cont_ids[i])
                  for i in range(8))  # fmt: skip
    assert span == min(width, judge_lib.length_bucket(longest, minimum=16))
    batch = grpo.training_batch(ro, np.ones(8), width, policy.tokenizer.pad_id, span)
    assert batch["tokens"].shape == (8, width) and batch["targets"].shape == (8, span)
    logits, _ = jax.jit(functools.partial(llama.forward, policy.graphdef))(
        policy.params, batch["tokens"], batch["positions"]
    )
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, -1))
    index = batch["span_start"][:, None] + np.arange(span)  # [8, S] positions of the rows
    logp = np.take_along_axis(logp, index[..., None], 1)
    for i, seq in enumerate(ro.sequence_ids):  # each target is the next token of its row
        trained = batch["loss_mask"][i] > 0
        np.testing.assert_array_equal(batch["targets"][i][trained],
                                      np.asarray(seq)[index[i][trained] + 1])  # fmt: skip
    logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"] > 0
    np.testing.assert_allclose(logp[mask], batch["sampler_logp"][mask], atol=2e-4)
    for i in range(8):  # trained: the draft (its end of turn dropped) and the continuation
        n = len(ro.draft_ids[i]) + len(ro.cont_ids[i])
        assert mask[i].sum() == n
        first = len(ro.prompt_ids[i]) - 1  # the target of this position is the first draft token
        assert batch["span_start"][i] == min(first, width - span) and mask[i, first - index[i, 0]]
        if index[i, 0] < first:
            assert not mask[i, first - index[i, 0] - 1]
        suffix_at = first - index[i, 0] + len(ro.draft_ids[i])
        assert not mask[i, suffix_at : suffix_at + len(ro.suffix_ids[i])].any()


def test_single_pass_trains_the_draft_with_its_end_of_turn(setup):
    config, policy, judge, records, ids = setup
    single = smoke_config("single")
    rows = [r for r in records[:2] for _ in range(4)]
    ro = grpo_rollout(single, policy, judge, rows, [ids[r.id] for r in rows], 2, cache_len=0)
    assert all(not c for c in ro.cont_ids) and all(r is None for r in ro.revisions)
    np.testing.assert_allclose(ro.rewards, [v.scores.reward for v in ro.draft_verdicts])


def run_steps(mesh, host_params, batches, g):
    from qalign_jax import config as base

    opt = base.base_config().optimizer
    opt.lr, opt.warmup_ratio, opt.eps = 1e-3, 0.0, 1e-4  # eps: see tests/test_sft.py
    graphdef, abstract = llama.abstract_model(llama.get_preset("tiny"))
    tx, schedule = train_state.make_optimizer(opt, total_steps=10)
    _, state_sh = train_state.state_shardings(abstract, tx, mesh, sharding.DEFAULT_RULES)
    params = jax.device_put(host_params, state_sh.params)
    state = jax.jit(functools.partial(train_state.init_state, tx=tx), out_shardings=state_sh)(
        params
    )
    step = grpo.jit_grpo_step(graphdef, tx, schedule, state_sh, g, mesh, sharding.DEFAULT_RULES)
    out = []
    for b in batches:
        state, m = step(state, train_state.put_batch(b, grpo.batch_shardings(mesh)))
        out.append(jax.device_get(m))
    return jax.device_get(state.params), out


def test_rows_are_as_wide_as_the_batch_needs():
    ro = lambda *lengths: types.SimpleNamespace(sequence_ids=[[0] * n for n in lengths])  # noqa: E731
    assert grpo.row_width(ro(10, 51), 512) == 64  # 50 targets: at least 64
    assert grpo.row_width(ro(70, 97), 512) == 96  # 96 = 1.5 * 64
    assert grpo.row_width(ro(98), 512) == 128
    assert grpo.row_width(ro(300), 512) == 384
    assert grpo.row_width(ro(400), 320) == 320  # never wider than the longest possible row
    widths = {grpo.row_width(ro(n), 1024) for n in range(2, 1025)}
    assert widths == {64, 96, 128, 192, 256, 384, 512, 768, 1024}  # compiles stay few


def test_sharded_step_equals_single_device_step():
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    rng = np.random.default_rng(0)
    a, rows, t = 2, 8, 24
    tokens = rng.integers(3, cfg.vocab_size, (a, rows, t)).astype(np.int32)
    mask = (rng.random((a, rows, t)) > 0.3).astype(np.float32)
    batch = {
        "tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, rows, t)),
        "span_start": np.zeros((a, rows), np.int32),
        "targets": np.roll(tokens, -1, axis=-1), "loss_mask": mask,
        "old_logp": rng.normal(-10.5, 0.3, (a, rows, t)).astype(np.float32),
        "sampler_logp": rng.normal(-10.5, 0.3, (a, rows, t)).astype(np.float32),
        "ref_logp": rng.normal(-10.5, 0.3, (a, rows, t)).astype(np.float32),
        "advantages": rng.normal(0, 1, (a, rows)).astype(np.float32),
    }  # fmt: skip
    g = smoke_config().grpo
    g.num_iterations = 2  # so that the step reads the batch's (random) old log-probs
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    p1, m1 = run_steps(one, host_params, [batch, batch], g)
    p8, m8 = run_steps(sharding.make_mesh((1, 8, 1)), host_params, [batch, batch], g)
    for x, y in zip(m1, m8):
        for k in ("loss", "grad_norm", "kl", "clip_fraction", "entropy"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    assert m1[0]["clip_fraction"] > 0  # the random old log-probs put ratios outside the range
    assert_trees_close(p1, p8, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(host_params)[0])


def random_batch(cfg, seed=0, a=2, rows=8, t=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (a, rows, t)).astype(np.int32)
    noise = lambda: rng.normal(-6.0, 0.3, (a, rows, t)).astype(np.float32)  # noqa: E731
    return {
        "tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, rows, t)),
        "span_start": np.zeros((a, rows), np.int32), "targets": np.roll(tokens, -1, axis=-1),
        "loss_mask": (rng.random((a, rows, t)) > 0.3).astype(np.float32),
        "old_logp": noise(), "sampler_logp": noise(), "ref_logp": noise(),
        "advantages": rng.normal(0, 1, (a, rows)).astype(np.float32),
    }  # fmt: skip


def training_forward_logprobs(cfg, params, batch, temperature=1.0):
    """`grpo.token_logprobs` (what the loop computes) of a [A, rows, T] batch."""
    graphdef, _ = llama.abstract_model(cfg)
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    fn = sharding.jit(
        functools.partial(grpo.token_logprobs, graphdef=graphdef, temperature=temperature),
        mesh=one, rules=sharding.DEFAULT_RULES,
    )  # fmt: skip
    flat = [batch[k].reshape((-1,) + batch[k].shape[2:]) for k in grpo.ROWS_IN]
    return np.asarray(fn(params, *flat)).reshape(batch["targets"].shape)


def span_layout(batch, span, seed=0):
    """`batch` (full-width rows) with each row's loss mask kept on a random span of `span`
    positions, and the same batch in the span layout (per-target arrays [A, rows, span])."""
    rng = np.random.default_rng(seed)
    a, rows, t = batch["tokens"].shape
    start = rng.integers(0, t - span + 1, (a, rows)).astype(np.int32)
    index = start[..., None] + np.arange(span)
    keep = np.zeros((a, rows, t), np.float32)
    np.put_along_axis(keep, index, 1.0, axis=-1)
    full = dict(batch, loss_mask=batch["loss_mask"] * keep)
    spans = {k: np.take_along_axis(v, index, -1) if k in ("targets", "loss_mask", "old_logp",
             "sampler_logp", "ref_logp") else v for k, v in full.items()}  # fmt: skip
    return full, dict(spans, span_start=start)


def test_the_head_on_the_trained_spans_gives_the_full_rows_update():
    """The output head on each row's span only (`span_start`, [A, rows, S] targets) gives the
    update, loss, KL and entropy of the head on every position with the mask outside the span
    zero, on 8 devices; with several updates and the KL term on."""
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    g = smoke_config().grpo
    g.num_iterations, g.kl_beta = 2, 0.05
    full, spans = span_layout(random_batch(cfg), span=10)
    assert spans["targets"].shape == (2, 8, 10) and spans["tokens"].shape == (2, 8, 24)
    mesh = sharding.make_mesh((1, 8, 1))
    p_full, m_full = run_steps(mesh, host_params, [full, full], g)
    p_span, m_span = run_steps(mesh, host_params, [spans, spans], g)
    for x, y in zip(m_full, m_span):
        for k in ("loss", "grad_norm", "kl", "clip_fraction", "entropy", "trained_tokens"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    assert_trees_close(p_full, p_span, atol=1e-6)
    logp_full = training_forward_logprobs(cfg, host_params, full)
    index = spans["span_start"][..., None] + np.arange(10)
    np.testing.assert_allclose(training_forward_logprobs(cfg, host_params, spans),
                               np.take_along_axis(logp_full, index, -1), atol=1e-5)  # fmt: skip


def test_training_batch_spans_cover_every_trained_token():
    """Rows of different prompt lengths: each span starts at the row's first trained target
    (or earlier, when the row ends within S of its width) and holds all of its trained
    tokens; a span narrower than a row's trained extent is an error, not a cut."""

    def rollout(prompt, trained, untrained=0):  # ids, mask: prompt, trained, pad, trained
        ids = list(range(100, 100 + prompt + trained + untrained + 2))
        mask = [0] * prompt + [1] * trained + [0] * untrained + [1, 1]
        return ids, mask

    rows = [rollout(5, 3), rollout(20, 6, untrained=4), rollout(2, 1)]
    ro = types.SimpleNamespace(
        prompt_ids=[r[0][:1] for r in rows], sequence_ids=[r[0] for r in rows],
        trained_mask=[r[1] for r in rows], sampler_logp=[-np.arange(len(r[0])) for r in rows],
    )  # fmt: skip
    width = grpo.row_width(ro, 64)
    span = grpo.span_width(ro, width)
    assert (width, span) == (64, 16)  # the longest extent: 6 + 4 + 2 = 12 -> 16
    batch = grpo.training_batch(ro, np.zeros(3), width, 0, span)
    for i, (ids, mask) in enumerate(rows):
        trained_targets = [ids[j + 1] for j in range(len(ids) - 1) if mask[j + 1]]
        got = batch["targets"][i][batch["loss_mask"][i] > 0].tolist()
        assert got == trained_targets
        s0 = batch["span_start"][i]
        np.testing.assert_array_equal(
            batch["sampler_logp"][i][batch["loss_mask"][i] > 0],
            [-(j + 1) for j in range(len(ids) - 1) if mask[j + 1]],
        )
        assert s0 == mask.index(1) - 1
    with pytest.raises(ValueError, match="trains 12 positions > span 8"):
        grpo.training_batch(ro, np.zeros(3), width, 0, 8)


def test_one_update_per_batch_has_ratio_exactly_one_and_no_clipping():
    """mu = 1: the ratio's denominator is the training forward itself (stop_gradient), so the
    first update sees ratio == 1 on every token and clips nothing, whatever the sampler's
    log-probabilities were; their gap to the training forward is logged."""
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    g = smoke_config().grpo
    assert g.num_iterations == 1
    batch = random_batch(cfg)
    _, (m,) = run_steps(sharding.make_mesh((1, 8, 1)), host_params, [batch], g)
    assert m["ratio_mean"] == 1.0 and m["clip_fraction"] == 0.0
    assert m["grad_norm"] > 0
    train_logp = training_forward_logprobs(cfg, host_params, batch)
    mask = batch["loss_mask"]
    gap = np.sum(np.abs(train_logp - batch["sampler_logp"]) * mask) / mask.sum()
    assert m["sampler_logp_gap"] == pytest.approx(gap, rel=1e-4)


def test_the_loss_scores_tokens_at_the_sampling_temperature():
    """grpo.temperature = T: the step's log-probs, old and reference log-probs are those of
    softmax(logits / T), the distribution the rollouts were drawn from and the sampler records
    (`sampler_logp`): against it the gap and the KL are 0; at T = 1 they are not."""
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    batch = random_batch(cfg)
    tempered = training_forward_logprobs(cfg, host_params, batch, temperature=0.7)
    logits, _ = jax.jit(functools.partial(llama.forward, llama.abstract_model(cfg)[0]))(
        host_params, batch["tokens"][0], batch["positions"][0]
    )
    direct = jax.nn.log_softmax(logits / 0.7, -1)
    direct = np.take_along_axis(np.asarray(direct), batch["targets"][0][..., None], -1)[..., 0]
    np.testing.assert_allclose(tempered[0], direct, atol=1e-5)  # token_stats at T
    batch["sampler_logp"] = batch["ref_logp"] = tempered
    mesh = sharding.make_mesh((1, 8, 1))
    out = {}
    for temperature in (0.7, 1.0):
        g = smoke_config().grpo
        g.temperature, g.kl_beta = temperature, 0.1
        out[temperature] = run_steps(mesh, host_params, [batch], g)[1][0]
    assert out[0.7]["sampler_logp_gap"] < 1e-5 and abs(out[0.7]["kl"]) < 1e-6
    assert out[1.0]["sampler_logp_gap"] > 1e-2 and out[1.0]["kl"] > 1e-4
    assert out[0.7]["entropy"] < out[1.0]["entropy"]  # the sharper distribution's


def test_several_updates_per_batch_take_old_logprobs_from_the_training_forward():
    """mu > 1: the loop fills old_logp with `token_logprobs` of the policy before the first
    update, so that update's ratio is 1 up to float rounding (not the sampler's noise)."""
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    g = smoke_config().grpo
    g.num_iterations = 2
    batch = random_batch(cfg)
    batch["old_logp"] = training_forward_logprobs(cfg, host_params, batch)
    _, (first, second) = run_steps(sharding.make_mesh((1, 8, 1)), host_params, [batch] * 2, g)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["clip_fraction"] == 0.0
    assert second["ratio_mean"] != pytest.approx(1.0, abs=1e-5)  # the policy moved


def test_gspo_on_policy_update_equals_grpo_and_differs_off_policy():
    """At ratio 1 (the first update) d s_i = mean_t d logp_t: GSPO's and GSPO-token's step is
    GRPO's step, whatever the aggregation; off policy (old_logp from elsewhere) they differ."""
    cfg = llama.get_preset("tiny")
    host_params = jax.device_get(llama.init_params(cfg, seed=0))
    batch = random_batch(cfg)
    mesh = sharding.make_mesh((1, 8, 1))
    out = {}
    for loss in ("grpo", "gspo", "gspo_token"):
        g = smoke_config().grpo
        g.loss, g.aggregation, g.clip_low, g.clip_high = loss, "token_mean", 0.2, 0.2
        out[loss] = run_steps(mesh, host_params, [batch], g)
    for loss in ("gspo", "gspo_token"):
        assert_trees_close(out[loss][0], out["grpo"][0], atol=1e-6)
        assert out[loss][1][0]["ratio_mean"] == 1.0
    g = smoke_config().grpo
    g.num_iterations, g.loss = 2, "gspo"
    d = np.random.default_rng(1).uniform(-0.3, 0.3, batch["loss_mask"].shape)  # logp - old
    batch["old_logp"] = (training_forward_logprobs(cfg, host_params, batch) - d).astype(np.float32)
    _, (gspo,) = run_steps(mesh, host_params, [batch], g)
    g.loss = "grpo"
    _, (grpo_m,) = run_steps(mesh, host_params, [batch], g)
    assert gspo["loss"] != pytest.approx(grpo_m["loss"], rel=1e-3)
    mask = batch["loss_mask"]
    n = mask.sum(-1)
    s = np.exp((d * mask).sum(-1) / n)  # each row's sequence ratio, on each of its n tokens
    assert gspo["ratio_mean"] == pytest.approx((s * n).sum() / n.sum(), rel=1e-4)
    assert grpo_m["ratio_mean"] == pytest.approx((np.exp(d) * mask).sum() / n.sum(), rel=1e-4)


def start(workdir, *overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    log = open(str(workdir) + ".log", "w")
    cmd = [sys.executable, "-m", "qalign_jax.train", "--config", "configs/qalign_grpo_smoke.py",
           "--workdir", str(workdir), *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)


def test_sigkill_then_rerun_resumes_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a, b = start(straight), start(killed)
    deadline = time.time() + 400
    ckpt = killed / "ckpt"
    while not (ckpt.is_dir() and any(d.isdigit() for d in os.listdir(ckpt))):
        assert b.poll() is None, open(str(killed) + ".log").read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    assert not (killed / "hf").exists()
    assert a.wait(timeout=400) == 0, open(str(straight) + ".log").read()[-3000:]
    rerun = start(killed)
    assert rerun.wait(timeout=400) == 0, open(str(killed) + ".log").read()[-3000:]
    assert "resumed from" in open(str(killed) + ".log").read()
    assert (killed / "hf" / "model.safetensors").read_bytes() == (
        straight / "hf" / "model.safetensors"
    ).read_bytes()
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    train_rows = [r for r in rows if "rollout/reward_mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("train/kl", "train/clip_fraction", "train/entropy", "rollout/draft_score",
                "time/sampling_s", "time/judging_s", "time/training_s", "draft/harmlessness"):  # fmt: skip
        assert key in train_rows[-1], key
    assert len(train_rows[-1]) > 0 and (straight / "rollouts.jsonl").exists()
    for r in train_rows:  # each step's rows as wide as its longest, one compile per width
        assert r["train/row_width"] in (64, 96, 128, 192, 256, 384, 512), r["train/row_width"]
        assert 16 <= r["train/span_width"] <= r["train/row_width"]
    assert train_rows[-1]["train/row_widths_compiled"] == len(
        {(r["train/row_width"], r["train/span_width"]) for r in train_rows}
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_generations": 1}, "need G >= 2"),
        ({"prompts_per_step": 3, "num_generations": 2}, "not divisible by data x fsdp = 8"),
        ({"on_overlap": "maybe"}, "use one of"),
        ({"loss": "ppo"}, r"grpo.loss='ppo'; use one of"),
        ({"dynamic_sampling": "dapo"}, "grpo.dynamic_sampling='dapo'; use one of"),
    ],
)
def test_config_errors(tmp_path, overrides, message):
    config = smoke_config()
    for k, v in overrides.items():
        setattr(config.grpo, k, v)
    with pytest.raises(ValueError, match=message):
        train.run(config, str(tmp_path))


def test_overlap_with_priming_prompts(tmp_path):
    config = smoke_config()
    records = data.select_prompts(config.grpo.sources, config.seed)
    primed = tmp_path / "prime_data.jsonl"
    primed.write_text(json.dumps({"id": records[0].id}) + "\n")
    config.grpo.priming_data = str(primed)
    with pytest.raises(ValueError, match="also priming prompts"):
        grpo.read_prompts(config)
    config.grpo.on_overlap = "exclude"
    assert [r.id for r in grpo.read_prompts(config)] == [r.id for r in records[1:]]
    config.grpo.priming_data = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="run the priming stage first"):
        grpo.read_prompts(config)


def test_judge_options_must_be_single_tokens(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ngrades: {Excellent: 1.0, Terrible: -1.0}\nprinciples:\n"
        "  - id: harmlessness\n    dimensions:\n      - id: d\n        questions:\n"
        '          - {id: q, kind: graded, text: "How good"}\n'
    )
    config = smoke_config()
    config.judge.rubric = str(bad)
    with pytest.raises(Exception, match="single token"):
        train.run(config, str(tmp_path / "w"))


def test_prompts_for_step_is_a_pure_function_of_step():
    recs = list(range(5))
    a = [data.prompts_for_step(recs, s, 2, seed=0) for s in range(5)]
    assert a == [data.prompts_for_step(recs, s, 2, seed=0) for s in range(5)]
    flat = [x for batch in a for x in batch]
    assert sorted(flat[:5]) == recs and sorted(flat[5:]) == recs  # epochs cover every prompt


def test_malformed_revision_counts_as_unchanged_minus_the_penalty(setup, monkeypatch):
    config, policy, judge, records, ids = setup
    rows = [r for r in records[:2] for _ in range(4)]
    ro = grpo_rollout(config, policy, judge, rows, [ids[r.id] for r in rows], 1, cache_len=512)
    r1 = np.array([v.scores.reward for v in ro.draft_verdicts])
    for i in range(8):
        if ro.revision_verdicts[i] is None:  # random text never closes </Think>
            assert ro.errors[i] and ro.rewards[i] == pytest.approx(2 * r1[i] - 1.0)
    assert any(e is not None for e in ro.errors)


def test_resample_in_the_loop_is_bounded_and_masks_what_stays_flat(tmp_path):
    # A reward that never varies (the format component, single pass: always 0): every group is
    # zero-variance, so each step makes exactly max_resample_rounds extra rollout calls, then
    # trains on nothing (all B x G rows masked out of the loss).
    config = smoke_config("single")
    config.reward.components = (("fmt", "format", 1.0, {}),)
    config.grpo.num_steps = 1
    config.grpo.dynamic_sampling = "resample"
    config.grpo.max_resample_rounds = 2
    config.grpo.loss = "gspo"
    config.grpo.export_hf = False
    train.run(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    m = [r for r in rows if "grpo/extra_prompts" in r][-1]
    assert m["grpo/extra_prompts"] == 2 * config.grpo.prompts_per_step
    assert m["grpo/zero_variance_fraction"] == 1.0
    assert m["grpo/masked_rows"] == 8 and m["train/trained_tokens"] == 0


def test_label_mix_draws_a_fixed_count_of_each_label_every_step():
    recs = [data.PromptRecord(f"h{i}", "q", None, "harmful") for i in range(5)]
    recs += [data.PromptRecord(f"b{i}", "q", None, "benign") for i in range(10)]
    mix = {"harmful": 2, "benign": 2}
    steps = [data.prompts_for_step_by_label(recs, s, 4, 0, mix) for s in range(11)]
    # each label's stream is its own: the order of the mix changes nothing but the batch order
    swapped = [data.prompts_for_step_by_label(recs, s, 4, 0, dict(reversed(mix.items())))
               for s in range(11)]  # fmt: skip
    assert [sorted(r.id for r in b) for b in steps] == [sorted(r.id for r in b) for b in swapped]
    for batch in steps:  # 2 of each label in every step (a uniform draw varies, below)
        assert sorted(r.label for r in batch) == ["benign", "benign", "harmful", "harmful"]
    benign = [r.id for batch in steps[:5] for r in batch if r.label == "benign"]
    assert sorted(benign[:10]) == sorted(r.id for r in recs[5:15])  # an epoch of each label
    uniform = [data.prompts_for_step(recs, s, 4, 0) for s in range(11)]
    assert len({sum(r.label == "harmful" for r in b) for b in uniform}) > 1


@pytest.mark.parametrize(
    "mix,match",
    [({"harmful": 2, "benign": 1}, "draws 3 prompts per step; the counts must sum to"),
     ({"harmful": 4}, "has no count for label 'benign'"),
     ({"harmful": 2, "benign": 1.5, "none": 0.5}, "counts must be whole numbers"),
     ({"harmful": 2, "benign": 0, "none": 2}, r"no prompts have label\(s\) \['none'\]"),
     ({"harmful": 3, "benign": 1}, r"more prompts of a label per step than there are \(prompts "
      r"per label: \{'harmful': 1\}\)")],
)  # fmt: skip
def test_label_mix_errors(mix, match):
    recs = [
        data.PromptRecord("h", "q", None, "harmful"),
        data.PromptRecord("b", "q", None, "benign"),
    ]
    with pytest.raises(ValueError, match=match):
        data.check_label_mix(recs, mix, 4)
