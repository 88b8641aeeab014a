//! Reading a snapshot back: its record and its manifest, verified (every manifest chunk
//! against its id, the whole against its checksum), on a `Read` stream whose data chunks then
//! follow for the [`super::Reassembler`].

use anyhow::{anyhow, bail, Context};
use fleetvault_common::chunk;
use fleetvault_common::protocol::{ReadPart, Request, Response};
use fleetvault_common::{Client, Manifest, SnapshotId, SnapshotRecord};

/// Opens a `Read` stream and returns the record and the verified, decoded manifest.
pub(crate) async fn open_read(
    client: &Client,
    snapshot: SnapshotId,
    part: ReadPart,
) -> anyhow::Result<(SnapshotRecord, Manifest, quinn::RecvStream)> {
    let (mut send, mut recv) = client.open(&Request::Read { snapshot, part }).await?;
    let _ = send.finish();
    let rec = match client.reply(&mut recv).await? {
        Response::Reading(rec) => rec,
        other => bail!("unexpected reply to Read: {other:?}"),
    };
    let root = rec
        .root
        .clone()
        .with_context(|| format!("snapshot {snapshot} has no manifest"))?;
    let mut bytes = Vec::with_capacity(root.len as usize);
    for c in &root.chunks {
        match client.reply(&mut recv).await? {
            Response::Chunk { id, envelope } if id == c.id => {
                let plain = chunk::open_verified(&envelope, &c.id).map_err(|e| {
                    anyhow!(
                        "snapshot {snapshot}: manifest chunk {} is damaged: {e}",
                        c.id
                    )
                })?;
                bytes.extend_from_slice(&plain);
            }
            Response::ChunkMissing { id } => {
                bail!("snapshot {snapshot}: manifest chunk {id} is missing on the coordinator")
            }
            other => bail!("snapshot {snapshot}: unexpected frame in the manifest: {other:?}"),
        }
    }
    if bytes.len() as u64 != root.len || *blake3::hash(&bytes).as_bytes() != root.checksum {
        bail!("snapshot {snapshot}: manifest checksum does not match");
    }
    let manifest =
        Manifest::decode(&bytes).with_context(|| format!("snapshot {snapshot}: bad manifest"))?;
    Ok((rec, manifest, recv))
}

/// Reads a snapshot's record (and checks its manifest).
pub(crate) async fn read_record(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<SnapshotRecord> {
    let (rec, _, _) = open_read(client, snapshot, ReadPart::Manifest).await?;
    Ok(rec)
}

/// Reads only a snapshot's manifest (for unchanged-file detection).
pub(crate) async fn read_manifest(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<Manifest> {
    let (_, manifest, _) = open_read(client, snapshot, ReadPart::Manifest).await?;
    Ok(manifest)
}
