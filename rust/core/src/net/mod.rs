//! The cluster: the root and its workers over TCP (see docs/PROTOCOL.md).
//!
//! - [`tcp`]: sockets with TCP_NODELAY, keepalive and a timeout on every read and write.
//! - [`protocol`]: preamble, frames and handshake messages.
//! - [`auth`]: the HMAC-SHA256 challenge-response of the optional shared secret.
//! - [`codec`]: F32 / F16 / Q80 encoding of the exchanged vectors.
//! - [`identity`]: size + header + fingerprint of a model file.
//! - [`ship`]: streaming a worker its weight slices.
//! - [`root`]: the root's connections and its `Collective` (star: sum, then broadcast).
//! - [`worker`]: the serve loop and the worker's `Collective`.

pub mod auth;
pub mod cluster;
pub mod codec;
pub mod identity;
pub mod protocol;
pub mod root;
pub mod ship;
pub mod tcp;
pub mod worker;

use std::time::Duration;

pub use cluster::start_root;
pub use identity::ModelIdentity;
pub use protocol::{BufferType, Setup, PROTOCOL_VERSION};
pub use root::{RootCollective, RootOptions, StepStats};
pub use ship::ShipTensor;
pub use worker::{serve, ModelFactory, WorkerModel, WorkerOptions};

/// Every wait of the protocol has a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect: Duration,
    /// A worker's whole handshake (preamble to Setup, one deadline from the connection); each
    /// of the root's handshake messages.
    pub handshake: Duration,
    /// Each read or write inside a step (a worker computing its slice of a layer) and each
    /// chunk of shipped weights.
    pub step: Duration,
    /// A worker building its slice (mapping or receiving weights) before it says Ready.
    pub build: Duration,
    /// A worker waiting for the root's next step (the user may be typing); dead roots are
    /// found sooner by TCP keepalive.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            step: Duration::from_secs(60),
            build: Duration::from_secs(600),
            idle: Duration::from_secs(3600),
        }
    }
}
