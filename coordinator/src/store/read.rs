//! The store's read path for small streams: a snapshot's manifest and a bundle's index, every
//! chunk verified and the whole stream checked against its length and checksum. Used by the
//! sessions (restore, replica commits), gc, verify, replication, bundles and reconciliation.

use fleetvault_common::chunk;
use fleetvault_common::{Manifest, SnapshotId, StreamManifest};

use super::{ChunkStore, StoreError};

/// Largest encoded manifest or bundle index a commit may reference. The coordinator reads it
/// whole at the commit and again at every garbage collection, verification and restore, and
/// decoding it takes a few times its size; 512 MiB encodes a tree of several million files.
pub(crate) const MAX_MANIFEST_LEN: u64 = 512 << 20;

/// Reads a stream from the store and verifies every chunk and the whole stream's length and
/// checksum; returns the bytes and the chunks' envelopes. Only for small streams (manifests,
/// bundle indexes): the whole stream is held in memory.
pub(crate) fn read_stream(
    store: &ChunkStore,
    snapshot: SnapshotId,
    stream: &StreamManifest,
    what: &'static str,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), StoreError> {
    if stream.len > MAX_MANIFEST_LEN {
        return Err(StoreError::StreamTooLarge {
            snapshot,
            what,
            len: stream.len,
        });
    }
    let mut bytes = Vec::with_capacity(stream.len as usize);
    let mut envelopes = Vec::with_capacity(stream.chunks.len());
    for c in &stream.chunks {
        let env = store
            .get(&c.id)
            .map_err(|e| StoreError::Read {
                snapshot,
                source: Box::new(e),
            })?
            .ok_or(StoreError::StreamChunkMissing {
                snapshot,
                what,
                id: c.id,
            })?;
        let plain =
            chunk::open_verified(&env, &c.id).map_err(|source| StoreError::StreamChunkDamaged {
                snapshot,
                what,
                id: c.id,
                source: Box::new(source),
            })?;
        bytes.extend_from_slice(&plain);
        envelopes.push(env);
    }
    if bytes.len() as u64 != stream.len || *blake3::hash(&bytes).as_bytes() != stream.checksum {
        return Err(StoreError::StreamChecksum { snapshot, what });
    }
    Ok((bytes, envelopes))
}

/// Reads and verifies the encoded manifest that `root` describes.
pub(crate) fn load_manifest(
    store: &ChunkStore,
    snapshot: SnapshotId,
    root: &StreamManifest,
) -> Result<(Manifest, Vec<Vec<u8>>), StoreError> {
    let (bytes, envelopes) = read_stream(store, snapshot, root, "manifest")?;
    let manifest =
        Manifest::decode(&bytes).map_err(|source| StoreError::BadManifest { snapshot, source })?;
    Ok((manifest, envelopes))
}
