//! What this process measured of its peers: a smoothed RTT per address (a failure counts
//! as a long one) and the calls now in flight to each. Only our own measurements count;
//! a peer's word on latency is never used.
//!
//! Replica choice weighs both: a replica's expected wait is its RTT times one plus the
//! calls already waiting on it. By RTT alone every read of a window goes to the replica
//! that looked fastest when the window started, and one link carries what the r replicas
//! of consecutive blocks (different machines) could carry together.

use cfs_core::NodeRef;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most peers remembered: a flood of unreachable candidates cannot grow the table.
const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Default)]
struct Peer {
    /// Smoothed RTT in microseconds; None until a call finished.
    rtt_us: Option<f64>,
    /// Smoothed deviation of the RTT (RFC 6298's rttvar), in microseconds.
    var_us: f64,
    /// The last call failed.
    failed: bool,
    in_flight: u32,
    /// Smoothed time of a bulk exchange (a reply of a block or more) and its deviation,
    /// in microseconds: the RTT plus the transfer and the queue at the peer's uplink.
    /// Kept apart so that small exchanges (lookups) do not make a peer look fast for
    /// blocks, nor blocks make it look slow for lookups.
    bulk_us: Option<f64>,
    bulk_var_us: f64,
    /// Suspect until then (it ran past a hedging delay or failed): asked after every
    /// peer that is not, whatever its load. Each strike in a row doubles the time; an
    /// answer clears both, and once the time is up it is asked in turn again, so a peer
    /// that recovered gets its share back.
    suspect_until: Option<tokio::time::Instant>,
    strikes: u32,
}

/// How long one strike makes a peer suspect, and the most that strikes in a row make.
const SUSPECT_FOR: Duration = Duration::from_millis(1000);
const SUSPECT_MAX: Duration = Duration::from_secs(30);

impl Peer {
    fn strike(&mut self) {
        self.strikes = (self.strikes + 1).min(16);
        let d = SUSPECT_FOR
            .saturating_mul(1 << (self.strikes - 1).min(5))
            .min(SUSPECT_MAX);
        self.suspect_until = Some(tokio::time::Instant::now() + d);
    }

    fn cleared(&mut self) {
        self.strikes = 0;
        self.suspect_until = None;
    }

    fn suspect(&self, now: tokio::time::Instant) -> bool {
        self.suspect_until.is_some_and(|t| now < t)
    }
}

/// A reply at least this large is a bulk exchange (`Peers::record_bulk`).
pub const BULK_BYTES: usize = 16 * 1024;

/// Shared by every clone of a `Net`.
#[derive(Clone, Default)]
pub struct Peers {
    map: Arc<Mutex<BTreeMap<SocketAddr, Peer>>>,
}

/// A call in flight to one peer; dropping it (the call finished or was abandoned)
/// takes it off the peer's count.
pub struct InFlight {
    peers: Peers,
    to: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(p) = self.peers.map.lock().unwrap().get_mut(&self.to) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }
}

impl Peers {
    /// A call to `to` starts.
    pub fn begin(&self, to: SocketAddr) -> InFlight {
        let mut m = self.map.lock().unwrap();
        m.entry(to).or_default().in_flight += 1;
        Self::bound(&mut m, to);
        InFlight {
            peers: self.clone(),
            to,
        }
    }

    /// A call to `to` took `took`, or failed: a failed peer looks as slow as `penalty`,
    /// so lookups and reads try it last.
    pub fn record(&self, to: SocketAddr, took: Duration, failed: bool, penalty: Duration) {
        let mut m = self.map.lock().unwrap();
        let p = m.entry(to).or_default();
        let penalty = penalty.as_secs_f64() * 1e6;
        p.failed = failed;
        if failed {
            p.strike();
        } else {
            p.cleared();
        }
        let sample = took.as_secs_f64() * 1e6;
        if let (false, Some(r)) = (failed, p.rtt_us) {
            p.var_us = 0.75 * p.var_us + 0.25 * (r - sample).abs();
        }
        p.rtt_us = Some(match (failed, p.rtt_us) {
            (true, r) => r.unwrap_or(penalty).max(penalty),
            (false, None) => took.as_secs_f64() * 1e6,
            (false, Some(r)) => 0.8 * r + 0.2 * took.as_secs_f64() * 1e6,
        });
        Self::bound(&mut m, to);
    }

    /// A bulk exchange with `to` (a reply of `BULK_BYTES` or more) took `took`.
    pub fn record_bulk(&self, to: SocketAddr, took: Duration) {
        let mut m = self.map.lock().unwrap();
        let p = m.entry(to).or_default();
        p.failed = false;
        p.cleared();
        let sample = took.as_secs_f64() * 1e6;
        p.bulk_us = Some(match p.bulk_us {
            None => sample,
            Some(b) => {
                p.bulk_var_us = 0.75 * p.bulk_var_us + 0.25 * (b - sample).abs();
                0.8 * b + 0.2 * sample
            }
        });
        Self::bound(&mut m, to);
    }

    /// `to` answered, but without what was asked (no block, bad bytes): a fast answer
    /// like that must not make it the replica asked first, so its RTT counts as at
    /// least twice the mean; a few good answers bring it back.
    pub fn missed(&self, to: SocketAddr) {
        let floor = 2.0 * self.mean_rtt_us();
        let mut m = self.map.lock().unwrap();
        if let Some(p) = m.get_mut(&to) {
            p.rtt_us = Some(p.rtt_us.unwrap_or(floor).max(floor));
        }
    }

    /// A read from `to` has not answered within `waited` (its hedging delay), and the next
    /// holder was asked: it is suspect, expected to take at least twice that (and twice
    /// the mean), so later reads ask it last until good answers bring it back.
    pub fn ran_past(&self, to: SocketAddr, waited: Duration) {
        let floor = (2.0 * waited.as_secs_f64() * 1e6).max(2.0 * self.mean_rtt_us());
        let mut m = self.map.lock().unwrap();
        if let Some(p) = m.get_mut(&to) {
            p.rtt_us = Some(p.rtt_us.unwrap_or(floor).max(floor));
            p.strike();
        }
    }

    /// How long a read from `to` may take before the next holder is asked too (a hedged
    /// request): its smoothed RTT plus four deviations, as TCP's retransmission timer,
    /// between `floor` and `cap`; twice the mean RTT for a peer never measured.
    /// For a `bulk` exchange (a data block), the bulk time plus two deviations counts too
    /// (about its 95th percentile: a hedge costs one more read, not a retransmission, and
    /// block times vary with the queue at the peer's uplink, so four would often reach
    /// the cap and let a hung holder stall a read that long).
    /// A peer not yet measured in bulk is expected to take what others take for blocks
    /// (else three of its small exchanges): a first block read that waits only for a
    /// lookup's round trip would be hedged for nothing.
    pub fn hedge_delay(
        &self,
        to: SocketAddr,
        floor: Duration,
        cap: Duration,
        bulk: bool,
    ) -> Duration {
        let mean = self.mean_rtt_us();
        let m = self.map.lock().unwrap();
        let mean_bulk = || {
            let (sum, n) = m
                .values()
                .filter_map(|p| p.bulk_us.map(|b| b + 2.0 * p.bulk_var_us))
                .fold((0.0, 0usize), |(s, n), b| (s + b, n + 1));
            (n > 0).then(|| sum / n as f64)
        };
        let us = match m.get(&to) {
            Some(
                p @ Peer {
                    rtt_us: Some(r),
                    var_us,
                    ..
                },
            ) => {
                let small = r + 4.0 * var_us;
                match (bulk, p.bulk_us) {
                    (false, _) => small,
                    (true, Some(b)) => small.max(b + 2.0 * p.bulk_var_us),
                    (true, None) => small.max(mean_bulk().unwrap_or(3.0 * small)),
                }
            }
            _ => 2.0 * mean,
        };
        drop(m);
        Duration::from_secs_f64(us / 1e6).clamp(floor, cap)
    }

    /// Past the bound, forget the slowest peer with nothing in flight that has not failed
    /// (a failure's penalty is what lets callers skip and replace it), else any idle one.
    fn bound(m: &mut BTreeMap<SocketAddr, Peer>, keep: SocketAddr) {
        if m.len() <= MAX_ENTRIES {
            return;
        }
        let idle = |k: &SocketAddr, p: &Peer| *k != keep && p.in_flight == 0;
        let worst = m
            .iter()
            .filter(|(k, p)| idle(k, p) && !p.failed)
            .max_by(|a, b| {
                let r = |p: &Peer| p.rtt_us.unwrap_or(0.0);
                r(a.1).total_cmp(&r(b.1))
            })
            .or_else(|| m.iter().find(|(k, p)| idle(k, p)))
            .map(|(k, _)| *k);
        if let Some(k) = worst {
            m.remove(&k);
        }
    }

    /// Suspect now, or its last call failed: its RTT carries a penalty, not a
    /// measurement.
    pub fn suspect(&self, addr: SocketAddr) -> bool {
        let now = tokio::time::Instant::now();
        self.map
            .lock()
            .unwrap()
            .get(&addr)
            .is_some_and(|p| p.failed || p.suspect(now))
    }

    /// Twice the mean RTT of the peers in good standing (1 ms before any), between
    /// `floor` and `cap`: what a suspect peer is given to answer, since its own RTT is a
    /// penalty that would only make a caller wait longer for what will likely not come.
    pub fn typical_delay(&self, floor: Duration, cap: Duration) -> Duration {
        let now = tokio::time::Instant::now();
        let m = self.map.lock().unwrap();
        let (sum, n) = m
            .values()
            .filter(|p| !p.failed && !p.suspect(now))
            .filter_map(|p| p.rtt_us)
            .fold((0.0, 0usize), |(s, n), r| (s + r, n + 1));
        let mean = if n == 0 { 1000.0 } else { sum / n as f64 };
        Duration::from_secs_f64(2.0 * mean / 1e6).clamp(floor, cap)
    }

    /// The last call to `addr` failed.
    pub fn failed_last(&self, addr: SocketAddr) -> bool {
        self.map
            .lock()
            .unwrap()
            .get(&addr)
            .is_some_and(|p| p.failed)
    }

    /// Smoothed RTT in microseconds, if measured.
    pub fn rtt_us(&self, addr: SocketAddr) -> Option<f64> {
        self.map.lock().unwrap().get(&addr).and_then(|p| p.rtt_us)
    }

    /// Mean of the measured RTTs (1 ms before any).
    pub fn mean_rtt_us(&self) -> f64 {
        let m = self.map.lock().unwrap();
        let (sum, n) = m
            .values()
            .filter_map(|p| p.rtt_us)
            .fold((0.0, 0usize), |(s, n), r| (s + r, n + 1));
        if n == 0 {
            1000.0
        } else {
            sum / n as f64
        }
    }

    /// Order replicas by expected wait: the time of a bulk exchange with it (else its
    /// RTT; the mean for one never measured, so new replicas get tried; a penalty on its
    /// RTT, for failing or stalling, counts whichever is larger) times one plus the
    /// calls already in flight to it. So reads spread over the holders' uplinks, each
    /// in proportion to how fast it answers.
    pub fn least_loaded_first(&self, nodes: &mut [NodeRef]) {
        let mean = self.mean_rtt_us();
        let now = tokio::time::Instant::now();
        let m = self.map.lock().unwrap();
        let cost = |n: &NodeRef| {
            let p = m.get(&n.addr).copied().unwrap_or_default();
            let rtt = p.rtt_us.unwrap_or(mean);
            let c = rtt.max(p.bulk_us.unwrap_or(0.0)) * (1.0 + p.in_flight as f64);
            (p.suspect(now), c)
        };
        nodes.sort_by(|a, b| {
            let (a, b) = (cost(a), cost(b));
            a.0.cmp(&b.0).then(a.1.total_cmp(&b.1))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> NodeRef {
        NodeRef::new(SocketAddr::from(([127, 0, 0, 1], port)), 0)
    }

    #[test]
    fn fast_small_answers_do_not_make_a_peer_first_for_blocks() {
        let p = Peers::default();
        let (a, b) = (node(1), node(2));
        let ms = Duration::from_millis;
        // A answers lookups fast (it is the one a client starts from) but is slow with
        // blocks (its uplink is busy); B is further away but sends blocks faster.
        p.record(a.addr, ms(5), false, Duration::from_secs(3));
        p.record_bulk(a.addr, ms(400));
        p.record(b.addr, ms(50), false, Duration::from_secs(3));
        p.record_bulk(b.addr, ms(150));
        let mut order = vec![a, b];
        p.least_loaded_first(&mut order);
        assert_eq!(order, vec![b, a]);
        // Hedging a block read waits for what blocks take; a lookup, for the RTT.
        let (floor, cap) = (ms(1), Duration::from_secs(5));
        assert!(p.hedge_delay(a.addr, floor, cap, true) >= ms(400));
        assert!(p.hedge_delay(a.addr, floor, cap, false) < ms(50));
        // A stall penalty on the RTT still sends block reads elsewhere.
        p.ran_past(b.addr, ms(1000));
        p.least_loaded_first(&mut order);
        assert_eq!(order, vec![a, b]);
    }

    #[test]
    fn calls_in_flight_spread_reads_over_replicas_of_equal_rtt() {
        let p = Peers::default();
        let (a, b, c) = (node(1), node(2), node(3));
        for n in [a, b, c] {
            p.record(
                n.addr,
                Duration::from_millis(1),
                false,
                Duration::from_secs(3),
            );
        }
        // Three reads issued at once go to three different replicas.
        let mut held = Vec::new();
        let mut chosen = Vec::new();
        for _ in 0..3 {
            let mut order = vec![a, b, c];
            p.least_loaded_first(&mut order);
            chosen.push(order[0].addr.port());
            held.push(p.begin(order[0].addr));
        }
        chosen.sort();
        assert_eq!(chosen, vec![1, 2, 3]);
        // Finished calls no longer count.
        held.clear();
        let mut order = vec![c, b, a];
        p.least_loaded_first(&mut order);
        assert_eq!(order[0].addr.port(), 3, "ties keep the given order");
    }

    #[test]
    fn a_failed_peer_goes_last_and_an_unmeasured_one_is_tried() {
        let p = Peers::default();
        let (a, b, c) = (node(1), node(2), node(3));
        p.record(
            a.addr,
            Duration::from_millis(2),
            false,
            Duration::from_secs(3),
        );
        p.record(b.addr, Duration::ZERO, true, Duration::from_secs(3));
        let mut order = vec![b, a, c];
        p.least_loaded_first(&mut order);
        assert_eq!(order[2], b);
        assert_eq!(p.rtt_us(b.addr), Some(3e6));
        // c is unmeasured: it costs the mean, (2 ms + 3 s) / 2, more than a but less than b.
        assert_eq!(order, vec![a, c, b]);
    }

    #[test]
    fn a_replica_that_answers_without_the_block_is_asked_later() {
        let p = Peers::default();
        let (a, b) = (node(1), node(2));
        p.record(
            a.addr,
            Duration::from_micros(100),
            false,
            Duration::from_secs(3),
        );
        p.record(
            b.addr,
            Duration::from_millis(1),
            false,
            Duration::from_secs(3),
        );
        let mut order = vec![a, b];
        p.least_loaded_first(&mut order);
        assert_eq!(order[0], a);
        p.missed(a.addr);
        p.least_loaded_first(&mut order);
        assert_eq!(order, vec![b, a]);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_peers_with_calls_in_flight() {
        let p = Peers::default();
        let busy = SocketAddr::from(([10, 0, 0, 1], 1));
        let _g = p.begin(busy);
        for i in 0..(MAX_ENTRIES as u32 + 50) {
            let a = SocketAddr::from((std::net::Ipv4Addr::from(0x0b00_0000 + i), 1));
            p.record(a, Duration::from_millis(1), false, Duration::from_secs(3));
        }
        let m = p.map.lock().unwrap();
        assert!(m.len() <= MAX_ENTRIES + 1);
        assert!(m.contains_key(&busy));
    }
}
