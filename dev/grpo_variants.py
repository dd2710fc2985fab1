"""
GRPO variants compared on one SFT checkpoint: nanochat's default, DAPO's dynamic sampling, and a DAPO-style
combination (clip-higher + token-mean + dynamic sampling, with two epochs per batch so the clipping acts),
several seeds each, the same number of updates, evaluated on held-out problems. Writes a markdown report
with per-seed numbers, 95% intervals, reward curves and wall-clock per update.

    python -m dev.grpo_variants --model_tag d4 --seeds 1 2 3 --num_steps 50 --out dev/grpo_variants.md

Each run is a separate process running scripts.chat_rl; its log goes to --log_dir. Flags after `--` go to
every run (e.g. the sampling sizes). Seeds and arms are fixed before any run starts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from dev.intervals import formatted

ARMS = {
    "default": [],
    "dynamic": ["--dynamic_sampling", "3"],
    "dapo": ["--dynamic_sampling", "3", "--loss_agg", "token-mean", "--clip_low", "0.2", "--clip_high", "0.28",
             "--ppo_epochs", "2"],
}


def worker(argv, out_path):
    from scripts.chat_rl import main
    result = main(argv)
    with open(out_path, "w") as f:
        json.dump(result, f)


def run(arm, seed, args, extra, tmpdir):
    argv = ["--source", "sft", "--model_tag", args.model_tag, "--task", args.task, "--seed", str(seed),
            "--num_steps", str(args.num_steps), "--eval_every", "0", "--save_every", "0", "--device_type", "cpu",
            "--output_tag", f"variants_{arm}_s{seed}"] + extra + ARMS[arm]
    out_path = os.path.join(tmpdir, f"{arm}_{seed}.json")
    log_path = os.path.join(args.log_dir, f"{arm}_s{seed}.log")
    cmd = [sys.executable, "-m", "dev.grpo_variants", "--worker_out", out_path, "--", *argv]
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("command: " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {code}); see {log_path}")
    with open(out_path) as f:
        result = json.load(f)
    result["minutes"] = (time.time() - t0) / 60
    print(f"done: {arm} seed {seed} in {result['minutes']:.1f} min: pass@1 {result['final']['pass@1']:.4f}", flush=True)
    return result


def report(results, args, command):
    arms = [a for a in ARMS if a in results]
    lines = ["# GRPO variants on the runcpu SFT checkpoint", "", f"Command: `{command}`", "",
             f"Task {args.task}, model {args.model_tag}, {args.num_steps} updates per run, seeds {args.seeds} "
             "(fixed before the runs). Held-out pass@1 is chat_rl's final evaluation (its test split).", "",
             "| metric | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]

    def row(label, values_of, digits=3):
        cells = [formatted([values_of(r) for r in results[arm]], digits) for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("held-out pass@1 (mean ± 95% CI)", lambda r: r["final"]["pass@1"])
    passk = next(k for k in results[arms[0]][0]["final"] if k.startswith("pass@") and k != "pass@1")
    row(f"held-out {passk}", lambda r: r["final"][passk])
    row("train reward, last 10 updates", lambda r: statistics.fmean(s["reward"] for s in r["train"][-10:]))
    row("groups without variance (mean)", lambda r: statistics.fmean(s["zero_variance_groups"] for s in r["train"]))
    row("token entropy, last 10 updates", lambda r: statistics.fmean(s["entropy"] for s in r["train"][-10:]))
    row("extra sampling rounds per update", lambda r: statistics.fmean(s["dynamic_sampling_rounds"] for s in r["train"]), 2)
    row("seconds per update", lambda r: statistics.fmean(s["time_step"] for s in r["train"]), 1)
    lines += ["", "Per seed (held-out pass@1):", ""]
    for arm in arms:
        lines.append(f"- {arm}: " + ", ".join(f"seed {s}: {r['final']['pass@1']:.4f}" for s, r in zip(args.seeds, results[arm])))
    lines += ["", "Train reward by update (mean over seeds, every 5th update):", "",
              "| update | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for step in range(0, args.num_steps, 5):
        cells = [f"{statistics.fmean(r['train'][step]['reward'] for r in results[arm]):.3f}" for arm in arms]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Arms: " + "; ".join(f"{arm}: `{' '.join(flags) or '(defaults)'}`" for arm, flags in ARMS.items() if arm in arms), ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m dev.grpo_variants " + " ".join(argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description="Compare GRPO variants over seeds on one SFT checkpoint")
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_tag", default="d4")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--out", default="dev/grpo_variants.md")
    p.add_argument("--log_dir", default="dev/logs/grpo_variants")
    args = p.parse_args(argv)
    if args.worker_out:
        return worker(extra, args.worker_out)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    os.makedirs(args.log_dir, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="grpo_variants_")
    results = {arm: [] for arm in arms}
    for seed in args.seeds:  # seeds outermost: a partial run still compares the arms on the same seeds
        for arm in arms:
            results[arm].append(run(arm, seed, args, extra, tmpdir))
    text = report(results, args, command)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
