//! `[[replicas]]` (where a primary sends its snapshots) and `[[peers]]` (which primaries a
//! replica accepts) tables.

use std::path::PathBuf;
use std::time::Duration;

use fleetvault_common::SnapshotRecord;
use serde::{Deserialize, Serialize};

use super::{globs, parse_schedule, ConfigError, Policy};

/// The longest wait between retries of a failing sync.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// One `[[replicas]]` table of a primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplicaConfig {
    pub(crate) name: String,
    /// The replica's `HOST:PORT`.
    pub(crate) address: String,
    /// The name in the replica's certificate.
    pub(crate) server_name: String,
    /// The replica's CA certificate, its peer certificate for us and that key: paths relative
    /// to the data dir, or absolute.
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schedule: Option<String>,
    #[serde(default = "all")]
    pub(crate) agents: Vec<String>,
    #[serde(default = "all")]
    pub(crate) sources: Vec<String>,
    /// Only snapshots made by these jobs (globs); absent: every snapshot, by a job or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) jobs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry_base_secs: Option<u64>,
}

/// One `[[peers]]` table of a replica: a primary allowed to send here, and how long what it
/// sent is kept (default: for ever).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerConfig {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) retention: Policy,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

impl ReplicaConfig {
    /// Checks names, schedule and globs.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        fleetvault_certs::validate_name(&self.name).map_err(|e| ConfigError::Value {
            key: "name",
            reason: e.to_string(),
        })?;
        if !self.address.contains(':') {
            return Err(ConfigError::Value {
                key: "address",
                reason: format!("{:?} is not HOST:PORT", self.address),
            });
        }
        if let Some(s) = &self.schedule {
            parse_schedule(s).map_err(|source| ConfigError::Schedule {
                key: "schedule",
                source,
            })?;
        }
        globs(&self.agents, "agents")?;
        globs(&self.sources, "sources")?;
        if let Some(j) = &self.jobs {
            globs(j, "jobs")?;
        }
        Ok(())
    }

    /// Which snapshots go to this replica (the globs compiled once).
    pub(crate) fn selector(&self) -> Result<impl Fn(&SnapshotRecord) -> bool, ConfigError> {
        let agents = globs(&self.agents, "agents")?;
        let sources = globs(&self.sources, "sources")?;
        let jobs = self.jobs.as_ref().map(|j| globs(j, "jobs")).transpose()?;
        Ok(move |rec: &SnapshotRecord| {
            agents.is_match(&rec.agent)
                && sources.is_match(&rec.source)
                && jobs
                    .as_ref()
                    .is_none_or(|j| rec.job.as_ref().is_some_and(|name| j.is_match(name)))
        })
    }

    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let base = Duration::from_secs(self.retry_base_secs.unwrap_or(30).max(1));
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        (base * factor).min(MAX_BACKOFF)
    }
}
