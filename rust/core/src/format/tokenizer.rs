//! Tokenizer files: distributed-llama's `.t` (read and write) and llama2.c's `tokenizer.bin`
//! (read).
//!
//! `.t` (as `converter/tokenizer-writer.py` writes it and `src/tokenizer.cpp` reads it): int32
//! magic `0x567124`; int32 header size (= 8 + 8 × pairs); (int32 key, int32 value) pairs: 0
//! version (must be 1), 1 vocab_size, 2 max_token_length, 3 bos_id, 4 eos_id, 5 pad_id, 6
//! chat_eos_id, 7 chat_template byte length, 8 chat_stop byte length, 9 n_eos_tokens, 10
//! add_bos; then the chat template bytes, the chat_stop bytes (skipped), n_eos_tokens int32
//! ids, and per token {f32 score, u32 length, bytes}.
//!
//! llama2.c `tokenizer.bin`: int32 max_token_length, then per token {f32 score, i32 length,
//! bytes} up to the end of the file (the vocabulary size is not stored).

use std::path::Path;

use super::Reader;
use crate::error::{Error, IoContext, Result};

pub const TOKENIZER_MAGIC: u32 = 0x0056_7124;
/// distributed-llama's first tokenizer format (a fixed struct), not supported.
const OLD_TOKENIZER_MAGIC: u32 = 0x0056_7123;
/// Largest header accepted (11 keys are defined).
const MAX_HEADER_SIZE: usize = 8 + 8 * 64;
/// Limits beyond which a size read from a file is treated as corrupt.
pub const MAX_VOCAB_SIZE: usize = 1 << 24;
pub const MAX_TOKEN_LENGTH: usize = 1 << 16;
const MAX_EOS_TOKENS: usize = 1 << 12;
const MAX_CHAT_TEMPLATE: usize = 1 << 24;

mod key {
    pub const VERSION: i32 = 0;
    pub const VOCAB_SIZE: i32 = 1;
    pub const MAX_TOKEN_LENGTH: i32 = 2;
    pub const BOS_ID: i32 = 3;
    pub const EOS_ID: i32 = 4;
    pub const PAD_ID: i32 = 5;
    pub const CHAT_EOS_ID: i32 = 6;
    pub const CHAT_TEMPLATE: i32 = 7;
    pub const CHAT_STOP: i32 = 8;
    pub const N_EOS_TOKENS: i32 = 9;
    pub const ADD_BOS: i32 = 10;
}

const KEY_NAMES: [&str; 11] = [
    "version",
    "vocab_size",
    "max_token_length",
    "bos_id",
    "eos_id",
    "pad_id",
    "chat_eos_id",
    "chat_template",
    "chat_stop",
    "n_eos_tokens",
    "add_bos",
];

/// A tokenizer's vocabulary and special ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenizer {
    /// 1 for `.t`; 0 for a llama2.c `tokenizer.bin`.
    pub version: u32,
    /// Token bytes, by id.
    pub vocab: Vec<Vec<u8>>,
    /// Merge scores, by id.
    pub scores: Vec<f32>,
    /// Longest token in bytes (0 when writing: computed).
    pub max_token_length: u32,
    /// -1: none.
    pub bos_id: i32,
    /// Every id that ends generation, as distributed-llama collects them: the header's eos_id
    /// (key 4) and chat_eos_id (key 6) in header order, then the n_eos_tokens list.
    pub eos_ids: Vec<i32>,
    /// -1: none (distributed-llama ignores it).
    pub pad_id: i32,
    /// Key 6 of older `.t` files, -1 when absent. Already included in `eos_ids`; the writer
    /// keeps it only through `eos_ids` (see [`Tokenizer::to_bytes`]).
    pub chat_eos_id: i32,
    pub chat_template: Option<String>,
    /// Whether to prepend bos_id when encoding (`.t` key 10; true when absent).
    pub add_bos: bool,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Tokenizer {
            version: 1,
            vocab: Vec::new(),
            scores: Vec::new(),
            max_token_length: 0,
            bos_id: -1,
            eos_ids: Vec::new(),
            pad_id: -1,
            chat_eos_id: -1,
            chat_template: None,
            add_bos: true,
        }
    }
}

impl Tokenizer {
    // -----------------------------------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------------------------------

    /// Reads a `.t` file or a llama2.c `tokenizer.bin` (told apart by the first int32).
    pub fn read(path: &Path) -> Result<Tokenizer> {
        let data = std::fs::read(path)
            .context(|| format!("cannot read tokenizer file {}", path.display()))?;
        let what = format!("tokenizer file {}", path.display());
        Self::parse(&data, &what)
    }

    /// As [`read`](Self::read), from bytes; `what` names the source in messages.
    pub fn parse(data: &[u8], what: &str) -> Result<Tokenizer> {
        if data.len() < 4 {
            return Err(Error::format(format!(
                "{what} is {} bytes: too short for a tokenizer",
                data.len()
            )));
        }
        let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match magic {
            TOKENIZER_MAGIC => Self::parse_t(data, what),
            OLD_TOKENIZER_MAGIC => Err(Error::format(format!(
                "{what} uses distributed-llama's old tokenizer format (magic {magic:#x}), which is \
                 not supported: regenerate the tokenizer"
            ))),
            _ => Self::parse_llama2c(data, what).map_err(|e| {
                Error::format(format!(
                    "{what} is neither a .t tokenizer (magic {TOKENIZER_MAGIC:#x}; this file starts \
                     with {magic:#x}) nor a llama2.c tokenizer.bin ({e})"
                ))
            }),
        }
    }

    fn parse_t(data: &[u8], what: &str) -> Result<Tokenizer> {
        let mut r = Reader::new(data, what);
        r.i32("magic")?;
        let size = r.i32("header size")?;
        if size < 8 || (size - 8) % 8 != 0 || size as usize > MAX_HEADER_SIZE {
            return Err(Error::format(format!(
                "{what} has an absurd header size {size}: expected 8 + 8 × (number of key/value \
                 pairs), at most {MAX_HEADER_SIZE}"
            )));
        }
        let bad = |msg: String| Error::format(format!("{what}: {msg}"));
        let mut t = Tokenizer {
            version: 0,
            ..Tokenizer::default()
        };
        let mut version = None;
        let mut vocab_size = None;
        let (mut template_len, mut stop_len, mut n_eos) = (0usize, 0usize, 0usize);
        let mut seen = [false; KEY_NAMES.len()];
        for i in 0..(size as usize - 8) / 8 {
            let k = r.i32("header key")?;
            let v = r.i32("header value")?;
            if !(0..KEY_NAMES.len() as i32).contains(&k) {
                return Err(bad(format!(
                    "unknown tokenizer header key {k} (value {v}) in pair {i}; known keys are 0..={}",
                    KEY_NAMES.len() - 1
                )));
            }
            let name = KEY_NAMES[k as usize];
            if std::mem::replace(&mut seen[k as usize], true) {
                return Err(bad(format!(
                    "tokenizer header key {k} ({name}) appears twice"
                )));
            }
            let size_in = |limit: usize| -> Result<usize> {
                if v < 0 || v as usize > limit {
                    return Err(bad(format!("absurd {name} {v} (expected 0..={limit})")));
                }
                Ok(v as usize)
            };
            match k {
                key::VERSION => version = Some(v),
                key::VOCAB_SIZE => vocab_size = Some(size_in(MAX_VOCAB_SIZE)?),
                key::MAX_TOKEN_LENGTH => t.max_token_length = size_in(MAX_TOKEN_LENGTH)? as u32,
                key::BOS_ID => t.bos_id = v,
                key::EOS_ID => t.eos_ids.push(v),
                key::PAD_ID => t.pad_id = v,
                key::CHAT_EOS_ID => {
                    t.chat_eos_id = v;
                    t.eos_ids.push(v);
                }
                key::CHAT_TEMPLATE => template_len = size_in(MAX_CHAT_TEMPLATE)?,
                key::CHAT_STOP => stop_len = size_in(MAX_CHAT_TEMPLATE)?,
                key::N_EOS_TOKENS => n_eos = size_in(MAX_EOS_TOKENS)?,
                key::ADD_BOS => t.add_bos = v == 1,
                _ => unreachable!("key range checked above"),
            }
        }
        match version {
            Some(1) => t.version = 1,
            Some(v) => {
                return Err(bad(format!(
                    "tokenizer version {v} is not supported (expected 1): regenerate the tokenizer"
                )))
            }
            None => return Err(bad("the header gives no version (key 0)".into())),
        }
        let vocab_size = match vocab_size {
            Some(0) | None => return Err(bad("vocab_size is missing or zero".into())),
            Some(n) => n,
        };
        if t.max_token_length == 0 {
            return Err(bad("max_token_length is missing or zero".into()));
        }
        if template_len > 0 {
            let bytes = r.bytes(template_len, "the chat template")?;
            let s = std::str::from_utf8(bytes)
                .map_err(|e| bad(format!("the chat template is not valid UTF-8: {e}")))?;
            t.chat_template = Some(s.to_string());
        }
        // distributed-llama skips chat_stop bytes (older writers put them after the template)
        r.bytes(stop_len, "the chat stop string")?;
        for _ in 0..n_eos {
            t.eos_ids.push(r.i32("an eos token id")?);
        }
        // Each token takes at least 8 bytes: check before allocating.
        if vocab_size > r.remaining() / 8 {
            return Err(bad(format!(
                "truncated: vocab_size {vocab_size} needs at least {} bytes of tokens, only {} remain",
                vocab_size * 8,
                r.remaining()
            )));
        }
        t.vocab.reserve(vocab_size);
        t.scores.reserve(vocab_size);
        for i in 0..vocab_size {
            t.scores.push(r.f32("a token score")?);
            let len = r.i32("a token length")? as u32 as usize;
            if len > t.max_token_length as usize {
                return Err(bad(format!(
                    "token {i} is {len} bytes, longer than max_token_length {}",
                    t.max_token_length
                )));
            }
            t.vocab.push(r.bytes(len, &format!("token {i}"))?.to_vec());
        }
        if r.remaining() > 0 {
            return Err(bad(format!(
                "{} extra bytes after the last of its {vocab_size} tokens",
                r.remaining()
            )));
        }
        t.check_ids().map_err(bad)?;
        Ok(t)
    }

    /// llama2.c's `tokenizer.bin`; bos 1 and eos 2 as llama2.c assumes.
    fn parse_llama2c(data: &[u8], what: &str) -> Result<Tokenizer> {
        let mut r = Reader::new(data, what);
        let max_len = r.i32("max_token_length")?;
        if max_len <= 0 || max_len as usize > MAX_TOKEN_LENGTH {
            return Err(Error::format(format!(
                "absurd max_token_length {max_len} (expected 1..={MAX_TOKEN_LENGTH})"
            )));
        }
        let mut t = Tokenizer {
            version: 0,
            max_token_length: max_len as u32,
            ..Default::default()
        };
        while r.remaining() > 0 {
            let i = t.vocab.len();
            if i >= MAX_VOCAB_SIZE {
                return Err(Error::format(format!("more than {MAX_VOCAB_SIZE} tokens")));
            }
            t.scores.push(r.f32("a token score")?);
            let len = r.i32("a token length")?;
            if len < 0 || len > max_len {
                return Err(Error::format(format!(
                    "token {i} has length {len}, outside 0..=max_token_length {max_len}"
                )));
            }
            t.vocab
                .push(r.bytes(len as usize, &format!("token {i}"))?.to_vec());
        }
        if t.vocab.is_empty() {
            return Err(Error::format("it holds no tokens".to_string()));
        }
        if t.vocab.len() > 2 {
            t.bos_id = 1;
            t.eos_ids = vec![2];
        }
        Ok(t)
    }

    /// Special ids must name tokens of the vocabulary (-1 for none where allowed).
    fn check_ids(&self) -> std::result::Result<(), String> {
        let n = self.vocab.len() as i64;
        for (name, id) in [
            ("bos_id", self.bos_id),
            ("pad_id", self.pad_id),
            ("chat_eos_id", self.chat_eos_id),
        ] {
            if id < -1 || id as i64 >= n {
                return Err(format!(
                    "{name} {id} is outside the vocabulary of {n} tokens"
                ));
            }
        }
        for &id in &self.eos_ids {
            if id < 0 || id as i64 >= n {
                return Err(format!(
                    "eos id {id} is outside the vocabulary of {n} tokens"
                ));
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Writing
    // -----------------------------------------------------------------------------------------

    /// The `.t` bytes, keys in the order of distributed-llama's `tokenizer-writer.py`: bos_id
    /// (when ≥ 0), version 1, vocab_size, max_token_length, pad_id (when ≥ 0), chat_template
    /// (when present), n_eos_tokens, add_bos. All end-of-sequence ids go into the n_eos_tokens
    /// list (a chat_eos_id ≥ 0 that is not in `eos_ids` is added to it); keys 4, 6 and 8 of
    /// older files are not written, so a read-back has chat_eos_id -1 and the same eos set.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.vocab.len();
        if n == 0 || n > MAX_VOCAB_SIZE {
            return Err(Error::invalid(format!(
                "a tokenizer needs 1..={MAX_VOCAB_SIZE} tokens, this one has {n}"
            )));
        }
        if self.scores.len() != n {
            return Err(Error::invalid(format!(
                "{n} tokens but {} scores",
                self.scores.len()
            )));
        }
        if self.version > 1 {
            return Err(Error::invalid(format!(
                "cannot write tokenizer version {} (the .t format is version 1)",
                self.version
            )));
        }
        let longest = self.vocab.iter().map(Vec::len).max().unwrap_or(0);
        let max_len = if self.max_token_length == 0 {
            longest
        } else {
            self.max_token_length as usize
        };
        if longest > max_len {
            return Err(Error::invalid(format!(
                "max_token_length {max_len} is less than the longest token ({longest} bytes)"
            )));
        }
        if max_len == 0 || max_len > MAX_TOKEN_LENGTH {
            return Err(Error::invalid(format!(
                "max_token_length {max_len} is outside 1..={MAX_TOKEN_LENGTH}"
            )));
        }
        self.check_ids().map_err(Error::invalid)?;
        let mut eos = self.eos_ids.clone();
        if self.chat_eos_id >= 0 && !eos.contains(&self.chat_eos_id) {
            eos.push(self.chat_eos_id);
        }
        if eos.len() > MAX_EOS_TOKENS {
            return Err(Error::invalid(format!("{} eos ids: too many", eos.len())));
        }
        let template = self.chat_template.as_deref().unwrap_or("").as_bytes();
        if template.len() > MAX_CHAT_TEMPLATE {
            return Err(Error::invalid(format!(
                "chat template of {} bytes: too long",
                template.len()
            )));
        }

        let mut pairs = Vec::new();
        if self.bos_id >= 0 {
            pairs.push((key::BOS_ID, self.bos_id));
        }
        pairs.push((key::VERSION, 1));
        pairs.push((key::VOCAB_SIZE, n as i32));
        pairs.push((key::MAX_TOKEN_LENGTH, max_len as i32));
        if self.pad_id >= 0 {
            pairs.push((key::PAD_ID, self.pad_id));
        }
        if !template.is_empty() {
            pairs.push((key::CHAT_TEMPLATE, template.len() as i32));
        }
        pairs.push((key::N_EOS_TOKENS, eos.len() as i32));
        pairs.push((key::ADD_BOS, self.add_bos as i32));

        let token_bytes: usize = self.vocab.iter().map(|v| 8 + v.len()).sum();
        let mut out =
            Vec::with_capacity(8 + 8 * pairs.len() + template.len() + 4 * eos.len() + token_bytes);
        out.extend_from_slice(&TOKENIZER_MAGIC.to_le_bytes());
        out.extend_from_slice(&((8 + 8 * pairs.len()) as i32).to_le_bytes());
        for (k, v) in pairs {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(template);
        for id in eos {
            out.extend_from_slice(&id.to_le_bytes());
        }
        for (tok, score) in self.vocab.iter().zip(&self.scores) {
            out.extend_from_slice(&score.to_le_bytes());
            out.extend_from_slice(&(tok.len() as u32).to_le_bytes());
            out.extend_from_slice(tok);
        }
        Ok(out)
    }

    /// Writes a `.t` file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes)
            .context(|| format!("cannot write tokenizer file {}", path.display()))
    }
}
