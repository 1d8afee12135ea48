//! The filesystem layout: how files, directories and symlinks become immutable blocks.
//!
//! Every inode, indirect and directory-page block is a [`BlockKind::Meta`] block: a fixed
//! format tag followed by a postcard-encoded [`Meta`]. File chunks are
//! [`BlockKind::Data`] blocks holding raw bytes. The key of every block is the SHA-1 of
//! its bytes, so identical chunks, files and whole subtrees are stored once.
//!
//! * A file's inode holds tiny contents inline ([`INLINE_MAX`]); otherwise it points at a
//!   tree of indirect blocks of any depth whose leaves are data block keys, `None` for
//!   a block of zeros (a hole).
//! * A directory's inode holds its entries (sorted by name) inline when they fit in one
//!   page, otherwise an index of pages: (first name, page key, count). A lookup binary
//!   searches the index and fetches exactly one page; a listing fetches pages in any
//!   order (or in parallel) and can be paged.
//!
//! Decoding never panics on hostile bytes: every length is bounded and checked after
//! decoding (see [`decode_meta`]). Nothing here does I/O.

use crate::block::{verify, BlockKind, Verified, MAX_BLOCK_BYTES};
use crate::id::Id;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub mod chunked;

/// Size of a data block (a file chunk).
///
/// About 256 KiB: every block costs a lookup, r puts, a store commit and a hash on each
/// replica, so small blocks (the paper's 8 KiB) make a 256 MiB file 32,768 round trips
/// per replica; at 256 KiB it is about 1,000, and a read-ahead window of a few blocks
/// keeps several replicas busy in parallel. Going to 1 MiB would quarter the per-block
/// overhead again (measured: no faster cold read on a local ring) but leaves each frame
/// at the wire limit, makes the first byte of a cold read wait for a full megabyte,
/// quadruples the granularity of a cache miss and of a changed region on republish
/// (dedup), and spreads a file over 4x fewer nodes.
///
/// 252 KiB, not 256: the node's store (redb) keeps a value in a leaf page of a power of
/// two, and a 256 KiB block plus the leaf's few dozen bytes of header took a 512 KiB
/// page: twice the disk per block, and twice the bytes zeroed, read and copied per get.
/// At 4 KiB less a block and its header fit a 256 KiB page (measured on 5 local nodes:
/// 389 MiB of store for 64 MiB published with r = 3, now 198 MiB; the nodes' CPU per
/// cold 256 MiB read down by a third). The inode records the block size, so readers
/// follow whatever a publisher chose, and trees published with 256 KiB blocks still read.
pub const BLOCK_SIZE: usize = 252 * 1024;

/// Files up to this size live inside their inode: one fetch for small files.
pub const INLINE_MAX: usize = 2048;

/// Pointers per indirect block. 4,096 x 21 bytes is about 84 KiB per indirect block;
/// depth 2 covers about 4 TiB at 252 KiB blocks, depth 4 all of u64.
pub const FANOUT: usize = 4096;

/// Deepest indirect tree a decoder accepts (FANOUT^6 blocks is beyond any u64 size).
pub const MAX_DEPTH: u8 = 6;

/// Smallest block size a decoder accepts.
pub const MIN_BLOCK_SIZE: u32 = 4096;

/// Target encoded size of one directory page (and of entries kept inline in a
/// directory inode). About 1,000 short names per page: a lookup fetches one page.
pub const DIR_PAGE_BYTES: usize = 32 * 1024;

/// Longest name in a directory (bytes), as in POSIX NAME_MAX.
pub const MAX_NAME: usize = 255;

/// Longest symlink target (bytes), as in POSIX PATH_MAX.
pub const MAX_SYMLINK: usize = 4096;

/// First bytes of every Meta block: a format tag and layout version, so that other
/// bytes (a root block stored as content, a data block) are never mistaken for metadata.
/// Layout 1 is what every block without content-defined chunks still uses (so their
/// keys, and old trees, are unchanged); layout 2 adds chunked files ([`FileData::Chunked`],
/// [`Meta::Spans`]), and only blocks that hold them carry it: a cfs that knows only
/// layout 1 refuses them by their tag instead of misreading them.
pub const META_TAG: &[u8; 5] = b"cfsM\x01";
pub const META_TAG_V2: &[u8; 5] = b"cfsM\x02";
/// The newest layout this code reads and writes.
pub const LAYOUT: u8 = 2;

/// Errors decoding or building layout blocks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("metadata block does not start with the cfs format tag")]
    BadTag,
    #[error("metadata block is in layout {0}, newer than this cfs reads ({LAYOUT}); upgrade cfs")]
    NewerLayout(u8),
    #[error("metadata block does not decode: {0}")]
    Decode(String),
    #[error("metadata block is invalid: {0}")]
    Invalid(&'static str),
    #[error("invalid name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("duplicate name {0:?} in a directory")]
    DuplicateName(String),
    #[error("directory too large for one index ({0} entries)")]
    DirTooLarge(usize),
}

/// The type of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A name in a directory and the inode it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: ByteBuf,
    /// Key of the entry's inode (a Meta block).
    pub key: Id,
    pub kind: EntryKind,
}

/// One page of a large directory, as listed in the directory's index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// The smallest name on the page.
    pub first: ByteBuf,
    pub key: Id,
    pub count: u32,
}

/// Where a directory's entries are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirContent {
    Inline(Vec<DirEntry>),
    Paged(Vec<PageRef>),
}

/// Where a file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileData {
    Inline(ByteBuf),
    /// Depth 0: `root` is the single data block. Depth d > 0: `root` is an indirect
    /// block whose pointers each cover FANOUT^(d-1) data blocks. `None` is a hole.
    Tree {
        block_size: u32,
        depth: u8,
        root: Option<Id>,
        /// Bytes in non-hole blocks (for st_blocks).
        stored: u64,
    },
    /// Layout 2: content-defined chunks of varying size (see [`chunked`]). `root` is a
    /// [`Meta::Spans`] block `depth` levels above the chunks; every Spans block but the
    /// last of its level holds FANOUT entries, so chunk i is found by its index as in a
    /// tree, and an offset by the ends the entries record.
    Chunked {
        depth: u8,
        root: Id,
        chunks: u64,
        /// Bytes in non-hole chunks (for st_blocks).
        stored: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeBody {
    File { size: u64, data: FileData },
    Dir { entries: u64, content: DirContent },
    Symlink { target: ByteBuf },
}

/// Metadata of one file, directory or symlink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    /// Permission bits (0o7777); the type is in `body`.
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Links within the published tree (for a directory, 2 + subdirectories).
    pub nlink: u32,
    pub body: InodeBody,
}

/// Every metadata block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Meta {
    Inode(Inode),
    Indirect(Vec<Option<Id>>),
    DirPage(Vec<DirEntry>),
    /// Layout 2: one level of a chunked file's tree.
    Spans(Vec<Span>),
}

/// One entry of a [`Meta::Spans`] block: a chunk (`None`: all zeros, a hole) or, above
/// the chunks, a Spans block; and the file offset where what it covers ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub key: Option<Id>,
    pub end: u64,
}

impl Inode {
    pub fn kind(&self) -> EntryKind {
        match self.body {
            InodeBody::File { .. } => EntryKind::File,
            InodeBody::Dir { .. } => EntryKind::Dir,
            InodeBody::Symlink { .. } => EntryKind::Symlink,
        }
    }

    /// st_size: bytes of a file, length of a symlink target, entry count of a directory.
    pub fn size(&self) -> u64 {
        match &self.body {
            InodeBody::File { size, .. } => *size,
            InodeBody::Dir { entries, .. } => *entries,
            InodeBody::Symlink { target } => target.len() as u64,
        }
    }

    /// Bytes actually stored (holes excluded), for st_blocks.
    pub fn stored_bytes(&self) -> u64 {
        match &self.body {
            InodeBody::File {
                data: FileData::Inline(b),
                ..
            } => b.len() as u64,
            InodeBody::File {
                data: FileData::Tree { stored, .. } | FileData::Chunked { stored, .. },
                ..
            } => *stored,
            InodeBody::Dir { .. } => DIR_PAGE_BYTES as u64,
            InodeBody::Symlink { target } => target.len() as u64,
        }
    }
}

/// Whether `m` needs layout 2.
fn layout2(m: &Meta) -> bool {
    matches!(
        m,
        Meta::Spans(_)
            | Meta::Inode(Inode {
                body: InodeBody::File {
                    data: FileData::Chunked { .. },
                    ..
                },
                ..
            })
    )
}

/// Encode a Meta block: tag (the oldest layout that holds it), then postcard.
pub fn encode_meta(m: &Meta) -> Vec<u8> {
    let mut out = if layout2(m) { META_TAG_V2 } else { META_TAG }.to_vec();
    out.extend(postcard::to_stdvec(m).expect("encoding to memory"));
    out
}

/// Decode and validate a Meta block. Never panics; rejects trailing bytes, oversized
/// blocks, unsorted or invalid names and out-of-range fields.
pub fn decode_meta(bytes: &[u8]) -> Result<Meta, LayoutError> {
    if bytes.len() > MAX_BLOCK_BYTES {
        return Err(LayoutError::Invalid("block over the size limit"));
    }
    if bytes.len() < META_TAG.len() || bytes[..4] != META_TAG[..4] {
        return Err(LayoutError::BadTag);
    }
    let layout = bytes[4];
    if layout > LAYOUT {
        return Err(LayoutError::NewerLayout(layout));
    }
    if layout == 0 {
        return Err(LayoutError::BadTag);
    }
    let body = &bytes[META_TAG.len()..];
    let (m, rest): (Meta, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| LayoutError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(LayoutError::Invalid("trailing bytes"));
    }
    // One encoding per block: a layout-1 tag on layout-2 content (or the reverse) would
    // give the same metadata two keys.
    if layout2(&m) != (layout == 2) {
        return Err(LayoutError::Invalid(
            "layout tag does not match the content",
        ));
    }
    validate(&m)?;
    Ok(m)
}

/// Decode a Meta block that must be an inode.
pub fn decode_inode(bytes: &[u8]) -> Result<Inode, LayoutError> {
    match decode_meta(bytes)? {
        Meta::Inode(i) => Ok(i),
        _ => Err(LayoutError::Invalid("expected an inode block")),
    }
}

fn validate(m: &Meta) -> Result<(), LayoutError> {
    match m {
        Meta::Inode(i) => validate_inode(i),
        Meta::Indirect(ptrs) => {
            if ptrs.is_empty() || ptrs.len() > FANOUT {
                return Err(LayoutError::Invalid("indirect block pointer count"));
            }
            Ok(())
        }
        Meta::DirPage(entries) => {
            if entries.is_empty() {
                return Err(LayoutError::Invalid("empty directory page"));
            }
            validate_entries(entries)
        }
        Meta::Spans(spans) => chunked::validate_spans(spans),
    }
}

fn validate_inode(i: &Inode) -> Result<(), LayoutError> {
    if i.mode & !0o7777 != 0 {
        return Err(LayoutError::Invalid("mode has bits beyond 0o7777"));
    }
    if i.mtime_nsec >= 1_000_000_000 {
        return Err(LayoutError::Invalid("mtime nanoseconds out of range"));
    }
    match &i.body {
        InodeBody::File { size, data } => match data {
            FileData::Inline(b) => {
                if b.len() > INLINE_MAX || b.len() as u64 != *size {
                    return Err(LayoutError::Invalid("inline file size"));
                }
            }
            FileData::Tree {
                block_size,
                depth,
                stored,
                ..
            } => {
                if *block_size < MIN_BLOCK_SIZE || *block_size as usize > MAX_BLOCK_BYTES {
                    return Err(LayoutError::Invalid("block size out of range"));
                }
                if *depth > MAX_DEPTH || *stored > *size {
                    return Err(LayoutError::Invalid("file tree depth or stored size"));
                }
                let blocks = size.div_ceil(*block_size as u64);
                if blocks > capacity(*depth) {
                    return Err(LayoutError::Invalid("file larger than its tree"));
                }
            }
            FileData::Chunked {
                depth,
                chunks,
                stored,
                ..
            } => chunked::validate_file(*size, *depth, *chunks, *stored)?,
        },
        InodeBody::Dir { entries, content } => match content {
            DirContent::Inline(e) => {
                if e.len() as u64 != *entries {
                    return Err(LayoutError::Invalid("directory entry count"));
                }
                validate_entries(e)?;
            }
            DirContent::Paged(pages) => {
                let mut total = 0u64;
                for (n, p) in pages.iter().enumerate() {
                    check_name(&p.first)?;
                    if p.count == 0 {
                        return Err(LayoutError::Invalid("empty page in directory index"));
                    }
                    if n > 0 && pages[n - 1].first.as_slice() >= p.first.as_slice() {
                        return Err(LayoutError::Invalid("directory index not sorted"));
                    }
                    total += p.count as u64;
                }
                if total != *entries {
                    return Err(LayoutError::Invalid("directory entry count"));
                }
            }
        },
        InodeBody::Symlink { target } => {
            if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
                return Err(LayoutError::Invalid("symlink target"));
            }
        }
    }
    Ok(())
}

fn validate_entries(e: &[DirEntry]) -> Result<(), LayoutError> {
    for (n, x) in e.iter().enumerate() {
        check_name(&x.name)?;
        if n > 0 && e[n - 1].name.as_slice() >= x.name.as_slice() {
            return Err(LayoutError::Invalid("directory entries not sorted"));
        }
    }
    Ok(())
}

/// A name is 1 to 255 bytes, without '/' or NUL, and not "." or "..".
pub fn check_name(name: &[u8]) -> Result<(), LayoutError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME {
        Some("longer than 255 bytes")
    } else if name.contains(&b'/') || name.contains(&0) {
        Some("contains '/' or NUL")
    } else if name == b"." || name == b".." {
        Some("reserved")
    } else {
        None
    };
    match why {
        Some(w) => Err(LayoutError::BadName(
            String::from_utf8_lossy(name).into_owned(),
            w,
        )),
        None => Ok(()),
    }
}

/// Number of data blocks a tree of `depth` can address (saturating).
pub fn capacity(depth: u8) -> u64 {
    (0..depth).fold(1u64, |c, _| c.saturating_mul(FANOUT as u64))
}

/// A block ready to store: kind, key and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBlock {
    pub kind: BlockKind,
    pub key: Id,
    pub bytes: Vec<u8>,
}

impl NewBlock {
    pub fn meta(m: &Meta) -> NewBlock {
        let bytes = encode_meta(m);
        NewBlock {
            kind: BlockKind::Meta,
            key: Id::hash(&bytes),
            bytes,
        }
    }
    pub fn data(bytes: Vec<u8>) -> NewBlock {
        NewBlock {
            kind: BlockKind::Data,
            key: Id::hash(&bytes),
            bytes,
        }
    }
    /// As a verified block for the ring (we computed the key ourselves).
    pub fn into_verified(self) -> Verified {
        verify(self.kind, self.key, self.bytes, false).expect("own block verifies")
    }
}

/// A chunk of a file as a data block, or `None` if it is all zeros (a hole).
pub fn chunk_block(chunk: &[u8]) -> Option<NewBlock> {
    if chunk.iter().all(|&b| b == 0) {
        None
    } else {
        Some(NewBlock::data(chunk.to_vec()))
    }
}

/// Build the indirect tree over a file's block pointers. Returns the file data
/// descriptor and the indirect blocks to store (children before parents).
pub fn build_file_tree(
    size: u64,
    block_size: u32,
    ptrs: &[Option<Id>],
) -> (FileData, Vec<NewBlock>) {
    let stored_blocks = ptrs.iter().filter(|p| p.is_some()).count() as u64;
    // Only the last block may be short; compute stored bytes exactly.
    let bs = block_size as u64;
    let mut stored = stored_blocks * bs;
    if let Some(Some(_)) = ptrs.last() {
        let last_len = size - (ptrs.len() as u64 - 1) * bs;
        stored = stored - bs + last_len;
    }
    let mut blocks = Vec::new();
    let mut level: Vec<Option<Id>> = ptrs.to_vec();
    let mut depth = 0u8;
    while level.len() > 1 {
        let mut up = Vec::with_capacity(level.len().div_ceil(FANOUT));
        for group in level.chunks(FANOUT) {
            if group.iter().all(|p| p.is_none()) {
                up.push(None);
            } else {
                let b = NewBlock::meta(&Meta::Indirect(group.to_vec()));
                up.push(Some(b.key));
                blocks.push(b);
            }
        }
        level = up;
        depth += 1;
    }
    let root = level.first().copied().flatten();
    (
        FileData::Tree {
            block_size,
            depth,
            root,
            stored,
        },
        blocks,
    )
}

/// Build a whole file from bytes in memory (tests, small files). Returns the inode and
/// every block to store (data, indirect; not the inode itself).
pub fn build_file(
    bytes: &[u8],
    mode: u32,
    mtime: (i64, u32),
    nlink: u32,
) -> (Inode, Vec<NewBlock>) {
    build_file_with(bytes, BLOCK_SIZE, mode, mtime, nlink)
}

/// As [`build_file`] with a chosen block size.
pub fn build_file_with(
    bytes: &[u8],
    block_size: usize,
    mode: u32,
    mtime: (i64, u32),
    nlink: u32,
) -> (Inode, Vec<NewBlock>) {
    let size = bytes.len() as u64;
    let mut blocks = Vec::new();
    let data = if bytes.len() <= INLINE_MAX {
        FileData::Inline(ByteBuf::from(bytes.to_vec()))
    } else {
        let mut ptrs = Vec::new();
        for c in bytes.chunks(block_size) {
            let b = chunk_block(c);
            ptrs.push(b.as_ref().map(|b| b.key));
            blocks.extend(b);
        }
        let (d, ind) = build_file_tree(size, block_size as u32, &ptrs);
        blocks.extend(ind);
        d
    };
    (
        Inode {
            mode: mode & 0o7777,
            mtime_sec: mtime.0,
            mtime_nsec: mtime.1,
            nlink,
            body: InodeBody::File { size, data },
        },
        blocks,
    )
}

/// Inode of a symlink.
pub fn build_symlink(target: &[u8], mode: u32, mtime: (i64, u32)) -> Result<Inode, LayoutError> {
    if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
        return Err(LayoutError::Invalid("symlink target"));
    }
    Ok(Inode {
        mode: mode & 0o7777,
        mtime_sec: mtime.0,
        mtime_nsec: mtime.1,
        nlink: 1,
        body: InodeBody::Symlink {
            target: ByteBuf::from(target.to_vec()),
        },
    })
}

/// Encoded size of one entry inside a page (close upper bound).
fn entry_cost(e: &DirEntry) -> usize {
    e.name.len() + 2 + 20 + 1
}

/// Build a directory: sorts entries, checks names, and splits them into pages when they
/// do not fit inline. Returns the inode and the page blocks to store. `nlink` is
/// computed (2 + subdirectories).
pub fn build_dir(
    mut entries: Vec<DirEntry>,
    mode: u32,
    mtime: (i64, u32),
) -> Result<(Inode, Vec<NewBlock>), LayoutError> {
    build_dir_with(&mut entries, DIR_PAGE_BYTES, mode, mtime)
}

fn build_dir_with(
    entries: &mut Vec<DirEntry>,
    page_bytes: usize,
    mode: u32,
    mtime: (i64, u32),
) -> Result<(Inode, Vec<NewBlock>), LayoutError> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for (n, e) in entries.iter().enumerate() {
        check_name(&e.name)?;
        if n > 0 && entries[n - 1].name == e.name {
            return Err(LayoutError::DuplicateName(
                String::from_utf8_lossy(&e.name).into_owned(),
            ));
        }
    }
    let subdirs = entries.iter().filter(|e| e.kind == EntryKind::Dir).count() as u32;
    let total: usize = entries.iter().map(entry_cost).sum();
    let mut blocks = Vec::new();
    let n = entries.len() as u64;
    let content = if total <= page_bytes {
        DirContent::Inline(std::mem::take(entries))
    } else {
        let mut pages = Vec::new();
        let mut cur: Vec<DirEntry> = Vec::new();
        let mut cur_bytes = 0;
        let mut flush = |cur: &mut Vec<DirEntry>, blocks: &mut Vec<NewBlock>| {
            let page = std::mem::take(cur);
            let first = page[0].name.clone();
            let count = page.len() as u32;
            let b = NewBlock::meta(&Meta::DirPage(page));
            pages.push(PageRef {
                first,
                key: b.key,
                count,
            });
            blocks.push(b);
        };
        for e in entries.drain(..) {
            let c = entry_cost(&e);
            if !cur.is_empty() && cur_bytes + c > page_bytes {
                flush(&mut cur, &mut blocks);
                cur_bytes = 0;
            }
            cur_bytes += c;
            cur.push(e);
        }
        if !cur.is_empty() {
            flush(&mut cur, &mut blocks);
        }
        DirContent::Paged(pages)
    };
    let inode = Inode {
        mode: mode & 0o7777,
        mtime_sec: mtime.0,
        mtime_nsec: mtime.1,
        nlink: 2 + subdirs,
        body: InodeBody::Dir {
            entries: n,
            content,
        },
    };
    if encode_meta(&Meta::Inode(inode.clone())).len() > MAX_BLOCK_BYTES {
        return Err(LayoutError::DirTooLarge(n as usize));
    }
    Ok((inode, blocks))
}

/// Which page of a paged directory may hold `name` (binary search on first names).
pub fn page_for<'a>(pages: &'a [PageRef], name: &[u8]) -> Option<&'a PageRef> {
    let i = pages.partition_point(|p| p.first.as_slice() <= name);
    i.checked_sub(1).map(|i| &pages[i])
}

/// Find `name` in a sorted slice of entries.
pub fn find_entry<'a>(entries: &'a [DirEntry], name: &[u8]) -> Option<&'a DirEntry> {
    entries
        .binary_search_by(|e| e.name.as_slice().cmp(name))
        .ok()
        .map(|i| &entries[i])
}

/// The slot indexes to follow from the root of a depth-`depth` tree down to data block
/// `index` (outermost first). Empty for depth 0.
pub fn tree_path(index: u64, depth: u8) -> Vec<usize> {
    let mut path = vec![0usize; depth as usize];
    let mut i = index;
    for slot in path.iter_mut().rev() {
        *slot = (i % FANOUT as u64) as usize;
        i /= FANOUT as u64;
    }
    path
}

/// One data block a byte range touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpan {
    /// Index of the block in the file.
    pub index: u64,
    /// Expected length of the block (block size, or less for the last one).
    pub block_len: usize,
    /// Range within the block to copy.
    pub start: usize,
    pub end: usize,
}

/// The data blocks covering bytes [offset, offset+len) of a file of `size` bytes, with
/// the part of each to copy. Clipped at end of file.
pub fn spans(size: u64, block_size: u32, offset: u64, len: u64) -> Vec<BlockSpan> {
    let bs = block_size as u64;
    let end = offset.saturating_add(len).min(size);
    if offset >= end || bs == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let index = pos / bs;
        let bstart = index * bs;
        let block_len = (size - bstart).min(bs);
        let start = pos - bstart;
        let stop = (end - bstart).min(block_len);
        out.push(BlockSpan {
            index,
            block_len: block_len as usize,
            start: start as usize,
            end: stop as usize,
        });
        pos = bstart + stop;
    }
    out
}

/// Number of data blocks of a file.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

#[cfg(test)]
mod tests;
