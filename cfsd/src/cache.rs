//! The path cache: a byte-bounded LRU of verified content blocks, apart from the store.

use cfs_core::{BlockKind, Id};
use lru::LruCache;

pub struct ByteLru {
    map: LruCache<(BlockKind, Id), Vec<u8>>,
    bytes: usize,
    cap: usize,
}

impl ByteLru {
    pub fn new(cap_bytes: usize) -> ByteLru {
        ByteLru {
            map: LruCache::unbounded(),
            bytes: 0,
            cap: cap_bytes,
        }
    }
    pub fn get(&mut self, kind: BlockKind, key: Id) -> Option<Vec<u8>> {
        self.map.get(&(kind, key)).cloned()
    }
    pub fn insert(&mut self, kind: BlockKind, key: Id, bytes: Vec<u8>) {
        if bytes.len() > self.cap {
            return;
        }
        self.bytes += bytes.len();
        if let Some(old) = self.map.put((kind, key), bytes) {
            self.bytes -= old.len();
        }
        while self.bytes > self.cap {
            match self.map.pop_lru() {
                Some((_, b)) => self.bytes -= b.len(),
                None => break,
            }
        }
    }
    pub fn usage(&self) -> (u64, u64) {
        (self.map.len() as u64, self.bytes as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn bounded_by_bytes() {
        let mut c = ByteLru::new(100);
        for i in 0..10u8 {
            c.insert(BlockKind::Data, Id([i; 20]), vec![0; 30]);
        }
        assert_eq!(c.usage(), (3, 90));
        assert!(c.get(BlockKind::Data, Id([9; 20])).is_some());
        assert!(c.get(BlockKind::Data, Id([0; 20])).is_none());
    }
}
