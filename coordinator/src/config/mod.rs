//! The coordinator's data directory and its `coordinator.toml`.
//!
//! ```text
//! DIR/coordinator.toml   listen address, server name, jobs, replicas, peers
//! DIR/tls/               fleet CA (ca.pem, ca.key), coordinator and operator certificates
//! DIR/tls/peers/         the peer certificates `issue-peer` issued (retired/ after promote)
//! DIR/tls/agents/        NAME.toml: the certificate `issue-agent` issued last per agent
//! DIR/replicas/NAME/     a replica's CA and our peer credentials for it (as the README says)
//! DIR/store/             chunks and immutable snapshot records (see store/)
//! DIR/catalog/           sled catalog (see catalog/)
//! ```

mod jobs;
mod replicas;

pub(crate) use jobs::{globs, next_due, parse_schedule, JobConfig, Policy, ScheduleError};
pub(crate) use replicas::{PeerConfig, ReplicaConfig};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Raw `coordinator.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CoordinatorConfig {
    /// Address the QUIC endpoint binds, `HOST:PORT`.
    pub(crate) listen: String,
    /// Name agents use to verify the coordinator's certificate.
    pub(crate) server_name: String,
    /// Address written into agent configs, when it differs from `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) advertise: Option<String>,
    /// When garbage collection runs by itself (cron), if at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gc_schedule: Option<String>,
    /// How many backups the coordinator's jobs run at once (default 4); the rest wait,
    /// listed as `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_concurrent_backups: Option<u32>,
    /// When every completed snapshot is verified by itself (cron), if at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) verify_schedule: Option<String>,
    /// Unreferenced chunks younger than this many seconds are kept (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gc_min_age_secs: Option<u64>,
    /// How long a job pushed to a live agent may run before it is abandoned and its backup
    /// slot freed (default 86400, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) job_timeout_secs: Option<u64>,
    /// Scheduled backups (`[[jobs]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) jobs: Vec<JobConfig>,
    /// Where this coordinator sends its snapshots (`[[replicas]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) replicas: Vec<ReplicaConfig>,
    /// Primaries that may send snapshots here (`[[peers]]`), with their retention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) peers: Vec<PeerConfig>,
}

impl CoordinatorConfig {
    /// The bind address.
    pub(crate) fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen
            .parse()
            .with_context(|| format!("listen address {:?} is not HOST:PORT", self.listen))
    }

    /// The address other hosts dial (written into agent configs and replica tables):
    /// `advertise`, else, when `listen` is a wildcard, the server name and the listen port,
    /// else `listen` itself.
    pub(crate) fn dial_address(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.advertise {
            check_host_port("advertise", a).map_err(anyhow::Error::msg)?;
            return Ok(a.clone());
        }
        let addr = self.listen_addr()?;
        if addr.ip().is_unspecified() {
            return Ok(format!("{}:{}", self.server_name, addr.port()));
        }
        Ok(addr.to_string())
    }

    /// The address operator commands on this host dial: `listen`, a wildcard as loopback.
    pub(crate) fn local_address(&self) -> anyhow::Result<String> {
        let mut addr = self.listen_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(addr.to_string())
    }
}

/// Paths inside a coordinator data directory.
#[derive(Debug, Clone)]
pub(crate) struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.root.join("coordinator.toml")
    }

    pub(crate) fn tls(&self, file: &str) -> PathBuf {
        self.root.join("tls").join(file)
    }

    pub(crate) fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    pub(crate) fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }

    /// What operator commands need to reach the running coordinator (listen address, server
    /// name), read leniently: a mistake in the jobs must not lock the operator out while the
    /// server keeps running with its previous configuration.
    pub(crate) fn load_connect(&self) -> anyhow::Result<CoordinatorConfig> {
        #[derive(Deserialize)]
        struct Connect {
            listen: String,
            server_name: String,
            #[serde(default)]
            advertise: Option<String>,
        }
        let full = match self.load_config() {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let Ok(text) = std::fs::read_to_string(self.config_path()) else {
            return Err(full);
        };
        match toml::from_str::<Connect>(&text) {
            Ok(c) => Ok(CoordinatorConfig {
                listen: c.listen,
                server_name: c.server_name,
                advertise: c.advertise,
                ..CoordinatorConfig::default()
            }),
            Err(_) => Err(full),
        }
    }

    /// Reads and checks `coordinator.toml`, every key of it; an error is one line naming the
    /// file, the line and the key (`invalid config PATH: line N: key `K`: problem`).
    pub(crate) fn load_config(&self) -> anyhow::Result<CoordinatorConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a coordinator data dir? run `fleetvault-coordinator init` first)",
                path.display(),
                self.root.display()
            )
        })?;
        // A broken file is a configuration error: exit code 2.
        let cfg: CoordinatorConfig = fleetvault_common::parse_toml(&path, &text)
            .map_err(|e| fleetvault_common::exit::UsageError(e.to_string()))?;
        if let Err(p) = cfg.check() {
            return Err(fleetvault_common::exit::UsageError(format!(
                "invalid config {}: {}",
                path.display(),
                p.render(&text)
            ))
            .into());
        }
        Ok(cfg)
    }
}

/// Largest `max_concurrent_backups`.
pub(crate) const MAX_CONCURRENT_BACKUPS: u32 = 1024;
/// Largest `gc_min_age_secs` (a year).
pub(crate) const MAX_GC_MIN_AGE_SECS: u64 = 365 * 24 * 3600;
/// Largest `retry_base_secs` of a replica: its backoff never waits longer anyway.
pub(crate) const MAX_RETRY_BASE_SECS: u64 = 3600;

/// What is wrong with one key of `coordinator.toml`.
#[derive(Debug)]
struct Problem {
    /// The `[[TABLE]]` entry it is in (`jobs`, index, name), if not the top level.
    table: Option<(&'static str, usize, String)>,
    /// What is wrong, starting with "key `K`" when one key is to blame.
    message: String,
}

impl Problem {
    fn top(message: String) -> Self {
        Self {
            table: None,
            message,
        }
    }

    /// `line N: [TABLE[i] ("name"): ]message`; the line of the key when the message names
    /// one, else of the table.
    fn render(&self, text: &str) -> String {
        let key = self
            .message
            .strip_prefix("key `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(k, _)| k);
        let line = locate(text, self.table.as_ref().map(|(t, i, _)| (*t, *i)), key)
            .map(|l| format!("line {l}: "))
            .unwrap_or_default();
        let message = self
            .message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        match &self.table {
            Some((t, i, name)) => format!("{line}{t}[{i}] ({name:?}): {message}"),
            None => format!("{line}{message}"),
        }
    }
}

/// The 1-based line of `key` (in the `index`th entry of `[[TABLE]]` when `table` is given),
/// or of that entry when the key is not written there (a default).
fn locate(text: &str, table: Option<(&str, usize)>, key: Option<&str>) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let root = doc.as_table();
    let span = match table {
        None => root.key(key?)?.span()?,
        Some((name, index)) => {
            let entry: (&dyn toml_edit::TableLike, Option<std::ops::Range<usize>>) =
                match root.get(name)? {
                    toml_edit::Item::ArrayOfTables(a) => {
                        let t = a.get(index)?;
                        (t, t.span())
                    }
                    toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                        let v = a.get(index)?;
                        (v.as_inline_table()?, v.span())
                    }
                    _ => return None,
                };
            match key.and_then(|k| entry.0.key(k)).and_then(|k| k.span()) {
                Some(s) => s,
                None => entry.1?,
            }
        }
    };
    Some(text.get(..span.start)?.matches('\n').count() + 1)
}

/// A value of `coordinator.toml` that is refused, starting with the key to blame (which
/// [`Problem::render`] finds the line of).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// `key` holds a value that is refused.
    #[error("key `{key}`: {reason}")]
    Value { key: &'static str, reason: String },
    /// `key` holds a schedule that is refused.
    #[error("key `{key}`: {source}")]
    Schedule {
        key: &'static str,
        #[source]
        source: ScheduleError,
    },
    /// `key` is empty.
    #[error("key `{0}` is empty")]
    Empty(&'static str),
    /// A value over one of the limits.
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
}

/// `HOST:PORT` with a host and a port that is not 0.
fn check_host_port(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::Value {
        key,
        reason: format!("{value:?} is not HOST:PORT (e.g. backup.example.com:7443)"),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad()),
    }
}

impl CoordinatorConfig {
    /// Checks every key; the first problem found.
    fn check(&self) -> Result<(), Problem> {
        let top = |r: Result<(), ConfigError>| r.map_err(|e| Problem::top(e.to_string()));
        top(self
            .listen_addr()
            .map(drop)
            .map_err(|_| ConfigError::Value {
                key: "listen",
                reason: format!("{:?} is not IP:PORT (e.g. 0.0.0.0:7443)", self.listen),
            }))?;
        if self.server_name.trim().is_empty() {
            return Err(Problem::top("key `server_name` is empty".into()));
        }
        if let Some(a) = &self.advertise {
            top(check_host_port("advertise", a))?;
        }
        for (key, value) in [
            ("gc_schedule", &self.gc_schedule),
            ("verify_schedule", &self.verify_schedule),
        ] {
            if let Some(s) = value {
                top(parse_schedule(s)
                    .map(drop)
                    .map_err(|source| ConfigError::Schedule { key, source }))?;
            }
        }
        if let Some(n) = self.max_concurrent_backups {
            if n == 0 || n > MAX_CONCURRENT_BACKUPS {
                return Err(Problem::top(format!(
                    "key `max_concurrent_backups`: {n} is not between 1 and {MAX_CONCURRENT_BACKUPS}"
                )));
            }
        }
        if let Some(secs) = self.gc_min_age_secs {
            if secs > MAX_GC_MIN_AGE_SECS {
                return Err(Problem::top(format!(
                    "key `gc_min_age_secs`: {secs} is more than {MAX_GC_MIN_AGE_SECS} seconds (a year)"
                )));
            }
        }
        if let Some(secs) = self.job_timeout_secs {
            top(crate::limits::validate_job_timeout(secs).map_err(ConfigError::from))?;
        }
        check_tables("jobs", "job", &self.jobs, |j| &j.name, |j| j.validate())?;
        check_tables(
            "replicas",
            "replica",
            &self.replicas,
            |r| &r.name,
            |r| {
                r.validate()?;
                match r.retry_base_secs {
                    Some(s) if s == 0 || s > MAX_RETRY_BASE_SECS => Err(ConfigError::Value {
                        key: "retry_base_secs",
                        reason: format!("{s} is not between 1 and {MAX_RETRY_BASE_SECS}"),
                    }),
                    _ => Ok(()),
                }
            },
        )?;
        check_tables(
            "peers",
            "peer",
            &self.peers,
            |p| &p.name,
            |p| {
                fleetvault_certs::validate_name(&p.name).map_err(|e| ConfigError::Value {
                    key: "name",
                    reason: e.to_string(),
                })
            },
        )
    }
}

/// Checks `[[KEY]]` tables: each name present and unique, each table valid; a problem names
/// the table's index and name, and the key.
fn check_tables<T>(
    key: &'static str,
    what: &str,
    tables: &[T],
    name: impl Fn(&T) -> &String,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
) -> Result<(), Problem> {
    let mut names = std::collections::HashSet::new();
    for (i, t) in tables.iter().enumerate() {
        let n = name(t);
        let at = |message: String| Problem {
            table: Some((key, i, n.clone())),
            message,
        };
        if n.is_empty() || !names.insert(n.clone()) {
            return Err(at(format!("key `name` is empty or used by another {what}")));
        }
        validate(t).map_err(|e| at(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:7443\"\nserver_name = \"backup.example.com\"\n";

    fn load(text: &str) -> anyhow::Result<CoordinatorConfig> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("coordinator.toml"), text).unwrap();
        DataDir::new(dir.path()).load_config()
    }

    #[test]
    fn every_bad_key_is_refused_with_file_line_and_key() {
        let job = "[[jobs]]\nname = \"nightly\"\nagents = [\"*\"]\n";
        let replica = "[[replicas]]\nname = \"offsite\"\naddress = \"r.example.com:7443\"\n\
                       server_name = \"r\"\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n";
        let cases: Vec<(String, usize, &str)> = vec![
            (
                format!("{BASE}verify_schedule = \"every sunday\"\n"),
                3,
                "verify_schedule",
            ),
            (
                format!("{BASE}gc_schedule = \"0 99 * * *\"\n"),
                3,
                "gc_schedule",
            ),
            (
                format!("{BASE}max_concurrent_backups = 0\n"),
                3,
                "max_concurrent_backups",
            ),
            (
                format!("{BASE}gc_min_age_secs = 99999999999\n"),
                3,
                "gc_min_age_secs",
            ),
            (
                format!("{BASE}job_timeout_secs = 0\n"),
                3,
                "job_timeout_secs",
            ),
            (
                format!("{BASE}advertise = \"backup.example.com\"\n"),
                3,
                "advertise",
            ),
            (
                format!("{BASE}advertise = \"backup.example.com:0\"\n"),
                3,
                "advertise",
            ),
            (
                "server_name = \"s\"\nlisten = \"0.0.0.0\"\n".to_owned(),
                2,
                "listen",
            ),
            (
                "listen = \"127.0.0.1:1\"\nserver_name = \" \"\n".to_owned(),
                2,
                "server_name",
            ),
            (
                format!("{BASE}\n{job}schedule = \"every day\"\n"),
                7,
                "schedule",
            ),
            (
                format!("{BASE}\n{job}schedule = \"0 2 * * *\"\n{job}schedule = \"0 2 * * *\"\n"),
                9,
                "name",
            ),
            (
                format!("{BASE}\n{replica}schedule = \"hourly\"\n"),
                11,
                "schedule",
            ),
            (
                format!("{BASE}\n{replica}retry_base_secs = 0\n"),
                11,
                "retry_base_secs",
            ),
            (
                format!("{BASE}\n[[peers]]\nname = \"bad name\"\n"),
                5,
                "name",
            ),
        ];
        for (text, line, key) in cases {
            let err = format!("{:#}", load(&text).unwrap_err());
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("coordinator.toml: "), "{err}");
            assert!(
                err.contains(&format!("line {line}: ")),
                "want line {line}: {err}"
            );
            assert!(
                err.contains(&format!("key `{key}`")),
                "want key {key}: {err}"
            );
        }
    }

    #[test]
    fn a_good_config_loads_and_a_table_problem_without_a_key_names_the_table() {
        let cfg = load(&format!(
            "{BASE}advertise = \"[::1]:7443\"\nverify_schedule = \"*/2 * * * * *\"\n\
             max_concurrent_backups = 2\ngc_min_age_secs = 0\n"
        ))
        .unwrap();
        assert_eq!(cfg.max_concurrent_backups, Some(2));
        let text =
            format!("{BASE}\n[[jobs]]\nname = \"n\"\nagents = []\nschedule = \"0 2 * * *\"\n");
        let err = format!("{:#}", load(&text).unwrap_err());
        assert!(
            err.contains("line 6: jobs[0] (\"n\"): key `agents` is empty"),
            "{err}"
        );
    }
}
