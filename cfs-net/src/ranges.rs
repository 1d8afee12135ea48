//! Successor ranges a client learned from lookups and from the node it trusts, so reads
//! and puts of keys in a known range go straight to its replicas. Only hints: a stale
//! entry costs a failed attempt and a fresh lookup, never a wrong answer, since every
//! block is verified.

use cfs_core::{Id, NodeRef};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// How long a learned successor range is trusted, and how many are kept.
const RANGE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_RANGES: usize = 1024;
/// Ring positions (vnodes) kept to start lookups from.
const MAX_POSITIONS: usize = 4096;

struct Range {
    from: Id,
    to: Id,
    succs: Vec<NodeRef>,
    at: tokio::time::Instant,
}

#[derive(Default)]
pub(crate) struct Ranges {
    entries: Mutex<Vec<Range>>,
    /// Vnodes seen in the trusted node's tables and in lookup answers, by id. A lookup
    /// that starts at the one just before its key most often ends in one hop, where a
    /// start from a host's first vnode alone may take two or three.
    positions: Mutex<BTreeMap<Id, NodeRef>>,
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

    /// Note vnodes to start lookups from (hints: a lookup checks every answer).
    pub(crate) fn note_positions(&self, nodes: impl IntoIterator<Item = NodeRef>) {
        let mut p = self.positions.lock().unwrap();
        for n in nodes {
            if p.len() >= MAX_POSITIONS && !p.contains_key(&n.id) {
                // Full: an arbitrary one makes room (the table is a cache of hints).
                let Some(k) = p.keys().next().copied() else {
                    break;
                };
                p.remove(&k);
            }
            p.insert(n.id, n);
        }
    }

    /// The known vnodes nearest before `key` (closest first), at most `n`.
    pub(crate) fn before(&self, key: Id, n: usize) -> Vec<NodeRef> {
        let p = self.positions.lock().unwrap();
        p.range(..key)
            .rev()
            .chain(p.range(key..).rev())
            .take(n)
            .map(|(_, v)| *v)
            .collect()
    }

    /// The known vnodes from `key` on, clockwise (closest first), at most `n`.
    pub(crate) fn after(&self, key: Id, n: usize) -> Vec<NodeRef> {
        let p = self.positions.lock().unwrap();
        p.range(key..)
            .chain(p.range(..key))
            .take(n)
            .map(|(_, v)| *v)
            .collect()
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
        self.note_positions(succs.iter().copied());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_start_at_the_known_vnodes_nearest_before_the_key_wrapping_round() {
        let r = Ranges::default();
        let mut nodes: Vec<NodeRef> = (1..=4)
            .map(|i| NodeRef::new(format!("198.18.0.{i}:4000").parse().unwrap(), 0))
            .collect();
        nodes.sort_by_key(|n| n.id);
        r.note_positions(nodes.iter().copied());
        // A key just past the third: the third, then the second.
        let mut k = nodes[2].id.0;
        k[19] = k[19].wrapping_add(1);
        assert_eq!(r.before(Id(k), 2), vec![nodes[2], nodes[1]]);
        // A key before the first: the ring wraps to the last.
        assert_eq!(r.before(Id::ZERO, 2), vec![nodes[3], nodes[2]]);
        // After a key: clockwise from it, wrapping too.
        assert_eq!(r.after(Id(k), 2), vec![nodes[3], nodes[0]]);
        // A range remembered notes its nodes too.
        let other = NodeRef::new("198.18.0.9:4000".parse().unwrap(), 3);
        r.remember(nodes[0].id, &[other], 1);
        let all = r.before(Id::ZERO, 8);
        assert_eq!(all.len(), 5);
        assert!(all.contains(&other));
    }
}
