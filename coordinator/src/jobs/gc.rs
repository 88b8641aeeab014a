//! Garbage collection: deletes chunks that no completed snapshot references (DESIGN.md rules 3
//! and 9), safe while backups run.
//!
//! 1. The reference time is taken first and never moves; from then on, every backup that
//!    commits keeps its pins until the collection ends (`Pins::gc_running`).
//! 2. Mark: every chunk of every completed snapshot (its manifest and the data it lists).
//!    Any error reading a snapshot or listing the store aborts before anything is deleted.
//! 3. Sweep: a chunk that is not marked is deleted only if it is older than the minimum age
//!    (relative to the reference time) and no running backup has pinned it, checked under the
//!    pins lock, which a "which are missing?" answer also holds: an answer "present" and a
//!    deletion of the same chunk never interleave. A backup that commits after a sweep
//!    re-checks that everything it references exists.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fleetvault_common::protocol::{GcReport, SnapshotFilter};
use fleetvault_common::{ChunkId, SnapshotStatus};
use tracing::info;

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
) -> Result<GcReport, String> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    let records = state
        .catalog
        .list(&SnapshotFilter::default())
        .map_err(|e| format!("listing snapshots: {e}; nothing deleted"))?;
    for rec in records
        .iter()
        .filter(|r| r.status == SnapshotStatus::Completed)
    {
        let Some(root) = &rec.root else { continue };
        let (manifest, _) = crate::server::load_manifest(&state.store, rec.id, root)
            .map_err(|e| format!("{e}; nothing deleted (run verify)"))?;
        live.extend(root.chunks.iter().map(|c| c.id));
        live.extend(manifest.data_chunks().map(|c| c.id));
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
