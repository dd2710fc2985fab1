"""
Evaluate a chat model (mid, sft, rl or cotrain checkpoint) on the chat tasks and compute ChatCORE.

Multiple choice tasks (ARC-Easy, ARC-Challenge, MMLU) are scored from the logits of the answer letters;
generative ones (GSM8K, HumanEval, SpellingBee, AQuA, Arithmetic) by sampling with the Engine and
grading the completion. See nanochat/eval.py for the details and the ChatCORE formula.

    python -m scripts.chat_eval -i sft                          # the ChatCORE suite (-a all)
    python -m scripts.chat_eval -i mid -a 'ARC-Easy|GSM8K' -x 200
    python -m scripts.chat_eval -i sft -a arithmetic -x 64      # our offline CPU task
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Prints a table, appends a section "Chat evaluation <source>" to the report, and returns a dict
{task display name: accuracy, ..., "ChatCORE": value}.
"""

import argparse
import time

from nanochat.common import UserInputError, compute_init, print0, run_stage
from nanochat.eval import CHANCE, centered_accuracy, chatcore, run_task_eval
from tasks.by_name import ALL_TASKS, load_eval_task, parse_task_names


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model; prints accuracies and ChatCORE",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl", "cotrain"],
                        help="which checkpoint stage to evaluate")
    parser.add_argument("-a", "--task_name", default="all",
                        help="'all' (ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee|AQuA), one task, "
                             "or several joined with '|'; also 'arithmetic'")
    parser.add_argument("-g", "--model_tag", default=None, help="model tag to load (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--model_key", default=None,
                        help="which model of a checkpoint holding several (default: 'generator' for -i cotrain)")
    parser.add_argument("-x", "--max_problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("-b", "--batch_size", type=int, default=8, help="prompts per forward pass / Engine call")
    parser.add_argument("-n", "--num_samples", type=int, default=1, help="samples per generative problem (pass@n)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-k", "--top_k", type=int, default=50)
    parser.add_argument("-m", "--max_new_tokens", type=int, default=512)
    parser.add_argument("--data_dir", default=None, help="local task data (else $NANOCHAT_TASK_DATA, else the HF hub)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42)
    from nanochat.engine import add_decode_flag
    add_decode_flag(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1")
    if args.temperature < 0:
        raise UserInputError("--temperature must be >= 0")
    if args.max_problems is not None and args.max_problems < 1:
        raise UserInputError("--max_problems must be >= 1")
    args.tasks = parse_task_names(args.task_name)  # ValueError for an unknown name
    return args


def format_table(results, elapsed):
    lines = ["| Task | Accuracy | Centered | Time (s) |", "|---|---|---|---|"]
    for name, acc in results.items():
        lines.append(f"| {name} | {acc:.4f} | {centered_accuracy(acc, CHANCE[name]):.4f} | {elapsed[name]:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine, check_decode

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    check_decode(args.decode, device.type)
    # load the data first: a missing data set should fail before minutes of model loading
    tasks = [load_eval_task(name, data_dir=args.data_dir) for name in args.tasks]
    # co-training checkpoints hold {"generator", "verifier"}: the chat model is the generator
    model_key = args.model_key or ("generator" if args.source == "cotrain" else None)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag,
                                        step=args.step, model_key=model_key)
    engine = Engine(model, tokenizer, decode=args.decode)
    results, elapsed = {}, {}
    for display, task in tasks:
        t0 = time.time()
        acc = run_task_eval(task, tokenizer, model, engine=engine, max_problems=args.max_problems,
                            batch_size=args.batch_size, num_samples=args.num_samples,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed)
        results[display], elapsed[display] = acc, time.time() - t0
        print0(f"{display}: {acc:.4f} ({elapsed[display]:.1f}s)")
    out = dict(results)
    out["ChatCORE"] = chatcore(results)
    print0(format_table(results, elapsed))
    print0(f"ChatCORE over {len(results)} task(s) ({', '.join(results)}): {out['ChatCORE']:.4f}")

    # the report's summary table only shows a ChatCORE of the whole suite, comparable across stages
    full_suite = set(args.tasks) >= set(ALL_TASKS)
    core_key = "ChatCORE" if full_suite else f"ChatCORE ({len(results)} of {len(ALL_TASKS)} tasks)"
    from nanochat.report import get_report
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        {"source": args.source, "model_tag": meta.get("model_tag", args.model_tag), "step": meta.get("step"),
         "max_problems": args.max_problems, "num_samples": args.num_samples, "temperature": args.temperature},
        results,
        {core_key: out["ChatCORE"]},
        format_table(results, elapsed),
    ])
    return out


if __name__ == "__main__":
    run_stage(main)
