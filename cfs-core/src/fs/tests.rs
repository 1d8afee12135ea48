//! Unit tests of the layout (layout 1; layout 2 in `chunked.rs`).
use super::*;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u32 | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Reassemble a file from its blocks without a ring (a local pointer walk).
fn read_back(inode: &Inode, blocks: &[NewBlock]) -> Vec<u8> {
    let get = |k: Id| blocks.iter().find(|b| b.key == k).unwrap().bytes.clone();
    let InodeBody::File { size, data } = &inode.body else {
        panic!()
    };
    match data {
        FileData::Inline(b) => b.to_vec(),
        FileData::Tree {
            block_size,
            depth,
            root,
            ..
        } => {
            let mut out = Vec::new();
            for s in spans(*size, *block_size, 0, *size) {
                let mut ptr = *root;
                for slot in tree_path(s.index, *depth) {
                    ptr = match ptr {
                        None => None,
                        Some(k) => match decode_meta(&get(k)).unwrap() {
                            Meta::Indirect(p) => p.get(slot).copied().flatten(),
                            _ => panic!(),
                        },
                    };
                }
                match ptr {
                    None => out.extend(std::iter::repeat_n(0, s.end - s.start)),
                    Some(k) => {
                        let b = get(k);
                        assert_eq!(b.len(), s.block_len);
                        out.extend(&b[s.start..s.end]);
                    }
                }
            }
            out
        }
        FileData::Chunked { .. } => panic!("fixed-size builds only"),
    }
}

fn roundtrip(bytes: &[u8], bs: usize) -> (Inode, Vec<NewBlock>) {
    let (inode, blocks) = build_file_with(bytes, bs, 0o644, (1_700_000_000, 5), 1);
    let enc = encode_meta(&Meta::Inode(inode.clone()));
    assert_eq!(decode_meta(&enc).unwrap(), Meta::Inode(inode.clone()));
    for b in &blocks {
        if b.kind == BlockKind::Meta {
            decode_meta(&b.bytes).unwrap();
        }
        assert!(b.bytes.len() <= MAX_BLOCK_BYTES);
    }
    assert_eq!(read_back(&inode, &blocks), bytes);
    (inode, blocks)
}

#[test]
fn file_sizes_round_trip() {
    for n in [
        0,
        1,
        INLINE_MAX,
        INLINE_MAX + 1,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
    ] {
        let (inode, _) = roundtrip(&pattern(n, 3), BLOCK_SIZE);
        assert_eq!(inode.size(), n as u64);
    }
    let (i, b) = roundtrip(&pattern(5 * 1024 * 1024 + 17, 9), BLOCK_SIZE);
    assert_eq!(b.len(), 21 + 1); // 21 data blocks + 1 indirect
    assert!(matches!(
        i.body,
        InodeBody::File {
            data: FileData::Tree { depth: 1, .. },
            ..
        }
    ));
}

#[test]
fn deep_trees_with_small_blocks() {
    // 4 KiB blocks and > FANOUT blocks: depth 2.
    let bytes = pattern(4096 * (FANOUT + 3) + 5, 1);
    let (i, _) = roundtrip(&bytes, 4096);
    assert!(matches!(
        i.body,
        InodeBody::File {
            data: FileData::Tree { depth: 2, .. },
            ..
        }
    ));
}

#[test]
fn zeros_become_holes() {
    let zeros = vec![0u8; 3 * 1024 * 1024];
    let (i, b) = roundtrip(&zeros, BLOCK_SIZE);
    assert!(b.is_empty());
    assert_eq!(i.stored_bytes(), 0);
    let mut mixed = vec![0u8; 3 * BLOCK_SIZE + 10];
    mixed[BLOCK_SIZE + 3] = 7;
    let (i, b) = roundtrip(&mixed, BLOCK_SIZE);
    assert_eq!(b.iter().filter(|b| b.kind == BlockKind::Data).count(), 1);
    assert_eq!(i.stored_bytes(), BLOCK_SIZE as u64);
}

#[test]
fn identical_chunks_share_a_key() {
    let mut bytes = pattern(BLOCK_SIZE, 4);
    bytes.extend(bytes.clone());
    let (_, b) = roundtrip(&bytes, BLOCK_SIZE);
    assert_eq!(b[0].key, b[1].key);
}

fn entry(name: &str, kind: EntryKind) -> DirEntry {
    DirEntry {
        name: ByteBuf::from(name.as_bytes().to_vec()),
        key: Id::hash(name.as_bytes()),
        kind,
    }
}

#[test]
fn small_dir_inline_sorted() {
    let (i, b) = build_dir(
        vec![entry("b", EntryKind::File), entry("a", EntryKind::Dir)],
        0o755,
        (0, 0),
    )
    .unwrap();
    assert!(b.is_empty());
    assert_eq!(i.nlink, 3);
    let InodeBody::Dir {
        content: DirContent::Inline(e),
        ..
    } = &i.body
    else {
        panic!()
    };
    assert_eq!(e[0].name.as_slice(), b"a");
    assert!(find_entry(e, b"b").is_some());
    assert!(find_entry(e, b"c").is_none());
    let dup = build_dir(
        vec![entry("x", EntryKind::File), entry("x", EntryKind::File)],
        0o755,
        (0, 0),
    );
    assert!(matches!(dup, Err(LayoutError::DuplicateName(_))));
    assert!(build_dir(vec![entry("a/b", EntryKind::File)], 0o755, (0, 0)).is_err());
    assert!(build_dir(
        vec![entry(&"x".repeat(256), EntryKind::File)],
        0o755,
        (0, 0)
    )
    .is_err());
    assert!(build_dir(
        vec![entry(&"x".repeat(255), EntryKind::File)],
        0o755,
        (0, 0)
    )
    .is_ok());
}

#[test]
fn large_dir_paged_and_searchable() {
    let names: Vec<String> = (0..2000)
        .map(|i| format!("file-{i:05}-{}", "n".repeat(i % 40)))
        .collect();
    let entries = names.iter().map(|n| entry(n, EntryKind::File)).collect();
    let (inode, pages) = build_dir(entries, 0o755, (0, 0)).unwrap();
    assert!(pages.len() >= 2, "2,000 entries span several pages");
    let enc = encode_meta(&Meta::Inode(inode.clone()));
    assert_eq!(decode_meta(&enc).unwrap(), Meta::Inode(inode.clone()));
    let InodeBody::Dir {
        entries: n,
        content: DirContent::Paged(index),
    } = &inode.body
    else {
        panic!()
    };
    assert_eq!(*n, 2000);
    let page = |k: Id| match decode_meta(&pages.iter().find(|b| b.key == k).unwrap().bytes).unwrap()
    {
        Meta::DirPage(e) => e,
        _ => panic!(),
    };
    // Every name is found by fetching exactly the one page the index points at.
    for name in &names {
        let p = page_for(index, name.as_bytes()).unwrap();
        let e = page(p.key);
        assert_eq!(
            find_entry(&e, name.as_bytes()).unwrap().key,
            Id::hash(name.as_bytes())
        );
    }
    assert!(page_for(index, b"a").is_none());
    let p = page_for(index, b"zzz").unwrap();
    assert!(find_entry(&page(p.key), b"zzz").is_none());
    // Listing in index order gives all names sorted.
    let all: Vec<_> = index.iter().flat_map(|p| page(p.key)).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        all.iter()
            .map(|e| String::from_utf8(e.name.to_vec()).unwrap())
            .collect::<Vec<_>>(),
        sorted
    );
}

#[test]
fn spans_cover_ranges() {
    let s = spans(10, 4096, 0, 100);
    assert_eq!(
        s,
        vec![BlockSpan {
            index: 0,
            block_len: 10,
            start: 0,
            end: 10
        }]
    );
    let s = spans(10000, 4096, 4000, 200);
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].start, s[0].end, s[1].start, s[1].end),
        (4000, 4096, 0, 104)
    );
    assert!(spans(10, 4096, 10, 5).is_empty());
    assert!(spans(10, 4096, u64::MAX, u64::MAX).is_empty());
    assert_eq!(tree_path(4097, 2), vec![1, 1]);
    assert!(tree_path(3, 0).is_empty());
}

#[test]
fn garbage_never_panics() {
    let mut x = 0x1234_5678u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Valid blocks to mutate.
    let (inode, blocks) = build_file_with(&pattern(5 * 4096 + 1, 2), 4096, 0o644, (0, 0), 1);
    let mut seeds: Vec<Vec<u8>> = blocks.iter().map(|b| b.bytes.clone()).collect();
    seeds.push(encode_meta(&Meta::Inode(inode)));
    let names: Vec<String> = (0..1500).map(|i| format!("n{i}")).collect();
    let (d, pages) = build_dir(
        names.iter().map(|n| entry(n, EntryKind::Dir)).collect(),
        0o700,
        (0, 0),
    )
    .unwrap();
    seeds.push(encode_meta(&Meta::Inode(d)));
    seeds.extend(pages.into_iter().map(|b| b.bytes));
    for round in 0..20_000 {
        let mut b = if round % 3 == 0 {
            let n = (next() % 300) as usize;
            let mut v: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                v.splice(0..0, META_TAG.iter().copied());
            }
            v
        } else {
            seeds[(next() as usize) % seeds.len()].clone()
        };
        if !b.is_empty() {
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            if next() % 5 == 0 {
                b.truncate((next() as usize) % b.len());
            }
        }
        if let Ok(m) = decode_meta(&b) {
            // Whatever decodes re-validates and re-encodes identically.
            assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m);
        }
    }
    assert_eq!(decode_meta(b"hello"), Err(LayoutError::BadTag));
    // A huge declared length is an error, not an allocation.
    let mut v = META_TAG.to_vec();
    v.extend([2u8, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(decode_meta(&v).is_err());
}
