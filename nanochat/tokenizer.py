"""
The tokenizer: a GPT-4-style byte-level BPE trained by our Rust extension (nanochat.rustbpe) and run
by tiktoken for fast encoding, plus the chat format (special tokens, rendering of conversations into
token ids with a training mask).

Typical use:

    tok = Tokenizer.train_from_iterator(texts, vocab_size=32768)   # or get_tokenizer()
    tok.save(directory)
    ids = tok.encode("hello", prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})
"""

import base64
import copy
import json
import os

import tiktoken

from nanochat.common import get_base_dir, get_logger

# The chat format's special tokens. They sit after the mergeable ranks, so the vocab_size given to
# training includes them. Plain text never encodes to them (we only use encode_ordinary).
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; doubles as the document separator in pretraining
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, written by the harness, not the model
    "<|output_end|>",
]

# GPT-4's split pattern, except that numbers split into groups of at most 2 digits rather than 3:
# a smaller vocabulary spends fewer ids on 3-digit numbers and the model sees digits more uniformly.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
_FORMAT_VERSION = 1


class Tokenizer:
    """A tiktoken Encoding with the chat special tokens, plus chat rendering."""

    def __init__(self, enc):
        missing = [name for name in SPECIAL_TOKENS if name not in enc.special_tokens_set]
        if missing:
            raise ValueError(f"tiktoken encoding lacks the special tokens {missing}")
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self.bos_token_id = self._special_ids["<|bos|>"]
        self.train_stats = {}  # timings and sizes from the trainer, when this tokenizer was just trained
        self._token_texts = None  # token_texts(), made on first use

    # ---------------------------------------------------------------- construction and storage

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=None):
        """Train a BPE on the strings yielded by text_iterator. vocab_size counts the special tokens."""
        from nanochat import rustbpe
        num_regular = vocab_size - len(SPECIAL_TOKENS)
        if num_regular <= 256:
            raise ValueError(f"vocab_size must exceed 256 + {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_regular, pattern=pattern or SPLIT_PATTERN)
        if trainer.vocab_size < num_regular:
            get_logger().warning(f"the training text ran out of pairs to merge: vocab_size is "
                                 f"{trainer.vocab_size + len(SPECIAL_TOKENS)}, not {vocab_size}")
        tokenizer = cls._from_parts(trainer.get_pattern(), dict(trainer.get_mergeable_ranks()))
        tokenizer.train_stats = dict(trainer.get_train_stats())
        return tokenizer

    @classmethod
    def _from_parts(cls, pattern, mergeable_ranks):
        offset = len(mergeable_ranks)
        special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special)
        return cls(enc)

    def save(self, directory):
        """Write the tokenizer as one JSON file (pattern, ranked token bytes, special tokens).

        JSON rather than a pickle: it loads without executing anything and survives tiktoken upgrades."""
        os.makedirs(directory, exist_ok=True)
        n_regular = self.bos_token_id  # the special tokens follow the regular ones
        tokens = [base64.b64encode(self.enc.decode_single_token_bytes(i)).decode("ascii") for i in range(n_regular)]
        payload = {"format_version": _FORMAT_VERSION, "pattern": self.get_pattern(),
                   "mergeable_ranks_b64": tokens, "special_tokens": SPECIAL_TOKENS}
        path = os.path.join(directory, TOKENIZER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)  # a crash mid-write never leaves a half-written tokenizer behind
        return path

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `python -m scripts.tok_train`")
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            if payload.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"unsupported format_version {payload.get('format_version')!r}")
            if payload["special_tokens"] != SPECIAL_TOKENS:
                raise ValueError(f"special tokens {payload['special_tokens']} differ from this code's {SPECIAL_TOKENS}")
            ranks = {base64.b64decode(t): rank for rank, t in enumerate(payload["mergeable_ranks_b64"])}
            if len(ranks) != len(payload["mergeable_ranks_b64"]):
                raise ValueError("duplicate tokens in mergeable_ranks")
            return cls._from_parts(payload["pattern"], ranks)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt tokenizer file {path}: {e}") from e

    # ---------------------------------------------------------------- vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def get_pattern(self):
        return self.enc._pat_str

    def encode_special(self, name):
        if name not in self._special_ids:
            raise ValueError(f"{name!r} is not a special token; those are {SPECIAL_TOKENS}")
        return self._special_ids[name]

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def token_byte_lengths(self):
        """Byte length of every token id, 0 for special tokens (the denominator of bits-per-byte).

        Taken from the raw token bytes: decoding to str first would mangle tokens that are not
        valid UTF-8 on their own (partial characters) and give them the wrong length."""
        n_regular = self.bos_token_id
        lengths = [len(self.enc.decode_single_token_bytes(i)) for i in range(n_regular)]
        return lengths + [0] * (self.get_vocab_size() - n_regular)

    # ---------------------------------------------------------------- encoding and decoding

    def _as_id(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"expected a special-token name or a token id in [0, {self.get_vocab_size()}), got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists), never producing
        special tokens from the text itself. prepend/append: a special-token name or an id."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [head + row + tail for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def token_texts(self):
        """Per id, the token's text where its bytes are UTF-8 on their own, else None (part of a character):
        made once, for callers that read tokens one at a time (grpo.token_pieces, on every sample)."""
        if self._token_texts is None:
            texts = []
            for i in range(self.get_vocab_size()):
                try:
                    texts.append(self.enc.decode_single_token_bytes(i).decode("utf-8"))
                except UnicodeDecodeError:
                    texts.append(None)
            self._token_texts = texts
        return self._token_texts

    # ---------------------------------------------------------------- chat

    def _checked_messages(self, conversation):
        """The messages with a leading system message folded into the first user message, after
        checking that roles then alternate user, assistant, user, ..."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise ValueError('a conversation is a dict {"messages": [...]}')
        messages = conversation["messages"]
        if not messages:
            raise ValueError("the conversation has no messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            system, user = messages[0]["content"], messages[1]["content"]
            if not isinstance(system, str) or not isinstance(user, str):
                raise ValueError("system and user message contents must be strings")
            messages = [{"role": "user", "content": system + "\n\n" + user}] + list(messages[2:])
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} (after folding any system message) has role {message['role']!r}; "
                                 f"roles must alternate user/assistant starting with user")
        return messages

    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids of a chat plus a same-length mask: 1 on the tokens the assistant is trained to
        produce (its text, its tool calls and <|assistant_end|>), 0 elsewhere (prompt, tool output).
        Both lists are cut to max_tokens (None: no cut)."""
        ids, mask = [], []

        def add(token_ids, trained):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([int(trained)] * len(token_ids))

        s = self._special_ids
        add(self.bos_token_id, 0)
        for i, message in enumerate(self._checked_messages(conversation)):
            content = message["content"]
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} content must be a string, got {type(content).__name__}")
                add(s["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(s["<|user_end|>"], 0)
                continue
            add(s["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                        raise ValueError(f"assistant message {i}: each part needs a string 'text', got {part!r}")
                    kind, text = part.get("type"), part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add(s["<|python_start|>"], 1)
                        add(self.encode(text), 1)
                        add(s["<|python_end|>"], 1)
                    elif kind == "python_output":
                        # written by the tool at inference time, so never a training target
                        add(s["<|output_start|>"], 0)
                        add(self.encode(text), 0)
                        add(s["<|output_end|>"], 0)
                    else:
                        raise ValueError(f"assistant message {i}: unknown part type {kind!r} "
                                         f"(expected text, python or python_output)")
            else:
                raise ValueError(f"assistant message {i} content must be a string or a list of parts")
            add(s["<|assistant_end|>"], 1)
        if max_tokens is not None:
            if max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """The prompt for sampling the assistant's next reply: the conversation without its final
        assistant message (if any), followed by <|assistant_start|>."""
        conversation = copy.deepcopy(conversation)
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self._special_ids["<|assistant_start|>"]]

    def visualize_tokenization(self, ids, mask, color=True):
        """One line showing every token and whether it is trained on: green = mask 1, grey = mask 0
        (with color=False: [trained] and (not trained) brackets). Tokens are separated by '|'."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
        pieces = []
        for token_id, m in zip(ids, mask):
            text = self.decode_bytes([token_id]).decode("utf-8", errors="replace")
            text = text.replace("\n", "\\n").replace("\t", "\\t")
            if color:
                pieces.append(f"\033[{'92' if m else '90'}m{text}\033[0m")
            else:
                pieces.append(f"[{text}]" if m else f"({text})")
        return "|".join(pieces)


# -------------------------------------------------------------------- the trained tokenizer on disk

def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return Tokenizer.from_directory(get_tokenizer_dir())


def token_bytes_tensor(tokenizer):
    """int32 tensor: byte length of each token id, 0 for special tokens (what token_bytes.pt holds)."""
    import torch
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32)


def save_token_bytes(tokenizer, directory):
    import torch
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKEN_BYTES_FILE)
    torch.save(token_bytes_tensor(tokenizer), path)
    return path


def get_token_bytes(device="cpu"):
    import torch
    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TOKEN_BYTES_FILE} at {path}; train a tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device)
