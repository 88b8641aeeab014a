//! The MySQL/MariaDB dump: one consistent, order-stable stream from `mariadb-dump` (or
//! `mysqldump`): `--single-transaction --order-by-primary`, with routines, triggers and events,
//! and without `CREATE DATABASE`/`USE`, so that it restores under any name.

use anyhow::Context;
use fleetvault_common::Manifest;

use super::{dump_program, MyTool};
use crate::db::{dump_tool, DbInfo, DbSource};
use crate::pipe::Batcher;

/// Checks the tools, the server and the database before a backup.
pub(crate) async fn probe(db: &DbSource) -> anyhow::Result<DbInfo> {
    dump_program()?;
    let tool = MyTool::new(db)?;
    let version = tool
        .query(Some(&db.database), "SELECT VERSION()")
        .with_context(|| format!("connecting to MySQL/MariaDB database {:?}", db.database))?;
    Ok(DbInfo {
        db_version: Some(version.trim().to_owned()),
        database: db.database.clone(),
    })
}

/// Dumps `db` as one stream (blocking).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let tool = MyTool::new(db)?;
    let program = dump_program()?;
    let mut cmd = tool.command(program);
    let args = [
        "--single-transaction",
        "--order-by-primary",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--skip-dump-date",
        "--no-tablespaces",
    ];
    cmd.args(args).arg("--").arg(&db.database);
    let shown = format!("{program} {} {}", args.join(" "), db.database);
    dump_tool("mariadb-dump", &shown, cmd, batcher)
}
