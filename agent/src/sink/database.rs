//! Database sinks: what restoring into any database has in common.
//!
//! Modes (see `restore::run_into`): into another database (created if absent, refused if it
//! holds data unless `--replace`), a rollback of the same database (`--replace`, after a safety
//! snapshot), and a cross-server restore pushed by the coordinator (the same, on another host).

use std::process::ChildStdin;
use std::sync::atomic::AtomicU64;

use anyhow::anyhow;
use fleetvault_common::Manifest;

use crate::restore::Reassembler;
use crate::source::command::ShellCommand;
use crate::source::database::{DbSource, Engine, PgFormat};

/// What is at a restore's target before anything is touched.
#[derive(Debug, Clone)]
pub(crate) struct TargetState {
    /// The database (or file) exists.
    pub(crate) exists: bool,
    /// It holds nothing a restore would destroy.
    pub(crate) empty: bool,
    /// The server's version, when there is a server.
    pub(crate) server_version: Option<String>,
}

/// Feeds a restore tool through `write`, then waits for it. When `write` fails because a
/// chunk is damaged, the tool is killed before its stdin closes, so it never sees a clean end
/// of a bad stream; when it fails because the tool stopped reading, the tool's own error
/// (exit status and stderr) is the one reported.
pub(crate) fn feed_tool(
    mut child: ShellCommand,
    write: impl FnOnce(&mut ChildStdin) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(mut stdin) = child.take_stdin() else {
        return Err(anyhow!("the restore tool has no stdin"));
    };
    match write(&mut stdin) {
        Ok(()) => {
            drop(stdin);
            child.finish().map_err(|e| anyhow!(e))
        }
        Err(e) if exits_soon(&mut child) => {
            drop(stdin);
            match child.finish() {
                Err(msg) => Err(anyhow!(msg)),
                Ok(()) => Err(e),
            }
        }
        Err(e) => {
            child.kill();
            drop(stdin);
            Err(e)
        }
    }
}

/// Whether the tool exits within a moment (it closed its stdin: a broken pipe). A tool still
/// running after that is waiting for more input, which must not arrive.
fn exits_soon(child: &mut ShellCommand) -> bool {
    for _ in 0..40 {
        if child.has_exited() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// A database restore, fully decided (target, format, mode) before anything is touched.
#[derive(Debug, Clone)]
pub(crate) struct DbRestore {
    /// The source, pointed at the target database.
    pub(crate) db: DbSource,
    /// How the snapshot was dumped (PostgreSQL).
    pub(crate) format: PgFormat,
    /// Replace what is there.
    pub(crate) replace: bool,
    /// The database the snapshot was taken from (MongoDB renames its namespaces).
    pub(crate) from_database: String,
    /// A short unique label for temporary names (the snapshot id).
    pub(crate) tag: String,
}

/// What is at the target now (blocking tools run off the reactor).
pub(crate) async fn inspect(db: &DbSource) -> anyhow::Result<TargetState> {
    let blocking = |f: fn(&DbSource) -> anyhow::Result<TargetState>| {
        let db = db.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(|e| anyhow!("inspecting the target panicked: {e}"))?
        }
    };
    match db.engine {
        Engine::Postgres => super::postgres::inspect(db).await,
        Engine::Mysql => blocking(super::mysql::inspect).await,
        Engine::Sqlite => blocking(super::sqlite::inspect).await,
        Engine::Mongodb => blocking(super::mongodb::inspect).await,
    }
}

/// Restores a database snapshot (blocking; `rt` runs async client libraries).
pub(crate) fn restore(
    r: &DbRestore,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    match r.db.engine {
        Engine::Postgres => {
            super::postgres::restore(&r.db, r.format, manifest, reasm, written, &r.tag, rt)
        }
        Engine::Mysql => super::mysql::restore(&r.db, r.replace, manifest, reasm, written),
        Engine::Sqlite => super::sqlite::restore(&r.db, manifest, reasm, written),
        Engine::Mongodb => {
            super::mongodb::restore(&r.db, &r.from_database, r.replace, manifest, reasm, written)
        }
    }
}
