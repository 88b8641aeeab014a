//! Manifests: what a snapshot contains.
//!
//! A stream source (a dump, a command's output) has a [`StreamManifest`]: the ordered chunk
//! list, the total length and a BLAKE3 of the whole stream. A file tree has a [`TreeManifest`]:
//! one [`TreeEntry`] per file, directory or symlink, each file with its own chunk list.
//!
//! The encoded [`Manifest`] is itself cut into chunks and stored like data, so an unchanged
//! part of a large tree deduplicates too; the snapshot record keeps only the small
//! [`StreamManifest`] of the encoded manifest (its "root").

use serde::{Deserialize, Serialize};

use crate::id::ChunkId;

/// Format version of an encoded manifest (the first byte).
pub const MANIFEST_VERSION: u8 = 1;

/// A chunk as a manifest refers to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk's id.
    pub id: ChunkId,
    /// Its plaintext length.
    pub len: u32,
}

/// An ordered stream of chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamManifest {
    /// The chunks, in stream order.
    pub chunks: Vec<ChunkRef>,
    /// Total plaintext length.
    pub len: u64,
    /// BLAKE3 of the whole plaintext stream.
    pub checksum: [u8; 32],
}

/// What a tree entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One file, directory or symlink of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative path, components joined by `/`, raw bytes (file names need not be UTF-8).
    pub path: Vec<u8>,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// File size in bytes (0 for directories and symlinks).
    pub size: u64,
    /// Inode number at backup time, used only to recognise unchanged files next time.
    pub inode: u64,
    /// Symlink target, raw bytes.
    pub target: Option<Vec<u8>>,
    /// The file's content.
    pub chunks: Vec<ChunkRef>,
}

/// A file tree in path order (a directory comes before what it contains).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeManifest {
    /// All entries.
    pub entries: Vec<TreeEntry>,
}

/// What a snapshot contains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Manifest {
    /// One byte stream.
    Stream(StreamManifest),
    /// A file tree.
    Tree(TreeManifest),
}

/// An encoded manifest that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Empty input.
    #[error("manifest is empty")]
    Empty,
    /// Unknown version byte.
    #[error("manifest version {0} is not supported")]
    Version(u8),
    /// Not a valid encoding.
    #[error("manifest is corrupt: {0}")]
    Corrupt(#[from] postcard::Error),
    /// Valid prefix followed by garbage.
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
}

impl Manifest {
    /// Encodes with a leading version byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MANIFEST_VERSION];
        // Serialising into a Vec cannot fail for these types (no maps with non-string keys,
        // no unbounded recursion).
        out.extend(postcard::to_stdvec(self).expect("manifest serialises"));
        out
    }

    /// Decodes what [`Manifest::encode`] produced, refusing trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let (&version, rest) = bytes.split_first().ok_or(ManifestError::Empty)?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::Version(version));
        }
        let (m, rest) = postcard::take_from_bytes(rest)?;
        if !rest.is_empty() {
            return Err(ManifestError::Trailing(rest.len()));
        }
        Ok(m)
    }

    /// Every data chunk, in the order a restore consumes them.
    pub fn data_chunks(&self) -> Box<dyn Iterator<Item = &ChunkRef> + '_> {
        match self {
            Manifest::Stream(s) => Box::new(s.chunks.iter()),
            Manifest::Tree(t) => Box::new(t.entries.iter().flat_map(|e| e.chunks.iter())),
        }
    }

    /// Checks that the lengths agree: a stream's length is the sum of its chunks' lengths, a
    /// file's size the sum of its chunks', and nothing but a file has chunks. Says what
    /// disagrees (the chunks' own lengths are checked against the store by the coordinator).
    pub fn check_sizes(&self) -> Result<(), String> {
        let sum = |chunks: &[ChunkRef]| chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
        match self {
            Manifest::Stream(s) if sum(&s.chunks) != s.len => Err(format!(
                "the stream's chunks hold {} bytes, its length says {}",
                sum(&s.chunks),
                s.len
            )),
            Manifest::Stream(_) => Ok(()),
            Manifest::Tree(t) => {
                for e in &t.entries {
                    let ok = match e.kind {
                        EntryKind::File => sum(&e.chunks) == e.size,
                        EntryKind::Dir | EntryKind::Symlink => e.chunks.is_empty(),
                    };
                    if !ok {
                        return Err(format!(
                            "entry {:?}: its chunks hold {} bytes, its size says {}",
                            String::from_utf8_lossy(&e.path),
                            sum(&e.chunks),
                            e.size
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Bytes of data the manifest describes (stream length or sum of file sizes).
    pub fn logical_len(&self) -> u64 {
        match self {
            Manifest::Stream(s) => s.len,
            Manifest::Tree(t) => t.entries.iter().map(|e| e.size).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest::Tree(TreeManifest {
            entries: vec![TreeEntry {
                path: b"a/b\xff".to_vec(),
                kind: EntryKind::File,
                mode: 0o640,
                uid: 1000,
                gid: 1000,
                mtime: 1_700_000_000,
                mtime_nsec: 5,
                size: 3,
                inode: 77,
                target: None,
                chunks: vec![ChunkRef {
                    id: ChunkId::of(b"abc"),
                    len: 3,
                }],
            }],
        })
    }

    #[test]
    fn manifest_round_trips_and_refuses_trailing_bytes() {
        let m = sample();
        let mut bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        bytes.push(0);
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::Trailing(1))
        ));
    }

    #[test]
    fn sizes_must_agree_with_chunk_lengths() {
        let mut m = sample();
        assert_eq!(m.check_sizes(), Ok(()));
        let Manifest::Tree(t) = &mut m else {
            unreachable!()
        };
        t.entries[0].size = 4;
        assert!(m.check_sizes().unwrap_err().contains("size says 4"));
        let s = Manifest::Stream(StreamManifest {
            chunks: vec![ChunkRef {
                id: ChunkId::of(b"abc"),
                len: 3,
            }],
            len: 5,
            checksum: [0; 32],
        });
        assert!(s.check_sizes().unwrap_err().contains("length says 5"));
    }

    proptest! {
        #[test]
        fn mutated_manifests_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                                         cut in any::<usize>()) {
            let mut bytes = sample().encode();
            for (pos, bits) in flips {
                let i = pos % bytes.len();
                bytes[i] ^= bits;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = Manifest::decode(&bytes);
        }
    }
}
