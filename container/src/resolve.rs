//! Paths under a container's root, resolved by the kernel with the root as `/`, and used
//! through the file descriptor the resolution returned, never as a path string again.
//!
//! A check-then-use resolver (walk the path, look at each symlink, return a joined path) is
//! racy: whatever can write under the root between the check and the use (another container
//! sharing a volume, a process of a running container during `exec`) can swap a component for
//! a symlink and make a mount or `mknod` land outside the root (the runc CVE-2019-16884 /
//! CVE-2021-30465 / CVE-2024-21626 class). Here every lookup is one `openat2(2)` with
//! `RESOLVE_IN_ROOT` (absolute symlinks and `..` stay under the root) and
//! `RESOLVE_NO_MAGICLINKS` (no `/proc/<pid>/root`, `/proc/self/fd/N` jumps), and the result is
//! an `O_PATH` fd. Mounts then target `/proc/self/fd/N` (the kernel follows that magic link to
//! exactly the resolved inode); nodes, links and directories are made with `*at` calls relative
//! to a resolved parent fd, and each freshly made directory is reopened without following
//! symlinks.
//!
//! `openat2` is Linux 5.6+ (the guest kernel is 6.1); it is reached through `rustix`, already a
//! dependency, so no `unsafe` is needed. Everything here runs in the forked child too: no locks,
//! no logging, nothing global.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};

/// How often a lookup is retried when the kernel says `EAGAIN` (a rename or mount raced a
/// `..` step under `RESOLVE_IN_ROOT`; the kernel refuses rather than risk an escape).
const EAGAIN_RETRIES: usize = 128;

/// Resolution inside the root: symlinks (absolute ones too) and `..` never leave it, and
/// magic links are refused.
fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// One component below a directory fd, no symlink followed at all.
fn no_symlinks() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// `openat2`, retried on `EAGAIN`, with the error as an `Errno` (what `ChildError` reports).
fn open_how(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: OFlags,
    mode: u32,
    resolve: ResolveFlags,
) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match openat2(
            dir,
            path,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
            resolve,
        ) {
            Ok(fd) => return Ok(fd),
            Err(e) if e == rustix::io::Errno::AGAIN && tries < EAGAIN_RETRIES => tries += 1,
            Err(e) => return Err(Errno::from_raw(e.raw_os_error())),
        }
    }
}

/// The path through which the kernel reaches exactly what `fd` refers to: mount targets and
/// sources given as this path cannot be redirected by a symlink swapped in later.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A path's components without `/` and `.`; `..` is kept (the kernel clamps it at the root).
fn components(path: &Path) -> Vec<&OsStr> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            Component::ParentDir => Some(OsStr::new("..")),
            _ => None,
        })
        .collect()
}

fn joined(parts: &[&OsStr]) -> PathBuf {
    if parts.is_empty() {
        return PathBuf::from(".");
    }
    parts.iter().collect()
}

/// A container's root directory, held open.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
}

impl RootDir {
    /// Opens `path` (trusted: the agent's own rootfs path, or `/` after `pivot_root`).
    pub fn open(path: &Path) -> Result<Self, Errno> {
        let fd = open_how(
            rustix::fs::CWD,
            path,
            OFlags::PATH | OFlags::DIRECTORY,
            0,
            ResolveFlags::empty(),
        )?;
        Ok(Self { fd })
    }

    /// What `path` names inside the root (the last component followed if it is a symlink,
    /// inside the root too), as an `O_PATH` fd.
    pub fn resolve(&self, path: &Path) -> Result<OwnedFd, Errno> {
        self.resolve_with(path, OFlags::empty())
    }

    /// As [`RootDir::resolve`], and it must be a directory.
    pub fn resolve_dir(&self, path: &Path) -> Result<OwnedFd, Errno> {
        self.resolve_with(path, OFlags::DIRECTORY)
    }

    fn resolve_with(&self, path: &Path, extra: OFlags) -> Result<OwnedFd, Errno> {
        let parts = components(path);
        open_how(
            self.fd.as_fd(),
            &joined(&parts),
            OFlags::PATH | extra,
            0,
            in_root(),
        )
    }

    /// `mkdir -p` inside the root: the longest existing prefix is resolved in the root, each
    /// missing component is made with `mkdirat` under the fd of its parent and reopened
    /// without following symlinks (a symlink swapped in meanwhile is an error, not a detour).
    /// A dangling symlink on the way is an error too (`ELOOP`): its target is not created.
    /// Returns the directory's fd.
    pub fn mkdir_all(&self, path: &Path, mode: u32) -> Result<OwnedFd, Errno> {
        let parts = components(path);
        let mut existing = parts.len();
        let mut dir = loop {
            match self.resolve_dir(&joined(&parts[..existing])) {
                Ok(fd) => break fd,
                Err(Errno::ENOENT) if existing > 0 => existing -= 1,
                Err(e) => return Err(e),
            }
        };
        for part in &parts[existing..] {
            if *part == ".." {
                // `missing/..`: the kernel would say ENOENT too.
                return Err(Errno::ENOENT);
            }
            match rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(mode)) {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::EXIST => {}
                Err(e) => return Err(Errno::from_raw(e.raw_os_error())),
            }
            dir = open_how(
                dir.as_fd(),
                Path::new(part),
                OFlags::PATH | OFlags::DIRECTORY,
                0,
                no_symlinks(),
            )?;
        }
        Ok(dir)
    }

    /// The directory that holds `path`'s last component (made with [`RootDir::mkdir_all`]
    /// when missing) and that component's name, for `mknodat`, `symlinkat` and the like.
    pub fn parent_of(&self, path: &Path, mode: u32) -> Result<(OwnedFd, OsString), Errno> {
        let (parent, name) = split_last(path)?;
        Ok((self.mkdir_all(&parent, mode)?, name))
    }

    /// An existing file at `path` (followed inside the root), else a new empty one made with
    /// `mode` under its parent (`O_CREAT|O_EXCL`, never through a symlink): a bind mount
    /// target. Returns its fd.
    pub fn create_file(&self, path: &Path, mode: u32) -> Result<OwnedFd, Errno> {
        match self.resolve(path) {
            Err(Errno::ENOENT) => {}
            found => return found,
        }
        let (parent, name) = self.parent_of(path, 0o755)?;
        match create_in(&parent, &name, mode) {
            // Made by someone else since: whatever it is, it is resolved inside the root.
            Err(Errno::EEXIST) => self.resolve(path),
            made => made,
        }
    }
}

impl AsFd for RootDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A new empty file `name` directly under `dir`, never through a symlink.
pub(crate) fn create_in(dir: &OwnedFd, name: &OsStr, mode: u32) -> Result<OwnedFd, Errno> {
    open_how(
        dir.as_fd(),
        Path::new(name),
        OFlags::RDONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
        mode,
        no_symlinks(),
    )
}

/// Whether `name` exists directly under `dir` (a dangling symlink exists).
pub(crate) fn exists_in(dir: &OwnedFd, name: &OsStr) -> Result<bool, Errno> {
    match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(e) if e == rustix::io::Errno::NOENT => Ok(false),
        Err(e) => Err(Errno::from_raw(e.raw_os_error())),
    }
}

/// `path` without its last component, and that component; the last one must be a name.
fn split_last(path: &Path) -> Result<(PathBuf, OsString), Errno> {
    let mut parts = components(path);
    match parts.pop() {
        Some(name) if name != ".." && !name.as_bytes().is_empty() => {
            Ok((joined(&parts), name.to_os_string()))
        }
        _ => Err(Errno::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn same_file(fd: &OwnedFd, path: &Path) -> bool {
        let a = rustix::fs::fstat(fd).unwrap();
        let b = fs::metadata(path).unwrap();
        a.st_ino == b.ino() && a.st_dev == b.dev()
    }

    /// `<tmp>/root` and a sibling `<tmp>/outside` that no resolution may reach.
    fn root_and_outside() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir(&outside).unwrap();
        (dir, root, outside)
    }

    fn entries(dir: &Path) -> Vec<OsString> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    #[test]
    fn absolute_symlinks_and_dotdot_chains_stay_in_the_root() {
        let (_tmp, root, outside) = root_and_outside();
        // Absolute, `..` beyond the root, and both aimed at the sibling by name.
        symlink("/../../../outside", root.join("etc/abs")).unwrap();
        symlink("../../../../..", root.join("etc/up")).unwrap();
        symlink("../../outside", root.join("etc/rel")).unwrap();
        fs::create_dir(root.join("outside")).unwrap();
        let r = RootDir::open(&root).unwrap();

        let made = r.mkdir_all(Path::new("/etc/abs/x"), 0o755).unwrap();
        assert!(same_file(&made, &root.join("outside/x")));
        let made = r.mkdir_all(Path::new("/etc/up/y"), 0o755).unwrap();
        assert!(same_file(&made, &root.join("y")));
        let made = r.mkdir_all(Path::new("/etc/rel/z"), 0o755).unwrap();
        assert!(same_file(&made, &root.join("outside/z")));
        let made = r.mkdir_all(Path::new("../../w"), 0o755).unwrap();
        assert!(same_file(&made, &root.join("w")));
        let file = r
            .create_file(Path::new("/etc/up/etc/abs/f"), 0o644)
            .unwrap();
        assert!(same_file(&file, &root.join("outside/f")));
        assert!(entries(&outside).is_empty(), "{:?}", entries(&outside));

        // The root itself, however it is named.
        for p in ["/", "", "..", "/etc/up", "/etc/.."] {
            assert!(same_file(&r.resolve(Path::new(p)).unwrap(), &root), "{p}");
        }
    }

    #[test]
    fn symlink_to_proc_self_root_stays_in_the_root() {
        let (_tmp, root, outside) = root_and_outside();
        symlink("/proc/self/root", root.join("etc/host")).unwrap();
        let r = RootDir::open(&root).unwrap();
        // Inside this root `/proc` is the root's own (missing) directory: nothing resolves
        // to the host's `/`. mkdir -p does not make a dangling symlink's target: an error.
        assert_eq!(
            r.resolve(Path::new("/etc/host/tmp")).unwrap_err(),
            Errno::ENOENT
        );
        assert_eq!(
            r.mkdir_all(Path::new("/etc/host/tmp/x"), 0o755)
                .unwrap_err(),
            Errno::ELOOP
        );
        fs::create_dir_all(root.join("proc/self/root/tmp")).unwrap();
        let made = r.mkdir_all(Path::new("/etc/host/tmp/x"), 0o755).unwrap();
        assert!(same_file(&made, &root.join("proc/self/root/tmp/x")));
        assert!(entries(&outside).is_empty());
    }

    #[test]
    fn magic_links_are_refused() {
        // With the host's `/` as the root, `/proc` is a real procfs: its magic links
        // (`/proc/self/root`, `/proc/self/fd/N`) are where a plain path walk would jump.
        let (tmp, _root, outside) = root_and_outside();
        let held = fs::File::open(&outside).unwrap();
        symlink("/proc/self/root", tmp.path().join("to-root")).unwrap();
        symlink(fd_path(&held), tmp.path().join("to-fd")).unwrap();
        let host = RootDir::open(Path::new("/")).unwrap();
        for link in ["to-root", "to-fd"] {
            let path = tmp.path().join(link);
            assert!(fs::metadata(&path).is_ok(), "a plain walk follows {link}");
            assert_eq!(host.resolve(&path).unwrap_err(), Errno::ELOOP, "{link}");
        }
        let direct = fd_path(&held);
        assert_eq!(host.resolve(&direct).unwrap_err(), Errno::ELOOP);
        assert_eq!(
            host.mkdir_all(&direct.join("x"), 0o755).unwrap_err(),
            Errno::ELOOP
        );
        assert!(entries(&outside).is_empty());
    }

    /// The old resolver returned a joined path that the caller used later: a component
    /// swapped for a symlink in between redirected the use outside the root. Here the
    /// resolution's fd is what is used, so the same swap changes nothing.
    #[test]
    fn a_swap_after_resolution_does_not_redirect_the_use() {
        let (_tmp, root, outside) = root_and_outside();
        let r = RootDir::open(&root).unwrap();
        let target = r.mkdir_all(Path::new("/mnt/data"), 0o755).unwrap();
        let checked_path = root.join("mnt/data"); // what a check-then-use resolver returned

        // The swap: /mnt becomes a symlink to the outside.
        fs::rename(root.join("mnt"), root.join("mnt.old")).unwrap();
        fs::create_dir(outside.join("data")).unwrap();
        symlink(&outside, root.join("mnt")).unwrap();

        // A path-based use now lands outside...
        fs::write(checked_path.join("via-path"), "x").unwrap();
        assert!(outside.join("data/via-path").exists());
        // ...while the held fd, used as a mount target is (`/proc/self/fd/N`), and through
        // `*at` calls, still reaches the directory that was resolved.
        fs::write(fd_path(&target).join("via-fd"), "x").unwrap();
        let dir = rustix::fs::openat(
            &target,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let made = create_in(&dir, OsStr::new("via-at"), 0o600).unwrap();
        assert!(same_file(&made, &root.join("mnt.old/data/via-at")));
        assert!(root.join("mnt.old/data/via-fd").exists());
        assert!(!outside.join("data/via-fd").exists());
        assert!(!outside.join("data/via-at").exists());
    }

    #[test]
    fn a_symlink_swapped_in_for_a_made_directory_is_not_followed() {
        let (_tmp, root, outside) = root_and_outside();
        let r = RootDir::open(&root).unwrap();
        // What mkdir_all does for each missing component, with the race made by hand: the
        // directory it just made is replaced by a symlink before it is reopened.
        let dir = r.resolve_dir(Path::new("/")).unwrap();
        rustix::fs::mkdirat(&dir, "new", Mode::from_raw_mode(0o755)).unwrap();
        fs::remove_dir(root.join("new")).unwrap();
        symlink(&outside, root.join("new")).unwrap();
        let reopened = open_how(
            dir.as_fd(),
            Path::new("new"),
            OFlags::PATH | OFlags::DIRECTORY,
            0,
            no_symlinks(),
        );
        assert_eq!(reopened.unwrap_err(), Errno::ELOOP);
    }

    #[test]
    fn files_parents_and_errors() {
        let (_tmp, root, outside) = root_and_outside();
        fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        symlink("/../outside", root.join("dev")).unwrap();
        fs::create_dir(root.join("outside")).unwrap();
        let r = RootDir::open(&root).unwrap();

        // A device node's parent: /dev is a symlink aimed outside; it resolves inside.
        let (parent, name) = r.parent_of(Path::new("/dev/null"), 0o755).unwrap();
        assert_eq!(name, "null");
        assert!(same_file(&parent, &root.join("outside")));
        assert!(!exists_in(&parent, &name).unwrap());
        create_in(&parent, &name, 0o600).unwrap();
        assert!(exists_in(&parent, &name).unwrap());
        assert_eq!(create_in(&parent, &name, 0o600).unwrap_err(), Errno::EEXIST);

        // An existing file is reused as a bind target; a file where a directory is needed
        // is ENOTDIR; a path without a last name is EINVAL.
        let f = r.create_file(Path::new("/etc/passwd"), 0o644).unwrap();
        assert!(same_file(&f, &root.join("etc/passwd")));
        assert_eq!(
            r.mkdir_all(Path::new("/etc/passwd/x"), 0o755).unwrap_err(),
            Errno::ENOTDIR
        );
        assert_eq!(
            r.mkdir_all(Path::new("/etc/passwd"), 0o755).unwrap_err(),
            Errno::ENOTDIR
        );
        assert_eq!(
            r.parent_of(Path::new("/"), 0o755).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            r.mkdir_all(Path::new("/missing/../x"), 0o755).unwrap_err(),
            Errno::ENOENT
        );
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(r.resolve(Path::new("/loop/x")).unwrap_err(), Errno::ELOOP);
        assert!(root.join("outside/null").exists());
        assert!(entries(&outside).is_empty());
    }
}
