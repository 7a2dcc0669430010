//! The only place that says `use pyo3`: thin wrappers around `dllama_core`.
//! One file per area, each with a `register` that adds its classes and functions.

use pyo3::prelude::*;

mod errors;
mod format;
mod kernels;
mod net;
mod node;

#[pymodule]
mod _core {
    use super::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        errors::register(m)?;
        kernels::register(m)?;
        format::register(m)?;
        node::register(m)?;
        net::register(m)?;
        Ok(())
    }
}
