//! The raw serde shape of `agent.toml`, before validation. Imports nothing of the agent.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) coordinator: RawCoordinator,
    #[serde(default)]
    pub(super) sources: Vec<RawSource>,
    #[serde(default)]
    pub(super) bundles: Vec<RawBundle>,
}

/// One `[[bundles]]` table: parts and hooks, or a `profile` with its `root`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBundle {
    pub(super) name: String,
    #[serde(default)]
    pub(super) parts: Vec<String>,
    #[serde(default)]
    pub(super) before: Option<Vec<RawHook>>,
    #[serde(default)]
    pub(super) after: Option<Vec<RawHook>>,
    /// Default timeout of this bundle's hooks (300 s).
    #[serde(default)]
    pub(super) hook_timeout_secs: Option<u64>,
    #[serde(default)]
    pub(super) profile: Option<String>,
    #[serde(default)]
    pub(super) root: Option<PathBuf>,
    /// The service the profile's default hooks stop and start.
    #[serde(default)]
    pub(super) service: Option<String>,
    /// Overrides of what the profile reads from the application's configuration.
    #[serde(default)]
    pub(super) database_host: Option<String>,
    #[serde(default)]
    pub(super) database_port: Option<u16>,
    #[serde(default)]
    pub(super) database_user: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) mongo_url: Option<String>,
}

/// A hook: a command, or `{ command = "…", timeout_secs = N }`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawHook {
    Command(String),
    Table(RawHookTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHookTable {
    pub(super) command: String,
    #[serde(default)]
    pub(super) timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCoordinator {
    pub(super) address: String,
    pub(super) server_name: String,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// One `[[sources]]` table, tagged by `kind`. Every variant repeats the common keys (`name`,
/// `chunk_sizes`): serde cannot combine `flatten` with `deny_unknown_fields`.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum RawSource {
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
    pub(super) fn name(&self) -> &str {
        match self {
            RawSource::Files { name, .. }
            | RawSource::Command { name, .. }
            | RawSource::Postgres { name, .. }
            | RawSource::Mysql { name, .. }
            | RawSource::Sqlite { name, .. }
            | RawSource::Mongodb { name, .. } => name,
        }
    }

    pub(super) fn compression_level(&self) -> Option<i32> {
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

    pub(super) fn chunk_sizes(&self) -> Option<[u32; 3]> {
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
