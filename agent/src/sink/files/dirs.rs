//! Directories below a restore's target, each opened relative to its parent's handle without
//! following a symlink ([`Dirs`], [`open_dir`]).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

pub(super) fn is_dir(st_mode: u32) -> bool {
    rustix::fs::FileType::from_raw_mode(st_mode) == rustix::fs::FileType::Directory
}

/// Open handles of the directories from the target down to the one entries go into now (a
/// manifest comes depth first, so consecutive entries share most of them).
pub(super) struct Dirs {
    target: PathBuf,
    root: Arc<OwnedFd>,
    chain: Vec<(OsString, Arc<OwnedFd>)>,
}

impl Dirs {
    /// The target itself (the operator's path: a symlink there is followed).
    pub(super) fn open(target: &Path) -> anyhow::Result<Self> {
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
    pub(super) fn shown(&self, rel: &Path) -> PathBuf {
        self.target.join(rel)
    }

    /// The directory `rel` below the target, each component opened without following a
    /// symlink; missing ones are created when `create`, and anything but a directory refused.
    pub(super) fn dir(&mut self, rel: &Path, create: bool) -> anyhow::Result<Arc<OwnedFd>> {
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
pub(super) fn open_dir(
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
