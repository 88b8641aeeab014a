//! Why an operation of the coordinator failed (a session's request, a job, a collection, a
//! verification), and the one place that decides which [`ErrorCode`] a peer is told.

use std::path::PathBuf;

use fleetvault_common::protocol::frame::FrameError;
use fleetvault_common::protocol::ErrorCode;
use fleetvault_common::SnapshotId;

use crate::catalog::CatalogError;
use crate::config::ConfigError;
use crate::limits::LimitError;
use crate::store::StoreError;

/// A failed operation; its `Display` is the message operators and peers see.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// The chunk store failed, or what it holds does not check out.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The catalog failed, or has no such snapshot.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The coordinator's own configuration is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A request over one of the limits.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A file of the data dir outside the store (a peer certificate) could not be handled.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stream a peer uploaded and commits does not read back as what the commit says (too
    /// large, not its checksum, not a manifest): the store's finding, the peer's doing.
    #[error(transparent)]
    BadUpload(StoreError),
    /// What a peer sent does not check out (a commit, a record, a bundle's index).
    #[error("{0}")]
    Refused(String),
    /// The snapshot is not in a state the operation accepts (running, protected).
    #[error("{0}")]
    Conflict(String),
    /// Another run of the same operation holds its lock.
    #[error("{0}")]
    Busy(&'static str),
    /// No such job, replica or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// A part of a bundle could not be handled.
    #[error("bundle {bundle}: part {part}: {source}")]
    Part {
        bundle: SnapshotId,
        part: SnapshotId,
        #[source]
        source: Box<OpError>,
    },
    /// Retention could not delete a snapshot it forgets.
    #[error("forgetting {id}: {source}")]
    Forgetting {
        id: SnapshotId,
        #[source]
        source: Box<OpError>,
    },
    /// A garbage collection stopped before its sweep: nothing was deleted.
    #[error("listing {what}: {source}; nothing deleted")]
    NothingDeleted {
        what: &'static str,
        #[source]
        source: Box<OpError>,
    },
    /// A garbage collection's sweep stopped after deleting `deleted` chunks.
    #[error("{source} (after deleting {deleted} chunks)")]
    Sweep {
        deleted: u64,
        #[source]
        source: StoreError,
    },
}

impl OpError {
    /// This error where the stream read is one a peer is committing: what the store finds
    /// wrong with it is the peer's doing.
    pub(crate) fn in_upload(self) -> Self {
        match self {
            OpError::Store(e) => OpError::BadUpload(e),
            other => other,
        }
    }

    /// The [`ErrorCode`] sent with this error's message: the peer's fault is `BadRequest`
    /// (or `HashMismatch` for a chunk that is not its id), a missing thing `NotFound`, and
    /// the coordinator's own failure (disk, catalog, data damaged here) `Internal`. The wire
    /// has no code for "busy, try again": a collection already running is a `BadRequest`.
    pub(crate) fn wire_code(&self) -> ErrorCode {
        match self {
            OpError::Store(StoreError::BadChunk { .. }) => ErrorCode::HashMismatch,
            OpError::BadUpload(StoreError::Io { .. } | StoreError::Read { .. }) => {
                ErrorCode::Internal
            }
            OpError::BadUpload(_) => ErrorCode::BadRequest,
            // What is stored here no longer reads back: lost or damaged since its commit.
            OpError::Store(_) => ErrorCode::Internal,
            OpError::Catalog(CatalogError::NotFound(_)) | OpError::NotFound(_) => {
                ErrorCode::NotFound
            }
            OpError::Catalog(CatalogError::IdOutOfRange(_)) => ErrorCode::BadRequest,
            OpError::Catalog(CatalogError::Db(_) | CatalogError::Corrupt(_))
            | OpError::Config(_)
            | OpError::Io { .. }
            | OpError::Sweep { .. } => ErrorCode::Internal,
            OpError::Limit(_) | OpError::Refused(_) | OpError::Conflict(_) | OpError::Busy(_) => {
                ErrorCode::BadRequest
            }
            OpError::Part { source, .. }
            | OpError::Forgetting { source, .. }
            | OpError::NothingDeleted { source, .. } => source.wire_code(),
        }
    }
}

/// Why a request stream ended without success.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// Tell the caller, keep the connection.
    #[error("{1}")]
    Reply(ErrorCode, String),
    /// The peer broke the protocol: close the whole connection with the reason.
    #[error("{0}")]
    Protocol(String),
    /// The stream or connection is gone; nothing to tell.
    #[error("agent gone")]
    Gone,
}

impl From<FrameError> for Failure {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(_) => Failure::Gone,
            other => Failure::Protocol(other.to_string()),
        }
    }
}

/// An operation's error goes back with the code [`OpError::wire_code`] picks.
impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        Failure::Reply(e.wire_code(), e.to_string())
    }
}

impl From<CatalogError> for Failure {
    fn from(e: CatalogError) -> Self {
        OpError::from(e).into()
    }
}
