//! `cfs keep`: renew a tree's leases from the command line, with a progress bar and a
//! receipt (the walk itself is `cfs_tree::keep`, shared with `cfsd --keep`).

use anyhow::{bail, Context, Result};
use cfs_net::client::Client;
use cfs_tree::keep::{keep, KeepReceipt, Versions};
use std::io::IsTerminal;

#[derive(clap::Args, Debug)]
pub struct KeepArgs {
    /// The tree (its FSID).
    fsid: String,
    #[command(flatten)]
    pub node: crate::NodeArg,
    /// Keep the newest N versions.
    #[arg(long, conflicts_with = "since")]
    versions: Option<u64>,
    /// Keep every version published since DATE (YYYY-MM-DD, UTC, or unix seconds).
    #[arg(long, value_parser = cfs_core::units::date_arg)]
    since: Option<u64>,
    /// Renew to this lease (30d, 12h, 90s); nodes cap it at their maximum.
    #[arg(long, default_value = "30d", value_parser = cfs_core::units::duration_arg)]
    pub lease: u64,
    /// Renew nothing: report what the kept versions reach and what only older ones do.
    #[arg(long)]
    dry_run: bool,
    /// Print the receipt as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

pub async fn run(client: Client, args: KeepArgs) -> Result<()> {
    let fsid = crate::parse_key(&args.fsid)?;
    let versions = match (args.versions, args.since) {
        (_, Some(t)) => Versions::Since(t),
        (Some(0), _) => bail!("--versions must be 1 or more"),
        (Some(n), _) => Versions::Last(n),
        (None, None) => Versions::Last(1),
    };
    let pb = if !args.quiet && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = |r: &KeepReceipt| {
        pb.set_message(format!(
            "{} blocks walked, {} copies renewed, {} already leased",
            r.blocks, r.renewed, r.already
        ));
        pb.tick();
    };
    let r = keep(&client, fsid, versions, args.lease, args.dry_run, &progress)
        .await
        .with_context(|| format!("keeping {fsid}"))?;
    pb.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "fsid": fsid.to_hex(),
                "dry_run": args.dry_run,
                "lease_secs": args.lease,
                "versions": r.versions,
                "blocks": r.blocks,
                "bytes": r.bytes,
                "renewed": r.renewed,
                "already": r.already,
                "under_replicated": r.under_replicated,
                "short": r.short,
                "refused": r.refused,
                "old_versions": r.old_versions,
                "old_only_blocks": r.old_only_blocks,
                "old_only_bytes": r.old_only_bytes,
                "secs": r.secs,
            })
        );
    } else if args.dry_run {
        println!(
            "versions {:?}: {} blocks, {} reachable",
            r.versions,
            r.blocks,
            mib(r.bytes)
        );
        println!(
            "older versions {:?}: {} blocks, {} only they reach (these expire unless kept)",
            r.old_versions,
            r.old_only_blocks,
            mib(r.old_only_bytes)
        );
    } else {
        println!(
            "kept versions {:?} of {fsid} for {} s: {} blocks ({}), {} copies renewed, {} already leased, in {:.1} s",
            r.versions,
            args.lease,
            r.blocks,
            mib(r.bytes),
            r.renewed,
            r.already,
            r.secs
        );
        if r.under_replicated > 0 {
            println!(
                "{} blocks have fewer than {} replicas now; the ring's maintenance repairs them",
                r.under_replicated, client.replicas
            );
        }
        if r.short > 0 {
            println!(
                "{} blocks could not be leased that long on every replica: {}",
                r.short,
                r.refused
                    .as_deref()
                    .unwrap_or("the node's maximum lease is shorter")
            );
        }
    }
    Ok(())
}
