//! One in-process FUSE mount over an in-memory ring: bytes and attributes read back
//! with std::fs, every write refused with EROFS, a republish seen live, an old version
//! mounted by number, then unmounted. A guard clears the mount even if the test fails.

use cfs_fuse::mount::{spawn_mount, MountOpts};
use cfs_tests::tree::{compare_trees, sample_tree, TempDir};
use cfs_tree::publish::{publish, PublishOpts};
use cfs_tree::service::mem::MemRing;
use ed25519_dalek::SigningKey;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lazily unmounts on drop, so a failing assertion never leaves a mount behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr_len(p: &Path) -> isize {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) }
}

fn erofs<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
        Ok(v) => panic!("{what} succeeded: {v:?}"),
    }
}

/// Type, mode, size, mtime and bytes of every entry are the same in both trees.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuse_mount_end_to_end() {
    let src = TempDir::new("fsrc");
    sample_tree(src.path(), 2000);
    let ring = Arc::new(MemRing::new());
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let popts = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    let r1 = publish(ring.clone(), src.path(), &key, &popts)
        .await
        .unwrap();

    let mnt = TempDir::new("fmnt");
    let _guard = MountGuard(mnt.0.clone());
    let opts = MountOpts {
        poll_interval: Duration::from_millis(200),
        ..MountOpts::default()
    };
    let h = spawn_mount(ring.clone(), r1.fsid, mnt.path(), opts.clone())
        .await
        .unwrap();
    assert_eq!(h.version(), 1);

    let (s, m) = (src.0.clone(), mnt.0.clone());
    let files = r1.files;
    let held = tokio::task::spawn_blocking(move || {
        compare_trees(&s, &m);
        // Hard links share a number and count; holes take no space.
        let (one, link) = (
            fs::metadata(m.join("one")).unwrap(),
            fs::metadata(m.join("one-link")).unwrap(),
        );
        assert_eq!(one.ino(), link.ino());
        assert_eq!(one.nlink(), 2);
        assert_eq!(fs::metadata(m.join("zeros")).unwrap().blocks(), 0);
        assert!(fs::metadata(m.join("several")).unwrap().blocks() >= 5 * 1024 * 1024 / 512);
        // Random-offset reads.
        let f = fs::File::open(m.join("several")).unwrap();
        let want = fs::read(s.join("several")).unwrap();
        for off in [
            0usize,
            1,
            cfs_tests::tree::BS - 3,
            3 * cfs_tests::tree::BS + 11,
            want.len() - 2,
        ] {
            let mut buf = [0u8; 7];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(&buf[..n], &want[off..(off + 7).min(want.len())]);
        }
        // Extended attributes: readable by name, not listed.
        assert_eq!(getxattr(&m.join("one"), "user.cfs.version").unwrap(), b"1");
        assert_eq!(getxattr(&m.join("one"), "user.cfs.key").unwrap().len(), 40);
        assert_eq!(getxattr(&m.join("one"), "user.other"), Err(libc::ENODATA));
        assert_eq!(listxattr_len(&m.join("one")), 0);
        // statfs reports the published totals.
        let c = CString::new(m.as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        assert_eq!(st.f_files as u64, files);
        assert_ne!(st.f_flag & libc::ST_RDONLY, 0);
        // Every kind of write is refused.
        erofs(fs::File::create(m.join("new")), "create");
        erofs(
            fs::OpenOptions::new().write(true).open(m.join("one")),
            "open for write",
        );
        erofs(fs::write(m.join("one"), b"y"), "write");
        erofs(
            fs::set_permissions(m.join("one"), fs::Permissions::from_mode(0o777)),
            "chmod",
        );
        erofs(fs::rename(m.join("one"), m.join("two")), "rename");
        erofs(fs::remove_file(m.join("one")), "unlink");
        erofs(fs::create_dir(m.join("newdir")), "mkdir");
        erofs(fs::remove_dir(m.join("emptydir")), "rmdir");
        erofs(std::os::unix::fs::symlink("x", m.join("sl")), "symlink");
        erofs(fs::hard_link(m.join("one"), m.join("hl")), "link");
        // Hold a file open across the republish below; cache one file's pages.
        assert_eq!(fs::read(m.join("name with spaces")).unwrap(), b"spaces\n");
        fs::File::open(m.join("at")).unwrap()
    })
    .await
    .unwrap();

    // Republish: change a file, add one, remove one.
    let old_at = fs::read(src.path().join("at")).unwrap();
    fs::write(
        src.path().join("at"),
        cfs_tests::tree::pattern(cfs_tests::tree::BS, 99),
    )
    .unwrap();
    fs::write(src.path().join("name with spaces"), b"changed\n").unwrap();
    fs::write(src.path().join("big").join("added"), b"added\n").unwrap();
    fs::remove_file(src.path().join("under")).unwrap();
    let r2 = publish(ring.clone(), src.path(), &key, &popts)
        .await
        .unwrap();
    assert_eq!(r2.version, 2);

    let (s, m, old_at2) = (src.0.clone(), mnt.0.clone(), old_at.clone());
    tokio::task::spawn_blocking(move || {
        let old_at = old_at2;
        let t = Instant::now();
        loop {
            let ok = fs::read(m.join("name with spaces")).ok().as_deref()
                == Some(b"changed\n".as_slice())
                && fs::read(m.join("big/added")).is_ok()
                && fs::symlink_metadata(m.join("under")).is_err();
            if ok {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "new version not visible after 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        compare_trees(&s, &m);
        assert_eq!(getxattr(&m.join("one"), "user.cfs.version").unwrap(), b"2");
        // The file opened before keeps reading the version it opened.
        let mut held = held;
        let mut got = Vec::new();
        held.read_to_end(&mut got).unwrap();
        assert!(got == old_at, "an open file keeps its version");
    })
    .await
    .unwrap();

    // Version 1 mounted by number, next to the live mount.
    let old = TempDir::new("fold");
    let _guard_old = MountGuard(old.0.clone());
    let h1 = spawn_mount(
        ring.clone(),
        r1.fsid,
        old.path(),
        MountOpts {
            version: Some(1),
            ..opts
        },
    )
    .await
    .unwrap();
    let o = old.0.clone();
    tokio::task::spawn_blocking(move || {
        assert!(fs::read(o.join("at")).unwrap() == old_at);
        assert!(fs::metadata(o.join("under")).is_ok());
        assert!(fs::metadata(o.join("big/added")).is_err());
    })
    .await
    .unwrap();

    tokio::task::spawn_blocking(move || {
        h1.unmount().unwrap();
        h.unmount().unwrap();
    })
    .await
    .unwrap();
    // Unmounted: the directory is plain and empty again.
    assert_eq!(fs::read_dir(mnt.path()).unwrap().count(), 0);
}

/// Wait (bounded) until `p` exists with `len` bytes.
fn wait_for_file(p: &Path, len: u64) {
    let t = Instant::now();
    while fs::metadata(p).map(|m| m.len()).ok() != Some(len) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} not written within 10 s",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file read once is written to the file cache and later opens are served by FUSE
/// passthrough: with the ring offline, a fresh mount (empty block cache) still reads
/// it, while a file never read gives EIO. A new mount trusts a file cfs verified without
/// re-hashing it; a cache file altered in place (same size and mtime) is detected,
/// hashed, not served, and rebuilt by the next full read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuse_mount_file_cache_passthrough() {
    let src = TempDir::new("pcsrc");
    let bs = cfs_tests::tree::BS;
    // Several blocks and a hole in the middle; a second file that is never read.
    let mut big = cfs_tests::tree::pattern(5 * bs + 123, 7);
    big[2 * bs..3 * bs].fill(0);
    fs::write(src.path().join("big"), &big).unwrap();
    fs::write(
        src.path().join("other"),
        cfs_tests::tree::pattern(2 * bs, 8),
    )
    .unwrap();
    let ring = Arc::new(MemRing::new());
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let popts = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    let r = publish(ring.clone(), src.path(), &key, &popts)
        .await
        .unwrap();

    let cache = TempDir::new("pccache");
    let mnt = TempDir::new("pcmnt");
    let _guard = MountGuard(mnt.0.clone());
    let opts = MountOpts {
        version: Some(1),
        file_cache: Some(cfs_fuse::mount::FileCacheOpts::new(
            cache.0.clone(),
            64 << 20,
        )),
        ..MountOpts::default()
    };
    let mount = |opts: MountOpts| {
        let (ring, mp) = (ring.clone(), mnt.0.clone());
        async move { spawn_mount(ring, r.fsid, &mp, opts).await.unwrap() }
    };

    // 1. A full read through cfs writes the cache file; reading again gives the same.
    let h = mount(opts.clone()).await;
    let (m, c, want) = (mnt.0.clone(), cache.0.clone(), big.clone());
    let cached = tokio::task::spawn_blocking(move || {
        assert!(fs::read(m.join("big")).unwrap() == want);
        let hex = String::from_utf8(getxattr(&m.join("big"), "user.cfs.key").unwrap()).unwrap();
        let cached = c.join(hex);
        wait_for_file(&cached, want.len() as u64);
        assert!(
            fs::read(&cached).unwrap() == want,
            "cache file holds the file's bytes"
        );
        assert!(fs::read(m.join("big")).unwrap() == want);
        // No temporary file is left behind: the file and the record of its identity.
        let mut names: Vec<String> = fs::read_dir(&c)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let hex = cached.file_name().unwrap().to_str().unwrap();
        assert_eq!(names, vec![hex.to_string(), format!("{hex}.ok")]);
        h.unmount().unwrap();
        cached
    })
    .await
    .unwrap();

    // Passthrough needs CAP_SYS_ADMIN (the kernel's rule for backing files).
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipping the passthrough checks");
        return;
    }

    // 2. A new mount (empty block cache): open both files, then take the ring away.
    let h = mount(opts.clone()).await;
    let (m, want, ring2) = (mnt.0.clone(), big.clone(), ring.clone());
    tokio::task::spawn_blocking(move || {
        let mut f = fs::File::open(m.join("big")).unwrap();
        let mut o = fs::File::open(m.join("other")).unwrap();
        ring2
            .offline
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert!(
            got == want,
            "the cached file reads back identical with the ring offline"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        let e = o.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "an uncached file needs the ring"
        );
        ring2
            .offline
            .store(false, std::sync::atomic::Ordering::SeqCst);
        drop((f, o));
        h.unmount().unwrap();
    })
    .await
    .unwrap();

    // 3. A new mount trusts the file cfs verified without hashing it again: with the
    // ring offline once the file is looked up, hashing (which needs the file's pointer
    // blocks) could not run, yet the file is served.
    let h = mount(opts.clone()).await;
    let (m, want, ring2) = (mnt.0.clone(), big.clone(), ring.clone());
    tokio::task::spawn_blocking(move || {
        assert_eq!(
            fs::metadata(m.join("big")).unwrap().len(),
            want.len() as u64
        );
        ring2
            .offline
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let got = fs::read(m.join("big"));
        ring2
            .offline
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(got.unwrap() == want, "served from the recorded cache file");
        h.unmount().unwrap();
    })
    .await
    .unwrap();

    // 4. Alter the cache file in place (same size, mtime set back): a new mount sees
    // the changed identity, hashes the file, and does not serve it.
    let old_mtime = fs::metadata(&cached).unwrap().modified().unwrap();
    let mut bad = fs::read(&cached).unwrap();
    bad[bs + 5] ^= 0xff;
    fs::write(&cached, &bad).unwrap();
    fs::File::options()
        .write(true)
        .open(&cached)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    let h = mount(opts.clone()).await;
    let (m, want) = (mnt.0.clone(), big.clone());
    tokio::task::spawn_blocking(move || {
        assert!(
            fs::read(m.join("big")).unwrap() == want,
            "corrupt cache file not served"
        );
        // Rebuilt from the verified read.
        wait_for_file(&cached, want.len() as u64);
        let t = Instant::now();
        while fs::read(&cached).unwrap() != want {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "cache file not rebuilt"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A truncated cache file is not served either.
        fs::File::options()
            .write(true)
            .open(&cached)
            .unwrap()
            .set_len(want.len() as u64 - 1)
            .unwrap();
        h.unmount().unwrap();
    })
    .await
    .unwrap();
    let h = mount(opts).await;
    let (m, want) = (mnt.0.clone(), big.clone());
    tokio::task::spawn_blocking(move || {
        assert!(
            fs::read(m.join("big")).unwrap() == want,
            "truncated cache file not served"
        );
        h.unmount().unwrap();
    })
    .await
    .unwrap();
}

/// `find` + `stat` over every entry, as a long-lived mount sees it; returns entries seen.
fn find_stat(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        n += 1;
        if md.is_dir() {
            n += find_stat(&e.path());
        }
    }
    n
}

/// A mount that lives through many versions under `find` holds only what the kernel
/// holds: its inode table does not grow from round to round, and when the kernel drops
/// its caches, `forget` empties the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_lived_mount_stays_bounded_under_find_and_republish() {
    let src = TempDir::new("flong");
    for i in 0..20 {
        for j in 0..10 {
            let d = src.path().join(format!("d{i}/s{j}"));
            fs::create_dir_all(&d).unwrap();
            for k in 0..8 {
                fs::write(d.join(format!("f{k}")), format!("{i}.{j}.{k}")).unwrap();
            }
        }
    }
    let ring = Arc::new(MemRing::new());
    let key = SigningKey::from_bytes(&[11u8; 32]);
    let popts = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    let fsid = publish(ring.clone(), src.path(), &key, &popts)
        .await
        .unwrap()
        .fsid;
    let mnt = TempDir::new("flongm");
    let _guard = MountGuard(mnt.0.clone());
    let opts = MountOpts {
        poll_interval: Duration::from_millis(100),
        ..MountOpts::default()
    };
    let h = Arc::new(
        spawn_mount(ring.clone(), fsid, mnt.path(), opts)
            .await
            .unwrap(),
    );
    let entries = 20 + 20 * 10 + 20 * 10 * 8;
    let mut held = Vec::new();
    for round in 1..=6u64 {
        let (m, h2) = (mnt.0.clone(), h.clone());
        let seen = tokio::task::spawn_blocking(move || {
            // Wait for the version this round published, then walk everything.
            let t = Instant::now();
            while h2.version() < round {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "version {round} not seen"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            find_stat(&m)
        })
        .await
        .unwrap();
        assert_eq!(seen, entries + usize::from(round > 1));
        held.push(h.held_inodes());
        // Change one file in a different place each round.
        let p = src.path().join(format!("d{round}/s{round}/f1"));
        fs::write(&p, format!("round {round}")).unwrap();
        fs::write(src.path().join("round"), round.to_string()).unwrap();
        publish(ring.clone(), src.path(), &key, &popts)
            .await
            .unwrap();
    }
    let first = held[0];
    assert!(
        first > entries / 2,
        "the kernel holds what find looked up: {held:?}"
    );
    for (i, n) in held.iter().enumerate() {
        assert!(
            *n * 2 <= first * 3,
            "table after round {} is {n}, more than 1.5x round 1 ({first}): {held:?}",
            i + 1
        );
    }
    // The kernel lets go of its dentries and inodes: forget shrinks the table.
    if fs::write("/proc/sys/vm/drop_caches", "2").is_ok() {
        let t = Instant::now();
        while h.held_inodes() > first / 10 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the table kept {} of {first} entries after the kernel dropped its caches",
                h.held_inodes()
            );
            let _ = fs::write("/proc/sys/vm/drop_caches", "2");
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        eprintln!("cannot drop the kernel's caches (not root): skipping the forget check");
    }
    let h = Arc::into_inner(h).unwrap();
    tokio::task::spawn_blocking(move || h.unmount().unwrap())
        .await
        .unwrap();
}
