//! Bundle snapshots (made by agents, see the agent's `bundle/`): a snapshot of kind `bundle`
//! whose content is a JSON index naming one snapshot per part. The coordinator reads the
//! index where the bundle is handled as a unit: a pushed restore grants the target agent its
//! parts too; deleting, forgetting, protecting and verifying a bundle covers its parts, and
//! retention never forgets a part on its own.
//!
//! The index is the agent's word, so it is trusted for nothing beyond that agent's own
//! snapshots: a commit is refused unless every part it names is a completed snapshot of the
//! same agent ([`check_commit`]), and every cascade goes through [`parts`], which drops
//! (and logs) any id that is not, so a record that slipped in otherwise (an older
//! coordinator, a peer) still cannot reach another host's snapshots.

use fleetvault_common::{Manifest, SnapshotId, SnapshotKind, SnapshotRecord, SnapshotStatus};
use tracing::warn;

use crate::catalog::CatalogError;
use crate::error::OpError;
use crate::State;

/// The snapshot kind of a bundle.
pub(crate) const KIND: SnapshotKind = SnapshotKind::Bundle;

/// The largest bundle index read: an agent's index is a few KiB of JSON.
const MAX_INDEX_LEN: u64 = 4 << 20;

/// Whether `rec` is a part of a bundle (its agent tags it `bundle:NAME`).
pub(crate) fn is_part(rec: &SnapshotRecord) -> bool {
    rec.kind != KIND && rec.tags.iter().any(|t| t.starts_with("bundle:"))
}

/// Whether `part` may be a part of a bundle of `agent`: its own completed snapshot, not
/// itself a bundle.
fn owned_part(part: &SnapshotRecord, agent: &str) -> bool {
    part.agent == agent && part.status == SnapshotStatus::Completed && part.kind != KIND
}

/// The snapshot ids the index in `manifest` (a bundle's content) lists, as its agent wrote
/// them: not yet checked against anything.
fn listed(state: &State, id: SnapshotId, manifest: &Manifest) -> Result<Vec<SnapshotId>, OpError> {
    let Manifest::Stream(stream) = manifest else {
        return Err(OpError::Refused(format!("bundle {id} is not a stream")));
    };
    if stream.len > MAX_INDEX_LEN {
        return Err(OpError::Refused(format!(
            "bundle {id}: an index of {} bytes is over the limit of {MAX_INDEX_LEN}",
            stream.len
        )));
    }
    let (bytes, _) = crate::store::read_stream(&state.store, id, stream, "bundle index")?;
    let index: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| OpError::Refused(format!("bundle {id}: bad index: {e}")))?;
    index["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["snapshot_id"].as_str())
        .map(|s| {
            s.parse()
                .map_err(|e| OpError::Refused(format!("bundle {id}: part id {s:?}: {e}")))
        })
        .collect()
}

/// Checks a bundle being committed (`rec`, with its decoded content `manifest`): every part
/// its index names must be a completed snapshot of the bundle's own agent and not a bundle.
/// The refusal is the same whether such an id does not exist or belongs to another agent.
///
/// `absent_ok`: a replica accepts parts it does not hold (its primary may not send every
/// source); the parts it does hold must pass.
pub(crate) fn check_commit(
    state: &State,
    rec: &SnapshotRecord,
    manifest: &Manifest,
    absent_ok: bool,
) -> Result<(), OpError> {
    if rec.kind != KIND {
        return Ok(());
    }
    for part in listed(state, rec.id, manifest).map_err(OpError::in_upload)? {
        let ok = match state.catalog.get(part) {
            Ok(p) => owned_part(&p, &rec.agent),
            Err(CatalogError::NotFound(_)) => absent_ok,
            Err(e) => return Err(e.into()),
        };
        if !ok {
            return Err(OpError::Refused(format!(
                "bundle {} lists snapshot {part}, which is not a completed snapshot of agent {}",
                rec.id, rec.agent
            )));
        }
    }
    Ok(())
}

/// The parts of a bundle that a cascade (delete, protect, verify, restore grants) acts on:
/// the ids its index names that are completed snapshots of the bundle's own agent. Anything
/// else it names is logged and ignored; parts already deleted are skipped. None for another
/// kind of snapshot.
pub(crate) fn parts(state: &State, rec: &SnapshotRecord) -> Result<Vec<SnapshotId>, OpError> {
    if rec.kind != KIND {
        return Ok(Vec::new());
    }
    let root = rec
        .root
        .as_ref()
        .ok_or_else(|| OpError::Refused(format!("bundle {} has no manifest", rec.id)))?;
    let (manifest, _) = crate::store::load_manifest(&state.store, rec.id, root)?;
    let mut out = Vec::new();
    for part in listed(state, rec.id, &manifest)? {
        match state.catalog.get(part) {
            Ok(p) if owned_part(&p, &rec.agent) => out.push(part),
            Ok(p) => warn!(
                bundle = %rec.id,
                agent = %rec.agent,
                %part,
                part_agent = %p.agent,
                "bundle lists a snapshot that is not a completed part of its own agent; ignored"
            ),
            Err(CatalogError::NotFound(_)) => {}
            Err(e) => {
                return Err(OpError::Part {
                    bundle: rec.id,
                    part,
                    source: Box::new(e.into()),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{snapshot, stream, stream_snapshot};

    /// A bundle of `agent` whose index lists `ids`, recorded as if an older coordinator had
    /// let it in.
    fn bundle(state: &State, agent: &str, ids: &[SnapshotId]) -> SnapshotRecord {
        let parts: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({ "name": "p", "snapshot_id": id.to_string() }))
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({ "parts": parts })).unwrap();
        let s = stream(state, &index);
        let sum = s.checksum;
        snapshot(state, agent, KIND.as_str(), &Manifest::Stream(s), Some(sum))
    }

    #[test]
    fn cascades_never_reach_another_agents_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path());
        let victim = stream_snapshot(&state, "victim", b"the victim's database");
        let own = stream_snapshot(&state, "evil", b"evil's own part");
        let b = bundle(&state, "evil", &[victim.id, own.id]);
        let ghost = SnapshotId(victim.id.0 + 1000);

        // At commit: refused, the same way for another agent's snapshot and for none.
        let root = b.root.clone().unwrap();
        let (manifest, _) = crate::store::load_manifest(&state.store, b.id, &root).unwrap();
        let e = check_commit(&state, &b, &manifest, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&victim.id.to_string()), "{e}");
        let ghostly = bundle(&state, "evil", &[ghost, own.id]);
        let root = ghostly.root.clone().unwrap();
        let (m2, _) = crate::store::load_manifest(&state.store, ghostly.id, &root).unwrap();
        let e2 = check_commit(&state, &ghostly, &m2, false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e.replace(&b.id.to_string(), "B")
                .replace(&victim.id.to_string(), "P"),
            e2.replace(&ghostly.id.to_string(), "B")
                .replace(&ghost.to_string(), "P")
        );
        // A replica accepts a part it does not hold, never one of another agent.
        assert!(check_commit(&state, &ghostly, &m2, true).is_ok());
        assert!(check_commit(&state, &b, &manifest, true).is_err());

        // Every cascade: only the bundle agent's own parts.
        assert_eq!(parts(&state, &b).unwrap(), vec![own.id]);
        crate::jobs::snapshots::protect(&state, b.id, true).unwrap();
        assert!(!state.catalog.get(victim.id).unwrap().protected);
        assert!(state.catalog.get(own.id).unwrap().protected);
        crate::jobs::snapshots::protect(&state, b.id, false).unwrap();
        let verified = crate::jobs::verify::verify(&state, Some(b.id)).unwrap();
        assert!(verified.iter().all(|r| r.snapshot != victim.id));
        crate::jobs::snapshots::delete(&state, b.id).unwrap();
        assert!(state.catalog.get(own.id).is_err());
        assert_eq!(state.catalog.get(victim.id).unwrap(), victim);
    }
}
