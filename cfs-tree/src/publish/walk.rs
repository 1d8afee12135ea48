//! The walk of a publish, in two passes over the tree that keep no copy of it: the first
//! counts (bytes and entries for the progress bar, names per hard-linked file, what is
//! skipped), the second builds and sends blocks bottom-up, one directory's entries in
//! memory at a time. Memory grows with the tree's depth and widest directory, not its
//! size (beside the keys the uploader remembers).

use super::index::{DirRecord, FileRecord, FileStat, IndexWriter, StatIndex};
use super::{io_err, PublishError, Uploader};
use crate::service::BlockService;
use cfs_core::fs::{build_dir, build_symlink, DirEntry, EntryKind, Inode, Meta, NewBlock};
use cfs_core::Id;
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What the first pass finds.
#[derive(Default)]
pub(super) struct Scan {
    pub bytes: u64,
    /// Files, directories and symlinks (a hard-linked file once per name).
    pub entries: u64,
    /// Names in the tree of each file with more than one link.
    pub links: HashMap<(u64, u64), u32>,
    pub skipped: Vec<(PathBuf, String)>,
}

fn mtime(m: &Metadata) -> (i64, u32) {
    (m.mtime(), m.mtime_nsec().clamp(0, 999_999_999) as u32)
}

/// The first pass: count what is under `path`.
pub(super) fn count(path: &Path, md: &Metadata, s: &mut Scan) -> Result<(), PublishError> {
    let ft = md.file_type();
    if ft.is_symlink() {
        s.entries += 1;
    } else if ft.is_file() {
        s.entries += 1;
        if md.nlink() > 1 {
            let n = s.links.entry((md.dev(), md.ino())).or_insert(0);
            if *n == 0 {
                s.bytes += md.len();
            }
            *n += 1;
        } else {
            s.bytes += md.len();
        }
    } else if ft.is_dir() {
        s.entries += 1;
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let p = e.map_err(io_err(path))?.path();
            let cmd = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
            count(&p, &cmd, s)?;
        }
    } else {
        let what = if ft.is_socket() {
            "socket"
        } else {
            "device or fifo"
        };
        tracing::warn!(
            "skipping {} ({what}): only files, directories and symlinks are published",
            path.display()
        );
        s.skipped.push((path.to_path_buf(), what.to_string()));
    }
    Ok(())
}

pub(super) struct Walk<'a, R: BlockService> {
    pub up: Uploader<R>,
    pub scan: &'a Scan,
    /// The tree's top: index records are by path below it.
    pub top: &'a Path,
    /// Hard links: one inode per (dev, ino) of a file with more than one link.
    pub linked: HashMap<(u64, u64), Id>,
    pub files: u64,
    /// The last publish's records (empty with none) and this one's.
    pub index: StatIndex,
    pub record: IndexWriter,
    pub files_reused: u64,
    pub blocks_reused: u64,
}

impl<R: BlockService> Walk<'_, R> {
    async fn inode(&mut self, inode: Inode) -> Result<Id, PublishError> {
        let b = NewBlock::meta(&Meta::Inode(inode));
        let k = b.key;
        self.up.add(b).await?;
        self.counted();
        Ok(k)
    }

    /// One more inode of the tree done (sent or reused); the progress bar shows it.
    fn counted(&mut self) {
        self.files += 1;
        if self.files.is_multiple_of(64) || self.files == self.scan.entries {
            self.up
                .pb
                .set_prefix(format!("{}/{} entries", self.files, self.scan.entries));
        }
    }

    /// `path` below the top, as the index names it.
    fn rel<'p>(&self, path: &'p Path) -> &'p [u8] {
        path.strip_prefix(self.top)
            .unwrap_or(path)
            .as_os_str()
            .as_bytes()
    }

    /// The second pass: the inode of what is at `path` (None: skipped).
    pub(super) async fn node(
        &mut self,
        path: &Path,
        md: &Metadata,
    ) -> Result<Option<(Id, EntryKind)>, PublishError> {
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(io_err(path))?;
            let i = build_symlink(target.as_os_str().as_bytes(), md.mode() & 0o7777, mtime(md))
                .map_err(|source| PublishError::Layout {
                    path: path.to_path_buf(),
                    source,
                })?;
            return Ok(Some((self.inode(i).await?, EntryKind::Symlink)));
        }
        if ft.is_file() {
            return Ok(Some((self.file_inode(path, md).await?, EntryKind::File)));
        }
        if !ft.is_dir() {
            return Ok(None);
        }
        let mut children = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let e = e.map_err(io_err(path))?;
            children.push(e.file_name());
        }
        children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Vec::with_capacity(children.len());
        for name in children {
            let p = path.join(&name);
            let cmd = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                // Gone since the listing (an editor's swap file): not part of the tree.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&p)(e)),
            };
            if let Some((key, kind)) = Box::pin(self.node(&p, &cmd)).await? {
                entries.push(DirEntry {
                    name: ByteBuf::from(name.as_bytes().to_vec()),
                    key,
                    kind,
                });
            }
        }
        let (inode, pages) =
            build_dir(entries, md.mode() & 0o7777, mtime(md)).map_err(|source| {
                PublishError::Layout {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        // Built again from its entries (cheap), so reuse needs no trust in the
        // directory's stat: the same inode key means the same pages, which the version
        // the ring holds now already has.
        let rel = self.rel(path);
        let b = NewBlock::meta(&Meta::Inode(inode));
        let rec = DirRecord {
            inode: b.key,
            pages: pages.len() as u64,
        };
        if self.index.dirs.get(rel).is_some_and(|r| r.inode == b.key) {
            self.blocks_reused += rec.pages + 1;
        } else {
            for p in pages {
                self.up.add(p).await?;
            }
            self.up.add(b).await?;
        }
        self.counted();
        self.record.dir(rel, rec.clone());
        Ok(Some((rec.inode, EntryKind::Dir)))
    }

    async fn file_inode(&mut self, path: &Path, md: &Metadata) -> Result<Id, PublishError> {
        let stat = FileStat::of(md);
        let devino = (stat.dev, stat.ino);
        let linked = md.nlink() > 1;
        if let Some(k) = self.linked.get(&devino) {
            return Ok(*k);
        }
        let nlink = if linked {
            self.scan.links.get(&devino).copied().unwrap_or(1)
        } else {
            1
        };
        let rel = self.rel(path);
        let (k, rec) = match self.index.file(rel, &stat, nlink) {
            Some(r) => {
                // Unchanged since the last publish: its inode and every block under it
                // are part of the version the ring holds now.
                self.counted();
                self.files_reused += 1;
                self.blocks_reused += r.blocks + 1;
                self.up.pb.inc(stat.size);
                (r.inode, r)
            }
            None => {
                let (i, stat, blocks) = self.file(path, nlink).await?;
                let k = self.inode(i).await?;
                let rec = FileRecord {
                    stat,
                    nlink,
                    inode: k,
                    blocks,
                };
                (k, rec)
            }
        };
        self.record.file(rel, rec);
        if linked {
            self.linked.insert(devino, k);
        }
        Ok(k)
    }
}
