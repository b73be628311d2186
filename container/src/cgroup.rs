//! cgroup v2: one leaf cgroup per container under the agent's `cgroup_parent`; the spec's
//! `linux.resources` translated to cgroup v2 files; stats, OOM kills, killing and removal.

use std::fs;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use crate::child::{ChildError, StepResult};
use crate::{Error, Stats};

/// The controllers enabled for containers, where the kernel has them.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// A container's cgroup directory.
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `parent/id` (and `parent`), enabling the controllers from the cgroup2 mount's
    /// root down to `parent`. An existing, empty directory is reused (a leftover of a crash);
    /// one with processes means the id is taken.
    pub fn create(parent: &Path, id: &str) -> Result<Cgroup, Error> {
        if !parent.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "cgroup_parent {} is not absolute",
                parent.display()
            )));
        }
        let root = cgroup2_root(parent)?;
        fs::create_dir_all(parent).map_err(|e| Error::cgroup(parent, "mkdir", e))?;
        let mut dir = root.clone();
        enable_controllers(&dir)?;
        for part in parent
            .strip_prefix(&root)
            .unwrap_or(Path::new(""))
            .components()
        {
            dir.push(part);
            enable_controllers(&dir)?;
        }
        let path = parent.join(id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let cg = Cgroup { path: path.clone() };
                if !cg.pids()?.is_empty() {
                    return Err(Error::AlreadyExists {
                        id: id.to_string(),
                        cgroup: path,
                    });
                }
                tracing::debug!(cgroup = %path.display(), "reusing an empty cgroup");
            }
            Err(e) => return Err(Error::cgroup(&path, "mkdir", e)),
        }
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the resources (also what `update` does).
    pub fn apply(&self, r: &LinuxResources) -> Result<(), Error> {
        for (file, value) in resource_writes(r)? {
            let target = self.path.join(&file);
            if file == "memory.swap.max" && !target.exists() {
                // No swap accounting in this kernel (no swap): nothing can be swapped anyway.
                tracing::debug!("memory.swap.max missing, swap limit not applied");
                continue;
            }
            fs::write(&target, &value)
                .map_err(|e| Error::cgroup(&self.path, format!("writing {file} = {value:?}"), e))?;
        }
        Ok(())
    }

    /// `cgroup.procs` opened for the child to write itself into.
    pub fn procs_for_join(&self) -> Result<OwnedFd, Error> {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .map_err(|e| Error::cgroup(&self.path, "opening cgroup.procs", e))?;
        Ok(f.into())
    }

    /// The pids in the cgroup (host PID namespace numbers).
    pub fn pids(&self) -> Result<Vec<i32>, Error> {
        let text = self.read("cgroup.procs")?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Memory, CPU and pids counters.
    pub fn stats(&self) -> Result<Stats, Error> {
        let memory_usage = self.read_u64("memory.current")?;
        let max = self.read("memory.max")?;
        let memory_limit = match max.trim() {
            "max" => None,
            v => v.parse().ok(),
        };
        let cpu_usage_usec = flat_keyed(&self.read("cpu.stat")?, "usage_usec").unwrap_or(0);
        let pids_current = self.read_u64("pids.current")?;
        Ok(Stats {
            memory_usage,
            memory_limit,
            cpu_usage_usec,
            pids_current,
        })
    }

    /// How many processes the OOM killer has killed in this cgroup.
    pub fn oom_kill_count(&self) -> Result<u64, Error> {
        Ok(flat_keyed(&self.read("memory.events")?, "oom_kill").unwrap_or(0))
    }

    pub fn memory_events_path(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// Sends `sig` to every process: SIGKILL through `cgroup.kill` (atomic, Linux 5.14+),
    /// otherwise one by one from `cgroup.procs` (processes gone meanwhile are skipped).
    pub fn kill_all(&self, sig: Signal) -> Result<(), Error> {
        let kill_file = self.path.join("cgroup.kill");
        if sig == Signal::SIGKILL && kill_file.exists() {
            return fs::write(&kill_file, "1")
                .map_err(|e| Error::cgroup(&self.path, "writing cgroup.kill", e));
        }
        for pid in self.pids()? {
            match kill(Pid::from_raw(pid), sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(Error::io(format!("kill({pid}, {sig})"), e)),
            }
        }
        Ok(())
    }

    /// Waits until no process is left (the caller reaps them) and removes the directory.
    pub fn remove(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::CgroupBusy {
                        path: self.path.clone(),
                        secs: timeout.as_secs(),
                    })
                }
                Err(e) => return Err(Error::cgroup(&self.path, "rmdir", e)),
            }
        }
    }

    fn read(&self, file: &str) -> Result<String, Error> {
        fs::read_to_string(self.path.join(file))
            .map_err(|e| Error::cgroup(&self.path, format!("reading {file}"), e))
    }

    fn read_u64(&self, file: &str) -> Result<u64, Error> {
        let text = self.read(file)?;
        text.trim().parse().map_err(|_| {
            Error::cgroup(
                &self.path,
                format!("parsing {file}"),
                io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string()),
            )
        })
    }
}

/// The cgroup2 mount that `path` (or its nearest existing ancestor) is on: its top directory.
fn cgroup2_root(path: &Path) -> Result<PathBuf, Error> {
    let is_cgroup2 = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
    let mut existing = path;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| Error::CgroupV2Required(path.to_path_buf()))?;
    }
    if !is_cgroup2(existing) {
        return Err(Error::CgroupV2Required(path.to_path_buf()));
    }
    let mut root = existing;
    while let Some(up) = root.parent() {
        if !is_cgroup2(up) {
            break;
        }
        root = up;
    }
    Ok(root.to_path_buf())
}

/// Enables the wanted controllers (those the kernel offers here) for `dir`'s children.
fn enable_controllers(dir: &Path) -> Result<(), Error> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| Error::cgroup(dir, "reading cgroup.controllers", e))?;
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control"))
        .map_err(|e| Error::cgroup(dir, "reading cgroup.subtree_control", e))?;
    for c in CONTROLLERS {
        let has = |text: &str| text.split_whitespace().any(|x| x == c);
        if has(&available) && !has(&enabled) {
            fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).map_err(|e| {
                Error::cgroup(
                    dir,
                    format!("enabling the {c} controller (a cgroup with processes cannot have child cgroups with controllers)"),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// Child: moves the calling process into the cgroup (`0` means "the writer").
pub(crate) fn join(procs: BorrowedFd<'_>) -> StepResult {
    nix::unistd::write(procs, b"0")
        .map(drop)
        .map_err(|e| ChildError::errno("cgroup", "joining the container's cgroup", e))
}

/// cgroup v1 `cpu.shares` (2..262144) to v2 `cpu.weight` (1..10000), as runc and crun do.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines).
pub(crate) fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

/// Translates `linux.resources` to (file, value) writes in the order they must happen.
/// Parts that have no cgroup v2 meaning here are logged and skipped; impossible values are
/// errors.
pub(crate) fn resource_writes(r: &LinuxResources) -> Result<Vec<(String, String)>, Error> {
    let mut w: Vec<(String, String)> = Vec::new();
    let mut put = |f: &str, v: String| w.push((f.to_string(), v));
    let limit_or_max = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(res) = m.reservation() {
            put("memory.low", limit_or_max(res));
        }
        if let Some(limit) = m.limit() {
            put("memory.max", limit_or_max(limit));
        }
        if let Some(swap) = m.swap() {
            // OCI's swap is memory+swap (v1 semantics); v2 limits swap alone.
            let value = match (swap, m.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(Error::InvalidSpec(format!(
                            "linux.resources.memory: swap {s} (memory+swap) is below limit {l}"
                        )));
                    }
                    (s - l).to_string()
                }
                (_, _) => {
                    return Err(Error::InvalidSpec(
                        "linux.resources.memory: swap needs a memory limit".into(),
                    ))
                }
            };
            put("memory.swap.max", value);
        }
        if m.kernel().is_some() || m.kernel_tcp().is_some() || m.swappiness().is_some() {
            tracing::warn!(
                "memory.kernel/kernelTCP/swappiness have no cgroup v2 equivalent; ignored"
            );
        }
        if m.disable_oom_killer() == Some(true) {
            return Err(Error::Unsupported(
                "linux.resources.memory.disableOOMKiller (no cgroup v2 equivalent)".into(),
            ));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares() {
            if shares > 0 {
                put("cpu.weight", shares_to_weight(shares).to_string());
            }
        }
        if c.quota().is_some() || c.period().is_some() {
            let period = c.period().unwrap_or(100_000);
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            put("cpu.max", format!("{quota} {period}"));
        }
        if let Some(burst) = c.burst() {
            put("cpu.max.burst", burst.to_string());
        }
        if let Some(idle) = c.idle() {
            put("cpu.idle", idle.to_string());
        }
        if let Some(cpus) = c.cpus() {
            put("cpuset.cpus", cpus.clone());
        }
        if let Some(mems) = c.mems() {
            put("cpuset.mems", mems.clone());
        }
        if c.realtime_runtime().is_some() || c.realtime_period().is_some() {
            return Err(Error::Unsupported(
                "linux.resources.cpu.realtimeRuntime/realtimePeriod (cgroup v2 has no RT groups)"
                    .into(),
            ));
        }
    }
    if let Some(p) = r.pids() {
        put(
            "pids.max",
            limit_or_max(if p.limit() > 0 { p.limit() } else { -1 }),
        );
    }
    if let Some(u) = r.unified() {
        let mut keys: Vec<_> = u.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.contains('/') || k.starts_with("cgroup.") || k.is_empty() {
                return Err(Error::InvalidSpec(format!(
                    "linux.resources.unified: {k:?} is not a controller file"
                )));
            }
            put(k, v.clone());
        }
    }
    if r.block_io().is_some()
        || r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())
        || r.network().is_some()
        || r.rdma().is_some()
    {
        tracing::warn!("blockIO/hugepageLimits/network/rdma resources are not applied");
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn resources_translate_to_cgroup_v2_files() {
        let r = res(
            r#"{"memory":{"limit":33554432,"swap":33554432},"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":5}}"#,
        );
        let w = resource_writes(&r).unwrap();
        let get = |f: &str| w.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("33554432"));
        assert_eq!(get("memory.swap.max"), Some("0"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("pids.max"), Some("5"));

        let w = resource_writes(&res(
            r#"{"memory":{"limit":-1,"swap":-1},"pids":{"limit":0},"cpu":{"period":20000}}"#,
        ))
        .unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("memory.swap.max".to_string(), "max".to_string()),
                ("cpu.max".to_string(), "max 20000".to_string()),
                ("pids.max".to_string(), "max".to_string()),
            ]
        );
    }

    #[test]
    fn impossible_resources_are_errors() {
        assert!(resource_writes(&res(r#"{"memory":{"limit":100,"swap":50}}"#)).is_err());
        assert!(resource_writes(&res(r#"{"memory":{"swap":50}}"#)).is_err());
        assert!(resource_writes(&res(r#"{"unified":{"../x":"1"}}"#)).is_err());
        assert!(matches!(
            resource_writes(&res(r#"{"memory":{"disableOOMKiller":true}}"#)),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn shares_map_to_weight_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn flat_keyed_files_parse() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(flat_keyed(events, "oom_kill"), Some(2));
        assert_eq!(flat_keyed(events, "oom"), Some(3));
        assert_eq!(flat_keyed(events, "nope"), None);
    }
}
