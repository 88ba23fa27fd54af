//! gossiper: cluster membership and shared per-node state for Node.js, by gossip.
//!
//! The engine is plain Rust; only [`binding`] knows about Node-API.
//! - [`wire`]: frames and message encodings, and the checks every inbound frame passes.
//! - [`seal`]: authenticated encryption of frames under a keyring, and replay protection.
//! - [`protocol`]: the Scuttlebutt state machine, peer selection and liveness.
//!   - [`store`]: one node's keys and versions; [`peers`]: the peer table and membership.
//! - [`detector`]: phi-accrual failure detection.
//! - [`config`]: every option, its default and bounds (the one table `index.js` reads).
//! - [`exchange`]: one connection's protocol: push-pull exchange, push tree, suspicion, and the
//!   connection budget.
//! - [`datagram`]: exchanges small enough for one datagram each way, over UDP, with a
//!   fallback to a connection.
//! - [`transport`]: TCP framing within a process-wide budget for partial frames, and an
//!   in-memory network with faults for deterministic tests.
//! - [`inbound`]: who may hold a node's inbound connection slots.
//! - [`address`]: what a node calls itself and which seed addresses it contacts.
//! - [`node`]: a node's lifecycle and tasks, on one runtime shared by the process.

/// mimalloc returns freed memory to the system and keeps fragmentation low where one process
/// holds a million small (node, peer) records and frees large digests every round: glibc's
/// allocator kept the peak of a join storm as resident memory for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod address;
pub mod config;
pub mod datagram;
pub mod detector;
pub mod exchange;
pub mod inbound;
pub mod node;
pub mod peers;
pub mod protocol;
pub mod seal;
pub mod store;
pub mod transport;
pub mod wire;

// Registered with Node-API at load time; unit-test builds never call into it.
#[cfg_attr(test, allow(dead_code))]
mod binding;
