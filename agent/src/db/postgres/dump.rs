//! The PostgreSQL dump: `pg_dump` as one stream (`plain`, `custom`), or the order-stable
//! `tables` dump described in [`super`].

use std::io::{self, Read};
use std::pin::Pin;
use std::process::Command;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use fleetvault_common::{EntryKind, Manifest, TreeEntry, TreeManifest};
use futures_util::StreamExt;
use tokio::runtime::Handle;

use super::{
    data_entry, pg_error, quote_ident, server_version, DumpMeta, PgSettings, TableMeta,
    LARGE_OBJECTS, META, POST_DATA, PRE_DATA, SEQUENCES,
};
use crate::db::{dump_tool, require_tool, DbInfo, DbSource, PgFormat};
use crate::pipe::Batcher;

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
    dump_tool("pg_dump", &shown, cmd, batcher)
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
