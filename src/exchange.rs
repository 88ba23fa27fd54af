//! One connection's worth of protocol: the initiator and responder sides of a push-pull
//! exchange, the Push tree that broadcasts fresh changes, and the Suspect broadcast. Each
//! function drives the synchronous [`Cluster`](crate::protocol::Cluster) with what arrives and
//! sends what it answers; none holds the cluster lock across an await.
//!
//! With keys, every frame is sealed (see [`crate::seal`]) and bound to its connection: a frame
//! must answer the last frame we sent on it (nothing, for the first), so a recorded frame cannot
//! be spliced into another exchange, and first frames are remembered for the freshness window.
//! A responder answers in the form of the first frame: sealed under the key it used, or, under
//! `accept_plaintext`, in plaintext.

use crate::node::Shared;
use crate::peers::Membership;
use crate::protocol::{unix_ms, Cluster, Suspicion, SynReply, Target};
use crate::seal::{self, Key, Stamp};
use crate::transport::{Connection, Transport};
use crate::wire::{self, Message, Rejection};
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::time::{timeout, Instant};

/// One connection and what its frames have settled so far.
pub(crate) struct Link<C> {
    conn: C,
    form: Form,
    /// The tag of the last sealed frame we sent here, which the peer's next frame must answer.
    sent: u64,
    /// The tag of the last sealed frame we received here, which our next frame answers.
    received: u64,
    /// `seal::recipient_tag` of the node we connected to by name; 0 otherwise.
    recipient: u64,
}

enum Form {
    /// A responder before the first frame, which decides.
    Undecided,
    Plain,
    /// Sealed under this key: our primary when we connected, the peer's key when it did.
    Sealed(Arc<Key>),
}

impl<C: Connection> Link<C> {
    /// A connection we opened to the node named `recipient`, or to a seed address (`None`).
    fn opened<T: Transport>(shared: &Shared<T>, conn: C, recipient: Option<&str>) -> Self {
        let form = match shared.keys.current().primary() {
            Some(key) => Form::Sealed(key.clone()),
            None => Form::Plain,
        };
        Link {
            conn,
            form,
            sent: 0,
            received: 0,
            recipient: recipient.map_or(0, seal::recipient_tag),
        }
    }

    fn accepted(conn: C) -> Self {
        Link {
            conn,
            form: Form::Undecided,
            sent: 0,
            received: 0,
            recipient: 0,
        }
    }
}

/// Sends one message; a send that does not complete within `idle_timeout` fails.
async fn send<T: Transport>(
    shared: &Shared<T>,
    link: &mut Link<T::Connection>,
    message: &Message,
) -> io::Result<()> {
    let (name, generation) = {
        let cluster = shared.cluster();
        (cluster.name().to_owned(), cluster.generation())
    };
    let cluster_name = &shared.settings.cluster_name;
    let body = wire::encode(cluster_name, &name, message);
    let frame = match &link.form {
        Form::Sealed(key) => {
            let stamp = Stamp {
                sent_at: unix_ms(),
                generation,
                answers: link.received,
                recipient: link.recipient,
            };
            let (sealed, tag) = seal::seal(key, cluster_name, &stamp, seal::random_nonce(), &body);
            link.sent = tag;
            Bytes::from(sealed)
        }
        Form::Plain | Form::Undecided => body,
    };
    shared.counters.messages_sent.fetch_add(1, Relaxed);
    shared
        .counters
        .bytes_sent
        .fetch_add(frame.len() as u64 + 4, Relaxed);
    let sent = timeout(shared.settings.idle_timeout, link.conn.send(frame))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    if sent.is_err() {
        shared.counters.send_failures.fetch_add(1, Relaxed);
    }
    sent
}

/// The next message, or None when the peer closed, timed out or sent something we drop.
async fn receive<T: Transport>(
    shared: &Shared<T>,
    link: &mut Link<T::Connection>,
) -> Option<(String, Message)> {
    let counters = &shared.counters;
    let mut frame = match timeout(shared.settings.idle_timeout, link.conn.recv()).await {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(error))) => {
            let oversized = error.kind() == io::ErrorKind::InvalidData;
            counters.reject(if oversized {
                Rejection::Oversized
            } else {
                Rejection::Malformed
            });
            return None;
        }
        Ok(None) | Err(_) => return None,
    };
    counters.messages_received.fetch_add(1, Relaxed);
    counters
        .bytes_received
        .fetch_add(frame.len() as u64 + 4, Relaxed);
    match take(shared, link, &mut frame) {
        Ok(message) => Some(message),
        Err(reason) => {
            counters.reject(reason);
            None
        }
    }
}

/// Opens (when sealed), checks and decodes one frame that arrived on `link`.
fn take<T: Transport>(
    shared: &Shared<T>,
    link: &mut Link<T::Connection>,
    frame: &mut BytesMut,
) -> Result<(String, Message), Rejection> {
    let settings = &shared.settings;
    if !seal::is_sealed(frame) {
        if !shared.keys.current().is_empty() {
            if !settings.accept_plaintext || matches!(link.form, Form::Sealed(_)) {
                return Err(Rejection::Plaintext);
            }
            shared.counters.plaintext_accepted.fetch_add(1, Relaxed);
        }
        link.form = Form::Plain;
        return wire::decode(frame, &settings.cluster_name, &settings.limits);
    }
    let opened = seal::open(&shared.keys.current(), &settings.cluster_name, frame)?;
    if matches!(link.form, Form::Plain) {
        return Err(Rejection::Unexpected);
    }
    let stamp = opened.stamp;
    if stamp.answers != link.sent {
        return Err(Rejection::Replayed);
    }
    {
        let mut guard = shared.replay_guard();
        if link.sent == 0 {
            guard.admit(stamp.sent_at, opened.nonce_id, unix_ms())?;
        } else {
            // A reply answers our own fresh frame: it cannot have been seen before.
            guard.check_fresh(stamp.sent_at, unix_ms())?;
        }
    }
    let (from, message) = wire::decode(frame, &settings.cluster_name, &settings.limits)?;
    {
        let cluster = shared.cluster();
        let ours = cluster.name();
        if from == ours || stamp.recipient != 0 && stamp.recipient != seal::recipient_tag(ours) {
            return Err(Rejection::Replayed);
        }
        if cluster
            .generation_of(&from)
            .is_some_and(|known| known > stamp.generation)
        {
            return Err(Rejection::Stale);
        }
    }
    link.received = opened.tag;
    link.form = Form::Sealed(opened.key);
    Ok((from, message))
}

/// Responder side of one connection: an exchange, or a push.
pub(crate) async fn serve<T: Transport>(shared: &Shared<T>, conn: T::Connection) {
    let mut link = Link::accepted(conn);
    let Some((_, mut message)) = receive(shared, &mut link).await else {
        return;
    };
    if let Message::CompactSyn {
        membership_hash,
        versions,
    } = &message
    {
        let reply = absorb(shared, |cluster| {
            cluster.handle_compact_syn(*membership_hash, versions, Instant::now())
        });
        if let Some(reply) = reply {
            return answer_syn(shared, link, reply).await;
        }
        if send(shared, &mut link, &Message::NeedDigest).await.is_err() {
            return;
        }
        let Some((_, next)) = receive(shared, &mut link).await else {
            return;
        };
        message = next;
    }
    match message {
        Message::Syn { digest } => {
            let reply = absorb(shared, |cluster| {
                cluster.handle_syn(&digest, Instant::now())
            });
            answer_syn(shared, link, reply).await;
        }
        Message::Suspect {
            name,
            generation,
            heartbeat,
            mut forward_to,
        } => {
            let suspicion = Suspicion {
                name,
                generation,
                heartbeat,
            };
            {
                let mut cluster = shared.cluster();
                cluster.corroborate(&suspicion, Instant::now());
                cluster.retain_live(&mut forward_to);
            }
            forward_suspicion(shared, suspicion, forward_to).await;
        }
        Message::Push {
            mut deltas,
            mut forward_to,
        } => {
            let deltas_to_forward = absorb(shared, |cluster| {
                cluster.retain_plausible(&mut deltas);
                let to_forward = (!forward_to.is_empty()).then(|| deltas.clone());
                cluster.apply_deltas(deltas, Instant::now());
                to_forward
            });
            if let Some(deltas) = deltas_to_forward {
                shared.cluster().retain_live(&mut forward_to);
                push(shared, deltas, forward_to).await;
            }
        }
        _ => shared.counters.reject(Rejection::Unexpected),
    }
}

/// Sends the SynAck, then applies the Ack that ends the exchange.
async fn answer_syn<T: Transport>(
    shared: &Shared<T>,
    mut link: Link<T::Connection>,
    reply: SynReply,
) {
    let SynReply {
        deltas,
        requests,
        heartbeats,
    } = reply;
    if send(
        shared,
        &mut link,
        &Message::SynAck {
            deltas,
            requests,
            heartbeats,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    match receive(shared, &mut link).await {
        Some((_, Message::Ack { deltas })) => {
            absorb(shared, |cluster| {
                cluster.apply_deltas(deltas, Instant::now())
            });
            shared.counters.exchanges.fetch_add(1, Relaxed);
        }
        Some(_) => shared.counters.reject(Rejection::Unexpected),
        None => {}
    }
}

/// Hands what arrived to the cluster, counts what it refused, and wakes the pusher when there is
/// something to broadcast: a change that waited for peers (an exchange may just have brought
/// them), or a new incarnation refuting a claim about us.
fn absorb<T: Transport, R>(shared: &Shared<T>, feed: impl FnOnce(&mut Cluster) -> R) -> R {
    let (result, tally, unpushed) = {
        let mut cluster = shared.cluster();
        let result = feed(&mut cluster);
        (result, cluster.take_tally(), cluster.has_unpushed())
    };
    shared.counters.add(tally);
    if unpushed {
        shared.push_wanted.notify_one();
    }
    result
}

async fn connect<T: Transport>(shared: &Shared<T>, target: &Target) -> Option<Link<T::Connection>> {
    let (address, recipient) = match target {
        Target::Peer(name) => (name.parse().ok(), Some(name.as_str())),
        Target::Seed(seed) => (shared.resolve_seed(seed).await, None),
    };
    match timeout(
        shared.settings.connect_timeout,
        shared.transport.connect(address?),
    )
    .await
    {
        Ok(Ok(connection)) => Some(Link::opened(shared, connection, recipient)),
        _ => {
            shared.counters.connect_failures.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Initiator side of one push-pull exchange: a CompactSyn first when we have one (see
/// `Cluster::compact_digest`), the named digest if not or if the responder's membership differs.
pub(crate) async fn exchange<T: Transport>(
    shared: &Shared<T>,
    target: Target,
    compact: Option<(Arc<Membership>, Vec<u64>)>,
) {
    let Some(mut link) = connect(shared, &target).await else {
        return;
    };
    let (membership, versions) = compact.unzip();
    let mut positions = membership.as_deref();
    let mut response = None;
    if let (Some(membership), Some(versions)) = (positions, versions) {
        let message = Message::CompactSyn {
            membership_hash: membership.hash,
            versions,
        };
        if send(shared, &mut link, &message).await.is_err() {
            return;
        }
        response = receive(shared, &mut link).await;
    }
    if positions.is_none() || matches!(response, Some((_, Message::NeedDigest))) {
        let digest = shared.cluster().digest();
        if send(shared, &mut link, &Message::Syn { digest })
            .await
            .is_err()
        {
            return;
        }
        response = receive(shared, &mut link).await;
        positions = None;
    }
    let reply = match response {
        Some((
            _,
            Message::SynAck {
                deltas,
                requests,
                heartbeats,
            },
        )) => SynReply {
            deltas,
            requests,
            heartbeats,
        },
        Some(_) => return shared.counters.reject(Rejection::Unexpected),
        None => return,
    };
    let answers = absorb(shared, |cluster| {
        cluster.handle_syn_ack(reply, positions, Instant::now())
    });
    if send(shared, &mut link, &Message::Ack { deltas: answers })
        .await
        .is_ok()
    {
        shared.counters.exchanges.fetch_add(1, Relaxed);
    }
}

/// Broadcasts `deltas` to `targets` as a Push.
pub(crate) async fn push<T: Transport>(
    shared: &Shared<T>,
    deltas: Vec<wire::NodeDelta>,
    targets: Vec<String>,
) {
    if deltas.is_empty() {
        return;
    }
    let message = |forward_to| Message::Push {
        deltas: deltas.clone(),
        forward_to,
    };
    broadcast(shared, targets, message).await;
}

/// Sends a message to every node in `targets` along a tree: the targets are split into
/// `push_fanout` shares; the first reachable node of each share gets `message(rest of its
/// share)` to forward, so a broadcast to N nodes takes about log(N) hops. An unreachable node is
/// skipped by its sender, so a dead peer does not cut off its share.
async fn broadcast<T: Transport>(
    shared: &Shared<T>,
    targets: Vec<String>,
    message: impl Fn(Vec<String>) -> Message,
) {
    if targets.is_empty() {
        return;
    }
    let fanout = shared.settings.push_fanout.max(1);
    let share_len = targets.len().div_ceil(fanout);
    let shares = targets.chunks(share_len).map(|share| {
        let message = &message;
        async move {
            for (i, peer) in share.iter().enumerate() {
                let Some(mut link) = connect(shared, &Target::Peer(peer.clone())).await else {
                    continue;
                };
                if send(shared, &mut link, &message(share[i + 1..].to_vec()))
                    .await
                    .is_ok()
                {
                    shared.counters.pushes_sent.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    });
    futures_util::future::join_all(shares).await;
}

/// Tells every live peer about a conviction of ours (see `Cluster::corroborate`).
pub(crate) async fn announce_suspicion<T: Transport>(shared: &Shared<T>, suspicion: Suspicion) {
    let targets = shared.cluster().broadcast_targets(&mut shared.rng());
    forward_suspicion(shared, suspicion, targets).await;
}

async fn forward_suspicion<T: Transport>(
    shared: &Shared<T>,
    suspicion: Suspicion,
    targets: Vec<String>,
) {
    let message = |forward_to| Message::Suspect {
        name: suspicion.name.clone(),
        generation: suspicion.generation,
        heartbeat: suspicion.heartbeat,
        forward_to,
    };
    broadcast(shared, targets, message).await;
}
