"""IterAlign: proposer robustness (unparseable, empty, duplicates), the adaptive rubric, a full
2-round run, resume after a crash mid-round without redoing finished work, and the compiled
rubric in the GRPO loop.

A tiny random policy/judge with the real tokenizer (`configs/iteralign_smol.py:smoke`) and a
scripted proposer (the `generate_fn` interface of `structured`) with canned outputs."""

import importlib.util
import json
import os
import re

import pytest

from qalign_jax import constitutions, metrics, structured, train
from qalign_jax import rubric as rubric_lib
from qalign_jax.loops import iteralign
from tests.test_grpo import smoke_config as grpo_smoke_config
from tests.test_train import ROOT


def smoke_config(arg="smoke"):
    path = os.path.join(ROOT, "configs", "iteralign_smol.py")
    spec = importlib.util.spec_from_file_location("iteralign_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def first_prompt(conversation) -> str:
    return re.search(r"1\. User: (.*)", conversation[-1]["content"]).group(1)


class Scripted:
    """generate_fn answering proposer and gate prompts; counts calls; may raise at a call."""

    def __init__(self, respond=None, fail_at=None):
        self.respond, self.fail_at, self.calls = respond or self.default, fail_at, []

    def __call__(self, conversations, attempt=0):
        stage = "gates" if "yes/no" in conversations[0][0]["content"] else "propose"
        self.calls.append((stage, attempt, len(conversations)))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("killed")  # stands for a crash in the middle of a round
        return [self.respond(stage, c, attempt) for c in conversations]

    @staticmethod
    def default(stage, conversation, attempt):
        if stage == "gates":  # 'Dimension: <name>. <text>'
            name = re.match(r"Dimension: ([^.]+)\.", conversation[-1]["content"]).group(1)
            return f"1. Does the response break the rule called {name}?"
        words = re.findall(r"[a-z]+", first_prompt(conversation).lower())
        return (
            f"1. Care {words[0]} {words[1]}: The assistant handles requests like "
            f"{' '.join(words[:6])} safely.\n"
            "2. Be honest: The assistant always tells the truth to the user."
        )


# ---------------------------------------------------------------------------------------------
# Host logic with scripted outputs.


def failures(n):
    return [
        {"id": f"p{i}", "prompt": f"Prompt number {i}?", "answer": f"bad {i}"} for i in range(n)
    ]


def test_parse_constitutions():
    items, dropped = constitutions.parse_constitutions(
        "1. Be kind: The assistant is kind to everyone.\n2) no colon here\n3. cut off", 2
    )
    assert items == [("Be kind", "The assistant is kind to everyone.")]
    assert len(dropped) == 1 and "is not 'Name: description'" in dropped[0]
    with pytest.raises(structured.Malformed, match="before item 1"):
        constitutions.parse_constitutions("Sure! Here are principles:\n1. A b: c d e", 2)
    with pytest.raises(structured.Malformed, match="copies the prompt's example"):
        constitutions.parse_constitutions(
            "1. Check the facts: The assistant states only true facts.", 1
        )
    with pytest.raises(structured.Malformed, match="no usable principle"):
        constitutions.parse_constitutions("", 2)


def test_propose_retries_then_skips_with_a_logged_reason():
    config = smoke_config()

    def respond(stage, conv, attempt):
        if "Prompt number 0" in first_prompt(conv):  # batch 0: garbage once, then good
            return "I am not sure." if attempt == 0 else "1. Stay safe: The assistant avoids harm."
        return "<|im_end|> ... 1."  # batch 1: never parseable

    gen = Scripted(respond)
    library, log = constitutions.propose(config, gen, failures(4), [], round_index=1)
    assert [c[1:] for c in gen.calls] == [(0, 2), (1, 2), (2, 1)]  # only failed batches resent
    assert log["calls"] == 3 and log["retries"] == 3
    assert [e["name"] for e in library] == ["Stay safe"] and log["added"] == ["stay_safe"]
    assert library[0]["triggered_by"] == ["p0", "p1"] and library[0]["round"] == 1
    (skip,) = log["skipped"]
    assert skip["batch"] == 1 and "unparseable after 3 attempt(s)" in skip["reason"]


def test_empty_failures_propose_nothing():
    gen = Scripted()
    library, log = constitutions.propose(smoke_config(), gen, [], [{"id": "x"}], round_index=2)
    assert gen.calls == [] and library == [{"id": "x"}] and log["added"] == []
    assert log["skipped"] == [{"batch": None, "reason": "no failures this round"}]


def test_duplicates_are_merged_with_provenance():
    config = smoke_config()
    old = {"id": "be_honest", "name": "Be honest", "text": "The assistant tells the truth.",
           "round": 1, "triggered_by": ["a"], "merged": [], "gates": ["Q?"], "gate_error": None}  # fmt: skip
    outputs = iter([
        "1. be HONEST!: Some other text about truth and lies.\n"  # same name, normalized
        "2. Truthful: The assistant tells the truth.",  # same text
        "1. Kindness: The assistant is kind to all people.\n"
        "2. Kindness again: The assistant is kind to all people always.",  # Jaccard 6/7
    ])  # fmt: skip
    gen = Scripted(lambda *_: next(outputs))
    library, log = constitutions.propose(config, gen, failures(4), [old], round_index=2)
    assert [e["id"] for e in library] == ["be_honest", "kindness"] and log["added"] == ["kindness"]
    assert [m["into"] for m in log["merged"]] == ["be_honest", "be_honest", "kindness"]
    assert [m["triggered_by"] for m in library[0]["merged"]] == [["p0", "p1"], ["p0", "p1"]]
    assert constitutions.triggers(library[1]) == {"p2", "p3"}
    assert old["merged"] == []  # the input library is not modified


def test_gates_compile_into_a_valid_rubric_and_bad_outputs_are_skipped():
    config = smoke_config()
    library = [
        {"id": n, "name": n.title(), "text": f"The assistant is careful about {n}.", "round": 1,
         "triggered_by": [], "merged": [], "gates": None, "gate_error": None}
        for n in ("weapons", "privacy")
    ]  # fmt: skip

    def respond(stage, conv, attempt):
        if "Weapons" in conv[-1]["content"]:
            return "1. Does the response explain how to build a weapon?"
        return "1. Is it bad?"  # too short: never a valid gate

    gen = Scripted(respond)
    base = constitutions.read_rubric_dict("demo")
    log = constitutions.draft_gates(config, gen, library, base)
    assert library[0]["gates"] == ["Does the response explain how to build a weapon?"]
    assert library[1]["gates"] == [] and "must be 5 to 40 words" in library[1]["gate_error"]
    assert [s["id"] for s in log["skipped"]] == ["privacy"] and log["calls"] == 3
    raw = constitutions.compile_rubric(base, library, 1, "harmlessness")
    r = rubric_lib.rubric_from_dict(raw)
    harm = next(p for p in r.principles if p.id == "harmlessness")
    assert harm.dimensions[-1].id == "const_weapons" and len(r.dimensions) == 8
    assert harm.dimensions[-1].questions[0].kind == "gate"
    assert raw["header"]["iteralign"]["dimensions_added"] == ["const_weapons"]


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("detect", "vibes", "iteralign.detect='vibes'"),
        ("keep", "best", "iteralign.keep='best'"),
        ("constitutions_per_call", 3, "use 1 or 2"),
        ("prompts_per_round", 99, "the red-team pool has 24 prompts"),
        ("sources", (), "config.iteralign.sources is empty"),
    ],
)
def test_config_errors(tmp_path, key, value, message):
    config = smoke_config()
    setattr(config.iteralign, key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        train.run(config, str(tmp_path))


def test_configs_load():
    for arg in (None, "smoke"):
        assert smoke_config(arg).loop == "iteralign"
    path = os.path.join(ROOT, "configs", "iteralign_llama3_8b.py")
    spec = importlib.util.spec_from_file_location("ia8b", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.iteralign.proposer and c.iteralign.proposer != c.model.source
    classifier = os.path.join(ROOT, "configs", "data", "iteralign_classifier.yaml")
    assert rubric_lib.load_rubric(classifier).counts()["gates"] == 1


# ---------------------------------------------------------------------------------------------
# Whole runs.


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 2-round run that crashes in round 2 (drafting gate questions), then the rerun.

    Proposer calls of a whole run: round 1 propose, gates; round 2 propose, gates. The 4th
    raises. The rerun counts the red-team, revision, SFT and proposer calls it makes.
    """
    workdir = str(tmp_path_factory.mktemp("iteralign"))
    mp = pytest.MonkeyPatch()
    crashing = Scripted(fail_at=4)
    mp.setattr(iteralign, "make_proposer", lambda *a: crashing)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            train.run(smoke_config(), workdir)
        assert [c[0] for c in crashing.calls] == ["propose", "gates", "propose", "gates"]
        assert os.path.exists(os.path.join(workdir, "round_2", iteralign.PROPOSALS))
        assert not os.path.exists(os.path.join(workdir, "round_2", iteralign.ROUND_LIBRARY))
        assert [r["step"] for r in metrics.read_metrics(workdir)] == [1]

        calls = {"redteam": 0, "revise": 0, "sft": []}
        for name, key in (("redteam_batch", "redteam"), ("revise_batch", "revise")):
            original = getattr(iteralign, name)

            def counting(*a, _original=original, _key=key, **kw):
                calls[_key] += 1
                return _original(*a, **kw)

            mp.setattr(iteralign, name, counting)
        original_sft = iteralign.round_sft

        def counting_sft(config, path, init, wd, **kw):
            calls["sft"].append(wd)
            return original_sft(config, path, init, wd, **kw)

        mp.setattr(iteralign, "round_sft", counting_sft)
        gen = Scripted()
        mp.setattr(iteralign, "make_proposer", lambda *a: gen)
        train.run(smoke_config(), workdir)
        calls["proposer"] = [c[0] for c in gen.calls]
        final_metrics = metrics.read_metrics(workdir)
        calls["redteam_before_third"] = calls["redteam"]
        train.run(smoke_config(), workdir)  # a finished run: nothing is redone
        assert metrics.read_metrics(workdir) == final_metrics
    finally:
        mp.undo()
    return workdir, calls


def test_crash_mid_round_then_rerun_does_not_redo_finished_work(resumed_run):
    workdir, calls = resumed_run
    assert calls["redteam"] == 0  # both rounds' answers were already judged
    assert calls["proposer"] == ["gates"]  # round 2's proposals were kept
    assert calls["revise"] == 1  # round 2's 4 failures, one batch; round 1 was finished
    assert calls["sft"] == [os.path.join(workdir, "round_2", "sft")]


def test_two_rounds_write_every_output(resumed_run):
    workdir, _ = resumed_run
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["redteam/failure_rate"] == 1.0 and r["revise/kept"] == 4
        assert r["sft/steps"] == 2 and r["constitutions/added"] >= 1
    assert rows[1]["constitutions/merged"] >= 2  # 'Be honest' again, in each batch
    library = json.load(open(os.path.join(workdir, iteralign.LIBRARY)))
    assert library[1]["id"] == "be_honest" and len(library[1]["merged"]) >= 3
    assert all(e["gates"] for e in library)
    for r in (1, 2):
        rdir = os.path.join(workdir, f"round_{r}")
        red = read_jsonl(os.path.join(rdir, iteralign.REDTEAM))
        assert len(red) == 4 and all(x["failed"] for x in red)
        revised = read_jsonl(os.path.join(rdir, iteralign.REVISIONS))
        assert [x["id"] for x in revised] == [x["id"] for x in red]
        assert all(x["constitutions"] for x in revised)
        sft_rows = read_jsonl(os.path.join(rdir, iteralign.SFT_DATA))
        assert [x["completion"] for x in sft_rows] == [x["revision"] for x in revised]
        assert os.path.isdir(os.path.join(rdir, "sft", "ckpt"))
        rubric = rubric_lib.load_rubric(os.path.join(workdir, "rubrics", f"rubric_v{r}.json"))
        added = rubric.header["iteralign"]["dimensions_added"]
        assert len(added) == len([e for e in library if e["round"] <= r])
    red1 = read_jsonl(os.path.join(workdir, "round_1", iteralign.REDTEAM))
    red2 = read_jsonl(os.path.join(workdir, "round_2", iteralign.REDTEAM))
    assert not {x["id"] for x in red1} & {x["id"] for x in red2}  # consecutive slices
    summary = json.load(open(os.path.join(workdir, "round_2", iteralign.SUMMARY)))
    assert summary["policy_before"].endswith(os.path.join("round_1", "sft"))
    final = json.load(open(os.path.join(workdir, iteralign.SUMMARY)))
    assert final["rounds"] == 2 and final["stop_reason"] == "max_rounds=2 reached"


def test_the_compiled_rubric_runs_in_the_grpo_loop(resumed_run, tmp_path, monkeypatch):
    workdir, _ = resumed_run
    config = grpo_smoke_config("single")  # one pass: the rubric is what is under test
    config.judge.rubric = os.path.join(workdir, "rubrics", "rubric_v2.json")
    config.grpo.num_steps = 1
    config.grpo.kl_beta = 0.0
    config.grpo.export_hf = False
    train.run(config, str(tmp_path))
    (row,) = [r for r in metrics.read_metrics(str(tmp_path)) if "rollout/reward_mean" in r]
    assert row["step"] == 1 and "draft/harmlessness" in row
    assert os.path.isdir(os.path.join(tmp_path, "ckpt"))

    # Discovery between GRPO phases: the GRPO phase's weights red-teamed, no SFT, a rubric.
    config = smoke_config()
    config.checkpoint.init = str(tmp_path)
    config.iteralign.train = False
    config.iteralign.max_rounds = 1
    discover = str(tmp_path / "discover")
    monkeypatch.setattr(iteralign, "make_proposer", lambda *a: Scripted())
    train.run(config, discover)
    summary = json.load(open(os.path.join(discover, "round_1", iteralign.SUMMARY)))
    assert summary["policy_before"] == str(tmp_path) == summary["policy_after"]
    assert summary["sft"] == "skipped: iteralign.train is False"
    assert rubric_lib.load_rubric(os.path.join(discover, "rubrics", "rubric_v1.json"))
