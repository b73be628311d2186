//! Host-side observations for leak checks: processes, mounts, sockets and `flock`s that a
//! run (a VMM, its monitor, its virtiofsd, the image store) may leave behind.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A live (not zombie) process.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    /// Its arguments, lossily decoded.
    pub args: Vec<String>,
    /// Its working directory, if readable.
    pub cwd: Option<PathBuf>,
}

/// Every live process of this host (of this L1 inside the testbed).
pub fn processes() -> Vec<Process> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if state.is_none() || state == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
        found.push(Process { pid, args, cwd });
    }
    found
}

/// Live processes whose program name (argv\[0\]'s last component) is `name`.
pub fn processes_named(name: &str) -> Vec<Process> {
    processes()
        .into_iter()
        .filter(|p| {
            p.args
                .first()
                .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == name))
        })
        .collect()
}

/// Live processes that work under `dir` or name a path under it among their arguments (a VMM
/// started in its run directory, a monitor or virtiofsd given paths there).
pub fn processes_under(dir: &Path) -> Vec<Process> {
    let dir = canonical(dir);
    let dir_text = dir.to_string_lossy().into_owned();
    processes()
        .into_iter()
        .filter(|p| p.pid != std::process::id())
        .filter(|p| {
            p.cwd.as_deref().is_some_and(|c| c.starts_with(&dir))
                || p.args.iter().any(|a| a.contains(&dir_text))
        })
        .collect()
}

/// Mount points at or under `dir` (from this process's mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = canonical(dir);
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// Every file under `dir` (symlinks not followed), `dir` included.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&p) {
            if meta.is_dir() {
                for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    todo.push(e.path());
                }
            }
            out.push(p);
        }
    }
    out
}

/// Unix sockets under `dir`.
pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .collect()
}

/// Files under `dir` on which some process holds a lock (`flock` or POSIX), from `/proc/locks`.
pub fn locked_files_under(dir: &Path) -> Vec<PathBuf> {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF": major:minor:inode in field 5.
    let held: Vec<(u64, u64)> = locks
        .lines()
        .filter_map(|l| {
            let id = l.split_whitespace().find(|w| w.matches(':').count() == 2)?;
            let mut parts = id.split(':');
            let major = u64::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u64::from_str_radix(parts.next()?, 16).ok()?;
            let inode = parts.next()?.parse().ok()?;
            Some((libc::makedev(major as u32, minor as u32), inode))
        })
        .collect();
    walk(dir)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| held.contains(&(m.dev(), m.ino()))))
        .collect()
}

fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_held_flock_and_a_socket_are_seen_and_a_released_one_is_not() {
        let dir = std::env::temp_dir().join(format!("test-support-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join("store.lock");
        let file = std::fs::File::create(&lock).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert_eq!(locked_files_under(&dir), vec![lock.clone()]);
        // Unlock explicitly rather than by closing: a test beside this one that forks (to spawn
        // a program) copies our descriptor into its child until that child's exec closes it, and
        // a lock held by an open file description outlives our close while the copy exists.
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) }, 0);
        assert!(locked_files_under(&dir).is_empty());
        drop(file);

        let sock = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(sockets_under(&dir), vec![sock]);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_child_working_in_a_directory_is_found_until_it_ends() {
        let dir = std::env::temp_dir().join(format!("test-support-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let found = processes_under(&dir);
        assert!(found.iter().any(|p| p.pid == child.id()), "{found:?}");
        assert!(processes_named("sleep").iter().any(|p| p.pid == child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!processes_under(&dir).iter().any(|p| p.pid == child.id()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
