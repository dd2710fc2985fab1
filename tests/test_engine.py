"""Tests of the Engine: KV-cache decoding against the naive full-recompute sampler, batches of different
prompts, per-row stopping, the calculator tool, and the statistics of temperature / top-k sampling."""

import collections
import contextlib
import os
import time

import pytest
import torch
import torch.nn.functional as F

import nanochat.engine as engine_module
from nanochat.engine import CastLinears, Engine, KVCache, sample_next_token
from nanochat.calculator import use_calculator
from nanochat.gpt import GPT, GPTConfig

SPECIAL_NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class StandInTokenizer:
    """Just what the Engine asks of a tokenizer. Special tokens sit outside the model's vocabulary unless
    remapped, so the model can never stop or call the tool and its output is comparable with GPT.generate."""

    def __init__(self, **remap):
        self.ids = {name: 10_000 + i for i, name in enumerate(SPECIAL_NAMES)}
        for name, token in remap.items():
            self.ids[f"<|{name}|>"] = token

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def tiny_model(seed=0, **overrides):
    cfg = dict(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    # init_weights zeroes the output projections, which would make every position look alike
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def naive(model, prompt, max_tokens):
    return list(model.generate(prompt, max_tokens, temperature=0.0))


def cut_at(tokens, stops):
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


# -----------------------------------------------------------------------------
# Greedy decoding equals the naive sampler

DECODE_MODES = ["dynamic", "static"]  # the compiled and graphed steps are tested in tests/test_decode_static.py


@pytest.mark.parametrize("decode", DECODE_MODES)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_generate_equals_naive(num_samples, decode):
    model = tiny_model()
    engine = Engine(model, StandInTokenizer(), decode=decode)
    for prompt in ([5], [1, 2, 3], list(range(10, 31))):
        expected = naive(model, prompt, 20)
        columns = list(engine.generate(prompt, num_samples=num_samples, max_tokens=20, temperature=0.0))
        assert len(columns) == 20
        for row in range(num_samples):
            assert [col[row] for col, _ in columns] == expected
            assert all(mask[row] == 1 for _, mask in columns)
        results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=20, temperature=0.0)
        assert results == [prompt + expected] * num_samples
        assert masks == [[0] * len(prompt) + [1] * 20] * num_samples


@pytest.mark.parametrize("decode", DECODE_MODES)
@pytest.mark.parametrize("num_samples", [1, 2])
def test_generate_prompts_of_different_lengths_equal_naive(num_samples, decode):
    model = tiny_model(n_kv_head=1)
    engine = Engine(model, StandInTokenizer(), decode=decode)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (4, 1, 13, 7)]
    out = engine.generate_prompts(prompts, num_samples=num_samples, max_tokens=16, temperature=0.0)
    assert len(out) == len(prompts) * num_samples
    for i, (completion, mask) in enumerate(out):
        assert completion == naive(model, prompts[i // num_samples], 16), f"row {i}"
        assert mask == [1] * 16


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_max_rows_cuts_whole_prompts_into_seeded_chunks(decode):
    """max_rows bounds the rows of one pass (the memory of an evaluation): chunk c is exactly a separate
    call on its prompts with seed + c, and a request that fits is untouched."""
    model = BatchRecordingGPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.load_state_dict(tiny_model().state_dict())
    model.eval()
    model.batch_sizes = []
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (4, 1, 13, 7, 9)]
    kwargs = dict(num_samples=3, max_tokens=12, temperature=1.0, seed=11)
    whole = Engine(model, StandInTokenizer(), decode=decode).generate_prompts(prompts, **kwargs)
    assert Engine(model, StandInTokenizer(), decode=decode, max_rows=15).generate_prompts(prompts, **kwargs) == whole
    model.batch_sizes = []
    chunked = Engine(model, StandInTokenizer(), decode=decode, max_rows=7).generate_prompts(prompts, **kwargs)
    # 7 rows hold two prompts of 3 samples (the static loop pads 6 rows to its batch bucket, 8; 15 rows: 16)
    assert max(model.batch_sizes) == (6 if decode == "dynamic" else 8)
    plain = Engine(model, StandInTokenizer(), decode=decode)
    expected = []
    for c, start in enumerate(range(0, 5, 2)):
        expected += plain.generate_prompts(prompts[start:start + 2], **{**kwargs, "seed": 11 + c})
    assert chunked == expected and len(chunked) == 15
    assert chunked != whole  # other prompts in the batch change the random stream of later chunks
    # more samples than max_rows: one prompt per pass, never an empty chunk
    one = Engine(model, StandInTokenizer(), decode=decode, max_rows=2).generate_prompts(prompts[:2], **kwargs)
    assert one == plain.generate_prompts(prompts[:1], **kwargs) + plain.generate_prompts(prompts[1:2], **{**kwargs, "seed": 12})
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_rows"):
            Engine(model, StandInTokenizer(), max_rows=bad)


class BatchRecordingGPT(GPT):
    """Records the batch size of every forward call."""

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        self.batch_sizes.append(idx.size(0))
        return super().forward(idx, targets=targets, kv_cache=kv_cache, loss_reduction=loss_reduction, last_only=last_only)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_prefill_chunks_are_sized_by_activations_not_the_vocabulary(decode):
    """The prompt goes through in column chunks sized by the activations and the tokens per pass (only the last
    column's logits are made): a short prompt takes one pass, whatever the vocabulary; a small budget of either
    kind cuts it into equal chunks, and the tokens stay those of the naive sampler."""
    model = ShapeRecordingGPT(GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.load_state_dict(tiny_model().state_dict())
    model.eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (4, 1, 13, 7, 9)]
    expected = [naive(model, p, 6) for p in prompts]
    engine = Engine(model, StandInTokenizer(), decode=decode)
    model.prefill_shapes = []
    assert [c for c, _ in engine.generate_prompts(prompts, max_tokens=6, temperature=0.0)] == expected
    assert model.prefill_shapes == [(5, 13)]
    # 5 rows x (4 x 32 hidden + 4 heads x 13 columns) = 900 elements per column: a budget of 2,700 gives 3 columns
    engine.PREFILL_ELEMENT_BUDGET = 2700
    model.prefill_shapes = []
    assert [c for c, _ in engine.generate_prompts(prompts, max_tokens=6, temperature=0.0)] == expected
    assert model.prefill_shapes == [(5, 3)] * 4 + [(5, 1)]
    # and at most about PREFILL_TOKENS rows x columns per pass: 10 tokens over 5 rows is 2 columns
    engine.PREFILL_ELEMENT_BUDGET, engine.PREFILL_TOKENS = 1 << 27, {"cpu": 10, "cuda": 10}
    model.prefill_shapes = []
    assert [c for c, _ in engine.generate_prompts(prompts, max_tokens=6, temperature=0.0)] == expected
    assert model.prefill_shapes == [(5, 2)] * 6 + [(5, 1)]


class ShapeRecordingGPT(GPT):
    """Records the (batch, columns) of every prefill call (the ones that ask for the last column only)."""

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        if last_only:
            self.prefill_shapes.append(tuple(idx.shape))
        return super().forward(idx, targets=targets, kv_cache=kv_cache, loss_reduction=loss_reduction, last_only=last_only)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_rows_stop_independently_and_dropping_finished_rows_changes_nothing(decode):
    model = tiny_model(seed=4)
    model.__class__ = BatchRecordingGPT
    model.batch_sizes = []
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 8, 5, 11, 2, 6)]
    references = [naive(model, p, 24) for p in prompts]
    # make a token the model actually emits the assistant_end, so rows finish at different steps
    counts = collections.Counter(t for ref in references for t in ref[1:12])
    stop = counts.most_common(1)[0][0]
    expected = [cut_at(ref, {stop}) for ref in references]
    lengths = sorted(len(e) for e in expected)
    assert lengths[0] < lengths[-2], f"test needs rows that finish at different times: {lengths}"

    engine = Engine(model, StandInTokenizer(assistant_end=stop), decode=decode)
    model.batch_sizes = []
    out = engine.generate_prompts(prompts, num_samples=2, max_tokens=24, temperature=0.0)
    for i, (completion, mask) in enumerate(out):
        assert completion == expected[i // 2], f"row {i}"
        assert mask == [1] * len(completion)
    sizes = model.batch_sizes
    assert sizes[0] == len(prompts)        # each prompt prefilled once
    if decode == "dynamic":
        assert sizes[1] == 2 * len(prompts)    # then fanned out to its samples
    else:
        assert sizes[1] == 16 and set(sizes[1:]) <= {16, 8, 4, 2, 1}  # batch buckets: powers of two
    assert sizes[-1] < sizes[1]            # finished rows were dropped from the batch
    assert len(sizes) - 1 == max(len(e) for e in expected) + (0 if max(lengths) == 24 else 1) - 1

    # streaming: finished rows repeat their stop token with mask 0, and the stream ends once all are done
    columns = list(engine.generate(prompts[0], num_samples=2, max_tokens=24, temperature=0.0))
    n = len(expected[0])
    assert len(columns) == (n + 1 if n < 24 else 24)
    if n < 24:
        assert columns[-1] == ([stop, stop], [1, 1])


def test_max_tokens_none_fills_the_sequence_len_and_zero_yields_nothing():
    model = tiny_model(sequence_len=16)
    engine = Engine(model, StandInTokenizer())
    assert len(list(engine.generate([1, 2], max_tokens=None, temperature=0.0))) == 16
    assert list(engine.generate([1, 2], max_tokens=0)) == []
    assert engine.generate_prompts([]) == []


def test_generation_stops_at_the_rotary_table():
    model = tiny_model(sequence_len=8)  # rotary table of 80 positions
    engine = Engine(model, StandInTokenizer())
    prompt = [3] * 75
    columns = list(engine.generate(prompt, max_tokens=50, temperature=0.0))
    assert len(columns) == 6  # feeds positions 75..79, samples one more from the last
    assert [tokens[0] for tokens, _ in columns] == naive(model, prompt, 6)
    with pytest.raises(ValueError, match="rotary"):
        list(engine.generate([3] * 80, max_tokens=1))


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_time_spent_counts_the_prefill_and_the_decoding(monkeypatch, decode):
    """Engine.time_spent: each generation adds its wall time to the first column (prefill) and after it (decode),
    also when the caller stops reading early; the model's forward is slowed to know which part is which."""
    model = tiny_model(seed=2)
    engine = Engine(model, StandInTokenizer(), decode=decode)
    assert engine.time_spent == {"prefill": 0.0, "decode": 0.0, "capture": 0.0}
    real_forward = type(model).forward

    def slow_prefill(self, idx, *args, **kwargs):
        if idx.size(1) > 1:  # the prompt's pass; decode steps feed one token per row
            time.sleep(0.3)
        return real_forward(self, idx, *args, **kwargs)
    monkeypatch.setattr(type(model), "forward", slow_prefill)
    engine.generate_prompts([[1, 2, 3], [4, 5]], max_tokens=6, temperature=0.0)
    prefill, decode_time = engine.time_spent["prefill"], engine.time_spent["decode"]
    assert 0.3 <= prefill < 2.0 and 0 < decode_time < 0.3  # five decode steps of a tiny model
    stream = engine.generate([1, 2, 3], max_tokens=50, temperature=0.0)
    next(stream)
    next(stream)
    stream.close()
    assert engine.time_spent["prefill"] >= prefill + 0.3 and engine.time_spent["decode"] > decode_time
    assert engine.time_spent["capture"] == 0.0  # no CUDA graph here


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(max_tokens=-1), "max_tokens"),
    (dict(num_samples=0), "num_samples"), (dict(tokens=[]), "prompt"), (dict(tokens=[1, 97]), "prompt"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    engine = Engine(tiny_model(), StandInTokenizer())
    kwargs = dict(dict(tokens=[1, 2], max_tokens=3), **kwargs)
    with pytest.raises(ValueError, match=message):
        engine.generate_batch(**kwargs)


# -----------------------------------------------------------------------------
# Tool use

class ScriptedGPT(GPT):
    """A real GPT (the cache is filled for real) whose next token is dictated by a script: call i of
    forward puts all probability on script[i]. Records what was fed at every decode step."""

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        logits = super().forward(idx, kv_cache=kv_cache, last_only=last_only)
        if idx.size(1) == 1:
            self.fed.append(idx[:, 0].tolist())
        step = min(self.calls, len(self.script) - 1)
        self.calls += 1
        logits = torch.full_like(logits, -1e4)
        logits[:, -1, self.script[step]] = 0.0
        return logits


def scripted_engine(tokenizer, script, decode="auto"):
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), n_layer=1)
    model.__class__ = ScriptedGPT
    model.script, model.calls, model.fed = script, 0, []
    return Engine(model, tokenizer, decode=decode), model


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_python_call_gets_calculator_output_forced(tiny_tokenizer, decode):
    tok = tiny_tokenizer
    s = tok.encode_special
    expression = tok.encode("2+3")
    result = tok.encode("5")
    filler = tok.encode("x")[0]  # what the model "wants" while the tool output is forced: must be ignored
    script = [s("<|python_start|>")] + expression + [s("<|python_end|>")] + [filler] * (len(result) + 2) \
        + [s("<|assistant_end|>")]
    engine, model = scripted_engine(tok, script, decode)
    prompt = tok.encode("what is 2+3?", prepend="<|bos|>")
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=1.0)
    completion = [s("<|python_start|>")] + expression + [s("<|python_end|>"), s("<|output_start|>")] + result \
        + [s("<|output_end|>")]
    expected_mask = [1] * (len(expression) + 2) + [0] * (len(result) + 2)
    assert results == [prompt + completion] * 2
    assert masks == [[0] * len(prompt) + expected_mask] * 2
    # the forced tokens went into the model (and so into its KV cache), not just into the output
    assert [f[0] for f in model.fed] == completion
    assert tok.decode(completion).endswith("<|output_start|>5<|output_end|>")


@pytest.mark.parametrize("expression", [
    "2+", "__import__('os').system('touch pwned')", "open('/etc/passwd').read()", "1/0", "9**9**9**9",
    "(lambda: 1)()", "[x for x in range(10**9)]", ")(", "", "x" * 400,
])
def test_malformed_or_malicious_python_yields_the_error_string(tiny_tokenizer, tmp_path, monkeypatch, expression):
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer
    s = tok.encode_special
    expected_text = use_calculator(expression)
    assert expected_text.startswith("Error:")
    n_forced = len(tok.encode(expected_text)) + 2
    script = [s("<|python_start|>")] + tok.encode(expression) + [s("<|python_end|>")] + [0] * n_forced \
        + [s("<|assistant_end|>")]
    engine, _ = scripted_engine(tok, script)
    (completion, mask), = engine.generate_prompts([tok.encode("hi", prepend="<|bos|>")], max_tokens=len(script) + 5)
    forced = completion[-n_forced:]
    assert tok.decode(forced) == f"<|output_start|>{expected_text}<|output_end|>"
    assert mask[-n_forced:] == [0] * n_forced and all(mask[:-n_forced])
    assert not os.path.exists(tmp_path / "pwned")


def test_a_raising_calculator_still_yields_an_error_string(tiny_tokenizer, monkeypatch):
    def broken(expr):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine_module, "use_calculator", broken)
    s = tiny_tokenizer.encode_special
    script = [s("<|python_start|>"), 50, s("<|python_end|>")] + [0] * 20
    engine, _ = scripted_engine(tiny_tokenizer, script)
    (completion, mask), = engine.generate_prompts([[1, 2]], max_tokens=30)
    assert "<|output_start|>Error: RuntimeError<|output_end|>" in tiny_tokenizer.decode(completion)


def test_stray_python_end_and_stop_at_first_step(tiny_tokenizer):
    s = tiny_tokenizer.encode_special
    engine, _ = scripted_engine(tiny_tokenizer, [s("<|python_end|>"), 7, s("<|bos|>")])
    (completion, mask), = engine.generate_prompts([[1]], max_tokens=10)
    assert completion == [s("<|python_end|>"), 7] and mask == [1, 1]  # no tool output without a call
    engine, _ = scripted_engine(tiny_tokenizer, [s("<|assistant_end|>")])
    assert len(list(engine.generate([1], num_samples=3, max_tokens=10))) == 1


# -----------------------------------------------------------------------------
# Sampling statistics

class FixedLogitsGPT(GPT):
    """The same next-token logits at every position: a known distribution to sample from."""

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.fixed_logits.expand(idx.size(0), 1 if last_only else idx.size(1), -1)


FIXED_LOGITS = torch.tensor([1.0, 2.5, -0.5, 2.0, 0.0, 1.5, -1.0, 0.5, -2.0, 0.2, -3.0, 1.2])


def fixed_logits_engine():
    torch.manual_seed(0)
    model = FixedLogitsGPT(GPTConfig(sequence_len=8, vocab_size=len(FIXED_LOGITS), n_layer=1, n_head=1,
                                     n_kv_head=1, n_embd=8))
    model.fixed_logits = FIXED_LOGITS
    return Engine(model, StandInTokenizer())


def first_token_frequencies(engine, n, **kwargs):
    (column, _), = list(engine.generate([0], num_samples=n, max_tokens=1, **kwargs))
    counts = torch.bincount(torch.tensor(column), minlength=len(FIXED_LOGITS))
    return counts.float() / n


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_frequencies_match_softmax_over_temperature(temperature):
    n = 20_000
    freq = first_token_frequencies(fixed_logits_engine(), n, temperature=temperature, seed=int(temperature * 10))
    probs = F.softmax(FIXED_LOGITS / temperature, dim=-1)
    tolerance = 5 * (probs * (1 - probs) / n).sqrt() + 1e-3  # 5 standard errors
    assert torch.all((freq - probs).abs() < tolerance), (freq, probs)


def test_top_k_never_leaves_the_top_k_and_renormalises():
    n = 20_000
    freq = first_token_frequencies(fixed_logits_engine(), n, temperature=1.0, top_k=3)
    top = torch.topk(FIXED_LOGITS, 3).indices
    outside = torch.ones(len(FIXED_LOGITS), dtype=torch.bool)
    outside[top] = False
    assert freq[outside].sum() == 0
    probs = F.softmax(FIXED_LOGITS[top], dim=-1)
    assert torch.all((freq[top] - probs).abs() < 5 * (probs * (1 - probs) / n).sqrt() + 1e-3), (freq[top], probs)


def test_top_k_one_and_temperature_zero_are_greedy():
    engine = fixed_logits_engine()
    argmax = int(FIXED_LOGITS.argmax())
    assert first_token_frequencies(engine, 500, temperature=1.0, top_k=1)[argmax] == 1.0
    assert first_token_frequencies(engine, 500, temperature=0.0, top_k=5)[argmax] == 1.0
    model = tiny_model()
    engine = Engine(model, StandInTokenizer())
    greedy = engine.generate_batch([4, 5], max_tokens=12, temperature=0.0)
    assert engine.generate_batch([4, 5], max_tokens=12, temperature=0.7, top_k=1, seed=9) == greedy


def test_seeds_reproduce_and_differ_and_samples_are_independent():
    engine = Engine(tiny_model(), StandInTokenizer())
    run = lambda seed: engine.generate_batch([1, 2, 3], num_samples=4, max_tokens=10, temperature=1.0, seed=seed)
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a[0] != c[0]
    first_tokens = {row[3] for row in a[0]}
    assert len(first_tokens) > 1, "every sample drew the same first token"
    prompts = [[1, 2, 3], [9] * 6]
    assert engine.generate_prompts(prompts, 3, max_tokens=8, seed=1) == engine.generate_prompts(prompts, 3, max_tokens=8, seed=1)


def test_sample_next_token_shapes():
    logits = torch.randn(5, 11)
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, 0.0).tolist() == logits.argmax(-1).tolist()
    drawn = sample_next_token(logits, rng, 1.0, top_k=4)
    assert drawn.shape == (5,)
    assert all(t in torch.topk(logits[i], 4).indices.tolist() for i, t in enumerate(drawn.tolist()))


# -----------------------------------------------------------------------------
# KVCache extensions

def test_kv_cache_prefill_rows_and_keep_rows():
    source = KVCache(3, 2, 5, 4, 2, pad_lengths=[0, 2, 1])
    source.k.normal_()
    source.v.normal_()
    source.advance(5)
    cache = KVCache(4, 2, 8, 4, 2)
    cache.prefill_rows(source, [2, 2, 0, 1])
    assert cache.get_pos() == 5
    assert torch.equal(cache.k[:, 0, :, :5], source.k[:, 2]) and torch.equal(cache.v[:, 3, :, :5], source.v[:, 1])
    assert cache.pad_lengths.tolist() == [1, 1, 0, 2]
    cache.keep_rows([3, 0])
    assert cache.batch_size == 2 and cache.capacity == 8 and cache.get_pos() == 5
    assert torch.equal(cache.k[:, 0, :, :5], source.k[:, 1]) and torch.equal(cache.k[:, 1, :, :5], source.k[:, 2])
    assert cache.pad_lengths.tolist() == [2, 1]
    cache.keep_rows([1])
    assert cache.pad_lengths.tolist() == [1]


# -----------------------------------------------------------------------------
# Chat front-end helpers

def test_fit_to_context_drops_whole_old_turns_first():
    bos, turn = 100, 101
    chat = [bos, turn, 1, 2, 3, turn, 4, 5, turn, 6, 7, 8]
    assert engine_module.fit_to_context(chat, 20, turn) == (chat, 0)
    kept, dropped = engine_module.fit_to_context(chat, 8, turn)
    assert kept == [bos, turn, 4, 5, turn, 6, 7, 8] and dropped == 4
    kept, dropped = engine_module.fit_to_context(chat, 5, turn)
    assert kept == [bos, turn, 6, 7, 8] and dropped == 7
    kept, dropped = engine_module.fit_to_context(chat, 3, turn)  # the newest turn alone is too long: keep its end
    assert kept == [bos, 7, 8] and dropped == 9
    with pytest.raises(ValueError):
        engine_module.fit_to_context(chat, 1, turn)


def test_text_stream_never_splits_a_character(tiny_tokenizer):
    text = "naïve café → 日本語 😀 done"
    ids = tiny_tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # the tiny vocab spells these characters in byte pieces
    stream = engine_module.TextStream(tiny_tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    broken = engine_module.TextStream(tiny_tokenizer)
    partial = tiny_tokenizer.encode("😀")[:1]  # a lone lead byte: held back, then flushed as-is at the end
    assert broken.push(partial[0]) == "" and broken.flush() == "\ufffd"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_runs_deterministically_under_autocast():
    model = tiny_model().to("cuda")
    engine = Engine(model, StandInTokenizer())
    prompts = [[1, 2, 3], [4] * 9]
    a = engine.generate_prompts(prompts, num_samples=3, max_tokens=12, temperature=0.8, top_k=20, seed=3)
    b = engine.generate_prompts(prompts, num_samples=3, max_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert a == b and all(len(c) == 12 and all(0 <= t < 97 for t in c) for c, _ in a)
    greedy = engine.generate_prompts(prompts, max_tokens=4, temperature=0.0)
    assert greedy[0][0][0] == naive(model, prompts[0], 1)[0]  # bf16 may drift later, not on the first token


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_line_headers_are_forced_at_the_start_and_after_each_newline(tiny_tokenizer, decode):
    tok = tiny_tokenizer
    headers = [tok.encode("Step 1:"), tok.encode("Step 2:"), tok.encode("Overall:")]
    newline, x, y, z = tok.encode("\n")[0], tok.encode("x")[0], tok.encode("y")[0], tok.encode("z")[0]
    assert tok.decode([newline]).endswith("\n")
    filler = tok.encode("q")[0]  # what the model "wants" while a header is forced: must be ignored
    end = tok.encode_special("<|assistant_end|>")
    script = [filler] * len(headers[0]) + [x, newline] + [filler] * len(headers[1]) + [y, newline] \
        + [filler] * len(headers[2]) + [z, end]
    engine, model = scripted_engine(tok, script, decode)
    prompt = tok.encode("verify this", prepend="<|bos|>")
    [(tokens, mask)] = engine.generate_prompts([prompt], num_samples=1, max_tokens=40, temperature=1.0, line_headers=[headers])
    expected = headers[0] + [x, newline] + headers[1] + [y, newline] + headers[2] + [z]
    assert tokens == expected
    assert mask == [0] * len(headers[0]) + [1, 1] + [0] * len(headers[1]) + [1, 1] + [0] * len(headers[2]) + [1]
    assert tok.decode(tokens) == "Step 1:x\nStep 2:y\nOverall:z"
    with pytest.raises(ValueError, match="one list per prompt"):
        engine.generate_prompts([prompt, prompt], line_headers=[headers])


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_a_stop_before_the_last_header_becomes_a_newline(tiny_tokenizer, decode):
    """A verifier that ends after its first line still gets every header: its stop is replaced by an unsampled
    newline while headers remain, and is kept once they are all written."""
    tok = tiny_tokenizer
    headers = [tok.encode("Step 1:"), tok.encode("Step 2:"), tok.encode("Overall:")]
    newline, x, filler = tok.encode("\n")[0], tok.encode("x")[0], tok.encode("q")[0]
    end = tok.encode_special("<|assistant_end|>")
    script = [filler] * len(headers[0]) + [x, end] + [filler] * len(headers[1]) + [end] + [filler] * len(headers[2]) + [x, end]
    engine, _ = scripted_engine(tok, script, decode)
    prompt = tok.encode("verify this", prepend="<|bos|>")
    [(tokens, mask)] = engine.generate_prompts([prompt], num_samples=1, max_tokens=40, temperature=1.0, line_headers=[headers])
    assert tok.decode(tokens) == "Step 1:x\nStep 2:\nOverall:x"
    assert mask == [0] * len(headers[0]) + [1, 0] + [0] * len(headers[1]) + [0] + [0] * len(headers[2]) + [1]
    plain_engine, _ = scripted_engine(tok, [x, end, x, end], decode)
    [(plain, _)] = plain_engine.generate_prompts([prompt], num_samples=1, max_tokens=40, temperature=1.0)
    assert plain == [x]  # without headers a stop is a stop


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_a_stop_inside_an_open_calculator_call_drops_the_call(tiny_tokenizer, decode):
    """A verifier that stops inside an open <|python_start|> while headers remain: the newline and the next
    header are text, not part of the expression, so a later <|python_end|> forces no calculator output."""
    tok = tiny_tokenizer
    s = tok.encode_special
    headers = [tok.encode("Step 1:"), tok.encode("Overall:")]
    x, filler, end = tok.encode("x")[0], tok.encode("q")[0], s("<|assistant_end|>")
    script = [filler] * len(headers[0]) + [s("<|python_start|>")] + tok.encode("2+3") + [end] \
        + [filler] * len(headers[1]) + [x, s("<|python_end|>"), x, end]
    engine, _ = scripted_engine(tok, script, decode)
    prompt = tok.encode("verify this", prepend="<|bos|>")
    [(tokens, mask)] = engine.generate_prompts([prompt], num_samples=1, max_tokens=40, temperature=1.0, line_headers=[headers])
    assert tok.decode(tokens) == "Step 1:<|python_start|>2+3\nOverall:x<|python_end|>x"
    assert s("<|output_start|>") not in tokens


# -----------------------------------------------------------------------------
# Sampling from a copy whose linear weights are already in the compute dtype

def cpu_autocast(device_type):
    """inference_context with bf16 autocast on the CPU: what the Engine runs under on CUDA, testable here."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


def test_cast_linears_logits_are_bit_identical_under_autocast_and_follow_refresh():
    model = tiny_model()
    cast = CastLinears(model, torch.bfloat16)
    copy = cast.model
    assert copy.transformer.wte.weight is model.transformer.wte.weight and copy.cos is model.cos  # shared, not copied
    assert copy.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    assert len(cast.pairs) == 2 * 6 + 1  # q, k, v, proj, fc, mlp proj per layer, and the lm_head
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    def logits(m):  # a fresh autocast region each time: autocast caches its weight casts within one
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(ids)
    assert torch.equal(logits(copy), logits(model))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.5)  # an optimizer step on the model
    updated = logits(model)
    assert not torch.equal(logits(copy), updated)  # the copy is stale until refreshed
    cast.refresh(model)
    assert torch.equal(logits(copy), updated)
    assert cast.fits(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # replaced, not updated in place
    assert not cast.fits(model)


def test_cast_linears_fused_qkv_give_the_same_logits_through_refresh_and_release():
    """fuse_qkv: each attention of the copy projects q, k and v by one matmul over a weight its three casts are
    views of; the logits stay bit-identical to the model's under autocast, after an update and after a release."""
    model = tiny_model()
    cast = CastLinears(model, torch.bfloat16, fuse_qkv=True)
    copy = cast.model
    assert all(type(block.attn) is engine_module.FusedQKVAttention for block in copy.transformer.h)
    assert all(type(block.attn) is not engine_module.FusedQKVAttention for block in model.transformer.h)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    def logits(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(ids)
    def views_of_fused():
        return all(a.c_q.weight.data_ptr() == a.qkv_weight.data_ptr()
                   and a.c_v.weight.data_ptr() + a.c_v.weight.nbytes == a.qkv_weight.data_ptr() + a.qkv_weight.nbytes
                   for a in (block.attn for block in copy.transformer.h))
    assert views_of_fused() and torch.equal(logits(copy), logits(model))
    with torch.no_grad():
        model.transformer.h[1].attn.c_k.weight.add_(0.5)  # an update to a fused weight
    updated = logits(model)
    assert not torch.equal(logits(copy), updated)
    cast.refresh(model)
    assert torch.equal(logits(copy), updated)
    cast.release()
    assert all(block.attn.qkv_weight.numel() == 0 for block in copy.transformer.h)
    cast.refresh(model)
    assert views_of_fused() and torch.equal(logits(copy), updated)


@pytest.mark.parametrize("decode", DECODE_MODES + ["compile"])
def test_engine_sampling_from_fused_qkv_gives_the_same_tokens(decode, monkeypatch):
    monkeypatch.setattr(engine_module, "inference_context", cpu_autocast)
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 1, 11)]
    plain = Engine(model, StandInTokenizer(), decode=decode, cast_weights=False)
    fused = Engine(model, StandInTokenizer(), decode=decode, cast_weights=torch.bfloat16)
    fused.FUSE_QKV = True
    for kwargs in (dict(num_samples=1, temperature=0.0), dict(num_samples=2, temperature=1.0, top_k=20, seed=5)):
        assert fused.generate_prompts(prompts, max_tokens=10, **kwargs) == plain.generate_prompts(prompts, max_tokens=10, **kwargs)
    assert fused._cast.fuse_qkv and type(fused._cast.model.transformer.h[0].attn) is engine_module.FusedQKVAttention
    fused.release_sampling_weights()
    greedy = dict(num_samples=1, temperature=0.0, max_tokens=10)
    assert fused.generate_prompts(prompts, **greedy) == plain.generate_prompts(prompts, **greedy)


@pytest.mark.parametrize("decode", DECODE_MODES)
def test_engine_with_cast_weights_samples_the_same_tokens_and_follows_updates(decode, monkeypatch):
    monkeypatch.setattr(engine_module, "inference_context", cpu_autocast)
    model = tiny_model()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (4, 1, 13, 7)]
    plain = Engine(model, StandInTokenizer(), decode=decode, cast_weights=False)
    cast = Engine(model, StandInTokenizer(), decode=decode, cast_weights=torch.bfloat16)
    for kwargs in (dict(num_samples=1, temperature=0.0), dict(num_samples=3, temperature=1.0, top_k=20, seed=5)):
        expected = plain.generate_prompts(prompts, max_tokens=12, **kwargs)
        assert cast.generate_prompts(prompts, max_tokens=12, **kwargs) == expected
    assert plain._cast is None and cast._cast is not None
    first_copy = cast._cast.model
    greedy = dict(num_samples=1, temperature=0.0, max_tokens=12)
    before = plain.generate_prompts(prompts, **greedy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    after = plain.generate_prompts(prompts, **greedy)
    assert after != before  # the update changes the samples, so the next check can fail
    assert cast.generate_prompts(prompts, **greedy) == after
    assert cast._cast.model is first_copy  # refreshed in place, not rebuilt


def test_cast_weights_auto_is_off_on_cpu_and_bad_values_raise():
    model = tiny_model()
    engine = Engine(model, StandInTokenizer())
    engine.generate_prompts([[1, 2, 3]], max_tokens=4, temperature=0.0)
    assert engine._cast is None
    for bad in (True, "bf16", 1):
        with pytest.raises(ValueError, match="cast_weights"):
            Engine(model, StandInTokenizer(), cast_weights=bad)
