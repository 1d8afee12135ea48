//! A ring member's maintenance push, forged by hand for tests of what a neighbour may
//! store free of quota (run inside a testnet host, so it speaks from that host's address).
//! `push-transfer TO junk N SIZE`: N blocks of random bytes nobody else holds.
//! `push-transfer TO copy FROM KEY...`: blocks read from node FROM, pushed as they are.
//! Prints one line per block: `stored`, `held`, or the node's error.

use cfs_core::block::BlockKind;
use cfs_core::wire::{Request, Response, WireBlock};
use cfs_core::Id;
use cfs_tests::hostile::call_once;
use std::net::SocketAddr;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: push-transfer TO (junk N SIZE | copy FROM KEY...)";
    let to: SocketAddr = args.first().and_then(|a| a.parse().ok()).expect(usage);
    let t = Duration::from_secs(20);
    let blocks: Vec<WireBlock> = match args.get(1).map(String::as_str) {
        Some("junk") => {
            let n: usize = args[2].parse().expect(usage);
            let size: usize = args[3].parse().expect(usage);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            (0..n)
                .map(|i| {
                    let mut bytes = format!("junk {nanos} {i} ")
                        .repeat(size / 8 + 1)
                        .into_bytes();
                    bytes.truncate(size);
                    wire_block(bytes)
                })
                .collect()
        }
        Some("copy") => {
            let from: SocketAddr = args[2].parse().expect(usage);
            args[3..]
                .iter()
                .map(|k| {
                    let key: Id = k.parse().expect("a block key in hex");
                    let got = call_once(
                        from,
                        Request::Get {
                            kind: BlockKind::Data,
                            key,
                        },
                        t,
                    );
                    match got {
                        Ok(Ok(Response::Block(Some(bytes)))) => wire_block(bytes),
                        other => panic!("{from} did not give block {k}: {other:?}"),
                    }
                })
                .collect()
        }
        _ => panic!("{usage}"),
    };
    // In requests that fit a frame.
    let mut batches: Vec<Vec<WireBlock>> = vec![Vec::new()];
    let mut bytes = 0;
    for b in blocks {
        if bytes + b.bytes.len() > 768 << 10 && !batches.last().unwrap().is_empty() {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += b.bytes.len();
        batches.last_mut().unwrap().push(b);
    }
    for blocks in batches {
        let resp = call_once(
            to,
            Request::PutMany {
                blocks,
                transfer: true,
            },
            t,
        )
        .expect("the node answers");
        match resp {
            Ok(Response::StoredMany(answers)) => {
                for a in answers {
                    match a {
                        Ok(true) => println!("stored"),
                        Ok(false) => println!("held"),
                        Err(e) => println!("{e}"),
                    }
                }
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
}

fn wire_block(bytes: Vec<u8>) -> WireBlock {
    WireBlock {
        kind: BlockKind::Data,
        key: Id::hash(&bytes),
        bytes,
        lease: 3600,
        source: None,
    }
}
