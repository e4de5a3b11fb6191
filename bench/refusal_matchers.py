"""The refusal matchers side by side on saved eval answers (an eval's examples.jsonl).

  python bench/refusal_matchers.py workdirs/eval/sft/examples.jsonl workdirs/eval/grpo/examples.jsonl

For each file and asr/refusal suite: the share of final answers each matcher
(`eval_suites.REFUSAL_MATCHERS`) calls compliance (ASR on a harmful suite; 1 - FRR on a benign
one) and the most common 4-word opening with its count. Where 'xstest' and 'stated' disagree,
the answers open with a refusal prefix ("I'm sorry ...", "As an AI ...") without stating one:
read them (show a few with --examples N).
"""

import argparse
import collections
import json

from qalign_jax import eval_suites as es


def rates(answers: list[str]) -> dict[str, float]:
    return {
        m: sum(es.classify_refusal(a, m) == "full_compliance" for a in answers) / len(answers)
        for m in es.REFUSAL_MATCHERS
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="examples.jsonl files written by qalign_jax.eval")
    p.add_argument("--examples", type=int, default=0, help="answers to print where they differ")
    args = p.parse_args()
    head = ["file", "suite", "n"] + [f"comply {m}" for m in es.REFUSAL_MATCHERS] + ["opening"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    differ = []
    for path in args.files:
        suites = collections.defaultdict(list)
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("kind") in ("asr", "refusal"):
                    suites[row["suite"]].append(row["final"]["answer"])
        for suite, answers in suites.items():
            r = rates(answers)
            top, count = collections.Counter(es.opening(a) for a in answers).most_common(1)[0]
            cells = [path, suite, str(len(answers))] + [f"{r[m]:.2f}" for m in es.REFUSAL_MATCHERS]
            print("| " + " | ".join(cells + [f'"{top}" x{count}']) + " |")
            differ += [
                (path, suite, a) for a in answers
                if (es.classify_refusal(a) == "full_compliance")
                != (es.classify_refusal(a, "stated") == "full_compliance")
            ]  # fmt: skip
    for path, suite, a in differ[: args.examples]:
        print(f"\n[{path} {suite}] xstest {es.classify_refusal(a)}, stated "
              f"{es.classify_refusal(a, 'stated')}: {a[:240]!r}")  # fmt: skip


if __name__ == "__main__":
    main()
