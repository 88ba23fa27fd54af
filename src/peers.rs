//! The peer table: every remote node this one knows, in dense slots with a name index, and the
//! sorted membership that lets two nodes refer to peers by position; and the candidates: names
//! heard of only second-hand, kept apart until they are confirmed.
//!
//! Invariant: `index` maps each peer's name to its slot. Removing a peer moves the last one into
//! its slot, so slots are only stable while nothing is removed; `Cluster::slot_epoch` counts
//! removals so that a membership built earlier knows when its slots went stale. A name is a
//! peer or a candidate, never both, and neither table grows past its capacity.

use crate::detector::PhiDetector;
use crate::store::NodeState;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::Arc;
use tokio::time::Instant;

/// A remote node and our view of its liveness.
#[derive(Debug)]
pub struct Peer {
    pub name: Name,
    pub state: NodeState,
    pub detector: PhiDetector,
    pub live: bool,
    pub(crate) dead_since: Option<Instant>,
    /// Another node convicted this peer while we were already somewhat suspicious (phi at least
    /// three eighths of the threshold) but not enough to agree: we will once our own phi is
    /// three quarters of the way, unless it beats first.
    pub(crate) suspected: bool,
    pub(crate) reach: Reach,
}

/// What our own connections say about reaching a peer: the basis for whether contacting it is
/// free or must wait for the connection budget (see `exchange::connect`), and for whom a
/// broadcast goes to first. Only a frame from the peer counts as reaching it: anything listening
/// at an address accepts a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Not heard from directly, and not failed us.
    Unknown,
    /// Heard from directly since it last failed us.
    Reached,
    /// Our last connection to it failed, or our last exchange with it got no answer, and it has
    /// not been heard from directly since.
    Unreachable,
}

/// FNV-1a for the peer index: names are short, and a round looks each known node up several
/// times, where SipHash dominated the profile. Only validated `ip:port` names of nodes that
/// reached us are ever keys.
#[derive(Clone, Copy, Default)]
pub(crate) struct FnvHasher(u64);

impl std::hash::Hasher for FnvHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { FNV_OFFSET } else { self.0 };
        for &byte in bytes {
            hash = (hash ^ byte as u64).wrapping_mul(FNV_PRIME);
        }
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub(crate) const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) type FnvBuild = std::hash::BuildHasherDefault<FnvHasher>;

/// A node name shared by the peer table, its index and memberships: one allocation per peer,
/// where a process may track a million of them.
pub type Name = Arc<str>;

/// Peers in a dense vector with a name index, so that a membership can point at them by slot.
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    pub(crate) slots: Vec<Peer>,
    index: HashMap<Name, usize, FnvBuild>,
}

impl PeerTable {
    pub(crate) fn slot(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Peer> {
        self.slot(name).map(|i| &self.slots[i])
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Peer> {
        self.slot(name).map(|i| &mut self.slots[i])
    }

    pub(crate) fn insert(&mut self, peer: Peer) -> &mut Peer {
        let slot = self.slots.len();
        self.index.insert(peer.name.clone(), slot);
        self.slots.push(peer);
        &mut self.slots[slot]
    }

    /// Moves the last peer into the freed slot: slots are only stable while nothing is removed.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Peer> {
        let slot = self.index.remove(name)?;
        let peer = self.slots.swap_remove(slot);
        if let Some(moved) = self.slots.get(slot) {
            self.index.insert(moved.name.clone(), slot);
        }
        Some(peer)
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Peer> {
        self.slots.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> std::slice::IterMut<'_, Peer> {
        self.slots.iter_mut()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}
/// A name heard of second-hand, as first heard: it becomes a peer when heard from directly, or
/// when at least `Candidates::min_wait` later its heartbeat is heard higher or, while it is
/// young, another node reports it too.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    generation: u64,
    heartbeat: u64,
    heard_at: Instant,
    /// Who reported it first (a hash of the name: candidates must stay small).
    reporter: u64,
}

/// Names heard of but not yet trusted: a few dozen bytes each, never contacted, never shown,
/// holding no keys. Full, it refuses new names; entries expire after `ttl`.
#[derive(Debug)]
pub(crate) struct Candidates {
    table: HashMap<Name, Candidate, FnvBuild>,
    capacity: usize,
    /// How long a heartbeat must take to rise before the rise confirms the name.
    min_wait: std::time::Duration,
    ttl: std::time::Duration,
}

/// What one report about a candidate amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Its heartbeat rose over time: a peer from now on, at this generation and heartbeat.
    Confirmed { generation: u64, heartbeat: u64 },
    /// Noted, or already noted; not trusted yet.
    Noted,
    /// The table is full.
    Refused,
}

impl Candidates {
    pub(crate) fn new(
        capacity: usize,
        min_wait: std::time::Duration,
        ttl: std::time::Duration,
    ) -> Self {
        Candidates {
            table: HashMap::default(),
            capacity,
            min_wait,
            ttl,
        }
    }

    /// Notes a report of `name` at `generation` and `heartbeat` by `reporter`. A second
    /// reporter confirms a `young` node (one that started moments ago): while a cluster forms,
    /// everyone's news of a node's heartbeat is the same few beats, and waiting for a higher one
    /// to spread kept the last pairs of a 1000-node cluster apart for several rounds.
    pub(crate) fn hear(
        &mut self,
        name: &str,
        generation: u64,
        heartbeat: u64,
        reporter: &str,
        young: bool,
        now: Instant,
    ) -> Heard {
        let reporter = {
            let mut hasher = FnvHasher::default();
            hasher.write(reporter.as_bytes());
            hasher.finish()
        };
        let first = Candidate {
            generation,
            heartbeat,
            heard_at: now,
            reporter,
        };
        let full = self.table.len() >= self.capacity;
        match self.table.get_mut(name) {
            Some(known) if generation > known.generation => *known = first,
            Some(known)
                if generation == known.generation
                    && (heartbeat > known.heartbeat || young && reporter != known.reporter)
                    && now.saturating_duration_since(known.heard_at) >= self.min_wait =>
            {
                self.table.remove(name);
                return Heard::Confirmed {
                    generation,
                    heartbeat,
                };
            }
            Some(_) => {}
            None if full => return Heard::Refused,
            None => {
                self.table.insert(name.into(), first);
            }
        }
        Heard::Noted
    }

    /// The generation and heartbeat a candidate was first heard at; removes it.
    pub(crate) fn take(&mut self, name: &str) -> Option<(u64, u64)> {
        self.table
            .remove(name)
            .map(|candidate| (candidate.generation, candidate.heartbeat))
    }

    pub(crate) fn forget(&mut self, name: &str) {
        self.table.remove(name);
    }

    /// Drops candidates heard of `ttl` ago and never confirmed.
    pub(crate) fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.table
            .retain(|_, c| now.saturating_duration_since(c.heard_at) < ttl);
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

/// Every known node, ourselves included, as (name, generation) sorted by name, with a hash that
/// two nodes compare to know they can refer to nodes by position.
#[derive(Debug)]
pub struct Membership {
    pub members: Vec<Member>,
    pub hash: u64,
    /// The cluster's `slot_epoch` when this was built.
    pub(crate) slot_epoch: u64,
}

#[derive(Debug)]
pub struct Member {
    pub name: Name,
    pub generation: u64,
    /// Valid while this membership is the cluster's current one.
    pub(crate) slot: Slot,
}

/// Where a node's state lives: our own, or a slot of the peer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Local,
    Peer(usize),
}

impl Membership {
    pub(crate) fn new(members: Vec<Member>, slot_epoch: u64) -> Self {
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        let mut hash = FNV_OFFSET;
        for member in &members {
            for byte in member
                .name
                .bytes()
                .chain([0])
                .chain(member.generation.to_le_bytes())
            {
                hash = (hash ^ byte as u64).wrapping_mul(FNV_PRIME);
            }
        }
        Membership {
            members,
            hash,
            slot_epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            state: NodeState::default(),
            detector: PhiDetector::default(),
            live: true,
            dead_since: None,
            suspected: false,
            reach: Reach::Unknown,
        }
    }

    #[test]
    fn removal_keeps_the_index_consistent() {
        let mut table = PeerTable::default();
        for name in ["a", "b", "c", "d"] {
            table.insert(peer(name));
        }
        assert_eq!(table.remove("b").map(|p| p.name), Some("b".into()));
        assert!(table.remove("b").is_none());
        for name in ["a", "c", "d"] {
            assert_eq!(table.get(name).map(|p| &*p.name), Some(name));
        }
        assert_eq!(table.len(), 3);
        assert!(table.get("b").is_none());
    }
}

#[cfg(test)]
mod candidate_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_candidate_is_confirmed_by_a_heartbeat_rise_over_time_only() {
        let now = Instant::now();
        let mut candidates =
            Candidates::new(2, Duration::from_millis(500), Duration::from_secs(10));
        assert_eq!(candidates.hear("a", 5, 10, "r", false, now), Heard::Noted);
        // The same heartbeat, or a rise heard too soon, confirms nothing.
        assert_eq!(
            candidates.hear("a", 5, 10, "r", false, now + Duration::from_secs(1)),
            Heard::Noted
        );
        assert_eq!(
            candidates.hear("a", 5, 11, "r", false, now + Duration::from_millis(100)),
            Heard::Noted
        );
        assert_eq!(
            candidates.hear("a", 5, 11, "r", false, now + Duration::from_millis(600)),
            Heard::Confirmed {
                generation: 5,
                heartbeat: 11
            }
        );
        assert_eq!(candidates.len(), 0);
        // A new generation starts over; an older one changes nothing.
        candidates.hear("b", 5, 10, "r", false, now);
        candidates.hear("b", 6, 1, "r", false, now + Duration::from_secs(1));
        assert_eq!(
            candidates.hear("b", 5, 99, "r", false, now + Duration::from_secs(2)),
            Heard::Noted
        );
        assert_eq!(
            candidates.hear("b", 6, 2, "r", false, now + Duration::from_millis(1200)),
            Heard::Noted
        );
        assert!(matches!(
            candidates.hear("b", 6, 2, "r", false, now + Duration::from_secs(2)),
            Heard::Confirmed { generation: 6, .. }
        ));
    }

    #[test]
    fn a_young_candidate_is_confirmed_by_a_second_reporter_over_time() {
        let now = Instant::now();
        let later = now + Duration::from_millis(600);
        let mut candidates =
            Candidates::new(4, Duration::from_millis(500), Duration::from_secs(10));
        candidates.hear("a", 5, 10, "r", true, now);
        // The same reporter again, or another one too soon, confirms nothing.
        assert_eq!(candidates.hear("a", 5, 10, "r", true, later), Heard::Noted);
        assert_eq!(
            candidates.hear("a", 5, 10, "s", true, now + Duration::from_millis(100)),
            Heard::Noted
        );
        assert_eq!(
            candidates.hear("a", 5, 10, "s", true, later),
            Heard::Confirmed {
                generation: 5,
                heartbeat: 10
            }
        );
        // A node that is not young needs its heartbeat to rise, whoever reports it.
        candidates.hear("b", 5, 10, "r", false, now);
        assert_eq!(candidates.hear("b", 5, 10, "s", false, later), Heard::Noted);
    }

    #[test]
    fn the_table_is_bounded_and_expires() {
        let now = Instant::now();
        let mut candidates =
            Candidates::new(2, Duration::from_millis(500), Duration::from_secs(10));
        candidates.hear("a", 1, 1, "r", false, now);
        candidates.hear("b", 1, 1, "r", false, now + Duration::from_secs(5));
        assert_eq!(candidates.hear("c", 1, 1, "r", false, now), Heard::Refused);
        candidates.expire(now + Duration::from_secs(10));
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates.hear("c", 1, 1, "r", false, now), Heard::Noted);
        assert_eq!(candidates.take("b"), Some((1, 1)));
        assert_eq!(candidates.take("b"), None);
    }
}
