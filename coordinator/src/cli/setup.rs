//! Making and changing a data directory: `init`, `issue-agent`, `issue-peer`,
//! `rebuild-catalog`, and the private, durable file writes they share.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use fleetvault_certs::{Ca, IssuedCert, Role};
use fleetvault_common::durable::{write_file, Replace};
use fleetvault_common::exit::UsageError;
use fleetvault_common::report;

use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use crate::store::ChunkStore;

use super::print_json;

/// Writes an issued certificate as `DIR/STEM.pem` (0644) and its key as `DIR/STEM.key` (0600).
fn write_issued(dir: &Path, stem: &str, cert: &IssuedCert, replace: Replace) -> anyhow::Result<()> {
    let pem = dir.join(format!("{stem}.pem"));
    write_file(&pem, cert.cert_pem.as_bytes(), 0o644, replace)?;
    let key = dir.join(format!("{stem}.key"));
    write_file(&key, cert.key_pem.as_bytes(), 0o600, replace)?;
    Ok(())
}

/// Creates `dir` (and its parents) private to this user.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// This data dir's CA, for issuing certificates.
fn load_ca(dir: &DataDir) -> anyhow::Result<Ca> {
    let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    Ca::load(&read(&dir.tls("ca.pem"))?, &read(&dir.tls("ca.key"))?)
        .context("loading this coordinator's CA")
}

pub(crate) fn init(
    root: &Path,
    listen: &str,
    server_name: &str,
    advertise: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    if dir.tls("ca.key").exists() || dir.config_path().exists() {
        bail!(
            "{} already holds a coordinator (found {}); refusing to overwrite its CA",
            root.display(),
            dir.config_path().display()
        );
    }
    let cfg = CoordinatorConfig {
        listen: listen.to_owned(),
        server_name: server_name.to_owned(),
        advertise,
        ..CoordinatorConfig::default()
    };
    let addr = cfg
        .listen_addr()
        .map_err(|e| UsageError(format!("--listen: {e:#}")))?;
    fleetvault_certs::validate_name(server_name)
        .map_err(|e| UsageError(format!("--server-name {server_name:?}: {e:#}")))?;
    let dial = cfg
        .dial_address()
        .map_err(|e| UsageError(format!("--advertise: {e:#}")))?;
    create_private_dir(&dir.tls(""))?;
    let ca = Ca::create("fleetvault fleet CA").context("creating the fleet CA")?;
    let mut sans = vec![
        server_name.to_owned(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    if !addr.ip().is_unspecified() {
        sans.push(addr.ip().to_string());
    }
    sans.dedup();
    let server = ca
        .issue(Role::Coordinator, server_name, &sans)
        .context("issuing the coordinator certificate")?;
    let operator = ca
        .issue(Role::Operator, "admin", &[])
        .context("issuing the operator certificate")?;
    write_file(
        &dir.tls("ca.pem"),
        ca.cert_pem().as_bytes(),
        0o644,
        Replace::No,
    )?;
    write_file(
        &dir.tls("ca.key"),
        ca.key_pem().as_bytes(),
        0o600,
        Replace::No,
    )?;
    let tls = dir.root().join("tls");
    write_issued(&tls, "coordinator", &server, Replace::No)?;
    write_issued(&tls, "operator", &operator, Replace::No)?;
    ChunkStore::open(&dir.store()).context("creating the chunk store")?;
    let text = format!(
        "# fleetvault coordinator configuration (written by `fleetvault-coordinator init`)\n{}",
        toml::to_string(&cfg).context("encoding coordinator.toml")?
    );
    write_file(&dir.config_path(), text.as_bytes(), 0o644, Replace::No)?;
    if json {
        print_json(&serde_json::json!({
            "status": "completed",
            "data_dir": root.display().to_string(),
            "listen": listen,
            "server_name": server_name,
            "advertise": dial,
        }))?;
    } else {
        println!(
            "initialised coordinator data dir {} (listen {listen}, server name {server_name}); agents will dial {dial}",
            root.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn issue_agent(
    root: &Path,
    name: &str,
    out: &Path,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = dir.load_config()?;
    fleetvault_certs::validate_name(name)
        .map_err(|e| UsageError(format!("agent name {name:?}: {e:#}")))?;
    let address = cfg.dial_address()?;
    let ca = load_ca(&dir)?;
    let toml_path = out.join("agent.toml");
    if toml_path.exists() && !force {
        bail!(
            "{} already exists (use --force to replace it)",
            toml_path.display()
        );
    }
    // Issuing a name again revokes its earlier certificates: only on purpose.
    // An unreadable record is replaced too (with --force): that is how it is repaired.
    let previous = match crate::issued::AgentRecord::read(root, name) {
        Ok(rec) => rec.map(|r| {
            format!(
                "certificate serial {}, issued {} UTC",
                r.serial,
                report::format_time(r.issued_ms)
            )
        }),
        Err(e) => Some(e.to_string()),
    };
    if let (Some(prev), false) = (&previous, force) {
        bail!("agent {name} was already issued ({prev}); issuing it again revokes that certificate: use --force");
    }
    create_private_dir(out)?;
    create_private_dir(&crate::issued::records_dir(root))?;
    let cert = ca
        .issue(Role::Agent, name, &[])
        .with_context(|| format!("issuing a certificate for agent {name}"))?;
    let der =
        fleetvault_common::pem_certificates_der(cert.cert_pem.as_bytes(), "the new certificate")?
            .into_iter()
            .next()
            .context("the new certificate has no PEM block")?;
    let record =
        crate::issued::AgentRecord::new(name, &der, &cert.serial_hex, crate::clock::now_ms());
    write_file(
        &out.join("ca.pem"),
        ca.cert_pem().as_bytes(),
        0o644,
        Replace::Yes,
    )?;
    write_issued(out, "agent", &cert, Replace::Yes)?;
    let text = format!(
        r#"# fleetvault agent configuration for agent "{name}", issued by the coordinator.
# Certificate serial {serial}. Paths are relative to this file.

[coordinator]
address = "{address}"
server_name = "{server_name}"
ca = "ca.pem"
cert = "agent.pem"
key = "agent.key"

# Append one [[sources]] table per thing to back up, for example:
#
# [[sources]]
# name = "uploads"
# kind = "files"
# paths = ["/var/lib/app/uploads"]
# exclude = ["*.tmp"]
#
# [[sources]]
# name = "db"
# kind = "command"
# backup_command = "pg_dump -Fc -Z0 app"
# restore_command = "pg_restore -d app"
"#,
        serial = cert.serial_hex,
        server_name = cfg.server_name,
    );
    write_file(&toml_path, text.as_bytes(), 0o600, Replace::Yes)?;
    // Last: the new certificate is accepted (and the earlier ones refused, by a running
    // coordinator within seconds) only once everything for it is written.
    write_file(
        &crate::issued::record_path(root, name),
        record
            .to_toml()
            .context("encoding the certificate record")?
            .as_bytes(),
        0o600,
        Replace::Yes,
    )?;
    if json {
        print_json(&serde_json::json!({
            "status": "completed",
            "agent": name,
            "config": toml_path.display().to_string(),
            "address": address,
            "server_name": cfg.server_name,
            "serial": cert.serial_hex,
            "replaced": previous,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    match previous {
        Some(prev) => println!(
            "issued agent {name}: {} (certificate serial {}); every earlier certificate of {name} is now refused (replaced: {prev})",
            toml_path.display(),
            cert.serial_hex,
        ),
        None => println!(
            "issued agent {name}: {} (certificate serial {}); it will dial {address}",
            toml_path.display(),
            cert.serial_hex
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn rebuild_catalog(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    dir.load_config()?;
    let store = ChunkStore::open(&dir.store())
        .with_context(|| format!("opening the chunk store {}", dir.store().display()))?;
    let records = crate::reconcile::records_with_chunks(&store)
        .context("reading the store's snapshot records")?;
    let catalog_path = dir.catalog();
    let mut kept = None;
    if catalog_path.exists() {
        // sled locks its files: opening it here fails while a coordinator serves this dir.
        drop(Catalog::open(&catalog_path, Vec::new).with_context(|| {
            format!(
                "opening {} (stop `fleetvault-coordinator serve` first)",
                catalog_path.display()
            )
        })?);
        let aside = root.join(format!("catalog.old-{}", crate::clock::now_ms()));
        fleetvault_common::durable::rename(&catalog_path, &aside)
            .with_context(|| format!("moving {} aside", catalog_path.display()))?;
        kept = Some(aside);
    }
    let n = records.len();
    let catalog = Catalog::open(&catalog_path, || records).context("creating the catalog")?;
    catalog.flush()?;
    if json {
        print_json(&serde_json::json!({
            "status": "completed",
            "records": n,
            "previous_catalog": kept.map(|k| k.display().to_string()),
        }))?;
    } else {
        if let Some(k) = &kept {
            println!("previous catalog kept as {}", k.display());
        }
        println!(
            "catalog rebuilt from {} in {}",
            report::plural(n as u64, "snapshot record", "snapshot records"),
            dir.store().display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// On a replica: issues a peer certificate from this coordinator's own CA for the primary
/// called `name`, records it as the one peer `name` may present, and writes OUTDIR with what
/// the primary needs (ca.pem, peer.pem, peer.key and a `[[replicas]]` table to append).
pub(crate) fn issue_peer(
    root: &Path,
    name: &str,
    out: &Path,
    replica_name: Option<String>,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = dir.load_config()?;
    fleetvault_certs::validate_name(name).with_context(|| format!("peer name {name:?}"))?;
    let replica = replica_name.unwrap_or_else(|| {
        cfg.server_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    });
    fleetvault_certs::validate_name(&replica)
        .with_context(|| format!("replica name {replica:?}"))?;
    let allow = dir.tls("peers").join(format!("{name}.pem"));
    if allow.exists() && !force {
        bail!(
            "peer {name} was already issued ({} exists; use --force to replace its certificate)",
            allow.display()
        );
    }
    let ca = load_ca(&dir)?;
    create_private_dir(out)?;
    create_private_dir(&dir.tls("peers"))?;
    let cert = ca
        .issue(Role::Peer, name, &[])
        .with_context(|| format!("issuing a peer certificate for {name}"))?;
    write_file(
        &out.join("ca.pem"),
        ca.cert_pem().as_bytes(),
        0o644,
        Replace::Yes,
    )?;
    write_issued(out, "peer", &cert, Replace::Yes)?;
    let text = format!(
        r#"# Append to the primary's coordinator.toml, after copying this directory to
# PRIMARY_DATA_DIR/replicas/{replica}/ (paths are relative to the primary's data dir).
# Peer certificate serial {serial}, issued to "{name}".

[[replicas]]
name = "{replica}"
address = "{address}"
server_name = "{server_name}"
ca = "replicas/{replica}/ca.pem"
cert = "replicas/{replica}/peer.pem"
key = "replicas/{replica}/peer.key"
schedule = "30 3 * * *"
agents = ["*"]
"#,
        serial = cert.serial_hex,
        address = cfg.dial_address()?,
        server_name = cfg.server_name,
    );
    write_file(
        &out.join("replica.toml"),
        text.as_bytes(),
        0o644,
        Replace::Yes,
    )?;
    // Last: the certificate is accepted only once everything for it is written.
    write_file(&allow, cert.cert_pem.as_bytes(), 0o644, Replace::Yes)?;
    if json {
        print_json(&serde_json::json!({
            "status": "completed",
            "peer": name,
            "replica": replica,
            "out": out.display().to_string(),
            "serial": cert.serial_hex,
        }))?;
    } else {
        println!(
            "issued peer {name}: copy {} to the primary (see replica.toml there)",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
