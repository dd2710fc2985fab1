"""
The GPT: a small, modern decoder-only transformer in the nanochat style.

- token embedding (untied from the LM head), normalised right away
- rotary position embeddings, QK-norm, grouped-query attention (n_kv_head <= n_head)
- parameter-free RMSNorm everywhere, ReLU^2 MLP, no biases
- zero-initialised output projections, so every block starts as the identity
- logits soft-capped with tanh, cross-entropy with ignore index -1

One dial, `config_from_depth(depth)`, derives width and heads, so a run is described by its depth.
The KV caches used for inference live in nanochat/engine.py and nanochat/decode_static.py; the model only
asks them to store keys and values, and for the per-row positions and masks that left-padded batches need.
A cache marked `static` (the fixed-shape decode step) supplies positions and mask itself, as device tensors.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    softcap: float = 15.0
    rope_base: float = 10000.0


def config_from_depth(depth, vocab_size=32768, sequence_len=2048, aspect_ratio=64, head_dim=128, kv_ratio=1):
    """The depth dial: width = depth * aspect_ratio, rounded up to a whole number of heads.
    kv_ratio > 1 turns on grouped-query attention with n_head // kv_ratio key/value heads."""
    assert depth >= 1 and head_dim >= 8 and head_dim % 2 == 0, f"bad depth/head_dim: {depth}, {head_dim}"
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = max(1, n_head // kv_ratio)
    while n_head % n_kv_head:  # GQA needs query heads to split evenly over key/value heads
        n_kv_head -= 1
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate pairs (first half, second half) of the head dimension by the position's angle.
    x: (B, H, T, D); cos/sin: (B or 1, 1, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


# -----------------------------------------------------------------------------
# Attention kernels: FlashAttention when it is installed and the call fits it, SDPA otherwise.

try:  # FA3 (Hopper) ships as flash_attn_interface, FA2 (Ampere+) as flash_attn
    from flash_attn_interface import flash_attn_func as _flash_attn_func
except ImportError:
    try:
        from flash_attn import flash_attn_func as _flash_attn_func
    except ImportError:
        _flash_attn_func = None
USE_FLASH_ATTENTION = _flash_attn_func is not None


def attention(q, k, v, mask=None, causal=True):
    """q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D). mask: bool (B, 1, Tq, Tk), True = may attend."""
    gqa = q.size(1) != k.size(1)
    if (USE_FLASH_ATTENTION and mask is None and causal and q.is_cuda
            and q.dtype in (torch.bfloat16, torch.float16) and q.size(2) == k.size(2)):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        out = out[0] if isinstance(out, tuple) else out  # FA3 also returns the softmax LSE
        return out.transpose(1, 2)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    # is_causal aligns to the top-left, so it is only right when queries and keys coincide
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.size(2) == k.size(2), enable_gqa=gqa)


# -----------------------------------------------------------------------------
# The model

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def project(self, x):
        """The query, key and value projections of x (B, T, C), each (B, T, heads * head_dim)."""
        return self.c_q(x), self.c_k(x), self.c_v(x)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded without a temperature
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attention(q, k, v, mask=mask, causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.attn(norm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 10x the training context so inference can run past it
        head_dim = config.n_embd // config.n_head
        cos, sin = self._rotary_tables(10 * config.sequence_len, head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.grad_checkpointing = False  # recompute each block in backward to save activation memory

    @staticmethod
    def _rotary_tables(max_len, head_dim, base, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self):
        n_embd = self.config.n_embd
        bound = math.sqrt(3.0 / n_embd)  # uniform with std 1/sqrt(fan_in)
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # start near uniform predictions: loss ~ ln(vocab)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.cos.size(0), n_embd // self.config.n_head, self.config.rope_base, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    # ---- accounting

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def estimate_flops(self):
        """FLOPs per token of one training step (forward + backward): 6 per matmul weight (the
        embedding is a lookup, not a matmul) plus the attention score/value products."""
        c = self.config
        matmul_params = self.num_params(exclude_embedding=True)
        attention = 12 * c.n_layer * c.n_embd * c.sequence_len
        return 6 * matmul_params + attention

    # ---- optimisation

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95)):
        """Matrices of the blocks go to Muon, the embedding and LM head to AdamW. AdamW rates are tuned
        at width 768 and scaled by 1/sqrt(width/768) (the muP-style rule nanochat uses)."""
        from nanochat.optim import MuonAdamW
        scale = (self.config.n_embd / 768) ** -0.5
        matrices = [p for p in self.transformer.h.parameters()]
        groups = [
            dict(kind="adamw", params=[self.lm_head.weight], lr=unembedding_lr * scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=[self.transformer.wte.weight], lr=embedding_lr * scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="muon", params=matrices, lr=matrix_lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=weight_decay),
        ]
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no optimizer"
        optimizer = MuonAdamW(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    # ---- forward

    def _positions_and_mask(self, B, T, kv_cache, device):
        """Rotary positions (B or 1, T) and the attention mask for this call. Without a cache this is the
        plain causal case (mask None). With a cache, rows may be left-padded: a row's real tokens start
        at cache column pad[b], so its positions are shifted by pad[b] and it never attends to padding."""
        if kv_cache is None:
            return torch.arange(T, device=device).unsqueeze(0), None
        start = kv_cache.get_pos()
        cols = torch.arange(start, start + T, device=device)  # cache columns of the new tokens
        pad = kv_cache.pad_lengths
        if pad is None:
            positions = cols.unsqueeze(0)
            if start == 0:
                return positions, None  # a fresh prefill is plain causal attention
            if T == 1:
                return positions, None  # a single query may see every cached key
            keys = torch.arange(start + T, device=device)
            return positions, (keys[None, :] <= cols[:, None]).view(1, 1, T, start + T)
        positions = (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
        keys = torch.arange(start + T, device=device)
        causal = keys[None, :] <= cols[:, None]                                   # (T, Tk)
        real = keys[None, :] >= pad[:, None]                                      # (B, Tk)
        mask = causal[None] & real[:, None, :]
        mask = mask | (keys[None, None, :] == cols[None, :, None])  # padding queries see themselves: no empty rows
        return positions, mask.unsqueeze(1)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """Logits (B, T, vocab) — or only the last position's (B, 1, vocab) with last_only, which saves
        the LM head's cost when prefilling a prompt — or, with targets, the cross-entropy loss."""
        B, T = idx.shape
        device = idx.device
        # checked on Python ints: a .item() here would sync the device and break torch.compile's graph
        if getattr(kv_cache, "static", False):
            # fixed-shape decode (nanochat/decode_static.py StaticKVCache): positions and mask come from device
            # tensors, so no Python int changes from step to step and the step compiles to one graph
            positions, mask = kv_cache.positions_and_mask(T)
        else:
            last = T if kv_cache is None else kv_cache.get_pos() + T
            assert last <= self.cos.size(0), f"position {last} is past the rotary table ({self.cos.size(0)})"
            positions, mask = self._positions_and_mask(B, T, kv_cache, device)
        cos = self.cos[positions].unsqueeze(1)  # (B or 1, 1, T, D/2)
        sin = self.sin[positions].unsqueeze(1)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if last_only and targets is None:
            x = x[:, -1:, :]

        softcap = self.config.softcap
        logits = self.project_to_vocab(x).float()
        if targets is not None or not getattr(kv_cache, "uncapped_logits", False):
            logits = softcap * torch.tanh(logits / softcap)  # bounded logits keep early training stable
        # else: the decode step asked for raw logits; the cap is monotonic, so it caps only the top-k it keeps
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    def project_to_vocab(self, x):
        """The LM head. On a CPU with few rows (decoding), weight @ x^T runs 1.3-2.4x faster than the
        x @ weight^T that nn.Linear computes at a 32K vocabulary (the BLAS picks a slow kernel for a wide,
        short output; measured in dev/bench_engine.md), and gives the same numbers up to rounding."""
        rows = x.numel() // x.size(-1)
        if x.device.type == "cpu" and rows <= 256 and self.lm_head.weight.size(0) >= 8192:
            flat = x.reshape(rows, x.size(-1))
            return (self.lm_head.weight @ flat.T).T.reshape(*x.shape[:-1], -1)
        return self.lm_head(x)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive reference sampler: recomputes the whole sequence for every new token (no cache).
        The Engine must match it token for token at temperature 0."""
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
