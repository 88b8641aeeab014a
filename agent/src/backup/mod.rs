//! One backup: source → chunking (blocking thread) → upload (async, pipelined) → commit.
//!
//! ```text
//! Source ──Read──▶ Batcher (chunk + hash) ══bounded channel══▶ upload::run ──▶ coordinator
//! ```
//!
//! The manifest is built while chunking, then encoded and chunked like data; the commit is
//! sent only after every upload was acknowledged as durable. Any failure aborts the snapshot
//! on the coordinator (it ends `failed` with the reason), and a dropped connection does the
//! same on the coordinator's side.
//!
//! May import `config`, `pipe`, `process`, `db` and `source`; never `restore` or `bundle`.

mod upload;

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use fleetvault_common::protocol::{Begin, Commit, Progress};
use fleetvault_common::{Client, JobReport, Manifest, SnapshotId, SnapshotRecord, TreeManifest};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{SourceConfig, SourceKind};
use crate::pipe::Batcher;
use crate::process::ShellCommand;
use crate::source::files::{self, FilesSpec};
use upload::UploadStats;

/// Batches queued between chunking and upload.
const QUEUE: usize = 2;

/// What the chunking stage produced.
struct Chunked {
    root: fleetvault_common::StreamManifest,
    checksum: Option<[u8; 32]>,
    chunks: u64,
    warnings: Vec<String>,
    files_unchanged: u64,
    /// Bytes read from the source (the manifest not counted).
    bytes_read: u64,
}

/// Backs up `source` now; `progress` is called about twice a second.
pub(crate) async fn run(
    client: Arc<Client>,
    source: &SourceConfig,
    job: Option<String>,
    progress: impl Fn(Progress) + Send + 'static,
) -> anyhow::Result<JobReport> {
    run_tagged(client, source, job, Vec::new(), progress).await
}

/// The tag recording a PostgreSQL snapshot's dump format (its restore depends on it).
pub(crate) const PG_FORMAT_TAG: &str = "pg-format:";

/// [`run`] with extra tags on the snapshot (e.g. `safety-snapshot`).
pub(crate) async fn run_tagged(
    client: Arc<Client>,
    source: &SourceConfig,
    job: Option<String>,
    mut tags: Vec<String>,
    progress: impl Fn(Progress) + Send + 'static,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    if let SourceKind::Database(db) = &source.kind {
        if db.engine == crate::config::Engine::Postgres {
            let format = match db.format {
                crate::config::PgFormat::Tables => "tables",
                crate::config::PgFormat::Plain => "plain",
                crate::config::PgFormat::Custom => "custom",
            };
            tags.push(format!("{PG_FORMAT_TAG}{format}"));
        }
    }
    let begin = Begin {
        source: source.name.clone(),
        kind: source.kind_name().to_owned(),
        chunker: source.chunker,
        job,
        tags,
    };
    let (snapshot, parent) = client.begin(begin).await?;
    let span = tracing::info_span!("backup", source = %source.name, snapshot = %snapshot);
    let _enter = span.enter();
    info!("backup started");
    drop(_enter);
    let read = Arc::new(AtomicU64::new(0));
    let result = run_inner(&client, source, snapshot, parent, read.clone(), progress).await;
    match result {
        Ok((rec, stats, chunked)) => Ok(JobReport {
            snapshot_id: snapshot.to_string(),
            status: rec.status.name().to_owned(),
            agent: rec.agent,
            source: rec.source,
            bytes_read: chunked.bytes_read,
            bytes_uploaded: stats.bytes_uploaded.load(Ordering::Relaxed),
            // Counted like `new_chunks`: the manifest's chunks too.
            chunks: chunked.chunks + chunked.root.chunks.len() as u64,
            new_chunks: stats.new_chunks.load(Ordering::Relaxed),
            bytes_written: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            files_unchanged: chunked.files_unchanged,
            warnings: chunked.warnings,
            error: None,
            safety_snapshot_id: None,
            restored_to: None,
        }),
        Err(e) => {
            let reason = format!("{e:#}");
            // info, not warn: a one-shot command prints the error itself, once.
            info!(snapshot = %snapshot, %reason, "backup failed");
            if let Err(abort_err) = client.abort(snapshot, reason).await {
                warn!(error = %abort_err, "cannot report the failure to the coordinator");
            }
            // The failed record's id travels with the error (`--json`, pushed reports).
            Err(e.context(fleetvault_common::exit::FailedRecord {
                snapshot_id: snapshot.to_string(),
                message: format!("backup of {} (snapshot {snapshot}) failed", source.name),
            }))
        }
    }
}

async fn run_inner(
    client: &Arc<Client>,
    source: &SourceConfig,
    snapshot: SnapshotId,
    parent: Option<SnapshotRecord>,
    read: Arc<AtomicU64>,
    progress: impl Fn(Progress) + Send + 'static,
) -> anyhow::Result<(SnapshotRecord, Arc<UploadStats>, Chunked)> {
    if let SourceKind::Database(db) = &source.kind {
        // Tools present, server reachable, credentials right: checked before any data flows,
        // and what was found is recorded in the snapshot.
        let info = crate::db::probe(db)
            .await
            .with_context(|| format!("{} source {}", db.engine.kind_name(), source.name))?;
        let db_type = db.engine.kind_name().to_owned();
        client
            .describe(snapshot, db_type, info.db_version, info.database)
            .await?;
    }
    let parent_tree = match (&source.kind, parent) {
        (SourceKind::Files { .. }, Some(p)) => {
            match crate::pipe::read::read_manifest(client, p.id).await {
                Ok(Manifest::Tree(t)) => Some(t),
                Ok(Manifest::Stream(_)) => None,
                Err(e) => {
                    warn!(parent = %p.id, error = %format!("{e:#}"), "cannot read the parent snapshot; reading every file");
                    None
                }
            }
        }
        _ => None,
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let stats = Arc::new(UploadStats::default());
    let uploader = tokio::spawn(upload::run(
        client.clone(),
        snapshot,
        rx,
        stats.clone(),
        source.zstd_level,
    ));
    let ticker_read = read.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            progress(Progress {
                bytes: ticker_read.load(Ordering::Relaxed),
                total: None,
            });
        }
    });
    // A lost connection stops a silent source at once instead of when it next writes.
    let lost = Arc::new(AtomicBool::new(false));
    let watch = {
        let (conn, lost) = (client.connection().clone(), lost.clone());
        tokio::spawn(async move {
            conn.closed().await;
            lost.store(true, Ordering::Relaxed);
        })
    };
    let source2 = source.clone();
    let chunked = tokio::task::spawn_blocking(move || {
        chunk_source(
            &source2,
            parent_tree.as_ref(),
            Batcher::new(tx, source2.chunker, read),
            &lost,
        )
    })
    .await
    .context("chunking task panicked");
    ticker.abort();
    watch.abort();
    if client.connection().close_reason().is_some() {
        return Err(client.lost("connection closed").into());
    }
    let uploaded = uploader.await.context("upload task panicked");
    // The uploader's error explains more (e.g. a refused chunk) than "upload stopped".
    uploaded??;
    let chunked = chunked??;
    let commit = Commit {
        snapshot,
        root: chunked.root.clone(),
        checksum: chunked.checksum,
        logical_bytes: 0,
        chunks: chunked.chunks,
        warnings: chunked.warnings.clone(),
    };
    let rec = client.commit(commit).await?;
    Ok((rec, stats, chunked))
}

/// The blocking part: read the source through the chunker, then chunk the manifest.
fn chunk_source(
    source: &SourceConfig,
    parent: Option<&TreeManifest>,
    mut batcher: Batcher,
    lost: &AtomicBool,
) -> anyhow::Result<Chunked> {
    let (manifest, checksum, warnings, files_unchanged) = match &source.kind {
        SourceKind::Command { backup_command, .. } => {
            let mut cmd = ShellCommand::spawn(
                "backup command",
                backup_command,
                std::process::Stdio::null(),
                std::process::Stdio::piped(),
            )
            .map_err(|e| anyhow!(e))?;
            let stdout = cmd.take_stdout().context("backup command has no stdout")?;
            let stream = match batcher.chunk_stream(UntilLost {
                inner: stdout,
                lost,
            }) {
                Ok(s) => s,
                Err(e) => {
                    cmd.kill();
                    return Err(anyhow!(e).context("reading the backup command's output"));
                }
            };
            cmd.finish().map_err(|e| anyhow!(e))?;
            let checksum = stream.checksum;
            (Manifest::Stream(stream), Some(checksum), Vec::new(), 0)
        }
        SourceKind::Inline { bytes, .. } => {
            let stream = batcher.chunk_stream(&bytes[..])?;
            let checksum = stream.checksum;
            (Manifest::Stream(stream), Some(checksum), Vec::new(), 0)
        }
        SourceKind::Database(db) => {
            // A blocking thread of the runtime: the client library's futures run on it.
            let rt = tokio::runtime::Handle::current();
            let (manifest, checksum) = crate::db::backup(db, &mut batcher, &rt)?;
            (manifest, checksum, Vec::new(), 0)
        }
        SourceKind::Files { paths, exclude } => {
            let spec = FilesSpec {
                paths: paths.clone(),
                exclude: exclude.clone(),
            };
            let (tree, report) = files::walk(
                &spec,
                parent,
                &mut |r| batcher.chunk_stream(r).map(|m| m.chunks),
                &mut |_| {},
            )?;
            for w in &report.warnings {
                warn!(warning = %w, "files source");
            }
            (
                Manifest::Tree(tree),
                None,
                report.warnings,
                report.files_unchanged,
            )
        }
    };
    let chunks = batcher.chunks;
    let bytes_read = batcher.read.load(Ordering::Relaxed);
    let encoded = manifest.encode();
    drop(manifest);
    let root = batcher.chunk_stream(&encoded[..])?;
    batcher.flush()?;
    Ok(Chunked {
        root,
        checksum,
        chunks,
        warnings,
        files_unchanged,
        bytes_read,
    })
}

/// A command's output that stops being read once `lost` is set (checked every quarter second
/// while the command is silent): a slow dump must not outlive the connection it feeds.
struct UntilLost<'a, R> {
    inner: R,
    lost: &'a AtomicBool,
}

impl<R: Read + AsFd> Read for UntilLost<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: 250_000_000,
        };
        loop {
            if self.lost.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("connection to coordinator lost"));
            }
            let mut fds = [PollFd::new(&self.inner, PollFlags::IN)];
            match poll(&mut fds, Some(&wait)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => return self.inner.read(buf),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
