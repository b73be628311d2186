//! virtio-blk (virtio 1.x, 5.2): one request queue backed by a raw disk image file.
//!
//! Requests are served synchronously in the event thread with one `preadv`/`pwritev` each,
//! straight between the file and guest memory: no bounce buffer, no heap allocation per request.
//! The image's host page cache is the device's volatile write cache, hence `VIRTIO_BLK_F_FLUSH`.
//!
//! An optional rate limit (`DiskConfig::rate_limit`: bandwidth and operations token buckets)
//! holds requests over budget on the available ring until a timerfd says the budget is back
//! (`throttle.rs`); [`BlockStats::throttled`] counts those stops.

mod device;
mod event_handler;
mod request;
#[cfg(test)]
mod tests;
mod throttle;
#[cfg(test)]
mod throttle_tests;

pub use device::{Block, BlockError, BlockStats};
