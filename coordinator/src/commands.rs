//! The subcommands: setting up a data directory, serving, and the operator's requests to a
//! running coordinator (sled locks its files, so listings go through the server).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use fleetvault_certs::{Ca, Role};
use fleetvault_common::protocol::{Request, Response, RestoreOptions, SnapshotFilter};
use fleetvault_common::report;
use fleetvault_common::{Client, Credentials, JobReport, SnapshotId};
use tracing::info;

use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use crate::store::ChunkStore;
use crate::State;

/// Logs to stderr; `FLEETVAULT_LOG` (or `RUST_LOG`) overrides the level.
pub(crate) fn init_logging() {
    let filter = std::env::var("FLEETVAULT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Writes `bytes` to `path` with exactly `mode` (whatever the umask), replacing nothing
/// unless `overwrite`.
///
/// The bytes go to a new temp file beside `path` (created with `O_EXCL | O_NOFOLLOW`), which
/// is fsynced and then renamed over `path` (or hard-linked to it when nothing may be
/// replaced), and the directory is fsynced. So an existing file's mode is never kept, a
/// symlink at `path` is replaced and never followed, and a crash leaves either the old file or
/// the new one under `path`, never a partial one.
pub(crate) fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    overwrite: bool,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("generating a temp name: {e}"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(nonce)
    ));
    let written = (|| -> anyhow::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // The umask may have taken bits away: the mode is exactly the one asked.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|_| f.write_all(bytes))
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        if overwrite {
            #[allow(clippy::disallowed_methods)] // a credential or config file, not a chunk
            fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
        } else {
            // link(2) never replaces: an existing file (or symlink) at `path` is an error.
            fs::hard_link(&tmp, path).with_context(|| format!("creating {}", path.display()))?;
            fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))
        }
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    crate::store::sync_dir(dir).with_context(|| format!("writing {}", path.display()))
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

pub(crate) fn init(root: &Path, listen: &str, server_name: &str) -> anyhow::Result<ExitCode> {
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
        advertise: None,
        gc_schedule: None,
        max_concurrent_backups: None,
        verify_schedule: None,
        gc_min_age_secs: None,
        job_timeout_secs: None,
        jobs: Vec::new(),
        replicas: Vec::new(),
        peers: Vec::new(),
    };
    let addr = cfg.listen_addr()?;
    fleetvault_certs::validate_name(server_name)
        .with_context(|| format!("server name {server_name:?}"))?;
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
    write_file(&dir.tls("ca.pem"), ca.cert_pem().as_bytes(), 0o644, false)?;
    write_file(&dir.tls("ca.key"), ca.key_pem().as_bytes(), 0o600, false)?;
    write_file(
        &dir.tls("coordinator.pem"),
        server.cert_pem.as_bytes(),
        0o644,
        false,
    )?;
    write_file(
        &dir.tls("coordinator.key"),
        server.key_pem.as_bytes(),
        0o600,
        false,
    )?;
    write_file(
        &dir.tls("operator.pem"),
        operator.cert_pem.as_bytes(),
        0o644,
        false,
    )?;
    write_file(
        &dir.tls("operator.key"),
        operator.key_pem.as_bytes(),
        0o600,
        false,
    )?;
    ChunkStore::open(&dir.store()).context("creating the chunk store")?;
    let text = format!(
        "# fleetvault coordinator configuration (written by `fleetvault-coordinator init`)\n{}",
        toml::to_string(&cfg).context("encoding coordinator.toml")?
    );
    write_file(&dir.config_path(), text.as_bytes(), 0o644, false)?;
    println!(
        "initialised coordinator data dir {} (listen {listen}, server name {server_name})",
        root.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn issue_agent(
    root: &Path,
    name: &str,
    out: &Path,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = dir.load_config()?;
    fleetvault_certs::validate_name(name).with_context(|| format!("agent name {name:?}"))?;
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
    write_file(&out.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644, true)?;
    write_file(
        &out.join("agent.pem"),
        cert.cert_pem.as_bytes(),
        0o644,
        true,
    )?;
    write_file(&out.join("agent.key"), cert.key_pem.as_bytes(), 0o600, true)?;
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
        address = cfg.dial_address()?,
        server_name = cfg.server_name,
    );
    write_file(&toml_path, text.as_bytes(), 0o600, true)?;
    // Last: the new certificate is accepted (and the earlier ones refused, by a running
    // coordinator within seconds) only once everything for it is written.
    write_file(
        &crate::issued::record_path(root, name),
        record
            .to_toml()
            .context("encoding the certificate record")?
            .as_bytes(),
        0o600,
        true,
    )?;
    match previous {
        Some(prev) => println!(
            "issued agent {name}: {} (certificate serial {}); every earlier certificate of {name} is now refused (replaced: {prev})",
            toml_path.display(),
            cert.serial_hex,
        ),
        None => println!(
            "issued agent {name}: {} (certificate serial {})",
            toml_path.display(),
            cert.serial_hex
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn serve(root: &Path) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = dir.load_config()?;
    let creds = Credentials::load(
        &dir.tls("ca.pem"),
        &dir.tls("coordinator.pem"),
        &dir.tls("coordinator.key"),
    )?;
    let store = ChunkStore::open(&dir.store())
        .with_context(|| format!("opening the chunk store {}", dir.store().display()))?;
    let mut rebuild_error = None;
    let catalog = Catalog::open(&dir.catalog(), || match records_with_chunks(&store) {
        Ok(r) => r,
        Err(e) => {
            rebuild_error = Some(e);
            Vec::new()
        }
    })
    .with_context(|| {
        format!(
            "opening the catalog {} (is another coordinator running on this data dir?)",
            dir.catalog().display()
        )
    })?;
    if let Some(e) = rebuild_error {
        bail!("rebuilding the catalog from the store: {e}");
    }
    // Before anything is served or collected: a crash between a store record and its catalog
    // entry must not leave the two disagreeing.
    crate::reconcile::reconcile(&store, &catalog)
        .map_err(|e| anyhow::anyhow!("reconciling the catalog with the store: {e}"))?;
    let state = Arc::new(State::new(root, store, catalog, &cfg));
    runtime()?.block_on(async move {
        let endpoint = fleetvault_common::server_endpoint(cfg.listen_addr()?, &creds)?;
        let local = endpoint.local_addr().context("reading the bound address")?;
        info!(%local, data_dir = %dir.root().display(), jobs = cfg.jobs.len(), "coordinator listening");
        eprintln!("fleetvault-coordinator listening on {local}");
        let token = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let reload = Arc::new(tokio::sync::Notify::new());
        let gc = cfg.gc_schedule.clone().map(|s| {
            (s, std::time::Duration::from_secs(cfg.gc_min_age_secs.unwrap_or(3600)))
        });
        tracker.spawn(crate::jobs::scheduler::run(
            state.clone(),
            gc,
            cfg.verify_schedule.clone(),
            token.clone(),
            reload.clone(),
            tracker.clone(),
        ));
        tracker.spawn(crate::replicate::scheduler(
            state.clone(),
            token.clone(),
            tracker.clone(),
        ));
        tracker.spawn(reload_on_sighup(dir.clone(), state.clone(), reload, token.clone()));
        let result = crate::server::run(endpoint, state, shutdown_signal()).await;
        token.cancel();
        tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Re-reads `coordinator.toml` on SIGHUP: new jobs take effect at once; a broken file is
/// reported (file, line, key) and the previous jobs stay.
async fn reload_on_sighup(
    dir: DataDir,
    state: Arc<State>,
    reload: Arc<tokio::sync::Notify>,
    token: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; config reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match dir.load_config() {
            Ok(cfg) => {
                state.configure(&cfg);
                reload.notify_one();
                info!(
                    jobs = cfg.jobs.len(),
                    replicas = cfg.replicas.len(),
                    peers = cfg.peers.len(),
                    "configuration reloaded"
                );
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "configuration not reloaded; keeping the previous one")
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Connects to the running coordinator with the operator certificate.
async fn operator(root: &Path) -> anyhow::Result<Client> {
    let dir = DataDir::new(root);
    let cfg = dir.load_connect()?;
    let creds = Credentials::load(
        &dir.tls("ca.pem"),
        &dir.tls("operator.pem"),
        &dir.tls("operator.key"),
    )?;
    let address = cfg.dial_address()?;
    // The error stays a ClientError (its exit code), one line naming `address`.
    Ok(Client::dial(&creds, &address, &cfg.server_name, crate::SOFTWARE).await?)
}

pub(crate) fn snapshots(
    root: &Path,
    agent: Option<String>,
    source: Option<String>,
    status: Option<String>,
    job: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let filter = SnapshotFilter {
            agent,
            source,
            status,
            job,
        };
        let list = match client.call(&Request::ListSnapshots(filter)).await? {
            Response::Snapshots(l) => l,
            other => bail!("unexpected reply {other:?}"),
        };
        client.close().await;
        if json {
            let v: Vec<_> = list.iter().map(report::snapshot_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", report::snapshots_table(&list));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn agents(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let list = match client.call(&Request::ListAgents).await? {
            Response::Agents(l) => l,
            other => bail!("unexpected reply {other:?}"),
        };
        client.close().await;
        if json {
            let v: Vec<_> = list
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "name": a.name,
                        "connected": a.connected,
                        "last_seen_ms": a.last_seen_ms,
                        "last_seen": report::format_time(a.last_seen_ms),
                        "version": a.version,
                        "sources": a.sources.iter().map(|s| serde_json::json!({"name": s.name, "kind": s.kind})).collect::<Vec<_>>(),
                        "last_backup": a.last_backup.as_ref().map(|l| serde_json::json!({
                            "id": l.snapshot.to_string(),
                            "source": l.source,
                            "status": l.status.name(),
                            "reason": match &l.status {
                                fleetvault_common::SnapshotStatus::Failed { reason } => Some(reason.clone()),
                                _ => None,
                            },
                            "started": report::format_time(l.started_ms),
                        })),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{:<24} {:<10} {:<20} {:<32} {:<36} SOURCES",
                "NAME", "STATE", "LAST SEEN (UTC)", "VERSION", "LAST BACKUP"
            );
            for a in &list {
                let sources: Vec<String> =
                    a.sources.iter().map(|s| format!("{} ({})", s.name, s.kind)).collect();
                let last = a
                    .last_backup
                    .as_ref()
                    .map(|l| format!("{} {} {}", l.source, l.status.name(), report::format_time(l.started_ms)))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<24} {:<10} {:<20} {:<32} {:<36} {}",
                    a.name,
                    if a.connected { "connected" } else { "offline" },
                    report::format_time(a.last_seen_ms),
                    a.version,
                    last,
                    sources.join(", ")
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Sends a push request and follows its progress to the result.
async fn follow(client: &Client, req: Request) -> anyhow::Result<JobReport> {
    let (mut send, mut recv) = client.open(&req).await?;
    let _ = send.finish();
    let bar = report::progress_bar(None);
    loop {
        match client.reply(&mut recv).await? {
            Response::Progress(p) => {
                if let (Some(t), None) = (p.total, bar.length()) {
                    bar.set_length(t);
                }
                bar.set_position(p.bytes);
            }
            Response::JobDone(r) => {
                bar.finish_and_clear();
                return Ok(r);
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

fn finish_job(report: JobReport, json: bool, restore: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::job_json(&report))?
        );
    }
    if report.status != "completed" {
        bail!(
            "{} failed on agent {}: {}",
            if restore { "restore" } else { "backup" },
            report.agent,
            report.error.as_deref().unwrap_or("unknown error")
        );
    }
    if !json {
        println!("{}", report::job_summary(&report, restore));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn push_backup(
    root: &Path,
    agent: &str,
    source: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let report = follow(
            &client,
            Request::PushBackup {
                agent: agent.to_owned(),
                source: source.to_owned(),
            },
        )
        .await?;
        client.close().await;
        finish_job(report, json, false)
    })
}

pub(crate) fn push_restore(
    root: &Path,
    snapshot: &str,
    agent: &str,
    options: RestoreOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let snapshot: SnapshotId = snapshot.parse()?;
    // The plain form stays the original request, so older agents keep working with it.
    let plain = options.source.is_none()
        && options.database.is_none()
        && !options.replace
        && !options.no_safety_snapshot;
    let req = if plain {
        Request::PushRestore {
            snapshot,
            agent: agent.to_owned(),
            target: options.target,
        }
    } else {
        Request::PushRestoreInto {
            snapshot,
            agent: agent.to_owned(),
            options,
        }
    };
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let report = follow(&client, req).await?;
        client.close().await;
        finish_job(report, json, true)
    })
}

/// One operator request, one reply.
fn call(root: &Path, req: Request) -> anyhow::Result<Response> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let reply = client.call(&req).await;
        client.close().await;
        Ok(reply?)
    })
}

pub(crate) fn run_job(root: &Path, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let reports = match call(
        root,
        Request::RunJob {
            job: job.to_owned(),
        },
    )? {
        Response::Reports(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    if json {
        let v: Vec<_> = reports.iter().map(report::job_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &reports {
            match &r.error {
                None => println!("{}", report::job_summary(r, false)),
                Some(e) => println!("{}/{}: failed: {e}", r.agent, r.source),
            }
        }
    }
    let failed = reports.iter().filter(|r| r.status != "completed").count();
    if failed > 0 {
        bail!("{failed} of {} backups of job {job} failed", reports.len());
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn protect(root: &Path, snapshot: &str, on: bool) -> anyhow::Result<ExitCode> {
    let snapshot: SnapshotId = snapshot.parse()?;
    call(
        root,
        Request::Protect {
            snapshot,
            protected: on,
        },
    )?;
    println!(
        "snapshot {snapshot} {}",
        if on { "protected" } else { "unprotected" }
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn delete(root: &Path, snapshot: &str) -> anyhow::Result<ExitCode> {
    let snapshot: SnapshotId = snapshot.parse()?;
    call(root, Request::Delete { snapshot })?;
    println!("snapshot {snapshot} deleted; run `fleetvault-coordinator gc` to free its chunks");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn forget(
    root: &Path,
    job: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let decisions = match call(
        root,
        Request::Forget {
            job: job.to_owned(),
            dry_run,
        },
    )? {
        Response::Retention(d) => d,
        other => bail!("unexpected reply {other:?}"),
    };
    if json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.snapshot.to_string(),
                    "agent": d.agent,
                    "source": d.source,
                    "started": report::format_time(d.started_ms),
                    "keep": d.keep,
                    "reasons": d.reasons,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let verb = if dry_run { "would forget" } else { "forgotten" };
        for d in &decisions {
            let what = if d.keep {
                format!("keep ({})", d.reasons.join(", "))
            } else {
                verb.to_owned()
            };
            println!(
                "{}  {}/{}  {}  {what}",
                d.snapshot,
                d.agent,
                d.source,
                report::format_time(d.started_ms)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn gc(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = match call(root, Request::Gc)? {
        Response::GcDone(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "live_chunks": r.live_chunks,
                "deleted_chunks": r.deleted_chunks,
                "freed_bytes": r.freed_bytes,
                "young_chunks": r.young_chunks,
                "duration_ms": r.duration_ms,
                "unreadable": r.unreadable.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "gc: {} chunks deleted, {} freed; {} live, {} unreferenced but younger than the minimum age; {:.1}s",
            r.deleted_chunks,
            report::human_bytes(r.freed_bytes),
            r.live_chunks,
            r.young_chunks,
            r.duration_ms as f64 / 1000.0
        );
        for id in &r.unreadable {
            println!("    snapshot {id}: manifest unreadable; every chunk its agent references was kept (run verify)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn verify(root: &Path, snapshot: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = snapshot.map(str::parse::<SnapshotId>).transpose()?;
    let results = match call(root, Request::Verify { snapshot })? {
        Response::Verified(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    let bad: Vec<_> = results
        .iter()
        .filter(|r| !r.damaged.is_empty() || !r.missing.is_empty() || !r.problems.is_empty())
        .collect();
    if json {
        let v: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.snapshot.to_string(),
                    "agent": r.agent,
                    "source": r.source,
                    "chunks": r.chunks,
                    "ok": r.damaged.is_empty() && r.missing.is_empty() && r.problems.is_empty(),
                    "damaged": r.damaged.iter().map(|c| c.to_hex()).collect::<Vec<_>>(),
                    "missing": r.missing.iter().map(|c| c.to_hex()).collect::<Vec<_>>(),
                    "problems": r.problems,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &results {
            let state = if r.damaged.is_empty() && r.missing.is_empty() && r.problems.is_empty() {
                "ok"
            } else {
                "DAMAGED"
            };
            println!(
                "{}  {}/{}  {} chunks  {state}",
                r.snapshot, r.agent, r.source, r.chunks
            );
            for c in &r.damaged {
                println!("    damaged chunk {c} (quarantined)");
            }
            for c in &r.missing {
                println!("    missing chunk {c}");
            }
            for p in &r.problems {
                println!("    {p}");
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} of {} snapshots are damaged; the next backup of the same data re-uploads the quarantined chunks",
            bad.len(),
            results.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The store's snapshot records, each with the chunks it references (manifest and data), for
/// rebuilding a catalog: an agent's references are what lets it back up incrementally. A
/// record whose manifest cannot be read keeps its manifest chunks only (verify reports it).
fn records_with_chunks(
    store: &ChunkStore,
) -> Result<
    Vec<(
        fleetvault_common::SnapshotRecord,
        Vec<fleetvault_common::ChunkId>,
    )>,
    crate::store::StoreError,
> {
    let records = store.read_records()?;
    Ok(records
        .into_iter()
        .map(|rec| {
            let chunks = crate::reconcile::chunks_of(store, &rec);
            (rec, chunks)
        })
        .collect())
}

pub(crate) fn rebuild_catalog(root: &Path) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    dir.load_config()?;
    let store = ChunkStore::open(&dir.store())
        .with_context(|| format!("opening the chunk store {}", dir.store().display()))?;
    let records = records_with_chunks(&store).context("reading the store's snapshot records")?;
    let catalog_path = dir.catalog();
    if catalog_path.exists() {
        // sled locks its files: opening it here fails while a coordinator serves this dir.
        drop(Catalog::open(&catalog_path, Vec::new).with_context(|| {
            format!(
                "opening {} (stop `fleetvault-coordinator serve` first)",
                catalog_path.display()
            )
        })?);
        let aside = root.join(format!("catalog.old-{}", crate::clock::now_ms()));
        #[allow(clippy::disallowed_methods)] // moving a whole directory aside, not a chunk
        fs::rename(&catalog_path, &aside)
            .with_context(|| format!("moving {} aside", catalog_path.display()))?;
        println!("previous catalog kept as {}", aside.display());
    }
    let n = records.len();
    let catalog = Catalog::open(&catalog_path, || records).context("creating the catalog")?;
    catalog.flush()?;
    println!(
        "catalog rebuilt from {n} snapshot records in {}",
        dir.store().display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn download(root: &Path, snapshot: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let snapshot: SnapshotId = snapshot.parse()?;
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let result = crate::download::download(&client, snapshot, out).await;
        client.close().await;
        let n = result?;
        println!(
            "snapshot {snapshot} written to {} ({} of content, verified)",
            out.display(),
            report::human_bytes(n)
        );
        Ok(ExitCode::SUCCESS)
    })
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
    write_file(&out.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644, true)?;
    write_file(&out.join("peer.pem"), cert.cert_pem.as_bytes(), 0o644, true)?;
    write_file(&out.join("peer.key"), cert.key_pem.as_bytes(), 0o600, true)?;
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
    write_file(&out.join("replica.toml"), text.as_bytes(), 0o644, true)?;
    // Last: the certificate is accepted only once everything for it is written.
    write_file(&allow, cert.cert_pem.as_bytes(), 0o644, true)?;
    println!(
        "issued peer {name}: copy {} to the primary (see replica.toml there)",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn replicate(
    root: &Path,
    replica: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reports = runtime()?.block_on(async {
        let client = operator(root).await?;
        let (mut send, mut recv) = client.open(&Request::Replicate { replica }).await?;
        let _ = send.finish();
        let bar = report::progress_bar(None);
        let reports = loop {
            match client.reply(&mut recv).await? {
                Response::Progress(p) => bar.set_position(p.bytes),
                Response::Replicated(r) => break r,
                other => bail!("unexpected reply {other:?}"),
            }
        };
        bar.finish_and_clear();
        client.close().await;
        Ok(reports)
    })?;
    if json {
        let v: Vec<_> = reports.iter().map(report::replica_report_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &reports {
            println!("{}", report::replica_summary(r));
        }
    }
    let failed: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} replica syncs failed; {}: {}",
            failed.len(),
            reports.len(),
            first.replica,
            first.error.as_deref().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn replicas(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let list = match call(root, Request::ListReplicas)? {
        Response::Replicas(l) => l,
        other => bail!("unexpected reply {other:?}"),
    };
    let when = |t: Option<u64>| t.map(report::format_time);
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "address": s.address,
                    "schedule": s.schedule,
                    "last_attempt": when(s.last_attempt_ms),
                    "last_success": when(s.last_success_ms),
                    "last_error": s.last_error,
                    "failures": s.failures,
                    "next_retry": when(s.next_retry_ms),
                    "lag_snapshots": s.lag_snapshots,
                    "lag_bytes": s.lag_bytes,
                    "last_report": s.last_report.as_ref().map(report::replica_report_json),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<16} {:<24} {:<20} {:<20} {:>12} LAST ERROR",
            "NAME", "ADDRESS", "LAST SUCCESS (UTC)", "LAST ATTEMPT (UTC)", "LAG"
        );
        for s in &list {
            let error = match (&s.last_error, s.next_retry_ms) {
                (Some(e), Some(t)) => format!(
                    "{e} ({} failures; retry at {})",
                    s.failures,
                    report::format_time(t)
                ),
                (Some(e), None) => e.clone(),
                (None, _) => "-".into(),
            };
            println!(
                "{:<16} {:<24} {:<20} {:<20} {:>12} {error}",
                s.name,
                s.address,
                when(s.last_success_ms).unwrap_or_else(|| "never".into()),
                when(s.last_attempt_ms).unwrap_or_else(|| "never".into()),
                format!("{} / {}", s.lag_snapshots, report::human_bytes(s.lag_bytes)),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn promote(root: &Path) -> anyhow::Result<ExitCode> {
    let (retired, agents) = match call(root, Request::Promote)? {
        Response::Promoted {
            retired_peers,
            agents,
        } => (retired_peers, agents),
        other => bail!("unexpected reply {other:?}"),
    };
    let data_dir = root.display();
    if retired.is_empty() {
        println!("promoted: no peer certificates to retire");
    } else {
        println!(
            "promoted: peer certificates retired (they can no longer send snapshots here): {}",
            retired.join(", ")
        );
    }
    println!("re-issue each agent's config from this coordinator and install it on the agent:");
    for a in &agents {
        println!(
            "  fleetvault-coordinator issue-agent {a} --data-dir {data_dir} --out ./{a} --force"
        );
    }
    println!("to seed a new replica, run `issue-peer` on it and add its [[replicas]] table here");
    Ok(ExitCode::SUCCESS)
}
