"""
Rollout throughput of the Engine's decoding loops, side by side in one process: the growing-batch loop
("dynamic", what the Engine did before the fixed-shape step), the fixed-shape step run eagerly ("static"),
under torch.compile ("compile") and, on CUDA, replayed as a CUDA graph ("graph"), compiled and then replayed as a
CUDA graph ("compiled_graph").

    python -m dev.bench_rollout                                   # CPU sweep, d4 (the tables in dev/bench_rollout.md)
    python -m dev.bench_rollout --batch_sizes 64 --prompt_lens 32 --new_tokens 128 --repeats 3
    python -m dev.bench_rollout --device cuda --depth 20 --modes dynamic,graph,compiled_graph --batch_sizes 1,256
    python -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph-old,graph --batch_sizes 256

A mode is an Engine decode mode, then options, each after a "-". "-old" runs as the Engine did when issue 17
was filed: no sampling copy with the linear weights cast to bf16 once (Engine(cast_weights=False): autocast casts
them at every step), the prompt prefilled in chunks sized by the full logits (rows x columns x vocab under 2^25
elements, which cut a 256-row batch into 4-column chunks), captured graphs attending without cuDNN's kernel and
waiting for each step's tokens before the next replay, each over the whole cache, and a compiled step per cache
length with its prompts prefilled eagerly. So "dynamic-old" is today's anchor for the issue's goals. "-nocudnn"
("graph-nocudnn") is today's Engine but for the graphs' attention kernel: it isolates that kernel; "-cudnn" gives cuDNN's kernel to every graph mode, whatever
Engine.CUDNN_GRAPH_MODES says (today every graph mode takes it). "-shrinkN" lets the loop move its live rows to a
smaller batch bucket when at least N steps may remain, "-noshrink" never (Engine.SHRINK_MIN_STEPS; by default the
eager and compiled steps shrink, graphs do not). Shrinking matters only with --lengths mixed, where rows end at
mixed lengths as a real batch's answers do (tokens/s then counts the rows' real tokens). "-fixedlen" compiles the
step for its cache length, as before Engine.DYNAMIC_LENGTH (compiled modes only: they otherwise take the length
as a dynamic size, one compile for every length). "-nolookahead" makes a graph mode wait for each step's tokens
before launching the next, as before Engine.LOOKAHEAD_MODES (graph modes otherwise run one replay ahead).
"-windows" makes a graph mode capture a graph per Engine.WINDOW_QUANTUM columns of the cache and run the narrowest
that holds the filled columns (Engine.WINDOW_MODES: the compiled graph by default), "-nowindows" one graph over the
whole cache, "-qN" windows every N columns (Engine.WINDOW_QUANTUM: 64).
Captures are part of every timed call (the Engine gives its graphs back after each generation, as RL's does by
default); "-keep" keeps them (Engine(keep_graphs=True), chat_rl's --keep_graphs): only the warm-up captures, so the
difference to the same mode without it is the captures' cost per call. "-eagerprefill" prefills a compiled mode's
prompts eagerly, as before Engine.COMPILED_PREFILL_MODES (compiled modes otherwise compile the prefill too).
"-autotune" compiles a compiled mode's step with torch.compile's "max-autotune-no-cudagraphs" (Engine.COMPILE_MODE):
its matmuls choose among Triton's templates and cuBLAS by timing them. "-fusedqkv" samples from a copy whose
attentions project queries, keys and values by one matmul (Engine.FUSE_QKV; where the Engine casts, CUDA).

For each (batch, prompt length, new tokens) the modes run interleaved (mode A, mode B, ..., then again),
so a machine shared with other work disturbs them alike; read the ratios. Every timed call is
generate_prompts-shaped: `batch` different prompts of mixed lengths (uniform in [prompt_len / 2, prompt_len]),
one sample each, random weights, temperature and top-k sampling. The stand-in tokenizer's stop and tool
tokens lie outside the vocabulary, so every row decodes exactly --new_tokens tokens (with --lengths fixed).

Printed per row: prefill ms (to the first sampled column), decode ms per step, total latency, tokens/s,
memory-bandwidth utilisation = (weight bytes + KV bytes a step must read) / step time / peak bandwidth,
the bytes in the dtypes today's Engine reads them in (on CUDA bf16 linears and a bf16 cache; before 2026-11-28
they were counted at the fp32 parameters' size, twice the bytes on CUDA),
and MFU = decode FLOPs per step / step time / peak FLOP/s. The KV bytes are those of the filled columns
(the least any implementation must read), the same for every mode, so a mode that reads more (the static
cache reads its whole fixed length) shows it as lower utilisation. The first call of a shape per mode is
a warm-up and its time (compilation, graph capture) is printed separately; compiled modes share one torch.compile
of the step (the "-fixedlen" ones another), so a mode that needs no new compiled graph (e.g.
"compiled_graph-nolookahead" after "compiled_graph") shows the capture alone. The last line is a JSON summary.
"""

import argparse
import itertools
import json
import os
import statistics
import time

import torch

from dev.bench_engine import NoStopTokenizer, build_model
from nanochat.common import get_peak_flops
from nanochat.decode_static import decode_step, prefill_step
from nanochat.engine import Engine

# Nominal peak memory bandwidth (bytes/s) by device name; --peak_bandwidth overrides. The CPU figure is a
# guess for two cores' share of a server's DRAM bandwidth: only ratios between modes are solid there.
PEAK_BANDWIDTH = [("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h800", 3.35e12), ("b200", 8.0e12),
                  ("a100", 2.0e12), ("a10g", 0.6e12), ("l40s", 0.864e12), ("4090", 1.0e12), ("3090", 0.936e12)]
CPU_PEAK_BANDWIDTH = 20e9


def default_peak_bandwidth(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return next((bw for key, bw in PEAK_BANDWIDTH if key in name), float("nan"))
    return CPU_PEAK_BANDWIDTH


def make_prompts(batch, prompt_len, vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rollout(engine, prompts, new_tokens, temperature, top_k):
    """(seconds to the first column, total seconds, columns) of one generate_prompts-shaped call. Uses the
    Engine's stream (what generate_prompts collects) to see when the prefill ends."""
    device = engine.model.get_device()
    synchronize(device)
    t0 = time.perf_counter()
    first, columns = None, 0
    for _ in engine._stream(prompts, 1, new_tokens, temperature, top_k, 42):
        columns += 1
        if first is None:
            first = time.perf_counter() - t0
    synchronize(device)
    return first, time.perf_counter() - t0, columns


def fixed_length_step(*args, **kwargs):
    """decode_step under another name, for the "-fixedlen" modes: torch.compile keeps its graphs per function, and
    decode_step's graph compiled for a dynamic cache length would serve a fixed length too (no compile to time)."""
    return decode_step(*args, **kwargs)


def autotuned_step(*args, **kwargs):
    """decode_step under another name, for the "-autotune" modes: their compile, under another torch.compile mode,
    gets graphs of its own (and its own warm-up to time)."""
    return decode_step(*args, **kwargs)


def share_compiled_steps(engines):
    """The compiled modes share one torch.compile of the step (a mode whose inputs and options match an earlier
    mode's reuses its compiled graph: its warm-up is then the capture alone), the fixed-length ones another, the
    autotuned ones a third, and all of them one of the prefill."""
    compiled = {}
    prefill = torch.compile(prefill_step, dynamic=False, fullgraph=True)
    for engine in engines:
        if engine.decode in ("compile", "compiled_graph"):
            engine._compiled_prefill_step = prefill
            key = (engine.DYNAMIC_LENGTH, engine.COMPILE_MODE)
            if key not in compiled:  # the Engine's own compile, or the same one of another name
                if key == (True, Engine.COMPILE_MODE):
                    compiled[key] = engine._compiled()
                else:
                    step = fixed_length_step if not engine.DYNAMIC_LENGTH else autotuned_step
                    compiled[key] = torch.compile(step, dynamic=False, fullgraph=True, mode=engine.COMPILE_MODE)
            engine._compiled_step = compiled[key]


MODE_OPTIONS = ("old, cudnn, nocudnn, shrinkN, noshrink, fixedlen, nolookahead, windows, nowindows, qN, keep, eagerprefill, "
                "autotune, fusedqkv")


def make_engine(model, tokenizer, mode):
    """(Engine, whether it runs as when the issue was filed) for a mode name: an Engine decode mode, then options,
    each after a "-" (module docstring): "graph", "dynamic-old", "compiled_graph-cudnn", "graph-shrink32"."""
    decode, *options = mode.split("-")
    named = ("old", "cudnn", "nocudnn", "noshrink", "fixedlen", "nolookahead", "windows", "nowindows", "keep",
             "eagerprefill", "autotune", "fusedqkv")
    if decode not in Engine.DECODE_MODES or not all(o in named or (o.startswith("shrink") and o[6:].isdigit())
                                                    or (o.startswith("q") and o[1:].isdigit() and int(o[1:]) > 0)
                                                    for o in options):
        raise ValueError(f"bad mode {mode!r}: an Engine decode mode {Engine.DECODE_MODES}, then -options ({MODE_OPTIONS})")
    old = "old" in options
    engine = Engine(model, tokenizer, decode=decode, cast_weights=False if old else "auto", keep_graphs="keep" in options)
    if old:
        engine._prefill_chunk = old_prefill_chunk
    if old or "nocudnn" in options:  # captured graphs attend with the kernels every other path uses
        engine.CUDNN_GRAPH_MODES = ()
    elif "cudnn" in options:  # every graph mode takes cuDNN's kernel first
        engine.CUDNN_GRAPH_MODES = Engine.GRAPH_MODES
    if old or "fixedlen" in options:  # a compile per cache length
        engine.DYNAMIC_LENGTH = False
    if old or "nolookahead" in options:  # the host reads each step's tokens before the next is launched
        engine.LOOKAHEAD_MODES = ()
    if old or "eagerprefill" in options:  # the prompts prefilled eagerly into a growing cache
        engine.COMPILED_PREFILL_MODES = ()
    if "autotune" in options:  # the step's matmuls autotuned when it compiles (Engine.COMPILE_MODE)
        engine.COMPILE_MODE = "max-autotune-no-cudagraphs"
    if "fusedqkv" in options:  # q, k and v projected by one matmul in the sampling copy (Engine.FUSE_QKV)
        engine.FUSE_QKV = True
    if old or "nowindows" in options:  # one graph over the whole cache
        engine.WINDOW_MODES = ()
    elif "windows" in options:  # a graph per window of the cache, the narrowest holding the filled columns
        engine.WINDOW_MODES = Engine.GRAPH_MODES
    for o in options:  # windows every N columns (Engine.WINDOW_QUANTUM), on for this mode
        if o.startswith("q"):
            engine.WINDOW_MODES, engine.WINDOW_QUANTUM = Engine.GRAPH_MODES, int(o[1:])
    for o in options:  # when the loop may move rows to a smaller batch bucket (Engine.SHRINK_MIN_STEPS)
        if o.startswith("shrink") or o == "noshrink":
            engine.SHRINK_MIN_STEPS = {**Engine.SHRINK_MIN_STEPS, decode: None if o == "noshrink" else int(o[6:])}
    return engine, old


def finish_rows_at(engine, length_of):
    """Make every row of a prompt end after length_of[tuple(prompt)] tokens, as if it sampled its stop token
    there: a real batch's answers end at mixed lengths, which the stand-in tokenizer (no stop token the random
    model writes) cannot give. Keyed by the prompt, so it holds however the Engine batches the prompts."""
    checked, row_states, observe = engine._checked_prompts, engine._row_states, engine._observe
    seen = []

    def remember_prompts(prompts):
        seen[:] = checked(prompts)
        return seen[:]

    def states_with_lengths(num_rows, num_samples, line_headers):
        states = row_states(num_rows, num_samples, line_headers)
        for row, state in enumerate(states):
            state.tokens_left = length_of[tuple(seen[row // num_samples])]
        return states

    def observe_until_length(state, token):
        observe(state, token)
        state.tokens_left -= 1
        if state.tokens_left <= 0:
            state.done = True

    engine._checked_prompts, engine._row_states, engine._observe = remember_prompts, states_with_lengths, observe_until_length


def row_lengths(batch, new_tokens, seed=2):
    """Mixed answer lengths: uniform in [new_tokens / 8, new_tokens], the longest exactly new_tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, new_tokens // 8), new_tokens + 1, (batch,), generator=g).tolist()
    lengths[int(torch.randint(batch, (1,), generator=g))] = new_tokens
    return lengths


def old_prefill_chunk(model, rows, length, device):
    """Engine._prefill_chunk as it was: full logits (rows x columns x vocab) under 2^25 elements."""
    return max(1, (1 << 25) // (rows * model.config.vocab_size))


def step_costs(model, prompts, new_tokens, engine):
    """(bytes, FLOPs) one average decode step must read / compute for these rows on the Engine's path: every
    weight but the embedding (a lookup of B rows) once, the linears' in the dtype it samples them in (a bf16
    copy on CUDA, Engine.cast_weights), plus the keys and values of the filled columns of every row in the
    cache's dtype (bf16 on CUDA). One yardstick per shape: the "-old" rows read fp32 weights, so theirs is
    an underestimate of what they move."""
    c = model.config
    device = model.get_device()
    cast = engine._sampling_dtype(device)
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weights = [(name, p) for name, p in model.named_parameters() if "wte" not in name]
    weight_bytes = sum(p.numel() * (cast.itemsize if cast and id(p) in linears else p.element_size())
                       for _, p in weights)
    matmul_params = sum(p.numel() for _, p in weights)
    longest = max(len(p) for p in prompts)
    mean_len = longest + new_tokens / 2  # left-padded rows all sit at the same column; the pad is masked, not skipped
    head_dim = c.n_embd // c.n_head
    cache_dtype = engine._cache_dtype(device) or next(model.parameters()).dtype
    kv_bytes_per_column = 2 * c.n_layer * c.n_kv_head * head_dim * cache_dtype.itemsize
    rows = len(prompts)
    kv_bytes = rows * kv_bytes_per_column * mean_len
    flops = rows * (2 * matmul_params + 4 * c.n_layer * c.n_embd * mean_len)  # matmuls + scores and values
    return weight_bytes + kv_bytes, flops


def profile_step(engine, prompts, args, steps=16, mode=None):
    """Which ops the decode steps' time goes to: `steps` steps after the first column, so the prefill (whose
    elementwise work scales with the prompt tokens) and the graph capture stay outside the window; the call
    before the profiled one compiles or captures. Printed to stdout before the summary line."""
    from torch.profiler import ProfilerActivity, profile
    engine.generate_prompts(prompts, num_samples=1, max_tokens=steps + 1, temperature=args.temperature, top_k=args.top_k, seed=0)
    cuda = next(engine.model.parameters()).is_cuda
    stream = engine._stream(prompts, 1, steps + 1, args.temperature, args.top_k, 0)
    next(stream)  # the prefill and the first sampled column
    if cuda:
        torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    prof.start()
    t0 = time.perf_counter()
    for _ in stream:
        pass
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prof.stop()
    print(f"\n### Profile: mode {mode or engine.decode}, batch {len(prompts)}, {steps} decode steps (prefill outside the window)\n")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15))
    if cuda:  # a captured step's kernels count too (the profiler records them inside graph replays)
        from torch.autograd import DeviceType
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000
        print(f"device work: {len(kernels) / steps:.0f} kernels per step, {busy / steps:.3f} ms of kernel time per step "
              f"({100 * busy / (1000 * wall):.0f} % of the profiled {1000 * wall / steps:.3f} ms per step; the rest is "
              f"gaps between kernels and the device waiting for the host)")
        if engine.decode in Engine.GRAPH_MODES and len(kernels) < 10 * steps:
            print("  (few kernels for a captured step: this profiler may not record the kernels a graph replay runs; "
                  "profile the same step uncaptured, mode 'compile', to see them)")


@torch.inference_mode()  # the cache's tensors are inference tensors: only written to inside this mode
def graph_breakdown(engine, prompts, new_tokens, args, steps=64, mode=None):
    """Where a graph step's wall time goes: the step as the Engine's loop runs it (host bookkeeping, copies,
    replay, reading the tokens back) against the same captured graph (each step's window, if windowed) replayed
    back to back with no host work between replays (the device's time per step, gaps between its kernels
    included). The difference is the host's share, which the device waits for. The stream asks for new_tokens
    tokens, so the cache has the timed table's length, and `steps` of its steps are timed. `mode`: the name
    printed (the table's)."""
    mode = mode or engine.decode
    device = engine.model.get_device()
    steps = max(1, min(steps, new_tokens - 1))
    stream = engine._stream(prompts, 1, new_tokens, args.temperature, args.top_k, 0)
    next(stream)  # the prefill, the capture and the first column
    graphed = next(iter(engine._graphs.values()))
    start = int(graphed.cache.pos)  # the column the next step writes
    synchronize(device)
    t0 = time.perf_counter()
    for _ in itertools.islice(stream, steps):
        pass
    synchronize(device)
    loop = (time.perf_counter() - t0) / steps
    stream.close()  # the Engine gives back its graphs (unless it keeps them); this one still holds its cache and pool
    for _ in range(3):
        graphed.cache.pos.fill_(start)
        graphed.replay()
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        graphed.cache.pos.fill_(start + i)  # the loop's columns and windows, in the loop's order
        graphed.use(start + i + 1)
        graphed.replay()
    synchronize(device)
    replay = (time.perf_counter() - t0) / steps
    print(f"\n### Breakdown: mode {mode}, batch {len(prompts)}, {graphed.cache.capacity}-column cache: step in "
          f"the loop {1000 * loop:.2f} ms, graph replayed back to back {1000 * replay:.2f} ms, host's share "
          f"{1000 * (loop - replay):.2f} ms ({100 * (loop - replay) / loop:.0f} %)")
    return dict(mode=mode, batch=len(prompts), capacity=graphed.cache.capacity, loop_ms=1000 * loop,
                replay_ms=1000 * replay)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--modes", default=None, help=f"comma list of Engine decode modes, each optionally with -options ({MODE_OPTIONS}) "
                                                      "(default: dynamic,static,compile and on CUDA graph,compiled_graph)")
    parser.add_argument("--batch_sizes", default="1,8,64")
    parser.add_argument("--prompt_lens", default="32", help="longest prompt of a batch; lengths are mixed down to half")
    parser.add_argument("--new_tokens", default="128")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per mode and shape (median reported)")
    parser.add_argument("--lengths", default="fixed", choices=["fixed", "mixed"],
                        help="fixed: every row writes --new_tokens; mixed: row lengths uniform in [new/8, new] (the "
                             "longest = new), as if rows sampled their stop token there: finished rows can stop costing")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--bf16_weights", action="store_true", help="cast the weights to bf16 (inference only)")
    parser.add_argument("--profile", default=None, help="after the timings, profile 16 decode steps of this mode at each batch "
                                                        "size: the ops that take the device's (CPU: the host's) time")
    parser.add_argument("--breakdown", action="store_true", help="after the timings, for each graph mode and batch size: "
                        "the step in the loop against its graph replayed back to back (CUDA)")
    parser.add_argument("--peak_bandwidth", type=float, default=None, help="bytes/s (default: by device name; CPU 20e9)")
    parser.add_argument("--peak_flops", type=float, default=None, help="FLOP/s (default: nanochat.common.get_peak_flops)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = (args.modes or ("dynamic,static,compile,graph,compiled_graph" if device.type == "cuda" else "dynamic,static,compile")).split(",")
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    new_token_counts = [int(x) for x in args.new_tokens.split(",")]
    peak_bw = args.peak_bandwidth or default_peak_bandwidth(device)
    peak_flops = args.peak_flops or get_peak_flops(device)

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    longest_needed = max(prompt_lens) + max(new_token_counts)
    # sequence_len sizes the rotary table (10x): it must cover the longest prompt plus its new tokens
    model = build_model(args.depth, args.vocab_size, sequence_len=max(256, longest_needed), device=device,
                        bf16_weights=args.bf16_weights)
    try:
        engines = {mode: make_engine(model, NoStopTokenizer(args.vocab_size), mode)[0] for mode in modes}
    except ValueError as e:
        parser.error(str(e))
    share_compiled_steps(engines.values())
    length_of = {}  # prompt -> its rows' length, with --lengths mixed
    if args.lengths == "mixed":
        for engine in engines.values():
            finish_rows_at(engine, length_of)
    c = model.config
    print(f"depth {c.n_layer}, n_embd {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.1f}M params, {next(model.parameters()).dtype} weights, {args.device}, "
          f"{torch.get_num_threads()} threads; T={args.temperature}, top_k={args.top_k}; "
          f"peak {peak_bw / 1e9:.0f} GB/s, {peak_flops / 1e12:.0f} TFLOP/s\n")
    print("| batch | prompt | new | mode | warm-up s | prefill ms | ms / step | latency s | tok/s | vs dynamic | BW util % | MFU % |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    yardstick = Engine(model, NoStopTokenizer(args.vocab_size))  # today's defaults: the dtypes step_costs counts in
    for batch in batch_sizes:
        for prompt_len in prompt_lens:
            for new_tokens in new_token_counts:
                prompts = make_prompts(batch, prompt_len, args.vocab_size)
                step_bytes, step_flops = step_costs(model, prompts, new_tokens, yardstick)
                lengths = row_lengths(batch, new_tokens) if args.lengths == "mixed" else [new_tokens] * batch
                length_of.update(zip(map(tuple, prompts), lengths))
                warmup = {}
                for mode in modes:  # first call of this shape: compilation / capture / allocator warm-up
                    t0 = time.perf_counter()
                    time_rollout(engines[mode], prompts, new_tokens, args.temperature, args.top_k)
                    warmup[mode] = time.perf_counter() - t0
                timings = {mode: [] for mode in modes}
                for _ in range(args.repeats):
                    for mode in modes:
                        timings[mode].append(time_rollout(engines[mode], prompts, new_tokens, args.temperature, args.top_k))
                rows = {}
                for mode in modes:
                    first = statistics.median(t[0] for t in timings[mode])
                    total = statistics.median(t[1] for t in timings[mode])
                    columns = timings[mode][0][2]
                    assert columns == new_tokens, f"{mode}: {columns} columns, expected {new_tokens}"
                    step = (total - first) / max(1, new_tokens - 1)
                    rows[mode] = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, mode=mode,
                                      warmup_s=warmup[mode], prefill_ms=1000 * first, step_ms=1000 * step, latency_s=total,
                                      tok_per_s=sum(lengths) / total,
                                      bw_util=step_bytes / step / peak_bw if step > 0 else float("nan"),
                                      mfu=step_flops / step / peak_flops if step > 0 else float("nan"))
                base = rows[modes[0]]["tok_per_s"]
                for mode in modes:
                    r = rows[mode]
                    r["vs_first_mode"] = r["tok_per_s"] / base
                    print(f"| {batch} | {prompt_len} | {new_tokens} | {mode} | {r['warmup_s']:.1f} | {r['prefill_ms']:.1f} | "
                          f"{r['step_ms']:.2f} | {r['latency_s']:.2f} | {r['tok_per_s']:.0f} | {r['vs_first_mode']:.2f}x | "
                          f"{100 * r['bw_util']:.1f} | {100 * r['mfu']:.2f} |")
                    results.append(r)

    def prompts_with_lengths(batch):  # the profile's and the breakdown's prompts, under the table's rule for row lengths
        prompts = make_prompts(batch, max(prompt_lens), args.vocab_size)
        length_of.update(zip(map(tuple, prompts), row_lengths(batch, max(new_token_counts))))
        return prompts

    if args.profile:
        for batch in batch_sizes:
            profile_step(engines[args.profile], prompts_with_lengths(batch), args, mode=args.profile)
    breakdowns = []
    if args.breakdown:
        for batch in batch_sizes:
            prompts = prompts_with_lengths(batch)
            for mode in modes:
                if engines[mode].decode in Engine.GRAPH_MODES:
                    breakdowns.append(graph_breakdown(engines[mode], prompts, max(new_token_counts), args, mode=mode))
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs; "
          f"wall {time.perf_counter() - t_start:.0f} s; torch {torch.__version__}; 'vs dynamic' = tok/s over the first mode's")
    summary = dict(device=args.device, depth=args.depth, vocab_size=args.vocab_size, threads=torch.get_num_threads(),
                   peak_bandwidth=peak_bw, peak_flops=peak_flops, modes=modes, load_before=load_before[0],
                   load_after=load_after[0], results=results, breakdowns=breakdowns)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
