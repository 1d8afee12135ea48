//! Hostile peers for attack and failure-injection tests: a raw wire client (`RawPeer`), a
//! scriptable fake ring member (`FakeNode`), and probes of a node process (RSS, fds,
//! counters, what it holds). Everything speaks the real wire codec (`encode_frame`,
//! `decode`), talks only to 127.0.0.0/8, and is torn down on drop.
//!
//! Wire-dependent code is kept in a few small functions (`forged_done`, `closer_step`,
//! `step_nodes`) so a protocol change is a one-line fix there.

use cfs_core::wire::{
    decode, encode_frame, frame_len, ErrorKind, RemoteError, Request, RequestFrame, Response,
    ResponseFrame, StatusInfo, Step, PROTOCOL_VERSION,
};
use cfs_core::{BlockKind, Id, NodeRef};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Fast ring maintenance for attack tests.
pub const FAST_FLAGS: &[&str] = &["--stabilize-ms", "200", "--maintain-ms", "300"];

/// Defence limits set low enough that a test's flood reaches them quickly.
pub const DEFENCE_FLAGS: &[&str] = &["--max-conns", "512", "--max-conns-per-prefix", "128"];

/// FAST_FLAGS + DEFENCE_FLAGS + `extra`, for `Cluster::start`.
pub fn node_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&'a str> = FAST_FLAGS.to_vec();
    v.extend_from_slice(DEFENCE_FLAGS);
    v.extend_from_slice(extra);
    v
}

/// 127.0.0.x
pub fn lo(x: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, x))
}

// ---------------------------------------------------------------------------------------
// Wire-dependent helpers: the only places that build or read `Step` variants.
// ---------------------------------------------------------------------------------------

/// A forged "I know the successors of `key`" answer from `claimant`, whose range starts
/// at the claimant itself: with `succs[0]` = claimant that is the whole ring, so it
/// covers any key. (Protocol 1 let a range start at a bare id such as `key - 1`; now it
/// must start at an address-bound node.)
pub fn forged_done(_key: Id, claimant: NodeRef, succs: Vec<NodeRef>) -> Step {
    Step::Done {
        from: claimant,
        succs,
    }
}

/// A `Closer` answer.
pub fn closer_step(nodes: Vec<NodeRef>, n_est: u32) -> Step {
    Step::Closer { nodes, n_est }
}

/// The node references a step names (successors or closer nodes).
pub fn step_nodes(step: &Step) -> Vec<NodeRef> {
    match step {
        Step::Done { succs, .. } => succs.clone(),
        Step::Closer { nodes, .. } => nodes.clone(),
        Step::Found(_) => Vec::new(),
    }
}

/// key - 1 on the ring.
pub fn id_minus_one(key: Id) -> Id {
    let mut b = key.0;
    for x in b.iter_mut().rev() {
        let (v, borrow) = x.overflowing_sub(1);
        *x = v;
        if !borrow {
            break;
        }
    }
    Id(b)
}

fn request_frame(id: u64, from: Option<SocketAddr>, req: Request) -> Vec<u8> {
    encode_frame(&RequestFrame {
        protocol: PROTOCOL_VERSION,
        id,
        from,
        req,
    })
    .expect("request fits a frame")
}

fn bad_data(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

async fn read_body<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = frame_len(prefix).map_err(|e| bad_data(e.to_string()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

// ---------------------------------------------------------------------------------------
// RawPeer
// ---------------------------------------------------------------------------------------

/// A TCP client speaking raw frames: what a hostile (or just buggy) peer can send.
pub struct RawPeer {
    pub stream: TcpStream,
    /// The listen address claimed in every frame (`RequestFrame::from`).
    pub from: Option<SocketAddr>,
    next_id: u64,
}

/// How long a RawPeer waits for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<RawPeer> {
        RawPeer::connect_with(None, addr, None).await
    }

    /// Connect from source address `src` (any 127.0.0.0/8 address works on Linux).
    pub async fn connect_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<RawPeer> {
        RawPeer::connect_with(Some(src), addr, None).await
    }

    /// Connect from `src`, with a receive buffer of `recv_buf` bytes (small: the peer's
    /// answers back up in the node instead of in our kernel buffers).
    pub async fn connect_with(
        src: Option<IpAddr>,
        addr: SocketAddr,
        recv_buf: Option<u32>,
    ) -> std::io::Result<RawPeer> {
        let sock = TcpSocket::new_v4()?;
        if let Some(ip) = src {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(b) = recv_buf {
            sock.set_recv_buffer_size(b)?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
        let _ = stream.set_nodelay(true);
        Ok(RawPeer {
            stream,
            from: None,
            next_id: 1,
        })
    }

    /// Send one request without waiting for its answer; its frame id.
    pub async fn send(&mut self, req: Request) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let f = request_frame(id, self.from, req);
        self.stream.write_all(&f).await?;
        Ok(id)
    }

    /// Arbitrary bytes: truncated, oversized or garbage frames.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Read one response frame.
    pub async fn recv(&mut self) -> std::io::Result<ResponseFrame> {
        let body = read_body(&mut self.stream).await?;
        decode(&body).map_err(|e| bad_data(e.to_string()))
    }

    /// One request and its answer (io errors outside, the node's answer inside).
    pub async fn call(&mut self, req: Request) -> std::io::Result<Result<Response, RemoteError>> {
        let id = self.send(req).await?;
        let r = self.recv().await?;
        if r.id != id {
            return Err(bad_data(format!("answer for frame {} not {id}", r.id)));
        }
        Ok(r.resp)
    }

    /// `call` bounded by `t`.
    pub async fn call_within(
        &mut self,
        t: Duration,
        req: Request,
    ) -> std::io::Result<Result<Response, RemoteError>> {
        tokio::time::timeout(t, self.call(req))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "call")))
    }

    /// Pipeline `reqs` on this connection (writing and reading at once) and return the
    /// answers in order.
    pub async fn pipeline(
        &mut self,
        reqs: Vec<Request>,
    ) -> std::io::Result<Vec<Result<Response, RemoteError>>> {
        let n = reqs.len();
        let first = self.next_id;
        self.next_id += n as u64;
        let from = self.from;
        let (mut rd, mut wr) = self.stream.split();
        let write = async move {
            let mut buf = Vec::new();
            for (i, req) in reqs.into_iter().enumerate() {
                buf.extend(request_frame(first + i as u64, from, req));
                if buf.len() > 64 << 10 {
                    wr.write_all(&buf).await?;
                    buf.clear();
                }
            }
            wr.write_all(&buf).await
        };
        let read = async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let body = read_body(&mut rd).await?;
                let f: ResponseFrame = decode(&body).map_err(|e| bad_data(e.to_string()))?;
                out.push(f.resp);
            }
            Ok::<_, std::io::Error>(out)
        };
        let (w, r) = tokio::join!(write, read);
        w?;
        r
    }

    /// Has the node closed this connection (EOF or reset), without blocking?
    pub fn closed_by_peer(&self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.try_read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }
}

/// One blocking request/answer on a fresh std connection (no runtime needed), bounded by
/// `t`. For probes from synchronous test code.
pub fn call_once(
    addr: SocketAddr,
    req: Request,
    t: Duration,
) -> std::io::Result<Result<Response, RemoteError>> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, t)?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    s.write_all(&request_frame(1, None, req))?;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)?;
    let len = frame_len(prefix).map_err(|e| bad_data(e.to_string()))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let f: ResponseFrame = decode(&body).map_err(|e| bad_data(e.to_string()))?;
    Ok(f.resp)
}

// ---------------------------------------------------------------------------------------
// FakeNode
// ---------------------------------------------------------------------------------------

/// What a fake node answers: None = no answer (the request hangs).
pub type FakeHandler =
    dyn Fn(SocketAddr, Request) -> Option<Result<Response, RemoteError>> + Send + Sync;

/// What a fake node received.
#[derive(Default)]
pub struct FakeLog {
    pub conns: AtomicU64,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl FakeLog {
    pub fn count(&self, name: &str) -> u64 {
        self.counts.lock().unwrap().get(name).copied().unwrap_or(0)
    }
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().unwrap().clone()
    }
}

/// A scripted peer on one or more loopback listeners, served on its own runtime (so it keeps
/// answering while the test blocks on a `cfs` command). Dropping it stops every task and
/// closes every listener and connection.
pub struct FakeNode {
    /// The first listener's address; the fake's ring identity is `NodeRef::new(addr, 0)`.
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    pub log: Arc<FakeLog>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FakeNode {
    /// Listen on `addr` (port 0: any free port) and answer with `handler`.
    pub fn start(
        addr: SocketAddr,
        handler: impl Fn(SocketAddr, Request) -> Option<Result<Response, RemoteError>>
            + Send
            + Sync
            + 'static,
    ) -> std::io::Result<FakeNode> {
        FakeNode::start_on(vec![std::net::TcpListener::bind(addr)?], handler)
    }

    /// Serve every listener in `listeners` with one handler.
    pub fn start_on(
        listeners: Vec<std::net::TcpListener>,
        handler: impl Fn(SocketAddr, Request) -> Option<Result<Response, RemoteError>>
            + Send
            + Sync
            + 'static,
    ) -> std::io::Result<FakeNode> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let handler: Arc<FakeHandler> = Arc::new(handler);
        let log = Arc::new(FakeLog::default());
        let mut addrs = Vec::new();
        {
            let _g = rt.enter();
            for l in listeners {
                l.set_nonblocking(true)?;
                addrs.push(l.local_addr()?);
                let l = TcpListener::from_std(l)?;
                let (h, log) = (handler.clone(), log.clone());
                rt.spawn(async move {
                    loop {
                        let Ok((s, peer)) = l.accept().await else {
                            continue;
                        };
                        log.conns.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(fake_conn(s, peer, h.clone(), log.clone()));
                    }
                });
            }
        }
        Ok(FakeNode {
            addr: addrs[0],
            addrs,
            log,
            rt: Some(rt),
        })
    }

    /// The fake's one legitimate ring identity.
    pub fn me(&self) -> NodeRef {
        NodeRef::new(self.addr, 0)
    }

    /// Run `fut` on the fake's runtime until the fake is dropped (its own chatter).
    pub fn spawn<F: Future<Output = ()> + Send + 'static>(&self, fut: F) {
        self.rt.as_ref().unwrap().spawn(fut);
    }
}

async fn fake_conn(mut s: TcpStream, peer: SocketAddr, h: Arc<FakeHandler>, log: Arc<FakeLog>) {
    let _ = s.set_nodelay(true);
    loop {
        let Ok(body) = read_body(&mut s).await else {
            return;
        };
        let Ok(frame) = decode::<RequestFrame>(&body) else {
            return;
        };
        *log.counts
            .lock()
            .unwrap()
            .entry(frame.req.name())
            .or_default() += 1;
        let Some(resp) = h(peer, frame.req) else {
            continue;
        };
        let Ok(out) = encode_frame(&ResponseFrame { id: frame.id, resp }) else {
            return;
        };
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

/// An error answer, for handlers.
pub fn refuse(msg: &str) -> Option<Result<Response, RemoteError>> {
    Some(Err(RemoteError::new(ErrorKind::BadRequest, msg)))
}

// ---------------------------------------------------------------------------------------
// Probes of a node process
// ---------------------------------------------------------------------------------------

/// Resident set size of a process, from /proc.
pub fn node_rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Open file descriptors of a process, from /proc.
pub fn node_open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Soft RLIMIT_NOFILE of a process, from /proc/PID/limits.
pub fn nofile_limit(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit.
pub fn raise_nofile() -> u64 {
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur as u64
    }
}

/// `cfs status --json` of a node, if it answers.
pub fn status_json(addr: SocketAddr) -> Option<serde_json::Value> {
    let (_, out) = cfs_within(
        &["status", "--json", "--node", &addr.to_string()],
        Duration::from_secs(15),
    );
    let out = out?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A counter of `cfs status --json` by name; a missing counter (or no answer) is 0.
pub fn counter(addr: SocketAddr, name: &str) -> u64 {
    status_json(addr).map_or(0, |s| counter_in(&s, name))
}

/// A counter in a parsed status; missing = 0.
pub fn counter_in(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// Does the node at `addr` hold `key` in its permanent store (direct `Has`)?
pub fn held(addr: SocketAddr, kind: BlockKind, key: Id) -> bool {
    matches!(
        call_once(addr, Request::Has { items: vec![(kind, key)] }, Duration::from_secs(5)),
        Ok(Ok(Response::Have(v))) if v.first().is_some_and(|x| x.is_some())
    )
}

/// Seconds the node at `addr` has `key` leased for (direct `Has`); None if it does not
/// hold it (or it expired).
pub fn lease_left(addr: SocketAddr, kind: BlockKind, key: Id) -> Option<u64> {
    match call_once(
        addr,
        Request::Has {
            items: vec![(kind, key)],
        },
        Duration::from_secs(5),
    ) {
        Ok(Ok(Response::Have(v))) => v.first().copied().flatten().map(|h| h.lease),
        _ => None,
    }
}

/// The r replicas of `key` from a membership list: its successors in id order, one per
/// process.
pub fn true_replicas(members: &[NodeRef], key: Id, r: usize) -> Vec<NodeRef> {
    let mut ring = members.to_vec();
    ring.sort_by_key(|n| n.id);
    ring.dedup();
    if ring.is_empty() {
        return Vec::new();
    }
    let first = ring.iter().position(|n| n.id >= key).unwrap_or(0);
    let succs: Vec<NodeRef> = (0..ring.len())
        .map(|i| ring[(first + i) % ring.len()])
        .collect();
    cfs_net::net::replica_set(&succs, r)
}

/// The member whose id follows `id` (its successor), and the one before (its predecessor).
pub fn ring_neighbours(members: &[NodeRef], id: Id) -> (NodeRef, NodeRef) {
    let mut ring: Vec<NodeRef> = members.iter().filter(|n| n.id != id).copied().collect();
    ring.sort_by_key(|n| n.id);
    let i = ring.iter().position(|n| n.id > id).unwrap_or(0);
    (ring[i], ring[(i + ring.len() - 1) % ring.len()])
}

/// Up to `n` free ports on `ip` whose node id (vnode 0) lies in the open interval (a, b),
/// sorted clockwise from a. Each is bind-tested free at the time of the search.
pub fn find_ports_with_id_in(ip: IpAddr, a: Id, b: Id, n: usize) -> Vec<u16> {
    let mut out: Vec<(Id, u16)> = Vec::new();
    let start = 20000 + (std::process::id() % 20000) as u16;
    for i in 0..40000u16 {
        if out.len() >= n {
            break;
        }
        let port = 20000 + (start - 20000 + i) % 40000;
        let addr = SocketAddr::new(ip, port);
        let id = NodeRef::new(addr, 0).id;
        if id.in_open(a, b) && std::net::TcpListener::bind(addr).is_ok() {
            out.push((id, port));
        }
    }
    out.sort_by(|x, y| a.distance_frac(x.0).total_cmp(&a.distance_frac(y.0)));
    out.into_iter().map(|(_, p)| p).collect()
}

// ---------------------------------------------------------------------------------------
// Bounded commands
// ---------------------------------------------------------------------------------------

/// Run `cfs ARGS`, killed after `limit`: (elapsed, output if it finished).
pub fn cfs_within(args: &[&str], limit: Duration) -> (Duration, Option<Output>) {
    let t0 = Instant::now();
    let mut child = Command::new(crate::bin("cfs"))
        .args(args)
        .env("CFS_STATE_DIR", crate::state_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running cfs");
    // Drain the pipes in threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let mut pause = Duration::from_millis(2);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    };
    let elapsed = t0.elapsed();
    let stdout = to.join().unwrap_or_default();
    let stderr = te.join().unwrap_or_default();
    (
        elapsed,
        status.map(|status| Output {
            status,
            stdout,
            stderr,
        }),
    )
}

/// The best of `tries` timed successful runs of `cfs ARGS` (each killed after `limit`);
/// None if none succeeded. Also returns the last failure's stderr.
/// Run `cfs ARGS` `tries` times: the worst time of the runs that succeeded (None if any
/// failed), every time, and the last error.
pub fn cfs_times(
    args: &[&str],
    tries: usize,
    limit: Duration,
) -> (Option<Duration>, Vec<Duration>, String) {
    let mut worst: Option<Duration> = Some(Duration::ZERO);
    let mut all = Vec::new();
    let mut err = String::new();
    for _ in 0..tries {
        let (t, out) = cfs_within(args, limit);
        all.push(t);
        match out {
            Some(o) if o.status.success() => worst = worst.map(|w| w.max(t)),
            Some(o) => {
                worst = None;
                err = format!(
                    "failed after {t:?}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            None => {
                worst = None;
                err = format!("killed after {t:?}")
            }
        }
    }
    (worst, all, err)
}

/// A valid content block of `len` bytes, distinct per (`tag`, `i`): (key, bytes).
pub fn data_block(tag: u64, i: u64, len: usize) -> (Id, Vec<u8>) {
    let mut x = tag
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&tag.to_be_bytes()[..len.min(8)]);
    b.extend_from_slice(&i.to_be_bytes()[..len.saturating_sub(8).min(8)]);
    while b.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes()[..(len - b.len()).min(8)]);
    }
    (Id::hash(&b), b)
}

/// Replicas per block in the attack tests' rings.
pub const R: usize = 3;

/// The attacks measure latency and resources on a 2-core machine: one at a time in a test
/// binary, so one test's flood is not another's noise.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every live node of the cluster at vnode 0.
pub fn members(cluster: &crate::Cluster) -> Vec<NodeRef> {
    cluster
        .addrs()
        .iter()
        .map(|a| NodeRef::new(*a, 0))
        .collect()
}

/// Put a valid data block through the honest client; how many replicas stored it.
pub fn put_block(
    rt: &tokio::runtime::Runtime,
    c: &cfs_net::client::Client,
    bytes: Vec<u8>,
) -> (Id, usize) {
    rt.block_on(async {
        let v = cfs_core::block::verify(cfs_core::BlockKind::Data, Id::hash(&bytes), bytes, true)
            .unwrap();
        (v.key(), c.put(&v).await.unwrap().stored_on)
    })
}

/// A node's status, asked directly (None if it does not answer one).
pub fn status_of(addr: SocketAddr) -> Option<StatusInfo> {
    match call_once(addr, Request::Status, Duration::from_secs(5)) {
        Ok(Ok(Response::Status(s))) => Some(*s),
        _ => None,
    }
}
