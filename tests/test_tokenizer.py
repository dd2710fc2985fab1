"""Tests for nanochat/tokenizer.py: encoding, storage, token bytes and chat rendering with masks."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, token_bytes_tensor

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------ plain text

@HYPO
@given(text=st.text(max_size=300))
def test_roundtrip_arbitrary_unicode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < tiny_tokenizer.get_bos_token_id() for i in ids)


@HYPO
@given(pieces=st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_special_tokens_never_come_from_plain_text(tiny_tokenizer, pieces):
    text = "".join(pieces)
    ids = tiny_tokenizer.encode(text)
    first_special = tiny_tokenizer.get_bos_token_id()
    assert all(i < first_special for i in ids)
    assert tiny_tokenizer.decode(ids) == text


def test_literal_bos_string_is_ordinary_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|bos|>")
    assert tiny_tokenizer.get_bos_token_id() not in ids
    assert len(ids) > 1 and tiny_tokenizer.decode(ids) == "<|bos|>"


@HYPO
@given(text=st.text(max_size=200))
def test_token_byte_lengths_add_up_to_utf8_length(tiny_tokenizer, text):
    # raw bytes, not decoded strings: lone continuation bytes (ids 128..255) count as 1 byte, not 3
    lengths = tiny_tokenizer.token_byte_lengths()
    assert sum(lengths[i] for i in tiny_tokenizer.encode(text)) == len(text.encode("utf-8"))


def test_vocab_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.get_vocab_size() == 512
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(512 - len(SPECIAL_TOKENS), 512))
    assert tok.get_bos_token_id() == ids[0]
    assert [tok.id_to_token(i) for i in ids] == SPECIAL_TOKENS
    assert tok.id_to_token(ord("a")) == "a"
    lengths = tok.token_byte_lengths()
    assert len(lengths) == 512 and lengths[-len(SPECIAL_TOKENS):] == [0] * len(SPECIAL_TOKENS)
    assert lengths[:256] == [1] * 256 and all(n >= 2 for n in lengths[256:ids[0]])
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|nope|>")


def test_encode_prepend_append_and_batch(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    body = tok.encode("Hello world 2024!")
    assert tok.encode("Hello world 2024!", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert tok("Hello world 2024!", prepend=bos) == [bos] + body
    texts = ["one", "", "two 22 three", "ünïcödé ✓"]
    assert tok.encode(texts, prepend="<|bos|>", num_threads=2) == [[bos] + tok.encode(t) for t in texts]
    with pytest.raises(ValueError):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError):
        tok.encode("x", append=tok.get_vocab_size())
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ------------------------------------------------------------------------------ storage

def test_save_and_load_roundtrip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(str(tmp_path))
    loaded = Tokenizer.from_directory(str(tmp_path))
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.get_pattern() == tiny_tokenizer.get_pattern()
    text = "The miller's daughter counted 1234 sacks. Ωμέγα 🙂"
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert all(loaded.decode_bytes([i]) == tiny_tokenizer.decode_bytes([i]) for i in range(loaded.get_vocab_size()))


def test_load_errors_are_clear(tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.from_directory(str(tmp_path / "missing"))
    path = tiny_tokenizer.save(str(tmp_path))
    with open(path, "w") as f:
        f.write('{"format_version": 1, "pattern"')  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer.from_directory(str(tmp_path))
    tiny_tokenizer.save(str(tmp_path))
    payload = json.load(open(path))
    payload["special_tokens"] = payload["special_tokens"][:-1]
    json.dump(payload, open(path, "w"))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_directory(str(tmp_path))


def test_get_tokenizer_and_token_bytes_from_base_dir(tiny_tokenizer, tiny_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
    tok = get_tokenizer()
    assert tok.encode("hello there") == tiny_tokenizer.encode("hello there")
    token_bytes = get_token_bytes(device="cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (512,)
    assert torch.equal(token_bytes, token_bytes_tensor(tiny_tokenizer))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir / "elsewhere"))
    with pytest.raises(FileNotFoundError):
        get_token_bytes()


def test_training_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_from_iterator(iter(["some text"]), 256 + len(SPECIAL_TOKENS))


# ------------------------------------------------------------------------------ chat rendering

TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 times 12?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "12 * 12"},
        {"type": "python_output", "text": "144"},
        {"type": "text", "text": "It is 144."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_tool_rendering(tok):
    """The layout spelled out by hand, token by token."""
    s = tok.encode_special
    spans = [
        ([tok.get_bos_token_id(), s("<|user_start|>")], 0),
        (tok.encode("You are terse.\n\nWhat is 12 times 12?"), 0),
        ([s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (tok.encode("Let me compute. "), 1),
        ([s("<|python_start|>")] + tok.encode("12 * 12") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + tok.encode("144") + [s("<|output_end|>")], 0),
        (tok.encode("It is 144.") + [s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + tok.encode("Thanks!") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (tok.encode("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    ids = [i for span, _ in spans for i in span]
    mask = [m for span, m in spans for _ in span]
    return ids, mask


def test_render_conversation_token_by_token(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(TOOL_CONVERSATION)
    expected_ids, expected_mask = expected_tool_rendering(tiny_tokenizer)
    assert ids == expected_ids
    assert mask == expected_mask


def test_mask_covers_exactly_the_assistant_spans(tiny_tokenizer):
    # an independent scan: trained = inside <|assistant_start|> ... <|assistant_end|> (end included,
    # start excluded) and outside <|output_start|> ... <|output_end|>
    tok = tiny_tokenizer
    s = tok.encode_special
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    in_assistant = in_output = False
    for token, m in zip(ids, mask):
        if token == s("<|assistant_start|>"):
            assert m == 0
            in_assistant = True
            continue
        if token == s("<|output_start|>"):
            in_output = True
        trained = in_assistant and not in_output
        assert m == int(trained), tok.visualize_tokenization(ids, mask, color=False)
        if token == s("<|output_end|>"):
            in_output = False
        if token == s("<|assistant_end|>"):
            in_assistant = False
    assert sum(mask) > 0 and not in_assistant


def test_render_does_not_mutate_and_truncation_is_a_prefix(tiny_tokenizer):
    conversation = copy.deepcopy(TOOL_CONVERSATION)
    full_ids, full_mask = tiny_tokenizer.render_conversation(conversation, max_tokens=None)
    assert conversation == TOOL_CONVERSATION
    for k in [0, 1, 2, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10]:
        ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=k)
        assert ids == full_ids[:k] and mask == full_mask[:k]
        assert len(ids) == len(mask) == min(k, len(full_ids))
    assert tiny_tokenizer.render_conversation(conversation)[0] == full_ids  # default 2048 does not cut it
    with pytest.raises(ValueError):
        tiny_tokenizer.render_conversation(conversation, max_tokens=-1)


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "system"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "text"),
    ([{"role": "user", "content": ["a"]}], "string"),
    ([{"role": "user"}], "role' and 'content"),
])
def test_render_rejects_malformed_conversations(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_conversation({"messages": messages})


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = copy.deepcopy(TOOL_CONVERSATION)
    prompt = tok.render_for_completion(conversation)
    assert conversation == TOOL_CONVERSATION  # the caller's conversation keeps its last reply
    without_last = {"messages": TOOL_CONVERSATION["messages"][:-1]}
    expected = tok.render_conversation(without_last, max_tokens=None)[0] + [tok.encode_special("<|assistant_start|>")]
    assert prompt == expected
    assert tok.render_for_completion(without_last) == expected  # already ends with the user: nothing dropped
    full_ids, _ = tok.render_conversation(TOOL_CONVERSATION)
    assert full_ids[:len(prompt)] == prompt  # the prompt is a prefix of the full rendering


def test_visualize_tokenization(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(TOOL_CONVERSATION)
    plain = tiny_tokenizer.visualize_tokenization(ids, mask, color=False)
    assert plain.count("|[") + plain.startswith("[") == sum(mask)
    assert "(<|bos|>)" in plain and "[<|assistant_end|>]" in plain and "(<|output_start|>)" in plain
    colored = tiny_tokenizer.visualize_tokenization(ids, mask)
    assert "\033[92m" in colored and "\033[90m" in colored
    with pytest.raises(ValueError):
        tiny_tokenizer.visualize_tokenization(ids, mask[:-1])


# ------------------------------------------------------------------------------ scripts

def test_training_that_runs_out_of_pairs_still_gives_a_valid_tokenizer():
    tok = Tokenizer.train_from_iterator(iter(["abc abc"]), 1000)
    assert tok.get_vocab_size() < 1000
    assert tok.encode_special("<|output_end|>") == tok.get_vocab_size() - 1
    assert tok.decode(tok.encode("abc xyz")) == "abc xyz"


def test_tok_train_script_on_a_jsonl_file(tiny_corpus, tmp_path):
    from scripts import tok_train
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in tiny_corpus) + "\n" + json.dumps("a bare string") + "\n")
    out_dir = tmp_path / "tok"
    trained = tok_train.main(["--input", str(corpus), "--vocab_size", "400", "--out_dir", str(out_dir)])
    tok = Tokenizer.from_directory(str(out_dir))
    assert tok.encode(" ".join(tiny_corpus)) == trained.encode(" ".join(tiny_corpus))
    assert tok.get_vocab_size() == 400
    assert torch.equal(torch.load(out_dir / "token_bytes.pt"), token_bytes_tensor(tok))
    # the same text through the library gives the same tokenizer
    direct = Tokenizer.train_from_iterator(iter(tiny_corpus + ["a bare string"]), 400)
    assert tok.encode(" ".join(tiny_corpus)) == direct.encode(" ".join(tiny_corpus))


@pytest.mark.parametrize("argv", [["--vocab_size", "265"], ["--doc_cap", "0"], ["--max_chars", "0"], ["--input", "/nonexistent/x.jsonl"]])
def test_tok_train_rejects_bad_flags(argv):
    from nanochat.common import USER_ERRORS
    from scripts import tok_train
    with pytest.raises(USER_ERRORS):
        tok_train.get_args(argv)


def test_tok_eval_reports_compression(tiny_tokenizer):
    from scripts.tok_eval import SAMPLES, evaluate, print_table
    report = evaluate(tiny_tokenizer, include_shards=False, tiktoken_references=False)
    assert set(report["results"]) == set(SAMPLES)
    for kind, row in report["results"].items():
        ours = row["ours"]
        assert ours["tokens"] == len(tiny_tokenizer.encode(SAMPLES[kind]))
        assert ours["bytes_per_token"] == pytest.approx(len(SAMPLES[kind].encode()) / ours["tokens"])
    # a 512-token vocab trained on English compresses English better than other scripts
    assert report["results"]["english"]["ours"]["bytes_per_token"] > report["results"]["non_english"]["ours"]["bytes_per_token"]
    print_table(report)
