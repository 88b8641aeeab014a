//! Content-defined chunking: FastCDC (v2020) boundaries over a byte stream, BLAKE3 ids.
//!
//! Plain blocking Rust: the agent runs it on a blocking thread, never on the async reactor.
//! The same bytes with the same [`ChunkerParams`] always give the same chunks, which is what
//! makes tomorrow's backup deduplicate against today's; the golden test below pins that.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::id::ChunkId;
use crate::manifest::ChunkRef;

/// FastCDC size parameters; recorded in every snapshot so a later change cannot silently
/// break dedup. fastcdc 5 requires even sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Smallest chunk, except the last one of a stream.
    pub min: u32,
    /// Target average chunk size.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkerParams {
    /// 64 KiB / 256 KiB / 1 MiB: small enough that a local edit costs little, large enough
    /// that per-chunk costs (a file and an fsync on the coordinator) stay low.
    fn default() -> Self {
        Self {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        }
    }
}

impl ChunkerParams {
    /// Checks the sizes against fastcdc's and our own limits.
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2)
            && self.min >= 64
            && self.min <= self.avg
            && self.avg <= self.max
            && self.max as usize <= crate::chunk::MAX_CHUNK_LEN;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "invalid chunk sizes {}/{}/{}: need even sizes with 64 <= min <= avg <= max <= 16 MiB",
                self.min, self.avg, self.max
            ))
        }
    }
}

/// One chunk cut from a stream.
#[derive(Debug)]
pub struct Chunk {
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// The plaintext.
    pub data: Vec<u8>,
}

impl Chunk {
    /// The reference a manifest keeps for this chunk.
    pub fn to_ref(&self) -> ChunkRef {
        ChunkRef {
            id: self.id,
            len: self.data.len() as u32,
        }
    }
}

/// Cuts a byte stream into chunks and hashes the whole stream on the way.
pub struct Chunker<R: Read> {
    inner: fastcdc::v2020::StreamCDC<R>,
    whole: blake3::Hasher,
    len: u64,
}

impl<R: Read> Chunker<R> {
    /// Chunks `source` with `params` (which must have passed [`ChunkerParams::validate`]).
    pub fn new(source: R, params: ChunkerParams) -> Self {
        Self {
            inner: fastcdc::v2020::StreamCDC::new(
                source,
                params.min as usize,
                params.avg as usize,
                params.max as usize,
            ),
            whole: blake3::Hasher::new(),
            len: 0,
        }
    }

    /// The next chunk, `Ok(None)` at the end of the stream.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        match self.inner.next() {
            None => Ok(None),
            Some(Err(fastcdc::v2020::Error::IoError(e))) => Err(e),
            Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Some(Ok(c)) => {
                self.whole.update(&c.data);
                self.len += c.data.len() as u64;
                Ok(Some(Chunk {
                    id: ChunkId::of(&c.data),
                    data: c.data,
                }))
            }
        }
    }

    /// Bytes chunked so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been chunked yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// BLAKE3 of everything chunked so far (the whole stream once `next_chunk` gave `None`).
    pub fn checksum(&self) -> [u8; 32] {
        *self.whole.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so the golden vector needs no data file.
    fn seeded(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn chunk_all(data: &[u8], params: ChunkerParams) -> Vec<Chunk> {
        let mut c = Chunker::new(data, params);
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch);
        }
        assert_eq!(c.len(), data.len() as u64);
        out
    }

    const SMALL: ChunkerParams = ChunkerParams {
        min: 4096,
        avg: 16384,
        max: 65536,
    };

    #[test]
    fn boundaries_are_stable_under_an_insertion() {
        let data = seeded(2 << 20, 42);
        let mut edited = data.clone();
        let at = data.len() / 2;
        edited.splice(at..at, b"an inserted line of text\n".iter().copied());
        let a: std::collections::HashSet<_> =
            chunk_all(&data, SMALL).iter().map(|c| c.id).collect();
        let b = chunk_all(&edited, SMALL);
        let new = b.iter().filter(|c| !a.contains(&c.id)).count();
        assert!(
            new <= 3,
            "{new} of {} chunks changed after one insertion",
            b.len()
        );
    }

    #[test]
    fn chunks_reassemble_to_the_stream_and_checksum_matches() {
        let data = seeded(1 << 20, 7);
        let mut c = Chunker::new(&data[..], SMALL);
        let mut joined = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            assert!(ch.data.len() <= SMALL.max as usize);
            joined.extend_from_slice(&ch.data);
        }
        assert_eq!(joined, data);
        assert_eq!(c.checksum(), *blake3::hash(&data).as_bytes());
    }

    /// Golden vector: boundaries and ids of a fixed seeded input with the default parameters.
    /// If this fails, a library upgrade or a parameter change would make every existing
    /// snapshot stop deduplicating: that needs a new `ChunkerParams`, not a new golden list.
    #[test]
    fn golden_vector_default_params() {
        let data = seeded(4 << 20, 0x5eed_f1ee_7a17);
        let got: Vec<String> = chunk_all(&data, ChunkerParams::default())
            .iter()
            .map(|c| format!("{} {}", c.data.len(), &c.id.to_hex()[..16]))
            .collect();
        let want: Vec<&str> = include_str!("../testdata/golden_chunks.txt")
            .lines()
            .collect();
        assert_eq!(got, want);
    }
}
