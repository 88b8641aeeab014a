//! One sync to one replica over mutual-TLS QUIC, as a peer:
//!
//! 1. `ReplicaHave` in batches: which of the selected snapshots the replica already holds
//!    (or its own retention removed).
//! 2. Per lacking snapshot, oldest first: `ReplicaBegin`; `Missing` in batches for the
//!    manifest's and the data's distinct chunks; the missing ones in `PutChunks` groups over
//!    several streams at once; then `ReplicaCommit` with the immutable record, last
//!    (docs/architecture.md rule 8).
//!
//! The replica verifies and stores each group before acknowledging it and remembers what this
//! peer uploaded, so a sync cut off anywhere resumes without resending acknowledged chunks,
//! and a snapshot appears on the replica only with its commit.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use fleetvault_common::protocol::{MAX_MISSING_BATCH, MAX_PUT_BATCH};
use fleetvault_common::{ChunkId, Client, Credentials, SnapshotId, SnapshotRecord};
use tracing::{debug, info};

use super::ReplicaConfig;
use crate::error::OpError;
use crate::State;

/// Chunk streams in flight at once.
const STREAMS: usize = 4;
/// Plaintext bytes per `PutChunks` group (sealed chunks are at most this plus framing).
const GROUP_BYTES: u64 = 8 << 20;

/// Test-only fault switches (debug builds only, `crate::fault`), read once per sync.
struct Faults {
    /// `FLEETVAULT_FAULT_SYNC_ABORT_AFTER=N`: die (as a crash would) once N chunks are acked.
    abort_after: Option<crate::fault::Switch>,
    /// `FLEETVAULT_FAULT_SYNC_CORRUPT=1`: flip a byte of the first chunk sent.
    corrupt: std::sync::atomic::AtomicBool,
}

impl Faults {
    fn from_env() -> Self {
        Self {
            abort_after: crate::fault::switch!("FLEETVAULT_FAULT_SYNC_ABORT_AFTER"),
            corrupt: crate::fault::switch!("FLEETVAULT_FAULT_SYNC_CORRUPT")
                .is_some()
                .into(),
        }
    }
}

/// Counters shared by the chunk streams of one sync.
struct Sent {
    chunks: AtomicU64,
    bytes: AtomicU64,
    /// The caller's running total of bytes sent (for progress frames).
    progress: Arc<AtomicU64>,
}

pub(super) async fn sync(
    state: &Arc<State>,
    cfg: &ReplicaConfig,
    report: &mut fleetvault_common::protocol::ReplicaReport,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let root = &state.root;
    let creds = Credentials::load(
        &root.join(&cfg.ca),
        &root.join(&cfg.cert),
        &root.join(&cfg.key),
    )
    .with_context(|| format!("loading the peer credentials of replica {}", cfg.name))?;
    let client = Client::dial(&creds, &cfg.address, &cfg.server_name, crate::SOFTWARE)
        .await
        .with_context(|| format!("replica {}", cfg.name))?;
    let client = Arc::new(client);
    let result = send_all(state, cfg, &client, report, progress).await;
    client.shutdown().await;
    result
}

async fn send_all(
    state: &Arc<State>,
    cfg: &ReplicaConfig,
    client: &Arc<Client>,
    report: &mut fleetvault_common::protocol::ReplicaReport,
    progress: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let st = state.clone();
    let c = cfg.clone();
    let wanted = tokio::task::spawn_blocking(move || super::wanted(&st, &c))
        .await?
        .map_err(anyhow::Error::msg)?;
    let mut have: HashSet<SnapshotId> = HashSet::new();
    for batch in wanted.chunks(MAX_MISSING_BATCH) {
        let ids = batch.iter().map(|r| r.id).collect();
        have.extend(client.replica_have(ids).await?);
    }
    let faults = Arc::new(Faults::from_env());
    let sent = Arc::new(Sent {
        chunks: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        progress,
    });
    let todo = wanted.iter().filter(|r| !have.contains(&r.id)).count();
    info!(replica = %cfg.name, snapshots = todo, already_present = wanted.len() - todo, "replica sync started");
    for rec in wanted {
        if have.contains(&rec.id) {
            report.already_present += 1;
            state.catalog.mark_replicated(&cfg.name, rec.id)?;
            continue;
        }
        let id = rec.id;
        match send_snapshot(state, client, rec, &faults, &sent).await {
            Ok(()) => {}
            // Deleted here while the sync ran: nothing to send any more.
            Err(_) if state.catalog.get(id).is_err() => {
                debug!(snapshot = %id, "deleted during the sync; skipped");
                continue;
            }
            Err(e) => {
                report.chunks = sent.chunks.load(Ordering::Relaxed);
                report.bytes = sent.bytes.load(Ordering::Relaxed);
                return Err(e.context(format!("sending snapshot {id}")));
            }
        }
        state.catalog.mark_replicated(&cfg.name, id)?;
        report.snapshots += 1;
        report.chunks = sent.chunks.load(Ordering::Relaxed);
        report.bytes = sent.bytes.load(Ordering::Relaxed);
    }
    Ok(())
}

/// The distinct chunks of a snapshot, manifest first, each with its plaintext length.
fn chunks_of(state: &State, rec: &SnapshotRecord) -> Result<Vec<(ChunkId, u32)>, OpError> {
    let root = rec
        .root
        .as_ref()
        .ok_or_else(|| OpError::Refused(format!("snapshot {} has no manifest", rec.id)))?;
    let (manifest, _) = crate::store::load_manifest(&state.store, rec.id, root)?;
    let mut seen = HashSet::new();
    Ok(root
        .chunks
        .iter()
        .chain(manifest.data_chunks())
        .filter(|c| seen.insert(c.id))
        .map(|c| (c.id, c.len))
        .collect())
}

async fn send_snapshot(
    state: &Arc<State>,
    client: &Arc<Client>,
    rec: SnapshotRecord,
    faults: &Arc<Faults>,
    sent: &Arc<Sent>,
) -> anyhow::Result<()> {
    let id = rec.id;
    client.replica_begin(id).await?;
    let st = state.clone();
    let r = rec.clone();
    let chunks = tokio::task::spawn_blocking(move || chunks_of(&st, &r))
        .await?
        .map_err(|e| anyhow::Error::msg(e.to_string()))?;
    let mut missing: HashSet<ChunkId> = HashSet::new();
    for batch in chunks.chunks(MAX_MISSING_BATCH) {
        let ids = batch.iter().map(|(id, _)| *id).collect();
        missing.extend(client.missing(ids).await?);
    }
    let mut groups: VecDeque<Vec<ChunkId>> = VecDeque::new();
    let (mut group, mut group_bytes) = (Vec::new(), 0u64);
    for (cid, len) in chunks.iter().filter(|(c, _)| missing.contains(c)) {
        group.push(*cid);
        group_bytes += u64::from(*len);
        if group_bytes >= GROUP_BYTES || group.len() as u32 >= MAX_PUT_BATCH {
            groups.push_back(std::mem::take(&mut group));
            group_bytes = 0;
        }
    }
    if !group.is_empty() {
        groups.push_back(group);
    }
    debug!(snapshot = %id, chunks = chunks.len(), missing = missing.len(), groups = groups.len(), "sending chunks");
    let queue = Arc::new(Mutex::new(groups));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let (st, cl, q, f, s) = (
            state.clone(),
            client.clone(),
            queue.clone(),
            faults.clone(),
            sent.clone(),
        );
        workers.spawn(async move {
            loop {
                let Some(group) = q.lock().expect("queue lock").pop_front() else {
                    return Ok(());
                };
                put_group(&st, &cl, id, group, &f, &s).await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        if let Err(e) = done? {
            workers.abort_all();
            return Err(e);
        }
    }
    client.replica_commit(rec).await?;
    Ok(())
}

/// Sends one group of chunks on its own stream and waits for the replica's acknowledgement.
async fn put_group(
    state: &Arc<State>,
    client: &Client,
    snapshot: SnapshotId,
    group: Vec<ChunkId>,
    faults: &Faults,
    sent: &Sent,
) -> anyhow::Result<()> {
    let st = state.clone();
    let ids = group.clone();
    let mut envelopes = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|cid| match st.store.get(cid) {
                Ok(Some(env)) => Ok(env),
                Ok(None) => Err(anyhow::anyhow!("chunk {cid} is missing from the store")),
                Err(e) => Err(anyhow::Error::msg(e.to_string())),
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    if faults.corrupt.swap(false, Ordering::Relaxed) {
        if let Some(last) = envelopes.first_mut().and_then(|e| e.last_mut()) {
            *last ^= 0x55;
        }
    }
    let count = group.len() as u32;
    let bytes: u64 = envelopes.iter().map(|e| e.len() as u64).sum();
    // A replica that refuses a chunk answers and stops reading: its answer says why.
    client
        .put_chunks(snapshot, group.into_iter().zip(envelopes).collect())
        .await?;
    let acked = sent.chunks.fetch_add(u64::from(count), Ordering::Relaxed) + u64::from(count);
    sent.bytes.fetch_add(bytes, Ordering::Relaxed);
    sent.progress.fetch_add(bytes, Ordering::Relaxed);
    if let Some(fault) = &faults.abort_after {
        if fault.number().is_some_and(|n| acked >= n) {
            fault.crash(&format!("aborting after {acked} chunks"));
        }
    }
    Ok(())
}
