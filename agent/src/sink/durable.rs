//! Syncing restored files in the background: a restore reports success only after what it
//! wrote is on disk, but the sink keeps writing while earlier files (or earlier parts of one
//! large file) are synced, so the disk's write-back overlaps the restore instead of following
//! it.

use std::fs::File;
use std::io::{self, Write};
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
