//! `cargo xtask virtiofsd`: builds the virtio-fs daemon (the `virtiofsd` crate, the real
//! vhost-user virtio-fs daemon) into `<cache>/virtiofsd-<version>/bin/virtiofsd`, where
//! `sandbox::locate::virtiofsd` finds it. Cached outside the checkout by version, like the
//! kernel: a second call only checks that the binary is there.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{cache_dir, ensure_debs, run};

/// Keep equal to `sandbox::locate::VIRTIOFSD_VERSION` and to the `virtiofsd` of `fuzz/Cargo.toml`.
pub const VERSION: &str = "1.14.0";

/// Debian packages virtiofsd links against (seccomp filter, capability dropping).
pub const BUILD_DEBS: &[&str] = &["libseccomp-dev", "libcap-ng-dev"];

/// Builds virtiofsd if the cache lacks it and returns the binary's path.
pub fn build() -> Result<PathBuf> {
    let cache = cache_dir();
    let root = cache.join(format!("virtiofsd-{VERSION}"));
    let bin = root.join("bin/virtiofsd");
    if bin.is_file() {
        return Ok(bin);
    }
    ensure_debs(BUILD_DEBS)?;
    std::fs::create_dir_all(&cache)?;
    // Installed into a private folder and renamed into place whole: an interrupted build never
    // leaves a half result where the lookup would find it.
    let tmp = cache.join(format!("tmp-virtiofsd-{VERSION}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("xtask: building virtiofsd {VERSION} (cargo install, a few minutes on 2 cores)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "install",
            "--locked",
            "--quiet",
            "virtiofsd",
            "--version",
            VERSION,
        ])
        .arg("--root")
        .arg(&tmp)
        .arg("--target-dir")
        .arg(cache.join("virtiofsd-build"))
        .env_remove("CARGO_TARGET_DIR"))?;
    std::fs::rename(&tmp, &root)
        .with_context(|| format!("move {} to {}", tmp.display(), root.display()))?;
    let _ = std::fs::remove_dir_all(cache.join("virtiofsd-build"));
    Ok(bin)
}
