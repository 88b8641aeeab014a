//! The `files` sink: recreates a [`TreeManifest`] under a target directory. This file walks
//! the tree in order; [`check`] refuses a hostile manifest first, [`dirs`] opens directories
//! without following symlinks, [`file`] writes one regular file.
//!
//! Safety first: before anything is written, every entry's path is checked (no empty path,
//! no `.`/`..` component, not absolute, no NUL, never below an entry that is a symlink), and an
//! in-place restore also checks that every entry lies inside the paths its source is configured
//! with on this host ([`check_within`]). While writing, nothing is resolved by path below the
//! target: each directory is opened relative to its parent's open handle without following a
//! symlink (`openat` with `O_NOFOLLOW`), and every entry is created, renamed and given its
//! metadata relative to such a handle or on its own open file. So neither a symlink of the
//! snapshot nor one put in place of a directory while the restore runs (by a local user who can
//! write there) can lead a write, a rename or a `chmod`/`chown` outside the target. Existing
//! files are never overwritten: a restore goes into an empty or new directory, or beside what
//! is there.
//!
//! Order: directories are created owner-writable as they come; each file is written to a short
//! random temporary name beside it (any name the filesystem accepts fits beside it), given its
//! owner, mode and mtime, then synced and renamed in the background while the next files are
//! written, so no torn file ever carries a real name and the restore waits for the disk only at
//! its end; symlinks are created as they come. Directory modes and mtimes are applied last,
//! deepest first, because writing into a directory changes its mtime and a 0555 directory
//! refuses new entries. Owners are restored when the process may (root); otherwise they are
//! left as is.
//!
//! Directories that already exist keep their mode and owner until the restore has succeeded
//! (one the restoring user cannot write into is opened up for the restore's duration only); a
//! failed restore puts back the mode and owner of every existing directory it touched.
//!
//! The data chunks arrive in manifest order, so every file entry consumes its chunks in turn.
//!
//! The unit tests below (half of this file) restore whole trees through [`restore_tree`], so
//! they cover `check`, `dirs` and `file` together and stay here.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetvault_common::{ChunkRef, EntryKind, TreeEntry, TreeManifest};
use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

use super::direct::Staging;
use super::durable::Syncer;

mod check;
mod dirs;
mod file;

use check::check_paths;
pub(crate) use check::check_within;
use dirs::{is_dir, open_dir, Dirs};
use file::{finish_file, ignore_eperm, owner, restore_file, times};

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
    let mut dirs = Dirs::open(target)?;
    let mut existing = Vec::new();
    let result = write_tree(&mut dirs, tree, &rels, next, written, &mut existing);
    if result.is_err() {
        // Existing directories as they were (best effort: the restore's error is the news).
        for (rel, was) in existing.iter().rev() {
            if let Err(e) = put_back(&mut dirs, rel, was) {
                tracing::warn!(error = %format!("{e:#}"), "cannot put an existing directory back as it was");
            }
        }
    }
    result
}

/// The mode and owner of a directory that existed before the restore.
#[derive(Debug, Clone, Copy)]
struct Was {
    mode: u32,
    uid: u32,
    gid: u32,
}

fn write_tree(
    dirs: &mut Dirs,
    tree: &TreeManifest,
    rels: &[PathBuf],
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    existing: &mut Vec<(PathBuf, Was)>,
) -> anyhow::Result<()> {
    let mut created: Vec<(&Path, &TreeEntry)> = Vec::new();
    // Files are synced, renamed into place and given their metadata in the background while
    // the next ones are written.
    let syncer = Syncer::new(SYNC_THREADS, SYNC_QUEUE);
    let mut staging = Staging::new();
    let mut files = HashSet::new();
    for (entry, rel) in tree.entries.iter().zip(rels) {
        let dest = dirs.shown(rel);
        let parent = dirs.dir(rel.parent().unwrap_or(Path::new("")), true)?;
        let name = rel.file_name().context("snapshot entry without a name")?;
        match entry.kind {
            EntryKind::Dir => {
                match rustix::fs::statat(&*parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if is_dir(st.st_mode) => {
                        let was = Was {
                            mode: st.st_mode & 0o7777,
                            uid: st.st_uid,
                            gid: st.st_gid,
                        };
                        if !existing.iter().any(|(r, _)| r == rel) {
                            existing.push((rel.clone(), was));
                        }
                        // Left as it is unless this user cannot add entries to it.
                        let access = rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK;
                        if rustix::fs::accessat(&*parent, name, access, AtFlags::EACCESS).is_err() {
                            let dir = open_dir(parent.as_fd(), name, OFlags::RDONLY, &dest)?;
                            rustix::fs::fchmod(&dir, Mode::from(was.mode | 0o700))
                                .map_err(io::Error::from)
                                .with_context(|| format!("opening up {}", dest.display()))?;
                        }
                    }
                    Ok(_) => bail!(
                        "cannot restore directory {}: something else is there",
                        dest.display()
                    ),
                    Err(Errno::NOENT) => {
                        // Writable until the end, whatever the snapshot's mode: its contents follow.
                        rustix::fs::mkdirat(&*parent, name, Mode::from(0o700))
                            .map_err(io::Error::from)
                            .with_context(|| format!("creating directory {}", dest.display()))?;
                    }
                    Err(e) => {
                        return Err(io::Error::from(e))
                            .with_context(|| format!("checking {}", dest.display()))
                    }
                }
                created.push((rel, entry));
            }
            EntryKind::File => {
                // A file written by this restore may still wait for its rename.
                if !files.insert(rel.clone()) {
                    bail!(
                        "cannot restore {}: it already exists (restore into an empty directory)",
                        dest.display()
                    );
                }
                let (f, tmp) =
                    restore_file(&parent, name, &dest, entry, next, written, &mut staging)?;
                let entry = entry.clone();
                let name = name.to_owned();
                syncer.submit(move || {
                    let r = finish_file(f, &parent, &tmp, &name, &entry, &dest);
                    if r.is_err() {
                        let _ = rustix::fs::unlinkat(&*parent, tmp.as_os_str(), AtFlags::empty());
                    }
                    r
                })?;
            }
            EntryKind::Symlink => {
                let link_target = entry.target.as_deref().with_context(|| {
                    format!(
                        "snapshot entry {} is a symlink without a target",
                        dest.display()
                    )
                })?;
                rustix::fs::symlinkat(OsStr::from_bytes(link_target), &*parent, name)
                    .map_err(io::Error::from)
                    .with_context(|| format!("creating symlink {}", dest.display()))?;
                let (uid, gid) = owner(entry);
                ignore_eperm(rustix::fs::chownat(
                    &*parent,
                    name,
                    uid,
                    gid,
                    AtFlags::SYMLINK_NOFOLLOW,
                ))
                .with_context(|| format!("setting owner of {}", dest.display()))?;
                rustix::fs::utimensat(&*parent, name, &times(entry), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)
                    .with_context(|| format!("setting mtime of {}", dest.display()))?;
            }
        }
    }
    syncer.finish()?;
    // Deepest first: a parent's mtime is set after its children stop changing it.
    created.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, entry) in created {
        let dest = dirs.shown(rel);
        let parent = dirs.dir(rel.parent().unwrap_or(Path::new("")), false)?;
        let name = rel.file_name().context("snapshot entry without a name")?;
        set_dir_meta(parent.as_fd(), name, &dest, entry.mode, Some(entry))?;
    }
    Ok(())
}

/// Puts an existing directory's mode and owner back as they were before the restore.
fn put_back(dirs: &mut Dirs, rel: &Path, was: &Was) -> anyhow::Result<()> {
    let dest = dirs.shown(rel);
    let parent = dirs.dir(rel.parent().unwrap_or(Path::new("")), false)?;
    let name = rel.file_name().context("entry without a name")?;
    let dir = open_dir(parent.as_fd(), name, OFlags::RDONLY, &dest)?;
    let st = rustix::fs::fstat(&dir).map_err(io::Error::from)?;
    if (st.st_uid, st.st_gid) != (was.uid, was.gid) {
        ignore_eperm(rustix::fs::fchown(
            &dir,
            Some(Uid::from_raw(was.uid)),
            Some(Gid::from_raw(was.gid)),
        ))?;
    }
    rustix::fs::fchmod(&dir, Mode::from(was.mode))
        .map_err(io::Error::from)
        .with_context(|| format!("setting mode of {}", dest.display()))
}

/// Gives a directory its owner, mode and (with `entry`) mtime, through its own open handle;
/// where this user may not open it (no read permission), through its parent without
/// following a symlink.
fn set_dir_meta(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    dest: &Path,
    mode: u32,
    entry: Option<&TreeEntry>,
) -> anyhow::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(dir) => {
            if let Some(e) = entry {
                let (uid, gid) = owner(e);
                ignore_eperm(rustix::fs::fchown(&dir, uid, gid))
                    .with_context(|| format!("setting owner of {}", dest.display()))?;
            }
            rustix::fs::fchmod(&dir, Mode::from(mode))
                .map_err(io::Error::from)
                .with_context(|| format!("setting mode of {}", dest.display()))?;
            if let Some(e) = entry {
                rustix::fs::futimens(&dir, &times(e))
                    .map_err(io::Error::from)
                    .with_context(|| format!("setting mtime of {}", dest.display()))?;
            }
            Ok(())
        }
        Err(Errno::ACCESS) => {
            let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io::Error::from)
                .with_context(|| format!("checking {}", dest.display()))?;
            if !is_dir(st.st_mode) {
                bail!("refusing to set the mode of {}: it is no longer a directory", dest.display());
            }
            if let Some(e) = entry {
                let (uid, gid) = owner(e);
                ignore_eperm(rustix::fs::chownat(parent, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW))
                    .with_context(|| format!("setting owner of {}", dest.display()))?;
            }
            rustix::fs::chmodat(parent, name, Mode::from(mode), AtFlags::empty())
                .map_err(io::Error::from)
                .with_context(|| format!("setting mode of {}", dest.display()))?;
            if let Some(e) = entry {
                rustix::fs::utimensat(parent, name, &times(e), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)
                    .with_context(|| format!("setting mtime of {}", dest.display()))?;
            }
            Ok(())
        }
        Err(Errno::LOOP | Errno::NOTDIR) => bail!(
            "refusing to set the mode of {}: it is no longer a directory (a symlink would lead outside the target)",
            dest.display()
        ),
        Err(e) => Err(io::Error::from(e)).with_context(|| format!("opening {}", dest.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filetime::FileTime;
    use fleetvault_common::ChunkId;
    use std::os::unix::fs::PermissionsExt;

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
    fn names_up_to_255_bytes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let mut entries = vec![entry(b"d", EntryKind::Dir, b"")];
        for len in [236, 250, 255] {
            let name = "n".repeat(len);
            entries.push(entry(
                format!("d/{name}").as_bytes(),
                EntryKind::File,
                b"hello",
            ));
            entries.push(entry(name.as_bytes(), EntryKind::File, b"hello"));
        }
        restore(&target, entries).unwrap();
        for len in [236, 250, 255] {
            let name = "n".repeat(len);
            assert_eq!(fs::read(target.join("d").join(&name)).unwrap(), b"hello");
            assert_eq!(fs::read(target.join(&name)).unwrap(), b"hello");
        }
        assert_eq!(listing(&target).len(), 7, "{:?}", listing(&target));
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_mid_restore_leads_nowhere_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        let target = dir.path().join("t");
        let mut d = entry(b"d", EntryKind::Dir, b"");
        d.mode = 0o711;
        let tree = TreeManifest {
            entries: vec![
                d,
                entry(b"d/x", EntryKind::File, b"hello"),
                entry(b"f", EntryKind::File, b"hello"),
            ],
        };
        // While `f` is written, a local user who may write into the target puts a symlink to
        // `outside` in place of `d` (whose mode is set at the end).
        let mut calls = 0;
        let (t, o) = (target.clone(), outside.clone());
        let r = restore_tree(
            &target,
            &tree,
            &mut |_| {
                calls += 1;
                if calls == 2 {
                    // `d/x` is renamed in the background: let it land first.
                    for _ in 0..500 {
                        if t.join("d/x").exists() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    #[allow(clippy::disallowed_methods)] // the local user's move, not a restore's
                    fs::rename(t.join("d"), t.join("d.moved")).unwrap();
                    std::os::unix::fs::symlink(&o, t.join("d")).unwrap();
                }
                Ok(bytes::Bytes::from_static(b"hello"))
            },
            &mut |_| {},
        );
        let md = fs::metadata(&outside).unwrap();
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o755,
            "outside was chmodded"
        );
        assert!(
            listing(&outside).is_empty(),
            "wrote outside: {:?}",
            listing(&outside)
        );
        let err = r.unwrap_err();
        assert!(
            format!("{err:#}").contains("no longer a directory"),
            "{err:#}"
        );
        assert_eq!(fs::read(target.join("d.moved/x")).unwrap(), b"hello");
    }

    #[test]
    fn a_failed_restore_leaves_existing_directories_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        fs::create_dir_all(target.join("d")).unwrap();
        fs::set_permissions(target.join("d"), fs::Permissions::from_mode(0o751)).unwrap();
        let mut d = entry(b"d", EntryKind::Dir, b"");
        d.mode = 0o700;
        let tree = TreeManifest {
            entries: vec![d, entry(b"d/x", EntryKind::File, b"hello")],
        };
        let err = restore_tree(
            &target,
            &tree,
            &mut |_| Err(io::Error::other("the coordinator went away")),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("went away"), "{err:#}");
        let md = fs::metadata(target.join("d")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o751);
        assert_eq!(
            listing(&target),
            vec![PathBuf::from("d")],
            "a temp file was left"
        );
        // The same restore succeeding gives the directory the snapshot's mode.
        restore(&target, tree.entries.clone()).unwrap();
        let md = fs::metadata(target.join("d")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn an_in_place_restore_stays_inside_the_configured_paths() {
        let paths = [
            PathBuf::from("/srv/app/data"),
            PathBuf::from("/srv/app/conf.toml"),
        ];
        let ok = TreeManifest {
            entries: vec![
                entry(b"srv/app/data", EntryKind::Dir, b""),
                entry(b"srv/app/data/a", EntryKind::File, b"hello"),
                entry(b"srv/app/conf.toml", EntryKind::File, b"hello"),
            ],
        };
        check_within(&ok, &paths).unwrap();
        for bad in [
            &b"etc/cron.d/evil"[..],
            b"srv/app",
            b"srv/app/data2/x",
            b"srv/app/conf.toml.d/x",
        ] {
            let mut t = ok.clone();
            t.entries.push(entry(bad, EntryKind::File, b"hello"));
            let err = check_within(&t, &paths).unwrap_err().to_string();
            let shown = format!("/{}", String::from_utf8_lossy(bad));
            assert!(err.contains(&shown) && err.contains("outside"), "{err}");
        }
        check_within(&ok, &[PathBuf::from("/")]).unwrap();
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
