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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    // The umask is process-wide: these tests do not set it (tests/owner_only.rs does, in a
    // process of its own); a umask can only take bits away from 0700/0600.
    #[test]
    fn made_with_owner_only_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        ensure_dir(&dir).unwrap();
        for d in [tmp.path().join("a"), tmp.path().join("a/b"), dir.clone()] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        ensure_dir(&dir).unwrap(); // present: fine
        let file = dir.join("run.json");
        write_atomic(&file, b"{}").unwrap();
        write_atomic(&file, b"{\"x\":1}").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).unwrap(), b"{\"x\":1}");
        assert!(!dir.join("run.json.tmp").exists());
        create_dir(&dir.join("one")).unwrap();
        assert_eq!(mode(&dir.join("one")), 0o700);
        assert!(create_dir(&dir.join("one")).is_err());
    }

    #[test]
    fn symlinked_or_foreign_or_non_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        ensure_dir(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        let e = ensure_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symlink") && e.contains("link"), "{e}");

        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = ensure_dir(&file).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");

        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(effective_uid() + 1), None).unwrap();
        let e = ensure_dir(&foreign).unwrap_err().to_string();
        assert!(e.contains("belongs to uid"), "{e}");
    }

    #[test]
    fn a_symlink_at_a_file_path_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let path = tmp.path().join("state.json");
        symlink(&target, &path).unwrap();
        let e = file_options().write(true).open(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        // write_atomic replaces the link itself, never writes through it.
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
