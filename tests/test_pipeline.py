"""The QA-LIGN pipeline: stage wiring, order, resume by stage, clear errors, before/after eval.

The stages' own loops are tested in test_prime_data / test_sft / test_grpo; here they are
replaced by fakes that write the files a real stage leaves, so the test checks what the
pipeline itself does. The before/after evaluation runs for real on a tiny random model.
"""

import json
import os

import pytest

from qalign_jax import config as config_lib
from qalign_jax import metrics, sharding, train
from qalign_jax.loops import pipeline
from qalign_jax.models import hf, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "qalign_pipeline_smol.py") + ":smoke"


def test_stage_wiring(tmp_path):
    config = config_lib.load_file(SMOKE)
    config.model.source = "random:other"  # the pipeline's model replaces every stage's
    stages = pipeline.stage_configs(config, str(tmp_path))
    prime_dir, sft_dir, grpo_dir = (stages[s][0] for s in pipeline.STAGES)
    assert [stages[s][1].loop for s in pipeline.STAGES] == ["prime_data", "sft", "grpo"]
    assert all(stages[s][1].model.source == "random:other" for s in pipeline.STAGES)
    assert stages["sft"][1].data.train_path == os.path.join(prime_dir, "prime_sft.jsonl")
    assert stages["grpo"][1].checkpoint.init == sft_dir
    assert stages["grpo"][1].grpo.priming_data == os.path.join(prime_dir, "prime_data.jsonl")
    assert grpo_dir == os.path.join(str(tmp_path), "3_grpo")


def test_stage_config_errors(tmp_path):
    config = config_lib.load_file(SMOKE)
    config.pipeline.sft = config.pipeline.grpo
    with pytest.raises(ValueError, match="the sft stage needs loop='sft'"):
        pipeline.stage_configs(config, str(tmp_path))
    config.pipeline.sft = ""
    with pytest.raises(ValueError, match="config.pipeline.sft is empty"):
        pipeline.stage_configs(config, str(tmp_path))
    config.pipeline.sft = "configs/no_such_config.py:x"
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        pipeline.stage_configs(config, str(tmp_path))


def _fake_stages(monkeypatch, calls, kept=2):
    """Stand-ins for the three loops that leave the files the real ones leave."""

    def fake_prime(config, workdir):
        calls.append("prime")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"prompts": 4, "kept": kept, "draft_reward_mean": -0.5,
                       "revision_reward_mean": -0.25}, f)  # fmt: skip
        for name in ("prime_sft.jsonl", "prime_data.jsonl"):
            with open(os.path.join(workdir, name), "w") as f:
                f.writelines(json.dumps({"id": f"p{i}"}) + "\n" for i in range(kept))

    def fake_sft(config, workdir):
        calls.append("sft")
        assert config.data.train_path.endswith(os.path.join("1_prime", "prime_sft.jsonl"))
        writer = metrics.MetricsWriter(workdir, tensorboard=False)
        writer.write(1, {"train/loss": 2.0})
        writer.write(2, {"train/loss": 1.5, "eval/loss": 1.7})
        writer.close()

    def fake_grpo(config, workdir):
        calls.append("grpo")
        assert config.checkpoint.init.endswith("2_sft")
        writer = metrics.MetricsWriter(workdir, tensorboard=False)
        writer.write(1, {"rollout/reward_mean": -1.0})
        writer.close()
        # The "trained" policy is the base model itself, so before == after exactly.
        base = load.from_config(config, sharding.make_mesh(config.mesh.shape))
        hf.export_hf(os.path.join(workdir, "hf"), base.cfg, base.params, base.tokenizer)

    # The pipeline runs its stages through `train.run_stage`, which dispatches on LOOPS.
    monkeypatch.setitem(train.LOOPS, "prime_data", fake_prime)
    monkeypatch.setitem(train.LOOPS, "sft", fake_sft)
    monkeypatch.setitem(train.LOOPS, "grpo", fake_grpo)


def test_runs_stages_in_order_resumes_and_evaluates(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_stages(monkeypatch, calls)
    config = config_lib.load_file(SMOKE)
    train.run(config, str(tmp_path))
    assert calls == ["prime", "sft", "grpo"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["sft"]["train_loss_first"] == 2.0
    assert summary["stages"]["sft"]["eval_loss_last"] == 1.7
    assert summary["stages"]["grpo"]["reward_last"] == -1.0
    ev = summary["eval"]
    assert ev["prompts"] == 8 and "Hugging Face" in ev["final_params"]
    # Same weights, greedy, same seed: the two policies' rollouts and scores are identical.
    assert ev["policies"]["base"] == ev["policies"]["final"]
    rows = [json.loads(line) for line in (tmp_path / "4_eval" / "eval.jsonl").open()]
    assert len(rows) == 16 and {r["policy"] for r in rows} == {"base", "final"}
    out = capsys.readouterr().out
    assert "QA-LIGN pipeline finished" in out and "before/after" in out

    # A rerun skips every finished stage.
    calls.clear()
    train.run(config, str(tmp_path))
    assert calls == []
    assert "done already" in capsys.readouterr().out


def test_empty_priming_output_is_an_error(tmp_path, monkeypatch):
    calls = []
    _fake_stages(monkeypatch, calls, kept=0)
    config = config_lib.load_file(SMOKE)
    with pytest.raises(ValueError, match="kept no examples"):
        train.run(config, str(tmp_path))
    assert calls == ["prime"]
