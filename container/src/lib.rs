//! OCI containers for the microvm guest agent, from a runtime spec (`oci_spec::runtime::Spec`),
//! written as clear steps.
//!
//! The agent is PID 1 in the guest and reaps every child; this crate never waits for a
//! process. Each container's init (and each `exec`) is a direct child of the caller, created
//! with `fork` after the PID namespace was chosen on a short-lived thread; its setup runs in
//! the child and a failure comes back over a close-on-exec error pipe before `execve`, so
//! `start`/`exec` fail with a precise [`Error`] (e.g. [`Error::ExecutableNotFound`]).
//!
//! ```text
//! create:  validate spec (spec.rs) → compile seccomp → make cgroup, apply resources (cgroup.rs)
//! start:   open namespace files, cgroup.procs, error pipe → thread: PID ns + fork (child.rs)
//!   child: signals, session, stdio, fds, oom_score_adj → join cgroup → join/unshare namespaces
//!          (namespaces.rs) → hostname, sysctl → mounts, devices, pivot_root, masked/readonly
//!          paths (mounts.rs) → pty (pty.rs) → rlimits, user, caps, no_new_privs, seccomp,
//!          execve (process.rs, seccomp.rs)
//! exec:    the same, entering the running init's namespaces through its pidfd
//! ```
//!
//! Module layout: `spec` (validation), `namespaces`, `cgroup`, `mounts`, `process`, `pty`,
//! `seccomp`, `child` (fork and the child's step order).

mod cgroup;
mod child;
mod devices;
mod error;
mod holder;
mod mounts;
mod namespaces;
mod process;
mod process_setup;
mod pty;
mod resolve;
mod rootfs;
mod seccomp;
mod spec;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

pub use error::Error;
pub use holder::NamespaceHolder;
/// In-root path resolution, also for the agent's own mounts under a container's root.
pub use resolve::{fd_path, RootDir};
pub use spec::{parse_spec, validate_id};

use crate::cgroup::Cgroup;
use crate::child::{Launch, Role};
use crate::process::ProcessPlan;
use crate::spec::Prepared;

/// How long [`Container::destroy`] waits for the container's processes to be gone.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`Container::create`] needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// `[A-Za-z0-9_.-]{1,64}`; names the cgroup `cgroup_parent/id`.
    pub id: String,
    /// Absolute path of the container's root directory (used instead of `spec.root.path`;
    /// `spec.root.readonly` applies).
    pub rootfs: PathBuf,
    pub spec: Spec,
    /// A directory on the cgroup v2 mount, e.g. `/sys/fs/cgroup/microvm`; created if missing.
    pub cgroup_parent: PathBuf,
    /// Namespaces to join instead of creating (pod-level shared pid/ipc/net/uts), by path
    /// (e.g. `/proc/<pid>/ns/pid`; see [`Container::namespace_path`]). Wins over the spec.
    pub join_namespaces: Vec<(LinuxNamespaceType, PathBuf)>,
}

/// The standard I/O of a container process.
#[derive(Debug)]
pub enum Stdio {
    /// Fds for the process (dup'ed onto 0/1/2; None = /dev/null).
    Fds {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
    /// A new pty, opened in the container's own devpts (`/dev/pts`, needed); the process gets
    /// the slave as its controlling terminal and 0/1/2; the master is returned.
    Terminal { rows: u16, cols: u16 },
}

/// A started process.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the caller's PID namespace (the caller reaps it).
    pub pid: i32,
    /// The pty master for [`Stdio::Terminal`].
    pub pty_master: Option<OwnedFd>,
}

/// Resource usage of a container's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// `memory.current`, bytes.
    pub memory_usage: u64,
    /// `memory.max`, bytes; `None` for no limit.
    pub memory_limit: Option<u64>,
    /// `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: u64,
    /// `pids.current`.
    pub pids_current: u64,
}

/// The container's init once started.
#[derive(Debug)]
struct Init {
    pid: i32,
    /// `None` when the process had already exited and been reaped when the pidfd was opened.
    pidfd: Option<OwnedFd>,
}

/// One container: a validated spec, a cgroup, and (once started) an init process.
#[derive(Debug)]
pub struct Container {
    id: String,
    rootfs: PathBuf,
    prepared: Prepared,
    cgroup: Cgroup,
    /// The BPF device filter on the cgroup (`None` where the kernel has no `bpf()`).
    device_filter: std::sync::Mutex<Option<devices::AttachedFilter>>,
    init: Option<Init>,
}

impl Container {
    /// Validates the spec (and compiles its seccomp profile), creates the container's cgroup
    /// and applies `linux.resources`. No process is created yet.
    pub fn create(opts: CreateOptions) -> Result<Container, Error> {
        validate_id(&opts.id)?;
        if !opts.rootfs.is_absolute() || !opts.rootfs.is_dir() {
            return Err(Error::InvalidSpec(format!(
                "rootfs {} is not an absolute path of a directory",
                opts.rootfs.display()
            )));
        }
        let prepared = spec::prepare(&opts.spec, &opts.join_namespaces)?;
        if let Some(s) = prepared
            .seccomp
            .as_ref()
            .filter(|s| !s.unknown_syscalls.is_empty())
        {
            tracing::info!(id = %opts.id, skipped = ?s.unknown_syscalls, "seccomp: syscalls x86_64 does not have");
        }
        for (i, m) in prepared.rootfs.mounts.iter().enumerate() {
            if let (mounts::MountKind::Bind { .. }, Some(src)) = (&m.kind, &m.source) {
                if !src.exists() {
                    return Err(Error::InvalidSpec(format!(
                        "mounts[{i}] ({}): bind source {} does not exist",
                        m.destination.display(),
                        src.display()
                    )));
                }
            }
        }
        let resources = opts
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let device_rules = devices::rules_from_spec(
            resources
                .and_then(|r| r.devices().as_deref())
                .unwrap_or_default(),
        )?;
        let cgroup = Cgroup::create(&opts.cgroup_parent, &opts.id)?;
        // Device rules always apply: without any in the spec, only the default devices.
        let configured = resources
            .map_or(Ok(()), |r| cgroup.apply(r))
            .and_then(|()| devices::apply(cgroup.path(), &device_rules, None));
        let device_filter = match configured {
            Ok(filter) => filter,
            Err(e) => {
                let _ = cgroup.remove(Duration::ZERO);
                return Err(e);
            }
        };
        tracing::info!(id = %opts.id, cgroup = %cgroup.path().display(), "container created");
        Ok(Container {
            id: opts.id,
            rootfs: opts.rootfs,
            prepared,
            cgroup,
            device_filter: std::sync::Mutex::new(device_filter),
            init: None,
        })
    }

    /// Runs `spec.process` as the container's init and returns once it has exec'd (or failed:
    /// the child has then exited and the caller reaps it). A second call is an error.
    pub fn start(&mut self, stdio: Stdio) -> Result<Spawned, Error> {
        if let Some(init) = &self.init {
            return Err(Error::AlreadyStarted {
                id: self.id.clone(),
                pid: init.pid,
            });
        }
        let launch = Launch {
            role: Role::Init {
                prep: &self.prepared,
                rootfs: &self.rootfs,
                joined: namespaces::open_joined(&self.prepared.namespaces)?,
            },
            process: &self.prepared.init,
            seccomp: self.prepared.seccomp.as_ref(),
            cgroup_procs: self.cgroup.procs_for_join()?,
        };
        let child = child::spawn(launch, stdio)?;
        tracing::info!(id = %self.id, pid = child.pid, "container started");
        self.init = Some(Init {
            pid: child.pid,
            pidfd: child.pidfd,
        });
        Ok(Spawned {
            pid: child.pid,
            pty_master: child.pty_master,
        })
    }

    /// Runs another process in the running container: its namespaces, cgroup, root, and the
    /// spec's seccomp profile; user, capabilities, rlimits etc. from `process`.
    pub fn exec(&self, process: &Process, stdio: Stdio) -> Result<Spawned, Error> {
        let plan = ProcessPlan::from_spec(process, "exec process")?;
        let (pidfd, root) = self.running_init_root()?;
        let launch = Launch {
            role: Role::Exec {
                pidfd,
                namespaces: self.prepared.namespaces.all,
                root,
            },
            process: &plan,
            seccomp: self.prepared.seccomp.as_ref(),
            cgroup_procs: self.cgroup.procs_for_join()?,
        };
        let child = child::spawn(launch, stdio)?;
        tracing::debug!(id = %self.id, pid = child.pid, "exec started");
        Ok(Spawned {
            pid: child.pid,
            pty_master: child.pty_master,
        })
    }

    /// The init's pid (in the caller's PID namespace) once started.
    pub fn init_pid(&self) -> Option<i32> {
        self.init.as_ref().map(|i| i.pid)
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's cgroup directory.
    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    /// `/proc/<init>/ns/<type>` while the init runs: what a later container of the same pod
    /// puts in [`CreateOptions::join_namespaces`] to share this one's namespace.
    pub fn namespace_path(&self, typ: LinuxNamespaceType) -> Option<PathBuf> {
        Some(proc_namespace_path(self.init_pid()?, typ))
    }

    /// Sends `signal` to one of the container's processes. A pid that has exited (even if not
    /// yet reaped) or is not in the container is [`Error::NoSuchProcess`]. Signal 0 only checks.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<(), Error> {
        let sig = to_signal(signal)?;
        if let Some(init) = self.init.as_ref().filter(|i| i.pid == pid) {
            let Some(pidfd) = init.pidfd.as_ref().filter(|fd| !has_exited(fd)) else {
                return Err(Error::NoSuchProcess { pid });
            };
            let Some(sig) = sig else { return Ok(()) };
            let rsig = rustix::process::Signal::from_named_raw(sig as i32)
                .ok_or(Error::InvalidSignal(signal))?;
            return match rustix::process::pidfd_send_signal(pidfd, rsig) {
                Ok(()) => Ok(()),
                Err(rustix::io::Errno::SRCH) => Err(Error::NoSuchProcess { pid }),
                Err(e) => Err(Error::io(format!("pidfd_send_signal({pid}, {signal})"), e)),
            };
        }
        if pid <= 0 || !self.cgroup.pids()?.contains(&pid) {
            return Err(Error::NoSuchProcess { pid });
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) => Err(Error::NoSuchProcess { pid }),
            Err(e) => Err(Error::io(format!("kill({pid}, {signal})"), e)),
        }
    }

    /// Sends `signal` to every process of the container (SIGKILL through `cgroup.kill`).
    pub fn signal_all(&self, signal: i32) -> Result<(), Error> {
        match to_signal(signal)? {
            Some(sig) => self.cgroup.kill_all(sig),
            None => Ok(()),
        }
    }

    /// The container's processes (pids in the caller's PID namespace).
    pub fn pids(&self) -> Result<Vec<i32>, Error> {
        self.cgroup.pids()
    }

    /// Memory, CPU and pids counters of the container's cgroup.
    pub fn stats(&self) -> Result<Stats, Error> {
        self.cgroup.stats()
    }

    /// Applies new resource limits to the running container. `devices`, when given, replace
    /// the device rules (the new filter is attached before the old one is detached).
    pub fn update(&self, resources: &LinuxResources) -> Result<(), Error> {
        if let Some(d) = resources.devices() {
            let rules = devices::rules_from_spec(d)?;
            let mut filter = self.device_filter.lock().unwrap_or_else(|e| e.into_inner());
            *filter = devices::apply(self.cgroup.path(), &rules, filter.take())?;
        }
        self.cgroup.apply(resources)
    }

    /// How many of the container's processes the OOM killer killed (`memory.events`).
    pub fn oom_kill_count(&self) -> Result<u64, Error> {
        self.cgroup.oom_kill_count()
    }

    /// The cgroup's `memory.events`, for the agent to watch (inotify/poll) for OOM kills.
    pub fn memory_events_path(&self) -> PathBuf {
        self.cgroup.memory_events_path()
    }

    /// Kills every process, waits (up to 10 s) until the caller has reaped them, and removes
    /// the cgroup. The container's mounts live in its own mount namespace and vanish with it.
    pub fn destroy(self) -> Result<(), Error> {
        if self.cgroup.path().exists() {
            self.cgroup.kill_all(Signal::SIGKILL)?;
        }
        self.cgroup.remove(DESTROY_TIMEOUT)?;
        tracing::info!(id = %self.id, "container destroyed");
        Ok(())
    }

    /// The running init's pidfd and its root directory, or [`Error::NotRunning`]. The pidfd
    /// is checked again after opening `/proc/<pid>/root`, so the directory cannot belong to
    /// another process that reused the pid.
    fn running_init_root(&self) -> Result<(&OwnedFd, OwnedFd), Error> {
        let not_running = || Error::NotRunning {
            id: self.id.clone(),
        };
        let init = self.init.as_ref().ok_or_else(not_running)?;
        let pidfd = init.pidfd.as_ref().ok_or_else(not_running)?;
        if has_exited(pidfd) {
            return Err(not_running());
        }
        let root = std::fs::File::open(format!("/proc/{}/root", init.pid))
            .map_err(|e| Error::io(format!("opening /proc/{}/root", init.pid), e))?;
        if has_exited(pidfd) {
            return Err(not_running());
        }
        Ok((pidfd, root.into()))
    }
}

/// `/proc/<pid>/ns/<name>` of a namespace type.
pub(crate) fn proc_namespace_path(pid: i32, typ: LinuxNamespaceType) -> PathBuf {
    let name = match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    };
    PathBuf::from(format!("/proc/{pid}/ns/{name}"))
}

/// Whether the process behind a pidfd has exited (a pidfd polls readable then).
fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// A signal number as a nix signal; 0 is `None` (existence check).
fn to_signal(signal: i32) -> Result<Option<Signal>, Error> {
    if signal == 0 {
        return Ok(None);
    }
    Signal::try_from(signal)
        .map(Some)
        .map_err(|_| Error::InvalidSignal(signal))
}

/// A `waitpid` status as a shell exit code: the exit status, or 128 + signal number for a
/// process killed by a signal (e.g. 137 for SIGKILL). Other statuses (stopped, continued)
/// give 255.
pub fn wait_status_to_exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(wait_status_to_exit_code(0), 0);
        assert_eq!(wait_status_to_exit_code(1 << 8), 1);
        assert_eq!(wait_status_to_exit_code(127 << 8), 127);
        assert_eq!(wait_status_to_exit_code(libc::SIGKILL), 137);
        assert_eq!(wait_status_to_exit_code(libc::SIGTERM | 0x80), 143); // core dumped bit
        assert_eq!(wait_status_to_exit_code(0x137f), 255); // stopped by SIGSTOP
    }

    #[test]
    fn signal_numbers_are_checked() {
        assert_eq!(to_signal(0).unwrap(), None);
        assert_eq!(to_signal(9).unwrap(), Some(Signal::SIGKILL));
        assert!(matches!(to_signal(-1), Err(Error::InvalidSignal(-1))));
        assert!(matches!(to_signal(4096), Err(Error::InvalidSignal(4096))));
    }

    #[test]
    fn create_rejects_bad_input_before_touching_cgroups() {
        let opts = |id: &str, rootfs: &str| CreateOptions {
            id: id.into(),
            rootfs: rootfs.into(),
            spec: Spec::default(),
            cgroup_parent: "/nonexistent-cgroup-parent".into(),
            join_namespaces: vec![],
        };
        assert!(matches!(
            Container::create(opts("a/b", "/")),
            Err(Error::InvalidId(_))
        ));
        assert!(matches!(
            Container::create(opts("ok", "relative")),
            Err(Error::InvalidSpec(_))
        ));
        // Bad device rules are refused before the cgroup exists.
        let mut bad_devices = opts("ok", "/");
        let resources: LinuxResources =
            serde_json::from_str(r#"{"devices": [{"allow": true, "access": "rwx"}]}"#).unwrap();
        let mut linux = bad_devices.spec.linux().clone().unwrap();
        linux.set_resources(Some(resources));
        bad_devices.spec.set_linux(Some(linux));
        match Container::create(bad_devices) {
            Err(Error::InvalidSpec(msg)) => assert!(msg.contains("devices[0]"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // A valid spec reaches the cgroup step, which wants cgroup v2.
        assert!(matches!(
            Container::create(opts("ok", "/")),
            Err(Error::CgroupV2Required(_))
        ));
    }
}
