"""
Mid-training: continue training the base model on conversations, so that it learns the chat format
(special tokens, turns), multiple-choice answering and calling the calculator tool before SFT.

Conversations are rendered with the chat template and laid end to end into fixed (B, T) rows, exactly
like pretraining batches. By default the loss is on every token (--loss_on all, nanochat's choice for
this stage: the model should learn the whole format, user turns included); --loss_on assistant trains
only on what the assistant writes, as SFT does.

    python -m scripts.mid_train                                  # nanochat's mixture, one epoch
    python -m scripts.mid_train --tasks offline                  # synthetic tasks only (CPU, no downloads)
    python -m scripts.mid_train --tasks 'arithmetic|spellingbee:5000' --num_iterations 200
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --tasks mid-full --run mid

--tasks: task names joined with '|' (smoltalk, mmlu [auxiliary_train], gsm8k, identity, spellingbee,
simplespelling, arc-easy, arc-challenge, aqua, arithmetic), each optionally ':N' (first N examples) or
'*K' (K times), and '?' after a name makes a task optional (left out if its data is missing); or a
preset: mid-full (the default, nanochat's mixture: SmolTalk, MMLU auxiliary train, GSM8K with tool
calls, the identity conversations of --identity_file twice if the file exists, the spelling tasks) or
offline (arithmetic and spelling, all generated locally). The run is one epoch of the mixture unless
--num_iterations is given. The learning-rate flags are base_train's; the schedule is constant, then a
linear warmdown over the last --warmdown_ratio of the run. Validation bits per byte are measured on
the same tasks' held-out splits every --eval_every steps. Checkpoints go to mid_checkpoints/<tag>
(weights, optimizer shards, exact data position); --resume continues from the last one.
"""

import argparse
import dataclasses
import math

import torch

from nanochat.chat_train import add_chat_training_flags, check_chat_training_flags
from nanochat.common import UserInputError, compute_init, init_wandb, print0, run_stage


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Mid-training on packed conversations",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_chat_training_flags(parser, "mid", source="base", tasks="mid-full", val_size=5000, init_lr_frac=1.0,
                            warmdown_ratio=0.2, eval_every=150)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    parser.add_argument("--loss_on", default="all", choices=["all", "assistant"], help="which tokens carry the loss")
    # batch and horizon
    parser.add_argument("--max_seq_len", type=int, default=None, help="T, the row length (default: the model's sequence_len)")
    parser.add_argument("--device_batch_size", type=int, default=32, help="B, rows per forward/backward")
    parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (-1: one micro-batch per rank)")
    parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the mixture)")
    parser.add_argument("--eval_tokens", type=int, default=20 * 524288, help="validation tokens per evaluation, all ranks")
    args = parser.parse_args(argv)
    check_chat_training_flags(args)
    for name in ("device_batch_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserInputError("--max_seq_len must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import packed_batches
    from nanochat.chat_train import load_model_to_train, train_chat
    from tasks.by_name import load_task_mixtures
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    user_config = dict(vars(args))
    wandb_run = init_wandb("nanochat-mid", args.run, user_config, master_process=rank == 0)
    report = get_report()

    # ---- data first: a missing data set should fail before the model is loaded
    train_task, val_task = load_task_mixtures(args)

    # ---- model, optimizer, batch
    orig_model, tokenizer, model_tag, checkpoint_dir, optimizer = load_model_to_train(args, "mid", device)
    token_bytes = get_token_bytes(device)
    T = args.max_seq_len or orig_model.config.sequence_len
    B = args.device_batch_size
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    tokens_per_micro_step = B * T * world_size
    total_batch_size = tokens_per_micro_step if args.total_batch_size == -1 else args.total_batch_size
    if total_batch_size < 1 or total_batch_size % tokens_per_micro_step:
        raise ValueError(f"--total_batch_size={args.total_batch_size} must be a positive multiple of device_batch_size x "
                         f"max_seq_len x world_size = {B} x {T} x {world_size} = {tokens_per_micro_step}")
    grad_accum_steps = total_batch_size // tokens_per_micro_step
    eval_steps = max(1, args.eval_tokens // tokens_per_micro_step)
    horizon = f"{args.num_iterations} steps" if args.num_iterations > 0 else "one epoch"
    print0(f"{horizon} x {total_batch_size:,} tokens | grad accumulation {grad_accum_steps} ({B} x {T} x {world_size} ranks) "
           f"| loss on {args.loss_on} tokens")

    def train_batches(resume_state):
        return packed_batches(train_task, tokenizer, B, T, rank, world_size, loss_on=args.loss_on,
                              resume_state=resume_state, device=device)

    def val_bpb():
        if val_task is None:
            return math.nan
        batches = packed_batches(val_task, tokenizer, B, T, rank, world_size, loss_on=args.loss_on,
                                 single_pass=True, device=device)
        bpb = evaluate_bpb(model, batches, eval_steps, token_bytes)
        if math.isinf(bpb):
            print0(f"warning: the validation split holds less than one batch of {B} x {T} tokens: no val bpb")
            return math.nan
        return bpb

    # ---- the loop (nanochat/chat_train.py, shared with SFT)
    checkpoint_meta = {"model_config": dataclasses.asdict(orig_model.config), "user_config": user_config,
                       "model_tag": model_tag, "source": args.source}
    history = train_chat("mid", args, orig_model, optimizer, train_batches, train_model=model,
                         num_iterations=args.num_iterations if args.num_iterations > 0 else None,
                         grad_accum_steps=grad_accum_steps, num_examples=len(train_task), momentum_warmup=True,
                         checkpoint_dir=checkpoint_dir, meta=checkpoint_meta, val_name="val_bpb", evaluate_val=val_bpb,
                         report=report, wandb_run=wandb_run, rank=rank, world_size=world_size)

    if not args.dry_run:
        report.log(section="Midtraining", data=[user_config, {
            "Training conversations": len(train_task), "Iterations": history["num_iterations"],
            "Tokens per step": total_batch_size, "Grad accumulation steps": grad_accum_steps,
            "Minimum validation bpb": history["min_val_bpb"],
            "Final validation bpb": history["val_bpb"][history["num_iterations"]]}])
    wandb_run.finish()
    return history


if __name__ == "__main__":
    run_stage(main)
