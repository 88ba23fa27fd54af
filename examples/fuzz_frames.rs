//! Fuzzes what a node does with the bytes of one inbound frame, on stable Rust: a seeded random
//! and mutational loop over captured frames of every message kind, plaintext and sealed.
//!
//! ```text
//! npm run fuzz -- <seconds> [seed]      # cargo run --release --example fuzz_frames -- ...
//! ```
//!
//! Each execution mutates a frame of the corpus (bit flips, interesting bytes, insertions,
//! deletions, truncation, splices of two frames, repeated runs) and then
//! - frames it with a length prefix and reads it back with the node's frame reader,
//! - decodes it as a plaintext frame,
//! - opens it with the keyring, and decodes what opens,
//! - seals it as a key holder would (a peer with the key sending garbage), opens and decodes it,
//! - shows its stamp to a replay guard.
//!
//! It stops with the input in hex if anything panics or if an altered sealed frame opens. Every
//! second it prints executions and RSS; at the end, the RSS after the first second and now.

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use gossiper::seal::{self, Keys, ReplayGuard, Stamp};
use gossiper::transport::{read_frame, FrameBudget};
use gossiper::wire::{self, DigestEntry, KeyValue, Limits, Message, NodeDelta, Request};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const CLUSTER: &str = "fuzz";
const SENDER: &str = "10.0.0.1:9000";

fn delta(n: u64) -> NodeDelta {
    NodeDelta {
        name: format!("10.0.0.{}:9001", 2 + n % 200),
        generation: 1_700_000_000_000 + n,
        heartbeat: 40 + n,
        from_version: n,
        to_version: n + 2,
        left: n % 2 == 1,
        kvs: vec![
            KeyValue {
                key: "load".into(),
                version: n + 1,
                value: Bytes::from_static(&[
                    0x82, 0xa3, b'c', b'p', b'u', 0xcb, 0x3f, 0xd3, 0x33, 0x33, 0x33, 0x33, 0x33,
                    0x33, 0xa1, b't', 0x93, 1, 2, 3,
                ]),
            },
            KeyValue {
                key: "gone".into(),
                version: n + 2,
                value: Bytes::new(),
            },
        ],
        horizon: n / 2,
    }
}

/// One message of every kind, as a cluster sends them.
fn messages() -> Vec<Message> {
    let names: Vec<String> = (2..6).map(|i| format!("10.0.0.{i}:9000")).collect();
    vec![
        Message::Syn {
            digest: (0..4)
                .map(|i| DigestEntry {
                    name: names[i].clone(),
                    generation: 1_700_000_000_000 + i as u64,
                    heartbeat: 12,
                    max_version: 3,
                    horizon: i as u64,
                })
                .collect(),
        },
        Message::CompactSyn {
            membership_hash: 0x1234_5678_9abc_def0,
            versions: vec![12, 3, 900, 0, 70_000, 2, 1, 1],
        },
        Message::CompactSynRange {
            membership_hash: 0x0fed_cba9_8765_4321,
            offset: 4096,
            versions: vec![7, 1, 8, 0, 9, 2],
        },
        Message::NeedDigest,
        Message::SynAck {
            deltas: vec![delta(1), delta(2)],
            requests: vec![Request {
                name: names[0].clone(),
                generation: 1_700_000_000_000,
                from_version: 1,
                horizon: 1,
            }],
            heartbeats: vec![0, 13, 2, 901],
        },
        Message::Ack {
            deltas: vec![delta(3)],
        },
        Message::Push {
            deltas: vec![delta(4)],
            forward_to: names.clone(),
        },
        Message::Suspect {
            name: names[1].clone(),
            generation: 1_700_000_000_001,
            heartbeat: 99,
            forward_to: names[2..].to_vec(),
        },
    ]
}

const INTERESTING: [u8; 12] = [
    0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc1, 0xcf, 0xdc, 0xdd, 0xdb, 0x94,
];

fn mutate(rng: &mut SmallRng, corpus: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=4) {
        let len = input.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let at = rng.gen_range(0..len);
                input[at] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.gen_range(0..len);
                input[at] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            }
            2 if len > 0 => {
                let at = rng.gen_range(0..len);
                input[at] = rng.gen();
            }
            3 => {
                let at = rng.gen_range(0..=len);
                let byte = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                input.insert(at, byte);
            }
            4 if len > 0 => {
                let at = rng.gen_range(0..len);
                let end = (at + rng.gen_range(1..=8)).min(len);
                input.drain(at..end);
            }
            5 => input.truncate(rng.gen_range(0..=len)),
            6 => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                let from = rng.gen_range(0..=other.len());
                let at = rng.gen_range(0..=len);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let at = rng.gen_range(0..len);
                let end = (at + rng.gen_range(1..=16)).min(len);
                let run = input[at..end].to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    input.splice(at..at, run.iter().copied());
                }
            }
            _ => {}
        }
    }
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let limits = Limits::default();
    let keys = Keys::new(vec![Zeroizing::new([7; 32]), Zeroizing::new([8; 32])]);
    let keyring = keys.current();
    let key = keyring.primary().expect("a key").clone();
    // Stamps within a minute and a half of the guard's clock, which moves 1 ms per execution:
    // two thirds are fresh, and the guard holds a steady two windows of them.
    let stamp = |rng: &mut SmallRng, now: u64| Stamp {
        sent_at: now + rng.gen_range(0..180_000) - 90_000,
        generation: 1_700_000_000_000,
        answers: rng.gen_range(0..3),
        recipient: rng.gen_range(0..3),
    };
    const EPOCH: u64 = 1_700_000_000_000;

    let mut rng = SmallRng::seed_from_u64(seed);
    let plaintext: Vec<Vec<u8>> = messages()
        .iter()
        .map(|m| wire::encode(CLUSTER, SENDER, m).to_vec())
        .collect();
    let mut corpus = plaintext.clone();
    for body in &plaintext {
        let (sealed, _) = seal::seal(
            &key,
            CLUSTER,
            &stamp(&mut rng, EPOCH),
            seal::random_nonce(),
            body,
        );
        corpus.push(sealed);
    }
    let sealed_originals: Vec<Vec<u8>> = corpus[plaintext.len()..].to_vec();

    let mut guard = ReplayGuard::new(Duration::from_secs(60));
    let budget = FrameBudget::new(1 << 20);
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(seconds);
    let (mut executions, mut opened, mut decoded) = (0u64, 0u64, 0u64);
    let mut rss_after_first_second = None;
    let mut next_report = Duration::from_secs(1);
    println!(
        "fuzz_frames: {seconds} s, seed {seed}, {} frames in the corpus",
        corpus.len()
    );
    loop {
        let elapsed = started.elapsed();
        if elapsed >= deadline {
            break;
        }
        if elapsed >= next_report {
            let rss = rss_mb();
            rss_after_first_second.get_or_insert(rss);
            println!(
                "{:>6.1} s  {executions:>11} executions ({:.0}/s)  {opened} opened  {decoded} decoded  guard {}  RSS {rss:.1} MB",
                elapsed.as_secs_f64(),
                executions as f64 / elapsed.as_secs_f64(),
                guard.remembered(),
            );
            next_report += Duration::from_secs(1);
        }
        let original = rng.gen_range(0..corpus.len());
        let mut input = corpus[original].clone();
        mutate(&mut rng, &corpus, &mut input);
        let now = EPOCH + executions;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut framed = BytesMut::with_capacity(input.len() + 4);
            framed.extend_from_slice(&(input.len() as u32).to_be_bytes());
            framed.extend_from_slice(&input);
            // Reading from memory never waits, so the read is done at its first poll.
            let mut reader = &framed[..];
            if let Some(Some(Ok(frame))) = read_frame(&mut reader, 64 << 10, &budget).now_or_never()
            {
                decoded += wire::decode(&frame, CLUSTER, &limits).is_ok() as u64;
            }
            let mut frame = BytesMut::from(&input[..]);
            if let Ok(open) = seal::open(&keyring, CLUSTER, &mut frame) {
                let untouched = sealed_originals.iter().any(|s| s[..] == input[..]);
                assert!(untouched, "an altered sealed frame opened");
                opened += 1;
                let _ = guard.admit(open.stamp.sent_at, open.nonce_id, now);
                decoded += wire::decode(&frame, CLUSTER, &limits).is_ok() as u64;
            }
            // A key holder sending garbage: it opens, then must be refused by the decoder.
            let (sealed, _) = seal::seal(
                &key,
                CLUSTER,
                &stamp(&mut rng, now),
                seal::random_nonce(),
                &input,
            );
            let mut frame = BytesMut::from(&sealed[..]);
            let open = seal::open(&keyring, CLUSTER, &mut frame).expect("our own frame opens");
            assert_eq!(&frame[..], &input[..]);
            let _ = guard.admit(open.stamp.sent_at, open.nonce_id, now);
            decoded += wire::decode(&frame, CLUSTER, &limits).is_ok() as u64;
        }));
        if outcome.is_err() {
            eprintln!(
                "fuzz_frames: FAILED after {executions} executions on input {}",
                hex(&input)
            );
            std::process::exit(1);
        }
        executions += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss = rss_mb();
    println!(
        "fuzz_frames: {executions} executions in {elapsed:.1} s ({:.0}/s), no panic, no altered frame opened; \
         {opened} opened, {decoded} decoded; RSS {:.1} MB after 1 s, {rss:.1} MB at the end",
        executions as f64 / elapsed,
        rss_after_first_second.unwrap_or(rss),
    );
}
