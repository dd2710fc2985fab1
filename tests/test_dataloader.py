"""Tests for nanochat/dataloader.py: packing against a simple reference implementation, exact resume
(also across shard and epoch boundaries), DDP disjointness (in-process and under torchrun) and the real
tokenizer. dev/make_corpus.py has its own, test_make_corpus.py."""

import itertools
import json
import os
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanochat.dataloader import best_fit_pack, tokenizing_distributed_data_loader
from nanochat.dataset import parquets_iter_batched, shard_filename
from dev import make_shards
from multirank import run_torchrun

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class IdTokenizer:
    """Stand-in tokenizer with the three methods the loader uses. A document "17:40" encodes to
    [ID0 + 17] followed by 40 filler tokens, so any piece of a packed row names its document."""
    BOS, ID0 = 256, 1000

    def get_bos_token_id(self):
        return self.BOS

    def get_vocab_size(self):
        return 100_000

    def encode(self, texts, prepend=None, num_threads=4):
        out = []
        for text in texts:
            doc_id, length = map(int, text.split(":"))
            ids = [self.ID0 + doc_id] + [(doc_id * 31 + k) % 250 for k in range(length)]
            out.append(([prepend] if prepend is not None else []) + ids)
        return out


TOK = IdTokenizer()


def make_id_shards(directory, shard_sizes, row_group_size, seed=0, max_len=60):
    """Shards of id documents with random lengths (some longer than a row); returns the doc texts per shard."""
    rng = random.Random(seed)
    shards, next_id = [], 0
    for n in shard_sizes:
        docs = [f"{next_id + i}:{rng.randint(0, max_len)}" for i in range(n)]
        next_id += n
        make_shards.write_shard(docs, os.path.join(directory, shard_filename(len(shards))), row_group_size)
        shards.append(docs)
    return shards


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("id_shards")
    shards = make_id_shards(str(directory), [40, 37, 44, 30], row_group_size=6)
    return str(directory), shards


# ------------------------------------------------------------------------------ reference implementation

def reference_pack(docs, row_len, carry):
    """Best-fit packing written the slow, obvious way: scan for the longest document that fits (latest on
    ties), otherwise crop the shortest (earliest on ties)."""
    remaining, rows, row = list(docs), [], list(carry)
    while remaining:
        space = row_len - len(row)
        fitting = [(len(d), i) for i, d in enumerate(remaining) if len(d) <= space]
        j = max(fitting)[1] if fitting else min((len(d), i) for i, d in enumerate(remaining))[1]
        row += remaining.pop(j)[:space]
        if len(row) == row_len:
            rows.append(row)
            row = []
    return rows, row


def reference_batches(data_dir, split, B, T, buffer_docs, rank=0, world=1, epochs=1):
    """What the loader should yield: this rank's documents (via the dataset layer), in blocks of
    buffer_docs, packed with reference_pack, grouped B rows at a time."""
    def docs():
        for _ in range(epochs):
            for batch in parquets_iter_batched(split, rank, world, data_dir):
                yield from (d for d in batch if d)
    rows, carry, stream = [], [], docs()
    while True:
        block = list(itertools.islice(stream, buffer_docs))
        if not block:
            break
        new_rows, carry = reference_pack(TOK.encode(block, prepend=TOK.BOS), T + 1, carry)
        rows += new_rows
    return [rows[i:i + B] for i in range(0, len(rows) - B + 1, B)]


def full_rows(inputs, targets):
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def pieces(row):
    """Split a row at BOS tokens into document pieces."""
    starts = [i for i, t in enumerate(row) if t == TOK.BOS] + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def document_ids(rows):
    return [p[1] - TOK.ID0 for row in rows for p in pieces(row) if len(p) > 1]


def check_rows_are_documents(rows, split_docs):
    """Every row starts with BOS and is made of whole documents, except that the last piece may be a
    document's beginning (a crop)."""
    by_id = {int(d.split(":")[0]): TOK.encode([d], prepend=TOK.BOS)[0] for d in split_docs}
    for row in rows:
        assert row[0] == TOK.BOS
        parts = pieces(row)
        for k, part in enumerate(parts):
            if len(part) == 1:
                continue
            full = by_id[part[1] - TOK.ID0]
            assert part == full[:len(part)]
            if k < len(parts) - 1:
                assert part == full, "only the last piece of a row may be cropped"


# ------------------------------------------------------------------------------ packing

@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=30), row_len=st.integers(2, 33), carry_len=st.integers(0, 32))
def test_best_fit_matches_reference(lengths, row_len, carry_len):
    docs = [[-1] + [i] * (n - 1) for i, n in enumerate(lengths)]
    carry = [-2] * min(carry_len, row_len - 1)
    rows, partial = best_fit_pack(docs, row_len, carry)
    assert (rows, partial) == reference_pack(docs, row_len, carry)
    assert all(len(r) == row_len for r in rows) and len(partial) < row_len
    flat = [t for r in rows for t in r] + partial
    assert flat[:len(carry)] == carry
    # every document is placed exactly once, as a prefix
    assert flat.count(-1) == len(docs)
    assert sum(min(len(d), row_len) for d in docs) >= len(flat) - len(carry)


def test_loader_matches_reference_and_rows_are_documents(id_data):
    data_dir, shards = id_data
    B, T, buffer_docs = 4, 31, 8
    train_docs = [d for s in shards[:-1] for d in s]
    got = []
    for inputs, targets, state in tokenizing_distributed_data_loader(TOK, B, T, "train", data_dir=data_dir,
                                                                     buffer_docs=buffer_docs, single_pass=True):
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        got.append(full_rows(inputs, targets))
    assert got == reference_batches(data_dir, "train", B, T, buffer_docs)
    rows = [r for batch in got for r in batch]
    check_rows_are_documents(rows, train_docs)
    ids = document_ids(rows)
    assert len(ids) == len(set(ids))  # one pass: no document twice
    assert len(set(ids)) > 0.8 * len(train_docs)


def test_val_is_a_single_pass_over_the_last_shard(id_data):
    data_dir, shards = id_data
    batches = [full_rows(x, y) for x, y, _ in tokenizing_distributed_data_loader(TOK, 2, 15, "val", data_dir=data_dir, buffer_docs=6)]
    assert batches == reference_batches(data_dir, "val", 2, 15, 6)
    ids = set(document_ids([r for b in batches for r in b]))
    assert ids and ids <= {int(d.split(":")[0]) for d in shards[-1]}


def test_too_little_data_is_a_clear_error(id_data):
    data_dir, _ = id_data
    with pytest.raises(ValueError, match="less than one batch"):
        next(tokenizing_distributed_data_loader(TOK, 64, 255, "val", data_dir=data_dir))
    with pytest.raises(ValueError):
        next(tokenizing_distributed_data_loader(TOK, 0, 16, "train", data_dir=data_dir))


def test_empty_documents_end_instead_of_spinning(tmp_path):
    for i in range(2):
        make_shards.write_shard(["", ""], str(tmp_path / shard_filename(i)), row_group_size=1)
    with pytest.raises(ValueError, match="less than one batch"):
        next(tokenizing_distributed_data_loader(TOK, 1, 8, "train", data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------ resume

def test_resume_is_exact_across_shard_and_epoch_boundaries(id_data):
    data_dir, _ = id_data
    B, T, buffer_docs, horizon, ahead = 4, 31, 8, 110, 6
    kwargs = dict(data_dir=data_dir, buffer_docs=buffer_docs)
    loader = tokenizing_distributed_data_loader(TOK, B, T, "train", **kwargs)
    run = [(full_rows(x, y), s) for x, y, s in itertools.islice(loader, horizon + ahead)]
    states = [s for _, s in run]
    assert states[-1]["epoch"] >= 3, "the run should span several epochs"
    shard_changes = [k for k in range(1, horizon) if states[k]["pq_idx"] != states[k - 1]["pq_idx"]]
    epoch_changes = [k for k in range(1, horizon) if states[k]["epoch"] != states[k - 1]["epoch"]]
    assert len(epoch_changes) >= 2 and len(shard_changes) >= 5
    # the uninterrupted run is the reference: the same rows, epoch after epoch
    assert [b for b, _ in run] == reference_batches(data_dir, "train", B, T, buffer_docs, epochs=states[-1]["epoch"] + 1)[:horizon + ahead]
    checkpoints = sorted(set(shard_changes + epoch_changes + [1, 2, 17, 50]))
    for k in checkpoints:
        state = json.loads(json.dumps(states[k - 1]))  # as a checkpoint would store it
        resumed = tokenizing_distributed_data_loader(TOK, B, T, "train", resume_state=state, **kwargs)
        again = [(full_rows(x, y), s) for x, y, s in itertools.islice(resumed, ahead)]
        assert again == run[k:k + ahead], f"resume after batch {k} diverged"
    assert len(json.dumps(states[-1])) < 100 + 8 * T  # small: the carry is at most T tokens


def test_resume_with_a_different_batch_size_continues_the_row_stream(id_data):
    data_dir, _ = id_data
    first = tokenizing_distributed_data_loader(TOK, 4, 31, "train", data_dir=data_dir, buffer_docs=8)
    rows = [r for x, y, _ in itertools.islice(first, 20) for r in full_rows(x, y)]
    loader = tokenizing_distributed_data_loader(TOK, 4, 31, "train", data_dir=data_dir, buffer_docs=8)
    for _ in range(5):
        _, _, state = next(loader)
    resumed = tokenizing_distributed_data_loader(TOK, 3, 31, "train", data_dir=data_dir, buffer_docs=8, resume_state=state)
    more = [r for x, y, _ in itertools.islice(resumed, 10) for r in full_rows(x, y)]
    assert more == rows[20:50]


def test_bad_resume_states_are_refused(id_data):
    data_dir, _ = id_data
    _, _, state = next(tokenizing_distributed_data_loader(TOK, 4, 31, "train", data_dir=data_dir, buffer_docs=8))

    def resume(s, T=31, buffer_docs=8):
        return next(tokenizing_distributed_data_loader(TOK, 4, T, "train", data_dir=data_dir, buffer_docs=buffer_docs, resume_state=s))

    with pytest.raises(ValueError, match="T=31"):
        resume(state, T=15)
    with pytest.raises(ValueError, match="buffer_docs"):
        resume(state, buffer_docs=9)
    with pytest.raises(ValueError, match="world_size"):
        resume({**state, "world_size": 2})
    with pytest.raises(ValueError, match="lacks"):
        resume({"epoch": 1})
    with pytest.raises(TypeError):
        resume("epoch 1")
    with pytest.raises(ValueError, match="row group"):
        resume({**state, "rg_idx": 999})
    with pytest.raises(ValueError, match="split"):
        next(tokenizing_distributed_data_loader(TOK, 4, 31, "val", data_dir=data_dir, buffer_docs=8, resume_state=state))


# ------------------------------------------------------------------------------ DDP

def test_ranks_in_process_read_disjoint_documents(id_data, monkeypatch):
    data_dir, shards = id_data
    train_ids = {int(d.split(":")[0]) for s in shards[:-1] for d in s}
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = [full_rows(x, y) for x, y, _ in tokenizing_distributed_data_loader(
            TOK, 2, 15, "train", data_dir=data_dir, buffer_docs=5, single_pass=True)]
        assert batches == reference_batches(data_dir, "train", 2, 15, 5, rank=rank, world=2)
        per_rank.append(set(document_ids([r for b in batches for r in b])))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] <= train_ids


def test_two_ranks_under_torchrun(id_data, tmp_path):
    data_dir, shards = id_data
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    proc = run_torchrun([os.path.join(REPO_ROOT, "tests", "dist_dataloader_worker.py"), data_dir, str(out)], nproc=2,
                        log_dir=tmp_path / "torchrun", env=env, cwd=REPO_ROOT, timeout=180)
    assert proc.returncode == 0, proc.report()
    result = json.loads(out.read_text())
    assert [r["rank"] for r in result] == [0, 1] and all(r["world_size"] == 2 for r in result)
    # the reading layer: disjoint row groups that together are the whole split
    read = [r["read_docs"] for r in result]
    all_train = [d for s in shards[:-1] for d in s]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == sorted(all_train)
    # the loader: each rank yields exactly its reference batches, and no document on both ranks
    for r in result:
        assert r["batches"] == reference_batches(data_dir, "train", 2, 15, 5, rank=r["rank"], world=2)
    ids = [set(document_ids([row for b in r["batches"] for row in b])) for r in result]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


# ------------------------------------------------------------------------------ real tokenizer, devices, corpus

def test_real_tokenizer(tiny_tokenizer, tiny_corpus, tmp_path):
    docs = [f"{i}. {text}" for i, text in enumerate(tiny_corpus)]
    make_shards.write_shards(docs, str(tmp_path), docs_per_shard=12, row_group_size=4, val_docs=6, log=lambda *a: None)
    bos = tiny_tokenizer.get_bos_token_id()
    encoded = [tiny_tokenizer.encode(d, prepend=bos) for d in docs]
    loader = tokenizing_distributed_data_loader(tiny_tokenizer, 4, 64, "train", data_dir=str(tmp_path), buffer_docs=10)
    for inputs, targets, _ in itertools.islice(loader, 15):
        for row in full_rows(inputs, targets):
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for a, b in zip(starts, starts[1:]):
                assert any(doc[:b - a] == row[a:b] for doc in encoded)
    assert tiny_tokenizer.decode(row[1:]).strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(id_data):
    data_dir, _ = id_data
    cpu = tokenizing_distributed_data_loader(TOK, 4, 31, "train", data_dir=data_dir, buffer_docs=8)
    gpu = tokenizing_distributed_data_loader(TOK, 4, 31, "train", device="cuda", data_dir=data_dir, buffer_docs=8)
    kept = [(x, y) for (x, y, _), _ in zip(gpu, range(12))]  # held across steps: must not be overwritten
    for (x, y), (cx, cy, _) in zip(kept, itertools.islice(cpu, 12)):
        assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)

