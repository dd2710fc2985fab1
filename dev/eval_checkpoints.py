"""
Score saved co-training checkpoints (their generator) on held-out problems, exactly as scripts.chat_cotrain's
own evaluation does: the run's task, difficulty, sampling settings and held-out seed are read from the
checkpoint, only the split (and the steps) are chosen here. For choosing settings on validation problems from
runs that are already finished, and for learning curves from the intermediate checkpoints (--save_every).

    python -m dev.eval_checkpoints --tags hard_baseline_s1 hardtok_oracle_s1 --steps 50 100 --split val \
        --out dev/logs/cotrain_val_alpha/rescored.json

Prints one line per checkpoint (pass@1, pass@k, majority@k) and writes them to --out as JSON (results already in
--out are kept and not recomputed, so an interrupted scoring resumes). The generator's verifier, if any, is
not scored: that needs the run's verifier flags and is what the run's own final evaluation is for.
"""

import argparse
import json
import os
import time

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, list_steps, load_model
from nanochat.common import UserInputError, compute_init, get_base_dir, run_stage
from nanochat.engine import Engine
from nanochat.grpo import HELDOUT_SEED_OFFSET, majority_correct, pass_at_k
from tasks.by_name import build_rl_task


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--tags", nargs="+", required=True, help="co-training checkpoint tags (cotrain_checkpoints/<tag>)")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="checkpoint steps to score (default: the last of each tag)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="val: problems never used to report a result")
    p.add_argument("--out", default=None, help="JSON file of results (read first: finished entries are not recomputed)")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    return p.parse_args(argv)


def load_generator(tag, step, split, device):
    """(engine, tokenizer, task, run flags, meta) for the generator of co-training checkpoint <tag> at <step>
    (None: its last), with the run's own task and difficulty on <split> (shared with dev/rollout_shape.py)."""
    model, tokenizer, meta = load_model("cotrain", device, model_tag=tag, step=step, model_key="generator")
    run = meta["user_config"]
    task = build_rl_task(run["task"], split, run.get("data_dir"), run.get("difficulty"))
    return Engine(model, tokenizer, max_rows=run.get("max_batch_rows")), tokenizer, task, run, meta


def score(tag, step, split, device):
    """{pass@1, pass@k, majority@k, n, ...} of the generator of checkpoint <tag> at <step> on <split>."""
    engine, tokenizer, task, run, _ = load_generator(tag, step, split, device)
    indices = list(range(min(run["eval_examples"], len(task))))
    k = run["eval_samples"]
    start = time.time()
    n, pass1, passk, rollouts = pass_at_k(engine, tokenizer, task, indices, k, run["max_new_tokens"], run["temperature"],
                                          run["top_k"], seed=run["seed"] + HELDOUT_SEED_OFFSET)
    groups = [rollouts[p:p + k] for p in range(0, len(rollouts), k)]
    return {"tag": tag, "step": step, "split": split, "seed": run["seed"], "n": n, "pass@1": pass1 / max(n, 1),
            f"pass@{k}": passk / max(n, 1), f"majority@{k}": majority_correct(task, groups) / max(n, 1),
            "seconds": round(time.time() - start, 1)}


def main(argv=None):
    args = get_args(argv)
    _, _, _, world_size, device = compute_init(args.device_type)
    if world_size > 1:
        raise UserInputError("dev.eval_checkpoints runs on one process (no torchrun)")
    results = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results = {f"{r['tag']}@{r['step']}@{r['split']}": r for r in json.load(f)}
    root = os.path.join(get_base_dir(), CHECKPOINT_DIRS["cotrain"])
    for tag in args.tags:
        if not os.path.isdir(os.path.join(root, tag)):
            raise UserInputError(f"no co-training checkpoint {tag!r} in {root}")
        saved = list_steps(os.path.join(root, tag))
        missing = sorted(set(args.steps or []) - set(saved))
        if missing:
            raise UserInputError(f"{tag} has no checkpoint at step(s) {missing}; saved steps: {saved}")
        for step in args.steps or saved[-1:]:
            key = f"{tag}@{step}@{args.split}"
            if key not in results:
                results[key] = score(tag, step, args.split, device)
                if args.out:  # after every checkpoint: an interrupted scoring keeps what it finished
                    tmp = args.out + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump(list(results.values()), f, indent=1)
                    os.replace(tmp, args.out)
            r = results[key]
            print(f"{tag} step {step} ({args.split}): " + " | ".join(f"{m} {v:.4f}" for m, v in r.items()
                                                                     if m.startswith(("pass@", "majority@"))), flush=True)
    return list(results.values())


if __name__ == "__main__":
    run_stage(main)
