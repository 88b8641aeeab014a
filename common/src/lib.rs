//! What agent and coordinator share.
//!
//! The vocabulary of the data flow:
//!
//! ```text
//! Source ──bytes──▶ Chunker ──chunks──▶ Uploader ══QUIC/mTLS══▶ Session ──▶ ChunkStore / Catalog
//! ```
//!
//! - a **chunk** is a piece of a byte stream cut by content-defined chunking ([`Chunker`]),
//!   named by the BLAKE3 of its plaintext ([`ChunkId`]);
//! - an **envelope** ([`chunk`]) is how a chunk is stored and sent: a versioned header and the
//!   zstd-compressed (or raw) payload;
//! - a **manifest** ([`Manifest`]) says what a snapshot contains: one stream, or a file tree;
//! - a **snapshot** ([`SnapshotRecord`]) is one backup of one source of one agent.
//!
//! The wire protocol lives in [`protocol`]; the QUIC and TLS endpoints in `transport`.

pub mod alloc;
pub mod chunk;
mod chunker;
pub mod cli;
mod client;
mod config;
pub mod durable;
pub mod exit;
mod id;
mod kind;
mod manifest;
pub mod protocol;
pub mod report;
pub mod select;
mod transport;

pub use chunker::{Chunk, Chunker, ChunkerParams};
pub use client::{Client, ClientError, ReadItem, ReadStream, SnapshotRead, CONNECT_TIMEOUT};
pub use config::parse_toml;
pub use id::{AgentName, ChunkId, ParseIdError, SnapshotId};
pub use kind::SnapshotKind;
pub use manifest::{
    ChunkRef, EntryKind, Manifest, ManifestError, StreamManifest, TreeEntry, TreeManifest,
    MANIFEST_VERSION,
};
pub use protocol::{JobReport, SnapshotRecord, SnapshotStatus};
pub use transport::*;
