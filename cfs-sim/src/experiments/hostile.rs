//! A fraction of the ring turns hostile: what honest nodes still find and read.

use super::*;

#[derive(Clone, Debug, Serialize)]
pub struct HostileReport {
    pub experiment: &'static str,
    pub nodes: usize,
    pub hostile: usize,
    pub replicas: usize,
    pub seed: u64,
    /// Lookups of random keys from honest nodes.
    pub lookups: usize,
    /// Fraction that ended at the key's true successor (which may itself be hostile).
    pub lookups_true_successor: f64,
    /// Fraction that returned an error (no verifiable answer within the deadline).
    pub lookups_failed: f64,
    /// Failed lookups by error (first words of its message).
    pub lookup_errors: BTreeMap<String, usize>,
    pub mean_hops: f64,
    /// Blocks put before the nodes turned hostile, read back from honest nodes.
    pub blocks: usize,
    pub blocks_readable: f64,
    /// Blocks whose r replicas were all hostile (unreadable by any defence).
    pub blocks_all_replicas_hostile: usize,
    #[serde(flatten)]
    pub run: RunStats,
}

/// A fraction `frac` of the ring turns hostile after blocks are stored: those nodes claim
/// every key in their lookup answers, withhold every block, and drop puts and cache offers.
/// Measured from honest nodes: lookups that still end at the true successor, and blocks
/// that can still be read.
pub fn hostile(
    c: &Common,
    nodes: usize,
    frac: f64,
    count: usize,
    blocks: usize,
) -> Result<HostileReport, SimError> {
    check(nodes >= 2, "--nodes must be at least 2")?;
    check((0.0..1.0).contains(&frac), "--hostile must be in [0, 1)")?;
    let r = c.node.replicas;
    run(async {
        let mut sim = Sim::new(c.net(), c.node.clone());
        sim.grow(nodes, c.plan).await?;
        let (keys, _) = put_blocks(&mut sim, blocks, 64, c.seed).await;
        sim.rounds(2).await;
        let holders = sim.holders();
        let mut live = sim.live();
        live.shuffle(&mut sim.rng);
        let k = (frac * nodes as f64).round() as usize;
        let bad: std::collections::BTreeSet<usize> = live[..k].iter().copied().collect();
        let honest: Vec<usize> = live[k..].to_vec();
        sim.net.set_hostile(bad.iter().copied());
        let truth = sim.truth();
        let mut handles = Vec::new();
        for j in 0..count {
            let s = honest[sim.rng.random_range(0..honest.len())];
            let key = random_id(&mut sim.rng);
            let want = truth.successor(key);
            let node = sim.node(s).clone();
            let delay = Duration::from_millis(1) * j as u32;
            handles.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                match node.lookup_from(0, key, None).await {
                    Ok(l) => (
                        true,
                        l.succs.first().copied() == want,
                        l.hops,
                        String::new(),
                    ),
                    Err(e) => (false, false, 0, e.to_string()),
                }
            }));
        }
        let mut res = Vec::new();
        for h in handles {
            if let Ok(x) = h.await {
                res.push(x);
            }
        }
        let failed_reads = gets_from(&mut sim, &keys, Duration::from_millis(1), r, |sim| {
            Some(honest[sim.rng.random_range(0..honest.len())])
        })
        .await;
        let readable = keys.len() - failed_reads;
        let all_bad = keys
            .iter()
            .filter(|k| {
                holders
                    .get(*k)
                    .is_some_and(|h| h.iter().all(|i| bad.contains(i)))
            })
            .count();
        let n = res.len().max(1) as f64;
        let hops: Vec<f64> = res.iter().filter(|x| x.0).map(|x| x.2 as f64).collect();
        let mut lookup_errors = BTreeMap::new();
        for x in res.iter().filter(|x| !x.0) {
            // "lookup of KEY failed: no live node answered (...)": keep what follows the key.
            let why = x.3.splitn(4, ' ').nth(3).unwrap_or(&x.3);
            let why: String = why.chars().take(60).collect();
            *lookup_errors.entry(why).or_default() += 1;
        }
        Ok(HostileReport {
            experiment: "hostile",
            nodes,
            hostile: k,
            replicas: r,
            seed: c.seed,
            lookups: res.len(),
            lookups_true_successor: r4(res.iter().filter(|x| x.1).count() as f64 / n),
            lookups_failed: r4(res.iter().filter(|x| !x.0).count() as f64 / n),
            lookup_errors,
            mean_hops: r4(mean(&hops)),
            blocks: keys.len(),
            blocks_readable: r4(readable as f64 / keys.len().max(1) as f64),
            blocks_all_replicas_hostile: all_bad,
            run: finish(sim),
        })
    })?
}
