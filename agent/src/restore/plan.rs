//! The plan of a restore: what `fleetvault-agent restore` (or a pushed restore) does with a
//! snapshot, decided in this one place before anything is touched.
//!
//! - A bundle snapshot: its `before` hooks, the database where the snapshot's own copy of the
//!   application's configuration says, the file parts in place (or under a new root, the
//!   clone's configuration then rewritten), its `after` hooks.
//! - A database snapshot into a database: refused across kinds, into a database that holds
//!   data without `--replace`, or onto an older server; with `--replace`, a safety snapshot
//!   of what is there first.
//! - A command snapshot into its source's `restore_command`; any stream snapshot to a file or
//!   stdout, any files snapshot under a directory (`--target`).
//!
//! Above both `backup` (the safety snapshot) and the rest of `restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use fleetvault_common::protocol::{Progress, RestoreOptions};
use fleetvault_common::{Client, JobReport, SnapshotId, SnapshotKind, SnapshotRecord};

use super::bundle::{database_target, read_index, rewrite, BundleRestore, RestoreReport};
use super::{run, Target};
use crate::bundle::{self, PartRecord};
use crate::config::{AgentConfig, DbSource, SourceConfig, SourceKind};
use crate::db::{self, DbRestore};
use crate::pipe::read::read_record;
use crate::process as hooks;

/// A bundle snapshot restored behind its hooks; `options.target` is the new root of a clone
/// or a move. Parts and hooks are reported in the warnings, one line each.
async fn restore_bundle(
    client: Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    options: &RestoreOptions,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let how = BundleRestore {
        root: options.target.as_ref().map(PathBuf::from),
        database: options.database.clone(),
        replace: options.replace,
    };
    let r = restore_bundle_parts(client.clone(), config, snapshot, &how).await?;
    let mut lines = r.parts.clone();
    lines.extend(r.hooks.iter().filter(|h| !h.ok()).map(|h| h.failure()));
    if let Some(c) = &r.config_rewritten {
        lines.push(format!("configuration rewritten: {c}"));
    }
    if let Some(e) = &r.error {
        bail!(
            "restore of bundle {} (snapshot {snapshot}) failed: {e}",
            r.bundle
        );
    }
    Ok(JobReport {
        snapshot_id: snapshot.to_string(),
        status: "completed".into(),
        agent: client
            .agent_name()
            .map(|n| n.to_string())
            .unwrap_or_default(),
        source: r.bundle.clone(),
        bytes_written: 0,
        duration_ms: started.elapsed().as_millis() as u64,
        warnings: lines,
        restored_to: Some(match &how.root {
            Some(root) => format!("bundle {} under {}", r.bundle, root.display()),
            None => format!("bundle {}", r.bundle),
        }),
        ..JobReport::default()
    })
}

/// Restores `snapshot` into one of this agent's sources (or to `options.target`): the
/// snapshot's own source by default, or `options.source`. Everything is checked before
/// anything is touched: the kinds match, the target database is empty (or `--replace`), the
/// server is not older than the dump's. A replace first takes a safety snapshot of what is
/// there, and a failure says where things stand and how to get it back.
pub(crate) async fn run_into(
    client: Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    options: &RestoreOptions,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> anyhow::Result<JobReport> {
    let rec = read_record(&client, snapshot).await?;
    if rec.kind == SnapshotKind::Bundle {
        return restore_bundle(client, config, snapshot, options).await;
    }
    run_into_plain(client, config, rec, options, progress).await
}

/// [`run_into`] of a snapshot that is not a bundle (`rec` is its record).
pub(crate) async fn run_into_plain(
    client: Arc<Client>,
    config: &AgentConfig,
    rec: SnapshotRecord,
    options: &RestoreOptions,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> anyhow::Result<JobReport> {
    let snapshot = rec.id;
    if rec.kind == SnapshotKind::Bundle {
        bail!("snapshot {snapshot} is a bundle: it cannot be a part of another");
    }
    if let Some(t) = &options.target {
        let target = if t == "-" {
            Target::Stdout
        } else {
            Target::Path(t.into())
        };
        return run(client, snapshot, target, progress).await;
    }
    if rec.kind == SnapshotKind::Files {
        bail!("a files snapshot needs --target DIR");
    }
    let name = options.source.clone().unwrap_or_else(|| rec.source.clone());
    let source = config.source(&name)?;
    let refuse_kinds = || {
        anyhow::anyhow!(
            "snapshot {snapshot} is a {} snapshot and source {name} is {}: restoring across kinds is refused (nothing was touched)",
            rec.kind,
            source.kind_name()
        )
    };
    match &source.kind {
        SourceKind::Files { .. } => bail!("a files snapshot needs --target DIR"),
        SourceKind::Inline { .. } => bail!("source {name} cannot be restored into"),
        SourceKind::Command {
            restore_command, ..
        } => {
            if rec.kind != SnapshotKind::Command {
                return Err(refuse_kinds());
            }
            let cmd = restore_command.clone().with_context(|| {
                format!("source {name} has no restore_command; give --target FILE or --target -")
            })?;
            run(client, snapshot, Target::Command(cmd), progress).await
        }
        SourceKind::Database(db) => {
            if rec.kind.as_str() != db.engine.kind_name() {
                return Err(refuse_kinds());
            }
            let target_db = options
                .database
                .clone()
                .unwrap_or_else(|| db.database.clone());
            let target = db.with_database(&target_db);
            let state = db::inspect(&target)
                .await
                .with_context(|| format!("inspecting the restore target {target_db:?}"))?;
            if db.engine == crate::config::Engine::Postgres {
                db::postgres::restore::check_versions(
                    rec.db_version.as_deref(),
                    state.server_version.as_deref(),
                )?;
            }
            if state.exists && !state.empty && !options.replace {
                bail!(
                    "database {target_db:?} exists and is not empty: add --replace to replace it (a safety snapshot is taken first) or restore under another name with --database NEWNAME"
                );
            }
            let needs_safety = options.replace
                && !options.no_safety_snapshot
                && state.exists
                && (!state.empty || db.engine == crate::config::Engine::Mongodb);
            let progress = Arc::new(progress);
            let safety = if needs_safety {
                let safety_source = SourceConfig {
                    kind: SourceKind::Database(target.clone()),
                    ..source.clone()
                };
                let p = progress.clone();
                let report = crate::backup::run_tagged(
                    client.clone(),
                    &safety_source,
                    None,
                    vec![format!("safety-snapshot-before-restore:{snapshot}")],
                    move |x| p(x),
                )
                .await
                .with_context(|| {
                    format!("taking the safety snapshot of {target_db:?} (nothing was touched)")
                })?;
                tracing::info!(safety = %report.snapshot_id, "safety snapshot taken");
                eprintln!("safety snapshot of {target_db:?}: {}", report.snapshot_id);
                Some(report.snapshot_id)
            } else {
                None
            };
            let format = pg_format_of(&rec);
            let plan = DbRestore {
                db: target,
                format,
                replace: options.replace,
                from_database: rec.database.clone().unwrap_or_else(|| db.database.clone()),
                tag: snapshot.to_string(),
            };
            let p = progress.clone();
            match run(client, snapshot, Target::Database(Box::new(plan)), move |x| p(x)).await {
                Ok(mut report) => {
                    report.safety_snapshot_id = safety;
                    Ok(report)
                }
                Err(e) => Err(match safety {
                    Some(id) => e.context(format!(
                        "the safety snapshot {id} holds {target_db:?} as it was: `fleetvault-agent restore {id} --replace` brings it back"
                    )),
                    None => e,
                }),
            }
        }
    }
}

/// The PostgreSQL dump format a snapshot was taken with (recorded as a tag).
fn pg_format_of(rec: &SnapshotRecord) -> crate::config::PgFormat {
    use crate::config::PgFormat;
    let tag = rec
        .tags
        .iter()
        .find_map(|t| t.strip_prefix(crate::backup::PG_FORMAT_TAG));
    match tag {
        Some("tables") => PgFormat::Tables,
        Some("custom") => PgFormat::Custom,
        _ => PgFormat::Plain,
    }
}

/// Restores bundle snapshot `snapshot` into this agent's bundle of the same name: hooks,
/// every part in order, hooks; a clone's configuration rewritten last.
async fn restore_bundle_parts(
    client: Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    how: &BundleRestore,
) -> anyhow::Result<RestoreReport> {
    let index = read_index(client.clone(), snapshot).await?;
    let bundle = config.bundle(&index.bundle).with_context(|| {
        format!(
            "snapshot {snapshot} is bundle {:?}: restore it on an agent whose agent.toml has that bundle",
            index.bundle
        )
    })?;
    let old_root = index.root.clone().or_else(|| bundle.root.clone());
    if how.root.is_some() && old_root.is_none() {
        bail!(
            "bundle {} has no `root`: --root cannot move it",
            bundle.name
        );
    }
    for p in &index.parts {
        config
            .source(&p.name)
            .with_context(|| format!("bundle {}: part {}", bundle.name, p.name))?;
    }
    let mut report = RestoreReport {
        bundle: bundle.name.clone(),
        error: None,
        parts: Vec::new(),
        hooks: Vec::new(),
        config_rewritten: None,
    };
    let mut v = bundle::vars(bundle);
    v.push(("FLEETVAULT_SNAPSHOT_ID", snapshot.to_string()));
    let (logs, mut failure) = hooks::run_all(&bundle.before, "restore-before", &v, true).await;
    report.hooks.extend(logs);
    let mut current = String::new();
    // The database first, then the files in their order (data, config, …): the database
    // goes where the snapshot's own copy of the application's configuration says.
    let mut order: Vec<&PartRecord> = index.parts.iter().filter(|p| p.kind != "files").collect();
    order.extend(index.parts.iter().filter(|p| p.kind == "files"));
    let target = if failure.is_none() {
        match database_target(&client, config, bundle, &index, old_root.as_deref()).await {
            Ok(t) => t,
            Err(e) => {
                failure = Some(format!("finding the database to restore into: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if failure.is_none() {
        for part in order {
            current = part.name.clone();
            match restore_part(
                &client,
                config,
                part,
                target.as_ref(),
                old_root.as_deref(),
                how,
            )
            .await
            {
                Ok(r) => {
                    let safety = r
                        .safety_snapshot_id
                        .map(|s| format!(" (safety snapshot {s})"))
                        .unwrap_or_default();
                    report.parts.push(format!(
                        "part {}: completed into {}{safety}",
                        part.name,
                        r.restored_to.unwrap_or_default()
                    ));
                }
                Err(e) => {
                    let e = format!("part {}: {e:#}", part.name);
                    report.parts.push(format!("{e} (failed)"));
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if failure.is_none() {
        if let (Some(new_root), Some(old_root)) = (&how.root, &old_root) {
            match rewrite(&index, old_root, new_root, how.database.as_deref()) {
                Ok(path) => report.config_rewritten = path,
                Err(e) => failure = Some(format!("rewriting the clone's configuration: {e:#}")),
            }
        }
    }
    v.push(("FLEETVAULT_PART", current));
    v.push((
        "FLEETVAULT_STATUS",
        if failure.is_none() { "ok" } else { "failed" }.into(),
    ));
    let (logs, after_failure) = hooks::run_all(&bundle.after, "restore-after", &v, false).await;
    failure = bundle::both(failure, after_failure);
    report.hooks.extend(logs);
    report.error = failure;
    Ok(report)
}

async fn restore_part(
    client: &Arc<Client>,
    config: &AgentConfig,
    part: &PartRecord,
    database: Option<&DbSource>,
    old_root: Option<&Path>,
    how: &BundleRestore,
) -> anyhow::Result<JobReport> {
    let id: SnapshotId = part
        .snapshot_id
        .as_deref()
        .context("the part has no snapshot")?
        .parse()?;
    let source = config.source(&part.name)?;
    match &source.kind {
        SourceKind::Files { paths, .. } => {
            let target = match (&how.root, old_root) {
                (Some(new_root), Some(old_root)) => Target::Relocated {
                    dir: new_root.clone(),
                    from: old_root.to_owned(),
                },
                // In place: only inside what this host backs up under that part's name (the
                // snapshot may come from another, compromised host).
                _ => Target::InPlace {
                    paths: paths.clone(),
                },
            };
            run(client.clone(), id, target, |_| {}).await
        }
        _ => {
            let options = RestoreOptions {
                source: Some(part.name.clone()),
                database: how.database.clone(),
                replace: how.replace,
                no_safety_snapshot: false,
                target: None,
            };
            let rec = read_record(client, id).await?;
            let mut config = config.clone();
            if let (Some(db), SourceKind::Database(_)) = (database, &source.kind) {
                if let Some(s) = config.sources.iter_mut().find(|s| s.name == part.name) {
                    s.kind = SourceKind::Database(db.clone());
                }
            }
            run_into_plain(client.clone(), &config, rec, &options, |_| {}).await
        }
    }
}
