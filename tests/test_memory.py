"""
Tests for nanochat/memory.py: estimate_memory against numbers worked out by hand for a tiny config, its
parameter, gradient and optimizer terms against a real GPT and MuonAdamW after one step, and the
formatting of format_memory.
"""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import cuda_memory_report, estimate_memory, format_memory

# d=8, 2 layers, vocab 16, 2 query heads of dim 4 sharing 1 key/value head, context 4
TINY = GPTConfig(sequence_len=4, vocab_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=8)

# by hand, for TINY:
#   embedding and head: 2 x 16 x 8 = 256 parameters
#   per layer: q and out projections 2 x 8 x 8 = 128, k and v 2 x 8 x (1 head x 4) = 64, MLP 8 x 8 x 8 = 512 -> 704
#   parameters: 256 + 2 x 704 = 1664 -> 6656 bytes in fp32, and as many for the gradients
#   optimizer: AdamW's two moments of the 256 embedding/head values + Muon's one buffer of the 1408 matrix values,
#              4 x (2 x 256 + 1408) = 7680 bytes, sharded over 2 ranks: 3840 per rank
#   activations per layer, rows 3 x T 4 = 12 tokens: (34 x 8 + 5 x 2 heads x 4) x 12 x (2 bytes / 2) = 3744
#              -> 7488 for 2 layers; with checkpointing 2 layers x 8 x 2 bytes x 12 + one layer 3744 = 4128
#   logits: 2 x 4 bytes x 12 tokens x 16 = 1536
#   KV cache, 5 rows x 7 positions: 2 (k, v) x 2 layers x 5 x 7 x 1 head x 4 x 2 bytes = 1120


def test_estimate_matches_a_hand_computation():
    est = estimate_memory(TINY, train=True, rows=3, kv_rows=5, kv_len=7, world_size=2)
    assert est == {"params": 6656, "grads": 6656, "optimizer": 3840, "activations": 7488, "logits": 1536,
                   "kv_cache": 1120, "total": 6656 + 6656 + 3840 + 7488 + 1536 + 1120}
    checkpointed = estimate_memory(TINY, train=True, rows=3, world_size=2, grad_checkpointing=True)
    assert checkpointed["activations"] == 4128 and "kv_cache" not in checkpointed
    # sampling only: weights and the cache, nothing for training
    assert estimate_memory(TINY, kv_rows=5, kv_len=7) == {"params": 6656, "kv_cache": 1120, "total": 7776}
    assert estimate_memory(TINY) == {"params": 6656, "total": 6656}
    # seq_len overrides the config's context: the attention-score term grows with T
    longer = estimate_memory(TINY, train=True, rows=3, seq_len=8, world_size=2)
    assert longer["activations"] == 2 * (34 * 8 + 5 * 2 * 8) * 3 * 8 and longer["logits"] == 2 * 4 * 3 * 8 * 16


def test_weights_gradients_and_optimizer_match_a_real_model():
    torch.manual_seed(0)
    model = GPT(TINY)
    model.init_weights()
    optimizer = model.setup_optimizers()
    x = torch.randint(0, TINY.vocab_size, (3, TINY.sequence_len))
    model(x, x).backward()
    optimizer.step()
    est = estimate_memory(TINY, train=True, rows=3)
    assert est["params"] == 4 * sum(p.numel() for p in model.parameters())
    assert est["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                      if torch.is_tensor(v) and v.dim() > 0)  # not the scalar step counters
    assert est["optimizer"] == state_bytes


def test_format_memory_and_cuda_report():
    line = format_memory("generator", {"params": 2 ** 30, "kv_cache": 2 ** 29, "total": 3 * 2 ** 29})
    assert line == f"{'generator':>22s}: params 1.00 GiB | kv_cache 0.50 GiB | total 1.50 GiB"
    assert cuda_memory_report(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_report_has_peak_and_reserved():
    device = torch.device("cuda")
    torch.ones(1024, device=device)
    report = cuda_memory_report(device)
    assert set(report) == {"peak_allocated", "reserved"} and report["peak_allocated"] > 0
