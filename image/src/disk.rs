//! ext4 disks made from a directory tree with `mke2fs -d` (e2fsprogs), which copies
//! ownership, modes, times, symlinks, hardlinks, device nodes, fifos and xattrs as they are
//! on the host: no mount, no root-only loop device, no filesystem daemon.

use crate::{io_err, Error, Result};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Usage {
    /// Data blocks the tree needs, in bytes.
    bytes: u64,
    inodes: u64,
}

fn measure(dir: &Path, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        let meta =
            std::fs::symlink_metadata(&path).map_err(io_err(format!("stat {}", path.display())))?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue; // another name of an inode already counted
        }
        usage.inodes += 1;
        let ft = meta.file_type();
        if ft.is_dir() {
            usage.bytes += BLOCK;
            measure(&path, seen, usage)?;
        } else if ft.is_file() {
            // Data blocks, plus an extent block now and then for large files.
            usage.bytes += meta.len().div_ceil(BLOCK) * BLOCK + meta.len() / (128 << 20) * BLOCK;
        } else if ft.is_symlink() && meta.len() >= 60 {
            usage.bytes += BLOCK; // longer targets do not fit in the inode
        }
        // Names in directories: about 8 bytes plus the name, rounded.
        usage.bytes += 16 + entry.file_name().len() as u64;
    }
    Ok(())
}

/// How [`ext4_with`] lays out the filesystem.
#[derive(Debug, Clone, Default)]
pub struct Ext4Options {
    /// Free space for the guest's writes. Zero: a read-only disk, no journal. More: a writable
    /// disk with a journal (the room is sparse in the file until written).
    pub free_bytes: u64,
    /// Write the filesystem into `out` as it is, keeping its length, instead of replacing it:
    /// for a larger pre-attached disk (the containerd shim's slot disks). The filesystem takes
    /// only the bytes it needs at the start of the file.
    pub in_place: bool,
    /// Refuse a tree whose filesystem would be larger than this.
    pub max_bytes: Option<u64>,
    /// Keep the root directory's owner as the tree's instead of 0:0 (a volume's root belongs
    /// to whoever owns the host directory).
    pub keep_root_owner: bool,
}

/// Writes an ext4 image of the tree at `dir` to `out`, preserving ownership, modes,
/// symlinks, hardlinks, device nodes and xattrs, sized to fit with headroom.
///
/// The image has no journal (it is attached read-only), 256-byte inodes (room for inline
/// xattrs such as `security.capability`) and a root directory owned by 0:0. `out` is
/// replaced when it exists.
pub fn ext4_from_dir(dir: &Path, out: &Path) -> Result<()> {
    ext4_with(dir, out, &Ext4Options::default()).map(drop)
}

/// [`ext4_from_dir`] with options; returns the filesystem's size in bytes.
pub fn ext4_with(dir: &Path, out: &Path, opts: &Ext4Options) -> Result<u64> {
    let meta = std::fs::metadata(dir).map_err(io_err(format!("stat {}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Mkfs {
            out: out.display().to_string(),
            message: format!("{} is not a directory", dir.display()),
        });
    }
    let mut usage = Usage::default();
    measure(dir, &mut HashSet::new(), &mut usage)?;
    // Headroom: 20% plus 16 MiB for the metadata mke2fs lays out (group descriptors,
    // bitmaps, inode tables beyond our count), plus the room asked for writes.
    let inodes = (usage.inodes + 16) * 5 / 4 + 1024 + opts.free_bytes / (64 << 10);
    let mut size = usage.bytes * 6 / 5 + inodes * 256 + (16 << 20) + opts.free_bytes;
    for attempt in 0..3 {
        size = size.div_ceil(1 << 20) * (1 << 20);
        if let Some(max) = opts.max_bytes.filter(|max| size > *max) {
            return Err(Error::Mkfs {
                out: out.display().to_string(),
                message: format!(
                    "{} needs a {} MiB filesystem; at most {} MiB fit",
                    dir.display(),
                    size >> 20,
                    max >> 20
                ),
            });
        }
        match run_mke2fs(dir, out, size, inodes, opts) {
            Ok(()) => return Ok(size),
            // Our estimate was short (very many tiny files, long directories): retry larger.
            Err(Error::Mkfs { message, .. })
                if attempt < 2 && message.contains("Could not allocate") =>
            {
                tracing::debug!(size, %message, "mke2fs ran out of space; retrying larger");
                size *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

fn run_mke2fs(dir: &Path, out: &Path, size: u64, inodes: u64, opts: &Ext4Options) -> Result<()> {
    let mkfs_err = |message: String| Error::Mkfs {
        out: out.display().to_string(),
        message,
    };
    if !opts.in_place {
        match std::fs::remove_file(out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", out.display()))(e)),
        }
        let file = crate::owner_only::file_options()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(io_err(format!("creating {}", out.display())))?;
        file.set_len(size)
            .map_err(io_err(format!("sizing {}", out.display())))?;
    }
    let features = if opts.free_bytes == 0 {
        "^has_journal,^resize_inode"
    } else {
        "has_journal,^resize_inode"
    };
    let mut extended = vec!["lazy_itable_init=0"];
    if !opts.keep_root_owner {
        extended.push("root_owner=0:0");
    }
    let output = Command::new("mke2fs")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        .args(["-O", features])
        .arg("-E")
        .arg(extended.join(","))
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(dir)
        .arg(out)
        // The filesystem's length: in place, the file may be longer (a slot disk).
        .arg(format!("{}k", size >> 10))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => mkfs_err("mke2fs not found: install e2fsprogs".into()),
            _ => mkfs_err(format!("running mke2fs: {e}")),
        })?;
    if !output.status.success() {
        if !opts.in_place {
            let _ = std::fs::remove_file(out);
        }
        return Err(mkfs_err(format!(
            "mke2fs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}
