//! The readers of a chaos run: through a FUSE mount (`cfs mount` as its own process, as
//! a user reads), or through the reader library (`cfs get`'s code) where FUSE is
//! missing. Either way every byte is checked against the source.

use super::report::Read;
use super::Shared;
use cfs_core::Id;
use cfs_tree::reader::{Reader, ReaderOpts};
use cfs_tree::service::net::NetRing;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How readers reach the tree.
#[derive(Clone, Debug)]
pub enum ReadVia {
    /// A `cfs mount` of the tree, run from this `cfs` binary.
    Mount { cfs: PathBuf },
    /// The reader library in this process.
    Library,
}

impl ReadVia {
    /// A mount where FUSE works here (`/dev/fuse` and `fusermount3`), else the library.
    pub fn best(cfs: PathBuf) -> ReadVia {
        let fuse = Path::new("/dev/fuse").exists()
            && Command::new("fusermount3")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
        if fuse {
            ReadVia::Mount { cfs }
        } else {
            ReadVia::Library
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ReadVia::Mount { .. } => "mount",
            ReadVia::Library => "library",
        }
    }
}

/// A running `cfs mount`: unmounted and stopped when dropped.
pub struct Mounted {
    child: Child,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Mounted {
    /// Mount `fsid` at `out/mnt` through `node`, with no memory or file cache and direct
    /// I/O, so reads reach the ring while it fails rather than a copy made before.
    pub fn start(
        cfs: &Path,
        fsid: Id,
        node: std::net::SocketAddr,
        out: &Path,
    ) -> Result<Mounted, String> {
        let dir = out.join("mnt");
        unmount(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let log = std::fs::File::create(out.join("mount.log"))
            .map_err(|e| format!("creating mount.log: {e}"))?;
        let child = Command::new(cfs)
            .args(["mount", &fsid.to_hex()])
            .arg(&dir)
            .args(["--node", &node.to_string()])
            .args([
                "--no-file-cache",
                "--cache-mb",
                "0",
                "--direct",
                "--timeout",
                "5",
                "--poll",
                "1",
            ])
            .env("CFS_STATE_DIR", out.join("mount-state"))
            // Its requests and hedges, logged as it exits (`stop`).
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,cfs::reads=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {} mount: {e}", cfs.display()))?;
        let mut m = Mounted {
            child,
            dir,
            log: out.join("mount.log"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !m.dir.join("version.txt").exists() {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(format!(
                    "cfs mount exited ({status}); see {}",
                    out.join("mount.log").display()
                ));
            }
            if Instant::now() > deadline {
                return Err("the mount did not show the tree within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(m)
    }
}

impl Mounted {
    /// Unmount and stop; the mount's (requests, hedged) from the line it logs at exit.
    pub fn stop(self) -> Option<(u64, u64)> {
        let log = self.log.clone();
        drop(self);
        let text = std::fs::read_to_string(log).ok()?;
        let line = text.lines().rev().find(|l| l.contains("cfs mount done"))?;
        let field = |name: &str| -> Option<u64> {
            let at = line.find(&format!(" {name}="))? + name.len() + 2;
            let digits: String = line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        };
        Some((field("calls")?, field("hedged")?))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SIGTERM: the mount unmounts itself; a lazy unmount if it does not in time.
        // Only while the child is unreaped: a reaped pid may belong to another process.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child's.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount(&self.dir);
    }
}

fn unmount(dir: &Path) {
    for args in [["-u"], ["-uz"]] {
        let _ = Command::new("fusermount3")
            .args(args)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where one reader reads from.
pub enum Source {
    Mount(PathBuf),
    Library { ring: Arc<NetRing>, fsid: Id },
}

/// Read random files of the newest version, whole, and check every byte; version.txt
/// holds the version number, which must never go back.
pub(super) async fn reader(
    id: u64,
    source: Arc<Source>,
    expected: Arc<HashMap<String, Vec<u8>>>,
    shared: Arc<Shared>,
    seed: u64,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed.wrapping_add(id + 1));
    let names: Vec<String> = {
        let mut n: Vec<String> = expected.keys().cloned().collect();
        n.sort();
        n.push("version.txt".into());
        n
    };
    let mut highest = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let name = names[rng.random_range(0..names.len())].clone();
        let t = shared.now();
        let started = Instant::now();
        let got = read_one(&source, &name).await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let read = match got {
            Ok((root_version, bytes)) => {
                let want = expected.get(&name);
                // version.txt names the version; a mount has no other way to tell it.
                let version = match want {
                    Some(_) => root_version.unwrap_or(0),
                    None => std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0),
                };
                let wrong = match want {
                    Some(b) => bytes != *b,
                    None => version == 0 || root_version.is_some_and(|v| v != version),
                };
                if let Some(v) = Some(version).filter(|v| *v > 0) {
                    if v < highest {
                        shared.log.lock().unwrap().regressions += 1;
                    }
                    highest = highest.max(v);
                }
                Read {
                    t,
                    ms,
                    ok: !wrong,
                    bytes: bytes.len() as u64,
                    version,
                    wrong,
                    error: wrong.then(|| format!("{name}: wrong bytes")),
                }
            }
            Err(e) => Read {
                t,
                ms,
                ok: false,
                bytes: 0,
                version: 0,
                wrong: false,
                error: Some(format!("{name}: {e}")),
            },
        };
        let counter = if read.ok {
            &shared.ok_reads
        } else {
            &shared.failed_reads
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let failed = !read.ok;
        shared.log.lock().unwrap().reads.push(read);
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One whole file: its bytes, and the root's version where the source knows it.
async fn read_one(source: &Arc<Source>, name: &str) -> Result<(Option<u64>, Vec<u8>), String> {
    match &**source {
        Source::Mount(dir) => {
            let path = dir.join(name);
            let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok((None, bytes))
        }
        Source::Library { ring, fsid } => {
            let opts = ReaderOpts {
                deadline: Duration::from_secs(5),
                ..ReaderOpts::default()
            };
            // A fresh reader per read: nothing cached from before the fault.
            let r = Reader::new(ring.clone(), opts);
            let root = r.root(*fsid, None).await.map_err(|e| e.to_string())?;
            let (_, inode) = r
                .resolve(root.top, name.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            r.copy_to(&inode, &mut out)
                .await
                .map_err(|e| e.to_string())?;
            Ok((Some(root.version), out))
        }
    }
}
