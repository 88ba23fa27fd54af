//! Transports: how a node listens, connects and moves frames. The node's tasks only see the
//! [`Transport`] trait, so the same code runs over TCP ([`Tcp`]) and over an in-memory network
//! ([`MemNetwork`]) that tests drive with a seeded RNG and tokio's paused clock.
//!
//! A connection carries whole frames (the bytes of one encoded message) both ways. Both
//! transports refuse frames over `max_frame_bytes` on either side, so a test over memory meets
//! the same limits as TCP. The in-memory network injects faults per frame (drop, delay, reorder
//! through random delays, duplicate) and per pair of hosts (partitions).
//!
//! A node also has a datagram socket ([`Datagram`]) at the address and port of its listener,
//! for exchanges small enough to fit one datagram each way (see `crate::datagram`). A datagram
//! is one whole frame, without a length. The in-memory network delivers datagrams with the same
//! seeded faults and cuts as frames, and can block them all (a network that drops UDP).
//!
//! TCP frames are read by [`read_frame`]: the 4-byte length is checked before anything else, and
//! the body's buffer grows only as bytes arrive, each growth taken from one [`FrameBudget`]
//! shared by every connection of the process. Invariant: the bytes held by partly received
//! frames never exceed the budget for longer than it takes an evicted connection to wake and
//! drop its buffer; over budget, the frame that started longest ago is dropped, so a crowd of
//! slow or stalled senders cannot crowd out a peer whose frame arrives at once.

use bytes::{BufMut, Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Where nodes listen and how they reach each other.
pub trait Transport: Send + Sync + 'static {
    type Connection: Connection;
    type Listener: Listener<Connection = Self::Connection>;
    type Datagram: Datagram;

    /// Binds at once, so that `start` reports a busy port synchronously. An unspecified IP
    /// (`0.0.0.0`, `::`) binds every interface.
    fn bind(&self, address: SocketAddr) -> io::Result<Self::Listener>;

    /// A datagram socket at `address`, bound at once; the listener's rules for an unspecified IP.
    fn bind_datagram(&self, address: SocketAddr) -> io::Result<Self::Datagram>;

    fn connect(
        &self,
        address: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::Connection>> + Send;

    /// Every address `host:port` resolves to right now.
    fn resolve(&self, host_port: &str) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;

    /// The local address this host would use to reach `remote`, if it has a route.
    fn route_to(&self, remote: IpAddr) -> Option<IpAddr>;

    /// This host's interface addresses, loopback included.
    fn host_addresses(&self) -> Vec<IpAddr>;
}

pub trait Listener: Send + 'static {
    type Connection: Connection;

    fn local_addr(&self) -> io::Result<SocketAddr>;

    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Connection>> + Send;
}

pub trait Connection: Send + 'static {
    /// Sends one frame. Frames over the limit fail with `InvalidInput`.
    fn send(&mut self, frame: Bytes) -> impl Future<Output = io::Result<()>> + Send;

    /// The next frame; `None` once the other side closed. An oversized frame is an error of
    /// kind `InvalidData`, a frame dropped to keep within the [`FrameBudget`] one of kind
    /// `OutOfMemory`.
    fn recv(&mut self) -> impl Future<Output = Option<io::Result<BytesMut>>> + Send;

    /// The address of the other end's host.
    fn remote_ip(&self) -> IpAddr;
}

/// A datagram socket, shared by the task that receives and the exchanges that send.
pub trait Datagram: Send + Sync + 'static {
    /// Sends one datagram; delivery is not promised.
    fn send_to(
        &self,
        datagram: Bytes,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Waits for the next datagram and copies it into `buffer`: its length (cut to the
    /// buffer's, so a datagram that fills the buffer may have been longer) and its source.
    fn recv_from(
        &self,
        buffer: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
}

/// The first allocation for a frame's body; it doubles from there as bytes arrive.
const FIRST_CHUNK: usize = 16 << 10;

/// The process-wide budget's floor: room for a few large frames at once.
pub const DEFAULT_FRAME_BUDGET: usize = 64 << 20;

/// Bytes held by partly received frames across every connection of the process, and who holds
/// them. The limit is at least twice the largest frame any node of the process accepts, so one
/// frame of that size always fits.
pub struct FrameBudget {
    limit: AtomicUsize,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    held: usize,
    next_id: u64,
    holders: HashMap<u64, Holder>,
}

struct Holder {
    held: usize,
    /// When its frame's length arrived.
    started: Instant,
    evicted: Arc<Eviction>,
}

/// Set, and notified, when a holder must give its bytes back.
#[derive(Default)]
struct Eviction {
    done: AtomicBool,
    notify: Notify,
}

impl FrameBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(FrameBudget {
            limit: AtomicUsize::new(limit),
            state: Mutex::new(BudgetState::default()),
        })
    }

    /// The budget every TCP connection of this process shares.
    pub fn process() -> &'static Arc<FrameBudget> {
        static BUDGET: OnceLock<Arc<FrameBudget>> = OnceLock::new();
        BUDGET.get_or_init(|| FrameBudget::new(DEFAULT_FRAME_BUDGET))
    }

    fn raise_to(&self, limit: usize) {
        self.limit.fetch_max(limit, Relaxed);
    }

    fn state(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held right now.
    pub fn held(&self) -> usize {
        self.state().held
    }

    /// Registers a frame that starts arriving now; it holds nothing yet.
    fn claim(self: &Arc<Self>) -> Claim {
        let evicted = Arc::new(Eviction::default());
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.holders.insert(
            id,
            Holder {
                held: 0,
                started: Instant::now(),
                evicted: evicted.clone(),
            },
        );
        Claim {
            budget: self.clone(),
            id,
            evicted,
        }
    }
}

/// One frame's share of the [`FrameBudget`]; dropping it gives the bytes back.
struct Claim {
    budget: Arc<FrameBudget>,
    id: u64,
    /// Shared with the budget's record of this claim, which sets it to evict us.
    evicted: Arc<Eviction>,
}

impl Claim {
    /// Takes `bytes` more. Over the limit, frames that started earlier than any other are
    /// evicted until the rest fits; false when that is this one.
    fn grow(&self, bytes: usize) -> bool {
        let limit = self.budget.limit.load(Relaxed);
        let mut state = self.budget.state();
        let Some(holder) = state.holders.get_mut(&self.id) else {
            return false;
        };
        holder.held += bytes;
        state.held += bytes;
        while state.held > limit {
            let oldest = state
                .holders
                .iter()
                .min_by_key(|(_, h)| (h.started, std::cmp::Reverse(h.held)))
                .map(|(&id, _)| id);
            let Some(victim) = oldest.and_then(|id| state.holders.remove(&id)) else {
                break;
            };
            state.held -= victim.held;
            victim.evicted.done.store(true, Relaxed);
            victim.evicted.notify.notify_one();
            if Arc::ptr_eq(&victim.evicted, &self.evicted) {
                return false;
            }
        }
        true
    }

    /// Resolves once this claim has been evicted.
    async fn evicted(&self) {
        while !self.evicted.done.load(Relaxed) {
            self.evicted.notify.notified().await;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.budget.state();
        if let Some(holder) = state.holders.remove(&self.id) {
            state.held -= holder.held;
        }
    }
}

fn eviction_error() -> io::Error {
    io::Error::new(io::ErrorKind::OutOfMemory, "frame budget exhausted")
}

/// Reads one length-prefixed frame: `None` on a clean close before its first byte. The length
/// is checked against `max_frame_bytes` before the body is read, and the body's buffer grows as
/// bytes arrive, within `budget` (see [`FrameBudget`]). The caller bounds the whole frame's
/// time.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_bytes: usize,
    budget: &Arc<FrameBudget>,
) -> Option<io::Result<Bytes>> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]).await {
            Ok(0) if got == 0 => return None,
            Ok(0) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(error) => return Some(Err(error)),
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max_frame_bytes {
        return Some(Err(io::ErrorKind::InvalidData.into()));
    }
    let claim = budget.claim();
    let mut body: Vec<u8> = Vec::new();
    while body.len() < len {
        if body.len() == body.capacity() {
            let target = len.min((body.capacity() * 2).max(FIRST_CHUNK));
            let before = body.capacity();
            body.reserve_exact(target - body.len());
            if !claim.grow(body.capacity() - before) {
                return Some(Err(eviction_error()));
            }
        }
        let remaining = len - body.len();
        let mut room = (&mut body).limit(remaining);
        let read = tokio::select! {
            read = reader.read_buf(&mut room) => read,
            _ = claim.evicted() => return Some(Err(eviction_error())),
        };
        match read {
            Ok(0) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(error) => return Some(Err(error)),
        }
    }
    Some(Ok(Bytes::from(body)))
}

/// TCP with a 4-byte big-endian length before every frame.
#[derive(Clone)]
pub struct Tcp {
    max_frame_bytes: usize,
    budget: Arc<FrameBudget>,
}

impl Tcp {
    /// A transport whose connections share the process's [`FrameBudget`], raised if needed so
    /// that it holds two frames of `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        let budget = FrameBudget::process().clone();
        budget.raise_to(max_frame_bytes.saturating_mul(2));
        Tcp {
            max_frame_bytes,
            budget,
        }
    }

    fn connection(&self, stream: TcpStream) -> io::Result<TcpConnection> {
        // Gossip frames are small and latency matters more than coalescing.
        let _ = stream.set_nodelay(true);
        Ok(TcpConnection {
            remote: stream.peer_addr()?.ip(),
            stream,
            max_frame_bytes: self.max_frame_bytes,
            budget: self.budget.clone(),
        })
    }
}

pub struct TcpConnection {
    stream: TcpStream,
    remote: IpAddr,
    max_frame_bytes: usize,
    budget: Arc<FrameBudget>,
}

pub struct TcpTransportListener {
    listener: TcpListener,
    tcp: Tcp,
}

/// Binds `address`; for `::`, dual-stack where the host has IPv6 (so 127.0.0.1 and ::1 both
/// reach us), else `0.0.0.0`.
fn bind_any<S>(address: SocketAddr, bind: impl Fn(SocketAddr) -> io::Result<S>) -> io::Result<S> {
    if address.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        bind(address).or_else(|_| {
            bind(SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                address.port(),
            ))
        })
    } else {
        bind(address)
    }
}

impl Transport for Tcp {
    type Connection = TcpConnection;
    type Listener = TcpTransportListener;
    type Datagram = UdpDatagram;

    fn bind(&self, address: SocketAddr) -> io::Result<TcpTransportListener> {
        let listener = bind_any(address, StdListener::bind)?;
        listener.set_nonblocking(true)?;
        Ok(TcpTransportListener {
            listener: TcpListener::from_std(listener)?,
            tcp: self.clone(),
        })
    }

    fn bind_datagram(&self, address: SocketAddr) -> io::Result<UdpDatagram> {
        let socket = bind_any(address, UdpSocket::bind)?;
        socket.set_nonblocking(true)?;
        let ipv6 = socket.local_addr()?.is_ipv6();
        Ok(UdpDatagram {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            ipv6,
        })
    }

    async fn connect(&self, address: SocketAddr) -> io::Result<TcpConnection> {
        self.connection(TcpStream::connect(address).await?)
    }

    async fn resolve(&self, host_port: &str) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host(host_port).await?.collect())
    }

    fn route_to(&self, remote: IpAddr) -> Option<IpAddr> {
        // Connecting a UDP socket sends nothing; the kernel only picks the route and source.
        let local: SocketAddr = match remote {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).ok()?;
        socket.connect((remote, 9)).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    }

    fn host_addresses(&self) -> Vec<IpAddr> {
        crate::address::interface_addresses()
    }
}

impl Listener for TcpTransportListener {
    type Connection = TcpConnection;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    async fn accept(&mut self) -> io::Result<TcpConnection> {
        let (stream, _) = self.listener.accept().await?;
        self.tcp.connection(stream)
    }
}

/// A UDP socket.
pub struct UdpDatagram {
    socket: tokio::net::UdpSocket,
    /// An IPv6 socket reaches IPv4 peers at their IPv4-mapped address.
    ipv6: bool,
}

impl Datagram for UdpDatagram {
    async fn send_to(&self, datagram: Bytes, to: SocketAddr) -> io::Result<()> {
        let to = match to {
            SocketAddr::V4(v4) if self.ipv6 => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            to => to,
        };
        self.socket.send_to(&datagram, to).await.map(drop)
    }

    async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buffer).await
    }
}

/// Frames up to this size go out in one write with their length.
const SINGLE_WRITE: usize = 64 << 10;

impl Connection for TcpConnection {
    async fn send(&mut self, frame: Bytes) -> io::Result<()> {
        if frame.len() > self.max_frame_bytes {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let prefix = (frame.len() as u32).to_be_bytes();
        if frame.len() <= SINGLE_WRITE {
            let mut out = Vec::with_capacity(4 + frame.len());
            out.extend_from_slice(&prefix);
            out.extend_from_slice(&frame);
            self.stream.write_all(&out).await
        } else {
            self.stream.write_all(&prefix).await?;
            self.stream.write_all(&frame).await
        }
    }

    async fn recv(&mut self) -> Option<io::Result<BytesMut>> {
        let frame = read_frame(&mut self.stream, self.max_frame_bytes, &self.budget).await?;
        // The body was read into a buffer of its own: this takes it over, without a copy.
        Some(frame.map(BytesMut::from))
    }

    fn remote_ip(&self) -> IpAddr {
        self.remote
    }
}

/// Per-frame faults of the in-memory network. Probabilities are in `0..=1`.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    /// Each frame is delayed by a uniform draw from this range; frames of one connection then
    /// arrive out of order whenever the range is wider than their spacing.
    pub delay: (Duration, Duration),
}

/// An in-memory network of hosts, each named by one IP address. Cloning shares the network.
#[derive(Clone)]
pub struct MemNetwork {
    state: Arc<Mutex<NetState>>,
    max_frame_bytes: usize,
}

struct NetState {
    listeners: HashMap<SocketAddr, mpsc::UnboundedSender<MemConnection>>,
    datagram_sockets: HashMap<SocketAddr, mpsc::UnboundedSender<(Bytes, SocketAddr)>>,
    /// Every datagram is dropped: a network that blocks UDP.
    datagrams_blocked: bool,
    /// Host pairs that cannot reach each other, smaller address first.
    cut: HashSet<(IpAddr, IpAddr)>,
    names: HashMap<String, Vec<IpAddr>>,
    faults: Faults,
    rng: SmallRng,
    /// Frames handed over, and frames lost to faults or cuts.
    delivered: u64,
    dropped: u64,
    /// Connections opened.
    connections: u64,
}

impl MemNetwork {
    /// A network whose fault decisions follow `seed`.
    pub fn new(seed: u64, max_frame_bytes: usize) -> Self {
        MemNetwork {
            state: Arc::new(Mutex::new(NetState {
                listeners: HashMap::new(),
                datagram_sockets: HashMap::new(),
                datagrams_blocked: false,
                cut: HashSet::new(),
                names: HashMap::new(),
                faults: Faults::default(),
                rng: SmallRng::seed_from_u64(seed),
                delivered: 0,
                dropped: 0,
                connections: 0,
            })),
            max_frame_bytes,
        }
    }

    fn state(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transport of one host.
    pub fn host(&self, ip: IpAddr) -> MemTransport {
        MemTransport {
            net: self.clone(),
            ip,
        }
    }

    /// Makes `name` resolve to `ips` (an empty list makes it unresolvable).
    pub fn set_name(&self, name: &str, ips: Vec<IpAddr>) {
        self.state().names.insert(name.to_owned(), ips);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    /// Cuts every pair of hosts that lie in different groups.
    pub fn partition(&self, groups: &[&[IpAddr]]) {
        let mut state = self.state();
        for (i, left) in groups.iter().enumerate() {
            for right in &groups[i + 1..] {
                for &a in left.iter() {
                    for &b in right.iter() {
                        state.cut.insert(pair(a, b));
                    }
                }
            }
        }
    }

    pub fn cut(&self, a: IpAddr, b: IpAddr) {
        self.state().cut.insert(pair(a, b));
    }

    pub fn heal(&self) {
        self.state().cut.clear();
    }

    /// Drops every datagram from now on (or no longer), as a firewall that blocks UDP does.
    pub fn block_datagrams(&self, blocked: bool) {
        self.state().datagrams_blocked = blocked;
    }

    /// Connections opened so far.
    pub fn connection_count(&self) -> u64 {
        self.state().connections
    }

    /// Frames (datagrams included) delivered and dropped so far.
    pub fn frame_counts(&self) -> (u64, u64) {
        let state = self.state();
        (state.delivered, state.dropped)
    }
}

impl MemNetwork {
    /// A connection from host `from` to the listener at `to`; `None` across a cut.
    fn open(&self, from: IpAddr, to: SocketAddr) -> io::Result<Option<MemConnection>> {
        let mut state = self.state();
        if state.cut.contains(&pair(from, to.ip())) {
            return Ok(None);
        }
        let listener = state
            .listeners
            .get(&to)
            .ok_or(io::ErrorKind::ConnectionRefused)?;
        let (to_them, from_me) = mpsc::unbounded_channel();
        let (to_me, from_them) = mpsc::unbounded_channel();
        let end = |local, remote, outgoing, incoming| MemConnection {
            local,
            remote,
            outgoing,
            incoming,
            net: self.clone(),
        };
        listener
            .send(end(to.ip(), from, to_me, from_me))
            .map_err(|_| io::ErrorKind::ConnectionRefused)?;
        state.delivered += 1;
        state.connections += 1;
        Ok(Some(end(from, to.ip(), to_them, from_them)))
    }
}

fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// One host's view of a [`MemNetwork`].
#[derive(Clone)]
pub struct MemTransport {
    net: MemNetwork,
    ip: IpAddr,
}

pub struct MemListener {
    address: SocketAddr,
    incoming: mpsc::UnboundedReceiver<MemConnection>,
    net: MemNetwork,
}

impl Drop for MemListener {
    fn drop(&mut self) {
        self.net.state().listeners.remove(&self.address);
    }
}

/// One end of an in-memory connection. Dropping it closes the other end's `recv`.
pub struct MemConnection {
    local: IpAddr,
    remote: IpAddr,
    outgoing: mpsc::UnboundedSender<Bytes>,
    incoming: mpsc::UnboundedReceiver<Bytes>,
    net: MemNetwork,
}

impl MemTransport {
    /// The IP a socket asked to bind `address` gets: this host's.
    fn local_ip(&self, address: SocketAddr) -> io::Result<IpAddr> {
        if address.ip().is_unspecified() || address.ip() == self.ip {
            Ok(self.ip)
        } else {
            Err(io::ErrorKind::AddrNotAvailable.into())
        }
    }
}

impl Transport for MemTransport {
    type Connection = MemConnection;
    type Listener = MemListener;
    type Datagram = MemDatagram;

    fn bind(&self, address: SocketAddr) -> io::Result<MemListener> {
        let ip = self.local_ip(address)?;
        let mut state = self.net.state();
        let mut port = address.port();
        if port == 0 {
            port = (40000..u16::MAX)
                .find(|&p| !state.listeners.contains_key(&SocketAddr::new(ip, p)))
                .ok_or(io::ErrorKind::AddrInUse)?;
        }
        let address = SocketAddr::new(ip, port);
        if state.listeners.contains_key(&address) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let (sender, incoming) = mpsc::unbounded_channel();
        state.listeners.insert(address, sender);
        Ok(MemListener {
            address,
            incoming,
            net: self.net.clone(),
        })
    }

    fn bind_datagram(&self, address: SocketAddr) -> io::Result<MemDatagram> {
        let address = SocketAddr::new(self.local_ip(address)?, address.port());
        let mut state = self.net.state();
        if address.port() == 0 {
            // A node binds its datagram socket at its listener's port, always a known one.
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if state.datagram_sockets.contains_key(&address) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let (sender, incoming) = mpsc::unbounded_channel();
        state.datagram_sockets.insert(address, sender);
        Ok(MemDatagram {
            address,
            incoming: tokio::sync::Mutex::new(incoming),
            net: self.net.clone(),
        })
    }

    async fn connect(&self, address: SocketAddr) -> io::Result<MemConnection> {
        match self.net.open(self.ip, address)? {
            Some(connection) => Ok(connection),
            // A partitioned host never answers: the caller's connect timeout decides.
            None => std::future::pending().await,
        }
    }

    async fn resolve(&self, host_port: &str) -> io::Result<Vec<SocketAddr>> {
        if let Ok(address) = host_port.parse::<SocketAddr>() {
            return Ok(vec![address]);
        }
        let (host, port) = host_port
            .rsplit_once(':')
            .ok_or(io::ErrorKind::InvalidInput)?;
        let port: u16 = port.parse().map_err(|_| io::ErrorKind::InvalidInput)?;
        let ips = self
            .net
            .state()
            .names
            .get(host)
            .cloned()
            .unwrap_or_default();
        if ips.is_empty() {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    fn route_to(&self, remote: IpAddr) -> Option<IpAddr> {
        Some(if remote.is_loopback() {
            remote
        } else {
            self.ip
        })
    }

    fn host_addresses(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST), self.ip]
    }
}

impl Listener for MemListener {
    type Connection = MemConnection;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.address)
    }

    async fn accept(&mut self) -> io::Result<MemConnection> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl NetState {
    /// The delays after which the copies of one frame from `from` to `to` arrive: none when it
    /// is lost to a cut or a fault, two when duplicated.
    fn deliveries(&mut self, from: IpAddr, to: IpAddr) -> Vec<Duration> {
        let faults = self.faults.clone();
        if self.cut.contains(&pair(from, to)) || self.rng.gen_bool(faults.drop.clamp(0.0, 1.0)) {
            self.dropped += 1;
            return Vec::new();
        }
        let copies = 1 + self.rng.gen_bool(faults.duplicate.clamp(0.0, 1.0)) as usize;
        let (low, high) = faults.delay;
        self.delivered += copies as u64;
        (0..copies)
            .map(|_| {
                if high > low {
                    self.rng.gen_range(low..=high)
                } else {
                    low
                }
            })
            .collect()
    }
}

/// Hands `item` to `outgoing` after each delay.
fn deliver<M: Clone + Send + 'static>(
    outgoing: &mpsc::UnboundedSender<M>,
    item: M,
    delays: Vec<Duration>,
) {
    for delay in delays {
        if delay.is_zero() {
            let _ = outgoing.send(item.clone());
        } else {
            let outgoing = outgoing.clone();
            let item = item.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = outgoing.send(item);
            });
        }
    }
}

impl Connection for MemConnection {
    async fn send(&mut self, frame: Bytes) -> io::Result<()> {
        if frame.len() > self.net.max_frame_bytes {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let delays = self.net.state().deliveries(self.local, self.remote);
        deliver(&self.outgoing, frame, delays);
        Ok(())
    }

    async fn recv(&mut self) -> Option<io::Result<BytesMut>> {
        self.incoming
            .recv()
            .await
            .map(|frame| Ok(BytesMut::from(&frame[..])))
    }

    fn remote_ip(&self) -> IpAddr {
        self.remote
    }
}

/// The largest payload of a UDP datagram over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65507;

/// A datagram socket on a [`MemNetwork`]. Dropping it unbinds its address.
pub struct MemDatagram {
    address: SocketAddr,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<(Bytes, SocketAddr)>>,
    net: MemNetwork,
}

impl Drop for MemDatagram {
    fn drop(&mut self) {
        self.net.state().datagram_sockets.remove(&self.address);
    }
}

impl Datagram for MemDatagram {
    async fn send_to(&self, datagram: Bytes, to: SocketAddr) -> io::Result<()> {
        if datagram.len() > MAX_UDP_PAYLOAD {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut state = self.net.state();
        let Some(socket) = state.datagram_sockets.get(&to).cloned() else {
            state.dropped += 1;
            return Ok(());
        };
        if state.datagrams_blocked {
            state.dropped += 1;
            return Ok(());
        }
        let delays = state.deliveries(self.address.ip(), to.ip());
        drop(state);
        deliver(&socket, (datagram, self.address), delays);
        Ok(())
    }

    async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (datagram, from) = self
            .incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(io::ErrorKind::NotConnected)?;
        let len = datagram.len().min(buffer.len());
        buffer[..len].copy_from_slice(&datagram[..len]);
        Ok((len, from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream};

    fn prefix(len: usize) -> [u8; 4] {
        (len as u32).to_be_bytes()
    }

    /// A reader of frames up to 1 MiB whose sender has written `bytes` so far.
    async fn sender_of(bytes: &[u8]) -> (DuplexStream, DuplexStream) {
        let (mut writer, reader) = duplex(2 << 20);
        writer.write_all(bytes).await.unwrap();
        (writer, reader)
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_bad_lengths_are_refused_before_the_body() {
        let budget = FrameBudget::new(1 << 20);
        let mut bytes = prefix(5).to_vec();
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&prefix(0));
        let (writer, mut reader) = sender_of(&bytes).await;
        drop(writer);
        let frame = read_frame(&mut reader, 16, &budget).await.unwrap().unwrap();
        assert_eq!(&frame[..], b"hello");
        assert!(read_frame(&mut reader, 16, &budget)
            .await
            .unwrap()
            .unwrap()
            .is_empty());
        assert!(
            read_frame(&mut reader, 16, &budget).await.is_none(),
            "a clean close"
        );

        let (_writer, mut reader) = sender_of(&prefix(17)).await;
        let refused = read_frame(&mut reader, 16, &budget)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData);

        let (writer, mut reader) = sender_of(&[0, 0, 0, 9, 1, 2]).await;
        drop(writer);
        let cut = read_frame(&mut reader, 16, &budget)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_frames_stay_within_the_budget_and_the_oldest_make_room() {
        let budget = FrameBudget::new(1 << 20);
        let frame_len = 900 << 10;
        // Ten senders each announce a 900 KiB frame, send 300 KiB of it and stall.
        let mut stalled = Vec::new();
        for _ in 0..10 {
            let mut bytes = prefix(frame_len).to_vec();
            bytes.resize(4 + (300 << 10), 7);
            let (writer, mut reader) = sender_of(&bytes).await;
            let shared = budget.clone();
            let reading =
                tokio::spawn(async move { read_frame(&mut reader, 1 << 20, &shared).await });
            stalled.push((writer, reading));
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(budget.held() <= 1 << 20, "{} bytes held", budget.held());
        }
        // Only the newest few still hold bytes; the oldest were dropped to make room.
        let mut evicted = 0;
        for (_, reading) in stalled.iter_mut().take(7) {
            let result = reading.await.unwrap().unwrap();
            assert_eq!(result.unwrap_err().kind(), io::ErrorKind::OutOfMemory);
            evicted += 1;
        }
        assert_eq!(evicted, 7);
        // A frame that arrives at once is read in full, at the expense of a stalled one.
        let mut bytes = prefix(frame_len).to_vec();
        bytes.resize(4 + frame_len, 1);
        let (_writer, mut reader) = sender_of(&bytes).await;
        let whole = read_frame(&mut reader, 1 << 20, &budget)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(whole.len(), frame_len);
        drop(stalled);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(budget.held(), 0, "every byte given back");
    }
}
