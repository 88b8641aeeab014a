//! The catalog: agents, snapshot records and which chunks each agent references, in sled.
//!
//! The only module that names sled. Every state change that something else relies on
//! (a snapshot becoming `running`, `completed` or `failed`) is flushed before the call
//! returns. The catalog is a cache of immutable truth: completed snapshots are also in the
//! store (`ChunkStore::write_record`), and [`Catalog::open`] rebuilds from there when the
//! catalog is new.

use std::path::Path;
use std::sync::Mutex;

use fleetvault_common::protocol::{frame, ReplicaStatus, SnapshotFilter, SourceInfo};
use fleetvault_common::{ChunkId, SnapshotId, SnapshotRecord, SnapshotStatus};
use serde::{Deserialize, Serialize};

use crate::clock;

/// A catalog operation that failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    /// sled failed.
    #[error("catalog: {0}")]
    Db(#[from] sled::Error),
    /// A stored value cannot be decoded.
    #[error("catalog entry {0} is corrupt")]
    Corrupt(String),
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    NotFound(SnapshotId),
    /// An id from a peer that this catalog's id counter could not safely go past.
    #[error(
        "snapshot id {0} is out of range: ids are allocated from the clock, and this one is \
         more than a year ahead of this coordinator's"
    )]
    IdOutOfRange(SnapshotId),
}

/// How far ahead of this coordinator's clock a peer's snapshot id may be (milliseconds): a
/// year of clock skew, while the id counter, which continues after the largest id it holds,
/// keeps more than 100,000 years of room below `u64::MAX`.
const MAX_ID_AHEAD_MS: u64 = 366 * 24 * 3600 * 1000;

/// What the catalog remembers of an agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    pub(crate) last_seen_ms: u64,
    pub(crate) version: String,
    pub(crate) sources: Vec<SourceInfo>,
}

/// Agents and snapshots.
pub(crate) struct Catalog {
    db: sled::Db,
    snapshots: sled::Tree,
    agents: sled::Tree,
    refs: sled::Tree,
    /// Replication, on a primary: `replica\0id` for each snapshot a replica confirmed.
    replicated: sled::Tree,
    /// Replication, on a primary: each replica's last sync state.
    replica_state: sled::Tree,
    /// Replication, on a replica: the peer each received snapshot came from.
    origin: sled::Tree,
    /// Replication, on a replica: received snapshots its own retention removed, so the
    /// primary does not send them again.
    tombstones: sled::Tree,
    last_id: Mutex<u64>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard into a Vec cannot fail for these plain data types.
    postcard::to_stdvec(v).expect("catalog value serialises")
}

fn replicated_key(replica: &str, id: SnapshotId) -> Vec<u8> {
    let mut k = Vec::with_capacity(replica.len() + 9);
    k.extend_from_slice(replica.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

fn ref_key(agent: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(agent.len() + 33);
    k.extend_from_slice(agent.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

/// sled's page cache. Its default (1 GiB) let the coordinator's memory grow with the chunks
/// the catalog tracks (about 16 MiB per GiB backed up); the catalog's hot part is far smaller.
const CACHE_BYTES: u64 = 64 << 20;

/// Chunk refs written in one sled batch.
const REF_BATCH: usize = 1024;

impl Catalog {
    /// Opens the catalog at `path`. A new catalog is filled from `records` (the store's
    /// immutable records, each with the chunks it references: its agent's proven chunks). Snapshots still `running` or `pending` were cut off by a crash or
    /// restart: they end `failed` here, before anything can list them.
    pub(crate) fn open(
        path: &Path,
        records: impl FnOnce() -> Vec<(SnapshotRecord, Vec<ChunkId>)>,
    ) -> Result<Self, CatalogError> {
        private_dir(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let catalog = Self {
            snapshots: db.open_tree("snapshots")?,
            agents: db.open_tree("agents")?,
            refs: db.open_tree("refs")?,
            replicated: db.open_tree("replicated")?,
            replica_state: db.open_tree("replica_state")?,
            origin: db.open_tree("origin")?,
            tombstones: db.open_tree("tombstones")?,
            db,
            last_id: Mutex::new(0),
        };
        if catalog.snapshots.is_empty() {
            for (record, chunks) in records() {
                catalog.add_refs(&record.agent, chunks.iter())?;
                catalog.put(&record)?;
            }
        }
        let mut last = 0;
        for item in catalog.snapshots.iter() {
            let (_, v) = item?;
            let mut rec: SnapshotRecord = decode(&v)?;
            last = last.max(rec.id.0);
            if matches!(
                rec.status,
                SnapshotStatus::Running | SnapshotStatus::Pending
            ) {
                rec.status = SnapshotStatus::Failed {
                    reason: "coordinator stopped during the backup".into(),
                };
                rec.ended_ms = Some(clock::now_ms());
                catalog.put(&rec)?;
            }
        }
        *catalog.last_id.lock().expect("id lock") = last;
        catalog.db.flush()?;
        Ok(catalog)
    }

    fn put(&self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        self.snapshots.insert(rec.id.0.to_be_bytes(), encode(rec))?;
        Ok(())
    }

    /// Allocates an id: milliseconds since the epoch shifted left, so ids sort by start time
    /// and stay unique across restarts.
    pub(crate) fn next_id(&self) -> SnapshotId {
        let mut last = self.last_id.lock().expect("id lock");
        *last = (clock::now_ms() << 12).max(*last + 1);
        SnapshotId(*last)
    }

    /// Records a new running snapshot, flushed.
    pub(crate) fn begin(&self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        self.put(rec)?;
        self.db.flush()?;
        Ok(())
    }

    /// Stores a finished (completed or failed) record, flushed.
    pub(crate) fn finish(&self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        self.put(rec)?;
        self.db.flush()?;
        Ok(())
    }

    /// Marks a running snapshot failed, flushed; a snapshot already finished is left alone.
    pub(crate) fn fail(&self, id: SnapshotId, reason: &str) -> Result<(), CatalogError> {
        let mut rec = self.get(id)?;
        if matches!(
            rec.status,
            SnapshotStatus::Running | SnapshotStatus::Pending
        ) {
            rec.status = SnapshotStatus::Failed {
                reason: reason.to_owned(),
            };
            rec.ended_ms = Some(clock::now_ms());
            self.finish(&rec)?;
        }
        Ok(())
    }

    /// One snapshot.
    pub(crate) fn get(&self, id: SnapshotId) -> Result<SnapshotRecord, CatalogError> {
        match self.snapshots.get(id.0.to_be_bytes())? {
            Some(v) => decode(&v),
            None => Err(CatalogError::NotFound(id)),
        }
    }

    /// Snapshots matching `filter`, oldest first.
    pub(crate) fn list(
        &self,
        filter: &SnapshotFilter,
    ) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let mut out = Vec::new();
        for item in self.snapshots.iter() {
            let (_, v) = item?;
            let rec: SnapshotRecord = decode(&v)?;
            let keep = filter.agent.as_ref().is_none_or(|a| *a == rec.agent)
                && filter.source.as_ref().is_none_or(|s| *s == rec.source)
                && filter
                    .status
                    .as_ref()
                    .is_none_or(|s| s == rec.status.name())
                && filter
                    .job
                    .as_ref()
                    .is_none_or(|j| Some(j) == rec.job.as_ref());
            if keep {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Removes a snapshot record, flushed.
    pub(crate) fn delete(&self, id: SnapshotId) -> Result<(), CatalogError> {
        if self.snapshots.remove(id.0.to_be_bytes())?.is_none() {
            return Err(CatalogError::NotFound(id));
        }
        self.db.flush()?;
        Ok(())
    }

    /// Stores an updated record of a finished snapshot (e.g. its protected flag), flushed.
    pub(crate) fn update(&self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        self.put(rec)?;
        self.db.flush()?;
        Ok(())
    }

    /// The newest completed snapshot of an agent's source.
    pub(crate) fn last_completed(
        &self,
        agent: &str,
        source: &str,
    ) -> Result<Option<SnapshotRecord>, CatalogError> {
        for item in self.snapshots.iter().rev() {
            let (_, v) = item?;
            let rec: SnapshotRecord = decode(&v)?;
            if rec.agent == agent && rec.source == source && rec.status == SnapshotStatus::Completed
            {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    /// Whether `agent` already references chunk `id` through one of its snapshots.
    pub(crate) fn has_ref(&self, agent: &str, id: &ChunkId) -> Result<bool, CatalogError> {
        Ok(self.refs.contains_key(ref_key(agent, id))?)
    }

    /// Calls `f` with every chunk `agent` references.
    pub(crate) fn refs_of(
        &self,
        agent: &str,
        mut f: impl FnMut(ChunkId),
    ) -> Result<(), CatalogError> {
        let mut prefix = agent.as_bytes().to_vec();
        prefix.push(0);
        for item in self.refs.scan_prefix(&prefix) {
            let (k, _) = item?;
            let id: [u8; 32] = k[prefix.len()..]
                .try_into()
                .map_err(|_| CatalogError::Corrupt(format!("ref of {agent}")))?;
            f(ChunkId(id));
        }
        Ok(())
    }

    /// Records that `agent` references these chunks (at commit; flushed with the record).
    pub(crate) fn add_refs<'a>(
        &self,
        agent: &str,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Result<(), CatalogError> {
        // In bounded batches: sled holds a whole batch in memory several times over, and one
        // batch for a large snapshot's chunks made the coordinator's memory grow with the
        // snapshot. A ref only records what the agent has proven, so a partial set is sound.
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for id in ids {
            batch.insert(ref_key(agent, id), &[]);
            n += 1;
            if n == REF_BATCH {
                self.refs.apply_batch(std::mem::take(&mut batch))?;
                n = 0;
            }
        }
        self.refs.apply_batch(batch)?;
        Ok(())
    }

    /// Every owner (agent name, or `peer/NAME`) that has chunk refs.
    pub(crate) fn ref_owners(&self) -> Result<Vec<String>, CatalogError> {
        let mut out: Vec<String> = Vec::new();
        let mut next: Option<Vec<u8>> = None;
        loop {
            // Jump from one owner's keys to the next: `owner\0` sorts before `owner\x01`.
            let item = match &next {
                Some(from) => self.refs.range(from.clone()..).next(),
                None => self.refs.iter().next(),
            };
            let Some(item) = item else { break };
            let (k, _) = item?;
            let end = k
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| CatalogError::Corrupt("ref key".into()))?;
            out.push(String::from_utf8_lossy(&k[..end]).into_owned());
            let mut after = k[..end].to_vec();
            after.push(1);
            next = Some(after);
        }
        Ok(out)
    }

    /// Forgets that `owner` references these chunks, flushed.
    pub(crate) fn remove_refs<'a>(
        &self,
        owner: &str,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Result<(), CatalogError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for id in ids {
            batch.remove(ref_key(owner, id));
            n += 1;
            if n == REF_BATCH {
                self.refs.apply_batch(std::mem::take(&mut batch))?;
                n = 0;
            }
        }
        self.refs.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Snapshot records with an id above `id` (begun after a listing whose newest was `id`).
    pub(crate) fn snapshots_after(
        &self,
        id: SnapshotId,
    ) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let mut out = Vec::new();
        let Some(from) = id.0.checked_add(1) else {
            return Ok(out);
        };
        for item in self.snapshots.range(from.to_be_bytes()..) {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Updates what is known of an agent.
    pub(crate) fn touch_agent(
        &self,
        name: &str,
        update: impl FnOnce(&mut AgentRecord),
    ) -> Result<(), CatalogError> {
        let mut rec: AgentRecord = match self.agents.get(name)? {
            Some(v) => decode(&v)?,
            None => AgentRecord::default(),
        };
        update(&mut rec);
        rec.last_seen_ms = clock::now_ms();
        self.agents.insert(name, encode(&rec))?;
        Ok(())
    }

    /// Every agent ever seen.
    pub(crate) fn agents(&self) -> Result<Vec<(String, AgentRecord)>, CatalogError> {
        let mut out = Vec::new();
        for item in self.agents.iter() {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k).into_owned(), decode(&v)?));
        }
        Ok(out)
    }

    /// Refuses a snapshot id from a peer that the id counter could not go past: ids are
    /// milliseconds shifted left by 12 ([`Catalog::next_id`]), and one far in the future (such
    /// as `u64::MAX`) would make every id allocated here afterwards overflow.
    pub(crate) fn check_foreign_id(id: SnapshotId) -> Result<(), CatalogError> {
        let limit = clock::now_ms().saturating_add(MAX_ID_AHEAD_MS) << 12;
        if id.0 > limit {
            return Err(CatalogError::IdOutOfRange(id));
        }
        Ok(())
    }

    /// Stores a completed snapshot received from peer `origin` under the primary's id, flushed;
    /// ids allocated here afterwards sort after it. An id out of range is refused
    /// ([`Catalog::check_foreign_id`]).
    pub(crate) fn adopt(&self, rec: &SnapshotRecord, origin: &str) -> Result<(), CatalogError> {
        Self::check_foreign_id(rec.id)?;
        let mut last = self.last_id.lock().expect("id lock");
        self.origin
            .insert(rec.id.0.to_be_bytes(), origin.as_bytes())?;
        self.put(rec)?;
        self.db.flush()?;
        *last = (*last).max(rec.id.0);
        Ok(())
    }

    /// Puts back a completed snapshot from its immutable store record, with the chunks it
    /// references as its agent's refs (start-up reconciliation, `crate::reconcile`); ids
    /// allocated afterwards sort after it. Not flushed: the caller flushes once at the end.
    pub(crate) fn restore(
        &self,
        rec: &SnapshotRecord,
        chunks: &[ChunkId],
    ) -> Result<(), CatalogError> {
        let mut last = self.last_id.lock().expect("id lock");
        self.add_refs(&rec.agent, chunks.iter())?;
        self.put(rec)?;
        *last = (*last).max(rec.id.0);
        Ok(())
    }

    /// The peer a received snapshot came from.
    pub(crate) fn origin(&self, id: SnapshotId) -> Result<Option<String>, CatalogError> {
        Ok(self
            .origin
            .get(id.0.to_be_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Remembers that a received snapshot was removed here (flushed with its deletion).
    pub(crate) fn tombstone(&self, id: SnapshotId) -> Result<(), CatalogError> {
        self.tombstones.insert(id.0.to_be_bytes(), &[])?;
        Ok(())
    }

    /// Whether a received snapshot was removed by this coordinator's retention.
    pub(crate) fn is_tombstoned(&self, id: SnapshotId) -> Result<bool, CatalogError> {
        Ok(self.tombstones.contains_key(id.0.to_be_bytes())?)
    }

    /// Records that `replica` holds snapshot `id`, flushed.
    pub(crate) fn mark_replicated(
        &self,
        replica: &str,
        id: SnapshotId,
    ) -> Result<(), CatalogError> {
        self.replicated.insert(replicated_key(replica, id), &[])?;
        self.db.flush()?;
        Ok(())
    }

    /// The snapshots `replica` is known to hold.
    pub(crate) fn replicated(
        &self,
        replica: &str,
    ) -> Result<std::collections::HashSet<SnapshotId>, CatalogError> {
        let mut prefix = replica.as_bytes().to_vec();
        prefix.push(0);
        let mut out = std::collections::HashSet::new();
        for item in self.replicated.scan_prefix(&prefix) {
            let (k, _) = item?;
            let raw: [u8; 8] = k[prefix.len()..]
                .try_into()
                .map_err(|_| CatalogError::Corrupt("replicated key".into()))?;
            out.insert(SnapshotId(u64::from_be_bytes(raw)));
        }
        Ok(out)
    }

    /// The saved sync state of a replica.
    pub(crate) fn replica_status(&self, name: &str) -> Result<Option<ReplicaStatus>, CatalogError> {
        self.replica_state
            .get(name)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Saves the sync state of a replica, flushed.
    pub(crate) fn put_replica_status(&self, status: &ReplicaStatus) -> Result<(), CatalogError> {
        self.replica_state
            .insert(status.name.as_bytes(), encode(status))?;
        self.db.flush()?;
        Ok(())
    }

    /// Flushes everything to disk.
    pub(crate) fn flush(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Creates the catalog's directory 0700 (or makes an existing one so): sled creates its files
/// with the umask's mode, and the catalog names every host's snapshots and chunks.
fn private_dir(path: &Path) -> Result<(), CatalogError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| CatalogError::Db(sled::Error::Io(e)))
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, CatalogError> {
    frame::decode_body(v).map_err(|e| CatalogError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetvault_common::ChunkerParams;

    pub(crate) fn record(id: SnapshotId, status: SnapshotStatus) -> SnapshotRecord {
        SnapshotRecord::new(id, "a", "s", "command", ChunkerParams::default(), 1, status)
    }

    #[test]
    fn refs_of_a_snapshot_larger_than_one_batch_are_all_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), Vec::new).unwrap();
        let ids: Vec<ChunkId> = (0..REF_BATCH * 2 + 7)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        cat.add_refs("a", ids.iter()).unwrap();
        assert!(ids.iter().all(|id| cat.has_ref("a", id).unwrap()));
        assert!(!cat.has_ref("b", &ids[0]).unwrap());
        assert!(!cat.has_ref("a", &ChunkId::of(b"never added")).unwrap());
    }

    #[test]
    fn a_peer_id_the_counter_cannot_go_past_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), Vec::new).unwrap();
        for id in [
            u64::MAX,
            u64::MAX - 1,
            (clock::now_ms() + 2 * MAX_ID_AHEAD_MS) << 12,
        ] {
            let rec = record(SnapshotId(id), SnapshotStatus::Completed);
            let err = cat.adopt(&rec, "peer").unwrap_err();
            assert!(err.to_string().contains("out of range"), "{err}");
            assert!(matches!(
                cat.get(SnapshotId(id)),
                Err(CatalogError::NotFound(_))
            ));
        }
        // A primary whose clock is a little ahead is fine, and ids here continue after it.
        let ahead = SnapshotId((clock::now_ms() + 3_600_000) << 12);
        cat.adopt(&record(ahead, SnapshotStatus::Completed), "peer")
            .unwrap();
        assert!(cat.next_id() > ahead);
    }

    #[test]
    fn catalog_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        drop(Catalog::open(&path, Vec::new).unwrap());
        assert_eq!(mode(&path), 0o700);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(Catalog::open(&path, Vec::new).unwrap());
        assert_eq!(mode(&path), 0o700, "an existing open catalog dir");
    }

    #[test]
    fn refs_are_listed_per_owner_and_removed() {
        let refs = |cat: &Catalog, owner: &str| {
            let mut v = Vec::new();
            cat.refs_of(owner, |id| v.push(id)).unwrap();
            v
        };
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), Vec::new).unwrap();
        let ids: Vec<ChunkId> = (0..5u8).map(|i| ChunkId::of(&[i])).collect();
        cat.add_refs("a", ids.iter()).unwrap();
        cat.add_refs("ab", ids[..2].iter()).unwrap();
        cat.add_refs("peer/x", ids[..1].iter()).unwrap();
        assert_eq!(cat.ref_owners().unwrap(), ["a", "ab", "peer/x"]);
        let mut of_a = refs(&cat, "a");
        of_a.sort_by_key(|c| c.0);
        let mut all = ids.clone();
        all.sort_by_key(|c| c.0);
        assert_eq!(of_a, all);
        cat.remove_refs("a", ids[1..].iter()).unwrap();
        assert_eq!(refs(&cat, "a"), vec![ids[0]]);
        assert_eq!(refs(&cat, "ab").len(), 2);
        let id = cat.next_id();
        cat.begin(&record(id, SnapshotStatus::Running)).unwrap();
        assert_eq!(cat.snapshots_after(SnapshotId(id.0 - 1)).unwrap().len(), 1);
        assert!(cat.snapshots_after(id).unwrap().is_empty());
    }

    #[test]
    fn running_snapshots_fail_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cat = Catalog::open(dir.path(), Vec::new).unwrap();
            let id = cat.next_id();
            cat.begin(&record(id, SnapshotStatus::Running)).unwrap();
        }
        let cat = Catalog::open(dir.path(), Vec::new).unwrap();
        let all = cat.list(&SnapshotFilter::default()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].status.name(), "failed");
        let next = cat.next_id();
        assert!(next > all[0].id);
    }

    #[test]
    fn empty_catalog_is_rebuilt_from_records() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record(SnapshotId(42), SnapshotStatus::Completed);
        let cat = Catalog::open(dir.path(), || vec![(rec.clone(), Vec::new())]).unwrap();
        assert_eq!(cat.get(SnapshotId(42)).unwrap(), rec);
        assert_eq!(
            cat.last_completed("a", "s").unwrap().unwrap().id,
            SnapshotId(42)
        );
    }
}
