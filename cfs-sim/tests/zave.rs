//! Zave's invariant, checked after every step of random join / fail / stabilize schedules
//! run on the node's own code: every live member has a live entry in its successor list.
//! Her failure model allows a failure only where it leaves that true (no member loses its
//! last live successor) and the ring keeps at least s+1 members; the protocol must then
//! keep it true through every join and stabilize. After the schedule, stabilization alone
//! makes the ring ideal.

use cfs_sim::sim::{run, NodeParams, Sim};
use cfs_sim::transport::{sim_index, NetParams};
use rand::Rng;

const S: usize = 4;

/// Would killing `v` leave some other live member without a live successor entry?
fn allowed_failure(sim: &Sim, v: usize) -> bool {
    sim.live().into_iter().filter(|&i| i != v).all(|i| {
        sim.node(i)
            .successors(0)
            .iter()
            .any(|n| sim_index(n.addr).is_some_and(|j| j != v && !sim.net.is_dead(j)))
    })
}

fn check_invariant(sim: &Sim, step: usize, what: &str) {
    for i in sim.live() {
        let succs = sim.node(i).successors(0);
        let live_entry = succs
            .iter()
            .any(|n| sim_index(n.addr).is_some_and(|j| !sim.net.is_dead(j)));
        assert!(
            live_entry,
            "step {step} ({what}): node {i} has no live successor in {succs:?}"
        );
    }
}

fn schedule(seed: u64, steps: usize) {
    run(async move {
        let params = NodeParams {
            succ_list_len: S,
            replicas: 2,
            ..NodeParams::default()
        };
        let mut sim = Sim::new(
            NetParams {
                seed,
                ..NetParams::default()
            },
            params,
        );
        // A small ring, including the 1..s sizes the proof leaves out, grown by joins.
        sim.grow(S + 3, Default::default()).await.unwrap();
        sim.freeze();
        check_invariant(&sim, 0, "grown");
        for step in 1..=steps {
            let live = sim.live();
            let dice = sim.rng.random_range(0..10);
            let what = if dice == 0 {
                // A join whose lookup finds no live route (the frozen ring still points at
                // dead members) does not happen; the joiner stays outside.
                let i = sim.spawn_node();
                let joined = sim.join_all(&[i]).await.is_ok();
                sim.freeze();
                if !joined {
                    continue;
                }
                "join"
            } else if dice <= 2 && live.len() > S + 1 {
                let v = live[sim.rng.random_range(0..live.len())];
                if !allowed_failure(&sim, v) {
                    continue;
                }
                sim.kill(v);
                "fail"
            } else {
                let v = live[sim.rng.random_range(0..live.len())];
                sim.node(v).stabilize(0).await;
                "stabilize"
            };
            check_invariant(&sim, step, what);
        }
        // Quiet: stabilization alone repairs everything.
        for _ in 0..(4 * sim.len()) {
            for i in sim.live() {
                sim.node(i).stabilize(0).await;
            }
            if sim.ring_errors().0 == 0 {
                break;
            }
        }
        if sim.ring_errors().0 != 0 {
            let t = sim.truth();
            for n in &t.ring {
                let i = sim_index(n.addr).unwrap();
                eprintln!(
                    "{:?} node {i}: pred {:?} succs {:?}",
                    n,
                    sim.node(i).predecessor(0),
                    sim.node(i).successors(0)
                );
            }
        }
        assert_eq!(
            sim.ring_errors().0,
            0,
            "seed {seed}: successors not ideal after stabilization"
        );
        sim.shutdown();
    })
    .unwrap();
}

#[test]
fn zave_invariant_under_random_schedules() {
    for seed in 1..=30 {
        schedule(seed, 500);
    }
}
