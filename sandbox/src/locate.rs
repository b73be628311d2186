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
#[error("{what} not found; looked at: {}.{} {hint}", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), skipped_text(.skipped))]
pub struct NotFound {
    pub what: &'static str,
    pub tried: Vec<PathBuf>,
    /// Files that were there but could not serve (why, one each).
    pub skipped: Vec<String>,
    pub hint: &'static str,
}

fn skipped_text(skipped: &[String]) -> String {
    skipped.iter().map(|s| format!(" Skipped: {s}.")).collect()
}

fn first_file(
    what: &'static str,
    hint: &'static str,
    candidates: Vec<PathBuf>,
) -> Result<PathBuf, NotFound> {
    first_fit(what, hint, candidates, |_| Ok(()))
}

/// The first candidate that is a file and that `fits`; the others that are files are listed
/// with `fits`'s reason in the error.
fn first_fit(
    what: &'static str,
    hint: &'static str,
    candidates: Vec<PathBuf>,
    fits: impl Fn(&Path) -> Result<(), String>,
) -> Result<PathBuf, NotFound> {
    let mut skipped = Vec::new();
    for p in candidates.iter().filter(|p| p.is_file()) {
        match fits(p) {
            Ok(()) => return Ok(p.clone()),
            Err(why) => skipped.push(why),
        }
    }
    Err(NotFound {
        what,
        tried: candidates,
        skipped,
        hint,
    })
}

/// Why a file cannot be the guest agent, which runs as the guest's init from an initramfs that
/// holds nothing else: no dynamic loader, no libraries.
#[derive(Debug, thiserror::Error)]
pub enum UnfitAgent {
    #[error("cannot read the guest agent {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent {path} is not an ELF executable: {reason}")]
    NotElf { path: PathBuf, reason: String },
    #[error(
        "the guest agent {path} is dynamically linked ({why}); the guest has no loader or \
         libraries, so it cannot run as init: use the static agent (`cargo xtask agent`)"
    )]
    Dynamic { path: PathBuf, why: String },
}

/// Checks that `path` is a statically linked ELF executable (static-pie included): no program
/// interpreter (`PT_INTERP`) and no needed libraries (`DT_NEEDED`).
pub fn check_static_agent(path: &Path) -> Result<(), UnfitAgent> {
    let bytes = std::fs::read(path).map_err(|source| UnfitAgent::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| UnfitAgent::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let why = match (elf.interpreter, elf.libraries.as_slice()) {
        (Some(interp), _) => format!("program interpreter {interp}"),
        (None, []) => return Ok(()),
        (None, libs) => format!("needs {}", libs.join(", ")),
    };
    Err(UnfitAgent::Dynamic {
        path: path.to_path_buf(),
        why,
    })
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

/// The static guest agent (each candidate only when statically linked, see
/// [`check_static_agent`]): `$MICROVM_AGENT`; `microvm-agent` next to the running executable;
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
    // A plain `cargo build` leaves a dynamically linked `microvm-agent` next to `microvm`:
    // skipped (and named in the error), so the static build further down is found.
    first_fit(
        "the static guest agent",
        "Build it with `cargo xtask agent`, set MICROVM_AGENT, or pass --agent",
        candidates,
        |p| check_static_agent(p).map_err(|e| e.to_string()),
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
pub(crate) mod tests {
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

    /// A minimal ELF64 executable: one PT_LOAD, and a PT_INTERP naming `interp` if given.
    pub(crate) fn tiny_elf(interp: Option<&str>) -> Vec<u8> {
        let phnum: u16 = if interp.is_some() { 2 } else { 1 };
        let data_at = 64 + 56 * u64::from(phnum);
        let mut b = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        b.extend(2u16.to_le_bytes()); // ET_EXEC
        b.extend(0x3eu16.to_le_bytes()); // x86-64
        b.extend(1u32.to_le_bytes());
        b.extend(0x40_0000u64.to_le_bytes()); // entry
        b.extend(64u64.to_le_bytes()); // program headers right after this header
        b.extend(0u64.to_le_bytes()); // no section headers
        b.extend(0u32.to_le_bytes());
        for half in [64u16, 56, phnum, 64, 0, 0] {
            b.extend(half.to_le_bytes());
        }
        let text = interp.map(|i| format!("{i}\0")).unwrap_or_default();
        let total = data_at + text.len() as u64;
        let mut phdr = |typ: u32, offset: u64, size: u64| {
            b.extend(typ.to_le_bytes());
            b.extend(4u32.to_le_bytes()); // PF_R
            for word in [
                offset,
                0x40_0000 + offset,
                0x40_0000 + offset,
                size,
                size,
                0x1000,
            ] {
                b.extend(word.to_le_bytes());
            }
        };
        phdr(1, 0, total); // PT_LOAD
        if interp.is_some() {
            phdr(3, data_at, text.len() as u64); // PT_INTERP
        }
        b.extend(text.as_bytes());
        b
    }

    #[test]
    fn a_static_agent_passes_and_a_dynamic_one_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let fine = dir.path().join("static");
        std::fs::write(&fine, tiny_elf(None)).unwrap();
        check_static_agent(&fine).unwrap();

        let dynamic = dir.path().join("dynamic");
        std::fs::write(&dynamic, tiny_elf(Some("/lib64/ld-linux-x86-64.so.2"))).unwrap();
        let msg = check_static_agent(&dynamic).unwrap_err().to_string();
        assert!(
            msg.contains("dynamically linked")
                && msg.contains("/lib64/ld-linux-x86-64.so.2")
                && msg.contains("cargo xtask agent")
                && !msg.contains('\n'),
            "{msg}"
        );

        // This test binary is a real dynamically linked executable (glibc, no crt-static).
        let me = std::env::current_exe().unwrap();
        let msg = check_static_agent(&me).unwrap_err().to_string();
        assert!(msg.contains("dynamically linked"), "{msg}");

        let text = dir.path().join("script");
        std::fs::write(&text, b"#!/bin/sh\n").unwrap();
        let msg = check_static_agent(&text).unwrap_err().to_string();
        assert!(msg.contains("not an ELF executable"), "{msg}");
    }

    #[test]
    fn the_lookup_skips_a_dynamic_agent_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let dynamic = dir.path().join("next-to-microvm");
        std::fs::write(&dynamic, tiny_elf(Some("/lib/ld.so"))).unwrap();
        let fine = dir.path().join("static-build");
        std::fs::write(&fine, tiny_elf(None)).unwrap();
        let fits = |p: &Path| check_static_agent(p).map_err(|e| e.to_string());
        let got = first_fit("agent", "", vec![dynamic.clone(), fine.clone()], fits).unwrap();
        assert_eq!(got, fine);
        let err = first_fit("agent", "Build it.", vec![dynamic.clone()], fits).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("Skipped: the guest agent") && msg.contains("/lib/ld.so"),
            "{msg}"
        );
    }
}
