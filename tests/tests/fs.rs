//! Issue 3: publish and mount, on a multi-process ring with real FUSE mounts.

use cfs_core::Id;
use cfs_tests::tree::{assert_diff_r, compare_trees, pattern, sample_tree};
use cfs_tests::{cfs, cfs_ok, eventually, Cluster, Mount};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(dir: &Path, script: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn sh_ok(dir: &Path, script: &str) -> String {
    let out = sh(dir, script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn erofs<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    }
}

#[test]
fn published_tree_reads_back_identical_and_ordinary_tools_work() {
    let cluster = Cluster::start(5, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    sample_tree(&src, 2000);
    // A git working tree, for `git status` through the mount.
    let repo = src.join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("file.txt"), "tracked\n").unwrap();
    sh_ok(
        &repo,
        "git init -q . && git add file.txt && git -c user.name=t -c user.email=t@t commit -qm init",
    );
    let key = cluster.keygen();
    let (fsid, version) = cluster.publish(&src, &key, 1);
    assert_eq!(version, 1);

    let mnt = cluster.dir.path().join("mnt");
    let _m = Mount::start(&fsid, &mnt, &cluster.addr(2), &[]);
    assert_diff_r(&src, &mnt, &["--no-dereference"]);
    compare_trees(&src, &mnt);

    // tar, cp -a, find | xargs sha1sum.
    let tar_src = sh_ok(&src, "tar cf - --sort=name . | tar tvf - | sort");
    let tar_mnt = sh_ok(&mnt, "tar cf - --sort=name . | tar tvf - | sort");
    assert_eq!(tar_src, tar_mnt);
    let copy = cluster.dir.path().join("copy");
    let out = Command::new("cp")
        .arg("-a")
        .arg(&mnt)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    compare_trees(&src, &copy);
    let sums = "find . -type f -print0 | sort -z | xargs -0 sha1sum";
    assert_eq!(sh_ok(&src, sums), sh_ok(&mnt, sums));
    // git status in the published working tree.
    let st = sh_ok(
        &mnt.join("repo"),
        "git -c safe.directory='*' status --porcelain",
    );
    assert_eq!(st, "", "git status through the mount");
    // mmap and random-offset preads.
    let big = std::fs::read(src.join("several")).unwrap();
    let f = std::fs::File::open(mnt.join("several")).unwrap();
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            big.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts(p as *const u8, big.len());
        assert!(s == &big[..], "mmap bytes differ");
        libc::munmap(p, big.len());
    }
    let mut x: u64 = 12345;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 11) as usize % big.len();
        let len = ((x >> 40) as usize % 300_000).min(big.len() - off);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == big[off..off + len], "pread at {off}+{len}");
    }
    // Every kind of write fails with EROFS.
    erofs(std::fs::File::create(mnt.join("new")), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("one")),
        "open for write",
    );
    erofs(
        std::fs::set_permissions(mnt.join("one"), std::fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(std::fs::rename(mnt.join("one"), mnt.join("two")), "rename");
    erofs(std::fs::remove_file(mnt.join("one")), "unlink");
    erofs(std::fs::create_dir(mnt.join("dir")), "mkdir");
    erofs(std::fs::remove_dir(mnt.join("emptydir")), "rmdir");
    erofs(std::os::unix::fs::symlink("x", mnt.join("sym")), "symlink");
    // xattrs name the block and the version; `cfs get` reads without mounting.
    let got = cfs(&["get", &format!("{fsid}:/under"), "--node", &cluster.addr(0)]);
    assert!(got.status.success());
    assert!(got.stdout == std::fs::read(src.join("under")).unwrap());
}

#[test]
fn republish_shows_in_live_mount_and_old_versions_stay_mountable() {
    let cluster = Cluster::start(4, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "version one\n").unwrap();
    std::fs::write(src.join("sub/gone.txt"), "to be removed\n").unwrap();
    std::fs::write(src.join("big"), pattern(700_000, 7)).unwrap();
    let key = cluster.keygen();
    let (fsid, v1) = cluster.publish(&src, &key, 0);
    let mnt = cluster.dir.path().join("mnt");
    let _m = Mount::start(&fsid, &mnt, &cluster.addr(1), &["--poll", "1"]);
    // Cache the pages of a.txt and big in the kernel.
    assert_eq!(
        std::fs::read_to_string(mnt.join("a.txt")).unwrap(),
        "version one\n"
    );
    assert!(std::fs::read(mnt.join("big")).unwrap() == pattern(700_000, 7));
    let open_old = std::fs::File::open(mnt.join("a.txt")).unwrap();

    std::fs::write(src.join("a.txt"), "version two, longer\n").unwrap();
    std::fs::write(src.join("sub/new.txt"), "added\n").unwrap();
    std::fs::remove_file(src.join("sub/gone.txt")).unwrap();
    std::fs::write(src.join("big"), pattern(700_000, 8)).unwrap();
    let (fsid2, v2) = cluster.publish(&src, &key, 2);
    assert_eq!((fsid2.as_str(), v2), (fsid.as_str(), v1 + 1));

    let t0 = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the new version in the live mount",
        || {
            let a = std::fs::read_to_string(mnt.join("a.txt")).ok()?;
            let new = mnt.join("sub/new.txt").exists();
            let gone = !mnt.join("sub/gone.txt").exists();
            (a == "version two, longer\n" && new && gone).then_some(())
        },
    );
    assert!(std::fs::read(mnt.join("big")).unwrap() == pattern(700_000, 8));
    eprintln!("republish visible after {:?}", t0.elapsed());
    // A file already open keeps reading the version it opened.
    let mut buf = vec![0u8; 64];
    let n = open_old.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"version one\n");

    // --version 1 still shows the old tree.
    let old = cluster.dir.path().join("old");
    let _o = Mount::start(
        &fsid,
        &old,
        &cluster.addr(3),
        &["--version", &v1.to_string()],
    );
    assert_eq!(
        std::fs::read_to_string(old.join("a.txt")).unwrap(),
        "version one\n"
    );
    assert!(old.join("sub/gone.txt").exists());
    assert!(!old.join("sub/new.txt").exists());
    let old_get = cfs_ok(&[
        "get",
        &format!("{fsid}@{v1}:/a.txt"),
        "--node",
        &cluster.addr(0),
    ]);
    assert_eq!(old_get, "version one\n");
}

#[test]
fn mount_survives_its_node_dying_and_a_killed_mount_is_cleared() {
    let mut cluster = Cluster::start(5, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..20 {
        std::fs::write(
            src.join(format!("f{i}")),
            pattern(50_000 + i * 1000, i as u32),
        )
        .unwrap();
    }
    let key = cluster.keygen();
    let (fsid, _) = cluster.publish(&src, &key, 0);
    let mnt = cluster.dir.path().join("mnt");
    let mut m = Mount::start(&fsid, &mnt, &cluster.addr(0), &[]);
    assert!(std::fs::read(mnt.join("f0")).unwrap() == pattern(50_000, 0));
    // Kill the node the mount was started against; reads of files not read yet go on.
    cluster.kill(0);
    for i in 1..20 {
        let got = std::fs::read(mnt.join(format!("f{i}"))).unwrap();
        assert!(
            got == pattern(50_000 + i * 1000, i as u32),
            "f{i} after node death"
        );
    }
    // kill -9 the mount itself, then mount again at the same place.
    m.kill9();
    assert!(
        std::fs::read_dir(&mnt).is_err(),
        "a killed mount should leave a dead mountpoint"
    );
    let mut m2 = Mount::start(&fsid, &mnt, &cluster.addr(1), &[]);
    assert!(std::fs::read(mnt.join("f5")).unwrap() == pattern(55_000, 5));
    let _ = m2.child.take().map(|mut c| {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    });
    // SIGTERM unmounts cleanly.
    eventually(Duration::from_secs(10), "unmount on SIGTERM", || {
        (!cfs_tests::is_mounted(&mnt)).then_some(())
    });
}

#[test]
fn missing_fsid_is_a_clear_error_and_corrupt_replicas_are_refused() {
    let mut cluster = Cluster::start(4, &["--maintain-ms", "1000", "--scrub-ms", "1000"]);
    cluster.wait_ring(Duration::from_secs(30));
    // A FSID nobody published: an error, not a hang.
    let nobody = Id::hash(b"nobody").to_hex();
    let t0 = Instant::now();
    let out = cfs(&["get", &format!("{nobody}:/x"), "--node", &cluster.addr(0)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&nobody[..8]) || err.to_lowercase().contains("no such"),
        "{err}"
    );
    let mnt = cluster.dir.path().join("mnt-nobody");
    std::fs::create_dir(&mnt).unwrap();
    let out = cfs(&[
        "mount",
        &nobody,
        mnt.to_str().unwrap(),
        "--node",
        &cluster.addr(0),
    ]);
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));

    // A file of one data block whose replicas, all but one, hold garbage.
    let src = cluster.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let content = pattern(100_000, 99);
    std::fs::write(src.join("file"), &content).unwrap();
    let key = cluster.keygen();
    let (fsid, _) = cluster.publish(&src, &key, 0);
    let block = Id::hash(&content).to_hex();
    let holders: Vec<String> = cfs_ok(&["block", "locate", &block, "--node", &cluster.addr(0)])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(holders.len(), 3);
    for h in &holders[..2] {
        let i = cluster
            .nodes
            .iter()
            .position(|n| n.addr.to_string() == *h)
            .unwrap();
        cluster.kill(i);
        corrupt(
            &cluster.nodes[i].data.join("blocks.redb"),
            Id::hash(&content),
        );
        cluster.restart(i);
    }
    cluster.wait_ring(Duration::from_secs(30));
    for n in 0..4 {
        let out = cfs(&["get", &format!("{fsid}:/file"), "--node", &cluster.addr(n)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == content, "corrupt bytes reached the reader");
    }
    // The scrub drops the corrupt copies and maintenance restores good ones from the
    // replica that kept it: every holder serves the right bytes again.
    let rt = tokio::runtime::Runtime::new().unwrap();
    eventually(Duration::from_secs(60), "corrupt replicas repaired", || {
        rt.block_on(async {
            let c = cfs_net::client::Client::tcp(cluster.nodes[0].addr);
            let mut good = 0;
            for h in &holders {
                let req = cfs_core::wire::Request::Get {
                    kind: cfs_core::BlockKind::Data,
                    key: Id::hash(&content),
                };
                if let Ok(cfs_core::wire::Response::Block(Some(b))) =
                    c.net.call(h.parse().unwrap(), req).await
                {
                    good += (b == content) as usize;
                }
            }
            (good == holders.len()).then_some(())
        })
    });
}

/// Overwrite a data block's bytes in a stopped node's store.
fn corrupt(db: &Path, key: Id) {
    let t: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blocks");
    let db = redb::Database::create(db).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(t).unwrap();
        let mut k = vec![0u8];
        k.extend_from_slice(&key.0);
        table
            .insert(k.as_slice(), vec![0x5a; 100_000].as_slice())
            .unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn reads_fail_with_eio_when_the_ring_is_gone_and_work_again_when_it_returns() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), pattern(300_000, 1)).unwrap();
    std::fs::write(src.join("b"), pattern(300_000, 2)).unwrap();
    let key = cluster.keygen();
    let (fsid, _) = cluster.publish(&src, &key, 0);
    let mnt = cluster.dir.path().join("mnt");
    let _m = Mount::start(&fsid, &mnt, &cluster.addr(0), &["--timeout", "3"]);
    // Look b up while the ring is there, so only its data blocks are missing later.
    assert_eq!(std::fs::metadata(mnt.join("b")).unwrap().len(), 300_000);
    for i in 0..3 {
        cluster.kill(i);
    }
    let t0 = Instant::now();
    let err = std::fs::read(mnt.join("b")).unwrap_err();
    // Refused connections give EIO; a replica that never answers, ETIMEDOUT.
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "EIO took {:?}",
        t0.elapsed()
    );
    for i in 0..3 {
        cluster.restart(i);
    }
    eventually(Duration::from_secs(60), "reads to work again", || {
        std::fs::read(mnt.join("b"))
            .ok()
            .filter(|b| *b == pattern(300_000, 2))
    });
}

#[test]
fn demo_runs_a_ring_publishes_mounts_and_cleans_up_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hello from the demo\n").unwrap();
    let mnt = dir.path().join("mnt");
    let mut child = Command::new(cfs_tests::bin("cfs"))
        .args([
            "demo",
            src.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "--nodes",
            "3",
        ])
        .env("CFS_STATE_DIR", cfs_tests::state_dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let guard = scopeguard(pid, mnt.clone());
    eventually(Duration::from_secs(60), "the demo mount", || {
        std::fs::read_to_string(mnt.join("hello.txt"))
            .ok()
            .filter(|s| s == "hello from the demo\n")
    });
    unsafe { libc::kill(pid, libc::SIGINT) };
    let st = child.wait().unwrap();
    assert!(st.success(), "demo exited with {st}");
    assert!(!cfs_tests::is_mounted(&mnt), "demo left its mount behind");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("Mounted read-only at"), "{out}");
    // The process is reaped and unmounted: nothing for the guard to do.
    std::mem::forget(guard);
}

/// Kills the demo and clears its mount if the test fails midway.
fn scopeguard(pid: i32, mnt: std::path::PathBuf) -> impl Drop {
    struct G(i32, std::path::PathBuf);
    impl Drop for G {
        fn drop(&mut self) {
            if self.0 > 0 {
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
            if cfs_tests::is_mounted(&self.1) {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.1)
                    .status();
            }
        }
    }
    G(pid, mnt)
}

#[test]
fn mount_helper_form_returns_once_live_for_fstab() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "via fstab\n").unwrap();
    let key = cluster.keygen();
    let (fsid, _) = cluster.publish(&src, &key, 0);
    let mnt = cluster.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // What mount.fuse3 runs for `mount -t fuse.cfs FSID DIR -o ...` (an fstab line).
    let opts = format!(
        "node={},_netdev,nofail,x-systemd.automount",
        cluster.addr(1)
    );
    let out = cfs(&[&fsid, mnt.to_str().unwrap(), "-o", &opts]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = scopeguard(0, mnt.clone());
    // It returned only once the mount was live.
    assert!(cfs_tests::is_mounted(&mnt));
    assert_eq!(
        std::fs::read_to_string(mnt.join("f")).unwrap(),
        "via fstab\n"
    );
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    drop(guard);
    // A wrong option is a clear error, not a hang.
    let out = cfs(&[&fsid, mnt.to_str().unwrap(), "-o", "bogus=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mount option"));
}
