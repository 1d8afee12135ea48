//! Open file and directory handles, and how each file number is open (through cfs or by
//! passthrough from the file cache).

use super::file_cache::Fill;
use cfs_core::fs::Inode;
use cfs_tree::reader::FileStream;
use fuser::{BackingId, FileType};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A directory listing pinned in its handle, so offsets stay valid across versions.
pub type Listing = Arc<Vec<(u64, FileType, Vec<u8>)>>;

/// What a read of an open file needs.
pub struct FileRefs {
    pub inode: Arc<Inode>,
    pub stream: Arc<FileStream>,
    pub fill: Option<Arc<Fill>>,
    pub local: Option<Arc<std::fs::File>>,
}

pub enum Open {
    File(OpenFile),
    Dir(Listing),
}

pub struct OpenFile {
    pub inode: Arc<Inode>,
    /// This handle's read-ahead window.
    pub stream: Arc<FileStream>,
    pub ino: u64,
    /// The cache file this handle's reads are written into.
    pub fill: Option<Arc<Fill>>,
    /// Set when the kernel reads a cache file directly; kept alive while open.
    pub backing: Option<Arc<BackingId>>,
    /// A complete, verified cache file this handle reads itself (no passthrough).
    pub local: Option<Arc<std::fs::File>>,
}

/// How a file number is open. The kernel refuses to mix modes on one inode: a normal
/// open while a passthrough one is live fails, and so does a passthrough open while a
/// normal one is live or one with another backing file. Our counts drop after the
/// kernel's (release comes after the close), so they never claim less than it holds.
#[derive(Default)]
pub struct InoModes {
    pub normal: usize,
    pub passthrough: usize,
    pub backing: Option<Arc<BackingId>>,
}

#[derive(Default)]
pub struct Handles {
    open: Mutex<HashMap<u64, Open>>,
    next_fh: AtomicU64,
    pub modes: Mutex<HashMap<u64, InoModes>>,
}

impl Handles {
    pub fn add(&self, o: Open) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.lock().unwrap().insert(fh, o);
        fh
    }

    pub fn remove(&self, fh: u64) -> Option<Open> {
        self.open.lock().unwrap().remove(&fh)
    }

    /// An open file handle's inode, read-ahead stream and fill.
    pub fn file(&self, fh: u64) -> Option<FileRefs> {
        match self.open.lock().unwrap().get(&fh) {
            Some(Open::File(f)) => Some(FileRefs {
                inode: f.inode.clone(),
                stream: f.stream.clone(),
                fill: f.fill.clone(),
                local: f.local.clone(),
            }),
            _ => None,
        }
    }

    pub fn dir(&self, fh: u64) -> Option<Listing> {
        match self.open.lock().unwrap().get(&fh) {
            Some(Open::Dir(l)) => Some(l.clone()),
            _ => None,
        }
    }

    /// Undo the mode count of a released file handle.
    pub fn release_mode(&self, f: &OpenFile) {
        let mut modes = self.modes.lock().unwrap();
        if let Some(m) = modes.get_mut(&f.ino) {
            if f.backing.is_some() {
                m.passthrough = m.passthrough.saturating_sub(1);
                if m.passthrough == 0 {
                    m.backing = None;
                }
            } else {
                m.normal = m.normal.saturating_sub(1);
            }
            if m.normal == 0 && m.passthrough == 0 {
                modes.remove(&f.ino);
            }
        }
    }
}
