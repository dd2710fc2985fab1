"""Tests for dev/make_shards.py (text, markdown and JSONL files -> parquet shards): a round trip through
nanochat.dataset, shard sizes by documents or characters, determinism, and bad input."""

import json
import os

import pyarrow.parquet as pq
import pytest

from dev import make_shards
from nanochat.dataset import list_parquet_files, parquets_iter_batched


def no_leftovers(directory):
    """No temporary files left behind by an interrupted or finished write."""
    return not [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_make_shards_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (src / "sub" / "b.md").write_text("ünïcode paragraph ✓\n\n\n", encoding="utf-8")
    records = [{"body": f"json document {i}", "id": i} for i in range(40)] + [{"body": "   "}]
    (src / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    (src / "ignored.csv").write_text("x,y")
    out = tmp_path / "out"
    rc = make_shards.main([str(src), "--out_dir", str(out), "--field", "body", "--txt_doc", "paragraph",
                           "--docs_per_shard", "10", "--row_group_size", "3", "--val_docs", "5"])
    assert rc == 0
    files = list_parquet_files(out)
    expected = {"first paragraph", "second paragraph", "ünïcode paragraph ✓"} | {f"json document {i}" for i in range(40)}
    read_back = [d for split in ("train", "val") for batch in parquets_iter_batched(split, data_dir=out) for d in batch]
    assert sorted(read_back) == sorted(expected)
    assert pq.ParquetFile(files[-1]).metadata.num_rows == 5
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [10, 10, 10, 8, 5]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 4
    assert pq.ParquetFile(files[0]).schema_arrow.names == ["text"]
    assert no_leftovers(out)
    # deterministic: the same inputs give the same shards
    again = tmp_path / "again"
    make_shards.main([str(src), "--out_dir", str(again), "--field", "body", "--txt_doc", "paragraph",
                      "--docs_per_shard", "10", "--row_group_size", "3", "--val_docs", "5"])
    assert [pq.read_table(f).to_pylist() for f in files] == [pq.read_table(f).to_pylist() for f in list_parquet_files(again)]


def test_make_shards_chars_per_shard_and_order(tmp_path):
    docs = [f"doc {i:03d} " + "x" * 40 for i in range(30)]
    paths = make_shards.write_shards(docs, str(tmp_path), chars_per_shard=200, row_group_size=4, shuffle_seed=None,
                                     log=lambda *a: None)
    shards = [pq.read_table(p).column("text").to_pylist() for p in paths]
    assert [d for s in shards for d in s] == docs  # no shuffle: input order kept
    assert all(sum(map(len, s)) >= 200 for s in shards[:-1])
    assert all(sum(map(len, s[:-1])) < 200 for s in shards)


def test_make_shards_bad_input(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    assert make_shards.main([str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "o")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    (tmp_path / "nofield.jsonl").write_text('{"body": "ok"}\n')
    assert make_shards.main([str(tmp_path / "nofield.jsonl"), "--out_dir", str(tmp_path / "o")]) == 1
    assert "--field" in capsys.readouterr().err
    assert make_shards.main([str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "o")]) == 1
    # refuses to mix with existing shards, and loses nothing
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    out = tmp_path / "o2"
    assert make_shards.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out_dir", str(out), "--val_docs", "1"]) == 0
    before = {p: open(p, "rb").read() for p in list_parquet_files(out)}
    assert make_shards.main([str(tmp_path / "a.txt"), "--out_dir", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in list_parquet_files(out)} == before
    with pytest.raises(ValueError, match="no training documents"):
        make_shards.plan_shards(["a", "b"], docs_per_shard=1, val_docs=2)
    with pytest.raises(SystemExit):
        make_shards.main([str(tmp_path / "a.txt"), "--out_dir", str(out), "--docs_per_shard", "2", "--chars_per_shard", "9"])
