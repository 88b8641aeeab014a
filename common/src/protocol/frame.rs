//! Length-prefixed postcard frames, written to a quinn stream and read from any byte stream.
//!
//! A frame is a u32 little-endian body length followed by the postcard body. The reader
//! refuses a length over [`MAX_FRAME_LEN`] before allocating, returns `Ok(None)` on a clean
//! end between frames, errs on an end inside one, and refuses trailing bytes in a body.
//! `read_frame` is not cancel-safe: never race it against a shutdown signal.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::MAX_FRAME_LEN;
use crate::id::ChunkId;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body has bytes after the message.
    #[error("malformed frame: {0} trailing bytes")]
    Trailing(usize),
    /// The stream failed.
    #[error("stream failed: {0}")]
    Io(#[source] std::io::Error),
}

/// Encodes `msg` as one frame, sized up front so that a chunk's bytes are copied once.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // postcard into a Vec cannot fail for our message types (no unsupported serde features).
    let len = postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
        .expect("message serialises");
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    postcard::serialize_with_flavor(msg, Frame(out)).expect("message serialises")
}

/// A postcard output that appends slices with one copy (postcard's `to_extend` pushes them
/// byte by byte).
struct Frame(Vec<u8>);

impl postcard::ser_flavors::Flavor for Frame {
    type Output = Vec<u8>;

    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.0.push(b);
        Ok(())
    }

    fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(b);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Writes the frame of a message whose last field is a byte string (a chunk's envelope)
/// without copying those bytes: `msg` is the message with that field empty, `tail` the
/// field's bytes. The stream carries exactly what [`write_frame`] of the whole message would.
pub async fn write_frame_with_tail<T: Serialize>(
    w: &mut quinn::SendStream,
    msg: &T,
    tail: Vec<u8>,
) -> Result<(), FrameError> {
    let head = encode_head(msg, tail.len())?;
    w.write_all_chunks(&mut [bytes::Bytes::from(head), bytes::Bytes::from(tail)])
        .await
        .map_err(|e| FrameError::Io(e.into()))
}

/// Writes a [`Request::Chunk`] without copying the envelope (an upload's or a replica's).
pub async fn write_chunk_request(
    w: &mut quinn::SendStream,
    id: crate::ChunkId,
    envelope: Vec<u8>,
) -> Result<(), FrameError> {
    let msg = super::Request::Chunk {
        id,
        envelope: Vec::new(),
    };
    write_frame_with_tail(w, &msg, envelope).await
}

/// The frame of `msg` (whose last field is an empty byte string) up to where a `tail_len`
/// bytes long last field's bytes would start.
fn encode_head<T: Serialize>(msg: &T, tail_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut head = encode(msg);
    // A byte string is encoded as its length (a varint, as postcard encodes a usize) and its
    // bytes: the empty one is a single 0, replaced by the tail's length.
    assert_eq!(
        head.pop(),
        Some(0),
        "the message must end with an empty byte field"
    );
    let mut head = postcard::to_extend(&tail_len, head).expect("a usize serialises");
    let body = head.len() - 4 + tail_len;
    if body > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body as u64));
    }
    head[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(head)
}

/// Decodes one frame body, refusing trailing bytes.
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Writes one frame. The encoded frame is handed to quinn as it is (`write_chunk`), not copied
/// into its send buffer.
pub async fn write_frame<T: Serialize>(
    w: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = encode(msg);
    if bytes.len() - 4 > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge((bytes.len() - 4) as u64));
    }
    w.write_chunk(bytes::Bytes::from(bytes))
        .await
        .map_err(|e| FrameError::Io(e.into()))
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a frame starts.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_body(r).await? {
        Some(body) => decode_body(&body).map(Some),
        None => Ok(None),
    }
}

/// [`read_frame`] refusing a frame longer than `max` before allocating.
pub async fn read_frame_max<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_len(r, max).await? {
        Some(len) => decode_body(&read_body_of(r, len).await?).map(Some),
        None => Ok(None),
    }
}

/// A frame read by [`read_frame_or_chunk`].
#[derive(Debug)]
pub enum Incoming<T> {
    /// A chunk frame; its envelope is a view of the frame's own buffer.
    Chunk {
        /// The chunk's id, as the frame gives it.
        id: ChunkId,
        /// The sealed chunk.
        envelope: Bytes,
    },
    /// Any other message.
    Message(T),
}

/// A message type with a chunk variant, `{ id: ChunkId, envelope: bytes }`, that
/// [`read_frame_or_chunk`] reads without copying the envelope out of the frame.
pub trait WithChunks: DeserializeOwned {
    /// The chunk variant's postcard tag (the variant's index, one varint byte).
    const CHUNK_TAG: u8;
}

/// [`read_frame`], except that a chunk frame's envelope stays in the buffer the frame was read
/// into (decoding it as a message would copy every chunk's bytes once more).
pub async fn read_frame_or_chunk<T: WithChunks, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Incoming<T>>, FrameError> {
    let Some(body) = read_body(r).await? else {
        return Ok(None);
    };
    decode_incoming(body).map(Some)
}

/// Decodes a frame body, a chunk frame's envelope left in place.
fn decode_incoming<T: WithChunks>(body: Vec<u8>) -> Result<Incoming<T>, FrameError> {
    if body.first() != Some(&T::CHUNK_TAG) {
        return decode_body(&body).map(Incoming::Message);
    }
    // The envelope is the body's last field and trailing bytes are refused: it is the tail.
    let (id, envelope): (ChunkId, &[u8]) = decode_body(&body[1..])?;
    let start = body.len() - envelope.len();
    Ok(Incoming::Chunk {
        id,
        envelope: Bytes::from(body).slice(start..),
    })
}

/// Reads one frame's body; `Ok(None)` when the stream ends cleanly before a frame starts.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    match read_len(r, MAX_FRAME_LEN).await? {
        Some(len) => read_body_of(r, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads only a frame's length prefix, refusing a length over `max` (itself at most
/// [`MAX_FRAME_LEN`]); `Ok(None)` when the stream ends cleanly before a frame starts. With
/// [`read_frame_body`] it lets a reader decide how much it may buffer before allocating.
pub async fn read_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await.map_err(FrameError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max.min(MAX_FRAME_LEN) {
        return Err(FrameError::TooLarge(len as u64));
    }
    Ok(Some(len))
}

/// Reads the `len` bytes of a frame body whose prefix [`read_len`] returned, and decodes it as
/// [`read_frame_or_chunk`] does.
pub async fn read_frame_body<T: WithChunks, R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Incoming<T>, FrameError> {
    let body = read_body_of(r, len).await?;
    decode_incoming(body)
}

/// Reads a body of `len` bytes (at most [`MAX_FRAME_LEN`]).
async fn read_body_of<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len as u64));
    }
    // Read into spare capacity: a chunk's megabyte is not zeroed first.
    let mut body = Vec::with_capacity(len);
    let mut rest = r.take(len as u64);
    while body.len() < len {
        match rest.read_buf(&mut body).await {
            Ok(0) => return Err(FrameError::Truncated),
            Ok(_) => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ChunkId, SnapshotId};
    use crate::protocol::{ReadPart, Request, Response};
    use proptest::prelude::*;

    #[test]
    fn a_frame_with_its_tail_apart_is_the_whole_frame() {
        let id = ChunkId::of(b"x");
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000, 1 << 20] {
            let envelope: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut parts = encode_head(
                &Response::Chunk {
                    id,
                    envelope: Vec::new(),
                },
                len,
            )
            .unwrap();
            parts.extend_from_slice(&envelope);
            assert_eq!(parts, encode(&Response::Chunk { id, envelope }), "{len}");
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    /// Reads every frame of `bytes` as `T` until the end or the first error.
    fn read_all<T: DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>, FrameError> {
        rt().block_on(async {
            let mut r = bytes;
            let mut out = Vec::new();
            while let Some(m) = read_frame::<T, _>(&mut r).await? {
                out.push(m);
            }
            Ok(out)
        })
    }

    /// [`read_all`] through [`read_frame_or_chunk`], chunk frames turned back into messages.
    fn read_all_chunks(bytes: &[u8]) -> Result<Vec<Request>, FrameError> {
        rt().block_on(async {
            let mut r = bytes;
            let mut out = Vec::new();
            while let Some(m) = read_frame_or_chunk::<Request, _>(&mut r).await? {
                out.push(match m {
                    Incoming::Chunk { id, envelope } => Request::Chunk {
                        id,
                        envelope: envelope.to_vec(),
                    },
                    Incoming::Message(m) => m,
                });
            }
            Ok(out)
        })
    }

    fn valid_frames() -> Vec<u8> {
        let mut bytes = encode(&Request::Read {
            snapshot: SnapshotId(9),
            part: ReadPart::All,
        });
        bytes.extend(encode(&Request::Chunk {
            id: ChunkId::of(b"x"),
            envelope: vec![1, 2, 3, 4, 5],
        }));
        bytes.extend(encode(&Response::End));
        bytes
    }

    #[test]
    fn frames_round_trip() {
        let msgs = vec![
            Request::Missing {
                ids: vec![ChunkId::of(b"a")],
            },
            Request::ListAgents,
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode(m));
        }
        assert_eq!(read_all::<Request>(&bytes).unwrap(), msgs);
    }

    #[test]
    fn a_chunk_frame_is_read_with_its_envelope_in_place() {
        let id = ChunkId::of(b"x");
        let frames = [
            encode(&Request::ListAgents),
            encode(&Request::Chunk {
                id,
                envelope: (0..300).map(|i| i as u8).collect(),
            }),
        ]
        .concat();
        rt().block_on(async {
            let mut r = &frames[..];
            let first = read_frame_or_chunk::<Request, _>(&mut r).await.unwrap();
            assert!(matches!(
                first,
                Some(Incoming::Message(Request::ListAgents))
            ));
            match read_frame_or_chunk::<Request, _>(&mut r).await.unwrap() {
                Some(Incoming::Chunk { id: got, envelope }) => {
                    assert_eq!(got, id);
                    assert_eq!(envelope.len(), 300);
                    assert!(envelope.iter().enumerate().all(|(i, &b)| b == i as u8));
                }
                other => panic!("not a chunk: {other:?}"),
            }
            assert!(read_frame_or_chunk::<Request, _>(&mut r)
                .await
                .unwrap()
                .is_none());
        });
        let mut trailing = encode(&Request::Chunk {
            id,
            envelope: vec![1],
        });
        trailing.push(0);
        let len = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_all_chunks(&trailing),
            Err(FrameError::Trailing(1))
        ));
    }

    #[test]
    fn huge_length_prefix_is_refused_before_allocating() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            read_all::<Request>(&bytes),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn end_inside_a_frame_is_an_error_and_clean_end_is_none() {
        let bytes = valid_frames();
        assert!(matches!(
            read_all::<Request>(&bytes[..bytes.len() - 1]),
            Err(FrameError::Truncated | FrameError::Malformed(_))
        ));
        assert!(matches!(
            read_all::<Request>(&bytes[..2]),
            Err(FrameError::Truncated)
        ));
        assert!(read_all::<Request>(&[]).unwrap().is_empty());
    }

    #[test]
    fn trailing_bytes_in_a_body_are_refused() {
        let mut frame = encode(&Request::ListAgents);
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_all::<Request>(&frame),
            Err(FrameError::Trailing(1))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_all::<Request>(&bytes);
            let _ = read_all::<Response>(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                      cut in any::<usize>(), extra in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = valid_frames();
            for (pos, bits) in flips {
                let i = pos % bytes.len();
                bytes[i] ^= bits;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend(extra);
            // Reading chunk frames in place reads exactly what decoding them would.
            let whole = read_all::<Request>(&bytes);
            let in_place = read_all_chunks(&bytes);
            prop_assert_eq!(whole.as_ref().ok(), in_place.as_ref().ok());
            prop_assert_eq!(whole.is_ok(), in_place.is_ok());
            let _ = read_all::<Response>(&bytes);
        }

        #[test]
        fn huge_lengths_in_valid_frames_are_refused(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
            let mut bytes = valid_frames();
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            prop_assert!(matches!(read_all::<Request>(&bytes), Err(FrameError::TooLarge(_))));
        }
    }
}
