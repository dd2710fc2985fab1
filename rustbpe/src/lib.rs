//! nanochat.rustbpe: a byte-level BPE trainer (GPT-4 style) exposed to Python.
//!
//! Training pulls strings from a Python iterator in buffers; while Python produces the next
//! buffer, a worker thread splits and counts the previous one on rayon's pool, without the GIL.
//! The merge loop then updates pair counts incrementally (see train.rs for the tie-break rule).
//! `encode` here is a slow, simple reference used by tests: real encoding goes through tiktoken
//! with the ranks from `get_mergeable_ranks`.

use std::collections::HashMap;
use std::time::Instant;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyIterator, PyString};

mod pretok;
mod train;

use pretok::Splitter;
use train::{pair, ChunkCounter, PairMap};

/// A trained (or empty) byte-level BPE vocabulary.
#[pyclass(module = "nanochat.rustbpe")]
pub struct Tokenizer {
    splitter: Splitter,
    merges: Vec<(u32, u32)>,
    merge_ids: PairMap<u32>,
    token_bytes: Vec<Vec<u8>>,
    stats: HashMap<&'static str, f64>,
}

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Pull up to `n` strings from the iterator (holding the GIL); an empty buffer means it is done.
fn fetch_buffer(iter: &PyIterator, n: usize, seen: &mut usize) -> PyResult<Vec<String>> {
    let mut buffer = Vec::with_capacity(n);
    for item in iter.take(n) {
        let item = item?;
        let text: &PyString = item.downcast().map_err(|_| {
            PyTypeError::new_err(format!(
                "the training iterator must yield str, item {} is {}",
                *seen,
                item.get_type().name().unwrap_or("?")
            ))
        })?;
        buffer.push(text.to_str()?.to_owned());
        *seen += 1;
    }
    Ok(buffer)
}

impl Tokenizer {
    fn install(&mut self, splitter: Splitter, merges: Vec<(u32, u32)>) {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merge_ids = PairMap::default();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
            merge_ids.insert(pair(a, b), 256 + i as u32);
        }
        self.splitter = splitter;
        self.merges = merges;
        self.merge_ids = merge_ids;
        self.token_bytes = token_bytes;
    }

    /// BPE on one chunk by the book: repeatedly merge the adjacent pair that was learned first.
    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
        loop {
            let best = ids.windows(2).filter_map(|w| self.merge_ids.get(&pair(w[0], w[1])).copied()).min();
            let Some(new_id) = best else { break };
            let (a, b) = self.merges[(new_id - 256) as usize];
            let mut merged = Vec::with_capacity(ids.len());
            let mut i = 0;
            while i < ids.len() {
                if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
                    merged.push(new_id);
                    i += 2;
                } else {
                    merged.push(ids[i]);
                    i += 1;
                }
            }
            ids = merged;
        }
        out.extend(ids);
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        let splitter = Splitter::new(&pretok::default_pattern(), false).map_err(value_error)?;
        let mut tok = Tokenizer {
            splitter,
            merges: Vec::new(),
            merge_ids: PairMap::default(),
            token_bytes: Vec::new(),
            stats: HashMap::new(),
        };
        let splitter = Splitter::new(&pretok::default_pattern(), false).map_err(value_error)?;
        tok.install(splitter, Vec::new());
        Ok(tok)
    }

    /// Train on the strings an iterator yields. vocab_size counts the 256 byte tokens (and no
    /// special tokens); pattern is the split regex (default: GPT-4's with \p{N}{1,2}).
    /// Each step merges the most frequent pair, ties going to the smallest (left id, right id),
    /// as PyPI rustbpe does; training stops early when no pair is left.
    #[args(buffer_size = "8192", pattern = "None")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size <= 256 {
            return Err(value_error(format!("vocab_size must be greater than 256 (the byte tokens), got {}", vocab_size)));
        }
        if vocab_size > u32::MAX as i64 / 2 {
            return Err(value_error(format!("vocab_size {} is too large", vocab_size)));
        }
        if buffer_size <= 0 {
            return Err(value_error(format!("buffer_size must be positive, got {}", buffer_size)));
        }
        let pattern = pattern.unwrap_or_else(pretok::default_pattern);
        let splitter = Splitter::new(&pattern, false).map_err(value_error)?;
        let iter = PyIterator::from_object(py, iterator)
            .map_err(|_| PyTypeError::new_err("train_from_iterator needs an iterable of str"))?;

        let t0 = Instant::now();
        let counter = ChunkCounter::new();
        let mut docs = 0usize;
        let mut bytes = 0usize;
        // While Python fills buffer k+1, a worker thread counts buffer k on the rayon pool.
        let counted: PyResult<()> = std::thread::scope(|scope| {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, Result<(), String>>> = None;
            let finish = |py: Python<'_>, handle: std::thread::ScopedJoinHandle<'_, Result<(), String>>| -> PyResult<()> {
                let result = py.allow_threads(move || handle.join());
                match result {
                    Ok(r) => r.map_err(value_error),
                    Err(_) => Err(value_error("internal error: a counting thread panicked")),
                }
            };
            loop {
                let fetched = fetch_buffer(iter, buffer_size as usize, &mut docs);
                if let Some(handle) = pending.take() {
                    finish(py, handle)?;
                }
                let buffer = fetched?;
                if buffer.is_empty() {
                    return Ok(());
                }
                bytes += buffer.iter().map(|s| s.len()).sum::<usize>();
                let (counter, splitter) = (&counter, &splitter);
                pending = Some(scope.spawn(move || counter.count_buffer(splitter, &buffer)));
            }
        });
        counted?;
        if docs == 0 {
            return Err(value_error("the training iterator yielded no text"));
        }
        let count_seconds = t0.elapsed().as_secs_f64();

        let num_merges = (vocab_size - 256) as usize;
        let result = py.allow_threads(move || {
            let chunks = counter.finish();
            train::learn_merges(chunks, num_merges)
        });
        if result.unique_chunks == 0 {
            return Err(value_error("the training text contains no chunks (all strings empty?)"));
        }
        self.stats = HashMap::from([
            ("documents", docs as f64),
            ("bytes", bytes as f64),
            ("unique_chunks", result.unique_chunks as f64),
            ("merges", result.merges.len() as f64),
            ("count_seconds", count_seconds),
            ("pair_init_seconds", result.init_seconds),
            ("merge_seconds", result.merge_seconds),
            ("total_seconds", t0.elapsed().as_secs_f64()),
            ("fast_splitter", if splitter.is_fast() { 1.0 } else { 0.0 }),
        ]);
        self.install(splitter, result.merges);
        Ok(())
    }

    /// The split regex this vocabulary was trained with.
    fn get_pattern(&self) -> String {
        self.splitter.pattern().to_string()
    }

    /// [(token bytes, rank)] for every token, ranks 0..vocab_size: the input tiktoken wants.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(&'py PyBytes, u32)> {
        self.token_bytes.iter().enumerate().map(|(i, b)| (PyBytes::new(py, b), i as u32)).collect()
    }

    /// [((left, right), new id)] in the order they were learned.
    fn get_merges(&self) -> Vec<((u32, u32), u32)> {
        self.merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect()
    }

    /// Timings and sizes of the last training run.
    fn get_train_stats<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let d = PyDict::new(py);
        for (k, v) in &self.stats {
            d.set_item(*k, *v)?;
        }
        Ok(d)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Slow reference encoder (tests only): split, then apply the merges to each chunk.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| {
            let mut out = Vec::with_capacity(text.len() / 3);
            let mut chunks: Vec<&str> = Vec::new();
            self.splitter.split(text, |c| chunks.push(c))?;
            for chunk in chunks {
                self.encode_chunk(chunk.as_bytes(), &mut out);
            }
            Ok(out)
        })
        .map_err(|e: String| value_error(e))
    }

    /// The bytes of a sequence of token ids.
    fn decode<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<&'py PyBytes> {
        let mut out = Vec::new();
        for id in ids {
            let bytes = self
                .token_bytes
                .get(id as usize)
                .ok_or_else(|| value_error(format!("token id {} is outside the vocabulary ({})", id, self.token_bytes.len())))?;
            out.extend_from_slice(bytes);
        }
        Ok(PyBytes::new(py, &out))
    }
}

/// Split text into pre-tokenization chunks (tests and debugging). use_regex=True forces the
/// fancy-regex engine even where the hand-written GPT-4 matcher would be used.
#[pyfunction(pattern = "None", use_regex = "false")]
#[pyo3(text_signature = "(text, pattern=None, use_regex=False)")]
fn split_text(text: &str, pattern: Option<String>, use_regex: bool) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or_else(pretok::default_pattern);
    let splitter = Splitter::new(&pattern, use_regex).map_err(value_error)?;
    let mut chunks = Vec::new();
    splitter.split(text, |c| chunks.push(c.to_string())).map_err(value_error)?;
    Ok(chunks)
}

/// The default split pattern: GPT-4's, with numbers in groups of 1-2 digits.
#[pyfunction]
fn default_pattern() -> String {
    pretok::default_pattern()
}

#[pymodule]
fn rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add_function(wrap_pyfunction!(default_pattern, m)?)?;
    Ok(())
}
