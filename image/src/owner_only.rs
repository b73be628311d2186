//! State on disk that only its owner may read: directories made 0700 and files 0600, with
//! that mode at creation (never widened by the umask, never chmod'ed after), and a state
//! directory that is a symlink or belongs to another user refused. Used by the image store and
//! by `microvm`'s run state.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every state directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every state file.
pub const FILE_MODE: u32 = 0o600;

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `dir` as a state directory: made (with missing parents) 0700 when absent; when present it
/// must be a real directory (not a symlink to one) owned by the effective user.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        return check_dir(dir);
    }
    match DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && effective_uid() != 0 => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{e} (a user other than root needs a state directory of its own: set \
                     MICROVM_HOME, or HOME)"
                ),
            ))
        }
        Err(e) => return Err(e),
    }
    check_dir(dir)
}

/// Makes `dir` 0700; it must not exist yet (its parent must).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(dir)
}

/// Refuses a state directory that is a symlink, not a directory, or not the effective user's.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {} as a state directory: {why}", dir.display()),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symlink (give the directory it points to instead)".into());
    }
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    let me = effective_uid();
    if meta.uid() != me {
        return refuse(format!("it belongs to uid {}, not to uid {me}", meta.uid()));
    }
    Ok(())
}

/// Options that create a file 0600 and never follow a symlink at its path; add `write`,
/// `create`/`create_new`, `truncate` or `append` as needed.
pub fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE).custom_flags(libc::O_NOFOLLOW);
    o
}

/// Replaces `path` with `data` atomically (a reader sees the old or the new content), through
/// a 0600 temporary file beside it.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = file_options().write(true).create_new(true).open(&tmp)?;
    file.write_all(data)?;
    std::fs::rename(&tmp, path)
}
