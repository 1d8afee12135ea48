//! Routing rules that every party applies alike: the node, the client and the simulator.
//! Who counts as a distinct host, which successors hold a key and in what order they are
//! read, what a successor list or a lookup answer may claim, how wide a successor's range
//! can plausibly be, and which bucket a source address is charged to. Pure functions: the
//! callers measure and talk, these only decide.

use crate::id::{Id, NodeRef};
use std::net::{IpAddr, SocketAddr};

/// The unit that must not hold two replicas of a block: one process on loopback (where a
/// local ring of many processes shares an IP and node ids include the port), one IP
/// elsewhere (where ids do not include the port, so several ports are one principal).
pub fn same_host(a: SocketAddr, b: SocketAddr) -> bool {
    group(a, Level::Host) == group(b, Level::Host)
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// How coarsely addresses are grouped when replicas are spread. One party easily holds a
/// whole prefix, and with it every address's ids to grind into the positions in front of
/// a key; a network is what a larger party (an ISP's customer, a cloud tenant) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// A /16 (IPv4) or /32 (IPv6).
    Network,
    /// A /24 (IPv4) or /48 (IPv6).
    Prefix,
    /// One IP; one process on loopback.
    Host,
}

/// The levels in the order a replica set prefers them: distinct networks first.
pub const LEVELS: [Level; 3] = [Level::Network, Level::Prefix, Level::Host];

/// The group of `addr` at `level`: the address masked to the level's prefix (IPv4 as
/// v4-mapped IPv6), and the port for a loopback host. On loopback the prefixes are those
/// of the 127.0.0.0/8 address, so a local ring on 127.0.0.1 is one prefix of processes
/// and a test can place processes in different prefixes.
pub fn group(addr: SocketAddr, level: Level) -> (u128, u16) {
    let (bits, v4) = match canonical_ip(addr.ip()) {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), true),
        IpAddr::V6(v6) => (u128::from(v6), false),
    };
    let keep = match (level, v4) {
        (Level::Network, true) => 96 + 16,
        (Level::Network, false) => 32,
        (Level::Prefix, true) => 96 + 24,
        (Level::Prefix, false) => 48,
        (Level::Host, _) => 128,
    };
    let masked = bits & (u128::MAX << (128 - keep));
    let port = if level == Level::Host && canonical_ip(addr.ip()).is_loopback() {
        addr.port()
    } else {
        0
    };
    (masked, port)
}

/// How many distinct groups at `level` the nodes of `list` fall in.
pub fn distinct_groups(list: &[NodeRef], level: Level) -> usize {
    let mut seen: Vec<(u128, u16)> = Vec::new();
    for n in list {
        let g = group(n.addr, level);
        if !seen.contains(&g) {
            seen.push(g);
        }
    }
    seen.len()
}

/// The coarsest level at which `list` holds `r` distinct groups: the level its replica
/// set is spread at. None when it holds fewer than `r` hosts.
pub fn spread_level(list: &[NodeRef], r: usize) -> Option<Level> {
    LEVELS.into_iter().find(|&l| distinct_groups(list, l) >= r)
}

/// The replicas of a key whose successor list is `succs`: `r` distinct hosts, spread as
/// widely as the list allows. Taken in list order from distinct networks first, then
/// from distinct prefixes, then from distinct hosts, and returned in list order. So a
/// party holding one /24 (or /48) holds at most one replica of any key when the list
/// reaches r prefixes, and one holding a /16 (or /32) at most one when it reaches r
/// networks. A small ring (a lab, a local ring in one prefix) falls back to distinct
/// hosts, which is the whole rule there.
pub fn replica_set(succs: &[NodeRef], r: usize) -> Vec<NodeRef> {
    let groups: Vec<[(u128, u16); 3]> = succs
        .iter()
        .map(|n| LEVELS.map(|l| group(n.addr, l)))
        .collect();
    let mut picked: Vec<usize> = Vec::with_capacity(r);
    for l in 0..LEVELS.len() {
        for i in 0..succs.len() {
            if picked.len() == r {
                break;
            }
            if !picked.contains(&i) && picked.iter().all(|&j| groups[j][l] != groups[i][l]) {
                picked.push(i);
            }
        }
    }
    picked.sort_unstable();
    picked.into_iter().map(|i| succs[i]).collect()
}

/// Append to `order` the members of `succs` whose process is not in it yet, in list
/// order: after joins the true holders of a key can sit beyond the first r.
pub fn append_others(order: &mut Vec<NodeRef>, succs: &[NodeRef]) {
    for n in succs {
        if !order.iter().any(|o| o.addr == n.addr) {
            order.push(*n);
        }
    }
}

/// How many of `keys` (in id order), from the first on, fall in (from, to]: the run of
/// keys that one lookup's answer covers, so they share its replica set. 0 when the answer
/// does not cover the first key (the ring moved meanwhile).
pub fn run_in_range(keys: impl IntoIterator<Item = Id>, from: Id, to: Id) -> usize {
    keys.into_iter()
        .take_while(|k| k.in_half_open(from, to))
        .count()
}

/// Whether a node reference claimed by a peer may be used by a party at `here`: valid
/// (address, port, vnode under the cap), and in the same scope, loopback or not. Off
/// loopback a reference to 127.x is never a node: its port is part of its id, so an
/// attacker could grind such ids into any range, and it would reach our own machine.
pub fn usable_ref(n: &NodeRef, here: SocketAddr, max_vnodes: u16) -> bool {
    n.valid(max_vnodes)
        && canonical_ip(n.addr.ip()).is_loopback() == canonical_ip(here.ip()).is_loopback()
        && !n.addr.ip().is_multicast()
}

/// Why a list of nodes claimed by a peer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("a node reference has an invalid address or a vnode index over the cap")]
    InvalidRef,
    #[error("the nodes are not in clockwise order")]
    Order,
    #[error("the list is empty")]
    Empty,
    #[error("the key is not in the range the answer describes")]
    KeyOutside,
    #[error("the answer does not come from the range it describes")]
    WrongAnswerer,
    #[error("the range is far wider than the ring's density allows")]
    TooWide,
}

/// The entries of a successor list claimed by a peer, as `me` may adopt them: valid,
/// each strictly further clockwise from `me` than the one before, cut where the list
/// reaches `me` again, at most `s`. Entries after the first out-of-order or invalid one
/// are dropped, not reordered: a list that is not a walk of the ring is not trusted past
/// the point where it stops being one.
pub fn clean_succ_list(me: NodeRef, list: &[NodeRef], s: usize, max_vnodes: u16) -> Vec<NodeRef> {
    let mut out: Vec<NodeRef> = Vec::new();
    for n in list {
        if out.len() >= s || *n == me || n.id == me.id {
            break;
        }
        if !usable_ref(n, me.addr, max_vnodes) {
            break;
        }
        if let Some(prev) = out.last() {
            // Strictly clockwise after the previous entry, and not past `me`.
            if !n.id.in_open(prev.id, me.id) {
                break;
            }
        }
        out.push(*n);
    }
    out
}

/// Check a list that must be a clockwise walk starting after `from`: every entry valid
/// and each strictly further from `from` than the one before. On a small ring the walk
/// may come round to `from` itself, which then ends it.
pub fn check_walk(
    from: Id,
    list: &[NodeRef],
    here: SocketAddr,
    max_vnodes: u16,
) -> Result<(), ClaimError> {
    let mut prev: Option<Id> = None;
    for n in list {
        if !usable_ref(n, here, max_vnodes) {
            return Err(ClaimError::InvalidRef);
        }
        if let Some(p) = prev {
            if p == from || !n.id.in_half_open(p, from) {
                return Err(ClaimError::Order);
            }
        }
        prev = Some(n.id);
    }
    Ok(())
}

/// Widest range (as a fraction of the ring) one node may plausibly own in a ring of about
/// `n` nodes. Gaps between n random points are exponential with mean 1/n; the widest of n
/// exceeds (ln n + c)/n with probability about e^-c. c = 12 with the estimate halved
/// (an estimate from a successor list can be off by that much) keeps honest ranges in,
/// while a claim such as "my range starts just before your key" on a large ring is out.
pub fn max_plausible_width(n_est: u32) -> f64 {
    let n = (n_est.max(1) as f64 / 2.0).max(1.0);
    ((n.ln() + 12.0) / n).min(1.0)
}

/// A `Done` answer from `asked` for `key`: every key in (from, succs[0]] has the successors
/// `succs`. Accepted only if it covers the key, comes from one end of the range it
/// describes, names valid nodes in clockwise order, and (when the caller has its own
/// estimate of the ring's size) is not far wider than the ring's density predicts.
pub fn check_done(
    asked: NodeRef,
    key: Id,
    from: NodeRef,
    succs: &[NodeRef],
    own_n_est: Option<u32>,
    max_vnodes: u16,
) -> Result<(), ClaimError> {
    let first = *succs.first().ok_or(ClaimError::Empty)?;
    if !usable_ref(&from, asked.addr, max_vnodes) {
        return Err(ClaimError::InvalidRef);
    }
    if !key.in_half_open(from.id, first.id) {
        return Err(ClaimError::KeyOutside);
    }
    if asked != from && asked != first {
        return Err(ClaimError::WrongAnswerer);
    }
    check_walk(from.id, succs, asked.addr, max_vnodes)?;
    if let Some(n) = own_n_est {
        // (x, x] is the whole ring: only a ring of one may claim it.
        let width = if from == first {
            1.0
        } else {
            from.id.distance_frac(first.id)
        };
        if n > 1 && width > max_plausible_width(n) {
            return Err(ClaimError::TooWide);
        }
    }
    Ok(())
}

/// The answer for `key` that `asked`'s own successor list gives, if the list passes the
/// key: the range (a, b] of two consecutive entries (or `asked` and its first) that holds
/// it, and the successors from b on. Checked by the same rule as a `Done` from `asked`
/// about its own list (`check_done`), so it is no easier to lie with.
pub fn answer_from_list(
    asked: NodeRef,
    key: Id,
    list: &[NodeRef],
    own_n_est: Option<u32>,
    max_vnodes: u16,
) -> Option<Result<(NodeRef, Vec<NodeRef>), ClaimError>> {
    let walk = clean_succ_list(asked, list, usize::MAX, max_vnodes);
    let mut prev = asked;
    for (i, n) in walk.iter().enumerate() {
        if key.in_half_open(prev.id, n.id) {
            let succs = walk[i..].to_vec();
            // `asked` vouches for its whole list, so the range's start stands in as the
            // answerer: every other part of the rule applies unchanged.
            return Some(
                check_done(prev, key, prev, &succs, own_n_est, max_vnodes).map(|()| (prev, succs)),
            );
        }
        prev = *n;
    }
    None
}

/// Ring size from a successor list's density: `len` successors span `span` of the ring.
/// Successors needed before an estimate is trusted: with fewer, one short gap can
/// overstate the ring tenfold and make honest ranges look too wide.
pub const MIN_ENTRIES_FOR_ESTIMATE: usize = 8;

pub fn estimate_size(len: usize, span: f64) -> u32 {
    if len == 0 || span <= 0.0 {
        return 1;
    }
    ((len as f64 / span) as u64).clamp(1, u32::MAX as u64) as u32
}

/// Is `me` plausibly among the r replicas of `key`, judged only by the node's own view
/// (its estimate of the ring's size)? r + 2 mean ranges before it, doubled for the
/// estimate's error: keys further back are not its to receive free of quota.
pub fn in_replica_reach(key: Id, me: Id, r: usize, n_est: u32) -> bool {
    key.distance_frac(me) <= 2.0 * (r + 2) as f64 / n_est.max(1) as f64
}

/// The bucket a source address is charged to and limited by: a /24 (IPv4) or /48
/// (IPv6), since one party easily holds a whole small prefix; on loopback the whole
/// address, since a local ring and its clients share 127.0.0.0/8.
pub fn source_bucket(ip: IpAddr) -> Vec<u8> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => v4.octets().to_vec(),
        IpAddr::V4(v4) => v4.octets()[..3].to_vec(),
        IpAddr::V6(v6) if v6.is_loopback() => v6.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets()[..6].to_vec(),
    }
}

/// The network a source address belongs to: its /16 (IPv4) or /32 (IPv6). Tables keyed
/// by source bucket also bound what one network holds, so a party with many prefixes
/// gains a bounded share, not one per prefix. On loopback, where a local ring and its
/// clients share 127.0.0.1, an address of 127.0.0.0/16 (or ::1) is a network of its own,
/// as it is a bucket; the rest of 127.0.0.0/8 groups by /16, so a test can stand in for a
/// party with many prefixes.
pub fn source_network(ip: IpAddr) -> Vec<u8> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) if v4.is_loopback() && v4.octets()[1] == 0 => v4.octets().to_vec(),
        IpAddr::V6(v6) if v6.is_loopback() => v6.octets().to_vec(),
        IpAddr::V4(v4) => v4.octets()[..2].to_vec(),
        IpAddr::V6(v6) => v6.octets()[..4].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::MAX_VNODES;

    fn lo(port: u16) -> NodeRef {
        NodeRef::new(SocketAddr::from(([127, 0, 0, 1], port)), 0)
    }

    /// Nodes sorted clockwise from `start`, by an oracle that compares full distances
    /// computed with u128 arithmetic on the top 16 bytes (not the code under test).
    fn clockwise_from(start: Id, mut v: Vec<NodeRef>) -> Vec<NodeRef> {
        let top = |x: Id| u128::from_be_bytes(x.0[..16].try_into().unwrap());
        v.sort_by_key(|n| top(n.id).wrapping_sub(top(start)));
        v
    }

    #[test]
    fn hosts_are_processes_on_loopback_and_ips_elsewhere() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(!same_host(a, b));
        let c: SocketAddr = "198.18.0.1:1".parse().unwrap();
        let d: SocketAddr = "198.18.0.1:2".parse().unwrap();
        let e: SocketAddr = "[::ffff:198.18.0.1]:3".parse().unwrap();
        assert!(same_host(c, d));
        assert!(same_host(c, e));
        let succs: Vec<NodeRef> = [c, d, "198.18.0.2:1".parse().unwrap()]
            .iter()
            .map(|a| NodeRef::new(*a, 0))
            .collect();
        let set = replica_set(&succs, 3);
        assert_eq!(set.len(), 2, "two ports of one IP are one replica");
    }

    #[test]
    fn replicas_spread_over_networks_then_prefixes_then_hosts() {
        let n = |s: &str| NodeRef::new(s.parse().unwrap(), 0);
        let addrs = |v: &[NodeRef]| v.iter().map(|x| x.addr.to_string()).collect::<Vec<_>>();
        // One /24 in front of the key, other prefixes further on: one replica from it.
        let list = [
            n("203.0.113.1:1"),
            n("203.0.113.2:1"),
            n("203.0.113.3:1"),
            n("203.0.114.1:1"),
            n("198.51.100.1:1"),
        ];
        assert_eq!(
            addrs(&replica_set(&list, 3)),
            ["203.0.113.1:1", "203.0.114.1:1", "198.51.100.1:1"]
        );
        // Two networks only: the third replica is the next distinct prefix.
        assert_eq!(
            addrs(&replica_set(&list[..4], 3)),
            ["203.0.113.1:1", "203.0.113.2:1", "203.0.114.1:1"]
        );
        // A small ring in one prefix: distinct hosts, in list order, as before.
        assert_eq!(
            addrs(&replica_set(&list[..3], 3)),
            ["203.0.113.1:1", "203.0.113.2:1", "203.0.113.3:1"]
        );
        assert_eq!(spread_level(&list, 3), Some(Level::Prefix));
        assert_eq!(spread_level(&list[..3], 3), Some(Level::Host));
        assert_eq!(spread_level(&list[..2], 3), None);
        // IPv6 by /32 and /48; a local ring on loopback by process, prefixes of 127/8.
        let v6 = [
            n("[2001:db8:1::1]:1"),
            n("[2001:db8:1::2]:1"),
            n("[2001:db8:2::1]:1"),
            n("[2001:db9::1]:1"),
        ];
        assert_eq!(
            addrs(&replica_set(&v6, 3)),
            ["[2001:db8:1::1]:1", "[2001:db8:2::1]:1", "[2001:db9::1]:1"]
        );
        assert_eq!(spread_level(&v6, 3), Some(Level::Prefix));
        let local = [
            n("127.0.0.1:1"),
            n("127.0.0.1:2"),
            n("127.0.1.1:1"),
            n("127.0.0.1:3"),
        ];
        assert_eq!(
            addrs(&replica_set(&local, 3)),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.1.1:1"]
        );
    }

    #[test]
    fn a_cleaned_list_is_a_clockwise_prefix_of_valid_nodes() {
        // Random lists against the oracle: the result is a prefix of the input, sorted
        // clockwise from me by the oracle, valid, without me.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..500 {
            let me = lo(1 + (rnd() % 60000) as u16);
            let n = (rnd() % 20) as usize;
            let mut list: Vec<NodeRef> = (0..n).map(|_| lo(1 + (rnd() % 60000) as u16)).collect();
            if rnd() % 2 == 0 {
                list = clockwise_from(me.id, list);
            }
            if rnd() % 4 == 0 && n > 0 {
                let i = (rnd() as usize) % n;
                list[i].vnode = MAX_VNODES; // over the cap
            }
            let out = clean_succ_list(me, &list, 16, MAX_VNODES);
            assert!(out.len() <= 16);
            assert_eq!(&list[..out.len()], &out[..], "a prefix");
            assert!(out.iter().all(|n| n.valid(MAX_VNODES) && *n != me));
            let mut dedup = out.clone();
            dedup.dedup();
            assert_eq!(clockwise_from(me.id, out.clone()), dedup, "clockwise");
            assert_eq!(dedup.len(), out.len(), "no repeats");
        }
    }

    #[test]
    fn done_answers_are_checked() {
        let mut ring: Vec<NodeRef> = (1..=50).map(lo).collect();
        ring.sort_by_key(|n| n.id);
        let key = Id([0x80; 20]);
        let i = ring.iter().position(|n| n.id >= key).unwrap_or(0);
        let succ = ring[i];
        let pred = ring[(i + ring.len() - 1) % ring.len()];
        let succs: Vec<NodeRef> = (0..5).map(|d| ring[(i + d) % ring.len()]).collect();
        assert_eq!(
            check_done(succ, key, pred, &succs, Some(50), MAX_VNODES),
            Ok(())
        );
        assert_eq!(
            check_done(pred, key, pred, &succs, Some(50), MAX_VNODES),
            Ok(())
        );
        // Someone else speaking for the range.
        let other = ring[(i + 10) % ring.len()];
        assert_eq!(
            check_done(other, key, pred, &succs, Some(50), MAX_VNODES),
            Err(ClaimError::WrongAnswerer)
        );
        // A successor list out of order.
        let mut bad = succs.clone();
        bad.swap(1, 2);
        assert_eq!(
            check_done(succ, key, pred, &bad, Some(50), MAX_VNODES),
            Err(ClaimError::Order)
        );
        // An attacker far past the key claims the range from a node just before the key:
        // on a large ring the range is implausibly wide.
        let far = ring[(i + 25) % ring.len()];
        assert_eq!(
            check_done(far, key, pred, &[far], Some(5000), MAX_VNODES),
            Err(ClaimError::TooWide)
        );
        // "I own the whole ring" on a ring known to be larger.
        assert_eq!(
            check_done(far, key, far, &[far], Some(50), MAX_VNODES),
            Err(ClaimError::TooWide)
        );
        // Unspecified addresses are not nodes.
        let zero = NodeRef::new("0.0.0.0:0".parse().unwrap(), 0);
        assert_eq!(
            check_done(succ, key, pred, &[succ, zero], Some(50), MAX_VNODES),
            Err(ClaimError::InvalidRef)
        );
    }

    #[test]
    fn plausible_width_keeps_honest_rings() {
        // The widest gap of n random points stays under the bound (seeded trials).
        let mut x = 7u64;
        for n in [4usize, 16, 100, 1000] {
            for _ in 0..20 {
                let mut pts: Vec<u64> = (0..n)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        x
                    })
                    .collect();
                pts.sort();
                let mut widest = pts[0].wrapping_sub(pts[n - 1]) as f64 / 2f64.powi(64);
                for w in pts.windows(2) {
                    widest = widest.max((w[1] - w[0]) as f64 / 2f64.powi(64));
                }
                assert!(
                    widest <= max_plausible_width(n as u32),
                    "n={n} widest={widest}"
                );
            }
        }
        assert!(max_plausible_width(100_000) < 0.001);
    }

    #[test]
    fn a_run_is_the_keys_one_answer_covers() {
        let k = |b: u8| Id([b; 20]);
        assert_eq!(run_in_range([k(2), k(3), k(9)], k(1), k(5)), 2);
        assert_eq!(run_in_range([k(7)], k(1), k(5)), 0);
        // A range that wraps past zero.
        assert_eq!(run_in_range([k(250), k(1), k(6)], k(200), k(5)), 2);
    }

    #[test]
    fn buckets_group_prefixes() {
        let b = |s: &str| source_bucket(s.parse().unwrap());
        assert_eq!(b("198.18.0.1"), b("198.18.0.200"));
        assert_ne!(b("198.18.0.1"), b("198.18.1.1"));
        assert_ne!(b("127.0.0.1"), b("127.0.0.2"));
        assert_eq!(b("2001:db8:1::1"), b("2001:db8:1:ffff::2"));
        assert_eq!(b("::ffff:198.18.0.1"), b("198.18.0.9"));
        let n = |s: &str| source_network(s.parse().unwrap());
        assert_eq!(n("198.18.0.1"), n("198.18.200.1"));
        assert_ne!(n("198.18.0.1"), n("198.19.0.1"));
        assert_eq!(n("2001:db8:1::1"), n("2001:db8:ffff::2"));
        assert_ne!(n("2001:db8::1"), n("2001:db9::1"));
        assert_ne!(n("127.0.0.1"), n("127.0.0.2"));
        assert_eq!(n("127.77.0.1"), n("127.77.15.1"));
    }
}
