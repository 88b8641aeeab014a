//! The upload stage: for each batch, ask the coordinator which chunks it lacks, seal only
//! those (zstd, off the reactor), and send them on their own stream. Several batches are in
//! flight at once; the first error stops the stage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use fleetvault_common::chunk::seal;
use fleetvault_common::{Chunk, Client, SnapshotId};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Batches uploading at once.
const IN_FLIGHT: usize = 4;

/// What the uploader did.
#[derive(Default)]
pub(crate) struct UploadStats {
    pub(crate) bytes_uploaded: AtomicU64,
    pub(crate) new_chunks: AtomicU64,
}

/// Uploads every batch from `rx` until it closes.
pub(crate) async fn run(
    client: Arc<Client>,
    snapshot: SnapshotId,
    mut rx: mpsc::Receiver<Vec<Chunk>>,
    stats: Arc<UploadStats>,
    zstd_level: i32,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    while let Some(batch) = rx.recv().await {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .context("uploader stopped")?;
        let (client, stats) = (client.clone(), stats.clone());
        tasks.spawn(async move {
            let r = upload_batch(&client, snapshot, batch, &stats, zstd_level).await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            done.context("upload task panicked")??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("upload task panicked")??;
    }
    Ok(())
}

async fn upload_batch(
    client: &Client,
    snapshot: SnapshotId,
    batch: Vec<Chunk>,
    stats: &UploadStats,
    zstd_level: i32,
) -> anyhow::Result<()> {
    let ids = batch.iter().map(|c| c.id).collect();
    let missing = client.missing(ids).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let missing: std::collections::HashSet<_> = missing.into_iter().collect();
    let to_send: Vec<Chunk> = batch
        .into_iter()
        .filter(|c| missing.contains(&c.id))
        .collect();
    let sealed = tokio::task::spawn_blocking(move || {
        to_send
            .iter()
            .map(|c| (c.id, seal(&c.data, zstd_level)))
            .collect::<Vec<_>>()
    })
    .await
    .context("sealing task panicked")?;
    let count = sealed.len() as u64;
    let bytes = sealed.iter().map(|(_, e)| e.len() as u64).sum();
    client.put_chunks(snapshot, sealed).await?;
    stats.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
    stats.new_chunks.fetch_add(count, Ordering::Relaxed);
    Ok(())
}
