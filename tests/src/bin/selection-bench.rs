//! Lookup latency from a client with server selection off and on (next hops and replicas
//! chosen blind to round trips, or by them), against a running ring: the real processes'
//! side of cfs-sim's `selection` experiment. Run where the client should sit, e.g. in a
//! testnet host: `selection-bench NODE [LOOKUPS]`.

use cfs_core::{Id, NodeRef};
use cfs_net::client::Client;
use std::time::Instant;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let node = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: selection-bench NODE [LOOKUPS]"))?
        .parse()?;
    let lookups: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(400);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = Client::tcp(node);
        c.connect().await?;
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut key = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Id::hash(&x.to_be_bytes())
        };
        // Warm up: every member's round trip measured, connections open.
        for _ in 0..100 {
            c.lookup(key()).await?;
        }
        // Two kinds of lookup: from the trusted node through its fingers, as cfs-sim's
        // lookups start at a ring node (here with one round trip more, to that node);
        // and the client's own, from the known vnodes nearest before the key. Off and
        // on alternate, so both meet the same ring and the same load.
        let trusted = vec![NodeRef::new(node, 0)];
        for from_node in [true, false] {
            let mut lat = [Vec::new(), Vec::new()];
            let mut hops = [0.0f64; 2];
            for i in 0..2 * lookups {
                let on = i % 2;
                c.net.server_selection = on == 1;
                let k = key();
                let t0 = Instant::now();
                let l = if from_node {
                    c.net.lookup(trusted.clone(), k, None).await?
                } else {
                    c.lookup(k).await?
                };
                lat[on].push(t0.elapsed().as_secs_f64() * 1e3);
                hops[on] += l.hops as f64;
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (off, on) = (mean(&lat[0]), mean(&lat[1]));
            let kind = if from_node {
                "from the trusted node"
            } else {
                "the client's own"
            };
            for (name, i) in [("off", 0), ("on", 1)] {
                println!(
                    "lookups {kind}, selection {name:>3}: {lookups}, mean {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, {:.2} hops",
                    mean(&lat[i]),
                    pct(&mut lat[i], 0.5),
                    pct(&mut lat[i], 0.99),
                    hops[i] / lookups as f64
                );
            }
            println!("lookups {kind}: gain of selection (mean off / mean on) {:.2}x", off / on);
        }
        Ok(())
    })
}
