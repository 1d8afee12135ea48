//! Reading files: block pointers, ranges with read-ahead, fetching a listing's entries
//! ahead, checking a local copy, and `cfs get`.

use super::shape::Shape;
use super::{Cached, FsError, Reader, ReaderOpts};
use crate::reader::window::{Stream, WindowOpts};
use crate::service::BlockService;
use cfs_core::fs::{self, tree_path, EntryKind, FileData, Inode, InodeBody, Meta};
use cfs_core::{BlockKind, Id};
use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Entries of one listing whose inodes are fetched ahead, at most.
const MAX_LISTING_PREFETCH: usize = 4096;

/// Entries of a listing whose inodes are asked for in one batch: small enough that the
/// first files' inodes arrive soon, large enough that a batch spans few exchanges.
const LISTING_BATCH: usize = 128;

/// Files up to this size have their data fetched with their inode after a listing.
const SMALL_FILE_PREFETCH: u64 = 64 << 10;

/// One piece of a read.
pub enum Piece {
    /// A range of a cached, verified block, shared.
    Block(Arc<Vec<u8>>, Range<usize>),
    /// Bytes of their own (a hole's zeros, inline data).
    Owned(Vec<u8>),
}

impl Piece {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Block(b, r) => &b[r.clone()],
            Piece::Owned(v) => v,
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Piece::Owned(v) => v,
            p => p.as_slice().to_vec(),
        }
    }
}

/// The read-ahead window of one reader of a file (an open file, an HTTP response),
/// counted among the file's readers while it lives.
pub struct FileStream {
    window: Mutex<Stream>,
    /// The file's tree root, and the reader's count of streams per file.
    file: Option<(Id, Arc<Mutex<HashMap<Id, usize>>>)>,
}

impl FileStream {
    /// No other stream reads the same file now.
    fn alone(&self) -> bool {
        self.file
            .as_ref()
            .is_some_and(|(r, m)| m.lock().unwrap().get(r) == Some(&1))
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        if let Some((r, m)) = &self.file {
            let mut m = m.lock().unwrap();
            if let Some(n) = m.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    m.remove(r);
                }
            }
        }
    }
}

impl<R: BlockService> Reader<R> {
    /// The data block pointer for block `index` of a tree file (None = hole).
    pub(crate) async fn block_ptr(
        &self,
        depth: u8,
        root: Option<Id>,
        index: u64,
    ) -> Result<Option<Id>, FsError> {
        let mut ptr = root;
        for slot in tree_path(index, depth) {
            let Some(k) = ptr else { return Ok(None) };
            let m = self.meta(k).await?;
            ptr = match &*m {
                Meta::Indirect(p) => p.get(slot).copied().flatten(),
                _ => {
                    return Err(FsError::Corrupt {
                        key: k,
                        msg: "expected an indirect block".into(),
                    })
                }
            };
        }
        Ok(ptr)
    }

    /// Bytes [offset, offset+len) of a file (clipped at end of file), without
    /// read-ahead.
    pub async fn read(&self, file: &Inode, offset: u64, len: u64) -> Result<Vec<u8>, FsError> {
        Ok(self
            .read_streamed(file, offset, len, None)
            .await?
            .into_vec())
    }

    /// Bytes [offset, offset+len) of a file (clipped at end of file); the read is part
    /// of `stream`, whose window decides which blocks to fetch ahead. A read within one
    /// block is that block's range, shared: the reply goes out without a copy.
    pub async fn read_streamed(
        &self,
        file: &Inode,
        offset: u64,
        len: u64,
        stream: Option<&FileStream>,
    ) -> Result<Piece, FsError> {
        let mut pieces = self.read_pieces(file, offset, len, stream).await?;
        if pieces.len() == 1 {
            if let Some(p) = pieces.pop() {
                return Ok(p);
            }
        }
        let mut out = Vec::with_capacity(pieces.iter().map(|p| p.as_slice().len()).sum());
        for p in &pieces {
            out.extend_from_slice(p.as_slice());
        }
        Ok(Piece::Owned(out))
    }

    /// The same bytes as [`Reader::read_streamed`], as pieces: ranges of cached blocks
    /// are shared, not copied (an HTTP body sends them as they are).
    pub async fn read_pieces(
        &self,
        file: &Inode,
        offset: u64,
        len: u64,
        stream: Option<&FileStream>,
    ) -> Result<Vec<Piece>, FsError> {
        let InodeBody::File { size, data } = &file.body else {
            return Err(FsError::IsDir(String::new()));
        };
        if let FileData::Inline(b) = data {
            let start = offset.min(b.len() as u64) as usize;
            let end = offset.saturating_add(len).min(b.len() as u64) as usize;
            return Ok(vec![Piece::Owned(b[start..end].to_vec())]);
        }
        let shape = Shape::of(file).ok_or_else(|| FsError::IsDir(String::new()))?;
        // Resolve pointers, then start every data fetch before waiting on the first.
        let (sp, voff, vlen) = self.block_reads(&shape, offset, len).await?;
        for s in &sp {
            if let Some(k) = s.key {
                if self.cache_get(BlockKind::Data, k).is_none() {
                    drop(self.start(BlockKind::Data, k, s.block_len, true));
                }
            }
        }
        // Where the stream's current sequential run began: only blocks it read whole
        // may leave the cache.
        let mut run_start = None;
        if let (Some(stream), false) = (stream, sp.is_empty()) {
            let short = self.short_of_memory();
            let mut st = stream.window.lock().unwrap();
            let ahead = st.on_read(voff, vlen, shape.blocks(), short);
            let front = st.front();
            run_start = Some(st.run_start());
            drop(st);
            if !ahead.is_empty() {
                self.read_ahead(shape, ahead, front);
            }
        }
        let mut out = Vec::with_capacity(sp.len());
        for s in &sp {
            match s.key {
                None => out.push(Piece::Owned(vec![0; s.end - s.start])),
                Some(k) => {
                    let d = self.data(k).await?;
                    if d.len() != s.block_len {
                        return Err(FsError::Corrupt {
                            key: k,
                            msg: format!(
                                "data block is {} bytes, expected {}",
                                d.len(),
                                s.block_len
                            ),
                        });
                    }
                    out.push(Piece::Block(d, s.start..s.end));
                }
            }
        }
        // Only once the read is whole: a read cut short (a first poll that would wait) is
        // asked again and needs its blocks still there. Blocks the run read from their
        // start to their end; not a one-block file's (identical small files share it).
        let opts = &self.inner.opts;
        let forget = opts.forget_streamed
            || (opts.forget_large_scans
                && *size > (opts.cache_bytes / 4) as u64
                && stream.is_some_and(FileStream::alone));
        if let (Some(run), true) = (run_start, forget && !sp.is_empty()) {
            let multi = shape.blocks() > 1;
            let unit = u64::from(shape.unit());
            for s in &sp {
                let whole = s.index * unit >= run && s.end == s.block_len;
                if let (Some(k), true) = (s.key, multi && whole) {
                    self.cache_forget(BlockKind::Data, k);
                }
            }
        }
        Ok(out)
    }

    /// Fetch the inodes of entries just listed (and the one data block of each small
    /// file) in the background, as `cp -r` or `ls -l` will ask for them one by one next:
    /// in batches of [`LISTING_BATCH`] (one exchange per replica range), two batches at
    /// once, data within the memory budget.
    pub fn prefetch_entries(&self, mut keys: Vec<Id>) {
        keys.truncate(MAX_LISTING_PREFETCH);
        let me = self.clone();
        tokio::spawn(async move {
            // Half the read-ahead slots per batch: two batches in flight, each fetching
            // what it did not bring at most that many at once.
            let per_batch = (me.inner.opts.prefetch_parallel / 2).max(1) as u32;
            for batch in keys.chunks(LISTING_BATCH) {
                let Ok(permit) = me
                    .inner
                    .prefetch
                    .clone()
                    .acquire_many_owned(per_batch)
                    .await
                else {
                    return;
                };
                let batch: Vec<(Id, usize)> = batch.iter().map(|&k| (k, 0)).collect();
                let slots = me.start_many(BlockKind::Meta, &batch);
                let me = me.clone();
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    for mut rx in slots {
                        let got = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
                        if let Ok(Some(Ok(Cached::Inode(i)))) = got {
                            data.extend(me.small_file_block(&i).await);
                        }
                    }
                    drop(me.start_many(BlockKind::Data, &data));
                    drop(permit);
                });
            }
        });
    }

    /// The single data block of a small file, and its size.
    async fn small_file_block(&self, i: &Inode) -> Option<(Id, usize)> {
        let shape = Shape::of(i).filter(|s| s.size() <= SMALL_FILE_PREFETCH)?;
        match self.block_at(&shape, 0).await {
            Ok(Some((Some(k), len))) => Some((k, len)),
            _ => None,
        }
    }

    /// A read-ahead stream for sequential reads of `file`, counted among the file's
    /// readers while it lives.
    pub fn stream_for(&self, file: &Inode) -> FileStream {
        let (block_size, root) = match Shape::of(file) {
            Some(s) => (s.unit(), s.root()),
            None => (fs::BLOCK_SIZE as u32, None),
        };
        let file = root.map(|r| {
            *self.inner.streams.lock().unwrap().entry(r).or_insert(0) += 1;
            (r, self.inner.streams.clone())
        });
        FileStream {
            window: Mutex::new(Stream::new(block_size, self.inner.opts.window)),
            file,
        }
    }

    /// Fetch blocks `range` in the background, at most `prefetch_parallel` at once,
    /// each holding its share of the memory budget; stops where the budget refuses.
    fn read_ahead(&self, shape: Shape, range: Range<u64>, front: Arc<AtomicU64>) {
        let me = self.clone();
        let unit = u64::from(shape.unit());
        // Block `i` lies wholly behind what the stream has read (and perhaps forgotten):
        // not fetched again.
        let read = move |i: u64| (i + 1).saturating_mul(unit) <= front.load(Ordering::Relaxed);
        tokio::spawn(async move {
            for i in range {
                if read(i) {
                    continue;
                }
                let Ok(Some((Some(k), len))) = me.block_at(&shape, i).await else {
                    continue;
                };
                if me.cache_get(BlockKind::Data, k).is_some() {
                    continue;
                }
                let Ok(permit) = me.inner.prefetch.clone().acquire_owned().await else {
                    return;
                };
                // Again: the stream may have read it while this waited for a permit.
                if read(i) {
                    continue;
                }
                let Some(mut rx) = me.start(BlockKind::Data, k, len, false) else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = rx.wait_for(|v| v.is_some()).await;
                    drop(permit);
                });
            }
        });
    }

    /// Whether the local file `copy` holds exactly the bytes of `file`: every block is
    /// hashed against its key in the inode's tree and holes must be zeros. A local copy
    /// (the mount's file cache) is trusted only after this. Reads `copy` with blocking
    /// calls: run it where blocking is fine (a fuser thread's `block_on`).
    pub async fn verify_copy(&self, file: &Inode, copy: &std::fs::File) -> Result<bool, FsError> {
        use std::os::unix::fs::FileExt;
        let InodeBody::File { size, data } = &file.body else {
            return Ok(false);
        };
        if copy.metadata()?.len() != *size {
            return Ok(false);
        }
        if let FileData::Inline(b) = data {
            let mut buf = vec![0u8; b.len()];
            copy.read_exact_at(&mut buf, 0)?;
            return Ok(buf[..] == b[..]);
        }
        let Some(shape) = Shape::of(file) else {
            return Ok(false);
        };
        let mut buf = Vec::new();
        let mut start = 0u64;
        for i in 0..shape.blocks() {
            let Some((key, len)) = self.block_at(&shape, i).await? else {
                return Ok(false);
            };
            buf.resize(len, 0);
            copy.read_exact_at(&mut buf, start)?;
            let ok = match key {
                None => buf.iter().all(|&x| x == 0),
                Some(k) => Id::hash(&buf) == k,
            };
            if !ok {
                return Ok(false);
            }
            start += len as u64;
        }
        Ok(start == *size)
    }

    /// Stream a whole file to `out`, a window of blocks in flight at a time; cached
    /// blocks are written as they are.
    pub async fn copy_to<W: Write>(&self, file: &Inode, out: &mut W) -> Result<u64, FsError> {
        let size = file.size();
        let chunk = (fs::BLOCK_SIZE as u64) * 4;
        let stream = self.stream_for(file);
        let mut off = 0;
        while off < size {
            let pieces = self.read_pieces(file, off, chunk, Some(&stream)).await?;
            let n: usize = pieces.iter().map(|p| p.as_slice().len()).sum();
            if n == 0 {
                break;
            }
            for p in &pieces {
                out.write_all(p.as_slice())?;
            }
            off += n as u64;
        }
        out.flush()?;
        Ok(off)
    }
}

/// `cfs get`: stream the file at `path` of `fsid` (current version or `version`) to
/// `out`; returns the bytes written.
pub async fn get<R: BlockService, W: Write>(
    ring: Arc<R>,
    fsid: Id,
    version: Option<u64>,
    path: &str,
    out: &mut W,
) -> Result<u64, FsError> {
    // One pass over one file: what was written out is not read again, and all of it is
    // wanted, so the window starts at its widest instead of growing from one block.
    let base = ReaderOpts::default();
    let opts = ReaderOpts {
        forget_streamed: true,
        window: WindowOpts {
            initial: base.window.max,
            ..base.window
        },
        ..base
    };
    let reader = Reader::new(ring, opts);
    let root = reader.root(fsid, version).await?;
    let (_, inode) = reader.resolve(root.top, path.as_bytes()).await?;
    match inode.kind() {
        EntryKind::File => reader.copy_to(&inode, out).await,
        _ => Err(FsError::IsDir(path.to_string())),
    }
}
