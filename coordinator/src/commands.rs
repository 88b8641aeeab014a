//! The subcommands: setting up a data directory, serving, and the operator's requests to a
//! running coordinator (sled locks its files, so listings go through the server).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use fleetvault_certs::{Ca, Role};
use fleetvault_common::exit::{self, UsageError};
use fleetvault_common::protocol::{Request, Response, RestoreOptions, SnapshotFilter};
use fleetvault_common::report;
use fleetvault_common::{Client, Credentials, JobReport, SnapshotId};

use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use crate::store::ChunkStore;

pub(crate) use crate::serve::serve;

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

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Ends a command whose result is already printed (its JSON document, or its table) but
/// that did not fully succeed: one line on stderr and `code`.
fn ended_with(code: u8, message: impl std::fmt::Display) -> ExitCode {
    let word = if code == exit::WARNINGS {
        "warning"
    } else {
        "error"
    };
    eprintln!("{word}: {message}");
    ExitCode::from(code)
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
        gc_schedule: None,
        max_concurrent_backups: None,
        verify_schedule: None,
        gc_min_age_secs: None,
        job_timeout_secs: None,
        jobs: Vec::new(),
        replicas: Vec::new(),
        peers: Vec::new(),
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

/// Connects to the running coordinator with the operator certificate.
async fn operator(root: &Path) -> anyhow::Result<Client> {
    let dir = DataDir::new(root);
    let cfg = dir.load_connect()?;
    let creds = Credentials::load(
        &dir.tls("ca.pem"),
        &dir.tls("operator.pem"),
        &dir.tls("operator.key"),
    )?;
    let address = cfg.local_address()?;
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
                        "last_seen": report::rfc3339(a.last_seen_ms),
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
                            "started": report::rfc3339(l.started_ms),
                        })),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!(
                "{}",
                report::table(
                    ["NAME", "STATE", "LAST SEEN (UTC)", "VERSION", "LAST BACKUP", "SOURCES"],
                    list.iter().map(|a| {
                        let sources: Vec<String> = a
                            .sources
                            .iter()
                            .map(|s| format!("{} ({})", s.name, s.kind))
                            .collect();
                        let last = a
                            .last_backup
                            .as_ref()
                            .map(|l| {
                                format!(
                                    "{} {} {} {}",
                                    l.snapshot,
                                    l.source,
                                    l.status.name(),
                                    report::format_time(l.started_ms)
                                )
                            })
                            .unwrap_or_else(|| "-".into());
                        [
                            a.name.clone(),
                            if a.connected { "connected" } else { "offline" }.to_owned(),
                            report::format_time(a.last_seen_ms),
                            a.version.clone(),
                            last,
                            sources.join(", "),
                        ]
                    }),
                )
            );
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

/// Prints a pushed job's result (its JSON object, or its summary) and picks the exit code:
/// 1 when it failed, 3 when it completed with warnings.
fn finish_job(report: JobReport, json: bool, restore: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&report::job_json(&report))?;
    }
    if report.status != "completed" {
        return Ok(ended_with(
            exit::FAILURE,
            format!(
                "{} failed on agent {}: {}",
                if restore { "restore" } else { "backup" },
                report.agent,
                report.error.as_deref().unwrap_or("unknown error")
            ),
        ));
    }
    if !json {
        println!("{}", report::job_summary(&report, restore));
    }
    // A backup's warnings are files it could not read as they were; a restore's are notes.
    if !restore && !report.warnings.is_empty() {
        return Ok(ended_with(
            exit::WARNINGS,
            format!(
                "{} completed with {}",
                if restore { "restore" } else { "backup" },
                report::plural(report.warnings.len() as u64, "warning", "warnings")
            ),
        ));
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
    let snapshot = resolve(root, snapshot, Some(agent), options.source.as_deref())?;
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

/// A request whose reply may be preceded by `Progress` frames (counts of `unit`, shown as a
/// bar on a terminal), and the final reply.
fn call_counted(root: &Path, req: Request, unit: &str) -> anyhow::Result<Response> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let (mut send, mut recv) = client.open(&req).await?;
        let _ = send.finish();
        let bar = report::count_bar(unit);
        let reply = loop {
            match client.reply(&mut recv).await {
                Ok(Response::Progress(p)) => {
                    if let Some(t) = p.total {
                        bar.set_length(t);
                    }
                    bar.set_position(p.bytes);
                }
                other => break other,
            }
        };
        bar.finish_and_clear();
        client.close().await;
        Ok(reply?)
    })
}

/// [`call`] for long work (gc, a job run): a spinner with the elapsed time meanwhile.
fn call_long(root: &Path, req: Request, what: &str) -> anyhow::Result<Response> {
    let bar = report::spinner(what);
    let reply = call(root, req);
    bar.finish_and_clear();
    reply
}

/// A snapshot named on the command line: full id, unique prefix or `latest` (see
/// [`fleetvault_common::select`]).
fn resolve(
    root: &Path,
    spec: &str,
    agent: Option<&str>,
    source: Option<&str>,
) -> anyhow::Result<SnapshotId> {
    if let Ok(id) = spec.parse() {
        return Ok(id);
    }
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let id = fleetvault_common::select::resolve(&client, spec, agent, source).await;
        client.close().await;
        id
    })
}

pub(crate) fn show(
    root: &Path,
    spec: &str,
    agent: Option<String>,
    source: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let id =
            fleetvault_common::select::resolve(&client, spec, agent.as_deref(), source.as_deref())
                .await?;
        let filter = SnapshotFilter {
            agent: agent.clone(),
            source: source.clone(),
            ..SnapshotFilter::default()
        };
        let list = match client.call(&Request::ListSnapshots(filter)).await? {
            Response::Snapshots(l) => l,
            other => bail!("unexpected reply {other:?}"),
        };
        let rec = list
            .into_iter()
            .find(|r| r.id == id)
            .with_context(|| format!("no snapshot {id}"))?;
        let bundle = if rec.kind == crate::bundle::KIND
            && rec.status == fleetvault_common::SnapshotStatus::Completed
        {
            Some(crate::download::bundle_index(&client, id).await?)
        } else {
            None
        };
        client.close().await;
        if json {
            let mut v = report::snapshot_json(&rec);
            v["bundle"] = bundle.clone().unwrap_or(serde_json::Value::Null);
            print_json(&v)?;
        } else {
            print!("{}", report::snapshot_detail(&rec, bundle.as_ref()));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn run_job(root: &Path, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let reports = match call_long(
        root,
        Request::RunJob {
            job: job.to_owned(),
        },
        &format!("running job {job} on its agents"),
    )? {
        Response::Reports(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    if json {
        let v: Vec<_> = reports.iter().map(report::job_json).collect();
        print_json(&serde_json::json!(v))?;
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
        return Ok(ended_with(
            exit::FAILURE,
            format!("{failed} of {} backups of job {job} failed", reports.len()),
        ));
    }
    let warned = reports.iter().filter(|r| !r.warnings.is_empty()).count();
    if warned > 0 {
        return Ok(ended_with(
            exit::WARNINGS,
            format!(
                "{warned} of {} backups of job {job} completed with warnings",
                reports.len()
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn protect(
    root: &Path,
    snapshot: &str,
    on: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let snapshot = resolve(root, snapshot, None, None)?;
    call(
        root,
        Request::Protect {
            snapshot,
            protected: on,
        },
    )?;
    if json {
        print_json(
            &serde_json::json!({"status": "completed", "snapshot_id": snapshot.to_string(), "protected": on}),
        )?;
    } else {
        println!(
            "snapshot {snapshot} {}",
            if on { "protected" } else { "unprotected" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn delete(root: &Path, snapshot: &str, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = resolve(root, snapshot, None, None)?;
    call(root, Request::Delete { snapshot })?;
    if json {
        print_json(
            &serde_json::json!({"status": "completed", "snapshot_id": snapshot.to_string(), "deleted": true}),
        )?;
    } else {
        println!("snapshot {snapshot} deleted; run `fleetvault-coordinator gc` to free its chunks");
    }
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
                    "started": report::rfc3339(d.started_ms),
                    "keep": d.keep,
                    "reasons": d.reasons,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let verb = if dry_run { "would forget" } else { "forgotten" };
        print!(
            "{}",
            report::table(
                ["ID", "AGENT", "SOURCE", "STARTED (UTC)", "DECISION"],
                decisions.iter().map(|d| {
                    [
                        d.snapshot.to_string(),
                        d.agent.clone(),
                        d.source.clone(),
                        report::format_time(d.started_ms),
                        if d.keep {
                            format!("keep ({})", d.reasons.join(", "))
                        } else {
                            verb.to_owned()
                        },
                    ]
                }),
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn gc(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = match call_long(root, Request::Gc, "collecting garbage")? {
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
            "gc: {} deleted, {} freed; {} live, {} unreferenced but younger than the minimum age; {:.1}s",
            report::plural(r.deleted_chunks, "chunk", "chunks"),
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
    let snapshot = snapshot.map(|s| resolve(root, s, None, None)).transpose()?;
    let results = match call_counted(root, Request::Verify { snapshot }, "snapshots verified")? {
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
                "{}  {}/{}  {}  {state}",
                r.snapshot,
                r.agent,
                r.source,
                report::plural(r.chunks, "chunk", "chunks")
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
        // Damage is reported as an error, with exit code 3: the verification itself completed.
        eprintln!(
            "error: {} of {} snapshots are damaged; the next backup of the same data re-uploads the quarantined chunks",
            bad.len(),
            results.len()
        );
        return Ok(ExitCode::from(exit::WARNINGS));
    }
    Ok(ExitCode::SUCCESS)
}

/// The store's snapshot records, each with the chunks it references (manifest and data), for
/// rebuilding a catalog: an agent's references are what lets it back up incrementally. A
/// record whose manifest cannot be read keeps its manifest chunks only (verify reports it).
pub(crate) fn records_with_chunks(
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

pub(crate) fn rebuild_catalog(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    dir.load_config()?;
    let store = ChunkStore::open(&dir.store())
        .with_context(|| format!("opening the chunk store {}", dir.store().display()))?;
    let records = records_with_chunks(&store).context("reading the store's snapshot records")?;
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
        #[allow(clippy::disallowed_methods)] // moving a whole directory aside, not a chunk
        fs::rename(&catalog_path, &aside)
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

pub(crate) fn download(
    root: &Path,
    snapshot: &str,
    out: &Path,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let to_stdout = out == Path::new("-");
    if to_stdout && json {
        return Err(UsageError(
            "--out - writes the snapshot to stdout: it cannot also carry --json".into(),
        )
        .into());
    }
    if !to_stdout && !force && fs::symlink_metadata(out).is_ok() {
        return Err(UsageError(format!(
            "{} already exists (use --force to replace it)",
            out.display()
        ))
        .into());
    }
    runtime()?.block_on(async {
        let client = operator(root).await?;
        let snapshot = fleetvault_common::select::resolve(&client, snapshot, None, None).await?;
        let target = if to_stdout { None } else { Some(out) };
        let result = crate::download::download(&client, snapshot, target, force).await;
        client.close().await;
        let n = result?;
        if json {
            print_json(&serde_json::json!({
                "status": "completed",
                "snapshot_id": snapshot.to_string(),
                "out": out.display().to_string(),
                "bytes": n,
            }))?;
        } else if to_stdout {
            eprintln!(
                "snapshot {snapshot} written to stdout ({} of content, verified)",
                report::human_bytes(n)
            );
        } else {
            println!(
                "snapshot {snapshot} written to {} ({} of content, verified)",
                out.display(),
                report::human_bytes(n)
            );
        }
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
        print_json(&serde_json::json!(v))?;
    } else {
        for r in &reports {
            println!("{}", report::replica_summary(r));
        }
    }
    let failed: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    if let Some(first) = failed.first() {
        return Ok(ended_with(
            exit::FAILURE,
            format!(
                "{} of {} replica syncs failed; {}: {}",
                failed.len(),
                reports.len(),
                first.replica,
                first.error.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn replicas(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let list = match call(root, Request::ListReplicas)? {
        Response::Replicas(l) => l,
        other => bail!("unexpected reply {other:?}"),
    };
    let when = |t: Option<u64>| t.map(report::format_time);
    let when_json = |t: Option<u64>| t.map(report::rfc3339);
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "address": s.address,
                    "schedule": s.schedule,
                    "last_attempt": when_json(s.last_attempt_ms),
                    "last_success": when_json(s.last_success_ms),
                    "last_error": s.last_error,
                    "failures": s.failures,
                    "next_retry": when_json(s.next_retry_ms),
                    "lag_snapshots": s.lag_snapshots,
                    "lag_bytes": s.lag_bytes,
                    "last_report": s.last_report.as_ref().map(report::replica_report_json),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!(
            "{}",
            report::table(
                [
                    "NAME",
                    "ADDRESS",
                    "LAST SUCCESS (UTC)",
                    "LAST ATTEMPT (UTC)",
                    "LAG",
                    "LAST ERROR"
                ],
                list.iter().map(|s| {
                    let error = match (&s.last_error, s.next_retry_ms) {
                        (Some(e), Some(t)) => format!(
                            "{e} ({} failures; retry at {})",
                            s.failures,
                            report::format_time(t)
                        ),
                        (Some(e), None) => e.clone(),
                        (None, _) => "-".into(),
                    };
                    [
                        s.name.clone(),
                        s.address.clone(),
                        when(s.last_success_ms).unwrap_or_else(|| "never".into()),
                        when(s.last_attempt_ms).unwrap_or_else(|| "never".into()),
                        format!("{} / {}", s.lag_snapshots, report::human_bytes(s.lag_bytes)),
                        error,
                    ]
                }),
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn promote(root: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (retired, agents) = match call(root, Request::Promote)? {
        Response::Promoted {
            retired_peers,
            agents,
        } => (retired_peers, agents),
        other => bail!("unexpected reply {other:?}"),
    };
    let data_dir = root.display();
    if json {
        print_json(&serde_json::json!({
            "status": "completed",
            "retired_peers": retired,
            "agents_to_reissue": agents,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
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
