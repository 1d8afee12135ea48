//! Leases and garbage collection on real `cfsd` processes: unrenewed blocks expire on
//! every replica and their space is reused, `cfs keep` keeps chosen versions (and what
//! they share with other trees) while the rest expires, a restarted node does not bring
//! expired blocks back, and a peer can neither shorten a lease nor renew past the
//! maximum, nor store more than its space-time quota, and a full node refuses new blocks
//! while it keeps serving.

use cfs_core::block::BlockKind;
use cfs_core::wire::{ErrorKind, Request, Response, WireBlock};
use cfs_core::Id;
use cfs_tests::hostile::{counter, lease_left, lo, status_json, RawPeer};
use cfs_tests::{cfs, cfs_ok, eventually, rt, Cluster};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const FLAGS: &[&str] = &[
    "--stabilize-ms",
    "200",
    "--maintain-ms",
    "300",
    "--min-lease",
    "1s",
];

/// Bytes that differ per (seed, i): incompressible enough, never all zero.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn blocks_on(addr: SocketAddr) -> Option<u64> {
    status_json(addr)?["blocks"].as_u64()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// `cfs publish` with a lease; returns the FSID.
fn publish(c: &Cluster, dir: &Path, key: &Path, lease: &str) -> String {
    c.publish_with(dir, key, 0, &["--lease", lease, "-q"]).0
}

fn get(c: &Cluster, spec: &str) -> Option<Vec<u8>> {
    let out = cfs(&["get", spec, "--node", &c.addr(0)]);
    out.status.success().then_some(out.stdout)
}

fn held_anywhere(c: &Cluster, key: Id) -> bool {
    c.addrs()
        .iter()
        .any(|a| lease_left(*a, BlockKind::Data, key).is_some())
}

#[test]
fn an_unrenewed_tree_expires_everywhere_its_space_is_reused_and_a_restart_does_not_resurrect_it() {
    let mut c = Cluster::start(3, FLAGS);
    c.wait_ring(Duration::from_secs(30));
    let tree = c.dir.path().join("t1");
    std::fs::create_dir_all(&tree).unwrap();
    for i in 0..8 {
        std::fs::write(tree.join(format!("f{i}")), bytes(i, 256 << 10)).unwrap();
    }
    let key = c.keygen();
    let fsid = publish(&c, &tree, &key, "6s");
    let f0 = bytes(0, 256 << 10);
    assert_eq!(get(&c, &format!("{fsid}:/f0")).as_deref(), Some(&f0[..]));
    let db0 = c.nodes[0].data.join("blocks.redb");
    let held: Vec<u64> = (0..3)
        .map(|i| blocks_on(c.nodes[i].addr).unwrap())
        .collect();
    assert!(
        held.iter().all(|&n| n >= 10),
        "every node holds the tree: {held:?}"
    );
    let size_after_first = file_len(&db0);

    // Node 2 dies holding the tree; the others let it expire.
    c.kill(2);
    let t0 = std::time::Instant::now();
    eventually(
        Duration::from_secs(40),
        "the tree to expire on the live replicas",
        || (blocks_on(c.nodes[0].addr)? == 0 && blocks_on(c.nodes[1].addr)? == 0).then_some(()),
    );
    eprintln!(
        "LEASE expiry: {} blocks per node gone {:?} after the kill (lease 6 s)",
        held[0],
        t0.elapsed()
    );
    for i in 0..2 {
        assert!(counter(c.nodes[i].addr, "expired_blocks") >= held[i]);
        assert!(counter(c.nodes[i].addr, "expired_bytes") >= 8 * (256 << 10));
    }
    assert_eq!(
        get(&c, &format!("{fsid}:/f0")),
        None,
        "an expired tree is gone"
    );

    // Node 2 comes back on its old data: its copies expired while it was down, so it
    // sweeps them and pushes nothing.
    c.restart(2);
    let a2 = c.nodes[2].addr;
    eventually(
        Duration::from_secs(30),
        "the restarted node to sweep and run maintenance",
        || {
            let s = status_json(a2)?;
            let rounds = s["counters"]["maintain_rounds"].as_u64()?;
            (s["blocks"].as_u64()? == 0 && rounds >= 3).then_some(())
        },
    );
    assert_eq!(counter(a2, "repairs_sent"), 0, "nothing expired was pushed");
    assert!(counter(a2, "expired_blocks") >= held[2]);
    for i in 0..2 {
        assert_eq!(
            blocks_on(c.nodes[i].addr),
            Some(0),
            "node {i} got nothing back"
        );
    }
    assert_eq!(get(&c, &format!("{fsid}:/f0")), None);

    // The space is reused: a tree of the same size does not grow the file much.
    let tree2 = c.dir.path().join("t2");
    std::fs::create_dir_all(&tree2).unwrap();
    for i in 0..8 {
        std::fs::write(tree2.join(format!("g{i}")), bytes(100 + i, 256 << 10)).unwrap();
    }
    publish(&c, &tree2, &c.keygen(), "1h");
    let size_after_second = file_len(&db0);
    eprintln!(
        "LEASE space: blocks.redb {} KiB after the first 2 MiB tree, {} KiB after it expired and a second 2 MiB tree was stored ({:.2}x)",
        size_after_first >> 10,
        size_after_second >> 10,
        size_after_second as f64 / size_after_first as f64
    );
    assert!(
        size_after_second < size_after_first + (size_after_first / 2),
        "expired space is reused: {size_after_first} then {size_after_second} bytes"
    );
}

#[test]
fn keep_versions_2_keeps_the_newest_two_whole_and_what_they_share_while_the_rest_expires() {
    let c = Cluster::start(3, FLAGS);
    c.wait_ring(Duration::from_secs(30));
    let shared = bytes(7, 20_000);
    let key_a = c.keygen();
    let dir = c.dir.path().join("a");
    let mut unique = Vec::new();
    let mut fsid = String::new();
    for v in 1..=5u64 {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("shared.bin"), &shared).unwrap();
        let u = bytes(1000 + v, 20_000 + v as usize);
        std::fs::write(dir.join("sub").join(format!("v{v}.bin")), &u).unwrap();
        unique.push(u);
        fsid = publish(&c, &dir, &key_a, "20s");
    }
    // Another publisher's tree shares a file with A and is never kept.
    let dir_b = c.dir.path().join("b");
    std::fs::create_dir_all(&dir_b).unwrap();
    std::fs::write(dir_b.join("shared.bin"), &shared).unwrap();
    let only_b = bytes(2000, 30_000);
    std::fs::write(dir_b.join("b.bin"), &only_b).unwrap();
    let fsid_b = publish(&c, &dir_b, &c.keygen(), "20s");

    let dry: serde_json::Value = serde_json::from_str(&cfs_ok(&[
        "keep",
        &fsid,
        "--versions",
        "2",
        "--dry-run",
        "--json",
        "--node",
        &c.addr(0),
    ]))
    .unwrap();
    eprintln!("LEASE keep --dry-run: {dry}");
    assert_eq!(dry["versions"], serde_json::json!([5, 4]));
    assert_eq!(dry["old_versions"], serde_json::json!([3, 2, 1]));
    // Each old version reaches its own file, its directory, the top directory and a
    // chain link that no kept version reaches.
    assert!(dry["old_only_blocks"].as_u64().unwrap() >= 3 * 4, "{dry}");
    assert!(dry["old_only_bytes"].as_u64().unwrap() >= 3 * 20_000);

    let kept: serde_json::Value = serde_json::from_str(&cfs_ok(&[
        "keep",
        &fsid,
        "--versions",
        "2",
        "--lease",
        "1h",
        "--json",
        "--node",
        &c.addr(0),
    ]))
    .unwrap();
    eprintln!("LEASE keep --versions 2: {kept}");
    assert_eq!(kept["versions"], serde_json::json!([5, 4]));
    let blocks = kept["blocks"].as_u64().unwrap();
    assert_eq!(kept["blocks"], dry["blocks"]);
    assert_eq!(
        kept["renewed"].as_u64().unwrap() + kept["already"].as_u64().unwrap(),
        3 * blocks
    );
    assert_eq!(kept["under_replicated"], 0);

    let key_of = |b: &[u8]| Id::hash(b);
    eventually(
        Duration::from_secs(60),
        "blocks only old versions and B reach to expire everywhere",
        || {
            let gone = unique[..3].iter().all(|u| !held_anywhere(&c, key_of(u)))
                && !held_anywhere(&c, key_of(&only_b));
            gone.then_some(())
        },
    );
    for v in [4u64, 5] {
        let got = get(&c, &format!("{fsid}@{v}:/sub/v{v}.bin"));
        assert_eq!(
            got.as_deref(),
            Some(&unique[v as usize - 1][..]),
            "version {v} is whole"
        );
        assert_eq!(
            get(&c, &format!("{fsid}@{v}:/shared.bin")).as_deref(),
            Some(&shared[..])
        );
    }
    assert_eq!(
        get(&c, &format!("{fsid}@3:/sub/v3.bin")),
        None,
        "version 3 expired"
    );
    assert_eq!(get(&c, &format!("{fsid_b}:/b.bin")), None, "tree B expired");
    for a in c.addrs() {
        let left = lease_left(a, BlockKind::Data, key_of(&shared));
        assert!(
            left.is_some_and(|l| l > 3000),
            "the shared block is kept on {a}: {left:?}"
        );
    }
}

fn block(seed: u64, n: usize, lease: u64) -> WireBlock {
    let b = bytes(seed, n);
    WireBlock {
        kind: BlockKind::Data,
        key: Id::hash(&b),
        bytes: b,
        lease,
        source: None,
    }
}

async fn put(p: &mut RawPeer, b: &WireBlock) -> Result<bool, ErrorKind> {
    let req = Request::Put {
        kind: b.kind,
        key: b.key,
        bytes: b.bytes.clone(),
        transfer: false,
        lease: b.lease,
    };
    match p.call(req).await.expect("the node answers") {
        Ok(Response::Stored { fresh }) => Ok(fresh),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => Err(e.kind),
    }
}

async fn renew(p: &mut RawPeer, key: Id, lease: u64) -> Result<Option<u64>, ErrorKind> {
    let req = Request::Renew {
        items: vec![(BlockKind::Data, key)],
        lease,
        transfer: true,
    };
    match p.call(req).await.expect("the node answers") {
        Ok(Response::Renewed { answers, .. }) => {
            answers.into_iter().next().unwrap().map_err(|e| e.kind)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_peer_cannot_shorten_or_overextend_a_lease_nor_outstore_its_space_time_and_a_full_node_keeps_serving(
) {
    // One node: 1 MiB for an hour per source, 4 MiB in all, leases of 1 min to 1 h.
    let c = Cluster::start(
        1,
        &[
            &FLAGS[..4],
            &[
                "--max-lease",
                "1h",
                "--min-lease",
                "60s",
                "--quota-mb",
                "1",
                "--capacity-mb",
                "4",
            ][..],
        ]
        .concat(),
    );
    let a = c.nodes[0].addr;
    let rt = rt();
    rt.block_on(async {
        let mut honest = RawPeer::connect_from(lo(20), a).await.unwrap();
        let b = block(1, 1000, 600);
        assert_eq!(put(&mut honest, &b).await, Ok(true));
        // A lease of 0 gets (and pays for) the node's shortest.
        let z = block(2, 1000, 0);
        assert_eq!(put(&mut honest, &z).await, Ok(true));
        assert!((50..=60).contains(&lease_left(a, BlockKind::Data, z.key).unwrap()));
        let mut hostile = RawPeer::connect_from(lo(21), a).await.unwrap();
        // A put or renewal asking for less never shortens the lease...
        assert_eq!(put(&mut hostile, &WireBlock { lease: 1, ..b.clone() }).await, Ok(false));
        assert!(renew(&mut hostile, b.key, 0).await.unwrap().unwrap() >= 590);
        assert!(lease_left(a, BlockKind::Data, b.key).unwrap() >= 590);
        // ...and one asking for more is capped at the node's maximum.
        assert!(renew(&mut hostile, b.key, u64::MAX).await.unwrap().unwrap() <= 3600);
        assert_eq!(put(&mut hostile, &WireBlock { lease: u64::MAX, ..b.clone() }).await, Ok(false));
        assert!(lease_left(a, BlockKind::Data, b.key).unwrap() <= 3600);

        // Space-time: an hour's lease stores ~1 MiB, half an hour's twice as much.
        let fill = |peer: u8, seed: u64, lease: u64| async move {
            let mut p = RawPeer::connect_from(lo(peer), a).await.unwrap();
            let mut n = 0;
            loop {
                match put(&mut p, &block(seed + n, 64 << 10, lease)).await {
                    Ok(_) => n += 1,
                    Err(k) => return (p, n, k),
                }
            }
        };
        let (mut long, n_long, refusal) = fill(22, 100, 3600).await;
        assert_eq!(refusal, ErrorKind::Quota);
        let (_, n_half, refusal) = fill(23, 10_000, 1800).await;
        assert_eq!(refusal, ErrorKind::Quota);
        eprintln!(
            "LEASE quota: 64 KiB blocks a 1 MiB-hour quota stores with a 1 h lease: {n_long}, with 30 min: {n_half}"
        );
        assert!((14..=16).contains(&n_long), "{n_long}");
        assert!(n_half >= 2 * n_long - 1 && n_half <= 2 * n_long + 2, "{n_half} vs {n_long}");
        // Renewals are charged too: a source out of quota cannot extend much.
        let mut renewed = 0;
        loop {
            match renew(&mut long, block(10_000 + renewed, 64 << 10, 0).key, 3600).await {
                Ok(Some(_)) => renewed += 1,
                other => {
                    assert_eq!(other, Err(ErrorKind::Quota));
                    break;
                }
            }
        }
        assert!(renewed <= 2, "{renewed} renewals past the quota");
        // Full: new blocks are refused with their own error, counted; nothing unexpired
        // was removed to make room, what is held is served and can still be renewed.
        let (_, n_short, refusal) = fill(24, 20_000, 360).await;
        eprintln!("LEASE capacity: then {n_short} blocks with a 6 min lease until {refusal:?}");
        assert_eq!(refusal, ErrorKind::Full);
        let first = block(10_000, 64 << 10, 1800);
        match honest.call(Request::Get { kind: BlockKind::Data, key: first.key }).await.unwrap() {
            Ok(Response::Block(Some(got))) => assert_eq!(got, first.bytes),
            other => panic!("a full node still serves: {other:?}"),
        }
        assert!(renew(&mut honest, b.key, 3600).await.unwrap().is_some());
    });
    assert!(counter(a, "refused_full") >= 1);
    assert!(counter(a, "refused_quota") >= 2);
    assert!(counter(a, "leases_renewed") >= 1);
}

/// Unmounts the tmpfs and stops the node when dropped.
struct Tmpfs {
    dir: std::path::PathBuf,
    node: Option<std::process::Child>,
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_node_on_a_filling_disk_refuses_new_blocks_keeps_serving_and_recovers_as_leases_end() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cfs-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut fs = Tmpfs {
        dir: dir.clone(),
        node: None,
    };
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a tmpfs");
    let data = dir.join("node");
    fs.node = Some(
        std::process::Command::new(cfs_tests::bin("cfsd"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--replicas",
                "1",
                "--successors",
                "4",
            ])
            .args(["--min-lease", "1s", "--maintain-ms", "300", "--data"])
            .arg(&data)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let a: SocketAddr = eventually(Duration::from_secs(20), "the node's address", || {
        std::fs::read_to_string(data.join("addr"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let rt = rt();
    let (stored, first) = rt.block_on(async {
        let mut p = RawPeer::connect_from(lo(30), a).await.unwrap();
        let mut n = 0u64;
        let refusal = loop {
            match put(&mut p, &block(50_000 + n, 256 << 10, 4)).await {
                Ok(_) => n += 1,
                Err(k) => break k,
            }
        };
        assert_eq!(
            refusal,
            ErrorKind::Full,
            "a full disk is refused as full, not an I/O error"
        );
        // Reads and renewals (writes) still work: the reserve leaves room for them.
        let first = block(50_000, 256 << 10, 4);
        match p
            .call(Request::Get {
                kind: BlockKind::Data,
                key: first.key,
            })
            .await
            .unwrap()
        {
            Ok(Response::Block(Some(got))) => assert_eq!(got, first.bytes),
            other => panic!("a node on a full disk still serves: {other:?}"),
        }
        assert!(renew(&mut p, first.key, 5).await.unwrap().is_some());
        (n, first)
    });
    eprintln!(
        "LEASE disk: {stored} blocks of 256 KiB fit on a 24 MiB tmpfs before the node refused"
    );
    assert!(stored >= 40, "{stored}");
    assert!(counter(a, "refused_full") >= 1);
    // The leases end, the sweep frees the space, and new blocks are taken again.
    eventually(
        Duration::from_secs(30),
        "expired blocks to be swept",
        || (counter(a, "expired_blocks") >= stored).then_some(()),
    );
    rt.block_on(async {
        let mut p = RawPeer::connect_from(lo(31), a).await.unwrap();
        for i in 0..10 {
            assert_eq!(
                put(&mut p, &block(90_000 + i, 256 << 10, 60)).await,
                Ok(true)
            );
        }
        let gone = p
            .call(Request::Get {
                kind: BlockKind::Data,
                key: first.key,
            })
            .await
            .unwrap();
        assert!(matches!(gone, Ok(Response::Block(None))), "{gone:?}");
    });
}

#[test]
fn a_node_started_with_keep_keeps_a_tree_alive_past_its_publishers_lease() {
    // The FSID is known before anything is published: it is the key's.
    let dir = tempfile::Builder::new()
        .prefix("cfs-keep-")
        .tempdir()
        .unwrap();
    let key = dir.path().join("k.key");
    let fsid = cfs_ok(&["keygen", key.to_str().unwrap()])
        .trim()
        .to_string();
    let keep = format!("{fsid}:1");
    let c = Cluster::start(
        3,
        &[
            FLAGS,
            &["--keep", &keep, "--keep-lease", "1h", "--keep-every", "1s"][..],
        ]
        .concat(),
    );
    c.wait_ring(Duration::from_secs(30));
    let tree = c.dir.path().join("kept");
    std::fs::create_dir_all(&tree).unwrap();
    let body = bytes(77, 40_000);
    std::fs::write(tree.join("a.bin"), &body).unwrap();
    assert_eq!(publish(&c, &tree, &key, "4s"), fsid);
    // The nodes renew it to an hour, on every replica, well before the 4 s run out.
    eventually(
        Duration::from_secs(30),
        "the keeping nodes to renew the tree",
        || {
            c.addrs()
                .iter()
                .all(|a| lease_left(*a, BlockKind::Data, Id::hash(&body)).is_some_and(|l| l > 3000))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(5)); // past the publisher's lease, by design
    assert_eq!(
        get(&c, &format!("{fsid}:/a.bin")).as_deref(),
        Some(&body[..])
    );
    assert_eq!(counter(c.nodes[0].addr, "expired_blocks"), 0);
}
