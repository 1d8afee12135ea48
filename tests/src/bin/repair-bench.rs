//! Kill r-1 nodes at once and measure how long until every block has r replicas again.
//! `cargo run --release -p cfs-tests --bin repair-bench [-- NODES BLOCKS]`

use cfs_core::block::{verify, BlockKind};
use cfs_core::Id;
use cfs_net::client::Client;
use cfs_tests::{eventually, Cluster};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let blocks: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let r = 3;
    let mut cluster = Cluster::start(n, &["--maintain-ms", "2000"]);
    cluster.wait_ring(Duration::from_secs(60));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Client::tcp(cluster.nodes[0].addr);
    rt.block_on(c.connect()).unwrap();
    let t0 = Instant::now();
    let keys: Vec<Id> = rt.block_on(async {
        let mut keys = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..blocks {
            let b = format!("repair bench block {i}").repeat(100).into_bytes();
            let v = verify(BlockKind::Data, Id::hash(&b), b, false).unwrap();
            keys.push(v.key());
            let c = c.clone();
            tasks.spawn(async move { c.put(&v).await.map(|r| r.stored_on) });
            if tasks.len() >= 64 {
                assert_eq!(tasks.join_next().await.unwrap().unwrap().unwrap(), r);
            }
        }
        while let Some(x) = tasks.join_next().await {
            assert_eq!(x.unwrap().unwrap(), r);
        }
        keys
    });
    let put_secs = t0.elapsed().as_secs_f64();
    let total = |rt: &tokio::runtime::Runtime, c: &Client, addrs: &[std::net::SocketAddr]| -> u64 {
        rt.block_on(async {
            let mut t = 0;
            for a in addrs {
                t += c.status(*a).await.map(|s| s.blocks).unwrap_or(0);
            }
            t
        })
    };
    // Kill r-1 nodes at once (not the client's entry node).
    for i in 1..r {
        cluster.kill(i * n / r);
    }
    let live = cluster.addrs();
    let t1 = Instant::now();
    let unreadable = rt.block_on(async {
        let mut bad = 0;
        for k in &keys {
            if c.get(BlockKind::Data, *k).await.is_err() {
                bad += 1;
            }
        }
        bad
    });
    let read_secs = t1.elapsed().as_secs_f64();
    let items: Vec<(BlockKind, Id, u64)> = keys.iter().map(|k| (BlockKind::Data, *k, 0)).collect();
    eventually(
        Duration::from_secs(300),
        "r replicas of every block",
        || {
            let all = rt.block_on(c.has_everywhere(&items)).ok()?;
            all.iter().all(|x| *x).then_some(())
        },
    );
    let repair_secs = t1.elapsed().as_secs_f64();
    let copies = total(&rt, &c, &live);
    println!(
        "repair-bench: {n} nodes, r = {r}, {blocks} blocks of ~2 KiB (put in {put_secs:.1} s)"
    );
    println!("killed {} nodes at once: {unreadable} blocks unreadable (all {blocks} read in {read_secs:.1} s)", r - 1);
    println!(
        "r replicas of every block restored {repair_secs:.1} s after the kill (maintenance every 2 s); {copies} copies on {} live nodes",
        live.len()
    );
}
