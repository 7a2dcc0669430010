//! Bindings: the `.m` header and tensors, the `.t` tokenizer.

use std::path::PathBuf;

use dllama_core::format::header::FieldValue;
use dllama_core::format::{self, FloatType, ModelFile, ModelHeader, Tokenizer};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList};

use crate::errors::IntoPy;

// ---------------------------------------------------------------------------------------------
// Model header
// ---------------------------------------------------------------------------------------------

/// `dict[str, int | float]` → named header fields (conversion only; the core validates).
fn header_fields(fields: &Bound<'_, PyDict>) -> PyResult<Vec<(String, FieldValue)>> {
    let mut out = Vec::with_capacity(fields.len());
    for (k, v) in fields.iter() {
        let name: String = k.extract().map_err(|_| {
            PyTypeError::new_err(format!("header field names must be str, got {k}"))
        })?;
        let value = if v.is_instance_of::<PyFloat>() {
            FieldValue::Float(v.extract()?)
        } else if v.is_instance_of::<PyInt>() {
            FieldValue::Int(v.extract().map_err(|_| {
                PyValueError::new_err(format!("header field {name} = {v} is out of range"))
            })?)
        } else {
            return Err(PyTypeError::new_err(format!(
                "header field {name} must be an int or a float, got {}",
                v.get_type()
            )));
        };
        out.push((name, value));
    }
    Ok(out)
}

fn header_dict<'py>(py: Python<'py>, h: &ModelHeader) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, value) in h.fields() {
        match value {
            FieldValue::Int(v) => d.set_item(name, v)?,
            FieldValue::Float(v) => d.set_item(name, v)?,
        }
    }
    d.set_item("header_size", h.header_size())?;
    d.set_item("file_size", h.file_size())?;
    Ok(d)
}

/// The `.m` header bytes for these fields (keys = ModelHeader field names; enumerations as
/// codes). Raises ValueError for unknown keys and invalid values.
#[pyfunction]
fn encode_model_header<'py>(
    py: Python<'py>,
    fields: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyBytes>> {
    let header = ModelHeader::from_fields(&header_fields(fields)?).py()?;
    let bytes = header.to_bytes();
    if let Some(hs) = header.file_header_size {
        if hs != bytes.len() {
            return Err(PyValueError::new_err(format!(
                "header_size {hs} was given, but these fields encode to a {}-byte header",
                bytes.len()
            )));
        }
    }
    Ok(PyBytes::new(py, &bytes))
}

/// The validated header of a `.m` file (the file size is checked exactly), with
/// `header_size` and `file_size`.
#[pyfunction]
fn read_model_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let file = py.detach(|| ModelFile::open(&path)).py()?;
    header_dict(py, &file.header)
}

/// A `TensorSpec(name, rows, cols, float_type, offset, nbytes)` for every tensor, in file order.
#[pyfunction]
fn model_tensors<'py>(
    py: Python<'py>,
    fields: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyList>> {
    let header = ModelHeader::from_fields(&header_fields(fields)?).py()?;
    let spec = py.import("dllama._types")?.getattr("TensorSpec")?;
    let items = header
        .tensors()
        .into_iter()
        .map(|t| {
            spec.call1((
                t.name,
                t.rows,
                t.cols,
                t.float_type.name(),
                t.offset,
                t.nbytes,
            ))
        })
        .collect::<PyResult<Vec<Bound<'py, PyAny>>>>()?;
    PyList::new(py, items)
}

/// One tensor of a `.m` file, dequantized to float32: shape (rows, cols), or (cols,) for the
/// norm vectors.
#[pyfunction]
fn read_model_tensor<'py>(
    py: Python<'py>,
    path: PathBuf,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let (values, rows, cols, vector) = py
        .detach(|| -> dllama_core::Result<_> {
            let file = ModelFile::open(&path)?;
            let spec = file.tensor(name)?;
            let values = format::dequantize(file.bytes(spec), spec.float_type)?;
            Ok((values, spec.rows, spec.cols, spec.is_vector()))
        })
        .py()?;
    let arr = PyArray1::from_vec(py, values);
    if vector {
        Ok(arr.into_any())
    } else {
        Ok(arr.reshape([rows, cols])?.into_any())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A `.t` file or a llama2.c `tokenizer.bin`, as a dict (see docs/DESIGN.md).
#[pyfunction]
fn read_tokenizer<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let t = py.detach(|| Tokenizer::read(&path)).py()?;
    let d = PyDict::new(py);
    let vocab = PyList::new(py, t.vocab.iter().map(|v| PyBytes::new(py, v)))?;
    d.set_item("vocab", vocab)?;
    d.set_item("scores", t.scores)?;
    d.set_item("max_token_length", t.max_token_length)?;
    d.set_item("bos_id", t.bos_id)?;
    d.set_item("eos_ids", t.eos_ids)?;
    d.set_item("pad_id", t.pad_id)?;
    d.set_item("chat_eos_id", t.chat_eos_id)?;
    d.set_item("chat_template", t.chat_template)?;
    d.set_item("add_bos", t.add_bos)?;
    d.set_item("version", t.version)?;
    Ok(d)
}

fn field<'py, T: for<'a> FromPyObject<'a, 'py>>(
    key: &str,
    v: &Bound<'py, PyAny>,
    expected: &str,
) -> PyResult<T> {
    v.extract::<T>().map_err(|_| {
        PyTypeError::new_err(format!(
            "tokenizer field {key} must be {expected}, got {}",
            v.get_type()
        ))
    })
}

fn tokenizer_from_dict(d: &Bound<'_, PyDict>) -> PyResult<Tokenizer> {
    let mut t = Tokenizer::default();
    let (mut has_vocab, mut has_scores) = (false, false);
    for (k, v) in d.iter() {
        let key: String = k.extract().map_err(|_| {
            PyTypeError::new_err(format!("tokenizer field names must be str, got {k}"))
        })?;
        match key.as_str() {
            "vocab" => {
                has_vocab = true;
                let list = v.cast::<PyList>().map_err(|_| {
                    PyTypeError::new_err("tokenizer field vocab must be a list of bytes")
                })?;
                t.vocab = Vec::with_capacity(list.len());
                for (i, item) in list.iter().enumerate() {
                    let b = item.cast::<PyBytes>().map_err(|_| {
                        PyTypeError::new_err(format!(
                            "tokenizer field vocab must be a list of bytes; item {i} is {}",
                            item.get_type()
                        ))
                    })?;
                    t.vocab.push(b.as_bytes().to_vec());
                }
            }
            "scores" => {
                has_scores = true;
                t.scores = field(&key, &v, "a list of floats")?;
            }
            "max_token_length" => t.max_token_length = field(&key, &v, "an int >= 0")?,
            "bos_id" => t.bos_id = field(&key, &v, "an int")?,
            "eos_ids" => t.eos_ids = field(&key, &v, "a list of ints")?,
            "pad_id" => t.pad_id = field(&key, &v, "an int")?,
            "chat_eos_id" => t.chat_eos_id = field(&key, &v, "an int")?,
            "chat_template" => {
                t.chat_template = if v.is_none() {
                    None
                } else {
                    Some(field::<String>(&key, &v, "a str or None")?)
                }
            }
            "add_bos" => {
                if !v.is_instance_of::<PyBool>() {
                    return Err(PyTypeError::new_err(format!(
                        "tokenizer field add_bos must be a bool, got {}",
                        v.get_type()
                    )));
                }
                t.add_bos = v.extract()?
            }
            "version" => t.version = field(&key, &v, "an int")?,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "unknown tokenizer field {key:?} (known: vocab, scores, max_token_length, \
                     bos_id, eos_ids, pad_id, chat_eos_id, chat_template, add_bos, version)"
                )))
            }
        }
    }
    if !has_vocab || !has_scores {
        return Err(PyValueError::new_err(
            "a tokenizer dict needs vocab and scores",
        ));
    }
    Ok(t)
}

/// Writes a `.t` file from a dict as `read_tokenizer` returns it (vocab and scores required).
#[pyfunction]
fn write_tokenizer(py: Python<'_>, path: PathBuf, tok: &Bound<'_, PyDict>) -> PyResult<()> {
    let t = tokenizer_from_dict(tok)?;
    py.detach(|| t.write(&path)).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_model_header, m)?)?;
    m.add_function(wrap_pyfunction!(read_model_header, m)?)?;
    m.add_function(wrap_pyfunction!(model_tensors, m)?)?;
    // what model_tensors returns and read_tokenizer returns: a NamedTuple and a TypedDict,
    // which have no PyO3 form, defined in Python (dllama/_types.py)
    let types = m.py().import("dllama._types")?;
    for name in ["TensorSpec", "TokenizerDict"] {
        m.add(name, types.getattr(name)?)?;
    }
    // the format's float type names and their header codes, for Python's choices and headers
    let float_types = PyDict::new(m.py());
    for ft in FloatType::ALL {
        float_types.set_item(ft.name(), ft.code())?;
    }
    m.add("FLOAT_TYPES", float_types)?;
    m.add_function(wrap_pyfunction!(read_model_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(read_tokenizer, m)?)?;
    m.add_function(wrap_pyfunction!(write_tokenizer, m)?)?;
    Ok(())
}
