//! The child's file system steps, carrying out a [`RootfsPlan`]: before `pivot_root`, the spec's
//! mounts, `/dev` nodes and links, the cwd, read-only and masked paths, all under the root;
//! then `pivot_root`; then the read-only root and shared propagation.
//!
//! Every path under the root comes from the image or the spec (both hostile) and goes through
//! [`RootDir`] (`resolve.rs`): resolved by `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! to an fd, then used as that fd (`/proc/self/fd/N` as a mount target, `*at` calls below a
//! resolved parent). The `/proc/self/fd` paths are the agent's `/proc`, which is why all of
//! this happens before `pivot_root` (a container need not mount `/proc`).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, umask, Mode};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, chroot, fchdir, pivot_root};
use rustix::fs::{AtFlags, FileType};

use crate::child::{ChildError, StepResult};
use crate::mounts::{DevicePlan, MountKind, MountPlan, RootfsPlan};
use crate::resolve::{create_in, exists_in, fd_path, RootDir};

/// Directories made under the root (mount points, parents of nodes, the cwd): 0755 as runc
/// makes them (the child's umask is 0 here).
const DIR_MODE: u32 = 0o755;

fn sys(step: &'static str) -> impl Fn(String, Errno) -> ChildError {
    move |what, e| ChildError::errno(step, what, e)
}

fn rustix_errno(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// Child, before `pivot_root`: propagation, the root as a mount point, the spec's mounts,
/// `/dev` nodes and links, the cwd, read-only and masked paths. The umask is 0 here so nodes
/// get exactly their spec mode.
pub(crate) fn prepare_rootfs(rootfs: &Path, plan: &RootfsPlan, cwd: &Path) -> StepResult {
    umask(Mode::empty());
    let err = sys("rootfs");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        plan.propagation,
        None::<&str>,
    )
    .map_err(|e| err(format!("making / {:?}", plan.propagation), e))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        err(
            format!("bind-mounting the root {} onto itself", rootfs.display()),
            e,
        )
    })?;
    // Opened after that bind: an fd on the mount beneath it would put every later mount
    // where `pivot_root` no longer sees it.
    let root = RootDir::open(rootfs)
        .map_err(|e| err(format!("opening the root {}", rootfs.display()), e))?;
    for m in &plan.mounts {
        mount_one(&root, m)?;
    }
    for d in &plan.devices {
        create_device(&root, d)?;
    }
    dev_links(&root, plan.has_devpts)?;
    // Before the root may become read-only, as runc does.
    root.mkdir_all(cwd, DIR_MODE)
        .map_err(|e| ChildError::errno("cwd", format!("creating cwd {}", cwd.display()), e))?;
    for p in &plan.readonly_paths {
        readonly_path(&root, p)?;
    }
    for p in &plan.masked_paths {
        mask_path(&root, p)?;
    }
    Ok(())
}

/// Mounts one spec entry at its destination, resolved inside the root.
fn mount_one(root: &RootDir, m: &MountPlan) -> StepResult {
    let step = "mount";
    let shown = m.destination.display();
    let err = |what: &str, e: Errno| ChildError::errno(step, format!("{shown}: {what}"), e);
    let data = (!m.options.data.is_empty()).then(|| m.options.data.join(","));
    let source = m.source.as_deref().unwrap_or(Path::new(""));
    let target = match &m.kind {
        MountKind::Bind { .. } => {
            let meta = fs::metadata(source).map_err(|e| {
                ChildError::io(
                    step,
                    format!("{shown}: bind source {}", source.display()),
                    e,
                )
            })?;
            if meta.is_dir() {
                root.mkdir_all(&m.destination, DIR_MODE)
            } else {
                root.create_file(&m.destination, 0o644)
            }
        }
        MountKind::Cgroup2 | MountKind::Fs(_) => root.mkdir_all(&m.destination, DIR_MODE),
    }
    .map_err(|e| err("creating the mount point inside the root", e))?;
    let target = fd_path(&target);
    match &m.kind {
        MountKind::Bind { recursive } => {
            let rec = if *recursive {
                MsFlags::MS_REC
            } else {
                MsFlags::empty()
            };
            mount(
                Some(source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | rec,
                None::<&str>,
            )
            .map_err(|e| err(&format!("bind from {}", source.display()), e))?;
            let extra = m.options.flags - MsFlags::MS_REMOUNT;
            if !extra.is_empty() {
                let top = mounted_at(root, &m.destination).map_err(|e| err("reopening", e))?;
                mount(
                    None::<&str>,
                    &fd_path(&top),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                    None::<&str>,
                )
                .map_err(|e| err(&format!("remounting the bind with {extra:?}"), e))?;
            }
        }
        MountKind::Cgroup2 => {
            mount(
                Some("cgroup2"),
                &target,
                Some("cgroup2"),
                m.options.flags,
                data.as_deref(),
            )
            .map_err(|e| err("mounting cgroup2", e))?;
        }
        MountKind::Fs(fstype) => {
            let source = m.source.clone().unwrap_or_else(|| fstype.into());
            mount(
                Some(&source),
                &target,
                Some(fstype.as_str()),
                m.options.flags,
                data.as_deref(),
            )
            .map_err(|e| {
                err(
                    &format!("mounting {fstype} with {:?} {data:?}", m.options.flags),
                    e,
                )
            })?;
        }
    }
    if !m.options.propagation.is_empty() {
        let top = mounted_at(root, &m.destination).map_err(|e| err("reopening", e))?;
        for p in &m.options.propagation {
            mount(None::<&str>, &fd_path(&top), None::<&str>, *p, None::<&str>)
                .map_err(|e| err(&format!("propagation {p:?}"), e))?;
        }
    }
    Ok(())
}

/// The mount just made at `path`: resolved again, since the fd of the mount point refers to
/// the directory beneath the new mount (remounts and propagation changes act on the mount
/// that a path's last step lands on).
fn mounted_at(root: &RootDir, path: &Path) -> Result<OwnedFd, Errno> {
    root.resolve(path)
}

/// Creates a device node (or, where `mknod` is not allowed, bind-mounts the agent's node).
/// An existing file at the path is left alone.
fn create_device(root: &RootDir, d: &DevicePlan) -> StepResult {
    let step = "devices";
    let shown = d.path.display();
    let (parent, name) = root
        .parent_of(&d.path, DIR_MODE)
        .map_err(|e| ChildError::errno(step, format!("{shown}: resolving its directory"), e))?;
    if exists_in(&parent, &name).map_err(|e| ChildError::errno(step, &shown, e))? {
        return Ok(());
    }
    match rustix::fs::mknodat(
        &parent,
        &name,
        FileType::from_raw_mode(d.kind.bits()),
        rustix::fs::Mode::from_raw_mode(d.mode),
        makedev(d.major, d.minor),
    )
    .map_err(rustix_errno)
    {
        Ok(()) => {}
        // Made since the check: left alone like any existing file.
        Err(Errno::EEXIST) => return Ok(()),
        Err(Errno::EPERM) => {
            let target = create_in(&parent, &name, 0o644).map_err(|e| {
                ChildError::errno(step, format!("{shown}: creating a bind target"), e)
            })?;
            mount(
                Some(&d.path),
                &fd_path(&target),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                ChildError::errno(step, format!("{shown}: mknod not permitted, bind"), e)
            })?;
            return Ok(());
        }
        Err(e) => return Err(ChildError::errno(step, format!("mknod {shown}"), e)),
    }
    rustix::fs::chownat(
        &parent,
        &name,
        Some(rustix::fs::Uid::from_raw(d.uid)),
        Some(rustix::fs::Gid::from_raw(d.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ChildError::errno(step, format!("chown {shown}"), rustix_errno(e)))
}

/// The standard `/dev` links: fd, stdin/stdout/stderr, and ptmx into the container's devpts.
/// An existing entry of that name is left alone; a root without `/dev` gets none.
fn dev_links(root: &RootDir, has_devpts: bool) -> StepResult {
    let step = "devices";
    let dev = match root.resolve_dir(Path::new("/dev")) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(ChildError::errno(step, "resolving /dev", e)),
    };
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    if has_devpts {
        links.push(("pts/ptmx", "ptmx"));
    }
    for (target, name) in links {
        match rustix::fs::symlinkat(target, &dev, name).map_err(rustix_errno) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(ChildError::errno(
                    step,
                    format!("symlink /dev/{name} -> {target}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// `p` resolved inside the root, or `None` when it does not exist: missing read-only and
/// masked paths are skipped, as runc does.
fn existing(root: &RootDir, p: &Path) -> Result<Option<OwnedFd>, Errno> {
    match root.resolve(p) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A read-only bind of the path onto itself (missing paths are skipped, as runc does).
fn readonly_path(root: &RootDir, p: &Path) -> StepResult {
    let err =
        |what: &str, e| ChildError::errno("readonly paths", format!("{}: {what}", p.display()), e);
    let Some(resolved) = existing(root, p).map_err(|e| err("resolving", e))? else {
        return Ok(());
    };
    let target = fd_path(&resolved);
    mount(
        Some(&target),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("bind", e))?;
    let top = mounted_at(root, p).map_err(|e| err("reopening", e))?;
    remount_readonly(&fd_path(&top)).map_err(|e| err("remount read-only", e))
}

/// Hides a path: an empty read-only tmpfs over a directory, `/dev/null` over anything else
/// (missing paths are skipped).
fn mask_path(root: &RootDir, p: &Path) -> StepResult {
    let err =
        |what: &str, e| ChildError::errno("masked paths", format!("{}: {what}", p.display()), e);
    let Some(target) = existing(root, p).map_err(|e| err("resolving", e))? else {
        return Ok(());
    };
    let is_dir = rustix::fs::fstat(&target)
        .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        .map_err(|e| err("fstat", rustix_errno(e)))?;
    if is_dir {
        mount(
            Some("tmpfs"),
            &fd_path(&target),
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| err("mounting an empty tmpfs", e))
    } else {
        mount(
            Some("/dev/null"),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| err("binding /dev/null", e))
    }
}

/// Remounts a mount point read-only, keeping its nosuid/nodev/noexec/atime flags.
fn remount_readonly(p: &Path) -> Result<(), Errno> {
    let current = statvfs(p)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
}

/// Makes the prepared root the process's `/`: `pivot_root(".", ".")` and a lazy unmount of
/// the old root, which then is unreachable. When the agent's own root is the initramfs
/// (`pivot_root` says EINVAL), the root is moved over `/` and `chroot`ed into instead, as
/// `switch_root` does.
pub(crate) fn pivot_into(rootfs: &Path) -> StepResult {
    let err = sys("pivot_root");
    chdir(rootfs).map_err(|e| err(format!("chdir {}", rootfs.display()), e))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            mount(
                None::<&str>,
                ".",
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err("making the old root rslave".into(), e))?;
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| err("detaching the old root".into(), e))?;
        }
        Err(Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| err("moving the root over / (initramfs fallback)".into(), e))?;
            chroot(".").map_err(|e| err("chroot (initramfs fallback)".into(), e))?;
        }
        Err(e) => return Err(err(format!("pivot_root {}", rootfs.display()), e)),
    }
    chdir("/").map_err(|e| err("chdir /".into(), e))
}

/// Child of `exec`, after entering the mount namespace: `setns` puts the process at the
/// namespace's root mount, which is not the container's root when the agent itself runs
/// chrooted or from the initramfs; so it changes into the init's root, like the init.
pub(crate) fn enter_root(root: &OwnedFd) -> StepResult {
    let err = sys("enter root");
    fchdir(root.as_raw_fd()).map_err(|e| err("fchdir to the init's root".into(), e))?;
    chroot(".").map_err(|e| err("chroot to the init's root".into(), e))?;
    chdir("/").map_err(|e| err("chdir /".into(), e))
}

/// Child, after `pivot_root`: the read-only root, then shared propagation if asked for.
pub(crate) fn finish_rootfs(plan: &RootfsPlan) -> StepResult {
    if plan.readonly_root {
        remount_readonly(Path::new("/"))
            .map_err(|e| ChildError::errno("readonly root", "remounting / read-only", e))?;
    }
    if plan.shared_after_pivot {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| ChildError::errno("rootfs", "making / rshared", e))?;
    }
    Ok(())
}
