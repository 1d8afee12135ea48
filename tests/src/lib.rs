//! Test harness: a `Cluster` of real `cfsd` processes on loopback that kills its children
//! by PID on drop, `eventually` to poll with a deadline instead of sleeping, and `cfs` to
//! run the client command.

pub mod hostile;
pub mod tree;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Where cargo put the binaries of this workspace (built once per test process).
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "-p", "cfsd", "-p", "cfs-cli"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "building cfsd and cfs failed");
    });
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/test-binary or target/<profile>/bench -> target/<profile>/<name>
    let mut dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    dir.join(name)
}

/// A runtime for tests that drive async clients from a synchronous test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client of the ring through `addr`, connected (it knows r).
pub fn client(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> cfs_net::client::Client {
    rt.block_on(async {
        let mut c = cfs_net::client::Client::tcp(addr);
        c.connect().await.unwrap();
        c
    })
}

/// Poll `f` until it returns Some, or panic with `what` after `deadline`.
pub fn eventually<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Run `cfs` with arguments; returns its output (stdout, stderr, status).
pub fn cfs(args: &[&str]) -> Output {
    Command::new(bin("cfs"))
        .args(args)
        .env("CFS_STATE_DIR", state_dir())
        .stdin(Stdio::null())
        .output()
        .expect("running cfs")
}

/// `cfs` that must succeed; returns stdout as a string.
pub fn cfs_ok(args: &[&str]) -> String {
    let out = cfs(args);
    assert!(
        out.status.success(),
        "cfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Where `cfs` run by tests remembers root versions (not the user's home).
pub fn state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("cfs-test-state-{}", std::process::id()))
}

/// Is a filesystem mounted exactly at `p`?
pub fn is_mounted(p: &Path) -> bool {
    let Ok(p) = p.canonicalize().or_else(|_| Ok::<_, ()>(p.to_path_buf())) else {
        return false;
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap_or("")))
}

/// A `cfs mount` process; on drop it is stopped and its mount cleared, even if the test
/// failed.
pub struct Mount {
    pub child: Option<Child>,
    pub path: PathBuf,
    args: Vec<String>,
}

impl Mount {
    /// Run `cfs mount FSID PATH --node NODE EXTRA...` and wait until the mount is live.
    pub fn start(fsid: &str, path: &Path, node: &str, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(path).ok();
        let mut args: Vec<String> = vec![
            "mount".into(),
            fsid.into(),
            path.display().to_string(),
            "--node".into(),
            node.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut m = Mount {
            child: None,
            path: path.to_path_buf(),
            args,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(bin("cfs"));
        cmd.args(&self.args)
            .env("CFS_STATE_DIR", state_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if std::env::var_os("CFS_TEST_LOGS").is_none() {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().expect("starting cfs mount");
        let path = self.path.clone();
        eventually(Duration::from_secs(30), "the mount to be live", || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("cfs mount exited early with {st}");
            }
            (is_mounted(&path) && std::fs::read_dir(&path).is_ok()).then_some(())
        });
        self.child = Some(child);
    }

    /// `kill -9` the mount process, leaving a dead mount behind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Start `cfs mount` again at the same place with the same arguments.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.path) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.path)
                .status();
        }
    }
}

pub struct NodeProc {
    pub child: Option<Child>,
    pub data: PathBuf,
    pub addr: SocketAddr,
    args: Vec<String>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }
}

/// A ring of `cfsd` processes, each with its own data directory under one temp dir.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

fn spawn(data: &Path, listen: &str, join: Option<SocketAddr>, extra: &[String]) -> Child {
    let mut cmd = Command::new(bin("cfsd"));
    cmd.args(["--listen", listen, "--data"]).arg(data);
    if let Some(j) = join {
        cmd.args(["--join", &j.to_string()]);
    }
    cmd.args(extra);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    if std::env::var_os("CFS_TEST_LOGS").is_none() {
        cmd.stderr(Stdio::null());
    }
    cmd.spawn().expect("starting cfsd")
}

fn read_addr(data: &Path) -> SocketAddr {
    eventually(Duration::from_secs(20), "cfsd to write its address", || {
        std::fs::read_to_string(data.join("addr"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

impl Cluster {
    /// `cfs publish DIR --key KEY` through node `node`; returns (fsid, version).
    pub fn publish(&self, dir: &Path, key: &Path, node: usize) -> (String, u64) {
        self.publish_with(dir, key, node, &[])
    }

    /// `publish` with more flags (`--lease 10s`, `-q`).
    pub fn publish_with(
        &self,
        dir: &Path,
        key: &Path,
        node: usize,
        extra: &[&str],
    ) -> (String, u64) {
        let addr = self.addr(node);
        let mut args = vec![
            "publish",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--node",
            &addr,
        ];
        args.extend_from_slice(extra);
        let out = cfs_ok(&args);
        let mut it = out.split_whitespace();
        let fsid = it.next().unwrap().to_string();
        let version = it.next().unwrap().parse().unwrap();
        (fsid, version)
    }

    /// A new publisher key in the cluster's directory.
    pub fn keygen(&self) -> PathBuf {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let key = self.dir.path().join(format!("k{n}.key"));
        cfs_ok(&["keygen", key.to_str().unwrap()]);
        key
    }

    /// Start `n` nodes; each joins through the first. `extra` goes to every cfsd.
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("cfs-test-")
            .tempdir()
            .unwrap();
        let mut c = Cluster {
            nodes: Vec::new(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..n {
            c.add();
        }
        c
    }

    /// Start one more node joining through the first live one.
    pub fn add(&mut self) -> usize {
        self.add_at("127.0.0.1")
    }

    /// `add` listening on another loopback address (`127.0.2.1`: another prefix).
    pub fn add_at(&mut self, ip: &str) -> usize {
        let i = self.nodes.len();
        let data = self.dir.path().join(format!("node{i}"));
        let join = self.nodes.iter().find(|n| n.alive()).map(|n| n.addr);
        let child = spawn(&data, &format!("{ip}:0"), join, &self.extra);
        let addr = read_addr(&data);
        // Keep the same port on restart: the node id is bound to it.
        let args = vec!["--listen".into(), addr.to_string()];
        self.nodes.push(NodeProc {
            child: Some(child),
            data,
            addr,
            args,
        });
        i
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.addr)
            .collect()
    }

    pub fn addr(&self, i: usize) -> String {
        self.nodes[i].addr.to_string()
    }

    /// `kill -9` node i.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// `kill -TERM` node i and wait (up to `deadline`) for it to exit; its exit status.
    /// Panics, after a `kill -9`, if it does not stop in time.
    pub fn terminate(&mut self, i: usize, deadline: Duration) -> std::process::ExitStatus {
        let mut c = self.nodes[i].child.take().expect("node is running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = c.try_wait().expect("waiting for cfsd") {
                return st;
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {i} did not stop within {deadline:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A counter from node i's `cfs status` (None while it does not answer).
    pub fn counter(&self, i: usize, name: &str) -> Option<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = self.nodes[i].addr;
        let st = rt
            .block_on(cfs_net::client::Client::tcp(addr).status(addr))
            .ok()?;
        st.counters.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Start node i again on its data directory and address, joining a live node.
    pub fn restart(&mut self, i: usize) {
        let join = self.nodes.iter().find(|n| n.alive()).map(|n| n.addr);
        self.restart_with(i, join);
    }

    /// Start node i again as `cfsd` was first run by hand: with `join`, or without it
    /// (the node then rejoins through the peers it remembers).
    pub fn restart_with(&mut self, i: usize, join: Option<SocketAddr>) {
        assert!(!self.nodes[i].alive());
        let _ = std::fs::remove_file(self.nodes[i].data.join("addr"));
        let listen = self.nodes[i].args[1].clone();
        let child = spawn(&self.nodes[i].data, &listen, join, &self.extra);
        self.nodes[i].child = Some(child);
        read_addr(&self.nodes[i].data);
    }

    /// Wait until the ring is formed: every live node's `cfs ring` walk lists exactly the
    /// live nodes, and every vnode's predecessor and successor list match the id order.
    pub fn wait_ring(&self, deadline: Duration) {
        let mut want: Vec<String> = self.addrs().iter().map(|a| a.to_string()).collect();
        want.sort();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let end = Instant::now() + deadline;
        eventually(
            deadline + Duration::from_secs(1),
            "every node to see the whole ring",
            || {
                if Instant::now() > end {
                    panic!(
                        "the ring did not form in {deadline:?}; what each node holds:\n{}",
                        rt.block_on(self.neighbours_seen())
                    );
                }
                for a in self.addrs() {
                    let out = cfs(&["ring", "--node", &a.to_string()]);
                    if !out.status.success() {
                        return None;
                    }
                    let mut got: Vec<String> = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(|l| l.split(' ').nth(1).unwrap_or("").to_string())
                        .collect();
                    got.sort();
                    got.dedup();
                    if got != want {
                        return None;
                    }
                }
                rt.block_on(self.neighbours_consistent())
            },
        );
    }

    /// Each vnode's predecessor and successors, for a failure message.
    async fn neighbours_seen(&self) -> String {
        let c = cfs_net::client::Client::tcp(self.addrs()[0]);
        let mut seen = String::new();
        for a in self.addrs() {
            match c.status(a).await {
                Ok(s) => {
                    for v in &s.vnodes {
                        seen += &format!(
                            "{a} vnode {}: pred {:?}, succs {:?}\n",
                            v.me.addr,
                            v.pred.map(|p| p.addr),
                            v.succs.iter().map(|s| s.addr).collect::<Vec<_>>()
                        );
                    }
                }
                Err(e) => seen += &format!("{a}: status failed: {e}\n"),
            }
        }
        seen
    }

    async fn neighbours_consistent(&self) -> Option<()> {
        let c = cfs_net::client::Client::tcp(self.addrs()[0]);
        let mut statuses = Vec::new();
        for a in self.addrs() {
            statuses.push(c.status(a).await.ok()?);
        }
        let mut ring: Vec<cfs_core::NodeRef> = statuses
            .iter()
            .flat_map(|s| s.vnodes.iter().map(|v| v.me))
            .collect();
        ring.sort_by_key(|n| n.id);
        let n = ring.len();
        for s in &statuses {
            for v in &s.vnodes {
                let i = ring.iter().position(|x| *x == v.me)?;
                if n > 1 && v.pred != Some(ring[(i + n - 1) % n]) {
                    return None;
                }
                let k = v.succs.len().min(n - 1).max(1);
                let want: Vec<_> = (1..=k).map(|d| ring[(i + d) % n]).collect();
                if v.succs[..k] != want[..] || (n > 1 && v.succs.len() < (n - 1).min(16)) {
                    return None;
                }
            }
        }
        Some(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
