//! The node's in-flight memory budget, in KiB: what frames being received and replies not
//! yet written hold, taken as bytes arrive and given back when a reply is written.

use super::REPLY_RESERVE;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The in-flight byte budget, in KiB, for all frames being received or handled and all
/// replies not yet written. With at most `max_requests_per_bucket` requests per source
/// bucket being handled and one allowance for its replies (reserved or unread), one bucket holds at
/// most that many frames' and replies' worth of it.
pub(super) struct Budget {
    total: Semaphore,
    capacity: usize,
}

/// Bytes of each frame and each reply that are not charged to the budget: small
/// requests and answers (status, a get, a lookup step) never wait for it.
const FREE_FRAME_BYTES: usize = 4096;

/// KiB of budget a frame (or reply) of `bytes` is charged.
pub(super) fn charged_kib(bytes: usize) -> usize {
    bytes.saturating_sub(FREE_FRAME_BYTES).div_ceil(1024)
}

impl Budget {
    pub(super) fn new(bytes: usize) -> Budget {
        // Room for at least one largest reservation, or it could never be granted.
        let capacity = bytes.max(2 * REPLY_RESERVE) >> 10;
        Budget {
            total: Semaphore::new(capacity),
            capacity,
        }
    }

    /// Take `kib`, waiting up to `wait` if the budget is full; false if it stays full.
    async fn take(&self, kib: usize, wait: Duration) -> bool {
        if kib > self.capacity {
            return false;
        }
        let got = match self.total.try_acquire_many(kib as u32) {
            Ok(p) => Some(p),
            Err(_) => tokio::time::timeout(wait, self.total.acquire_many(kib as u32))
                .await
                .ok()
                .and_then(Result::ok),
        };
        got.map(|p| p.forget()).is_some()
    }

    fn give(&self, kib: usize) {
        self.total.add_permits(kib);
    }
}

/// Budget taken by one request and then its reply, given back when dropped (on every
/// path out, after the reply is written).
pub(super) struct Held<'a> {
    budget: &'a Budget,
    kib: AtomicUsize,
}

impl<'a> Held<'a> {
    pub(super) fn new(budget: &'a Budget) -> Held<'a> {
        Held {
            budget,
            kib: AtomicUsize::new(0),
        }
    }

    /// Take `kib` more, waiting up to `wait`; false (nothing taken) if there is no room.
    pub(super) async fn take(&self, kib: usize, wait: Duration) -> bool {
        if kib == 0 {
            return true;
        }
        let ok = self.budget.take(kib, wait).await;
        if ok {
            self.kib.fetch_add(kib, Ordering::Relaxed);
        }
        ok
    }

    /// Hold exactly `kib`: give back what is held beyond it, or take what is missing
    /// (waiting up to `wait`; false, holding what it held, if there is no room).
    pub(super) async fn hold(&self, kib: usize, wait: Duration) -> bool {
        let have = self.kib.load(Ordering::Relaxed);
        if kib <= have {
            self.budget.give(have - kib);
            self.kib.store(kib, Ordering::Relaxed);
            return true;
        }
        self.take(kib - have, wait).await
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.give(*self.kib.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{BUDGET_WAIT, REPLY_WAIT};
    use tokio::time::Instant;

    #[tokio::test]
    async fn a_full_budget_makes_frames_wait_then_gives_up() {
        let b = Budget::new(4 << 20);
        assert!(b.take(4096, BUDGET_WAIT).await);
        let t0 = Instant::now();
        assert!(!b.take(1, BUDGET_WAIT).await, "full: waits, then refuses");
        assert!(t0.elapsed() >= BUDGET_WAIT);
        b.give(4096);
        assert!(b.take(4096, BUDGET_WAIT).await);
        assert!(
            !b.take(4097, BUDGET_WAIT).await,
            "more than it has: refused at once"
        );
    }

    #[tokio::test]
    async fn a_held_reply_keeps_its_size_until_dropped() {
        let b = Budget::new(4 << 20);
        {
            let h = Held::new(&b);
            assert!(h.hold(charged_kib(REPLY_RESERVE), BUDGET_WAIT).await);
            // The reply turned out to be 100 KiB: the rest goes back at once.
            assert!(h.hold(charged_kib(100 << 10), REPLY_WAIT).await);
            assert_eq!(b.total.available_permits(), 4096 - 96);
            // A second reply cannot take more than what is left.
            let h2 = Held::new(&b);
            assert!(!h2.hold(4096, REPLY_WAIT).await);
            assert!(h2.hold(4000, REPLY_WAIT).await);
        }
        assert_eq!(b.total.available_permits(), 4096);
    }
}
