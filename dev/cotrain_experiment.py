"""
The co-training experiment: arms that differ only in their process signal, all run by scripts.chat_cotrain
from the same SFT generator with the same number of generator updates, over seeds fixed in advance, scored
on held-out problems. Writes a markdown report: per-seed numbers, means with 95% intervals, the gain over
the baseline paired by seed, reward curves and the wall-clock cost of every arm.

    python -m dev.cotrain_experiment --gen_tag d4 --ver_tag d4 --arms baseline,oracle --seeds 1 2 3 \
        --num_gen_steps 100 --process_args "--alpha 0.3 --alpha_end 0.3" --out dev/cotrain_experiment.md \
        -- --examples_per_step 8 --num_samples 8 --max_new_tokens 80 --eval_examples 256

Arms: baseline (no verifier, alpha 0: plain GRPO), oracle (step verdicts from exact gold step labels, the
ceiling and the control), cotrain (a learned verifier, two models), shared (one GPT in both roles).
Flags after `--` go to every arm; `--process_args` to every arm with a process signal; `--verifier_args`
to the arms with a learned verifier. Each run is its own process (`--parallel 2`: two at a time, one
thread each) with its log and result in --log_dir; `--reuse` takes finished results from there, so arms
run at different times can be reported together, and continues a run an earlier invocation left part-way from its
last checkpoint (`--save_every`), whose history keeps its earlier steps.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dev.intervals import formatted

ARMS = {  # name: (label, flags)
    "baseline": ("GRPO baseline", ["--no_verifier", "--alpha", "0"]),
    "oracle": ("oracle verifier", ["--oracle_verifier"]),
    "cotrain": ("co-trained (two models)", []),
    "shared": ("co-trained (one shared model)", ["--shared_model"]),
}
LEARNED = ("cotrain", "shared")


def seconds_per_update(gen):
    """Mean seconds of a generator update by part, from its log rows; --branch's continuations (logged as
    gen/time_branch) count as generation."""
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in gen) if gen else float("nan")
    return {"generate": mean("gen/time_generate") + mean("gen/time_branch"), "verify": mean("gen/time_verify"),
            "train": mean("gen/time_train")}


VERIFIER_CURVE = ("ver/exact_tp", "ver/exact_fp", "ver/exact_tn", "ver/exact_fn", "ver/share_said_correct",
                  "ver/gold_correct_rate", "ver/exact_gold_correct_rate", "ver/format_rate", "ver/kl")


def worker(argv, out_path):
    from scripts.chat_cotrain import main
    t0 = time.time()
    history = main(argv)
    gen, ver = history["gen"], history["ver"]
    mean = lambda key, rows: statistics.fmean(r[key] for r in rows) if rows else float("nan")
    summary = {"final": history["eval"][-1], "start": history["eval"][0], "seconds": time.time() - t0,
               "resumed": "--resume" in argv,
               "reward_curve": [r["gen/outcome_reward"] for r in gen],
               "seconds_per_update": seconds_per_update(gen),
               "verifier_seconds_per_step": sum(mean(f"ver/time_{part}", ver) for part in ("generate", "verify", "train")) if ver else 0.0,
               "verifier_steps": len(ver),
               "zero_variance_groups": mean("gen/zero_variance_groups", gen),
               "steps_aligned_mean": mean("gen/steps_exact", gen),
               "verifier_step_agreement_mean": mean("gen/verifier_step_agreement", gen),
               "verifier_share_said_correct_mean": mean("ver/share_said_correct", ver),
               "verifier_gold_correct_rate_mean": mean("ver/gold_correct_rate", ver),
               # per verifier step: its batch's exact-label confusion counts (pool windows of steps to read them),
               # shares and KL, so a verifier's quality can be followed through a run
               "verifier_curve": [{key[len("ver/"):]: r[key] for key in VERIFIER_CURVE if key in r} for r in ver],
               # training FLOPs of the whole run by model (evaluation excluded): the compute-matched view
               "flops": {model: sum(r.get(f"gen/flops_{model}", 0.0) for r in gen) + sum(r.get(f"ver/flops_{model}", 0.0) for r in ver)
                         for model in ("generator", "verifier")}}
    with open(out_path, "w") as f:
        json.dump(summary, f)


def run_tag(arm, seed, args):
    """The checkpoint tag of one run."""
    return f"{args.tag_prefix}_{arm}_s{seed}"


def run_argv(arm, seed, args):
    """The chat_cotrain flags of one run."""
    argv = ["--task", args.task, "--seed", str(seed), "--device_type", "cpu", "--gen_source", "sft", "--gen_tag", args.gen_tag,
            "--ver_source", args.ver_source, "--ver_tag", args.ver_tag, "--num_gen_steps", str(args.num_gen_steps),
            "--output_tag", run_tag(arm, seed, args)] + args.shared + ARMS[arm][1]
    if arm != "baseline":
        argv += shlex.split(args.process_args)
    if arm in LEARNED:
        argv += shlex.split(args.verifier_args)
    return argv


def has_checkpoint(arm, seed, args):
    """Whether an earlier invocation left a co-training checkpoint of this run (it stopped part-way)."""
    from nanochat.checkpoint_manager import CHECKPOINT_DIRS, list_steps
    from nanochat.common import get_base_dir
    directory = os.path.join(get_base_dir(), CHECKPOINT_DIRS["cotrain"], run_tag(arm, seed, args))
    return os.path.isdir(directory) and bool(list_steps(directory))


def run(arm, seed, args):
    argv = run_argv(arm, seed, args)
    out_path = os.path.join(args.log_dir, f"{arm}_s{seed}.json")
    log_path = os.path.join(args.log_dir, f"{arm}_s{seed}.log")
    if args.reuse and os.path.exists(out_path):  # a finished run of an earlier invocation (same flags: the log says)
        with open(out_path) as f:
            result = json.load(f)
        print(f"reused: {arm} seed {seed}: pass@1 {result['final']['pass@1']:.4f} ({out_path})", flush=True)
        return result
    # a run an earlier invocation left part-way (killed, out of memory) continues from its last checkpoint, whose
    # history holds its earlier steps; chat_cotrain refuses one written with other flags. Its log is appended to.
    resuming = args.reuse and has_checkpoint(arm, seed, args)
    if resuming:
        argv.append("--resume")
        print(f"resuming: {arm} seed {seed} from its last checkpoint", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS") or str(max(1, 2 // args.parallel)))
    cmd = [sys.executable, "-m", "dev.cotrain_experiment", "--worker_out", out_path, "--", *argv]
    with open(log_path, "a" if resuming else "w") as log:
        log.write("command: " + shlex.join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {code}); see {log_path}")
    with open(out_path) as f:
        result = json.load(f)
    note = " (resumed: the minutes count this invocation only)" if result.get("resumed") else ""
    print(f"done: {arm} seed {seed} in {result['seconds'] / 60:.1f} min{note}: pass@1 {result['final']['pass@1']:.4f}", flush=True)
    return result


def load_matched(directory, seeds):
    """{seed: result} of a compute-matched GRPO baseline (baseline_s<seed>.json in `directory`: GRPO given the
    learned arm's FLOPs as extra updates, run with its own --num_gen_steps), or a clear error."""
    matched = {}
    for seed in seeds:
        path = os.path.join(directory, f"baseline_s{seed}.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--matched_baseline: no {path} (run the baseline arm there with more updates first)")
        with open(path) as f:
            matched[seed] = json.load(f)
    return matched


def eval_split(flags):
    """The split the arms were scored on: chat_cotrain's --eval_split among the flags given to every arm."""
    for i, flag in enumerate(flags):
        if flag == "--eval_split" and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith("--eval_split="):
            return flag.split("=", 1)[1]
    return "test"


def report(results, args, command, minutes, matched=None):
    arms, seeds = args.arms, args.seeds
    labels = [ARMS[a][0] for a in arms]
    final_keys = list(results[(arms[0], seeds[0])]["final"])
    k_key = next(k for k in final_keys if k.startswith("pass@") and k != "pass@1")
    lines = [f"# Co-training arms on {args.task}: {len(seeds)} seeds, {args.num_gen_steps} generator updates each", "",
             f"Command: `{command}`", "",
             f"Seeds {seeds} fixed before the runs; every arm starts from the same SFT generator ({args.gen_tag}) and is "
             f"scored on the same held-out problems (the task's {eval_split(args.shared)} split). Wall time {minutes:.1f} min"
             f"{' (results reused from earlier invocations: see the cost table)' if args.reuse else ''}. "
             "Cells: mean ± half-width of the 95% t interval over seeds.", "",
             "| metric | " + " | ".join(labels) + " |", "|---" * (len(arms) + 1) + "|"]

    def row(label, value_of, digits=3):
        cells = [formatted([value_of(results[(arm, s)]) for s in seeds], digits) for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    final = lambda key: (lambda r: r["final"].get(key, float("nan")))
    row("generator pass@1 (held-out, T=1)", final("pass@1"))
    row("gain over the baseline (paired by seed)",
        lambda r: r["final"]["pass@1"] - results[("baseline", r["seed"])]["final"]["pass@1"] if "baseline" in arms else float("nan"))
    if matched:
        row("gain over the compute-matched baseline (paired by seed; see Cost)",
            lambda r: r["final"]["pass@1"] - matched[r["seed"]]["final"]["pass@1"])
    row("generator pass@1 before training", lambda r: r["start"]["pass@1"])
    row(f"generator {k_key}", final(k_key))
    for label, prefix in (("majority vote", "majority@"), ("verifier-reranked best-of-N", "verifier_best_of_"),
                          ("verifier balanced accuracy (generator's held-out solutions, greedy)", "verifier_balanced_accuracy"),
                          ("verifier AUC (same solutions)", "verifier_auc"),
                          ("verifier first-error-step accuracy", "verifier_first_error_accuracy"),
                          ("verifier steps aligned", "verifier_steps_aligned"),
                          ("verifier share 'Correct' (gold share next row)", "verifier_share_said_correct"),
                          ("gold share of correct solutions", "verifier_gold_share_correct")):
        key = next((k for k in final_keys + [k for a in arms for k in results[(a, seeds[0])]["final"]] if k.startswith(prefix)), None)
        if key:
            row(label, final(key))
    row("process signal aligned (exactly K verdicts)", lambda r: r["steps_aligned_mean"] if r["verifier_steps"] or r["steps_aligned_mean"] else float("nan"))
    row("step verdicts agreeing with gold step labels", lambda r: r["verifier_step_agreement_mean"] if r["steps_aligned_mean"] else float("nan"))
    row("verifier 'Correct' share in training", lambda r: r["verifier_share_said_correct_mean"])
    row("groups without reward variance", lambda r: r["zero_variance_groups"], 2)
    lines += ["", "## Cost (the compute-matched view)", "",
              "| arm | seconds per generator update (generate / verify / train) | verifier steps | seconds per verifier step | minutes per run "
              "| training PFLOPs per run (generator + verifier) | FLOPs ÷ the first arm's |",
              "|---|---|---|---|---|---|---|"]
    total_flops = {}
    for arm in arms:  # runs made before FLOPs were counted have none: n/a
        counted = [results[(arm, s)]["flops"] for s in seeds if "flops" in results[(arm, s)]]
        total_flops[arm] = {m: statistics.fmean(f[m] for f in counted) for m in ("generator", "verifier")} if counted else None
    anchor = total_flops[arms[0]]
    for arm, label in zip(arms, labels):
        rs = [results[(arm, s)] for s in seeds]
        parts = {p: statistics.fmean(r["seconds_per_update"][p] for r in rs) for p in ("generate", "verify", "train")}
        flops = total_flops[arm]
        flops_cell = "n/a" if flops is None else f"{sum(flops.values()) / 1e15:.3f} ({flops['generator'] / 1e15:.3f} + {flops['verifier'] / 1e15:.3f})"
        ratio_cell = "n/a" if flops is None or anchor is None else f"{sum(flops.values()) / sum(anchor.values()):.2f}"
        lines.append(f"| {label} | {sum(parts.values()):.1f} ({parts['generate']:.1f} / {parts['verify']:.1f} / {parts['train']:.1f}) | "
                     f"{rs[0]['verifier_steps']} | {statistics.fmean(r['verifier_seconds_per_step'] for r in rs):.1f} | "
                     f"{statistics.fmean(r['seconds'] for r in rs) / 60:.1f} | {flops_cell} | {ratio_cell} |")
    resumed = [f"{arm} seed {s}" for arm in arms for s in seeds if results[(arm, s)].get("resumed")]
    if resumed:
        lines += ["", "Resumed from a checkpoint after an interruption (their minutes count the last invocation only): "
                  + ", ".join(resumed) + "."]
    if matched:
        rs = [matched[s] for s in seeds]
        flops = statistics.fmean(sum(r["flops"].values()) for r in rs)
        ratio = "" if anchor is None else f", {flops / sum(anchor.values()):.2f}x the first arm's"
        lines += ["", f"Compute-matched GRPO baseline (`{args.matched_baseline}`): {len(rs[0]['reward_curve'])} updates, "
                      f"{flops / 1e15:.3f} PFLOPs per run{ratio}, {statistics.fmean(r['seconds'] for r in rs) / 60:.1f} min per run; "
                      f"held-out pass@1 {formatted([r['final']['pass@1'] for r in rs], 3)} (seeds "
                      + " / ".join(f"{r['final']['pass@1']:.4f}" for r in rs) + ")."]
    lines += ["", "## Per seed (held-out pass@1)", ""]
    for s in seeds:
        lines.append(f"- seed {s}: " + " vs ".join(f"{a} {results[(a, s)]['final']['pass@1']:.4f}" for a in arms))
    lines += ["", "## Train reward (outcome), mean over seeds, every 10th update", "",
              "| update | " + " | ".join(labels) + " |", "|---" * (len(arms) + 1) + "|"]
    for step in range(0, args.num_gen_steps, 10):
        window = lambda r: statistics.fmean(r["reward_curve"][step:step + 10])
        lines.append(f"| {step}-{min(step + 10, args.num_gen_steps) - 1} | " +
                     " | ".join(f"{statistics.fmean(window(results[(a, s)]) for s in seeds):.3f}" for a in arms) + " |")
    lines += ["", "Arm flags: " + "; ".join(f"{a}: `{' '.join(ARMS[a][1]) or '(none)'}`" for a in arms) +
              f"; process arms also `{args.process_args}`; learned arms also `{args.verifier_args}`; every arm `{shlex.join(args.shared)}`.", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m dev.cotrain_experiment " + shlex.join(argv)
    shared = []
    if "--" in argv:
        cut = argv.index("--")
        argv, shared = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--gen_tag", default="d4", help="SFT model tag of the generator (every arm starts from it)")
    p.add_argument("--ver_tag", default="d4", help="model tag of the learned verifier's starting checkpoint")
    p.add_argument("--ver_source", default="sft")
    p.add_argument("--arms", default="baseline,oracle,cotrain", help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num_gen_steps", type=int, default=100)
    p.add_argument("--process_args", default="", help="flags for every arm with a process signal (e.g. the alpha schedule)")
    p.add_argument("--verifier_args", "--cotrain_args", default="", help="flags for the learned-verifier arms only")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (each gets 2/parallel threads)")
    p.add_argument("--log_dir", default="dev/logs/cotrain_experiment", help="per-run logs")
    p.add_argument("--tag_prefix", default="exp", help="checkpoint tags are <prefix>_<arm>_s<seed> (a new prefix keeps "
                   "the checkpoints of earlier experiments)")
    p.add_argument("--out", default="dev/cotrain_experiment.md")
    p.add_argument("--matched_baseline", default=None,
                   help="a --log_dir holding baseline_s<seed>.json of a GRPO baseline given more updates (the learned arm's "
                        "FLOPs): the report adds each arm's gain over it and its cost")
    p.add_argument("--reuse", action="store_true",
                   help="take the result of a run already finished in --log_dir (<arm>_s<seed>.json) instead of running it, "
                        "and continue a run left part-way from its last checkpoint")
    args = p.parse_args(argv)
    if args.worker_out:
        return worker(shared, args.worker_out)
    args.shared = shared
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or any(a not in ARMS for a in args.arms) or len(set(args.arms)) != len(args.arms):
        p.error(f"--arms: choose distinct arms from {', '.join(ARMS)} (got {','.join(args.arms)!r})")
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    matched = load_matched(args.matched_baseline, args.seeds) if args.matched_baseline else None
    os.makedirs(args.log_dir, exist_ok=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seeds outermost: a partial run still pairs arms
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {job: pool.submit(run, *job, args) for job in jobs}
        results = {job: {**f.result(), "seed": job[1]} for job, f in futures.items()}
    text = report(results, args, command, (time.time() - t0) / 60, matched)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
