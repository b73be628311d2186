//! Where the sandbox's host-side artifacts are found when nobody names them: the guest
//! kernel, the static guest agent, the VMM binary (`microvm-vmm`) and virtiofsd (volumes).
//! `microvm run` and the containerd shim both use these, so a user who ran `cargo xtask kernel`
//! and `cargo build` needs no flags.
//!
//! Each function returns the first candidate that is a file, or an error listing every place
//! it looked (so the user sees what to build or which variable to set).

use std::path::{Path, PathBuf};

/// The places a lookup tried, for the error message.
#[derive(Debug, thiserror::Error)]
#[error("{what} not found; looked at: {}. {hint}", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct NotFound {
    pub what: &'static str,
    pub tried: Vec<PathBuf>,
    pub hint: &'static str,
}

fn first_file(
    what: &'static str,
    hint: &'static str,
    candidates: Vec<PathBuf>,
) -> Result<PathBuf, NotFound> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(NotFound {
            what,
            tried: candidates,
            hint,
        }),
    }
}

/// The microvm cache directory (`$MICROVM_CACHE`, else `$XDG_CACHE_HOME/microvm`, else
/// `~/.cache/microvm`), where `cargo xtask kernel` puts the guest kernel.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICROVM_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("microvm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/microvm")
}

/// The guest kernel: `$MICROVM_KERNEL`; the kernel `cargo xtask kernel` last built or found
/// (`<cache>/kernel/current/vmlinux`, also under `/var/cache/microvm`); an installed
/// `/usr/local/share/microvm/vmlinux` or `/usr/share/microvm/vmlinux`.
pub fn kernel() -> Result<PathBuf, NotFound> {
    if let Some(p) = std::env::var_os("MICROVM_KERNEL") {
        return first_file(
            "the guest kernel",
            "MICROVM_KERNEL names a missing file",
            vec![p.into()],
        );
    }
    let mut candidates = vec![cache_dir().join("kernel/current/vmlinux")];
    let system_cache = Path::new("/var/cache/microvm/kernel/current/vmlinux");
    if !candidates.iter().any(|c| c == system_cache) {
        candidates.push(system_cache.into());
    }
    candidates.push("/usr/local/share/microvm/vmlinux".into());
    candidates.push("/usr/share/microvm/vmlinux".into());
    first_file(
        "the guest kernel",
        "Build it with `cargo xtask kernel`, set MICROVM_KERNEL, or pass --kernel",
        candidates,
    )
}

/// The target directory and profile an executable under `<target>/<profile>/` was built in.
fn target_of(exe: &Path) -> Option<(PathBuf, String)> {
    let mut dir = exe.parent()?;
    // Test binaries live one level deeper, in `<target>/<profile>/deps/`.
    if dir.file_name()? == "deps" {
        dir = dir.parent()?;
    }
    let profile = dir.file_name()?.to_string_lossy().into_owned();
    Some((dir.parent()?.to_path_buf(), profile))
}

/// The static guest agent: `$MICROVM_AGENT`; `microvm-agent` next to the running executable;
/// the static build in the same cargo target directory
/// (`<target>/guest/x86_64-unknown-linux-gnu/release/microvm-agent`, what `cargo xtask agent`
/// and the guest tests build); an installed `/usr/local/lib/microvm/microvm-agent` or
/// `/usr/lib/microvm/microvm-agent`.
pub fn agent() -> Result<PathBuf, NotFound> {
    if let Some(p) = std::env::var_os("MICROVM_AGENT") {
        return first_file(
            "the guest agent",
            "MICROVM_AGENT names a missing file",
            vec![p.into()],
        );
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("microvm-agent"));
        }
        if let Some((target, _)) = target_of(&exe) {
            candidates.push(target.join("guest/x86_64-unknown-linux-gnu/release/microvm-agent"));
        }
    }
    candidates.push("/usr/local/lib/microvm/microvm-agent".into());
    candidates.push("/usr/lib/microvm/microvm-agent".into());
    first_file(
        "the static guest agent",
        "Build it with `cargo xtask agent`, set MICROVM_AGENT, or pass --agent",
        candidates,
    )
}

/// The VMM binary's file name.
pub const VMM_BINARY: &str = "microvm-vmm";

/// The VMM binary, `microvm-vmm`: `$MICROVM_VMM`; `microvm-vmm` next to the running executable
/// (`microvm`, the shim), or in the profile directory of its cargo target directory (test
/// binaries live in `deps/` below it); then `$PATH`.
pub fn vmm() -> Result<PathBuf, NotFound> {
    if let Some(p) = std::env::var_os("MICROVM_VMM") {
        return first_file(
            "the VMM (microvm-vmm)",
            "MICROVM_VMM names a missing file",
            vec![p.into()],
        );
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(VMM_BINARY));
        }
        if let Some((target, profile)) = target_of(&exe) {
            let beside_profile = target.join(profile).join(VMM_BINARY);
            if !candidates.contains(&beside_profile) {
                candidates.push(beside_profile);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(VMM_BINARY)));
    }
    first_file(
        "the VMM (microvm-vmm)",
        "Build it with `cargo build -p microvm-vmm` (next to microvm) or set MICROVM_VMM",
        candidates,
    )
}

/// The virtiofsd version `cargo xtask virtiofsd` builds into the cache.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

/// The virtio-fs daemon: `$MICROVM_VIRTIOFSD`; `virtiofsd` next to the running executable; the
/// one `cargo xtask virtiofsd` built (`<cache>/virtiofsd-<version>/bin/virtiofsd`, also under
/// `/var/cache/microvm`); an installed `/usr/local/lib/microvm/virtiofsd`,
/// `/usr/lib/microvm/virtiofsd` or Debian's `/usr/libexec/virtiofsd`.
pub fn virtiofsd() -> Result<PathBuf, NotFound> {
    if let Some(p) = std::env::var_os("MICROVM_VIRTIOFSD") {
        return first_file(
            "virtiofsd",
            "MICROVM_VIRTIOFSD names a missing file",
            vec![p.into()],
        );
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("virtiofsd"));
    }
    let cached = format!("virtiofsd-{VIRTIOFSD_VERSION}/bin/virtiofsd");
    candidates.push(cache_dir().join(&cached));
    let system_cache = Path::new("/var/cache/microvm").join(&cached);
    if !candidates.contains(&system_cache) {
        candidates.push(system_cache);
    }
    candidates.push("/usr/local/lib/microvm/virtiofsd".into());
    candidates.push("/usr/lib/microvm/virtiofsd".into());
    candidates.push("/usr/libexec/virtiofsd".into());
    first_file(
        "virtiofsd (the virtio-fs daemon, needed for volumes)",
        "Build it with `cargo xtask virtiofsd` or set MICROVM_VIRTIOFSD",
        candidates,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_of_finds_profile_for_binaries_and_test_binaries() {
        assert_eq!(
            target_of(Path::new("/w/target/debug/microvm")),
            Some((PathBuf::from("/w/target"), "debug".into()))
        );
        assert_eq!(
            target_of(Path::new("/w/target/release/deps/guest-abc")),
            Some((PathBuf::from("/w/target"), "release".into()))
        );
    }

    #[test]
    fn not_found_lists_every_candidate_and_the_hint() {
        let err = first_file(
            "the thing",
            "Build it.",
            vec!["/nonexistent/a".into(), "/nonexistent/b".into()],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/a") && msg.contains("/nonexistent/b"),
            "{msg}"
        );
        assert!(
            msg.starts_with("the thing not found") && msg.ends_with("Build it."),
            "{msg}"
        );
    }

    #[test]
    fn first_file_skips_missing_candidates_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, b"x").unwrap();
        let got = first_file(
            "k",
            "",
            vec![
                dir.path().join("missing"),
                dir.path().to_path_buf(),
                file.clone(),
            ],
        )
        .unwrap();
        assert_eq!(got, file);
    }
}
