//! The Node-API binding: the only module that knows about JavaScript. `index.js` wraps the
//! `NativeGossiper` class in an EventEmitter and does all argument checking; this layer converts
//! and forwards.
//!
//! Events reach JavaScript through one weak threadsafe function per gossiper. The engine appends
//! events to a byte queue and schedules at most one call at a time; that call takes the whole
//! queue, so a slow listener receives bigger batches instead of a growing backlog of calls.
//! Batches are MessagePack records (see `EventBatch`), values embedded as the bytes peers sent.

use crate::config::Settings;
use crate::node::{runtime, Listen, Node};
use crate::protocol::{Event, EventSink};
use crate::wire::{Limits, Rejection};
use bytes::Bytes;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[napi(object)]
pub struct NativeOptions {
    pub port: u32,
    pub address: Option<String>,
    pub seeds: Vec<String>,
    pub cluster_name: String,
    pub gossip_interval_ms: f64,
    pub gossip_fanout: u32,
    pub phi_threshold: f64,
    pub max_interval_ms: f64,
    pub dead_peer_ttl_ms: f64,
    pub push_fanout: u32,
    pub connect_timeout_ms: f64,
    pub idle_timeout_ms: f64,
    pub max_frame_bytes: u32,
    pub max_key_bytes: u32,
    pub max_value_bytes: u32,
    pub max_peers_per_message: u32,
    pub max_inbound_connections: u32,
}

/// `start`'s outcome: `name` on success, otherwise a Node-style `code` and `message`.
#[napi(object)]
pub struct StartOutcome {
    pub name: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
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
}

#[napi(object)]
pub struct NativeStats {
    pub messages_sent: f64,
    pub messages_received: f64,
    pub bytes_sent: f64,
    pub bytes_received: f64,
    pub exchanges: f64,
    pub pushes_sent: f64,
    pub connect_failures: f64,
    pub connections_refused: f64,
    /// Frames dropped, by reason.
    pub rejected: std::collections::HashMap<String, f64>,
}

/// Pending events, encoded as consecutive MessagePack records:
/// `0, peer, count, (key, value) × count` for updates of one peer in version order, and
/// `1, peer` / `2, peer` / `3, peer` for new_peer, peer_alive, peer_failed.
#[derive(Default)]
struct EventBatch {
    bytes: Vec<u8>,
    /// The update record being extended: its peer and where its fixed-width count sits.
    open_group: Option<(String, usize)>,
    call_pending: bool,
}

impl EventBatch {
    fn push(&mut self, event: Event<'_>) {
        let (kind, peer) = match event {
            Event::Update { peer, key, value } => {
                match &self.open_group {
                    Some((open, at)) if open == peer => {
                        let at = *at;
                        let count = u32::from_be_bytes(
                            self.bytes[at + 1..at + 5].try_into().unwrap_or_default(),
                        );
                        self.bytes[at + 1..at + 5].copy_from_slice(&(count + 1).to_be_bytes());
                    }
                    _ => {
                        self.bytes.push(0);
                        write_str(&mut self.bytes, peer);
                        let at = self.bytes.len();
                        self.bytes.extend_from_slice(&[0xce, 0, 0, 0, 1]);
                        self.open_group = Some((peer.to_owned(), at));
                    }
                }
                write_str(&mut self.bytes, key);
                self.bytes.extend_from_slice(value);
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

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

#[napi]
impl NativeGossiper {
    /// `on_events` receives batches of encoded events (see `EventBatch`).
    #[napi(constructor)]
    pub fn new(options: NativeOptions, on_events: Function<Buffer, ()>) -> Result<Self> {
        let address = match options.address.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                Error::new(
                    Status::InvalidArg,
                    format!("address is not an IP address: {text}"),
                )
            })?),
        };
        let gossip_interval = millis(options.gossip_interval_ms);
        let settings = Settings {
            cluster_name: options.cluster_name,
            gossip_interval,
            gossip_fanout: options.gossip_fanout as usize,
            phi_threshold: options.phi_threshold,
            detector: crate::detector::DetectorConfig::for_interval(
                gossip_interval,
                millis(options.max_interval_ms),
            ),
            dead_peer_ttl: millis(options.dead_peer_ttl_ms),
            limits: Limits {
                max_frame_bytes: options.max_frame_bytes as usize,
                max_key_bytes: options.max_key_bytes as usize,
                max_value_bytes: options.max_value_bytes as usize,
                max_peers_per_message: options.max_peers_per_message as usize,
            },
            push_fanout: options.push_fanout as usize,
            connect_timeout: millis(options.connect_timeout_ms),
            idle_timeout: millis(options.idle_timeout_ms),
            max_inbound_connections: options.max_inbound_connections as usize,
        };
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
        let node = Node::new(settings, options.seeds, sink);
        Ok(NativeGossiper {
            node: Arc::new(node),
            listen: Listen {
                port: options.port as u16,
                address,
            },
        })
    }

    #[napi]
    pub fn start(&self) -> StartOutcome {
        match self.node.start(&self.listen) {
            Ok(name) => StartOutcome {
                name: Some(name),
                code: None,
                message: None,
            },
            Err(e) => StartOutcome {
                name: None,
                code: Some(e.code.into()),
                message: Some(e.message),
            },
        }
    }

    /// Resolves once every task of this node has ended.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn stop<'env>(&self, env: &'env Env) -> Result<Object<'env>> {
        let (deferred, promise) = env.create_deferred()?;
        let node = self.node.clone();
        runtime().spawn(async move {
            node.stop().await;
            deferred.resolve(|_| Ok(()));
        });
        Ok(promise)
    }

    #[napi]
    pub fn is_running(&self) -> bool {
        self.node.is_running()
    }

    /// Returns false when the value equals the current one. Errors carry the rejection reason.
    #[napi]
    pub fn set_local_state(&self, key: String, value: Buffer) -> Result<bool> {
        self.node
            .set_local(&key, Bytes::copy_from_slice(&value))
            .map_err(|reason| {
                let what = match reason {
                    Rejection::BadKeyValue => "key or value outside the configured limits",
                    _ => reason.as_str(),
                };
                Error::new(Status::InvalidArg, what.to_owned())
            })
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
            })
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
            pushes_sent: n(&c.pushes_sent),
            connect_failures: n(&c.connect_failures),
            connections_refused: n(&c.connections_refused),
            rejected: Rejection::ALL
                .iter()
                .map(|r| (r.as_str().to_owned(), c.rejected(*r) as f64))
                .collect(),
        }
    }
}
