//! The `files` source: walks the configured paths and yields a [`TreeManifest`], streaming
//! each regular file's bytes through the caller's chunker.
//!
//! - Entries are visited depth first with children sorted by name, so a directory always comes
//!   before what it contains (the order the sink needs).
//! - Paths in the manifest are the absolute source paths without their leading `/`: a restore
//!   under `TARGET` recreates `TARGET/<path>`.
//! - A configured path that is a symlink is followed; below it symlinks are recorded, never
//!   followed. Sockets, FIFOs and devices are skipped with a warning.
//! - A file whose size, mtime and inode match its entry in the parent snapshot is not read
//!   again: its chunk list is reused.
//! - A file that changes while it is read is reported as a warning, stored as read, and
//!   marked (inode 0) so that the next backup reads it again.
//! - A file or directory that cannot be opened (permission denied, vanished) is skipped with a
//!   warning; a failure while chunking (the upload stopped) ends the backup.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleetvault_common::{ChunkRef, EntryKind, TreeEntry, TreeManifest};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// What to back up.
#[derive(Debug, Clone)]
pub(crate) struct FilesSpec {
    /// Absolute paths (files or directories).
    pub(crate) paths: Vec<PathBuf>,
    /// Glob patterns; matched against each entry's path relative to its source path and
    /// against its file name.
    pub(crate) exclude: Vec<String>,
}

/// What the walk noticed besides the tree itself.
#[derive(Debug, Default)]
pub(crate) struct WalkReport {
    /// Problems the operator should know about (skipped or torn files).
    pub(crate) warnings: Vec<String>,
    /// Files whose content was reused from the parent snapshot without reading them.
    pub(crate) files_unchanged: u64,
}

/// Streams one reader through the chunker and returns its chunk list.
pub(crate) type ChunkFn<'a> = dyn FnMut(&mut dyn Read) -> io::Result<Vec<ChunkRef>> + 'a;

/// Walks `spec`, chunking every changed file with `chunk`; `on_entry` sees each entry as it
/// is added (for progress).
pub(crate) fn walk(
    spec: &FilesSpec,
    parent: Option<&TreeManifest>,
    chunk: &mut ChunkFn<'_>,
    on_entry: &mut dyn FnMut(&TreeEntry),
) -> anyhow::Result<(TreeManifest, WalkReport)> {
    let exclude = build_globs(&spec.exclude)?;
    let previous: HashMap<&[u8], &TreeEntry> = parent
        .map(|t| t.entries.iter().map(|e| (e.path.as_slice(), e)).collect())
        .unwrap_or_default();
    let mut walker = Walker {
        exclude,
        previous,
        chunk,
        on_entry,
        tree: TreeManifest::default(),
        report: WalkReport::default(),
    };
    // `a/b/` and `a/./b` name `a/b`: manifest paths must never hold empty or `.` components.
    let mut roots: Vec<PathBuf> = spec
        .paths
        .iter()
        .map(|p| p.components().collect())
        .collect();
    roots.sort();
    roots.dedup();
    for root in &roots {
        // A root inside another root is already covered by the outer walk.
        if roots.iter().any(|r| r != root && root.starts_with(r)) {
            continue;
        }
        let md =
            fs::metadata(root).with_context(|| format!("files source path {}", root.display()))?;
        walker.entry(root, Path::new(""), md)?;
    }
    Ok((walker.tree, walker.report))
}

fn build_globs(patterns: &[String]) -> anyhow::Result<GlobSet> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p)
            .literal_separator(false)
            .build()
            .with_context(|| format!("bad exclude pattern {p:?}"))?;
        set.add(glob);
    }
    set.build().context("building exclude patterns")
}

struct Walker<'a, 'c> {
    exclude: GlobSet,
    previous: HashMap<&'a [u8], &'a TreeEntry>,
    chunk: &'c mut ChunkFn<'c>,
    on_entry: &'c mut dyn FnMut(&TreeEntry),
    tree: TreeManifest,
    report: WalkReport,
}

/// The manifest path of `path`: its bytes without the leading `/`.
fn manifest_path(path: &Path) -> Vec<u8> {
    let bytes = path.as_os_str().as_bytes();
    let trimmed = bytes.iter().position(|&b| b != b'/').unwrap_or(bytes.len());
    bytes[trimmed..].to_vec()
}

impl Walker<'_, '_> {
    fn warn(&mut self, text: String) {
        tracing::warn!(warning = %text, "files source");
        self.report.warnings.push(text);
    }

    fn excluded(&self, rel: &Path, name: Option<&std::ffi::OsStr>) -> bool {
        if rel.as_os_str().is_empty() {
            return false;
        }
        self.exclude.is_match(rel) || name.is_some_and(|n| self.exclude.is_match(n))
    }

    fn push(&mut self, entry: TreeEntry) {
        (self.on_entry)(&entry);
        self.tree.entries.push(entry);
    }

    /// Adds `path` (at `rel` below its source root) and, for a directory, everything below.
    fn entry(&mut self, path: &Path, rel: &Path, md: Metadata) -> anyhow::Result<()> {
        let ft = md.file_type();
        let mut entry = TreeEntry {
            path: manifest_path(path),
            kind: EntryKind::File,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            size: 0,
            inode: md.ino(),
            target: None,
            chunks: Vec::new(),
        };
        if ft.is_dir() {
            entry.kind = EntryKind::Dir;
            let children = match read_dir_sorted(path) {
                Ok(c) => c,
                Err(e) => {
                    self.warn(format!("skipped directory {}: {e}", path.display()));
                    return Ok(());
                }
            };
            self.push(entry);
            for name in children {
                let child = path.join(&name);
                let child_rel = rel.join(&name);
                if self.excluded(&child_rel, Some(&name)) {
                    continue;
                }
                match fs::symlink_metadata(&child) {
                    Ok(md) => self.entry(&child, &child_rel, md)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => self.warn(format!("skipped {}: {e}", child.display())),
                }
            }
            Ok(())
        } else if ft.is_symlink() {
            entry.kind = EntryKind::Symlink;
            match fs::read_link(path) {
                Ok(target) => {
                    entry.target = Some(target.as_os_str().as_bytes().to_vec());
                    self.push(entry);
                }
                Err(e) => self.warn(format!("skipped symlink {}: {e}", path.display())),
            }
            Ok(())
        } else if ft.is_file() {
            self.file(path, entry, &md)
        } else {
            self.warn(format!(
                "skipped {}: not a regular file, directory or symlink",
                path.display()
            ));
            Ok(())
        }
    }

    fn file(&mut self, path: &Path, mut entry: TreeEntry, before: &Metadata) -> anyhow::Result<()> {
        if let Some(prev) = self.previous.get(entry.path.as_slice()) {
            if prev.kind == EntryKind::File
                && prev.size == before.len()
                && prev.mtime == entry.mtime
                && prev.mtime_nsec == entry.mtime_nsec
                && prev.inode == entry.inode
            {
                entry.size = prev.size;
                entry.chunks = prev.chunks.clone();
                self.report.files_unchanged += 1;
                self.push(entry);
                return Ok(());
            }
        }
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.warn(format!("skipped file {}: {e}", path.display()));
                return Ok(());
            }
        };
        let chunks = (self.chunk)(&mut f).with_context(|| format!("reading {}", path.display()))?;
        let read: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        let after = f.metadata().ok();
        let changed = read != before.len()
            || after.as_ref().is_none_or(|a| {
                a.len() != before.len()
                    || a.mtime() != before.mtime()
                    || a.mtime_nsec() != before.mtime_nsec()
            });
        if changed {
            self.warn(format!(
                "file {} changed while being read: stored as read, it will be read again next time",
                path.display()
            ));
            // Inode 0 never matches a real file: the next backup reads it again even when
            // the change kept its size and fell within the same mtime tick.
            entry.inode = 0;
        }
        entry.size = read;
        entry.chunks = chunks;
        self.push(entry);
        Ok(())
    }
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        names.push(e?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetvault_common::ChunkId;

    /// A "chunker" that makes one chunk per file and remembers the bytes.
    fn one_chunk_per_file(
        store: &mut Vec<Vec<u8>>,
    ) -> impl FnMut(&mut dyn Read) -> io::Result<Vec<ChunkRef>> + '_ {
        move |r| {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf)?;
            let c = ChunkRef {
                id: ChunkId::of(&buf),
                len: buf.len() as u32,
            };
            store.push(buf);
            Ok(if c.len == 0 { Vec::new() } else { vec![c] })
        }
    }

    #[test]
    fn walk_orders_dirs_first_excludes_and_reuses_unchanged_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        fs::create_dir_all(root.join("b/inner")).unwrap();
        fs::write(root.join("a.txt"), b"a").unwrap();
        fs::write(root.join("b/inner/c.txt"), b"cc").unwrap();
        fs::write(root.join("b/skip.tmp"), b"x").unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
        let spec = FilesSpec {
            paths: vec![root.clone()],
            exclude: vec!["*.tmp".into()],
        };
        let mut store = Vec::new();
        let (tree, report) = walk(
            &spec,
            None,
            &mut one_chunk_per_file(&mut store),
            &mut |_| {},
        )
        .unwrap();
        let rel: Vec<String> = tree
            .entries
            .iter()
            .map(|e| {
                let p = String::from_utf8_lossy(&e.path).into_owned();
                p.strip_prefix(&String::from_utf8_lossy(&manifest_path(&root)).into_owned())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            rel,
            ["", "/a.txt", "/b", "/b/inner", "/b/inner/c.txt", "/link"]
        );
        assert_eq!(report.files_unchanged, 0);
        assert_eq!(store.len(), 2);
        let link = tree.entries.last().unwrap();
        assert_eq!(link.target.as_deref(), Some(&b"a.txt"[..]));

        store.clear();
        let (again, report) = walk(
            &spec,
            Some(&tree),
            &mut one_chunk_per_file(&mut store),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(report.files_unchanged, 2);
        assert!(store.is_empty(), "unchanged files were read again");
        assert_eq!(again, tree);
    }

    #[test]
    fn a_file_changed_while_read_is_reported_and_read_again_next_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        fs::create_dir(&root).unwrap();
        let log = root.join("app.log");
        fs::write(&log, vec![b'x'; 10_000]).unwrap();
        let spec = FilesSpec {
            paths: vec![root.clone()],
            exclude: Vec::new(),
        };
        // A writer appends to the file while the backup reads it.
        let mut grow = |r: &mut dyn Read| -> io::Result<Vec<ChunkRef>> {
            let mut buf = vec![0u8; 4096];
            r.read_exact(&mut buf)?;
            let mut f = fs::OpenOptions::new().append(true).open(&log)?;
            std::io::Write::write_all(&mut f, b"appended during the backup\n")?;
            r.read_to_end(&mut buf)?;
            Ok(vec![ChunkRef {
                id: ChunkId::of(&buf),
                len: buf.len() as u32,
            }])
        };
        let (tree, report) = walk(&spec, None, &mut grow, &mut |_| {}).unwrap();
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(report.warnings[0].contains("changed while being read"));
        let entry = tree.entries.last().unwrap();
        assert_eq!(
            entry.size,
            entry.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>()
        );

        let mut store = Vec::new();
        let (_, again) = walk(
            &spec,
            Some(&tree),
            &mut one_chunk_per_file(&mut store),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            again.files_unchanged, 0,
            "the torn file was trusted as unchanged"
        );
        assert_eq!(store.len(), 1);
    }
}
