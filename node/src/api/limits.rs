//! Limits on port 8000: calls per second per caller (`security.rate_limit`), and calls in flight
//! per node (`network.max_concurrent_requests`), so one greedy or slow client cannot starve the
//! rest. Streams per connection, header and request timeouts are the server's settings
//! (`server/mod.rs`).
//!
//! The rate limit is a GCRA (a token bucket kept as one "theoretical arrival time" per caller):
//! a caller idle long enough may make `burst` calls at once, then one per `1 / rate` seconds.
//! With Redis (`redis.url`) the arrival times live there, keyed by principal, so every node
//! counts against the same limit; while Redis does not answer within [`SHARED_WAIT`], each
//! node counts alone (looser, never stricter).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::RateLimitSection;
use crate::storage::cache::Cache;

/// Callers whose arrival times one node keeps; past it, callers that are not over their limit
/// are forgotten (a forgotten caller starts afresh, which is what it would have had anyway).
pub const CALLERS_MAX: usize = 65_536;

/// The longest a call waits for Redis's count before the node counts alone.
pub const SHARED_WAIT: Duration = Duration::from_millis(50);

/// The key under which callers beyond [`CALLERS_MAX`] share one limit.
const OVERFLOW: &str = "overflow";

/// What the limiter says of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over the limit: the caller may call again after this long.
    Limited(Duration),
}

/// Each caller's theoretical arrival time, in microseconds since the limiter started.
#[derive(Default)]
struct Arrivals {
    by_caller: HashMap<String, u64>,
    /// When callers under their limit were last forgotten (at most once a second, so a flood
    /// of new callers costs no sweep per call).
    swept_us: u64,
}

/// Calls per second per caller, on this node or through Redis.
pub struct RateLimiter {
    /// Microseconds between calls at the sustained rate; 0: no limit.
    interval_us: u64,
    /// How far ahead of now a caller's arrival time may run: `(burst - 1) × interval`.
    tolerance_us: u64,
    rate: f64,
    burst: u32,
    started: Instant,
    local: Mutex<Arrivals>,
}

impl RateLimiter {
    pub fn new(settings: &RateLimitSection) -> Self {
        let (interval_us, burst) = match settings.enabled() {
            true => ((1e6 / settings.requests_per_second).round().max(1.0) as u64, settings.burst_calls()),
            false => (0, 0),
        };
        Self {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.saturating_sub(1)),
            rate: settings.requests_per_second,
            burst,
            started: Instant::now(),
            local: Mutex::new(Arrivals::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.interval_us > 0
    }

    /// The limit, for messages: "5 calls/s, burst 10".
    pub fn describe(&self) -> String {
        format!("{} calls/s, burst {}", self.rate, self.burst)
    }

    /// Count one call by `caller`, in `shared` (Redis) when there is one.
    pub async fn check(&self, caller: &str, shared: Option<&Cache>) -> Verdict {
        if !self.enabled() {
            return Verdict::Allow;
        }
        if let Some(cache) = shared {
            let counted =
                tokio::time::timeout(SHARED_WAIT, cache.rate_take(caller, self.interval_us, self.tolerance_us));
            match counted.await {
                Ok(Ok(0)) => return Verdict::Allow,
                Ok(Ok(wait_us)) => return Verdict::Limited(Duration::from_micros(wait_us)),
                Ok(Err(_)) | Err(_) => metrics::counter!("maos_rate_limit_local_fallbacks_total").increment(1),
            }
        }
        self.check_local(caller, self.started.elapsed().as_micros() as u64)
    }

    /// Count one call by `caller` at `now_us` on this node.
    fn check_local(&self, caller: &str, now_us: u64) -> Verdict {
        let mut guard = self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Arrivals { by_caller: local, swept_us } = &mut *guard;
        let full = local.len() >= CALLERS_MAX && !local.contains_key(caller);
        if full && now_us >= *swept_us + 1_000_000 {
            // Forget callers that are under their limit: they would start afresh anyway.
            local.retain(|_, arrival| *arrival > now_us);
            *swept_us = now_us;
        }
        let key = match local.len() < CALLERS_MAX || local.contains_key(caller) {
            true => caller,
            false => OVERFLOW,
        };
        let arrival = local.get(key).copied().unwrap_or(0).max(now_us);
        let allowed_from = arrival.saturating_sub(self.tolerance_us);
        if allowed_from > now_us {
            return Verdict::Limited(Duration::from_micros(allowed_from - now_us));
        }
        local.insert(key.to_string(), arrival + self.interval_us);
        Verdict::Allow
    }
}

/// How many seconds a `retry-after` header says for `wait` (whole seconds, at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_micros().div_ceil(1_000_000).max(1) as u64
}

/// Calls in flight on this node: each holds a permit until its answer starts.
pub struct InFlight {
    permits: Arc<tokio::sync::Semaphore>,
    pub max: usize,
}

impl InFlight {
    pub fn new(max: usize) -> Self {
        Self { permits: Arc::new(tokio::sync::Semaphore::new(max.max(1))), max: max.max(1) }
    }

    /// A permit for one more call, or `None` when `max` are in flight.
    pub fn try_enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(&RateLimitSection { requests_per_second: rate, burst })
    }

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let limits = limiter(10.0, 3);
        // Three at once, the fourth waits one interval (100 ms) from the first.
        for _ in 0..3 {
            assert_eq!(limits.check_local("a", 1_000_000), Verdict::Allow);
        }
        assert_eq!(limits.check_local("a", 1_000_000), Verdict::Limited(Duration::from_millis(100)));
        assert_eq!(limits.check_local("a", 1_050_000), Verdict::Limited(Duration::from_millis(50)));
        assert_eq!(limits.check_local("a", 1_100_000), Verdict::Allow);
        assert!(matches!(limits.check_local("a", 1_100_000), Verdict::Limited(_)));
        // Another caller is not affected; an idle caller gets its whole burst back.
        assert_eq!(limits.check_local("b", 1_100_000), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(limits.check_local("a", 5_000_000), Verdict::Allow);
        }
        assert!(matches!(limits.check_local("a", 5_000_000), Verdict::Limited(_)));
    }

    #[test]
    fn the_sustained_rate_holds_over_a_long_run() {
        let limits = limiter(50.0, 5);
        // A caller that tries every millisecond for 10 s gets the burst plus rate × 10 s.
        let allowed =
            (0..10_000u64).filter(|ms| limits.check_local("greedy", 1_000_000 + ms * 1_000) == Verdict::Allow).count();
        assert!((500..=506).contains(&allowed), "{allowed} calls allowed");
    }

    #[test]
    fn no_limit_allows_everything_and_a_zero_burst_means_one_second() {
        let off = limiter(0.0, 0);
        assert!(!off.enabled());
        let limits = limiter(2.5, 0);
        assert_eq!(limits.burst, 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
    }

    #[test]
    fn the_callers_kept_are_bounded() {
        let limits = limiter(1.0, 1);
        for i in 0..CALLERS_MAX {
            assert_eq!(limits.check_local(&format!("c{i}"), 0), Verdict::Allow);
        }
        // Full, and nobody has caught up: a new caller shares the overflow limit.
        assert_eq!(limits.check_local("new-1", 0), Verdict::Allow);
        assert!(matches!(limits.check_local("new-2", 0), Verdict::Limited(_)));
        // Once the others are under their limit again they are forgotten, and a new caller has its own.
        assert_eq!(limits.check_local("new-3", 2_000_000), Verdict::Allow);
        assert!(limits.local.lock().unwrap().by_caller.len() <= 2);
    }

    #[test]
    fn in_flight_refuses_past_its_bound_and_frees_on_drop() {
        let gate = InFlight::new(2);
        let a = gate.try_enter();
        let b = gate.try_enter();
        assert!(a.is_some() && b.is_some());
        assert!(gate.try_enter().is_none());
        drop(a);
        assert!(gate.try_enter().is_some());
    }
}
