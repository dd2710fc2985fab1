"""
What the host does per decode column in the Engine's fixed-shape loop, with the model's step replaced by an
instant stand-in (it advances the cache and returns fixed tokens): the rows' bookkeeping, the feed, the random
numbers, reading the tokens back and collecting the completions. On a GPU this time sits between two graph
replays (the GPU waits for it): `bench_rollout --breakdown` measured 0.4-0.9 ms a step at batch 256 there.

    python -m dev.bench_host_loop                          # batch 256, 256 columns, greedy and sampled
    python -m dev.bench_host_loop --anchor 25610b2         # also the Engine of that commit, runs alternating
    python -m dev.bench_host_loop --line_headers           # rows with a verifier's forced "Step k:" headers
    python -m dev.bench_host_loop --graph --anchor b03e3df # the graph modes' loop (one replay ahead since then)

--graph runs the loop the graph modes take, with the instant step standing in for a captured graph: since
Engine.LOOKAHEAD_MODES that loop launches the next replay before reading a step's tokens, so on a GPU its host
time hides behind the replay; here (no GPU to overlap with) it is the host work that must stay below a step.

--anchor REV times the same loop on the nanochat package of an older commit (extracted with `git archive` into
a temporary directory, run in a subprocess with it first on the path), alternating with today's, and prints the
ratio. The last line is a JSON summary.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def time_loop(batch, columns, temperature, repeats, line_headers=False, graph=False):
    """Best seconds per column of generate_prompts with an instant step (imports whichever nanochat is first)."""
    import torch

    import nanochat.engine as engine_module
    from dev.bench_engine import NoStopTokenizer, build_model
    from nanochat.decode_static import GraphedStep, StaticKVCache

    class ByteTokenizer(NoStopTokenizer):  # ids below 256 are bytes: "\n" is id 10, which line headers need
        def get_vocab_size(self):
            return 300 + len(self.ids)

        def decode_bytes(self, ids):
            return bytes(i for i in ids if i < 256)
    model = build_model(1, 300, sequence_len=columns + 64)
    engine = engine_module.Engine(model, ByteTokenizer(300), decode="static")
    tokens = torch.randint(0, 300, (1024,), generator=torch.Generator().manual_seed(0))

    def instant_cache(model, mode, batch, capacity, width, temperature, top_k, dtype, filled=None):
        cache = StaticKVCache.for_model(model, batch, capacity, dtype=dtype)

        def step(c, feed, noise, filled=None):
            c.pos.add_(1)
            return tokens[:c.batch_size]
        return cache, step
    class InstantGraph(GraphedStep):  # the instant step, taken for a captured graph (its loop, no capture)
        def __init__(self, cache):
            self.cache, self.out = cache, tokens[:cache.batch_size].clone()
            self.logits = torch.zeros(cache.batch_size, 300)

        def __call__(self, c, feed, noise, filled=None):
            c.pos.add_(1)
            return self.out

    def instant_graph(model, mode, batch, capacity, width, temperature, top_k, dtype, filled=None):
        cache = StaticKVCache.for_model(model, batch, capacity, dtype=dtype)
        return cache, InstantGraph(cache)
    engine._static_cache = instant_graph if graph else instant_cache
    if graph:
        engine._decode_mode = lambda device: "graph"
    prompts = [[5] * 8 for _ in range(batch // 8)]
    # a verifier's forced headers (chat_cotrain --forced_headers): "Step k:" opens each line the model starts
    headers = [[list(f"Step {k}:".encode()) for k in range(1, 9)] for _ in prompts] if line_headers else None
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        engine.generate_prompts(prompts, num_samples=8, max_tokens=columns, temperature=temperature, top_k=50,
                                line_headers=headers)
        times.append((time.perf_counter() - t0) / columns)
    return min(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="rows (a multiple of 8: prompts of 8 samples)")
    p.add_argument("--columns", type=int, default=256, help="decode columns per generation")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per run (the fastest is kept)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each Engine, alternating with --anchor")
    p.add_argument("--line_headers", action="store_true", help="rows open each line with a forced header, as a "
                                                                  "co-training verifier's do")
    p.add_argument("--graph", action="store_true", help="time the graph modes' loop (see above)")
    p.add_argument("--anchor", default=None, help="a git revision whose Engine is timed alongside (see above)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON to stdout
    args = p.parse_args()
    if args.batch < 8 or args.batch % 8 or min(args.columns, args.repeats, args.rounds) < 1:
        p.error("--batch must be a positive multiple of 8 and --columns, --repeats, --rounds positive")
    if args.worker:
        import nanochat
        result = {str(t): time_loop(args.batch, args.columns, t, args.repeats, args.line_headers, args.graph)
                  for t in (0.0, 1.0)}
        print(json.dumps(dict(result, source=os.path.dirname(nanochat.__file__))))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(args.batch), "--columns",
              str(args.columns), "--repeats", str(args.repeats)] + (["--line_headers"] if args.line_headers else []) \
        + (["--graph"] if args.graph else [])
    runs = {"today": []}
    with tempfile.TemporaryDirectory(prefix="bench_host_loop_") as anchor_dir:
        if args.anchor:
            runs[args.anchor] = []
            archive = subprocess.run(["git", "-C", here, "archive", args.anchor, "nanochat", "dev/bench_engine.py"],
                                     capture_output=True)
            if archive.returncode:
                p.error(f"git archive {args.anchor!r} failed: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", anchor_dir], input=archive.stdout, check=True)
            open(os.path.join(anchor_dir, "dev", "__init__.py"), "w").close()
        for _ in range(args.rounds):
            for name in runs:
                # the anchor's nanochat (and bench_engine) first on the path; this file's worker runs either way
                path = [anchor_dir] if name != "today" else []
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [here]))
                out = subprocess.run(worker, capture_output=True, text=True, env=env, cwd=anchor_dir if path else here)
                if out.returncode:
                    sys.exit(f"the {name} run failed:\n{out.stderr}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                assert result["source"].startswith(anchor_dir if path else here), result["source"]
                runs[name].append(result)
    what = "instant step" + (" as a graph" if args.graph else "") + (", forced line headers" if args.line_headers else "")
    print(f"batch {args.batch}, {args.columns} columns, {what}, "
          f"best of {args.repeats} per run, {args.rounds} runs each (median)\n")
    print("| engine | greedy ms / column | sampled ms / column |")
    print("|---|---:|---:|")
    summary = {}
    for name, results in runs.items():
        summary[name] = {t: 1000 * statistics.median(r[t] for r in results) for t in ("0.0", "1.0")}
        print(f"| {name} | {summary[name]['0.0']:.3f} | {summary[name]['1.0']:.3f} |")
    if args.anchor:
        ratios = {t: summary[args.anchor][t] / summary["today"][t] for t in ("0.0", "1.0")}
        print(f"\ntoday vs {args.anchor}: {ratios['0.0']:.2f}x greedy, {ratios['1.0']:.2f}x sampled (host time per column)")
        summary["speedup"] = ratios
    print(json.dumps(dict(batch=args.batch, columns=args.columns, ms_per_column=summary)))


if __name__ == "__main__":
    main()
