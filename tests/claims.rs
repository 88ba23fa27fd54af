//! Forged claims about a live node, one frame each, sent by a stranger to whole nodes running
//! their real tasks on the in-memory network with tokio's paused clock. Each forged frame is
//! relayed at once to every node but its subject D (a Push's `forward_to`), the worst spread one
//! frame can get; D writes right after it. Every scenario asserts that D is live everywhere in
//! its true state again, with its write, within a few gossip rounds, and prints how long that
//! took (`cargo test --test claims -- --nocapture`). A failing assertion names its seed.

use gossiper::config::Settings;
use gossiper::node::{Listen, Node};
use gossiper::protocol::{unix_ms, Event, EventSink};
use gossiper::transport::{Connection, MemNetwork, MemTransport, Transport};
use gossiper::wire::{self, KeyValue, Message, NodeDelta, Rejection, MAX_COUNTER};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const SEEDS: [u64; 3] = [1, 2, 3];
const PORT: u16 = 7946;
/// The node the forged frames are about.
const D: usize = 3;

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl EventSink for Recorder {
    fn emit(&self, event: Event<'_>) {
        if let Event::PeerFailed(peer) = event {
            self.0.lock().unwrap().push(peer.to_owned());
        }
    }
}

struct Sim {
    seed: u64,
    net: MemNetwork,
    nodes: Vec<Node<MemTransport>>,
    failures: Vec<Arc<Recorder>>,
}

/// Nodes of the cluster the attack table runs on.
const NODES: usize = 5;

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1))
}

fn name(i: usize) -> String {
    format!("{}:{PORT}", ip(i))
}

fn value(text: &str) -> bytes::Bytes {
    let mut out = vec![0xa0 | text.len() as u8];
    out.extend_from_slice(text.as_bytes());
    out.into()
}

impl Sim {
    /// `n` nodes seeded by the first, started, knowing each other.
    async fn start(seed: u64, n: usize) -> Sim {
        let settings = Settings::default();
        let net = MemNetwork::new(seed, settings.limits.max_frame_bytes);
        let failures: Vec<Arc<Recorder>> = (0..n).map(|_| Arc::default()).collect();
        let nodes: Vec<Node<MemTransport>> = (0..n)
            .map(|i| {
                let seeds = if i == 0 { vec![] } else { vec![name(0)] };
                let sink = failures[i].clone();
                Node::with_transport(
                    settings.clone(),
                    seeds,
                    sink,
                    net.host(ip(i)),
                    Some(seed * 100 + i as u64),
                )
            })
            .collect();
        for node in &nodes {
            let listen = Listen {
                port: PORT,
                ..Listen::default()
            };
            let (_, mut named) = node.start(&listen).unwrap();
            named.wait_for(Option::is_some).await.unwrap();
        }
        let sim = Sim {
            seed,
            net,
            nodes,
            failures,
        };
        sim.wait(Duration::from_secs(15), "full membership", |sim| {
            (0..n).all(|i| sim.live_peers(i).len() == n - 1)
        })
        .await;
        // A few rounds more, so that detectors have a history.
        tokio::time::sleep(Duration::from_secs(5)).await;
        sim
    }

    fn live_peers(&self, i: usize) -> Vec<String> {
        self.nodes[i].with_cluster(|c| c.peer_names(Some(true)))
    }

    /// D's own digest entry: its generation, heartbeat and max version, as any digest shows.
    fn tip(&self) -> NodeDelta {
        let own = self.nodes[D].with_cluster(|c| c.digest()[0].clone());
        NodeDelta {
            name: own.name,
            generation: own.generation,
            heartbeat: own.heartbeat,
            from_version: own.max_version,
            to_version: own.max_version,
            left: false,
            kvs: vec![],
            horizon: own.horizon,
        }
    }

    /// Every node holds D's true state: live, in D's current generation and max version, no
    /// heartbeat ahead of D's own, with `text` under `key`.
    fn all_hear_d(&self, key: &str, text: &str) -> bool {
        let own = self.nodes[D].with_cluster(|c| c.digest()[0].clone());
        (0..self.nodes.len()).filter(|&i| i != D).all(|i| {
            self.nodes[i].with_cluster(|c| {
                c.peer_infos(Instant::now()).iter().any(|p| {
                    p.name == own.name
                        && p.live
                        && p.generation == own.generation
                        && p.heartbeat <= own.heartbeat
                        && p.max_version == own.max_version
                }) && c.node_value(&name(D), key) == Some(&value(text))
            })
        })
    }

    /// Sends one frame to node `to` from a host outside the cluster.
    async fn forge(&self, to: usize, message: Message) {
        let stranger = self.net.host(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)));
        let mut conn = stranger
            .connect(SocketAddr::new(ip(to), PORT))
            .await
            .unwrap();
        let frame = wire::encode("gossiper", "10.9.9.9:9", &message);
        conn.send(frame).await.unwrap();
    }

    /// A Push of `delta` to node 0, to be relayed to every node but D.
    async fn forge_relayed(&self, delta: NodeDelta) {
        let forward_to = (1..self.nodes.len())
            .filter(|&i| i != D)
            .map(name)
            .collect();
        self.forge(
            0,
            Message::Push {
                deltas: vec![delta],
                forward_to,
            },
        )
        .await;
    }

    async fn wait(&self, limit: Duration, what: &str, done: impl Fn(&Sim) -> bool) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < limit,
                "seed {}: not within {limit:?}: {what}",
                self.seed
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    fn counted(&self, what: impl Fn(&gossiper::node::Counters) -> u64) -> u64 {
        self.nodes.iter().map(|n| what(n.counters())).sum()
    }

    fn failures(&self) -> usize {
        self.failures
            .iter()
            .map(|f| f.0.lock().unwrap().len())
            .sum()
    }

    async fn stop(&self) {
        for node in &self.nodes {
            node.stop().await;
        }
    }
}

fn each_seed<F, Fut>(scenario: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    for seed in SEEDS {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(scenario(seed));
    }
}

/// One row of the attack table: how a forged delta differs from D's true tip.
struct Row {
    attack: &'static str,
    forge: fn(NodeDelta) -> NodeDelta,
    /// Refused as implausible everywhere (else taken, then refuted by D).
    implausible: bool,
}

const ROWS: &[Row] = &[
    Row {
        attack: "generation 2^53",
        forge: |d| NodeDelta {
            generation: MAX_COUNTER,
            from_version: 0,
            to_version: 0,
            ..d
        },
        implausible: true,
    },
    Row {
        attack: "generation 30 s ahead",
        forge: |d| NodeDelta {
            generation: unix_ms() + 30_000,
            from_version: 0,
            to_version: 0,
            ..d
        },
        implausible: false,
    },
    Row {
        attack: "heartbeat 2^53",
        forge: |d| NodeDelta {
            heartbeat: MAX_COUNTER,
            ..d
        },
        implausible: true,
    },
    Row {
        attack: "heartbeat +100,000",
        forge: |d| NodeDelta {
            heartbeat: d.heartbeat + 100_000,
            ..d
        },
        implausible: false,
    },
    Row {
        attack: "max version 2^53",
        forge: |d| NodeDelta {
            to_version: MAX_COUNTER,
            ..d
        },
        implausible: true,
    },
    Row {
        attack: "max version +1,000,000",
        forge: |d| NodeDelta {
            to_version: d.to_version + 1_000_000,
            ..d
        },
        implausible: false,
    },
    Row {
        attack: "D's key at D's next version",
        forge: |d| NodeDelta {
            to_version: d.to_version + 1,
            kvs: vec![KeyValue {
                key: "k".into(),
                version: d.to_version + 1,
                value: value("forged"),
            }],
            ..d
        },
        implausible: false,
    },
    Row {
        attack: "left = true",
        forge: |d| NodeDelta {
            to_version: d.to_version + 1,
            left: true,
            ..d
        },
        implausible: false,
    },
];

#[test]
fn one_forged_frame_about_a_live_node_is_refused_or_refuted_within_a_few_rounds() {
    for row in ROWS {
        each_seed(|seed| async move {
            let sim = Sim::start(seed, NODES).await;
            sim.nodes[D].set_local("k", value("before"), None).unwrap();
            sim.wait(Duration::from_secs(2), "the first write", |sim| {
                sim.all_hear_d("k", "before")
            })
            .await;
            let failures_before = sim.failures();

            sim.forge_relayed((row.forge)(sim.tip())).await;
            // The relays land first: every node but D holds the forgery.
            tokio::time::sleep(Duration::from_millis(1)).await;
            // D's next write, at the version a forged write may have taken.
            sim.nodes[D].set_local("k", value("after"), None).unwrap();
            let took = sim
                .wait(Duration::from_secs(5), row.attack, |sim| {
                    sim.all_hear_d("k", "after")
                })
                .await;
            let implausible = sim.counted(|c| c.rejected(Rejection::Implausible));
            let refutations = sim.counted(|c| c.refutations.load(Relaxed));
            println!(
                "seed {seed}: {:<28} D live with its write everywhere after {:>5} ms \
                 ({implausible} implausible, {refutations} refutations, {} peer_failed)",
                row.attack,
                took.as_millis(),
                sim.failures() - failures_before
            );
            if row.implausible {
                // Refused by the node it reached, and relayed to nobody.
                assert_eq!(
                    (implausible, refutations),
                    (1, 0),
                    "seed {seed}: {}",
                    row.attack
                );
            } else {
                assert_eq!(
                    (implausible, refutations),
                    (0, 1),
                    "seed {seed}: {}",
                    row.attack
                );
            }
            // Only a forged `left` fails D anywhere, and D's refutation revives it.
            if row.attack != "left = true" {
                assert_eq!(
                    sim.failures(),
                    failures_before,
                    "seed {seed}: {}",
                    row.attack
                );
            }
            // It holds: later rounds bring back nothing of the forgery.
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(sim.all_hear_d("k", "after"), "seed {seed}: {}", row.attack);
            sim.stop().await;
        });
    }
}

#[test]
fn a_flood_of_forged_suspicions_fails_nobody() {
    each_seed(|seed| async move {
        let sim = Sim::start(seed, NODES).await;
        // 90 Suspect frames a second for 20 s, each naming a live node at its true generation
        // and heartbeat, sent to another node and forwarded to all the rest.
        for k in 0..1800 {
            let (about, to) = (k % NODES, (k / NODES + 1 + k) % NODES);
            let (about, to) = if about == to {
                (about, (to + 1) % NODES)
            } else {
                (about, to)
            };
            let own = sim.nodes[about].with_cluster(|c| c.digest()[0].clone());
            let forward_to = (0..NODES).filter(|&i| i != to).map(name).collect();
            sim.forge(
                to,
                Message::Suspect {
                    name: own.name,
                    generation: own.generation,
                    heartbeat: own.heartbeat,
                    forward_to,
                },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(11)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sim.failures(), 0, "seed {seed}");
        assert_eq!(
            sim.counted(|c| c.refutations.load(Relaxed)),
            0,
            "seed {seed}"
        );
        sim.stop().await;
    });
}

#[test]
fn a_claim_told_to_one_node_of_30_reaches_its_subject_and_is_refuted_within_a_few_rounds() {
    for row in ROWS.iter().filter(|r| !r.implausible) {
        each_seed(|seed| async move {
            let sim = Sim::start(seed, 30).await;
            sim.nodes[D].set_local("k", value("before"), None).unwrap();
            sim.wait(Duration::from_secs(2), "the first write", |sim| {
                sim.all_hear_d("k", "before")
            })
            .await;
            // No relay and no write of D's: the claim spreads by anti-entropy alone, until D
            // meets a node that holds it.
            let to = (D + 1 + seed as usize) % 30;
            let forged = (row.forge)(sim.tip());
            sim.forge(
                to,
                Message::Push {
                    deltas: vec![forged],
                    forward_to: vec![],
                },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
            let took = sim
                .wait(Duration::from_secs(10), row.attack, |sim| {
                    sim.all_hear_d("k", "before")
                })
                .await;
            println!(
                "seed {seed}: {:<28} told to one node of 30: D's true state everywhere after {:>5} ms",
                row.attack,
                took.as_millis()
            );
            assert_eq!(
                sim.counted(|c| c.refutations.load(Relaxed)),
                1,
                "seed {seed}"
            );
            sim.stop().await;
        });
    }
}
