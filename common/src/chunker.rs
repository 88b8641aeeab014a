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
    /// 256 KiB / 1 MiB / 4 MiB (restic's average): a local edit still costs about a megabyte,
    /// and per-chunk costs (a file, an inode and an fsync on the coordinator, a frame, a hash
    /// lookup) stay low. With a 256 KiB average they were a fifth of a 1 GiB dump's backup
    /// time (README, Performance).
    fn default() -> Self {
        Self {
            min: 256 << 10,
            avg: 1 << 20,
            max: 4 << 20,
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
///
/// Cut points are fastcdc's `v2020` ones (the same as its `StreamCDC`), found in a buffer of
/// several maximum-size chunks: each chunk's bytes are copied once, into the chunk, and the
/// unread tail moves to the buffer's front only when less than one maximum chunk is left
/// (`StreamCDC` keeps one maximum chunk and moves the rest after every chunk).
pub struct Chunker<R: Read> {
    source: R,
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    /// Unchunked bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    whole: blake3::Hasher,
    len: u64,
}

/// The buffer holds at least this much, and at least two maximum chunks.
const MIN_BUFFER: usize = 8 << 20;

impl<R: Read> Chunker<R> {
    /// Chunks `source` with `params` (which must have passed [`ChunkerParams::validate`]).
    pub fn new(source: R, params: ChunkerParams) -> Self {
        Self::with_buffer(source, params, Vec::new())
    }

    /// Like [`Chunker::new`], reusing the buffer of an earlier chunker ([`Chunker::into_buffer`]):
    /// a backup of many small files then allocates and zeroes its 8 MiB once, not once per file.
    pub fn with_buffer(source: R, params: ChunkerParams, mut buf: Vec<u8>) -> Self {
        let (mask_s, mask_l) = fastcdc::v2020::select_masks(
            params.avg as usize,
            fastcdc::v2020::Normalization::Level1,
        );
        let size = MIN_BUFFER.max(2 * params.max as usize);
        if buf.len() < size {
            buf.resize(size, 0);
        }
        Self {
            source,
            params,
            mask_s,
            mask_l,
            buf,
            start: 0,
            end: 0,
            eof: false,
            whole: blake3::Hasher::new(),
            len: 0,
        }
    }

    /// The buffer, for the next stream's [`Chunker::with_buffer`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Reads until a maximum chunk is buffered or the source ends.
    fn fill(&mut self) -> std::io::Result<()> {
        let max = self.params.max as usize;
        while !self.eof && self.end - self.start < max {
            if self.buf.len() - self.end < max {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.source.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next chunk, `Ok(None)` at the end of the stream.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        self.fill()?;
        if self.start == self.end {
            return Ok(None);
        }
        let p = self.params;
        let (_, count) = fastcdc::v2020::cut(
            &self.buf[self.start..self.end],
            p.min as usize,
            p.avg as usize,
            p.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        let data = self.buf[self.start..self.start + count].to_vec();
        self.start += count;
        self.whole.update(&data);
        self.len += count as u64;
        Ok(Some(Chunk {
            id: ChunkId::of(&data),
            data,
        }))
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
    fn a_reused_buffer_cuts_like_a_fresh_one() {
        let (a, b) = (seeded(3 << 20, 1), seeded(1 << 20, 2));
        let mut first = Chunker::new(&a[..], SMALL);
        while first.next_chunk().unwrap().is_some() {}
        let mut reused = Chunker::with_buffer(&b[..], SMALL, first.into_buffer());
        let mut got = Vec::new();
        while let Some(c) = reused.next_chunk().unwrap() {
            got.push(c.to_ref());
        }
        let want: Vec<_> = chunk_all(&b, SMALL).iter().map(Chunk::to_ref).collect();
        assert_eq!(got, want);
        assert_eq!(reused.checksum(), *blake3::hash(&b).as_bytes());
    }

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

    /// A reader that returns at most `step` bytes per call, like a pipe.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn cuts_where_fastcdc_stream_cdc_cuts_whatever_the_reads() {
        // Longer than the buffer, so the tail is moved to the front several times.
        let data = seeded(3 * MIN_BUFFER + 12_345, 99);
        for params in [ChunkerParams::default(), SMALL] {
            let want: Vec<(usize, ChunkId)> = fastcdc::v2020::StreamCDC::new(
                &data[..],
                params.min as usize,
                params.avg as usize,
                params.max as usize,
            )
            .map(|c| {
                let c = c.unwrap();
                (c.length, ChunkId::of(&c.data))
            })
            .collect();
            for step in [usize::MAX, 65_536, 999] {
                let mut c = Chunker::new(Trickle(&data, step), params);
                let mut got = Vec::new();
                while let Some(ch) = c.next_chunk().unwrap() {
                    got.push((ch.data.len(), ch.id));
                }
                assert_eq!(got, want, "reads of {step} bytes with {params:?}");
                assert_eq!(c.checksum(), *blake3::hash(&data).as_bytes());
            }
        }
    }

    /// Golden vectors: boundaries and ids of fixed seeded inputs. If one fails, a library
    /// upgrade or a parameter change would make existing snapshots stop deduplicating: that
    /// needs new `ChunkerParams`, not a new golden list.
    fn golden(data: &[u8], params: ChunkerParams) -> Vec<String> {
        chunk_all(data, params)
            .iter()
            .map(|c| format!("{} {}", c.data.len(), &c.id.to_hex()[..16]))
            .collect()
    }

    #[test]
    fn golden_vector_default_params() {
        let data = seeded(16 << 20, 0x5eed_f1ee_7a17);
        let want: Vec<&str> = include_str!("../testdata/golden_chunks_default.txt")
            .lines()
            .collect();
        assert_eq!(golden(&data, ChunkerParams::default()), want);
    }

    /// The default before 1 MiB chunks (64 KiB / 256 KiB / 1 MiB): snapshots taken with it
    /// still deduplicate against new ones of the same sizes (`chunk_sizes` in the config).
    #[test]
    fn golden_vector_former_default_params() {
        let data = seeded(4 << 20, 0x5eed_f1ee_7a17);
        let params = ChunkerParams {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        };
        let want: Vec<&str> = include_str!("../testdata/golden_chunks.txt")
            .lines()
            .collect();
        assert_eq!(golden(&data, params), want);
    }
}
