//! The one little-endian cursor, over a file's bytes or a network message's payload. Every
//! read is bounds-checked; running short is an error naming the source and the item: a
//! `Format` error for a file ("tokenizer file /x/y.t is truncated: ..."), a `Protocol` error
//! for a message ("Setup message too short: ...").

use crate::error::{Error, Result};

pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// What is being read, for messages ("tokenizer file /x/y.t", "Setup").
    what: &'a str,
    message: bool,
}

impl<'a> Reader<'a> {
    /// Over the bytes of a file (or a header): errors are `Error::Format`.
    pub fn new(data: &'a [u8], what: &'a str) -> Self {
        Reader {
            data,
            pos: 0,
            what,
            message: false,
        }
    }

    /// Over the payload of a network message: errors are `Error::Protocol`.
    pub fn message(data: &'a [u8], what: &'a str) -> Self {
        Reader {
            data,
            pos: 0,
            what,
            message: true,
        }
    }

    fn error(&self, msg: String) -> Error {
        if self.message {
            Error::Protocol(msg)
        } else {
            Error::Format(msg)
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    pub fn bytes(&mut self, n: usize, item: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            let (what, pos, rem) = (self.what, self.pos, self.remaining());
            return Err(self.error(if self.message {
                format!("{what} message too short: {item} needs {n} bytes at offset {pos}, has {rem}")
            } else {
                format!("{what} is truncated: {item} needs {n} bytes at offset {pos}, only {rem} remain")
            }));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self, item: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N, item)?.try_into().expect("N bytes"))
    }

    pub fn u8(&mut self, item: &str) -> Result<u8> {
        Ok(self.bytes(1, item)?[0])
    }

    pub fn u32(&mut self, item: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(item)?))
    }

    pub fn u64(&mut self, item: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(item)?))
    }

    pub fn i32(&mut self, item: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array(item)?))
    }

    pub fn f32(&mut self, item: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(item)?))
    }

    /// A u32-length-prefixed byte string of at most `max` bytes.
    pub fn blob(&mut self, max: usize, item: &str) -> Result<&'a [u8]> {
        let n = self.u32(item)? as usize;
        if n > max {
            let what = self.what;
            return Err(self.error(format!(
                "{what} message: {item} of {n} bytes, more than the {max} allowed"
            )));
        }
        self.bytes(n, item)
    }

    /// Error if bytes are left over (a message longer than its fields).
    pub fn finish(&self) -> Result<()> {
        if self.pos != self.data.len() {
            let (what, rem) = (self.what, self.remaining());
            return Err(self.error(format!(
                "{what} message has {rem} unexpected trailing bytes"
            )));
        }
        Ok(())
    }
}
