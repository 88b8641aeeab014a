//! The `files` sink: recreates a [`TreeManifest`] under a target directory.
//!
//! Safety first: before anything is written, every entry's path is checked (no empty path,
//! no `.`/`..` component, not absolute, no NUL, never below an entry that is a symlink), and
//! while writing, every existing parent is checked with `lstat` to be a real directory, so a
//! hostile or damaged manifest cannot write outside the target. Existing files are never
//! overwritten: a restore goes into an empty or new directory.
//!
//! Order: directories are created owner-writable as they come; each file is written to a
//! temporary name beside it, then synced and renamed in the background while the next files
//! are written, so no torn file ever carries a real name and the restore waits for the disk
//! only at its end;
//! symlinks are created as they come. Directory modes and mtimes are applied last, deepest
//! first, because writing into a directory changes its mtime and a 0555 directory refuses new
//! entries. Owners are restored when the process may (root); otherwise they are left as is.
//!
//! The data chunks arrive in manifest order, so every file entry consumes its chunks in turn.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use filetime::FileTime;
use fleetvault_common::{ChunkRef, EntryKind, TreeEntry, TreeManifest};

use super::direct::{self, DirectWriter, Staging};
use super::durable::Syncer;

/// Threads syncing and finishing written files, and files waiting for them.
const SYNC_THREADS: usize = 4;
const SYNC_QUEUE: usize = 64;

/// Fetches the verified plaintext of the next chunk, which must be the one given.
pub(crate) type NextChunk<'a> = dyn FnMut(&ChunkRef) -> io::Result<bytes::Bytes> + 'a;

/// Restores `tree` under `target` (created if missing); `written` is told about every block of
/// file bytes written.
pub(crate) fn restore_tree(
    target: &Path,
    tree: &TreeManifest,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
) -> anyhow::Result<()> {
    let rels = check_paths(tree)?;
    fs::create_dir_all(target)
        .with_context(|| format!("creating restore target {}", target.display()))?;
    let mut dirs: Vec<(PathBuf, &TreeEntry)> = Vec::new();
    // Files are synced, renamed into place and given their metadata in the background while
    // the next ones are written.
    let syncer = Syncer::new(SYNC_THREADS, SYNC_QUEUE);
    let mut staging = Staging::new();
    let mut files = HashSet::new();
    for (entry, rel) in tree.entries.iter().zip(&rels) {
        let dest = target.join(rel);
        ensure_parents(target, rel)?;
        match entry.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&dest) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => bail!(
                        "cannot restore directory {}: something else is there",
                        dest.display()
                    ),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&dest)
                            .with_context(|| format!("creating directory {}", dest.display()))?;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("checking {}", dest.display()))
                    }
                }
                // Writable until the end, whatever the snapshot's mode: its contents follow.
                fs::set_permissions(&dest, fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("setting mode of {}", dest.display()))?;
                dirs.push((dest, entry));
            }
            EntryKind::File => {
                // A file written by this restore may still wait for its rename.
                if !files.insert(dest.clone()) {
                    bail!(
                        "cannot restore {}: it already exists (restore into an empty directory)",
                        dest.display()
                    );
                }
                let (f, tmp) = restore_file(&dest, entry, next, written, &mut staging)?;
                let entry = entry.clone();
                syncer.submit(move || {
                    // Temp, fsync, rename: a file appears under its real name only whole.
                    f.sync_all()
                        .with_context(|| format!("syncing {}", dest.display()))?;
                    drop(f);
                    #[allow(clippy::disallowed_methods)]
                    fs::rename(&tmp, &dest)
                        .with_context(|| format!("renaming into {}", dest.display()))?;
                    apply_owner(&dest, &entry)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode))
                        .with_context(|| format!("setting mode of {}", dest.display()))?;
                    set_mtime(&dest, &entry)
                })?;
            }
            EntryKind::Symlink => {
                let link_target = entry.target.as_deref().with_context(|| {
                    format!(
                        "snapshot entry {} is a symlink without a target",
                        dest.display()
                    )
                })?;
                std::os::unix::fs::symlink(OsStr::from_bytes(link_target), &dest)
                    .with_context(|| format!("creating symlink {}", dest.display()))?;
                apply_owner(&dest, entry)?;
                set_mtime(&dest, entry)?;
            }
        }
    }
    syncer.finish()?;
    // Deepest first: a parent's mtime is set after its children stop changing it.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dest, entry) in dirs {
        apply_owner(&dest, entry)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode))
            .with_context(|| format!("setting mode of {}", dest.display()))?;
        set_mtime(&dest, entry)?;
    }
    Ok(())
}

/// Checks every entry's path and returns them as relative paths, or refuses the manifest.
fn check_paths(tree: &TreeManifest) -> anyhow::Result<Vec<PathBuf>> {
    let mut links: HashSet<&[u8]> = HashSet::new();
    let mut out = Vec::with_capacity(tree.entries.len());
    for e in &tree.entries {
        let shown = String::from_utf8_lossy(&e.path);
        let refuse = |why: &str| anyhow::anyhow!("refusing snapshot entry {shown:?}: {why}");
        if e.path.is_empty() {
            return Err(refuse("empty path"));
        }
        if e.path.contains(&0) {
            return Err(refuse("NUL byte in path"));
        }
        if e.path[0] == b'/' {
            return Err(refuse("absolute path"));
        }
        let path = Path::new(OsStr::from_bytes(&e.path));
        let mut rel = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => rel.push(n),
                _ => return Err(refuse("path has a `.` or `..` component")),
            }
        }
        // `Path::components` silently drops `.` and repeated slashes; refuse them too.
        if e.path
            .split(|&b| b == b'/')
            .any(|c| c.is_empty() || c == b".")
        {
            return Err(refuse("path has an empty or `.` component"));
        }
        for (i, &b) in e.path.iter().enumerate() {
            if b == b'/' && links.contains(&e.path[..i]) {
                return Err(refuse("path goes through a symlink of the snapshot"));
            }
        }
        if e.kind == EntryKind::Symlink {
            links.insert(&e.path);
        }
        out.push(rel);
    }
    Ok(out)
}

/// Creates the missing parents of `rel` under `target`, refusing any that is not a real
/// directory (a symlink placed there would lead outside the target).
fn ensure_parents(target: &Path, rel: &Path) -> anyhow::Result<()> {
    let mut at = target.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => bail!(
                "refusing to restore below {}: it is not a directory (a symlink would lead outside the target)",
                at.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).with_context(|| format!("creating directory {}", at.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", at.display())),
        }
    }
    Ok(())
}

/// Writes a file's content under a temporary name beside `dest` (large files with `O_DIRECT`
/// where the filesystem allows it); returns the open file and that name (the caller syncs and
/// renames it).
fn restore_file(
    dest: &Path,
    entry: &TreeEntry,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    staging: &mut Staging,
) -> anyhow::Result<(File, PathBuf)> {
    if fs::symlink_metadata(dest).is_ok() {
        bail!(
            "cannot restore {}: it already exists (restore into an empty directory)",
            dest.display()
        );
    }
    let name = dest.file_name().context("file entry without a name")?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".fleetvault-restore");
    let tmp = dest.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    // O_EXCL: never follows a symlink someone put at the temporary name.
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let result = fill_file(created, &tmp, dest, entry, next, written, staging);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|f| (f, tmp))
}

/// Writes a file's chunks into `created` (the file at `tmp`), directly when it is large and
/// the filesystem allows it; returns the handle to sync.
fn fill_file(
    mut created: File,
    tmp: &Path,
    dest: &Path,
    entry: &TreeEntry,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    staging: &mut Staging,
) -> anyhow::Result<File> {
    let direct = if entry.size >= direct::DIRECT_MIN {
        direct::reopen_direct(tmp, &created)
            .with_context(|| format!("opening {}", tmp.display()))?
    } else {
        None
    };
    let Some(mut d) = direct else {
        write_chunks(&mut created, entry, next, written, dest)?;
        return Ok(created);
    };
    let mut w = DirectWriter::new(&mut d, staging);
    write_chunks(&mut w, entry, next, written, dest)?;
    w.finish()
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok(d)
}

fn write_chunks(
    f: &mut dyn Write,
    entry: &TreeEntry,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    dest: &Path,
) -> anyhow::Result<()> {
    let mut len = 0u64;
    for c in &entry.chunks {
        let plain = next(c).with_context(|| format!("restoring {}", dest.display()))?;
        f.write_all(&plain)
            .with_context(|| format!("writing {}", dest.display()))?;
        len += plain.len() as u64;
        written(plain.len() as u64);
    }
    if len != entry.size {
        bail!(
            "restoring {}: {len} bytes of chunks where the snapshot says {}",
            dest.display(),
            entry.size
        );
    }
    Ok(())
}

fn set_mtime(path: &Path, entry: &TreeEntry) -> anyhow::Result<()> {
    let t = FileTime::from_unix_time(entry.mtime, entry.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t)
        .with_context(|| format!("setting mtime of {}", path.display()))
}

/// Restores the owner when allowed; an unprivileged restore keeps the restoring user's.
fn apply_owner(path: &Path, entry: &TreeEntry) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(path).with_context(|| format!("checking {}", path.display()))?;
    if md.uid() == entry.uid && md.gid() == entry.gid {
        return Ok(());
    }
    match std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(e).with_context(|| format!("setting owner of {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetvault_common::ChunkId;

    fn entry(path: &[u8], kind: EntryKind, data: &[u8]) -> TreeEntry {
        TreeEntry {
            path: path.to_vec(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            mtime_nsec: 42,
            size: if kind == EntryKind::File {
                data.len() as u64
            } else {
                0
            },
            inode: 0,
            target: (kind == EntryKind::Symlink).then(|| data.to_vec()),
            chunks: if kind == EntryKind::File && !data.is_empty() {
                vec![ChunkRef {
                    id: ChunkId::of(data),
                    len: data.len() as u32,
                }]
            } else {
                Vec::new()
            },
        }
    }

    fn restore(target: &Path, entries: Vec<TreeEntry>) -> anyhow::Result<()> {
        let tree = TreeManifest { entries };
        let data = vec![bytes::Bytes::from_static(b"hello"); 8];
        let mut it = data.into_iter();
        restore_tree(
            target,
            &tree,
            &mut |_| it.next().ok_or_else(|| io::Error::other("no more chunks")),
            &mut |_| {},
        )
    }

    /// Everything under `dir`, recursively, as relative paths.
    fn listing(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_tree_round_trips_with_modes_and_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let mut ro = entry(b"src/ro", EntryKind::Dir, b"");
        ro.mode = 0o555;
        restore(
            &target,
            vec![
                entry(b"src", EntryKind::Dir, b""),
                entry(b"src/a.txt", EntryKind::File, b"hello"),
                ro,
                entry(b"src/ro/b.txt", EntryKind::File, b"hello"),
                entry(b"src/link", EntryKind::Symlink, b"a.txt"),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(target.join("src/ro/b.txt")).unwrap(), b"hello");
        assert_eq!(
            fs::read_link(target.join("src/link")).unwrap(),
            Path::new("a.txt")
        );
        let md = fs::metadata(target.join("src/ro")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o555);
        let mt = FileTime::from_last_modification_time(&md);
        assert_eq!((mt.unix_seconds(), mt.nanoseconds()), (1_600_000_000, 42));
        fs::set_permissions(target.join("src/ro"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn hostile_entry_paths_are_refused_and_nothing_is_written_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let cases: Vec<Vec<TreeEntry>> = vec![
            vec![entry(b"..", EntryKind::Dir, b"")],
            vec![entry(b"../outside/x", EntryKind::File, b"hello")],
            vec![entry(b"a/../../outside/x", EntryKind::File, b"hello")],
            vec![entry(b"/etc/evil", EntryKind::File, b"hello")],
            vec![entry(b"", EntryKind::File, b"hello")],
            vec![entry(b"a//b", EntryKind::File, b"hello")],
            vec![entry(b"./a", EntryKind::File, b"hello")],
            vec![entry(b"a\0b", EntryKind::File, b"hello")],
            // A symlink of the snapshot, then a file through it.
            vec![
                entry(b"esc", EntryKind::Symlink, outside.as_os_str().as_bytes()),
                entry(b"esc/x", EntryKind::File, b"hello"),
            ],
        ];
        for (i, entries) in cases.into_iter().enumerate() {
            let target = dir.path().join(format!("t{i}"));
            let err = restore(&target, entries.clone()).unwrap_err();
            assert!(format!("{err:#}").contains("refusing"), "case {i}: {err:#}");
            assert!(!target.exists(), "case {i} wrote into the target");
        }
        // A symlink already in the target is not followed either.
        let target = dir.path().join("pre");
        fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("esc")).unwrap();
        let err = restore(&target, vec![entry(b"esc/x", EntryKind::File, b"hello")]).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
        assert!(
            listing(&outside).is_empty(),
            "wrote outside: {:?}",
            listing(&outside)
        );
    }

    #[test]
    fn existing_files_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"keep").unwrap();
        let err = restore(dir.path(), vec![entry(b"a", EntryKind::File, b"hello")]).unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"keep");
    }
}
