"""
Bits per byte: a tokenizer-independent validation loss.

Mean cross-entropy per token depends on how many bytes a token covers, so two models with different
vocabularies cannot be compared by it. Dividing the summed loss (in nats) by ln(2) times the number
of bytes the targets spell out gives bits per byte, which can be compared across tokenizers.

Targets that spell no bytes are left out of both sums: special tokens (byte length 0 in token_bytes)
and ignored positions (target -1).

    bpb = evaluate_bpb(model, val_loader, steps=20, token_bytes=get_token_bytes(device))
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import is_distributed


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte of `model` over at most `steps` batches of `batches`.

    batches: an iterator of (inputs, targets) or (inputs, targets, state) with int64 (B, T) tensors;
    it may run out early (a single-pass validation loader), in which case the batches seen are used.
    token_bytes: int tensor (vocab_size,) of byte lengths per token id, 0 for special tokens.
    With torch.distributed initialised the sums are added over all ranks (every rank must call this).
    Returns a float, or inf when no target spelled any byte."""
    device = model.get_device()
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            batch = next(batch_iter)
        except StopIteration:
            break
        inputs, targets = batch[0], batch[1]
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)  # nats per position, 0 where target == -1
        targets = targets.reshape(-1)
        valid = targets >= 0
        # clamp so ignored (-1) targets can index the table; the `valid` mask zeroes them afterwards
        num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets))
        counted = num_bytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += num_bytes.sum().to(torch.int64)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
