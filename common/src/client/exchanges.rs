//! One typed method per exchange of the protocol (see [`crate::protocol`]): each sends its
//! request and returns what the reply carries; a reply of another kind is
//! [`ClientError::Unexpected`], naming the request and the reply.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;

use super::{settle, Client, ClientError};
use crate::protocol::frame::{read_frame, read_frame_or_chunk, write_chunk_request, Incoming};
use crate::protocol::{
    AgentInfo, Begin, Commit, GcReport, JobReport, Progress, ReadPart, ReplicaReport,
    ReplicaStatus, Request, Response, RestoreOptions, RetentionDecision, SnapshotFilter,
    SourceInfo, VerifyResult,
};
use crate::{chunk, ChunkId, Manifest, SnapshotId, SnapshotRecord};

/// Picks the expected reply out of a [`Response`]; `None` for any other.
type Pick<T> = fn(Response) -> Option<T>;

impl Client {
    /// One request, one reply of the kind `pick` accepts.
    async fn ask<T>(&self, req: Request, pick: Pick<T>) -> Result<T, ClientError> {
        let reply = self.call(&req).await?;
        picked(&req, reply, pick)
    }

    /// A request answered `Ok`.
    async fn ask_ok(&self, req: Request) -> Result<(), ClientError> {
        self.ask(req, |r| match r {
            Response::Ok => Some(()),
            _ => None,
        })
        .await
    }

    /// A request whose final reply (picked by `pick`) may follow `Progress` frames, each
    /// given to `on_progress`.
    async fn follow<T>(
        &self,
        req: Request,
        mut on_progress: impl FnMut(Progress),
        pick: Pick<T>,
    ) -> Result<T, ClientError> {
        let (mut send, mut recv) = self.open(&req).await?;
        let _ = send.finish();
        loop {
            match self.reply(&mut recv).await? {
                Response::Progress(p) => on_progress(p),
                reply => return picked(&req, reply, pick),
            }
        }
    }

    /// Which of `ids` (at most [`crate::protocol::MAX_MISSING_BATCH`]) the coordinator wants
    /// uploaded.
    pub async fn missing(&self, ids: Vec<ChunkId>) -> Result<Vec<ChunkId>, ClientError> {
        self.ask(Request::Missing { ids }, |r| match r {
            Response::Missing { ids } => Some(ids),
            _ => None,
        })
        .await
    }

    /// Uploads sealed chunks of `snapshot` on one stream and waits until they are durable;
    /// returns how many were new. When the coordinator refuses a chunk it answers and stops
    /// reading: its answer (why) is returned rather than the broken write.
    pub async fn put_chunks(
        &self,
        snapshot: SnapshotId,
        chunks: Vec<(ChunkId, Vec<u8>)>,
    ) -> Result<u32, ClientError> {
        let req = Request::PutChunks {
            snapshot,
            count: chunks.len() as u32,
        };
        let (mut send, mut recv) = self.open(&req).await?;
        let mut written = Ok(());
        for (id, envelope) in chunks {
            if let Err(e) = write_chunk_request(&mut send, id, envelope).await {
                written = Err(self.lost(e));
                break;
            }
        }
        let _ = send.finish();
        let reply = self.reply(&mut recv).await;
        if let (Err(e), Err(ClientError::Lost(_))) = (written, &reply) {
            return Err(e);
        }
        match reply? {
            Response::Stored { new } => Ok(new),
            other => Err(ClientError::unexpected(&req, &other)),
        }
    }

    /// Starts a backup: its snapshot id and the last completed snapshot of the same source.
    pub async fn begin(
        &self,
        begin: Begin,
    ) -> Result<(SnapshotId, Option<SnapshotRecord>), ClientError> {
        self.ask(Request::Begin(begin), |r| match r {
            Response::Begun { snapshot, parent } => Some((snapshot, parent)),
            _ => None,
        })
        .await
    }

    /// Records what database a running backup is dumping.
    pub async fn describe(
        &self,
        snapshot: SnapshotId,
        db_type: String,
        db_version: Option<String>,
        database: String,
    ) -> Result<(), ClientError> {
        self.ask_ok(Request::Describe {
            snapshot,
            db_type,
            db_version,
            database,
        })
        .await
    }

    /// Completes a backup: the record as committed.
    pub async fn commit(&self, commit: Commit) -> Result<SnapshotRecord, ClientError> {
        self.ask(Request::Commit(commit), |r| match r {
            Response::Committed(rec) => Some(rec),
            _ => None,
        })
        .await
    }

    /// Gives up a backup, with the reason.
    pub async fn abort(&self, snapshot: SnapshotId, reason: String) -> Result<(), ClientError> {
        self.ask_ok(Request::Abort { snapshot, reason }).await
    }

    /// Starts reading `part` of a snapshot: its record, then its chunks from the stream.
    /// [`Client::read_snapshot`] also reads and verifies the manifest.
    pub async fn read(
        &self,
        snapshot: SnapshotId,
        part: ReadPart,
    ) -> Result<(SnapshotRecord, ReadStream), ClientError> {
        let req = Request::Read { snapshot, part };
        let (mut send, recv) = self.open(&req).await?;
        let _ = send.finish();
        let mut stream = ReadStream {
            conn: self.conn.clone(),
            recv,
        };
        match settle(&self.conn, read_frame(&mut stream.recv).await)? {
            Response::Reading(rec) => Ok((rec, stream)),
            other => Err(ClientError::unexpected(&req, &other)),
        }
    }

    /// Starts reading `part` of a snapshot and reads its manifest, each chunk verified
    /// against its id and the whole against the record's checksum; for [`ReadPart::All`] the
    /// data chunks follow on [`SnapshotRead::chunks`], in manifest order. Errors name the
    /// snapshot (and the chunk).
    pub async fn read_snapshot(
        &self,
        snapshot: SnapshotId,
        part: ReadPart,
    ) -> anyhow::Result<SnapshotRead> {
        let (record, mut chunks) = self.read(snapshot, part).await?;
        let root = record
            .root
            .clone()
            .with_context(|| format!("snapshot {snapshot} has no manifest"))?;
        let mut bytes = Vec::with_capacity(root.len as usize);
        for c in &root.chunks {
            match chunks.next().await? {
                ReadItem::Chunk { id, envelope } if id == c.id => {
                    let plain = chunk::open_verified(&envelope, &id).map_err(|e| {
                        anyhow!("snapshot {snapshot}: manifest chunk {id} is damaged: {e}")
                    })?;
                    bytes.extend_from_slice(&plain);
                }
                ReadItem::Chunk { id, .. } => bail!(
                    "snapshot {snapshot}: chunk {id} arrived where manifest chunk {} was expected",
                    c.id
                ),
                ReadItem::Missing(id) => {
                    bail!("snapshot {snapshot}: manifest chunk {id} is missing on the coordinator")
                }
                ReadItem::End => bail!("snapshot {snapshot}: the stream ended within the manifest"),
            }
        }
        if bytes.len() as u64 != root.len || *blake3::hash(&bytes).as_bytes() != root.checksum {
            bail!("snapshot {snapshot}: manifest checksum does not match");
        }
        let manifest = Manifest::decode(&bytes)
            .with_context(|| format!("snapshot {snapshot}: bad manifest"))?;
        Ok(SnapshotRead {
            record,
            manifest,
            chunks,
        })
    }

    /// Snapshots matching `filter` (an agent sees only its own).
    pub async fn list_snapshots(
        &self,
        filter: SnapshotFilter,
    ) -> Result<Vec<SnapshotRecord>, ClientError> {
        self.ask(Request::ListSnapshots(filter), |r| match r {
            Response::Snapshots(l) => Some(l),
            _ => None,
        })
        .await
    }

    /// Known agents (operators).
    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, ClientError> {
        self.ask(Request::ListAgents, |r| match r {
            Response::Agents(l) => Some(l),
            _ => None,
        })
        .await
    }

    /// Reports a live agent's sources.
    pub async fn register(&self, sources: Vec<SourceInfo>) -> Result<(), ClientError> {
        self.ask_ok(Request::Register { sources }).await
    }

    /// Has a live agent back up `source` now (operators); progress goes to `on_progress`.
    pub async fn push_backup(
        &self,
        agent: String,
        source: String,
        on_progress: impl FnMut(Progress),
    ) -> Result<JobReport, ClientError> {
        self.follow(Request::PushBackup { agent, source }, on_progress, job_done)
            .await
    }

    /// Has a live agent restore `snapshot` (operators); progress goes to `on_progress`.
    pub async fn push_restore(
        &self,
        snapshot: SnapshotId,
        agent: String,
        options: RestoreOptions,
        on_progress: impl FnMut(Progress),
    ) -> Result<JobReport, ClientError> {
        let req = Request::PushRestore {
            snapshot,
            agent,
            options,
        };
        self.follow(req, on_progress, job_done).await
    }

    /// Runs a configured job now (operators): one report per backup.
    pub async fn run_job(&self, job: String) -> Result<Vec<JobReport>, ClientError> {
        self.ask(Request::RunJob { job }, |r| match r {
            Response::Reports(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Protects a snapshot from retention, or lifts that (operators).
    pub async fn protect(&self, snapshot: SnapshotId, protected: bool) -> Result<(), ClientError> {
        self.ask_ok(Request::Protect {
            snapshot,
            protected,
        })
        .await
    }

    /// Deletes a snapshot record (operators).
    pub async fn delete(&self, snapshot: SnapshotId) -> Result<(), ClientError> {
        self.ask_ok(Request::Delete { snapshot }).await
    }

    /// Applies a job's retention, or says what it would do (operators).
    pub async fn forget(
        &self,
        job: String,
        dry_run: bool,
    ) -> Result<Vec<RetentionDecision>, ClientError> {
        self.ask(Request::Forget { job, dry_run }, |r| match r {
            Response::Retention(d) => Some(d),
            _ => None,
        })
        .await
    }

    /// Collects garbage now (operators).
    pub async fn gc(&self) -> Result<GcReport, ClientError> {
        self.ask(Request::Gc, |r| match r {
            Response::GcDone(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Verifies one snapshot or every completed one (operators); `on_progress` counts
    /// snapshots.
    pub async fn verify(
        &self,
        snapshot: Option<SnapshotId>,
        on_progress: impl FnMut(Progress),
    ) -> Result<Vec<VerifyResult>, ClientError> {
        self.follow(Request::Verify { snapshot }, on_progress, |r| match r {
            Response::Verified(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Which of `ids` a replica already holds (peers).
    pub async fn replica_have(&self, ids: Vec<SnapshotId>) -> Result<Vec<SnapshotId>, ClientError> {
        self.ask(Request::ReplicaHave { ids }, |r| match r {
            Response::ReplicaHave { ids } => Some(ids),
            _ => None,
        })
        .await
    }

    /// Announces the chunks of a replicated snapshot (peers).
    pub async fn replica_begin(&self, snapshot: SnapshotId) -> Result<(), ClientError> {
        self.ask_ok(Request::ReplicaBegin { snapshot }).await
    }

    /// Commits a replicated snapshot's record, last (peers).
    pub async fn replica_commit(
        &self,
        record: SnapshotRecord,
    ) -> Result<SnapshotRecord, ClientError> {
        let record = Box::new(record);
        self.ask(Request::ReplicaCommit { record }, |r| match r {
            Response::Committed(rec) => Some(rec),
            _ => None,
        })
        .await
    }

    /// Replicates now (operators); `on_progress` gets the bytes sent.
    pub async fn replicate(
        &self,
        replica: Option<String>,
        on_progress: impl FnMut(Progress),
    ) -> Result<Vec<ReplicaReport>, ClientError> {
        self.follow(Request::Replicate { replica }, on_progress, |r| match r {
            Response::Replicated(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The configured replicas' state (operators).
    pub async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, ClientError> {
        self.ask(Request::ListReplicas, |r| match r {
            Response::Replicas(l) => Some(l),
            _ => None,
        })
        .await
    }

    /// Makes this coordinator a primary (operators): the retired peer certificates and the
    /// agents to re-issue configs for.
    pub async fn promote(&self) -> Result<(Vec<String>, Vec<String>), ClientError> {
        self.ask(Request::Promote, |r| match r {
            Response::Promoted {
                retired_peers,
                agents,
            } => Some((retired_peers, agents)),
            _ => None,
        })
        .await
    }
}

/// `reply` as `pick` takes it, or [`ClientError::Unexpected`].
fn picked<T>(req: &Request, reply: Response, pick: Pick<T>) -> Result<T, ClientError> {
    let kind = reply.kind();
    pick(reply).ok_or(ClientError::Unexpected {
        request: req.kind(),
        reply: kind,
    })
}

/// The final reply of a pushed job.
fn job_done(r: Response) -> Option<JobReport> {
    match r {
        Response::JobDone(report) => Some(report),
        _ => None,
    }
}

/// A snapshot being read ([`Client::read_snapshot`]).
pub struct SnapshotRead {
    /// Its record.
    pub record: SnapshotRecord,
    /// Its manifest, verified.
    pub manifest: Manifest,
    /// Its data chunks (after [`ReadPart::All`]), then the end.
    pub chunks: ReadStream,
}

/// A frame of a `Read` stream after its record.
pub enum ReadItem {
    /// A chunk (not yet verified); its envelope stays in the buffer its frame was read into.
    Chunk {
        /// Its id, as the coordinator gives it.
        id: ChunkId,
        /// The sealed chunk.
        envelope: Bytes,
    },
    /// A chunk the coordinator does not have.
    Missing(ChunkId),
    /// The coordinator ended the stream.
    End,
}

/// The chunks of a `Read`, in restore order (see [`Client::read`]).
pub struct ReadStream {
    conn: quinn::Connection,
    recv: quinn::RecvStream,
}

impl ReadStream {
    /// The next frame; anything but a chunk, a missing chunk or the end is
    /// [`ClientError::Unexpected`].
    pub async fn next(&mut self) -> Result<ReadItem, ClientError> {
        let frame = match read_frame_or_chunk::<Response, _>(&mut self.recv).await {
            Ok(Some(Incoming::Chunk { id, envelope })) => {
                return Ok(ReadItem::Chunk { id, envelope })
            }
            Ok(Some(Incoming::Message(m))) => Ok(Some(m)),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match settle(&self.conn, frame)? {
            Response::ChunkMissing { id } => Ok(ReadItem::Missing(id)),
            Response::End => Ok(ReadItem::End),
            other => Err(ClientError::Unexpected {
                request: "Read",
                reply: other.kind(),
            }),
        }
    }
}
