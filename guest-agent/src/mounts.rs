//! Mounting what the host asks for: mount(8)-style options, paths kept inside a root.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Flags and filesystem data parsed from mount(8)-style options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// What is not a flag, comma-joined, for the filesystem ("size=64m,mode=755").
    pub data: String,
}

/// Parses options; `fstype` "bind" adds `MS_BIND`.
pub fn parse_options(fstype: &str, options: &[String]) -> Options {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    if fstype == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" | "" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    Options {
        flags,
        data: data.join(","),
    }
}

/// Mounts `source` on `target` (which must exist). A read-only bind mount is made in two
/// steps, as the kernel ignores `MS_RDONLY` on the first. A block device source is flushed
/// from the page cache first ([`flush_block_device`]).
pub fn mount_fs(source: &str, target: &Path, fstype: &str, options: &[String]) -> nix::Result<()> {
    let o = parse_options(fstype, options);
    let bind = o.flags.contains(MsFlags::MS_BIND);
    if !bind {
        flush_block_device(Path::new(source))?;
    }
    let fstype = (!bind).then_some(fstype);
    let data = (!o.data.is_empty()).then_some(o.data.as_str());
    mount(Some(source), target, fstype, o.flags, data)?;
    if bind && o.flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            o.flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )?;
    }
    Ok(())
}

/// `_IO(0x12, 97)` from linux/fs.h (the libc crate does not define it).
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// `BLKFLSBUF` on `path` when it is a block device (anything else is left alone): writes back
/// and drops the device's cached blocks, so the mount reads what the disk holds now.
///
/// Why: the host may attach empty, pre-sized "slot" disks at boot and write a container's
/// filesystem image into a slot's backing file later (the containerd shim does). The guest
/// kernel read and cached the slot's first blocks when it probed the disk for partitions at
/// boot; without the flush, the filesystem would be mounted over those stale (zero) blocks.
/// A flush of a device that is mounted already (the same disk mounted twice) only drops the
/// clean, unused blocks: it is harmless.
pub fn flush_block_device(path: &Path) -> nix::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        return Ok(());
    }
    let dev = std::fs::File::open(path)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // SAFETY: BLKFLSBUF takes no argument; the fd is a block device we just opened.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&dev), BLKFLSBUF) };
    if r != 0 {
        let e = nix::Error::last();
        tracing::warn!("BLKFLSBUF {}: {e}", path.display());
        return Err(e);
    }
    tracing::debug!("flushed the cached blocks of {}", path.display());
    Ok(())
}

/// Unmounts `target`, lazily if it is busy.
pub fn unmount(target: &Path) -> nix::Result<()> {
    match umount2(target, MntFlags::empty()) {
        Err(nix::Error::EBUSY) => umount2(target, MntFlags::MNT_DETACH),
        other => other,
    }
}

/// `path` (absolute or relative) resolved lexically inside `root`; `None` if it has `..`.
pub fn inside(root: &Path, path: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = parse_options("tmpfs", &s(&["nosuid", "nodev", "size=64m", "mode=755"]));
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(o.data, "size=64m,mode=755");
        let o = parse_options("bind", &s(&["ro"]));
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_RDONLY);
        assert_eq!(o.data, "");
        let o = parse_options("none", &s(&["rbind", "rw"]));
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
    }

    #[test]
    fn only_block_devices_are_flushed() {
        // Not block devices: nothing to do, no error (a real flush needs a block device).
        flush_block_device(Path::new("/dev/null")).unwrap();
        flush_block_device(Path::new("/proc/self/status")).unwrap();
        flush_block_device(Path::new("tmpfs")).unwrap();
    }

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/run/c/rootfs");
        assert_eq!(
            inside(root, "/data/x").unwrap(),
            Path::new("/run/c/rootfs/data/x")
        );
        assert_eq!(
            inside(root, "data").unwrap(),
            Path::new("/run/c/rootfs/data")
        );
        assert_eq!(inside(root, "/").unwrap(), root);
        assert!(inside(root, "/data/../../etc").is_none());
    }
}
