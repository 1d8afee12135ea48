//! The least work any cfs reader must do to read a file cold, without cfs: the bytes
//! cross a socket from the process that stores them (a node is another process, run by
//! someone else) and the reader SHA-1s every block before it uses it. Here the "node" is
//! a thread that sends the file with sendfile (no copy in user space, better than any
//! store can do), and the reader receives blocks into reused buffers and hashes them on
//! every core: no lookups, no protocol, no cache, no FUSE. The benchmarks run it beside
//! their baseline's own read (`cat` through bindfs, `curl` from rclone), so the time of
//! both together is a floor under what cfs can reach on this machine.
//!
//!   cargo run --release --example floor -- FILE [BLOCK_BYTES]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: floor FILE [BLOCK_BYTES]"))?;
    let block: usize = match args.next() {
        Some(b) => b.parse()?,
        None => cfs_core::fs::BLOCK_SIZE,
    };
    let file = std::fs::File::open(&path)?;
    let len = file.metadata()?.len();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (sock, _) = listener.accept()?;
        let mut off: libc::off_t = 0;
        while (off as u64) < len {
            let left = (len - off as u64).min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the call; `off` is a valid pointer.
            let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
            if n <= 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    });

    let mut sock = TcpStream::connect(addr)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (to_hash, jobs) = mpsc::sync_channel::<Vec<u8>>(workers * 2);
    let (to_reuse, free) = mpsc::channel::<Vec<u8>>();
    let jobs = Arc::new(Mutex::new(jobs));
    let hashers: Vec<_> = (0..workers)
        .map(|_| {
            let (jobs, to_reuse) = (jobs.clone(), to_reuse.clone());
            std::thread::spawn(move || {
                let mut x = 0u8;
                loop {
                    // The guard goes before the hash, so the threads hash at once.
                    let Ok(b) = jobs.lock().unwrap().recv() else {
                        break;
                    };
                    x ^= cfs_core::Id::hash(&b).0[0];
                    let _ = to_reuse.send(b);
                }
                x
            })
        })
        .collect();
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(block);
        let mut b = free.try_recv().unwrap_or_default();
        b.resize(n, 0);
        sock.read_exact(&mut b)?;
        to_hash.send(b)?;
        left -= n;
    }
    drop(to_hash);
    let x = hashers.into_iter().fold(0, |x, h| x ^ h.join().unwrap());
    sender.join().unwrap()?;
    println!("{len} bytes received and hashed on {workers} threads ({x:02x})");
    Ok(())
}
