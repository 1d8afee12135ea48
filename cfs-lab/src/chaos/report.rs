//! What a chaos run observed and the report made of it: per second, per fault, in all;
//! printed, as JSON and as an SVG timeline (Jepsen-style: fault bands over reads,
//! latency and blocks below r).

use serde::Serialize;
use std::fmt::Write;

/// One verified read (or its failure).
#[derive(Clone, Debug, Serialize)]
pub struct Read {
    /// Seconds from the start when the read began and how long it took.
    pub t: f64,
    pub ms: f64,
    pub ok: bool,
    pub bytes: u64,
    /// The version read (0 if the root could not be read).
    pub version: u64,
    /// Wrong bytes (a verified block in the wrong place would be a bug, not a fault).
    pub wrong: bool,
    pub error: Option<String>,
}

/// One census of the newest version's blocks.
#[derive(Clone, Debug, Serialize)]
pub struct Census {
    pub t: f64,
    pub blocks: u64,
    pub below_r: u64,
    /// Blocks no node holds.
    pub missing: u64,
    pub missing_bytes: u64,
}

/// A fault as it ran.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRun {
    pub t: f64,
    pub kind: String,
    /// Nodes (from 1) it hit.
    pub nodes: Vec<usize>,
    /// A partition's groups (nodes from 1); empty for other faults.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Vec<usize>>,
    /// When it was undone, if it was.
    pub until: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Second {
    pub t: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub below_r: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultStats {
    #[serde(flatten)]
    pub fault: FaultRun,
    /// Reads begun from this fault until the next one (or the end) that failed.
    pub reads: u64,
    pub reads_failed: u64,
    /// The longest time in that window with no read completing successfully.
    pub longest_stall_s: f64,
    /// p99 latency of the reads begun while the fault held (from it until it was
    /// undone, or one second for faults without an undo), in ms.
    pub p99_in_ms: f64,
    /// From the fault until every block of the newest version was on r replicas again:
    /// 0 if none fell below r in its window, None if not back within the run.
    pub back_to_r_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: String,
    /// How readers read: "mount" or "library".
    pub readers: String,
    pub nodes: usize,
    pub replicas: usize,
    pub duration_s: f64,
    pub fsid: String,
    pub versions_published: u64,
    pub reads: u64,
    pub reads_failed: u64,
    pub bytes_verified: u64,
    pub wrong_reads: u64,
    /// A reader saw a version older than one it had seen.
    pub version_regressions: u64,
    /// Blocks of the newest version no node held at the end, and their bytes.
    pub lost_blocks: u64,
    pub lost_bytes: u64,
    pub faults: Vec<FaultStats>,
    /// p99 latency of the reads begun while no fault held, in ms.
    pub p99_outside_ms: f64,
    /// The longest time between two successful reads while no fault held: what a stall
    /// is to be compared with where reads themselves take long (the wide area).
    pub stall_outside_s: f64,
    /// The readers' requests to the ring and, of those, the ones hedging added (a holder
    /// given up past its delay for another), when the readers could tell.
    pub requests: Option<u64>,
    pub hedged: Option<u64>,
    pub seconds: Vec<Second>,
    /// "ok", or why not.
    pub verdict: String,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Longest span within [from, to) with no successful read completing.
fn longest_stall(done: &[f64], from: f64, to: f64) -> f64 {
    let mut last = from;
    let mut worst = 0f64;
    for &d in done.iter().filter(|&&d| d >= from && d < to) {
        worst = worst.max(d - last);
        last = d;
    }
    worst.max(to - last)
}

pub struct Observed {
    pub reads: Vec<Read>,
    pub census: Vec<Census>,
    pub faults: Vec<FaultRun>,
    pub versions_published: u64,
    pub version_regressions: u64,
}

/// When fault `f` held: from it until it was undone (a second for faults that are not).
fn held(f: &FaultRun) -> (f64, f64) {
    (f.t, f.until.unwrap_or(f.t + 1.0).max(f.t + 1.0))
}

#[allow(clippy::too_many_arguments)]
pub fn build(
    mode: &str,
    nodes: usize,
    replicas: usize,
    duration: f64,
    fsid: String,
    max_stall: Option<f64>,
    o: Observed,
) -> Report {
    let ms_of = |pick: &dyn Fn(&Read) -> bool| {
        let mut ms: Vec<f64> = o
            .reads
            .iter()
            .filter(|r| r.ok && pick(r))
            .map(|r| r.ms)
            .collect();
        ms.sort_by(f64::total_cmp);
        percentile(&ms, 99.0)
    };
    let in_any = |r: &Read| {
        o.faults.iter().any(|f| {
            let (a, b) = held(f);
            r.t >= a && r.t < b
        })
    };
    let p99_outside_ms = ms_of(&|r| !in_any(r));
    let mut done: Vec<f64> = o
        .reads
        .iter()
        .filter(|r| r.ok)
        .map(|r| r.t + r.ms / 1000.0)
        .collect();
    done.sort_by(f64::total_cmp);
    // Reads begun just as the run stopped fall in a last second of their own.
    let last_read = o.reads.iter().map(|r| r.t).fold(0.0, f64::max);
    let secs = duration.max(last_read + 1e-9).ceil() as u64;
    let seconds = (0..secs)
        .map(|t| {
            let in_sec: Vec<&Read> = o
                .reads
                .iter()
                .filter(|r| r.t >= t as f64 && r.t < (t + 1) as f64)
                .collect();
            let mut ms: Vec<f64> = in_sec.iter().filter(|r| r.ok).map(|r| r.ms).collect();
            ms.sort_by(f64::total_cmp);
            let below = o
                .census
                .iter()
                .filter(|c| c.t >= t as f64 && c.t < (t + 1) as f64)
                .map(|c| c.below_r)
                .max();
            Second {
                t,
                reads_ok: in_sec.iter().filter(|r| r.ok).count() as u64,
                reads_failed: in_sec.iter().filter(|r| !r.ok).count() as u64,
                p50_ms: percentile(&ms, 50.0),
                p99_ms: percentile(&ms, 99.0),
                below_r: below,
            }
        })
        .collect();
    // Between faults: the gaps between reads completing, not the run's edges.
    let mut spans: Vec<(f64, f64)> = o.faults.iter().map(held).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut free = Vec::new();
    let mut from = 0.0f64;
    for (a, b) in spans.iter().copied().chain([(duration, duration)]) {
        if a > from {
            free.push((from, a));
        }
        from = from.max(b);
    }
    let stall_outside_s = free
        .iter()
        .map(|&(a, b)| {
            let inside: Vec<f64> = done.iter().copied().filter(|&d| d >= a && d < b).collect();
            inside.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
        })
        .fold(0.0, f64::max);
    let faults: Vec<FaultStats> = o
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let end = o.faults.get(i + 1).map_or(duration, |n| n.t).max(f.t);
            let window: Vec<&Read> = o.reads.iter().filter(|r| r.t >= f.t && r.t < end).collect();
            // From the fault: 0 if no census in its window saw a block below r, else the
            // first census after the first such one that saw none.
            let first_low = o
                .census
                .iter()
                .find(|c| c.t >= f.t && c.t < end && c.below_r > 0);
            let back = match first_low {
                None => Some(0.0),
                Some(low) => o
                    .census
                    .iter()
                    .find(|c| c.t > low.t && c.below_r == 0)
                    .map(|c| c.t - f.t),
            };
            FaultStats {
                fault: f.clone(),
                reads: window.len() as u64,
                reads_failed: window.iter().filter(|r| !r.ok).count() as u64,
                longest_stall_s: longest_stall(&done, f.t, end),
                p99_in_ms: {
                    let (a, b) = held(f);
                    ms_of(&|r| r.t >= a && r.t < b)
                },
                back_to_r_s: back,
            }
        })
        .collect();
    let last = o.census.last();
    let lost_blocks = last.map_or(0, |c| c.missing);
    let lost_bytes = last.map_or(0, |c| c.missing_bytes);
    let wrong = o.reads.iter().filter(|r| r.wrong).count() as u64;
    let mut why = Vec::new();
    if lost_blocks > 0 {
        why.push(format!("{lost_blocks} blocks ({lost_bytes} bytes) lost"));
    }
    if wrong > 0 {
        why.push(format!("{wrong} reads returned wrong bytes"));
    }
    if o.version_regressions > 0 {
        why.push(format!(
            "{} reads saw an older version than before",
            o.version_regressions
        ));
    }
    if o.reads.iter().all(|r| !r.ok) {
        why.push("no read succeeded".into());
    }
    if let Some(max) = max_stall {
        for f in faults.iter().filter(|f| f.longest_stall_s > max) {
            why.push(format!(
                "{} at {:.1} s stalled reads {:.2} s (--max-stall {:.2} s)",
                f.fault.kind, f.fault.t, f.longest_stall_s, max
            ));
        }
    }
    Report {
        mode: mode.into(),
        readers: String::new(),
        nodes,
        replicas,
        duration_s: duration,
        fsid,
        versions_published: o.versions_published,
        reads: o.reads.len() as u64,
        reads_failed: o.reads.iter().filter(|r| !r.ok).count() as u64,
        bytes_verified: o.reads.iter().filter(|r| r.ok).map(|r| r.bytes).sum(),
        wrong_reads: wrong,
        version_regressions: o.version_regressions,
        lost_blocks,
        lost_bytes,
        faults,
        p99_outside_ms,
        stall_outside_s,
        requests: None,
        hedged: None,
        seconds,
        verdict: if why.is_empty() {
            "ok".into()
        } else {
            why.join("; ")
        },
    }
}

/// Height of a row of fault labels in the timeline.
const LABEL_ROW: f64 = 11.0;
/// Width of a character of the timeline's 11 px sans-serif, a little generous.
const CHAR_W: f64 = 6.5;

/// A row for each label (its start x and length in characters, in time order): the
/// first row whose last label ends before this one starts.
fn label_rows(labels: &[(f64, usize)]) -> Vec<usize> {
    let mut ends: Vec<f64> = Vec::new();
    labels
        .iter()
        .map(|&(x, chars)| {
            let row = ends
                .iter()
                .position(|&e| e + 4.0 <= x)
                .unwrap_or(ends.len());
            let end = x + CHAR_W * chars as f64;
            match ends.get_mut(row) {
                Some(e) => *e = end,
                None => ends.push(end),
            }
            row
        })
        .collect()
}

impl Report {
    pub fn ok(&self) -> bool {
        self.verdict == "ok"
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "cfs chaos ({}, reads through {}): {} nodes, r = {}, {:.0} s; {} versions published; {} reads ({} failed), {:.1} MiB verified",
            self.mode,
            self.readers,
            self.nodes,
            self.replicas,
            self.duration_s,
            self.versions_published,
            self.reads,
            self.reads_failed,
            self.bytes_verified as f64 / (1 << 20) as f64
        );
        let _ = writeln!(
            s,
            "{:>7}  {:<10} {:<10} {:>8} {:>6} {:>10} {:>12} {:>12}",
            "at (s)",
            "fault",
            "nodes",
            "undone",
            "failed",
            "stall (s)",
            "p99 in (ms)",
            "back to r (s)"
        );
        for f in &self.faults {
            let join = |ns: &[usize]| {
                ns.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            // A partition shows its cut: 1,2,3|4,5.
            let shown = if f.fault.groups.is_empty() {
                join(&f.fault.nodes)
            } else {
                f.fault
                    .groups
                    .iter()
                    .map(|g| join(g))
                    .collect::<Vec<_>>()
                    .join("|")
            };
            let _ = writeln!(
                s,
                "{:>7.1}  {:<10} {:<10} {:>8} {:>6} {:>10.2} {:>12.0} {:>12}",
                f.fault.t,
                f.fault.kind,
                shown,
                f.fault.until.map_or("-".into(), |u| format!("{u:.1}")),
                f.reads_failed,
                f.longest_stall_s,
                f.p99_in_ms,
                f.back_to_r_s
                    .map_or("not yet".into(), |b| format!("{b:.1}"))
            );
            if let Some(e) = &f.fault.error {
                let _ = writeln!(s, "         error: {e}");
            }
        }
        let _ = writeln!(
            s,
            "outside faults: p99 {:.0} ms, longest stall {:.2} s",
            self.p99_outside_ms, self.stall_outside_s
        );
        if let (Some(calls), Some(hedged)) = (self.requests, self.hedged) {
            let _ = writeln!(
                s,
                "readers' requests: {calls}, hedged: {hedged} ({:.2}%)",
                100.0 * hedged as f64 / calls.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "lost: {} blocks ({} bytes); wrong reads: {}; version regressions: {}; verdict: {}",
            self.lost_blocks,
            self.lost_bytes,
            self.wrong_reads,
            self.version_regressions,
            self.verdict
        );
        s
    }

    /// Three panels on one time axis: reads per second (ok, failed), read latency (p50,
    /// p99) and blocks below r; faults as shaded bands across all three.
    pub fn svg(&self) -> String {
        let (w, left, right) = (960.0, 70.0, 20.0);
        let panel_h = 140.0;
        let dur = self.duration_s.max(1.0);
        let x = |t: f64| left + (w - left - right) * t / dur;
        // Fault labels go in rows above the panels, each in the first row where it does
        // not run into the one before it (faults close in time would print on top of
        // each other), and the panels move down by the rows used.
        let labels: Vec<String> = self
            .faults
            .iter()
            .map(|f| {
                let nodes: Vec<String> = f.fault.nodes.iter().map(|n| n.to_string()).collect();
                format!("{} {}", f.fault.kind, nodes.join(","))
            })
            .collect();
        let rows = label_rows(
            &self
                .faults
                .iter()
                .zip(&labels)
                .map(|(f, l)| (x(f.fault.t) + 2.0, l.chars().count()))
                .collect::<Vec<_>>(),
        );
        let band = LABEL_ROW * rows.iter().map(|r| r + 1).max().unwrap_or(1) as f64;
        let tops = [40.0 + band, 210.0 + band, 380.0 + band];
        let h = 560.0 + band;
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">cfs chaos: {} nodes, r = {}, {} ({})</text>"##,
            self.nodes,
            self.replicas,
            esc(&self.verdict),
            self.mode
        );
        // Bands first, then their labels, so no band covers a label.
        for f in &self.faults {
            let end = f.fault.until.unwrap_or(f.fault.t + dur / 200.0);
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="26" width="{:.1}" height="{:.1}" fill="#f4a261" fill-opacity="0.25"/>"##,
                x(f.fault.t),
                (x(end) - x(f.fault.t)).max(1.5),
                tops[2] + panel_h - 26.0,
            );
        }
        for ((f, label), row) in self.faults.iter().zip(&labels).zip(&rows) {
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#b5651d">{}</text>"##,
                x(f.fault.t) + 2.0,
                34.0 + LABEL_ROW * *row as f64,
                esc(label),
            );
        }
        let panels: [(&str, Vec<(&str, &str, Vec<(f64, f64)>)>); 3] = [
            (
                "reads per second",
                vec![
                    (
                        "ok",
                        "#2a9d8f",
                        self.seconds
                            .iter()
                            .map(|q| (q.t as f64, q.reads_ok as f64))
                            .collect(),
                    ),
                    (
                        "failed",
                        "#e63946",
                        self.seconds
                            .iter()
                            .map(|q| (q.t as f64, q.reads_failed as f64))
                            .collect(),
                    ),
                ],
            ),
            (
                "read latency (ms)",
                vec![
                    (
                        "p50",
                        "#264653",
                        self.seconds
                            .iter()
                            .map(|q| (q.t as f64, q.p50_ms))
                            .collect(),
                    ),
                    (
                        "p99",
                        "#e9c46a",
                        self.seconds
                            .iter()
                            .map(|q| (q.t as f64, q.p99_ms))
                            .collect(),
                    ),
                ],
            ),
            (
                "blocks below r",
                vec![(
                    "below r",
                    "#6a4c93",
                    self.seconds
                        .iter()
                        .filter_map(|q| Some((q.t as f64, q.below_r? as f64)))
                        .collect(),
                )],
            ),
        ];
        for (p, (title, series)) in panels.iter().enumerate() {
            let top = tops[p];
            let ymax = series
                .iter()
                .flat_map(|(_, _, pts)| pts.iter().map(|(_, y)| *y))
                .fold(1.0f64, f64::max)
                * 1.1;
            let y = |v: f64| top + panel_h - panel_h * v / ymax;
            let _ = write!(
                s,
                r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#888"/><line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#888"/><text x="{left}" y="{:.1}">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text><text x="{:.1}" y="{:.1}" text-anchor="end">0</text>"##,
                top + panel_h,
                w - right,
                top + panel_h,
                top + panel_h,
                top - 4.0,
                title,
                left - 4.0,
                top + 10.0,
                ymax,
                left - 4.0,
                top + panel_h
            );
            for (k, (name, color, pts)) in series.iter().enumerate() {
                let path: Vec<String> = pts
                    .iter()
                    .map(|(t, v)| format!("{:.1},{:.1}", x(*t + 0.5), y(*v)))
                    .collect();
                let _ = write!(
                    s,
                    r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><text x="{:.1}" y="{:.1}" fill="{color}">{name}</text>"##,
                    path.join(" "),
                    w - right - 120.0 + 60.0 * k as f64,
                    top - 4.0
                );
            }
        }
        let mut t = 0.0;
        let step = (dur / 10.0).ceil().max(1.0);
        while t <= dur {
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0} s</text>"##,
                x(t),
                tops[2] + panel_h + 16.0
            );
            t += step;
        }
        s.push_str("</svg>\n");
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_labels_close_in_time_go_to_rows_of_their_own() {
        // "kill 8" and "kill 9" a second apart on a 150 s axis, then one far later.
        let rows = label_rows(&[(100.0, 6), (105.0, 6), (112.0, 10), (400.0, 2)]);
        assert_eq!(rows, vec![0, 1, 2, 0]);
        // Far apart: one row.
        assert_eq!(label_rows(&[(10.0, 6), (200.0, 6)]), vec![0, 0]);
    }

    fn read(t: f64, ok: bool) -> Read {
        Read {
            t,
            ms: 100.0,
            ok,
            bytes: 10,
            version: 1,
            wrong: false,
            error: None,
        }
    }

    #[test]
    fn per_fault_figures_come_from_the_window_after_each_fault() {
        let reads: Vec<Read> = (0..100)
            .map(|i| read(i as f64 * 0.1, !(30..50).contains(&i)))
            .collect();
        let census = vec![
            Census {
                t: 2.5,
                blocks: 10,
                below_r: 0,
                missing: 0,
                missing_bytes: 0,
            },
            Census {
                t: 3.5,
                blocks: 10,
                below_r: 4,
                missing: 0,
                missing_bytes: 0,
            },
            Census {
                t: 6.5,
                blocks: 10,
                below_r: 0,
                missing: 0,
                missing_bytes: 0,
            },
        ];
        let faults = vec![FaultRun {
            t: 3.0,
            kind: "kill".into(),
            nodes: vec![2],
            groups: Vec::new(),
            until: Some(5.0),
            error: None,
        }];
        let observed = |reads: Vec<Read>, census: Vec<Census>, faults: Vec<FaultRun>| Observed {
            reads,
            census,
            faults,
            versions_published: 1,
            version_regressions: 0,
        };
        // With --max-stall below the kill's 2.1 s stall, the verdict fails, naming it.
        let strict = build(
            "loopback",
            5,
            3,
            10.0,
            "x".into(),
            Some(0.5),
            observed(reads.clone(), census.clone(), faults.clone()),
        );
        assert!(!strict.ok());
        assert!(
            strict
                .verdict
                .contains("kill at 3.0 s stalled reads 2.10 s"),
            "{}",
            strict.verdict
        );
        let r = build(
            "loopback",
            5,
            3,
            10.0,
            "x".into(),
            None,
            Observed {
                reads,
                census,
                faults,
                versions_published: 1,
                version_regressions: 0,
            },
        );
        assert_eq!(r.faults[0].reads, 70);
        assert_eq!(r.faults[0].reads_failed, 20);
        // No success from 2.9 + 0.1 s until 5.0 + 0.1 s.
        assert!(
            (r.faults[0].longest_stall_s - 2.1).abs() < 0.01,
            "{}",
            r.faults[0].longest_stall_s
        );
        assert_eq!(r.faults[0].back_to_r_s, Some(3.5));
        let quiet = vec![FaultRun {
            t: 0.5,
            kind: "pause".into(),
            nodes: vec![1],
            groups: Vec::new(),
            until: Some(1.0),
            error: None,
        }];
        let census = vec![Census {
            t: 1.5,
            blocks: 10,
            below_r: 0,
            missing: 0,
            missing_bytes: 0,
        }];
        let r2 = build(
            "loopback",
            5,
            3,
            2.0,
            "x".into(),
            None,
            Observed {
                reads: vec![read(0.1, true)],
                census,
                faults: quiet,
                versions_published: 1,
                version_regressions: 0,
            },
        );
        assert_eq!(r2.faults[0].back_to_r_s, Some(0.0));
        assert_eq!(r.seconds[4].reads_failed, 10);
        assert_eq!(r.seconds[3].below_r, Some(4));
        assert!(r.ok());
        assert!(r.svg().contains("<polyline"));
    }
}
