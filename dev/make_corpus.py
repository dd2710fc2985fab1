"""
Generate a small, licence-clean English pretraining corpus on this machine, with no network, and
write it as shards the loader reads. It is the data behind the offline CPU default.

    python -m dev.make_corpus                              # into the default shard dir (see nanochat.dataset)
    python -m dev.make_corpus --out_dir DIR --max_mb 20

Sources, in this order, all optional except the first:
  1. The Python standard library (PSF licence): module/class/function docstrings (with the signature
     as a heading), long English string constants (e.g. pydoc's help topics) and comment blocks,
     found with `ast` under sysconfig's stdlib directory (tests and site-packages excluded).
  2. Debian's licence texts in /usr/share/common-licenses, when that directory exists.
  3. Synthetic arithmetic word problems with worked solutions from tasks.arithmetic's train split
     (never its test split), when that module exists (imported lazily; skipped otherwise).
Texts are cut at paragraph boundaries into documents of at most --max_doc_chars, so that with the
loader's best-fit packing (which crops documents longer than a row) little text is thrown away at
small sequence lengths. The output depends only on the Python version's stdlib, the licence files
present and the flags: everything is walked in sorted order and shuffled with a fixed seed.
"""

import argparse
import ast
import hashlib
import importlib
import os
import random
import sys
import sysconfig
import time

from nanochat.dataset import get_data_dir
from dev.make_shards import write_shards

# directories of the stdlib tree that are not the library's own prose (or not the stdlib at all)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test", "ensurepip"}
LICENSE_DIR = "/usr/share/common-licenses"
MIN_STRING_CHARS = 200   # shorter string constants are mostly messages and format strings
MIN_COMMENT_CHARS = 80   # shorter comment blocks are mostly "# XXX" and commented-out code


def prose_ratio(text):
    """Fraction of characters that are letters, spaces or common punctuation: a cheap English-text test."""
    if not text:
        return 0.0
    good = sum(1 for c in text if c.isalpha() or c in " \n.,;:'\"()-")
    return good / len(text)


def split_long(text, max_chars):
    """Cut text into pieces of at most max_chars, preferring paragraph, then line, then word boundaries."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if all(len(p) <= max_chars for p in parts):
            current = ""
            for part in parts:
                candidate = part if not current else current + sep + part
                if len(candidate) <= max_chars:
                    current = candidate
                else:
                    pieces.append(current)
                    current = part
            pieces.append(current)
            return [p for p in pieces if p.strip()]
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def pack_sections(sections, max_chars):
    """Join consecutive sections (blank line between) into documents of at most max_chars each."""
    docs, current = [], ""
    for section in sections:
        for piece in split_long(section, max_chars):
            candidate = piece if not current else current + "\n\n" + piece
            if len(candidate) <= max_chars:
                current = candidate
            else:
                docs.append(current)
                current = piece
    if current:
        docs.append(current)
    return docs


def _signature(node):
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    return f"def {node.name}({ast.unparse(node.args)})"


def module_sections(source, module_name):
    """Prose from one module, in source order: docstrings (headed by the class/def line), long English
    string constants and comment blocks."""
    tree = ast.parse(source)
    found = []  # (line, text)
    docstring_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            docstring_nodes.add(id(node.body[0].value))
            if isinstance(node, ast.Module):
                found.append((0, f"Module {module_name}\n\n{doc}"))
            else:
                found.append((node.lineno, f"{_signature(node)}\n\n{doc}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstring_nodes
                and len(node.value) >= MIN_STRING_CHARS and prose_ratio(node.value) >= 0.85):
            found.append((node.lineno, node.value.strip("\n")))
    block, block_start = [], 0
    lines = source.decode("utf-8", errors="replace").splitlines() if isinstance(source, bytes) else source.splitlines()
    for lineno, line in enumerate(lines + [""], 1):
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            if not block:
                block_start = lineno
            block.append(stripped.lstrip("#").strip())
            continue
        if block:
            text = "\n".join(block).strip()
            if len(text) >= MIN_COMMENT_CHARS and prose_ratio(text) >= 0.85 and "coding:" not in text[:40]:
                found.append((block_start, text))
            block = []
    found.sort(key=lambda item: item[0])
    return [text for _, text in found]


def stdlib_documents(stdlib_dir, max_doc_chars, seen, log=print):
    """Documents from every module under stdlib_dir (sorted walk); files that do not parse are skipped."""
    docs, files, skipped = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, stdlib_dir)[:-3].replace(os.sep, ".")
            module_name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            try:
                with open(path, "rb") as f:
                    sections = module_sections(f.read(), module_name)
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
                skipped += 1
                continue
            files += 1
            docs.extend(_dedup(pack_sections(sections, max_doc_chars), seen))
    log(f"stdlib ({stdlib_dir}): {files} modules, {skipped} unparsable skipped, {len(docs)} documents")
    return docs


def license_documents(license_dir, max_doc_chars, seen, log=print):
    if not os.path.isdir(license_dir):
        log(f"licences: {license_dir} not present, skipped")
        return []
    docs, real_paths = [], set()
    for name in sorted(os.listdir(license_dir)):
        path = os.path.realpath(os.path.join(license_dir, name))
        if path in real_paths or not os.path.isfile(path):
            continue
        real_paths.add(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        docs.extend(_dedup(pack_sections([text.strip()], max_doc_chars), seen))
    log(f"licences ({license_dir}): {len(real_paths)} files, {len(docs)} documents")
    return docs


def arithmetic_documents(n, max_doc_chars, seed, seen, log=print):
    """n word problems with worked solutions from tasks.arithmetic's train split (all four difficulty
    presets in turn), as plain text, several to a document. Skipped when that module is missing."""
    if n <= 0:
        return []
    try:
        arithmetic = importlib.import_module("tasks.arithmetic")
    except ImportError as e:
        log(f"arithmetic: tasks.arithmetic not available ({e}), skipped")
        return []
    presets = sorted(arithmetic.DIFFICULTY_PRESETS)
    generators = [arithmetic.ArithmeticTask(split="train", size=n, difficulty=d, seed=seed) for d in presets]
    problems = []
    for i in range(n):
        example = generators[i % len(generators)].get_example(i // len(generators))
        question, answer = example["messages"][0]["content"], example["messages"][1]["content"]
        if not isinstance(answer, str):
            # the calculator calls are parts of their own; the text parts already read "6*35=210 cards."
            answer = "".join(part["text"] for part in answer if part["type"] == "text")
        problems.append(f"{question}\n{answer}")
    docs = _dedup(pack_sections(problems, max_doc_chars), seen)
    log(f"arithmetic (tasks.arithmetic, train split): {n} problems, {len(docs)} documents")
    return docs


def _dedup(docs, seen):
    out = []
    for doc in docs:
        key = hashlib.sha1(doc.encode("utf-8")).digest()
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def build_corpus(max_mb=20.0, max_doc_chars=1000, stdlib_dir=None, license_dir=LICENSE_DIR, arithmetic_problems=5000,
                 seed=42, log=print):
    """The corpus as a list of documents, at most max_mb megabytes of UTF-8 (a seeded random subset
    when the sources hold more)."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib_dir):
        raise FileNotFoundError(f"stdlib directory {stdlib_dir} does not exist")
    seen = set()
    docs = stdlib_documents(stdlib_dir, max_doc_chars, seen, log)
    docs += license_documents(license_dir, max_doc_chars, seen, log) if license_dir else []
    docs += arithmetic_documents(arithmetic_problems, max_doc_chars, seed, seen, log)
    random.Random(seed).shuffle(docs)
    budget = int(max_mb * 1e6)
    kept, size = [], 0
    for doc in docs:
        nbytes = len(doc.encode("utf-8"))
        if size + nbytes > budget:
            continue
        kept.append(doc)
        size += nbytes
    if len(kept) < len(docs):
        log(f"--max_mb {max_mb:g}: kept {len(kept)} of {len(docs)} documents")
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate an offline English pretraining corpus and write it as shards.")
    parser.add_argument("--out_dir", default=None, help="shard directory (default: the loader's, $NANOCHAT_DATA_DIR or <base dir>/base_data)")
    parser.add_argument("--max_mb", type=float, default=20.0, help="cap on the corpus size in MB of UTF-8 text (default 20)")
    parser.add_argument("--max_doc_chars", type=int, default=1000, help="longest document in characters (default 1000: about 250-330 tokens, so little is cropped at T>=256)")
    parser.add_argument("--val_frac", type=float, default=0.02, help="fraction of documents in the validation shard (default 0.02)")
    parser.add_argument("--chars_per_shard", type=int, default=1_000_000, help="characters per training shard (default 1M)")
    parser.add_argument("--row_group_size", type=int, default=256, help="documents per row group (default 256)")
    parser.add_argument("--arithmetic_problems", type=int, default=5000,
                        help="synthetic word problems from tasks.arithmetic, when it exists (default 5000)")
    parser.add_argument("--stdlib_dir", default=None, help="Python stdlib directory to read (default: this interpreter's)")
    parser.add_argument("--license_dir", default=LICENSE_DIR, help=f"licence texts directory, skipped if absent (default {LICENSE_DIR})")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out_dir")
    args = parser.parse_args(argv)
    if args.max_mb <= 0:
        parser.error("--max_mb must be > 0")
    if args.max_doc_chars < 100:
        parser.error("--max_doc_chars must be >= 100")
    if not 0 < args.val_frac < 1:
        parser.error("--val_frac must be in (0, 1)")
    out_dir = get_data_dir(args.out_dir)
    t0 = time.time()
    try:
        docs = build_corpus(args.max_mb, args.max_doc_chars, args.stdlib_dir, args.license_dir, args.arithmetic_problems, args.seed)
        if len(docs) < 2:
            raise ValueError(f"only {len(docs)} document(s) found; need at least 2 for a train and a val shard")
        val_docs = min(len(docs) - 1, max(1, round(args.val_frac * len(docs))))
        paths = write_shards(docs, out_dir, chars_per_shard=args.chars_per_shard, row_group_size=args.row_group_size,
                             val_docs=val_docs, shuffle_seed=args.seed, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    disk_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"corpus: {len(docs)} documents, {text_mb:.2f} MB of text, {len(paths)} shards ({disk_mb:.2f} MB on disk, "
          f"{val_docs} val documents) in {out_dir}, {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
