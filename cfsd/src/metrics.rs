//! What a node counts. Plain atomics; exported in `cfs status --json` and Prometheus text.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        #[derive(Default, Debug)]
        pub struct Metrics { $(pub $name: AtomicU64,)* }
        impl Metrics {
            pub fn snapshot(&self) -> Vec<(String, u64)> {
                vec![$((stringify!($name).to_string(), self.$name.load(Ordering::Relaxed)),)*]
            }
            pub fn help(name: &str) -> &'static str {
                match name { $(stringify!($name) => $help,)* _ => "" }
            }
        }
    };
}

counters! {
    lookups_served: "lookup steps answered",
    lookups_done: "lookups this node made",
    lookup_hops: "hops of lookups this node made",
    gets_served: "block gets answered",
    gets_missed: "block gets answered with not found",
    puts_stored: "blocks newly stored",
    puts_present: "puts of blocks already held",
    cache_hits: "gets and lookup steps answered from the path cache",
    cache_misses: "cache lookups that missed",
    cache_inserts: "blocks accepted into the path cache",
    cache_refused: "path cache offers refused (not routed for that requester, over rate, or less popular than what they would evict)",
    refused_invalid: "blocks refused for a bad hash, signature or collision",
    refused_stale: "root puts refused as older or conflicting",
    refused_quota: "puts refused over quota (space-time, or what the source holds at once)",
    transfers_free: "copies a checked neighbour pushed past its payer's room that another holder confirmed, charged to the pushing network's allowance",
    transfers_unconfirmed: "copies a checked neighbour pushed past its payer's room that no other holder confirmed (or past the allowance): charged to the pusher if it named a source, else refused",
    transfers_charged_to_source: "blocks pushed by a checked neighbour and charged to the source it named (who paid for its copy), not to the neighbour",
    refused_input: "connections closed for bad frames or limits",
    refused_requests: "requests refused as malformed",
    conns_evicted: "connections closed to make room for new ones (least recently active of the busiest source)",
    slow_frames: "connections closed for sending a frame too slowly or not reading replies at the minimum rate",
    replies_busy: "requests answered Busy because the in-flight budget had no room for their reply",
    rectify_dropped: "rectify candidates ignored (not between predecessor and us, or superseded)",
    claims_refused: "successor-list entries refused (invalid, out of order, or not answering a ping)",
    store_repaired: "1 when the block store had not been closed cleanly (a crash or kill) and was repaired when this process opened it",
    drops_deferred: "hand-offs of copies not done this round (grace period, own view disagrees, or a holder did not serve verified bytes)",
    repairs_sent: "blocks pushed to replicas by maintenance",
    handoffs_dropped: "blocks dropped after their replicas confirmed holding them",
    stabilize_rounds: "stabilize rounds",
    maintain_rounds: "maintenance rounds (sweep, repairs, lease sync, hand-offs) finished",
    scrubbed: "blocks re-verified by the scrub",
    scrub_corrupt: "blocks the scrub found corrupt and dropped",
    refused_full: "puts of new blocks refused because the store is at its capacity",
    leases_renewed: "leases extended by renewals (no bytes sent)",
    leases_synced: "replicas whose shorter lease maintenance extended to this node's",
    expired_blocks: "blocks removed by the sweep because their lease ended",
    expired_bytes: "bytes of blocks removed by the sweep because their lease ended",
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition of the counters plus the given gauges.
    pub fn prometheus(&self, gauges: &[(&str, u64)]) -> String {
        let mut out = String::new();
        for (name, v) in self.snapshot() {
            out.push_str(&format!(
                "# HELP cfs_{name} {}\n# TYPE cfs_{name} counter\ncfs_{name} {v}\n",
                Metrics::help(&name)
            ));
        }
        for (name, v) in gauges {
            out.push_str(&format!("# TYPE cfs_{name} gauge\ncfs_{name} {v}\n"));
        }
        out
    }
}
