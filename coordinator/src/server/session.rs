//! One peer's connection: identity from its certificate, the hello, then one task per
//! request stream. When the connection ends, every backup it had started and not committed
//! ends `failed` (docs/architecture.md rule 2), after its stream tasks have finished.
//!
//! Long because it is the one dispatcher: every request kind, the role it needs and the
//! handler it goes to are in one `match`, and the handlers that grew are in `upload.rs`,
//! `restore.rs` and `replica.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetvault_certs::{Identity, Role};
use fleetvault_common::protocol::frame::{
    read_frame_body, read_frame_max, read_len, write_frame, FrameError, Incoming,
};
use fleetvault_common::protocol::{
    close, unsupported_version, ErrorCode, Hello, HelloReply, Progress, Push, Request, Response,
};
use fleetvault_common::{peer_identity, ChunkId, SnapshotId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::error::{Failure, OpError};
use crate::State;

/// Counters of one backup in progress. `new_*` and `stored_bytes` (what the agent is told)
/// count chunks new for this agent: not proven by it before, or not in the store; the
/// `store_*` counters (logged for the operator) what the store itself gained.
#[derive(Default)]
pub(super) struct Backup {
    pub(super) new_chunks: u64,
    pub(super) new_bytes: u64,
    pub(super) stored_bytes: u64,
    pub(super) store_new_chunks: u64,
    pub(super) store_new_bytes: u64,
    /// A snapshot a peer is replicating: it has no catalog record until its commit.
    pub(super) replica: bool,
}

/// One connected peer.
pub(super) struct Session {
    pub(super) identity: Identity,
    pub(super) conn: quinn::Connection,
    pub(super) state: Arc<State>,
    pub(super) software: String,
    /// The protocol version the peer said in its hello, spoken on this connection.
    pub(super) protocol: u32,
    /// Backups this connection started and has not finished.
    pub(super) running: Mutex<HashMap<SnapshotId, Backup>>,
    /// Chunks this connection uploaded: possession proven, so `Missing` may say "present".
    pub(super) uploaded: Mutex<HashSet<ChunkId>>,
}

impl Session {
    /// The peer's name.
    pub(super) fn name(&self) -> &str {
        &self.identity.name
    }

    /// Whose chunk references this connection proves and adds: the agent's name, or
    /// `peer/NAME` for a replicating coordinator (agent names cannot hold a `/`).
    pub(super) fn owner(&self) -> std::borrow::Cow<'_, str> {
        match self.identity.role {
            Role::Peer => format!("peer/{}", self.identity.name).into(),
            _ => self.identity.name.as_str().into(),
        }
    }

    /// Runs blocking catalog or store work off the reactor; its error goes back to the caller.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, Failure> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Failure::Reply(ErrorCode::Internal, e.to_string()))?
            .map_err(Failure::from)
    }

    /// Refuses a request about a snapshot that is not a backup this connection is running.
    pub(super) fn require_running(&self, snapshot: SnapshotId) -> Result<(), Failure> {
        if self
            .running
            .lock()
            .expect("running lock")
            .contains_key(&snapshot)
        {
            Ok(())
        } else {
            Err(Failure::Reply(
                ErrorCode::BadRequest,
                format!("snapshot {snapshot} is not a backup in progress on this connection"),
            ))
        }
    }

    /// Refuses a restore of a snapshot that is not completed.
    fn require_completed(&self, snapshot: SnapshotId) -> Result<(), Failure> {
        let rec = self.state.catalog.get(snapshot)?;
        if rec.status != fleetvault_common::SnapshotStatus::Completed {
            return Err(Failure::Reply(
                ErrorCode::NotFound,
                format!(
                    "snapshot {snapshot} is {}, not completed",
                    rec.status.name()
                ),
            ));
        }
        Ok(())
    }

    /// What a pushed restore of `snapshot` lets the agent read: the snapshot, and a bundle's
    /// parts.
    async fn restore_grants(&self, snapshot: SnapshotId) -> Result<Vec<SnapshotId>, Failure> {
        let st = self.state.clone();
        self.blocking(move || {
            let rec = st.catalog.get(snapshot)?;
            let mut ids = crate::bundle::parts(&st, &rec)?;
            ids.push(snapshot);
            Ok(ids)
        })
        .await
    }

    /// The configured job called `name`.
    fn job(&self, name: &str) -> Result<crate::config::JobConfig, Failure> {
        self.state
            .jobs()
            .into_iter()
            .find(|j| j.name == name)
            .ok_or_else(|| {
                Failure::Reply(
                    ErrorCode::NotFound,
                    format!("no job named {name:?} in coordinator.toml"),
                )
            })
    }

    /// A request refused because it is over a size limit: logged with the identity, answered
    /// with the reason.
    pub(super) fn over_limit(&self, reason: crate::limits::LimitError) -> Failure {
        warn!(peer = %self.identity, %reason, "request refused: over a limit");
        OpError::from(reason).into()
    }

    /// Refuses a request that this role may not make.
    pub(super) fn require(&self, role: Role) -> Result<(), Failure> {
        self.require_any(&[role])
    }

    /// Refuses a request that none of these roles may make.
    pub(super) fn require_any(&self, roles: &[Role]) -> Result<(), Failure> {
        if roles.contains(&self.identity.role) {
            Ok(())
        } else {
            Err(Failure::Reply(
                ErrorCode::Forbidden,
                format!("{} may not make this request", self.identity),
            ))
        }
    }
}

/// Runs one connection to its end.
pub(super) async fn run(incoming: quinn::Incoming, state: Arc<State>, token: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            info!(%remote, error = %fleetvault_common::describe_connection_error(&e), "handshake failed");
            return;
        }
    };
    let identity = match peer_identity(&conn) {
        Ok(id) => id,
        Err(e) => {
            warn!(%remote, error = %e, "refusing peer without a fleet identity");
            conn.close(
                close::NOT_AUTHORIZED.into(),
                b"no fleet identity in certificate",
            );
            return;
        }
    };
    let span = tracing::info_span!("session", peer = %identity, %remote);
    // Counted for as long as the connection is served.
    let Some(_slot) = count_connection(&conn, &identity, &state) else {
        return;
    };
    serve(conn, identity, state, token).instrument(span).await
}

/// Counts a connection against its identity's and the global limit; refuses it, with the
/// reason in the close and a warning naming the identity, when one is reached.
fn count_connection(
    conn: &quinn::Connection,
    identity: &Identity,
    state: &State,
) -> Option<crate::limits::ConnectionSlot> {
    match state.limits.connect(&identity.to_string()) {
        Ok(slot) => Some(slot),
        Err(reason) => {
            warn!(peer = %identity, remote = %conn.remote_address(), %reason, "connection refused");
            conn.close(close::LIMIT_REACHED.into(), reason.to_string().as_bytes());
            None
        }
    }
}

async fn serve(
    conn: quinn::Connection,
    identity: Identity,
    state: Arc<State>,
    token: CancellationToken,
) {
    // An agent certificate counts only while it is the one `issue-agent` issued last for
    // that name (crate::issued): re-issuing revokes the earlier ones.
    let der = fleetvault_common::peer_certificate_der(&conn).unwrap_or_default();
    if identity.role == Role::Agent && !agent_certificate_current(&conn, &identity, &der, &state) {
        return;
    }
    let allowed = match identity.role {
        Role::Agent | Role::Operator => true,
        // A peer certificate counts only while it is the one `issue-peer` recorded for that
        // name: `promote` retires them.
        Role::Peer => state.peer_allowed(&identity.name, &der),
        Role::Coordinator => false,
    };
    if !allowed {
        warn!("refusing a certificate that may not connect here");
        conn.close(
            close::NOT_AUTHORIZED.into(),
            b"certificate not allowed here (role, or a retired peer)",
        );
        return;
    }
    let (software, protocol) = match hello(&conn, &identity).await {
        Ok(s) => s,
        Err(reason) => {
            info!(%reason, "hello failed");
            return;
        }
    };
    if identity.role == Role::Agent {
        let sw = software.clone();
        if let Err(e) = state
            .catalog
            .touch_agent(&identity.name, |r| r.version = sw)
        {
            warn!(error = %e, "cannot record agent");
        }
    }
    debug!(%software, protocol, "connected");
    let session = Arc::new(Session {
        identity,
        conn: conn.clone(),
        state: state.clone(),
        software,
        protocol,
        running: Mutex::default(),
        uploaded: Mutex::default(),
    });
    let streams = TaskTracker::new();
    if session.identity.role == Role::Agent {
        streams
            .spawn(watch_agent_certificate(session.clone(), der, token.clone()).in_current_span());
    }
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(session.clone().stream(send, recv).in_current_span());
                }
                Err(e) => {
                    debug!(reason = %fleetvault_common::describe_connection_error(&e), "connection ended");
                    break;
                }
            }
        }
    }
    streams.close();
    let _ = tokio::time::timeout(Duration::from_secs(15), streams.wait()).await;
    let reason = if token.is_cancelled() {
        "coordinator shut down during the backup"
    } else {
        "connection to the agent was lost during the backup"
    };
    // Replicated snapshots cut off here were never listed: nothing to mark.
    let unfinished: Vec<SnapshotId> = session
        .running
        .lock()
        .expect("running lock")
        .drain()
        .filter(|(_, b)| !b.replica)
        .map(|(id, _)| id)
        .collect();
    for id in unfinished {
        warn!(snapshot = %id, reason, "backup failed");
        if let Err(e) = state.catalog.fail(id, reason) {
            warn!(snapshot = %id, error = %e, "cannot mark backup failed");
        }
    }
    state.live.remove(session.name(), conn.stable_id());
    state.pins.release(conn.stable_id());
}

/// How often a connected agent's certificate is checked against its name's record again.
const AGENT_RECHECK: Duration = Duration::from_secs(2);

/// Whether `der` is the certificate issued last for agent `identity` (or its name predates
/// the records); if not, closes the connection with the reason, before the hello.
fn agent_certificate_current(
    conn: &quinn::Connection,
    identity: &Identity,
    der: &[u8],
    state: &State,
) -> bool {
    match crate::issued::check(&state.root, &identity.name, der) {
        Ok(crate::issued::Admission::Current) => true,
        Ok(crate::issued::Admission::Unrecorded) => {
            debug!("agent certificate issued before certificate records; accepted until re-issued");
            true
        }
        Err(refusal) => {
            warn!(agent = %identity.name, reason = %refusal, "refusing a replaced agent certificate");
            conn.close(close::NOT_AUTHORIZED.into(), refusal.to_string().as_bytes());
            false
        }
    }
}

/// Closes an agent's connection within [`AGENT_RECHECK`] of its certificate being replaced
/// (`issue-agent --force`, run by another process while this connection is up).
async fn watch_agent_certificate(session: Arc<Session>, der: Vec<u8>, token: CancellationToken) {
    let conn = &session.conn;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = conn.closed() => return,
            _ = tokio::time::sleep(AGENT_RECHECK) => {}
        }
        let (root, name) = (session.state.root.clone(), session.name().to_owned());
        let der = der.clone();
        let checked =
            tokio::task::spawn_blocking(move || crate::issued::check(&root, &name, &der)).await;
        if let Ok(Err(refusal)) = checked {
            warn!(agent = %session.name(), reason = %refusal, "closing the connection of a replaced agent certificate");
            conn.close(close::NOT_AUTHORIZED.into(), refusal.to_string().as_bytes());
            return;
        }
    }
}

/// The hello: the peer's software (clipped) and the protocol version it speaks.
async fn hello(conn: &quinn::Connection, identity: &Identity) -> Result<(String, u32), String> {
    // The whole hello, not only its stream, has a deadline: a peer that opens the stream and
    // never completes the frame is cut off too.
    let deadline = tokio::time::Instant::now() + crate::limits::HELLO_TIMEOUT;
    let late = || {
        let reason = format!(
            "no hello within {} s",
            crate::limits::HELLO_TIMEOUT.as_secs()
        );
        conn.close(close::LIMIT_REACHED.into(), reason.as_bytes());
        reason
    };
    let accept = tokio::time::timeout_at(deadline, conn.accept_bi());
    let (mut send, mut recv) = match accept.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(fleetvault_common::describe_connection_error(&e)),
        Err(_) => return Err(late()),
    };
    let read = read_frame_max(&mut recv, crate::limits::MAX_HELLO_LEN);
    let hello: Hello = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Err("stream closed before hello".into()),
        Ok(Err(e)) => {
            conn.close(close::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
            return Err(format!("bad hello: {e}"));
        }
        Err(_) => return Err(late()),
    };
    if let Some(reason) = unsupported_version(hello.protocol) {
        let _ = write_frame(
            &mut send,
            &HelloReply::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        conn.close(close::VERSION_MISMATCH.into(), reason.as_bytes());
        return Err(reason);
    }
    let welcome = HelloReply::Welcome {
        protocol: hello.protocol,
        software: crate::SOFTWARE.to_owned(),
        identity: identity.to_string(),
    };
    write_frame(&mut send, &welcome)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let software = crate::limits::clip(&hello.software, crate::limits::MAX_SOFTWARE_CHARS);
    Ok((software, hello.protocol))
}

impl Session {
    async fn stream(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let first = tokio::time::timeout(
            crate::limits::FIRST_FRAME_TIMEOUT,
            self.first_frame(&mut recv),
        )
        .await;
        let req: Request = match first {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return self.protocol_error(&e.to_string()),
            Err(_) => return self.too_slow(send, recv).await,
        };
        let result = self.dispatch(req, &mut send, &mut recv).await;
        match result {
            Ok(()) => {}
            Err(Failure::Reply(code, message)) => {
                debug!(?code, %message, "request failed");
                let _ = write_frame(&mut send, &Response::Error { code, message }).await;
            }
            Err(Failure::Protocol(reason)) => return self.protocol_error(&reason),
            Err(Failure::Gone) => return,
        }
        let _ = send.finish();
    }

    /// A stream's first frame (the request): at most [`crate::limits::MAX_REQUEST_LEN`]
    /// bytes, read within this identity's buffer budget.
    async fn first_frame(
        &self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<Request>, FrameError> {
        let Some(len) = read_len(recv, crate::limits::MAX_REQUEST_LEN).await? else {
            return Ok(None);
        };
        let _held = self
            .state
            .limits
            .buffer(&self.identity.to_string(), len)
            .await;
        match read_frame_body::<Request, _>(recv, len).await? {
            Incoming::Message(req) => Ok(Some(req)),
            Incoming::Chunk { id, envelope } => Ok(Some(Request::Chunk {
                id,
                envelope: envelope.to_vec(),
            })),
        }
    }

    /// Cuts off a stream whose request did not arrive in time, telling the peer why.
    async fn too_slow(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let message = format!(
            "no complete request within {} s of opening the stream; stream closed",
            crate::limits::FIRST_FRAME_TIMEOUT.as_secs()
        );
        warn!(peer = %self.identity, reason = %message, "request stream cut off");
        let _ = recv.stop(close::LIMIT_REACHED.into());
        let reply = Response::Error {
            code: ErrorCode::BadRequest,
            message,
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), write_frame(&mut send, &reply)).await;
        let _ = send.finish();
    }

    fn protocol_error(&self, reason: &str) {
        warn!(%reason, "malformed frame; closing the connection");
        self.conn
            .close(close::PROTOCOL_ERROR.into(), reason.as_bytes());
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Failure> {
        match req.upgrade() {
            Request::Missing { ids } => self.missing(ids, send).await,
            Request::PutChunks { snapshot, count } => {
                self.put_chunks(snapshot, count, send, recv).await
            }
            Request::Begin(b) => self.begin(b, send).await,
            Request::Commit(c) => self.commit(c, send).await,
            Request::Abort { snapshot, reason } => self.abort(snapshot, &reason, send).await,
            Request::Read { snapshot, part } => self.read(snapshot, part, send).await,
            Request::ListSnapshots(mut filter) => {
                self.require_any(&[Role::Operator, Role::Agent])?;
                if self.identity.role != Role::Operator {
                    filter.agent = Some(self.identity.name.clone());
                }
                let list = self.state.catalog.list(&filter)?;
                Ok(write_frame(send, &Response::Snapshots(list)).await?)
            }
            Request::ListAgents => {
                self.require(Role::Operator)?;
                let list = self.state.agent_infos()?;
                Ok(write_frame(send, &Response::Agents(list)).await?)
            }
            Request::Register { sources } => {
                self.require(Role::Agent)?;
                crate::limits::check_sources(&sources).map_err(|e| self.over_limit(e))?;
                let s = sources.clone();
                self.state
                    .catalog
                    .touch_agent(self.name(), |r| r.sources = s)?;
                self.state.live.register(
                    self.name(),
                    self.conn.clone(),
                    sources,
                    self.software.clone(),
                    self.protocol,
                );
                info!(agent = self.name(), "agent is live");
                Ok(write_frame(send, &Response::Ok).await?)
            }
            Request::PushBackup { agent, source } => {
                self.require(Role::Operator)?;
                // Operators' backups count against the same limit as the jobs'.
                let _slot = self
                    .state
                    .slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| Failure::Reply(ErrorCode::Internal, e.to_string()))?;
                self.state.live.push_backup(&agent, source, send).await
            }
            Request::PushRestore {
                snapshot,
                agent,
                options,
            } => {
                self.require(Role::Operator)?;
                self.require_completed(snapshot)?;
                let grants = self.restore_grants(snapshot).await?;
                let push = Push::Restore { snapshot, options };
                self.state
                    .live
                    .push_restore(&agent, &grants, push, send)
                    .await
            }
            Request::V1PushRestore { .. } | Request::V1PushRestoreInto { .. } => Err(
                Failure::Protocol("a version-1 request was not upgraded".into()),
            ),
            Request::Describe {
                snapshot,
                db_type,
                db_version,
                database,
            } => {
                self.require(Role::Agent)?;
                self.require_running(snapshot)?;
                let clip = |s: String| s.chars().take(256).collect::<String>();
                let mut rec = self.state.catalog.get(snapshot)?;
                rec.db_type = Some(clip(db_type));
                rec.db_version = db_version.map(clip);
                rec.database = Some(clip(database));
                self.state.catalog.begin(&rec)?;
                Ok(write_frame(send, &Response::Ok).await?)
            }
            Request::RunJob { job } => {
                self.require(Role::Operator)?;
                let job = self.job(&job)?;
                let reports = crate::jobs::run::run_job(self.state.clone(), job).await;
                Ok(write_frame(send, &Response::Reports(reports)).await?)
            }
            Request::Protect {
                snapshot,
                protected,
            } => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                self.blocking(move || crate::jobs::snapshots::protect(&st, snapshot, protected))
                    .await?;
                Ok(write_frame(send, &Response::Ok).await?)
            }
            Request::Delete { snapshot } => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                self.blocking(move || crate::jobs::snapshots::delete(&st, snapshot))
                    .await?;
                info!(snapshot = %snapshot, "snapshot deleted by an operator");
                Ok(write_frame(send, &Response::Ok).await?)
            }
            Request::Forget { job, dry_run } => {
                self.require(Role::Operator)?;
                let job = self.job(&job)?;
                let st = self.state.clone();
                let decisions = self
                    .blocking(move || crate::jobs::snapshots::forget(&st, &job, dry_run))
                    .await?;
                Ok(write_frame(send, &Response::Retention(decisions)).await?)
            }
            Request::Gc => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                let min_age = std::time::Duration::from_secs(self.state.gc_min_age_secs());
                let report = self
                    .blocking(move || crate::jobs::gc::collect(&st, min_age))
                    .await?;
                Ok(write_frame(send, &Response::GcDone(report)).await?)
            }
            Request::Verify { snapshot } => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                let progress = Arc::new(crate::jobs::verify::VerifyProgress::default());
                let p = progress.clone();
                let run = self
                    .blocking(move || crate::jobs::verify::verify_with_progress(&st, snapshot, &p));
                tokio::pin!(run);
                // Snapshots verified of how many, every second, before the results.
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let results = loop {
                    tokio::select! {
                        done = &mut run => break done?,
                        _ = tick.tick() => {
                            use std::sync::atomic::Ordering::Relaxed;
                            let bytes = progress.done.load(Relaxed);
                            let total = Some(progress.total.load(Relaxed));
                            write_frame(send, &Response::Progress(Progress { bytes, total })).await?;
                        }
                    }
                };
                Ok(write_frame(send, &Response::Verified(results)).await?)
            }
            Request::ReplicaHave { ids } => self.replica_have(ids, send).await,
            Request::ReplicaBegin { snapshot } => self.replica_begin(snapshot, send).await,
            Request::ReplicaCommit { record } => self.replica_commit(*record, send).await,
            Request::Replicate { replica } => {
                self.require(Role::Operator)?;
                let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let run = crate::replicate::run_now(
                    self.state.clone(),
                    replica.as_deref(),
                    progress.clone(),
                );
                tokio::pin!(run);
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let reports = loop {
                    tokio::select! {
                        done = &mut run => break done,
                        _ = tick.tick() => {
                            let bytes = progress.load(std::sync::atomic::Ordering::Relaxed);
                            write_frame(send, &Response::Progress(Progress { bytes, total: None })).await?;
                        }
                    }
                }
                .map_err(Failure::from)?;
                Ok(write_frame(send, &Response::Replicated(reports)).await?)
            }
            Request::ListReplicas => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                let list = self
                    .blocking(move || crate::replicate::statuses(&st))
                    .await?;
                Ok(write_frame(send, &Response::Replicas(list)).await?)
            }
            Request::Promote => {
                self.require(Role::Operator)?;
                let st = self.state.clone();
                let (retired_peers, agents) =
                    self.blocking(move || super::replica::promote(&st)).await?;
                Ok(write_frame(
                    send,
                    &Response::Promoted {
                        retired_peers,
                        agents,
                    },
                )
                .await?)
            }
            Request::Chunk { .. } => Err(Failure::Protocol(
                "chunk frame outside a PutChunks stream".into(),
            )),
        }
    }
}
