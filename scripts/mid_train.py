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
import os

import torch

from nanochat.common import UserInputError, compute_init, get_base_dir, init_wandb, print0, run_stage


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Mid-training on packed conversations",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    parser.add_argument("--dry_run", action="store_true", help="train and evaluate, but write no checkpoint or report")
    # model
    parser.add_argument("--source", default="base", choices=["base", "mid"], help="checkpoint stage to start from")
    parser.add_argument("--model_tag", default=None, help="model tag to load (default: the largest)")
    parser.add_argument("--model_step", type=int, default=None, help="checkpoint step to load (default: the last)")
    parser.add_argument("--output_tag", default=None, help="tag of the mid checkpoints (default: the model tag)")
    # data
    parser.add_argument("--tasks", default="mid-full", help="training tasks (see the module docstring); 'offline' needs no downloads")
    parser.add_argument("--identity_file", default=None,
                        help="identity conversations JSONL (default: <base dir>/identity_conversations.jsonl)")
    parser.add_argument("--data_dir", default=None, help="local task data (else $NANOCHAT_TASK_DATA, else the HF hub)")
    parser.add_argument("--val_size", type=int, default=5000, help="validation conversations per task, at most")
    parser.add_argument("--loss_on", default="all", choices=["all", "assistant"], help="which tokens carry the loss")
    # batch and horizon
    parser.add_argument("--max_seq_len", type=int, default=None, help="T, the row length (default: the model's sequence_len)")
    parser.add_argument("--device_batch_size", type=int, default=32, help="B, rows per forward/backward")
    parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (-1: one micro-batch per rank)")
    parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the mixture)")
    # optimisation (base_train's flags)
    parser.add_argument("--init_lr_frac", type=float, default=1.0, help="fraction of the base learning rates to use")
    parser.add_argument("--embedding_lr", type=float, default=0.2)
    parser.add_argument("--unembedding_lr", type=float, default=0.004)
    parser.add_argument("--matrix_lr", type=float, default=0.02)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_ratio", type=float, default=0.0)
    parser.add_argument("--warmdown_ratio", type=float, default=0.2)
    parser.add_argument("--final_lr_frac", type=float, default=0.0)
    parser.add_argument("--grad_clip", type=float, default=0.0, help="global grad-norm clip (0: off)")
    # evaluation and checkpoints
    parser.add_argument("--eval_every", type=int, default=150, help="validation bpb every N steps (-1: only at the end)")
    parser.add_argument("--eval_tokens", type=int, default=20 * 524288, help="validation tokens per evaluation, all ranks")
    parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last mid checkpoint of --output_tag")
    args = parser.parse_args(argv)
    for name in ("device_batch_size", "val_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserInputError("--max_seq_len must be >= 1")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserInputError(f"--{name} must be in [0, 1]")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise UserInputError("--warmup_ratio + --warmdown_ratio must not exceed 1")
    if args.init_lr_frac <= 0:
        raise UserInputError("--init_lr_frac must be > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import packed_batches
    from nanochat.chat_train import load_task_mixtures, train_chat
    from nanochat.checkpoint_manager import CHECKPOINT_DIRS, load_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    user_config = dict(vars(args))
    wandb_run = init_wandb("nanochat-mid", args.run, user_config, master_process=rank == 0)
    report = get_report()

    # ---- data first: a missing data set should fail before the model is loaded
    train_task, val_task = load_task_mixtures(args)

    # ---- model, batch, optimizer
    orig_model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step)
    token_bytes = get_token_bytes(device)
    model_tag = args.output_tag or meta.get("model_tag") or args.model_tag or f"d{orig_model.config.n_layer}"
    checkpoint_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS["mid"], model_tag)
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
    frac = args.init_lr_frac
    optimizer = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr * frac, embedding_lr=args.embedding_lr * frac,
                                            matrix_lr=args.matrix_lr * frac, weight_decay=args.weight_decay)
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
