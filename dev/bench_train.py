"""
Training throughput: tokens/s and MFU of one full training step (forward, backward, optimizer step,
zero_grad) of the GPT, the same step scripts/base_train.py takes, on random tokens.

    python -m dev.bench_train                     # CPU rows (d4 = the anchor, d8); GPU rows too when CUDA is there
    python -m dev.bench_train --configs anchor --compile both --steps 10   # eager and compiled steps alternate
    python -m dev.bench_train --configs d12,d20 --steps 20      # on a GPU: bf16 autocast + torch.compile
    python -m dev.bench_train --configs d20 --fp8 both          # FP8 block linears (nanochat/fp8.py) vs not, alternating

The "anchor" row is the configuration measured for karpathy/nanochat on this project's CPU machine
kind (depth 4, n_embd 256, head_dim 64, vocab 32,768, seq 512, batch 4, torch.compile): ~1,077 tok/s
median when the machine is quiet (see /work/shared/research/anchors_cpu.md). MFU on a CPU is against
the nominal 1 TFLOP/s of nanochat.common.get_peak_flops, so only its ratios mean anything there.
Results and the commands that made them are kept in dev/bench_train.md.

With `--fp8 both` the FP8 variant is a second module tree over the *same* Parameters and optimizer as the
plain one (its block linears swapped by nanochat.fp8.convert_to_fp8), so measuring both costs activation
memory for one step at a time but weights and optimizer state only once; the table gets the FP8 / plain
tokens/s ratio. MFU stays against the bf16 peak (as in base_train), so FP8 shows up as a higher MFU.
"""

import argparse
import statistics
import time

import torch

from nanochat.common import autocast_context, get_peak_flops, synchronize
from nanochat.gpt import GPT, config_from_depth

# name: (depth, aspect_ratio, head_dim, vocab, seq_len, batch, device kind)
CONFIGS = {
    "anchor": (4, 64, 64, 32768, 512, 4, "cpu"),   # depth 4: nanochat's CPU anchor configuration
    "d8": (8, 64, 64, 32768, 512, 4, "cpu"),
    "runcpu": (4, 64, 64, 4096, 256, 16, "cpu"),   # dev/runcpu.sh's base_train stage (vocab 4096, seq 256, batch 16)
    "d12": (12, 64, 128, 32768, 2048, 32, "cuda"),
    "d20": (20, 64, 128, 32768, 2048, 32, "cuda"),
}


def twin_sharing_parameters(model):
    """A second GPT module tree whose parameters and buffers are `model`'s own tensors (no copies)."""
    with torch.device("meta"):
        twin = GPT(model.config)
    for module, twin_module in zip(model.modules(), twin.modules()):
        for pname, p in module.named_parameters(recurse=False):
            setattr(twin_module, pname, p)
        for bname, b in module.named_buffers(recurse=False):
            setattr(twin_module, bname, b)
    return twin


def build_step(name, compile_model, device, batch, fp8=False, shared=None):
    """(one_step function, description, state) for one config: a fresh model, its optimizer and a fixed
    batch, or with `shared` (the state of an earlier build) that model, optimizer and batch again.
    fp8 runs the step through a twin of the model with FP8 block linears (nanochat/fp8.py)."""
    depth, aspect, head_dim, vocab, seq_len, _, _ = CONFIGS[name]
    if shared is None:
        torch.manual_seed(0)
        config = config_from_depth(depth, vocab_size=vocab, sequence_len=seq_len, aspect_ratio=aspect, head_dim=head_dim)
        model = GPT(config).to(device)
        model.init_weights()
        optimizer = model.setup_optimizers()
        x = torch.randint(0, vocab, (batch, seq_len), device=device)
        y = torch.randint(0, vocab, (batch, seq_len), device=device)
    else:
        model, optimizer, x, y = shared
        config = model.config
    run_model = model
    if fp8:
        from nanochat.fp8 import check_fp8_device, convert_to_fp8
        check_fp8_device(device)
        run_model = twin_sharing_parameters(model)
        convert_to_fp8(run_model)
    step_model = torch.compile(run_model, dynamic=False) if compile_model else run_model

    def one_step():
        with autocast_context(device.type):
            loss = step_model(x, y)
        loss.backward()
        optimizer.step(grad_clip=1.0)
        model.zero_grad(set_to_none=True)
        return loss

    info = dict(name=name, depth=depth, n_embd=config.n_embd, head_dim=head_dim, vocab=vocab, seq=seq_len, batch=batch,
                params=model.num_params(), compile=compile_model, fp8=fp8, flops_per_token=model.estimate_flops())
    return one_step, info, (model, optimizer, x, y)


def bench_config(name, compile_modes, steps, warmup, device, batch=None, fp8_modes=(False,)):
    """One row per (compile mode, fp8 mode). With several, their timed steps alternate (A, B, A, B, ...), so
    a machine shared with other work slows them alike and the ratio between them stays readable. The fp8
    variants share the model, optimizer and batch of the plain variant of the same compile mode."""
    batch = batch or CONFIGS[name][5]
    runs = []
    for compile_model in compile_modes:
        shared = None
        for fp8 in fp8_modes:
            one_step, info, state = build_step(name, compile_model, device, batch, fp8=fp8, shared=shared)
            shared = shared or state
            runs.append((one_step, info, []))
    for one_step, info, _ in runs:
        t0 = time.perf_counter()
        first = None
        for _ in range(warmup):
            one_step().item()
            if first is None:
                first = time.perf_counter() - t0  # the first step: compilation included
        synchronize(device)
        info.update(warmup_s=time.perf_counter() - t0, first_step_s=first if first is not None else float("nan"))
    for _ in range(steps):
        for one_step, _, times in runs:
            synchronize(device)
            t = time.perf_counter()
            one_step().item()
            synchronize(device)
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        print(f"  peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for _, info, times in runs:
        dt = statistics.median(times)
        tokens = batch * info["seq"]
        flops_per_token = info.pop("flops_per_token")
        rows.append(dict(info, step_s=dt, tok_s=tokens / dt, tok_s_min=tokens / max(times), tok_s_max=tokens / min(times),
                         gflops=flops_per_token * tokens / dt / 1e9,
                         mfu=100 * flops_per_token * tokens / dt / get_peak_flops(device)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="tokens/s and MFU of one full GPT training step")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {','.join(CONFIGS)} (default: the CPU ones, plus the CUDA ones on a GPU)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off", "both"],
                        help="torch.compile (auto: on for CUDA, both on and off for the CPU anchor, off for other CPU rows)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--fp8", default="off", choices=["off", "on", "both"],
                        help="FP8 matmuls for the block linears (nanochat/fp8.py); both = plain and FP8 steps alternate "
                             "on shared weights, and the FP8 / plain tokens/s ratio is printed")
    parser.add_argument("--batch", type=int, default=0,
                        help="rows per step (0 = the config's; halved on running out of CUDA memory either way)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    names = args.configs.split(",") if args.configs else [n for n, c in CONFIGS.items() if c[-1] == "cpu" or has_cuda]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    rows = []
    for name in names:
        kind = CONFIGS[name][-1]
        if kind == "cuda" and not has_cuda:
            print(f"skipping {name}: needs a CUDA GPU")
            continue
        device = torch.device(kind)
        if args.compile == "both" or (args.compile == "auto" and name == "anchor"):
            modes = [False, True]
        elif args.compile == "auto":
            modes = [kind == "cuda"]
        else:
            modes = [args.compile == "on"]
        fp8_modes = {"off": [False], "on": [True], "both": [False, True]}[args.fp8]
        batch = args.batch if args.batch > 0 else CONFIGS[name][5]
        while True:
            print(f"running {name} (compile={' and '.join(map(str, modes))}, fp8={' and '.join(map(str, fp8_modes))}, "
                  f"batch {batch}) ...", flush=True)
            try:
                rows.extend(bench_config(name, modes, args.steps, args.warmup, device, batch, fp8_modes))
                break
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2  # the row reports the batch that fit
                torch._dynamo.reset()
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if has_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntorch {torch.__version__} | {device_name} | dtype on CUDA: bf16 autocast | median of {args.steps} steps")
    header = f"| {'config':<7} | {'depth':>5} | {'n_embd':>6} | {'params':>11} | {'seq x batch':>11} | {'compile':>7} | {'fp8':>5} | " \
             f"{'step (s)':>8} | {'tok/s (min-max)':>22} | {'GFLOP/s':>8} | {'MFU %':>6} | {'warm-up (s)':>11} | {'1st step (s)':>12} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        spread = f"{r['tok_s']:,.0f} ({r['tok_s_min']:,.0f}-{r['tok_s_max']:,.0f})"
        print(f"| {r['name']:<7} | {r['depth']:>5} | {r['n_embd']:>6} | {r['params']:>11,} | {r['seq']:>5} x {r['batch']:<3} | "
              f"{str(r['compile']):>7} | {str(r['fp8']):>5} | {r['step_s']:>8.3f} | {spread:>22} | {r['gflops']:>8.1f} | {r['mfu']:>6.2f} | "
              f"{r['warmup_s']:>11.1f} | {r['first_step_s']:>12.1f} |")
    plain = {(r["name"], r["compile"], r["batch"]): r for r in rows if not r["fp8"]}
    for r in rows:
        base = plain.get((r["name"], r["compile"], r["batch"])) if r["fp8"] else None
        if base is not None:
            print(f"fp8 / plain tokens/s, {r['name']} compile={r['compile']}: {r['tok_s'] / base['tok_s']:.3f}x "
                  f"({r['tok_s']:,.0f} vs {base['tok_s']:,.0f}; MFU {r['mfu']:.2f} % vs {base['mfu']:.2f} %)")
    return rows


if __name__ == "__main__":
    main()
