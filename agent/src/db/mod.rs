//! Databases: one module per engine with its dump and its restore side by side (a dump format
//! and its restore change together), and what they share: the dispatch on the engine, the
//! dump tools, private option files for credentials, what a restore target holds.
//!
//! Credentials never appear on a command line: PostgreSQL tools get them in `PG*` environment
//! variables, MariaDB tools in a private option file, MongoDB tools in a private `--config`
//! file. Every tool is looked up and asked for its version before a backup starts, so a
//! missing tool is one clear error naming it.
//!
//! Restore modes (see `restore::plan`): into another database (created if absent, refused if
//! it holds data unless `--replace`), a rollback of the same database (`--replace`, after a
//! safety snapshot), and a cross-server restore pushed by the coordinator (the same, on
//! another host).
//!
//! May import `config`, `pipe` and `process`; never `backup`, `restore`, `bundle`, `source`
//! or `sink`.

pub(crate) mod mongodb;
pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, bail, Context};
use fleetvault_common::Manifest;

pub(crate) use crate::config::{DbSource, Engine, PgFormat};
use crate::pipe::{Batcher, Reassembler};
use crate::process::ShellCommand;

/// What a backup learned about the database before dumping it.
#[derive(Debug, Clone)]
pub(crate) struct DbInfo {
    pub(crate) db_version: Option<String>,
    pub(crate) database: String,
}

/// Checks that `tool` is installed and returns its `--version` line, or an error naming it
/// and the package that provides it.
pub(crate) fn require_tool(tool: &str, package: &str) -> anyhow::Result<String> {
    let out = Command::new(tool).arg("--version").output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            Ok(text.lines().next().unwrap_or("").trim().to_owned())
        }
        Ok(o) => bail!(
            "{tool} --version failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{tool} is not installed (not found on PATH); install {package}")
        }
        Err(e) => bail!("cannot run {tool}: {e}"),
    }
}

/// Probes the database (tools present, server reachable, version) before a backup.
pub(crate) async fn probe(db: &DbSource) -> anyhow::Result<DbInfo> {
    match db.engine {
        Engine::Postgres => postgres::dump::probe(db).await,
        Engine::Mysql => mysql::dump::probe(db).await,
        Engine::Sqlite => sqlite::dump::probe(db),
        Engine::Mongodb => mongodb::dump::probe(db),
    }
}

/// Dumps `db` through `batcher` (blocking; `rt` runs async client libraries).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    match db.engine {
        Engine::Postgres => postgres::dump::backup(db, batcher, rt),
        Engine::Mysql => mysql::dump::backup(db, batcher),
        Engine::Sqlite => sqlite::dump::backup(db, batcher),
        Engine::Mongodb => mongodb::dump::backup(db, batcher),
    }
}

/// Runs a dump tool and chunks its stdout as one stream; a non-zero exit fails the backup
/// with the tool's own message, so no snapshot is ever completed from a partial dump.
pub(crate) fn dump_tool(
    what: &'static str,
    shown: &str,
    cmd: Command,
    batcher: &mut Batcher,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let mut child = ShellCommand::spawn_command(what, shown, cmd, Stdio::null(), Stdio::piped())
        .map_err(|e| anyhow!(e))?;
    let stdout = child
        .take_stdout()
        .with_context(|| format!("{what} has no stdout"))?;
    let stream = match batcher.chunk_stream(stdout) {
        Ok(s) => s,
        Err(e) => {
            child.kill();
            return Err(anyhow!(e).context(format!("reading {what}'s output")));
        }
    };
    child.finish().map_err(|e| anyhow!(e))?;
    let checksum = stream.checksum;
    Ok((Manifest::Stream(stream), Some(checksum)))
}

/// A private directory for option files holding credentials, removed when dropped.
pub(crate) fn secret_dir() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("fleetvault-secret-")
        .tempdir()
        .context("creating a private directory for credentials")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Writes a file only its owner may read.
pub(crate) fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The major version of a version string (`15.18` → 15, `10.11.6-MariaDB` → 10).
pub(crate) fn major_version(version: &str) -> Option<u32> {
    version
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
}

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
        Engine::Postgres => postgres::restore::inspect(db).await,
        Engine::Mysql => blocking(mysql::restore::inspect).await,
        Engine::Sqlite => blocking(sqlite::restore::inspect).await,
        Engine::Mongodb => blocking(mongodb::restore::inspect).await,
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
            postgres::restore::restore(&r.db, r.format, manifest, reasm, written, &r.tag, rt)
        }
        Engine::Mysql => mysql::restore::restore(&r.db, r.replace, manifest, reasm, written),
        Engine::Sqlite => sqlite::restore::restore(&r.db, manifest, reasm, written),
        Engine::Mongodb => {
            mongodb::restore::restore(&r.db, &r.from_database, r.replace, manifest, reasm, written)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_tools() {
        assert_eq!(major_version("15.18"), Some(15));
        assert_eq!(major_version("10.11.6-MariaDB-0+deb12u1"), Some(10));
        assert_eq!(major_version(""), None);
        assert!(
            format!("{:#}", require_tool("no-such-dump-tool", "x").unwrap_err())
                .contains("no-such-dump-tool is not installed")
        );
    }
}
