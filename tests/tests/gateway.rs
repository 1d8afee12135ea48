//! The HTTP gateway (`cfs gateway`, and `cfsd --gateway` inside the node) against a real
//! ring, checked with curl, wget and a browser.

use cfs_tests::tree::{assert_diff_r, pattern};
use cfs_tests::{bin, eventually, Cluster};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BS: usize = 256 << 10;

/// A `cfs gateway` process, killed by PID on drop; its access log goes to `log`.
struct Gateway {
    child: Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Gateway {
    fn start(node: &str, extra: &[&str]) -> Gateway {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(bin("cfs"))
            .args([
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--node",
                node,
                "--poll",
                "0.3",
            ])
            .args(extra)
            .env("RUST_LOG", "cfs_gateway=debug")
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("starting cfs gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("gateway listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim_end_matches('/')
            .to_string();
        Gateway { child, url, log }
    }

    /// Status codes of the requests in the access log whose line passes `pick`.
    fn statuses_where(&self, pick: impl Fn(&str) -> bool) -> Vec<u16> {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        strip_ansi(&text)
            .lines()
            .filter(|l| pick(l))
            .filter_map(|l| {
                l.split("status=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Status codes of every request in the access log.
    fn statuses_all(&self) -> Vec<u16> {
        self.statuses_where(|_| true)
    }

    /// Status codes the access log recorded for GET `path`.
    fn statuses(&self, path: &str) -> Vec<u16> {
        self.statuses_where(|l| {
            l.contains(&format!("path=\"{path}\"")) || l.contains(&format!("path={path} "))
        })
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl's response: status, headers (lowercase names), body.
struct Got {
    status: u32,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn curl(url: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("running curl");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let headers = std::fs::read_to_string(&h)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: std::fs::read(&b).unwrap_or_default(),
    }
}

#[test]
fn gateway_serves_files_ranges_directories_and_sites_and_says_what_failed() {
    serves_files_ranges_directories_and_sites(false);
}

/// The same, against the gateway `cfsd --gateway` serves inside the node's process.
#[test]
fn the_gateway_inside_cfsd_serves_the_same() {
    serves_files_ranges_directories_and_sites(true);
}

/// The gateway's URL in node i's data directory (`cfsd --gateway`).
fn node_gateway(cluster: &Cluster, i: usize) -> String {
    let f = cluster.nodes[i].data.join("gateway");
    eventually(Duration::from_secs(20), "cfsd's gateway to listen", || {
        let u = std::fs::read_to_string(&f).ok()?;
        Some(u.trim().trim_end_matches('/').to_string())
    })
}

fn serves_files_ranges_directories_and_sites(in_node: bool) {
    let extra: &[&str] = if in_node {
        &["--gateway", "127.0.0.1:0"]
    } else {
        &[]
    };
    let mut cluster = Cluster::start(3, extra);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("src");
    let five = pattern(5 << 20, 1);
    let edge = pattern(BS, 2);
    for d in ["dir/sub", "site", "bad"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("edge"), &edge).unwrap();
    std::fs::write(src.join("five"), &five).unwrap();
    std::fs::write(src.join("a b&c.txt"), b"spaces and an ampersand\n").unwrap();
    std::fs::write(src.join("dir/sub/deep"), pattern(3 * BS + 17, 3)).unwrap();
    std::fs::write(src.join("bad/late"), pattern(2 * BS, 4)).unwrap();
    std::fs::write(
        src.join("site/index.html"),
        "<html><link rel=stylesheet href=style.css><img src=img.png></html>",
    )
    .unwrap();
    std::fs::write(src.join("site/style.css"), "body { color: teal }").unwrap();
    std::fs::write(src.join("site/img.png"), pattern(3000, 5)).unwrap();
    std::os::unix::fs::symlink("five", src.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("bad/escape")).unwrap();
    let key = cluster.keygen();
    let fsid = cluster.publish(&src, &key, 0).0;
    // `cfs gateway` as a process of its own, or the node's own.
    let (_gw, url) = if in_node {
        (None, node_gateway(&cluster, 1))
    } else {
        let gw = Gateway::start(&cluster.addr(1), &["--timeout", "3"]);
        let url = gw.url.clone();
        (Some(gw), url)
    };
    let u = |p: &str| format!("{url}/{fsid}/{p}");

    // Whole files, byte for byte, with their type and length.
    for (name, want) in [("empty", &b""[..]), ("edge", &edge), ("five", &five)] {
        let g = curl(&u(name), &[]);
        assert_eq!(g.status, 200, "{name}");
        assert!(g.body == want, "{name} reads back");
        assert_eq!(
            g.header("content-length"),
            Some(want.len().to_string().as_str())
        );
    }
    // HTTP/2 (cleartext, prior knowledge) serves the same bytes.
    let g = curl(&u("five"), &["--http2-prior-knowledge"]);
    assert!(g.status == 200 && g.body == five, "HTTP/2");
    let g = curl(&u("a%20b%26c.txt"), &[]);
    assert_eq!(
        (g.status, &g.body[..]),
        (200, &b"spaces and an ampersand\n"[..])
    );
    assert_eq!(g.header("content-type"), Some("text/plain"));
    assert_eq!(
        curl(&u("site/style.css"), &[]).header("content-type"),
        Some("text/css")
    );

    // Ranges: one, a suffix, across a block edge, several (multipart), none satisfiable.
    let g = curl(&u("five"), &["-r", "100-199"]);
    assert_eq!(g.status, 206);
    assert!(g.body == five[100..200]);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes 100-199/{}", five.len()).as_str())
    );
    let g = curl(&u("five"), &["-r", "-10"]);
    assert!(g.status == 206 && g.body == five[five.len() - 10..]);
    let g = curl(&u("five"), &["-r", &format!("{}-{}", BS - 5, BS + 4)]);
    assert!(g.status == 206 && g.body == five[BS - 5..BS + 5]);
    let g = curl(&u("five"), &["-r", "0-9,300000-300009"]);
    assert_eq!(g.status, 206);
    let ctype = g.header("content-type").unwrap().to_string();
    let boundary = ctype.split("boundary=").nth(1).expect("multipart");
    let parts: Vec<&[u8]> = split_multipart(&g.body, boundary);
    assert_eq!(parts.len(), 2);
    assert!(parts[0] == &five[..10] && parts[1] == &five[300_000..300_010]);
    assert_eq!(
        g.header("content-length"),
        Some(g.body.len().to_string().as_str())
    );
    let g = curl(&u("five"), &["-r", "99999999-"]);
    assert_eq!(g.status, 416);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes */{}", five.len()).as_str())
    );

    // HEAD, ETag and If-None-Match; caching by URL kind.
    let g = curl(&u("five"), &["-I"]);
    assert_eq!(g.status, 200);
    // (curl -I writes the headers where the body would go: there is no body.)
    assert!(g.body.len() < 1000);
    assert_eq!(
        g.header("content-length"),
        Some(five.len().to_string().as_str())
    );
    let etag = g.header("etag").unwrap().to_string();
    assert_eq!(etag.len(), 42, "the inode key, quoted");
    // As long as the newest root is used: the poll (0.3 s here, cfsd's default 2 s).
    let max_age = if in_node { "max-age=2" } else { "max-age=1" };
    assert!(g.header("cache-control").unwrap().contains(max_age));
    let g = curl(&u("five"), &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!((g.status, g.body.len()), (304, 0));
    // A range of another version than the client holds is not spliced: the whole file.
    let g = curl(&u("five"), &["-r", "0-9", "-H", "If-Range: \"0000\""]);
    assert!(g.status == 200 && g.body == five);
    let g = curl(
        &u("five"),
        &["-r", "0-9", "-H", &format!("If-Range: {etag}")],
    );
    assert!(g.status == 206 && g.body == five[..10]);
    let pinned = format!("{url}/{fsid}@1/five");
    let g = curl(&pinned, &["-I"]);
    assert!(g.header("cache-control").unwrap().contains("immutable"));

    // Directories: the slash, an HTML index with escaped names, JSON, a site's index.
    let g = curl(&u("dir"), &[]);
    assert_eq!(
        (g.status, g.header("location")),
        (301, Some(format!("/{fsid}/dir/").as_str()))
    );
    let g = curl(&u(""), &[]);
    let html = String::from_utf8(g.body).unwrap();
    assert_eq!(g.status, 200);
    assert!(
        html.contains("href=\"a%20b%26c.txt\">a b&amp;c.txt</a>"),
        "{html}"
    );
    assert!(html.contains("href=\"dir/\">dir/</a>"));
    let g = curl(&u("dir/?format=json"), &[]);
    let j: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(j["entries"][0]["name"], "sub");
    assert_eq!(j["entries"][0]["kind"], "dir");
    let g = curl(&u("site/"), &[]);
    assert!(
        g.status == 200 && g.body.starts_with(b"<html><link"),
        "index.html served"
    );
    assert_eq!(g.header("content-type"), Some("text/html"));

    // Symlinks: followed inside the tree, never out of it.
    assert!(curl(&u("link"), &[]).body == five);
    assert_eq!(curl(&u("bad/escape"), &[]).status, 404);
    // Unknown things are 404.
    assert_eq!(curl(&u("missing"), &[]).status, 404);
    let g = curl(&format!("{url}/{}/x", "00".repeat(20)), &[]);
    assert_eq!(g.status, 404);
    assert_eq!(curl(&format!("{url}/{fsid}@9/five"), &[]).status, 404);

    // `wget --mirror` of the tree equals the tree (listing pages aside).
    let mirror = cluster.dir.path().join("mirror");
    let st = wget_mirror(&u(""), &mirror, &["-X", &format!("/{fsid}/bad")]);
    assert!(st.success() || st.code() == Some(8), "wget: {st}");
    // Listing pages were saved as index.html; the site's own index.html is compared.
    for d in ["", "dir", "dir/sub"] {
        std::fs::remove_file(mirror.join(d).join("index.html")).unwrap();
    }
    assert_diff_r(&src, &mirror, &["-x", "bad"]);

    // A new version shows at the newest URL after the poll; the old one stays.
    std::fs::write(src.join("five"), b"version two").unwrap();
    cluster.publish(&src, &key, 0);
    eventually(Duration::from_secs(20), "the newest URL to follow", || {
        (curl(&u("five"), &[]).body == b"version two").then_some(())
    });
    assert!(curl(&pinned, &[]).body == five);
    if in_node {
        // A node's own gateway stops with the node.
        return;
    }

    // The ring gone: a block no replica returns is a 504 that names it.
    for i in 0..3 {
        cluster.kill(i);
    }
    let g = curl(&u("bad/late"), &[]);
    assert_eq!(g.status, 504, "{}", String::from_utf8_lossy(&g.body));
    assert!(String::from_utf8_lossy(&g.body).contains("block"));
}

/// The bodies of a multipart/byteranges response.
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delim = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(i) = find(rest, delim.as_bytes()) {
        rest = &rest[i + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let h = find(rest, b"\r\n\r\n").unwrap();
        let body_start = &rest[h + 4..];
        let end = find(body_start, delim.as_bytes()).unwrap();
        parts.push(&body_start[..end]);
        rest = &body_start[end..];
    }
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `cfsd --gateway` runs a gateway beside each node (URL in DATA/gateway), stopped with
/// it; the status page lists every node of the ring and shows a killed one as gone.
#[test]
fn status_page_lists_every_node_and_shows_a_killed_one_as_gone() {
    let mut cluster = Cluster::start(5, &["--gateway", "127.0.0.1:0"]);
    cluster.wait_ring(Duration::from_secs(30));
    let (url, url3) = (node_gateway(&cluster, 0), node_gateway(&cluster, 3));
    let ring = || {
        let g = curl(&format!("{url}/-/ring?format=json"), &[]);
        assert_eq!(g.status, 200);
        serde_json::from_slice::<serde_json::Value>(&g.body).unwrap()
    };
    let addrs: Vec<String> = (0..5).map(|i| cluster.addr(i)).collect();
    eventually(Duration::from_secs(20), "all five nodes listed", || {
        let j = ring();
        let listed: Vec<&str> = j["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["addr"].as_str().unwrap())
            .collect();
        (j["up"] == 5 && addrs.iter().all(|a| listed.contains(&a.as_str()))).then_some(())
    });
    assert_eq!(curl(&format!("{url3}/-/metrics"), &[]).status, 200);
    cluster.kill(3);
    let gone = addrs[3].clone();
    eventually(
        Duration::from_secs(20),
        "the killed node shown as gone",
        || {
            let j = ring();
            let n = j["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["addr"] == gone.as_str())?
                .clone();
            (n["up"] == false && j["up"] == 4).then_some(())
        },
    );
    let page = String::from_utf8(curl(&format!("{url}/"), &[]).body).unwrap();
    assert!(page.contains(&gone) && page.contains("gone"), "{page}");
    let m = String::from_utf8(curl(&format!("{url}/-/metrics"), &[]).body).unwrap();
    assert!(m.contains("cfs_gets_served"), "{m}");
    assert!(m.contains("# TYPE cfs_blocks_below_r gauge"), "{m}");

    // Replica health: a tree on the four that are left is on r = 3 replicas; with two
    // more nodes killed, two remain, and every block is counted below r (once each);
    // with them back, repairs bring the count to 0 again.
    let src = cluster.dir.path().join("health");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        std::fs::write(src.join(format!("f{i}")), vec![i as u8 + 1; 300_000]).unwrap();
    }
    let key = cluster.keygen();
    cluster.publish(&src, &key, 0);
    let below = |j: &serde_json::Value| j["blocks_below_r"].as_u64().unwrap();
    eventually(Duration::from_secs(30), "every block on r replicas", || {
        (below(&ring()) == 0).then_some(())
    });
    cluster.kill(1);
    cluster.kill(2);
    // At least the 4 files' data blocks (2 each) and their inodes, the directory, the
    // root: every one counted (once both nodes have finished a round since the kills;
    // until then the sum is partial), and each only once.
    // The page must say the same number as the JSON read just before it.
    let short = eventually(Duration::from_secs(40), "blocks counted below r", || {
        let j = ring();
        let n = below(&j);
        if j["up"] != 2 || n < 13 {
            return None;
        }
        let page = String::from_utf8(curl(&format!("{url}/"), &[]).body).unwrap();
        page.contains(&format!("{n} blocks below r")).then_some(n)
    });
    assert!((13..=20).contains(&short), "{short} blocks below r");
    cluster.restart(1);
    cluster.restart(2);
    eventually(
        Duration::from_secs(60),
        "repairs to bring every block back to r",
        || {
            let j = ring();
            (j["up"] == 4 && below(&j) == 0).then_some(())
        },
    );
    // The killed node's gateway went with it.
    eventually(
        Duration::from_secs(10),
        "the gateway to stop with its node",
        || (curl(&format!("{url3}/"), &[]).status == 0).then_some(()),
    );
}

/// A published static site renders in headless Chromium: the page, its stylesheet and its
/// image are all fetched through the gateway with status 200, and a screenshot is made.
#[test]
fn a_published_site_renders_in_headless_chromium() {
    if Command::new("chromium").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must install chromium");
        eprintln!("chromium is not installed: skipping (CI installs it)");
        return;
    }
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("site");
    std::fs::create_dir_all(src.join("css")).unwrap();
    std::fs::write(
        src.join("index.html"),
        "<!doctype html><html><head><link rel=stylesheet href=css/style.css></head>\
         <body><h1>cfs</h1><img src=dot.png></body></html>",
    )
    .unwrap();
    std::fs::write(src.join("css/style.css"), "h1 { color: teal }").unwrap();
    std::fs::write(src.join("dot.png"), PNG_1X1).unwrap();
    let key = cluster.keygen();
    let fsid = cluster.publish(&src, &key, 0).0;
    let gw = Gateway::start(&cluster.addr(0), &[]);
    let shot = cluster.dir.path().join("shot.png");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--window-size=800,400",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("{}/{fsid}/", gw.url))
        .output()
        .unwrap();
    assert!(
        shot.exists() && std::fs::metadata(&shot).unwrap().len() > 1000,
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in ["", "css/style.css", "dot.png"] {
        let path = format!("/{fsid}/{p}");
        eventually(Duration::from_secs(5), "the access log", || {
            (!gw.statuses(&path).is_empty()).then_some(())
        });
        assert!(
            gw.statuses(&path).iter().all(|s| *s == 200),
            "{path}: {:?}",
            gw.statuses(&path)
        );
    }
}

/// A 1x1 PNG.
const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// A transfer cut by the ring mid-stream is an error for the client, never a complete-
/// looking 200: the gateway has begun a 32 MiB body (its memory budget of 1 MiB keeps it
/// from reading far ahead) when every node is killed; curl must fail, and the bytes it
/// did receive must be a true prefix of the file.
#[test]
fn a_transfer_cut_mid_stream_is_an_error_never_a_short_200() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("cut");
    std::fs::create_dir_all(&src).unwrap();
    let data = pattern(32 << 20, 7);
    std::fs::write(src.join("big"), &data).unwrap();
    let key = cluster.keygen();
    let fsid = cluster.publish(&src, &key, 0).0;
    let gw = Gateway::start(&cluster.addr(0), &["--cache-mb", "1", "--timeout", "3"]);
    let out = cluster.dir.path().join("got");
    // 4 MiB/s: the whole file would take 8 s.
    let mut curl = Command::new("curl")
        .args(["-sS", "--limit-rate", "4M", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(format!("{}/{fsid}/big", gw.url))
        .stderr(Stdio::piped())
        .spawn()
        .expect("running curl");
    eventually(Duration::from_secs(20), "the transfer to begin", || {
        (std::fs::metadata(&out).map_or(0, |m| m.len()) >= 2 * BS as u64).then_some(())
    });
    for i in 0..3 {
        cluster.kill(i);
    }
    let status = curl.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut curl.stderr.take().unwrap(), &mut err).unwrap();
    let got = std::fs::read(&out).unwrap();
    assert!(
        !status.success(),
        "curl succeeded with {} of {} bytes",
        got.len(),
        data.len()
    );
    assert!(got.len() < data.len(), "{err}");
    assert_eq!(
        got[..],
        data[..got.len()],
        "the bytes received are the file's"
    );
    eprintln!(
        "cut after {} of {} bytes; curl: {}",
        got.len(),
        data.len(),
        err.trim()
    );
}

/// `wget --mirror` of `url` into `dir` (listing URLs with a query left out).
fn wget_mirror(url: &str, dir: &std::path::Path, extra: &[&str]) -> std::process::ExitStatus {
    Command::new("wget")
        .args([
            "-q",
            "--mirror",
            "-np",
            "-nH",
            "--cut-dirs=1",
            "-e",
            "robots=off",
        ])
        .args(["--reject-regex", "[?]"])
        .args(extra)
        .arg("-P")
        .arg(dir)
        .arg(url)
        .status()
        .unwrap()
}

/// `wget --mirror` of the directory `w` at `url` into `dir`, compared with `src`
/// afterwards; how long it took.
fn mirror_equals(url: &str, dir: &std::path::Path, src: &std::path::Path) -> Duration {
    let t = std::time::Instant::now();
    let st = wget_mirror(url, dir, &[]);
    let took = t.elapsed();
    assert!(st.success(), "wget: {st}");
    std::fs::remove_file(dir.join("w/index.html")).unwrap();
    assert_diff_r(src, dir, &[]);
    took
}

/// `wget --mirror` of a directory of 1,500 small files through a gateway with its default
/// limits gets every file: a client over the rate is slowed down, not refused (wget does
/// not retry a 429).
#[test]
fn a_mirror_of_a_wide_directory_gets_every_file_with_default_limits() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_ring(Duration::from_secs(30));
    let src = cluster.dir.path().join("wide");
    std::fs::create_dir_all(src.join("w")).unwrap();
    for i in 0..1500 {
        std::fs::write(src.join(format!("w/f{i:04}")), format!("file {i}\n")).unwrap();
    }
    let key = cluster.keygen();
    let fsid = cluster.publish_with(&src, &key, 0, &["-q"]).0;
    let gw = Gateway::start(&cluster.addr(1), &[]);
    let dir = cluster.dir.path().join("wide-mirror");
    let took = mirror_equals(&format!("{}/{fsid}/w/", gw.url), &dir, &src);
    assert!(!gw.statuses_all().contains(&429), "no request refused");
    eprintln!("GATEWAY mirror: 1,500 files by wget --mirror in {took:?}, none refused");
    // Well over a low rate, the mirror is slowed down to it, never refused.
    let slow = Gateway::start(&cluster.addr(1), &["--rate-per-prefix", "300"]);
    let dir = cluster.dir.path().join("wide-mirror-2");
    let took = mirror_equals(&format!("{}/{fsid}/w/", slow.url), &dir, &src);
    assert!(!slow.statuses_all().contains(&429));
    eprintln!("GATEWAY mirror at --rate-per-prefix 300: {took:?}, none refused");
}
