//! Inbound connection slots: how many connections a node serves at once, and who may hold them.
//!
//! A connection is *pending* from its accept until its first frame arrives; it then belongs to a
//! live peer (the frame's sender is one) or to a stranger. Honest peers send their first frame
//! at once, while slow or stalled clients stay pending, so a new connection never waits for a
//! slot a pending one holds: when every slot is taken, the oldest pending connection is closed
//! to make room, and when the new connection's source address already has `per_source` pending
//! connections, that source's oldest one is. Strangers may hold at most `stranger_capacity`
//! established slots, leaving the rest to live peers. A flood of slow or stranger connections
//! therefore costs its sender its own connections, never a peer's exchange.
//!
//! Invariant: pending + established ≤ `capacity`, pending connections of one source ≤
//! `per_source`, established strangers ≤ `stranger_capacity`. Each count changes only under the
//! state's lock, and a [`Slot`] gives back what it holds when dropped.

use crate::wire::Rejection;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

pub(crate) struct InboundSlots {
    state: Mutex<SlotState>,
    capacity: usize,
    stranger_capacity: usize,
    per_source: usize,
}

#[derive(Default)]
struct SlotState {
    next_id: u64,
    /// Pending connections by arrival, each with its source and the token that closes it.
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    pending_by_source: HashMap<IpAddr, usize>,
    established: usize,
    /// Established connections whose sender is not a live peer.
    strangers: usize,
}

impl SlotState {
    /// Closes the oldest pending connection (of `source`, if given); false if there is none.
    fn evict_oldest(&mut self, source: Option<IpAddr>) -> bool {
        let oldest = self
            .pending
            .iter()
            .find(|(_, (from, _))| source.is_none_or(|s| s == *from))
            .map(|(&id, _)| id);
        let Some((from, closer)) = oldest.and_then(|id| self.pending.remove(&id)) else {
            return false;
        };
        self.unpend(from);
        closer.cancel();
        true
    }

    fn unpend(&mut self, source: IpAddr) {
        if let Some(count) = self.pending_by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.pending_by_source.remove(&source);
            }
        }
    }
}

/// What became of a pending connection whose first frame arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Establish {
    Established,
    /// Its slot was taken back to make room before the frame arrived.
    TakenBack,
    /// A stranger, and strangers hold their whole share.
    NoRoom,
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Pending,
    Peer,
    Stranger,
    Nothing,
}

/// One inbound connection's slot. The serving task holds it and drops it when the connection
/// is done; `closed` is cancelled if the slot is taken back to make room.
pub(crate) struct Slot {
    slots: Arc<InboundSlots>,
    id: u64,
    held: Held,
    closed: CancellationToken,
}

impl InboundSlots {
    /// Slots for `capacity` connections: strangers may hold three quarters of them, and one
    /// source at most an eighth (at least 8) pending.
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(InboundSlots {
            state: Mutex::new(SlotState::default()),
            capacity,
            stranger_capacity: (capacity - capacity / 4).max(1),
            per_source: (capacity / 8).max(8).min(capacity),
        })
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `source` as pending. Returns its slot and, when another
    /// connection was closed to make room, why; or why the new one is refused (every slot is
    /// established).
    pub(crate) fn admit(
        self: &Arc<Self>,
        source: IpAddr,
    ) -> Result<(Slot, Option<Rejection>), Rejection> {
        let mut state = self.state();
        let mut evicted = None;
        if state.pending_by_source.get(&source).copied().unwrap_or(0) >= self.per_source
            && state.evict_oldest(Some(source))
        {
            evicted = Some(Rejection::SourceLimit);
        }
        if state.pending.len() + state.established >= self.capacity {
            if !state.evict_oldest(None) {
                return Err(Rejection::InboundFull);
            }
            evicted = Some(Rejection::InboundFull);
        }
        let id = state.next_id;
        state.next_id += 1;
        let closed = CancellationToken::new();
        state.pending.insert(id, (source, closed.clone()));
        *state.pending_by_source.entry(source).or_default() += 1;
        drop(state);
        let slot = Slot {
            slots: self.clone(),
            id,
            held: Held::Pending,
            closed,
        };
        Ok((slot, evicted))
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize, usize) {
        let state = self.state();
        (state.pending.len(), state.established, state.strangers)
    }
}

impl Slot {
    /// Cancelled when the slot is taken back to make room.
    pub(crate) fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// The connection's first frame arrived; `peer` tells whether its sender is a live peer.
    /// Unless `Established`, the connection should close.
    pub(crate) fn establish(&mut self, peer: bool) -> Establish {
        let slots = self.slots.clone();
        let mut state = slots.state();
        let Some((source, _)) = state.pending.remove(&self.id) else {
            self.held = Held::Nothing;
            return Establish::TakenBack;
        };
        state.unpend(source);
        if !peer && state.strangers >= slots.stranger_capacity {
            self.held = Held::Nothing;
            return Establish::NoRoom;
        }
        state.established += 1;
        if peer {
            self.held = Held::Peer;
        } else {
            state.strangers += 1;
            self.held = Held::Stranger;
        }
        Establish::Established
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.state();
        match self.held {
            Held::Pending => {
                // Absent when it was taken back: the evictor already gave it back.
                if let Some((source, _)) = state.pending.remove(&self.id) {
                    state.unpend(source);
                }
            }
            Held::Peer => state.established -= 1,
            Held::Stranger => {
                state.established -= 1;
                state.strangers -= 1;
            }
            Held::Nothing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let slots = InboundSlots::new(8);
        let mut held: Vec<Slot> = (0..8)
            .map(|i| slots.admit(ip(i)).unwrap())
            .map(|(slot, evicted)| {
                assert_eq!(evicted, None);
                slot
            })
            .collect();
        let (newest, evicted) = slots.admit(ip(100)).unwrap();
        assert_eq!(evicted, Some(Rejection::InboundFull));
        assert!(held[0].closed().is_cancelled());
        assert!(!held[1].closed().is_cancelled());
        assert_eq!(held[0].establish(true), Establish::TakenBack);
        held.push(newest);
        assert_eq!(slots.counts(), (8, 0, 0));
        drop(held);
        assert_eq!(slots.counts(), (0, 0, 0));
    }

    #[test]
    fn one_source_cannot_hold_more_than_its_share_of_pending_slots() {
        let slots = InboundSlots::new(64);
        let flood: Vec<Slot> = (0..8).map(|_| slots.admit(ip(1)).unwrap().0).collect();
        let (_ninth, evicted) = slots.admit(ip(1)).unwrap();
        assert_eq!(evicted, Some(Rejection::SourceLimit));
        assert!(flood[0].closed().is_cancelled());
        // Another source is untouched.
        let (_other, evicted) = slots.admit(ip(2)).unwrap();
        assert_eq!(evicted, None);
        assert_eq!(slots.counts().0, 9);
    }

    #[test]
    fn strangers_cannot_take_the_slots_kept_for_peers() {
        let slots = InboundSlots::new(8);
        let mut strangers = Vec::new();
        for i in 0..6 {
            let (mut slot, _) = slots.admit(ip(i)).unwrap();
            assert_eq!(slot.establish(false), Establish::Established);
            strangers.push(slot);
        }
        let (mut seventh, _) = slots.admit(ip(7)).unwrap();
        assert_eq!(
            seventh.establish(false),
            Establish::NoRoom,
            "six of eight is the strangers' share"
        );
        drop(seventh);
        let mut peers = Vec::new();
        for i in 0..2 {
            let (mut slot, evicted) = slots.admit(ip(20 + i)).unwrap();
            assert_eq!(evicted, None);
            assert_eq!(slot.establish(true), Establish::Established);
            peers.push(slot);
        }
        assert_eq!(slots.counts(), (0, 8, 6));
        // Every slot established: a newcomer is refused.
        assert_eq!(slots.admit(ip(30)).err(), Some(Rejection::InboundFull));
        drop(strangers);
        assert_eq!(slots.counts(), (0, 2, 0));
    }
}
