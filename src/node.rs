//! A gossip node's life: start, the tasks that run it, and stop. One process-wide runtime
//! serves every node, off the JavaScript thread.
//!
//! A started node owns three tasks (accept, gossip rounds, pushes), a fourth that receives
//! datagrams when they are on, plus one per connection, all
//! tracked by one [`TaskTracker`] and stopped by one [`CancellationToken`]; the push task owns
//! the broadcasts it starts, which end with it. Each inbound connection holds a slot of the
//! node's [`InboundSlots`] for as long as it is served. The lifecycle is a
//! small state machine (stopped, running, stopping) behind a std mutex: `start` while stopping
//! is refused with `ERR_GOSSIP_STOPPING`, and every `stop` call of one shutdown waits on the same
//! completion, which fires once every task has ended and the port is free. The cluster state
//! sits behind a std mutex that is never held across an await.

use crate::address;
use crate::config::Settings;
use crate::datagram::{self, Datagrams};
use crate::exchange::{self, ConnectBudget};
use crate::inbound::InboundSlots;
use crate::protocol::{self, Cluster, EventSink, PeerInfo, Tally, Target};
use crate::seal::{Keys, ReplayGuard};
use crate::transport::{Connection, Listener, Tcp, Transport};
use crate::wire::{self, Rejection};
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant, MissedTickBehavior};
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

/// A generation strictly above every earlier one of this process, at least `floor` (above the
/// node's previous one, which a refutation may have set ahead of the clock), and (clock
/// permitting) above any earlier process: milliseconds since the Unix epoch.
fn next_generation(floor: u64) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = protocol::unix_ms().max(floor);
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
    /// Exchanges this node started that completed over datagrams, without a connection.
    pub datagram_exchanges: AtomicU64,
    pub pushes_sent: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Sends that failed or did not finish within `idle_timeout`.
    pub send_failures: AtomicU64,
    /// Inbound connections refused, or closed to make room (see `inbound`).
    pub connections_refused: AtomicU64,
    /// Outgoing connection attempts skipped because the connection budget was empty.
    pub connects_skipped: AtomicU64,
    /// Seed host names that resolved to nothing; they are tried again later.
    pub seed_resolve_failures: AtomicU64,
    /// New incarnations begun to refute claims about this node that it did not make.
    pub refutations: AtomicU64,
    /// Plaintext frames taken by a node with keys under `accept_plaintext`: once this stops
    /// rising everywhere, every member seals and plaintext can be refused.
    pub plaintext_accepted: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl Counters {
    pub(crate) fn add(&self, tally: Tally) {
        let Tally {
            implausible,
            refutations,
            too_many_peers,
            too_many_keys,
            too_many_bytes,
        } = tally;
        for (reason, count) in [
            (Rejection::Implausible, implausible),
            (Rejection::TooManyPeers, too_many_peers),
            (Rejection::TooManyKeys, too_many_keys),
            (Rejection::TooManyBytes, too_many_bytes),
        ] {
            self.rejected[reason as usize].fetch_add(count, Relaxed);
        }
        self.refutations.fetch_add(refutations, Relaxed);
    }

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

/// Where to listen and what to call ourselves (see [`address`] for the rules).
#[derive(Clone, Debug, Default)]
pub struct Listen {
    pub port: u16,
    /// Bind this IP; `None`, `0.0.0.0` and `::` bind every interface.
    pub address: Option<IpAddr>,
    /// Advertise this address instead of the one we bind (NAT, port mapping).
    pub advertise: Option<SocketAddr>,
}

impl Listen {
    fn bind_ip(&self) -> IpAddr {
        self.address.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    }
}

/// What the node's tasks share.
pub(crate) struct Shared<T: Transport> {
    pub(crate) settings: Arc<Settings>,
    cluster: Mutex<Cluster>,
    pub(crate) counters: Counters,
    /// Pays for connection attempts that are not free (see `exchange::connect`).
    pub(crate) connect_budget: ConnectBudget,
    seeds: Vec<String>,
    pub(crate) transport: T,
    /// Empty without keys: frames then travel in plaintext.
    pub(crate) keys: Keys,
    pub(crate) replay_guard: Mutex<ReplayGuard>,
    /// The running incarnation's datagram socket; None while stopped or with datagrams off.
    datagrams: Mutex<Option<Arc<Datagrams<T::Datagram>>>>,
    /// The IP we listen on (unspecified for every interface) and our name, for recognising
    /// ourselves among the seeds.
    local: Mutex<(IpAddr, Option<SocketAddr>)>,
    /// Wakes the push task when local or relayed changes are waiting. Notified by writes and
    /// by exchanges that bring peers to push to; only the push task waits on it.
    pub(crate) push_wanted: Notify,
    /// Fixed in tests, so that every random choice of a node can be replayed.
    rng_seed: Option<u64>,
    rngs_made: AtomicU64,
}

impl<T: Transport> Shared<T> {
    pub(crate) fn cluster(&self) -> MutexGuard<'_, Cluster> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn datagrams(&self) -> Option<Arc<Datagrams<T::Datagram>>> {
        self.datagrams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn replay_guard(&self) -> MutexGuard<'_, ReplayGuard> {
        self.replay_guard.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn rng(&self) -> SmallRng {
        match self.rng_seed {
            Some(seed) => {
                let n = self.rngs_made.fetch_add(1, Relaxed);
                SmallRng::seed_from_u64(seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            }
            None => SmallRng::from_entropy(),
        }
    }

    /// One address of `seed`, resolved now, never ourselves; a random one when the name has
    /// several (a headless service names every pod).
    pub(crate) async fn resolve_seed(&self, seed: &str) -> Option<SocketAddr> {
        let resolved = timeout(self.settings.connect_timeout, self.transport.resolve(seed)).await;
        let Ok(Ok(addresses)) = resolved else {
            self.counters.seed_resolve_failures.fetch_add(1, Relaxed);
            return None;
        };
        let (bound, name) = *self.local.lock().unwrap_or_else(|e| e.into_inner());
        let host = self.transport.host_addresses();
        let others: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|&a| name.is_none_or(|name| !address::is_self(a, name, bound, &host)))
            .collect();
        others
            .get(self.rng().gen_range(0..others.len().max(1)))
            .copied()
    }

    /// Our name under the rules of [`address`]; resolving host-name seeds takes a while.
    async fn decide_name(&self, listen: &Listen, port: u16) -> SocketAddr {
        if let Some(name) = self.name_without_lookup(listen, port) {
            return name;
        }
        let lookups = self.seeds.iter().map(|seed| async move {
            match timeout(self.settings.connect_timeout, self.transport.resolve(seed)).await {
                Ok(Ok(addresses)) => addresses,
                _ => {
                    self.counters.seed_resolve_failures.fetch_add(1, Relaxed);
                    Vec::new()
                }
            }
        });
        let seeds: Vec<SocketAddr> = futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .flatten()
            .collect();
        self.name_from_seeds(&seeds, port)
    }

    /// The name when no lookup is needed: given, bound to a specific IP, or seeds that are
    /// all IP addresses.
    fn name_without_lookup(&self, listen: &Listen, port: u16) -> Option<SocketAddr> {
        if let Some(advertise) = listen.advertise {
            let port = if advertise.port() == 0 {
                port
            } else {
                advertise.port()
            };
            return Some(SocketAddr::new(advertise.ip(), port));
        }
        if let Some(ip) = listen.address.filter(|ip| !ip.is_unspecified()) {
            return Some(SocketAddr::new(ip, port));
        }
        let seeds: Option<Vec<SocketAddr>> = self.seeds.iter().map(|s| s.parse().ok()).collect();
        Some(self.name_from_seeds(&seeds?, port))
    }

    fn name_from_seeds(&self, seeds: &[SocketAddr], port: u16) -> SocketAddr {
        let host = self.transport.host_addresses();
        let ip = address::choose_advertised_ip(seeds, |ip| self.transport.route_to(ip), &host);
        SocketAddr::new(ip, port)
    }
}

/// Where a node is in its life. Only `start` and `stop` change it.
enum Lifecycle {
    Stopped {
        since: Option<Instant>,
    },
    Running(Running),
    /// Every caller of `stop` waits on this until it turns true.
    Stopping(watch::Receiver<bool>),
}

struct Running {
    /// Cancelled by `stop`; every task of this incarnation watches it.
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Our name, once decided (see [`Shared::decide_name`]); `stop` waits for it.
    name: watch::Receiver<Option<String>>,
}

pub struct Node<T: Transport = Tcp> {
    shared: Arc<Shared<T>>,
    lifecycle: Arc<Mutex<Lifecycle>>,
    /// The port of the last incarnation: a node asked for any port keeps its name across
    /// restarts when that port is still free.
    last_port: AtomicU64,
}

impl Node<Tcp> {
    pub fn new(settings: Settings, seeds: Vec<String>, sink: Arc<dyn EventSink>) -> Self {
        let transport = Tcp::new(settings.limits.max_frame_bytes);
        Node::with_transport(settings, seeds, sink, transport, None)
    }
}

impl<T: Transport> Node<T> {
    /// A node on any transport; `rng_seed` fixes its random choices (tests).
    pub fn with_transport(
        settings: Settings,
        seeds: Vec<String>,
        sink: Arc<dyn EventSink>,
        transport: T,
        rng_seed: Option<u64>,
    ) -> Self {
        let settings = Arc::new(settings);
        Node {
            shared: Arc::new(Shared {
                cluster: Mutex::new(Cluster::new(settings.clone(), sink)),
                replay_guard: Mutex::new(ReplayGuard::new(settings.max_clock_skew)),
                datagrams: Mutex::new(None),
                counters: Counters::default(),
                connect_budget: ConnectBudget::new(settings.gossip_interval),
                settings,
                seeds,
                transport,
                keys: Keys::default(),
                local: Mutex::new((IpAddr::V6(Ipv6Addr::UNSPECIFIED), None)),
                push_wanted: Notify::new(),
                rng_seed,
                rngs_made: AtomicU64::new(0),
            }),
            lifecycle: Arc::new(Mutex::new(Lifecycle::Stopped { since: None })),
            last_port: AtomicU64::new(0),
        }
    }

    /// Seals every frame with `keys` (see [`crate::seal`]). Set at construction: a node with
    /// keys never goes back to plaintext, and one without never gets any.
    pub fn with_keys(mut self, keys: Keys) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("keys are set right after construction")
            .keys = keys;
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.shared.keys
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_running(&self) -> bool {
        matches!(*self.lifecycle(), Lifecycle::Running(_))
    }

    pub fn is_stopping(&self) -> bool {
        matches!(*self.lifecycle(), Lifecycle::Stopping(_))
    }

    /// Binds, then starts gossiping under a new generation. Must run inside a tokio runtime.
    /// Returns our name when it is known at once (no seed needs a lookup), and a receiver that
    /// holds it once decided.
    pub fn start(
        &self,
        listen: &Listen,
    ) -> Result<(Option<String>, watch::Receiver<Option<String>>), StartError> {
        let mut lifecycle = self.lifecycle();
        let stopped_for = match &*lifecycle {
            Lifecycle::Running(_) => {
                return Err(StartError {
                    code: "ERR_GOSSIP_RUNNING",
                    message: "already started".into(),
                })
            }
            Lifecycle::Stopping(_) => {
                return Err(StartError {
                    code: "ERR_GOSSIP_STOPPING",
                    message: "still stopping; start again once stop() has resolved".into(),
                })
            }
            Lifecycle::Stopped { since } => since.map_or(Duration::ZERO, |at| at.elapsed()),
        };
        let (listener, datagram, port) = self.bind(listen)?;
        self.last_port.store(port as u64, Relaxed);
        *self.shared.local.lock().unwrap_or_else(|e| e.into_inner()) = (listen.bind_ip(), None);

        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (name_tx, name_rx) = watch::channel(None);
        let boot = Boot {
            shared: self.shared.clone(),
            listener,
            datagram,
            cancel: cancel.clone(),
            tasks: tasks.clone(),
            stopped_for,
            name: name_tx,
        };
        let known = self.shared.name_without_lookup(listen, port);
        match known {
            Some(name) => boot.run(name),
            None => {
                let listen = listen.clone();
                tokio::spawn(async move {
                    let name = boot.shared.decide_name(&listen, port).await;
                    boot.run(name);
                });
            }
        }
        *lifecycle = Lifecycle::Running(Running {
            cancel,
            tasks,
            name: name_rx.clone(),
        });
        Ok((known.map(|n| n.to_string()), name_rx))
    }

    /// Binds the listener and, with datagrams on, a datagram socket at its port. Asked for any
    /// port, it tries a few, since another process may hold the UDP port of a free TCP one.
    #[allow(clippy::type_complexity)]
    fn bind(&self, listen: &Listen) -> Result<(T::Listener, Option<T::Datagram>, u16), StartError> {
        let transport = &self.shared.transport;
        let at = |port| SocketAddr::new(listen.bind_ip(), port);
        let mut attempts = if listen.port == 0 { 8 } else { 1 };
        loop {
            let last_port = self.last_port.load(Relaxed) as u16;
            let listener = match (listen.port, last_port) {
                (0, 1..) => transport
                    .bind(at(last_port))
                    .or_else(|_| transport.bind(at(0))),
                (port, _) => transport.bind(at(port)),
            }
            .map_err(|e| StartError::from_io(e, "cannot listen"))?;
            let port = listener
                .local_addr()
                .map_err(|e| StartError::from_io(e, "cannot listen"))?
                .port();
            if self.shared.settings.max_datagram_bytes == 0 {
                return Ok((listener, None, port));
            }
            match transport.bind_datagram(at(port)) {
                Ok(datagram) => return Ok((listener, Some(datagram), port)),
                Err(error) => {
                    attempts -= 1;
                    if attempts == 0 {
                        return Err(StartError::from_io(
                            error,
                            "cannot bind the datagram socket",
                        ));
                    }
                    self.last_port.store(0, Relaxed);
                }
            }
        }
    }

    /// Announces the departure to a few peers (bounded by the connect timeout), then ends every
    /// task. Every call made until then waits for the same end. Must run inside a tokio runtime.
    pub fn stop(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut lifecycle = self.lifecycle();
        let done = match &*lifecycle {
            Lifecycle::Stopped { .. } => None,
            Lifecycle::Stopping(done) => Some(done.clone()),
            Lifecycle::Running(_) => {
                let (done_tx, done_rx) = watch::channel(false);
                let Lifecycle::Running(running) =
                    std::mem::replace(&mut *lifecycle, Lifecycle::Stopping(done_rx.clone()))
                else {
                    unreachable!("matched Running above")
                };
                let shared = self.shared.clone();
                let lifecycle = self.lifecycle.clone();
                tokio::spawn(async move {
                    shutdown(&shared, running).await;
                    *lifecycle.lock().unwrap_or_else(|e| e.into_inner()) = Lifecycle::Stopped {
                        since: Some(Instant::now()),
                    };
                    let _ = done_tx.send(true);
                });
                Some(done_rx)
            }
        };
        async move {
            if let Some(mut done) = done {
                // An error means the stopping task is gone, which also means it is over.
                let _ = done.wait_for(|&stopped| stopped).await;
            }
        }
    }

    /// Writes a local key, deleted by this node `ttl` from now if given, and pushes it at once
    /// if running. False when nothing changed.
    pub fn set_local(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool, Rejection> {
        wire::check_key_value(key, &value, &self.shared.settings.limits)?;
        let expires_at = ttl.map(|ttl| Instant::now() + ttl);
        let changed = self.shared.cluster().set_local(key, value, expires_at)?;
        if changed {
            self.shared.push_wanted.notify_one();
        }
        Ok(changed)
    }

    /// Deletes a local key and pushes the deletion at once if running. False when the key did
    /// not exist.
    pub fn delete_local(&self, key: &str) -> bool {
        let deleted = self.shared.cluster().delete_local(key, Instant::now());
        if deleted {
            self.shared.push_wanted.notify_one();
        }
        deleted
    }

    pub fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.shared.cluster())
    }

    #[cfg(test)]
    pub(crate) fn with_cluster_mut<R>(&self, f: impl FnOnce(&mut Cluster) -> R) -> R {
        f(&mut self.shared.cluster())
    }

    pub fn peer_infos(&self) -> Vec<PeerInfo> {
        self.shared.cluster().peer_infos(Instant::now())
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }
}

impl<T: Transport> Drop for Node<T> {
    fn drop(&mut self) {
        if let Lifecycle::Running(running) = &*self.lifecycle() {
            running.cancel.cancel();
        }
    }
}

/// What a start hands to the part that runs once the name is decided.
struct Boot<T: Transport> {
    shared: Arc<Shared<T>>,
    listener: T::Listener,
    datagram: Option<T::Datagram>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    stopped_for: Duration,
    /// Read by `start`'s caller and by `stop`, which waits for the name before leaving.
    name: watch::Sender<Option<String>>,
}

impl<T: Transport> Boot<T> {
    /// Begins the incarnation under `name` and spawns the node's tasks.
    fn run(self, name: SocketAddr) {
        let Boot {
            shared,
            listener,
            datagram,
            cancel,
            tasks,
            stopped_for,
            name: name_tx,
        } = self;
        shared.local.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(name);
        {
            let mut cluster = shared.cluster();
            let generation = next_generation(cluster.generation() + 1);
            cluster.expire_and_collect(Instant::now());
            cluster.begin_incarnation(name.to_string(), generation, stopped_for);
        }
        tasks.spawn(accept_loop(
            shared.clone(),
            listener,
            cancel.clone(),
            tasks.clone(),
        ));
        if let Some(socket) = datagram {
            let datagrams = Arc::new(Datagrams::new(socket));
            *shared.datagrams.lock().unwrap_or_else(|e| e.into_inner()) = Some(datagrams.clone());
            tasks.spawn(datagram::receive_loop(
                shared.clone(),
                datagrams,
                cancel.clone(),
            ));
        }
        tasks.spawn(gossip_loop(shared.clone(), cancel.clone(), tasks.clone()));
        tasks.spawn(push_loop(shared, cancel));
        let _ = name_tx.send(Some(name.to_string()));
    }
}

/// Leaves (announced to a few peers within the connect timeout), then ends every task.
async fn shutdown<T: Transport>(shared: &Shared<T>, running: Running) {
    let Running {
        cancel,
        tasks,
        mut name,
    } = running;
    // The name lookup is bounded by the connect timeout; until it ends there is nobody to leave.
    let _ = name.wait_for(Option::is_some).await;
    let leaving = {
        let mut cluster = shared.cluster();
        cluster.leave();
        cluster.take_push(None, Instant::now(), &mut shared.rng())
    };
    if let Some((deltas, targets)) = leaving {
        let announce = exchange::push(shared, deltas, targets);
        let _ = timeout(shared.settings.connect_timeout, announce).await;
    }
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    // The last holder of the socket: dropping it frees the port.
    *shared.datagrams.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

async fn accept_loop<T: Transport>(
    shared: Arc<Shared<T>>,
    mut listener: T::Listener,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = InboundSlots::new(shared.settings.max_inbound_connections);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let connection = match accepted {
            Ok(connection) => connection,
            // Out of descriptors or an aborted handshake: transient, keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let counters = &shared.counters;
        let slot = match slots.admit(connection.remote_ip()) {
            Ok((slot, None)) => slot,
            Ok((slot, Some(evicted))) => {
                counters.reject(evicted);
                counters.connections_refused.fetch_add(1, Relaxed);
                slot
            }
            Err(reason) => {
                counters.reject(reason);
                counters.connections_refused.fetch_add(1, Relaxed);
                continue;
            }
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        let taken_back = slot.closed();
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = taken_back.cancelled() => {}
                _ = exchange::serve(&shared, connection, slot) => {}
            }
        });
    }
}

async fn gossip_loop<T: Transport>(
    shared: Arc<Shared<T>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let interval = shared.settings.gossip_interval;
    let mut rng = shared.rng();
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
        // A tick late beyond timer jitter means this process could not run (stopped, or a
        // machine too busy to keep time): peers were not silent meanwhile.
        let stall = if late >= interval / 10 {
            late
        } else {
            Duration::ZERO
        };
        last_tick = now;
        let (convicted, targets, compact, tally, disputes, unpushed) = {
            let mut cluster = shared.cluster();
            let convicted = cluster.tick(now, stall, &mut rng);
            let targets: Vec<(Target, bool)> = cluster
                .gossip_targets(&shared.seeds, &mut rng)
                .into_iter()
                .map(|target| {
                    let free =
                        matches!(&target, Target::Peer(name) if cluster.contact_is_free(name));
                    (target, free)
                })
                .collect();
            (
                convicted,
                targets,
                cluster.compact_digest(),
                cluster.take_tally(),
                cluster.take_disputes(),
                cluster.has_unpushed(),
            )
        };
        shared.counters.add(tally);
        // A refutation, keys past their TTL and collected tombstones are changes to push.
        if unpushed {
            shared.push_wanted.notify_one();
        }
        // Each owner alone can tell whether what we hold of it is true (see `Cluster::refute`).
        for (owner, ours) in disputes {
            let shared = shared.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = exchange::push(&shared, vec![ours], vec![owner]) => {}
                }
            });
        }
        for suspicion in convicted {
            let shared = shared.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = exchange::announce_suspicion(&shared, suspicion) => {}
                }
            });
        }
        for (target, free) in targets {
            let shared = shared.clone();
            let compact = compact.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = exchange::exchange(&shared, target, free, compact) => {}
                }
            });
        }
    }
}

/// Broadcasts local changes as soon as they happen. Broadcasts start at most every
/// `PUSH_SPACING`; changes made in between go out together, so a burst of writes costs a few
/// broadcasts while a lone write leaves at once. The loop waits for a broadcast up to
/// `PUSH_PATIENCE`: one still walking past unreachable nodes after that goes on in the
/// background, and the next carries its changes again, since it may arrive first. A change too
/// large for one frame waits for every broadcast before it, so that the pieces arrive in order.
async fn push_loop<T: Transport>(shared: Arc<Shared<T>>, cancel: CancellationToken) {
    let mut rng = shared.rng();
    let mut last_broadcast = Instant::now() - PUSH_SPACING;
    // Broadcasts under way, each with the generation and version its changes start after.
    let mut in_flight = JoinSet::new();
    let mut starts: HashMap<tokio::task::Id, (u64, u64)> = HashMap::new();
    let mut in_pieces = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.push_wanted.notified() => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(last_broadcast + PUSH_SPACING) => {}
        }
        while let Some(done) = in_flight.try_join_next_with_id() {
            starts.remove(&finished(done));
        }
        while in_pieces && !in_flight.is_empty() || in_flight.len() >= MAX_BROADCASTS {
            tokio::select! {
                _ = cancel.cancelled() => return,
                Some(done) = in_flight.join_next_with_id() => {
                    starts.remove(&finished(done));
                }
            }
        }
        let resend_from = starts.values().min().copied();
        let (deltas, targets) = {
            let mut cluster = shared.cluster();
            // Kept while nobody is live, until an exchange brings peers (see `exchange::absorb`).
            let Some(push) = cluster.take_push(resend_from, Instant::now(), &mut rng) else {
                continue;
            };
            in_pieces = cluster.has_unpushed();
            push
        };
        last_broadcast = Instant::now();
        let start = deltas.first().map(|d| (d.generation, d.from_version));
        let broadcast = {
            let shared = shared.clone();
            async move { exchange::push(&shared, deltas, targets).await }
        };
        let ours = in_flight.spawn(broadcast).id();
        if let Some(start) = start {
            starts.insert(ours, start);
        }
        let patience = tokio::time::sleep(PUSH_PATIENCE);
        tokio::pin!(patience);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut patience => break,
                done = in_flight.join_next_with_id() => {
                    let Some(done) = done else { break };
                    let id = finished(done);
                    starts.remove(&id);
                    if id == ours {
                        break;
                    }
                }
            }
        }
        if shared.cluster().has_unpushed() {
            shared.push_wanted.notify_one();
        }
    }
}

/// The task id of a finished broadcast, whether it completed or panicked.
fn finished(done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match done {
        Ok((id, ())) => id,
        Err(error) => error.id(),
    }
}

const PUSH_SPACING: Duration = Duration::from_millis(5);

/// How long the push loop waits for one broadcast before starting the next beside it.
const PUSH_PATIENCE: Duration = Duration::from_millis(100);

/// Broadcasts of local changes under way at once, at most.
const MAX_BROADCASTS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;
    use crate::transport::{Connection, MemNetwork, MemTransport};
    use crate::wire::{Message, NodeDelta};
    use std::net::Ipv4Addr;

    /// Records events as text, the way a listener would see them.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl EventSink for Recorder {
        fn emit(&self, event: Event<'_>) {
            let text = match event {
                Event::NewPeer(p) => format!("new_peer {p}"),
                Event::Update { peer, key, .. } => format!("update {peer} {key}"),
                Event::Delete { peer, key } => format!("delete {peer} {key}"),
                Event::PeerAlive(p) => format!("peer_alive {p}"),
                Event::PeerFailed(p) => format!("peer_failed {p}"),
            };
            self.0.lock().unwrap().push(text);
        }
    }

    impl Recorder {
        fn failures(&self) -> Vec<String> {
            let events = self.0.lock().unwrap();
            events
                .iter()
                .filter(|e| e.starts_with("peer_failed"))
                .cloned()
                .collect()
        }
    }

    struct TestNode {
        node: Node<MemTransport>,
        events: Arc<Recorder>,
        name: String,
    }

    fn host(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    /// Node `last` of a cluster whose seed is node 1, listening on 10.0.0.`last`:7000.
    fn start(net: &MemNetwork, last: u8, settings: Settings) -> TestNode {
        let events = Arc::new(Recorder::default());
        let seeds = vec!["10.0.0.1:7000".to_string()];
        let node = Node::with_transport(
            settings,
            seeds,
            events.clone(),
            net.host(host(last)),
            Some(last as u64),
        );
        let listen = Listen {
            port: 7000,
            address: Some(host(last)),
            advertise: None,
        };
        let (name, _) = node.start(&listen).unwrap();
        TestNode {
            node,
            events,
            name: name.unwrap(),
        }
    }

    fn cluster(net: &MemNetwork, size: u8, settings: &Settings) -> Vec<TestNode> {
        (1..=size)
            .map(|i| start(net, i, settings.clone()))
            .collect()
    }

    fn sees_all_live(nodes: &[TestNode]) -> bool {
        nodes
            .iter()
            .all(|n| n.node.with_cluster(|c| c.peer_names(Some(true)).len()) == nodes.len() - 1)
    }

    fn holds(node: &TestNode, peer: &TestNode, key: &str) -> bool {
        node.node
            .with_cluster(|c| c.node_value(&peer.name, key).is_some())
    }

    /// Keyless deltas for `count` names that no node has, at `heartbeat`.
    fn fakes(count: u32, heartbeat: u64) -> Vec<NodeDelta> {
        (0..count)
            .map(|i| NodeDelta {
                name: format!("10.1.{}.{}:7000", i >> 8 & 255, i & 255),
                generation: 1,
                heartbeat,
                from_version: 0,
                to_version: 0,
                left: false,
                kvs: vec![],
                horizon: 0,
            })
            .collect()
    }

    const ATTACKER: u8 = 66;

    /// A Push of `deltas` sent to `to` from the attacker's host, as `from`.
    async fn push_from(net: &MemNetwork, to: &TestNode, from: &str, deltas: Vec<NodeDelta>) {
        let message = Message::Push {
            deltas,
            forward_to: vec![],
        };
        let frame = wire::encode("gossiper", from, &message);
        let address = to.name.parse().unwrap();
        let mut conn = net.host(host(ATTACKER)).connect(address).await.unwrap();
        conn.send(frame).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_spreads_at_once_despite_thousands_of_fake_names() {
        let net = MemNetwork::new(1, 4 << 20);
        let nodes = cluster(&net, 3, &Settings::default());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sees_all_live(&nodes));
        let victim = &nodes[0];
        // 8,190 names, pushed twice a round apart so that the victim trusts them. A third of them
        // never answer a connection (cut off), a third accept it and swallow what is sent (a
        // listener that never accepts), a third refuse it.
        let attacker = host(ATTACKER).to_string() + ":1";
        push_from(&net, victim, &attacker, fakes(8190, 1)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        push_from(&net, victim, &attacker, fakes(8190, 2)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            victim.node.with_cluster(|c| c.peer_names(Some(true)).len()),
            8192
        );
        let mut tarpits = Vec::new();
        for i in 0..8190u32 {
            let fake = IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8));
            match i % 3 {
                0 => net.cut(host(1), fake),
                1 => tarpits.push(net.host(fake).bind(SocketAddr::new(fake, 7000)).unwrap()),
                _ => {}
            }
        }
        // Every write goes down the push tree to both peers: within 100 ms, where a gossip
        // round (anti-entropy) takes a second.
        for round in 0..10 {
            let key = format!("write{round}");
            victim
                .node
                .set_local(&key, Bytes::from_static(&[0xc0]), None)
                .unwrap();
            let written = Instant::now();
            while !nodes[1..].iter().all(|n| holds(n, victim, &key)) {
                assert!(
                    written.elapsed() < Duration::from_millis(100),
                    "{key} missed the push"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The fakes fail in time (past the bootstrap grace); the real nodes never do.
        tokio::time::sleep(Duration::from_secs(60)).await;
        for node in &nodes[1..] {
            assert_eq!(node.events.failures(), Vec::<String>::new());
        }
        let real: Vec<String> = nodes[1..].iter().map(|n| n.name.clone()).collect();
        assert_eq!(victim.node.with_cluster(|c| c.peer_names(Some(true))), real);
    }

    #[tokio::test(start_paused = true)]
    async fn connection_attempts_stay_bounded_however_many_names_fail() {
        let net = MemNetwork::new(2, 4 << 20);
        let nodes = cluster(&net, 2, &Settings::default());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let victim = &nodes[0];
        let attacker = host(ATTACKER).to_string() + ":1";
        push_from(&net, victim, &attacker, fakes(1000, 1)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        push_from(&net, victim, &attacker, fakes(1000, 2)).await;
        // A thousand live peers that refuse every connection, and a write every 10 ms for 10 s:
        // each fake costs one free attempt at most; after that, only the connection budget (16
        // a second, 32 saved) pays for trying them again.
        let counters = victim.node.counters();
        let attempts = || counters.connect_failures.load(Relaxed);
        let before = attempts();
        for i in 0..1000u16 {
            let [high, low] = i.to_be_bytes();
            victim
                .node
                .set_local("k", Bytes::from(vec![0xcd, high, low]), None)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let made = attempts() - before;
        assert!(made <= 1000 + 32 + 16 * 10, "{made} failed attempts");
        assert!(counters.connects_skipped.load(Relaxed) > 0);
        assert!(holds(&nodes[1], victim, "k"));
        assert_eq!(nodes[1].events.failures(), Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_connections_holding_every_slot_cause_no_false_failure() {
        let net = MemNetwork::new(3, 4 << 20);
        let settings = Settings {
            max_inbound_connections: 16,
            ..Settings::default()
        };
        let nodes = cluster(&net, 3, &settings);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sees_all_live(&nodes));
        // Eight attacking hosts, so that no per-source limit applies: every second, twice as
        // many new connections as each node has slots, none of which ever sends a byte.
        let attackers: Vec<MemTransport> = (0..8).map(|i| net.host(host(100 + i))).collect();
        let mut held = Vec::new();
        for second in 0..40 {
            held.clear();
            for node in &nodes {
                let address = node.name.parse().unwrap();
                for attacker in &attackers {
                    for _ in 0..4 {
                        held.push(attacker.connect(address).await.unwrap());
                    }
                }
            }
            if second % 10 == 5 {
                let writer = &nodes[second % 3];
                let key = format!("during{second}");
                writer
                    .node
                    .set_local(&key, Bytes::from_static(&[0xc3]), None)
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                for node in &nodes {
                    assert!(
                        node.name == writer.name || holds(node, writer, &key),
                        "{key}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for node in &nodes {
            assert_eq!(node.events.failures(), Vec::<String>::new());
            let counters = node.node.counters();
            let closed = counters.rejected(Rejection::SourceLimit)
                + counters.rejected(Rejection::InboundFull);
            assert!(closed > 0, "the flood took no slot");
        }
    }
}
