//! Forked roots (one key signs two roots of the same version): replicas converge on one
//! side by a rule every node applies alike, a reader that saw the other side reports the
//! fork instead of switching, and racing publishers of one key never both believe they
//! published the same version.

use cfs_core::block::{verify, RootBlock, Totals};
use cfs_core::wire::{Request, Response};
use cfs_core::{BlockKind, Id, NodeRef, Verified};
use cfs_tests::tree::TempDir;
use cfs_tests::{bin, cfs, client, eventually, rt, Cluster};
use cfs_tree::service::net::NetRing;
use cfs_tree::service::{BlockService, RingError};
use std::process::{Command, Stdio};
use std::time::Duration;

fn root(key: &cfs_core::block::SigningKey, version: u64, top: &[u8]) -> Verified {
    let r = RootBlock::sign(key, version, Id::hash(top), Totals::default(), None, 0);
    verify(BlockKind::Root, r.key(), r.encode(), false).unwrap()
}

/// What node `addr` holds for root `fsid`.
async fn held_root(
    c: &cfs_net::client::Client,
    addr: std::net::SocketAddr,
    fsid: Id,
) -> Option<Vec<u8>> {
    match c
        .net
        .call(
            addr,
            Request::Get {
                kind: BlockKind::Root,
                key: fsid,
            },
        )
        .await
    {
        Ok(Response::Block(b)) => b,
        _ => None,
    }
}

#[test]
fn a_forked_root_converges_on_one_side_and_a_reader_that_saw_the_other_reports_it() {
    let c = Cluster::start(3, &["--maintain-ms", "300"]);
    c.wait_ring(Duration::from_secs(30));
    let key = cfs_tree::load_key(&c.keygen()).unwrap();
    let fsid = cfs_tree::fsid_of(&key);
    let (a, b) = (root(&key, 2, b"side a"), root(&key, 2, b"side b"));
    let (win, lose) = if a.rank() > b.rank() { (a, b) } else { (b, a) };
    let rt = rt();
    let cl = client(&rt, c.nodes[0].addr);
    let nodes: Vec<NodeRef> = c.addrs().iter().map(|a| NodeRef::new(*a, 0)).collect();
    let lease = 3600;
    // The two sides reach different replicas, as when two machines publish at once:
    // each replica keeps the first root of a version it gets.
    rt.block_on(cl.net.put_to(&nodes[..1], &win, 1, false, lease))
        .unwrap();
    rt.block_on(cl.net.put_to(&nodes[1..], &lose, 2, false, lease))
        .unwrap();
    // Ring maintenance settles the fork alike everywhere: the side whose bytes hash lower.
    let t = std::time::Instant::now();
    eventually(
        Duration::from_secs(30),
        "every replica on the winning side",
        || {
            rt.block_on(async {
                for n in &nodes {
                    if held_root(&cl, n.addr, fsid).await.as_deref() != Some(win.bytes()) {
                        return None;
                    }
                }
                Some(())
            })
        },
    );
    eprintln!(
        "FORK: 3 replicas converged on the winning side in {:?}",
        t.elapsed()
    );
    // The loser is refused wherever it is offered again.
    let again = rt.block_on(cl.net.put_to(&nodes, &lose, 3, false, lease));
    assert!(
        again.map_or(true, |r| r.stored_on == 0),
        "the losing side is refused"
    );
    // A reader that saw the losing side before (its memory of the newest root, as a
    // read of it leaves it) does not switch silently: the error names both.
    let state = TempDir::new("fork-reader");
    std::fs::create_dir_all(state.path().join("roots")).unwrap();
    std::fs::write(state.path().join("roots").join(fsid.to_hex()), lose.bytes()).unwrap();
    let reader = NetRing::new(cl.clone(), Some(state.path().to_path_buf()));
    match rt.block_on(reader.get_root(fsid)) {
        Err(RingError::Fork {
            fsid: f,
            version,
            seen,
            offered,
        }) => {
            assert_eq!((f, version), (fsid, 2));
            assert_eq!(seen, Id::hash(lose.bytes()));
            assert_eq!(offered, Id::hash(win.bytes()));
        }
        other => panic!("expected a fork error, got {other:?}"),
    }
    // A reader without that memory takes the winner, as every replica does.
    let fresh = NetRing::new(cl.clone(), None);
    let got = rt.block_on(fresh.get_root(fsid)).unwrap().unwrap();
    assert_eq!(got.bytes(), win.bytes());
}

/// Two `cfs publish` of different trees with one key, started at once, several times:
/// both succeed, never with the same version, and each version reads back as the tree
/// its publisher said it published.
#[test]
fn racing_publishers_of_one_key_never_both_claim_a_version() {
    let c = Cluster::start(3, &["--maintain-ms", "300"]);
    c.wait_ring(Duration::from_secs(30));
    let key = c.keygen();
    let node = c.addr(0);
    let dirs: Vec<TempDir> = (0..2).map(|i| TempDir::new(&format!("race{i}"))).collect();
    let states: Vec<TempDir> = (0..2)
        .map(|i| TempDir::new(&format!("race-state{i}")))
        .collect();
    let mut claimed = std::collections::BTreeMap::new();
    let mut fsid = String::new();
    for round in 0..5 {
        for (i, d) in dirs.iter().enumerate() {
            std::fs::write(
                d.path().join("who"),
                format!("publisher {i} round {round}\n"),
            )
            .unwrap();
        }
        let runs: Vec<_> = (0..2)
            .map(|i| {
                Command::new(bin("cfs"))
                    .args(["publish", dirs[i].path().to_str().unwrap(), "--key"])
                    .arg(&key)
                    .args(["--node", &node, "-q"])
                    .env("CFS_STATE_DIR", states[i].path())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            let out = r.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}, publisher {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            let mut it = text.split_whitespace();
            fsid = it.next().unwrap().to_string();
            let version: u64 = it.next().unwrap().parse().unwrap();
            let want = format!("publisher {i} round {round}\n");
            assert!(
                claimed.insert(version, want).is_none(),
                "version {version} claimed twice"
            );
        }
    }
    // Every claimed version is the tree its publisher published.
    for (version, want) in &claimed {
        let got = eventually(Duration::from_secs(20), "the version to read", || {
            let out = cfs(&["get", &format!("{fsid}@{version}:/who"), "--node", &node]);
            out.status.success().then_some(out.stdout)
        });
        assert_eq!(String::from_utf8(got).unwrap(), *want, "version {version}");
    }
    eprintln!(
        "FORK: 5 rounds of 2 racing publishers: versions {:?}, each read back as claimed",
        claimed.keys().collect::<Vec<_>>()
    );
}
