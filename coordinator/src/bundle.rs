//! Bundle snapshots (made by agents, see the agent's `bundle/`): a snapshot of kind `bundle`
//! whose content is a JSON index naming one snapshot per part. The coordinator reads the
//! index where the bundle is handled as a unit: a pushed restore grants the target agent its
//! parts too; deleting, forgetting, protecting and verifying a bundle covers its parts, and
//! retention never forgets a part on its own.

use fleetvault_common::{Manifest, SnapshotId, SnapshotRecord};

use crate::State;

/// The snapshot kind of a bundle.
pub(crate) const KIND: &str = "bundle";

/// Whether `rec` is a part of a bundle (its agent tags it `bundle:NAME`).
pub(crate) fn is_part(rec: &SnapshotRecord) -> bool {
    rec.kind != KIND && rec.tags.iter().any(|t| t.starts_with("bundle:"))
}

/// The part snapshots a bundle's index names (none for another kind of snapshot).
pub(crate) fn parts(state: &State, rec: &SnapshotRecord) -> Result<Vec<SnapshotId>, String> {
    if rec.kind != KIND {
        return Ok(Vec::new());
    }
    let root = rec
        .root
        .as_ref()
        .ok_or_else(|| format!("bundle {} has no manifest", rec.id))?;
    let (manifest, _) = crate::server::load_manifest(&state.store, rec.id, root)?;
    let Manifest::Stream(stream) = manifest else {
        return Err(format!("bundle {} is not a stream", rec.id));
    };
    let (bytes, _) = crate::server::read_stream(&state.store, rec.id, &stream, "bundle index")?;
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("bundle {}: bad index: {e}", rec.id))?;
    index["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["snapshot_id"].as_str())
        .map(|s| {
            s.parse()
                .map_err(|e| format!("bundle {}: part id {s:?}: {e}", rec.id))
        })
        .collect()
}
