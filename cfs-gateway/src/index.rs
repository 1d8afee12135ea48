//! Directory listings (HTML, or JSON with `?format=json`), paginated, and the small
//! text helpers of the gateway: escaping and percent-encoding of names, which are bytes.

use cfs_core::fs::{DirEntry, EntryKind, Inode};
use cfs_tree::reader::{FsError, Reader};
use cfs_tree::service::BlockService;
use serde::Serialize;
use std::fmt::Write;

/// Entries per listing page.
pub const PAGE: usize = 2000;

#[derive(Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: &'static str,
    pub size: u64,
    pub mtime: i64,
    pub key: String,
}

#[derive(Serialize)]
pub struct Listing {
    pub fsid: String,
    pub version: u64,
    pub path: String,
    pub page: usize,
    pub pages: usize,
    pub entries: Vec<Entry>,
}

/// One page of a directory, with each entry's size and mtime (their inodes are fetched
/// ahead together).
pub async fn listing<R: BlockService>(
    reader: &Reader<R>,
    dir: &Inode,
    page: usize,
) -> Result<(Vec<(DirEntry, std::sync::Arc<Inode>)>, usize), FsError> {
    let all = reader.list(dir).await?;
    let pages = all.len().div_ceil(PAGE).max(1);
    let chosen: Vec<DirEntry> = all
        .into_iter()
        .skip(page.saturating_mul(PAGE))
        .take(PAGE)
        .collect();
    reader.prefetch_entries(chosen.iter().map(|e| e.key).collect());
    let mut out = Vec::with_capacity(chosen.len());
    for e in chosen {
        let i = reader.inode(e.key).await?;
        out.push((e, i));
    }
    Ok((out, pages))
}

pub fn entries(list: &[(DirEntry, std::sync::Arc<Inode>)]) -> Vec<Entry> {
    list.iter()
        .map(|(e, i)| Entry {
            name: String::from_utf8_lossy(&e.name).into_owned(),
            kind: match e.kind {
                EntryKind::File => "file",
                EntryKind::Dir => "dir",
                EntryKind::Symlink => "symlink",
            },
            size: i.size(),
            mtime: i.mtime_sec,
            key: e.key.to_hex(),
        })
        .collect()
}

/// The HTML page of a listing; `raw` are the entries' names as bytes, for the links.
pub fn html(l: &Listing, raw: &[(DirEntry, std::sync::Arc<Inode>)]) -> String {
    let mut s = String::new();
    let title = escape(&format!("{}@{}{}", l.fsid, l.version, l.path));
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:0 1em}}\
         td.n{{text-align:right}}</style></head><body><h1>{title}</h1><table>\
         <tr><th>name</th><th>size</th><th>modified (UTC)</th></tr>\
         <tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>"
    );
    for ((e, _), x) in raw.iter().zip(&l.entries) {
        let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
        let _ = write!(
            s,
            "<tr><td><a href=\"{}{slash}\">{}{slash}</a></td><td class=\"n\">{}</td><td>{}</td></tr>",
            percent_encode(&e.name),
            escape(&x.name),
            x.size,
            utc(x.mtime)
        );
    }
    s.push_str("</table>");
    if l.pages > 1 {
        s.push_str("<p>pages:");
        for p in 0..l.pages {
            if p == l.page {
                let _ = write!(s, " {p}");
            } else {
                let _ = write!(s, " <a href=\"?page={p}\">{p}</a>");
            }
        }
        s.push_str("</p>");
    }
    let _ = write!(
        s,
        "<p><a href=\"?format=json&amp;page={}\">json</a></p></body></html>",
        l.page
    );
    s
}

/// `YYYY-MM-DD hh:mm:ss` of seconds since the epoch (civil-from-days, proleptic
/// Gregorian).
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Every byte but RFC 3986's unreserved ones as %XX: a name as one path segment.
pub fn percent_encode(b: &[u8]) -> String {
    let mut o = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            o.push(c as char);
        } else {
            let _ = write!(o, "%{c:02X}");
        }
    }
    o
}

/// %XX sequences to bytes; None if one is malformed.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            o.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            o.push(b[i]);
            i += 1;
        }
    }
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_survive_encoding_and_escaping() {
        let name = b"a b/%\xff<x>&\"'.txt";
        assert_eq!(percent_decode(&percent_encode(name)).unwrap(), name);
        assert_eq!(percent_encode(b"x y"), "x%20y");
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_000_000), "2026-11-30 00:53:20");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
    }
}
