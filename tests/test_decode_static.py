"""Tests of the fixed-shape decode step (nanochat/decode_static.py: StaticKVCache, sample_from_raw_logits,
decode_step, GraphedStep): it gives the same tokens as the growing-batch loop and the naive sampler,
the same seeded samples, compiles to one graph on CPU, and its CUDA-graph runner's plumbing works."""

import collections
import contextlib
import itertools
import json
import subprocess
import sys

import pytest
import torch

import nanochat.engine as engine_module
from nanochat.decode_static import (GraphedStep, StaticKVCache, bucket_size, decode_step, noise_width,
                                    sample_from_raw_logits)
from nanochat.engine import Engine, KVCache, sample_next_token
from tests.test_engine import StandInTokenizer, cut_at, naive, tiny_model


def mixed_prompts(seed, lengths, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def stop_token_for(model, prompts, steps=24):
    """A token the model really emits early in several rows: as <|assistant_end|> it makes rows finish at
    different steps, which exercises dropping rows, batch buckets and the random-number bookkeeping."""
    counts = collections.Counter(t for p in prompts for t in naive(model, p, steps)[1:10])
    return counts.most_common(1)[0][0]


# -----------------------------------------------------------------------------
# Pieces

def test_static_cache_prefill_chunks_match_the_growing_cache():
    """prefill_step on a StaticKVCache (the compiled modes' prefill, eager here): left-padded prompts fed in chunks of
    several columns, each on a view of the columns up to its end, leave the same keys and values and give the same
    last-column logits as the growing KVCache's prefill; padding queries see only themselves."""
    from nanochat.decode_static import prefill_step
    model = tiny_model(seed=6)
    prompts = mixed_prompts(4, (9, 3, 14, 1))
    ids = torch.tensor([[0] * (14 - len(p)) + p for p in prompts])
    pads = [14 - len(p) for p in prompts]
    growing = KVCache.for_model(model, 4, 14, pad_lengths=pads)
    with torch.inference_mode():
        want = model(ids, kv_cache=growing, last_only=True)[:, -1, :]
        static = StaticKVCache.for_model(model, 4, 14, spare_columns=1)
        static.pad.copy_(torch.tensor(pads))
        for start, end in ((0, 5), (5, 11), (11, 14)):
            got = prefill_step(model, static.first_columns(end), ids[:, start:end])
    assert int(static.pos) == 14 and static.k[0].shape == (4, model.config.n_kv_head, 15, 8)
    torch.testing.assert_close(got, want)
    for layer in range(model.config.n_layer):
        for row, pad in enumerate(pads):  # the real columns (padding columns' keys differ: never attended)
            torch.testing.assert_close(static.k[layer][row, :, pad:14], growing.k[layer, row, :, pad:14])
            torch.testing.assert_close(static.v[layer][row, :, pad:14], growing.v[layer, row, :, pad:14])
    fresh = StaticKVCache(4, 1, 14, 8, 1, spare_columns=1)
    fresh.pad.copy_(torch.tensor(pads))
    fresh.pos.fill_(2)
    positions, mask = fresh.first_columns(6).positions_and_mask(3)  # columns 2..4; row 3 is padded up to column 13
    assert positions.tolist() == [[0, 0, 0], [0, 0, 0], [2, 3, 4], [0, 0, 0]]
    assert mask.shape == (4, 1, 3, 6) and mask[3, 0].tolist() == [[False, False, True, False, False, False],
                                                                   [False, False, False, True, False, False],
                                                                   [False, False, False, False, True, False]]
    assert mask[2, 0, 2].tolist() == [True] * 5 + [False]  # an unpadded row: causal


def test_bucket_sizes_are_powers_of_two_that_fit():
    assert [bucket_size(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]


def test_static_cache_load_positions_and_mask():
    source = KVCache(2, 2, 6, 4, 3, pad_lengths=[0, 3])
    source.k.normal_()
    source.v.normal_()
    source.advance(6)
    cache = StaticKVCache(4, 2, 10, 4, 3)
    cache.load(source.k, source.v, source.pad_lengths, 6, rows=[1, 1, 0], slots=[0, 1, 3])
    assert int(cache.pos) == 6 and cache.pad.tolist() == [3, 3, 0, 0]  # slot 2 is idle: no padding
    for layer in range(3):
        assert torch.equal(cache.k[layer][1, :, :6], source.k[layer, 1])
        assert torch.equal(cache.v[layer][3, :, :6], source.v[layer, 0])
    positions, mask = cache.positions_and_mask(1)
    assert positions.tolist() == [[3], [3], [6], [6]]
    assert mask.shape == (4, 1, 1, 10)
    assert mask[0, 0, 0].tolist() == [False] * 3 + [True] * 4 + [False] * 3  # real columns 3..6, nothing past pos
    assert mask[3, 0, 0].tolist() == [True] * 7 + [False] * 3
    k_new, v_new = torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)
    k_all, _ = cache.insert_kv(1, k_new, v_new)
    assert k_all.shape == (4, 2, 10, 4) and torch.equal(k_all[:, :, 6], k_new[:, :, 0])
    cache.advance(1)
    assert int(cache.pos) == 7


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.7, 5), (1.3, 96)])
def test_raw_logit_sampler_equals_sample_next_token_on_capped_logits(temperature, top_k):
    softcap = 15.0
    raw = torch.randn(37, 97) * 20  # large enough that the cap bends them
    capped = softcap * torch.tanh(raw / softcap)
    width = noise_width(97, temperature, top_k)
    for seed in range(5):
        expected = sample_next_token(capped, torch.Generator().manual_seed(seed), temperature, top_k)
        noise = torch.empty(37, max(1, width)).exponential_(1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_from_raw_logits(raw, noise, temperature, top_k, softcap), expected)


# -----------------------------------------------------------------------------
# Whole generations: fixed-shape step vs the growing-batch loop vs naive recompute

@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_static_equals_dynamic_and_naive_on_mixed_prompt_lengths(num_samples):
    model = tiny_model(seed=2, n_kv_head=1)  # grouped-query attention
    prompts = mixed_prompts(7, (5, 1, 17, 9, 2))
    outs = {mode: Engine(model, StandInTokenizer(), decode=mode).generate_prompts(
        prompts, num_samples=num_samples, max_tokens=18, temperature=0.0) for mode in ("dynamic", "static")}
    assert outs["static"] == outs["dynamic"]
    for i, (completion, mask) in enumerate(outs["static"]):
        assert completion == naive(model, prompts[i // num_samples], 18), f"row {i}"
        assert mask == [1] * 18


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 7)])
def test_seeded_sampling_equals_dynamic_while_rows_finish_at_different_steps(temperature, top_k):
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9))
    stop = stop_token_for(model, prompts)
    outs = {}
    for mode in ("dynamic", "static"):
        engine = Engine(model, StandInTokenizer(assistant_end=stop), decode=mode)
        outs[mode] = [engine.generate_prompts(prompts, num_samples=2, max_tokens=24, temperature=temperature,
                                              top_k=top_k, seed=seed) for seed in (0, 1)]
    assert outs["static"] == outs["dynamic"]
    lengths = sorted(len(c) for c, _ in outs["static"][0])
    assert lengths[0] < 24 and lengths[0] < lengths[-1], f"rows should finish at different steps: {lengths}"
    assert outs["static"][0] != outs["static"][1]  # the seed matters


def test_generate_and_generate_batch_stream_the_same_under_both_loops():
    model = tiny_model(seed=6)
    prompt = [3, 1, 4, 1, 5]
    stop = stop_token_for(model, [prompt], steps=12)
    engines = {mode: Engine(model, StandInTokenizer(assistant_end=stop), decode=mode) for mode in ("dynamic", "static")}
    streams = {mode: list(e.generate(prompt, num_samples=5, max_tokens=12, temperature=1.0, top_k=10, seed=3))
               for mode, e in engines.items()}
    assert streams["static"] == streams["dynamic"]
    batches = {mode: e.generate_batch(prompt, num_samples=5, max_tokens=12, temperature=1.0, seed=3)
               for mode, e in engines.items()}
    assert batches["static"] == batches["dynamic"]
    assert all(seq[:5] == prompt for seq in batches["static"][0])


def test_static_loop_moves_to_smaller_buckets_and_stops_computing_finished_rows():
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9))
    stop = stop_token_for(model, prompts)
    expected = [cut_at(naive(model, p, 24), {stop}) for p in prompts]
    assert min(len(e) for e in expected) < 12, "test needs rows that finish early"
    seen = []
    real_step = engine_module.decode_step
    engine_module.decode_step = lambda model, cache, *a, **kw: seen.append(cache.batch_size) or real_step(model, cache, *a, **kw)
    try:
        out = Engine(model, StandInTokenizer(assistant_end=stop), decode="static").generate_prompts(
            prompts, max_tokens=24, temperature=0.0)
    finally:
        engine_module.decode_step = real_step
    assert [c for c, _ in out] == expected
    assert seen[0] == 16 and seen == sorted(seen, reverse=True) and seen[-1] < 16


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 5)])
def test_graph_loop_shrinks_when_enough_steps_remain(monkeypatch, temperature, top_k):
    """Engine.SHRINK_MIN_STEPS: a graph mode given a threshold captures a smaller bucket once the live rows fit
    it, only while at least that many steps may remain, and samples what the dynamic loop samples (greedy and
    seeded, rows finishing at different steps); by default graphs keep their bucket. Every capture runs under the
    loop's inference context (on CUDA the autocast the bf16 sampling copy needs: a GPU run once captured the
    smaller bucket outside it and failed)."""
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9))
    stop = stop_token_for(model, prompts)
    tokenizer = StandInTokenizer(assistant_end=stop)
    want = Engine(model, tokenizer, decode="dynamic").generate_prompts(prompts, max_tokens=24, temperature=temperature,
                                                                       top_k=top_k, seed=7)
    depth = [0]  # inference contexts open now
    real_context = engine_module.inference_context

    @contextlib.contextmanager
    def counted_context(device_type):
        depth[0] += 1
        try:
            with real_context(device_type):
                yield
        finally:
            depth[0] -= 1
    monkeypatch.setattr(engine_module, "inference_context", counted_context)
    captured = []  # the number of inference contexts open at each capture
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(lambda run: captured.append(depth[0]) or FakeGraph.capture(run)))
    buckets = {}
    for min_steps in (None, 0, 12, 100):
        engine = Engine(model, tokenizer, decode="static")
        engine._decode_mode = lambda device: "graph"
        engine.SHRINK_MIN_STEPS = {**Engine.SHRINK_MIN_STEPS, "graph": min_steps}
        seen = []
        real_step = engine_module.decode_step
        monkeypatch.setattr(engine_module, "decode_step", lambda model, cache, *a, **kw: seen.append(cache.batch_size) or real_step(model, cache, *a, **kw))
        captured.clear()
        assert engine.generate_prompts(prompts, max_tokens=24, temperature=temperature, top_k=top_k, seed=7) == want
        monkeypatch.setattr(engine_module, "decode_step", real_step)
        buckets[min_steps] = (seen, len(captured))
        assert all(captured), captured
    assert set(buckets[None][0]) == {16} and buckets[None][1] == 1  # the default: one capture, one bucket
    assert set(buckets[100][0]) == {16} and buckets[100][1] == 1    # never 100 steps left of 24
    shrunk, captures = buckets[0]
    assert shrunk == sorted(shrunk, reverse=True) and shrunk[-1] < 16 and captures == len(set(shrunk)) > 1
    late, late_captures = buckets[12]
    assert late_captures < captures and late[-1] >= shrunk[-1]

    def replays_before_last_move(sizes):  # each bucket: one step run by the (stand-in) capture, then its replays
        groups = [len(list(g)) for _, g in itertools.groupby(sizes)]
        return sum(n - 1 for n in groups[:-1])
    # the decode steps before the last move: it came while >= 12 of the 24 steps could remain, not later as unthrottled
    assert replays_before_last_move(late) <= 12 < replays_before_last_move(shrunk)


def test_stops_at_the_rotary_table_like_the_dynamic_loop():
    model = tiny_model(sequence_len=8)  # rotary table of 80 positions: the static cache cannot round past it
    for mode in ("dynamic", "static"):
        columns = list(Engine(model, StandInTokenizer(), decode=mode).generate([3] * 75, max_tokens=50, temperature=0.0))
        assert len(columns) == 6
        assert [tokens[0] for tokens, _ in columns] == naive(model, [3] * 75, 6)


def test_graph_mode_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the graph mode runs for real in the CUDA test")
    with pytest.raises(ValueError, match="CUDA"):
        Engine(tiny_model(), StandInTokenizer(), decode="graph").generate_batch([1, 2], max_tokens=2)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(tiny_model(), StandInTokenizer(), decode="compiled_graph").generate_batch([1, 2], max_tokens=2)
    with pytest.raises(ValueError, match="decode"):
        Engine(tiny_model(), StandInTokenizer(), decode="fast")



@pytest.mark.parametrize("script", ["chat_rl", "chat_cotrain", "chat_eval", "chat_web"])
def test_every_sampling_script_takes_decode_and_refuses_graph_modes_off_cuda(script, tmp_path, monkeypatch, capsys):
    import importlib
    from nanochat.common import UserInputError
    module = importlib.import_module(f"scripts.{script}")
    parse = module.parse_args if script == "chat_web" else module.get_args
    assert parse([]).decode == "auto" and parse(["--decode", "dynamic"]).decode == "dynamic"
    with pytest.raises(SystemExit):
        parse(["--decode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    # refused before any checkpoint is looked for: the base dir is empty, yet the error is about --decode
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    run = (lambda argv: module.load_workers(parse(argv))) if script == "chat_web" else module.main
    with pytest.raises(UserInputError, match="--decode graph .* needs a CUDA device"):
        run(["--decode", "graph", "--device_type", "cpu"])


# -----------------------------------------------------------------------------
# torch.compile on CPU, and the CUDA graph runner

@pytest.mark.slow  # torch.compile on CPU: tens of seconds
def test_compiled_step_gives_the_same_tokens_and_compiles_once_per_shape():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_model(seed=3)
    prompts = mixed_prompts(9, (4, 1, 7))
    kwargs = dict(num_samples=2, max_tokens=10, temperature=0.9, top_k=8, seed=5)
    expected = Engine(model, StandInTokenizer(), decode="static").generate_prompts(prompts, **kwargs)
    engine = Engine(model, StandInTokenizer(), decode="compile")
    assert engine.generate_prompts(prompts, **kwargs) == expected
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert engine.generate_prompts(prompts, **kwargs) == expected  # the same shapes: no new graph
    assert counters["stats"]["unique_graphs"] == graphs
    greedy = engine.generate_prompts(prompts, max_tokens=10, temperature=0.0)
    assert [c for c, _ in greedy] == [naive(model, p, 10) for p in prompts]


@pytest.mark.slow  # torch.compile on CPU: tens of seconds
def test_compiled_prefill_is_one_graph_and_gives_the_eager_tokens(monkeypatch):
    """The compiled modes prefill through a compiled prefill_step (Engine.COMPILED_PREFILL_MODES): batches of several
    prompts of other lengths, cut into chunks of other widths, share one compiled graph (a single prompt is a
    second: dynamo specializes sizes of 1), and the tokens are the eager prefill's. Off, nothing is compiled for it."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from nanochat.decode_static import prefill_step
    model = tiny_model(seed=4, sequence_len=64)
    monkeypatch.setattr(Engine, "PREFILL_TOKENS", {"cpu": 24, "cuda": 24})  # several chunks per batch, of other widths
    torch._dynamo.reset()
    engine = Engine(model, StandInTokenizer(), decode="compile")
    eager = Engine(model, StandInTokenizer(), decode="compile")
    eager.COMPILED_PREFILL_MODES = ()
    eager._compiled = engine._compiled  # one compiled decode step for both
    ref = Engine(model, StandInTokenizer(), decode="static")
    graphs = []
    for lengths in ((5, 3, 9), (12, 1, 7, 30, 2), (40, 33), (4,)):
        prompts = mixed_prompts(3, lengths)
        for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=5, seed=7)):
            want = ref.generate_prompts(prompts, num_samples=2, max_tokens=10, **kwargs)
            assert engine.generate_prompts(prompts, num_samples=2, max_tokens=10, **kwargs) == want
            assert eager.generate_prompts(prompts, num_samples=2, max_tokens=10, **kwargs) == want
        graphs.append(len(_debug_get_cache_entry_list(prefill_step.__code__)))
    assert graphs == [1, 1, 1, 2]
    assert eager._compiled_prefill_step is None
    assert engine.COMPILED_PREFILL_MODES == Engine.COMPILED_PREFILL_MODES  # no compile failed into the eager prefill


def test_a_failed_prefill_compile_falls_back_to_the_eager_prefill(monkeypatch, capsys):
    """A compiled prefill that raises (torch.compile on a GPU or driver it was never run on) prints why and prefills
    eagerly from then on, with the eager prefill's tokens, instead of ending the run."""
    def broken(*args):
        raise RuntimeError("backend compiler failed")
    model = tiny_model(seed=4)
    prompts = mixed_prompts(3, (5, 3, 9))
    engine = Engine(model, StandInTokenizer(), decode="static")
    engine._decode_mode = lambda device: "compile"
    engine._compiled_prefill_step = broken
    engine._compiled = lambda: decode_step  # the decode step itself, uncompiled (not under test here)
    want = Engine(model, StandInTokenizer(), decode="static").generate_prompts(prompts, num_samples=2, max_tokens=8)
    assert engine.generate_prompts(prompts, num_samples=2, max_tokens=8) == want
    assert engine.COMPILED_PREFILL_MODES == () and Engine.COMPILED_PREFILL_MODES
    assert "compiled prefill failed (RuntimeError: backend compiler failed)" in capsys.readouterr().out


@pytest.mark.slow  # torch.compile on CPU: tens of seconds
def test_compiled_step_compiles_once_for_every_cache_length():
    """The cache length is a dynamic size to the compiled step (StaticKVCache.mark_length_dynamic): generations
    whose caches are 64, 128 and 192 columns long share one compiled graph and give the eager step's tokens.
    With DYNAMIC_LENGTH off, a new length compiles again (what this test would see if the marks were lost)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    model = tiny_model(seed=4, sequence_len=32)  # rotary tables cover 320 positions
    prompts = mixed_prompts(2, (5, 3))
    for dynamic in (True, False):
        torch._dynamo.reset()
        engine = Engine(model, StandInTokenizer(), decode="compile")
        engine.DYNAMIC_LENGTH = dynamic
        graphs = []
        for max_tokens in (20, 100, 150):  # cache lengths 64, 128, 192 (Engine.CAPACITY_QUANTUM)
            kwargs = dict(num_samples=2, max_tokens=max_tokens, temperature=0.8, top_k=5, seed=7)
            want = Engine(model, StandInTokenizer(), decode="static").generate_prompts(prompts, **kwargs)
            assert engine.generate_prompts(prompts, **kwargs) == want
            graphs.append(len(_debug_get_cache_entry_list(decode_step.__code__)))  # the decode step's graphs
        assert graphs == ([1, 1, 1] if dynamic else [1, 2, 3])


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: 'capture' runs the step once (as capture records it),
    'replay' runs it again and writes into the captured output tensors, as a graph replay does."""

    @staticmethod
    def capture(run):
        outputs = run()
        cache_enabled = torch.is_autocast_cache_enabled()  # as captured (GraphedStep turns autocast's cache off)

        def replay():
            outside = torch.is_autocast_cache_enabled()
            torch.set_autocast_cache_enabled(cache_enabled)  # a compiled step would otherwise recompile for it
            try:
                for captured, fresh in zip(outputs, run(), strict=True):
                    captured.copy_(fresh)
            finally:
                torch.set_autocast_cache_enabled(outside)
        return replay, outputs


def test_graphed_step_plumbing_on_cpu(monkeypatch):
    """What CPU can check of the CUDA-graph runner: static input buffers, the cache position restored
    after the warm-up, results read from the one output tensor, cache reuse across calls. The capture
    itself needs CUDA (tests/test_decode_static.py's CUDA test)."""
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    model = tiny_model(seed=8)
    prompts = mixed_prompts(3, (6, 2, 9))
    engine = Engine(model, StandInTokenizer(), decode="static")
    engine._decode_mode = lambda device: "graph"
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=6, seed=2), dict(temperature=0.0)):
        got = engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **kwargs)
        want = Engine(model, StandInTokenizer(), decode="dynamic").generate_prompts(prompts, num_samples=2,
                                                                                    max_tokens=12, **kwargs)
        assert got == want
    assert engine._graphs == {}  # the captured step and its cache are given back after each generation


class HeaderTokenizer(StandInTokenizer):
    """StandInTokenizer (bytes as ids) with what line headers need: the vocabulary, and each id's bytes."""

    def get_vocab_size(self):
        return 300

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def lookahead_case():
    """(model, prompts, tokenizer, line headers): 9 prompts whose rows stop, call the calculator and (two prompts
    in three) write line headers at different steps, the specials being tokens this model really writes."""
    model = tiny_model(seed=5, vocab_size=300)
    prompts = mixed_prompts(6, (3, 8, 5, 11, 2, 6, 1, 4, 9), vocab=300)
    common = collections.Counter(t for p in prompts for t in naive(model, p, 24)[1:12]).most_common(3)
    call, end_call, stop = [token for token, _ in common]
    tokenizer = HeaderTokenizer(assistant_end=stop, python_start=call, python_end=end_call, output_start=298,
                                output_end=299)
    headers = [[list(b"A:"), list(b"B:"), list(b"C:")] if i % 3 else [] for i in range(len(prompts))]
    return model, prompts, tokenizer, headers


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.9, 6)])
def test_lookahead_loop_samples_what_the_dynamic_loop_samples(monkeypatch, temperature, top_k):
    """Engine._lookahead_loop (graph modes; a stand-in graph here) makes the next step's input on the device from
    the sampled tokens and what the host knows before reading them: finished rows, calculator output forced, a
    stop under line headers turned into a newline. Its noise is drawn before the host knows which rows stop
    drawing, and drawn again when they do. Rows that stop, call the calculator and write headers at different
    steps, in a bucket with idle slots, must get the dynamic loop's tokens and masks."""
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    loops, redraws, columns, fed = [], [], [], []
    real_loop, real_sampler = Engine._lookahead_loop, engine_module.sample_from_raw_logits
    real_rows, real_call = Engine._step_rows, GraphedStep.__call__

    def recording_rows(self, *args):
        column, mask = real_rows(self, *args)
        columns.append(list(column))
        return column, mask

    def recording_call(self, cache, tokens, noise, filled=None):
        fed.append(tokens.tolist())
        return real_call(self, cache, tokens, noise, filled)
    monkeypatch.setattr(Engine, "_lookahead_loop", lambda self, *a: loops.append(1) or real_loop(self, *a))
    monkeypatch.setattr(engine_module, "sample_from_raw_logits", lambda *a: redraws.append(1) or real_sampler(*a))
    monkeypatch.setattr(Engine, "_step_rows", recording_rows)
    monkeypatch.setattr(GraphedStep, "__call__", recording_call)
    model, prompts, tokenizer, headers = lookahead_case()
    for line_headers in (None, headers):
        kwargs = dict(num_samples=2, max_tokens=40, temperature=temperature, top_k=top_k, seed=3,
                      line_headers=line_headers)
        want = Engine(model, tokenizer, decode="dynamic").generate_prompts(prompts, **kwargs)
        engine = Engine(model, tokenizer, decode="static")
        engine._decode_mode = lambda device: "graph"
        columns.clear()
        fed.clear()
        assert engine.generate_prompts(prompts, **kwargs) == want
        # each step's input is the column the host yielded (finished rows too), idle slots fed 0; one step
        # launched ahead may find every row finished
        assert len(columns) - 1 <= len(fed) <= len(columns)
        assert fed == [column + [0] * (32 - len(column)) for column in columns[:len(fed)]]
        lengths = [len(tokens) for tokens, _ in want]
        assert min(lengths) < max(lengths) and any(0 in mask for _, mask in want)  # rows stopped, tokens were forced
    assert len(loops) == 2
    assert bool(redraws) == (temperature > 0)  # rows left the drawing set while a step was in flight


@pytest.mark.parametrize("lookahead", [True, False])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.9, 6)])
def test_windowed_graphs_sample_what_the_dynamic_loop_samples(monkeypatch, lookahead, temperature, top_k):
    """A graph per window (Engine.WINDOW_MODES; stand-in graphs here): every step runs the narrowest window that
    holds the columns filled once it has written, windows are captured as generations reach them, once while the
    graphs are kept, and the tokens are the dynamic loop's, one replay ahead of the host and not. The second
    generation's prompts end one column before a window's end that the first did not reach, so that window is
    captured after they are loaded and its warm-up writes over a prompt column: the capture must put it back."""
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    widths, steps = [], []
    real_first, real_call = StaticKVCache.first_columns, GraphedStep.__call__
    monkeypatch.setattr(StaticKVCache, "first_columns",
                        lambda self, width, **kwargs: widths.append(width) or real_first(self, width, **kwargs))

    def recording_call(self, cache, tokens, noise, filled=None):
        steps.append((filled, int(cache.pos), self.window_for(filled)))
        return real_call(self, cache, tokens, noise, filled)
    monkeypatch.setattr(GraphedStep, "__call__", recording_call)
    model, prompts, tokenizer, headers = lookahead_case()
    longer = prompts[:-1] + [prompts[-1] * 3]  # 27 columns: the same cache (64 columns, 32 rows), windows from 28
    assert max(len(p) for p in prompts) + 1 == 12 and max(len(p) for p in longer) == 27
    for line_headers in (None, headers):
        engine = Engine(model, tokenizer, decode="static", keep_graphs=True)
        engine._decode_mode = lambda device: "graph"
        engine.WINDOW_MODES, engine.WINDOW_QUANTUM = ("graph",), 4
        if not lookahead:
            engine.LOOKAHEAD_MODES = ()
        captured = []
        for batch in (longer, prompts):
            kwargs = dict(num_samples=2, max_tokens=36, temperature=temperature, top_k=top_k, seed=3,
                          line_headers=line_headers)
            widths.clear()
            steps.clear()
            want = Engine(model, tokenizer, decode="dynamic").generate_prompts(batch, **kwargs)
            assert engine.generate_prompts(batch, **kwargs) == want
            # on CPU the step before has run: cache.pos is the column this step writes
            assert all(filled == pos + 1 and window == -(-filled // 4) * 4 for filled, pos, window in steps)
            used = sorted({window for _, _, window in steps})
            assert widths == [w for w in used if w not in captured]  # in the order reached, each once
            captured += widths
        assert len(engine._graphs) == 1 and captured[0] == 28 and 12 in captured and len(captured) > 5


@pytest.mark.slow  # torch.compile on CPU: tens of seconds
def test_compiled_windows_share_one_compiled_step(monkeypatch):
    """Windows under torch.compile (stand-in graphs on CPU): every window of every cache length runs one compiled
    graph, because a window's tensors are views whose column count is a dynamic size and the spare column keeps
    even the widest window a view (a contiguous tensor is strided otherwise: another graph), and the tokens are the
    eager fixed-shape loop's. Without the spare column the widest window compiles a second graph."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    model = tiny_model(seed=4, sequence_len=32)  # rotary tables cover 320 positions
    prompts = mixed_prompts(2, (5, 3))
    real_init = StaticKVCache.__init__
    for spare in (True, False):
        if not spare:
            monkeypatch.setattr(StaticKVCache, "__init__", lambda self, *a, spare_columns=0, **k: real_init(self, *a, **k))
        torch._dynamo.reset()
        engine = Engine(model, StandInTokenizer(), decode="static")
        engine._decode_mode = lambda device: "compiled_graph"
        engine.WINDOW_MODES, engine.WINDOW_QUANTUM = ("compiled_graph",), 16
        for max_tokens in (50, 100):  # caches of 64 and 128 columns, both run to their widest window
            kwargs = dict(num_samples=2, max_tokens=max_tokens, temperature=0.8, top_k=5, seed=7)
            want = Engine(model, StandInTokenizer(), decode="static").generate_prompts(prompts, **kwargs)
            assert engine.generate_prompts(prompts, **kwargs) == want
        assert len(_debug_get_cache_entry_list(decode_step.__code__)) == (1 if spare else 2)


def test_time_spent_counts_the_captures(monkeypatch):
    """Engine.time_spent["capture"]: the wall seconds of every graph capture (stand-in captures slowed by 50 ms),
    the first window's in the prefill and a window reached later in the decoding; a kept graph's next generation of
    the same shape captures nothing, so it adds nothing."""
    import time

    def slow_capture(run):
        time.sleep(0.05)
        return FakeGraph.capture(run)
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(slow_capture))
    model = tiny_model(seed=8)
    prompts = mixed_prompts(3, (6, 2, 9))
    engine = Engine(model, StandInTokenizer(), decode="static", keep_graphs=True)
    engine._decode_mode = lambda device: "graph"
    engine.WINDOW_MODES, engine.WINDOW_QUANTUM = ("graph",), 8
    engine.generate_prompts(prompts, num_samples=2, max_tokens=12, temperature=0.0)  # windows 16, then 24
    spent = dict(engine.time_spent)
    assert 0.1 <= spent["capture"] < 0.1 + 0.5 and spent["capture"] <= spent["prefill"] + spent["decode"]
    engine.generate_prompts(prompts, num_samples=2, max_tokens=12, temperature=0.0)
    assert engine.time_spent["capture"] == spent["capture"] and engine.time_spent["decode"] > spent["decode"]


def test_kept_graphs_are_reused_while_the_weights_stay_where_they_were(monkeypatch):
    """Engine(keep_graphs=True): a captured step and its cache serve the next generation of the same shape (another
    seed too) without a capture and give a fresh engine's tokens; a new shape is captured (one kept at a time);
    weights updated in place keep the graph, weights replaced (new memory) or released are captured again. On
    CPU a stand-in graph reruns the step, so what is checked here is when captures happen."""
    captures = []
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(lambda run: captures.append(1) or FakeGraph.capture(run)))
    model = tiny_model(seed=8)
    prompts = mixed_prompts(3, (6, 2, 9))

    def fresh(**kwargs):
        return Engine(model, StandInTokenizer(), decode="dynamic").generate_prompts(prompts, num_samples=2,
                                                                                    max_tokens=12, **kwargs)
    engine = Engine(model, StandInTokenizer(), decode="static", keep_graphs=True)
    engine._decode_mode = lambda device: "graph"
    sampled, greedy = dict(temperature=1.0, top_k=6, seed=2), dict(temperature=0.0)
    for kwargs, captured in ((sampled, 1), (sampled, 0), (dict(sampled, seed=5), 0), (greedy, 1), (greedy, 0)):
        captures.clear()
        assert engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **kwargs) == fresh(**kwargs)
        assert len(captures) == captured and len(engine._graphs) == 1
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # in place: the kept graph reads the new values
    captures.clear()
    assert engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **greedy) == fresh(**greedy)
    assert captures == []
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 0.5)  # new memory
    assert engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **greedy) == fresh(**greedy)
    assert captures == [1]
    engine.release_sampling_weights()
    assert engine._graphs == {}
    queued = engine.generate_queue(prompts, 4, num_samples=2, max_tokens=12, **greedy)  # on a kept graph's cache
    assert queued == Engine(model, StandInTokenizer(), decode="static").generate_queue(prompts, 4, num_samples=2,
                                                                                       max_tokens=12, **greedy)
    assert engine.generate_queue(prompts, 4, num_samples=2, max_tokens=12, **greedy) == queued
    assert len(captures) == 2 and len(engine._graphs) == 1


def test_graph_capture_puts_cudnn_attention_first(monkeypatch):
    """A captured step attends with cuDNN's kernel first (a graph has one key length, so cuDNN plans once), chosen
    inside the step (decode_step's `attention`, which torch.compile traces and guards on), while the other paths
    leave it out (inference_context); the benchmark's "-old" / "-nocudnn" engines say otherwise. On CPU the kernel
    choice is only recorded: SDPA ignores it there."""
    from torch.nn.attention import SDPBackend

    from dev.bench_rollout import make_engine
    seen = []  # for each decode-step attention call: (cuDNN enabled and first, the first choice)
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def recording_attention(q, *args, **kwargs):
        if q.size(-2) == 1:
            first = torch._C._get_sdp_priority_order()[0]
            seen.append((first == SDPBackend.CUDNN_ATTENTION.value and torch.backends.cuda.cudnn_sdp_enabled(), first))
        return real_attention(q, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_attention)
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    model = tiny_model(seed=8)
    prompts = mixed_prompts(3, (6, 2, 9))
    want = Engine(model, StandInTokenizer(), decode="static").generate_prompts(prompts, max_tokens=6, temperature=0.0)
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    for mode, cudnn in (("graph", True), ("graph-nocudnn", False), ("graph-old", False), ("compiled_graph", True),
                        ("compiled_graph-nocudnn", False)):
        engine = make_engine(model, StandInTokenizer(), mode)[0]
        engine._compiled = lambda: engine_module.decode_step  # the capture's choice of kernels is what is checked
        engine._decode_mode = lambda device, decode=engine.decode: decode
        seen.clear()
        assert engine.generate_prompts(prompts, max_tokens=6, temperature=0.0) == want
        assert seen and {c for c, _ in seen} == {cudnn}, mode
        assert not cudnn or {first for _, first in seen} == {SDPBackend.CUDNN_ATTENTION.value}
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before  # restored


def test_compiled_step_traces_its_attention_choice():
    """decode_step's `attention` is traced by torch.compile (no graph break under fullgraph) and guarded on: the
    same compiled step called with another choice compiles again instead of reusing the first, as it did when
    the choice was made outside the step."""
    from torch.nn.attention import SDPBackend
    model = tiny_model(seed=8)
    cache = StaticKVCache.for_model(model, 2, 8)
    tokens, noise = torch.tensor([1, 2]), torch.ones(2, 1)
    torch._dynamo.reset()
    compiled = torch.compile(engine_module.decode_step, dynamic=False, fullgraph=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    with torch.inference_mode():
        for attention in (None, Engine.GRAPH_SDPA_BACKENDS, (SDPBackend.MATH,), None):
            cache.pos.fill_(0)
            eager = engine_module.decode_step(model, cache, tokens, noise, 0.0, None, attention=attention)
            cache.pos.fill_(0)
            assert torch.equal(compiled(model, cache, tokens, noise, 0.0, None, attention=attention), eager)
    assert counts["stats"]["unique_graphs"] == 3  # one per choice; the last call reused the first


def test_bench_rollout_breakdown_on_a_stand_in_graph(monkeypatch, capsys):
    """--breakdown times the step in the Engine's loop and the captured graph replayed alone, on a cache of the
    timed table's length (CPU: the capture stands in, the replay runs the step eagerly); a windowed graph's replays
    run the windows the loop ran."""
    import dev.bench_rollout as bench_rollout
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(FakeGraph.capture))
    monkeypatch.setattr(Engine, "_decode_mode", lambda self, device: self.decode)
    windows = []
    real_use = GraphedStep.use
    monkeypatch.setattr(GraphedStep, "use", lambda self, filled: windows.append(self.window_for(filled)) or real_use(self, filled))
    monkeypatch.setattr(sys, "argv", ["bench_rollout", "--depth", "1", "--vocab_size", "300", "--batch_sizes", "3",
                                      "--prompt_lens", "6", "--new_tokens", "70", "--repeats", "1", "--modes",
                                      "graph,graph-windows", "--threads", "1", "--breakdown"])
    bench_rollout.main()
    out = capsys.readouterr().out
    for mode in ("graph", "graph-windows"):
        assert f"### Breakdown: mode {mode}, batch 3, 128-column cache: step in the loop" in out  # 6 + 70 -> 128
    rows = json.loads(out.strip().splitlines()[-1])["breakdowns"]
    assert [r["capacity"] for r in rows] == [128, 128] and all(r["loop_ms"] > 0 and r["replay_ms"] > 0 for r in rows)
    assert set(windows) == {64, 128}  # the windowed mode's steps (the plain graph's are all 128)


def test_bench_decode_attention_smoke():
    cmd = [sys.executable, "-m", "dev.bench_decode_attention", "--shapes", "3x2x8x16x10x2", "--iters", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {r["variant"]: r for r in json.loads(out.strip().splitlines()[-1])["results"]}
    assert set(rows) == {"sdpa_mask", "sdpa_window", "sdpa_bias", "matmul"}
    assert rows["sdpa_mask"]["speedup"] == 1.0 and all(r["ms"] > 0 for r in rows.values())
    assert all(r["max_diff"] < 1e-5 for r in rows.values())  # fp32 on CPU: the variants agree
    for bad, message in ((["--shapes", "3x2x8x16x20x2"], "0 < filled <= capacity"), (["--shapes", "3x2"], "bad shape"),
                         (["--variants", "cudnn"], "unknown variants")):
        run = subprocess.run([sys.executable, "-m", "dev.bench_decode_attention", *bad], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and message in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compile", "compiled_graph", "compiled_graph-nocudnn"])
def test_fixed_shape_step_on_cuda_matches_the_eager_step(mode):
    model = tiny_model().to("cuda")
    prompts = mixed_prompts(11, (3, 9, 1))
    ref = Engine(model, StandInTokenizer(), decode="static")
    decode, _, nocudnn = mode.partition("-")
    engine = Engine(model, StandInTokenizer(), decode=decode)
    if nocudnn:  # the compiled graph with the kernels the other paths use (cuDNN's attention is first by default)
        engine.CUDNN_GRAPH_MODES = ()
    for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
        a = engine.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs)
        assert a == engine.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs)  # replays reproduce
        b = ref.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs)
        # bf16 autocast: compiled kernels round differently, so compare the first tokens only
        assert [c[:1] for c, _ in a] == [c[:1] for c, _ in b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled_graph"])
def test_lookahead_on_cuda(mode):
    """The graph loop one replay ahead of the host (Engine._lookahead_loop: pinned copies, an event per step, the
    next input made on the device) against the same graph waiting for each step's tokens, on rows that stop, call
    the calculator and write line headers: the same tokens. The plain graph's redraws (rows leaving the drawing
    set) run the captured sampler's own kernels eagerly, so it matches when sampling too; the compiled graph's
    sampler is fused by torch.compile, so there sampled runs are compared on their first tokens."""
    model, prompts, tokenizer, headers = lookahead_case()
    model = model.to("cuda")
    ahead = Engine(model, tokenizer, decode=mode)
    waiting = Engine(model, tokenizer, decode=mode)
    waiting.LOOKAHEAD_MODES = ()
    waiting._compiled = ahead._compiled  # one compiled step for both (compiles take tens of seconds)
    for line_headers in (None, headers):
        for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_k=6, seed=3)):
            kwargs = dict(kwargs, num_samples=2, max_tokens=40, line_headers=line_headers)
            a = ahead.generate_prompts(prompts, **kwargs)
            assert a == ahead.generate_prompts(prompts, **kwargs)  # replays reproduce
            b = waiting.generate_prompts(prompts, **kwargs)
            if mode == "graph" or kwargs["temperature"] == 0:
                assert a == b
            else:
                assert [c[:1] for c, _ in a] == [c[:1] for c, _ in b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled_graph"])
def test_windows_on_cuda(mode):
    """A captured graph per window of the cache (Engine.WINDOW_MODES) on CUDA, with cuDNN's attention over views of
    the cache, against the same mode over the whole cache, on rows that stop, call the calculator and write line
    headers: each window is captured once per generation (kept graphs: once), replays reproduce, and the first
    tokens agree (other key lengths are other kernels, which round differently under bf16)."""
    model, prompts, tokenizer, headers = lookahead_case()
    model = model.to("cuda")
    windowed = Engine(model, tokenizer, decode=mode, keep_graphs=True)
    windowed.WINDOW_MODES, windowed.WINDOW_QUANTUM = (mode,), 16
    whole = Engine(model, tokenizer, decode=mode)
    whole._compiled = windowed._compiled  # one compiled step for both (compiles take tens of seconds)
    for line_headers in (None, headers):
        for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_k=6, seed=3)):
            kwargs = dict(kwargs, num_samples=2, max_tokens=40, line_headers=line_headers)
            a = windowed.generate_prompts(prompts, **kwargs)
            assert a == windowed.generate_prompts(prompts, **kwargs)  # replays reproduce
            b = whole.generate_prompts(prompts, **kwargs)
            assert [c[:1] for c, _ in a] == [c[:1] for c, _ in b]
            graphed = next(iter(windowed._graphs.values()))
            assert len(graphed.graphs) >= 2 and graphed.windows[-1] == graphed.cache.capacity
    assert windowed.time_spent["capture"] > 0 and whole.time_spent["capture"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_prefill_on_cuda():
    """The compiled graph's compiled prefill (Engine.COMPILED_PREFILL_MODES) on CUDA under bf16 autocast, prompts cut
    into several chunks: replays reproduce and the first tokens agree with the eager prefill's (other kernels round
    differently under bf16), for batches of several prompts and of one."""
    model, prompts, tokenizer, headers = lookahead_case()
    model = model.to("cuda")
    compiled = Engine(model, tokenizer, decode="compiled_graph")
    compiled.PREFILL_TOKENS = {"cuda": 40}  # chunks of a few columns
    eager = Engine(model, tokenizer, decode="compiled_graph")
    eager.PREFILL_TOKENS, eager.COMPILED_PREFILL_MODES = {"cuda": 40}, ()
    eager._compiled = compiled._compiled  # one compiled decode step for both
    for batch in (prompts, prompts[3:4]):
        for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_k=6, seed=3)):
            kwargs = dict(kwargs, num_samples=2, max_tokens=12, line_headers=None)
            a = compiled.generate_prompts(batch, **kwargs)
            assert a == compiled.generate_prompts(batch, **kwargs)
            b = eager.generate_prompts(batch, **kwargs)
            assert [c[:1] for c, _ in a] == [c[:1] for c, _ in b]
    assert compiled._compiled_prefill_step is not None and eager._compiled_prefill_step is None
    assert compiled.COMPILED_PREFILL_MODES == Engine.COMPILED_PREFILL_MODES  # no compile failed into the eager prefill


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_graphs_on_cuda():
    """keep_graphs on CUDA, where a replay reads memory by address: a kept graph over the bf16 sampling copy gives a
    fresh engine's tokens after the weights change in place (the copy is refreshed in place), and is captured
    again after the copy's memory was released."""
    model = tiny_model(seed=8).to("cuda")
    prompts = mixed_prompts(3, (6, 2, 9))
    engine = Engine(model, StandInTokenizer(), decode="graph", keep_graphs=True)

    def both(**kwargs):
        fresh = Engine(model, StandInTokenizer(), decode="graph").generate_prompts(prompts, num_samples=2,
                                                                                   max_tokens=12, **kwargs)
        return engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **kwargs), fresh
    for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
        kept_before, fresh_before = both(**kwargs)
        assert kept_before == fresh_before and len(engine._graphs) == 1
        graph = next(iter(engine._graphs.values()))
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # the same memory, other values
        kept, fresh = both(**kwargs)
        assert kept == fresh != kept_before and next(iter(engine._graphs.values())) is graph
        engine.release_sampling_weights()
        assert engine.generate_prompts(prompts, num_samples=2, max_tokens=12, **kwargs) == fresh


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_shrink_on_cuda():
    """A graph given a SHRINK_MIN_STEPS threshold captures smaller buckets mid-generation as rows finish (on CUDA
    under the bf16 sampling copy, which needs the loop's autocast at each capture): its replays repeat themselves
    and start as the eager fixed-shape loop does."""
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9))
    stop = stop_token_for(model, prompts)
    model = model.to("cuda")
    engine = Engine(model, StandInTokenizer(assistant_end=stop), decode="graph")
    engine.SHRINK_MIN_STEPS = {**Engine.SHRINK_MIN_STEPS, "graph": 0}
    ref = Engine(model, StandInTokenizer(assistant_end=stop), decode="static")
    for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
        a = engine.generate_prompts(prompts, num_samples=2, max_tokens=24, **kwargs)
        assert a == engine.generate_prompts(prompts, num_samples=2, max_tokens=24, **kwargs)
        b = ref.generate_prompts(prompts, num_samples=2, max_tokens=24, **kwargs)
        assert [c[:1] for c, _ in a] == [c[:1] for c, _ in b]
        assert len({len(c) for c, _ in a}) > 1  # rows finished at different steps, so buckets were left


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["dynamic", "graph"])
def test_cast_weights_on_cuda_give_the_same_tokens(mode):
    """On CUDA the Engine samples from a copy with bf16 linears by default (CastLinears): the same tokens as
    autocast casting the fp32 weights at every step, greedy and seeded, also after the weights change."""
    model = tiny_model().to("cuda")
    prompts = mixed_prompts(13, (3, 9, 1))
    auto = Engine(model, StandInTokenizer(), decode=mode)
    plain = Engine(model, StandInTokenizer(), decode=mode, cast_weights=False)
    for _ in range(2):
        for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
            assert (auto.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs)
                    == plain.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs))
        assert auto._cast is not None and auto._cast.model.lm_head.weight.dtype == torch.bfloat16
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)  # a large update: the second round must follow it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled_graph"])
def test_fused_qkv_on_cuda_gives_the_same_tokens(mode):
    """Engine.FUSE_QKV on CUDA: sampling from a copy whose attentions project q, k and v by one matmul gives the
    tokens of the unfused copy, greedy and seeded, also after the weights change (the fused weight follows)."""
    model = tiny_model().to("cuda")
    prompts = mixed_prompts(14, (3, 9, 1))
    fused = Engine(model, StandInTokenizer(), decode=mode)
    fused.FUSE_QKV = True
    plain = Engine(model, StandInTokenizer(), decode=mode)
    for _ in range(2):
        for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
            assert (fused.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs)
                    == plain.generate_prompts(prompts, num_samples=3, max_tokens=12, **kwargs))
        assert fused._cast.fuse_qkv and not plain._cast.fuse_qkv
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_v.weight.mul_(-1)  # a large update of fused weights: the second round must follow it


# -----------------------------------------------------------------------------
# The benchmark runs

def test_bench_rollout_smoke():
    cmd = [sys.executable, "-m", "dev.bench_rollout", "--depth", "1", "--vocab_size", "300", "--batch_sizes", "3",
           "--prompt_lens", "6", "--new_tokens", "5", "--repeats", "1", "--modes", "dynamic-old,static", "--threads", "1",
           "--profile", "static"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    # the profile covers the decode steps only: 16 of them, one top-k each, the prefill outside the window
    assert "### Profile: mode static, batch 3, 16 decode steps" in out
    assert next(line for line in out.splitlines() if line.strip().startswith("aten::topk")).split()[-1] == "16"
    summary = json.loads(out.strip().splitlines()[-1])
    assert [r["mode"] for r in summary["results"]] == ["dynamic-old", "static"]
    for r in summary["results"]:
        assert r["batch"] == 3 and r["new_tokens"] == 5 and r["tok_per_s"] > 0 and 0 < r["bw_util"] < 1
    assert summary["results"][0]["vs_first_mode"] == 1.0


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """Engine.COMPILE_MODE is the mode the decode step compiles under (None: torch.compile's defaults)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append((fn, kwargs)) or fn)
    model = tiny_model()
    Engine(model, StandInTokenizer(), decode="compile")._compiled()
    tuned = Engine(model, StandInTokenizer(), decode="compile")
    tuned.COMPILE_MODE = "max-autotune-no-cudagraphs"
    assert tuned._compiled() is decode_step
    assert [(fn, kwargs["mode"]) for fn, kwargs in seen] == [(decode_step, None), (decode_step, "max-autotune-no-cudagraphs")]


def test_bench_rollout_step_costs_count_the_dtypes_read():
    """The bandwidth yardstick counts the linears in the dtype the Engine samples them in and the cache in its
    own (GQA: n_kv_head heads), against a count made here by hand."""
    from dev.bench_rollout import step_costs
    model = tiny_model()
    c = model.config
    prompts = [[5] * 6, [5] * 4]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    other = sum(p.numel() for name, p in model.named_parameters() if "wte" not in name) - linear
    kv_elements = len(prompts) * 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * (6 + 5 / 2)
    fp32 = Engine(model, StandInTokenizer(), cast_weights=False)
    assert step_costs(model, prompts, 5, fp32)[0] == 4 * (linear + other) + 4 * kv_elements  # no cast, fp32 cache on CPU
    bf16 = Engine(model, StandInTokenizer(), cast_weights=torch.bfloat16)
    assert step_costs(model, prompts, 5, bf16)[0] == 2 * linear + 4 * other + 4 * kv_elements


def test_bench_prefill_smoke():
    cmd = [sys.executable, "-m", "dev.bench_prefill", "--depth", "1", "--vocab_size", "300", "--shapes", "3x6",
           "--widths", "2,4", "--repeats", "2", "--threads", "1", "--attention", "engine,cudnn", "--profile"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "### Profile: 3 rows x 6 columns in passes of" in out and "aten::mm" in out
    summary = json.loads(out.strip().splitlines()[-1])
    rows = {(r["width_name"], r["attention"]): r for r in summary["results"]}
    assert set(rows) == {(name, attention) for name in ("old rule", "Engine's rule", "2", "4") for attention in ("engine", "cudnn")}
    assert rows[("2", "cudnn")]["width"] == 2 and rows[("old rule", "engine")]["speedup_vs_old"] == 1.0
    assert all(r["first_ms"] > 0 and r["ms"] > 0 for r in rows.values())


def test_bench_rollout_old_modes_run_as_the_engine_did_before():
    """"-old" modes: no sampling copy, and prefill chunks as wide as the logits rule made them (4 columns for
    256 rows at a 32K vocabulary), through the Engine's own chunk formula."""
    from dev.bench_rollout import make_engine
    model = tiny_model(vocab_size=32768, sequence_len=128)
    old, is_old = make_engine(model, StandInTokenizer(), "graph-old")
    new, new_is_old = make_engine(model, StandInTokenizer(), "graph")
    assert (old.decode, old.cast_weights, is_old) == ("graph", False, True)
    assert (new.decode, new.cast_weights, new_is_old) == ("graph", "auto", False)
    cuda = torch.device("cuda")  # the chunk rule only reads the device's type: nothing runs there
    assert old._prefill_chunk(model, 256, 384, cuda) == 4 and old._prefill_chunk(model, 16, 64, cuda) == 64
    assert new._prefill_chunk(model, 256, 384, cuda) == 128 and new._prefill_chunk(model, 16, 64, cuda) == 2048


def test_bench_rollout_mode_options_and_mixed_lengths():
    from dev.bench_rollout import autotuned_step, fixed_length_step, make_engine, row_lengths, share_compiled_steps
    model = tiny_model(vocab_size=300, sequence_len=128)
    engine, old = make_engine(model, StandInTokenizer(), "compiled_graph-cudnn-shrink32")
    assert (engine.decode, old, engine.CUDNN_GRAPH_MODES) == ("compiled_graph", False, Engine.GRAPH_MODES)
    assert engine.SHRINK_MIN_STEPS["compiled_graph"] == 32 and Engine.SHRINK_MIN_STEPS["compiled_graph"] is None
    engine = make_engine(model, StandInTokenizer(), "static-noshrink")[0]
    assert engine.SHRINK_MIN_STEPS["static"] is None and Engine.SHRINK_MIN_STEPS["static"] == 0
    assert not make_engine(model, StandInTokenizer(), "compile-fixedlen")[0].DYNAMIC_LENGTH
    assert make_engine(model, StandInTokenizer(), "graph-nolookahead")[0].LOOKAHEAD_MODES == ()
    assert make_engine(model, StandInTokenizer(), "graph-windows")[0].WINDOW_MODES == Engine.GRAPH_MODES
    assert make_engine(model, StandInTokenizer(), "graph-nowindows")[0].WINDOW_MODES == ()
    assert make_engine(model, StandInTokenizer(), "dynamic-old")[0].WINDOW_MODES == ()
    quarter = make_engine(model, StandInTokenizer(), "compiled_graph-q16-keep")[0]
    assert (quarter.WINDOW_MODES, quarter.WINDOW_QUANTUM, Engine.WINDOW_QUANTUM) == (Engine.GRAPH_MODES, 16, 64)
    assert quarter._windows(40) == (16, 32, 40)
    assert make_engine(model, StandInTokenizer(), "graph-keep")[0].keep_graphs
    assert not make_engine(model, StandInTokenizer(), "graph")[0].keep_graphs
    assert make_engine(model, StandInTokenizer(), "compiled_graph-eagerprefill")[0].COMPILED_PREFILL_MODES == ()
    assert make_engine(model, StandInTokenizer(), "compile")[0].COMPILED_PREFILL_MODES == Engine.COMPILED_PREFILL_MODES
    names = ("compiled_graph", "compiled_graph-nolookahead", "compile-fixedlen", "compiled_graph-fixedlen", "graph",
             "compiled_graph-autotune", "compiled_graph-autotune-keep")
    engines = [make_engine(model, StandInTokenizer(), name)[0] for name in names]
    share_compiled_steps(engines)
    dynamic, ahead_off, fixed, fixed_graph, plain, tuned, tuned_kept = [e._compiled_step for e in engines]
    # a graph compiled for a dynamic length would serve the fixed-length modes too: they compile another function,
    # and so do the autotuned ones (another torch.compile mode)
    assert dynamic is ahead_off and fixed is fixed_graph and dynamic is not fixed and plain is None
    assert fixed._torchdynamo_orig_callable is fixed_length_step
    assert tuned is tuned_kept and tuned._torchdynamo_orig_callable is autotuned_step and tuned is not dynamic
    assert engines[5].COMPILE_MODE == "max-autotune-no-cudagraphs" and Engine.COMPILE_MODE is None
    assert make_engine(model, StandInTokenizer(), "graph-fusedqkv")[0].FUSE_QKV and not Engine.FUSE_QKV
    assert engines[0]._compiled_prefill_step is engines[2]._compiled_prefill_step is not None  # one prefill compile
    assert make_engine(model, StandInTokenizer(), "graph")[0].LOOKAHEAD_MODES == Engine.GRAPH_MODES
    assert Engine.DYNAMIC_LENGTH and make_engine(model, StandInTokenizer(), "compile")[0].DYNAMIC_LENGTH
    for bad in ("graph-fast", "turbo", "graph-shrinkx", "graph-q0", "graph-qx"):
        with pytest.raises(ValueError, match="bad mode"):
            make_engine(model, StandInTokenizer(), bad)
    lengths = row_lengths(5, 16)
    assert max(lengths) == 16 and min(lengths) >= 2 and len(set(lengths)) > 1
    cmd = [sys.executable, "-m", "dev.bench_rollout", "--depth", "1", "--vocab_size", "300", "--batch_sizes", "5",
           "--prompt_lens", "6", "--new_tokens", "16", "--repeats", "1", "--modes", "static,static-noshrink,dynamic",
           "--threads", "1", "--lengths", "mixed"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    for r in json.loads(out.strip().splitlines()[-1])["results"]:
        assert r["tok_per_s"] * r["latency_s"] == pytest.approx(sum(lengths))  # the rows' real tokens, not 5 x 16
    bad = subprocess.run([sys.executable, "-m", "dev.bench_rollout", "--modes", "graph-fast"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "bad mode 'graph-fast'" in bad.stderr


def test_sampling_survives_a_finished_row_after_the_cached_ones():
    """Regression: 17 rows, the last finishes first. The loop moves the 16 live rows to a 16-row cache while the
    finished row still draws random numbers (rows leave `active` in eighths), so the draws outnumber the
    cache's rows. top_k=1 makes sampling deterministic, so the rows' fates can be chosen with the greedy model."""
    model = tiny_model(seed=4)
    candidates = mixed_prompts(11, [3 + i % 7 for i in range(200)])
    runs = [naive(model, p, 16)[len(p):] for p in candidates]
    found = None
    for last, run in enumerate(runs):
        stop = run[1]
        others = [p for p, r in zip(candidates, runs) if stop not in r]
        if stop not in run[:1] and len(others) >= 16:
            found = others[:16] + [candidates[last]], stop
            break
    assert found, "no prompt set where exactly the last row finishes early"
    prompts, stop = found
    outs = {mode: Engine(model, StandInTokenizer(assistant_end=stop), decode=mode).generate_prompts(
        prompts, max_tokens=12, temperature=1.0, top_k=1, seed=0) for mode in ("dynamic", "static")}
    assert outs["static"] == outs["dynamic"]
    assert len(outs["static"][-1][0]) < 12 and all(len(c) == 12 for c, _ in outs["static"][:-1])


# -----------------------------------------------------------------------------
# generate_queue: rows join as others finish (continuous batching)

def test_static_cache_place_and_shift_left_keep_every_row_at_its_positions():
    source = KVCache(2, 1, 5, 2, 2, pad_lengths=[0, 2])
    source.k.normal_()
    source.v.normal_()
    source.pos = 5
    cache = StaticKVCache(3, 1, 12, 2, 2)
    cache.pos.fill_(7)
    cache.place(source.k, source.v, source.pad_lengths, 5, [1, 0], [2, 0], end=7)  # prompts end at column 6
    assert cache.pad.tolist() == [2, 0, 4]  # row 0 of the source (no padding) starts at 2, row 1 (2 pads) at 4
    assert torch.equal(cache.k[1][2, :, 2:7], source.k[1][1, :, :5]) and torch.equal(cache.v[0][0, :, 2:7], source.v[0][0])
    before_positions, before_mask = cache.positions_and_mask(1)
    kept = cache.k[0][:, :, 2:7].clone()
    cache.shift_left(2, end=7)
    positions, mask = cache.positions_and_mask(1)
    assert cache.pos.item() == 5 and cache.pad.tolist() == [0, 0, 2]
    assert torch.equal(cache.k[0][:, :, 0:5], kept)
    assert positions[[0, 2]].tolist() == before_positions[[0, 2]].tolist()  # rotary positions do not move
    assert torch.equal(mask[:, :, :, :10], before_mask[:, :, :, 2:])        # the mask moves with the columns


@pytest.mark.parametrize("decode", ["static", "dynamic"])
@pytest.mark.parametrize("num_samples", [1, 2])
def test_generate_queue_equals_naive_while_rows_join_and_columns_move(decode, num_samples):
    """Greedy completions are each prompt's own, whether it ran first, joined a half-finished batch, waited for
    room, or had the cache's columns moved under it; the same as generate_prompts."""
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9, 7, 3, 12, 5)) * 2
    stop = stop_token_for(model, prompts)
    expected = [cut_at(naive(model, p, 24), {stop}) for p in prompts for _ in range(num_samples)]
    assert len({len(e) for e in expected}) > 4, "test needs rows that finish at different steps"
    engine = Engine(model, StandInTokenizer(assistant_end=stop), decode=decode)
    shifts = []
    shift_left = StaticKVCache.shift_left
    StaticKVCache.shift_left = lambda self, shift, end: shifts.append(shift) or shift_left(self, shift, end)
    try:
        for rows in (num_samples, 3 * num_samples, 64):
            out = engine.generate_queue(prompts, rows, num_samples=num_samples, max_tokens=24, temperature=0.0)
            assert [c for c, _ in out] == expected, f"rows {rows}"
            assert all(m == [1] * len(c) for c, m in out)
    finally:
        StaticKVCache.shift_left = shift_left
    assert (len(shifts) > 0) == (decode == "static")  # the fixed-shape loop moved its columns; dynamic runs passes
    assert engine.generate_queue(prompts, 5, num_samples=num_samples, max_tokens=24, temperature=0.0) == \
        engine.generate_prompts(prompts, num_samples=num_samples, max_tokens=24, temperature=0.0)


def test_generate_queue_long_prompt_waits_for_room_and_sampling_is_seeded():
    model = tiny_model(seed=2)
    prompts = [[7], [9], list(range(20, 40)), [11], [3, 4]]  # the 20-token prompt cannot start left of column 0
    stop = stop_token_for(model, prompts)
    engine = Engine(model, StandInTokenizer(assistant_end=stop), decode="static")
    greedy = engine.generate_queue(prompts, 2, max_tokens=30, temperature=0.0)
    assert [c for c, _ in greedy] == [cut_at(naive(model, p, 30), {stop}) for p in prompts]
    kwargs = dict(num_samples=3, max_tokens=30, temperature=1.0, top_k=8)
    a = engine.generate_queue(prompts, 4, seed=5, **kwargs)
    assert a == engine.generate_queue(prompts, 4, seed=5, **kwargs)  # a seed reproduces
    assert a != engine.generate_queue(prompts, 4, seed=6, **kwargs)
    assert len({tuple(c) for c, _ in a[:3]}) > 1  # a prompt's samples are drawn independently
    assert all(len(c) <= 30 for c, _ in a)


def test_generate_queue_forces_tool_output_and_line_headers_like_generate_prompts(tiny_tokenizer):
    from tests.test_engine import scripted_engine
    tok = tiny_tokenizer
    s = tok.encode_special
    prompt = tok.encode("what is 2+3?", prepend="<|bos|>")
    tool_script = [s("<|python_start|>")] + tok.encode("2+3") + [s("<|python_end|>")] + [tok.encode("x")[0]] * 4 \
        + [s("<|assistant_end|>")]
    headers = [tok.encode("Step 1:"), tok.encode("Overall:")]
    newline, x, filler = tok.encode("\n")[0], tok.encode("x")[0], tok.encode("q")[0]
    header_script = [filler] * len(headers[0]) + [x, s("<|assistant_end|>")] + [filler] * len(headers[1]) + [x, s("<|assistant_end|>")]
    for script, line_headers in ((tool_script, None), (header_script, [headers])):
        want = scripted_engine(tok, script, "static")[0].generate_prompts([prompt], max_tokens=30, temperature=1.0,
                                                                          line_headers=line_headers)
        got = scripted_engine(tok, script, "static")[0].generate_queue([prompt], 1, max_tokens=30, temperature=1.0,
                                                                       line_headers=line_headers)
        assert got == want and 0 in want[0][1]  # forced tokens came through, with mask 0
    assert tok.decode(got[0][0]) == "Step 1:x\nOverall:x"


@pytest.mark.parametrize("windows", [False, True])
def test_generate_queue_on_a_stand_in_graph(monkeypatch, windows):
    """The graph path's plumbing: one capture for the whole queue (with windows, one per window it reaches, the
    columns moving left making it reach narrower ones again), the cache placed and shifted in place."""
    captures = []
    monkeypatch.setattr(GraphedStep, "capture", staticmethod(lambda run: captures.append(run) or FakeGraph.capture(run)))
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9, 7, 3, 12, 5)) * 2
    tokenizer = StandInTokenizer(assistant_end=stop_token_for(model, prompts))
    engine = Engine(model, tokenizer, decode="static")
    engine._decode_mode = lambda device: "graph"
    if windows:
        engine.WINDOW_MODES, engine.WINDOW_QUANTUM = ("graph",), 8
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=6, seed=2)):
        captures.clear()
        got = engine.generate_queue(prompts, 3, max_tokens=24, **kwargs)
        assert got == Engine(model, tokenizer, decode="static").generate_queue(prompts, 3, max_tokens=24, **kwargs)
        assert (len(captures) > 2 if windows else len(captures) == 1) and engine._graphs == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=0), "rows must be a positive integer"), (dict(rows="4"), "rows must be a positive integer"),
    (dict(rows=True), "rows must be a positive integer"), (dict(rows=2, line_headers=[[1]]), "one list per prompt"),
    (dict(rows=2, temperature=-1.0), "temperature"), (dict(rows=2, prompts=[[1], []]), "non-empty list"),
])
def test_generate_queue_bad_arguments_raise_clear_errors(kwargs, message):
    engine = Engine(tiny_model(), StandInTokenizer(), decode="static")
    kwargs = {"prompts": [[1, 2], [3]], **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.generate_queue(**kwargs)
    assert engine.generate_queue([], 3) == []
    assert engine.generate_queue([[1], [2, 3]], 3, max_tokens=0) == [([], []), ([], [])]


def test_bench_host_loop_smoke():
    """Today's loop and an anchor commit's (HEAD here: the same code, extracted and imported from elsewhere)."""
    cmd = [sys.executable, "-m", "dev.bench_host_loop", "--batch", "8", "--columns", "6", "--repeats", "1", "--rounds", "1",
           "--anchor", "HEAD"]
    for options in ([], ["--line_headers"], ["--graph", "--line_headers"]):
        out = subprocess.run(cmd + options, capture_output=True, text=True, timeout=300, check=True).stdout
        summary = json.loads(out.strip().splitlines()[-1])["ms_per_column"]
        assert set(summary) == {"today", "HEAD", "speedup"} and all(v > 0 for v in summary["today"].values())
    bad = subprocess.run([sys.executable, "-m", "dev.bench_host_loop", "--anchor", "no-such-rev"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "git archive 'no-such-rev' failed" in bad.stderr


def test_bench_queue_smoke():
    cmd = [sys.executable, "-m", "dev.bench_queue", "--depth", "1", "--vocab_size", "300", "--prompts", "9", "--rows", "5",
           "--samples", "2", "--prompt_len", "6", "--new_tokens", "16", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    rows = {r["path"]: r for r in summary["results"]}
    assert set(rows) == {"passes", "queue"} and rows["passes"]["speedup"] == 1.0
    from dev.bench_rollout import row_lengths
    assert summary["tokens"] == 2 * sum(row_lengths(9, 16)) and all(r["tok_per_s"] > 0 for r in rows.values())


def test_generate_queue_tool_calls_while_rows_join_equal_one_pass():
    """Rows call the calculator at different steps (frequent tokens stand for <|python_start|> / <|python_end|>)
    while others join and leave: the queue forces each row's tool output as one pass of every prompt does."""
    model = tiny_model(seed=0, vocab_size=256)
    prompts = mixed_prompts(8, (3, 8, 5, 11, 2, 6, 1, 4, 9, 7), vocab=256)
    counts = collections.Counter(t for p in prompts for t in naive(model, p, 24)[:12])
    call, end, stop = [t for t, _ in counts.most_common(3)]
    tokenizer = StandInTokenizer(assistant_end=stop, python_start=call, python_end=end, output_start=200, output_end=201)
    engine = Engine(model, tokenizer, decode="static")
    whole = engine.generate_prompts(prompts, max_tokens=24, temperature=0.0)
    assert sum(m.count(0) for _, m in whole) > 20, "test needs rows whose tool output was forced"
    assert len({len(c) for c, _ in whole}) > 4, "test needs rows that finish at different steps"
    for rows in (2, 3):
        assert engine.generate_queue(prompts, rows, max_tokens=24, temperature=0.0) == whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["static", "graph"])
def test_generate_queue_on_cuda(mode):
    """The queue on the device: places, shifts and (graph) replays on one captured cache. bf16 kernels round
    differently at different batch shapes, so against one pass only the first tokens are compared; the queue
    itself must repeat itself."""
    model = tiny_model(seed=4)
    prompts = mixed_prompts(5, (3, 8, 5, 11, 2, 6, 1, 4, 9, 7, 3, 12, 5)) * 2
    stop = stop_token_for(model, prompts)
    engine = Engine(model.to("cuda"), StandInTokenizer(assistant_end=stop), decode=mode)
    for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)):
        a = engine.generate_queue(prompts, 3, max_tokens=24, **kwargs)
        assert a == engine.generate_queue(prompts, 3, max_tokens=24, **kwargs)
        if kwargs["temperature"] == 0:
            whole = engine.generate_prompts(prompts, max_tokens=24, **kwargs)
            assert [c[:1] for c, _ in a] == [c[:1] for c, _ in whole]
