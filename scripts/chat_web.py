"""
Serve a chat model over HTTP: a single-page chat UI, a streaming JSON API and an OpenAI-compatible API.

    python -m scripts.chat_web                          # the latest SFT model on every GPU (or the CPU)
    python -m scripts.chat_web --source rl --num_gpus 4 --port 8000
    python -m scripts.chat_web --source cotrain --verifier d4   # after dev/runcpu.sh: best-of-N with the verifier
    python -m scripts.chat_web --api_key secret --allow_origin https://my.app   # bearer auth on /v1, one cross-site origin

Endpoints
    GET  /                      the chat UI (nanochat/ui.html)
    POST /chat/completions      {"messages": [...], "temperature"?, "top_k"?, "top_p"?, "max_tokens"?, "seed"?, "stop"?,
                                 "verify"?}
                                -> server-sent events, one JSON object each: {"token": "..", "gpu": i} ...
                                   then {"done": true, "finish_reason": "stop"|"length"|...}
    POST /v1/chat/completions   the OpenAI chat API ("stream": true gives chat.completion.chunk events and
                                `data: [DONE]`), so the official `openai` client works against this server
    GET  /v1/models, /v1/models/{id}, /health, /stats

Each GPU holds one model replica (one replica on CPU/MPS). A replica runs one generation at a time, in a
thread; requests wait in an asyncio.Queue of idle workers, at most --max_queue of them (more get a 503 with
Retry-After). A client that goes away stops its generation between two tokens and the worker goes back to
the pool. On SIGTERM queued requests are refused and running replies get --shutdown_timeout seconds to finish.

Every bad request gets a 4xx with a JSON error {"error": {"message", "type", "param", "code"}} that says
what is wrong (the OpenAI shape, on every path). OpenAI parameters this server cannot honour are refused by
name unless they hold their no-op default; none is silently dropped. POSTs must be application/json (so a
web page cannot post a "simple" cross-site form), and a browser's Origin must be this server's own unless
--allow_origin names it.

The model's calculator calls are shown in the GSM8K notation the training data uses, `<<12*7=84>>`, and are
turned back into tool tokens when a conversation comes back; no special token ever appears in a reply.

With --verifier every worker also holds the verifier model. A request with "verify": true samples
--verify_samples answers, has the verifier judge each step of each, and returns the best one together
with its step verdicts.
"""

import os
import re
import hmac
import json
import math
import time
import uuid
import random
import asyncio
import argparse
import ipaddress
import threading
from collections import deque
from importlib import resources
from urllib.parse import urlsplit

from nanochat.common import UserInputError, get_logger, run_stage
from tasks import verify
from nanochat.engine import TextStream, add_decode_flag

logger = get_logger("chat_web")

# Abuse limits. Out-of-range values are rejected, never clamped, so a client learns what it did wrong.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
MAX_BODY_BYTES = 1_000_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200        # 0 = sample from the whole vocabulary
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 4, 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_MAX_TOKENS = 512
MAX_VERIFY_SAMPLES = 16
VERIFIER_MAX_TOKENS = 512
DEFAULT_MAX_QUEUE = 64
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
RETRY_AFTER_S = 5
ROLES = ("system", "developer", "user", "assistant")
NUM_EXAMPLES = 3  # example prompts shown on an empty conversation

# How often a waiting request checks whether its client has gone away.
DISCONNECT_POLL_S = 0.2

# The fields each endpoint reads. Anything else is refused by name, so a client never believes a setting
# took effect when it did not.
COMMON_FIELDS = {"messages", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop", "verify"}
OPENAI_FIELDS = COMMON_FIELDS | {"model", "stream", "stream_options", "n", "max_completion_tokens",
                                 "user", "safety_identifier", "prompt_cache_key"}
# OpenAI parameters this server cannot honour, and the values that mean "off" (those are accepted: a client
# library that always sends its defaults keeps working).
OPENAI_DEFAULT_ONLY = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # meaningless without tools
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,),
}
WHY_UNSUPPORTED = {
    "tools": "the model has only its built-in calculator; it cannot call client-defined tools",
    "tool_choice": "the model cannot call client-defined tools",
    "functions": "the model cannot call client-defined functions",
    "function_call": "the model cannot call client-defined functions",
    "response_format": "the model cannot be constrained to JSON output",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "store": "nothing is stored",
}

# `<<expr=value>>`: a calculator call as the training data writes it (tasks/gsm8k.py)
CALC_NOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


class RequestError(Exception):
    """A client error: becomes an HTTP error with {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, param=None, status=400, code=None, headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.headers = message, param, status, code, headers


def error_body(message, status=400, param=None, code=None):
    """OpenAI's error object: type says whose fault it is (OpenAI uses invalid_request_error for every 4xx),
    code the machine-readable reason."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe(value):
    """A short, safe rendering of any decoded JSON value for an error message (never raises: a 5,000-digit
    integer or a 900-deep list must not turn a 400 into a 500)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        digits = len(str(abs(value))) if value.bit_length() < 10_000 else None
        if digits is not None and digits <= 20:
            return str(value)
        return f"an integer of {digits or 'thousands of'} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    return f"a JSON {'list' if isinstance(value, list) else 'object'} of {len(value)} item(s)"


# -----------------------------------------------------------------------------
# Request validation (pure functions, no model needed)

def _check_number(payload, name, default, low, high, integer):
    value = payload.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be {kind}, got {describe(value)}", name)
    # int-float comparison is exact for any size of int; math.isfinite(10**400) would raise OverflowError
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {describe(value)}", name)
    return value


def _check_bool(payload, name, default=False):
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {describe(value)}", name)
    return value


def _check_stop(payload):
    """`stop`: a string or a list of up to MAX_STOP_SEQUENCES non-empty strings -> a list (maybe empty)."""
    stop = payload.get("stop")
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise RequestError(f"'stop' must be a string or a list of strings, got {describe(stop)}", "stop")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' has {len(sequences)} sequences; the limit is {MAX_STOP_SEQUENCES}", "stop")
    for s in sequences:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"every 'stop' sequence must have 1 to {MAX_STOP_CHARS} characters, got {describe(s)}",
                               "stop")
    return sequences


def _message_text(content, where, allow_none=False):
    """A message's text. OpenAI clients may send content as a list of {"type": "text", "text": ...} parts."""
    if content is None and allow_none:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content parts must be {{\"type\": \"text\", \"text\": \"...\"}} objects "
                                   f"(only text is supported)", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string, got {describe(content)}", f"{where}.content")
    return content


def validate_messages(messages):
    """The conversation as a clean list of {"role", "content"} dicts, or a RequestError saying what is wrong.
    "developer" (what newer OpenAI clients send) means "system"; leading system messages are joined into one.
    An assistant message may be empty: the model can reply with nothing, and the client sends that back."""
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
    if not messages:
        raise RequestError("'messages' must contain at least one message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES})", "messages")
    cleaned, total_chars, roles = [], 0, []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {describe(role)}", f"{where}.role")
        role = "system" if role == "developer" else role
        if role == "system" and any(r != "system" for r in roles):
            raise RequestError(f"{where}: system (or developer) messages must come before the conversation",
                               f"{where}.role")
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            raise RequestError(f"{where} has tool calls, but this server does not take client-defined tools",
                               f"{where}.tool_calls")
        roles.append(role)
        content = _message_text(message.get("content"), where, allow_none=role == "assistant")
        if role != "assistant" and not content.strip():
            raise RequestError(f"{where} is empty", f"{where}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where} is too long: {len(content)} characters (the limit is {MAX_MESSAGE_CHARS})",
                               f"{where}.content")
        total_chars += len(content)
        if role == "system" and cleaned:
            cleaned[0]["content"] += "\n\n" + content
        else:
            cleaned.append({"role": role, "content": content})
    if total_chars > MAX_CONVERSATION_CHARS:
        raise RequestError(f"the conversation is too long: {total_chars} characters "
                           f"(the limit is {MAX_CONVERSATION_CHARS}); start a new conversation", "messages")
    num_system = roles.count("system")
    turns = cleaned[1:] if num_system else cleaned
    if not turns:
        raise RequestError("a system message must be followed by a user message", "messages")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + num_system
            raise RequestError(f"messages[{index}] has role '{message['role']}' but '{expected}' was expected: after "
                               f"optional system messages, roles alternate user, assistant, user, ...",
                               f"messages[{index}].role")
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must come from the user (the server writes the assistant's reply)", "messages")
    return cleaned


def _same_value(value, default):
    """value == default, except that true is not 1 and false is not 0 (JSON keeps them apart; Python does not)."""
    if isinstance(value, bool) or isinstance(default, bool) or value is None or default is None:
        return value is default
    return type(value) in (int, float) and type(default) in (int, float) and value == default or \
        type(value) is type(default) and value == default


def _check_openai_extras(payload):
    """Refuse, by name, every OpenAI parameter this server would otherwise have to ignore."""
    for name, allowed in OPENAI_DEFAULT_ONLY.items():
        value = payload.get(name)
        if any(_same_value(value, a) for a in allowed):
            continue
        why = WHY_UNSUPPORTED.get(name, "this server does not implement it")
        raise RequestError(f"'{name}' is not supported ({why}); leave it out or send its default, "
                           f"got {describe(value)}", name, code="unsupported_parameter")
    for name in ("user", "safety_identifier", "prompt_cache_key"):  # labels for the caller's own bookkeeping
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise RequestError(f"'{name}' must be a string, got {describe(payload[name])}", name)


def parse_chat_request(payload, openai_api=False, verifier_available=False):
    """Validate a decoded JSON body. Returns a dict of the generation settings (defaults filled in)."""
    if not isinstance(payload, dict):
        raise RequestError(f"the request body must be a JSON object, got {describe(payload)}")
    known = OPENAI_FIELDS | set(OPENAI_DEFAULT_ONLY) if openai_api else COMMON_FIELDS
    unknown = sorted(name for name in payload if name not in known)
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))}; "
                           f"this endpoint reads {', '.join(sorted(known))}", unknown[0][:100],
                           code="unknown_parameter")
    if openai_api:
        _check_openai_extras(payload)
    request = {"messages": validate_messages(payload.get("messages"))}
    request["temperature"] = _check_number(payload, "temperature", DEFAULT_TEMPERATURE, MIN_TEMPERATURE, MAX_TEMPERATURE, False)
    request["top_k"] = _check_number(payload, "top_k", DEFAULT_TOP_K, MIN_TOP_K, MAX_TOP_K, True)
    request["top_p"] = _check_number(payload, "top_p", 1.0, 0.0, 1.0, False)
    max_tokens = _check_number(payload, "max_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, True)
    if max_tokens is None and openai_api:  # newer OpenAI clients send max_completion_tokens instead
        max_tokens = _check_number(payload, "max_completion_tokens", None, MIN_MAX_TOKENS, MAX_MAX_TOKENS, True)
    request["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    request["seed"] = _check_number(payload, "seed", None, 0, 2**63 - 1, True)
    if request["seed"] is None:
        request["seed"] = random.randrange(2**31)  # a fresh sample per request, so "regenerate" differs
    request["stop"] = _check_stop(payload)
    request["verify"] = _check_bool(payload, "verify")
    if request["verify"] and not verifier_available:
        raise RequestError("'verify' was requested but this server has no verifier (start it with --verifier TAG)", "verify")
    if openai_api:
        request["stream"] = _check_bool(payload, "stream")
        n = payload.get("n")
        if n is not None and not (type(n) is int and n == 1):
            raise RequestError(f"only n=1 is supported, got n={describe(n)}", "n")
        options = payload.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        extra = sorted(set(options) - {"include_usage", "include_obfuscation"})
        if extra:
            raise RequestError(f"unknown stream_options field {extra[0][:100]!r}", "stream_options")
        request["include_usage"] = _check_bool(options, "include_usage")
    return request


def prompt_messages(messages):
    """The messages as the tokenizer renders them: an assistant's `<<expr=value>>` becomes a calculator call
    again (python and python_output parts), so a conversation sent back reads as the model wrote it."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "assistant" and CALC_NOTATION.search(content):
            parts, pos = [], 0
            for m in CALC_NOTATION.finditer(content):
                if m.start() > pos:
                    parts.append({"type": "text", "text": content[pos:m.start()]})
                parts.append({"type": "python", "text": m.group(1)})
                parts.append({"type": "python_output", "text": m.group(2)})
                pos = m.end()
            if pos < len(content):
                parts.append({"type": "text", "text": content[pos:]})
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


# -----------------------------------------------------------------------------
# Reply text: tool calls shown as `<<expr=value>>`, stop sequences, no special tokens

class ReplyDecoder:
    """Token ids of a reply -> text pieces. Wraps TextStream (which never splits a UTF-8 character) and
    writes the calculator's special tokens in the GSM8K notation. end_tokens: the special tokens that end a
    reply (the engine's stop tokens, plus the start or end of another turn: a model that writes those has
    finished its answer and is making up the conversation's next turn)."""

    def __init__(self, tokenizer):
        self.text = TextStream(tokenizer)
        special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
        self.shown = {special["<|python_start|>"]: "<<", special["<|python_end|>"]: "=",
                      special["<|output_start|>"]: "", special["<|output_end|>"]: ">>"}
        self.end_tokens = frozenset(special.values()) - set(self.shown)

    def push(self, token):
        if token in self.shown:
            return self.text.flush() + self.shown[token]
        return self.text.push(token)

    def flush(self):
        return self.text.flush()


def reply_text(tokenizer, ids):
    """The text of a whole reply (ids without the end token), as ReplyDecoder shows it."""
    decoder = ReplyDecoder(tokenizer)
    return "".join(decoder.push(t) for t in ids) + decoder.flush()


class StopScanner:
    """Cuts a stream of text pieces at the first stop sequence. Text that might be the start of a stop
    sequence is held back until the next piece shows it is not, so a stop string never leaks out in part."""

    def __init__(self, sequences):
        self.sequences = list(sequences)
        self.held = ""
        self.stopped = False

    def push(self, piece):
        """The text safe to emit now; sets self.stopped when a stop sequence was found."""
        if not self.sequences:
            return piece
        self.held += piece
        cuts = [i for i in (self.held.find(s) for s in self.sequences) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.held = self.held[:min(cuts)], ""
            return out
        keep = 0  # the longest tail of the held text that a stop sequence starts with
        for s in self.sequences:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out

    def flush(self):
        out, self.held = self.held, ""
        return out


def cut_at_stop(text, sequences):
    """(text before the first stop sequence, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in sequences) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


# -----------------------------------------------------------------------------
# Workers: one replica per device, one generation at a time

class Worker:
    """A model replica (and the verifier's, with --verifier) on one device."""

    def __init__(self, worker_id, engine, device="cpu", verifier_engine=None, verifier_format="verdicts"):
        self.id = worker_id
        self.engine = engine
        self.device = str(device)
        self.verifier_engine = verifier_engine
        self.verifier_format = verifier_format  # what the verifier was trained to write (tasks.verify.FORMATS)
        self.context_len = engine.model.config.sequence_len
        self.busy = False
        self.requests_served = 0
        self.tokens_generated = 0
        # Held for the whole of a generation: taking it without blocking turns a pool bug (two
        # generations on one replica) into a loud error instead of silently mixed-up state.
        self.generation_lock = threading.Lock()
        self.history = deque(maxlen=1000)  # {"start", "end", "tokens", "finish_reason"} per generation


class Ticket:
    """A request's place in the server (generating or queued). release() gives it back; a second call is a no-op,
    so every way a request can end may call it."""

    def __init__(self, pool):
        self.pool, self.held = pool, True

    def release(self):
        if self.held:
            self.held = False
            self.pool.admitted -= 1


class WorkerPool:
    """Idle workers wait in an asyncio.Queue; a request takes one and the generation thread returns it.

    Admission: at most len(workers) + max_queue requests are let in at once (generating or waiting);
    the next one gets a 503 straight away rather than waiting without bound. After shutdown() nothing is let
    in, waiting requests are turned away, and running generations are stopped once the deadline passes."""

    def __init__(self, workers, max_queue=DEFAULT_MAX_QUEUE):
        if not workers:
            raise ValueError("the worker pool needs at least one worker")
        self.workers = list(workers)
        self.max_queue = max_queue
        self.idle = asyncio.Queue()
        for worker in self.workers:
            self.idle.put_nowait(worker)
        self.waiting = 0
        self.admitted = 0
        self.requests_served = 0
        self.rejected_busy = 0
        self.closing = False
        self.closed = asyncio.get_running_loop().create_future()  # done once shutdown() starts
        self.running = {}  # stop event -> job, for the generations in progress

    def admit(self):
        """A ticket for one request, or a 503 RequestError when the server is full or shutting down."""
        if self.closing:
            raise RequestError("the server is shutting down; try again later", status=503, code="shutting_down",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.admitted >= len(self.workers) + self.max_queue:
            self.rejected_busy += 1
            raise RequestError(f"the server is busy: {len(self.workers)} worker(s) generating and {self.waiting} "
                               f"request(s) queued (the queue holds {self.max_queue}); try again shortly",
                               status=503, code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1
        return Ticket(self)

    async def acquire(self, is_disconnected=None):
        """The next idle worker; None if the client went away while it waited; "shutdown" if the server began
        shutting down first."""
        if self.closing:
            return "shutdown"
        self.waiting += 1
        getter = asyncio.ensure_future(self.idle.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter, self.closed}, timeout=DISCONNECT_POLL_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    worker = getter.result()
                    worker.busy = True
                    return worker
                if self.closed in done:
                    return "shutdown"
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

    def shutdown(self, timeout):
        """Refuse new and queued requests now; stop the running generations after `timeout` seconds."""
        if self.closing:
            return
        self.closing = True
        self.closed.set_result(True)
        logger.info(f"shutting down: {self.waiting} queued request(s) refused, {len(self.running)} running "
                    f"generation(s) get {timeout} s to finish")

        def cut_off():
            for stop, job in list(self.running.items()):
                job["cut_by_shutdown"] = True
                stop.set()
        asyncio.get_running_loop().call_later(timeout, cut_off)

    def stats(self):
        return {
            "num_workers": len(self.workers),
            "available_workers": self.idle.qsize(),
            "busy_workers": sum(w.busy for w in self.workers),
            "queue_length": self.waiting,
            "max_queue": self.max_queue,
            "rejected_busy": self.rejected_busy,
            "shutting_down": self.closing,
            "requests_served": self.requests_served,
            "workers": [{"id": w.id, "device": w.device, "busy": w.busy, "requests_served": w.requests_served,
                         "tokens_generated": w.tokens_generated} for w in self.workers],
        }


# -----------------------------------------------------------------------------
# Generation (runs in a worker thread; talks to the event loop only through `emit`)

def _sampling(job):
    return dict(max_tokens=job["max_tokens"], temperature=job["temperature"], top_k=job["top_k"] or None,
                top_p=job["top_p"] if job["top_p"] < 1.0 else None, seed=job["seed"])


def _sample_stream(engine, tokenizer, prompt, job, stop, emit):
    """Stream one reply as text pieces. Returns (finish_reason, reply tokens, tokens generated)."""
    decoder, scanner = ReplyDecoder(tokenizer), StopScanner(job["stop"])
    count, finish = 0, "length"
    stream = engine.generate(prompt, num_samples=1, **_sampling(job))
    try:
        for column, _ in stream:
            if stop.is_set():
                finish = "cancelled"
                break
            token = column[0]
            if token in engine.stop_tokens or token in decoder.end_tokens:
                finish = "stop"
                break
            count += 1
            piece = scanner.push(decoder.push(token))
            if piece:
                emit("text", piece)
            if scanner.stopped:
                finish = "stop"
                break
    finally:
        stream.close()
    if not scanner.stopped:
        rest = scanner.push(decoder.flush())
        rest += "" if scanner.stopped else scanner.flush()
        if rest:
            emit("text", rest)
        if scanner.stopped:
            finish = "stop"
    return finish, count, count


def _sample_candidates(engine, tokenizer, prompt, job, stop):
    """num_samples complete replies (token lists without the end token) and whether each ended on its own."""
    n = job["verify_samples"]
    end_tokens = engine.stop_tokens | ReplyDecoder(tokenizer).end_tokens
    replies, finished = [[] for _ in range(n)], [False] * n
    stream = engine.generate(prompt, num_samples=n, **_sampling(job))
    try:
        for column, _ in stream:
            if stop.is_set():
                return None, None
            for row, token in enumerate(column):
                if finished[row]:
                    continue
                if token in end_tokens:
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
    expectations = getattr(worker, "verifier_format", "verdicts") == "expectations"
    headers = None
    if expectations:  # one forced "Step k:" line per step, as in co-training; a rule turns them into verdicts
        conversation = verify_api.build_verifier_conversation(question, answer, fmt="expectations")
        headers = verify_api.step_headers(tokenizer, len(verify_api.split_steps(verify_api.to_display(answer))))
    else:
        conversation = verify_api.build_verifier_conversation(question, answer)
    prompt = tokenizer.render_for_completion(conversation)
    room = engine.model.config.sequence_len - len(prompt)
    if room < 1:
        return {"step_verdicts": [], "overall": None, "format_ok": False,
                "note": f"too long to verify ({len(prompt)} tokens, the verifier's context is {engine.model.config.sequence_len})"}
    ids = []
    end_tokens = engine.stop_tokens | ReplyDecoder(tokenizer).end_tokens  # a new turn ends the verification too
    stream = engine.generate(prompt, num_samples=1, max_tokens=min(max_tokens, room), temperature=0.0, seed=0, line_headers=headers)
    try:
        for column, _ in stream:
            if stop.is_set():
                return None
            if column[0] in end_tokens:
                break
            ids.append(column[0])
    finally:
        stream.close()
    text = tokenizer.decode(ids)
    verdict = verify_api.rule_verification(answer, text) if expectations else verify_api.parse_verification(text)
    return {"step_verdicts": [bool(v) for v in verdict.step_verdicts], "overall": verdict.overall,
            "format_ok": bool(verdict.format_ok), "verifier_text": reply_text(tokenizer, ids)}


def _as_verification(verdict):
    """A judged answer's dict (see _judge) as the tasks.verify.Verification that best-of-N ranks."""
    return verify.Verification(step_verdicts=list(verdict["step_verdicts"]), overall=verdict["overall"],
                               format_ok=bool(verdict["format_ok"]))


def _verified_reply(worker, tokenizer, verify_api, prompt, job, stop, emit):
    """Best-of-N: sample N answers, let the verifier judge each, emit the best.
    Returns (finish_reason, tokens of the chosen reply, tokens generated for all N)."""
    n = job["verify_samples"]
    emit("status", f"sampling {n} answers")
    replies, finished = _sample_candidates(worker.engine, tokenizer, prompt, job, stop)
    if replies is None:
        return "cancelled", 0, 0
    generated = sum(len(r) for r in replies)
    question = job["messages"][-1]["content"]
    # the answers as the client will see them: calculator calls in <<expr=value>> form, cut at a stop sequence
    texts, ended = [], []
    for ids, done in zip(replies, finished):
        text, cut = cut_at_stop(reply_text(tokenizer, ids), job["stop"])
        texts.append(text)
        ended.append(done or cut)
    verdicts = []
    for i, text in enumerate(texts):
        emit("status", f"verifying answer {i + 1} of {n}")
        verdict = _judge(worker, verify_api, tokenizer, question, text, job["verifier_max_tokens"], stop)
        if verdict is None:
            return "cancelled", 0, generated
        verdicts.append(verdict)
    ranked = [_as_verification(v) for v in verdicts]
    best = verify.best_of_n(ranked)  # the same ranking co-training's best-of-N evaluation uses
    if texts[best]:
        emit("text", texts[best])
    emit("verification", {
        "chosen": best, "num_samples": n, "steps": verify_api.split_steps(texts[best]),  # texts are display text already
        **{k: verdicts[best].get(k) for k in ("step_verdicts", "overall", "format_ok", "verifier_text")},
        "candidates": [{"step_verdicts": v["step_verdicts"], "overall": v["overall"], "format_ok": v["format_ok"],
                        "score": list(verify.verdict_score(r)), "preview": t[:120]} for v, r, t in zip(verdicts, ranked, texts)],
    })
    return ("stop" if ended[best] else "length"), len(replies[best]), generated


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
            finish, count, generated = _sample_stream(worker.engine, tokenizer, job["prompt"], job, stop, emit)
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
    closed or cancelled. The first event is ("worker", id); the last is ("end", info), ("error", message) or
    ("shutdown", message) when the server shut down before the reply was done (queued, or cut at the deadline).
    The thread, not this generator, hands the worker back, so a worker is never reused while it generates."""
    pool = app_state.pool
    loop = asyncio.get_running_loop()
    worker = await pool.acquire(request.is_disconnected)
    if worker is None:
        return
    if worker == "shutdown":
        yield "shutdown", "the server is shutting down and did not start this reply; try again later"
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
        pool.running.pop(stop, None)
        pool.requests_served += 1
        pool.release(worker)

    def on_exit():
        try:
            loop.call_soon_threadsafe(finished)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody needs the worker
            pass

    thread = threading.Thread(target=run_job, name=f"generate-w{worker.id}", daemon=True,
                              args=(worker, app_state.tokenizer, app_state.verify_api, job, stop, emit, on_exit))
    pool.running[stop] = job
    try:
        thread.start()
    except BaseException:
        finished()
        raise
    try:
        yield "worker", worker.id
        while True:
            kind, payload = await events.get()
            if kind == "end" and job.get("cut_by_shutdown"):
                yield "shutdown", "the server shut down before this reply was finished; it is incomplete"
                return
            yield kind, payload
            if kind in ("end", "error"):
                return
    finally:
        stop.set()  # the thread sees it before its next token and hands the worker back itself


# -----------------------------------------------------------------------------
# Cross-site and auth checks, before any route runs

def _host_name(host):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1', 'Example.com' -> 'example.com'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_hosts(bind_host):
    """The Host names a server bound to `bind_host` answers to: for a loopback address only loopback names,
    so a web page on a DNS name that an attacker points at 127.0.0.1 (DNS rebinding) is refused;
    None (any name) when the server listens on the network."""
    try:
        loopback = ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = bind_host == "localhost"
    return ["127.0.0.1", "localhost", "::1"] if loopback else None


class RequestGuard:
    """ASGI middleware in front of every route. It refuses, with a JSON error, before the body is read:
    a Host the server does not answer to (400), a POST from a browser page of another origin unless
    `allow_origins` names it (403; None means same origin only, ["*"] any), a /v1 request without the bearer
    `api_key` when one is set (401), a POST body that is not application/json (415: only JSON needs a CORS
    preflight, so no cross-site form can start a generation) and a declared body over MAX_BODY_BYTES (413).
    It answers CORS preflights for the allowed origins and adds Access-Control-Allow-Origin for them."""

    def __init__(self, app, allow_origins=None, api_key=None, allowed_hosts=None):
        self.app = app
        self.allow_origins = [o.rstrip("/").lower() for o in allow_origins] if allow_origins else None
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts

    def origin_allowed(self, origin, host):
        if self.allow_origins and ("*" in self.allow_origins or origin in self.allow_origins):
            return True
        return origin in (f"http://{host}", f"https://{host}")  # the page this server served itself

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        host = headers.get("host", "").strip().lower()
        origin = headers.get("origin", "").strip().rstrip("/").lower() or None

        async def refuse(status, message, code, extra_headers=()):
            body = json.dumps(error_body(message, status, code=code)).encode("utf-8")
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    *[(k.encode(), v.encode()) for k, v in extra_headers]]})
            await send({"type": "http.response.body", "body": body})

        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            return await refuse(400, f"this server answers only to {', '.join(self.allowed_hosts)}, not to Host "
                                     f"{host[:100]!r} (a guard against DNS rebinding)", "bad_host")
        cross_site = origin is not None and origin not in (f"http://{host}", f"https://{host}")
        if method not in ("GET", "HEAD") and origin is not None and not self.origin_allowed(origin, host):
            return await refuse(403, f"cross-origin request from {origin[:100]!r} refused; start the server with "
                                     f"--allow_origin {origin[:100]} to allow that site", "origin_not_allowed")
        cors = [("access-control-allow-origin", origin), ("vary", "Origin")] if cross_site else []
        if method == "OPTIONS" and cors and "access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204, "headers": [
                (k.encode(), v.encode()) for k, v in cors + [
                    ("access-control-allow-methods", "GET, POST, OPTIONS"),
                    ("access-control-allow-headers", "Authorization, Content-Type"),
                    ("access-control-max-age", "600")]]})
            return await send({"type": "http.response.body", "body": b""})
        if self.api_key is not None and path.startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await refuse(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                         "with the key the server was started with (--api_key)", "invalid_api_key",
                                    [("www-authenticate", "Bearer")] + cors)
        if method == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return await refuse(415, f"the request body must be JSON sent as 'Content-Type: application/json', "
                                         f"got {media_type[:100] or 'no Content-Type'!r}", "unsupported_media_type", cors)
            declared = headers.get("content-length")
            if declared is not None and not declared.strip().isdigit():
                return await refuse(400, f"bad Content-Length {declared[:40]!r}", "bad_content_length", cors)
            if declared is not None and int(declared) > MAX_BODY_BYTES:
                return await refuse(413, f"request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES}",
                                    "body_too_large", cors)

        async def send_with_cors(message):
            if cors and message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(k.encode(), v.encode()) for k, v in cors]}
            await send(message)
        await self.app(scope, receive, send_with_cors)


# -----------------------------------------------------------------------------
# Example prompts from the task the checkpoint was trained on

def example_prompts(meta, count=NUM_EXAMPLES):
    """{"task": display name, "prompts": [user messages]} from the first test (or val) examples of the task
    the checkpoint's training run named (user_config "task" for RL and co-training, "tasks" for SFT and
    mid-training: the first task of the list whose data is here), or None when there is none to show."""
    config = (meta or {}).get("user_config") or {}
    spec = config.get("task") or config.get("tasks")
    if not isinstance(spec, str) or not spec.strip():
        return None
    try:
        from tasks.by_name import TASKS, parse_task_spec, make_task
        listed = [(name, difficulty) for name, _, _, _, difficulty in parse_task_spec(spec)]
    except (ImportError, ValueError) as e:
        logger.warning(f"no example prompts: cannot read the checkpoint's task list {spec!r} ({e})")
        return None
    for name, difficulty in listed:
        for split in ("test", "val"):
            try:
                task = make_task(name, split, size=50, difficulty=difficulty)
            except Exception as e:  # missing data sets and the like: try the next task
                logger.info(f"no example prompts from {name} ({split}): {str(e).splitlines()[0][:200]}")
                break
            if task is None or len(task) == 0:
                continue
            prompts = []
            for i in range(min(len(task), 20)):
                first = task[i]["messages"][0]
                if first["role"] == "user" and isinstance(first["content"], str) and len(first["content"]) <= 500:
                    prompts.append(first["content"])
                if len(prompts) == count:
                    break
            if prompts:
                return {"task": TASKS.get(name, name), "prompts": prompts}
    return None


# -----------------------------------------------------------------------------
# The app

def load_ui_html():
    return resources.files("nanochat").joinpath("ui.html").read_text(encoding="utf-8")


def create_app(workers, tokenizer, model_name="nanochat", verify_api=None, verify_samples=4,
               verifier_max_tokens=VERIFIER_MAX_TOKENS, max_queue=DEFAULT_MAX_QUEUE, allow_origins=None,
               api_key=None, allowed_hosts=None, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT, examples=None):
    """The FastAPI app over already-loaded workers (see load_workers). verify_api: the module tasks.verify
    (build_verifier_conversation, parse_verification, split_steps; tests pass stand-ins with those three);
    verification is offered when it is given and every worker has a verifier engine. allow_origins,
    api_key, allowed_hosts: see RequestGuard. examples: what example_prompts returns, shown on an empty chat.
    app.state.begin_shutdown() (callable from any thread) starts a graceful shutdown."""
    from contextlib import asynccontextmanager
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    workers = list(workers)
    if not workers:
        raise ValueError("create_app needs at least one worker")
    verifier_available = verify_api is not None and all(w.verifier_engine is not None for w in workers)
    if verify_api is not None and not verifier_available:
        raise ValueError("verify_api was given but some workers have no verifier engine")
    if not 1 <= verify_samples <= MAX_VERIFY_SAMPLES:
        raise ValueError(f"verify_samples must be between 1 and {MAX_VERIFY_SAMPLES}, got {verify_samples}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    ui_html = load_ui_html()
    context_len = min(w.context_len for w in workers)

    @asynccontextmanager
    async def lifespan(app):
        # the queue belongs to the running event loop, so the pool is made here, not at import time
        app.state.pool = WorkerPool(workers, max_queue)
        loop = asyncio.get_running_loop()
        app.state.begin_shutdown = lambda: loop.call_soon_threadsafe(app.state.pool.shutdown, shutdown_timeout)
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan)
    app.state.tokenizer = tokenizer
    app.state.verify_api = verify_api if verifier_available else None
    app.state.workers = workers
    app.add_middleware(RequestGuard, allow_origins=allow_origins, api_key=api_key, allowed_hosts=allowed_hosts)

    def error_response(err):
        return JSONResponse(status_code=err.status, headers=err.headers,
                            content=error_body(err.message, err.status, err.param, err.code))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405, ...: the same JSON error shape as everything else
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                            content=error_body(message, exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # a bug: still JSON, and the traceback stays in the log
        logger.exception(f"unhandled error on {request.method} {request.url.path}")
        return JSONResponse(status_code=500, content=error_body(f"internal server error ({type(exc).__name__})", 500))

    async def read_body(request):
        """The body, read as it streams in and cut off at MAX_BODY_BYTES (a chunked upload has no
        Content-Length to check first): memory stays bounded whatever the client sends."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(f"request body is over {MAX_BODY_BYTES} bytes (the limit); stopped reading it",
                                   status=413, code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_job(request, openai_api):
        """The validated job for a request body, with the prompt tokenized and max_tokens fitted to the context."""
        body = await read_body(request)
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or an integer over 4,300 digits
            raise RequestError(f"the request body is not valid JSON: {str(e)[:200]}")
        except RecursionError:
            raise RequestError("the request body is not valid JSON: nested too deeply")
        job = parse_chat_request(payload, openai_api=openai_api, verifier_available=verifier_available)
        prompt = tokenizer.render_for_completion({"messages": prompt_messages(job["messages"])})
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

    async def admit(request, openai_api):
        """(job, ticket): a validated request that holds a place in the queue."""
        job = await read_job(request, openai_api)
        return job, app.state.pool.admit()

    class TicketedStream(StreamingResponse):
        """A streaming response that gives its queue place back however it ends (even if the client left
        before the stream's first step, when the generator's own cleanup never runs)."""

        def __init__(self, content, ticket):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.ticket = ticket

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.ticket.release()

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "shutting_down" if pool.closing else "ok", "ready": not pool.closing, "model": model_name,
                "num_workers": len(pool.workers), "available_workers": pool.idle.qsize(),
                "queue_length": pool.waiting, "max_queue": pool.max_queue,
                "verifier": verifier_available, "verify_samples": verify_samples if verifier_available else 0,
                "context_len": context_len, "api_key_required": api_key is not None,
                "task": examples["task"] if examples else None, "examples": examples["prompts"] if examples else [],
                "limits": {"max_messages": MAX_MESSAGES, "max_message_chars": MAX_MESSAGE_CHARS,
                           "max_conversation_chars": MAX_CONVERSATION_CHARS, "max_tokens": MAX_MAX_TOKENS,
                           "max_body_bytes": MAX_BODY_BYTES, "max_stop_sequences": MAX_STOP_SEQUENCES,
                           "temperature": [MIN_TEMPERATURE, MAX_TEMPERATURE], "top_k": [MIN_TOP_K, MAX_TOP_K],
                           "top_p": [0.0, 1.0]}}

    @app.get("/stats")
    async def stats():
        return app.state.pool.stats()

    def model_card():
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error_response(RequestError(f"the model {model_id[:200]!r} does not exist; this server serves "
                                               f"{model_name!r}", "model", status=404, code="model_not_found"))
        return model_card()

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            job, ticket = await admit(request, openai_api=False)
        except RequestError as err:
            return error_response(err)

        async def stream():
            gpu = None
            try:
                async for kind, payload in generation_events(request, app.state, job):
                    if kind == "worker":
                        gpu = payload
                    elif kind == "text":
                        yield sse({"token": payload, "gpu": gpu})
                    elif kind == "status":
                        yield sse({"status": payload, "gpu": gpu})
                    elif kind == "verification":
                        yield sse({"verification": payload, "gpu": gpu})
                    elif kind in ("error", "shutdown"):
                        yield sse({"error": payload, "gpu": gpu})
                        yield sse({"done": True, "finish_reason": "error" if kind == "error" else "shutdown", "gpu": gpu})
                    elif kind == "end":
                        yield sse({"done": True, "gpu": gpu, **payload})
            finally:
                ticket.release()

        return TicketedStream(stream(), ticket)

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        try:
            job, ticket = await admit(request, openai_api=True)
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
                try:
                    yield sse(chunk({"role": "assistant", "content": ""}))
                    verification = None
                    async for kind, payload in generation_events(request, app.state, job):
                        if kind == "text":
                            yield sse(chunk({"content": payload}))
                        elif kind == "verification":
                            verification = payload
                        elif kind == "error":
                            yield sse(error_body(payload, 500))
                        elif kind == "shutdown":
                            yield sse(error_body(payload, 503, code="shutting_down"))
                        elif kind == "end":
                            extra = {"verification": verification} if verification is not None else {}
                            yield sse(chunk({}, payload["finish_reason"], **extra))
                            if job["include_usage"]:
                                yield sse({**chunk({}), "choices": [], "usage": usage(payload)})
                    yield "data: [DONE]\n\n"
                finally:
                    ticket.release()

            return TicketedStream(stream(), ticket)

        try:
            pieces, end, verification = [], None, None
            async for kind, payload in generation_events(request, app.state, job):
                if kind == "text":
                    pieces.append(payload)
                elif kind == "verification":
                    verification = payload
                elif kind == "error":
                    return JSONResponse(status_code=500, content=error_body(payload, 500))
                elif kind == "shutdown":
                    return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                        content=error_body(payload, 503, code="shutting_down"))
                elif kind == "end":
                    end = payload
        finally:
            ticket.release()
        if end is None:  # the client went away; nobody is listening to this response
            return JSONResponse(status_code=499, content=error_body("client disconnected", 499, code="cancelled"))
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

def worker_devices(device_type, num_gpus):
    """The devices to put replicas on: cuda:0..N-1, or the single CPU/MPS device."""
    import torch
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if num_gpus > available:
            raise ValueError(f"--num_gpus {num_gpus} asks for more GPUs than the {available} visible")
        return [torch.device("cuda", i) for i in range(num_gpus)]
    if num_gpus != 1:
        raise ValueError(f"--num_gpus {num_gpus}: only CUDA serves several replicas; on {device_type} use --num_gpus 1")
    return [torch.device(device_type)]


def load_workers(args):
    """One Worker per device from the checkpoints named by the flags.
    Returns (workers, tokenizer, model_name, meta of the served checkpoint)."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.engine import Engine, check_decode
    compute_init(args.device_type)
    device_type = args.device_type or autodetect_device_type()
    check_decode(args.decode, device_type)
    workers, tokenizer, meta = [], None, {}
    for i, device in enumerate(worker_devices(device_type, args.num_gpus)):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        verifier_engine = None
        if args.verifier:
            # a co-training checkpoint holds both models; any other source holds just the verifier
            verifier, _, verifier_meta = load_model(args.verifier_source, device, phase="eval", model_tag=args.verifier,
                                                    step=args.verifier_step,
                                                    model_key="verifier" if args.verifier_source == "cotrain" else None)
            verifier_engine = Engine(verifier, tokenizer, decode=args.decode, keep_graphs=True)
            verifier_format = (verifier_meta.get("user_config") or {}).get("verifier_format", "verdicts")
        # keep_graphs: on CUDA a request whose shape repeats (batch, cache length bucket) skips the graph capture
        engine = Engine(model, tokenizer, decode=args.decode, keep_graphs=True)
        workers.append(Worker(i, engine, device, verifier_engine, verifier_format if args.verifier else "verdicts"))
        logger.info(f"worker {i} ready on {device}")
    model_name = f"nanochat-{args.source}" + (f"-{args.model_tag}" if args.model_tag else "") + f"-step{meta.get('step', '?')}"
    return workers, tokenizer, model_name, meta


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
    parser.add_argument("--verifier", default=None, metavar="TAG", help="checkpoint tag holding a process verifier (a co-training checkpoint holds it under the "
                             "generator's tag, e.g. d4 after dev/runcpu.sh): enables best-of-N with 'verify'")
    parser.add_argument("--verifier_source", default="cotrain", choices=sorted(CHECKPOINT_DIRS),
                        help="which checkpoints the verifier comes from")
    parser.add_argument("--verifier_step", type=int, default=None, help="verifier checkpoint step; default: the last one")
    parser.add_argument("--verify_samples", type=int, default=4, help=f"answers sampled per verified request (1..{MAX_VERIFY_SAMPLES})")
    parser.add_argument("--verifier_max_tokens", type=int, default=VERIFIER_MAX_TOKENS, help="longest verification the verifier may write")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a worker; more get a 503 with Retry-After")
    parser.add_argument("--shutdown_timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="on SIGTERM/Ctrl-C, seconds running replies get to finish (queued ones are refused at once)")
    parser.add_argument("--allow_origin", action="append", default=None, metavar="ORIGIN",
                        help="a web origin (e.g. https://my.app, or '*') whose pages may POST here; repeatable. "
                             "Default: only the chat UI this server serves")
    parser.add_argument("--api_key", default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOCHAT_API_KEY; unset: no auth)")
    add_decode_flag(parser)
    args = parser.parse_args(argv)
    if args.num_gpus < 1:
        parser.error("--num_gpus must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.verify_samples <= MAX_VERIFY_SAMPLES:
        parser.error(f"--verify_samples must be between 1 and {MAX_VERIFY_SAMPLES}")
    if args.verifier_max_tokens < 1:
        parser.error("--verifier_max_tokens must be at least 1")
    if args.max_queue < 0:
        parser.error("--max_queue must be at least 0")
    if not args.shutdown_timeout >= 0:
        parser.error("--shutdown_timeout must be at least 0")
    for origin in args.allow_origin or []:
        parts = urlsplit(origin)
        if origin != "*" and not (parts.scheme in ("http", "https") and parts.netloc and parts.path in ("", "/")):
            parser.error(f"--allow_origin {origin!r}: expected '*' or an origin like https://example.com:8443")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api_key must not be empty")
    return args


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    verify_api = verify if args.verifier else None
    try:
        workers, tokenizer, model_name, meta = load_workers(args)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        raise UserInputError(f"could not load the model: {type(e).__name__}: {e}") from None
    examples = example_prompts(meta)
    app = create_app(workers, tokenizer, model_name=model_name, verify_api=verify_api, verify_samples=args.verify_samples,
                     verifier_max_tokens=args.verifier_max_tokens, max_queue=args.max_queue,
                     allow_origins=args.allow_origin, api_key=args.api_key, allowed_hosts=loopback_hosts(args.host),
                     shutdown_timeout=args.shutdown_timeout, examples=examples)
    logger.info(f"serving {model_name} on http://{args.host}:{args.port} with {len(workers)} worker(s)"
                + (f", verifier {args.verifier}" if verify_api else "")
                + (f"; trained on {examples['task']}" if examples else ""))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # refuse queued requests and start the shutdown deadline at once; uvicorn then waits for the
            # running streams (and cancels them a second after our own deadline, should one hang)
            if not self.should_exit and hasattr(app.state, "begin_shutdown"):
                app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout + 1,
                            log_level=os.environ.get("NANOCHAT_LOG_LEVEL", "info").lower())
    Server(config).run()


if __name__ == "__main__":
    run_stage(main)
