"""
Inference: a preallocated KV cache and (below it, added by the Engine work) batched sampling with
tool use. RL, co-training, evaluation and the web server all generate through this file.
"""

import torch


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
