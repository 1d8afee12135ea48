//! Issue 2: the ring. Real cfsd processes on loopback, real kill -9.

use cfs_core::block::{verify, BlockKind, RootBlock, Totals};
use cfs_core::wire::{Request, Response};
use cfs_core::{Id, NodeRef};
use cfs_net::client::Client;
use cfs_net::net::replica_set;
use cfs_tests::{cfs, cfs_ok, client, eventually, rt, Cluster};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

const R: usize = 3;

/// The r distinct nodes that should hold `key`, from the membership alone.
fn expected_replicas(addrs: &[SocketAddr], key: Id) -> Vec<SocketAddr> {
    let mut ring: Vec<NodeRef> = addrs.iter().map(|a| NodeRef::new(*a, 0)).collect();
    ring.sort_by_key(|n| n.id);
    let first = ring.iter().position(|n| n.id >= key).unwrap_or(0);
    let succs: Vec<NodeRef> = (0..ring.len())
        .map(|i| ring[(first + i) % ring.len()])
        .collect();
    let mut v: Vec<SocketAddr> = replica_set(&succs, R).iter().map(|n| n.addr).collect();
    v.sort();
    v
}

/// Put blocks 0..n (see `block_bytes`) through `c`, each on r replicas; their keys.
fn put_blocks(rt: &tokio::runtime::Runtime, c: &Client, n: usize) -> Vec<Id> {
    rt.block_on(async {
        let mut keys = Vec::new();
        for i in 0..n {
            let b = block_bytes(i);
            let v = verify(BlockKind::Data, Id::hash(&b), b, true).unwrap();
            assert_eq!(
                c.put(&v).await.unwrap().stored_on,
                R,
                "block {i} not on r replicas"
            );
            keys.push(v.key());
        }
        keys
    })
}

fn block_bytes(i: usize) -> Vec<u8> {
    format!("block number {i} ").repeat(1 + i % 50).into_bytes()
}

#[test]
fn eight_nodes_form_one_ring_and_keep_blocks_on_r_successors() {
    let cluster = Cluster::start(8, &[]);
    cluster.wait_ring(Duration::from_secs(30));

    // `cfs ring` lists all 8 in id order from every node.
    for a in cluster.addrs() {
        let out = cfs_ok(&["ring", "--node", &a.to_string()]);
        let ids: Vec<String> = out
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 8);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ring not in id order");
    }

    // `block put` prints the SHA-1 of the bytes.
    let f = cluster.dir.path().join("one");
    std::fs::write(&f, b"hello ring").unwrap();
    let key = cfs_ok(&[
        "block",
        "put",
        f.to_str().unwrap(),
        "--node",
        &cluster.addr(3),
    ]);
    assert_eq!(key.trim(), Id::hash(b"hello ring").to_hex());
    let got = cfs(&["block", "get", key.trim(), "--node", &cluster.addr(6)]);
    assert!(got.status.success());
    assert_eq!(got.stdout, b"hello ring");

    // 200 blocks put through different nodes are readable through every node.
    let rt = rt();
    let addrs = cluster.addrs();
    let clients: Vec<Client> = addrs.iter().map(|a| client(&rt, *a)).collect();
    let mut keys = Vec::new();
    rt.block_on(async {
        for i in 0..200 {
            let b = block_bytes(i);
            let v = verify(BlockKind::Data, Id::hash(&b), b, true).unwrap();
            let receipt = clients[i % 8].put(&v).await.unwrap();
            assert_eq!(receipt.stored_on, R, "block {i} not on r replicas");
            keys.push(v.key());
        }
        for (c, cl) in clients.iter().enumerate() {
            for (i, k) in keys.iter().enumerate() {
                let v = cl
                    .get(BlockKind::Data, *k)
                    .await
                    .unwrap_or_else(|e| panic!("block {i} via node {c}: {e}"));
                assert_eq!(v.bytes(), block_bytes(i));
            }
        }
    });

    // `locate` shows each block in the permanent store of exactly its r successors.
    rt.block_on(async {
        for k in &keys {
            let (holders, _) = clients[0].locate(BlockKind::Data, *k).await.unwrap();
            let mut got: Vec<SocketAddr> = holders.iter().map(|n| n.addr).collect();
            got.sort();
            assert_eq!(got, expected_replicas(&addrs, *k), "replicas of {k}");
        }
    });
    let out = cfs_ok(&[
        "block",
        "locate",
        &keys[7].to_hex(),
        "--node",
        &cluster.addr(1),
    ]);
    let mut lines: Vec<SocketAddr> = out.lines().map(|l| l.parse().unwrap()).collect();
    lines.sort();
    assert_eq!(lines, expected_replicas(&addrs, keys[7]));
    // Cached copies are not replicas: every permanent store together holds r copies.
    let total: u64 = addrs
        .iter()
        .map(|a| {
            let s: serde_json::Value =
                serde_json::from_str(&cfs_ok(&["status", "--json", "--node", &a.to_string()]))
                    .unwrap();
            s["blocks"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(total, 201 * R as u64);
}

#[test]
fn blocks_survive_kill_9_of_r_minus_1_nodes_and_restart() {
    let mut cluster = Cluster::start(6, &["--maintain-ms", "1000"]);
    cluster.wait_ring(Duration::from_secs(30));
    let rt = rt();
    let c = client(&rt, cluster.nodes[0].addr);
    let keys = put_blocks(&rt, &c, 60);
    // Kill r-1 = 2 nodes at once (not the one the client talks to).
    let victims = [2usize, 4];
    let killed: Vec<SocketAddr> = victims.iter().map(|&i| cluster.nodes[i].addr).collect();
    for &i in &victims {
        cluster.kill(i);
    }
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            let v = c
                .get(BlockKind::Data, *k)
                .await
                .unwrap_or_else(|e| panic!("block {i} lost: {e}"));
            assert_eq!(v.bytes(), block_bytes(i));
        }
    });
    // The ring restores r replicas on the live nodes.
    eventually(
        Duration::from_secs(60),
        "r replicas restored after the kill",
        || {
            rt.block_on(async {
                for k in &keys {
                    let (holders, _) = c.locate(BlockKind::Data, *k).await.ok()?;
                    if holders.len() < R || holders.iter().any(|h| killed.contains(&h.addr)) {
                        return None;
                    }
                }
                Some(())
            })
        },
    );
    // A killed node restarted on its --data serves its blocks again.
    cluster.restart(2);
    let addr = cluster.nodes[2].addr;
    let held: Vec<Id> = rt.block_on(async {
        let mut held = Vec::new();
        for k in &keys {
            if let Ok(Response::Block(Some(_))) = c
                .net
                .call(
                    addr,
                    Request::Get {
                        kind: BlockKind::Data,
                        key: *k,
                    },
                )
                .await
            {
                held.push(*k);
            }
        }
        held
    });
    assert!(!held.is_empty(), "restarted node came back with no blocks");
    cluster.wait_ring(Duration::from_secs(60));
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            let v = c.get(BlockKind::Data, *k).await.unwrap();
            assert_eq!(v.bytes(), block_bytes(i));
        }
    });
}

#[test]
fn invalid_blocks_are_refused_and_nothing_is_stored() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let rt = rt();
    let addr = cluster.nodes[0].addr;
    let c = client(&rt, addr);
    let status_blocks = |rt: &tokio::runtime::Runtime| -> u64 {
        rt.block_on(async {
            let mut n = 0;
            for a in cluster.addrs() {
                n += c.status(a).await.unwrap().blocks;
            }
            n
        })
    };
    rt.block_on(async {
        // Bytes that do not hash to the key.
        let r = c
            .net
            .call(
                addr,
                Request::Put {
                    kind: BlockKind::Data,
                    key: Id::hash(b"other"),
                    bytes: b"data".to_vec(),
                    transfer: false,
                    lease: 3600,
                },
            )
            .await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("do not hash"), "{e}");
        // One half of the SHAttered collision is refused by collision detection.
        let coll = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/testdata/sha1-collisions/shattered-1.pdf");
        if let Ok(bytes) = std::fs::read(&coll) {
            let r = c
                .net
                .call(
                    addr,
                    Request::Put {
                        kind: BlockKind::Data,
                        key: Id::hash(&bytes),
                        bytes,
                        transfer: false,
                        lease: 3600,
                    },
                )
                .await;
            assert!(r.unwrap_err().to_string().contains("collision"));
        }
        // A root with a bad signature.
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let mut root = RootBlock::sign(&sk, 5, Id::hash(b"top"), Totals::default(), None, 0);
        root.version = 6;
        let r = c
            .net
            .call(
                addr,
                Request::Put {
                    kind: BlockKind::Root,
                    key: root.key(),
                    bytes: root.encode(),
                    transfer: false,
                    lease: 3600,
                },
            )
            .await;
        assert!(r.unwrap_err().to_string().contains("signature"));
    });
    assert_eq!(status_blocks(&rt), 0, "a refused block was stored");
    rt.block_on(async {
        // A valid root, then a lower version of it.
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let v5 = RootBlock::sign(&sk, 5, Id::hash(b"top"), Totals::default(), None, 0);
        let v = verify(BlockKind::Root, v5.key(), v5.encode(), true).unwrap();
        assert_eq!(c.put(&v).await.unwrap().stored_on, R);
        let v4 = RootBlock::sign(&sk, 4, Id::hash(b"older"), Totals::default(), None, 0);
        let v = verify(BlockKind::Root, v4.key(), v4.encode(), true).unwrap();
        let e = c.put(&v).await.unwrap_err().to_string();
        assert!(e.contains("not newer"), "{e}");
        let got = c.get_root(v5.key()).await.unwrap().unwrap();
        assert_eq!(got.version(), 5);
    });
    assert_eq!(status_blocks(&rt), R as u64);
}

#[test]
fn oversized_and_garbage_frames_close_only_that_connection() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let addr = cluster.nodes[1].addr;
    let closed = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    };
    // A healthy connection opened before the attack keeps working after it.
    let rt = rt();
    let c = client(&rt, addr);
    // Oversized: claims 4 GiB.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    assert!(closed(s), "oversized frame did not close the connection");
    // Garbage that is a well-sized frame but no message.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef])
        .unwrap();
    assert!(closed(s), "garbage did not close the connection");
    // Pure noise.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed(s));
    // Everyone else is still served, and the refusals were counted.
    let st = rt.block_on(c.status(addr)).unwrap();
    let refused = st
        .counters
        .iter()
        .find(|(k, _)| k == "refused_input")
        .unwrap()
        .1;
    assert!(refused >= 3, "refused_input = {refused}");
    let b = b"still serving".to_vec();
    let v = verify(BlockKind::Data, Id::hash(&b), b.clone(), true).unwrap();
    rt.block_on(async {
        c.put(&v).await.unwrap();
        assert_eq!(c.get(BlockKind::Data, v.key()).await.unwrap().bytes(), b);
    });
    let out = cfs(&["block", "get", "nothex", "--node", &addr.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("40 hexadecimal"));
}

#[test]
fn virtual_nodes_give_each_process_several_positions() {
    let cluster = Cluster::start(3, &["--vnodes", "4"]);
    eventually(Duration::from_secs(30), "12 ring positions", || {
        let out = cfs(&["ring", "--node", &cluster.addr(0)]);
        (String::from_utf8_lossy(&out.stdout).lines().count() == 12).then_some(())
    });
    let rt = rt();
    let c = client(&rt, cluster.nodes[2].addr);
    rt.block_on(async {
        for i in 0..30 {
            let b = block_bytes(i);
            let v = verify(BlockKind::Data, Id::hash(&b), b, true).unwrap();
            assert_eq!(c.put(&v).await.unwrap().stored_on, R);
            let (holders, _) = c.locate(BlockKind::Data, v.key()).await.unwrap();
            let mut a: Vec<_> = holders.iter().map(|h| h.addr).collect();
            a.sort();
            a.dedup();
            assert_eq!(a.len(), R, "replicas must be distinct processes");
        }
    });
}

#[test]
fn joiners_receive_their_keys_and_old_holders_hand_off() {
    let mut cluster = Cluster::start(3, &["--maintain-ms", "1000"]);
    cluster.wait_ring(Duration::from_secs(30));
    let rt = rt();
    let c = client(&rt, cluster.nodes[0].addr);
    let keys = put_blocks(&rt, &c, 80);
    cluster.add();
    cluster.add();
    cluster.add();
    cluster.wait_ring(Duration::from_secs(30));
    let addrs = cluster.addrs();
    // Every block ends up on exactly its r successors in the grown ring, and nowhere else.
    eventually(
        Duration::from_secs(60),
        "blocks moved to the new nodes",
        || {
            rt.block_on(async {
                let mut total = 0;
                for a in &addrs {
                    total += c.status(*a).await.ok()?.blocks;
                }
                if total != (keys.len() * R) as u64 {
                    return None;
                }
                for k in &keys {
                    let (holders, _) = c.locate(BlockKind::Data, *k).await.ok()?;
                    let mut got: Vec<SocketAddr> = holders.iter().map(|n| n.addr).collect();
                    got.sort();
                    if got != expected_replicas(&addrs, *k) {
                        return None;
                    }
                }
                Some(())
            })
        },
    );
}

#[test]
fn quota_refuses_with_a_clear_error_and_metrics_are_served() {
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let maddr = format!("127.0.0.1:{metrics_port}");
    let cluster = Cluster::start(
        1,
        &[
            "--quota-mb",
            "1",
            // The quota is 1 MiB for the longest lease, which `cfs block put` asks for.
            "--max-lease",
            "30d",
            "--replicas",
            "1",
            "--successors",
            "4",
            "--metrics",
            &maddr,
        ],
    );
    cluster.wait_ring(Duration::from_secs(30));
    let dir = cluster.dir.path();
    let mut stored = 0;
    let mut refused = None;
    for i in 0..4 {
        let f = dir.join(format!("chunk{i}"));
        std::fs::write(&f, vec![i as u8; 400 * 1024]).unwrap();
        let out = cfs(&[
            "block",
            "put",
            f.to_str().unwrap(),
            "--node",
            &cluster.addr(0),
        ]);
        if out.status.success() {
            stored += 1;
        } else {
            refused = Some(String::from_utf8_lossy(&out.stderr).to_string());
            break;
        }
    }
    assert_eq!(stored, 2, "1 MiB quota holds two 400 KiB blocks");
    let err = refused.expect("the third block must be refused");
    assert!(err.contains("quota"), "{err}");
    // Prometheus text over HTTP.
    let mut s = std::net::TcpStream::connect(&maddr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("cfs_refused_quota 1"), "{body}");
    assert!(body.contains("cfs_blocks 2"), "{body}");
}

#[test]
fn a_ring_restarted_without_join_reassembles_from_remembered_peers() {
    let mut cluster = Cluster::start(4, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let rt = rt();
    let c = client(&rt, cluster.nodes[0].addr);
    let keys = put_blocks(&rt, &c, 20);
    // Each node writes the peers it knows to its data directory.
    eventually(Duration::from_secs(30), "peers files", || {
        cluster
            .nodes
            .iter()
            .all(|n| {
                std::fs::read_to_string(n.data.join("peers")).is_ok_and(|t| t.lines().count() >= 3)
            })
            .then_some(())
    });
    for i in 0..4 {
        cluster.kill(i);
    }
    for i in 0..4 {
        cluster.restart_with(i, None);
    }
    cluster.wait_ring(Duration::from_secs(60));
    let c = client(&rt, cluster.nodes[3].addr);
    rt.block_on(async {
        for (i, k) in keys.iter().enumerate() {
            let v = c.get(BlockKind::Data, *k).await.unwrap();
            assert_eq!(v.bytes(), block_bytes(i));
        }
    });
}

#[test]
fn get_many_answers_in_order_within_a_frame_and_the_client_asks_again_for_the_rest() {
    use cfs_core::wire::{ErrorKind, GET_MANY_BYTES, MAX_BATCH};
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let rt = rt();
    let addr = cluster.nodes[0].addr;
    let c = client(&rt, addr);
    // Five blocks of 300 KiB: with r = 3 on three nodes every node holds them all.
    let blocks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 300 << 10]).collect();
    let keys: Vec<Id> = blocks
        .iter()
        .map(|b| cfs_tests::hostile::put_block(&rt, &c, b.clone()).0)
        .collect();
    let missing = Id::hash(b"never stored");
    let mut asked: Vec<(BlockKind, Id)> = keys.iter().map(|&k| (BlockKind::Data, k)).collect();
    asked.insert(1, (BlockKind::Data, missing));

    rt.block_on(async {
        // One node: answers in order, None for the absent block, and stops short of the
        // frame limit (three blocks of 300 KiB fit 1 MiB, a fourth does not).
        let r = c
            .net
            .call(
                addr,
                Request::GetMany {
                    items: asked.clone(),
                },
            )
            .await;
        let Ok(Response::Blocks(got)) = r else {
            panic!("GetMany answered {r:?}");
        };
        let fit = GET_MANY_BYTES / (300 << 10);
        assert_eq!(got.len(), fit + 1, "the absent block plus {fit} that fit");
        assert!(got[1].is_none());
        for (i, b) in [0, 2, 3].into_iter().zip([0, 1, 2]) {
            assert_eq!(
                got[i].as_ref().map(|b| &b[..]),
                Some(&blocks[b][..]),
                "item {i}"
            );
        }

        // Too many items: refused as a bad request, and the node keeps serving.
        let many = vec![(BlockKind::Data, missing); MAX_BATCH + 1];
        match c.net.call(addr, Request::GetMany { items: many }).await {
            Err(cfs_net::transport::CallError::Remote(e)) => {
                assert_eq!(e.kind, ErrorKind::BadRequest)
            }
            other => panic!("an oversized GetMany got {other:?}"),
        }

        // The client asks again for what a short answer left out, and verifies each.
        let got = c.get_many(&asked).await;
        assert!(got[1].is_none(), "the absent block is None");
        for (i, k) in asked.iter().enumerate().filter(|(i, _)| *i != 1) {
            let v = got[i]
                .as_ref()
                .unwrap_or_else(|| panic!("item {i} missing"));
            assert_eq!(v.key(), k.1);
        }
    });
}

/// Issue 23, many addresses: replicas spread over prefixes (/24) before hosts, so one
/// party holding a prefix holds at most one replica of a key; with fewer prefixes than r
/// in reach the ring falls back to distinct hosts. Loopback addresses stand in for
/// prefixes: 127.0.1.0/24 holds four hosts, 127.0.2.1 and 127.0.3.1 one each.
#[test]
fn replicas_spread_over_prefixes_before_hosts() {
    let mut cluster = Cluster::start(0, &[]);
    for ip in [
        "127.0.1.1",
        "127.0.1.2",
        "127.0.2.1",
        "127.0.1.3",
        "127.0.3.1",
        "127.0.1.4",
    ] {
        cluster.add_at(ip);
    }
    cluster.wait_ring(Duration::from_secs(30));
    let prefix = |a: &SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[2],
        _ => unreachable!(),
    };
    let rt = rt();
    let c = client(&rt, cluster.nodes[0].addr);
    let keys = put_blocks(&rt, &c, 40);
    let addrs = cluster.addrs();
    let mut ring: Vec<NodeRef> = addrs.iter().map(|a| NodeRef::new(*a, 0)).collect();
    ring.sort_by_key(|n| n.id);
    let mut by_ip_would_share = 0;
    for key in &keys {
        let mut holders: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| cfs_tests::hostile::held(*a, BlockKind::Data, *key))
            .collect();
        holders.sort();
        // The key's successors from its successor on. The ring is smaller than a
        // successor list, so the key's predecessor is also its last successor: it is in
        // the list when the key's successor answers the lookup and left out when the
        // predecessor answers (it does not list itself). Either view is a valid set.
        let i = ring.iter().position(|n| n.id >= *key).unwrap_or(0);
        let all: Vec<NodeRef> = (0..ring.len())
            .map(|j| ring[(i + j) % ring.len()])
            .collect();
        let views = [&all[..all.len() - 1], &all[..]];
        let want = |list: &[NodeRef]| {
            let mut w: Vec<SocketAddr> = replica_set(list, R).iter().map(|n| n.addr).collect();
            w.sort();
            w
        };
        let list = views
            .iter()
            .find(|l| want(l) == holders)
            .unwrap_or_else(|| {
                panic!(
                    "block {key:?} on {holders:?}, not on {:?} or {:?}",
                    want(views[0]),
                    want(views[1])
                )
            });
        let mut prefixes: Vec<u8> = holders.iter().map(prefix).collect();
        prefixes.sort();
        prefixes.dedup();
        let mut reach: Vec<u8> = list.iter().map(|n| prefix(&n.addr)).collect();
        reach.sort();
        reach.dedup();
        assert_eq!(
            prefixes.len(),
            reach.len().min(R),
            "block {key:?} on {holders:?}: two in one prefix"
        );
        // The first three hosts (the rule before) would put two in 127.0.1 here.
        by_ip_would_share +=
            usize::from(list[..R].iter().filter(|n| prefix(&n.addr) == 1).count() > 1);
    }
    assert!(by_ip_would_share > 0, "the set-up should test something");
    // With 127.0.2.1 gone only two prefixes are left: a put goes to three hosts again.
    let gone = cluster
        .nodes
        .iter()
        .position(|n| prefix(&n.addr) == 2)
        .unwrap();
    cluster.kill(gone);
    cluster.wait_ring(Duration::from_secs(30));
    let more = rt.block_on(async {
        let b = b"after a prefix left".to_vec();
        let v = verify(BlockKind::Data, Id::hash(&b), b, true).unwrap();
        c.put(&v).await.unwrap().stored_on
    });
    assert_eq!(more, R);
}
