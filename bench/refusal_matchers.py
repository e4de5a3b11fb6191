"""The refusal matchers side by side on saved eval answers (an eval's examples.jsonl).

  python bench/refusal_matchers.py workdirs/eval/sft/examples.jsonl workdirs/eval/grpo/examples.jsonl

For each file and asr/refusal suite: the share of final answers each matcher
(`eval_suites.REFUSAL_MATCHERS`, given the prompt; `stated_any` is 'stated' without it, so
without its on-topic rule) calls compliance (ASR on a harmful suite; 1 - FRR on a benign one)
and the most common 4-word opening with its count. Where 'xstest' and 'stated' disagree,
the answers open with a refusal prefix ("I'm sorry ...", "As an AI ...") without stating one:
read them (show a few with --examples N).
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="examples.jsonl files written by qalign_jax.eval")
    p.add_argument("--examples", type=int, default=0, help="answers to print where they differ")
    args = p.parse_args()
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
