//! Issue 30: a hung replica is routed around by puts, not waited for: its copies go to
//! stand-ins (the next hosts of the successor list), so every block a publish puts is on
//! r live nodes when the put returns, and the stand-ins' repair hands the copies on once
//! the replica answers again. Real cfsd processes, a real SIGSTOP.

use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::{Id, NodeRef};
use cfs_tests::hostile::{held, true_replicas};
use cfs_tests::{client, eventually, rt, Cluster};
use std::net::SocketAddr;
use std::time::Duration;

const R: usize = 3;

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Sends SIGCONT when dropped, so a failing test leaves no stopped process behind.
struct Paused(u32);

impl Drop for Paused {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

#[test]
fn a_hung_replica_is_routed_around_and_gets_its_copies_later() {
    let cluster = Cluster::start(6, &["--stabilize-ms", "300", "--maintain-ms", "1000"]);
    cluster.wait_ring(Duration::from_secs(30));
    let addrs = cluster.addrs();
    let members: Vec<NodeRef> = addrs.iter().map(|a| NodeRef::new(*a, 0)).collect();
    let rt = rt();
    let c = client(&rt, addrs[0]);
    // Blocks of 64 KiB, the ones the hung node would replicate among them.
    let hung = 3;
    let blocks: Vec<Verified> = (0..24u32)
        .map(|i| {
            let b = format!("block {i} of a publish ").repeat(2800).into_bytes();
            verify(BlockKind::Data, Id::hash(&b), b, true).unwrap()
        })
        .collect();
    let theirs: Vec<Id> = blocks
        .iter()
        .map(Verified::key)
        .filter(|k| {
            true_replicas(&members, *k, R)
                .iter()
                .any(|n| n.addr == addrs[hung])
        })
        .collect();
    assert!(!theirs.is_empty(), "the set-up should test something");

    let paused = Paused(cluster.nodes[hung].pid().expect("running"));
    signal(paused.0, "-STOP");
    let receipts = rt
        .block_on(c.put_many(&blocks))
        .expect("put while a replica hangs");
    for (b, rc) in blocks.iter().zip(&receipts) {
        assert_eq!(
            rc.stored_on,
            R,
            "block {:?} stored on {}",
            b.key(),
            rc.stored_on
        );
    }
    // On r live nodes each, the hung one's among them.
    let live: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| *a != addrs[hung])
        .collect();
    for b in &blocks {
        let on = live
            .iter()
            .filter(|a| held(**a, BlockKind::Data, b.key()))
            .count();
        assert!(on >= R, "block {:?} on {on} live nodes", b.key());
    }

    // Answering again, the replica gets its copies from the stand-ins' repair.
    drop(paused);
    for k in &theirs {
        eventually(
            Duration::from_secs(60),
            "the replica to get its copy",
            || held(addrs[hung], BlockKind::Data, *k).then_some(()),
        );
    }
}
