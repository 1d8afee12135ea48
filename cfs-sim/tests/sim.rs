//! Small rings (CI-sized): determinism, sane lookups, and failure recovery.

use cfs_sim::experiments::{self, Common, FailureArgs};

fn common(seed: u64) -> Common {
    let mut c = Common::new(seed);
    // Small rings converge quickly; keep debug-build runs to seconds.
    c.plan.rounds_between_waves = 6;
    c.plan.rounds_after = 20;
    c
}

#[test]
fn same_seed_same_trace_and_json() {
    let a = experiments::lookup(&common(7), 64, 200).unwrap();
    let b = experiments::lookup(&common(7), 64, 200).unwrap();
    let ja = serde_json::to_string(&a).unwrap();
    let jb = serde_json::to_string(&b).unwrap();
    assert_eq!(ja, jb);
    assert_eq!(a.run.trace_hash.len(), 40);
    assert!(a.run.messages > 1000);
    let c = experiments::lookup(&common(8), 64, 200).unwrap();
    assert_ne!(
        a.run.trace_hash, c.run.trace_hash,
        "another seed, another trace"
    );
}

#[test]
fn lookups_succeed_with_log_hops() {
    let r = experiments::lookup(&common(3), 128, 500).unwrap();
    assert_eq!(r.failed, 0);
    assert_eq!(r.wrong, 0, "{r:?}");
    assert!(
        r.mean_hops > 1.0 && r.mean_hops <= r.half_log2_n + 0.5,
        "{r:?}"
    );
    assert!(r.p99_hops <= 2.0 * (128f64).log2(), "{r:?}");
}

#[test]
fn failure_small_ring_recovers() {
    let mut c = common(5);
    c.node.replicas = 4;
    let r = experiments::failure(
        &c,
        &FailureArgs {
            nodes: 64,
            fail: 0.25,
            blocks: 320,
            rounds: 30,
        },
    )
    .unwrap();
    assert_eq!(r.puts_short, 0, "{r:?}");
    assert_eq!(r.failed_lookups, 0.0, "{r:?}");
    assert!(
        r.lost_blocks <= r.expected_lost + 4.0 * r.lost_sigma + 1e-9,
        "{r:?}"
    );
}

/// 10% of a small ring turns hostile (claims every key, withholds blocks, drops puts):
/// honest nodes still find true successors and read every block that has an honest
/// replica.
#[test]
fn hostile_nodes_do_not_stop_honest_lookups_or_reads() {
    let r = experiments::hostile(&common(3), 64, 0.1, 300, 200).unwrap();
    assert!(r.lookups_true_successor >= 0.95, "{r:?}");
    let readable_bound = 1.0 - r.blocks_all_replicas_hostile as f64 / r.blocks as f64;
    assert!(r.blocks_readable >= readable_bound - 0.01, "{r:?}");
}
