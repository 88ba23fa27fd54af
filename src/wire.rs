//! The wire format: how gossip messages become bytes on a TCP stream and back.
//!
//! Every message travels as one frame: a 4-byte big-endian length, then that many bytes holding
//! two consecutive MessagePack values, a [`Header`] and the payload its `kind` names. Decoding
//! never trusts the peer: every frame is bounded by [`Limits`], every name, key and value is
//! checked, and anything that fails is reported as a [`Rejection`] for the caller to count and
//! drop. In a cluster with keys the frame body is sealed instead (see [`crate::seal`]), and
//! opens to these same bytes. `docs/protocol.md` describes the same format for people writing
//! a compatible peer.

use bytes::Bytes;
use serde::{de::IgnoredAny, Deserialize, Serialize};
use std::net::SocketAddr;

/// Bumped on any incompatible change; frames of another version are dropped and counted.
pub const PROTOCOL_VERSION: u8 = 2;

/// Versions, heartbeats and generations above this are refused: they could never be reached
/// honestly, and accepting one would let a single bad frame shadow a real node forever.
pub const MAX_COUNTER: u64 = 1 << 53;

/// What a receiver accepts from one peer. Every field has a default sized for clusters of a few
/// thousand nodes holding small values.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Digest entries, deltas or requests in one message.
    pub max_peers_per_message: usize,
    /// Keys in one message (across its deltas): a frame of tiny keys would otherwise decode
    /// into many times its size before any of them could be refused.
    pub max_keys_per_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 4 << 20,
            max_key_bytes: 1024,
            max_value_bytes: 256 << 10,
            max_peers_per_message: 8192,
            max_keys_per_message: 65536,
        }
    }
}

/// The longest canonical node name: an IPv6 address with a scope id, and a port.
pub const LONGEST_NAME: &str = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535";

/// Upper bounds on encoded sizes, so that a sender can fill a frame without overfilling it.
/// A name of `len` bytes: its string header and its bytes.
pub const fn name_bytes(name: &str) -> usize {
    name.len() + 2
}

/// A DigestEntry less its name: array header and four counters (the horizon included).
pub const DIGEST_ENTRY_BYTES: usize = 1 + 4 * 9;
/// A NodeDelta less its name and keys: array header, five counters (the horizon included),
/// `left`, the list header.
pub const DELTA_HEADER_BYTES: usize = 1 + 5 * 9 + 1 + 5;
/// A KeyValue less its key and value bytes: array header, string and bin headers, version.
pub const KEY_VALUE_BYTES: usize = 1 + 5 + 9 + 5;
/// A Request less its name: array header and three counters (the horizon included).
pub const REQUEST_BYTES: usize = 1 + 3 * 9;
/// One `heartbeat, max_version` or `index, heartbeat` pair.
pub const PAIR_BYTES: usize = 2 * 9;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    pub cluster: String,
    /// The sender's advertised `ip:port`.
    pub from: String,
    pub kind: u8,
}

/// One node as a digest sees it: enough for the receiver to tell who is behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    pub name: String,
    pub generation: u64,
    pub heartbeat: u64,
    pub max_version: u64,
    /// The node's collection horizon as the sender's view stands (see [`NodeDelta::horizon`]).
    /// A trailing field, left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub horizon: u64,
}

/// A key written by its owner at `version`: `value` is one MessagePack-encoded value, or
/// empty for a deletion (a tombstone). A real value is never empty: the shortest MessagePack
/// value is one byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub version: u64,
    pub value: Bytes,
}

impl KeyValue {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_empty()
    }
}

/// What the sender knows of one node, from `from_version` (exclusive) to `to_version`
/// (inclusive): every key whose latest version lies in that range, in version order. A delta
/// from version 0 is the sender's whole view up to `to_version`: a receiver whose view is older
/// than `horizon` replaces its view with it (see `store::NodeState::apply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDelta {
    pub name: String,
    pub generation: u64,
    pub heartbeat: u64,
    pub from_version: u64,
    pub to_version: u64,
    /// The node announced a graceful stop for this generation.
    pub left: bool,
    #[serde(deserialize_with = "bounded_key_values")]
    pub kvs: Vec<KeyValue>,
    /// The owner's collection horizon, as far as the sender knows: every tombstone at or below
    /// it has been forgotten. A trailing field, left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub horizon: u64,
}

/// "Send me `name` at `generation` from `from_version` on; my view of it stands at `horizon`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub name: String,
    pub generation: u64,
    pub from_version: u64,
    /// A trailing field, left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub horizon: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The messages of one exchange (Syn or CompactSyn, SynAck, Ack) and the unsolicited Push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Initiator → responder: the initiator's digest of every node it knows.
    Syn { digest: Vec<DigestEntry> },
    /// The same digest without names or generations, for a responder that knows the same
    /// nodes: `versions` holds `heartbeat, max_version` per node, in the order of the sorted
    /// membership whose hash is `membership_hash`. On the wire they are [`packed`](pack).
    CompactSyn {
        membership_hash: u64,
        versions: Vec<u64>,
    },
    /// A CompactSyn for a membership too large for one message: `versions` holds the sender's
    /// own pair, then pairs for the members from position `offset` on. Successive rounds move
    /// the window, so every member is covered within a few rounds.
    CompactSynRange {
        membership_hash: u64,
        offset: u64,
        versions: Vec<u64>,
    },
    /// Responder → initiator, when its membership hash differs: send the named digest.
    NeedDigest,
    /// Responder → initiator: what the initiator lacks, and what the responder wants.
    /// Newer heartbeats of nodes with nothing else new travel as `index, heartbeat` pairs in
    /// `heartbeats`, indices rising: into the sorted membership after a CompactSyn, into the
    /// digest after a Syn. On the wire they are [`packed`](pack), each index as the rise from
    /// the previous one.
    SynAck {
        deltas: Vec<NodeDelta>,
        requests: Vec<Request>,
        heartbeats: Vec<u64>,
    },
    /// Initiator → responder: the requested deltas. Ends the exchange.
    Ack { deltas: Vec<NodeDelta> },
    /// A fresh change, broadcast down a tree: the receiver applies `deltas`, then sends them on
    /// to `forward_to`, split among a few peers that each take a share of the rest.
    Push {
        deltas: Vec<NodeDelta>,
        forward_to: Vec<String>,
    },
    /// "I convicted `name` at `generation`, last heard at `heartbeat`", broadcast like a Push.
    /// A receiver that has not heard from that node for a while either convicts it too, so
    /// that a failure is reported at about the same time everywhere.
    Suspect {
        name: String,
        generation: u64,
        heartbeat: u64,
        forward_to: Vec<String>,
    },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Syn { .. } => 1,
            Message::SynAck { .. } => 2,
            Message::Ack { .. } => 3,
            Message::Push { .. } => 4,
            Message::CompactSyn { .. } => 5,
            Message::NeedDigest => 6,
            Message::Suspect { .. } => 7,
            Message::CompactSynRange { .. } => 8,
        }
    }
}

/// Why an inbound frame was dropped. Each variant has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not MessagePack of the expected shape, truncated, or trailing bytes.
    Malformed,
    /// Longer than `max_frame_bytes`.
    Oversized,
    WrongVersion,
    WrongCluster,
    UnknownKind,
    /// A node name that is not a canonical `ip:port`.
    BadName,
    /// A key or value outside the limits, or a value that is neither one MessagePack value nor
    /// empty (a tombstone).
    BadKeyValue,
    /// Too many entries, or a counter beyond [`MAX_COUNTER`].
    OutOfBounds,
    /// Well-formed, but not the message this point of the exchange expects.
    Unexpected,
    /// Counters no honest node could have reached yet (a generation too far ahead of our clock,
    /// a heartbeat or version beyond what the time since that generation allows). Counted per
    /// node entry refused, the rest of the frame is used: see `Cluster` in `protocol.rs`.
    Implausible,
    /// A plaintext frame at a node with keys (and without `acceptPlaintext`).
    Plaintext,
    /// Sealed under a key id none of our keys has (or we have no keys).
    UnknownKey,
    /// Sealed, but does not authenticate under our key with its id: altered, forged, or meant
    /// for another cluster.
    Forged,
    /// Sealed too long ago (or ahead) by the sender's clock, or by an incarnation of the sender
    /// older than one we know.
    Stale,
    /// Sealed, fresh, but seen before, addressed to another node, or not answering the frame
    /// we last sent on its connection.
    Replayed,
    /// A node name refused because the peer table (`max_peers`) or the table of names heard of
    /// second-hand is full.
    TooManyPeers,
    /// Keys refused: they would take their node past `max_keys_per_peer`, or one message past
    /// `max_keys_per_message`.
    TooManyKeys,
    /// Keys of one node refused: they would exceed `max_bytes_per_peer`.
    TooManyBytes,
    /// A connection dropped because partly received frames, across the process, held more
    /// than their budget, and its frame was the oldest.
    FrameBudget,
    /// A frame that did not arrive in full within `idle_timeout`.
    TimedOut,
    /// A connection closed because its source address had the most connections that have not
    /// yet sent a frame.
    SourceLimit,
    /// A connection refused or closed for want of an inbound slot (`max_inbound_connections`,
    /// or the share of it that nodes other than live peers may hold).
    InboundFull,
    /// A datagram from a node that is not a live peer, or a datagram reply (SynAck, NeedDigest,
    /// Ack) that answers nothing we sent that node within the wait.
    Unsolicited,
}

impl Rejection {
    pub const ALL: [Rejection; 23] = [
        Rejection::Malformed,
        Rejection::Oversized,
        Rejection::WrongVersion,
        Rejection::WrongCluster,
        Rejection::UnknownKind,
        Rejection::BadName,
        Rejection::BadKeyValue,
        Rejection::OutOfBounds,
        Rejection::Unexpected,
        Rejection::Implausible,
        Rejection::Plaintext,
        Rejection::UnknownKey,
        Rejection::Forged,
        Rejection::Stale,
        Rejection::Replayed,
        Rejection::TooManyPeers,
        Rejection::TooManyKeys,
        Rejection::TooManyBytes,
        Rejection::FrameBudget,
        Rejection::TimedOut,
        Rejection::SourceLimit,
        Rejection::InboundFull,
        Rejection::Unsolicited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Oversized => "oversized",
            Rejection::WrongVersion => "wrongVersion",
            Rejection::WrongCluster => "wrongCluster",
            Rejection::UnknownKind => "unknownKind",
            Rejection::BadName => "badName",
            Rejection::BadKeyValue => "badKeyValue",
            Rejection::OutOfBounds => "outOfBounds",
            Rejection::Unexpected => "unexpected",
            Rejection::Implausible => "implausible",
            Rejection::Plaintext => "plaintext",
            Rejection::UnknownKey => "unknownKey",
            Rejection::Forged => "forged",
            Rejection::Stale => "stale",
            Rejection::Replayed => "replayed",
            Rejection::TooManyPeers => "tooManyPeers",
            Rejection::TooManyKeys => "tooManyKeys",
            Rejection::TooManyBytes => "tooManyBytes",
            Rejection::FrameBudget => "frameBudget",
            Rejection::TimedOut => "timedOut",
            Rejection::SourceLimit => "sourceLimit",
            Rejection::InboundFull => "inboundFull",
            Rejection::Unsolicited => "unsolicited",
        }
    }
}

/// A `bin` of unsigned LEB128 varints, 7 bits a byte: 1 byte below 128, 2 below 16384, 3 below
/// about 2 million, where a MessagePack integer takes 5 from 65536 on. Heartbeats go as zigzag
/// differences from the previous one in their list: nodes started about together beat about
/// together, so a heartbeat costs a byte however long the cluster has run. A CompactSyn carries
/// one per node each round.
struct Packed(Vec<u8>);

impl Serialize for Packed {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads packed varints: at most `max_values` of them, none longer than 8 bytes (a zigzag
/// difference of two counters needs 55 bits), the last one complete.
fn unpack(bytes: &[u8], max_values: usize) -> Result<Vec<u64>, Rejection> {
    let mut values = Vec::with_capacity(bytes.len().min(max_values));
    let mut value = 0u64;
    let mut shift = 0;
    for &byte in bytes {
        if shift > 49 {
            return Err(Rejection::OutOfBounds);
        }
        value |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            if values.len() == max_values {
                return Err(Rejection::OutOfBounds);
            }
            values.push(value);
            value = 0;
            shift = 0;
        }
    }
    if shift != 0 {
        return Err(Rejection::Malformed);
    }
    Ok(values)
}

/// `value - previous` as a zigzag number: 0, -1, 1, -2, 2 ... as 0, 1, 2, 3, 4 ...
fn zigzag(value: u64, previous: u64) -> u64 {
    let difference = value.wrapping_sub(previous) as i64;
    ((difference << 1) ^ (difference >> 63)) as u64
}

/// The inverse of [`zigzag`], refusing what is not a counter.
fn unzigzag(code: u64, previous: u64) -> Result<u64, Rejection> {
    let difference = (code >> 1) as i64 ^ -((code & 1) as i64);
    let value = previous
        .checked_add_signed(difference)
        .ok_or(Rejection::OutOfBounds)?;
    check_counter(value)?;
    Ok(value)
}

/// A compact digest's `heartbeat, max_version` pairs, a member each: its heartbeat's zigzag
/// difference from the previous member's, doubled, plus 1 when a max version follows (one that
/// is not 0). A member without keys, as most are in a membership-only cluster, costs a byte.
fn pack_versions(versions: &[u64]) -> Packed {
    let mut out = Vec::with_capacity(versions.len());
    let mut previous = 0;
    for pair in versions.chunks_exact(2) {
        let [heartbeat, max_version] = [pair[0], pair[1]];
        push_varint(
            &mut out,
            zigzag(heartbeat, previous) << 1 | u64::from(max_version != 0),
        );
        if max_version != 0 {
            push_varint(&mut out, max_version);
        }
        previous = heartbeat;
    }
    Packed(out)
}

/// The inverse of [`pack_versions`]: at most `max_values` numbers, pairs restored. A max
/// version flagged but missing, or flagged and 0, is malformed: each digest has one encoding.
fn unpack_versions(bytes: &[u8], max_values: usize) -> Result<Vec<u64>, Rejection> {
    let codes = unpack(bytes, max_values)?;
    let mut versions = Vec::with_capacity(codes.len() * 2);
    let mut codes = codes.into_iter();
    let mut heartbeat = 0;
    while let Some(code) = codes.next() {
        heartbeat = unzigzag(code >> 1, heartbeat)?;
        let max_version = match code & 1 {
            0 => 0,
            _ => match codes.next() {
                Some(0) | None => return Err(Rejection::Malformed),
                Some(max_version) => max_version,
            },
        };
        check_counter(max_version)?;
        versions.extend([heartbeat, max_version]);
    }
    Ok(versions)
}

/// A SynAck's `index, heartbeat` pairs, by rising index (a reply gathers them in several
/// passes, so they are sorted here when they need to be; of pairs naming one index, the highest
/// heartbeat goes): each index as its rise over the previous one (the first as itself), each
/// heartbeat as its zigzag difference from the previous one.
fn pack_heartbeats(pairs: &[u64]) -> Packed {
    let mut sorted: Vec<[u64; 2]> = pairs.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
    if !sorted.is_sorted_by(|a, b| a[0] < b[0]) {
        sorted.sort_unstable_by(|a, b| a[0].cmp(&b[0]).then(b[1].cmp(&a[1])));
        sorted.dedup_by_key(|pair| pair[0]);
    }
    let mut out = Vec::with_capacity(pairs.len() * 2);
    let (mut index, mut heartbeat) = (0, 0);
    for [next_index, next_heartbeat] in sorted {
        push_varint(&mut out, next_index - index);
        push_varint(&mut out, zigzag(next_heartbeat, heartbeat));
        (index, heartbeat) = (next_index, next_heartbeat);
    }
    Packed(out)
}

/// The inverse of [`pack_heartbeats`]; indices that do not rise are malformed.
fn unpack_heartbeats(bytes: &[u8], max_values: usize) -> Result<Vec<u64>, Rejection> {
    let mut values = unpack(bytes, max_values)?;
    let (mut index, mut heartbeat) = (0u64, 0u64);
    for (i, value) in values.iter_mut().enumerate() {
        if i % 2 == 0 {
            if i > 0 && *value == 0 {
                return Err(Rejection::Malformed);
            }
            index = index.checked_add(*value).ok_or(Rejection::OutOfBounds)?;
            check_counter(index)?;
            *value = index;
        } else {
            heartbeat = unzigzag(*value, heartbeat)?;
            *value = heartbeat;
        }
    }
    Ok(values)
}

pub fn encode(cluster: &str, from: &str, message: &Message) -> Bytes {
    let header = Header {
        version: PROTOCOL_VERSION,
        cluster: cluster.to_owned(),
        from: from.to_owned(),
        kind: message.kind(),
    };
    // Sized for the common large messages, so encoding rarely reallocates.
    let estimate = match message {
        Message::Syn { digest } => digest.len() * 32,
        Message::CompactSyn { versions, .. } | Message::CompactSynRange { versions, .. } => {
            versions.len() * 2
        }
        _ => 0,
    };
    let mut out = Vec::with_capacity(128 + estimate);
    // Writing into a Vec cannot fail, and every type here serializes.
    rmp_serde::encode::write(&mut out, &header).expect("header encodes");
    match message {
        Message::Syn { digest } => rmp_serde::encode::write(&mut out, &(digest,)),
        Message::SynAck {
            deltas,
            requests,
            heartbeats,
        } => rmp_serde::encode::write(&mut out, &(deltas, requests, pack_heartbeats(heartbeats))),
        Message::CompactSyn {
            membership_hash,
            versions,
        } => rmp_serde::encode::write(&mut out, &(membership_hash, pack_versions(versions))),
        Message::CompactSynRange {
            membership_hash,
            offset,
            versions,
        } => rmp_serde::encode::write(
            &mut out,
            &(membership_hash, offset, pack_versions(versions)),
        ),
        Message::NeedDigest => rmp_serde::encode::write(&mut out, &()),
        Message::Suspect {
            name,
            generation,
            heartbeat,
            forward_to,
        } => rmp_serde::encode::write(&mut out, &(name, generation, heartbeat, forward_to)),
        Message::Ack { deltas } => rmp_serde::encode::write(&mut out, &(deltas,)),
        Message::Push { deltas, forward_to } => {
            rmp_serde::encode::write(&mut out, &(deltas, forward_to))
        }
    }
    .expect("message encodes");
    Bytes::from(out)
}

/// Decodes and checks one frame body. Returns the sender's name with the message.
pub fn decode(
    frame: &[u8],
    cluster: &str,
    limits: &Limits,
) -> Result<(String, Message), Rejection> {
    let mut de = rmp_serde::Deserializer::new(frame);
    let header = Header::deserialize(&mut de).map_err(|_| Rejection::Malformed)?;
    if header.version != PROTOCOL_VERSION {
        return Err(Rejection::WrongVersion);
    }
    if header.cluster != cluster {
        return Err(Rejection::WrongCluster);
    }
    check_name(&header.from)?;
    KEYS_LEFT.set(Some(limits.max_keys_per_message));
    let message = decode_payload(header.kind, &mut de, limits);
    KEYS_LEFT.set(Some(usize::MAX));
    let message = message?;
    if !de.get_ref().is_empty() {
        return Err(Rejection::Malformed);
    }
    check_message(&message, limits)?;
    Ok((header.from, message))
}

fn decode_payload(
    kind: u8,
    de: &mut SliceDecoder<'_>,
    limits: &Limits,
) -> Result<Message, Rejection> {
    // Packed counters come in pairs, one pair a node.
    let max_values = 2 * limits.max_peers_per_message;
    let message = match kind {
        1 => {
            let (digest,): (Vec<DigestEntry>,) = read(de)?;
            Message::Syn { digest }
        }
        2 => {
            let (deltas, requests, heartbeats): (Vec<NodeDelta>, Vec<Request>, Bytes) = read(de)?;
            Message::SynAck {
                deltas,
                requests,
                heartbeats: unpack_heartbeats(&heartbeats, max_values)?,
            }
        }
        3 => Message::Ack {
            deltas: read::<(Vec<NodeDelta>,)>(de)?.0,
        },
        4 => {
            let (deltas, forward_to): (Vec<NodeDelta>, Vec<String>) = read(de)?;
            Message::Push { deltas, forward_to }
        }
        5 => {
            let (membership_hash, versions): (u64, Bytes) = read(de)?;
            Message::CompactSyn {
                membership_hash,
                versions: unpack_versions(&versions, max_values)?,
            }
        }
        6 => {
            let () = read(de)?;
            Message::NeedDigest
        }
        7 => {
            let (name, generation, heartbeat, forward_to): (String, u64, u64, Vec<String>) =
                read(de)?;
            Message::Suspect {
                name,
                generation,
                heartbeat,
                forward_to,
            }
        }
        8 => {
            let (membership_hash, offset, versions): (u64, u64, Bytes) = read(de)?;
            Message::CompactSynRange {
                membership_hash,
                offset,
                versions: unpack_versions(&versions, max_values)?,
            }
        }
        _ => return Err(Rejection::UnknownKind),
    };
    Ok(message)
}

/// The decoder reads from a shrinking slice, so what is left afterwards shows trailing bytes.
type SliceDecoder<'a> = rmp_serde::Deserializer<rmp_serde::decode::ReadReader<&'a [u8]>>;

fn read<T: serde::de::DeserializeOwned>(de: &mut SliceDecoder<'_>) -> Result<T, Rejection> {
    T::deserialize(de).map_err(|_| match KEYS_LEFT.get() {
        None => Rejection::TooManyKeys,
        Some(_) => Rejection::Malformed,
    })
}

thread_local! {
    /// Keys the message being decoded on this thread may still carry (None once it carried
    /// more): `decode` sets it, and every key-value list draws on it (see
    /// `bounded_key_values`). Decoding is synchronous, so nothing else decodes on this thread
    /// meanwhile. Unbounded outside `decode`.
    static KEYS_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(Some(usize::MAX)) };
}

/// Reads a delta's key-value list, failing as soon as the message exceeds its key budget:
/// nothing past the budget is ever allocated.
fn bounded_key_values<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<KeyValue>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<KeyValue>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of key-values")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kvs = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            loop {
                let Some(left) = KEYS_LEFT.get() else {
                    return Err(serde::de::Error::custom("too many keys"));
                };
                let Some(kv) = seq.next_element::<KeyValue>()? else {
                    return Ok(kvs);
                };
                KEYS_LEFT.set(left.checked_sub(1));
                if left == 0 {
                    return Err(serde::de::Error::custom("too many keys"));
                }
                kvs.push(kv);
            }
        }
    }
    de.deserialize_seq(Bounded)
}

/// A node name is the canonical text of a socket address, so that one node has one name.
/// Every name of every digest passes here, so IPv4 names are checked without formatting them
/// again: the parser takes octets only without leading zeros, which leaves the port as the one
/// part that could be written another way.
pub fn check_name(name: &str) -> Result<(), Rejection> {
    let canonical = match name.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(addr)) => {
            let port = name.rsplit(':').next().unwrap_or_default();
            addr.port() != 0 && !port.starts_with('0')
        }
        Ok(addr) => addr.port() != 0 && addr.to_string() == name,
        Err(_) => false,
    };
    if canonical {
        Ok(())
    } else {
        Err(Rejection::BadName)
    }
}

fn check_counter(n: u64) -> Result<(), Rejection> {
    if n > MAX_COUNTER {
        Err(Rejection::OutOfBounds)
    } else {
        Ok(())
    }
}

/// True when `value` holds exactly one well-formed MessagePack value.
pub fn is_single_value(value: &[u8]) -> bool {
    let mut de = rmp_serde::Deserializer::new(value);
    IgnoredAny::deserialize(&mut de).is_ok() && de.get_ref().is_empty()
}

/// A key and the value written under it, as a local write must be: one MessagePack value.
pub fn check_key_value(key: &str, value: &[u8], limits: &Limits) -> Result<(), Rejection> {
    check_key(key, limits)?;
    if value.len() > limits.max_value_bytes || !is_single_value(value) {
        return Err(Rejection::BadKeyValue);
    }
    Ok(())
}

pub fn check_key(key: &str, limits: &Limits) -> Result<(), Rejection> {
    if key.is_empty() || key.len() > limits.max_key_bytes {
        return Err(Rejection::BadKeyValue);
    }
    Ok(())
}

fn check_deltas(deltas: &[NodeDelta], limits: &Limits) -> Result<(), Rejection> {
    if deltas.len() > limits.max_peers_per_message {
        return Err(Rejection::OutOfBounds);
    }
    for delta in deltas {
        check_name(&delta.name)?;
        for n in [
            delta.generation,
            delta.heartbeat,
            delta.to_version,
            delta.horizon,
        ] {
            check_counter(n)?;
        }
        if delta.from_version > delta.to_version {
            return Err(Rejection::OutOfBounds);
        }
        let mut previous = delta.from_version;
        for kv in &delta.kvs {
            if kv.is_tombstone() {
                check_key(&kv.key, limits)?;
            } else {
                check_key_value(&kv.key, &kv.value, limits)?;
            }
            // Versions must rise strictly inside the announced range, or the receiver could be
            // told it holds versions it never got; and a sender keeps no tombstone at or below
            // the horizon it announces.
            if kv.version <= previous
                || kv.version > delta.to_version
                || kv.is_tombstone() && kv.version <= delta.horizon
            {
                return Err(Rejection::OutOfBounds);
            }
            previous = kv.version;
        }
    }
    Ok(())
}

/// A flat list of pairs of counters, one pair per node.
fn check_pairs(values: &[u64], limits: &Limits) -> Result<(), Rejection> {
    if !values.len().is_multiple_of(2) || values.len() / 2 > limits.max_peers_per_message {
        return Err(Rejection::OutOfBounds);
    }
    values.iter().try_for_each(|&n| check_counter(n))
}

fn check_message(message: &Message, limits: &Limits) -> Result<(), Rejection> {
    match message {
        Message::Syn { digest } => {
            if digest.len() > limits.max_peers_per_message {
                return Err(Rejection::OutOfBounds);
            }
            for entry in digest {
                check_name(&entry.name)?;
                for n in [
                    entry.generation,
                    entry.heartbeat,
                    entry.max_version,
                    entry.horizon,
                ] {
                    check_counter(n)?;
                }
            }
            Ok(())
        }
        Message::CompactSyn { versions, .. } => check_pairs(versions, limits),
        Message::CompactSynRange {
            offset, versions, ..
        } => {
            // The sender's own pair comes first, so at least one pair.
            if versions.is_empty() {
                return Err(Rejection::OutOfBounds);
            }
            check_counter(*offset)?;
            check_pairs(versions, limits)
        }
        Message::NeedDigest => Ok(()),
        Message::SynAck {
            deltas,
            requests,
            heartbeats,
        } => {
            check_pairs(heartbeats, limits)?;
            if requests.len() > limits.max_peers_per_message {
                return Err(Rejection::OutOfBounds);
            }
            for request in requests {
                check_name(&request.name)?;
                for n in [request.generation, request.from_version, request.horizon] {
                    check_counter(n)?;
                }
            }
            check_deltas(deltas, limits)
        }
        Message::Ack { deltas } => check_deltas(deltas, limits),
        Message::Push { deltas, forward_to } => {
            check_forward_to(forward_to, limits)?;
            check_deltas(deltas, limits)
        }
        Message::Suspect {
            name,
            generation,
            heartbeat,
            forward_to,
        } => {
            check_forward_to(forward_to, limits)?;
            check_name(name)?;
            check_counter(*generation)?;
            check_counter(*heartbeat)
        }
    }
}

fn check_forward_to(forward_to: &[String], limits: &Limits) -> Result<(), Rejection> {
    if forward_to.len() > limits.max_peers_per_message {
        return Err(Rejection::OutOfBounds);
    }
    forward_to.iter().try_for_each(|name| check_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(values: impl Iterator<Item = u64>) -> Packed {
        let mut out = Vec::new();
        values.for_each(|value| push_varint(&mut out, value));
        Packed(out)
    }

    const GOLDEN: [&str; 8] = [
        "9402a163ad31302e302e302e313a3930303001919194ad31302e302e302e313a39303030010203",
        "9402a163ad31302e302e302e313a3930303002939197ad31302e302e302e323a3930303107030002c29193a1\
         6b02c402a1769193ad31302e302e302e313a393030300100c40300d804",
        "9402a163ad31302e302e302e313a3930303003919197ad31302e302e302e323a3930303107030002c29193a1\
         6b02c402a176",
        "9402a163ad31302e302e302e313a3930303004929091aa5b3a3a315d3a39303032",
        "9402a163ad31302e302e302e313a393030300592cffffffffffffffffec40530918b1103",
        "9402a163ad31302e302e302e313a3930303006c0",
        "9402a163ad31302e302e302e313a393030300794ad31302e302e302e323a39303031070390",
        "9402a163ad31302e302e302e313a39303030089305cd012cc40325010c",
    ];

    /// The same for what deletion added: a tombstone (an empty value) and the trailing horizon
    /// of a NodeDelta, a DigestEntry and a Request, present when not 0.
    const GOLDEN_DELETION: [&str; 2] = [
        "9402a163ad31302e302e302e313a3930303001919195ad31302e302e302e323a3930303107030204",
        "9402a163ad31302e302e302e313a3930303002939198ad31302e302e302e323a3930303107030205c29193a1\
         6b05c400039194ad31302e302e302e323a39303031070204c400",
    ];

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn frame(bytes: &[u8]) -> Vec<u8> {
        bytes.to_vec()
    }

    fn delta() -> NodeDelta {
        NodeDelta {
            name: "10.0.0.2:9001".into(),
            generation: 7,
            heartbeat: 3,
            from_version: 0,
            to_version: 2,
            left: false,
            kvs: vec![KeyValue {
                key: "k".into(),
                version: 2,
                value: Bytes::from_static(&[0xa1, b'v']),
            }],
            horizon: 0,
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Syn {
                digest: vec![DigestEntry {
                    name: "10.0.0.1:9000".into(),
                    generation: 1,
                    heartbeat: 2,
                    max_version: 3,
                    horizon: 0,
                }],
            },
            Message::SynAck {
                deltas: vec![delta()],
                requests: vec![Request {
                    name: "10.0.0.1:9000".into(),
                    generation: 1,
                    from_version: 0,
                    horizon: 0,
                }],
                heartbeats: vec![0, 300],
            },
            Message::Ack {
                deltas: vec![delta()],
            },
            Message::Push {
                deltas: vec![],
                forward_to: vec!["[::1]:9002".into()],
            },
            Message::CompactSyn {
                membership_hash: u64::MAX - 1,
                versions: vec![12, 0, 70000, 3],
            },
            Message::NeedDigest,
            Message::Suspect {
                name: "10.0.0.2:9001".into(),
                generation: 7,
                heartbeat: 3,
                forward_to: vec![],
            },
            Message::CompactSynRange {
                membership_hash: 5,
                offset: 300,
                versions: vec![9, 1, 12, 0],
            },
        ]
    }

    /// A delta that deletes `k` at version 5, from a node that collected up to version 3.
    fn deletion() -> NodeDelta {
        NodeDelta {
            name: "10.0.0.2:9001".into(),
            generation: 7,
            heartbeat: 3,
            from_version: 2,
            to_version: 5,
            left: false,
            kvs: vec![KeyValue {
                key: "k".into(),
                version: 5,
                value: Bytes::new(),
            }],
            horizon: 3,
        }
    }

    fn deletion_samples() -> Vec<Message> {
        vec![
            Message::Syn {
                digest: vec![DigestEntry {
                    name: "10.0.0.2:9001".into(),
                    generation: 7,
                    heartbeat: 3,
                    max_version: 2,
                    horizon: 4,
                }],
            },
            Message::SynAck {
                deltas: vec![deletion()],
                requests: vec![Request {
                    name: "10.0.0.2:9001".into(),
                    generation: 7,
                    from_version: 2,
                    horizon: 4,
                }],
                heartbeats: vec![],
            },
        ]
    }

    /// Fixed bytes for every message kind of protocol version 2: a change here breaks peers.
    #[test]
    fn golden_encodings() {
        let encoded = |samples: Vec<Message>| -> Vec<String> {
            samples
                .iter()
                .map(|m| hex(&encode("c", "10.0.0.1:9000", m)))
                .collect()
        };
        assert_eq!(encoded(samples()), GOLDEN);
        assert_eq!(encoded(deletion_samples()), GOLDEN_DELETION);
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples().into_iter().chain(deletion_samples()) {
            let bytes = encode("c", "10.0.0.1:9000", &message);
            let (from, back) = decode(&frame(&bytes), "c", &Limits::default()).unwrap();
            assert_eq!(from, "10.0.0.1:9000");
            assert_eq!(back, message);
        }
    }

    #[test]
    fn wrong_cluster_version_and_kind_are_rejected() {
        let bytes = encode("a", "10.0.0.1:9000", &samples()[0]);
        assert_eq!(
            decode(&frame(&bytes), "b", &Limits::default()),
            Err(Rejection::WrongCluster)
        );

        let mut bytes = bytes.to_vec();
        bytes[1] = 9; // the version field
        assert_eq!(
            decode(&frame(&bytes), "a", &Limits::default()),
            Err(Rejection::WrongVersion)
        );

        let mut other = Vec::new();
        rmp_serde::encode::write(
            &mut other,
            &Header {
                version: PROTOCOL_VERSION,
                cluster: "a".into(),
                from: "10.0.0.1:9000".into(),
                kind: 42,
            },
        )
        .unwrap();
        assert_eq!(
            decode(&frame(&other), "a", &Limits::default()),
            Err(Rejection::UnknownKind)
        );
    }

    #[test]
    fn packed_counters_are_bounded_and_complete() {
        let limit = 4;
        let packed = pack([0, 127, 128, MAX_COUNTER].into_iter()).0;
        assert_eq!(hex(&packed), "007f80018080808080808010");
        assert_eq!(unpack(&packed, limit), Ok(vec![0, 127, 128, MAX_COUNTER]));
        assert_eq!(unpack(&packed, limit - 1), Err(Rejection::OutOfBounds));
        // Cut in the middle of a varint; longer than any counter or difference of two.
        assert_eq!(unpack(&[0x80], limit), Err(Rejection::Malformed));
        assert_eq!(unpack(&[0xff; 9], limit), Err(Rejection::OutOfBounds));

        // Heartbeats go as differences: nodes that beat together cost a byte each, however
        // long they have run, and a max version only when it is not 0.
        let versions = [1_000_000, 0, 1_000_002, 5, 999_999, 0];
        let packed = pack_versions(&versions).0;
        assert_eq!(hex(&packed), "8092f40109050a");
        assert_eq!(unpack_versions(&packed, 6), Ok(versions.to_vec()));
        // A heartbeat below 0 or above MAX_COUNTER, a max version above it: refused.
        let below = pack([zigzag(0, 1) << 1].into_iter()).0;
        let above = pack([zigzag(MAX_COUNTER + 1, 0) << 1].into_iter()).0;
        let max_above = pack([1, MAX_COUNTER + 1].into_iter()).0;
        for packed in [below, above, max_above] {
            assert_eq!(unpack_versions(&packed, 2), Err(Rejection::OutOfBounds));
        }
        // A max version flagged and missing, or flagged and 0 (a second encoding): refused.
        for codes in [vec![1], vec![1, 0]] {
            let packed = pack(codes.into_iter()).0;
            assert_eq!(unpack_versions(&packed, 2), Err(Rejection::Malformed));
        }

        // In a SynAck, indices go as rises; one that does not rise is refused.
        let pairs = [3, 100, 4, 107, 90, 101];
        let packed = pack_heartbeats(&pairs).0;
        assert_eq!(hex(&packed), "03c801010e560b");
        assert_eq!(unpack_heartbeats(&packed, 6), Ok(pairs.to_vec()));
        assert_eq!(
            unpack_heartbeats(&[3, 2, 0, 2], 4),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn every_truncation_and_garbage_is_rejected() {
        let bytes = encode("c", "10.0.0.1:9000", &samples()[1]);
        for end in 0..bytes.len() {
            assert!(
                decode(&frame(&bytes[..end]), "c", &Limits::default()).is_err(),
                "prefix {end}"
            );
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert_eq!(
            decode(&frame(&trailing), "c", &Limits::default()),
            Err(Rejection::Malformed)
        );

        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            assert!(decode(&frame(&garbage), "c", &Limits::default()).is_err());
        }
    }

    #[test]
    fn hostile_contents_are_rejected() {
        let limits = Limits::default();
        let reject = |message: Message| {
            decode(
                &frame(&encode("c", "10.0.0.1:9000", &message)),
                "c",
                &limits,
            )
        };

        let bad_name = Message::Syn {
            digest: vec![DigestEntry {
                name: "evil".into(),
                generation: 1,
                heartbeat: 1,
                max_version: 1,
                horizon: 0,
            }],
        };
        assert_eq!(reject(bad_name), Err(Rejection::BadName));
        assert_eq!(
            decode(
                &frame(&encode("c", "localhost:1", &samples()[0])),
                "c",
                &limits
            ),
            Err(Rejection::BadName)
        );

        let mut absurd = delta();
        absurd.generation = u64::MAX;
        assert_eq!(
            reject(Message::Push {
                deltas: vec![absurd],
                forward_to: vec![]
            }),
            Err(Rejection::OutOfBounds)
        );

        let mut unordered = delta();
        unordered.kvs.push(KeyValue {
            key: "j".into(),
            version: 1,
            value: Bytes::from_static(&[0xc0]),
        });
        assert_eq!(
            reject(Message::Push {
                deltas: vec![unordered],
                forward_to: vec![]
            }),
            Err(Rejection::OutOfBounds)
        );

        let mut not_msgpack = delta();
        not_msgpack.kvs[0].value = Bytes::from_static(&[0xc1]);
        assert_eq!(
            reject(Message::Push {
                deltas: vec![not_msgpack],
                forward_to: vec![]
            }),
            Err(Rejection::BadKeyValue)
        );

        let mut empty_value = delta();
        empty_value.kvs[0].value = Bytes::new();
        assert!(
            reject(Message::Push {
                deltas: vec![empty_value],
                forward_to: vec![]
            })
            .is_ok(),
            "an empty value is a tombstone"
        );

        // Tombstones meet the key limits like any key, and lie above the sender's horizon.
        let mut tombstone_key_too_long = deletion();
        tombstone_key_too_long.kvs[0].key = "k".repeat(limits.max_key_bytes + 1);
        let mut tombstone_at_horizon = deletion();
        tombstone_at_horizon.horizon = 5;
        let mut absurd_horizon = deletion();
        absurd_horizon.horizon = MAX_COUNTER + 1;
        for (bad, reason) in [
            (tombstone_key_too_long, Rejection::BadKeyValue),
            (tombstone_at_horizon, Rejection::OutOfBounds),
            (absurd_horizon, Rejection::OutOfBounds),
        ] {
            assert_eq!(
                reject(Message::Push {
                    deltas: vec![bad],
                    forward_to: vec![]
                }),
                Err(reason)
            );
        }
        let absurd_digest = Message::Syn {
            digest: vec![DigestEntry {
                name: "10.0.0.1:9000".into(),
                generation: 1,
                heartbeat: 1,
                max_version: 1,
                horizon: u64::MAX,
            }],
        };
        assert_eq!(reject(absurd_digest), Err(Rejection::OutOfBounds));

        let mut empty_key = delta();
        empty_key.kvs[0].key.clear();
        assert_eq!(
            reject(Message::Push {
                deltas: vec![empty_key],
                forward_to: vec![]
            }),
            Err(Rejection::BadKeyValue)
        );

        let tight = Limits {
            max_peers_per_message: 1,
            ..Limits::default()
        };
        let many = Message::Push {
            deltas: vec![delta(), delta()],
            forward_to: vec![],
        };
        assert_eq!(
            decode(&frame(&encode("c", "10.0.0.1:9000", &many)), "c", &tight),
            Err(Rejection::OutOfBounds)
        );
    }

    #[test]
    fn a_frame_with_more_keys_than_allowed_stops_decoding_there() {
        let limits = Limits {
            max_keys_per_message: 5,
            ..Limits::default()
        };
        let with_keys = |counts: &[u64]| {
            let deltas = counts
                .iter()
                .map(|&count| NodeDelta {
                    to_version: count,
                    kvs: (1..=count)
                        .map(|v| KeyValue {
                            key: format!("k{v}"),
                            version: v,
                            value: Bytes::from_static(&[1]),
                        })
                        .collect(),
                    ..delta()
                })
                .collect();
            let push = Message::Push {
                deltas,
                forward_to: vec![],
            };
            decode(&encode("c", "10.0.0.1:9000", &push), "c", &limits).map(|_| ())
        };
        assert_eq!(with_keys(&[5]), Ok(()));
        assert_eq!(with_keys(&[2, 3]), Ok(()));
        assert_eq!(with_keys(&[6]), Err(Rejection::TooManyKeys));
        assert_eq!(with_keys(&[3, 3]), Err(Rejection::TooManyKeys));
        // The budget is the message's, not the thread's: the next frame starts afresh.
        assert_eq!(with_keys(&[5]), Ok(()));
    }

    /// The size bounds senders fill frames by are upper bounds of the real encodings.
    #[test]
    fn encoded_sizes_stay_within_their_bounds() {
        let max = MAX_COUNTER;
        let name = LONGEST_NAME.to_string();
        assert_eq!(check_name(&name), Ok(()));
        let list_of = |item: &dyn Fn() -> Message, empty: Message| {
            let one = encode("c", "10.0.0.1:9000", &item()).len();
            one - encode("c", "10.0.0.1:9000", &empty).len()
        };
        let digest = || Message::Syn {
            digest: vec![DigestEntry {
                name: name.clone(),
                generation: max,
                heartbeat: max,
                max_version: max,
                horizon: max,
            }],
        };
        let entry = list_of(&digest, Message::Syn { digest: vec![] });
        assert!(entry <= DIGEST_ENTRY_BYTES + name_bytes(&name), "{entry}");

        let key = "k".repeat(70000);
        let value = Bytes::from(vec![0xc0; 70000]);
        let delta = |kvs: Vec<KeyValue>| NodeDelta {
            name: name.clone(),
            generation: max,
            heartbeat: max,
            from_version: max - 1,
            to_version: max,
            left: true,
            kvs,
            horizon: max,
        };
        let ack = |kvs: Vec<KeyValue>| Message::Ack {
            deltas: vec![delta(kvs)],
        };
        let header = list_of(&|| ack(vec![]), Message::Ack { deltas: vec![] });
        assert!(header <= DELTA_HEADER_BYTES + name_bytes(&name), "{header}");
        let kv = KeyValue {
            key: key.clone(),
            version: max,
            value: value.clone(),
        };
        let with_kv = list_of(&|| ack(vec![kv.clone()]), ack(vec![]));
        assert!(
            with_kv <= KEY_VALUE_BYTES + key.len() + value.len(),
            "{with_kv}"
        );

        let request = || Message::SynAck {
            deltas: vec![],
            requests: vec![Request {
                name: name.clone(),
                generation: max,
                from_version: max,
                horizon: max,
            }],
            heartbeats: vec![max, max],
        };
        let empty = Message::SynAck {
            deltas: vec![],
            requests: vec![],
            heartbeats: vec![],
        };
        let request_and_pair = list_of(&request, empty);
        assert!(
            request_and_pair <= REQUEST_BYTES + name_bytes(&name) + PAIR_BYTES,
            "{request_and_pair}"
        );
    }

    #[test]
    fn names_must_be_canonical_socket_addresses() {
        for good in ["127.0.0.1:9000", "[::1]:9000", "[fe80::1]:1", LONGEST_NAME] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "evil",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.000.0.1:1",
            "127.0.0.01:1",
            "127.0.0.1:09000",
            "127.0.0.1:+9000",
            "[::1]",
            "[::01]:1",
            "[0:0:0:0:0:0:0:1]:1",
            "::1:80",
            "h:1",
        ] {
            assert_eq!(check_name(bad), Err(Rejection::BadName), "{bad}");
        }
    }
}
