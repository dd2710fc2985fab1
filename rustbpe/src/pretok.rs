//! Pre-tokenization: cutting text into the chunks that BPE never merges across.
//!
//! Any pattern runs through fancy-regex. The GPT-4 split pattern (with any digit-group length
//! `\p{N}{1,K}`) also has a hand-written matcher, several times faster than the backtracking
//! regex engine, which reproduces the regex's leftmost-first semantics exactly. Its character
//! classes (`\p{L}`, `\p{N}`, `\s` and the case-insensitive contraction letters) are read from
//! regex-syntax, the same tables fancy-regex compiles, so both paths agree on every code point.
//! The Python tests check the two against each other on random Unicode text.

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// The GPT-4 pattern is this prefix, then `\p{N}{1,K}`, then this suffix.
const GPT4_PREFIX: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|";
const GPT4_SUFFIX: &str = r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub fn gpt4_pattern(max_digits: usize) -> String {
    format!("{}\\p{{N}}{{1,{}}}{}", GPT4_PREFIX, max_digits, GPT4_SUFFIX)
}

/// The default: GPT-4's pattern with numbers split into groups of at most two digits.
pub fn default_pattern() -> String {
    gpt4_pattern(2)
}

/// If `pattern` is the GPT-4 pattern with some digit-group length K, return K.
fn gpt4_digits(pattern: &str) -> Option<usize> {
    let middle = pattern.strip_prefix(GPT4_PREFIX)?.strip_suffix(GPT4_SUFFIX)?;
    let k: usize = middle.strip_prefix(r"\p{N}{1,")?.strip_suffix('}')?.parse().ok()?;
    // a leading zero or '+' would still parse; insist on the canonical spelling
    if k >= 1 && middle == format!("\\p{{N}}{{1,{}}}", k) {
        Some(k)
    } else {
        None
    }
}

// ------------------------------------------------------------------------------------------
// Character classes

const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s (Unicode White_Space)
const FOLD_SDMT: u8 = 8; // (?i:[sdmt])
const FOLD_L: u8 = 16; // (?i:l)
const FOLD_V: u8 = 32; // (?i:v)
const FOLD_R: u8 = 64; // (?i:r)
const FOLD_E: u8 = 128; // (?i:e)

struct CharClasses {
    /// flags of every code point below 0x10000, the planes where almost all text lives
    bmp: Vec<u8>,
    /// (first, last, flags) ranges above 0x10000, sorted and disjoint
    astral: Vec<(u32, u32, u8)>,
}

fn class_ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(class)
        .expect("built-in character class parses");
    let mut hir = &hir;
    while let HirKind::Group(group) = hir.kind() {
        hir = &group.hir;
    }
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        HirKind::Literal(regex_syntax::hir::Literal::Unicode(ch)) => vec![(*ch as u32, *ch as u32)],
        other => panic!("unexpected HIR for {}: {:?}", class, other),
    }
}

fn char_classes() -> &'static CharClasses {
    static TABLE: OnceLock<CharClasses> = OnceLock::new();
    TABLE.get_or_init(|| {
        let classes: [(&str, u8); 8] = [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            (r"(?i:[sdmt])", FOLD_SDMT),
            (r"(?i:l)", FOLD_L),
            (r"(?i:v)", FOLD_V),
            (r"(?i:r)", FOLD_R),
            (r"(?i:e)", FOLD_E),
        ];
        let mut bmp = vec![0u8; 0x10000];
        let mut astral_points: Vec<(u32, u32, u8)> = Vec::new();
        for (class, flag) in classes {
            for (lo, hi) in class_ranges(class) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= flag;
                }
                if hi >= 0x10000 {
                    astral_points.push((lo.max(0x10000), hi, flag));
                }
            }
        }
        // flatten overlapping per-class ranges into disjoint ranges with combined flags
        let mut bounds: Vec<u32> = astral_points.iter().flat_map(|&(lo, hi, _)| [lo, hi + 1]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let flags = astral_points.iter().filter(|&&(a, b, _)| a <= lo && hi <= b).fold(0u8, |acc, &(_, _, f)| acc | f);
            if flags != 0 {
                match astral.last_mut() {
                    Some(last) if last.1 + 1 == lo && last.2 == flags => last.1 = hi,
                    _ => astral.push((lo, hi, flags)),
                }
            }
        }
        CharClasses { bmp, astral }
    })
}

impl CharClasses {
    #[inline(always)]
    fn flags(&self, cp: u32) -> u8 {
        if cp < 0x10000 {
            self.bmp[cp as usize]
        } else {
            match self.astral.binary_search_by(|&(lo, hi, _)| {
                if hi < cp {
                    std::cmp::Ordering::Less
                } else if lo > cp {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(i) => self.astral[i].2,
                Err(_) => 0,
            }
        }
    }
}

/// Decode the char starting at byte i of valid UTF-8: (code point, byte length).
#[inline(always)]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F), 3)
    } else {
        (
            ((b0 & 0x07) << 18) | ((b[i + 1] as u32 & 0x3F) << 12) | ((b[i + 2] as u32 & 0x3F) << 6) | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

// ------------------------------------------------------------------------------------------
// The GPT-4 matcher

/// Splits like the GPT-4 pattern with `\p{N}{1,max_digits}`. The pattern's alternatives are tried
/// in order at each position, as the regex does (leftmost-first); every position matches one of
/// them, so the chunks tile the text.
fn split_gpt4<'t, F: FnMut(&'t str)>(text: &'t str, max_digits: usize, mut emit: F) {
    let cc = char_classes();
    let b = text.as_bytes();
    let n = b.len();
    let flags_at = |i: usize| -> (u32, usize, u8) {
        let (cp, len) = decode(b, i);
        (cp, len, cc.flags(cp))
    };
    // end of the run of chars (from i) whose flags satisfy keep
    let run_end = |mut i: usize, keep: &dyn Fn(u8) -> bool| -> usize {
        while i < n {
            let (_, len, f) = flags_at(i);
            if !keep(f) {
                break;
            }
            i += len;
        }
        i
    };
    let is_punct = |f: u8| f & (LETTER | NUMBER | SPACE) == 0;
    let newline_run_end = |mut i: usize| -> usize {
        while i < n && (b[i] == b'\r' || b[i] == b'\n') {
            i += 1;
        }
        i
    };

    let mut i = 0;
    while i < n {
        let (cp, len, f) = flags_at(i);
        let next = if i + len < n { Some(flags_at(i + len)) } else { None };
        let next_flags = next.map(|(_, _, nf)| nf).unwrap_or(0);

        // 1. '(?i:[sdmt]|ll|ve|re)
        let mut end = 0;
        if cp == '\'' as u32 {
            if let Some((_, l1, f1)) = next {
                let j = i + len + l1;
                if f1 & FOLD_SDMT != 0 {
                    end = j;
                } else if j < n && f1 & (FOLD_L | FOLD_V | FOLD_R) != 0 {
                    let (_, l2, f2) = flags_at(j);
                    let ok = (f1 & FOLD_L != 0 && f2 & FOLD_L != 0) || (f1 & (FOLD_V | FOLD_R) != 0 && f2 & FOLD_E != 0);
                    if ok {
                        end = j + l2;
                    }
                }
            }
        }
        if end == 0 {
            end = if f & LETTER != 0 {
                // 2. [^\r\n\p{L}\p{N}]?+\p{L}+ without the optional prefix
                run_end(i + len, &|g| g & LETTER != 0)
            } else if cp != '\r' as u32 && cp != '\n' as u32 && f & NUMBER == 0 && next_flags & LETTER != 0 {
                // 2. with a prefix (punctuation or whitespace other than \r \n)
                run_end(i + len, &|g| g & LETTER != 0)
            } else if f & NUMBER != 0 {
                // 3. \p{N}{1,K}
                let mut j = i + len;
                let mut digits = 1;
                while digits < max_digits && j < n {
                    let (_, l, g) = flags_at(j);
                    if g & NUMBER == 0 {
                        break;
                    }
                    j += l;
                    digits += 1;
                }
                j
            } else if cp == ' ' as u32 && next.is_some() && is_punct(next_flags) {
                // 4. ' ?[^\s\p{L}\p{N}]++[\r\n]*' with the space
                newline_run_end(run_end(i + len, &is_punct))
            } else if is_punct(f) {
                // 4. without the space
                newline_run_end(run_end(i, &is_punct))
            } else {
                // whitespace: alternatives 5, 6 and 7 all start with a maximal whitespace run
                let mut j = i;
                let mut last_newline_end = 0;
                let mut last_char_start = i;
                while j < n {
                    let (c, l, g) = flags_at(j);
                    if g & SPACE == 0 {
                        break;
                    }
                    if c == '\r' as u32 || c == '\n' as u32 {
                        last_newline_end = j + l;
                    }
                    last_char_start = j;
                    j += l;
                }
                if last_newline_end != 0 {
                    last_newline_end // 5. \s*[\r\n]: backtracks to the last newline in the run
                } else if j == n || last_char_start == i {
                    j // 6. at the end of text, or 7. a single whitespace char before a non-space
                } else {
                    last_char_start // 6. \s+(?!\S): leave the last whitespace char for the next chunk
                }
            };
        }
        emit(&text[i..end]);
        i = end;
    }
}

// ------------------------------------------------------------------------------------------
// Public splitter

pub enum Splitter {
    Gpt4 { max_digits: usize, pattern: String },
    Regex(Regex),
}

impl Splitter {
    /// Compile a pattern; `use_regex` forces the fancy-regex engine even for the GPT-4 pattern.
    pub fn new(pattern: &str, use_regex: bool) -> Result<Splitter, String> {
        // compile it regardless, so an invalid pattern is reported the same way on both paths
        let regex = Regex::new(pattern).map_err(|e| format!("invalid split pattern {:?}: {}", pattern, e))?;
        match gpt4_digits(pattern) {
            Some(k) if !use_regex => Ok(Splitter::Gpt4 { max_digits: k, pattern: pattern.to_string() }),
            _ => Ok(Splitter::Regex(regex)),
        }
    }

    pub fn pattern(&self) -> &str {
        match self {
            Splitter::Gpt4 { pattern, .. } => pattern,
            Splitter::Regex(r) => r.as_str(),
        }
    }

    pub fn is_fast(&self) -> bool {
        matches!(self, Splitter::Gpt4 { .. })
    }

    /// Call emit on every non-empty chunk of text, in order.
    pub fn split<'t, F: FnMut(&'t str)>(&self, text: &'t str, mut emit: F) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits, .. } => {
                split_gpt4(text, *max_digits, emit);
                Ok(())
            }
            Splitter::Regex(regex) => {
                for m in regex.find_iter(text) {
                    let m = m.map_err(|e| format!("regex error while splitting: {}", e))?;
                    if !m.as_str().is_empty() {
                        emit(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }
}
