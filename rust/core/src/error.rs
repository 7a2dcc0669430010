//! The one error type of the core. The binding maps each variant to a Python exception class.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model or tokenizer file that is not what it claims to be (bad magic, truncated,
    /// inconsistent header, wrong size). Maps to `dllama.ModelFormatError` (a `ValueError`).
    #[error("{0}")]
    Format(String),
    /// A bad argument or shape given by the caller. Maps to `ValueError`.
    #[error("{0}")]
    Invalid(String),
    /// An operating-system I/O error, with the path or peer it concerns.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A peer that went away, could not be reached or timed out. Maps to `ConnectionError`.
    #[error("{0}")]
    Connection(String),
    /// A peer that speaks another protocol, version or model. Maps to `dllama.ProtocolError`
    /// (a `ConnectionError`).
    #[error("{0}")]
    Protocol(String),
    /// A peer that failed the shared-secret challenge. Maps to `dllama.AuthenticationError`
    /// (a `ProtocolError`).
    #[error("{0}")]
    Auth(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a context (a path, a peer) to an `io::Result`.
pub trait IoContext<T> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, ctx: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(ctx(), e))
    }
}
