//! What operators and retention do to recorded snapshots: forget by a job's policy (and a
//! peer's policy on a replica), delete and protect, a bundle's parts with it.

use std::collections::BTreeMap;

use fleetvault_common::protocol::{RetentionDecision, SnapshotFilter};
use fleetvault_common::{SnapshotId, SnapshotRecord, SnapshotStatus};
use tracing::info;

use crate::catalog::CatalogError;
use crate::config::{JobConfig, Policy};
use crate::error::OpError;
use crate::jobs::retention::{apply, Candidate};
use crate::State;

/// Applies `job`'s retention to its completed snapshots, per agent and source; deletes
/// what it forgets unless `dry_run`.
pub(crate) fn forget(
    state: &State,
    job: &JobConfig,
    dry_run: bool,
) -> Result<Vec<RetentionDecision>, OpError> {
    let filter = SnapshotFilter {
        job: Some(job.name.clone()),
        status: Some("completed".into()),
        ..SnapshotFilter::default()
    };
    let records = state.catalog.list(&filter)?;
    let decisions = retain(
        state,
        &job.retention,
        &records,
        dry_run,
        &format!("job {}", job.name),
    )?;
    if !dry_run {
        // Failed runs are not snapshots to keep: only the newest few of each agent the
        // job covers stay, whatever job they name (an agent chooses that name).
        super::prune::prune_failed(state, |agent| job.matches_agent(agent))?;
    }
    Ok(decisions)
}

/// On a replica: applies `policy` to the snapshots received from peer `peer`.
pub(crate) fn forget_received(
    state: &State,
    peer: &str,
    policy: &Policy,
) -> Result<Vec<RetentionDecision>, OpError> {
    let filter = SnapshotFilter {
        status: Some("completed".into()),
        ..SnapshotFilter::default()
    };
    let mut records = state.catalog.list(&filter)?;
    let mut from_peer = Vec::new();
    for r in records.drain(..) {
        if state.catalog.origin(r.id)?.as_deref() == Some(peer) {
            from_peer.push(r);
        }
    }
    retain(state, policy, &from_peer, false, &format!("peer {peer}"))
}

/// Applies `policy` to `records` per agent and source; `what` names the policy in logs.
fn retain(
    state: &State,
    policy: &Policy,
    records: &[SnapshotRecord],
    dry_run: bool,
    what: &str,
) -> Result<Vec<RetentionDecision>, OpError> {
    let mut groups: BTreeMap<(String, String), Vec<&SnapshotRecord>> = BTreeMap::new();
    // A bundle's parts go with their bundle, never on their own.
    for r in records.iter().filter(|r| !crate::bundle::is_part(r)) {
        groups
            .entry((r.agent.clone(), r.source.clone()))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((agent, source), recs) in groups {
        let candidates: Vec<Candidate<SnapshotId>> = recs
            .iter()
            .map(|r| Candidate {
                id: r.id,
                time_ms: r.started_ms,
                protected: r.protected,
            })
            .collect();
        for d in apply(policy, &candidates) {
            let rec = recs
                .iter()
                .find(|r| r.id == d.id)
                .expect("decided ids come from recs");
            if !d.keep() && !dry_run {
                delete(state, d.id).map_err(|e| OpError::Forgetting {
                    id: d.id,
                    source: Box::new(e),
                })?;
                info!(snapshot = %d.id, policy = %what, "forgotten by retention");
            }
            out.push(RetentionDecision {
                snapshot: d.id,
                agent: agent.clone(),
                source: source.clone(),
                started_ms: rec.started_ms,
                keep: d.keep(),
                reasons: d.reasons,
            });
        }
    }
    Ok(out)
}

/// Deletes a snapshot record: first from the store (so a rebuilt catalog never brings it
/// back), then from the catalog. Its chunks go at the next garbage collection.
pub(crate) fn delete(state: &State, id: SnapshotId) -> Result<(), OpError> {
    let rec = state.catalog.get(id)?;
    if matches!(
        rec.status,
        SnapshotStatus::Running | SnapshotStatus::Pending
    ) {
        return Err(OpError::Conflict(format!(
            "snapshot {id} is {}; it cannot be deleted now",
            rec.status.name()
        )));
    }
    if rec.protected {
        return Err(OpError::Conflict(format!(
            "snapshot {id} is protected; unprotect it first"
        )));
    }
    // A bundle goes first, then its parts: a listed bundle never misses a part.
    let parts = if rec.status == SnapshotStatus::Completed {
        crate::bundle::parts(state, &rec)?
    } else {
        Vec::new()
    };
    let mut present = Vec::new();
    for part in parts {
        match state.catalog.get(part) {
            Ok(p) if p.protected => {
                return Err(OpError::Conflict(format!(
                    "part {part} of bundle {id} is protected; unprotect it first"
                )))
            }
            Ok(_) => present.push(part),
            Err(CatalogError::NotFound(_)) => {}
            Err(e) => {
                return Err(OpError::Part {
                    bundle: id,
                    part,
                    source: Box::new(e.into()),
                })
            }
        }
    }
    remove(state, id)?;
    for part in present {
        remove(state, part)?;
    }
    Ok(())
}

/// Removes one snapshot record: store first (a rebuilt catalog never brings it back).
fn remove(state: &State, id: SnapshotId) -> Result<(), OpError> {
    // A snapshot received from a primary stays gone: the next sync must not send it again.
    if state.catalog.origin(id)?.is_some() {
        state.catalog.tombstone(id)?;
    }
    state.store.remove_record(id)?;
    Ok(state.catalog.delete(id)?)
}

/// Sets or clears a snapshot's protection (in its store record too); a bundle's parts
/// with it.
pub(crate) fn protect(state: &State, id: SnapshotId, on: bool) -> Result<(), OpError> {
    let rec = state.catalog.get(id)?;
    if rec.status == SnapshotStatus::Completed {
        for part in crate::bundle::parts(state, &rec)? {
            protect_one(state, part, on)?;
        }
    }
    protect_one(state, id, on)
}

fn protect_one(state: &State, id: SnapshotId, on: bool) -> Result<(), OpError> {
    let mut rec = state.catalog.get(id)?;
    rec.protected = on;
    if rec.status == SnapshotStatus::Completed {
        state.store.write_record(&rec)?;
    }
    Ok(state.catalog.update(&rec)?)
}
