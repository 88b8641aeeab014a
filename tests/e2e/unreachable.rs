//! A coordinator that is down or dies: commands fail within seconds with one line naming the
//! address, not after the QUIC idle timeout.

use std::time::{Duration, Instant};

use fleetvault_tests::report::str_field;
use fleetvault_tests::Output;
use fleetvault_tests::{CommandSource, Coordinator};

/// Well above the 5 s connect timeout and the 6 s idle timeout, well below the old 30 s.
const PROMPT: Duration = Duration::from_secs(10);

/// The `address` agent.toml names (what the operator configured).
fn configured_address(agent: &fleetvault_tests::Agent) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(agent.config())?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("address")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no address in agent.toml:\n{text}"))
}

/// Fails unless `out` failed with exactly one line on stderr, `error: no answer from ADDRESS
/// (UDP) in 5 s: …`, naming the coordinator and the port.
fn assert_no_answer(out: Output, address: &str) -> anyhow::Result<()> {
    let stderr = out.ensure_failure()?;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected on stderr:\n{stderr}");
    let expected = format!("error: no answer from {address} (UDP) in 5 s");
    assert!(lines[0].starts_with(&expected), "{}", lines[0]);
    assert!(
        lines[0].contains("coordinator running") && lines[0].contains("port open"),
        "{}",
        lines[0]
    );
    Ok(())
}

#[test]
fn agent_and_operator_commands_give_up_on_a_stopped_coordinator_within_seconds(
) -> anyhow::Result<()> {
    // Initialised, issued, never served: nothing listens on its UDP port.
    let coordinator = Coordinator::init()?;
    let agent = coordinator.agent("lonely-01")?;
    let address = configured_address(&agent)?;
    assert!(
        address.ends_with(&format!(":{}", coordinator.port())),
        "{address}"
    );

    let started = Instant::now();
    let out = agent.cli("snapshots", &[])?;
    let took = started.elapsed();
    assert_no_answer(out, &address)?;
    assert!(took < PROMPT, "the agent took {took:?} to give up");

    let started = Instant::now();
    let out = coordinator.cli(&["snapshots"])?;
    let took = started.elapsed();
    assert_no_answer(out, &format!("127.0.0.1:{}", coordinator.port()))?;
    assert!(
        took < PROMPT,
        "the operator command took {took:?} to give up"
    );
    Ok(())
}

#[test]
fn agent_backup_fails_within_seconds_when_the_coordinator_dies_mid_backup() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    // Some data, then a long silence: the agent is waiting on its source, not on the network,
    // when the coordinator dies.
    agent.add_command_source(&CommandSource {
        name: "slow".into(),
        backup_command: "head -c 1000000 /dev/urandom; sleep 120".into(),
        ..CommandSource::default()
    })?;
    let (mut backup, _stdout) = agent.spawn_backup("slow")?;
    let running = coordinator.wait_snapshot(Duration::from_secs(60), |s| {
        s["source"] == "slow" && s["status"] == "running"
    })?;
    str_field(&running, "id")?;

    coordinator.kill9()?;
    let killed = Instant::now();
    let status = backup.wait_timeout(Duration::from_secs(90))?;
    let took = killed.elapsed();
    let status =
        status.ok_or_else(|| anyhow::anyhow!("backup still running 90 s after the kill"))?;
    assert!(
        !status.success(),
        "backup succeeded without its coordinator"
    );
    assert!(took < PROMPT, "the agent took {took:?} to notice");
    let error = backup.wait_for_line("error: ", Duration::from_secs(10))?;
    assert!(
        error.contains("connection to coordinator lost"),
        "the error should name the lost connection: {error}"
    );
    Ok(())
}

#[test]
fn an_idle_run_link_outlives_the_idle_timeout_and_a_restart() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-02")?;
    agent.add_command_source(&CommandSource {
        name: "notes".into(),
        backup_command: "echo notes".into(),
        ..CommandSource::default()
    })?;
    let mut link = agent.run()?;
    // Nothing to do for more than twice the 6 s idle timeout: only keep-alives flow.
    std::thread::sleep(Duration::from_secs(15));
    let report = coordinator.push_backup("chat-02", "notes")?;
    assert_eq!(report["status"], "completed", "{report}");
    let log = link.process().log_text();
    assert!(
        !log.contains("link to coordinator lost"),
        "the idle link was dropped:\n{log}"
    );

    // A crash and restart: the link comes back by itself.
    coordinator.restart()?;
    coordinator.wait_agent_connected("chat-02", Duration::from_secs(60))?;
    let report = coordinator.push_backup("chat-02", "notes")?;
    assert_eq!(report["status"], "completed", "{report}");
    Ok(())
}
