//! What one client may take of a gateway, counted per source prefix as the node counts
//! its peers (`cfs_core::ring::source_bucket`: a /24 or /48, one address on loopback):
//! one party easily holds a whole small prefix, and an IPv6 /64 alone is 2^64 addresses.
//!
//! - Connections: at most `max` at once per prefix; more are closed as they arrive.
//! - Requests: a token bucket per prefix, `rate` a second with a burst of twice that (a
//!   browser's page load, a mirror's start). A client past it is slowed down, not
//!   refused: its request waits for its token, up to `MAX_PACE` of debt, so a mirror
//!   (`wget --mirror`, which does not retry a 429) runs at the rate instead of failing.
//!   Only past that is a request refused, 429 with `Retry-After`.

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use cfs_core::ring::source_bucket;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Prefixes whose token buckets are kept at most (least recently seen go).
const MAX_TRACKED: usize = 16_384;
/// How far ahead of its rate a prefix may queue requests before they are refused.
pub(crate) const MAX_PACE: Duration = Duration::from_secs(2);

/// What happens to a request.
#[derive(Debug, PartialEq)]
pub(crate) enum Admit {
    Now,
    /// Served after this wait (the prefix is over its rate, within `MAX_PACE`).
    After(Duration),
    /// Refused: the prefix is further over its rate than `MAX_PACE`.
    Refuse {
        retry_after: Duration,
    },
}

struct Bucket {
    /// Requests that may start now; below zero, requests already promised a later start.
    tokens: f64,
    at: Instant,
}

/// Token buckets per source prefix.
pub(crate) struct Rates {
    rate: f64,
    buckets: Mutex<lru::LruCache<Vec<u8>, Bucket>>,
}

impl Rates {
    pub(crate) fn new(rate: f64) -> Rates {
        Rates {
            rate: rate.max(0.1),
            buckets: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_TRACKED).expect("non-zero"),
            )),
        }
    }

    pub(crate) fn admit(&self, ip: IpAddr) -> Admit {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Admit {
        let (rate, burst) = (self.rate, 2.0 * self.rate);
        let mut buckets = self.buckets.lock().unwrap();
        let b = buckets.get_or_insert_mut(source_bucket(ip), || Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        let after = b.tokens - 1.0;
        if after >= 0.0 {
            b.tokens = after;
            return Admit::Now;
        }
        let wait = Duration::from_secs_f64(-after / rate);
        if wait > MAX_PACE {
            // Refused requests take no token: the queue drains at the rate.
            return Admit::Refuse {
                retry_after: Duration::from_secs_f64((-b.tokens + 1.0) / rate)
                    .saturating_sub(MAX_PACE)
                    .max(Duration::from_secs(1)),
            };
        }
        b.tokens = after;
        Admit::After(wait)
    }
}

/// The client's address, from the accepting listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, Limited>> for ClientAddr {
    fn connect_info(s: IncomingStream<'_, Limited>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

type Open = Arc<Mutex<HashMap<Vec<u8>, usize>>>;

/// A listener that admits at most `max` connections per source prefix and `total` in
/// all at once (the gateway shares its process's file descriptors, with a node in
/// `cfsd --gateway`).
pub(crate) struct Limited {
    inner: TcpListener,
    max: usize,
    total: usize,
    open: Open,
}

/// The key under which `Open` counts every connection (no prefix is empty).
const ALL: &[u8] = &[];

impl Limited {
    pub(crate) fn new(inner: TcpListener, max: usize, total: usize) -> Limited {
        Limited {
            inner,
            max: max.max(1),
            total: total.max(1),
            open: Arc::default(),
        }
    }
}

/// A connection that gives its prefix's slot back when it closes.
pub(crate) struct Counted {
    io: TcpStream,
    prefix: Vec<u8>,
    open: Open,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap();
        for key in [&self.prefix[..], ALL] {
            if let Some(n) = o.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    o.remove(key);
                }
            }
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (io, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of fds or the like: wait instead of spinning.
                    tracing::warn!("gateway accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let prefix = source_bucket(addr.ip());
            {
                let mut o = self.open.lock().unwrap();
                let all = o.get(ALL).copied().unwrap_or(0);
                let mine = o.get(&prefix).copied().unwrap_or(0);
                if mine >= self.max || all >= self.total {
                    tracing::debug!(client = %addr.ip(), "gateway: too many connections");
                    continue;
                }
                *o.entry(prefix.clone()).or_insert(0) += 1;
                *o.entry(ALL.to_vec()).or_insert(0) += 1;
            }
            let _ = io.set_nodelay(true);
            let open = self.open.clone();
            return (Counted { io, prefix, open }, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_a_steady_client_is_paced_and_a_flood_is_told_when_to_retry() {
        let r = Rates::new(100.0);
        let t0 = Instant::now();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        // The burst: twice the rate at once.
        for _ in 0..200 {
            assert_eq!(r.admit_at(ip, t0), Admit::Now);
        }
        // Then each request waits for its turn, up to MAX_PACE of queue...
        match r.admit_at(ip, t0) {
            Admit::After(w) => assert!(w <= Duration::from_millis(11), "{w:?}"),
            a => panic!("{a:?}"),
        }
        // (MAX_PACE x rate = 200 in all, the first included.)
        for _ in 0..199 {
            assert!(matches!(r.admit_at(ip, t0), Admit::After(_)));
        }
        // ...and past it the request is refused with a time to come back.
        let Admit::Refuse { retry_after } = r.admit_at(ip, t0) else {
            panic!("over the queue");
        };
        assert!(retry_after >= Duration::from_secs(1));
        // Another address of the same /24 shares the bucket; another /24 does not.
        assert!(matches!(
            r.admit_at("198.51.100.200".parse().unwrap(), t0),
            Admit::Refuse { .. }
        ));
        assert_eq!(r.admit_at("198.51.101.7".parse().unwrap(), t0), Admit::Now);
        // Time refills it.
        assert_eq!(r.admit_at(ip, t0 + Duration::from_secs(10)), Admit::Now);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_48() {
        let r = Rates::new(1.0);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:ffff::9".parse().unwrap();
        assert_eq!(r.admit_at(a, t0), Admit::Now);
        assert_eq!(r.admit_at(b, t0), Admit::Now);
        assert!(matches!(r.admit_at(a, t0), Admit::After(_)));
    }
}
