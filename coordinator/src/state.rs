//! What every session shares: the chunk store, the catalog and the live agents.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fleetvault_common::protocol::{AgentInfo, LastBackup};

use crate::catalog::{Catalog, CatalogError};
use crate::config::CoordinatorConfig;
use crate::config::{PeerConfig, ReplicaConfig};
use crate::pins::Pins;
use crate::push::LiveAgents;
use crate::store::ChunkStore;

/// The coordinator's shared state.
pub(crate) struct State {
    pub(crate) store: ChunkStore,
    pub(crate) catalog: Catalog,
    pub(crate) live: LiveAgents,
    /// The `[[jobs]]` of `coordinator.toml`, replaced on SIGHUP.
    pub(crate) jobs: std::sync::RwLock<Vec<crate::config::JobConfig>>,
    /// What garbage collection keeps for running backups (docs/architecture.md rule 9).
    pub(crate) pins: Pins,
    /// Held by the garbage collection that runs: one at a time, operator's or scheduled
    /// (`jobs::gc::collect` refuses a second).
    pub(crate) gc_lock: Mutex<()>,
    /// Backups the coordinator starts (jobs) take a slot; the rest wait, listed `pending`.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    /// Resizes `slots` to `max_concurrent_backups` on reload.
    slot_limit: crate::limits::BackupSlots,
    /// `gc_schedule` and `verify_schedule`, replaced on SIGHUP.
    schedules: std::sync::RwLock<Schedules>,
    /// Held by the verification that runs: one at a time, operator's or scheduled.
    pub(crate) verify_lock: Mutex<()>,
    /// Unreferenced chunks younger than this are kept by garbage collection.
    pub(crate) gc_min_age: std::sync::atomic::AtomicU64,
    /// The data dir (peer allow-list, replica credentials).
    pub(crate) root: std::path::PathBuf,
    /// `[[replicas]]` (this coordinator as a primary) and `[[peers]]` (as a replica).
    replicas: std::sync::RwLock<Vec<ReplicaConfig>>,
    peers: std::sync::RwLock<Vec<PeerConfig>>,
    /// One sync at a time per replica.
    sync_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the replica scheduler (configuration changed, a sync ended).
    pub(crate) replica_wake: tokio::sync::Notify,
    /// What one certificate may take: connections, buffered bytes, a pushed job's time.
    pub(crate) limits: Arc<crate::limits::Limits>,
}

/// When garbage collection and verification run by themselves (cron), if at all.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Schedules {
    pub(crate) gc: Option<String>,
    pub(crate) verify: Option<String>,
}

/// `max_concurrent_backups` when not set.
pub(crate) const DEFAULT_MAX_CONCURRENT_BACKUPS: u32 = 4;

impl State {
    /// A new state around an opened store and catalog, configured by `cfg`.
    pub(crate) fn new(
        root: &Path,
        store: ChunkStore,
        catalog: Catalog,
        cfg: &CoordinatorConfig,
    ) -> Self {
        let slot_limit = crate::limits::BackupSlots::new(max_backups(cfg));
        let state = Self {
            store,
            catalog,
            live: LiveAgents::default(),
            jobs: Default::default(),
            pins: Pins::default(),
            gc_lock: Mutex::default(),
            slots: slot_limit.semaphore().clone(),
            slot_limit,
            schedules: Default::default(),
            verify_lock: Mutex::default(),
            gc_min_age: std::sync::atomic::AtomicU64::new(3600),
            root: root.to_owned(),
            replicas: Default::default(),
            peers: Default::default(),
            sync_locks: Mutex::default(),
            replica_wake: tokio::sync::Notify::new(),
            limits: Arc::default(),
        };
        state.configure(cfg);
        state
    }

    /// Takes the reloadable parts of `coordinator.toml`: everything but `listen` and
    /// `server_name`.
    pub(crate) fn configure(&self, cfg: &CoordinatorConfig) {
        *self.jobs.write().expect("jobs lock") = cfg.jobs.clone();
        *self.schedules.write().expect("schedules lock") = Schedules {
            gc: cfg.gc_schedule.clone(),
            verify: cfg.verify_schedule.clone(),
        };
        self.slot_limit.resize(max_backups(cfg));
        *self.replicas.write().expect("replicas lock") = cfg.replicas.clone();
        *self.peers.write().expect("peers lock") = cfg.peers.clone();
        self.gc_min_age.store(
            cfg.gc_min_age_secs.unwrap_or(3600),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.live.set_job_timeout_secs(cfg.job_timeout_secs);
        self.replica_wake.notify_one();
    }

    /// The replicas now configured.
    pub(crate) fn replicas(&self) -> Vec<ReplicaConfig> {
        self.replicas.read().expect("replicas lock").clone()
    }

    /// The `[[peers]]` entry of `name`, if any.
    pub(crate) fn peer(&self, name: &str) -> Option<PeerConfig> {
        self.peers
            .read()
            .expect("peers lock")
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    /// The lock that keeps syncs to `replica` one at a time.
    pub(crate) fn sync_lock(&self, replica: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.sync_locks
            .lock()
            .expect("sync locks")
            .entry(replica.to_owned())
            .or_default()
            .clone()
    }

    /// `tls/peers/NAME.pem`: the certificate a peer called `name` must present.
    pub(crate) fn peer_cert_path(&self, name: &str) -> std::path::PathBuf {
        self.root
            .join("tls")
            .join("peers")
            .join(format!("{name}.pem"))
    }

    /// Whether `der` is the certificate issued (and not retired) for peer `name`.
    pub(crate) fn peer_allowed(&self, name: &str, der: &[u8]) -> bool {
        let path = self.peer_cert_path(name);
        std::fs::read(&path).is_ok_and(|pem| {
            fleetvault_common::pem_certificates_der(&pem, &path.display().to_string())
                .is_ok_and(|certs| certs.iter().any(|c| c == der))
        })
    }

    /// The configured minimum age of a chunk before garbage collection may delete it.
    pub(crate) fn gc_min_age_secs(&self) -> u64 {
        self.gc_min_age.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `gc_schedule` and `verify_schedule` now configured.
    pub(crate) fn schedules(&self) -> Schedules {
        self.schedules.read().expect("schedules lock").clone()
    }

    /// The jobs now configured.
    pub(crate) fn jobs(&self) -> Vec<crate::config::JobConfig> {
        self.jobs.read().expect("jobs lock").clone()
    }
}

/// `max_concurrent_backups`, or its default.
fn max_backups(cfg: &CoordinatorConfig) -> usize {
    cfg.max_concurrent_backups
        .unwrap_or(DEFAULT_MAX_CONCURRENT_BACKUPS)
        .max(1) as usize
}

impl State {
    /// Every known agent, live or not.
    pub(crate) fn agent_infos(&self) -> Result<Vec<AgentInfo>, CatalogError> {
        let mut last: HashMap<String, LastBackup> = HashMap::new();
        for r in self.catalog.list(&Default::default())? {
            let newer = last
                .get(&r.agent)
                .is_none_or(|l| r.started_ms >= l.started_ms);
            if newer {
                last.insert(
                    r.agent.clone(),
                    LastBackup {
                        snapshot: r.id,
                        source: r.source,
                        status: r.status,
                        started_ms: r.started_ms,
                    },
                );
            }
        }
        let mut out: Vec<AgentInfo> = self
            .catalog
            .agents()?
            .into_iter()
            .map(|(name, rec)| {
                let live = self.live.info(&name);
                AgentInfo {
                    last_backup: last.get(&name).cloned(),
                    connected: live.is_some(),
                    sources: live
                        .as_ref()
                        .map(|l| l.sources.clone())
                        .unwrap_or(rec.sources),
                    version: live.map(|l| l.version).unwrap_or(rec.version),
                    last_seen_ms: rec.last_seen_ms,
                    name,
                }
            })
            .collect();
        for name in self.live.names() {
            if !out.iter().any(|a| a.name == name) {
                if let Some(l) = self.live.info(&name) {
                    out.push(AgentInfo {
                        last_backup: last.get(&name).cloned(),
                        name,
                        connected: true,
                        last_seen_ms: crate::clock::now_ms(),
                        version: l.version,
                        sources: l.sources,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
