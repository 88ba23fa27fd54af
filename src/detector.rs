//! Phi-accrual failure detection (Hayashibara et al.), with the exponential model that
//! node-gossip and Cassandra use: `phi = log10(e) * t / mean`, where `t` is the time since the
//! last heartbeat increase and `mean` the mean of the recent intervals between heartbeats.
//!
//! Gossip delivers a peer's heartbeat second-hand and often several beats at once, so an
//! increase by `k` after `d` counts as `k` intervals of `d / k`: the mean tracks the peer's own
//! pace rather than how often news of it happens to arrive, and every observer converges on the
//! same mean. Detection then takes about the same time everywhere: the time the last heartbeat
//! took to arrive plus `threshold / log10(e)` beats.
//!
//! Invariants: the window holds the last 950 to 999 intervals once that many were seen (never
//! more than `WINDOW`) and is updated in O(1) in 96 bytes, kept as sums of blocks of `BLOCK`
//! intervals, because one process may track a million (node, peer) pairs;
//! no interval above `max_interval` enters it, so one long outage cannot make later detection
//! slow; and the mean always includes `PRIOR_SAMPLES` intervals of `bootstrap_interval`, so a
//! peer that is never heard from again is still convicted in bounded time, and a young window
//! holding one short interval (a heartbeat heard through two paths a moment apart) does not
//! collapse the mean and convict a healthy peer.
//!
//! A peer heard of second-hand starts at [`PhiDetector::learned`]: silence counts from when *we*
//! learned of it, against a mean of `UNCONFIRMED_MEAN_FACTOR` bootstrap intervals until its first
//! rise (a grace for clusters that form slowly), and the time until that first rise is no
//! interval (the heartbeat we learned may have been old already).

use std::time::Duration;
use tokio::time::Instant;

use std::f64::consts::LOG10_E;

/// Weight of the bootstrap interval in the mean, in samples: decisive for a new peer,
/// negligible once the window holds hundreds of real intervals.
const PRIOR_SAMPLES: f64 = 4.0;

/// The window of node-gossip and Cassandra, in intervals.
pub const WINDOW: usize = 1000;
/// Intervals summed together; the window slides a block at a time.
const BLOCK: u32 = 50;
/// Full blocks kept besides the one filling, so the window never exceeds `WINDOW`.
const BLOCKS: usize = WINDOW / BLOCK as usize - 1;

/// A learned peer not yet seen to beat is judged on this many times the bootstrap interval: while
/// a cluster forms, news of a node's first beats is slowest to arrive (bootstrap grace).
const UNCONFIRMED_MEAN_FACTOR: f64 = 3.0;

/// At most this many intervals enter the window per observed increase, so a long-partitioned
/// peer's jump costs O(1).
const MAX_INTERVALS_PER_RISE: u64 = 8;

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    pub max_interval: Duration,
    /// The mean assumed before intervals are seen: the interval between a node's heartbeats.
    pub bootstrap_interval: Duration,
}

impl DetectorConfig {
    /// The window of node-gossip and Cassandra, starting from the heartbeat interval.
    pub fn for_interval(beat_interval: Duration, max_interval: Duration) -> Self {
        DetectorConfig {
            max_interval,
            bootstrap_interval: beat_interval,
        }
    }
}

/// One peer's heartbeat history, as millisecond sums of blocks of intervals.
#[derive(Clone, Debug, Default)]
pub struct PhiDetector {
    /// Sums of the last `full_blocks` full blocks, a ring starting at `oldest_block`.
    block_sums_ms: [u32; BLOCKS],
    full_blocks: u8,
    oldest_block: u8,
    /// The block being filled.
    filling_sum_ms: u32,
    filling_len: u32,
    /// Everything in the window: the full blocks and the filling one.
    sum_ms: u64,
    len: u32,
    last_heartbeat: Option<Instant>,
    /// Learned of, and no rise seen since: the next rise starts the intervals.
    awaiting_first_rise: bool,
}

impl PhiDetector {
    /// Starts watching a peer we just learned of, whose heartbeat we have not seen rise.
    pub fn learned(&mut self, now: Instant) {
        *self = PhiDetector {
            last_heartbeat: Some(now),
            awaiting_first_rise: true,
            ..PhiDetector::default()
        };
    }

    /// Records that the heartbeat rose by `rise` (at least 1) at `now`.
    pub fn heartbeat(&mut self, now: Instant, rise: u64, config: &DetectorConfig) {
        let measured = !std::mem::take(&mut self.awaiting_first_rise);
        if let (Some(last), true) = (self.last_heartbeat, measured) {
            let rise = rise.max(1);
            let per_beat = (now.saturating_duration_since(last) / rise.min(u32::MAX as u64) as u32)
                .min(config.max_interval);
            let interval = per_beat.as_millis().min(u16::MAX as u128) as u16;
            for _ in 0..rise.min(MAX_INTERVALS_PER_RISE) {
                self.record(interval);
            }
        }
        self.last_heartbeat = Some(now.max(self.last_heartbeat.unwrap_or(now)));
    }

    fn record(&mut self, interval: u16) {
        self.filling_sum_ms += interval as u32;
        self.filling_len += 1;
        self.sum_ms += interval as u64;
        self.len += 1;
        if self.filling_len < BLOCK {
            return;
        }
        let full = self.full_blocks as usize;
        let slot = if full < BLOCKS {
            self.full_blocks += 1;
            (self.oldest_block as usize + full) % BLOCKS
        } else {
            // The oldest block slides out of the window.
            let oldest = self.oldest_block as usize;
            self.sum_ms -= self.block_sums_ms[oldest] as u64;
            self.len -= BLOCK;
            self.oldest_block = ((oldest + 1) % BLOCKS) as u8;
            oldest
        };
        self.block_sums_ms[slot] = self.filling_sum_ms;
        self.filling_sum_ms = 0;
        self.filling_len = 0;
    }

    /// Suspicion that the peer is down; 0 right after a heartbeat, growing linearly with silence.
    pub fn phi(&self, now: Instant, config: &DetectorConfig) -> f64 {
        let Some(last) = self.last_heartbeat else {
            return 0.0;
        };
        let bootstrap_ms = config.bootstrap_interval.as_secs_f64() * 1000.0;
        let mean_ms = if self.awaiting_first_rise {
            bootstrap_ms * UNCONFIRMED_MEAN_FACTOR
        } else {
            (self.sum_ms as f64 + PRIOR_SAMPLES * bootstrap_ms) / (self.len as f64 + PRIOR_SAMPLES)
        };
        let silence_ms = now.saturating_duration_since(last).as_secs_f64() * 1000.0;
        LOG10_E * silence_ms / mean_ms.max(1.0)
    }

    /// Forgets all history; the next heartbeat starts a fresh window. Used after a conviction so
    /// that the outage does not distort detection once the peer is back.
    pub fn reset(&mut self) {
        *self = PhiDetector::default();
    }

    /// Does not count `stall` against the peer: our own process was frozen, not the peer.
    pub fn forgive(&mut self, stall: Duration) {
        if let Some(last) = self.last_heartbeat.as_mut() {
            *last += stall;
        }
    }

    pub fn window_len(&self) -> usize {
        self.len as usize
    }

    pub fn mean_interval(&self) -> Option<Duration> {
        (self.len > 0).then(|| Duration::from_micros(self.sum_ms * 1000 / self.len as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DetectorConfig {
        DetectorConfig::for_interval(Duration::from_secs(1), Duration::from_secs(10))
    }

    fn beat_every(
        detector: &mut PhiDetector,
        start: Instant,
        count: u32,
        every: Duration,
    ) -> Instant {
        let mut now = start;
        for _ in 0..count {
            now += every;
            detector.heartbeat(now, 1, &config());
        }
        now
    }

    #[test]
    fn phi_after_steady_one_second_heartbeats() {
        let mut detector = PhiDetector::default();
        let last = beat_every(&mut detector, Instant::now(), 100, Duration::from_secs(1));
        let phi_1s = detector.phi(last + Duration::from_secs(1), &config());
        let phi_10s = detector.phi(last + Duration::from_secs(10), &config());
        assert!(phi_1s < 0.5, "phi one second later: {phi_1s}");
        assert!(phi_10s > 4.0, "phi ten seconds later: {phi_10s}");
        assert!((phi_1s - LOG10_E).abs() < 1e-9);
        // The default threshold of 8 is crossed after about 18.4 silent mean intervals.
        assert!(detector.phi(last + Duration::from_millis(18_300), &config()) < 8.0);
        assert!(detector.phi(last + Duration::from_millis(18_500), &config()) > 8.0);
    }

    #[test]
    fn window_holds_the_last_950_to_999_intervals() {
        let mut detector = PhiDetector::default();
        let mut now = Instant::now();
        detector.heartbeat(now, 1, &config());
        for i in 1..=3000 {
            now += Duration::from_secs(1);
            detector.heartbeat(now, 1, &config());
            let len = detector.window_len();
            assert!(
                len <= WINDOW && (i < 1000 || len >= 950),
                "{i} intervals, window {len}"
            );
        }
        let now = beat_every(&mut detector, now, 1500, Duration::from_secs(3));
        // Every 1 s interval has slid out: the mean is exactly the recent 3 s.
        assert_eq!(detector.mean_interval(), Some(Duration::from_secs(3)));
        beat_every(&mut detector, now, 500, Duration::from_secs(1));
        // 5000 intervals so far, a whole number of blocks: the window is the last 950, that is
        // 500 of 1 s and 450 of 3 s.
        assert_eq!(detector.window_len(), 950);
        assert_eq!(
            detector.mean_interval(),
            Some(Duration::from_micros(1_947_368))
        );
    }

    #[test]
    fn long_gaps_are_capped() {
        let mut detector = PhiDetector::default();
        let now = beat_every(&mut detector, Instant::now(), 1, Duration::from_secs(1));
        let now = beat_every(&mut detector, now, 1, Duration::from_secs(3600));
        assert_eq!(detector.mean_interval(), Some(Duration::from_secs(10)));
        let now = beat_every(&mut detector, now, 9, Duration::from_secs(1));
        assert_eq!(detector.mean_interval(), Some(Duration::from_millis(1900)));
        assert!(detector.phi(now + Duration::from_secs(40), &config()) > 8.0);
    }

    #[test]
    fn reset_clears_history() {
        let mut detector = PhiDetector::default();
        let now = beat_every(&mut detector, Instant::now(), 50, Duration::from_secs(5));
        detector.reset();
        assert_eq!(detector.window_len(), 0);
        assert_eq!(detector.mean_interval(), None);
        assert_eq!(detector.phi(now + Duration::from_secs(100), &config()), 0.0);
        detector.heartbeat(now, 1, &config());
        // Back to the bootstrap mean of one second.
        let phi = detector.phi(now + Duration::from_secs(10), &config());
        assert!((phi - 10.0 * LOG10_E).abs() < 1e-9);
    }

    #[test]
    fn never_heard_peer_is_convicted_from_the_bootstrap_mean() {
        let mut detector = PhiDetector::default();
        let start = Instant::now();
        detector.heartbeat(start, 1, &config());
        assert_eq!(detector.window_len(), 0);
        assert!(detector.phi(start + Duration::from_secs(19), &config()) > 8.0);
        assert_eq!(PhiDetector::default().phi(start, &config()), 0.0);
    }

    #[test]
    fn the_wait_for_a_learned_peers_first_rise_is_no_interval() {
        let mut detector = PhiDetector::default();
        let start = Instant::now();
        detector.learned(start);
        // Convicted from when we learned of it, at three bootstrap means, if it never beats.
        assert!(detector.phi(start + Duration::from_secs(55), &config()) < 8.0);
        assert!(detector.phi(start + Duration::from_secs(56), &config()) > 8.0);
        // News of its next beat took 7 s to arrive: not a 7 s interval.
        let first = start + Duration::from_secs(7);
        detector.heartbeat(first, 1, &config());
        assert_eq!(detector.window_len(), 0);
        detector.heartbeat(first + Duration::from_secs(1), 1, &config());
        assert_eq!(detector.mean_interval(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn young_window_leans_on_the_bootstrap_mean() {
        let mut detector = PhiDetector::default();
        let now = beat_every(&mut detector, Instant::now(), 2, Duration::from_secs(1));
        // The same heartbeat rise heard again through another path, 2 ms later.
        detector.heartbeat(now + Duration::from_millis(2), 1, &config());
        assert_eq!(detector.mean_interval(), Some(Duration::from_millis(501)));
        // (1000 + 2 + 4 × 1000) / 6 ≈ 834 ms, not 501 ms.
        let phi = detector.phi(now + Duration::from_secs(2), &config());
        assert!(
            (phi - LOG10_E * 1998.0 / (5002.0 / 6.0)).abs() < 1e-6,
            "{phi}"
        );
    }

    #[test]
    fn several_beats_heard_at_once_count_as_several_intervals() {
        let mut detector = PhiDetector::default();
        let start = Instant::now();
        detector.heartbeat(start, 1, &config());
        detector.heartbeat(start + Duration::from_secs(3), 3, &config());
        assert_eq!(detector.window_len(), 3);
        assert_eq!(detector.mean_interval(), Some(Duration::from_secs(1)));
        // A jump after a long partition: bounded work, and the per-beat interval stays capped.
        detector.heartbeat(start + Duration::from_secs(3600), 1_000_000, &config());
        assert_eq!(detector.window_len(), 3 + 8);
    }

    #[test]
    fn forgiven_stall_does_not_count() {
        let mut detector = PhiDetector::default();
        let now = beat_every(&mut detector, Instant::now(), 20, Duration::from_secs(1));
        detector.forgive(Duration::from_secs(30));
        assert!(detector.phi(now + Duration::from_secs(31), &config()) < 0.5);
    }
}
