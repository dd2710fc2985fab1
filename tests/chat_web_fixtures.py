"""
Helpers for the chat_web tests: a tiny chat model that never stops talking, a tmp NANOCHAT_BASE_DIR holding
it as an SFT checkpoint plus the tokenizer, and two ways to run the server on 127.0.0.1 with a free port:
in this process (uvicorn in a thread, so tests can look at the workers) or as a real
`python -m scripts.chat_web` process, stopped by its own PID.
"""

import os
import sys
import copy
import json
import time
import socket
import signal
import threading
import subprocess
from dataclasses import asdict

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_TAG = "d2"


def make_babbler(tokenizer, sequence_len=4096, stop_logit=-15.0, seed=0):
    """A small random GPT whose replies depend on the context but (with the default stop_logit) never end
    on their own, so tests control reply length through max_tokens and can stop long replies midway.

    How: residual dimension 0 carries the same constant for every token and no block writes to it, so after
    the final norm it is a large positive number; the stop tokens' unembedding rows read only that
    dimension, which pins their logit near the soft cap (stop_logit -15: about -14.5, never sampled; +15: stop at once). Every other
    weight is random, and the other special tokens are pinned low so no tool calls happen."""
    from nanochat.gpt import GPT, GPTConfig
    vocab_size = tokenizer.get_vocab_size()
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the same seed gives the same weights, without touching the global RNG
        torch.manual_seed(seed)
        model = GPT(config)
        model.init_weights()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.copy_(torch.randn(wte.shape, generator=generator))
        wte[:, 0] = 4.0
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.copy_(0.05 * torch.randn(proj.weight.shape, generator=generator))
                proj.weight[0, :] = 0.0  # nobody writes to the constant dimension
        head = model.lm_head.weight
        head.copy_(0.2 * torch.randn(head.shape, generator=generator))
        head[:, 0] = 0.0
        # after the final norm, dimension 0 is about 2 (measured), so these rows give logits of about
        # 15 * tanh(2 * w / 15) once soft-capped (w = -15: -14.5), against about N(0, 2) for ordinary tokens
        for name in tokenizer.get_special_tokens():
            row = tokenizer.encode_special(name)
            head[row, :] = 0.0
            head[row, 0] = -10.0
        for row in (tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")):
            head[row, 0] = stop_logit
    model.eval()
    return model


def make_workers(tokenizer, num_workers=1, verifier=False, **babbler_kwargs):
    """In-process workers: one replica of the same babbler each (and a verifier babbler if asked)."""
    from nanochat.engine import Engine
    from scripts.chat_web import Worker
    model = make_babbler(tokenizer, **babbler_kwargs)
    verifier_model = make_babbler(tokenizer, seed=1) if verifier else None
    workers = []
    for i in range(num_workers):
        verifier_engine = Engine(copy.deepcopy(verifier_model), tokenizer) if verifier else None
        workers.append(Worker(i, Engine(copy.deepcopy(model), tokenizer), "cpu", verifier_engine))
    return workers


def write_base_dir(base_dir, tokenizer, step=10, user_config=None, **babbler_kwargs):
    """A NANOCHAT_BASE_DIR with tokenizer/ and chatsft_checkpoints/<MODEL_TAG>/ holding the babbler.
    user_config: the training flags to record in the checkpoint's meta (as chat_sft does)."""
    from nanochat.checkpoint_manager import save_checkpoint, CHECKPOINT_DIRS
    from nanochat.tokenizer import save_token_bytes
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tokenizer_dir)
    save_token_bytes(tokenizer, tokenizer_dir)
    model = make_babbler(tokenizer, **babbler_kwargs)
    checkpoint_dir = os.path.join(base_dir, CHECKPOINT_DIRS["sft"], MODEL_TAG)
    meta = {"model_config": asdict(model.config)}
    if user_config is not None:
        meta["user_config"] = user_config
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return base_dir


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url, timeout, is_alive=lambda: True, log=lambda: ""):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive():
            raise RuntimeError(f"the server exited before it was ready:\n{log()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} was not ready after {timeout} s:\n{log()}")


class InProcessServer:
    """uvicorn serving `app` from a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, app):
        import uvicorn
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for_health(self.url, 30, is_alive=self.thread.is_alive)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def pool(self):
        return self.app.state.pool


class ServerProcess:
    """A real `python -m scripts.chat_web` process; stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, base_dir, *extra_args, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base_dir, f"chat_web_{self.port}.log")
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1")  # a test server shares 2 cores with the tests
        self.command = [sys.executable, "-m", "scripts.chat_web", "--host", "127.0.0.1", "--port", str(self.port),
                        "--device_type", "cpu", *extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def wait_ready(self, timeout=60):
        wait_for_health(self.url, timeout, is_alive=lambda: self.proc.poll() is None, log=self.log)
        return self

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self):
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def rss_kb(pid, field="VmRSS"):
    """A process's resident memory (VmRSS) or its peak so far (VmHWM), in kB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def read_sse(response):
    """The JSON events of a server-sent-event response (httpx streaming response), in order.
    `data: [DONE]` is returned as the string "[DONE]". Checks every line is well-formed SSE."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
