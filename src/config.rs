//! Settings of one node: every tunable, its default and its bounds, in one place.

use crate::detector::DetectorConfig;
use crate::wire::Limits;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster_name: String,
    pub gossip_interval: Duration,
    /// Live peers each round exchanges with.
    pub gossip_fanout: usize,
    pub phi_threshold: f64,
    pub detector: DetectorConfig,
    /// A peer failed for this long is forgotten, and its generation ignored for as long again.
    pub dead_peer_ttl: Duration,
    pub limits: Limits,
    /// Branching of the push tree: a fresh change goes to this many peers at once, each of which
    /// forwards it to its share of the rest.
    pub push_fanout: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_inbound_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        let gossip_interval = Duration::from_secs(1);
        Settings {
            cluster_name: "gossiper".into(),
            gossip_interval,
            gossip_fanout: 1,
            phi_threshold: 8.0,
            detector: DetectorConfig::for_interval(gossip_interval, Duration::from_secs(10)),
            dead_peer_ttl: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
            push_fanout: 4,
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_inbound_connections: 1024,
        }
    }
}

impl Settings {
    /// Room for deltas in one frame, leaving space for the header and per-entry overhead.
    pub(crate) fn delta_budget(&self) -> usize {
        self.limits
            .max_frame_bytes
            .saturating_sub(64 << 10)
            .max(self.limits.max_frame_bytes / 2)
    }
}
