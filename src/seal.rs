//! Sealed frames: every frame of a keyed cluster is encrypted and authenticated under a shared
//! key (XChaCha20-Poly1305), stamped so that a recorded frame cannot be played again, and opened
//! with a keyring that changes at runtime for rotation.
//!
//! A sealed frame body (what follows the 4-byte length of [`crate::transport::read_frame`]) is
//!
//! ```text
//! c1 | 01 format | 01 algorithm | key id (4) | nonce (24) | ciphertext | tag (16)
//! ```
//!
//! `c1` is never the first byte of MessagePack, so a sealed frame cannot be mistaken for a
//! plaintext one. The key id is HKDF-SHA256 of the key (no salt, info "gossiper key id"), 4
//! bytes: it tells nothing of the key, and a receiver tries only its keys with that id, so a
//! flood of frames costs one attempt each. The
//! associated data is the 7 clear header bytes followed by the cluster name. The plaintext is a
//! [`Stamp`] (32 bytes) followed by the plaintext frame body of `wire`.
//!
//! Invariants: a frame opens only under an installed key, unmodified, for this cluster; keys are
//! never printed (`Key`'s `Debug` shows the id) and are wiped from memory when the last holder
//! drops them.

use crate::wire::Rejection;
use bytes::{Buf, BytesMut};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use zeroize::Zeroizing;

/// First byte of every sealed frame: never valid MessagePack.
pub const MARKER: u8 = 0xc1;
/// Layout of the bytes after the marker; another value is dropped as `wrongVersion`.
pub const FORMAT: u8 = 1;
/// XChaCha20-Poly1305 with a random 192-bit nonce; the only algorithm so far.
pub const XCHACHA20_POLY1305: u8 = 1;

pub const KEY_BYTES: usize = 32;
const HEADER_BYTES: usize = 7;
const NONCE_BYTES: usize = 24;
const STAMP_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
/// Bytes a sealed frame adds to the plaintext frame it carries.
pub const OVERHEAD: usize = HEADER_BYTES + NONCE_BYTES + STAMP_BYTES + TAG_BYTES;

const KEY_ID_CONTEXT: &[u8] = b"gossiper key id";

/// One cluster key and its cipher. Both are wiped when dropped.
pub struct Key {
    id: [u8; 4],
    secret: Zeroizing<[u8; KEY_BYTES]>,
    cipher: XChaCha20Poly1305,
}

impl Key {
    pub fn new(secret: Zeroizing<[u8; KEY_BYTES]>) -> Key {
        let mut id = [0; 4];
        Hkdf::<Sha256>::new(None, &secret[..])
            .expand(KEY_ID_CONTEXT, &mut id)
            .expect("HKDF-SHA256 gives up to 8160 bytes");
        let cipher = XChaCha20Poly1305::new_from_slice(&secret[..])
            .expect("XChaCha20-Poly1305 takes 32-byte keys");
        Key { id, secret, cipher }
    }

    pub fn id(&self) -> [u8; 4] {
        self.id
    }

    pub fn secret(&self) -> &[u8; KEY_BYTES] {
        &self.secret
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {:02x?})", self.id)
    }
}

/// What a sealed frame says about itself, authenticated with it: when and by which incarnation
/// it was sent, which frame of the connection it answers and to whom it is addressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch on the sender's clock.
    pub sent_at: u64,
    /// The sender's generation.
    pub generation: u64,
    /// The [`Opened::tag`] of the last frame the sender received on this connection; 0 for the
    /// connection's first frame.
    pub answers: u64,
    /// [`recipient_tag`] of the node the sender connected to by name; 0 for a contact address
    /// (a seed) whose node name it does not know yet.
    pub recipient: u64,
}

impl Stamp {
    fn write(&self, out: &mut Vec<u8>) {
        for n in [self.sent_at, self.generation, self.answers, self.recipient] {
            out.extend_from_slice(&n.to_be_bytes());
        }
    }

    fn read(bytes: &[u8]) -> Stamp {
        let n =
            |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Stamp {
            sent_at: n(0),
            generation: n(1),
            answers: n(2),
            recipient: n(3),
        }
    }
}

/// A node name as [`Stamp::recipient`] carries it: FNV-1a, never 0.
pub fn recipient_tag(name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    hash.max(1)
}

/// True when a frame body is sealed rather than plaintext MessagePack.
pub fn is_sealed(frame: &[u8]) -> bool {
    frame.first() == Some(&MARKER)
}

/// A fresh random nonce from the thread's CSPRNG: 192 bits never repeat by chance.
pub fn random_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce
}

/// The nonce's first 8 bytes: how a reply names the frame it answers.
fn nonce_tag(nonce: &[u8]) -> u64 {
    u64::from_be_bytes(nonce[..8].try_into().unwrap_or_default())
}

/// The clear header followed by the cluster name, without allocating.
fn with_associated_data<R>(header: &[u8], cluster: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut buffer = [0u8; HEADER_BYTES + 255];
    let cluster = &cluster.as_bytes()[..cluster.len().min(255)];
    buffer[..HEADER_BYTES].copy_from_slice(&header[..HEADER_BYTES]);
    buffer[HEADER_BYTES..HEADER_BYTES + cluster.len()].copy_from_slice(cluster);
    f(&buffer[..HEADER_BYTES + cluster.len()])
}

/// Seals one plaintext frame body. Returns the sealed body and its tag (see [`Opened::tag`]).
pub fn seal(
    key: &Key,
    cluster: &str,
    stamp: &Stamp,
    nonce: [u8; NONCE_BYTES],
    body: &[u8],
) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(OVERHEAD + body.len());
    out.extend_from_slice(&[MARKER, FORMAT, XCHACHA20_POLY1305]);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&nonce);
    stamp.write(&mut out);
    out.extend_from_slice(body);
    let (clear, secret) = out.split_at_mut(HEADER_BYTES + NONCE_BYTES);
    let tag = with_associated_data(clear, cluster, |ad| {
        key.cipher
            .encrypt_inout_detached(&XNonce::from(nonce), ad, secret.into())
    })
    // Fails only beyond 256 GiB of plaintext; frames are capped far below.
    .expect("a frame is within the cipher's limits");
    out.extend_from_slice(&tag);
    (out, nonce_tag(&nonce))
}

/// A frame that opened: the key that opened it, its stamp, and its tag.
#[derive(Debug)]
pub struct Opened {
    pub key: Arc<Key>,
    pub stamp: Stamp,
    /// The first 8 bytes of its nonce: the [`Stamp::answers`] of a reply to it.
    pub tag: u64,
    /// The first 16 bytes of its nonce, which the [`ReplayGuard`] remembers.
    pub nonce_id: u128,
}

/// Opens a sealed frame body in place: on success `frame` holds the plaintext frame body.
pub fn open(keyring: &Keyring, cluster: &str, frame: &mut BytesMut) -> Result<Opened, Rejection> {
    if frame.len() < OVERHEAD || frame[0] != MARKER {
        return Err(Rejection::Malformed);
    }
    if frame[1] != FORMAT || frame[2] != XCHACHA20_POLY1305 {
        return Err(Rejection::WrongVersion);
    }
    let id = [frame[3], frame[4], frame[5], frame[6]];
    let mut candidates = keyring.keys.iter().filter(|k| k.id == id).peekable();
    if candidates.peek().is_none() {
        return Err(Rejection::UnknownKey);
    }
    let tag_at = frame.len() - TAG_BYTES;
    let tag = Tag::try_from(&frame[tag_at..]).map_err(|_| Rejection::Malformed)?;
    let nonce = XNonce::try_from(&frame[HEADER_BYTES..HEADER_BYTES + NONCE_BYTES])
        .map_err(|_| Rejection::Malformed)?;
    let (clear, rest) = frame.split_at_mut(HEADER_BYTES + NONCE_BYTES);
    let secret = &mut rest[..tag_at - HEADER_BYTES - NONCE_BYTES];
    // Two keys share an id once in 2^32 pairs; each is tried. The cipher checks the tag before
    // it decrypts, so a failed attempt leaves the bytes as they were.
    let key = with_associated_data(clear, cluster, |ad| {
        candidates
            .find(|key| {
                key.cipher
                    .decrypt_inout_detached(&nonce, ad, (&mut *secret).into(), &tag)
                    .is_ok()
            })
            .cloned()
    })
    .ok_or(Rejection::Forged)?;
    let nonce_bytes = &frame[HEADER_BYTES..HEADER_BYTES + NONCE_BYTES];
    let opened = Opened {
        key,
        stamp: Stamp::read(&frame[HEADER_BYTES + NONCE_BYTES..]),
        tag: nonce_tag(nonce_bytes),
        nonce_id: u128::from_be_bytes(nonce_bytes[..16].try_into().unwrap_or_default()),
    };
    frame.truncate(tag_at);
    frame.advance(HEADER_BYTES + NONCE_BYTES + STAMP_BYTES);
    Ok(opened)
}

/// The keys one node seals and opens with: the primary (which seals) first. Empty on a node
/// without keys, which speaks plaintext.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: Vec<Arc<Key>>,
}

impl Keyring {
    pub fn primary(&self) -> Option<&Arc<Key>> {
        self.keys.first()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[Arc<Key>] {
        &self.keys
    }

    fn position(&self, secret: &[u8; KEY_BYTES]) -> Option<usize> {
        self.keys.iter().position(|k| k.secret() == secret)
    }
}

/// Why a keyring change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The node was created without keys: it speaks plaintext for its whole life.
    NoKeyring,
    /// `use` of a key that is not installed.
    NotInstalled,
    /// `remove` of the primary key: another must be made primary first.
    Primary,
}

/// A node's keyring, read by its tasks on every frame and changed from JavaScript while they
/// run. Readers hold the lock only to clone an `Arc`; a change builds a new keyring and swaps
/// it in, so neither side waits on the other for longer than that. A removed key is wiped once
/// the last connection still using it ends.
#[derive(Debug, Default)]
pub struct Keys(RwLock<Arc<Keyring>>);

impl Keys {
    /// `secrets[0]` is the primary; repeats are ignored.
    pub fn new(secrets: Vec<Zeroizing<[u8; KEY_BYTES]>>) -> Keys {
        let mut keyring = Keyring::default();
        for secret in secrets {
            if keyring.position(&secret).is_none() {
                keyring.keys.push(Arc::new(Key::new(secret)));
            }
        }
        Keys(RwLock::new(Arc::new(keyring)))
    }

    pub fn current(&self) -> Arc<Keyring> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `change` to a copy of the keyring and installs the result.
    fn change<R>(
        &self,
        change: impl FnOnce(&mut Vec<Arc<Key>>) -> Result<R, KeyError>,
    ) -> Result<R, KeyError> {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if current.is_empty() {
            return Err(KeyError::NoKeyring);
        }
        let mut keys = current.keys.clone();
        let result = change(&mut keys)?;
        *current = Arc::new(Keyring { keys });
        Ok(result)
    }

    /// Accepts frames sealed with `secret` from now on. False when it was installed already.
    pub fn install(&self, secret: Zeroizing<[u8; KEY_BYTES]>) -> Result<bool, KeyError> {
        self.change(|keys| {
            if keys.iter().any(|k| k.secret() == &*secret) {
                return Ok(false);
            }
            keys.push(Arc::new(Key::new(secret)));
            Ok(true)
        })
    }

    /// Seals with the installed key `secret` from now on.
    pub fn make_primary(&self, secret: &[u8; KEY_BYTES]) -> Result<(), KeyError> {
        self.change(|keys| {
            let at = keys
                .iter()
                .position(|k| k.secret() == secret)
                .ok_or(KeyError::NotInstalled)?;
            let key = keys.remove(at);
            keys.insert(0, key);
            Ok(())
        })
    }

    /// Stops accepting `secret`. False when it was not installed.
    pub fn remove(&self, secret: &[u8; KEY_BYTES]) -> Result<bool, KeyError> {
        self.change(
            |keys| match keys.iter().position(|k| k.secret() == secret) {
                Some(0) => Err(KeyError::Primary),
                Some(at) => {
                    keys.remove(at);
                    Ok(true)
                }
                None => Ok(false),
            },
        )
    }
}

/// Remembers the sealed frames that opened connections within the freshness window, so that
/// each is acted on once. Frames stamped further than `window` from our clock are stale. Nonces
/// are kept in buckets of one window by stamp, and a bucket is dropped once nothing stamped in
/// it can be fresh: memory follows the rate of honest frames over two windows.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    buckets: Vec<(u64, HashSet<u128>)>,
}

impl ReplayGuard {
    pub fn new(window: Duration) -> Self {
        ReplayGuard {
            window_ms: (window.as_millis() as u64).max(1),
            buckets: Vec::new(),
        }
    }

    /// Whether a frame stamped `sent_at` is within the window of `now`.
    pub fn check_fresh(&self, sent_at: u64, now: u64) -> Result<(), Rejection> {
        if sent_at.abs_diff(now) > self.window_ms {
            return Err(Rejection::Stale);
        }
        Ok(())
    }

    /// Admits a fresh frame never seen before, and remembers it.
    pub fn admit(&mut self, sent_at: u64, nonce_id: u128, now: u64) -> Result<(), Rejection> {
        self.check_fresh(sent_at, now)?;
        let bucket = sent_at / self.window_ms;
        // A bucket's frames are all stamped before (bucket + 1) windows, so none is fresh once
        // `now` reaches (bucket + 2) windows.
        let oldest_fresh = (now / self.window_ms).saturating_sub(1);
        self.buckets.retain(|(b, _)| *b >= oldest_fresh);
        let seen = match self.buckets.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, seen)) => seen,
            None => {
                self.buckets.push((bucket, HashSet::new()));
                &mut self.buckets.last_mut().expect("just pushed").1
            }
        };
        if !seen.insert(nonce_id) {
            return Err(Rejection::Replayed);
        }
        Ok(())
    }

    /// Nonces remembered now.
    pub fn remembered(&self) -> usize {
        self.buckets.iter().map(|(_, seen)| seen.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Limits, Message};

    fn secret_from(bytes: [u8; KEY_BYTES]) -> Zeroizing<[u8; KEY_BYTES]> {
        Zeroizing::new(bytes)
    }

    /// The key whose first four bytes hold `n` (little-endian) and the rest zeros.
    fn numbered(n: u32) -> Zeroizing<[u8; KEY_BYTES]> {
        let mut bytes = [0; KEY_BYTES];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        secret_from(bytes)
    }

    fn counting_key() -> Zeroizing<[u8; KEY_BYTES]> {
        secret_from(std::array::from_fn(|i| i as u8))
    }

    fn ring(secrets: Vec<Zeroizing<[u8; KEY_BYTES]>>) -> Arc<Keyring> {
        Keys::new(secrets).current()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn body() -> Vec<u8> {
        wire::encode(
            "c",
            "10.0.0.1:9000",
            &Message::Suspect {
                name: "10.0.0.2:9001".into(),
                generation: 7,
                heartbeat: 3,
                forward_to: vec![],
            },
        )
        .to_vec()
    }

    const STAMP: Stamp = Stamp {
        sent_at: 1_700_000_000_000,
        generation: 1_699_999_000_000,
        answers: 0x0102_0304_0506_0708,
        recipient: 0x1112_1314_1516_1718,
    };
    const NONCE: [u8; 24] = [
        0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x4b, 0x4c, 0x4d, 0x4e,
        0x4f, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57,
    ];

    /// A frame sealed with key 00..1f and nonce 40..57 in cluster "c", checked independently
    /// with Node's chacha20-poly1305 and HChaCha20 written from its RFC draft: a change here
    /// breaks peers.
    const GOLDEN: &str =
        "c101017b5024e5404142434445464748494a4b4c4d4e4f5051525354555657d43904fb1f0511168ff4863560\
         4a405293b8aec0165f54927b23ee511c12348882fba30df8a3b43ecf9cc4623be0e3c1ab5b7a7cc2b484b286\
         d238da218875646a1aff718451906014037a39033430ea2ae1bd2154";

    fn golden_frame() -> BytesMut {
        let key = Key::new(counting_key());
        BytesMut::from(&seal(&key, "c", &STAMP, NONCE, &body()).0[..])
    }

    #[test]
    fn golden_sealed_frame() {
        let key = Key::new(counting_key());
        assert_eq!(hex(&key.id()), "7b5024e5", "HKDF-SHA256 key id");
        let (sealed, tag) = seal(&key, "c", &STAMP, NONCE, &body());
        assert_eq!(hex(&sealed), GOLDEN);
        assert_eq!(sealed.len(), body().len() + OVERHEAD);
        assert_eq!(tag, 0x4041_4243_4445_4647);

        let mut frame = BytesMut::from(&sealed[..]);
        let opened = open(&ring(vec![counting_key()]), "c", &mut frame).unwrap();
        assert_eq!(opened.stamp, STAMP);
        assert_eq!(opened.tag, tag);
        assert_eq!(&frame[..], &body()[..]);
        let (from, _) = wire::decode(&frame, "c", &Limits::default()).unwrap();
        assert_eq!(from, "10.0.0.1:9000");
    }

    #[test]
    fn every_altered_or_truncated_frame_is_rejected() {
        let keyring = ring(vec![counting_key()]);
        let original = golden_frame();
        for at in 0..original.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut frame = original.clone();
                frame[at] ^= flip;
                let result = open(&keyring, "c", &mut frame);
                assert!(result.is_err(), "byte {at} ^ {flip:#04x} opened");
            }
        }
        for end in 0..original.len() {
            let mut frame = BytesMut::from(&original[..end]);
            assert!(open(&keyring, "c", &mut frame).is_err(), "prefix {end}");
        }
        let mut longer = original.clone();
        longer.extend_from_slice(&[0]);
        assert_eq!(
            open(&keyring, "c", &mut longer).err(),
            Some(Rejection::Forged)
        );

        let mut frame = original.clone();
        frame[1] = 2;
        assert_eq!(
            open(&keyring, "c", &mut frame).err(),
            Some(Rejection::WrongVersion)
        );
        let mut frame = original.clone();
        frame[10] ^= 1; // the nonce
        assert_eq!(
            open(&keyring, "c", &mut frame).err(),
            Some(Rejection::Forged)
        );
    }

    #[test]
    fn another_key_or_another_cluster_does_not_open() {
        let mut frame = golden_frame();
        assert_eq!(
            open(&ring(vec![numbered(1)]), "c", &mut frame).err(),
            Some(Rejection::UnknownKey)
        );
        assert_eq!(
            open(&Keyring::default(), "c", &mut frame).err(),
            Some(Rejection::UnknownKey)
        );
        assert_eq!(
            open(&ring(vec![counting_key()]), "d", &mut frame).err(),
            Some(Rejection::Forged)
        );
        assert_eq!(
            &frame[..],
            &golden_frame()[..],
            "a failed open leaves the bytes"
        );
        assert!(open(&ring(vec![counting_key()]), "c", &mut frame).is_ok());
    }

    /// Keys 41741 and 81739 (see `numbered`) share the id d6955fd6, found by a birthday
    /// search over HKDF-SHA256.
    #[test]
    fn keys_sharing_an_id_are_each_tried() {
        let (a, b) = (Key::new(numbered(41741)), Key::new(numbered(81739)));
        assert_eq!(a.id(), b.id());
        assert_eq!(hex(&a.id()), "d6955fd6");
        let sealed_with = |key: &Key| BytesMut::from(&seal(key, "c", &STAMP, NONCE, &body()).0[..]);

        let both = ring(vec![numbered(41741), numbered(81739)]);
        for key in [&a, &b] {
            let mut frame = sealed_with(key);
            let opened = open(&both, "c", &mut frame).unwrap();
            assert_eq!(opened.key.secret(), key.secret());
            assert_eq!(&frame[..], &body()[..]);
        }
        // Only the other key of that id: tried, and refused as forged.
        let mut frame = sealed_with(&a);
        assert_eq!(
            open(&ring(vec![numbered(81739)]), "c", &mut frame).err(),
            Some(Rejection::Forged)
        );
    }

    #[test]
    fn a_frame_is_admitted_once_and_only_while_fresh() {
        let window = 60_000;
        let mut guard = ReplayGuard::new(Duration::from_millis(window));
        let now = 10 * window + 123;
        assert_eq!(guard.admit(now - 5, 1, now), Ok(()));
        assert_eq!(
            guard.admit(now - 5, 1, now + 1000),
            Err(Rejection::Replayed)
        );
        assert_eq!(guard.admit(now - 5, 2, now), Ok(()));
        assert_eq!(guard.admit(now - window - 1, 3, now), Err(Rejection::Stale));
        assert_eq!(guard.admit(now + window + 1, 4, now), Err(Rejection::Stale));
        assert_eq!(
            guard.admit(now + window, 5, now),
            Ok(()),
            "a clock ahead within the window"
        );
        assert_eq!(guard.check_fresh(now - window, now), Ok(()));
        assert_eq!(guard.remembered(), 3);

        // Once nothing remembered can be fresh, it is forgotten; replays are stale by then.
        let later = now + 3 * window;
        assert_eq!(guard.admit(later, 6, later), Ok(()));
        assert_eq!(guard.remembered(), 1);
        assert_eq!(guard.admit(now - 5, 1, later), Err(Rejection::Stale));
    }

    #[test]
    fn keyring_changes_keep_a_primary() {
        let keys = Keys::new(vec![numbered(1), numbered(2), numbered(1)]);
        let secrets = |keys: &Keys| -> Vec<[u8; KEY_BYTES]> {
            keys.current().keys().iter().map(|k| *k.secret()).collect()
        };
        assert_eq!(
            secrets(&keys),
            [*numbered(1), *numbered(2)],
            "repeats ignored"
        );
        assert_eq!(keys.install(numbered(3)), Ok(true));
        assert_eq!(keys.install(numbered(3)), Ok(false));
        assert_eq!(keys.make_primary(&numbered(9)), Err(KeyError::NotInstalled));
        assert_eq!(keys.remove(&numbered(1)), Err(KeyError::Primary));
        assert_eq!(keys.make_primary(&numbered(3)), Ok(()));
        assert_eq!(secrets(&keys), [*numbered(3), *numbered(1), *numbered(2)]);
        assert_eq!(keys.remove(&numbered(1)), Ok(true));
        assert_eq!(keys.remove(&numbered(1)), Ok(false));
        assert_eq!(secrets(&keys), [*numbered(3), *numbered(2)]);

        let plaintext = Keys::default();
        assert!(plaintext.current().is_empty());
        assert_eq!(plaintext.install(numbered(1)), Err(KeyError::NoKeyring));
    }

    #[test]
    fn a_removed_key_is_dropped_once_its_last_reader_lets_go() {
        let keys = Keys::new(vec![numbered(1), numbered(2)]);
        let reader = keys.current();
        let removed = Arc::downgrade(&reader.keys()[1]);
        assert_eq!(keys.remove(&numbered(2)), Ok(true));
        assert!(removed.upgrade().is_some(), "a frame still opening with it");
        drop(reader);
        assert!(
            removed.upgrade().is_none(),
            "dropped, so wiped by Zeroizing"
        );
    }

    #[test]
    fn debug_output_shows_key_ids_only() {
        let keys = Keys::new(vec![counting_key()]);
        let text = format!("{keys:?}");
        assert!(text.contains("7b"), "{text}");
        assert!(
            !text.contains("0, 1, 2") && !text.contains("000102"),
            "{text}"
        );
    }
}
