"""Tests for dev/make_corpus.py (the bundled offline pretraining corpus: stdlib docs, licence texts and
arithmetic problems -> parquet shards): size caps, no duplicate files, determinism, and the shards
read back through nanochat.dataloader."""

import os
import sysconfig

import pyarrow.parquet as pq

from dev import make_corpus
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dataset import list_parquet_files


def test_make_corpus_shards_feed_the_loader(tiny_tokenizer, tmp_path, capsys):
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    (licenses / "MIT").write_text("Permission is hereby granted, free of charge, to any person obtaining a copy.\n\n" * 3)
    (licenses / "MIT-link").symlink_to(licenses / "MIT")
    stdlib_json = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    args = ["--stdlib_dir", stdlib_json, "--license_dir", str(licenses), "--max_mb", "0.03", "--max_doc_chars", "400",
            "--chars_per_shard", "8000", "--row_group_size", "8", "--val_frac", "0.1", "--arithmetic_problems", "40"]
    assert make_corpus.main(args + ["--out_dir", str(tmp_path / "a")]) == 0
    assert "MB of text" in capsys.readouterr().out
    files = list_parquet_files(tmp_path / "a")
    assert len(files) >= 3
    docs = [d for f in files for d in pq.read_table(f).column("text").to_pylist()]
    assert sum(len(d.encode()) for d in docs) <= 30_000
    assert all(len(d) <= 400 for d in docs)
    assert any("JSON" in d for d in docs) and any("Permission is hereby granted" in d for d in docs)
    assert sum("Permission is hereby granted" in d for d in docs) == 1  # the symlinked copy is not read twice
    assert any("####" in d for d in docs)
    problems = make_corpus.arithmetic_documents(8, 1000, 0, set(), log=lambda *a: None)
    assert problems and all(len(d) <= 1000 and "<<" not in d and "####" in d for d in problems)
    # deterministic
    assert make_corpus.main(args + ["--out_dir", str(tmp_path / "b")]) == 0
    assert [open(f, "rb").read() for f in files] == [open(f, "rb").read() for f in list_parquet_files(tmp_path / "b")]
    # refuses to overwrite without --overwrite; a missing licence dir is skipped
    assert make_corpus.main(args + ["--out_dir", str(tmp_path / "a")]) == 1
    assert make_corpus.main(args[:2] + ["--license_dir", str(tmp_path / "none"), "--max_mb", "0.01",
                                        "--arithmetic_problems", "0", "--out_dir", str(tmp_path / "c")]) == 0
    for split in ("train", "val"):
        inputs, targets, _ = next(tokenizing_distributed_data_loader(tiny_tokenizer, 2, 32, split, data_dir=str(tmp_path / "a")))
        assert inputs.shape == (2, 32) and (inputs[:, 0] == tiny_tokenizer.get_bos_token_id()).all()
