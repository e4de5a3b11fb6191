"""bench/ scripts that users run by hand: the compose_smol chain's commands and the reward curves."""

import json
import os
import re
import shlex
import subprocess
import sys

from qalign_jax import config as base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run_chain(workdir, seeds="0 1", check=True, **env):
    """{stage: command} of a dry run (with check=False, the finished process)."""
    env = dict(os.environ, DRY_RUN="1", SEEDS=seeds, **env)
    out = subprocess.run(
        ["bash", "bench/compose_smol_chain.sh", str(workdir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip
    if not check:
        return out
    return dict(re.findall(r"^\[dry-run\] (\S+): (.*)$", out.stdout, flags=re.M))


def test_compose_chain_runs_every_stage_on_configs_and_keys_that_exist(tmp_path):
    """Every command of the chain loads its config file with its argument, every override names
    a key of that config, and each stage starts from the stage before it."""
    commands = dry_run_chain(tmp_path)
    # in order, then the seeds' runs and the readouts side by side (printed in any order)
    assert list(commands)[:3] == ["bon", "sft", "asym"]
    assert sorted(list(commands)[3:5]) == ["noback_s0", "noback_s1"]
    assert sorted(list(commands)[5:]) == sorted(
        ["eval_noback_s0", "eval_noback_s1", "eval_asym", "eval_sft"]
    )
    for name, command in commands.items():
        argv = shlex.split(command)
        config = base.load_file(argv[argv.index("--config") + 1])
        for arg in argv:
            if arg.startswith("--config."):
                path = arg[len("--config.") : arg.index("=")].split(".")
                node = config
                for key in path:
                    assert key in node, f"{name}: {arg} names no key of its config"
                    node = node[key]
    w = str(tmp_path)
    assert f"--config.data.train_path={w}/bon/sft.jsonl" in commands["sft"]
    assert f"--config.checkpoint.init={w}/sft " in commands["asym"]
    for s in (0, 1):
        assert f"--config.checkpoint.init={w}/asym " in commands[f"noback_s{s}"]
        assert f"--config.seed={s} " in commands[f"noback_s{s}"]
        assert f"--model {w}/noback_s{s} " in commands[f"eval_noback_s{s}"]
    for name in ("asym", "sft"):
        assert f"--model {w}/{name} " in commands[f"eval_{name}"]
    assert not os.listdir(tmp_path), "a dry run wrote into the workdir"


def test_compose_chain_seeds_pick_the_last_stage_runs(tmp_path):
    commands = dry_run_chain(tmp_path, seeds="2")
    assert sorted(n for n in commands if "noback" in n) == ["eval_noback_s2", "noback_s2"]


def test_compose_chain_picks_the_best_of_n_arguments_and_the_stage_evals(tmp_path):
    commands = dry_run_chain(tmp_path, seeds="0", BON="contrast,budget", STAGE_EVALS="")
    assert list(commands) == ["bon", "sft", "asym", "noback_s0", "eval_noback_s0"]
    argv = shlex.split(commands["bon"])
    config = base.load_file(argv[argv.index("--config") + 1])
    assert dict(config.best_of_n.num_samples_by_label) == {"benign": 2}
    assert config.best_of_n.num_samples == 16


def test_compose_chain_skips_a_stage_done_with_the_same_command_and_stops_on_another(tmp_path):
    bon = dry_run_chain(tmp_path, seeds="0")["bon"]
    (tmp_path / ".done_bon").write_text(bon + "\n")  # what a finished stage leaves
    assert "bon" not in dry_run_chain(tmp_path, seeds="0")  # skipped, the rest still runs
    (tmp_path / ".done_bon").write_text("")  # a marker of before the command was recorded
    assert list(dry_run_chain(tmp_path, seeds="0"))[0] == "sft"
    (tmp_path / ".done_bon").write_text(bon + "\n")
    out = dry_run_chain(tmp_path, seeds="0", check=False, BON="contrast,budget")
    assert out.returncode != 0 and "[dry-run] sft" not in out.stdout  # nothing after it runs
    assert "bon was done with another command" in out.stderr
    assert f"remove {tmp_path}/.done_bon" in out.stderr


def reward_curves(*args):
    return subprocess.run(
        [sys.executable, "bench/reward_curves.py", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_reward_curves_table_reads_components_labels_and_kl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "reward/total_mean": 0.1 * s, "reward/refusal/mean": 0.25 * s,
         "reward/refusal/zero_variance_groups": 0.5, "reward/veto_rate": 0.125,
         "reward/refusal/refused_harmful": 0.75, "reward/refusal/refused_benign": 0.0,
         "reward/refusal/refused_safe_contrast": 0.25, "train/kl": 0.01 * s}
        for s in (1, 2, 3, 4, 5)
    ]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, json.dumps({"step": 1, "eval/loss": 1.0}))  # no reward/*: not a table row
    path.write_text("\n".join(lines) + "\n")
    out = reward_curves(path, "--every", "2")
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == (
        "| step | total | refusal | refusal zero-var | veto | refused benign | refused harmful "
        "| refused safe_contrast | KL |"
    )  # a label with "_" in it whole
    # every 2nd step, and the first and last
    assert table[1:] == [
        "| 1 | 0.100 | 0.250 | 0.500 | 0.125 | 0.000 | 0.750 | 0.250 | 0.010 |",
        "| 2 | 0.200 | 0.500 | 0.500 | 0.125 | 0.000 | 0.750 | 0.250 | 0.020 |",
        "| 4 | 0.400 | 1.000 | 0.500 | 0.125 | 0.000 | 0.750 | 0.250 | 0.040 |",
        "| 5 | 0.500 | 1.250 | 0.500 | 0.125 | 0.000 | 0.750 | 0.250 | 0.050 |",
    ]


def test_reward_curves_says_what_is_wrong_with_a_file_that_is_not_grpo_metrics(tmp_path):
    sft = tmp_path / "metrics.jsonl"
    sft.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
    out = reward_curves(sft)
    assert out.returncode != 0 and "no step with reward/* metrics" in out.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    out = reward_curves(broken)
    assert out.returncode != 0 and "broken.jsonl:1: not a JSON line" in out.stderr
    out = reward_curves(sft, "--every", "0")
    assert out.returncode != 0 and "--every 0: use 1 or more" in out.stderr
