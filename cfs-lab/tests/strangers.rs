//! Issue 23, many addresses: what a ring neighbour may store free of quota, on real hosts
//! (free transfers exist only off loopback, where an address names a host). Needs root
//! and iproute2; skipped, with a message, where they are missing.

mod common;

use cfs_lab::testnet::{self, Testnet};
use cfs_tests::bin;
use cfs_tests::hostile::counter_in;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

fn run_in(net: &Testnet, host: usize, program: &str, args: &[&str]) -> Output {
    net.command(host, bin(program))
        .args(args)
        .output()
        .expect("running a program in a host")
}

fn ok_in(net: &Testnet, host: usize, program: &str, args: &[&str]) -> String {
    let out = run_in(net, host, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} in host {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn counters(net: &Testnet, host: usize, names: &[&str]) -> Vec<u64> {
    let a = net.addr(host).to_string();
    let out = ok_in(net, host, "cfs", &["status", "--json", "--node", &a]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    names.iter().map(|n| counter_in(&v, n)).collect()
}

#[test]
fn a_neighbours_push_is_free_only_when_another_holder_confirms_it() {
    if let Some(why) = testnet::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // Maintenance out of the way (only our pushes move blocks), and a quota of 1 MiB for
    // an hour per source: the four hosts share one /24, so one bucket.
    let (tmp, _guard, spec) = common::spec(
        "strangers",
        4,
        13,
        &[
            "--stabilize-ms",
            "200",
            "--maintain-ms",
            "3600000",
            "--quota-mb",
            "1",
            "--max-lease",
            "1h",
        ],
    );
    let net = Testnet::up(&spec).expect("testnet up");
    let all: BTreeSet<SocketAddr> = (0..4).map(|i| net.addr(i)).collect();
    cfs_tests::eventually(Duration::from_secs(40), "the 4-host ring", || {
        (0..4)
            .all(|h| {
                let a = net.addr(h).to_string();
                let out = run_in(&net, h, "cfs", &["ring", "--node", &a]);
                let seen: BTreeSet<SocketAddr> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
                    .collect();
                seen == all
            })
            .then_some(())
    });
    let names = ["transfers_free", "transfers_unconfirmed"];

    // A block put through host 2 sits on three of the four hosts.
    let files = tmp.path().join("blocks");
    std::fs::create_dir_all(&files).unwrap();
    let f = files.join("b");
    std::fs::write(&f, "a replica copy ".repeat(4000)).unwrap();
    let a2 = net.addr(2).to_string();
    let key = ok_in(
        &net,
        2,
        "cfs",
        &["block", "put", f.to_str().unwrap(), "--node", &a2],
    )
    .trim()
    .to_string();
    let holders: BTreeSet<SocketAddr> =
        ok_in(&net, 2, "cfs", &["block", "locate", &key, "--node", &a2])
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
    assert_eq!(holders.len(), 3, "{holders:?}");
    let lacking = (0..4).find(|h| !holders.contains(&net.addr(*h))).unwrap();
    let pusher = (0..4).find(|h| holders.contains(&net.addr(*h))).unwrap();
    let (to, src) = (net.addr(lacking).to_string(), net.addr(pusher).to_string());

    // Junk only the pusher has: charged to it like any put while it has room, then
    // refused, never taken free.
    let before = counters(&net, lacking, &names);
    let out = ok_in(&net, pusher, "push-transfer", &[&to, "junk", "40", "65536"]);
    let stored = out.lines().filter(|l| *l == "stored").count();
    assert!(stored > 0 && stored < 40, "{out}");
    assert!(out.lines().any(|l| l.contains("quota")), "{out}");
    let after = counters(&net, lacking, &names);
    assert_eq!(
        after[0], before[0],
        "junk taken free: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[1],
        before[1] + (40 - stored) as u64,
        "{before:?} -> {after:?}"
    );

    // A replica copy the ring holds elsewhere, past the pusher's room: taken on its
    // network's allowance.
    let out = ok_in(&net, pusher, "push-transfer", &[&to, "copy", &src, &key]);
    assert_eq!(out.trim(), "stored");
    let last = counters(&net, lacking, &names);
    assert_eq!(last, [after[0] + 1, after[1]], "{after:?} -> {last:?}");
}
