"""
Time one MuonAdamW step on the parameter shapes of a nanochat-style GPT of a given depth, next to
torch.optim.AdamW + torch.optim.Muon doing the same work, with random gradients.

    python -m dev.bench_optim --depth 4 --steps 5
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m dev.bench_optim --depth 4   # sharded

Under torchrun only MuonAdamW is timed (the torch baseline has no gradient sync).
"""

import argparse
import time

import torch
import torch.distributed as dist

from nanochat.common import autodetect_device_type, compute_init, compute_cleanup, print0, synchronize
from nanochat.optim import MuonAdamW


def gpt_like_params(depth, vocab, device):
    """wte, lm_head and per block: q, k, v, o (d x d), mlp up (4d x d), mlp down (d x 4d)."""
    dim = 64 * depth
    def param(*shape):
        return (torch.randn(*shape, device=device) * 0.02).requires_grad_()
    wte, lm_head = param(vocab, dim), param(vocab, dim)
    matrices = []
    for _ in range(depth):
        matrices += [param(dim, dim) for _ in range(4)] + [param(4 * dim, dim), param(dim, 4 * dim)]
    return wte, lm_head, matrices


def timed(opt_step, params, steps, device, grad_clip):
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps + 1):   # the first step allocates state: not timed
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=gen)
        synchronize(device)
        t0 = time.perf_counter()
        opt_step(grad_clip)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="model depth; width is 64 * depth")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args()
    ddp, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    wte, lm_head, matrices = gpt_like_params(args.depth, args.vocab, device)
    params = [wte, lm_head, *matrices]
    n_params = sum(p.numel() for p in params)

    opt = MuonAdamW([dict(kind="adamw", params=[lm_head], lr=0.004),
                     dict(kind="adamw", params=[wte], lr=0.2),
                     dict(kind="muon", params=matrices, lr=0.02)])
    ours = timed(lambda clip: opt.step(grad_clip=clip or None), params, args.steps, device, args.grad_clip)
    print0(f"depth {args.depth} | {n_params / 1e6:.1f}M params | world {world_size} | {device}")
    print0(f"MuonAdamW step:                  {ours * 1e3:8.1f} ms")
    if not ddp:
        adamw = torch.optim.AdamW([dict(params=[lm_head], lr=0.004), dict(params=[wte], lr=0.2)],
                                  betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
        muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
        def baseline(clip):
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            adamw.step()
            muon.step()
        theirs = timed(baseline, params, args.steps, device, args.grad_clip)
        print0(f"torch AdamW + Muon (+clip) step: {theirs * 1e3:8.1f} ms")
    if ddp:
        dist.barrier()
    compute_cleanup()


if __name__ == "__main__":
    main()
