//! `cfs publish` again on a tree it published: files whose stat is unchanged are not
//! read, the ring's copy stays byte-exact, `--rehash` reads everything, and a damaged
//! index in the state directory only costs a full read.

use cfs_tests::tree::{pattern, TempDir};
use cfs_tests::{bin, cfs, eventually, state_dir, Cluster, Mount};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A `cfs publish --watch`, stopped (SIGTERM) when dropped, even if the test failed.
struct Watching(Option<Child>);

impl Watching {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cfs publish --watch`: each change to the tree becomes a version, seen through a
/// mount elsewhere; SIGTERM ends it with status 0.
#[test]
fn a_watched_tree_is_published_on_each_change_and_a_mount_shows_it() {
    let c = Cluster::start(3, &[]);
    c.wait_ring(Duration::from_secs(30));
    let src = TempDir::new("watch-src");
    std::fs::write(src.path().join("index.html"), b"first").unwrap();
    let key = c.keygen();
    let mut child = Command::new(bin("cfs"))
        .args(["publish", src.path().to_str().unwrap(), "--key"])
        .arg(&key)
        .args(["--node", &c.addr(0), "--watch", "-q"])
        .env("CFS_STATE_DIR", state_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Versions as the watcher prints them ("FSID VERSION" per line).
    let (tx, rx) = std::sync::mpsc::channel::<(String, u64)>();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut watching = Watching(Some(child));
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let mut w = line.split_whitespace();
            if let (Some(f), Some(v)) = (w.next(), w.next().and_then(|v| v.parse().ok())) {
                let _ = tx.send((f.to_string(), v));
            }
        }
    });
    let (fsid, v1) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a first version");
    let mnt = TempDir::new("watch-mnt");
    let m = Mount::start(&fsid, mnt.path(), &c.addr(1), &[]);
    assert_eq!(
        std::fs::read(mnt.path().join("index.html")).unwrap(),
        b"first"
    );

    // A file changed and one added, in a new directory: both through the mount.
    let t0 = Instant::now();
    std::fs::write(src.path().join("index.html"), b"second").unwrap();
    std::fs::create_dir(src.path().join("news")).unwrap();
    std::fs::write(src.path().join("news/today"), pattern(300_000, 3)).unwrap();
    eventually(
        Duration::from_secs(30),
        "the mount to show the change",
        || {
            let a = std::fs::read(m.path.join("index.html")).ok()?;
            let b = std::fs::read(m.path.join("news/today")).ok()?;
            (a == b"second" && b == pattern(300_000, 3)).then_some(())
        },
    );
    let seen = t0.elapsed();
    let versions: Vec<u64> = rx.try_iter().map(|(_, v)| v).collect();
    assert!(versions.iter().all(|v| *v > v1), "{versions:?}");
    // Nothing changes: no more versions (its own reads start no round).
    std::thread::sleep(Duration::from_millis(1500));
    let idle: Vec<u64> = rx.try_iter().map(|(_, v)| v).collect();
    assert!(idle.len() <= 1, "versions with no change: {idle:?}");
    let st = watching.stop().unwrap();
    assert!(st.success(), "SIGTERM ends the watch cleanly: {st}");
    eprintln!(
        "WATCH: a change published as {versions:?} after version {v1}, through the mount in {seen:?}"
    );
}
