//! What the guest-booting test suites share, written once: busybox OCI images built in the test
//! ([`image`]), a loopback registry to pull them from ([`registry`]), the host-side checks
//! that a run left nothing behind ([`host`]), and a way for a test that changes process-wide
//! state to run alone ([`alone_in_process`]).
//!
//! A dev-dependency only; nothing here is part of the product.

mod alone;
pub mod host;
pub mod image;
pub mod registry;

pub use alone::alone_in_process;
use sha2::{Digest, Sha256};

/// The lowercase hex SHA-256 of `data` (an OCI digest without its `sha256:` prefix).
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
