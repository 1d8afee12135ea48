//! Hedged requests (Dean and Barroso, "The Tail at Scale"): a read asks one holder, and
//! the next as soon as it fails, misses, or has not answered within a delay this process
//! measured for it; exchanges that are not hedged get a budget of such delays instead of
//! the whole RPC timeout. So no read waits on a hung, slow or cut-off holder beyond a
//! short, adaptive delay, and after one stall that holder is asked last.

use crate::net::Net;
use crate::transport::Transport;
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::wire::{Request, Response};
use cfs_core::{Id, NodeRef};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Counts of replica reads (`Net::get_hedged`): what hedging costs in extra requests.
#[derive(Default, Debug)]
pub struct ReadCounts {
    pub asked: std::sync::atomic::AtomicU64,
    pub hedged: std::sync::atomic::AtomicU64,
}

/// A replica that has not answered a read within its hedging delay is joined by the next
/// one (Dean and Barroso, "The Tail at Scale"); the delay comes from this process's own
/// measurements of that replica (`Peers::hedge_delay`), between these bounds.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(20);
pub const HEDGE_CAP: Duration = Duration::from_millis(1000);
/// The least a lookup hop is given before the next candidate is asked instead.
pub const HOP_FLOOR: Duration = Duration::from_millis(50);
/// How long a root read waits for the rest of the holders once r of them answered.
pub const ROOT_GRACE: Duration = Duration::from_millis(100);

impl<T: Transport> Net<T> {
    /// How long `addr` may take to answer an exchange expected to take `factor` round
    /// trips before it is given up for another holder (at least `floor`, at most the
    /// RPC timeout); `given_up` then marks it slow.
    /// A peer never measured gets the whole RPC timeout: its first exchange includes the
    /// connection's own round trips, and nothing says yet what it costs. A suspect one
    /// gets what a peer in good standing needs: its penalty is no measurement.
    pub fn budget(&self, addr: SocketAddr, factor: u32, floor: Duration) -> Duration {
        if self.peers.rtt_us(addr).is_none() {
            return self.timeouts.rpc;
        }
        let delay = if self.peers.suspect(addr) {
            self.peers.typical_delay(HEDGE_FLOOR, HEDGE_CAP)
        } else {
            self.peers.hedge_delay(addr, HEDGE_FLOOR, HEDGE_CAP, false)
        };
        (factor * delay).max(floor).min(self.timeouts.rpc)
    }

    /// `addr` ran past the `budget` it was given.
    pub fn given_up(&self, addr: SocketAddr, budget: Duration) {
        self.peers.ran_past(addr, budget);
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
        // When the newest call will have been out for its hedging delay, to whom, and
        // that delay.
        let mut hedge_at: Option<(Instant, SocketAddr, Duration)> = None;
        let mut failed = false;
        loop {
            let hedge_due = hedge_at.is_some_and(|(t, _, _)| Instant::now() >= t);
            if out.is_empty() || failed || hedge_due {
                if let Some((_, slow, waited)) = hedge_at.take().filter(|_| hedge_due && !failed) {
                    self.peers.ran_past(slow, waited);
                    self.reads.hedged.fetch_add(1, Relaxed);
                }
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
                        hedge_at = (next < order.len()).then(|| (Instant::now() + d, a, d));
                    }
                    None if out.is_empty() => return Err(last),
                    None => {}
                }
            }
            let wake = hedge_at.map_or(deadline, |(t, _, _)| t.min(deadline));
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
}
