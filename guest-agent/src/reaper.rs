//! Reaping every child as PID 1, and routing the exit statuses of the processes the agent
//! started to whoever waits for them.
//!
//! One lock (the [`Registry`] inside [`Reaper`]) serialises three things:
//!
//! - reaping: [`Reaper::reap_all`] takes the lock, then calls `waitpid(-1, WNOHANG)` until no
//!   zombie is left, routing each status while still holding it;
//! - spawning: the agent forks a process *and registers its pid* under the lock, so a child
//!   that exits at once is reaped only after it is registered, and its status is never lost;
//! - signalling: while the lock is held, a registered pid has not been reaped, so it cannot have
//!   been reused by another process: `kill` reaches the right one.
//!
//! Statuses of pids nobody registered (a container's orphans re-parented to PID 1, helper
//! processes of the container crate) are dropped.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

/// A raw `waitpid` status (see `container::wait_status_to_exit_code`).
pub type WaitStatus = i32;

/// Registered pids and the senders their statuses go to.
#[derive(Default)]
pub struct Registry {
    waiters: HashMap<i32, oneshot::Sender<WaitStatus>>,
}

impl Registry {
    /// Registers `pid`; the receiver gets its status once it is reaped.
    pub fn register(&mut self, pid: i32) -> oneshot::Receiver<WaitStatus> {
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(pid, tx);
        rx
    }

    /// Whether `pid` is registered and not reaped yet (safe to signal while the lock is held).
    pub fn is_live(&self, pid: i32) -> bool {
        self.waiters.contains_key(&pid)
    }

    /// Delivers `status` to the waiter of `pid`. Returns false for a pid nobody registered.
    pub fn route(&mut self, pid: i32, status: WaitStatus) -> bool {
        match self.waiters.remove(&pid) {
            Some(tx) => {
                // The receiver may be gone (the process entry was removed): nothing to do.
                let _ = tx.send(status);
                true
            }
            None => false,
        }
    }
}

/// The reaper: one per agent.
#[derive(Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
}

impl Reaper {
    /// Takes the lock (see the module documentation). A poisoned lock is still usable: the
    /// registry is valid after any panic in between its operations.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every child that has exited, routing the statuses. Returns (routed, ignored).
    pub fn reap_all(&self) -> (usize, usize) {
        let mut registry = self.lock();
        let (mut routed, mut ignored) = (0, 0);
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                // 0: children left but none exited; -1: ECHILD (no children) or EINTR.
                if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            }
            if registry.route(pid, status) {
                tracing::debug!(pid, status, "reaped");
                routed += 1;
            } else {
                tracing::debug!(pid, status, "reaped an unknown process");
                ignored += 1;
            }
        }
        (routed, ignored)
    }
}

/// Runs forever: reaps on every SIGCHLD (and once at start, for children that exited before).
pub async fn run(reaper: std::sync::Arc<Reaper>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => panic!("cannot handle SIGCHLD: {e}"),
    };
    loop {
        let r = reaper.clone();
        // waitpid(WNOHANG) does not block, but the lock may be held by a spawn in progress.
        let _ = tokio::task::spawn_blocking(move || r.reap_all()).await;
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_known_pids_and_ignores_the_rest() {
        let mut reg = Registry::default();
        let mut a = reg.register(100);
        let mut b = reg.register(200);
        assert!(reg.is_live(100) && reg.is_live(200));
        assert!(!reg.route(300, 0), "an unknown pid is ignored");
        assert!(reg.route(200, 3 << 8));
        assert_eq!(b.try_recv().unwrap(), 3 << 8);
        assert!(a.try_recv().is_err(), "pid 100 has not exited");
        assert!(!reg.is_live(200), "a routed pid is forgotten");
        assert!(!reg.route(200, 0), "a pid is routed once");
        drop(a);
        assert!(reg.route(100, 9), "a waiter that went away is not an error");
    }

    /// Forks real children: the registered one's status is routed, the unknown one is reaped
    /// and ignored, and no zombie is left. Runs itself again in a process of its own: the
    /// reaper waits for any child, so beside other tests it would reap their children (whose
    /// own waits then fail) and count them as its unknown ones.
    #[test]
    fn reaps_real_children() {
        if !test_support::alone_in_process("reaper::tests::reaps_real_children") {
            return;
        }
        let reaper = Reaper::default();
        let fork_exit = |code: i32| {
            // SAFETY: the child only calls _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(code) };
            }
            pid
        };
        // Register under the lock, as the agent does when it spawns.
        let (known, mut rx) = {
            let mut reg = reaper.lock();
            let pid = fork_exit(3);
            (pid, reg.register(pid))
        };
        let unknown = fork_exit(5);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut total = (0, 0);
        while total != (1, 1) {
            assert!(std::time::Instant::now() < deadline, "children not reaped");
            let (r, i) = reaper.reap_all();
            total = (total.0 + r, total.1 + i);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let status = rx.try_recv().unwrap();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3);
        let _ = known;
        // SAFETY: waitpid with a valid pointer; the child must be gone already (ECHILD).
        let r = unsafe { libc::waitpid(unknown, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(r, -1, "the unknown child was reaped too");
    }
}
