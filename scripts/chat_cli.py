"""
Chat with a trained model in the terminal.

    python -m scripts.chat_cli                        # interactive, latest SFT checkpoint
    python -m scripts.chat_cli --source rl -p "What is 12*7?"   # one question, then exit

Type `quit` or `exit` (or Ctrl-D / Ctrl-C) to leave and `clear` to start a new conversation. Replies
stream as they are sampled; when the conversation outgrows the model's context, its oldest turns are
dropped (with a notice).
"""

import argparse
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserInputError, compute_init, run_stage
from nanochat.engine import Engine, TextStream, fit_to_context

CHAT_SOURCES = ["base", "mid", "sft", "rl", "cotrain"]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a nanochat checkpoint in the terminal.")
    parser.add_argument("--source", default="sft", choices=CHAT_SOURCES, help="which training stage's checkpoint to load")
    parser.add_argument("--model_tag", default=None, help="model directory, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-p", "--prompt", default=None, help="ask this one question, print the reply and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--max_tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (each turn adds its index)")
    parser.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        raise UserInputError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserInputError(f"--top_k must be >= 0, got {args.top_k}")
    if args.max_tokens < 1:
        raise UserInputError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    return args


class Chat:
    """One conversation as a growing list of tokens in the chat format."""

    def __init__(self, engine, tokenizer, sequence_len, max_tokens, temperature, top_k, seed):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_tokens = max_tokens
        self.prompt_budget = sequence_len - max_tokens  # the reply must fit in the context too
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.turns = 0
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def reply(self, message, out=None, err=None):
        """Add the user's message, stream the assistant's reply to `out` (stdout), return the reply text."""
        out, err = out or sys.stdout, err or sys.stderr
        self.tokens += [self.user_start] + self.tokenizer.encode(message) + [self.user_end, self.assistant_start]
        self.tokens, dropped = fit_to_context(self.tokens, self.prompt_budget, self.user_start)
        if dropped:
            print(f"[context full: dropped the oldest {dropped} tokens to fit the model's "
                  f"{self.prompt_budget + self.max_tokens}-token context]", file=err, flush=True)
        stream = TextStream(self.tokenizer)
        reply_tokens = []
        generator = self.engine.generate(self.tokens, num_samples=1, max_tokens=self.max_tokens,
                                         temperature=self.temperature, top_k=self.top_k, seed=self.seed + self.turns)
        self.turns += 1
        for column, _ in generator:
            token = column[0]
            if token in self.engine.stop_tokens:
                break
            reply_tokens.append(token)
            out.write(stream.push(token))
            out.flush()
        out.write(stream.flush())
        out.flush()
        # a reply cut off at max_tokens (or ended by <|bos|>) is still closed the way the model was trained on
        self.tokens += reply_tokens + [self.assistant_end]
        return self.tokenizer.decode(reply_tokens)


def main(argv=None):
    """Chat until the user leaves; returns the Chat (its .turns counts the replies)."""
    args = get_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        # a damaged checkpoint (RuntimeError, KeyError from the state dict) is the user's to fix too: one line
        raise UserInputError(f"cannot load the {args.source} model: {e}") from e
    sequence_len = model.config.sequence_len
    max_tokens = args.max_tokens
    if max_tokens > sequence_len // 2:
        max_tokens = max(1, sequence_len // 2)
        print(f"[--max_tokens {args.max_tokens} capped to {max_tokens}: the model's context is {sequence_len} tokens]",
              file=sys.stderr)
    engine = Engine(model, tokenizer, keep_graphs=True)  # on CUDA a reply of a repeated shape skips the graph capture
    chat = Chat(engine, tokenizer, sequence_len, max_tokens, args.temperature, args.top_k, args.seed)

    try:
        if args.prompt is not None:
            print("Assistant: ", end="", flush=True)
            chat.reply(args.prompt)
            print()
            return chat
        print(f"nanochat chat ({args.source} model, step {meta.get('step')}). "
              f"Type 'quit' or 'exit' to leave, 'clear' to start over.")
        while True:
            try:
                message = input("\nUser: ").strip()
            except EOFError:
                print()
                return chat
            if message.lower() in ("quit", "exit"):
                return chat
            if message.lower() == "clear":
                chat.clear()
                print("[conversation cleared]")
                continue
            if not message:
                continue
            print("\nAssistant: ", end="", flush=True)
            chat.reply(message)
            print()
    except KeyboardInterrupt:
        print()
        return chat


if __name__ == "__main__":
    run_stage(main)
