//! Publish into an in-memory ring and read everything back through the reader.

use cfs_core::fs::{EntryKind, InodeBody};
use cfs_core::BlockKind;
use cfs_tests::tree::{pattern, sample_tree, walk, TempDir};
use cfs_tree::publish::{fsid_of, keygen, load_key, publish, PublishOpts};
use cfs_tree::reader::{get, FsError, Reader, ReaderOpts};
use cfs_tree::service::mem::MemRing;
use cfs_tree::service::RingError;
use ed25519_dalek::SigningKey;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn quiet() -> PublishOpts {
    PublishOpts {
        progress: false,
        ..PublishOpts::default()
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

/// Compare every entry under `src` with the published tree at `version`.
async fn check_tree(
    reader: &Reader<MemRing>,
    fsid: cfs_core::Id,
    version: Option<u64>,
    src: &std::path::Path,
) {
    let root = reader.root(fsid, version).await.unwrap();
    for rel in walk(src) {
        let p = src.join(&rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        // Resolve the parent, then look the last name up without following symlinks.
        let parent = rel.parent().unwrap();
        let (_, dir) = reader
            .resolve(root.top, parent.as_os_str().as_bytes())
            .await
            .unwrap();
        let e = reader
            .lookup(&dir, rel.file_name().unwrap().as_bytes())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} missing", rel.display()));
        let inode = reader.inode(e.key).await.unwrap();
        let what = rel.display();
        assert_eq!(inode.mode, md.mode() & 0o7777, "mode of {what}");
        assert_eq!(inode.mtime_sec, md.mtime(), "mtime of {what}");
        assert_eq!(
            inode.mtime_nsec as i64,
            md.mtime_nsec(),
            "mtime ns of {what}"
        );
        if md.file_type().is_symlink() {
            assert_eq!(e.kind, EntryKind::Symlink);
            let InodeBody::Symlink { target } = &inode.body else {
                panic!()
            };
            assert_eq!(
                target.as_slice(),
                std::fs::read_link(&p).unwrap().as_os_str().as_bytes()
            );
        } else if md.is_dir() {
            assert_eq!(e.kind, EntryKind::Dir);
            let names: Vec<Vec<u8>> = reader
                .list(&inode)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.name.to_vec())
                .collect();
            let mut want: Vec<Vec<u8>> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            want.sort();
            assert_eq!(names, want, "listing of {what}");
        } else {
            assert_eq!(e.kind, EntryKind::File);
            assert_eq!(inode.size(), md.len(), "size of {what}");
            let want = std::fs::read(&p).unwrap();
            let got = reader.read(&inode, 0, u64::MAX).await.unwrap();
            assert!(got == want, "content of {what}");
            // A range across a block boundary.
            if want.len() > cfs_tests::tree::BS + 10 {
                let off = cfs_tests::tree::BS as u64 - 5;
                let got = reader.read(&inode, off, 10).await.unwrap();
                assert_eq!(got, &want[off as usize..off as usize + 10]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_read_everything() {
    let src = TempDir::new("pub");
    sample_tree(src.path(), 2000);
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    assert_eq!(r.version, 1);
    assert_eq!(r.fsid, fsid_of(&key()));
    assert_eq!(r.blocks_new, r.blocks_total);
    assert_eq!(r.blocks_on_all, r.blocks_total);
    assert_eq!(
        ring.len() as u64,
        r.blocks_total + 1,
        "every block and the root"
    );
    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    check_tree(&reader, r.fsid, None, src.path()).await;

    // The 2,000-entry directory is paged; hard links are one inode with nlink 2; the
    // 3 MiB of zeros are holes.
    let root = reader.root(r.fsid, None).await.unwrap();
    let (bk, big) = reader.resolve(root.top, b"big").await.unwrap();
    assert!(
        matches!(&big.body, InodeBody::Dir { content: cfs_core::fs::DirContent::Paged(p), .. } if p.len() > 1)
    );
    assert_ne!(bk, root.top);
    let (k1, one) = reader.resolve(root.top, b"one").await.unwrap();
    let (k2, _) = reader.resolve(root.top, b"one-link").await.unwrap();
    assert_eq!(k1, k2);
    assert_eq!(one.nlink, 2);
    let (_, zeros) = reader.resolve(root.top, b"zeros").await.unwrap();
    assert_eq!(zeros.stored_bytes(), 0);
    // Relative symlinks are followed by resolve; absolute ones are refused.
    let (k3, _) = reader.resolve(root.top, b"rel-link").await.unwrap();
    assert_eq!(k3, k1);
    assert!(matches!(
        reader.resolve(root.top, b"abs-link").await,
        Err(FsError::Outside(_))
    ));
    assert!(matches!(
        reader.resolve(root.top, b"nope").await,
        Err(FsError::NotFound(_))
    ));

    // `cfs get`.
    let (fsid, v, path) = (r.fsid, None, "/several".to_string());
    let mut out = Vec::new();
    let n = get(ring.clone(), fsid, v, &path, &mut out).await.unwrap();
    assert_eq!(n, 5 * 1024 * 1024 + 7);
    assert_eq!(out, std::fs::read(src.path().join("several")).unwrap());
    assert!(get(ring.clone(), fsid, None, "/big", &mut Vec::new())
        .await
        .is_err());
    assert!(matches!(
        get(
            ring.clone(),
            cfs_core::Id::hash(b"nothing"),
            None,
            "/x",
            &mut Vec::new()
        )
        .await,
        Err(FsError::NoSuchFs(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_sends_only_changes_and_keeps_old_versions() {
    let src = TempDir::new("repub");
    sample_tree(src.path(), 50);
    let ring = Arc::new(MemRing::new());
    let r1 = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    let old_several = std::fs::read(src.path().join("several")).unwrap();

    // Unchanged tree: nothing but the previous root is new.
    let r2 = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    assert_eq!(r2.version, 2);
    assert_eq!(
        r2.blocks_new, 1,
        "only the previous root, stored as a block"
    );

    // Change one byte in the middle of a 21-block file, and add a file deep down.
    let mut changed = old_several.clone();
    changed[3 * cfs_tests::tree::BS + 7] ^= 0xff;
    std::fs::write(src.path().join("several"), &changed).unwrap();
    let deep = src.path().join("d0/d1/d2/new-file");
    std::fs::write(&deep, pattern(100, 9)).unwrap();
    let puts_before = ring.puts();
    let r3 = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    assert_eq!(r3.version, 3);
    // 1 data block + 1 indirect + 1 inode for `several`; 1 inode for the new file; the
    // directories d2, d1, d0 and the top; the previous root.
    assert!(r3.blocks_new <= 9, "sent {} blocks", r3.blocks_new);
    assert_eq!(
        ring.puts() - puts_before,
        r3.blocks_new + 1,
        "blocks and the root"
    );

    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    check_tree(&reader, r3.fsid, None, src.path()).await;
    // Version 1 is still readable through the chain of previous roots.
    let mut out = Vec::new();
    get(ring.clone(), r1.fsid, Some(1), "several", &mut out)
        .await
        .unwrap();
    assert!(out == old_several);
    assert!(get(
        ring.clone(),
        r1.fsid,
        Some(1),
        "d0/d1/d2/new-file",
        &mut Vec::new()
    )
    .await
    .is_err());
    assert!(matches!(
        reader.root(r1.fsid, Some(9)).await,
        Err(FsError::NoVersion { .. })
    ));
    assert_eq!(reader.root(r1.fsid, Some(2)).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_publish_leaves_previous_version() {
    let src = TempDir::new("intr");
    sample_tree(src.path(), 10);
    let ring = Arc::new(MemRing::new());
    let r1 = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    std::fs::write(
        src.path().join("several"),
        pattern(3 * cfs_tests::tree::BS, 77),
    )
    .unwrap();
    ring.fail_puts_after.store(2, Ordering::SeqCst);
    assert!(publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .is_err());
    ring.fail_puts_after.store(0, Ordering::SeqCst);
    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    assert_eq!(reader.root(r1.fsid, None).await.unwrap().version, 1);
    // And the next publish completes as version 2.
    let r2 = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    assert_eq!(r2.version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blocks_fail_within_the_deadline() {
    let src = TempDir::new("miss");
    std::fs::write(src.path().join("f"), pattern(3 * cfs_tests::tree::BS, 5)).unwrap();
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    let reader = Reader::new(
        ring.clone(),
        ReaderOpts {
            deadline: Duration::from_millis(300),
            ..ReaderOpts::default()
        },
    );
    let root = reader.root(r.fsid, None).await.unwrap();
    let (_, f) = reader.resolve(root.top, b"f").await.unwrap();
    ring.offline.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let e = reader.read(&f, 0, 10).await.unwrap_err();
    assert!(
        matches!(e, FsError::Ring(RingError::Unavailable { .. })),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    ring.offline.store(false, Ordering::SeqCst);
    assert_eq!(
        reader.read(&f, 0, 10).await.unwrap().len(),
        10,
        "reads work again"
    );
    // A hostile or corrupt Meta block is an error (EIO), not a panic.
    assert!(reader.inode(cfs_core::Id::hash(b"nothing")).await.is_err());
    // A block that hashes right but is not metadata is refused, not trusted.
    let junk = b"cfsM\x01 not postcard at all".to_vec();
    let k = cfs_core::Id::hash(&junk);
    use cfs_tree::service::BlockService;
    ring.put(cfs_core::block::verify(BlockKind::Meta, k, junk, false).unwrap())
        .await
        .unwrap();
    let e = reader.inode(k).await.unwrap_err();
    assert!(matches!(e, FsError::Corrupt { .. }), "{e}");
}

#[test]
fn keys_are_private_and_never_overwritten() {
    let d = TempDir::new("key");
    let p = d.path().join("site.key");
    let fsid = keygen(&p).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(keygen(&p).is_err(), "refuses to overwrite");
    assert_eq!(fsid_of(&load_key(&p).unwrap()), fsid);
    let q = d.path().join("other.key");
    assert_ne!(keygen(&q).unwrap(), fsid);
    std::fs::write(d.path().join("bad.key"), "zz").unwrap();
    assert!(load_key(&d.path().join("bad.key")).is_err());
}

/// Eight files read sequentially at once share one memory budget: cached blocks and
/// fetches in flight stay within it (plus what the demand reads themselves need), the
/// windows shrink instead, and every byte is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streams_share_one_memory_budget() {
    let src = TempDir::new("budget");
    let bs = cfs_tests::tree::BS;
    for i in 0..8u32 {
        std::fs::write(src.path().join(format!("f{i}")), pattern(24 * bs + 7, i)).unwrap();
    }
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    // Fetches take time, so read-ahead piles up in flight unless the budget stops it.
    ring.delay_ms.store(5, Ordering::SeqCst);
    let budget = 8 * bs;
    let reader = Reader::new(
        ring.clone(),
        ReaderOpts {
            cache_bytes: budget,
            // Parallelism does not bound it: the budget must.
            prefetch_parallel: 1024,
            ..ReaderOpts::default()
        },
    );
    let root = reader.root(r.fsid, None).await.unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (rd, d) = (reader.clone(), done.clone());
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !d.load(Ordering::SeqCst) {
            peak = peak.max(rd.memory_in_use());
            tokio::task::yield_now().await;
        }
        peak
    });
    let chunk = 4 * bs as u64;
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let (reader, top) = (reader.clone(), root.top);
        tasks.push(tokio::spawn(async move {
            let (_, f) = reader
                .resolve(top, format!("f{i}").as_bytes())
                .await
                .unwrap();
            let stream = reader.stream_for(&f);
            let mut got = Vec::new();
            while (got.len() as u64) < f.size() {
                let b = reader
                    .read_streamed(&f, got.len() as u64, chunk, Some(&stream))
                    .await
                    .unwrap();
                got.extend_from_slice(b.as_slice());
            }
            assert!(got == pattern(24 * bs + 7, i), "f{i} reads back");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let peak = sampler.await.unwrap();
    eprintln!("peak {peak} budget {budget}");
    // Each reader's own demand fetches (a chunk spans at most 5 blocks) may exceed it.
    let demand = 8 * 5 * bs;
    assert!(
        peak <= budget + demand,
        "peak {peak} above budget {budget} + demand {demand}"
    );
}

/// With `forget_streamed` (the mount, `cfs get`), what a stream read through leaves the
/// cache, each block fetched once; a block a stream read only in part stays, and so does
/// the block of a one-block file (identical small files share it).
#[tokio::test]
async fn what_a_stream_read_through_leaves_the_cache_and_partly_read_blocks_stay() {
    let bs = cfs_tests::tree::BS;
    let src = TempDir::new("pr-forget");
    let data = pattern(12 * bs, 4);
    std::fs::write(src.path().join("f"), &data).unwrap();
    std::fs::write(src.path().join("small"), pattern(bs / 2, 5)).unwrap();
    let ring = Arc::new(MemRing::new());
    // Fixed-size blocks (layout 1), whose boundaries the reads below are placed on.
    let fixed = PublishOpts {
        content_defined: false,
        ..quiet()
    };
    let r = publish(ring.clone(), src.path(), &key(), &fixed)
        .await
        .unwrap();
    let opts = ReaderOpts {
        forget_streamed: true,
        ..ReaderOpts::default()
    };
    let reader = Reader::new(ring.clone(), opts);
    let root = reader.root(r.fsid, None).await.unwrap();
    let (_, f) = reader.resolve(root.top, b"f").await.unwrap();
    let (_, small) = reader.resolve(root.top, b"small").await.unwrap();
    let gets = || ring.gets.load(Ordering::SeqCst);
    let read = |f, stream, off: usize, len: usize| {
        let reader = reader.clone();
        async move {
            let p = reader
                .read_streamed(f, off as u64, len as u64, Some(stream))
                .await
                .unwrap();
            p.as_slice().to_vec()
        }
    };
    // Read through: nothing of it stays, and no block was fetched twice.
    let before = gets();
    let stream = reader.stream_for(&f);
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(read(&f, &stream, got.len(), bs).await);
    }
    assert!(got == data);
    assert!(
        gets() - before <= 12 + 1,
        "{} fetches for 12 blocks",
        gets() - before
    );
    assert!(
        reader.memory_in_use() < bs,
        "{} bytes kept",
        reader.memory_in_use()
    );
    // A read from the middle of block 3 to its end: block 3 stays for its first half.
    let stream = reader.stream_for(&f);
    let tail = read(&f, &stream, 3 * bs + bs / 2, bs / 2).await;
    assert!(tail == data[3 * bs + bs / 2..4 * bs]);
    let before = gets();
    let stream = reader.stream_for(&f);
    assert!(read(&f, &stream, 3 * bs, bs / 2).await == data[3 * bs..3 * bs + bs / 2]);
    assert_eq!(
        gets(),
        before,
        "the first half of block 3 was fetched again"
    );
    // A one-block file read through stays.
    let stream = reader.stream_for(&small);
    assert_eq!(read(&small, &stream, 0, bs).await.len(), bs / 2);
    let before = gets();
    let stream = reader.stream_for(&small);
    read(&small, &stream, 0, bs).await;
    assert_eq!(gets(), before, "a one-block file was fetched again");

    // Content-defined chunks (layout 2) read through the same way: each chunk and the
    // spans block once, nothing kept.
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    let root = reader.root(r.fsid, None).await.unwrap();
    let (_, f) = reader.resolve(root.top, b"f").await.unwrap();
    let InodeBody::File {
        data: cfs_core::fs::FileData::Chunked { chunks, .. },
        ..
    } = f.body
    else {
        panic!("a chunked file: {f:?}")
    };
    let before = gets();
    let kept = reader.memory_in_use();
    let stream = reader.stream_for(&f);
    let mut got = Vec::new();
    while got.len() < data.len() {
        got.extend(read(&f, &stream, got.len(), 128 << 10).await);
    }
    assert!(got == data);
    assert!(
        gets() - before <= chunks + 1,
        "{} fetches for {chunks} chunks and their spans",
        gets() - before
    );
    let more = reader.memory_in_use().saturating_sub(kept);
    assert!(more < 4096, "{more} bytes kept");
}

/// With `forget_large_scans` (the gateway), a file larger than a quarter of the budget
/// read through by a stream alone leaves the cache (a long download neither flushes the
/// cache nor grows it); read by two streams at once, it stays for the second; a smaller
/// file stays for the next reader.
#[tokio::test]
async fn a_large_file_read_alone_leaves_the_cache_and_shared_or_small_ones_stay() {
    let bs = cfs_tests::tree::BS;
    let src = TempDir::new("pr-scan");
    let big = pattern(12 * bs, 6);
    let small = pattern(3 * bs, 7);
    std::fs::write(src.path().join("big"), &big).unwrap();
    std::fs::write(src.path().join("small"), &small).unwrap();
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    // A quarter of the budget is 10 blocks: "big" is larger, "small" is not.
    let opts = ReaderOpts {
        cache_bytes: 40 * bs,
        forget_large_scans: true,
        ..ReaderOpts::default()
    };
    let reader = Reader::new(ring.clone(), opts);
    let root = reader.root(r.fsid, None).await.unwrap();
    async fn read_through(
        reader: &Reader<MemRing>,
        f: &cfs_core::fs::Inode,
        s: &cfs_tree::reader::FileStream,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        while (got.len() as u64) < f.size() {
            let p = reader
                .read_streamed(f, got.len() as u64, cfs_tests::tree::BS as u64, Some(s))
                .await
                .unwrap();
            got.extend_from_slice(p.as_slice());
        }
        got
    }
    let (_, f) = reader.resolve(root.top, b"big").await.unwrap();
    let gets = || ring.gets.load(Ordering::SeqCst);
    // Alone: nothing of it stays.
    let lone = reader.stream_for(&f);
    assert!(read_through(&reader, &f, &lone).await == big);
    drop(lone);
    assert!(
        reader.memory_in_use() < bs,
        "{} bytes kept",
        reader.memory_in_use()
    );
    // Two readers at once: what the first read stays for the second.
    let (a, b) = (reader.stream_for(&f), reader.stream_for(&f));
    assert!(read_through(&reader, &f, &a).await == big);
    let before = gets();
    assert!(read_through(&reader, &f, &b).await == big);
    assert_eq!(gets(), before, "the second reader fetched again");
    drop((a, b));
    // A file within a quarter of the budget stays for the next reader.
    let (_, f) = reader.resolve(root.top, b"small").await.unwrap();
    assert!(read_through(&reader, &f, &reader.stream_for(&f)).await == small);
    let before = gets();
    assert!(read_through(&reader, &f, &reader.stream_for(&f)).await == small);
    assert_eq!(gets(), before, "a small file was fetched again");
}

/// A listing's inodes, and the data block of each small file, are fetched ahead in
/// batches (one exchange per batch of entries, not one per block), each block once;
/// reading the files after the listing fetches nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_is_fetched_ahead_in_batches_and_each_block_once() {
    let src = TempDir::new("pr-listing");
    let n = 300usize;
    for i in 0..n as u32 {
        std::fs::write(src.path().join(format!("f{i}")), pattern(4096, 2 * i + 1)).unwrap();
    }
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    let reader = Reader::new(ring.clone(), ReaderOpts::default());
    let root = reader.root(r.fsid, None).await.unwrap();
    let top = reader.inode(root.top).await.unwrap();
    let entries = reader.list(&top).await.unwrap();
    assert_eq!(entries.len(), n);
    let (gets, batches) = (
        || ring.gets.load(Ordering::SeqCst),
        || ring.batches.load(Ordering::SeqCst),
    );
    let before = gets();
    reader.prefetch_entries(entries.iter().map(|e| e.key).collect());
    // An inode and a data block per file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gets() - before < 2 * n as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} fetched",
            gets() - before
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let per_batch = 128;
    // Inodes in batches of 128, then the data blocks each batch of inodes named.
    assert_eq!(
        batches(),
        2 * n.div_ceil(per_batch) as u64,
        "batches for {n} entries"
    );
    let fetched = gets();
    for e in &entries {
        let i: u32 = std::str::from_utf8(&e.name[1..]).unwrap().parse().unwrap();
        let inode = reader.inode(e.key).await.unwrap();
        let got = reader.read(&inode, 0, 8192).await.unwrap();
        assert!(got == pattern(4096, 2 * i + 1), "f{i}");
    }
    assert_eq!(gets(), fetched, "a block was fetched twice");
}

/// A batch that never answers holds its blocks' readers for at most a third of the
/// deadline: then each block is fetched alone, and a read waiting on the batch gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_batch_falls_back_to_single_fetches_within_the_deadline() {
    let src = TempDir::new("pr-stall");
    for i in 0..10u32 {
        std::fs::write(src.path().join(format!("f{i}")), pattern(4096, 2 * i + 1)).unwrap();
    }
    let ring = Arc::new(MemRing::new());
    let r = publish(ring.clone(), src.path(), &key(), &quiet())
        .await
        .unwrap();
    let deadline = Duration::from_secs(3);
    let reader = Reader::new(
        ring.clone(),
        ReaderOpts {
            deadline,
            ..ReaderOpts::default()
        },
    );
    let root = reader.root(r.fsid, None).await.unwrap();
    let top = reader.inode(root.top).await.unwrap();
    let entries = reader.list(&top).await.unwrap();
    ring.stall_batches.store(true, Ordering::SeqCst);
    reader.prefetch_entries(entries.iter().map(|e| e.key).collect());
    let t0 = std::time::Instant::now();
    for e in &entries {
        let i: u32 = std::str::from_utf8(&e.name[1..]).unwrap().parse().unwrap();
        let inode = reader.inode(e.key).await.unwrap();
        assert!(reader.read(&inode, 0, 8192).await.unwrap() == pattern(4096, 2 * i + 1));
    }
    assert!(t0.elapsed() < deadline, "reads took {:?}", t0.elapsed());
}
