//! MongoDB: the database tools with the connection string, which may hold a password, in a
//! private `--config` file, never in argv; shared by the dump ([`dump`]) and the restore
//! ([`restore`]).
//!
//! May import `config`, `pipe`, `process` and `db`.

pub(crate) mod dump;
pub(crate) mod restore;

use std::path::PathBuf;
use std::process::Command;

use crate::db::{secret_dir, write_secret, DbSource};

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
