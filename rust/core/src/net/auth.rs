//! Shared-secret challenge-response, both ways.
//!
//! Each side sends a fresh random nonce; the root proves it knows the secret with
//! `HMAC-SHA256(secret, "dllama root" || worker_nonce || root_nonce)`, the worker answers with
//! `HMAC-SHA256(secret, "dllama worker" || root_nonce || worker_nonce)`. The role labels stop a
//! peer from reflecting a proof back; fresh nonces stop replays. The secret never crosses the
//! wire. (This authenticates; it does not encrypt the traffic.)

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::protocol::NONCE_LEN;
use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

pub const ROOT_ROLE: &[u8] = b"dllama root";
pub const WORKER_ROLE: &[u8] = b"dllama worker";

/// The cluster's shared secret, for the root and for a worker alike: `given` (a `--secret`
/// option), else `$DLLAMA_SECRET`; empty means none (no authentication).
pub fn shared_secret(given: Option<String>) -> Option<Vec<u8>> {
    given
        .or_else(|| std::env::var("DLLAMA_SECRET").ok())
        .filter(|s| !s.is_empty())
        .map(String::into_bytes)
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| {
        Error::Connection(format!("cannot get random bytes for the handshake: {e}"))
    })?;
    Ok(n)
}

fn mac(secret: &[u8], role: &[u8], a: &[u8], b: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(role);
    m.update(a);
    m.update(b);
    m
}

/// The proof that the side playing `role` knows `secret`: `peer_nonce` first, then its own.
pub fn proof(secret: &[u8], role: &[u8], peer_nonce: &[u8], own_nonce: &[u8]) -> Vec<u8> {
    mac(secret, role, peer_nonce, own_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Check a proof in constant time.
pub fn verify(
    secret: &[u8],
    role: &[u8],
    peer_nonce: &[u8],
    own_nonce: &[u8],
    proof: &[u8],
) -> bool {
    mac(secret, role, peer_nonce, own_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_role_and_nonces() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        let p = proof(b"s3cret", ROOT_ROLE, &a, &b);
        assert_eq!(p.len(), 32);
        assert!(verify(b"s3cret", ROOT_ROLE, &a, &b, &p));
        assert!(!verify(b"other", ROOT_ROLE, &a, &b, &p));
        assert!(!verify(b"s3cret", WORKER_ROLE, &a, &b, &p));
        assert!(!verify(b"s3cret", ROOT_ROLE, &b, &a, &p));
        assert!(!verify(b"s3cret", ROOT_ROLE, &a, &b, &p[..31]));
    }

    #[test]
    fn matches_rfc4231_test_case_2() {
        // HMAC-SHA256(key="Jefe", "what do ya want for nothing?")
        let p = proof(b"Jefe", b"what do ya want ", b"for nothing", b"?");
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
