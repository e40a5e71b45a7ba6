//! The bounded leader clock (issue 16, break 3; DESIGN.md: "No single node's clock decides an
//! expiry").
//!
//! Every node reads each voter's wall clock through the Raft port's `Clock` call and times the
//! call by its own monotonic clock. The peer read its clock between the call's send and its
//! answer, so the offset (peer minus this node) lies in `[read − sent − round trip, read − sent]`;
//! the interval widens with the sample's age by [`DRIFT_PPM`], and by `raft.clock_skew_max_ms`
//! so that clocks within the bound of each other overlap. Marzullo's algorithm over this node's
//! own clock (offset 0) and those intervals finds the offsets most voters agree on, as
//! TigerBeetle's `clock.zig` does; when a majority of the voters agree, the node knows how far its
//! clock is from a quorum's, and its *cluster time* is its wall clock, or, when that is outside
//! the majority's interval, the interval's middle.
//!
//! - [`ClockStatus::Synchronized`]: within `raft.clock_skew_max_ms`. As leader the node stamps
//!   cluster time and expires what is due.
//! - [`ClockStatus::Skewed`]: farther. As leader it still stamps cluster time (the quorum's, so
//!   the replicated clock is never pushed ahead by this node), but proposes nothing that expires
//!   (no `Tick`, no eviction), fails `/ready`, reports `maos_clock_skew_ms`, and hands leadership
//!   to a voter whose clock agrees (`raft::membership::Membership::hand_off_when_skewed`).
//!
//! The samples are taken by `clock_watch.rs`; this module is the arithmetic, free of I/O.
//! - [`ClockStatus::Unknown`]: no majority agrees yet (too few answers, or clocks that disagree
//!   with each other): cluster time is the node's own clock and, as leader, it expires nothing.
//!
//! Every reader of replicated times on this node (TTL reads, key expiry, the planner, the agent
//! runtime) uses cluster time, so a follower whose clock is off still reads the state correctly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// How often every node reads its peers' clocks.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// A sample older than this is not used: the peer stopped answering.
const SAMPLE_AGE_MAX: Duration = Duration::from_secs(5);
/// The bound on how fast two clocks drift apart, in parts per million: 1 ms per second, ten
/// times what a quartz clock does and twice the most NTP slews by (the assumption is in
/// docs/RELIABILITY.md). A sample's interval widens by its age times this.
pub const DRIFT_PPM: u64 = 1_000;

/// How this node's clock stands against a quorum's. `skew_ms` is this clock minus the quorum's
/// (positive: ahead), 0 when the quorum's interval contains this clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockStatus {
    Unknown,
    Synchronized { skew_ms: i64 },
    Skewed { skew_ms: i64 },
}

impl ClockStatus {
    pub fn skew_ms(self) -> i64 {
        match self {
            Self::Unknown => 0,
            Self::Synchronized { skew_ms } | Self::Skewed { skew_ms } => skew_ms,
        }
    }
}

/// One reading of a peer's clock: the offset (peer minus this node) lies in `[low, high]` at
/// `taken`.
#[derive(Debug, Clone, Copy)]
struct Sample {
    low_ms: i64,
    high_ms: i64,
    taken: tokio::time::Instant,
}

#[derive(Debug)]
struct Bound {
    samples: BTreeMap<u64, Sample>,
    status: ClockStatus,
    /// Added to the wall clock to give cluster time.
    correction_ms: i64,
    /// The offsets (peer minus this node) a quorum agrees on, when one does.
    quorum: Option<(i64, i64)>,
}

/// This node's samples of its peers' clocks and what they say about its own.
#[derive(Debug)]
pub struct ClockBound {
    skew_max_ms: u64,
    inner: Mutex<Bound>,
    /// Whether a quorum's clocks have been known since this node started, or a leader's stamps
    /// have already waited [`FIRST_MEASUREMENT_WAIT`] for it.
    measured: watch::Sender<bool>,
}

/// How long a leader's first stamps wait for the first measurement after this node starts.
pub const FIRST_MEASUREMENT_WAIT: Duration = Duration::from_secs(2);

impl ClockBound {
    pub fn new(skew_max_ms: u64) -> Self {
        let bound = Bound { samples: BTreeMap::new(), status: ClockStatus::Unknown, correction_ms: 0, quorum: None };
        Self { skew_max_ms, inner: Mutex::new(bound), measured: watch::Sender::new(false) }
    }

    /// The bound turned off (`raft.clock_skew_max_ms: 0`): always synchronized, no correction,
    /// no wait.
    pub fn off() -> Self {
        let bound = Bound {
            samples: BTreeMap::new(),
            status: ClockStatus::Synchronized { skew_ms: 0 },
            correction_ms: 0,
            quorum: None,
        };
        Self { skew_max_ms: 0, inner: Mutex::new(bound), measured: watch::Sender::new(true) }
    }

    /// Whether a quorum's clocks have been measured since start-up (or the wait for it is over).
    pub fn measured(&self) -> bool {
        *self.measured.borrow()
    }

    /// Wait, at most `within` and only once per run, until a quorum's clocks have been measured
    /// since this node started: a leader elected at start-up stamps nothing by its bare clock
    /// while its first measurement is a round trip away. After that wait, and for later unknowns
    /// (clocks that disagree), writes go on at once, stamped by this node's clock.
    pub async fn first_measured(&self, within: Duration) {
        if self.measured() {
            return;
        }
        let mut measured = self.measured.subscribe();
        if tokio::time::timeout(within, measured.wait_for(|known| *known)).await.is_err() {
            tracing::warn!(
                waited_ms = within.as_millis() as u64,
                "no majority of the voters' clocks is known yet; stamping writes by this node's clock"
            );
            self.measured.send_replace(true);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bound> {
        // Every update leaves the bound whole (plain assignments), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `raft.clock_skew_max_ms`.
    pub fn skew_max_ms(&self) -> u64 {
        self.skew_max_ms
    }

    pub fn status(&self) -> ClockStatus {
        self.lock().status
    }

    /// Whether this node, as leader, may propose commands that expire anything.
    pub fn may_expire(&self) -> bool {
        matches!(self.status(), ClockStatus::Synchronized { .. })
    }

    /// Cluster time at wall-clock reading `wall_ms`.
    pub fn cluster_time(&self, wall_ms: u64) -> u64 {
        wall_ms.saturating_add_signed(self.lock().correction_ms)
    }

    /// Record a reading of `peer`'s clock: sent at `sent_wall_ms` by this node's wall clock, read
    /// there as `read_ms`, answered `round_trip` later by this node's monotonic clock.
    pub fn record(&self, peer: u64, sent_wall_ms: u64, read_ms: u64, round_trip: Duration, now: tokio::time::Instant) {
        let high_ms = read_ms as i64 - sent_wall_ms as i64;
        let low_ms = high_ms - round_trip.as_millis() as i64;
        self.lock().samples.insert(peer, Sample { low_ms, high_ms, taken: now });
    }

    /// Decide this node's status from fresh samples of `voters` (this node counts as offset 0
    /// when it is one). A majority of the voters must agree.
    pub fn assess(&self, me: u64, voters: &BTreeSet<u64>, now: tokio::time::Instant) -> ClockStatus {
        let mut bound = self.lock();
        bound.samples.retain(|peer, _| voters.contains(peer));
        let mut intervals = Vec::with_capacity(voters.len());
        for voter in voters {
            if *voter == me {
                intervals.push((0, 0));
                continue;
            }
            let Some(sample) = bound.samples.get(voter) else { continue };
            let age = now.saturating_duration_since(sample.taken);
            if age > SAMPLE_AGE_MAX {
                continue;
            }
            // Widened by the bound too: two intervals then overlap when the clocks are within
            // the bound of each other, and a point in a majority's overlap is a time within the
            // bound of each of them.
            let drift = (age.as_micros() as u64 * DRIFT_PPM / 1_000_000_000) as i64 + 1;
            let widen = drift + self.skew_max_ms as i64;
            intervals.push((sample.low_ms - widen, sample.high_ms + widen));
        }
        let quorum = voters.len() / 2 + 1;
        let (status, correction, agreed) = match marzullo(&intervals) {
            _ if voters.is_empty() || (voters.len() == 1 && voters.contains(&me)) => {
                (ClockStatus::Synchronized { skew_ms: 0 }, 0, Some((0, 0)))
            }
            Some((count, low, high)) if count >= quorum => {
                // Inside the quorum's interval this clock stands; outside, it moves to its middle.
                let correction = if (low..=high).contains(&0) { 0 } else { low + (high - low) / 2 };
                let skew_ms = -correction;
                let status = match skew_ms.unsigned_abs() <= self.skew_max_ms {
                    true => ClockStatus::Synchronized { skew_ms },
                    false => ClockStatus::Skewed { skew_ms },
                };
                (status, correction, Some((low, high)))
            }
            _ => (ClockStatus::Unknown, 0, None),
        };
        bound.status = status;
        bound.correction_ms = correction;
        bound.quorum = agreed;
        if status != ClockStatus::Unknown {
            self.measured.send_if_modified(|known| !std::mem::replace(known, true));
        }
        status
    }

    /// A voter other than `me` whose clock agrees with the quorum's within the bound, to hand
    /// leadership to: the one closest to the quorum's interval, lowest id first.
    pub fn agreeing_peer(&self, me: u64, voters: &BTreeSet<u64>) -> Option<u64> {
        let bound = self.lock();
        let (low, high) = bound.quorum?;
        let max = self.skew_max_ms as i64;
        voters
            .iter()
            .filter(|voter| **voter != me)
            .filter_map(|voter| {
                let sample = bound.samples.get(voter)?;
                // How far the peer's interval is from the quorum's (0 when they meet).
                let distance = (low - sample.high_ms).max(sample.low_ms - high).max(0);
                (distance <= max).then_some((distance, *voter))
            })
            .min()
            .map(|(_, voter)| voter)
    }
}

/// Marzullo's algorithm: the smallest interval that the most of `intervals` (closed) contain,
/// as (how many, low, high); `None` for no intervals.
pub fn marzullo(intervals: &[(i64, i64)]) -> Option<(usize, i64, i64)> {
    // Edges as (offset, kind): kind 0 opens an interval, 1 closes one, so at one offset opening
    // comes first and touching intervals overlap.
    let mut edges: Vec<(i64, u8)> = intervals.iter().flat_map(|(low, high)| [(*low, 0), (*high, 1)]).collect();
    edges.sort_unstable();
    let (mut open, mut best) = (0usize, None::<(usize, i64, i64)>);
    for (i, (offset, kind)) in edges.iter().enumerate() {
        if *kind == 0 {
            open += 1;
            // The interval that opens here runs to the next edge, which closes one.
            if let Some((next, _)) = edges.get(i + 1) {
                if best.is_none_or(|(count, _, _)| open > count) {
                    best = Some((open, *offset, *next));
                }
            }
        } else {
            open -= 1;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marzullo_finds_what_most_sources_agree_on() {
        assert_eq!(marzullo(&[]), None);
        assert_eq!(marzullo(&[(0, 0)]), Some((1, 0, 0)));
        // Two agree near an hour away; this node (0) is alone.
        assert_eq!(
            marzullo(&[(0, 0), (3_599_990, 3_600_002), (3_599_995, 3_600_005)]),
            Some((2, 3_599_995, 3_600_002))
        );
        // Two agree with this node.
        assert_eq!(marzullo(&[(0, 0), (-3, 2), (-3_600_005, -3_599_990)]), Some((2, 0, 0)));
        // Touching intervals overlap at the point.
        assert_eq!(marzullo(&[(0, 5), (5, 9)]), Some((2, 5, 5)));
        // Nobody agrees with anybody: one each, the first.
        assert_eq!(marzullo(&[(0, 0), (100, 110), (-200, -190)]).map(|(count, _, _)| count), Some(1));
    }

    #[test]
    fn a_clock_an_hour_from_two_agreeing_voters_is_skewed_and_corrected() {
        let now = tokio::time::Instant::now();
        let hour: u64 = 3_600_000;
        let voters: BTreeSet<u64> = [1, 2, 3].into();
        // Node 3 runs an hour ahead: the others read an hour less than it sent.
        let bound = ClockBound::new(1_000);
        assert_eq!(bound.assess(3, &voters, now), ClockStatus::Unknown, "no samples yet");
        bound.record(1, 10 * hour, 9 * hour, Duration::from_millis(2), now);
        bound.record(2, 10 * hour, 9 * hour + 1, Duration::from_millis(3), now);
        let status = bound.assess(3, &voters, now);
        assert!(
            matches!(status, ClockStatus::Skewed { skew_ms } if (hour as i64 - 5..=hour as i64 + 5).contains(&skew_ms))
        );
        assert!(!bound.may_expire());
        let corrected = bound.cluster_time(10 * hour);
        assert!((9 * hour - 5..=9 * hour + 5).contains(&corrected), "cluster time is the quorum's: {corrected}");
        assert_eq!(bound.agreeing_peer(3, &voters), Some(1));

        // Node 1, on time, with node 2 agreeing (400 ms off: within the bound) and node 3 an
        // hour ahead.
        let bound = ClockBound::new(1_000);
        bound.record(2, 10 * hour, 10 * hour + 400, Duration::from_millis(2), now);
        bound.record(3, 10 * hour, 11 * hour, Duration::from_millis(2), now);
        assert_eq!(bound.assess(1, &voters, now), ClockStatus::Synchronized { skew_ms: 0 });
        assert_eq!(bound.cluster_time(10 * hour), 10 * hour, "a clock the quorum agrees with stands");
        assert!(bound.may_expire());
        assert_eq!(bound.agreeing_peer(1, &voters), Some(2), "node 3 disagrees");

        // Stale samples are no quorum; a single voter is its own.
        let later = now + SAMPLE_AGE_MAX + Duration::from_secs(1);
        assert_eq!(bound.assess(1, &voters, later), ClockStatus::Unknown);
        assert!(!bound.may_expire());
        assert_eq!(bound.assess(1, &[1].into(), later), ClockStatus::Synchronized { skew_ms: 0 });
    }

    #[tokio::test]
    async fn a_leader_waits_once_for_its_first_measurement_then_never_again() {
        let bound = ClockBound::new(1_000);
        let wait = Duration::from_millis(50);
        let started = std::time::Instant::now();
        bound.first_measured(wait).await;
        assert!(started.elapsed() >= wait, "the first stamp waits for a measurement");
        let again = std::time::Instant::now();
        bound.first_measured(Duration::from_secs(60)).await;
        assert!(again.elapsed() < Duration::from_secs(5), "clocks that never agree must not slow every write");
    }

    #[test]
    fn voters_that_disagree_with_each_other_leave_the_clock_unknown() {
        let now = tokio::time::Instant::now();
        let bound = ClockBound::new(1_000);
        bound.record(2, 4_000_000, 4_000_000 + 3_600_000, Duration::from_millis(2), now);
        bound.record(3, 4_000_000, 4_000_000 - 3_600_000, Duration::from_millis(2), now);
        assert_eq!(bound.assess(1, &[1, 2, 3].into(), now), ClockStatus::Unknown);
        assert_eq!(bound.cluster_time(5), 5, "an unknown clock is not corrected");
    }
}
