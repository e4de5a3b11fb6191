"""launch/: --help, missing arguments and a missing gcloud/sbatch fail early with clear messages;
--dry-run prints the commands (gcloud and SLURM are never called here)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
SLURM = os.path.join(ROOT, "launch", "gpu_slurm.sh")


def sh(*args, path=None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture()
def bare_path(tmp_path):
    """A PATH with the few tools the scripts use and no gcloud or sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help(script):
    r = sh(script, "--help") if script == SLURM else sh(script, "create", "--help")
    assert r.returncode == 0 and "--workdir" in r.stdout and "--dry-run" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "missing subcommand"),
        (["start"], "unknown subcommand 'start'"),
        (["create", "--zone", "z"], "--name is required"),
        (["create", "--name", "a"], "--zone is required"),
        (["create", "--name", "a", "--zone", "z"], "--type is required"),
        (["run", "--name", "a", "--zone", "z", "--workdir", "gs://b/w"], "--config is required"),
        (["run", "--name", "a", "--zone", "z", "--config", "c.py"], "--workdir is required"),
        (["logs", "--name", "a", "--zone", "z", "--run", "r", "--worker", "x"], "--worker must be"),
        (["delete", "--name", "a", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
    ],
)
def test_tpu_argument_errors(args, message, bare_path):
    r = sh(TPU, *args, path=bare_path)  # no gcloud: a check that is missing cannot reach it
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_tpu_without_gcloud(bare_path):
    r = sh(TPU, "delete", "--name", "a", "--zone", "z", path=bare_path)
    assert r.returncode == 2 and "gcloud is not installed" in r.stderr, r.stderr


def test_tpu_dry_run_commands():
    r = sh(TPU, "create", "--name", "a", "--zone", "z", "--type", "v5p-64", "--spot", "--dry-run")
    assert r.stdout.split()[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type v5p-64" in r.stdout and "--spot" in r.stdout
    r = sh(TPU, "create", "--name", "a", "--zone", "z", "--type", "v4-8", "--queued", "--dry-run")
    assert "queued-resources create a" in r.stdout and "--node-id a" in r.stdout
    r = sh(TPU, "run", "--name", "a", "--zone", "z", "--config", "configs/x.py",
           "--workdir", "gs://b/runs/x", "--dry-run", "--", "--config.seed=3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--worker=all" in r.stdout and "qalign_jax.train" in r.stdout
    assert "--config.seed=3" in r.stdout and "qalign_logs/x.log" in r.stdout


def test_slurm_errors_and_dry_run(bare_path):
    r = sh(SLURM, "--nodes", "2", "--config", "c.py", "--workdir", "/w", path=bare_path)
    assert r.returncode == 2 and "--gpus-per-node is required" in r.stderr
    r = sh(SLURM, "--nodes", "2", "--gpus-per-node", "8", "--config", "c.py", "--workdir", "gs://b",
           path=bare_path)  # fmt: skip
    assert r.returncode == 2 and "shared filesystem" in r.stderr
    args = ["--nodes", "2", "--gpus-per-node", "8", "--config", "c.py", "--workdir", "/w"]
    r = sh(SLURM, *args, path=bare_path)
    assert r.returncode == 2 and "sbatch is not on PATH" in r.stderr
    r = sh(SLURM, *args, "--dry-run", "--", "--config.seed=1")
    assert r.returncode == 0, r.stderr
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "JAX_COORDINATOR_ADDRESS=", "JAX_PROCESS_ID=$SLURM_PROCID", "--config.seed=1",
                 "/w/slurm/%j.%t.log"):  # fmt: skip
        assert want in r.stdout, want
