"""
The chat server (scripts/chat_web.py) under abuse and against real clients: every class of bad request
gets a 4xx with a JSON error in the OpenAI shape (and the server stays up), bodies are cut off while they
stream in (a 50 MB chunked upload, with the server process's memory measured), only JSON POSTs from the
server's own origin (or an allowed one) are served, the optional API key, the bounded queue and its 503,
graceful shutdown on SIGTERM, and the OpenAI parameters (stop, top_p, the refused ones) through the
official `openai` client.
"""

import json
import time
import signal
import select
import socket
import threading

import httpx
import pytest
import torch
from hypothesis import given, settings, strategies as st

from chat_web_fixtures import InProcessServer, ServerProcess, make_babbler, make_workers, read_sse, rss_kb, write_base_dir
import scripts.chat_web as chat_web
from nanochat.engine import Engine, sample_next_token

HELLO = [{"role": "user", "content": "What is 12 times 12?"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer, num_workers=1), tiny_tokenizer, model_name="babbler")
    with InProcessServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def oracle(tiny_tokenizer):
    """The reply text a lone Engine on the same weights gives."""
    engine = Engine(make_babbler(tiny_tokenizer), tiny_tokenizer)

    def reply(messages, max_tokens, seed, temperature=1.0, top_k=50, top_p=None):
        prompt = tiny_tokenizer.render_for_completion({"messages": messages})
        ids = []
        for column, _ in engine.generate(prompt, 1, max_tokens, temperature, top_k or None, seed, top_p=top_p):
            if column[0] in engine.stop_tokens:
                break
            ids.append(column[0])
        return tiny_tokenizer.decode(ids)
    return reply


def wait_until(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def served_when_idle(server):
    """Requests served so far, once the last one has handed its worker back (that happens just after its
    response is written, so reading the count earlier races with it)."""
    wait_until(lambda: not any(w.busy for w in server.pool.workers), what="the workers to be idle")
    return server.pool.requests_served


def assert_error(response, status, *words, param=None):
    """A JSON error of the OpenAI shape, with the given status, whose message has every word."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# -----------------------------------------------------------------------------
# Every class of bad request: a 4xx JSON error naming the problem, and the server stays up

DEEP = b"[" * 100_000
BAD_BODIES = [
    # (name, raw body, words in the message, param)
    ("huge integer in top_k", b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 1' + b"0" * 400 + b"}",
     ["'top_k' must be between", "digits"], "top_k"),
    ("huge integer in temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9' + b"9" * 400 + b"}",
     ["'temperature' must be between"], "temperature"),
    ("huge integer in seed", b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 400 + b"}",
     ["'seed' must be between"], "seed"),
    ("integer over 4300 digits", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
     ["not valid JSON", "4300"], None),
    ("100k nested brackets", DEEP, ["not valid JSON", "nested too deeply"], None),
    ("nested list as a number", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + b"[" * 500 + b"]" * 500 + b"}",
     ["'temperature' must be a number", "JSON list"], "temperature"),
    ("float overflow", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', ["between 0.0 and 1.0"], "top_p"),
    ("unknown field", b'{"messages": [{"role": "user", "content": "hi"}], "temprature": 1}', ["unknown field", "'temprature'"],
     "temprature"),
    ("stop not a string", b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', ["'stop' must be a string"], "stop"),
    ("too many stops", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
     ["the limit is 4"], "stop"),
    ("empty stop", b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', ["1 to 200 characters"], "stop"),
    ("top_p over 1", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', ["between 0.0 and 1.0"], "top_p"),
    ("tool role", b'{"messages": [{"role": "tool", "content": "hi"}]}', ["role must be one of"], "messages[0].role"),
    ("assistant tool calls", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, '
                             b'"tool_calls": [{"id": "x"}]}, {"role": "user", "content": "ok"}]}',
     ["client-defined tools"], "messages[1].tool_calls"),
    ("empty user message after empty reply", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                            b'"content": ""}, {"role": "user", "content": ""}]}', ["is empty"], "messages[2].content"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name,body,words,param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_a_4xx_json_error(server, path, name, body, words, param):
    assert len(body) < chat_web.MAX_BODY_BYTES
    response = httpx.post(server.url + path, content=body, headers=JSON, timeout=30)
    error = assert_error(response, 400, *words, param=param)
    assert error["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


UNSUPPORTED = [("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"5": 10}), ("logprobs", True),
               ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
               ("functions", [{"name": "f"}]), ("function_call", "auto"), ("parallel_tool_calls", "yes"),
               ("response_format", {"type": "json_object"}), ("store", True), ("metadata", {"a": "b"}),
               ("service_tier", "flex"), ("modalities", ["text", "audio"]), ("audio", {"voice": "x"}),
               ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"), ("verbosity", "low"),
               ("web_search_options", {}), ("n", 2), ("user", 5)]


@pytest.mark.parametrize("name,value", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_openai_parameters_that_cannot_be_honoured_are_refused_by_name(server, name, value):
    served = served_when_idle(server)
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, name: value}, timeout=30)
    assert_error(response, 400, f"'{name}'" if name != "n" else "n=", param=name)
    # the UI endpoint takes none of the OpenAI-only fields
    response = httpx.post(server.url + "/chat/completions", json={"messages": HELLO, name: value}, timeout=30)
    assert_error(response, 400, "unknown field", param=name)
    assert server.pool.requests_served == served


def test_openai_defaults_are_accepted(server):
    """What client libraries send when the caller leaves a parameter at its default is not an error."""
    defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False, "tools": [],
                "tool_choice": "none", "parallel_tool_calls": True, "response_format": {"type": "text"}, "store": False,
                "service_tier": "auto", "modalities": ["text"], "n": 1, "user": "someone", "model": "whatever",
                "stream_options": None, "top_p": 1, "stop": None}
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 3, **defaults})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(min_value=-10**500, max_value=10**500) |
                    st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(
                        st.sampled_from(["messages", "role", "content", "temperature", "top_k", "top_p", "stop", "seed",
                                         "max_tokens", "n", "stream", "tools", "logprobs", "type", "text", "x"]),
                        children, max_size=5), max_leaves=30))
def test_any_json_is_either_a_request_or_a_request_error(value):
    for openai_api in (False, True):
        try:
            request = chat_web.parse_chat_request(value, openai_api=openai_api)
        except chat_web.RequestError as err:
            assert 400 <= err.status < 500 and err.message
            json.dumps(chat_web.error_body(err.message, err.status, err.param, err.code))  # always serialisable
        else:
            assert request["messages"][-1]["role"] == "user"


@pytest.mark.parametrize("method,path,status,words", [
    ("GET", "/v1/nothing", 404, ["no such endpoint", "/v1/nothing"]),
    ("POST", "/v1/embeddings", 404, ["no such endpoint"]),
    ("GET", "/v1/chat/completions", 405, ["GET is not allowed"]),
    ("DELETE", "/chat/completions", 405, ["DELETE is not allowed"]),
    ("POST", "/health", 405, ["POST is not allowed"]),
])
def test_unknown_paths_and_methods_get_json_errors(server, method, path, status, words):
    response = httpx.request(method, server.url + path, json={"messages": HELLO} if method == "POST" else None)
    assert_error(response, status, *words)


def test_model_endpoints(server):
    assert httpx.get(server.url + "/v1/models/babbler").json() == {"id": "babbler", "object": "model", "created": 0,
                                                                   "owned_by": "nanochat"}
    error = assert_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, "'gpt-4' does not exist", param="model")
    assert error["code"] == "model_not_found"


# -----------------------------------------------------------------------------
# Bodies: cut off while they stream in

def _send_chunked(port, total_bytes, chunk_size=64 * 1024, timeout=60):
    """POST a chunked JSON body of about total_bytes to /chat/completions on a raw socket, stopping early
    when the server answers or closes. Returns (bytes sent, status code, response body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setblocking(False)
    head = (f"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    prefix = b'{"messages": [{"role": "user", "content": "'
    pending = head + b"%x\r\n%s\r\n" % (len(prefix), prefix)
    payload = b"a" * chunk_size
    sent, response, deadline = 0, b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pending and sent < total_bytes:
            pending = b"%x\r\n%s\r\n" % (len(payload), payload)
            sent += len(payload)
        readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1.0)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            response += data
            if b"\r\n\r\n" in response and b"}}" in response:
                break
        elif writable:
            try:
                pending = pending[sock.send(pending):]
            except (BrokenPipeError, ConnectionResetError):
                pending = b""
                sent = total_bytes  # the server hung up: read what it said
        elif not pending and sent >= total_bytes:
            pending = b"0\r\n\r\n"  # the whole body went out without an answer: finish it
            sent += 1
    sock.close()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None
    return sent, status, response.partition(b"\r\n\r\n")[2]


def test_chunked_body_is_cut_off_at_the_limit(server):
    sent, status, body = _send_chunked(server.port, 3 * chat_web.MAX_BODY_BYTES)
    assert status == 413, body
    assert f"over {chat_web.MAX_BODY_BYTES} bytes" in json.loads(body)["error"]["message"]
    # a Content-Length over the limit is refused before a byte of the body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 5000000000\r\n\r\n{{}}".encode())
        answer = b""
        while b"}}" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert "5000000000 bytes" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_50mb_chunked_upload_does_not_grow_the_server(tmp_path, tiny_tokenizer):
    """The issue's measurement: a 200 MB chunked upload raised the peak RSS from 445 to 843 MB. Here a real
    server process gets 50 MB; its peak resident memory (VmHWM) must stay within a few MB of where it was."""
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path) as proc:
        pid = proc.proc.pid
        httpx.post(proc.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
        _send_chunked(proc.port, 2 * chat_web.MAX_BODY_BYTES)  # the code path warm, once
        before_peak, before = rss_kb(pid, "VmHWM"), rss_kb(pid)
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(rss_kb(pid))
                time.sleep(0.005)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            sent, status, body = _send_chunked(proc.port, 50 * 1024 * 1024)
        finally:
            done.set()
            sampler.join()
        after_peak = rss_kb(pid, "VmHWM")
        print(f"server RSS before {before / 1024:.1f} MB, peak before {before_peak / 1024:.1f} MB, "
              f"peak after the 50 MB upload {after_peak / 1024:.1f} MB, highest sample {max(samples) / 1024:.1f} MB; "
              f"the client got {sent / 1e6:.1f} MB out before the answer")
        assert status == 413, body
        assert after_peak - before_peak < 5 * 1024, "the server's peak memory grew by more than 5 MB"
        assert max(samples) - before < 5 * 1024
        assert httpx.get(proc.url + "/health", timeout=10).status_code == 200


# -----------------------------------------------------------------------------
# Cross-site requests, content types, hosts and the API key

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_only_json_posts_are_accepted(server, content_type):
    served = served_when_idle(server)
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    for path in ("/chat/completions", "/v1/chat/completions"):
        response = httpx.post(server.url + path, content=body, headers=headers)  # bytes: httpx adds no Content-Type
        assert_error(response, 415, "application/json")
    assert server.pool.requests_served == served
    response = httpx.post(server.url + "/chat/completions", content=body,
                          headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200 and read_sse_text(response)[-1]["done"]


def read_sse_text(response):
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_page_of_another_origin_cannot_start_a_generation(server):
    served = served_when_idle(server)
    body = {"messages": HELLO, "max_tokens": 2}
    # what a page on another site can send (also as JSON, if it tried): refused before any work
    for path in ("/chat/completions", "/v1/chat/completions"):
        response = httpx.post(server.url + path, json=body, headers={"Origin": "https://evil.example"})
        assert_error(response, 403, "'https://evil.example'", "--allow_origin")
        response = httpx.post(server.url + path, content=json.dumps(body), headers={"Origin": "null", "Content-Type": "text/plain"})
        assert response.status_code in (403, 415)
    preflight = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert server.pool.requests_served == served
    # the server's own page (same origin) and clients that send no Origin (curl, SDKs) are served
    for headers in ({"Origin": server.url}, {}):
        response = httpx.post(server.url + "/chat/completions", json=body, headers=headers)
        assert response.status_code == 200 and read_sse_text(response)[-1]["done"]
    assert served_when_idle(server) == served + 2


def test_allowed_origins_get_cors_headers(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, allow_origins=["https://my.app"])
    with InProcessServer(app) as s:
        preflight = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "https://my.app", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://my.app"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        response = httpx.post(s.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                              headers={"Origin": "https://my.app"}, timeout=60)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://my.app"
        assert_error(httpx.post(s.url + "/v1/chat/completions", json={"messages": HELLO},
                                headers={"Origin": "https://other.app"}), 403, "https://other.app")
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, allow_origins=["*"])
    with InProcessServer(app) as s:
        response = httpx.post(s.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                              headers={"Origin": "https://anyone.example"}, timeout=60)
        assert response.status_code == 200


def test_host_check_against_dns_rebinding(tiny_tokenizer):
    assert chat_web.loopback_hosts("127.0.0.1") == chat_web.loopback_hosts("::1") == ["127.0.0.1", "localhost", "::1"]
    assert chat_web.loopback_hosts("0.0.0.0") is None and chat_web.loopback_hosts("10.1.2.3") is None
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, allowed_hosts=chat_web.loopback_hosts("127.0.0.1"))
    with InProcessServer(app) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/health", headers={"Host": f"localhost:{s.port}"}).status_code == 200
        # a page on attacker.example whose DNS now points at 127.0.0.1: same-origin to the browser, but refused
        for method in ("GET", "POST"):
            response = httpx.request(method, s.url + "/chat/completions", json={"messages": HELLO},
                                     headers={"Host": f"attacker.example:{s.port}", "Origin": f"http://attacker.example:{s.port}"})
            assert_error(response, 400, "DNS rebinding", "'attacker.example")


def test_api_key_guards_v1_only(tmp_path, tiny_tokenizer):
    openai = pytest.importorskip("openai")
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path, "--api_key", "s3cret") as proc:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            error = assert_error(httpx.post(proc.url + "/v1/chat/completions", json={"messages": HELLO}, headers=headers),
                                 401, "API key")
            assert error["code"] == "invalid_api_key"
            assert_error(httpx.get(proc.url + "/v1/models", headers=headers), 401, "API key")
        assert httpx.get(proc.url + "/health").json()["api_key_required"] is True
        # the UI's own endpoint is guarded by the origin check, not the key
        assert httpx.post(proc.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60).status_code == 200
        good = openai.OpenAI(base_url=proc.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        reply = good.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=3)
        assert reply.usage.completion_tokens == 3
        assert good.models.list().data[0].id.startswith("nanochat-sft")
        bad = openai.OpenAI(base_url=proc.url + "/v1", api_key="guess", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.chat.completions.create(model="nanochat", messages=HELLO, max_tokens=3)


# -----------------------------------------------------------------------------
# Capacity: a bounded queue, and a graceful shutdown

def test_full_queue_answers_503_with_retry_after(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, max_queue=1)
    with InProcessServer(app) as s:
        pool, worker = s.pool, s.pool.workers[0]
        long = httpx.stream("POST", s.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 4000}, timeout=60)
        long.__enter__()
        queued = None
        try:
            wait_until(lambda: worker.busy, what="the worker to start")
            queued_request = httpx.stream("POST", s.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                                          timeout=60)
            queued = queued_request.__enter__()
            wait_until(lambda: pool.waiting == 1, what="the second request to queue")
            for path in ("/chat/completions", "/v1/chat/completions"):
                response = httpx.post(s.url + path, json={"messages": HELLO, "max_tokens": 2}, timeout=10)
                error = assert_error(response, 503, "busy", "queue holds 1")
                assert error["code"] == "server_busy" and int(response.headers["retry-after"]) > 0
            assert pool.stats()["rejected_busy"] == 2
        finally:
            long.__exit__(None, None, None)
        # the worker frees, the queued request runs, and there is room again
        events = [json.loads(line[6:]) for line in queued.iter_lines() if line.startswith("data: ")]
        queued_request.__exit__(None, None, None)
        assert events[-1]["done"] and events[-1]["completion_tokens"] == 2
        wait_until(lambda: pool.admitted == 0 and not worker.busy, what="every place in the queue to be given back")
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60).status_code == 200


def test_sigterm_finishes_running_replies_and_refuses_queued_ones(tmp_path, tiny_tokenizer):
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path, "--shutdown_timeout", "6") as proc:
        # how fast does this machine generate? a reply that should take about half a second, well inside the
        # 6 s deadline even on a loaded machine
        start = time.monotonic()
        httpx.post(proc.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 200}, timeout=60)
        per_token = (time.monotonic() - start) / 200
        short_tokens = max(20, min(3000, int(0.5 / per_token)))
        results = {}

        def run(name, payload, path="/chat/completions"):
            with httpx.stream("POST", proc.url + path, json=payload, timeout=60) as response:
                results[name] = (response.status_code, list(read_sse(response)) if response.status_code == 200
                                 else response.read())

        running = threading.Thread(target=run, args=("running", {"messages": HELLO, "max_tokens": short_tokens}))
        running.start()
        wait_until(lambda: httpx.get(proc.url + "/stats").json()["busy_workers"] == 1, what="the first reply to start")
        queued_ui = threading.Thread(target=run, args=("queued_ui", {"messages": HELLO, "max_tokens": 5}))
        queued_v1 = threading.Thread(target=lambda: results.__setitem__("queued_v1", httpx.post(
            proc.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5}, timeout=60)))
        queued_ui.start()
        queued_v1.start()
        wait_until(lambda: httpx.get(proc.url + "/stats").json()["queue_length"] == 2, what="two requests to queue")
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        queued_ui.join(10)
        queued_v1.join(10)
        refused_after = time.monotonic() - sent
        running.join(30)
        proc.proc.wait(30)
        exited_after = time.monotonic() - sent
    print(f"{per_token * 1000:.2f} ms per token; queued requests refused {refused_after:.2f} s after SIGTERM; "
          f"exit after {exited_after:.2f} s")
    assert refused_after < 2.0
    status, events = results["queued_ui"]
    assert status == 200 and "shutting down" in events[-2]["error"] and events[-1]["finish_reason"] == "shutdown"
    assert_error(results["queued_v1"], 503, "shutting down")
    status, events = results["running"]  # started before the signal, finished within the deadline
    assert status == 200 and events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == short_tokens
    assert exited_after < 6 + 2.5
    assert proc.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught, once it is done


def test_sigterm_cuts_a_reply_that_runs_past_the_deadline(tmp_path, tiny_tokenizer):
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path, "--shutdown_timeout", "1") as proc:
        with httpx.stream("POST", proc.url + "/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 4000, "stream": True}) as response:
            lines = response.iter_lines()
            for line in lines:
                if '"content": "' in line and '"content": ""' not in line:
                    break
            sent = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        cut_after = time.monotonic() - sent
        proc.proc.wait(15)
    error = json.loads(rest[-2][6:])["error"]
    assert rest[-1] == "data: [DONE]" and error["code"] == "shutting_down" and "incomplete" in error["message"]
    assert 0.8 < cut_after < 5.0, cut_after
    assert proc.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught, once it is done


# -----------------------------------------------------------------------------
# OpenAI parameters through the official client

@pytest.fixture(scope="module")
def openai_server(tmp_path_factory, tiny_tokenizer):
    openai = pytest.importorskip("openai")
    base = tmp_path_factory.mktemp("openai")
    write_base_dir(base, tiny_tokenizer)
    with ServerProcess(base) as proc:
        yield openai, openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_stop_with_the_official_client(openai_server, oracle):
    _, client = openai_server
    full = oracle(HELLO, 30, seed=4)
    stop = full[10:13]
    assert stop.strip() and full.find(stop) >= 1
    settings = dict(model="nanochat", messages=HELLO, max_tokens=30, seed=4, temperature=1.0, extra_body={"top_k": 50})
    reply = client.chat.completions.create(**settings, stop=stop)
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**settings, stop=[stop, "qqqq"], stream=True)
              if c.choices]
    assert "".join(pieces) == full[:full.find(stop)] and stop not in "".join(pieces)
    # a stop sequence that never shows up changes nothing
    assert client.chat.completions.create(**settings, stop=["\u2603\u2603"]).choices[0].message.content == full


def test_top_p_with_the_official_client(openai_server, oracle):
    _, client = openai_server
    settings = dict(model="nanochat", messages=HELLO, max_tokens=12, seed=9, temperature=1.0, extra_body={"top_k": 0})
    for top_p in (0.3, 0.9):
        reply = client.chat.completions.create(**settings, top_p=top_p)
        assert reply.choices[0].message.content == oracle(HELLO, 12, seed=9, top_k=0, top_p=top_p)
    narrow = client.chat.completions.create(**settings, top_p=0.0).choices[0].message.content
    greedy = client.chat.completions.create(**{**settings, "temperature": 0.0}).choices[0].message.content
    assert narrow == greedy  # top_p 0 keeps only the most likely token
    assert client.chat.completions.create(**settings).choices[0].message.content != narrow


def test_nucleus_sampling_draws_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    rng = torch.Generator().manual_seed(0)

    def drawn(**kwargs):
        return {int(sample_next_token(logits, rng, 1.0, **kwargs)) for _ in range(400)}
    assert drawn(top_p=0.7) == {1, 3}
    assert drawn(top_p=0.9) == {1, 3, 2}
    assert drawn(top_p=0.0) == {1}
    assert drawn(top_p=1.0) == {0, 1, 2, 3}
    assert drawn(top_k=3, top_p=0.7) == {1, 3}


def test_refused_parameters_through_the_official_client(openai_server):
    openai, client = openai_server
    base = dict(model="nanochat", messages=HELLO, max_tokens=3)
    for extra, name in [({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logprobs": True}, "logprobs"),
                        ({"tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]}, "tools"),
                        ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(openai.BadRequestError, match=name):
            client.chat.completions.create(**base, **extra)
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        value: int
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.parse(**base, response_format=Answer)
    assert client.models.retrieve(client.models.list().data[0].id).owned_by == "nanochat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_developer_role_is_the_system_role(server, tiny_tokenizer, oracle):
    system = [{"role": "system", "content": "Be brief."}, *HELLO]
    developer = [{"role": "developer", "content": "Be brief."}, *HELLO]
    bodies = [httpx.post(server.url + "/v1/chat/completions", timeout=60,
                         json={"messages": m, "max_tokens": 6, "seed": 2, "temperature": 1.0}).json() for m in (system, developer)]
    assert bodies[0]["choices"] == bodies[1]["choices"] and bodies[0]["usage"] == bodies[1]["usage"]
    assert bodies[1]["choices"][0]["message"]["content"] == oracle(system, 6, seed=2)
    # two leading instructions are joined into one system message
    both = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use digits."}, *HELLO]
    assert chat_web.validate_messages(both)[0] == {"role": "system", "content": "Be brief.\n\nUse digits."}


# -----------------------------------------------------------------------------
# Replies: tool calls as readable text, no special tokens, empty replies both ways

def scripted_generate(tokenizer, script):
    """A stand-in for Engine.generate that writes `script` (strings are text, names in <|..|> special tokens)
    on every row, then repeats its last token."""
    ids = []
    for item in script:
        ids.extend([tokenizer.encode_special(item)] if item.startswith("<|") else tokenizer.encode(item))

    def generate(prompt, num_samples=1, **kwargs):
        for i in range(kwargs.get("max_tokens") or len(ids)):
            token = ids[min(i, len(ids) - 1)]
            yield [token] * num_samples, [1] * num_samples
    return generate


TOOL_SCRIPT = ["Tom has ", "<|python_start|>", "3*4", "<|python_end|>", "<|output_start|>", "12", "<|output_end|>",
               " apples.", "<|user_end|>", "<|assistant_start|>", "More text that must not show"]


def test_tool_calls_are_readable_and_no_special_token_leaks(tiny_tokenizer, monkeypatch):
    workers = make_workers(tiny_tokenizer)
    monkeypatch.setattr(workers[0].engine, "generate", scripted_generate(tiny_tokenizer, TOOL_SCRIPT))
    with InProcessServer(chat_web.create_app(workers, tiny_tokenizer)) as s:
        body = httpx.post(s.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 50}, timeout=60).json()
        with httpx.stream("POST", s.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 50}, timeout=60) as r:
            events = read_sse(r)
    expected = "Tom has <<3*4=12>> apples."
    assert body["choices"][0]["message"]["content"] == expected and body["choices"][0]["finish_reason"] == "stop"
    assert "".join(e.get("token", "") for e in events) == expected and events[-1]["finish_reason"] == "stop"
    # sent back, the calculator call is rendered as the model wrote it: tool tokens, not plain text
    history = [*HELLO, {"role": "assistant", "content": expected}, {"role": "user", "content": "ok"}]
    rendered = tiny_tokenizer.render_for_completion({"messages": chat_web.prompt_messages(history)})
    python_start = tiny_tokenizer.encode_special("<|python_start|>")
    assert rendered.count(python_start) == 1
    parts = chat_web.prompt_messages(history)[1]["content"]
    assert parts == [{"type": "text", "text": "Tom has "}, {"type": "python", "text": "3*4"},
                     {"type": "python_output", "text": "12"}, {"type": "text", "text": " apples."}]


def test_verified_answers_carry_no_special_tokens(tiny_tokenizer, monkeypatch):
    workers = make_workers(tiny_tokenizer, verifier=True)
    monkeypatch.setattr(workers[0].engine, "generate", scripted_generate(tiny_tokenizer, TOOL_SCRIPT))
    monkeypatch.setattr(workers[0].verifier_engine, "generate", scripted_generate(
        tiny_tokenizer, ["Step 1: fine -> Correct", "<|user_end|>", "<|user_start|>", "more"]))

    class Judge:
        @staticmethod
        def build_verifier_conversation(question, solution):
            return {"messages": [{"role": "user", "content": solution}]}

        @staticmethod
        def parse_verification(text):
            return type("V", (), {"step_verdicts": [True], "overall": True, "format_ok": True})()

        @staticmethod
        def split_steps(text):
            return [text]
    app = chat_web.create_app(workers, tiny_tokenizer, verify_api=Judge(), verify_samples=2, verifier_max_tokens=40)
    with InProcessServer(app) as s:
        body = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 50, "verify": True, "stop": " apples"}).json()
    assert body["choices"][0]["message"]["content"] == "Tom has <<3*4=12>>"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["verification"]["verifier_text"] == "Step 1: fine -> Correct"  # the verifier's turn ends at <|user_end|>


def test_stop_scanner_holds_back_partial_matches():
    scanner = chat_web.StopScanner(["END", "xyz"])
    out = [scanner.push(p) for p in ["abc E", "N", "D more"]]
    assert out == ["abc ", "", ""] and scanner.stopped
    scanner = chat_web.StopScanner(["END"])
    assert [scanner.push(p) for p in ["aE", "Nb", "c"]] + [scanner.flush()] == ["a", "ENb", "c", ""]
    assert not scanner.stopped
    assert chat_web.cut_at_stop("one two three", ["three", "two"]) == ("one ", True)


def test_empty_reply_round_trip(tmp_path, tiny_tokenizer):
    openai = pytest.importorskip("openai")
    write_base_dir(tmp_path, tiny_tokenizer, stop_logit=15.0)  # a model that ends its reply at once
    with ServerProcess(tmp_path) as proc:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="nanochat", messages=HELLO, extra_body={"top_k": 0})
        message = reply.choices[0].message
        assert message.content == "" and reply.choices[0].finish_reason == "stop"
        # the client sends the empty reply back as history, as the openai client does: it is accepted
        history = [*HELLO, {"role": "assistant", "content": message.content}, {"role": "user", "content": "Hello?"}]
        again = client.chat.completions.create(model="nanochat", messages=history, extra_body={"top_k": 0})
        assert again.choices[0].finish_reason == "stop"
        history[1]["content"] = None  # what some clients send for an assistant turn without text
        response = httpx.post(proc.url + "/chat/completions", json={"messages": history}, timeout=60)
        assert response.status_code == 200 and read_sse_text(response)[-1]["finish_reason"] == "stop"
