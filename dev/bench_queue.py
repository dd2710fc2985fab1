"""
More prompts than one batch holds, answers of mixed lengths: the Engine's passes of whole prompts
(generate_prompts with max_rows: each pass waits for its longest row) against its queue (generate_queue:
a waiting prompt starts as soon as a row frees), in one run. This is the shape of an evaluation
(nanochat/eval.py: hundreds of problems, `--batch_size` at a time) and of an RL step cut by --max_batch_rows.

    python -m dev.bench_queue                                        # CPU, d4: 64 prompts through 8 rows
    python -m dev.bench_queue --prompts 256 --rows 32 --new_tokens 256
    python -m dev.bench_queue --device cuda --depth 20 --prompts 512 --rows 64 --new_tokens 512
    python -m dev.bench_queue --prompts 16 --samples 8 --rows 32       # an RL step cut by --max_batch_rows

Random weights; every prompt's rows end after a preset number of tokens (uniform in [new/8, new], as if they
sampled their stop token there: dev/bench_rollout.finish_rows_at), the same for both paths, so both do the same
useful work; greedy, so both write the same tokens (checked). The two paths run interleaved, --repeats times
after a warm-up call each; medians are printed. The last line is a JSON summary.
"""

import argparse
import json
import statistics
import time

import torch

from dev.bench_engine import NoStopTokenizer, build_model
from dev.bench_rollout import finish_rows_at, make_prompts, row_lengths, synchronize
from nanochat.engine import Engine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--decode", default="auto", help="the Engine's decode mode (auto: graph on CUDA, static on CPU)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="rows decoded together (max_rows of the passes)")
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (an RL step's group; they start together)")
    parser.add_argument("--prompt_len", type=int, default=32, help="longest prompt; lengths are mixed down to half")
    parser.add_argument("--new_tokens", type=int, default=128, help="the longest answer; answers are mixed down to 1/8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if min(args.prompts, args.rows, args.samples, args.prompt_len, args.new_tokens, args.repeats) < 1:
        parser.error("--prompts, --rows, --samples, --prompt_len, --new_tokens and --repeats must be positive")
    if args.decode not in Engine.DECODE_MODES:
        parser.error(f"--decode must be one of {Engine.DECODE_MODES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.depth, args.vocab_size, sequence_len=max(256, args.prompt_len + args.new_tokens), device=device)
    prompts = make_prompts(args.prompts, args.prompt_len, args.vocab_size)
    lengths = row_lengths(args.prompts, args.new_tokens)
    length_of = dict(zip(map(tuple, prompts), lengths))
    passes = Engine(model, NoStopTokenizer(args.vocab_size), decode=args.decode, max_rows=args.rows)
    queue = Engine(model, NoStopTokenizer(args.vocab_size), decode=args.decode)
    for engine in (passes, queue):
        finish_rows_at(engine, length_of)
    n = args.samples
    paths = {"passes": lambda: passes.generate_prompts(prompts, num_samples=n, max_tokens=args.new_tokens, temperature=0.0),
             "queue": lambda: queue.generate_queue(prompts, args.rows, num_samples=n, max_tokens=args.new_tokens, temperature=0.0)}

    def timed(run):
        synchronize(device)
        t0 = time.perf_counter()
        out = run()
        synchronize(device)
        return time.perf_counter() - t0, out

    warmup = {name: timed(run) for name, run in paths.items()}
    # a row that reached its preset length is done without a stop token (the stand-in's lie outside the vocabulary),
    # and a pass's collector keeps its repeated last token until the pass ends: compare the preset lengths
    sample_lengths = [length for length in lengths for _ in range(n)]  # prompt-major, as the results come
    written = {name: [c[:k] for (c, _), k in zip(out, sample_lengths)] for name, (_, out) in warmup.items()}
    if written["passes"] != written["queue"]:
        raise SystemExit("the two paths wrote different tokens: a bug (greedy decoding must agree)")
    times = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            times[name].append(timed(run)[0])
    tokens = sum(len(c) for c in written["queue"])
    c = model.config
    print(f"depth {c.n_layer}, vocab {c.vocab_size}, {args.device}, decode {queue._decode_mode(device)}, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts x {n} samples through {args.rows} rows, answers of "
          f"{min(lengths)}-{max(lengths)} tokens ({tokens} in all), greedy\n")
    print("| path | warm-up s | s | tok/s | vs passes |")
    print("|---|---:|---:|---:|---:|")
    results = []
    base = statistics.median(times["passes"])
    for name in paths:
        seconds = statistics.median(times[name])
        print(f"| {name} | {warmup[name][0]:.2f} | {seconds:.2f} | {tokens / seconds:.0f} | {base / seconds:.2f}x |")
        results.append(dict(path=name, warmup_s=warmup[name][0], seconds=seconds, tok_per_s=tokens / seconds,
                            speedup=base / seconds))
    print(json.dumps(dict(device=args.device, depth=args.depth, prompts=args.prompts, samples=n, rows=args.rows,
                          new_tokens=args.new_tokens, tokens=tokens, threads=torch.get_num_threads(), results=results)))


if __name__ == "__main__":
    main()
