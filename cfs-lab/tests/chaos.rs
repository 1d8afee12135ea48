//! `cfs chaos` as a user runs it: on a loopback ring (no root) with kills, where it must
//! pass, and with one replica and a replaced node, where it must fail with a non-zero
//! exit; and on a 5-host testnet (root) with every fault kind, where the test checks the
//! report against what it observes itself.

mod common;

use cfs_lab::testnet::{self, Spec, Testnet};
use cfs_tests::bin;
use cfs_tests::tree::TempDir;
use std::path::Path;
use std::process::Output;

fn chaos(args: &[&str], out: &Path) -> (Output, serde_json::Value) {
    let o = std::process::Command::new(bin("cfs"))
        .arg("chaos")
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .output()
        .expect("running cfs chaos");
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    let report = std::fs::read(out.join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no report: {}", String::from_utf8_lossy(&o.stderr)));
    (o, report)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Internal consistency every report must have.
fn check_sums(r: &serde_json::Value) {
    let secs = r["seconds"].as_array().unwrap();
    let ok: u64 = secs.iter().map(|s| n(&s["reads_ok"])).sum();
    let failed: u64 = secs.iter().map(|s| n(&s["reads_failed"])).sum();
    assert_eq!(ok + failed, n(&r["reads"]), "per-second reads add up");
    assert_eq!(failed, n(&r["reads_failed"]));
    let in_faults: u64 = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| n(&f["reads"]))
        .sum();
    assert!(in_faults <= n(&r["reads"]));
}

#[test]
fn chaos_on_a_loopback_ring_passes_with_kills_and_fails_when_data_is_lost() {
    let tmp = TempDir::new("chaos");
    let out = tmp.path().join("ok");
    let (o, r) = chaos(
        &[
            "--nodes",
            "5",
            "--kill-every",
            "3s",
            "--down-for",
            "2s",
            "--duration",
            "10s",
            "--republish-every",
            "3s",
            "--files",
            "4",
            "--file-kb",
            "64",
            "--settle",
            "30s",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(r["verdict"], "ok");
    assert_eq!(r["mode"], "loopback");
    // Readers go through a real FUSE mount where this machine has FUSE.
    let fuse = Path::new("/dev/fuse").exists()
        && std::process::Command::new("fusermount3")
            .arg("--version")
            .output()
            .is_ok();
    assert_eq!(r["readers"], if fuse { "mount" } else { "library" });
    let faults = r["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 3, "kills at 3, 6 and 9 s");
    for (i, f) in faults.iter().enumerate() {
        assert_eq!(f["kind"], "kill");
        let t = f["t"].as_f64().unwrap();
        assert!((t - 3.0 * (i + 1) as f64).abs() < 0.5, "{f}");
        assert!(f["until"].as_f64().unwrap() > t);
        assert!(f["back_to_r_s"].is_number(), "{f}");
    }
    assert!(n(&r["versions_published"]) >= 2);
    assert!(n(&r["reads"]) > 20 && n(&r["bytes_verified"]) > 0);
    assert_eq!(n(&r["lost_blocks"]), 0);
    check_sums(&r);
    assert!(std::fs::read_to_string(out.join("report.svg"))
        .unwrap()
        .contains("<svg"));

    // One replica, and the node holding... every node replaced with an empty disk in
    // turn: blocks are lost, and the run says so with its exit status.
    let scenario = tmp.path().join("lose.toml");
    std::fs::write(
        &scenario,
        r#"
        duration = "8s"
        nodes = 3
        replicas = 1
        [[fault]]
        at = "1s"
        kind = "replace"
        node = 1
        [[fault]]
        at = "2s"
        kind = "replace"
        node = 2
        [[fault]]
        at = "3s"
        kind = "replace"
        node = 3
        "#,
    )
    .unwrap();
    let lost = tmp.path().join("lost");
    let (o, r) = chaos(
        &[
            "--scenario",
            scenario.to_str().unwrap(),
            "--republish-every",
            "0",
            "--files",
            "4",
            "--file-kb",
            "64",
            "--settle",
            "3s",
        ],
        &lost,
    );
    assert_eq!(o.status.code(), Some(1), "a loss fails the run");
    assert!(n(&r["lost_blocks"]) > 0, "{r}");
    assert!(r["verdict"].as_str().unwrap().contains("lost"));
}

/// Reads never stall on one bad holder: a pause, a kill and a slow node on a loopback
/// ring, each costing reads at most 500 ms (`--max-stall`), with every byte right.
#[test]
fn a_pause_a_kill_and_a_slow_node_stall_reads_at_most_half_a_second() {
    let tmp = TempDir::new("chaos-stall");
    let scenario = tmp.path().join("stall.toml");
    std::fs::write(
        &scenario,
        r#"
        duration = "16s"
        nodes = 6
        replicas = 3
        [[fault]]
        at = "2s"
        kind = "pause"
        node = 2
        for = "3s"
        [[fault]]
        at = "7s"
        kind = "kill"
        node = 3
        for = "3s"
        [[fault]]
        at = "11s"
        kind = "slow"
        node = 4
        for = "3s"
        "#,
    )
    .unwrap();
    let out = tmp.path().join("report");
    let (o, r) = chaos(
        &[
            "--scenario",
            scenario.to_str().unwrap(),
            "--republish-every",
            "3s",
            "--files",
            "8",
            "--file-kb",
            "256",
            "--readers",
            "2",
            "--settle",
            "30s",
            "--max-stall",
            "500ms",
        ],
        &out,
    );
    for f in r["faults"].as_array().unwrap() {
        eprintln!(
            "STALL {}: longest {:.2} s, p99 inside {:.0} ms (outside {:.0} ms)",
            f["kind"],
            f["longest_stall_s"].as_f64().unwrap(),
            f["p99_in_ms"].as_f64().unwrap(),
            r["p99_outside_ms"].as_f64().unwrap()
        );
    }
    assert!(o.status.success(), "{}", r["verdict"]);
    assert_eq!(r["verdict"], "ok");
    assert_eq!(n(&r["wrong_reads"]), 0);
    assert_eq!(n(&r["lost_blocks"]), 0);
    // The mount's own count of its requests and of those hedging added, as it exited.
    if r["readers"] == "mount" {
        let (calls, hedged) = (n(&r["requests"]), n(&r["hedged"]));
        eprintln!("HEDGED {hedged} of {calls} requests");
        assert!(calls > 0 && hedged < calls, "{calls} {hedged}");
    }
    let kinds: Vec<&str> = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["pause", "kill", "slow"]);
    check_sums(&r);
}

#[test]
fn chaos_on_a_testnet_runs_every_fault_kind_and_reports_what_happened() {
    if let Some(why) = testnet::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let (tmp, _guard, spec) = common::spec(
        "chaos-net",
        5,
        9,
        &["--stabilize-ms", "200", "--maintain-ms", "1000"],
    );
    let (name, dir) = (spec.name.clone(), spec.dir.clone());
    let mut net = Testnet::up(&Spec {
        disk_mb: Some(64),
        ..spec
    })
    .expect("testnet up");
    let pids_before: Vec<Option<u32>> = net.hosts.iter().map(|h| h.pid).collect();
    let scenario = tmp.path().join("all.toml");
    std::fs::write(
        &scenario,
        r#"
        duration = "34s"
        [[fault]]
        at = "2s"
        kind = "kill"
        node = 2
        for = "3s"
        [[fault]]
        at = "6s"
        kind = "pause"
        node = 3
        for = "3s"
        [[fault]]
        at = "10s"
        kind = "restart"
        node = 4
        [[fault]]
        at = "13s"
        kind = "replace"
        node = 5
        [[fault]]
        at = "17s"
        kind = "partition"
        groups = [[1, 2, 3], [4, 5]]
        for = "5s"
        [[fault]]
        at = "24s"
        kind = "cap"
        node = 2
        rate = "20mbit"
        for = "3s"
        [[fault]]
        at = "28s"
        kind = "fill"
        node = 1
        for = "4s"
        "#,
    )
    .unwrap();
    let out = tmp.path().join("report");
    let (o, r) = chaos(
        &[
            "--testnet",
            &name,
            "--testnet-dir",
            dir.to_str().unwrap(),
            "--scenario",
            scenario.to_str().unwrap(),
            "--republish-every",
            "4s",
            "--files",
            "4",
            "--file-kb",
            "64",
            "--settle",
            "60s",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(r["verdict"], "ok", "{r}");
    let kinds: Vec<&str> = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "kill",
            "pause",
            "restart",
            "replace",
            "partition",
            "cap",
            "fill"
        ]
    );
    for f in r["faults"].as_array().unwrap() {
        assert!(f["error"].is_null(), "{f}");
    }
    assert_eq!(
        r["faults"][4]["groups"],
        serde_json::json!([[1, 2, 3], [4, 5]])
    );
    check_sums(&r);

    // What the test sees for itself: the processes that were restarted or replaced are
    // new, the replaced host's disk was emptied (its node started after the run began),
    // and the newest version in the ring is the one the report says was published.
    net = Testnet::load(&dir).unwrap();
    for h in [1usize, 3, 4] {
        assert_ne!(
            net.hosts[h].pid,
            pids_before[h],
            "host {} has a new process",
            h + 1
        );
    }
    assert_eq!(
        net.hosts[2].pid, pids_before[2],
        "a pause keeps the process"
    );
    assert!(net.partition.is_empty(), "healed");
    assert!(net.hosts.iter().all(|h| h.rate.is_none() && !h.paused));
    let fsid = r["fsid"].as_str().unwrap();
    let got = net
        .command(0, bin("cfs"))
        .args([
            "get",
            &format!("{fsid}:/version.txt"),
            "--node",
            &net.addr(0).to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        r["versions_published"].to_string(),
        "the ring's newest version is the last one the report counts"
    );
    let f0 = net
        .command(3, bin("cfs"))
        .args([
            "get",
            &format!("{fsid}:/f000.bin"),
            "--node",
            &net.addr(3).to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        f0.stdout,
        std::fs::read(out.join("tree/f000.bin")).unwrap(),
        "bytes equal from the other side"
    );
    net.down().unwrap();
}
