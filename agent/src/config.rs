//! The agent's TOML file: raw serde types, validated into [`AgentConfig`]. Errors name the
//! file and the key. Relative paths are relative to the file's directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetvault_common::protocol::SourceInfo;
use fleetvault_common::{ChunkerParams, Credentials};
use serde::Deserialize;

use crate::bundle::hooks::Hook;
pub(crate) use crate::bundle::BundleConfig;
pub(crate) use crate::source::database::{DbSource, Engine, PgFormat};
use crate::source::postgres::{PgTls, SslMode};

/// What a profile bundle's table overrides in the database the application's config names.
#[derive(Debug, Clone, Default)]
pub(crate) struct DbOverrides {
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) user: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) mongo_url: Option<String>,
}

impl DbOverrides {
    pub(crate) fn apply(&self, db: &mut DbSource) {
        if self.host.is_some() {
            db.host = self.host.clone();
        }
        if self.port.is_some() {
            db.port = self.port;
        }
        if self.user.is_some() {
            db.user = self.user.clone();
        }
        if let Some(p) = &self.password_file {
            db.password_file = Some(p.clone());
            db.password = None;
        }
    }
}

/// Default timeout of a bundle hook.
const HOOK_TIMEOUT_SECS: u64 = 300;

/// Validates `[[bundles]]`, expanding profiles into generated sources appended to `sources`.
fn load_bundles(
    path: &Path,
    raw: Vec<RawBundle>,
    sources: &mut Vec<SourceConfig>,
    abs: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<Vec<BundleConfig>> {
    let mut out: Vec<BundleConfig> = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let name = b.name.clone();
        let at = || format!("invalid config {}: bundles[{i}] ({name:?})", path.display());
        if name.is_empty() || name.len() > 128 || name.contains(['/', '\0']) {
            bail!("{}: key `name` must be 1-128 characters without '/'", at());
        }
        if out.iter().any(|o| o.name == name) || sources.iter().any(|s| s.name == name) {
            bail!("{}: key `name` is used by another bundle or source", at());
        }
        let timeout =
            std::time::Duration::from_secs(b.hook_timeout_secs.unwrap_or(HOOK_TIMEOUT_SECS).max(1));
        let hooks = |raw: Vec<RawHook>, key: &str| -> anyhow::Result<Vec<Hook>> {
            raw.into_iter()
                .map(|h| {
                    let (command, secs) = match h {
                        RawHook::Command(c) => (c, None),
                        RawHook::Table(t) => (t.command, t.timeout_secs),
                    };
                    if command.trim().is_empty() {
                        bail!("{}: key `{key}`: a hook command is empty", at());
                    }
                    Ok(Hook {
                        command,
                        timeout: secs.map_or(timeout, |s| std::time::Duration::from_secs(s.max(1))),
                    })
                })
                .collect()
        };
        let before = b.before.map(|h| hooks(h, "before")).transpose()?;
        let after = b.after.map(|h| hooks(h, "after")).transpose()?;
        let root = b.root.clone().map(abs);
        let mut bundle = BundleConfig {
            name: name.clone(),
            parts: b.parts.clone(),
            before: before.clone().unwrap_or_default(),
            after: after.clone().unwrap_or_default(),
            profile: b.profile.clone(),
            root: root.clone(),
            config_file: None,
            overrides: DbOverrides::default(),
        };
        if let Some(profile) = &b.profile {
            if !b.parts.is_empty() {
                bail!(
                    "{}: key `parts`: the {profile} profile sets the parts",
                    at()
                );
            }
            let root = root
                .clone()
                .with_context(|| format!("{}: key `root` is required with a profile", at()))?;
            let overrides = DbOverrides {
                host: b.database_host.clone(),
                port: b.database_port,
                user: b.database_user.clone(),
                password_file: b.password_file.clone().map(abs),
                mongo_url: b.mongo_url.clone(),
            };
            let mut expanded =
                crate::bundle::profiles::expand(profile, &root, b.mongo_url.as_deref())
                    .map_err(|e| e.context(format!("{}: profile {profile}", at())))?;
            overrides.apply(&mut expanded.database);
            bundle.overrides = overrides;
            let mut generated = vec![SourceConfig {
                name: format!("{name}-db"),
                chunker: DATABASE_CHUNKER,
                zstd_level: fleetvault_common::chunk::DEFAULT_ZSTD_LEVEL,
                kind: SourceKind::Database(expanded.database),
            }];
            for (suffix, paths) in expanded.files {
                generated.push(SourceConfig {
                    name: format!("{name}-{suffix}"),
                    kind: SourceKind::Files {
                        paths,
                        exclude: Vec::new(),
                    },
                    chunker: ChunkerParams::default(),
                    zstd_level: fleetvault_common::chunk::DEFAULT_ZSTD_LEVEL,
                });
            }
            for g in &generated {
                if sources.iter().any(|s| s.name == g.name) {
                    bail!(
                        "{}: the profile's source {:?} is already a source",
                        at(),
                        g.name
                    );
                }
            }
            let service = b
                .service
                .clone()
                .unwrap_or_else(|| expanded.service.to_owned());
            let hook = |verb: &str| Hook {
                command: format!("systemctl {verb} {service}"),
                timeout,
            };
            bundle.before = before.unwrap_or_else(|| vec![hook("stop")]);
            bundle.after = after.unwrap_or_else(|| vec![hook("start")]);
            bundle.parts = generated.iter().map(|g| g.name.clone()).collect();
            bundle.config_file = Some(expanded.config_file);
            sources.extend(generated);
        } else {
            if bundle.parts.is_empty() {
                bail!(
                    "{}: key `parts` is empty (name sources, or set a `profile`)",
                    at()
                );
            }
            for p in &bundle.parts {
                if !sources.iter().any(|s| &s.name == p) {
                    bail!("{}: key `parts`: {p:?} is not a source", at());
                }
            }
        }
        out.push(bundle);
    }
    Ok(out)
}

/// Default chunk sizes of database sources: 16/64/256 KiB. A row change then costs a small
/// chunk, and per-chunk overhead stays low (measured in the database issue).
const DATABASE_CHUNKER: ChunkerParams = ChunkerParams {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    coordinator: RawCoordinator,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    bundles: Vec<RawBundle>,
}

/// One `[[bundles]]` table: parts and hooks, or a `profile` with its `root`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    name: String,
    #[serde(default)]
    parts: Vec<String>,
    #[serde(default)]
    before: Option<Vec<RawHook>>,
    #[serde(default)]
    after: Option<Vec<RawHook>>,
    /// Default timeout of this bundle's hooks (300 s).
    #[serde(default)]
    hook_timeout_secs: Option<u64>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    root: Option<PathBuf>,
    /// The service the profile's default hooks stop and start.
    #[serde(default)]
    service: Option<String>,
    /// Overrides of what the profile reads from the application's configuration.
    #[serde(default)]
    database_host: Option<String>,
    #[serde(default)]
    database_port: Option<u16>,
    #[serde(default)]
    database_user: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    mongo_url: Option<String>,
}

/// A hook: a command, or `{ command = "…", timeout_secs = N }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawHook {
    Command(String),
    Table(RawHookTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHookTable {
    command: String,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    address: String,
    server_name: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// One `[[sources]]` table, tagged by `kind`. Every variant repeats the common keys (`name`,
/// `chunk_sizes`): serde cannot combine `flatten` with `deny_unknown_fields`.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum RawSource {
    Files {
        name: String,
        paths: Vec<PathBuf>,
        #[serde(default)]
        exclude: Vec<String>,
        /// Optional chunk sizes `[min, avg, max]` in bytes.
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
    Command {
        name: String,
        backup_command: String,
        restore_command: Option<String>,
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
    Postgres {
        name: String,
        database: String,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        #[serde(default)]
        format: Option<String>,
        #[serde(default)]
        restore_jobs: Option<u32>,
        /// `disable`, `prefer`, `require` or `verify-full` (default: `PGSSLMODE`, else `prefer`).
        #[serde(default)]
        sslmode: Option<String>,
        /// The CA that signed the server's certificate (required by `verify-full`).
        #[serde(default)]
        sslrootcert: Option<PathBuf>,
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
    Mysql {
        name: String,
        database: String,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
    Sqlite {
        name: String,
        path: PathBuf,
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
    Mongodb {
        name: String,
        uri: String,
        database: String,
        #[serde(default)]
        chunk_sizes: Option<[u32; 3]>,
        #[serde(default)]
        compression_level: Option<i32>,
    },
}

impl RawSource {
    fn name(&self) -> &str {
        match self {
            RawSource::Files { name, .. }
            | RawSource::Command { name, .. }
            | RawSource::Postgres { name, .. }
            | RawSource::Mysql { name, .. }
            | RawSource::Sqlite { name, .. }
            | RawSource::Mongodb { name, .. } => name,
        }
    }

    fn compression_level(&self) -> Option<i32> {
        match self {
            RawSource::Files {
                compression_level, ..
            }
            | RawSource::Command {
                compression_level, ..
            }
            | RawSource::Postgres {
                compression_level, ..
            }
            | RawSource::Mysql {
                compression_level, ..
            }
            | RawSource::Sqlite {
                compression_level, ..
            }
            | RawSource::Mongodb {
                compression_level, ..
            } => *compression_level,
        }
    }

    fn chunk_sizes(&self) -> Option<[u32; 3]> {
        match self {
            RawSource::Files { chunk_sizes, .. }
            | RawSource::Command { chunk_sizes, .. }
            | RawSource::Postgres { chunk_sizes, .. }
            | RawSource::Mysql { chunk_sizes, .. }
            | RawSource::Sqlite { chunk_sizes, .. }
            | RawSource::Mongodb { chunk_sizes, .. } => *chunk_sizes,
        }
    }
}

/// Where the coordinator is and how to prove who we are.
#[derive(Debug, Clone)]
pub(crate) struct CoordinatorAddr {
    pub(crate) address: String,
    pub(crate) server_name: String,
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// What a source is.
#[derive(Debug, Clone)]
pub(crate) enum SourceKind {
    /// A file tree.
    Files {
        paths: Vec<PathBuf>,
        exclude: Vec<String>,
    },
    /// A command's stdout; restored into another command's stdin.
    Command {
        backup_command: String,
        restore_command: Option<String>,
    },
    /// A database, dumped by its own tools.
    Database(DbSource),
    /// Bytes the agent itself produced (a bundle's index), recorded as `kind`.
    Inline {
        kind: &'static str,
        bytes: std::sync::Arc<Vec<u8>>,
    },
}

/// One configured source.
#[derive(Debug, Clone)]
pub(crate) struct SourceConfig {
    pub(crate) name: String,
    pub(crate) kind: SourceKind,
    pub(crate) chunker: ChunkerParams,
    /// zstd level of this source's chunks (1-19).
    pub(crate) zstd_level: i32,
}

impl SourceConfig {
    /// The kind's name as reported and recorded.
    pub(crate) fn kind_name(&self) -> &'static str {
        match &self.kind {
            SourceKind::Files { .. } => "files",
            SourceKind::Command { .. } => "command",
            SourceKind::Database(db) => db.engine.kind_name(),
            SourceKind::Inline { kind, .. } => kind,
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub(crate) struct AgentConfig {
    pub(crate) coordinator: CoordinatorAddr,
    pub(crate) sources: Vec<SourceConfig>,
    pub(crate) bundles: Vec<BundleConfig>,
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let raw: RawConfig =
            fleetvault_common::parse_toml(path, &text).map_err(anyhow::Error::msg)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let c = raw.coordinator;
        let coordinator = CoordinatorAddr {
            address: c.address,
            server_name: c.server_name,
            ca: abs(c.ca),
            cert: abs(c.cert),
            key: abs(c.key),
        };
        let mut seen = HashSet::new();
        let mut sources = Vec::new();
        for (i, s) in raw.sources.into_iter().enumerate() {
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
                    let at_key = |key: &str| match source_key_line(&text, i, key) {
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
            sources.push(SourceConfig {
                name,
                kind,
                chunker,
                zstd_level,
            });
        }
        // pg_dump writes a random `\restrict` key into every plain dump unless given one:
        // derive a stable one, secret to this agent, so unchanged schemas stay identical.
        if let Ok(key) = std::fs::read(&coordinator.key) {
            for s in &mut sources {
                if let SourceKind::Database(db) = &mut s.kind {
                    if db.engine == Engine::Postgres {
                        let mut h =
                            blake3::Hasher::new_derive_key("fleetvault pg_dump restrict key v1");
                        h.update(&key);
                        db.restrict_key = Some(h.finalize().to_hex()[..32].to_string());
                    }
                }
            }
        }
        let bundles = load_bundles(path, raw.bundles, &mut sources, &abs)?;
        Ok(Self {
            coordinator,
            sources,
            bundles,
        })
    }

    /// The bundle called `name`.
    pub(crate) fn bundle(&self, name: &str) -> Option<&BundleConfig> {
        self.bundles.iter().find(|b| b.name == name)
    }

    /// The source called `name`.
    pub(crate) fn source(&self, name: &str) -> anyhow::Result<&SourceConfig> {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "no source named {name:?} in the config (sources: {})",
                    names.join(", ")
                )
            })
    }

    /// Names and kinds, as reported to the coordinator.
    pub(crate) fn source_infos(&self) -> Vec<SourceInfo> {
        self.sources
            .iter()
            .map(|s| SourceInfo {
                name: s.name.clone(),
                kind: s.kind_name().to_owned(),
            })
            .chain(self.bundles.iter().map(|b| SourceInfo {
                name: b.name.clone(),
                kind: crate::bundle::KIND.to_owned(),
            }))
            .collect()
    }

    /// TLS material.
    pub(crate) fn credentials(&self) -> anyhow::Result<Credentials> {
        let c = &self.coordinator;
        Ok(Credentials::load(&c.ca, &c.cert, &c.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = r#"
[coordinator]
address = "127.0.0.1:7443"
server_name = "localhost"
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"
"#;

    fn load(sources: &str) -> anyhow::Result<AgentConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{HEAD}{sources}"))?;
        AgentConfig::load(&path)
    }

    #[test]
    fn sources_of_each_kind_load() {
        let c = load(
            r#"
[[sources]]
name = "uploads"
kind = "files"
paths = ["/srv/uploads"]
exclude = ["*.tmp"]

[[sources]]
name = "db"
kind = "command"
backup_command = "pg_dump app"
chunk_sizes = [16384, 65536, 262144]
"#,
        )
        .unwrap();
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.source("uploads").unwrap().kind_name(), "files");
        assert_eq!(c.source("db").unwrap().chunker.avg, 65536);
        assert!(c.coordinator.ca.is_absolute());
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let cases = [
            ("[[sources]]\nname = \"a\"\nkind = \"files\"\npathz = [\"/x\"]\n", "pathz"),
            ("[[sources]]\nname = \"a\"\nkind = \"tape\"\n", "tape"),
            (
                "[[sources]]\nname = \"a\"\nkind = \"command\"\nbackup_command = \"x\"\n[[sources]]\nname = \"a\"\nkind = \"command\"\nbackup_command = \"y\"\n",
                "`name` is used by another source",
            ),
            ("[[sources]]\nname = \"a\"\nkind = \"files\"\npaths = []\n", "`paths` is empty"),
            (
                "[[sources]]\nname = \"a\"\nkind = \"command\"\nbackup_command = \"x\"\nchunk_sizes = [3, 5, 7]\n",
                "`chunk_sizes`",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", load(text).unwrap_err());
            assert!(err.contains("agent.toml"), "{err}");
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn the_line_of_a_source_key() {
        let text = "[coordinator]\nsslmode = 1\n[[sources]]\nname = \"a\"\n[[sources]]\n  sslmode=\"x\"\n[[bundles]]\nsslmode = 2\n[[sources]]\nsslmode = 3\n";
        assert_eq!(source_key_line(text, 1, "sslmode"), Some(6));
        assert_eq!(source_key_line(text, 0, "sslmode"), None);
        assert_eq!(source_key_line(text, 2, "sslmode"), Some(10));
        assert_eq!(source_key_line(text, 3, "sslmode"), None);
    }

    #[test]
    fn postgres_sslmode_and_sslrootcert_are_checked() {
        let pg = |extra: &str| {
            format!("[[sources]]\nname = \"db\"\nkind = \"postgres\"\ndatabase = \"app\"\n{extra}")
        };
        // HEAD is 7 lines and [[sources]] line 8: the extra keys start on line 12.
        let cases = [
            (
                pg("sslmode = \"verify-ca\"\n"),
                "line 12: sources[0] (\"db\"): key `sslmode`: \"verify-ca\" is not one of",
            ),
            (
                pg("sslmode = \"verify-full\"\n"),
                "line 12: sources[0] (\"db\"): key `sslrootcert` is required",
            ),
            (
                pg("sslmode = \"require\"\nsslrootcert = \"/nonexistent/ca.pem\"\n"),
                "line 13: sources[0] (\"db\"): key `sslrootcert`: /nonexistent/ca.pem is not a file",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", load(&text).unwrap_err());
            assert!(err.contains("agent.toml"), "{err}");
            assert!(err.contains(want), "{want:?} not in {err}");
        }
        let c = load(&pg("")).unwrap();
        let SourceKind::Database(db) = &c.source("db").unwrap().kind else {
            panic!("not a database source")
        };
        assert_eq!(db.pg_tls.mode, None, "unset means PGSSLMODE, else prefer");

        // A relative sslrootcert is relative to agent.toml's directory.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-ca.pem"), "").unwrap();
        let path = dir.path().join("agent.toml");
        let text = pg("sslmode = \"verify-full\"\nsslrootcert = \"db-ca.pem\"\n");
        std::fs::write(&path, format!("{HEAD}{text}")).unwrap();
        let c = AgentConfig::load(&path).unwrap();
        let SourceKind::Database(db) = &c.source("db").unwrap().kind else {
            panic!("not a database source")
        };
        assert_eq!(db.pg_tls.mode, Some(SslMode::VerifyFull));
        assert_eq!(db.pg_tls.root_cert, Some(dir.path().join("db-ca.pem")));
    }
}
