//! `cfs demo`: the whole system on one machine in one command. Starts a ring of nodes in
//! this process on loopback with temporary storage, publishes a tree, mounts it, and
//! cleans everything up on Ctrl-C.

use anyhow::{bail, Context, Result};
use cfs_fuse::MountOpts;
use cfs_net::client::Client;
use cfs_tree::service::net::NetRing;
use cfs_tree::PublishOpts;
use cfsd::node::Config;
use cfsd::store::RedbStore;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// fusermount3 is what an unprivileged mount needs; install it when we can.
fn ensure_fuse() -> Result<()> {
    let have = |c: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if have("fusermount3") {
        return Ok(());
    }
    let root = unsafe { libc::geteuid() } == 0;
    if root && have("apt-get") {
        eprintln!("cfs demo: fuse3 is missing; installing it with apt-get");
        let ok = std::process::Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ok && have("fusermount3") {
            return Ok(());
        }
    }
    bail!("FUSE is not installed: run `sudo apt-get install fuse3` (Debian/Ubuntu) or your system's fuse3 package, then try again")
}

/// The sample tree shipped in the repository, or one written to `scratch` when the binary
/// runs outside a checkout.
fn sample_tree(scratch: &Path) -> Result<PathBuf> {
    // Shown as the newcomer typed it: `examples/sample` from the checkout's top.
    let here = Path::new("examples/sample");
    if here.is_dir() {
        return Ok(here.to_path_buf());
    }
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    if let Some(repo) = top
        .map(|t| t.join("examples/sample"))
        .filter(|r| r.is_dir())
    {
        return Ok(repo);
    }
    let d = scratch.join("sample");
    std::fs::create_dir_all(d.join("docs"))?;
    std::fs::write(
        d.join("README.txt"),
        "A sample tree published by `cfs demo`.\n",
    )?;
    std::fs::write(
        d.join("docs/numbers.txt"),
        (0..2000).map(|i| format!("{i}\n")).collect::<String>(),
    )?;
    Ok(d)
}

pub async fn run(dir: Option<PathBuf>, mountpoint: Option<PathBuf>, nodes: usize) -> Result<()> {
    ensure_fuse()?;
    if nodes == 0 || nodes > 64 {
        bail!("--nodes must be between 1 and 64");
    }
    let scratch = tempdir()?;
    let dir = match dir {
        Some(d) => d,
        None => sample_tree(&scratch)?,
    };
    let mountpoint = match mountpoint {
        Some(m) => m,
        None => scratch.join("mnt"),
    };
    std::fs::create_dir_all(&mountpoint)
        .with_context(|| format!("creating mount point {}", mountpoint.display()))?;
    let result = run_in(&scratch, &dir, &mountpoint, nodes).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn tempdir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("cfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(base)
}

async fn run_in(scratch: &Path, dir: &Path, mountpoint: &Path, n: usize) -> Result<()> {
    let mut addrs = Vec::new();
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let data = scratch.join(format!("node{i}"));
        std::fs::create_dir_all(&data)?;
        let store = RedbStore::open(&data.join("blocks.redb"))?;
        let cfg = Config::new(addr);
        cfsd::daemon::start_node(
            cfg,
            listener,
            Arc::new(store),
            addrs.first().copied(),
            None,
            Default::default(),
        )
        .await;
        addrs.push(addr);
    }
    let first = addrs[0];
    eprintln!("cfs demo: a ring of {n} nodes on {} .. (r = 3)", first);
    // Let the ring settle so the first publish lands on the final replicas.
    let mut client = Client::tcp(first);
    client.connect().await?;
    settle(&client, &addrs).await;

    let key_path = scratch.join("demo.key");
    cfs_tree::keygen(&key_path)?;
    let sk = cfs_tree::load_key(&key_path)?;
    let ring = Arc::new(NetRing::new(client, Some(scratch.join("state"))));
    let opts = PublishOpts {
        progress: std::io::stderr().is_terminal(),
        ..PublishOpts::default()
    };
    let receipt = cfs_tree::publish(ring.clone(), dir, &sk, &opts)
        .await
        .with_context(|| format!("publishing {}", dir.display()))?;
    eprintln!("{receipt}");
    let fsid = receipt.fsid;
    let handle = cfs_fuse::spawn_mount(ring, fsid, mountpoint, MountOpts::default())
        .await
        .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or("cfs".into());
    println!();
    println!(
        "Published {} as FSID {fsid}, version {}.",
        dir.display(),
        receipt.version
    );
    println!("Mounted read-only at {}", mountpoint.display());
    println!();
    println!("Try, in another terminal:");
    println!("  ls -la {}", mountpoint.display());
    println!("  find {} -type f | xargs sha1sum", mountpoint.display());
    println!("  {exe} ring --node {first}");
    println!("  {exe} status --node {first}");
    println!("  {exe} get {fsid}:/README.txt --node {first}");
    println!(
        "  touch {}/x     # fails: read-only file system",
        mountpoint.display()
    );
    println!();
    println!("Ctrl-C unmounts, stops the ring and deletes its temporary storage.");
    cfsd::daemon::wait_for_signal().await;
    eprintln!("cfs demo: unmounting and stopping");
    tokio::task::spawn_blocking(move || handle.unmount()).await??;
    Ok(())
}

/// Wait (bounded) until every node's successor is set, so the ring is one ring.
async fn settle(client: &Client, addrs: &[std::net::SocketAddr]) {
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while tokio::time::Instant::now() < end {
        if let Ok(ring) = client.ring(addrs[0]).await {
            if ring.len() == addrs.len() {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
