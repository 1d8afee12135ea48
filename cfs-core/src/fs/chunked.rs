//! Layout 2: files cut at content-defined boundaries (FastCDC), so an insertion or a
//! deletion changes the chunks it touches and not every chunk after it, as fixed-size
//! blocks do.
//!
//! A chunked file's inode points at a tree of [`Meta::Spans`] blocks. At the bottom level
//! each entry is a chunk (its key, or `None` for a chunk of zeros) and the file offset
//! where it ends; above, each entry is a Spans block and the offset where the last chunk
//! under it ends. Every Spans block but the last of its level is full (FANOUT entries),
//! so chunk `i` is reached by its index ([`super::tree_path`]), and the chunk holding an
//! offset by a binary search of the ends, one block per level.

use super::{capacity, FileData, LayoutError, Meta, NewBlock, FANOUT, MAX_DEPTH};
use crate::block::MAX_BLOCK_BYTES;
use crate::id::Id;

/// Chunk sizes. The largest is today's fixed block size (252 KiB, so a chunk and its
/// store header fit a 256 KiB page); a chunk cut there is not content-defined (the next
/// content-defined cut puts the chunking back in step). FastCDC rounds the average to a
/// power of two for its masks, so 160 KiB cuts as 128 KiB does, from 128 KiB on.
/// Measured on 256 MiB of random data (FastCDC alone, 1 MiB inserted at 4 places):
/// smallest/average 64/128 KiB: mean chunk 164 KiB, 12% cut at the largest, 8.8 new
/// chunks per insertion; 128/160: 202 KiB, 22%, 8.8; 128/192 (rounded to 256): 230 KiB,
/// 56%, 13.0 (nearly fixed-size). A first publish of 256 MiB + 1,000 files on 3 local
/// nodes (`scripts/bench-publish 64 1000`) took 1.09-1.19x the fixed-size time at 64/128
/// and 0.99-1.08x at 128/160 in the same runs: each chunk is a lookup, r puts and a
/// commit, so fewer and larger chunks are cheaper.
pub const CHUNK_MIN: u32 = 128 * 1024;
pub const CHUNK_AVG: u32 = 160 * 1024;
pub const CHUNK_MAX: u32 = super::BLOCK_SIZE as u32;

pub(super) fn validate_spans(spans: &[super::Span]) -> Result<(), LayoutError> {
    if spans.is_empty() || spans.len() > FANOUT {
        return Err(LayoutError::Invalid("spans block entry count"));
    }
    let mut prev = 0u64;
    for s in spans {
        if s.end <= prev {
            return Err(LayoutError::Invalid("spans block ends not increasing"));
        }
        prev = s.end;
    }
    Ok(())
}

pub(super) fn validate_file(
    size: u64,
    depth: u8,
    chunks: u64,
    stored: u64,
) -> Result<(), LayoutError> {
    if depth == 0 || depth > MAX_DEPTH || chunks < 2 || chunks > capacity(depth) {
        return Err(LayoutError::Invalid("chunked file depth or chunk count"));
    }
    if chunks > size || stored > size || size > chunks.saturating_mul(CHUNK_MAX as u64) {
        return Err(LayoutError::Invalid("chunked file size"));
    }
    // Chunks of a few bytes would make a read walk and piece together one entry per
    // byte: every chunk but the last is at least MIN_BLOCK_SIZE.
    if (chunks - 1).saturating_mul(super::MIN_BLOCK_SIZE as u64) > size {
        return Err(LayoutError::Invalid("chunked file with chunks too small"));
    }
    Ok(())
}

/// Build the Spans tree over a file's chunks, given as (key, length), `None` for zeros.
/// Returns the file data and the Spans blocks to store (children before parents). A file
/// of one chunk is a plain depth-0 tree: no Spans block, and layout 1.
pub fn build_chunked_tree(chunks: &[(Option<Id>, u32)]) -> (FileData, Vec<NewBlock>) {
    let stored: u64 = chunks
        .iter()
        .filter(|c| c.0.is_some())
        .map(|c| c.1 as u64)
        .sum();
    if chunks.len() <= 1 {
        return (
            FileData::Tree {
                block_size: CHUNK_MAX,
                depth: 0,
                root: chunks.first().and_then(|c| c.0),
                stored,
            },
            Vec::new(),
        );
    }
    let mut end = 0u64;
    let mut level: Vec<super::Span> = chunks
        .iter()
        .map(|(key, len)| {
            end += *len as u64;
            super::Span { key: *key, end }
        })
        .collect();
    let mut blocks = Vec::new();
    let mut depth = 0u8;
    while depth == 0 || level.len() > 1 {
        let mut up = Vec::with_capacity(level.len().div_ceil(FANOUT));
        for group in level.chunks(FANOUT) {
            let b = NewBlock::meta(&Meta::Spans(group.to_vec()));
            up.push(super::Span {
                key: Some(b.key),
                end: group[group.len() - 1].end,
            });
            blocks.push(b);
        }
        level = up;
        depth += 1;
    }
    let root = level[0].key.expect("a Spans block");
    (
        FileData::Chunked {
            depth,
            root,
            chunks: chunks.len() as u64,
            stored,
        },
        blocks,
    )
}

/// Where chunk `slot` of a Spans block covering [`base`, its last end) begins.
pub fn span_start(spans: &[super::Span], base: u64, slot: usize) -> u64 {
    if slot == 0 {
        base
    } else {
        spans[slot - 1].end
    }
}

/// The entry of a Spans block (covering from `base`) that holds `offset`: its slot and
/// the range it covers. None if the block ends at or before `offset`.
pub fn span_at(spans: &[super::Span], base: u64, offset: u64) -> Option<(usize, u64, u64)> {
    let slot = spans.partition_point(|s| s.end <= offset);
    let s = spans.get(slot)?;
    let start = span_start(spans, base, slot);
    (start <= offset).then_some((slot, start, s.end))
}

/// A chunk's length as its Spans entry says, checked against the block-size limit.
pub fn chunk_len(start: u64, end: u64) -> Result<usize, LayoutError> {
    let len = end.saturating_sub(start);
    if len == 0 || len > MAX_BLOCK_BYTES as u64 {
        return Err(LayoutError::Invalid("chunk length out of range"));
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{decode_meta, encode_meta, Inode, InodeBody, Span, META_TAG_V2};

    #[test]
    fn a_chunked_tree_finds_every_offset_and_tags_its_blocks_layout_2() {
        // 10,000 chunks of 4,096..4,145 bytes: two levels of Spans.
        let chunks: Vec<(Option<Id>, u32)> = (0..10_000u32)
            .map(|i| {
                (
                    (i % 7 != 0).then(|| Id::hash(&i.to_be_bytes())),
                    4096 + i % 50,
                )
            })
            .collect();
        let (data, blocks) = build_chunked_tree(&chunks);
        let FileData::Chunked {
            depth,
            root,
            chunks: n,
            ..
        } = data
        else {
            panic!("{data:?}")
        };
        assert_eq!((depth, n), (2, 10_000));
        let decoded: std::collections::HashMap<Id, Vec<Span>> = blocks
            .iter()
            .map(|b| {
                assert!(b.bytes.starts_with(META_TAG_V2));
                match decode_meta(&b.bytes).unwrap() {
                    Meta::Spans(s) => (b.key, s),
                    m => panic!("{m:?}"),
                }
            })
            .collect();
        let get = |k: Id| -> &Vec<Span> { &decoded[&k] };
        let mut off = 0u64;
        for (i, (key, len)) in chunks.iter().enumerate() {
            // By offset: the top level, then the leaf.
            for probe in [off, off + *len as u64 - 1] {
                let top = get(root);
                let (slot, base, _) = span_at(top, 0, probe).unwrap();
                let leaf = get(top[slot].key.unwrap());
                let (j, start, end) = span_at(leaf, base, probe).unwrap();
                assert_eq!(slot * FANOUT + j, i);
                assert_eq!((start, end - start), (off, *len as u64));
                assert_eq!(leaf[j].key, *key);
            }
            off += *len as u64;
        }
        assert!(span_at(get(root), 0, off).is_none(), "past the end");
        // The inode says layout 2; one chunk is a plain layout-1 tree.
        let inode = Meta::Inode(Inode {
            mode: 0o644,
            mtime_sec: 0,
            mtime_nsec: 0,
            nlink: 1,
            body: InodeBody::File { size: off, data },
        });
        assert!(encode_meta(&inode).starts_with(META_TAG_V2));
        assert_eq!(decode_meta(&encode_meta(&inode)).unwrap(), inode);
        let (one, none) = build_chunked_tree(&chunks[..1]);
        assert!(none.is_empty() && matches!(one, FileData::Tree { depth: 0, .. }));
    }

    #[test]
    fn a_layout_tag_that_does_not_match_the_content_or_is_newer_is_refused() {
        let spans = Meta::Spans(vec![Span { key: None, end: 5 }]);
        let mut b = encode_meta(&spans);
        assert_eq!(decode_meta(&b).unwrap(), spans);
        b[4] = 1;
        assert!(matches!(decode_meta(&b), Err(LayoutError::Invalid(_))));
        b[4] = 3;
        assert_eq!(decode_meta(&b), Err(LayoutError::NewerLayout(3)));
        let bad = Meta::Spans(vec![Span { key: None, end: 5 }, Span { key: None, end: 5 }]);
        assert!(
            decode_meta(&encode_meta(&bad)).is_err(),
            "ends must increase"
        );
    }
}
