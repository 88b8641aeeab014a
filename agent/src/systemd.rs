//! `fleetvault-agent systemd-dropin`: the `ReadWritePaths=` drop-in that lets restores write
//! where this host's sources live, under the shipped unit's `ProtectSystem=strict` and
//! `ProtectHome=read-only` (deploy/fleetvault-agent.service).
//!
//! Which directory a restore writes to, by source:
//! - a `files` path that is a directory: the directory (files are written beside each other
//!   under temporary names and renamed);
//! - a `files` path that is a file, or that does not exist yet: its parent directory (the
//!   temporary file is created beside it; a missing directory is created in its parent);
//! - a `sqlite` database: the directory of its file (replaced through a temporary file);
//! - a bundle's `root`: the root (a profile's configuration file is rewritten there).
//!
//! Database servers are reached over their socket or TCP, which the sandbox leaves alone.
//! A `command` source's `restore_command` writes wherever it writes: the drop-in names such
//! sources in a comment, for the operator to add their paths.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetvault_common::durable;

use crate::config::{AgentConfig, Engine, SourceKind};

/// Where `--write` puts the drop-in by default.
pub(crate) const DROPIN_PATH: &str =
    "/etc/systemd/system/fleetvault-agent.service.d/restore-paths.conf";

/// The directories restores of `config`'s sources and bundles write to, sorted, without any
/// that lies inside another.
pub(crate) fn restore_paths(config: &AgentConfig) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for s in &config.sources {
        match &s.kind {
            SourceKind::Files { paths: p, .. } => paths.extend(p.iter().map(|p| writable_dir(p))),
            SourceKind::Database(db) if db.engine == Engine::Sqlite => {
                let file = Path::new(&db.database);
                paths.push(parent_of(file));
            }
            _ => {}
        }
    }
    for b in &config.bundles {
        if let Some(root) = &b.root {
            paths.push(writable_dir(root));
        }
    }
    paths.sort();
    paths.dedup();
    let all = paths.clone();
    paths.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    paths
}

/// `path` if it is a directory, else the directory its entry is created in.
fn writable_dir(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => path.to_owned(),
        _ => parent_of(path),
    }
}

/// The parent of `path`, or `path` itself where that would be `/` (never the whole system).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if p != Path::new("/") && !p.as_os_str().is_empty() => p.to_owned(),
        _ => path.to_owned(),
    }
}

/// One `ReadWritePaths=` value: `-` (ignored while missing), systemd's quoting where needed,
/// `%` doubled (unit files expand specifiers).
fn unit_value(path: &Path) -> anyhow::Result<String> {
    let Some(s) = path.to_str() else {
        bail!("{} is not UTF-8: systemd cannot name it", path.display());
    };
    if s.chars().any(char::is_control) {
        bail!("{path:?} holds a control character: systemd cannot name it");
    }
    let word = format!("-{}", s.replace('%', "%%"));
    if word.contains([' ', '\t', '"', '\'', '\\']) {
        Ok(format!(
            "\"{}\"",
            word.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    } else {
        Ok(word)
    }
}

/// The drop-in's text for `config`, loaded from `config_path`.
pub(crate) fn dropin(config_path: &Path, config: &AgentConfig) -> anyhow::Result<String> {
    let mut out = format!(
        "# Where restores of the sources in {0} write: writable to fleetvault-agent despite\n\
         # ProtectSystem=strict and ProtectHome=read-only. Written by\n\
         # `fleetvault-agent systemd-dropin --config {0}`: run it again when sources change.\n\
         # '-': ignored while missing. Restores to --target DIR elsewhere need DIR added here, or\n\
         # a DIR under /var/lib/fleetvault-agent (writable).\n",
        config_path.display()
    );
    for s in &config.sources {
        if let SourceKind::Command {
            restore_command: Some(cmd),
            ..
        } = &s.kind
        {
            out.push_str(&format!(
                "# source {:?}: add what its restore_command writes to: {}\n",
                s.name,
                cmd.replace('\n', " ")
            ));
        }
    }
    out.push_str("[Service]\n");
    for p in restore_paths(config) {
        out.push_str(&format!("ReadWritePaths={}\n", unit_value(&p)?));
    }
    Ok(out)
}

/// `systemd-dropin`: prints the drop-in, or writes it durably to `write`.
pub(crate) fn run(config_path: &Path, write: Option<&Path>) -> anyhow::Result<()> {
    let config = AgentConfig::load(config_path)?;
    let text = dropin(config_path, &config)?;
    let Some(path) = write else {
        print!("{text}");
        return Ok(());
    };
    write_durably(path, text.as_bytes())?;
    eprintln!(
        "wrote {}; now: systemctl daemon-reload && systemctl restart fleetvault-agent",
        path.display()
    );
    Ok(())
}

/// Creates `path`'s directory, then writes it durably (architecture rule 7).
fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    durable::write_file(path, bytes, 0o644, durable::Replace::Yes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropin_lists_where_restores_write() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let app = d.join("opt/mattermost");
        std::fs::create_dir_all(app.join("data")).unwrap();
        std::fs::create_dir_all(d.join("home/chatwoot/chatwoot/storage")).unwrap();
        std::fs::write(d.join("home/chatwoot/chatwoot/.env"), "X=1\n").unwrap();
        std::fs::create_dir_all(d.join("srv/space dir")).unwrap();
        let cfg = d.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"[coordinator]
address = "127.0.0.1:7443"
server_name = "localhost"
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"

[[sources]]
name = "mm-data"
kind = "files"
paths = ["{d}/opt/mattermost/data", "{d}/opt/mattermost/data/sub"]

[[sources]]
name = "cw-storage"
kind = "files"
paths = ["{d}/home/chatwoot/chatwoot/storage", "{d}/home/chatwoot/chatwoot/.env"]

[[sources]]
name = "fresh"
kind = "files"
paths = ["{d}/var/lib/app/uploads", "{d}/srv/space dir/100%"]

[[sources]]
name = "notes"
kind = "sqlite"
path = "{d}/var/lib/notes/notes.db"

[[sources]]
name = "db"
kind = "command"
backup_command = "pg_dump app"
restore_command = "psql app"

[[bundles]]
name = "mm"
parts = ["mm-data"]
root = "{d}/opt/mattermost"
"#,
                d = d.display()
            ),
        )
        .unwrap();
        let config = AgentConfig::load(&cfg).unwrap();
        let want: Vec<PathBuf> = [
            "home/chatwoot/chatwoot", // parent of .env; storage/ lies inside it
            "opt/mattermost",         // the bundle root; data/ lies inside it
            "srv/space dir",          // parent of a missing file
            "var/lib/app",            // parent of a missing directory
            "var/lib/notes",          // the sqlite file's directory
        ]
        .iter()
        .map(|p| d.join(p))
        .collect();
        assert_eq!(restore_paths(&config), want);

        let text = dropin(&cfg, &config).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines[0], "[Service]");
        assert_eq!(
            lines[1],
            format!("ReadWritePaths=-{}/home/chatwoot/chatwoot", d.display())
        );
        assert_eq!(
            lines[3],
            format!("ReadWritePaths=\"-{}/srv/space dir\"", d.display())
        );
        assert_eq!(lines.len(), 6, "{text}");
        assert!(text.contains("source \"db\": add what its restore_command writes to: psql app"));

        // --write replaces an older drop-in whole.
        let out = d.join("etc/restore-paths.conf");
        write_durably(&out, b"old").unwrap();
        run(&cfg, Some(&out)).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    }

    #[test]
    fn percent_signs_and_control_characters() {
        assert_eq!(unit_value(Path::new("/srv/100%")).unwrap(), "-/srv/100%%");
        assert!(unit_value(Path::new("/srv/a\nb")).is_err());
    }
}
