//! Exception classes and the one mapping from `dllama_core::Error` to them.

use dllama_core::Error;
use pyo3::exceptions::{PyConnectionError, PyOSError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(dllama._core, ModelFormatError, PyValueError, "A model or tokenizer file that is not valid: wrong magic, truncated, inconsistent header or size.");
pyo3::create_exception!(
    dllama._core,
    ProtocolError,
    PyConnectionError,
    "A peer that speaks another protocol, protocol version or model."
);
pyo3::create_exception!(
    dllama._core,
    AuthenticationError,
    ProtocolError,
    "A peer that failed the shared-secret challenge."
);

/// Turn a core error into the matching Python exception.
pub fn to_py(err: Error) -> PyErr {
    match err {
        Error::Format(msg) => ModelFormatError::new_err(msg),
        Error::Invalid(msg) => PyValueError::new_err(msg),
        Error::Io { context, source } => {
            let msg = format!("{context}: {source}");
            match source.kind() {
                std::io::ErrorKind::NotFound => pyo3::exceptions::PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => {
                    pyo3::exceptions::PyPermissionError::new_err(msg)
                }
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::UnexpectedEof => PyConnectionError::new_err(msg),
                _ => PyOSError::new_err(msg),
            }
        }
        Error::Connection(msg) => PyConnectionError::new_err(msg),
        Error::Protocol(msg) => ProtocolError::new_err(msg),
        Error::Auth(msg) => AuthenticationError::new_err(msg),
    }
}

/// `Result` of the core, as a `PyResult`.
pub trait IntoPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for dllama_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ModelFormatError", py.get_type::<ModelFormatError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    Ok(())
}
