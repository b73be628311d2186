//! The filesystem side of unpacking: paths checked component by component beneath the root,
//! nodes made without following symlinks, and metadata set on the entry itself.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, Permissions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// A small file of the unpacked tree, read only when neither it nor a parent is a symlink.
pub(super) fn read_in_root(root: &Path, rel: &str) -> Option<String> {
    let mut cur = root.to_path_buf();
    for part in rel.split('/') {
        cur.push(part);
        let meta = fs::symlink_metadata(&cur).ok()?;
        if meta.file_type().is_symlink() {
            return None;
        }
    }
    let meta = fs::symlink_metadata(&cur).ok()?;
    if !meta.is_file() || meta.len() > 4 << 20 {
        return None;
    }
    fs::read(&cur)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The entry's path relative to the root, or why it is refused.
pub(super) fn relative_path(raw: &[u8]) -> std::result::Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for component in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err("the path has a `..` component".into()),
            Component::Normal(part) => out.push(part),
        }
    }
    Ok(out)
}

pub(super) enum Parents {
    Ready,
    Missing,
}

/// Checks that every parent of `rel` under `root` is a real directory (never a symlink),
/// creating missing ones (0755, root-owned) when `create`.
pub(super) fn check_parents(
    root: &Path,
    rel: &Path,
    create: bool,
) -> std::result::Result<Parents, String> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(Parents::Ready);
    };
    let mut shown = PathBuf::new();
    for component in parent.components() {
        cur.push(component);
        shown.push(component);
        match fs::symlink_metadata(&cur) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "its parent /{} is a symlink (writing through it could leave the root)",
                    shown.display()
                ))
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "its parent /{} is not a directory",
                    shown.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(Parents::Missing);
                }
                fs::create_dir(&cur).map_err(|e| format!("creating /{}: {e}", shown.display()))?;
                fs::set_permissions(&cur, Permissions::from_mode(0o755))
                    .map_err(|e| format!("chmod /{}: {e}", shown.display()))?;
            }
            Err(e) => return Err(format!("/{}: {e}", shown.display())),
        }
    }
    Ok(Parents::Ready)
}

/// Removes whatever is at `path` (a directory with its content), never following a symlink.
pub(super) fn remove_existing(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

pub(super) fn set_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    let c = c_path(path)?;
    let time = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs, both alive for
    // the call; AT_SYMLINK_NOFOLLOW sets a symlink's own times.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let c = c_path(path)?;
    let n = CString::new(name).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "xattr name has a NUL byte",
        )
    })?;
    // SAFETY: both strings are NUL-terminated and `value` is a valid slice for its length;
    // lsetxattr does not follow a symlink.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn make_node(
    path: &Path,
    kind: libc::mode_t,
    mode: u32,
    major: u32,
    minor: u32,
) -> std::io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a NUL-terminated path alive for the call; mknod creates the node itself
    // and fails (EEXIST) rather than follow anything at the final component.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            kind | (mode & 0o7777) as libc::mode_t,
            libc::makedev(major, minor),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes the children of `dir` (and deeper) that this layer did not write: an opaque
/// directory hides everything below it from the lower layers.
pub(super) fn make_opaque(
    root: &Path,
    dir: &Path,
    written: &HashSet<PathBuf>,
) -> std::io::Result<()> {
    let full = root.join(dir);
    for child in fs::read_dir(&full)? {
        let child = child?;
        let rel = dir.join(child.file_name());
        if !written.contains(&rel) {
            remove_existing(&child.path())?;
        } else if fs::symlink_metadata(child.path())?.is_dir() {
            make_opaque(root, &rel, written)?;
        }
    }
    Ok(())
}

pub(super) struct Meta {
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) mode: u32,
    pub(super) mtime: u64,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
}

/// Owner first (chown clears setuid bits and file capabilities), then mode, then xattrs.
pub(super) fn apply_meta(path: &Path, meta: &Meta, is_symlink: bool) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid as u32), Some(meta.gid as u32))?;
    if !is_symlink {
        fs::set_permissions(path, Permissions::from_mode(meta.mode & 0o7777))?;
    }
    for (name, value) in &meta.xattrs {
        if let Err(e) = set_xattr(path, name, value) {
            if name.starts_with("security.") {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("setting xattr {name}: {e}"),
                ));
            }
            tracing::warn!(path = %path.display(), xattr = %name, error = %e, "cannot set an xattr; skipped");
        }
    }
    Ok(())
}
