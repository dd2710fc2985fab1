"""
Host time of nanochat.grpo.token_pieces, which the co-training step runs on every sample before the verifier
reads it (and the oracle verifier too), against the way it was written before: every token's bytes through an
incremental UTF-8 decoder. Both in one run, on the same solutions: random token ids (what the benchmark's
random-weight models write) and the arithmetic task's solutions with a few multi-byte characters mixed in.

    python -m dev.bench_token_pieces                                   # tokenizer trained on the task's text
    python -m dev.bench_token_pieces --tokenizer_dir .gpu/tokenizer    # a saved tokenizer (e.g. vocab 32,768)

The last line is a JSON summary.
"""

import argparse
import codecs
import json
import random
import time

from nanochat.grpo import token_pieces
from nanochat.tokenizer import Tokenizer
from tasks.arithmetic import ArithmeticTask


def token_pieces_before(tokenizer, ids):
    """The anchor: token_pieces as it was, every token through the incremental decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(tokenizer.decode_bytes([t])) for t in ids]


def best_of(fn, tokenizer, solutions, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for ids in solutions:
            fn(tokenizer, ids)
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer_dir", default=None, help="load a saved tokenizer instead of training one")
    p.add_argument("--samples", type=int, default=256, help="solutions per timed pass (a co-training step's samples)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per solution")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per path (the fastest is reported)")
    args = p.parse_args()
    if min(args.samples, args.tokens, args.repeats) < 1:
        p.error("--samples, --tokens and --repeats must be positive")
    task = ArithmeticTask(split="train", size=2000)
    texts = [task.get_labelled_solution(i)["solution"] for i in range(2000)]
    if args.tokenizer_dir:
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    else:
        tokenizer = Tokenizer.train_from_iterator(iter(texts), 2048)
    vocab = tokenizer.get_vocab_size()
    rng = random.Random(0)
    written = " ".join(texts[:400]).replace("=", "→", 7).replace("\n", " ✓\n", 5)
    written_ids = tokenizer.encode(written)
    sets = {
        "random ids": [[rng.randrange(vocab) for _ in range(args.tokens)] for _ in range(args.samples)],
        "task text": [written_ids[s:s + args.tokens] for s in
                      (rng.randrange(max(1, len(written_ids) - args.tokens)) for _ in range(args.samples))],
    }
    tokenizer.token_texts()  # built once per tokenizer (per run), not per step
    print(f"vocab {vocab}, {args.samples} solutions x {args.tokens} tokens, best of {args.repeats}\n")
    print("| solutions | before s | now s | speedup |")
    print("|---|---:|---:|---:|")
    results = []
    for name, solutions in sets.items():
        assert all(token_pieces(tokenizer, ids) == token_pieces_before(tokenizer, ids) for ids in solutions)
        before = best_of(token_pieces_before, tokenizer, solutions, args.repeats)
        now = best_of(token_pieces, tokenizer, solutions, args.repeats)
        print(f"| {name} | {before:.4f} | {now:.4f} | {before / now:.2f}x |")
        results.append(dict(solutions=name, before_s=before, now_s=now, speedup=before / now))
    print(json.dumps(dict(vocab=vocab, samples=args.samples, tokens=args.tokens, results=results)))


if __name__ == "__main__":
    main()
