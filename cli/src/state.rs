//! Named runs on disk: `$MICROVM_HOME/runs/<id>/` (default `/var/lib/microvm/runs`, or
//! `~/.local/share/microvm/runs` for other users) holds `run.json` (what the run is and how it
//! stands), the VMM's `vsock.sock` (how `exec`, `stop` and `kill` reach the guest agent),
//! `console.log`, the logs of a detached run and the virtio-fs share root. Ids are 12 hex digits so
//! socket paths stay far below the 108-byte limit.
//!
//! Whoever can reach a run's directory can reach its guest agent through the socket, so the
//! state directories are 0700 and their files 0600 from creation (`image::owner_only`), and a
//! state directory that is a symlink or another user's is refused.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::owner_only;
use serde::{Deserialize, Serialize};

use crate::spec::ProcessTemplate;

/// `$MICROVM_HOME`, else `/var/lib/microvm` as root, else `$HOME/.local/share/microvm`.
pub fn home() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    home_from(
        std::env::var_os("MICROVM_HOME"),
        std::env::var_os("HOME"),
        root,
    )
}

/// [`home`] from the two variables (an empty one counts as unset). A user other than root
/// with neither gets an error: there is no shared fallback such as `/tmp`, where another user
/// could have made the directory first.
fn home_from(
    microvm_home: Option<OsString>,
    home: Option<OsString>,
    root: bool,
) -> Result<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(h) = set(microvm_home) {
        return Ok(h);
    }
    if root {
        return Ok(PathBuf::from("/var/lib/microvm"));
    }
    match set(home) {
        Some(h) => Ok(h.join(".local/share/microvm")),
        None => bail!(
            "neither MICROVM_HOME nor HOME is set: set MICROVM_HOME to the directory where \
             microvm keeps its state (or HOME)"
        ),
    }
}

/// `<home>/runs`, made 0700 (with `home`) when missing.
pub fn runs_dir() -> Result<PathBuf> {
    runs_dir_in(&home()?)
}

fn runs_dir_in(home: &Path) -> Result<PathBuf> {
    let runs = home.join("runs");
    for dir in [home, &runs] {
        owner_only::ensure_dir(dir)
            .with_context(|| format!("the state directory {}", dir.display()))?;
    }
    Ok(runs)
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its VM is being started.
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub created_unix: u64,
    pub status: Status,
    pub exit_code: Option<i32>,
    /// The process that owns the VM: `microvm run` itself, or its `__monitor` for `-d`.
    pub owner_pid: Option<u32>,
    pub detached: bool,
    /// `--rm`: the run's directory goes when it ends.
    pub remove: bool,
    /// Why the run failed to start, or what happened to it ("out of memory").
    pub note: Option<String>,
    /// Environment, user and working directory `exec` reuses.
    pub process: ProcessTemplate,
    /// `-p`: the published ports (`ps` shows them).
    #[serde(default)]
    pub ports: Vec<crate::network::Publish>,
}

impl RunRecord {
    /// Running, and the process that owns its VM still exists.
    pub fn is_live(&self) -> bool {
        matches!(self.status, Status::Created | Status::Running)
            && self.owner_pid.is_some_and(pid_alive)
    }

    pub fn status_text(&self) -> String {
        match (self.status, self.is_live()) {
            (Status::Exited, _) => format!("exited ({})", self.exit_code.unwrap_or(-1)),
            (_, false) => "dead (its owner process is gone)".into(),
            (Status::Created, true) => "starting".into(),
            (Status::Running, true) => "running".into(),
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// The directory of run `id` (not made yet: see [`RunDir::create`]).
    pub fn new(id: &str) -> Result<Self> {
        Ok(Self {
            path: runs_dir()?.join(id),
        })
    }

    /// Makes the run's directory, 0700; it must not exist yet.
    pub fn create(&self) -> Result<()> {
        owner_only::create_dir(&self.path)
            .with_context(|| format!("create the run directory {}", self.path.display()))
    }

    pub fn record_path(&self) -> PathBuf {
        self.path.join("run.json")
    }
    pub fn plan_path(&self) -> PathBuf {
        self.path.join("plan.json")
    }
    pub fn vsock(&self) -> PathBuf {
        self.path.join("vsock.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn stdout_log(&self) -> PathBuf {
        self.path.join("stdout.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.path.join("stderr.log")
    }
    /// The detached monitor's own stdout and stderr.
    pub fn monitor_log(&self) -> PathBuf {
        self.path.join("monitor.log")
    }

    pub fn read(&self) -> Result<RunRecord> {
        let p = self.record_path();
        let text = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parse {}", p.display()))
    }

    /// Writes the record atomically (a reader never sees half of it).
    pub fn write(&self, r: &RunRecord) -> Result<()> {
        write_atomic(&self.record_path(), &serde_json::to_vec_pretty(r)?)
    }

    /// Reads, changes and writes the record.
    pub fn update(&self, f: impl FnOnce(&mut RunRecord)) -> Result<RunRecord> {
        let mut r = self.read()?;
        f(&mut r);
        self.write(&r)?;
        Ok(r)
    }
}

/// Replaces `path` with `data` atomically, as a 0600 file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    owner_only::write_atomic(path, data).with_context(|| format!("write {}", path.display()))
}

/// Opens a log under a run directory for appending, creating it 0600 whatever the umask (a
/// container's output is the run owner's alone); a symlink at `path` is refused.
pub fn open_log(path: &Path) -> Result<fs::File> {
    Ok(sandbox::Console::open_file(path)?)
}

/// Every run with a readable record, oldest first.
pub fn list() -> Result<Vec<(RunDir, RunRecord)>> {
    list_in(&home()?)
}

fn list_in(home: &Path) -> Result<Vec<(RunDir, RunRecord)>> {
    let dir = home.join("runs");
    if fs::symlink_metadata(&dir).is_err() {
        return Ok(Vec::new()); // nothing ever ran
    }
    for d in [home, &dir] {
        owner_only::check_dir(d).with_context(|| format!("the state directory {}", d.display()))?;
    }
    let entries = fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
    let mut runs = Vec::new();
    for e in entries.flatten() {
        // Only directories this process's user made (a symlink is not followed).
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let rd = RunDir { path: e.path() };
        if let Ok(r) = rd.read() {
            runs.push((rd, r));
        }
    }
    runs.sort_by_key(|(_, r)| (r.created_unix, r.id.clone()));
    Ok(runs)
}

/// A run by name, id, or unambiguous id prefix.
pub fn find(name_or_id: &str) -> Result<(RunDir, RunRecord)> {
    let runs = list()?;
    if let Some(i) = runs
        .iter()
        .position(|(_, r)| r.name == name_or_id || r.id == name_or_id)
    {
        return Ok(runs.into_iter().nth(i).unwrap());
    }
    let mut prefixed: Vec<_> = runs
        .into_iter()
        .filter(|(_, r)| !name_or_id.is_empty() && r.id.starts_with(name_or_id))
        .collect();
    match prefixed.len() {
        0 => bail!("no such run: {name_or_id}"),
        1 => Ok(prefixed.pop().unwrap()),
        n => bail!("{name_or_id} matches {n} runs; give more of the id"),
    }
}

/// A fresh 12-hex-digit id.
pub fn new_id() -> Result<String> {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// docker's name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 64;
    if !ok {
        bail!("invalid run name {name:?}: use 1 to 64 of [a-zA-Z0-9_.-], starting with a letter or digit");
    }
    Ok(())
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn home_has_no_tmp_fallback() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            home_from(some("/srv/mv"), some("/home/a"), false).unwrap(),
            Path::new("/srv/mv")
        );
        assert_eq!(
            home_from(None, some("/home/a"), true).unwrap(),
            Path::new("/var/lib/microvm")
        );
        assert_eq!(
            home_from(some(""), some("/home/a"), false).unwrap(),
            Path::new("/home/a/.local/share/microvm")
        );
        for home in [None, some("")] {
            let e = home_from(None, home, false).unwrap_err().to_string();
            assert!(
                e.contains("set MICROVM_HOME") && e.contains("nor HOME is set"),
                "{e}"
            );
        }
    }

    /// Under umask 000 (set in a copy of this test binary running only this test: the umask
    /// is the whole process's), every state directory is 0700 and every state file and log
    /// 0600.
    #[test]
    fn state_is_owner_only_under_umask_000() {
        if !test_support::alone_in_process("state::tests::state_is_owner_only_under_umask_000") {
            return;
        }
        // SAFETY: umask only changes this process's file creation mask.
        unsafe { libc::umask(0) };
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("state/microvm");
        let runs = runs_dir_in(&home).unwrap();
        let rd = RunDir {
            path: runs.join("0123456789ab"),
        };
        rd.create().unwrap();
        write_atomic(&rd.record_path(), b"{}").unwrap();
        write_atomic(&rd.plan_path(), b"{}").unwrap();
        // The logs a run writes: the detached process's, the monitor's, the VM console's.
        let logs = [rd.stdout_log(), rd.stderr_log(), rd.monitor_log()];
        for log in &logs {
            open_log(log).unwrap();
        }
        sandbox::Console::open_file(&rd.console()).unwrap();
        for dir in [
            tmp.path().join("state"),
            home.clone(),
            runs,
            rd.path.clone(),
        ] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
        for file in [rd.record_path(), rd.plan_path(), rd.console()]
            .into_iter()
            .chain(logs)
        {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        assert!(rd.create().is_err(), "an existing run directory is reused");
    }

    #[test]
    fn symlinked_or_foreign_state_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        runs_dir_in(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        let e = format!("{:#}", runs_dir_in(&link).unwrap_err());
        assert!(e.contains("symlink"), "{e}");
        let e = format!("{:#}", list_in(&link).unwrap_err());
        assert!(e.contains("symlink"), "{e}");

        // runs/ itself a symlink to a directory someone else prepared.
        let home = tmp.path().join("home");
        fs::create_dir(&home).unwrap();
        symlink(&real, home.join("runs")).unwrap();
        let e = format!("{:#}", runs_dir_in(&home).unwrap_err());
        assert!(e.contains("symlink") && e.contains("runs"), "{e}");

        let foreign = tmp.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        // SAFETY: geteuid has no preconditions.
        let other = unsafe { libc::geteuid() } + 1;
        std::os::unix::fs::chown(&foreign, Some(other), None).unwrap();
        let e = format!("{:#}", runs_dir_in(&foreign).unwrap_err());
        assert!(e.contains("belongs to uid"), "{e}");
    }

    #[test]
    fn names_and_ids() {
        assert!(check_name("web-1.a_b").is_ok());
        assert!(check_name("-x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
        let id = new_id().unwrap();
        assert_eq!(id.len(), 12);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, new_id().unwrap());
    }
}
