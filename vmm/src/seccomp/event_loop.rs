//! The VMM event thread: the `event-manager` loop (epoll) over queue eventfds, device backends,
//! the reset line and the exit signal, then the VM's end: kicking and joining the vCPU threads,
//! flushing the console, unmapping guest memory.

use seccompiler::BackendError;

use super::common::signal_to_own_thread;
use super::rules::SyscallList;

pub fn event_loop(pid: u32) -> Result<SyscallList, BackendError> {
    Ok(SyscallList::new()
        .allow(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_ctl,
            // Eventfds: queue notifications, the reset line, the exit signal, fs daemon calls.
            libc::SYS_read,
            // Waiting for a vCPU thread to leave KVM_RUN after its kick (std's sleep).
            libc::SYS_clock_nanosleep,
        ])
        // The kick that makes a vCPU's KVM_RUN return (SIGRTMIN), to this process's threads only.
        .allow_when(
            libc::SYS_tgkill,
            vec![signal_to_own_thread(pid, libc::SIGRTMIN())?],
        ))
}
