//! The value store of one node in one generation, as its owner or a peer holds it: its keys, each
//! with the version that last wrote it, indexed by version so that "everything after version v"
//! costs what it returns. A deleted key stays for a while as a tombstone (an empty value), so the
//! deletion travels like a write; once the owner has forgotten it, so does everyone.
//!
//! Invariants:
//! - `by_version` holds exactly one entry per key, at that key's current version; `tombstones`
//!   holds the versions of exactly those entries that are tombstones; `max_version` is at least
//!   every version held. Two honest copies of one node's state, taken at different times,
//!   therefore never disagree about a version both have passed: [`NodeState::admits`] checks
//!   that, so that a forged write colliding with a real one shows.
//! - No tombstone at or below `horizon` is held.
//! - `bytes` is the sum of every entry's key and value lengths (a tombstone's value is empty),
//!   and a view holds no more entries or bytes than the limits it was applied under (see
//!   [`StateLimits`]).
//! - A peer's view holds no key that the owner deleted at a version at or below
//!   `max(max_version, horizon)`: applying every entry the owner holds above `max_version` to
//!   the view gives the owner's state. A delta that could break this is refused; a delta from
//!   version 0 (the sender's whole view) replaces a view that is older than its horizon.

use crate::peers::FnvBuild;
use crate::wire::{self, DigestEntry, KeyValue, NodeDelta, Rejection};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use tokio::time::Instant;

#[derive(Clone, Debug)]
struct Versioned {
    version: u64,
    /// Empty for a tombstone.
    value: Bytes,
}

impl Versioned {
    fn is_live(&self) -> bool {
        !self.value.is_empty()
    }
}

/// Everything known of one node in one generation.
#[derive(Clone, Debug, Default)]
pub struct NodeState {
    pub generation: u64,
    pub heartbeat: u64,
    pub max_version: u64,
    pub left: bool,
    /// The owner's collection horizon, as far as this view knows: the highest version whose
    /// tombstone the owner has forgotten. Above `max_version` only while a replacement that did
    /// not fit in one frame is being completed.
    pub horizon: u64,
    maps: Keys,
}

/// A node's keys, allocated once it has any: one process may hold a million views of peers,
/// most of them without keys, and three empty maps take 80 bytes.
#[derive(Clone, Debug, Default)]
struct Keys(Option<Box<KeyMaps>>);

#[derive(Clone, Debug, Default)]
struct KeyMaps {
    kvs: HashMap<String, Versioned, FnvBuild>,
    /// The same keys ordered by version, so a delta costs what it carries, not the whole map.
    by_version: BTreeMap<u64, String>,
    /// Versions of the tombstones held, so collection costs what it removes.
    tombstones: BTreeSet<u64>,
    bytes: usize,
}

/// What an outgoing message may still carry of deltas: encoded bytes, and keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    pub bytes: usize,
    pub keys: usize,
}

/// The most one view may hold: entries (tombstones included), and bytes of keys and values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StateLimits {
    pub keys: usize,
    pub bytes: usize,
}

impl StateLimits {
    /// Why writing `kv` would take `state` past these limits, if it would.
    fn refuse(self, state: &NodeState, kv: &KeyValue) -> Option<Rejection> {
        let (keys, bytes) = state.size_with(&kv.key, kv.value.len());
        if keys > self.keys {
            Some(Rejection::TooManyKeys)
        } else if bytes > self.bytes {
            Some(Rejection::TooManyBytes)
        } else {
            None
        }
    }
}

static NO_KEYS: KeyMaps = KeyMaps {
    kvs: HashMap::with_hasher(FnvBuild::new()),
    by_version: BTreeMap::new(),
    tombstones: BTreeSet::new(),
    bytes: 0,
};

impl std::ops::Deref for Keys {
    type Target = KeyMaps;

    fn deref(&self) -> &KeyMaps {
        self.0.as_deref().unwrap_or(&NO_KEYS)
    }
}

impl std::ops::DerefMut for Keys {
    fn deref_mut(&mut self) -> &mut KeyMaps {
        self.0.get_or_insert_with(Box::default)
    }
}

/// What applying a delta did (see [`NodeState::apply`]).
#[derive(Debug)]
pub(crate) struct Applied {
    /// The delta carried versions above what the view held (a replacement always does): only
    /// then does its `left` count.
    pub raised: bool,
    /// What the view held at a version where the delta disagreed with it, for the owner to judge.
    pub disputed: Option<NodeDelta>,
    /// Why the delta was applied only up to the key before one that would have taken the view
    /// past its limits: the view's max version stops there, as for a delta cut to fit a frame.
    pub refused: Option<Rejection>,
}

/// Where a delta starts for a view at `max_version` and `horizon` (see [`NodeState::delta_start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// The view may hold keys deleted since: send the whole state, from version 0.
    Replace,
    From(u64),
    /// The view knows of deletions this state may not: nothing from here can extend it.
    Nothing,
}

impl NodeState {
    pub(crate) fn new(generation: u64) -> Self {
        NodeState {
            generation,
            ..NodeState::default()
        }
    }

    /// Writes `key` at `version`, a tombstone when `value` is empty.
    pub(crate) fn insert(&mut self, key: String, version: u64, value: Bytes) {
        if value.is_empty() {
            self.maps.tombstones.insert(version);
        }
        self.maps.bytes += value.len();
        let key_len = key.len();
        match self
            .maps
            .kvs
            .insert(key.clone(), Versioned { version, value })
        {
            Some(old) => {
                self.maps.bytes -= old.value.len();
                self.maps.by_version.remove(&old.version);
                if !old.is_live() {
                    self.maps.tombstones.remove(&old.version);
                }
            }
            None => self.maps.bytes += key_len,
        }
        self.maps.by_version.insert(version, key);
        self.max_version = self.max_version.max(version);
    }

    /// How many entries, and bytes of keys and values, this state would hold with `key` set to
    /// a value of `value_len` bytes.
    pub(crate) fn size_with(&self, key: &str, value_len: usize) -> (usize, usize) {
        match self.maps.kvs.get(key) {
            Some(old) => (
                self.maps.kvs.len(),
                self.maps.bytes - old.value.len() + value_len,
            ),
            None => (
                self.maps.kvs.len() + 1,
                self.maps.bytes + key.len() + value_len,
            ),
        }
    }

    /// The value of a live key.
    pub fn value(&self, key: &str) -> Option<&Bytes> {
        self.maps
            .kvs
            .get(key)
            .filter(|v| v.is_live())
            .map(|v| &v.value)
    }

    /// Every live key and its value, oldest version first.
    pub(crate) fn into_live_entries(mut self) -> impl Iterator<Item = (String, Bytes)> {
        std::mem::take(&mut self.maps.by_version)
            .into_values()
            .filter_map(move |key| {
                let value = self.maps.kvs.remove(&key)?.value;
                (!value.is_empty()).then_some((key, value))
            })
    }

    /// Whether `kv`, said to be this node's write at a version this state has passed, can be
    /// true: the key is held at that version with that value (a tombstone for a deletion), or
    /// was written again later, or is gone at a version this state has forgotten deletions up to
    /// (deleted since and collected); and no other key holds that version.
    pub(crate) fn admits(&self, kv: &KeyValue) -> bool {
        match self.maps.kvs.get(&kv.key) {
            Some(held) if held.version == kv.version => held.value == kv.value,
            Some(held) => {
                held.version > kv.version && !self.maps.by_version.contains_key(&kv.version)
            }
            None => kv.version <= self.horizon && !self.maps.by_version.contains_key(&kv.version),
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
                    .maps
                    .by_version
                    .range(delta.from_version + 1..=end)
                    .all(|(version, _)| carried(version)))
    }

    /// Live keys, oldest version first.
    pub fn keys(&self) -> Vec<String> {
        self.maps
            .by_version
            .iter()
            .filter(|(version, _)| !self.maps.tombstones.contains(version))
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Entries held, tombstones included: what a limit on keys must count.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.maps.kvs.len()
    }

    #[cfg(test)]
    pub(crate) fn tombstone_count(&self) -> usize {
        self.maps.tombstones.len()
    }

    #[cfg(test)]
    pub(crate) fn kvs_capacity(&self) -> usize {
        self.maps.kvs.capacity()
    }

    pub(crate) fn digest(&self, name: &str) -> DigestEntry {
        DigestEntry {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            max_version: self.max_version,
            horizon: self.horizon,
        }
    }

    /// Forgets every tombstone at or below `version` and raises the horizon to it.
    pub(crate) fn collect_through(&mut self, version: u64) {
        while let Some(&oldest) = self.maps.tombstones.first() {
            if oldest > version {
                break;
            }
            self.maps.tombstones.pop_first();
            if let Some(key) = self.maps.by_version.remove(&oldest) {
                self.maps.kvs.remove(&key);
                self.maps.bytes -= key.len();
            }
        }
        self.horizon = self.horizon.max(version);
        // Churn of distinct keys would otherwise leave the map at its peak size.
        if self.maps.kvs.capacity() > 64 && self.maps.kvs.len() * 4 < self.maps.kvs.capacity() {
            let len = self.maps.kvs.len();
            self.maps.kvs.shrink_to(len * 2);
        }
    }

    /// Takes a horizon another node's view of this generation knows, when this view is past it:
    /// having every version up to `max_version`, it holds the tombstones at or below that
    /// horizon and can forget them. It can then extend views that know the horizon, which
    /// refuse deltas from views that do not (see [`NodeState::apply`]).
    pub(crate) fn learn_horizon(&mut self, generation: u64, horizon: u64) {
        if generation == self.generation && horizon > self.horizon && horizon <= self.max_version {
            self.collect_through(horizon);
        }
    }

    /// Where a delta for a view at `their_max` and `their_horizon` must start. A view that
    /// is behind our horizon on both counts may still hold keys whose tombstones we forgot: it
    /// gets our whole state, from version 0, to replace itself with. A view that knows a newer
    /// horizon than ours and is not past it would refuse what we hold between the two.
    pub(crate) fn delta_start(&self, their_max: u64, their_horizon: u64) -> Start {
        if self.horizon > their_max.max(their_horizon) {
            Start::Replace
        } else if their_horizon > their_max.max(self.horizon) {
            Start::Nothing
        } else {
            Start::From(their_max)
        }
    }

    /// What this state holds at `version` alone (at least 1): the delta from `version - 1`,
    /// with the key written at `version` if it is still held there.
    pub(crate) fn at_version(&self, name: &str, version: u64) -> NodeDelta {
        let kvs = self.maps.by_version.get(&version).map(|key| KeyValue {
            key: key.clone(),
            version,
            value: self.maps.kvs[key].value.clone(),
        });
        NodeDelta {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            from_version: version - 1,
            to_version: version,
            left: self.left && version == self.max_version,
            kvs: kvs.into_iter().collect(),
            horizon: self.horizon,
        }
    }

    /// This node's counters without keys: a delta from `max_version` to itself, which tells a
    /// receiver the node exists and how far it is, and costs a few dozen bytes.
    pub(crate) fn announcement(&self, name: &str) -> NodeDelta {
        NodeDelta {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            from_version: self.max_version,
            to_version: self.max_version,
            left: self.left,
            kvs: Vec::new(),
            horizon: self.horizon,
        }
    }

    /// Keys written after `from_version`, oldest first, while `budget` lasts; None when it
    /// cannot hold even the delta's header. A cut delta ends at its last key, so the receiver's
    /// `max_version` stays truthful.
    pub(crate) fn delta(
        &self,
        name: &str,
        from_version: u64,
        budget: &mut Budget,
    ) -> Option<NodeDelta> {
        budget.bytes = budget
            .bytes
            .checked_sub(wire::DELTA_HEADER_BYTES + wire::name_bytes(name))?;
        let mut kvs = Vec::new();
        let mut to_version = self.max_version;
        let mut complete = true;
        for (&version, key) in self.maps.by_version.range(from_version + 1..) {
            let value = &self.maps.kvs[key].value;
            let cost = wire::KEY_VALUE_BYTES + key.len() + value.len();
            if cost > budget.bytes || budget.keys == 0 {
                to_version = kvs.last().map_or(from_version, |kv: &KeyValue| kv.version);
                complete = false;
                break;
            }
            budget.bytes -= cost;
            budget.keys -= 1;
            kvs.push(KeyValue {
                key: key.clone(),
                version,
                value: value.clone(),
            });
        }
        Some(NodeDelta {
            name: name.to_owned(),
            generation: self.generation,
            heartbeat: self.heartbeat,
            from_version: from_version.min(to_version),
            to_version,
            left: self.left && complete,
            kvs,
            horizon: self.horizon,
        })
    }

    /// Applies a delta of `name`, of this view's generation, within `limits`, reporting each
    /// change to a key as it happens (`None`: deleted). Returns None, changing nothing, when the
    /// delta is refused: it leaves a gap, or it cannot be trusted against the deletions this
    /// view or the sender knows of.
    pub(crate) fn apply(
        &mut self,
        name: &str,
        delta: &mut NodeDelta,
        limits: StateLimits,
        changed: &mut impl FnMut(&str, Option<&[u8]>),
    ) -> Option<Applied> {
        let stale = delta.horizon > self.max_version.max(self.horizon);
        if stale && delta.from_version == 0 {
            let disputed = self.first_disputed(name, &delta.kvs);
            let previous = std::mem::replace(self, NodeState::new(self.generation));
            self.heartbeat = previous.heartbeat;
            self.left = previous.left;
            let refused = self.take_snapshot(delta, limits);
            self.report_replacement(&previous, true, changed);
            return Some(Applied {
                raised: true,
                disputed,
                refused,
            });
        }
        let sender_behind = delta.horizon < self.horizon && self.max_version < self.horizon;
        if stale || sender_behind || delta.from_version > self.max_version {
            return None;
        }
        let raised = delta.to_version > self.max_version;
        let disputed = self.first_disputed(name, &delta.kvs);
        let mut applied_to = delta.to_version;
        let mut refused = None;
        for kv in std::mem::take(&mut delta.kvs) {
            if kv.version <= self.max_version {
                continue;
            }
            refused = limits.refuse(self, &kv);
            if refused.is_some() {
                applied_to = kv.version - 1;
                break;
            }
            let was_live = self.value(&kv.key).is_some();
            if kv.is_tombstone() {
                if was_live {
                    changed(&kv.key, None);
                }
            } else {
                changed(&kv.key, Some(&kv.value));
            }
            self.insert(kv.key, kv.version, kv.value);
        }
        self.max_version = self.max_version.max(applied_to);
        // A cut delta's horizon may lie past what was applied: it is learned later.
        if delta.horizon > self.horizon && refused.is_none() {
            self.collect_through(delta.horizon);
        }
        Some(Applied {
            raised,
            disputed,
            refused,
        })
    }

    /// What this view holds at the first version of `kvs` it has passed and disagrees with:
    /// one of the two copies is forged, and only the owner can tell which.
    fn first_disputed(&self, name: &str, kvs: &[KeyValue]) -> Option<NodeDelta> {
        kvs.iter()
            .take_while(|kv| kv.version <= self.max_version)
            .find(|kv| !self.admits(kv))
            .map(|kv| self.at_version(name, kv.version))
    }

    /// Starts this (fresh) view of a new generation from its first delta, reporting every
    /// change against `previous`, the view of the generation it replaces: keys the new
    /// generation lacks are deleted, and each of its keys is an update.
    pub(crate) fn succeed(
        &mut self,
        previous: &NodeState,
        delta: &mut NodeDelta,
        limits: StateLimits,
        changed: &mut impl FnMut(&str, Option<&[u8]>),
    ) -> Option<Applied> {
        let raised = delta.from_version == 0;
        let refused = if raised {
            self.take_snapshot(delta, limits)
        } else {
            None
        };
        self.report_replacement(previous, false, changed);
        raised.then_some(Applied {
            raised,
            disputed: None,
            refused,
        })
    }

    /// Fills this fresh view with a whole state, up to the key before one past `limits`, if any
    /// (then the view's max version stops there, as for a snapshot cut to fit a frame).
    fn take_snapshot(&mut self, delta: &mut NodeDelta, limits: StateLimits) -> Option<Rejection> {
        let mut applied_to = delta.to_version;
        let mut refused = None;
        for kv in std::mem::take(&mut delta.kvs) {
            refused = limits.refuse(self, &kv);
            if refused.is_some() {
                applied_to = kv.version - 1;
                break;
            }
            self.insert(kv.key, kv.version, kv.value);
        }
        self.max_version = applied_to;
        self.horizon = delta.horizon;
        refused
    }

    /// Reports how this view differs from `previous`: first the keys that vanished (deleted at
    /// versions this view no longer shows), then its own entries in version order. Versions are
    /// compared only within one generation; across generations every live key is an update.
    fn report_replacement(
        &self,
        previous: &NodeState,
        same_generation: bool,
        changed: &mut impl FnMut(&str, Option<&[u8]>),
    ) {
        for key in previous.maps.by_version.values() {
            if previous.value(key).is_some() && !self.maps.kvs.contains_key(key) {
                changed(key, None);
            }
        }
        for (&version, key) in &self.maps.by_version {
            let entry = &self.maps.kvs[key];
            let before = previous.maps.kvs.get(key);
            let was_live = before.is_some_and(Versioned::is_live);
            if entry.is_live() {
                if !same_generation || before.is_none_or(|b| b.version != version) {
                    changed(key, Some(&entry.value));
                }
            } else if was_live {
                changed(key, None);
            }
        }
    }
}

/// The owner's clock for its own keys: when each deletion was made (to collect its tombstone
/// `tombstone_ttl` later) and when each key written with a TTL expires. Peers keep none of this:
/// expiry and collection are decided by the owner alone, and travel as versions.
#[derive(Debug, Default)]
pub(crate) struct LocalTimers {
    /// Version and time of each local deletion not collected yet, oldest first.
    deletions: VecDeque<(u64, Instant)>,
    /// Keys written with a TTL, by deadline; `deadline_of` is the same set by key.
    expiries: BTreeSet<(Instant, String)>,
    deadline_of: HashMap<String, Instant, FnvBuild>,
}

impl LocalTimers {
    pub(crate) fn deleted(&mut self, version: u64, at: Instant) {
        self.deletions.push_back((version, at));
    }

    /// The version up to which deletions made at least `ttl` before `now` reach, if any.
    pub(crate) fn collectable(&mut self, now: Instant, ttl: std::time::Duration) -> Option<u64> {
        let mut through = None;
        while let Some(&(version, at)) = self.deletions.front() {
            if now.saturating_duration_since(at) < ttl {
                break;
            }
            through = Some(version);
            self.deletions.pop_front();
        }
        if self.deletions.capacity() > 64 && self.deletions.len() * 4 < self.deletions.capacity() {
            self.deletions.shrink_to(self.deletions.len() * 2);
        }
        through
    }

    /// Sets, replaces or (with `None`) clears the deadline of `key`.
    pub(crate) fn set_expiry(&mut self, key: &str, deadline: Option<Instant>) {
        if let Some(old) = self.deadline_of.remove(key) {
            self.expiries.remove(&(old, key.to_owned()));
        }
        if let Some(deadline) = deadline {
            self.deadline_of.insert(key.to_owned(), deadline);
            self.expiries.insert((deadline, key.to_owned()));
        }
    }

    /// Removes and returns the keys whose deadline is at or before `now`, earliest first.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<String> {
        let mut expired = Vec::new();
        while let Some((deadline, _)) = self.expiries.first() {
            if *deadline > now {
                break;
            }
            if let Some((_, key)) = self.expiries.pop_first() {
                self.deadline_of.remove(&key);
                expired.push(key);
            }
        }
        expired
    }

    /// A new incarnation re-versions its keys: deletions of the old one need no collecting.
    pub(crate) fn forget_deletions(&mut self) {
        self.deletions = VecDeque::new();
    }

    /// Deletions waiting for collection, and keys waiting to expire.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> (usize, usize) {
        (self.deletions.len(), self.expiries.len())
    }
}
