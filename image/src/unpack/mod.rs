//! Applying an image's layers to a directory, then turning that directory into a disk.
//!
//! Every entry is resolved under the root by hand: `..` components are refused, absolute
//! paths are taken relative to the root, and every parent directory is checked with
//! `symlink_metadata` so that nothing is ever written through a symlink (a layer may plant
//! `a -> /etc` and then an entry `a/x`: that entry is refused). Files are created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` after whatever stood at their path was removed, and metadata
//! calls (`lchown`, `lsetxattr`, `utimensat(AT_SYMLINK_NOFOLLOW)`) do not follow symlinks.
//! The layers are untrusted, but nothing else writes to the temporary tree while they are
//! applied, so checking each component before using the path is not racy.

use crate::index::ImageRecord;
use crate::{blob, disk, io_err, user, Error, ImageStore, Result};
use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

mod fsops;
use fsops::*;

/// Bounds on what an image may unpack to; past them the layer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Entries over all layers (whiteouts included).
    pub max_entries: u64,
    /// Bytes of file content over all layers.
    pub max_total_bytes: u64,
    /// Bytes of one file.
    pub max_entry_bytes: u64,
    /// Bytes of the records in front of one entry, which the tar reader holds in memory: its
    /// header blocks, PAX extensions (long paths, xattrs) and GNU long names and link targets.
    pub max_header_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_total_bytes: 32 << 30,
            max_entry_bytes: 16 << 30,
            max_header_bytes: 1 << 20,
        }
    }
}

#[derive(Default)]
pub(crate) struct Totals {
    entries: u64,
    bytes: u64,
}

/// Unpacks `record`'s layers in a temporary directory of the store, builds the ext4 disk
/// and saves the image's /etc/passwd and /etc/group; both land at their final paths by
/// rename, users first (a disk without its users file is rebuilt).
pub(crate) fn build_disk(
    store: &ImageStore,
    record: &ImageRecord,
    disk_path: &Path,
    users_path: &Path,
) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("unpack-")
        .tempdir_in(store.tmp_dir())
        .map_err(io_err(format!(
            "creating a directory in {}",
            store.tmp_dir().display()
        )))?;
    let root = work.path().join("rootfs");
    fs::create_dir(&root).map_err(io_err(format!("creating {}", root.display())))?;
    fs::set_permissions(&root, Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", root.display())))?;
    let mut totals = Totals::default();
    for layer in &record.layers {
        let file = blob::open_blob(store, &layer.digest)?;
        let bar = crate::progress_bar(
            store.progress,
            layer.size,
            format!("unpack {}", crate::short_digest(&layer.digest)),
        );
        let reader = decompressor(bar.wrap_read(file), &layer.digest)?;
        tracing::debug!(layer = %layer.digest, "applying layer");
        apply_layer(&root, reader, &layer.digest, &store.limits, &mut totals)?;
        bar.finish_and_clear();
    }
    let users = user::UserFiles {
        passwd: read_in_root(&root, "etc/passwd"),
        group: read_in_root(&root, "etc/group"),
    };
    let tmp_disk = work.path().join("disk.ext4");
    disk::ext4_from_dir(&root, &tmp_disk)?;
    let tmp_users = work.path().join("users.json");
    users.save(&tmp_users)?;
    fs::rename(&tmp_users, users_path).map_err(io_err(format!(
        "moving {} into place",
        users_path.display()
    )))?;
    fs::rename(&tmp_disk, disk_path)
        .map_err(io_err(format!("moving {} into place", disk_path.display())))?;
    Ok(())
}

/// Gzip and zstd are told by their magic numbers (media types lie more often than magic).
pub(crate) fn decompressor(file: impl Read + 'static, digest: &str) -> Result<Box<dyn Read>> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = reader
        .fill_buf()
        .map_err(io_err(format!("reading layer {digest}")))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(reader)
            .map_err(io_err(format!("starting zstd for layer {digest}")))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

/// How many bytes the tar reader may still take from the layer (`None`: no bound), and whether
/// it asked for more. The tar crate reads an entry's PAX extensions and GNU long names into
/// memory before it returns the entry, so they are bounded by bounding the reads made while it
/// looks for the next entry.
#[derive(Default)]
struct ReadBudget {
    left: Cell<Option<u64>>,
    exceeded: Cell<bool>,
}

/// The layer's stream as the tar reader sees it: reads stop at the budget.
struct Budgeted<R> {
    inner: R,
    budget: Rc<ReadBudget>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(left) = self.budget.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 && !buf.is_empty() {
            self.budget.exceeded.set(true);
            return Err(std::io::Error::other(
                "the entry's header records are too large",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(Some(left - n as u64));
        Ok(n)
    }
}

/// What applying one layer has done so far.
#[derive(Default)]
struct LayerState {
    /// Paths this layer wrote (and their parents): an opaque directory keeps them.
    written: HashSet<PathBuf>,
    /// Directories and their mtimes, set at the end.
    dir_times: Vec<(PathBuf, u64)>,
}

pub(crate) fn apply_layer(
    root: &Path,
    reader: Box<dyn Read>,
    digest: &str,
    limits: &UnpackLimits,
    totals: &mut Totals,
) -> Result<()> {
    let budget = Rc::new(ReadBudget::default());
    let mut archive = tar::Archive::new(Budgeted {
        inner: reader,
        budget: Rc::clone(&budget),
    });
    let unreadable = |e: std::io::Error| Error::InvalidImage {
        origin: format!("layer {digest}"),
        reason: format!("not a readable (compressed) tar stream: {e}"),
    };
    let mut state = LayerState::default();
    let mut entries = archive.entries().map_err(unreadable)?;
    let mut previous: Option<String> = None;
    loop {
        // Only headers are read from here to the entry: the previous entry was read to its end.
        // The padding after it and one header block come on top of the limit.
        budget.exceeded.set(false);
        budget.left.set(Some(limits.max_header_bytes + 1024));
        let next = entries.next();
        budget.left.set(None);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(|e| {
            if budget.exceeded.get() {
                Error::UnsafeLayer {
                    layer: digest.to_string(),
                    entry: match &previous {
                        Some(p) => format!("the one after {p}"),
                        None => "the first".into(),
                    },
                    reason: format!(
                        "its header records (PAX extensions, GNU long names) are more than {} \
                         bytes",
                        limits.max_header_bytes
                    ),
                }
            } else {
                unreadable(e)
            }
        })?;
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        apply_entry(root, &mut entry, &shown, digest, limits, totals, &mut state)?;
        // What the entry did not use (a skipped type's data) is read here, not while the tar
        // reader looks for the next entry under the budget.
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(unreadable)?;
        previous = Some(shown);
    }
    // Directory times last: adding their children changed them.
    for (dir, mtime) in state.dir_times.iter().rev() {
        if let Err(e) = set_mtime(dir, *mtime as i64) {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot set a directory's mtime");
        }
    }
    Ok(())
}

/// Applies one entry of a layer to the tree under `root`.
fn apply_entry<R: Read>(
    root: &Path,
    entry: &mut tar::Entry<'_, R>,
    shown: &str,
    digest: &str,
    limits: &UnpackLimits,
    totals: &mut Totals,
    state: &mut LayerState,
) -> Result<()> {
    let unreadable = |e: std::io::Error| Error::InvalidImage {
        origin: format!("layer {digest}"),
        reason: format!("not a readable (compressed) tar stream: {e}"),
    };
    let written = &mut state.written;
    let dir_times = &mut state.dir_times;
    let raw = entry.path_bytes().into_owned();
    let refuse = |reason: String| Error::UnsafeLayer {
        layer: digest.to_string(),
        entry: shown.to_string(),
        reason,
    };
    let failed = |what: &str, e: std::io::Error| Error::UnsafeLayer {
        layer: digest.to_string(),
        entry: shown.to_string(),
        reason: format!("{what}: {e}"),
    };
    totals.entries += 1;
    if totals.entries > limits.max_entries {
        return Err(refuse(format!(
            "the image has more than {} entries",
            limits.max_entries
        )));
    }
    let kind = entry.header().entry_type();
    if matches!(
        kind,
        tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink
    ) {
        return Ok(());
    }
    let rel = relative_path(&raw).map_err(&refuse)?;
    let name = rel
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();

    // Whiteouts: markers, never files of their own.
    if name == b".wh..wh..opq" {
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        match check_parents(root, &rel, false).map_err(&refuse)? {
            Parents::Missing => return Ok(()),
            Parents::Ready => {}
        }
        make_opaque(root, &dir, written).map_err(|e| failed("emptying the opaque directory", e))?;
        return Ok(());
    }
    if name.starts_with(b".wh..wh.") {
        return Ok(()); // aufs housekeeping (.wh..wh.plnk and such)
    }
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(refuse("a whiteout of nothing".into()));
        }
        let target = rel.with_file_name(std::ffi::OsStr::from_bytes(hidden));
        match check_parents(root, &target, false).map_err(&refuse)? {
            Parents::Missing => return Ok(()),
            Parents::Ready => {}
        }
        remove_existing(&root.join(&target))
            .map_err(|e| failed("removing the whited-out path", e))?;
        return Ok(());
    }

    let mut meta = Meta {
        uid: entry.header().uid().map_err(unreadable)?,
        gid: entry.header().gid().map_err(unreadable)?,
        mode: entry.header().mode().map_err(unreadable)?,
        mtime: entry.header().mtime().unwrap_or(0),
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry.pax_extensions().map_err(unreadable)? {
        for extension in extensions {
            let extension = extension.map_err(unreadable)?;
            let Ok(key) = extension.key() else { continue };
            let value = extension.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                meta.xattrs.push((xattr.to_string(), value.to_vec()));
            } else if key == "uid" {
                meta.uid = number().unwrap_or(meta.uid);
            } else if key == "gid" {
                meta.gid = number().unwrap_or(meta.gid);
            }
        }
    }
    if meta.uid > u32::MAX as u64 || meta.gid > u32::MAX as u64 {
        return Err(refuse(format!(
            "owner {}:{} is out of range",
            meta.uid, meta.gid
        )));
    }

    let dest = root.join(&rel);
    if rel.as_os_str().is_empty() {
        // The root itself ("./"): only its metadata can change.
        if kind != tar::EntryType::Directory {
            return Err(refuse("it would replace the root directory".into()));
        }
        apply_meta(&dest, &meta, false).map_err(|e| failed("setting metadata", e))?;
        dir_times.push((dest, meta.mtime));
        return Ok(());
    }
    check_parents(root, &rel, true).map_err(&refuse)?;

    match kind {
        tar::EntryType::Directory => {
            match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&dest)
                        .map_err(|e| failed("replacing a file with a directory", e))?;
                    fs::create_dir(&dest).map_err(|e| failed("creating the directory", e))?;
                }
                Err(_) => fs::create_dir(&dest).map_err(|e| failed("creating the directory", e))?,
            }
            apply_meta(&dest, &meta, false).map_err(|e| failed("setting metadata", e))?;
            dir_times.push((dest.clone(), meta.mtime));
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let declared = entry.size();
            if declared > limits.max_entry_bytes {
                return Err(refuse(format!(
                    "{declared} bytes is more than the {} bytes a file may have",
                    limits.max_entry_bytes
                )));
            }
            remove_existing(&dest).map_err(|e| failed("removing what was there", e))?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dest)
                .map_err(|e| failed("creating the file", e))?;
            let copied = std::io::copy(
                &mut (&mut *entry).take(limits.max_entry_bytes + 1),
                &mut file,
            )
            .map_err(|e| failed("writing the file", e))?;
            if copied > limits.max_entry_bytes {
                return Err(refuse(format!(
                    "more than the {} bytes a file may have",
                    limits.max_entry_bytes
                )));
            }
            totals.bytes += copied;
            if totals.bytes > limits.max_total_bytes {
                return Err(refuse(format!(
                    "the image unpacks to more than {} bytes",
                    limits.max_total_bytes
                )));
            }
            drop(file);
            apply_meta(&dest, &meta, false).map_err(|e| failed("setting metadata", e))?;
            set_mtime(&dest, meta.mtime as i64).map_err(|e| failed("setting mtime", e))?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("a symlink without a target".into()))?
                .into_owned();
            remove_existing(&dest).map_err(|e| failed("removing what was there", e))?;
            // The target is stored as is: it is only ever read inside the guest, and this
            // code never follows links in the tree.
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                .map_err(|e| failed("creating the symlink", e))?;
            apply_meta(&dest, &meta, true).map_err(|e| failed("setting metadata", e))?;
            set_mtime(&dest, meta.mtime as i64).map_err(|e| failed("setting mtime", e))?;
        }
        tar::EntryType::Link => {
            let raw_target = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("a hardlink without a target".into()))?
                .into_owned();
            let target = relative_path(&raw_target).map_err(|r| {
                refuse(format!(
                    "hardlink target {:?}: {r}",
                    String::from_utf8_lossy(&raw_target)
                ))
            })?;
            let shown_target = String::from_utf8_lossy(&raw_target).into_owned();
            if target.as_os_str().is_empty() {
                return Err(refuse("a hardlink to the root directory".into()));
            }
            match check_parents(root, &target, false)
                .map_err(|r| refuse(format!("hardlink target {shown_target:?}: {r}")))?
            {
                Parents::Ready => {}
                Parents::Missing => {
                    return Err(refuse(format!(
                        "hardlink target {shown_target:?} does not exist in the image"
                    )))
                }
            }
            let source = root.join(&target);
            match fs::symlink_metadata(&source) {
                Ok(m) if m.is_dir() => {
                    return Err(refuse(format!(
                        "hardlink target {shown_target:?} is a directory"
                    )))
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(refuse(format!(
                        "hardlink target {shown_target:?} does not exist in the image"
                    )))
                }
            }
            if target != rel {
                remove_existing(&dest).map_err(|e| failed("removing what was there", e))?;
                // linkat without AT_SYMLINK_FOLLOW: links the entry itself, never what a
                // symlink points to.
                fs::hard_link(&source, &dest).map_err(|e| failed("creating the hardlink", e))?;
            }
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let node = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let major = entry.header().device_major().ok().flatten().unwrap_or(0);
            let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
            remove_existing(&dest).map_err(|e| failed("removing what was there", e))?;
            make_node(&dest, node, meta.mode, major, minor)
                .map_err(|e| failed("creating the node", e))?;
            apply_meta(&dest, &meta, false).map_err(|e| failed("setting metadata", e))?;
            set_mtime(&dest, meta.mtime as i64).map_err(|e| failed("setting mtime", e))?;
        }
        other => {
            tracing::warn!(layer = digest, entry = %shown, kind = ?other, "skipping an entry of an unsupported type");
            return Ok(());
        }
    }
    for ancestor in rel.ancestors() {
        if !written.insert(ancestor.to_path_buf()) {
            break;
        }
    }
    Ok(())
}
