//! One multiplexed client connection (protocol 6): many requests in flight at once, each
//! written whole by one writer task, and their replies, in any order, read by one reader
//! task that hands each to its caller by request id. Over the wide area this is what
//! keeps a peer's connection warm: no handshake and no slow start per block, and one
//! congestion window that grows with the transfer instead of many that start small.

use crate::transport::{read_prefix, CallError};
use cfs_core::wire::{self, Response, ResponseFrame};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A connection with nothing in flight for this long is closed (well before a server's
/// idle timeout, so a request rarely meets a connection the server is closing).
pub const IDLE: Duration = Duration::from_secs(15);

type Reply = Result<Response, CallError>;

struct State {
    open: bool,
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    last_used: Instant,
}

pub struct Conn {
    state: Mutex<State>,
    /// When bytes last came in (ns after `opened`): a reply in progress, or any other,
    /// shows the peer is alive even while a large answer is still on its way.
    heard_ns: AtomicU64,
    /// When a request was first sent after the last bytes came in (ns after `opened`,
    /// plus one; 0: none): a peer asked and silent since is down, or cut off.
    asked_ns: AtomicU64,
    opened: Instant,
    /// Frames to the writer task; None once closed (the task then drops the socket).
    frames: Mutex<Option<mpsc::UnboundedSender<Arc<Vec<u8>>>>>,
}

/// A call's place among the waiting; dropping it (answered, timed out, abandoned)
/// forgets the id, so a late reply is read and dropped.
struct Waiting<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.conn.state.lock().unwrap();
        s.waiting.remove(&self.id);
        s.last_used = Instant::now();
    }
}

impl Conn {
    pub async fn open(to: SocketAddr) -> Result<Arc<Conn>, CallError> {
        let t0 = Instant::now();
        let s = TcpStream::connect(to)
            .await
            .map_err(|e| CallError::Unreachable(format!("{to}: {e}")))?;
        tracing::trace!(target: "cfs::calls", %to, ms = t0.elapsed().as_secs_f64() * 1e3, "connected");
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            state: Mutex::new(State {
                open: true,
                waiting: HashMap::new(),
                last_used: Instant::now(),
            }),
            frames: Mutex::new(Some(tx)),
            heard_ns: AtomicU64::new(0),
            asked_ns: AtomicU64::new(0),
            opened: Instant::now(),
        });
        tokio::spawn(write_loop(conn.clone(), wr, rx));
        tokio::spawn(read_loop(
            conn.clone(),
            Heard {
                rd,
                conn: conn.clone(),
            },
        ));
        Ok(conn)
    }

    /// When bytes from the peer last arrived on it.
    pub fn heard(&self) -> Instant {
        self.opened + Duration::from_nanos(self.heard_ns.load(Relaxed).saturating_sub(1))
    }

    /// When it was first asked something after the peer last sent bytes, if it was.
    pub fn asked_since_heard(&self) -> Option<Instant> {
        let (asked, heard) = (self.asked_ns.load(Relaxed), self.heard_ns.load(Relaxed));
        (asked > heard).then(|| self.opened + Duration::from_nanos(asked - 1))
    }

    fn note_asked(&self) {
        let now = self.opened.elapsed().as_nanos() as u64 + 1;
        if self.asked_ns.load(Relaxed) <= self.heard_ns.load(Relaxed) {
            self.asked_ns.store(now, Relaxed);
        }
    }

    /// Calls in flight on it.
    pub fn load(&self) -> usize {
        self.state.lock().unwrap().waiting.len()
    }

    pub fn is_open(&self) -> bool {
        self.state.lock().unwrap().open
    }

    /// Open, with nothing in flight.
    pub fn idle(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.open && s.waiting.is_empty()
    }

    /// Send `frame` (request `id`) and wait for its reply. Cancel-safe: the frame is
    /// queued whole or not at all, and dropping the call forgets the id.
    pub async fn call(&self, id: u64, frame: Arc<Vec<u8>>) -> Reply {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.state.lock().unwrap();
            if !s.open {
                return Err(CallError::Unreachable("connection closed".into()));
            }
            s.waiting.insert(id, tx);
            s.last_used = Instant::now();
        }
        let _waiting = Waiting { conn: self, id };
        let sent = self
            .frames
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|f| f.send(frame).is_ok());
        if !sent {
            return Err(CallError::Unreachable("connection closed".into()));
        }
        self.note_asked();
        rx.await
            .unwrap_or_else(|_| Err(CallError::Unreachable("connection closed".into())))
    }

    /// Close: no new calls, every waiting call fails with `why`, the writer drops the
    /// socket.
    fn close(&self, why: &str) {
        let waiting = {
            let mut s = self.state.lock().unwrap();
            s.open = false;
            std::mem::take(&mut s.waiting)
        };
        self.frames.lock().unwrap().take();
        for (_, tx) in waiting {
            let _ = tx.send(Err(CallError::Unreachable(why.to_string())));
        }
    }

    /// Close it now (the caller checked it is idle).
    pub fn close_now(&self) {
        self.close("closed to make room");
    }

    /// Close it if it has been idle for `IDLE`; whether it is closed now.
    fn close_if_idle(&self) -> bool {
        {
            let mut s = self.state.lock().unwrap();
            if !s.open {
                return true;
            }
            if !s.waiting.is_empty() || s.last_used.elapsed() < IDLE {
                return false;
            }
            s.open = false;
        }
        self.close("idle");
        true
    }

    fn deliver(&self, id: u64, reply: Reply) {
        let tx = self.state.lock().unwrap().waiting.remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }
}

async fn write_loop(
    conn: Arc<Conn>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Arc<Vec<u8>>>,
) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            conn.close(&e.to_string());
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// The read half, noting when bytes arrive (`Conn::heard`).
struct Heard {
    rd: OwnedReadHalf,
    conn: Arc<Conn>,
}

impl AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.rd).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ns = self.conn.opened.elapsed().as_nanos() as u64 + 1;
            self.conn.heard_ns.store(ns, Relaxed);
        }
        r
    }
}

async fn read_loop(conn: Arc<Conn>, mut rd: Heard) {
    let why = loop {
        // Waiting for the next reply: `readable` consumes nothing, so the idle check
        // never cuts a frame in half.
        tokio::select! {
            r = rd.rd.readable() => {
                if let Err(e) = r {
                    break e.to_string();
                }
            }
            _ = tokio::time::sleep(IDLE) => {
                if conn.close_if_idle() {
                    return;
                }
                continue;
            }
        }
        match read_reply(&mut rd).await {
            Ok(Some((id, reply))) => conn.deliver(id, reply),
            Ok(None) => break "connection closed".to_string(),
            Err(e) => break e,
        }
    };
    conn.close(&why);
}

/// One reply frame: Ok(None) at a clean end of stream.
async fn read_reply(rd: &mut Heard) -> Result<Option<(u64, Reply)>, String> {
    let io = |e: std::io::Error| e.to_string();
    let Some(len) = read_prefix(rd).await.map_err(io)? else {
        return Ok(None);
    };
    // A block is received straight into its own buffer: no copy out of the frame, and
    // no second buffer of its size while it is decoded.
    let mut head = vec![0u8; len.min(wire::BLOCK_HEADER_MAX)];
    rd.read_exact(&mut head).await.map_err(io)?;
    let block = wire::block_response_header(&head).filter(|(_, hdr, blen)| hdr + blen == len);
    let start = block.map_or(0, |(_, hdr, _)| hdr);
    let mut body = Vec::with_capacity(len - start);
    body.extend_from_slice(&head[start..]);
    (&mut *rd)
        .take((len - head.len()) as u64)
        .read_to_end(&mut body)
        .await
        .map_err(io)?;
    if body.len() != len - start {
        return Err("connection closed inside a reply".into());
    }
    if let Some((id, _, _)) = block {
        return Ok(Some((id, Ok(Response::Block(Some(body))))));
    }
    // A frame that does not decode has no id to blame: the connection is done.
    let f: ResponseFrame =
        wire::decode(&body).map_err(|e| format!("peer broke the protocol: {e}"))?;
    Ok(Some((f.id, f.resp.map_err(CallError::Remote))))
}

/// Close the connections idle past `IDLE` among `conns` (dropping the closed ones);
/// what remains open.
pub fn sweep(conns: &mut Vec<Arc<Conn>>) {
    conns.retain(|c| !c.close_if_idle());
}
