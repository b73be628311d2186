//! The VMM's own clock origin, for the boot-time figures.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Records the origin; call first thing in `main`. Later calls keep the first origin. (The time
/// between `exec` and `main`, dynamic linking mostly, is not counted: well under a millisecond.)
pub fn mark_process_start() {
    START.get_or_init(Instant::now);
}

/// Time since [`mark_process_start`] (or since the first call here).
pub fn since_start() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}
