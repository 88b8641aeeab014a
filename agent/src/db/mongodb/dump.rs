//! The MongoDB dump: `mongodump --archive` of one database, uncompressed (a gzipped archive
//! would defeat content-defined chunking).

use fleetvault_common::Manifest;

use super::{MongoTool, PACKAGE};
use crate::db::{dump_tool, require_tool, DbInfo, DbSource};
use crate::pipe::Batcher;

/// Checks the tool before a backup (the server is reached by the dump itself).
pub(crate) fn probe(db: &DbSource) -> anyhow::Result<DbInfo> {
    require_tool("mongodump", PACKAGE)?;
    Ok(DbInfo {
        db_version: None,
        database: db.database.clone(),
    })
}

/// Dumps `db` as one archive stream (blocking).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let tool = MongoTool::new(db)?;
    let mut cmd = tool.command("mongodump");
    cmd.arg(format!("--db={}", db.database)).arg("--archive");
    let shown = format!("mongodump --db={} --archive", db.database);
    dump_tool("mongodump", &shown, cmd, batcher)
}
