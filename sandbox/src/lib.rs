//! The host side of a microVM sandbox, shared by `microvm run` and the containerd shim.
//!
//! [`Sandbox::start`] builds an initramfs holding only the static guest agent as `/init`,
//! starts the VMM (`microvm-vmm`) as a child process with a typed [`vmm_api::VmConfig`] (the
//! kernel, that initramfs, the disks and a vsock device) in a sealed memfd on its descriptor 3,
//! and waits until the agent answers `Health`. Then every agent RPC is a
//! typed async method; processes get their stdin/stdout/stderr attached to host file
//! descriptors (or a terminal) through their own vsock streams, and [`Process::wait`] returns
//! only after all their output was written to those descriptors.
//!
//! Dropping a [`Sandbox`] kills and reaps the VMM and removes its sockets (and its state
//! directory when the sandbox made it). [`Sandbox::shutdown`] asks the agent to end the VM
//! cleanly instead.
//!
//! The API is async (tokio): the ttRPC client runs on the caller's runtime.

mod config;
mod console_text;
mod forward;
mod io;
pub mod jail;
pub mod locate;
mod port;
mod process;
mod rpc;
mod sandbox;
pub mod share;
mod vmm;

use std::process::ExitStatus;
use std::time::Duration;

pub use agent_protocol;
use agent_protocol::ttrpc::{self, Code};
/// The VMM's typed configuration (what [`Sandbox::start`] hands `microvm-vmm`).
pub use vmm_api;
pub use vmm_api::KernelParam;

pub use config::{
    Console, ContainerConfig, Disk, DiskRateLimit, Exit, Mount, ProcessIo, Rootfs, RootfsSource,
    SandboxConfig, SandboxSettings, TokenBucketConfig, WindowSize,
};
pub use forward::window_size;
pub use process::Process;
pub use sandbox::Sandbox;
pub use share::SharedDir;
pub use vmm::{vmm_command, CONFIG_FD};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host file, socket or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The VMM ended before the agent answered (the console's end is included).
    #[error("the VMM exited ({status}) before the agent answered{}", tail(.console))]
    VmmExited { status: ExitStatus, console: String },
    /// The agent did not answer `Health` in time.
    #[error("the guest agent did not answer within {timeout:?}{}", tail(.console))]
    AgentTimeout { timeout: Duration, console: String },
    /// The agent answered an RPC with an error status.
    #[error("{method}: {message} ({code:?})")]
    Rpc {
        method: &'static str,
        code: Code,
        message: String,
    },
    /// The RPC did not get through (connection lost, timeout on the host side).
    #[error("{method}: {source}")]
    Transport {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// The agent refused a stdio stream.
    #[error("the agent refused the stream {what}: {reason}")]
    StdioRefused { what: String, reason: String },
    /// A request the sandbox will not send (bad id, inconsistent stdio, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn tail(console: &str) -> String {
    if console.is_empty() {
        String::new()
    } else {
        format!("; console:\n{console}")
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The agent's status code, for an [`Error::Rpc`].
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn rpc(method: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Error::Rpc {
                method,
                code: s.code(),
                message: s.message,
            },
            other => Error::Transport {
                method,
                source: other,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_agents_status() {
        let e = Error::rpc(
            "StartContainer",
            ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "executable not found")),
        );
        assert_eq!(e.code(), Some(Code::NOT_FOUND));
        assert_eq!(
            e.to_string(),
            "StartContainer: executable not found (NOT_FOUND)"
        );
    }
}
