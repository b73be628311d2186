//! Named runs on disk: `$MICROVM_HOME/runs/<id>/` (default `/var/lib/microvm/runs`, or
//! `~/.local/share/microvm/runs` for other users) holds `run.json` (what the run is and how it
//! stands), the VMM's `vsock.sock` (how `exec`, `stop` and `kill` reach the guest agent),
//! `console.log`, the logs of a detached run and the virtio-fs share root. Ids are 12 hex digits so
//! socket paths stay far below the 108-byte limit.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::spec::ProcessTemplate;

/// `$MICROVM_HOME`, else `/var/lib/microvm` as root, else `~/.local/share/microvm`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("MICROVM_HOME") {
        return PathBuf::from(h);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/microvm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/share/microvm")
}

pub fn runs_dir() -> PathBuf {
    home().join("runs")
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
    pub fn new(id: &str) -> Self {
        Self {
            path: runs_dir().join(id),
        }
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

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename {}", tmp.display()))?;
    Ok(())
}

/// Every run with a readable record, oldest first.
pub fn list() -> Result<Vec<(RunDir, RunRecord)>> {
    let dir = runs_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut runs = Vec::new();
    for e in entries.flatten() {
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
