//! Verification: re-reads and re-hashes every chunk a snapshot references and decodes its
//! manifest. A damaged chunk is quarantined (the store then answers "missing" for it, so the
//! next backup of that data uploads it again and heals older snapshots); a snapshot with
//! damaged or missing chunks is tagged `damaged` with the chunks in its warnings, and the tag
//! is lifted when a later verify finds it whole again.

use std::collections::HashMap;

use fleetvault_common::protocol::{SnapshotFilter, VerifyResult};
use fleetvault_common::{
    chunk, ChunkId, ChunkRef, Manifest, SnapshotId, SnapshotRecord, SnapshotStatus,
};
use tracing::{info, warn};

use crate::State;

/// The tag of a snapshot that failed verification.
pub(crate) const DAMAGED: &str = "damaged";

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Ok,
    Damaged,
    Missing,
}

/// Verifies one snapshot, or every completed one.
pub(crate) fn verify(state: &State, only: Option<SnapshotId>) -> Result<Vec<VerifyResult>, String> {
    let records: Vec<SnapshotRecord> = match only {
        Some(id) => {
            // A bundle is verified with its parts.
            let rec = state.catalog.get(id).map_err(|e| e.to_string())?;
            let mut recs = Vec::new();
            if rec.status == SnapshotStatus::Completed {
                for part in crate::bundle::parts(state, &rec)? {
                    recs.push(
                        state
                            .catalog
                            .get(part)
                            .map_err(|e| format!("bundle {id}: part {part}: {e}"))?,
                    );
                }
            }
            recs.push(rec);
            recs
        }
        None => state
            .catalog
            .list(&SnapshotFilter {
                status: Some("completed".into()),
                ..SnapshotFilter::default()
            })
            .map_err(|e| e.to_string())?,
    };
    let mut seen: HashMap<ChunkId, ChunkState> = HashMap::new();
    let mut out = Vec::new();
    for rec in records {
        if rec.status != SnapshotStatus::Completed {
            return Err(format!(
                "snapshot {} is {}, not completed",
                rec.id,
                rec.status.name()
            ));
        }
        let r = verify_one(state, &rec, &mut seen)?;
        mark(state, rec, &r)?;
        out.push(r);
    }
    let bad = out
        .iter()
        .filter(|r| !r.damaged.is_empty() || !r.missing.is_empty())
        .count();
    info!(snapshots = out.len(), damaged = bad, "verify finished");
    Ok(out)
}

fn check(
    state: &State,
    c: &ChunkRef,
    seen: &mut HashMap<ChunkId, ChunkState>,
) -> Result<ChunkState, String> {
    if let Some(s) = seen.get(&c.id) {
        return Ok(*s);
    }
    let s = match state.store.get(&c.id).map_err(|e| e.to_string())? {
        None => ChunkState::Missing,
        Some(env) => match chunk::verify(&env, &c.id) {
            Ok(len) if len == c.len => ChunkState::Ok,
            _ => {
                warn!(chunk = %c.id, "damaged chunk; quarantining it");
                state.store.quarantine(&c.id).map_err(|e| e.to_string())?;
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
) -> Result<VerifyResult, String> {
    let mut r = VerifyResult {
        snapshot: rec.id,
        agent: rec.agent.clone(),
        source: rec.source.clone(),
        chunks: 0,
        damaged: Vec::new(),
        missing: Vec::new(),
    };
    let note = |c: &ChunkRef, s: ChunkState, r: &mut VerifyResult| match s {
        ChunkState::Ok => {}
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
        whole &= s == ChunkState::Ok;
        note(c, s, &mut r);
    }
    if !whole {
        return Ok(r);
    }
    let (manifest, _) = crate::server::load_manifest(&state.store, rec.id, root)?;
    let mut distinct = std::collections::HashSet::new();
    for c in manifest.data_chunks() {
        if !distinct.insert(c.id) {
            continue;
        }
        r.chunks += 1;
        let s = check(state, c, seen)?;
        note(c, s, &mut r);
    }
    if let Manifest::Stream(s) = &manifest {
        if rec.checksum.is_some_and(|sum| sum != s.checksum) {
            return Err(format!(
                "snapshot {}: record and manifest checksums differ",
                rec.id
            ));
        }
    }
    Ok(r)
}

/// Tags a damaged snapshot (or lifts the tag from a healed one), in the catalog and store.
fn mark(state: &State, mut rec: SnapshotRecord, r: &VerifyResult) -> Result<(), String> {
    let damaged = !r.damaged.is_empty() || !r.missing.is_empty();
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
    } else {
        info!(snapshot = %rec.id, "snapshot verifies again");
    }
    state.store.write_record(&rec).map_err(|e| e.to_string())?;
    state.catalog.update(&rec).map_err(|e| e.to_string())
}
