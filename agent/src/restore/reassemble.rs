//! The reassembler: takes chunk frames in manifest order, checks each one's id against the
//! manifest and its content against its id, and the whole stream against its checksum.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail};
use fleetvault_common::chunk;
use fleetvault_common::protocol::Response;
use fleetvault_common::{ChunkRef, SnapshotId, StreamManifest};
use tokio::sync::mpsc;

/// Verifies chunks as a sink consumes them.
pub(crate) struct Reassembler {
    snapshot: SnapshotId,
    rx: mpsc::Receiver<Result<Response, String>>,
}

impl Reassembler {
    pub(crate) fn new(snapshot: SnapshotId, rx: mpsc::Receiver<Result<Response, String>>) -> Self {
        Self { snapshot, rx }
    }

    fn recv(&mut self) -> anyhow::Result<Response> {
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
    pub(crate) fn next_checked(&mut self, expected: &ChunkRef) -> anyhow::Result<Vec<u8>> {
        let snapshot = self.snapshot;
        match self.recv()? {
            Response::Chunk { id, envelope } if id == expected.id => {
                let plain = chunk::open_verified(&envelope, &id)
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
            Response::ChunkMissing { id } => {
                bail!("snapshot {snapshot}: chunk {id} is missing on the coordinator")
            }
            Response::Chunk { id, .. } => {
                bail!(
                    "snapshot {snapshot}: chunk {id} arrived where {} was expected",
                    expected.id
                )
            }
            other => bail!("snapshot {snapshot}: unexpected frame {other:?}"),
        }
    }

    /// For sinks that speak `io::Result`: the same as [`Reassembler::next_checked`].
    pub(crate) fn next(&mut self, expected: &ChunkRef) -> std::io::Result<Vec<u8>> {
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
            Response::End => Ok(()),
            other => bail!(
                "snapshot {}: unexpected frame after the last chunk: {other:?}",
                self.snapshot
            ),
        }
    }
}
