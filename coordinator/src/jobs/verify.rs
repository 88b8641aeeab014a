//! Verification: re-reads and re-hashes every chunk a snapshot references and decodes its
//! manifest. A damaged chunk is quarantined (the store then answers "missing" for it, so the
//! next backup of that data uploads it again and heals older snapshots); a snapshot with
//! damaged or missing chunks is tagged `damaged` with the chunks in its warnings, and the tag
//! is lifted when a later verify finds it whole again.
//!
//! What a snapshot's own record or manifest says wrongly (a chunk length that is not the
//! stored chunk's, checksums that differ, a manifest that cannot be read) is that snapshot's
//! problem: it is tagged `damaged` with the reason, and neither the chunks it shares with
//! other snapshots nor the verification of the others are touched.
//!
//! One verification at a time (`State::verify_lock`): an operator's waits for the one
//! running; a scheduled one (`verify_schedule`) that finds one running is skipped.

use std::collections::HashMap;

use fleetvault_common::protocol::{SnapshotFilter, VerifyResult};
use fleetvault_common::{
    chunk, ChunkId, ChunkRef, Manifest, SnapshotId, SnapshotRecord, SnapshotStatus,
};
use tracing::{info, warn};

use crate::error::OpError;
use crate::State;

/// The tag of a snapshot that failed verification.
pub(crate) const DAMAGED: &str = "damaged";

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Whole, with this plaintext length.
    Ok(u32),
    Damaged,
    Missing,
}

/// How far a verification is: snapshots done of how many.
#[derive(Debug, Default)]
pub(crate) struct VerifyProgress {
    pub(crate) done: std::sync::atomic::AtomicU64,
    pub(crate) total: std::sync::atomic::AtomicU64,
}

/// Verifies one snapshot, or every completed one, after any verification running.
/// Checks a commit's manifest against itself and the commit: lengths agree with the chunks'
/// lengths, and a stream's checksum is the one the commit states (a tree states none).
pub(crate) fn check_fields(
    snapshot: SnapshotId,
    manifest: &Manifest,
    checksum: Option<[u8; 32]>,
) -> Result<(), OpError> {
    manifest
        .check_sizes()
        .map_err(|e| OpError::Refused(format!("snapshot {snapshot}: manifest: {e}")))?;
    let agrees = match manifest {
        Manifest::Stream(s) => checksum == Some(s.checksum),
        Manifest::Tree(_) => checksum.is_none(),
    };
    if !agrees {
        return Err(OpError::Refused(format!(
            "snapshot {snapshot}: the stated checksum is not the manifest's"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn verify(
    state: &State,
    only: Option<SnapshotId>,
) -> Result<Vec<VerifyResult>, OpError> {
    verify_with_progress(state, only, &VerifyProgress::default())
}

/// [`verify`], counting the snapshots done in `progress` as it goes.
pub(crate) fn verify_with_progress(
    state: &State,
    only: Option<SnapshotId>,
    progress: &VerifyProgress,
) -> Result<Vec<VerifyResult>, OpError> {
    // A verification that panicked left nothing half-done that the next one relies on.
    let _one_at_a_time = state
        .verify_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    verify_locked(state, only, progress)
}

/// The scheduled verification of every completed snapshot: `None` when another verification
/// is running (this occurrence is skipped), else how many were checked and how many damaged.
pub(crate) fn verify_scheduled(state: &State) -> Option<Result<(usize, usize), OpError>> {
    let _one_at_a_time = match state.verify_lock.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::WouldBlock) => return None,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
    };
    info!("scheduled verification starting");
    Some(
        verify_locked(state, None, &VerifyProgress::default())
            .map(|r| (r.len(), damaged_count(&r))),
    )
}

fn damaged_count(results: &[VerifyResult]) -> usize {
    results
        .iter()
        .filter(|r| !r.damaged.is_empty() || !r.missing.is_empty() || !r.problems.is_empty())
        .count()
}

fn verify_locked(
    state: &State,
    only: Option<SnapshotId>,
    progress: &VerifyProgress,
) -> Result<Vec<VerifyResult>, OpError> {
    use std::sync::atomic::Ordering::Relaxed;
    let records: Vec<SnapshotRecord> = match only {
        Some(id) => {
            // A bundle is verified with its parts.
            let rec = state.catalog.get(id)?;
            let mut recs = Vec::new();
            if rec.status == SnapshotStatus::Completed {
                // A bundle whose index cannot be read is verified alone (and found damaged).
                let parts = crate::bundle::parts(state, &rec).unwrap_or_else(|e| {
                    warn!(bundle = %id, error = %e, "cannot read the bundle's parts");
                    Vec::new()
                });
                for part in parts {
                    recs.push(state.catalog.get(part).map_err(|e| OpError::Part {
                        bundle: id,
                        part,
                        source: Box::new(e.into()),
                    })?);
                }
            }
            recs.push(rec);
            recs
        }
        None => state.catalog.list(&SnapshotFilter {
            status: Some("completed".into()),
            ..SnapshotFilter::default()
        })?,
    };
    let mut seen: HashMap<ChunkId, ChunkState> = HashMap::new();
    let mut out = Vec::new();
    progress.total.store(records.len() as u64, Relaxed);
    for rec in records {
        if rec.status != SnapshotStatus::Completed {
            return Err(OpError::Conflict(format!(
                "snapshot {} is {}, not completed",
                rec.id,
                rec.status.name()
            )));
        }
        let r = verify_one(state, &rec, &mut seen)?;
        mark(state, rec, &r)?;
        out.push(r);
        progress.done.fetch_add(1, Relaxed);
    }
    info!(
        snapshots = out.len(),
        damaged = damaged_count(&out),
        "verify finished"
    );
    Ok(out)
}

fn check(
    state: &State,
    c: &ChunkRef,
    seen: &mut HashMap<ChunkId, ChunkState>,
) -> Result<ChunkState, OpError> {
    if let Some(s) = seen.get(&c.id) {
        return Ok(*s);
    }
    let s = match state.store.get(&c.id)? {
        None => ChunkState::Missing,
        // Only the chunk's own content decides: a reference's length is its manifest's word.
        Some(env) => match chunk::verify(&env, &c.id) {
            Ok(len) => ChunkState::Ok(len),
            Err(_) => {
                warn!(chunk = %c.id, "damaged chunk; quarantining it");
                state.store.quarantine(&c.id)?;
                ChunkState::Damaged
            }
        },
    };
    seen.insert(c.id, s);
    Ok(s)
}

fn verify_one(
    state: &State,
    rec: &SnapshotRecord,
    seen: &mut HashMap<ChunkId, ChunkState>,
) -> Result<VerifyResult, OpError> {
    let mut r = VerifyResult {
        snapshot: rec.id,
        agent: rec.agent.clone(),
        source: rec.source.clone(),
        chunks: 0,
        damaged: Vec::new(),
        missing: Vec::new(),
        problems: Vec::new(),
    };
    let note = |c: &ChunkRef, s: ChunkState, r: &mut VerifyResult| match s {
        ChunkState::Ok(len) if len != c.len => {
            let p = format!(
                "the manifest says chunk {} holds {} bytes; it holds {len}",
                c.id, c.len
            );
            if !r.problems.contains(&p) {
                r.problems.push(p);
            }
        }
        ChunkState::Ok(_) => {}
        ChunkState::Damaged if !r.damaged.contains(&c.id) => r.damaged.push(c.id),
        ChunkState::Missing if !r.missing.contains(&c.id) => r.missing.push(c.id),
        _ => {}
    };
    let Some(root) = &rec.root else {
        return Ok(r);
    };
    let mut whole = true;
    for c in &root.chunks {
        r.chunks += 1;
        let s = check(state, c, seen)?;
        whole &= matches!(s, ChunkState::Ok(_));
        note(c, s, &mut r);
    }
    if !whole {
        return Ok(r);
    }
    let manifest = match crate::store::load_manifest(&state.store, rec.id, root) {
        Ok((m, _)) => m,
        Err(e) => {
            r.problems.push(format!("its manifest cannot be read: {e}"));
            return Ok(r);
        }
    };
    let mut distinct = std::collections::HashSet::new();
    for c in manifest.data_chunks() {
        if distinct.insert(c.id) {
            r.chunks += 1;
        }
        // Every reference, not only each chunk's first: each states a length.
        let s = check(state, c, seen)?;
        note(c, s, &mut r);
    }
    if let Err(e) = check_fields(rec.id, &manifest, rec.checksum) {
        r.problems.push(e.to_string());
    }
    Ok(r)
}

/// Tags a damaged snapshot (or lifts the tag from a healed one), in the catalog and store.
fn mark(state: &State, mut rec: SnapshotRecord, r: &VerifyResult) -> Result<(), OpError> {
    let damaged = !r.damaged.is_empty() || !r.missing.is_empty() || !r.problems.is_empty();
    let was = rec.tags.iter().any(|t| t == DAMAGED);
    if damaged == was && !damaged {
        return Ok(());
    }
    rec.tags.retain(|t| t != DAMAGED);
    rec.warnings.retain(|w| !w.starts_with("verify: "));
    if damaged {
        rec.tags.push(DAMAGED.into());
        for id in &r.damaged {
            rec.warnings.push(format!("verify: chunk {id} is damaged"));
        }
        for id in &r.missing {
            rec.warnings.push(format!("verify: chunk {id} is missing"));
        }
        for p in &r.problems {
            rec.warnings.push(format!("verify: {p}"));
        }
    } else {
        info!(snapshot = %rec.id, "snapshot verifies again");
    }
    state.store.write_record(&rec)?;
    Ok(state.catalog.update(&rec)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{put, snapshot, stream_snapshot};
    use fleetvault_common::{Manifest, StreamManifest};

    #[test]
    fn a_scheduled_verification_skips_while_one_runs_and_tags_like_verify() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path());
        let good = stream_snapshot(&state, "a", b"whole");
        let honest = crate::testing::stream(&state, b"checksum lies");
        let bad = snapshot(
            &state,
            "b",
            "command",
            &Manifest::Stream(honest),
            Some([7; 32]),
        );
        // Its error as the message, to compare.
        let verify_scheduled =
            |s: &State| super::verify_scheduled(s).map(|r| r.map_err(|e| e.to_string()));
        {
            let _operator = state.verify_lock.lock().unwrap();
            assert!(verify_scheduled(&state).is_none());
        }
        assert!(!state
            .catalog
            .get(bad.id)
            .unwrap()
            .tags
            .contains(&DAMAGED.into()));
        assert_eq!(verify_scheduled(&state), Some(Ok((2, 1))));
        let tagged = state.catalog.get(bad.id).unwrap();
        assert!(tagged.tags.contains(&DAMAGED.into()), "{tagged:?}");
        assert!(tagged.warnings.iter().any(|w| w.starts_with("verify: ")));
        assert!(!state
            .catalog
            .get(good.id)
            .unwrap()
            .tags
            .contains(&DAMAGED.into()));
    }

    #[test]
    fn a_lying_record_is_its_own_problem_and_stops_no_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path());
        let shared = b"a file every host has";
        let victim = stream_snapshot(&state, "victim", shared);
        // Records a commit now refuses: a chunk length that lies (the stream's length
        // agreeing), and a checksum that is not the manifest's.
        let mut lie = put(&state, shared);
        lie.len += 5;
        let m = StreamManifest {
            chunks: vec![lie],
            len: u64::from(lie.len),
            checksum: *blake3::hash(shared).as_bytes(),
        };
        let sum = m.checksum;
        let bad_len = snapshot(&state, "evil", "command", &Manifest::Stream(m), Some(sum));
        let honest = crate::testing::stream(&state, b"evil's data");
        let bad_sum = snapshot(
            &state,
            "evil",
            "command",
            &Manifest::Stream(honest),
            Some([7; 32]),
        );
        let after = stream_snapshot(&state, "other", b"verified after the bad ones");

        let results = verify(&state, None).unwrap();
        assert_eq!(results.len(), 4);
        let of = |id: SnapshotId| results.iter().find(|r| r.snapshot == id).unwrap();
        for good in [victim.id, after.id] {
            let r = of(good);
            assert!(r.damaged.is_empty() && r.missing.is_empty() && r.problems.is_empty());
            assert!(!state
                .catalog
                .get(good)
                .unwrap()
                .tags
                .contains(&DAMAGED.into()));
        }
        // The shared chunk is healthy and stays where it is.
        assert!(state.store.contains(&ChunkId::of(shared)));
        for bad in [bad_len.id, bad_sum.id] {
            let r = of(bad);
            assert!(r.damaged.is_empty() && r.missing.is_empty(), "{r:?}");
            assert_eq!(r.problems.len(), 1, "{r:?}");
            let rec = state.catalog.get(bad).unwrap();
            assert!(rec.tags.contains(&DAMAGED.into()), "{rec:?}");
        }
        assert!(of(bad_len.id).problems[0].contains("holds"));
        assert!(of(bad_sum.id).problems[0].contains("checksum"));
    }
}
