//! Offsite replication, the primary's side: which snapshots go to which replica, when, and
//! what the last sync did. The transfer itself is [`send`]; the replica's side of it is
//! `server/replica.rs`.
//!
//! ```toml
//! [[replicas]]
//! name = "offsite"
//! address = "backup.example.net:7443"
//! server_name = "backup.example.net"
//! ca = "replicas/offsite/ca.pem"        # the replica's CA (relative to the data dir)
//! cert = "replicas/offsite/peer.pem"    # the peer certificate it issued to this primary
//! key = "replicas/offsite/peer.key"
//! schedule = "30 3 * * *"               # cron, UTC; omit for `replicate` runs only
//! agents = ["*"]                        # which snapshots: agent, source and job globs
//! ```
//!
//! A failed sync is retried after `retry_base_secs` (default 30), doubling up to an hour, and
//! shows in `fleetvault-coordinator replicas` until a sync succeeds.

mod send;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fleetvault_common::protocol::{ReplicaReport, ReplicaStatus, SnapshotFilter};
use fleetvault_common::SnapshotRecord;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::jobs::{globs, parse_schedule, Policy};
use crate::tasks::Tasks;
use crate::State;

/// The longest wait between retries of a failing sync.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// One `[[replicas]]` table of a primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplicaConfig {
    pub(crate) name: String,
    /// The replica's `HOST:PORT`.
    pub(crate) address: String,
    /// The name in the replica's certificate.
    pub(crate) server_name: String,
    /// The replica's CA certificate, its peer certificate for us and that key: paths relative
    /// to the data dir, or absolute.
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schedule: Option<String>,
    #[serde(default = "all")]
    pub(crate) agents: Vec<String>,
    #[serde(default = "all")]
    pub(crate) sources: Vec<String>,
    /// Only snapshots made by these jobs (globs); absent: every snapshot, by a job or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) jobs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry_base_secs: Option<u64>,
}

/// One `[[peers]]` table of a replica: a primary allowed to send here, and how long what it
/// sent is kept (default: for ever).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerConfig {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) retention: Policy,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

impl ReplicaConfig {
    /// Checks names, schedule and globs.
    pub(crate) fn validate(&self) -> Result<(), String> {
        fleetvault_certs::validate_name(&self.name).map_err(|e| format!("key `name`: {e}"))?;
        if !self.address.contains(':') {
            return Err(format!(
                "key `address`: {:?} is not HOST:PORT",
                self.address
            ));
        }
        if let Some(s) = &self.schedule {
            parse_schedule(s).map_err(|e| format!("key `schedule`: {e}"))?;
        }
        globs(&self.agents, "agents")?;
        globs(&self.sources, "sources")?;
        if let Some(j) = &self.jobs {
            globs(j, "jobs")?;
        }
        Ok(())
    }

    /// Which snapshots go to this replica (the globs compiled once).
    pub(crate) fn selector(&self) -> Result<impl Fn(&SnapshotRecord) -> bool, String> {
        let agents = globs(&self.agents, "agents")?;
        let sources = globs(&self.sources, "sources")?;
        let jobs = self.jobs.as_ref().map(|j| globs(j, "jobs")).transpose()?;
        Ok(move |rec: &SnapshotRecord| {
            agents.is_match(&rec.agent)
                && sources.is_match(&rec.source)
                && jobs
                    .as_ref()
                    .is_none_or(|j| rec.job.as_ref().is_some_and(|name| j.is_match(name)))
        })
    }

    fn backoff(&self, failures: u32) -> Duration {
        let base = Duration::from_secs(self.retry_base_secs.unwrap_or(30).max(1));
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        (base * factor).min(MAX_BACKOFF)
    }
}

/// The completed snapshots `cfg` selects, oldest first.
fn wanted(state: &State, cfg: &ReplicaConfig) -> Result<Vec<SnapshotRecord>, String> {
    let filter = SnapshotFilter {
        status: Some("completed".into()),
        ..SnapshotFilter::default()
    };
    let wants = cfg.selector()?;
    let list = state.catalog.list(&filter).map_err(|e| e.to_string())?;
    Ok(list.into_iter().filter(|r| wants(r)).collect())
}

/// Syncs every configured replica (or the one named) now, one after the other, adding the
/// bytes sent to `progress` as they are acknowledged.
pub(crate) async fn run_now(
    state: Arc<State>,
    only: Option<&str>,
    progress: Arc<AtomicU64>,
) -> Result<Vec<ReplicaReport>, String> {
    let replicas: Vec<ReplicaConfig> = state
        .replicas()
        .into_iter()
        .filter(|r| only.is_none_or(|n| n == r.name))
        .collect();
    if replicas.is_empty() {
        return Err(match only {
            Some(n) => format!("no replica named {n:?} in coordinator.toml"),
            None => "no [[replicas]] in coordinator.toml".into(),
        });
    }
    let mut out = Vec::new();
    for cfg in replicas {
        out.push(sync(state.clone(), &cfg, progress.clone()).await);
    }
    Ok(out)
}

/// One sync of `cfg`, recorded in the catalog; at most one per replica at a time (a second
/// caller waits for the first and then runs its own, which finds little left to send).
pub(crate) async fn sync(
    state: Arc<State>,
    cfg: &ReplicaConfig,
    progress: Arc<AtomicU64>,
) -> ReplicaReport {
    let lock = state.sync_lock(&cfg.name);
    let _guard = lock.lock().await;
    let started_ms = crate::clock::now_ms();
    let mut status = state
        .catalog
        .replica_status(&cfg.name)
        .ok()
        .flatten()
        .unwrap_or_default();
    status.name = cfg.name.clone();
    status.last_attempt_ms = Some(started_ms);
    let _ = state.catalog.put_replica_status(&status);
    let started = std::time::Instant::now();
    let mut report = ReplicaReport {
        replica: cfg.name.clone(),
        ..ReplicaReport::default()
    };
    let result = send::sync(&state, cfg, &mut report, progress).await;
    report.duration_ms = started.elapsed().as_millis() as u64;
    let now = crate::clock::now_ms();
    match result {
        Ok(()) => {
            info!(
                replica = %cfg.name,
                snapshots = report.snapshots,
                already_present = report.already_present,
                chunks = report.chunks,
                bytes = report.bytes,
                ms = report.duration_ms,
                "replica sync finished"
            );
            status.last_success_ms = Some(now);
            status.last_error = None;
            status.failures = 0;
            status.next_retry_ms = None;
        }
        Err(e) => {
            let e = format!("{e:#}");
            status.failures += 1;
            let retry = cfg.backoff(status.failures);
            warn!(replica = %cfg.name, error = %e, failures = status.failures, retry_in_secs = retry.as_secs(), "replica sync failed");
            status.next_retry_ms = Some(now + retry.as_millis() as u64);
            status.last_error = Some(e.clone());
            report.error = Some(e);
        }
    }
    status.last_report = Some(report.clone());
    if let Err(e) = state.catalog.put_replica_status(&status) {
        warn!(replica = %cfg.name, error = %e, "cannot record the sync state");
    }
    report
}

/// Every configured replica with its last sync and its lag.
pub(crate) fn statuses(state: &State) -> Result<Vec<ReplicaStatus>, String> {
    let mut out = Vec::new();
    for cfg in state.replicas() {
        let mut s = state
            .catalog
            .replica_status(&cfg.name)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let sent: HashSet<_> = state
            .catalog
            .replicated(&cfg.name)
            .map_err(|e| e.to_string())?;
        let lagging: Vec<SnapshotRecord> = wanted(state, &cfg)?
            .into_iter()
            .filter(|r| !sent.contains(&r.id))
            .collect();
        s.name = cfg.name.clone();
        s.address = cfg.address.clone();
        s.schedule = cfg.schedule.clone();
        s.lag_snapshots = lagging.len() as u64;
        s.lag_bytes = lagging.iter().map(|r| r.stored_bytes).sum();
        out.push(s);
    }
    Ok(out)
}

fn utc(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_else(crate::clock::now_utc)
}

/// Runs each replica's sync at its cron times and retries failed ones with backoff, until
/// `tasks` is stopped; the syncs are tasks of `tasks` too. Woken by `State::replica_wake` when
/// the configuration changes.
pub(crate) async fn scheduler(state: Arc<State>, tasks: Tasks) {
    let token = tasks.token().clone();
    let start = crate::clock::now_utc();
    let mut last: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
    let busy: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    loop {
        let now = crate::clock::now_utc();
        let mut next: Option<(DateTime<Utc>, ReplicaConfig)> = None;
        for cfg in state.replicas() {
            if busy.lock().expect("busy lock").contains(&cfg.name) {
                continue;
            }
            let retry = state
                .catalog
                .replica_status(&cfg.name)
                .ok()
                .flatten()
                .and_then(|s| s.next_retry_ms)
                .map(utc);
            let cron = cfg.schedule.as_deref().and_then(|s| {
                let from = last.get(&cfg.name).copied().unwrap_or(start);
                crate::jobs::next_due(&parse_schedule(s).ok()?, from, now)
            });
            let due = match (retry, cron) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => continue,
                },
            };
            if next.as_ref().is_none_or(|(best, _)| due < *best) {
                next = Some((due, cfg));
            }
        }
        let wait = next.as_ref().map_or(Duration::from_secs(3600), |(due, _)| {
            (*due - now).to_std().unwrap_or(Duration::ZERO)
        });
        tokio::select! {
            _ = token.cancelled() => return,
            _ = state.replica_wake.notified() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some((due, cfg)) = next else { continue };
        last.insert(cfg.name.clone(), due);
        busy.lock().expect("busy lock").insert(cfg.name.clone());
        info!(replica = %cfg.name, "starting scheduled replica sync");
        let (st, busy) = (state.clone(), busy.clone());
        tasks.spawn(format!("replica sync {}", cfg.name), async move {
            sync(st.clone(), &cfg, Arc::default()).await;
            busy.lock().expect("busy lock").remove(&cfg.name);
            st.replica_wake.notify_one();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetvault_common::{ChunkerParams, SnapshotId, SnapshotStatus};

    fn replica(toml_text: &str) -> ReplicaConfig {
        toml::from_str(&format!(
            "name = \"vault\"\naddress = \"vault:7443\"\nserver_name = \"vault\"\nca = \"c\"\ncert = \"p\"\nkey = \"k\"\n{toml_text}"
        ))
        .unwrap()
    }

    fn rec(agent: &str, source: &str, job: Option<&str>) -> SnapshotRecord {
        let mut r = SnapshotRecord::new(
            SnapshotId(1),
            agent,
            source,
            "files",
            ChunkerParams::default(),
            1,
            SnapshotStatus::Completed,
        );
        r.job = job.map(str::to_owned);
        r
    }

    #[test]
    fn replicas_select_snapshots_by_agent_source_and_job() {
        let all = replica("");
        assert!(all.validate().is_ok());
        assert!(all.selector().unwrap()(&rec("chat-01", "db", None)));
        let some = replica("agents = [\"chat-*\"]\nsources = [\"db\"]\njobs = [\"nightly\"]");
        assert!(some.selector().unwrap()(&rec(
            "chat-01",
            "db",
            Some("nightly")
        )));
        assert!(
            !some.selector().unwrap()(&rec("chat-01", "db", None)),
            "not made by a listed job"
        );
        assert!(!some.selector().unwrap()(&rec(
            "web-01",
            "db",
            Some("nightly")
        )));
        assert!(!some.selector().unwrap()(&rec(
            "chat-01",
            "uploads",
            Some("nightly")
        )));
    }

    #[test]
    fn bad_tables_are_refused_naming_the_key() {
        let e = replica("schedule = \"every day\"").validate().unwrap_err();
        assert!(e.contains("key `schedule`"), "{e}");
        let e = replica("agents = [\"[\"]").validate().unwrap_err();
        assert!(e.contains("key `agents`"), "{e}");
        let mut r = replica("");
        r.address = "vault".into();
        assert!(r.validate().unwrap_err().contains("key `address`"));
        r = replica("");
        r.name = "bad/name".into();
        assert!(r.validate().unwrap_err().contains("key `name`"));
    }

    #[test]
    fn retries_back_off_doubling_up_to_an_hour() {
        let r = replica("retry_base_secs = 10");
        let secs: Vec<u64> = [1, 2, 3, 4, 12, 40]
            .into_iter()
            .map(|n| r.backoff(n).as_secs())
            .collect();
        assert_eq!(secs, [10, 20, 40, 80, 3600, 3600]);
        assert_eq!(replica("").backoff(1).as_secs(), 30);
    }
}
