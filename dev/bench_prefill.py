"""
How wide the Engine's prefill passes should be: time the prefill of a batch of left-padded prompts at several
chunk widths (columns per forward pass), next to the Engine's own rule and the old one (full logits under 2^25
elements, which cut 256 rows at a 32K vocabulary into 4-column passes), in one run.

    python -m dev.bench_prefill                                   # CPU, d4: the shapes behind Engine.PREFILL_TOKENS
    python -m dev.bench_prefill --device cuda --depth 12 --shapes 256x384
    python -m dev.bench_prefill --device cuda --depth 12 --shapes 256x384 --widths 128 --attention engine,cudnn
    python -m dev.bench_prefill --device cuda --depth 12 --shapes 256x384 --widths 128 --profile

Random weights and prompts (lengths mixed down to half the longest); each width is timed --repeats times into a
fresh cache, as the Engine runs it (its sampling copy, under its inference context), and the fastest is printed
beside the first (which pays for any kernel planning). --attention also times the passes with cuDNN's attention
kernel first, which the Engine leaves out of the prefill because it plans once per shape, and a prefill's key
length grows with every pass (the first-call column shows that cost). The last line is a JSON summary.
"""

import argparse
import contextlib
import json
import time

import torch
from torch.nn.attention import sdpa_kernel

from dev.bench_engine import NoStopTokenizer, build_model
from dev.bench_rollout import make_prompts, old_prefill_chunk, synchronize
from nanochat.engine import Engine, KVCache, inference_context, left_padded


def time_prefill(engine, model, ids, pads, chunk, repeats, attention="engine"):
    """(first, fastest) of `repeats` prefills of ids in passes of `chunk` columns, in ms."""
    engine._prefill_chunk = lambda *_: chunk
    sampler = engine._sampling_model(model)
    times = []
    for _ in range(repeats):
        cache = KVCache.for_model(sampler, ids.size(0), ids.size(1) + 1, dtype=engine._cache_dtype(ids.device),
                                  pad_lengths=pads)
        synchronize(ids.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), inference_context(ids.device.type), \
                (sdpa_kernel(list(Engine.GRAPH_SDPA_BACKENDS), set_priority=True) if attention == "cudnn" else contextlib.nullcontext()):
            engine._prefill(sampler, ids, cache)
        synchronize(ids.device)
        times.append(time.perf_counter() - t0)
    return 1000 * times[0], 1000 * min(times)


def profile_prefill(engine, model, ids, pads, chunk):
    """Which ops a prefill's time goes to (one prefill at `chunk` columns per pass, after a warm-up one), printed
    before the summary line: the prefill runs at a fraction of the matmul peak, so the question is what else."""
    from torch.profiler import ProfilerActivity, profile
    cuda = ids.device.type == "cuda"
    time_prefill(engine, model, ids, pads, chunk, 1)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    with prof:
        time_prefill(engine, model, ids, pads, chunk, 1)
    print(f"\n### Profile: {ids.size(0)} rows x {ids.size(1)} columns in passes of {chunk}\n")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="64x256,256x128,16x384", help="rows x longest prompt, comma-separated")
    parser.add_argument("--widths", default="4,8,16,32,64,128,256,512", help="chunk widths to time (capped at the prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--attention", default="engine", help="comma list: engine (the Engine's kernels) and/or cudnn "
                                                              "(cuDNN's attention first)")
    parser.add_argument("--profile", action="store_true", help="after the timings, profile one prefill of each shape "
                                                                   "at the Engine's width")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        widths = [int(x) for x in args.widths.split(",")]
    except ValueError:
        parser.error(f"--shapes takes ROWSxPROMPT,... and --widths W,... (got {args.shapes!r}, {args.widths!r})")
    if any(len(shape) != 2 or min(shape) < 1 for shape in shapes) or min(widths) < 1:
        parser.error(f"--shapes takes positive ROWSxPROMPT pairs and --widths positive ints (got {args.shapes!r}, {args.widths!r})")
    attentions = args.attention.split(",")
    if not attentions or not set(attentions) <= {"engine", "cudnn"}:
        parser.error(f"--attention takes engine and/or cudnn, comma-separated (got {args.attention!r})")
    model = build_model(args.depth, args.vocab_size, sequence_len=max(256, max(p for _, p in shapes)), device=device)
    engine = Engine(model, NoStopTokenizer(args.vocab_size))
    rule = Engine._prefill_chunk.__get__(engine)  # the Engine's own rule, kept before the timings replace it
    c = model.config
    print(f"depth {c.n_layer}, n_embd {c.n_embd}, vocab {c.vocab_size}, {args.device}, {torch.get_num_threads()} threads\n")
    print("| rows | prompt | width | attention | first ms | ms | vs the old rule |")
    print("|---:|---:|---|---|---:|---:|---:|")
    results, batches = [], []
    for rows, prompt_len in shapes:
        ids, pads = left_padded(make_prompts(rows, prompt_len, args.vocab_size), device)
        batches.append((ids, pads))
        longest = ids.size(1)
        named = {"old rule": old_prefill_chunk(model, rows, longest, device),
                 "Engine's rule": rule(model, rows, longest, device)}
        named.update({str(w): w for w in widths if w <= 2 * longest})
        timed = {(name, attention): (w, *time_prefill(engine, model, ids, pads, w, args.repeats, attention))
                 for attention in attentions for name, w in named.items()}
        anchor = timed[("old rule", attentions[0])][2]
        for (name, attention), (w, first, ms) in timed.items():
            label = f"{name} ({w})" if not name.isdigit() else name
            print(f"| {rows} | {longest} | {label} | {attention} | {first:.0f} | {ms:.0f} | {anchor / ms:.2f}x |")
            results.append(dict(rows=rows, prompt=longest, width_name=name, width=w, attention=attention, first_ms=first,
                                ms=ms, speedup_vs_old=anchor / ms))
    if args.profile:  # after the table, on the batches it timed
        for ids, pads in batches:
            profile_prefill(engine, model, ids, pads, rule(model, ids.size(0), ids.size(1), device))
    print(json.dumps(dict(device=args.device, depth=args.depth, vocab_size=args.vocab_size, threads=torch.get_num_threads(),
                          results=results)))


if __name__ == "__main__":
    main()
