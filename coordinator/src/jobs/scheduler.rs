//! The scheduler: starts each job at its cron times (UTC), garbage collection at
//! `gc_schedule` and verification of every completed snapshot at `verify_schedule`. One run of
//! each at a time: an occurrence that finds the previous run still going is skipped with a log
//! line, as is one missed while the coordinator was down, and a garbage collection or
//! verification that finds another one running (an operator's `gc` or `verify`). The jobs and
//! both schedules are re-read from the state when `reload` is notified (SIGHUP).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{parse_schedule, run};
use crate::tasks::Tasks;
use crate::State;

/// What a schedule starts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Entry {
    /// The `[[jobs]]` entry of that name.
    Job(String),
    /// Garbage collection (`gc_schedule`).
    Gc,
    /// Verification of every completed snapshot (`verify_schedule`).
    Verify,
}

/// Every scheduled entry now configured, with its cron expression.
fn entries(state: &State) -> Vec<(Entry, String)> {
    let mut out: Vec<(Entry, String)> = state
        .jobs()
        .into_iter()
        .map(|j| (Entry::Job(j.name), j.schedule))
        .collect();
    let schedules = state.schedules();
    out.extend(schedules.gc.map(|s| (Entry::Gc, s)));
    out.extend(schedules.verify.map(|s| (Entry::Verify, s)));
    out
}

/// Runs until `tasks` is stopped; the runs it starts are tasks of `tasks` too.
pub(crate) async fn run(state: Arc<State>, reload: Arc<Notify>, tasks: Tasks) {
    let token = tasks.token().clone();
    let start = crate::clock::now_utc();
    let mut last: HashMap<Entry, DateTime<Utc>> = HashMap::new();
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let now = crate::clock::now_utc();
        let mut next: Option<(DateTime<Utc>, Entry)> = None;
        for (entry, schedule) in entries(&state) {
            // Checked when the config was loaded; an entry that still fails never runs.
            let Ok(s) = parse_schedule(&schedule) else {
                continue;
            };
            let from = last.get(&entry).copied().unwrap_or(start);
            let Some(t) = super::next_due(&s, from, now) else {
                continue;
            };
            if next.as_ref().is_none_or(|(best, _)| t < *best) {
                next = Some((t, entry));
            }
        }
        let Some((due, entry)) = next else {
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
        last.insert(entry.clone(), due);
        match entry {
            Entry::Gc => start_gc(&state, &tasks),
            Entry::Verify => start_verify(&state, &tasks),
            Entry::Job(name) => {
                let Some(job) = state.jobs().into_iter().find(|j| j.name == name) else {
                    continue;
                };
                if !running.lock().expect("running lock").insert(name.clone()) {
                    warn!(job = %name, "previous run still going; skipping this occurrence");
                    continue;
                }
                info!(job = %name, due = %due, "starting scheduled job");
                let (st, running) = (state.clone(), running.clone());
                tasks.spawn(format!("job {name}"), async move {
                    run::run_job(st, job).await;
                    running.lock().expect("running lock").remove(&name);
                });
            }
        }
    }
}

/// A scheduled garbage collection, off the reactor, with the `gc_min_age_secs` now in force.
fn start_gc(state: &Arc<State>, tasks: &Tasks) {
    let min_age = Duration::from_secs(state.gc_min_age_secs());
    let st = state.clone();
    tasks.spawn("scheduled garbage collection", async move {
        match tokio::task::spawn_blocking(move || super::gc::collect(&st, min_age)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e == super::gc::ALREADY_RUNNING => {
                info!("garbage collection already running (started by an operator); skipping this occurrence")
            }
            Ok(Err(e)) => warn!(error = %e, "scheduled garbage collection failed"),
            Err(e) => warn!(error = %e, "garbage collection panicked"),
        }
    });
}

/// A scheduled verification of every completed snapshot, off the reactor; damaged snapshots
/// are tagged as the operator's `verify` tags them.
fn start_verify(state: &Arc<State>, tasks: &Tasks) {
    let st = state.clone();
    tasks.spawn("scheduled verification", async move {
        match tokio::task::spawn_blocking(move || super::verify::verify_scheduled(&st)).await {
            Ok(None) => {
                info!("a verification is already running (started by an operator); skipping this occurrence")
            }
            Ok(Some(Ok((snapshots, damaged)))) if damaged > 0 => warn!(
                snapshots,
                damaged, "scheduled verification finished: damaged snapshots tagged `damaged`"
            ),
            Ok(Some(Ok((snapshots, damaged)))) => {
                info!(snapshots, damaged, "scheduled verification finished")
            }
            Ok(Some(Err(e))) => warn!(error = %e, "scheduled verification failed"),
            Err(e) => warn!(error = %e, "scheduled verification panicked"),
        }
    });
}
