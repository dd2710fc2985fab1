"""
Tests of the chat server (scripts/chat_web.py) with a tiny random model: the stream format, multi-turn,
every request limit, 20 concurrent requests on 2 workers, client disconnects, the OpenAI-compatible API
(also through the official `openai` client against a real server process) and best-of-N verification.

Replies are gibberish; what is checked is the plumbing. The oracle for a reply is the same Engine run
alone with the same seed: a server that mixes up requests, prompts or seeds gives different text.
"""

import sys
import json
import time
import random
import types
import threading

import httpx
import pytest
import torch

from nanochat.common import UserInputError
from nanochat.engine import TextStream
from tasks import verify

from chat_web_fixtures import (InProcessServer, ServerProcess, make_babbler, make_workers, read_sse,
                               write_base_dir)
import scripts.chat_web as chat_web
from nanochat.engine import Engine

HELLO = [{"role": "user", "content": "What is 12 times 12?"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # several generation threads share 2 cores: torch's own thread pool would only make them fight
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def oracle(tiny_tokenizer):
    """The reply a lone Engine on the same weights gives: (text, number of tokens)."""
    engine = Engine(make_babbler(tiny_tokenizer), tiny_tokenizer)

    def reply(messages, max_tokens, seed, temperature=1.0, top_k=50):
        prompt = tiny_tokenizer.render_for_completion({"messages": messages})
        ids = []
        for column, _ in engine.generate(prompt, 1, max_tokens, temperature, top_k or None, seed):
            if column[0] in engine.stop_tokens:
                break
            ids.append(column[0])
        return tiny_tokenizer.decode(ids), len(ids)
    return reply


@pytest.fixture(scope="module")
def server2(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer, num_workers=2), tiny_tokenizer, model_name="babbler")
    with InProcessServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:  # one client: no per-request connection and TLS-context setup
        yield client


@pytest.fixture()
def server1(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer, num_workers=1), tiny_tokenizer, model_name="babbler")
    with InProcessServer(app) as server:
        yield server


def chat(url, payload, timeout=60):
    with httpx.stream("POST", url + "/chat/completions", json=payload, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_sse(response)


def text_of(events):
    return "".join(e["token"] for e in events if "token" in e)


def wait_until(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -----------------------------------------------------------------------------
# Pages and small endpoints

def test_ui_health_stats_models(server2):
    page = httpx.get(server2.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="input"', 'id="send"', 'id="stop"', 'id="new-chat"', 'id="error"', "/chat/completions"):
        assert element in page.text
    health = httpx.get(server2.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "babbler" and health["num_workers"] == 2
    assert health["verifier"] is False and health["limits"]["max_message_chars"] == chat_web.MAX_MESSAGE_CHARS
    stats = httpx.get(server2.url + "/stats").json()
    assert stats["num_workers"] == 2 and stats["queue_length"] == 0 and len(stats["workers"]) == 2
    assert {"requests_served", "available_workers", "busy_workers"} <= set(stats)
    models = httpx.get(server2.url + "/v1/models").json()
    assert models["data"][0]["id"] == "babbler"


# -----------------------------------------------------------------------------
# Streaming

def test_stream_format_and_reply_match_a_solo_run(server2, oracle):
    events = chat(server2.url, {"messages": HELLO, "max_tokens": 12, "seed": 7, "temperature": 1.0, "top_k": 50})
    *tokens, done = events
    assert tokens and all(set(e) == {"token", "gpu"} and isinstance(e["token"], str) and e["token"] for e in tokens)
    assert len({e["gpu"] for e in tokens}) == 1
    assert done["done"] is True and done["finish_reason"] == "length" and done["completion_tokens"] == 12
    expected, _ = oracle(HELLO, 12, seed=7)
    assert text_of(events) == expected
    # the same seed again gives the same reply; another seed a different one
    assert text_of(chat(server2.url, {"messages": HELLO, "max_tokens": 12, "seed": 7, "temperature": 1.0})) == expected
    assert text_of(chat(server2.url, {"messages": HELLO, "max_tokens": 12, "seed": 8, "temperature": 1.0})) != expected


def test_multi_turn_with_system_message(server2, oracle, tiny_tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, *HELLO,
                {"role": "assistant", "content": "144."}, {"role": "user", "content": "And 13 times 13?"}]
    events = chat(server2.url, {"messages": messages, "max_tokens": 10, "seed": 3, "temperature": 1.0})
    done = events[-1]
    assert done["prompt_tokens"] == len(tiny_tokenizer.render_for_completion({"messages": messages}))
    assert text_of(events) == oracle(messages, 10, seed=3)[0]
    # the model reads the context: the same seed after a shorter history says something else
    assert text_of(events) != oracle(messages[-1:], 10, seed=3)[0]


def test_reply_that_ends_on_its_own_reports_stop(tiny_tokenizer):
    workers = make_workers(tiny_tokenizer, stop_logit=15.0)  # this model says <|assistant_end|> at once
    with InProcessServer(chat_web.create_app(workers, tiny_tokenizer)) as server:
        events = chat(server.url, {"messages": HELLO, "max_tokens": 50, "top_k": 0, "seed": 0})
    assert events == [{"done": True, "gpu": 0, "finish_reason": "stop", "completion_tokens": 0,
                       "prompt_tokens": len(tiny_tokenizer.render_for_completion({"messages": HELLO}))}]


def test_stream_decoder_never_splits_a_character(tiny_tokenizer):
    text = "héllo wörld, 你好 🙂 ok"
    ids = tiny_tokenizer.encode(text)
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids), "the test needs tokens that split a character"
    decoder = TextStream(tiny_tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # random token streams (with plenty of invalid byte sequences): the pieces always add up to decode(all)
    rng = random.Random(0)
    regular = tiny_tokenizer.get_vocab_size() - len(tiny_tokenizer.get_special_tokens())
    for _ in range(200):
        ids = [rng.randrange(regular) for _ in range(rng.randrange(1, 30))]
        decoder = TextStream(tiny_tokenizer)
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tiny_tokenizer.decode(ids)
    # a reply cut off in the middle of a character still hands out its bytes (as U+FFFD) at the end
    cut = TextStream(tiny_tokenizer)
    partial = tiny_tokenizer.encode("a🙂")[:-1]
    assert "".join(cut.push(i) for i in partial) + cut.flush() == tiny_tokenizer.decode(partial)


# -----------------------------------------------------------------------------
# Limits and malformed input: every one a 400 with a JSON error naming the problem

def _conversation(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(n)]


_OK = {"messages": HELLO}
BAD_REQUESTS = [
    ("malformed json", b'{"messages": [', "not valid JSON", None),
    ("not utf-8", b"\xff\xfe\x00", "not valid JSON", None),
    ("not an object", b"[1, 2]", "must be a JSON object", None),
    ("no messages", {}, "'messages' must be a list", "messages"),
    ("messages not a list", {"messages": "hi"}, "'messages' must be a list", "messages"),
    ("no messages in list", {"messages": []}, "at least one message", "messages"),
    ("too many messages", {"messages": _conversation(chat_web.MAX_MESSAGES + 1)}, "too many messages", "messages"),
    ("message not an object", {"messages": ["hi"]}, "must be an object", "messages[0]"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, "role must be one of", "messages[0].role"),
    ("missing role", {"messages": [{"content": "hi"}]}, "role must be one of", "messages[0].role"),
    ("system not first", {"messages": [*HELLO, {"role": "assistant", "content": "x"},
                                       {"role": "system", "content": "y"}]}, "must come before the conversation", "messages[2].role"),
    ("system alone", {"messages": [{"role": "system", "content": "be nice"}]}, "followed by a user message", "messages"),
    ("content not a string", {"messages": [{"role": "user", "content": 12}]}, "must be a string", "messages[0].content"),
    ("empty message", {"messages": [{"role": "user", "content": "  \n "}]}, "is empty", "messages[0].content"),
    ("message too long", {"messages": [{"role": "user", "content": "x" * (chat_web.MAX_MESSAGE_CHARS + 1)}]},
     f"{chat_web.MAX_MESSAGE_CHARS + 1} characters", "messages[0].content"),
    ("conversation too long", {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 7000}
                                            for i in range(5)]}, "conversation is too long", "messages"),
    ("roles do not alternate", {"messages": [*HELLO, *HELLO]}, "alternate", "messages[1].role"),
    ("ends with the assistant", {"messages": _conversation(2)}, "last message must come from the user", "messages"),
    ("temperature too low", {**_OK, "temperature": -0.1}, "between 0.0 and 2.0", "temperature"),
    ("temperature too high", {**_OK, "temperature": 2.5}, "between 0.0 and 2.0", "temperature"),
    ("temperature not a number", {**_OK, "temperature": "hot"}, "must be a number", "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "between", "temperature"),
    ("temperature bool", {**_OK, "temperature": True}, "must be a number", "temperature"),
    ("top_k too high", {**_OK, "top_k": 201}, "between 0 and 200", "top_k"),
    ("top_k negative", {**_OK, "top_k": -1}, "between 0 and 200", "top_k"),
    ("top_k fractional", {**_OK, "top_k": 1.5}, "must be an integer", "top_k"),
    ("max_tokens zero", {**_OK, "max_tokens": 0}, "between 1 and 4096", "max_tokens"),
    ("max_tokens too high", {**_OK, "max_tokens": 4097}, "between 1 and 4096", "max_tokens"),
    ("max_tokens a string", {**_OK, "max_tokens": "10"}, "must be an integer", "max_tokens"),
    ("seed negative", {**_OK, "seed": -1}, "between 0 and", "seed"),
    ("verify without a verifier", {**_OK, "verify": True}, "no verifier", "verify"),
    ("verify not a bool", {**_OK, "verify": "yes"}, "true or false", "verify"),
    ("prompt over the context", {"messages": [{"role": "user" if i % 2 == 0 else "assistant",
                                               "content": " ".join(f"w{j}q" for j in range(1000))} for i in range(5)]},
     "model's context is 4096 tokens", "messages"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name,body,message,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_a_clear_400(server2, http, path, name, body, message, param):
    served = server2.pool.requests_served
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = http.post(server2.url + path, headers={"Content-Type": "application/json"}, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert server2.pool.requests_served == served  # refused before any worker was taken


def test_openai_only_fields_and_body_size(server2):
    for body, message in [({**_OK, "stream": "yes"}, "true or false"), ({**_OK, "n": 2}, "only n=1"),
                          ({**_OK, "stream_options": [1]}, "'stream_options' must be an object")]:
        response = httpx.post(server2.url + "/v1/chat/completions", json=body)
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (chat_web.MAX_BODY_BYTES + 10) + b'"}]}'
    response = httpx.post(server2.url + "/chat/completions", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_validation_keeps_good_conversations():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "q"},
                                                                                    {"type": "text", "text": "2"}]}]
    request = chat_web.parse_chat_request({"messages": messages, "top_k": 0, "seed": 9}, openai_api=True)
    assert request["messages"][-1] == {"role": "user", "content": "q2"}
    assert request["messages"][:3] == messages[:3]
    assert (request["temperature"], request["top_k"], request["max_tokens"], request["seed"]) == \
        (chat_web.DEFAULT_TEMPERATURE, 0, chat_web.DEFAULT_MAX_TOKENS, 9)
    assert request["stream"] is False and request["verify"] is False
    # without a seed every request draws its own, so "regenerate" gives a new reply
    seeds = {chat_web.parse_chat_request({"messages": HELLO})["seed"] for _ in range(5)}
    assert len(seeds) > 1


# -----------------------------------------------------------------------------
# The worker pool under load

def test_twenty_concurrent_requests_on_two_workers(server2, oracle):
    before = {w.id: len(w.history) for w in server2.pool.workers}
    served = server2.pool.requests_served
    seeds = list(range(100, 120))
    results, errors = {}, []
    max_queue = [0]

    def one(seed):
        try:
            results[seed] = chat(server2.url, {"messages": HELLO, "max_tokens": 6, "seed": seed, "temperature": 1.0},
                                 timeout=120)
        except Exception as e:  # reported below, with the seed
            errors.append((seed, repr(e)))

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        max_queue[0] = max(max_queue[0], server2.pool.stats()["queue_length"])
        time.sleep(0.01)
    assert not errors, errors
    assert sorted(results) == seeds
    for seed, events in results.items():
        assert events[-1]["done"] is True and events[-1]["completion_tokens"] == 6
        assert len({e["gpu"] for e in events}) == 1
        assert text_of(events) == oracle(HELLO, 6, seed=seed)[0], f"seed {seed} got someone else's reply"
    assert server2.pool.requests_served == served + 20
    assert max_queue[0] > 0, "20 requests on 2 workers should have queued"
    for worker in server2.pool.workers:
        runs = sorted(list(worker.history)[before[worker.id]:], key=lambda r: r["start"])
        assert runs, f"worker {worker.id} got no work"
        for earlier, later in zip(runs, runs[1:]):
            assert later["start"] >= earlier["end"], f"two generations overlapped on worker {worker.id}"
    assert sum(len(w.history) - before[w.id] for w in server2.pool.workers) == 20
    stats = httpx.get(server2.url + "/stats").json()
    assert stats["busy_workers"] == 0 and stats["available_workers"] == 2 and stats["queue_length"] == 0


def test_client_disconnect_stops_generation_and_frees_the_worker(server1, oracle):
    worker = server1.pool.workers[0]
    payload = {"messages": HELLO, "max_tokens": 4000, "seed": 1}
    with httpx.stream("POST", server1.url + "/chat/completions", json=payload, timeout=60) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and "token" in json.loads(line[6:]):
                seen += 1
                if seen == 3:
                    break
    # the connection is closed now, mid-reply
    wait_until(lambda: len(worker.history) == 1 and not worker.busy, what="the worker to be freed")
    record = worker.history[-1]
    assert record["finish_reason"] == "cancelled" and record["tokens"] < 4000
    stats = httpx.get(server1.url + "/stats").json()
    assert stats["available_workers"] == 1 and stats["busy_workers"] == 0
    # and the worker serves the next request normally
    events = chat(server1.url, {"messages": HELLO, "max_tokens": 5, "seed": 2, "temperature": 1.0})
    assert events[-1]["finish_reason"] == "length" and text_of(events) == oracle(HELLO, 5, seed=2)[0]


def test_client_that_leaves_the_queue_is_dropped(server1):
    worker, pool = server1.pool.workers[0], server1.pool
    long_request = httpx.stream("POST", server1.url + "/chat/completions", timeout=60,
                                json={"messages": HELLO, "max_tokens": 4000, "seed": 1})
    response = long_request.__enter__()
    try:
        wait_until(lambda: worker.busy, what="the worker to start")
        # a streaming client queues, then hangs up
        with httpx.stream("POST", server1.url + "/chat/completions", json={"messages": HELLO, "max_tokens": 5}, timeout=60):
            wait_until(lambda: pool.waiting == 1, what="the second request to queue")
        wait_until(lambda: pool.waiting == 0, what="the queued stream to leave")
        # a non-streaming OpenAI client queues, then times out
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server1.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5}, timeout=1.0)
        wait_until(lambda: pool.waiting == 0, what="the timed-out request to leave the queue")
        assert worker.busy and len(worker.history) == 0  # neither ever reached the worker
    finally:
        long_request.__exit__(None, None, None)
    wait_until(lambda: not worker.busy, what="the worker to be freed")
    assert [r["finish_reason"] for r in worker.history] == ["cancelled"]
    assert response.status_code == 200
    wait_until(lambda: pool.admitted == 0, what="every queue place to be given back")


def test_a_failing_generation_reports_an_error_and_frees_the_worker(server1, monkeypatch):
    worker = server1.pool.workers[0]

    def broken(*args, **kwargs):
        yield [5], [1]
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(worker.engine, "generate", broken)
    events = chat(server1.url, {"messages": HELLO})
    assert events[-2] == {"error": "generation failed: RuntimeError: the model fell over", "gpu": 0}
    assert events[-1] == {"done": True, "finish_reason": "error", "gpu": 0}
    response = httpx.post(server1.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=60)
    assert response.status_code == 500 and "fell over" in response.json()["error"]["message"]
    # the generation thread hands the worker back just after the error response is written
    wait_until(lambda: not worker.busy, what="the worker to be freed")
    assert [r["finish_reason"] for r in worker.history] == ["error", "error"]
    monkeypatch.undo()
    assert chat(server1.url, {"messages": HELLO, "max_tokens": 3})[-1]["finish_reason"] == "length"


# -----------------------------------------------------------------------------
# The OpenAI-compatible API

def test_openai_api_streaming_and_not(server2, oracle):
    payload = {"model": "anything", "messages": HELLO, "max_tokens": 8, "seed": 11, "temperature": 1.0}
    body = httpx.post(server2.url + "/v1/chat/completions", json=payload, timeout=60).json()
    expected = oracle(HELLO, 8, seed=11)[0]
    assert body["object"] == "chat.completion" and body["model"] == "babbler" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected} and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8

    with httpx.stream("POST", server2.url + "/v1/chat/completions", timeout=60,
                      json={**payload, "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content_chunks, final, usage = chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks) == expected
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_workers_keep_their_captured_graphs(tmp_path, tiny_tokenizer, monkeypatch):
    """load_workers makes each replica's Engine with keep_graphs: on CUDA a request whose shape repeats skips the
    graph capture (Engine.keep_graphs)."""
    write_base_dir(tmp_path, tiny_tokenizer)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    workers, *_ = chat_web.load_workers(chat_web.parse_args(["--device_type", "cpu"]))
    assert workers and all(w.engine.keep_graphs for w in workers)


def test_official_openai_client_against_a_server_process(tmp_path, tiny_tokenizer, oracle):
    openai = pytest.importorskip("openai", reason="the `openai` package (dev extras) is not installed")
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
        settings = dict(model="nanochat", messages=HELLO, max_tokens=9, seed=21, temperature=1.0, extra_body={"top_k": 50})
        expected = oracle(HELLO, 9, seed=21)[0]
        reply = client.chat.completions.create(**settings)
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 9 and reply.model.startswith("nanochat-sft")
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(**settings, stream=True)
                  if chunk.choices]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(**{**settings, "temperature": 3.0})
        pid = server.proc.pid
    assert server.proc.returncode is not None, f"server process {pid} did not exit"


# -----------------------------------------------------------------------------
# Best-of-N with a verifier

class RecordingVerifyAPI:
    """Stands in for tasks.verify: records what the server asks the verifier about and turns each
    verifier output into made-up but deterministic step verdicts, so the pick can be checked."""

    def __init__(self):
        self.questions, self.solutions, self.verdicts = [], [], []

    def build_verifier_conversation(self, question, solution):
        self.questions.append(question)
        self.solutions.append(solution)
        return {"messages": [{"role": "user", "content": f"Check this.\nQuestion: {question}\nSolution: {solution}"}]}

    def parse_verification(self, text):
        h = sum(map(ord, text))
        verdict = types.SimpleNamespace(step_verdicts=[bool(h >> i & 1) for i in range(3)],
                                        overall=bool(h >> 3 & 1), format_ok=True)
        self.verdicts.append(verdict)
        return verdict

    @staticmethod
    def split_steps(text):
        return [text[:5], text[5:10], text[10:]]


def test_verify_picks_the_best_judged_answer(tiny_tokenizer):
    api = RecordingVerifyAPI()
    workers = make_workers(tiny_tokenizer, verifier=True)
    app = chat_web.create_app(workers, tiny_tokenizer, verify_api=api, verify_samples=3,
                              verifier_max_tokens=12)
    with InProcessServer(app) as server:
        assert httpx.get(server.url + "/health").json()["verifier"] is True
        events = chat(server.url, {"messages": HELLO, "max_tokens": 8, "seed": 5, "temperature": 1.0, "verify": True})
    statuses = [e["status"] for e in events if "status" in e]
    assert statuses == ["sampling 3 answers", "verifying answer 1 of 3", "verifying answer 2 of 3", "verifying answer 3 of 3"]
    # the three candidates are exactly what the generator samples for this seed
    engine = Engine(make_babbler(tiny_tokenizer), tiny_tokenizer)
    prompt = tiny_tokenizer.render_for_completion({"messages": HELLO})
    candidates = [tiny_tokenizer.decode(r[len(prompt):]) for r in
                  engine.generate_batch(prompt, num_samples=3, max_tokens=8, temperature=1.0, top_k=50, seed=5)[0]]
    assert api.solutions == candidates and api.questions == [HELLO[-1]["content"]] * 3
    verification = next(e["verification"] for e in events if "verification" in e)
    best = verify.best_of_n(api.verdicts)  # co-training's best-of-N ranking
    assert verification["chosen"] == best and text_of(events) == candidates[best]
    assert verification["step_verdicts"] == api.verdicts[best].step_verdicts
    assert verification["overall"] == api.verdicts[best].overall
    assert verification["steps"] == RecordingVerifyAPI.split_steps(candidates[best])
    assert [c["step_verdicts"] for c in verification["candidates"]] == [v.step_verdicts for v in api.verdicts]
    assert events[-1]["done"] is True


def test_verify_with_the_real_verifier_task(tiny_tokenizer):
    app = chat_web.create_app(make_workers(tiny_tokenizer, verifier=True), tiny_tokenizer, verify_api=verify, verify_samples=2,
                              verifier_max_tokens=12)
    with InProcessServer(app) as server:
        body = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                          json={"messages": HELLO, "max_tokens": 6, "seed": 1, "verify": True}).json()
    verification = body["verification"]
    assert len(verification["candidates"]) == 2 and verification["chosen"] in (0, 1)
    # a random verifier writes gibberish: parsed as no verdicts, never as a crash
    assert all(isinstance(c["format_ok"], bool) for c in verification["candidates"])
    assert body["choices"][0]["message"]["content"].startswith(verification["candidates"][verification["chosen"]]["preview"])


def test_expectations_verifier_gets_forced_headers_and_rule_verdicts(tiny_tokenizer):
    """A verifier co-trained in the expectations format (recorded in its checkpoint) is asked in that format,
    its lines open with the forced 'Step 1:' header, and the rule (not a verdict word) decides."""
    import threading
    worker = make_workers(tiny_tokenizer, verifier=True)[0]
    worker.verifier_format = "expectations"
    answer = "x 1+1=<<1+1=2>>2\ny 2+1=<<2+1=3>>3\n#### 3"
    verdict = chat_web._judge(worker, verify, tiny_tokenizer, "What is 1+1+1?", answer, 24, threading.Event())
    assert verdict["verifier_text"].startswith("Step 1:")
    expected = verify.rule_verification(answer, tiny_tokenizer.decode(tiny_tokenizer.encode(verdict["verifier_text"])))
    assert verdict["step_verdicts"] == expected.step_verdicts and verdict["overall"] == expected.overall


# -----------------------------------------------------------------------------
# Start-up errors

def test_bad_setup_fails_clearly(monkeypatch, tmp_path, tiny_tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserInputError, match="could not load the model: FileNotFoundError: no checkpoints directory"):
        chat_web.main(["--device_type", "cpu"])
    with pytest.raises(SystemExit):
        chat_web.parse_args(["--num_gpus", "0"])
    with pytest.raises(SystemExit):
        chat_web.parse_args(["--verify_samples", "99"])
    with pytest.raises(ValueError, match="only CUDA"):
        chat_web.worker_devices("cpu", 2)
    with pytest.raises(ValueError, match="at least one worker"):
        chat_web.create_app([], tiny_tokenizer)
    with pytest.raises(ValueError, match="no verifier engine"):
        chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, verify_api=RecordingVerifyAPI())


# -----------------------------------------------------------------------------
# Example prompts from the checkpoint's recorded training task

def test_example_prompts_follow_the_recorded_task():
    from tasks.arithmetic import ArithmeticTask
    from tasks.spellingbee import SimpleSpelling
    arithmetic = [ArithmeticTask(split="test", size=50)[i]["messages"][0]["content"] for i in range(3)]
    # RL and co-training record --task; SFT and mid-training --tasks (a preset or a list)
    assert chat_web.example_prompts({"user_config": {"task": "arithmetic"}}) == {"task": "Arithmetic", "prompts": arithmetic}
    assert chat_web.example_prompts({"user_config": {"tasks": "offline"}})["prompts"] == arithmetic
    spelling = chat_web.example_prompts({"user_config": {"tasks": "simplespelling:300|arithmetic"}})
    assert spelling["task"] == "SimpleSpelling"
    assert spelling["prompts"] == [SimpleSpelling(split="test", size=50)[i]["messages"][0]["content"] for i in range(3)]
    # an SFT start at a harder preset ('arithmetic@3') shows problems of that preset
    hard = [ArithmeticTask(split="test", size=50, difficulty=3)[i]["messages"][0]["content"] for i in range(3)]
    assert hard != arithmetic and chat_web.example_prompts({"user_config": {"tasks": "arithmetic@3"}})["prompts"] == hard
    # a task with nothing to show (identity has only a train split) is skipped for the next; nothing usable gives None
    assert chat_web.example_prompts({"user_config": {"tasks": "identity?|arithmetic"}}, count=1) == \
        {"task": "Arithmetic", "prompts": arithmetic[:1]}
    for meta in (None, {}, {"user_config": {}}, {"user_config": {"task": "no-such-task"}}, {"user_config": {"task": 5}}):
        assert chat_web.example_prompts(meta) is None


def test_served_checkpoint_shows_its_task(tmp_path, tiny_tokenizer):
    write_base_dir(tmp_path, tiny_tokenizer, user_config={"tasks": "arithmetic", "model_tag": "d2"})
    with ServerProcess(tmp_path) as server:
        health = httpx.get(server.url + "/health").json()
    from tasks.arithmetic import ArithmeticTask
    assert health["task"] == "Arithmetic"
    assert health["examples"] == [ArithmeticTask(split="test", size=50)[i]["messages"][0]["content"] for i in range(3)]
