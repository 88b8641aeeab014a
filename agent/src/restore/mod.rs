//! One restore: the coordinator streams the snapshot's chunks (manifest first, then data in
//! manifest order); the [`Reassembler`] verifies every chunk against the manifest and the
//! whole stream against its checksum before a restore is reported successful (docs/architecture.md
//! rule 4). Damage is reported with the snapshot and the chunk named.
//!
//! ```text
//! coordinator ══Read══▶ fetch (async frames, chunks opened in parallel) ══bounded channel══▶
//!     Reassembler (in order) ──▶ Sink
//! ```
//!
//! This file restores one snapshot into a [`Target`]; [`plan`] decides what a restore does
//! (and runs a bundle's parts), [`bundle`] holds what a bundle restore needs besides. May
//! import `config`, `pipe`, `process`, `db`, `sink`, `bundle` and (the plan's safety
//! snapshot) `backup`.

mod bundle;
mod plan;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetvault_common::protocol::{Progress, ReadPart};
use fleetvault_common::{Client, JobReport, Manifest, SnapshotId, SnapshotRead};
use tokio::sync::mpsc;

use crate::db::{self, DbRestore};
use crate::pipe::{self, Reassembler};
use crate::process::ShellCommand;
use crate::sink::durable::NewFile;
use crate::sink::files as files_sink;
pub(crate) use bundle::read_index;
pub(crate) use plan::run_into;

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
    let fetch = tokio::spawn(async move { pipe::fetch(&mut chunks, tx).await });
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
            db::restore(r, manifest, reasm, written, &rt).map(|()| None)
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
