"""Per-component reward curves of GRPO runs, from their metrics JSONL (`workdir/metrics.jsonl`).

  python bench/reward_curves.py workdirs/run_a/metrics.jsonl workdirs/run_b/metrics.jsonl \
      [--every 1] [--png curves.png]

Prints one markdown table per run: per step, each reward component's mean raw reward and the
share of its groups with zero variance, the veto rate, the refusal component's per-label refusal
rates of the sampled answers (`reward/refusal/refused_<label>`), and the KL to the reference
where the run has one. `--png` also plots every component's mean reward (and the refusal rates)
against the step, one panel per run (needs matplotlib).
"""

import argparse
import json
import os
import re


def read_metrics(path):
    """The per-step rows of one metrics JSONL, in step order (a resumed run's later row wins)."""
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(
                    f"{path}:{n}: not a JSON line ({e}); is this a metrics.jsonl?"
                ) from None
            if "step" in row and any(k.startswith("reward/") for k in row):
                rows[row["step"]] = row
    if not rows:
        raise SystemExit(f"{path}: no step with reward/* metrics; is this a GRPO metrics.jsonl?")
    return [rows[s] for s in sorted(rows)]


def components(rows):
    """The reward components named in the rows (`reward/<name>/mean`), in first-seen order."""
    names = []
    for row in rows:
        for key in row:
            m = re.fullmatch(r"reward/([^/]+)/mean", key)
            if m and m.group(1) not in names:
                names.append(m.group(1))
    return names


def columns(rows):
    """(header, key) pairs of the table, only those some row has."""
    cols = [("total", "reward/total_mean")]
    for name in components(rows):
        cols += [
            (name, f"reward/{name}/mean"),
            (f"{name} zero-var", f"reward/{name}/zero_variance_groups"),
        ]
    cols.append(("veto", "reward/veto_rate"))
    refused = sorted(
        {k for row in rows for k in row if re.fullmatch(r"reward/[^/]+/refused_.+", k)}
    )  # each refusal component's sampled refusal rate per label
    for key in refused:
        name, label = key[len("reward/") :].split("/refused_", 1)
        cols.append((f"refused {label}" if name == "refusal" else f"{name} refused {label}", key))
    cols.append(("KL", "train/kl"))
    return [(h, k) for h, k in cols if any(k in row for row in rows)]


def table(rows, every=1):
    cols = columns(rows)
    lines = ["| step | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        if row["step"] % every and row is not rows[-1] and row is not rows[0]:
            continue
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), (int, float)) else "" for _, k in cols]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], runs):
        steps = [r["step"] for r in rows]
        for header, key in columns(rows):
            if "zero-var" in header or header == "KL":
                continue
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=header,
                    linestyle="--" if header.startswith("refused") else "-")  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files of GRPO runs")
    p.add_argument("--every", type=int, default=1,
                   help="print every Nth step (and the first and the last)")  # fmt: skip
    p.add_argument("--png", default="", help="also plot the curves into this PNG")
    args = p.parse_args()
    if args.every < 1:
        p.error(f"--every {args.every}: use 1 or more")
    runs = []
    for path in args.metrics:
        rows = read_metrics(path)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        if os.path.basename(path) != "metrics.jsonl":
            name = os.path.basename(path)
        runs.append((name, rows))
        print(f"### {name} ({len(rows)} steps)\n\n{table(rows, args.every)}\n")
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
