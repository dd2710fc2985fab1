"""
Tests for scripts/mid_train.py and the packing half of nanochat/chat_data.py: packed rows against a
concatenation oracle, exact resume of the packed stream, the assistant-only loss option, rank
striding, and the script (a few steps on a tiny fixture, checkpoints, resume, one-epoch stop).
Also dev/gen_synthetic_data.py, which writes the identity conversations mid-training uses, run against
a stub OpenAI-compatible server started in the test.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanochat.chat_data import muon_momentum, packed_batches
from tasks.by_name import make_mixture
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, make_base_dir

IDENTITY = os.path.join(FIXTURE_DIR, "identity.jsonl")


def _stream(task, tokenizer, rank=0, world_size=1, count=None):
    """Oracle: this rank's conversations rendered and concatenated (ids, mask), over repeated epochs."""
    ids, mask = [], []
    position = 0
    while count is None or position < count:
        g = rank + position * world_size
        if count is None and g >= len(task):
            break
        i, m = tokenizer.render_conversation(task[g % len(task)], max_tokens=None)
        ids += i
        mask += m
        position += 1
    return ids, mask


def test_packed_rows_match_the_concatenated_stream(tiny_tokenizer):
    task, _ = make_mixture("identity|arithmetic:12", "train", identity_file=IDENTITY)
    B, T = 2, 16
    ids, mask = _stream(task, tiny_tokenizer, count=3 * len(task))
    batches = packed_batches(task, tiny_tokenizer, B, T)
    for k in range(12):  # more than one epoch of the 20 conversations
        x, y, state = next(batches)
        start = k * B * T
        assert x.flatten().tolist() == ids[start:start + B * T]
        assert y.flatten().tolist() == ids[start + 1:start + B * T + 1]
        assert set(state) == {"position", "skip", "epoch"}
    # loss on assistant tokens only: targets are -1 exactly where the target token's mask is 0
    masked = packed_batches(task, tiny_tokenizer, B, T, loss_on="assistant")
    ys = torch.cat([next(masked)[1].flatten() for _ in range(6)])
    expected = [t if m else -1 for t, m in zip(ids[1:6 * B * T + 1], mask[1:6 * B * T + 1])]
    assert ys.tolist() == expected
    assert (ys == -1).any() and (ys >= 0).any()
    with pytest.raises(ValueError):
        next(packed_batches(task, tiny_tokenizer, B, T, loss_on="user"))


def test_packed_resume_is_exact(tiny_tokenizer):
    task, _ = make_mixture("arithmetic:9", "train")
    B, T = 3, 11  # rows that cut conversations at odd places
    reference = list(zip(range(10), packed_batches(task, tiny_tokenizer, B, T)))
    for k in (0, 3, 6):
        state = reference[k][1][2]
        resumed = packed_batches(task, tiny_tokenizer, B, T, resume_state=state)
        for j in range(k + 1, 10):
            x, y, s = next(resumed)
            assert torch.equal(x, reference[j][1][0]) and torch.equal(y, reference[j][1][1]), (k, j)
            assert s == reference[j][1][2]


def test_packed_rank_striding_and_single_pass(tiny_tokenizer):
    task, _ = make_mixture("arithmetic:10", "train")
    B, T = 1, 8
    for rank in (0, 1):
        ids, _ = _stream(task, tiny_tokenizer, rank=rank, world_size=2, count=3)
        x, _, _ = next(packed_batches(task, tiny_tokenizer, B, T, rank=rank, world_size=2))
        assert x.flatten().tolist() == ids[:B * T]
    ids, _ = _stream(task, tiny_tokenizer)  # one pass
    n_batches = sum(1 for _ in packed_batches(task, tiny_tokenizer, 2, 8, single_pass=True))
    assert n_batches == (len(ids) - 1) // 16


def test_muon_momentum_schedule():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)


def _run_mid(extra=()):
    from scripts import mid_train
    argv = ["--device_type", "cpu", "--tasks", "identity*2|arithmetic:40", "--identity_file", IDENTITY,
            "--max_seq_len", "32", "--device_batch_size", "2", "--total_batch_size", "128", "--init_lr_frac", "1.0",
            "--eval_tokens", "128", "--val_size", "16", *extra]
    return mid_train.main(argv)


def test_mid_train_runs_checkpoints_and_resumes(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", seed=7, sequence_len=32)
    history = _run_mid(["--num_iterations", "8", "--save_every", "4", "--eval_every", "4"])
    losses = [history["losses"][s] for s in sorted(history["losses"])]
    assert len(losses) == 8 and all(l == l for l in losses)
    assert losses[-1] < losses[0]
    assert sorted(history["val_bpb"]) == [0, 4, 8] and history["val_bpb"][8] < history["val_bpb"][0]
    ckpt = tmp_path / "mid_checkpoints" / "d1"
    for step in (4, 8):
        assert (ckpt / f"model_{step:06d}.pt").exists() and (ckpt / f"optim_{step:06d}_rank0.pt").exists()
    section = (tmp_path / "report" / "midtraining.md").read_text()
    assert "Minimum validation bpb" in section and "- loss_on: all" in section

    # resume from step 4 reproduces the uninterrupted step-8 weights
    uninterrupted = torch.load(ckpt / "model_000008.pt")
    for f in ckpt.glob("*_000008*"):
        f.unlink()
    resumed_history = _run_mid(["--num_iterations", "8", "--save_every", "4", "--eval_every", "4", "--resume"])
    assert sorted(resumed_history["losses"]) == [5, 6, 7, 8]
    resumed = torch.load(ckpt / "model_000008.pt")
    for name in uninterrupted:
        assert torch.allclose(uninterrupted[name], resumed[name], atol=1e-6), name

    # the mid checkpoint loads as a model for the next stage
    from nanochat.checkpoint_manager import load_model
    model, _, meta = load_model("mid", "cpu")
    assert meta["step"] == 8 and meta["source"] == "base"


def test_mid_train_one_epoch_stops_by_itself(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", seed=8, sequence_len=32)
    task, _ = make_mixture("identity*2|arithmetic:40", "train", identity_file=IDENTITY)
    total_tokens = len(_stream(task, tiny_tokenizer)[0])
    history = _run_mid(["--eval_every", "-1", "--dry_run", "--loss_on", "assistant"])
    # one epoch of ~total_tokens tokens at 128 tokens per step (the last step may cross into epoch 2)
    assert total_tokens // 128 - 1 <= history["num_iterations"] <= total_tokens // 128 + 2
    assert not (tmp_path / "mid_checkpoints").exists()  # dry run


def test_mid_train_bad_input(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.common import UserInputError
    from scripts import mid_train
    with pytest.raises(SystemExit):  # outside the choices: argparse's own usage error
        mid_train.get_args(["--loss_on", "users"])
    with pytest.raises(UserInputError, match="warmup_ratio"):
        mid_train.get_args(["--warmup_ratio", "0.9"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", sequence_len=32)
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        _run_mid(["--total_batch_size", "100", "--num_iterations", "1"])
    with pytest.raises(FileNotFoundError, match="identity"):
        _run_mid(["--identity_file", str(tmp_path / "missing.jsonl"), "--num_iterations", "1"])


# -----------------------------------------------------------------------------
# dev/gen_synthetic_data.py against a stub OpenAI-compatible server


class StubChatAPI:
    """A local /v1/chat/completions that answers with canned conversations. Every third request gets a
    broken answer (prose, bad JSON, wrong roles or an HTTP 500, in turn), so retries and validation run."""

    def __init__(self, status=None):
        self.requests = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((self.path, dict(self.headers), body))
                    n = len(stub.requests)
                if status is not None:
                    return self._send(status, {"error": {"message": "invalid api key"}})
                if n % 3 == 0:
                    broken = [None, "Sure! Here is a conversation you might like.", '{"messages": [{"role": "user"',
                              json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]})]
                    kind = broken[(n // 3) % 4]
                    if kind is None:
                        return self._send(500, {"error": "overloaded"})
                    content = kind
                else:
                    convo = {"messages": [{"role": "user", "content": f"Who are you? (request {n})"},
                                          {"role": "assistant", "content": "I am nanochat-cotrain, a small model."}]}
                    content = "```json\n" + json.dumps(convo) + "\n```"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_gen_synthetic_data_against_stub_server(tmp_path, monkeypatch):
    from dev import gen_synthetic_data as gen
    from tasks.customjson import CustomJSON
    out = tmp_path / "identity.jsonl"
    monkeypatch.setenv("STUB_KEY", "sk-test")
    with StubChatAPI() as api:
        argv = ["--base_url", api.url, "--model", "stub-model", "--api_key_env", "STUB_KEY", "-n", "6",
                "--concurrency", "3", "--output", str(out), "--retry_backoff", "0.01", "--timeout", "10"]
        assert gen.main(argv) == 0
        conversations = CustomJSON(str(out))  # what mid_train / chat_sft will read
        assert len(conversations) == 6
        assert all(c["messages"][-1]["role"] == "assistant" for c in conversations)
        assert len(api.requests) > 6  # broken answers were retried
        path, headers, body = api.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert body["model"] == "stub-model" and "nanochat-cotrain" in body["messages"][0]["content"]
        # a second run tops the file up instead of starting over; a half-written last line is dropped
        with open(out, "a") as f:
            f.write('{"messages": [{"role": "us')
        assert gen.main(argv[:-8] + ["-n", "8", "--concurrency", "2", "--output", str(out), "--retry_backoff", "0.01"]) == 0
        assert len(CustomJSON(str(out))) == 8
    # without a key no Authorization header is sent
    monkeypatch.delenv("STUB_KEY")
    with StubChatAPI() as api:
        assert gen.main(["--base_url", api.url, "--api_key_env", "STUB_KEY", "-n", "1", "--output", str(tmp_path / "b.jsonl")]) == 0
        assert "Authorization" not in api.requests[0][1]
    # a rejected key stops the run at once with exit code 2
    with StubChatAPI(status=401) as api:
        assert gen.main(["--base_url", api.url, "-n", "5", "--concurrency", "1", "--output", str(tmp_path / "c.jsonl")]) == 2
        assert len(api.requests) < 5


def test_gen_synthetic_data_validation():
    from dev.gen_synthetic_data import extract_json, validate_conversation
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert validate_conversation(extract_json("Here you go:\n" + json.dumps(good) + "\nEnjoy!")) == good["messages"]
    assert validate_conversation(extract_json(json.dumps(good["messages"]))) == good["messages"]
    bad_cases = [
        "no json here",
        '{"messages": [',
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|bos|>x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "b"}]}),
    ]
    for text in bad_cases:
        with pytest.raises(ValueError):
            validate_conversation(extract_json(text))
