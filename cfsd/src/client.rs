//! The client side of the ring for `cfs`: lookups start at the node it was given (and
//! the ring members it learns), blocks go straight to and from replicas.

use crate::net::{DhashError, Lookup, LookupError, Net, PutReceipt, Timeouts};
use crate::transport::{CallError, TcpTransport, Transport};
use cfs_core::block::{BlockKind, Verified};
use cfs_core::wire::{Request, Response, StatusInfo};
use cfs_core::{Id, NodeRef};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Client<T: Transport = TcpTransport> {
    pub net: Net<T>,
    /// Ring members known to answer: the given node first, others learned from lookups.
    known: Arc<Mutex<Vec<NodeRef>>>,
    pub replicas: usize,
}

impl Client<TcpTransport> {
    pub fn tcp(node: SocketAddr) -> Client<TcpTransport> {
        Client::new(TcpTransport::new(None), node, Timeouts::default())
    }
}

const MAX_KNOWN: usize = 32;

impl<T: Transport> Client<T> {
    pub fn new(transport: T, node: SocketAddr, timeouts: Timeouts) -> Client<T> {
        Client {
            net: Net::new(transport, timeouts, None),
            known: Arc::new(Mutex::new(vec![NodeRef::new(node, 0)])),
            replicas: 3,
        }
    }

    /// Ask the node for its replication factor; call once after connecting.
    pub async fn connect(&mut self) -> Result<StatusInfo, CallError> {
        let first = self.known.lock().unwrap()[0].addr;
        let s = self.status(first).await?;
        self.replicas = s.replicas.max(1) as usize;
        self.learn(s.vnodes.iter().flat_map(|v| v.succs.iter().copied()));
        Ok(s)
    }

    fn learn(&self, nodes: impl IntoIterator<Item = NodeRef>) {
        let mut k = self.known.lock().unwrap();
        for n in nodes {
            if k.len() >= MAX_KNOWN {
                break;
            }
            if !k.iter().any(|x| x.addr == n.addr) {
                k.push(NodeRef::new(n.addr, 0));
            }
        }
    }

    /// Where lookups start: every known member, so a dead first node is skipped.
    fn start(&self) -> Vec<NodeRef> {
        self.known.lock().unwrap().clone()
    }

    pub async fn lookup(&self, key: Id) -> Result<Lookup, LookupError> {
        let l = self.net.lookup(self.start(), key, None).await?;
        self.learn(l.succs.iter().copied());
        Ok(l)
    }

    pub async fn get(&self, kind: BlockKind, key: Id) -> Result<Verified, DhashError> {
        let (v, l) = self
            .net
            .get(&self.start(), kind, key, self.replicas, true)
            .await?;
        self.learn(l.succs.iter().copied());
        Ok(v)
    }

    pub async fn put(&self, block: &Verified) -> Result<PutReceipt, DhashError> {
        self.net.put(&self.start(), block, self.replicas).await
    }

    pub async fn get_root(&self, fsid: Id) -> Result<Option<Verified>, DhashError> {
        self.net.get_root(&self.start(), fsid, self.replicas).await
    }

    /// For each item: do all r replicas hold it now (roots: at least that version)?
    /// Lookups are shared by items that fall in the same successor range.
    pub async fn has_everywhere(
        &self,
        items: &[(BlockKind, Id, u64)],
    ) -> Result<Vec<bool>, DhashError> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].1);
        let mut out = vec![false; items.len()];
        let mut i = 0;
        while i < order.len() {
            let l = self.lookup(items[order[i]].1).await?;
            let mut group = Vec::new();
            while i < order.len() && items[order[i]].1.in_half_open(l.from, l.succs[0].id) {
                group.push(order[i]);
                i += 1;
            }
            if group.is_empty() {
                group.push(order[i]);
                i += 1;
            }
            let set = self.net.replicas(&l.succs, self.replicas).await;
            let asks: Vec<(BlockKind, Id)> =
                group.iter().map(|&g| (items[g].0, items[g].1)).collect();
            let mut count = vec![0usize; group.len()];
            let calls = set.iter().map(|n| {
                let net = self.net.clone();
                let asks = asks.clone();
                let a = n.addr;
                async move { net.has(a, &asks).await }
            });
            for res in crate::net::join_all(calls).await {
                if let Ok(have) = res {
                    for (j, h) in have.iter().enumerate() {
                        if h.is_some_and(|v| v >= items[group[j]].2) {
                            count[j] += 1;
                        }
                    }
                }
            }
            for (j, &g) in group.iter().enumerate() {
                out[g] = set.len() >= self.replicas && count[j] >= self.replicas;
            }
        }
        Ok(out)
    }

    /// The replicas of `key` that hold it in their permanent store, and (for --json)
    /// other members of the successor list that hold it too.
    pub async fn locate(
        &self,
        kind: BlockKind,
        key: Id,
    ) -> Result<(Vec<NodeRef>, Vec<NodeRef>), DhashError> {
        let l = self.lookup(key).await?;
        let set = self.net.replicas(&l.succs, self.replicas).await;
        let mut others: Vec<NodeRef> = Vec::new();
        for n in &l.succs {
            if !set.iter().any(|s| s.addr == n.addr) && !others.iter().any(|s| s.addr == n.addr) {
                others.push(*n);
            }
        }
        let ask = |nodes: Vec<NodeRef>| async move {
            let calls = nodes.iter().map(|n| {
                let net = self.net.clone();
                let a = n.addr;
                async move { net.has(a, &[(kind, key)]).await }
            });
            let res = crate::net::join_all(calls).await;
            nodes
                .into_iter()
                .zip(res)
                .filter(|(_, r)| matches!(r, Ok(v) if v.first().is_some_and(|x| x.is_some())))
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        Ok((ask(set).await, ask(others).await))
    }

    pub async fn status(&self, addr: SocketAddr) -> Result<StatusInfo, CallError> {
        match self.net.call(addr, Request::Status).await? {
            Response::Status(s) => Ok(*s),
            other => Err(CallError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Every vnode of the ring, walking successor pointers from `addr`'s first vnode,
    /// in id order starting from the lowest id.
    pub async fn ring(&self, addr: SocketAddr) -> Result<Vec<NodeRef>, CallError> {
        let start = NodeRef::new(addr, 0);
        let mut out = vec![start];
        let mut cur = start;
        for _ in 0..100_000 {
            let succs = match self
                .net
                .call(cur.addr, Request::Neighbors { vnode: cur.vnode })
                .await?
            {
                Response::Neighbors { succs, .. } => succs,
                other => return Err(CallError::Protocol(format!("unexpected {other:?}"))),
            };
            let Some(next) = succs.first().copied() else {
                break;
            };
            if next == start || out.contains(&next) {
                break;
            }
            out.push(next);
            cur = next;
        }
        out.sort_by_key(|n| n.id);
        Ok(out)
    }
}
