//! gossiper: cluster membership and shared per-node state for Node.js, by gossip.
//!
//! The engine is plain Rust; only [`binding`] knows about Node-API.
//! - [`wire`]: frames and message encodings, and the checks every inbound frame passes.
//! - [`protocol`]: the Scuttlebutt state machine, peer selection and liveness.
//! - [`detector`]: phi-accrual failure detection.
//! - [`node`]: the tokio tasks that run a node over TCP on one shared runtime.

pub mod address;
pub mod config;
pub mod detector;
pub mod exchange;
pub mod node;
pub mod peers;
pub mod protocol;
pub mod store;
pub mod transport;
pub mod wire;

mod binding;
