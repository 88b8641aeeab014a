//! The scheduler: starts each job at its cron times (UTC), garbage collection at
//! `gc_schedule` and verification at `verify_schedule`. One run of a job at a time: an occurrence that finds the previous run still
//! going is skipped with a log line, as is one missed while the coordinator was down, and a
//! garbage collection that finds another one running (an operator's `gc`). The job
//! list is re-read when `reload` is notified (SIGHUP).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{ops, parse_schedule};
use crate::State;

/// The GC's pseudo job name in the schedule.
const GC: &str = "\0gc";
/// Scheduled verification's pseudo job name.
const VERIFY: &str = "\0verify";

/// Runs until `token` is cancelled; spawned runs are tracked by `tracker`.
pub(crate) async fn run(
    state: Arc<State>,
    gc: Option<(String, Duration)>,
    verify: Option<String>,
    token: CancellationToken,
    reload: Arc<Notify>,
    tracker: TaskTracker,
) {
    let start = crate::clock::now_utc();
    let mut last: HashMap<String, DateTime<Utc>> = HashMap::new();
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let now = crate::clock::now_utc();
        let mut entries: Vec<(String, String)> = state
            .jobs()
            .into_iter()
            .map(|j| (j.name, j.schedule))
            .collect();
        if let Some((schedule, _)) = &gc {
            entries.push((GC.to_owned(), schedule.clone()));
        }
        if let Some(schedule) = &verify {
            entries.push((VERIFY.to_owned(), schedule.clone()));
        }
        let mut next: Option<(DateTime<Utc>, String)> = None;
        for (name, schedule) in entries {
            let Ok(s) = parse_schedule(&schedule) else {
                continue;
            };
            let from = last.get(&name).copied().unwrap_or(start);
            let Some(t) = super::next_due(&s, from, now) else {
                continue;
            };
            if next.as_ref().is_none_or(|(best, _)| t < *best) {
                next = Some((t, name));
            }
        }
        let Some((due, name)) = next else {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = reload.notified() => continue,
            }
        };
        let wait = (due - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = reload.notified() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        last.insert(name.clone(), due);
        if name == GC {
            let min_age = gc.as_ref().map_or(Duration::from_secs(3600), |g| g.1);
            let st = state.clone();
            tracker.spawn(async move {
                match tokio::task::spawn_blocking(move || super::gc::collect(&st, min_age)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e == super::gc::ALREADY_RUNNING => {
                        info!("garbage collection already running (started by an operator); skipping this occurrence")
                    }
                    Ok(Err(e)) => warn!(error = %e, "scheduled garbage collection failed"),
                    Err(e) => warn!(error = %e, "garbage collection panicked"),
                }
            });
            continue;
        }
        let Some(job) = state.jobs().into_iter().find(|j| j.name == name) else {
            continue;
        };
        if !running.lock().expect("running lock").insert(name.clone()) {
            warn!(job = %name, "previous run still going; skipping this occurrence");
            continue;
        }
        info!(job = %name, due = %due, "starting scheduled job");
        let (st, running) = (state.clone(), running.clone());
        tracker.spawn(async move {
            ops::run_job(st, job).await;
            running.lock().expect("running lock").remove(&name);
        });
    }
}
