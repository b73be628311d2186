//! What every VMM thread does whatever it serves: the Rust runtime and glibc under it (locks,
//! heap, clocks, the thread's own end), the serial console on stdout and `tracing` on stderr.

use seccompiler::BackendError;

use super::rules::{all, arg_eq, arg_in, arg_masked, SyscallList};

pub fn every_thread(pid: u32) -> Result<SyscallList, BackendError> {
    let no_exec = || arg_masked(2, libc::PROT_EXEC as u64, 0);
    Ok(SyscallList::new()
        .allow(&[
            // Mutexes, condition variables, joins.
            libc::SYS_futex,
            // Instant::now where the vDSO falls back to the kernel (an unstable TSC, nested
            // virtualization).
            libc::SYS_clock_gettime,
            // The console (stdout), the log (stderr), eventfds (irqfds, the exit signal).
            libc::SYS_write,
            // Descriptors a device lets go (a vsock connection, a reset).
            libc::SYS_close,
            // The heap: glibc's arenas and large allocations.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            // HashMap seeds, on a thread's first map.
            libc::SYS_getrandom,
            // A thread's end: std takes down its signal stack, glibc blocks signals and
            // returns the stack's pages.
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // abort() (a second panic) and the vCPU kick: getpid, then tgkill.
            libc::SYS_getpid,
        ])
        // Debug builds of std check that a descriptor is open before closing it.
        .allow_when(libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64])?)
        // Anonymous memory only, never executable: the heap needs no file mappings and no code.
        .allow_when(
            libc::SYS_mmap,
            vec![all(vec![
                no_exec()?,
                arg_masked(3, libc::MAP_ANONYMOUS as u64, libc::MAP_ANONYMOUS as u64)?,
            ])?],
        )
        .allow_when(libc::SYS_mprotect, vec![all(vec![no_exec()?])?])
        // Freeing: glibc returns pages with MADV_DONTNEED (heap trim, a dead thread's stack).
        .allow_when(libc::SYS_madvise, arg_in(2, &[libc::MADV_DONTNEED as u64])?)
        // Only this process's own threads, and only abort()'s SIGABRT.
        .allow_when(
            libc::SYS_tgkill,
            vec![signal_to_own_thread(pid, libc::SIGABRT)?],
        ))
}

/// `tgkill(pid, _, signal)`: `signal` to a thread of this process.
pub fn signal_to_own_thread(
    pid: u32,
    signal: libc::c_int,
) -> Result<seccompiler::SeccompRule, BackendError> {
    all(vec![arg_eq(0, u64::from(pid))?, arg_eq(2, signal as u64)?])
}
