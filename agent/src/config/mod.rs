//! The agent's TOML file: raw serde types ([`raw`]), validated into [`AgentConfig`]. Errors
//! name the file and the key. Relative paths are relative to the file's directory.
//!
//! A leaf: it imports nothing of the agent. The types every other module is configured with
//! live here (sources, databases, bundles and their hooks), and so does the reading of an
//! application's own configuration by a bundle profile ([`profiles`]), since a profile is
//! expanded into sources when the file is loaded.

mod bundles;
mod db;
pub(crate) mod profiles;
mod raw;
mod sources;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleetvault_common::protocol::SourceInfo;
use fleetvault_common::{ChunkerParams, Credentials};

pub(crate) use bundles::{BundleConfig, Hook, BUNDLE_KIND};
pub(crate) use db::{DbSource, Engine, PgFormat, PgTls, Secret, SslMode};
use raw::RawConfig;
use sources::DATABASE_CHUNKER;

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
            sources.push(sources::validate(path, &text, i, s, &mut seen, &abs)?);
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
        let bundles = bundles::load_bundles(path, raw.bundles, &mut sources, &abs)?;
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
                kind: BUNDLE_KIND.to_owned(),
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
