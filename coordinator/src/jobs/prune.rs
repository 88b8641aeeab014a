//! What keeps the catalog bounded besides retention of completed snapshots: old failed records
//! and chunk refs that no snapshot of their owner needs any more.
//!
//! - Failed records: per agent and source the newest [`KEEP_FAILED_PER_SOURCE`], per agent
//!   the newest [`KEEP_FAILED_PER_AGENT`] are kept; older ones are deleted. Run with a job's
//!   retention (for the agents the job covers) and at every garbage collection (for all).
//! - Chunk refs (the proof that an agent holds a chunk, `Catalog::has_ref`): at every garbage
//!   collection, an agent's refs to chunks that none of its completed snapshots references are
//!   deleted. An agent that needs such a chunk again is told it is missing and uploads it.
//!   Refs of replicating peers (`peer/NAME`) are left alone: they are what lets a cut-off sync
//!   resume.
//!
//! A ref is deleted only when it cannot be in use: its owner had no backup in progress when
//! the snapshots were listed and has begun none since, and the chunk is not pinned by a
//! running backup; both are checked under the pins lock, which a "which are missing?" answer
//! and an upload also take.

use std::collections::{BTreeMap, HashSet};

use fleetvault_common::protocol::SnapshotFilter;
use fleetvault_common::{ChunkId, SnapshotId, SnapshotRecord, SnapshotStatus};
use tracing::{info, warn};

use crate::error::OpError;
use crate::limits::{KEEP_FAILED_PER_AGENT, KEEP_FAILED_PER_SOURCE};
use crate::State;

/// Deletes the failed records of the agents `covers` accepts beyond what is kept; returns how
/// many were deleted.
pub(crate) fn prune_failed(state: &State, covers: impl Fn(&str) -> bool) -> Result<u64, OpError> {
    let filter = SnapshotFilter {
        status: Some("failed".into()),
        ..SnapshotFilter::default()
    };
    let failed = state.catalog.list(&filter)?;
    let mut by_agent: BTreeMap<&str, Vec<&SnapshotRecord>> = BTreeMap::new();
    for r in failed.iter().filter(|r| covers(&r.agent)) {
        by_agent.entry(&r.agent).or_default().push(r);
    }
    let mut deleted = 0;
    for (agent, mut recs) in by_agent {
        // Newest first (ids sort by start time).
        recs.sort_by_key(|r| std::cmp::Reverse(r.id));
        let mut per_source: BTreeMap<&str, usize> = BTreeMap::new();
        let mut kept = 0;
        for r in recs {
            let n = per_source.entry(&r.source).or_default();
            if *n < KEEP_FAILED_PER_SOURCE && kept < KEEP_FAILED_PER_AGENT {
                *n += 1;
                kept += 1;
                continue;
            }
            remove_failed(state, r.id)?;
            deleted += 1;
        }
        if deleted > 0 {
            info!(agent, deleted, "old failed records pruned");
        }
    }
    Ok(deleted)
}

/// Removes one failed record (from the store too, should one be there).
fn remove_failed(state: &State, id: SnapshotId) -> Result<(), OpError> {
    state.store.remove_record(id)?;
    match state.catalog.delete(id) {
        Ok(()) | Err(crate::catalog::CatalogError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every agent's chunk refs that none of its completed snapshots needs; returns how
/// many were deleted. An owner whose snapshots cannot be read keeps all its refs.
pub(crate) fn prune_refs(state: &State) -> Result<u64, OpError> {
    let records = state.catalog.list(&SnapshotFilter::default())?;
    let newest = records.iter().map(|r| r.id).max().unwrap_or(SnapshotId(0));
    let mut deleted = 0;
    for owner in state.catalog.ref_owners()? {
        if owner.starts_with("peer/") {
            continue;
        }
        let own: Vec<&SnapshotRecord> = records.iter().filter(|r| r.agent == owner).collect();
        if own
            .iter()
            .any(|r| matches!(r.status, SnapshotStatus::Running | SnapshotStatus::Pending))
        {
            continue;
        }
        let mut live: HashSet<ChunkId> = HashSet::new();
        let mut readable = true;
        for rec in own.iter().filter(|r| r.status == SnapshotStatus::Completed) {
            let Some(root) = &rec.root else { continue };
            match crate::store::load_manifest(&state.store, rec.id, root) {
                Ok((manifest, _)) => {
                    live.extend(root.chunks.iter().map(|c| c.id));
                    live.extend(manifest.data_chunks().map(|c| c.id));
                }
                Err(e) => {
                    warn!(agent = %owner, error = %e, "chunk refs kept: a snapshot cannot be read");
                    readable = false;
                    break;
                }
            }
        }
        if !readable {
            continue;
        }
        let mut refs = Vec::new();
        state.catalog.refs_of(&owner, |id| refs.push(id))?;
        let pins = state.pins.lock();
        // Begun since the listing: its backup may rely on any of these refs.
        let begun = state.catalog.snapshots_after(newest)?;
        if begun.iter().any(|r| r.agent == owner) {
            continue;
        }
        let stale: Vec<ChunkId> = refs
            .into_iter()
            .filter(|id| !live.contains(id) && !pins.holds(id))
            .collect();
        if stale.is_empty() {
            continue;
        }
        state.catalog.remove_refs(&owner, stale.iter())?;
        drop(pins);
        info!(agent = %owner, refs = stale.len(), "chunk refs no snapshot needs pruned");
        deleted += stale.len() as u64;
    }
    Ok(deleted)
}

/// Both prunings, as a garbage collection runs them; failures are logged, never fatal.
pub(crate) fn prune_all(state: &State) {
    if let Err(e) = prune_failed(state, |_| true) {
        warn!(error = %e, "pruning failed records");
    }
    if let Err(e) = prune_refs(state) {
        warn!(error = %e, "pruning chunk refs");
    }
}
