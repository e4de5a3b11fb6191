"""`--workdir gs://...`: every file of a run goes to the bucket, none to local disk.

gs:// is served by `tests/fake_gcs.py` (a local directory behind fsspec's gs protocol, as
strict as Cloud Storage about appends and directories; orbax gets a local directory for each
gs:// checkpoint directory, since its gcs driver cannot be faked; see that module).
"""

import os
import types

import pytest

from qalign_jax import config as config_lib
from qalign_jax import files, metrics, sharding, train
from qalign_jax.models import llama, load
from tests import fake_gcs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """The fake bucket's `root` directory (gs://b/x is root/b/x), empty. TensorBoard's event
    files would go to gs:// through tensorboardX's own Cloud Storage client, which needs
    credentials: the fixture records where they would go instead (`tb_dirs`)."""
    root = tmp_path / "gcs"
    fake_gcs.install(str(root), monkeypatch)
    tb_dirs = []
    monkeypatch.setattr(metrics, "_open_tensorboard", lambda logdir: tb_dirs.append(logdir))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may land in the working directory either
    return types.SimpleNamespace(root=root, tb_dirs=tb_dirs)


def objects(bucket, prefix):
    return fake_gcs.objects(str(bucket.root), prefix)


def test_files_on_a_bucket(bucket):
    d = "gs://b/run"
    assert not files.exists(d) and not files.isdir(d)
    files.makedirs(d)  # a no-op on a bucket
    files.write_json(f"{d}/a.json", {"x": 1})
    files.append_jsonl(f"{d}/rows.jsonl", [{"i": 0}])
    files.append_jsonl(f"{d}/rows.jsonl", [{"i": 1}, {"i": 2}])  # a read and a rewrite
    files.write_bytes(f"{d}/sub/img.png", b"\x89PNG")
    assert files.isdir(d) and files.read_json(f"{d}/a.json") == {"x": 1}
    assert [r["i"] for r in files.read_jsonl(f"{d}/rows.jsonl")] == [0, 1, 2]
    assert sorted(files.listdir(d)) == ["a.json", "rows.jsonl", "sub"]
    assert objects(bucket, "b") == ["run/a.json", "run/rows.jsonl", "run/sub/img.png"]


def test_copy_dir_uploads_a_tree(bucket, tmp_path):
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "w.bin").write_bytes(os.urandom(1000))
    (tmp_path / "src" / "deep" / "t.json").write_text("{}")
    files.copy_dir(str(tmp_path / "src"), "gs://b/out")
    assert objects(bucket, "b/out") == ["deep/t.json", "w.bin"]
    assert (bucket.root / "b/out/w.bin").read_bytes() == (tmp_path / "src" / "w.bin").read_bytes()


def test_metrics_on_a_bucket_are_buffered_and_truncated_on_resume(bucket):
    w = metrics.MetricsWriter("gs://b/run", tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": 1.0 / step})
    assert not files.exists("gs://b/run/metrics.jsonl")  # held for 30 s, to a flush, or to close
    w.flush()  # what the loops do before each checkpoint
    assert [r["step"] for r in metrics.read_metrics("gs://b/run")] == [1, 2, 3]
    w.write(4, {"train/loss": 0.25})
    w.close()
    assert [r["step"] for r in metrics.read_metrics("gs://b/run")] == [1, 2, 3, 4]
    w = metrics.MetricsWriter("gs://b/run", resume_step=2, tensorboard=False)  # steps 3-4 lost
    w.write(3, {"train/loss": 0.4})
    w.close()
    rows = metrics.read_metrics("gs://b/run")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.4)]


def test_url_errors_say_what_to_do(bucket):
    config = config_lib.load_file(os.path.join(ROOT, "configs", "generate_smol.py"))
    with pytest.raises(ValueError, match="Cloud Storage ones"):
        train.run(config, "s3://b/run")
    with pytest.raises(ValueError, match="read from local disk only"):
        load.resolve_source("gs://b/models/llama")
    cfg = llama.PRESETS["tiny"]
    shapes = llama.abstract_model(cfg)[1]
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.DEFAULT_RULES
    with pytest.raises(FileNotFoundError, match="Hugging Face directories are read from local"):
        load.initial_params(
            cfg, sharding.param_shardings(shapes, mesh, rules), source="random:tiny",
            init="gs://b/hf", mesh=mesh, rules=rules, seed=0,
        )  # fmt: skip


def test_qalign_pipeline_with_a_gs_workdir(bucket, tmp_path, capsys):
    """The real :smoke pipeline (priming data, SFT, GRPO from the SFT stage's gs:// checkpoint,
    before/after eval) on gs://, then a rerun that finds every stage done on the bucket."""
    config = config_lib.load_file(
        os.path.join(ROOT, "configs", "qalign_pipeline_smol.py") + ":smoke"
    )
    train.run(config, "gs://b/run")
    names = objects(bucket, "b/run")
    for name in (
        "config.json", "summary.json", "1_prime/prime_data.jsonl", "1_prime/prime_sft.jsonl",
        "1_prime/summary.json", "1_prime/done.json", "2_sft/config.json",
        "2_sft/metrics.jsonl", "2_sft/done.json", "3_grpo/metrics.jsonl",
        "3_grpo/rollouts.jsonl", "3_grpo/done.json", "4_eval/eval.jsonl",
        "2_sft/hf/config.json", "2_sft/hf/model.safetensors", "2_sft/hf/tokenizer.json",
        "3_grpo/hf/model.safetensors",  # exported locally, then copied up
    ):  # fmt: skip
        assert name in names, (name, names)
    summary = files.read_json("gs://b/run/summary.json")
    assert summary["stages"]["grpo"]["steps"] == 3
    assert summary["eval"]["final_params"] == "params of gs://b/run/3_grpo (step 3)"
    grpo_cfg = files.read_json("gs://b/run/3_grpo/config.json")
    assert grpo_cfg["checkpoint"]["init"] == "gs://b/run/2_sft"
    assert "params of gs://b/run/2_sft" in capsys.readouterr().out
    # Orbax's checkpoints are where orbax_path put them; no gs:// path was mangled into a
    # local one (os.path.abspath("gs://b") would make "<cwd>/gs:/b").
    assert sorted(os.listdir(bucket.root / ".orbax" / "b" / "run")) == ["2_sft", "3_grpo"]
    assert os.listdir(".") == []
    assert bucket.tb_dirs == ["gs://b/run/2_sft/tb"]  # the GRPO smoke config turns TB off

    train.run(config, "gs://b/run")
    out = capsys.readouterr().out
    assert out.count("done already") == 3
