//! The chunk envelope: how one chunk is stored on the coordinator and sent on the wire.
//!
//! ```text
//! byte 0     format version (1)
//! byte 1     codec: 0 = raw, 1 = zstd
//! bytes 2-3  reserved, zero (room for an encryption key id when sealing with an AEAD arrives)
//! bytes 4-7  plaintext length, u32 little endian
//! bytes 8..  payload
//! ```
//!
//! A chunk is compressed with zstd and kept raw when compression does not shrink it. Opening
//! never allocates more than [`MAX_CHUNK_LEN`], whatever the header claims.

use crate::id::ChunkId;

/// The largest plaintext a chunk may have (the chunker's maximum is far below it).
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// Current envelope format version.
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the envelope header.
pub const HEADER_LEN: usize = 8;
/// zstd level used when sealing chunks: 1, from measurements (README, Performance): on a chat
/// app's dump it is the fastest of levels 1-3 and stores no more than 2 or 3.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Why an envelope could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than a header.
    #[error("chunk envelope truncated ({0} bytes)")]
    Truncated(usize),
    /// A format version this build does not know.
    #[error("chunk envelope version {0} is not supported")]
    Version(u8),
    /// An unknown codec byte.
    #[error("chunk envelope codec {0} is not supported")]
    Codec(u8),
    /// The header claims more than [`MAX_CHUNK_LEN`].
    #[error("chunk envelope claims {0} bytes, over the limit")]
    TooLarge(u32),
    /// The payload does not decode to the length in the header.
    #[error("chunk payload is corrupt: {0}")]
    Corrupt(String),
    /// The plaintext does not hash to the expected id.
    #[error("chunk {expected} is damaged: its content hashes to {actual}")]
    HashMismatch {
        /// The id the chunk was stored or requested under.
        expected: ChunkId,
        /// What the content actually hashes to.
        actual: ChunkId,
    },
}

/// Seals `plaintext` into an envelope, compressing when that pays.
pub fn seal(plaintext: &[u8], zstd_level: i32) -> Vec<u8> {
    debug_assert!(plaintext.len() <= MAX_CHUNK_LEN);
    let plain_len = plaintext.len() as u32;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() / 2);
    out.extend_from_slice(&[ENVELOPE_VERSION, CODEC_ZSTD, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    // Compression of an in-memory slice into a Vec can only fail on an invalid level, which
    // the raw fallback below also covers.
    match compress(plaintext, zstd_level) {
        Ok(compressed) if compressed.len() < plaintext.len() => {
            out.extend_from_slice(&compressed);
        }
        _ => {
            out[1] = CODEC_RAW;
            out.extend_from_slice(plaintext);
        }
    }
    out
}

thread_local! {
    // One compression and one decompression context per thread, reused: creating a zstd
    // context per chunk costs allocations and page faults on every chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(plaintext: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, c) = slot.as_mut().expect("just set");
        c.compress(plaintext)
    })
}

/// Runs `f` with this thread's decompression context.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        f(slot.as_mut().expect("just set"))
    })
}

/// Decompresses at most `capacity` bytes (the header's length, itself capped).
fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    with_decompressor(|d| d.decompress(payload, capacity))
}

/// Length of the plaintext an envelope holds, read from its header alone.
pub fn plaintext_len(envelope: &[u8]) -> Result<u32, EnvelopeError> {
    let header = parse_header(envelope)?;
    Ok(header.1)
}

fn parse_header(envelope: &[u8]) -> Result<(u8, u32), EnvelopeError> {
    if envelope.len() < HEADER_LEN {
        return Err(EnvelopeError::Truncated(envelope.len()));
    }
    if envelope[0] != ENVELOPE_VERSION {
        return Err(EnvelopeError::Version(envelope[0]));
    }
    let codec = envelope[1];
    if codec != CODEC_RAW && codec != CODEC_ZSTD {
        return Err(EnvelopeError::Codec(codec));
    }
    let len = u32::from_le_bytes([envelope[4], envelope[5], envelope[6], envelope[7]]);
    if len as usize > MAX_CHUNK_LEN {
        return Err(EnvelopeError::TooLarge(len));
    }
    Ok((codec, len))
}

/// Opens an envelope and returns the plaintext, without checking its hash.
pub fn open(envelope: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let (codec, len) = parse_header(envelope)?;
    let payload = &envelope[HEADER_LEN..];
    let plain = match codec {
        CODEC_RAW => payload.to_vec(),
        _ => {
            decompress(payload, len as usize).map_err(|e| EnvelopeError::Corrupt(e.to_string()))?
        }
    };
    check_len(&plain, len)?;
    Ok(plain)
}

/// The plaintext has the length its header gave.
fn check_len(plain: &[u8], len: u32) -> Result<(), EnvelopeError> {
    if plain.len() != len as usize {
        return Err(EnvelopeError::Corrupt(format!(
            "{} bytes where the header says {len}",
            plain.len()
        )));
    }
    Ok(())
}

/// The plaintext hashes to `expected`.
fn check_hash(plain: &[u8], expected: &ChunkId) -> Result<(), EnvelopeError> {
    let actual = ChunkId::of(plain);
    if actual != *expected {
        return Err(EnvelopeError::HashMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

/// Opens an envelope and checks that its plaintext hashes to `expected`.
pub fn open_verified(envelope: &[u8], expected: &ChunkId) -> Result<Vec<u8>, EnvelopeError> {
    let plain = open(envelope)?;
    check_hash(&plain, expected)?;
    Ok(plain)
}

/// [`open_verified`] for an envelope in a shared buffer: a raw payload's plaintext is a view of
/// the same buffer, not a copy (the restore path, where most bytes of media files arrive raw).
pub fn open_verified_shared(
    envelope: bytes::Bytes,
    expected: &ChunkId,
) -> Result<bytes::Bytes, EnvelopeError> {
    let (codec, _) = parse_header(&envelope)?;
    if codec != CODEC_RAW {
        return open_verified(&envelope, expected).map(bytes::Bytes::from);
    }
    verify(&envelope, expected)?;
    Ok(envelope.slice(HEADER_LEN..))
}

/// Checks that an envelope opens to a plaintext hashing to `expected`, and returns that
/// plaintext's length, without keeping the plaintext: a raw payload is hashed where it lies,
/// a compressed one is decompressed into a buffer each thread reuses (what the coordinator
/// does with every chunk it receives or verifies).
pub fn verify(envelope: &[u8], expected: &ChunkId) -> Result<u32, EnvelopeError> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (codec, len) = parse_header(envelope)?;
    let payload = &envelope[HEADER_LEN..];
    let check = |plain: &[u8]| {
        check_len(plain, len)?;
        check_hash(plain, expected)?;
        Ok(len)
    };
    if codec == CODEC_RAW {
        return check(payload);
    }
    SCRATCH.with(|scratch| {
        let mut plain = scratch.borrow_mut();
        plain.clear();
        plain.reserve(len as usize);
        with_decompressor(|d| d.decompress_to_buffer(payload, &mut *plain))
            .map_err(|e| EnvelopeError::Corrupt(e.to_string()))?;
        check(&plain)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_chunks_are_compressed_and_round_trip() {
        let plain = vec![7u8; 100_000];
        let env = seal(&plain, DEFAULT_ZSTD_LEVEL);
        assert_eq!(env[1], CODEC_ZSTD);
        assert!(env.len() < 1000);
        assert_eq!(open_verified(&env, &ChunkId::of(&plain)).unwrap(), plain);
    }

    #[test]
    fn incompressible_chunks_stay_raw() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let plain: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let env = seal(&plain, DEFAULT_ZSTD_LEVEL);
        assert_eq!(env[1], CODEC_RAW);
        assert_eq!(open(&env).unwrap(), plain);
    }

    #[test]
    fn verify_agrees_with_open_verified() {
        let text = b"the same line again\n".repeat(5000);
        let random: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for plain in [text, random] {
            let id = ChunkId::of(&plain);
            let env = seal(&plain, DEFAULT_ZSTD_LEVEL);
            assert_eq!(verify(&env, &id).unwrap() as usize, plain.len());
            assert_eq!(
                open_verified_shared(env.clone().into(), &id).unwrap(),
                plain
            );
            let wrong = ChunkId::of(b"something else");
            assert!(matches!(
                verify(&env, &wrong),
                Err(EnvelopeError::HashMismatch { .. })
            ));
            let mut cut = env.clone();
            cut.truncate(env.len() - 1);
            assert!(verify(&cut, &id).is_err());
        }
    }

    #[test]
    fn a_wrong_id_is_a_hash_mismatch() {
        let env = seal(b"abc", 3);
        let err = open_verified(&env, &ChunkId::of(b"abd")).unwrap_err();
        assert!(matches!(err, EnvelopeError::HashMismatch { .. }));
    }

    #[test]
    fn a_huge_claimed_length_is_refused_before_allocating() {
        let mut env = seal(b"abc", 3);
        env[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(open(&env), Err(EnvelopeError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn envelope_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let env = seal(&data, 1);
            prop_assert_eq!(open_verified(&env, &ChunkId::of(&data)).unwrap(), data);
        }

        #[test]
        fn verify_never_panics_and_accepts_only_the_true_content(data in proptest::collection::vec(any::<u8>(), 0..2048), flip in 0usize..2048) {
            let id = ChunkId::of(&data);
            let mut env = seal(&data, 1);
            prop_assert_eq!(verify(&env, &id).unwrap() as usize, data.len());
            let at = flip % env.len();
            env[at] ^= 0x40;
            if let Ok(plain) = open(&env) {
                prop_assert_eq!(verify(&env, &id).is_ok(), plain == data);
                prop_assert_eq!(open_verified_shared(env.clone().into(), &id).is_ok(), plain == data);
            } else {
                prop_assert!(verify(&env, &id).is_err());
            }
        }

        #[test]
        fn mutated_envelopes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048),
                                         flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut env = seal(&data, 1);
            for (pos, bits) in flips {
                let i = pos % env.len();
                env[i] ^= bits;
            }
            let _ = open(&env);
        }
    }
}
