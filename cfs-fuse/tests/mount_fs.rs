//! The mount's filesystem layer without FUSE: lookup counts and `forget`, the cost of
//! applying a new version, and typed errors.

use cfs_fuse::mount::{open_fs, Fs, MountOpts, OpError, Opened, ROOT_INO};
use cfs_tests::tree::TempDir;
use cfs_tree::publish::{publish, PublishOpts};
use cfs_tree::reader::{FsError, ReaderOpts};
use cfs_tree::service::mem::MemRing;
use cfs_tree::service::RingError;
use ed25519_dalek::SigningKey;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const DIRS: usize = 12;
const SUBS: usize = 4;
const FILES: usize = 5;

/// d{i}/s{j}/f{k}, each file naming itself, plus a version marker at the top.
fn build(root: &Path, version: u32) {
    for i in 0..DIRS {
        for j in 0..SUBS {
            let d = root.join(format!("d{i}/s{j}"));
            std::fs::create_dir_all(&d).unwrap();
            for k in 0..FILES {
                std::fs::write(d.join(format!("f{k}")), format!("{i}/{j}/{k}")).unwrap();
            }
        }
    }
    std::fs::write(root.join("version"), version.to_string()).unwrap();
}

async fn publish_quiet(ring: &Arc<MemRing>, src: &Path, key: &SigningKey) -> cfs_core::Id {
    let opts = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    publish(ring.clone(), src, key, &opts).await.unwrap().fsid
}

/// A ring in memory holding `src`, published with the key of `seed`.
async fn published(src: &Path, seed: u8) -> (Arc<MemRing>, SigningKey, cfs_core::Id) {
    let ring = Arc::new(MemRing::new());
    let key = SigningKey::from_bytes(&[seed; 32]);
    let fsid = publish_quiet(&ring, src, &key).await;
    (ring, key, fsid)
}

fn read_all(fs: &Fs<MemRing>, ino: u64) -> Vec<u8> {
    let Opened::Normal(fh) = fs
        .open(ino, false, |_| Err(std::io::Error::other("no FUSE")))
        .unwrap()
    else {
        panic!("no passthrough without a file cache")
    };
    let out = fs.rt().block_on(fs.read(fh, 0, 1 << 20)).unwrap();
    fs.release(fh);
    out.data.into_vec()
}

/// Wait (at most `within`) until the file cache holds `ino` complete with `data`; the
/// cache file's name (the inode key in hex).
fn cache_file_complete(
    fs: &Fs<MemRing>,
    ino: u64,
    cache_dir: &Path,
    data: &[u8],
    within: Duration,
) -> String {
    let hex = String::from_utf8(fs.getxattr(ino, b"user.cfs.key").unwrap()).unwrap();
    let t = std::time::Instant::now();
    while std::fs::read(cache_dir.join(&hex)).ok().as_deref() != Some(data) {
        assert!(t.elapsed() < within, "the cache file was not completed");
        std::thread::sleep(Duration::from_millis(20));
    }
    hex
}

/// Look a path up name by name, as the kernel would; returns every number looked up.
fn walk(fs: &Fs<MemRing>, path: &str) -> Vec<u64> {
    let mut at = ROOT_INO;
    let mut got = Vec::new();
    for c in path.split('/') {
        at = fs.lookup(at, c.as_bytes()).unwrap().0;
        got.push(at);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_bounds_the_table_and_a_version_costs_only_changed_held_paths() {
    let src = TempDir::new("mfs");
    build(src.path(), 1);
    let (ring, key, fsid) = published(src.path(), 3).await;
    let fs = open_fs(ring.clone(), fsid, MountOpts::default())
        .await
        .unwrap();
    let (fs2, ring2, src2) = (fs.clone(), ring.clone(), src.0.clone());
    tokio::task::spawn_blocking(move || {
        let fs = fs2;
        // Every entry looked up once, as `find` + `stat` does.
        let mut looked = Vec::new();
        for i in 0..DIRS {
            looked.push(walk(&fs, &format!("d{i}"))[0]);
            for j in 0..SUBS {
                let s = walk(&fs, &format!("d{i}/s{j}"));
                looked.push(s[1]);
                for k in 0..FILES {
                    looked.push(fs.lookup(s[1], format!("f{k}").as_bytes()).unwrap().0);
                }
                // The parents were looked up again on the way: the kernel counts those.
                looked.extend(&s[..1]);
            }
        }
        let all = 1 + DIRS + DIRS * SUBS + DIRS * SUBS * FILES;
        assert_eq!(fs.held(), all, "one entry per looked-up name, plus the top");

        // A change deep down: only the path to it is compared, not every held directory.
        std::fs::write(src2.join("d3/s2/f1"), "changed").unwrap();
        std::fs::write(src2.join("version"), "2").unwrap();
        fs.rt().block_on(publish_quiet(&ring2, &src2, &key));
        let (inv, compared) = fs.refresh().unwrap().expect("a newer version");
        assert_eq!(compared, 3, "top, d3 and d3/s2 changed");
        let s2 = walk(&fs, "d3/s2")[1];
        assert!(inv.entries.contains(&(s2, b"f1".to_vec())));
        assert!(inv.entries.contains(&(ROOT_INO, b"version".to_vec())));
        assert_eq!(fs.version(), 2);
        let f1 = fs.lookup(s2, b"f1").unwrap().0;
        assert_eq!(read_all(&fs, f1), b"changed");
        // Directories keep their numbers across versions.
        assert!(looked.contains(&s2));

        // The kernel forgets everything: the table is back to the top alone.
        for ino in looked.iter().chain([f1, s2].iter()) {
            fs.forget(*ino, 1);
        }
        // The walks after the version counted d3 twice more.
        let d3 = walk(&fs, "d3")[0];
        fs.forget(d3, 2);
        assert_eq!(
            fs.held(),
            1,
            "nothing is held once the kernel forgot it all"
        );

        // With nothing held below the top, a new version compares the top only.
        std::fs::write(src2.join("d7/s0/f4"), "again").unwrap();
        fs.rt().block_on(publish_quiet(&ring2, &src2, &key));
        let (_, compared) = fs.refresh().unwrap().expect("a newer version");
        assert_eq!(compared, 1);
        let f = walk(&fs, "d7/s0/f4")[2];
        assert_eq!(read_all(&fs, f), b"again");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed() {
    let src = TempDir::new("mfs-err");
    build(src.path(), 1);
    let (ring, _, fsid) = published(src.path(), 4).await;
    let opts = MountOpts {
        reader: ReaderOpts {
            deadline: Duration::from_millis(300),
            ..ReaderOpts::default()
        },
        ..MountOpts::default()
    };
    let fs = open_fs(ring.clone(), fsid, opts).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let no = |_: &std::fs::File| Err(std::io::Error::other("no FUSE"));
        let e = fs.lookup(ROOT_INO, b"missing").unwrap_err();
        assert!(matches!(e, OpError::NoEntry { .. }), "{e}");
        assert_eq!(e.errno(), libc::ENOENT);
        let d0 = fs.lookup(ROOT_INO, b"d0").unwrap().0;
        assert!(matches!(fs.open(d0, false, no), Err(OpError::IsDir(_))));
        let v = fs.lookup(ROOT_INO, b"version").unwrap().0;
        assert!(matches!(fs.lookup(v, b"x"), Err(OpError::NotDir(_))));
        let e = fs.open(v, true, no).err().unwrap();
        assert!(matches!(e, OpError::ReadOnly));
        assert_eq!(e.errno(), libc::EROFS);
        fs.forget(v, 1);
        let e = fs.getattr(v, None).unwrap_err();
        assert!(matches!(e, OpError::Stale(_)), "a forgotten number: {e}");

        // No replica: EIO, naming the block.
        ring.offline.store(true, Ordering::SeqCst);
        let e = fs.lookup(d0, b"s1").unwrap_err();
        assert!(
            matches!(
                e,
                OpError::Read(FsError::Ring(RingError::Unavailable { .. }))
            ),
            "{e:?}"
        );
        assert_eq!(e.errno(), libc::EIO);
        ring.offline.store(false, Ordering::SeqCst);
        // A replica that never answers: ETIMEDOUT after the deadline, not a hang.
        ring.stall.store(true, Ordering::SeqCst);
        let e = fs.lookup(d0, b"s2").unwrap_err();
        assert!(matches!(e, OpError::Read(FsError::Timeout { .. })), "{e:?}");
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        ring.stall.store(false, Ordering::SeqCst);
        assert!(fs.lookup(d0, b"s3").is_ok(), "works again");
    })
    .await
    .unwrap();
}

/// A file read in parts, through separate opens, fills the file cache range by range:
/// ranges already written are served from local disk (here with the ring offline), and
/// once every byte is there the file is complete in the cache and later opens read it
/// from there (by passthrough under FUSE; here, without it, by the mount itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_in_parts_fills_the_cache_across_opens() {
    let src = TempDir::new("mfs-part");
    let bs = cfs_tests::tree::BS;
    let data = cfs_tests::tree::pattern(6 * bs + 99, 5);
    std::fs::write(src.path().join("big"), &data).unwrap();
    let (ring, _, fsid) = published(src.path(), 6).await;
    let cache = TempDir::new("mfs-part-cache");
    let opts = MountOpts {
        file_cache: Some(cfs_fuse::mount::FileCacheOpts::new(
            cache.0.clone(),
            64 << 20,
        )),
        reader: ReaderOpts {
            deadline: Duration::from_millis(300),
            // One block: what is read again must come from the cache file, not memory.
            cache_bytes: bs,
            ..ReaderOpts::default()
        },
        ..MountOpts::default()
    };
    let fs = open_fs(ring.clone(), fsid, opts).await.unwrap();
    let cache_dir = cache.0.clone();
    tokio::task::spawn_blocking(move || {
        let no = |_: &std::fs::File| Err(std::io::Error::other("no FUSE"));
        let ino = fs.lookup(ROOT_INO, b"big").unwrap().0;
        let read = |fh: u64, off: usize, len: usize| {
            let out = fs.rt().block_on(fs.read(fh, off as u64, len as u32));
            out.map(|o| {
                let d = o.data.as_slice().to_vec();
                fs.after_reply(o, off as u64);
                d
            })
        };
        let open = || match fs.open(ino, false, no).unwrap() {
            Opened::Normal(fh) => fh,
            Opened::Passthrough(..) => panic!("no passthrough without FUSE"),
        };
        let half = 3 * bs;
        let fh = open();
        assert_eq!(read(fh, 0, half).unwrap(), data[..half]);
        fs.release(fh);
        // Wait for the write-behind of the first half.
        let t = std::time::Instant::now();
        let fh = open();
        ring.offline.store(true, Ordering::SeqCst);
        loop {
            match read(fh, 0, half) {
                Ok(d) => {
                    assert_eq!(d, data[..half], "served from the partial cache file");
                    break;
                }
                Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Past what the first read fetched ahead (one block), the ring is needed.
        assert!(read(fh, half + bs, bs).is_err(), "the rest needs the ring");
        ring.offline.store(false, Ordering::SeqCst);
        assert_eq!(read(fh, half, data.len() - half).unwrap(), data[half..]);
        fs.release(fh);
        // Complete: the cache file is there under its key, with its record.
        let hex = cache_file_complete(&fs, ino, &cache_dir, &data, Duration::from_secs(10));
        assert!(cache_dir.join(format!("{hex}.ok")).exists());
        // Without passthrough (no FUSE here), a later open reads the complete cache file
        // itself: the ring is not needed for any range.
        let fh = open();
        ring.offline.store(true, Ordering::SeqCst);
        assert_eq!(
            read(fh, half + bs, bs).unwrap(),
            data[half + bs..half + 2 * bs]
        );
        assert_eq!(
            read(fh, 0, data.len() + 10).unwrap(),
            data,
            "clipped at the end"
        );
        ring.offline.store(false, Ordering::SeqCst);
        fs.release(fh);
    })
    .await
    .unwrap();
}

/// A file read whole while the disk lags (here: a write-behind budget of one block, so
/// most ranges find it full and are not written at once) still ends up complete in the
/// file cache: each such range is filled later, read again once the disk has room, and
/// the next open needs no ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_whole_while_the_disk_lags_still_ends_up_in_the_file_cache() {
    let src = TempDir::new("mfs-lag");
    let bs = cfs_tests::tree::BS;
    let data = cfs_tests::tree::pattern(24 * bs + 7, 9);
    std::fs::write(src.path().join("big"), &data).unwrap();
    let (ring, _, fsid) = published(src.path(), 9).await;
    let cache = TempDir::new("mfs-lag-cache");
    let mut fc = cfs_fuse::mount::FileCacheOpts::new(cache.0.clone(), 64 << 20);
    fc.write_behind_bytes = bs;
    let opts = MountOpts {
        file_cache: Some(fc),
        ..MountOpts::default()
    };
    let fs = open_fs(ring.clone(), fsid, opts).await.unwrap();
    let cache_dir = cache.0.clone();
    tokio::task::spawn_blocking(move || {
        let no = |_: &std::fs::File| Err(std::io::Error::other("no FUSE"));
        let ino = fs.lookup(ROOT_INO, b"big").unwrap().0;
        let Opened::Normal(fh) = fs.open(ino, false, no).unwrap() else {
            panic!("no passthrough without FUSE")
        };
        // Read as the kernel does, 1 MiB at a time, every reply handed over at once.
        let mut off = 0;
        while off < data.len() {
            let out = fs.rt().block_on(fs.read(fh, off as u64, 1 << 20)).unwrap();
            let n = out.data.as_slice().len();
            assert_eq!(out.data.as_slice(), &data[off..off + n]);
            fs.after_reply(out, off as u64);
            off += n;
        }
        fs.release(fh);
        cache_file_complete(&fs, ino, &cache_dir, &data, Duration::from_secs(20));
        // Complete: a later open reads it with the ring offline.
        ring.offline.store(true, Ordering::SeqCst);
        let Opened::Normal(fh) = fs.open(ino, false, no).unwrap() else {
            panic!("no passthrough without FUSE")
        };
        let out = fs.rt().block_on(fs.read(fh, 0, 1 << 20)).unwrap();
        assert_eq!(out.data.as_slice(), &data[..1 << 20]);
        fs.release(fh);
        ring.offline.store(false, Ordering::SeqCst);
    })
    .await
    .unwrap();
}

/// A file read through once, as the kernel reads it (1 MiB requests in order, each first
/// polled once on the FUSE thread and, when it would wait, asked again from a task), costs
/// one fetch per block and leaves no data block in memory: the kernel's page cache holds
/// what was read, and the freed buffers serve the next fetches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_through_is_fetched_once_and_not_kept() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let src = TempDir::new("mfs-stream");
    let bs = cfs_tests::tree::BS;
    let blocks = 40;
    let data = cfs_tests::tree::pattern(blocks * bs + 7, 9);
    std::fs::write(src.path().join("big"), &data).unwrap();
    let (ring, _, fsid) = published(src.path(), 9).await;
    let fs = open_fs(ring.clone(), fsid, MountOpts::default())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let ino = fs.lookup(ROOT_INO, b"big").unwrap().0;
        let Opened::Normal(fh) = fs
            .open(ino, false, |_| Err(std::io::Error::other("no FUSE")))
            .unwrap()
        else {
            panic!("no passthrough without a file cache")
        };
        let before = ring.gets.load(Ordering::SeqCst);
        let (chunk, mut got) = (1usize << 20, Vec::new());
        for off in (0..data.len()).step_by(chunk) {
            let first = {
                let _rt = fs.rt().enter();
                let mut read = std::pin::pin!(fs.read(fh, off as u64, chunk as u32));
                match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(r) => Some(r),
                    Poll::Pending => None,
                }
            };
            let out = match first {
                Some(r) => r,
                None => fs.rt().block_on(fs.read(fh, off as u64, chunk as u32)),
            }
            .unwrap();
            got.extend_from_slice(out.data.as_slice());
            fs.after_reply(out, off as u64);
        }
        assert!(got == data, "the bytes read are the file");
        let gets = ring.gets.load(Ordering::SeqCst) - before;
        // Each of the file's blocks once (its chunks and their spans block): what the
        // ring holds but the root, the top directory and the file's inode.
        let file_blocks = ring.len() as u64 - 3;
        assert!(
            gets <= file_blocks + 1,
            "{gets} fetches for {file_blocks} blocks"
        );
        fs.release(fh);
        assert!(
            fs.memory_in_use() < bs,
            "{} bytes still held after the read",
            fs.memory_in_use()
        );
    })
    .await
    .unwrap();
}
