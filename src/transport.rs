//! Transports: how a node listens, connects and moves frames. The node's tasks only see the
//! [`Transport`] trait, so the same code runs over TCP ([`Tcp`]) and over an in-memory network
//! ([`MemNetwork`]) that tests drive with a seeded RNG and tokio's paused clock.
//!
//! A connection carries whole frames (the bytes of one encoded message) both ways. Both
//! transports refuse frames over `max_frame_bytes` on either side, so a test over memory meets
//! the same limits as TCP. The in-memory network injects faults per frame (drop, delay, reorder
//! through random delays, duplicate) and per pair of hosts (partitions).

use crate::wire;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Where nodes listen and how they reach each other.
pub trait Transport: Send + Sync + 'static {
    type Connection: Connection;
    type Listener: Listener<Connection = Self::Connection>;

    /// Binds at once, so that `start` reports a busy port synchronously. An unspecified IP
    /// (`0.0.0.0`, `::`) binds every interface.
    fn bind(&self, address: SocketAddr) -> io::Result<Self::Listener>;

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
    /// kind `InvalidData`.
    fn recv(&mut self) -> impl Future<Output = Option<io::Result<BytesMut>>> + Send;
}

/// TCP with a 4-byte big-endian length before every frame.
#[derive(Clone, Debug)]
pub struct Tcp {
    max_frame_bytes: usize,
}

impl Tcp {
    pub fn new(max_frame_bytes: usize) -> Self {
        Tcp { max_frame_bytes }
    }

    fn framed(&self, stream: TcpStream) -> TcpConnection {
        // Gossip frames are small and latency matters more than coalescing.
        let _ = stream.set_nodelay(true);
        TcpConnection(Framed::new(stream, wire::codec(self.max_frame_bytes)))
    }
}

pub struct TcpConnection(Framed<TcpStream, LengthDelimitedCodec>);

pub struct TcpTransportListener {
    listener: TcpListener,
    tcp: Tcp,
}

impl Transport for Tcp {
    type Connection = TcpConnection;
    type Listener = TcpTransportListener;

    fn bind(&self, address: SocketAddr) -> io::Result<TcpTransportListener> {
        let listener = if address.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            // Dual-stack where the host has IPv6, so 127.0.0.1 and ::1 both reach us.
            StdListener::bind(address).or_else(|_| {
                StdListener::bind(SocketAddr::new(
                    Ipv4Addr::UNSPECIFIED.into(),
                    address.port(),
                ))
            })?
        } else {
            StdListener::bind(address)?
        };
        listener.set_nonblocking(true)?;
        Ok(TcpTransportListener {
            listener: TcpListener::from_std(listener)?,
            tcp: self.clone(),
        })
    }

    async fn connect(&self, address: SocketAddr) -> io::Result<TcpConnection> {
        Ok(self.framed(TcpStream::connect(address).await?))
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
        Ok(self.tcp.framed(stream))
    }
}

impl Connection for TcpConnection {
    async fn send(&mut self, frame: Bytes) -> io::Result<()> {
        self.0.send(frame).await
    }

    async fn recv(&mut self) -> Option<io::Result<BytesMut>> {
        self.0.next().await
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
    /// Host pairs that cannot reach each other, smaller address first.
    cut: HashSet<(IpAddr, IpAddr)>,
    names: HashMap<String, Vec<IpAddr>>,
    faults: Faults,
    rng: SmallRng,
    /// Frames handed over, and frames lost to faults or cuts.
    delivered: u64,
    dropped: u64,
}

impl MemNetwork {
    /// A network whose fault decisions follow `seed`.
    pub fn new(seed: u64, max_frame_bytes: usize) -> Self {
        MemNetwork {
            state: Arc::new(Mutex::new(NetState {
                listeners: HashMap::new(),
                cut: HashSet::new(),
                names: HashMap::new(),
                faults: Faults::default(),
                rng: SmallRng::seed_from_u64(seed),
                delivered: 0,
                dropped: 0,
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

    /// Frames delivered and frames dropped so far.
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

impl Transport for MemTransport {
    type Connection = MemConnection;
    type Listener = MemListener;

    fn bind(&self, address: SocketAddr) -> io::Result<MemListener> {
        let ip = if address.ip().is_unspecified() {
            self.ip
        } else if address.ip() == self.ip {
            address.ip()
        } else {
            return Err(io::ErrorKind::AddrNotAvailable.into());
        };
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

impl Connection for MemConnection {
    async fn send(&mut self, frame: Bytes) -> io::Result<()> {
        if frame.len() > self.net.max_frame_bytes {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let delays = {
            let mut state = self.net.state();
            let faults = state.faults.clone();
            if state.cut.contains(&pair(self.local, self.remote))
                || state.rng.gen_bool(faults.drop.clamp(0.0, 1.0))
            {
                state.dropped += 1;
                return Ok(());
            }
            let copies = 1 + state.rng.gen_bool(faults.duplicate.clamp(0.0, 1.0)) as usize;
            let (low, high) = faults.delay;
            let delays: Vec<Duration> = (0..copies)
                .map(|_| {
                    if high > low {
                        state.rng.gen_range(low..=high)
                    } else {
                        low
                    }
                })
                .collect();
            state.delivered += copies as u64;
            delays
        };
        for delay in delays {
            if delay.is_zero() {
                let _ = self.outgoing.send(frame.clone());
            } else {
                let outgoing = self.outgoing.clone();
                let frame = frame.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = outgoing.send(frame);
                });
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> Option<io::Result<BytesMut>> {
        self.incoming
            .recv()
            .await
            .map(|frame| Ok(BytesMut::from(&frame[..])))
    }
}
