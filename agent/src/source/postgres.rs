//! The `postgres` source.
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

use std::io::{self, Read};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Command;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use fleetvault_common::{EntryKind, Manifest, TreeEntry, TreeManifest};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::database::{require_tool, DbInfo, DbSource, PgFormat};
use crate::backup::Batcher;

mod tls;

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

/// Checks the tools and the server before a backup.
pub(crate) async fn probe(db: &DbSource) -> anyhow::Result<DbInfo> {
    require_tool(
        "pg_dump",
        "the PostgreSQL client tools (Debian: postgresql-client)",
    )?;
    let settings = PgSettings::of(db)?;
    let client = settings.connect(&db.database).await?;
    let version = server_version(&client).await?;
    Ok(DbInfo {
        db_version: Some(version),
        database: db.database.clone(),
    })
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

/// Dumps `db` through `batcher` (blocking; `rt` runs the client library's futures).
pub(crate) fn backup(
    db: &DbSource,
    batcher: &mut Batcher,
    rt: &Handle,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let settings = PgSettings::of(db)?;
    match db.format {
        PgFormat::Plain => dump_stream(&settings, db, &["-Fp"], batcher, None),
        PgFormat::Custom => dump_stream(&settings, db, &["-Fc", "-Z0"], batcher, None),
        PgFormat::Tables => tables(&settings, db, batcher, rt).map(|t| (Manifest::Tree(t), None)),
    }
}

/// Runs `pg_dump ARGS` and chunks its output as one stream.
fn dump_stream(
    settings: &PgSettings,
    db: &DbSource,
    args: &[&str],
    batcher: &mut Batcher,
    snapshot: Option<&str>,
) -> anyhow::Result<(Manifest, Option<[u8; 32]>)> {
    let mut cmd = settings.tool("pg_dump", &db.database);
    cmd.args(args).arg("--no-password");
    let plain = args.contains(&"-Fp");
    if let Some(key) = db
        .restrict_key
        .as_deref()
        .filter(|_| plain && supports_restrict_key())
    {
        cmd.arg(format!("--restrict-key={key}"));
    }
    if let Some(s) = snapshot {
        cmd.arg(format!("--snapshot={s}"));
    }
    let shown = format!("pg_dump {}", args.join(" "));
    super::database::dump_tool("pg_dump", &shown, cmd, batcher)
}

/// Whether this pg_dump knows `--restrict-key` (15.14, 16.10, 17.6 and later).
fn supports_restrict_key() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        Command::new("pg_dump")
            .arg("--help")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--restrict-key"))
    })
}

const TABLES_SQL: &str = r"
SELECT c.oid::int8, n.nspname::text, c.relname::text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY n.nspname, c.relname";

const COLUMNS_SQL: &str = r"
SELECT a.attname::text, a.attnum::int4, a.attnotnull, a.attgenerated <> '' AS generated,
  EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
          JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod
          JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
          WHERE am.amname = 'btree' AND oc.opcdefault
            AND oc.opcintype IN (t.oid,
                CASE WHEN t.typcategory = 'A' THEN 'anyarray'::regtype::oid
                     WHEN t.typtype = 'e' THEN 'anyenum'::regtype::oid
                     WHEN t.typtype = 'd' THEN t.typbasetype
                     ELSE 0::oid END)) AS orderable
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

const KEYS_SQL: &str = r"
SELECT i.indisprimary, i.indkey::int2[]::int4[]
FROM pg_catalog.pg_index i
WHERE i.indrelid = $1::int8::oid
  AND (i.indisprimary OR (i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL))
ORDER BY i.indisprimary DESC, i.indexrelid";

const SEQUENCES_SQL: &str = r"
SELECT n.nspname::text, c.relname::text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY n.nspname, c.relname";

struct Column {
    name: String,
    num: i32,
    not_null: bool,
    generated: bool,
    orderable: bool,
}

/// Chooses the sort key of one table: primary key, else a unique index over not-null
/// columns, else every orderable column, else heap order.
async fn table_meta(
    client: &tokio_postgres::Client,
    oid: i64,
    schema: String,
    name: String,
) -> anyhow::Result<TableMeta> {
    let q = |e: tokio_postgres::Error| {
        anyhow!("reading the columns of {schema}.{name}: {}", pg_error(&e))
    };
    let cols: Vec<Column> = client
        .query(COLUMNS_SQL, &[&oid])
        .await
        .map_err(q)?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            num: r.get(1),
            not_null: r.get(2),
            generated: r.get(3),
            orderable: r.get(4),
        })
        .collect();
    let keys = client.query(KEYS_SQL, &[&oid]).await.map_err(q)?;
    let by_num = |n: i32| cols.iter().find(|c| c.num == n);
    let mut chosen = None;
    for k in &keys {
        let primary: bool = k.get(0);
        let nums: Vec<i32> = k.get(1);
        let key: Option<Vec<&Column>> = nums.iter().map(|&n| by_num(n)).collect();
        let Some(key) = key else { continue };
        if primary || key.iter().all(|c| c.not_null) {
            let label = if primary {
                "primary key"
            } else {
                "unique index"
            };
            chosen = Some((label, key.iter().map(|c| c.name.clone()).collect()));
            break;
        }
    }
    let (order, order_by) = match chosen {
        Some(c) => c,
        None => {
            let orderable: Vec<String> = cols
                .iter()
                .filter(|c| c.orderable)
                .map(|c| c.name.clone())
                .collect();
            if orderable.is_empty() {
                ("heap order", Vec::new())
            } else if orderable.len() == cols.len() {
                ("all columns", orderable)
            } else {
                ("orderable columns", orderable)
            }
        }
    };
    Ok(TableMeta {
        schema,
        name,
        columns: cols
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.clone())
            .collect(),
        order: order.to_owned(),
        order_by,
    })
}

fn entry(path: &str, chunks: Vec<fleetvault_common::ChunkRef>, len: u64) -> TreeEntry {
    TreeEntry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File,
        mode: 0o600,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: len,
        inode: 0,
        target: None,
        chunks,
    }
}

fn tables(
    settings: &PgSettings,
    db: &DbSource,
    batcher: &mut Batcher,
    rt: &Handle,
) -> anyhow::Result<TreeManifest> {
    let client = rt.block_on(settings.connect(&db.database))?;
    let q =
        |what: &'static str| move |e: tokio_postgres::Error| anyhow!("{what}: {}", pg_error(&e));
    rt.block_on(client.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL statement_timeout = 0",
    ))
    .map_err(q("starting the dump transaction"))?;
    let snapshot: String = rt
        .block_on(client.query_one("SELECT pg_catalog.pg_export_snapshot()", &[]))
        .map_err(q("exporting the snapshot"))?
        .get(0);
    let version = rt.block_on(server_version(&client))?;
    let rows = rt
        .block_on(client.query(TABLES_SQL, &[]))
        .map_err(q("listing the tables"))?;
    let mut metas = Vec::with_capacity(rows.len());
    for r in &rows {
        metas.push(rt.block_on(table_meta(&client, r.get(0), r.get(1), r.get(2)))?);
    }
    let meta = DumpMeta {
        format: "fleetvault-postgres-tables/1".into(),
        server_version: version,
        tables: metas,
    };
    let mut tree = TreeManifest::default();
    let add_bytes = |tree: &mut TreeManifest, batcher: &mut Batcher, path: &str, bytes: &[u8]| {
        let s = batcher.chunk_stream(bytes)?;
        tree.entries.push(entry(path, s.chunks, s.len));
        anyhow::Ok(())
    };
    add_bytes(&mut tree, batcher, META, &serde_json::to_vec_pretty(&meta)?)?;

    let section = |tree: &mut TreeManifest, batcher: &mut Batcher, path: &str, args: &[&str]| {
        let (m, _) = dump_stream(settings, db, args, batcher, Some(&snapshot))?;
        let Manifest::Stream(s) = m else {
            unreachable!("dump_stream makes a stream")
        };
        tree.entries.push(entry(path, s.chunks, s.len));
        anyhow::Ok(())
    };
    section(&mut tree, batcher, PRE_DATA, &["-Fp", "--section=pre-data"])?;

    for (i, t) in meta.tables.iter().enumerate() {
        let order = if t.order_by.is_empty() {
            String::new()
        } else {
            let cols: Vec<String> = t.order_by.iter().map(|c| quote_ident(c)).collect();
            format!(" ORDER BY {}", cols.join(", "))
        };
        let sql = format!(
            "COPY (SELECT {} FROM ONLY {}{order}) TO STDOUT",
            if t.columns.is_empty() {
                "".into()
            } else {
                t.column_list()
            },
            t.qualified()
        );
        let stream = rt
            .block_on(client.copy_out(sql.as_str()))
            .map_err(|e| anyhow!("dumping table {}: {}", t.qualified(), pg_error(&e)))?;
        let mut reader = CopyReader {
            rt,
            stream: Box::pin(stream),
            buf: Bytes::new(),
        };
        let s = batcher
            .chunk_stream(&mut reader)
            .with_context(|| format!("dumping table {}", t.qualified()))?;
        tree.entries.push(entry(&data_entry(i), s.chunks, s.len));
    }

    let mut seqs = String::new();
    for r in rt
        .block_on(client.query(SEQUENCES_SQL, &[]))
        .map_err(q("listing the sequences"))?
    {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        let row = rt
            .block_on(client.query_one(
                format!("SELECT last_value, is_called FROM {qualified}").as_str(),
                &[],
            ))
            .map_err(|e| anyhow!("reading sequence {qualified}: {}", pg_error(&e)))?;
        let (last, called): (i64, bool) = (row.get(0), row.get(1));
        seqs.push_str(&format!(
            "SELECT pg_catalog.setval('{}', {last}, {called});\n",
            qualified.replace('\'', "''")
        ));
    }
    add_bytes(&mut tree, batcher, SEQUENCES, seqs.as_bytes())?;

    let has_lo: bool = rt
        .block_on(client.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_largeobject_metadata)",
            &[],
        ))
        .map_err(q("looking for large objects"))?
        .get(0);
    if has_lo {
        section(
            &mut tree,
            batcher,
            LARGE_OBJECTS,
            &["-Fp", "--section=data", "--exclude-table-data=*.*"],
        )?;
    } else {
        add_bytes(&mut tree, batcher, LARGE_OBJECTS, b"")?;
    }
    section(
        &mut tree,
        batcher,
        POST_DATA,
        &["-Fp", "--section=post-data"],
    )?;
    rt.block_on(client.batch_execute("COMMIT"))
        .map_err(q("ending the dump transaction"))?;
    Ok(tree)
}

/// A blocking `Read` over a COPY TO STDOUT stream.
struct CopyReader<'a> {
    rt: &'a Handle,
    stream: Pin<Box<tokio_postgres::CopyOutStream>>,
    buf: Bytes,
}

impl Read for CopyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(io::Error::other(pg_error(&e))),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("posts"), "\"posts\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    fn settings(tls: PgTls) -> anyhow::Result<PgSettings> {
        PgSettings::of(&DbSource {
            engine: super::super::database::Engine::Postgres,
            database: "app".into(),
            host: Some("db.example.com".into()),
            port: Some(5432),
            user: Some("app".into()),
            password_file: None,
            password: None,
            uri: None,
            format: PgFormat::Tables,
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
