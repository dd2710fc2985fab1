//! BPE training: chunk counting (parallel) and the merge loop (incremental pair counts + a
//! lazily refreshed max-heap).
//!
//! Merge order, the part that makes training deterministic: each step merges the pair with the
//! highest current count; ties go to the smallest pair, comparing (left id, right id)
//! lexicographically. This is the rule PyPI `rustbpe` 0.1.0 uses, so both produce identical
//! merges from identical chunk counts. A pair's count is the number of its occurrences as
//! adjacent symbols over all chunks (overlapping ones included, as in "aaa"), weighted by how
//! often each chunk occurs. Training stops early if no pair occurs any more.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

use ahash::AHashMap;
use rayon::prelude::*;

use crate::pretok::Splitter;

pub type Pair = u64; // (left << 32) | right: integer order is the (left, right) lexicographic order

#[inline(always)]
pub fn pair(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
pub fn unpair(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// Multiplicative hashing for pair keys: one multiply, good high bits (which hashbrown uses).
#[derive(Default, Clone, Copy)]
pub struct PairHasher(u64);

impl Hasher for PairHasher {
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    #[inline(always)]
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    #[inline(always)]
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

#[inline(always)]
fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; any address is allowed and this one is valid anyway
    unsafe {
        std::arch::x86_64::_mm_prefetch(item as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

pub type PairMap<V> = HashMap<Pair, V, BuildHasherDefault<PairHasher>>;

// ------------------------------------------------------------------------------------------
// Chunk counting

/// The global chunk counts, sharded by hash so that workers rarely wait for each other. Each
/// worker counts a group of documents into a private table first (keys borrowed from the text,
/// nothing allocated), then adds that table to the shards, locking each shard once. Memory stays
/// one entry per distinct chunk however many threads there are.
pub struct ChunkCounter {
    shards: Vec<Mutex<AHashMap<Box<str>, i64>>>,
    shard_hasher: ahash::RandomState,
    error: Mutex<Option<String>>,
}

const SHARD_BITS: u32 = 6;

impl ChunkCounter {
    pub fn new() -> Self {
        ChunkCounter {
            shards: (0..1usize << SHARD_BITS).map(|_| Mutex::new(AHashMap::new())).collect(),
            shard_hasher: ahash::RandomState::with_seeds(1, 2, 3, 4),
            error: Mutex::new(None),
        }
    }

    fn shard_of(&self, chunk: &str) -> usize {
        let mut h = self.shard_hasher.build_hasher();
        chunk.hash(&mut h);
        (h.finish() >> (64 - SHARD_BITS)) as usize
    }

    /// Split and count every document of a buffer, in parallel.
    pub fn count_buffer(&self, splitter: &Splitter, docs: &[String]) -> Result<(), String> {
        // groups small enough to keep every thread busy, large enough to amortize the merge
        let group = (docs.len() / (rayon::current_num_threads() * 4)).clamp(1, 256);
        docs.par_chunks(group).enumerate().for_each(|(g, docs)| {
            let mut local: AHashMap<&str, i64> = AHashMap::new();
            for doc in docs {
                if let Err(e) = splitter.split(doc, |chunk| *local.entry(chunk).or_insert(0) += 1) {
                    self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                    return;
                }
            }
            let mut parts: Vec<Vec<(&str, i64)>> = vec![Vec::new(); self.shards.len()];
            for (chunk, count) in local {
                parts[self.shard_of(chunk)].push((chunk, count));
            }
            // start at a different shard in each group so that groups finishing together spread out
            let n = parts.len();
            for k in 0..n {
                let s = (g + k) % n;
                if parts[s].is_empty() {
                    continue;
                }
                let mut table = self.shards[s].lock().unwrap_or_else(|e| e.into_inner());
                for &(chunk, count) in &parts[s] {
                    match table.get_mut(chunk) {
                        Some(total) => *total += count,
                        None => {
                            table.insert(chunk.into(), count);
                        }
                    }
                }
            }
        });
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every distinct chunk with its count (the shards hold disjoint chunks).
    pub fn finish(self) -> Vec<AHashMap<Box<str>, i64>> {
        self.shards.into_iter().map(|t| t.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
    }
}

// ------------------------------------------------------------------------------------------
// Merging

/// Where one distinct chunk lives in the flat symbol array, with its count: one cache line
/// holds everything the merge loop reads about a word.
#[derive(Clone, Copy)]
struct WordInfo {
    start: usize,
    count: i64,
    len: u32,
    /// index of the last merge that rewrote this word (a word can be listed twice for a pair)
    visited: u32,
}

/// Every distinct chunk as a run of symbol ids in one flat array; words shrink in place.
struct Words {
    symbols: Vec<u32>,
    info: Vec<WordInfo>,
}

impl Words {
    fn from_chunks(shards: Vec<AHashMap<Box<str>, i64>>) -> Words {
        let total: usize = shards.iter().flat_map(|s| s.keys()).map(|c| c.len()).sum();
        let n: usize = shards.iter().map(|s| s.len()).sum();
        let mut words = Words { symbols: Vec::with_capacity(total), info: Vec::with_capacity(n) };
        for (chunk, count) in shards.into_iter().flatten() {
            words.info.push(WordInfo { start: words.symbols.len(), count, len: chunk.len() as u32, visited: u32::MAX });
            words.symbols.extend(chunk.bytes().map(|b| b as u32));
        }
        words
    }

    fn word(&self, w: usize) -> &[u32] {
        let info = &self.info[w];
        &self.symbols[info.start..info.start + info.len as usize]
    }
}

pub struct TrainResult {
    /// merges[i] = (left, right) that formed token 256 + i
    pub merges: Vec<(u32, u32)>,
    pub init_seconds: f64,
    pub merge_seconds: f64,
    pub unique_chunks: usize,
}

/// Pair counts and, per pair, the words it occurs in, over a range of words.
fn count_pairs(words: &Words, range: std::ops::Range<usize>) -> (PairMap<i64>, PairMap<Vec<u32>>) {
    let mut counts: PairMap<i64> = PairMap::default();
    let mut where_: PairMap<Vec<u32>> = PairMap::default();
    for w in range {
        let syms = words.word(w);
        let c = words.info[w].count;
        for win in syms.windows(2) {
            let p = pair(win[0], win[1]);
            *counts.entry(p).or_insert(0) += c;
            let list = where_.entry(p).or_default();
            if list.last() != Some(&(w as u32)) {
                list.push(w as u32);
            }
        }
    }
    (counts, where_)
}

pub fn learn_merges(chunks: Vec<AHashMap<Box<str>, i64>>, num_merges: usize) -> TrainResult {
    let t0 = std::time::Instant::now();
    let unique_chunks = chunks.iter().map(|s| s.len()).sum();
    let mut words = Words::from_chunks(chunks);
    let n_words = words.info.len();

    // initial pair counts and occurrence lists, counted in parallel slices then combined
    let n_parts = (rayon::current_num_threads() * 4).max(1);
    let part = (n_words + n_parts - 1) / n_parts.max(1);
    let parts: Vec<_> = (0..n_parts)
        .into_par_iter()
        .map(|k| count_pairs(&words, (k * part).min(n_words)..((k + 1) * part).min(n_words)))
        .collect();
    let mut counts: PairMap<i64> = PairMap::default();
    let mut where_: PairMap<Vec<u32>> = PairMap::default();
    for (c, w) in parts {
        for (p, n) in c {
            *counts.entry(p).or_insert(0) += n;
        }
        for (p, list) in w {
            // slices are in word order, so the combined list stays sorted and duplicate-free
            where_.entry(p).or_default().extend(list);
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = counts.iter().filter(|(_, &n)| n > 0).map(|(&p, &n)| (n, Reverse(p))).collect();
    let init_seconds = t0.elapsed().as_secs_f64();

    let t1 = std::time::Instant::now();
    let mut merges: Vec<(u32, u32)> = Vec::with_capacity(num_merges.min(1 << 20));
    let mut new_pairs: Vec<Pair> = Vec::new();
    while merges.len() < num_merges {
        let Some((stored, Reverse(top))) = heap.pop() else { break };
        let current = counts.get(&top).copied().unwrap_or(0);
        if stored != current {
            // counts only fall after a pair is pushed, so a stale entry is an overestimate:
            // re-queue it with its true count and look again
            if current > 0 {
                heap.push((current, Reverse(top)));
            }
            continue;
        }
        let (a, b) = unpair(top);
        let new_id = 256 + merges.len() as u32;
        let merge_index = merges.len() as u32;
        merges.push((a, b));

        let occurrences = where_.remove(&top).unwrap_or_default();
        new_pairs.clear();
        for (k, &w) in occurrences.iter().enumerate() {
            // the loop is bound by memory latency on scattered words: fetch ahead
            if let Some(&ahead) = occurrences.get(k + 16) {
                prefetch(&words.info[ahead as usize]);
            }
            if let Some(&ahead) = occurrences.get(k + 8) {
                prefetch(&words.symbols[words.info[ahead as usize].start.min(words.symbols.len() - 1)]);
            }
            let w = w as usize;
            let info = &mut words.info[w];
            if info.visited == merge_index {
                continue;
            }
            info.visited = merge_index;
            let (c, start, n) = (info.count, info.start, info.len as usize);
            let syms = &mut words.symbols[start..start + n];
            let mut delta = |p: Pair, d: i64| *counts.entry(p).or_insert(0) += d;
            let mut out = 0;
            let mut i = 0;
            while i < n {
                if i + 1 < n && syms[i] == a && syms[i + 1] == b {
                    if out > 0 {
                        let left = syms[out - 1];
                        delta(pair(left, a), -c);
                        delta(pair(left, new_id), c);
                        new_pairs.push(pair(left, new_id));
                    }
                    if i + 2 < n {
                        let right = syms[i + 2];
                        delta(pair(b, right), -c);
                        delta(pair(new_id, right), c);
                        new_pairs.push(pair(new_id, right));
                    }
                    delta(top, -c);
                    syms[out] = new_id;
                    out += 1;
                    i += 2;
                } else {
                    syms[out] = syms[i];
                    out += 1;
                    i += 1;
                }
            }
            words.info[w].len = out as u32;
            // record where the new pairs live (the words are visited one at a time, so a
            // last-element check keeps each list free of duplicates)
            for k in 0..out.saturating_sub(1) {
                if syms[k] == new_id || syms[k + 1] == new_id {
                    let list = where_.entry(pair(syms[k], syms[k + 1])).or_default();
                    if list.last() != Some(&(w as u32)) {
                        list.push(w as u32);
                    }
                }
            }
        }
        counts.remove(&top);
        // only pairs containing the new id can have grown: queue them with their counts
        new_pairs.sort_unstable();
        new_pairs.dedup();
        for &p in &new_pairs {
            let n = counts.get(&p).copied().unwrap_or(0);
            if n > 0 {
                heap.push((n, Reverse(p)));
            }
        }
    }
    TrainResult { merges, init_seconds, merge_seconds: t1.elapsed().as_secs_f64(), unique_chunks }
}
