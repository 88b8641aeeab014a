//! The replica's side of replication: a peer (a primary coordinator holding a certificate
//! from `issue-peer`) may ask which snapshots are here, upload chunks (`Missing`,
//! `PutChunks`, verified like an agent's) and commit snapshot records. Nothing else: it cannot
//! list, read, delete or push.
//!
//! A received snapshot keeps the primary's id and record. It is listed only once its commit
//! has checked that the manifest and every chunk it references are here and were uploaded by
//! this peer, and written the record to the store (docs/architecture.md rule 8). The snapshot's agent
//! gets the chunk references too, so after a disaster it can back up here incrementally and
//! restore its own snapshots.

use std::sync::Arc;

use fleetvault_certs::Role;
use fleetvault_common::protocol::frame::write_frame;
use fleetvault_common::protocol::{ErrorCode, Response, MAX_MISSING_BATCH};
use fleetvault_common::{SnapshotId, SnapshotRecord, SnapshotStatus};
use tracing::{info, warn};

use super::session::{Backup, Session};
use crate::catalog::CatalogError;
use crate::error::Failure;
use crate::error::OpError;
use crate::jobs::verify::check_fields;
use crate::store::load_manifest;
use crate::State;

impl Session {
    pub(super) async fn replica_have(
        self: &Arc<Self>,
        ids: Vec<SnapshotId>,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Peer)?;
        if ids.len() > MAX_MISSING_BATCH {
            return Err(Failure::Protocol(format!(
                "{} ids in one ReplicaHave request, over the limit",
                ids.len()
            )));
        }
        let st = self.state.clone();
        let have = self
            .blocking(move || {
                let mut out = Vec::new();
                for id in ids {
                    let here = match st.catalog.get(id) {
                        Ok(r) => r.status == SnapshotStatus::Completed,
                        Err(CatalogError::NotFound(_)) => false,
                        Err(e) => return Err(e.into()),
                    };
                    if here || st.catalog.is_tombstoned(id)? {
                        out.push(id);
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(write_frame(send, &Response::ReplicaHave { ids: have }).await?)
    }

    pub(super) async fn replica_begin(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Peer)?;
        crate::catalog::Catalog::check_foreign_id(snapshot)?;
        self.running.lock().expect("running lock").insert(
            snapshot,
            Backup {
                replica: true,
                ..Backup::default()
            },
        );
        Ok(write_frame(send, &Response::Ok).await?)
    }

    pub(super) async fn replica_commit(
        self: &Arc<Self>,
        rec: SnapshotRecord,
        send: &mut quinn::SendStream,
    ) -> Result<(), Failure> {
        self.require(Role::Peer)?;
        let snapshot = rec.id;
        self.require_running(snapshot)?;
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.replica_commit_blocking(rec))
            .await
            .map_err(|e| Failure::Reply(ErrorCode::Internal, e.to_string()))?;
        self.running.lock().expect("running lock").remove(&snapshot);
        self.release_pins();
        match result {
            Ok(rec) => {
                info!(snapshot = %snapshot, agent = %rec.agent, source = %rec.source, "replicated snapshot committed");
                if let Some(peer) = self.state.peer(self.name()) {
                    if !peer.retention.is_empty() {
                        let st = self.state.clone();
                        let name = self.name().to_owned();
                        let _ = self
                            .blocking(move || {
                                crate::jobs::snapshots::forget_received(&st, &name, &peer.retention)
                            })
                            .await
                            .map_err(|_| warn!(peer = %self.name(), "replica retention failed"));
                    }
                }
                Ok(write_frame(send, &Response::Committed(rec)).await?)
            }
            Err(reason) => {
                warn!(snapshot = %snapshot, %reason, "replicated snapshot refused");
                Err(reason.into())
            }
        }
    }

    /// Checks a replicated record against what was uploaded and stores it.
    fn replica_commit_blocking(&self, rec: SnapshotRecord) -> Result<SnapshotRecord, OpError> {
        let id = rec.id;
        let catalog = &self.state.catalog;
        let store = &self.state.store;
        if rec.status != SnapshotStatus::Completed {
            return Err(OpError::Refused(format!(
                "snapshot {id} is {}, not completed",
                rec.status.name()
            )));
        }
        crate::catalog::Catalog::check_foreign_id(id)?;
        fleetvault_certs::validate_name(&rec.agent)
            .map_err(|e| OpError::Refused(format!("snapshot {id}: agent name: {e}")))?;
        if rec.source.is_empty() || rec.source.len() > 128 || rec.source.contains(['/', '\0']) {
            return Err(OpError::Refused(format!(
                "snapshot {id}: invalid source name {:?}",
                rec.source
            )));
        }
        if catalog.is_tombstoned(id)? {
            return Ok(rec);
        }
        match catalog.get(id) {
            Ok(existing) if existing.status == SnapshotStatus::Completed => {
                let same = SnapshotRecord {
                    protected: existing.protected,
                    tags: existing.tags.clone(),
                    ..rec.clone()
                };
                return if same == existing {
                    Ok(existing)
                } else {
                    Err(OpError::Refused(format!(
                        "snapshot id {id} is already used here by another snapshot ({}/{})",
                        existing.agent, existing.source
                    )))
                };
            }
            Ok(existing) => {
                return Err(OpError::Refused(format!(
                    "snapshot id {id} is already used here by a {} snapshot of {}",
                    existing.status.name(),
                    existing.agent
                )))
            }
            Err(CatalogError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let root = rec
            .root
            .as_ref()
            .ok_or_else(|| OpError::Refused(format!("snapshot {id} has no manifest")))?;
        // As an agent's commit: the manifest's chunks proven before they are read.
        let mut seen = std::collections::HashMap::new();
        self.check_chunks(id, root.chunks.iter(), &mut seen)?;
        let (manifest, _) = load_manifest(store, id, root).map_err(OpError::BadUpload)?;
        let data_chunks = manifest.data_chunks().count() as u64;
        if data_chunks != rec.chunks || manifest.logical_len() != rec.logical_bytes {
            return Err(OpError::Refused(format!(
                "snapshot {id}: the record says {} chunks and {} bytes, its manifest {data_chunks} and {}",
                rec.chunks,
                rec.logical_bytes,
                manifest.logical_len()
            )));
        }
        self.check_chunks(id, manifest.data_chunks(), &mut seen)?;
        check_fields(id, &manifest, rec.checksum)?;
        // Parts come before their bundle (oldest first); those not sent here may be absent.
        crate::bundle::check_commit(&self.state, &rec, &manifest, true)?;
        let owner = self.owner();
        store.write_record(&rec)?;
        catalog.add_refs(&rec.agent, seen.keys())?;
        catalog.add_refs(&owner, seen.keys())?;
        catalog.adopt(&rec, self.name())?;
        Ok(rec)
    }
}

/// Makes this coordinator a primary: every peer certificate issued here is moved to
/// `tls/peers/retired/` (a lost primary that comes back can no longer add snapshots).
/// Returns the retired peer names and the agents whose snapshots are here.
pub(super) fn promote(state: &State) -> Result<(Vec<String>, Vec<String>), OpError> {
    let dir = state.root.join("tls").join("peers");
    let retired_dir = dir.join("retired");
    let mut retired = Vec::new();
    if dir.is_dir() {
        std::fs::create_dir_all(&retired_dir).map_err(io_err("creating", &retired_dir))?;
        let entries = std::fs::read_dir(&dir).map_err(io_err("listing", &dir))?;
        for entry in entries {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
            else {
                continue;
            };
            let to = retired_dir.join(format!("{name}.{}.pem", crate::clock::now_ms()));
            fleetvault_common::durable::rename(&path, &to).map_err(io_err("retiring", &path))?;
            retired.push(name.to_owned());
        }
    }
    retired.sort();
    let mut agents: Vec<String> = state
        .catalog
        .list(&Default::default())?
        .into_iter()
        .filter(|r| r.status == SnapshotStatus::Completed)
        .map(|r| r.agent)
        .collect();
    agents.sort();
    agents.dedup();
    info!(retired = ?retired, "promoted to primary");
    Ok((retired, agents))
}

/// An I/O error of `op` on `path`.
fn io_err(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> OpError {
    let path = path.to_owned();
    move |source| OpError::Io { op, path, source }
}
