//! PostgreSQL: the connection settings (libpq's environment, TLS) and the `tables` dump's
//! layout, shared by its dump ([`dump`]) and its restore ([`restore`]).
//!
//! - `format = "plain"` and `"custom"`: one stream from `pg_dump -Fp` or `pg_dump -Fc -Z0`.
//! - `format = "tables"` (the default): an order-stable dump, as a tree of streams, all read
//!   inside one repeatable-read transaction whose exported snapshot every `pg_dump` call
//!   imports (`--snapshot`):
//!
//!   ```text
//!   meta.json          server version, the tables in order, their columns and sort keys
//!   pre-data.sql       pg_dump --section=pre-data (types, tables, functions, views, …)
//!   data/NNNNN         COPY (SELECT cols FROM ONLY t ORDER BY key) TO STDOUT, one per table
//!   sequences.sql      setval() of every sequence, as seen by the snapshot
//!   large-objects.sql  pg_dump --section=data without table data: the large objects
//!   post-data.sql      pg_dump --section=post-data (indexes, constraints, triggers, …)
//!   ```
//!
//!   Rows are sorted by the primary key, else by a unique index over not-null columns, else
//!   by every orderable column, else left in heap order; `meta.json` records which. Unchanged
//!   data then gives byte-identical streams whatever its physical order, which is what makes
//!   tomorrow's dump deduplicate against today's.
//!
//! May import `config`, `pipe`, `process` and `db`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use crate::config::DbSource;
pub(crate) use crate::config::SslMode;

pub(crate) mod dump;
pub(crate) mod restore;
mod restricted;
mod tls;

/// Connection settings, resolved from the source and the libpq environment variables.
#[derive(Debug, Clone)]
pub(crate) struct PgSettings {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl PgSettings {
    /// The source's settings, falling back to `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`.
    pub(crate) fn of(db: &DbSource) -> anyhow::Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let host = db
            .host
            .clone()
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| "/var/run/postgresql".into());
        let port = match db.port {
            Some(p) => p,
            None => match env("PGPORT") {
                Some(p) => p
                    .parse()
                    .with_context(|| format!("PGPORT {p:?} is not a port"))?,
                None => 5432,
            },
        };
        let user = db
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let password = db.password()?.or_else(|| env("PGPASSWORD"));
        let ssl_mode = match db.pg_tls.mode {
            Some(m) => m,
            None => match env("PGSSLMODE") {
                Some(m) => SslMode::parse(&m)
                    .with_context(|| format!("PGSSLMODE {m:?} is not one of {}", SslMode::NAMES))?,
                None => SslMode::Prefer,
            },
        };
        let root_cert = db
            .pg_tls
            .root_cert
            .clone()
            .or_else(|| env("PGSSLROOTCERT").map(PathBuf::from));
        if ssl_mode == SslMode::VerifyFull && root_cert.is_none() {
            anyhow::bail!("sslmode verify-full needs sslrootcert (the CA of the server)");
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            ssl_mode,
            root_cert,
        })
    }

    fn describe(&self, database: &str) -> String {
        format!(
            "PostgreSQL database {database:?} at {}:{} as {}",
            self.host, self.port, self.user
        )
    }

    /// Sets the libpq environment of a PostgreSQL tool (the password never goes in argv).
    pub(crate) fn tool(&self, program: &str, database: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PGHOST", &self.host)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGDATABASE", database)
            .env("PGAPPNAME", "fleetvault")
            .env("PGSSLMODE", self.ssl_mode.name())
            .env_remove("PGPASSWORD")
            .env_remove("PGSSLROOTCERT");
        if let Some(pw) = &self.password {
            cmd.env("PGPASSWORD", pw);
        }
        if let Some(ca) = &self.root_cert {
            cmd.env("PGSSLROOTCERT", ca);
        }
        cmd
    }

    /// Connects with tokio-postgres; the connection's task ends with the client.
    pub(crate) async fn connect(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            cfg.host_path(&self.host);
        } else {
            cfg.host(&self.host);
        }
        cfg.port(self.port)
            .user(&self.user)
            .dbname(database)
            .application_name("fleetvault")
            .connect_timeout(std::time::Duration::from_secs(20));
        if let Some(pw) = &self.password {
            cfg.password(pw);
        }
        let failed = |e: tokio_postgres::Error| {
            let mut msg = format!(
                "connecting to {}: {}",
                self.describe(database),
                pg_error(&e)
            );
            if self.ssl_mode == SslMode::Disable && msg.contains("no encryption") {
                msg.push_str(" (the server requires TLS: set sslmode)");
            }
            if let Some(ca) = &self.root_cert {
                if msg.contains("UnknownIssuer") {
                    msg.push_str(&format!(
                        " (the server's certificate is not signed by sslrootcert {})",
                        ca.display()
                    ));
                }
            }
            if msg.contains("NotValidForName") {
                msg.push_str(&format!(
                    " (the server's certificate does not name host {})",
                    self.host
                ));
            }
            anyhow!(msg)
        };
        // libpq ignores sslmode over a Unix socket: so does the agent.
        let client = if self.ssl_mode == SslMode::Disable || self.host.starts_with('/') {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(failed)?;
            spawn_connection(conn);
            client
        } else {
            cfg.ssl_mode(match self.ssl_mode {
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            let tls = tls::MakeRustls::new(self.ssl_mode, self.root_cert.as_deref())?;
            let (client, conn) = cfg.connect(tls).await.map_err(failed)?;
            spawn_connection(conn);
            client
        };
        Ok(client)
    }
}

/// Drives a connection until its client is dropped.
fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
}

/// A PostgreSQL error as one line: the server's own message when there is one.
pub(crate) fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// `"name"` with embedded quotes doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server's version (`15.18`).
pub(crate) async fn server_version(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    let row = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| anyhow!("reading the server version: {}", pg_error(&e)))?;
    let v: String = row.get(0);
    Ok(v.split_whitespace().next().unwrap_or("").to_owned())
}

/// One table of a `tables` dump, as `meta.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TableMeta {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Columns in the COPY stream (generated columns are left out: they are recomputed).
    pub(crate) columns: Vec<String>,
    /// `primary key`, `unique index`, `all columns`, `orderable columns` or `heap order`.
    pub(crate) order: String,
    /// Columns of the ORDER BY.
    pub(crate) order_by: Vec<String>,
}

impl TableMeta {
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    pub(crate) fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `meta.json` of a `tables` dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DumpMeta {
    pub(crate) format: String,
    pub(crate) server_version: String,
    pub(crate) tables: Vec<TableMeta>,
}

/// Entry names of a `tables` dump.
pub(crate) const META: &str = "meta.json";
pub(crate) const PRE_DATA: &str = "pre-data.sql";
pub(crate) const SEQUENCES: &str = "sequences.sql";
pub(crate) const LARGE_OBJECTS: &str = "large-objects.sql";
pub(crate) const POST_DATA: &str = "post-data.sql";
pub(crate) fn data_entry(i: usize) -> String {
    format!("data/{i:05}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PgTls;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("posts"), "\"posts\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    fn settings(tls: PgTls) -> anyhow::Result<PgSettings> {
        PgSettings::of(&DbSource {
            engine: crate::config::Engine::Postgres,
            database: "app".into(),
            host: Some("db.example.com".into()),
            port: Some(5432),
            user: Some("app".into()),
            password_file: None,
            password: None,
            uri: None,
            format: crate::config::PgFormat::Tables,
            restore_jobs: 1,
            restrict_key: None,
            pg_tls: tls,
        })
    }

    fn env_of(cmd: &Command, key: &str) -> Option<String> {
        cmd.get_envs()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn the_dump_tools_get_sslmode_and_sslrootcert() {
        let s = settings(PgTls {
            mode: Some(SslMode::VerifyFull),
            root_cert: Some("/etc/fleetvault/db-ca.pem".into()),
        })
        .unwrap();
        for tool in ["pg_dump", "psql", "pg_restore"] {
            let cmd = s.tool(tool, "app");
            assert_eq!(env_of(&cmd, "PGSSLMODE").as_deref(), Some("verify-full"));
            assert_eq!(
                env_of(&cmd, "PGSSLROOTCERT").as_deref(),
                Some("/etc/fleetvault/db-ca.pem")
            );
        }
        let disabled = settings(PgTls {
            mode: Some(SslMode::Disable),
            root_cert: None,
        })
        .unwrap();
        let cmd = disabled.tool("pg_dump", "app");
        assert_eq!(env_of(&cmd, "PGSSLMODE").as_deref(), Some("disable"));
        assert_eq!(env_of(&cmd, "PGSSLROOTCERT"), None);
    }

    #[test]
    fn verify_full_needs_a_root_certificate() {
        // (Run without PGSSLROOTCERT in the environment: it would supply one.)
        let err = settings(PgTls {
            mode: Some(SslMode::VerifyFull),
            root_cert: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("needs sslrootcert"), "{err}");
    }
}
