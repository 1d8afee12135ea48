//! Where a file's bytes are, whatever its layout: fixed-size blocks under indirect blocks
//! (layout 1) or content-defined chunks under Spans blocks (layout 2). The read path, the
//! read-ahead and the local-copy check see numbered blocks of known length; for chunked
//! files the read-ahead window works in "virtual" offsets, `unit` bytes per chunk, so its
//! sequential-run logic (written for fixed blocks) applies unchanged.

use super::{FsError, Reader};
use crate::service::BlockService;
use cfs_core::fs::chunked::{chunk_len, span_at, span_start};
use cfs_core::fs::{self, tree_path, FileData, Inode, InodeBody, Meta, Span, FANOUT};
use cfs_core::Id;
use std::sync::Arc;

/// A file's layout, from its inode (not inline files).
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    Tree {
        size: u64,
        block_size: u32,
        depth: u8,
        root: Option<Id>,
    },
    Chunked {
        size: u64,
        depth: u8,
        root: Id,
        chunks: u64,
    },
}

/// One block a read touches: its number, key (None: zeros), length, and the range of
/// it the read wants.
#[derive(Clone, Copy, Debug)]
pub struct BlockRead {
    pub index: u64,
    pub key: Option<Id>,
    pub block_len: usize,
    pub start: usize,
    pub end: usize,
}

impl Shape {
    pub fn of(file: &Inode) -> Option<Shape> {
        match &file.body {
            InodeBody::File {
                size,
                data:
                    FileData::Tree {
                        block_size,
                        depth,
                        root,
                        ..
                    },
            } => Some(Shape::Tree {
                size: *size,
                block_size: *block_size,
                depth: *depth,
                root: *root,
            }),
            InodeBody::File {
                size,
                data:
                    FileData::Chunked {
                        depth,
                        root,
                        chunks,
                        ..
                    },
            } => Some(Shape::Chunked {
                size: *size,
                depth: *depth,
                root: *root,
                chunks: *chunks,
            }),
            _ => None,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Shape::Tree { size, .. } | Shape::Chunked { size, .. } => *size,
        }
    }

    pub fn blocks(&self) -> u64 {
        match self {
            Shape::Tree {
                size, block_size, ..
            } => fs::block_count(*size, *block_size),
            Shape::Chunked { chunks, .. } => *chunks,
        }
    }

    /// Bytes per block in the read-ahead window's offsets: the block size, or a chunked
    /// file's mean chunk.
    pub fn unit(&self) -> u32 {
        match self {
            Shape::Tree { block_size, .. } => *block_size,
            Shape::Chunked { size, chunks, .. } => {
                size.div_ceil((*chunks).max(1)).clamp(1, u32::MAX as u64) as u32
            }
        }
    }

    /// Identifies the file among its readers.
    pub fn root(&self) -> Option<Id> {
        match self {
            Shape::Tree { root, .. } => *root,
            Shape::Chunked { root, .. } => Some(*root),
        }
    }
}

impl<R: BlockService> Reader<R> {
    async fn spans(&self, key: Id) -> Result<Arc<Meta>, FsError> {
        let m = self.meta(key).await?;
        match &*m {
            Meta::Spans(_) => Ok(m),
            _ => Err(corrupt(key, "expected a spans block")),
        }
    }

    /// Block `index` of the file: its key (None: a hole) and length; None past the end.
    pub(crate) async fn block_at(
        &self,
        shape: &Shape,
        index: u64,
    ) -> Result<Option<(Option<Id>, usize)>, FsError> {
        if index >= shape.blocks() {
            return Ok(None);
        }
        match *shape {
            Shape::Tree {
                size,
                block_size,
                depth,
                root,
            } => {
                let len = (size - index * block_size as u64).min(block_size as u64) as usize;
                Ok(Some((self.block_ptr(depth, root, index).await?, len)))
            }
            Shape::Chunked { depth, root, .. } => {
                let (key, start, end) = self.chunk(depth, root, index).await?;
                Ok(Some((
                    key,
                    chunk_len(start, end).map_err(|e| corrupt(root, e))?,
                )))
            }
        }
    }

    /// Chunk `index` of a chunked file: key and the bytes it covers.
    async fn chunk(
        &self,
        depth: u8,
        root: Id,
        index: u64,
    ) -> Result<(Option<Id>, u64, u64), FsError> {
        let mut key = root;
        let mut base = 0;
        let path = tree_path(index, depth);
        for (level, slot) in path.iter().enumerate() {
            let m = self.spans(key).await?;
            let Meta::Spans(s) = &*m else { unreachable!() };
            let e = s
                .get(*slot)
                .ok_or_else(|| corrupt(key, "chunk index beyond its spans"))?;
            let start = span_start(s, base, *slot);
            if level + 1 == path.len() {
                return Ok((e.key, start, e.end));
            }
            base = start;
            key = e
                .key
                .ok_or_else(|| corrupt(key, "a spans block entry without a key"))?;
        }
        Err(corrupt(root, "a chunked file of depth 0"))
    }

    /// The chunk holding `offset`: its index, key and the bytes it covers.
    async fn chunk_at(
        &self,
        depth: u8,
        root: Id,
        offset: u64,
    ) -> Result<(u64, Option<Id>, u64, u64), FsError> {
        let (mut key, mut base, mut index) = (root, 0u64, 0u64);
        for level in 0..depth {
            let m = self.spans(key).await?;
            let Meta::Spans(s) = &*m else { unreachable!() };
            let (slot, start, end) = span_at(s, base, offset)
                .ok_or_else(|| corrupt(key, "an offset its spans do not cover"))?;
            index = index
                .checked_mul(FANOUT as u64)
                .and_then(|i| i.checked_add(slot as u64))
                .ok_or_else(|| corrupt(key, "spans deeper than the file"))?;
            let e: &Span = &s[slot];
            if level + 1 == depth {
                return Ok((index, e.key, start, end));
            }
            base = start;
            key = e
                .key
                .ok_or_else(|| corrupt(key, "a spans block entry without a key"))?;
        }
        Err(corrupt(root, "a chunked file of depth 0"))
    }

    /// The blocks bytes [offset, end) of the file touch (end clipped at the file's end),
    /// and the read in the window's offsets.
    pub(crate) async fn block_reads(
        &self,
        shape: &Shape,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<BlockRead>, u64, u64), FsError> {
        let size = shape.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok((Vec::new(), offset, 0));
        }
        match *shape {
            Shape::Tree {
                block_size,
                depth,
                root,
                ..
            } => {
                let mut out = Vec::new();
                for s in fs::spans(size, block_size, offset, len) {
                    out.push(BlockRead {
                        index: s.index,
                        key: self.block_ptr(depth, root, s.index).await?,
                        block_len: s.block_len,
                        start: s.start,
                        end: s.end,
                    });
                }
                Ok((out, offset, end - offset))
            }
            Shape::Chunked {
                depth,
                root,
                chunks,
                ..
            } => {
                let unit = shape.unit() as u128;
                // Within a chunk, its share of `unit` in proportion: sequential reads
                // stay sequential in the window's offsets. (u128: no product of
                // hostile sizes overflows; the result is clamped.)
                let virt = |index: u64, start: u64, cend: u64, at: u64| {
                    let v = index as u128 * unit
                        + (at - start) as u128 * unit / (cend - start).max(1) as u128;
                    v.min(u64::MAX as u128) as u64
                };
                let (mut index, mut key, mut start, mut cend) =
                    self.chunk_at(depth, root, offset).await?;
                if index >= chunks || cend <= start || offset < start {
                    return Err(corrupt(root, "an offset outside its chunk"));
                }
                chunk_len(start, cend).map_err(|e| corrupt(root, e))?;
                let voff = virt(index, start, cend, offset);
                let mut out = Vec::new();
                loop {
                    let block_len = chunk_len(start, cend).map_err(|e| corrupt(root, e))?;
                    // As the inode's check says for the whole file: a read touches at
                    // most one chunk per MIN_BLOCK_SIZE bytes it reads.
                    if index + 1 < chunks && block_len < fs::MIN_BLOCK_SIZE as usize {
                        return Err(corrupt(root, "a chunk smaller than the smallest block"));
                    }
                    out.push(BlockRead {
                        index,
                        key,
                        block_len,
                        start: (offset.max(start) - start) as usize,
                        end: (end.min(cend) - start) as usize,
                    });
                    if cend >= end {
                        let vend = virt(index, start, cend, end);
                        return Ok((out, voff, vend.saturating_sub(voff).max(1)));
                    }
                    index += 1;
                    if index >= chunks {
                        return Err(corrupt(root, "fewer chunks than the file's size"));
                    }
                    let prev_end = cend;
                    (key, start, cend) = self.chunk(depth, root, index).await?;
                    if start != prev_end || cend <= start {
                        return Err(corrupt(root, "chunks that do not follow each other"));
                    }
                }
            }
        }
    }
}

fn corrupt(key: Id, msg: impl ToString) -> FsError {
    FsError::Corrupt {
        key,
        msg: msg.to_string(),
    }
}
