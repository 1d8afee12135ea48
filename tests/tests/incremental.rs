//! `cfs publish` again on a tree it published: files whose stat is unchanged are not
//! read, the ring's copy stays byte-exact, `--rehash` reads everything, and a damaged
//! index in the state directory only costs a full read.

use cfs_tests::tree::{pattern, TempDir};
use cfs_tests::{cfs, eventually, state_dir, Cluster};
use std::path::Path;
use std::time::Duration;

/// `cfs publish`: (version, files it did not read).
fn publish(c: &Cluster, src: &Path, key: &Path, extra: &[&str]) -> (u64, u64) {
    let addr = c.addr(0);
    let mut args = vec![
        "publish",
        src.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--node",
        &addr,
        "-q",
    ];
    args.extend_from_slice(extra);
    let out = cfs(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cfs publish failed: {err}");
    let version = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let reused = err
        .lines()
        .find_map(|l| l.strip_prefix("unchanged since the last publish: "))
        .map_or(0, |l| l.split(' ').next().unwrap().parse().unwrap());
    (version, reused)
}

fn get(c: &Cluster, fsid: &str, name: &str) -> Vec<u8> {
    let out = cfs(&["get", &format!("{fsid}:/{name}"), "--node", &c.addr(1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_republish_reads_only_changed_files_and_a_damaged_index_costs_a_full_read() {
    let c = Cluster::start(3, &[]);
    c.wait_ring(Duration::from_secs(30));
    let src = TempDir::new("incr-cli");
    std::fs::create_dir(src.path().join("sub")).unwrap();
    for i in 0..100 {
        std::fs::write(
            src.path().join(format!("sub/f{i}")),
            pattern(5000 + i, i as u32),
        )
        .unwrap();
    }
    std::fs::write(src.path().join("big"), pattern(6 << 20, 1)).unwrap();
    let key = c.keygen();
    let (fsid, _) = c.publish(src.path(), &key, 0);

    // Files changed within the last second are read again whatever their stat says (a
    // write in the same clock tick keeps it): once they have settled, none is read.
    eventually(
        Duration::from_secs(20),
        "a republish that reads no unchanged file",
        || (publish(&c, src.path(), &key, &[]).1 == 101).then_some(()),
    );

    // One file changes: it alone is read, and the ring has its new bytes.
    std::fs::write(src.path().join("sub/f7"), b"new contents").unwrap();
    let (_, reused) = publish(&c, src.path(), &key, &[]);
    assert_eq!(reused, 100);
    assert_eq!(get(&c, &fsid, "sub/f7"), b"new contents");
    assert_eq!(get(&c, &fsid, "big"), pattern(6 << 20, 1));

    // --rehash reads everything.
    assert_eq!(publish(&c, src.path(), &key, &["--rehash"]).1, 0);

    // A damaged index: read in full, the tree is right, and the index is written anew.
    let idx: Vec<_> = std::fs::read_dir(state_dir().join("publish"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_string_lossy().contains(&fsid) && p.extension().is_some_and(|e| e == "idx")
        })
        .collect();
    assert_eq!(idx.len(), 1, "one index for this tree and key: {idx:?}");
    let mut bytes = std::fs::read(&idx[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&idx[0], &bytes).unwrap();
    assert_eq!(publish(&c, src.path(), &key, &[]).1, 0);
    assert_eq!(get(&c, &fsid, "sub/f99"), pattern(5099, 99));
    assert!(
        publish(&c, src.path(), &key, &[]).1 > 0,
        "the index is whole again"
    );
    eprintln!("INCREMENTAL: republish via cfs: unchanged files skipped, one change read, a damaged index read in full");
}
