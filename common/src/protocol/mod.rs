//! The wire protocol: every message that crosses a QUIC stream, in one place (a long file on
//! purpose: one reader sees every shape and every position that postcard encodes).
//!
//! Messages are serde enums encoded with postcard in length-prefixed frames ([`frame`]).
//! postcard is positional: variants and fields are only ever appended, and
//! `tests::wire_format_is_pinned` pins the bytes of the first messages.
//!
//! # Exchanges
//!
//! - **Hello.** The connecting side (agent, operator) opens the first bidirectional stream and
//!   sends [`Hello`] with its [`PROTOCOL_VERSION`]; the coordinator answers [`HelloReply`].
//!   The peer's identity is never taken from a message: the coordinator reads it from the
//!   verified certificate.
//!
//! # Versions
//!
//! The coordinator accepts every version in [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]
//! and speaks, for the whole connection, the version the peer said: `Welcome { protocol }`
//! repeats it, and what it sends that peer (pushed work) takes that version's shapes. So a
//! fleet is upgraded coordinator first, then one host at a time. A peer outside the range is
//! refused in the hello with one line naming both sides' versions ([`unsupported_version`]),
//! and the connection closed with [`close::VERSION_MISMATCH`]: a newer peer is told to
//! upgrade the coordinator first, an older one to upgrade itself.
//!
//! A change to the wire adds a version: new shapes are appended (postcard is positional), the
//! shapes they replace stay where they are, documented as the older versions' encoding, and
//! are converted in one place ([`Push::frame_for`], [`Request::upgrade`]).
//!
//! - Version 1: the first.
//! - Version 2: one restore push ([`PushFrame::Restore`], [`Request::PushRestore`]) with its
//!   options, in place of version 1's two ([`PushFrame::V1Restore`] with a target only,
//!   [`PushFrame::V1RestoreInto`]; [`Request::V1PushRestore`], [`Request::V1PushRestoreInto`]).
//! - **Requests.** Every later exchange is one bidirectional stream opened by the client, whose
//!   first frame is a [`Request`] and whose replies are [`Response`] frames:
//!   - `Missing { ids }` → `Missing { ids }`: which of these chunks must be uploaded. The answer
//!     is scoped to what this agent already references (see `docs/architecture.md`, Trust), so it is not
//!     an oracle for other hosts' data.
//!   - `PutChunks { snapshot, count }` followed by `count` `Chunk` frames → `Stored` once every
//!     chunk has been verified (hash recomputed) and is durable on disk. Several such streams
//!     run in parallel.
//!   - `Begin` → `Begun { snapshot, parent }`: a `running` snapshot record and, when there is
//!     one, the last completed snapshot of the same source (for unchanged-file detection).
//!   - `Commit` → `Committed(record)`: the coordinator re-checks that every referenced chunk
//!     exists, writes the immutable record, then flips the catalog record to `completed`.
//!   - `Abort` → `Ok`: the snapshot ends `failed` with the reason.
//!   - `Read { snapshot, part }` → `Reading(record)`, then one `Chunk` frame per chunk in
//!     restore order (the manifest's chunks, then, for `ReadPart::All`, every data chunk in
//!     manifest order), then `End`. A chunk the store lacks comes as `ChunkMissing`.
//!   - `ListSnapshots`, `ListAgents`: listings. `Register`: a live agent reports its sources.
//!   - Operators only: `PushBackup`, `PushRestore` → `Progress`… then `JobDone`.
//!   - Any request can be answered with `Error { code, message }`.
//! - **Pushed work.** For a live agent (`fleetvault-agent run`) the coordinator opens a
//!   bidirectional stream with a [`Push`]; the agent answers with [`PushReply::Progress`]
//!   frames and one final [`PushReply::Done`], doing the work itself through ordinary requests
//!   on the same connection.

pub mod frame;

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::id::{ChunkId, SnapshotId};
use crate::manifest::StreamManifest;

/// Version of this protocol, exchanged in [`Hello`]: the newest this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version a coordinator of this build still serves (see the module doc).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Why a peer saying `version` in its hello is refused, or `None` when it is served: one
/// line naming its version and the coordinator's range.
pub fn unsupported_version(version: u32) -> Option<String> {
    let range = if MIN_PROTOCOL_VERSION == PROTOCOL_VERSION {
        format!("{PROTOCOL_VERSION}")
    } else {
        format!("{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")
    };
    if version > PROTOCOL_VERSION {
        Some(format!(
            "protocol version {version} is newer than this coordinator speaks ({range}): upgrade the coordinator first"
        ))
    } else if version < MIN_PROTOCOL_VERSION {
        Some(format!(
            "protocol version {version} is older than this coordinator speaks ({range}): upgrade the connecting host"
        ))
    } else {
        None
    }
}
/// TLS application protocol; the version negotiation itself happens in [`Hello`].
pub const ALPN: &[u8] = b"fleetvault/1";
/// Largest frame body accepted; checked before allocating.
pub const MAX_FRAME_LEN: usize = crate::chunk::MAX_CHUNK_LEN + 64 * 1024;
/// Most ids in one `Missing` request.
pub const MAX_MISSING_BATCH: usize = 8192;
/// Most chunks announced in one `PutChunks` stream.
pub const MAX_PUT_BATCH: u32 = 4096;

/// QUIC application close codes.
pub mod close {
    /// Normal close.
    pub const NORMAL: u32 = 0;
    /// A malformed, oversized or unexpected frame.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The peers speak different protocol versions.
    pub const VERSION_MISMATCH: u32 = 2;
    /// The certificate's role may not connect here.
    pub const NOT_AUTHORIZED: u32 = 3;
    /// The coordinator is shutting down.
    pub const SHUTTING_DOWN: u32 = 4;
    /// A limit was reached (too many connections for this identity, a hello too late); the
    /// close reason names it.
    pub const LIMIT_REACHED: u32 = 5;
}

/// First frame of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The version the sender speaks (its [`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// Software name and version, for logs and `agents`.
    pub software: String,
}

/// Answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; `identity` is what the coordinator read from the certificate (`agent/NAME`).
    Welcome {
        /// The version spoken on this connection: the peer's own (see the module doc).
        protocol: u32,
        /// The coordinator's software version.
        software: String,
        /// The caller's identity as the coordinator sees it.
        identity: String,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
    },
}

/// A source as a live agent reports it: never its settings or credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Unique name within the agent.
    pub name: String,
    /// `files`, `command`, …
    pub kind: String,
}

/// Start of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begin {
    /// Source name.
    pub source: String,
    /// Source kind.
    pub kind: String,
    /// Chunker parameters this backup uses.
    pub chunker: ChunkerParams,
    /// Job that asked for it, if any.
    pub job: Option<String>,
    /// Free-form labels.
    pub tags: Vec<String>,
}

/// End of a successful backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The snapshot from `Begun`.
    pub snapshot: SnapshotId,
    /// The encoded manifest, as a chunk stream.
    pub root: StreamManifest,
    /// BLAKE3 of the data stream (stream sources only).
    pub checksum: Option<[u8; 32]>,
    /// Bytes the source produced.
    pub logical_bytes: u64,
    /// Data chunks referenced (with repeats).
    pub chunks: u64,
    /// Things the operator should know (e.g. a file changed while being read).
    pub warnings: Vec<String>,
}

/// Which part of a snapshot to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadPart {
    /// Only the manifest's chunks.
    Manifest,
    /// The manifest's chunks, then every data chunk in manifest order.
    All,
}

/// Filters for `ListSnapshots`; empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// Only this agent's snapshots.
    pub agent: Option<String>,
    /// Only this source's.
    pub source: Option<String>,
    /// Only with this status (`completed`, `failed`, …).
    pub status: Option<String>,
    /// Only made by this job.
    pub job: Option<String>,
}

/// First frame of a client-opened stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Which of these chunks must be uploaded?
    Missing {
        /// At most [`MAX_MISSING_BATCH`].
        ids: Vec<ChunkId>,
    },
    /// `count` [`Request::Chunk`] frames follow.
    PutChunks {
        /// The backup they belong to.
        snapshot: SnapshotId,
        /// At most [`MAX_PUT_BATCH`].
        count: u32,
    },
    /// One chunk on a `PutChunks` stream.
    Chunk {
        /// Claimed id; the coordinator recomputes it.
        id: ChunkId,
        /// The sealed chunk (as bytes: the same encoding as a `Vec<u8>`, without per-byte
        /// serde calls).
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// Start a backup.
    Begin(Begin),
    /// Finish a backup.
    Commit(Commit),
    /// Give up a backup.
    Abort {
        /// The snapshot from `Begun`.
        snapshot: SnapshotId,
        /// Why.
        reason: String,
    },
    /// Stream a snapshot back.
    Read {
        /// Which snapshot.
        snapshot: SnapshotId,
        /// How much of it.
        part: ReadPart,
    },
    /// List snapshots (an agent sees only its own).
    ListSnapshots(SnapshotFilter),
    /// List agents (operators only).
    ListAgents,
    /// A live agent's sources.
    Register {
        /// Its sources.
        sources: Vec<SourceInfo>,
    },
    /// Operators: have a live agent back up a source now.
    PushBackup {
        /// Agent name.
        agent: String,
        /// Source name.
        source: String,
    },
    /// Version 1's restore push with a target only; read through [`Request::upgrade`].
    V1PushRestore {
        /// What to restore.
        snapshot: SnapshotId,
        /// Onto which agent.
        agent: String,
        /// Target directory for a files snapshot.
        target: Option<String>,
    },
    /// What database a running backup is dumping (sent once the server has been reached).
    Describe {
        /// The snapshot from `Begun`.
        snapshot: SnapshotId,
        /// `postgres`, `mysql`, `sqlite`, `mongodb`.
        db_type: String,
        /// The server's version, when known.
        db_version: Option<String>,
        /// The database name (a path for SQLite).
        database: String,
    },
    /// Version 1's restore push with options; read through [`Request::upgrade`].
    V1PushRestoreInto {
        /// What to restore.
        snapshot: SnapshotId,
        /// Onto which agent.
        agent: String,
        /// How.
        options: RestoreOptions,
    },
    /// Operators: run a configured job now; answered with `Reports`.
    RunJob {
        /// The job's name.
        job: String,
    },
    /// Operators: protect a snapshot from retention, or lift that.
    Protect {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Protected or not.
        protected: bool,
    },
    /// Operators: delete a snapshot record (its chunks go at the next GC).
    Delete {
        /// The snapshot.
        snapshot: SnapshotId,
    },
    /// Operators: apply a job's retention (or only say what it would do).
    Forget {
        /// The job whose policy applies, to its snapshots.
        job: String,
        /// Decide and report, delete nothing.
        dry_run: bool,
    },
    /// Operators: collect garbage now.
    Gc,
    /// Operators: re-read and re-hash what snapshots reference; answered with `Verified`.
    Verify {
        /// Only this snapshot (default: every completed one).
        snapshot: Option<SnapshotId>,
    },
    /// Peers: which of these snapshots does the replica already hold (or has its own
    /// retention removed)? Answered with `ReplicaHave`.
    ReplicaHave {
        /// At most [`MAX_MISSING_BATCH`].
        ids: Vec<SnapshotId>,
    },
    /// Peers: chunks of this snapshot follow (`Missing`, `PutChunks`); nothing is listed
    /// on the replica until its `ReplicaCommit`.
    ReplicaBegin {
        /// The primary's snapshot id, kept on the replica.
        snapshot: SnapshotId,
    },
    /// Peers: the immutable record of a snapshot whose chunks are all sent, last (docs/architecture.md
    /// rule 8). Answered with `Committed`.
    ReplicaCommit {
        /// The record as the primary holds it.
        record: Box<SnapshotRecord>,
    },
    /// Operators: replicate now to every `[[replicas]]` entry, or to the one named.
    /// Answered with `Progress` frames, then `Replicated`.
    Replicate {
        /// Only this replica.
        replica: Option<String>,
    },
    /// Operators: the state of each configured replica; answered with `Replicas`.
    ListReplicas,
    /// Operators: make this coordinator a primary: the peer certificates issued so far are
    /// retired (the old primary can no longer add snapshots). Answered with `Promoted`.
    Promote,
    /// Operators: have a live agent restore a snapshot (possibly another agent's), into one
    /// of its sources or to `options.target` (version 2).
    PushRestore {
        /// What to restore.
        snapshot: SnapshotId,
        /// Onto which agent.
        agent: String,
        /// How and where.
        options: RestoreOptions,
    },
}

impl Request {
    /// The request in its current form: version 1's restore pushes become
    /// [`Request::PushRestore`]; every other request is the same in every version.
    pub fn upgrade(self) -> Self {
        match self {
            Request::V1PushRestore {
                snapshot,
                agent,
                target,
            } => Request::PushRestore {
                snapshot,
                agent,
                options: RestoreOptions {
                    target,
                    ..RestoreOptions::default()
                },
            },
            Request::V1PushRestoreInto {
                snapshot,
                agent,
                options,
            } => Request::PushRestore {
                snapshot,
                agent,
                options,
            },
            current => current,
        }
    }
}

/// What one sync to a replica did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The replica's name in `coordinator.toml`.
    pub replica: String,
    /// Snapshots sent (committed on the replica).
    pub snapshots: u64,
    /// Snapshots the replica already held.
    pub already_present: u64,
    /// Chunks sent.
    pub chunks: u64,
    /// Sealed bytes sent.
    pub bytes: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Why the sync stopped, when it failed.
    pub error: Option<String>,
}

/// A configured replica as `replicas` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Name in `coordinator.toml`.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Its cron schedule.
    pub schedule: Option<String>,
    /// Start of the last sync attempt (unix ms), if any.
    pub last_attempt_ms: Option<u64>,
    /// End of the last successful sync (unix ms), if any.
    pub last_success_ms: Option<u64>,
    /// The last attempt's report.
    pub last_report: Option<ReplicaReport>,
    /// The last error, cleared by a successful sync.
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// When the next retry after a failure is due (unix ms).
    pub next_retry_ms: Option<u64>,
    /// Completed snapshots this replica should hold and has not confirmed.
    pub lag_snapshots: u64,
    /// Stored bytes those snapshots added on this coordinator (an upper bound of what is
    /// left to send).
    pub lag_bytes: u64,
}

/// What verifying one snapshot found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResult {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Its agent.
    pub agent: String,
    /// Its source.
    pub source: String,
    /// Chunks checked (manifest and data, each distinct chunk once).
    pub chunks: u64,
    /// Chunks whose content does not match their id (now quarantined).
    pub damaged: Vec<ChunkId>,
    /// Chunks the store does not have.
    pub missing: Vec<ChunkId>,
    /// What the snapshot's own record or manifest says wrongly (a chunk length, a checksum,
    /// a manifest that cannot be read): its problem alone, no chunk is quarantined for it.
    pub problems: Vec<String>,
}

/// What retention decided for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionDecision {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Its agent.
    pub agent: String,
    /// Its source.
    pub source: String,
    /// When it started (coordinator clock, unix ms).
    pub started_ms: u64,
    /// Kept, or forgotten.
    pub keep: bool,
    /// Why it is kept (`last`, `daily`, `protected`, …); empty when forgotten.
    pub reasons: Vec<String>,
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Chunks referenced by completed snapshots or pinned by running backups.
    pub live_chunks: u64,
    /// Chunks deleted.
    pub deleted_chunks: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the minimum age.
    pub young_chunks: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Completed snapshots whose manifest could not be read: everything their agent ever
    /// proven was kept for them (run verify).
    pub unreadable: Vec<SnapshotId>,
}

/// How a database (or any) snapshot is restored into an agent's source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOptions {
    /// The agent's source to restore into (default: the snapshot's source name).
    pub source: Option<String>,
    /// Another database name (or SQLite path) than the source's own.
    pub database: Option<String>,
    /// Replace an existing, non-empty database (after a safety snapshot).
    pub replace: bool,
    /// Skip the safety snapshot before a replace.
    pub no_safety_snapshot: bool,
    /// Target directory or file (files and command snapshots).
    pub target: Option<String>,
}

/// Why a request failed, for the caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or unexpected request.
    BadRequest,
    /// Not allowed for this identity.
    Forbidden,
    /// No such snapshot or agent.
    NotFound,
    /// A chunk's content does not match its id.
    HashMismatch,
    /// The coordinator failed (disk full, I/O error).
    Internal,
    /// The agent is not connected.
    AgentOffline,
    /// The pushed job failed on the agent.
    JobFailed,
}

/// Result of a backup or restore, as printed by `--json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The snapshot made or restored.
    pub snapshot_id: String,
    /// `completed` or `failed`.
    pub status: String,
    /// Agent that did the work.
    pub agent: String,
    /// Source name.
    pub source: String,
    /// Bytes read from the source (backup) or written to the sink (restore).
    pub bytes_read: u64,
    /// Bytes sent to the coordinator (sealed chunks).
    pub bytes_uploaded: u64,
    /// Chunks referenced, the manifest's included (as in `new_chunks`).
    pub chunks: u64,
    /// Chunks uploaded because the coordinator lacked them.
    pub new_chunks: u64,
    /// Bytes written by a restore.
    pub bytes_written: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Files not re-read because unchanged (files sources).
    pub files_unchanged: u64,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Failure reason when `status` is `failed`.
    pub error: Option<String>,
    /// The safety snapshot taken before a replacing restore.
    pub safety_snapshot_id: Option<String>,
    /// Where a restore went (database name, path or directory).
    pub restored_to: Option<String>,
}

/// Progress of a running job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes processed so far.
    pub bytes: u64,
    /// Total, when known.
    pub total: Option<u64>,
}

/// A live agent as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Name from its certificate.
    pub name: String,
    /// Connected now.
    pub connected: bool,
    /// Last time it was seen (unix ms, coordinator clock).
    pub last_seen_ms: u64,
    /// Its software version.
    pub version: String,
    /// Its sources.
    pub sources: Vec<SourceInfo>,
    /// Its newest snapshot: id, status (with the reason when failed) and start time.
    pub last_backup: Option<LastBackup>,
}

/// An agent's newest snapshot, for `agents`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBackup {
    /// Snapshot id.
    pub snapshot: SnapshotId,
    /// Source name.
    pub source: String,
    /// Its status.
    pub status: SnapshotStatus,
    /// Its start (coordinator clock, unix ms).
    pub started_ms: u64,
}

/// Replies on a client-opened stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// One line naming the problem.
        message: String,
    },
    /// Generic success.
    Ok,
    /// The chunks to upload.
    Missing {
        /// Subset of the asked ids.
        ids: Vec<ChunkId>,
    },
    /// Every chunk of a `PutChunks` stream is durable.
    Stored {
        /// How many were new to the store.
        new: u32,
    },
    /// A backup started.
    Begun {
        /// Its id.
        snapshot: SnapshotId,
        /// The last completed snapshot of the same source.
        parent: Option<SnapshotRecord>,
    },
    /// A backup is completed.
    Committed(SnapshotRecord),
    /// A `Read` starts: the snapshot's record.
    Reading(SnapshotRecord),
    /// One chunk of a `Read`.
    Chunk {
        /// Its id (the reader verifies the content against it).
        id: ChunkId,
        /// The sealed chunk as stored.
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    /// A chunk the coordinator does not have.
    ChunkMissing {
        /// Its id.
        id: ChunkId,
    },
    /// End of a `Read`.
    End,
    /// Snapshot listing.
    Snapshots(Vec<SnapshotRecord>),
    /// Agent listing.
    Agents(Vec<AgentInfo>),
    /// A pushed job progresses.
    Progress(Progress),
    /// A pushed job finished (successfully or not: see `status`).
    JobDone(JobReport),
    /// The results of a job's backups.
    Reports(Vec<JobReport>),
    /// Retention decisions.
    Retention(Vec<RetentionDecision>),
    /// A garbage collection finished.
    GcDone(GcReport),
    /// Verification results, one per snapshot.
    Verified(Vec<VerifyResult>),
    /// Which of the asked snapshots the replica holds.
    ReplicaHave {
        /// Subset of the asked ids.
        ids: Vec<SnapshotId>,
    },
    /// What each sync did.
    Replicated(Vec<ReplicaReport>),
    /// Configured replicas.
    Replicas(Vec<ReplicaStatus>),
    /// The coordinator is a primary now.
    Promoted {
        /// Peer certificates retired.
        retired_peers: Vec<String>,
        /// Agents with snapshots here, to re-issue configs for.
        agents: Vec<String>,
    },
}

/// Chunk frames are read without copying their envelope (`frame::read_frame_or_chunk`); the
/// tags are pinned by `wire_format_is_pinned`.
impl frame::WithChunks for Request {
    const CHUNK_TAG: u8 = 2;
}

impl frame::WithChunks for Response {
    const CHUNK_TAG: u8 = 7;
}

impl Request {
    /// The variant's name, for messages about an exchange.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Missing { .. } => "Missing",
            Request::PutChunks { .. } => "PutChunks",
            Request::Chunk { .. } => "Chunk",
            Request::Begin(..) => "Begin",
            Request::Commit(..) => "Commit",
            Request::Abort { .. } => "Abort",
            Request::Read { .. } => "Read",
            Request::ListSnapshots(..) => "ListSnapshots",
            Request::ListAgents => "ListAgents",
            Request::Register { .. } => "Register",
            Request::PushBackup { .. } => "PushBackup",
            Request::V1PushRestore { .. } => "V1PushRestore",
            Request::Describe { .. } => "Describe",
            Request::V1PushRestoreInto { .. } => "V1PushRestoreInto",
            Request::RunJob { .. } => "RunJob",
            Request::Protect { .. } => "Protect",
            Request::Delete { .. } => "Delete",
            Request::Forget { .. } => "Forget",
            Request::Gc => "Gc",
            Request::Verify { .. } => "Verify",
            Request::ReplicaHave { .. } => "ReplicaHave",
            Request::ReplicaBegin { .. } => "ReplicaBegin",
            Request::ReplicaCommit { .. } => "ReplicaCommit",
            Request::Replicate { .. } => "Replicate",
            Request::ListReplicas => "ListReplicas",
            Request::Promote => "Promote",
            Request::PushRestore { .. } => "PushRestore",
        }
    }
}

impl Response {
    /// The variant's name, for naming an unexpected reply without its (possibly large) content.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Error { .. } => "Error",
            Response::Ok => "Ok",
            Response::Missing { .. } => "Missing",
            Response::Stored { .. } => "Stored",
            Response::Begun { .. } => "Begun",
            Response::Committed(..) => "Committed",
            Response::Reading(..) => "Reading",
            Response::Chunk { .. } => "Chunk",
            Response::ChunkMissing { .. } => "ChunkMissing",
            Response::End => "End",
            Response::Snapshots(..) => "Snapshots",
            Response::Agents(..) => "Agents",
            Response::Progress(..) => "Progress",
            Response::JobDone(..) => "JobDone",
            Response::Reports(..) => "Reports",
            Response::Retention(..) => "Retention",
            Response::GcDone(..) => "GcDone",
            Response::Verified(..) => "Verified",
            Response::ReplicaHave { .. } => "ReplicaHave",
            Response::Replicated(..) => "Replicated",
            Response::Replicas(..) => "Replicas",
            Response::Promoted { .. } => "Promoted",
        }
    }
}

/// Work the coordinator pushes to a live agent. It crosses the wire as a [`PushFrame`] of the
/// agent's version ([`Push::frame_for`]); read, any version's frame becomes a `Push`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PushFrame", into = "PushFrame")]
pub enum Push {
    /// Back up one source now.
    Backup {
        /// Source name.
        source: String,
        /// Job that asked for it.
        job: Option<String>,
    },
    /// Restore a snapshot (the agent reads it with `Read`; the coordinator has granted it)
    /// into one of the agent's sources or to `options.target`.
    Restore {
        /// What to restore.
        snapshot: SnapshotId,
        /// How and where.
        options: RestoreOptions,
    },
}

/// A [`Push`] as encoded on the wire: the version-1 shapes keep their positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushFrame {
    /// [`Push::Backup`], the same in every version.
    Backup {
        /// Source name.
        source: String,
        /// Job that asked for it.
        job: Option<String>,
    },
    /// Version 1's restore with a target only (sent to version-1 agents when nothing else
    /// is asked).
    V1Restore {
        /// What to restore.
        snapshot: SnapshotId,
        /// Target directory (files snapshots).
        target: Option<String>,
    },
    /// Version 1's restore with options.
    V1RestoreInto {
        /// What to restore.
        snapshot: SnapshotId,
        /// How.
        options: RestoreOptions,
    },
    /// [`Push::Restore`] (version 2).
    Restore {
        /// What to restore.
        snapshot: SnapshotId,
        /// How and where.
        options: RestoreOptions,
    },
}

impl Push {
    /// How this push is said to an agent speaking `version`: the one place where the
    /// version-1 shapes are made.
    pub fn frame_for(&self, version: u32) -> PushFrame {
        match self.clone() {
            Push::Backup { source, job } => PushFrame::Backup { source, job },
            Push::Restore { snapshot, options } if version < 2 => {
                // Version 1 agents know the plain form as its own message.
                let plain = options.source.is_none()
                    && options.database.is_none()
                    && !options.replace
                    && !options.no_safety_snapshot;
                if plain {
                    PushFrame::V1Restore {
                        snapshot,
                        target: options.target,
                    }
                } else {
                    PushFrame::V1RestoreInto { snapshot, options }
                }
            }
            Push::Restore { snapshot, options } => PushFrame::Restore { snapshot, options },
        }
    }
}

impl From<PushFrame> for Push {
    fn from(frame: PushFrame) -> Self {
        match frame {
            PushFrame::Backup { source, job } => Push::Backup { source, job },
            PushFrame::V1Restore { snapshot, target } => Push::Restore {
                snapshot,
                options: RestoreOptions {
                    target,
                    ..RestoreOptions::default()
                },
            },
            PushFrame::V1RestoreInto { snapshot, options }
            | PushFrame::Restore { snapshot, options } => Push::Restore { snapshot, options },
        }
    }
}

impl From<Push> for PushFrame {
    fn from(push: Push) -> Self {
        push.frame_for(PROTOCOL_VERSION)
    }
}

/// The agent's answers on a push stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one Done per job: boxing would buy nothing
pub enum PushReply {
    /// Work progresses.
    Progress(Progress),
    /// Work finished.
    Done(JobReport),
}

/// Status of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotStatus {
    /// Waiting to run.
    Pending,
    /// Being written.
    Running,
    /// Every chunk durable, record flushed.
    Completed,
    /// Ended without a usable snapshot.
    Failed {
        /// Why.
        reason: String,
    },
}

impl SnapshotStatus {
    /// Every status's name, for checking a `--status` filter.
    pub const NAMES: [&'static str; 4] = ["pending", "running", "completed", "failed"];

    /// `pending`, `running`, `completed` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            SnapshotStatus::Pending => "pending",
            SnapshotStatus::Running => "running",
            SnapshotStatus::Completed => "completed",
            SnapshotStatus::Failed { .. } => "failed",
        }
    }
}

/// The catalog's record of one snapshot (see `docs/architecture.md`, Formats). Times are stamped by the
/// coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Id.
    pub id: SnapshotId,
    /// Agent (from its certificate).
    pub agent: String,
    /// Source name.
    pub source: String,
    /// Source kind, or a bundle.
    pub kind: crate::SnapshotKind,
    /// Database type, for database sources.
    pub db_type: Option<String>,
    /// Database server version.
    pub db_version: Option<String>,
    /// Database name.
    pub database: Option<String>,
    /// Start, unix ms (coordinator clock).
    pub started_ms: u64,
    /// End, unix ms.
    pub ended_ms: Option<u64>,
    /// Status.
    pub status: SnapshotStatus,
    /// Bytes the source produced.
    pub logical_bytes: u64,
    /// Plaintext bytes of chunks new to the store.
    pub new_bytes: u64,
    /// Stored (sealed) bytes of chunks new to the store.
    pub stored_bytes: u64,
    /// Data chunks referenced.
    pub chunks: u64,
    /// Chunks new to the store.
    pub new_chunks: u64,
    /// The encoded manifest as a chunk stream.
    pub root: Option<StreamManifest>,
    /// BLAKE3 of the data stream (stream sources).
    pub checksum: Option<[u8; 32]>,
    /// Chunker parameters used.
    pub chunker: ChunkerParams,
    /// Parent snapshot used for unchanged-file detection.
    pub parent: Option<SnapshotId>,
    /// Job name.
    pub job: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Protected from retention.
    pub protected: bool,
    /// Warnings from the backup.
    pub warnings: Vec<String>,
}

impl SnapshotRecord {
    /// A new record with nothing measured yet: `status` at `started_ms`.
    pub fn new(
        id: SnapshotId,
        agent: &str,
        source: &str,
        kind: impl Into<crate::SnapshotKind>,
        chunker: ChunkerParams,
        started_ms: u64,
        status: SnapshotStatus,
    ) -> Self {
        Self {
            id,
            agent: agent.to_owned(),
            source: source.to_owned(),
            kind: kind.into(),
            db_type: None,
            db_version: None,
            database: None,
            started_ms,
            ended_ms: None,
            status,
            logical_bytes: 0,
            new_bytes: 0,
            stored_bytes: 0,
            chunks: 0,
            new_chunks: 0,
            root: None,
            checksum: None,
            chunker,
            parent: None,
            job: None,
            tags: Vec::new(),
            protected: false,
            warnings: Vec::new(),
        }
    }

    /// Plaintext over stored bytes of what this snapshot added (1.0 when nothing was new).
    pub fn compression_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            1.0
        } else {
            self.new_bytes as f64 / self.stored_bytes as f64
        }
    }

    /// Logical bytes over new bytes: how much dedup saved.
    pub fn dedup_ratio(&self) -> f64 {
        if self.new_bytes == 0 {
            if self.logical_bytes == 0 {
                1.0
            } else {
                f64::INFINITY
            }
        } else {
            self.logical_bytes as f64 / self.new_bytes as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// postcard is positional: if this changes, old peers and stored records break. Append new
    /// variants and fields instead of reordering.
    #[test]
    fn wire_format_is_pinned() {
        let hello = Hello {
            protocol: 1,
            software: "fv".into(),
        };
        assert_eq!(postcard::to_stdvec(&hello).unwrap(), [1, 2, b'f', b'v']);
        let req = Request::Missing {
            ids: vec![ChunkId([7; 32])],
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        assert_eq!(&bytes[..3], &[0, 1, 7]);
        assert_eq!(bytes.len(), 34);
        let read = Request::Read {
            snapshot: SnapshotId(5),
            part: ReadPart::All,
        };
        assert_eq!(postcard::to_stdvec(&read).unwrap(), [6, 5, 1]);
        assert_eq!(postcard::to_stdvec(&Response::End).unwrap(), [9]);
        let id = ChunkId([7; 32]);
        let envelope = vec![1, 2];
        let chunk = postcard::to_stdvec(&Request::Chunk { id, envelope }).unwrap();
        assert_eq!(chunk[0], <Request as frame::WithChunks>::CHUNK_TAG);
        let envelope = vec![1, 2];
        let chunk = postcard::to_stdvec(&Response::Chunk { id, envelope }).unwrap();
        assert_eq!(chunk[0], <Response as frame::WithChunks>::CHUNK_TAG);
        assert_eq!(
            postcard::to_stdvec(&Push::Backup {
                source: "d".into(),
                job: None
            })
            .unwrap(),
            [0, 1, b'd', 0]
        );
    }

    /// Version 1's restore pushes keep their variant indices; version 2's are appended.
    #[test]
    fn version_1_shapes_keep_their_positions() {
        let snapshot = SnapshotId(5);
        let target = Some("/t".to_owned());
        let options = RestoreOptions {
            target: target.clone(),
            ..RestoreOptions::default()
        };
        let tag = |f: &PushFrame| postcard::to_stdvec(f).unwrap()[0];
        let restore = Push::Restore {
            snapshot,
            options: options.clone(),
        };
        let v1 = restore.frame_for(1);
        assert_eq!(
            v1,
            PushFrame::V1Restore {
                snapshot,
                target: target.clone()
            }
        );
        assert_eq!(tag(&v1), 1);
        let replace = Push::Restore {
            snapshot,
            options: RestoreOptions {
                replace: true,
                ..options.clone()
            },
        };
        assert_eq!(tag(&replace.frame_for(1)), 2);
        assert_eq!(tag(&restore.frame_for(2)), 3);
        // Every version's frame reads back as the same push.
        for v in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            let bytes = postcard::to_stdvec(&restore.frame_for(v)).unwrap();
            assert_eq!(postcard::from_bytes::<Push>(&bytes).unwrap(), restore);
        }
        let req = |r: &Request| postcard::to_stdvec(r).unwrap()[0];
        let agent = "a".to_owned();
        let v1 = Request::V1PushRestore {
            snapshot,
            agent: agent.clone(),
            target: target.clone(),
        };
        assert_eq!(req(&v1), 11);
        let current = v1.upgrade();
        assert_eq!(
            current,
            Request::PushRestore {
                snapshot,
                agent,
                options
            }
        );
        assert_eq!(req(&current), 26);
        assert!(unsupported_version(PROTOCOL_VERSION).is_none());
        assert!(unsupported_version(MIN_PROTOCOL_VERSION).is_none());
        let newer = unsupported_version(PROTOCOL_VERSION + 1).unwrap();
        assert!(
            newer.contains(&format!("version {}", PROTOCOL_VERSION + 1))
                && newer.contains(&PROTOCOL_VERSION.to_string()),
            "{newer}"
        );
    }
}
