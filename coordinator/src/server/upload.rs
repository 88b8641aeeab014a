//! The backup side of a session: which chunks are missing, chunk uploads, begin, commit,
//! abort.
//!
//! Ordering (docs/architecture.md rule 8): chunks are durable before `Stored` is sent; a commit checks
//! that every chunk the manifest references is in the store and was proven by this agent
//! (uploaded now, or referenced by one of its earlier snapshots), writes the immutable record
//! to the store, and only then flips the catalog record to `completed`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use fleetvault_certs::Role;
use fleetvault_common::chunk;
use fleetvault_common::protocol::frame::{read_frame_body, read_len, write_frame, Incoming};
use fleetvault_common::protocol::{
    Begin, Commit, ErrorCode, Request, Response, MAX_FRAME_LEN, MAX_MISSING_BATCH, MAX_PUT_BATCH,
};
use fleetvault_common::{ChunkId, ChunkRef, SnapshotId, SnapshotRecord, SnapshotStatus};
use tracing::{info, warn};

use super::session::{Backup, Session};
use crate::catalog::CatalogError;
use crate::clock;
use crate::error::Failure;
use crate::error::OpError;
use crate::limits::LimitError;
use crate::store::{load_manifest, PutOutcome, StoreError};

/// Bytes of sealed chunks collected before they are written as one durable batch.
const WRITE_BATCH_BYTES: usize = 8 << 20;

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure::Reply(ErrorCode::Internal, e.to_string())
}

impl Session {
    /// Drops this connection's pins once it has no backup running: what it committed is now
    /// referenced by completed snapshots, what it aborted may go.
    pub(super) fn release_pins(&self) {
        if self.running.lock().expect("running lock").is_empty() {
            self.state.pins.release(self.conn.stable_id());
        }
    }

    /// The newest completed snapshot of `source`, the parent a backup starting now reuses
    /// unchanged files' chunk lists from without asking `Missing`. Its manifest root is kept
    /// live for garbage collection while this connection has a backup running
    /// (`Pins::parents`), also if the parent is deleted meanwhile. Read and registered under
    /// the pins lock: a collection that reads the registered parents after this either listed
    /// the parent as completed or runs while it was committed (its pins still held).
    fn parent_for(&self, source: &str) -> Result<Option<SnapshotRecord>, Failure> {
        let mut pins = self.state.pins.lock();
        let parent = self.state.catalog.last_completed(self.name(), source)?;
        if let Some((id, root)) = parent.as_ref().and_then(|p| Some((p.id, p.root.clone()?))) {
            pins.pin_parent(self.conn.stable_id(), id, root);
        }
        Ok(parent)
    }

    pub(super) fn owns(&self, id: &ChunkId) -> Result<bool, CatalogError> {
        if self.uploaded.lock().expect("uploaded lock").contains(id) {
            return Ok(true);
        }
        self.state.catalog.has_ref(&self.owner(), id)
    }

    pub(super) async fn missing(
        self: &Arc<Self>,
        ids: Vec<ChunkId>,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require_any(&[Role::Agent, Role::Peer])?;
        if ids.len() > MAX_MISSING_BATCH {
            return Err(Failure::Protocol(format!(
                "{} ids in one Missing request, over the limit",
                ids.len()
            )));
        }
        let this = self.clone();
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<ChunkId>, Failure> {
            let mut out = Vec::new();
            // Under the pins lock: a chunk answered "present" is pinned before a garbage
            // collection can look at it, and one being deleted is not answered "present".
            let mut pins = this.state.pins.lock();
            for id in ids {
                // A chunk counts as present only if this agent has proven it holds it: the
                // answer is not an oracle for what other hosts store.
                if this.state.store.contains(&id) && this.owns(&id)? {
                    pins.pin(this.conn.stable_id(), id);
                } else {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
        .map_err(internal)??;
        Ok(write_frame(send, &Response::Missing { ids: missing }).await?)
    }

    pub(super) async fn put_chunks(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        count: u32,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Failure> {
        self.require_any(&[Role::Agent, Role::Peer])?;
        if count > MAX_PUT_BATCH {
            return Err(Failure::Protocol(format!(
                "{count} chunks in one PutChunks, over the limit"
            )));
        }
        self.require_running(snapshot)?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut new = 0;
        // This identity's buffer budget for the frames in `batch` (see `crate::limits`).
        let mut held = Vec::new();
        for i in 0..count {
            let Some(len) = read_len(recv, MAX_FRAME_LEN).await? else {
                return Err(Failure::Protocol(format!(
                    "stream ended after {i} of {count} chunks"
                )));
            };
            let who = self.identity.to_string();
            let budget = match self.state.limits.try_buffer(&who, len) {
                Some(b) => b,
                None => {
                    // Over budget: write what this stream holds before waiting, so a stream
                    // never waits while it holds bytes others wait for.
                    if !batch.is_empty() {
                        new += self
                            .write_batch(snapshot, std::mem::take(&mut batch))
                            .await?;
                        batch_bytes = 0;
                        held.clear();
                    }
                    self.state.limits.buffer(&who, len).await
                }
            };
            held.push(budget);
            match read_frame_body::<Request, _>(recv, len).await? {
                Incoming::Chunk { id, envelope } => {
                    batch_bytes += envelope.len();
                    batch.push((id, envelope));
                }
                Incoming::Message(_) => {
                    return Err(Failure::Protocol("expected a chunk frame".into()))
                }
            }
            if batch_bytes >= WRITE_BATCH_BYTES || i + 1 == count {
                new += self
                    .write_batch(snapshot, std::mem::take(&mut batch))
                    .await?;
                batch_bytes = 0;
                held.clear();
            }
        }
        Ok(write_frame(send, &Response::Stored { new }).await?)
    }

    async fn write_batch(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        batch: Vec<(ChunkId, Bytes)>,
    ) -> Result<u32, Failure> {
        let this = self.clone();
        let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
        // Pinned before the store looks at them: a collection running now must neither delete
        // a file this batch is about to skip as "already there", nor one it has just written
        // (its mtime may predate the collection's reference time).
        self.state
            .pins
            .pin_all(self.conn.stable_id(), ids.iter().copied());
        let (fresh, outcome) = tokio::task::spawn_blocking(move || {
            let fresh = this.fresh(&batch)?;
            Ok::<_, Failure>((fresh, this.state.store.put_batch(&batch)))
        })
        .await
        .map_err(internal)??;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                if matches!(e, StoreError::BadChunk { .. }) {
                    warn!(snapshot = %snapshot, error = %e, "refused a chunk");
                } else {
                    warn!(snapshot = %snapshot, error = %e, "cannot store chunks");
                }
                return Err(OpError::from(e).into());
            }
        };
        if self.identity.role == Role::Peer {
            // Remembered at once, not at commit: a sync cut off here resumes without sending
            // these again.
            let st = self.state.clone();
            let owner = self.owner().into_owned();
            tokio::task::spawn_blocking(move || {
                st.catalog.add_refs(&owner, ids.iter())?;
                st.catalog.flush()
            })
            .await
            .map_err(internal)??;
        } else {
            // Peers' uploads are remembered in the catalog instead: a seed sync of a whole
            // store must not grow this set.
            self.uploaded.lock().expect("uploaded lock").extend(ids);
        }
        if let Some(b) = self
            .running
            .lock()
            .expect("running lock")
            .get_mut(&snapshot)
        {
            b.new_chunks += u64::from(fresh.new);
            b.new_bytes += fresh.new_plain;
            b.stored_bytes += fresh.new_stored;
            b.store_new_chunks += u64::from(outcome.new);
            b.store_new_bytes += outcome.new_stored;
        }
        Ok(fresh.new)
    }

    /// What of `batch` is new for this connection's owner: the chunks a `Missing` would have
    /// answered missing (not proven by it, or not in the store), each once. Only this is told
    /// back (`Stored`, the record's counts): whether another host stored a chunk stays hidden.
    fn fresh(&self, batch: &[(ChunkId, Bytes)]) -> Result<PutOutcome, Failure> {
        let mut seen = HashSet::new();
        let mut out = PutOutcome::default();
        for (id, envelope) in batch {
            if !seen.insert(*id) || (self.owns(id)? && self.state.store.contains(id)) {
                continue;
            }
            out.new += 1;
            out.new_plain += chunk::plaintext_len(envelope).map_or(0, u64::from);
            out.new_stored += envelope.len() as u64;
        }
        Ok(out)
    }

    pub(super) async fn begin(
        self: &Arc<Self>,
        b: Begin,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Agent)?;
        if b.source.is_empty() || b.source.len() > 128 || b.source.contains(['/', '\0']) {
            return Err(Failure::Reply(
                ErrorCode::BadRequest,
                format!("invalid source name {:?}", b.source),
            ));
        }
        b.chunker
            .validate()
            .map_err(|e| Failure::Reply(ErrorCode::BadRequest, e))?;
        self.check_begin(&b).map_err(|e| self.over_limit(e))?;
        let catalog = &self.state.catalog;
        let parent = self.parent_for(&b.source)?;
        let id = catalog.next_id();
        let mut rec = SnapshotRecord::new(
            id,
            self.name(),
            &b.source,
            b.kind.as_str(),
            b.chunker,
            clock::now_ms(),
            SnapshotStatus::Running,
        );
        rec.parent = parent.as_ref().map(|p| p.id);
        rec.job = b.job;
        rec.tags = b.tags;
        catalog.begin(&rec)?;
        self.running
            .lock()
            .expect("running lock")
            .insert(id, Backup::default());
        info!(snapshot = %id, source = %rec.source, "backup started");
        Ok(write_frame(
            send,
            &Response::Begun {
                snapshot: id,
                parent,
            },
        )
        .await?)
    }

    /// The limits a `Begin` must respect: kind, job and tags bounded, and a bounded number
    /// of backups in progress on this connection.
    fn check_begin(&self, b: &Begin) -> Result<(), LimitError> {
        use crate::limits;
        limits::check_name("snapshot kind", &b.kind, true)?;
        limits::check_name("job name", b.job.as_deref().unwrap_or_default(), false)?;
        limits::check_tags(&b.tags)?;
        let running = self.running.lock().expect("running lock").len();
        if running >= limits::MAX_RUNNING_PER_CONNECTION {
            return Err(LimitError::Running(running));
        }
        Ok(())
    }

    pub(super) async fn commit(
        self: &Arc<Self>,
        mut c: Commit,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Agent)?;
        c.warnings = crate::limits::clip_warnings(std::mem::take(&mut c.warnings));
        let snapshot = c.snapshot;
        self.require_running(snapshot)?;
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.commit_blocking(c))
            .await
            .map_err(internal)?;
        let backup = self.running.lock().expect("running lock").remove(&snapshot);
        self.release_pins();
        match result {
            Ok(rec) => {
                // The store's own growth is the operator's to know, not the agent's.
                let (store_new_chunks, store_new_bytes) = backup
                    .as_ref()
                    .map(|b| (b.store_new_chunks, b.store_new_bytes))
                    .unwrap_or_default();
                info!(snapshot = %snapshot, chunks = rec.chunks, new_chunks = rec.new_chunks, store_new_chunks, store_new_bytes, "backup completed");
                Ok(write_frame(send, &Response::Committed(rec)).await?)
            }
            Err(reason) => {
                warn!(snapshot = %snapshot, %reason, "commit refused");
                if backup.is_some() {
                    self.state.catalog.fail(snapshot, &reason.to_string())?;
                }
                Err(reason.into())
            }
        }
    }

    /// Checks chunk references of a snapshot being committed, adding each distinct chunk to
    /// `seen` with its plaintext length: every chunk must have been proven by this
    /// connection's owner (uploaded now, or referenced by one of its earlier snapshots: rule 9,
    /// re-checked at commit, and no reading other hosts' data by id) and be in the store, and
    /// every reference's length must be what the store holds. Ownership is checked before
    /// the store is asked anything, and a chunk not proven gets the same refusal whether or
    /// not the store has it: the reply is no oracle for what other hosts store.
    pub(super) fn check_chunks<'a>(
        &self,
        snapshot: SnapshotId,
        refs: impl Iterator<Item = &'a ChunkRef>,
        seen: &mut HashMap<ChunkId, u32>,
    ) -> Result<(), OpError> {
        for r in refs {
            let len = match seen.get(&r.id) {
                Some(len) => *len,
                None => {
                    // Checked and pinned under the pins lock, which a collection's deletion of
                    // the same chunk also holds: a chunk found here stays until this
                    // connection's pins are released, after the catalog says `completed`.
                    // Chunks reused from a parent without a `Missing` are otherwise unpinned
                    // (rule 9).
                    let mut pins = self.state.pins.lock();
                    let not_uploaded = || {
                        OpError::Refused(format!(
                            "snapshot {snapshot} refers to chunk {} that was not uploaded",
                            r.id
                        ))
                    };
                    if !self.owns(&r.id)? {
                        return Err(not_uploaded());
                    }
                    let len = self
                        .state
                        .store
                        .plaintext_len(&r.id)
                        .map_err(|e| StoreError::Read {
                            snapshot,
                            source: Box::new(e),
                        })?
                        .ok_or_else(not_uploaded)?;
                    pins.pin(self.conn.stable_id(), r.id);
                    seen.insert(r.id, len);
                    len
                }
            };
            if r.len != len {
                return Err(OpError::Refused(format!(
                    "snapshot {snapshot}: the manifest says chunk {} holds {} bytes; it holds {len}",
                    r.id, r.len
                )));
            }
        }
        Ok(())
    }

    /// Checks and records a commit; returns the completed record or why it was refused.
    fn commit_blocking(&self, c: Commit) -> Result<SnapshotRecord, OpError> {
        let store = &self.state.store;
        // The manifest's own chunks are proven before anything of them is read.
        let mut seen = HashMap::new();
        self.check_chunks(c.snapshot, c.root.chunks.iter(), &mut seen)?;
        let (manifest, _) =
            load_manifest(store, c.snapshot, &c.root).map_err(OpError::BadUpload)?;
        self.check_chunks(c.snapshot, manifest.data_chunks(), &mut seen)?;
        crate::jobs::verify::check_fields(c.snapshot, &manifest, c.checksum)?;
        let chunks = manifest.data_chunks().count() as u64;
        let catalog = &self.state.catalog;
        let mut rec = catalog.get(c.snapshot)?;
        crate::bundle::check_commit(&self.state, &rec, &manifest, false)?;
        {
            let running = self.running.lock().expect("running lock");
            if let Some(b) = running.get(&c.snapshot) {
                rec.new_chunks = b.new_chunks;
                rec.new_bytes = b.new_bytes;
                rec.stored_bytes = b.stored_bytes;
            }
        }
        rec.logical_bytes = manifest.logical_len();
        rec.chunks = chunks;
        rec.root = Some(c.root);
        rec.checksum = c.checksum;
        rec.warnings = c.warnings;
        rec.ended_ms = Some(clock::now_ms());
        rec.status = SnapshotStatus::Completed;
        catalog.add_refs(self.name(), seen.keys())?;
        store.write_record(&rec)?;
        if let Some(fault) = crate::fault::switch!("FLEETVAULT_FAULT_COMMIT_CRASH") {
            fault.crash("dying between the store record and the catalog");
        }
        if let Err(e) = catalog.finish(&rec) {
            // The commit is refused, so its record goes too: a record left behind would make
            // start-up reconciliation complete a snapshot whose chunks may be collected first.
            let _ = store.remove_record(rec.id);
            return Err(e.into());
        }
        Ok(rec)
    }

    pub(super) async fn abort(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        reason: &str,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Agent)?;
        if self
            .running
            .lock()
            .expect("running lock")
            .remove(&snapshot)
            .is_none()
        {
            return Err(Failure::Reply(
                ErrorCode::BadRequest,
                format!("snapshot {snapshot} is not a backup in progress on this connection"),
            ));
        }
        self.release_pins();
        let reason: String = reason.chars().take(4000).collect();
        warn!(snapshot = %snapshot, %reason, "backup failed on the agent");
        self.state.catalog.fail(snapshot, &reason)?;
        Ok(write_frame(send, &Response::Ok).await?)
    }
}
