"""
Attention alone at a decode step's shape: one query per row against a fixed-length key/value cache of which
only the first `filled` columns hold tokens (the StaticKVCache's situation, nanochat/decode_static.py), timed for
every layer of a model in turn so the caches do not sit in L2 between calls. Which kernel reads a batch-256
cache fastest, and what attending to the filled columns only would save, before building either.

    python -m dev.bench_decode_attention --device cuda                  # d20 generator and d12 verifier shapes
    python -m dev.bench_decode_attention --shapes 8x4x64x96x40x2         # CPU smoke run

Variants (all give the same output up to rounding; each is checked against the first):
  sdpa_mask     SDPA with a bool mask (batch, 1, 1, capacity), every column, SDPA's own choice of kernel
  efficient     the same restricted to the memory-efficient kernel (what the Engine's steps ran before cuDNN)
  sdpa_window   the same over the filled columns only (what a graph per window of columns would run)
  sdpa_bias     SDPA with an additive bf16 bias made once per step and shared by the layers
  matmul        scores by a batched matmul, masked softmax in fp32, then a batched matmul with the values
  cudnn         SDPA restricted to cuDNN's kernel (the fixed shape means one plan), where it runs
  cudnn_mask    the same with the bool mask (what a captured step runs now)
  matmul_compiled  matmul under torch.compile (the compiled graph's step fuses the mask and softmax)
  flex          FlexAttention (compiled; its decode kernel splits the columns), the mask as a score modifier

Printed: ms per step (all layers), GB/s over the bytes of the whole cache (or the window), ratio to sdpa_mask,
and the largest difference from sdpa_mask's output. The last line is a JSON summary.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# batch x heads x head_dim x capacity x filled x layers: the d20 generator's batch-256 rollout (64-token prompts
# + 256 new tokens, mid-way), and the d12 verifier's (prompts of up to 384 tokens + 128 new, mid-way)
DEFAULT_SHAPES = "256x20x64x320x192x20,256x12x64x512x448x12"


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        try:
            b, h, d, cap, filled, layers = (int(x) for x in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: want BxHxDxCAPACITYxFILLEDxLAYERS, e.g. 256x20x64x320x192x20")
        if not (0 < filled <= cap) or min(b, h, d, layers) < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: need 0 < filled <= capacity and positive sizes")
        shapes.append((b, h, d, cap, filled, layers))
    return shapes


def make_mask(batch, capacity, filled, device, seed=0):
    """Left-padded rows: row b attends to columns pad[b]..filled-1 (pad under a quarter of the filled)."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, max(1, filled // 4), (batch,), generator=g).to(device)
    columns = torch.arange(capacity, device=device)
    return (columns[None, :] < filled) & (columns[None, :] >= pad[:, None])  # (B, capacity)


def variants(device):
    def sdpa_mask(q, k, v, mask, bias, filled):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])

    def sdpa_window(q, k, v, mask, bias, filled):
        return F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], attn_mask=mask[:, None, None, :filled])

    def sdpa_bias(q, k, v, mask, bias, filled):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def matmul(q, k, v, mask, bias, filled):
        scores = (q @ k.transpose(-1, -2)).float() * q.size(-1) ** -0.5        # (B, H, 1, capacity)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v

    flex_compiled = []

    def flex(q, k, v, mask, bias, filled):
        # FlexAttention's decode kernel splits the columns over blocks; the mask enters as a score modifier
        if not flex_compiled:
            from torch.nn.attention.flex_attention import flex_attention
            flex_compiled.append(torch.compile(flex_attention, dynamic=False))
        def keep(score, b, h, q_idx, kv_idx):
            return torch.where(mask[b, kv_idx], score, float("-inf"))
        return flex_compiled[0](q, k, v, score_mod=keep)

    def cudnn(q, k, v, mask, bias, filled):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def cudnn_mask(q, k, v, mask, bias, filled):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])

    def efficient(q, k, v, mask, bias, filled):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])

    found = dict(sdpa_mask=sdpa_mask, sdpa_window=sdpa_window, sdpa_bias=sdpa_bias, matmul=matmul)
    if device.type == "cuda":
        found["cudnn"] = cudnn
        found["cudnn_mask"] = cudnn_mask
        found["efficient"] = efficient
        found["matmul_compiled"] = torch.compile(matmul, dynamic=False)
        found["flex"] = flex
    return found


def time_variant(fn, qs, ks, vs, mask, bias, filled, device, iters):
    """Median seconds of one step (every layer once) over `iters` steps, after two warm-up steps."""
    def step():
        return [fn(q, k, v, mask, bias, filled) for q, k, v in zip(qs, ks, vs)]
    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), step()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help=f"comma list of BxHxDxCAPACITYxFILLEDxLAYERS (default on CUDA: {DEFAULT_SHAPES})")
    parser.add_argument("--variants", default=None, help="comma list of the variants to run (default: all)")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per variant (median reported)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or parse_shapes(DEFAULT_SHAPES if device.type == "cuda" else "8x4x64x96x40x2")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, {dtype}, torch {torch.__version__}\n")
    print("| shape (BxHxDxcapxfilledxlayers) | variant | ms / step | GB/s | vs sdpa_mask | max diff |")
    print("|---|---|---:|---:|---:|---:|")
    results = []
    for b, h, d, cap, filled, layers in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        qs = [torch.randn(b, h, 1, d, device=device, generator=g).to(dtype) for _ in range(layers)]
        ks = [torch.randn(b, h, cap, d, device=device, generator=g).to(dtype) for _ in range(layers)]
        vs = [torch.randn(b, h, cap, d, device=device, generator=g).to(dtype) for _ in range(layers)]
        mask = make_mask(b, cap, filled, device)
        bias = torch.zeros(b, 1, 1, cap, device=device, dtype=dtype).masked_fill(~mask[:, None, None, :], float("-inf"))
        reference, base = None, None
        chosen = variants(device)
        if args.variants:
            unknown = set(args.variants.split(",")) - set(chosen)
            if unknown:
                parser.error(f"unknown variants {sorted(unknown)} on {device.type}; choose from {sorted(chosen)}")
            chosen = {name: fn for name, fn in chosen.items() if name in args.variants.split(",")}
        for name, fn in chosen.items():
            try:
                seconds, out = time_variant(fn, qs, ks, vs, mask, bias, filled, device, args.iters)
            except RuntimeError as e:  # e.g. a backend that does not take this shape on this card
                print(f"| {b}x{h}x{d}x{cap}x{filled}x{layers} | {name} | failed: {str(e).splitlines()[0][:80]} | | | |")
                continue
            columns = filled if name == "sdpa_window" else cap
            gbs = layers * 2 * b * h * columns * d * ks[0].element_size() / seconds / 1e9
            if reference is None:
                reference, base = out, seconds
            diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, reference))
            print(f"| {b}x{h}x{d}x{cap}x{filled}x{layers} | {name} | {1000 * seconds:.3f} | {gbs:.0f} | "
                  f"{base / seconds:.2f}x | {diff:.1e} |")
            results.append(dict(shape=[b, h, d, cap, filled, layers], variant=name, ms=1000 * seconds, gb_per_s=gbs,
                                speedup=base / seconds, max_diff=diff))
    print(json.dumps(dict(device=str(device), results=results)))


if __name__ == "__main__":
    main()
