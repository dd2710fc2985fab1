"""
The co-training experiment: the GRPO baseline vs co-training from the same SFT generator, with the same
number of generator updates, over several seeds, evaluated on held-out problems. Writes a markdown table.

    python -m dev.cotrain_experiment --gen_tag d4 --ver_tag d4 --seeds 1 2 3 --num_gen_steps 24 \
        --out dev/cotrain_experiment.md
    python -m dev.cotrain_experiment ... --arms baseline,cotrain,shared   # also one GPT in both roles

Each run is a separate process (`--parallel 2` runs two at a time with one thread each). Any flag after
`--` is passed to both chat_rl and chat_cotrain (shared RL settings); `--cotrain_args "..."` to co-training only.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def worker(kind, argv, out_path):
    if kind == "baseline":
        from scripts.chat_rl import main
        result = main(argv)
        summary = {"final": result["final"]}
    else:
        from scripts.chat_cotrain import main
        history = main(argv)
        ver = history["ver"]
        gen = history["gen"]
        mean = lambda key, rows: statistics.fmean(r[key] for r in rows) if rows else float("nan")
        summary = {"final": history["eval"][-1],
                   "verifier_share_said_correct_mean": mean("ver/share_said_correct", ver),
                   "verifier_balanced_accuracy_last": ver[-1]["ver/balanced_accuracy"] if ver else float("nan"),
                   "verifier_gold_correct_rate_mean": mean("ver/gold_correct_rate", ver),
                   "steps_aligned_mean": mean("gen/steps_exact", gen),
                   "verifier_step_agreement_mean": mean("gen/verifier_step_agreement", gen)}
    with open(out_path, "w") as f:
        json.dump(summary, f)


ARM_NAMES = {"baseline": "GRPO baseline", "cotrain": "co-trained (two models)", "shared": "co-trained (one shared model)"}


def run(kind, seed, args, shared, tmpdir):
    common = ["--task", args.task, "--seed", str(seed), "--eval_every", "0", "--device_type", "cpu"] + shared
    if kind == "baseline":
        argv = common + ["--source", "sft", "--model_tag", args.gen_tag, "--num_steps", str(args.num_gen_steps),
                         "--output_tag", f"exp_baseline_s{seed}"]
    else:
        argv = common + ["--gen_source", "sft", "--gen_tag", args.gen_tag, "--ver_source", args.ver_source,
                         "--ver_tag", args.ver_tag, "--num_gen_steps", str(args.num_gen_steps),
                         "--output_tag", f"exp_{kind}_s{seed}"] + shlex.split(args.cotrain_args)
        if kind == "shared":
            argv.append("--shared_model")
    out_path = os.path.join(tmpdir, f"{kind}_{seed}.json")
    log_path = os.path.join(args.log_dir, f"{kind}_s{seed}.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // args.parallel)))
    cmd = [sys.executable, "-m", "dev.cotrain_experiment", "--worker", "baseline" if kind == "baseline" else "cotrain",
           "--worker_out", out_path, "--", *argv]
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{kind} seed {seed} failed (exit {code}); see {log_path}")
    with open(out_path) as f:
        result = json.load(f)
    result["minutes"] = (time.time() - t0) / 60
    print(f"done: {kind} seed {seed} in {result['minutes']:.1f} min: {result['final']}", flush=True)
    return result


def fmt(values):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main():
    if "--worker" in sys.argv:
        i = sys.argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--worker")
        p.add_argument("--worker_out")
        a = p.parse_args(sys.argv[1:i])
        worker(a.worker, sys.argv[i + 1:], a.worker_out)
        return
    argv = sys.argv[1:]
    shared = []
    if "--" in argv:
        i = argv.index("--")
        argv, shared = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--gen_tag", required=True, help="SFT model tag of the generator (both arms start from it)")
    p.add_argument("--ver_tag", required=True, help="model tag of the verifier's starting checkpoint")
    p.add_argument("--ver_source", default="sft")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num_gen_steps", type=int, default=24)
    p.add_argument("--cotrain_args", default="", help="extra flags for chat_cotrain only")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (each gets 2/parallel threads)")
    p.add_argument("--log_dir", default=None, help="per-run logs (default: a temp dir)")
    p.add_argument("--out", default="dev/cotrain_experiment.md")
    p.add_argument("--arms", default="baseline,cotrain",
                   help="comma-separated, baseline first: baseline, cotrain (two models), shared (--shared_model)")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if arms[0] != "baseline" or len(arms) < 2 or any(a not in ARM_NAMES for a in arms):
        p.error(f"--arms must start with baseline and name at least one of cotrain, shared (got {args.arms!r})")
    tmpdir = tempfile.mkdtemp(prefix="cotrain_experiment_")
    args.log_dir = args.log_dir or tmpdir
    os.makedirs(args.log_dir, exist_ok=True)
    jobs = [(kind, seed) for seed in args.seeds for kind in arms]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {job: pool.submit(run, *job, args, shared, tmpdir) for job in jobs}
        results = {job: f.result() for job, f in futures.items()}
    minutes = (time.time() - t0) / 60

    per_arm = {arm: [results[(arm, s)] for s in args.seeds] for arm in arms}
    co_arms = arms[1:]
    nan = [float("nan")] * len(args.seeds)
    k_key = next(k for k in per_arm["baseline"][0]["final"] if k.startswith("pass@") and k != "pass@1")
    rows = [(label, [[r["final"][key] for r in per_arm[arm]] for arm in arms])
            for label, key in (("generator pass@1 (held-out, T=1)", "pass@1"), (f"generator {k_key}", k_key))]
    extra = [("majority vote", "majority@"), ("verifier-reranked best-of-N", "verifier_best_of_"),
             ("verifier accuracy (labelled, greedy)", "verifier_accuracy"),
             ("verifier F1 on incorrect solutions", "verifier_f1_incorrect"),
             ("verifier first-error-step accuracy", "verifier_first_error_accuracy"),
             ("verifier share of 'Correct' verdicts (eval)", "verifier_share_said_correct")]
    for label, prefix in extra:
        key = next((k for k in per_arm[co_arms[0]][0]["final"] if k.startswith(prefix)), None)
        if key:
            rows.append((label, [nan] + [[r["final"].get(key, float("nan")) for r in per_arm[a]] for a in co_arms]))
    for label, key in [("verifier 'Correct' share during training (collapse detector)", "verifier_share_said_correct_mean"),
                       ("gold share of correct solutions in verifier batches", "verifier_gold_correct_rate_mean"),
                       ("verifier balanced accuracy (last verifier step)", "verifier_balanced_accuracy_last"),
                       ("step counts aligned (verifier gave exactly K verdicts)", "steps_aligned_mean"),
                       ("verifier step verdicts agreeing with gold step labels", "verifier_step_agreement_mean")]:
        rows.append((label, [nan] + [[r[key] for r in per_arm[a]] for a in co_arms]))
    names = [ARM_NAMES[a] for a in arms]
    lines = [f"# Co-training vs GRPO baseline ({args.task}, {len(args.seeds)} seeds, {args.num_gen_steps} generator updates each)",
             "", f"Command: `python -m dev.cotrain_experiment {' '.join(sys.argv[1:])}`", "",
             f"Wall time {minutes:.1f} min. Mean ± std over seeds {args.seeds}.", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(arms) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(v) for v in values) + " |" for label, values in rows]
    lines += ["", "Per seed (pass@1): " + ", ".join(
        f"seed {s}: " + " vs ".join(f"{results[(a, s)]['final']['pass@1']:.3f}" for a in arms) for s in args.seeds)]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
