//! Old roots at joins: a node that comes back with an old root in its store does not serve
//! it as the newest while the holders it joins in front of have a newer one, and a reader
//! whose replicas are all new since its last sighting asks the holders it saw then.

use cfs_core::block::{verify, RootBlock, Totals};
use cfs_core::wire::{Request, Response};
use cfs_core::{BlockKind, Id, NodeRef, Verified};
use cfs_tests::tree::TempDir;
use cfs_tests::{client, eventually, rt, Cluster};
use cfs_tree::service::net::NetRing;
use cfs_tree::service::BlockService;
use std::net::SocketAddr;
use std::time::Duration;

fn root(key: &cfs_core::block::SigningKey, version: u64) -> Verified {
    let top = format!("version {version}");
    let r = RootBlock::sign(
        key,
        version,
        Id::hash(top.as_bytes()),
        Totals::default(),
        None,
        0,
    );
    verify(BlockKind::Root, r.key(), r.encode(), false).unwrap()
}

/// The distinct processes in front of `fsid`, in ring order.
fn holders_in_order(
    rt: &tokio::runtime::Runtime,
    c: &cfs_net::client::Client,
    fsid: Id,
) -> Vec<SocketAddr> {
    let l = rt.block_on(c.lookup(fsid)).unwrap();
    let mut out: Vec<SocketAddr> = Vec::new();
    for n in l.succs {
        if !out.contains(&n.addr) {
            out.push(n.addr);
        }
    }
    out
}

fn refs(addrs: &[SocketAddr]) -> Vec<NodeRef> {
    addrs.iter().map(|a| NodeRef::new(*a, 0)).collect()
}

/// A ring of `n` nodes started with `flags`, a client of it, versions 1 and 2 of a root
/// (not yet stored) and the processes in front of its FSID.
struct Setup {
    c: Cluster,
    rt: tokio::runtime::Runtime,
    cl: cfs_net::client::Client,
    v1: Verified,
    v2: Verified,
    order: Vec<SocketAddr>,
}

fn setup(n: usize, flags: &[&str]) -> Setup {
    let c = Cluster::start(n, flags);
    c.wait_ring(Duration::from_secs(30));
    let key = cfs_tree::load_key(&c.keygen()).unwrap();
    let (v1, v2) = (root(&key, 1), root(&key, 2));
    let rt = rt();
    let cl = client(&rt, c.nodes[0].addr);
    let order = holders_in_order(&rt, &cl, v1.key());
    Setup {
        c,
        rt,
        cl,
        v1,
        v2,
        order,
    }
}

#[test]
fn a_node_back_with_an_old_root_serves_the_newer_one_its_holders_have() {
    // Maintenance far off: only the join-time check can bring version 2 to the node.
    let Setup {
        mut c,
        rt,
        cl,
        v1,
        v2,
        order,
    } = setup(4, &["--replicas", "2", "--maintain-ms", "600000"]);
    let fsid = v1.key();
    let all = refs(&c.addrs());
    rt.block_on(cl.net.put_to(&all, &v1, 4, false, 3600))
        .unwrap();
    // The first replica goes down; version 2 is published on the others meanwhile.
    let h = order[0];
    let i = c.nodes.iter().position(|n| n.addr == h).unwrap();
    c.kill(i);
    let rest: Vec<SocketAddr> = c.addrs();
    rt.block_on(cl.net.put_to(&refs(&rest), &v2, rest.len(), false, 3600))
        .unwrap();
    // It comes back with version 1 in its store: its first answer is already version 2.
    c.restart(i);
    let t = std::time::Instant::now();
    let first = eventually(
        Duration::from_secs(30),
        "the node to answer again",
        || match rt.block_on(cl.net.call(
            h,
            Request::Get {
                kind: BlockKind::Root,
                key: fsid,
            },
        )) {
            Ok(Response::Block(b)) => Some(b),
            _ => None,
        },
    );
    let got = verify(BlockKind::Root, fsid, first.expect("a root"), false).unwrap();
    assert_eq!(
        got.version(),
        2,
        "a node back from the dead served its old root"
    );
    eprintln!(
        "JOIN: restarted replica answered version {} {:?} after restart (its store held 1)",
        got.version(),
        t.elapsed()
    );
}

#[test]
fn a_reader_whose_replicas_are_all_new_asks_the_holders_it_saw() {
    // r = 1: a reader asks the first two processes in front of the FSID. No join-time
    // check (it would fetch version 2 for the front): the reader alone is tested.
    let Setup {
        c: _c,
        rt,
        cl,
        v1,
        v2,
        order,
    } = setup(
        6,
        &[
            "--replicas",
            "1",
            "--maintain-ms",
            "600000",
            "--root-settle-ms",
            "0",
        ],
    );
    let fsid = v1.key();
    assert!(order.len() >= 4, "ring view too small: {order:?}");
    // Nodes that joined in front of the FSID hold the old version; the holders the
    // reader saw last time (further along now) hold the new one.
    let (front, seen) = (&order[..2], &order[2..4]);
    rt.block_on(cl.net.put_to(&refs(front), &v1, 2, false, 3600))
        .unwrap();
    rt.block_on(cl.net.put_to(&refs(seen), &v2, 2, false, 3600))
        .unwrap();
    let blind = NetRing::new(cl.clone(), None);
    let got = rt.block_on(blind.get_root(fsid)).unwrap().unwrap();
    assert_eq!(got.version(), 1, "the set-up: the front holds version 1");
    let state = TempDir::new("join-reader");
    let roots = state.path().join("roots");
    std::fs::create_dir_all(&roots).unwrap();
    let text: String = seen.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(roots.join(format!("{}.holders", fsid.to_hex())), text).unwrap();
    let reader = NetRing::new(cl.clone(), Some(state.path().to_path_buf()));
    let got = rt.block_on(reader.get_root(fsid)).unwrap().unwrap();
    assert_eq!(got.version(), 2, "the reader took the new nodes' word");
    // It remembers who gave it the newest.
    let kept = std::fs::read_to_string(roots.join(format!("{}.holders", fsid.to_hex()))).unwrap();
    for a in seen {
        assert!(
            kept.contains(&a.to_string()),
            "{a} not remembered in {kept:?}"
        );
    }
}
