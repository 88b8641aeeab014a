//! Garbage collection: deletes chunks that no completed snapshot references (DESIGN.md rules 3
//! and 9), safe while backups run.
//!
//! 1. The reference time is taken first and never moves; from then on, every backup that
//!    commits keeps its pins until the collection ends (`Pins::gc_running`).
//! 2. Mark: every chunk of every completed snapshot (its manifest and the data it lists).
//!    Any error listing the snapshots or the store aborts before anything is deleted. A
//!    snapshot whose manifest cannot be read (damaged, or a hostile record) does not stop
//!    the others' collection: its data chunks are unknown, so every chunk its agent ever
//!    proven (the catalog's references) is kept with its manifest's, and it is reported.
//! 3. Sweep: a chunk that is not marked is deleted only if it is older than the minimum age
//!    (relative to the reference time) and no running backup has pinned it, checked under the
//!    pins lock, which a "which are missing?" answer also holds: an answer "present" and a
//!    deletion of the same chunk never interleave. A backup that commits after a sweep
//!    re-checks that everything it references exists.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fleetvault_common::protocol::{GcReport, SnapshotFilter};
use fleetvault_common::{ChunkId, SnapshotStatus};
use tracing::{info, warn};

use crate::State;

/// Collects garbage; chunks younger than `min_age` are kept whatever their references.
pub(crate) fn collect(state: &State, min_age: Duration) -> Result<GcReport, String> {
    let started = Instant::now();
    let reference = crate::clock::now_system();
    {
        let mut pins = state.pins.lock().expect("pins lock");
        pins.gc_running = true;
        pins.released.clear();
    }
    let result = mark_and_sweep(state, reference, min_age);
    {
        let mut pins = state.pins.lock().expect("pins lock");
        pins.gc_running = false;
        pins.released.clear();
    }
    let mut report = result?;
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
) -> Result<GcReport, String> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut unreadable = Vec::new();
    let records = state
        .catalog
        .list(&SnapshotFilter::default())
        .map_err(|e| format!("listing snapshots: {e}; nothing deleted"))?;
    for rec in records
        .iter()
        .filter(|r| r.status == SnapshotStatus::Completed)
    {
        let Some(root) = &rec.root else { continue };
        live.extend(root.chunks.iter().map(|c| c.id));
        match crate::server::load_manifest(&state.store, rec.id, root) {
            Ok((manifest, _)) => live.extend(manifest.data_chunks().map(|c| c.id)),
            Err(e) => {
                warn!(snapshot = %rec.id, agent = %rec.agent, error = %e, "manifest unreadable; keeping every chunk its agent references (run verify)");
                state
                    .catalog
                    .refs_of(&rec.agent, |id| {
                        live.insert(id);
                    })
                    .map_err(|e| format!("listing references: {e}; nothing deleted"))?;
                unreadable.push(rec.id);
            }
        }
    }
    let files = state
        .store
        .list_chunks()
        .map_err(|e| format!("listing the store: {e}; nothing deleted"))?;
    let cutoff = reference
        .checked_sub(min_age)
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut report = GcReport {
        live_chunks: live.len() as u64,
        unreadable,
        ..GcReport::default()
    };
    // Test-only fault switch: die after this many deletions, as a crash mid-collection would.
    let abort_after: Option<u64> = std::env::var("FLEETVAULT_FAULT_GC_ABORT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    for (id, size, mtime) in files {
        if abort_after.is_some_and(|n| report.deleted_chunks >= n) {
            tracing::error!(
                "fault switch FLEETVAULT_FAULT_GC_ABORT_AFTER: aborting mid-collection"
            );
            eprintln!("fault switch: aborting mid-collection");
            std::process::abort();
        }
        if live.contains(&id) {
            continue;
        }
        if mtime > cutoff {
            report.young_chunks += 1;
            continue;
        }
        let pins = state.pins.lock().expect("pins lock");
        if pins.holds(&id) {
            continue;
        }
        state
            .store
            .delete_chunk(&id)
            .map_err(|e| format!("{e} (after deleting {} chunks)", report.deleted_chunks))?;
        drop(pins);
        report.deleted_chunks += 1;
        report.freed_bytes += size;
    }
    state.store.sync_chunk_dirs().map_err(|e| e.to_string())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::stream_snapshot;

    #[test]
    fn an_unreadable_manifest_stops_no_one_elses_collection() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path());
        let broken = stream_snapshot(&state, "broken", b"the broken host's data");
        let kept = stream_snapshot(&state, "other", b"still referenced");
        let gone = stream_snapshot(&state, "other", b"deleted since");
        // The broken snapshot's manifest chunk is lost.
        let root = broken.root.clone().unwrap();
        state.store.delete_chunk(&root.chunks[0].id).unwrap();
        crate::jobs::ops::delete(&state, gone.id).unwrap();

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
