//! `[[sources]]`: each table validated into a [`SourceConfig`]; errors name the file, the
//! source and the key (and its line where it matters).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetvault_common::ChunkerParams;

use super::raw::RawSource;
use super::{DbSource, Engine, PgFormat, PgTls, SourceConfig, SourceKind, SslMode};

/// Validates the `i`-th `[[sources]]` table of `text` (the file at `path`); `seen` holds the
/// names so far.
pub(super) fn validate(
    path: &Path,
    text: &str,
    i: usize,
    s: RawSource,
    seen: &mut HashSet<String>,
    abs: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<SourceConfig> {
    let name = s.name().to_owned();
    let at = || format!("invalid config {}: sources[{i}] ({name:?})", path.display());
    if name.is_empty() || name.len() > 128 || name.contains(['/', '\0']) {
        bail!("{}: key `name` must be 1-128 characters without '/'", at());
    }
    if !seen.insert(name.clone()) {
        bail!("{}: key `name` is used by another source", at());
    }
    let chunk_sizes = s.chunk_sizes();
    let zstd_level = match s.compression_level() {
        None => fleetvault_common::chunk::DEFAULT_ZSTD_LEVEL,
        Some(l) if (1..=19).contains(&l) => l,
        Some(l) => bail!("{}: key `compression_level`: {l} is not 1-19", at()),
    };
    let kind = match s {
        RawSource::Files { paths, exclude, .. } => {
            if paths.is_empty() {
                bail!("{}: key `paths` is empty", at());
            }
            for g in &exclude {
                globset::Glob::new(g)
                    .with_context(|| format!("{}: key `exclude`: bad glob {g:?}", at()))?;
            }
            SourceKind::Files {
                paths: paths.into_iter().map(abs).collect(),
                exclude,
            }
        }
        RawSource::Postgres {
            database,
            host,
            port,
            user,
            password_file,
            format,
            restore_jobs,
            sslmode,
            sslrootcert,
            ..
        } => {
            let format = match format.as_deref().unwrap_or("tables") {
                "tables" => PgFormat::Tables,
                "plain" => PgFormat::Plain,
                "custom" => PgFormat::Custom,
                other => bail!(
                    "{}: key `format`: {other:?} is not one of \"tables\", \"plain\", \"custom\"",
                    at()
                ),
            };
            let at_key = |key: &str| match source_key_line(text, i, key) {
                Some(n) => format!(
                    "invalid config {}: line {n}: sources[{i}] ({name:?})",
                    path.display()
                ),
                None => at(),
            };
            let pg_tls = pg_tls(sslmode, sslrootcert.map(abs), &at_key)?;
            SourceKind::Database(DbSource {
                engine: Engine::Postgres,
                database: non_empty(database, "database", &at)?,
                host,
                port,
                user,
                password_file: password_file.map(abs),
                password: None,
                uri: None,
                format,
                restore_jobs: restore_jobs.unwrap_or(2).clamp(1, 64),
                restrict_key: None,
                pg_tls,
            })
        }
        RawSource::Mysql {
            database,
            host,
            port,
            user,
            password_file,
            ..
        } => SourceKind::Database(DbSource {
            engine: Engine::Mysql,
            database: non_empty(database, "database", &at)?,
            host,
            port,
            user,
            password_file: password_file.map(abs),
            password: None,
            uri: None,
            format: PgFormat::Plain,
            restore_jobs: 1,
            restrict_key: None,
            pg_tls: PgTls::default(),
        }),
        RawSource::Sqlite { path: db_path, .. } => SourceKind::Database(DbSource {
            engine: Engine::Sqlite,
            database: abs(db_path).to_string_lossy().into_owned(),
            host: None,
            port: None,
            user: None,
            password_file: None,
            password: None,
            uri: None,
            format: PgFormat::Plain,
            restore_jobs: 1,
            restrict_key: None,
            pg_tls: PgTls::default(),
        }),
        RawSource::Mongodb { uri, database, .. } => SourceKind::Database(DbSource {
            engine: Engine::Mongodb,
            database: non_empty(database, "database", &at)?,
            host: None,
            port: None,
            user: None,
            password_file: None,
            password: None,
            uri: Some(non_empty(uri, "uri", &at)?),
            format: PgFormat::Plain,
            restore_jobs: 1,
            restrict_key: None,
            pg_tls: PgTls::default(),
        }),
        RawSource::Command {
            backup_command,
            restore_command,
            ..
        } => {
            if backup_command.trim().is_empty() {
                bail!("{}: key `backup_command` is empty", at());
            }
            SourceKind::Command {
                backup_command,
                restore_command,
            }
        }
    };
    let chunker = match chunk_sizes {
        Some([min, avg, max]) => {
            let p = ChunkerParams { min, avg, max };
            p.validate()
                .map_err(|e| anyhow::anyhow!("{}: key `chunk_sizes`: {e}", at()))?;
            p
        }
        // Database streams dedup better with smaller chunks (see DbSource).
        None if matches!(kind, SourceKind::Database(_)) => DATABASE_CHUNKER,
        None => ChunkerParams::default(),
    };
    Ok(SourceConfig {
        name,
        kind,
        chunker,
        zstd_level,
    })
}

/// Default chunk sizes of database sources: 16/64/256 KiB. A row change then costs a small
/// chunk, and per-chunk overhead stays low (measured in the database issue).
pub(super) const DATABASE_CHUNKER: ChunkerParams = ChunkerParams {
    min: 16 << 10,
    avg: 64 << 10,
    max: 256 << 10,
};

/// The 1-based line of `key = …` in the `index`-th `[[sources]]` table of `text`, if it is
/// written that way (error messages name it).
fn source_key_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let (mut seen, mut inside) = (0, false);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.starts_with('[') {
            inside = line.starts_with("[[sources]]") && {
                seen += 1;
                seen == index + 1
            };
            continue;
        }
        let is_key = line
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if inside && is_key {
            return Some(n + 1);
        }
    }
    None
}

/// Checks a postgres source's `sslmode` and `sslrootcert`; `at` names the source and the
/// key's line.
fn pg_tls(
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    at: &dyn Fn(&str) -> String,
) -> anyhow::Result<PgTls> {
    let mode = match mode.as_deref() {
        None => None,
        Some(m) => Some(SslMode::parse(m).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: key `sslmode`: {m:?} is not one of {}",
                at("sslmode"),
                SslMode::NAMES
            )
        })?),
    };
    if mode == Some(SslMode::VerifyFull) && root_cert.is_none() {
        bail!(
            "{}: key `sslrootcert` is required with sslmode = \"verify-full\" (the CA that signed the server's certificate)",
            at("sslmode")
        );
    }
    if let Some(p) = &root_cert {
        if !p.is_file() {
            bail!(
                "{}: key `sslrootcert`: {} is not a file",
                at("sslrootcert"),
                p.display()
            );
        }
    }
    Ok(PgTls { mode, root_cert })
}

fn non_empty(value: String, key: &str, at: &dyn Fn() -> String) -> anyhow::Result<String> {
    if value.trim().is_empty() {
        bail!("{}: key `{key}` is empty", at());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_of_a_source_key() {
        let text = "[coordinator]\nsslmode = 1\n[[sources]]\nname = \"a\"\n[[sources]]\n  sslmode=\"x\"\n[[bundles]]\nsslmode = 2\n[[sources]]\nsslmode = 3\n";
        assert_eq!(source_key_line(text, 1, "sslmode"), Some(6));
        assert_eq!(source_key_line(text, 0, "sslmode"), None);
        assert_eq!(source_key_line(text, 2, "sslmode"), Some(10));
        assert_eq!(source_key_line(text, 3, "sslmode"), None);
    }
}
