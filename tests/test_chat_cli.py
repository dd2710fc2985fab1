"""Tests of scripts/chat_cli.py against a tiny checkpoint written into a temporary NANOCHAT_BASE_DIR."""

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.common import UserInputError
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from scripts import chat_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQUENCE_LEN = 64


@pytest.fixture(scope="module")
def chat_base_dir(tiny_tokenizer, tmp_path_factory):
    """A base dir holding the tiny tokenizer and a random tiny model saved as the SFT checkpoint d1, step 5."""
    base_dir = tmp_path_factory.mktemp("chat_base")
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    config = GPTConfig(sequence_len=SEQUENCE_LEN, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                       n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # zeroed output projections would make every reply the same token
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d1"), 5, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config)})
    return base_dir


@pytest.fixture
def in_base_dir(chat_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chat_base_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield chat_base_dir
    torch.set_num_threads(threads)


@contextlib.contextmanager
def loggers_to_current_stderr():
    """The nanochat loggers keep the sys.stderr of their creation, which may be an earlier test's capture."""
    handlers = [h for name, lg in logging.root.manager.loggerDict.items() if name.startswith("nanochat")
                and isinstance(lg, logging.Logger) for h in lg.handlers if isinstance(h, logging.StreamHandler)]
    old_streams = [h.stream for h in handlers]
    for h in handlers:
        h.stream = sys.stderr  # not setStream(): that flushes the old, possibly closed, stream
    try:
        yield
    finally:
        for h, stream in zip(handlers, old_streams):
            h.stream = stream


def greedy_completion(tokenizer, prompt_tokens, max_tokens):
    """The oracle: the tokens the engine samples greedily after these prompt tokens."""
    model, _, _ = load_model("sft", "cpu")
    (completion, _), = Engine(model, tokenizer).generate_prompts([prompt_tokens], max_tokens=max_tokens,
                                                                 temperature=0.0)
    return completion


def greedy_reply(tokenizer, message, max_tokens):
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": message}]})
    return tokenizer.decode(greedy_completion(tokenizer, prompt, max_tokens))


def test_one_shot_prompt_in_a_subprocess(in_base_dir, tiny_tokenizer):
    expected = greedy_reply(tiny_tokenizer, "hi", max_tokens=12)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(in_base_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--source", "sft", "-p", "hi", "--temperature", "0",
                           "--max_tokens", "12", "--device_type", "cpu"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Assistant: {expected}\n"
    assert expected.strip()  # the random model said something


def run_main(monkeypatch, capsys, lines, *argv):
    """Run chat_cli.main in-process with `lines` typed at the prompt (then Ctrl-D)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            line = next(feed)
        except StopIteration:
            raise EOFError
        if isinstance(line, BaseException):
            raise line
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    with loggers_to_current_stderr():
        chat = chat_cli.main(["--device_type", "cpu", "--temperature", "0", "--max_tokens", "10", *argv])
    captured = capsys.readouterr()
    return chat, captured.out, captured.err


def replies(out):
    return [chunk.split("\n\nUser: ")[0].rstrip("\n") for chunk in out.split("Assistant: ")[1:]]


def test_interactive_turns_clear_and_ctrl_d(in_base_dir, tiny_tokenizer, monkeypatch, capsys):
    chat, out, err = run_main(monkeypatch, capsys, ["hi", "", "what is 2+2?", "clear", "hi"])
    assert chat.turns == 3, err
    assert chat.engine.keep_graphs  # on CUDA a reply of a repeated shape skips the graph capture
    first, second, after_clear = replies(out)
    # the second turn sees the first one's exact tokens (re-encoding its text could differ)
    tok = tiny_tokenizer
    s = tok.encode_special
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    first_tokens = greedy_completion(tok, prompt, 10)
    assert first == tok.decode(first_tokens)
    prompt += first_tokens + [s("<|assistant_end|>"), s("<|user_start|>")] + tok.encode("what is 2+2?") \
        + [s("<|user_end|>"), s("<|assistant_start|>")]
    assert second == tok.decode(greedy_completion(tok, prompt, 10))
    assert after_clear == first  # clear starts a fresh conversation
    assert "[conversation cleared]" in out


@pytest.mark.parametrize("ending", ["quit", "exit", KeyboardInterrupt()])
def test_quit_exit_and_ctrl_c_leave_cleanly(in_base_dir, monkeypatch, capsys, ending):
    chat, out, err = run_main(monkeypatch, capsys, ["hi", ending, "never read"])
    assert chat.turns == 1 and len(replies(out)) == 1
    assert "Traceback" not in err


def test_long_conversation_is_truncated_with_a_notice(in_base_dir, monkeypatch, capsys):
    message = "the river ran past the old mill " * 4
    chat, out, err = run_main(monkeypatch, capsys, [message, message, message])
    assert chat.turns == 3
    assert len(replies(out)) == 3
    assert "dropped the oldest" in err and f"{SEQUENCE_LEN}-token context" in err


def test_max_tokens_is_capped_to_fit_the_context(in_base_dir, monkeypatch, capsys):
    chat, out, err = run_main(monkeypatch, capsys, [], "--max_tokens", "500", "-p", "hi")
    assert chat.turns == 1 and "capped to 32" in err and out.startswith("Assistant: ")


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with loggers_to_current_stderr():
        with pytest.raises(UserInputError, match="cannot load the rl model.*chatrl_checkpoints"):
            chat_cli.main(["--device_type", "cpu", "--source", "rl", "-p", "hi"])


def test_bad_flags_are_rejected():
    for argv in (["--temperature", "-1"], ["--top_k", "-3"], ["--max_tokens", "0"]):
        with pytest.raises(UserInputError):
            chat_cli.get_args(argv)
    with pytest.raises(SystemExit) as exit_info:  # a value outside the choices is argparse's own usage error
        chat_cli.get_args(["--source", "nope"])
    assert exit_info.value.code == 2
