//! The experiments. Each builds rings by real joins on a fresh simulated network, drives
//! the cfsd code through its public API (lookups, puts, gets), and returns a report that
//! serializes to one deterministic JSON object.

use crate::sim::{
    make_block, mean, percentile, r4, random_id, run, GrowPlan, NodeParams, Sim, SimError,
};
use crate::transport::NetParams;
use cfs_core::block::BlockKind;
use cfs_core::wire::DEFAULT_LEASE_SECS;
use cfs_core::Id;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Knobs shared by every experiment.
#[derive(Clone, Debug)]
pub struct Common {
    pub seed: u64,
    pub loss: f64,
    /// The latency model's range of round trips (`NetParams`).
    pub min_rtt: Duration,
    pub max_rtt: Duration,
    pub plan: GrowPlan,
    pub node: NodeParams,
}

impl Common {
    pub fn new(seed: u64) -> Common {
        let net = NetParams::default();
        Common {
            seed,
            loss: 0.0,
            min_rtt: net.min_rtt,
            max_rtt: net.max_rtt,
            plan: GrowPlan::default(),
            node: NodeParams::default(),
        }
    }
    pub(crate) fn net(&self) -> NetParams {
        NetParams {
            seed: self.seed,
            loss: self.loss,
            min_rtt: self.min_rtt,
            max_rtt: self.max_rtt,
        }
    }
}

/// What every report ends with: how much happened, and the proof of determinism.
#[derive(Clone, Debug, Serialize)]
pub struct RunStats {
    pub virtual_secs: f64,
    pub messages: u64,
    pub message_bytes: u64,
    /// SHA-1 over every message (virtual time, endpoints, encoded frame) in order.
    pub trace_hash: String,
}

pub(crate) fn finish(sim: Sim) -> RunStats {
    let (messages, message_bytes) = sim.net.traffic();
    let s = RunStats {
        virtual_secs: r4(sim.net.virtual_now().as_secs_f64()),
        messages,
        message_bytes,
        trace_hash: sim.net.trace_hash(),
    };
    sim.shutdown();
    s
}

fn check(cond: bool, msg: &str) -> Result<(), SimError> {
    if cond {
        Ok(())
    } else {
        Err(SimError::Param(msg.into()))
    }
}

// ---------------------------------------------------------------- 1. lookup path length

#[derive(Clone, Debug, Serialize)]
pub struct LookupReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub server_selection: bool,
    pub mean_hops: f64,
    pub p1_hops: f64,
    pub p50_hops: f64,
    pub p99_hops: f64,
    pub max_hops: f64,
    pub half_log2_n: f64,
    /// Lookups that returned an error.
    pub failed: usize,
    /// Lookups that returned a node other than the key's true successor.
    pub wrong: usize,
    /// Vnodes whose first successor was not the true one when lookups began.
    pub bad_successors: usize,
    pub mean_latency_ms: f64,
    pub p50_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// Count of lookups by hops (index = hops).
    pub hops_histogram: Vec<u64>,
    #[serde(flatten)]
    pub run: RunStats,
}

/// Issue `lookups` lookups of random keys from random live nodes, spaced `every` apart.
/// Returns (hops, latency, ok, correct) per lookup.
async fn lookups(sim: &mut Sim, count: usize, every: Duration) -> Vec<(u32, Duration, bool, bool)> {
    let truth = sim.truth();
    let mut handles = Vec::with_capacity(count);
    for j in 0..count {
        let Some(s) = sim.pick_live() else { break };
        let key = random_id(&mut sim.rng);
        let want = truth.successor(key);
        let node = sim.node(s).clone();
        let delay = every * j as u32;
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let t0 = Instant::now();
            match node.lookup_from(0, key, None).await {
                Ok(l) => (l.hops, t0.elapsed(), true, l.succs.first().copied() == want),
                Err(_) => (0, t0.elapsed(), false, false),
            }
        }));
    }
    let mut out = Vec::with_capacity(count);
    for h in handles {
        if let Ok(r) = h.await {
            out.push(r);
        }
    }
    out
}

pub fn lookup(c: &Common, nodes: usize, count: usize) -> Result<LookupReport, SimError> {
    check(nodes >= 1, "--nodes must be at least 1")?;
    run(async {
        let mut sim = Sim::new(c.net(), c.node.clone());
        sim.grow(nodes, c.plan).await?;
        let bad_successors = sim.ring_errors().0;
        // Lookups run while the ring keeps stabilizing; packing them into about a second keeps that
        // background cost small.
        let res = lookups(&mut sim, count, Duration::from_micros(100)).await;
        let ok: Vec<_> = res.iter().filter(|r| r.2).collect();
        let mut hops: Vec<f64> = ok.iter().map(|r| r.0 as f64).collect();
        hops.sort_by(f64::total_cmp);
        let mut lat: Vec<f64> = ok.iter().map(|r| r.1.as_secs_f64() * 1e3).collect();
        lat.sort_by(f64::total_cmp);
        let mut hist = vec![0u64; hops.last().map_or(0, |h| *h as usize + 1)];
        for h in &hops {
            hist[*h as usize] += 1;
        }
        Ok(LookupReport {
            experiment: "lookup",
            nodes,
            lookups: res.len(),
            seed: c.seed,
            server_selection: c.node.server_selection,
            mean_hops: r4(mean(&hops)),
            p1_hops: percentile(&hops, 1.0),
            p50_hops: percentile(&hops, 50.0),
            p99_hops: percentile(&hops, 99.0),
            max_hops: hops.last().copied().unwrap_or(0.0),
            half_log2_n: r4((nodes as f64).log2() / 2.0),
            failed: res.iter().filter(|r| !r.2).count(),
            wrong: res.iter().filter(|r| r.2 && !r.3).count(),
            bad_successors,
            mean_latency_ms: r4(mean(&lat)),
            p50_latency_ms: r4(percentile(&lat, 50.0)),
            p99_latency_ms: r4(percentile(&lat, 99.0)),
            hops_histogram: hist,
            run: finish(sim),
        })
    })?
}

// ---------------------------------------------------------------- hostile nodes

mod hostile;
pub use hostile::{hostile, HostileReport};

// ---------------------------------------------------------------- 2. failures

#[derive(Clone, Debug, Serialize)]
pub struct FailureReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub fail: f64,
    pub replicas: usize,
    pub succ_list_len: usize,
    pub seed: u64,
    pub blocks: usize,
    /// Puts that did not reach all r replicas.
    pub puts_short: usize,
    pub killed: usize,
    /// Fraction of gets (of blocks with a live replica) that failed right after the
    /// failure, with stabilization stopped.
    pub failed_before: f64,
    /// The same after stabilization and maintenance ran: the figure that must be 0.
    pub failed_lookups: f64,
    pub lookups_after: usize,
    /// Fraction of blocks whose every holder failed.
    pub lost_blocks: f64,
    /// F^r.
    pub expected_lost: f64,
    /// Exactly k of N failed: C(N-r, k-r) / C(N, k).
    pub expected_lost_exact: f64,
    /// Standard deviation of the lost fraction, over replica sets (blocks in one set are
    /// lost together).
    pub lost_sigma: f64,
    /// (lost - expected) / sigma.
    pub lost_z: f64,
    pub replica_sets: usize,
    /// Vnodes whose first successor is not the true one after stabilization.
    pub bad_successors: usize,
    /// Of the surviving blocks, the fraction back on r live replicas after stabilization.
    pub restored: f64,
    #[serde(flatten)]
    pub run: RunStats,
}

/// Get every key in `keys` from a random live node each; returns how many failed.
async fn gets(sim: &mut Sim, keys: &[Id], every: Duration, r: usize) -> usize {
    gets_from(sim, keys, every, r, Sim::pick_live).await
}

/// Like `gets`, each from the node `pick` chooses; returns how many failed.
async fn gets_from(
    sim: &mut Sim,
    keys: &[Id],
    every: Duration,
    r: usize,
    mut pick: impl FnMut(&mut Sim) -> Option<usize>,
) -> usize {
    let mut handles = Vec::with_capacity(keys.len());
    for (j, key) in keys.iter().copied().enumerate() {
        let Some(s) = pick(sim) else { break };
        let node = sim.node(s).clone();
        let delay = every * j as u32;
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let start = node.ids();
            node.net()
                .get(&start, BlockKind::Data, key, r, false)
                .await
                .is_ok()
        }));
    }
    let mut failed = 0;
    for h in handles {
        if !matches!(h.await, Ok(true)) {
            failed += 1;
        }
    }
    failed
}

/// Put `count` blocks through the real put path from random live nodes; returns the keys
/// and how many puts reached fewer than r replicas.
async fn put_blocks(sim: &mut Sim, count: usize, size: usize, seed: u64) -> (Vec<Id>, usize) {
    let r = sim.params.replicas;
    let mut handles = Vec::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    for j in 0..count {
        let Some(s) = sim.pick_live() else { break };
        let node = sim.node(s).clone();
        let b = make_block(seed, j, size);
        keys.push(b.key());
        let delay = Duration::from_micros(500) * j as u32;
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let start = node.ids();
            matches!(node.net().put(&start, &b, r, DEFAULT_LEASE_SECS).await, Ok(rc) if rc.stored_on >= r)
        }));
    }
    let mut short = 0;
    for h in handles {
        if !matches!(h.await, Ok(true)) {
            short += 1;
        }
    }
    (keys, short)
}

pub struct FailureArgs {
    pub nodes: usize,
    pub fail: f64,
    pub blocks: usize,
    /// Stabilization rounds between the failure and the second measurement.
    pub rounds: u32,
}

pub fn failure(c: &Common, a: &FailureArgs) -> Result<FailureReport, SimError> {
    check(a.nodes >= 2, "--nodes must be at least 2")?;
    check((0.0..1.0).contains(&a.fail), "--fail must be in [0, 1)")?;
    let r = c.node.replicas;
    run(async {
        let mut sim = Sim::new(c.net(), c.node.clone());
        sim.grow(a.nodes, c.plan).await?;
        let (keys, puts_short) = put_blocks(&mut sim, a.blocks, 64, c.seed).await;
        sim.rounds(2).await;
        let before = sim.holders();

        // Fail k nodes at once, chosen at random.
        let mut live = sim.live();
        live.shuffle(&mut sim.rng);
        let k = ((a.fail * a.nodes as f64).round() as usize).min(live.len().saturating_sub(1));
        let victims: std::collections::BTreeSet<usize> = live[..k].iter().copied().collect();
        for &v in &victims {
            sim.kill(v);
        }

        // Blocks lost, and replica sets (the holder sets) for the spread.
        let mut sets: BTreeMap<Vec<usize>, (u64, bool)> = BTreeMap::new();
        let mut surviving = Vec::new();
        let mut lost = 0usize;
        let mut held = 0usize;
        for key in &keys {
            let Some(h) = before.get(key) else { continue };
            held += 1;
            let dead = h.iter().all(|i| victims.contains(i));
            if dead {
                lost += 1;
            } else {
                surviving.push(*key);
            }
            let e = sets.entry(h.clone()).or_insert((0, dead));
            e.0 += 1;
        }
        let p = a.fail.powi(r as i32);
        let exact = (0..r)
            .map(|i| (k as f64 - i as f64).max(0.0) / (a.nodes as f64 - i as f64))
            .product::<f64>();
        let b2: f64 = sets.values().map(|(b, _)| (*b as f64).powi(2)).sum();
        let held_f = held.max(1) as f64;
        let sigma = (exact * (1.0 - exact) * b2).sqrt() / held_f;
        let lost_frac = lost as f64 / held_f;

        // Right after: the ring frozen as the failure left it.
        sim.freeze();
        let failed_before = gets(&mut sim, &surviving, Duration::from_millis(1), r).await;

        // After stabilization and maintenance.
        sim.thaw();
        sim.rounds(a.rounds).await;
        let bad_successors = sim.ring_errors().0;
        let failed_after = gets(&mut sim, &surviving, Duration::from_millis(1), r).await;
        let after = sim.holders();
        let restored = surviving
            .iter()
            .filter(|k| after.get(*k).is_some_and(|h| h.len() >= r))
            .count();
        let n_surv = surviving.len().max(1) as f64;
        Ok(FailureReport {
            experiment: "failure",
            nodes: a.nodes,
            fail: a.fail,
            replicas: r,
            succ_list_len: c.node.succ_list_len,
            seed: c.seed,
            blocks: keys.len(),
            puts_short,
            killed: k,
            failed_before: r4(failed_before as f64 / n_surv),
            failed_lookups: r4(failed_after as f64 / n_surv),
            lookups_after: surviving.len(),
            lost_blocks: r4(lost_frac),
            expected_lost: r4(p),
            expected_lost_exact: r4(exact),
            lost_sigma: r4(sigma),
            lost_z: if sigma > 0.0 {
                r4((lost_frac - exact) / sigma)
            } else {
                0.0
            },
            replica_sets: sets.len(),
            bad_successors,
            restored: r4(restored as f64 / n_surv),
            run: finish(sim),
        })
    })?
}

// ---------------------------------------------------------------- 3. load balance

#[derive(Clone, Debug, Serialize)]
pub struct LoadRow {
    pub vnodes: u16,
    pub mean: f64,
    pub p1_over_mean: f64,
    pub p99_over_mean: f64,
    pub max_over_mean: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub blocks: usize,
    pub seed: u64,
    pub rows: Vec<LoadRow>,
    pub trace_hashes: Vec<String>,
}

/// Blocks per node (r = 1, so a block's count is its successor's) with 1 and with
/// log2 N virtual servers per node.
pub fn load(c: &Common, nodes: usize, blocks: usize) -> Result<LoadReport, SimError> {
    check(nodes >= 2, "--nodes must be at least 2")?;
    let v_many = ((nodes as f64).log2().ceil() as u16).clamp(1, cfs_core::id::MAX_VNODES);
    let mut rows = Vec::new();
    let mut trace_hashes = Vec::new();
    for v in [1u16, v_many] {
        let mut cc = c.clone();
        cc.node.vnodes = v;
        cc.node.replicas = 1;
        let (row, hash) = run(async {
            let mut sim = Sim::new(cc.net(), cc.node.clone());
            sim.grow(nodes, cc.plan).await?;
            put_blocks(&mut sim, blocks, 32, cc.seed).await;
            let mut per: Vec<f64> = sim.blocks_per_node().iter().map(|b| *b as f64).collect();
            per.sort_by(f64::total_cmp);
            let m = mean(&per).max(f64::MIN_POSITIVE);
            let row = LoadRow {
                vnodes: v,
                mean: r4(m),
                p1_over_mean: r4(percentile(&per, 1.0) / m),
                p99_over_mean: r4(percentile(&per, 99.0) / m),
                max_over_mean: r4(per.last().copied().unwrap_or(0.0) / m),
            };
            Ok::<_, SimError>((row, finish(sim).trace_hash))
        })??;
        rows.push(row);
        trace_hashes.push(hash);
    }
    Ok(LoadReport {
        experiment: "load",
        nodes,
        blocks,
        seed: c.seed,
        rows,
        trace_hashes,
    })
}

// ---------------------------------------------------------------- 4. path caching

#[derive(Clone, Debug, Serialize)]
pub struct CacheRow {
    pub path_caching: bool,
    pub mean_hops: f64,
    /// Mean hops over the last quarter of the fetches (caches warm).
    pub late_mean_hops: f64,
    /// Lookup and get requests for the block that reached its r home nodes.
    pub home_requests: u64,
    /// The same as a fraction of fetches.
    pub home_load: f64,
    pub failed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub fetches: usize,
    pub seed: u64,
    pub rows: Vec<CacheRow>,
    /// Mean hops per successive tenth of the fetches, [without, with] caching.
    pub hops_by_tenth: [Vec<f64>; 2],
    pub trace_hashes: Vec<String>,
}

/// One popular block fetched `fetches` times from random nodes, one after another.
pub fn cache(c: &Common, nodes: usize, fetches: usize) -> Result<CacheReport, SimError> {
    check(
        nodes >= 2 && fetches >= 4,
        "need --nodes >= 2 and --fetches >= 4",
    )?;
    let mut rows = Vec::new();
    let mut tenths: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut trace_hashes = Vec::new();
    for (slot, caching) in [false, true].into_iter().enumerate() {
        let mut cc = c.clone();
        cc.node.path_caching = caching;
        let r = cc.node.replicas;
        let (row, tenth, hash) = run(async {
            let mut sim = Sim::new(cc.net(), cc.node.clone());
            sim.grow(nodes, cc.plan).await?;
            let block = make_block(cc.seed, usize::MAX, 1024);
            let key = block.key();
            let home: Vec<usize> = {
                let s = sim.pick_live().unwrap_or(0);
                let node = sim.node(s).clone();
                let start = node.ids();
                let _ = node.net().put(&start, &block, r, DEFAULT_LEASE_SECS).await;
                sim.holders().get(&key).cloned().unwrap_or_default()
            };
            sim.net.watch(Some(key));
            let mut hops = Vec::with_capacity(fetches);
            let mut failed = 0;
            for _ in 0..fetches {
                let Some(s) = sim.pick_live() else { break };
                let node = sim.node(s).clone();
                let start = node.ids();
                match node
                    .net()
                    .get(&start, BlockKind::Data, key, r, caching)
                    .await
                {
                    Ok((_, l)) => hops.push(l.hops as f64),
                    Err(_) => failed += 1,
                }
                // Let the background cache offers land before the next reader comes.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let w = sim.net.watched();
            let home_requests: u64 = home.iter().map(|h| w.get(h).copied().unwrap_or(0)).sum();
            let q = hops.len() * 3 / 4;
            let tenth: Vec<f64> = (0..10)
                .map(|t| {
                    let a = hops.len() * t / 10;
                    let b = hops.len() * (t + 1) / 10;
                    r4(mean(&hops[a..b]))
                })
                .collect();
            let row = CacheRow {
                path_caching: caching,
                mean_hops: r4(mean(&hops)),
                late_mean_hops: r4(mean(&hops[q..])),
                home_requests,
                home_load: r4(home_requests as f64 / fetches as f64),
                failed,
            };
            Ok::<_, SimError>((row, tenth, finish(sim).trace_hash))
        })??;
        rows.push(row);
        tenths[slot] = tenth;
        trace_hashes.push(hash);
    }
    Ok(CacheReport {
        experiment: "cache",
        nodes,
        fetches,
        seed: c.seed,
        rows,
        hops_by_tenth: tenths,
        trace_hashes,
    })
}

// ---------------------------------------------------------------- 5. server selection

#[derive(Clone, Debug, Serialize)]
pub struct SelectionRow {
    pub server_selection: bool,
    pub mean_hops: f64,
    pub mean_latency_ms: f64,
    pub p50_latency_ms: f64,
    pub p99_latency_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SelectionReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub rows: Vec<SelectionRow>,
    pub trace_hashes: Vec<String>,
}

pub fn selection(c: &Common, nodes: usize, count: usize) -> Result<SelectionReport, SimError> {
    let mut rows = Vec::new();
    let mut trace_hashes = Vec::new();
    for sel in [false, true] {
        let mut cc = c.clone();
        cc.node.server_selection = sel;
        let r = lookup(&cc, nodes, count)?;
        rows.push(SelectionRow {
            server_selection: sel,
            mean_hops: r.mean_hops,
            mean_latency_ms: r.mean_latency_ms,
            p50_latency_ms: r.p50_latency_ms,
            p99_latency_ms: r.p99_latency_ms,
        });
        trace_hashes.push(r.run.trace_hash);
    }
    Ok(SelectionReport {
        experiment: "selection",
        nodes,
        lookups: count,
        seed: c.seed,
        rows,
        trace_hashes,
    })
}

// ---------------------------------------------------------------- 6. churn

#[derive(Clone, Debug, Serialize)]
pub struct ChurnRow {
    /// Joins and also leaves per stabilization interval, as a fraction of N.
    pub rate: f64,
    pub events: usize,
    pub lookups: usize,
    /// Lookups that returned an error.
    pub failed: f64,
    /// Lookups that returned a node other than the key's true live successor.
    pub wrong: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub intervals: u32,
    pub seed: u64,
    pub rows: Vec<ChurnRow>,
    pub trace_hashes: Vec<String>,
}

/// For each rate: a ring of N under churn for `intervals` stabilization intervals (each
/// interval, rate*N nodes fail and as many join, at random times), with lookups from
/// random live nodes throughout, checked against the true ring when they finish.
pub fn churn(
    c: &Common,
    nodes: usize,
    rates: &[f64],
    intervals: u32,
) -> Result<ChurnReport, SimError> {
    check(nodes >= 8, "--nodes must be at least 8")?;
    let mut rows = Vec::new();
    let mut trace_hashes = Vec::new();
    for &rate in rates {
        let (row, hash) = run(async {
            let mut sim = Sim::new(c.net(), c.node.clone());
            sim.grow(nodes, c.plan).await?;
            let interval = c.node.stabilize_every;
            let total = interval * intervals;
            let events = ((rate * nodes as f64) * intervals as f64).round() as usize;
            let per_lookup = Duration::from_millis(50);
            let n_lookups = (total.as_millis() / per_lookup.as_millis()) as usize;
            // A schedule of (time, event): 0 = leave, 1 = join, 2 = lookup.
            let mut sched: Vec<(Duration, u8)> = Vec::new();
            for _ in 0..events {
                let t = Duration::from_micros(sim.rng.random_range(0..total.as_micros() as u64));
                sched.push((t, 0));
                let t = Duration::from_micros(sim.rng.random_range(0..total.as_micros() as u64));
                sched.push((t, 1));
            }
            for j in 0..n_lookups {
                sched.push((per_lookup * j as u32, 2));
            }
            sched.sort();
            let t0 = Instant::now();
            // The true ring as of now, for lookups to be checked against when they end.
            let truth =
                std::sync::Arc::new(std::sync::Mutex::new(std::sync::Arc::new(sim.truth())));
            let mut pending = Vec::new();
            for (t, ev) in sched {
                tokio::time::sleep_until(t0 + t).await;
                match ev {
                    0 => {
                        if sim.live().len() > 8 {
                            if let Some(v) = sim.pick_live() {
                                sim.kill(v);
                            }
                        }
                    }
                    1 => {
                        let i = sim.spawn_node();
                        // A failed join is part of churn, not an error of the run.
                        let _ = sim.join_all(&[i]).await;
                    }
                    _ => {
                        let Some(s) = sim.pick_live() else { continue };
                        let key = random_id(&mut sim.rng);
                        let node = sim.node(s).clone();
                        let truth = truth.clone();
                        pending.push(tokio::spawn(async move {
                            let r = node.lookup_from(0, key, None).await;
                            let now = truth.lock().unwrap().clone();
                            match r {
                                Ok(l) if l.succs.first().copied() == now.successor(key) => 0u8,
                                Ok(_) => 1,
                                Err(_) => 2,
                            }
                        }));
                    }
                }
                if ev != 2 {
                    *truth.lock().unwrap() = std::sync::Arc::new(sim.truth());
                }
            }
            let n = pending.len();
            let (mut failed, mut wrong) = (0, 0);
            for h in pending {
                match h.await {
                    Ok(0) => {}
                    Ok(1) => wrong += 1,
                    _ => failed += 1,
                }
            }
            let row = ChurnRow {
                rate,
                events,
                lookups: n,
                failed: r4(failed as f64 / n.max(1) as f64),
                wrong: r4(wrong as f64 / n.max(1) as f64),
            };
            Ok::<_, SimError>((row, finish(sim).trace_hash))
        })??;
        rows.push(row);
        trace_hashes.push(hash);
    }
    Ok(ChurnReport {
        experiment: "churn",
        nodes,
        intervals,
        seed: c.seed,
        rows,
        trace_hashes,
    })
}
