"""Multi-process JAX on localhost: 2 processes x 4 CPU devices against 1 process x 8.

The GRPO smoke run (configs/qalign_grpo_smoke.py, one two-pass step, checkpoint, HF export)
runs as two `jax.distributed` processes (gloo collectives) and must match the same run in one
process with 8 devices: same rollouts and rewards, same update. Each process feeds only its
own rows (`sharding.put_global` -> `jax.make_array_from_process_local_data`), and reads results
back with `sharding.to_host` (an all-gather); process 0 alone writes metrics and files.
The SFT smoke run does the same with per-process data: each process tokenizes and builds only
the rows of each batch that its devices hold.
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from qalign_jax import sharding, train
from tests import fake_gcs
from tests.test_grpo import ROOT, smoke_config
from tests.test_sft import load_config as load_sft_config

STEPS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(
    tmp_path, workdir, config: str, *overrides: str, module="qalign_jax.train", extra_env=None
) -> list:
    """`python -m qalign_jax.train` as 2 processes x 4 CPU devices; returns their log files."""
    port = free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(
            os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
            XLA_FLAGS="--xla_force_host_platform_device_count=4", **(extra_env or {}),
        )  # fmt: skip
        logs.append(tmp_path / f"{os.path.basename(str(workdir))}_proc{pid}.log")
        cmd = [sys.executable, "-m", module, "--config", config,
               "--workdir", str(workdir), *overrides, "--alsologtostderr"]  # fmt: skip
        out = open(logs[-1], "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
    try:
        for p, log in zip(procs, logs):
            assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return logs


def test_two_processes_match_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    logs = run_two_processes(
        tmp_path, two, "configs/qalign_grpo_smoke.py", f"--config.grpo.num_steps={STEPS}"
    )

    # The same run in this process: 8 devices, the same (1, 8, 1) mesh.
    config = smoke_config()
    config.grpo.num_steps = STEPS
    train.run(config, str(one))

    # Each process fed only the rows its 4 devices hold: process 1 the second half.
    text = logs[1].read_text()
    puts = re.findall(r"process 1 of 2 puts rows (\d+):(\d+) of (\d+)", text)
    assert puts, text[-3000:]
    for start, stop, total in puts:
        assert (int(start), int(stop)) == (int(total) // 2, int(total))
    assert "process 0 of 2 puts rows 0:" in logs[0].read_text()

    rows1 = [json.loads(line) for line in open(one / "metrics.jsonl")]
    rows2 = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert len(rows1) == len(rows2) >= STEPS  # process 1 wrote nothing of its own
    for r1, r2 in zip(rows1, rows2):
        for k, v in r1.items():
            if k.startswith("rollout/") or k in ("draft/harmlessness", "train/lr"):
                assert r2[k] == pytest.approx(v, rel=1e-6), k  # identical rollouts
            elif k.startswith("train/"):  # gloo vs in-process reductions: float32 order
                assert r2[k] == pytest.approx(v, rel=1e-3, abs=1e-6), k
    assert r1["train/grad_norm"] > 0
    lines = lambda d: open(d / "rollouts.jsonl").read().splitlines()  # noqa: E731
    assert [json.loads(x)["draft"] for x in lines(two)] == [
        json.loads(x)["draft"] for x in lines(one)
    ]
    w1 = load_file(str(one / "hf" / "model.safetensors"))
    w2 = load_file(str(two / "hf" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-5, err_msg=k)
    assert sorted(os.listdir(two / "ckpt")) == sorted(os.listdir(one / "ckpt"))


def test_sft_two_processes_each_tokenize_their_rows_and_match_one_process(tmp_path):
    two, one = tmp_path / "sft_two", tmp_path / "sft_one"
    overrides = ["--config.sft.num_steps=3", "--config.sft.eval_every=0"]
    logs = run_two_processes(tmp_path, two, "configs/sft_prime_smol.py:smoke", *overrides)
    config = load_sft_config("smoke")
    config.sft.num_steps, config.sft.eval_every = 3, 0
    train.run(config, str(one))

    # 18 train examples in batches of 8: process p holds rows 4p:4p+4 of each batch.
    for pid, log in enumerate(logs):
        held = re.search(
            rf"process {pid} of 2 holds rows (\d+):(\d+) of each micro-batch and tokenized "
            r"(\d+) train \(\d+ truncated\) \+ (\d+) eval", log.read_text())  # fmt: skip
        assert held, log.read_text()[-3000:]
        start, stop, n_train, n_eval = map(int, held.groups())
        assert (start, stop) == (4 * pid, 4 * pid + 4)
        # Epoch 0 has batches of 8, 8 and 2 rows; the 2 eval rows are both in process 0's half,
        # but the eval batch is built whole in each process (its row width, data.row_width
        # 'batch', is the whole batch's longest example: the same in both processes).
        assert (n_train, n_eval) == ((10, 2), (8, 2))[pid]
    rows1 = [json.loads(line) for line in open(one / "metrics.jsonl")]
    rows2 = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert len(rows1) == len(rows2)
    for r1, r2 in zip(rows1, rows2):
        for k, v in r1.items():
            if k.startswith(("train/", "eval/")) and not k.endswith("_per_s"):
                assert r2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_sft_two_processes_on_a_gs_workdir(tmp_path):
    """Both processes write checkpoints (through orbax), process 0 alone every other file, all
    of it on the (fake, see tests/fake_gcs.py) bucket; a rerun resumes from the bucket."""
    root = tmp_path / "gcs"
    overrides = ["--config.sft.num_steps=3", "--config.sft.eval_every=0",
                 "--config.checkpoint.every_steps=2", "--config.metrics.tensorboard=False"]  # fmt: skip
    run = functools.partial(
        run_two_processes, tmp_path, "gs://b/sft", "configs/sft_prime_smol.py:smoke",
        module="tests.fake_gcs", extra_env={"FAKE_GCS_ROOT": str(root)},
    )  # fmt: skip

    def train_steps():
        text = (root / "b" / "sft" / "metrics.jsonl").read_text()
        return [r["step"] for r in map(json.loads, text.splitlines()) if "train/loss" in r]

    run(*overrides)
    names = fake_gcs.objects(str(root), "b/sft")
    assert {"config.json", "metrics.jsonl", "hf/config.json", "hf/model.safetensors"} <= set(
        names
    ), names
    assert sorted(os.listdir(root / ".orbax" / "b" / "sft" / "ckpt")) == ["2", "3"]
    assert train_steps() == [1, 2, 3]

    logs = run(*overrides[1:], "--config.sft.num_steps=4")  # resumes at 3
    text = logs[0].read_text()
    assert "sft: resumed from" in text and "steps 3 -> 4" in text, text[-2000:]
    assert train_steps() == [1, 2, 3, 4]  # the first run's lines kept, none repeated


def test_put_global_and_to_host_round_trip_on_one_process():
    mesh = sharding.make_mesh((2, 4, 1))
    x = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8, 3, 5)
    sh = sharding.batch_sharding(mesh, 3)
    assert sharding.process_rows(sh, x.shape) == slice(0, 8)
    g = sharding.put_global(x, sh)
    assert g.sharding == sh
    np.testing.assert_array_equal(sharding.to_host({"a": g})["a"], x)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be an integer"),
    ],
)
def test_distributed_env_errors(monkeypatch, env, message):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = smoke_config()
    with pytest.raises(ValueError, match=message):
        sharding.initialize_distributed(config)
