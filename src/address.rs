//! What a node calls itself, and which seed addresses it contacts.
//!
//! A node's name is the address other hosts reach it at, so it must never be an address that
//! means "myself" to them (loopback, `0.0.0.0`) unless the whole cluster is on one host. The
//! rules, in order:
//! 1. `advertise` (`ip:port`) when given: for NAT and port mappings.
//! 2. The bind address when it is a specific IP.
//! 3. The local address that routes to the seeds, every address they resolve to considered,
//!    non-loopback seeds first; a loopback seed gives loopback (a one-host cluster).
//! 4. With no usable seed, the host's first non-loopback, non-link-local address: IPv4 before
//!    IPv6, private ranges first within each.
//! 5. Loopback, when the host has nothing else.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `host:port` or `[ipv6]:port`, with a port from 1 to 65535.
pub fn is_valid_seed(seed: &str) -> bool {
    let Some((host, port)) = seed.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && !host
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, ':' | '[' | ']'))
        }
    };
    port_ok && host_ok
}

/// This host's interface addresses.
pub fn interface_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|interfaces| interfaces.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// The IP to advertise when neither `advertise` nor a specific bind address is given.
/// `seeds` are the resolved seed addresses, `route_to` asks the host which local address
/// reaches a remote one, and `host_addresses` lists the host's interfaces.
pub fn choose_advertised_ip(
    seeds: &[SocketAddr],
    route_to: impl Fn(IpAddr) -> Option<IpAddr>,
    host_addresses: &[IpAddr],
) -> IpAddr {
    let routed = |loopback: bool| {
        seeds
            .iter()
            .filter(|s| s.ip().is_loopback() == loopback && !s.ip().is_unspecified())
            .find_map(|s| route_to(s.ip()))
    };
    if let Some(ip) = routed(false).filter(|ip| !ip.is_loopback()) {
        return ip;
    }
    if let Some(ip) = routed(true) {
        return ip;
    }
    let mut candidates: Vec<IpAddr> = host_addresses.iter().copied().filter(usable).collect();
    // IPv4 first (what most clusters route), private ranges first within a family; among
    // equals the host's interface order is kept (the sort is stable).
    candidates.sort_by_key(|ip| (ip.is_ipv6(), !is_private(ip)));
    candidates
        .first()
        .copied()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// An address another host could reach us at.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// True when `seed` is this node itself: our port, at one of our addresses.
pub fn is_self(
    seed: SocketAddr,
    name: SocketAddr,
    bound_ip: IpAddr,
    host_addresses: &[IpAddr],
) -> bool {
    if seed == name {
        return true;
    }
    if seed.port() != name.port() {
        return false;
    }
    let ip = seed.ip();
    if bound_ip.is_unspecified() {
        ip.is_loopback() || ip.is_unspecified() || host_addresses.contains(&ip)
    } else {
        ip == bound_ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    const HOST: [&str; 5] = [
        "127.0.0.1",
        "fd00::2",
        "169.254.3.3",
        "203.0.113.9",
        "10.1.2.3",
    ];

    fn host() -> Vec<IpAddr> {
        HOST.iter().map(|t| ip(t)).collect()
    }

    #[test]
    fn seeds_are_host_and_port() {
        for good in ["node1:7946", "10.0.0.1:1", "[::1]:65535", "a.b-c:80"] {
            assert!(is_valid_seed(good), "{good}");
        }
        for bad in [
            "node1",
            ":80",
            "node1:0",
            "node1:65536",
            "bad host:1",
            "[nope]:80",
            "::1:80",
            "h:8x",
        ] {
            assert!(!is_valid_seed(bad), "{bad}");
        }
    }

    #[test]
    fn routes_toward_the_first_non_loopback_seed() {
        let route = |remote: IpAddr| {
            Some(if remote.is_loopback() {
                remote
            } else {
                ip("10.1.2.3")
            })
        };
        let seeds = [addr("127.0.0.1:9000"), addr("10.9.9.9:9000")];
        assert_eq!(choose_advertised_ip(&seeds, route, &host()), ip("10.1.2.3"));
    }

    #[test]
    fn loopback_seeds_make_a_one_host_cluster() {
        let seeds = [addr("127.0.0.1:9000")];
        assert_eq!(choose_advertised_ip(&seeds, Some, &host()), ip("127.0.0.1"));
    }

    #[test]
    fn without_seeds_the_first_private_address_wins() {
        assert_eq!(choose_advertised_ip(&[], |_| None, &host()), ip("10.1.2.3"));
        let public_only = [ip("127.0.0.1"), ip("fd00::2"), ip("203.0.113.9")];
        assert_eq!(
            choose_advertised_ip(&[], |_| None, &public_only),
            ip("203.0.113.9")
        );
        assert_eq!(
            choose_advertised_ip(&[], |_| None, &[ip("127.0.0.1")]),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn an_unroutable_seed_falls_back_to_the_host() {
        let seeds = [addr("192.0.2.1:9000")];
        assert_eq!(
            choose_advertised_ip(&seeds, |_| None, &host()),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn a_seed_at_our_own_port_and_address_is_ourselves() {
        let name = addr("10.1.2.3:7946");
        let any = ip("::");
        assert!(is_self(addr("10.1.2.3:7946"), name, any, &host()));
        assert!(is_self(addr("127.0.0.1:7946"), name, any, &host()));
        assert!(!is_self(addr("10.1.2.4:7946"), name, any, &host()));
        assert!(!is_self(addr("10.1.2.3:7947"), name, any, &host()));
        assert!(!is_self(
            addr("127.0.0.1:7946"),
            name,
            ip("10.1.2.3"),
            &host()
        ));
    }
}
