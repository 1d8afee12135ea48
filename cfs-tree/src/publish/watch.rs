//! `cfs publish --watch`: publish a tree, then again each time it changes. The stat index
//! makes each round cost what changed, so a round can follow every burst of writes.
//!
//! Changes are seen through inotify (the `notify` crate). A round starts once the tree has
//! been quiet for `debounce` after a change (or `max_wait` after the first change of a
//! burst that never stops). A failed round (the ring unreachable, a file still being
//! written) is retried after a pause even without another change, so no change is left
//! unpublished.

use super::{publish, PublishError, PublishOpts, Receipt};
use crate::service::BlockService;
use ed25519_dalek::SigningKey;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Timing of [`watch`].
#[derive(Clone, Debug)]
pub struct WatchOpts {
    /// Quiet time after a change before a round starts.
    pub debounce: Duration,
    /// A round starts at the latest this long after the first change it waits for.
    pub max_wait: Duration,
    /// After a failed round, the first pause before the next (doubling to 60 s).
    pub retry: Duration,
    /// Changes under this directory start no round: the state directory (index, roots),
    /// which every round writes, when it lies inside the tree.
    pub ignore: Option<std::path::PathBuf>,
}

impl Default for WatchOpts {
    fn default() -> Self {
        WatchOpts {
            debounce: Duration::from_millis(200),
            max_wait: Duration::from_secs(2),
            retry: Duration::from_secs(1),
            ignore: None,
        }
    }
}

/// What one round did.
pub enum Round<'a> {
    Published(&'a Receipt),
    Failed(&'a PublishError),
}

/// Whether an event can mean the tree changed: our own reads open and close files, and
/// those must not start another round.
fn changes(ev: &notify::Result<notify::Event>, ignore: Option<&Path>) -> bool {
    match ev {
        // A lost event (queue overflow) may hide any change.
        Err(_) => true,
        Ok(e) => {
            let ours = ignore
                .is_some_and(|d| !e.paths.is_empty() && e.paths.iter().all(|p| p.starts_with(d)));
            !ours
                && match e.kind {
                    EventKind::Access(a) => a == AccessKind::Close(AccessMode::Write),
                    _ => true,
                }
        }
    }
}

/// Publish `dir`, then again after every change, until the watch ends (never, short of
/// an error setting it up or `dir` going away). `each` hears of every round.
pub async fn watch<R: BlockService>(
    ring: Arc<R>,
    dir: &Path,
    key: &SigningKey,
    opts: &PublishOpts,
    w: WatchOpts,
    mut each: impl FnMut(Round<'_>),
) -> Result<(), PublishError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Events name canonical paths under the watched directory.
    let ignore = w
        .ignore
        .as_ref()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()));
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if changes(&ev, ignore.as_deref()) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| PublishError::Watch(dir.to_path_buf(), e))?;
    // Watching before the first round: a change during it starts the next.
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(|e| PublishError::Watch(dir.to_path_buf(), e))?;
    let mut pause = w.retry;
    loop {
        let failed = match publish(ring.clone(), dir, key, opts).await {
            Ok(r) => {
                each(Round::Published(&r));
                pause = w.retry;
                false
            }
            Err(e @ PublishError::NotDir(_)) => return Err(e),
            // The tree itself is gone: nothing left to watch.
            Err(e) if !dir.is_dir() => return Err(e),
            Err(e) => {
                each(Round::Failed(&e));
                true
            }
        };
        if failed {
            // The next round after the pause, changes or not (a file still being
            // written, an unreachable ring); changes meanwhile do not hurry it.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(60));
            while rx.try_recv().is_ok() {}
            continue;
        }
        // Wait for a change.
        if rx.recv().await.is_none() {
            return Ok(());
        }
        // Then for quiet, or the longest wait.
        let latest = Instant::now() + w.max_wait;
        loop {
            let quiet = (Instant::now() + w.debounce).min(latest);
            match tokio::time::timeout_at(quiet, rx.recv()).await {
                Ok(Some(())) if Instant::now() < latest => continue,
                Ok(None) => return Ok(()),
                _ => break,
            }
        }
    }
}
