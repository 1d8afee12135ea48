//! Issue 23, many addresses: what a ring neighbour may store free of quota, on real hosts
//! (free transfers exist only off loopback, where an address names a host). Needs root
//! and iproute2; skipped, with a message, where they are missing.

use cfs_lab::testnet::{self, Spec, Testnet};
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
    let tmp = cfs_tests::tree::TempDir::new("strangers");
    let name = format!("s{}", std::process::id());
    let dir = tmp.path().join("net");
    let _guard = testnet::DownGuard {
        name: name.clone(),
        dir: dir.clone(),
    };
    let spec = Spec {
        name: name.clone(),
        hosts: 4,
        subnet: 13,
        port: 4000,
        dir: dir.clone(),
        cfsd: bin("cfsd"),
        // Maintenance out of the way: only our pushes move blocks.
        cfsd_args: ["--stabilize-ms", "200", "--maintain-ms", "3600000"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        rate: None,
        disk_mb: None,
        wan: None,
    };
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

    // Junk that only the pusher has: charged to it like any put, none free.
    let (to, from) = (net.addr(1).to_string(), 0);
    let before = counters(&net, 1, &names);
    let out = ok_in(&net, from, "push-transfer", &[&to, "junk", "8", "65536"]);
    assert_eq!(out.lines().filter(|l| *l == "stored").count(), 8, "{out}");
    let after = counters(&net, 1, &names);
    assert_eq!(
        after[0], before[0],
        "junk taken free: {before:?} -> {after:?}"
    );
    assert_eq!(after[1], before[1] + 8, "{before:?} -> {after:?}");

    // A replica copy the ring holds elsewhere: free. A block put through host 2 sits on
    // three of the four hosts; one of its holders pushes it to the fourth.
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
    let before = counters(&net, lacking, &names);
    let (to, src) = (net.addr(lacking).to_string(), net.addr(pusher).to_string());
    let out = ok_in(&net, pusher, "push-transfer", &[&to, "copy", &src, &key]);
    assert_eq!(out.trim(), "stored");
    let after = counters(&net, lacking, &names);
    assert_eq!(after, [before[0] + 1, before[1]], "{before:?} -> {after:?}");
}
