//! Re-publishing with the stat index: unchanged files are not read, changed ones are, a
//! damaged or stale index means reading everything, and a file that changes while it is
//! read is never published with a size or time its bytes do not have.

use cfs_core::fs::InodeBody;
use cfs_tests::tree::{pattern, sample_tree, walk, TempDir};
use cfs_tree::publish::{publish, PublishError, PublishOpts, Receipt};
use cfs_tree::reader::{get, Reader, ReaderOpts};
use cfs_tree::service::mem::MemRing;
use ed25519_dalek::SigningKey;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn opts(index: &Path) -> PublishOpts {
    PublishOpts {
        progress: false,
        index: Some(index.to_path_buf()),
        // Files made a moment ago are recorded (the tests change them only after).
        settle: Duration::ZERO,
        ..PublishOpts::default()
    }
}

/// Regular files under `src` (hard links once), relative.
fn files(src: &Path) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    walk(src)
        .into_iter()
        .filter(|r| {
            let m = std::fs::symlink_metadata(src.join(r)).unwrap();
            m.is_file() && seen.insert(m.ino())
        })
        .collect()
}

/// Every regular file of the newest version reads as the file on disk, with its mtime.
async fn check_files(ring: &Arc<MemRing>, r: &Receipt, src: &Path) {
    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    let root = reader.root(r.fsid, None).await.unwrap();
    for rel in walk(src) {
        let p = src.join(&rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        if !md.is_file() {
            continue;
        }
        let name = rel.to_str().unwrap();
        let mut out = Vec::new();
        get(ring.clone(), r.fsid, None, name, &mut out)
            .await
            .unwrap();
        assert!(out == std::fs::read(&p).unwrap(), "bytes of {name}");
        let (_, inode) = reader.resolve(root.top, name.as_bytes()).await.unwrap();
        assert_eq!(
            (inode.mtime_sec, inode.mtime_nsec as i64),
            (md.mtime(), md.mtime_nsec()),
            "mtime of {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_files_are_not_read_again_and_changed_ones_are() {
    let src = TempDir::new("incr");
    sample_tree(src.path(), 50);
    let idx = TempDir::new("incr-idx");
    let idx = idx.path().join("tree.idx");
    let ring = Arc::new(MemRing::new());
    let n = files(src.path()).len() as u64;

    let r1 = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!((r1.files_reused, r1.blocks_reused), (0, 0));
    assert!(idx.exists(), "the index is written");

    // Unchanged: no file is read, every directory is reused, only the previous root
    // (kept as a block) is new; the totals are those of a full publish.
    let r2 = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!(r2.files_reused, n);
    assert_eq!(r2.blocks_new, 1);
    assert_eq!(r2.blocks_total, r1.blocks_total + 1);
    assert_eq!(r2.files, r1.files);
    check_files(&ring, &r2, src.path()).await;

    // A new mtime: read again (and the ring shows the new time).
    let a = src.path().join("several");
    let f = std::fs::File::options().write(true).open(&a).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let r3 = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!(
        r3.files_reused,
        n - 1,
        "touching a file's mtime re-reads it"
    );
    check_files(&ring, &r3, src.path()).await;

    // The same size and mtime, other bytes: only the ctime tells, and it is read again.
    let b = src.path().join("under");
    let (old, md) = (std::fs::read(&b).unwrap(), std::fs::metadata(&b).unwrap());
    let mut new = old.clone();
    new[0] ^= 0xff;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::fs::write(&b, &new).unwrap();
        let f = std::fs::File::options().write(true).open(&b).unwrap();
        f.set_modified(md.modified().unwrap()).unwrap();
        drop(f);
        let now = std::fs::metadata(&b).unwrap();
        assert_eq!((now.len(), now.mtime_nsec()), (md.len(), md.mtime_nsec()));
        // The clock may not have ticked since the file's last change.
        if (now.ctime(), now.ctime_nsec()) != (md.ctime(), md.ctime_nsec()) {
            break;
        }
        assert!(Instant::now() < deadline, "the ctime never moved");
        std::thread::yield_now();
    }
    let r4 = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!(r4.files_reused, n - 1, "a new ctime re-reads the file");
    check_files(&ring, &r4, src.path()).await;

    // A file added between others and one removed: the rest are still not read (the
    // index is read in walk order, and passes over what is gone).
    std::fs::write(src.path().join("big/entry-00010a"), b"new").unwrap();
    std::fs::remove_file(src.path().join("big/entry-00020")).unwrap();
    let r = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!(r.files_reused, n - 1, "all but the removed one");
    check_files(&ring, &r, src.path()).await;
    std::fs::remove_file(src.path().join("big/entry-00010a")).unwrap();
    std::fs::write(src.path().join("big/entry-00020"), b"20\n").unwrap();
    publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();

    // --rehash reads everything and gives the same tree.
    let rehash = PublishOpts {
        rehash: true,
        ..opts(&idx)
    };
    let r5 = publish(ring.clone(), src.path(), &key(), &rehash)
        .await
        .unwrap();
    assert_eq!(r5.files_reused, 0);
    let root = |v| {
        let ring = ring.clone();
        async move {
            Reader::new(ring, ReaderOpts::default())
                .root(r5.fsid, Some(v))
                .await
                .unwrap()
                .top
        }
    };
    assert_eq!(root(6).await, root(7).await, "the same tree either way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_stale_index_means_reading_everything() {
    let src = TempDir::new("incr-bad");
    sample_tree(src.path(), 10);
    let dir = TempDir::new("incr-bad-idx");
    let idx = dir.path().join("tree.idx");
    let ring = Arc::new(MemRing::new());
    publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    let good = std::fs::read(&idx).unwrap();

    // One byte flipped, or cut short, or another file's bytes: never used.
    for bad in [
        {
            let mut b = good.clone();
            let i = b.len() / 2;
            b[i] ^= 1;
            b
        },
        good[..good.len() - 7].to_vec(),
        b"not an index".to_vec(),
    ] {
        std::fs::write(&idx, &bad).unwrap();
        let r = publish(ring.clone(), src.path(), &key(), &opts(&idx))
            .await
            .unwrap();
        assert_eq!(r.files_reused, 0, "a damaged index is not used");
        check_files(&ring, &r, src.path()).await;
    }
    // The last publish rewrote it whole: used again.
    let r = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert!(r.files_reused > 0);

    // Someone publishes the key from elsewhere (no index): ours names a root that is
    // no longer the newest, and a file it records is gone from that version.
    std::fs::write(src.path().join("several"), pattern(100_000, 5)).unwrap();
    let elsewhere = PublishOpts {
        index: None,
        ..opts(&idx)
    };
    publish(ring.clone(), src.path(), &key(), &elsewhere)
        .await
        .unwrap();
    let r = publish(ring.clone(), src.path(), &key(), &opts(&idx))
        .await
        .unwrap();
    assert_eq!(r.files_reused, 0, "a stale index is not used");
    check_files(&ring, &r, src.path()).await;
}

/// A file that grows while it is published: either the publish reads it again until
/// its stat holds still and records what it read, or it fails naming the file. Never
/// an inode whose size its blocks do not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_growing_during_publish_is_read_again_or_named() {
    let src = TempDir::new("incr-grow");
    let log = src.path().join("growing.log");
    std::fs::write(&log, pattern(16 << 20, 1)).unwrap();
    std::fs::write(src.path().join("quiet"), pattern(10_000, 2)).unwrap();
    let dir = TempDir::new("incr-grow-idx");
    let idx = dir.path().join("tree.idx");
    let ring = Arc::new(MemRing::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::options().append(true).open(&log).unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&pattern(4096, 3)).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    let got = publish(ring.clone(), src.path(), &key(), &opts(&idx)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let appended = writer.join().unwrap();
    assert!(appended > 0);
    let now = std::fs::read(&log).unwrap();
    match got {
        Ok(r) => {
            let reader = Reader::new(ring.clone(), ReaderOpts::default());
            let root = reader.root(r.fsid, None).await.unwrap();
            let (_, inode) = reader.resolve(root.top, b"growing.log").await.unwrap();
            let InodeBody::File { size, .. } = inode.body else {
                panic!("a file")
            };
            let mut out = Vec::new();
            get(ring.clone(), r.fsid, None, "growing.log", &mut out)
                .await
                .unwrap();
            assert_eq!(out.len() as u64, size);
            assert!(out[..] == now[..out.len()], "a prefix the file really had");
            eprintln!("INCREMENTAL: a growing file published at {size} bytes");
        }
        Err(PublishError::Changed(p)) => {
            assert_eq!(p, log);
            eprintln!(
                "INCREMENTAL: a growing file refused: {}",
                PublishError::Changed(p)
            );
        }
        Err(e) => panic!("{e}"),
    }
}

/// Content-defined chunks: 1 MiB inserted in the middle of a file makes a few new chunks
/// (fixed-size blocks would shift every block after it), and the new version reads back
/// byte-exact at any offset, as does the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insertion_makes_few_new_chunks_and_every_offset_reads_right() {
    let src = TempDir::new("incr-cdc");
    let file = src.path().join("image");
    let old = pattern(48 << 20, 11);
    std::fs::write(&file, &old).unwrap();
    let ring = Arc::new(MemRing::new());
    let plain = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    let r1 = publish(ring.clone(), src.path(), &key(), &plain)
        .await
        .unwrap();
    let mut new = old[..20 << 20].to_vec();
    new.extend(pattern(1 << 20, 12));
    new.extend_from_slice(&old[20 << 20..]);
    std::fs::write(&file, &new).unwrap();
    let r2 = publish(ring.clone(), src.path(), &key(), &plain)
        .await
        .unwrap();
    // The inserted MiB is about 8 chunks; the chunks it cut into, the spans block, the
    // inode, the top directory and the previous root are the rest.
    eprintln!(
        "INCREMENTAL: 1 MiB inserted in 48 MiB: {} new blocks of {}",
        r2.blocks_new, r2.blocks_total
    );
    assert!(r2.blocks_new <= 24, "{} new blocks", r2.blocks_new);

    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    for (version, want) in [(1, &old), (2, &new)] {
        let root = reader.root(r1.fsid, Some(version)).await.unwrap();
        let (_, inode) = reader.resolve(root.top, b"image").await.unwrap();
        assert!(matches!(
            inode.body,
            InodeBody::File {
                data: cfs_core::fs::FileData::Chunked { .. },
                ..
            }
        ));
        let mut x = 0x9e37_79b9u64 + version;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % want.len() as u64;
            let len = (x >> 40) % (600 << 10);
            let got = reader.read(&inode, off, len).await.unwrap();
            let end = (off + len).min(want.len() as u64) as usize;
            assert!(
                got == want[off as usize..end],
                "version {version} at {off}+{len}"
            );
        }
        let mut out = Vec::new();
        get(ring.clone(), r1.fsid, Some(version), "image", &mut out)
            .await
            .unwrap();
        assert!(&out == want);
    }
}
