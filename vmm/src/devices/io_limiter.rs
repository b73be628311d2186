//! I/O rate limiting for devices (Firecracker's rate limiter design, not to be confused with the
//! log-line limiting of [`super::rate_limit`]): a [`TokenBucket`] for bytes and one for
//! operations, combined in an [`IoLimiter`] that admits a request only when both have its cost.
//!
//! A bucket holds `size` tokens and refills at `size` per refill time, continuously. A one-time
//! burst is spent before the bucket's own tokens and never comes back. A request larger than
//! the bucket is admitted once the bucket is full and leaves it in debt, so the average rate
//! still holds and no request waits forever.
//!
//! Time comes from a [`Clock`], so tests drive it by hand; the devices use [`MonotonicClock`],
//! the same `CLOCK_MONOTONIC` their timerfds count in.

use std::time::{Duration, Instant};

use vmm_api::{RateLimitConfig, TokenBucketConfig};

/// Where a limiter reads the time.
pub trait Clock: Send {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// One token bucket. The budget is kept in token-nanoseconds (a token is `refill_ns` units and
/// each nanosecond adds `size` units), so refilling is exact integer arithmetic at any rate.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    /// One-time burst tokens not yet spent.
    burst: u64,
    /// Negative while in debt after a request larger than the bucket.
    budget: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket as `config` describes it (already validated: size and refill time are not
    /// 0; a 0 here is treated as 1 so nothing divides by zero).
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Self {
        let size = config.size.max(1);
        let refill_ns = config.refill_time_ms.max(1).saturating_mul(1_000_000);
        Self {
            size,
            refill_ns,
            burst: config.one_time_burst.unwrap_or(0),
            budget: i128::from(size) * i128::from(refill_ns),
            last: now,
        }
    }

    fn full(&self) -> i128 {
        i128::from(self.size) * i128::from(self.refill_ns)
    }

    /// Adds what has flowed in since the last look, up to a full bucket.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        // Both terms fit an i128: the room is at most a full bucket plus one request's debt.
        let room = (self.full() - self.budget).max(0) as u128;
        let added = elapsed.saturating_mul(u128::from(self.size)).min(room);
        self.budget += added as i128;
    }

    /// The units `tokens` must find in the budget (beyond what the burst covers): a request
    /// larger than the bucket needs only a full one.
    fn needed(&self, tokens: u64) -> i128 {
        let rest = tokens.saturating_sub(self.burst);
        i128::from(rest.min(self.size)) * i128::from(self.refill_ns)
    }

    /// After a refill at `now`: `None` if `tokens` can be taken now, else how long until they can.
    pub fn wait_for(&mut self, tokens: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let missing = self.needed(tokens) - self.budget;
        if missing <= 0 {
            return None;
        }
        // Rounded up, so a timer armed for this long finds the tokens there.
        let ns = (missing as u128).div_ceil(u128::from(self.size));
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Takes `tokens`, burst first; call after [`TokenBucket::wait_for`] said they are there.
    pub fn consume(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst) * i128::from(self.refill_ns);
    }
}

/// The cost of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCost {
    pub bytes: u64,
    pub ops: u64,
}

/// A device's limiter: a bandwidth bucket and an operations bucket, either optional.
pub struct IoLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Box<dyn Clock>,
}

impl IoLimiter {
    /// Full buckets as `config` describes them, on `clock`.
    pub fn new(config: &RateLimitConfig, clock: Box<dyn Clock>) -> Self {
        let now = clock.now();
        Self {
            bandwidth: config.bandwidth.map(|b| TokenBucket::new(&b, now)),
            ops: config.ops.map(|b| TokenBucket::new(&b, now)),
            clock,
        }
    }

    /// Takes `cost` from both buckets if both have it; otherwise takes nothing and returns how
    /// long until both may have it (a request is never half admitted).
    pub fn try_consume(&mut self, cost: IoCost) -> Result<(), Duration> {
        let now = self.clock.now();
        let wait = [
            (self.bandwidth.as_mut(), cost.bytes),
            (self.ops.as_mut(), cost.ops),
        ]
        .into_iter()
        .filter_map(|(bucket, tokens)| bucket?.wait_for(tokens, now))
        .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        if let Some(bucket) = &mut self.bandwidth {
            bucket.consume(cost.bytes);
        }
        if let Some(bucket) = &mut self.ops {
            bucket.consume(cost.ops);
        }
        Ok(())
    }
}

/// A clock that moves only when a test says so; clones share the time.
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct ManualClock(std::sync::Arc<std::sync::Mutex<Instant>>);

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Instant::now())))
    }
}

#[cfg(test)]
impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: Option<u64>, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        }
    }

    fn bytes(n: u64) -> IoCost {
        IoCost { bytes: n, ops: 1 }
    }

    #[test]
    fn a_full_bucket_empties_then_refills_at_its_rate() {
        let t0 = Instant::now();
        // 1000 tokens per 100 ms: 10 per millisecond.
        let mut b = TokenBucket::new(&bucket(1000, None, 100), t0);
        assert_eq!(b.wait_for(1000, t0), None);
        b.consume(1000);
        assert_eq!(b.wait_for(1, t0), Some(Duration::from_micros(100)));
        assert_eq!(b.wait_for(500, t0), Some(50 * MS));
        // Half the refill time brings half the bucket, not more.
        assert_eq!(b.wait_for(500, t0 + 50 * MS), None);
        assert_eq!(
            b.wait_for(501, t0 + 50 * MS),
            Some(Duration::from_micros(100))
        );
        // Waiting longer than the refill time fills it, never beyond.
        let late = t0 + 10_000 * MS;
        assert_eq!(b.wait_for(1000, late), None);
        b.consume(1000);
        assert_eq!(b.wait_for(1, late), Some(Duration::from_micros(100)));
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, Some(1000), 1000), t0);
        assert_eq!(b.wait_for(1100, t0), None);
        b.consume(1000);
        // The bucket itself is still full.
        assert_eq!(b.wait_for(100, t0), None);
        b.consume(100);
        assert!(b.wait_for(1, t0).is_some());
        // A long quiet spell refills the bucket only.
        let later = t0 + 3600 * 1000 * MS;
        assert_eq!(b.wait_for(100, later), None);
        b.consume(100);
        assert_eq!(b.wait_for(1, later), Some(10 * MS));
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_one_then_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&bucket(100, None, 100), t0);
        b.consume(50);
        // 300 tokens cannot ever be in a 100-token bucket: a full one admits them.
        assert_eq!(b.wait_for(300, t0), Some(50 * MS));
        let t1 = t0 + 50 * MS;
        assert_eq!(b.wait_for(300, t1), None);
        b.consume(300);
        // 200 tokens of debt, then 1 token: 201 ms at 1 token per ms.
        assert_eq!(b.wait_for(1, t1), Some(201 * MS));
        assert_eq!(b.wait_for(1, t1 + 201 * MS), None);
    }

    #[test]
    fn the_limiter_admits_only_when_both_buckets_agree_and_takes_nothing_otherwise() {
        let clock = ManualClock::default();
        let config = RateLimitConfig {
            bandwidth: Some(bucket(4096, None, 1000)),
            ops: Some(bucket(2, None, 100)),
        };
        let mut limiter = IoLimiter::new(&config, Box::new(clock.clone()));
        assert_eq!(limiter.try_consume(bytes(1024)), Ok(()));
        assert_eq!(limiter.try_consume(bytes(1024)), Ok(()));
        // 2048 bytes are left but no operation: one op refills in 50 ms.
        assert_eq!(limiter.try_consume(bytes(1024)), Err(50 * MS));
        // And bytes bound too: 3000 need 952 more, at 4.096 per ms.
        assert_eq!(
            limiter.try_consume(bytes(3000)),
            Err(Duration::from_nanos(232_421_875))
        );
        clock.advance(50 * MS);
        // 2048 + 204.8 bytes: all of it is there only if the refused calls took none.
        assert_eq!(limiter.try_consume(bytes(2252)), Ok(()));
        assert!(limiter.try_consume(bytes(0)).is_err(), "the ops are spent");
    }

    #[test]
    fn a_limiter_without_buckets_admits_everything() {
        let mut limiter = IoLimiter::new(&RateLimitConfig::default(), Box::new(MonotonicClock));
        for _ in 0..1000 {
            assert_eq!(limiter.try_consume(bytes(u64::from(u32::MAX))), Ok(()));
        }
    }
}
