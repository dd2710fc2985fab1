"""
Back-of-the-envelope GPU memory for a GPT being trained or sampled, so that a co-training run
(two models on one device) can be sized before it starts, and checked against what CUDA reports.

Estimates per model, in bytes:
- parameters: fp32 master weights (4 B each)
- gradients: fp32 (4 B each), only for the model being trained
- optimizer: AdamW keeps two moments for the embedding and head, Muon one momentum buffer per matrix;
  the distributed optimizer shards both over ranks
- KV cache for sampling: 2 (k, v) x layers x rows x positions x kv heads x head dim x dtype bytes
- activations saved for backward: per token per layer roughly 34*d bytes-equivalents plus the
  attention-score term 5*heads*T (Korthikanti et al. 2022, "Reducing activation recomputation"),
  times dtype bytes / 2; with activation checkpointing only each block's input (d values) is kept,
  plus one block's full activations during its recomputation. The logits (rows x T x vocab, fp32,
  twice for softmax + grad) often dominate at small depth and are added separately.
"""

import torch

from nanochat.common import print0


def estimate_memory(config, train=False, rows=1, seq_len=None, kv_rows=0, kv_len=0, world_size=1,
                    grad_checkpointing=False, act_bytes=2, kv_bytes=2):
    T = seq_len or config.sequence_len
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    head_dim = d // config.n_head
    embed = V * d
    matrices = L * (d * d * 2 + 2 * d * config.n_kv_head * head_dim + 8 * d * d)
    n_params = 2 * embed + matrices
    out = {"params": 4 * n_params}
    if train:
        out["grads"] = 4 * n_params
        out["optimizer"] = 4 * (2 * 2 * embed + matrices) // world_size
        per_layer = (34 * d + 5 * config.n_head * T) * act_bytes / 2 * rows * T
        if grad_checkpointing:
            out["activations"] = int(L * d * act_bytes * rows * T + per_layer)
        else:
            out["activations"] = int(L * per_layer)
        out["logits"] = int(2 * 4 * rows * T * V)
    if kv_rows and kv_len:
        out["kv_cache"] = 2 * L * kv_rows * kv_len * config.n_kv_head * head_dim * kv_bytes
    out["total"] = sum(out.values())
    return out


def format_memory(name, estimate):
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    parts = " | ".join(f"{k} {gib(v).strip()}" for k, v in estimate.items())
    return f"{name:>22s}: {parts}"


def cuda_memory_report(device):
    """What CUDA itself says (peak allocated and reserved since the last reset), or None off-GPU."""
    if device.type != "cuda":
        return None
    return {"peak_allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}


def print_role_estimates(roles, train_rows, seq_len, world_size=1, grad_checkpointing=False):
    """Training and sampling estimates of each model, printed on rank 0. roles: {name: (model or None,
    rows of KV cache while it samples)}."""
    for name, (model, kv_rows) in roles.items():
        if model is not None:
            print0(format_memory(f"{name} (training)", estimate_memory(model.config, train=True, rows=train_rows, seq_len=seq_len,
                                                                       world_size=world_size, grad_checkpointing=grad_checkpointing)))
            print0(format_memory(f"{name} (sampling)", estimate_memory(model.config, train=False, kv_rows=kv_rows, kv_len=seq_len)))
