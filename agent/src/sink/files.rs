//! The `files` sink: recreates a [`TreeManifest`] under a target directory.
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

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fleetvault_common::{ChunkRef, EntryKind, TreeEntry, TreeManifest};
use rustix::fs::{AtFlags, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use super::direct::{self, DirectWriter, Staging};
use super::durable::{self, Syncer};

/// Threads syncing and finishing written files, and files waiting for them.
const SYNC_THREADS: usize = 4;
const SYNC_QUEUE: usize = 64;

/// Fetches the verified plaintext of the next chunk, which must be the one given.
pub(crate) type NextChunk<'a> = dyn FnMut(&ChunkRef) -> io::Result<bytes::Bytes> + 'a;

/// Refuses `tree` unless every entry lies inside one of `paths` (absolute paths, as a files
/// source is configured): what an in-place restore of a files source may write. Checked before
/// anything is written; the error names the first entry outside.
pub(crate) fn check_within(tree: &TreeManifest, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut allowed = Vec::with_capacity(paths.len());
    for p in paths {
        let mut bytes: Vec<u8> = Vec::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => {
                    if !bytes.is_empty() {
                        bytes.push(b'/');
                    }
                    bytes.extend_from_slice(n.as_bytes());
                }
                _ => bail!(
                    "configured path {} is not a plain absolute path: cannot tell what a restore may write",
                    p.display()
                ),
            }
        }
        allowed.push(bytes);
    }
    for e in &tree.entries {
        let inside = allowed.iter().any(|a| {
            a.is_empty()
                || (e.path.starts_with(a)
                    && (e.path.len() == a.len() || e.path.get(a.len()) == Some(&b'/')))
        });
        if !inside {
            bail!(
                "refusing snapshot entry /{}: it is outside the paths this source is configured with here ({}); nothing was written",
                String::from_utf8_lossy(&e.path),
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

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

fn is_dir(st_mode: u32) -> bool {
    rustix::fs::FileType::from_raw_mode(st_mode) == rustix::fs::FileType::Directory
}

/// Open handles of the directories from the target down to the one entries go into now (a
/// manifest comes depth first, so consecutive entries share most of them).
struct Dirs {
    target: PathBuf,
    root: Arc<OwnedFd>,
    chain: Vec<(OsString, Arc<OwnedFd>)>,
}

impl Dirs {
    /// The target itself (the operator's path: a symlink there is followed).
    fn open(target: &Path) -> anyhow::Result<Self> {
        let root = rustix::fs::openat(
            rustix::fs::CWD,
            target,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .with_context(|| format!("opening restore target {}", target.display()))?;
        Ok(Self {
            target: target.to_owned(),
            root: Arc::new(root),
            chain: Vec::new(),
        })
    }

    /// `rel` under the target, for messages.
    fn shown(&self, rel: &Path) -> PathBuf {
        self.target.join(rel)
    }

    /// The directory `rel` below the target, each component opened without following a
    /// symlink; missing ones are created when `create`, and anything but a directory refused.
    fn dir(&mut self, rel: &Path, create: bool) -> anyhow::Result<Arc<OwnedFd>> {
        let comps: Vec<&OsStr> = rel.iter().collect();
        let same = self
            .chain
            .iter()
            .zip(&comps)
            .take_while(|((n, _), c)| n.as_os_str() == **c)
            .count();
        self.chain.truncate(same);
        for (i, c) in comps.iter().enumerate().skip(same) {
            let parent = self.chain.last().map_or(&self.root, |(_, fd)| fd).clone();
            let shown = self.target.join(comps[..=i].iter().collect::<PathBuf>());
            let fd = match open_dir(parent.as_fd(), c, OFlags::PATH, &shown) {
                Err(e) if create && is_not_found(&e) => {
                    match rustix::fs::mkdirat(&*parent, *c, Mode::from(0o777)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(io::Error::from(e))
                                .with_context(|| format!("creating directory {}", shown.display()))
                        }
                    }
                    open_dir(parent.as_fd(), c, OFlags::PATH, &shown)?
                }
                other => other?,
            };
            self.chain.push((c.to_os_string(), Arc::new(fd)));
        }
        Ok(self.chain.last().map_or(&self.root, |(_, fd)| fd).clone())
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Opens directory `name` in `parent` without following a symlink (`how`: `PATH` to walk
/// through, `RDONLY` to change it); a symlink or anything else is refused.
fn open_dir(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    how: OFlags,
    shown: &Path,
) -> anyhow::Result<OwnedFd> {
    let flags = how | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::LOOP | Errno::NOTDIR) => bail!(
            "refusing to restore below {}: it is not a directory (a symlink would lead outside the target)",
            shown.display()
        ),
        Err(e) => Err(anyhow::Error::new(io::Error::from(e)))
            .with_context(|| format!("opening directory {}", shown.display())),
    }
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

/// Writes a file's content under a fresh temporary name in `parent` (large files with
/// `O_DIRECT` where the filesystem allows it); returns the open file and that name (the caller
/// finishes and renames it).
fn restore_file(
    parent: &OwnedFd,
    name: &OsStr,
    dest: &Path,
    entry: &TreeEntry,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    staging: &mut Staging,
) -> anyhow::Result<(File, OsString)> {
    if rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        bail!(
            "cannot restore {}: it already exists (restore into an empty directory)",
            dest.display()
        );
    }
    let (created, tmp) = durable::create_temp(parent.as_fd(), 0o600)
        .with_context(|| format!("creating a temporary file for {}", dest.display()))?;
    let result = fill_file(created, parent, &tmp, dest, entry, next, written, staging);
    if result.is_err() {
        let _ = rustix::fs::unlinkat(parent, tmp.as_os_str(), AtFlags::empty());
    }
    result.map(|f| (f, tmp))
}

/// Writes a file's chunks into `created` (the file `tmp` in `parent`), directly when it is
/// large and the filesystem allows it; returns the handle to finish.
#[allow(clippy::too_many_arguments)]
fn fill_file(
    mut created: File,
    parent: &OwnedFd,
    tmp: &OsStr,
    dest: &Path,
    entry: &TreeEntry,
    next: &mut NextChunk<'_>,
    written: &mut dyn FnMut(u64),
    staging: &mut Staging,
) -> anyhow::Result<File> {
    let direct = if entry.size >= direct::DIRECT_MIN {
        direct::reopen_direct(parent.as_fd(), tmp, &created)
            .with_context(|| format!("opening {} for direct writes", dest.display()))?
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

/// Owner, mode and mtime on the open file, then sync, then the rename to its name in
/// `parent` (never replacing anything): it appears under its real name only whole.
fn finish_file(
    f: File,
    parent: &OwnedFd,
    tmp: &OsStr,
    name: &OsStr,
    entry: &TreeEntry,
    dest: &Path,
) -> anyhow::Result<()> {
    let (uid, gid) = owner(entry);
    // The owner before the mode: a chown clears the set-id bits the mode may carry.
    ignore_eperm(rustix::fs::fchown(&f, uid, gid))
        .with_context(|| format!("setting owner of {}", dest.display()))?;
    rustix::fs::fchmod(&f, Mode::from(entry.mode))
        .map_err(io::Error::from)
        .with_context(|| format!("setting mode of {}", dest.display()))?;
    rustix::fs::futimens(&f, &times(entry))
        .map_err(io::Error::from)
        .with_context(|| format!("setting mtime of {}", dest.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    drop(f);
    durable::rename_new(parent.as_fd(), tmp, name)
        .with_context(|| format!("renaming into {}", dest.display()))
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

fn times(entry: &TreeEntry) -> Timestamps {
    let t = Timespec {
        tv_sec: entry.mtime,
        tv_nsec: i64::from(entry.mtime_nsec.min(999_999_999)) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// The entry's owner (an id of -1, which no file has, is left unchanged).
fn owner(entry: &TreeEntry) -> (Option<Uid>, Option<Gid>) {
    (
        (entry.uid != u32::MAX).then(|| Uid::from_raw(entry.uid)),
        (entry.gid != u32::MAX).then(|| Gid::from_raw(entry.gid)),
    )
}

/// An owner change this process may not make (not root) leaves the restoring user's.
fn ignore_eperm(r: rustix::io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(Errno::PERM) => Ok(()),
        Err(e) => Err(e.into()),
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
