//! The restore side of a session: stream a snapshot's chunks to the reader.
//!
//! An agent may read its own snapshots, and another agent's only while an operator's pushed
//! restore grants it. The coordinator verifies the manifest (it must decode it to know the
//! order) but sends data chunks as stored: the reader verifies every chunk and the whole
//! stream (docs/architecture.md rule 4), so damage is reported where it is used, with the chunk named.

use std::sync::Arc;

use fleetvault_certs::Role;
use fleetvault_common::protocol::frame::{write_frame, write_frame_with_tail};
use fleetvault_common::protocol::{ErrorCode, ReadPart, Response};
use fleetvault_common::{ChunkId, SnapshotId, SnapshotStatus};

use super::session::Session;
use crate::error::Failure;
use crate::store::load_manifest;

/// Chunks read ahead of the network.
const READ_AHEAD: usize = 16;

impl Session {
    pub(super) async fn read(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        part: ReadPart,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require_any(&[Role::Operator, Role::Agent])?;
        let rec = self.state.catalog.get(snapshot)?;
        let allowed = match self.identity.role {
            Role::Operator => true,
            Role::Agent => {
                rec.agent == self.identity.name || self.state.live.granted(self.name(), snapshot)
            }
            _ => false,
        };
        if !allowed {
            return Err(Failure::Reply(
                ErrorCode::Forbidden,
                format!("snapshot {snapshot} belongs to agent {}; only an operator can restore it elsewhere", rec.agent),
            ));
        }
        let Some(root) = rec
            .root
            .clone()
            .filter(|_| rec.status == SnapshotStatus::Completed)
        else {
            return Err(Failure::Reply(
                ErrorCode::NotFound,
                format!(
                    "snapshot {snapshot} is {}, not completed",
                    rec.status.name()
                ),
            ));
        };
        let this = self.clone();
        let root2 = root.clone();
        let (manifest, envelopes) =
            tokio::task::spawn_blocking(move || load_manifest(&this.state.store, snapshot, &root2))
                .await
                .map_err(|e| Failure::Reply(ErrorCode::Internal, e.to_string()))?
                .map_err(|e| Failure::from(crate::error::OpError::from(e)))?;
        write_frame(send, &Response::Reading(rec)).await?;
        for (c, envelope) in root.chunks.iter().zip(envelopes) {
            write_frame(send, &Response::Chunk { id: c.id, envelope }).await?;
        }
        if part == ReadPart::All {
            let ids: Vec<ChunkId> = manifest.data_chunks().map(|c| c.id).collect();
            drop(manifest);
            let (tx, mut rx) = tokio::sync::mpsc::channel(READ_AHEAD);
            let this = self.clone();
            let reader = tokio::task::spawn_blocking(move || {
                for id in ids {
                    let item = this.state.store.get(&id).map(|env| (id, env));
                    let stop = item.is_err();
                    if tx.blocking_send(item).is_err() || stop {
                        break;
                    }
                }
            });
            while let Some(item) = rx.recv().await {
                match item {
                    Ok((id, Some(envelope))) => {
                        let msg = Response::Chunk {
                            id,
                            envelope: Vec::new(),
                        };
                        write_frame_with_tail(send, &msg, envelope).await?;
                    }
                    Ok((id, None)) => write_frame(send, &Response::ChunkMissing { id }).await?,
                    Err(e) => {
                        reader.abort();
                        return Err(Failure::Reply(ErrorCode::Internal, e.to_string()));
                    }
                }
            }
        }
        Ok(write_frame(send, &Response::End).await?)
    }
}
