//! The `mongodb` source: `mongodump --archive` of one database, uncompressed (a gzipped
//! archive would defeat content-defined chunking). The connection string, which may hold a
//! password, goes in a private `--config` file, never in argv.

use std::path::PathBuf;
use std::process::Command;

use fleetvault_common::Manifest;

use super::database::{dump_tool, require_tool, secret_dir, write_secret, DbInfo, DbSource};
use crate::backup::Batcher;

pub(crate) const PACKAGE: &str = "the MongoDB database tools (mongodump, mongorestore)";

/// A MongoDB tool with the connection string in a private config file.
pub(crate) struct MongoTool {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl MongoTool {
    pub(crate) fn new(db: &DbSource) -> anyhow::Result<Self> {
        let dir = secret_dir()?;
        let config = dir.path().join("mongo.yaml");
        let uri = db.uri.as_deref().unwrap_or("mongodb://localhost:27017");
        let quoted = uri.replace('\\', "\\\\").replace('"', "\\\"");
        write_secret(&config, &format!("uri: \"{quoted}\"\n"))?;
        Ok(Self { _dir: dir, config })
    }

    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg(format!("--config={}", self.config.display()));
        cmd
    }
}

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
