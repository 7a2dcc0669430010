//! Bindings: encoding float32 arrays as f32 / f16 / Q40 / Q80 bytes and back; the memory
//! read bandwidth the kernels are measured against.

use std::borrow::Cow;

use dllama_core::format::{self, FloatType};
use numpy::{PyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::IntoPy;

/// Encodes a float32 array (any shape, read in C order) as `float_type` bytes: "f32", "f16",
/// "q40" or "q80" (ggml Q4_0 / Q8_0 blocks; the size must be a multiple of 32).
#[pyfunction]
fn quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    float_type: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let ft = FloatType::from_name(float_type).py()?;
    let arr: PyReadonlyArrayDyn<'py, f32> = x.extract().map_err(|_| {
        let dtype = x
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| x.get_type().to_string());
        PyTypeError::new_err(format!(
            "quantize() needs a float32 numpy array, got {dtype}"
        ))
    })?;
    // as_slice() also accepts Fortran-ordered arrays (in memory order): only borrow C order
    let values: Cow<'_, [f32]> = match arr.as_slice() {
        Ok(s) if arr.is_c_contiguous() => Cow::Borrowed(s),
        _ => Cow::Owned(arr.as_array().iter().copied().collect()),
    };
    let nbytes = ft.bytes_for(arr.len() as u64).py()? as usize;
    let values: &[f32] = &values;
    PyBytes::new_with(py, nbytes, |buf| {
        py.detach(|| format::quantize_into(values, ft, buf)).py()
    })
}

/// Decodes `float_type` bytes into a 1-D float32 array.
#[pyfunction]
fn dequantize<'py>(
    py: Python<'py>,
    data: &[u8],
    float_type: &str,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ft = FloatType::from_name(float_type).py()?;
    let values = py.detach(|| format::dequantize(data, ft)).py()?;
    Ok(PyArray1::from_vec(py, values))
}

/// Bytes per second `nthreads` threads read from memory at once (the benchmarks' floor):
/// a `nbytes` buffer allocated as the repacked weights are, best of `rounds`.
#[pyfunction]
#[pyo3(signature = (nbytes, nthreads, rounds = 5))]
fn read_bandwidth(py: Python<'_>, nbytes: usize, nthreads: usize, rounds: usize) -> PyResult<f64> {
    py.detach(|| dllama_core::memory::read_bandwidth(nbytes, nthreads, rounds))
        .py()
}

/// A `nbytes` buffer (allocated as the repacked weights are, touched once) that `nthreads`
/// threads read again and again: `read()` is the bandwidth of one pass of each read pattern,
/// the best, so it can be timed right beside a token, many times over.
#[pyclass(name = "BandwidthReader", module = "dllama._core")]
pub struct PyBandwidthReader(dllama_core::memory::BandwidthReader);

#[pymethods]
impl PyBandwidthReader {
    #[new]
    fn new(py: Python<'_>, nbytes: usize, nthreads: usize) -> PyResult<PyBandwidthReader> {
        py.detach(|| dllama_core::memory::BandwidthReader::new(nbytes, nthreads))
            .map(PyBandwidthReader)
            .py()
    }

    /// Bytes per second, the fastest of one pass of each read pattern.
    fn read(&mut self, py: Python<'_>) -> f64 {
        py.detach(|| self.0.read())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBandwidthReader>()?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    Ok(())
}
