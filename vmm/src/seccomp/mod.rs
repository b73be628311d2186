//! A seccomp filter per VMM thread, as Firecracker and Cloud Hypervisor do it: each thread
//! role has its own list of allowed system calls, with the arguments checked where a call is
//! dangerous in general but needed narrowly here (`ioctl` only with the KVM and tap requests
//! the role issues, `mmap`/`mprotect` never executable, `socket` only `AF_UNIX` streams,
//! `tgkill` only to this process's threads with the one signal the role sends).
//!
//! The lists are Rust data beside this code, one small function per source of calls:
//! [`common`] (every thread: the runtime, the console, the log), [`vcpu`], [`event_loop`], and
//! [`devices`] (per kind of device, added only for a VM that has one). They were taken from
//! real guests' system calls (`strace -f` of the VMM in the testbed, with `SeccompMode::Log`),
//! not guessed.
//!
//! Each thread installs its own filter ([`ThreadFilter::install`], without TSYNC) right before
//! it serves guest-controlled input: a vCPU thread before its first `KVM_RUN`, the event thread
//! after every vCPU thread is started and before its loop. Nothing the VMM does after that
//! (serving devices, a guest reset, the VM's end) needs a call outside its thread's list;
//! opening files, creating VMs, spawning threads, `execve`, `ptrace`, other socket families
//! and every other ioctl are refused. In [`SeccompMode::Enforce`] (the default) a refused
//! call kills the whole VMM (`SECCOMP_RET_KILL_PROCESS`, which the kernel also logs).

mod common;
mod devices;
mod event_loop;
mod ioctls;
mod rules;
mod vcpu;

#[cfg(test)]
mod tests;

use seccompiler::{BackendError, BpfProgram, SeccompAction};

pub use devices::DeviceSet;
pub use vmm_api::SeccompMode;

/// What a thread serves, and so which list it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// The thread that runs the event loop (the caller of `vm::run`).
    EventLoop,
    /// A `vcpuN` thread.
    Vcpu,
}

impl std::fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadRole::EventLoop => "event",
            ThreadRole::Vcpu => "vCPU",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {role} thread: {source}")]
    Compile {
        role: ThreadRole,
        source: BackendError,
    },
    #[error("cannot install the seccomp filter of the {role} thread: {source}")]
    Install {
        role: ThreadRole,
        source: seccompiler::Error,
    },
}

/// The allowed calls of `role` in a VM with `devices`, for this process (`tgkill` is allowed
/// only towards `pid`).
pub fn allowed(
    role: ThreadRole,
    devices: DeviceSet,
    pid: u32,
) -> Result<rules::SyscallList, BackendError> {
    let own = match role {
        ThreadRole::EventLoop => event_loop::event_loop(pid)?,
        ThreadRole::Vcpu => vcpu::vcpu()?,
    };
    Ok(common::every_thread(pid)?
        .merge(own)
        .merge(devices.list(role)?))
}

/// A thread role's compiled filter, ready to be installed by each thread of that role; or
/// nothing to install when the mode is [`SeccompMode::Off`].
#[derive(Debug, Clone)]
pub struct ThreadFilter {
    role: ThreadRole,
    program: Option<BpfProgram>,
}

impl ThreadFilter {
    /// Compiles the filter of `role` in a VM with `devices`, for the calling process.
    pub fn new(
        role: ThreadRole,
        devices: DeviceSet,
        mode: SeccompMode,
    ) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Enforce => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::Off => return Ok(Self::none(role)),
        };
        let program = allowed(role, devices, std::process::id())
            .and_then(|list| list.compile(mismatch))
            .map_err(|source| SeccompError::Compile { role, source })?;
        Ok(Self {
            role,
            program: Some(program),
        })
    }

    fn none(role: ThreadRole) -> Self {
        Self {
            role,
            program: None,
        }
    }

    /// Confines the calling thread (only it: threads it starts afterwards inherit the filter,
    /// others keep theirs). Sets `no_new_privs` first, which installing a filter without
    /// `CAP_SYS_ADMIN` requires (`seccompiler` does it, harmless when the jail already did).
    pub fn install(&self) -> Result<(), SeccompError> {
        match &self.program {
            None => Ok(()),
            Some(program) => {
                seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                    role: self.role,
                    source,
                })
            }
        }
    }
}
