//! Emulated devices: the legacy PC devices the guest kernel expects and the virtio devices.

/// Logs a warning that the guest can trigger at will (a malformed register access, a bad
/// descriptor chain), at most [`GUEST_WARN_BUDGET`] times per call site, then once more to say
/// that the rest are suppressed: a hostile guest must not be able to flood the host's logs or
/// slow the VMM down with formatting. Per call site (a `static` in the expansion), so one noisy
/// path does not hide a different problem.
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static SEEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        match $crate::devices::guest_warn_verdict(&SEEN) {
            $crate::devices::WarnVerdict::Log => tracing::warn!($($arg)+),
            $crate::devices::WarnVerdict::LogLast => tracing::warn!(
                "{} (further warnings from {}:{} suppressed)",
                format_args!($($arg)+),
                file!(),
                line!()
            ),
            $crate::devices::WarnVerdict::Quiet => {}
        }
    }};
}

/// How many warnings one guest-triggerable call site logs before it goes quiet.
pub const GUEST_WARN_BUDGET: u32 = 16;

/// What [`guest_warn!`] does with the next warning of a call site.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WarnVerdict {
    Log,
    /// The last one logged, with a note that the rest are suppressed.
    LogLast,
    Quiet,
}

pub(crate) fn guest_warn_verdict(seen: &std::sync::atomic::AtomicU32) -> WarnVerdict {
    // Saturating, so that a guest that triggers 2^32 warnings does not start them again.
    let n = seen
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| Some(n.saturating_add(1)),
        )
        .unwrap_or(u32::MAX);
    match n.cmp(&GUEST_WARN_BUDGET) {
        std::cmp::Ordering::Less => WarnVerdict::Log,
        std::cmp::Ordering::Equal => WarnVerdict::LogLast,
        std::cmp::Ordering::Greater => WarnVerdict::Quiet,
    }
}

#[cfg(test)]
mod guest_warn_tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn a_call_site_logs_its_budget_then_one_last_line_then_nothing() {
        let seen = AtomicU32::new(0);
        let verdicts: Vec<_> = (0..GUEST_WARN_BUDGET + 5)
            .map(|_| guest_warn_verdict(&seen))
            .collect();
        let logged = verdicts.iter().filter(|v| **v == WarnVerdict::Log).count();
        assert_eq!(logged as u32, GUEST_WARN_BUDGET);
        assert_eq!(verdicts[GUEST_WARN_BUDGET as usize], WarnVerdict::LogLast);
        assert!(verdicts[GUEST_WARN_BUDGET as usize + 1..]
            .iter()
            .all(|v| *v == WarnVerdict::Quiet));
        // The counter saturates instead of wrapping around to "log" again.
        let seen = AtomicU32::new(u32::MAX);
        assert_eq!(guest_warn_verdict(&seen), WarnVerdict::Quiet);
    }
}

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub(crate) use virtio::mmio_lock as lock;
