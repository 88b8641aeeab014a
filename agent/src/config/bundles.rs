//! `[[bundles]]`: validated into [`BundleConfig`]s; a profile bundle's parts are generated
//! sources, read from the application's own configuration ([`super::profiles`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use fleetvault_common::ChunkerParams;

use super::raw::{RawBundle, RawHook};
use super::{DbSource, SourceConfig, SourceKind, DATABASE_CHUNKER};

/// The source kind (and snapshot kind) of a bundle snapshot.
pub(crate) const BUNDLE_KIND: &str = "bundle";

/// A configured bundle.
#[derive(Debug, Clone)]
pub(crate) struct BundleConfig {
    pub(crate) name: String,
    /// Source names, in backup and restore order.
    pub(crate) parts: Vec<String>,
    pub(crate) before: Vec<Hook>,
    pub(crate) after: Vec<Hook>,
    pub(crate) profile: Option<String>,
    /// The application's directory (profiles; optional otherwise): `--root` moves it.
    pub(crate) root: Option<PathBuf>,
    /// The application's configuration file, rewritten by a clone.
    pub(crate) config_file: Option<PathBuf>,
    /// A profile's overrides of the database its application's configuration names.
    pub(crate) overrides: DbOverrides,
}

/// One configured hook.
#[derive(Debug, Clone)]
pub(crate) struct Hook {
    pub(crate) command: String,
    pub(crate) timeout: Duration,
}

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
pub(super) fn load_bundles(
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
        let timeout = Duration::from_secs(b.hook_timeout_secs.unwrap_or(HOOK_TIMEOUT_SECS).max(1));
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
                        timeout: secs.map_or(timeout, |s| Duration::from_secs(s.max(1))),
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
            let mut expanded = super::profiles::expand(profile, &root, b.mongo_url.as_deref())
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
