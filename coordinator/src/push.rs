//! Live agents and the work pushed to them: an operator's backup or restore is sent to the
//! agent's long-lived connection, and its progress and result are relayed back.
//!
//! A pushed restore of another agent's snapshot (cross-server restore) grants the target
//! agent read access to that one snapshot for the duration of the job.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use fleetvault_common::protocol::frame::{read_frame, write_frame};
use fleetvault_common::protocol::{ErrorCode, Push, PushReply, Response, SourceInfo};
use fleetvault_common::{JobReport, SnapshotId};
use tracing::{info, warn};

use crate::error::Failure;

struct LiveAgent {
    conn: quinn::Connection,
    /// The protocol version its connection speaks: pushes take that version's shapes.
    protocol: u32,
    sources: Vec<SourceInfo>,
    version: String,
    grants: HashSet<SnapshotId>,
}

/// Agents connected with `fleetvault-agent run`.
#[derive(Default)]
pub(crate) struct LiveAgents {
    agents: Mutex<HashMap<String, LiveAgent>>,
    /// `job_timeout_secs` of `coordinator.toml`; 0 until configured (then the default).
    job_timeout_secs: std::sync::atomic::AtomicU64,
}

/// What a live agent reports, for listings.
pub(crate) struct LiveInfo {
    pub(crate) sources: Vec<SourceInfo>,
    pub(crate) version: String,
}

impl LiveAgents {
    /// Takes `job_timeout_secs` from `coordinator.toml` (the default when unset).
    pub(crate) fn set_job_timeout_secs(&self, secs: Option<u64>) {
        let secs = secs.unwrap_or(crate::limits::DEFAULT_JOB_TIMEOUT_SECS);
        self.job_timeout_secs
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long a pushed job may run before it is abandoned.
    fn job_timeout(&self) -> std::time::Duration {
        match self
            .job_timeout_secs
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => std::time::Duration::from_secs(crate::limits::DEFAULT_JOB_TIMEOUT_SECS),
            secs => std::time::Duration::from_secs(secs),
        }
    }
    /// An agent's link is up (replacing an older link of the same agent).
    pub(crate) fn register(
        &self,
        name: &str,
        conn: quinn::Connection,
        sources: Vec<SourceInfo>,
        version: String,
        protocol: u32,
    ) {
        let mut agents = self.agents.lock().expect("live lock");
        agents.insert(
            name.to_owned(),
            LiveAgent {
                conn,
                protocol,
                sources,
                version,
                grants: HashSet::new(),
            },
        );
    }

    /// A connection ended; forget the agent if that was its live link.
    pub(crate) fn remove(&self, name: &str, conn_id: usize) {
        let mut agents = self.agents.lock().expect("live lock");
        if agents
            .get(name)
            .is_some_and(|a| a.conn.stable_id() == conn_id)
        {
            agents.remove(name);
            info!(agent = name, "agent link down");
        }
    }

    /// Whether `name` is live, and what it reported.
    pub(crate) fn info(&self, name: &str) -> Option<LiveInfo> {
        let agents = self.agents.lock().expect("live lock");
        agents.get(name).map(|a| LiveInfo {
            sources: a.sources.clone(),
            version: a.version.clone(),
        })
    }

    /// Names of the live agents.
    pub(crate) fn names(&self) -> Vec<String> {
        self.agents
            .lock()
            .expect("live lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Whether an operator's pushed restore lets `agent` read `snapshot`.
    pub(crate) fn granted(&self, agent: &str, snapshot: SnapshotId) -> bool {
        let agents = self.agents.lock().expect("live lock");
        agents
            .get(agent)
            .is_some_and(|a| a.grants.contains(&snapshot))
    }

    /// The agent's live link and the protocol version it speaks.
    fn conn(&self, agent: &str) -> Result<Link, Failure> {
        let agents = self.agents.lock().expect("live lock");
        let link = |a: &LiveAgent| Link {
            conn: a.conn.clone(),
            protocol: a.protocol,
        };
        agents.get(agent).map(link).ok_or_else(|| {
            Failure::Reply(
                ErrorCode::AgentOffline,
                format!("agent {agent} is not connected (is `fleetvault-agent run` running?)"),
            )
        })
    }

    fn set_grant(&self, agent: &str, snapshot: SnapshotId, on: bool) {
        let mut agents = self.agents.lock().expect("live lock");
        if let Some(a) = agents.get_mut(agent) {
            if on {
                a.grants.insert(snapshot);
            } else {
                a.grants.remove(&snapshot);
            }
        }
    }

    /// Pushes a backup of `source` to `agent`, relaying progress to `reply`.
    pub(crate) async fn push_backup(
        &self,
        agent: &str,
        source: String,
        reply: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        let conn = self.conn(agent)?;
        info!(agent, %source, "pushing backup");
        let push = Push::Backup { source, job: None };
        relay(agent, &conn, &push, reply, self.job_timeout()).await
    }

    /// Runs a backup of `source` on `agent` for `job` and waits for its report.
    pub(crate) async fn run_backup(
        &self,
        agent: &str,
        source: String,
        job: Option<String>,
    ) -> Result<JobReport, Failure> {
        let conn = self.conn(agent)?;
        info!(agent, %source, ?job, "starting backup");
        let push = Push::Backup { source, job };
        exchange(agent, &conn, &push, None, self.job_timeout()).await
    }

    /// Pushes a restore (`Push::Restore`) of `snapshot` to `agent`,
    /// granting it read access to that snapshot for the job, and relays progress to `reply`.
    pub(crate) async fn push_restore(
        &self,
        agent: &str,
        snapshots: &[SnapshotId],
        push: Push,
        reply: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        let conn = self.conn(agent)?;
        info!(agent, snapshots = ?snapshots, "pushing restore");
        for s in snapshots {
            self.set_grant(agent, *s, true);
        }
        let result = relay(agent, &conn, &push, reply, self.job_timeout()).await;
        for s in snapshots {
            self.set_grant(agent, *s, false);
        }
        result
    }
}

/// A live agent's connection and the protocol version it speaks.
struct Link {
    conn: quinn::Connection,
    protocol: u32,
}

/// Sends `push` on a new stream of the agent's connection and relays its replies.
async fn relay(
    agent: &str,
    conn: &Link,
    push: &Push,
    reply: &mut quinn::SendStream,
    limit: std::time::Duration,
) -> Result<(), Failure> {
    let report = exchange(agent, conn, push, Some(reply), limit).await?;
    Ok(write_frame(reply, &Response::JobDone(report)).await?)
}

/// [`exchange_unbounded`] within `limit` (`job_timeout_secs`): past it the job is abandoned
/// (its stream is dropped, which stops it, so the agent's next reply fails), which frees the
/// backup slot it holds, and it fails with the reason.
async fn exchange(
    agent: &str,
    conn: &Link,
    push: &Push,
    reply: Option<&mut quinn::SendStream>,
    limit: std::time::Duration,
) -> Result<JobReport, Failure> {
    let run = exchange_unbounded(agent, conn, push, reply);
    match tokio::time::timeout(limit, run).await {
        Ok(result) => result,
        Err(_) => {
            let reason = format!(
                "agent {agent} did not finish the job within {} s (job_timeout_secs); the job was abandoned",
                limit.as_secs()
            );
            warn!(agent, %reason, "pushed job timed out");
            Err(Failure::Reply(ErrorCode::JobFailed, reason))
        }
    }
}

/// Sends `push` and waits for the agent's result, forwarding progress to `reply` if given.
async fn exchange_unbounded(
    agent: &str,
    link: &Link,
    push: &Push,
    mut reply: Option<&mut quinn::SendStream>,
) -> Result<JobReport, Failure> {
    let lost = |e: &dyn std::fmt::Display| {
        Failure::Reply(
            ErrorCode::JobFailed,
            format!("agent {agent} disconnected during the job: {e}"),
        )
    };
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| lost(&e))?;
    let frame = push.frame_for(link.protocol);
    write_frame(&mut send, &frame).await.map_err(|e| lost(&e))?;
    let _ = send.finish();
    loop {
        match read_frame::<PushReply, _>(&mut recv).await {
            Ok(Some(PushReply::Progress(p))) => {
                if let Some(r) = reply.as_deref_mut() {
                    write_frame(r, &Response::Progress(p)).await?;
                }
            }
            Ok(Some(PushReply::Done(report))) => {
                info!(agent, status = %report.status, "pushed job finished");
                return Ok(report);
            }
            Ok(None) => return Err(lost(&"stream ended without a result")),
            Err(e) => {
                warn!(agent, error = %e, "bad reply from agent");
                return Err(lost(&e));
            }
        }
    }
}
