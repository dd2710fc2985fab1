"""
Supervised fine-tuning on conversations: the model learns to answer as the assistant.

Each conversation is one row, padded to the longest row of its micro-batch; the loss is on the
assistant's tokens only (targets are -1 on the prompt, tool output and padding). Gradients are
accumulated over --examples_per_step conversations per optimizer step (across all ranks) and the loss
is the mean over every trained token of the step. A micro-batch with no trained token at all is
skipped with a warning (a mean over zero tokens would be NaN).

    python -m scripts.chat_sft                                   # offline default: synthetic tasks
    python -m scripts.chat_sft --tasks sft-full --eval_metrics_tasks 'mmlu|arc-easy'
    python -m scripts.chat_sft --tasks 'gsm8k|arithmetic:5000|identity' --identity_file my.jsonl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --tasks sft-full --run sft

--tasks: task names joined with '|' (arc-easy, arc-challenge, mmlu, gsm8k, smoltalk, spellingbee,
simplespelling, identity, aqua, arithmetic), each optionally ':N' (first N examples) or '*K' (K times),
'?' after a name makes a task optional (left out if its data is missing), and 'arithmetic@D' picks the
arithmetic task's difficulty preset D (e.g. 'arithmetic@3' for an RL start at preset 3); or a preset: offline (the
default: arithmetic and spelling, generated locally) or sft-full (nanochat's SFT mixture plus AQuA-RAT:
ARC-Easy/Challenge, GSM8K, SmolTalk, identity if the file exists, spelling, AQuA). Validation uses the same tasks' validation or
test splits. Checkpoints go to chatsft_checkpoints/<tag> (weights, optimizer shards, data position);
--resume continues from the last one.
"""

import argparse
import dataclasses
import math

from nanochat.chat_train import add_chat_training_flags, check_chat_training_flags
from nanochat.common import UserInputError, compute_init, init_wandb, print0, run_stage


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Supervised fine-tuning on conversations",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_chat_training_flags(parser, "SFT", source="mid", tasks="offline", val_size=1000, init_lr_frac=0.02,
                            warmdown_ratio=1.0, eval_every=100)
    # batch and horizon
    parser.add_argument("--device_batch_size", type=int, default=4, help="conversations per forward/backward")
    parser.add_argument("--examples_per_step", type=int, default=32, help="conversations per optimizer step, all ranks")
    parser.add_argument("--max_seq_len", type=int, default=None, help="cut conversations to this many tokens (default: the model's)")
    parser.add_argument("--num_epochs", type=int, default=1)
    parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: --num_epochs over the data)")
    # evaluation
    parser.add_argument("--eval_steps", type=int, default=100, help="validation micro-batches per evaluation")
    parser.add_argument("--eval_metrics_every", type=int, default=200, help="task accuracies every N steps (-1: only at the end)")
    parser.add_argument("--eval_metrics_tasks", default="mmlu|arc-easy",
                        help="tasks for the periodic accuracy ('' for none); ones whose data cannot be loaded are skipped")
    parser.add_argument("--eval_metrics_max_problems", type=int, default=1024)
    parser.add_argument("--eval_max_new_tokens", type=int, default=256, help="sampling budget of generative metric tasks")
    args = parser.parse_args(argv)
    check_chat_training_flags(args)
    for name in ("device_batch_size", "examples_per_step", "num_epochs", "eval_steps", "eval_metrics_max_problems"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UserInputError("--max_seq_len must be >= 2")
    return args


def load_metric_tasks(spec, data_dir):
    """[(display name, task)] for the periodic accuracy; a task whose data is missing is left out with a warning."""
    from tasks.by_name import load_eval_task, parse_task_names
    if not spec.strip():
        return []
    out = []
    for name in parse_task_names(spec):
        try:
            out.append(load_eval_task(name, data_dir=data_dir))
        except (UserInputError, FileNotFoundError) as e:  # missing data (DataNotFoundError is a UserInputError)
            print0(f"warning: no accuracy for {name} during SFT: {str(e).splitlines()[0][:300]}")
    return out


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import evaluate_loss, sft_batches
    from nanochat.chat_train import load_model_to_train, train_chat
    from tasks.by_name import load_task_mixtures
    from nanochat.engine import Engine
    from nanochat.eval import run_task_eval
    from nanochat.report import get_report

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    user_config = dict(vars(args))
    wandb_run = init_wandb("nanochat-sft", args.run, user_config, master_process=rank == 0)
    report = get_report()

    # ---- data first: a missing data set should fail before the model is loaded
    train_task, val_task = load_task_mixtures(args)
    metric_tasks = load_metric_tasks(args.eval_metrics_tasks, args.data_dir)

    # ---- model, optimizer, horizon
    model, tokenizer, model_tag, checkpoint_dir, optimizer = load_model_to_train(args, "sft", device)
    max_seq_len = args.max_seq_len or model.config.sequence_len
    B = args.device_batch_size
    rows_per_micro_step = B * world_size
    if args.examples_per_step % rows_per_micro_step:
        raise ValueError(f"--examples_per_step={args.examples_per_step} must be a multiple of device_batch_size x "
                         f"world_size = {B} x {world_size}")
    grad_accum_steps = args.examples_per_step // rows_per_micro_step
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = max(1, args.num_epochs * len(train_task) // args.examples_per_step)
    print0(f"{num_iterations} steps x {args.examples_per_step} conversations | grad accumulation {grad_accum_steps} "
           f"| max_seq_len {max_seq_len}")
    engine = Engine(model, tokenizer)

    def train_batches(resume_state):
        return sft_batches(train_task, tokenizer, B, max_seq_len, rank, world_size, resume_state=resume_state, device=device)

    def val_loss():
        if val_task is None:
            return math.nan
        batches = sft_batches(val_task, tokenizer, B, max_seq_len, rank, world_size, single_pass=True, device=device)
        return evaluate_loss(model, batches, args.eval_steps)

    def task_accuracies():
        return {display: run_task_eval(task, tokenizer, model, engine=engine, max_problems=args.eval_metrics_max_problems,
                                       batch_size=B * 2, max_new_tokens=args.eval_max_new_tokens, seed=args.seed)
                for display, task in metric_tasks}

    # ---- the loop (nanochat/chat_train.py, shared with mid-training)
    checkpoint_meta = {"model_config": dataclasses.asdict(model.config), "user_config": user_config, "model_tag": model_tag,
                       "source": args.source, "num_iterations": num_iterations}
    history = train_chat("sft", args, model, optimizer, train_batches, num_iterations=num_iterations,
                         grad_accum_steps=grad_accum_steps, num_examples=len(train_task),
                         checkpoint_dir=checkpoint_dir, meta=checkpoint_meta, val_name="val_loss", evaluate_val=val_loss,
                         evaluate_metrics=task_accuracies if metric_tasks else None, metrics_every=args.eval_metrics_every,
                         report=report, wandb_run=wandb_run, rank=rank, world_size=world_size)

    if not args.dry_run:
        final_metrics = history["metrics"].get(num_iterations, {})
        report.log(section="Chat SFT", data=[user_config, {
            "Training conversations": len(train_task), "Iterations": num_iterations,
            "Grad accumulation steps": grad_accum_steps, "Skipped steps (all masked)": history["skipped_steps"],
            "Skipped micro-batches (all masked)": history["skipped_micro_batches"],
            "Final train loss": history["losses"].get(num_iterations, math.nan),
            "Minimum validation loss": history["min_val_loss"],
            **{f"{name} accuracy": acc for name, acc in final_metrics.items()}}])
    wandb_run.finish()
    return history


if __name__ == "__main__":
    run_stage(main)
