//! The operator's commands that ask the running coordinator (sled locks the catalog, so
//! listings go through the server): snapshots, agents, backup and restore pushes, retention,
//! gc, verify, download, replication and promotion, each printed as a table or as JSON.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use fleetvault_common::exit::{self, UsageError};
use fleetvault_common::protocol::{Progress, RestoreOptions, SnapshotFilter};
use fleetvault_common::report;
use fleetvault_common::{Client, ClientError, Credentials, JobReport, SnapshotId};

use crate::config::DataDir;

use super::output::{emit, Agents, Forget, Gc, Promote, Replicas, SnapshotChanged, Verify};
use super::{ended_with, print_json, runtime};

/// Connects to the running coordinator with the operator certificate.
async fn operator(root: &Path) -> anyhow::Result<Client> {
    let dir = DataDir::new(root);
    let cfg = dir.load_connect()?;
    let creds = Credentials::load(
        &dir.tls("ca.pem"),
        &dir.tls("operator.pem"),
        &dir.tls("operator.key"),
    )?;
    let address = cfg.local_address()?;
    // The error stays a ClientError (its exit code), one line naming `address`.
    Ok(Client::dial(&creds, &address, &cfg.server_name, crate::SOFTWARE).await?)
}

pub(crate) fn snapshots(
    root: &Path,
    agent: Option<String>,
    source: Option<String>,
    status: Option<String>,
    job: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let filter = SnapshotFilter {
            agent,
            source,
            status,
            job,
        };
        let list = client.list_snapshots(filter).await?;
        client.close().await;
        report::print_snapshots(&list, json)?;
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn agents(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let list = call(root, async |c| c.list_agents().await)?;
    emit(json, &Agents(list.iter().map(Into::into).collect()))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a pushed job, showing its progress, to its result.
async fn follow(
    job: impl AsyncFnOnce(&dyn Fn(Progress)) -> Result<JobReport, ClientError>,
) -> anyhow::Result<JobReport> {
    let bar = report::progress_bar(None);
    let report = job(&|p: Progress| {
        if let (Some(t), None) = (p.total, bar.length()) {
            bar.set_length(t);
        }
        bar.set_position(p.bytes);
    })
    .await;
    bar.finish_and_clear();
    Ok(report?)
}

/// Prints a pushed job's result (its JSON object, or its summary) and picks the exit code:
/// 1 when it failed, 3 when it completed with warnings.
fn finish_job(report: JobReport, json: bool, restore: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&report::job_json(&report))?;
    }
    if report.status != "completed" {
        return Ok(ended_with(
            exit::FAILURE,
            format!(
                "{} failed on agent {}: {}",
                if restore { "restore" } else { "backup" },
                report.agent,
                report.error.as_deref().unwrap_or("unknown error")
            ),
        ));
    }
    if !json {
        println!("{}", report::job_summary(&report, restore));
    }
    // A backup's warnings are files it could not read as they were; a restore's are notes.
    if !restore && !report.warnings.is_empty() {
        return Ok(ended_with(
            exit::WARNINGS,
            format!(
                "{} completed with {}",
                if restore { "restore" } else { "backup" },
                report::plural(report.warnings.len() as u64, "warning", "warnings")
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn push_backup(
    root: &Path,
    agent: &str,
    source: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let (agent, source) = (agent.to_owned(), source.to_owned());
        let report = follow(async |on| client.push_backup(agent, source, on).await).await?;
        client.close().await;
        finish_job(report, json, false)
    })
}

pub(crate) fn push_restore(
    root: &Path,
    snapshot: &str,
    agent: &str,
    options: RestoreOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let snapshot = resolve(root, snapshot, Some(agent), options.source.as_deref())?;
    let agent = agent.to_owned();
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let report =
            follow(async |on| client.push_restore(snapshot, agent, options, on).await).await?;
        client.close().await;
        finish_job(report, json, true)
    })
}

/// One exchange with the running coordinator, on a connection of its own.
fn call<T>(
    root: &Path,
    exchange: impl AsyncFnOnce(&Client) -> Result<T, ClientError>,
) -> anyhow::Result<T> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let reply = exchange(&client).await;
        client.close().await;
        Ok(reply?)
    })
}

/// [`call`] of an exchange whose progress counts `unit` (shown as a bar on a terminal).
fn call_counted<T>(
    root: &Path,
    unit: &str,
    exchange: impl AsyncFnOnce(&Client, &dyn Fn(Progress)) -> Result<T, ClientError>,
) -> anyhow::Result<T> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let bar = report::count_bar(unit);
        let reply = exchange(&client, &|p: Progress| {
            if let Some(t) = p.total {
                bar.set_length(t);
            }
            bar.set_position(p.bytes);
        })
        .await;
        bar.finish_and_clear();
        client.close().await;
        Ok(reply?)
    })
}

/// [`call`] for long work (gc, a job run): a spinner with the elapsed time meanwhile.
fn call_long<T>(
    root: &Path,
    what: &str,
    exchange: impl AsyncFnOnce(&Client) -> Result<T, ClientError>,
) -> anyhow::Result<T> {
    let bar = report::spinner(what);
    let reply = call(root, exchange);
    bar.finish_and_clear();
    reply
}

/// A snapshot named on the command line: full id, unique prefix or `latest` (see
/// [`fleetvault_common::select`]).
fn resolve(
    root: &Path,
    spec: &str,
    agent: Option<&str>,
    source: Option<&str>,
) -> anyhow::Result<SnapshotId> {
    if let Ok(id) = spec.parse() {
        return Ok(id);
    }
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let id = fleetvault_common::select::resolve(&client, spec, agent, source).await;
        client.close().await;
        id
    })
}

pub(crate) fn show(
    root: &Path,
    spec: &str,
    agent: Option<String>,
    source: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let id =
            fleetvault_common::select::resolve(&client, spec, agent.as_deref(), source.as_deref())
                .await?;
        let filter = SnapshotFilter {
            agent: agent.clone(),
            source: source.clone(),
            ..SnapshotFilter::default()
        };
        let list = client.list_snapshots(filter).await?;
        let rec = list
            .into_iter()
            .find(|r| r.id == id)
            .with_context(|| format!("no snapshot {id}"))?;
        let bundle = if rec.kind == crate::bundle::KIND
            && rec.status == fleetvault_common::SnapshotStatus::Completed
        {
            Some(crate::download::bundle_index(&client, id).await?)
        } else {
            None
        };
        client.close().await;
        if json {
            let mut v = report::snapshot_json(&rec);
            v["bundle"] = bundle.clone().unwrap_or(serde_json::Value::Null);
            print_json(&v)?;
        } else {
            print!("{}", report::snapshot_detail(&rec, bundle.as_ref()));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn run_job(root: &Path, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let reports = call_long(
        root,
        &format!("running job {job} on its agents"),
        async |c| c.run_job(job.to_owned()).await,
    )?;
    if json {
        let v: Vec<_> = reports.iter().map(report::job_json).collect();
        print_json(&serde_json::json!(v))?;
    } else {
        for r in &reports {
            match &r.error {
                None => println!("{}", report::job_summary(r, false)),
                Some(e) => println!("{}/{}: failed: {e}", r.agent, r.source),
            }
        }
    }
    let failed = reports.iter().filter(|r| r.status != "completed").count();
    if failed > 0 {
        return Ok(ended_with(
            exit::FAILURE,
            format!("{failed} of {} backups of job {job} failed", reports.len()),
        ));
    }
    let warned = reports.iter().filter(|r| !r.warnings.is_empty()).count();
    if warned > 0 {
        return Ok(ended_with(
            exit::WARNINGS,
            format!(
                "{warned} of {} backups of job {job} completed with warnings",
                reports.len()
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn protect(
    root: &Path,
    snapshot: &str,
    on: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let snapshot = resolve(root, snapshot, None, None)?;
    call(root, async |c| c.protect(snapshot, on).await)?;
    emit(json, &SnapshotChanged::protected(snapshot, on))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn delete(root: &Path, snapshot: &str, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = resolve(root, snapshot, None, None)?;
    call(root, async |c| c.delete(snapshot).await)?;
    emit(json, &SnapshotChanged::deleted(snapshot))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn forget(
    root: &Path,
    job: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let decisions = call(root, async |c| c.forget(job.to_owned(), dry_run).await)?;
    emit(json, &Forget::new(&decisions, dry_run))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn gc(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = call_long(root, "collecting garbage", async |c| c.gc().await)?;
    emit(json, &Gc::from(&r))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn verify(root: &Path, snapshot: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = snapshot.map(|s| resolve(root, s, None, None)).transpose()?;
    let results = call_counted(root, "snapshots verified", async |c, on| {
        c.verify(snapshot, on).await
    })?;
    let out = Verify::new(&results);
    emit(json, &out)?;
    if out.damaged() > 0 {
        // Damage is reported as an error, with exit code 3: the verification itself completed.
        eprintln!(
            "error: {} of {} snapshots are damaged; the next backup of the same data re-uploads the quarantined chunks",
            out.damaged(),
            out.len()
        );
        return Ok(ExitCode::from(exit::WARNINGS));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn download(
    root: &Path,
    snapshot: &str,
    out: &Path,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let to_stdout = out == Path::new("-");
    if to_stdout && json {
        return Err(UsageError(
            "--out - writes the snapshot to stdout: it cannot also carry --json".into(),
        )
        .into());
    }
    if !to_stdout && !force && fs::symlink_metadata(out).is_ok() {
        return Err(UsageError(format!(
            "{} already exists (use --force to replace it)",
            out.display()
        ))
        .into());
    }
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let snapshot = fleetvault_common::select::resolve(&client, snapshot, None, None).await?;
        let target = if to_stdout { None } else { Some(out) };
        let result = crate::download::download(&client, snapshot, target, force).await;
        client.close().await;
        let n = result?;
        if json {
            print_json(&serde_json::json!({
                "status": "completed",
                "snapshot_id": snapshot.to_string(),
                "out": out.display().to_string(),
                "bytes": n,
            }))?;
        } else if to_stdout {
            eprintln!(
                "snapshot {snapshot} written to stdout ({} of content, verified)",
                report::human_bytes(n)
            );
        } else {
            println!(
                "snapshot {snapshot} written to {} ({} of content, verified)",
                out.display(),
                report::human_bytes(n)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn replicate(
    root: &Path,
    replica: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reports = runtime()?.block_on(async {
        let client = operator(root).await?;
        let bar = report::progress_bar(None);
        let reports = client
            .replicate(replica, |p| bar.set_position(p.bytes))
            .await;
        bar.finish_and_clear();
        client.close().await;
        anyhow::Ok(reports?)
    })?;
    if json {
        let v: Vec<_> = reports.iter().map(report::replica_report_json).collect();
        print_json(&serde_json::json!(v))?;
    } else {
        for r in &reports {
            println!("{}", report::replica_summary(r));
        }
    }
    let failed: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    if let Some(first) = failed.first() {
        return Ok(ended_with(
            exit::FAILURE,
            format!(
                "{} of {} replica syncs failed; {}: {}",
                failed.len(),
                reports.len(),
                first.replica,
                first.error.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn replicas(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let list = call(root, async |c| c.list_replicas().await)?;
    emit(json, &Replicas::new(&list))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn promote(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (retired, agents) = call(root, async |c| c.promote().await)?;
    emit(
        json,
        &Promote::new(retired, agents, root.display().to_string()),
    )?;
    Ok(ExitCode::SUCCESS)
}
