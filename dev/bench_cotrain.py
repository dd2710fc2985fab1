"""
Cost of co-training's generator step against a plain GRPO step on the same batch, in one process.

Both arms run scripts.chat_cotrain with the same seed (so the same questions and, since the generator
starts from the same weights, the same samples): one with `--alpha 0 --no_verifier` (the baseline
step), one with the verifier judging every sample. Models have random weights, so every sample and every
verification runs to its token limit: the worst case. Prints the split into generate / verify / train, and of
generate and verify into the Engine's prefill, its decoding and the host work around it, with the seconds of CUDA
graph captures within the first two (what --keep_graphs would save where shapes repeat).

    python -m dev.bench_cotrain                         # CPU toy size: generator d4, verifier d2
    python -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 --samples 16
"""

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, config_from_depth


def make_base_dir(args):
    from nanochat.tokenizer import Tokenizer, save_token_bytes
    base = tempfile.mkdtemp(prefix="bench_cotrain_")
    if args.tokenizer_dir:  # e.g. on a GPU box whose Python has no build of our Rust trainer
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    else:
        # a tokenizer trained on the arithmetic task's own text: enough for realistic token counts
        from tasks.arithmetic import ArithmeticTask
        task = ArithmeticTask(split="train", size=2000)
        texts = [task.get_labelled_solution(i)["question"] + "\n" + task.get_labelled_solution(i)["solution"] for i in range(2000)]
        tokenizer = Tokenizer.train_from_iterator(iter(texts), args.vocab_size)
    tokenizer.save(os.path.join(base, "tokenizer"))
    save_token_bytes(tokenizer, os.path.join(base, "tokenizer"))
    for depth in {args.depth_g, args.depth_v}:
        config = config_from_depth(depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=1024, head_dim=64)
        torch.manual_seed(depth)
        model = GPT(config)
        model.init_weights()
        save_checkpoint(os.path.join(base, "chatsft_checkpoints", f"d{depth}"), 0, model.state_dict(), None,
                        {"model_config": asdict(config)})
    return base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth_g", type=int, default=4)
    p.add_argument("--depth_v", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--questions", type=int, default=4, help="questions per generator step")
    p.add_argument("--samples", type=int, default=8, help="K samples per question")
    p.add_argument("--gen_tokens", type=int, default=64)
    p.add_argument("--ver_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="generator steps timed (the first is a warm-up)")
    p.add_argument("--device_type", default="cpu")
    p.add_argument("--tokenizer_dir", default=None, help="load a saved tokenizer instead of training one")
    p.add_argument("--cotrain_args", default="", help="more chat_cotrain flags for both arms, one string: "
                   "--cotrain_args=--offload_frozen (with '=': a lone flag would be read as bench_cotrain's own)")
    args = p.parse_args()
    os.environ["NANOCHAT_BASE_DIR"] = make_base_dir(args)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from scripts.chat_cotrain import main as cotrain
    common = ["--task", "arithmetic", "--gen_tag", f"d{args.depth_g}", "--ver_tag", f"d{args.depth_v}",
              "--examples_per_step", str(args.questions), "--num_samples", str(args.samples),
              "--gen_max_tokens", str(args.gen_tokens), "--ver_max_tokens", str(args.ver_tokens),
              "--num_gen_steps", str(args.steps), "--gen_steps", str(args.steps), "--verifier_warmup_steps", "0",
              "--eval_examples", "0", "--ver_eval_examples", "0", "--eval_every", "0", "--save_every", "0",
              "--device_batch_size", "16", "--device_type", args.device_type, "--stop_after", str(args.steps)]
    common += args.cotrain_args.split()
    if args.device_type == "cuda":
        common.append("--print_memory")  # estimates next to what CUDA reports
    results, splits = {}, {}
    for name, extra in (("baseline GRPO step", ["--alpha", "0", "--no_verifier", "--output_tag", "bench_base"]),
                        ("co-training generator step", ["--alpha", "0.1", "--output_tag", "bench_co"])):
        t0 = time.time()
        history = cotrain(common + extra)
        rows = history["gen"][1:] or history["gen"]  # drop the warm-up step
        results[name] = {k: statistics.fmean(r[f"gen/time_{k}"] for r in rows) for k in ("generate", "verify", "train")}
        splits[name] = {f"{phase}_{part}": statistics.fmean(r.get(f"gen/time_{phase}_{part}", 0.0) for r in rows)
                        for phase in ("generate", "verify") for part in ("prefill", "decode", "capture")}
        print(f"{name}: {time.time() - t0:.1f}s for {len(history['gen'])} steps")
    anchor = sum(results["baseline GRPO step"].values())
    print(f"\ngenerator d{args.depth_g}, verifier d{args.depth_v}, {args.questions} questions x {args.samples} samples, "
          f"{args.gen_tokens} generated / {args.ver_tokens} verification tokens at most, device {args.device_type}")
    print(f"{'step':<28}{'generate':>10}{'verify':>10}{'train':>10}{'total':>10}{'vs baseline':>13}")
    for name, t in results.items():
        total = sum(t.values())
        print(f"{name:<28}{t['generate']:>9.2f}s{t['verify']:>9.2f}s{t['train']:>9.2f}s{total:>9.2f}s{total / anchor:>12.2f}x")
    print("\nwhere generate and verify go (Engine.time_spent: to the first column / after it, of which CUDA graph "
          "captures; the rest is host work around the Engine: prompts, rewards, parsing judgements)")
    for name, split in splits.items():
        parts = []
        for phase in ("generate", "verify"):
            prefill, decode = split[f"{phase}_prefill"], split[f"{phase}_decode"]
            if prefill + decode > 0:  # the baseline has no verifier
                parts.append(f"{phase} {results[name][phase]:.2f}s = prefill {prefill:.2f} + decode {decode:.2f} + "
                             f"other {results[name][phase] - prefill - decode:.2f} (captures "
                             f"{split[f'{phase}_capture']:.2f})")
        print(f"  {name}: " + "; ".join(parts))
    if args.device_type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
