"""Tests for the Rust BPE trainer nanochat.rustbpe: the fast GPT-4 splitter against fancy-regex,
merges against the PyPI `rustbpe` oracle, the reference encoder against tiktoken, and bad input."""

import random
import sys

import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

from nanochat import rustbpe
from nanochat.tokenizer import SPLIT_PATTERN

pypi_rustbpe = pytest.importorskip("rustbpe")  # the oracle (a dev dependency)

GPT4_K = {k: SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,%d}" % k) for k in (1, 2, 3, 4)}

# Characters that sit on the boundaries of the pattern's classes: cased contraction letters
# (and the long s and Kelvin sign, which case-fold to ASCII), letters from several scripts and
# planes, numbers that are not ASCII digits, every kind of whitespace, marks, symbols, emoji.
TRICKY = list("aAsSdDmMtTlLvVeErRxX'’\"") + list("ſKéßΩжあ中𝐀") + list("0189٣४²½Ⅻ𝟘") + \
    list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u3000") + list(".,!?-_()[]{}<>|/\\@#$%^&*+=~`:;") + \
    ["\u0301", "\u200b", "\u200d", "🙂", "👍", "\U0001F3FD", "\x00", "\x7f", "\ufeff"]


def train_pair(texts, vocab_size, pattern):
    ours = rustbpe.Tokenizer()
    ours.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    oracle = pypi_rustbpe.Tokenizer()
    oracle.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return ours, oracle


def synthetic_corpus(n_docs, seed):
    """Words from a small lexicon, numbers, punctuation and some non-English text: lots of
    equal pair counts, so the tie-break gets exercised."""
    rng = random.Random(seed)
    lexicon = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it's", "we'll", "don't", "THEY'RE",
               "über", "straße", "naïve", "données", "кошка", "собака", "猫", "犬", "ねこ", "λόγος", "def", "return",
               "x", "self.value", "#include", "<stdio.h>", "1st", "2nd", "3rd"]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(5, 60)):
            r = rng.random()
            if r < 0.7:
                parts.append(rng.choice(lexicon))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            else:
                parts.append(rng.choice([".", ",", "!", "?", " -", "\n", "\n\n", "  ", "\t", "(", ")", ":", "...", "'"]))
        docs.append(" ".join(parts))
    return docs


# ------------------------------------------------------------------------------ pre-tokenization

@settings(max_examples=400, deadline=None)
@given(text=st.one_of(st.text(alphabet=st.sampled_from(TRICKY), max_size=80), st.text(max_size=80)),
       k=st.sampled_from([1, 2, 3, 4]))
def test_fast_splitter_matches_fancy_regex(text, k):
    fast = rustbpe.split_text(text, GPT4_K[k])
    assert fast == rustbpe.split_text(text, GPT4_K[k], use_regex=True)
    assert "".join(fast) == text and all(fast)


def test_fast_splitter_matches_fancy_regex_on_every_code_point():
    # each code point in contexts where its class decides the cut: after a letter, a digit, a
    # space, an apostrophe, and before a letter (the optional-prefix alternative). Planes 4-13
    # (unassigned) and 15-16 (private use) are sampled with a stride to keep this quick.
    pieces = []
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF or ((0x40000 <= cp < 0xE0000 or cp >= 0xF0000) and cp % 61):
            continue
        c = chr(cp)
        pieces.append(f"a{c}1{c} {c}'{c}x\n")
    text = "".join(pieces)
    fast = rustbpe.split_text(text)
    slow = rustbpe.split_text(text, use_regex=True)
    assert len(fast) == len(slow)
    assert fast == slow


def test_default_pattern_is_the_tokenizer_pattern():
    assert rustbpe.default_pattern() == SPLIT_PATTERN
    assert rustbpe.Tokenizer().get_pattern() == SPLIT_PATTERN


def test_custom_pattern_uses_the_regex_engine():
    assert rustbpe.split_text("ab12 cd", r"\d+|[a-z]+| ") == ["ab", "12", " ", "cd"]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["ab ab ab cd"] * 3), 258, pattern=r"[a-z]+|\s+")
    assert tok.get_pattern() == r"[a-z]+|\s+"
    assert tok.get_train_stats()["fast_splitter"] == 0.0
    assert [b for b, _ in tok.get_mergeable_ranks()[256:]] == [b"ab", b"cd"]


# ------------------------------------------------------------------------------ training

@pytest.mark.parametrize("k", [2, 3])
def test_identical_merges_to_pypi_rustbpe(tiny_corpus, k):
    texts = tiny_corpus + synthetic_corpus(400, seed=k)
    ours, oracle = train_pair(texts, 900, GPT4_K[k])
    assert ours.vocab_size == oracle.vocab_size == 900
    assert ours.get_mergeable_ranks() == oracle.get_mergeable_ranks()
    assert ours.get_pattern() == oracle.get_pattern() == GPT4_K[k]


def test_identical_merges_with_a_custom_regex():
    texts = synthetic_corpus(200, seed=7)
    ours, oracle = train_pair(texts, 700, r"\w+|\s+|[^\w\s]+")
    assert ours.get_mergeable_ranks() == oracle.get_mergeable_ranks()


def test_tie_break_is_highest_count_then_lowest_pair():
    # every pair occurs once except (c, d) twice: (c, d) first, then the rest in (left, right) order
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["zy", "cd", "ab", "cd", "ba"]), 256 + 4, pattern=r"\S+")
    merges = [(bytes([a]) + bytes([b])) for (a, b), _ in tok.get_merges()]
    assert merges == [b"cd", b"ab", b"ba", b"zy"]


def test_merge_counts_overlapping_and_repeated_pairs():
    # "aaaa": (a,a) occurs 3 times -> merged into "aa aa"; then (aa,aa) once. With weights:
    # "aaaa" x2 and "ab" x3: (a,a) 6 > (a,b) 3, so (a,a) goes first; after it (a,b) 3 > (aa,aa) 2.
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["aaaa", "aaaa", "ab", "ab", "ab"]), 256 + 3, pattern=r"\S+")
    assert [b for b, _ in tok.get_mergeable_ranks()[256:]] == [b"aa", b"ab", b"aaaa"]


def test_results_do_not_depend_on_buffering(tiny_corpus):
    texts = tiny_corpus + synthetic_corpus(100, seed=1)
    reference = None
    for buffer_size in [1, 7, 8192]:
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), 800, buffer_size=buffer_size)
        ranks = tok.get_mergeable_ranks()
        reference = reference or ranks
        assert ranks == reference
    stats = tok.get_train_stats()
    assert stats["documents"] == len(texts) and stats["bytes"] == sum(len(t.encode()) for t in texts)
    assert stats["fast_splitter"] == 1.0 and stats["merges"] == 800 - 256


def test_ranks_and_merges_are_consistent(tiny_corpus):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(tiny_corpus, 400)  # any iterable works, not only iterators
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(400)) and tok.vocab_size == 400
    assert all(isinstance(b, bytes) for b, _ in ranks)
    assert [b for b, _ in ranks[:256]] == [bytes([i]) for i in range(256)]
    table = [b for b, _ in ranks]
    for (a, b), new_id in tok.get_merges():
        assert table[new_id] == table[a] + table[b] and a < new_id and b < new_id
    assert len(set(table)) == len(table)


def test_training_stops_early_when_nothing_is_left_to_merge():
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["abc"]), 1000)
    assert tok.vocab_size == 258
    assert tok.get_train_stats()["merges"] == 2
    tok.train_from_iterator(iter(["abc"]), 10**9)  # no up-front allocation for the requested size
    assert tok.vocab_size == 258
    with pytest.raises(ValueError, match="too large"):
        tok.train_from_iterator(iter(["abc"]), 2**40)


# ------------------------------------------------------------------------------ encoding

@pytest.fixture(scope="module")
def trained_pair(tiny_corpus):
    texts = tiny_corpus + synthetic_corpus(300, seed=3)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), 1000)
    enc = tiktoken.Encoding(name="test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()),
                            special_tokens={})
    return tok, enc, texts


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_reference_encode_agrees_with_tiktoken(trained_pair, data):
    tok, enc, texts = trained_pair
    text = data.draw(st.one_of(st.text(max_size=200), st.text(alphabet=st.sampled_from(TRICKY), max_size=100),
                               st.sampled_from(texts)))
    ids = tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert tok.decode(ids) == text.encode("utf-8")


def test_reference_encode_compresses_training_text(trained_pair):
    tok, enc, texts = trained_pair
    sample = "\n".join(texts[:50])
    ids = tok.encode(sample)
    assert ids == enc.encode_ordinary(sample)
    assert len(sample.encode()) / len(ids) > 2.5  # a 1000-token vocab on its own training text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("vocab_size", [256, 100, 0, -5])
def test_rejects_small_vocab(vocab_size):
    with pytest.raises(ValueError, match="greater than 256"):
        rustbpe.Tokenizer().train_from_iterator(iter(["hello"]), vocab_size)


def test_rejects_empty_iterator_and_empty_text():
    with pytest.raises(ValueError, match="no text"):
        rustbpe.Tokenizer().train_from_iterator(iter([]), 300)
    with pytest.raises(ValueError, match="no chunks"):
        rustbpe.Tokenizer().train_from_iterator(iter(["", ""]), 300)


@pytest.mark.parametrize("pattern", ["(", "[a-", r"\p{NotAClass}", "a{2,1}"])
def test_rejects_invalid_regex(pattern):
    with pytest.raises(ValueError, match="invalid split pattern"):
        rustbpe.Tokenizer().train_from_iterator(iter(["hello"]), 300, pattern=pattern)
    with pytest.raises(ValueError, match="invalid split pattern"):
        rustbpe.split_text("hello", pattern)


def test_rejects_non_strings_and_bad_buffer():
    with pytest.raises(TypeError, match="item 1 is bytes"):
        rustbpe.Tokenizer().train_from_iterator(iter(["ok", b"bytes"]), 300)
    with pytest.raises(TypeError, match="iterable"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)
    with pytest.raises(ValueError, match="buffer_size"):
        rustbpe.Tokenizer().train_from_iterator(iter(["x"]), 300, buffer_size=0)


def test_iterator_errors_propagate_and_leave_the_tokenizer_usable():
    def failing():
        yield "some text to count"
        raise RuntimeError("the data loader broke")

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(["ab ab ab"]), 257)
    before = tok.get_mergeable_ranks()
    with pytest.raises(RuntimeError, match="data loader broke"):
        tok.train_from_iterator(failing(), 300, buffer_size=1)
    assert tok.get_mergeable_ranks() == before  # a failed run changes nothing
    tok.train_from_iterator(iter(["cd cd"]), 257)
    assert tok.get_mergeable_ranks()[256][0] == b"cd"
