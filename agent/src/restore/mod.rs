//! One restore: the coordinator streams the snapshot's chunks (manifest first, then data in
//! manifest order); the [`Reassembler`] verifies every chunk against the manifest and the
//! whole stream against its checksum before a restore is reported successful (docs/architecture.md
//! rule 4). Damage is reported with the snapshot and the chunk named.
//!
//! ```text
//! coordinator ══Read══▶ fetch (async frames, chunks opened in parallel) ══bounded channel══▶
//!     Reassembler (in order) ──▶ Sink
//! ```

mod reassemble;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetvault_common::protocol::{Progress, ReadPart, RestoreOptions};
use fleetvault_common::{Client, JobReport, Manifest, SnapshotId, SnapshotRead, SnapshotRecord};
use tokio::sync::mpsc;

use crate::config::{AgentConfig, SourceConfig, SourceKind};
use crate::sink::database::{self as db_sink, DbRestore};
use crate::sink::durable::NewFile;
use crate::sink::files as files_sink;
use crate::source::command::ShellCommand;
pub(crate) use reassemble::Reassembler;

/// Where a restore goes.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A files snapshot under this directory; a stream snapshot into this new file.
    Path(PathBuf),
    /// A stream snapshot to stdout.
    Stdout,
    /// A stream snapshot into this command's stdin.
    Command(String),
    /// A database snapshot into a database.
    Database(Box<DbRestore>),
    /// A files snapshot whose paths lie under `from`, restored with `from` replaced by `dir`
    /// (a bundle restored under a new root).
    Relocated { dir: PathBuf, from: PathBuf },
    /// A files snapshot restored in place under `/` (a bundle's files part), refused before
    /// anything is written unless every entry lies inside these paths: those its source is
    /// configured with on this host.
    InPlace { paths: Vec<PathBuf> },
}

/// Chunks buffered between the network and the sink, each being opened on its own blocking
/// thread: 8 of about 1 MiB keep both cores busy (16 ran no faster and doubled the agent's
/// peak memory, to 160-190 MB on a 1 GiB dump).
const QUEUE: usize = 8;

/// Reads a snapshot's record (and checks its manifest).
pub(crate) async fn read_record(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<SnapshotRecord> {
    Ok(client
        .read_snapshot(snapshot, ReadPart::Manifest)
        .await?
        .record)
}

/// Reads only a snapshot's manifest (for unchanged-file detection).
pub(crate) async fn read_manifest(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<Manifest> {
    Ok(client
        .read_snapshot(snapshot, ReadPart::Manifest)
        .await?
        .manifest)
}

/// Restores `snapshot` into `target`; `progress` is called about twice a second.
pub(crate) async fn run(
    client: Arc<Client>,
    snapshot: SnapshotId,
    target: Target,
    progress: impl Fn(Progress) + Send + 'static,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let restored_to = match &target {
        Target::Path(p) => Some(p.display().to_string()),
        Target::Stdout => Some("-".into()),
        Target::Command(c) => Some(format!("restore_command `{c}`")),
        Target::Database(r) => Some(r.db.database.clone()),
        Target::Relocated { dir, .. } => Some(dir.display().to_string()),
        Target::InPlace { .. } => Some("/".into()),
    };
    let SnapshotRead {
        record: rec,
        manifest,
        mut chunks,
    } = client.read_snapshot(snapshot, ReadPart::All).await?;
    let total = manifest.logical_len();
    let (tx, rx) = mpsc::channel(QUEUE);
    let fetch = tokio::spawn(async move { reassemble::fetch(&mut chunks, tx).await });
    let written = Arc::new(AtomicU64::new(0));
    let ticker_written = written.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            progress(Progress {
                bytes: ticker_written.load(Ordering::Relaxed),
                total: Some(total),
            });
        }
    });
    let sink_written = written.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut reasm = Reassembler::new(snapshot, rx);
        let r = write_sink(&mut reasm, &manifest, &target, &sink_written);
        // A new file gets its name only after the coordinator has ended the stream cleanly.
        r.and_then(|pending| {
            reasm.finish()?;
            pending.map_or(Ok(()), NewFile::finish)
        })
    })
    .await
    .context("restore task panicked");
    ticker.abort();
    fetch.abort();
    result??;
    Ok(JobReport {
        snapshot_id: snapshot.to_string(),
        status: "completed".into(),
        agent: rec.agent,
        source: rec.source,
        bytes_read: 0,
        bytes_uploaded: 0,
        chunks: rec.chunks,
        new_chunks: 0,
        bytes_written: written.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
        files_unchanged: 0,
        warnings: Vec::new(),
        error: None,
        safety_snapshot_id: None,
        restored_to,
    })
}

/// `tree` with the leading `from` (an absolute directory) stripped from every path; the entry
/// of `from` itself is dropped (its directory is the new target). Everything must lie under it.
fn relocate(
    tree: &fleetvault_common::TreeManifest,
    from: &std::path::Path,
) -> anyhow::Result<fleetvault_common::TreeManifest> {
    use std::os::unix::ffi::OsStrExt;
    let prefix = from.as_os_str().as_bytes();
    let prefix = &prefix[prefix
        .iter()
        .position(|&b| b != b'/')
        .unwrap_or(prefix.len())..];
    let mut out = fleetvault_common::TreeManifest::default();
    for e in &tree.entries {
        if e.path == prefix {
            continue;
        }
        let rest = e
            .path
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(b"/"))
            .with_context(|| {
                format!(
                    "{} is not under {}: cannot move it",
                    String::from_utf8_lossy(&e.path),
                    from.display()
                )
            })?;
        let mut moved = e.clone();
        moved.path = rest.to_vec();
        out.entries.push(moved);
    }
    Ok(out)
}

/// Feeds the sink from the reassembler (blocking); a stream restored to a file is returned
/// whole and synced but not yet under its name, for the caller to finish.
fn write_sink(
    reasm: &mut Reassembler,
    manifest: &Manifest,
    target: &Target,
    written: &AtomicU64,
) -> anyhow::Result<Option<NewFile>> {
    match (manifest, target) {
        (Manifest::Tree(tree), Target::Path(dir)) => {
            files_sink::restore_tree(dir, tree, &mut |r| reasm.next(r), &mut |n| {
                written.fetch_add(n, Ordering::Relaxed);
            })?;
            Ok(None)
        }
        (Manifest::Tree(tree), Target::InPlace { paths }) => {
            files_sink::check_within(tree, paths)?;
            let root = std::path::Path::new("/");
            files_sink::restore_tree(root, tree, &mut |r| reasm.next(r), &mut |n| {
                written.fetch_add(n, Ordering::Relaxed);
            })?;
            Ok(None)
        }
        (Manifest::Tree(tree), Target::Relocated { dir, from }) => {
            let tree = relocate(tree, from)?;
            files_sink::restore_tree(dir, &tree, &mut |r| reasm.next(r), &mut |n| {
                written.fetch_add(n, Ordering::Relaxed);
            })?;
            Ok(None)
        }
        (_, Target::Database(r)) => {
            let rt = tokio::runtime::Handle::current();
            db_sink::restore(r, manifest, reasm, written, &rt).map(|()| None)
        }
        (Manifest::Tree(_), _) => bail!("a files snapshot needs a target directory (--target DIR)"),
        (Manifest::Stream(_), Target::Relocated { .. }) => {
            bail!("a stream snapshot cannot be relocated")
        }
        (Manifest::Stream(_), Target::InPlace { .. }) => {
            bail!("a stream snapshot cannot be restored as a files part (nothing was written)")
        }
        (Manifest::Stream(stream), Target::Stdout) => {
            let out = std::io::stdout();
            let mut out = out.lock();
            reasm.stream(stream, &mut out, written)?;
            out.flush().context("writing to stdout")?;
            Ok(None)
        }
        (Manifest::Stream(stream), Target::Path(path)) => {
            // Under a temporary name until whole and synced; removed if the restore fails.
            let mut f = NewFile::create(path)?;
            reasm.stream(stream, &mut f, written)?;
            Ok(Some(f))
        }
        (Manifest::Stream(stream), Target::Command(cmd)) => {
            let mut child = ShellCommand::spawn(
                "restore command",
                cmd,
                std::process::Stdio::piped(),
                std::process::Stdio::inherit(),
            )
            .map_err(|e| anyhow!(e))?;
            let mut stdin = child.take_stdin().context("restore command has no stdin")?;
            match reasm.stream(stream, &mut stdin, written) {
                Ok(()) => {
                    drop(stdin);
                    child.finish().map_err(|e| anyhow!(e))?;
                    Ok(None)
                }
                Err(e) => {
                    // Kill before closing stdin: the command must not see a clean end of a
                    // damaged stream.
                    child.kill();
                    Err(e)
                }
            }
        }
    }
}

/// A bundle snapshot restored behind its hooks; `options.target` is the new root of a clone
/// or a move. Parts and hooks are reported in the warnings, one line each.
async fn restore_bundle(
    client: Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    options: &RestoreOptions,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let how = crate::bundle::BundleRestore {
        root: options.target.as_ref().map(PathBuf::from),
        database: options.database.clone(),
        replace: options.replace,
    };
    let r = crate::bundle::restore(client.clone(), config, snapshot, &how).await?;
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
    if rec.kind == crate::bundle::KIND {
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
    if rec.kind == crate::bundle::KIND {
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
    if rec.kind == "files" {
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
            if rec.kind != "command" {
                return Err(refuse_kinds());
            }
            let cmd = restore_command.clone().with_context(|| {
                format!("source {name} has no restore_command; give --target FILE or --target -")
            })?;
            run(client, snapshot, Target::Command(cmd), progress).await
        }
        SourceKind::Database(db) => {
            if rec.kind != db.engine.kind_name() {
                return Err(refuse_kinds());
            }
            let target_db = options
                .database
                .clone()
                .unwrap_or_else(|| db.database.clone());
            let target = db.with_database(&target_db);
            let state = db_sink::inspect(&target)
                .await
                .with_context(|| format!("inspecting the restore target {target_db:?}"))?;
            if db.engine == crate::config::Engine::Postgres {
                crate::sink::postgres::check_versions(
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
