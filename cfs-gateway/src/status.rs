//! The ring's status page (`/` and `/-/ring`, `?format=json`) and the entry node's
//! counters as Prometheus text (`/-/metrics`). Nodes are found by walking the ring from
//! the entry node and asked for their status in parallel; a node that answered before
//! and does not now stays listed as gone, with when it was last heard.

use super::index::{escape, utc};
use cfs_net::client::Client;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nodes remembered at most (the oldest unheard go first).
const MAX_NODES: usize = 4096;
/// How long one node may take to answer a status request.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// A report is reused this long: the page must not make the gateway ask every node per
/// request.
const REPORT_TTL: Duration = Duration::from_secs(2);
/// Status values that are levels, not counts since start.
const GAUGES: [&str; 2] = ["started_unix", "blocks_below_r"];
/// Nodes asked per report at most.
const MAX_ASKED: usize = 256;

#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub addr: String,
    pub ids: Vec<String>,
    pub up: bool,
    pub blocks: u64,
    pub bytes: u64,
    pub started_unix: u64,
    pub last_heard_unix: u64,
    /// Blocks pushed to replicas by maintenance (repairs), since the node started.
    pub repairs_sent: u64,
    /// Hand-offs waiting for replicas to confirm.
    pub drops_deferred: u64,
    /// Blocks this node found below r in its last maintenance round (each block is
    /// counted by one node: its first holder in replica order).
    pub blocks_below_r: u64,
    /// Whether the node has finished a maintenance round since it started (before
    /// that its count means nothing).
    pub measured: bool,
}

#[derive(Clone, Serialize)]
pub struct RingReport {
    pub entry: String,
    pub nodes: Vec<NodeReport>,
    pub up: usize,
    pub gone: usize,
    /// Blocks on fewer than r replicas, summed over the nodes that are up and measured.
    pub blocks_below_r: u64,
    /// Nodes up that have not finished a maintenance round yet.
    pub unmeasured: usize,
}

pub struct RingStatus {
    client: Client,
    entry: SocketAddr,
    known: Mutex<BTreeMap<SocketAddr, NodeReport>>,
    /// The last report and when it was made; one walk at a time.
    last: tokio::sync::Mutex<Option<(std::time::Instant, RingReport)>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RingStatus {
    pub fn new(client: Client, entry: SocketAddr) -> RingStatus {
        RingStatus {
            client,
            entry,
            known: Mutex::new(BTreeMap::new()),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The ring's report, made at most every `REPORT_TTL` (concurrent callers share it).
    pub async fn report(&self) -> RingReport {
        let mut last = self.last.lock().await;
        if let Some((at, r)) = &*last {
            if at.elapsed() < REPORT_TTL {
                return r.clone();
            }
        }
        let r = self.walk().await;
        *last = Some((std::time::Instant::now(), r.clone()));
        r
    }

    /// Walk the ring and ask every node; merge with the nodes known before.
    async fn walk(&self) -> RingReport {
        let members =
            match tokio::time::timeout(ASK_TIMEOUT * 5, self.client.ring(self.entry)).await {
                Ok(Ok(m)) => m,
                _ => Vec::new(),
            };
        let mut addrs: Vec<SocketAddr> = members.iter().map(|n| n.addr).collect();
        addrs.extend(self.known.lock().unwrap().keys().copied());
        addrs.sort();
        addrs.dedup();
        addrs.truncate(MAX_ASKED);
        let asks = addrs.iter().map(|a| {
            let (c, a) = (self.client.clone(), *a);
            async move { (a, tokio::time::timeout(ASK_TIMEOUT, c.status(a)).await) }
        });
        let answers = futures_util::future::join_all(asks).await;
        let t = now();
        let mut known = self.known.lock().unwrap();
        for (a, r) in answers {
            match r {
                Ok(Ok(s)) => {
                    let counter = |n: &str| {
                        s.counters
                            .iter()
                            .find(|(k, _)| k == n)
                            .map_or(0, |(_, v)| *v)
                    };
                    known.insert(
                        a,
                        NodeReport {
                            addr: a.to_string(),
                            ids: s.vnodes.iter().map(|v| v.me.id.to_hex()).collect(),
                            up: true,
                            blocks: s.blocks,
                            bytes: s.bytes,
                            started_unix: counter("started_unix"),
                            last_heard_unix: t,
                            repairs_sent: counter("repairs_sent"),
                            drops_deferred: counter("drops_deferred"),
                            blocks_below_r: counter("blocks_below_r"),
                            measured: counter("maintain_rounds") > 0,
                        },
                    );
                }
                _ => {
                    if let Some(n) = known.get_mut(&a) {
                        n.up = false;
                    }
                }
            }
        }
        while known.len() > MAX_NODES {
            let oldest = known
                .iter()
                .min_by_key(|(_, n)| n.last_heard_unix)
                .map(|(a, _)| *a)
                .expect("not empty");
            known.remove(&oldest);
        }
        let nodes: Vec<NodeReport> = known.values().cloned().collect();
        let up = nodes.iter().filter(|n| n.up).count();
        RingReport {
            entry: self.entry.to_string(),
            gone: nodes.len() - up,
            up,
            // Nodes report their own counts: a liar's u64::MAX must not overflow the sum.
            blocks_below_r: nodes
                .iter()
                .filter(|n| n.up && n.measured)
                .map(|n| n.blocks_below_r)
                .fold(0, u64::saturating_add),
            unmeasured: nodes.iter().filter(|n| n.up && !n.measured).count(),
            nodes,
        }
    }

    /// The entry node's counters as Prometheus text.
    pub async fn metrics(&self) -> Option<String> {
        let s = tokio::time::timeout(ASK_TIMEOUT, self.client.status(self.entry))
            .await
            .ok()?
            .ok()?;
        let mut out = String::new();
        for (k, v) in &s.counters {
            let kind = if GAUGES.contains(&k.as_str()) {
                "gauge"
            } else {
                "counter"
            };
            let _ = writeln!(out, "# TYPE cfs_{k} {kind}\ncfs_{k} {v}");
        }
        let _ = writeln!(out, "# TYPE cfs_blocks gauge\ncfs_blocks {}", s.blocks);
        let _ = writeln!(out, "# TYPE cfs_bytes gauge\ncfs_bytes {}", s.bytes);
        Some(out)
    }
}

pub fn html(r: &RingReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cfs ring</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:0 1em}}\
         .gone{{color:#a00}}.up{{color:#070}}</style></head><body>\
         <h1>cfs ring</h1><p>entry node {}: {} up, {} gone; \
         <span class=\"{}\">{} blocks below r</span> (last maintenance round{}). \
         <a href=\"/-/ring?format=json\">json</a> · <a href=\"/-/metrics\">metrics</a></p>\
         <table><tr><th>address</th><th>state</th><th>blocks</th><th>bytes</th>\
         <th>up since (UTC)</th><th>last heard (UTC)</th><th>repairs sent</th>\
         <th>hand-offs waiting</th><th>below r</th><th>ids</th></tr>",
        escape(&r.entry),
        r.up,
        r.gone,
        if r.blocks_below_r == 0 { "up" } else { "gone" },
        r.blocks_below_r,
        match r.unmeasured {
            0 => String::new(),
            n => format!("; {n} nodes not measured yet"),
        }
    );
    for n in &r.nodes {
        let (class, state) = if n.up { ("up", "up") } else { ("gone", "gone") };
        let _ = write!(
            s,
            "<tr class=\"{class}\"><td>{}</td><td>{state}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            escape(&n.addr),
            n.blocks,
            n.bytes,
            utc(n.started_unix as i64),
            utc(n.last_heard_unix as i64),
            n.repairs_sent,
            n.drops_deferred,
            n.blocks_below_r,
            n.ids.iter().map(|i| &i[..12]).collect::<Vec<_>>().join(" ")
        );
    }
    s.push_str("</table><p>Trees: <code>/FSID/path</code> (newest version) or <code>/FSID@VERSION/path</code>.</p></body></html>");
    s
}
