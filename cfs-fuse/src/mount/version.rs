//! Following new versions: the poller, the diff between two trees over the directories
//! the kernel holds, and the swap.
//!
//! A directory's key is the hash of its content, so a directory whose key did not change
//! has an unchanged subtree: the diff descends only into changed directories that the
//! kernel holds. Applying a version costs the changed paths, not the number of
//! directories ever visited. Names whose entries differ are invalidated (`inval_entry`),
//! and so are changed directories (`inval_inode`), outside any request. Open files hold
//! their inode, so they keep reading the version they opened.

use super::fs::Fs;
use super::inodes::ROOT_INO;
use cfs_core::block::RootBlock;
use cfs_core::fs::{DirEntry, EntryKind};
use cfs_core::Id;
use cfs_tree::reader::{FsError, Reader};
use cfs_tree::service::BlockService;
use fuser::{INodeNo, Notifier};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a new version changes for the kernel.
#[derive(Debug, Default)]
pub struct Invalidations {
    pub entries: Vec<(u64, Vec<u8>)>,
    pub inodes: Vec<u64>,
}

/// New keys of the held directories that changed, and what to invalidate.
struct Diff {
    keys: Vec<(u64, Option<Id>)>,
    inv: Invalidations,
    /// Directories whose listings were compared (the work done).
    visited: usize,
}

async fn listing<R: BlockService>(
    reader: &Reader<R>,
    key: Option<Id>,
) -> Result<Vec<DirEntry>, FsError> {
    match key {
        None => Ok(Vec::new()),
        Some(k) => {
            let i = reader.inode(k).await?;
            reader.list(&i).await
        }
    }
}

impl<R: BlockService> Fs<R> {
    /// Walk from the top, comparing old and new listings of changed held directories.
    /// Nothing is changed; an error leaves the swap for the next poll.
    async fn diff(&self, new_top: Id) -> Result<Diff, FsError> {
        let mut d = Diff {
            keys: Vec::new(),
            inv: Invalidations::default(),
            visited: 0,
        };
        let old_top = self.table.read().unwrap().key_of(ROOT_INO).map(|k| k.0);
        let mut todo = vec![(ROOT_INO, old_top, Some(new_top))];
        while let Some((ino, old, new)) = todo.pop() {
            if old == new {
                continue;
            }
            d.visited += 1;
            d.keys.push((ino, new));
            d.inv.inodes.push(ino);
            let old_list = match listing(&self.reader, old).await {
                Ok(l) => l,
                Err(e) => {
                    // Without the old listing, removed names fall back to their TTL.
                    tracing::warn!("old listing of directory {ino} unavailable: {e}");
                    Vec::new()
                }
            };
            let new_list = listing(&self.reader, new).await?;
            let old_map: HashMap<&[u8], (Id, EntryKind)> = old_list
                .iter()
                .map(|e| (e.name.as_slice(), (e.key, e.kind)))
                .collect();
            let new_map: HashMap<&[u8], (Id, EntryKind)> = new_list
                .iter()
                .map(|e| (e.name.as_slice(), (e.key, e.kind)))
                .collect();
            for (n, v) in &old_map {
                if new_map.get(n) != Some(v) {
                    d.inv.entries.push((ino, n.to_vec()));
                }
            }
            for n in new_map.keys() {
                if !old_map.contains_key(n) {
                    d.inv.entries.push((ino, n.to_vec()));
                }
            }
            let kids = self.table.read().unwrap().held_subdirs(ino);
            for (kid, name, kid_old) in kids {
                let kid_new = match new_map.get(name.as_slice()) {
                    Some((k, EntryKind::Dir)) => Some(*k),
                    _ => None,
                };
                todo.push((kid, kid_old, kid_new));
            }
        }
        Ok(d)
    }

    /// Swap in `root` if it is newer; returns what to invalidate and how many
    /// directories were compared.
    fn update(&self, root: RootBlock) -> Result<Option<(Invalidations, usize)>, FsError> {
        let t0 = Instant::now();
        for attempt in 0..3 {
            let added = {
                let t = self.table.read().unwrap();
                if root.version <= t.root.version {
                    return Ok(None);
                }
                t.dirs_added
            };
            let mut d = self.rt.block_on(self.diff(root.top))?;
            let mut t = self.table.write().unwrap();
            if root.version <= t.root.version {
                return Ok(None);
            }
            if t.dirs_added != added {
                if attempt < 2 {
                    // Lookups in the old tree added directories meanwhile: diff again.
                    continue;
                }
                // Still racing: directories looked up during the diff, under a directory
                // that changed, have keys of the old tree the diff did not see. Drop those
                // keys and make the kernel look the names up again; every other held
                // directory keeps the key the diff found (or its old one, unchanged).
                let mut changed: std::collections::HashSet<u64> =
                    d.keys.iter().map(|(ino, _)| *ino).collect();
                // Oldest first: a parent is looked up before its children.
                for (ino, parent, name) in t.dirs_added_since(added) {
                    if changed.contains(&parent) && changed.insert(ino) {
                        d.keys.push((ino, None));
                        d.inv.entries.push((parent, name));
                        d.inv.inodes.push(ino);
                    }
                }
            }
            for (ino, key) in &d.keys {
                t.set_dir_key(*ino, *key);
            }
            tracing::info!(
                version = root.version,
                dirs_compared = d.visited,
                held = t.held(),
                apply_us = t0.elapsed().as_micros() as u64,
                "switched to a new version"
            );
            t.root = root;
            return Ok(Some((d.inv, d.visited)));
        }
        unreachable!("the last attempt always swaps")
    }
}

impl<R: BlockService> Fs<R> {
    /// Ask the ring for the current root and apply it if it is newer.
    pub fn refresh(&self) -> Result<Option<(Invalidations, usize)>, FsError> {
        let root = self.rt.block_on(self.reader.root(self.fsid, None))?;
        self.update(root)
    }
}

/// Ask for a new root every `poll_interval` until `stop`; apply it and invalidate.
pub fn poll_loop<R: BlockService>(s: Arc<Fs<R>>, notifier: Notifier, stop: Arc<AtomicBool>) {
    loop {
        let until = Instant::now() + s.opts.poll_interval;
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50).min(s.opts.poll_interval));
        }
        match s.refresh() {
            Ok(Some((inv, _))) => {
                // Outside any request and without our locks: the kernel may call us back.
                for (dir, name) in &inv.entries {
                    let _ = notifier.inval_entry(INodeNo(*dir), OsStr::from_bytes(name));
                }
                for ino in &inv.inodes {
                    let _ = notifier.inval_inode(INodeNo(*ino), 0, 0);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("new version not applied yet: {e}"),
        }
    }
}
