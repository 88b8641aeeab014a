//! Running a job: its backups on every matching live agent (failed runs recorded for the
//! others), then its retention.

use fleetvault_common::protocol::JobReport;
use fleetvault_common::{ChunkerParams, SnapshotRecord, SnapshotStatus};
use tracing::{info, warn};

use crate::catalog::CatalogError;
use crate::config::JobConfig;
use crate::jobs::snapshots::forget;
use crate::State;

/// Records a run that could not start (agent offline): listed `failed` with the reason.
pub(crate) fn record_failed_run(
    state: &State,
    agent: &str,
    source: &str,
    kind: &str,
    job: &str,
    reason: &str,
) -> Result<SnapshotRecord, CatalogError> {
    let status = SnapshotStatus::Failed {
        reason: reason.to_owned(),
    };
    record_run(state, agent, source, kind, job, status)
}

/// Records a run of `job` that holds no data: failed before it started, or pending.
fn record_run(
    state: &State,
    agent: &str,
    source: &str,
    kind: &str,
    job: &str,
    status: SnapshotStatus,
) -> Result<SnapshotRecord, CatalogError> {
    let now = crate::clock::now_ms();
    let finished = matches!(status, SnapshotStatus::Failed { .. });
    let mut rec = SnapshotRecord::new(
        state.catalog.next_id(),
        agent,
        source,
        kind,
        ChunkerParams::default(),
        now,
        status,
    );
    rec.ended_ms = finished.then_some(now);
    rec.job = Some(job.to_owned());
    state.catalog.finish(&rec)?;
    Ok(rec)
}

/// Runs `job` now: a backup of every matching source of every matching agent (an offline
/// agent gets a failed run), then the job's retention. Returns every run's report.
pub(crate) async fn run_job(state: std::sync::Arc<State>, job: JobConfig) -> Vec<JobReport> {
    let agents = match state.agent_infos() {
        Ok(a) => a,
        Err(e) => {
            warn!(job = %job.name, error = %e, "cannot list agents");
            return Vec::new();
        }
    };
    let mut reports = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for agent in agents.into_iter().filter(|a| job.matches_agent(&a.name)) {
        for source in agent
            .sources
            .iter()
            .filter(|s| job.matches(&agent.name, &s.name))
        {
            if !agent.connected {
                let reason = "agent offline";
                match record_failed_run(
                    &state,
                    &agent.name,
                    &source.name,
                    &source.kind,
                    &job.name,
                    reason,
                ) {
                    Ok(rec) => {
                        warn!(job = %job.name, agent = %agent.name, source = %source.name, "agent offline");
                        reports.push(JobReport {
                            snapshot_id: rec.id.to_string(),
                            status: "failed".into(),
                            agent: agent.name.clone(),
                            source: source.name.clone(),
                            error: Some(reason.into()),
                            ..JobReport::default()
                        });
                    }
                    Err(e) => warn!(error = %e, "cannot record a failed run"),
                }
                continue;
            }
            let (state, name, src, job_name) = (
                state.clone(),
                agent.name.clone(),
                source.name.clone(),
                job.name.clone(),
            );
            let kind = source.kind.clone();
            tasks.spawn(async move {
                // A free slot, or a `pending` record while waiting for one.
                let permit = match state.slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        let pending = record_run(
                            &state,
                            &name,
                            &src,
                            &kind,
                            &job_name,
                            SnapshotStatus::Pending,
                        );
                        let p = state
                            .slots
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("slots never close");
                        if let Ok(rec) = pending {
                            let _ = state.catalog.delete(rec.id);
                        }
                        p
                    }
                };
                let result = state
                    .live
                    .run_backup(&name, src.clone(), Some(job_name))
                    .await;
                drop(permit);
                match result {
                    Ok(r) => r,
                    Err(e) => JobReport {
                        status: "failed".into(),
                        agent: name,
                        source: src,
                        error: Some(e.to_string()),
                        ..JobReport::default()
                    },
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(r) = done {
            reports.push(r);
        }
    }
    info!(job = %job.name, runs = reports.len(), failed = reports.iter().filter(|r| r.status != "completed").count(), "job run finished");
    if !job.retention.is_empty() {
        let st = state.clone();
        let j = job.clone();
        match tokio::task::spawn_blocking(move || forget(&st, &j, false)).await {
            Ok(Ok(d)) => {
                let gone = d.iter().filter(|d| !d.keep).count();
                if gone > 0 {
                    info!(job = %job.name, forgotten = gone, "retention applied");
                }
            }
            Ok(Err(e)) => warn!(job = %job.name, error = %e, "retention failed"),
            Err(e) => warn!(job = %job.name, error = %e, "retention panicked"),
        }
    }
    reports
}
