//! What a tree's blocks point to, for walks that visit every block reachable from a root
//! (`cfs keep`, its dry run): pure, over decoded blocks. Data blocks are named with their
//! length (from the file's size), so a walk never fetches them.

use crate::block::{BlockKind, RootBlock, VerifyError};
use crate::fs::chunked::span_start;
use crate::fs::{DirContent, FileData, InodeBody, Meta, FANOUT};
use crate::id::Id;

/// How a metadata block was reached, which says what its pointers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaRole {
    /// An inode (from a directory entry or a root's top).
    Inode,
    /// A page of a paged directory.
    DirPage,
    /// An indirect block of a file: `depth` levels above the data blocks (1: its
    /// pointers are data blocks), its first data block's index, and the file's shape.
    Indirect {
        depth: u8,
        first: u64,
        size: u64,
        block_size: u32,
    },
    /// A Spans block of a chunked file: `depth` levels above the chunks, and the file
    /// offset where what it covers begins.
    Spans { depth: u8, base: u64 },
}

/// A block a walk reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    Meta { key: Id, role: MetaRole },
    Data { key: Id, len: u64 },
}

impl Reach {
    pub fn key(&self) -> (BlockKind, Id) {
        match self {
            Reach::Meta { key, .. } => (BlockKind::Meta, *key),
            Reach::Data { key, .. } => (BlockKind::Data, *key),
        }
    }
}

/// Length of data block `index` of a file of `size` bytes in blocks of `block_size`.
fn data_len(size: u64, block_size: u32, index: u64) -> u64 {
    let bs = block_size as u64;
    size.saturating_sub(index.saturating_mul(bs)).min(bs)
}

/// The blocks `meta` (reached as `role`) points to.
pub fn children(meta: &Meta, role: MetaRole) -> Vec<Reach> {
    match (meta, role) {
        (Meta::Inode(inode), _) => match &inode.body {
            InodeBody::Dir { content, .. } => match content {
                DirContent::Inline(entries) => entries
                    .iter()
                    .map(|e| Reach::Meta {
                        key: e.key,
                        role: MetaRole::Inode,
                    })
                    .collect(),
                DirContent::Paged(pages) => pages
                    .iter()
                    .map(|p| Reach::Meta {
                        key: p.key,
                        role: MetaRole::DirPage,
                    })
                    .collect(),
            },
            InodeBody::File {
                size,
                data:
                    FileData::Tree {
                        block_size,
                        depth,
                        root: Some(root),
                        ..
                    },
            } => vec![if *depth == 0 {
                Reach::Data {
                    key: *root,
                    len: data_len(*size, *block_size, 0),
                }
            } else {
                Reach::Meta {
                    key: *root,
                    role: MetaRole::Indirect {
                        depth: *depth,
                        first: 0,
                        size: *size,
                        block_size: *block_size,
                    },
                }
            }],
            InodeBody::File {
                data: FileData::Chunked { depth, root, .. },
                ..
            } => vec![Reach::Meta {
                key: *root,
                role: MetaRole::Spans {
                    depth: *depth,
                    base: 0,
                },
            }],
            _ => Vec::new(),
        },
        (Meta::DirPage(entries), _) => entries
            .iter()
            .map(|e| Reach::Meta {
                key: e.key,
                role: MetaRole::Inode,
            })
            .collect(),
        (
            Meta::Indirect(ptrs),
            MetaRole::Indirect {
                depth,
                first,
                size,
                block_size,
            },
        ) => {
            let span = (FANOUT as u64).saturating_pow(depth.saturating_sub(1) as u32);
            ptrs.iter()
                .enumerate()
                .filter_map(|(j, p)| {
                    let key = (*p)?;
                    let at = first.saturating_add(j as u64 * span);
                    Some(if depth <= 1 {
                        Reach::Data {
                            key,
                            len: data_len(size, block_size, at),
                        }
                    } else {
                        Reach::Meta {
                            key,
                            role: MetaRole::Indirect {
                                depth: depth - 1,
                                first: at,
                                size,
                                block_size,
                            },
                        }
                    })
                })
                .collect()
        }
        (Meta::Spans(spans), MetaRole::Spans { depth, base }) => spans
            .iter()
            .enumerate()
            .filter_map(|(j, s)| {
                let key = s.key?;
                let start = span_start(spans, base, j);
                let len = s.end.saturating_sub(start);
                if depth <= 1 && len > crate::block::MAX_BLOCK_BYTES as u64 {
                    return None;
                }
                Some(if depth <= 1 {
                    Reach::Data { key, len }
                } else {
                    Reach::Meta {
                        key,
                        role: MetaRole::Spans {
                            depth: depth - 1,
                            base: start,
                        },
                    }
                })
            })
            .collect(),
        // An indirect or spans block reached as something else points nowhere we can
        // size.
        (Meta::Indirect(_), _) | (Meta::Spans(_), _) => Vec::new(),
    }
}

/// Why a previous root in a chain is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("previous root does not decode: {0}")]
    Decode(String),
    #[error("previous root's signature does not verify")]
    Signature(#[source] VerifyError),
    #[error("previous root belongs to another publisher")]
    OtherPublisher,
    #[error("previous root's version {prev} is not below {newer}")]
    NotOlder { prev: u64, newer: u64 },
}

/// The previous root that `newer.prev` names, from that block's bytes: checked to be
/// signed by the same publisher with a lower version, so a chain can only go back.
pub fn previous_root(newer: &RootBlock, bytes: &[u8]) -> Result<RootBlock, ChainError> {
    let p: RootBlock =
        postcard::from_bytes(bytes).map_err(|e| ChainError::Decode(e.to_string()))?;
    p.check_signature().map_err(ChainError::Signature)?;
    if p.public_key != newer.public_key {
        return Err(ChainError::OtherPublisher);
    }
    if p.version >= newer.version {
        return Err(ChainError::NotOlder {
            prev: p.version,
            newer: newer.version,
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{build_file_with, decode_meta, NewBlock};

    #[test]
    fn a_files_walk_names_every_data_block_with_its_length() {
        // 10 blocks of 4 KiB and a 5-byte tail: one indirect level.
        let n = 10 * 4096 + 5;
        let bytes: Vec<u8> = (0..n as u32).map(|i| (i % 251 + 1) as u8).collect();
        let (inode, blocks) = build_file_with(&bytes, 4096, 0o644, (0, 0), 1);
        let meta = Meta::Inode(inode);
        let mut todo = children(&meta, MetaRole::Inode);
        let mut data = Vec::new();
        while let Some(r) = todo.pop() {
            match r {
                Reach::Data { key, len } => data.push((key, len)),
                Reach::Meta { key, role } => {
                    let b: &NewBlock = blocks.iter().find(|b| b.key == key).unwrap();
                    let m = decode_meta(&b.bytes).unwrap();
                    todo.extend(children(&m, role));
                }
            }
        }
        data.sort_by_key(|d| d.1);
        assert_eq!(data.len(), 11);
        assert_eq!(data.iter().map(|d| d.1).sum::<u64>(), n);
        for (key, len) in &data {
            let b = blocks.iter().find(|b| b.key == *key).unwrap();
            assert_eq!(b.bytes.len() as u64, *len);
        }
    }
}
