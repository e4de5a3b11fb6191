"""Checkpoints: exact resume after SIGKILL, unfinished saves never count, params for a later
stage, and the initial-params order."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qalign_jax import checkpoint, metrics, sharding
from qalign_jax.models import hf, llama, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = llama.get_preset("tiny")


def train_cmd(workdir):
    return [
        sys.executable, "-m", "qalign_jax.train", "--config", "configs/sft_prime_smol.py:smoke",
        "--workdir", str(workdir), "--config.sft.num_steps=8", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.keep=0", "--config.data.eval_size=0",
    ]  # fmt: skip


def start(workdir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    log = open(str(workdir) + ".log", "w")
    return subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=env, stdout=log, stderr=log)


def finished_steps(workdir):
    ckpt = os.path.join(workdir, "ckpt")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def test_sigkill_then_rerun_resumes_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a, b = start(straight), start(killed)  # side by side: they share no state
    deadline = time.time() + 240
    while not finished_steps(killed):
        assert b.poll() is None, open(str(killed) + ".log").read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    saved = finished_steps(killed)
    assert saved and saved[-1] < 8 and not os.path.exists(killed / "hf"), saved  # killed mid-run
    assert a.wait(timeout=240) == 0, open(str(straight) + ".log").read()[-3000:]

    rerun = start(killed)  # the same command again
    assert rerun.wait(timeout=240) == 0, open(str(killed) + ".log").read()[-3000:]

    # Final parameters equal bit for bit (the export is float32, the param dtype).
    assert (killed / "hf" / "model.safetensors").read_bytes() == (
        straight / "hf" / "model.safetensors"
    ).read_bytes()
    rows = metrics.read_metrics(str(killed))
    starts = [r for r in rows if "run/first_step" in r]
    assert [s["run/first_step"] for s in starts] == [0, starts[1]["run/first_step"]]
    first = starts[1]["run/first_step"]
    assert first in saved and first > 0  # resumed from a checkpoint, not from the start
    # Data position restored: 20 examples in batches of 8 make 3 steps per epoch, so after
    # step s the next batch is batch s % 3 of epoch s // 3.
    assert (starts[1]["data/epoch"], starts[1]["data/index"]) == (first // 3, first % 3)
    assert "resumed from" in starts[1]["run/origin"]
    # The same losses step by step (so the same batches in the same order).
    loss = lambda rs: [(r["step"], r["train/loss"]) for r in rs if "train/loss" in r]  # noqa: E731
    assert loss(rows) == loss(metrics.read_metrics(str(straight)))
    assert len(loss(rows)) == 8


def small_state(mesh):
    graphdef, abstract = llama.abstract_model(TINY)
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    params = llama.init_params(TINY, seed=1, shardings=shardings)
    state = checkpoint.TrainState(jax.numpy.zeros((), jax.numpy.int32), params, {"m": params})
    return state, checkpoint.with_shardings(abstract, shardings), shardings


def test_unfinished_save_is_never_latest_and_is_cleaned_up(tmp_path):
    mesh = sharding.make_mesh((1, -1, 1))
    state, _, _ = small_state(mesh)
    manager = checkpoint.make_manager(str(tmp_path), keep=3)
    checkpoint.save(manager, state, {"step": 3})
    checkpoint.save(manager, state, {"step": 5})
    manager.wait_until_finished()
    manager.close()
    # What a kill in the middle of saving step 5 leaves: the directory before orbax's final
    # rename (this orbax writes `<step>.orbax-checkpoint-tmp`, then renames it to `<step>`).
    ckpt = tmp_path / "ckpt"
    os.rename(ckpt / "5", ckpt / "5.orbax-checkpoint-tmp")
    manager = checkpoint.make_manager(str(tmp_path), keep=3)
    assert manager.latest_step() == 3
    assert sorted(os.listdir(ckpt)) == ["3"]  # the leftover is gone
    checkpoint.save(manager, state, {"step": 5})  # and step 5 can be saved again
    assert checkpoint.latest_step(manager) == 5
    manager.close()


def test_a_full_disk_is_one_clear_error_and_the_saved_checkpoints_stay(tmp_path, monkeypatch):
    mesh = sharding.make_mesh((1, -1, 1))
    state, _, _ = small_state(mesh)
    manager = checkpoint.make_manager(str(tmp_path), keep=1)
    checkpoint.save(manager, state, {"step": 3})
    manager.wait_until_finished()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"checkpoint of step 5 needs about .* GB in .*ckpt but "
                       r"only 0\.00 GB is free there") as err:  # fmt: skip
        checkpoint.save(manager, state, {"step": 5})
    assert err.value.errno == errno.ENOSPC
    assert checkpoint.latest_step(manager) == 3 and sorted(os.listdir(tmp_path / "ckpt")) == ["3"]
    manager.close()


def test_a_workdir_is_a_model_source(tmp_path):
    # One source switch (load.py): a run's workdir of orbax checkpoints loads like a GGUF or
    # a Hugging Face directory, with the architecture its config.json recorded.
    mesh = sharding.make_mesh((1, -1, 1))
    state, _, _ = small_state(mesh)
    workdir = tmp_path / "run"
    manager = checkpoint.make_manager(str(workdir), keep=2)
    checkpoint.save(manager, state, {"step": 4})
    manager.wait_until_finished()
    manager.close()
    assert load.resolve_source(str(workdir)) == ("orbax", str(workdir))
    with pytest.raises(FileNotFoundError, match="no config.json naming its model.source"):
        load.describe(str(workdir))
    cfg, tokenizer = load.describe(str(workdir), arch_source="random:tiny")
    assert cfg == TINY and tokenizer is None

    (workdir / "config.json").write_text(json.dumps({"model": {"source": "random:tiny"}}))
    assert load.describe(str(workdir), dtype="bfloat16")[0] == TINY.replace(dtype="bfloat16")
    model = load.load_model(str(workdir), mesh=mesh)
    assert model.cfg == TINY and model.source == str(workdir)
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == y.sharding


def test_next_stage_reads_params_from_a_workdir_or_a_hf_dir(tmp_path, monkeypatch):
    mesh = sharding.make_mesh((1, -1, 1))
    state, abstract, shardings = small_state(mesh)
    manager = checkpoint.make_manager(str(tmp_path / "sft"), keep=2)
    checkpoint.save(manager, state, {"step": 7})
    manager.wait_until_finished()
    manager.close()
    kw = dict(source="random:tiny", mesh=mesh, rules=sharding.DEFAULT_RULES, seed=0)

    params, origin = load.initial_params(TINY, shardings, init=str(tmp_path / "sft"), **kw)
    assert origin.endswith("(step 7)")
    monkeypatch.chdir(tmp_path)  # a relative workdir, as on the command line
    relative, _ = load.initial_params(TINY, shardings, init="sft", **kw)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), relative, params))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == y.sharding

    hf.export_hf(str(tmp_path / "hf"), TINY, state.params)
    params, origin = load.initial_params(TINY, shardings, init=str(tmp_path / "hf"), **kw)
    assert origin.startswith("Hugging Face weights")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    other = TINY.replace(num_layers=3)
    with pytest.raises(ValueError, match=r"architecture differs .*num_layers"):
        load.initial_params(other, shardings, init=str(tmp_path / "hf"), **kw)
    with pytest.raises(FileNotFoundError, match="neither a directory of orbax checkpoints"):
        load.initial_params(TINY, shardings, init=str(tmp_path), **kw)

    # No init: the model source (here a random init, seeded).
    params, origin = load.initial_params(TINY, shardings, init="", **kw)
    assert origin == "random init of tiny (seed 0)"


def test_restore_puts_every_array_on_its_sharding(tmp_path):
    mesh = sharding.make_mesh((1, -1, 1))
    state, abstract_params, _ = small_state(mesh)
    manager = checkpoint.make_manager(str(tmp_path), keep=1)
    meta = {"step": 4, "data": {"epoch": 1, "index": 0}, "rng": [0, 1]}
    checkpoint.save(manager, state, meta)
    manager.wait_until_finished()
    abstract = checkpoint.TrainState(
        jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=sharding.replicated(mesh)),
        abstract_params,
        {"m": abstract_params},
    )
    restored, got_meta = checkpoint.restore(manager, 4, abstract)
    manager.close()
    assert got_meta == meta and int(restored.step) == 4
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.spec == jax.tree.leaves(abstract_params)[0].sharding.spec
    assert json.loads(json.dumps(got_meta)) == meta
    assert isinstance(manager, ocp.CheckpointManager)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    import struct

    from tensorboardX.proto import event_pb2

    writer = metrics.MetricsWriter(str(tmp_path), resume_step=0, tensorboard=True)
    writer.write(1, {"train/loss": 2.5, "note": "text is JSONL only"})
    writer.write(2, {"train/loss": 1.5})
    writer.close()
    assert [r["train/loss"] for r in metrics.read_metrics(str(tmp_path))] == [2.5, 1.5]
    (events,) = os.listdir(tmp_path / "tb")
    data, scalars = (tmp_path / "tb" / events).read_bytes(), []
    while data:  # TFRecord: length, its crc, the event, its crc
        (n,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12 : 12 + n])
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        data = data[16 + n :]
    assert scalars == [(1, "train/loss", 2.5), (2, "train/loss", 1.5)]


def test_rl_base_model_is_not_loaded_when_reference_and_judge_are_both_separate():
    from tests.test_grpo import smoke_config

    config = smoke_config()
    mesh = sharding.make_mesh(config.mesh.shape)
    loaded = load.base_model(config, mesh)  # the judge and the reference: loaded
    assert loaded.params is not None
    config.checkpoint.init, config.judge.source = "some/primed/workdir", "random:tiny"
    shapes_only = load.base_model(config, mesh)
    assert shapes_only.params is None and shapes_only.cfg == loaded.cfg
    assert shapes_only.tokenizer.vocab_size == loaded.tokenizer.vocab_size
    _, abstract = llama.abstract_model(shapes_only.cfg)
    merged = jax.tree.map(lambda a, b: a.shape == b.shape, loaded.params, abstract)
    assert all(jax.tree.leaves(merged))  # its graphdef runs the loaded model's params
