//! A running gossip node: the tokio tasks that move [`protocol`](crate::protocol) messages over
//! TCP. One process-wide runtime serves every node, off the JavaScript thread.
//!
//! Each started node owns three tasks (accept, gossip rounds, pushes) plus one per connection,
//! all tracked by one [`TaskTracker`] and stopped by one [`CancellationToken`]; `stop` returns
//! only once every one of them has ended. The cluster state sits behind a std mutex that is never
//! held across an await.

use crate::config::Settings;
use crate::peers::Membership;
use crate::protocol::{Cluster, EventSink, PeerInfo, Suspicion, SynReply, Target};
use crate::wire::{self, Message, Rejection};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The runtime every node in the process shares; two workers suit gossip's light, bursty load.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads())
            .thread_name("gossiper")
            .enable_all()
            .build()
            // Without threads or timers no node can run: nothing sensible to fall back to.
            .expect("cannot start the gossiper runtime")
    })
}

/// `GOSSIPER_WORKER_THREADS` if set, else the smaller of 2 and the number of cores: gossip is
/// light work, and fewer threads mean fewer cross-thread wake-ups per message.
fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var("GOSSIPER_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(cores.min(2))
}

/// A generation strictly above every earlier one of this process, and (clock permitting) of any
/// earlier process: milliseconds since the Unix epoch.
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut last = LAST.load(Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Relaxed, Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Monotonic counters, readable while the node runs.
#[derive(Default)]
pub struct Counters {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub exchanges: AtomicU64,
    pub pushes_sent: AtomicU64,
    pub connect_failures: AtomicU64,
    pub connections_refused: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl Counters {
    pub fn reject(&self, reason: Rejection) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected[reason as usize].load(Relaxed)
    }
}

/// Why `start` failed, with the Node-style code the binding reports.
#[derive(Debug)]
pub struct StartError {
    pub code: &'static str,
    pub message: String,
}

impl StartError {
    fn from_io(error: io::Error, what: &str) -> Self {
        let code = match error.kind() {
            io::ErrorKind::AddrInUse => "EADDRINUSE",
            io::ErrorKind::AddrNotAvailable => "EADDRNOTAVAIL",
            io::ErrorKind::PermissionDenied => "EACCES",
            _ => "ERR_GOSSIP_START",
        };
        StartError {
            code,
            message: format!("{what}: {error}"),
        }
    }
}

/// Where to listen and what to call ourselves.
#[derive(Clone, Debug)]
pub struct Listen {
    pub port: u16,
    /// Bind and advertise this address. Without it the node listens on every interface and
    /// advertises the address it would use to reach its first seed (loopback without seeds).
    pub address: Option<IpAddr>,
}

struct Shared {
    settings: Arc<Settings>,
    cluster: Mutex<Cluster>,
    counters: Counters,
    seeds: Vec<String>,
    /// Wakes the push task when local or relayed changes are waiting.
    push_wanted: Notify,
}

impl Shared {
    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Running {
    /// Cancelled by `stop`; every task of this incarnation watches it.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

pub struct Node {
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
    stopped_at: Mutex<Option<Instant>>,
    /// The port of the last incarnation: a node asked for any port keeps its name across
    /// restarts when that port is still free.
    last_port: AtomicU64,
}

impl Node {
    pub fn new(settings: Settings, seeds: Vec<String>, sink: Arc<dyn EventSink>) -> Self {
        let settings = Arc::new(settings);
        Node {
            shared: Arc::new(Shared {
                cluster: Mutex::new(Cluster::new(settings.clone(), sink)),
                settings,
                counters: Counters::default(),
                seeds,
                push_wanted: Notify::new(),
            }),
            running: Mutex::new(None),
            stopped_at: Mutex::new(None),
            last_port: AtomicU64::new(0),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Binds, then starts gossiping under a new generation. Returns the advertised name.
    pub fn start(&self, listen: &Listen) -> Result<String, StartError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_some() {
            return Err(StartError {
                code: "ERR_GOSSIP_RUNNING",
                message: "already started".into(),
            });
        }
        let last_port = self.last_port.load(Relaxed) as u16;
        let std_listener = match (listen.port, last_port) {
            (0, 1..) => bind(&Listen {
                port: last_port,
                ..listen.clone()
            })
            .or_else(|_| bind(listen)),
            _ => bind(listen),
        }
        .map_err(|e| StartError::from_io(e, "cannot listen"))?;
        let port = std_listener
            .local_addr()
            .map_err(|e| StartError::from_io(e, "cannot listen"))?
            .port();
        self.last_port.store(port as u64, Relaxed);
        let ip = listen
            .address
            .unwrap_or_else(|| advertised_ip(&self.shared.seeds));
        let name = SocketAddr::new(ip, port).to_string();

        let _guard = runtime().enter();
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| StartError::from_io(e, "cannot listen"))?;
        let stopped_for = self
            .stopped_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map_or(Duration::ZERO, |at| at.elapsed());
        self.shared
            .cluster()
            .begin_incarnation(name.clone(), next_generation(), stopped_for);

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            self.shared.clone(),
            listener,
            cancel.clone(),
            tasks.clone(),
        ));
        tasks.spawn(gossip_loop(
            self.shared.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
        tasks.spawn(push_loop(self.shared.clone(), cancel.clone()));
        *running = Some(Running { cancel, tasks });
        Ok(name)
    }

    /// Announces the departure to a few peers (bounded by the connect timeout), then ends every
    /// task. Local state is kept for the next `start`.
    pub async fn stop(&self) {
        let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let deltas = {
            let mut cluster = self.shared.cluster();
            cluster.leave();
            cluster.take_unpushed()
        };
        let targets = self
            .shared
            .cluster()
            .broadcast_targets(&mut SmallRng::from_entropy());
        let announce = push(&self.shared, deltas, targets);
        let _ = timeout(self.shared.settings.connect_timeout, announce).await;
        running.cancel.cancel();
        running.tasks.close();
        running.tasks.wait().await;
        *self.stopped_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Writes a local key and pushes it at once if running. False when nothing changed.
    pub fn set_local(&self, key: &str, value: Bytes) -> Result<bool, Rejection> {
        wire::check_key_value(key, &value, &self.shared.settings.limits)?;
        let changed = self.shared.cluster().set_local(key, value);
        if changed {
            self.shared.push_wanted.notify_one();
        }
        Ok(changed)
    }

    pub fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.shared.cluster())
    }

    pub fn peer_infos(&self) -> Vec<PeerInfo> {
        self.shared.cluster().peer_infos(Instant::now())
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(running) = self
            .running
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            running.cancel.cancel();
        }
    }
}

fn bind(listen: &Listen) -> io::Result<StdListener> {
    let listener = match listen.address {
        Some(ip) => StdListener::bind((ip, listen.port))?,
        // Dual-stack where the host has IPv6, so both 127.0.0.1 and ::1 reach us.
        None => StdListener::bind((Ipv6Addr::UNSPECIFIED, listen.port))
            .or_else(|_| StdListener::bind((Ipv4Addr::UNSPECIFIED, listen.port)))?,
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The local address the kernel would route from toward the first seed given as an IP address.
/// Connecting a UDP socket sends nothing; it only picks the route.
fn advertised_ip(seeds: &[String]) -> IpAddr {
    let seed = seeds.iter().find_map(|s| s.parse::<SocketAddr>().ok());
    let Some(seed) = seed else {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    };
    if seed.ip().is_loopback() {
        return seed.ip();
    }
    let local = if seed.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    UdpSocket::bind(local)
        .and_then(|socket| {
            socket.connect(seed)?;
            socket.local_addr()
        })
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip())
}

type Connection = Framed<TcpStream, LengthDelimitedCodec>;

async fn send(shared: &Shared, conn: &mut Connection, message: &Message) -> io::Result<()> {
    let name = shared.cluster().name().to_owned();
    let frame = wire::encode(&shared.settings.cluster_name, &name, message);
    shared.counters.messages_sent.fetch_add(1, Relaxed);
    shared
        .counters
        .bytes_sent
        .fetch_add(frame.len() as u64 + 4, Relaxed);
    conn.send(frame).await
}

/// The next message, or None when the peer closed, timed out or sent something we drop.
async fn receive(shared: &Shared, conn: &mut Connection) -> Option<(String, Message)> {
    let counters = &shared.counters;
    let frame = match timeout(shared.settings.idle_timeout, conn.next()).await {
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
    match wire::decode(
        &frame,
        &shared.settings.cluster_name,
        &shared.settings.limits,
    ) {
        Ok(message) => Some(message),
        Err(reason) => {
            counters.reject(reason);
            None
        }
    }
}

fn framed(stream: TcpStream, shared: &Shared) -> Connection {
    let _ = stream.set_nodelay(true);
    Framed::new(stream, wire::codec(&shared.settings.limits))
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(shared.settings.max_inbound_connections));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of descriptors or an aborted handshake: transient, keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.counters.connections_refused.fetch_add(1, Relaxed);
            continue;
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve(&shared, framed(stream, &shared)) => {}
            }
            drop(permit);
        });
    }
}

/// Responder side of one connection: an exchange, or a push.
async fn serve(shared: &Shared, mut conn: Connection) {
    let Some((_, mut message)) = receive(shared, &mut conn).await else {
        return;
    };
    if let Message::CompactSyn {
        membership_hash,
        versions,
    } = &message
    {
        let reply = shared
            .cluster()
            .handle_compact_syn(*membership_hash, versions, Instant::now());
        if let Some(reply) = reply {
            return answer_syn(shared, conn, reply).await;
        }
        if send(shared, &mut conn, &Message::NeedDigest).await.is_err() {
            return;
        }
        let Some((_, next)) = receive(shared, &mut conn).await else {
            return;
        };
        message = next;
    }
    match message {
        Message::Syn { digest } => {
            let reply = shared.cluster().handle_syn(&digest, Instant::now());
            answer_syn(shared, conn, reply).await;
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
            deltas,
            mut forward_to,
        } => {
            let deltas_to_forward = (!forward_to.is_empty()).then(|| deltas.clone());
            apply(shared, deltas);
            if let Some(deltas) = deltas_to_forward {
                shared.cluster().retain_live(&mut forward_to);
                push(shared, deltas, forward_to).await;
            }
        }
        _ => shared.counters.reject(Rejection::Unexpected),
    }
}

/// Sends the SynAck, then applies the Ack that ends the exchange.
async fn answer_syn(shared: &Shared, mut conn: Connection, reply: SynReply) {
    let SynReply {
        deltas,
        requests,
        heartbeats,
    } = reply;
    if send(
        shared,
        &mut conn,
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
    match receive(shared, &mut conn).await {
        Some((_, Message::Ack { deltas })) => {
            apply(shared, deltas);
            shared.counters.exchanges.fetch_add(1, Relaxed);
        }
        Some(_) => shared.counters.reject(Rejection::Unexpected),
        None => {}
    }
}

fn apply(shared: &Shared, deltas: Vec<wire::NodeDelta>) {
    shared.cluster().apply_deltas(deltas, Instant::now());
    wake_pusher(shared);
}

/// A change may have waited for peers to push to; an exchange may just have brought them.
fn wake_pusher(shared: &Shared) {
    if shared.cluster().has_unpushed() {
        shared.push_wanted.notify_one();
    }
}

async fn gossip_loop(shared: Arc<Shared>, cancel: CancellationToken, tasks: TaskTracker) {
    let interval = shared.settings.gossip_interval;
    let mut rng = SmallRng::from_entropy();
    // Nodes started together should not all gossip in the same instant.
    let offset = interval.mul_f64(rand::Rng::gen::<f64>(&mut rng));
    let mut ticker = tokio::time::interval_at(Instant::now() + offset, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_tick = Instant::now() + offset - interval;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let late = now
            .saturating_duration_since(last_tick)
            .saturating_sub(interval);
        // A tick a whole interval late means this process stalled: peers were not silent.
        let stall = if late >= interval {
            late
        } else {
            Duration::ZERO
        };
        last_tick = now;
        let (convicted, targets, (membership, versions)) = {
            let mut cluster = shared.cluster();
            (
                cluster.tick(now, stall, &mut rng),
                cluster.gossip_targets(&shared.seeds, &mut rng),
                cluster.compact_digest(),
            )
        };
        for suspicion in convicted {
            let shared = shared.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = announce_suspicion(&shared, suspicion) => {}
                }
            });
        }
        for target in targets {
            let shared = shared.clone();
            let (membership, versions) = (membership.clone(), versions.clone());
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = exchange(&shared, target, membership, versions) => {}
                }
            });
        }
    }
}

async fn connect(shared: &Shared, target: &Target) -> Option<Connection> {
    let address = match target {
        Target::Peer(name) => name.parse::<SocketAddr>().ok(),
        Target::Seed(seed) => tokio::net::lookup_host(seed.as_str())
            .await
            .ok()
            .and_then(|mut addrs| addrs.next()),
    };
    let stream = match address {
        Some(address) => {
            timeout(shared.settings.connect_timeout, TcpStream::connect(address)).await
        }
        None => Ok(Err(io::ErrorKind::NotFound.into())),
    };
    match stream {
        Ok(Ok(stream)) => Some(framed(stream, shared)),
        _ => {
            shared.counters.connect_failures.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Initiator side of one push-pull exchange: a CompactSyn first, the named digest if the
/// responder's membership differs.
async fn exchange(
    shared: &Shared,
    target: Target,
    membership: Arc<Membership>,
    versions: Vec<u64>,
) {
    let Some(mut conn) = connect(shared, &target).await else {
        return;
    };
    let compact = Message::CompactSyn {
        membership_hash: membership.hash,
        versions,
    };
    if send(shared, &mut conn, &compact).await.is_err() {
        return;
    }
    let mut response = receive(shared, &mut conn).await;
    let mut positions = Some(&*membership);
    if let Some((_, Message::NeedDigest)) = response {
        let digest = shared.cluster().digest();
        if send(shared, &mut conn, &Message::Syn { digest })
            .await
            .is_err()
        {
            return;
        }
        response = receive(shared, &mut conn).await;
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
    let answers = shared
        .cluster()
        .handle_syn_ack(reply, positions, Instant::now());
    wake_pusher(shared);
    if send(shared, &mut conn, &Message::Ack { deltas: answers })
        .await
        .is_ok()
    {
        shared.counters.exchanges.fetch_add(1, Relaxed);
    }
}

/// Broadcasts local changes as soon as they happen. Broadcasts start at most every
/// `PUSH_SPACING`; changes made in between go out together, so a burst of writes costs a few
/// broadcasts while a lone write leaves at once.
async fn push_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut rng = SmallRng::from_entropy();
    let mut last_broadcast = Instant::now() - PUSH_SPACING;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.push_wanted.notified() => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(last_broadcast + PUSH_SPACING) => {}
        }
        let (deltas, targets) = {
            let mut cluster = shared.cluster();
            let targets = cluster.broadcast_targets(&mut rng);
            if targets.is_empty() {
                // Kept until an exchange brings peers (see `wake_pusher`).
                continue;
            }
            (cluster.take_unpushed(), targets)
        };
        last_broadcast = Instant::now();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = push(&shared, deltas, targets) => {}
        }
        if shared.cluster().has_unpushed() {
            shared.push_wanted.notify_one();
        }
    }
}

const PUSH_SPACING: Duration = Duration::from_millis(5);

/// Broadcasts `deltas` to `targets` as a Push.
async fn push(shared: &Shared, deltas: Vec<wire::NodeDelta>, targets: Vec<String>) {
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
async fn broadcast(
    shared: &Shared,
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
                let Some(mut conn) = connect(shared, &Target::Peer(peer.clone())).await else {
                    continue;
                };
                if send(shared, &mut conn, &message(share[i + 1..].to_vec()))
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
async fn announce_suspicion(shared: &Shared, suspicion: Suspicion) {
    let targets = shared
        .cluster()
        .broadcast_targets(&mut SmallRng::from_entropy());
    forward_suspicion(shared, suspicion, targets).await;
}

async fn forward_suspicion(shared: &Shared, suspicion: Suspicion, targets: Vec<String>) {
    let message = |forward_to| Message::Suspect {
        name: suspicion.name.clone(),
        generation: suspicion.generation,
        heartbeat: suspicion.heartbeat,
        forward_to,
    };
    broadcast(shared, targets, message).await;
}
