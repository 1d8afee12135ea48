//! Hand-written SVG charts: lines over x, and grouped bars. Enough for the results page.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 400.0;
const L: f64 = 70.0;
const R: f64 = 170.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(title: &str, xlabel: &str, ylabel: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"##,
        (L + W - R) / 2.0,
        esc(title),
        (L + W - R) / 2.0,
        H - 12.0,
        esc(xlabel),
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
        esc(ylabel)
    );
    s
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn y_axis(s: &mut String, ymax: f64) {
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = H - B - (H - T - B) * i as f64 / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{L}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/><line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>"##,
        H - B,
        H - B,
        W - R,
        H - B
    );
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn legend(s: &mut String, names: &[&str], dashed: &[bool]) {
    for (i, n) in names.iter().enumerate() {
        let y = T + 10.0 + 20.0 * i as f64;
        let dash = if dashed.get(i).copied().unwrap_or(false) {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r##"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{}</text>"##,
            W - R + 10.0,
            W - R + 34.0,
            COLORS[i % COLORS.len()],
            W - R + 40.0,
            y + 4.0,
            esc(n)
        );
    }
}

/// A line series: name, points, dashed.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// Lines over a numeric x axis; `xticks` are labelled positions.
pub fn lines(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    xticks: &[(f64, String)],
) -> String {
    let mut s = header(title, xlabel, ylabel);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let ymax = nice_max(y1 * 1.05);
    y_axis(&mut s, ymax);
    let px = |x: f64| L + (W - R - L) * (x - x0) / (x1 - x0);
    let py = |y: f64| H - B - (H - T - B) * y / ymax;
    for (x, label) in xticks {
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            px(*x),
            H - B + 16.0,
            esc(label)
        );
    }
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let dash = if se.dashed {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"##,
            pts.join(" ")
        );
        for (x, y) in &se.points {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"##,
                px(*x),
                py(*y)
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name).collect();
    let dashed: Vec<bool> = series.iter().map(|s| s.dashed).collect();
    legend(&mut s, &names, &dashed);
    s.push_str("</svg>\n");
    s
}

/// Grouped bars: one group per category, one bar per series.
pub fn bars(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    categories: &[String],
    series: &[(&str, Vec<f64>)],
) -> String {
    let mut s = header(title, xlabel, ylabel);
    let y1 = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0f64, |a, b| a.max(*b));
    let ymax = nice_max(y1 * 1.05);
    y_axis(&mut s, ymax);
    let groups = categories.len().max(1) as f64;
    let gw = (W - R - L) / groups;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (g, cat) in categories.iter().enumerate() {
        let gx = L + gw * g as f64 + gw * 0.1;
        for (i, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(g).copied().unwrap_or(0.0);
            let h = (H - T - B) * v / ymax;
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"##,
                gx + bw * i as f64,
                H - B - h,
                bw.max(1.0),
                h,
                COLORS[i % COLORS.len()]
            );
        }
        if categories.len() <= 24 || g % (categories.len() / 12).max(1) == 0 {
            let _ = write!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
                gx + gw * 0.4,
                H - B + 16.0,
                esc(cat)
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    legend(&mut s, &names, &[]);
    s.push_str("</svg>\n");
    s
}
