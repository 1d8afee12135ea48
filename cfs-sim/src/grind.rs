//! An attacker with many addresses grinds node ids into the replica positions of keys.
//! Ring arithmetic only (the ids a ring of 10^4 honest nodes and a /16 of 16 vnodes per
//! address would hold, and `cfs_core::ring::replica_set`, the rule every node and client
//! applies to a successor list): a million attacker vnodes cannot run as simulated nodes,
//! and placement is all this asks.

use cfs_core::id::{node_id, Id};
use cfs_core::NodeRef;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr};

/// The replica set before the spread over networks and prefixes: the first `r` distinct
/// IPs of the list (kept here as the baseline).
fn replica_set_by_ip(succs: &[NodeRef], r: usize) -> Vec<NodeRef> {
    let mut out: Vec<NodeRef> = Vec::new();
    for n in succs {
        if out.len() < r && !out.iter().any(|o| o.addr.ip() == n.addr.ip()) {
            out.push(*n);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct GrindArgs {
    pub honest: usize,
    /// Attacker prefix length (16 or 24): it holds every address under it.
    pub attacker_bits: u8,
    pub vnodes: u16,
    pub targets: usize,
    pub r: usize,
    pub succ_list: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrindRow {
    pub rule: &'static str,
    pub attack: &'static str,
    /// Keys whose r replicas are all the attacker's (it can withhold them: unreadable).
    pub captured: f64,
    /// Keys of which the attacker holds at least one replica.
    pub holds_one: f64,
    /// Attacker vnodes run for the attack (per key for the targeted one, mean).
    pub vnodes_run: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrindReport {
    pub args: GrindArgs,
    pub candidates: usize,
    /// The attacker's share of all ids were it to run every candidate.
    pub id_share: f64,
    pub rows: Vec<GrindRow>,
}

pub fn grind(a: GrindArgs) -> GrindReport {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    let span = 1u32 << (32 - a.attacker_bits);
    let port = 4000;
    // Honest nodes at random public addresses outside the attacker's prefix, one each.
    let mut honest: Vec<NodeRef> = Vec::with_capacity(a.honest);
    while honest.len() < a.honest {
        let ip: u32 = rng.random_range(0x0100_0000..0xdf00_0000);
        if ip.wrapping_sub(base) < span {
            continue;
        }
        honest.push(NodeRef::new(
            SocketAddr::from((Ipv4Addr::from(ip), port)),
            0,
        ));
    }
    honest.sort_by_key(|n| n.id);
    // Every id the attacker could run: each address of its prefix, each vnode index.
    let mut cand: Vec<(Id, u32, u16)> = Vec::with_capacity(span as usize * a.vnodes as usize);
    for i in 0..span {
        let ip = Ipv4Addr::from(base + i);
        for v in 0..a.vnodes {
            cand.push((node_id(SocketAddr::from((ip, port)), v), base + i, v));
        }
    }
    cand.sort_by_key(|c| c.0);
    let attacker =
        |c: &(Id, u32, u16)| NodeRef::new(SocketAddr::from((Ipv4Addr::from(c.1), port)), c.2);
    let is_attacker = |n: &NodeRef| match n.addr.ip() {
        std::net::IpAddr::V4(v4) => u32::from(v4).wrapping_sub(base) < span,
        _ => false,
    };
    let honest_after = |key: Id| honest.partition_point(|n| n.id <= key);
    let cand_after = |key: Id| cand.partition_point(|c| c.0 <= key);
    let keys: Vec<Id> = (0..a.targets)
        .map(|_| Id(std::array::from_fn(|_| rng.random())))
        .collect();

    // The successor list of `key`: the first `succ_list` ids after it, with the
    // attacker running every candidate (mass) or only those between the key and its
    // first honest successor (targeted: the rest would not change this key's list).
    let list_for = |key: Id, mass: bool| -> (Vec<NodeRef>, usize) {
        let (mut h, mut c) = (honest_after(key), cand_after(key));
        let first_honest = honest[h % honest.len()].id;
        let mut out = Vec::with_capacity(a.succ_list);
        let mut run = 0;
        while out.len() < a.succ_list {
            let hn = honest[h % honest.len()];
            let cn = cand[c % cand.len()];
            let runs = mass || cn.0.in_open(key, first_honest);
            if runs && cn.0.in_open(key, hn.id) {
                out.push(attacker(&cn));
                run += 1;
                c += 1;
            } else {
                out.push(hn);
                h += 1;
            }
        }
        (out, run)
    };
    let mut rows = Vec::new();
    type Rule = fn(&[NodeRef], usize) -> Vec<NodeRef>;
    let rules: [(&str, Rule); 2] = [
        ("distinct IPs (before)", replica_set_by_ip),
        (
            "networks, prefixes, hosts (now)",
            cfs_core::ring::replica_set,
        ),
    ];
    for (attack, mass) in [
        ("targeted: every candidate in front of the key", false),
        ("mass: every candidate run at once", true),
    ] {
        for (rule, f) in rules {
            let (mut cap, mut one, mut run_sum) = (0usize, 0usize, 0usize);
            for &k in &keys {
                let (list, run) = list_for(k, mass);
                let set = f(&list, a.r);
                let held = set.iter().filter(|n| is_attacker(n)).count();
                cap += usize::from(held == a.r && set.len() == a.r);
                one += usize::from(held > 0);
                run_sum += run;
            }
            let t = keys.len() as f64;
            rows.push(GrindRow {
                rule,
                attack,
                captured: cap as f64 / t,
                holds_one: one as f64 / t,
                vnodes_run: if mass {
                    cand.len() as f64
                } else {
                    run_sum as f64 / t
                },
            });
        }
    }
    GrindReport {
        args: a,
        candidates: cand.len(),
        id_share: cand.len() as f64 / (cand.len() + honest.len()) as f64,
        rows,
    }
}

pub fn table(g: &GrindReport) -> String {
    let mut s = format!(
        "{} honest nodes (one vnode each, random public addresses); attacker: a /{} with {} vnodes per address = {} candidate ids ({:.1}% of all ids if all run); r = {}, successor lists of {}, {} random keys, seed {}.\n\n| attack | replica rule | keys captured (all r replicas) | keys with >= 1 attacker replica | attacker vnodes run |\n| --- | --- | --- | --- | --- |\n",
        g.args.honest,
        g.args.attacker_bits,
        g.args.vnodes,
        g.candidates,
        100.0 * g.id_share,
        g.args.r,
        g.args.succ_list,
        g.args.targets,
        g.args.seed
    );
    for r in &g.rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {:.0} |\n",
            r.attack, r.rule, r.captured, r.holds_one, r.vnodes_run
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_holds_every_replica_only_where_it_fills_a_whole_successor_list() {
        let g = grind(GrindArgs {
            honest: 2000,
            attacker_bits: 24,
            vnodes: 16,
            targets: 2000,
            r: 3,
            succ_list: 16,
            seed: 7,
        });
        let before = &g.rows[0];
        let now = &g.rows[1];
        assert!(before.captured > 0.01, "{}", table(&g));
        // Only where 16 of its ids fill a whole successor list (the small-ring fallback).
        assert!(now.captured * 50.0 <= before.captured, "{}", table(&g));
        assert_eq!(now.holds_one, before.holds_one, "{}", table(&g));
    }
}
