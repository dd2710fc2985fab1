"""
What a saved co-training generator writes, in numbers: steps per solution against the reference solution's,
where the first wrong step falls (the oracle's gold step labels), completion length, how many samples reach the
token limit, accuracy, and a few sample texts. Pass@1 says *whether* a run got worse; this says *how* its
writing changed. It found that the oracle's process signal alone teaches the generator to stop after one right
step (dev/cotrain_val_gated.md).

    python -m dev.rollout_shape --tags hard_baseline_s2 vala10_oracle_s2 --steps 100 --split val \
        --problems 64 --samples 2 --out dev/logs/cotrain_val_gated/rollout_shape.json

Sampling follows the run's own settings (task, difficulty, max_new_tokens, temperature, top_k, read from the
checkpoint's meta) under a fixed --seed, so two checkpoints are compared on the same problems. Tasks without a
reference chain (GSM8K has no exact one) are refused.
"""

import argparse
import collections
import json
import statistics

from dev.eval_checkpoints import load_generator
from nanochat.common import UserInputError, compute_init, run_stage
from nanochat.grpo import sample_and_score
from tasks import verify


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tags", nargs="+", required=True, help="co-training checkpoint tags (cotrain_checkpoints/<tag>)")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="checkpoint steps (default: each tag's last)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--problems", type=int, default=64, help="the first N problems of the split")
    p.add_argument("--samples", type=int, default=2, help="samples per problem")
    p.add_argument("--seed", type=int, default=123, help="sampling seed, the same for every checkpoint")
    p.add_argument("--show", type=int, default=3, help="sample texts kept per checkpoint")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (empty: autodetect)")
    args = p.parse_args(argv)
    if args.problems < 1 or args.samples < 1 or args.show < 0:
        p.error("--problems and --samples must be positive, --show non-negative")
    return args


def shape(tag, step, split, problems, samples, seed, show, device):
    """The numbers above for the generator of checkpoint <tag> at <step> (None: its last)."""
    engine, tokenizer, task, run, meta = load_generator(tag, step, split, device)
    if not hasattr(task, "reference_chain"):
        raise UserInputError(f"{tag}: task {run['task']!r} has no reference chain, so steps cannot be labelled exactly")
    indices = list(range(min(problems, len(task))))
    rollouts = sample_and_score(engine, tokenizer, task, indices, samples, run["max_new_tokens"], run["temperature"],
                                run["top_k"], seed)
    steps, labels, lengths, first_errors = [], [], [], collections.Counter()
    for r in rollouts:
        step_labels, first_error = verify.gold_step_labels(r.text, reference_values=task.reference_chain(r.example_index))
        steps.append(len(step_labels))
        labels += step_labels
        lengths.append(len(r.completion_ids))
        first_errors["none" if first_error < 0 else f"step {first_error + 1}"] += 1
    return {"tag": tag, "step": meta.get("step", step), "split": split, "samples": len(rollouts),
            "accuracy": statistics.fmean(r.info["correct"] for r in rollouts),
            "steps_written": statistics.fmean(steps),
            "reference_steps": statistics.fmean(len(task.reference_chain(i)) for i in indices),
            "step_labels_correct": statistics.fmean(labels) if labels else 0.0,
            "first_error": dict(sorted(first_errors.items())),
            "tokens": statistics.fmean(lengths),
            "at_token_limit": sum(n >= run["max_new_tokens"] for n in lengths) / len(lengths),
            "examples": [{"question": task.question(r.info["conversation"]), "solution": r.text}
                         for r in rollouts[:show * samples:samples]]}


def main(argv=None):
    args = get_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    results = []
    for tag in args.tags:
        for step in args.steps or [None]:
            result = shape(tag, step, args.split, args.problems, args.samples, args.seed, args.show, device)
            results.append(result)
            print(f"{tag} @ {result['step']} ({args.split}): accuracy {result['accuracy']:.3f} | steps written "
                  f"{result['steps_written']:.2f} (reference {result['reference_steps']:.2f}) | step labels correct "
                  f"{result['step_labels_correct']:.2f} | first error {result['first_error']} | tokens "
                  f"{result['tokens']:.1f} | at the token limit {result['at_token_limit']:.2f}", flush=True)
            for example in result["examples"]:
                print(f"    {example['question'][:100]!r}\n      -> {example['solution'][:240]!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    run_stage(main)
