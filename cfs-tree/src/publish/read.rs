//! Reading one file into blocks: content-defined chunks (layout 2, the default) or
//! fixed-size blocks, inline contents for tiny files, and a second read when the file
//! moved under us.

use super::{io_err, FileStat, PublishError, Walk, READ_ATTEMPTS};
use crate::service::BlockService;
use cfs_core::fs::chunked::{build_chunked_tree, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use cfs_core::fs::{
    build_file_tree, chunk_block, FileData, Inode, InodeBody, NewBlock, INLINE_MAX,
};
use cfs_core::Id;
use serde_bytes::ByteBuf;
use std::fs::File;
use std::io::Read;
use std::path::Path;

impl<R: BlockService> Walk<'_, R> {
    /// Chunk one file, sending its data and indirect blocks; returns its inode, the
    /// stat its bytes match and the blocks it sent. A file whose stat moved while it was
    /// read (size, times, inode) is read again, up to `READ_ATTEMPTS` times: the inode
    /// never records a size or time its bytes do not have.
    pub(super) async fn file(
        &mut self,
        path: &Path,
        nlink: u32,
    ) -> Result<(Inode, FileStat, u64), PublishError> {
        for _ in 0..READ_ATTEMPTS {
            let mut f = File::open(path).map_err(io_err(path))?;
            let before = FileStat::of(&f.metadata().map_err(io_err(path))?);
            let (inode, blocks) = self.read_file(&mut f, path, &before, nlink).await?;
            let after = FileStat::of(&f.metadata().map_err(io_err(path))?);
            if before == after && inode.size() == after.size {
                return Ok((inode, after, blocks));
            }
            tracing::warn!(
                "{} changed while it was read; reading it again",
                path.display()
            );
        }
        Err(PublishError::Changed(path.to_path_buf()))
    }

    async fn read_file(
        &mut self,
        f: &mut File,
        path: &Path,
        stat: &FileStat,
        nlink: u32,
    ) -> Result<(Inode, u64), PublishError> {
        let mut head = vec![0u8; INLINE_MAX + 1];
        let n = read_full(f, &mut head).map_err(io_err(path))?;
        head.truncate(n);
        let (size, data, blocks) = if n <= INLINE_MAX {
            self.up.pb.inc(n as u64);
            (n as u64, FileData::Inline(ByteBuf::from(head)), 0)
        } else if self.up.opts.content_defined {
            self.read_chunked(std::io::Cursor::new(head).chain(f), path)
                .await?
        } else {
            self.read_fixed(head, f, path).await?
        };
        let inode = Inode {
            mode: stat.mode & 0o7777,
            mtime_sec: stat.mtime.0,
            mtime_nsec: stat.mtime.1.clamp(0, 999_999_999) as u32,
            nlink,
            body: InodeBody::File { size, data },
        };
        Ok((inode, blocks))
    }

    /// Content-defined chunks (FastCDC); a chunk of zeros is a hole.
    async fn read_chunked(
        &mut self,
        from: impl Read,
        path: &Path,
    ) -> Result<(u64, FileData, u64), PublishError> {
        let mut chunks: Vec<(Option<Id>, u32)> = Vec::new();
        let mut size = 0u64;
        let mut blocks = 0u64;
        let cdc = fastcdc::v2020::StreamCDC::new(from, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        for c in cdc {
            let c = c.map_err(|e| PublishError::Io {
                path: path.to_path_buf(),
                source: match e {
                    fastcdc::v2020::Error::IoError(e) => e,
                    e => std::io::Error::other(e.to_string()),
                },
            })?;
            size += c.length as u64;
            self.up.pb.inc(c.length as u64);
            let len = c.length as u32;
            if c.data.iter().all(|&b| b == 0) {
                chunks.push((None, len));
                continue;
            }
            let b = NewBlock::data(c.data);
            chunks.push((Some(b.key), len));
            blocks += 1;
            self.up.add(b).await?;
        }
        let (data, spans) = build_chunked_tree(&chunks);
        for b in spans {
            blocks += 1;
            self.up.add(b).await?;
        }
        Ok((size, data, blocks))
    }

    /// Fixed-size blocks (layout 1), `head` being the file's first bytes.
    async fn read_fixed(
        &mut self,
        head: Vec<u8>,
        f: &mut File,
        path: &Path,
    ) -> Result<(u64, FileData, u64), PublishError> {
        let bs = self.up.opts.block_size;
        let mut buf = vec![0u8; bs];
        buf[..head.len()].copy_from_slice(&head);
        let mut filled = head.len();
        let mut ptrs = Vec::new();
        let (mut size, mut blocks) = (0u64, 0u64);
        loop {
            let n = filled + read_full(f, &mut buf[filled..]).map_err(io_err(path))?;
            filled = 0;
            if n == 0 {
                break;
            }
            size += n as u64;
            let b = chunk_block(&buf[..n]);
            ptrs.push(b.as_ref().map(|b| b.key));
            if let Some(b) = b {
                blocks += 1;
                self.up.add(b).await?;
            }
            self.up.pb.inc(n as u64);
            if n < bs {
                break;
            }
        }
        let (data, ind) = build_file_tree(size, bs as u32, &ptrs);
        for b in ind {
            blocks += 1;
            self.up.add(b).await?;
        }
        Ok((size, data, blocks))
    }
}

/// Read until `buf` is full or end of file.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
