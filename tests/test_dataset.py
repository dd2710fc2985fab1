"""Tests for nanochat/dataset.py (shard listing, splits, rank striding, downloads with retries and
corruption handling against a local HTTP server). dev/make_shards.py has its own, test_make_shards.py."""

import hashlib
import http.server
import random
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import (CorruptShardError, DownloadError, download_shards, download_single_file,
                              list_parquet_files, open_shard, parquets_iter_batched, rank_row_groups,
                              shard_filename, shard_indices, split_files)
from dev import make_shards


def write_fixture_shards(directory, docs_per_shard, row_group_size):
    """Shards whose documents name themselves ("s1-d4 ...") so tests can tell where each came from."""
    os.makedirs(directory, exist_ok=True)
    everything = []
    for s, n in enumerate(docs_per_shard):
        docs = [f"s{s}-d{d} " + "lorem ipsum " * (d % 5) for d in range(n)]
        make_shards.write_shard(docs, os.path.join(directory, shard_filename(s)), row_group_size)
        everything.append(docs)
    return everything


# ------------------------------------------------------------------------------ listing and reading

def test_list_and_split_val_is_last_shard(tmp_path):
    shards = write_fixture_shards(tmp_path, [5, 6, 7], row_group_size=2)
    (tmp_path / ".shard_00003.parquet.123.tmp").write_bytes(b"partial download")
    (tmp_path / "notes.txt").write_text("not a shard")
    names = [os.path.basename(p) for p in list_parquet_files(tmp_path)]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert [os.path.basename(p) for p in split_files("val", tmp_path)] == ["shard_00002.parquet"]
    assert len(split_files("train", tmp_path)) == 2
    val_docs = [d for batch in parquets_iter_batched("val", data_dir=tmp_path) for d in batch]
    assert val_docs == shards[2]
    train_docs = [d for batch in parquets_iter_batched("train", data_dir=tmp_path) for d in batch]
    assert train_docs == shards[0] + shards[1]


def test_data_dir_env_override(tmp_path, monkeypatch):
    write_fixture_shards(tmp_path / "elsewhere", [3, 3], row_group_size=2)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert len(list_parquet_files()) == 2
    assert dataset.get_data_dir() == str(tmp_path / "elsewhere")


def test_missing_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parquet shards.*make_corpus"):
        split_files("train", tmp_path / "nothing_here")
    write_fixture_shards(tmp_path, [4], row_group_size=2)
    with pytest.raises(FileNotFoundError, match="validation split"):
        split_files("train", tmp_path)
    assert len(split_files("val", tmp_path)) == 1
    with pytest.raises(ValueError, match="split"):
        split_files("test", tmp_path)


def test_rank_striding_is_disjoint_and_covers_the_split(tmp_path):
    # shards with 3, 1 and 2 row groups: per-file striding would starve rank 2 of 3 on the short file
    write_fixture_shards(tmp_path, [6, 2, 4, 5], row_group_size=2)
    everything = [d for batch in parquets_iter_batched("train", data_dir=tmp_path) for d in batch]
    assert len(everything) == 12
    for world in (1, 2, 3, 4):
        per_rank = [[d for batch in parquets_iter_batched("train", r, world, tmp_path) for d in batch] for r in range(world)]
        flat = [d for docs in per_rank for d in docs]
        assert len(flat) == len(set(flat)) == len(everything)
        assert set(flat) == set(everything)
        group_counts = [len(rank_row_groups(split_files("train", tmp_path), r, world)) for r in range(world)]
        assert max(group_counts) - min(group_counts) <= 1
    with pytest.raises(ValueError):
        rank_row_groups(split_files("train", tmp_path), 2, 2)


def test_corrupt_local_shard_raises_naming_the_file(tmp_path):
    write_fixture_shards(tmp_path, [8, 8, 8], row_group_size=4)
    path = tmp_path / shard_filename(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="shard_00001.parquet"):
        open_shard(str(path))
    with pytest.raises(CorruptShardError, match="shard_00001.parquet"):
        list(parquets_iter_batched("train", data_dir=tmp_path))
    assert not dataset.verify_shard(str(path))
    # a parquet file without the text column is refused as well
    pq.write_table(pa.table({"content": ["x"]}), str(tmp_path / shard_filename(0)))
    with pytest.raises(CorruptShardError, match="no 'text' column"):
        open_shard(str(tmp_path / shard_filename(0)))


def flip_bit(data, bit):
    data = bytearray(data)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def body_bits(path):
    """Bit positions inside the data pages: after the 4-byte magic, before the footer (metadata + length + magic)."""
    data = open(path, "rb").read()
    footer = int.from_bytes(data[-8:-4], "little") + 8
    return range(4 * 8, (len(data) - footer) * 8)


def test_every_bit_flip_in_a_body_is_refused_naming_the_file(tmp_path):
    # issue #19: of 300 single-bit flips with the footer intact, 114 decoded to silently different text
    write_fixture_shards(tmp_path, [40, 40, 40], row_group_size=8)
    path = str(tmp_path / shard_filename(1))
    good = open(path, "rb").read()
    rng = random.Random(0)
    for bit in rng.sample(body_bits(path), 40):
        with open(path, "wb") as f:
            f.write(flip_bit(good, bit))
        dataset._checked.clear()  # a fresh process
        with pytest.raises(CorruptShardError, match="shard_00001.parquet"):
            list(parquets_iter_batched("train", data_dir=tmp_path))
        assert not dataset.verify_shard(path)
    with open(path, "wb") as f:
        f.write(good)
    dataset._checked.clear()
    assert len(list(parquets_iter_batched("train", data_dir=tmp_path))) == 10  # intact again: all row groups read


def test_shard_without_a_hash_is_decoded_in_full_once_and_then_hashed(tmp_path):
    write_fixture_shards(tmp_path, [8, 8], row_group_size=4)
    path = str(tmp_path / shard_filename(0))
    os.remove(path + dataset.HASH_SUFFIX)
    dataset._checked.clear()
    messages = []
    dataset.check_shard_once(path, log=messages.append)
    assert dataset.recorded_hash(path) == dataset.file_sha256(path)
    assert any("no recorded content hash" in m for m in messages)


def test_undecodable_text_is_a_corrupt_shard_error_not_a_unicode_error(tmp_path):
    # uncompressed, so one byte of a document can be made invalid UTF-8 while parquet's structure stays intact
    path = str(tmp_path / shard_filename(0))
    pq.write_table(pa.table({"text": ["hello world " * 20] * 4}), path, compression="NONE", row_group_size=2)
    data = bytearray(open(path, "rb").read())
    data[data.index(b"hello world")] = 0xFF
    open(path, "wb").write(bytes(data))
    pf = open_shard(path)
    with pytest.raises(CorruptShardError, match="shard_00000.parquet"):
        dataset.read_row_group(pf, 0, path)
    dataset._checked.clear()
    with pytest.raises(CorruptShardError, match="shard_00000.parquet"):  # no hash recorded: the full decode catches it
        dataset.check_shard_once(path)
    assert dataset.recorded_hash(path) is None  # and nothing was trusted


# ------------------------------------------------------------------------------ downloads

class ShardServer:
    """A local HTTP server for shard files. `script[name]` is a list of behaviours consumed one per
    request ('ok', 'truncated' (short file, honest length), 'short' (body shorter than its
    Content-Length), '500', '404'); when it runs out, requests get 'ok'."""

    def __init__(self, directory):
        self.directory = directory
        self.script = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                queue = server.script.get(name, [])
                behaviour = queue.pop(0) if queue else "ok"
                path = os.path.join(server.directory, name)
                if behaviour == "404" or not os.path.exists(path):
                    self.send_error(404)
                    return
                if behaviour == "500":
                    self.send_error(500)
                    return
                body = open(path, "rb").read()
                sha = hashlib.sha256(body).hexdigest()
                if behaviour == "truncated":
                    body = body[: len(body) // 2]
                if behaviour == "flipped":  # one bit of the body changed in transit; the ETag still names the real file
                    body = flip_bit(body, len(body) // 3 * 8)
                self.send_response(200)
                self.send_header("ETag", f'"{sha}"')  # as Hugging Face does for LFS files
                self.send_header("Content-Length", str(len(open(path, "rb").read()) if behaviour == "short" else len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if behaviour == "short" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    remote = tmp_path / "remote"
    shards = write_fixture_shards(remote, [10, 12, 14, 9], row_group_size=4)
    with ShardServer(str(remote)) as srv:
        srv.shards = shards
        yield srv


def no_leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")] == []


def test_download_all_shards(server, tmp_path):
    local = tmp_path / "local"
    sleeps = []
    paths = download_shards(-1, num_workers=3, base_url=server.url, data_dir=str(local), total_shards=4,
                            sleep=sleeps.append, log=lambda *a: None)
    assert [os.path.basename(p) for p in paths] == [shard_filename(i) for i in range(4)]
    for i, docs in enumerate(server.shards):
        assert (local / shard_filename(i)).read_bytes() == (tmp_path / "remote" / shard_filename(i)).read_bytes()
    assert sleeps == [] and no_leftovers(local)
    # present and intact shards are not fetched again
    before = len(server.requests)
    download_shards(-1, num_workers=2, base_url=server.url, data_dir=str(local), total_shards=4, log=lambda *a: None)
    assert len(server.requests) == before


def test_shard_indices_keep_the_final_val_shard():
    assert shard_indices(3, total_shards=10) == [0, 1, 9]
    assert shard_indices(1, total_shards=10) == [9]
    assert shard_indices(-1, total_shards=4) == [0, 1, 2, 3]
    assert shard_indices(50, total_shards=4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        shard_indices(0)


def test_truncated_download_is_retried_with_backoff(server, tmp_path):
    local = tmp_path / "local"
    name = shard_filename(1)
    server.script[name] = ["truncated", "short", "500"]
    sleeps = []
    path = download_single_file(1, base_url=server.url, data_dir=str(local), backoff_s=0.5, sleep=sleeps.append, log=lambda *a: None)
    assert server.requests == [name] * 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert open(path, "rb").read() == (tmp_path / "remote" / name).read_bytes()
    assert no_leftovers(local)


def test_download_gives_up_and_leaves_no_partial_file(server, tmp_path):
    local = tmp_path / "local"
    name = shard_filename(2)
    server.script[name] = ["truncated"] * 10
    sleeps = []
    with pytest.raises(DownloadError, match=name):
        download_single_file(2, base_url=server.url, data_dir=str(local), max_attempts=4, sleep=sleeps.append, log=lambda *a: None)
    assert sleeps == [1.0, 2.0, 4.0]
    assert os.listdir(local) == []


def test_not_found_is_not_retried(server, tmp_path):
    sleeps = []
    with pytest.raises(DownloadError, match="404"):
        download_single_file(7, base_url=server.url, data_dir=str(tmp_path / "local"), sleep=sleeps.append, log=lambda *a: None)
    assert server.requests == [shard_filename(7)] and sleeps == []


def test_corrupt_local_shard_is_replaced(server, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    name = shard_filename(0)
    good = (tmp_path / "remote" / name).read_bytes()
    (local / name).write_bytes(good[:100])
    messages = []
    download_single_file(0, base_url=server.url, data_dir=str(local), sleep=lambda s: None, log=messages.append)
    assert (local / name).read_bytes() == good
    assert server.requests == [name]
    assert any("corrupt" in m for m in messages)


def test_bit_flipped_local_shard_is_downloaded_again(server, tmp_path):
    local = tmp_path / "local"
    download_single_file(0, base_url=server.url, data_dir=str(local), sleep=lambda s: None, log=lambda *a: None)
    name = shard_filename(0)
    good = (local / name).read_bytes()
    assert dataset.recorded_hash(str(local / name)) == hashlib.sha256(good).hexdigest()
    (local / name).write_bytes(flip_bit(good, body_bits(str(local / name))[100]))
    messages = []
    download_single_file(0, base_url=server.url, data_dir=str(local), sleep=lambda s: None, log=messages.append)
    assert (local / name).read_bytes() == good
    assert server.requests == [name, name]
    assert any("recorded hash" in m for m in messages)


def test_download_differing_from_the_servers_hash_is_retried(server, tmp_path):
    local = tmp_path / "local"
    name = shard_filename(2)
    server.script[name] = ["flipped"]
    messages = []
    download_single_file(2, base_url=server.url, data_dir=str(local), sleep=lambda s: None, log=messages.append)
    assert (local / name).read_bytes() == (tmp_path / "remote" / name).read_bytes()
    assert server.requests == [name, name]
    assert any("SHA-256" in m for m in messages)
    assert no_leftovers(local)


def test_partial_failure_keeps_the_good_shards(server, tmp_path):
    local = tmp_path / "local"
    server.script[shard_filename(1)] = ["404"]
    with pytest.raises(DownloadError, match="1 shard"):
        download_shards(-1, num_workers=2, base_url=server.url, data_dir=str(local), total_shards=4,
                        sleep=lambda s: None, log=lambda *a: None)
    assert sorted(n for n in os.listdir(local) if n.endswith(".parquet")) == [shard_filename(i) for i in (0, 2, 3)]


def test_cli(server, tmp_path, monkeypatch, capsys):
    local = tmp_path / "local"
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    assert dataset.main(["-n", "2", "-w", "2", "--total_shards", "4", "--data_dir", str(local)]) == 0
    assert sorted(n for n in os.listdir(local) if n.endswith(".parquet")) == [shard_filename(0), shard_filename(3)]
    assert [os.path.basename(p) for p in split_files("val", local)] == [shard_filename(3)]
    assert dataset.main(["-n", "-1", "--total_shards", "5", "--data_dir", str(local)]) == 1  # shard 4 is not served
    assert "shard_00004" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dataset.main(["-n", "0"])

