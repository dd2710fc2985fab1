"""
The training loop of the two chat stages, scripts/mid_train.py and scripts/chat_sft.py. They differ in
how conversations become batches (packed rows vs one padded conversation per row, see chat_data), in
what they validate (bits per byte vs loss, plus task accuracies for SFT) and in their defaults; the
loop itself is the same, so it lives here once.

Each turn of the loop: validate when due, checkpoint when due, stop at the horizon, else take one
optimizer step over grad_accum_steps micro-batches (chat_data.accumulate_gradients: the loss is the mean
over every trained token of the step, on every rank count). The horizon is num_iterations steps or, with
num_iterations=None, one epoch of the training task, measured by the data position all ranks reached.
The learning rate and momentum are pure functions of that progress and of the step, and checkpoints
carry the exact data position, so a resumed run continues exactly where the interrupted one was.
"""

import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.chat_data import (accumulate_gradients, load_training_checkpoint, lr_multiplier, muon_momentum,
                                save_training_checkpoint, set_learning_rates)
from nanochat.checkpoint_manager import NonFiniteWeightsError, find_resume_step, stop_if_nonfinite
from nanochat.common import UserInputError, get_base_dir, is_distributed, print0

# the data position before the first batch, in the form both batchers resume from
START_STATE = {"position": 0, "skip": 0, "epoch": 0}


def add_chat_training_flags(parser, stage, *, source, tasks, val_size, init_lr_frac, warmdown_ratio, eval_every):
    """The flags both chat stages take, with the stage's own defaults: runtime, the checkpoint to start
    from and where the new ones go, the task mixture, learning rates and their schedule, checkpoints."""
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dry_run", action="store_true", help="train and evaluate, but write no checkpoint or report")
    # model
    parser.add_argument("--source", default=source, choices=["base", "mid"], help="checkpoint stage to start from")
    parser.add_argument("--model_tag", default=None, help="model tag to load (default: the largest)")
    parser.add_argument("--model_step", type=int, default=None, help="checkpoint step to load (default: the last)")
    parser.add_argument("--output_tag", default=None, help=f"tag of the {stage} checkpoints (default: the model tag)")
    parser.add_argument("--resume", action="store_true", help=f"continue from the last {stage} checkpoint of --output_tag")
    parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    # data
    parser.add_argument("--tasks", default=tasks, help="training tasks (see the module docstring); 'offline' needs no downloads")
    parser.add_argument("--identity_file", default=None,
                        help="identity conversations JSONL (default: <base dir>/identity_conversations.jsonl)")
    parser.add_argument("--data_dir", default=None, help="local task data (else $NANOCHAT_TASK_DATA, else the HF hub)")
    parser.add_argument("--val_size", type=int, default=val_size, help="validation conversations per task, at most")
    parser.add_argument("--eval_every", type=int, default=eval_every, help="validation every N steps (-1: only at the end)")
    # optimisation: base_train's learning rates, scaled by --init_lr_frac
    parser.add_argument("--init_lr_frac", type=float, default=init_lr_frac, help="fraction of the base learning rates to use")
    parser.add_argument("--embedding_lr", type=float, default=0.2)
    parser.add_argument("--unembedding_lr", type=float, default=0.004)
    parser.add_argument("--matrix_lr", type=float, default=0.02)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_ratio", type=float, default=0.0)
    parser.add_argument("--warmdown_ratio", type=float, default=warmdown_ratio, help="1.0: linear decay over the whole run")
    parser.add_argument("--final_lr_frac", type=float, default=0.0)
    parser.add_argument("--grad_clip", type=float, default=0.0, help="global grad-norm clip (0: off)")


def check_chat_training_flags(args):
    """UserInputError for a value of the shared flags that cannot work."""
    if args.val_size < 1:
        raise UserInputError("--val_size must be >= 1")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserInputError(f"--{name} must be in [0, 1]")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise UserInputError("--warmup_ratio + --warmdown_ratio must not exceed 1")
    if args.init_lr_frac <= 0:
        raise UserInputError("--init_lr_frac must be > 0")


def load_model_to_train(args, stage, device):
    """The model to train (--source, --model_tag, --model_step), its tokenizer, the tag and directory of the
    checkpoints this stage writes, and its optimizer at --init_lr_frac of the base learning rates."""
    from nanochat.checkpoint_manager import CHECKPOINT_DIRS, load_model
    model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.model_step)
    model_tag = args.output_tag or meta.get("model_tag") or args.model_tag or f"d{model.config.n_layer}"
    checkpoint_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS[stage], model_tag)
    frac = args.init_lr_frac
    optimizer = model.setup_optimizers(unembedding_lr=args.unembedding_lr * frac, embedding_lr=args.embedding_lr * frac,
                                       matrix_lr=args.matrix_lr * frac, weight_decay=args.weight_decay)
    return model, tokenizer, model_tag, checkpoint_dir, optimizer


def epoch_progress(state, rank, world_size, num_examples, device):
    """Fraction of the training task consumed, the same on every rank (the furthest rank's)."""
    p = torch.tensor((rank + state["position"] * world_size) / num_examples, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(p, op=dist.ReduceOp.MAX)
    return p.item()


def train_chat(stage, args, model, optimizer, make_train_batches, *, num_iterations, grad_accum_steps, num_examples,
               checkpoint_dir, meta, val_name, evaluate_val, evaluate_metrics=None, metrics_every=-1,
               momentum_warmup=False, train_model=None, report, wandb_run, rank=0, world_size=1):
    """Train `model` and return its history: {"losses": {step: loss}, val_name: {step: value},
    "metrics": {step: {task: accuracy}}, "min_<val_name>", "skipped_steps", "skipped_micro_batches",
    "num_iterations" (steps done), "checkpoint_dir"}.

    stage             "mid" or "sft": the prefix of the report's curves.
    args              the stage's flags; read here: resume, dry_run, eval_every, save_every, warmup_ratio,
                      warmdown_ratio, final_lr_frac, grad_clip.
    make_train_batches(resume_state) -> this rank's (inputs, targets, state) micro-batches, endless.
    num_iterations    optimizer steps, or None for one epoch of the task's num_examples conversations.
    meta              what checkpoints record besides the loop state (model config, flags, tag, ...).
    evaluate_val()    -> the validation number called val_name ("val_bpb", "val_loss"); nan when there
                      is nothing to validate on. Runs every --eval_every steps and at the end.
    evaluate_metrics() -> {task: accuracy}, every metrics_every steps (-1: never) and at the end.
    momentum_warmup   ramp Muon's momentum 0.85 -> 0.95 over the first steps (as in pretraining).
    train_model       what the steps run through, e.g. a torch.compile'd `model` (default: model itself).
    """
    train_model = train_model or model
    device = model.get_device()
    min_name = f"min_{val_name}"
    label = val_name.replace("_", " ")
    loop_state = {"progress": 0.0, val_name: None, min_name: math.inf}
    start_step, loader_state = 0, None
    if args.resume:  # the latest checkpoint this run config wrote, never another run's
        resume_step = find_resume_step(checkpoint_dir, meta.get("user_config", {}))
        start_step, ckpt_meta, loader_state = load_training_checkpoint(checkpoint_dir, model, optimizer, device, step=resume_step)
        loop_state.update(ckpt_meta.get("loop_state", {}))
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    train_batches = make_train_batches(loader_state)
    consumed_state = loader_state or dict(START_STATE)  # resumes after the last micro-batch trained on

    history = {"losses": {}, val_name: {}, "metrics": {}, "skipped_steps": 0, "skipped_micro_batches": 0,
               "checkpoint_dir": checkpoint_dir}
    step = start_step
    last_saved = start_step if args.resume else None
    t_start = time.time()
    train_model.train()
    while True:
        progress = step / num_iterations if num_iterations else loop_state["progress"]
        last_step = progress >= 1.0

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            train_model.eval()
            value = evaluate_val()
            train_model.train()
            loop_state[val_name] = value
            history[val_name][step] = value
            if value == value:  # nan: nothing to validate on, keep it off the curve and the minimum
                loop_state[min_name] = min(loop_state[min_name], value)
                report.log_curve(f"{stage}/{val_name}", step, value)
            print0(f"step {step:05d} | {label} {value:.4f}")
            wandb_run.log({"step": step, "val/" + val_name.removeprefix("val_"): value})

        if evaluate_metrics is not None and (last_step or (metrics_every > 0 and step > 0 and step % metrics_every == 0)):
            train_model.eval()
            accs = evaluate_metrics()
            train_model.train()
            history["metrics"][step] = accs
            for display, acc in accs.items():
                report.log_curve(f"{stage}/{display}_acc", step, acc)
            print0(f"step {step:05d} | " + " | ".join(f"{k} acc {v:.4f}" for k, v in accs.items()))
            wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in accs.items()}})

        if not args.dry_run and step != last_saved and (last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0)):
            save_training_checkpoint(checkpoint_dir, step, model, optimizer, dict(meta, loop_state=dict(loop_state)),
                                     consumed_state)
            last_saved = step

        if last_step:
            break

        # ---- one optimizer step
        t0 = time.time()
        micro_batches = []
        for _ in range(grad_accum_steps):
            inputs, targets, consumed_state = next(train_batches)
            micro_batches.append((inputs, targets))
        lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizer, lrm, momentum=muon_momentum(step) if momentum_warmup else None)
        train_loss, num_tokens, skipped = accumulate_gradients(train_model, micro_batches)
        history["skipped_micro_batches"] += skipped
        if train_loss is None:
            print0(f"warning: step {step}: no trained tokens in the whole step (all masked); optimizer step skipped")
            history["skipped_steps"] += 1
        else:
            if not math.isfinite(train_loss):
                raise NonFiniteWeightsError(f"non-finite training loss {train_loss} at step {step}; last checkpoint: "
                                            f"{checkpoint_dir} step {last_saved} (continue with --resume; a lower "
                                            f"--init_lr_frac may be needed)")
            optimizer.step(grad_clip=args.grad_clip if args.grad_clip > 0 else None)
            # the loss was computed before the update: the updated weights get their own check
            stop_if_nonfinite({"model": model}, step + 1, checkpoint_dir, device, probe=micro_batches[0][0][0, :64].tolist())
        model.zero_grad(set_to_none=True)
        step += 1
        if not num_iterations:
            loop_state["progress"] = epoch_progress(consumed_state, rank, world_size, num_examples, device)
        dt = time.time() - t0

        if train_loss is not None:
            history["losses"][step] = train_loss
            report.log_curve(f"{stage}/train_loss", step, train_loss)
        shown = step / num_iterations if num_iterations else loop_state["progress"]
        of_total = f"/{num_iterations:05d}" if num_iterations else ""
        loss_str = f"{train_loss:.4f}" if train_loss is not None else "skipped"
        print0(f"step {step:05d}{of_total} ({100 * shown:.1f}%) | loss {loss_str} | lrm {lrm:.3f} | tokens {num_tokens:,} | "
               f"epoch {consumed_state.get('epoch', 0)} | tok/s {int(num_tokens / dt):,} | dt {dt * 1000:.0f}ms"
               + (f" | {skipped} all-masked micro-batches skipped" if skipped else ""))
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/progress": shown,
                       "train/num_tokens": num_tokens, "train/dt": dt})

    history["num_iterations"] = step
    history[min_name] = loop_state[min_name]
    print0(f"done: {step} steps in {(time.time() - t_start) / 60:.2f}m | min {label} {loop_state[min_name]:.4f}")
    return history
