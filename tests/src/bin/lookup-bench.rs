//! Lookup hops and latency on a local ring of real cfsd processes.
//! `cargo run --release -p cfs-tests --bin lookup-bench [-- NODES LOOKUPS]`

use cfs_core::{Id, NodeRef};
use cfs_net::client::Client;
use cfs_tests::{eventually, Cluster};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let lookups: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    eprintln!("starting {n} cfsd processes");
    let cluster = Cluster::start(n, &["--stabilize-ms", "200"]);
    cluster.wait_ring(Duration::from_secs(120));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addrs = cluster.addrs();
    // Wait until finger tables have settled: the total stops changing for a few polls.
    let mut last = (0usize, 0usize);
    eventually(Duration::from_secs(120), "finger tables to settle", || {
        let total = rt.block_on(async {
            let c = Client::tcp(addrs[0]);
            let mut t = 0;
            for a in &addrs {
                t += c.status(*a).await.ok()?.vnodes[0].fingers.len();
            }
            Some(t)
        })?;
        last = if total == last.0 {
            (total, last.1 + 1)
        } else {
            (total, 0)
        };
        (last.1 >= 4).then_some(())
    });
    let (mut hops, mut lat) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let c = Client::tcp(addrs[0]);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in 0..lookups {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = Id::hash(&x.to_be_bytes());
            let start = NodeRef::new(addrs[i % addrs.len()], 0);
            let t0 = Instant::now();
            let l = c.net.lookup(vec![start], key, None).await.expect("lookup");
            lat.push(t0.elapsed().as_secs_f64() * 1e3);
            hops.push(l.hops as f64);
        }
    });
    let mean_h = hops.iter().sum::<f64>() / hops.len() as f64;
    let mean_l = lat.iter().sum::<f64>() / lat.len() as f64;
    println!("lookup-bench: {n} nodes, {lookups} lookups from a client outside the ring");
    println!(
        "hops     mean {mean_h:.2}  p99 {:.0}   (1/2 log2 N + 1 = {:.2})",
        pct(&mut hops, 0.99),
        0.5 * (n as f64).log2() + 1.0
    );
    println!(
        "latency  mean {mean_l:.3} ms  p99 {:.3} ms",
        pct(&mut lat, 0.99)
    );
}
