"""
How well can a *perfect* expectations-format verifier score on a generator's own solutions? It writes exactly
the warm start's target text (tasks.verify.expectation_text from the task's reference calculations) and the
rule decides. Scored two ways: against the answer check (a right final answer is "correct", the label the
verifier metrics used first) and against the exact label (right answer and every step clean). A right answer
reached through a wrong step ("40*2=<<40*2=80>>57 stickers ... #### 80") is correct by the first and not by the
second, so the first caps even a perfect step judge.

    python -m dev.verifier_ceiling --source sft --model_tag d4 --difficulty 2 --split test --samples 2 --show 3

Prints the four counts (right/wrong answer x clean/unclean steps, with what the perfect text says) and the
perfect judge's balanced accuracy under each label.
"""

import argparse
import collections

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserInputError, compute_init, run_stage
from nanochat.engine import Engine
from nanochat.grpo import HELDOUT_SEED_OFFSET, sample_and_score
from tasks import verify
from tasks.by_name import build_rl_task


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--source", default="sft", help="checkpoint family of the generator (base|mid|sft|rl)")
    p.add_argument("--model_tag", default="d4", help="the generator's model tag")
    p.add_argument("--task", default="arithmetic", help="a task with reference calculations")
    p.add_argument("--difficulty", type=int, default=None, help="arithmetic difficulty preset")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--problems", type=int, default=256, help="problems to sample (at most the split's size)")
    p.add_argument("--samples", type=int, default=2, help="solutions per problem")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--show", type=int, default=0, help="print this many right answers the perfect text rejects")
    p.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = p.parse_args(argv)
    if args.problems < 1 or args.samples < 1:
        p.error("--problems and --samples must be >= 1")
    return args


def classify(task, rollouts):
    """[(answer_right, steps_clean, perfect_says_correct)] per rollout (rollout.info['correct'] from the task)."""
    rows = []
    for r in rollouts:
        reference = task.reference_calculations(r.example_index)
        if not reference:
            raise UserInputError(f"{type(task).__name__} has no reference calculations for problem {r.example_index}")
        labels, first_error = verify.gold_step_labels(r.text, reference_values=task.reference_chain(r.example_index))
        perfect = verify.rule_verification(r.text, verify.expectation_text(r.text, reference)).overall
        rows.append((bool(r.info["correct"]), bool(labels) and first_error < 0, perfect is True))
    return rows


def balanced_accuracy(said_correct, gold_correct):
    return verify.verdict_metrics(verify.count_verdicts(said_correct, gold_correct))["balanced_accuracy"]


def main(argv=None):
    args = get_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag)
    task = build_rl_task(args.task, args.split, None, args.difficulty)
    indices = list(range(min(args.problems, len(task))))
    rollouts = sample_and_score(Engine(model, tokenizer), tokenizer, task, indices, args.samples, args.max_new_tokens,
                                args.temperature, args.top_k, seed=args.seed + HELDOUT_SEED_OFFSET)
    rows = classify(task, rollouts)
    counts = collections.Counter(rows)
    print(f"{len(rows)} solutions ({len(indices)} {args.split} problems x {args.samples}) of {args.source} {args.model_tag}")
    for (right, clean, perfect), n in sorted(counts.items(), reverse=True):
        print(f"  answer {'right' if right else 'wrong'} | steps {'clean' if clean else 'not clean'} | "
              f"perfect text says {'Correct' if perfect else 'Incorrect'}: {n}")
    said = [perfect for _, _, perfect in rows]
    print(f"perfect judge's balanced accuracy: {balanced_accuracy(said, [right for right, _, _ in rows]):.3f} against the "
          f"answer check, {balanced_accuracy(said, [right and clean for right, clean, _ in rows]):.3f} against exact labels")
    shown = [r for r, (right, _, perfect) in zip(rollouts, rows) if right and not perfect][:args.show]
    for r in shown:
        print(f"--- problem {r.example_index}: {task.question(r.info['conversation'])}\n{verify.to_display(r.text)}")
    return rows


if __name__ == "__main__":
    run_stage(main)
