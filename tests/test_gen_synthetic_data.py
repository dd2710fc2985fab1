"""Tests for dev/gen_synthetic_data.py, which writes the identity conversations mid-training and SFT
read: a run against a stub OpenAI-compatible server started in the test (retries, validation,
topping up a file, auth), and the validation of single answers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


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
