//! Successor ranges a client learned from lookups and from the node it trusts, so reads
//! and puts of keys in a known range go straight to its replicas. Only hints: a stale
//! entry costs a failed attempt and a fresh lookup, never a wrong answer, since every
//! block is verified.

use cfs_core::{Id, NodeRef};
use std::sync::Mutex;

/// How long a learned successor range is trusted, and how many are kept.
const RANGE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_RANGES: usize = 1024;

struct Range {
    from: Id,
    to: Id,
    succs: Vec<NodeRef>,
    at: tokio::time::Instant,
}

#[derive(Default)]
pub(crate) struct Ranges {
    entries: Mutex<Vec<Range>>,
}

impl Ranges {
    /// The successor list of the range holding `key`, if learned within `RANGE_TTL`.
    pub(crate) fn known(&self, key: Id) -> Option<Vec<NodeRef>> {
        let now = tokio::time::Instant::now();
        let mut r = self.entries.lock().unwrap();
        r.retain(|x| now.duration_since(x.at) < RANGE_TTL);
        r.iter()
            .find(|x| key.in_half_open(x.from, x.to))
            .map(|x| x.succs.clone())
    }

    pub(crate) fn forget(&self, key: Id) {
        self.entries
            .lock()
            .unwrap()
            .retain(|x| !key.in_half_open(x.from, x.to));
    }

    /// Remember the range a lookup answered, `(from, succs[0]]`, and the ones its
    /// successor list implies, `(succs[i], succs[i + 1]]`, while what follows still holds
    /// `r` replicas as widely spread as the whole list does: one lookup then serves reads
    /// across as many ranges as the list is long (in a small ring, all of it).
    pub(crate) fn remember(&self, from: Id, succs: &[NodeRef], r: usize) {
        let mut entries = self.entries.lock().unwrap();
        let now = tokio::time::Instant::now();
        let mut add = |from: Id, succs: &[NodeRef]| {
            let to = succs[0].id;
            entries.retain(|x| !(x.from == from && x.to == to));
            if entries.len() >= MAX_RANGES {
                entries.remove(0);
            }
            entries.push(Range {
                from,
                to,
                succs: succs.to_vec(),
                at: now,
            });
        };
        add(from, succs);
        // Past that point a node further on could take a place in the tail's set.
        let Some(level) = cfs_core::ring::spread_level(succs, r) else {
            return;
        };
        for i in 0..succs.len().saturating_sub(1) {
            let tail = &succs[i + 1..];
            if cfs_core::ring::distinct_groups(tail, level) < r {
                break;
            }
            if succs[i].id != tail[0].id {
                add(succs[i].id, tail);
            }
        }
    }
}
