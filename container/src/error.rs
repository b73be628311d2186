//! The crate's error type: one variant per thing the agent may want to tell apart.

use std::io;
use std::path::PathBuf;

/// What can go wrong creating or managing a container.
///
/// Setup failures inside the new process (before it runs the workload) come back to the parent
/// over an error pipe and surface as [`Error::ExecutableNotFound`], [`Error::PermissionDenied`]
/// or [`Error::Setup`]; [`Error::exit_code_hint`] gives the shell-style exit code for them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container id is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid container id {0:?}: want 1 to 64 characters of [A-Za-z0-9_.-]")]
    InvalidId(String),
    /// The runtime spec (or its JSON) is malformed or inconsistent; the text names the field.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The spec asks for something this runtime does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// `start` was called on a container that was started already.
    #[error("container {id} was already started (init pid {pid})")]
    AlreadyStarted { id: String, pid: i32 },
    /// The container is not running: never started, or its init process has exited.
    #[error("container {id} is not running")]
    NotRunning { id: String },
    /// A container with this id (its cgroup, with processes in it) exists already.
    #[error("container {id} exists already: cgroup {} has processes", cgroup.display())]
    AlreadyExists { id: String, cgroup: PathBuf },
    /// The process's executable does not exist (or its interpreter does not): exit 127 semantics.
    #[error("executable not found: {path}")]
    ExecutableNotFound { path: String },
    /// The process's executable exists but cannot be executed: exit 126 semantics.
    #[error("permission denied: {path} cannot be executed")]
    PermissionDenied { path: String },
    /// A step of the container process's setup failed before the workload ran.
    #[error("container setup failed at step `{step}`: {message}")]
    Setup { step: String, message: String },
    /// The pid is not (or no longer) a process of this container.
    #[error("no such process: {pid}")]
    NoSuchProcess { pid: i32 },
    /// The signal number is not a valid signal.
    #[error("invalid signal number {0}")]
    InvalidSignal(i32),
    /// `cgroup_parent` is not on a cgroup v2 file system.
    #[error("{} is not on a cgroup v2 file system (cgroup2 must be mounted, e.g. at /sys/fs/cgroup)", .0.display())]
    CgroupV2Required(PathBuf),
    /// Reading or writing a cgroup file failed.
    #[error("cgroup {}: {op}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        op: String,
        #[source]
        source: io::Error,
    },
    /// The cgroup could not be emptied and removed in time.
    #[error("cgroup {} still has processes after {secs} s", path.display())]
    CgroupBusy { path: PathBuf, secs: u64 },
    /// The seccomp profile could not be translated into a BPF filter.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Another operating-system call in the parent failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    pub(crate) fn cgroup(
        path: impl Into<PathBuf>,
        op: impl Into<String>,
        source: io::Error,
    ) -> Self {
        Error::Cgroup {
            path: path.into(),
            op: op.into(),
            source,
        }
    }

    /// The exit code a shell would report for this failure to start a process: 127 for a
    /// missing executable, 126 for one that cannot be executed, `None` for other errors.
    pub fn exit_code_hint(&self) -> Option<i32> {
        match self {
            Error::ExecutableNotFound { .. } => Some(127),
            Error::PermissionDenied { .. } => Some(126),
            _ => None,
        }
    }
}
