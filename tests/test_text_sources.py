"""
Tests for nanochat/text_sources.py: the character budget and per-document cap, and both input file
formats (jsonl records or bare strings, plain text cut at line boundaries).
"""

import json

import pytest

from nanochat.text_sources import capped_texts, iter_input_file


def test_capped_texts_cuts_documents_and_stops_at_the_budget():
    assert list(capped_texts(iter(["abcdef", "ghij", "klm"]), max_chars=8, doc_cap=4)) == ["abcd", "ghij"]
    # the document that crosses the budget is still yielded whole (up to doc_cap), then it stops
    assert list(capped_texts(iter(["abc", "defgh", "ij"]), max_chars=5, doc_cap=10)) == ["abc", "defgh"]
    assert list(capped_texts(iter([]), max_chars=5, doc_cap=10)) == []


def test_plain_text_is_cut_at_line_boundaries(tmp_path):
    text_file = tmp_path / "book.txt"
    text = "".join(f"line {i} of a plain text book\n" for i in range(100))
    text_file.write_text(text)
    docs = list(iter_input_file(str(text_file), doc_cap=200))
    assert "".join(docs) == text and len(docs) > 5 and all(d.endswith("\n") for d in docs)
    assert all(len(d) < 200 + 40 for d in docs)  # at most one line past the cap


def test_jsonl_records_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps("a bare string") + "\n")
    assert list(iter_input_file(str(good), doc_cap=100)) == ["first", "a bare string"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_input_file(str(bad), doc_cap=100))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        list(iter_input_file(str(broken), doc_cap=100))
