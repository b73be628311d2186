//! The jail's steps that PID 1 applies to itself, each one small and named for what it does.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use caps::CapSet;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, setgroups, setresgid, setresuid, Gid, Uid};

use crate::{JailError, Result};

/// Where the new root is assembled before `pivot_root`: any directory that exists will do,
/// because the tmpfs is mounted over it only inside the jail's private mount namespace and the
/// visible directories are opened before it hides anything.
pub const STAGING: &str = "/tmp";

/// The new root: small, and with nothing that can hold a device node, a set-id or executable
/// file.
const ROOT_TMPFS_OPTIONS: &str = "size=64k,nr_inodes=256,mode=0755";

fn hardened() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// New mount, IPC and UTS namespaces, and a network namespace when `network` (a VM without net
/// devices needs none of the host's interfaces).
pub fn unshare_namespaces(network: bool) -> Result<()> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(JailError::sys(format!("unshare({flags:?})")))
}

/// Every mount in the new namespace private: nothing mounted or unmounted from here on
/// propagates to the host's namespace.
pub fn make_mounts_private() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(JailError::sys("make / private (MS_REC|MS_PRIVATE)"))
}

/// Mounts a fresh tmpfs on [`STAGING`] and binds each of `visible` (absolute directories)
/// read-only at its own path in it. Returns the new root's path.
pub fn build_root(visible: &[PathBuf]) -> Result<PathBuf> {
    // Opened before the tmpfs hides anything (a directory under /tmp would vanish), then bound
    // through the descriptor: the path is resolved once.
    let mut sources = Vec::with_capacity(visible.len());
    for dir in visible {
        let relative = relative_to_root(dir)?;
        let fd = open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(JailError::sys(format!("open {}", dir.display())))?;
        sources.push((fd, relative));
    }
    let root = PathBuf::from(STAGING);
    mount(
        Some("microvm-jail"),
        &root,
        Some("tmpfs"),
        hardened(),
        Some(ROOT_TMPFS_OPTIONS),
    )
    .map_err(JailError::sys(format!("mount a tmpfs on {STAGING}")))?;
    for (fd, relative) in &sources {
        let target = root.join(relative);
        fs::create_dir_all(&target)
            .map_err(JailError::io(format!("create {}", target.display())))?;
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(
            Some(source.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(JailError::sys(format!(
            "bind /{} into the root",
            relative.display()
        )))?;
        remount_read_only(&target)?;
    }
    Ok(root)
}

/// `dir` without its leading `/`; only plain components (no `..`), so it stays in the root.
fn relative_to_root(dir: &Path) -> Result<PathBuf> {
    let relative = dir
        .strip_prefix("/")
        .map_err(|_| JailError::Invalid(format!("{} is not absolute", dir.display())))?;
    if relative.as_os_str().is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(JailError::Invalid(format!(
            "{} must name a directory below / without . or ..",
            dir.display()
        )));
    }
    Ok(relative.to_path_buf())
}

fn remount_read_only(target: &Path) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened(),
        None::<&str>,
    )
    .map_err(JailError::sys(format!(
        "remount {} read-only",
        target.display()
    )))
}

/// Makes `new_root` the root and detaches the old one entirely (runc's `pivot_root(".", ".")`:
/// no directory for the old root is needed), then makes the new root read-only.
pub fn pivot_root(new_root: &Path) -> Result<()> {
    chdir(new_root).map_err(JailError::sys(format!("chdir {}", new_root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(JailError::sys("pivot_root(\".\", \".\")"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(JailError::sys("detach the old root"))?;
    chdir("/").map_err(JailError::sys("chdir /"))?;
    remount_read_only(Path::new("/"))
}

/// Empties the capability bounding, ambient and inheritable sets (the bounding set needs
/// CAP_SETPCAP, so this comes before the identity changes).
pub fn drop_capability_bounds() -> Result<()> {
    for (set, step) in [
        (CapSet::Ambient, "clear the ambient capabilities"),
        (CapSet::Bounding, "clear the capability bounding set"),
        (CapSet::Inheritable, "clear the inheritable capabilities"),
    ] {
        caps::clear(None, set).map_err(|source| JailError::Caps { step, source })?;
    }
    Ok(())
}

/// No supplementary groups, then `gid` and `uid` as real, effective and saved ids (the kernel
/// then empties the effective and permitted capabilities).
pub fn drop_identity(uid: Uid, gid: Gid) -> Result<()> {
    setgroups(&[]).map_err(JailError::sys("setgroups([])"))?;
    setresgid(gid, gid, gid).map_err(JailError::sys(format!("setresgid({gid})")))?;
    setresuid(uid, uid, uid).map_err(JailError::sys(format!("setresuid({uid})")))
}

/// Empties the effective and permitted capability sets (already empty after
/// [`drop_identity`] from root; this makes it so whatever the starting point was).
pub fn clear_capabilities() -> Result<()> {
    for (set, step) in [
        (CapSet::Effective, "clear the effective capabilities"),
        (CapSet::Permitted, "clear the permitted capabilities"),
    ] {
        caps::clear(None, set).map_err(|source| JailError::Caps { step, source })?;
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: no execve can grant a privilege again (and seccomp filters may be
/// installed without CAP_SYS_ADMIN).
pub fn set_no_new_privs() -> Result<()> {
    nix::sys::prctl::set_no_new_privs().map_err(JailError::sys("prctl(PR_SET_NO_NEW_PRIVS)"))
}
