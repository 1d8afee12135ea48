//! Files over HTTP: `Range` (one or several ranges), conditional requests, and bodies
//! streamed from verified blocks with read-ahead, never buffered whole. A failure after
//! the headers ends the stream with an error, so the connection is cut and the client
//! sees a truncated response, never a complete-looking wrong one.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use bytes::Bytes;
use cfs_core::fs::Inode;
use cfs_core::Id;
use cfs_tree::reader::{Piece, Reader};
use cfs_tree::service::BlockService;
use futures_util::stream::{self, BoxStream, StreamExt};
use std::ops::Range;
use std::sync::Arc;

/// Bytes read from the ring per body chunk.
const CHUNK: u64 = 256 << 10;
/// Ranges in one request at most (more is a 416: a cheap way to ask for much work).
const MAX_RANGES: usize = 64;
const BOUNDARY: &str = "cfs-byteranges-7d41a9";

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranges {
    /// No header, or one this server ignores (another unit): the whole file.
    Whole,
    /// Satisfiable ranges, in request order, each within the file.
    Some(Vec<Range<u64>>),
    /// Nothing satisfiable: 416.
    Unsatisfiable,
}

/// Parse a `Range` header value (RFC 9110 14.1.2) against a file of `size` bytes.
pub fn parse_ranges(value: Option<&str>, size: u64) -> Ranges {
    let Some(v) = value else {
        return Ranges::Whole;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ranges::Whole;
    };
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let Some((a, b)) = part.split_once('-') else {
            return Ranges::Whole;
        };
        let r = match (a.trim(), b.trim()) {
            ("", "") => return Ranges::Whole,
            ("", n) => match n.parse::<u64>() {
                Ok(0) => continue,
                Ok(n) => size.saturating_sub(n)..size,
                Err(_) => return Ranges::Whole,
            },
            (a, b) => {
                let (Ok(a), end) = (a.parse::<u64>(), b) else {
                    return Ranges::Whole;
                };
                let end = if end.is_empty() {
                    size
                } else {
                    match end.parse::<u64>() {
                        Ok(e) if e >= a => e.saturating_add(1).min(size),
                        _ => return Ranges::Whole,
                    }
                };
                if a >= size {
                    continue;
                }
                a..end
            }
        };
        if !r.is_empty() {
            out.push(r);
        }
    }
    let asked = out
        .iter()
        .try_fold(0u64, |n, r| n.checked_add(r.end - r.start));
    if out.is_empty() || out.len() > MAX_RANGES {
        Ranges::Unsatisfiable
    } else if out.len() > 1 && asked.is_none_or(|n| n > size) {
        // Overlapping ranges asking for more than the file: send it once instead.
        Ranges::Whole
    } else {
        Ranges::Some(out)
    }
}

/// A cached block shared with the HTTP body without a copy.
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The body of `inode` between `range`, read chunk by chunk as the client takes it;
/// cached blocks go out as they are, without a copy.
fn body_stream<R: BlockService>(
    reader: Reader<R>,
    inode: Arc<Inode>,
    range: Range<u64>,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    let ahead = Arc::new(reader.stream_for(&inode));
    stream::unfold(range.start, move |off| {
        let (reader, inode, ahead, end) = (reader.clone(), inode.clone(), ahead.clone(), range.end);
        async move {
            if off >= end {
                return None;
            }
            let n = CHUNK.min(end - off);
            let item = match reader
                .read_pieces(&inode, off, n, Some(ahead.as_ref()))
                .await
            {
                Ok(ps) if ps.iter().map(|p| p.as_slice().len() as u64).sum::<u64>() == n => Ok(ps
                    .into_iter()
                    .map(|p| match p {
                        Piece::Block(b, r) => Bytes::from_owner(Shared(b)).slice(r),
                        Piece::Owned(v) => Bytes::from(v),
                    })
                    .collect::<Vec<_>>()),
                Ok(_) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                Err(e) => {
                    tracing::warn!("response cut at byte {off}: {e}");
                    Err(std::io::Error::other(e))
                }
            };
            let next = if item.is_ok() { off + n } else { end };
            Some((item, next))
        }
    })
    .flat_map(|r| match r {
        Ok(v) => stream::iter(v.into_iter().map(Ok).collect::<Vec<_>>()),
        Err(e) => stream::iter(vec![Err(e)]),
    })
    .boxed()
}

/// Caching headers: a versioned URL never changes; the newest version's only until the
/// next poll.
pub fn cache_control(immutable: bool, max_age: u64) -> HeaderValue {
    if immutable {
        HeaderValue::from_static("public, max-age=31536000, immutable")
    } else {
        HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("ascii")
    }
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

/// The response for a file: 200, 206 (one range or multipart), 304 or 416.
#[allow(clippy::too_many_arguments)]
pub fn file_response<R: BlockService>(
    reader: &Reader<R>,
    method: &Method,
    headers: &HeaderMap,
    name: &[u8],
    key: Id,
    inode: Arc<Inode>,
    cache: HeaderValue,
) -> Response<Body> {
    let size = inode.size();
    let etag = format!("\"{}\"", key.to_hex());
    let mime = mime_guess::from_path(String::from_utf8_lossy(name).as_ref())
        .first_or_octet_stream()
        .to_string();
    let mut b = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, cache)
        .header(header::ACCEPT_RANGES, "bytes");
    if etag_matches(headers, &etag) {
        return b
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response");
    }
    let head = method == Method::HEAD;
    // A range of another version than the client holds would splice two versions.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok);
    let (status, len, body): (StatusCode, u64, BoxStream<'static, _>) = match parse_ranges(
        range, size,
    ) {
        Ranges::Unsatisfiable => {
            return b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .expect("valid response")
        }
        Ranges::Whole => {
            b = b.header(header::CONTENT_TYPE, &mime);
            (
                StatusCode::OK,
                size,
                body_stream(reader.clone(), inode, 0..size),
            )
        }
        Ranges::Some(rs) if rs.len() == 1 => {
            let r = rs[0].clone();
            b = b.header(header::CONTENT_TYPE, &mime).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end - 1),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                r.end - r.start,
                body_stream(reader.clone(), inode, r),
            )
        }
        Ranges::Some(rs) => {
            b = b.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={BOUNDARY}"),
            );
            let mut len = 0u64;
            let mut parts: Vec<BoxStream<'static, _>> = Vec::new();
            for r in rs {
                let h = format!(
                        "\r\n--{BOUNDARY}\r\nContent-Type: {mime}\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
                        r.start,
                        r.end - 1
                    );
                len += h.len() as u64 + (r.end - r.start);
                parts.push(stream::once(async move { Ok(Bytes::from(h)) }).boxed());
                parts.push(body_stream(reader.clone(), inode.clone(), r));
            }
            let end = format!("\r\n--{BOUNDARY}--\r\n");
            len += end.len() as u64;
            parts.push(stream::once(async move { Ok(Bytes::from(end)) }).boxed());
            (
                StatusCode::PARTIAL_CONTENT,
                len,
                stream::iter(parts).flatten().boxed(),
            )
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(body)
    };
    b.status(status)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn ranges_parse_as_rfc_9110_says() {
        let p = |v: &str| parse_ranges(Some(v), 1000);
        assert_eq!(parse_ranges(None, 1000), Ranges::Whole);
        assert_eq!(p("bytes=0-99"), Ranges::Some(vec![0..100]));
        assert_eq!(p("bytes=900-"), Ranges::Some(vec![900..1000]));
        assert_eq!(p("bytes=-100"), Ranges::Some(vec![900..1000]));
        assert_eq!(p("bytes=-5000"), Ranges::Some(vec![0..1000]));
        assert_eq!(p("bytes=990-5000"), Ranges::Some(vec![990..1000]));
        assert_eq!(
            p("bytes=0-0, 10-19 ,-1"),
            Ranges::Some(vec![0..1, 10..20, 999..1000])
        );
        assert_eq!(p("bytes=1000-"), Ranges::Unsatisfiable);
        assert_eq!(p("bytes=-0"), Ranges::Unsatisfiable);
        assert_eq!(p("bytes=5-1"), Ranges::Whole, "invalid: ignored");
        assert_eq!(p("items=0-1"), Ranges::Whole, "another unit: ignored");
        assert_eq!(p("bytes=x-1"), Ranges::Whole);
        assert_eq!(parse_ranges(Some("bytes=0-"), 0), Ranges::Unsatisfiable);
        let many = format!("bytes={}", vec!["0-0"; 65].join(","));
        assert_eq!(p(&many), Ranges::Unsatisfiable);
        assert_eq!(
            p("bytes=0-,0-"),
            Ranges::Whole,
            "more than the file: sent once"
        );
        assert_eq!(
            parse_ranges(Some("bytes=0-,0-"), u64::MAX),
            Ranges::Whole,
            "no overflow"
        );
    }

    #[test]
    fn if_none_match_takes_lists_weak_tags_and_star() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(etag_matches(&h, "\"b\""));
        assert!(!etag_matches(&h, "\"c\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(etag_matches(&h, "\"c\""));
    }
}
