"""The SFT loop: the sharded step equals the single-device step, gradient accumulation is exact,
the loss falls on the smoke config, and a non-finite loss stops the run with the last good
checkpoint intact."""

import functools
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import checkpoint, losses, metrics, sharding, train_state
from qalign_jax import config as base
from qalign_jax.loops import sft
from qalign_jax.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = llama.get_preset("tiny")


def load_config(arg="smoke", name="sft_prime_smol.py"):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", ["sft_prime_smol.py", "sft_prime_llama3_8b.py"])
def test_configs_load_and_reject_unknown_arguments(name):
    for arg in (None, "smoke"):
        c = load_config(arg, name)
        assert c.loop == "sft" and os.path.isfile(c.data.train_path)
    assert load_config("smoke", name).sft.global_batch_size % 8 == 0  # the 8 fake devices
    if "8b" in name:
        c = load_config(None, name)
        assert (c.model.param_dtype, c.model.dtype, c.model.remat) == (
            "float32",
            "bfloat16",
            "full",
        )
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("fast", name)


def random_batch(seed, accum, rows, seq_len, vocab):
    """[A, rows, T] right-padded rows with random lengths and a random trained span."""
    rng = np.random.default_rng(seed)
    shape = (accum, rows, seq_len)
    tokens = rng.integers(3, vocab, size=shape).astype(np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=shape[:2])
    idx = np.arange(seq_len)
    valid = idx < lengths[..., None]
    positions = np.where(valid, idx, -1).astype(np.int32)
    targets = np.concatenate([tokens[..., 1:], np.zeros(shape[:2] + (1,), np.int32)], axis=-1)
    loss_mask = ((idx >= 4) & (idx < lengths[..., None] - 1)).astype(np.float32)
    return {"tokens": tokens, "positions": positions, "targets": targets, "loss_mask": loss_mask}


def run_steps(mesh, host_params, batches, lr=1e-3):
    """Steps of the jitted train step on `mesh` from `host_params`: (host params, metrics).

    Adam's eps is raised from 1e-8 to 1e-4 here: Adam divides by sqrt(v) + eps, so a gradient
    entry near 1e-9 (an embedding row no token used) turns float rounding of the reduction order
    into a visible update (about lr * 1e-2); the comparison is of sharding, not of that.
    """
    opt = base.base_config().optimizer
    opt.lr, opt.warmup_ratio, opt.weight_decay, opt.eps = lr, 0.0, 0.1, 1e-4
    rules = sharding.DEFAULT_RULES
    graphdef, abstract = llama.abstract_model(TINY)
    tx, schedule = train_state.make_optimizer(opt, total_steps=10)
    _, state_sh = train_state.state_shardings(abstract, tx, mesh, rules)
    params = jax.device_put(host_params, state_sh.params)
    state = jax.jit(functools.partial(train_state.init_state, tx=tx), out_shardings=state_sh)(
        params
    )
    step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules)
    out = []
    for batch in batches:
        state, m = step(state, train_state.put_batch(batch, sft.batch_shardings(mesh)))
        out.append(jax.device_get(m))
    return jax.device_get(state.params), out


@pytest.fixture(scope="module")
def host_params():
    return jax.device_get(llama.init_params(TINY, seed=0))


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(host_params):
    """Two steps of 2 micro-batches x 8 rows on a single device: (batches, (params, metrics))."""
    batches = [random_batch(s, accum=2, rows=8, seq_len=32, vocab=TINY.vocab_size) for s in (1, 2)]
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return batches, run_steps(one, host_params, batches)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device_step(host_params, reference, shape):
    batches, (p1, m1) = reference
    p8, m8 = run_steps(sharding.make_mesh(shape), host_params, batches)
    for a, b in zip(m1, m8):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_trees_close(p1, p8, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(host_params)[0])  # it moved


def test_narrow_rows_give_the_update_of_rows_padded_to_seq_len(host_params, reference):
    """data.row_width='batch' changes the rows' width, not the step: the same batch padded to
    twice its width (positions -1, loss mask 0) gives the same update."""
    batches, (p_narrow, m_narrow) = reference
    pad = lambda k, v: np.pad(v, ((0, 0), (0, 0), (0, 32)), constant_values=-1 if k ==  # noqa: E731
                              "positions" else 0)  # fmt: skip
    wide = [{k: pad(k, v) for k, v in b.items()} for b in batches]
    assert wide[0]["tokens"].shape == (2, 8, 64)
    p_wide, m_wide = run_steps(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                               host_params, wide)  # fmt: skip
    for a, b in zip(m_narrow, m_wide):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["trained_tokens"] == b["trained_tokens"]
    assert_trees_close(p_narrow, p_wide, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(host_params, reference):
    batches, (p_acc, m_acc) = reference
    whole = [{k: v.reshape(1, 16, -1) for k, v in b.items()} for b in batches]
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    p_one, m_one = run_steps(one, host_params, whole)
    for a, b in zip(m_acc, m_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["trained_tokens"] == b["trained_tokens"]
    assert_trees_close(p_acc, p_one, atol=1e-6)


def test_nan_gradient_with_a_finite_loss_is_caught(host_params, monkeypatch):
    @jax.custom_vjp
    def poison(x):
        return x

    poison.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))
    real = losses.sft_loss_from_logp
    monkeypatch.setattr(
        losses, "sft_loss_from_logp", lambda logp, *a, **k: real(poison(logp), *a, **k)
    )
    batch = random_batch(4, accum=1, rows=8, seq_len=16, vocab=TINY.vocab_size)
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, (m,) = run_steps(one, host_params, [batch])
    assert np.isfinite(m["loss"]) and np.isnan(m["grad_norm"])
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss=\S+ or grad_norm=nan"):
        metrics.check_finite(1, float(m["loss"]), float(m["grad_norm"]))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The :smoke config end to end, in process: 20 steps, checkpoints at 15 and 20."""
    workdir = str(tmp_path_factory.mktemp("smoke"))
    sft.run(load_config("smoke"), workdir)
    return workdir


def test_smoke_loss_falls_and_everything_is_written(smoke_run):
    rows = metrics.read_metrics(smoke_run)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(train) == 20 and len(evals) == 3  # eval at 0, 10 and 20
    assert np.mean(train[-3:]) < np.mean(train[:3]) - 1.5, train
    assert evals[-1] < evals[0] - 0.5, evals
    assert {"train/grad_norm", "train/lr", "time/step_s", "train/tokens_per_s"} <= set(rows[-2])
    assert sorted(os.listdir(os.path.join(smoke_run, "ckpt"))) == ["15", "20"]  # keep = 2
    hf_dir = os.path.join(smoke_run, "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(hf_dir))


def test_nonfinite_loss_stops_and_the_last_checkpoint_stays_good(smoke_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    config = load_config("smoke")
    config.sft.num_steps = 24
    real = losses.sft_loss_from_logp
    monkeypatch.setattr(
        losses, "sft_loss_from_logp", lambda logp, *a, **k: real(logp * jnp.nan, *a, **k)
    )
    with pytest.raises(FloatingPointError) as err:
        sft.run(config, workdir)
    message = str(err.value)
    assert "step 21: non-finite loss=nan" in message
    assert "the last good checkpoint (step 20) is intact" in message
    assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["15", "20"]
    # The checkpoint restores, and holds exactly what the good run saved.
    abstract = checkpoint.with_shardings(
        llama.abstract_model(TINY.replace(vocab_size=49152))[1],
        sharding.param_shardings(llama.abstract_model(TINY.replace(vocab_size=49152))[1],
                                 sharding.make_mesh((1, -1, 1)), sharding.DEFAULT_RULES),
    )  # fmt: skip
    after, step = checkpoint.restore_params(workdir, abstract)
    before, _ = checkpoint.restore_params(smoke_run, abstract)
    assert step == 20
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert np.isfinite(np.asarray(x)).all()
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
