//! The chunk store: content-addressed sealed chunks on local disk, and the immutable snapshot
//! records that make the catalog rebuildable (docs/architecture.md rule 10).
//!
//! Layout under the store root:
//!
//! ```text
//! chunks/ab/abcdef…(64 hex)   one sealed chunk per file, fanned out by the first byte
//! snapshots/<id>.snap         immutable snapshot record: postcard body + BLAKE3 of it
//! tmp/                        files being written; emptied at start-up
//! ```
//!
//! Durability (rules 1 and 7): a chunk is written to `tmp/`, fsynced, renamed into place, and
//! its directory is fsynced; only then does [`ChunkStore::put_batch`] return, and only then is
//! the chunk acknowledged. A put verifies the chunk's hash first, so nothing stored is ever
//! under a wrong name. Chunks are never rewritten: an existing file wins.
//!
//! Privacy: every directory of the store is 0700 and every file it writes 0600, whatever the
//! umask and whatever an older version left (fixed at open), so that only the coordinator's
//! user reads the fleet's data.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod read;

use fleetvault_common::chunk::{self, EnvelopeError};
use fleetvault_common::{ChunkId, SnapshotId, SnapshotRecord};

pub(crate) use read::{load_manifest, read_stream};

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The chunk's content does not match its claimed id, or its envelope is invalid.
    #[error("chunk {id} refused: {source}")]
    BadChunk {
        id: ChunkId,
        #[source]
        source: EnvelopeError,
    },
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A snapshot record file is damaged.
    #[error("snapshot record {0} is damaged")]
    BadRecord(PathBuf),
    /// A stream read whole (a manifest, a bundle index) is larger than [`read::MAX_MANIFEST_LEN`].
    #[error(
        "snapshot {snapshot}: {what} of {len} bytes is too large (limit {} MiB)",
        read::MAX_MANIFEST_LEN >> 20
    )]
    StreamTooLarge {
        snapshot: SnapshotId,
        what: &'static str,
        len: u64,
    },
    /// A chunk of a snapshot (its stream read whole, or one its commit references) cannot be
    /// read.
    #[error("snapshot {snapshot}: {source}")]
    Read {
        snapshot: SnapshotId,
        #[source]
        source: Box<StoreError>,
    },
    /// A chunk of a stream read whole is not in the store.
    #[error("snapshot {snapshot}: {what} chunk {id} is missing")]
    StreamChunkMissing {
        snapshot: SnapshotId,
        what: &'static str,
        id: ChunkId,
    },
    /// A chunk of a stream read whole fails its verification.
    #[error("snapshot {snapshot}: {what} chunk {id} is damaged: {source}")]
    StreamChunkDamaged {
        snapshot: SnapshotId,
        what: &'static str,
        id: ChunkId,
        #[source]
        source: Box<EnvelopeError>,
    },
    /// A stream's length or checksum is not what its description states.
    #[error("snapshot {snapshot}: {what} checksum does not match")]
    StreamChecksum {
        snapshot: SnapshotId,
        what: &'static str,
    },
    /// A manifest's bytes do not decode.
    #[error("snapshot {snapshot}: {source}")]
    BadManifest {
        snapshot: SnapshotId,
        #[source]
        source: fleetvault_common::ManifestError,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

/// Free space the store leaves on its disk for the catalog (bytes).
const RESERVE: u64 = 8 << 20;

/// What a batch put added.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PutOutcome {
    /// Chunks that were new.
    pub(crate) new: u32,
    /// Their plaintext bytes.
    pub(crate) new_plain: u64,
    /// Their sealed bytes.
    pub(crate) new_stored: u64,
}

/// Content-addressed chunks on disk.
pub(crate) struct ChunkStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl ChunkStore {
    /// Opens (creating if needed) the store at `root` and empties its `tmp/`. Its directories
    /// are made private (see [`private_dir`]), also those an earlier version left open.
    pub(crate) fn open(root: &Path) -> Result<Self, StoreError> {
        private_dir(root)?;
        for sub in ["chunks", "snapshots", "tmp"] {
            private_dir(&root.join(sub))?;
        }
        let chunks = root.join("chunks");
        for b in 0..=255u8 {
            private_dir(&chunks.join(format!("{b:02x}")))?;
        }
        let quarantine = root.join("quarantine");
        if quarantine.exists() {
            private_dir(&quarantine)?;
        }
        sync_dir(&chunks)?;
        sync_dir(root)?;
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err("listing", &tmp))? {
            let entry = entry.map_err(io_err("listing", &tmp))?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(Self {
            root: root.to_owned(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Where chunk `id` lives.
    pub(crate) fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Whether the store has chunk `id`.
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.chunk_path(id).exists()
    }

    fn tmp_path(&self, label: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{label}.{}.{n}", std::process::id()))
    }

    /// Refuses a write of `bytes` that would leave less than [`RESERVE`] free: the catalog
    /// (and a restart, which opens it) needs room on a disk the chunks have filled.
    fn check_space(&self, bytes: u64) -> Result<(), StoreError> {
        let Ok(free) = fs2::available_space(&self.root) else {
            return Ok(());
        };
        if free < RESERVE + bytes {
            return Err(StoreError::Io {
                op: "storing chunks in",
                path: self.root.clone(),
                source: io::Error::other(format!(
                    "No space left on device: {} MiB free; {} more would eat into the {} MiB kept for the catalog",
                    free >> 20,
                    fleetvault_common::report::human_bytes(bytes),
                    RESERVE >> 20
                )),
            });
        }
        Ok(())
    }

    /// Verifies and durably stores a batch of sealed chunks. Returns after every chunk of the
    /// batch is on disk with its directory entry synced; on error, chunks of the batch that
    /// were already renamed into place are complete and valid (never partial).
    pub(crate) fn put_batch(
        &self,
        chunks: &[(ChunkId, impl AsRef<[u8]>)],
    ) -> Result<PutOutcome, StoreError> {
        self.check_space(chunks.iter().map(|(_, e)| e.as_ref().len() as u64).sum())?;
        // (tmp, dest) of every file written; nothing of a refused batch is kept, not even in tmp/.
        let mut pending = Vec::new();
        let outcome = match self.write_batch(chunks, &mut pending) {
            Ok(outcome) => outcome,
            Err(e) => {
                for (tmp, _) in &pending {
                    let _ = fs::remove_file(tmp);
                }
                return Err(e);
            }
        };
        let mut dirs = BTreeSet::new();
        for (tmp, dest) in &pending {
            #[allow(clippy::disallowed_methods)] // store/ is where renames belong
            fs::rename(tmp, dest).map_err(io_err("renaming into", dest))?;
            if let Some(parent) = dest.parent() {
                dirs.insert(parent.to_owned());
            }
        }
        for dir in dirs {
            sync_dir(&dir)?;
        }
        Ok(outcome)
    }

    /// Verifies the batch's new chunks and writes each into tmp/, synced, adding (tmp, dest) to
    /// `pending` as it is created. Every file is written before it is synced (up to
    /// `OPEN_UNSYNCED` at a time): the first sync's journal commit then carries the others,
    /// whose own syncs find little left to do, where one file synced after the other made a
    /// commit, and a wait on the disk, per chunk.
    fn write_batch(
        &self,
        chunks: &[(ChunkId, impl AsRef<[u8]>)],
        pending: &mut Vec<(PathBuf, PathBuf)>,
    ) -> Result<PutOutcome, StoreError> {
        // The files of the last `unsynced.len()` entries of `pending`.
        let mut unsynced: Vec<File> = Vec::new();
        let sync = |unsynced: &mut Vec<File>, pending: &[(PathBuf, PathBuf)]| {
            let names = &pending[pending.len() - unsynced.len()..];
            for (f, (tmp, _)) in unsynced.drain(..).zip(names) {
                f.sync_all().map_err(io_err("syncing", tmp))?;
            }
            Ok::<(), StoreError>(())
        };
        let mut outcome = PutOutcome::default();
        for (id, envelope) in chunks {
            let envelope = envelope.as_ref();
            let plain_len = chunk::verify(envelope, id)
                .map_err(|source| StoreError::BadChunk { id: *id, source })?;
            let dest = self.chunk_path(id);
            if dest.exists() || pending.iter().any(|(_, d)| *d == dest) {
                continue;
            }
            let tmp = self.tmp_path(&id.to_hex()[..16]);
            unsynced.push(write_unsynced(&tmp, envelope)?);
            pending.push((tmp, dest));
            if unsynced.len() == OPEN_UNSYNCED {
                sync(&mut unsynced, pending)?;
            }
            outcome.new += 1;
            outcome.new_plain += u64::from(plain_len);
            outcome.new_stored += envelope.len() as u64;
        }
        sync(&mut unsynced, pending)?;
        Ok(outcome)
    }

    /// Reads a sealed chunk as stored, `Ok(None)` if the store lacks it. The caller verifies.
    pub(crate) fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.chunk_path(id);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// The plaintext length a stored chunk's envelope header gives (checked against its
    /// content when it was stored), `Ok(None)` if the store lacks it. Reads the header only.
    pub(crate) fn plaintext_len(&self, id: &ChunkId) -> Result<Option<u32>, StoreError> {
        use std::io::Read;
        let path = self.chunk_path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let mut header = [0u8; chunk::HEADER_LEN];
        let mut got = 0;
        while got < header.len() {
            match file.read(&mut header[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading", &path)(e)),
            }
        }
        chunk::plaintext_len(&header[..got])
            .map(Some)
            .map_err(|source| StoreError::BadChunk { id: *id, source })
    }

    fn record_path(&self, id: SnapshotId) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.snap"))
    }

    /// Durably writes the immutable record of a completed snapshot (before the catalog says
    /// `completed`: readers trust the catalog only for what the store already holds).
    pub(crate) fn write_record(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        let mut body = postcard::to_stdvec(record).map_err(|e| StoreError::Io {
            op: "encoding",
            path: self.record_path(record.id),
            source: io::Error::other(e),
        })?;
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        let tmp = self.tmp_path(&record.id.to_string());
        write_synced(&tmp, &body)?;
        let dest = self.record_path(record.id);
        #[allow(clippy::disallowed_methods)] // store/ is where renames belong
        fs::rename(&tmp, &dest).map_err(io_err("renaming into", &dest))?;
        sync_dir(&self.root.join("snapshots"))
    }

    /// Removes a snapshot's record file (deleting a snapshot: before the catalog forgets it,
    /// so that a rebuilt catalog never brings it back).
    pub(crate) fn remove_record(&self, id: SnapshotId) -> Result<(), StoreError> {
        let path = self.record_path(id);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root.join("snapshots")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Every chunk file: its id, size and modification time. Any listing error is returned
    /// (garbage collection must fail closed).
    pub(crate) fn list_chunks(
        &self,
    ) -> Result<Vec<(ChunkId, u64, std::time::SystemTime)>, StoreError> {
        let mut out = Vec::new();
        let chunks = self.root.join("chunks");
        for fan in fs::read_dir(&chunks).map_err(io_err("listing", &chunks))? {
            let fan = fan.map_err(io_err("listing", &chunks))?.path();
            if !fan.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&fan).map_err(io_err("listing", &fan))? {
                let entry = entry.map_err(io_err("listing", &fan))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) else {
                    continue;
                };
                let md = entry.metadata().map_err(io_err("reading", &entry.path()))?;
                let mtime = md.modified().map_err(io_err("reading", &entry.path()))?;
                out.push((id, md.len(), mtime));
            }
        }
        Ok(out)
    }

    /// Moves a damaged chunk out of the way (`quarantine/`): the store then lacks it, so the
    /// next backup holding that data uploads it again and heals every snapshot that uses it.
    pub(crate) fn quarantine(&self, id: &ChunkId) -> Result<(), StoreError> {
        let dir = self.root.join("quarantine");
        private_dir(&dir)?;
        let from = self.chunk_path(id);
        let to = dir.join(id.to_hex());
        #[allow(clippy::disallowed_methods)] // store/ is where renames belong
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("quarantining", &from)(e)),
        }
        sync_dir(&dir)?;
        if let Some(parent) = from.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Deletes a chunk file (garbage collection only).
    pub(crate) fn delete_chunk(&self, id: &ChunkId) -> Result<(), StoreError> {
        let path = self.chunk_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("deleting", &path)(e)),
        }
    }

    /// Syncs every fan-out directory (after deletions).
    pub(crate) fn sync_chunk_dirs(&self) -> Result<(), StoreError> {
        for b in 0..=255u8 {
            sync_dir(&self.root.join("chunks").join(format!("{b:02x}")))?;
        }
        Ok(())
    }

    /// Every immutable snapshot record, for rebuilding the catalog.
    pub(crate) fn read_records(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let dir = self.root.join("snapshots");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            if path.extension().is_none_or(|e| e != "snap") {
                continue;
            }
            out.push(read_record_file(&path)?);
        }
        Ok(out)
    }

    /// The ids of every snapshot record in the store (from the file names; nothing is read).
    /// Any listing error is returned.
    pub(crate) fn record_ids(&self) -> Result<BTreeSet<SnapshotId>, StoreError> {
        let dir = self.root.join("snapshots");
        let mut out = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let name = entry.map_err(io_err("listing", &dir))?.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".snap"))
                .and_then(|n| n.parse().ok())
            {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// One snapshot's immutable record, checked.
    pub(crate) fn read_record(&self, id: SnapshotId) -> Result<SnapshotRecord, StoreError> {
        let record = read_record_file(&self.record_path(id))?;
        if record.id != id {
            return Err(StoreError::BadRecord(self.record_path(id)));
        }
        Ok(record)
    }
}

/// Reads and checks one record file (postcard body + BLAKE3 of it).
fn read_record_file(path: &Path) -> Result<SnapshotRecord, StoreError> {
    let bytes = fs::read(path).map_err(io_err("reading", path))?;
    if bytes.len() < 32 {
        return Err(StoreError::BadRecord(path.to_owned()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(StoreError::BadRecord(path.to_owned()));
    }
    fleetvault_common::protocol::frame::decode_body(body)
        .map_err(|_| StoreError::BadRecord(path.to_owned()))
}

/// temp file, write, fsync: the first half of docs/architecture.md rule 7 (the caller renames and syncs
/// the directory).
///
/// On failure (a full disk) the partial file is removed, so a refused write leaves nothing.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let f = write_unsynced(path, bytes)?;
    let synced = f.sync_all().map_err(io_err("syncing", path));
    if synced.is_err() {
        drop(f);
        let _ = fs::remove_file(path);
    }
    synced
}

/// Chunk files of one batch written before they are synced together.
const OPEN_UNSYNCED: usize = 64;

/// Creates `path` with `bytes`, not yet synced; removes it again if writing fails. The file is
/// created 0600 (the umask can only narrow that): chunks and records are other hosts' data.
fn write_unsynced(path: &Path, bytes: &[u8]) -> Result<File, StoreError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    match f.write_all(bytes) {
        Ok(()) => Ok(f),
        Err(e) => {
            drop(f);
            let _ = fs::remove_file(path);
            Err(io_err("writing", path)(e))
        }
    }
}

/// Creates `dir` (with its parents) if needed and makes it 0700 whatever the umask or the mode
/// it had: the store holds every host's data, readable by the coordinator's user only, also in
/// a data dir that existed before `init` (e.g. made 0755 by a package).
pub(crate) fn private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating", dir))?;
    let md = fs::metadata(dir).map_err(io_err("reading", dir))?;
    if md.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("making private", dir))?;
    }
    Ok(())
}

/// fsyncs a directory, so renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetvault_common::chunk::seal;

    #[test]
    fn put_verifies_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = b"hello chunk".to_vec();
        let id = ChunkId::of(&data);
        let env = seal(&data, 3);
        let out = store.put_batch(&[(id, env.clone())]).unwrap();
        assert_eq!(out.new, 1);
        assert!(store.contains(&id));
        assert_eq!(store.put_batch(&[(id, env.clone())]).unwrap().new, 0);
        assert_eq!(store.get(&id).unwrap().unwrap(), env);
        let wrong = ChunkId::of(b"other");
        let fresh = b"fresh chunk".to_vec();
        let fresh_id = ChunkId::of(&fresh);
        let err = store
            .put_batch(&[(fresh_id, seal(&fresh, 3)), (wrong, env)])
            .unwrap_err();
        assert!(!store.contains(&fresh_id), "a refused batch stored a chunk");
        assert!(matches!(err, StoreError::BadChunk { .. }), "{err}");
        assert!(!store.contains(&wrong));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn store_in_an_existing_open_dir_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        // A data dir made by someone else (a package, an older version) with open modes.
        for sub in ["", "chunks", "chunks/ab", "snapshots"] {
            fs::create_dir_all(root.join(sub)).unwrap();
            fs::set_permissions(root.join(sub), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let store = ChunkStore::open(&root).unwrap();
        let data = b"private chunk".to_vec();
        let id = ChunkId::of(&data);
        store.put_batch(&[(id, seal(&data, 3))]).unwrap();
        let rec = SnapshotRecord::new(
            SnapshotId(7),
            "a",
            "s",
            "command",
            fleetvault_common::ChunkerParams::default(),
            1,
            fleetvault_common::SnapshotStatus::Completed,
        );
        store.write_record(&rec).unwrap();
        store.quarantine(&id).unwrap();
        store.put_batch(&[(id, seal(&data, 3))]).unwrap();
        for sub in [
            "",
            "chunks",
            "chunks/ab",
            "chunks/00",
            "snapshots",
            "tmp",
            "quarantine",
        ] {
            assert_eq!(mode(&root.join(sub)), 0o700, "store/{sub}");
        }
        assert_eq!(mode(&store.chunk_path(&id)), 0o600, "chunk file");
        assert_eq!(mode(&root.join("quarantine").join(id.to_hex())), 0o600);
        assert_eq!(mode(&store.record_path(SnapshotId(7))), 0o600, "record");
    }

    #[test]
    fn a_large_batch_is_stored_whole_with_duplicates_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let mut batch: Vec<(ChunkId, Vec<u8>)> = (0..100u32)
            .map(|i| {
                let data = format!("chunk number {i}").repeat(100).into_bytes();
                (ChunkId::of(&data), seal(&data, 1))
            })
            .collect();
        batch.push(batch[7].clone());
        // A bad chunk after more files than are kept open unsynced: none of the batch stays.
        let mut refused = batch.clone();
        refused[90].0 = ChunkId::of(b"not this content");
        assert!(store.put_batch(&refused).is_err());
        assert!(
            !store.contains(&batch[0].0),
            "a refused batch stored a chunk"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let out = store.put_batch(&batch).unwrap();
        assert_eq!(out.new, 100);
        for (id, env) in &batch {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(env));
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
