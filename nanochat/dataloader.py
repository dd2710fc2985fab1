"""
The pretraining data loader: parquet shards -> tokenized documents -> packed (B, T) batches.

    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device=device)
    inputs, targets, state = next(loader)          # int64 (B, T) each; state is a small JSON-able dict
    ...
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device=device, resume_state=state)

Packing is BOS-aligned best-fit. Every document is tokenized with a leading BOS. Documents are taken
from the rank's stream in blocks of `buffer_docs`; each row of T+1 tokens is filled by repeatedly
placing the longest remaining document of the block that still fits, and when none fits the shortest
one is cropped to fill the row exactly (the cropped tail is dropped). So every row starts with BOS
at the start of a document, there is no padding, and only crops lose tokens. A block is used up
completely before the next one is read; the half-filled last row of a block is finished with
documents of the next block (that partial row is the "carry").

Exact resume: the state names the block the next row comes from (epoch, shard, row group and
document index of its first document), how many of that block's rows were already emitted, and the
carry the block started with (at most T tokens). Resuming re-reads and re-packs that one block and
skips the emitted rows, so a resumed loader yields exactly the batches an uninterrupted one would
have (batch size B may even change, T may not). The state is per rank: save every rank's state.

DDP: row groups are dealt to ranks round-robin (nanochat.dataset.rank_row_groups), so ranks read
disjoint documents that together cover the split. 'train' repeats forever (epochs count from 1 and
are recorded in the state); 'val' is a single pass by default and ends after its last full batch
(the leftover rows are dropped). Under DDP the ranks' val passes can differ by a batch or so: an
evaluation that all-reduces per step should take a fixed number of steps that every rank has.
"""

import bisect
import itertools

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import open_shard, rank_row_groups, read_row_group, split_files

STATE_VERSION = 1


def best_fit_pack(docs, row_len, carry=()):
    """Pack token lists into rows of exactly row_len tokens, starting from the partial row `carry`.

    Returns (full_rows, partial_row). Each step places the longest document that fits in the space
    left; if none fits, the shortest document is cropped to fill the row and its tail discarded. Ties
    go to the later document, so the result is a pure function of the inputs."""
    order = sorted(range(len(docs)), key=lambda i: (len(docs[i]), i))
    lengths = [len(docs[i]) for i in order]
    rows = []
    row = list(carry)
    assert len(row) < row_len, "carry must be a partial row"
    while order:
        space = row_len - len(row)
        j = bisect.bisect_right(lengths, space) - 1
        if j < 0:
            j = 0  # nothing fits: crop the shortest
        doc = docs[order.pop(j)]
        lengths.pop(j)
        row.extend(doc[:space])
        if len(row) == row_len:
            rows.append(row)
            row = []
    return rows, row


def _iter_documents(files, pairs, epoch, pair_idx, doc_idx, single_pass):
    """This rank's documents in order, forever (or one pass): yields ((epoch, pq_idx, rg_idx, doc_idx), text)
    starting at document doc_idx of the pair_idx-th row group of `pairs` in `epoch`. Empty texts are skipped."""
    open_idx, pf = None, None
    while True:
        yielded = False
        for k in range(pair_idx, len(pairs)):
            pq_idx, rg_idx = pairs[k]
            if pq_idx != open_idx:
                open_idx, pf = pq_idx, open_shard(files[pq_idx])
            texts = read_row_group(pf, rg_idx, files[pq_idx])
            for d in range(doc_idx, len(texts)):
                if texts[d]:
                    yielded = True
                    yield (epoch, pq_idx, rg_idx, d), texts[d]
            doc_idx = 0
        if single_pass or (not yielded and pair_idx == 0):  # a split of empty texts would spin forever
            return
        epoch, pair_idx = epoch + 1, 0


def _check_resume_state(state, expected, pairs):
    if not isinstance(state, dict):
        raise TypeError(f"resume_state must be the dict a loader yielded, got {type(state).__name__}")
    missing = [k for k in ("version", "epoch", "pq_idx", "rg_idx", "doc_idx", "rows_done", "carry", *expected) if k not in state]
    if missing:
        raise ValueError(f"resume_state lacks {missing}; was it produced by this loader?")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"resume_state version {state['version']} is not {STATE_VERSION}")
    for key, value in expected.items():
        if state[key] != value:
            raise ValueError(f"resume_state was saved with {key}={state[key]!r} but this loader has {key}={value!r}; "
                             f"an exact resume needs the same {key}")
    if (state["pq_idx"], state["rg_idx"]) not in pairs:
        raise ValueError(f"resume_state points at shard {state['pq_idx']} row group {state['rg_idx']}, which this rank "
                         f"does not read with the shards now on disk (did the data directory change?)")
    if state["epoch"] < 1 or state["doc_idx"] < 0 or state["rows_done"] < 0:
        raise ValueError(f"resume_state has a negative position: {state}")
    if len(state["carry"]) > expected["T"]:
        raise ValueError(f"resume_state carry has {len(state['carry'])} tokens, more than T={expected['T']}")


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", resume_state=None, data_dir=None,
                                       tokenizer_threads=4, buffer_docs=1000, single_pass=None):
    """Generator of (inputs, targets, state): int64 (B, T) tensors on `device` (targets are inputs shifted
    by one) and the exact resume state after this batch. See the module docstring for packing and state.

    tokenizer: needs get_bos_token_id(), get_vocab_size() and encode(list_of_texts, prepend=id, num_threads=n).
    single_pass: stop after one pass over the split (default: True for 'val', False for 'train')."""
    if B < 1 or T < 1:
        raise ValueError(f"B and T must be >= 1, got B={B} T={T}")
    if buffer_docs < 1:
        raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
    single_pass = (split == "val") if single_pass is None else single_pass
    _, rank, _, world_size = get_dist_info()
    files = split_files(split, data_dir)
    pairs = rank_row_groups(files, rank, world_size)
    if not pairs:
        raise ValueError(f"the {split} split has fewer row groups than the {world_size} ranks, so rank {rank} has no "
                         f"data; rebuild the shards with smaller row groups (dev/make_shards.py --row_group_size)")
    row_len = T + 1
    bos = tokenizer.get_bos_token_id()
    fixed = {"split": split, "T": T, "buffer_docs": buffer_docs, "rank": rank, "world_size": world_size,
             "vocab_size": tokenizer.get_vocab_size()}

    if resume_state is not None:
        _check_resume_state(resume_state, fixed, pairs)
        epoch, pq_idx, rg_idx = resume_state["epoch"], resume_state["pq_idx"], resume_state["rg_idx"]
        start = (epoch, pairs.index((pq_idx, rg_idx)), resume_state["doc_idx"])
        skip_rows, partial = resume_state["rows_done"], list(resume_state["carry"])
    else:
        start, skip_rows, partial = (1, 0, 0), 0, []
    documents = _iter_documents(files, pairs, *start, single_pass)

    device = torch.device(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        # Two pinned staging buffers: one can be filled while the other's async copy is still queued.
        # The event guards against overwriting a buffer before the GPU has read it.
        staging = [torch.empty((2, B, T), dtype=torch.long, pin_memory=True) for _ in range(2)]
        copied = [None, None]
        slot = 0

    block_start, block_carry, block_rows, next_row = None, [], [], 0
    batch, batches_out = [], 0
    while True:
        while next_row == len(block_rows):
            items = list(itertools.islice(documents, buffer_docs))
            if not items:
                if batches_out == 0 and resume_state is None:
                    raise ValueError(f"the {split} split holds less than one batch ({B} rows of {row_len} tokens) "
                                     f"for rank {rank} of {world_size}; use a smaller B or T or more data")
                return
            block_start, block_carry = items[0][0], partial
            tokens = tokenizer.encode([text for _, text in items], prepend=bos, num_threads=tokenizer_threads)
            block_rows, partial = best_fit_pack(tokens, row_len, block_carry)
            next_row = skip_rows
            if skip_rows > len(block_rows):
                raise ValueError(f"resume_state says {skip_rows} rows of this block were emitted but it packs into "
                                 f"{len(block_rows)}; the shards or tokenizer differ from the saved run")
            skip_rows = 0
        batch.append(block_rows[next_row])
        next_row += 1
        if len(batch) < B:
            continue

        rows = torch.tensor(batch, dtype=torch.long)
        batch = []
        if use_cuda:
            buf = staging[slot]
            if copied[slot] is not None:
                copied[slot].synchronize()
            buf[0].copy_(rows[:, :-1])
            buf[1].copy_(rows[:, 1:])
            on_device = torch.empty((2, B, T), dtype=torch.long, device=device)
            on_device.copy_(buf, non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(torch.cuda.current_stream(device))
            slot ^= 1
            inputs, targets = on_device[0], on_device[1]
        else:
            inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            if device.type != "cpu":
                inputs, targets = inputs.to(device), targets.to(device)
        epoch, pq_idx, rg_idx, doc_idx = block_start
        state = {"version": STATE_VERSION, **fixed, "epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx,
                 "doc_idx": doc_idx, "rows_done": next_row, "carry": list(block_carry)}
        batches_out += 1
        yield inputs, targets, state
