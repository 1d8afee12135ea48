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
    /// Candidates that did not answer: not dialled again for a while, so a flood of
    /// dead candidates cannot keep the queue from the true predecessor.
    pub(crate) rectify_failed: Unanswered,
}

/// A rectify candidate that did not answer is ignored for this long, doubling with each
/// failure in a row up to `RECTIFY_FAILED_FOR`; at most `RECTIFY_FAILED_MAX` are kept.
/// Short at first: a node that stopped and started again on the same address (the same
/// ids) may have sent a rectify while it was going down, and must not be shut out of
/// its place for long when it comes back.
pub(crate) const RECTIFY_FAILED_FIRST: Duration = Duration::from_secs(1);
pub(crate) const RECTIFY_FAILED_FOR: Duration = Duration::from_secs(30);
pub(crate) const RECTIFY_FAILED_MAX: usize = 256;

/// Candidates that did not answer a ping: (who, when it last failed, how long it is
/// ignored from then), oldest first.
#[derive(Default)]
pub(crate) struct Unanswered(std::collections::VecDeque<(NodeRef, tokio::time::Instant, Duration)>);

impl Unanswered {
    /// Whether `cand` is still being ignored at `now`. Entries are forgotten once
    /// `RECTIFY_FAILED_FOR` has passed since their last failure (their doubling too).
    pub(crate) fn ignored(&mut self, cand: NodeRef, now: tokio::time::Instant) -> bool {
        while self
            .0
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) > RECTIFY_FAILED_FOR)
        {
            self.0.pop_front();
        }
        self.0
            .iter()
            .any(|(c, at, ban)| *c == cand && now.duration_since(*at) < *ban)
    }

    /// `cand` did not answer at `now`.
    pub(crate) fn failed(&mut self, cand: NodeRef, now: tokio::time::Instant) {
        let ban = match self.0.iter().position(|(c, _, _)| *c == cand) {
            Some(i) => {
                let (_, _, ban) = self.0.remove(i).unwrap();
                (ban * 2).min(RECTIFY_FAILED_FOR)
            }
            None => RECTIFY_FAILED_FIRST,
        };
        self.0.push_back((cand, now, ban));
        if self.0.len() > RECTIFY_FAILED_MAX {
            self.0.pop_front();
        }
    }
}

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
                // Walked from `p`, the list ends where it comes round to `p`: a node our
                // list still holds between `p` and us (one that went down, or is joining
                // back before it rectified us) would make the walk wrap, and the asker
                // refuse the whole answer.
                let mut succs = vec![self.me];
                for n in self.succs.iter().filter(|n| **n != self.me) {
                    let last = succs[succs.len() - 1];
                    if last == p || !n.id.in_half_open(last.id, p.id) || succs.len() == MAX_REFS {
                        break;
                    }
                    succs.push(*n);
                }
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

    /// A candidate that failed once is ignored briefly (a node back on its address gets
    /// its place again within seconds); one that keeps failing is ignored for longer,
    /// up to the cap, and forgotten after the cap passes without a failure.
    #[test]
    fn unanswered_candidates_are_ignored_for_longer_each_time() {
        let t0 = tokio::time::Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let (a, b) = (node(1), node(2));
        let mut u = Unanswered::default();
        assert!(!u.ignored(a, t0));
        u.failed(a, t0);
        assert!(u.ignored(a, s(0.5)) && !u.ignored(b, s(0.5)));
        assert!(!u.ignored(a, s(1.1)), "the first failure costs a second");
        u.failed(a, s(1.1));
        assert!(u.ignored(a, s(2.5)) && !u.ignored(a, s(3.2)), "then two");
        let mut at = 3.2;
        for _ in 0..10 {
            u.failed(a, s(at));
            at += 0.01;
        }
        assert!(u.ignored(a, s(at + 29.0)), "capped at RECTIFY_FAILED_FOR");
        assert!(!u.ignored(a, s(at + 31.0)));
        u.failed(a, s(at + 40.0));
        assert!(
            !u.ignored(a, s(at + 41.1)),
            "forgotten after the cap: a second again"
        );
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
        // A list that still holds a node between pred and it (gone, or back and not yet
        // its pred again): the answer stops where the walk comes round to pred, so a
        // joiner accepts it.
        v.succs = vec![r[2], r[3], r[0], r[1]];
        v.pred = Some(r[3]);
        match v.step(r[0].id) {
            Step::Done { from, succs } => {
                assert_eq!((from, &succs[..]), (r[3], &[r[1], r[2], r[3]][..]));
                cfs_core::ring::check_done(r[1], r[0].id, from, &succs, None, 16).unwrap();
            }
            s => panic!("{s:?}"),
        }
        v.succs = vec![r[2], r[3], r[0]];
        v.pred = Some(r[0]);
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
