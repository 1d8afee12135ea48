//! Tables (markdown, for the terminal and docs/results.md) and plots for each report.

use crate::experiments::{
    CacheReport, ChurnReport, FailureReport, LoadReport, LookupReport, SelectionReport,
};
use crate::plot::{bars, lines, Series};

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        head.join(" | "),
        " --- |".repeat(head.len())
    );
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

pub fn lookup_table(rs: &[LookupReport]) -> String {
    let rows: Vec<Vec<String>> = rs
        .iter()
        .map(|r| {
            vec![
                r.nodes.to_string(),
                r.lookups.to_string(),
                format!("{:.3}", r.mean_hops),
                format!("{}", r.p1_hops),
                format!("{}", r.p99_hops),
                format!("{:.3}", r.half_log2_n),
                format!("{:.1}", r.mean_latency_ms),
                format!("{}/{}", r.failed, r.wrong),
            ]
        })
        .collect();
    table(
        &[
            "N",
            "lookups",
            "mean hops",
            "p1",
            "p99",
            "1/2 log2 N",
            "mean latency ms",
            "failed/wrong",
        ],
        &rows,
    )
}

pub fn lookup_hist_svg(r: &LookupReport) -> String {
    let total: u64 = r.hops_histogram.iter().sum::<u64>().max(1);
    let cats: Vec<String> = (0..r.hops_histogram.len()).map(|h| h.to_string()).collect();
    let pdf: Vec<f64> = r
        .hops_histogram
        .iter()
        .map(|c| *c as f64 / total as f64)
        .collect();
    bars(
        &format!(
            "Lookup path length, N = {} (mean {:.2}, 1/2 log2 N = {:.2})",
            r.nodes, r.mean_hops, r.half_log2_n
        ),
        "hops",
        "fraction of lookups",
        &cats,
        &[("PDF", pdf)],
    )
}

pub fn lookup_sweep_svg(rs: &[LookupReport]) -> String {
    let x = |r: &LookupReport| (r.nodes as f64).log2();
    let ticks: Vec<(f64, String)> = rs
        .iter()
        .map(|r| (x(r), format!("2^{}", x(r).round())))
        .collect();
    lines(
        "Lookup path length vs N",
        "nodes",
        "hops",
        &[
            Series {
                name: "mean",
                points: rs.iter().map(|r| (x(r), r.mean_hops)).collect(),
                dashed: false,
            },
            Series {
                name: "1st percentile",
                points: rs.iter().map(|r| (x(r), r.p1_hops)).collect(),
                dashed: false,
            },
            Series {
                name: "99th percentile",
                points: rs.iter().map(|r| (x(r), r.p99_hops)).collect(),
                dashed: false,
            },
            Series {
                name: "1/2 log2 N",
                points: rs.iter().map(|r| (x(r), r.half_log2_n)).collect(),
                dashed: true,
            },
        ],
        &ticks,
    )
}

pub fn failure_table(rs: &[FailureReport]) -> String {
    let rows: Vec<Vec<String>> = rs
        .iter()
        .map(|r| {
            vec![
                r.nodes.to_string(),
                format!("{:.2}", r.fail),
                r.replicas.to_string(),
                r.blocks.to_string(),
                format!("{:.4}", r.failed_before),
                format!("{:.4}", r.failed_lookups),
                format!("{:.4}", r.lost_blocks),
                format!("{:.4}", r.expected_lost),
                format!("{:.4}", r.lost_sigma),
                format!("{:.2}", r.lost_z),
                format!("{:.4}", r.restored),
            ]
        })
        .collect();
    table(
        &[
            "N",
            "failed",
            "r",
            "blocks",
            "failed gets right after",
            "failed after stabilization",
            "lost",
            "F^r",
            "sigma",
            "z",
            "back on r",
        ],
        &rows,
    )
}

pub fn failure_svg(rs: &[FailureReport]) -> String {
    let x = |r: &FailureReport| r.fail;
    let ticks: Vec<(f64, String)> = rs
        .iter()
        .map(|r| (r.fail, format!("{:.0}%", r.fail * 100.0)))
        .collect();
    let r0 = rs.first();
    lines(
        &format!(
            "Failures at once, N = {}, r = {}",
            r0.map_or(0, |r| r.nodes),
            r0.map_or(0, |r| r.replicas)
        ),
        "fraction of nodes failed",
        "fraction",
        &[
            Series {
                name: "failed gets, right after",
                points: rs.iter().map(|r| (x(r), r.failed_before)).collect(),
                dashed: false,
            },
            Series {
                name: "failed gets, stabilized",
                points: rs.iter().map(|r| (x(r), r.failed_lookups)).collect(),
                dashed: false,
            },
            Series {
                name: "blocks lost",
                points: rs.iter().map(|r| (x(r), r.lost_blocks)).collect(),
                dashed: false,
            },
            Series {
                name: "F^r",
                points: rs.iter().map(|r| (x(r), r.expected_lost)).collect(),
                dashed: true,
            },
        ],
        &ticks,
    )
}

pub fn load_table(r: &LoadReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.vnodes.to_string(),
                format!("{:.2}", x.mean),
                format!("{:.3}", x.p1_over_mean),
                format!("{:.3}", x.p99_over_mean),
                format!("{:.3}", x.max_over_mean),
            ]
        })
        .collect();
    table(
        &[
            "virtual servers",
            "mean blocks/node",
            "p1 / mean",
            "p99 / mean",
            "max / mean",
        ],
        &rows,
    )
}

pub fn load_svg(r: &LoadReport) -> String {
    let cats: Vec<String> = r
        .rows
        .iter()
        .map(|x| format!("{} vnode(s)", x.vnodes))
        .collect();
    bars(
        &format!("Blocks per node, N = {}, {} blocks", r.nodes, r.blocks),
        "virtual servers per node",
        "blocks / mean",
        &cats,
        &[
            (
                "1st percentile",
                r.rows.iter().map(|x| x.p1_over_mean).collect(),
            ),
            (
                "99th percentile",
                r.rows.iter().map(|x| x.p99_over_mean).collect(),
            ),
        ],
    )
}

pub fn cache_table(r: &CacheReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.path_caching.to_string(),
                format!("{:.3}", x.mean_hops),
                format!("{:.3}", x.late_mean_hops),
                x.home_requests.to_string(),
                format!("{:.3}", x.home_load),
                x.failed.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "path caching",
            "mean hops",
            "mean hops, last quarter",
            "requests at home nodes",
            "per fetch",
            "failed",
        ],
        &rows,
    )
}

pub fn cache_svg(r: &CacheReport) -> String {
    let pts = |v: &Vec<f64>| {
        v.iter()
            .enumerate()
            .map(|(i, y)| (i as f64 + 1.0, *y))
            .collect()
    };
    let ticks: Vec<(f64, String)> = (1..=10)
        .map(|i| (i as f64, format!("{}%", i * 10)))
        .collect();
    lines(
        &format!("Popular block fetched {} times, N = {}", r.fetches, r.nodes),
        "fetches so far",
        "mean hops",
        &[
            Series {
                name: "no path caching",
                points: pts(&r.hops_by_tenth[0]),
                dashed: false,
            },
            Series {
                name: "path caching",
                points: pts(&r.hops_by_tenth[1]),
                dashed: false,
            },
        ],
        &ticks,
    )
}

pub fn selection_table(r: &SelectionReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.server_selection.to_string(),
                format!("{:.3}", x.mean_hops),
                format!("{:.1}", x.mean_latency_ms),
                format!("{:.1}", x.p50_latency_ms),
                format!("{:.1}", x.p99_latency_ms),
            ]
        })
        .collect();
    table(
        &[
            "server selection",
            "mean hops",
            "mean ms",
            "p50 ms",
            "p99 ms",
        ],
        &rows,
    )
}

pub fn selection_svg(r: &SelectionReport) -> String {
    let cats: Vec<String> = r
        .rows
        .iter()
        .map(|x| {
            if x.server_selection {
                "with".to_string()
            } else {
                "without".to_string()
            }
        })
        .collect();
    bars(
        &format!("Lookup latency, N = {}, RTT 10-200 ms", r.nodes),
        "server selection",
        "ms",
        &cats,
        &[
            ("mean", r.rows.iter().map(|x| x.mean_latency_ms).collect()),
            ("p50", r.rows.iter().map(|x| x.p50_latency_ms).collect()),
            ("p99", r.rows.iter().map(|x| x.p99_latency_ms).collect()),
        ],
    )
}

pub fn churn_table(r: &ChurnReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                format!("{:.3}", x.rate),
                x.events.to_string(),
                x.lookups.to_string(),
                format!("{:.4}", x.failed),
                format!("{:.4}", x.wrong),
            ]
        })
        .collect();
    table(
        &[
            "joins and leaves per node per interval",
            "leaves",
            "lookups",
            "failed",
            "wrong successor",
        ],
        &rows,
    )
}

pub fn churn_svg(r: &ChurnReport) -> String {
    let ticks: Vec<(f64, String)> = r
        .rows
        .iter()
        .map(|x| (x.rate, format!("{}", x.rate)))
        .collect();
    lines(
        &format!("Lookups under churn, N = {}", r.nodes),
        "joins (and leaves) per node per stabilization interval",
        "fraction of lookups",
        &[
            Series {
                name: "failed",
                points: r.rows.iter().map(|x| (x.rate, x.failed)).collect(),
                dashed: false,
            },
            Series {
                name: "wrong successor",
                points: r.rows.iter().map(|x| (x.rate, x.wrong)).collect(),
                dashed: false,
            },
        ],
        &ticks,
    )
}
