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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Raw `coordinator.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub(crate) jobs: Vec<crate::jobs::JobConfig>,
    /// Where this coordinator sends its snapshots (`[[replicas]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) replicas: Vec<crate::replicate::ReplicaConfig>,
    /// Primaries that may send snapshots here (`[[peers]]`), with their retention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) peers: Vec<crate::replicate::PeerConfig>,
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
            check_host_port(a).with_context(|| format!("advertise {a:?}"))?;
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

/// `HOST:PORT` with a port number (HOST a name or an address; IPv6 in brackets).
pub(crate) fn check_host_port(text: &str) -> anyhow::Result<()> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| "is not HOST:PORT".to_owned())?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        bail!("is not HOST:PORT (a host and a port number)");
    }
    Ok(())
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
                gc_schedule: None,
                max_concurrent_backups: None,
                verify_schedule: None,
                gc_min_age_secs: None,
                job_timeout_secs: None,
                jobs: Vec::new(),
                replicas: Vec::new(),
                peers: Vec::new(),
            }),
            Err(_) => Err(full),
        }
    }

    /// Reads and checks `coordinator.toml`; errors name the file and the key.
    pub(crate) fn load_config(&self) -> anyhow::Result<CoordinatorConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is {} a coordinator data dir? run `fleetvault-coordinator init` first)",
                path.display(),
                self.root.display()
            )
        })?;
        let cfg: CoordinatorConfig =
            fleetvault_common::parse_toml(&path, &text).map_err(anyhow::Error::msg)?;
        cfg.listen_addr()
            .with_context(|| format!("invalid {}: key `listen`", path.display()))?;
        if cfg.server_name.is_empty() {
            bail!("invalid {}: key `server_name` is empty", path.display());
        }
        if let Some(g) = &cfg.gc_schedule {
            crate::jobs::parse_schedule(g).map_err(|e| {
                anyhow::anyhow!("invalid config {}: key `gc_schedule`: {e}", path.display())
            })?;
        }
        if let Some(secs) = cfg.job_timeout_secs {
            crate::limits::validate_job_timeout(secs)
                .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
        }
        check_tables(
            &path,
            "jobs",
            "job",
            &cfg.jobs,
            |j| &j.name,
            |j| j.validate(),
        )?;
        check_tables(
            &path,
            "replicas",
            "replica",
            &cfg.replicas,
            |r| &r.name,
            |r| r.validate(),
        )?;
        check_tables(
            &path,
            "peers",
            "peer",
            &cfg.peers,
            |p| &p.name,
            |p| fleetvault_certs::validate_name(&p.name).map_err(|e| format!("key `name`: {e}")),
        )?;
        Ok(cfg)
    }
}

/// Checks `[[KEY]]` tables: each name present and unique, each table valid; errors name the
/// file, the table's index and name, and the key.
fn check_tables<T>(
    path: &Path,
    key: &str,
    what: &str,
    tables: &[T],
    name: impl Fn(&T) -> &String,
    validate: impl Fn(&T) -> Result<(), String>,
) -> anyhow::Result<()> {
    let mut names = std::collections::HashSet::new();
    for (i, t) in tables.iter().enumerate() {
        let n = name(t);
        let at = format!("invalid config {}: {key}[{i}] ({n:?})", path.display());
        if n.is_empty() || !names.insert(n.clone()) {
            bail!("{at}: key `name` is empty or used by another {what}");
        }
        validate(t).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
    }
    Ok(())
}
