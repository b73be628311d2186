//! A namespace holder: a tiny process that owns a pod's shared namespaces (PID, IPC, UTS,
//! network), like Kubernetes' pause container, so they outlive every single container.
//! Containers created later join them through [`CreateOptions::join_namespaces`]
//! (`/proc/<holder>/ns/<type>`).
//!
//! The holder is a forked copy of the caller that does nothing: it is PID 1 of the shared PID
//! namespace (orphans of the pod's containers are re-parented to it), so it ignores `SIGCHLD`,
//! which makes the kernel reap those orphans at once, and sleeps in `pause()` forever. It keeps
//! no file descriptor of the caller (an inherited vsock or pipe end would keep a stream open).
//! Like every process of this crate it is the caller's child: the caller reaps it.
//!
//! [`CreateOptions::join_namespaces`]: crate::CreateOptions::join_namespaces

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{fork, pipe2, ForkResult};
use oci_spec::runtime::LinuxNamespaceType;

use crate::namespaces::{self, PidNamespace};
use crate::Error;

/// A process holding shared namespaces (see the module documentation).
#[derive(Debug)]
pub struct NamespaceHolder {
    pid: i32,
    pidfd: Option<OwnedFd>,
    types: Vec<LinuxNamespaceType>,
}

impl NamespaceHolder {
    /// Forks a holder in new namespaces of the given types: any of PID, IPC, UTS and network
    /// (mount, cgroup, user and time namespaces are per container here: `Unsupported`).
    /// Returns once the holder is in its namespaces.
    pub fn spawn(types: &[LinuxNamespaceType]) -> Result<NamespaceHolder, Error> {
        let mut others = CloneFlags::empty();
        let mut new_pid = false;
        let mut kept = Vec::new();
        for typ in types {
            match typ {
                LinuxNamespaceType::Pid => new_pid = true,
                LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Network => {
                    others |= namespaces::clone_flag(*typ)?
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "a shared {other} namespace (only pid, ipc, uts and network can be \
                         shared by the containers of a sandbox)"
                    )))
                }
            }
            if !kept.contains(typ) {
                kept.push(*typ);
            }
        }
        if kept.is_empty() {
            return Err(Error::InvalidSpec(
                "a namespace holder needs at least one namespace type".into(),
            ));
        }
        // The child reports one byte: 0 once in its namespaces, else the errno of unshare.
        let (report_read, report_write) =
            pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("pipe2", e))?;
        let pid_ns = if new_pid {
            PidNamespace::New
        } else {
            PidNamespace::Inherit
        };
        let forked = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<(i32, Option<OwnedFd>), Error> {
                    // Per thread: only this short-lived thread's next child is affected.
                    namespaces::set_pid_namespace_for_children(&pid_ns)?;
                    // SAFETY: the child runs only `holder_main`, which never returns and makes
                    // only async-signal-safe system calls (no allocation, no locks).
                    match unsafe { fork() } {
                        Ok(ForkResult::Child) => holder_main(others, report_write.as_fd()),
                        Ok(ForkResult::Parent { child }) => {
                            let pidfd =
                                rustix::process::Pid::from_raw(child.as_raw()).and_then(|p| {
                                    rustix::process::pidfd_open(
                                        p,
                                        rustix::process::PidfdFlags::empty(),
                                    )
                                    .ok()
                                });
                            Ok((child.as_raw(), pidfd))
                        }
                        Err(e) => Err(Error::io("fork", e)),
                    }
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "namespace holder thread",
                        std::io::Error::other("panicked"),
                    ))
                })
        });
        drop(report_write);
        let (pid, pidfd) = forked?;
        let mut report = Vec::new();
        File::from(report_read)
            .read_to_end(&mut report)
            .map_err(|e| Error::io("reading the namespace holder's report", e))?;
        match report.first() {
            Some(0) => {}
            Some(errno) => {
                let e = nix::errno::Errno::from_raw(i32::from(*errno));
                return Err(Error::io(
                    format!("namespace holder: unshare({others:?}), then lo up"),
                    e,
                ));
            }
            None => {
                return Err(Error::io(
                    "namespace holder",
                    std::io::Error::other("exited before it reported"),
                ))
            }
        }
        tracing::info!(pid, namespaces = ?kept, "namespace holder started");
        Ok(NamespaceHolder {
            pid,
            pidfd,
            types: kept,
        })
    }

    /// The holder's pid (in the caller's PID namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The namespace types it holds.
    pub fn types(&self) -> &[LinuxNamespaceType] {
        &self.types
    }

    /// What a container puts in [`crate::CreateOptions::join_namespaces`] to share them all.
    pub fn join_list(&self) -> Vec<(LinuxNamespaceType, PathBuf)> {
        self.types
            .iter()
            .map(|t| (*t, crate::proc_namespace_path(self.pid, *t)))
            .collect()
    }

    /// Whether the holder still runs (it only ends when killed).
    pub fn is_running(&self) -> bool {
        self.pidfd.as_ref().is_some_and(|fd| !crate::has_exited(fd))
    }

    /// Kills the holder (the caller reaps it). Processes left in its PID namespace die with it.
    pub fn kill(self) -> Result<(), Error> {
        let Some(pidfd) = self.pidfd.as_ref().filter(|fd| !crate::has_exited(fd)) else {
            return Ok(());
        };
        match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(Error::io(
                format!("killing namespace holder {}", self.pid),
                e,
            )),
        }
    }
}

/// The forked holder: enters the namespaces, reports, drops every inherited fd, sleeps.
fn holder_main(flags: CloneFlags, report: std::os::fd::BorrowedFd<'_>) -> ! {
    // SAFETY: everything below is a plain system call on values owned by this (just forked,
    // single-threaded) process: signal dispositions, unshare, the loopback ioctls, write,
    // close_range, pause, _exit.
    unsafe {
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // Ignoring SIGCHLD makes the kernel reap the pod's orphans (re-parented to this PID 1).
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::setsid();
    }
    // A new network namespace gets its loopback up, as a container's own does.
    let entered = unshare(flags).and_then(|()| {
        if flags.contains(CloneFlags::CLONE_NEWNET) {
            namespaces::loopback_up()
        } else {
            Ok(())
        }
    });
    let result: u8 = match entered {
        Ok(()) => 0,
        Err(e) => (e as i32).clamp(1, 255) as u8,
    };
    // SAFETY: see above.
    unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(&report),
            (&result as *const u8).cast(),
            1,
        );
        if result != 0 {
            libc::_exit(1);
        }
        // Every fd, the report pipe included: the parent reads EOF after the byte.
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..4096 {
                libc::close(fd);
            }
        }
        libc::prctl(
            libc::PR_SET_NAME,
            c"ns-holder".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        loop {
            libc::pause();
        }
    }
}
