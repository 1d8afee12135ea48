//! Published trees over HTTP/1.1 and HTTP/2, for readers without FUSE: `cfs gateway`,
//! and `cfsd --gateway` in the node's own process.
//!
//! `/FSID/path` follows the newest version (its root is fetched again after `poll`), and
//! `/FSID@V/path` is one version, immutable. Files stream from verified blocks through
//! the same reader and read-ahead as the mount (`files.rs`); directories answer with
//! their `index.html` when they have one, else a listing (`index.rs`). Symlinks are
//! followed by the reader's rules: relative only, never above the tree's top.
//!
//! Limits (`limits.rs`): connections per client prefix (more are closed at once), a
//! request rate per prefix (paced, then 429 with Retry-After), a deadline until the
//! response headers (504), the reader's one
//! memory budget for blocks, and bodies that are read from the ring only as the client
//! takes them. The gateway remembers the highest version it has seen of each tree and
//! never serves an older root as the newest.

mod files;
mod index;
mod limits;
mod status;

pub use status::RingStatus;

use limits::{Admit, ClientAddr, Limited, Rates};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, Response, StatusCode, Uri};
use cfs_core::block::RootBlock;
use cfs_core::fs::EntryKind;
use cfs_core::Id;
use cfs_net::client::Client;
use cfs_tree::reader::{FsError, Reader, ReaderOpts};
use cfs_tree::service::net::NetRing;
use cfs_tree::service::{BlockService, RingError};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Options of a gateway.
#[derive(Clone, Debug)]
pub struct GatewayOpts {
    /// Serve only these trees (None: any).
    pub allow: Option<HashSet<Id>>,
    /// How long the newest root of a tree is used before it is fetched again.
    pub poll: Duration,
    pub reader: ReaderOpts,
    /// Connections at once per client prefix (/24, /48; one address on loopback).
    pub max_conns_per_prefix: usize,
    /// Connections at once in all.
    pub max_conns: usize,
    /// Requests per second per client prefix, sustained; twice as many in a burst, and
    /// a client above it is slowed down before it is refused (see `limits.rs`).
    pub rate_per_prefix: f64,
    /// Until the response's headers; a body then streams at the client's pace.
    pub request_timeout: Duration,
}

impl GatewayOpts {
    /// These options with `deadline` for every block (the reader) and, one second more,
    /// for a response's headers, so the ring's error naming the block is the one shown.
    pub fn with_deadline(mut self, deadline: Duration) -> GatewayOpts {
        self.reader.deadline = deadline;
        self.request_timeout = deadline + Duration::from_secs(1);
        self
    }
}

/// Serve the ring reached through `client` (entered at `node`), as `cfs gateway` and
/// `cfsd --gateway` do: trees, the ring's status page, and the newest root of each tree
/// remembered in `state_dir` (None: in memory only). Stops when `shutdown` completes.
pub async fn serve_ring(
    mut client: Client,
    node: SocketAddr,
    state_dir: Option<PathBuf>,
    listener: TcpListener,
    opts: GatewayOpts,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    client.net.timeouts.op = opts.reader.deadline;
    let status = RingStatus::new(client.clone(), node);
    let ring = Arc::new(NetRing::new(client, state_dir));
    serve(ring, listener, opts, Some(status), shutdown).await
}

impl Default for GatewayOpts {
    fn default() -> Self {
        GatewayOpts {
            allow: None,
            poll: Duration::from_secs(2),
            reader: ReaderOpts {
                forget_large_scans: true,
                ..ReaderOpts::default()
            },
            max_conns_per_prefix: 64,
            max_conns: 1024,
            rate_per_prefix: 500.0,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Pinned-version roots kept.
const MAX_PINNED: usize = 1024;

struct Gateway<R> {
    reader: Reader<R>,
    opts: GatewayOpts,
    /// The newest root of each tree and when it was fetched; its version is also the
    /// highest seen, below which no root is taken.
    newest: Mutex<HashMap<Id, (RootBlock, Instant)>>,
    rates: Rates,
    /// Roots of pinned versions: they never change, and each costs a walk of the chain.
    pinned: Mutex<lru::LruCache<(Id, u64), RootBlock>>,
    status: Option<RingStatus>,
}

/// Serve on `listener` until `shutdown` completes (then drain for at most `DRAIN`) or
/// the listener fails; `status` answers the ring's status page.
pub async fn serve<R: BlockService>(
    ring: Arc<R>,
    listener: TcpListener,
    opts: GatewayOpts,
    status: Option<RingStatus>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gw = Arc::new(Gateway {
        status,
        reader: Reader::new(ring, opts.reader.clone()),
        newest: Mutex::new(HashMap::new()),
        rates: Rates::new(opts.rate_per_prefix),
        pinned: Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(MAX_PINNED).expect("non-zero"),
        )),
        opts: opts.clone(),
    });
    let app = axum::Router::new().fallback(handle::<R>).with_state(gw);
    let listener = Limited::new(listener, opts.max_conns_per_prefix, opts.max_conns);
    // Once `shutdown` completes: no new connections, and those open get `DRAIN` to end
    // (a long download is then cut).
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let graceful = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping.send(());
    });
    tokio::select! {
        r = graceful => r,
        _ = async {
            match stopped.await {
                Ok(()) => tokio::time::sleep(DRAIN).await,
                Err(_) => std::future::pending().await,
            }
        } => Ok(()),
    }
}

/// How long open connections may go on once the gateway is told to stop.
pub const DRAIN: Duration = Duration::from_secs(5);

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(msg.into() + "\n"))
        .expect("valid response")
}

/// What a read error means to an HTTP client.
fn error_response(e: &FsError) -> Response<Body> {
    let status = match e {
        FsError::NotFound(_)
        | FsError::NotDir(_)
        | FsError::NoSuchFs(_)
        | FsError::NoVersion { .. }
        | FsError::Loop(_)
        | FsError::Outside(_) => StatusCode::NOT_FOUND,
        FsError::Timeout { .. } | FsError::Ring(RingError::Unavailable { .. }) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        FsError::Ring(_) | FsError::Corrupt { .. } => StatusCode::BAD_GATEWAY,
        FsError::IsDir(_) | FsError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, e.to_string())
}

impl<R: BlockService> Gateway<R> {
    /// The root to serve: version `v`, or the newest, fetched again after `poll` and
    /// never older than the highest version seen.
    async fn root(&self, fsid: Id, v: Option<u64>) -> Result<RootBlock, FsError> {
        if let Some(v) = v {
            if let Some(r) = self.pinned.lock().unwrap().get(&(fsid, v)) {
                return Ok(r.clone());
            }
            let r = self.reader.root(fsid, Some(v)).await?;
            self.pinned.lock().unwrap().put((fsid, v), r.clone());
            return Ok(r);
        }
        if let Some((r, at)) = self.newest.lock().unwrap().get(&fsid) {
            if at.elapsed() < self.opts.poll {
                return Ok(r.clone());
            }
        }
        let fetched = self.reader.root(fsid, None).await;
        let mut newest = self.newest.lock().unwrap();
        match (fetched, newest.get(&fsid)) {
            (Ok(r), Some((known, _))) if r.version < known.version => {
                tracing::warn!(
                    %fsid,
                    offered = r.version,
                    known = known.version,
                    "refused a root older than one already served"
                );
                let known = known.clone();
                newest.insert(fsid, (known.clone(), Instant::now()));
                Ok(known)
            }
            (Ok(r), _) => {
                newest.insert(fsid, (r.clone(), Instant::now()));
                Ok(r)
            }
            // The ring is away: keep serving the version already known, and do not ask
            // again before the next poll (each request would wait out the deadline).
            (Err(e), Some((known, _))) => {
                tracing::warn!(%fsid, "newest root not refreshed: {e}");
                let known = known.clone();
                newest.insert(fsid, (known.clone(), Instant::now()));
                Ok(known)
            }
            (Err(e), None) => Err(e),
        }
    }

    async fn respond(&self, method: Method, uri: Uri, headers: HeaderMap) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        }
        let raw = uri.path();
        let Some(path) = index::percent_decode(raw) else {
            return text(StatusCode::BAD_REQUEST, "malformed percent-encoding");
        };
        let rest = path.strip_prefix(b"/").unwrap_or(&path);
        if rest.is_empty() || rest == b"-/ring" || rest == b"-/metrics" {
            return self.status_page(rest, uri.query()).await;
        }
        let (head, tail) = match rest.iter().position(|&c| c == b'/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, &b""[..]),
        };
        let head = String::from_utf8_lossy(head);
        let (fsid, version) = match head.split_once('@') {
            Some((f, v)) => (f, v.parse::<u64>().ok()),
            None => (head.as_ref(), None),
        };
        let Ok(fsid) = fsid.parse::<Id>() else {
            return text(StatusCode::NOT_FOUND, format!("{head:?} is not an FSID"));
        };
        if head.contains('@') && version.is_none() {
            return text(StatusCode::NOT_FOUND, "the version after @ is not a number");
        }
        if self.opts.allow.as_ref().is_some_and(|a| !a.contains(&fsid)) {
            return text(StatusCode::NOT_FOUND, format!("{fsid} is not served here"));
        }
        if tail.is_empty() {
            // A directory's links are relative: it must be addressed with its slash.
            return redirect(&format!("{raw}/"));
        }
        let root = match self.root(fsid, version).await {
            Ok(r) => r,
            Err(e) => return error_response(&e),
        };
        let immutable = version.is_some();
        let cache = files::cache_control(immutable, self.opts.poll.as_secs().max(1));
        let (key, inode) = match self.reader.resolve(root.top, tail).await {
            Ok(x) => x,
            Err(e) => return error_response(&e),
        };
        let name = tail
            .rsplit(|&c| c == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"");
        if inode.kind() == EntryKind::File {
            return files::file_response(&self.reader, &method, &headers, name, key, inode, cache);
        }
        if !raw.ends_with('/') {
            return redirect(&format!("{raw}/"));
        }
        // A published site: the directory's index.html.
        if let Ok(Some(e)) = self.reader.lookup(&inode, b"index.html").await {
            if let Ok(i) = self.reader.inode(e.key).await {
                if i.kind() == EntryKind::File {
                    return files::file_response(
                        &self.reader,
                        &method,
                        &headers,
                        b"index.html",
                        e.key,
                        i,
                        cache,
                    );
                }
            }
        }
        let query = uri.query().unwrap_or("");
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        };
        let page = param("page").and_then(|p| p.parse().ok()).unwrap_or(0);
        let (list, pages) = match index::listing(&self.reader, &inode, page).await {
            Ok(x) => x,
            Err(e) => return error_response(&e),
        };
        let l = index::Listing {
            fsid: fsid.to_hex(),
            version: root.version,
            path: String::from_utf8_lossy(tail).into_owned(),
            page,
            pages,
            entries: index::entries(&list),
        };
        let (ctype, body) = if param("format").as_deref() == Some("json") {
            (
                "application/json",
                serde_json::to_string(&l).expect("serializable"),
            )
        } else {
            ("text/html; charset=utf-8", index::html(&l, &list))
        };
        let len = body.len();
        Response::builder()
            .header(header::CONTENT_TYPE, ctype)
            .header(header::CACHE_CONTROL, cache)
            // Weak: the page also shows the version, and HTML and JSON differ.
            .header(header::ETAG, format!("W/\"{}-{page}\"", key.to_hex()))
            .header(header::CONTENT_LENGTH, len)
            .body(if method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(body)
            })
            .expect("valid response")
    }
}

impl<R: BlockService> Gateway<R> {
    async fn status_page(&self, what: &[u8], query: Option<&str>) -> Response<Body> {
        let Some(st) = &self.status else {
            return text(
                StatusCode::OK,
                "cfs gateway: GET /FSID/PATH (newest version) or /FSID@VERSION/PATH",
            );
        };
        let (ctype, body) = if what == b"-/metrics" {
            match st.metrics().await {
                Some(m) => ("text/plain; version=0.0.4", m),
                None => return text(StatusCode::BAD_GATEWAY, "the entry node did not answer"),
            }
        } else {
            let r = st.report().await;
            if query.is_some_and(|q| q.split('&').any(|p| p == "format=json")) {
                (
                    "application/json",
                    serde_json::to_string(&r).expect("serializable"),
                )
            } else {
                ("text/html; charset=utf-8", status::html(&r))
            }
        };
        Response::builder()
            .header(header::CONTENT_TYPE, ctype)
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::from(body))
            .expect("valid response")
    }
}

fn redirect(to: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::MOVED_PERMANENTLY)
        .header(header::LOCATION, to)
        .body(Body::empty())
        .expect("valid response")
}

async fn handle<R: BlockService>(
    State(gw): State<Arc<Gateway<R>>>,
    ConnectInfo(ClientAddr(addr)): ConnectInfo<ClientAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    match gw.rates.admit(addr.ip()) {
        Admit::Now => {}
        Admit::After(wait) => tokio::time::sleep(wait).await,
        Admit::Refuse { retry_after } => {
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from your network; retry after the time in Retry-After",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from((retry_after.as_secs_f64().ceil() as u64).max(1)),
            );
            return r;
        }
    }
    let deadline = gw.opts.request_timeout;
    let (m, path) = (method.clone(), uri.path().to_string());
    let r = match tokio::time::timeout(deadline, gw.respond(method, uri, headers)).await {
        Ok(r) => r,
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer from the ring within {} s", deadline.as_secs()),
        ),
    };
    // The access log, at debug level (`RUST_LOG=cfs_gateway=debug`).
    tracing::debug!(client = %addr, method = %m, path, status = r.status().as_u16(), "request");
    r
}
