"""
A same-seed co-training run at toy size whose logged records and final weights can be compared across
commits: the behaviour check used when chat_cotrain was restructured (issue "Readable in one pass").

Tiny random checkpoints (d2 generator, d1 verifier, the test suite's tokenizer) run 1 verifier warm-up step,
then G V G, with evaluations at the start and the end. A random model never solves a problem and never
writes a parsable verification, so every path would carry zeros: the outcome reward is made text-dependent
and the verifier's reading is replaced by a stand-in that depends on the text, so rewards, process signals,
alignment and both updates all carry signal.

    python -m dev.cotrain_same_seed --out /tmp/a.json                    # on one commit
    python -m dev.cotrain_same_seed --out /tmp/b.json -- --mix reward    # extra chat_cotrain flags after --
    python -m dev.cotrain_same_seed --compare /tmp/a.json /tmp/b.json
"""

import argparse
import json
import os
import sys
import tempfile
import zlib

TINY = ["--task", "arithmetic", "--gen_tag", "d2", "--ver_tag", "d1", "--examples_per_step", "2", "--num_samples", "3",
        "--gen_max_tokens", "16", "--ver_max_tokens", "16", "--ver_examples_per_step", "2", "--ver_solutions", "2",
        "--ver_samples", "2", "--device_batch_size", "4", "--eval_examples", "3", "--ver_eval_examples", "3",
        "--eval_samples", "2", "--eval_every", "0", "--save_every", "0", "--device_type", "cpu",
        "--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1", "--alpha", "0.3",
        "--seed", "5"]


def run(out_path, extra):
    import torch
    torch.set_num_threads(1)
    os.environ["WANDB_MODE"] = "disabled"
    base = tempfile.mkdtemp(prefix="cotrain_same_seed_")
    os.environ["NANOCHAT_BASE_DIR"] = base
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from conftest import TINY_CORPUS, TINY_VOCAB_SIZE, make_tiny_checkpoint
    from nanochat.tokenizer import Tokenizer, save_token_bytes
    tokenizer = Tokenizer.train_from_iterator(iter(TINY_CORPUS), TINY_VOCAB_SIZE)
    tokenizer.save(os.path.join(base, "tokenizer"))
    save_token_bytes(tokenizer, os.path.join(base, "tokenizer"))
    make_tiny_checkpoint(base, "chatsft_checkpoints", "d2", 2, tokenizer.get_vocab_size(), seed=1)
    make_tiny_checkpoint(base, "chatsft_checkpoints", "d1", 1, tokenizer.get_vocab_size(), seed=2)

    from tasks import verify
    from tasks.arithmetic import ArithmeticTask
    ArithmeticTask.reward = lambda self, conversation, text: float(len(text) % 3) / 2
    real_parse = verify.parse_verification

    def stand_in_reading(text):
        h = zlib.crc32(text.encode())
        lines = [f"Step {i + 1}: x → {'Correct' if (h >> i) & 1 else 'Incorrect'}" for i in range(h % 4)]
        lines.append(f"Overall: {'Correct' if (h >> 8) & 1 else 'Incorrect'}" if h % 5 else "junk")
        return real_parse("\n".join(lines))

    verify.parse_verification = stand_in_reading
    import scripts.chat_cotrain as cotrain
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint
    history = cotrain.main(TINY + extra)
    directory = os.path.join(base, "cotrain_checkpoints", "g2_v1")
    data, _, _ = load_checkpoint(directory, find_last_step(directory), "cpu")
    checksums = {role: sum(t.double().sum().item() * (i + 1) for i, t in enumerate(data[role].values())) for role in data}
    keep = lambda record: {k: v for k, v in record.items() if "time" not in k}
    with open(out_path, "w") as f:
        json.dump({"gen": [keep(r) for r in history["gen"]], "ver": [keep(r) for r in history["ver"]],
                   "eval": history["eval"], "checksums": checksums}, f, indent=1, sort_keys=True)
    print(f"wrote {out_path}: weight checksums {checksums}")


def compare(a_path, b_path):
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    print("final weights identical:", a["checksums"] == b["checksums"])
    for section in ("gen", "ver", "eval"):
        for i, (ra, rb) in enumerate(zip(a[section], b[section])):
            for key in sorted(set(ra) | set(rb)):
                if key not in rb or key not in ra:
                    print(f"  {section}[{i}].{key}: only in {'the first' if key in ra else 'the second'}")
                elif ra[key] != rb[key]:
                    print(f"  {section}[{i}].{key}: {ra[key]} -> {rb[key]}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(description="A same-seed toy co-training run to compare across commits")
    p.add_argument("--out", help="where to write the records and weight checksums (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two such files")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out FILE (or --compare A B)")
    run(args.out, extra)


if __name__ == "__main__":
    main()
