//! Whole nodes, their real tasks included, on the in-memory network with tokio's paused clock:
//! every scenario is deterministic for its seed, and runs over a fixed list of seeds. A failing
//! assertion names the seed that reproduces it.

use gossiper::config::Settings;
use gossiper::node::{Listen, Node};
use gossiper::protocol::{Event, EventSink};
use gossiper::transport::{Faults, MemNetwork, MemTransport};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const SEEDS: [u64; 3] = [1, 2, 3];
const PORT: u16 = 7946;

/// Events as a listener would see them.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl EventSink for Recorder {
    fn emit(&self, event: Event<'_>) {
        let text = match event {
            Event::NewPeer(p) => format!("new_peer {p}"),
            Event::Update { peer, key, .. } => format!("update {peer} {key}"),
            Event::Delete { peer, key } => format!("delete {peer} {key}"),
            Event::PeerAlive(p) => format!("peer_alive {p}"),
            Event::PeerFailed(p) => format!("peer_failed {p}"),
        };
        self.0.lock().unwrap().push(text);
    }
}

impl Recorder {
    fn count_prefix(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with(prefix))
            .count()
    }

    fn count(&self, event: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == event)
            .count()
    }
}

struct Host {
    node: Node<MemTransport>,
    events: Arc<Recorder>,
    name: String,
}

struct Sim {
    seed: u64,
    net: MemNetwork,
    hosts: Vec<Host>,
}

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8))
}

fn name(i: usize) -> String {
    format!("{}:{PORT}", ip(i))
}

/// A msgpack string.
fn value(text: &str) -> bytes::Bytes {
    let mut out = vec![0xa0 | text.len() as u8];
    out.extend_from_slice(text.as_bytes());
    out.into()
}

impl Sim {
    /// `n` hosts seeded with host 0 (which has no seeds), not started.
    fn new(seed: u64, n: usize, seeds: impl Fn(usize) -> Vec<String>) -> Sim {
        Sim::with_settings(seed, n, Settings::default(), seeds)
    }

    fn with_settings(
        seed: u64,
        n: usize,
        settings: Settings,
        seeds: impl Fn(usize) -> Vec<String>,
    ) -> Sim {
        let net = MemNetwork::new(seed, settings.limits.max_frame_bytes);
        let hosts = (0..n)
            .map(|i| {
                let events = Arc::new(Recorder::default());
                let node = Node::with_transport(
                    settings.clone(),
                    seeds(i),
                    events.clone(),
                    net.host(ip(i)),
                    Some(seed * 1000 + i as u64),
                );
                Host {
                    node,
                    events,
                    name: name(i),
                }
            })
            .collect();
        Sim { seed, net, hosts }
    }

    fn seeded_by_first(seed: u64, n: usize) -> Sim {
        Sim::new(seed, n, |i| if i == 0 { vec![] } else { vec![name(0)] })
    }

    async fn start(&self, i: usize) {
        let (_, mut named) = self.hosts[i]
            .node
            .start(&Listen {
                port: PORT,
                ..Listen::default()
            })
            .unwrap_or_else(|e| panic!("seed {}: start {i}: {e:?}", self.seed));
        let named = named.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(named.as_deref(), Some(self.hosts[i].name.as_str()));
    }

    async fn start_all(&self) {
        for i in 0..self.hosts.len() {
            self.start(i).await;
        }
    }

    fn live_peers(&self, i: usize) -> Vec<String> {
        self.hosts[i]
            .node
            .with_cluster(|c| c.peer_names(Some(true)))
    }

    fn value(&self, at: usize, owner: usize, key: &str) -> Option<bytes::Bytes> {
        let owner = &self.hosts[owner].name;
        self.hosts[at]
            .node
            .with_cluster(|c| c.node_value(owner, key).cloned())
    }

    fn keys(&self, at: usize, owner: usize) -> Vec<String> {
        let owner = &self.hosts[owner].name;
        self.hosts[at].node.with_cluster(|c| c.node_keys(owner))
    }

    /// The collection horizon of `owner` as host `at` knows it.
    fn horizon(&self, at: usize, owner: usize) -> u64 {
        let owner = &self.hosts[owner].name;
        self.hosts[at]
            .node
            .peer_infos()
            .iter()
            .find(|p| &p.name == owner)
            .map_or(0, |p| p.horizon)
    }

    /// Advances the paused clock until `done` holds; panics naming the seed after `limit`.
    /// Returns how long it took.
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

    fn datagram_exchanges(&self) -> u64 {
        self.hosts
            .iter()
            .map(|h| h.node.counters().datagram_exchanges.load(Ordering::Relaxed))
            .sum()
    }

    async fn stop_all(&self) {
        for host in &self.hosts {
            host.node.stop().await;
        }
    }
}

/// Runs `scenario` once per seed, each on a fresh paused-clock runtime.
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

#[test]
fn a_cluster_forms_and_every_node_is_named_by_its_own_address() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 12);
        sim.start_all().await;
        sim.wait(Duration::from_secs(10), "full membership", |sim| {
            (0..12).all(|i| sim.live_peers(i).len() == 11)
        })
        .await;
        for i in 0..12 {
            assert!(!sim.live_peers(i).iter().any(|p| p.starts_with("127.")));
        }
        sim.stop_all().await;
    });
}

#[test]
fn host_name_seeds_are_resolved_and_a_seed_that_is_ourselves_is_skipped() {
    each_seed(|seed| async move {
        // Every node has the same seed list, itself included, as configuration files do.
        let sim = Sim::new(seed, 6, |_| {
            vec!["seed-a:7946".into(), "seed-b:7946".into()]
        });
        sim.net.set_name("seed-a", vec![ip(0)]);
        sim.net.set_name("seed-b", vec![ip(1)]);
        sim.start_all().await;
        sim.wait(Duration::from_secs(15), "full membership", |sim| {
            (0..6).all(|i| sim.live_peers(i).len() == 5)
        })
        .await;
        sim.stop_all().await;
    });
}

#[test]
fn an_unresolvable_seed_is_retried_until_it_resolves() {
    each_seed(|seed| async move {
        let sim = Sim::new(seed, 3, |i| {
            if i == 0 {
                vec![]
            } else {
                vec!["later:7946".into()]
            }
        });
        sim.start_all().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sim.live_peers(1).is_empty());
        assert!(
            sim.hosts[1]
                .node
                .counters()
                .seed_resolve_failures
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        sim.net.set_name("later", vec![ip(0)]);
        sim.wait(
            Duration::from_secs(10),
            "membership once the name resolves",
            |sim| (0..3).all(|i| sim.live_peers(i).len() == 2),
        )
        .await;
        sim.stop_all().await;
    });
}

#[test]
fn a_write_reaches_everyone_through_the_push_tree_in_milliseconds() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 30);
        sim.start_all().await;
        sim.wait(Duration::from_secs(15), "full membership", |sim| {
            (0..30).all(|i| sim.live_peers(i).len() == 29)
        })
        .await;
        sim.hosts[7]
            .node
            .set_local("hi", value("there"), None)
            .unwrap();
        let took = sim
            .wait(Duration::from_secs(5), "the write everywhere", |sim| {
                (0..30).all(|i| i == 7 || sim.value(i, 7, "hi") == Some(value("there")))
            })
            .await;
        // No gossip round needed: the push tree carries it (a round is 1 s).
        assert!(took < Duration::from_millis(500), "seed {seed}: {took:?}");
        for i in (0..30).filter(|&i| i != 7) {
            assert_eq!(
                sim.hosts[i].events.count(&format!("update {} hi", name(7))),
                1
            );
        }
        sim.stop_all().await;
    });
}

#[test]
fn a_silent_node_is_failed_everywhere_once_and_a_stopped_one_at_once() {
    each_seed(|seed| async move {
        let mut sim = Sim::seeded_by_first(seed, 10);
        sim.start_all().await;
        sim.wait(Duration::from_secs(10), "full membership", |sim| {
            (0..10).all(|i| sim.live_peers(i).len() == 9)
        })
        .await;
        // Dropping a node ends its tasks without a word, as a crash does.
        let crashed = sim.hosts.remove(9);
        drop(crashed.node);
        let took = sim
            .wait(Duration::from_secs(40), "the crash detected", |sim| {
                (0..9).all(|i| sim.live_peers(i).len() == 8)
            })
            .await;
        assert!(
            took > Duration::from_secs(10),
            "seed {seed}: convicted after {took:?}"
        );
        let failed = format!("peer_failed {}", name(9));
        for host in &sim.hosts {
            assert_eq!(host.events.count(&failed), 1, "seed {seed}");
        }
        // A graceful stop is known at once.
        sim.hosts[8].node.stop().await;
        sim.wait(Duration::from_millis(500), "the leave known", |sim| {
            (0..8).all(|i| sim.live_peers(i).len() == 7)
        })
        .await;
        // Nobody else was ever failed.
        for host in &sim.hosts[..8] {
            let events = host.events.0.lock().unwrap();
            let failures = events
                .iter()
                .filter(|e| e.starts_with("peer_failed"))
                .count();
            assert_eq!(failures, 2, "seed {seed}: {events:?}");
        }
        sim.stop_all().await;
    });
}

#[test]
fn a_restarted_node_is_alive_again_and_its_new_writes_win() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 6);
        sim.start_all().await;
        sim.hosts[3]
            .node
            .set_local("k", value("old"), None)
            .unwrap();
        sim.wait(Duration::from_secs(10), "old value everywhere", |sim| {
            (0..6).all(|i| i == 3 || sim.value(i, 3, "k") == Some(value("old")))
        })
        .await;
        sim.hosts[3].node.stop().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        sim.start(3).await;
        sim.hosts[3]
            .node
            .set_local("k", value("new"), None)
            .unwrap();
        sim.wait(
            Duration::from_secs(10),
            "alive again with the new value",
            |sim| {
                (0..6).all(|i| {
                    i == 3
                        || (sim.live_peers(i).len() == 5
                            && sim.value(i, 3, "k") == Some(value("new")))
                })
            },
        )
        .await;
        // Anti-entropy over later rounds never brings the old incarnation back.
        tokio::time::sleep(Duration::from_secs(10)).await;
        for i in (0..6).filter(|&i| i != 3) {
            assert_eq!(sim.value(i, 3, "k"), Some(value("new")), "seed {seed}");
        }
        sim.stop_all().await;
    });
}

#[test]
fn a_partition_heals_and_writes_from_both_sides_reach_everyone() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 10);
        sim.start_all().await;
        sim.wait(Duration::from_secs(10), "full membership", |sim| {
            (0..10).all(|i| sim.live_peers(i).len() == 9)
        })
        .await;
        // Ten rounds of beats first: in a young window, one piece of stale news of a peer (a
        // beat from before the partition, arriving late through a neighbour) still weighs
        // enough to delay conviction well past 18 rounds.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let left: Vec<IpAddr> = (0..5).map(ip).collect();
        let right: Vec<IpAddr> = (5..10).map(ip).collect();
        sim.net.partition(&[&left, &right]);
        sim.wait(
            Duration::from_secs(60),
            "each side failing the other",
            |sim| (0..10).all(|i| sim.live_peers(i).len() == 4),
        )
        .await;
        sim.hosts[1]
            .node
            .set_local("side", value("left"), None)
            .unwrap();
        sim.hosts[8]
            .node
            .set_local("side", value("right"), None)
            .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            sim.value(6, 1, "side"),
            None,
            "seed {seed}: crossed the partition"
        );
        sim.net.heal();
        sim.wait(
            Duration::from_secs(60),
            "healed, every write everywhere",
            |sim| {
                (0..10).all(|i| {
                    sim.live_peers(i).len() == 9
                        && (i == 1 || sim.value(i, 1, "side") == Some(value("left")))
                        && (i == 8 || sim.value(i, 8, "side") == Some(value("right")))
                })
            },
        )
        .await;
        sim.stop_all().await;
    });
}

#[test]
fn lossy_delayed_duplicating_links_still_converge_without_false_failures() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 12);
        sim.net.set_faults(Faults {
            drop: 0.05,
            duplicate: 0.05,
            delay: (Duration::ZERO, Duration::from_millis(80)),
        });
        sim.start_all().await;
        sim.wait(Duration::from_secs(30), "full membership", |sim| {
            (0..12).all(|i| sim.live_peers(i).len() == 11)
        })
        .await;
        sim.hosts[4].node.set_local("k", value("v"), None).unwrap();
        sim.wait(Duration::from_secs(30), "the write everywhere", |sim| {
            (0..12).all(|i| i == 4 || sim.value(i, 4, "k") == Some(value("v")))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        for host in &sim.hosts {
            let events = host.events.0.lock().unwrap();
            assert!(
                !events.iter().any(|e| e.starts_with("peer_failed")),
                "seed {seed}: {events:?}"
            );
        }
        let (delivered, dropped) = sim.net.frame_counts();
        assert!(dropped > 0 && delivered > dropped * 5, "seed {seed}");
        assert!(
            sim.datagram_exchanges() > 0,
            "seed {seed}: no datagram exchange"
        );
        sim.stop_all().await;
    });
}

/// Connections opened, and exchanges completed over datagrams, in 20 steady rounds of a formed
/// cluster of 10 with `max_datagram_bytes`.
async fn steady_traffic(seed: u64, max_datagram_bytes: usize) -> (u64, u64) {
    let settings = Settings {
        max_datagram_bytes,
        ..Settings::default()
    };
    let sim = Sim::with_settings(seed, 10, settings, |i| {
        if i == 0 {
            vec![]
        } else {
            vec![name(0)]
        }
    });
    sim.start_all().await;
    sim.wait(Duration::from_secs(10), "full membership", |sim| {
        (0..10).all(|i| sim.live_peers(i).len() == 9)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (connections, datagram_exchanges) = (sim.net.connection_count(), sim.datagram_exchanges());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let traffic = (
        sim.net.connection_count() - connections,
        sim.datagram_exchanges() - datagram_exchanges,
    );
    sim.stop_all().await;
    traffic
}

#[test]
fn a_steady_clusters_exchanges_go_by_datagram_and_open_few_connections() {
    each_seed(|seed| async move {
        let (tcp_connections, none) = steady_traffic(seed, 0).await;
        assert_eq!(none, 0, "seed {seed}: datagrams while off");
        // Every node starts an exchange a round: 200 exchanges in 20 rounds, each a connection.
        assert!(tcp_connections >= 200, "seed {seed}: {tcp_connections}");
        let (connections, datagram_exchanges) = steady_traffic(seed, 1400).await;
        assert!(
            datagram_exchanges >= 180,
            "seed {seed}: {datagram_exchanges} datagram exchanges"
        );
        assert!(
            connections * 5 < tcp_connections,
            "seed {seed}: {connections} connections with datagrams, {tcp_connections} without"
        );
    });
}

#[test]
fn a_network_that_blocks_datagrams_still_forms_spreads_and_keeps_everyone_alive() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 10);
        sim.net.block_datagrams(true);
        sim.start_all().await;
        sim.wait(Duration::from_secs(10), "full membership", |sim| {
            (0..10).all(|i| sim.live_peers(i).len() == 9)
        })
        .await;
        let (_, dropped) = sim.net.frame_counts();
        tokio::time::sleep(Duration::from_secs(30)).await;
        // Only datagrams are lost: after a few unanswered ones, a node tries again a few rounds
        // later, not every round.
        let datagrams_tried = sim.net.frame_counts().1 - dropped;
        assert!(
            datagrams_tried <= 10 * 30 / 3,
            "seed {seed}: {datagrams_tried} datagrams in 30 rounds of 10 nodes"
        );
        let exchanges: u64 = sim
            .hosts
            .iter()
            .map(|h| h.node.counters().exchanges.load(Ordering::Relaxed))
            .sum();
        sim.hosts[3].node.set_local("k", value("v"), None).unwrap();
        sim.wait(Duration::from_secs(5), "the write everywhere", |sim| {
            (0..10).all(|i| i == 3 || sim.value(i, 3, "k") == Some(value("v")))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(sim.datagram_exchanges(), 0, "seed {seed}");
        // Exchanges by connection go on every round: two counts (one per side) for each.
        assert!(
            exchanges >= 2 * 10 * 30,
            "seed {seed}: {exchanges} exchanges"
        );
        for host in &sim.hosts {
            assert_eq!(host.events.count_prefix("peer_failed"), 0, "seed {seed}");
        }
        sim.stop_all().await;
    });
}

#[test]
fn two_hosts_cut_from_each_other_stay_alive_and_hear_of_each_other_through_the_rest() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 8);
        sim.start_all().await;
        sim.wait(Duration::from_secs(10), "full membership", |sim| {
            (0..8).all(|i| sim.live_peers(i).len() == 7)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        sim.net.cut(ip(1), ip(2));
        tokio::time::sleep(Duration::from_secs(30)).await;
        sim.hosts[1].node.set_local("k", value("v"), None).unwrap();
        sim.wait(Duration::from_secs(10), "the write across the cut", |sim| {
            sim.value(2, 1, "k") == Some(value("v"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        for host in &sim.hosts {
            assert_eq!(host.events.count_prefix("peer_failed"), 0, "seed {seed}");
        }
        sim.stop_all().await;
    });
}

#[test]
fn lifecycle_races_end_the_same_way_every_time() {
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, 2);
        let listen = Listen {
            port: PORT,
            ..Listen::default()
        };
        let node = &sim.hosts[0].node;
        node.start(&listen).unwrap();
        assert_eq!(node.start(&listen).unwrap_err().code, "ERR_GOSSIP_RUNNING");
        let first = node.stop();
        assert!(node.is_stopping());
        assert_eq!(node.start(&listen).unwrap_err().code, "ERR_GOSSIP_STOPPING");
        let second = node.stop();
        // Both stops end together, after every task, with the port free again.
        tokio::join!(first, second);
        assert!(!node.is_running() && !node.is_stopping());
        node.start(&listen)
            .expect("the port is free once stop has resolved");
        node.stop().await;
        node.stop().await;
    });
}

const TOMBSTONE_TTL: Duration = Duration::from_secs(30);

/// Five hosts that forget deletions after [`TOMBSTONE_TTL`], all started and live.
async fn collecting_cluster(seed: u64) -> Sim {
    let settings = Settings {
        tombstone_ttl: TOMBSTONE_TTL,
        ..Settings::default()
    };
    let sim = Sim::with_settings(seed, 5, settings, |i| {
        if i == 0 {
            vec![]
        } else {
            vec![name(0)]
        }
    });
    sim.start_all().await;
    sim.wait(Duration::from_secs(10), "full membership", |sim| {
        (0..5).all(|i| sim.live_peers(i).len() == 4)
    })
    .await;
    sim
}

/// Host 4 is away (stopped, or cut off from everyone) for longer than the tombstone ttl while
/// host 1 deletes a key and forgets the deletion. It comes back without the key, and nobody
/// gets it back: every other host reports the deletion once and never the key again.
async fn away_past_the_horizon(seed: u64, stopped: bool) {
    let sim = collecting_cluster(seed).await;
    let (owner, away) = (1, 4);
    sim.hosts[owner]
        .node
        .set_local("x", value("1"), None)
        .unwrap();
    sim.hosts[owner]
        .node
        .set_local("y", value("2"), None)
        .unwrap();
    sim.wait(Duration::from_secs(10), "x and y everywhere", |sim| {
        (0..5).all(|i| sim.keys(i, owner) == ["x", "y"])
    })
    .await;
    if stopped {
        sim.hosts[away].node.stop().await;
    } else {
        let others: Vec<IpAddr> = (0..4).map(ip).collect();
        sim.net.partition(&[&others, &[ip(away)]]);
    }

    assert!(sim.hosts[owner].node.delete_local("x"));
    sim.wait(Duration::from_secs(10), "the deletion where heard", |sim| {
        (0..4).all(|i| sim.keys(i, owner) == ["y"])
    })
    .await;
    tokio::time::sleep(TOMBSTONE_TTL).await;
    sim.wait(
        Duration::from_secs(10),
        "the collection where heard",
        |sim| (0..4).all(|i| i == owner || sim.horizon(i, owner) > 0),
    )
    .await;
    assert_eq!(
        sim.keys(away, owner),
        ["x", "y"],
        "seed {seed}: heard nothing"
    );

    if stopped {
        sim.start(away).await;
    } else {
        sim.net.heal();
    }
    sim.wait(Duration::from_secs(60), "back, without x", |sim| {
        (0..5).all(|i| sim.live_peers(i).len() == 4) && sim.keys(away, owner) == ["y"]
    })
    .await;
    // Rounds in which x could come back, if anything still held it.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let delete = format!("delete {} x", name(owner));
    let update = format!("update {} x", name(owner));
    for i in (0..5).filter(|&i| i != owner) {
        assert_eq!(sim.keys(i, owner), ["y"], "seed {seed}: host {i}");
        assert_eq!(
            sim.hosts[i].events.count(&delete),
            1,
            "seed {seed}: host {i}"
        );
        assert_eq!(
            sim.hosts[i].events.count(&update),
            1,
            "seed {seed}: host {i}"
        );
    }
    assert_eq!(sim.keys(owner, owner), ["y"]);
    sim.stop_all().await;
}

#[test]
fn a_node_stopped_past_the_horizon_comes_back_without_deleted_keys() {
    each_seed(|seed| away_past_the_horizon(seed, true));
}

#[test]
fn a_node_cut_off_past_the_horizon_comes_back_without_deleted_keys() {
    each_seed(|seed| away_past_the_horizon(seed, false));
}

#[test]
fn a_key_written_with_a_ttl_is_gone_everywhere_a_round_or_two_after_it_expires() {
    each_seed(|seed| async move {
        let sim = collecting_cluster(seed).await;
        let ttl = Duration::from_secs(5);
        let owner = 2;
        sim.hosts[owner]
            .node
            .set_local("lease", value("mine"), Some(ttl))
            .unwrap();
        let written = Instant::now();
        sim.wait(Duration::from_secs(5), "the lease everywhere", |sim| {
            (0..5).all(|i| sim.keys(i, owner) == ["lease"])
        })
        .await;
        sim.wait(
            Duration::from_secs(10),
            "the lease gone everywhere",
            |sim| (0..5).all(|i| sim.keys(i, owner).is_empty()),
        )
        .await;
        let gone_after = written.elapsed();
        // The owner checks expiry once a round (1 s) and pushes the deletion at once.
        assert!(
            gone_after >= ttl && gone_after <= ttl + Duration::from_secs(2),
            "seed {seed}: {gone_after:?}"
        );
        for i in (0..5).filter(|&i| i != owner) {
            for event in ["update", "delete"] {
                let event = format!("{event} {} lease", name(owner));
                assert_eq!(
                    sim.hosts[i].events.count(&event),
                    1,
                    "seed {seed}: host {i}"
                );
            }
        }
        sim.stop_all().await;
    });
}

#[test]
fn a_key_that_expired_while_its_node_was_stopped_is_not_in_its_next_incarnation() {
    each_seed(|seed| async move {
        let sim = collecting_cluster(seed).await;
        let owner = 2;
        sim.hosts[owner]
            .node
            .set_local("lease", value("mine"), Some(Duration::from_secs(20)))
            .unwrap();
        sim.hosts[owner]
            .node
            .set_local("kept", value("yes"), None)
            .unwrap();
        sim.wait(Duration::from_secs(5), "both keys everywhere", |sim| {
            (0..5).all(|i| sim.keys(i, owner) == ["lease", "kept"])
        })
        .await;
        sim.hosts[owner].node.stop().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        sim.start(owner).await;
        sim.wait(
            Duration::from_secs(30),
            "the new incarnation everywhere",
            |sim| (0..5).all(|i| sim.live_peers(i).len() == 4 && sim.keys(i, owner) == ["kept"]),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        for i in (0..5).filter(|&i| i != owner) {
            for event in ["update", "delete"] {
                let event = format!("{event} {} lease", name(owner));
                assert_eq!(
                    sim.hosts[i].events.count(&event),
                    1,
                    "seed {seed}: host {i}"
                );
            }
        }
        sim.stop_all().await;
    });
}

/// Rounds within which a cluster that started together knows itself: anti-entropy spreads the
/// news of each node in about log(N) rounds, and a second reporter confirms a young node (4
/// rounds at most over the three seeds; 8 when a confirmation waited for a heartbeat to rise).
const JOIN_ROUNDS_200: u64 = 6;

#[test]
fn a_join_storm_of_200_forms_within_a_few_rounds_without_false_failures() {
    let n = 200;
    each_seed(|seed| async move {
        let sim = Sim::seeded_by_first(seed, n);
        // The seed first, then everyone else in the same instant.
        sim.start(0).await;
        futures_util::future::join_all((1..n).map(|i| sim.start(i))).await;
        sim.wait(
            Duration::from_secs(JOIN_ROUNDS_200),
            "full membership",
            |sim| (0..n).all(|i| sim.live_peers(i).len() == n - 1),
        )
        .await;
        // Each join was announced to `push_fanout` peers, not pushed to all: O(N) pushes.
        let pushes = |sim: &Sim| -> u64 {
            sim.hosts
                .iter()
                .map(|h| h.node.counters().pushes_sent.load(Ordering::Relaxed))
                .sum()
        };
        let joined = pushes(&sim);
        assert!(
            joined <= (n * Settings::default().push_fanout) as u64,
            "seed {seed}: {joined} pushes"
        );
        // A write still goes to everyone, down the push tree, without waiting for a round.
        sim.hosts[n - 1]
            .node
            .set_local("hi", value("all"), None)
            .unwrap();
        sim.wait(Duration::from_millis(500), "the write everywhere", |sim| {
            (0..n - 1).all(|i| sim.value(i, n - 1, "hi") == Some(value("all")))
        })
        .await;
        assert_eq!(pushes(&sim) - joined, (n - 1) as u64, "seed {seed}");
        tokio::time::sleep(Duration::from_secs(60)).await;
        for host in &sim.hosts {
            let events = host.events.0.lock().unwrap();
            let failed: Vec<&String> = events
                .iter()
                .filter(|e| e.starts_with("peer_failed"))
                .collect();
            assert!(failed.is_empty(), "seed {seed}: {failed:?}");
        }
        sim.stop_all().await;
    });
}
