"""
Tokenizer compression: bytes per token of our trained tokenizer on several kinds of text (English
prose, code, math, non-English, and samples of the train/val shards when they exist), next to
whatever reference tokenizers are available offline:
  - GPT-2 and GPT-4 (cl100k_base) through tiktoken, which needs their files cached locally
    (tiktoken downloads them; without network and cache they are reported as unavailable);
  - with --reference_chars N: PyPI `rustbpe` trained at the same vocab size on the first N chars
    of the same shards with its own default split pattern (GPT-4's, digits in groups of 3).

    python -m scripts.tok_eval
    python -m scripts.tok_eval --reference_chars 50000000

evaluate() returns the numbers as a dict (used by the report).
"""

import argparse
import time

from nanochat.common import UserInputError, print0, run_stage
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer, get_tokenizer_dir

# Samples written for this script, one per kind of text.
SAMPLES = {
    "english": (
        "The committee met on a wet Thursday morning to decide what to do about the bridge. Half of the "
        "members wanted to repair it, arguing that the stone arches had stood for two centuries and could "
        "stand for two more with new mortar. The others pointed at the cracks along the north side and the "
        "cost of closing the road every spring. After three hours nobody had changed their mind, so they "
        "agreed to ask an engineer, which is what the chairman had suggested before the meeting began."
    ),
    "code": (
        "import os\nfrom collections import defaultdict\n\n\n"
        "def group_files_by_extension(root):\n"
        "    \"\"\"Map each file extension under root to the sorted list of paths that have it.\"\"\"\n"
        "    groups = defaultdict(list)\n"
        "    for dirpath, _dirnames, filenames in os.walk(root):\n"
        "        for name in filenames:\n"
        "            ext = os.path.splitext(name)[1].lower() or '<none>'\n"
        "            groups[ext].append(os.path.join(dirpath, name))\n"
        "    return {ext: sorted(paths) for ext, paths in groups.items()}\n\n\n"
        "if __name__ == '__main__':\n"
        "    for ext, paths in group_files_by_extension('.').items():\n"
        "        print(f'{ext:>8} {len(paths):5d}')\n"
    ),
    "math": (
        "Let $f(x) = x^3 - 6x^2 + 11x - 6$. Since $f(1) = 1 - 6 + 11 - 6 = 0$, the polynomial factors as "
        "$f(x) = (x - 1)(x^2 - 5x + 6) = (x - 1)(x - 2)(x - 3)$. Hence the roots are $1, 2, 3$ and\n"
        "\\[ \\int_0^1 f(x)\\,dx = \\frac{1}{4} - 2 + \\frac{11}{2} - 6 = -\\frac{9}{4}. \\]\n"
        "Check: 0.25 - 2 + 5.5 - 6 = -2.25. For the sum of squares, $1^2 + 2^2 + 3^2 = 14 = (1+2+3)^2 - 2 \\cdot 11$."
    ),
    "non_english": (
        "오늘 아침에는 비가 많이 와서 우리는 집에서 책을 읽기로 했습니다. 오후에는 날씨가 좋아져서 공원에 갔어요. "
        "Heute Morgen hat es stark geregnet, deshalb sind wir zu Hause geblieben und haben gelesen. "
        "Сегодня утром шёл сильный дождь, поэтому мы остались дома и читали книги. "
        "今天早上下了很大的雨，所以我们待在家里看书。下午天气好了，我们去了公园。"
        "Esta mañana llovió mucho, así que nos quedamos en casa leyendo."
    ),
}


def shard_samples(max_docs=200):
    """A few documents from the first row group of the train and val splits, when shards exist."""
    try:
        from nanochat.dataset import parquets_iter_batched
    except ImportError as e:
        return {}, f"nanochat.dataset unavailable ({e})"
    samples, notes = {}, []
    for split in ("train", "val"):
        try:
            batch = next(iter(parquets_iter_batched(split=split)))
            samples[f"{split}_docs"] = "\n".join(batch[:max_docs])
        except (FileNotFoundError, StopIteration, ValueError) as e:
            notes.append(f"{split}: {e}")
    return samples, "; ".join(notes)


def reference_tokenizers(vocab_size, reference_chars, tiktoken_references=True):
    """name -> encode function for every reference we can build offline, and name -> why not."""
    import tiktoken
    available, unavailable = {}, {}
    for name in ("gpt2", "cl100k_base") if tiktoken_references else ():
        try:
            enc = tiktoken.get_encoding(name)
            available[name] = enc.encode_ordinary
        except Exception as e:  # no network / no cache: tiktoken raises requests or OS errors
            unavailable[name] = f"tiktoken cannot load it offline ({type(e).__name__})"
    if reference_chars > 0:
        try:
            import rustbpe as pypi_rustbpe
            from nanochat.text_sources import capped_texts, iter_shards

            trainer = pypi_rustbpe.Tokenizer()
            trainer.train_from_iterator(capped_texts(iter_shards(), reference_chars, 10_000), vocab_size - len(SPECIAL_TOKENS))
            enc = tiktoken.Encoding(name="pypi-rustbpe", pat_str=trainer.get_pattern(),
                                    mergeable_ranks=dict(trainer.get_mergeable_ranks()), special_tokens={})
            available["pypi_rustbpe"] = enc.encode_ordinary
        except (ImportError, FileNotFoundError, ValueError) as e:
            unavailable["pypi_rustbpe"] = f"{type(e).__name__}: {e}"
    return available, unavailable


def evaluate(tokenizer=None, reference_chars=0, include_shards=True, tiktoken_references=True):
    """{"results": {text kind: {tokenizer: {"bytes", "tokens", "bytes_per_token"}}}, "unavailable": {...}, ...}"""
    tokenizer = tokenizer or get_tokenizer()
    texts = dict(SAMPLES)
    notes = ""
    if include_shards:
        shard_texts, notes = shard_samples()
        texts.update(shard_texts)
    encoders = {"ours": tokenizer.encode}
    references, unavailable = reference_tokenizers(tokenizer.get_vocab_size(), reference_chars, tiktoken_references)
    encoders.update(references)
    results = {}
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        results[kind] = {}
        for name, encode in encoders.items():
            n_tokens = len(encode(text))
            results[kind][name] = {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}
    return {"vocab_size": tokenizer.get_vocab_size(), "results": results, "unavailable": unavailable, "shard_notes": notes}


def print_table(report):
    results = report["results"]
    names = list(next(iter(results.values())).keys())
    print0(f"bytes per token (higher is better), our vocab {report['vocab_size']:,}")
    header = f"{'text':<16}{'bytes':>8}" + "".join(f"{n + ' tok':>16}{n + ' B/t':>16}" for n in names)
    print0(header)
    print0("-" * len(header))
    for kind, row in results.items():
        line = f"{kind:<16}{next(iter(row.values()))['bytes']:>8}"
        for n in names:
            line += f"{row[n]['tokens']:>16}{row[n]['bytes_per_token']:>16.2f}"
            if n != "ours":
                relative = 100 * (row[n]["tokens"] - row["ours"]["tokens"]) / max(row[n]["tokens"], 1)
                line += f" ({relative:+.1f}%)"
        print0(line)
    if len(names) > 1:
        print0("(+x%: ours uses x% fewer tokens than that reference)")
    for name, why in report["unavailable"].items():
        print0(f"reference {name}: unavailable - {why}")
    if report["shard_notes"]:
        print0(f"shard samples skipped: {report['shard_notes']}")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_dir", default=None, help=f"tokenizer to evaluate (default {get_tokenizer_dir()})")
    parser.add_argument("--reference_chars", type=float, default=0,
                        help="also train PyPI rustbpe on this many train-shard chars as a reference (default 0: skip)")
    args = parser.parse_args(argv)
    if args.reference_chars < 0:
        raise UserInputError(f"--reference_chars must be >= 0, got {args.reference_chars:g}")
    return args


def main(argv=None):
    args = get_args(argv)
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    t0 = time.time()
    report = evaluate(tokenizer, reference_chars=int(args.reference_chars))
    print_table(report)
    print0(f"({time.time() - t0:.1f}s)")
    return report


if __name__ == "__main__":
    run_stage(main)
