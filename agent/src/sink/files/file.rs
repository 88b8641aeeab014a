//! One regular file of a restored tree: written under a temporary name (large ones with
//! `O_DIRECT`), given its owner, mode and times, then synced and renamed in the background.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context};
use fleetvault_common::TreeEntry;
use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use super::NextChunk;
use crate::sink::direct::{self, DirectWriter, Staging};
use crate::sink::durable;

/// Writes a file's content under a fresh temporary name in `parent` (large files with
/// `O_DIRECT` where the filesystem allows it); returns the open file and that name (the caller
/// finishes and renames it).
pub(super) fn restore_file(
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
pub(super) fn finish_file(
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

pub(super) fn times(entry: &TreeEntry) -> Timestamps {
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
pub(super) fn owner(entry: &TreeEntry) -> (Option<Uid>, Option<Gid>) {
    (
        (entry.uid != u32::MAX).then(|| Uid::from_raw(entry.uid)),
        (entry.gid != u32::MAX).then(|| Gid::from_raw(entry.gid)),
    )
}

/// An owner change this process may not make (not root) leaves the restoring user's.
pub(super) fn ignore_eperm(r: rustix::io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(Errno::PERM) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
