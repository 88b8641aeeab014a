//! The PostgreSQL restore: restores a `plain`, `custom` or `tables` dump into a database.
//!
//! A restore never writes into a database that holds data: it creates a fresh one (from
//! `template0`) under a temporary name when the target exists, restores there, and only after
//! the restore succeeded renames the old database away, renames the new one into place and
//! drops the old one. A failed restore drops what it created and leaves the target as it was.
//!
//! `tables` dumps are restored in order: pre-data with `psql`, every table with
//! `COPY … FROM STDIN` (tokio-postgres, `restore_jobs` connections in turn, so one table's COPY
//! completes while the next streams), sequences and large objects with `psql`, then post-data
//! (indexes and constraints are built once, after the rows are in).

use std::io::Write;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fleetvault_common::{Manifest, StreamManifest, TreeManifest};
use futures_util::SinkExt;
use tokio::runtime::Handle;

use super::restricted::{require_restrict, Restricted};
use super::{self as pg, pg_error, quote_ident, DumpMeta, PgSettings};
use crate::db::{major_version, DbSource, PgFormat, TargetState};
use crate::pipe::Reassembler;
use crate::process::{feed_tool, ShellCommand};

/// The maintenance database used to create, rename and drop databases.
const MAINTENANCE_DB: &str = "postgres";

/// Whether the target database exists, holds anything, and the server's major version.
pub(crate) async fn inspect(db: &DbSource) -> anyhow::Result<TargetState> {
    check_name(&db.database)?;
    let settings = PgSettings::of(db)?;
    let admin = settings.connect(MAINTENANCE_DB).await?;
    let version = pg::server_version(&admin).await?;
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
            &[&db.database],
        )
        .await
        .map_err(|e| anyhow!("looking up database {:?}: {}", db.database, pg_error(&e)))?
        .is_some();
    let empty = if exists {
        let client = settings.connect(&db.database).await?;
        let row = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                     AND n.nspname NOT LIKE 'pg\\_toast%'
                     AND c.relkind IN ('r', 'v', 'm', 'S', 'f', 'p'))",
                &[],
            )
            .await
            .map_err(|e| anyhow!("inspecting database {:?}: {}", db.database, pg_error(&e)))?;
        row.get(0)
    } else {
        true
    };
    Ok(TargetState {
        exists,
        empty,
        server_version: Some(version),
    })
}

/// PostgreSQL's longest name, in bytes (NAMEDATALEN - 1): the server cuts longer ones.
const MAX_NAME: usize = 63;

/// Refuses a database name the server would cut short (and so restore under another name).
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        bail!(
            "database name {name:?} is {} bytes: PostgreSQL names hold 1 to {MAX_NAME} bytes (nothing was touched)",
            name.len()
        );
    }
    Ok(())
}

/// The temporary names of a replace: the restored copy ("work") and the previous database
/// ("old") while the two are swapped. Both start with the target's first bytes (for whoever
/// reads the database list), end with a hash of the whole target and the snapshot, fit in
/// [`MAX_NAME`] bytes, and differ from each other and from the target, whatever its length.
fn temp_names(target: &str, tag: &str) -> (String, String) {
    let hash = blake3::hash(format!("{target}\0{tag}").as_bytes()).to_hex();
    let hash = &hash.as_str()[..16];
    let mut cut = MAX_NAME - "__fv_old_".len() - hash.len();
    while !target.is_char_boundary(cut.min(target.len())) {
        cut -= 1;
    }
    let prefix = &target[..cut.min(target.len())];
    (
        format!("{prefix}__fv_{hash}"),
        format!("{prefix}__fv_old_{hash}"),
    )
}

/// Restores `manifest` (a dump of `format`) into `db.database`; blocking.
pub(crate) fn restore(
    db: &DbSource,
    format: PgFormat,
    manifest: &Manifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
    tag: &str,
    rt: &Handle,
) -> anyhow::Result<()> {
    let settings = PgSettings::of(db)?;
    let target = db.database.as_str();
    check_name(target)?;
    if matches!(format, PgFormat::Plain | PgFormat::Tables) {
        require_restrict()?;
    }
    let admin = rt.block_on(settings.connect(MAINTENANCE_DB))?;
    let exists = rt
        .block_on(admin.query_opt(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
            &[&target],
        ))
        .map_err(|e| anyhow!("looking up database {target:?}: {}", pg_error(&e)))?
        .is_some();
    // Restore beside the target when it exists; swap only after success.
    let (work_name, old) = temp_names(target, tag);
    let work = if exists { work_name } else { target.to_owned() };
    let exec = |sql: String| {
        rt.block_on(admin.batch_execute(&sql))
            .map_err(|e| anyhow!("{sql}: {}", pg_error(&e)))
    };
    if exists {
        exec(format!("DROP DATABASE IF EXISTS {}", quote_ident(&work)))?;
    }
    exec(format!(
        "CREATE DATABASE {} TEMPLATE template0",
        quote_ident(&work)
    ))?;
    let restored = match (format, manifest) {
        (PgFormat::Tables, Manifest::Tree(tree)) => {
            restore_tables(&settings, &work, db.restore_jobs, tree, reasm, written, rt)
        }
        (PgFormat::Plain, Manifest::Stream(s)) => {
            run_psql(&settings, &work, |out| reasm.stream(s, out, written))
        }
        (PgFormat::Custom, Manifest::Stream(s)) if db.restore_jobs > 1 => {
            restore_custom_parallel(&settings, &work, db.restore_jobs, s, reasm, written)
        }
        (PgFormat::Custom, Manifest::Stream(s)) => {
            let mut cmd = settings.tool("pg_restore", &work);
            cmd.args([
                "--exit-on-error",
                "--no-password",
                "--single-transaction",
                "-d",
                &conninfo_dbname(&work),
            ]);
            pipe(cmd, "pg_restore", s, reasm, written)
        }
        _ => Err(anyhow!("the snapshot's manifest does not match its format")),
    };
    if let Err(e) = restored {
        // FORCE (PostgreSQL 13+) ends the restore's own connections that may still be closing.
        let cleanup = exec(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&work)
        ))
        .or_else(|_| exec(format!("DROP DATABASE IF EXISTS {}", quote_ident(&work))));
        let state = if exists {
            format!("database {target:?} was not touched")
        } else {
            format!("the partly restored database {target:?} was dropped")
        };
        let cleanup = match cleanup {
            Ok(()) => String::new(),
            Err(c) => format!(" (dropping {work:?} failed too: {c:#})"),
        };
        return Err(e.context(format!("restore into {target:?} failed; {state}{cleanup}")));
    }
    if exists {
        exec(format!("DROP DATABASE IF EXISTS {}", quote_ident(&old)))?;
        // Other sessions block the rename: end them (the operator asked for a replace).
        rt.block_on(admin.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
             WHERE datname IN ($1, $2) AND pid <> pg_catalog.pg_backend_pid()",
            &[&target, &work.as_str()],
        ))
        .map_err(|e| anyhow!("closing sessions on {target:?}: {}", pg_error(&e)))?;
        exec(format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(target),
            quote_ident(&old)
        ))
        .with_context(|| format!("the restored copy is complete in database {work:?}"))?;
        exec(format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(&work),
            quote_ident(target)
        ))
        .with_context(|| {
            format!("the previous database is now {old:?} and the restored one {work:?}")
        })?;
        exec(format!("DROP DATABASE {}", quote_ident(&old)))?;
    }
    Ok(())
}

/// `-d` of a tool that expands it as a connection string (pg_restore): a conninfo naming only
/// the database, so that a name such as `host=elsewhere dbname=x` is only a name.
fn conninfo_dbname(database: &str) -> String {
    format!(
        "dbname='{}'",
        database.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// Runs psql into `database` with `feed` writing the dump, in psql's restricted mode: no
/// meta-command in the dump runs (see [`Restricted`]).
fn run_psql(
    settings: &PgSettings,
    database: &str,
    feed: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    require_restrict()?;
    let child = ShellCommand::spawn_command(
        "psql",
        "psql",
        psql(settings, database),
        Stdio::piped(),
        Stdio::null(),
    )
    .map_err(|e| anyhow!(e))?;
    feed_tool(child, |stdin| {
        let mut restricted = Restricted::new(stdin)?;
        feed(&mut restricted)?;
        restricted.finish().context("writing to psql")
    })
}

/// `psql` into `database`: stop at the first error, all in one transaction, never prompt.
fn psql(settings: &PgSettings, database: &str) -> std::process::Command {
    let mut cmd = settings.tool("psql", database);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "--no-password",
    ]);
    cmd
}

/// Streams a dump into a tool's stdin, verifying the whole stream's checksum.
fn pipe(
    cmd: std::process::Command,
    what: &'static str,
    stream: &StreamManifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let child = ShellCommand::spawn_command(what, what, cmd, Stdio::piped(), Stdio::null())
        .map_err(|e| anyhow!(e))?;
    feed_tool(child, |stdin| reasm.stream(stream, stdin, written))
}

fn restore_tables(
    settings: &PgSettings,
    work: &str,
    jobs: u32,
    tree: &TreeManifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
    rt: &Handle,
) -> anyhow::Result<()> {
    let mut entries = tree.entries.iter();
    let mut next = |name: &str| {
        let e = entries
            .next()
            .with_context(|| format!("the dump ends before {name}"))?;
        if e.path != name.as_bytes() {
            bail!(
                "the dump has {:?} where {name} was expected",
                String::from_utf8_lossy(&e.path)
            );
        }
        Ok(e)
    };
    let meta_entry = next(pg::META)?;
    let mut meta_bytes = Vec::new();
    for c in &meta_entry.chunks {
        meta_bytes.extend_from_slice(&reasm.next_checked(c)?);
    }
    let meta: DumpMeta = serde_json::from_slice(&meta_bytes).context("reading meta.json")?;
    let run_sql = |name: &str, e: &fleetvault_common::TreeEntry, reasm: &mut Reassembler| {
        let stream = StreamManifest {
            chunks: e.chunks.clone(),
            len: e.size,
            checksum: [0; 32],
        };
        psql_unchecked(settings, work, &stream, reasm, written)
            .with_context(|| format!("restoring {name}"))
    };
    let pre = next(pg::PRE_DATA)?;
    run_sql(pg::PRE_DATA, pre, reasm)?;
    // Tables load over `jobs` connections in turn: while the server completes one table's
    // COPY (the last rows, the commit), the next one already streams on another connection.
    let jobs = jobs.max(1) as usize;
    let mut clients = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        clients.push(rt.block_on(settings.connect(work))?);
    }
    type Finishing = tokio::task::JoinHandle<Result<u64, tokio_postgres::Error>>;
    let mut finishing: Vec<Option<(String, Finishing)>> = (0..jobs).map(|_| None).collect();
    let wait = |slot: &mut Option<(String, Finishing)>| -> anyhow::Result<()> {
        if let Some((table, handle)) = slot.take() {
            rt.block_on(handle)
                .map_err(|e| anyhow!("COPY task of {table} panicked: {e}"))?
                .map_err(|e| anyhow!("restoring the rows of {table}: {}", pg_error(&e)))?;
        }
        Ok(())
    };
    for (i, t) in meta.tables.iter().enumerate() {
        let e = next(&pg::data_entry(i))?;
        let k = i % jobs;
        wait(&mut finishing[k])?;
        let sql = format!("COPY {} ({}) FROM STDIN", t.qualified(), t.column_list());
        let table = t.qualified();
        let sink = rt
            .block_on(clients[k].copy_in::<_, Bytes>(sql.as_str()))
            .map_err(|e| anyhow!("restoring the rows of {table}: {}", pg_error(&e)))?;
        let mut sink = Box::pin(sink);
        for c in &e.chunks {
            let plain = reasm.next_checked(c)?;
            let n = plain.len() as u64;
            rt.block_on(sink.send(plain))
                .map_err(|e| anyhow!("restoring the rows of {table}: {}", pg_error(&e)))?;
            written.fetch_add(n, Ordering::Relaxed);
        }
        let handle = rt.spawn(async move { sink.as_mut().finish().await });
        finishing[k] = Some((table, handle));
    }
    for slot in &mut finishing {
        wait(slot)?;
    }
    drop(clients);
    for name in [pg::SEQUENCES, pg::LARGE_OBJECTS, pg::POST_DATA] {
        let e = next(name)?;
        run_sql(name, e, reasm)?;
    }
    if let Some(extra) = entries.next() {
        bail!(
            "unexpected entry {:?} after post-data",
            String::from_utf8_lossy(&extra.path)
        );
    }
    Ok(())
}

/// `pg_restore -j N` needs a seekable archive: the verified stream goes to a private
/// temporary file first (removed afterwards), then `pg_restore` loads it with `jobs` workers.
/// The target is a fresh database that is dropped on failure, so nothing is half-done.
fn restore_custom_parallel(
    settings: &PgSettings,
    work: &str,
    jobs: u32,
    stream: &StreamManifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    let dir = crate::db::secret_dir()?;
    let path = dir.path().join("dump.pgcustom");
    let mut f =
        std::fs::File::create_new(&path).with_context(|| format!("creating {}", path.display()))?;
    reasm.stream(stream, &mut f, written)?;
    f.sync_all().context("writing the archive for pg_restore")?;
    drop(f);
    let mut cmd = settings.tool("pg_restore", work);
    cmd.args([
        "--exit-on-error",
        "--no-password",
        "-j",
        &jobs.to_string(),
        "-d",
        &conninfo_dbname(work),
    ])
    .arg(&path);
    let out = cmd.output().context("running pg_restore")?;
    if !out.status.success() {
        bail!(
            "pg_restore -j {jobs} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " | ")
        );
    }
    Ok(())
}

/// Like [`pipe`] for a part of a tree, into psql: every chunk is verified; the part has no
/// checksum of its own (the manifest holding its chunk list is itself checksummed).
fn psql_unchecked(
    settings: &PgSettings,
    database: &str,
    stream: &StreamManifest,
    reasm: &mut Reassembler,
    written: &AtomicU64,
) -> anyhow::Result<()> {
    run_psql(settings, database, |out| {
        for c in &stream.chunks {
            let plain = reasm.next_checked(c)?;
            out.write_all(&plain).context("writing to psql")?;
            written.fetch_add(plain.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    })
}

/// Refuses a restore onto an older PostgreSQL major version than the dump came from.
pub(crate) fn check_versions(dump: Option<&str>, server: Option<&str>) -> anyhow::Result<()> {
    if let (Some(d), Some(s)) = (dump.and_then(major_version), server.and_then(major_version)) {
        if s < d {
            bail!(
                "the snapshot was dumped from PostgreSQL {d}; this server runs PostgreSQL {s}, an older major version that cannot load it"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_fit_and_never_collide() {
        let tag = "0123456789abcdef";
        for target in [
            "chat".to_owned(),
            "x".repeat(57),
            "x".repeat(58),
            "y".repeat(63),
            format!("{}é", "z".repeat(61)),
            "日本語のデータベース名前はとても長いですね".to_owned(),
        ] {
            assert!(target.len() <= MAX_NAME, "{target}");
            let (work, old) = temp_names(&target, tag);
            assert!(
                work.len() <= MAX_NAME && old.len() <= MAX_NAME,
                "{work} {old}"
            );
            assert_ne!(work, old);
            assert_ne!(work, target);
            assert_ne!(old, target);
        }
        // Two long names alike up to the cut get different temporary names.
        let (a, b) = ("a".repeat(62) + "1", "a".repeat(62) + "2");
        assert_ne!(temp_names(&a, tag).0, temp_names(&b, tag).0);
        assert!(check_name(&"n".repeat(63)).is_ok());
        let err = check_name(&"n".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("64 bytes"), "{err}");
    }

    #[test]
    fn a_name_given_to_pg_restore_is_only_a_name() {
        assert_eq!(conninfo_dbname("chat"), "dbname='chat'");
        assert_eq!(
            conninfo_dbname("host=evil dbname='x' \\"),
            "dbname='host=evil dbname=\\'x\\' \\\\'"
        );
    }

    #[test]
    fn an_older_server_major_is_refused() {
        assert!(check_versions(Some("15.18"), Some("16.2")).is_ok());
        assert!(check_versions(Some("15.18"), Some("15.2")).is_ok());
        let err = check_versions(Some("16.1"), Some("15.18")).unwrap_err();
        assert!(err.to_string().contains("older major version"), "{err}");
        assert!(check_versions(None, Some("15.18")).is_ok());
    }
}
