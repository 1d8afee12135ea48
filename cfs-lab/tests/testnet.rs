//! `cfs testnet` on real network namespaces (needs root and iproute2; skipped, with a
//! message, where they are missing): hosts with their own addresses, replicas on
//! distinct hosts, a node id that does not depend on the port, and every fault kind
//! (kill, pause, restart, replace, partition and heal, link cap), then `down` removing
//! everything, also when the test fails.

mod common;

use cfs_lab::testnet::{self, Testnet};
use cfs_tests::{bin, eventually};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Output;
use std::time::Duration;

fn can_run() -> bool {
    match testnet::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
        None => true,
    }
}

fn cfs_in(net: &Testnet, host: usize, args: &[&str]) -> Output {
    net.command(host, bin("cfs"))
        .args(args)
        .output()
        .expect("running cfs in a host")
}

fn ring_ips(net: &Testnet, host: usize) -> Option<BTreeSet<IpAddr>> {
    let out = cfs_in(net, host, &["ring", "--node", &net.addr(host).to_string()]);
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(' ').nth(1)?.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect(),
    )
}

/// Poll `f` until it holds or `deadline` passes; whether it held.
fn poll(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + deadline;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every host's view of its neighbours, for a failure message.
fn dump_rings(net: &Testnet) {
    for h in 0..net.hosts.len() {
        let out = cfs_in(net, h, &["status", "--node", &net.addr(h).to_string()]);
        // The end of its log (warnings and up) too.
        let log = std::fs::read_to_string(net.dir.join(format!("{}.log", net.hosts[h].name)))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "--- host {} ({}):\n{}{}--- its log, last lines first:\n{}",
            h,
            net.addr(h),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail.join("\n")
        );
    }
}

fn node_id(net: &Testnet, host: usize) -> Option<String> {
    let out = cfs_in(
        net,
        host,
        &["status", "--json", "--node", &net.addr(host).to_string()],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["id"].as_str().map(str::to_string)
}

#[test]
fn a_testnet_of_real_hosts_places_replicas_on_distinct_hosts_and_survives_every_fault() {
    if !can_run() {
        return;
    }
    let (tmp, _guard, spec) = common::spec(
        "testnet",
        5,
        7,
        &[
            "--vnodes",
            "2",
            "--stabilize-ms",
            "200",
            "--maintain-ms",
            "500",
        ],
    );
    let (name, dir) = (spec.name.clone(), spec.dir.clone());
    let mut net = Testnet::up(&spec).expect("testnet up");
    let all: BTreeSet<IpAddr> = (0..5).map(|i| net.addr(i).ip()).collect();
    eventually(
        Duration::from_secs(40),
        "every host to see the 5-host ring",
        || {
            (0..5)
                .all(|h| ring_ips(&net, h).as_ref() == Some(&all))
                .then_some(())
        },
    );
    // Nothing of the testnet is visible in the root namespace.
    let root_addrs = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-o", "addr"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    let root_routes = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .arg("route")
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(!root_addrs.contains("198.18.7.") && !root_routes.contains("198.18.7."));

    // Blocks from a client on host 1 land on 3 distinct hosts (each host has 2 vnodes).
    let files = tmp.path().join("blocks");
    std::fs::create_dir_all(&files).unwrap();
    let mut keys = Vec::new();
    for i in 0..12u32 {
        let f = files.join(format!("b{i}"));
        std::fs::write(&f, format!("block {i} ").repeat(1000)).unwrap();
        let out = cfs_in(
            &net,
            0,
            &[
                "block",
                "put",
                f.to_str().unwrap(),
                "--node",
                &net.addr(0).to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        keys.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let on_distinct_hosts = |net: &Testnet, from: usize| {
        keys.iter().all(|k| {
            let out = cfs_in(
                net,
                from,
                &["block", "locate", k, "--node", &net.addr(from).to_string()],
            );
            let ips: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.rsplit_once(':').map(|(ip, _)| ip.to_string()))
                .collect();
            out.status.success() && ips.len() == 3
        })
    };
    eventually(
        Duration::from_secs(30),
        "every block on 3 distinct hosts",
        || on_distinct_hosts(&net, 0).then_some(()),
    );
    let readable = |net: &Testnet, from: usize| {
        keys.iter().all(|k| {
            cfs_in(
                net,
                from,
                &["block", "get", k, "--node", &net.addr(from).to_string()],
            )
            .status
            .success()
        })
    };

    // Off loopback the port is not part of the id: a restart on another port keeps it.
    let id3 = node_id(&net, 2).unwrap();
    net.kill(2).unwrap();
    net.hosts[2].port = 4001;
    net.start(2).unwrap();
    eventually(
        Duration::from_secs(20),
        "host 3 to answer on its new port",
        || node_id(&net, 2),
    );
    assert_eq!(node_id(&net, 2).unwrap(), id3);

    // kill -9: reads go on; restart on the old data.
    net.kill(3).unwrap();
    assert!(readable(&net, 0), "reads survive a killed host");
    net.restart(3).unwrap();
    // SIGSTOP: a hung host that holds its sockets; reads still succeed (slower).
    net.pause(4).unwrap();
    assert!(readable(&net, 0), "reads survive a hung host");
    net.resume(4).unwrap();
    // A capped link still carries traffic.
    net.cap(1, "20mbit").unwrap();
    assert!(readable(&net, 1), "reads through a capped host");
    net.uncap(1).unwrap();
    // A replaced host (empty disk) gets its replicas back from the others.
    net.replace(1).unwrap();
    eventually(
        Duration::from_secs(60),
        "replicas to be restored after a replacement",
        || on_distinct_hosts(&net, 0).then_some(()),
    );

    // Partition 3/2: each side sees only itself; after the heal, one ring again.
    net.partition(&[vec![0, 1, 2], vec![3, 4]]).unwrap();
    let left: BTreeSet<IpAddr> = (0..3).map(|i| net.addr(i).ip()).collect();
    let right: BTreeSet<IpAddr> = (3..5).map(|i| net.addr(i).ip()).collect();
    let t0 = std::time::Instant::now();
    let split = poll(Duration::from_secs(60), || {
        ring_ips(&net, 0).as_ref() == Some(&left) && ring_ips(&net, 3).as_ref() == Some(&right)
    });
    if !split {
        dump_rings(&net);
        panic!("each side of the partition did not form its own ring within 60 s");
    }
    eprintln!(
        "TESTNET split: two rings {:?} after the partition",
        t0.elapsed()
    );
    assert!(readable(&net, 0), "the larger side still reads every block");
    net.heal().unwrap();
    let t0 = std::time::Instant::now();
    if !poll(Duration::from_secs(90), || {
        (0..5).all(|h| ring_ips(&net, h).as_ref() == Some(&all))
    }) {
        dump_rings(&net);
        panic!("the two rings did not merge within 90 s of the heal");
    }
    eprintln!("TESTNET merge: one ring {:?} after the heal", t0.elapsed());
    assert!(
        readable(&net, 3),
        "the smaller side reads every block again"
    );

    net.down().unwrap();
    let left_over = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(!left_over.contains(&format!("{name}-")), "{left_over}");
    assert!(!dir.exists());
}
