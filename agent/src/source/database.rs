//! Database sources: what they have in common (settings, secrets, the dump tools) and the
//! dispatch to each engine's source (`postgres`, `mysql`, `sqlite`, `mongodb`).
//!
//! Credentials never appear on a command line: PostgreSQL tools get them in `PG*` environment
//! variables, MariaDB tools in a private option file, MongoDB tools in a private `--config`
//! file. Every tool is looked up and asked for its version before a backup starts, so a
//! missing tool is one clear error naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use fleetvault_common::Manifest;

use super::command::ShellCommand;
use crate::backup::Batcher;

/// Which database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
    /// SQLite.
    Sqlite,
    /// MongoDB.
    Mongodb,
}

impl Engine {
    /// The source kind, as configured and recorded (`db_type` too).
    pub(crate) fn kind_name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
            Engine::Sqlite => "sqlite",
            Engine::Mongodb => "mongodb",
        }
    }
}

/// How a PostgreSQL database is dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgFormat {
    /// Order-stable per-table streams inside one snapshot (the default).
    Tables,
    /// `pg_dump -Fp`.
    Plain,
    /// `pg_dump -Fc -Z0`.
    Custom,
}

/// A secret that `Debug` never prints.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A configured database source.
#[derive(Debug, Clone)]
pub(crate) struct DbSource {
    pub(crate) engine: Engine,
    /// Database name; for SQLite the database file's path.
    pub(crate) database: String,
    /// Host name or (starting with `/`) a socket directory (PostgreSQL) or socket (MariaDB).
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) user: Option<String>,
    /// A file holding the password (must not be readable by others).
    pub(crate) password_file: Option<PathBuf>,
    /// A password read from the application's own configuration (profiles).
    pub(crate) password: Option<Secret>,
    /// MongoDB connection string.
    pub(crate) uri: Option<String>,
    /// PostgreSQL dump format.
    pub(crate) format: PgFormat,
    /// Parallel workers of a `custom` restore (`pg_restore -j`); 1 streams it instead.
    pub(crate) restore_jobs: u32,
    /// A stable key for pg_dump's `\restrict` lines (derived from the agent's private key),
    /// so that they do not change every dump; `None` lets pg_dump pick a random one.
    pub(crate) restrict_key: Option<String>,
    /// PostgreSQL `sslmode` and `sslrootcert`.
    pub(crate) pg_tls: super::postgres::PgTls,
}

impl DbSource {
    /// The same source pointed at another database (restores under a new name).
    pub(crate) fn with_database(&self, database: &str) -> Self {
        Self {
            database: database.to_owned(),
            ..self.clone()
        }
    }

    /// The password from `password_file` (trailing newline removed) or from the
    /// application's configuration, if one is configured.
    pub(crate) fn password(&self) -> anyhow::Result<Option<String>> {
        if let Some(Secret(p)) = &self.password {
            return Ok(Some(p.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        read_secret(path).map(Some)
    }
}

/// Reads a secret file, refusing one that others may read.
pub(crate) fn read_secret(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md =
        std::fs::metadata(path).with_context(|| format!("password_file {}", path.display()))?;
    if md.mode() & 0o007 != 0 {
        bail!(
            "password_file {} is readable by others (mode {:o}): chmod o-rwx it",
            path.display(),
            md.mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading password_file {}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

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
        Engine::Postgres => super::postgres::probe(db).await,
        Engine::Mysql => super::mysql::probe(db).await,
        Engine::Sqlite => super::sqlite::probe(db),
        Engine::Mongodb => super::mongodb::probe(db),
    }
}

/// Dumps `db` through `batcher` (blocking; `rt` runs async client libraries).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    match db.engine {
        Engine::Postgres => super::postgres::backup(db, batcher, rt),
        Engine::Mysql => super::mysql::backup(db, batcher),
        Engine::Sqlite => super::sqlite::backup(db, batcher),
        Engine::Mongodb => super::mongodb::backup(db, batcher),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_secrets() {
        assert_eq!(major_version("15.18"), Some(15));
        assert_eq!(major_version("10.11.6-MariaDB-0+deb12u1"), Some(10));
        assert_eq!(major_version(""), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", read_secret(&p).unwrap_err()).contains("readable by others"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&p).unwrap(), "s3cret");
        assert!(
            format!("{:#}", require_tool("no-such-dump-tool", "x").unwrap_err())
                .contains("no-such-dump-tool is not installed")
        );
    }
}
