//! Exchanges over datagrams: a compact digest that fits in one datagram goes to a live peer by
//! UDP, and the SynAck and Ack come back the same way, so a steady cluster's rounds open no
//! connection. Anything else (a digest or an answer too large, a membership that differs, a
//! datagram lost) falls back at once to the exchange over a connection, which always works.
//!
//! A datagram is one whole frame, sealed exactly as on a connection: each datagram exchange is a
//! [`Session`] of its own, so its first frame is remembered against replay and each reply must
//! answer the frame before it. Invariants: a datagram is answered only when it comes from a
//! live peer, and the answer goes to the address in the sender's name, never to the datagram's
//! source; a reply is taken only when it answers a frame we sent that peer within the wait
//! ([`Datagrams::wait`]) (a late one, up to twice the wait, is dropped without counting it);
//! the work a datagram causes is bounded by its size, and the tables of
//! exchanges under way hold at most one entry per peer.

use crate::exchange::{self, Session};
use crate::node::Shared;
use crate::peers::Membership;
use crate::protocol::{Sent, SynReply};
use crate::transport::{Datagram, Transport};
use crate::wire::{self, Message, Rejection};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// Gossip rounds for which a peer whose datagrams went unanswered is reached by connection
/// only, so that a network that drops UDP costs a wait once in this many rounds.
const QUIET_ROUNDS: u32 = 10;

/// Unanswered datagram exchanges in a row, to any peers, after which every peer is reached by
/// connection only for `QUIET_ROUNDS`: in a large cluster on a network that drops UDP, most
/// rounds pick a peer not tried lately, and would each pay the wait.
const UNANSWERED_IN_A_ROW: u32 = 3;

/// A node's datagram socket and the exchanges under way on it; made anew for each incarnation.
pub(crate) struct Datagrams<D> {
    socket: D,
    /// Exchanges we started, by peer, waiting for its SynAck or NeedDigest; kept a while after
    /// we gave up, so that a late answer is recognised (and dropped) rather than counted.
    started: Mutex<HashMap<String, Started>>,
    /// Exchanges we answered with a SynAck, by peer, waiting for the Ack; likewise.
    answered: Mutex<HashMap<String, Answered>>,
    /// Peers reached by connection only until then.
    quiet: Mutex<HashMap<String, Instant>>,
    /// Unanswered exchanges since the last answer, and until when every peer is quiet.
    unanswered: Mutex<(u32, Option<Instant>)>,
    /// The hash of our membership, and since when it has been ours.
    membership: Mutex<(u64, Instant)>,
}

struct Started {
    session: Session,
    /// Closed once the initiator gave up.
    reply: oneshot::Sender<(Session, Message)>,
    at: Instant,
}

struct Answered {
    session: Session,
    at: Instant,
}

fn lock<M>(mutex: &Mutex<M>) -> MutexGuard<'_, M> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: Datagram> Datagrams<D> {
    pub(crate) fn new(socket: D) -> Self {
        Datagrams {
            socket,
            started: Mutex::default(),
            answered: Mutex::default(),
            quiet: Mutex::default(),
            unanswered: Mutex::default(),
            membership: Mutex::new((0, Instant::now())),
        }
    }

    /// How long a datagram waits for its answer: short of half a round, so that the fallback
    /// still completes within the round.
    fn wait<T: Transport>(shared: &Shared<T>) -> Duration {
        let settings = &shared.settings;
        settings.idle_timeout.min(settings.gossip_interval / 2)
    }

    fn is_quiet(&self, name: &str, now: Instant) -> bool {
        lock(&self.unanswered).1.is_some_and(|until| now < until)
            || lock(&self.quiet)
                .get(name)
                .is_some_and(|&until| now < until)
    }

    /// `name` did not answer in time.
    fn unanswered<T: Transport>(&self, shared: &Shared<T>, name: &str, now: Instant) {
        let until = now + shared.settings.gossip_interval * QUIET_ROUNDS;
        {
            let mut quiet = lock(&self.quiet);
            quiet.retain(|_, until| now < *until);
            quiet.insert(name.to_owned(), until);
        }
        let mut unanswered = lock(&self.unanswered);
        unanswered.0 += 1;
        if unanswered.0 >= UNANSWERED_IN_A_ROW {
            *unanswered = (0, Some(until));
        }
    }

    /// Whether our membership, of hash `hash`, changed within the last round: while it changes
    /// (a cluster forming, nodes coming and going) a peer's likely differs, and a digest by
    /// datagram would only earn a NeedDigest before the exchange by connection.
    fn membership_is_new<T: Transport>(&self, shared: &Shared<T>, hash: u64, now: Instant) -> bool {
        let mut membership = lock(&self.membership);
        if membership.0 != hash {
            *membership = (hash, now);
        }
        now < membership.1 + shared.settings.gossip_interval
    }

    fn answered(&self) {
        lock(&self.unanswered).0 = 0;
    }

    /// Sends one frame, counted like a frame on a connection (without the length it lacks).
    async fn send<T: Transport>(&self, shared: &Shared<T>, frame: Bytes, to: SocketAddr) -> bool {
        let counters = &shared.counters;
        counters.messages_sent.fetch_add(1, Relaxed);
        counters.bytes_sent.fetch_add(frame.len() as u64, Relaxed);
        let sent = self.socket.send_to(frame, to).await.is_ok();
        if !sent {
            counters.send_failures.fetch_add(1, Relaxed);
        }
        sent
    }
}

/// How an exchange goes on after its attempt over datagrams.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    /// It completed.
    Done,
    /// Over a connection, from the compact digest: datagrams were not tried, not answered, or
    /// answered NeedDigest (the peer's membership differs, or its SynAck would not fit in a
    /// datagram; over a connection it tells which).
    Compact,
}

/// Initiator side: sends the compact `message` (built on `membership`) to the live peer `name`
/// when it fits in a datagram, and completes the exchange by datagram when the answers fit too.
pub(crate) async fn exchange<T: Transport>(
    shared: &Shared<T>,
    datagrams: &Datagrams<T::Datagram>,
    name: &str,
    membership: &Membership,
    message: &Message,
) -> Outcome {
    let now = Instant::now();
    let Ok(address) = name.parse::<SocketAddr>() else {
        return Outcome::Compact;
    };
    if datagrams.is_quiet(name, now)
        || datagrams.membership_is_new(shared, membership.hash, now)
        || !shared.cluster().is_live_peer(name)
    {
        return Outcome::Compact;
    }
    let max_bytes = shared.settings.max_datagram_bytes;
    // Every member takes a byte at least: a digest this long cannot fit, unencoded.
    if let Message::CompactSyn { versions, .. } | Message::CompactSynRange { versions, .. } =
        message
    {
        if versions.len() / 2 > max_bytes {
            return Outcome::Compact;
        }
    }
    let mut session = Session::opened(shared, Some(name));
    let frame = session.frame(shared, message);
    if frame.len() > max_bytes {
        return Outcome::Compact;
    }
    let (reply, replied) = oneshot::channel();
    let wait = Datagrams::<T::Datagram>::wait(shared);
    {
        let mut started = lock(&datagrams.started);
        // The last round's exchange with this peer is still waiting: this one takes a connection.
        if started.get(name).is_some_and(|s| !s.reply.is_closed()) {
            return Outcome::Compact;
        }
        started.retain(|_, s| !s.reply.is_closed() || now < s.at + 2 * wait);
        let at = now;
        started.insert(name.to_owned(), Started { session, reply, at });
    }
    if !datagrams.send(shared, frame, address).await {
        lock(&datagrams.started).remove(name);
        return Outcome::Compact;
    }
    let Ok(Ok((mut session, answer))) = timeout(wait, replied).await else {
        datagrams.unanswered(shared, name, Instant::now());
        return Outcome::Compact;
    };
    datagrams.answered();
    let reply = match answer {
        Message::SynAck {
            deltas,
            requests,
            heartbeats,
        } => SynReply {
            deltas,
            requests,
            heartbeats,
        },
        Message::NeedDigest => return Outcome::Compact,
        _ => unreachable!("only SynAck and NeedDigest are handed to the initiator"),
    };
    let answers = exchange::absorb(shared, |cluster| {
        cluster.handle_syn_ack(reply, Sent::Compact(membership), name, Instant::now())
    });
    if !answers.is_empty() {
        let frame = session.frame(shared, &Message::Ack { deltas: answers });
        // The exchange over a connection asks again and carries them.
        if frame.len() > max_bytes || !datagrams.send(shared, frame, address).await {
            return Outcome::Compact;
        }
    }
    let counters = &shared.counters;
    counters.exchanges.fetch_add(1, Relaxed);
    counters.datagram_exchanges.fetch_add(1, Relaxed);
    Outcome::Done
}

/// Receives the node's datagrams until cancelled, and handles each in turn.
pub(crate) async fn receive_loop<T: Transport>(
    shared: Arc<Shared<T>>,
    datagrams: Arc<Datagrams<T::Datagram>>,
    cancel: CancellationToken,
) {
    let max_bytes = shared.settings.max_datagram_bytes;
    // One byte more than the largest datagram we take tells a longer one apart.
    let mut buffer = vec![0u8; max_bytes + 1];
    let counters = &shared.counters;
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            received = datagrams.socket.recv_from(&mut buffer) => received,
        };
        // The source goes unused: answers go to the sender's name.
        let Ok((len, _source)) = received else {
            // A transient error of the socket: keep receiving, without spinning.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        counters.messages_received.fetch_add(1, Relaxed);
        counters.bytes_received.fetch_add(len as u64, Relaxed);
        let handled = if len > max_bytes {
            Err(Rejection::Oversized)
        } else {
            handle(&shared, &datagrams, BytesMut::from(&buffer[..len])).await
        };
        if let Err(reason) = handled {
            counters.reject(reason);
        }
    }
}

/// Opens, decodes and acts on one datagram.
async fn handle<T: Transport>(
    shared: &Shared<T>,
    datagrams: &Datagrams<T::Datagram>,
    mut frame: BytesMut,
) -> Result<(), Rejection> {
    let opened = exchange::open(shared, &mut frame)?;
    let settings = &shared.settings;
    let (from, message) = wire::decode(&frame, &settings.cluster_name, &settings.limits)?;
    match message {
        Message::CompactSyn { .. } | Message::CompactSynRange { .. } => {
            // A datagram exchange is always started by name: an unbound digest is not ours.
            if opened.as_ref().is_some_and(|o| o.stamp.recipient == 0) {
                return Err(Rejection::Replayed);
            }
            // Settled first, so that a sealed digest is remembered against replay even when
            // it is not answered.
            let mut session = Session::accepted();
            session.settle(shared, opened, &from)?;
            // Replies by datagram go to the sender's name alone (on a connection, the connection
            // does that).
            session.address_to(&from);
            if !shared.cluster().is_live_peer(&from) {
                return Err(Rejection::Unsolicited);
            }
            answer(shared, datagrams, session, from, message).await;
            Ok(())
        }
        Message::SynAck { .. } | Message::NeedDigest => {
            let mut started = lock(&datagrams.started);
            let now = Instant::now();
            let wait = Datagrams::<T::Datagram>::wait(shared);
            let waiting = started
                .get_mut(&from)
                .filter(|s| !s.reply.is_closed() || now < s.at + 2 * wait)
                .ok_or(Rejection::Unsolicited)?;
            waiting.session.settle(shared, opened, &from)?;
            let Some(Started { session, reply, .. }) = started.remove(&from) else {
                unreachable!("found above, under the same lock")
            };
            // Fails when the answer came after the initiator gave up: the exchange went by
            // connection, and a late answer is dropped without counting it as hostile.
            let _ = reply.send((session, message));
            Ok(())
        }
        Message::Ack { deltas } => {
            {
                let mut answered = lock(&datagrams.answered);
                let now = Instant::now();
                let wait = Datagrams::<T::Datagram>::wait(shared);
                let waiting = answered
                    .get_mut(&from)
                    .filter(|a| now < a.at + 2 * wait)
                    .ok_or(Rejection::Unsolicited)?;
                waiting.session.settle(shared, opened, &from)?;
                let Some(Answered { at, .. }) = answered.remove(&from) else {
                    unreachable!("found above, under the same lock")
                };
                // A late Ack is dropped, as a late answer to us is.
                if now >= at + wait {
                    return Ok(());
                }
            }
            exchange::absorb(shared, |cluster| {
                cluster.apply_deltas(deltas, &from, Instant::now())
            });
            shared.counters.exchanges.fetch_add(1, Relaxed);
            Ok(())
        }
        _ => Err(Rejection::Unexpected),
    }
}

/// Responder side: answers a compact digest from the live peer `from` with a SynAck when it fits
/// in a datagram, otherwise with a NeedDigest (the initiator then exchanges by connection).
async fn answer<T: Transport>(
    shared: &Shared<T>,
    datagrams: &Datagrams<T::Datagram>,
    mut session: Session,
    from: String,
    digest: Message,
) {
    let reply = exchange::absorb(shared, |cluster| {
        let now = Instant::now();
        match digest {
            Message::CompactSyn {
                membership_hash,
                versions,
            } => cluster.handle_compact_syn(membership_hash, &versions, &from, now),
            Message::CompactSynRange {
                membership_hash,
                offset,
                versions,
            } => cluster.handle_compact_syn_range(membership_hash, offset, &versions, &from, now),
            _ => unreachable!("only compact digests are answered"),
        }
    });
    // Names are checked canonical `ip:port` by `wire::decode`.
    let Ok(address) = from.parse::<SocketAddr>() else {
        return;
    };
    let max_bytes = shared.settings.max_datagram_bytes;
    let syn_ack = reply.map(|reply| {
        let syn_ack = Message::SynAck {
            deltas: reply.deltas,
            requests: reply.requests,
            heartbeats: reply.heartbeats,
        };
        session.frame(shared, &syn_ack)
    });
    let frame = match syn_ack {
        Some(frame) if frame.len() <= max_bytes => {
            let at = Instant::now();
            let wait = Datagrams::<T::Datagram>::wait(shared);
            let mut answered = lock(&datagrams.answered);
            answered.retain(|_, a| at < a.at + 2 * wait);
            answered.insert(from, Answered { session, at });
            frame
        }
        _ => session.frame(shared, &Message::NeedDigest),
    };
    datagrams.send(shared, frame, address).await;
}

#[cfg(test)]
mod tests {
    //! One node, A, on the in-memory network, and a hand-driven socket at the address of its
    //! peer B: B formed the cluster with A, then vanished without leaving, so A still holds it
    //! live while the test speaks in its name.

    use super::*;
    use crate::config::Settings;
    use crate::node::{Listen, Node};
    use crate::protocol::{unix_ms, Event, EventSink};
    use crate::seal::{self, Key, Keys, Stamp, KEY_BYTES};
    use crate::transport::{MemDatagram, MemNetwork, MemTransport};
    use crate::wire::{KeyValue, NodeDelta};
    use std::net::{IpAddr, Ipv4Addr};
    use zeroize::Zeroizing;

    const KEY: [u8; KEY_BYTES] = [7; KEY_BYTES];
    const A: &str = "10.0.0.1:9000";
    const B: &str = "10.0.0.2:9000";

    struct Silent;

    impl EventSink for Silent {
        fn emit(&self, _: Event<'_>) {}
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn node(net: &MemNetwork, n: u8, seeds: &[&str], keys: bool) -> Node<MemTransport> {
        let node = Node::with_transport(
            Settings::default(),
            seeds.iter().map(|s| s.to_string()).collect(),
            Arc::new(Silent),
            net.host(ip(n)),
            Some(n as u64),
        );
        let node = if keys {
            node.with_keys(Keys::new(vec![Zeroizing::new(KEY)]))
        } else {
            node
        };
        node.start(&Listen {
            port: 9000,
            address: Some(ip(n)),
            advertise: None,
        })
        .unwrap();
        node
    }

    /// A with B live in its table, and the sockets that now stand at B's address and at an
    /// outsider's.
    struct Scene {
        net: MemNetwork,
        a: Node<MemTransport>,
        b: MemDatagram,
        outsider: MemDatagram,
    }

    async fn scene(keys: bool) -> Scene {
        let net = MemNetwork::new(5, 4 << 20);
        let a = node(&net, 1, &[], keys);
        let b = node(&net, 2, &[A], keys);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(a.with_cluster(|c| c.is_live_peer(B)));
        assert!(a.counters().datagram_exchanges.load(Relaxed) > 0);
        drop(b);
        // Past the wait for an Ack of B's last exchange, and for late ones.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = net.host(ip(2)).bind_datagram(B.parse().unwrap()).unwrap();
        let outsider = net
            .host(ip(9))
            .bind_datagram("10.0.0.9:9000".parse().unwrap())
            .unwrap();
        Scene {
            net,
            a,
            b,
            outsider,
        }
    }

    /// The next datagram at `socket` within 100 ms, decoded (opened first with the key).
    async fn next(socket: &MemDatagram) -> Option<(SocketAddr, Message)> {
        let mut buffer = vec![0; 65536];
        loop {
            let (len, source) = timeout(Duration::from_millis(100), socket.recv_from(&mut buffer))
                .await
                .ok()?
                .ok()?;
            let mut frame = BytesMut::from(&buffer[..len]);
            if seal::is_sealed(&frame) {
                let keyring = Keys::new(vec![Zeroizing::new(KEY)]).current();
                seal::open(&keyring, "gossiper", &mut frame).unwrap();
            }
            let (_, message) = wire::decode(&frame, "gossiper", &wire::Limits::default()).unwrap();
            // A's own rounds go on meanwhile; only answers matter here.
            if !matches!(message, Message::CompactSyn { .. }) {
                return Some((source, message));
            }
        }
    }

    /// A's compact digest as A would send it: the same membership (A and B) from B's side.
    fn digest_of(a: &Node<MemTransport>) -> Message {
        a.with_cluster_mut(|c| c.compact_digest()).unwrap().1
    }

    fn key_written_by_b(a: &Node<MemTransport>) -> Message {
        let b = a.peer_infos().into_iter().find(|p| p.name == B).unwrap();
        Message::Ack {
            deltas: vec![NodeDelta {
                name: B.into(),
                generation: b.generation,
                heartbeat: b.heartbeat,
                from_version: b.max_version,
                to_version: b.max_version + 1,
                left: false,
                kvs: vec![KeyValue {
                    key: "k".into(),
                    version: b.max_version + 1,
                    value: Bytes::from_static(&[0xa1, b'v']),
                }],
                horizon: 0,
            }],
        }
    }

    fn has_key(a: &Node<MemTransport>) -> bool {
        a.with_cluster(|c| c.node_value(B, "k").is_some())
    }

    async fn send(from: &MemDatagram, message: &Message, as_name: &str) {
        let frame = wire::encode("gossiper", as_name, message);
        from.send_to(frame, A.parse().unwrap()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn answers_go_to_the_senders_name_and_only_matching_acks_are_taken() {
        let Scene {
            net: _net,
            a,
            b,
            outsider,
        } = scene(false).await;
        let unsolicited = || a.counters().rejected(Rejection::Unsolicited);

        // A node that is not a live peer is not answered.
        send(&outsider, &digest_of(&a), "10.0.0.9:9000").await;
        assert_eq!(next(&outsider).await, None);
        assert_eq!(unsolicited(), 1);

        // An Ack that answers no SynAck of ours is dropped.
        send(&b, &key_written_by_b(&a), B).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!has_key(&a));
        assert_eq!(unsolicited(), 2);

        // A digest in B's name from elsewhere is answered, at B's address only.
        send(&outsider, &digest_of(&a), B).await;
        assert_eq!(next(&outsider).await, None);
        let (source, answer) = next(&b).await.expect("B is answered");
        assert_eq!(source, A.parse().unwrap());
        assert!(matches!(answer, Message::SynAck { .. }), "{answer:?}");

        // The Ack that answers that SynAck is taken, once.
        send(&b, &key_written_by_b(&a), B).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(has_key(&a));
        send(&b, &key_written_by_b(&a), B).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(unsolicited(), 3);

        // Garbage, and datagrams longer than the limit, are dropped and counted.
        let to_a: SocketAddr = A.parse().unwrap();
        for junk in [&b"garbage"[..], &[0xc1, 1, 1][..], &[0x93; 2000][..]] {
            outsider
                .send_to(Bytes::copy_from_slice(junk), to_a)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let counters = a.counters();
        assert_eq!(counters.rejected(Rejection::Malformed), 2);
        assert_eq!(counters.rejected(Rejection::Oversized), 1);

        // Replies A did not ask for are dropped too.
        for reply in [
            Message::NeedDigest,
            Message::SynAck {
                deltas: vec![],
                requests: vec![],
                heartbeats: vec![],
            },
        ] {
            send(&outsider, &reply, "10.0.0.9:9000").await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(unsolicited(), 5);
    }

    /// `message` sealed as B's, under `key`, addressed to A.
    fn sealed_by_b(a: &Node<MemTransport>, key: &Key, message: &Message) -> Bytes {
        let generation = a.with_cluster(|c| c.generation_of(B)).unwrap();
        let stamp = Stamp {
            sent_at: unix_ms(),
            generation,
            answers: 0,
            recipient: seal::recipient_tag(A),
        };
        let body = wire::encode("gossiper", B, message);
        Bytes::from(seal::seal(key, "gossiper", &stamp, seal::random_nonce(), &body).0)
    }

    #[tokio::test(start_paused = true)]
    async fn sealed_digests_from_outsiders_or_replayed_are_not_answered() {
        let Scene {
            net: _net,
            a,
            b,
            outsider,
        } = scene(true).await;
        let to_a: SocketAddr = A.parse().unwrap();
        let before = a.peer_infos().len();

        // In plaintext, or under another key: dropped, unanswered.
        send(&outsider, &digest_of(&a), B).await;
        let other_key = Key::new(Zeroizing::new([9; KEY_BYTES]));
        let forged = sealed_by_b(&a, &other_key, &digest_of(&a));
        outsider.send_to(forged, to_a).await.unwrap();
        assert_eq!(next(&b).await, None);
        assert_eq!(a.counters().rejected(Rejection::Plaintext), 1);
        assert_eq!(a.counters().rejected(Rejection::UnknownKey), 1);

        // Under the key: answered once; the same datagram again is a replay.
        let key = Key::new(Zeroizing::new(KEY));
        let digest = sealed_by_b(&a, &key, &digest_of(&a));
        outsider.send_to(digest.clone(), to_a).await.unwrap();
        assert!(matches!(next(&b).await, Some((_, Message::SynAck { .. }))));
        outsider.send_to(digest, to_a).await.unwrap();
        assert_eq!(next(&b).await, None);
        assert_eq!(a.counters().rejected(Rejection::Replayed), 1);
        assert_eq!(a.peer_infos().len(), before);
    }
}
