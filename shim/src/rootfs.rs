//! The container's root filesystem on its way into the guest, without a host filesystem
//! daemon: the snapshotter's mounts (overlay, or a bind for the native snapshotter) are mounted
//! on the host under the bundle, an ext4 image of that tree is written into the container's
//! slot disk with `mke2fs -d`, and the tree is unmounted again. The guest mounts the slot
//! read-only with a tmpfs overlay on top (the container can write; writes stay in the guest).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mount the container rootfs ({fstype} {what}) on {target}: {reason}")]
    Mount {
        fstype: String,
        what: String,
        target: PathBuf,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "the spec's root.path {root:?} {why}: the root filesystem must be a directory beneath the \
         bundle {}",
        bundle.display()
    )]
    OutsideBundle {
        root: String,
        bundle: PathBuf,
        why: &'static str,
    },
    #[error("the container's rootfs image: {source} (a slot disk holds {slot_mib} MiB; raise slot_size_gib in the shim config for larger images)")]
    Image { source: image::Error, slot_mib: u64 },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let context = context.into();
    move |source| RootfsError::Io { context, source }
}

/// One mount from containerd's create request.
#[derive(Debug, Clone)]
pub struct HostMount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

impl From<&containerd_shim::protos::types::mount::Mount> for HostMount {
    fn from(m: &containerd_shim::protos::types::mount::Mount) -> Self {
        HostMount {
            fstype: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        }
    }
}

/// The spec's `root.path` (`rootfs` when absent, as containerd writes it).
pub fn spec_root_path(spec: &serde_json::Value) -> &str {
    spec.pointer("/root/path")
        .and_then(|p| p.as_str())
        .unwrap_or("rootfs")
}

/// A container's root filesystem directory, resolved beneath its bundle: the only place the
/// shim mounts the snapshotter's mounts on, builds the image from and unmounts. A spec could
/// otherwise name a host directory (`/`, `../../etc`, a symbolic link out of the bundle) and
/// have it packed into the guest, or mounted over and unmounted on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRootfs(PathBuf);

impl BundleRootfs {
    /// Resolves `root_path` (relative to `bundle`, or absolute inside it) beneath `bundle`:
    /// no `..`, not the bundle itself, and no symbolic link or non-directory on the way
    /// (components not there yet are created as directories by [`mount_all`]).
    pub fn resolve(bundle: &Path, root_path: &str) -> Result<BundleRootfs, RootfsError> {
        let refuse = |why| RootfsError::OutsideBundle {
            root: root_path.into(),
            bundle: bundle.to_path_buf(),
            why,
        };
        let root = Path::new(root_path);
        let relative = if root.is_absolute() {
            root.strip_prefix(bundle)
                .map_err(|_| refuse("is an absolute path outside the bundle"))?
        } else {
            root
        };
        let mut path = bundle.to_path_buf();
        let mut depth = 0;
        for c in relative.components() {
            match c {
                Component::Normal(name) => {
                    path.push(name);
                    depth += 1;
                }
                Component::CurDir => continue,
                _ => return Err(refuse("has a `..` (or a root) in it")),
            }
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse("goes through a symbolic link"))
                }
                Ok(m) if !m.is_dir() => {
                    return Err(refuse("goes through something not a directory"))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("look at {}", path.display()))(e)),
            }
        }
        if depth == 0 {
            return Err(refuse("is the bundle itself"));
        }
        Ok(BundleRootfs(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Mounts the snapshotter's mounts, in order, on the container's rootfs directory (as runc's
/// shim does).
pub fn mount_all(mounts: &[HostMount], rootfs: &BundleRootfs) -> Result<(), RootfsError> {
    let target = rootfs.path();
    fs::create_dir_all(target).map_err(io(format!("create {}", target.display())))?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.fstype.as_str()),
            Some(m.source.as_str()),
            &m.options,
            target,
        )
        .map_err(|e| RootfsError::Mount {
            fstype: m.fstype.clone(),
            what: m.source.clone(),
            target: target.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Unmounts everything on the container's rootfs directory (several stacked mounts too); a
/// directory with nothing mounted is fine, so this is safe to repeat.
pub fn unmount_all(rootfs: &BundleRootfs) -> Result<(), RootfsError> {
    let target = rootfs.path();
    let Ok(c) = CString::new(target.as_os_str().as_bytes()) else {
        return Ok(());
    };
    for _ in 0..16 {
        if !is_mount_point(target) {
            return Ok(());
        }
        // SAFETY: umount2 with a valid NUL-terminated path.
        let r = unsafe { libc::umount2(c.as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Busy (a stray open file): detach, so the bundle can still be removed.
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(io(format!("unmount {}", target.display()))(e));
            }
        }
    }
    Ok(())
}

/// Whether something is mounted exactly on `path` (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    })
}

pub(crate) fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes an ext4 filesystem holding a copy of `tree` (ownership, modes, links and xattrs
/// kept) into the slot disk `out`, at most `max_bytes` (the slot's size). Only the
/// filesystem's own length at the start of the slot is written, so the file stays sparse.
/// Returns the filesystem's size in bytes.
pub fn rootfs_image(tree: &Path, out: &Path, max_bytes: u64) -> Result<u64, RootfsError> {
    let opts = image::disk::Ext4Options {
        in_place: true,
        max_bytes: Some(max_bytes),
        ..Default::default()
    };
    image::disk::ext4_with(tree, out, &opts).map_err(|source| RootfsError::Image {
        source,
        slot_mib: max_bytes >> 20,
    })
}

/// Creates (or resizes) a sparse slot disk of `bytes`, 0600: no blocks are used until an
/// image is written into it.
pub fn create_slot(path: &Path, bytes: u64) -> Result<(), RootfsError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    f.set_len(bytes)
        .map_err(io(format!("size {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// `root.path` stays beneath the bundle: a spec cannot have a host directory packed into
    /// the guest, mounted over or unmounted.
    #[test]
    fn the_rootfs_is_resolved_beneath_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        fs::create_dir_all(bundle.join("rootfs")).unwrap();
        fs::create_dir_all(bundle.join("sub/root")).unwrap();
        let ok = |p: &str| BundleRootfs::resolve(&bundle, p).map(|r| r.path().to_path_buf());
        assert_eq!(ok("rootfs").unwrap(), bundle.join("rootfs"));
        assert_eq!(ok("./sub/root").unwrap(), bundle.join("sub/root"));
        assert_eq!(
            ok(&bundle.join("rootfs").to_string_lossy()).unwrap(),
            bundle.join("rootfs")
        );
        assert_eq!(
            ok("new").unwrap(),
            bundle.join("new"),
            "created at mount time"
        );
        std::os::unix::fs::symlink("/etc", bundle.join("link")).unwrap();
        std::os::unix::fs::symlink("rootfs", bundle.join("inner-link")).unwrap();
        fs::write(bundle.join("file"), "x").unwrap();
        let outside = bundle.join("../../etc");
        for bad in [
            "/",
            "/etc",
            "../../etc",
            "rootfs/../../etc",
            "link",
            "link/ssl",
            "inner-link",
            "file/x",
            "",
            ".",
            outside.to_str().unwrap(),
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("beneath the bundle"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    /// A real mke2fs into a sparse slot: the filesystem holds the tree's files (checked with
    /// debugfs) and the slot keeps its length.
    #[test]
    fn image_into_a_sparse_slot() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::write(tree.join("bin/hello"), b"hello from the image\n").unwrap();
        std::os::unix::fs::symlink("hello", tree.join("bin/link")).unwrap();
        let slot = dir.path().join("slot0");
        create_slot(&slot, 1 << 30).unwrap();
        assert_eq!(fs::metadata(&slot).unwrap().blocks(), 0);
        assert_eq!(
            fs::metadata(&slot).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let size = rootfs_image(&tree, &slot, 1 << 30).unwrap();
        assert!((16 << 20..64 << 20).contains(&size), "{size}");
        let md = fs::metadata(&slot).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert!(md.blocks() * 512 < 64 << 20, "the slot stays sparse");
        let out = Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&slot)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the image\n"
        );
        // Too small a slot: a clear error, nothing written.
        let e = rootfs_image(&tree, &dir.path().join("x"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("slot_size_gib"), "{e}");
        assert!(!dir.path().join("x").exists());
    }
}
