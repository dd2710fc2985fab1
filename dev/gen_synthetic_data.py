"""
Generate identity conversations (who the assistant is, who made it, what it can and cannot do) for
mid-training and SFT, by asking an LLM behind any OpenAI-compatible chat-completions API to write them.
The output is JSONL in the format tasks/customjson.py reads: one {"messages": [...]} per line.

    OPENAI_API_KEY=sk-... python -m dev.gen_synthetic_data --base_url https://openrouter.ai/api/v1 \
        --model google/gemini-2.5-flash --num_conversations 1000 --concurrency 16
    python -m dev.gen_synthetic_data --base_url http://127.0.0.1:8000/v1 --model nanochat -n 50   # our chat_web

Each request is steered by a randomly drawn first user message, user style and conversation length
(seeded per conversation, so a rerun asks the same questions). Every reply is validated (valid JSON,
roles alternating user/assistant from the user, ending with the assistant, non-empty bounded contents,
no chat-template markup) and retried up to --max_retries times if it fails. Lines are appended as they
arrive, so an interrupted run loses nothing: running again tops the file up to --num_conversations
(--overwrite starts over). The API key comes from the environment variable named by --api_key_env
(default OPENAI_API_KEY); without one, no Authorization header is sent (fine for local servers).
"""

import argparse
import concurrent.futures
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request

IDENTITY_FACTS = """\
- Name: nanochat-cotrain. It is a small chat model trained entirely from scratch with an open-source harness
  of the same name, in the style of Andrej Karpathy's nanochat.
- How it was made: a byte-level BPE tokenizer, pretraining on web text, mid-training on conversations,
  supervised fine-tuning, then reinforcement learning in which a generator model and a verifier model that
  checks each reasoning step are trained together (co-training).
- It is small (tens to hundreds of millions of parameters), so it makes mistakes, especially on facts and
  long reasoning; users should double-check important answers.
- It can use a calculator tool for arithmetic. It has no internet access, cannot see images, and does not
  remember past conversations.
- It answers best in English. It is not ChatGPT, Claude or Gemini, and was not made by OpenAI, Anthropic or
  Google; it was made by the nanochat-cotrain project contributors.
- Its code is open source (MIT licence), so anyone can train their own copy on rented GPUs.
"""

FIRST_MESSAGES = [
    "Who are you?", "hi", "Hello! What's your name?", "What are you exactly?", "Are you ChatGPT?",
    "who made you", "Can you tell me about yourself?", "What can you do?", "How were you trained?",
    "Are you a real person?", "What is nanochat?", "Do you have feelings?", "How big are you?",
    "Can you browse the internet?", "Are you better than GPT-4?", "What's a verifier model?",
    "Can I run you on my laptop?", "hey there, what should I call you?", "Do you remember our last chat?",
    "Are you open source?", "What languages do you speak?", "How much did it cost to train you?",
    "Can you do math?", "Why do you make mistakes?", "Who is your creator?", "yo",
    "Tell me something about how you work.", "Are you made by Google?", "What is co-training?",
]
USER_STYLES = [
    "curious and friendly", "terse, writes in lowercase", "skeptical and a bit challenging",
    "a student learning about machine learning", "a software engineer who asks technical questions",
    "polite and formal", "playful, uses the occasional emoji", "a non-native English speaker",
]
TEMPLATE_MARKUP = re.compile(r"<\|[a-z_]+\|>")


def build_prompt(rng, facts):
    num_turns = rng.choice([1, 1, 2, 2, 3, 4])
    first = rng.choice(FIRST_MESSAGES)
    style = rng.choice(USER_STYLES)
    return (
        "You write training data for a small chat assistant. Write one realistic conversation between a user "
        "and the assistant described by these facts:\n\n" + facts + "\n"
        f"The user is {style}. The conversation has exactly {num_turns} user message(s), each answered by the "
        f"assistant. The first user message is: {json.dumps(first)}\n"
        "The assistant is helpful, honest and concise, stays consistent with the facts, and never invents "
        "other facts about itself.\n\n"
        'Reply with JSON only, no prose and no code fences, shaped exactly like: {"messages": '
        '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    )


def extract_json(text):
    """The JSON value in a reply, tolerating code fences and prose around one object or array."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError("the reply contains no JSON")
    start = min(starts)
    end = max(text.rfind("}"), text.rfind("]"))
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not valid JSON ({e.msg})") from None


def validate_conversation(value, max_messages=12, max_chars=3000):
    """The list of messages of a generated conversation, or ValueError saying what is wrong with it."""
    messages = value.get("messages") if isinstance(value, dict) else value
    if not isinstance(messages, list):
        raise ValueError('expected {"messages": [...]} or a list of messages')
    if not 2 <= len(messages) <= max_messages:
        raise ValueError(f"{len(messages)} messages (expected 2 to {max_messages})")
    clean = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ValueError(f"message {k} must be an object with just 'role' and 'content'")
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {k} has role {message['role']!r}, expected {expected!r}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {k} has empty or non-string content")
        if len(content) > max_chars:
            raise ValueError(f"message {k} is {len(content)} characters (at most {max_chars})")
        if TEMPLATE_MARKUP.search(content):
            raise ValueError(f"message {k} contains chat-template markup")
        clean.append({"role": expected, "content": content.strip()})
    if clean[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with the assistant")
    return clean


class FatalAPIError(RuntimeError):
    """An error no retry can fix (bad key, unknown model): stop the whole run."""


def chat_completion(base_url, model, prompt, api_key=None, temperature=1.0, timeout=60.0, json_mode=False):
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature}
    if json_mode:
        payload["response_format"] = {"type": "json_object"}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(payload).encode("utf-8"),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")[:300]
        if e.code in (400, 401, 403, 404, 422):  # the same request would fail again: bad key, model or parameters
            raise FatalAPIError(f"HTTP {e.code} from {base_url}: {detail}") from None
        raise RuntimeError(f"HTTP {e.code}: {detail}") from None
    except json.JSONDecodeError:
        raise RuntimeError("the API answered with something that is not JSON") from None
    try:
        return body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"unexpected response shape: {str(body)[:300]}") from None


def generate_one(index, args, facts, api_key):
    """(index, messages, None) or (index, None, last error), after up to args.max_retries attempts."""
    rng = random.Random(f"{args.seed}/{index}")
    prompt = build_prompt(rng, facts)
    error = None
    for attempt in range(args.max_retries + 1):
        if attempt:
            time.sleep(min(args.retry_backoff * 2 ** (attempt - 1), 30.0))
        try:
            reply = chat_completion(args.base_url, args.model, prompt, api_key, args.temperature, args.timeout, args.json_mode)
            return index, validate_conversation(extract_json(reply or "")), None
        except FatalAPIError:
            raise
        except (ValueError, RuntimeError, OSError) as e:  # OSError: timeouts, refused connections
            error = f"{type(e).__name__}: {e}"
    return index, None, error


def count_existing(path):
    """Conversations already in the output file. A damaged last line (a crash mid-write) is cut off;
    any other bad line is an error, so a file this script did not write is never silently changed."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    count = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            validate_conversation(json.loads(line))
            count += 1
        except (ValueError, json.JSONDecodeError) as e:
            if lineno == len(lines) and not line.endswith("\n"):
                print(f"{path}: dropping the unfinished last line", flush=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(lines[:-1])
                return count
            raise ValueError(f"{path}, line {lineno}: not a valid conversation ({e}); fix it or use --overwrite") from None
    if lines and not lines[-1].endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    return count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate identity conversations through an OpenAI-compatible API",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_url", default="https://api.openai.com/v1", help="API root; /chat/completions is appended")
    parser.add_argument("--model", default="gpt-4o-mini", help="model name the API expects")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key (may be unset)")
    parser.add_argument("-n", "--num_conversations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--output", default=None, help="JSONL to write (default: <base dir>/identity_conversations.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="start a new file instead of topping up the existing one")
    parser.add_argument("--facts_file", default=None, help="text file describing the assistant (default: built-in facts)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json_mode", action="store_true", help="ask for response_format json_object (if the API supports it)")
    parser.add_argument("--max_retries", type=int, default=3, help="extra attempts per conversation after a failure")
    parser.add_argument("--retry_backoff", type=float, default=1.0, help="seconds before the first retry (doubling)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_conversations < 1 or args.concurrency < 1 or args.max_retries < 0:
        parser.error("--num_conversations and --concurrency must be >= 1, --max_retries >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.output is None:
        from nanochat.common import get_base_dir
        args.output = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    facts = IDENTITY_FACTS
    if args.facts_file:
        with open(args.facts_file, encoding="utf-8") as f:
            facts = f.read()
    api_key = os.environ.get(args.api_key_env) or None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.overwrite and os.path.exists(args.output):
        os.remove(args.output)
    done = count_existing(args.output)
    todo = list(range(done, args.num_conversations))
    print(f"{args.output}: {done} conversations present, generating {len(todo)} with {args.model} at {args.base_url} "
          f"({args.concurrency} at a time{', with an API key' if api_key else ', no API key'})", flush=True)
    failures = []
    t0 = time.time()
    with open(args.output, "a", encoding="utf-8") as out, \
            concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(generate_one, i, args, facts, api_key) for i in todo]
        try:
            for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
                index, messages, error = future.result()
                if messages is None:
                    failures.append((index, error))
                else:
                    out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    out.flush()
                print(f"[{k}/{len(todo)}] {'ok' if messages else 'FAILED'} #{index} | {len(failures)} failed | "
                      f"{time.time() - t0:.0f}s" + (f" | {error}" if error else ""), flush=True)
        except FatalAPIError as e:
            for future in futures:
                future.cancel()
            print(f"error: {e} (stopping; {args.output} keeps what was written)", file=sys.stderr, flush=True)
            return 2
    total = done + len(todo) - len(failures)
    print(f"done: {total} conversations in {args.output}" + (f"; {len(failures)} failed after retries, "
                                                            f"run again to top up" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:  # a damaged output file, an unreadable facts file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
