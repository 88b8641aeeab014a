//! The SQLite dump: `sqlite3 PATH .dump`, a consistent copy of a live database (the dump
//! runs inside one read transaction, so writers that commit meanwhile are either wholly in or
//! wholly out), never a raw copy of a file being written. SQL text in rowid order
//! deduplicates well from one day to the next.

use std::process::Command;

use anyhow::bail;
use fleetvault_common::Manifest;

use super::PACKAGE;
use crate::db::{dump_tool, require_tool, DbInfo, DbSource};
use crate::pipe::Batcher;

/// Checks the tool and the database file before a backup.
pub(crate) fn probe(db: &DbSource) -> anyhow::Result<DbInfo> {
    let version = require_tool("sqlite3", PACKAGE)?;
    let path = std::path::Path::new(&db.database);
    if !path.is_file() {
        bail!("SQLite database {} does not exist", path.display());
    }
    Ok(DbInfo {
        db_version: version.split_whitespace().next().map(str::to_owned),
        database: db.database.clone(),
    })
}

/// Dumps `db` as one stream (blocking).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let mut cmd = Command::new("sqlite3");
    // -bail: stop at the first error; a busy database waits up to a minute for writers.
    cmd.args(["-bail", "-cmd", ".timeout 60000"])
        .arg(&db.database)
        .arg(".dump");
    let shown = format!("sqlite3 {} .dump", db.database);
    dump_tool("sqlite3", &shown, cmd, batcher)
}
