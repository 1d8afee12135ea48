//! The seam between the protocol and the network. Chord and DHash code talk to peers only
//! through [`Transport`] and read time only through `tokio::time`, so the daemon runs them
//! over TCP and the simulator over an in-process network with virtual time.

use crate::conn::Conn;
use cfs_core::wire::{self, RemoteError, Request, RequestFrame, Response, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach peer: {0}")]
    Unreachable(String),
    #[error("peer refused: {0}")]
    Remote(RemoteError),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
}

impl CallError {
    /// Whether the peer should be considered failed (as opposed to answering "no").
    pub fn is_failure(&self) -> bool {
        !matches!(self, CallError::Remote(_))
    }
}

pub trait Transport: Clone + Send + Sync + 'static {
    /// One request/response exchange with the process at `to`, bounded by `timeout`.
    fn call(
        &self,
        to: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, CallError>> + Send;

    /// When bytes from `to` last arrived (any reply, or part of one), if this transport
    /// can tell: a peer sending is alive, one silent while asked is hung or cut off.
    fn heard(&self, _to: SocketAddr) -> Option<Instant> {
        None
    }

    /// Whether `heard` tells anything (else silence means nothing).
    fn hears(&self) -> bool {
        false
    }

    /// Since when `to` has been asked without sending a byte back, if it has.
    fn silent_since(&self, _to: SocketAddr) -> Option<Instant> {
        None
    }
}

/// The server side: what a process does with one request.
pub trait Handler: Send + Sync + 'static {
    /// `peer` is the connection's source address; `from` the listen address the caller
    /// claims (unverified).
    fn handle(
        &self,
        peer: SocketAddr,
        from: Option<SocketAddr>,
        req: Request,
    ) -> impl Future<Output = Result<Response, RemoteError>> + Send;

    /// A connection sent bytes that are not a valid frame (counted in metrics).
    fn refused_input(&self, peer: SocketAddr, why: &str);

    /// A connection was closed to make room for a new one.
    fn evicted_connection(&self) {}

    /// A connection was closed for sending too slowly or not reading its replies.
    fn slow_peer(&self, peer: SocketAddr, why: &str) {
        self.refused_input(peer, why);
    }

    /// A request was answered Busy: the in-flight budget had no room for its reply.
    fn dropped_reply(&self, peer: SocketAddr, why: &str) {
        self.slow_peer(peer, why);
    }
}

/// TCP transport: requests multiplexed over a connection or two per peer
/// ([`crate::conn::Conn`]), kept open while in use and closed after `conn::IDLE` idle.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<TcpInner>,
}

#[derive(Default)]
struct PeerConns {
    conns: Vec<Arc<Conn>>,
    /// Held while a connection to the peer is being opened: calls that find none wait
    /// for that one instead of each opening their own.
    dial: Arc<tokio::sync::Mutex<()>>,
}

struct TcpInner {
    local: Option<SocketAddr>,
    peers: Mutex<HashMap<SocketAddr, PeerConns>>,
    next_id: AtomicU64,
    last_sweep: Mutex<Instant>,
}

/// Connections to one peer at most: a second opens once the first has this many calls
/// in flight (two congestion windows, and a large reply delays fewer small ones).
const CONNS_PER_PEER: usize = 2;
const CALLS_BEFORE_SECOND: usize = 8;
/// Open connections in all, past which idle ones are closed first: peers a node was made
/// to dial (rectify candidates, lookup answers) cannot pile up file descriptors.
const MAX_CONNS: usize = 512;

impl TcpTransport {
    /// `local` is this process's advertised address if it is a ring member.
    pub fn new(local: Option<SocketAddr>) -> TcpTransport {
        TcpTransport {
            inner: Arc::new(TcpInner {
                local,
                peers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                last_sweep: Mutex::new(Instant::now()),
            }),
        }
    }

    /// A connection to `to` with room for one more call, if one is open; None when a
    /// (first or second) connection should be opened.
    fn pick(&self, to: SocketAddr) -> Option<Arc<Conn>> {
        let mut peers = self.inner.peers.lock().unwrap();
        let p = peers.get_mut(&to)?;
        p.conns.retain(|c| c.is_open());
        let best = p.conns.iter().min_by_key(|c| c.load())?;
        if best.load() >= CALLS_BEFORE_SECOND && p.conns.len() < CONNS_PER_PEER {
            return None;
        }
        Some(best.clone())
    }

    async fn conn_for(&self, to: SocketAddr) -> Result<Arc<Conn>, CallError> {
        if let Some(c) = self.pick(to) {
            return Ok(c);
        }
        let dial = self
            .inner
            .peers
            .lock()
            .unwrap()
            .entry(to)
            .or_default()
            .dial
            .clone();
        let _dialing = dial.lock().await;
        if let Some(c) = self.pick(to) {
            return Ok(c);
        }
        self.sweep();
        let c = Conn::open(to).await?;
        self.inner
            .peers
            .lock()
            .unwrap()
            .entry(to)
            .or_default()
            .conns
            .push(c.clone());
        Ok(c)
    }

    /// Close connections idle past `conn::IDLE` (at most once a second), and idle ones
    /// beyond `MAX_CONNS`; forget peers with none left.
    fn sweep(&self) {
        {
            let mut last = self.inner.last_sweep.lock().unwrap();
            if last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        let mut peers = self.inner.peers.lock().unwrap();
        for p in peers.values_mut() {
            crate::conn::sweep(&mut p.conns);
        }
        let mut open: usize = peers.values().map(|p| p.conns.len()).sum();
        for p in peers.values_mut() {
            if open < MAX_CONNS {
                break;
            }
            p.conns.retain(|c| {
                let drop = open >= MAX_CONNS && c.idle();
                if drop {
                    c.close_now();
                    open -= 1;
                }
                !drop
            });
        }
        peers.retain(|_, p| !p.conns.is_empty() || Arc::strong_count(&p.dial) > 1);
    }

    async fn call_inner(&self, to: SocketAddr, req: Request) -> Result<Response, CallError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Shared, not copied, with the retry below and the writer task.
        let frame = wire::encode_frame(&RequestFrame {
            protocol: PROTOCOL_VERSION,
            id,
            from: self.inner.local,
            req,
        })
        .map(Arc::new)
        .map_err(|e| CallError::Protocol(e.to_string()))?;
        // A connection may have been closed by the peer meanwhile (its idle timeout, a
        // restart): on that failure, retry once on a fresh one. Every request is
        // idempotent.
        let c = self.conn_for(to).await?;
        match c.call(id, frame.clone()).await {
            Err(CallError::Unreachable(_)) => {
                let c = self.conn_for(to).await?;
                c.call(id, frame).await
            }
            r => r,
        }
    }
}

/// Bound one exchange by `timeout`: every transport's calls end this way.
pub async fn bounded(
    timeout: Duration,
    exchange: impl Future<Output = Result<Response, CallError>>,
) -> Result<Response, CallError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(CallError::Timeout(timeout)))
}

impl Transport for TcpTransport {
    async fn call(
        &self,
        to: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        bounded(timeout, self.call_inner(to, req)).await
    }

    fn heard(&self, to: SocketAddr) -> Option<Instant> {
        let peers = self.inner.peers.lock().unwrap();
        peers.get(&to)?.conns.iter().map(|c| c.heard()).max()
    }

    fn hears(&self) -> bool {
        true
    }

    fn silent_since(&self, to: SocketAddr) -> Option<Instant> {
        let peers = self.inner.peers.lock().unwrap();
        let conns = &peers.get(&to)?.conns;
        let heard = conns.iter().map(|c| c.heard()).max()?;
        let asked = conns.iter().filter_map(|c| c.asked_since_heard()).min()?;
        (asked > heard).then_some(asked)
    }
}

/// Read one frame's length prefix; Ok(None) on a clean end of stream before a frame.
pub async fn read_prefix<R: AsyncRead + Unpin>(s: &mut R) -> std::io::Result<Option<usize>> {
    let mut prefix = [0u8; 4];
    match s.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    wire::frame_len(prefix)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// The first capacity a frame body buffer gets; it then doubles as bytes arrive.
pub const FIRST_READ: usize = 16 * 1024;

/// Read a frame body of `len` bytes (the server side). Memory follows the bytes that
/// arrived, never the length a peer announced: the buffer is allocated only once the
/// socket has data and doubles when full, so it is never more than twice what arrived
/// (and at most 7 reallocations for the largest frame). `grow` is asked for each increase
/// of its capacity (it may wait for a shared budget, or refuse).
pub async fn read_body<F, Fut>(
    s: &mut OwnedReadHalf,
    len: usize,
    mut grow: F,
) -> std::io::Result<Vec<u8>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut body: Vec<u8> = Vec::new();
    while body.len() < len {
        s.readable().await?;
        if body.capacity() == body.len() {
            let target = (body.capacity() * 2).max(FIRST_READ).min(len);
            let add = target - body.capacity();
            if !grow(add).await {
                return Err(std::io::Error::other("over the in-flight memory budget"));
            }
            body.reserve_exact(add);
        }
        let room = (len - body.len()).min(body.capacity() - body.len());
        // Read into spare capacity: no zeroing of a buffer that is about to be overwritten.
        let mut limited = (&mut *s).take(room as u64);
        match limited.read_buf(&mut body).await {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(body)
}
