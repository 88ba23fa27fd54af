//! The value store of one node in one generation: its keys, each with the version that last
//! wrote it, indexed by version so that "everything after version v" costs what it returns.
//!
//! Invariant: `by_version` holds exactly one entry per key, at that key's current version, and
//! `max_version` is at least every version held. Two honest copies of one node's state, taken at
//! different times, therefore never disagree about a version both have passed: [`NodeState::admits`]
//! checks that, so that a forged write colliding with a real one shows.

use crate::peers::FnvBuild;
use crate::wire::{DigestEntry, KeyValue, NodeDelta};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Debug)]
struct Versioned {
    version: u64,
    value: Bytes,
}

/// Everything known of one node in one generation.
#[derive(Clone, Debug, Default)]
pub struct NodeState {
    pub generation: u64,
    pub heartbeat: u64,
    pub max_version: u64,
    pub left: bool,
    kvs: HashMap<String, Versioned, FnvBuild>,
    /// The same keys ordered by version, so a delta costs what it carries, not the whole map.
    by_version: BTreeMap<u64, String>,
}

impl NodeState {
    pub(crate) fn new(generation: u64) -> Self {
        NodeState {
            generation,
            ..NodeState::default()
        }
    }

    pub(crate) fn insert(&mut self, key: String, version: u64, value: Bytes) {
        if let Some(old) = self.kvs.insert(key.clone(), Versioned { version, value }) {
            self.by_version.remove(&old.version);
        }
        self.by_version.insert(version, key);
        self.max_version = self.max_version.max(version);
    }

    pub fn value(&self, key: &str) -> Option<&Bytes> {
        self.kvs.get(key).map(|v| &v.value)
    }

    /// Every key and value, oldest version first.
    pub(crate) fn into_entries(mut self) -> impl Iterator<Item = (String, Bytes)> {
        std::mem::take(&mut self.by_version)
            .into_values()
            .map(move |key| {
                let value = self.kvs.remove(&key).map(|v| v.value).unwrap_or_default();
                (key, value)
            })
    }

    /// Whether `kv`, said to be this node's write at a version this state has passed, can be
    /// true: the key is held at that version with that value, or was written again later (and
    /// no other key holds that version).
    pub(crate) fn admits(&self, kv: &KeyValue) -> bool {
        match self.kvs.get(&kv.key) {
            Some(held) if held.version == kv.version => held.value == kv.value,
            Some(held) => held.version > kv.version && !self.by_version.contains_key(&kv.version),
            None => false,
        }
    }

    /// Whether `delta`, said to be of this very state's node and generation, tells its owner's
    /// truth about the versions the owner has written: every key it carries is admitted, and
    /// every key the owner holds in its range is carried. Only the owner can tell the second:
    /// another copy may be older, and miss keys written again since.
    pub(crate) fn confirms(&self, delta: &NodeDelta) -> bool {
        let end = delta.to_version.min(self.max_version);
        let carried = |version: &u64| {
            delta
                .kvs
                .binary_search_by_key(version, |kv| kv.version)
                .is_ok()
        };
        delta
            .kvs
            .iter()
            .filter(|kv| kv.version <= end)
            .all(|kv| self.admits(kv))
            && (delta.from_version >= end
                || self
                    .by_version
                    .range(delta.from_version + 1..=end)
                    .all(|(version, _)| carried(version)))
    }

    pub fn keys(&self) -> Vec<String> {
        self.by_version.values().cloned().collect()
    }

    pub(crate) fn digest(&self, name: &str) -> DigestEntry {
        DigestEntry {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            max_version: self.max_version,
        }
    }

    /// What this state holds at `version` alone (at least 1): the delta from `version - 1`,
    /// with the key written at `version` if it is still held there.
    pub(crate) fn at_version(&self, name: &str, version: u64) -> NodeDelta {
        let kvs = self.by_version.get(&version).map(|key| KeyValue {
            key: key.clone(),
            version,
            value: self.kvs[key].value.clone(),
        });
        NodeDelta {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            from_version: version - 1,
            to_version: version,
            left: self.left && version == self.max_version,
            kvs: kvs.into_iter().collect(),
        }
    }

    /// Keys written after `from_version`, oldest first, while `budget` lasts. A cut delta ends at
    /// its last key, so the receiver's `max_version` stays truthful.
    pub(crate) fn delta(&self, name: &str, from_version: u64, budget: &mut usize) -> NodeDelta {
        *budget = budget.saturating_sub(name.len() + 48);
        let mut kvs = Vec::new();
        let mut to_version = self.max_version;
        let mut complete = true;
        for (&version, key) in self.by_version.range(from_version + 1..) {
            let value = &self.kvs[key].value;
            let cost = key.len() + value.len() + 12;
            if cost > *budget {
                to_version = kvs.last().map_or(from_version, |kv: &KeyValue| kv.version);
                complete = false;
                break;
            }
            *budget -= cost;
            kvs.push(KeyValue {
                key: key.clone(),
                version,
                value: value.clone(),
            });
        }
        NodeDelta {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            from_version: from_version.min(to_version),
            to_version,
            left: self.left && complete,
            kvs,
        }
    }
}
