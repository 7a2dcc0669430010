//! The identity of a model file, exchanged in the handshake: size, header and a fingerprint.
//!
//! The fingerprint is SHA-256 over the file size, the header and 256 samples of 4 KiB spread
//! evenly over the file (the whole file when it is under 1 MiB). It reads about 1 MiB whatever
//! the model's size, so a worker started with `--model` checks its copy in milliseconds; two
//! different weight files (different training, quantization or conversion) differ in
//! practically every sample.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::IoContext;
use crate::format::ModelFile;
use crate::Result;

const SAMPLES: u64 = 256;
const SAMPLE: u64 = 4096;

/// What identifies a model file: its size, its header bytes and a fingerprint of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    pub file_size: u64,
    /// The `.m` header, verbatim (carries the model shape).
    pub header: Vec<u8>,
    /// SHA-256 over sampled content (see the module's comment).
    pub fingerprint: [u8; 32],
}

impl ModelIdentity {
    /// The identity of an open model file: its canonical header and a sampled fingerprint.
    pub fn of_model(file: &ModelFile) -> Result<ModelIdentity> {
        ModelIdentity::of_file(&file.path, file.header.to_bytes())
    }

    /// Identity of the model file at `path` with its (canonical) `header` bytes.
    pub fn of_file(path: &Path, header: Vec<u8>) -> Result<ModelIdentity> {
        let ctx = || format!("cannot read model file {}", path.display());
        let mut f = File::open(path).context(ctx)?;
        let size = f.metadata().context(ctx)?.len();
        let mut h = Sha256::new();
        h.update(size.to_le_bytes());
        h.update(&header);
        let mut buf = vec![0u8; SAMPLE as usize];
        if size <= SAMPLES * SAMPLE {
            f.seek(SeekFrom::Start(0)).context(ctx)?;
            let mut all = Vec::with_capacity(size as usize);
            f.read_to_end(&mut all).context(ctx)?;
            h.update(&all);
        } else {
            for i in 0..SAMPLES {
                let off = i * (size - SAMPLE) / (SAMPLES - 1);
                f.seek(SeekFrom::Start(off)).context(ctx)?;
                f.read_exact(&mut buf).context(ctx)?;
                h.update(&buf);
            }
        }
        Ok(ModelIdentity {
            file_size: size,
            header,
            fingerprint: h.finalize().into(),
        })
    }

    /// Why `other` (the root's model) is not this (the worker's) model, if it is not.
    pub fn mismatch(&self, other: &ModelIdentity) -> Option<String> {
        if self.file_size != other.file_size {
            return Some(format!(
                "the worker's model file is {} bytes, the root's is {} bytes",
                self.file_size, other.file_size
            ));
        }
        if self.header != other.header {
            return Some("the worker's model header differs from the root's".into());
        }
        if self.fingerprint != other.fingerprint {
            return Some(
                "the worker's model has the same shape but different weights (checksum differs)"
                    .into(),
            );
        }
        None
    }
}
