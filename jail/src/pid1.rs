//! The PID namespace: the VMM becomes PID 1 of a namespace of its own, its parent a
//! [`Supervisor`] that keeps the pid its starter knows.
//!
//! `unshare(CLONE_NEWPID)` moves only the children made afterwards, so the process forks: the
//! child is PID 1 (and goes on to become the VMM); the parent drops every privilege and waits
//! for it, then ends the same way (exit code or signal). A PID 1 ignores the signals it has no
//! handler for when they come from its own namespace, but SIGKILL from an ancestor namespace
//! always lands: the child's parent-death signal is SIGKILL, so the starter's `kill` of the
//! supervisor (what the sandbox does) ends the VMM too.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{raise, signal, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::{Jail, JailError, Result};

/// Which side of the fork this process is.
#[derive(Debug)]
pub enum Forked {
    /// The parent, outside the namespace.
    Supervisor(Supervisor),
    /// PID 1 of the new namespace.
    Pid1(ParentLink),
}

/// PID 1's view of its supervisor: the read end of a pipe only the supervisor writes to, so
/// its end (EOF) is visible without knowing its pid (which PID 1 cannot see).
#[derive(Debug)]
pub struct ParentLink {
    alive: OwnedFd,
}

impl ParentLink {
    /// SIGKILL when the supervisor dies. Armed at the fork and again after the identity
    /// changes (which clear it); fails when the supervisor is already gone.
    pub fn arm_death_signal(&self) -> Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .map_err(JailError::sys("prctl(PR_SET_PDEATHSIG, SIGKILL)"))?;
        let mut fds = [PollFd::new(self.alive.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::ZERO)
            .map_err(JailError::sys("poll the supervisor pipe"))?;
        if ready > 0 {
            return Err(JailError::Invalid("the VMM's supervisor is gone".into()));
        }
        Ok(())
    }
}

/// The parent: waits for PID 1 and reports how it ended.
#[derive(Debug)]
pub struct Supervisor {
    child: Pid,
    _alive: OwnedFd,
    jail: Jail,
}

/// How PID 1 ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(Signal),
}

pub(crate) fn fork_into_pid_namespace(jail: &Jail) -> Result<Forked> {
    unshare(CloneFlags::CLONE_NEWPID).map_err(JailError::sys("unshare(CLONE_NEWPID)"))?;
    let (read, write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(JailError::sys("pipe2"))?;
    // SAFETY: the caller guarantees this process has one thread, so the child's copy of the
    // address space holds no lock another thread held and it may go on as a normal process.
    match unsafe { fork() }.map_err(JailError::sys("fork into the PID namespace"))? {
        ForkResult::Parent { child } => {
            drop(read);
            Ok(Forked::Supervisor(Supervisor {
                child,
                _alive: write,
                jail: jail.clone(),
            }))
        }
        ForkResult::Child => {
            drop(write);
            let link = ParentLink { alive: read };
            link.arm_death_signal()?;
            Ok(Forked::Pid1(link))
        }
    }
}

impl Supervisor {
    /// PID 1's pid as this process (and the host) sees it.
    pub fn child(&self) -> Pid {
        self.child
    }

    /// Drops every privilege (the same identity, no capabilities, no_new_privs; it keeps the
    /// host's other namespaces, so its working directory still says which VM it is), then
    /// waits for PID 1. A failure to drop kills PID 1 (the supervisor returns, and exits).
    /// A parent-death signal its starter asked for survives the identity change (which clears
    /// it), so the starter's death still ends the VM.
    pub fn wait(self) -> Result<ChildExit> {
        let inherited =
            nix::sys::prctl::get_pdeathsig().map_err(JailError::sys("prctl(PR_GET_PDEATHSIG)"))?;
        self.jail.drop_privileges()?;
        if inherited.is_some() {
            nix::sys::prctl::set_pdeathsig(inherited)
                .map_err(JailError::sys("prctl(PR_SET_PDEATHSIG) again"))?;
        }
        loop {
            match waitpid(self.child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(ChildExit::Code(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ChildExit::Signal(sig)),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(JailError::sys("wait for the VMM")(e)),
            }
        }
    }
}

impl ChildExit {
    /// Ends this process as PID 1 ended: with its exit code, or killed by its signal (the
    /// default action, restored and unblocked first; 128 + the signal if that returns).
    pub fn relay(self) -> ! {
        match self {
            ChildExit::Code(code) => std::process::exit(code),
            ChildExit::Signal(sig) => {
                // SAFETY: SIG_DFL installs no handler code.
                let _ = unsafe { signal(sig, SigHandler::SigDfl) };
                let mut set = SigSet::empty();
                set.add(sig);
                let _ = set.thread_unblock();
                let _ = raise(sig);
                std::process::exit(128 + sig as i32)
            }
        }
    }
}
