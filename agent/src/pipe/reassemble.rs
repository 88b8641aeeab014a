//! The reassembler: takes chunk frames in manifest order, checks each one's id against the
//! manifest and its content against its id, and the whole stream against its checksum.
//!
//! Opening a chunk (decompressing and hashing it) is the costly part: [`fetch`] starts it on
//! the blocking pool as each frame arrives, so several chunks are opened at once on every
//! core while the sink writes the earlier ones in order.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use fleetvault_common::chunk::{self, EnvelopeError};
use fleetvault_common::{ChunkId, ChunkRef, ReadItem, ReadStream, SnapshotId, StreamManifest};
use tokio::sync::{mpsc, oneshot};

/// A frame of the restore stream as the reassembler receives it.
pub(crate) enum Fetched {
    /// A chunk frame, being opened and verified against its id on the blocking pool.
    Chunk {
        id: ChunkId,
        opened: oneshot::Receiver<Result<Bytes, EnvelopeError>>,
    },
    /// A chunk the coordinator does not have.
    Missing(ChunkId),
    /// The end of the stream.
    End,
}

/// Reads the restore stream's frames into `tx` until `End` or an error, starting each chunk's
/// verification as it arrives. The channel's bound limits the chunks opened at once.
pub(crate) async fn fetch(chunks: &mut ReadStream, tx: mpsc::Sender<Result<Fetched, String>>) {
    loop {
        let item = match chunks.next().await {
            Ok(ReadItem::Chunk { id, envelope }) => {
                let (done, opened) = oneshot::channel();
                tokio::task::spawn_blocking(move || {
                    let _ = done.send(chunk::open_verified_shared(envelope, &id));
                });
                Ok(Fetched::Chunk { id, opened })
            }
            Ok(ReadItem::Missing(id)) => Ok(Fetched::Missing(id)),
            Ok(ReadItem::End) => Ok(Fetched::End),
            Err(e) => Err(e.to_string()),
        };
        let end = matches!(item, Ok(Fetched::End) | Err(_));
        if tx.send(item).await.is_err() || end {
            break;
        }
    }
}

/// Verifies chunks as a sink consumes them.
pub(crate) struct Reassembler {
    snapshot: SnapshotId,
    rx: mpsc::Receiver<Result<Fetched, String>>,
}

impl Reassembler {
    pub(crate) fn new(snapshot: SnapshotId, rx: mpsc::Receiver<Result<Fetched, String>>) -> Self {
        Self { snapshot, rx }
    }

    fn recv(&mut self) -> anyhow::Result<Fetched> {
        match self.rx.blocking_recv() {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(anyhow!("snapshot {}: {e}", self.snapshot)),
            None => Err(anyhow!(
                "snapshot {}: the chunk stream ended early",
                self.snapshot
            )),
        }
    }

    /// The verified plaintext of the next chunk, which must be `expected`.
    pub(crate) fn next_checked(&mut self, expected: &ChunkRef) -> anyhow::Result<Bytes> {
        let snapshot = self.snapshot;
        match self.recv()? {
            Fetched::Chunk { id, opened } if id == expected.id => {
                let plain = opened
                    .blocking_recv()
                    .map_err(|_| anyhow!("snapshot {snapshot}: chunk {id}: verification stopped"))?
                    .map_err(|e| anyhow!("snapshot {snapshot}: chunk {id} is damaged: {e}"))?;
                if plain.len() != expected.len as usize {
                    bail!(
                        "snapshot {snapshot}: chunk {id} has {} bytes, the manifest says {}",
                        plain.len(),
                        expected.len
                    );
                }
                Ok(plain)
            }
            Fetched::Chunk { id, .. } => {
                bail!(
                    "snapshot {snapshot}: chunk {id} arrived where {} was expected",
                    expected.id
                )
            }
            Fetched::Missing(id) => {
                bail!("snapshot {snapshot}: chunk {id} is missing on the coordinator")
            }
            Fetched::End => bail!("snapshot {snapshot}: the chunk stream ended early"),
        }
    }

    /// For sinks that speak `io::Result`: the same as [`Reassembler::next_checked`].
    pub(crate) fn next(&mut self, expected: &ChunkRef) -> std::io::Result<Bytes> {
        self.next_checked(expected)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    /// Writes a whole stream to `out`, verifying its length and checksum at the end.
    pub(crate) fn stream(
        &mut self,
        manifest: &StreamManifest,
        out: &mut dyn Write,
        written: &AtomicU64,
    ) -> anyhow::Result<()> {
        let mut whole = blake3::Hasher::new();
        let mut len = 0u64;
        for c in &manifest.chunks {
            let plain = self.next_checked(c)?;
            whole.update(&plain);
            len += plain.len() as u64;
            out.write_all(&plain).map_err(|e| {
                anyhow!(
                    "snapshot {}: writing the restored stream: {e}",
                    self.snapshot
                )
            })?;
            written.fetch_add(plain.len() as u64, Ordering::Relaxed);
        }
        if len != manifest.len || *whole.finalize().as_bytes() != manifest.checksum {
            bail!(
                "snapshot {}: the restored stream does not match its checksum",
                self.snapshot
            );
        }
        Ok(())
    }

    /// Checks that the coordinator ended the stream where the manifest ends.
    pub(crate) fn finish(mut self) -> anyhow::Result<()> {
        match self.recv()? {
            Fetched::End => Ok(()),
            Fetched::Chunk { id, .. } | Fetched::Missing(id) => bail!(
                "snapshot {}: chunk {id} arrived after the last chunk",
                self.snapshot
            ),
        }
    }
}
