//! What the testnet tests share: a testnet spec of their own (named for this process, its
//! directory in a fresh temp dir) and its teardown, which runs when the guard drops, also
//! when a test fails.

use cfs_lab::testnet::{DownGuard, Spec};
use cfs_tests::bin;
use cfs_tests::tree::TempDir;

/// A spec of `hosts` hosts in 198.18.`subnet`.0/24, port 4000, this build's `cfsd` with
/// `cfsd_args`, no link limits; the temp dir and the guard that takes it down. Keep
/// the guard alive as long as the testnet: it is declared before it, so it drops after.
pub fn spec(tag: &str, hosts: usize, subnet: u8, cfsd_args: &[&str]) -> (TempDir, DownGuard, Spec) {
    let tmp = TempDir::new(tag);
    let name = format!("{}{}", &tag[..1], std::process::id());
    let dir = tmp.path().join("net");
    let guard = DownGuard {
        name: name.clone(),
        dir: dir.clone(),
    };
    let spec = Spec {
        name,
        hosts,
        subnet,
        port: 4000,
        dir,
        cfsd: bin("cfsd"),
        cfsd_args: cfsd_args.iter().map(|s| s.to_string()).collect(),
        rate: None,
        disk_mb: None,
        wan: None,
    };
    (tmp, guard, spec)
}
