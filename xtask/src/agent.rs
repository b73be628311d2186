//! `cargo xtask agent`: builds the static guest agent where `sandbox::locate::agent` finds it,
//! `<target>/guest/x86_64-unknown-linux-gnu/release/microvm-agent` (`testbed::static_agent`,
//! which the tests use too).

use std::path::PathBuf;

use anyhow::{anyhow, Result};

use crate::util::workspace_root;

/// Builds the agent (incrementally) and returns its path; `MICROVM_AGENT` is not consulted:
/// this is the command that makes one.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    // SAFETY: xtask is single-threaded here; nothing reads the environment concurrently.
    unsafe { std::env::remove_var("MICROVM_AGENT") };
    testbed::static_agent(&root, &target).map_err(|e| anyhow!(e))
}
