"""
Read the verifier's evaluation lines out of chat_cotrain logs and check issue #15's bars on each draw.

A chat_cotrain run prints one "eval [<label>] key value | key value ..." line per evaluation ('start', 'gen step
N', 'final'). The bars are read against the exact label (right answer and every step clean), the label a step judge
can meet (dev/verifier_ceiling.py: a perfect step judge scores 0.87 against the answer check):
balanced accuracy >= 0.85, AUC >= 0.9, first-error-step accuracy >= 0.75, every verification aligned with the
solution's steps, and the share of "Correct" verdicts within 0.1 of the exact gold share.

    python -m dev.verifier_bars dev/logs/cotrain_val_verkl/remeasure/*.log

prints one row per (log, draw) and whether it meets every bar, then a JSON summary as the last line.
"""

import argparse
import json
import os
import re
import sys

EVAL_LINE = re.compile(r"^eval \[([^\]]+)\] (.*)$", re.M)

# (column, metric key, other metrics the test reads, test, what the bar says)
BARS = [
    ("exact BA", "verifier_exact_balanced_accuracy", [], lambda v, m: v >= 0.85, ">= 0.85"),
    ("exact AUC", "verifier_exact_auc", [], lambda v, m: v >= 0.9, ">= 0.9"),
    ("first-error", "verifier_first_error_accuracy", [], lambda v, m: v >= 0.75, ">= 0.75"),
    ("aligned", "verifier_steps_aligned", [], lambda v, m: v >= 1.0, "= 1"),
    ("said Correct", "verifier_share_said_correct", ["verifier_exact_gold_share_correct"],
     lambda v, m: abs(v - m["verifier_exact_gold_share_correct"]) <= 0.1, "within 0.1 of the exact gold share"),
]
SHOWN = [("answer BA", "verifier_balanced_accuracy"), ("exact gold", "verifier_exact_gold_share_correct")]


def parse_evals(text):
    """[(label, {metric: value})] for every evaluation line of a chat_cotrain log, in order. Fields that do not
    read as 'name number' are skipped, so a line cut short by a killed run gives what it has."""
    evals = []
    for label, body in EVAL_LINE.findall(text):
        metrics = {}
        for field in body.split(" | "):
            parts = field.strip().rsplit(" ", 1)
            if len(parts) == 2:
                try:
                    metrics[parts[0]] = float(parts[1])
                except ValueError:
                    pass
        evals.append((label, metrics))
    return evals


def check(metrics):
    """{column: True/False} per bar, or None for a bar whose metrics the line lacks."""
    out = {}
    for column, key, also, test, _ in BARS:
        out[column] = test(metrics[key], metrics) if all(k in metrics for k in [key] + also) else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="chat_cotrain log files")
    parser.add_argument("--draws", nargs="*", default=None, help="evaluation labels to read (default: every one)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            parser.error(f"cannot read {path}: {e}")
        evals = [(label, m) for label, m in parse_evals(text) if args.draws is None or label in args.draws]
        if not evals:
            print(f"{path}: no evaluation line with verifier metrics (a run still going, or not chat_cotrain's log)",
                  file=sys.stderr)
        for label, metrics in evals:
            if "verifier_exact_balanced_accuracy" not in metrics:
                continue
            # the folder too: the same run is often measured twice (e.g. remeasure/ and remeasure_fix/)
            name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
            rows.append({"log": name, "draw": label, "metrics": metrics, "bars": check(metrics)})
    columns = [c for c, *_ in BARS] + [c for c, _ in SHOWN]
    print("| log | draw | " + " | ".join(columns) + " | all bars |")
    print("|---" * (len(columns) + 3) + "|")
    for row in rows:
        m, bars = row["metrics"], row["bars"]
        flag = {True: "", False: " (miss)", None: " (n/a)"}  # n/a: a metric the bar needs is not on the line
        cells = [f"{m[key]:.3f}{flag[bars[column]]}" if key in m else "-" for column, key, *_ in BARS]
        cells += [f"{m[key]:.3f}" if key in m else "-" for _, key in SHOWN]
        row["meets_all"] = all(bars.values())
        print(f"| {row['log']} | {row['draw']} | " + " | ".join(cells) + f" | {'yes' if row['meets_all'] else 'no'} |")
    print("bars: " + "; ".join(f"{column} {text}" for column, *_, text in BARS))
    print(json.dumps({"rows": [{k: r[k] for k in ("log", "draw", "meets_all")} for r in rows],
                      "all_meet": bool(rows) and all(r["meets_all"] for r in rows)}))
    return rows


if __name__ == "__main__":
    main()
