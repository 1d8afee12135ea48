//! Hedged requests (Dean and Barroso, "The Tail at Scale"): a read asks one holder, and
//! the next as soon as it fails, misses, or has not answered within a delay this process
//! measured for it; exchanges that are not hedged get a budget of such delays instead of
//! the whole RPC timeout. So no read waits on a hung, slow or cut-off holder beyond a
//! short, adaptive delay, and after one stall that holder is asked last.

use crate::net::Net;
use crate::transport::CallError;
use crate::transport::Transport;
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::wire::{Request, Response};
use cfs_core::{Id, NodeRef};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// What hedging costs in extra requests: every call this process made, the replica
/// reads among them (`Net::get_hedged`), and the exchanges given up past their delay or
/// budget for another holder (a hedged read, a lookup hop, a `GetMany` or `Has` batch),
/// each of which sent one request more than a fault-free ring needs.
#[derive(Debug)]
pub struct ReadCounts {
    pub calls: std::sync::atomic::AtomicU64,
    pub asked: std::sync::atomic::AtomicU64,
    pub hedged: std::sync::atomic::AtomicU64,
    /// Of the hedged, those whose holder had sent nothing for its quiet limit.
    pub silent: std::sync::atomic::AtomicU64,
    /// The hedging budget, in thousandths of a hedge (`HEDGE_SHARE`, `HEDGE_BURST`).
    tokens: std::sync::atomic::AtomicU64,
}

impl Default for ReadCounts {
    fn default() -> Self {
        ReadCounts {
            calls: Default::default(),
            asked: Default::default(),
            hedged: Default::default(),
            silent: Default::default(),
            tokens: std::sync::atomic::AtomicU64::new(HEDGE_BURST * 1000),
        }
    }
}

/// Speculative hedges (a holder still sending, but slower than its delay) may add at
/// most this share of the calls made, in thousandths, plus `HEDGE_BURST` at once: in a
/// fault-free ring, where waits are queues at busy uplinks, hedging must not become
/// load (issue: <= 5%). A holder that fails, or sends nothing at all for its quiet
/// limit, is left whatever the budget: that is a fault, not a queue.
const HEDGE_SHARE: u64 = 30;
/// Past the budget, a holder still sending is left once it has taken this many times its
/// delay: far slower than a queue makes it (a link capped far below the others).
const OVER_BUDGET: u32 = 3;
const HEDGE_BURST: u64 = 4;

impl ReadCounts {
    /// A call was made: it counts, and earns its share of a hedge.
    pub(crate) fn called(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        let _ = self.tokens.fetch_update(Relaxed, Relaxed, |t| {
            Some((t + HEDGE_SHARE).min(HEDGE_BURST * 1000))
        });
    }

    /// Spend one speculative hedge, if the budget has one.
    fn spend(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1000))
            .is_ok()
    }

    /// (calls, hedged): the share of requests hedging added is hedged / calls.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.calls.load(Relaxed), self.hedged.load(Relaxed))
    }

    /// Log the totals (target `cfs::reads`, info): `cfs get` and `cfs mount` do at the
    /// end, and `cfs chaos` reads the mount's line for its report.
    pub fn log(&self, what: &str) {
        let (calls, hedged) = self.totals();
        let share = hedged as f64 / calls.max(1) as f64;
        let silent = self.silent.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(target: "cfs::reads", calls, hedged, share, silent, "{what}");
    }
}

/// A replica that has not answered a read within its hedging delay is joined by the next
/// one (Dean and Barroso, "The Tail at Scale"); the delay comes from this process's own
/// measurements of that replica (`Peers::hedge_delay`), between these bounds.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(20);
pub const HEDGE_CAP: Duration = Duration::from_millis(1000);
/// The least a lookup hop is given before the next candidate is asked instead.
pub const HOP_FLOOR: Duration = Duration::from_millis(50);
/// How often a silent peer is pinged to see whether it is back.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Linux's least retransmission timeout: a peer silent for less may only be resending a
/// segment lost at a congested link, which is a queue, not a fault.
pub const RTO_MIN: Duration = Duration::from_millis(200);
/// How long a root read waits for the rest of the holders once r of them answered.
pub const ROOT_GRACE: Duration = Duration::from_millis(100);

impl<T: Transport> Net<T> {
    /// How long `addr` may take to answer an exchange expected to take `factor` round
    /// trips before it is given up for another holder (at least `floor`, at most the
    /// RPC timeout); `given_up` then marks it slow.
    /// A peer never measured gets the whole RPC timeout: its first exchange includes the
    /// connection's own round trips, and nothing says yet what it costs. A suspect one
    /// gets what a peer in good standing needs: its penalty is no measurement.
    /// `bulk`: the answer may carry a data block (its delay then counts bulk times).
    pub fn budget(&self, addr: SocketAddr, factor: u32, floor: Duration, bulk: bool) -> Duration {
        match self.delay(addr, bulk) {
            Some(delay) => (factor * delay).max(floor).min(self.timeouts.rpc),
            None => self.timeouts.rpc,
        }
    }

    /// The hedging delay of a peer measured before (a suspect's is the typical peer's:
    /// its own RTT is a penalty, not a measurement); None for one never measured.
    fn delay(&self, addr: SocketAddr, bulk: bool) -> Option<Duration> {
        self.peers.rtt_us(addr)?;
        Some(if self.peers.suspect(addr) {
            self.peers.typical_delay(HEDGE_FLOOR, HEDGE_CAP)
        } else {
            self.peers.hedge_delay(addr, HEDGE_FLOOR, HEDGE_CAP, bulk)
        })
    }

    /// How long `addr` may stay silent while asked (no byte of any reply) before it
    /// counts as hung or cut off, at least `floor`: its small exchanges' round trip plus
    /// four deviations (a suspect's is the typical peer's). None for a peer never
    /// measured, or where the transport cannot tell (the simulator).
    fn quiet_limit(&self, addr: SocketAddr, floor: Duration) -> Option<Duration> {
        // A shorter silence may be TCP resending a lost segment at a busy uplink.
        Some(self.delay(addr, false)?.max(floor) + RTO_MIN)
    }

    /// When `addr`, asked at `sent`, will have been silent for `quiet`: a large answer
    /// still arriving keeps pushing this back, a peer that sends nothing does not.
    fn silent_at(
        &self,
        addr: SocketAddr,
        sent: Instant,
        quiet: Option<Duration>,
    ) -> Option<Instant> {
        let q = quiet.filter(|_| self.transport.hears())?;
        // No connection yet (or any more): silent since it was asked.
        let heard = self.transport.heard(addr).unwrap_or(sent).max(sent);
        Some(heard + q)
    }

    /// `addr` was asked and has sent nothing since for longer than its quiet limit:
    /// down or cut off, whatever its record says (a failure detector that needs no
    /// traffic of its own: the calls are the heartbeats).
    /// A silent peer, asked last, would stay silent forever: it is pinged (once a
    /// second at most), and its answer ends the silence.
    pub fn silent(&self, addr: SocketAddr) -> bool {
        // The transport's answer first: None for nearly every peer, and it costs one lock.
        let Some(t) = self.transport.silent_since(addr) else {
            return false;
        };
        if self
            .quiet_limit(addr, HEDGE_FLOOR)
            .is_none_or(|q| t.elapsed() < q)
        {
            return false;
        }
        let now = Instant::now();
        let mut probed = self.probed.lock().unwrap();
        if probed.get(&addr).is_none_or(|p| now - *p >= PROBE_EVERY) {
            if probed.len() >= 4096 {
                probed.clear();
            }
            probed.insert(addr, now);
            let net = self.clone();
            tokio::spawn(async move {
                let _ = net.call(addr, Request::Ping).await;
            });
        }
        true
    }

    /// `req` to `to`, given up (and `to` counted slow) when it has not answered within
    /// `budget`, or sooner when `to` has sent nothing at all for its quiet limit (at
    /// least `floor`): a hung or cut-off peer is left after about one of its round trips,
    /// while one streaming a large answer gets the whole budget.
    pub async fn call_within(
        &self,
        to: SocketAddr,
        req: Request,
        budget: Duration,
        floor: Duration,
    ) -> Result<Response, CallError> {
        let mut watch = Watch::new(self, to, budget, floor, self.timeouts.rpc);
        let call = self.call(to, req);
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = tokio::time::sleep_until(watch.wake(self)) => {
                    if watch.give_up(self) {
                        return Err(CallError::Timeout(watch.sent.elapsed()));
                    }
                }
            }
        }
    }

    /// `addr` ran past the `budget` it was given, and another holder is asked instead.
    pub fn given_up(&self, addr: SocketAddr, budget: Duration) {
        self.peers.ran_past(addr, budget);
        self.reads
            .hedged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Read a block from `order` (replicas, best first): ask one, and the next as soon as
    /// it failed, answered without the block or with bad bytes, or has not answered
    /// within its hedging delay; the first answer that verifies wins, and the calls still
    /// out are dropped. A replica that ran past its delay counts as a miss, so later
    /// reads ask it last until it answers well again: after one stall, no read waits on
    /// a hung or slow holder. Err carries why the last replica failed.
    pub async fn get_hedged(
        &self,
        order: &[NodeRef],
        kind: BlockKind,
        key: Id,
        deadline: Instant,
    ) -> Result<Verified, String> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = FuturesUnordered::new();
        let mut next = 0;
        let mut last = String::from("no replica answered");
        // The newest call, while another holder is left to ask (`Watch`: its hedging
        // delay, its silence, the budget).
        let mut watch: Option<Watch> = None;
        let mut failed = false;
        loop {
            let hedge_due = !failed
                && watch
                    .as_mut()
                    .is_some_and(|w| Instant::now() >= w.wake(self) && w.give_up(self));
            if out.is_empty() || failed || hedge_due {
                watch = None;
                failed = false;
                match order.get(next) {
                    Some(n) => {
                        next += 1;
                        self.reads.asked.fetch_add(1, Relaxed);
                        let (net, a) = (self.clone(), n.addr);
                        out.push(async move { (a, net.call(a, Request::Get { kind, key }).await) });
                        let d = self.peers.hedge_delay(
                            a,
                            HEDGE_FLOOR,
                            HEDGE_CAP,
                            kind == BlockKind::Data,
                        );
                        watch = (next < order.len()).then(|| {
                            Watch::new(
                                self,
                                a,
                                d,
                                HEDGE_FLOOR,
                                deadline.saturating_duration_since(Instant::now()),
                            )
                        });
                    }
                    None if out.is_empty() => return Err(last),
                    None => {}
                }
            }
            let wake = watch
                .as_ref()
                .map_or(deadline, |w| w.wake(self).min(deadline));
            tokio::select! {
                Some((a, r)) = out.next() => {
                    match r {
                        Ok(Response::Block(Some(bytes))) => match verify(kind, key, bytes, false) {
                            Ok(v) => return Ok(v),
                            Err(e) => {
                                self.peers.missed(a);
                                last = format!("{a}: {e}");
                            }
                        },
                        Ok(Response::Block(None)) => {
                            self.peers.missed(a);
                            last = format!("{a}: not found");
                        }
                        Ok(other) => last = format!("{a}: unexpected {other:?}"),
                        Err(e) => last = format!("{a}: {e}"),
                    }
                    // A failure asks the next replica now, not at the hedge.
                    failed = true;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return Err(format!("{last} (deadline reached)"));
                    }
                }
            }
        }
    }
}

/// One call watched for being given up: past its delay (within the hedging budget;
/// beyond it only at `OVER_BUDGET` delays, at most `limit` after it was sent), or as
/// soon as its peer has sent nothing for its quiet limit.
struct Watch {
    to: SocketAddr,
    sent: Instant,
    /// When its delay runs out (pushed back once when the budget is spent).
    at: Instant,
    /// Past the budget, the furthest `at` may be pushed; None once it was.
    over: Option<Instant>,
    quiet: Option<Duration>,
}

impl Watch {
    fn new<T: Transport>(
        net: &Net<T>,
        to: SocketAddr,
        delay: Duration,
        floor: Duration,
        limit: Duration,
    ) -> Watch {
        let sent = Instant::now();
        Watch {
            to,
            sent,
            at: sent + delay,
            over: Some(sent + (OVER_BUDGET * delay).min(limit)),
            quiet: net.quiet_limit(to, floor),
        }
    }

    /// When to look again.
    fn wake<T: Transport>(&self, net: &Net<T>) -> Instant {
        let silent = net.silent_at(self.to, self.sent, self.quiet);
        silent.map_or(self.at, |s| s.min(self.at))
    }

    /// Whether to give the call up now (then counted: `given_up`).
    fn give_up<T: Transport>(&mut self, net: &Net<T>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let silent = net
            .silent_at(self.to, self.sent, self.quiet)
            .is_some_and(|s| now >= s);
        if !silent {
            if now < self.at {
                return false;
            }
            // Still sending: a hedge within the budget; else only once it is far slower
            // than its delay (a trickling holder).
            if let Some(over) = self.over.take().filter(|&o| o > self.at) {
                if !net.reads.spend() {
                    self.at = over;
                    return false;
                }
            }
        } else {
            net.reads.silent.fetch_add(1, Relaxed);
        }
        net.given_up(self.to, now - self.sent);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Timeouts;
    use crate::transport::CallError;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// Peers that answer a `Get` after a set time (the block, or not found), or never
    /// (the call times out), on tokio's clock.
    #[derive(Clone)]
    struct Scripted {
        answers: Arc<HashMap<SocketAddr, (Option<Duration>, bool)>>,
        block: Vec<u8>,
        /// Peers heard from all the time (streaming a large answer); the rest are
        /// silent until they answer. Empty: the transport cannot tell (`hears`).
        streaming: Vec<SocketAddr>,
    }

    impl Transport for Scripted {
        async fn call(
            &self,
            to: SocketAddr,
            _req: Request,
            timeout: Duration,
        ) -> Result<Response, CallError> {
            match self.answers.get(&to).copied() {
                Some((Some(after), has)) if after < timeout => {
                    tokio::time::sleep(after).await;
                    Ok(Response::Block(has.then(|| self.block.clone())))
                }
                _ => {
                    tokio::time::sleep(timeout).await;
                    Err(CallError::Timeout(timeout))
                }
            }
        }

        fn heard(&self, to: SocketAddr) -> Option<Instant> {
            self.streaming.contains(&to).then(Instant::now)
        }

        fn hears(&self) -> bool {
            !self.streaming.is_empty()
        }
    }

    fn node(port: u16) -> NodeRef {
        NodeRef::new(SocketAddr::from(([127, 0, 0, 1], port)), 0)
    }

    fn scripted(answers: &[(u16, Option<u64>, bool)]) -> (Net<Scripted>, Id) {
        let block = b"a block".to_vec();
        let key = Id::hash(&block);
        let answers = answers
            .iter()
            .map(|&(p, ms, has)| (node(p).addr, (ms.map(Duration::from_millis), has)))
            .collect();
        let t = Scripted {
            answers: Arc::new(answers),
            block,
            streaming: Vec::new(),
        };
        (Net::new(t, Timeouts::default(), None), key)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_holder_costs_a_read_one_hedging_delay_and_is_asked_last_after() {
        use std::sync::atomic::Ordering::Relaxed;
        let (net, key) = scripted(&[(1, None, true), (2, Some(2), true)]);
        let order = [node(1), node(2)];
        let deadline = Instant::now() + Duration::from_secs(20);
        let t = Instant::now();
        net.get_hedged(&order, BlockKind::Data, key, deadline)
            .await
            .unwrap();
        // The hung one gets the floor (never measured), then the next answers in 2 ms.
        assert_eq!(t.elapsed(), HEDGE_FLOOR + Duration::from_millis(2));
        assert_eq!(net.reads.hedged.load(Relaxed), 1);
        // It is suspect now: the next read asks the one that answered first.
        let mut again = order;
        net.nearest_first(&mut again);
        assert_eq!(again[0], node(2));
        let t = Instant::now();
        net.get_hedged(&again, BlockKind::Data, key, deadline)
            .await
            .unwrap();
        assert_eq!(
            t.elapsed(),
            Duration::from_millis(2),
            "no wait on the hung one"
        );
        assert_eq!(net.reads.hedged.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn fast_answers_are_not_hedged_and_a_miss_asks_the_next_at_once() {
        use std::sync::atomic::Ordering::Relaxed;
        let (net, key) = scripted(&[(1, Some(1), true), (2, Some(1), true)]);
        let deadline = Instant::now() + Duration::from_secs(20);
        for _ in 0..20 {
            net.get_hedged(&[node(1), node(2)], BlockKind::Data, key, deadline)
                .await
                .unwrap();
        }
        assert_eq!(net.reads.hedged.load(Relaxed), 0);
        assert_eq!(net.reads.asked.load(Relaxed), 20);
        // A holder that answers "not found" in 1 ms: the next one is asked then.
        let (net, key) = scripted(&[(1, Some(1), false), (2, Some(3), true)]);
        let t = Instant::now();
        net.get_hedged(&[node(1), node(2)], BlockKind::Data, key, deadline)
            .await
            .unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(4));
        // Nobody has it: the error says who said what.
        let (net, key) = scripted(&[(1, Some(1), false), (2, Some(1), false)]);
        let e = net
            .get_hedged(&[node(1), node(2)], BlockKind::Data, key, deadline)
            .await
            .unwrap_err();
        assert!(e.contains("not found"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_left_after_its_quiet_limit_a_streaming_one_gets_its_budget() {
        use std::sync::atomic::Ordering::Relaxed;
        // 1 streams an answer that takes 400 ms; 2 never sends a byte.
        let (net, key) = scripted(&[(1, Some(400), true), (2, None, true)]);
        let mut t = net.transport.clone();
        t.streaming = vec![node(1).addr];
        let net = Net::new(t, Timeouts::default(), None);
        for n in [1, 2] {
            net.peers.record(
                node(n).addr,
                Duration::from_millis(10),
                false,
                Duration::ZERO,
            );
        }
        let get = || Request::Get {
            kind: BlockKind::Data,
            key,
        };
        let budget = Duration::from_secs(1);
        let t0 = Instant::now();
        let r = net
            .call_within(node(1).addr, get(), budget, HEDGE_FLOOR)
            .await;
        assert!(matches!(r, Ok(Response::Block(Some(_)))), "{r:?}");
        assert_eq!(t0.elapsed(), Duration::from_millis(400));
        let t0 = Instant::now();
        let r = net
            .call_within(node(2).addr, get(), budget, HEDGE_FLOOR)
            .await;
        assert!(matches!(r, Err(CallError::Timeout(_))), "{r:?}");
        // Its quiet limit is its round trip and deviations (tens of ms) past TCP's least
        // retransmission timeout, not the budget.
        assert!(
            t0.elapsed() < RTO_MIN + Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(net.reads.hedged.load(Relaxed), 1);
        assert!(net.peers.suspect(node(2).addr));
    }
}
