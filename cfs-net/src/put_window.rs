//! Bytes of puts in flight to each peer. Over the wide area a publish can have far more
//! blocks ready than a holder's link carries in a round trip; sent all at once they queue
//! in front of that link until the last ones pass the RPC timeout and count as not
//! stored. A window per peer keeps its link busy while the rest wait here, outside any
//! timeout. The window adapts as TCP's does (additive increase, multiplicative
//! decrease): a put that times out halves it, each one answered widens it a little, so a
//! peer behind a slow link gets little more than it carries in a timeout and the small
//! requests to it (`Has`, lookups) do not wait behind seconds of our own puts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// KiB of puts in flight to one peer: at most (a few bandwidth-delay products of a
/// 50 Mbit/s, 200 ms path), at least (one batch of a publish), and to start with.
const MAX_KIB: u32 = 4096;
const MIN_KIB: u32 = 256;
/// What each answered put widens a window by.
const STEP_KIB: u32 = 64;
/// A put answered only after this long was queued at a slow link (a delay signal, as
/// TCP Vegas or LEDBAT use): the window is halved as for a timeout, so a peer behind
/// 2 Mbit/s is not sent seconds of puts before the first one times out.
const SLOW_PUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Peers remembered; past this, ones with nothing in flight are forgotten.
const MAX_PEERS: usize = 1024;

struct Window {
    sem: Semaphore,
    state: Mutex<Size>,
}

struct Size {
    /// The window now, in KiB.
    kib: u32,
    /// Permits still to be taken out of circulation as puts in flight end (a window
    /// that shrank while full).
    debt: u32,
}

impl Window {
    fn new() -> Window {
        Window {
            sem: Semaphore::new(MAX_KIB as usize),
            state: Mutex::new(Size {
                kib: MAX_KIB,
                debt: 0,
            }),
        }
    }

    fn idle(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.debt == 0 && self.sem.available_permits() == s.kib as usize
    }

    /// A put's share, in KiB: one larger than the window takes all of it.
    fn share(&self, bytes: usize) -> u32 {
        let kib = self.state.lock().unwrap().kib;
        (bytes.div_ceil(1024) as u32).clamp(1, kib)
    }

    fn give_back(&self, kib: u32) {
        let mut s = self.state.lock().unwrap();
        let paid = s.debt.min(kib);
        s.debt -= paid;
        self.sem.add_permits((kib - paid) as usize);
    }
}

/// Room for one put in a peer's window, given back when dropped. Say how the put went
/// with [`Room::answered`] or [`Room::failed`], so the window adapts.
pub(crate) struct Room {
    window: Arc<Window>,
    kib: u32,
    /// When the room was given (the put went out).
    since: tokio::time::Instant,
}

impl Room {
    /// The peer answered: widen its window a step, or halve it if the answer came only
    /// after `SLOW_PUT`.
    pub(crate) fn answered(self) {
        if self.since.elapsed() >= SLOW_PUT {
            return self.failed();
        }
        let w = self.window.clone();
        drop(self);
        let mut s = w.state.lock().unwrap();
        if s.kib < MAX_KIB {
            let step = STEP_KIB.min(MAX_KIB - s.kib);
            s.kib += step;
            let paid = s.debt.min(step);
            s.debt -= paid;
            w.sem.add_permits((step - paid) as usize);
        }
    }

    /// The put timed out or the peer failed: halve its window.
    pub(crate) fn failed(self) {
        let w = self.window.clone();
        drop(self);
        let mut s = w.state.lock().unwrap();
        let cut = s.kib - (s.kib / 2).max(MIN_KIB);
        s.kib -= cut;
        let gone = w.sem.forget_permits(cut as usize) as u32;
        s.debt += cut - gone;
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.window.give_back(self.kib);
    }
}

#[derive(Default)]
pub(crate) struct PutWindows {
    peers: Mutex<HashMap<SocketAddr, Arc<Window>>>,
}

impl PutWindows {
    fn window(&self, to: SocketAddr) -> Arc<Window> {
        let mut peers = self.peers.lock().unwrap();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&to) {
            peers.retain(|_, w| !w.idle());
        }
        peers
            .entry(to)
            .or_insert_with(|| Arc::new(Window::new()))
            .clone()
    }

    /// Room for `bytes` more to `to` if there is some now.
    #[cfg(test)]
    fn try_room(&self, to: SocketAddr, bytes: usize) -> Option<Room> {
        let window = self.window(to);
        let kib = window.share(bytes);
        window.sem.try_acquire_many(kib).ok()?.forget();
        Some(Room {
            window,
            kib,
            since: tokio::time::Instant::now(),
        })
    }

    /// Wait for room for `bytes` more to `to`.
    pub(crate) async fn room(&self, to: SocketAddr, bytes: usize) -> Room {
        let window = self.window(to);
        let kib = window.share(bytes);
        window
            .sem
            .acquire_many(kib)
            .await
            .expect("put windows are never closed")
            .forget();
        Room {
            window,
            kib,
            since: tokio::time::Instant::now(),
        }
    }

    /// Whether `to`'s window has shrunk below a quarter of its most (timeouts, or
    /// answers that came late): its puts are not waited for before stand-ins are asked.
    pub(crate) fn slow(&self, to: SocketAddr) -> bool {
        self.window(to).state.lock().unwrap().kib < MAX_KIB / 4
    }

    #[cfg(test)]
    fn kib(&self, to: SocketAddr) -> u32 {
        self.window(to).state.lock().unwrap().kib
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn a_full_window_holds_the_next_put_until_one_in_flight_ends() {
        let w = PutWindows::default();
        let a: SocketAddr = "198.18.0.2:4000".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:4000".parse().unwrap();
        let first = w.room(a, 3 << 20).await;
        // 1 MiB more fits; 2 MiB more does not, to the same peer...
        let second = w.room(a, 1 << 20).await;
        let third = w.room(a, 2 << 20);
        tokio::pin!(third);
        assert!(third.as_mut().now_or_never().is_none());
        // ...while another peer's window is its own.
        drop(w.room(b, 4 << 20).await);
        drop(first);
        let third = third.await;
        drop(second);
        drop(third);
        // A put larger than the window waits for all of it, not forever.
        drop(w.room(a, 64 << 20).await);
    }

    #[tokio::test]
    async fn timeouts_halve_a_window_and_answers_widen_it_again() {
        let w = PutWindows::default();
        let a: SocketAddr = "198.18.0.2:4000".parse().unwrap();
        // Four puts of 1 MiB in flight, all time out: 4 MiB -> 2 -> 1 -> 512 -> 256 KiB.
        let rooms: Vec<Room> =
            futures_util::future::join_all((0..4).map(|_| w.room(a, 1 << 20))).await;
        for r in rooms {
            r.failed();
        }
        assert_eq!(w.kib(a), MIN_KIB);
        // What is in circulation matches the window: one put of its size, no more.
        let one = w.try_room(a, 1 << 20).expect("room for one");
        assert!(w.try_room(a, 1).is_none());
        one.answered();
        assert_eq!(w.kib(a), MIN_KIB + STEP_KIB);
        // Shrinking while full is paid back as puts end.
        let full = w.room(a, 1 << 20).await;
        let r2 = w.try_room(a, 1);
        assert!(r2.is_none());
        full.failed();
        assert_eq!(w.kib(a), MIN_KIB);
        assert!(w.try_room(a, (MIN_KIB as usize) << 10).is_some());
        for _ in 0..100 {
            w.room(a, 1 << 20).await.answered();
        }
        assert_eq!(w.kib(a), MAX_KIB);
    }

    #[tokio::test(start_paused = true)]
    async fn late_answers_halve_a_window_like_timeouts_and_mark_the_peer_slow() {
        let w = PutWindows::default();
        let a: SocketAddr = "198.18.0.2:4000".parse().unwrap();
        assert!(!w.slow(a));
        for want in [MAX_KIB / 2, MAX_KIB / 4, MAX_KIB / 8] {
            let r = w.room(a, 1 << 20).await;
            tokio::time::advance(SLOW_PUT).await;
            r.answered();
            assert_eq!(w.kib(a), want);
        }
        assert!(w.slow(a));
        // Prompt answers widen it again.
        w.room(a, 1 << 20).await.answered();
        assert_eq!(w.kib(a), MAX_KIB / 8 + STEP_KIB);
    }
}
