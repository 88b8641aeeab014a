//! Trust: certificates from another fleet CA are refused at the handshake, in both directions,
//! and an agent cannot restore another agent's snapshot by itself.

use std::path::Path;

use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{bin, run, scratch, CommandSource, Coordinator, COMMAND_TIMEOUT};

/// Writes an agent.toml into `dir` naming the given files (relative to `dir`).
fn write_agent_toml(dir: &Path, port: u16, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[coordinator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
             ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        ),
    )?;
    Ok(())
}

fn agent_snapshots(config: &Path) -> anyhow::Result<fleetvault_tests::Output> {
    run(
        std::process::Command::new(bin("fleetvault-agent")?)
            .arg("snapshots")
            .arg("--config")
            .arg(config),
        COMMAND_TIMEOUT,
    )
}

#[test]
fn agent_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let fleet = Coordinator::start()?;
    let other = Coordinator::init()?;
    let intruder = other.agent("intruder")?;

    // Trusts the fleet's CA (so the agent accepts the server), but proves itself with a
    // certificate of the other CA.
    let work = scratch("intruder")?;
    std::fs::copy(fleet.ca_pem(), work.path().join("fleet-ca.pem"))?;
    std::fs::copy(
        intruder.conf_dir().join("agent.pem"),
        work.path().join("agent.pem"),
    )?;
    std::fs::copy(
        intruder.conf_dir().join("agent.key"),
        work.path().join("agent.key"),
    )?;
    write_agent_toml(
        work.path(),
        fleet.port(),
        "fleet-ca.pem",
        "agent.pem",
        "agent.key",
    )?;

    let stderr = agent_snapshots(&work.path().join("agent.toml"))?.ensure_failure()?;
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the refusal should say it is about the certificate: {stderr}"
    );
    let agents = fleet.agents_json()?;
    assert!(
        agents.iter().all(|a| a["name"] != "intruder"),
        "refused agent was registered: {agents:?}"
    );

    // The fleet's own agents are still served.
    let member = fleet.agent("member")?;
    member.snapshots_json()?;
    Ok(())
}

#[test]
fn coordinator_certificate_from_another_ca_is_refused_by_the_agent() -> anyhow::Result<()> {
    let fleet = Coordinator::start()?;
    let other = Coordinator::init()?;
    let member = fleet.agent("member")?;

    // A genuine fleet certificate, but the agent pins another CA: the server must not pass.
    let work = scratch("pinned")?;
    std::fs::copy(other.ca_pem(), work.path().join("other-ca.pem"))?;
    std::fs::copy(
        member.conf_dir().join("agent.pem"),
        work.path().join("agent.pem"),
    )?;
    std::fs::copy(
        member.conf_dir().join("agent.key"),
        work.path().join("agent.key"),
    )?;
    write_agent_toml(
        work.path(),
        fleet.port(),
        "other-ca.pem",
        "agent.pem",
        "agent.key",
    )?;

    let stderr = agent_snapshots(&work.path().join("agent.toml"))?.ensure_failure()?;
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the refusal should say it is about the certificate: {stderr}"
    );
    Ok(())
}

#[test]
fn agent_cannot_restore_another_agents_snapshot_by_itself() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let owner = coordinator.agent("chat-01")?;
    let other = coordinator.agent("chat-02")?;
    owner.add_command_source(&CommandSource {
        name: "config".into(),
        backup_command: "echo secret-config".into(),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&owner.backup_json("config")?)?;

    let listed = other.snapshots_json()?;
    assert!(
        listed.iter().all(|s| s["id"] != id.as_str()),
        "chat-02 sees chat-01's snapshot: {listed:?}"
    );
    let work = scratch("stolen")?;
    let out = work.path().join("stolen.txt");
    other.restore(&id, Some(&out))?.ensure_failure()?;
    let leaked = std::fs::read(&out).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&leaked).contains("secret-config"),
        "chat-02 restored chat-01's data"
    );
    Ok(())
}
