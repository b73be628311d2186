//! A disk's rate limit in the device: the [`IoLimiter`] and the timerfd that brings the queue
//! back once the limiter has budget again.
//!
//! While throttled the device serves nothing: the request that did not fit stays on the
//! available ring (the guest sees it pending, as on a slow disk), guest notifications are
//! drained and ignored, and the timer's expiry (in the event thread) serves the queue again.

use std::io;
use std::os::fd::FromRawFd;
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::devices::io_limiter::{IoCost, IoLimiter};

pub(super) struct Throttle {
    limiter: IoLimiter,
    pub(super) timer: TimerFd,
    /// The queue waits for the timer.
    waiting: bool,
}

impl Throttle {
    pub(super) fn new(limiter: IoLimiter) -> io::Result<Self> {
        // Non-blocking, so a stale readiness (the timer disarmed by a reset between the event
        // loop's wait and our read) cannot block the event thread.
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh timerfd that nothing else owns.
        let timer = unsafe { TimerFd::from_raw_fd(fd) };
        Ok(Self {
            limiter,
            timer,
            waiting: false,
        })
    }

    pub(super) fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// Takes `cost` if the budget has it; otherwise arms the timer for when it will, and
    /// returns how long that is.
    pub(super) fn admit(&mut self, cost: IoCost) -> Result<(), Duration> {
        self.limiter
            .try_consume(cost)
            .inspect_err(|&wait| self.arm(wait))
    }

    fn arm(&mut self, wait: Duration) {
        // A zero duration would disarm the timer; the limiter's waits are at least 1 ns.
        match self.timer.reset(wait.max(Duration::from_nanos(1)), None) {
            Ok(()) => self.waiting = true,
            // Without a timer nothing would wake the queue: serve it again at the guest's next
            // notification instead.
            Err(e) => guest_error!("virtio-blk: cannot arm the rate limit timer: {e}"),
        }
    }

    /// The timer fired (or the event loop thinks so): consume its expiration and stop waiting.
    pub(super) fn timer_fired(&mut self) {
        // EAGAIN when it was disarmed meanwhile: nothing to consume.
        let _ = self.timer.wait();
        self.waiting = false;
    }

    /// The driver reset the device: no queue to come back to.
    pub(super) fn reset(&mut self) {
        let _ = self.timer.clear();
        self.waiting = false;
    }
}
