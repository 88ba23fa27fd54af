//! The Scuttlebutt protocol as a synchronous state machine: messages in, replies and events out.
//! No sockets or tasks live here, so a test drives whole exchanges between instances with plain
//! calls and a paused clock.
//!
//! Each node owns a map of keys; every write takes the owner's next version. A node's state is
//! identified by its name (`ip:port`) and generation (one per process start): a higher
//! generation replaces everything known of the lower one. An exchange is push-pull:
//! the initiator sends a digest (name, generation, heartbeat, max version per node), the
//! responder answers with what the initiator lacks plus requests for what it lacks itself, and
//! the initiator answers those requests.
//!
//! A deletion is a write of a tombstone; the owner forgets its tombstones `tombstone_ttl` after
//! making them and raises its collection horizon, which travels in deltas. A node whose view of
//! a peer is older than that horizon gets the peer's whole state instead of a delta, and drops
//! every key not in it (the rules are in [`crate::store`]); so a deleted key never comes back.
//!
//! Invariant: for every known node, `max_version` is a version up to which this node holds every
//! key's latest value. Deltas are accepted only when they start at or below it, so a gap can
//! never be papered over.
//!
//! Nothing from the network is believed beyond what time allows (see [`Plausible`]), and nothing
//! about ourselves is believed at all: a claim about this node that it did not make (a higher
//! generation, or in its own generation a higher heartbeat or version, `left`, or keys it never
//! wrote) is beaten by a new incarnation above it, at most one per round (see `refute`). Its true
//! state then replaces the claim everywhere, as after a restart.

use crate::config::Settings;
use crate::detector::{DetectorConfig, PhiDetector};
use crate::peers::{FnvBuild, Member, Membership, Name, Peer, PeerTable, Slot};
use crate::store::{Applied, LocalTimers, NodeState, Start};
use crate::wire::{DigestEntry, NodeDelta, Request};
use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// What the engine tells its owner, in the order it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    NewPeer(&'a str),
    Update {
        peer: &'a str,
        key: &'a str,
        value: &'a [u8],
    },
    Delete {
        peer: &'a str,
        key: &'a str,
    },
    PeerAlive(&'a str),
    PeerFailed(&'a str),
}

/// Receives events while the cluster lock is held: implementations must only queue them.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event<'_>);
}

/// Where one gossip round sends its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Peer(String),
    /// A configured contact address, resolved when used.
    Seed(String),
}

/// A conviction as it is announced to other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspicion {
    pub name: String,
    pub generation: u64,
    pub heartbeat: u64,
}

/// The share of the threshold a node's own phi must reach to accept another's conviction.
const CORROBORATION: f64 = 0.75;

/// How many of a failure's observers announce it, on average.
const ANNOUNCERS: f64 = 32.0;

/// Heartbeats a node can honestly add per millisecond of its generation: one per gossip round,
/// and no round is shorter than 1 ms.
const BEATS_PER_MS: u64 = 1;

/// Versions a node can honestly add per millisecond: ten writes a microsecond, several times
/// more than `setLocalState` can make.
const WRITES_PER_MS: u64 = 10_000;

/// Milliseconds since the Unix epoch by the system clock: what generations count.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What another node's counters can have reached by now. A generation is its node's clock at
/// start, so it may be at most `skew_ms` ahead of ours; heartbeats and versions grow at most
/// [`BEATS_PER_MS`] and [`WRITES_PER_MS`] from then, counted from twice the skew earlier (clocks
/// differ both ways, and a refutation may start a generation ahead of its own clock).
#[derive(Clone, Copy, Debug)]
struct Plausible {
    now_ms: u64,
    skew_ms: u64,
}

impl Plausible {
    fn admits(self, generation: u64, heartbeat: u64, max_version: u64) -> bool {
        let allowance_ms = (self.now_ms + 2 * self.skew_ms).saturating_sub(generation);
        generation <= self.now_ms + self.skew_ms
            && heartbeat <= allowance_ms.saturating_mul(BEATS_PER_MS)
            && max_version <= allowance_ms.saturating_mul(WRITES_PER_MS)
    }
}

/// Owners told of disputes per round: each costs a connection, and forged frames can make
/// disputes about many peers at once.
const DISPUTES_PER_ROUND: usize = 4;

/// What the cluster refused, or did about claims, since its owner last took the tally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Node entries (in digests, deltas and positional heartbeats) refused as implausible.
    pub implausible: u64,
    /// Incarnations begun to refute claims about this node.
    pub refutations: u64,
}

/// What an initiator's Syn or CompactSyn listed, which the SynAck's `heartbeats` index into.
#[derive(Clone, Copy, Debug)]
pub enum Sent<'a> {
    /// A CompactSyn, by this membership.
    Compact(&'a Membership),
    /// A Syn with this digest.
    Digest(&'a [DigestEntry]),
}

/// A responder's answer to a digest: the SynAck's contents.
#[derive(Debug, Default)]
pub struct SynReply {
    pub deltas: Vec<NodeDelta>,
    pub requests: Vec<Request>,
    /// `index, heartbeat` pairs into the membership of a CompactSyn.
    pub heartbeats: Vec<u64>,
}

/// One node's line of a digest, named or positional.
struct Entry<'a> {
    name: &'a str,
    generation: u64,
    heartbeat: u64,
    max_version: u64,
    /// 0 in a compact digest (see `Cluster::compact_digest`).
    horizon: u64,
    /// Known for members of our own membership, which saves looking them up.
    slot: Option<Slot>,
}

/// Local changes waiting for the push task.
#[derive(Clone, Copy, Debug)]
struct Unpushed {
    generation: u64,
    /// The version they start after.
    from: u64,
    /// Only the news of a new incarnation: it goes to `push_fanout` peers, and anti-entropy
    /// spreads it from there in O(log N) rounds. Pushing it to everyone made a cluster that
    /// starts together cost O(N²) connections. Writes, leaves and refutations go to everyone.
    announcement_only: bool,
}

/// Public view of one peer, for monitoring.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub name: String,
    pub generation: u64,
    pub heartbeat: u64,
    pub max_version: u64,
    pub live: bool,
    pub left: bool,
    pub phi: f64,
    /// The peer's collection horizon as known here.
    pub horizon: u64,
}

pub struct Cluster {
    settings: Arc<Settings>,
    name: String,
    local: NodeState,
    /// Deadlines of local keys written with a TTL, and times of local deletions.
    timers: LocalTimers,
    peers: PeerTable,
    /// Peers dropped after `dead_peer_ttl`: their generation at that time, and when.
    forgotten: HashMap<String, (u64, Instant)>,
    /// Local changes not pushed yet.
    unpushed: Option<Unpushed>,
    /// Cached until a node joins, changes generation or is forgotten.
    membership: Option<Arc<Membership>>,
    /// Bumped whenever a peer leaves the table, which moves another into its slot.
    slot_epoch: u64,
    sink: Arc<dyn EventSink>,
    tally: Tally,
    /// The highest generation of a claim about ourselves heard and not yet beaten.
    claim: Option<u64>,
    /// Set by a refutation, cleared by the next tick: refutations wait for it.
    refuted_this_round: bool,
    /// Per peer, what we hold at a version where another copy of it disagreed with ours. Only
    /// the peer knows which copy is true; it is sent what we hold once a round (see
    /// `take_disputes`) and refutes it if it is not.
    disputes: HashMap<Name, NodeDelta, FnvBuild>,
}

impl Cluster {
    pub fn new(settings: Arc<Settings>, sink: Arc<dyn EventSink>) -> Self {
        Cluster {
            settings,
            name: String::new(),
            local: NodeState::default(),
            timers: LocalTimers::default(),
            peers: PeerTable::default(),
            forgotten: HashMap::new(),
            unpushed: None,
            membership: None,
            slot_epoch: 0,
            sink,
            tally: Tally::default(),
            claim: None,
            refuted_this_round: false,
            disputes: HashMap::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The generation of the current (or last) incarnation; 0 before the first.
    pub fn generation(&self) -> u64 {
        self.local.generation
    }

    fn plausible(&self) -> Plausible {
        Plausible {
            now_ms: unix_ms(),
            skew_ms: self.settings.max_clock_skew.as_millis() as u64,
        }
    }

    /// Refusals and refutations since the last call.
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// Notes a claim about ourselves, at `generation`, that we did not make.
    fn heard_claim(&mut self, generation: u64) {
        self.claim = self.claim.max(Some(generation));
    }

    /// Beats every claim heard about us with a new incarnation above the highest: peers replace
    /// all they hold of us with our true state (local keys kept, re-versioned, pushed at once).
    /// At most one per round, so a flood of forged frames costs one incarnation a round; claims
    /// heard meanwhile wait for the next tick. A node that left corrects nothing.
    fn refute(&mut self) {
        if self.refuted_this_round {
            return;
        }
        let Some(claim) = self.claim.take() else {
            return;
        };
        if claim < self.local.generation || self.local.left {
            return;
        }
        let generation = unix_ms().max(claim + 1);
        self.begin_incarnation(self.name.clone(), generation, Duration::ZERO);
        // The claim may have been pushed everywhere: so is its refutation.
        self.mark_unpushed(0);
        self.refuted_this_round = true;
        self.tally.refutations += 1;
    }

    /// What we hold of peers at versions where copies disagreed, each for its owner to check,
    /// live or not (a forged `left` makes it look failed), at most [`DISPUTES_PER_ROUND`].
    pub fn take_disputes(&mut self) -> Vec<(String, NodeDelta)> {
        let owners: Vec<Name> = self
            .disputes
            .keys()
            .take(DISPUTES_PER_ROUND)
            .cloned()
            .collect();
        owners
            .into_iter()
            .filter_map(|owner| {
                let delta = self.disputes.remove(&owner)?;
                Some((owner.to_string(), delta))
            })
            .collect()
    }

    /// Starts a new incarnation. Live local keys are kept and re-versioned under the new
    /// generation, so peers replace the previous incarnation's state with them (deleted keys
    /// included: the new generation does not have them), and the whole local state waits to be
    /// announced to a few peers (see [`Unpushed`]). Deadlines of keys written with a TTL carry
    /// over. `stopped_for` is not held against peers we could not hear while stopped.
    pub fn begin_incarnation(&mut self, name: String, generation: u64, stopped_for: Duration) {
        let old = std::mem::replace(&mut self.local, NodeState::new(generation));
        for (version, (key, value)) in (1..).zip(old.into_live_entries()) {
            self.local.insert(key, version, value);
        }
        self.timers.forget_deletions();
        self.peers.remove(&name);
        self.name = name;
        self.membership = None;
        self.slot_epoch += 1;
        // Announce the new incarnation, and everything it holds, as soon as anyone is known.
        self.unpushed = Some(Unpushed {
            generation,
            from: 0,
            announcement_only: true,
        });
        for peer in self.peers.iter_mut() {
            peer.detector.forgive(stopped_for);
        }
    }

    /// Writes a local key that expires at `expires_at`, if given; a write without it clears an
    /// earlier expiry. Returns false, and writes nothing, when the value is the same (its expiry
    /// still changes).
    pub fn set_local(&mut self, key: &str, value: Bytes, expires_at: Option<Instant>) -> bool {
        self.timers.set_expiry(key, expires_at);
        if self.local.value(key) == Some(&value) {
            return false;
        }
        let from = self.local.max_version;
        self.local.insert(key.to_owned(), from + 1, value);
        self.mark_unpushed(from);
        true
    }

    /// Deletes a local key: a tombstone at the next version, collected `tombstone_ttl` after
    /// `now`. Returns false, and changes nothing, when the key does not exist.
    pub fn delete_local(&mut self, key: &str, now: Instant) -> bool {
        if self.local.value(key).is_none() {
            return false;
        }
        self.timers.set_expiry(key, None);
        let from = self.local.max_version;
        self.local.insert(key.to_owned(), from + 1, Bytes::new());
        self.timers.deleted(from + 1, now);
        self.mark_unpushed(from);
        true
    }

    /// Local keys past their TTL become deletions; tombstones older than `tombstone_ttl` are
    /// forgotten. Forgetting takes a version of its own (with no key), so the new horizon
    /// travels like a write. Runs every round, and before a start, so that keys that expired
    /// while the node was stopped are not part of its next incarnation.
    pub fn expire_and_collect(&mut self, now: Instant) {
        for key in self.timers.take_expired(now) {
            self.delete_local(&key, now);
        }
        if let Some(through) = self.timers.collectable(now, self.settings.tombstone_ttl) {
            let from = self.local.max_version;
            self.local.collect_through(through);
            self.local.max_version += 1;
            self.mark_unpushed(from);
        }
    }

    pub fn local_value(&self, key: &str) -> Option<&Bytes> {
        self.local.value(key)
    }

    /// Announces a graceful stop: a version bump carrying `left`, pushed like any change.
    pub fn leave(&mut self) {
        let from = self.local.max_version;
        self.local.left = true;
        self.local.max_version += 1;
        self.mark_unpushed(from);
    }

    /// Local changes after version `from` are to be pushed to every live peer.
    fn mark_unpushed(&mut self, from: u64) {
        let generation = self.local.generation;
        let from = match self.unpushed {
            Some(pending) if pending.generation == generation => pending.from.min(from),
            _ => from,
        };
        self.unpushed = Some(Unpushed {
            generation,
            from,
            announcement_only: false,
        });
    }

    fn node(&self, name: &str) -> Option<&NodeState> {
        if name == self.name {
            Some(&self.local)
        } else {
            self.peers.get(name).map(|p| &p.state)
        }
    }

    fn node_at(&self, slot: Slot) -> &NodeState {
        match slot {
            Slot::Local => &self.local,
            Slot::Peer(i) => &self.peers.slots[i].state,
        }
    }

    /// The generation we hold for `name`, ourselves included.
    pub fn generation_of(&self, name: &str) -> Option<u64> {
        self.node(name).map(|node| node.generation)
    }

    pub fn node_value(&self, name: &str, key: &str) -> Option<&Bytes> {
        self.node(name)?.value(key)
    }

    pub fn node_keys(&self, name: &str) -> Vec<String> {
        self.node(name).map(NodeState::keys).unwrap_or_default()
    }

    pub fn peer_names(&self, live: Option<bool>) -> Vec<String> {
        let mut names: Vec<String> = self
            .peers
            .iter()
            .filter(|p| live.is_none_or(|l| p.live == l))
            .map(|p| p.name.to_string())
            .collect();
        names.sort();
        names
    }

    pub fn peer_infos(&self, now: Instant) -> Vec<PeerInfo> {
        let mut infos: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|p| PeerInfo {
                name: p.name.to_string(),
                generation: p.state.generation,
                heartbeat: p.state.heartbeat,
                max_version: p.state.max_version,
                live: p.live,
                left: p.state.left,
                phi: p.detector.phi(now, &self.settings.detector),
                horizon: p.state.horizon,
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// One round's bookkeeping: our heartbeat, convictions and forgetting. `stall` is how
    /// late this tick is; that time is not counted against peers.
    /// Returns the peers convicted now that this node should announce. Every observer of a
    /// failure convicts it at about the same time, so only about `ANNOUNCERS` of them, at
    /// random, announce it: one failure costs a few broadcasts, not one per node.
    pub fn tick(&mut self, now: Instant, stall: Duration, rng: &mut impl Rng) -> Vec<Suspicion> {
        self.refuted_this_round = false;
        self.refute();
        self.local.heartbeat += 1;
        self.expire_and_collect(now);
        let settings = &self.settings;
        let mut convicted = Vec::new();
        for peer in self.peers.iter_mut() {
            if !stall.is_zero() {
                peer.detector.forgive(stall);
            }
            if !peer.live {
                continue;
            }
            let phi = peer.detector.phi(now, &settings.detector);
            if peer.suspected && phi >= settings.phi_threshold * CORROBORATION {
                fail(peer, now, self.sink.as_ref());
            } else if phi > settings.phi_threshold {
                convicted.push(Suspicion {
                    name: peer.name.to_string(),
                    generation: peer.state.generation,
                    heartbeat: peer.state.heartbeat,
                });
                fail(peer, now, self.sink.as_ref());
            }
        }
        let ttl = settings.dead_peer_ttl;
        let expired: Vec<String> = self
            .peers
            .iter()
            .filter(|p| {
                p.dead_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= ttl)
            })
            .map(|p| p.name.to_string())
            .collect();
        for name in expired {
            self.membership = None;
            self.slot_epoch += 1;
            if let Some(peer) = self.peers.remove(&name) {
                self.forgotten.insert(name, (peer.state.generation, now));
            }
        }
        self.forgotten
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        let live = self.peers.iter().filter(|p| p.live).count();
        let announce = (ANNOUNCERS / (live + convicted.len()).max(1) as f64).min(1.0);
        convicted.retain(|_| rng.gen_bool(announce));
        convicted
    }

    /// Another node convicted `suspicion`. We agree, and report the failure now, when we hold
    /// nothing newer of that peer and have not heard from it for three quarters of the silence
    /// that would convict it here (or later, once we reach that point; see `Peer::suspected`):
    /// a failure then shows everywhere at about the time its first observer saw it, while a lone
    /// false suspicion convicts nobody who hears the peer well.
    pub fn corroborate(&mut self, suspicion: &Suspicion, now: Instant) -> bool {
        let Some(slot) = self.peers.slot(&suspicion.name) else {
            return false;
        };
        let peer = &mut self.peers.slots[slot];
        let settings = &self.settings;
        if !peer.live
            || peer.state.generation != suspicion.generation
            || peer.state.heartbeat > suspicion.heartbeat
        {
            return false;
        }
        let phi = peer.detector.phi(now, &settings.detector);
        let agrees = phi >= settings.phi_threshold * CORROBORATION;
        if agrees {
            fail(peer, now, self.sink.as_ref());
        } else if phi >= settings.phi_threshold * CORROBORATION / 2.0 {
            peer.suspected = true;
        }
        agrees
    }

    fn is_forgotten(&self, name: &str, generation: u64) -> bool {
        self.forgotten
            .get(name)
            .is_some_and(|&(g, _)| generation <= g)
    }

    pub fn digest(&self) -> Vec<DigestEntry> {
        let mut digest = Vec::with_capacity(self.peers.len() + 1);
        digest.push(self.local.digest(&self.name));
        digest.extend(self.peers.iter().map(|p| p.state.digest(&p.name)));
        digest
    }

    /// The sorted membership, rebuilt only after it changed.
    pub fn membership(&mut self) -> Arc<Membership> {
        if let Some(membership) = &self.membership {
            return membership.clone();
        }
        let local = Member {
            name: self.name.as_str().into(),
            generation: self.local.generation,
            slot: Slot::Local,
        };
        let mut members: Vec<Member> = std::iter::once(local)
            .chain(self.peers.iter().enumerate().map(|(i, p)| Member {
                name: p.name.clone(),
                generation: p.state.generation,
                slot: Slot::Peer(i),
            }))
            .collect();
        members.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let membership = Arc::new(Membership::new(members, self.slot_epoch));
        self.membership = Some(membership.clone());
        membership
    }

    /// A digest by position: `heartbeat, max_version` for each member, in membership order.
    /// None while a view of ours is being replaced (its horizon is above its max version):
    /// that horizon must reach the responder, and only the named digest carries it.
    pub fn compact_digest(&mut self) -> Option<(Arc<Membership>, Vec<u64>)> {
        let membership = self.membership();
        let mut versions = Vec::with_capacity(membership.members.len() * 2);
        for member in &membership.members {
            let node = self.node_at(member.slot);
            if node.horizon > node.max_version {
                return None;
            }
            versions.extend([node.heartbeat, node.max_version]);
        }
        Some((membership, versions))
    }

    /// Responder side of a named digest: what the initiator lacks (including nodes its digest
    /// does not name) and what to ask of it. Newer heartbeats of nodes with nothing else new go
    /// back by their position in the digest, as after a CompactSyn: a membership that is
    /// changing (a cluster forming) costs a few bytes per node, not a delta.
    pub fn handle_syn(&mut self, digest: &[DigestEntry], now: Instant) -> SynReply {
        let entries = digest.iter().map(|e| Entry {
            name: &e.name,
            generation: e.generation,
            heartbeat: e.heartbeat,
            max_version: e.max_version,
            horizon: e.horizon,
            slot: None,
        });
        let mut reply = self.reconcile(entries, now);
        let named: HashSet<&str, FnvBuild> = digest.iter().map(|e| e.name.as_str()).collect();
        let mut budget = self.settings.delta_budget();
        for (name, node) in std::iter::once((self.name.as_str(), &self.local))
            .chain(self.peers.iter().map(|p| (&*p.name, &p.state)))
        {
            if !named.contains(name) {
                reply.deltas.push(node.delta(name, 0, &mut budget));
            }
        }
        reply
    }

    /// Responder side of a CompactSyn; None when the memberships differ and the named digest
    /// is needed.
    pub fn handle_compact_syn(
        &mut self,
        membership_hash: u64,
        versions: &[u64],
        now: Instant,
    ) -> Option<SynReply> {
        let membership = self.membership();
        if membership.hash != membership_hash || versions.len() != membership.members.len() * 2 {
            return None;
        }
        // A compact digest comes from a node with no view being replaced: none of its views
        // depends on a horizon above its max version, so 0 stands for every horizon.
        let entries = membership
            .members
            .iter()
            .zip(versions.chunks_exact(2))
            .map(|(m, v)| Entry {
                name: &m.name,
                generation: m.generation,
                heartbeat: v[0],
                max_version: v[1],
                horizon: 0,
                slot: Some(m.slot),
            });
        Some(self.reconcile(entries, now))
    }

    /// Compares a digest with what we hold. Heartbeats newer in the digest are taken from it
    /// directly; heartbeats newer here go back by their index in the digest. Entries from our
    /// own membership carry their slot, which saves looking them up.
    fn reconcile<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a>>,
        now: Instant,
    ) -> SynReply {
        let mut budget = self.settings.delta_budget();
        let mut reply = SynReply::default();
        let request = |name: &str, generation, from_version, horizon| Request {
            name: name.to_owned(),
            generation,
            from_version,
            horizon,
        };
        let plausible = self.plausible();
        for (index, entry) in entries.enumerate() {
            let Entry {
                name,
                generation,
                heartbeat,
                max_version,
                horizon,
                slot,
            } = entry;
            // A horizon is a version too.
            if !plausible.admits(generation, heartbeat, max_version.max(horizon)) {
                self.tally.implausible += 1;
                continue;
            }
            let slot = match slot {
                Some(slot) => slot,
                None if self.is_forgotten(name, generation) => continue,
                None if name == self.name => Slot::Local,
                None => match self.peers.slot(name) {
                    Some(i) => Slot::Peer(i),
                    None => {
                        reply.requests.push(request(name, generation, 0, 0));
                        continue;
                    }
                },
            };
            // Nobody knows more about us than we do: never ask about ourselves, and anything
            // newer than what we hold is a claim to refute.
            let is_self = slot == Slot::Local;
            if let Slot::Peer(i) = slot {
                self.peers.slots[i].state.learn_horizon(generation, horizon);
            }
            let node = self.node_at(slot);
            if is_self
                && (generation > node.generation
                    || generation == node.generation
                        && (heartbeat > node.heartbeat
                            || max_version > node.max_version
                            || horizon > node.horizon))
            {
                self.heard_claim(generation);
                continue;
            }
            if node.generation > generation {
                reply.deltas.push(node.delta(name, 0, &mut budget));
            } else if node.generation < generation {
                if !is_self {
                    reply.requests.push(request(name, generation, 0, 0));
                }
            } else {
                match node.delta_start(max_version, horizon) {
                    Start::Replace => reply.deltas.push(node.delta(name, 0, &mut budget)),
                    Start::From(from) if node.max_version > max_version => {
                        reply.deltas.push(node.delta(name, from, &mut budget))
                    }
                    _ if node.heartbeat > heartbeat => {
                        reply.heartbeats.extend([index as u64, node.heartbeat])
                    }
                    _ => {}
                }
                // Ask when the digest's view is newer, or knows of deletions ours may lack.
                let behind =
                    max_version > node.max_version || horizon > node.max_version.max(node.horizon);
                if !is_self && behind {
                    reply
                        .requests
                        .push(request(name, generation, node.max_version, node.horizon));
                }
                if let (Slot::Peer(i), true) = (slot, heartbeat > node.heartbeat) {
                    self.observe_heartbeat(i, heartbeat, now);
                }
            }
        }
        self.refute();
        reply
    }

    /// Initiator side, after the SynAck: applies its deltas and its heartbeats, which index
    /// into what we `sent`, and answers its requests.
    pub fn handle_syn_ack(
        &mut self,
        reply: SynReply,
        sent: Sent<'_>,
        now: Instant,
    ) -> Vec<NodeDelta> {
        self.apply_deltas(reply.deltas, now);
        let plausible = self.plausible();
        for pair in reply.heartbeats.chunks_exact(2) {
            let (index, heartbeat) = (pair[0] as usize, pair[1]);
            // The node at that index, and its slot when still valid: slots stay valid until a
            // peer is removed; after that, the name is looked up.
            let (name, generation, slot) = match sent {
                Sent::Compact(membership) => {
                    let Some(member) = membership.members.get(index) else {
                        continue;
                    };
                    let slot = match member.slot {
                        Slot::Peer(_) if membership.slot_epoch != self.slot_epoch => None,
                        slot => Some(slot),
                    };
                    (&*member.name, member.generation, slot)
                }
                Sent::Digest(digest) => {
                    let Some(entry) = digest.get(index) else {
                        continue;
                    };
                    (entry.name.as_str(), entry.generation, None)
                }
            };
            if !plausible.admits(generation, heartbeat, 0) {
                self.tally.implausible += 1;
                continue;
            }
            let slot = match slot {
                Some(slot) => slot,
                None if name == self.name => Slot::Local,
                None => match self.peers.slot(name) {
                    Some(i) => Slot::Peer(i),
                    None => continue,
                },
            };
            match slot {
                Slot::Local => {
                    if generation == self.local.generation && heartbeat > self.local.heartbeat {
                        self.heard_claim(generation);
                    }
                }
                Slot::Peer(i) => {
                    let state = &self.peers.slots[i].state;
                    if state.generation == generation && heartbeat > state.heartbeat {
                        self.observe_heartbeat(i, heartbeat, now);
                    }
                }
            }
        }
        self.refute();
        for r in &reply.requests {
            if let Some(peer) = self.peers.get_mut(&r.name) {
                peer.state.learn_horizon(r.generation, r.horizon);
            }
        }
        let mut budget = self.settings.delta_budget();
        reply
            .requests
            .iter()
            .filter_map(|r| {
                let node = self.node(&r.name)?;
                let from = if node.generation > r.generation {
                    0
                } else if node.generation < r.generation {
                    return None;
                } else {
                    match node.delta_start(r.from_version, r.horizon) {
                        Start::Replace => 0,
                        Start::From(from) => from,
                        Start::Nothing => return None,
                    }
                };
                Some(node.delta(&r.name, from, &mut budget))
            })
            .collect()
    }

    /// Applies deltas from any message.
    pub fn apply_deltas(&mut self, mut deltas: Vec<NodeDelta>, now: Instant) {
        self.retain_plausible(&mut deltas);
        for delta in deltas {
            if delta.name == self.name {
                self.check_claims(&delta);
            } else {
                self.apply_delta(delta, now);
            }
        }
        self.refute();
    }

    /// Drops, and counts, the deltas whose counters no honest node could have reached yet, so
    /// that a Push relays only what its receiver believed.
    pub fn retain_plausible(&mut self, deltas: &mut Vec<NodeDelta>) {
        let plausible = self.plausible();
        let before = deltas.len();
        deltas.retain(|d| plausible.admits(d.generation, d.heartbeat, d.to_version.max(d.horizon)));
        self.tally.implausible += (before - deltas.len()) as u64;
    }

    /// A delta about ourselves: anything in it that we did not say is a claim.
    fn check_claims(&mut self, delta: &NodeDelta) {
        let local = &self.local;
        if delta.generation > local.generation
            || delta.generation == local.generation
                && (delta.heartbeat > local.heartbeat
                    || delta.to_version > local.max_version
                    || delta.horizon > local.horizon
                    || delta.left && !local.left
                    || !local.confirms(delta))
        {
            self.heard_claim(delta.generation);
        }
    }

    fn apply_delta(&mut self, mut delta: NodeDelta, now: Instant) {
        if self.is_forgotten(&delta.name, delta.generation) {
            return;
        }
        let sink = &self.sink;
        let detector = &self.settings.detector;
        // The view this delta's generation replaces, if it is a newer one.
        let mut previous = None;
        let peer = match self.peers.get_mut(&delta.name) {
            Some(peer) if peer.state.generation > delta.generation => return,
            Some(peer) if peer.state.generation < delta.generation => {
                self.membership = None;
                previous = Some(std::mem::replace(
                    &mut peer.state,
                    NodeState::new(delta.generation),
                ));
                peer.state.heartbeat = delta.heartbeat;
                peer.detector.learned(now);
                if !peer.live && !delta.left {
                    peer.live = true;
                    peer.dead_since = None;
                    sink.emit(Event::PeerAlive(&delta.name));
                }
                peer
            }
            Some(peer) => {
                if delta.heartbeat > peer.state.heartbeat {
                    let rise = delta.heartbeat - peer.state.heartbeat;
                    peer.state.heartbeat = delta.heartbeat;
                    revive_on_heartbeat(peer, rise, now, detector, sink.as_ref());
                }
                peer
            }
            None => {
                let mut detector_state = PhiDetector::default();
                detector_state.learned(now);
                let mut state = NodeState::new(delta.generation);
                state.heartbeat = delta.heartbeat;
                sink.emit(Event::NewPeer(&delta.name));
                self.membership = None;
                // Live until the delta's `left`, if any, is applied below and reported.
                self.peers.insert(Peer {
                    name: delta.name.as_str().into(),
                    state,
                    detector: detector_state,
                    live: true,
                    dead_since: None,
                    suspected: false,
                })
            }
        };
        let name = std::mem::take(&mut delta.name);
        let mut changed = |key: &str, value: Option<&[u8]>| {
            sink.emit(match value {
                Some(value) => Event::Update {
                    peer: &name,
                    key,
                    value,
                },
                None => Event::Delete { peer: &name, key },
            })
        };
        let state = &mut peer.state;
        let applied = match &previous {
            Some(previous) => state.succeed(previous, &mut delta, &mut changed),
            None => state.apply(&name, &mut delta, &mut changed),
        };
        let Some(Applied { raised, disputed }) = applied else {
            return;
        };
        if let Some(ours) = disputed {
            self.disputes.entry(peer.name.clone()).or_insert(ours);
        }
        // `left` travels like a write, so it counts only with the versions that carry it.
        if raised && delta.left && !state.left {
            state.left = true;
            if peer.live {
                fail(peer, now, sink.as_ref());
            }
        }
    }

    fn observe_heartbeat(&mut self, slot: usize, heartbeat: u64, now: Instant) {
        let peer = &mut self.peers.slots[slot];
        let rise = heartbeat.saturating_sub(peer.state.heartbeat);
        peer.state.heartbeat = heartbeat;
        revive_on_heartbeat(peer, rise, now, &self.settings.detector, self.sink.as_ref());
    }

    /// Local changes to push, from where they started, within one frame (the rest stays
    /// queued), and the live peers to push them to; None, keeping the changes, while nobody
    /// is live.
    pub fn take_push(&mut self, rng: &mut impl Rng) -> Option<(Vec<NodeDelta>, Vec<String>)> {
        let pending = self.unpushed?;
        let mut targets = self.broadcast_targets(rng);
        if targets.is_empty() {
            return None;
        }
        if pending.announcement_only {
            targets.truncate(self.settings.push_fanout);
        }
        self.unpushed = None;
        let from = if pending.generation == self.local.generation {
            pending.from
        } else {
            0
        };
        let delta = self
            .local
            .delta(&self.name, from, &mut self.settings.delta_budget());
        if delta.to_version < self.local.max_version {
            self.unpushed = Some(Unpushed {
                generation: self.local.generation,
                from: delta.to_version,
                ..pending
            });
        }
        Some((vec![delta], targets))
    }

    pub fn has_unpushed(&self) -> bool {
        self.unpushed.is_some()
    }

    /// Every live peer, shuffled: the recipients of a broadcast we start.
    pub fn broadcast_targets(&self, rng: &mut impl Rng) -> Vec<String> {
        let mut live: Vec<String> = self
            .peers
            .iter()
            .filter(|p| p.live)
            .map(|p| p.name.to_string())
            .collect();
        live.shuffle(rng);
        live
    }

    /// Keeps each live peer once: a push may only make us contact nodes we know, and a list
    /// repeating names must not multiply the broadcast.
    pub fn retain_live(&self, names: &mut Vec<String>) {
        let mut seen = HashSet::with_capacity(names.len());
        names.retain(|n| self.peers.get(n).is_some_and(|p| p.live) && seen.insert(n.clone()));
    }

    /// Cassandra's choice of whom to gossip with this round: `gossip_fanout` live peers (one in
    /// Cassandra); a failed one with
    /// probability failed/(live+1); a seed when the live peer was not one or there are fewer
    /// live peers than seeds (always when nobody is live, otherwise with probability
    /// seeds/known).
    pub fn gossip_targets(&self, seeds: &[String], rng: &mut impl Rng) -> Vec<Target> {
        let (live, dead): (Vec<&str>, Vec<&str>) = {
            let mut live = Vec::new();
            let mut dead = Vec::new();
            for peer in self.peers.iter() {
                if peer.live {
                    live.push(&*peer.name)
                } else {
                    dead.push(&*peer.name)
                }
            }
            (live, dead)
        };
        let seeds: Vec<&str> = seeds
            .iter()
            .map(String::as_str)
            .filter(|s| *s != self.name)
            .collect();
        let mut targets = Vec::with_capacity(self.settings.gossip_fanout + 2);
        let mut reached_seed = false;
        for peer in live.choose_multiple(rng, self.settings.gossip_fanout) {
            reached_seed |= seeds.contains(peer);
            targets.push(Target::Peer(peer.to_string()));
        }
        if let Some(peer) = dead.choose(rng) {
            if rng.gen_bool((dead.len() as f64 / (live.len() + 1) as f64).min(1.0)) {
                targets.push(Target::Peer(peer.to_string()));
            }
        }
        if !reached_seed || live.len() < seeds.len() {
            if let Some(seed) = seeds.choose(rng) {
                let known = (live.len() + dead.len()) as f64;
                if live.is_empty() || rng.gen_bool((seeds.len() as f64 / known).min(1.0)) {
                    targets.push(Target::Seed(seed.to_string()));
                }
            }
        }
        targets
    }
}

fn fail(peer: &mut Peer, now: Instant, sink: &dyn EventSink) {
    peer.live = false;
    peer.suspected = false;
    peer.dead_since = Some(now);
    peer.detector.reset();
    sink.emit(Event::PeerFailed(&peer.name));
}

/// Records a heartbeat `rise` (already applied to the peer's state) and revives the peer.
fn revive_on_heartbeat(
    peer: &mut Peer,
    rise: u64,
    now: Instant,
    config: &DetectorConfig,
    sink: &dyn EventSink,
) {
    peer.detector.heartbeat(now, rise, config);
    peer.suspected = false;
    if !peer.live && !peer.state.left {
        peer.live = true;
        peer.dead_since = None;
        sink.emit(Event::PeerAlive(&peer.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, KeyValue, Limits};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::sync::Mutex;

    fn test_rng() -> SmallRng {
        SmallRng::seed_from_u64(1)
    }

    /// Records events as text, the way a listener would see them.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl EventSink for Recorder {
        fn emit(&self, event: Event<'_>) {
            let text = match event {
                Event::NewPeer(p) => format!("new_peer {p}"),
                Event::Update { peer, key, value } => format!("update {peer} {key} {value:02x?}"),
                Event::Delete { peer, key } => format!("delete {peer} {key}"),
                Event::PeerAlive(p) => format!("peer_alive {p}"),
                Event::PeerFailed(p) => format!("peer_failed {p}"),
            };
            self.0.lock().unwrap().push(text);
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    struct TestNode {
        cluster: Cluster,
        events: Arc<Recorder>,
    }

    fn node(port: u16, generation: u64, now: Instant) -> TestNode {
        let events = Arc::new(Recorder::default());
        let mut cluster = Cluster::new(Arc::new(Settings::default()), events.clone());
        cluster.begin_incarnation(format!("127.0.0.1:{port}"), generation, Duration::ZERO);
        let _ = now;
        TestNode { cluster, events }
    }

    /// `a` hears `b` beat once a second for `seconds`, through exchanges; `a`'s events so far
    /// are dropped.
    fn beating_pair(seconds: u32) -> (TestNode, TestNode, Instant) {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        for _ in 0..seconds {
            now += Duration::from_secs(1);
            b.cluster.tick(now, Duration::ZERO, &mut test_rng());
            exchange(&mut b.cluster, &mut a.cluster, now);
        }
        a.events.take();
        (a, b, now)
    }

    /// One full push-pull exchange from `a` to `b`, through the real encoder and decoder.
    fn exchange(a: &mut Cluster, b: &mut Cluster, now: Instant) {
        let limits = Limits::default();
        let roundtrip = |m: wire::Message, from: &str| {
            let bytes = wire::encode("gossiper", from, &m);
            wire::decode(&bytes::BytesMut::from(&bytes[..]), "gossiper", &limits)
                .unwrap()
                .1
        };
        let sent = a.digest();
        let wire::Message::Syn { digest } = roundtrip(
            wire::Message::Syn {
                digest: sent.clone(),
            },
            a.name(),
        ) else {
            unreachable!()
        };
        let SynReply {
            deltas,
            requests,
            heartbeats,
        } = b.handle_syn(&digest, now);
        let wire::Message::SynAck {
            deltas,
            requests,
            heartbeats,
        } = roundtrip(
            wire::Message::SynAck {
                deltas,
                requests,
                heartbeats,
            },
            b.name(),
        )
        else {
            unreachable!()
        };
        let answers = a.handle_syn_ack(
            SynReply {
                deltas,
                requests,
                heartbeats,
            },
            Sent::Digest(&sent),
            now,
        );
        let wire::Message::Ack { deltas } =
            roundtrip(wire::Message::Ack { deltas: answers }, a.name())
        else {
            unreachable!()
        };
        b.apply_deltas(deltas, now);
    }

    /// An exchange as `exchange.rs` runs it: a CompactSyn when `a` has one and `b` shares its
    /// membership, the named digest otherwise.
    fn exchange_like_a_node(a: &mut Cluster, b: &mut Cluster, now: Instant) {
        if let Some((membership, versions)) = a.compact_digest() {
            if let Some(reply) = b.handle_compact_syn(membership.hash, &versions, now) {
                let answers = a.handle_syn_ack(reply, Sent::Compact(&membership), now);
                b.apply_deltas(answers, now);
                return;
            }
        }
        exchange(a, b, now);
    }

    fn msgpack(s: &str) -> Bytes {
        let mut out = vec![0xa0 | s.len() as u8];
        out.extend_from_slice(s.as_bytes());
        Bytes::from(out)
    }

    #[test]
    fn one_exchange_reconciles_both_ways() {
        let now = Instant::now();
        let mut a = node(1, 10, now);
        let mut b = node(2, 20, now);
        a.cluster.set_local("ka", msgpack("1"), None);
        b.cluster.set_local("kb", msgpack("2"), None);
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert_eq!(
            a.cluster.node_value("127.0.0.1:2", "kb"),
            Some(&msgpack("2"))
        );
        assert_eq!(
            b.cluster.node_value("127.0.0.1:1", "ka"),
            Some(&msgpack("1"))
        );
        assert_eq!(
            a.events.take(),
            ["new_peer 127.0.0.1:2", "update 127.0.0.1:2 kb [a1, 32]"]
        );
        assert_eq!(
            b.events.take(),
            ["new_peer 127.0.0.1:1", "update 127.0.0.1:1 ka [a1, 31]"]
        );
        // Nothing new: a second exchange emits nothing and changes nothing.
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert!(a.events.take().is_empty() && b.events.take().is_empty());
    }

    #[test]
    fn compact_digest_works_once_memberships_agree() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        let (membership, versions) = a.cluster.compact_digest().unwrap();
        assert!(
            b.cluster
                .handle_compact_syn(membership.hash, &versions, now)
                .is_none(),
            "b does not know a yet"
        );
        exchange(&mut a.cluster, &mut b.cluster, now);

        now += Duration::from_secs(1);
        b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        b.cluster.set_local("k", msgpack("v"), None);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let (membership, versions) = a.cluster.compact_digest().unwrap();
        assert_eq!(
            versions,
            [1, 0, 0, 0],
            "heartbeat and max version per member, sorted by name"
        );
        let reply = b
            .cluster
            .handle_compact_syn(membership.hash, &versions, now)
            .unwrap();
        // b learned a's heartbeat from the digest; a gets b's key as a delta.
        assert_eq!(b.cluster.peer_infos(now)[0].heartbeat, 1);
        assert_eq!(reply.deltas.len(), 1);
        assert!(reply.heartbeats.is_empty());
        a.cluster
            .handle_syn_ack(reply, Sent::Compact(&membership), now);
        assert_eq!(
            a.cluster.node_value("127.0.0.1:2", "k"),
            Some(&msgpack("v"))
        );

        // A heartbeat-only difference travels as an index, not a named delta.
        now += Duration::from_secs(1);
        b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let (membership, versions) = a.cluster.compact_digest().unwrap();
        let reply = b
            .cluster
            .handle_compact_syn(membership.hash, &versions, now)
            .unwrap();
        assert!(reply.deltas.is_empty());
        assert_eq!(reply.heartbeats, [1, 2]);
        a.cluster
            .handle_syn_ack(reply, Sent::Compact(&membership), now);
        assert_eq!(a.cluster.peer_infos(now)[0].heartbeat, 2);

        // A membership change on either side makes the hash differ.
        let mut c = node(3, 1, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        let (membership, versions) = a.cluster.compact_digest().unwrap();
        assert!(b
            .cluster
            .handle_compact_syn(membership.hash, &versions, now)
            .is_none());
    }

    #[test]
    fn updates_arrive_once_in_version_order() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        for (key, value) in [("x", "1"), ("y", "2"), ("x", "3"), ("z", "4")] {
            a.cluster.set_local(key, msgpack(value), None);
        }
        exchange(&mut b.cluster, &mut a.cluster, now);
        let updates: Vec<String> = b
            .events
            .take()
            .into_iter()
            .filter(|e| e.starts_with("update"))
            .collect();
        // x was overwritten: only its latest version travels, in its version's place.
        assert_eq!(
            updates,
            [
                "update 127.0.0.1:1 y [a1, 32]",
                "update 127.0.0.1:1 x [a1, 33]",
                "update 127.0.0.1:1 z [a1, 34]"
            ]
        );
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["y", "x", "z"]);
    }

    #[test]
    fn after_a_named_digest_newer_heartbeats_go_back_by_position() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        for _ in 0..3 {
            b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        let sent = a.cluster.digest();
        let reply = b.cluster.handle_syn(&sent, now);
        let position = sent.iter().position(|e| e.name == "127.0.0.1:2").unwrap() as u64;
        assert!(reply.deltas.is_empty(), "{:?}", reply.deltas);
        assert_eq!(reply.heartbeats, [position, 3]);
        a.cluster.handle_syn_ack(reply, Sent::Digest(&sent), now);
        assert_eq!(a.cluster.digest()[position as usize].heartbeat, 3);
    }

    #[test]
    fn equal_value_is_not_a_change() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert!(a.cluster.set_local("k", msgpack("v"), None));
        assert!(a.cluster.take_push(&mut test_rng()).is_some());
        assert!(!a.cluster.set_local("k", msgpack("v"), None));
        assert!(!a.cluster.has_unpushed());
        assert_eq!(a.cluster.digest()[0].max_version, 1);
    }

    #[test]
    fn responder_sends_nodes_the_initiator_lacks() {
        let now = Instant::now();
        let mut seed = node(1, 1, now);
        let mut others: Vec<TestNode> = (2..6).map(|p| node(p, 1, now)).collect();
        for other in &mut others {
            exchange(&mut other.cluster, &mut seed.cluster, now);
        }
        let mut newcomer = node(9, 1, now);
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        assert_eq!(newcomer.cluster.peer_names(Some(true)).len(), 5);
    }

    #[test]
    fn heartbeats_travel_in_digests_not_as_updates() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        a.events.take();
        b.events.take();
        for _ in 0..5 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
            b.cluster.tick(now, Duration::ZERO, &mut test_rng());
            exchange(&mut a.cluster, &mut b.cluster, now);
        }
        assert_eq!(b.cluster.peer_infos(now)[0].heartbeat, 5);
        assert_eq!(a.cluster.peer_infos(now)[0].heartbeat, 5);
        assert!(a.events.take().is_empty() && b.events.take().is_empty());
        assert!(a.cluster.node_keys("127.0.0.1:2").is_empty());
    }

    #[test]
    fn new_generation_replaces_old_state_and_old_data_is_ignored() {
        let now = Instant::now();
        let mut a = node(1, 100, now);
        let mut b = node(2, 1, now);
        a.cluster.set_local("v", msgpack("old"), None);
        a.cluster.set_local("gone", msgpack("x"), None);
        exchange(&mut a.cluster, &mut b.cluster, now);
        let stale_a = a.cluster.digest();

        // The process restarts on the same address: a fresh state and a higher generation.
        let mut restarted = node(1, 200, now);
        restarted.cluster.set_local("v", msgpack("new"), None);
        exchange(&mut restarted.cluster, &mut b.cluster, now);
        assert_eq!(
            b.cluster.node_value("127.0.0.1:1", "v"),
            Some(&msgpack("new"))
        );
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["v"]);

        // A peer still holding the old incarnation cannot bring its values back.
        let SynReply {
            deltas, requests, ..
        } = b.cluster.handle_syn(&stale_a, now);
        assert!(requests.is_empty());
        assert_eq!(
            deltas
                .iter()
                .find(|d| d.name == "127.0.0.1:1")
                .unwrap()
                .generation,
            200
        );
        b.cluster.apply_deltas(
            vec![NodeDelta {
                name: "127.0.0.1:1".into(),
                generation: 100,
                heartbeat: 99,
                from_version: 0,
                to_version: 2,
                left: false,
                kvs: vec![KeyValue {
                    key: "v".into(),
                    version: 1,
                    value: msgpack("old"),
                }],
                horizon: 0,
            }],
            now,
        );
        assert_eq!(
            b.cluster.node_value("127.0.0.1:1", "v"),
            Some(&msgpack("new"))
        );
    }

    #[test]
    fn restart_keeps_local_values_under_the_new_generation() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        a.cluster.set_local("x", msgpack("3"), None);
        a.cluster
            .begin_incarnation("127.0.0.1:1".into(), 2, Duration::ZERO);
        let digest = a.cluster.digest();
        assert_eq!(
            (
                digest[0].generation,
                digest[0].max_version,
                digest[0].heartbeat
            ),
            (2, 2, 0)
        );
        assert_eq!(a.cluster.node_keys("127.0.0.1:1"), ["y", "x"]);
        assert_eq!(a.cluster.local_value("x"), Some(&msgpack("3")));
    }

    #[test]
    fn deltas_with_a_gap_are_not_applied() {
        let now = Instant::now();
        let mut b = node(2, 1, now);
        let delta = |from, to, version| NodeDelta {
            name: "127.0.0.1:1".into(),
            generation: 1,
            heartbeat: 1,
            from_version: from,
            to_version: to,
            left: false,
            kvs: vec![KeyValue {
                key: format!("k{version}"),
                version,
                value: msgpack("v"),
            }],
            horizon: 0,
        };
        b.cluster.apply_deltas(vec![delta(0, 1, 1)], now);
        b.cluster.apply_deltas(vec![delta(5, 6, 6)], now);
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["k1"]);
        assert_eq!(b.cluster.digest()[1].max_version, 1);
        b.cluster.apply_deltas(vec![delta(1, 2, 2)], now);
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["k1", "k2"]);
    }

    #[test]
    fn oversized_state_is_cut_at_a_version_boundary() {
        let now = Instant::now();
        let settings = Settings {
            limits: Limits {
                max_frame_bytes: 4096,
                ..Limits::default()
            },
            ..Settings::default()
        };
        let events = Arc::new(Recorder::default());
        let mut a = Cluster::new(Arc::new(settings.clone()), events.clone());
        a.begin_incarnation("127.0.0.1:1".into(), 1, Duration::ZERO);
        let mut b = Cluster::new(Arc::new(settings), Arc::new(Recorder::default()));
        b.begin_incarnation("127.0.0.1:2".into(), 1, Duration::ZERO);
        for i in 0..100 {
            a.set_local(
                &format!("key{i}"),
                msgpack("0123456789012345678901234567890"),
                None,
            );
        }
        let mut rounds = 0;
        while b.node_keys("127.0.0.1:1").len() < 100 {
            exchange(&mut b, &mut a, now);
            rounds += 1;
            assert!(rounds < 20, "state never completed");
            let keys = b.node_keys("127.0.0.1:1");
            let expected: Vec<String> = (0..keys.len()).map(|i| format!("key{i}")).collect();
            assert_eq!(keys, expected, "a prefix in version order");
        }
        assert!(rounds > 1);
    }

    #[test]
    fn silent_peer_is_convicted_and_revived_once_each() {
        let (mut a, mut b, mut now) = beating_pair(30);
        let mut failed_after = None;
        for second in 1..=30 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
            if failed_after.is_none() && !a.events.take().is_empty() {
                failed_after = Some(second);
            }
        }
        // phi > 8 after about 18.4 mean intervals of silence.
        assert_eq!(failed_after, Some(19));
        assert_eq!(a.cluster.peer_names(Some(false)), ["127.0.0.1:2"]);
        b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(a.events.take(), ["peer_alive 127.0.0.1:2"]);
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert!(a.events.take().is_empty());
    }

    #[test]
    fn another_nodes_conviction_is_taken_only_from_a_silent_peer() {
        let (mut a, _, mut now) = beating_pair(10);
        let suspicion = |heartbeat, generation| Suspicion {
            name: "127.0.0.1:2".into(),
            generation,
            heartbeat,
        };
        // Heard from a second ago: a's own phi is far below three quarters of the threshold.
        assert!(!a
            .cluster
            .corroborate(&suspicion(10, 1), now + Duration::from_secs(1)));
        // Silent for 15 s (phi about 6.5, past three quarters of 8): a agrees, once.
        now += Duration::from_secs(15);
        assert!(
            !a.cluster.corroborate(&suspicion(10, 2), now),
            "another generation"
        );
        assert!(
            !a.cluster.corroborate(&suspicion(9, 1), now),
            "we hold a newer heartbeat"
        );
        assert!(a.cluster.corroborate(&suspicion(10, 1), now));
        assert_eq!(a.events.take(), ["peer_failed 127.0.0.1:2"]);
        assert!(!a.cluster.corroborate(&suspicion(10, 1), now));
    }

    #[test]
    fn a_suspicion_heard_early_convicts_at_three_quarters_of_the_threshold() {
        let (mut a, mut b, now) = beating_pair(10);
        let suspicion = Suspicion {
            name: "127.0.0.1:2".into(),
            generation: 1,
            heartbeat: 10,
        };
        // After 7 s of silence (phi about 3.0, over three eighths of 8) the suspicion is kept.
        assert!(!a
            .cluster
            .corroborate(&suspicion, now + Duration::from_secs(7)));
        let mut failed_after = None;
        for second in 1..=20 {
            a.cluster.tick(
                now + Duration::from_secs(second),
                Duration::ZERO,
                &mut test_rng(),
            );
            if failed_after.is_none() && !a.events.take().is_empty() {
                failed_after = Some(second);
            }
        }
        // phi reaches 6 after about 13.8 silent seconds, instead of 8 after 18.4.
        assert_eq!(failed_after, Some(14));

        // A heartbeat clears a suspicion: the peer is then judged on its own silence again.
        let mut c = node(3, 1, now);
        exchange(&mut b.cluster, &mut c.cluster, now);
        assert!(!c
            .cluster
            .corroborate(&suspicion, now + Duration::from_secs(7)));
        let later = now + Duration::from_secs(8);
        b.cluster.tick(later, Duration::ZERO, &mut test_rng());
        exchange(&mut b.cluster, &mut c.cluster, later);
        c.events.take();
        // c's mean is the bootstrap 1 s (the wait for a learned peer's first rise is no
        // interval); 14 s of silence is phi 6.1: past three quarters of the threshold, short of it.
        c.cluster.tick(
            later + Duration::from_secs(14),
            Duration::ZERO,
            &mut test_rng(),
        );
        assert!(!c
            .events
            .take()
            .contains(&"peer_failed 127.0.0.1:2".to_string()));
        assert!(c
            .cluster
            .peer_names(Some(true))
            .contains(&"127.0.0.1:2".to_string()));
    }

    #[test]
    fn stalled_ticks_do_not_convict() {
        let (mut a, _, mut now) = beating_pair(10);
        now += Duration::from_secs(60);
        a.cluster
            .tick(now, Duration::from_secs(59), &mut test_rng());
        assert_eq!(a.cluster.peer_names(Some(true)), ["127.0.0.1:2"]);
    }

    #[test]
    fn peer_heard_of_but_never_heard_from_is_convicted() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        a.cluster.apply_deltas(
            vec![NodeDelta {
                name: "127.0.0.1:7".into(),
                generation: 1,
                heartbeat: 1,
                from_version: 0,
                to_version: 0,
                left: false,
                kvs: vec![],
                horizon: 0,
            }],
            now,
        );
        // A grace while clusters form: three times the usual silence.
        for _ in 0..50 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        assert_eq!(a.cluster.peer_names(Some(true)), ["127.0.0.1:7"]);
        for _ in 0..10 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        assert_eq!(a.cluster.peer_names(Some(false)), ["127.0.0.1:7"]);
    }

    #[test]
    fn leave_marks_the_node_failed_at_once_and_spreads() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        let mut c = node(3, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        b.events.take();
        c.events.take();
        b.cluster.take_push(&mut test_rng());
        a.cluster.leave();
        let (pushed, targets) = a.cluster.take_push(&mut test_rng()).unwrap();
        assert_eq!(targets.len(), 2, "a leave goes to every live peer");
        b.cluster.apply_deltas(pushed.clone(), now);
        assert_eq!(b.events.take(), ["peer_failed 127.0.0.1:1"]);
        assert!(
            !b.cluster.has_unpushed(),
            "only the origin starts a broadcast"
        );
        // Anti-entropy spreads it too.
        exchange(&mut c.cluster, &mut b.cluster, now);
        assert_eq!(c.events.take(), ["peer_failed 127.0.0.1:1"]);
        // Heartbeats of a node that left do not revive it; its next generation does.
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert!(b.events.take().is_empty());
        a.cluster
            .begin_incarnation("127.0.0.1:1".into(), 2, Duration::ZERO);
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert_eq!(b.events.take(), ["peer_alive 127.0.0.1:1"]);
    }

    #[test]
    fn dead_peers_are_forgotten_and_stay_forgotten() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let stale = b.cluster.digest();
        now += Duration::from_secs(60);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        now += Duration::from_secs(24 * 3600);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert!(a.cluster.peer_names(None).is_empty());
        let requests = a.cluster.handle_syn(&stale, now).requests;
        assert!(requests.iter().all(|r| r.name != "127.0.0.1:2"));
    }

    #[test]
    fn gossip_targets_follow_cassandra() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let seeds = vec!["127.0.0.1:1".to_string(), "127.0.0.1:50".to_string()];
        let mut rng = SmallRng::seed_from_u64(7);
        // Nobody live: always a seed, never ourselves.
        for _ in 0..100 {
            assert_eq!(
                a.cluster.gossip_targets(&seeds, &mut rng),
                [Target::Seed("127.0.0.1:50".into())]
            );
        }
        let mut peers: Vec<TestNode> = (2..12).map(|p| node(p, 1, now)).collect();
        for p in &mut peers {
            exchange(&mut p.cluster, &mut a.cluster, now);
        }
        let (mut live_targets, mut seed_targets) = (0, 0);
        for _ in 0..1000 {
            let targets = a.cluster.gossip_targets(&seeds, &mut rng);
            assert!(matches!(targets[0], Target::Peer(_)));
            live_targets += 1;
            seed_targets += targets
                .iter()
                .filter(|t| matches!(t, Target::Seed(_)))
                .count();
        }
        assert_eq!(live_targets, 1000);
        // One seed besides ourselves among 10 known peers: about one round in ten.
        assert!((50..=150).contains(&seed_targets), "{seed_targets}");
        // Failed peers are tried with probability failed/(live+1).
        let mut now = now;
        for _ in 0..60 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        assert_eq!(a.cluster.peer_names(Some(true)).len(), 0);
        let targets = a.cluster.gossip_targets(&seeds, &mut rng);
        assert!(targets.contains(&Target::Seed("127.0.0.1:50".into())));
        assert!(
            matches!(targets[0], Target::Peer(_)),
            "a failed peer with probability 10/1"
        );
    }

    #[test]
    fn seeded_cluster_converges_in_few_rounds() {
        for seed in [1u64, 2, 3, 4, 5] {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut now = Instant::now();
            let seeds = vec!["127.0.0.1:1000".to_string()];
            let mut nodes: Vec<TestNode> = (0..50).map(|i| node(1000 + i, 1, now)).collect();
            nodes[17].cluster.set_local("hi", msgpack("there"), None);
            let mut rounds = 0;
            while nodes.iter().any(|n| {
                n.cluster.peer_names(Some(true)).len() < 49
                    || (n.cluster.name() != "127.0.0.1:1017"
                        && n.cluster.node_value("127.0.0.1:1017", "hi").is_none())
            }) {
                rounds += 1;
                assert!(rounds <= 30, "seed {seed}: no convergence in 30 rounds");
                now += Duration::from_secs(1);
                for i in 0..nodes.len() {
                    nodes[i].cluster.tick(now, Duration::ZERO, &mut test_rng());
                    for target in nodes[i].cluster.gossip_targets(&seeds, &mut rng) {
                        let (Target::Peer(name) | Target::Seed(name)) = target;
                        let j = (name.rsplit(':').next().unwrap().parse::<usize>().unwrap()) - 1000;
                        let (a, b) = if i < j {
                            let (l, r) = nodes.split_at_mut(j);
                            (&mut l[i].cluster, &mut r[0].cluster)
                        } else {
                            let (l, r) = nodes.split_at_mut(i);
                            (&mut r[0].cluster, &mut l[j].cluster)
                        };
                        exchange(a, b, now);
                    }
                }
            }
            assert!(rounds <= 15, "seed {seed}: {rounds} rounds");
        }
    }

    /// A cluster of nodes on ports 1..=n that started an hour ago and know each other, driven in
    /// rounds as the node's tasks drive it: each round every node ticks, reports its disputes,
    /// and exchanges with one other at random; every broadcast (a Push of fresh changes to each
    /// live peer, a dispute to its owner) is delivered at once. All of it through the real
    /// encoder and decoder.
    struct World {
        nodes: Vec<TestNode>,
        now: Instant,
        rng: SmallRng,
        tally: Tally,
    }

    /// `message` encoded by `from` and decoded again, as a receiver gets it.
    fn through_wire(message: wire::Message, from: &str) -> wire::Message {
        let bytes = wire::encode("gossiper", from, &message);
        wire::decode(
            &bytes::BytesMut::from(&bytes[..]),
            "gossiper",
            &Limits::default(),
        )
        .expect("well-formed")
        .1
    }

    impl World {
        fn new(n: usize, seed: u64) -> World {
            World::with_settings(n, seed, Settings::default())
        }

        fn with_settings(n: usize, seed: u64, settings: Settings) -> World {
            let now = Instant::now();
            let started = unix_ms() - 3_600_000;
            let settings = Arc::new(settings);
            let nodes = (1..=n)
                .map(|p| {
                    let events = Arc::new(Recorder::default());
                    let mut cluster = Cluster::new(settings.clone(), events.clone());
                    let generation = started + p as u64;
                    cluster.begin_incarnation(format!("127.0.0.1:{p}"), generation, Duration::ZERO);
                    TestNode { cluster, events }
                })
                .collect();
            let mut world = World {
                nodes,
                now,
                rng: SmallRng::seed_from_u64(seed),
                tally: Tally::default(),
            };
            for _ in 0..10 {
                world.round();
            }
            for i in 0..n {
                assert_eq!(world.nodes[i].cluster.peer_names(Some(true)).len(), n - 1);
                world.nodes[i].events.take();
            }
            world
        }

        fn name(&self, i: usize) -> String {
            self.nodes[i].cluster.name().to_owned()
        }

        fn round(&mut self) {
            self.now += Duration::from_secs(1);
            for i in 0..self.nodes.len() {
                self.nodes[i]
                    .cluster
                    .tick(self.now, Duration::ZERO, &mut test_rng());
                for (owner, ours) in self.nodes[i].cluster.take_disputes() {
                    let to = self.index(&owner);
                    self.deliver(to, vec![ours], i);
                }
                let others = self.nodes.len() - 1;
                let j = (i + 1 + self.rng.gen_range(0..others)) % self.nodes.len();
                let (a, b) = if i < j {
                    let (l, r) = self.nodes.split_at_mut(j);
                    (&mut l[i].cluster, &mut r[0].cluster)
                } else {
                    let (l, r) = self.nodes.split_at_mut(i);
                    (&mut r[0].cluster, &mut l[j].cluster)
                };
                exchange(a, b, self.now);
                self.flush();
            }
        }

        fn index(&self, name: &str) -> usize {
            self.nodes
                .iter()
                .position(|n| n.cluster.name() == name)
                .expect("a node of this world")
        }

        /// A Push of `deltas` from node `from` to node `to`.
        fn deliver(&mut self, to: usize, deltas: Vec<NodeDelta>, from: usize) {
            let push = wire::Message::Push {
                deltas,
                forward_to: vec![],
            };
            let wire::Message::Push { deltas, .. } = through_wire(push, &self.name(from)) else {
                unreachable!()
            };
            self.nodes[to].cluster.apply_deltas(deltas, self.now);
        }

        /// Delivers every node's waiting changes to each peer it holds live, until none wait.
        fn flush(&mut self) {
            while let Some(i) = (0..self.nodes.len()).find(|&i| {
                self.nodes[i].cluster.has_unpushed()
                    && !self.nodes[i].cluster.peer_names(Some(true)).is_empty()
            }) {
                let (deltas, targets) = self.nodes[i].cluster.take_push(&mut self.rng).unwrap();
                for peer in targets {
                    let to = self.index(&peer);
                    self.deliver(to, deltas.clone(), i);
                }
            }
            for node in &mut self.nodes {
                let tally = node.cluster.take_tally();
                self.tally.implausible += tally.implausible;
                self.tally.refutations += tally.refutations;
            }
        }

        /// One forged frame, a Push of `delta`, sent to node `to` by a stranger.
        fn forge(&mut self, to: usize, delta: NodeDelta) {
            let push = wire::Message::Push {
                deltas: vec![delta],
                forward_to: vec![],
            };
            let wire::Message::Push { deltas, .. } = through_wire(push, "10.9.9.9:9") else {
                unreachable!()
            };
            self.nodes[to].cluster.apply_deltas(deltas, self.now);
            self.flush();
        }

        /// The delta node `owner` would send of itself from its max version, as a forger
        /// copies it from any digest.
        fn honest_tip(&self, owner: usize) -> NodeDelta {
            let digest = &self.nodes[owner].cluster.digest()[0];
            NodeDelta {
                name: digest.name.clone(),
                generation: digest.generation,
                heartbeat: digest.heartbeat,
                from_version: digest.max_version,
                to_version: digest.max_version,
                left: false,
                kvs: vec![],
                horizon: 0,
            }
        }

        fn write(&mut self, owner: usize, key: &str, value: &str) {
            self.nodes[owner]
                .cluster
                .set_local(key, msgpack(value), None);
            self.flush();
        }

        /// Every other node holds `owner` live in its true generation, no heartbeat ahead of
        /// its own, and with `value` under `key`.
        fn all_hear(&self, owner: usize, key: &str, value: &str) -> bool {
            let name = self.name(owner);
            let truth = &self.nodes[owner].cluster.local;
            (0..self.nodes.len()).filter(|&i| i != owner).all(|i| {
                let cluster = &self.nodes[i].cluster;
                cluster.peers.get(&name).is_some_and(|p| {
                    p.live
                        && p.state.generation == truth.generation
                        && p.state.heartbeat <= truth.heartbeat
                }) && cluster.node_value(&name, key) == Some(&msgpack(value))
            })
        }

        /// Rounds until every node holds `owner`'s true state, live, with its `value` under
        /// `key` (0 when they already do), at most `limit`.
        fn rounds_until_heard(
            &mut self,
            owner: usize,
            key: &str,
            value: &str,
            limit: usize,
        ) -> usize {
            let mut rounds = 0;
            while !self.all_hear(owner, key, value) {
                assert!(rounds < limit, "not heard within {limit} rounds");
                self.round();
                rounds += 1;
            }
            rounds
        }

        fn failures(&self) -> Vec<String> {
            self.nodes
                .iter()
                .flat_map(|n| n.events.take())
                .filter(|e| e.starts_with("peer_failed"))
                .collect()
        }
    }

    const SEEDS: [u64; 5] = [1, 2, 3, 4, 5];

    #[test]
    fn an_honest_cluster_hears_no_claims_and_refuses_nothing() {
        for seed in SEEDS {
            let mut world = World::new(6, seed);
            for round in 0..30 {
                let writer = round % 6;
                world.write(writer, &format!("k{}", round % 4), &format!("{round}"));
                world.round();
            }
            assert_eq!(world.tally, Tally::default(), "seed {seed}");
            assert!(world.nodes.iter().all(|n| n.cluster.disputes.is_empty()));
            assert!(world.failures().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn deletions_expiries_and_collections_raise_no_claims_and_converge() {
        for seed in SEEDS {
            let settings = Settings {
                tombstone_ttl: Duration::from_secs(5),
                ..Settings::default()
            };
            let mut world = World::with_settings(6, seed, settings);
            for round in 0..60usize {
                let owner = round % 6;
                let key = format!("k{}", round % 5);
                let cluster = &mut world.nodes[owner].cluster;
                match round % 3 {
                    0 => {
                        cluster.set_local(&key, msgpack("v"), None);
                    }
                    1 => {
                        let expires = world.now + Duration::from_secs(3);
                        cluster.set_local(&key, msgpack("t"), Some(expires));
                    }
                    _ => {
                        cluster.delete_local(&key, world.now);
                    }
                }
                world.flush();
                world.round();
            }
            for _ in 0..20 {
                world.round();
            }
            assert_eq!(world.tally, Tally::default(), "seed {seed}");
            assert!(world.nodes.iter().all(|n| n.cluster.disputes.is_empty()));
            assert!(world.failures().is_empty(), "seed {seed}");
            for owner in 0..6 {
                let name = world.name(owner);
                let truth = world.nodes[owner].cluster.node_keys(&name);
                for i in 0..6 {
                    assert_eq!(
                        world.nodes[i].cluster.node_keys(&name),
                        truth,
                        "seed {seed}"
                    );
                    let view = world.nodes[i].cluster.node(&name).unwrap();
                    assert_eq!(view.tombstone_count(), 0, "seed {seed}: all collected");
                }
            }
        }
    }

    #[test]
    fn honest_copies_older_than_a_collection_are_not_claims() {
        let mut now = Instant::now();
        let mut a = node_collecting_after(1, 4 << 20, now);
        let mut b = node_collecting_after(2, 4 << 20, now);
        a.cluster.set_local("k", msgpack("1"), None);
        a.cluster.set_local("j", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let mut budget = usize::MAX;
        let stale = b.cluster.node(A).unwrap().delta(A, 0, &mut budget);
        a.cluster.delete_local("k", now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let tombstone = b.cluster.node(A).unwrap().delta(A, 0, &mut budget);
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(a.cluster.node(A).unwrap().horizon, 3);
        // A copy from before the deletion, and one from before its collection: both true once.
        for copy in [stale, tombstone] {
            a.cluster.apply_deltas(vec![copy.clone()], now);
            assert_eq!(a.cluster.claim, None, "{copy:?}");
            assert_eq!(a.cluster.take_tally(), Tally::default(), "{copy:?}");
        }
        // A key the owner holds, with another value, still is one.
        let mut forged = a.cluster.node(A).unwrap().at_version(A, 2);
        forged.kvs[0].value = msgpack("x");
        a.cluster.apply_deltas(vec![forged], now);
        assert_eq!(a.cluster.take_tally().refutations, 1);
        // So is a horizon above the owner's: peers given it would refuse the owner's deltas.
        now += Duration::from_secs(1);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let mut forged = a.cluster.node(A).unwrap().delta(A, 0, &mut budget);
        forged.horizon = forged.to_version;
        a.cluster.apply_deltas(vec![forged], now);
        assert_eq!(a.cluster.take_tally().refutations, 1);
    }

    #[test]
    fn counters_are_judged_against_the_clock() {
        let plausible = Plausible {
            now_ms: 1_000_000_000,
            skew_ms: 60_000,
        };
        // A generation up to the skew ahead of our clock, not further.
        assert!(plausible.admits(1_000_060_000, 0, 0));
        assert!(!plausible.admits(1_000_060_001, 0, 0));
        assert!(!plausible.admits(wire::MAX_COUNTER, 0, 0));
        // Started an hour ago: a beat a millisecond and ten writes a microsecond at most,
        // counted from twice the skew before the start.
        let hour_ago = 1_000_000_000 - 3_600_000;
        assert!(plausible.admits(hour_ago, 3_720_000, 37_200_000_000));
        assert!(!plausible.admits(hour_ago, 3_720_001, 0));
        assert!(!plausible.admits(hour_ago, 0, 37_200_000_001));
        assert!(!plausible.admits(hour_ago, wire::MAX_COUNTER, 0));
        // An old generation and tests' small ones are far in the past: wide bounds.
        assert!(plausible.admits(1, 1 << 20, 1 << 40));
    }

    #[test]
    fn a_generation_of_2_pow_53_for_a_live_node_is_refused_and_one_within_the_skew_refuted() {
        for seed in SEEDS {
            let mut world = World::new(5, seed);
            let d = 3;
            let mut forged = world.honest_tip(d);
            forged.generation = wire::MAX_COUNTER;
            world.forge(0, forged);
            assert_eq!(world.tally.implausible, 1);
            world.write(d, "k", "after");
            assert_eq!(world.rounds_until_heard(d, "k", "after", 1), 0);

            // Within the skew, the forged generation wins at the node it reaches...
            let mut forged = world.honest_tip(d);
            forged.generation = unix_ms() + 30_000;
            forged.from_version = 0;
            forged.to_version = 0;
            let claimed = forged.generation;
            world.forge(0, forged);
            assert_eq!(
                world.nodes[0].cluster.peer_infos(world.now)[d - 1].generation,
                claimed
            );
            // ... until D hears of it, and starts a new incarnation above it.
            world.write(d, "k", "later");
            let rounds = world.rounds_until_heard(d, "k", "later", 3);
            eprintln!("seed {seed}: generation within the skew: heard again after {rounds} rounds");
            assert_eq!(world.tally.refutations, 1, "seed {seed}");
            assert!(world.nodes[d].cluster.generation() > claimed);
            assert!(world.failures().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn a_heartbeat_of_2_pow_53_is_refused_and_a_plausible_one_refuted() {
        for seed in SEEDS {
            let mut world = World::new(5, seed);
            let d = 2;
            let mut forged = world.honest_tip(d);
            forged.heartbeat = wire::MAX_COUNTER;
            world.forge(1, forged);
            assert_eq!(world.tally.implausible, 1);

            // Without a refutation, node 1 would hear no rise of D's heartbeat for 11 days.
            let mut forged = world.honest_tip(d);
            forged.heartbeat += 1_000_000;
            world.forge(1, forged);
            world.write(d, "k", "after");
            let rounds = world.rounds_until_heard(d, "k", "after", 3);
            eprintln!("seed {seed}: heartbeat raised: heard again after {rounds} rounds");
            assert_eq!(world.tally.refutations, 1, "seed {seed}");
            for _ in 0..30 {
                world.round();
            }
            assert!(world.failures().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn a_max_version_of_2_pow_53_is_refused_and_a_plausible_one_refuted() {
        for seed in SEEDS {
            let mut world = World::new(5, seed);
            let d = 4;
            world.write(d, "k", "before");
            let mut forged = world.honest_tip(d);
            forged.to_version = wire::MAX_COUNTER;
            world.forge(0, forged);
            assert_eq!(world.tally.implausible, 1);
            world.write(d, "k", "after");
            assert_eq!(world.rounds_until_heard(d, "k", "after", 1), 0);

            let mut forged = world.honest_tip(d);
            forged.to_version += 1_000_000;
            world.forge(0, forged);
            world.write(d, "k", "later");
            let rounds = world.rounds_until_heard(d, "k", "later", 3);
            eprintln!("seed {seed}: max version raised: heard again after {rounds} rounds");
            assert_eq!(world.tally.refutations, 1, "seed {seed}");
            assert!(world.failures().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn a_forged_write_at_the_next_version_is_refuted_even_after_the_owner_wrote_it_too() {
        for seed in SEEDS {
            let mut world = World::new(5, seed);
            let d = 1;
            world.write(d, "k", "before");
            let mut forged = world.honest_tip(d);
            forged.to_version += 1;
            forged.kvs.push(KeyValue {
                key: "k".into(),
                version: forged.to_version,
                value: msgpack("forged"),
            });
            // To every node but D, before D's own next write of that key: the same version.
            for i in (0..5).filter(|&i| i != d) {
                world.forge(i, forged.clone());
            }
            world.write(d, "k", "after");
            assert!(world.nodes.iter().all(|n| n.cluster.disputes.len() <= 1));
            let rounds = world.rounds_until_heard(d, "k", "after", 3);
            eprintln!("seed {seed}: colliding write: heard again after {rounds} rounds");
            assert_eq!(world.tally.refutations, 1, "seed {seed}");
            assert_eq!(
                world.nodes[d].cluster.local_value("k"),
                Some(&msgpack("after"))
            );

            // Forged to one node while D writes nothing: D hears a version above its own.
            let mut forged = world.honest_tip(d);
            forged.to_version += 1;
            forged.kvs.push(KeyValue {
                key: "k".into(),
                version: forged.to_version,
                value: msgpack("forged"),
            });
            world.forge(2, forged);
            for _ in 0..3 {
                world.round();
            }
            assert_eq!(world.tally.refutations, 2, "seed {seed}");
            assert_eq!(world.rounds_until_heard(d, "k", "after", 1), 0);
            assert!(world.failures().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn a_forged_left_is_refuted_and_the_node_returns_to_live() {
        for seed in SEEDS {
            let mut world = World::new(5, seed);
            let d = 0;
            let name = world.name(d);
            // `left` without the version that carries it is not taken at all.
            let mut forged = world.honest_tip(d);
            forged.left = true;
            world.forge(4, forged.clone());
            assert!(world.failures().is_empty());

            forged.to_version += 1;
            world.forge(4, forged);
            assert_eq!(world.failures(), [format!("peer_failed {name}")]);
            world.write(d, "k", "after");
            let rounds = world.rounds_until_heard(d, "k", "after", 3);
            eprintln!("seed {seed}: left: live and heard again after {rounds} rounds");
            assert_eq!(world.tally.refutations, 1, "seed {seed}");
            assert!(world.nodes[4]
                .events
                .take()
                .contains(&format!("peer_alive {name}")));
        }
    }

    #[test]
    fn a_node_does_not_refute_its_own_earlier_incarnations() {
        let mut world = World::new(4, 1);
        let d = 2;
        let name = world.name(d);
        world.write(d, "k", "v1");
        // A graceful stop, then a restart: peers hold the old generation, left, for a while.
        world.nodes[d].cluster.leave();
        world.flush();
        let old = world.nodes[d].cluster.generation();
        world.nodes[d]
            .cluster
            .begin_incarnation(name.clone(), old + 1000, Duration::ZERO);
        // Before the new incarnation is pushed, D hears its old one, left, everywhere.
        for i in [0, 1, 3] {
            let digest = world.nodes[i].cluster.digest();
            world.nodes[d].cluster.handle_syn(&digest, world.now);
        }
        world.flush();
        world.write(d, "k", "v2");
        world.rounds_until_heard(d, "k", "v2", 2);
        for _ in 0..5 {
            world.round();
        }
        assert_eq!(world.tally.refutations, 0);
        assert_eq!(world.nodes[d].cluster.generation(), old + 1000);
    }

    #[test]
    fn a_flood_of_claims_costs_one_incarnation_a_round_and_every_claim_is_beaten() {
        let mut world = World::new(3, 1);
        let d = 1;
        let base = unix_ms() + 10_000;
        for k in 0..100 {
            let mut forged = world.honest_tip(d);
            forged.generation = base + 10 * k;
            forged.from_version = 0;
            forged.to_version = 0;
            world.forge(d, forged);
        }
        // The first claim is beaten at once; the rest wait for the next round.
        assert_eq!(world.tally.refutations, 1);
        assert_eq!(world.nodes[d].cluster.generation(), base + 1);
        world.round();
        assert_eq!(world.tally.refutations, 2);
        assert!(world.nodes[d].cluster.generation() > base + 990);
        for _ in 0..5 {
            world.round();
        }
        assert_eq!(world.tally.refutations, 2);
        world.write(d, "k", "v");
        assert_eq!(world.rounds_until_heard(d, "k", "v", 1), 0);
    }

    #[test]
    fn a_node_whose_clock_runs_ahead_beyond_the_skew_is_refused_unless_the_option_allows_it() {
        let now = Instant::now();
        let ahead = unix_ms() + 120_000;
        let mut fast = node(9, ahead, now);
        let mut a = node(1, 1, now);
        exchange(&mut fast.cluster, &mut a.cluster, now);
        assert!(a.cluster.peer_names(None).is_empty());
        assert!(a.cluster.take_tally().implausible >= 1);
        // Only entries about that node are refused: it still learns of the others.
        assert_eq!(fast.cluster.peer_names(None), ["127.0.0.1:1"]);

        let settings = Settings {
            max_clock_skew: Duration::from_secs(180),
            ..Settings::default()
        };
        let mut tolerant = Cluster::new(Arc::new(settings), Arc::new(Recorder::default()));
        tolerant.begin_incarnation("127.0.0.1:2".into(), 1, Duration::ZERO);
        exchange(&mut fast.cluster, &mut tolerant, now);
        assert!(tolerant
            .peer_names(Some(true))
            .contains(&"127.0.0.1:9".to_string()));
        assert_eq!(tolerant.take_tally(), Tally::default());
    }

    /// Nodes whose tombstones are collected ten seconds after a deletion.
    fn node_collecting_after(port: u16, frame: usize, now: Instant) -> TestNode {
        let settings = Settings {
            tombstone_ttl: Duration::from_secs(10),
            limits: Limits {
                max_frame_bytes: frame,
                ..Limits::default()
            },
            ..Settings::default()
        };
        let events = Arc::new(Recorder::default());
        let mut cluster = Cluster::new(Arc::new(settings), events.clone());
        cluster.begin_incarnation(format!("127.0.0.1:{port}"), 1, Duration::ZERO);
        let _ = now;
        TestNode { cluster, events }
    }

    const A: &str = "127.0.0.1:1";

    #[test]
    fn a_deletion_travels_like_a_write_and_is_reported_once() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        let mut c = node(3, 1, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        b.events.take();
        c.events.take();

        a.events.take();
        assert!(a.cluster.delete_local("x", now));
        assert!(!a.cluster.delete_local("x", now), "already deleted");
        assert!(!a.cluster.delete_local("never", now));
        assert_eq!(a.cluster.local_value("x"), None);
        assert_eq!(a.cluster.node_keys(A), ["y"]);
        assert!(a.events.take().is_empty(), "no event for a local deletion");
        // The push reaches b; anti-entropy carries it on to c.
        let (pushed, _) = a.cluster.take_push(&mut test_rng()).unwrap();
        b.cluster.apply_deltas(pushed, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        for n in [&mut b, &mut c] {
            assert_eq!(n.events.take(), ["delete 127.0.0.1:1 x"]);
            assert_eq!(n.cluster.node_value(A, "x"), None);
            assert_eq!(n.cluster.node_keys(A), ["y"]);
        }
        exchange(&mut c.cluster, &mut b.cluster, now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert!(b.events.take().is_empty() && c.events.take().is_empty());

        // Written again, the key is back, as an update.
        a.cluster.set_local("x", msgpack("3"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(b.events.take(), ["update 127.0.0.1:1 x [a1, 33]"]);
        assert_eq!(b.cluster.node_keys(A), ["y", "x"]);
    }

    #[test]
    fn deletions_and_writes_are_reported_in_version_order() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        b.events.take();
        a.cluster.delete_local("x", now);
        a.cluster.set_local("w", msgpack("3"), None);
        a.cluster.set_local("y", msgpack("4"), None);
        a.cluster.delete_local("w", now);
        a.cluster.delete_local("y", now);
        a.cluster.set_local("v", msgpack("5"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        // w was written and deleted in between: b never saw it, so nothing is reported.
        assert_eq!(
            b.events.take(),
            [
                "delete 127.0.0.1:1 x",
                "delete 127.0.0.1:1 y",
                "update 127.0.0.1:1 v [a1, 35]"
            ]
        );
        assert_eq!(b.cluster.node_keys(A), ["v"]);
    }

    #[test]
    fn tombstones_are_collected_after_the_ttl_at_the_owner_and_then_everywhere() {
        let mut now = Instant::now();
        let mut a = node_collecting_after(1, 4 << 20, now);
        let mut b = node_collecting_after(2, 4 << 20, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        a.cluster.delete_local("x", now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let held = |n: &TestNode| {
            let state = n.cluster.node(A).unwrap();
            (state.len(), state.tombstone_count(), state.horizon)
        };
        assert_eq!(held(&a), (2, 1, 0));
        assert_eq!(held(&b), (2, 1, 0));

        now += Duration::from_secs(9);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(held(&a), (2, 1, 0), "kept for the whole ttl");
        now += Duration::from_secs(1);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(held(&a), (1, 0, 3));
        assert_eq!(a.cluster.timers.pending(), (0, 0));
        // Collecting takes a version, so the horizon travels: b forgets the tombstone too.
        b.events.take();
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(held(&b), (1, 0, 3));
        assert_eq!(b.cluster.digest()[1].max_version, 4);
        assert!(b.events.take().is_empty(), "collecting changes no value");
        assert_eq!(b.cluster.node_keys(A), ["y"]);
    }

    /// `a` writes x and y; every other node learns them; then `away` stops hearing anything
    /// while `a` deletes x, writes z and collects the tombstone, and `b` follows.
    fn away_past_the_horizon(frame: usize) -> (TestNode, TestNode, TestNode, Instant) {
        let mut now = Instant::now();
        let mut a = node_collecting_after(1, frame, now);
        let mut b = node_collecting_after(2, frame, now);
        let mut away = node_collecting_after(3, frame, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        exchange(&mut away.cluster, &mut b.cluster, now);
        assert_eq!(away.cluster.node_keys(A), ["x", "y"]);

        a.cluster.delete_local("x", now);
        a.cluster.set_local("z", msgpack("3"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(b.cluster.node(A).unwrap().horizon, 3);
        for n in [&a, &b, &away] {
            n.events.take();
        }
        (a, b, away, now)
    }

    #[test]
    fn a_view_older_than_the_horizon_is_replaced_whoever_starts_the_exchange() {
        for case in [
            "returning node asks b",
            "b asks returning node",
            "returning node asks a",
        ] {
            let (mut a, mut b, mut away, now) = away_past_the_horizon(4 << 20);
            // What the returning node holds cannot flow back: a delta of its stale view changes
            // nothing at b, whose view is ahead.
            let mut budget = usize::MAX;
            let stale = away.cluster.node(A).unwrap().delta(A, 0, &mut budget);
            b.cluster.apply_deltas(vec![stale], now);
            assert_eq!(b.cluster.node_keys(A), ["y", "z"], "{case}");
            assert!(b.events.take().is_empty(), "{case}");

            match case {
                "returning node asks b" => {
                    exchange_like_a_node(&mut away.cluster, &mut b.cluster, now)
                }
                "b asks returning node" => {
                    exchange_like_a_node(&mut b.cluster, &mut away.cluster, now)
                }
                _ => exchange_like_a_node(&mut away.cluster, &mut a.cluster, now),
            }
            assert_eq!(away.cluster.node_keys(A), ["y", "z"], "{case}");
            assert_eq!(away.cluster.node(A).unwrap().horizon, 3, "{case}");
            assert_eq!(
                away.events.take(),
                ["delete 127.0.0.1:1 x", "update 127.0.0.1:1 z [a1, 33]"],
                "{case}"
            );
            assert!(b.events.take().is_empty(), "{case}");
            assert_eq!(b.cluster.node_keys(A), ["y", "z"], "{case}");
        }
    }

    #[test]
    fn a_replacement_larger_than_a_frame_completes_without_resurrection() {
        // Frames of 4 KiB carry about 50 of these keys: a whole view takes several exchanges.
        let mut now = Instant::now();
        let [mut a, mut b, mut away, mut lagging] =
            [1, 2, 3, 4].map(|port| node_collecting_after(port, 4096, now));
        let value = msgpack("0123456789012345678901234567890");
        for i in 0..200 {
            a.cluster.set_local(&format!("key{i}"), value.clone(), None);
        }
        for _ in 0..10 {
            exchange(&mut b.cluster, &mut a.cluster, now);
            exchange(&mut away.cluster, &mut a.cluster, now);
            exchange(&mut lagging.cluster, &mut a.cluster, now);
        }
        // While two nodes are away, a deletes a late key and an early one, then forgets them.
        a.cluster.delete_local("key150", now);
        a.cluster.delete_local("key10", now);
        for _ in 0..10 {
            exchange(&mut b.cluster, &mut a.cluster, now);
        }
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        for _ in 0..10 {
            exchange(&mut b.cluster, &mut a.cluster, now);
        }
        let expected = a.cluster.node_keys(A);
        let horizon = a.cluster.node(A).unwrap().horizon;
        assert_eq!(b.cluster.node_keys(A), expected);
        assert_eq!(b.cluster.node(A).unwrap().horizon, horizon);
        away.events.take();

        let deleted = |n: &TestNode| {
            let keys = n.cluster.node_keys(A);
            keys.contains(&"key150".to_string()) || keys.contains(&"key10".to_string())
        };
        let mut rounds = 0;
        let (mut partial_views, mut offered_key150) = (0, 0);
        while away.cluster.node_keys(A) != expected {
            rounds += 1;
            assert!(rounds <= 20, "no progress: {:?}", away.cluster.node(A));
            // Alternate who starts, as random targets would.
            if rounds % 2 == 0 {
                exchange_like_a_node(&mut away.cluster, &mut b.cluster, now);
            } else {
                exchange_like_a_node(&mut b.cluster, &mut away.cluster, now);
            }
            let view = away.cluster.node(A).unwrap();
            let (from, partial) = (view.max_version, view.horizon > view.max_version);
            if partial {
                partial_views += 1;
                assert!(away.cluster.compact_digest().is_none());
                // A node that missed the deletions holds key150 above what the partial view
                // has: nothing it sends may bring the key back.
                let mut budget = usize::MAX;
                let stale = lagging.cluster.node(A).unwrap().delta(A, from, &mut budget);
                offered_key150 += stale.kvs.iter().any(|kv| kv.key == "key150") as u32;
                away.cluster.apply_deltas(vec![stale], now);
                exchange_like_a_node(&mut away.cluster, &mut lagging.cluster, now);
                exchange_like_a_node(&mut lagging.cluster, &mut away.cluster, now);
            }
            assert!(!deleted(&away), "round {rounds}");
        }
        assert!(partial_views > 0, "the replacement was cut");
        assert!(offered_key150 > 0);
        assert!(away.cluster.compact_digest().is_some());
        let events = away.events.take();
        let deletes: Vec<&String> = events.iter().filter(|e| e.starts_with("delete")).collect();
        // The first part of the replacement reports the early deletion; later parts, keys above
        // it that are not in it yet, including the late deletion. Those come back as updates.
        assert_eq!(deletes[0], "delete 127.0.0.1:1 key10");
        assert!(deletes.contains(&&"delete 127.0.0.1:1 key150".to_string()));
        assert!(!events.contains(&"update 127.0.0.1:1 key150 [a1, 30]".to_string()));
        // The lagging node got replaced along the way, and did not keep the keys either.
        while lagging.cluster.node_keys(A) != expected {
            exchange_like_a_node(&mut lagging.cluster, &mut b.cluster, now);
            assert!(!deleted(&lagging));
        }
    }

    #[test]
    fn a_cut_replacement_completes_from_a_node_that_saw_the_deletions_without_the_owner() {
        let mut now = Instant::now();
        let [mut a, mut b, mut c] = [1, 2, 3].map(|port| node_collecting_after(port, 4096, now));
        let value = msgpack("0123456789012345678901234567890");
        for i in 0..200 {
            a.cluster.set_local(&format!("key{i}"), value.clone(), None);
        }
        for _ in 0..10 {
            exchange(&mut b.cluster, &mut a.cluster, now);
            exchange(&mut c.cluster, &mut a.cluster, now);
        }
        // c gets the deletions as tombstones, but not the news of their collection.
        a.cluster.delete_local("key150", now);
        a.cluster.delete_local("key10", now);
        exchange(&mut c.cluster, &mut a.cluster, now);
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let horizon = a.cluster.node(A).unwrap().horizon;
        assert!(c.cluster.node(A).unwrap().horizon < horizon);
        // b's first exchange with a replaces part of its view; then a is gone for good.
        exchange(&mut b.cluster, &mut a.cluster, now);
        let view = b.cluster.node(A).unwrap();
        assert!(view.horizon > view.max_version, "a partial replacement");
        drop(a);

        let mut rounds = 0;
        while b.cluster.node(A).unwrap().horizon > b.cluster.node(A).unwrap().max_version {
            rounds += 1;
            assert!(rounds <= 20, "b never completes its view");
            if rounds % 2 == 0 {
                exchange_like_a_node(&mut b.cluster, &mut c.cluster, now);
            } else {
                exchange_like_a_node(&mut c.cluster, &mut b.cluster, now);
            }
        }
        // c took the horizon from b's digest, having every version up to it.
        assert_eq!(c.cluster.node(A).unwrap().horizon, horizon);
        assert_eq!(c.cluster.node(A).unwrap().tombstone_count(), 0);
        let expected: Vec<String> = (0..200)
            .filter(|i| ![10, 150].contains(i))
            .map(|i| format!("key{i}"))
            .collect();
        assert_eq!(b.cluster.node_keys(A), expected);
        assert_eq!(c.cluster.node_keys(A), expected);
    }

    #[test]
    fn keys_expire_by_the_owners_clock_alone() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        let in_5s = |now: Instant| Some(now + Duration::from_secs(5));
        a.cluster.set_local("lease", msgpack("1"), in_5s(now));
        a.cluster.set_local("kept", msgpack("2"), in_5s(now));
        a.cluster.set_local("kept", msgpack("3"), None);
        a.cluster.set_local("renewed", msgpack("4"), in_5s(now));
        a.cluster.set_local("gone", msgpack("5"), in_5s(now));
        a.cluster.delete_local("gone", now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        b.events.take();

        now += Duration::from_secs(4);
        // Rewriting the same value only moves the deadline; a deleted key's deadline is void.
        a.cluster.set_local("renewed", msgpack("4"), in_5s(now));
        a.cluster.set_local("gone", msgpack("6"), None);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert!(a.cluster.local_value("lease").is_some());
        now += Duration::from_secs(1);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(a.cluster.local_value("lease"), None);
        assert_eq!(a.cluster.node_keys(A), ["kept", "renewed", "gone"]);
        assert!(
            a.cluster.has_unpushed(),
            "an expiry is pushed like a deletion"
        );
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(
            b.events.take(),
            [
                "update 127.0.0.1:1 gone [a1, 36]",
                "delete 127.0.0.1:1 lease"
            ]
        );
        now += Duration::from_secs(5);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(a.cluster.node_keys(A), ["kept", "gone"]);
        assert_eq!(a.cluster.timers.pending().1, 0);
        // b's clock plays no part: its view changes only through a's versions.
        b.cluster.tick(
            now + Duration::from_secs(3600),
            Duration::ZERO,
            &mut test_rng(),
        );
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(b.cluster.node_keys(A), ["kept", "gone"]);
    }

    #[test]
    fn a_restart_does_not_bring_deleted_keys_back() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        a.cluster.set_local("x", msgpack("1"), None);
        a.cluster.set_local("y", msgpack("2"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        b.events.take();
        // b does not hear of the deletion before the restart.
        a.cluster.delete_local("x", now);
        a.cluster.begin_incarnation(A.into(), 2, Duration::ZERO);
        assert_eq!(a.cluster.node_keys(A), ["y"]);
        assert_eq!(
            a.cluster.node(A).unwrap().len(),
            1,
            "no tombstone carried over"
        );
        assert_eq!(a.cluster.timers.pending(), (0, 0));
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(b.cluster.node_keys(A), ["y"]);
        assert_eq!(
            b.events.take(),
            ["delete 127.0.0.1:1 x", "update 127.0.0.1:1 y [a1, 32]"]
        );
    }

    #[test]
    fn churn_of_a_million_keys_leaves_nothing_behind() {
        let mut now = Instant::now();
        let mut a = node_collecting_after(1, 4 << 20, now);
        let mut b = node_collecting_after(2, 4 << 20, now);
        a.cluster.set_local("steady", msgpack("1"), None);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let baseline = |n: &TestNode| n.cluster.node(A).unwrap().len();
        assert_eq!((baseline(&a), baseline(&b)), (1, 1));
        let mut largest = 0;
        for i in 0..1_000_000u32 {
            let key = format!("session-{i}");
            a.cluster.set_local(&key, msgpack("open"), None);
            a.cluster.delete_local(&key, now);
            // A second of churn is 10,000 cycles; b catches up every second.
            if i % 10_000 == 9_999 {
                now += Duration::from_secs(1);
                a.cluster.tick(now, Duration::ZERO, &mut test_rng());
                b.cluster.tick(now, Duration::ZERO, &mut test_rng());
                exchange(&mut b.cluster, &mut a.cluster, now);
                largest = largest.max(baseline(&a)).max(baseline(&b));
            }
        }
        // At most the last ten seconds of deletions are held at any time.
        assert!(largest <= 110_001, "{largest}");
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        exchange(&mut b.cluster, &mut a.cluster, now);
        for n in [&a, &b] {
            let state = n.cluster.node(A).unwrap();
            assert_eq!((state.len(), state.tombstone_count()), (1, 0));
            assert_eq!(n.cluster.node_keys(A), ["steady"]);
        }
        assert_eq!(a.cluster.timers.pending(), (0, 0));
        // The maps gave their room back.
        assert!(a.cluster.local.kvs_capacity() < 1024);
        assert!(b.cluster.node(A).unwrap().kvs_capacity() < 1024);
    }
}
