"""Calibration of the `degeneracy` reward component: how often it fires on normal answers.

  .venv/bin/python bench/degeneracy.py                 # embedded SmolLM2-135M, 64 + 64 prompts
  .venv/bin/python bench/degeneracy.py --num_prompts 16 --max_tokens 48

The base model answers benign instructions (Alpaca, no-input sample) and red-team openers
(HH-RLHF harmless-base), sampled at temperature 1 (what GRPO trains on) and greedily (what the
eval suites read). Every answer is checked by `reward_components.degeneracy_reasons` with its
default thresholds; the false-positive rate is the fraction flagged (these are the model's
normal answers, so every flag is a false positive unless the text really loops). Prints the rate
per set, decoding and reason, and the flagged answers, so a reader can judge each one; writes
bench/results/degeneracy.json.

  .venv/bin/python bench/degeneracy.py --max_tokens 48 --temperature 0.5 \
    --option max_repeated_ngrams=0.3 --option max_opening_repeats=2 \
    --out bench/results/degeneracy_strict.json

`--option KEY=VALUE` (repeatable) checks the same answers a second time with other thresholds
(e.g. configs/qalign_grpo_compose_smol.py's `:strict` veto) and reports both rates; the flagged
answers listed are those of the options. `--temperature` sets the sampled decoding's.

(Prompts come from ../shared/data.)
"""

import argparse
import collections
import json
import os
import time

import jax

from qalign_jax import data, rollouts
from qalign_jax import reward_components as rc
from qalign_jax.models import load

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SETS = {
    "alpaca": "alpaca/alpaca_noinput_sample2000.jsonl",
    "hh_rlhf": "hh_rlhf/hh_rlhf_harmless_test_prompts.jsonl",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "degeneracy.json"))  # fmt: skip
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled decoding")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a degeneracy threshold to check the answers with too")  # fmt: skip
    args = ap.parse_args()
    options = parse_options(args.option)
    model = load.load_model("embedded")
    tok = model.tokenizer
    results, flagged = {}, []
    for name, rel in SETS.items():
        records = data.read_prompt_set(os.path.join(DATA, rel))
        records = data.split_by_hash(records, {"s": args.num_prompts}, seed=0)["s"]
        ids = data.chat_ids(tok, records, 256, "drop")
        records = [r for r in records if r.id in ids]
        for decoding, temperature in (("sampled", args.temperature), ("greedy", 0.0)):
            opts = rollouts.RolloutConfig(
                two_pass=False, draft_max_tokens=args.max_tokens, temperature=temperature,
                batch_buckets=(16,),
            )  # fmt: skip
            t0 = time.perf_counter()
            ro = rollouts.rollout(model, None, records, [ids[r.id] for r in records], opts,
                                  jax.random.key(0))  # fmt: skip
            seconds = time.perf_counter() - t0
            key = f"{name}/{decoding}"
            results[key] = {"answers": len(records), "seconds": round(seconds, 1)}
            checks = (("", {}), ("with_options/", options)) if options else (("", {}),)
            for tag, thresholds in checks:  # the flagged answers below are the last check's
                reasons = [rc.degeneracy_reasons(a, r.prompt, **thresholds)
                           for a, r in zip(ro.drafts, records)]  # fmt: skip
                counts = collections.Counter(x for rs in reasons for x in rs)
                rate = sum(bool(rs) for rs in reasons) / len(records)
                results[key].update({f"{tag}false_positive_rate": rate,
                                     f"{tag}reasons": dict(counts)})  # fmt: skip
                print(f"{tag + key:30s} n={len(records):3d}  flagged {rate:.3f}  "
                      f"{dict(counts)}  ({seconds:.0f} s)")  # fmt: skip
            for a, r, rs in zip(ro.drafts, records, reasons):
                if rs:
                    flagged.append({"set": key, "id": r.id, "prompt": r.prompt, "answer": a,
                                    "reasons": rs})  # fmt: skip
    for f in flagged:
        print(f"\n[{f['set']}] {f['reasons']} {f['prompt'][:80]!r}\n  -> {f['answer'][:300]!r}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"results": results, "flagged": flagged, "max_tokens": args.max_tokens,
                   "temperature": args.temperature,
                   "options": {**rc.KIND_OPTIONS["degeneracy"], **options}}, fh,
                  indent=1)  # fmt: skip


def parse_options(pairs: list[str]) -> dict:
    """--option KEY=VALUE pairs as degeneracy thresholds (numbers), checked against its kind."""
    known = rc.KIND_OPTIONS["degeneracy"]
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--option {pair!r}: use KEY=VALUE with KEY one of {sorted(known)}")
        try:
            out[key] = type(known[key])(value)
        except ValueError:
            kind = "whole number" if isinstance(known[key], int) else "number"
            raise SystemExit(f"--option {pair!r}: {key} takes a {kind}") from None
    return out


if __name__ == "__main__":
    main()
