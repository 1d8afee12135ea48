//! One vnode's routing table: predecessor, successor list and fingers, and the next step
//! towards a key. Pure: no I/O, no clock; `chord.rs` keeps it current.

use cfs_core::ring::{estimate_size, MIN_ENTRIES_FOR_ESTIMATE};
use cfs_core::wire::{Step, MAX_REFS};
use cfs_core::{Id, NodeRef};
use cfs_net::net::CLOSER_COUNT;
use std::time::Duration;

/// One ring position.
pub(crate) struct Vnode {
    pub(crate) me: NodeRef,
    pub(crate) pred: Option<NodeRef>,
    /// Never empty: a ring of one has itself as successor. Every other entry was valid,
    /// in clockwise order and answered a ping when it entered.
    pub(crate) succs: Vec<NodeRef>,
    pub(crate) fingers: Vec<Option<NodeRef>>,
    pub(crate) next_finger: u32,
    /// The best pending rectify candidate (closest before us), and whether a task is
    /// checking candidates: at most one dial per vnode at a time, however many arrive.
    pub(crate) rectify_next: Option<NodeRef>,
    pub(crate) rectifying: bool,
    /// Candidates that did not answer, and when: not dialled again for a while, so a
    /// flood of dead candidates cannot keep the queue from the true predecessor.
    pub(crate) rectify_failed: std::collections::VecDeque<(NodeRef, tokio::time::Instant)>,
}

/// How long a rectify candidate that did not answer is ignored, and how many are kept.
pub(crate) const RECTIFY_FAILED_FOR: Duration = Duration::from_secs(30);
pub(crate) const RECTIFY_FAILED_MAX: usize = 256;

impl Vnode {
    pub(crate) fn new(me: NodeRef) -> Vnode {
        Vnode {
            me,
            pred: None,
            succs: vec![me],
            fingers: vec![None; 160],
            next_finger: 0,
            rectify_next: None,
            rectifying: false,
            rectify_failed: Default::default(),
        }
    }

    /// The nodes we know that precede `key`, closest to it first.
    fn closer(&self, key: Id) -> Vec<NodeRef> {
        // Distances computed once per entry, not per comparison: this runs on every
        // lookup step and the finger table repeats its entries (same order as before).
        let mut v: Vec<(f64, NodeRef)> = self
            .fingers
            .iter()
            .flatten()
            .chain(self.succs.iter())
            .chain(self.pred.iter())
            .filter(|n| n.id.in_open(self.me.id, key))
            .map(|n| (n.id.distance_frac(key), *n))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.dedup_by_key(|(_, n)| (n.addr, n.vnode));
        v.truncate(CLOSER_COUNT);
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Ring size estimate from the successor list's density: the node's own measurement,
    /// None while the list is too short for it to mean much.
    pub(crate) fn n_est(&self) -> Option<u32> {
        let last = *self.succs.last().unwrap();
        (self.succs.len() >= MIN_ENTRIES_FOR_ESTIMATE && last != self.me)
            .then(|| estimate_size(self.succs.len(), self.me.id.distance_frac(last.id)))
    }

    /// Answer one lookup step.
    pub(crate) fn step(&self, key: Id) -> Step {
        if let Some(p) = self.pred {
            if key.in_half_open(p.id, self.me.id) {
                let mut succs = vec![self.me];
                succs.extend(self.succs.iter().filter(|n| **n != self.me));
                succs.truncate(MAX_REFS);
                return Step::Done { from: p, succs };
            }
        }
        let succ = self.succs[0];
        if succ == self.me || key.in_half_open(self.me.id, succ.id) {
            return Step::Done {
                from: self.me,
                succs: self.succs.iter().take(MAX_REFS).copied().collect(),
            };
        }
        Step::Closer {
            nodes: self.closer(key),
            n_est: self.n_est().unwrap_or(self.succs.len() as u32 + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn node(port: u16) -> NodeRef {
        NodeRef::new(SocketAddr::from(([127, 0, 0, 1], port)), 0)
    }

    /// Ids of four nodes in ring order.
    fn ring() -> Vec<NodeRef> {
        let mut v: Vec<NodeRef> = (1..=4).map(node).collect();
        v.sort_by_key(|n| n.id);
        v
    }

    #[test]
    fn a_lone_vnode_answers_every_key_itself() {
        let me = node(1);
        let v = Vnode::new(me);
        match v.step(Id::hash(b"anything")) {
            Step::Done { from, succs } => assert_eq!((from, succs), (me, vec![me])),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn keys_it_owns_are_done_others_go_closer_and_never_back_past_it() {
        let r = ring();
        let mut v = Vnode::new(r[1]);
        v.pred = Some(r[0]);
        v.succs = vec![r[2], r[3], r[0]];
        v.fingers[159] = Some(r[3]);
        // Its own range (pred, me]: done, itself first.
        match v.step(r[1].id) {
            Step::Done { from, succs } => {
                assert_eq!(from, r[0]);
                assert_eq!(succs[0], r[1]);
            }
            s => panic!("{s:?}"),
        }
        // Its successor's range (me, succ]: done from itself.
        match v.step(r[2].id) {
            Step::Done { from, succs } => assert_eq!((from, succs[0]), (r[1], r[2])),
            s => panic!("{s:?}"),
        }
        // Further on: only nodes between it and the key, closest first.
        match v.step(r[0].id) {
            Step::Closer { nodes, .. } => {
                assert_eq!(nodes[0], r[3]);
                assert!(nodes.iter().all(|n| n.id.in_open(r[1].id, r[0].id)));
            }
            s => panic!("{s:?}"),
        }
    }
}
