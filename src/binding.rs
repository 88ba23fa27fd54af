//! The Node-API binding: the only module that knows about JavaScript. `index.js` wraps the
//! `NativeGossiper` class in an EventEmitter and does all argument checking; this layer converts
//! and forwards.
//!
//! Events reach JavaScript through one weak threadsafe function per gossiper. The engine appends
//! events to a byte queue and schedules at most one call at a time; that call takes the whole
//! queue, so a slow listener receives bigger batches instead of a growing backlog of calls.
//! Batches are MessagePack records (see `EventBatch`), values embedded as the bytes peers sent.

use crate::config::{OptionError, Settings, DEFAULT_CLUSTER_NAME, NUMERIC_OPTIONS, OTHER_OPTIONS};
use crate::node::{runtime, Listen, Node};
use crate::protocol::{Event, EventSink};
use crate::seal::{KeyError, Keys, KEY_BYTES};
use crate::wire::Rejection;
use bytes::Bytes;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use zeroize::Zeroizing;

/// The longest TTL a key may be written with, in milliseconds (a year); the shortest is 1.
#[napi]
pub const MAX_TTL_MS: f64 = 365.0 * 24.0 * 3600e3;

/// One row of the option table (see `config::NUMERIC_OPTIONS`), for `index.js`.
#[napi(object)]
pub struct NativeOptionSpec {
    pub name: String,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    pub integer: bool,
}

/// Every numeric option with its default and bounds, and the names of the other options.
#[napi]
pub fn option_specs() -> Vec<NativeOptionSpec> {
    NUMERIC_OPTIONS
        .iter()
        .map(|o| NativeOptionSpec {
            name: o.name.into(),
            default: o.default,
            min: o.min,
            max: o.max,
            integer: o.integer,
        })
        .collect()
}

#[napi]
pub fn other_option_names() -> Vec<String> {
    OTHER_OPTIONS.iter().map(|&n| n.into()).collect()
}

#[napi(object)]
pub struct NativePeerInfo {
    pub name: String,
    pub generation: f64,
    pub heartbeat: f64,
    pub max_version: f64,
    pub live: bool,
    pub left: bool,
    pub phi: f64,
    pub horizon: f64,
}

#[napi(object)]
pub struct NativeStats {
    pub messages_sent: f64,
    pub messages_received: f64,
    pub bytes_sent: f64,
    pub bytes_received: f64,
    pub exchanges: f64,
    pub datagram_exchanges: f64,
    pub pushes_sent: f64,
    pub connect_failures: f64,
    pub send_failures: f64,
    pub connections_refused: f64,
    pub connects_skipped: f64,
    pub seed_resolve_failures: f64,
    /// New incarnations begun to refute claims about this node that it did not make.
    pub refutations: f64,
    pub plaintext_accepted: f64,
    /// Input refused (frames, connections, names, keys; for `implausible`, node entries), by
    /// reason.
    pub rejected: std::collections::HashMap<String, f64>,
}

/// Pending events, encoded as consecutive MessagePack records:
/// `0, peer, count, (key, value) × count` for updates of one peer in version order,
/// `4, peer, count, key × count` for its deletions, and `1, peer` / `2, peer` / `3, peer` for
/// new_peer, peer_alive, peer_failed. Updates and deletions of one peer that follow each other
/// alternate between groups, so their order is kept.
#[derive(Default)]
struct EventBatch {
    bytes: Vec<u8>,
    /// The group being extended: its kind, its peer and where its fixed-width count sits.
    open_group: Option<(u8, String, usize)>,
    call_pending: bool,
}

const UPDATES: u8 = 0;
const DELETES: u8 = 4;

impl EventBatch {
    fn push(&mut self, event: Event<'_>) {
        let (kind, peer) = match event {
            Event::Update { peer, key, value } => {
                self.extend_group(UPDATES, peer);
                write_str(&mut self.bytes, key);
                self.bytes.extend_from_slice(value);
                return;
            }
            Event::Delete { peer, key } => {
                self.extend_group(DELETES, peer);
                write_str(&mut self.bytes, key);
                return;
            }
            Event::NewPeer(peer) => (1, peer),
            Event::PeerAlive(peer) => (2, peer),
            Event::PeerFailed(peer) => (3, peer),
        };
        self.open_group = None;
        self.bytes.push(kind);
        write_str(&mut self.bytes, peer);
    }

    /// Counts one more entry in the open group of `kind` for `peer`, or opens one.
    fn extend_group(&mut self, kind: u8, peer: &str) {
        match &self.open_group {
            Some((open_kind, open_peer, at)) if *open_kind == kind && open_peer == peer => {
                let at = *at;
                let count =
                    u32::from_be_bytes(self.bytes[at + 1..at + 5].try_into().unwrap_or_default());
                self.bytes[at + 1..at + 5].copy_from_slice(&(count + 1).to_be_bytes());
            }
            _ => {
                self.bytes.push(kind);
                write_str(&mut self.bytes, peer);
                let at = self.bytes.len();
                self.bytes.extend_from_slice(&[0xce, 0, 0, 0, 1]);
                self.open_group = Some((kind, peer.to_owned(), at));
            }
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len();
    match len {
        0..=31 => out.push(0xa0 | len as u8),
        32..=0xff => out.extend_from_slice(&[0xd9, len as u8]),
        0x100..=0xffff => {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

type Deliver = ThreadsafeFunction<(), (), Buffer, Status, false, true>;

struct JsSink {
    batch: Arc<Mutex<EventBatch>>,
    /// Set once, right after construction; weak, so it never keeps Node alive by itself.
    deliver: OnceLock<Deliver>,
}

impl EventSink for JsSink {
    fn emit(&self, event: Event<'_>) {
        let mut batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        batch.push(event);
        if !batch.call_pending {
            if let Some(deliver) = self.deliver.get() {
                batch.call_pending =
                    deliver.call((), ThreadsafeFunctionCallMode::NonBlocking) == Status::Ok;
            }
        }
    }
}

#[napi]
pub struct NativeGossiper {
    node: Arc<Node>,
    listen: Listen,
}

/// Throws `error` as a TypeError or RangeError carrying its code.
fn throw(env: &Env, error: OptionError) -> Error {
    let thrown = if error.range {
        env.throw_range_error(&error.message, Some(error.code))
    } else {
        env.throw_type_error(&error.message, Some(error.code))
    };
    match thrown {
        Ok(()) => Error::new(Status::PendingException, error.message),
        Err(e) => e,
    }
}

fn invalid(code: &'static str, message: String) -> OptionError {
    OptionError::type_error(code, message)
}

/// Throws a plain Error carrying `code`.
fn throw_error(env: &Env, code: &str, message: &str) -> Error {
    match env.throw_error(message, Some(code)) {
        Ok(()) => Error::new(Status::PendingException, message.to_owned()),
        Err(e) => e,
    }
}

/// A key's bytes, copied into memory that is wiped when dropped. The message names the
/// argument and the length, never the bytes.
fn secret(
    bytes: &[u8],
    argument: &str,
) -> std::result::Result<Zeroizing<[u8; KEY_BYTES]>, OptionError> {
    let mut secret = Zeroizing::new([0u8; KEY_BYTES]);
    if bytes.len() != KEY_BYTES {
        return Err(OptionError {
            range: true,
            code: "ERR_CRYPTO_INVALID_KEYLEN",
            message: format!(
                "The \"{argument}\" argument must be {KEY_BYTES} bytes. Received {} bytes",
                bytes.len()
            ),
        });
    }
    secret.copy_from_slice(bytes);
    Ok(secret)
}

/// What a node is created with, besides its settings.
struct Options {
    settings: Settings,
    listen: Listen,
    seeds: Vec<String>,
    keys: Vec<Zeroizing<[u8; KEY_BYTES]>>,
}

/// Reads and checks every option: the native class is reachable from JavaScript, so it trusts
/// nothing `index.js` checked already.
fn read_options(options: &Object) -> std::result::Result<Options, OptionError> {
    let keys = Object::keys(options).map_err(|e| invalid("ERR_INVALID_ARG_TYPE", e.reason))?;
    for key in &keys {
        let known =
            NUMERIC_OPTIONS.iter().any(|o| o.name == key) || OTHER_OPTIONS.contains(&key.as_str());
        if !known {
            return Err(invalid(
                "ERR_INVALID_ARG_VALUE",
                format!("The option \"{key}\" is not known"),
            ));
        }
    }
    let text = |name: &str| -> std::result::Result<Option<String>, OptionError> {
        options.get::<String>(name).map_err(|_| {
            invalid(
                "ERR_INVALID_ARG_TYPE",
                format!("The \"{name}\" argument must be a string"),
            )
        })
    };
    let mut numbers = std::collections::HashMap::new();
    for option in NUMERIC_OPTIONS {
        let value = options.get::<f64>(option.name).map_err(|_| {
            invalid(
                "ERR_INVALID_ARG_TYPE",
                format!("The \"{}\" argument must be a number", option.name),
            )
        })?;
        if let Some(value) = value {
            numbers.insert(option.name, value);
        }
    }
    let cluster_name = text("clusterName")?.unwrap_or_else(|| DEFAULT_CLUSTER_NAME.into());
    let mut settings = Settings::from_options(cluster_name, |name| numbers.get(name).copied())?;
    let key_buffers = options.get::<Vec<Buffer>>("keys").map_err(|_| {
        invalid(
            "ERR_INVALID_ARG_TYPE",
            "The \"keys\" argument must be an array of 32-byte Buffers".into(),
        )
    })?;
    let keys = match key_buffers {
        None => Vec::new(),
        Some(buffers) if buffers.is_empty() => {
            return Err(invalid(
                "ERR_INVALID_ARG_VALUE",
                "The \"keys\" argument must hold at least one key".into(),
            ))
        }
        Some(buffers) => buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| secret(buffer, &format!("keys[{i}]")))
            .collect::<std::result::Result<_, _>>()?,
    };
    settings.accept_plaintext = options
        .get::<bool>("acceptPlaintext")
        .map_err(|_| {
            invalid(
                "ERR_INVALID_ARG_TYPE",
                "The \"acceptPlaintext\" argument must be a boolean".into(),
            )
        })?
        .unwrap_or(false);
    if settings.accept_plaintext && keys.is_empty() {
        return Err(invalid(
            "ERR_INVALID_ARG_VALUE",
            "The \"acceptPlaintext\" option needs \"keys\": without keys every frame is plaintext"
                .into(),
        ));
    }
    let address = match text("address")? {
        None => None,
        Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
            invalid(
                "ERR_INVALID_ARG_VALUE",
                format!("The \"address\" argument must be an IP address. Received '{text}'"),
            )
        })?),
    };
    let advertise = match text("advertise")? {
        None => None,
        Some(text) => Some(parse_advertise(&text).ok_or_else(|| {
            invalid(
                "ERR_INVALID_ARG_VALUE",
                format!("The \"advertise\" argument must be \"ip:port\", \"[ipv6]:port\" or an IP address. Received '{text}'"),
            )
        })?),
    };
    let seeds = options
        .get::<Vec<String>>("seeds")
        .map_err(|_| {
            invalid(
                "ERR_INVALID_ARG_TYPE",
                "The \"seeds\" argument must be an array of \"host:port\" strings".into(),
            )
        })?
        .unwrap_or_default();
    for (i, seed) in seeds.iter().enumerate() {
        if !crate::address::is_valid_seed(seed) {
            return Err(invalid(
                "ERR_INVALID_ARG_VALUE",
                format!("The \"seeds[{i}]\" argument must be \"host:port\" or \"[ipv6]:port\". Received '{seed}'"),
            ));
        }
    }
    let port = numbers.get("port").copied().unwrap_or(0.0) as u16;
    Ok(Options {
        settings,
        listen: Listen {
            port,
            address,
            advertise,
        },
        seeds,
        keys,
    })
}

fn key_error(env: &Env, error: KeyError) -> Error {
    let (code, message) = match error {
        KeyError::NoKeyring => (
            "ERR_GOSSIP_NO_KEYS",
            "This gossiper was created without keys: its frames are plaintext for its whole life",
        ),
        KeyError::NotInstalled => (
            "ERR_GOSSIP_UNKNOWN_KEY",
            "The key is not installed: installKey() it first",
        ),
        KeyError::Primary => (
            "ERR_GOSSIP_PRIMARY_KEY",
            "The primary key cannot be removed: useKey() another key first",
        ),
    };
    throw_error(env, code, message)
}

/// `ip:port`, `[v6]:port`, or a bare IP (port 0: the port we listen on).
fn parse_advertise(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    text.parse::<SocketAddr>().ok().filter(|a| a.port() != 0)
}

#[napi]
impl NativeGossiper {
    /// `on_events` receives batches of encoded events (see `EventBatch`). Bad options throw a
    /// TypeError or RangeError with a Node-style `code`.
    #[napi(constructor)]
    pub fn new(env: Env, options: Object, on_events: Function<Buffer, ()>) -> Result<Self> {
        let Options {
            settings,
            listen,
            seeds,
            keys,
        } = read_options(&options).map_err(|e| throw(&env, e))?;
        let batch = Arc::new(Mutex::new(EventBatch::default()));
        let sink = Arc::new(JsSink {
            batch: batch.clone(),
            deliver: OnceLock::new(),
        });
        let deliver: Deliver = on_events
            .build_threadsafe_function::<()>()
            .weak::<true>()
            .callee_handled::<false>()
            .build_callback(move |_| {
                let mut batch = batch.lock().unwrap_or_else(|e| e.into_inner());
                batch.call_pending = false;
                batch.open_group = None;
                Ok(Buffer::from(std::mem::take(&mut batch.bytes)))
            })?;
        let _ = sink.deliver.set(deliver);
        let node = Node::new(settings, seeds, sink).with_keys(Keys::new(keys));
        Ok(NativeGossiper {
            node: Arc::new(node),
            listen,
        })
    }

    /// Binds at once (a failure throws an Error whose `code` is `EADDRINUSE`, `EACCES`,
    /// `ERR_GOSSIP_RUNNING`, `ERR_GOSSIP_STOPPING`, ...), then resolves with our name once it is
    /// decided; `name()` has it at once unless a seed host name must be looked up first.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn start<'env>(&self, env: &'env Env) -> Result<Object<'env>> {
        let _runtime = runtime().enter();
        let (known, mut named) = self.node.start(&self.listen).map_err(|e| {
            match env.throw_error(&e.message, Some(e.code)) {
                Ok(()) => Error::new(Status::PendingException, e.message),
                Err(error) => error,
            }
        })?;
        let (deferred, promise) = env.create_deferred()?;
        // Known at once when no seed needs a lookup: no need to wait for a busy runtime.
        if let Some(name) = known {
            deferred.resolve(resolve_with(name));
            return Ok(promise);
        }
        runtime().spawn(async move {
            match named.wait_for(Option::is_some).await {
                Ok(name) => {
                    deferred.resolve(resolve_with(name.clone().unwrap_or_default()));
                }
                Err(_) => deferred.reject(Error::new(
                    Status::GenericFailure,
                    "stopped before it was named",
                )),
            }
        });
        Ok(promise)
    }

    /// Our name once decided (see `start`).
    #[napi]
    pub fn name(&self) -> Option<String> {
        self.node
            .with_cluster(|c| Some(c.name().to_owned()).filter(|n| !n.is_empty()))
    }

    /// Resolves once every task of this node has ended and its port is free; every call made
    /// while a stop is under way resolves at that same moment.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn stop<'env>(&self, env: &'env Env) -> Result<Object<'env>> {
        let (deferred, promise) = env.create_deferred()?;
        let _runtime = runtime().enter();
        let stopped = self.node.stop();
        runtime().spawn(async move {
            stopped.await;
            deferred.resolve(|_| Ok(()));
        });
        Ok(promise)
    }

    #[napi]
    pub fn is_running(&self) -> bool {
        self.node.is_running()
    }

    #[napi]
    pub fn is_stopping(&self) -> bool {
        self.node.is_stopping()
    }

    /// Returns false when the value equals the current one. `ttl_ms`, if given, must be from 1
    /// to [`MAX_TTL_MS`]. A write that would take this node past `maxKeysPerPeer` or
    /// `maxBytesPerPeer` (which peers would refuse) throws a RangeError; other errors carry the
    /// rejection reason.
    #[napi]
    pub fn set_local_state(
        &self,
        env: Env,
        key: String,
        value: Buffer,
        ttl_ms: Option<f64>,
    ) -> Result<bool> {
        let ttl = match ttl_ms {
            None => None,
            Some(ms) if (1.0..=MAX_TTL_MS).contains(&ms) => {
                Some(Duration::from_secs_f64(ms / 1000.0))
            }
            Some(ms) => {
                return Err(Error::new(
                    Status::InvalidArg,
                    format!("ttl must be >= 1 and <= {MAX_TTL_MS} ms. Received {ms}"),
                ))
            }
        };
        let settings = self.node.settings();
        self.node
            .set_local(&key, Bytes::copy_from_slice(&value), ttl)
            .map_err(|reason| match reason {
                Rejection::TooManyKeys => throw(
                    &env,
                    OptionError::range_error(format!(
                        "The \"key\" argument would be this node's key number {}, over the \
                         maxKeysPerPeer option ({})",
                        settings.max_keys_per_peer + 1,
                        settings.max_keys_per_peer
                    )),
                ),
                Rejection::TooManyBytes => throw(
                    &env,
                    OptionError::range_error(format!(
                        "The \"value\" argument would take this node's keys and values over \
                         the maxBytesPerPeer option ({} bytes)",
                        settings.max_bytes_per_peer
                    )),
                ),
                Rejection::BadKeyValue => Error::new(
                    Status::InvalidArg,
                    "key or value outside the configured limits".to_owned(),
                ),
                _ => Error::new(Status::InvalidArg, reason.as_str().to_owned()),
            })
    }

    /// True when the key existed.
    #[napi]
    pub fn delete_local_state(&self, key: String) -> bool {
        self.node.delete_local(&key)
    }

    #[napi]
    pub fn local_value(&self, key: String) -> Option<Buffer> {
        self.node
            .with_cluster(|c| c.local_value(&key).map(|v| Buffer::from(v.to_vec())))
    }

    #[napi]
    pub fn peer_value(&self, peer: String, key: String) -> Option<Buffer> {
        self.node
            .with_cluster(|c| c.node_value(&peer, &key).map(|v| Buffer::from(v.to_vec())))
    }

    #[napi]
    pub fn peer_keys(&self, peer: String) -> Vec<String> {
        self.node.with_cluster(|c| c.node_keys(&peer))
    }

    /// `live`: true for live peers, false for failed ones, absent for all.
    #[napi]
    pub fn peers(&self, live: Option<bool>) -> Vec<String> {
        self.node.with_cluster(|c| c.peer_names(live))
    }

    #[napi]
    pub fn peer_details(&self) -> Vec<NativePeerInfo> {
        self.node
            .peer_infos()
            .into_iter()
            .map(|p| NativePeerInfo {
                name: p.name,
                generation: p.generation as f64,
                heartbeat: p.heartbeat as f64,
                max_version: p.max_version as f64,
                live: p.live,
                left: p.left,
                phi: p.phi,
                horizon: p.horizon as f64,
            })
            .collect()
    }

    /// Accepts frames sealed with `key` from now on. False when it was installed already.
    #[napi]
    pub fn install_key(&self, env: Env, key: Buffer) -> Result<bool> {
        let secret = secret(&key, "key").map_err(|e| throw(&env, e))?;
        self.node
            .keys()
            .install(secret)
            .map_err(|e| key_error(&env, e))
    }

    /// Seals with the installed `key` from now on.
    #[napi]
    pub fn use_key(&self, env: Env, key: Buffer) -> Result<()> {
        let secret = secret(&key, "key").map_err(|e| throw(&env, e))?;
        self.node
            .keys()
            .make_primary(&secret)
            .map_err(|e| key_error(&env, e))
    }

    /// Stops accepting `key`. False when it was not installed.
    #[napi]
    pub fn remove_key(&self, env: Env, key: Buffer) -> Result<bool> {
        let secret = secret(&key, "key").map_err(|e| throw(&env, e))?;
        self.node
            .keys()
            .remove(&secret)
            .map_err(|e| key_error(&env, e))
    }

    /// Copies of the installed keys, primary first, for `index.js` to encode and wipe.
    #[napi]
    pub fn list_keys(&self) -> Vec<Buffer> {
        self.node
            .keys()
            .current()
            .keys()
            .iter()
            .map(|key| Buffer::from(key.secret().to_vec()))
            .collect()
    }

    #[napi]
    pub fn stats(&self) -> NativeStats {
        let c = self.node.counters();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed) as f64;
        NativeStats {
            messages_sent: n(&c.messages_sent),
            messages_received: n(&c.messages_received),
            bytes_sent: n(&c.bytes_sent),
            bytes_received: n(&c.bytes_received),
            exchanges: n(&c.exchanges),
            datagram_exchanges: n(&c.datagram_exchanges),
            pushes_sent: n(&c.pushes_sent),
            connect_failures: n(&c.connect_failures),
            send_failures: n(&c.send_failures),
            connections_refused: n(&c.connections_refused),
            connects_skipped: n(&c.connects_skipped),
            seed_resolve_failures: n(&c.seed_resolve_failures),
            refutations: n(&c.refutations),
            plaintext_accepted: n(&c.plaintext_accepted),
            rejected: Rejection::ALL
                .iter()
                .map(|&r| (r.as_str().to_owned(), c.rejected(r) as f64))
                .collect(),
        }
    }
}

/// Resolves a deferred with a name; one type for both of `start`'s ways to resolve.
fn resolve_with(name: String) -> impl FnOnce(Env) -> Result<String> {
    move |_| Ok(name)
}
