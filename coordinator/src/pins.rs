//! Garbage collection's pins: the chunks it must keep besides those of completed snapshots.
//!
//! The durability rule (docs/architecture.md rule 9): **a garbage collection never deletes a
//! chunk that a running backup may still reference.** A backup may reference
//!
//! - a chunk it was answered "present" for by `Missing`, or uploaded, or that its commit
//!   found in the store: pinned for its connection ([`PinGuard::pin`]) until the connection
//!   has no backup running ([`PinGuard::release`]);
//! - a chunk of the parent it was given at `Begin`, whose chunk lists an incremental files
//!   backup reuses without asking `Missing`, also if the parent is deleted meanwhile
//!   ([`PinGuard::pin_parent`]; a collection marks them, [`Pins::parents`]);
//! - a chunk released while a collection runs: that collection's marking predates the commit
//!   that released it, so it stays held until the collection ends
//!   ([`Pins::collection_started`], [`Pins::collection_ended`]).
//!
//! The lock is also what makes the checks atomic: an answer "present", a commit's check of a
//! chunk, and a collection's deletion of the same chunk (or a pruning of its ref) each happen
//! under it ([`Pins::lock`]), so they never interleave.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use fleetvault_common::{ChunkId, SnapshotId, StreamManifest};

/// What garbage collection must keep for running backups; see the module doc.
#[derive(Default)]
pub(crate) struct Pins(Mutex<Held>);

#[derive(Default)]
struct Held {
    /// Per connection: chunks its running backups were answered "present" for or uploaded.
    by_conn: HashMap<usize, HashSet<ChunkId>>,
    /// Whether a garbage collection is between marking and the end of deleting.
    gc_running: bool,
    /// Pins released while a collection runs.
    released: HashSet<ChunkId>,
    /// Per connection: the parent snapshots (id, manifest root) its running backups were
    /// given at `Begin`.
    parents: HashMap<usize, Vec<(SnapshotId, StreamManifest)>>,
}

/// The pins, locked: what is checked under the guard cannot interleave with a deletion.
pub(crate) struct PinGuard<'a>(MutexGuard<'a, Held>);

impl Pins {
    /// Locks the pins for a check that must not interleave with a collection's deletion.
    pub(crate) fn lock(&self) -> PinGuard<'_> {
        PinGuard(self.0.lock().expect("pins lock"))
    }

    /// Pins `ids` for connection `conn`'s running backups.
    pub(crate) fn pin_all(&self, conn: usize, ids: impl IntoIterator<Item = ChunkId>) {
        self.lock().pin_all(conn, ids);
    }

    /// Connection `conn` has no backup running any more: its pins go (see
    /// [`PinGuard::release`]).
    pub(crate) fn release(&self, conn: usize) {
        self.lock().release(conn);
    }

    /// A collection starts marking: from now on, released pins stay held until it ends.
    pub(crate) fn collection_started(&self) {
        let mut held = self.lock();
        held.0.gc_running = true;
        held.0.released.clear();
    }

    /// The collection has ended deleting: pins released meanwhile go.
    pub(crate) fn collection_ended(&self) {
        let mut held = self.lock();
        held.0.gc_running = false;
        held.0.released.clear();
    }

    /// The parents running backups were given, for a collection to mark.
    pub(crate) fn parents(&self) -> Vec<(SnapshotId, StreamManifest)> {
        self.lock().0.parents.values().flatten().cloned().collect()
    }
}

impl PinGuard<'_> {
    /// Pins `id` for connection `conn`'s running backups.
    pub(crate) fn pin(&mut self, conn: usize, id: ChunkId) {
        self.0.by_conn.entry(conn).or_default().insert(id);
    }

    /// Pins `ids` for connection `conn`'s running backups.
    pub(crate) fn pin_all(&mut self, conn: usize, ids: impl IntoIterator<Item = ChunkId>) {
        self.0.by_conn.entry(conn).or_default().extend(ids);
    }

    /// Keeps parent `id` (its manifest `root`) live for connection `conn`'s running backups.
    pub(crate) fn pin_parent(&mut self, conn: usize, id: SnapshotId, root: StreamManifest) {
        let parents = self.0.parents.entry(conn).or_default();
        if !parents.iter().any(|(known, _)| *known == id) {
            parents.push((id, root));
        }
    }

    /// The pins of `conn` are no longer needed by a running backup. Its parents are dropped
    /// too: a committed backup's chunks are pinned by its commit, so a collection under way
    /// keeps them through `released`.
    pub(crate) fn release(&mut self, conn: usize) {
        let held = &mut *self.0;
        held.parents.remove(&conn);
        if let Some(set) = held.by_conn.remove(&conn) {
            if held.gc_running {
                held.released.extend(set);
            }
        }
    }

    /// Whether a collection must keep `id`.
    pub(crate) fn holds(&self, id: &ChunkId) -> bool {
        self.0.released.contains(id) || self.0.by_conn.values().any(|s| s.contains(id))
    }
}
