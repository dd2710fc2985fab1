"""
Evaluate a pretrained base model: the CORE metric, bits per byte on the train and val splits, and
a few samples. Prints a table, writes a CSV under <base dir>/base_eval/ and adds a section to the
report.

    python -m scripts.base_eval                                  # largest base model, last step
    python -m scripts.base_eval --model_tag d4 --max_per_task 100 --eval core,bpb
    python -m scripts.base_eval --bundle_dir /path/to/eval_bundle   # a local (unzipped) bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
"""

import argparse
import csv
import os
import time

from nanochat.common import UserInputError, autocast_context, compute_init, get_base_dir, print0, run_stage
from nanochat.samples import complete, print_samples

EVAL_CHOICES = ("core", "bpb", "sample")


def write_core_csv(path, core_out):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Task", "Accuracy", "Centered"])
        for label, acc in core_out["accuracy"].items():
            writer.writerow([label, f"{acc:.6f}", f"{core_out['centered'][label]:.6f}"])
        writer.writerow(["CORE", "", f"{core_out['core_metric']:.6f}"])
    os.replace(tmp, path)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a base model: CORE, train/val bits per byte, samples.")
    parser.add_argument("--model_tag", default=None, help="base_checkpoints/<tag> to load (default: the largest dN)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    parser.add_argument("--eval", default="core,bpb,sample", help=f"comma-separated subset of {','.join(EVAL_CHOICES)}")
    parser.add_argument("--max_per_task", type=int, default=-1, help="CORE examples per task, -1 = all (default)")
    parser.add_argument("--bundle_dir", default=None,
                        help="an unzipped eval_bundle directory (default: <base dir>/eval_bundle, downloaded if missing)")
    parser.add_argument("--device_batch_size", type=int, default=32, help="rows per forward pass for bpb (default 32)")
    parser.add_argument("--split_tokens", type=int, default=20 * 524288, help="tokens per split for bpb (default 20*524288)")
    parser.add_argument("--data_dir", default=None, help="pretraining shard directory (default: the dataset default)")
    parser.add_argument("--device_type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVAL_CHOICES]
    if bad or not evals:
        raise UserInputError(f"--eval takes a comma-separated subset of {EVAL_CHOICES}, got {args.eval!r}")
    args.eval = evals
    if args.device_batch_size < 1 or args.split_tokens < 1:
        raise UserInputError("--device_batch_size and --split_tokens must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.report import get_report
    from nanochat.tokenizer import get_token_bytes

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    step = meta["step"]
    model_tag = args.model_tag or meta.get("model_tag") or f"d{model.config.n_layer}"
    print0(f"evaluating base model {model_tag} step {step} ({model.num_params():,} params) on {device}")
    report = {"model": model_tag, "step": step}

    if "bpb" in args.eval:
        T = model.config.sequence_len
        B = args.device_batch_size
        steps = args.split_tokens // (B * T * world_size)
        if steps < 1:
            raise UserInputError(f"--split_tokens={args.split_tokens} is less than one batch ({B}x{T}x{world_size} tokens)")
        token_bytes = get_token_bytes(device)
        for split in ("train", "val"):
            t0 = time.time()
            loader = tokenizing_distributed_data_loader(tokenizer, B, T, split, device, data_dir=args.data_dir)
            with autocast_context(device.type):
                bpb = evaluate_bpb(model, loader, steps, token_bytes)
            report[f"{split} bpb"] = bpb
            print0(f"{split} bpb: {bpb:.6f} ({time.time() - t0:.1f}s)")

    if "core" in args.eval:
        bundle_dir = get_eval_bundle_dir(args.bundle_dir)
        with autocast_context(device.type):
            core = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=args.max_per_task)
        print0(f"\n{'Task':<40}{'Accuracy':>10}{'Centered':>10}")
        for label, acc in core["accuracy"].items():
            print0(f"{label:<40}{acc:>10.4f}{core['centered'][label]:>10.4f}")
        print0(f"{'CORE':<40}{'':>10}{core['core_metric']:>10.4f}   ({core['seconds']:.0f}s)")
        if rank == 0:
            csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_tag}_{step:06d}.csv")
            write_core_csv(csv_path, core)
            print0(f"wrote {csv_path}")
        report["CORE"] = core["core_metric"]
        report.update({f"CORE {k}": v for k, v in core["centered"].items()})

    if "sample" in args.eval and rank == 0:
        print0("greedy completions:")
        print_samples(model, tokenizer, device)
        print0("unconditioned samples (temperature 1.0):")
        with autocast_context(device.type):
            for i in range(4):
                print0(f"  {complete(model, tokenizer, '', max_tokens=64, temperature=1.0, seed=i)!r}")

    get_report().log(section="Base model evaluation", data=[report])
    return report


if __name__ == "__main__":
    run_stage(main)
