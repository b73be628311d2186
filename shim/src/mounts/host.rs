//! The host half of pod volumes: a spec's bind source resolved without following any symbolic
//! link, and cloned (never moved, never mounted over) onto an entry of the pod's share root.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use super::MountError;

/// What a bind source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
}

/// A bind source, opened (`O_PATH`) where the spec named it.
#[derive(Debug)]
pub struct Source {
    /// As the spec wrote it (for messages).
    pub path: String,
    fd: OwnedFd,
    pub kind: Kind,
}

/// Opens `path` as a bind source: absolute, without `..`, every component a real directory
/// (no symbolic link anywhere, `/proc` magic links included), ending at a directory or a
/// regular file. The spec is the pod author's: a symbolic link in a source could lead root's
/// bind anywhere on the host, so none is followed; the real path must be named.
pub fn open_source(path: &str) -> Result<Source, MountError> {
    let err = |why: String| MountError::Source {
        path: path.to_string(),
        why,
    };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(err("is not an absolute path".into()));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(err("contains `..`".into()));
    }
    let fd = rustix::fs::openat2(
        CWD,
        p,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| {
        err(match e {
            Errno::NOENT => "does not exist".into(),
            Errno::LOOP => "passes through a symbolic link: bind sources are resolved without \
                            following links (a pod spec could point one anywhere on the host); \
                            name the real path"
                .into(),
            e => format!("cannot be opened: {e}"),
        })
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| err(format!("stat: {e}")))?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Kind::Directory,
        FileType::RegularFile => Kind::File,
        other => {
            return Err(err(format!(
                "is a {other:?}: only directories and regular files can be shared into a \
                 microVM (virtio-fs)"
            )))
        }
    };
    Ok(Source {
        path: path.to_string(),
        fd,
        kind,
    })
}

/// How a source is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttachOptions {
    pub read_only: bool,
    /// `rbind`: the source's submounts come along.
    pub recursive: bool,
    /// Host mounts made later under the source reach the entry (`rslave`/`rshared`: the
    /// host-to-container half of Kubernetes' mount propagation).
    pub receive: bool,
}

/// Makes the pod's share root `root`: an empty directory, 0755 (virtiofsd reads it without
/// privileges over root's files), bind-mounted onto itself as a shared mount of a peer group of
/// its own, so that what is attached under it propagates to virtiofsd's namespace (its slave)
/// and nowhere else. A root left by an earlier VM of the pod is detached first.
pub fn make_share_root(root: &Path) -> Result<(), MountError> {
    let io = |what: &str| {
        let what = format!("{what} {}", root.display());
        move |e: std::io::Error| MountError::Host(what, e)
    };
    detach_tree(root).map_err(io("detach"))?;
    if mounted(root, true) {
        return Err(io("something is still mounted beneath")(
            std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        ));
    }
    if root.exists() {
        fs::remove_dir_all(root).map_err(io("remove"))?;
    }
    fs::DirBuilder::new()
        .mode(0o755)
        .create(root)
        .map_err(io("create"))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io("chmod"))?;
    rustix::mount::mount_bind(root, root)
        .and_then(|()| rustix::mount::mount_change(root, MountPropagationFlags::PRIVATE))
        .and_then(|()| rustix::mount::mount_change(root, MountPropagationFlags::SHARED))
        .map_err(|e| io("make a shared bind mount of")(e.into()))
}

/// Clones `source` onto the new entry `entry` (a directory or file created here, under the
/// share root): the clone is made read-only, nosuid and nodev while still detached (a remount
/// after attaching would not reach virtiofsd's copy), then attached.
pub fn attach(source: &Source, entry: &Path, o: AttachOptions) -> Result<(), MountError> {
    let fail = |what: &str, e: std::io::Error| {
        MountError::Host(
            format!("{what} for {} on {}", source.path, entry.display()),
            e,
        )
    };
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if o.recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(&source.fd, "", flags)
        .map_err(|e| fail("clone the mount", e.into()))?;
    set_attributes(&tree, o).map_err(|e| fail("set the clone's attributes", e))?;
    match source.kind {
        Kind::Directory => fs::DirBuilder::new().mode(0o755).create(entry),
        Kind::File => fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(entry)
            .map(drop),
    }
    .map_err(|e| fail("create the mount point", e))?;
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        CWD,
        entry,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| {
        let _ = remove_entry(entry);
        fail("attach the clone", e.into())
    })
}

/// `mount_setattr(2)` (rustix has no wrapper) on a detached tree.
fn set_attributes(tree: &OwnedFd, o: AttachOptions) -> std::io::Result<()> {
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if o.read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: if o.receive {
            libc::MS_SLAVE
        } else {
            libc::MS_PRIVATE
        },
        userns_fd: 0,
    };
    let mut at = libc::AT_EMPTY_PATH as libc::c_uint;
    if o.recursive {
        at |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: mount_setattr with a valid fd, an empty NUL-terminated path and a mount_attr of
    // the size passed; it writes nothing back.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches what is mounted on `entry` (the clone and anything under it) and removes the
/// mount point. Never acts outside the share root: entries are made by [`attach`] only.
pub fn remove_entry(entry: &Path) -> std::io::Result<()> {
    detach_tree(entry)?;
    match fs::symlink_metadata(entry) {
        Ok(m) if m.is_dir() => fs::remove_dir(entry),
        Ok(_) => fs::remove_file(entry),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Lazily detaches every mount stacked on `path` (with everything beneath them).
pub fn detach_tree(path: &Path) -> std::io::Result<()> {
    while is_mount_point(path) {
        rustix::mount::unmount(path, UnmountFlags::DETACH)?;
    }
    Ok(())
}

/// Whether something is mounted on `path`, or anywhere beneath it when `beneath`.
pub fn mounted(path: &Path, beneath: bool) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(crate::rootfs::unescape_mountinfo(p)))
        .any(|p| p == path || (beneath && p.starts_with(path)))
}

fn is_mount_point(path: &Path) -> bool {
    crate::rootfs::is_mount_point(path)
}
