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

#[test]
fn leases_let_storage_level_off_without_losing_a_kept_block() {
    let a = cfs_sim::gc::GcArgs {
        nodes: 64,
        publishers: 8,
        blocks: 40,
        block_bytes: 256,
        churn: 0.1,
        keep: 3,
        days: 14,
        lease_days: 2,
        rounds_per_day: 2,
    };
    let r = cfs_sim::gc::gc(&common(5), &a).unwrap();
    eprintln!("{}", cfs_sim::gc::gc_table(&r));
    assert_eq!(r.ever_missing, 0, "no kept block ever missing");
    let last = r.days.last().unwrap();
    assert_eq!(last.below_r, 0, "every kept block on r nodes: {last:?}");
    // Kept versions reach the tree plus 2 days of churn; with the lease's 2 days of
    // slack the ring holds at most about 4 days of churn beyond the tree.
    let bound = (8 * (40 + 4 * 4)) as u64;
    assert!(
        last.distinct <= bound,
        "{} distinct blocks, bound {bound}",
        last.distinct
    );
    assert!(
        last.published * 2 > 3 * last.distinct,
        "older blocks were collected: {last:?}"
    );
    assert!(r.days.iter().map(|d| d.expired_today).sum::<u64>() > 0);
    assert!(r.last_week_growth < 1.1, "{}", r.last_week_growth);
}
