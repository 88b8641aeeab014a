//! Reading a snapshot back: its record and its manifest, verified by
//! [`Client::read_snapshot`] (every manifest chunk against its id, the whole against its
//! checksum), on a `Read` stream whose data chunks then follow for the [`super::Reassembler`].

use fleetvault_common::protocol::ReadPart;
use fleetvault_common::{Client, Manifest, SnapshotId, SnapshotRecord};

/// Reads a snapshot's record (and checks its manifest).
pub(crate) async fn read_record(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<SnapshotRecord> {
    Ok(client
        .read_snapshot(snapshot, ReadPart::Manifest)
        .await?
        .record)
}

/// Reads only a snapshot's manifest (for unchanged-file detection).
pub(crate) async fn read_manifest(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<Manifest> {
    Ok(client
        .read_snapshot(snapshot, ReadPart::Manifest)
        .await?
        .manifest)
}
