//! One restore: the coordinator streams the snapshot's chunks (manifest first, then data in
//! manifest order); the [`Reassembler`] verifies every chunk against the manifest and the
//! whole stream against its checksum before a restore is reported successful (DESIGN.md
//! rule 4). Damage is reported with the snapshot and the chunk named.
//!
//! ```text
//! coordinator ══Read══▶ fetch (async frames) ══bounded channel══▶ Reassembler ──▶ Sink
//! ```

mod reassemble;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetvault_common::chunk;
use fleetvault_common::protocol::{Progress, ReadPart, Request, Response};
use fleetvault_common::{Client, JobReport, Manifest, SnapshotId, SnapshotRecord};
use tokio::sync::mpsc;

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
}

/// Chunks buffered between the network and the sink.
const QUEUE: usize = 16;

/// Opens a `Read` stream and returns the record and the verified, decoded manifest.
async fn open_read(
    client: &Client,
    snapshot: SnapshotId,
    part: ReadPart,
) -> anyhow::Result<(SnapshotRecord, Manifest, quinn::RecvStream)> {
    let (mut send, mut recv) = client.open(&Request::Read { snapshot, part }).await?;
    let _ = send.finish();
    let rec = match client.reply(&mut recv).await? {
        Response::Reading(rec) => rec,
        other => bail!("unexpected reply to Read: {other:?}"),
    };
    let root = rec
        .root
        .clone()
        .with_context(|| format!("snapshot {snapshot} has no manifest"))?;
    let mut bytes = Vec::with_capacity(root.len as usize);
    for c in &root.chunks {
        match client.reply(&mut recv).await? {
            Response::Chunk { id, envelope } if id == c.id => {
                let plain = chunk::open_verified(&envelope, &c.id).map_err(|e| {
                    anyhow!(
                        "snapshot {snapshot}: manifest chunk {} is damaged: {e}",
                        c.id
                    )
                })?;
                bytes.extend_from_slice(&plain);
            }
            Response::ChunkMissing { id } => {
                bail!("snapshot {snapshot}: manifest chunk {id} is missing on the coordinator")
            }
            other => bail!("snapshot {snapshot}: unexpected frame in the manifest: {other:?}"),
        }
    }
    if bytes.len() as u64 != root.len || *blake3::hash(&bytes).as_bytes() != root.checksum {
        bail!("snapshot {snapshot}: manifest checksum does not match");
    }
    let manifest =
        Manifest::decode(&bytes).with_context(|| format!("snapshot {snapshot}: bad manifest"))?;
    Ok((rec, manifest, recv))
}

/// Reads only a snapshot's manifest (for unchanged-file detection).
pub(crate) async fn read_manifest(
    client: &Client,
    snapshot: SnapshotId,
) -> anyhow::Result<Manifest> {
    let (_, manifest, _) = open_read(client, snapshot, ReadPart::Manifest).await?;
    Ok(manifest)
}

/// Restores `snapshot` into `target`; `progress` is called about twice a second.
pub(crate) async fn run(
    client: Arc<Client>,
    snapshot: SnapshotId,
    target: Target,
    progress: impl Fn(Progress) + Send + 'static,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let (rec, manifest, mut recv) = open_read(&client, snapshot, ReadPart::All).await?;
    let total = manifest.logical_len();
    let (tx, rx) = mpsc::channel(QUEUE);
    let fetch_client = client.clone();
    let fetch = tokio::spawn(async move {
        loop {
            let item = fetch_client
                .reply(&mut recv)
                .await
                .map_err(|e| e.to_string());
            let end = matches!(item, Ok(Response::End) | Err(_));
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
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
        r.and_then(|()| reasm.finish())
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
    })
}

/// Feeds the sink from the reassembler (blocking).
fn write_sink(
    reasm: &mut Reassembler,
    manifest: &Manifest,
    target: &Target,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    match (manifest, target) {
        (Manifest::Tree(tree), Target::Path(dir)) => {
            files_sink::restore_tree(dir, tree, &mut |r| reasm.next(r), &mut |n| {
                written.fetch_add(n, Ordering::Relaxed);
            })?;
            Ok(())
        }
        (Manifest::Tree(_), _) => bail!("a files snapshot needs a target directory (--target DIR)"),
        (Manifest::Stream(stream), Target::Stdout) => {
            let out = std::io::stdout();
            let mut out = out.lock();
            reasm.stream(stream, &mut out, written)?;
            out.flush().context("writing to stdout")
        }
        (Manifest::Stream(stream), Target::Path(path)) => {
            let mut f = std::fs::File::create_new(path)
                .with_context(|| format!("creating {}", path.display()))?;
            reasm.stream(stream, &mut f, written)?;
            f.sync_all()
                .with_context(|| format!("writing {}", path.display()))
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
                    child.finish().map_err(|e| anyhow!(e))
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
