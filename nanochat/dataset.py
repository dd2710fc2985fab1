"""
Pretraining text shards: where they live, how to read them, how to fetch them.

A shard is a parquet file `shard_00000.parquet`, `shard_00001.parquet`, ... with a single string
column `text` (one document per row), split into row groups of ~1k documents. The shards live in
`get_base_dir()/base_data`, or in `$NANOCHAT_DATA_DIR` when set. The LAST shard (in sorted order) is
the validation split and every other shard is training data.

Shards come from one of:
    python -m nanochat.dataset -n 8           # FineWeb-Edu shards over HTTP (see DEFAULT_BASE_URL)
    python -m dev.make_corpus                 # an offline corpus generated on this machine
    python -m dev.make_shards FILES...        # your own text / JSONL files

Downloads stream into a temporary file, are checked by opening them as parquet, and only then are
renamed into place, so a shard under its final name is always complete. A damaged shard already on
disk is detected (footer / row-group metadata), deleted and fetched again; reading one raises a
CorruptShardError that names the file.

Content hashes: every shard has a sidecar `shard_XXXXX.parquet.sha256` (`sha256sum` format) written when
the shard is made (dev/make_shards.py) or downloaded (here; compared with the server's sha256 ETag when
it sends one). A flipped bit in a shard's body can decode to silently different text, which no footer
check sees; so the first time a process reads a shard, its SHA-256 is compared with the sidecar, and a
mismatch is a CorruptShardError naming the file (the downloader deletes and re-fetches it). A shard
without a sidecar (made before hashes existed) is decoded in full once and its hash recorded then.
"""

import argparse
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow.parquet as pq

from nanochat.common import get_base_dir

# FineWeb-Edu (100B tokens), reshuffled and repacked into ~100MB shards shard_00000..shard_01822
DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
DEFAULT_TOTAL_SHARDS = 1823
TEXT_COLUMN = "text"
HASH_SUFFIX = ".sha256"


class CorruptShardError(RuntimeError):
    """A parquet shard that cannot be opened or does not have the expected layout."""


# -----------------------------------------------------------------------------
# Locating and checking shards

def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir=None):
    """The shard directory: the argument, else $NANOCHAT_DATA_DIR, else <base dir>/base_data."""
    if data_dir:
        return str(data_dir)
    return os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Full paths of all finished shards in the data directory, sorted (so the last one is val).
    Temporary download files are not listed."""
    data_dir = get_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def split_files(split, data_dir=None):
    """The shard paths of a split: 'val' is the last shard, 'train' all the others."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    where = get_data_dir(data_dir)
    hint = ("get shards with `python -m nanochat.dataset -n 8` (network) or "
            "`python -m dev.make_corpus` (offline), or point NANOCHAT_DATA_DIR at a shard directory")
    if not files:
        raise FileNotFoundError(f"no parquet shards in {where}: {hint}")
    if split == "val":
        return files[-1:]
    if len(files) < 2:
        raise FileNotFoundError(f"only one shard in {where} ({os.path.basename(files[0])}); it is the "
                                f"validation split, so there is no training data: {hint}")
    return files[:-1]


def open_shard(path):
    """Open a shard as a pyarrow ParquetFile after checking its footer and layout; raises
    CorruptShardError naming the file when it is truncated, not parquet, or lacks the text column."""
    try:
        pf = pq.ParquetFile(path)
        metadata = pf.metadata
    except FileNotFoundError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for truncated or foreign files
        raise CorruptShardError(f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                                f"delete it and fetch or rebuild it") from e
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise CorruptShardError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {pf.schema_arrow.names})")
    if metadata.num_row_groups < 1:
        raise CorruptShardError(f"shard {path} has no row groups")
    rows = sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    if rows != metadata.num_rows:
        raise CorruptShardError(f"shard {path} row-group sizes add up to {rows}, not {metadata.num_rows}")
    return pf


def read_row_group(pf, rg_idx, path="?"):
    """The documents of one row group as a list of str, with decode errors reported per file."""
    try:
        table = pf.read_row_group(rg_idx, columns=[TEXT_COLUMN])
        return table.column(TEXT_COLUMN).to_pylist()  # decoding to str is where a damaged body raises UnicodeDecodeError
    except Exception as e:
        raise CorruptShardError(f"shard {path}: row group {rg_idx} cannot be read ({type(e).__name__}: {e})") from e


# -----------------------------------------------------------------------------
# Content hashes

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_hash(path):
    """The SHA-256 recorded for a shard (hex), or None when it has no sidecar."""
    try:
        with open(path + HASH_SUFFIX, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CorruptShardError(f"hash file {path + HASH_SUFFIX} is malformed; delete it and the shard, then fetch or rebuild")
    return digest


def record_hash(path, digest=None):
    """Write the shard's sidecar atomically (`sha256sum -c` reads it); returns the digest."""
    digest = digest or file_sha256(path)
    tmp = f"{path}{HASH_SUFFIX}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, path + HASH_SUFFIX)
    return digest


def check_hash(path):
    """Raise CorruptShardError naming the file when its content differs from its recorded hash.
    Returns the recorded digest, or None when there is none to check against."""
    expected = recorded_hash(path)
    if expected is None:
        return None
    actual = file_sha256(path)
    if actual != expected:
        raise CorruptShardError(f"shard {path} is damaged: its SHA-256 {actual[:16]}... differs from the one recorded "
                                f"when it was made or downloaded ({expected[:16]}..., {os.path.basename(path)}{HASH_SUFFIX}); "
                                f"delete it and download (python -m nanochat.dataset) or rebuild it")
    return expected


_checked = {}  # path -> (size, mtime) of the version this process has already checked


def check_shard_once(path, log=print):
    """Check a shard's content the first time this process reads it (hashing every shard up front would
    cost minutes at full scale). Without a recorded hash the shard is decoded in full and one is recorded."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns)
    if _checked.get(path) == key:
        return
    if check_hash(path) is None:
        pf = open_shard(path)
        for rg in range(pf.metadata.num_row_groups):
            read_row_group(pf, rg, path)
        try:
            record_hash(path)
            log(f"{os.path.basename(path)}: no recorded content hash; decoded it in full and recorded one")
        except OSError as e:  # a read-only data directory: keep going, checked by decoding only
            log(f"warning: {path} has no recorded content hash and none can be written ({e})")
    _checked[path] = key


def verify_shard(path, full=False):
    """True when the shard opens cleanly and matches its recorded hash (if it has one); with full=True
    every row group is also decoded (used right after a download)."""
    try:
        pf = open_shard(path)
        check_hash(path)
        if full:
            for rg in range(pf.metadata.num_row_groups):
                read_row_group(pf, rg, path)
        return True
    except CorruptShardError:
        return False


def row_group_counts(files):
    """Row-group count per file, opening (and so checking) every shard's footer up front."""
    return [open_shard(path).metadata.num_row_groups for path in files]


def rank_row_groups(files, start=0, step=1):
    """The (file index, row group index) pairs a rank reads: every row group of the split is numbered
    globally across files in order and rank `start` of `step` takes numbers start, start+step, ...
    Striding globally (not per file) keeps the ranks balanced even when shards have few row groups."""
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start} step={step}")
    pairs = [(pq_idx, rg_idx) for pq_idx, n in enumerate(row_group_counts(files)) for rg_idx in range(n)]
    return pairs[start::step]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """One pass over a split, yielding the documents (list of str) of each row group this rank owns
    (see rank_row_groups); ranks with different `start` and the same `step` read disjoint data."""
    files = split_files(split, data_dir)
    current_idx, current_pf = None, None
    for pq_idx, rg_idx in rank_row_groups(files, start, step):
        if pq_idx != current_idx:
            check_shard_once(files[pq_idx])
            current_idx, current_pf = pq_idx, open_shard(files[pq_idx])
        yield read_row_group(current_pf, rg_idx, files[pq_idx])


# -----------------------------------------------------------------------------
# Downloading

class DownloadError(RuntimeError):
    pass


def _server_sha256(headers):
    # Hugging Face (git LFS) sends the file's SHA-256 as its ETag (X-Linked-Etag on redirects); other servers
    # send something else or nothing, and then there is nothing to compare with
    for name in ("X-Linked-Etag", "ETag"):
        value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def _fetch_to_file(url, tmp_path, timeout, chunk_size=1 << 20):
    """Stream url into tmp_path; raises when the body is shorter than its Content-Length or differs from
    the SHA-256 the server states. Returns (bytes received, SHA-256 hex of what was written)."""
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat-cotrain"})
    digest = hashlib.sha256()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        expected = response.headers.get("Content-Length")
        stated = _server_sha256(response.headers)
        received = 0
        with open(tmp_path, "wb") as f:
            while True:
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received != int(expected):
        raise DownloadError(f"got {received} bytes of {expected} from {url}")
    if stated is not None and digest.hexdigest() != stated:
        raise DownloadError(f"{url}: SHA-256 of the body {digest.hexdigest()[:16]}... differs from the server's {stated[:16]}...")
    return received, digest.hexdigest()


def _is_permanent(error):
    """HTTP client errors (404 and friends) will not go away by retrying; timeouts and 5xx may."""
    return isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429)


def download_single_file(index, base_url=None, data_dir=None, max_attempts=5, backoff_s=1.0,
                         timeout=30, sleep=time.sleep, log=print):
    """Make sure shard `index` is present and intact in the data directory, downloading it if needed.

    An existing shard is checked first (footer, and content against its recorded hash); a damaged one is
    deleted and fetched again. Each attempt streams into a temporary file that is verified as parquet (and
    against the server's SHA-256 when it states one) before an atomic rename, so a failed or
    truncated transfer never leaves a file under the shard's name. Failed attempts are retried after
    backoff_s * 2**(attempt-1) seconds (`sleep` is injectable for tests). Returns the shard's path;
    raises DownloadError after the last attempt."""
    base_url = (base_url or os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_BASE_URL).rstrip("/")
    data_dir = get_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    filename = shard_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        if verify_shard(path):
            if recorded_hash(path) is None and verify_shard(path, full=True):
                record_hash(path)  # a shard from before hashes existed: decoded in full, then trusted
            return path
        log(f"{filename}: existing file is corrupt, truncated or differs from its recorded hash; deleting it and downloading again")
        os.remove(path)
        if os.path.exists(path + HASH_SUFFIX):
            os.remove(path + HASH_SUFFIX)

    url = f"{base_url}/{filename}"
    tmp_path = os.path.join(data_dir, f".{filename}.{os.getpid()}.tmp")
    last_error = None
    for attempt in range(1, max_attempts + 1):
        try:
            t0 = time.time()
            nbytes, digest = _fetch_to_file(url, tmp_path, timeout)
            if not verify_shard(tmp_path, full=True):
                raise DownloadError(f"downloaded {filename} ({nbytes} bytes) is not a readable parquet shard")
            os.replace(tmp_path, path)
            record_hash(path, digest)
            log(f"{filename}: {nbytes / 1e6:.1f} MB in {time.time() - t0:.1f}s")
            return path
        except Exception as e:
            last_error = e
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            if _is_permanent(e) or attempt == max_attempts:
                break
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"{filename}: attempt {attempt}/{max_attempts} failed ({type(e).__name__}: {e}); retrying in {wait:g}s")
            sleep(wait)
    raise DownloadError(f"could not download {url} after {attempt} attempt(s): {type(last_error).__name__}: {last_error}")


def shard_indices(n, total_shards=DEFAULT_TOTAL_SHARDS):
    """Which shards `-n n` means: the first n-1 training shards plus the dataset's last shard, so the
    validation split (the last shard on disk) is the same however many shards are downloaded.
    n = -1 (or n >= total) means all of them."""
    if n == -1 or n >= total_shards:
        return list(range(total_shards))
    if n < 1:
        raise ValueError(f"number of shards must be >= 1 or -1 for all, got {n}")
    return list(range(n - 1)) + [total_shards - 1]


def download_shards(n, num_workers=4, base_url=None, data_dir=None, total_shards=DEFAULT_TOTAL_SHARDS,
                    max_attempts=5, backoff_s=1.0, timeout=30, sleep=time.sleep, log=print):
    """Download n shards (see shard_indices) with a pool of threads. Returns the list of paths;
    raises DownloadError listing every shard that failed (the others are kept)."""
    indices = shard_indices(n, total_shards)
    data_dir = get_data_dir(data_dir)
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_BASE_URL
    log(f"fetching {len(indices)} shard(s) from {base_url} into {data_dir} with {num_workers} worker(s)")
    t0 = time.time()
    paths, failures = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        futures = {pool.submit(download_single_file, i, base_url=base_url, data_dir=data_dir,
                               max_attempts=max_attempts, backoff_s=backoff_s, timeout=timeout,
                               sleep=sleep, log=log): i for i in indices}
        for done, future in enumerate(as_completed(futures), 1):
            index = futures[future]
            try:
                paths[index] = future.result()
            except Exception as e:
                failures[index] = e
            log(f"[{done}/{len(indices)}] {shard_filename(index)} {'FAILED' if index in failures else 'ok'}")
    total_mb = sum(os.path.getsize(p) for p in paths.values()) / 1e6
    log(f"{len(paths)}/{len(indices)} shard(s) present ({total_mb:.1f} MB) after {time.time() - t0:.1f}s")
    if failures:
        detail = "; ".join(f"{shard_filename(i)}: {e}" for i, e in sorted(failures.items()))
        raise DownloadError(f"{len(failures)} shard(s) failed: {detail}")
    return [paths[i] for i in indices]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards (the last one is the validation split).")
    parser.add_argument("-n", "--num_shards", type=int, required=True,
                        help="shards to fetch: the first n-1 plus the final (validation) shard; -1 = all (~1823 x 100MB)")
    parser.add_argument("-w", "--num_workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--base_url", default=None,
                        help=f"where shard_XXXXX.parquet files live (env NANOCHAT_DATA_URL; default {DEFAULT_BASE_URL})")
    parser.add_argument("--total_shards", type=int, default=DEFAULT_TOTAL_SHARDS,
                        help=f"how many shards the source has; the last is val (default {DEFAULT_TOTAL_SHARDS})")
    parser.add_argument("--data_dir", default=None, help="destination (env NANOCHAT_DATA_DIR; default <base dir>/base_data)")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num_workers must be >= 1")
    if args.total_shards < 1:
        parser.error("--total_shards must be >= 1")
    if args.num_shards == 0 or args.num_shards < -1:
        parser.error("-n must be >= 1, or -1 for all shards")
    try:
        download_shards(args.num_shards, args.num_workers, base_url=args.base_url, data_dir=args.data_dir,
                        total_shards=args.total_shards)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
