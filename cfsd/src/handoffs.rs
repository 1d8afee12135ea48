//! Hand-offs waiting out their grace period (pure): a copy outside a block's replica set
//! is dropped only after this many maintenance rounds in a row found the hand-off safe.

use cfs_core::NodeRef;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Replica sets whose hand-off is being timed, at most (one per successor range seen).
const MAX_HANDOFF_SETS: usize = 16384;

/// Hand-offs waiting out their grace period: per replica set (its sorted addresses), how
/// many maintenance rounds in a row found the hand-off safe, and the last such round.
#[derive(Default)]
pub(crate) struct Handoffs {
    round: u64,
    sets: BTreeMap<Vec<SocketAddr>, (u32, u64)>,
}

/// A replica set as a map key: its addresses, sorted.
fn set_key(set: &[NodeRef]) -> Vec<SocketAddr> {
    let mut k: Vec<SocketAddr> = set.iter().map(|n| n.addr).collect();
    k.sort();
    k
}

impl Handoffs {
    /// A maintenance round starts.
    pub(crate) fn begin_round(&mut self) {
        self.round += 1;
    }
    /// A round ended: sets it did not see are no longer in a row.
    pub(crate) fn end_round(&mut self) {
        let round = self.round;
        self.sets.retain(|_, (_, last)| *last == round);
    }
    /// Count this round for `set` (once per round); the rounds in a row so far.
    pub(crate) fn touch(&mut self, set: &[NodeRef]) -> u32 {
        let k = set_key(set);
        let round = self.round;
        if !self.sets.contains_key(&k) && self.sets.len() >= MAX_HANDOFF_SETS {
            return 0;
        }
        let e = self.sets.entry(k).or_insert((0, 0));
        if e.1 != round {
            e.0 = if e.1 + 1 == round { e.0 + 1 } else { 1 };
            e.1 = round;
        }
        e.0
    }
    /// A holder failed to serve verified bytes: the count starts again next round.
    pub(crate) fn reset(&mut self, set: &[NodeRef]) {
        if let Some(e) = self.sets.get_mut(&set_key(set)) {
            e.0 = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> Vec<NodeRef> {
        ports
            .iter()
            .map(|p| NodeRef::new(SocketAddr::from(([127, 0, 0, 1], *p)), 0))
            .collect()
    }

    #[test]
    fn rounds_count_in_a_row_and_a_gap_or_a_reset_starts_again() {
        let mut h = Handoffs::default();
        let a = set(&[1, 2, 3]);
        for want in 1..=3 {
            h.begin_round();
            assert_eq!(h.touch(&a), want);
            assert_eq!(h.touch(&a), want, "once per round");
            h.end_round();
        }
        // A round that did not see the set breaks the run.
        h.begin_round();
        h.end_round();
        h.begin_round();
        assert_eq!(h.touch(&a), 1);
        h.reset(&a);
        h.end_round();
        h.begin_round();
        assert_eq!(h.touch(&a), 1, "a failed holder restarts the count");
        // The same set in another order is the same set.
        assert_eq!(h.touch(&set(&[3, 1, 2])), 1);
    }
}
