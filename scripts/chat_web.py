"""
Serve a chat model over HTTP: a single-page chat UI, a streaming JSON API and an OpenAI-compatible API.

    python -m scripts.chat_web                          # the latest SFT model on every GPU (or the CPU)
    python -m scripts.chat_web --source rl --num_gpus 4 --port 8000
    python -m scripts.chat_web --verifier d12 --verify_samples 4   # best-of-N with the process verifier

Endpoints
    GET  /                      the chat UI (nanochat/ui.html)
    POST /chat/completions      {"messages": [...], "temperature"?, "top_k"?, "max_tokens"?, "seed"?, "verify"?}
                                -> server-sent events, one JSON object each: {"token": "..", "gpu": i} ...
                                   then {"done": true, "finish_reason": "stop"|"length"|...}
    POST /v1/chat/completions   the OpenAI chat API ("stream": true gives chat.completion.chunk events and
                                `data: [DONE]`), so the official `openai` client works against this server
    GET  /v1/models, /health, /stats

Each GPU holds one model replica (one replica on CPU/MPS). A replica runs one generation at a time, in a
thread; requests wait in an asyncio.Queue of idle workers. A client that goes away stops its generation
between two tokens and the worker goes back to the pool. Requests over the limits below get a 400 with a
JSON error that says which field is wrong.

With --verifier every worker also holds the verifier model. A request with "verify": true samples
--verify_samples answers, has the verifier judge each step of each, and returns the best one together
with its step verdicts.
"""

import os
import json
import math
import time
import uuid
import random
import asyncio
import argparse
import threading
from collections import deque
from importlib import resources

from nanochat.common import get_logger
from nanochat.engine import TextStream

logger = get_logger("chat_web")

# Abuse limits. Out-of-range values are rejected, never clamped, so a client learns what it did wrong.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
MAX_BODY_BYTES = 1_000_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200        # 0 = sample from the whole vocabulary
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512
MAX_VERIFY_SAMPLES = 16
VERIFIER_MAX_TOKENS = 512
ROLES = ("user", "assistant", "system")

# How often a waiting request checks whether its client has gone away.
DISCONNECT_POLL_S = 0.2


class RequestError(Exception):
    """A client error: becomes an HTTP error with {"error": {"message", "type", "param"}}."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


# -----------------------------------------------------------------------------
# Request validation (pure functions, no model needed)

def _check_number(payload, name, default, low, high, integer):
    value = payload.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _check_bool(payload, name, default=False):
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _message_text(content, where):
    """A message's text. OpenAI clients may send content as a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content parts must be {{\"type\": \"text\", \"text\": \"...\"}} objects "
                                   f"(only text is supported)", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string, got {type(content).__name__}", f"{where}.content")
    return content


def validate_messages(messages):
    """The conversation as a clean list of {"role", "content"} dicts, or a RequestError saying what is wrong."""
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
    if not messages:
        raise RequestError("'messages' must contain at least one message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES})", "messages")
    cleaned, total_chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {json.dumps(role)}", f"{where}.role")
        if role == "system" and i != 0:
            raise RequestError(f"{where}: only the first message may be a system message", f"{where}.role")
        content = _message_text(message.get("content"), where)
        if not content.strip():
            raise RequestError(f"{where} is empty", f"{where}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where} is too long: {len(content)} characters (the limit is {MAX_MESSAGE_CHARS})",
                               f"{where}.content")
        total_chars += len(content)
        cleaned.append({"role": role, "content": content})
    if total_chars > MAX_CONVERSATION_CHARS:
        raise RequestError(f"the conversation is too long: {total_chars} characters "
                           f"(the limit is {MAX_CONVERSATION_CHARS}); start a new conversation", "messages")
    turns = cleaned[1:] if cleaned[0]["role"] == "system" else cleaned
    if not turns:
        raise RequestError("a system message must be followed by a user message", "messages")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + (len(cleaned) - len(turns))
            raise RequestError(f"messages[{index}] has role '{message['role']}' but '{expected}' was expected: after an "
                               f"optional system message, roles alternate user, assistant, user, ...", f"messages[{index}].role")
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must come from the user (the server writes the assistant's reply)", "messages")
    return cleaned


def parse_chat_request(payload, openai_api=False, verifier_available=False):
    """Validate a decoded JSON body. Returns a dict of the generation settings (defaults filled in)."""
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(payload).__name__}")
    request = {"messages": validate_messages(payload.get("messages"))}
    request["temperature"] = _check_number(payload, "temperature", DEFAULT_TEMPERATURE, MIN_TEMPERATURE, MAX_TEMPERATURE, False)
    request["top_k"] = _check_number(payload, "top_k", DEFAULT_TOP_K, MIN_TOP_K, MAX_TOP_K, True)
    max_tokens = _check_number(payload, "max_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, True)
    if max_tokens is None and openai_api:  # newer OpenAI clients send max_completion_tokens instead
        max_tokens = _check_number(payload, "max_completion_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, True)
    request["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    request["seed"] = _check_number(payload, "seed", None, 0, 2**63 - 1, True)
    if request["seed"] is None:
        request["seed"] = random.randrange(2**31)  # a fresh sample per request, so "regenerate" differs
    request["verify"] = _check_bool(payload, "verify")
    if request["verify"] and not verifier_available:
        raise RequestError("'verify' was requested but this server has no verifier (start it with --verifier TAG)", "verify")
    if openai_api:
        request["stream"] = _check_bool(payload, "stream")
        if payload.get("n") not in (None, 1):
            raise RequestError(f"only n=1 is supported, got n={json.dumps(payload.get('n'))}", "n")
        options = payload.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        request["include_usage"] = _check_bool(options, "include_usage")
    return request


# -----------------------------------------------------------------------------
# UTF-8-safe streaming

# -----------------------------------------------------------------------------
# Workers: one replica per device, one generation at a time

class Worker:
    """A model replica (and the verifier's, with --verifier) on one device."""

    def __init__(self, worker_id, engine, device="cpu", verifier_engine=None):
        self.id = worker_id
        self.engine = engine
        self.device = str(device)
        self.verifier_engine = verifier_engine
        self.context_len = engine.model.config.sequence_len
        self.busy = False
        self.requests_served = 0
        self.tokens_generated = 0
        # Held for the whole of a generation: taking it without blocking turns a pool bug (two
        # generations on one replica) into a loud error instead of silently mixed-up state.
        self.generation_lock = threading.Lock()
        self.history = deque(maxlen=1000)  # {"start", "end", "tokens", "finish_reason"} per generation


class WorkerPool:
    """Idle workers wait in an asyncio.Queue; a request takes one and the generation thread returns it."""

    def __init__(self, workers):
        if not workers:
            raise ValueError("the worker pool needs at least one worker")
        self.workers = list(workers)
        self.idle = asyncio.Queue()
        for worker in self.workers:
            self.idle.put_nowait(worker)
        self.waiting = 0
        self.requests_served = 0

    async def acquire(self, is_disconnected=None):
        """The next idle worker, or None if the client went away while it waited."""
        self.waiting += 1
        getter = asyncio.ensure_future(self.idle.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if done:
                    worker = getter.result()
                    worker.busy = True
                    return worker
                if is_disconnected is not None and await is_disconnected():
                    return None
        finally:
            self.waiting -= 1
            if not getter.done():
                getter.cancel()  # a cancelled Queue.get leaves its item in the queue
            elif not getter.cancelled() and getter.exception() is None and not getter.result().busy:
                self.idle.put_nowait(getter.result())  # got one in the same instant we gave up: hand it back

    def release(self, worker):
        worker.busy = False
        self.idle.put_nowait(worker)

    def stats(self):
        return {
            "num_workers": len(self.workers),
            "available_workers": self.idle.qsize(),
            "busy_workers": sum(w.busy for w in self.workers),
            "queue_length": self.waiting,
            "requests_served": self.requests_served,
            "workers": [{"id": w.id, "device": w.device, "busy": w.busy, "requests_served": w.requests_served,
                         "tokens_generated": w.tokens_generated} for w in self.workers],
        }


# -----------------------------------------------------------------------------
# Generation (runs in a worker thread; talks to the event loop only through `emit`)

def _sample_stream(engine, decoder, prompt, job, stop, emit):
    """Stream one reply as text pieces. Returns (finish_reason, reply tokens, tokens generated)."""
    count, finish = 0, "length"
    stream = engine.generate(prompt, num_samples=1, max_tokens=job["max_tokens"], temperature=job["temperature"],
                             top_k=job["top_k"] or None, seed=job["seed"])
    try:
        for column, _ in stream:
            if stop.is_set():
                finish = "cancelled"
                break
            token = column[0]
            if token in engine.stop_tokens:
                finish = "stop"
                break
            count += 1
            piece = decoder.push(token)
            if piece:
                emit("text", piece)
    finally:
        stream.close()
    rest = decoder.flush()
    if rest:
        emit("text", rest)
    return finish, count, count


def _sample_candidates(engine, prompt, job, stop):
    """num_samples complete replies (token lists without the stop token) and whether each hit the stop token."""
    n = job["verify_samples"]
    replies, finished = [[] for _ in range(n)], [False] * n
    stream = engine.generate(prompt, num_samples=n, max_tokens=job["max_tokens"], temperature=job["temperature"],
                             top_k=job["top_k"] or None, seed=job["seed"])
    try:
        for column, _ in stream:
            if stop.is_set():
                return None, None
            for row, token in enumerate(column):
                if finished[row]:
                    continue
                if token in engine.stop_tokens:
                    finished[row] = True
                else:
                    replies[row].append(token)
            if all(finished):
                break
    finally:
        stream.close()
    return replies, finished


def _judge(worker, verify_api, tokenizer, question, answer, max_tokens, stop):
    """Have the verifier judge one answer. Returns a JSON-able verdict dict, or None if stopped."""
    engine = worker.verifier_engine
    conversation = verify_api.build_verifier_conversation(question, answer)
    prompt = tokenizer.render_for_completion(conversation)
    room = engine.model.config.sequence_len - len(prompt)
    if room < 1:
        return {"step_verdicts": [], "overall": None, "format_ok": False,
                "note": f"too long to verify ({len(prompt)} tokens, the verifier's context is {engine.model.config.sequence_len})"}
    ids = []
    stream = engine.generate(prompt, num_samples=1, max_tokens=min(max_tokens, room), temperature=0.0, seed=0)
    try:
        for column, _ in stream:
            if stop.is_set():
                return None
            if column[0] in engine.stop_tokens:
                break
            ids.append(column[0])
    finally:
        stream.close()
    text = tokenizer.decode(ids)
    verdict = verify_api.parse_verification(text)
    return {"step_verdicts": [bool(v) for v in verdict.step_verdicts], "overall": verdict.overall,
            "format_ok": bool(verdict.format_ok), "verifier_text": text}


def verdict_score(verdict):
    """Rank answers: judged Correct overall first, then more steps judged correct, then fewer judged wrong."""
    steps = verdict["step_verdicts"]
    return (verdict["overall"] is True, sum(steps), -(len(steps) - sum(steps)), verdict["format_ok"])


def pick_best(verdicts):
    """Index of the best verdict; the earliest one wins ties."""
    return max(range(len(verdicts)), key=lambda i: (verdict_score(verdicts[i]), -i))


def _answer_steps(verify_api, text):
    """The steps the verifier was shown, for the UI, when tasks.verify exposes its splitter."""
    split, display = getattr(verify_api, "split_steps", None), getattr(verify_api, "to_display", None)
    if split is None:
        return None
    try:
        return split(display(text) if display else text)
    except Exception:  # the splitter is a nicety for the UI; a failure must not lose the answer
        return None


def _verified_reply(worker, tokenizer, verify_api, prompt, job, stop, emit):
    """Best-of-N: sample N answers, let the verifier judge each, emit the best.
    Returns (finish_reason, tokens of the chosen reply, tokens generated for all N)."""
    n = job["verify_samples"]
    emit("status", f"sampling {n} answers")
    replies, finished = _sample_candidates(worker.engine, prompt, job, stop)
    if replies is None:
        return "cancelled", 0, 0
    generated = sum(len(r) for r in replies)
    question = job["messages"][-1]["content"]
    texts = [tokenizer.decode(r) for r in replies]
    verdicts = []
    for i, text in enumerate(texts):
        emit("status", f"verifying answer {i + 1} of {n}")
        verdict = _judge(worker, verify_api, tokenizer, question, text, job["verifier_max_tokens"], stop)
        if verdict is None:
            return "cancelled", 0, generated
        verdicts.append(verdict)
    best = pick_best(verdicts)
    if texts[best]:
        emit("text", texts[best])
    emit("verification", {
        "chosen": best, "num_samples": n, "steps": _answer_steps(verify_api, texts[best]),
        **{k: verdicts[best].get(k) for k in ("step_verdicts", "overall", "format_ok", "verifier_text")},
        "candidates": [{"step_verdicts": v["step_verdicts"], "overall": v["overall"], "format_ok": v["format_ok"],
                        "score": list(verdict_score(v)), "preview": t[:120]} for v, t in zip(verdicts, texts)],
    })
    return ("stop" if finished[best] else "length"), len(replies[best]), generated


def run_job(worker, tokenizer, verify_api, job, stop, emit, on_exit):
    """Thread body: generate the reply for `job` on `worker`, reporting through emit(kind, payload).
    Always ends with an "end" or "error" event, then calls on_exit() (which returns the worker)."""
    record = {"start": time.monotonic(), "end": None, "tokens": 0, "finish_reason": None}
    locked = worker.generation_lock.acquire(blocking=False)
    try:
        if not locked:
            raise RuntimeError(f"worker {worker.id} is already generating (worker pool bug)")
        if job["verify"]:
            finish, count, generated = _verified_reply(worker, tokenizer, verify_api, job["prompt"], job, stop, emit)
        else:
            finish, count, generated = _sample_stream(worker.engine, TextStream(tokenizer), job["prompt"], job, stop, emit)
        record.update(tokens=generated, finish_reason=finish)
        worker.tokens_generated += generated
        emit("end", {"finish_reason": finish, "completion_tokens": count, "prompt_tokens": len(job["prompt"])})
    except Exception as e:
        logger.exception(f"generation failed on worker {worker.id}")
        record["finish_reason"] = "error"
        emit("error", f"generation failed: {type(e).__name__}: {e}")
    finally:
        record["end"] = time.monotonic()
        worker.history.append(record)
        worker.requests_served += 1
        if locked:
            worker.generation_lock.release()
        on_exit()


async def _watch_disconnect(request, stop):
    """Set `stop` as soon as the client goes away. Runs beside the generation, so a disconnect is noticed
    even when nobody is reading the event stream (a streaming response abandoned mid-send)."""
    while not stop.is_set():
        if await request.is_disconnected():
            logger.info("client went away; stopping its generation")
            stop.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def generation_events(request, app_state, job):
    """Async generator of (kind, payload) events for one request: waits for a worker, runs the job in a
    thread, and stops that thread (between two tokens) when the client disconnects or this generator is
    closed or cancelled. The first event is ("worker", id); the last is ("end", info) or ("error", message).
    The thread, not this generator, hands the worker back, so a worker is never reused while it generates."""
    pool = app_state.pool
    loop = asyncio.get_running_loop()
    worker = await pool.acquire(request.is_disconnected)
    if worker is None:
        return
    events = asyncio.Queue()
    stop = threading.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, stop))

    def emit(kind, payload):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def finished():  # on the event loop, after the thread is done with the worker
        watcher.cancel()
        pool.requests_served += 1
        pool.release(worker)

    def on_exit():
        try:
            loop.call_soon_threadsafe(finished)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody needs the worker
            pass

    thread = threading.Thread(target=run_job, name=f"generate-w{worker.id}", daemon=True,
                              args=(worker, app_state.tokenizer, app_state.verify_api, job, stop, emit, on_exit))
    try:
        thread.start()
    except BaseException:
        finished()
        raise
    try:
        yield "worker", worker.id
        while True:
            kind, payload = await events.get()
            yield kind, payload
            if kind in ("end", "error"):
                return
    finally:
        stop.set()  # the thread sees it before its next token and hands the worker back itself


# -----------------------------------------------------------------------------
# The app

def load_ui_html():
    return resources.files("nanochat").joinpath("ui.html").read_text(encoding="utf-8")


def create_app(workers, tokenizer, model_name="nanochat", verify_api=None, verify_samples=4,
               verifier_max_tokens=VERIFIER_MAX_TOKENS):
    """The FastAPI app over already-loaded workers (see load_workers). verify_api: an object with
    build_verifier_conversation(question, solution) and parse_verification(text) (tasks.verify);
    verification is offered when it is given and every worker has a verifier engine."""
    from contextlib import asynccontextmanager
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    workers = list(workers)
    if not workers:
        raise ValueError("create_app needs at least one worker")
    verifier_available = verify_api is not None and all(w.verifier_engine is not None for w in workers)
    if verify_api is not None and not verifier_available:
        raise ValueError("verify_api was given but some workers have no verifier engine")
    if not 1 <= verify_samples <= MAX_VERIFY_SAMPLES:
        raise ValueError(f"verify_samples must be between 1 and {MAX_VERIFY_SAMPLES}, got {verify_samples}")
    ui_html = load_ui_html()
    context_len = min(w.context_len for w in workers)

    @asynccontextmanager
    async def lifespan(app):
        # the queue belongs to the running event loop, so the pool is made here, not at import time
        app.state.pool = WorkerPool(workers)
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.tokenizer = tokenizer
    app.state.verify_api = verify_api if verifier_available else None
    app.state.workers = workers

    def error_response(err):
        return JSONResponse(status_code=err.status, content={"error": {
            "message": err.message, "type": "invalid_request_error", "param": err.param, "code": None}})

    async def read_job(request, openai_api):
        """The validated job for a request body, with the prompt tokenized and max_tokens fitted to the context."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}")
        job = parse_chat_request(payload, openai_api=openai_api, verifier_available=verifier_available)
        prompt = tokenizer.render_for_completion({"messages": job["messages"]})
        if len(prompt) >= context_len:
            raise RequestError(f"the conversation is {len(prompt)} tokens but the model's context is {context_len} "
                               f"tokens (prompt and reply together); shorten it or start a new conversation", "messages")
        job["prompt"] = prompt
        job["max_tokens"] = min(job["max_tokens"], context_len - len(prompt))
        job["verify_samples"] = verify_samples
        job["verifier_max_tokens"] = verifier_max_tokens
        last = job["messages"][-1]["content"]
        logger.info(f"request: {len(job['messages'])} messages, {len(prompt)} prompt tokens, "
                    f"last user message {last[:80]!r}{'...' if len(last) > 80 else ''}")
        return job

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "ok", "ready": True, "model": model_name, "num_workers": len(pool.workers),
                "available_workers": pool.idle.qsize(), "verifier": verifier_available,
                "verify_samples": verify_samples if verifier_available else 0, "context_len": context_len,
                "limits": {"max_messages": MAX_MESSAGES, "max_message_chars": MAX_MESSAGE_CHARS,
                           "max_conversation_chars": MAX_CONVERSATION_CHARS, "max_tokens": MAX_MAX_TOKENS,
                           "temperature": [MIN_TEMPERATURE, MAX_TEMPERATURE], "top_k": [MIN_TOP_K, MAX_TOP_K]}}

    @app.get("/stats")
    async def stats():
        return app.state.pool.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = await read_job(request, openai_api=False)
        except RequestError as err:
            return error_response(err)

        async def stream():
            gpu = None
            async for kind, payload in generation_events(request, app.state, job):
                if kind == "worker":
                    gpu = payload
                elif kind == "text":
                    yield sse({"token": payload, "gpu": gpu})
                elif kind == "status":
                    yield sse({"status": payload, "gpu": gpu})
                elif kind == "verification":
                    yield sse({"verification": payload, "gpu": gpu})
                elif kind == "error":
                    yield sse({"error": payload, "gpu": gpu})
                    yield sse({"done": True, "finish_reason": "error", "gpu": gpu})
                elif kind == "end":
                    yield sse({"done": True, "gpu": gpu, **payload})

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        try:
            job = await read_job(request, openai_api=True)
        except RequestError as err:
            return error_response(err)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(delta, finish_reason=None, **extra):
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

        def usage(info):
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                    "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

        if job["stream"]:
            async def stream():
                yield sse(chunk({"role": "assistant", "content": ""}))
                verification = None
                async for kind, payload in generation_events(request, app.state, job):
                    if kind == "text":
                        yield sse(chunk({"content": payload}))
                    elif kind == "verification":
                        verification = payload
                    elif kind == "error":
                        yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                    elif kind == "end":
                        extra = {"verification": verification} if verification is not None else {}
                        yield sse(chunk({}, payload["finish_reason"], **extra))
                        if job["include_usage"]:
                            yield sse({**chunk({}), "choices": [], "usage": usage(payload)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        pieces, end, verification = [], None, None
        async for kind, payload in generation_events(request, app.state, job):
            if kind == "text":
                pieces.append(payload)
            elif kind == "verification":
                verification = payload
            elif kind == "error":
                return JSONResponse(status_code=500, content={"error": {
                    "message": payload, "type": "server_error", "param": None, "code": None}})
            elif kind == "end":
                end = payload
        if end is None:  # the client went away; nobody is listening to this response
            return JSONResponse(status_code=499, content={"error": {"message": "client disconnected", "type": "cancelled"}})
        body = {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": end["finish_reason"]}],
                "usage": usage(end)}
        if verification is not None:
            body["verification"] = verification
        return body

    return app


# -----------------------------------------------------------------------------
# Loading models and the command line

def load_verify_api():
    """tasks.verify (the verifier's prompt builder and output parser), or a clear startup error."""
    try:
        import tasks.verify as verify_api
    except ImportError as e:
        raise SystemExit(f"--verifier needs the verifier task tasks/verify.py, which could not be imported ({e}). "
                         f"Start without --verifier, or install a version of this project that has it.")
    missing = [name for name in ("build_verifier_conversation", "parse_verification") if not hasattr(verify_api, name)]
    if missing:
        raise SystemExit(f"--verifier: tasks.verify lacks {', '.join(missing)}; it does not match this server")
    return verify_api


def worker_devices(device_type, num_gpus):
    """The devices to put replicas on: cuda:0..N-1, or the single CPU/MPS device."""
    import torch
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if num_gpus > available:
            raise SystemExit(f"--num_gpus {num_gpus} asks for more GPUs than the {available} visible")
        return [torch.device("cuda", i) for i in range(num_gpus)]
    if num_gpus != 1:
        raise SystemExit(f"--num_gpus {num_gpus}: only CUDA serves several replicas; on {device_type} use --num_gpus 1")
    return [torch.device(device_type)]


def load_workers(args):
    """One Worker per device from the checkpoints named by the flags. Returns (workers, tokenizer, model_name)."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.engine import Engine
    compute_init(args.device_type)
    device_type = args.device_type or autodetect_device_type()
    workers, tokenizer, meta = [], None, {}
    for i, device in enumerate(worker_devices(device_type, args.num_gpus)):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        verifier_engine = None
        if args.verifier:
            # a co-training checkpoint holds both models; any other source holds just the verifier
            verifier, _, _ = load_model(args.verifier_source, device, phase="eval", model_tag=args.verifier,
                                        step=args.verifier_step,
                                        model_key="verifier" if args.verifier_source == "cotrain" else None)
            verifier_engine = Engine(verifier, tokenizer)
        workers.append(Worker(i, Engine(model, tokenizer), device, verifier_engine))
        logger.info(f"worker {i} ready on {device}")
    model_name = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "") + f"-step{meta.get('step', '?')}"
    return workers, tokenizer, model_name


def parse_args(argv=None):
    from nanochat.checkpoint_manager import CHECKPOINT_DIRS
    parser = argparse.ArgumentParser(description="Chat with a model in the browser, or through an OpenAI-compatible API.")
    parser.add_argument("--source", default="sft", choices=["sft", "rl", "cotrain", "mid", "base"], help="which stage's checkpoint to serve")
    parser.add_argument("--model_tag", default=None, help="model tag (e.g. d12); default: the largest one")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the last one")
    parser.add_argument("--num_gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only)")
    parser.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verifier", default=None, metavar="TAG", help="model tag of a process verifier: enables best-of-N with 'verify'")
    parser.add_argument("--verifier_source", default="cotrain", choices=sorted(CHECKPOINT_DIRS),
                        help="which checkpoints the verifier comes from")
    parser.add_argument("--verifier_step", type=int, default=None, help="verifier checkpoint step; default: the last one")
    parser.add_argument("--verify_samples", type=int, default=4, help=f"answers sampled per verified request (1..{MAX_VERIFY_SAMPLES})")
    parser.add_argument("--verifier_max_tokens", type=int, default=VERIFIER_MAX_TOKENS, help="longest verification the verifier may write")
    args = parser.parse_args(argv)
    if args.num_gpus < 1:
        parser.error("--num_gpus must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.verify_samples <= MAX_VERIFY_SAMPLES:
        parser.error(f"--verify_samples must be between 1 and {MAX_VERIFY_SAMPLES}")
    if args.verifier_max_tokens < 1:
        parser.error("--verifier_max_tokens must be at least 1")
    return args


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    verify_api = load_verify_api() if args.verifier else None  # fail before the slow model loading
    try:
        workers, tokenizer, model_name = load_workers(args)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"could not load the model: {type(e).__name__}: {e}")
    app = create_app(workers, tokenizer, model_name=model_name, verify_api=verify_api, verify_samples=args.verify_samples,
                     verifier_max_tokens=args.verifier_max_tokens)
    logger.info(f"serving {model_name} on http://{args.host}:{args.port} with {len(workers)} worker(s)"
                + (f", verifier {args.verifier}" if verify_api else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("NANOCHAT_LOG_LEVEL", "info").lower())


if __name__ == "__main__":
    main()
