"""
Inference: a preallocated KV cache and batched sampling with tool use. RL, co-training, evaluation and the
web server all generate through this file; the fixed-shape decode step its loops run (a cache of fixed
length, sampling on the device, a CUDA graph of the step) is in nanochat/decode_static.py.
"""

import contextlib
import copy
import functools
import itertools
import numbers
import time
from collections import deque

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.common import COMPUTE_DTYPE, UserInputError, autocast_context
from nanochat.gpt import CausalSelfAttention
from nanochat.calculator import use_calculator
from nanochat.decode_static import (GraphedStep, StaticKVCache, bucket_size, decode_step, noise_width, prefill_step,
                                    sample_from_raw_logits)


class KVCache:
    """Keys and values of every layer, preallocated for `seq_len` positions.

    Layout (n_layers, batch, n_kv_heads, seq_len, head_dim). All rows share one write position `pos`;
    prompts of different lengths are left-padded, and `pad_lengths[b]` tells the model how many
    leading columns of row b are padding (it shifts that row's rotary positions and masks them out).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device="cpu", dtype=torch.float32,
                 pad_lengths=None):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.pad_lengths = None
        if pad_lengths is not None:
            self.set_padding(pad_lengths)

    @classmethod
    def for_model(cls, model, batch_size, seq_len, dtype=None, pad_lengths=None):
        c = model.config
        dtype = dtype or model.transformer.wte.weight.dtype
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer,
                   device=model.get_device(), dtype=dtype, pad_lengths=pad_lengths)

    @property
    def batch_size(self):
        return self.k.size(1)

    @property
    def capacity(self):
        return self.k.size(3)

    def set_padding(self, pad_lengths):
        pad = torch.as_tensor(pad_lengths, dtype=torch.long, device=self.k.device)
        assert pad.shape == (self.batch_size,), f"pad_lengths must have one entry per row, got {tuple(pad.shape)}"
        self.pad_lengths = pad if bool((pad > 0).any()) else None

    def get_pos(self):
        return self.pos

    def reset(self):
        self.pos = 0
        self.pad_lengths = None

    def insert_kv(self, layer_idx, k, v):
        """Store this call's keys/values at [pos, pos+T) and return everything cached so far."""
        T = k.size(2)
        end = self.pos + T
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, capacity {self.capacity}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, T):
        self.pos += T

    def prefill(self, other):
        """Copy a filled cache (usually batch 1: the shared prompt) into every row of this one, so a
        prompt is processed once and then sampled num_samples times."""
        assert other.pos <= self.capacity, "source cache holds more positions than this one can"
        same = (0, 2, 4)  # layers, kv heads, head dim
        assert all(other.k.shape[i] == self.k.shape[i] for i in same), "caches of different models"
        assert other.batch_size in (1, self.batch_size), "source cache must have batch 1 or the same batch"
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n]  # broadcasts a batch-1 source over all rows
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n
        if other.pad_lengths is not None:
            pad = other.pad_lengths
            self.pad_lengths = pad.expand(self.batch_size).clone() if pad.numel() == 1 else pad.clone()

    # ---- extensions used by the Engine (left-padded batches of several prompts, dropping finished rows)

    def prefill_rows(self, other, rows):
        """Like prefill, but row i of this cache gets row rows[i] of `other`: one prefill of P different
        prompts fans out to P * num_samples decode rows (rows = [0,0,1,1,...] for two samples each)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        assert rows.shape == (self.batch_size,), f"need one source row per row, got {tuple(rows.shape)}"
        assert other.pos <= self.capacity, "source cache holds more positions than this one can"
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n].index_select(1, rows)
        self.v[:, :, :, :n] = other.v[:, :, :, :n].index_select(1, rows)
        self.pos = n
        self.pad_lengths = None
        if other.pad_lengths is not None:
            self.set_padding(other.pad_lengths.index_select(0, rows))

    def keep_rows(self, rows):
        """Shrink the batch to the given rows (in that order), e.g. to stop computing finished samples."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        n = self.pos
        shape = list(self.k.shape)
        shape[1] = rows.numel()
        # columns past pos are always written before they are read, so only [0, pos) is worth copying
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        k[:, :, :, :n] = self.k[:, :, :, :n].index_select(1, rows)
        v[:, :, :, :n] = self.v[:, :, :, :n].index_select(1, rows)
        self.k, self.v = k, v
        if self.pad_lengths is not None:
            self.set_padding(self.pad_lengths.index_select(0, rows))


# -----------------------------------------------------------------------------
# Sampling

def check_sampling_args(max_tokens, temperature, top_k, num_samples=1):
    """Raise a ValueError that names the bad argument (a silent clamp would hide a caller's bug)."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise ValueError(f"max_tokens must be a non-negative int or None, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int or None, got {top_k!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of (B, V) logits -> (B,) long tensor.

    Temperature 0 is argmax. Otherwise a draw from softmax(logits / temperature), restricted to the
    top_k largest logits when top_k is set (0 or None: the whole vocabulary), then to the smallest set of
    most likely tokens whose probability reaches top_p when top_p < 1 (nucleus sampling; None: off)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    nucleus = top_p is not None and top_p < 1
    if (top_k and top_k < logits.size(-1)) or nucleus:
        # draw among exactly k candidates (a threshold mask would let ties at the k-th value in)
        k = top_k if top_k and top_k < logits.size(-1) else logits.size(-1)
        values, ids = torch.topk(logits, k, dim=-1)  # sorted, most likely first
        probs = F.softmax(values / temperature, dim=-1)
        if nucleus:
            # keep a token while the mass before it is under top_p: the most likely one always stays
            keep = (probs.cumsum(dim=-1) - probs) < top_p
            keep[:, 0] = True
            probs = probs * keep
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return ids.gather(-1, choice).squeeze(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(-1)


def inference_context(device_type):
    """Autocast, and on CUDA every SDPA kernel but cuDNN's. cuDNN attention builds a plan for each new
    key length, i.e. on every step of a growing cache: measured on an H100 at depth 20, a batch-1 step took
    56.7 ms with it and 12.6 ms without (dev/gpu_results.md). A captured graph has one key length and takes
    cuDNN's kernel first (Engine.GRAPH_SDPA_BACKENDS)."""
    stack = contextlib.ExitStack()
    stack.enter_context(autocast_context(device_type))
    if device_type == "cuda":
        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    return stack


class CastLinears:
    """A copy of a model for sampling whose linear layers hold their weights in the compute dtype; the
    embedding, the buffers and every other tensor are the model's own (shared, not copied).

    Why: under autocast a linear casts its fp32 weight to bf16 on every call, and a CUDA graph replays those
    casts every step (autocast's cast cache must be off during capture). Measured at depth 20 on an H200
    (dev/gpu_results.md): the graph's step from 3.96 to 3.18 ms at batch 1 and from 10.63 to 9.70 ms at batch
    256. The cast here is the same rounding autocast does, made once per generation, so the copy's logits are
    bit-identical under autocast. refresh() copies the model's current weights in place (RL updates them
    between rollouts), so a compiled step keeps seeing the same tensors.

    fuse_qkv: each attention of the copy projects its queries, keys and values by one matmul over their three
    weights side by side (FusedQKVAttention), the three casts being views of that one tensor, so refresh()
    still fills it in place: at batch 256 a decode step's matmuls are small and each is a kernel of its own."""

    def __init__(self, model, dtype, fuse_qkv=False):
        self.dtype = dtype
        self.device = model.get_device()
        self.released = False
        with torch.inference_mode(False):  # ordinary tensors, so refresh() may write them in or out of inference mode
            casts = {id(w): torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)
                     for w in self.linear_weights(model, dtype)}
            # deepcopy with the memo pre-filled: each cast weight replaces its original, and every other parameter
            # and buffer maps to itself, so only the module objects are new (their classes and flags kept)
            memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            memo.update(casts)
            self.model = copy.deepcopy(model, memo)
        self.pairs = [(w, casts[id(w)]) for w in self.linear_weights(model, dtype)]  # (the model's weight, its cast)
        self.fuse_qkv = fuse_qkv
        self.fused = []  # (the three casts, the weight they are views of), one per attention
        cast_ids = {id(cast) for _, cast in self.pairs}
        for attention in list(self.model.modules()) if fuse_qkv else []:
            if not isinstance(attention, CausalSelfAttention):
                continue
            parts = (attention.c_q.weight, attention.c_k.weight, attention.c_v.weight)
            if all(id(w) in cast_ids for w in parts):
                with torch.inference_mode(False):  # an ordinary tensor, as the casts are
                    placeholder = torch.empty(0, dtype=dtype, device=self.device)
                attention.qkv_weight = torch.nn.Parameter(placeholder, requires_grad=False)
                attention.__class__ = FusedQKVAttention
                self.fused.append((parts, attention.qkv_weight))
        self._fuse()

    def _fuse(self):
        """Put each attention's three casts side by side in its fused weight and make them views of it."""
        with torch.inference_mode(False):
            for parts, fused in self.fused:
                fused.data = torch.cat([w.data for w in parts])
                start = 0
                for w in parts:
                    w.data = fused.data[start:start + w.size(0)]
                    start += w.size(0)

    @staticmethod
    def linear_weights(model, dtype):
        """The weights of model's linear layers that are not in dtype yet (the ones a copy casts)."""
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype != dtype]

    def fits(self, model):
        """Still a copy of this model: the same weight tensors, on the device the copy was made on (offloading
        moves a model's weights; loading with assign=True replaces them)."""
        weights = self.linear_weights(model, self.dtype)
        return (model.get_device() == self.device and len(weights) == len(self.pairs)
                and all(w is old for w, (old, _) in zip(weights, self.pairs)))

    @torch.no_grad()
    def refresh(self, model):
        with torch.inference_mode(False):
            for weight, cast in self.pairs:
                if self.released:
                    cast.data = weight.detach().to(self.dtype)
                else:
                    cast.copy_(weight)  # a fused cast is a view: this fills its attention's fused weight
        if self.released:
            self._fuse()
        self.released = False
        self.model.train(model.training)

    def release(self):
        """Give the cast weights' memory back, keeping the module objects (a compiled step guards on them, so a
        new copy would recompile); the next refresh() makes them again."""
        for _, cast in self.pairs:
            cast.data = torch.empty(0, dtype=self.dtype, device=cast.device)
        for _, fused in self.fused:
            fused.data = torch.empty(0, dtype=self.dtype, device=fused.device)
        self.released = True


class FusedQKVAttention(CausalSelfAttention):
    """A sampling copy's attention (CastLinears' fuse_qkv) whose query, key and value weights are rows of one
    tensor, qkv_weight: one matmul projects all three."""

    def project(self, x):
        sizes = (self.c_q.weight.size(0), self.c_k.weight.size(0), self.c_v.weight.size(0))
        return F.linear(x, self.qkv_weight).split(sizes, dim=-1)


# -----------------------------------------------------------------------------
# The Engine

def upload(values, device):
    """A list of ints as a long tensor on `device`. To CUDA through pinned memory without waiting: a plain copy
    from pageable memory waits for every kernel queued before it (Engine._lookahead_loop keeps one queued)."""
    values = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def left_padded(prompts, device):
    """(ids (rows, longest), pads): the prompts left-padded to the longest. Padding columns are never attended
    to, so any valid id will do."""
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + list(p) for p, pad in zip(prompts, pads)], dtype=torch.long, device=device)
    return ids, pads


class RowState:
    """Where one sample stands: tool output waiting to be fed in, an open python call, finished or not."""

    def __init__(self):
        self.forced = deque()       # tokens the harness writes into this row before sampling resumes
        self.python_tokens = None   # the expression so far, while inside <|python_start|> ... <|python_end|>
        self.done = False
        self.last_token = None
        self.line_headers = deque()  # token lists forced at the start of each following line (see generate_prompts)


class Engine:
    """Batched sampling from a GPT with a KV cache, stopping per row, with the calculator tool.

    generate()          streams (token_column, mask_column) for num_samples samples of one prompt
    generate_batch()    the same, collected: full sequences and masks
    generate_prompts()  many different prompts at once (left-padded), num_samples each, collected
    generate_queue()    the same for more prompts than one batch holds: a waiting prompt starts as rows free

    Masks are 1 where the model sampled the token and 0 where the harness forced it (tool output)."""

    # The prefill runs the prompt in column chunks: at most about PREFILL_TOKENS (rows x columns) per pass, and
    # the largest activations (the MLP's hidden layer, rows x chunk x 4 n_embd, and the attention scores, rows x
    # heads x chunk x prompt length) under PREFILL_ELEMENT_BUDGET elements. Only the last column's logits are
    # made, so the vocabulary does not enter. (The chunks were sized by full logits before, which cut a 256-row
    # verifier batch into 4-column chunks: ~90 forward passes for a 350-token prompt.) `python -m dev.bench_prefill`
    # (dev/bench_prefill.md; CPU, d4, 2 threads; 64 rows x 253 columns / 256 x 128 / 16 x 375): passes of 4,096
    # tokens take 1.25x / 1.94x / 0.96x the old rule's speed, within 6 % of the fastest width timed, where a
    # single pass is up to 1.3x slower than the fastest. A GPU pass costs ~1,000 kernel launches, so CUDA takes
    # larger passes (d12, 256 x 384 on an H200: 1.39 s -> 0.29 s, dev/gpu_results.md).
    PREFILL_TOKENS = {"cpu": 4096, "cuda": 32768}
    PREFILL_ELEMENT_BUDGET = 1 << 27

    DECODE_MODES = ("auto", "dynamic", "static", "compile", "graph", "compiled_graph")
    GRAPH_MODES = ("graph", "compiled_graph")  # CUDA only; one captured shape at a time (SHRINK_MIN_STEPS)
    CAPACITY_QUANTUM = 64  # static caches are a multiple of this long: few shapes, few recompiles
    QUEUE_MIN_SHIFT = 0.25  # generate_queue moves its cache's columns left only to free this share of a row's budget
    # Attention kernels a captured step may use, first choice first. cuDNN's is left out of every other path
    # (inference_context: it builds a plan per key length), but a graph has one key length, so it plans once;
    # at a batch-256 decode shape it reads the cache ~2x faster than the memory-efficient kernel SDPA picks
    # otherwise (dev/bench_decode_attention, dev/gpu_results.md). SDPA falls back down the list where it cannot.
    GRAPH_SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                           SDPBackend.MATH)
    # Graph modes that take them. On an H200 at depth 20 (dev/gpu_results.md): the graph's batch-256 step 9.15 -> 6.21
    # ms, the compiled graph's 7.87 -> 4.61 ms at batch 256 and 1.62 -> 1.31 ms at batch 1 (its step chooses the
    # kernel inside itself, decode_step's `attention`, so that torch.compile traces the choice)
    CUDNN_GRAPH_MODES = GRAPH_MODES
    # Captured steps that run one replay ahead of the host (_lookahead_loop) while their rows keep their slots: on an
    # H200 at depth 20 and batch 256 the graph's step 6.05 -> 5.80 ms, the compiled graph's 4.12 -> 3.91 ms
    # (dev/gpu_results.md, 2026-11-28)
    LOOKAHEAD_MODES = GRAPH_MODES
    # A fixed-shape loop moves its live rows to the next smaller batch bucket once they fit it, if at least this many
    # steps may remain (None: never), so finished rows stop costing compute: on CPU (d4, batch 64, answer lengths
    # mixed in [16, 128]) 1.21x the tokens/s of never moving (dev/logs/bench_rollout_mixed_cpu.log). Eagerly a new
    # shape is free (a compile per bucket under torch.compile); a CUDA graph pays a capture per bucket (~3 eager
    # steps and a cuDNN plan), so graphs keep their bucket until a GPU measures it (dev/gpu_checks.sh 10).
    SHRINK_MIN_STEPS = {"static": 0, "compile": 0, "graph": None, "compiled_graph": None}
    # Compiled steps take the cache length as a dynamic size (StaticKVCache.mark_length_dynamic): one compile per
    # batch bucket and sampling setting, whatever lengths the prompts need. False: a compile per length. On an H200
    # (depth 20, batch 256) its step was as fast as one compiled for the length: 3.91 vs 3.90 ms (2026-11-28)
    DYNAMIC_LENGTH = True
    # Graph modes that capture a graph per window of WINDOW_QUANTUM columns and run the narrowest one holding the
    # filled columns (GraphedStep's windows), so attention stops reading the empty end of the cache: at batch 256 and
    # depth 20 it read all 320 columns of the bench's cache at every step, 2.6 ms of the compiled graph's 4.6 ms
    # (dev/gpu_results.md). Each window costs a capture (warm-up steps and a cuDNN plan) per generation unless the
    # graphs are kept. On an H200 (2026-11-28, depth 20, batch 256, rows filling 64 -> 320 columns, captures
    # included) the compiled graph's tokens/s 1.03x (step 3.91 -> 3.79 ms; 3.51 ms with its graphs kept), the
    # graph's 1.00x (its step 5.80 -> 5.88 ms: the eager capture costs more than the columns it saves), so windows
    # are on for the compiled graph alone (dev/logs/gpu/next/PLAN.md, rule 5)
    WINDOW_MODES = ("compiled_graph",)
    WINDOW_QUANTUM = 64
    # Decode modes whose prompts are prefilled by a compiled step too (prefill_step on a StaticKVCache: one graph for
    # every batch, chunk width and prompt length). The eager prefill's time on a GPU is mostly elementwise work on
    # activations (two thirds of the d12 verifier's 152 ms for 256 prompts of 384 tokens, dev/gpu_results.md), which
    # compiling fuses. On an H200 (2026-11-28) the prefill to the first column 104.5 -> 73.5 ms for the d20 bench's
    # 256 prompts of up to 64 tokens and 239.0 -> 147.9 ms for the d12 verifier's 256 of up to 384
    COMPILED_PREFILL_MODES = ("compile", "compiled_graph")
    # torch.compile's mode for the decode step (None: its defaults). "max-autotune-no-cudagraphs" times Triton's
    # matmul templates against cuBLAS for each of the step's matmul shapes when it compiles (a batch-256 step's
    # matmuls are skinny, 256 rows, where a library's default tiles can leave SMs idle); never inductor's own
    # CUDA graphs, since the graph modes capture theirs. Unmeasured on a GPU (dev/logs/gpu/next/PLAN.md, rule 6)
    COMPILE_MODE = None
    # Sample from a copy whose attentions project queries, keys and values by one matmul (CastLinears' fuse_qkv):
    # two kernels fewer per layer and step. Only where the Engine samples from a cast copy (CUDA by default).
    # Unmeasured on a GPU (dev/logs/gpu/next/PLAN.md, rule 7)
    FUSE_QKV = False

    def __init__(self, model, tokenizer, decode="auto", max_rows=None, cast_weights="auto", keep_graphs=False):
        """max_rows (None: no limit): the most rows generate_prompts samples in one batched pass. The KV cache
        and the logits grow with the rows (256 problems x 4 samples at d4 on CPU: ~2.8 GB), so larger requests
        are cut into chunks of whole prompts, chunk c sampled with seed + c: the same results as one pass
        whenever no cut is needed, other (equally random) samples when one is.

        decode picks the decoding loop (all give the same tokens, but generate_queue's sampled ones; see _decode_mode):
        dynamic  the growing-batch loop: shrinks the cache when rows finish, reads only the filled columns
        static   the fixed-shape step (StaticKVCache, batch buckets, sampling on the device), eager
        compile  the fixed-shape step under torch.compile (one graph per batch bucket: the cache length is dynamic),
                 and the prefill too (COMPILED_PREFILL_MODES)
        graph    the fixed-shape step captured as a CUDA graph and replayed, one step ahead of the host (CUDA only)
        compiled_graph  the step under torch.compile, then captured as a CUDA graph: fused kernels, one launch
        auto     graph on CUDA, static on CPU (measured: dev/bench_rollout.md)

        cast_weights: sample from a copy of the model whose linear weights are in the compute dtype (CastLinears:
        the same tokens, no per-step weight cast). "auto": on CUDA when the forward runs under bf16/fp16
        autocast; a dtype: always cast to it (the forward must run under autocast to that dtype; tests use it
        on CPU); False: never. The copy holds the linears in that dtype (0.95 GB at depth 20) for as long as
        the Engine lives, and is refreshed from the model's weights at the start of every generation.

        keep_graphs: keep a captured step and its cache after a generation, for the next one of the same shape
        (batch bucket, cache length, sampling settings) as long as the weights it reads still live where they
        did (GraphedStep.reads_from). A chat server's next reply then skips the capture (at depth 20, batch 1, on
        an H200 the graph's first column came ~98 ms after the call, the eager loop's ~27 ms: dev/gpu_results.md).
        Off by default: RL trains between rollouts and needs the cache's memory (gigabytes at batch 256)."""
        if decode not in self.DECODE_MODES:
            raise ValueError(f"decode must be one of {self.DECODE_MODES}, got {decode!r}")
        if not (cast_weights in ("auto", False) or isinstance(cast_weights, torch.dtype)):
            raise ValueError(f"cast_weights must be 'auto', False or a torch.dtype, got {cast_weights!r}")
        self.cast_weights = cast_weights
        self._cast = None  # CastLinears, made on the first generation that uses it
        if max_rows is not None and (not isinstance(max_rows, numbers.Integral) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
        self.max_rows = max_rows
        self.model = model
        self.tokenizer = tokenizer
        self.decode = decode
        self._compiled_step = None
        self._compiled_prefill_step = None
        self.keep_graphs = keep_graphs
        self._graphs = {}  # (mode, batch, capacity, width, temperature, top_k, dtype, windows) -> GraphedStep, its cache
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.stop_tokens = frozenset((self.bos, self.assistant_end))
        self._acting_tokens = self.stop_tokens | {self.python_start, self.python_end}  # tokens _observe acts on
        self._newlines = None
        # wall seconds of every generation so far (generate, generate_batch, generate_prompts; not generate_queue):
        # to its first column (the prefill) and after it (decoding); "capture": CUDA graph captures, a part of those
        # two (every capture, generate_queue's too). Callers read the change over a phase.
        self.time_spent = {"prefill": 0.0, "decode": 0.0, "capture": 0.0}

    # ---- tool use

    def tool_output_tokens(self, expression_tokens):
        """The tokens forced after a python call: <|output_start|> result <|output_end|>."""
        expression = self.tokenizer.decode(expression_tokens)
        try:
            result = use_calculator(expression)
        except Exception as e:  # the calculator promises not to raise; a rollout must survive even if it does
            result = f"Error: {type(e).__name__}"
        return [self.output_start] + self.tokenizer.encode(str(result)) + [self.output_end]

    def _observe(self, state, token):
        """Update a row's state after `token` was appended to it. _step_rows skips this call for a token outside
        _acting_tokens on a row with nothing forced, no open calculator call and no newline under line headers:
        a rule added here for another token or state must be reflected there."""
        state.last_token = token
        if state.line_headers and not state.forced and token in self._newline_tokens():
            state.forced.extend(state.line_headers.popleft())
        if token in self.stop_tokens:
            state.done = True
        elif token == self.python_start:
            state.python_tokens = []
        elif token == self.python_end and state.python_tokens is not None:
            state.forced.extend(self.tool_output_tokens(state.python_tokens))
            state.python_tokens = None
        elif state.python_tokens is not None:
            state.python_tokens.append(token)

    def _newline_ids(self):
        """"\n" as token ids (one token in our tokenizers)."""
        return self.tokenizer.encode("\n")

    def _newline_tokens(self):
        """Ids of the tokens whose text ends with a newline (a line header is forced after them)."""
        if self._newlines is None:  # decoded once per engine, only by callers that force line headers
            self._newlines = frozenset(i for i in range(self.tokenizer.get_vocab_size())
                                       if self.tokenizer.decode_bytes([i]).endswith(b"\n"))
        return self._newlines

    # ---- the decoding loop

    def _cache_dtype(self, device):
        # under CUDA autocast the keys/values come out in the compute dtype: store them that way (half the memory)
        if device.type == "cuda" and COMPUTE_DTYPE != torch.float32:
            return COMPUTE_DTYPE
        return None

    def _prefill_chunk(self, model, rows, length, device):
        """Columns per prefill pass (see PREFILL_TOKENS)."""
        c = model.config
        by_memory = self.PREFILL_ELEMENT_BUDGET // (rows * (4 * c.n_embd + c.n_head * length))
        by_tokens = self.PREFILL_TOKENS.get(device.type, self.PREFILL_TOKENS["cuda"]) // rows
        return max(1, min(by_memory, by_tokens))

    def _prefill(self, model, ids, cache):
        """Run the (left-padded) prompts through the model into the cache; logits of the last column."""
        rows, length = ids.shape
        chunk = self._prefill_chunk(model, rows, length, ids.device)
        for start in range(0, length, chunk):
            logits = model(ids[:, start:start + chunk], kv_cache=cache, last_only=True)
        return logits[:, -1, :]

    @torch.inference_mode()
    def _stream(self, prompts, num_samples, max_tokens, temperature, top_k, seed, top_p=None, line_headers=None):
        """Yield one (token_column, mask_column) per step for len(prompts) * num_samples rows, prompt-major.
        Rows that have finished repeat their stop token with mask 0 until every row is done."""
        check_sampling_args(max_tokens, temperature, top_k, num_samples)
        model = self.model
        prompts = self._checked_prompts(prompts)
        device = model.get_device()
        longest = max(len(p) for p in prompts)
        context_limit = model.cos.size(0)  # the rotary table: positions past it do not exist
        new_tokens = model.config.sequence_len if max_tokens is None else max_tokens
        if new_tokens == 0:
            return
        capacity = min(longest + new_tokens, context_limit)
        num_rows = len(prompts) * num_samples
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids, pads = left_padded(prompts, device)

        mode = self._decode_mode(device)
        if top_p is not None and top_p < 1 and temperature > 0:
            mode = "dynamic"  # nucleus sampling lives in sample_next_token; the fixed-shape step samples top-k only
        states = self._row_states(num_rows, num_samples, line_headers)
        sampler = self._sampling_model(model)
        if mode == "dynamic":
            columns = self._decode_dynamic(sampler, ids, pads, num_samples, states, capacity, new_tokens, temperature,
                                           top_k, rng, top_p)
        else:
            columns = self._decode_static(sampler, mode, ids, pads, num_samples, states, capacity, new_tokens,
                                          temperature, top_k, rng)
        # time_spent: the first column waits for the prefill (its tokens are read on the host), the rest is decoding
        # (the caller's work between columns included); a consumer that stops early still has its time counted
        start = time.perf_counter()
        first = None
        try:
            for column in columns:
                if first is None:
                    first = time.perf_counter()
                    self.time_spent["prefill"] += first - start
                yield column
        finally:
            columns.close()  # at once, not when collected: a graph loop synchronizes and gives back its graphs
            if first is not None:
                self.time_spent["decode"] += time.perf_counter() - first

    def _checked_prompts(self, prompts):
        """The prompts as lists of ints, after a clear error for an empty one, a bad id, or one too long."""
        vocab_size = self.model.config.vocab_size
        for i, prompt in enumerate(prompts):
            if not prompt or not all(isinstance(t, numbers.Integral) and 0 <= t < vocab_size for t in prompt):
                raise ValueError(f"prompt {i} must be a non-empty list of token ids in [0, {vocab_size})")
        prompts = [[int(t) for t in prompt] for prompt in prompts]
        longest = max(len(p) for p in prompts)
        context_limit = self.model.cos.size(0)  # the rotary table: positions past it do not exist
        if longest >= context_limit:
            raise ValueError(f"prompt of {longest} tokens does not fit the model's {context_limit}-position rotary table")
        return prompts

    @staticmethod
    def _check_line_headers(prompts, line_headers):
        if line_headers is not None and len(line_headers) != len(prompts):
            raise ValueError(f"line_headers needs one list per prompt ({len(prompts)}), got {len(line_headers)}")

    @staticmethod
    def _row_states(num_rows, num_samples, line_headers):
        """A RowState per row (prompt-major), with its prompt's line headers queued (the first one forced)."""
        states = [RowState() for _ in range(num_rows)]
        if line_headers is not None:
            for row, state in enumerate(states):
                state.line_headers = deque(list(h) for h in line_headers[row // num_samples])
                if state.line_headers:  # the first header opens the completion
                    state.forced.extend(state.line_headers.popleft())
        return states

    def _sampling_dtype(self, device):
        """The dtype cast_weights asks the linears to be sampled in on `device` (None: no cast)."""
        if self.cast_weights == "auto":
            return COMPUTE_DTYPE if device.type == "cuda" and COMPUTE_DTYPE != torch.float32 else None
        return self.cast_weights or None

    def _sampling_model(self, model):
        """The model to sample from: a CastLinears copy, refreshed to the model's current weights, where
        cast_weights asks for one; else the model itself."""
        dtype = self._sampling_dtype(model.get_device())
        if not dtype or not CastLinears.linear_weights(model, dtype):
            return model  # nothing to cast (e.g. weights already in bf16)
        if (self._cast is None or self._cast.dtype != dtype or self._cast.fuse_qkv != self.FUSE_QKV
                or not self._cast.fits(model)):
            self._cast = None  # free the old copy before making the new one
            self._cast = CastLinears(model, dtype, fuse_qkv=self.FUSE_QKV)
        else:
            self._cast.refresh(model)
        return self._cast.model

    def release_sampling_weights(self):
        """Give back the memory of the CastLinears copy's weights (and of a kept graph, which reads them); the
        next generation casts them again."""
        self._graphs.clear()
        if self._cast is not None:
            self._cast.release()

    def _decode_mode(self, device):
        if self.decode == "auto":
            return "graph" if device.type == "cuda" else "static"
        if self.decode in self.GRAPH_MODES and device.type != "cuda":
            raise ValueError(f"decode={self.decode!r} needs a CUDA device")
        return self.decode

    def _step_rows(self, states, rows, sampled):
        """Append one token to each row in `rows` (sampled[j] for rows[j], unless tool output is waiting
        to be forced); finished rows repeat their last token. The step's (token_column, mask_column)."""
        column = [state.last_token for state in states]
        mask = [0] * len(states)
        acting, newlines = self._acting_tokens, self._newlines  # newlines: None until line headers first need them
        for row, token in zip(rows, sampled):
            state = states[row]
            if state.done:
                continue
            if (token not in acting and not state.forced and state.python_tokens is None
                    and (not state.line_headers or (newlines is not None and token not in newlines))):
                # the common case (a verifier's forced headers included): all _observe would do is remember it
                state.last_token = column[row] = token
                mask[row] = 1
                continue
            if state.forced:
                token = state.forced.popleft()
            elif token in self.stop_tokens and state.line_headers:
                # a verifier may not stop before its last forced header: the stop becomes an (unsampled) newline,
                # which forces the next header (alignment traced in dev/logs/verifier/remeasure/alignment_trace.log)
                token, *rest = self._newline_ids()
                state.forced.extend(rest)
                state.python_tokens = None  # a calculator call it left open is dropped: the newline and header are text
            else:
                mask[row] = 1
            column[row] = token
            self._observe(state, token)
        return column, mask

    @staticmethod
    def _keep_sampling(active, alive):
        """The rows that go on drawing random numbers (`alive`: those of `active` not done): finished rows
        leave once they are an eighth of the batch (the dynamic loop drops them from its cache then). Both
        loops follow this rule, so a seed gives the same samples whichever runs."""
        return alive if len(active) - len(alive) >= max(1, len(active) // 8) else active

    def _decode_dynamic(self, model, ids, pads, num_samples, states, capacity, new_tokens, temperature, top_k, rng,
                        top_p=None):
        """The growing-batch loop: the cache holds only the rows still sampling, and each step attends to
        the filled columns only (shapes change every step, so it runs eagerly)."""
        device = ids.device
        num_prompts, longest = ids.shape
        num_rows = num_prompts * num_samples
        dtype = self._cache_dtype(device)
        with inference_context(device.type):
            if num_samples == 1:
                cache = KVCache.for_model(model, num_rows, capacity, dtype=dtype, pad_lengths=pads)
                logits = self._prefill(model, ids, cache)
            else:
                # each prompt is processed once, then its keys/values are copied to its num_samples rows
                prompt_cache = KVCache.for_model(model, num_prompts, longest, dtype=dtype, pad_lengths=pads)
                logits = self._prefill(model, ids, prompt_cache)
                cache = KVCache.for_model(model, num_rows, capacity, dtype=dtype)
                if num_prompts == 1:
                    cache.prefill(prompt_cache)
                    logits = logits.expand(num_rows, -1)
                else:
                    source_rows = torch.arange(num_prompts, device=device).repeat_interleave(num_samples)
                    cache.prefill_rows(prompt_cache, source_rows)
                    logits = logits.index_select(0, source_rows)
                del prompt_cache

        active = list(range(num_rows))  # cache row j holds output row active[j]
        generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).tolist()
            column, mask = self._step_rows(states, active, sampled)
            yield column, mask
            generated += 1
            alive = [row for row in active if not states[row].done]
            if not alive or generated >= new_tokens or cache.get_pos() >= cache.capacity:
                return
            keep = self._keep_sampling(active, alive)
            if len(keep) < len(active):
                position = {row: j for j, row in enumerate(active)}
                cache.keep_rows([position[row] for row in keep])
                active = keep
            feed = torch.tensor([[column[row]] for row in active], dtype=torch.long, device=device)
            with inference_context(device.type):
                logits = model(feed, kv_cache=cache)[:, -1, :]

    def _compiled_prefill(self, model, ids, pads, dtype):
        """_prefill by a compiled step: (StaticKVCache holding the prompts' keys and values, last column's logits).
        Chunks as _prefill's; each runs on a view of the cache's columns up to the chunk's end (first_columns), so a
        chunk reads only the columns before it, and batch, chunk width and cache length are dynamic sizes to
        torch.compile: one graph (a batch of one prompt is another)."""
        rows, length = ids.shape
        cache = StaticKVCache.for_model(model, rows, length, dtype=dtype, spare_columns=1)
        cache.pad.copy_(torch.as_tensor(pads, dtype=torch.long))
        if self._compiled_prefill_step is None:
            self._compiled_prefill_step = torch.compile(prefill_step, dynamic=False, fullgraph=True)
        chunk = self._prefill_chunk(model, rows, length, ids.device)
        ends = list(range(chunk, length, chunk)) + [length]
        if len(ends) > 1 and ends[-1] - ends[-2] == 1:
            del ends[-2]  # a chunk of one column would compile another graph (dynamo specializes sizes of 1)
        for start, end in zip([0] + ends[:-1], ends):
            view, part = cache.first_columns(end), ids[:, start:end].contiguous()
            if rows > 1:  # dynamo specializes sizes of 1 (a mark on one would raise)
                for tensor in (part, view.pad, *view.k, *view.v):
                    torch._dynamo.mark_dynamic(tensor, 0)
            if end - start > 1:
                torch._dynamo.mark_dynamic(part, 1)
            logits = self._compiled_prefill_step(model, view, part)
        return cache, logits

    def _decode_static(self, model, mode, ids, pads, num_samples, states, limit, new_tokens, temperature, top_k, rng):
        """The fixed-shape loop: rows sit in slots of a StaticKVCache whose batch is a bucket (a power of
        two) and whose length is a multiple of CAPACITY_QUANTUM; each step is decode_step on every slot
        (eager, compiled or a CUDA graph replay). Finished rows stay in their slots until the live rows fit
        half the bucket, then the cache moves to the smaller bucket (SHRINK_MIN_STEPS says when it may: by
        default not under a CUDA graph). The random numbers are drawn on the host side of the step from
        the same generator, for the same rows, as the dynamic loop draws them."""
        device = ids.device
        num_prompts, longest = ids.shape
        num_rows = num_prompts * num_samples
        vocab_size = model.config.vocab_size
        dtype = self._cache_dtype(device)
        width = noise_width(vocab_size, temperature, top_k)
        capacity = min(self._quantized(limit), model.cos.size(0))
        with inference_context(device.type):
            # each prompt is processed once (as in the dynamic loop), then fanned out to its rows
            if mode in self.COMPILED_PREFILL_MODES:
                try:
                    prompt_cache, logits = self._compiled_prefill(model, ids, pads, dtype)
                    prompt_pad = prompt_cache.pad
                except Exception as e:  # not run on every GPU yet: a failed compile must not end a run
                    print(f"Engine: compiled prefill failed ({type(e).__name__}: {e}); prefilling eagerly from now on")
                    self.COMPILED_PREFILL_MODES = ()
            if mode not in self.COMPILED_PREFILL_MODES:
                prompt_cache = KVCache.for_model(model, num_prompts, longest, dtype=dtype, pad_lengths=pads)
                logits = self._prefill(model, ids, prompt_cache)
                prompt_pad = prompt_cache.pad_lengths
            source_rows = torch.arange(num_prompts, device=device).repeat_interleave(num_samples)
            logits = logits.index_select(0, source_rows)
            cache, step = self._static_cache(model, mode, bucket_size(num_rows), capacity, width, temperature, top_k,
                                             dtype, filled=longest + 1)
            cache.load(prompt_cache.k, prompt_cache.v, prompt_pad, longest, source_rows, range(num_rows))
            del prompt_cache
        try:
            ahead = mode in self.LOOKAHEAD_MODES and self.SHRINK_MIN_STEPS.get(mode) is None  # rows keep their slots
            if ahead and isinstance(step, GraphedStep):
                yield from self._lookahead_loop(model, cache, step, logits, states, num_rows, longest, limit,
                                                new_tokens, width, temperature, top_k, rng)
            else:
                yield from self._static_loop(model, mode, cache, step, logits, states, num_rows, longest, limit,
                                             new_tokens, width, capacity, temperature, top_k, rng, dtype)
        finally:
            # a captured graph pins its cache (at depth 20 and 256 rows, gigabytes) and its memory pool; RL
            # trains between rollouts, so give them back. Capturing again costs about three eager steps.
            if not self.keep_graphs:
                self._graphs.clear()

    def _static_loop(self, model, mode, cache, step, logits, states, num_rows, longest, limit, new_tokens, width, capacity,
                     temperature, top_k, rng, dtype):
        device = cache.pos.device
        sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
        active = list(range(num_rows))           # rows that draw random numbers (the dynamic loop's batch)
        slot_of = {row: row for row in active}   # rows being computed -> their slot in the cache
        # Until the loop first moves to a smaller bucket, row r sits in slot r (in_place): the feed is the column,
        # and while `active` is rows 0..n-1 (prefix) the sampled tokens are the first n outputs, not per-row
        # lookups. The host's time per column sits between two graph replays on a GPU (dev/bench_host_loop).
        in_place, prefix = True, True
        min_steps = self.SHRINK_MIN_STEPS.get(mode)
        pos, generated = longest, 0
        while True:
            column, mask = self._step_rows(states, active, sampled)
            yield column, mask
            generated += 1
            pos += 1
            alive = [row for row in active if not states[row].done]
            if not alive or generated >= new_tokens or pos > limit:
                return
            if len(alive) < len(active):
                active = self._keep_sampling(active, alive)
                prefix = active[-1] == len(active) - 1  # rows 0..len-1 (active is sorted)
            if min_steps is not None:
                live = [row for row in slot_of if not states[row].done]
                if (bucket_size(len(live)) < cache.batch_size
                        and min(new_tokens - generated, limit - pos + 1) >= min_steps):
                    with inference_context(device.type):  # a graph captured here must run under the loop's autocast
                        smaller, step = self._static_cache(model, mode, bucket_size(len(live)), capacity, width,
                                                           temperature, top_k, dtype, filled=pos)
                    smaller.load(cache.k, cache.v, cache.pad, pos - 1, [slot_of[row] for row in live], range(len(live)))
                    cache, slot_of, in_place = smaller, {row: j for j, row in enumerate(live)}, False
            if in_place:  # slots past the rows are idle: fed 0
                feed = column + [0] * (cache.batch_size - num_rows)
            else:
                feed = [0] * cache.batch_size
                for row, slot in slot_of.items():
                    feed[slot] = column[row]
            feed = torch.tensor(feed, dtype=torch.long, device=device)
            if in_place:
                noise = self._slot_noise(active, cache.batch_size, width, rng, device)
            elif width:
                # exactly the draws sample_next_token would make for the rows in `active`, in that order
                drawn = torch.empty(len(active), width, device=device).exponential_(1, generator=rng)
                pairs = [(j, slot_of[row]) for j, row in enumerate(active) if row in slot_of]
                if len(pairs) == cache.batch_size and all(j == slot for j, slot in pairs):
                    # finished rows still in `active` (they leave it in eighths) sit after the cached ones
                    noise = drawn[:cache.batch_size]
                else:
                    noise = torch.ones(cache.batch_size, width, device=device)
                    if pairs:
                        src, dst = zip(*pairs)
                        noise[list(dst)] = drawn[list(src)]
            else:
                noise = None
            if mode == "static":
                cache.window = pos  # columns 0..pos-1 are filled once this step writes column pos - 1
            if isinstance(step, GraphedStep):  # a replay runs no Python ops: no autocast or kernel choice to set
                out = step(cache, feed, noise, filled=pos).tolist()
            else:
                with inference_context(device.type):
                    out = step(cache, feed, noise, filled=pos).tolist()
            if in_place:
                sampled = out[:len(active)] if prefix else [out[row] for row in active]
            else:
                sampled = [out[slot_of[row]] if row in slot_of else 0 for row in active]

    def _lookahead_loop(self, model, cache, step, logits, states, num_rows, longest, limit, new_tokens, width,
                        temperature, top_k, rng):
        """_static_loop for a captured step whose rows keep their slots, one replay ahead of the host: step k+1's
        input is made on the device from step k's sampled tokens, so the GPU computes it while the host copies
        step k's tokens back, updates the rows and yields the column (the host's share of a step: 7-15 % at
        batch 256 on an H200, dev/gpu_results.md). What the host would change in that input it knows before it
        reads the tokens: finished rows repeat their last token, forced tokens replace the sample, and a row
        under line headers that samples a stop gets a newline instead (_step_rows' rules, mirrored in
        _device_column; the host applies them again to the same tokens, so the yielded column is the input).

        Step k+1's noise is drawn for the rows that drew at step k; if reading step k's tokens makes rows leave
        the drawing set (_keep_sampling), the generator is put back and step k+1's logits are sampled again with
        the draws the other loops make, so a seed gives the same samples. A step is launched ahead only when the
        column budget allows it; at most one (when the last rows finish) is computed and not read."""
        device, batch = cache.pos.device, cache.batch_size
        cuda = device.type == "cuda"
        header_newline, stops = None, None  # what _device_column needs for rows under line headers, if any
        if any(state.line_headers for state in states):
            header_newline, stops = self._newline_ids()[0], torch.tensor(sorted(self.stop_tokens), device=device)
        returned = torch.empty(batch, dtype=torch.long, pin_memory=cuda)  # the in-flight step's tokens, on the host
        sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
        active = list(range(num_rows))
        pos, generated = longest, 0
        uploaded = {}  # _device_column's host lists and their device copies
        try:
            while True:
                column, mask = self._step_rows(states, active, sampled)
                yield column, mask
                generated += 1
                pos += 1
                alive = [row for row in active if not states[row].done]
                if not alive or generated >= new_tokens or pos > limit:
                    return
                if generated == 1:  # the first step's input comes from the host
                    active = self._keep_sampling(active, alive)
                    step(cache, upload(column + [0] * (batch - num_rows), device),
                         self._slot_noise(active, batch, width, rng, device), filled=pos)
                else:
                    keep = self._keep_sampling(active, alive)
                    if keep != active and width:  # the step in flight drew for `active`: draw for `keep` instead
                        rng.set_state(drawn_from)
                        with inference_context(device.type):
                            noise = self._slot_noise(keep, batch, width, rng, device)
                            step.out.copy_(sample_from_raw_logits(step.logits, noise, temperature, top_k,
                                                                  model.config.softcap))
                    active = keep
                returned.copy_(step.out, non_blocking=True)
                ready = torch.cuda.Event() if cuda else None
                if cuda:
                    ready.record()
                if generated + 1 < new_tokens and pos + 1 <= limit:  # the next column may be computed: launch it
                    feed, uploaded = self._device_column(states, num_rows, batch, header_newline, stops, step.out,
                                                         uploaded)
                    drawn_from = rng.get_state() if width else None
                    step(cache, feed, self._slot_noise(active, batch, width, rng, device), filled=pos + 1)
                if cuda:
                    ready.synchronize()
                out = returned.tolist()
                sampled = out[:len(active)] if active[-1] == len(active) - 1 else [out[row] for row in active]
        finally:
            if cuda:  # nothing may still run on the cache and graph the caller is about to give back
                torch.cuda.current_stream().synchronize()

    def _device_column(self, states, num_rows, batch, header_newline, stops, sampled, uploaded):
        """The next step's input, made on the device from `sampled` (the tokens of the step in flight) and what the
        host knows before reading them. Returns (input, uploaded): `uploaded` maps the host lists of overrides and
        of rows under line headers to their device copies, so a list that did not change is not uploaded again
        (pass the last call's; {} at first)."""
        override, headers = [-1] * batch, []
        for row in range(num_rows):
            state = states[row]
            if state.done:
                override[row] = state.last_token
            elif state.forced:
                override[row] = state.forced[0]
            elif state.line_headers:
                headers.append(row)
        override[num_rows:] = [0] * (batch - num_rows)  # idle slots
        on_device = {}
        for name, values in (("override", override), ("headers", headers)):
            last = uploaded.get(name)
            on_device[name] = last if last is not None and last[0] == values else (values, upload(values, sampled.device))
        override = on_device["override"][1]
        feed = torch.where(override >= 0, override, sampled)
        if headers:  # a verifier may not stop before its last forced header: the stop becomes a newline
            rows = on_device["headers"][1]
            feed[rows] = torch.where(torch.isin(feed[rows], stops), header_newline, feed[rows])
        return feed, on_device

    @staticmethod
    def _slot_noise(active, batch, width, rng, device):
        """Noise for a step whose row r sits in slot r (both loops, until _static_loop moves to a smaller bucket):
        the draws sample_next_token makes for the rows in `active`, in order, each in its row's slot; ones
        elsewhere (those samples are not read). None when greedy."""
        if not width:
            return None
        drawn = torch.empty(len(active), width, device=device).exponential_(1, generator=rng)
        if len(active) == batch:
            return drawn
        noise = torch.ones(batch, width, device=device)
        if active[-1] == len(active) - 1:
            noise[:len(active)] = drawn
        else:
            noise[upload(active, device)] = drawn
        return noise

    def _quantized(self, columns):
        """A static cache's length for `columns` columns: the next multiple of CAPACITY_QUANTUM."""
        return -(-columns // self.CAPACITY_QUANTUM) * self.CAPACITY_QUANTUM

    def _static_cache(self, model, mode, batch, capacity, width, temperature, top_k, dtype, filled=None):
        """(StaticKVCache, step function (cache, tokens, noise, filled=) -> next tokens) for one decode shape.
        filled: the columns filled once the first step has written (a windowed graph captures that step's window
        first; None: the widest). The step's `filled` does the same for each step; eager steps ignore it."""
        if mode in self.GRAPH_MODES:
            windows = self._windows(capacity) if mode in self.WINDOW_MODES else None
            key = (mode, batch, capacity, width, temperature, top_k, dtype, windows)
            if key not in self._graphs or not self._graphs[key].reads_from(model):
                self._graphs.clear()  # one captured shape at a time: each holds a whole cache in device memory
                cache = self._new_static_cache(model, mode, batch, capacity, dtype, spare_columns=int(bool(windows)))
                fn = self._compiled() if mode == "compiled_graph" else decode_step
                if mode in self.CUDNN_GRAPH_MODES:  # the step picks its kernels itself (decode_step: compile traces it)
                    fn = functools.partial(fn, attention=self.GRAPH_SDPA_BACKENDS)
                try:
                    self._graphs[key] = GraphedStep(fn, model, cache, width, temperature, top_k, windows, filled,
                                                    clock=self.time_spent, compiled=mode == "compiled_graph")
                except Exception as e:  # not verified on every GPU/driver: a failed capture must not end a run
                    if self.decode != "auto":
                        raise
                    print(f"Engine: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly from now on")
                    self.decode = "static"
                    return self._static_cache(model, "static", batch, capacity, width, temperature, top_k, dtype)
            graphed = self._graphs[key]
            return graphed.cache, graphed
        cache = self._new_static_cache(model, mode, batch, capacity, dtype)
        fn = self._compiled() if mode == "compile" else decode_step
        if width == 0:
            dummy = torch.ones(batch, 1, device=cache.pos.device)
            return cache, lambda c, tokens, noise, filled=None: fn(model, c, tokens, dummy, temperature, top_k)
        return cache, lambda c, tokens, noise, filled=None: fn(model, c, tokens, noise, temperature, top_k)

    def _windows(self, capacity):
        """A windowed graph's windows for a cache of `capacity` columns: every WINDOW_QUANTUM columns, then the
        whole cache."""
        return tuple(range(self.WINDOW_QUANTUM, capacity, self.WINDOW_QUANTUM)) + (capacity,)

    def _new_static_cache(self, model, mode, batch, capacity, dtype, spare_columns=0):
        cache = StaticKVCache.for_model(model, batch, capacity, dtype=dtype, spare_columns=spare_columns)
        if mode in ("compile", "compiled_graph") and self.DYNAMIC_LENGTH:
            cache.mark_length_dynamic()
        return cache

    def _compiled(self):
        if self._compiled_step is None:
            self._compiled_step = torch.compile(decode_step, dynamic=False, fullgraph=True, mode=self.COMPILE_MODE)
        return self._compiled_step

    # ---- public API

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None,
                 line_headers=None):
        """Stream num_samples continuations of one prompt: yields (token_column, mask_column), one entry
        per sample, until every sample has emitted <|assistant_end|> or <|bos|> or max_tokens columns
        were produced (None: up to the model's sequence_len). A finished sample's later entries repeat
        its stop token with mask 0. Deterministic for a given seed. line_headers: as in generate_prompts."""
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 <= top_p <= 1):
            raise ValueError(f"top_p must be a number in [0, 1] or None, got {top_p!r}")
        yield from self._stream([tokens], num_samples, max_tokens, temperature, top_k, seed, top_p,
                                None if line_headers is None else [line_headers])

    def _collect(self, stream, num_rows):
        """Per-row completions and masks from a stream, each cut at (and without) its stop token."""
        # the columns are kept as they come and cut per row at the end (a transpose and a slice in C), so the
        # per-column work is one pass over the open rows (dev/bench_host_loop)
        columns, mask_columns, stop_tokens = [], [], self.stop_tokens
        open_rows, end = list(range(num_rows)), [None] * num_rows  # end[row]: the column of its stop token
        for column, mask in stream:
            columns.append(column)
            mask_columns.append(mask)
            finished = [row for row in open_rows if column[row] in stop_tokens]
            if finished:
                for row in finished:
                    end[row] = len(columns) - 1
                open_rows = [row for row in open_rows if end[row] is None]
                if not open_rows:
                    break
        if not columns:
            return [[] for _ in range(num_rows)], [[] for _ in range(num_rows)]
        tokens, masks = list(zip(*columns)), list(zip(*mask_columns))
        return ([list(tokens[row][:end[row]]) for row in range(num_rows)],
                [list(masks[row][:end[row]]) for row in range(num_rows)])

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(results, masks): num_samples full sequences (prompt + completion, stop tokens left out) and
        their masks (0 over the prompt and forced tool output, 1 over sampled tokens)."""
        completions, masks = self._collect(self.generate(tokens, num_samples, **kwargs), num_samples)
        results = [list(tokens) + c for c in completions]
        full_masks = [[0] * len(tokens) + m for m in masks]
        return results, full_masks

    def generate_prompts(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                         line_headers=None):
        """Sample num_samples completions for each of several prompts (of any lengths) in one batch (in chunks
        of whole prompts where it would exceed max_rows, see __init__). Returns a list of (completion_tokens,
        completion_mask), prompt-major: prompt 0's samples first. Completions exclude the prompt and the stop
        token.

        line_headers[i] (optional): token lists forced, in order, at the start of the completion and after
        each newline the model writes, for prompt i's samples; they have mask 0. While headers remain, a sampled
        stop token is replaced by a newline (mask 0), so a verifier given ["Step 1:", ..., "Step K:",
        "Overall:"] writes exactly one line per step and then its verdict (unless it runs out of tokens)."""
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        self._check_line_headers(prompts, line_headers)
        per_pass = len(prompts) if self.max_rows is None else max(1, self.max_rows // max(num_samples, 1))
        return self._generate_in_passes(prompts, per_pass, num_samples, max_tokens, temperature, top_k, seed, line_headers)

    def _generate_in_passes(self, prompts, per_pass, num_samples, max_tokens, temperature, top_k, seed, line_headers):
        results = []
        for c, start in enumerate(range(0, len(prompts), per_pass)):
            chunk = prompts[start:start + per_pass]
            headers = None if line_headers is None else line_headers[start:start + per_pass]
            stream = self._stream(chunk, num_samples, max_tokens, temperature, top_k, seed + c, line_headers=headers)
            completions, masks = self._collect(stream, len(chunk) * num_samples)
            results.extend(zip(completions, masks))
        return results

    @torch.inference_mode()
    def generate_queue(self, prompts, rows, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                       line_headers=None):
        """generate_prompts for more prompts than one batch holds: `rows` rows decode together and a waiting
        prompt starts as soon as num_samples of them are free, where passes of whole prompts would each wait
        for their longest row (continuous batching). Returns what generate_prompts returns. Greedy completions
        are generate_prompts' (except near the rotary table's end, where each row here has its own budget, not
        its pass's); sampled ones are as random but not the same draws. Fixed-shape loops only: with
        decode="dynamic" it is generate_prompts in passes of `rows` rows.

        All rows write the same cache column each step, so a joining prompt is prefilled on its own and placed
        to end at that column (StaticKVCache.place); when too few columns remain for a new row's budget, the
        cache's columns move left past the oldest live row's first one (StaticKVCache.shift_left)."""
        check_sampling_args(max_tokens, temperature, top_k, num_samples)
        if not isinstance(rows, numbers.Integral) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        self._check_line_headers(prompts, line_headers)
        prompts = self._checked_prompts(prompts)
        model = self.model
        device = model.get_device()
        mode = self._decode_mode(device)
        if mode == "dynamic":
            return self._generate_in_passes(prompts, max(1, rows // num_samples), num_samples, max_tokens, temperature,
                                            top_k, seed, line_headers)
        num_rows = len(prompts) * num_samples
        new_tokens = model.config.sequence_len if max_tokens is None else max_tokens
        if new_tokens == 0:
            return [([], []) for _ in range(num_rows)]
        # a row's budget of columns: new_tokens, fewer where its positions would run off the rotary table
        budget = [min(new_tokens, model.cos.size(0) - len(prompts[row // num_samples]) + 1) for row in range(num_rows)]
        most = max(budget)
        batch = bucket_size(min(max(rows, num_samples), num_rows))  # a prompt's samples join together
        # the longest prompt and two budgets: once the write column nears the end, the oldest live row started at
        # least a budget ago, so moving the columns left past it frees a whole budget for the rows that join
        capacity = self._quantized(max(len(p) for p in prompts) + 2 * most)
        min_shift = max(1, int(self.QUEUE_MIN_SHIFT * most))
        sampler = self._sampling_model(model)
        dtype = self._cache_dtype(device)
        width = noise_width(model.config.vocab_size, temperature, top_k)
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        states = self._row_states(num_rows, num_samples, line_headers)
        completions, masks = [[] for _ in range(num_rows)], [[] for _ in range(num_rows)]
        taken = [0] * num_rows         # columns each row has taken, its stop token included
        slot_row = [None] * batch      # the row each slot computes; None: free
        waiting = deque(range(len(prompts)))
        write = None                   # the column the next step writes; None while no row is live
        with inference_context(device.type):
            cache, step = self._static_cache(sampler, mode, batch, capacity, width, temperature, top_k, dtype)
            cache.pad.zero_()  # a kept graph's cache: as a new one (its columns are written before they are read)
            cache.pos.zero_()

        def take(pairs):
            """Rows take their next tokens ((slot, sampled token) pairs); finished rows free their slots."""
            if not pairs:
                return
            row_ids = [slot_row[slot] for slot, _ in pairs]
            column, mask = self._step_rows([states[r] for r in row_ids], range(len(pairs)), [t for _, t in pairs])
            freed = []
            for i, ((slot, _), r) in enumerate(zip(pairs, row_ids)):
                taken[r] += 1
                if column[i] not in self.stop_tokens:
                    completions[r].append(column[i])
                    masks[r].append(mask[i])
                if states[r].done or taken[r] >= budget[r]:
                    states[r].done = True
                    slot_row[slot] = None
                    freed.append(slot)
            if freed and write is not None:  # a free slot keeps computing: keep its rotary positions small
                cache.pad[torch.tensor(freed, device=device)] = write

        def compact(live):
            """Move the columns left past the oldest live row's first one (not so far that the next waiting
            prompt would no longer fit left of the write column), if that frees at least min_shift columns:
            shifting a few every step would copy the whole cache every step."""
            nonlocal write
            shift = int(cache.pad[torch.tensor(live, device=device)].min())
            if waiting:
                shift = min(shift, write - len(prompts[waiting[0]]))
            if shift >= min_shift:
                cache.shift_left(shift, write)
                write -= shift

        def join():
            """Start waiting prompts in free slots; the (slot, first token) pairs of their rows."""
            nonlocal write
            free = [slot for slot in range(batch) if slot_row[slot] is None]
            if not waiting or len(free) < num_samples:
                return []
            live = [slot for slot in range(batch) if slot_row[slot] is not None]
            if not live:
                write = None
            elif write + most > capacity:
                compact(live)
                if write + most > capacity:
                    return []  # no room for a whole budget yet: wait for the oldest rows to finish
            group = []
            while waiting and len(free) >= (len(group) + 1) * num_samples:
                if write is not None and len(prompts[waiting[0]]) > write:
                    break  # it would start left of column 0: wait for the write column to move on
                group.append(waiting.popleft())
            if not group:
                return []
            ids, pads = left_padded([prompts[p] for p in group], device)
            longest = ids.size(1)
            source = [i for i in range(len(group)) for _ in range(num_samples)]
            slots = free[:len(source)]
            with inference_context(device.type):
                prompt_cache = KVCache.for_model(sampler, len(group), longest, dtype=dtype, pad_lengths=pads)
                logits = self._prefill(sampler, ids, prompt_cache)
                if write is None:  # no row is live: start over at column `longest`, every slot's padding reset
                    write = longest
                    cache.pos.fill_(longest)
                    cache.pad.zero_()  # an idle slot's mask must keep a column: a row masked out entirely gives NaNs
                cache.place(prompt_cache.k, prompt_cache.v, prompt_cache.pad_lengths, longest, source, slots, write)
            first = sample_next_token(logits.index_select(0, torch.tensor(source, device=device)), rng, temperature,
                                      top_k).tolist()
            for slot, i, j in zip(slots, source, itertools.cycle(range(num_samples))):
                slot_row[slot] = group[i] * num_samples + j
            return list(zip(slots, first))

        try:
            pending, next_compaction = [], 0
            while True:
                take(pending)
                joined = join()
                while joined:
                    take(joined)
                    joined = join()
                live = [slot for slot in range(batch) if slot_row[slot] is not None]
                if not live:
                    break  # nothing waits either: join() places a prompt whenever no row is live
                if write >= next_compaction:  # the eager step attends to columns 0..write: keep them few
                    compact(live)
                    next_compaction = write + min_shift
                feed = torch.tensor([states[slot_row[slot]].last_token if slot_row[slot] is not None else 0
                                     for slot in range(batch)], dtype=torch.long, device=device)
                noise = torch.empty(batch, width, device=device).exponential_(1, generator=rng) if width else None
                if mode == "static":
                    cache.window = write + 1
                with inference_context(device.type):
                    out = step(cache, feed, noise, filled=write + 1).tolist()
                write += 1
                pending = [(slot, out[slot]) for slot in live]
        finally:
            if not self.keep_graphs:
                self._graphs.clear()  # as in _decode_static: a captured graph pins its cache and memory pool
        return list(zip(completions, masks))


# -----------------------------------------------------------------------------
# Helpers for chat front ends (CLI, web)

def fit_to_context(tokens, max_len, turn_start_token):
    """Shorten a chat to at most max_len tokens, keeping tokens[0] (the <|bos|>) and dropping whole
    turns (each starting with turn_start_token) from the front; if the newest turn alone is too long,
    only its last tokens are kept. Returns (tokens, number of tokens dropped)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if len(tokens) <= max_len:
        return list(tokens), 0
    head, body = tokens[:1], tokens[1:]
    budget = max_len - 1
    for start, token in enumerate(body):
        if token == turn_start_token and len(body) - start <= budget:
            return head + body[start:], start
    return head + body[-budget:], len(body) - budget


class TextStream:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    A byte-level BPE token can end in the middle of a multi-byte character; decoding it alone gives U+FFFD.
    So the ids not yet handed out are decoded together and held back while their text ends in U+FFFD: the
    next token usually completes the character. Once a piece ends on a whole character, the bytes so far end
    on a character boundary, so only the pending ids are kept (linear time over a reply)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token):
        """Add a token; return the new text that is safe to show now (maybe '')."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        """The rest of the text, even if it ends in a broken character (the stream is over)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def add_decode_flag(parser):
    """--decode, for the scripts that sample (chat_rl, chat_cotrain, chat_eval, chat_web): which decoding loop
    their Engines use (Engine.__init__ describes each)."""
    parser.add_argument("--decode", default="auto", choices=Engine.DECODE_MODES,
                        help="decoding loop: auto (the CUDA graph on CUDA, the fixed-shape step on CPU), dynamic (the "
                             "growing-batch loop), static, compile, graph, compiled_graph (CUDA only: the fastest step, "
                             "after ~25-45 s of compilation per batch bucket, and a compiled prefill; "
                             "dev/gpu_results.md); all "
                             "sample the same tokens, but for an evaluation's sampled answers (Engine.generate_queue: "
                             "the fixed-shape loops queue the problems, dynamic runs passes)")


def add_keep_graphs_flag(parser):
    """--keep_graphs, for the RL scripts (chat_rl, chat_cotrain): whether their Engines keep a captured graph and
    its cache from one rollout to the next (Engine's keep_graphs; chat_web and chat_cli always do)."""
    parser.add_argument("--keep_graphs", action="store_true",
                        help="graph modes: keep each Engine's captured CUDA graphs and their cache between rollouts, so "
                             "a rollout of the same shape skips the capture (and windows are captured once), at the "
                             "price of the cache's memory during training (a d20 generator's batch-256 cache of 320 "
                             "columns is 8.4 GB in bf16). Off: given back after every rollout, captured again")


def check_decode(decode, device_type):
    """A clear error, before any model is loaded, for a --decode that cannot run on this device."""
    if decode in Engine.GRAPH_MODES and device_type != "cuda":
        raise UserInputError(f"--decode {decode} captures CUDA graphs and needs a CUDA device; this run is on "
                             f"{device_type}: use auto, static, compile or dynamic")
