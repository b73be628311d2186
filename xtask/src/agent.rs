//! `cargo xtask agent`: builds the static guest agent where `sandbox::locate::agent` finds it,
//! `<target>/guest/x86_64-unknown-linux-gnu/release/microvm-agent`. glibc with `+crt-static`
//! (see ../shared/TESTBED.md); a separate target directory, because the static RUSTFLAGS would
//! otherwise invalidate every host build.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::util::{run, workspace_root};

pub const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Builds the agent (incrementally) and returns its path.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "guest-agent",
            "--target",
            GUEST_TRIPLE,
        ])
        .arg("--target-dir")
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .current_dir(&root))?;
    Ok(target.join(GUEST_TRIPLE).join("release/microvm-agent"))
}
