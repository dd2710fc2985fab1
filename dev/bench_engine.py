"""
Decode throughput of the Engine (KV cache) against the naive sampler (GPT.generate: full recompute for
every token), on one randomly initialised model, in one process so the two share the machine's state.

    python -m dev.bench_engine                      # the tables in dev/bench_engine.md
    python -m dev.bench_engine --new_tokens 32 --batch_sizes 1 --skip_anchor   # a quick smoke run
    python -m dev.bench_engine --device cuda --depth 20 --skip_anchor [--bf16_weights]   # on a GPU

Table 1: prompt of --prompt_len tokens, --new_tokens new tokens, batch 1/8/32 through the Engine, and
the naive sampler at batch 1. Table 2 (nanochat's CPU anchor configuration): depth 4, n_embd 256,
head_dim 64, vocab 32,768, a 384-token prompt, 128 new tokens, batch 1 and 8.

Weights are random and the stand-in tokenizer's special tokens lie outside the vocabulary, so no row
stops early or calls the tool: every row produces exactly the requested number of tokens.
"""

import argparse
import os
import time

import torch

from nanochat.engine import Engine, inference_context
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import SPECIAL_TOKENS


class NoStopTokenizer:
    """The Engine's view of a tokenizer, with special tokens the model can never sample."""

    def __init__(self, vocab_size):
        self.ids = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_model(depth, vocab_size, sequence_len, seed=0, device="cpu", bf16_weights=False):
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len, head_dim=64))
    model.init_weights()
    model = model.to(device)
    if bf16_weights:  # inference only: halves the bytes every decode step must read
        model = model.to(torch.bfloat16)
    return model.eval()


def time_engine(engine, prompt, batch, new_tokens, temperature, top_k):
    """(seconds to the first token, total seconds) for `batch` samples of new_tokens tokens each."""
    t0 = time.perf_counter()
    first = None
    steps = 0
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=temperature, top_k=top_k):
        steps += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert steps == new_tokens, f"expected {new_tokens} steps, got {steps}"
    return first, total


def time_naive(model, prompt, new_tokens, temperature, top_k):
    t0 = time.perf_counter()
    with inference_context(model.get_device().type):  # the same precision and kernels as the Engine
        n = sum(1 for _ in model.generate(prompt, new_tokens, temperature=temperature, top_k=top_k))
    assert n == new_tokens
    return time.perf_counter() - t0


def matmul_probe(seconds=1.0, n=1024):
    """GFLOP/s of a plain fp32 matmul: how much CPU this process is getting right now (the anchors were
    taken where this read 112-180 GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


def run_table(title, model, prompt_len, new_tokens, batch_sizes, naive_tokens, temperature, top_k):
    vocab = model.config.vocab_size
    engine = Engine(model, NoStopTokenizer(vocab))
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    time_engine(engine, prompt, 1, 8, temperature, top_k)  # warm-up: allocator, kernels, first-call paths
    rows = []
    naive_rate = None
    if naive_tokens:
        seconds = time_naive(model, prompt, naive_tokens, temperature, top_k)
        naive_rate = naive_tokens / seconds
        label = "naive recompute" + ("" if naive_tokens == new_tokens else f" ({naive_tokens} tokens only)")
        rows.append((label, 1, naive_tokens, float("nan"), 1000 * seconds / naive_tokens, naive_rate, naive_rate))
    for batch in batch_sizes:
        first, total = time_engine(engine, prompt, batch, new_tokens, temperature, top_k)
        decode_rate = batch * (new_tokens - 1) / (total - first)
        rows.append(("Engine (KV cache)", batch, new_tokens, 1000 * first, 1000 * (total - first) / (new_tokens - 1),
                     batch * new_tokens / total, decode_rate))

    c = model.config
    if next(model.parameters()).is_cuda:
        # batch-1 decode reads every weight once per step: its floor is weight bytes / memory bandwidth
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        best_step = min(r[4] for r in rows if r[1] == 1 and r[0].startswith("Engine")) / 1000
        print(f"\nweights {weight_bytes / 1e9:.2f} GB ({next(model.parameters()).dtype}); batch-1 step {1000 * best_step:.2f} ms "
              f"= {weight_bytes / best_step / 1e12:.2f} TB/s of weight reads; floor at 3.35 TB/s: {1000 * weight_bytes / 3.35e12:.2f} ms")
    print(f"\n### {title}\n")
    print(f"depth {c.n_layer}, n_embd {c.n_embd}, {c.n_head} heads, vocab {vocab}, {model.num_params() / 1e6:.1f}M params; "
          f"prompt {prompt_len} tokens; temperature {temperature}, top_k {top_k}; {torch.get_num_threads()} threads\n")
    print("| sampler | batch | new tokens | prefill ms | ms / step | tok/s (total) | tok/s (decode) | vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, batch, tokens, prefill_ms, step_ms, total_rate, decode_rate in rows:
        ratio = f"{total_rate / naive_rate:.1f}x" if naive_rate else "-"
        prefill = "-" if prefill_ms != prefill_ms else f"{prefill_ms:.1f}"
        print(f"| {label} | {batch} | {tokens} | {prefill} | {step_ms:.2f} | {total_rate:.1f} | {decode_rate:.1f} | {ratio} |")


def profile_decode(model, steps=16):
    """Where a decode step's time goes: with a small batch, a step is hundreds of small kernels, and the
    host's per-op dispatch (not the GPU) can set the pace."""
    from torch.profiler import ProfilerActivity, profile
    engine = Engine(model, NoStopTokenizer(model.config.vocab_size))
    prompt = list(range(16))
    time_engine(engine, prompt, 1, steps, 1.0, 50)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if next(model.parameters()).is_cuda else [])
    with profile(activities=activities) as prof:
        time_engine(engine, prompt, 1, steps, 1.0, 50)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    print(f"\n### Profile of {steps} batch-1 decode steps: {kernels / steps:.0f} GPU kernels per step\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--prompt_len", type=int, default=16, help="prompt length of table 1")
    parser.add_argument("--new_tokens", type=int, default=256, help="new tokens per row in table 1")
    parser.add_argument("--batch_sizes", default="1,8,32", help="Engine batch sizes of table 1")
    parser.add_argument("--naive_tokens", type=int, default=None, help="tokens for the naive sampler (default: --new_tokens)")
    parser.add_argument("--anchor_naive_tokens", type=int, default=128, help="naive tokens in table 2 (0: skip)")
    parser.add_argument("--skip_anchor", action="store_true", help="only table 1")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast on CUDA)")
    parser.add_argument("--bf16_weights", action="store_true", help="cast the weights to bf16 (inference-only speed-up)")
    parser.add_argument("--profile", action="store_true", help="also profile 16 batch-1 decode steps (op and kernel counts)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    naive_tokens = args.new_tokens if args.naive_tokens is None else args.naive_tokens

    load_before = os.getloadavg()
    probe_before = matmul_probe()
    t0 = time.perf_counter()
    # sequence_len only sizes the rotary table here (10x): it must cover prompt + new tokens
    model = build_model(args.depth, args.vocab_size, sequence_len=1024, device=args.device, bf16_weights=args.bf16_weights)
    run_table(f"Decode: {args.new_tokens} new tokens, KV cache vs naive recompute", model, args.prompt_len,
              args.new_tokens, batch_sizes, naive_tokens, args.temperature, args.top_k)
    if args.profile:
        profile_decode(model)
    if not args.skip_anchor:
        run_table("nanochat CPU anchor configuration: 384-token prompt, 128 new tokens", model, 384, 128, [1, 8],
                  args.anchor_naive_tokens, args.temperature, args.top_k)
    print(f"\nload average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}, "
          f"after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"wall time {time.perf_counter() - t0:.0f} s; torch {torch.__version__}")
    print(f"matmul probe (fp32 1024^3): {probe_before:.0f} GFLOP/s before, {matmul_probe():.0f} GFLOP/s after")


if __name__ == "__main__":
    main()
