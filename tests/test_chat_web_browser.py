"""
The chat UI (nanochat/ui.html) driven by a real browser: Playwright controls Debian's Chromium against the
chat server on 127.0.0.1. A person's session: the page loads, a message gets a streamed reply, Stop cuts a
long reply short (and the server stops generating), Regenerate and Edit work, an over-long message shows
the server's error and keeps the text, New conversation clears, and verified answers show step verdicts,
one line per answer step. Scrolling up while a reply streams stops the auto-scroll; a reply cut off by a
dying server is marked incomplete; an empty conversation offers example questions from the trained task;
a page on another origin cannot make the browser start a generation.

Needs the `playwright` Python package (dev extras) and /usr/bin/chromium (`apt-get install -y chromium`);
without them the tests skip and say so. Screenshots go to a tmp dir; their paths are printed.
"""

import os
import sys
import threading
import types

import pytest
import torch

from chat_web_fixtures import InProcessServer, make_workers
import scripts.chat_web as chat_web

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _loud_skip(reason):
    message = f"!!! BROWSER TEST SKIPPED: {reason} !!!"
    print(message, file=sys.stderr)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _loud_skip("the `playwright` Python package is missing (pip install playwright; it is in the dev extras)")
    if not os.path.exists(CHROMIUM):
        _loud_skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the browser, the server and the model share 2 cores
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
    torch.set_num_threads(previous)


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    yield page
    context.close()


def screenshot(page, tmp_path, name):
    path = os.path.join(tmp_path, name)
    page.screenshot(path=path, full_page=True)
    print(f"screenshot saved to {path}")
    return path


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page):
    page.wait_for_function("document.body.dataset.busy === 'false' && !document.querySelector('.message.pending')")


def hold_stream(engine, gates):
    """Make engine.generate pause before token n until its event is set, for each (n, event) in gates, so a
    reply cannot run to its token limit before the test has watched it grow and clicked Stop, however slowly
    the browser runs beside the model (a busy CI machine once let a 4000-token reply finish first).
    Undo with `del engine.generate`."""
    real = engine.generate

    def generate(*args, **kwargs):
        stream = real(*args, **kwargs)
        try:
            for i, item in enumerate(stream):
                for n, event in gates:
                    if i == n:
                        event.wait(timeout=120)
                yield item
        finally:
            stream.close()
    engine.generate = generate


def test_chat_in_a_real_browser(page, tiny_tokenizer, tmp_path):
    from playwright.sync_api import expect
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, model_name="babbler")
    with InProcessServer(app) as server:
        worker = server.pool.workers[0]
        page.goto(server.url)
        expect(page.locator("#model-name")).to_contain_text("babbler")
        messages = page.locator(".message")
        replies = page.locator('.message[data-role="assistant"] .content')
        expect(messages).to_have_count(0)

        # a short reply, streamed in
        page.click("#settings-button")
        page.fill("#max-tokens", "12")
        send(page, "Hello there")
        wait_idle(page)
        expect(messages).to_have_count(2)
        expect(page.locator('.message[data-role="user"] .content')).to_have_text("Hello there")
        assert replies.first.inner_text().strip()
        expect(page.locator('.message[data-role="assistant"] .note')).to_have_text("stopped at the token limit")
        assert worker.history[-1]["finish_reason"] == "length" and worker.history[-1]["tokens"] == 12

        # a long reply: watch it grow, then stop it (held at token 20 until the page has shown some of it, and at
        # token 200 until Stop was clicked: the server must notice the closed stream, not the token limit)
        grow, stopped = threading.Event(), threading.Event()
        hold_stream(worker.engine, [(20, grow), (200, stopped)])
        page.fill("#max-tokens", "4000")
        send(page, "Tell me a very long story")
        expect(page.locator("#stop")).to_be_visible()
        page.wait_for_function("document.querySelectorAll('.message.assistant .content')[1]?.textContent.length > 0")
        first = len(replies.nth(1).text_content())
        grow.set()
        page.wait_for_function(f"document.querySelectorAll('.message.assistant .content')[1].textContent.length > {first}")
        page.click("#stop")
        wait_idle(page)
        stopped.set()
        del worker.engine.generate
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator('.message[data-role="assistant"] .note').nth(1)).to_have_text("stopped")
        stopped_text = replies.nth(1).text_content()
        assert len(stopped_text) > first
        for _ in range(100):  # the server notices the closed stream within a token or two
            if not worker.busy and worker.history[-1]["finish_reason"] == "cancelled":
                break
            page.wait_for_timeout(100)
        assert worker.history[-1]["finish_reason"] == "cancelled", worker.history[-1]
        assert worker.history[-1]["tokens"] < 4000

        # regenerate the stopped reply
        page.fill("#max-tokens", "12")
        page.click(".message.assistant .regenerate")
        wait_idle(page)
        expect(messages).to_have_count(4)
        expect(page.locator('.message[data-role="assistant"] .note').nth(1)).to_have_text("stopped at the token limit")

        # edit the first question: the conversation is cut after it and answered again
        page.locator(".message.user .edit").first.click()
        page.fill(".edit-box", "An edited question")
        page.click(".save-edit")
        wait_idle(page)
        expect(messages).to_have_count(2)
        expect(page.locator('.message[data-role="user"] .content')).to_have_text("An edited question")

        # an over-long message: the server's error is shown and the text stays in the box
        too_long = "x" * (chat_web.MAX_MESSAGE_CHARS + 1)
        send(page, too_long)
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error-text")).to_contain_text("too long")
        expect(page.locator("#error-text")).to_contain_text(str(chat_web.MAX_MESSAGE_CHARS))
        wait_idle(page)
        expect(messages).to_have_count(2)
        assert page.input_value("#input") == too_long
        screenshot(page, tmp_path, "chat_ui.png")

        # new conversation
        page.click("#error-close")
        page.click("#new-chat")
        expect(messages).to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
    assert page.js_errors == []


class MadeUpVerdicts:
    """A verify API that judges by the verifier's text (deterministic nonsense) so verdicts are mixed."""

    @staticmethod
    def build_verifier_conversation(question, solution):
        return {"messages": [{"role": "user", "content": f"Check: {question}\n{solution}"}]}

    @staticmethod
    def parse_verification(text):
        h = sum(map(ord, text))
        return types.SimpleNamespace(step_verdicts=[bool(h >> i & 1) for i in range(3)], overall=bool(h & 8), format_ok=True)

    @staticmethod
    def split_steps(text):
        return [f"first part {text[:6]!r}", f"second part {text[6:12]!r}", "the rest"]


def test_verified_answer_shows_step_verdicts(page, tiny_tokenizer, tmp_path):
    from playwright.sync_api import expect
    workers = make_workers(tiny_tokenizer, verifier=True)
    app = chat_web.create_app(workers, tiny_tokenizer, model_name="babbler", verify_api=MadeUpVerdicts(),
                              verify_samples=2, verifier_max_tokens=8)
    with InProcessServer(app) as server:
        page.goto(server.url)
        expect(page.locator("#verify-label")).to_be_visible()
        page.check("#verify-toggle")
        page.click("#settings-button")
        page.fill("#max-tokens", "8")
        send(page, "What is 2 + 2?")
        wait_idle(page)
        verification = page.locator(".message.assistant .verification")
        expect(verification).to_contain_text("best of 2")
        expect(verification.locator("li.step")).to_have_count(3)
        expect(verification.locator("li.step").first).to_contain_text("first part")
        marks = [m.strip() for m in verification.locator("li.step > span").all_inner_texts()]
        assert set(marks) <= {"✓", "✗"} and len(marks) == 3
        screenshot(page, tmp_path, "chat_ui_verified.png")
    assert page.js_errors == []


class OneVerdict:
    """A verifier that judges only the first step of a six-line answer (what the co-trained d4 model did)."""

    @staticmethod
    def build_verifier_conversation(question, solution):
        return {"messages": [{"role": "user", "content": f"Check: {question}\n{solution}"}]}

    @staticmethod
    def parse_verification(text):
        return types.SimpleNamespace(step_verdicts=[False], overall=False, format_ok=False)

    @staticmethod
    def split_steps(text):
        return [f"step line {i + 1}: {text[i * 3:i * 3 + 3]!r}" for i in range(6)]


def test_verify_panel_shows_every_answer_step(page, tiny_tokenizer, tmp_path):
    from playwright.sync_api import expect
    app = chat_web.create_app(make_workers(tiny_tokenizer, verifier=True), tiny_tokenizer, model_name="babbler",
                              verify_api=OneVerdict(), verify_samples=2, verifier_max_tokens=4)
    with InProcessServer(app) as server:
        page.goto(server.url)
        page.check("#verify-toggle")
        page.click("#settings-button")
        page.fill("#max-tokens", "20")
        send(page, "A question with a six-line answer")
        wait_idle(page)
        steps = page.locator(".message.assistant .verification li.step")
        expect(steps).to_have_count(6)
        for i in range(6):
            expect(steps.nth(i)).to_contain_text(f"step line {i + 1}")
        marks = [m.strip() for m in steps.locator("span").all_inner_texts()]
        assert marks == ["✗", "?", "?", "?", "?", "?"]
        expect(page.locator(".verification .step-count")).to_have_text("The verifier wrote 1 step verdict for 6 steps.")
        screenshot(page, tmp_path, "verify_every_step.png")
    assert page.js_errors == []


def test_scrolling_up_stops_auto_scroll(page, tiny_tokenizer, tmp_path, monkeypatch):
    import time
    workers = make_workers(tiny_tokenizer)
    engine = workers[0].engine
    fast = engine.generate

    def slow(*args, **kwargs):  # a reply long enough in time to scroll around in, whatever this machine's speed
        for step in fast(*args, **kwargs):
            time.sleep(0.004)
            yield step
    monkeypatch.setattr(engine, "generate", slow)
    app = chat_web.create_app(workers, tiny_tokenizer, model_name="babbler")
    page.set_viewport_size({"width": 900, "height": 560})
    with InProcessServer(app) as server:
        page.goto(server.url)
        page.click("#settings-button")
        page.fill("#max-tokens", "4000")
        send(page, "Tell me a very long story")
        # let the reply grow to a few screens, following it
        page.wait_for_function("(() => { const m = document.getElementById('messages'); return m.scrollHeight > 3 * m.clientHeight; })()",
                               timeout=60_000)
        gap = "(() => { const m = document.getElementById('messages'); return m.scrollHeight - m.scrollTop - m.clientHeight; })()"
        assert page.evaluate(gap) < 40, "the view did not follow the stream"
        # the reader scrolls up with the mouse wheel to read the question again
        page.hover("#messages")
        for _ in range(30):
            page.mouse.wheel(0, -2000)
        page.wait_for_function("document.getElementById('messages').scrollTop < 50")
        length = len(page.locator(".message.assistant .content").text_content())
        page.wait_for_function(f"document.querySelector('.message.assistant .content').textContent.length > {length + 200}")
        assert page.evaluate("document.getElementById('messages').scrollTop") < 50, "the stream pulled the reader back down"
        screenshot(page, tmp_path, "scrolled_up_while_streaming.png")
        # scrolling back to the end follows the stream again
        page.mouse.wheel(0, 10 ** 6)
        page.wait_for_function(f"{gap} < 40")
        length = len(page.locator(".message.assistant .content").text_content())
        page.wait_for_function(f"document.querySelector('.message.assistant .content').textContent.length > {length + 200}")
        assert page.evaluate(gap) < 40
        page.click("#stop")
        wait_idle(page)
    assert page.js_errors == []


def test_a_reply_cut_off_by_a_dying_server_is_marked(page, tiny_tokenizer, tmp_path):
    from playwright.sync_api import expect
    from chat_web_fixtures import ServerProcess, write_base_dir
    write_base_dir(tmp_path, tiny_tokenizer)
    with ServerProcess(tmp_path) as server:
        page.goto(server.url)
        page.click("#settings-button")
        page.fill("#max-tokens", "4000")
        send(page, "Tell me a very long story")
        page.wait_for_function("document.querySelector('.message.assistant .content')?.textContent.length > 20")
        server.proc.kill()  # SIGKILL, by PID: the stream just stops
        server.proc.wait(10)
        wait_idle(page)
        reply = page.locator(".message.assistant")
        expect(reply).to_have_class("message assistant incomplete")
        expect(reply.locator(".note")).to_have_text("incomplete: the connection to the server ended before the reply was finished")
        assert reply.locator(".content").text_content()
        expect(page.locator("#error-text")).to_contain_text("connection to the server was lost")
        screenshot(page, tmp_path, "cut_reply.png")
    assert page.js_errors == []


def test_empty_conversation_shows_examples_from_the_trained_task(page, tiny_tokenizer, tmp_path):
    from playwright.sync_api import expect
    from tasks.arithmetic import ArithmeticTask
    examples = chat_web.example_prompts({"user_config": {"task": "arithmetic"}})  # what a co-training checkpoint records
    questions = [ArithmeticTask(split="test", size=50)[i]["messages"][0]["content"] for i in range(3)]
    assert examples == {"task": "Arithmetic", "prompts": questions}
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, model_name="babbler", examples=examples)
    with InProcessServer(app) as server:
        page.goto(server.url)
        expect(page.locator(".empty-hint")).to_contain_text("trained on Arithmetic")
        buttons = page.locator(".empty-hint button.example")
        expect(buttons).to_have_count(3)
        assert buttons.all_inner_texts() == questions
        screenshot(page, tmp_path, "examples.png")
        page.click("#settings-button")
        page.fill("#max-tokens", "8")
        buttons.nth(1).click()
        wait_idle(page)
        expect(page.locator('.message[data-role="user"] .content')).to_have_text(questions[1])
        expect(page.locator(".message")).to_have_count(2)
        page.click("#new-chat")
        expect(buttons).to_have_count(3)
    # without a recorded task, the plain hint
    app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, model_name="babbler")
    with InProcessServer(app) as server:
        page.goto(server.url)
        expect(page.locator(".empty-hint")).to_have_text("Start a conversation below.")
    assert page.js_errors == []


def test_a_page_on_another_origin_cannot_make_the_browser_generate(page, tiny_tokenizer):
    """The attack of the issue, in a real browser: a page from another origin (here another server on
    another port) posts to the chat server with every trick a page has. None may start a generation."""
    target_app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, model_name="target")
    other_app = chat_web.create_app(make_workers(tiny_tokenizer), tiny_tokenizer, model_name="other")
    with InProcessServer(target_app) as target, InProcessServer(other_app) as other:
        page.goto(other.url)
        body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
        outcomes = page.evaluate("""async ([url, body]) => {
            const out = {};
            const attempt = async (name, init) => {
                try { const r = await fetch(url, init); out[name] = r.type === "opaque" ? "opaque" : r.status; }
                catch (e) { out[name] = "blocked"; }
            };
            await attempt("no-cors text/plain", { method: "POST", mode: "no-cors", headers: { "Content-Type": "text/plain" }, body });
            await attempt("no-cors form", { method: "POST", mode: "no-cors", body: new URLSearchParams({ x: body }) });
            await attempt("cors json", { method: "POST", headers: { "Content-Type": "application/json" }, body });
            return out;
        }""", [target.url + "/chat/completions", body])
        # a classic form post, navigating a hidden iframe
        page.evaluate("""(url) => {
            const frame = document.createElement("iframe"); frame.name = "sink"; document.body.append(frame);
            const form = document.createElement("form"); form.method = "POST"; form.action = url; form.target = "sink";
            form.enctype = "text/plain";
            const field = document.createElement("input"); field.name = '{"messages": [{"role": "user", "content": "hi"}], "x": "';
            field.value = '"}'; form.append(field); document.body.append(form); form.submit();
        }""", target.url + "/v1/chat/completions")
        page.wait_for_timeout(1000)
        print("cross-origin attempts:", outcomes)
        assert outcomes["cors json"] == "blocked"  # the preflight was refused
        assert target.pool.requests_served == 0 and len(target.pool.workers[0].history) == 0
        # while the server's own page (same origin) still works
        page.goto(target.url)
        page.click("#settings-button")
        page.fill("#max-tokens", "3")
        send(page, "hello")
        wait_idle(page)
        assert len(target.pool.workers[0].history) == 1


def test_an_empty_reply_stays_in_the_conversation(page, tiny_tokenizer):
    """The model may answer with nothing: the UI shows that (and sends it back next turn) rather than
    treating it as a refused request."""
    from playwright.sync_api import expect
    app = chat_web.create_app(make_workers(tiny_tokenizer, stop_logit=15.0), tiny_tokenizer, model_name="mute")
    with InProcessServer(app) as server:
        page.goto(server.url)
        send(page, "Say nothing")
        wait_idle(page)
        expect(page.locator(".message")).to_have_count(2)
        expect(page.locator(".message.assistant .note")).to_have_text("the model ended its reply without writing anything")
        assert page.input_value("#input") == ""
        send(page, "Still there?")  # the history with the empty reply is accepted
        wait_idle(page)
        expect(page.locator(".message")).to_have_count(4)
        expect(page.locator("#error")).to_be_hidden()
    assert page.js_errors == []
