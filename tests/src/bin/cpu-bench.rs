//! What each unauthenticated request costs a node: CPU-µs per request and CPU-ns per byte
//! the sender spends, for every request kind a stranger can send, measured on one node of
//! a local ring from its threads' scheduler time, its idle rate taken off.
//! `cargo run --release -p cfs-tests --bin cpu-bench [-- REQUESTS]`

use cfs_core::block::{verify, BlockKind};
use cfs_core::wire::{Request, WireBlock};
use cfs_core::{Id, NodeRef};
use cfs_tests::hostile::RawPeer;
use cfs_tests::Cluster;
use std::time::{Duration, Instant};

/// Nanoseconds the process has run on a CPU, all threads.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn key(i: u64) -> Id {
    Id::hash(&i.to_be_bytes())
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let x = cluster.nodes[0].addr;
    let pid = cluster.nodes[0].pid().expect("node running");
    let rt = cfs_tests::rt();
    let c = cfs_tests::client(&rt, x);
    let big = vec![7u8; 256 << 10];
    let big_key = rt.block_on(async {
        let v = verify(BlockKind::Data, Id::hash(&big), big.clone(), true).unwrap();
        c.put(&v).await.unwrap();
        v.key()
    });
    // Served from X's own store: only a holder answers a Get with the block.
    let held_here = cfs_tests::hostile::held(x, BlockKind::Data, big_key);

    // X's idle rate (stabilization and maintenance), taken off every figure.
    let (c0, t0) = (cpu_ns(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let idle_per_s = (cpu_ns(pid) - c0) as f64 / t0.elapsed().as_secs_f64();

    let junk = |i: u64| format!("junk {i} ").repeat(512).into_bytes();
    type Make = Box<dyn Fn(u64) -> Request>;
    let kinds: Vec<(&str, Make)> = vec![
        ("Ping", Box::new(|_| Request::Ping)),
        ("Status", Box::new(|_| Request::Status)),
        (
            "FindStep (random key)",
            Box::new(|i| Request::FindStep {
                vnode: 0,
                key: key(i),
                want: None,
            }),
        ),
        ("Neighbors", Box::new(|_| Request::Neighbors { vnode: 0 })),
        (
            "Get (missing)",
            Box::new(|i| Request::Get {
                kind: BlockKind::Data,
                key: key(i),
            }),
        ),
        (
            "Get (256 KiB held)",
            Box::new(move |_| Request::Get {
                kind: BlockKind::Data,
                key: big_key,
            }),
        ),
        (
            "Has (64 keys)",
            Box::new(|i| Request::Has {
                items: (0..64)
                    .map(|j| (BlockKind::Data, key(i * 64 + j)))
                    .collect(),
            }),
        ),
        (
            "GetMany (64 missing)",
            Box::new(|i| Request::GetMany {
                items: (0..64)
                    .map(|j| (BlockKind::Data, key(i * 64 + j)))
                    .collect(),
            }),
        ),
        (
            "Rectify (not the sender)",
            Box::new(|i| Request::Rectify {
                vnode: 0,
                candidate: NodeRef::new(([198, 18, 0, 1], 4000 + (i % 1000) as u16).into(), 0),
            }),
        ),
        (
            "Cache (5 KiB, not routed)",
            Box::new(move |i| Request::Cache {
                kind: BlockKind::Data,
                key: key(i),
                bytes: junk(i),
            }),
        ),
        (
            "PutMany (one 5 KiB block, charged)",
            Box::new(move |i| {
                let bytes = junk(1_000_000 + i);
                Request::PutMany {
                    blocks: vec![WireBlock {
                        kind: BlockKind::Data,
                        key: Id::hash(&bytes),
                        bytes,
                        lease: 3600,
                        source: None,
                    }],
                    transfer: false,
                }
            }),
        ),
    ];
    println!(
        "cpu-bench: {n} requests of each kind to one node of 3 (idle {:.1} ms CPU/s taken off; the 256 KiB block held there: {held_here})\n",
        idle_per_s / 1e6
    );
    println!("| request | bytes sent each | node CPU-µs per request | node CPU-ns per byte sent | requests/s on one connection |");
    println!("| --- | --- | --- | --- | --- |");
    let mut offset = 0u64;
    for (name, make) in &kinds {
        let reqs: Vec<Request> = (0..n as u64).map(|i| make(offset + i)).collect();
        offset += n as u64;
        let bytes: usize = reqs
            .iter()
            .map(|r| cfs_core::wire::encode_frame(r).map_or(0, |v| v.len()) + 16)
            .sum();
        let (c0, t0) = (cpu_ns(pid), Instant::now());
        rt.block_on(async {
            let mut p = RawPeer::connect(x).await.expect("connect");
            for chunk in reqs.chunks(64) {
                p.pipeline(chunk.to_vec()).await.expect("answers");
            }
        });
        let wall = t0.elapsed().as_secs_f64();
        let cpu = ((cpu_ns(pid) - c0) as f64 - idle_per_s * wall).max(0.0);
        println!(
            "| {name} | {} | {:.1} | {:.2} | {:.0} |",
            bytes / n,
            cpu / n as f64 / 1e3,
            cpu / bytes as f64,
            n as f64 / wall
        );
    }
}
