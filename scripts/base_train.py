"""
Pretrain a base model on the parquet text shards.

    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 --total_batch_size=8192 \
        --num_iterations=500 --eval_every=100 --core_metric_every=-1        # small, on a CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --run=d20   # 8 GPUs

The model is set by --depth alone (width = depth * aspect_ratio, see gpt.config_from_depth). The run
length is --num_iterations, or else --target_flops, or else --target_param_data_ratio tokens per
parameter (20, the Chinchilla ratio). Each optimizer step sees --total_batch_size tokens, gathered by
gradient accumulation over --device_batch_size rows per rank.

Checkpoints (base_checkpoints/<model_tag or dN>) carry the weights, each rank's optimizer state, the
data loader's exact position and the loop state, so `--resume` continues the run bit for bit: the
same batches, learning rates and optimizer state as if it had never stopped. A non-finite loss stops
the run (exit code 1) without saving the bad state; the last good checkpoint stays the latest.
"""

import argparse
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.common import (UserInputError, autocast_context, compute_init, get_base_dir, get_peak_flops, init_wandb,
                             print0, run_stage, synchronize)

MUON_MOMENTUM_WARMUP_STEPS = 300   # Muon momentum ramps 0.85 -> 0.95 over these steps
SMOOTHING_BETA = 0.9               # EMA of the printed training loss


# flags that change what a resumed run computes (the others only change logging, evals and saving)
TRAJECTORY_FLAGS = ("data_dir", "depth", "aspect_ratio", "head_dim", "max_seq_len", "total_batch_size", "embedding_lr",
                    "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip", "warmup_ratio", "warmdown_ratio",
                    "final_lr_frac", "fp8")


class NonFiniteLossError(UserInputError):
    """The training loss (or gradient norm) became NaN or infinite. Reported as one line, like bad input:
    what fixes it is a flag (a lower learning rate, a smaller batch) and the message says which."""


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain a base GPT on the parquet shards.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # logging and runtime
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps ('' = autodetect)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the model (auto = on for CUDA, and on CPU for runs of 100+ steps, where "
                             "a 1.6x faster step surely repays the ~20-30 s compile: dev/bench_train.md)")
    parser.add_argument("--data_dir", default=None, help="shard directory (default: $NANOCHAT_DATA_DIR or <base dir>/base_data)")
    # model
    parser.add_argument("--depth", type=int, default=20, help="number of transformer blocks; sets the width too")
    parser.add_argument("--aspect_ratio", type=int, default=64, help="width = depth * aspect_ratio (rounded up to whole heads)")
    parser.add_argument("--head_dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--max_seq_len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--fp8", action="store_true",
                        help="tensorwise FP8 matmuls (nanochat/fp8.py) for the transformer blocks' linears in training "
                             "(the lm_head and the embedding stay as they are); meant for H100-class GPUs, works but is "
                             "slow on CPU; evaluation and sampling stay in the normal precision")
    # horizon (the first one that is set wins)
    parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1 = derive from the next two)")
    parser.add_argument("--target_flops", type=float, default=-1.0, help="training FLOPs budget (-1 = unused)")
    parser.add_argument("--target_param_data_ratio", type=float, default=20.0,
                        help="training tokens per parameter (all parameters, embeddings included)")
    # batch
    parser.add_argument("--device_batch_size", type=int, default=32, help="rows per forward pass on each rank")
    parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (all ranks)")
    # optimization
    parser.add_argument("--embedding_lr", type=float, default=0.2, help="AdamW lr of the token embedding")
    parser.add_argument("--unembedding_lr", type=float, default=0.004, help="AdamW lr of the LM head")
    parser.add_argument("--matrix_lr", type=float, default=0.02, help="Muon lr of the block matrices")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Muon weight decay")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    parser.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps of linear LR warmup")
    parser.add_argument("--warmdown_ratio", type=float, default=0.2, help="fraction of steps of linear LR warmdown at the end")
    parser.add_argument("--final_lr_frac", type=float, default=0.0, help="LR multiplier at the end of the warmdown")
    # evaluation
    parser.add_argument("--eval_every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)")
    parser.add_argument("--eval_tokens", type=int, default=20 * 524288, help="tokens of the val split per bpb evaluation")
    parser.add_argument("--core_metric_every", type=int, default=2000, help="CORE every N steps and at the end (-1 = never)")
    parser.add_argument("--core_metric_max_per_task", type=int, default=500, help="CORE examples per task (-1 = all)")
    parser.add_argument("--bundle_dir", default=None, help="local unzipped eval_bundle for CORE (default: download)")
    parser.add_argument("--sample_every", type=int, default=2000, help="print samples every N steps and at the end (-1 = never)")
    # checkpoints
    parser.add_argument("--model_tag", default=None, help="checkpoint subdirectory (default dN)")
    parser.add_argument("--save_every", type=int, default=-1, help="also checkpoint every N steps (-1 = only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last committed checkpoint of this model tag")
    parser.add_argument("--resume_from_step", type=int, default=-1, help="continue from this checkpoint step")
    args = parser.parse_args(argv)

    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserInputError("--num_iterations must be >= 1, or -1 to derive it")
    if args.num_iterations == -1 and args.target_flops <= 0 and args.target_param_data_ratio <= 0:
        raise UserInputError("set one of --num_iterations, --target_flops or --target_param_data_ratio")
    if args.grad_clip < 0:
        raise UserInputError("--grad_clip must be >= 0 (0 = off)")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserInputError(f"--{name} must be in [0, 1]")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        raise UserInputError("--warmup_ratio + --warmdown_ratio must not exceed 1")
    return args


# -----------------------------------------------------------------------------
# Schedules (pure functions of the step, so a resumed run recomputes them exactly)

def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup to 1, constant, then linear warmdown to final_lr_frac at the last step."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 at the start of the warmdown, 0 at the end
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def resolve_num_iterations(args, num_params, flops_per_token):
    if args.num_iterations > 0:
        return args.num_iterations, "--num_iterations"
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size))), "--target_flops"
    tokens = args.target_param_data_ratio * num_params
    return max(1, int(tokens // args.total_batch_size)), f"--target_param_data_ratio={args.target_param_data_ratio:g}"


def format_seconds(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------

def main(argv=None):
    """The whole run. Returns a history dict (per-step losses, val bpb, ...) for callers and tests."""
    args = get_args(argv)
    from nanochat.checkpoint_manager import (CHECKPOINT_DIRS, find_resume_step, load_checkpoint, save_checkpoint,
                                             stop_if_nonfinite)
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.samples import print_samples
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    device_type = device.type
    user_config = dict(vars(args))
    if not args.fp8:  # recorded only when on, so the run config (and --resume of older checkpoints) is unchanged
        user_config.pop("fp8")
    wandb_run = init_wandb("nanochat", args.run, user_config, master_process=master)
    report = get_report()  # curves for the report card's plots (a no-op stand-in on ranks > 0)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()

    # ---- model
    config = config_from_depth(args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len,
                               aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)
    if device_type == "cuda":
        with torch.device("meta"):
            orig_model = GPT(config)  # no memory and no throwaway init: materialised on the GPU below
        orig_model.to_empty(device=device)
    else:
        orig_model = GPT(config).to(device)  # (meta-device init imports torch._dynamo: seconds on a CPU)
    orig_model.init_weights()
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()
    num_iterations, horizon_source = resolve_num_iterations(args, num_params, flops_per_token)
    if args.fp8:  # before torch.compile; the same Parameters stay, so the optimizer and checkpoints are unchanged
        from nanochat.fp8 import check_fp8_device, convert_to_fp8
        check_fp8_device(device)
        print0(f"fp8: {convert_to_fp8(orig_model)} linears converted to FP8 training matmuls (lm_head and embedding excluded)")
    use_compile = args.compile == "on" or (args.compile == "auto" and (device_type == "cuda" or num_iterations >= 100))
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    print0(f"model: {dataclasses.asdict(config)}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e} | compile: {use_compile}"
           + (" (step 1's dt includes the compilation)" if use_compile else ""))

    # ---- horizon and batch
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if args.total_batch_size % world_tokens_per_fwdbwd:
        raise UserInputError(f"--total_batch_size={args.total_batch_size} must be a multiple of device_batch_size x "
                             f"max_seq_len x world_size = {args.device_batch_size} x {args.max_seq_len} x {world_size} "
                             f"= {world_tokens_per_fwdbwd}")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    total_tokens = args.total_batch_size * num_iterations
    print0(f"{num_iterations:,} steps (from {horizon_source}) x {args.total_batch_size:,} tokens = {total_tokens:,} tokens "
           f"({total_tokens / num_params:.1f} per parameter) | grad accumulation {grad_accum_steps} "
           f"({args.device_batch_size} x {args.max_seq_len} x {world_size} ranks per micro-step)")
    print0(f"total training FLOPs: {flops_per_token * total_tokens:e}")

    optimizer = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                            matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    initial_lrs = [group["initial_lr"] for group in optimizer.param_groups]

    # ---- checkpoints and resume
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS["base"], model_tag)
    resume_step = None
    if args.resume_from_step >= 0:
        resume_step = args.resume_from_step
    elif args.resume:  # the latest checkpoint this run config wrote (--resume_from_step names one explicitly)
        resume_step = find_resume_step(checkpoint_dir, user_config)
    loader_state = None
    loop_state = dict(smooth_train_loss=0.0, total_training_time=0.0, min_val_bpb=float("inf"), val_bpb=None)
    start_step = 0
    if resume_step is not None:
        model_data, optim_data, meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
        if meta["model_config"] != dataclasses.asdict(config):
            raise ValueError(f"checkpoint {checkpoint_dir} step {resume_step} has model config {meta['model_config']}, "
                             f"but these flags give {dataclasses.asdict(config)}")
        if meta.get("world_size", 1) != world_size:
            raise ValueError(f"checkpoint was written by {meta.get('world_size')} ranks, this run has {world_size}: "
                             f"optimizer shards and data positions are per rank, so resume with the same world size")
        changed = {k: (meta["user_config"].get(k), user_config.get(k)) for k in TRAJECTORY_FLAGS
                   if meta["user_config"].get(k) != user_config.get(k)}
        if changed or meta.get("num_iterations") != num_iterations:
            print0(f"warning: the checkpoint was trained with other settings (old, new): {changed}, num_iterations "
                   f"{meta.get('num_iterations')} -> {num_iterations}; the run will not match an uninterrupted one")
        orig_model.load_state_dict(model_data, strict=True)
        optimizer.load_state_dict(optim_data)
        for group, lr in zip(optimizer.param_groups, initial_lrs):
            group["initial_lr"] = lr  # flags, not the checkpoint, set the base learning rates
        del model_data, optim_data
        loader_state = meta["dataloader_state"][rank]
        loop_state.update(meta["loop_state"])
        start_step = resume_step
        print0(f"resumed from {checkpoint_dir} step {resume_step}")

    # ---- data
    train_loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train",
                                                      device, resume_state=loader_state, data_dir=args.data_dir)
    x, y, next_state = next(train_loader)  # prefetch; next_state resumes *after* this batch
    consumed_state = loader_state          # resumes after the last batch actually trained on
    eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size)
    if eval_steps < 1:
        raise UserInputError(f"--eval_tokens={args.eval_tokens} is less than one batch of {world_tokens_per_fwdbwd} tokens")
    try:  # the last step always evaluates: a val split under one batch must fail now, not after the training
        next(tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val", "cpu",
                                                data_dir=args.data_dir))
    except ValueError as error:
        raise UserInputError(f"{error} (checked before training)") from None
    if args.core_metric_every > 0:
        from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
        bundle_dir = get_eval_bundle_dir(args.bundle_dir)  # fetch it now: fail before training, not hours in

    def run_val_bpb():
        val_loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val",
                                                        device, data_dir=args.data_dir)
        model.eval()
        with autocast_context(device_type):
            bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        model.train()
        return bpb

    def checkpoint(step):
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, consumed_state)
        else:
            states[0] = consumed_state
        meta = dict(model_config=dataclasses.asdict(config), user_config=user_config, model_tag=model_tag,
                    num_iterations=num_iterations, world_size=world_size, dataloader_state=states,
                    loop_state=dict(loop_state))
        save_checkpoint(checkpoint_dir, step, orig_model.state_dict() if master else None, optimizer.state_dict(), meta, rank,
                        check_finite=True)

    # ---- the loop: step counts finished optimizer steps; evals and saves happen before the next one
    history = dict(losses={}, val_bpb={}, core={}, num_iterations=num_iterations, checkpoint_dir=checkpoint_dir)
    peak_flops = get_peak_flops(device) * world_size
    last_saved = resume_step
    session_time, session_steps = 0.0, 0
    step = start_step
    model.train()
    while True:
        last_step = step == num_iterations

        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            t0 = time.time()
            val_bpb = run_val_bpb()
            loop_state["val_bpb"] = val_bpb
            loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
            history["val_bpb"][step] = val_bpb
            print0(f"step {step:05d} | val bpb: {val_bpb:.6f} | min {loop_state['min_val_bpb']:.6f} | {time.time() - t0:.1f}s")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
            report.log_curve("base/val_bpb", step, val_bpb)

        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            with autocast_context(device_type):
                core = evaluate_core(orig_model, tokenizer, device, bundle_dir, max_per_task=args.core_metric_max_per_task)
            history["core"][step] = core["core_metric"]
            print0(f"step {step:05d} | CORE: {core['core_metric']:.4f} ({core['seconds']:.0f}s)")
            wandb_run.log({"step": step, "core_metric": core["core_metric"], **{f"core/{k}": v for k, v in core["centered"].items()}})

        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            print0(f"step {step:05d} | samples:")
            orig_model.eval()
            print_samples(orig_model, tokenizer, device)
            orig_model.train()

        if step != last_saved and (last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0)):
            checkpoint(step)
            last_saved = step

        if last_step:
            break

        # ---- one optimizer step
        synchronize(device)
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for _ in range(grad_accum_steps):
            with autocast_context(device_type):
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
            consumed_state = next_state
            x, y, next_state = next(train_loader)  # load the next batch while the device works
        lrm = get_lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        momentum = get_muon_momentum(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        grad_norm = optimizer.step(grad_clip=args.grad_clip if args.grad_clip > 0 else None)
        model.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)  # also makes every rank take the same NaN decision
        train_loss = loss_sum.item() / (grad_accum_steps * world_size)
        grad_norm = grad_norm.item() if grad_norm is not None else None
        synchronize(device)
        dt = time.time() - t0

        if not math.isfinite(train_loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            where = (f"{checkpoint_dir} step {last_saved} (continue with --resume)" if last_saved is not None
                     else "none (no checkpoint was saved yet)")
            raise NonFiniteLossError(f"non-finite training loss {train_loss} (grad norm {grad_norm}) at step {step + 1}: stopping "
                                     f"without saving. Last good checkpoint: {where}. Try a lower learning rate "
                                     f"or a smaller --total_batch_size/--max_seq_len.")

        # the loss above was computed before the update: the updated weights get their own check
        stop_if_nonfinite({"model": orig_model}, step + 1, checkpoint_dir, device, probe=x[0, :64].tolist())
        step += 1
        history["losses"][step] = train_loss
        if session_steps > 0:  # the first step of a session compiles and warms up: keep it off the clock
            loop_state["total_training_time"] += dt
            session_time += dt
        session_steps += 1
        beta = SMOOTHING_BETA
        loop_state["smooth_train_loss"] = beta * loop_state["smooth_train_loss"] + (1 - beta) * train_loss
        smooth = loop_state["smooth_train_loss"] / (1 - beta ** step)  # debiased: the EMA starts at 0
        tok_per_sec = int(args.total_batch_size / dt)
        mfu = 100 * flops_per_token * args.total_batch_size / dt / peak_flops
        avg_dt = session_time / (session_steps - 1) if session_steps > 1 else dt
        eta = avg_dt * (num_iterations - step)
        norm_str = f" | grad norm {grad_norm:.3f}" if grad_norm is not None else ""
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {smooth:.6f} | "
               f"lrm {lrm:.3f}{norm_str} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,} | mfu {mfu:.2f}% | "
               f"total {loop_state['total_training_time'] / 60:.2f}m | eta {format_seconds(eta)}")
        wandb_run.log({"step": step, "train/loss": smooth, "train/raw_loss": train_loss, "train/lrm": lrm,
                       "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                       "total_training_flops": flops_per_token * args.total_batch_size * step,
                       "total_training_time": loop_state["total_training_time"],
                       **({"train/grad_norm": grad_norm} if grad_norm is not None else {})})
        report.log_curve("base/train_loss", step, smooth)

    print0(f"done: {num_iterations} steps | min val bpb {loop_state['min_val_bpb']:.6f} | "
           f"training time {loop_state['total_training_time'] / 60:.2f}m | checkpoint {checkpoint_dir}")
    if master:
        report.log(section="Base model training", data=[user_config, {
            "Number of parameters": num_params, "FLOPs per token": f"{flops_per_token:e}",
            "Iterations": num_iterations, "Training tokens": total_tokens,
            "Tokens : params ratio": total_tokens / num_params, "Grad accumulation steps": grad_accum_steps,
            "Training FLOPs": f"{flops_per_token * total_tokens:e}",
            "Minimum val bpb": loop_state["min_val_bpb"], "Final val bpb": loop_state["val_bpb"],
            **({"CORE": history["core"][max(history["core"])]} if history["core"] else {}),
            "Training time (min)": loop_state["total_training_time"] / 60}])
    wandb_run.finish()
    history["min_val_bpb"] = loop_state["min_val_bpb"]
    return history


if __name__ == "__main__":
    run_stage(main)
