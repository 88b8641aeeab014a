//! Revocation by re-issue: `issue-agent NAME --force` makes every earlier certificate of NAME
//! useless, on a running coordinator within seconds (its live connection is closed, a new one
//! is refused right after the TLS handshake) and after a restart; a name issued before
//! certificate records existed keeps working until it is re-issued. And the files
//! `issue-agent` writes get exactly their modes, replacing (never following) a symlink.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetvault_common::protocol::close;
use fleetvault_common::{Client, Credentials};
use fleetvault_tests::{scratch, CommandSource, Coordinator};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Copies an agent's credentials to `to`: what someone who stole the host's key holds.
fn copy_credentials(from: &Path, to: &Path) -> anyhow::Result<Credentials> {
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::copy(from.join(f), to.join(f))?;
    }
    Ok(Credentials::load(
        &to.join("ca.pem"),
        &to.join("agent.pem"),
        &to.join("agent.key"),
    )?)
}

/// Completes a TLS handshake with `creds`, sends nothing, and returns the reason the
/// coordinator closed the connection with `NOT_AUTHORIZED` within `wait`; an error if it
/// closed it otherwise or left it open.
async fn refused_after_handshake(
    coordinator: &Coordinator,
    creds: &Credentials,
    wait: Duration,
) -> anyhow::Result<String> {
    let endpoint = fleetvault_common::client_endpoint(creds)?;
    let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
    let conn = fleetvault_common::connect(&endpoint, addr, "localhost").await?;
    let closed = tokio::time::timeout(wait, conn.closed()).await;
    conn.close(0u32.into(), b"test done");
    match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(close::NOT_AUTHORIZED) =>
        {
            Ok(String::from_utf8_lossy(&c.reason).into_owned())
        }
        Ok(other) => anyhow::bail!("connection closed, but not as unauthorized: {other}"),
        Err(_) => anyhow::bail!("the connection is still open {wait:?} after the handshake"),
    }
}

async fn hello(coordinator: &Coordinator, creds: &Credentials) -> anyhow::Result<Client> {
    let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
    Ok(Client::connect(creds, addr, "localhost", "revocation-test/0").await?)
}

#[test]
fn reissuing_an_agent_revokes_its_old_certificate_at_once_and_after_a_restart() -> anyhow::Result<()>
{
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("host-a")?;
    let source = CommandSource {
        name: "notes".into(),
        backup_command: "echo revocation".into(),
        ..Default::default()
    };
    agent.add_command_source(&source)?;
    let stolen = scratch("stolen")?;
    let stale = copy_credentials(agent.conf_dir(), stolen.path())?;
    let mut old_link = agent.run()?;
    coordinator.wait_agent_connected("host-a", Duration::from_secs(60))?;

    // Issuing an issued name again by mistake (another OUTDIR, no --force) revokes nothing.
    let elsewhere = scratch("elsewhere")?;
    let out = elsewhere.path().join("conf");
    let err = coordinator
        .cli(&["issue-agent", "host-a", "--out", out.to_str().unwrap()])?
        .ensure_failure()?;
    assert!(err.contains("--force"), "{err}");
    assert!(!out.join("agent.key").exists());
    let rt = runtime()?;
    rt.block_on(async {
        hello(&coordinator, &stale).await?.close().await;
        anyhow::Ok(())
    })?;

    // The operator re-issues host-a while serve runs: the old link is closed within seconds.
    agent.reissue(&coordinator)?.ensure_success()?;
    let reissued = Instant::now();
    agent.add_command_source(&source)?;
    let line = old_link
        .process()
        .wait_for_line("link to coordinator lost", Duration::from_secs(15))?;
    assert!(
        reissued.elapsed() < Duration::from_secs(8),
        "the old certificate's connection lived {:?} after the re-issue",
        reissued.elapsed()
    );
    assert!(
        line.contains("host-a") && line.contains("replaced"),
        "{line}"
    );
    coordinator.wait_for_log_line("a logged reason naming the agent", |l| {
        l.contains("closing the connection of a replaced agent certificate") && l.contains("host-a")
    })?;

    // A new connection with the old certificate is refused right after the handshake, with a
    // reason, and logged; the full client gets nowhere either.
    rt.block_on(async {
        let reason = refused_after_handshake(&coordinator, &stale, Duration::from_secs(5)).await?;
        assert!(
            reason.contains("host-a") && reason.contains("replaced"),
            "{reason}"
        );
        let refused = hello(&coordinator, &stale).await;
        assert!(refused.is_err(), "the old certificate said hello");
        anyhow::Ok(())
    })?;
    // The refusal is logged after the peer sees the close, so it is awaited, not raced.
    coordinator.wait_for_log_line("a logged refusal naming the agent", |l| {
        l.contains("refusing a replaced agent certificate") && l.contains("agent host-a")
    })?;

    // The new certificate works, and pushes go to it (the old link cannot come back).
    let new_link = agent.run()?;
    coordinator.wait_agent_connected("host-a", Duration::from_secs(60))?;
    let report = coordinator.push_backup("host-a", "notes")?;
    assert_eq!(report["status"], "completed", "{report}");
    let retry = old_link
        .process()
        .wait_for_line("cannot reach the coordinator", Duration::from_secs(15))?;
    assert!(retry.contains("host-a"), "{retry}");
    drop(old_link);
    drop(new_link);

    // The refusal is on disk: a restarted coordinator refuses the old certificate too.
    coordinator.stop()?;
    coordinator.serve()?;
    rt.block_on(async {
        let reason = refused_after_handshake(&coordinator, &stale, Duration::from_secs(5)).await?;
        assert!(reason.contains("host-a"), "{reason}");
        anyhow::Ok(())
    })?;
    let list = agent.snapshots_json()?;
    assert_eq!(list.len(), 1, "{list:?}");
    Ok(())
}

#[test]
fn an_agent_issued_before_certificate_records_works_until_it_is_reissued() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("legacy-01")?;
    // What an agent issued by an older coordinator looks like here: no record of its
    // certificate in the data dir.
    let record = coordinator
        .data_dir()
        .join("tls")
        .join("agents")
        .join("legacy-01.toml");
    std::fs::remove_file(&record)?;
    let old = scratch("legacy")?;
    let stale = copy_credentials(agent.conf_dir(), old.path())?;
    agent.snapshots_json()?;

    // Re-issuing it (no --force needed: nothing is recorded) retires the old certificate.
    let out = coordinator.cli(&[
        "issue-agent",
        "legacy-01",
        "--out",
        old.path().join("new").to_str().unwrap(),
    ])?;
    out.ensure_success()?;
    assert!(record.is_file(), "no record written");
    let rt = runtime()?;
    rt.block_on(async {
        let reason = refused_after_handshake(&coordinator, &stale, Duration::from_secs(5)).await?;
        assert!(reason.contains("legacy-01"), "{reason}");
        anyhow::Ok(())
    })?;
    let fresh = Credentials::load(
        &old.path().join("new").join("ca.pem"),
        &old.path().join("new").join("agent.pem"),
        &old.path().join("new").join("agent.key"),
    )?;
    rt.block_on(async {
        hello(&coordinator, &fresh).await?.close().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn reissue_writes_exact_modes_and_replaces_symlinks_without_following_them() -> anyhow::Result<()> {
    let coordinator = Coordinator::init()?;
    let agent = coordinator.agent("host-m")?;
    let conf = agent.conf_dir();
    let outside = scratch("outside")?;
    let decoy_pem = outside.path().join("decoy.pem");
    let decoy_toml = outside.path().join("decoy.toml");
    std::fs::write(&decoy_pem, "not a certificate\n")?;
    std::fs::write(&decoy_toml, "not a config\n")?;
    // A key left readable by everyone, and two files that point elsewhere.
    std::fs::set_permissions(
        conf.join("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    for (file, target) in [("agent.pem", &decoy_pem), ("agent.toml", &decoy_toml)] {
        std::fs::remove_file(conf.join(file))?;
        std::os::unix::fs::symlink(target, conf.join(file))?;
    }

    agent.reissue(&coordinator)?.ensure_success()?;

    for (file, mode) in [
        ("agent.key", 0o600),
        ("agent.toml", 0o600),
        ("agent.pem", 0o644),
        ("ca.pem", 0o644),
    ] {
        let meta = std::fs::symlink_metadata(conf.join(file))?;
        assert!(meta.file_type().is_file(), "{file} is not a regular file");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            mode,
            "{file} has mode {:o}",
            meta.permissions().mode() & 0o7777
        );
    }
    assert_eq!(std::fs::read_to_string(&decoy_pem)?, "not a certificate\n");
    assert_eq!(std::fs::read_to_string(&decoy_toml)?, "not a config\n");
    assert!(std::fs::read_to_string(conf.join("agent.key"))?.contains("PRIVATE KEY"));
    assert!(std::fs::read_to_string(conf.join("agent.pem"))?.contains("CERTIFICATE"));
    let mut names: Vec<String> = std::fs::read_dir(conf)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    names.sort();
    assert_eq!(
        names,
        ["agent.key", "agent.pem", "agent.toml", "ca.pem"],
        "temp files left behind"
    );
    Ok(())
}
