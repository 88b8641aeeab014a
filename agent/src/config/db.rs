//! Database settings as configured: the engine, the connection, the dump format, the secrets.
//! Plain data and the reading of a password file; imports nothing of the agent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

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
    pub(crate) pg_tls: PgTls,
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

/// `sslmode` of a postgres source, as libpq means it (`verify-ca` and `allow` are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, certificate not checked (libpq's default).
    Prefer,
    /// TLS or fail; the certificate is checked against `sslrootcert` only if one is given.
    Require,
    /// TLS, a certificate chained to `sslrootcert` that names the host.
    VerifyFull,
}

impl SslMode {
    /// The accepted values, for error messages.
    pub(crate) const NAMES: &'static str = r#""disable", "prefer", "require", "verify-full""#;

    /// Parses a configured value.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// The value libpq understands (`PGSSLMODE`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// A postgres source's `sslmode` and `sslrootcert`; unset, `PGSSLMODE` and `PGSSLROOTCERT`
/// apply, then libpq's default `prefer`. Ignored over a Unix socket, as libpq does.
#[derive(Debug, Clone, Default)]
pub(crate) struct PgTls {
    pub(crate) mode: Option<SslMode>,
    pub(crate) root_cert: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", read_secret(&p).unwrap_err()).contains("readable by others"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&p).unwrap(), "s3cret");
    }
}
