//! The chunking stage: runs on a blocking thread, cuts streams into chunks, hashes them, and
//! hands batches to the uploader through a bounded channel (so memory never tracks the size
//! of the backup: when the network is slower than the source, this stage waits). Used by
//! `backup` and by every database dump.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetvault_common::{Chunk, ChunkId, Chunker, ChunkerParams, StreamManifest};
use tokio::sync::mpsc;

/// Plaintext bytes collected before a batch goes to the uploader.
const BATCH_BYTES: usize = 4 << 20;
/// Chunks per batch at most.
const BATCH_CHUNKS: usize = 256;

/// Collects chunks into batches for the uploader, skipping chunks this backup already queued.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Vec<Chunk>>,
    batch: Vec<Chunk>,
    bytes: usize,
    queued: HashSet<ChunkId>,
    params: ChunkerParams,
    /// The chunker's buffer, kept from one stream to the next.
    buf: Vec<u8>,
    /// Bytes read from the source so far (progress).
    pub(crate) read: Arc<AtomicU64>,
    /// Chunks referenced, repeats included.
    pub(crate) chunks: u64,
}

impl Batcher {
    pub(crate) fn new(
        tx: mpsc::Sender<Vec<Chunk>>,
        params: ChunkerParams,
        read: Arc<AtomicU64>,
    ) -> Self {
        Self {
            tx,
            batch: Vec::new(),
            bytes: 0,
            queued: HashSet::new(),
            params,
            buf: Vec::new(),
            read,
            chunks: 0,
        }
    }

    fn push(&mut self, chunk: Chunk) -> io::Result<()> {
        self.chunks += 1;
        if !self.queued.insert(chunk.id) {
            return Ok(());
        }
        self.bytes += chunk.data.len();
        self.batch.push(chunk);
        if self.bytes >= BATCH_BYTES || self.batch.len() >= BATCH_CHUNKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is collected; blocks while the uploader is busy.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        self.tx
            .blocking_send(std::mem::take(&mut self.batch))
            .map_err(|_| io::Error::other("upload stopped"))
    }

    /// Chunks one stream to its end and returns its manifest.
    pub(crate) fn chunk_stream(&mut self, reader: impl Read) -> io::Result<StreamManifest> {
        let buf = std::mem::take(&mut self.buf);
        let mut chunker = Chunker::with_buffer(reader, self.params, buf);
        let mut chunks = Vec::new();
        while let Some(chunk) = chunker.next_chunk()? {
            self.read
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            chunks.push(chunk.to_ref());
            self.push(chunk)?;
        }
        let manifest = StreamManifest {
            chunks,
            len: chunker.len(),
            checksum: chunker.checksum(),
        };
        self.buf = chunker.into_buffer();
        Ok(manifest)
    }
}
