//! Unit-test fixtures: a coordinator state in a temporary directory, and snapshots written
//! into it directly (as a commit would, or as a hostile or damaged record would look).

use fleetvault_common::{
    chunk, ChunkId, ChunkRef, ChunkerParams, Manifest, SnapshotId, SnapshotRecord, SnapshotStatus,
    StreamManifest,
};

use crate::catalog::Catalog;
use crate::store::ChunkStore;
use crate::State;

/// A state with an empty store and catalog under `dir`.
pub(crate) fn state(dir: &std::path::Path) -> State {
    let store = ChunkStore::open(&dir.join("store")).expect("store opens");
    let catalog = Catalog::open(&dir.join("catalog"), Vec::new).expect("catalog opens");
    let cfg: crate::config::CoordinatorConfig =
        toml::from_str("listen = \"127.0.0.1:0\"\nserver_name = \"localhost\"\n")
            .expect("config parses");
    State::new(dir, store, catalog, &cfg)
}

/// Stores `data` as one chunk; returns its reference.
pub(crate) fn put(state: &State, data: &[u8]) -> ChunkRef {
    let id = ChunkId::of(data);
    state
        .store
        .put_batch(&[(id, chunk::seal(data, 1))])
        .expect("chunk stored");
    ChunkRef {
        id,
        len: data.len() as u32,
    }
}

/// A one-chunk stream of `data`, stored.
pub(crate) fn stream(state: &State, data: &[u8]) -> StreamManifest {
    StreamManifest {
        chunks: vec![put(state, data)],
        len: data.len() as u64,
        checksum: *blake3::hash(data).as_bytes(),
    }
}

/// A completed snapshot of `agent` with `manifest` (stored as one chunk), recorded in the
/// store and the catalog with its chunks as the agent's references.
pub(crate) fn snapshot(
    state: &State,
    agent: &str,
    kind: &str,
    manifest: &Manifest,
    checksum: Option<[u8; 32]>,
) -> SnapshotRecord {
    let id: SnapshotId = state.catalog.next_id();
    let mut rec = SnapshotRecord::new(
        id,
        agent,
        kind,
        kind,
        ChunkerParams::default(),
        crate::clock::now_ms(),
        SnapshotStatus::Completed,
    );
    let root = stream(state, &manifest.encode());
    let refs: Vec<ChunkId> = root
        .chunks
        .iter()
        .chain(manifest.data_chunks())
        .map(|c| c.id)
        .collect();
    rec.root = Some(root);
    rec.checksum = checksum;
    rec.chunks = manifest.data_chunks().count() as u64;
    rec.logical_bytes = manifest.logical_len();
    state.catalog.add_refs(agent, refs.iter()).expect("refs");
    state.store.write_record(&rec).expect("record written");
    state.catalog.finish(&rec).expect("catalog entry");
    rec
}

/// A completed stream snapshot of `data`, honest.
pub(crate) fn stream_snapshot(state: &State, agent: &str, data: &[u8]) -> SnapshotRecord {
    let s = stream(state, data);
    let sum = s.checksum;
    snapshot(state, agent, "command", &Manifest::Stream(s), Some(sum))
}
