//! What every session shares: the chunk store, the catalog and the live agents.

use fleetvault_common::protocol::AgentInfo;

use crate::catalog::{Catalog, CatalogError};
use crate::push::LiveAgents;
use crate::store::ChunkStore;

/// The coordinator's shared state.
pub(crate) struct State {
    pub(crate) store: ChunkStore,
    pub(crate) catalog: Catalog,
    pub(crate) live: LiveAgents,
}

impl State {
    /// Every known agent, live or not.
    pub(crate) fn agent_infos(&self) -> Result<Vec<AgentInfo>, CatalogError> {
        let mut out: Vec<AgentInfo> = self
            .catalog
            .agents()?
            .into_iter()
            .map(|(name, rec)| {
                let live = self.live.info(&name);
                AgentInfo {
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
