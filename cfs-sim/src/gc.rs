//! Garbage collection by leases at scale: publishers republish a changing tree every
//! simulated day, storing the new blocks with a lease and renewing every block of the
//! versions they keep (what `cfs keep --versions K` does), while the nodes' own
//! maintenance rounds sweep expired blocks and carry leases between replicas. Storage per
//! node should level off instead of growing with every version, and no block a kept
//! version reaches may ever be missing.
//!
//! A tree is modelled as its set of blocks (the walk that finds them, `cfs_core::walk`,
//! is tested on real processes); puts, renewals, sweeps, repairs and hand-offs are the
//! node's own code through `cfs_net::client::Client`.

use crate::sim::{make_block, mean, r4, run, Sim, SimError};
use crate::transport::{sim_addr, SimTransport};
use cfs_core::block::BlockKind;
use cfs_core::Id;
use cfs_net::client::Client;
use rand::Rng;
use serde::Serialize;
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

const DAY: u64 = 86_400;

#[derive(Clone, Debug)]
pub struct GcArgs {
    pub nodes: usize,
    pub publishers: usize,
    /// Blocks per tree.
    pub blocks: usize,
    pub block_bytes: usize,
    /// Fraction of a tree's blocks replaced each day.
    pub churn: f64,
    /// Versions each publisher keeps.
    pub keep: usize,
    pub days: u64,
    /// Lease publishers ask, in days.
    pub lease_days: u64,
    /// Maintenance rounds per simulated day on every node.
    pub rounds_per_day: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct GcDay {
    pub day: u64,
    /// Block copies held per node: mean and max.
    pub mean_blocks: f64,
    pub max_blocks: u64,
    /// Distinct blocks in the ring, and distinct blocks ever published.
    pub distinct: u64,
    pub published: u64,
    /// Blocks reachable from kept versions, and how many of them no node held.
    pub kept: u64,
    pub missing: u64,
    /// Reachable blocks with fewer than r copies after the day's maintenance.
    pub below_r: u64,
    pub expired_today: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub publishers: usize,
    pub blocks_per_tree: usize,
    pub churn: f64,
    pub keep: usize,
    pub lease_days: u64,
    pub days: Vec<GcDay>,
    /// Mean copies per node on the last day over the mean a week before it (1.0: level).
    pub last_week_growth: f64,
    pub ever_missing: u64,
    pub run: crate::experiments::RunStats,
}

struct Publisher {
    client: Client<SimTransport>,
    tree: Vec<Id>,
    versions: VecDeque<Vec<Id>>,
    next: usize,
    seed: u64,
}

/// Run the experiment; `seed` seeds the network and every tree.
pub fn gc(c: &crate::experiments::Common, a: &GcArgs) -> Result<GcReport, SimError> {
    if a.nodes < 8 || a.publishers == 0 || a.keep == 0 || a.days == 0 {
        return Err(SimError::Param(
            "--nodes >= 8, --publishers, --keep and --days >= 1".into(),
        ));
    }
    run(async {
        let mut sim = Sim::new(c.net(), c.node.clone());
        sim.grow(a.nodes, c.plan).await?;
        // The ring is built; from here only maintenance runs (driven below), so 60 days
        // do not cost 5 million stabilization rounds per node.
        sim.freeze();
        let r = c.node.replicas;
        let lease = a.lease_days * DAY;
        let mut pubs: Vec<Publisher> = (0..a.publishers)
            .map(|p| {
                let at = sim_addr(p % a.nodes);
                let mut client =
                    Client::new(SimTransport::new(sim.net.clone(), at), at, c.node.timeouts);
                client.replicas = r;
                client.lease = lease;
                Publisher {
                    client,
                    tree: Vec::new(),
                    versions: VecDeque::new(),
                    next: 0,
                    seed: c.seed.wrapping_mul(1_000_003).wrapping_add(p as u64),
                }
            })
            .collect();
        let mut published = 0u64;
        let mut days = Vec::new();
        let mut ever_missing = 0u64;
        let live = sim.live();
        for day in 0..a.days {
            for p in pubs.iter_mut() {
                let mut fresh = Vec::new();
                if p.tree.is_empty() {
                    for _ in 0..a.blocks {
                        fresh.push(make_block(p.seed, p.next, a.block_bytes));
                        p.next += 1;
                    }
                    p.tree = fresh.iter().map(|b| b.key()).collect();
                } else {
                    let n = ((a.blocks as f64) * a.churn).round().max(1.0) as usize;
                    for _ in 0..n {
                        let at = sim.rng.random_range(0..p.tree.len());
                        let b = make_block(p.seed, p.next, a.block_bytes);
                        p.next += 1;
                        p.tree[at] = b.key();
                        fresh.push(b);
                    }
                }
                published += fresh.len() as u64;
                // A failed put or renewal is a lost publish for this day, as in a real
                // ring; the check below says whether it cost any kept block.
                let _ = p.client.put_many(&fresh).await;
                p.versions.push_front(p.tree.clone());
                p.versions.truncate(a.keep);
                let kept: BTreeSet<Id> = p.versions.iter().flatten().copied().collect();
                let items: Vec<(BlockKind, Id, u64)> =
                    kept.into_iter().map(|k| (BlockKind::Data, k, 0)).collect();
                let _ = p.client.lease_everywhere(&items, lease).await;
            }
            let expired = |sim: &Sim| -> u64 {
                live.iter()
                    .map(|&i| {
                        sim.node(i)
                            .metrics()
                            .expired_blocks
                            .load(std::sync::atomic::Ordering::Relaxed)
                    })
                    .sum()
            };
            let expired_before = expired(&sim);
            let step = Duration::from_secs(DAY / a.rounds_per_day.max(1) as u64);
            for _ in 0..a.rounds_per_day.max(1) {
                tokio::time::sleep(step).await;
                let rounds = live.iter().map(|&i| {
                    let n = sim.node(i).clone();
                    async move { n.maintain().await }
                });
                cfs_net::net::join_all(rounds).await;
            }
            let expired_after = expired(&sim);
            let holders = sim.holders();
            let per: Vec<u64> = sim.blocks_per_node();
            let kept: BTreeSet<Id> = pubs
                .iter()
                .flat_map(|p| p.versions.iter().flatten().copied())
                .collect();
            let missing = kept.iter().filter(|k| !holders.contains_key(k)).count() as u64;
            let below_r = kept
                .iter()
                .filter(|k| holders.get(k).is_none_or(|h| h.len() < r))
                .count() as u64;
            ever_missing += missing;
            let pf: Vec<f64> = per.iter().map(|x| *x as f64).collect();
            days.push(GcDay {
                day: day + 1,
                mean_blocks: r4(mean(&pf)),
                max_blocks: per.iter().copied().max().unwrap_or(0),
                distinct: holders.len() as u64,
                published,
                kept: kept.len() as u64,
                missing,
                below_r,
                expired_today: expired_after - expired_before,
            });
        }
        let last = days.last().map_or(0.0, |d| d.mean_blocks);
        let week = days
            .len()
            .checked_sub(8)
            .map_or(last, |i| days[i].mean_blocks);
        Ok(GcReport {
            experiment: "gc",
            nodes: a.nodes,
            publishers: a.publishers,
            blocks_per_tree: a.blocks,
            churn: a.churn,
            keep: a.keep,
            lease_days: a.lease_days,
            last_week_growth: r4(last / week.max(f64::MIN_POSITIVE)),
            ever_missing,
            days,
            run: crate::experiments::finish(sim),
        })
    })?
}

pub fn gc_table(r: &GcReport) -> String {
    let mut s = String::from(
        "| day | copies per node (mean) | max | distinct blocks | blocks ever published | kept-reachable | missing | below r | expired that day |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for d in &r.days {
        if d.day == 1 || d.day % 5 == 0 || d.day == r.days.len() as u64 {
            s.push_str(&format!(
                "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |\n",
                d.day,
                d.mean_blocks,
                d.max_blocks,
                d.distinct,
                d.published,
                d.kept,
                d.missing,
                d.below_r,
                d.expired_today
            ));
        }
    }
    s
}

pub fn gc_svg(r: &GcReport) -> String {
    use crate::plot::{lines, Series};
    let n = r.nodes as f64;
    let replicas = 3.0;
    let ticks: Vec<(f64, String)> = r
        .days
        .iter()
        .filter(|d| d.day % 10 == 0 || d.day == 1)
        .map(|d| (d.day as f64, d.day.to_string()))
        .collect();
    lines(
        &format!(
            "Storage per node, {} nodes, {} publishers keeping {} daily versions (lease {} d)",
            r.nodes, r.publishers, r.keep, r.lease_days
        ),
        "day",
        "block copies per node",
        &[
            Series {
                name: "held (mean)",
                points: r
                    .days
                    .iter()
                    .map(|d| (d.day as f64, d.mean_blocks))
                    .collect(),
                dashed: false,
            },
            Series {
                name: "without GC (every block ever published, r copies)",
                points: r
                    .days
                    .iter()
                    .map(|d| (d.day as f64, d.published as f64 * replicas / n))
                    .collect(),
                dashed: true,
            },
        ],
        &ticks,
    )
}
