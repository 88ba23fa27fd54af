//! One connection's worth of protocol: the initiator and responder sides of a push-pull
//! exchange, the Push tree that broadcasts fresh changes, and the Suspect broadcast. Each
//! function drives the synchronous [`Cluster`](crate::protocol::Cluster) with what arrives and
//! sends what it answers; none holds the cluster lock across an await.
//!
//! With keys, every frame is sealed (see [`crate::seal`]) and bound to its [`Session`] (a
//! connection, or one exchange of datagrams): a frame must answer the last frame we sent in it
//! (nothing, for the first), so a recorded frame cannot be spliced into another exchange, and
//! first frames are remembered for the freshness window.
//! A responder answers in the form of the first frame: sealed under the key it used, or, under
//! `accept_plaintext`, in plaintext.
//!
//! Outgoing connections are free to live peers that have not failed us (see `Reach`); every
//! other attempt (failed or unreachable peers, seeds) is paid from the node's
//! [`ConnectBudget`], and skipped and counted when it is empty. A broadcast share gives up after
//! a few failed attempts, so however many names fail to answer, the node's connection attempts
//! stay bounded.

use crate::datagram::{self, Outcome};
use crate::inbound::{self, Establish};
use crate::node::Shared;
use crate::peers::{Membership, Reach};
use crate::protocol::{unix_ms, Cluster, Recipient, Sent, Suspicion, SynReply, Target};
use crate::seal::{self, Key, Stamp};
use crate::transport::{Connection, Transport};
use crate::wire::{self, Message, Rejection};
use bytes::{Bytes, BytesMut};
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{timeout, Instant};

/// Failed connection attempts after which a broadcast share is given up; anti-entropy brings
/// the change to the rest of it.
const SHARE_FAILURES: usize = 3;

/// A token bucket for connection attempts that are not free: `rate` tokens a second, up to
/// `burst` saved.
pub(crate) struct ConnectBudget {
    rate: f64,
    burst: f64,
    /// Tokens, and when they were counted.
    tokens: Mutex<(f64, Instant)>,
}

impl ConnectBudget {
    /// Four attempts a gossip interval, and at least 16 a second.
    pub(crate) fn new(gossip_interval: Duration) -> Self {
        let rate = (4.0 / gossip_interval.as_secs_f64()).max(16.0);
        ConnectBudget {
            rate,
            burst: 2.0 * rate,
            tokens: Mutex::new((2.0 * rate, Instant::now())),
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (count, at) = *tokens;
        let count =
            (count + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        let taken = count >= 1.0;
        *tokens = (if taken { count - 1.0 } else { count }, now);
        taken
    }
}

/// What the frames of one exchange (a connection, or a few datagrams) have settled so far.
pub(crate) struct Session {
    form: Form,
    /// The tag of the last sealed frame we sent, which the peer's next frame must answer.
    sent: u64,
    /// The tag of the last sealed frame we received, which our next frame answers.
    received: u64,
    /// `seal::recipient_tag` of the node we contacted by name; 0 otherwise.
    recipient: u64,
}

enum Form {
    /// A responder before the first frame, which decides.
    Undecided,
    Plain,
    /// Sealed under this key: our primary when we started the exchange, the peer's key when it
    /// did.
    Sealed(Arc<Key>),
}

impl Session {
    /// An exchange we start with the node named `recipient`, or with a seed address (`None`).
    pub(crate) fn opened<T: Transport>(shared: &Shared<T>, recipient: Option<&str>) -> Self {
        let form = match shared.keys.current().primary() {
            Some(key) => Form::Sealed(key.clone()),
            None => Form::Plain,
        };
        Session {
            form,
            sent: 0,
            received: 0,
            recipient: recipient.map_or(0, seal::recipient_tag),
        }
    }

    /// An exchange the peer starts; its first frame decides the form.
    pub(crate) fn accepted() -> Self {
        Session {
            form: Form::Undecided,
            sent: 0,
            received: 0,
            recipient: 0,
        }
    }

    /// Addresses our frames to the node named `name`, which then alone can take them.
    pub(crate) fn address_to(&mut self, name: &str) {
        self.recipient = seal::recipient_tag(name);
    }

    /// Our next frame carrying `message`: sealed, and stamped to answer the last frame we
    /// received, when the session is sealed.
    pub(crate) fn frame<T: Transport>(&mut self, shared: &Shared<T>, message: &Message) -> Bytes {
        let (name, generation) = {
            let cluster = shared.cluster();
            (cluster.name().to_owned(), cluster.generation())
        };
        let cluster_name = &shared.settings.cluster_name;
        let body = wire::encode(cluster_name, &name, message);
        match &self.form {
            Form::Sealed(key) => {
                let stamp = Stamp {
                    sent_at: unix_ms(),
                    generation,
                    answers: self.received,
                    recipient: self.recipient,
                };
                let (sealed, tag) =
                    seal::seal(key, cluster_name, &stamp, seal::random_nonce(), &body);
                self.sent = tag;
                Bytes::from(sealed)
            }
            Form::Plain | Form::Undecided => body,
        }
    }

    /// Checks a frame that arrived in this session (`opened` when it was sealed, see [`open`])
    /// against what the session settled: the same form, an answer to our last frame, a first
    /// frame never seen before, for us, from a current incarnation of `from`.
    pub(crate) fn settle<T: Transport>(
        &mut self,
        shared: &Shared<T>,
        opened: Option<seal::Opened>,
        from: &str,
    ) -> Result<(), Rejection> {
        let Some(opened) = opened else {
            if matches!(self.form, Form::Sealed(_)) {
                return Err(Rejection::Plaintext);
            }
            if !shared.keys.current().is_empty() {
                shared.counters.plaintext_accepted.fetch_add(1, Relaxed);
            }
            self.form = Form::Plain;
            return Ok(());
        };
        if matches!(self.form, Form::Plain) {
            return Err(Rejection::Unexpected);
        }
        let stamp = opened.stamp;
        if stamp.answers != self.sent {
            return Err(Rejection::Replayed);
        }
        {
            let mut guard = shared.replay_guard();
            if self.sent == 0 {
                guard.admit(stamp.sent_at, opened.nonce_id, unix_ms())?;
            } else {
                // A reply answers our own fresh frame: it cannot have been seen before.
                guard.check_fresh(stamp.sent_at, unix_ms())?;
            }
        }
        {
            let cluster = shared.cluster();
            let ours = cluster.name();
            if from == ours || stamp.recipient != 0 && stamp.recipient != seal::recipient_tag(ours)
            {
                return Err(Rejection::Replayed);
            }
            if cluster
                .generation_of(from)
                .is_some_and(|known| known > stamp.generation)
            {
                return Err(Rejection::Stale);
            }
        }
        self.received = opened.tag;
        self.form = Form::Sealed(opened.key);
        Ok(())
    }
}

/// Opens a sealed frame in place (`Some`, with what its seal says), or lets a plaintext one
/// through (`None`) when we have no keys or accept plaintext; which session it belongs to
/// checks the rest (see [`Session::settle`]).
pub(crate) fn open<T: Transport>(
    shared: &Shared<T>,
    frame: &mut BytesMut,
) -> Result<Option<seal::Opened>, Rejection> {
    if !seal::is_sealed(frame) {
        if !shared.keys.current().is_empty() && !shared.settings.accept_plaintext {
            return Err(Rejection::Plaintext);
        }
        return Ok(None);
    }
    seal::open(&shared.keys.current(), &shared.settings.cluster_name, frame).map(Some)
}

/// One connection and its session.
pub(crate) struct Link<C> {
    conn: C,
    session: Session,
}

/// Sends one message; a send that does not complete within `idle_timeout` fails.
async fn send<T: Transport>(
    shared: &Shared<T>,
    link: &mut Link<T::Connection>,
    message: &Message,
) -> io::Result<()> {
    let frame = link.session.frame(shared, message);
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

/// The next message and its sender, or None when the peer closed, or sent something we drop,
/// or did not deliver a whole frame within `idle_timeout`.
async fn receive<T: Transport>(
    shared: &Shared<T>,
    link: &mut Link<T::Connection>,
) -> Option<(String, Message)> {
    let counters = &shared.counters;
    let mut frame = match timeout(shared.settings.idle_timeout, link.conn.recv()).await {
        Ok(Some(Ok(frame))) => frame,
        Ok(Some(Err(error))) => {
            counters.reject(match error.kind() {
                io::ErrorKind::InvalidData => Rejection::Oversized,
                io::ErrorKind::OutOfMemory => Rejection::FrameBudget,
                _ => Rejection::Malformed,
            });
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            counters.reject(Rejection::TimedOut);
            return None;
        }
    };
    counters.messages_received.fetch_add(1, Relaxed);
    counters
        .bytes_received
        .fetch_add(frame.len() as u64 + 4, Relaxed);
    match take(shared, &mut link.session, &mut frame) {
        Ok(message) => Some(message),
        Err(reason) => {
            counters.reject(reason);
            None
        }
    }
}

/// Opens (when sealed), decodes and checks one frame that arrived in `session`.
fn take<T: Transport>(
    shared: &Shared<T>,
    session: &mut Session,
    frame: &mut BytesMut,
) -> Result<(String, Message), Rejection> {
    let opened = open(shared, frame)?;
    let settings = &shared.settings;
    let (from, message) = wire::decode(frame, &settings.cluster_name, &settings.limits)?;
    session.settle(shared, opened, &from)?;
    Ok((from, message))
}

/// Responder side of one connection: an exchange, or a push. `slot` is the connection's
/// inbound slot; it is given back before any forwarding, which needs no connection of ours.
pub(crate) async fn serve<T: Transport>(
    shared: &Shared<T>,
    conn: T::Connection,
    mut slot: inbound::Slot,
) {
    let mut link = Link {
        conn,
        session: Session::accepted(),
    };
    let Some((from, mut message)) = receive(shared, &mut link).await else {
        return;
    };
    let known = shared.cluster().is_live_peer(&from);
    match slot.establish(known) {
        Establish::Established => {}
        // Counted when it was taken back.
        Establish::TakenBack => return,
        Establish::NoRoom => return shared.counters.reject(Rejection::InboundFull),
    }
    let compact = match &message {
        Message::CompactSyn {
            membership_hash,
            versions,
        } => Some(absorb(shared, |cluster| {
            cluster.handle_compact_syn(*membership_hash, versions, &from, Instant::now())
        })),
        Message::CompactSynRange {
            membership_hash,
            offset,
            versions,
        } => Some(absorb(shared, |cluster| {
            let now = Instant::now();
            cluster.handle_compact_syn_range(*membership_hash, *offset, versions, &from, now)
        })),
        _ => None,
    };
    if let Some(reply) = compact {
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
                cluster.handle_syn(&digest, &from, Instant::now())
            });
            answer_syn(shared, link, reply).await;
        }
        Message::Suspect {
            name,
            generation,
            heartbeat,
            forward_to,
        } => {
            drop((link, slot));
            let suspicion = Suspicion {
                name,
                generation,
                heartbeat,
            };
            let recipients = absorb(shared, |cluster| {
                let now = Instant::now();
                cluster.heard_from(&from, now);
                cluster.corroborate(&suspicion, now);
                cluster.recipients(forward_to, now)
            });
            forward_suspicion(shared, suspicion, recipients).await;
        }
        Message::Push {
            mut deltas,
            forward_to,
        } => {
            drop((link, slot));
            let forwarding = absorb(shared, |cluster| {
                cluster.retain_plausible(&mut deltas);
                let to_forward = (!forward_to.is_empty()).then(|| deltas.clone());
                cluster.apply_deltas(deltas, &from, Instant::now());
                to_forward.map(|deltas| (deltas, cluster.recipients(forward_to, Instant::now())))
            });
            if let Some((deltas, recipients)) = forwarding {
                push(shared, deltas, recipients).await;
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
        Some((from, Message::Ack { deltas })) => {
            absorb(shared, |cluster| {
                cluster.apply_deltas(deltas, &from, Instant::now())
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
pub(crate) fn absorb<T: Transport, R>(
    shared: &Shared<T>,
    feed: impl FnOnce(&mut Cluster) -> R,
) -> R {
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

/// Opens a connection to `target`. Unless the contact is `free`, it takes a token of the
/// connection budget first, and is skipped (and counted) when there is none.
async fn connect<T: Transport>(
    shared: &Shared<T>,
    target: &Target,
    free: bool,
) -> Option<Link<T::Connection>> {
    if !free && !shared.connect_budget.try_take() {
        shared.counters.connects_skipped.fetch_add(1, Relaxed);
        return None;
    }
    let (address, recipient) = match target {
        Target::Peer(name) => (name.parse().ok(), Some(name.as_str())),
        Target::Seed(seed) => (shared.resolve_seed(seed).await, None),
    };
    let connected = timeout(
        shared.settings.connect_timeout,
        shared.transport.connect(address?),
    )
    .await;
    match connected {
        Ok(Ok(conn)) => Some(Link {
            conn,
            session: Session::opened(shared, recipient),
        }),
        _ => {
            shared.counters.connect_failures.fetch_add(1, Relaxed);
            unreachable(shared, target);
            None
        }
    }
}

fn unreachable<T: Transport>(shared: &Shared<T>, target: &Target) {
    if let Target::Peer(name) = target {
        shared.cluster().note_unreachable(name);
    }
}

/// Initiator side of one push-pull exchange: a compact digest (a CompactSyn or
/// CompactSynRange, built on the membership that comes with it) first when we have one (see
/// `Cluster::compact_digest`), the named digest if not or if the responder's membership differs.
/// A compact digest to a live peer goes by datagram when it fits (see [`crate::datagram`]); the
/// exchange takes a connection only when that does not complete it.
pub(crate) async fn exchange<T: Transport>(
    shared: &Shared<T>,
    target: Target,
    free: bool,
    compact: Option<(Arc<Membership>, Message)>,
) {
    if let (Target::Peer(name), Some((membership, message))) = (&target, &compact) {
        if let Some(datagrams) = shared.datagrams() {
            let outcome = datagram::exchange(shared, &datagrams, name, membership, message).await;
            if outcome == Outcome::Done {
                return;
            }
        }
    }
    let Some(mut link) = connect(shared, &target, free).await else {
        return;
    };
    let (membership, message) = compact.unzip();
    let mut response = None;
    if let Some(message) = message {
        if send(shared, &mut link, &message).await.is_err() {
            return;
        }
        response = receive(shared, &mut link).await;
    }
    let mut digest = None;
    if membership.is_none() || matches!(response, Some((_, Message::NeedDigest))) {
        let syn = Message::Syn {
            digest: shared.cluster().syn_digest(),
        };
        if send(shared, &mut link, &syn).await.is_err() {
            return;
        }
        response = receive(shared, &mut link).await;
        let Message::Syn { digest: sent } = syn else {
            unreachable!("built above")
        };
        digest = Some(sent);
    }
    // What the SynAck's heartbeats index into.
    let sent = match (&digest, membership.as_deref()) {
        (None, Some(membership)) => Sent::Compact(membership),
        (digest, _) => Sent::Digest(digest.as_deref().unwrap_or_default()),
    };
    let (from, reply) = match response {
        Some((
            from,
            Message::SynAck {
                deltas,
                requests,
                heartbeats,
            },
        )) => (
            from,
            SynReply {
                deltas,
                requests,
                heartbeats,
            },
        ),
        Some(_) => {
            unreachable(shared, &target);
            return shared.counters.reject(Rejection::Unexpected);
        }
        None => return unreachable(shared, &target),
    };
    let answers = absorb(shared, |cluster| {
        cluster.handle_syn_ack(reply, sent, &from, Instant::now())
    });
    if send(shared, &mut link, &Message::Ack { deltas: answers })
        .await
        .is_ok()
    {
        shared.counters.exchanges.fetch_add(1, Relaxed);
    }
}

/// Broadcasts `deltas` to `recipients` as a Push.
pub(crate) async fn push<T: Transport>(
    shared: &Shared<T>,
    deltas: Vec<wire::NodeDelta>,
    recipients: Vec<Recipient>,
) {
    if deltas.is_empty() {
        return;
    }
    let message = |forward_to| Message::Push {
        deltas: deltas.clone(),
        forward_to,
    };
    broadcast(shared, recipients, message).await;
}

/// Sends a message to every node in `recipients` along a tree. The recipients are dealt into
/// at least `push_fanout` shares (more when one share's names would not fit in a message), the
/// first recipients, those our connections reached, heading the shares; the first reachable
/// node of each share gets `message(rest of its share)` to forward, so a broadcast to N nodes
/// takes about log(N) hops. An unreachable node is skipped by its sender, so a dead peer does not
/// cut off its share; a node we may not contact for want of budget is handed on in the list.
async fn broadcast<T: Transport>(
    shared: &Shared<T>,
    recipients: Vec<Recipient>,
    message: impl Fn(Vec<String>) -> Message,
) {
    if recipients.is_empty() {
        return;
    }
    let settings = &shared.settings;
    let names_bytes: usize = recipients.iter().map(|r| wire::name_bytes(&r.name)).sum();
    let share_count = settings
        .push_fanout
        .max(recipients.len().div_ceil(settings.entries_per_message()))
        .max(names_bytes.div_ceil(settings.forward_room()))
        .min(recipients.len());
    let mut shares: Vec<Vec<Recipient>> = vec![Vec::new(); share_count];
    for (i, recipient) in recipients.into_iter().enumerate() {
        shares[i % share_count].push(recipient);
    }
    let walks = shares.into_iter().map(|share| {
        let message = &message;
        async move {
            let mut handed_on: Vec<String> = Vec::new();
            let mut failures = 0;
            for (i, recipient) in share.iter().enumerate() {
                let free = recipient.reach != Reach::Unreachable;
                let target = Target::Peer(recipient.name.clone());
                let Some(mut link) = connect(shared, &target, free).await else {
                    if free {
                        failures += 1;
                        if failures == SHARE_FAILURES {
                            return;
                        }
                    } else {
                        handed_on.push(recipient.name.clone());
                    }
                    continue;
                };
                let rest = handed_on
                    .drain(..)
                    .chain(share[i + 1..].iter().map(|r| r.name.clone()))
                    .collect();
                if send(shared, &mut link, &message(rest)).await.is_ok() {
                    shared.counters.pushes_sent.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    });
    futures_util::future::join_all(walks).await;
}

/// Tells every live peer about a conviction of ours (see `Cluster::corroborate`).
pub(crate) async fn announce_suspicion<T: Transport>(shared: &Shared<T>, suspicion: Suspicion) {
    let targets = shared
        .cluster()
        .broadcast_targets(Instant::now(), &mut shared.rng());
    forward_suspicion(shared, suspicion, targets).await;
}

async fn forward_suspicion<T: Transport>(
    shared: &Shared<T>,
    suspicion: Suspicion,
    recipients: Vec<Recipient>,
) {
    let message = |forward_to| Message::Suspect {
        name: suspicion.name.clone(),
        generation: suspicion.generation,
        heartbeat: suspicion.heartbeat,
        forward_to,
    };
    broadcast(shared, recipients, message).await;
}

#[cfg(test)]
mod tests {
    //! Replays against live keyed nodes on the in-memory network, under tokio's paused clock:
    //! every frame the cluster sent is recorded, then played again by an attacker without the
    //! key, to every node and into live exchanges. None may change anything.

    use super::*;
    use crate::config::Settings;
    use crate::node::{Listen, Node};
    use crate::protocol::{Event, EventSink};
    use crate::seal::{Keyring, Keys, KEY_BYTES};
    use crate::transport::{
        Datagram, Listener, MemConnection, MemDatagram, MemListener, MemNetwork, MemTransport,
    };
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Mutex;
    use std::time::Duration;
    use zeroize::Zeroizing;

    const KEY: [u8; KEY_BYTES] = [7; KEY_BYTES];

    /// Every frame one host sent, in order.
    type Tape = Arc<Mutex<Vec<Bytes>>>;

    /// A host's transport that records every frame its connections send.
    #[derive(Clone)]
    struct Taped {
        host: MemTransport,
        tape: Tape,
    }

    struct TapedConnection {
        inner: MemConnection,
        tape: Tape,
    }

    struct TapedListener {
        inner: MemListener,
        tape: Tape,
    }

    struct TapedDatagram {
        inner: MemDatagram,
        tape: Tape,
    }

    impl Datagram for TapedDatagram {
        async fn send_to(&self, datagram: Bytes, to: SocketAddr) -> io::Result<()> {
            self.tape.lock().unwrap().push(datagram.clone());
            self.inner.send_to(datagram, to).await
        }

        async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            self.inner.recv_from(buffer).await
        }
    }

    impl Transport for Taped {
        type Connection = TapedConnection;
        type Listener = TapedListener;
        type Datagram = TapedDatagram;

        fn bind(&self, address: SocketAddr) -> io::Result<TapedListener> {
            Ok(TapedListener {
                inner: self.host.bind(address)?,
                tape: self.tape.clone(),
            })
        }

        fn bind_datagram(&self, address: SocketAddr) -> io::Result<TapedDatagram> {
            Ok(TapedDatagram {
                inner: self.host.bind_datagram(address)?,
                tape: self.tape.clone(),
            })
        }

        async fn connect(&self, address: SocketAddr) -> io::Result<TapedConnection> {
            Ok(TapedConnection {
                inner: self.host.connect(address).await?,
                tape: self.tape.clone(),
            })
        }

        async fn resolve(&self, host_port: &str) -> io::Result<Vec<SocketAddr>> {
            self.host.resolve(host_port).await
        }

        fn route_to(&self, remote: IpAddr) -> Option<IpAddr> {
            self.host.route_to(remote)
        }

        fn host_addresses(&self) -> Vec<IpAddr> {
            self.host.host_addresses()
        }
    }

    impl Listener for TapedListener {
        type Connection = TapedConnection;

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }

        async fn accept(&mut self) -> io::Result<TapedConnection> {
            Ok(TapedConnection {
                inner: self.inner.accept().await?,
                tape: self.tape.clone(),
            })
        }
    }

    impl Connection for TapedConnection {
        async fn send(&mut self, frame: Bytes) -> io::Result<()> {
            self.tape.lock().unwrap().push(frame.clone());
            self.inner.send(frame).await
        }

        async fn recv(&mut self) -> Option<io::Result<BytesMut>> {
            self.inner.recv().await
        }

        fn remote_ip(&self) -> IpAddr {
            self.inner.remote_ip()
        }
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<String>>);

    impl EventSink for Events {
        fn emit(&self, event: Event<'_>) {
            self.0.lock().unwrap().push(format!("{event:?}"));
        }
    }

    struct Member {
        node: Node<Taped>,
        name: String,
        tape: Tape,
        events: Arc<Events>,
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn listen(n: u8) -> Listen {
        Listen {
            port: 9000,
            address: Some(ip(n)),
            advertise: None,
        }
    }

    /// A keyed node at 10.0.0.n:9000, started.
    fn member(net: &MemNetwork, n: u8, seeds: &[&str]) -> Member {
        let tape = Tape::default();
        let events = Arc::new(Events::default());
        let transport = Taped {
            host: net.host(ip(n)),
            tape: tape.clone(),
        };
        let node = Node::with_transport(
            Settings::default(),
            seeds.iter().map(|s| s.to_string()).collect(),
            events.clone(),
            transport,
            Some(n as u64),
        )
        .with_keys(Keys::new(vec![Zeroizing::new(KEY)]));
        node.start(&listen(n)).unwrap();
        Member {
            node,
            name: format!("10.0.0.{n}:9000"),
            tape,
            events,
        }
    }

    /// What a node knows, heartbeats and phi aside (time passes while it is compared).
    fn knowledge(member: &Member) -> Vec<String> {
        let peers = member.node.peer_infos();
        member.node.with_cluster(|cluster| {
            peers
                .into_iter()
                .map(|p| {
                    let values: Vec<_> = cluster
                        .node_keys(&p.name)
                        .iter()
                        .map(|k| (k.clone(), cluster.node_value(&p.name, k).cloned()))
                        .collect();
                    format!(
                        "{} g{} v{} live {} left {} {values:?}",
                        p.name, p.generation, p.max_version, p.live, p.left
                    )
                })
                .collect()
        })
    }

    /// A recorded frame as the test (which has the key) reads it.
    struct Recorded {
        bytes: Bytes,
        kind: &'static str,
        stamp: Stamp,
        from: String,
        /// A Push announcing its sender's departure.
        leave: bool,
    }

    fn read(bytes: &Bytes) -> Recorded {
        let keyring: Arc<Keyring> = Keys::new(vec![Zeroizing::new(KEY)]).current();
        let mut frame = BytesMut::from(&bytes[..]);
        let opened = seal::open(&keyring, "gossiper", &mut frame).expect("a frame of ours");
        let (from, message) =
            wire::decode(&frame, "gossiper", &wire::Limits::default()).expect("decodes");
        let leave = matches!(&message, Message::Push { deltas, .. }
            if deltas.iter().any(|d| d.left && d.name == from));
        let kind = match message {
            Message::Syn { .. } => "Syn",
            Message::CompactSyn { .. } => "CompactSyn",
            Message::CompactSynRange { .. } => "CompactSynRange",
            Message::NeedDigest => "NeedDigest",
            Message::SynAck { .. } => "SynAck",
            Message::Ack { .. } => "Ack",
            Message::Push { .. } => "Push",
            Message::Suspect { .. } => "Suspect",
        };
        Recorded {
            bytes: bytes.clone(),
            kind,
            stamp: opened.stamp,
            from,
            leave,
        }
    }

    fn recorded(members: &[&Member]) -> Vec<Recorded> {
        members
            .iter()
            .flat_map(|m| m.tape.lock().unwrap().clone())
            .map(|bytes| read(&bytes))
            .collect()
    }

    /// Sends `frame` on a new connection from the attacker's host, then waits for the node's
    /// answer, if any, or for it to close the connection.
    async fn play(attacker: &MemTransport, to: &str, frame: &Bytes) -> Option<BytesMut> {
        let mut conn = attacker.connect(to.parse().unwrap()).await.unwrap();
        conn.send(frame.clone()).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(1), conn.recv()).await {
            Ok(Some(Ok(reply))) => Some(reply),
            _ => None,
        }
    }

    fn refused(member: &Member) -> u64 {
        let counters = member.node.counters();
        counters.rejected(Rejection::Replayed) + counters.rejected(Rejection::Stale)
    }

    /// Four nodes gossip, write, one leaves and comes back as a new incarnation, one is killed
    /// and convicted; every frame of all that is then replayed to the two nodes that lived
    /// through it all. Each replay is refused, except a digest sent to a seed address (not
    /// bound to a node name) replayed to another node, which only earns a sealed answer the
    /// attacker cannot read. Nothing any node knows changes, and no event fires.
    #[tokio::test(start_paused = true)]
    async fn every_recorded_frame_replayed_to_every_node_changes_nothing() {
        let net = MemNetwork::new(1, 4 << 20);
        let seed = "10.0.0.1:9000";
        let a = member(&net, 1, &[]);
        let b = member(&net, 2, &[seed]);
        let c = member(&net, 3, &[seed]);
        let d = member(&net, 4, &[seed]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(a.node.with_cluster(|cl| cl.peer_names(Some(true))).len(), 3);

        a.node
            .set_local("k", Bytes::from_static(&[0xa1, b'v']), None)
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.node.stop().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.node.start(&listen(3)).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let d_tape = d.tape.clone();
        drop(d.node);
        tokio::time::sleep(Duration::from_secs(40)).await;

        let live: BTreeSet<String> = a
            .node
            .with_cluster(|cl| cl.peer_names(Some(true)).into_iter().collect());
        assert_eq!(
            live,
            BTreeSet::from([b.name.clone(), c.name.clone()]),
            "D convicted, C back"
        );
        let mut frames = recorded(&[&a, &b, &c]);
        frames.extend(d_tape.lock().unwrap().iter().map(read));
        let kinds: BTreeSet<&str> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "Ack",
                "CompactSyn",
                "NeedDigest",
                "Push",
                "Suspect",
                "Syn",
                "SynAck"
            ]),
            "every message kind was recorded"
        );
        assert!(frames.iter().any(|f| f.leave), "C's departure was recorded");

        let attacker = net.host(ip(9));
        for target in [&a, &b] {
            let before = knowledge(target);
            target.events.0.lock().unwrap().clear();
            let mut answered = 0;
            for frame in &frames {
                let refused_before = refused(target);
                let reply = play(&attacker, &target.name, &frame.bytes).await;
                let unbound_digest = frame.stamp.recipient == 0
                    && frame.stamp.answers == 0
                    && target.name != seed
                    && frame.from != target.name
                    && frame.kind == "CompactSyn";
                let old_c = frame.from == c.name
                    && frame.stamp.generation < c.node.with_cluster(|cl| cl.generation());
                if unbound_digest && !old_c {
                    answered += 1;
                    let reply = reply.expect("a digest is answered");
                    assert!(seal::is_sealed(&reply), "and the answer is sealed");
                } else {
                    assert!(
                        reply.is_none(),
                        "{} from {} answered",
                        frame.kind,
                        frame.from
                    );
                    assert_eq!(
                        refused(target),
                        refused_before + 1,
                        "{} from {} ({:?}) was not refused by {}",
                        frame.kind,
                        frame.from,
                        frame.stamp,
                        target.name
                    );
                }
            }
            assert_eq!(knowledge(target), before, "{} changed", target.name);
            assert_eq!(*target.events.0.lock().unwrap(), Vec::<String>::new());
            assert!(
                answered < frames.len() / 10,
                "{answered} of {} answered",
                frames.len()
            );
        }
    }

    /// The next connection A opens to the attacker, and its first frame.
    async fn next_from_a(listener: &mut MemListener) -> (MemConnection, Bytes) {
        let mut conn = listener.accept().await.unwrap();
        let opener = conn.recv().await.unwrap().unwrap().freeze();
        (conn, opener)
    }

    /// The attacker sits at A's seed address, between A and B: it relays one exchange honestly
    /// (so the way is open), then answers A's fresh frames with recorded ones of every kind, and
    /// ends exchanges it relayed to B with recorded ones. Each spliced frame is refused, and
    /// neither node learns or reports anything from them.
    #[tokio::test(start_paused = true)]
    async fn recorded_frames_spliced_into_live_exchanges_are_refused() {
        let net = MemNetwork::new(2, 4 << 20);
        let attacker_address = "10.0.0.9:9000";
        let a = member(&net, 1, &[attacker_address]);
        let b = member(&net, 2, &["10.0.0.1:9000"]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let frames = recorded(&[&a, &b]);
        let kinds: BTreeSet<&str> = frames.iter().map(|f| f.kind).collect();
        assert!(
            kinds.is_superset(&BTreeSet::from([
                "Ack",
                "CompactSyn",
                "NeedDigest",
                "Syn",
                "SynAck"
            ])),
            "{kinds:?}"
        );
        let mut one_of_each: Vec<&Recorded> = Vec::new();
        for frame in &frames {
            if !one_of_each
                .iter()
                .any(|f| f.kind == frame.kind && f.from == frame.from)
            {
                one_of_each.push(frame);
            }
        }

        let attacker = net.host(ip(9));
        let mut listener = attacker.bind(attacker_address.parse().unwrap()).unwrap();
        let wait = Duration::from_secs(1);

        // Honest relay: the exchange completes through the attacker, nothing refused.
        let total_refused = |m: &Member| {
            Rejection::ALL
                .iter()
                .map(|&r| m.node.counters().rejected(r))
                .sum::<u64>()
        };
        let (mut from_a, opener) = next_from_a(&mut listener).await;
        let mut to_b = attacker.connect(b.name.parse().unwrap()).await.unwrap();
        to_b.send(opener).await.unwrap();
        let mut relayed = vec![];
        loop {
            let Ok(Some(Ok(reply))) = tokio::time::timeout(wait, to_b.recv()).await else {
                break;
            };
            relayed.push(read(&reply.clone().freeze()).kind);
            from_a.send(reply.freeze()).await.unwrap();
            let Ok(Some(Ok(next))) = tokio::time::timeout(wait, from_a.recv()).await else {
                break;
            };
            relayed.push(read(&next.clone().freeze()).kind);
            to_b.send(next.freeze()).await.unwrap();
        }
        assert_eq!(relayed, ["SynAck", "Ack"]);
        assert_eq!(total_refused(&a) + total_refused(&b), 0);

        let before = (knowledge(&a), knowledge(&b));
        for spliced in one_of_each {
            // Into A, which opened the exchange and waits for its answer.
            let refused_before = a.node.counters().rejected(Rejection::Replayed);
            let (mut from_a, _) = next_from_a(&mut listener).await;
            from_a.send(spliced.bytes.clone()).await.unwrap();
            let reply = tokio::time::timeout(wait, from_a.recv()).await;
            assert!(
                matches!(reply, Ok(None)),
                "A answered a spliced {}",
                spliced.kind
            );
            assert_eq!(
                a.node.counters().rejected(Rejection::Replayed),
                refused_before + 1,
                "A took a spliced {}",
                spliced.kind
            );

            // Into B, which answered A's fresh frame and waits for the next one.
            let refused_before = b.node.counters().rejected(Rejection::Replayed);
            let (_, opener) = next_from_a(&mut listener).await;
            let mut to_b = attacker.connect(b.name.parse().unwrap()).await.unwrap();
            to_b.send(opener).await.unwrap();
            assert!(
                tokio::time::timeout(wait, to_b.recv())
                    .await
                    .is_ok_and(|r| r.is_some()),
                "B answers A's fresh frame"
            );
            to_b.send(spliced.bytes.clone()).await.unwrap();
            let reply = tokio::time::timeout(wait, to_b.recv()).await;
            assert!(
                matches!(reply, Ok(None)),
                "B answered a spliced {}",
                spliced.kind
            );
            assert_eq!(
                b.node.counters().rejected(Rejection::Replayed),
                refused_before + 1,
                "B took a spliced {}",
                spliced.kind
            );
        }
        assert_eq!((knowledge(&a), knowledge(&b)), before);
        for member in [&a, &b] {
            assert_eq!(
                *member.events.0.lock().unwrap(),
                [format!(
                    "NewPeer({:?})",
                    if member.name == a.name {
                        &b.name
                    } else {
                        &a.name
                    }
                )]
            );
        }
    }
}
