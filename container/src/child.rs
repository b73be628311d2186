//! Creating a container process: the fork, the error pipe, and the child's sequence of steps.
//!
//! The process is a direct child of the caller (the agent, PID 1, reaps it):
//!
//! 1. The parent opens everything that can fail cheaply (namespace files, the cgroup's
//!    `cgroup.procs`, `/dev/null`, an error pipe with `O_CLOEXEC`).
//! 2. A short-lived thread sets its own "PID namespace for children" (new or joined) and calls
//!    glibc's `fork()`. The setting is per thread, so the caller's threads are untouched, and
//!    glibc's fork resets the allocator's locks in the child, so the child may allocate even
//!    though the agent is multi-threaded.
//! 3. The child runs the steps below; the first failure is written to the error pipe and the
//!    child `_exit`s. A successful `execve` closes the pipe (`O_CLOEXEC`), so the parent reads
//!    EOF: the workload runs.
//!
//! The child never logs (a logger's lock may be held by another thread of the parent at the
//! time of the fork); it reports only through the pipe.

use std::convert::Infallible;
use std::fmt::Display;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::unistd::{fork, pipe2, ForkResult};

use crate::cgroup;
use crate::namespaces::{self, OpenedNamespaces, PidNamespace};
use crate::process::ProcessPlan;
use crate::process_setup;
use crate::pty;
use crate::rootfs;
use crate::seccomp::SeccompProgram;
use crate::spec::Prepared;
use crate::{Error, Stdio};

/// What a failed child step reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildErrorKind {
    /// The executable (or its interpreter) does not exist.
    NotFound = 1,
    /// The executable exists but may not be executed.
    Permission = 2,
    /// Any other setup step.
    Setup = 3,
}

/// A failed step of the child, sent to the parent over the error pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildError {
    pub kind: ChildErrorKind,
    pub step: String,
    pub message: String,
}

/// The result of one child step.
pub(crate) type StepResult<T = ()> = Result<T, ChildError>;

impl ChildError {
    /// A setup step failed with a message.
    pub fn msg(step: &str, message: impl Into<String>) -> Self {
        ChildError {
            kind: ChildErrorKind::Setup,
            step: step.to_string(),
            message: message.into(),
        }
    }

    /// A setup step's system call failed: "what: description (ERRNO)".
    pub fn errno(step: &str, what: impl Display, e: Errno) -> Self {
        Self::msg(step, format!("{what}: {} ({e:?})", e.desc()))
    }

    /// A setup step's I/O failed.
    pub fn io(step: &str, what: impl Display, e: io::Error) -> Self {
        Self::msg(step, format!("{what}: {e}"))
    }

    /// Serialized for the pipe: kind byte, step, NUL, message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.kind as u8];
        out.extend_from_slice(self.step.as_bytes());
        out.push(0);
        out.extend_from_slice(self.message.as_bytes());
        out
    }

    /// The parent's view of what [`ChildError::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> ChildError {
        let kind = match bytes.first() {
            Some(1) => ChildErrorKind::NotFound,
            Some(2) => ChildErrorKind::Permission,
            _ => ChildErrorKind::Setup,
        };
        let rest = bytes.get(1..).unwrap_or_default();
        let (step, message) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&b"unknown"[..], rest),
        };
        ChildError {
            kind,
            step: String::from_utf8_lossy(step).into_owned(),
            message: String::from_utf8_lossy(message).into_owned(),
        }
    }

    /// The crate error the caller sees.
    pub fn into_error(self) -> Error {
        match self.kind {
            ChildErrorKind::NotFound => Error::ExecutableNotFound { path: self.message },
            ChildErrorKind::Permission => Error::PermissionDenied { path: self.message },
            ChildErrorKind::Setup => Error::Setup {
                step: self.step,
                message: self.message,
            },
        }
    }

    /// The child's exit status when it fails: shell conventions.
    fn exit_code(&self) -> i32 {
        match self.kind {
            ChildErrorKind::NotFound => 127,
            ChildErrorKind::Permission => 126,
            ChildErrorKind::Setup => 1,
        }
    }
}

/// Whether the process is a container's init (builds the container) or joins a running one.
pub(crate) enum Role<'a> {
    Init {
        prep: &'a Prepared,
        rootfs: &'a Path,
        joined: OpenedNamespaces,
    },
    Exec {
        pidfd: &'a OwnedFd,
        namespaces: CloneFlags,
        /// The init's root directory (`/proc/<pid>/root`), opened by the parent.
        root: OwnedFd,
    },
}

/// Everything the child needs, prepared by the parent.
pub(crate) struct Launch<'a> {
    pub role: Role<'a>,
    pub process: &'a ProcessPlan,
    pub seccomp: Option<&'a SeccompProgram>,
    /// The container cgroup's `cgroup.procs`, open for writing.
    pub cgroup_procs: OwnedFd,
}

/// The child's standard I/O, as prepared by the parent.
enum ChildStdio {
    Fds {
        fds: [Option<OwnedFd>; 3],
        dev_null: OwnedFd,
    },
    Terminal {
        rows: u16,
        cols: u16,
        dev_null: OwnedFd,
        /// The child's end of the socket the pty master is sent over.
        socket: OwnedFd,
    },
}

/// What [`spawn`] returns: the child's pid, a pidfd for it (when it was still there to open)
/// and the pty master for [`Stdio::Terminal`].
pub(crate) struct Child {
    pub pid: i32,
    pub pidfd: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
}

/// Creates the process and waits until it has exec'd the workload or failed.
pub(crate) fn spawn(launch: Launch<'_>, stdio: Stdio) -> Result<Child, Error> {
    let (err_read, err_write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe2", e))?;
    let dev_null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("opening /dev/null", e))?;
    let mut pty_socket = None;
    let child_stdio = match stdio {
        Stdio::Fds {
            stdin,
            stdout,
            stderr,
        } => ChildStdio::Fds {
            fds: [stdin, stdout, stderr],
            dev_null: dev_null.into(),
        },
        Stdio::Terminal { rows, cols } => {
            let (parent_end, child_end) = pty::socket_pair()?;
            pty_socket = Some(parent_end);
            ChildStdio::Terminal {
                rows,
                cols,
                dev_null: dev_null.into(),
                socket: child_end,
            }
        }
    };
    let pid_ns = match &launch.role {
        Role::Init { prep, joined, .. } => match (&joined.pid, prep.namespaces.new_pid) {
            (Some(fd), _) => PidNamespace::Join(fd),
            (None, true) => PidNamespace::New,
            (None, false) => PidNamespace::Inherit,
        },
        Role::Exec { pidfd, .. } => PidNamespace::Join(pidfd),
    };

    let forked = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(i32, Option<OwnedFd>), Error> {
                namespaces::set_pid_namespace_for_children(&pid_ns)?;
                // SAFETY: the child runs only `child_main`, which never returns: it ends in
                // `execve` or `_exit`. glibc's fork makes malloc usable in the child; the child
                // takes no other lock that another thread may have held (no logging, no
                // environment access, no stdio locks).
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => child_main(&launch, &child_stdio, err_write.as_fd()),
                    Ok(ForkResult::Parent { child }) => {
                        // A pidfd right away, before the reaper can collect the child: it
                        // guards later signals and `exec` against pid reuse.
                        let pidfd = rustix::process::Pid::from_raw(child.as_raw()).and_then(|p| {
                            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                                .ok()
                        });
                        Ok((child.as_raw(), pidfd))
                    }
                    Err(e) => Err(Error::io("fork", e)),
                }
            })
            .join()
            .unwrap_or_else(|_| Err(Error::io("spawner thread", io::Error::other("panicked"))))
    });
    // The parent's copies of the child's ends: closed here, so EOF on the pipe means exec.
    drop(err_write);
    drop(child_stdio);
    drop(launch);
    let (pid, pidfd) = forked?;

    let mut report = Vec::new();
    File::from(err_read)
        .read_to_end(&mut report)
        .map_err(|e| Error::io("reading the container process's error pipe", e))?;
    if !report.is_empty() {
        let err = ChildError::decode(&report);
        tracing::debug!(pid, step = %err.step, message = %err.message, "container process setup failed");
        return Err(err.into_error());
    }
    let pty_master = match pty_socket {
        Some(socket) => Some(pty::receive_master(&socket)?),
        None => None,
    };
    Ok(Child {
        pid,
        pidfd,
        pty_master,
    })
}

/// The forked child: runs the steps, reports the first failure, never returns.
fn child_main(launch: &Launch<'_>, stdio: &ChildStdio, err_pipe: BorrowedFd<'_>) -> ! {
    let failure = match catch_unwind(AssertUnwindSafe(|| child_steps(launch, stdio, err_pipe))) {
        Ok(Ok(never)) => match never {},
        Ok(Err(e)) => e,
        Err(_) => ChildError::msg("setup", "the container setup code panicked"),
    };
    let bytes = failure.encode();
    let mut sent = 0;
    while sent < bytes.len() {
        match nix::unistd::write(err_pipe, &bytes[sent..]) {
            Ok(n) if n > 0 => sent += n,
            Err(Errno::EINTR) => {}
            _ => break,
        }
    }
    exit_now(failure.exit_code())
}

/// Ends the forked child at once.
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without running atexit handlers or destructors, which
    // belong to the parent's copy of the program state; it is always sound to call.
    unsafe { libc::_exit(code) }
}

/// The child's steps, in order. Each is a small function with the reason it is where it is.
fn child_steps(
    launch: &Launch<'_>,
    stdio: &ChildStdio,
    err_pipe: BorrowedFd<'_>,
) -> StepResult<Infallible> {
    process_setup::reset_signals()?;
    process_setup::new_session()?;
    install_stdio(stdio)?;
    process_setup::close_inherited_fds(&fds_in_use(launch, stdio, err_pipe))?;
    process_setup::set_oom_score_adj(launch.process.oom_score_adj)?;
    cgroup::join(launch.cgroup_procs.as_fd())?;
    match &launch.role {
        Role::Init {
            prep,
            rootfs,
            joined,
        } => {
            namespaces::join(&joined.others)?;
            namespaces::unshare_new(prep.namespaces.unshare)?;
            if prep.namespaces.unshare.contains(CloneFlags::CLONE_NEWNET) {
                namespaces::loopback_up()
                    .map_err(|e| ChildError::errno("loopback", "bringing lo up", e))?;
            }
            process_setup::set_hostname(prep.hostname.as_deref(), prep.domainname.as_deref())?;
            process_setup::apply_sysctls(&prep.sysctl)?;
            rootfs::prepare_rootfs(rootfs, &prep.rootfs, &launch.process.cwd)?;
            rootfs::pivot_into(rootfs)?;
            rootfs::finish_rootfs(&prep.rootfs)?;
        }
        Role::Exec {
            pidfd,
            namespaces,
            root,
        } => {
            namespaces::enter_running(pidfd, *namespaces)?;
            rootfs::enter_root(root)?;
        }
    }
    if let ChildStdio::Terminal {
        rows, cols, socket, ..
    } = stdio
    {
        let slave = pty::open_in_container(*rows, *cols, socket)?;
        pty::make_controlling_terminal(slave)?;
    }
    process_setup::finalize_and_exec(launch.process, launch.seccomp)
}

/// The fds above 2 that the child's steps still use once stdio is in place; every other fd
/// it inherited from the agent is closed.
fn fds_in_use(launch: &Launch<'_>, stdio: &ChildStdio, err_pipe: BorrowedFd<'_>) -> Vec<RawFd> {
    let mut keep = vec![err_pipe.as_raw_fd(), launch.cgroup_procs.as_raw_fd()];
    match &launch.role {
        Role::Init { joined, .. } => {
            keep.extend(joined.others.iter().map(|(_, fd)| fd.as_raw_fd()));
        }
        Role::Exec { pidfd, root, .. } => {
            keep.extend([pidfd.as_raw_fd(), root.as_raw_fd()]);
        }
    }
    if let ChildStdio::Terminal { socket, .. } = stdio {
        keep.push(socket.as_raw_fd());
    }
    keep
}

/// Puts the process's stdin/stdout/stderr in place: the agent's fds or `/dev/null` (a terminal
/// replaces them later, once the container's `/dev/pts` exists).
fn install_stdio(stdio: &ChildStdio) -> StepResult {
    let sources: [BorrowedFd<'_>; 3] = match stdio {
        ChildStdio::Fds { fds, dev_null } => {
            let pick = |i: usize| fds[i].as_ref().map_or(dev_null.as_fd(), |fd| fd.as_fd());
            [pick(0), pick(1), pick(2)]
        }
        ChildStdio::Terminal { dev_null, .. } => [dev_null.as_fd(); 3],
    };
    process_setup::install_stdio(sources.map(|fd| fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_error_round_trips_and_maps() {
        let e = ChildError {
            kind: ChildErrorKind::NotFound,
            step: "exec".into(),
            message: "/bin/nope".into(),
        };
        let back = ChildError::decode(&e.encode());
        assert_eq!(back, e);
        assert_eq!(back.exit_code(), 127);
        let err = back.into_error();
        assert_eq!(err.to_string(), "executable not found: /bin/nope");
        assert_eq!(err.exit_code_hint(), Some(127));

        let e = ChildError::errno("mount", "mount /x", Errno::ENOENT);
        assert_eq!(e.message, "mount /x: No such file or directory (ENOENT)");
        match ChildError::decode(&e.encode()).into_error() {
            Error::Setup { step, message } => {
                assert_eq!(step, "mount");
                assert!(message.contains("ENOENT"));
            }
            other => panic!("{other:?}"),
        }
        let p = ChildError {
            kind: ChildErrorKind::Permission,
            step: "exec".into(),
            message: "/etc/passwd".into(),
        };
        assert_eq!(ChildError::decode(&p.encode()).exit_code(), 126);
    }
}
