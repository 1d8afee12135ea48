//! A chaos scenario: how long, how big a ring, and a schedule of faults, from flags
//! (`--kill-every 5s`) or a small TOML file.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario file does not parse: {0}")]
    Toml(String),
    #[error("fault {index}: {msg}")]
    Fault { index: usize, msg: String },
    #[error(transparent)]
    Unit(#[from] cfs_core::units::UnitError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    Kill,
    Pause,
    Restart,
    Replace,
    Partition,
    Cap,
    /// Fill a host's disk (a testnet with its own disks).
    Fill,
    /// A node that answers, but late: on loopback stopped and resumed in short cycles,
    /// on a testnet its link capped to a few kbit/s.
    Slow,
}

/// One fault as written in a scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// When, from the start (`5s`).
    pub at: String,
    pub kind: FaultKind,
    /// Node number (from 1), or none for a random live one.
    pub node: Option<usize>,
    /// Undo after this long (kill: restart; pause: resume; partition: heal; cap: uncap;
    /// fill: empty; slow: back to speed).
    #[serde(rename = "for")]
    pub hold: Option<String>,
    /// Partition groups of node numbers.
    pub groups: Option<Vec<Vec<usize>>>,
    /// Link rate for `cap` (tc syntax).
    pub rate: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub duration: Option<String>,
    pub nodes: Option<usize>,
    pub replicas: Option<usize>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

/// A fault ready to run: times in seconds, nodes as indexes (None: random live one).
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub at: f64,
    pub kind: FaultKind,
    pub node: Option<usize>,
    pub hold: Option<f64>,
    pub groups: Vec<Vec<usize>>,
    pub rate: Option<String>,
}

/// `500ms`, `2s`, `1m` in seconds.
pub fn parse_secs(s: &str) -> Result<f64, ScenarioError> {
    secs(s)
}

fn secs(s: &str) -> Result<f64, ScenarioError> {
    // Sub-second precision: `500ms` as well as the usual units.
    if let Some(ms) = s.trim().strip_suffix("ms") {
        if let Ok(n) = ms.parse::<u64>() {
            return Ok(n as f64 / 1000.0);
        }
    }
    Ok(cfs_core::units::parse_duration(s)? as f64)
}

impl ScenarioFile {
    pub fn parse(text: &str) -> Result<ScenarioFile, ScenarioError> {
        toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))
    }

    /// The faults, checked against a ring of `nodes`, in time order.
    pub fn faults(&self, nodes: usize) -> Result<Vec<Fault>, ScenarioError> {
        let mut out = Vec::new();
        for (index, f) in self.faults.iter().enumerate() {
            let bad = |msg: String| ScenarioError::Fault {
                index: index + 1,
                msg,
            };
            let check = |n: usize| {
                if n == 0 || n > nodes {
                    Err(bad(format!("no node {n} (nodes are 1 to {nodes})")))
                } else {
                    Ok(n - 1)
                }
            };
            let node = f.node.map(check).transpose()?;
            let mut groups = Vec::new();
            for g in f.groups.iter().flatten() {
                groups.push(g.iter().map(|&n| check(n)).collect::<Result<Vec<_>, _>>()?);
            }
            if f.kind == FaultKind::Partition && groups.len() < 2 {
                return Err(bad(
                    "a partition needs `groups` with two or more groups".into()
                ));
            }
            if f.kind == FaultKind::Cap && f.rate.is_none() {
                return Err(bad("a cap needs a `rate` (e.g. \"10mbit\")".into()));
            }
            out.push(Fault {
                at: secs(&f.at)?,
                kind: f.kind,
                node,
                hold: f.hold.as_deref().map(secs).transpose()?,
                groups,
                rate: f.rate.clone(),
            });
        }
        out.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(out)
    }
}

/// The common case as flags: kill a random node every `every` seconds, each back after
/// `down_for`, until `duration`.
pub fn kill_every(every: f64, down_for: f64, duration: f64) -> Vec<Fault> {
    let mut out = Vec::new();
    let mut t = every;
    while t < duration {
        out.push(Fault {
            at: t,
            kind: FaultKind::Kill,
            node: None,
            hold: Some(down_for),
            groups: Vec::new(),
            rate: None,
        });
        t += every;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_file_parses_and_is_checked() {
        let s = ScenarioFile::parse(
            r#"
            duration = "40s"
            nodes = 5
            [[fault]]
            at = "10s"
            kind = "partition"
            groups = [[1, 2, 3], [4, 5]]
            for = "5s"
            [[fault]]
            at = "2s"
            kind = "kill"
            node = 2
            for = "500ms"
            "#,
        )
        .unwrap();
        let f = s.faults(5).unwrap();
        assert_eq!(f[0].kind, FaultKind::Kill);
        assert_eq!((f[0].at, f[0].node, f[0].hold), (2.0, Some(1), Some(0.5)));
        assert_eq!(f[1].groups, vec![vec![0, 1, 2], vec![3, 4]]);
        assert!(s.faults(4).is_err(), "node 5 of 4");
        assert!(ScenarioFile::parse("[[fault]]\nat = \"1s\"\nkind = \"melt\"").is_err());
        assert_eq!(kill_every(5.0, 2.0, 16.0).len(), 3);
    }
}
