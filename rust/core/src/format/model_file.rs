//! A model file, memory-mapped: the header, the tensor list and zero-copy access to the bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::{legacy, FloatType, ModelHeader, TensorSpec};
use crate::error::{Error, IoContext, Result};

/// An open `.m` (or legacy `.bin`) model file.
pub struct ModelFile {
    pub header: ModelHeader,
    /// Every tensor in file order. For a legacy file this is the legacy layout (the header's
    /// own `tensors()` describes the `.m` layout of the same model).
    pub tensors: Vec<TensorSpec>,
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Position in `tensors` by name (a MoE model has tens of thousands of tensors).
    index: HashMap<String, usize>,
}

fn index_of(tensors: &[TensorSpec]) -> HashMap<String, usize> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect()
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Fill `buf` from `file` at `offset` (a positioned read: the file's cursor is not shared).
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

/// Maps a whole file read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).context(|| format!("cannot open model file {}", path.display()))?;
    let meta = file
        .metadata()
        .context(|| format!("cannot stat model file {}", path.display()))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "model path {} is not a regular file",
            path.display()
        )));
    }
    // SAFETY: the map is read-only; like every memory-mapped loader (llama.cpp, safetensors) we
    // rely on the file not being truncated while it is in use.
    unsafe { Mmap::map(&file) }
        .context(|| format!("cannot memory-map model file {}", path.display()))
}

/// The exact-size check shared by both formats.
fn check_size(path: &Path, actual: u64, expected: u64) -> Result<()> {
    let s = |n: u64| if n == 1 { "" } else { "s" };
    if actual < expected {
        return Err(Error::format(format!(
            "model file {} is {} byte{} short of the {expected} bytes its header describes (truncated?)",
            path.display(),
            expected - actual,
            s(expected - actual)
        )));
    }
    if actual > expected {
        return Err(Error::format(format!(
            "model file {} has {} extra byte{} after the {expected} bytes its header describes",
            path.display(),
            actual - expected,
            s(actual - expected)
        )));
    }
    Ok(())
}

impl ModelFile {
    /// Opens a `.m` file: parses and validates the header, checks the file size exactly.
    pub fn open(path: &Path) -> Result<ModelFile> {
        let map = map_file(path)?;
        let what = format!("model file {}", path.display());
        let header = ModelHeader::parse_named(&map, &what)?;
        // the size first: the tensor list is as long as the header says
        check_size(path, map.len() as u64, header.file_size())?;
        let tensors = header.tensors();
        Ok(ModelFile::from_parts(path, map, header, tensors))
    }

    /// Opens distributed-llama's legacy `.bin` (7 int32 header, no weights type: the caller gives it).
    pub fn open_legacy(path: &Path, weights_float_type: FloatType) -> Result<ModelFile> {
        let map = map_file(path)?;
        if map.len() >= 4 && map[..4] == super::header::MODEL_MAGIC.to_le_bytes() {
            return Err(Error::invalid(format!(
                "{} is a .m model, whose header gives its weights type: the weights float type \
                 (--weights-float-type) is only for legacy .bin files",
                path.display()
            )));
        }
        let what = format!("legacy model file {}", path.display());
        let header = legacy::parse(&map, weights_float_type, &what)?;
        check_size(path, map.len() as u64, legacy::file_size(&header))?;
        let tensors = legacy::tensors(&header);
        Ok(ModelFile::from_parts(path, map, header, tensors))
    }

    fn from_parts(
        path: &Path,
        map: Mmap,
        header: ModelHeader,
        tensors: Vec<TensorSpec>,
    ) -> ModelFile {
        ModelFile {
            header,
            index: index_of(&tensors),
            tensors,
            path: path.to_path_buf(),
            map: Arc::new(map),
        }
    }

    /// The tensor called `name` (`embedding`, `layers.3.q`, `norm`, `wcls`, ...).
    pub fn tensor(&self, name: &str) -> Result<&TensorSpec> {
        self.index.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| {
            Error::invalid(format!(
                "model file {} has no tensor {name:?} (tensors are embedding, layers.<i>.<q|k|v|wo|w1|w2|w3|q_norm|k_norm|moe_gate|experts.<e>.<w1|w2|w3>|attn_norm|ffn_norm>, norm, wcls; n_layers = {})",
                self.path.display(),
                self.header.n_layers
            ))
        })
    }

    /// The bytes of a tensor of this file, straight from the map (no copy).
    ///
    /// `spec` must come from this file's `tensors` (the size check at open guarantees that
    /// every one of them lies inside the map); a foreign spec that does not fit gives an empty
    /// slice rather than a panic.
    pub fn bytes(&self, spec: &TensorSpec) -> &[u8] {
        let start = spec.offset as usize;
        let end = start.saturating_add(spec.nbytes as usize);
        self.map.get(start..end).unwrap_or(&[])
    }

    /// The whole mapped file, shared (for loaders that keep weights mapped beyond this value).
    pub fn map(&self) -> Arc<Mmap> {
        Arc::clone(&self.map)
    }

    /// The tensor's values as float32 (dequantized), row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let spec = self.tensor(name)?;
        super::dequantize(self.bytes(spec), spec.float_type)
    }
}
