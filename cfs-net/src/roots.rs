//! Reading roots: every holder's answer counts (a replica behind, a fork, a node that just
//! joined), so a root read asks the replicas and as many more, waits for a holder's
//! root, and gives the rest a short grace instead of the RPC timeout.

use crate::hedge::ROOT_GRACE;
use crate::net::{append_others, DhashError, Net};
use crate::transport::Transport;
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::wire::{Request, Response};
use cfs_core::{Id, NodeRef};
use std::net::SocketAddr;
use tokio::time::Instant;

impl<T: Transport> Net<T> {
    /// The winning valid root (`Verified::rank`: the highest version, a fork settled by
    /// hash) among its replicas and the rest of the successor list.
    pub async fn get_root(
        &self,
        start: &[NodeRef],
        key: Id,
        r: usize,
    ) -> Result<Option<Verified>, DhashError> {
        let roots = self.get_roots(start, key, r).await?;
        Ok(roots.into_iter().max_by_key(Verified::rank))
    }

    /// Every distinct verified root the replicas of `key` (and as many more successors)
    /// hold: more than one of a version is a fork, which `Verified::rank` settles.
    pub async fn get_roots(
        &self,
        start: &[NodeRef],
        key: Id,
        r: usize,
    ) -> Result<Vec<Verified>, DhashError> {
        Ok(self.get_roots_also(start, key, r, &[]).await?.0)
    }

    /// [`Net::get_roots`], asking `also` (holders the caller saw before) beside the
    /// replicas the lookup names, and waiting for one of them when the replicas are all
    /// new to the caller: nodes that joined since cannot alone decide which root is the
    /// newest. Returns the roots and which of the asked answered with the best.
    pub async fn get_roots_also(
        &self,
        start: &[NodeRef],
        key: Id,
        r: usize,
        also: &[SocketAddr],
    ) -> Result<(Vec<Verified>, Vec<SocketAddr>), DhashError> {
        let l = self.lookup(start.to_vec(), key, None).await?;
        self.roots_in(&l.succs, key, r, also).await
    }

    /// [`Net::get_roots_also`] with the key's successors known (a lookup's answer, or a
    /// range learned lately).
    pub async fn roots_in(
        &self,
        succs: &[NodeRef],
        key: Id,
        r: usize,
        also: &[SocketAddr],
    ) -> Result<(Vec<Verified>, Vec<SocketAddr>), DhashError> {
        let mut targets = self.replicas(succs, r).await;
        append_others(&mut targets, succs);
        targets.truncate(2 * r);
        let mut asked: Vec<SocketAddr> = Vec::new();
        for a in targets.iter().map(|n| n.addr) {
            if !asked.contains(&a) {
                asked.push(a);
            }
        }
        let known = asked.iter().filter(|a| also.contains(a)).count();
        // The replicas are all strangers to the caller: the holders it saw must answer too.
        let must: Vec<SocketAddr> = if also.is_empty() || known > 0 {
            Vec::new()
        } else {
            also.iter().take(2 * r).copied().collect()
        };
        asked.extend(must.iter().copied());
        self.roots_from(&asked, key, r, &must).await
    }

    /// Ask each of `asked` for the root of `key`: every answer counts, but a hung or
    /// cut-off holder must not hold up the root (a mount's next version, a publisher's
    /// check), so once r have answered with a root among them (and one of `must`, if
    /// any), the rest get `ROOT_GRACE` more. Returns the distinct verified roots and who answered the best.
    pub async fn roots_from(
        &self,
        asked: &[SocketAddr],
        key: Id,
        r: usize,
        must: &[SocketAddr],
    ) -> Result<(Vec<Verified>, Vec<SocketAddr>), DhashError> {
        let calls = asked.iter().map(|&a| {
            let net = self.clone();
            async move {
                let got = net
                    .call(
                        a,
                        Request::Get {
                            kind: BlockKind::Root,
                            key,
                        },
                    )
                    .await;
                (a, got)
            }
        });
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut pending: FuturesUnordered<_> = calls.collect();
        let mut roots: Vec<(Verified, Vec<SocketAddr>)> = Vec::new();
        let mut answered = 0;
        let mut must_done = must.is_empty();
        let mut grace: Option<Instant> = None;
        loop {
            let next = match grace {
                None => pending.next().await,
                Some(t) => match tokio::time::timeout_at(t, pending.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
            };
            let Some((from, answer)) = next else { break };
            if must.contains(&from) {
                must_done = true;
            }
            if let Ok(Response::Block(b)) = answer {
                answered += 1;
                if let Some(bytes) = b {
                    if let Ok(v) = verify(BlockKind::Root, key, bytes, false) {
                        match roots.iter_mut().find(|(r, _)| r.bytes() == v.bytes()) {
                            Some((_, by)) => by.push(from),
                            None => roots.push((v, vec![from])),
                        }
                    }
                }
            }
            // Nodes that hold no root answer at once, a holder may take longer (one that
            // just joined checks its root with the others first): the grace starts only
            // once a root has come, unless every node asked has answered.
            if answered >= r && must_done && !roots.is_empty() && grace.is_none() {
                grace = Some(Instant::now() + ROOT_GRACE);
            }
        }
        if answered == 0 && roots.is_empty() {
            return Err(DhashError::Unavailable {
                kind: BlockKind::Root,
                key,
                deadline: self.timeouts.rpc,
                last: "no replica of the root answered".into(),
            });
        }
        let best = roots
            .iter()
            .max_by_key(|(v, _)| v.rank())
            .map(|(_, by)| by.clone())
            .unwrap_or_default();
        Ok((roots.into_iter().map(|(v, _)| v).collect(), best))
    }
}
