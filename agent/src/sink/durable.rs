//! Syncing restored files in the background: a restore reports success only after what it
//! wrote is on disk, but the sink keeps writing while earlier files (or earlier parts of one
//! large file) are synced, so the disk's write-back overlaps the restore instead of following
//! it.
//!
//! And never a torn file under a real name: a restored file is written under a short random
//! temporary name in its directory ([`create_temp`]; short, so that any name the filesystem
//! accepts, up to 255 bytes, can be restored), synced, and renamed to its name only when whole
//! ([`rename_new`], which never replaces what is there). [`NewFile`] does all of it for one
//! stream restored to `--target FILE`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;

type Job = Box<dyn FnOnce() -> anyhow::Result<()> + Send>;

/// A few threads that run finishing work (fsync, rename, metadata) in submission order per
/// thread; the first failure is kept and reported by [`Syncer::submit`] or [`Syncer::finish`].
pub(crate) struct Syncer {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Syncer {
    /// `threads` workers, at most `queue` jobs waiting (each may hold an open file).
    pub(crate) fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let failed = Arc::new(Mutex::new(None));
        let workers = (0..threads)
            .map(|_| {
                let (rx, failed) = (rx.clone(), failed.clone());
                std::thread::spawn(move || work(&rx, &failed))
            })
            .collect();
        Self {
            tx: Some(tx),
            workers,
            failed,
        }
    }

    /// Queues `job`; fails with an earlier job's error, if one failed. The error stays for
    /// [`Syncer::finish`], so a caller that goes on after a refused job still sees it there.
    pub(crate) fn submit(
        &self,
        job: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        if let Some(e) = self.failed.lock().expect("syncer lock").as_ref() {
            return Err(anyhow::anyhow!("{e:#}"));
        }
        self.tx
            .as_ref()
            .expect("syncer running")
            .send(Box::new(job))
            .map_err(|_| anyhow::anyhow!("the background sync stopped"))
    }

    /// Waits for every queued job; the first failure, if any.
    pub(crate) fn finish(mut self) -> anyhow::Result<()> {
        self.stop();
        let failed = self.failed.lock().expect("syncer lock").take();
        failed.map_or(Ok(()), Err)
    }

    /// Closes the queue and waits until the workers have run what it held.
    fn stop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn work(rx: &Mutex<Receiver<Job>>, failed: &Mutex<Option<anyhow::Error>>) {
    loop {
        let job = match rx.lock().expect("syncer lock").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if let Err(e) = job() {
            failed.lock().expect("syncer lock").get_or_insert(e);
        }
    }
}

/// Bytes written between two background syncs of a [`SyncedFile`].
const SYNC_EVERY: u64 = 32 << 20;

/// A file written front to back whose data is synced in the background as it grows, so the
/// final sync in [`SyncedFile::finish`] has little left to do.
pub(crate) struct SyncedFile {
    file: File,
    syncer: Syncer,
    unsynced: u64,
    /// A background sync is queued or running (another one would only wait behind it).
    busy: Arc<AtomicBool>,
}

impl SyncedFile {
    pub(crate) fn new(file: File) -> Self {
        Self {
            file,
            syncer: Syncer::new(1, 1),
            unsynced: 0,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Waits for the background syncs, then syncs the file whole.
    pub(crate) fn finish(self) -> anyhow::Result<()> {
        self.syncer.finish()?;
        self.file.sync_all().context("syncing")
    }
}

impl Write for SyncedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[allow(clippy::disallowed_methods)] // a `Write` passes its short writes on
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY && !self.busy.swap(true, Ordering::AcqRel) {
            self.unsynced = 0;
            let (file, busy) = (self.file.try_clone()?, self.busy.clone());
            self.syncer
                .submit(move || {
                    let r = file.sync_data().context("syncing");
                    busy.store(false, Ordering::Release);
                    r
                })
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A fresh temporary name: `.fv-` and 16 random hex digits (24 bytes, whatever the final
/// name's length).
pub(crate) fn temp_name() -> OsString {
    let mut r = [0u8; 8];
    // Without randomness the name is still unique enough: `O_EXCL` and the retries catch a clash.
    let _ = getrandom::fill(&mut r);
    OsString::from(format!(".fv-{}.tmp", hex::encode(r)))
}

/// Creates a new file under a fresh temporary name in `dir` (never following a symlink, never
/// reusing an existing name); returns it and its name.
pub(crate) fn create_temp(dir: BorrowedFd<'_>, mode: u32) -> io::Result<(File, OsString)> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = io::Error::other("no temporary name was free");
    for _ in 0..8 {
        let name = temp_name();
        match rustix::fs::openat(dir, name.as_os_str(), flags, Mode::from(mode)) {
            Ok(fd) => return Ok((File::from(fd), name)),
            Err(e) if e == rustix::io::Errno::EXIST => last = e.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

/// Renames `tmp` to `name` in `dir`, refusing (`AlreadyExists`) when `name` exists: a restore
/// never replaces what is there, even if it appeared while the restore ran.
pub(crate) fn rename_new(dir: BorrowedFd<'_>, tmp: &OsStr, name: &OsStr) -> io::Result<()> {
    use rustix::fs::{renameat, renameat_with, statat, AtFlags, RenameFlags};
    match renameat_with(dir, tmp, dir, name, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: checked, then renamed.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            if statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            Ok(renameat(dir, tmp, dir, name)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// A stream restored to a new file: written under a temporary name beside it, synced, and
/// renamed to its name by [`NewFile::finish`]; dropped unfinished (the restore failed), it
/// removes the temporary file, so nothing ever appears under the final name but the whole.
pub(crate) struct NewFile {
    path: PathBuf,
    dir: OwnedFd,
    name: OsString,
    tmp: OsString,
    file: Option<SyncedFile>,
}

impl NewFile {
    /// Starts `path`, which must not exist.
    pub(crate) fn create(path: &Path) -> anyhow::Result<Self> {
        use rustix::fs::{openat, statat, AtFlags, Mode, OFlags, CWD};
        let name = path
            .file_name()
            .with_context(|| format!("cannot restore to {}: not a file name", path.display()))?
            .to_owned();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = openat(
            CWD,
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .with_context(|| format!("opening directory {}", parent.display()))?;
        match statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => anyhow::bail!(
                "cannot restore to {}: it already exists (nothing was written)",
                path.display()
            ),
            Err(e) if e == rustix::io::Errno::NOENT => {}
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("checking {}", path.display()))
            }
        }
        let (file, tmp) = create_temp(dir.as_fd(), 0o666)
            .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
        Ok(Self {
            path: path.to_owned(),
            dir,
            name,
            tmp,
            file: Some(SyncedFile::new(file)),
        })
    }

    /// Syncs the file, renames it to its name and syncs the directory.
    pub(crate) fn finish(mut self) -> anyhow::Result<()> {
        let file = self.file.take().context("the file is finished")?;
        file.finish()
            .with_context(|| format!("writing {}", self.path.display()))?;
        rename_new(self.dir.as_fd(), &self.tmp, &self.name)
            .with_context(|| format!("renaming the restored stream to {}", self.path.display()))?;
        self.tmp.clear();
        rustix::fs::fsync(&self.dir)
            .map_err(io::Error::from)
            .with_context(|| format!("syncing the directory of {}", self.path.display()))
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.as_mut() {
            #[allow(clippy::disallowed_methods)] // a `Write` passes its short writes on
            Some(f) => f.write(buf),
            None => Err(io::Error::other("the file is finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.tmp.is_empty() {
            let _ = rustix::fs::unlinkat(
                &self.dir,
                self.tmp.as_os_str(),
                rustix::fs::AtFlags::empty(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_is_reported_by_finish() {
        let syncer = Syncer::new(2, 4);
        syncer.submit(|| anyhow::bail!("disk on fire")).unwrap();
        // Whether this one is refused depends on timing; either way finish reports the failure.
        syncer.submit(|| Ok(())).ok();
        let err = syncer.finish().unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }

    #[test]
    fn a_failed_job_stops_later_submissions() {
        let syncer = Syncer::new(1, 1);
        syncer.submit(|| anyhow::bail!("disk on fire")).unwrap();
        let refused = (0..1000).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            syncer.submit(|| Ok(())).err()
        });
        assert_eq!(
            refused.map(|e| e.to_string()).as_deref(),
            Some("disk on fire")
        );
        // A refused submission does not use the failure up: finish still reports it.
        assert_eq!(syncer.finish().unwrap_err().to_string(), "disk on fire");
    }

    #[test]
    fn a_new_file_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n".repeat(255));
        let mut f = NewFile::create(&path).unwrap();
        f.write_all(b"partial").unwrap();
        assert!(!path.exists());
        drop(f);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "a temp file was left"
        );
        let mut f = NewFile::create(&path).unwrap();
        f.write_all(b"whole").unwrap();
        f.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = NewFile::create(&path).err().unwrap();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }

    #[test]
    fn rename_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        let (_, tmp) = create_temp(d.as_fd(), 0o600).unwrap();
        assert!(tmp.len() < 32, "{tmp:?}");
        std::fs::write(dir.path().join("x"), b"keep").unwrap();
        let err = rename_new(d.as_fd(), &tmp, OsStr::new("x")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("x")).unwrap(), b"keep");
    }

    #[test]
    fn a_synced_file_holds_everything_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = SyncedFile::new(File::create(&path).unwrap());
        let block = vec![7u8; 1 << 20];
        for _ in 0..70 {
            f.write_all(&block).unwrap();
        }
        f.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 70 << 20);
    }
}
