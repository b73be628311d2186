//! Rate limiting for every log line a guest can trigger (a malformed register access, a bad
//! descriptor chain, a boot marker written in a loop, an access to unmapped MMIO): a hostile guest
//! must not be able to flood the host's logs or slow the VMM down with formatting.
//!
//! One token bucket per call site (a `static` in the macro's expansion, so one noisy path does not
//! hide a different problem): [`BURST`] lines at once, then one per [`REFILL`]. The next line
//! logged after a quiet spell says how many were suppressed. Use [`guest_warn!`],
//! [`guest_error!`] and [`guest_info!`] (with an optional `target:`) like `tracing`'s macros.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log at once.
pub const BURST: u32 = 10;
/// One more line per this much time.
pub const REFILL: Duration = Duration::from_secs(1);

/// A token bucket: `burst` tokens, one more every `refill`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    refill: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// When the tokens were last counted; `None` until the first use (a full bucket).
    last: Option<Instant>,
    /// Events refused since the last one allowed.
    suppressed: u64,
}

impl RateLimiter {
    pub const fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst,
            refill,
            state: Mutex::new(State {
                tokens: burst,
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if the event may go ahead, `n` being how many were refused since the last one
    /// that did; `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            None => s.last = Some(now),
            Some(last) => {
                let period = self.refill.as_nanos().max(1);
                let earned = now.saturating_duration_since(last).as_nanos() / period;
                if earned > 0 {
                    let tokens = (u128::from(s.tokens) + earned).min(u128::from(self.burst));
                    s.tokens = tokens as u32;
                    // A bucket still filling keeps the fraction of a period it has earned; a
                    // full one starts counting anew.
                    s.last = Some(if s.tokens == self.burst {
                        now
                    } else {
                        last + self.refill * earned as u32
                    });
                }
            }
        }
        if s.tokens == 0 {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// Logs at `$level` through a per-call-site [`RateLimiter`]; see the module documentation.
macro_rules! guest_log {
    ($level:expr, target: $target:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::devices::rate_limit::RateLimiter =
            $crate::devices::rate_limit::RateLimiter::new(
                $crate::devices::rate_limit::BURST,
                $crate::devices::rate_limit::REFILL,
            );
        match LIMITER.check() {
            Some(0) => tracing::event!(target: $target, $level, $($arg)+),
            Some(n) => tracing::event!(
                target: $target,
                $level,
                "{} ({n} similar lines from {}:{} suppressed)",
                format_args!($($arg)+),
                file!(),
                line!()
            ),
            None => {}
        }
    }};
    ($level:expr, $($arg:tt)+) => {
        $crate::devices::rate_limit::guest_log!($level, target: module_path!(), $($arg)+)
    };
}

/// A rate-limited `warn!` for lines a guest can trigger.
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::devices::rate_limit::guest_log!(tracing::Level::WARN, $($arg)+) };
}

/// A rate-limited `error!` for lines a guest can trigger.
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::devices::rate_limit::guest_log!(tracing::Level::ERROR, $($arg)+) };
}

/// A rate-limited `info!` for lines a guest can trigger.
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::devices::rate_limit::guest_log!(tracing::Level::INFO, $($arg)+) };
}

// By path, for the expansions above and for modules outside `devices` (the vCPU threads).
pub(crate) use {guest_log, guest_warn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill_with_the_suppressed_count() {
        let limiter = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        assert_eq!(limiter.check_at(at(0.0)), Some(0));
        assert_eq!(limiter.check_at(at(0.0)), Some(0));
        assert_eq!(limiter.check_at(at(0.1)), Some(0));
        // The burst is spent: a flood is refused, however long it lasts within the second.
        for i in 0..1000 {
            assert_eq!(limiter.check_at(at(0.1 + f64::from(i) * 0.0008)), None);
        }
        // One token a second; the first line after the flood counts it.
        assert_eq!(limiter.check_at(at(1.05)), Some(1000));
        assert_eq!(limiter.check_at(at(1.06)), None);
        assert_eq!(limiter.check_at(at(2.05)), Some(1));
        // A long quiet spell refills the bucket, never beyond the burst.
        for _ in 0..3 {
            assert_eq!(limiter.check_at(at(100.0)), Some(0));
        }
        assert_eq!(limiter.check_at(at(100.0)), None);
    }

    #[test]
    fn the_macros_log_from_any_thread_without_panicking() {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    for j in 0..1000 {
                        guest_warn!("flood {i} {j}");
                        guest_info!(target: "boot_marker", "marker {i} {j}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
