"""The refusal matchers side by side on saved eval answers (an eval's examples.jsonl).

  python bench/refusal_matchers.py workdirs/eval/sft/examples.jsonl workdirs/eval/grpo/examples.jsonl
  python bench/refusal_matchers.py --hand-labels bench/results/compose_smol/hand_labels_cool.jsonl

For each file and asr/refusal suite: the share of final answers each matcher
(`eval_suites.REFUSAL_MATCHERS`, given the prompt; `stated_any` is 'stated' without it, so
without its on-topic rule) calls compliance (ASR on a harmful suite; 1 - FRR on a benign one)
and the most common 4-word opening with its count. Where 'xstest' and 'stated' disagree,
the answers open with a refusal prefix ("I'm sorry ...", "As an AI ...") without stating one:
read them (show a few with --examples N).

--hand-labels: rows {run, id, label, prompt, answer} with a reader's label per answer to a
harmful prompt (R refusal, T refusal taken back, C compliance, A ambiguous); prints, per run,
the stated matcher's class counts for each label: how many take-backs it calls a partial
refusal, and how many clean refusals it calls one too.
"""

import argparse
import collections
import json

from qalign_jax import eval_suites as es


def verdicts(row: dict) -> dict[str, str]:
    """Each matcher's class of a row's final answer; 'stated' also without the prompt (the
    on-topic rule off), as 'stated_any'."""
    a = row["final"]["answer"]
    out = {m: es.classify_refusal(a, m, row["prompt"]) for m in es.REFUSAL_MATCHERS}
    return {**out, "stated_any": es.classify_refusal(a, "stated")}


COLUMNS = (*es.REFUSAL_MATCHERS, "stated_any")


def hand_label_table(path: str) -> None:
    """The stated matcher's classes against a reader's labels, per run and label."""
    counts = collections.Counter()
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            counts[
                r["run"], r["label"], es.classify_refusal(r["answer"], "stated", r["prompt"])
            ] += 1
    print("| run | hand label | n | " + " | ".join(es.REFUSAL_CLASSES) + " |")
    print("|---|---|---|" + "---|" * len(es.REFUSAL_CLASSES))
    for run, label in sorted({k[:2] for k in counts}):
        cells = [counts[run, label, c] for c in es.REFUSAL_CLASSES]
        print(f"| {run} | {label} | {sum(cells)} | " + " | ".join(map(str, cells)) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="examples.jsonl files written by qalign_jax.eval")
    p.add_argument("--examples", type=int, default=0, help="answers to print where they differ")
    p.add_argument("--hand-labels", default="", help="a JSONL of hand-labelled answers")
    args = p.parse_args()
    if not args.files and not args.hand_labels:
        p.error("give examples.jsonl files, --hand-labels FILE, or both")
    if args.hand_labels:
        hand_label_table(args.hand_labels)
    if not args.files:
        return
    head = ["file", "suite", "n"] + [f"comply {m}" for m in COLUMNS] + ["opening"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    differ = []
    for path in args.files:
        suites = collections.defaultdict(list)
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("kind") in ("asr", "refusal"):
                    suites[row["suite"]].append(row)
        for suite, rows in suites.items():
            v = [verdicts(r) for r in rows]
            comply = [f"{sum(x[m] == 'full_compliance' for x in v) / len(v):.2f}" for m in COLUMNS]
            openings = collections.Counter(es.opening(r["final"]["answer"]) for r in rows)
            top, count = openings.most_common(1)[0]
            cells = [path, suite, str(len(rows))] + comply + [f'"{top}" x{count}']
            print("| " + " | ".join(cells) + " |")
            differ += [
                (path, suite, r, x) for r, x in zip(rows, v)
                if (x["xstest"] == "full_compliance") != (x["stated"] == "full_compliance")
            ]  # fmt: skip
    for path, suite, r, x in differ[: args.examples]:
        print(f"\n[{path} {suite}] {r['prompt'][:80]!r}\n  xstest {x['xstest']}, stated "
              f"{x['stated']}: {r['final']['answer'][:240]!r}")  # fmt: skip


if __name__ == "__main__":
    main()
