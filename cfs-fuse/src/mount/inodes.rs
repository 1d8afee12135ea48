//! The inode table: which numbers the kernel holds, and what each stands for in the
//! current version.
//!
//! Numbers: a directory is numbered by its path, as (parent number, name), so it keeps its
//! number across versions; a file or symlink by its inode key, so a new content key means
//! a new number (the kernel's page cache never mixes versions) and hard links (one inode)
//! share one. Both are derived from a hash, so a listing can show the number a later
//! lookup will give without allocating anything; a collision falls back to a counted
//! number below the hashed range.
//!
//! Lifetime: an entry lives while the kernel holds it. Every entry reply adds one lookup,
//! `forget` takes them back, and at zero the entry goes, so the table is bounded by what
//! the kernel caches, not by what was ever visited. A directory with held children stays
//! until they go (the kernel pins parents, but we never lose a path that way).

use cfs_core::block::RootBlock;
use cfs_core::fs::{DirEntry, EntryKind};
use cfs_core::Id;
use std::collections::{HashMap, HashSet};

pub const ROOT_INO: u64 = 1;

/// Numbers at or above this are hashed; below it they are counted (root and collisions).
const HASHED: u64 = 1 << 63;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// `key` is the directory's inode key in the current version, None if its path no
    /// longer is a directory.
    Dir {
        parent: u64,
        name: Vec<u8>,
        key: Option<Id>,
    },
    /// A file or symlink: immutable.
    Leaf { key: Id },
}

struct Entry {
    node: Node,
    lookups: u64,
    /// `dirs_added` when a directory entry was made (0 for files).
    seq: u64,
}

pub struct InodeTable {
    pub root: RootBlock,
    nodes: HashMap<u64, Entry>,
    dirs: HashMap<(u64, Vec<u8>), u64>,
    leaves: HashMap<Id, u64>,
    /// Held subdirectories of each held directory: what a new version must re-resolve.
    children: HashMap<u64, HashSet<u64>>,
    next_counted: u64,
    /// Counts directory insertions, so a version diff can tell whether lookups in the old
    /// tree added directories while it ran.
    pub dirs_added: u64,
}

fn hashed_dir(parent: u64, name: &[u8]) -> u64 {
    let h = Id::hash_parts(&[&parent.to_le_bytes(), name]);
    HASHED | u64::from_le_bytes(h.0[..8].try_into().unwrap())
}

fn hashed_leaf(key: &Id) -> u64 {
    HASHED | u64::from_le_bytes(key.0[..8].try_into().unwrap())
}

impl InodeTable {
    pub fn new(root: RootBlock) -> InodeTable {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Entry {
                node: Node::Dir {
                    parent: ROOT_INO,
                    name: Vec::new(),
                    key: Some(root.top),
                },
                lookups: 1,
                seq: 0,
            },
        );
        InodeTable {
            root,
            nodes,
            dirs: HashMap::new(),
            leaves: HashMap::new(),
            children: HashMap::new(),
            next_counted: ROOT_INO + 1,
            dirs_added: 0,
        }
    }

    /// Entries held (the root included).
    pub fn held(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino).map(|e| &e.node)
    }

    pub fn key_of(&self, ino: u64) -> Option<(Id, bool)> {
        match self.node(ino)? {
            Node::Dir { key, .. } => key.map(|k| (k, true)),
            Node::Leaf { key } => Some((*key, false)),
        }
    }

    pub fn parent_of(&self, ino: u64) -> u64 {
        match self.node(ino) {
            Some(Node::Dir { parent, .. }) => *parent,
            _ => ROOT_INO,
        }
    }

    /// The number a listing shows for `e` in `parent`: the held one, else the one a
    /// lookup would most likely allocate. Allocates nothing.
    pub fn peek(&self, parent: u64, e: &DirEntry) -> u64 {
        match e.kind {
            EntryKind::Dir => self
                .dirs
                .get(&(parent, e.name.to_vec()))
                .copied()
                .unwrap_or_else(|| hashed_dir(parent, &e.name)),
            _ => self
                .leaves
                .get(&e.key)
                .copied()
                .unwrap_or_else(|| hashed_leaf(&e.key)),
        }
    }

    /// The number for `e` in `parent` after a lookup the kernel will count: allocated on
    /// first sight, one lookup added. A directory's key is set to the one just resolved.
    pub fn remember(&mut self, parent: u64, e: &DirEntry) -> u64 {
        let ino = match e.kind {
            EntryKind::Dir => self.dirs.get(&(parent, e.name.to_vec())).copied(),
            _ => self.leaves.get(&e.key).copied(),
        };
        if let Some(ino) = ino {
            let entry = self.nodes.get_mut(&ino).expect("indexed numbers are held");
            entry.lookups += 1;
            if let Node::Dir { key, .. } = &mut entry.node {
                *key = Some(e.key);
            }
            return ino;
        }
        let natural = match e.kind {
            EntryKind::Dir => hashed_dir(parent, &e.name),
            _ => hashed_leaf(&e.key),
        };
        let ino = if self.nodes.contains_key(&natural) {
            let n = self.next_counted;
            self.next_counted += 1;
            n
        } else {
            natural
        };
        let seq = self.dirs_added + 1;
        let node = match e.kind {
            EntryKind::Dir => {
                self.dirs.insert((parent, e.name.to_vec()), ino);
                self.children.entry(parent).or_default().insert(ino);
                self.dirs_added = seq;
                Node::Dir {
                    parent,
                    name: e.name.to_vec(),
                    key: Some(e.key),
                }
            }
            _ => {
                self.leaves.insert(e.key, ino);
                Node::Leaf { key: e.key }
            }
        };
        self.nodes.insert(
            ino,
            Entry {
                node,
                lookups: 1,
                seq,
            },
        );
        ino
    }

    /// Held directories first looked up after `dirs_added` was `since`, oldest first:
    /// (number, parent, name).
    pub fn dirs_added_since(&self, since: u64) -> Vec<(u64, u64, Vec<u8>)> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.seq > since)
            .filter_map(|(ino, e)| match &e.node {
                Node::Dir { parent, name, .. } => Some((e.seq, (*ino, *parent, name.clone()))),
                Node::Leaf { .. } => None,
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_values()
            .collect()
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(e) = self.nodes.get_mut(&ino) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(n);
        self.remove_if_unused(ino);
    }

    fn remove_if_unused(&mut self, mut ino: u64) {
        while ino != ROOT_INO {
            let Some(e) = self.nodes.get(&ino) else {
                return;
            };
            let has_kids = self.children.get(&ino).is_some_and(|c| !c.is_empty());
            if e.lookups > 0 || has_kids {
                return;
            }
            let e = self.nodes.remove(&ino).expect("just seen");
            self.children.remove(&ino);
            match e.node {
                Node::Leaf { key } => {
                    self.leaves.remove(&key);
                    return;
                }
                Node::Dir { parent, name, .. } => {
                    self.dirs.remove(&(parent, name));
                    if let Some(c) = self.children.get_mut(&parent) {
                        c.remove(&ino);
                    }
                    // The parent may have stayed only for this child.
                    ino = parent;
                }
            }
        }
    }

    /// Held subdirectories of `ino`, with their names and keys.
    pub fn held_subdirs(&self, ino: u64) -> Vec<(u64, Vec<u8>, Option<Id>)> {
        let Some(kids) = self.children.get(&ino) else {
            return Vec::new();
        };
        kids.iter()
            .filter_map(|k| match self.node(*k) {
                Some(Node::Dir { name, key, .. }) => Some((*k, name.clone(), *key)),
                _ => None,
            })
            .collect()
    }

    /// Set a held directory's key for a new version (no-op if it was forgotten).
    pub fn set_dir_key(&mut self, ino: u64, new: Option<Id>) {
        if let Some(Entry {
            node: Node::Dir { key, .. },
            ..
        }) = self.nodes.get_mut(&ino)
        {
            *key = new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_core::block::RootBlock;

    fn root() -> RootBlock {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        RootBlock::sign(&sk, 1, Id::hash(b"top"), Default::default(), None, 0)
    }

    fn dir(name: &str, key: &str) -> DirEntry {
        DirEntry {
            name: serde_bytes::ByteBuf::from(name.as_bytes().to_vec()),
            kind: EntryKind::Dir,
            key: Id::hash(key.as_bytes()),
        }
    }

    fn file(name: &str, key: &str) -> DirEntry {
        DirEntry {
            name: serde_bytes::ByteBuf::from(name.as_bytes().to_vec()),
            kind: EntryKind::File,
            key: Id::hash(key.as_bytes()),
        }
    }

    #[test]
    fn forgotten_entries_leave_the_table() {
        let mut t = InodeTable::new(root());
        let a = t.remember(ROOT_INO, &dir("a", "a1"));
        let f = t.remember(a, &file("f", "f1"));
        assert_eq!(
            t.peek(a, &file("f", "f1")),
            f,
            "a listing shows the held number"
        );
        let again = t.remember(a, &file("f", "f1"));
        assert_eq!(again, f);
        assert_eq!(t.held(), 3);
        t.forget(f, 1);
        assert!(t.node(f).is_some(), "one lookup is still held");
        t.forget(f, 1);
        assert!(t.node(f).is_none());
        t.forget(a, 1);
        assert_eq!(t.held(), 1, "only the root is left");
        t.forget(ROOT_INO, 5);
        assert_eq!(t.held(), 1, "the root is never forgotten");
    }

    #[test]
    fn a_parent_stays_while_a_child_is_held() {
        let mut t = InodeTable::new(root());
        let a = t.remember(ROOT_INO, &dir("a", "a1"));
        let b = t.remember(a, &dir("b", "b1"));
        t.forget(a, 1);
        assert!(t.node(a).is_some(), "b still needs its path");
        assert_eq!(t.held_subdirs(ROOT_INO).len(), 1);
        t.forget(b, 1);
        assert_eq!(t.held(), 1, "both went once b did");
    }

    #[test]
    fn numbers_are_stable_and_predicted() {
        let mut t = InodeTable::new(root());
        let e = dir("a", "a1");
        let predicted = t.peek(ROOT_INO, &e);
        let a = t.remember(ROOT_INO, &e);
        assert_eq!(a, predicted);
        t.forget(a, 1);
        // A directory keeps its number across versions (same path, new key).
        let a2 = t.remember(ROOT_INO, &dir("a", "a2"));
        assert_eq!(a2, a);
        assert_eq!(t.key_of(a2), Some((Id::hash(b"a2"), true)));
        // A file's number follows its key.
        let f1 = t.remember(a2, &file("f", "v1"));
        let f2 = t.remember(a2, &file("f", "v2"));
        assert_ne!(f1, f2);
    }

    #[test]
    fn directories_added_since_a_point_come_oldest_first() {
        let mut t = InodeTable::new(root());
        let a = t.remember(ROOT_INO, &dir("a", "a1"));
        let mark = t.dirs_added;
        let b = t.remember(a, &dir("b", "b1"));
        let c = t.remember(b, &dir("c", "c1"));
        t.remember(c, &file("f", "f1"));
        let since: Vec<u64> = t.dirs_added_since(mark).iter().map(|x| x.0).collect();
        assert_eq!(since, vec![b, c]);
        assert_eq!(t.dirs_added_since(0)[0], (a, ROOT_INO, b"a".to_vec()));
    }

    #[test]
    fn a_collision_gets_a_counted_number() {
        let mut t = InodeTable::new(root());
        let e = file("f", "k");
        let n = t.peek(ROOT_INO, &e);
        // Occupy the hashed number with another identity.
        t.nodes.insert(
            n,
            Entry {
                node: Node::Leaf {
                    key: Id::hash(b"other"),
                },
                lookups: 1,
                seq: 0,
            },
        );
        let got = t.remember(ROOT_INO, &e);
        assert!(got < HASHED && got != ROOT_INO);
        assert_eq!(t.key_of(got), Some((Id::hash(b"k"), false)));
    }
}
