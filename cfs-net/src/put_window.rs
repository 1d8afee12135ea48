//! Bytes of puts in flight to each peer. Over the wide area a publish can have far more
//! blocks ready than a holder's link carries in a round trip; sent all at once they queue
//! in front of that link until the last ones pass the RPC timeout and count as not
//! stored. A window per peer (a few bandwidth-delay products of a 50 Mbit/s, 200 ms
//! path) keeps its link busy while the rest wait here, outside any timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// KiB of puts in flight to one peer.
const WINDOW_KIB: u32 = 4096;
/// Peers remembered; past this, ones with nothing in flight are forgotten.
const MAX_PEERS: usize = 1024;

#[derive(Default)]
pub(crate) struct PutWindows {
    peers: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
}

impl PutWindows {
    /// Wait for room for `bytes` more to `to` (a put larger than the window waits for
    /// all of it); the room is given back when the permit drops.
    pub(crate) async fn room(&self, to: SocketAddr, bytes: usize) -> OwnedSemaphorePermit {
        let sem = {
            let mut peers = self.peers.lock().unwrap();
            if peers.len() >= MAX_PEERS && !peers.contains_key(&to) {
                peers.retain(|_, s| s.available_permits() < WINDOW_KIB as usize);
            }
            peers
                .entry(to)
                .or_insert_with(|| Arc::new(Semaphore::new(WINDOW_KIB as usize)))
                .clone()
        };
        let kib = (bytes.div_ceil(1024) as u32).clamp(1, WINDOW_KIB);
        sem.acquire_many_owned(kib)
            .await
            .expect("put windows are never closed")
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
        let _third = third.await;
        drop(second);
        // A put larger than the window waits for all of it, not forever.
        drop(_third);
        drop(w.room(a, 64 << 20).await);
    }
}
