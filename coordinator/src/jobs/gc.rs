//! Garbage collection: deletes chunks that no completed snapshot references (docs/architecture.md rules 3
//! and 9), safe while backups run.
//!
//! 1. The reference time is taken first and never moves; from then on, every backup that
//!    commits keeps its pins until the collection ends (`Pins::collection_started`).
//! 2. Mark: every chunk of every completed snapshot (its manifest and the data it lists).
//!    Any error listing the snapshots or the store aborts before anything is deleted. A
//!    snapshot whose manifest cannot be read (damaged, or a hostile record) does not stop
//!    the others' collection: its data chunks are unknown, so every chunk its agent ever
//!    proven (the catalog's references) is kept with its manifest's, and it is reported.
//! 3. Sweep: a chunk that is not marked is deleted only if it is older than the minimum age
//!    (relative to the reference time) and no running backup has pinned it, checked under the
//!    pins lock, which a "which are missing?" answer also holds: an answer "present" and a
//!    deletion of the same chunk never interleave. A backup that commits after a sweep
//!    re-checks that everything it references exists, pinning each chunk under the same lock.
//! 4. The parents of running backups are marked too (`Pins::parents`, after the listing): an
//!    incremental files backup reuses its parent's chunk lists for unchanged files without
//!    asking `Missing`, and retention may delete that parent while the backup runs.
//! 5. One collection at a time (`State::gc_lock`): a second one, operator's or scheduled, is
//!    refused with "a garbage collection is already running" (the scheduler skips that
//!    occurrence, as it does for a job still running). Two at once would share
//!    `Pins::collection_started` and its released pins, and the first to end would drop the pins of backups
//!    that committed while the other was still sweeping.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fleetvault_common::protocol::{GcReport, SnapshotFilter};
use fleetvault_common::{ChunkId, SnapshotStatus};
use tracing::{info, warn};

use crate::error::OpError;
use crate::State;

/// Why a collection did not start.
pub(crate) const ALREADY_RUNNING: &str =
    "a garbage collection is already running; try again when it has finished";

/// Collects garbage; chunks younger than `min_age` are kept whatever their references.
pub(crate) fn collect(state: &State, min_age: Duration) -> Result<GcReport, OpError> {
    let _one_at_a_time = match state.gc_lock.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::WouldBlock) => {
            return Err(OpError::Busy(ALREADY_RUNNING));
        }
        // A collection that panicked left nothing half-done that the next one relies on.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
    };
    // Test-only fault switch: a collection that takes its time (the lock held, nothing marked).
    if let Some(hold) = crate::fault::switch!("FLEETVAULT_FAULT_GC_HOLD_WHILE") {
        hold.hold_while_file_exists();
    }
    let started = Instant::now();
    let reference = crate::clock::now_system();
    state.pins.collection_started();
    let result = mark_and_sweep(state, reference, min_age);
    state.pins.collection_ended();
    let mut report = result?;
    super::prune::prune_all(state);
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        deleted = report.deleted_chunks,
        freed_bytes = report.freed_bytes,
        live = report.live_chunks,
        "garbage collection finished"
    );
    Ok(report)
}

fn mark_and_sweep(
    state: &State,
    reference: std::time::SystemTime,
    min_age: Duration,
) -> Result<GcReport, OpError> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut unreadable = Vec::new();
    let records = state
        .catalog
        .list(&SnapshotFilter::default())
        .map_err(|e| nothing_deleted("snapshots", e))?;
    for rec in records
        .iter()
        .filter(|r| r.status == SnapshotStatus::Completed)
    {
        let Some(root) = &rec.root else { continue };
        live.extend(root.chunks.iter().map(|c| c.id));
        match crate::store::load_manifest(&state.store, rec.id, root) {
            Ok((manifest, _)) => live.extend(manifest.data_chunks().map(|c| c.id)),
            Err(e) => {
                warn!(snapshot = %rec.id, agent = %rec.agent, error = %e, "manifest unreadable; keeping every chunk its agent references (run verify)");
                state
                    .catalog
                    .refs_of(&rec.agent, |id| {
                        live.insert(id);
                    })
                    .map_err(|e| nothing_deleted("references", e))?;
                unreadable.push(rec.id);
            }
        }
    }
    mark_parents_of_running_backups(state, &records, &mut live);
    let files = state
        .store
        .list_chunks()
        .map_err(|e| nothing_deleted("the store", e))?;
    let cutoff = reference
        .checked_sub(min_age)
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut report = GcReport {
        live_chunks: live.len() as u64,
        unreadable,
        ..GcReport::default()
    };
    // Test-only fault switch: die after this many deletions, as a crash mid-collection would.
    let abort_after = crate::fault::switch!("FLEETVAULT_FAULT_GC_ABORT_AFTER");
    for (id, size, mtime) in files {
        if let Some(fault) = &abort_after {
            if fault.number().is_some_and(|n| report.deleted_chunks >= n) {
                fault.crash("aborting mid-collection");
            }
        }
        if live.contains(&id) {
            continue;
        }
        if mtime > cutoff {
            report.young_chunks += 1;
            continue;
        }
        let pins = state.pins.lock();
        if pins.holds(&id) {
            continue;
        }
        state
            .store
            .delete_chunk(&id)
            .map_err(|source| OpError::Sweep {
                deleted: report.deleted_chunks,
                source,
            })?;
        drop(pins);
        report.deleted_chunks += 1;
        report.freed_bytes += size;
    }
    state.store.sync_chunk_dirs()?;
    Ok(report)
}

/// A listing the mark phase needs failed: the collection stops before deleting anything.
fn nothing_deleted(what: &'static str, e: impl Into<OpError>) -> OpError {
    OpError::NothingDeleted {
        what,
        source: Box::new(e.into()),
    }
}

/// Marks the chunks of every parent a running backup was given at `Begin` (read after the
/// catalog's listing, so a parent deleted before that listing is here). A parent listed as
/// completed is marked already. One whose manifest cannot be read is skipped: the agent could
/// not have read it either, and its commit re-checks and pins every chunk it references.
fn mark_parents_of_running_backups(
    state: &State,
    listed: &[fleetvault_common::SnapshotRecord],
    live: &mut HashSet<ChunkId>,
) {
    let parents = state.pins.parents();
    let completed: HashSet<_> = listed
        .iter()
        .filter(|r| r.status == SnapshotStatus::Completed)
        .map(|r| r.id)
        .collect();
    let mut done = HashSet::new();
    for (id, root) in parents {
        if completed.contains(&id) || !done.insert(id) {
            continue;
        }
        match crate::store::load_manifest(&state.store, id, &root) {
            Ok((manifest, _)) => {
                live.extend(root.chunks.iter().map(|c| c.id));
                live.extend(manifest.data_chunks().map(|c| c.id));
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "parent of a running backup unreadable; its chunks are not kept for it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::stored_snapshot;

    fn state(dir: &std::path::Path) -> State {
        let store = crate::store::ChunkStore::open(&dir.join("store")).unwrap();
        let catalog = crate::catalog::Catalog::open(&dir.join("catalog"), Vec::new).unwrap();
        let cfg: crate::config::CoordinatorConfig =
            toml::from_str("listen = \"127.0.0.1:0\"\nserver_name = \"localhost\"\n").unwrap();
        State::new(dir, store, catalog, &cfg)
    }

    #[test]
    fn a_second_collection_is_refused_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        {
            let _running = state.gc_lock.lock().unwrap();
            let err = collect(&state, Duration::ZERO).unwrap_err().to_string();
            assert_eq!(err, ALREADY_RUNNING);
        }
        collect(&state, Duration::ZERO).unwrap();
    }

    #[test]
    fn the_parent_of_a_running_backup_keeps_its_chunks_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let id = state.catalog.next_id();
        let (rec, data_id) = stored_snapshot(&state.store, id, b"reused by the next backup");
        state.store.write_record(&rec).unwrap();
        state.catalog.finish(&rec).unwrap();
        let root = rec.root.clone().unwrap();
        let manifest_id = root.chunks[0].id;
        // A backup on connection 1 began with this parent; then retention deleted it.
        state.pins.lock().pin_parent(1, id, root);
        state.store.remove_record(id).unwrap();
        state.catalog.delete(id).unwrap();
        let report = collect(&state, Duration::ZERO).unwrap();
        assert_eq!(report.deleted_chunks, 0, "{report:?}");
        assert!(state.store.contains(&data_id) && state.store.contains(&manifest_id));
        // Once the backup is over, the deleted parent's chunks are garbage.
        state.pins.release(1);
        let report = collect(&state, Duration::ZERO).unwrap();
        assert_eq!(report.deleted_chunks, 2, "{report:?}");
        assert!(!state.store.contains(&data_id));
    }

    #[test]
    fn an_unreadable_manifest_stops_no_one_elses_collection() {
        use crate::testing::stream_snapshot;
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path());
        let broken = stream_snapshot(&state, "broken", b"the broken host's data");
        let kept = stream_snapshot(&state, "other", b"still referenced");
        let gone = stream_snapshot(&state, "other", b"deleted since");
        // The broken snapshot's manifest chunk is lost.
        let root = broken.root.clone().unwrap();
        state.store.delete_chunk(&root.chunks[0].id).unwrap();
        crate::jobs::snapshots::delete(&state, gone.id).unwrap();

        let report = collect(&state, Duration::ZERO).unwrap();
        assert_eq!(report.unreadable, vec![broken.id]);
        assert_eq!(report.deleted_chunks, 2, "{report:?}");
        let gone_root = gone.root.unwrap();
        assert!(!state.store.contains(&gone_root.chunks[0].id));
        assert!(!state.store.contains(&ChunkId::of(b"deleted since")));
        // What a readable snapshot needs, and what the unreadable one's agent proved, stays.
        assert!(state.store.contains(&ChunkId::of(b"still referenced")));
        assert!(state.store.contains(&kept.root.unwrap().chunks[0].id));
        assert!(state
            .store
            .contains(&ChunkId::of(b"the broken host's data")));
    }
}
