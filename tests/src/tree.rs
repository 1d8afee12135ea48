//! Test trees: a sample tree with every case the layout must survive, a walk, and a
//! comparison of two trees by type, mode, mtime, size, bytes and link targets.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// A directory under /tmp removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("cfs-test-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub const BS: usize = cfs_core::fs::BLOCK_SIZE;

fn write(p: &Path, bytes: &[u8], mode: u32, mtime_secs: u64) {
    fs::write(p, bytes).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::new(mtime_secs, 123_456_789))
        .unwrap();
}

/// The sample tree of issue 3's acceptance list. `big_dir` entries are many small
/// files (2,000 in the full tree).
pub fn sample_tree(root: &Path, big_dir: usize) {
    write(&root.join("empty"), b"", 0o644, 1_600_000_000);
    write(&root.join("one"), b"x", 0o600, 1_600_000_001);
    write(
        &root.join("under"),
        &pattern(BS - 1, 1),
        0o644,
        1_600_000_002,
    );
    write(&root.join("at"), &pattern(BS, 2), 0o755, 1_600_000_003);
    write(
        &root.join("over"),
        &pattern(BS + 1, 3),
        0o644,
        1_600_000_004,
    );
    write(
        &root.join("several"),
        &pattern(5 * 1024 * 1024 + 7, 4),
        0o644,
        1_600_000_005,
    );
    write(
        &root.join("zeros"),
        &vec![0u8; 3 * 1024 * 1024],
        0o644,
        1_600_000_006,
    );
    write(
        &root.join("name with spaces"),
        b"spaces\n",
        0o644,
        1_600_000_007,
    );
    write(&root.join("ünïcødé ✓"), b"utf8\n", 0o644, 1_600_000_008);
    write(
        &root.join("l".repeat(200)),
        b"long name\n",
        0o644,
        1_600_000_009,
    );
    fs::hard_link(root.join("one"), root.join("one-link")).unwrap();
    symlink("one", root.join("rel-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    fs::create_dir(root.join("emptydir")).unwrap();
    let big = root.join("big");
    fs::create_dir(&big).unwrap();
    for i in 0..big_dir {
        fs::write(big.join(format!("entry-{i:05}")), format!("{i}\n")).unwrap();
    }
    let mut d = root.to_path_buf();
    for i in 0..12 {
        d = d.join(format!("d{i}"));
        fs::create_dir(&d).unwrap();
    }
    write(&d.join("deep"), b"deep file\n", 0o644, 1_600_000_010);
    fs::set_permissions(root.join("d0"), fs::Permissions::from_mode(0o700)).unwrap();
}

/// Every path under `root` (relative), sorted, directories included.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn go(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            out.push(r.clone());
            if fs::symlink_metadata(root.join(&r)).unwrap().is_dir() {
                go(root, &r, out);
            }
        }
    }
    go(root, Path::new(""), &mut out);
    out
}

/// Assert that `mnt` shows the same tree as `src`: type, mode, mtime (ns), size, bytes,
/// listings and link targets of every entry.
pub fn compare_trees(src: &Path, mnt: &Path) {
    for rel in walk(src) {
        let (a, b) = (src.join(&rel), mnt.join(&rel));
        let ma = fs::symlink_metadata(&a).unwrap();
        let mb = fs::symlink_metadata(&b).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        let what = rel.display();
        assert_eq!(ma.file_type(), mb.file_type(), "type of {what}");
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {what}");
        assert_eq!(ma.mtime_nsec(), mb.mtime_nsec(), "mtime ns of {what}");
        if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&a).unwrap(),
                fs::read_link(&b).unwrap(),
                "target of {what}"
            );
            continue;
        }
        assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "mode of {what}");
        if ma.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            assert_eq!(names(&a), names(&b), "listing of {what}");
        } else {
            assert_eq!(ma.len(), mb.len(), "size of {what}");
            assert!(
                fs::read(&a).unwrap() == fs::read(&b).unwrap(),
                "bytes of {what}"
            );
        }
    }
}

/// `diff -r ARGS a b` finds no difference (the output is shown when it does).
pub fn assert_diff_r(a: &Path, b: &Path, args: &[&str]) {
    let diff = std::process::Command::new("diff")
        .arg("-r")
        .args(args)
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "diff -r {} {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&diff.stdout)
    );
}
