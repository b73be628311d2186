//! An I/O rate limit for a device (Firecracker's design): two token buckets, one counting bytes
//! and one counting operations. Each holds `size` tokens, refills completely in `refill_time_ms`
//! (a steady rate of `size / refill_time_ms`), and may start with a one-time burst of extra
//! tokens that is spent first and never refilled. A missing bucket does not limit.

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// The longest refill time a bucket may have: one hour. Longer is almost surely a unit mistake,
/// and the bound keeps the limiter's arithmetic far from overflow.
pub const MAX_REFILL_TIME_MS: u64 = 3_600_000;

/// A device's rate limit: a bandwidth bucket (bytes) and an operations bucket (requests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes moved between guest memory and the backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests of any kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// One token bucket: `size` tokens, refilled completely over `refill_time_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (and so the largest steady burst). Not 0.
    pub size: u64,
    /// Extra tokens available once, at the start, spent before the bucket's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds an empty bucket takes to fill: 1 to [`MAX_REFILL_TIME_MS`].
    pub refill_time_ms: u64,
}

impl RateLimitConfig {
    /// Whether any bucket limits.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Checks both buckets; `field` names the limit in the error (`disks[0].rate_limit`).
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if let Some(bucket) = &self.bandwidth {
            bucket.validate(&format!("{field}.bandwidth"))?;
        }
        if let Some(bucket) = &self.ops {
            bucket.validate(&format!("{field}.ops"))?;
        }
        Ok(())
    }
}

impl TokenBucketConfig {
    /// A bucket of `size` tokens refilled over `refill_time_ms`, without a one-time burst.
    pub fn new(size: u64, refill_time_ms: u64) -> Self {
        Self {
            size,
            one_time_burst: None,
            refill_time_ms,
        }
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let problem = if self.size == 0 {
            "size must not be 0 (leave the bucket out for no limit)"
        } else if self.refill_time_ms == 0 {
            "refill_time_ms must not be 0 (leave the bucket out for no limit)"
        } else if self.refill_time_ms > MAX_REFILL_TIME_MS {
            "refill_time_ms must be at most 3600000 (one hour)"
        } else if self.one_time_burst == Some(0) {
            "one_time_burst must not be 0 (leave it out for none)"
        } else {
            return Ok(());
        };
        Err(ConfigError::RateLimit {
            field: field.into(),
            problem,
        })
    }
}
