//! The seam between the protocol and the network. Chord and DHash code talk to peers only
//! through [`Transport`] and read time only through `tokio::time`, so the daemon runs them
//! over TCP and the simulator over an in-process network with virtual time.

use cfs_core::wire::{
    self, RemoteError, Request, RequestFrame, Response, ResponseFrame, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// TCP transport: one request at a time per connection, idle connections pooled per peer.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<TcpInner>,
}

struct TcpInner {
    local: Option<SocketAddr>,
    idle: Mutex<HashMap<SocketAddr, Vec<TcpStream>>>,
    next_id: AtomicU64,
}

const MAX_IDLE_PER_PEER: usize = 16;
/// Idle connections kept in all: peers a node was made to dial (rectify candidates, lookup
/// answers) cannot pile up file descriptors in the pool.
const MAX_IDLE_TOTAL: usize = 256;

impl TcpTransport {
    /// `local` is this process's advertised address if it is a ring member.
    pub fn new(local: Option<SocketAddr>) -> TcpTransport {
        TcpTransport {
            inner: Arc::new(TcpInner {
                local,
                idle: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    async fn exchange(
        &self,
        stream: &mut TcpStream,
        frame: &[u8],
        id: u64,
    ) -> Result<Response, CallError> {
        stream
            .write_all(frame)
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let io = |e: std::io::Error| CallError::Unreachable(e.to_string());
        let len = read_prefix(stream)
            .await
            .map_err(io)?
            .ok_or_else(|| CallError::Unreachable("connection closed".into()))?;
        // A block is received straight into its own buffer: no copy out of the frame,
        // and no second buffer of its size while it is decoded.
        let mut head = vec![0u8; len.min(wire::BLOCK_HEADER_MAX)];
        stream.read_exact(&mut head).await.map_err(io)?;
        let block = wire::block_response_header(&head).filter(|(_, hdr, blen)| hdr + blen == len);
        // The rest of the body, after `start` (what of `head` belongs to it).
        let start = block.map_or(0, |(_, hdr, _)| hdr);
        let mut body = Vec::with_capacity(len - start);
        body.extend_from_slice(&head[start..]);
        (&mut *stream)
            .take((len - head.len()) as u64)
            .read_to_end(&mut body)
            .await
            .map_err(io)?;
        if body.len() != len - start {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some((rid, _, _)) = block {
            if rid != id {
                return Err(CallError::Protocol("response for another request".into()));
            }
            return Ok(Response::Block(Some(body)));
        }
        let resp: ResponseFrame =
            wire::decode(&body).map_err(|e| CallError::Protocol(e.to_string()))?;
        if resp.id != id {
            return Err(CallError::Protocol("response for another request".into()));
        }
        resp.resp.map_err(CallError::Remote)
    }

    async fn call_inner(&self, to: SocketAddr, req: Request) -> Result<Response, CallError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode_frame(&RequestFrame {
            protocol: PROTOCOL_VERSION,
            id,
            from: self.inner.local,
            req,
        })
        .map_err(|e| CallError::Protocol(e.to_string()))?;
        // A pooled connection may have been closed by the peer meanwhile: on failure,
        // retry once on a fresh one. Every request is idempotent.
        let pooled = {
            let mut idle = self.inner.idle.lock().unwrap();
            let s = idle.get_mut(&to).and_then(|v| v.pop());
            if idle.get(&to).is_some_and(|v| v.is_empty()) {
                idle.remove(&to);
            }
            s
        };
        if let Some(mut s) = pooled {
            match self.exchange(&mut s, &frame, id).await {
                Ok(r) => {
                    self.put_back(to, s);
                    return Ok(r);
                }
                Err(e @ CallError::Remote(_)) => {
                    self.put_back(to, s);
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        let mut s = TcpStream::connect(to)
            .await
            .map_err(|e| CallError::Unreachable(format!("{to}: {e}")))?;
        let _ = s.set_nodelay(true);
        let r = self.exchange(&mut s, &frame, id).await;
        if r.is_ok() || matches!(r, Err(CallError::Remote(_))) {
            self.put_back(to, s);
        }
        r
    }

    fn put_back(&self, to: SocketAddr, s: TcpStream) {
        let mut idle = self.inner.idle.lock().unwrap();
        let total: usize = idle.values().map(Vec::len).sum();
        if total >= MAX_IDLE_TOTAL {
            return;
        }
        let v = idle.entry(to).or_default();
        if v.len() < MAX_IDLE_PER_PEER {
            v.push(s);
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
}

/// Read one frame's length prefix; Ok(None) on a clean end of stream before a frame.
pub async fn read_prefix(s: &mut TcpStream) -> std::io::Result<Option<usize>> {
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
    s: &mut TcpStream,
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
