//! Start-up reconciliation: makes the catalog agree with the store's immutable snapshot records
//! (docs/architecture.md rule 10) after a crash at any point.
//!
//! Every writer of a completed snapshot writes its store record first and the catalog second
//! (a commit: `write_record`, then `finish`; a replicated commit: `write_record`, then `adopt`;
//! protect and verify: `write_record`, then `update`), and a delete removes the store record
//! first and the catalog entry second. A crash between the two steps leaves one of:
//!
//! - A store record whose catalog entry is `running` (then `failed` by the restart) or absent:
//!   the commit had checked the snapshot and every chunk it references was in the store. It
//!   becomes `completed` from its record, and its agent gets its chunk refs back. Left
//!   `failed`, garbage collection would free its chunks while `rebuild-catalog` would later
//!   bring it back as completed, its chunks gone.
//! - A store record that differs from a completed catalog entry (protect, verify's tag): the
//!   record, written first, wins.
//! - A completed catalog entry without a store record: a delete cut off by the crash. It is
//!   undone: the record is written back from the catalog, the snapshot stays listed and the
//!   operator deletes it again. (Finishing it instead would also drop a snapshot whose record
//!   file was lost some other way, and garbage collection would then free its chunks.)
//!
//! It runs in `serve` after the catalog is opened and before anything is served or collected,
//! so no collection ever marks from a catalog that disagrees with the store. A record file that
//! cannot be read is named in the log and left alone (verify and `rebuild-catalog` report it).

use std::collections::HashMap;

use fleetvault_common::protocol::SnapshotFilter;
use fleetvault_common::{ChunkId, SnapshotRecord, SnapshotStatus};
use tracing::{info, warn};

use crate::catalog::{Catalog, CatalogError};
use crate::store::{ChunkStore, StoreError};

/// What [`reconcile`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reconciled {
    /// Snapshots made `completed` from their store record (a commit cut off before the catalog).
    pub(crate) completed: usize,
    /// Completed catalog entries replaced by their differing store record.
    pub(crate) updated: usize,
    /// Store records written back from the catalog (a delete cut off before the catalog).
    pub(crate) rewritten: usize,
}

/// The store's snapshot records, each with the chunks it references (manifest and data), for
/// rebuilding a catalog: an agent's references are what lets it back up incrementally. A
/// record whose manifest cannot be read keeps its manifest chunks only (verify reports it).
pub(crate) fn records_with_chunks(
    store: &ChunkStore,
) -> Result<Vec<(SnapshotRecord, Vec<ChunkId>)>, crate::store::StoreError> {
    let records = store.read_records()?;
    Ok(records
        .into_iter()
        .map(|rec| {
            let chunks = chunks_of(store, &rec);
            (rec, chunks)
        })
        .collect())
}

/// The chunks a snapshot references (manifest and data): its agent's proven chunks. A record
/// whose manifest cannot be read keeps its manifest chunks only (verify reports it).
pub(crate) fn chunks_of(store: &ChunkStore, rec: &SnapshotRecord) -> Vec<ChunkId> {
    let Some(root) = &rec.root else {
        return Vec::new();
    };
    let mut chunks: Vec<_> = root.chunks.iter().map(|c| c.id).collect();
    match crate::store::load_manifest(store, rec.id, root) {
        Ok((manifest, _)) => chunks.extend(manifest.data_chunks().map(|c| c.id)),
        Err(e) => {
            warn!(snapshot = %rec.id, error = %e, "manifest unreadable; its data chunks are not attributed to its agent")
        }
    }
    chunks
}

/// Why the catalog could not be made to agree with the store.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReconcileError {
    /// The store's records cannot be listed.
    #[error("listing the store's snapshot records: {0}")]
    Listing(#[source] StoreError),
    /// A record cannot be written back.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Makes `catalog` agree with `store`'s records (see the module doc); flushed.
pub(crate) fn reconcile(
    store: &ChunkStore,
    catalog: &Catalog,
) -> Result<Reconciled, ReconcileError> {
    let mut done = Reconciled::default();
    let ids = store.record_ids().map_err(ReconcileError::Listing)?;
    let listed: HashMap<_, _> = catalog
        .list(&SnapshotFilter::default())?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    for &id in &ids {
        let record = match store.read_record(id) {
            Ok(r) if r.status == SnapshotStatus::Completed => r,
            Ok(r) => {
                warn!(snapshot = %id, status = r.status.name(), "store record is not of a completed snapshot; left alone");
                continue;
            }
            Err(e) => {
                warn!(snapshot = %id, error = %e, "store record unreadable; left alone");
                continue;
            }
        };
        match listed.get(&id) {
            Some(entry) if *entry == record => {}
            Some(entry) if entry.status == SnapshotStatus::Completed => {
                warn!(snapshot = %id, "catalog entry differs from the store record; taking the record");
                catalog.restore(&record, &[])?;
                done.updated += 1;
            }
            entry => {
                warn!(
                    snapshot = %id,
                    catalog = entry.map_or("absent", |e| e.status.name()),
                    "commit cut off after the store record; completing the snapshot"
                );
                catalog.restore(&record, &chunks_of(store, &record))?;
                done.completed += 1;
            }
        }
    }
    for rec in listed.values() {
        if rec.status == SnapshotStatus::Completed && !ids.contains(&rec.id) {
            warn!(snapshot = %rec.id, "completed snapshot without a store record (a delete cut off); writing the record back");
            store.write_record(rec)?;
            done.rewritten += 1;
        }
    }
    catalog.flush()?;
    if done != Reconciled::default() {
        info!(
            completed = done.completed,
            updated = done.updated,
            rewritten = done.rewritten,
            "catalog reconciled with the store"
        );
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleetvault_common::chunk::seal;
    use fleetvault_common::{
        ChunkRef, ChunkerParams, Manifest, SnapshotId, StreamManifest, TreeEntry, TreeManifest,
    };

    /// Stores `data` and a one-file tree manifest listing it; returns the completed record of
    /// snapshot `id` (agent "a", source "s") and the data chunk's id. Nothing is cataloged.
    pub(crate) fn stored_snapshot(
        store: &ChunkStore,
        id: SnapshotId,
        data: &[u8],
    ) -> (SnapshotRecord, ChunkId) {
        let data_id = ChunkId::of(data);
        let tree = TreeManifest {
            entries: vec![TreeEntry {
                path: b"f".to_vec(),
                kind: fleetvault_common::EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 1,
                mtime_nsec: 0,
                size: data.len() as u64,
                inode: 1,
                target: None,
                chunks: vec![ChunkRef {
                    id: data_id,
                    len: data.len() as u32,
                }],
            }],
        };
        let bytes = Manifest::Tree(tree).encode();
        let manifest_id = ChunkId::of(&bytes);
        store
            .put_batch(&[(data_id, seal(data, 1)), (manifest_id, seal(&bytes, 1))])
            .unwrap();
        let mut rec = SnapshotRecord::new(
            id,
            "a",
            "s",
            "files",
            ChunkerParams::default(),
            1,
            SnapshotStatus::Completed,
        );
        rec.root = Some(StreamManifest {
            chunks: vec![ChunkRef {
                id: manifest_id,
                len: bytes.len() as u32,
            }],
            len: bytes.len() as u64,
            checksum: *blake3::hash(&bytes).as_bytes(),
        });
        rec.logical_bytes = data.len() as u64;
        rec.chunks = 1;
        (rec, data_id)
    }

    fn open(dir: &std::path::Path) -> (ChunkStore, Catalog) {
        (
            ChunkStore::open(&dir.join("store")).unwrap(),
            Catalog::open(&dir.join("catalog"), Vec::new).unwrap(),
        )
    }

    #[test]
    fn a_commit_cut_off_after_the_store_record_completes_at_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (id, data_id) = {
            let (store, catalog) = open(dir.path());
            let id = catalog.next_id();
            let (rec, data_id) = stored_snapshot(&store, id, b"cut off");
            let mut running = rec.clone();
            running.status = SnapshotStatus::Running;
            running.root = None;
            catalog.begin(&running).unwrap();
            store.write_record(&rec).unwrap();
            // The crash: the catalog never hears of the commit.
            (id, data_id)
        };
        let (store, catalog) = open(dir.path());
        assert_eq!(catalog.get(id).unwrap().status.name(), "failed");
        let done = reconcile(&store, &catalog).unwrap();
        assert_eq!(done.completed, 1, "{done:?}");
        let rec = catalog.get(id).unwrap();
        assert_eq!(rec, store.read_record(id).unwrap());
        assert_eq!(rec.status, SnapshotStatus::Completed);
        assert!(catalog.has_ref("a", &data_id).unwrap());
        assert!(catalog.next_id() > id);
        assert_eq!(reconcile(&store, &catalog).unwrap(), Reconciled::default());
    }

    #[test]
    fn a_store_record_missing_from_the_catalog_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let (store, catalog) = open(dir.path());
        let far = SnapshotId(catalog.next_id().0 + 1000);
        let (rec, data_id) = stored_snapshot(&store, far, b"never cataloged");
        store.write_record(&rec).unwrap();
        assert_eq!(reconcile(&store, &catalog).unwrap().completed, 1);
        assert_eq!(catalog.get(far).unwrap(), rec);
        assert!(catalog.has_ref("a", &data_id).unwrap());
        assert!(catalog.next_id() > far);
    }

    #[test]
    fn a_delete_cut_off_after_the_store_record_is_undone_and_the_record_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, catalog) = open(dir.path());
        let (rec, _) = stored_snapshot(&store, catalog.next_id(), b"deleted");
        store.write_record(&rec).unwrap();
        catalog.finish(&rec).unwrap();
        let (other, _) = stored_snapshot(&store, catalog.next_id(), b"protected");
        store.write_record(&other).unwrap();
        catalog.finish(&other).unwrap();
        // A delete that removed the store record only; a protect that wrote the record only.
        store.remove_record(rec.id).unwrap();
        let protected = SnapshotRecord {
            protected: true,
            ..other.clone()
        };
        store.write_record(&protected).unwrap();
        let done = reconcile(&store, &catalog).unwrap();
        assert_eq!(
            done,
            Reconciled {
                completed: 0,
                updated: 1,
                rewritten: 1
            }
        );
        assert_eq!(store.read_record(rec.id).unwrap(), rec);
        assert_eq!(catalog.get(rec.id).unwrap(), rec);
        assert_eq!(catalog.get(other.id).unwrap(), protected);
    }
}
