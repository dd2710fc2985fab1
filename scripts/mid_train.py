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
import sys
import time

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init, get_base_dir, init_wandb, print0


def parse_args(argv=None):
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
            parser.error(f"--{name} must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error("--max_seq_len must be >= 1")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must be in [0, 1]")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        parser.error("--warmup_ratio + --warmdown_ratio must not exceed 1")
    if args.init_lr_frac <= 0:
        parser.error("--init_lr_frac must be > 0")
    return args


def train(args):
    from nanochat.chat_data import (accumulate_gradients, load_training_checkpoint, lr_multiplier,
                                    muon_momentum, packed_batches, save_training_checkpoint, set_learning_rates)
    from tasks.by_name import make_mixture
    from nanochat.checkpoint_manager import CHECKPOINT_DIRS, load_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    master = rank == 0
    user_config = dict(vars(args))
    wandb_run = init_wandb("nanochat-mid", args.run, user_config, master_process=master)
    report = get_report()

    # ---- data first: a missing data set should fail before the model is loaded
    identity_file = args.identity_file or os.path.join(get_base_dir(), "identity_conversations.jsonl")
    train_task, train_names = make_mixture(args.tasks, "train", data_dir=args.data_dir, identity_file=identity_file)
    if train_task is None:
        raise ValueError(f"--tasks {args.tasks!r} leaves nothing to train on")
    val_task, val_names = make_mixture(args.tasks, "val", data_dir=args.data_dir, identity_file=identity_file,
                                       val_size=args.val_size)
    print0(f"training on {len(train_task):,} conversations ({', '.join(train_names)}); "
           f"validation: {len(val_task) if val_task else 0:,} ({', '.join(val_names) or 'none'}) | loss on {args.loss_on} tokens")

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
    print0(f"{horizon} x {total_batch_size:,} tokens | grad accumulation {grad_accum_steps} ({B} x {T} x {world_size} ranks)")

    start_step, loader_state = 0, None
    loop_state = {"min_val_bpb": math.inf, "val_bpb": None, "progress": 0.0}
    if args.resume:
        start_step, ckpt_meta, loader_state = load_training_checkpoint(checkpoint_dir, orig_model, optimizer, device)
        loop_state.update(ckpt_meta.get("loop_state", {}))
        print0(f"resumed from {checkpoint_dir} step {start_step}")

    train_loader = packed_batches(train_task, tokenizer, B, T, rank, world_size, loss_on=args.loss_on,
                                  resume_state=loader_state, device=device)
    consumed_state = loader_state or {"position": 0, "skip": 0, "epoch": 0}

    def epoch_progress(state):
        """Fraction of the mixture consumed, the same on every rank (the max over ranks)."""
        p = torch.tensor((rank + state["position"] * world_size) / len(train_task), dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(p, op=dist.ReduceOp.MAX)
        return p.item()

    def run_val_bpb():
        if val_task is None:
            return math.nan
        batches = packed_batches(val_task, tokenizer, B, T, rank, world_size, loss_on=args.loss_on,
                                 single_pass=True, device=device)
        model.eval()
        bpb = evaluate_bpb(model, batches, eval_steps, token_bytes)
        model.train()
        if math.isinf(bpb):
            print0(f"warning: the validation split holds less than one batch of {B} x {T} tokens: no val bpb")
            return math.nan
        return bpb

    def checkpoint(step):
        meta_out = {"model_config": dataclasses.asdict(orig_model.config), "user_config": user_config,
                    "model_tag": model_tag, "source": args.source, "loop_state": dict(loop_state)}
        save_training_checkpoint(checkpoint_dir, step, orig_model, optimizer, meta_out, consumed_state)

    history = {"losses": {}, "val_bpb": {}, "checkpoint_dir": checkpoint_dir, "skipped_steps": 0}
    step = start_step
    last_saved = start_step if args.resume else None
    t_start = time.time()
    model.train()
    while True:
        if args.num_iterations > 0:
            progress = step / args.num_iterations
        else:
            progress = loop_state["progress"]
        last_step = progress >= 1.0

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = run_val_bpb()
            loop_state["val_bpb"] = val_bpb
            history["val_bpb"][step] = val_bpb
            if val_bpb == val_bpb:
                loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
                report.log_curve("mid/val_bpb", step, val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})

        if not args.dry_run and step != last_saved and (last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0)):
            checkpoint(step)
            last_saved = step

        if last_step:
            break

        # ---- one optimizer step
        t0 = time.time()
        micro_batches = []
        for _ in range(grad_accum_steps):
            inputs, targets, consumed_state = next(train_loader)
            micro_batches.append((inputs, targets))
        set_learning_rates(optimizer, lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
                           momentum=muon_momentum(step))
        train_loss, num_tokens, skipped = accumulate_gradients(model, micro_batches)
        if train_loss is None:
            print0(f"warning: step {step}: no trained tokens in any row (all masked); optimizer step skipped")
            history["skipped_steps"] += 1
        else:
            if not math.isfinite(train_loss):
                raise RuntimeError(f"non-finite training loss {train_loss} at step {step}; last checkpoint: "
                                   f"{checkpoint_dir} step {last_saved} (continue with --resume, maybe with a lower --init_lr_frac)")
            optimizer.step(grad_clip=args.grad_clip if args.grad_clip > 0 else None)
        orig_model.zero_grad(set_to_none=True)
        step += 1
        if args.num_iterations <= 0:
            loop_state["progress"] = epoch_progress(consumed_state)
        dt = time.time() - t0
        if train_loss is not None:
            history["losses"][step] = train_loss
            report.log_curve("mid/train_loss", step, train_loss)
        shown = step / args.num_iterations if args.num_iterations > 0 else loop_state["progress"]
        loss_str = f"{train_loss:.4f}" if train_loss is not None else "skipped"
        print0(f"step {step:05d} ({100 * shown:.1f}%) | loss {loss_str} | lrm "
               f"{optimizer.param_groups[0]['lr'] / optimizer.param_groups[0]['initial_lr']:.3f} | "
               f"tok/s {int(total_batch_size / dt):,} | dt {dt * 1000:.0f}ms"
               + (f" | {skipped} all-masked micro-batches skipped" if skipped else ""))
        wandb_run.log({"step": step, "train/loss": train_loss, "train/progress": shown, "train/dt": dt})

    history["num_iterations"] = step
    history["min_val_bpb"] = loop_state["min_val_bpb"]
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.2f}m | min val bpb {loop_state['min_val_bpb']:.4f}")
    if not args.dry_run:
        report.log(section="Midtraining", data=[user_config, {
            "Training conversations": len(train_task), "Iterations": step, "Tokens per step": total_batch_size,
            "Grad accumulation steps": grad_accum_steps, "Minimum validation bpb": loop_state["min_val_bpb"],
            "Final validation bpb": loop_state["val_bpb"]}])
    wandb_run.finish()
    return history


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    from tasks.records import DataNotFoundError
    try:
        main()
    except (FileNotFoundError, ValueError, DataNotFoundError) as e:  # bad flags, missing data or checkpoints
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
