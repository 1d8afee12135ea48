//! The TCP server side of a node, with resources bounded per scope (after libp2p's
//! resource manager: the system, each source bucket, each connection):
//! - connection slots: a total and a share per source bucket (/24, /48; one address on
//!   loopback) and per network (/16, /32: eight buckets' share; `sources.rs`, as for
//!   request slots and unread replies). A new connection is always admitted; when its bucket or the node is
//!   full, the least recently active connection of the busiest bucket (its own bucket if
//!   that one is at its share) is closed. Idle floods are churned out instead of locking
//!   honest clients out, and the total stays under the process's file-descriptor limit.
//! - requests: a source bucket has a few request slots (8); a frame is read only once it
//!   holds one, and the slot is held until the reply exists; its replies, from the
//!   reservation of a block-sized one to the last byte written, count against its
//!   allowance (as many largest replies as slots). So one source's frames and replies in
//!   flight are bounded whatever its connections, and a reply its peer reads slowly
//!   never holds up the source's other requests.
//! - memory: a frame's buffer grows only once its bytes arrive, under one budget for all
//!   frames and replies in flight; the first 4 KiB of each are free, so small requests
//!   never wait for it. A request that may answer with blocks reserves a largest reply
//!   before it is handled, and keeps its reply's size until the reply is written: a
//!   reply the peer does not read holds the budget, never memory outside it. A frame must
//!   arrive, and a reply be taken, at a minimum rate (after a short grace), so silence
//!   and unread replies free their connection.

mod budget;
mod sources;

use budget::{charged_kib, Budget, Held};
use cfs_core::wire::{
    self, RemoteError, Request, RequestFrame, Response, ResponseFrame, PROTOCOL_VERSION,
};
use cfs_net::transport::{read_body, read_prefix, Handler};
use sources::{Permits, Registry, Source};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Limits of the server; every one is a `cfsd` flag.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections at once, in all (clamped under the file-descriptor limit).
    pub max_conns: usize,
    /// Connections at once from one source bucket.
    pub max_conns_per_bucket: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// Bytes of request frames being received or handled at once, in all.
    pub max_inflight_bytes: usize,
    /// Requests being handled at once for one source bucket (more wait their turn).
    pub max_requests_per_bucket: usize,
    /// A frame body must arrive within `frame_grace` plus its length at this rate, and a
    /// reply be taken by the peer within `reply_grace` plus its length at this rate; else
    /// the connection is closed (and the reply dropped).
    pub min_body_rate: usize,
    pub frame_grace: Duration,
    pub reply_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_conns: 2048,
            max_conns_per_bucket: 256,
            idle_timeout: Duration::from_secs(60),
            max_inflight_bytes: 64 << 20,
            max_requests_per_bucket: 8,
            min_body_rate: 64 << 10,
            frame_grace: Duration::from_secs(5),
            reply_grace: Duration::from_secs(2),
        }
    }
}

/// How long a frame waits for room in the in-flight budget before its connection closes,
/// and a request for room for its reply before it is answered Busy.
const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// How long a reply larger than its request reserved waits for the rest of its room
/// (the reply exists by then, so not long) before it is dropped for a Busy answer.
const REPLY_WAIT: Duration = Duration::from_millis(250);

/// File descriptors kept free for the store, outgoing calls and logs.
pub const FD_RESERVE: usize = 256;

impl ServerLimits {
    /// The limits with `max_conns` lowered to fit under `nofile` descriptors.
    pub fn fit_fds(mut self, nofile: u64) -> ServerLimits {
        let room = (nofile as usize).saturating_sub(FD_RESERVE).max(16);
        self.max_conns = self.max_conns.min(room);
        self.max_conns_per_bucket = self.max_conns_per_bucket.min(self.max_conns);
        self
    }
}

/// Connections the kernel may queue before we accept them: deep, so a burst of
/// connections (a flood, or a ring restarting) does not make honest SYNs wait for a
/// retransmission (1 s, then 3 s) while the accept loop catches up.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket with a deep accept queue.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(LISTEN_BACKLOG)
}

/// Raise the soft open-file limit to the hard one; returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            if l.rlim_cur < l.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: l.rlim_max,
                    rlim_max: l.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    return want.rlim_cur as u64;
                }
            }
            return l.rlim_cur as u64;
        }
    }
    1024
}

/// How long a stopping server waits for requests being handled to be answered.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Resolves once `stop` says true; never if its sender is dropped without saying so.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accept connections, each served on its own task, until `stop` turns true. A bad frame
/// closes only that connection. Once stopping, no connection is accepted, an idle one
/// closes, and a request being handled is answered first; after `DRAIN` the rest are cut.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    let registry: Arc<Mutex<Registry>> = Arc::default();
    let budget = Arc::new(Budget::new(limits.max_inflight_bytes));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = Source::of(peer.ip());
        let (id, close, evicted) = registry.lock().unwrap().admit(source.clone(), &limits);
        if evicted {
            handler.evicted_connection();
        }
        let _ = stream.set_nodelay(true);
        let (handler, registry, budget) = (handler.clone(), registry.clone(), budget.clone());
        let stop = stop.clone();
        conns.spawn(async move {
            let conn = ConnCtx {
                id,
                peer,
                source,
                limits,
                registry: &registry,
                budget: &budget,
                stop,
            };
            tokio::select! {
                biased;
                _ = close.notified() => {}
                _ = conn.serve(stream, &*handler) => {}
            }
            registry.lock().unwrap().remove(id);
        });
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "stopping: requests still unanswered after {DRAIN:?} are cut"
        );
    }
}

/// What a request that may answer with blocks reserves before it is handled: a largest
/// reply. It holds the reservation for as long as the handler runs (a store read), then
/// keeps only its reply's size.
const REPLY_RESERVE: usize = wire::MAX_FRAME_BYTES;

/// Whether `req`'s answer may carry blocks (up to a frame), rather than a few bytes per
/// item of the request.
fn may_answer_blocks(req: &Request) -> bool {
    matches!(
        req,
        Request::Get { .. } | Request::GetMany { .. } | Request::FindStep { want: Some(_), .. }
    )
}

/// The answer given instead of a reply there is no room for.
fn busy() -> RemoteError {
    RemoteError::new(
        wire::ErrorKind::Busy,
        "this node's in-flight memory is full; ask another replica or retry shortly",
    )
}

struct ConnCtx<'a> {
    id: u64,
    peer: SocketAddr,
    source: Source,
    limits: ServerLimits,
    registry: &'a Mutex<Registry>,
    budget: &'a Budget,
    stop: watch::Receiver<bool>,
}

/// A request read off a connection, with the request slot and budget it holds until its
/// reply is written.
struct Incoming<'a> {
    id: u64,
    /// Err: the protocol version the peer spoke instead of ours.
    frame: Result<RequestFrame, u16>,
    held: Held<'a>,
    slot: Option<Permits>,
}

/// Requests of one connection handled at once (protocol 6 lets a client send many before
/// reading replies); more wait in the kernel's buffers.
const PIPELINE: usize = 16;

impl<'a> ConnCtx<'a> {
    /// Read requests and answer them, several at once; each reply is written whole as it
    /// is ready, so replies may come in another order than their requests.
    async fn serve<H: Handler>(&self, stream: TcpStream, handler: &H) {
        let (mut rd, wr) = stream.into_split();
        let wr = tokio::sync::Mutex::new(wr);
        let (tx, rx) = mpsc::channel(1);
        let reading = self.read_requests(&mut rd, tx, handler);
        let answering = self.answer_requests(rx, &wr, handler);
        tokio::pin!(reading, answering);
        tokio::select! {
            // A reply could not be written: the connection is done.
            _ = &mut answering => {}
            // No more requests: answer those read.
            _ = &mut reading => answering.await,
        }
    }

    async fn read_requests<H: Handler>(
        &self,
        rd: &mut OwnedReadHalf,
        tx: mpsc::Sender<Incoming<'a>>,
        handler: &H,
    ) {
        let (peer, limits) = (self.peer, self.limits);
        let mut stop = self.stop.clone();
        loop {
            // Between requests a stopping server closes the connection; a request that
            // has begun to arrive is read, handled and answered first.
            let next = tokio::select! {
                biased;
                _ = stopping(&mut stop) => return,
                n = tokio::time::timeout(limits.idle_timeout, read_prefix(rd)) => n,
            };
            let len = match next {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    handler.refused_input(peer, &e.to_string());
                    return;
                }
                Ok(Ok(Some(len))) => len,
            };
            self.registry.lock().unwrap().touch(self.id);
            // One of the source bucket's request slots from here until the reply exists:
            // a source gets no more of the node than its share of requests, however many
            // connections it opens or requests it sends at once, and frames waiting for
            // a slot stay in the kernel's buffers, not in ours.
            let slots = self.registry.lock().unwrap().slots(&self.source);
            let slot = match &slots {
                Some(s) => s.acquire(1).await,
                None => None,
            };
            // Memory is taken from the shared budget as the body arrives, in KiB, and
            // then for the reply, until the reply is written.
            let held = Held::new(self.budget);
            let deadline = limits.frame_grace
                + Duration::from_secs_f64(len as f64 / limits.min_body_rate.max(1) as f64);
            let mut capacity = 0usize;
            let held_ref = &held;
            let read = read_body(rd, len, |add| {
                // Charged: the growth beyond the frame's free allowance, in KiB.
                let before = charged_kib(capacity);
                capacity += add;
                let kib = charged_kib(capacity) - before;
                async move { held_ref.take(kib, BUDGET_WAIT).await }
            });
            let body = match tokio::time::timeout(deadline, read).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    handler.refused_input(peer, &e.to_string());
                    return;
                }
                Err(_) => {
                    handler.slow_peer(peer, "frame body arrived too slowly");
                    abort(rd.as_ref());
                    return;
                }
            };
            // The version and id come first in every frame, so a peer of another
            // version gets a clear answer even when the rest of its frame does not
            // decode here.
            let (id, frame) = match postcard::take_from_bytes::<(u16, u64)>(&body) {
                Ok(((protocol, id), _)) if protocol != PROTOCOL_VERSION => (id, Err(protocol)),
                _ => match wire::decode::<RequestFrame>(&body) {
                    Ok(f) => (f.id, Ok(f)),
                    Err(e) => {
                        handler.refused_input(peer, &e.to_string());
                        return;
                    }
                },
            };
            drop(body);
            let incoming = Incoming {
                id,
                frame,
                held,
                slot,
            };
            if tx.send(incoming).await.is_err() {
                return;
            }
        }
    }

    /// Answer what `read_requests` reads, up to `PIPELINE` at once, until it stops
    /// (then the rest are answered) or a reply cannot be written (then none are).
    async fn answer_requests<H: Handler>(
        &self,
        mut rx: mpsc::Receiver<Incoming<'a>>,
        wr: &tokio::sync::Mutex<OwnedWriteHalf>,
        handler: &H,
    ) {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut answering = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                next = rx.recv(), if open && answering.len() < PIPELINE => match next {
                    Some(i) => answering.push(self.answer(i, wr, handler)),
                    None => open = false,
                },
                Some(written) = answering.next(), if !answering.is_empty() => {
                    if !written {
                        return;
                    }
                }
                else => return,
            }
            if !open && answering.is_empty() {
                return;
            }
        }
    }

    /// Handle one request and write its reply; false if the connection must close.
    async fn answer<H: Handler>(
        &self,
        incoming: Incoming<'a>,
        wr: &tokio::sync::Mutex<OwnedWriteHalf>,
        handler: &H,
    ) -> bool {
        let (peer, limits) = (self.peer, self.limits);
        let Incoming {
            id,
            frame,
            held,
            slot,
        } = incoming;
        // A request that may answer with blocks reserves a largest reply first, so its
        // reply is never built outside the budget. Both come out of the source bucket's
        // allowance for replies (the same one its unread replies use) and out of the
        // node's budget; the allowance is waited for a moment, as replies ahead of it on
        // the connection are written.
        let unread = self.registry.lock().unwrap().unread(&self.source);
        let mut allowance: Option<Permits> = None;
        let reserved = if frame.as_ref().is_ok_and(|f| may_answer_blocks(&f.req)) {
            let kib = charged_kib(REPLY_RESERVE) as u32;
            if let Some(u) = unread.clone() {
                allowance = match u.try_acquire(kib) {
                    Some(p) => Some(p),
                    None => tokio::time::timeout(REPLY_WAIT, u.acquire(kib))
                        .await
                        .ok()
                        .flatten(),
                };
            }
            allowance.is_some() && held.hold(kib as usize, BUDGET_WAIT).await
        } else {
            true
        };
        let resp = match frame {
            _ if !reserved => {
                handler.dropped_reply(peer, "no room in the in-flight budget for a reply");
                Err(busy())
            }
            Err(protocol) => {
                handler.refused_input(peer, "protocol version");
                Err(RemoteError::new(
                    wire::ErrorKind::BadRequest,
                    format!(
                        "protocol {protocol} not supported; this node speaks {PROTOCOL_VERSION}: run the same cfs release on every node and client"
                    ),
                ))
            }
            Ok(f) => handler.handle(peer, f.from, f.req).await,
        };
        // A block is written after its header, not copied into a frame first.
        let (out, mut block) = match resp {
            Ok(Response::Block(Some(b))) => (wire::block_response_prefix(id, b.len()), Some(b)),
            resp => (wire::encode_frame(&ResponseFrame { id, resp }), None),
        };
        let mut out = match out {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "response does not fit a frame");
                return false;
            }
        };
        // The reply keeps its size in the budget until it is written, and in its
        // bucket's allowance; its request slot is free once the reply exists, so a peer
        // that reads slowly (or sits behind a partition) holds its own connection and
        // its network's share of memory, not its network's turn.
        drop(slot);
        let kib = charged_kib(out.len() + block.as_ref().map_or(0, Vec::len));
        let have = allowance.as_ref().map_or(0, |a| a.num_permits());
        if kib < have {
            // Give back what the reservation held beyond the reply.
            drop(allowance.as_mut().and_then(|a| a.split(have - kib)));
        } else if kib > have {
            let more = unread
                .clone()
                .and_then(|u| u.try_acquire((kib - have) as u32));
            match (allowance.as_mut(), more) {
                (Some(a), Some(m)) => a.merge(m),
                (None, m) => allowance = m,
                (Some(_), None) => allowance = None,
            }
        }
        let room = kib == 0 || allowance.as_ref().is_some_and(|a| a.num_permits() == kib);
        if !room || !held.hold(kib, REPLY_WAIT).await {
            handler.dropped_reply(peer, "no room in the in-flight budget for a reply");
            let resp = Err(busy());
            let Ok(o) = wire::encode_frame(&ResponseFrame { id, resp }) else {
                return false;
            };
            (out, block) = (o, None);
            allowance = None;
            held.hold(0, REPLY_WAIT).await;
        }
        let size = out.len() + block.as_ref().map_or(0, Vec::len);
        let mut stream = wr.lock().await;
        let write = async {
            stream.write_all(&out).await?;
            match &block {
                Some(b) => stream.write_all(b).await,
                None => Ok(()),
            }
        };
        // Taken at a minimum rate, or the connection closes and the reply is dropped.
        let deadline = limits.reply_grace
            + Duration::from_secs_f64(size as f64 / limits.min_body_rate.max(1) as f64);
        match tokio::time::timeout(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return false,
            Err(_) => {
                handler.slow_peer(peer, "reply not read at the minimum rate");
                abort(stream.as_ref());
                return false;
            }
        }
        drop(stream);
        drop(held);
        drop(allowance);
        self.registry.lock().unwrap().touch(self.id);
        true
    }
}

/// Close a slow peer's connection with a reset: what its socket still holds unsent (up
/// to megabytes of replies it never read) is dropped at once, instead of waiting in the
/// kernel behind a window the peer never opens, and the peer sees the end at once.
fn abort(stream: &tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// Answers `Get` of key k after k * 20 ms with a 20 KiB block naming k; counts the
    /// connections it saw.
    struct Slow {
        peers: Mutex<std::collections::HashSet<SocketAddr>>,
    }

    impl Handler for Slow {
        async fn handle(
            &self,
            peer: SocketAddr,
            _from: Option<SocketAddr>,
            req: Request,
        ) -> Result<Response, RemoteError> {
            self.peers.lock().unwrap().insert(peer);
            let Request::Get { key, .. } = req else {
                return Ok(Response::Pong { vnodes: 1 });
            };
            let k = key.0[19];
            tokio::time::sleep(Duration::from_millis(20 * u64::from(k))).await;
            Ok(Response::Block(Some(vec![k; 20 << 10])))
        }
        fn refused_input(&self, _: SocketAddr, _: &str) {}
    }

    #[tokio::test]
    async fn one_connection_carries_many_requests_and_replies_come_as_ready() {
        use cfs_net::transport::{TcpTransport, Transport};
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(Slow {
            peers: Mutex::default(),
        });
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            handler.clone(),
            ServerLimits::default(),
            stop,
        ));
        let t = TcpTransport::new(None);
        // Eight at once, the slowest asked first: each gets its own reply, and the fast
        // ones do not wait behind the slow.
        let t0 = Instant::now();
        let calls = (1..=8u8).rev().map(|k| {
            let t = t.clone();
            async move {
                let mut id = [0u8; 20];
                id[19] = k;
                let key = cfs_core::Id(id);
                let r = t
                    .call(
                        addr,
                        Request::Get {
                            kind: cfs_core::BlockKind::Data,
                            key,
                        },
                        Duration::from_secs(5),
                    )
                    .await;
                (k, r, t0.elapsed())
            }
        });
        for (k, r, took) in futures_util::future::join_all(calls).await {
            match r {
                Ok(Response::Block(Some(b))) => {
                    assert!(b.len() == 20 << 10 && b.iter().all(|&x| x == k))
                }
                other => panic!("key {k}: {other:?}"),
            }
            // Served one after another, key 1 would wait for all eight (720 ms).
            assert!(
                took < Duration::from_millis(20 * u64::from(k) + 300),
                "key {k} took {took:?}"
            );
        }
        assert!(
            handler.peers.lock().unwrap().len() <= 2,
            "at most two connections to a peer"
        );
    }
}
