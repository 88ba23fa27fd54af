//! Settings of one node: every numeric option, its default and its bounds, in one table
//! ([`NUMERIC_OPTIONS`]). It is the single source of truth: `index.js` reads it through the
//! binding, and a test checks `index.d.ts` and the README against it.

use crate::detector::DetectorConfig;
use crate::wire::{self, Limits};
use std::time::Duration;

/// One numeric option as users write it (milliseconds for durations).
#[derive(Clone, Copy, Debug)]
pub struct NumericOption {
    pub name: &'static str,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    pub integer: bool,
}

const fn option(
    name: &'static str,
    default: f64,
    min: f64,
    max: f64,
    integer: bool,
) -> NumericOption {
    NumericOption {
        name,
        default,
        min,
        max,
        integer,
    }
}

const DAY_MS: f64 = 24.0 * 3600e3;
const I32_MAX: f64 = i32::MAX as f64;

pub const NUMERIC_OPTIONS: &[NumericOption] = &[
    option("port", 0.0, 0.0, 65535.0, true),
    option("gossipInterval", 1000.0, 1.0, 3600e3, false),
    option("gossipFanout", 1.0, 1.0, 16.0, true),
    option("phiThreshold", 8.0, 0.1, 1000.0, false),
    option("maxInterval", 10e3, 1.0, 65e3, true),
    option("deadPeerTtl", DAY_MS, 1.0, 365.0 * DAY_MS, true),
    option("tombstoneTtl", 3600e3, 1.0, 365.0 * DAY_MS, true),
    option("pushFanout", 4.0, 1.0, 64.0, true),
    option("connectTimeout", 2000.0, 1.0, 600e3, true),
    option("idleTimeout", 5000.0, 1.0, 600e3, true),
    option("maxDatagramBytes", 1400.0, 0.0, 65507.0, true),
    option("maxFrameBytes", (4 << 20) as f64, 1024.0, I32_MAX, true),
    option("maxKeyBytes", 1024.0, 1.0, (1 << 20) as f64, true),
    option("maxValueBytes", (256 << 10) as f64, 1.0, I32_MAX, true),
    option("maxPeersPerMessage", 8192.0, 1.0, (1 << 20) as f64, true),
    option("maxInboundConnections", 1024.0, 1.0, (1 << 20) as f64, true),
    option("maxClockSkew", 60e3, 1000.0, 365.0 * DAY_MS, true),
    option("maxPeers", 10000.0, 1.0, (1 << 20) as f64, true),
    option("maxKeysPerPeer", 65536.0, 1.0, I32_MAX, true),
    option("maxBytesPerPeer", (16 << 20) as f64, 1024.0, 1e15, true),
];

/// Options that are not numbers; with [`NUMERIC_OPTIONS`] they are every option there is.
pub const OTHER_OPTIONS: &[&str] = &[
    "seeds",
    "address",
    "advertise",
    "clusterName",
    "keys",
    "acceptPlaintext",
];

pub const DEFAULT_CLUSTER_NAME: &str = "gossiper";

/// A value outside what an option accepts. `code` is the Node-style error code.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionError {
    /// `TypeError` or `RangeError`.
    pub range: bool,
    pub code: &'static str,
    pub message: String,
}

impl OptionError {
    pub fn type_error(code: &'static str, message: String) -> Self {
        OptionError {
            range: false,
            code,
            message,
        }
    }

    pub fn range_error(message: String) -> Self {
        OptionError {
            range: true,
            code: "ERR_OUT_OF_RANGE",
            message,
        }
    }
}

/// Checks one numeric option's value against its row of the table.
pub fn check_numeric(option: &NumericOption, value: f64) -> Result<f64, OptionError> {
    let NumericOption {
        name,
        min,
        max,
        integer,
        ..
    } = *option;
    if value.is_nan() {
        return Err(OptionError::type_error(
            "ERR_INVALID_ARG_TYPE",
            format!("The \"{name}\" argument must be a number. Received NaN"),
        ));
    }
    if !(min..=max).contains(&value) || (integer && value.fract() != 0.0) {
        let what = if integer { "an integer" } else { "a number" };
        return Err(OptionError::range_error(format!(
            "The \"{name}\" argument must be {what} >= {min} and <= {max}. Received {value}"
        )));
    }
    Ok(value)
}

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
    /// How long a deletion is remembered as a tombstone before it is forgotten (collected). A
    /// node away for longer gets the owner's whole state on return instead of a delta.
    pub tombstone_ttl: Duration,
    pub limits: Limits,
    /// Branching of the push tree: a fresh change goes to this many peers at once, each of which
    /// forwards it to its share of the rest.
    pub push_fanout: usize,
    pub connect_timeout: Duration,
    /// How long a connection may wait for its next frame, and a send may take.
    pub idle_timeout: Duration,
    pub max_inbound_connections: usize,
    /// The largest datagram sent or taken: a compact exchange whose frames fit goes by UDP. 0
    /// turns datagrams off (no socket; every exchange takes a connection).
    pub max_datagram_bytes: usize,
    /// How far apart the clocks of two members may be: a generation (a start time) further
    /// ahead of ours is refused as implausible, a sealed frame stamped further from our clock is
    /// stale, and within it the first frames of connections are remembered so that a replay is
    /// dropped. See `docs/protocol.md`.
    pub max_clock_skew: Duration,
    /// With keys: accept plaintext frames too (and answer them in plaintext), for turning
    /// encryption on in a running cluster. Counted in `Counters::plaintext_accepted`.
    pub accept_plaintext: bool,
    /// Peers kept in the table, live or failed; names beyond it are refused.
    pub max_peers: usize,
    /// Keys, and bytes of keys and values, held for one node (this one included).
    pub max_keys_per_peer: usize,
    pub max_bytes_per_peer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        // The table's defaults are all in range.
        Settings::from_options(DEFAULT_CLUSTER_NAME.into(), |_| None).expect("defaults are valid")
    }
}

impl Settings {
    /// Settings from numeric options by name (`None` takes the default), each checked against
    /// [`NUMERIC_OPTIONS`], and checked together: a value at `maxValueBytes` under a key at
    /// `maxKeyBytes` must fit in one frame, or it could never travel.
    pub fn from_options(
        cluster_name: String,
        value_of: impl Fn(&str) -> Option<f64>,
    ) -> Result<Settings, OptionError> {
        if cluster_name.is_empty() || cluster_name.len() > 255 {
            return Err(OptionError::type_error(
                "ERR_INVALID_ARG_VALUE",
                "The \"clusterName\" argument must be a non-empty string of at most 255 bytes"
                    .into(),
            ));
        }
        let mut values = std::collections::HashMap::new();
        for option in NUMERIC_OPTIONS {
            let value = match value_of(option.name) {
                Some(value) => check_numeric(option, value)?,
                None => option.default,
            };
            values.insert(option.name, value);
        }
        let get = |name: &str| values[name];
        let ms = |name: &str| Duration::from_secs_f64(get(name) / 1000.0);
        let gossip_interval = ms("gossipInterval");
        let settings = Settings {
            cluster_name,
            gossip_interval,
            gossip_fanout: get("gossipFanout") as usize,
            phi_threshold: get("phiThreshold"),
            detector: DetectorConfig::for_interval(gossip_interval, ms("maxInterval")),
            dead_peer_ttl: ms("deadPeerTtl"),
            tombstone_ttl: ms("tombstoneTtl"),
            limits: Limits {
                max_frame_bytes: get("maxFrameBytes") as usize,
                max_key_bytes: get("maxKeyBytes") as usize,
                max_value_bytes: get("maxValueBytes") as usize,
                max_peers_per_message: get("maxPeersPerMessage") as usize,
                max_keys_per_message: get("maxKeysPerPeer") as usize,
            },
            push_fanout: get("pushFanout") as usize,
            connect_timeout: ms("connectTimeout"),
            idle_timeout: ms("idleTimeout"),
            max_inbound_connections: get("maxInboundConnections") as usize,
            max_datagram_bytes: get("maxDatagramBytes") as usize,
            max_clock_skew: ms("maxClockSkew"),
            accept_plaintext: false,
            max_peers: get("maxPeers") as usize,
            max_keys_per_peer: get("maxKeysPerPeer") as usize,
            max_bytes_per_peer: get("maxBytesPerPeer") as usize,
        };
        let largest_entry = settings.limits.max_value_bytes + settings.limits.max_key_bytes;
        if largest_entry > settings.largest_entry_budget() {
            return Err(OptionError::range_error(format!(
                "The \"maxValueBytes\" argument ({}) plus maxKeyBytes ({}) must fit in one frame: \
                 at most {} with maxFrameBytes {}",
                settings.limits.max_value_bytes,
                settings.limits.max_key_bytes,
                settings
                    .largest_entry_budget()
                    .saturating_sub(settings.limits.max_key_bytes),
                settings.limits.max_frame_bytes
            )));
        }
        if largest_entry > settings.max_bytes_per_peer {
            return Err(OptionError::range_error(format!(
                "The \"maxBytesPerPeer\" argument ({}) must hold one value at maxValueBytes ({}) \
                 under a key at maxKeyBytes ({})",
                settings.max_bytes_per_peer,
                settings.limits.max_value_bytes,
                settings.limits.max_key_bytes
            )));
        }
        Ok(settings)
    }

    /// Bytes one outgoing message may fill, leaving room for the frame header (the cluster name
    /// and our own name) and the lists' own headers.
    pub(crate) fn message_budget(&self) -> usize {
        self.limits.max_frame_bytes.saturating_sub(512)
    }

    /// Room a Push or Suspect keeps for its `forward_to` names.
    pub(crate) fn forward_room(&self) -> usize {
        (64 << 10).min(self.message_budget() / 2)
    }

    /// Room for the deltas of a Push, which also carries `forward_to`.
    pub(crate) fn delta_budget(&self) -> usize {
        self.message_budget() - self.forward_room()
    }

    /// Most entries one list of an outgoing message may hold: within `maxPeersPerMessage`, and
    /// few enough that entries naming the longest names fit in a frame.
    pub(crate) fn entries_per_message(&self) -> usize {
        let longest_entry = wire::DELTA_HEADER_BYTES + wire::name_bytes(wire::LONGEST_NAME);
        self.limits
            .max_peers_per_message
            .min(self.message_budget() / longest_entry)
            .max(1)
    }

    /// The largest key plus value that one delta can always carry: the delta budget less room
    /// for the node's name, counters and the entry's own framing.
    fn largest_entry_budget(&self) -> usize {
        self.delta_budget().saturating_sub(128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_table() {
        let settings = Settings::default();
        assert_eq!(settings.gossip_interval, Duration::from_secs(1));
        assert_eq!(settings.limits.max_frame_bytes, 4 << 20);
        assert_eq!(settings.dead_peer_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(settings.tombstone_ttl, Duration::from_secs(3600));
        assert_eq!(settings.cluster_name, "gossiper");
    }

    #[test]
    fn bad_numbers_are_typed_errors_naming_the_option() {
        let with = |name: &'static str, value: f64| {
            Settings::from_options("c".into(), move |n| (n == name).then_some(value))
        };
        for (name, value) in [
            ("gossipInterval", 0.0),
            ("gossipInterval", f64::INFINITY),
            ("connectTimeout", -1.0),
            ("pushFanout", 1.5),
            ("port", 70000.0),
        ] {
            let error = with(name, value).unwrap_err();
            assert!(error.range, "{name} {value}");
            assert_eq!(error.code, "ERR_OUT_OF_RANGE");
            assert!(error.message.contains(name), "{}", error.message);
        }
        let error = with("idleTimeout", f64::NAN).unwrap_err();
        assert!(!error.range && error.code == "ERR_INVALID_ARG_TYPE");
    }

    #[test]
    fn a_value_limit_beyond_what_a_frame_carries_is_refused() {
        let error = Settings::from_options("c".into(), |n| match n {
            "maxFrameBytes" => Some(65536.0),
            "maxValueBytes" => Some(65536.0),
            _ => None,
        })
        .unwrap_err();
        assert!(error.message.contains("maxValueBytes"), "{}", error.message);
        assert!(Settings::from_options("".into(), |_| None).is_err());
    }
}
