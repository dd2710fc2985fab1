"""
Conversations -> training batches for the chat stages (mid-training and SFT), and the pieces of the
training step they share.

Two ways to batch, both rank-strided under torchrun (rank r takes conversations r, r+W, r+2W, ...
of the task, wrapping around into the next epoch):

  packed_batches   mid-training. Rendered conversations are concatenated into one token stream and
                   cut into (B, T) rows, like pretraining, so no compute is spent on padding.
                   loss_on="all" trains on every token (the choice nanochat made for mid-training:
                   the model must learn the whole format, user turns and special tokens included);
                   loss_on="assistant" applies the render mask as SFT does.
  sft_batches      SFT. One conversation per row, padded to the longest row of the batch; targets
                   are -1 wherever the render mask is 0 (prompt, tool output) and on padding, so the
                   loss is on the assistant's tokens only.

Both yield (inputs, targets, state); `state` is a small JSON-able dict that, passed back as
resume_state, continues exactly after that batch.

The step itself (accumulate_gradients) normalises the summed token losses by the number of target
tokens in the whole step, over all micro-batches and ranks, so every trained token weighs the same.
A micro-batch without any target token (all masked) is skipped, and counted so the scripts can warn,
instead of producing the NaN that a mean over zero tokens would.

Task names on the command line are resolved to Task objects by tasks/by_name.py.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import autocast_context, get_logger, is_distributed

logger = get_logger(__name__)

# -----------------------------------------------------------------------------
# Rank-strided conversation streams

def _conversation_stream(task, tokenizer, rank, world_size, start, single_pass, max_tokens):
    """Yield (position, ids, mask) for this rank's conversations, position = how many of this rank's
    conversations came before (across epochs): global index rank + position * world_size."""
    n = len(task)
    if n == 0:
        raise ValueError("cannot batch an empty task")
    position = start
    while True:
        g = rank + position * world_size
        if single_pass and g >= n:
            return
        conversation = task[g % n]
        try:
            ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_tokens)
        except ValueError as e:  # one malformed row in a large data set should not end a run
            logger.warning(f"skipping conversation {g % n}: {e}")
            ids, mask = [], []
        yield position, ids, mask
        position += 1


def epoch_of(position, rank, world_size, num_examples):
    """How many full passes over the task came before this rank's position-th conversation."""
    return (rank + position * world_size) // num_examples


def packed_batches(task, tokenizer, B, T, rank=0, world_size=1, loss_on="all", resume_state=None,
                   single_pass=False, device="cpu"):
    """(inputs, targets, state) of shape (B, T) cut from this rank's conversations laid end to end.
    Each batch takes B*T + 1 stream tokens; the last one is the first of the next batch (it is an input
    there and was only a target here). state = {"position", "skip", "epoch"}: resume at conversation
    `position` of this rank with its first `skip` tokens already used. single_pass ends after the last
    full batch of one pass over the task (for validation)."""
    if loss_on not in ("all", "assistant"):
        raise ValueError(f"loss_on must be 'all' or 'assistant', got {loss_on!r}")
    if B < 1 or T < 1:
        raise ValueError(f"need B >= 1 and T >= 1, got {B}, {T}")
    state = resume_state or {"position": 0, "skip": 0}
    start, skip = int(state["position"]), int(state["skip"])
    needed = B * T + 1
    n = len(task)
    ids_buf, mask_buf = [], []
    # [position, rendered length, tokens of it still in the buffer] for each conversation in the buffer
    segments = []
    for position, ids, mask in _conversation_stream(task, tokenizer, rank, world_size, start, single_pass, None):
        full_length = len(ids)
        if skip:
            ids, mask, skip = ids[skip:], mask[skip:], 0
        ids_buf.extend(ids)
        mask_buf.extend(mask)
        segments.append([position, full_length, len(ids)])
        while len(ids_buf) >= needed:
            chunk = torch.tensor(ids_buf[:needed], dtype=torch.long)
            inputs, targets = chunk[:-1].view(B, T), chunk[1:].clone().view(B, T)
            if loss_on == "assistant":
                chunk_mask = torch.tensor(mask_buf[1:needed], dtype=torch.bool).view(B, T)
                targets[~chunk_mask] = -1
            del ids_buf[:B * T], mask_buf[:B * T]
            used = B * T
            while used >= segments[0][2]:  # the buffer keeps >= 1 token, so a segment always remains
                used -= segments.pop(0)[2]
            segments[0][2] -= used
            first_position, length, remaining = segments[0]
            state = {"position": first_position, "skip": length - remaining,
                     "epoch": epoch_of(first_position, rank, world_size, n)}
            yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), state


def sft_collate(rows, pad_id, device="cpu"):
    """rows: [(ids, mask)] of rendered conversations -> (inputs, targets) of shape (B, L-1), L the
    longest row. Targets are -1 where the mask of the target token is 0 and on padding."""
    if not rows:
        raise ValueError("sft_collate needs at least one row")
    length = max(len(ids) for ids, _ in rows) - 1
    if length < 1:
        raise ValueError("every conversation in the batch is shorter than 2 tokens")
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(mask)} mask entries")
        n = len(ids) - 1
        if n < 1:
            continue
        row_ids = torch.tensor(ids, dtype=torch.long)
        row_mask = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[i, :n] = row_ids[:-1]
        targets[i, :n] = torch.where(row_mask, row_ids[1:], torch.full_like(row_ids[1:], -1))
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def sft_batches(task, tokenizer, B, max_seq_len, rank=0, world_size=1, resume_state=None, single_pass=False,
                device="cpu"):
    """(inputs, targets, state): B conversations of this rank per batch, each cut to max_seq_len + 1
    tokens (so inputs are at most max_seq_len long), padded with BOS. state = {"position", "epoch"}
    resumes after the batch. single_pass yields a last, shorter batch rather than dropping it."""
    if B < 1:
        raise ValueError(f"need B >= 1, got {B}")
    pad_id = tokenizer.get_bos_token_id()
    start = int((resume_state or {}).get("position", 0))
    n = len(task)
    rows = []
    for position, ids, mask in _conversation_stream(task, tokenizer, rank, world_size, start, single_pass, max_seq_len + 1):
        if len(ids) < 2:
            continue  # skipped (malformed) or nothing to predict
        rows.append((ids, mask))
        if len(rows) == B:
            inputs, targets = sft_collate(rows, pad_id, device)
            rows = []
            yield inputs, targets, {"position": position + 1, "epoch": epoch_of(position + 1, rank, world_size, n)}
    if rows:
        inputs, targets = sft_collate(rows, pad_id, device)
        yield inputs, targets, {"position": None, "epoch": 1}


# -----------------------------------------------------------------------------
# Schedules (pure functions of training progress in [0, 1], so a resumed run recomputes them exactly)

def lr_multiplier(progress, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup to 1 over the first warmup_ratio of training, constant, then linear warmdown to
    final_lr_frac over the last warmdown_ratio."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    if warmdown_ratio > 0 and progress > 1.0 - warmdown_ratio:
        left = (1.0 - progress) / warmdown_ratio  # 1 at the start of the warmdown, 0 at the end
        return left + (1.0 - left) * final_lr_frac
    return 1.0


def muon_momentum(step, warmup_steps=300):
    """Muon momentum ramps 0.85 -> 0.95 over the first warmup_steps steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def set_learning_rates(optimizer, lrm, momentum=None):
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if momentum is not None and group.get("kind") == "muon":
            group["momentum"] = momentum


# -----------------------------------------------------------------------------
# The training step and the validation loss

def _world_size():
    return dist.get_world_size() if is_distributed() else 1


def accumulate_gradients(model, micro_batches):
    """Forward/backward over this rank's micro-batches [(inputs, targets), ...]; gradients end up as
    those of the mean loss per target token over all micro-batches of all ranks (the optimizer averages
    gradients over ranks, which the scaling below undoes into a global token mean).

    Returns (mean_loss, num_target_tokens, num_skipped), all global. mean_loss is None when the whole
    step had no target token; the caller must then skip the optimizer step (every rank sees the same
    count, so they all skip together)."""
    world_size = _world_size()
    device = micro_batches[0][0].device
    counts = [int((targets >= 0).sum()) for _, targets in micro_batches]
    skipped_local = sum(1 for c in counts if c == 0)
    totals = torch.tensor([sum(counts), skipped_local], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    total_tokens, skipped = int(totals[0].item()), int(totals[1].item())
    if total_tokens == 0:
        model.zero_grad(set_to_none=True)
        return None, 0, skipped
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    did_backward = False
    for (inputs, targets), count in zip(micro_batches, counts):
        if count == 0:
            continue
        with autocast_context(device.type):
            loss = model(inputs, targets, loss_reduction="sum")
        loss_sum += loss.detach().double()
        (loss * (world_size / total_tokens)).backward()
        did_backward = True
    if not did_backward:
        # this rank saw only masked rows but others did not: it still has to join the gradient
        # reduction, with zero gradients, so every rank steps the same parameters
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    if world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum.item() / total_tokens, total_tokens, skipped


@torch.no_grad()
def evaluate_loss(model, batches, steps):
    """Mean cross-entropy per target token (targets >= 0) over at most `steps` batches of
    (inputs, targets, ...), summed over ranks. nan when no target token was seen."""
    device = model.get_device()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            batch = next(batch_iter)
        except StopIteration:
            break
        inputs, targets = batch[0], batch[1]
        with autocast_context(device.type):
            loss = model(inputs, targets, loss_reduction="sum")
        totals[0] += loss.double()
        totals[1] += (targets >= 0).sum()
    if _world_size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals[0].item() / totals[1].item() if totals[1].item() > 0 else math.nan


# -----------------------------------------------------------------------------
# Checkpoints of the chat stages: weights, each rank's optimizer shard, each rank's data position

def save_training_checkpoint(checkpoint_dir, step, model, optimizer, meta, loader_state):
    """Call on every rank: rank 0 writes the weights and meta (with every rank's loader_state gathered
    into meta["dataloader_state"]), each rank its optimizer shard."""
    from nanochat.checkpoint_manager import save_checkpoint
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if _world_size() > 1 else (0, 1)
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, loader_state)
    else:
        states[0] = loader_state
    meta = dict(meta, world_size=world_size, dataloader_state=states)
    save_checkpoint(checkpoint_dir, step, model.state_dict() if rank == 0 else None, optimizer.state_dict(), meta, rank,
                    check_finite=True)


def load_training_checkpoint(checkpoint_dir, model, optimizer, device, step=None):
    """Restore the weights and this rank's optimizer shard from checkpoint_dir (default: its last step).
    The learning rates the flags set (initial_lr) are kept, not the checkpoint's. Returns (step, meta,
    this rank's loader state)."""
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if _world_size() > 1 else (0, 1)
    step = find_last_step(checkpoint_dir) if step is None else step
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    if meta.get("world_size", 1) != world_size:
        raise ValueError(f"{checkpoint_dir} step {step} was written by {meta.get('world_size')} ranks, this run has "
                         f"{world_size}: optimizer shards and data positions are per rank, so resume with the same world size")
    model.load_state_dict(model_data, strict=True)
    initial_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(optim_data)
    for group, lr in zip(optimizer.param_groups, initial_lrs):
        group["initial_lr"] = lr
    return step, meta, meta["dataloader_state"][rank]
