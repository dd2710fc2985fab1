"""
The fixed-shape decode step (issue 17): a KV cache whose tensors keep their shapes for a whole generation, a
step that feeds one token per row, writes its keys and values and samples the next token on the device, and
that step captured as a CUDA graph (one per window of the cache, if asked). Engine's fixed-shape loops
(nanochat/engine.py) run it; its compiled modes also prefill prompts into such a cache (prefill_step).
"""

import copy
import functools
import itertools
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel


class StaticKVCache:
    """The fixed-shape decode step's cache. Every tensor keeps its shape for the whole generation and the
    write column is a device tensor, so each decode step sees the same shapes and no changing Python int:
    torch.compile builds one graph for it and a CUDA graph can replay it.

    k[layer], v[layer]: (batch, n_kv_heads, seq_len, head_dim), one tensor per layer: under torch.compile
    a write into a view of one big tensor became a copy of the whole layer every step (inductor could not
    do it in place), a write into a whole input tensor is done in place. All rows write column `pos`;
    row b's real tokens start at column pad[b] (prompts are left-padded), and its query sees columns
    pad[b]..pos only, through a mask over all seq_len columns (columns past pos are never attended).
    spare_columns: columns allocated past seq_len and never used, so that every window (first_columns) is a
    strict view of the tensors (GraphedStep's windows under torch.compile).
    """

    static = True           # GPT.forward takes the positions and the mask from here
    uncapped_logits = True  # and skips the soft-cap: the sampler caps only the logits it keeps

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device="cpu", dtype=torch.float32,
                 spare_columns=0):
        shape = (batch_size, num_heads, seq_len + spare_columns, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.columns = torch.arange(seq_len, device=device)
        # Eager only: attend to the first `window` columns instead of all seq_len (the filled ones, known on
        # the host). Changes the shapes every step, so None under torch.compile and CUDA graphs.
        self.window = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len, dtype=None, spare_columns=0):
        c = model.config
        dtype = dtype or model.transformer.wte.weight.dtype
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer,
                   device=model.get_device(), dtype=dtype, spare_columns=spare_columns)

    def mark_length_dynamic(self):
        """Tell torch.compile that this cache's length varies between generations: a compiled step then serves
        every length of its batch bucket instead of compiling again for each (RL's prompt lengths give several:
        25-45 s each at depth 20 on a GPU, and dynamo's recompile limit, 8 graphs of decode_step shared by every
        Engine in the process, makes a fullgraph compile raise once hit). The positions and the mask depend
        on the length only through these tensors' sizes. Whether kernels compiled for a symbolic length run as
        fast on a GPU as for a fixed one is unmeasured (Engine.DYNAMIC_LENGTH; dev/logs/gpu/next/PLAN.md)."""
        for tensor in self.k + self.v:
            torch._dynamo.mark_dynamic(tensor, 2)
        torch._dynamo.mark_dynamic(self.columns, 0)
        return self

    def first_columns(self, width, dynamic=True):
        """This cache seen through its first `width` columns: the same memory, write column and padding, but a step
        on it attends to `width` columns instead of all of them (GraphedStep's windows: a step early in a generation
        need not read the empty columns at the end). dynamic (for a compiled step; it imports dynamo): its tensors'
        column count is marked as a dynamic size, so one compiled graph serves every width; a view is strided like
        its whole tensor, which a contiguous tensor is not (another graph), hence a windowed cache's spare column:
        no window is whole."""
        assert 0 < width <= self.capacity, f"a window of {width} columns in a cache of {self.capacity}"
        view = copy.copy(self)
        view.k = [t[:, :, :width] for t in self.k]
        view.v = [t[:, :, :width] for t in self.v]
        view.columns = self.columns[:width]
        view.window = None
        if dynamic and width > 1:  # dynamo specializes sizes of 1 (a mark on one would raise)
            for tensor in view.k + view.v:
                torch._dynamo.mark_dynamic(tensor, 2)
            torch._dynamo.mark_dynamic(view.columns, 0)
        return view

    @property
    def batch_size(self):
        return self.k[0].size(0)

    @property
    def capacity(self):
        return self.columns.size(0)

    def load(self, k, v, pad, length, rows, slots):
        """Copy columns [0, length) of rows `rows` of (k, v) into this cache's rows `slots`, with their
        padding; the next write goes to column `length`. k[layer] is (batch, heads, columns, head_dim) of any
        batch and length (a KVCache's k, or another StaticKVCache's). In place, so a CUDA graph captured on
        this cache stays valid. Rows not in `slots` are idle: no padding."""
        assert length <= self.capacity, f"{length} columns do not fit a cache of {self.capacity}"
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.pos.device)
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.pos.device)
        for layer in range(len(self.k)):
            self.k[layer][slots, :, :length] = k[layer][:, :, :length].index_select(0, rows)
            self.v[layer][slots, :, :length] = v[layer][:, :, :length].index_select(0, rows)
        self.pad.zero_()
        if pad is not None:
            self.pad[slots] = pad.index_select(0, rows)
        self.pos.fill_(length)

    def place(self, k, v, pad, length, rows, slots, end):
        """Copy columns [0, length) of rows `rows` of (k, v) into columns [end - length, end) of slots `slots`,
        with their padding shifted to match: prompts joining a cache whose write column is `end` (Engine.
        generate_queue). Leaves the other slots and the write column alone. In place."""
        assert length <= end <= self.capacity, f"{length} columns ending at {end} do not fit a cache of {self.capacity}"
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.pos.device)
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.pos.device)
        for layer in range(len(self.k)):
            self.k[layer][slots, :, end - length:end] = k[layer][:, :, :length].index_select(0, rows)
            self.v[layer][slots, :, end - length:end] = v[layer][:, :, :length].index_select(0, rows)
        start = torch.full((len(slots),), end - length, dtype=torch.long, device=self.pos.device)
        self.pad[slots] = start if pad is None else start + pad.index_select(0, rows)

    def shift_left(self, shift, end):
        """Move the filled columns [shift, end) of every slot to [0, end - shift), and the padding and the write
        column with them: room at the right for rows that join later, as long as no live row starts before
        column `shift`. In place, so a CUDA graph captured on this cache stays valid."""
        for cache in self.k + self.v:
            cache[:, :, :end - shift] = cache[:, :, shift:end].clone()
        self.pad.sub_(shift).clamp_(min=0)
        self.pos.sub_(shift)

    def positions_and_mask(self, T):
        """Rotary positions (B, T) and the attention mask (B, 1, T, seq_len) of the tokens at columns pos..pos+T-1.
        T = 1: a decode step; T > 1: a prefill chunk (Engine's compiled prefill), causal among its columns, where
        a query in a row's padding sees itself only (a row masked out entirely would give NaNs)."""
        columns = self.columns if self.window is None else self.columns[:self.window]
        if T == 1:
            positions = (self.pos - self.pad).clamp(min=0).unsqueeze(1)
            mask = (columns[None, :] <= self.pos) & (columns[None, :] >= self.pad[:, None])
            return positions, mask[:, None, None, :]
        queries = self.pos + torch.arange(T, device=self.pos.device)                     # (T,)
        positions = (queries[None, :] - self.pad[:, None]).clamp(min=0)                   # (B, T)
        causal = columns[None, :] <= queries[:, None]                                     # (T, columns)
        real = columns[None, :] >= self.pad[:, None]                                      # (B, columns)
        mask = (causal[None] & real[:, None, :]) | (columns[None, None, :] == queries[None, :, None])
        return positions, mask[:, None]

    def insert_kv(self, layer_idx, k, v):
        """Write this call's keys/values (B, H, T, D) at columns pos..pos+T-1; return the layer's whole cache."""
        cache_k, cache_v = self.k[layer_idx], self.v[layer_idx]
        T = k.size(2)
        index = self.pos.view(1) if T == 1 else self.pos + torch.arange(T, device=self.pos.device)
        # index_copy_ does not cast (slice assignment does): under autocast k may differ from the cache dtype
        cache_k.index_copy_(2, index, k.to(cache_k.dtype))
        cache_v.index_copy_(2, index, v.to(cache_v.dtype))
        if self.window is not None:
            return self.k[layer_idx][:, :, :self.window], self.v[layer_idx][:, :, :self.window]
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, T):
        self.pos.add_(T)


# -----------------------------------------------------------------------------
# The step: sample on the device, then capture it as a CUDA graph

def sample_from_raw_logits(logits, noise, temperature, top_k, softcap):
    """The decode step's sampler: on the device, no generator argument and no host sync, so it compiles
    and graph-captures. `logits` (B, V) are before the soft-cap; `noise` (B, width) is Exponential(1),
    drawn by the caller from the generator (width: top_k, or V without top-k; ignored at temperature 0).

    It returns what sample_next_token returns for the capped logits and the same generator state, because
    torch.multinomial draws one sample as argmax(probs / Exponential(1) noise) from a tensor shaped like
    probs, and the cap (tanh) is monotonic, so the top-k may be taken before capping. The one difference:
    two raw logits that cap to the same float are a tie after capping, not before."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k and top_k < logits.size(-1):
        values, ids = torch.topk(logits, top_k, dim=-1)
        values = softcap * torch.tanh(values / softcap)
        probs = F.softmax(values / temperature, dim=-1)
        return ids.gather(-1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(-1)
    probs = F.softmax(softcap * torch.tanh(logits / softcap) / temperature, dim=-1)
    return (probs / noise).argmax(dim=-1)


def prefill_step(model, cache, ids):
    """One prefill chunk on a StaticKVCache: feed ids (B, T) at columns cache.pos..pos+T-1, store their keys and
    values, advance pos, and return the last column's logits (B, V), soft-capped as the model caps them. The chunk's
    place is a device tensor, so torch.compile builds one graph for every chunk (Engine._compiled_prefill marks the
    batch, the chunk's width and the cache's length dynamic)."""
    logits = model(ids, kv_cache=cache, last_only=True)[:, -1, :]
    softcap = model.config.softcap  # the static cache asks the model for raw logits (the decode step caps its top-k)
    return softcap * torch.tanh(logits / softcap)


def noise_width(vocab_size, temperature, top_k):
    """Columns of Exponential noise one sampled row consumes (0: greedy, no randomness)."""
    if temperature == 0:
        return 0
    return top_k if top_k and top_k < vocab_size else vocab_size


def decode_step(model, cache, tokens, noise, temperature, top_k, attention=None, return_logits=False):
    """One fixed-shape step for every row of a StaticKVCache: feed tokens (B,), store their keys/values at
    column cache.pos, advance it, and sample each row's next token. Everything stays on the device.
    return_logits: return (tokens, the raw logits they were sampled from) (a captured step keeps its logits, so
    that Engine._lookahead_loop can sample them again with other noise).

    attention: SDPA backends to try first, first choice first (None: the caller's choice). The choice is made
    inside the step so that torch.compile traces it: a compiled step fixes its attention kernel when it
    compiles and does not guard on a choice made outside it (on an H200, a step compiled without cuDNN was
    reused unchanged under cuDNN-first: dev/gpu_results.md), but it does guard on this argument."""
    if attention is None:
        logits = model(tokens.unsqueeze(1), kv_cache=cache)[:, -1, :]
    else:
        with sdpa_kernel(list(attention), set_priority=True):
            logits = model(tokens.unsqueeze(1), kv_cache=cache)[:, -1, :]
    sampled = sample_from_raw_logits(logits, noise, temperature, top_k, model.config.softcap)
    return (sampled, logits) if return_logits else sampled


def bucket_size(rows):
    """Batch bucket: the next power of two, so the step only ever sees a few batch shapes (each is a
    recompile under torch.compile and a capture for a CUDA graph)."""
    return 1 << max(0, rows - 1).bit_length()


class GraphedStep:
    """decode_step captured once as a CUDA graph on one StaticKVCache, then replayed: a step costs one
    graph launch instead of ~1,000 kernel launches (at depth 20 the host-issued launches, not the GPU,
    set the pace: dev/gpu_results.md). Inputs are copied into static buffers before each replay; the
    output tensors (`out`, the sampled tokens, and `logits`) are overwritten by each replay (read them before
    the next).

    windows (None: one graph over the whole cache): ascending column counts, the last the cache's capacity; a
    graph per window, each attending to the cache's first columns only (StaticKVCache.first_columns), captured
    when a step first needs it. A step that leaves `filled` columns filled runs the narrowest window that holds
    them: attention reads the cache, and at batch 256 most of a step's time is that read (dev/gpu_results.md).
    `out`, `logits` and `replay` are those of the window last run. The captures share the input buffers.
    clock: a dict whose "capture" entry each capture adds its wall seconds to (Engine.time_spent), or None.
    compiled: `step` is compiled (its windows' column counts are then marked dynamic: one compiled graph for all)."""

    def __init__(self, step, model, cache, width, temperature, top_k, windows=None, filled=None, clock=None,
                 compiled=False):
        assert windows is None or windows[-1] == cache.capacity, f"windows {windows} must end at {cache.capacity}"
        self.cache = cache
        self.windows = windows
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.pos.device)
        self.noise = torch.ones(cache.batch_size, max(1, width), device=cache.pos.device)
        self.step = functools.partial(step, model, temperature=temperature, top_k=top_k, return_logits=True)
        # a capture later in the generation runs under the autocast of this one (the loop replays outside it)
        self.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        self.reads = self.memory_of(model)
        self.clock = clock
        self.compiled = compiled
        self.graphs = {}  # window (columns) -> (replay, out, logits)
        self.use(filled)

    def window_for(self, filled):
        """The window a step that leaves `filled` columns filled runs (None: the widest)."""
        assert filled is None or filled <= self.cache.capacity, f"{filled} columns in a cache of {self.cache.capacity}"
        if self.windows is None or filled is None:
            return self.cache.capacity
        return next(w for w in self.windows if w >= filled)

    def use(self, filled):
        """Make the graph of `filled`'s window the one `replay`, `out` and `logits` are, capturing it if needed."""
        window = self.window_for(filled)
        if window not in self.graphs:
            self.graphs[window] = self.capture_window(window)
        self.replay, self.out, self.logits = self.graphs[window]

    def capture_window(self, window):
        """(replay, out, logits) of the step on the cache's first `window` columns (all of them without windows).
        The warm-up runs write two columns: the window's last two, saved and put back, so a window may be captured
        at any point of a generation (even when its last column is the next one to write)."""
        cache = self.cache
        if cache.pos.is_cuda:  # the capture's clock starts when the work queued before it is done
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        view = cache if self.windows is None else cache.first_columns(window, dynamic=self.compiled)
        start = cache.pos.clone()
        written = slice(window - 2, window)
        saved = [t[:, :, written].clone() for t in cache.k + cache.v]
        cache.pos.fill_(window - 2)
        enabled, dtype = self.autocast
        # autocast's cache of cast weights off: a cast cached during capture is freed when autocast exits, and the
        # graph would read freed memory (PyTorch's CUDA-graph notes ask for cache_enabled=False)
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            replay, (out, logits) = self.capture(lambda: self.step(view, self.tokens, self.noise))
        for tensor, columns in zip(cache.k + cache.v, saved):
            tensor[:, :, written] = columns
        cache.pos.copy_(start)
        if self.clock is not None:
            self.clock["capture"] += time.perf_counter() - t0
        return replay, out, logits

    @staticmethod
    def memory_of(model):
        """Where the model's parameters and buffers live (address, shape, dtype): what a replay reads, whatever
        tensor objects hold that memory now."""
        return [(t.data_ptr(), t.shape, t.dtype) for t in itertools.chain(model.parameters(), model.buffers())]

    def reads_from(self, model):
        """Whether a replay reads `model`'s current weights: they live where they did at capture (weights updated
        in place do; a model whose weights were replaced, released or moved does not)."""
        return self.memory_of(model) == self.reads

    @staticmethod
    def capture(run):
        """(replay function, run's outputs), under the caller's autocast (capture_window turns its cache off).
        The warm-up runs on a side stream, as capture requires."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        return graph.replay, outputs

    def __call__(self, cache, tokens, noise, filled=None):
        """Run the step on `tokens` and `noise`; `filled`: the columns filled once it has written (picks the window;
        None: the widest)."""
        assert cache is self.cache, "a captured step only runs on the cache it was captured with"
        self.use(filled)
        self.tokens.copy_(tokens)
        if noise is not None:
            self.noise.copy_(noise)
        self.replay()
        return self.out
