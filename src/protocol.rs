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
//! Names are trusted as peers only when confirmed: heard from directly (the sender of a frame),
//! or heard of with a heartbeat that rose over time. Until then a name is a candidate (see
//! [`Candidates`]): it holds no keys, is never contacted and never shown. Peers are capped at
//! `max_peers`, each node's keys at `max_keys_per_peer` and `max_bytes_per_peer`, and every
//! message we build at `max_peers_per_message` entries per list, `max_keys_per_peer` keys and the
//! frame size: when there is more to say, a digest covers a rotating window and a reply says the
//! rest in later exchanges. Refusals are tallied by reason.
//!
//! Nothing from the network is believed beyond what time allows (see [`Plausible`]), and nothing
//! about ourselves is believed at all: a claim about this node that it did not make (a higher
//! generation, or in its own generation a higher heartbeat or version, `left`, or keys it never
//! wrote) is beaten by a new incarnation above it, at most one per round (see `refute`). Its true
//! state then replaces the claim everywhere, as after a restart.

use crate::config::Settings;
use crate::detector::{DetectorConfig, PhiDetector};
use crate::peers::{
    Candidates, FnvBuild, Heard, Member, Membership, Name, Peer, PeerTable, Reach, Slot,
};
use crate::store::{Applied, Budget, LocalTimers, NodeState, Start, StateLimits};
use crate::wire::{self, DigestEntry, Message, NodeDelta, Rejection, Request};
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

/// A broadcast recipient, with what our connections say about reaching it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub name: String,
    pub reach: Reach,
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

/// Gossip intervals a name heard of second-hand waits for confirmation before it is dropped.
const CANDIDATE_ROUNDS: u32 = 10;

/// Gossip intervals after its start during which a node heard of second-hand is confirmed by a
/// second reporter, without waiting for its heartbeat to rise (see `Candidates::hear`).
const YOUNG_ROUNDS: u32 = 30;

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
    /// Names refused: the peer table or the candidates' is full.
    pub too_many_peers: u64,
    /// Deltas cut at a key past `max_keys_per_peer`, or past `max_bytes_per_peer`.
    pub too_many_keys: u64,
    pub too_many_bytes: u64,
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
    /// Its position in the digest's membership (or the digest).
    index: u64,
    name: &'a str,
    generation: u64,
    heartbeat: u64,
    max_version: u64,
    /// 0 in a compact digest (see `Cluster::compact_digest`).
    horizon: u64,
    /// Known for members of our own membership, which saves looking them up.
    slot: Option<Slot>,
}

/// What an outgoing message may still carry: encoded bytes and keys, and entries in each list.
struct Room {
    budget: Budget,
    entries: usize,
}

impl Room {
    fn for_message(settings: &Settings) -> Self {
        Room {
            budget: Budget {
                bytes: settings.message_budget(),
                keys: settings.limits.max_keys_per_message,
            },
            entries: settings.entries_per_message(),
        }
    }

    /// Takes `cost` bytes for one more entry of a list holding `len`, if both fit.
    fn take(&mut self, len: usize, cost: usize) -> bool {
        let fits = len < self.entries && cost <= self.budget.bytes;
        if fits {
            self.budget.bytes -= cost;
        }
        fits
    }
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
    /// Names heard of second-hand and not yet confirmed.
    candidates: Candidates,
    /// Peers dropped after `dead_peer_ttl` (or to make room): their generation then, and when.
    /// At most `max_peers` entries.
    forgotten: HashMap<String, (u64, Instant)>,
    /// Local changes not pushed yet.
    unpushed: Option<Unpushed>,
    /// Cached until a node joins, changes generation or is forgotten.
    membership: Option<Arc<Membership>>,
    /// Bumped whenever a peer leaves the table, which moves another into its slot.
    slot_epoch: u64,
    /// Where the next named digest's window, and the next compact one's, start in the
    /// membership, when the membership is too large for one message.
    syn_cursor: usize,
    compact_cursor: usize,
    /// Where the next reply's announcements and unsolicited heartbeats start.
    reply_cursor: usize,
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
        let candidates = Candidates::new(
            settings.max_peers,
            settings.gossip_interval / 2,
            settings.gossip_interval * CANDIDATE_ROUNDS,
        );
        Cluster {
            settings,
            name: String::new(),
            local: NodeState::default(),
            timers: LocalTimers::default(),
            peers: PeerTable::default(),
            candidates,
            forgotten: HashMap::new(),
            unpushed: None,
            membership: None,
            slot_epoch: 0,
            syn_cursor: 0,
            compact_cursor: 0,
            reply_cursor: 0,
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
    pub fn take_disputes(&mut self) -> Vec<(Recipient, NodeDelta)> {
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
                let reach = self.peers.get(&owner).map_or(Reach::Unknown, |p| p.reach);
                let recipient = Recipient {
                    name: owner.to_string(),
                    reach,
                };
                Some((recipient, delta))
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
        self.candidates.forget(&name);
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
    /// still changes). A key that would take this node past `max_keys_per_peer` or
    /// `max_bytes_per_peer` (which peers would refuse) is refused with that reason, and changes
    /// nothing.
    pub fn set_local(
        &mut self,
        key: &str,
        value: Bytes,
        expires_at: Option<Instant>,
    ) -> Result<bool, Rejection> {
        let same = self.local.value(key) == Some(&value);
        if !same {
            let (keys, bytes) = self.local.size_with(key, value.len());
            if keys > self.settings.max_keys_per_peer {
                return Err(Rejection::TooManyKeys);
            }
            if bytes > self.settings.max_bytes_per_peer {
                return Err(Rejection::TooManyBytes);
            }
        }
        self.timers.set_expiry(key, expires_at);
        if same {
            return Ok(false);
        }
        let from = self.local.max_version;
        self.local.insert(key.to_owned(), from + 1, value);
        self.mark_unpushed(from);
        Ok(true)
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

    /// Names heard of but not confirmed yet.
    pub fn candidate_count(&self) -> usize {
        self.candidates.len()
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
        let expired: Vec<Name> = self
            .peers
            .iter()
            .filter(|p| {
                p.dead_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= ttl)
            })
            .map(|p| p.name.clone())
            .collect();
        for name in expired {
            self.forget_peer(&name, now);
        }
        self.forgotten
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        self.candidates.expire(now);
        let live = self.peers.iter().filter(|p| p.live).count();
        let announce = (ANNOUNCERS / (live + convicted.len()).max(1) as f64).min(1.0);
        convicted.retain(|_| rng.gen_bool(announce));
        convicted
    }

    /// Drops a peer from the table, remembering its generation so that stale news of it is
    /// ignored. The memory of forgotten peers is bounded like the table: past `max_peers`
    /// entries, the older half goes.
    fn forget_peer(&mut self, name: &str, now: Instant) {
        let Some(peer) = self.peers.remove(name) else {
            return;
        };
        self.membership = None;
        self.slot_epoch += 1;
        self.disputes.remove(name);
        self.forgotten
            .insert(name.to_owned(), (peer.state.generation, now));
        if self.forgotten.len() > self.settings.max_peers {
            let mut times: Vec<Instant> = self.forgotten.values().map(|&(_, at)| at).collect();
            let half = times.len() / 2;
            let (_, &mut median, _) = times.select_nth_unstable(half);
            self.forgotten.retain(|_, (_, at)| *at > median);
        }
    }

    /// A frame arrived from `name` itself: a peer we reach, or a candidate confirmed.
    pub fn heard_from(&mut self, name: &str, now: Instant) {
        if let Some(peer) = self.peers.get_mut(name) {
            peer.reach = Reach::Reached;
        } else if let Some((generation, heartbeat)) = self.candidates.take(name) {
            if let Some(slot) = self.admit(name, generation, heartbeat, now) {
                self.peers.slots[slot].reach = Reach::Reached;
            }
        }
    }

    pub fn is_live_peer(&self, name: &str) -> bool {
        self.peers.get(name).is_some_and(|p| p.live)
    }

    /// Our connection to a peer failed, or our exchange with it got no answer: contacting it
    /// waits for the connection budget until it is heard from again.
    pub fn note_unreachable(&mut self, name: &str) {
        if let Some(peer) = self.peers.get_mut(name) {
            peer.reach = Reach::Unreachable;
        }
    }

    /// Whether contacting `name` is free of the connection budget: a live peer that has not
    /// failed us. Failed peers, unreachable ones and seeds must wait for it.
    pub fn contact_is_free(&self, name: &str) -> bool {
        self.peers
            .get(name)
            .is_some_and(|p| p.live && p.reach != Reach::Unreachable)
    }

    /// Makes `name` a peer at `generation`, live, heard from now. When the table is full the
    /// peer failed longest ago is forgotten to make room; with no failed peer, the name is
    /// refused. Returns its slot.
    fn admit(
        &mut self,
        name: &str,
        generation: u64,
        heartbeat: u64,
        now: Instant,
    ) -> Option<usize> {
        if self.peers.len() >= self.settings.max_peers {
            let oldest_failed = self
                .peers
                .iter()
                .filter_map(|p| Some((p.dead_since?, p.name.clone())))
                .min();
            match oldest_failed {
                Some((_, failed)) => self.forget_peer(&failed, now),
                None => {
                    self.tally.too_many_peers += 1;
                    return None;
                }
            }
        }
        let mut detector = PhiDetector::default();
        detector.learned(now);
        let mut state = NodeState::new(generation);
        state.heartbeat = heartbeat;
        self.sink.emit(Event::NewPeer(name));
        self.membership = None;
        self.peers.insert(Peer {
            name: name.into(),
            state,
            detector,
            live: true,
            dead_since: None,
            suspected: false,
            reach: Reach::Unknown,
        });
        self.peers.slot(name)
    }

    /// How recent a generation must be for a node to count as young: one that started within
    /// `YOUNG_ROUNDS` rounds (by our clock and its own).
    fn young_ms(&self) -> u64 {
        (self.settings.gossip_interval * YOUNG_ROUNDS).as_millis() as u64
    }

    /// A report of `name`, which is no peer, at `generation` and `heartbeat`. From `name`
    /// itself it is admitted at once; from anyone else it is noted as a candidate, and admitted
    /// once corroborated over time (see `Candidates::hear`). Returns its slot once it is a peer.
    fn hear_of(
        &mut self,
        name: &str,
        generation: u64,
        heartbeat: u64,
        from: &str,
        now: Instant,
    ) -> Option<usize> {
        if name == from {
            self.candidates.forget(name);
            return self.admit(name, generation, heartbeat, now);
        }
        let young = generation >= unix_ms().saturating_sub(self.young_ms());
        match self
            .candidates
            .hear(name, generation, heartbeat, from, young, now)
        {
            Heard::Confirmed {
                generation,
                heartbeat,
            } => self.admit(name, generation, heartbeat, now),
            Heard::Noted => None,
            Heard::Refused => {
                self.tally.too_many_peers += 1;
                None
            }
        }
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

    /// Every known node's digest entry, ourselves first.
    pub fn digest(&self) -> Vec<DigestEntry> {
        let mut digest = Vec::with_capacity(self.peers.len() + 1);
        digest.push(self.local.digest(&self.name));
        digest.extend(self.peers.iter().map(|p| p.state.digest(&p.name)));
        digest
    }

    /// The digest a Syn carries: ourselves and every peer, or, when that is more than one
    /// message may carry, ourselves and a window of the membership that moves on with every
    /// call.
    pub fn syn_digest(&mut self) -> Vec<DigestEntry> {
        let cap = self.settings.entries_per_message();
        if self.peers.len() < cap {
            return self.digest();
        }
        let membership = self.membership();
        let others = membership.members.len() - 1;
        let start = self.syn_cursor % membership.members.len();
        self.syn_cursor = start + cap - 1;
        let mut digest = Vec::with_capacity(cap);
        digest.push(self.local.digest(&self.name));
        let window = membership.members[start..]
            .iter()
            .chain(&membership.members[..start])
            .filter(|m| m.slot != Slot::Local)
            .take(others.min(cap - 1));
        digest.extend(window.map(|m| self.node_at(m.slot).digest(&m.name)));
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

    /// A digest by position: `heartbeat, max_version` for each member, in membership order, as
    /// a CompactSyn; or, for a membership larger than one message may carry, a
    /// CompactSynRange covering our own pair and a window that moves on with every call.
    /// None while a view of ours is being replaced (its horizon is above its max version):
    /// that horizon must reach the responder, and only the named digest carries it.
    pub fn compact_digest(&mut self) -> Option<(Arc<Membership>, Message)> {
        let membership = self.membership();
        let members = &membership.members;
        let replacing = |m: &Member| {
            let node = self.node_at(m.slot);
            node.horizon > node.max_version
        };
        if members.iter().any(replacing) {
            return None;
        }
        let pairs = |cluster: &Self, members: &[Member]| {
            let mut versions = Vec::with_capacity(members.len() * 2);
            for member in members {
                let node = cluster.node_at(member.slot);
                versions.extend([node.heartbeat, node.max_version]);
            }
            versions
        };
        let cap = self
            .settings
            .limits
            .max_peers_per_message
            .min(self.settings.message_budget() / wire::PAIR_BYTES);
        let message = if members.len() <= cap {
            Message::CompactSyn {
                membership_hash: membership.hash,
                versions: pairs(self, members),
            }
        } else {
            let offset = self.compact_cursor % members.len();
            let end = members.len().min(offset + cap - 1);
            self.compact_cursor = end;
            let mut versions = vec![self.local.heartbeat, self.local.max_version];
            versions.extend(pairs(self, &members[offset..end]));
            Message::CompactSynRange {
                membership_hash: membership.hash,
                offset: offset as u64,
                versions,
            }
        };
        Some((membership, message))
    }

    /// Responder side of a named digest from `from`: what the initiator lacks and what to ask
    /// of it. Live nodes the digest does not name are announced without their keys (see
    /// `NodeState::announcement`), so a newcomer learns the whole membership at once; our own
    /// state goes in full, since the initiator hears it from us directly. Newer heartbeats of
    /// nodes with nothing else new go back by their position in the digest, as after a
    /// CompactSyn: a membership that is changing (a cluster forming) costs a few bytes per
    /// node, not a delta.
    pub fn handle_syn(&mut self, digest: &[DigestEntry], from: &str, now: Instant) -> SynReply {
        self.heard_from(from, now);
        let entries = digest.iter().enumerate().map(|(index, e)| Entry {
            index: index as u64,
            name: &e.name,
            generation: e.generation,
            heartbeat: e.heartbeat,
            max_version: e.max_version,
            horizon: e.horizon,
            slot: None,
        });
        let (mut reply, mut wanted, mut room) = self.reconcile(entries, from, now);
        let named: HashSet<&str, FnvBuild> = digest.iter().map(|e| e.name.as_str()).collect();
        if !named.contains(self.name.as_str()) {
            wanted.insert(0, (None, 0));
        }
        self.fill_deltas(&mut reply, wanted, &mut room);
        let count = self.peers.len();
        let start = self.reply_cursor % count.max(1);
        for i in (start..count).chain(0..start) {
            let peer = &self.peers.slots[i];
            if !peer.live || named.contains(&*peer.name) {
                continue;
            }
            let cost = wire::DELTA_HEADER_BYTES + wire::name_bytes(&peer.name);
            if !room.take(reply.deltas.len(), cost) {
                self.reply_cursor = i;
                break;
            }
            reply.deltas.push(peer.state.announcement(&peer.name));
        }
        reply
    }

    /// Responder side of a CompactSyn; None when the memberships differ and the named digest
    /// is needed.
    pub fn handle_compact_syn(
        &mut self,
        membership_hash: u64,
        versions: &[u64],
        from: &str,
        now: Instant,
    ) -> Option<SynReply> {
        self.heard_from(from, now);
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
            .enumerate()
            .map(|(index, (m, v))| Entry {
                index: index as u64,
                name: &m.name,
                generation: m.generation,
                heartbeat: v[0],
                max_version: v[1],
                horizon: 0,
                slot: Some(m.slot),
            });
        let (mut reply, wanted, mut room) = self.reconcile(entries, from, now);
        self.fill_deltas(&mut reply, wanted, &mut room);
        Some(reply)
    }

    /// Responder side of a CompactSynRange: the sender's own pair, then a window of the
    /// membership from `offset`. None when the memberships differ.
    pub fn handle_compact_syn_range(
        &mut self,
        membership_hash: u64,
        offset: u64,
        versions: &[u64],
        from: &str,
        now: Instant,
    ) -> Option<SynReply> {
        self.heard_from(from, now);
        let membership = self.membership();
        let members = &membership.members;
        let window = (versions.len() / 2).checked_sub(1)?;
        let offset = usize::try_from(offset).ok()?;
        if membership.hash != membership_hash || offset.checked_add(window)? > members.len() {
            return None;
        }
        let sender = members.binary_search_by(|m| (*m.name).cmp(from)).ok()?;
        let positions =
            std::iter::once(sender).chain((offset..offset + window).filter(|&i| i != sender));
        let pairs = std::iter::once(&versions[..2]).chain(
            versions[2..]
                .chunks_exact(2)
                .zip(offset..)
                .filter(|&(_, i)| i != sender)
                .map(|(v, _)| v),
        );
        // As after a CompactSyn, 0 stands for every horizon.
        let entries = positions.zip(pairs).map(|(index, v)| {
            let member = &members[index];
            Entry {
                index: index as u64,
                name: &member.name,
                generation: member.generation,
                heartbeat: v[0],
                max_version: v[1],
                horizon: 0,
                slot: Some(member.slot),
            }
        });
        let (mut reply, wanted, mut room) = self.reconcile(entries, from, now);
        self.fill_deltas(&mut reply, wanted, &mut room);
        self.add_heartbeats(&membership, offset..offset + window, &mut reply, &mut room);
        Some(reply)
    }

    /// Fills what room a reply to a windowed digest has left with the heartbeats of members
    /// outside the window, from a cursor that moves on with every reply: the initiator takes
    /// those newer than its own. Windows alone would leave each member's heartbeat in a few
    /// digests only, and a large membership beating too rarely for its failure detectors.
    fn add_heartbeats(
        &mut self,
        membership: &Membership,
        window: std::ops::Range<usize>,
        reply: &mut SynReply,
        room: &mut Room,
    ) {
        let members = &membership.members;
        let start = self.reply_cursor % members.len();
        let outside = (start..members.len()).chain(0..start);
        for (index, member) in outside.map(|i| (i, &members[i])) {
            if window.contains(&index) {
                continue;
            }
            if !room.take(reply.heartbeats.len() / 2, wire::PAIR_BYTES) {
                self.reply_cursor = index;
                return;
            }
            let heartbeat = self.node_at(member.slot).heartbeat;
            reply.heartbeats.extend([index as u64, heartbeat]);
        }
    }

    /// Compares a digest from `from` with what we hold. Heartbeats newer in the digest are
    /// taken from it directly; heartbeats newer here go back by the entry's index (its position
    /// in the digest or the membership). Entries from our own membership carry their slot, which saves looking them up.
    /// Returns the reply's requests and heartbeats, the deltas it wants (`None` for our own
    /// state, and the version each starts after), and the room left in the message.
    fn reconcile<'a>(
        &mut self,
        entries: impl Iterator<Item = Entry<'a>>,
        from: &str,
        now: Instant,
    ) -> (SynReply, Vec<(Option<Name>, u64)>, Room) {
        let mut room = Room::for_message(&self.settings);
        let mut reply = SynReply::default();
        let mut wanted = Vec::new();
        let request = |name: &str, generation, from_version, horizon| Request {
            name: name.to_owned(),
            generation,
            from_version,
            horizon,
        };
        let request_cost = |name: &str| wire::REQUEST_BYTES + wire::name_bytes(name);
        let plausible = self.plausible();
        for entry in entries {
            let Entry {
                index,
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
                    // The sender itself: its keys come in this exchange's Ack.
                    None if name == from => {
                        if room.take(reply.requests.len(), request_cost(name)) {
                            reply.requests.push(request(name, generation, 0, 0));
                        }
                        continue;
                    }
                    None => match self.hear_of(name, generation, heartbeat, from, now) {
                        Some(i) => Slot::Peer(i),
                        None => continue,
                    },
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
            let wanted_node = match slot {
                Slot::Local => None,
                Slot::Peer(i) => Some(self.peers.slots[i].name.clone()),
            };
            if node.generation > generation {
                wanted.push((wanted_node, 0));
            } else if node.generation < generation {
                if !is_self && room.take(reply.requests.len(), request_cost(name)) {
                    reply.requests.push(request(name, generation, 0, 0));
                }
            } else {
                match node.delta_start(max_version, horizon) {
                    Start::Replace => wanted.push((wanted_node, 0)),
                    Start::From(start) if node.max_version > max_version => {
                        wanted.push((wanted_node, start))
                    }
                    _ if node.heartbeat > heartbeat
                        && room.take(reply.heartbeats.len() / 2, wire::PAIR_BYTES) =>
                    {
                        reply.heartbeats.extend([index, node.heartbeat]);
                    }
                    _ => {}
                }
                // Ask when the digest's view is newer, or knows of deletions ours may lack.
                let behind =
                    max_version > node.max_version || horizon > node.max_version.max(node.horizon);
                if !is_self && behind && room.take(reply.requests.len(), request_cost(name)) {
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
        (reply, wanted, room)
    }

    /// Adds the wanted deltas (see `reconcile`) to `reply` while `room` lasts; the rest goes
    /// in later exchanges.
    fn fill_deltas(&self, reply: &mut SynReply, wanted: Vec<(Option<Name>, u64)>, room: &mut Room) {
        for (name, from_version) in wanted {
            if reply.deltas.len() >= room.entries {
                break;
            }
            let (name, node) = match &name {
                None => (self.name.as_str(), &self.local),
                Some(name) => match self.peers.get(name) {
                    Some(peer) => (&**name, &peer.state),
                    None => continue,
                },
            };
            match node.delta(name, from_version, &mut room.budget) {
                Some(delta) => reply.deltas.push(delta),
                None => break,
            }
        }
    }

    /// Initiator side, after the SynAck from `from`: applies its deltas and its heartbeats,
    /// which index into what we `sent`, and answers its requests, within one message.
    pub fn handle_syn_ack(
        &mut self,
        reply: SynReply,
        sent: Sent<'_>,
        from: &str,
        now: Instant,
    ) -> Vec<NodeDelta> {
        self.apply_deltas(reply.deltas, from, now);
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
        let Room {
            mut budget,
            entries,
        } = Room::for_message(&self.settings);
        let mut answers = Vec::new();
        for r in &reply.requests {
            if answers.len() >= entries {
                break;
            }
            let Some(node) = self.node(&r.name) else {
                continue;
            };
            let start = if node.generation > r.generation {
                0
            } else if node.generation < r.generation {
                continue;
            } else {
                match node.delta_start(r.from_version, r.horizon) {
                    Start::Replace => 0,
                    Start::From(start) => start,
                    Start::Nothing => continue,
                }
            };
            match node.delta(&r.name, start, &mut budget) {
                Some(delta) => answers.push(delta),
                None => break,
            }
        }
        answers
    }

    /// Applies deltas from any message; `from` is its sender.
    pub fn apply_deltas(&mut self, mut deltas: Vec<NodeDelta>, from: &str, now: Instant) {
        self.heard_from(from, now);
        self.retain_plausible(&mut deltas);
        for delta in deltas {
            if delta.name == self.name {
                self.check_claims(&delta);
            } else {
                self.apply_delta(delta, from, now);
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

    fn apply_delta(&mut self, mut delta: NodeDelta, from: &str, now: Instant) {
        if self.is_forgotten(&delta.name, delta.generation) {
            return;
        }
        if self.peers.slot(&delta.name).is_none() {
            // A node that is leaving is not worth learning from hearsay.
            if delta.left && delta.name != from {
                return;
            }
            let heard = self.hear_of(&delta.name, delta.generation, delta.heartbeat, from, now);
            if heard.is_none() {
                return;
            }
        }
        let sink = &self.sink;
        let detector = &self.settings.detector;
        let limits = StateLimits {
            keys: self.settings.max_keys_per_peer,
            bytes: self.settings.max_bytes_per_peer,
        };
        // The view this delta's generation replaces, if it is a newer one.
        let mut previous = None;
        let peer = match self.peers.get_mut(&delta.name) {
            // Admitted above.
            None => return,
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
            Some(previous) => state.succeed(previous, &mut delta, limits, &mut changed),
            None => state.apply(&name, &mut delta, limits, &mut changed),
        };
        let Some(Applied {
            raised,
            disputed,
            refused,
        }) = applied
        else {
            return;
        };
        if let Some(ours) = disputed {
            self.disputes.entry(peer.name.clone()).or_insert(ours);
        }
        match refused {
            Some(Rejection::TooManyKeys) => self.tally.too_many_keys += 1,
            Some(_) => self.tally.too_many_bytes += 1,
            None => {}
        }
        // `left` travels like a write, so it counts only with the versions that carry it.
        if raised && refused.is_none() && delta.left && !state.left {
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

    /// Local changes to push, within one frame (the rest stays queued), and the live peers to
    /// push them to; None, keeping the changes, while nobody is live. They start where the
    /// unpushed changes start, or at `resend_from` (a version of the current generation) when
    /// that is earlier: a broadcast still under way that may arrive after this one.
    pub fn take_push(
        &mut self,
        resend_from: Option<(u64, u64)>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<(Vec<NodeDelta>, Vec<Recipient>)> {
        let pending = self.unpushed?;
        let mut targets = self.broadcast_targets(now, rng);
        if targets.is_empty() {
            return None;
        }
        if pending.announcement_only {
            targets.truncate(self.settings.push_fanout);
        }
        self.unpushed = None;
        let generation_now = self.local.generation;
        let mut from = if pending.generation == generation_now {
            pending.from
        } else {
            0
        };
        if let Some((generation, resend)) = resend_from {
            if generation == generation_now {
                from = from.min(resend);
            }
        }
        let mut budget = Budget {
            bytes: self.settings.delta_budget(),
            keys: self.settings.limits.max_keys_per_message,
        };
        let delta = self.local.delta(&self.name, from, &mut budget)?;
        if delta.to_version < self.local.max_version {
            self.unpushed = Some(Unpushed {
                generation: generation_now,
                from: delta.to_version,
                ..pending
            });
        }
        Some((vec![delta], targets))
    }

    pub fn has_unpushed(&self) -> bool {
        self.unpushed.is_some()
    }

    /// Every live peer, shuffled, then in the order a broadcast should try them (see
    /// `promptness`): the recipients of a broadcast we start.
    pub fn broadcast_targets(&self, now: Instant, rng: &mut impl Rng) -> Vec<Recipient> {
        let mut live: Vec<(u8, Recipient)> = self
            .peers
            .iter()
            .filter(|p| p.live)
            .map(|p| (self.promptness(p, now), recipient(p)))
            .collect();
        live.shuffle(rng);
        live.sort_by_key(|&(rank, _)| rank);
        live.into_iter().map(|(_, r)| r).collect()
    }

    /// The names of a received `forward_to` that are live peers here, each once, in the order a
    /// broadcast should try them: a push may only make us contact nodes we know, and a list
    /// repeating names must not multiply the broadcast.
    pub fn recipients(&self, names: Vec<String>, now: Instant) -> Vec<Recipient> {
        let mut seen = HashSet::with_capacity(names.len());
        let mut recipients: Vec<(u8, Recipient)> = names
            .into_iter()
            .filter_map(|name| {
                let peer = self.peers.get(&name).filter(|p| p.live)?;
                seen.insert(peer.name.clone())
                    .then(|| (self.promptness(peer, now), recipient(peer)))
            })
            .collect();
        recipients.sort_by_key(|&(rank, _)| rank);
        recipients.into_iter().map(|(_, r)| r).collect()
    }

    /// Where a broadcast should try `peer`, first to last: heard from directly, then not heard
    /// from directly, then silent (past half the failure threshold: cut off, or a name that
    /// never answers), then failed us. A change then goes first to nodes known to answer, and
    /// neither silent nodes nor a flood of names that never answer (or whose addresses swallow
    /// what they receive) hold it up on its way to real peers.
    fn promptness(&self, peer: &Peer, now: Instant) -> u8 {
        let silent =
            || peer.detector.phi(now, &self.settings.detector) >= self.settings.phi_threshold / 2.0;
        match peer.reach {
            Reach::Unreachable => 3,
            _ if silent() => 2,
            Reach::Unknown => 1,
            Reach::Reached => 0,
        }
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

fn recipient(peer: &Peer) -> Recipient {
    Recipient {
        name: peer.name.to_string(),
        reach: peer.reach,
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
        let _ = now;
        node_with(port, generation, Settings::default())
    }

    fn node_with(port: u16, generation: u64, settings: Settings) -> TestNode {
        let events = Arc::new(Recorder::default());
        let mut cluster = Cluster::new(Arc::new(settings), events.clone());
        cluster.begin_incarnation(format!("127.0.0.1:{port}"), generation, Duration::ZERO);
        TestNode { cluster, events }
    }

    /// Default settings but for the given options.
    fn settings(options: &[(&str, f64)]) -> Settings {
        Settings::from_options("gossiper".into(), |name| {
            options.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
        })
        .unwrap()
    }

    /// `message` from `from` as `to` would receive it: encoded, checked against `to`'s frame
    /// size and decoded under its limits.
    fn roundtrip(message: wire::Message, from: &str, to: &Cluster) -> wire::Message {
        let bytes = wire::encode("gossiper", from, &message);
        let limits = &to.settings.limits;
        assert!(
            bytes.len() <= limits.max_frame_bytes,
            "a frame of {} bytes, over {}",
            bytes.len(),
            limits.max_frame_bytes
        );
        wire::decode(&bytes, "gossiper", limits).unwrap().1
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

    /// One full push-pull exchange from `a` to `b` with a named digest, through the real
    /// encoder and decoder.
    fn exchange(a: &mut Cluster, b: &mut Cluster, now: Instant) {
        let sent = a.syn_digest();
        let wire::Message::Syn { digest } = roundtrip(
            wire::Message::Syn {
                digest: sent.clone(),
            },
            a.name(),
            b,
        ) else {
            unreachable!()
        };
        let SynReply {
            deltas,
            requests,
            heartbeats,
        } = b.handle_syn(&digest, a.name(), now);
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
            a,
        )
        else {
            unreachable!()
        };
        let from = b.name().to_owned();
        let answers = a.handle_syn_ack(
            SynReply {
                deltas,
                requests,
                heartbeats,
            },
            Sent::Digest(&sent),
            &from,
            now,
        );
        let wire::Message::Ack { deltas } =
            roundtrip(wire::Message::Ack { deltas: answers }, a.name(), b)
        else {
            unreachable!()
        };
        let from = a.name().to_owned();
        b.apply_deltas(deltas, &from, now);
    }

    /// A budget nothing exhausts.
    fn unlimited() -> Budget {
        Budget {
            bytes: usize::MAX,
            keys: usize::MAX,
        }
    }

    /// The versions of a CompactSyn.
    fn versions(message: &wire::Message) -> &[u64] {
        match message {
            wire::Message::CompactSyn { versions, .. } => versions,
            other => panic!("not a CompactSyn: {other:?}"),
        }
    }

    /// An exchange as `exchange.rs` runs it (see `compact_exchange`).
    fn exchange_like_a_node(a: &mut Cluster, b: &mut Cluster, now: Instant) {
        compact_exchange(a, b, now);
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
        a.cluster.set_local("ka", msgpack("1"), None).unwrap();
        b.cluster.set_local("kb", msgpack("2"), None).unwrap();
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
        let (membership, compact) = a.cluster.compact_digest().unwrap();
        assert!(
            b.cluster
                .handle_compact_syn(membership.hash, versions(&compact), "127.0.0.1:1", now)
                .is_none(),
            "b does not know a yet"
        );
        exchange(&mut a.cluster, &mut b.cluster, now);

        now += Duration::from_secs(1);
        b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        b.cluster.set_local("k", msgpack("v"), None).unwrap();
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let (membership, compact) = a.cluster.compact_digest().unwrap();
        assert_eq!(
            versions(&compact),
            [1, 0, 0, 0],
            "heartbeat and max version per member, sorted by name"
        );
        let reply = b
            .cluster
            .handle_compact_syn(membership.hash, versions(&compact), "127.0.0.1:1", now)
            .unwrap();
        // b learned a's heartbeat from the digest; a gets b's key as a delta.
        assert_eq!(b.cluster.peer_infos(now)[0].heartbeat, 1);
        assert_eq!(reply.deltas.len(), 1);
        assert!(reply.heartbeats.is_empty());
        a.cluster
            .handle_syn_ack(reply, Sent::Compact(&membership), "127.0.0.1:2", now);
        assert_eq!(
            a.cluster.node_value("127.0.0.1:2", "k"),
            Some(&msgpack("v"))
        );

        // A heartbeat-only difference travels as an index, not a named delta.
        now += Duration::from_secs(1);
        b.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let (membership, compact) = a.cluster.compact_digest().unwrap();
        let reply = b
            .cluster
            .handle_compact_syn(membership.hash, versions(&compact), "127.0.0.1:1", now)
            .unwrap();
        assert!(reply.deltas.is_empty());
        assert_eq!(reply.heartbeats, [1, 2]);
        a.cluster
            .handle_syn_ack(reply, Sent::Compact(&membership), "127.0.0.1:2", now);
        assert_eq!(a.cluster.peer_infos(now)[0].heartbeat, 2);

        // A membership change on either side makes the hash differ.
        let mut c = node(3, 1, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        let (membership, compact) = a.cluster.compact_digest().unwrap();
        assert!(b
            .cluster
            .handle_compact_syn(membership.hash, versions(&compact), "127.0.0.1:1", now)
            .is_none());
    }

    #[test]
    fn updates_arrive_once_in_version_order() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        for (key, value) in [("x", "1"), ("y", "2"), ("x", "3"), ("z", "4")] {
            a.cluster.set_local(key, msgpack(value), None).unwrap();
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
        let reply = b.cluster.handle_syn(&sent, "127.0.0.1:1", now);
        let position = sent.iter().position(|e| e.name == "127.0.0.1:2").unwrap() as u64;
        assert!(reply.deltas.is_empty(), "{:?}", reply.deltas);
        assert_eq!(reply.heartbeats, [position, 3]);
        a.cluster
            .handle_syn_ack(reply, Sent::Digest(&sent), "127.0.0.1:2", now);
        assert_eq!(a.cluster.digest()[position as usize].heartbeat, 3);
    }

    #[test]
    fn equal_value_is_not_a_change() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        assert_eq!(a.cluster.set_local("k", msgpack("v"), None), Ok(true));
        assert!(a.cluster.take_push(None, now, &mut test_rng()).is_some());
        assert_eq!(a.cluster.set_local("k", msgpack("v"), None), Ok(false));
        assert!(!a.cluster.has_unpushed());
        assert_eq!(a.cluster.digest()[0].max_version, 1);
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
        a.cluster.set_local("v", msgpack("old"), None).unwrap();
        a.cluster.set_local("gone", msgpack("x"), None).unwrap();
        exchange(&mut a.cluster, &mut b.cluster, now);
        let stale_a = a.cluster.digest();

        // The process restarts on the same address: a fresh state and a higher generation.
        let mut restarted = node(1, 200, now);
        restarted
            .cluster
            .set_local("v", msgpack("new"), None)
            .unwrap();
        exchange(&mut restarted.cluster, &mut b.cluster, now);
        assert_eq!(
            b.cluster.node_value("127.0.0.1:1", "v"),
            Some(&msgpack("new"))
        );
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["v"]);

        // A peer still holding the old incarnation cannot bring its values back.
        let SynReply {
            deltas, requests, ..
        } = b.cluster.handle_syn(&stale_a, "127.0.0.1:1", now);
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
            "127.0.0.1:3",
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
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
        a.cluster.set_local("x", msgpack("3"), None).unwrap();
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
        let from = "127.0.0.1:1";
        b.cluster.apply_deltas(vec![delta(0, 1, 1)], from, now);
        b.cluster.apply_deltas(vec![delta(5, 6, 6)], from, now);
        assert_eq!(b.cluster.node_keys("127.0.0.1:1"), ["k1"]);
        assert_eq!(b.cluster.digest()[1].max_version, 1);
        b.cluster.apply_deltas(vec![delta(1, 2, 2)], from, now);
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
            )
            .unwrap();
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
    fn leave_marks_the_node_failed_at_once_and_spreads() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        let mut c = node(3, 1, now);
        exchange(&mut a.cluster, &mut b.cluster, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        exchange(&mut a.cluster, &mut c.cluster, now);
        b.events.take();
        c.events.take();
        b.cluster.take_push(None, now, &mut test_rng());
        a.cluster.leave();
        let (pushed, targets) = a.cluster.take_push(None, now, &mut test_rng()).unwrap();
        assert_eq!(targets.len(), 2, "a leave goes to every live peer");
        b.cluster.apply_deltas(pushed.clone(), "127.0.0.1:1", now);
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
        let requests = a.cluster.handle_syn(&stale, "127.0.0.1:2", now).requests;
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
            nodes[17]
                .cluster
                .set_local("hi", msgpack("there"), None)
                .unwrap();
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
                    let to = self.index(&owner.name);
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
            let sender = self.name(from);
            let wire::Message::Push { deltas, .. } = through_wire(push, &sender) else {
                unreachable!()
            };
            self.nodes[to]
                .cluster
                .apply_deltas(deltas, &sender, self.now);
        }

        /// Delivers every node's waiting changes to each peer it holds live, until none wait.
        fn flush(&mut self) {
            while let Some(i) = (0..self.nodes.len()).find(|&i| {
                self.nodes[i].cluster.has_unpushed()
                    && !self.nodes[i].cluster.peer_names(Some(true)).is_empty()
            }) {
                let now = self.now;
                let (deltas, targets) = self.nodes[i]
                    .cluster
                    .take_push(None, now, &mut self.rng)
                    .unwrap();
                for peer in targets {
                    let to = self.index(&peer.name);
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
            self.nodes[to]
                .cluster
                .apply_deltas(deltas, "10.9.9.9:9", self.now);
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
                .set_local(key, msgpack(value), None)
                .unwrap();
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
                        cluster.set_local(&key, msgpack("v"), None).unwrap();
                    }
                    1 => {
                        let expires = world.now + Duration::from_secs(3);
                        cluster
                            .set_local(&key, msgpack("t"), Some(expires))
                            .unwrap();
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
        a.cluster.set_local("k", msgpack("1"), None).unwrap();
        a.cluster.set_local("j", msgpack("2"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        let mut budget = unlimited();
        let stale = b.cluster.node(A).unwrap().delta(A, 0, &mut budget).unwrap();
        a.cluster.delete_local("k", now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        let tombstone = b.cluster.node(A).unwrap().delta(A, 0, &mut budget).unwrap();
        now += Duration::from_secs(11);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        assert_eq!(a.cluster.node(A).unwrap().horizon, 3);
        // A copy from before the deletion, and one from before its collection: both true once.
        for copy in [stale, tombstone] {
            a.cluster
                .apply_deltas(vec![copy.clone()], "127.0.0.1:2", now);
            assert_eq!(a.cluster.claim, None, "{copy:?}");
            assert_eq!(a.cluster.take_tally(), Tally::default(), "{copy:?}");
        }
        // A key the owner holds, with another value, still is one.
        let mut forged = a.cluster.node(A).unwrap().at_version(A, 2);
        forged.kvs[0].value = msgpack("x");
        a.cluster.apply_deltas(vec![forged], "127.0.0.1:2", now);
        assert_eq!(a.cluster.take_tally().refutations, 1);
        // So is a horizon above the owner's: peers given it would refuse the owner's deltas.
        now += Duration::from_secs(1);
        a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        let mut forged = a.cluster.node(A).unwrap().delta(A, 0, &mut budget).unwrap();
        forged.horizon = forged.to_version;
        a.cluster.apply_deltas(vec![forged], "127.0.0.1:2", now);
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
            let from = world.nodes[i].cluster.name().to_owned();
            world.nodes[d].cluster.handle_syn(&digest, &from, world.now);
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
            // Churn holds ten seconds of tombstones: 100,000 of them.
            max_keys_per_peer: 200_000,
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
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        // c trusts a once it has heard from it.
        exchange(&mut c.cluster, &mut a.cluster, now);
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
        let (pushed, _) = a.cluster.take_push(None, now, &mut test_rng()).unwrap();
        b.cluster.apply_deltas(pushed, A, now);
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
        a.cluster.set_local("x", msgpack("3"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        assert_eq!(b.events.take(), ["update 127.0.0.1:1 x [a1, 33]"]);
        assert_eq!(b.cluster.node_keys(A), ["y", "x"]);
    }

    #[test]
    fn deletions_and_writes_are_reported_in_version_order() {
        let now = Instant::now();
        let mut a = node(1, 1, now);
        let mut b = node(2, 1, now);
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        b.events.take();
        a.cluster.delete_local("x", now);
        a.cluster.set_local("w", msgpack("3"), None).unwrap();
        a.cluster.set_local("y", msgpack("4"), None).unwrap();
        a.cluster.delete_local("w", now);
        a.cluster.delete_local("y", now);
        a.cluster.set_local("v", msgpack("5"), None).unwrap();
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
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
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
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        exchange(&mut away.cluster, &mut a.cluster, now);
        exchange(&mut away.cluster, &mut b.cluster, now);
        assert_eq!(away.cluster.node_keys(A), ["x", "y"]);

        a.cluster.delete_local("x", now);
        a.cluster.set_local("z", msgpack("3"), None).unwrap();
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
            let mut budget = unlimited();
            let stale = away
                .cluster
                .node(A)
                .unwrap()
                .delta(A, 0, &mut budget)
                .unwrap();
            let relay = away.cluster.name().to_owned();
            b.cluster.apply_deltas(vec![stale], &relay, now);
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
            a.cluster
                .set_local(&format!("key{i}"), value.clone(), None)
                .unwrap();
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
                let mut budget = unlimited();
                let stale = lagging
                    .cluster
                    .node(A)
                    .unwrap()
                    .delta(A, from, &mut budget)
                    .unwrap();
                offered_key150 += stale.kvs.iter().any(|kv| kv.key == "key150") as u32;
                let relay = lagging.cluster.name().to_owned();
                away.cluster.apply_deltas(vec![stale], &relay, now);
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
            a.cluster
                .set_local(&format!("key{i}"), value.clone(), None)
                .unwrap();
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
        a.cluster
            .set_local("lease", msgpack("1"), in_5s(now))
            .unwrap();
        a.cluster
            .set_local("kept", msgpack("2"), in_5s(now))
            .unwrap();
        a.cluster.set_local("kept", msgpack("3"), None).unwrap();
        a.cluster
            .set_local("renewed", msgpack("4"), in_5s(now))
            .unwrap();
        a.cluster
            .set_local("gone", msgpack("5"), in_5s(now))
            .unwrap();
        a.cluster.delete_local("gone", now);
        exchange(&mut b.cluster, &mut a.cluster, now);
        b.events.take();

        now += Duration::from_secs(4);
        // Rewriting the same value only moves the deadline; a deleted key's deadline is void.
        a.cluster
            .set_local("renewed", msgpack("4"), in_5s(now))
            .unwrap();
        a.cluster.set_local("gone", msgpack("6"), None).unwrap();
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
        a.cluster.set_local("x", msgpack("1"), None).unwrap();
        a.cluster.set_local("y", msgpack("2"), None).unwrap();
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
        a.cluster.set_local("steady", msgpack("1"), None).unwrap();
        exchange(&mut b.cluster, &mut a.cluster, now);
        let baseline = |n: &TestNode| n.cluster.node(A).unwrap().len();
        assert_eq!((baseline(&a), baseline(&b)), (1, 1));
        let mut largest = 0;
        for i in 0..1_000_000u32 {
            let key = format!("session-{i}");
            a.cluster.set_local(&key, msgpack("open"), None).unwrap();
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

    /// A delta naming `name`, at generation 1 and `heartbeat`, with no keys.
    fn bare_delta(name: &str, heartbeat: u64) -> NodeDelta {
        NodeDelta {
            name: name.into(),
            generation: 1,
            heartbeat,
            from_version: 0,
            to_version: 0,
            left: false,
            kvs: vec![],
            horizon: 0,
        }
    }

    #[test]
    fn a_name_heard_of_second_hand_is_a_peer_only_once_confirmed() {
        let mut now = Instant::now();
        let mut a = node(1, 1, now);
        let relay = "127.0.0.1:9";
        a.cluster
            .apply_deltas(vec![bare_delta("127.0.0.1:7", 1)], relay, now);
        assert!(a.cluster.peer_names(None).is_empty(), "not a peer yet");
        assert_eq!(a.cluster.candidate_count(), 1);
        assert!(!a
            .events
            .take()
            .contains(&"new_peer 127.0.0.1:7".to_string()));
        // Never confirmed, it is dropped after ten rounds; it was never a peer, never failed.
        for _ in 0..11 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        assert_eq!(a.cluster.candidate_count(), 0);
        assert!(a.cluster.peer_names(None).is_empty());

        // Its heartbeat heard rising a round later confirms it: live from then on.
        a.cluster
            .apply_deltas(vec![bare_delta("127.0.0.1:7", 5)], relay, now);
        now += Duration::from_secs(1);
        a.cluster
            .apply_deltas(vec![bare_delta("127.0.0.1:7", 6)], relay, now);
        assert_eq!(a.cluster.peer_names(Some(true)), ["127.0.0.1:7"]);
        // Heard from directly, a name is a peer at once.
        a.cluster
            .apply_deltas(vec![bare_delta("127.0.0.1:8", 1)], "127.0.0.1:8", now);
        assert_eq!(
            a.cluster.peer_names(Some(true)),
            ["127.0.0.1:7", "127.0.0.1:8"]
        );
        assert_eq!(
            a.events.take(),
            ["new_peer 127.0.0.1:7", "new_peer 127.0.0.1:8"]
        );
    }

    #[test]
    fn a_newcomer_learns_the_membership_at_once_and_trusts_it_a_round_later() {
        let mut now = Instant::now();
        let mut seed = node(1, 1, now);
        let mut others: Vec<TestNode> = (2..6).map(|p| node(p, 1, now)).collect();
        for other in &mut others {
            other.cluster.set_local("k", msgpack("v"), None).unwrap();
            exchange(&mut other.cluster, &mut seed.cluster, now);
        }
        let mut newcomer = node(9, 1, now);
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        // The seed spoke for itself; the others are names heard of, not trusted yet.
        assert_eq!(newcomer.cluster.peer_names(Some(true)), ["127.0.0.1:1"]);
        assert_eq!(newcomer.cluster.candidate_count(), 4);

        // A round later the seed has heard them beat: their heartbeats rose, they are live.
        now += Duration::from_secs(1);
        for other in &mut others {
            other.cluster.tick(now, Duration::ZERO, &mut test_rng());
            exchange(&mut other.cluster, &mut seed.cluster, now);
        }
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        assert_eq!(newcomer.cluster.peer_names(Some(true)).len(), 5);
        // Their keys come with the next exchange.
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        for other in &others {
            assert_eq!(
                newcomer.cluster.node_value(other.cluster.name(), "k"),
                Some(&msgpack("v"))
            );
        }
    }

    // ---- hostile input and bounded resources ------------------------------------------------

    /// An exchange as nodes run it: the compact digest first, the named one if `b`'s membership
    /// differs. Returns whether the compact digest sufficed.
    fn compact_exchange(a: &mut Cluster, b: &mut Cluster, now: Instant) -> bool {
        let Some((membership, compact)) = a.compact_digest() else {
            exchange(a, b, now);
            return false;
        };
        let from = a.name().to_owned();
        let reply = match roundtrip(compact, &from, b) {
            wire::Message::CompactSyn {
                membership_hash,
                versions,
            } => b.handle_compact_syn(membership_hash, &versions, &from, now),
            wire::Message::CompactSynRange {
                membership_hash,
                offset,
                versions,
            } => b.handle_compact_syn_range(membership_hash, offset, &versions, &from, now),
            other => panic!("not a compact digest: {other:?}"),
        };
        let Some(SynReply {
            deltas,
            requests,
            heartbeats,
        }) = reply
        else {
            exchange(a, b, now);
            return false;
        };
        let responder = b.name().to_owned();
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
            &responder,
            a,
        )
        else {
            unreachable!()
        };
        let reply = SynReply {
            deltas,
            requests,
            heartbeats,
        };
        let answers = a.handle_syn_ack(reply, Sent::Compact(&membership), &responder, now);
        let wire::Message::Ack { deltas } =
            roundtrip(wire::Message::Ack { deltas: answers }, &from, b)
        else {
            unreachable!()
        };
        b.apply_deltas(deltas, &from, now);
        true
    }

    /// A Push from `from` carrying `deltas`, through the real encoder and decoder.
    fn push(to: &mut Cluster, from: &str, deltas: Vec<NodeDelta>, now: Instant) {
        let message = wire::Message::Push {
            deltas,
            forward_to: vec![],
        };
        let wire::Message::Push { deltas, .. } = roundtrip(message, from, to) else {
            unreachable!()
        };
        to.apply_deltas(deltas, from, now);
    }

    /// Keyless deltas for names that no node has, in 10.0.0.0/8.
    fn fake_deltas(range: std::ops::Range<u32>, heartbeat: u64) -> Vec<NodeDelta> {
        range
            .map(|i| {
                let name = format!("10.{}.{}.{}:7000", i >> 16 & 255, i >> 8 & 255, i & 255);
                bare_delta(&name, heartbeat)
            })
            .collect()
    }

    const ATTACKER: &str = "127.0.0.1:66";

    #[test]
    fn one_push_of_8190_fake_names_breaks_no_exchange() {
        let mut now = Instant::now();
        let (mut a, mut b, mut c) = (node(1, 1, now), node(2, 1, now), node(3, 1, now));
        exchange(&mut a.cluster, &mut b.cluster, now);
        exchange(&mut c.cluster, &mut b.cluster, now);
        exchange(&mut a.cluster, &mut c.cluster, now);
        push(&mut a.cluster, ATTACKER, fake_deltas(0..8190, 1), now);
        assert_eq!(
            a.cluster.peer_names(None).len(),
            2,
            "names heard of are not peers"
        );
        assert_eq!(a.cluster.candidate_count(), 8190);

        // Even once a second push a round later has confirmed them all, so that a's digest no
        // longer fits in one message, every exchange goes through (`roundtrip` checks each
        // frame's size and decodes it under the receiver's limits) and a's writes spread.
        now += Duration::from_secs(1);
        push(&mut a.cluster, ATTACKER, fake_deltas(0..8190, 2), now);
        assert_eq!(a.cluster.peer_names(Some(true)).len(), 8192);
        assert_eq!(
            a.cluster.syn_digest().len(),
            8192,
            "a window of the membership"
        );
        a.cluster.set_local("k", msgpack("after"), None).unwrap();
        compact_exchange(&mut a.cluster, &mut b.cluster, now);
        compact_exchange(&mut c.cluster, &mut a.cluster, now);
        for peer in [&b, &c] {
            assert_eq!(
                peer.cluster.node_value("127.0.0.1:1", "k"),
                Some(&msgpack("after"))
            );
            // They heard of the fakes from a only, and never saw them beat.
            assert_eq!(peer.cluster.peer_names(None).len(), 2);
        }
        for _ in 0..3 {
            compact_exchange(&mut b.cluster, &mut a.cluster, now);
            compact_exchange(&mut a.cluster, &mut c.cluster, now);
        }
        assert_eq!(b.cluster.peer_names(None).len(), 2);
    }

    #[test]
    fn a_hundred_thousand_fake_names_stay_within_max_peers() {
        let mut now = Instant::now();
        let limited = settings(&[("maxPeers", 1000.0)]);
        let mut a = node_with(1, 1, limited.clone());
        let mut b = node_with(2, 1, limited);
        exchange(&mut b.cluster, &mut a.cluster, now);
        for first in (0..100_000).step_by(8000) {
            push(
                &mut a.cluster,
                ATTACKER,
                fake_deltas(first..(first + 8000).min(100_000), 1),
                now,
            );
        }
        assert_eq!(
            a.cluster.candidate_count(),
            1000,
            "the table holds max_peers names"
        );
        assert_eq!(a.cluster.tally.too_many_peers, 99_000);
        assert_eq!(a.cluster.peer_names(None), ["127.0.0.1:2"]);

        // Confirmed, they fill the peer table, and no further.
        now += Duration::from_secs(1);
        push(&mut a.cluster, ATTACKER, fake_deltas(0..1000, 2), now);
        assert_eq!(a.cluster.peer_names(Some(true)).len(), 1000);
        assert_eq!(a.cluster.tally.too_many_peers, 99_001);
        // A real newcomer finds no room while every peer is live...
        let mut newcomer = node_with(3, 1, settings(&[("maxPeers", 1000.0)]));
        exchange(&mut newcomer.cluster, &mut a.cluster, now);
        assert!(!a
            .cluster
            .peer_names(None)
            .contains(&"127.0.0.1:3".to_string()));
        // ...and takes the place of a failed one once the fakes (silent) have failed, past the
        // bootstrap grace of peers never seen to beat since they were admitted.
        for _ in 0..60 {
            now += Duration::from_secs(1);
            a.cluster.tick(now, Duration::ZERO, &mut test_rng());
        }
        assert_eq!(a.cluster.peer_names(Some(true)).len(), 0);
        exchange(&mut newcomer.cluster, &mut a.cluster, now);
        assert_eq!(a.cluster.peer_names(Some(true)), ["127.0.0.1:3"]);
        assert_eq!(a.cluster.peer_names(None).len(), 1000);
        assert!(a.cluster.forgotten.len() <= 1000);
    }

    /// A delta of `count` tiny keys of `name`, from version `from` on.
    fn tiny_keys(name: &str, from: u64, count: u64) -> NodeDelta {
        NodeDelta {
            name: name.into(),
            generation: 1,
            heartbeat: 1,
            from_version: from,
            to_version: from + count,
            left: false,
            kvs: (1..=count)
                .map(|i| KeyValue {
                    key: format!("k{}", from + i),
                    version: from + i,
                    value: Bytes::from_static(&[1]),
                })
                .collect(),
            horizon: 0,
        }
    }

    #[test]
    fn frames_of_tiny_keys_are_capped_per_node() {
        let now = Instant::now();
        let mut a = node_with(1, 1, settings(&[("maxKeysPerPeer", 1000.0)]));
        // A frame of 20,000 tiny keys is refused while it is decoded, at its 1,001st key.
        let name = "127.0.0.2:100";
        let flood = wire::Message::Push {
            deltas: vec![tiny_keys(name, 0, 20_000)],
            forward_to: vec![],
        };
        let bytes = wire::encode("gossiper", name, &flood);
        assert_eq!(
            wire::decode(&bytes, "gossiper", &a.cluster.settings.limits),
            Err(Rejection::TooManyKeys)
        );
        // Frames within the limit, each from a name of its own (so each is trusted), fill that
        // node's keys up to the limit and are cut there.
        for i in 0..10 {
            let name = format!("127.0.0.2:{}", 100 + i);
            push(&mut a.cluster, &name, vec![tiny_keys(&name, 0, 600)], now);
            push(&mut a.cluster, &name, vec![tiny_keys(&name, 600, 600)], now);
            assert_eq!(a.cluster.node_keys(&name).len(), 1000);
            let held = a.cluster.peer_infos(now);
            let info = held.iter().find(|p| p.name == name).unwrap();
            assert_eq!(info.max_version, 1000, "cut after the last key applied");
        }
        // More from where one node's keys were cut: refused in turn.
        push(&mut a.cluster, name, vec![tiny_keys(name, 1000, 600)], now);
        assert_eq!(a.cluster.node_keys(name).len(), 1000);
        assert_eq!(a.cluster.tally.too_many_keys, 11);
    }

    #[test]
    fn bytes_are_capped_per_node_and_for_our_own_writes() {
        let now = Instant::now();
        let limited = settings(&[
            ("maxBytesPerPeer", 20_000.0),
            ("maxValueBytes", 4096.0),
            ("maxKeysPerPeer", 50.0),
        ]);
        let mut a = node_with(1, 1, limited.clone());
        let value = Bytes::from([vec![0xc5, 0x03, 0xe8], vec![0; 1000]].concat());
        let kvs = (1..=40)
            .map(|i| KeyValue {
                key: format!("k{i:02}"),
                version: i,
                value: value.clone(),
            })
            .collect();
        let delta = NodeDelta {
            kvs,
            to_version: 40,
            ..bare_delta("127.0.0.1:2", 1)
        };
        push(&mut a.cluster, "127.0.0.1:2", vec![delta], now);
        assert_eq!(
            a.cluster.node_keys("127.0.0.1:2").len(),
            19,
            "19 × 1006 bytes fit 20,000"
        );
        assert_eq!(a.cluster.tally.too_many_bytes, 1);

        // A node refuses its own writes past the limits its peers apply.
        let mut b = node_with(2, 1, limited);
        for i in 0..19 {
            b.cluster
                .set_local(&format!("k{i:02}"), value.clone(), None)
                .unwrap();
        }
        assert_eq!(
            b.cluster.set_local("one more", value.clone(), None),
            Err(Rejection::TooManyBytes)
        );
        assert_eq!(b.cluster.set_local("k00", msgpack("small"), None), Ok(true));
        for i in 0..31 {
            b.cluster
                .set_local(&format!("n{i}"), msgpack(""), None)
                .unwrap();
        }
        assert_eq!(
            b.cluster.set_local("n31", msgpack(""), None),
            Err(Rejection::TooManyKeys)
        );
    }

    #[test]
    fn a_membership_larger_than_one_message_converges_and_stays_compact() {
        for seed in [11, 12, 13] {
            large_membership_converges(seed);
        }
    }

    /// 40 nodes, 24 entries per message: each digest covers a window of 23 of 39 peers.
    fn large_membership_converges(seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut now = Instant::now();
        let small = settings(&[("maxPeersPerMessage", 24.0)]);
        let seeds = vec!["127.0.0.1:1000".to_string()];
        let mut nodes: Vec<TestNode> = (0..40)
            .map(|i| node_with(1000 + i, 1, small.clone()))
            .collect();
        nodes[17]
            .cluster
            .set_local("hi", msgpack("there"), None)
            .unwrap();
        let converged = |nodes: &[TestNode]| {
            nodes.iter().all(|n| {
                n.cluster.peer_names(Some(true)).len() == 39
                    && (n.cluster.name() == "127.0.0.1:1017"
                        || n.cluster.node_value("127.0.0.1:1017", "hi").is_some())
            })
        };
        let mut rounds = 0;
        let mut compact = 0;
        while rounds < 100 || !converged(&nodes) {
            rounds += 1;
            assert!(rounds <= 200, "seed {seed}: no convergence in 200 rounds");
            now += Duration::from_secs(1);
            for i in 0..nodes.len() {
                nodes[i].cluster.tick(now, Duration::ZERO, &mut test_rng());
                for target in nodes[i].cluster.gossip_targets(&seeds, &mut rng) {
                    let (Target::Peer(name) | Target::Seed(name)) = target;
                    let j = name.rsplit(':').next().unwrap().parse::<usize>().unwrap() - 1000;
                    let (a, b) = if i < j {
                        let (l, r) = nodes.split_at_mut(j);
                        (&mut l[i].cluster, &mut r[0].cluster)
                    } else {
                        let (l, r) = nodes.split_at_mut(i);
                        (&mut r[0].cluster, &mut l[j].cluster)
                    };
                    compact += compact_exchange(a, b, now) as usize;
                }
            }
        }
        let failures: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.events.take())
            .filter(|e| e.starts_with("peer_failed"))
            .collect();
        assert!(failures.is_empty(), "seed {seed}: {failures:?}");
        // Once memberships agree, windows of the compact digest carry the rounds.
        let mut more = 0;
        for i in 1..nodes.len() {
            let (l, r) = nodes.split_at_mut(i);
            more += compact_exchange(&mut r[0].cluster, &mut l[0].cluster, now) as usize;
        }
        assert_eq!(more, 39);
        assert!(compact > 0);
    }

    #[test]
    fn a_newcomer_to_a_thousand_nodes_sees_them_all_live_a_round_later() {
        let mut now = Instant::now();
        let mut seed = node(1, 1, now);
        let names: Vec<String> = (2..1001).map(|p| format!("127.0.0.1:{p}")).collect();
        let beat = |seed: &mut Cluster, heartbeat, now| {
            for name in &names {
                seed.apply_deltas(vec![bare_delta(name, heartbeat)], name, now);
            }
        };
        beat(&mut seed.cluster, 1, now);
        let mut newcomer = node(9999, 1, now);
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        assert_eq!(
            newcomer.cluster.candidate_count(),
            999,
            "the whole membership at once"
        );
        now += Duration::from_secs(1);
        beat(&mut seed.cluster, 2, now);
        exchange(&mut newcomer.cluster, &mut seed.cluster, now);
        assert_eq!(newcomer.cluster.peer_names(Some(true)).len(), 1000);
    }
}
