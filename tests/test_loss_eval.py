"""
Tests for nanochat/loss_eval.py: bits per byte on batches whose answer is computed by hand, the
exclusion of special tokens and ignored targets, early exhaustion, and the sum across 2 ranks.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.loss_eval import evaluate_bpb

# ids 0 and 7 are special tokens (0 bytes); the others spell 1, 2 or 3 bytes
TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 1, 1, 2, 0], dtype=torch.int32)


class UniformModel(torch.nn.Module):
    """Predicts every one of V tokens with probability 1/V: each counted target costs ln V nats."""

    def __init__(self, vocab_size=8):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, self.vocab_size), targets.reshape(-1),
                                                 ignore_index=-1, reduction=loss_reduction)
        return loss.view(idx.shape) if loss_reduction == "none" else loss


class TableModel(UniformModel):
    """Loss at a position = the target id in nats (0 where the target is ignored), to make the
    weighting visible: wrong weighting gives a different number."""

    def forward(self, idx, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(targets >= 0, targets.float(), torch.zeros_like(targets, dtype=torch.float32))


def batch(targets):
    targets = torch.tensor(targets)
    return torch.zeros_like(targets), targets


def test_uniform_model_by_hand():
    batches = [batch([[1, 2, 3, 4], [5, 6, 1, 2]])]
    # 8 counted targets, bytes 1+2+3+1 + 1+2+1+2 = 13; each costs ln 8 = 3 ln 2 nats -> 3*8/13 bits per byte
    assert evaluate_bpb(UniformModel(), batches, steps=1, token_bytes=TOKEN_BYTES) == pytest.approx(24 / 13)


def test_specials_and_ignored_targets_are_left_out():
    batches = [batch([[1, 0, -1, 3], [7, 2, -1, -1]]), batch([[6, 6, 0, 7], [4, -1, 5, 1]])]
    # counted: 1 (1B, 1 nat), 3 (3B, 3), 2 (2B, 2), 6 (2B, 6), 6 (2B, 6), 4 (1B, 4), 5 (1B, 5), 1 (1B, 1)
    nats, nbytes = 1 + 3 + 2 + 6 + 6 + 4 + 5 + 1, 1 + 3 + 2 + 2 + 2 + 1 + 1 + 1
    got = evaluate_bpb(TableModel(), batches, steps=2, token_bytes=TOKEN_BYTES)
    assert got == pytest.approx(nats / (math.log(2) * nbytes))
    # steps limits the batches used; (inputs, targets, state) triples are accepted too
    first = evaluate_bpb(TableModel(), [(*b, {"s": i}) for i, b in enumerate(batches)], steps=1, token_bytes=TOKEN_BYTES)
    assert first == pytest.approx((1 + 3 + 2) / (math.log(2) * (1 + 3 + 2)))


def test_runs_out_early_and_zero_bytes_is_inf():
    batches = iter([batch([[1, 2]])])
    assert evaluate_bpb(TableModel(), batches, steps=10, token_bytes=TOKEN_BYTES) == pytest.approx(3 / (math.log(2) * 3))
    assert evaluate_bpb(TableModel(), [batch([[0, 7, -1]])], steps=1, token_bytes=TOKEN_BYTES) == float("inf")
    assert evaluate_bpb(TableModel(), [], steps=3, token_bytes=TOKEN_BYTES) == float("inf")


def _two_rank_worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = [batch([[1, 2, 3]])] if rank == 0 else [batch([[6, 0, 4]]), batch([[5, 5, -1]])]
        results[rank] = evaluate_bpb(TableModel(), mine, steps=5, token_bytes=TOKEN_BYTES)
    finally:
        dist.destroy_process_group()


def test_sums_over_ranks(tmp_path):
    results = mp.Manager().dict()
    # fork: the children need no fresh interpreter (spawn would re-import torch and pytest in each)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True, start_method="fork")
    nats, nbytes = 1 + 2 + 3 + 6 + 4 + 5 + 5, 1 + 2 + 3 + 2 + 1 + 1 + 1
    expected = nats / (math.log(2) * nbytes)
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)
