"""
Tests for nanochat/chat_data.py, conversations -> batches for the chat stages and the pieces of their
training step. Packed rows (mid-training) against a concatenation oracle, with exact resume, the
assistant-only loss and rank striding; padded rows (SFT): the collate and its loss mask (masked tokens
get no gradient), resume and rank striding; the step: the fully-masked guard and the token-mean
normalisation of gradient accumulation; the learning-rate and momentum schedules.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from nanochat.chat_data import (accumulate_gradients, lr_multiplier, muon_momentum, packed_batches, sft_batches,
                                sft_collate)
from tasks.by_name import make_mixture
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, tiny_gpt

IDENTITY = os.path.join(FIXTURE_DIR, "identity.jsonl")


# -----------------------------------------------------------------------------
# packed rows (mid-training)

def concatenated_stream(task, tokenizer, rank=0, world_size=1, count=None):
    """Oracle: this rank's conversations rendered and concatenated (ids, mask), over repeated epochs."""
    ids, mask = [], []
    position = 0
    while count is None or position < count:
        g = rank + position * world_size
        if count is None and g >= len(task):
            break
        i, m = tokenizer.render_conversation(task[g % len(task)], max_tokens=None)
        ids += i
        mask += m
        position += 1
    return ids, mask


def test_packed_rows_match_the_concatenated_stream(tiny_tokenizer):
    task, _ = make_mixture("identity|arithmetic:12", "train", identity_file=IDENTITY)
    B, T = 2, 16
    ids, mask = concatenated_stream(task, tiny_tokenizer, count=3 * len(task))
    batches = packed_batches(task, tiny_tokenizer, B, T)
    for k in range(12):  # more than one epoch of the 20 conversations
        x, y, state = next(batches)
        start = k * B * T
        assert x.flatten().tolist() == ids[start:start + B * T]
        assert y.flatten().tolist() == ids[start + 1:start + B * T + 1]
        assert set(state) == {"position", "skip", "epoch"}
    # loss on assistant tokens only: targets are -1 exactly where the target token's mask is 0
    masked = packed_batches(task, tiny_tokenizer, B, T, loss_on="assistant")
    ys = torch.cat([next(masked)[1].flatten() for _ in range(6)])
    expected = [t if m else -1 for t, m in zip(ids[1:6 * B * T + 1], mask[1:6 * B * T + 1])]
    assert ys.tolist() == expected
    assert (ys == -1).any() and (ys >= 0).any()
    with pytest.raises(ValueError):
        next(packed_batches(task, tiny_tokenizer, B, T, loss_on="user"))


def test_packed_resume_is_exact(tiny_tokenizer):
    task, _ = make_mixture("arithmetic:9", "train")
    B, T = 3, 11  # rows that cut conversations at odd places
    reference = list(zip(range(10), packed_batches(task, tiny_tokenizer, B, T)))
    for k in (0, 3, 6):
        state = reference[k][1][2]
        resumed = packed_batches(task, tiny_tokenizer, B, T, resume_state=state)
        for j in range(k + 1, 10):
            x, y, s = next(resumed)
            assert torch.equal(x, reference[j][1][0]) and torch.equal(y, reference[j][1][1]), (k, j)
            assert s == reference[j][1][2]


def test_packed_rank_striding_and_single_pass(tiny_tokenizer):
    task, _ = make_mixture("arithmetic:10", "train")
    B, T = 1, 8
    for rank in (0, 1):
        ids, _ = concatenated_stream(task, tiny_tokenizer, rank=rank, world_size=2, count=3)
        x, _, _ = next(packed_batches(task, tiny_tokenizer, B, T, rank=rank, world_size=2))
        assert x.flatten().tolist() == ids[:B * T]
    ids, _ = concatenated_stream(task, tiny_tokenizer)  # one pass
    n_batches = sum(1 for _ in packed_batches(task, tiny_tokenizer, 2, 8, single_pass=True))
    assert n_batches == (len(ids) - 1) // 16


# -----------------------------------------------------------------------------
# padded rows (SFT) and the training step

def _conversations():
    return [
        {"messages": [{"role": "user", "content": "What is 3 plus 4?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                        {"type": "python", "text": "3+4"},
                                                        {"type": "python_output", "text": "7"},
                                                        {"type": "text", "text": ". #### 7"}]}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]},
    ]


def test_collate_targets_follow_the_mask(tiny_tokenizer):
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    pad = tiny_tokenizer.get_bos_token_id()
    inputs, targets = sft_collate(rows, pad)
    width = max(len(ids) for ids, _ in rows) - 1
    assert inputs.shape == targets.shape == (2, width)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert inputs[b, :n].tolist() == ids[:-1]
        assert (inputs[b, n:] == pad).all()
        expected = [ids[t + 1] if mask[t + 1] else -1 for t in range(n)] + [-1] * (width - n)
        assert targets[b].tolist() == expected
    # the tool output and the prompt are never targets; the assistant text and <|assistant_end|> are
    trained = set(targets[targets >= 0].tolist())
    assert tiny_tokenizer.encode_special("<|assistant_end|>") in trained
    assert tiny_tokenizer.encode_special("<|python_start|>") in trained
    assert tiny_tokenizer.encode_special("<|output_start|>") not in trained
    assert tiny_tokenizer.encode_special("<|user_end|>") not in trained
    with pytest.raises(ValueError):
        sft_collate([([1, 2, 3], [0, 1])], pad)


def test_masked_positions_get_no_gradient(tiny_tokenizer):
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    inputs, targets = sft_collate(rows, tiny_tokenizer.get_bos_token_id())
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=1)
    with torch.no_grad():  # make the zero-initialised projections non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    logits = model(inputs).detach().requires_grad_(True)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction="sum")
    loss.backward()
    grad_norm_per_position = logits.grad.norm(dim=-1)
    masked = targets < 0
    assert masked.any() and (~masked).any()
    assert (grad_norm_per_position[masked] == 0).all()
    assert (grad_norm_per_position[~masked] > 0).all()
    # the model's own loss is the sum over trained positions only
    assert model(inputs, targets, loss_reduction="sum").item() == pytest.approx(loss.item(), rel=1e-5)
    # whatever sits in the padding cannot change the loss (causal attention, -1 targets)
    garbage = inputs.clone()
    garbage[masked & (inputs == tiny_tokenizer.get_bos_token_id())] = 7
    assert model(garbage, targets, loss_reduction="sum").item() == pytest.approx(loss.item(), rel=1e-5)


def test_fully_masked_micro_batches_are_skipped(tiny_tokenizer):
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=2)
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    inputs, targets = sft_collate(rows, tiny_tokenizer.get_bos_token_id())
    masked = torch.full_like(targets, -1)
    # a step with nothing to train: no loss, no gradient, no NaN
    loss, n, skipped = accumulate_gradients(model, [(inputs, masked), (inputs, masked)])
    assert (loss, n, skipped) == (None, 0, 2)
    assert all(p.grad is None for p in model.parameters())
    # a masked micro-batch next to a real one changes nothing
    loss_a, n_a, skipped_a = accumulate_gradients(model, [(inputs, targets), (inputs, masked)])
    grads_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_b, n_b, skipped_b = accumulate_gradients(model, [(inputs, targets)])
    grads_b = [p.grad.clone() for p in model.parameters()]
    assert (skipped_a, skipped_b) == (1, 0) and n_a == n_b == int((targets >= 0).sum())
    assert loss_a == pytest.approx(loss_b) and torch.isfinite(torch.tensor(loss_a))
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb)


def test_accumulation_is_a_token_mean(tiny_tokenizer):
    """Two micro-batches with different numbers of trained tokens give the gradient of the mean over all
    their tokens (not the mean of the two micro-batch means)."""
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    pad = tiny_tokenizer.get_bos_token_id()
    a, b = sft_collate(rows[:1], pad), sft_collate(rows[1:], pad)
    assert (a[1] >= 0).sum() != (b[1] >= 0).sum()
    loss, n, _ = accumulate_gradients(model, [a, b])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    both_in, both_t = sft_collate(rows, pad)
    oracle = model(both_in, both_t)  # mean over all trained tokens of one padded batch
    oracle.backward()
    assert loss == pytest.approx(oracle.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_sft_batches_rank_striding_and_resume(tiny_tokenizer):
    task, names = make_mixture("arithmetic:10", "train")
    assert names == ["arithmetic"] and len(task) == 10
    full = list(zip(range(4), sft_batches(task, tiny_tokenizer, 2, 64)))
    # resuming from the state of batch 1 gives batches 2 and 3 again
    resumed = sft_batches(task, tiny_tokenizer, 2, 64, resume_state=full[1][1][2])
    for k in (2, 3):
        x, y, _ = next(resumed)
        assert torch.equal(x, full[k][1][0]) and torch.equal(y, full[k][1][1])
    # two ranks see disjoint conversations: rank r's first row is conversation r
    for rank in (0, 1):
        x, _, _ = next(sft_batches(task, tiny_tokenizer, 1, 64, rank=rank, world_size=2))
        ids, _ = tiny_tokenizer.render_conversation(task[rank], max_tokens=65)
        assert x[0, :len(ids) - 1].tolist() == ids[:-1]
    # one validation pass over 10 conversations in batches of 4: 4 + 4 + 2
    sizes = [x.size(0) for x, _, _ in sft_batches(task, tiny_tokenizer, 4, 64, single_pass=True)]
    assert sizes == [4, 4, 2]
    # rows are cut to max_seq_len inputs
    x, _, _ = next(sft_batches(task, tiny_tokenizer, 2, 8))
    assert x.size(1) == 8


# -----------------------------------------------------------------------------
# schedules

def test_lr_multiplier():
    assert lr_multiplier(0.0, 0.0, 1.0, 0.0) == 1.0
    assert lr_multiplier(0.5, 0.0, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(1.0, 0.0, 1.0, 0.0) == 0.0
    assert lr_multiplier(0.05, 0.1, 0.2, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(0.5, 0.1, 0.2, 0.1) == 1.0
    assert lr_multiplier(0.9, 0.0, 0.2, 0.1) == pytest.approx(0.5 + 0.5 * 0.1)


def test_muon_momentum_schedule():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)
