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
    refused_invalid: "blocks refused for a bad hash, signature or collision",
    refused_stale: "root puts refused as older or conflicting",
    refused_quota: "puts refused over quota",
    refused_input: "connections closed for bad frames or limits",
    refused_requests: "requests refused as malformed",
    repairs_sent: "blocks pushed to replicas by maintenance",
    handoffs_dropped: "blocks dropped after their replicas confirmed holding them",
    stabilize_rounds: "stabilize rounds",
    scrubbed: "blocks re-verified by the scrub",
    scrub_corrupt: "blocks the scrub found corrupt and dropped",
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
