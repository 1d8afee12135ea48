//! The mount helper form, so cfs can go in fstab or a systemd mount unit:
//! `mount -t fuse.cfs FSID DIR -o node=HOST:PORT[,version=V][,allow_other]` makes
//! mount.fuse3 run `cfs FSID DIR -o OPTIONS`. We start `cfs mount` in the background and
//! return once the mount is live, or print the error it died with.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `cfs FSID DIR -o OPTS` (what mount.fuse3 runs), as opposed to a subcommand.
pub fn is_helper_call(args: &[String]) -> bool {
    args.len() >= 3
        && args[1].len() == 40
        && args[1].chars().all(|c| c.is_ascii_hexdigit())
        && args.iter().any(|a| a == "-o")
}

/// How long the helper waits for the mount to come up.
const MOUNT_WAIT: Duration = Duration::from_secs(30);

pub fn run(args: &[String]) -> Result<()> {
    let (fsid, dir) = (&args[1], &args[2]);
    let mut opts = Vec::new();
    let mut i = 3;
    while i < args.len() {
        if args[i] == "-o" {
            let o = args.get(i + 1).ok_or_else(|| anyhow!("-o needs options"))?;
            opts.extend(o.split(',').map(str::to_string));
            i += 2;
        } else {
            i += 1;
        }
    }
    let mut cmd_args = vec!["mount".to_string(), fsid.clone(), dir.clone()];
    let mut node = std::env::var("CFS_NODE").ok();
    for o in &opts {
        let (k, v) = o.split_once('=').unwrap_or((o.as_str(), ""));
        match k {
            "node" => node = Some(v.to_string()),
            "version" => cmd_args.extend(["--version".into(), v.to_string()]),
            "poll" => cmd_args.extend(["--poll".into(), v.to_string()]),
            "allow_other" => cmd_args.push("--allow-other".into()),
            // Options for mount(8) and systemd, and ones a read-only mount always has.
            "_netdev" | "nofail" | "noauto" | "auto" | "defaults" | "ro" | "rw" | "nosuid"
            | "nodev" | "user" | "users" | "dev" | "suid" | "exec" | "noexec" => {}
            k if k.starts_with("x-") => {}
            other => bail!("unknown mount option {other:?} for cfs (known: node=, version=, poll=, allow_other)"),
        }
    }
    let node = node.ok_or_else(|| anyhow!("give the ring node with -o node=HOST:PORT"))?;
    cmd_args.extend(["--node".into(), node]);
    let log = std::env::temp_dir().join(format!("cfs-mount-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).context("creating the mount log")?;
    let exe = std::env::current_exe().context("finding the cfs binary")?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(exe);
        c.args(&cmd_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // Its own session: the mount outlives the helper and the shell that ran mount(8).
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        c.spawn().context("starting cfs mount")?
    };
    let end = Instant::now() + MOUNT_WAIT;
    loop {
        if let Some(st) = child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            bail!("cfs mount exited ({st}): {}", msg.trim());
        }
        if is_mounted(Path::new(dir)) {
            let _ = std::fs::remove_file(&log);
            return Ok(());
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("the mount did not come up within {MOUNT_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_mounted(p: &Path) -> bool {
    let Ok(p) = p.canonicalize() else {
        return false;
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == p.to_str().as_ref() && l.contains(" cfs:")
    })
}
