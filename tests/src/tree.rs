//! File trees: [`build_odd_tree`] makes one with every case a files source must carry (symlinks
//! relative, absolute and dangling, empty dirs, names with spaces, unicode, a newline and
//! non-UTF-8 bytes, modes 0600/0755/0555, mtimes with nanoseconds, files excluded by a pattern),
//! [`scan`] records a tree as comparable entries, and [`ensure_same`] compares two trees and
//! lists every difference.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use filetime::FileTime;

use crate::data::{hash_file, Rng};

/// What [`build_odd_tree`] made.
#[derive(Debug, Default)]
pub struct TreeStats {
    /// Regular files that a backup with [`ODD_TREE_EXCLUDE`] includes.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Paths (relative to the root) that [`ODD_TREE_EXCLUDE`] leaves out.
    pub excluded: Vec<PathBuf>,
}

/// The exclude pattern a source over [`build_odd_tree`]'s tree uses.
pub const ODD_TREE_EXCLUDE: &str = "*.tmp";

fn p(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

fn write(root: &Path, rel: impl AsRef<Path>, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let path = root.join(rel);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn mkdir(root: &Path, rel: impl AsRef<Path>) -> anyhow::Result<()> {
    let path = root.join(rel);
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))
}

fn chmod(root: &Path, rel: impl AsRef<Path>, mode: u32) -> anyhow::Result<()> {
    let path = root.join(rel);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Builds the awkward tree under `root` (created if missing), deterministic for `seed`.
/// Every entry, the root included, gets a distinct mtime with a nanosecond part.
pub fn build_odd_tree(root: &Path, seed: u64) -> anyhow::Result<TreeStats> {
    let mut rng = Rng::new(seed);
    let mut stats = TreeStats::default();
    std::fs::create_dir_all(root)?;
    let mut file = |rel: PathBuf, data: Vec<u8>, mode: u32| -> anyhow::Result<()> {
        stats.files += 1;
        stats.bytes += data.len() as u64;
        write(root, rel, &data, mode)
    };

    file("plain.txt".into(), b"hello fleetvault\n".to_vec(), 0o644)?;
    file("secret.key".into(), rng.bytes(4096), 0o600)?;
    file("run.sh".into(), b"#!/bin/sh\necho hi\n".to_vec(), 0o755)?;
    file("empty-file".into(), Vec::new(), 0o644)?;
    // Several chunks of incompressible data, and a compressible file.
    file("big.bin".into(), rng.bytes(3 << 20), 0o644)?;
    let log: Vec<u8> = (0..20_000u32)
        .flat_map(|i| format!("{i:08} GET /api/v4/users/me 200 0.003s\n").into_bytes())
        .collect();
    file("compressible.log".into(), log, 0o640)?;

    mkdir(root, "dir with spaces")?;
    file(
        "dir with spaces/ünïcödé 文件 🚀.txt".into(),
        "ünïcödé\n".as_bytes().to_vec(),
        0o644,
    )?;
    symlink("../plain.txt", root.join("dir with spaces/up"))?;
    file(
        "newline\nname".into(),
        b"a newline in the name\n".to_vec(),
        0o644,
    )?;
    file(p(b"latin1-\xe9t\xe9"), b"not utf-8\n".to_vec(), 0o644)?;
    mkdir(root, p(b"dir-\xff\xfe"))?;
    file(p(b"dir-\xff\xfe/inside"), rng.bytes(1000), 0o644)?;
    file("-leading-dash".into(), b"dash\n".to_vec(), 0o644)?;
    file(
        "'quotes' \"and\" $dollar *star".into(),
        b"q\n".to_vec(),
        0o644,
    )?;

    symlink("plain.txt", root.join("link-to-plain"))?;
    symlink("does/not/exist", root.join("dangling"))?;
    symlink(
        "/nonexistent/absolute/target",
        root.join("absolute-dangling"),
    )?;
    symlink("nested/a", root.join("link-to-dir"))?;

    mkdir(root, "empty")?;
    mkdir(root, "nested/a/b/c")?;
    file("nested/a/file.txt".into(), rng.bytes(10_000), 0o644)?;
    mkdir(root, "many")?;
    for i in 0..60u64 {
        let len = rng.below(20_000) as usize;
        file(format!("many/f{i:03}").into(), rng.bytes(len), 0o644)?;
    }
    mkdir(root, "readonly")?;
    file("readonly/inside.txt".into(), b"read only\n".to_vec(), 0o444)?;
    mkdir(root, "private")?;
    file("private/token".into(), rng.bytes(64), 0o600)?;

    // Excluded by ODD_TREE_EXCLUDE: written directly, not counted.
    for rel in ["scratch.tmp", "nested/a/also.tmp"] {
        write(root, rel, b"excluded\n", 0o644)?;
        stats.excluded.push(rel.into());
    }

    // Directory modes last: their contents are written by now.
    chmod(root, "readonly", 0o555)?;
    chmod(root, "private", 0o700)?;
    chmod(root, "", 0o755)?;

    // Mtimes deepest first, so that setting a child's does not disturb its parent's.
    let mut all = Vec::new();
    walk(root, Path::new(""), &mut all)?;
    all.sort_by_key(|rel| std::cmp::Reverse(rel.components().count()));
    all.push(PathBuf::new());
    for (i, rel) in all.iter().enumerate() {
        let i = i as i64;
        let t = FileTime::from_unix_time(
            1_600_000_000 + i * 3_607,
            ((i * 7_919 + 123) % 1_000_000_000) as u32,
        );
        let path = root.join(rel);
        filetime::set_symlink_file_times(&path, t, t)
            .with_context(|| format!("setting mtime of {}", path.display()))?;
    }
    Ok(stats)
}

/// Every path under `dir` (relative to the walk's root), not following symlinks.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let dir = root.join(rel);
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        out.push(child.clone());
        if is_dir {
            walk(root, &child, out)?;
        }
    }
    Ok(())
}

/// Kind of a tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else.
    Other,
}

/// What is compared of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Kind.
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Size (files only, else 0).
    pub size: u64,
    /// BLAKE3 of the contents (files only).
    pub hash: Option<String>,
    /// Link target (symlinks only).
    pub target: Option<Vec<u8>>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} mode {:o} mtime {}.{:09} size {}",
            self.kind, self.mode, self.mtime.0, self.mtime.1, self.size
        )?;
        if let Some(h) = &self.hash {
            write!(f, " blake3 {}", &h[..16])?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {:?}", OsStr::from_bytes(t))?;
        }
        Ok(())
    }
}

/// A tree as entries keyed by relative path bytes (the root itself is the empty path).
pub type Tree = BTreeMap<Vec<u8>, Entry>;

/// Records `root` and everything under it.
pub fn scan(root: &Path) -> anyhow::Result<Tree> {
    let mut rels = vec![PathBuf::new()];
    walk(root, Path::new(""), &mut rels)?;
    let mut tree = Tree::new();
    for rel in rels {
        let path = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        };
        let entry = Entry {
            kind,
            mode: md.mode() & 0o7777,
            mtime: (md.mtime(), md.mtime_nsec()),
            size: if kind == Kind::File { md.len() } else { 0 },
            hash: if kind == Kind::File {
                Some(hash_file(&path)?)
            } else {
                None
            },
            target: if kind == Kind::Symlink {
                Some(std::fs::read_link(&path)?.into_os_string().into_vec())
            } else {
                None
            },
        };
        tree.insert(rel.into_os_string().into_vec(), entry);
    }
    Ok(tree)
}

/// Every difference between two scanned trees, one line each.
pub fn differences(expected: &Tree, actual: &Tree) -> Vec<String> {
    let show = |k: &[u8]| format!("{:?}", OsStr::from_bytes(k));
    let mut out = Vec::new();
    for (k, e) in expected {
        match actual.get(k) {
            None => out.push(format!("missing {}: {e}", show(k))),
            Some(a) if a != e => out.push(format!(
                "differs {}:\n    expected {e}\n    actual   {a}",
                show(k)
            )),
            Some(_) => {}
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            out.push(format!("unexpected {}: {a}", show(k)));
        }
    }
    out
}

/// Fails, listing every difference, unless the trees are equal.
pub fn ensure_same(expected: &Tree, actual: &Tree) -> anyhow::Result<()> {
    let diffs = differences(expected, actual);
    if !diffs.is_empty() {
        bail!(
            "restored tree differs from the original in {} of {} entries:\n{}",
            diffs.len(),
            expected.len(),
            diffs.join("\n")
        );
    }
    Ok(())
}

/// Where a files snapshot of absolute `source` is restored under `target`:
/// `TARGET/<source without its leading '/'>`.
pub fn restored_path(target: &Path, source: &Path) -> PathBuf {
    target.join(source.strip_prefix("/").unwrap_or(source))
}

/// Makes every directory under `root` writable by its owner (so that a non-root user can
/// remove a test tree containing 0555 directories). Errors are ignored: this is cleanup.
pub fn make_writable(root: &Path) {
    let mut all = Vec::new();
    if walk(root, Path::new(""), &mut all).is_err() {
        return;
    }
    for rel in all {
        let path = root.join(rel);
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if md.is_dir() && md.mode() & 0o200 == 0 {
                let _ = std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(md.mode() | 0o700),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_with_cp_a_compares_equal_and_a_changed_mode_does_not() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src");
        let copy = dir.path().join("copy");
        let stats = build_odd_tree(&src, 5)?;
        assert!(stats.files > 60);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&copy)
            .status()?;
        assert!(status.success());
        let expected = scan(&src)?;
        assert!(expected.values().any(|e| e.kind == Kind::Symlink));
        assert!(expected.values().any(|e| e.mtime.1 != 0));
        ensure_same(&expected, &scan(&copy)?)?;

        let t = FileTime::from_unix_time(1_600_000_000, 1);
        filetime::set_file_mtime(copy.join("plain.txt"), t)?;
        std::fs::set_permissions(copy.join("run.sh"), std::fs::Permissions::from_mode(0o700))?;
        let diffs = differences(&expected, &scan(&copy)?);
        // plain.txt, run.sh, and nothing else (setting times does not touch the parent).
        assert_eq!(diffs.len(), 2, "{diffs:#?}");
        make_writable(dir.path());
        Ok(())
    }
}
