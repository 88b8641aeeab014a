//! Fleet jobs: what runs on a schedule (`[[jobs]]` in `coordinator.toml`) and the policies
//! applied after each run.
//!
//! ```toml
//! [[jobs]]
//! name = "nightly"
//! agents = ["chat-*"]      # names or globs
//! sources = ["*"]          # names or globs
//! schedule = "0 2 * * *"   # cron: 5 fields, or 6 with seconds first (UTC)
//! [jobs.retention]
//! keep_daily = 7
//! ```

pub(crate) mod gc;
pub(crate) mod prune;
pub(crate) mod retention;
pub(crate) mod scheduler;
pub(crate) mod verify;

use std::str::FromStr;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

pub(crate) use retention::Policy;

/// One `[[jobs]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobConfig {
    pub(crate) name: String,
    pub(crate) agents: Vec<String>,
    #[serde(default = "all")]
    pub(crate) sources: Vec<String>,
    pub(crate) schedule: String,
    #[serde(default)]
    pub(crate) retention: Policy,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

pub(crate) fn globs(patterns: &[String], key: &str) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("key `{key}`: bad glob {p:?}: {e}"))?);
    }
    b.build().map_err(|e| format!("key `{key}`: {e}"))
}

impl JobConfig {
    /// Checks the schedule and the globs.
    pub(crate) fn validate(&self) -> Result<(), String> {
        parse_schedule(&self.schedule).map_err(|e| format!("key `schedule`: {e}"))?;
        if self.agents.is_empty() {
            return Err("key `agents` is empty".into());
        }
        globs(&self.agents, "agents")?;
        globs(&self.sources, "sources")?;
        Ok(())
    }

    /// Whether this job backs up `source` of `agent`.
    pub(crate) fn matches(&self, agent: &str, source: &str) -> bool {
        let (Ok(a), Ok(s)) = (
            globs(&self.agents, "agents"),
            globs(&self.sources, "sources"),
        ) else {
            return false;
        };
        a.is_match(agent) && s.is_match(source)
    }

    /// Whether this job names `agent` at all.
    pub(crate) fn matches_agent(&self, agent: &str) -> bool {
        globs(&self.agents, "agents").is_ok_and(|a| a.is_match(agent))
    }
}

/// Parses a cron expression: 5 fields (minute hour day month weekday), or 6 with seconds
/// first. Weekdays are 0-7 with 0 and 7 Sunday, or names, as in crontab(5).
pub(crate) fn parse_schedule(expr: &str) -> Result<cron::Schedule, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let mut fields: Vec<String> = match fields.len() {
        5 => std::iter::once("0")
            .chain(fields)
            .map(str::to_owned)
            .collect(),
        6 => fields.into_iter().map(str::to_owned).collect(),
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; expected 5, or 6 with seconds first"
            ))
        }
    };
    fields[5] = crontab_weekdays(&fields[5])?;
    cron::Schedule::from_str(&fields.join(" ")).map_err(|e| {
        // The cron crate's message repeats the expression with a caret line; its last line
        // says what is wrong.
        let e = e.to_string();
        let why = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        format!("{expr:?}: {}", why.trim())
    })
}

/// The next run of `schedule` after `from` (the last run, or the scheduler's start); an
/// occurrence already missed (coordinator down or busy) is skipped for the next one from `now`.
pub(crate) fn next_due(
    schedule: &cron::Schedule,
    from: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = schedule.after(&from).next()?;
    if t + chrono::Duration::seconds(1) < now {
        schedule.after(&now).next()
    } else {
        Some(t)
    }
}

/// crontab weekdays (0-7, Sunday 0 or 7) to the cron crate's (1-7, Sunday 1).
fn crontab_weekdays(field: &str) -> Result<String, String> {
    let map = |n: &str| -> Result<String, String> {
        match n.parse::<u32>() {
            Ok(d) if d <= 7 => Ok(((d % 7) + 1).to_string()),
            Ok(d) => Err(format!("weekday {d} is not 0-7")),
            Err(_) => Ok(n.to_owned()),
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((a, b)) => format!("{}-{}", map(a)?, map(b)?),
                None => map(range)?,
            };
            Ok(match step {
                Some(s) => format!("{range}/{s}"),
                None => range,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|v| v.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Utc};

    #[test]
    fn schedules_with_five_and_six_fields() {
        let t = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        let s = parse_schedule("0 2 * * *").unwrap();
        let next = s.after(&t).next().unwrap();
        assert_eq!((next.day(), next.hour(), next.minute()), (2, 2, 0));
        let s = parse_schedule("*/5 * * * * *").unwrap();
        assert_eq!(s.after(&t).next().unwrap().second(), 5);
        // crontab weekday 1 is Monday; 2026-12-07 is a Monday.
        let s = parse_schedule("30 4 * * 1").unwrap();
        let next = s.after(&t).next().unwrap();
        assert_eq!((next.day(), next.weekday()), (7, chrono::Weekday::Mon));
        assert!(parse_schedule("0 2 * *").is_err());
        assert!(parse_schedule("0 2 * * 9").is_err());
        let e = parse_schedule("0 99 * * *").unwrap_err();
        assert!(!e.contains('\n') && e.contains("99"), "{e}");
    }

    #[test]
    fn jobs_match_agents_and_sources_by_glob() {
        let job = JobConfig {
            name: "nightly".into(),
            agents: vec!["chat-*".into()],
            sources: vec!["*-db".into()],
            schedule: "0 2 * * *".into(),
            retention: Policy::default(),
        };
        assert!(job.validate().is_ok());
        assert!(job.matches("chat-01", "mattermost-db"));
        assert!(!job.matches("web-01", "mattermost-db"));
        assert!(!job.matches("chat-01", "uploads"));
    }
}

/// Runs of a job, retention, deletion and protection: the operator's fleet operations.
pub(crate) mod ops {
    use std::collections::BTreeMap;

    use fleetvault_common::protocol::{JobReport, RetentionDecision, SnapshotFilter};
    use fleetvault_common::{ChunkerParams, SnapshotId, SnapshotRecord, SnapshotStatus};
    use tracing::{info, warn};

    use super::retention::{apply, Candidate};
    use super::{JobConfig, Policy};
    use crate::catalog::CatalogError;
    use crate::State;

    /// Applies `job`'s retention to its completed snapshots, per agent and source; deletes
    /// what it forgets unless `dry_run`.
    pub(crate) fn forget(
        state: &State,
        job: &JobConfig,
        dry_run: bool,
    ) -> Result<Vec<RetentionDecision>, String> {
        let filter = SnapshotFilter {
            job: Some(job.name.clone()),
            status: Some("completed".into()),
            ..SnapshotFilter::default()
        };
        let records = state.catalog.list(&filter).map_err(|e| e.to_string())?;
        let decisions = retain(
            state,
            &job.retention,
            &records,
            dry_run,
            &format!("job {}", job.name),
        )?;
        if !dry_run {
            // Failed runs are not snapshots to keep: only the newest few of each agent the
            // job covers stay, whatever job they name (an agent chooses that name).
            super::prune::prune_failed(state, |agent| job.matches_agent(agent))?;
        }
        Ok(decisions)
    }

    /// On a replica: applies `policy` to the snapshots received from peer `peer`.
    pub(crate) fn forget_received(
        state: &State,
        peer: &str,
        policy: &Policy,
    ) -> Result<Vec<RetentionDecision>, String> {
        let filter = SnapshotFilter {
            status: Some("completed".into()),
            ..SnapshotFilter::default()
        };
        let mut records = state.catalog.list(&filter).map_err(|e| e.to_string())?;
        let mut from_peer = Vec::new();
        for r in records.drain(..) {
            if state
                .catalog
                .origin(r.id)
                .map_err(|e| e.to_string())?
                .as_deref()
                == Some(peer)
            {
                from_peer.push(r);
            }
        }
        retain(state, policy, &from_peer, false, &format!("peer {peer}"))
    }

    /// Applies `policy` to `records` per agent and source; `what` names the policy in logs.
    fn retain(
        state: &State,
        policy: &Policy,
        records: &[SnapshotRecord],
        dry_run: bool,
        what: &str,
    ) -> Result<Vec<RetentionDecision>, String> {
        let mut groups: BTreeMap<(String, String), Vec<&SnapshotRecord>> = BTreeMap::new();
        // A bundle's parts go with their bundle, never on their own.
        for r in records.iter().filter(|r| !crate::bundle::is_part(r)) {
            groups
                .entry((r.agent.clone(), r.source.clone()))
                .or_default()
                .push(r);
        }
        let mut out = Vec::new();
        for ((agent, source), recs) in groups {
            let candidates: Vec<Candidate<SnapshotId>> = recs
                .iter()
                .map(|r| Candidate {
                    id: r.id,
                    time_ms: r.started_ms,
                    protected: r.protected,
                })
                .collect();
            for d in apply(policy, &candidates) {
                let rec = recs
                    .iter()
                    .find(|r| r.id == d.id)
                    .expect("decided ids come from recs");
                if !d.keep() && !dry_run {
                    delete(state, d.id).map_err(|e| format!("forgetting {}: {e}", d.id))?;
                    info!(snapshot = %d.id, policy = %what, "forgotten by retention");
                }
                out.push(RetentionDecision {
                    snapshot: d.id,
                    agent: agent.clone(),
                    source: source.clone(),
                    started_ms: rec.started_ms,
                    keep: d.keep(),
                    reasons: d.reasons,
                });
            }
        }
        Ok(out)
    }

    /// Deletes a snapshot record: first from the store (so a rebuilt catalog never brings it
    /// back), then from the catalog. Its chunks go at the next garbage collection.
    pub(crate) fn delete(state: &State, id: SnapshotId) -> Result<(), String> {
        let rec = state.catalog.get(id).map_err(|e| e.to_string())?;
        if matches!(
            rec.status,
            SnapshotStatus::Running | SnapshotStatus::Pending
        ) {
            return Err(format!(
                "snapshot {id} is {}; it cannot be deleted now",
                rec.status.name()
            ));
        }
        if rec.protected {
            return Err(format!("snapshot {id} is protected; unprotect it first"));
        }
        // A bundle goes first, then its parts: a listed bundle never misses a part.
        let parts = if rec.status == SnapshotStatus::Completed {
            crate::bundle::parts(state, &rec)?
        } else {
            Vec::new()
        };
        let mut present = Vec::new();
        for part in parts {
            match state.catalog.get(part) {
                Ok(p) if p.protected => {
                    return Err(format!(
                        "part {part} of bundle {id} is protected; unprotect it first"
                    ))
                }
                Ok(_) => present.push(part),
                Err(CatalogError::NotFound(_)) => {}
                Err(e) => return Err(format!("bundle {id}: part {part}: {e}")),
            }
        }
        remove(state, id)?;
        for part in present {
            remove(state, part)?;
        }
        Ok(())
    }

    /// Removes one snapshot record: store first (a rebuilt catalog never brings it back).
    fn remove(state: &State, id: SnapshotId) -> Result<(), String> {
        // A snapshot received from a primary stays gone: the next sync must not send it again.
        if state
            .catalog
            .origin(id)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            state.catalog.tombstone(id).map_err(|e| e.to_string())?;
        }
        state.store.remove_record(id).map_err(|e| e.to_string())?;
        state.catalog.delete(id).map_err(|e| e.to_string())
    }

    /// Sets or clears a snapshot's protection (in its store record too); a bundle's parts
    /// with it.
    pub(crate) fn protect(state: &State, id: SnapshotId, on: bool) -> Result<(), String> {
        let rec = state.catalog.get(id).map_err(|e| e.to_string())?;
        if rec.status == SnapshotStatus::Completed {
            for part in crate::bundle::parts(state, &rec)? {
                protect_one(state, part, on)?;
            }
        }
        protect_one(state, id, on)
    }

    fn protect_one(state: &State, id: SnapshotId, on: bool) -> Result<(), String> {
        let mut rec = state.catalog.get(id).map_err(|e| e.to_string())?;
        rec.protected = on;
        if rec.status == SnapshotStatus::Completed {
            state.store.write_record(&rec).map_err(|e| e.to_string())?;
        }
        state.catalog.update(&rec).map_err(|e| e.to_string())
    }

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
                            error: Some(e),
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
}
