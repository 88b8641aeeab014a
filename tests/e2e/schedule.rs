//! The coordinator runs the fleet: a job on a seconds schedule over three live agents with
//! `keep_last = 3`, one agent stopped (its runs fail with "agent offline"), a coordinator
//! crash and restart in the middle (the schedule goes on), then garbage collection shrinks the
//! store and every kept snapshot restores to its checksum. Only operators may delete.

use std::time::Duration;

use fleetvault_common::protocol::{ErrorCode, Request};
use fleetvault_common::{Client, ClientError, Credentials, SnapshotId};
use fleetvault_tests::data::hash_file;
use fleetvault_tests::report::str_field;
use fleetvault_tests::{wait_until, CommandSource, Coordinator};
use serde_json::Value;

const JOB: &str = r#"
gc_min_age_secs = 0

[[jobs]]
name = "every-2s"
agents = ["chat-*"]
sources = ["dump"]
schedule = "*/2 * * * * *"
[jobs.retention]
keep_last = 3
"#;

fn job_snapshots(c: &Coordinator, agent: &str, status: &str) -> anyhow::Result<Vec<Value>> {
    c.snapshots_json(&["--job", "every-2s", "--agent", agent, "--status", status])
}

#[test]
fn scheduled_job_keeps_three_survives_a_restart_and_gc_frees_the_rest() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let names = ["chat-1", "chat-2", "chat-3"];
    let agents: Vec<_> = names
        .iter()
        .map(|n| coordinator.agent(n))
        .collect::<Result<_, _>>()?;
    let mut links = Vec::new();
    for a in &agents {
        a.add_command_source(&CommandSource {
            name: "dump".into(),
            backup_command: "head -c 1000000 /dev/urandom".into(),
            ..CommandSource::default()
        })?;
        links.push(a.run()?);
    }
    // chat-3 registers, then goes away: its runs must fail, never be skipped.
    let mut gone = links.pop().expect("three links");
    gone.process().stop_with("TERM", Duration::from_secs(30))?;
    wait_until("chat-3 offline", Duration::from_secs(30), || {
        Ok(coordinator
            .agents_json()?
            .iter()
            .any(|a| a["name"] == "chat-3" && a["connected"] == false))
    })?;

    let config = coordinator.data_dir().join("coordinator.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(JOB);
    std::fs::write(&config, &text)?;
    let serve = coordinator.serve_process().expect("serving");
    serve.signal("HUP")?;
    serve.wait_for_line("configuration reloaded", Duration::from_secs(20))?;

    let offline = |c: &Coordinator| -> anyhow::Result<usize> {
        Ok(job_snapshots(c, "chat-3", "failed")?
            .iter()
            .filter(|s| s["reason"] == "agent offline")
            .count())
    };
    wait_until("runs before the restart", Duration::from_secs(60), || {
        Ok(offline(&coordinator)? >= 3)
    })?;
    let seen: Vec<Value> = coordinator.snapshots_json(&["--job", "every-2s"])?;
    let seen: std::collections::HashSet<String> = seen
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    coordinator.restart()?;
    let before = offline(&coordinator)?;
    for n in &names[..2] {
        coordinator.wait_agent_connected(n, Duration::from_secs(60))?;
    }
    // The schedule goes on: new completed runs on both live agents, more than retention keeps.
    wait_until("runs after the restart", Duration::from_secs(90), || {
        let mut ok = offline(&coordinator)? >= before + 3;
        for n in &names[..2] {
            let fresh = job_snapshots(&coordinator, n, "completed")?
                .iter()
                .filter(|s| s["id"].as_str().is_some_and(|id| !seen.contains(id)))
                .count();
            ok &= fresh >= 3;
        }
        Ok(ok)
    })?;

    // Stop the schedule (SIGHUP without the job), let the last run and its retention end.
    std::fs::write(&config, text.replace(JOB, "\ngc_min_age_secs = 0\n"))?;
    let serve = coordinator.serve_process().expect("serving");
    serve.signal("HUP")?;
    serve.wait_for_line("configuration reloaded", Duration::from_secs(20))?;
    wait_until("no backup running", Duration::from_secs(60), || {
        Ok(coordinator
            .snapshots_json(&["--status", "running"])?
            .is_empty())
    })?;
    std::thread::sleep(Duration::from_millis(500));

    let mut kept = Vec::new();
    for n in &names[..2] {
        let list = job_snapshots(&coordinator, n, "completed")?;
        assert_eq!(
            list.len(),
            3,
            "{n}: keep_last = 3 left {}: {list:?}",
            list.len()
        );
        kept.extend(list);
    }
    let all = coordinator.snapshots_json(&["--job", "every-2s"])?;
    assert!(
        all.iter().all(|s| s["agent"] != "chat-3"
            || (s["status"] == "failed" && s["reason"] == "agent offline")),
        "{all:?}"
    );

    let chunks_before = coordinator.chunk_files()?.len();
    let gc = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    let chunks_after = coordinator.chunk_files()?.len();
    assert!(gc["deleted_chunks"].as_u64().unwrap_or(0) > 0, "{gc}");
    assert!(
        chunks_after < chunks_before,
        "store did not shrink: {chunks_before} -> {chunks_after}"
    );

    let work = fleetvault_tests::scratch("schedule")?;
    for s in &kept {
        let id = str_field(s, "id")?;
        let agent = &agents[names
            .iter()
            .position(|n| *n == s["agent"])
            .expect("known agent")];
        let out = work.path().join(format!("{id}.bin"));
        agent.restore_to_stdout(id, &out)?.ensure_success()?;
        assert_eq!(
            hash_file(&out)?,
            str_field(s, "checksum")?,
            "snapshot {id} differs"
        );
    }

    // An agent's certificate may not delete (or protect, forget, collect garbage).
    let dir = agents[0].conf_dir();
    let creds = Credentials::load(
        &dir.join("ca.pem"),
        &dir.join("agent.pem"),
        &dir.join("agent.key"),
    )?;
    let id: SnapshotId = str_field(&kept[0], "id")?.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
        let client = Client::connect(&creds, addr, "localhost", "test").await?;
        for req in [
            Request::Delete { snapshot: id },
            Request::Gc,
            Request::Protect {
                snapshot: id,
                protected: true,
            },
        ] {
            match client.call(&req).await {
                Err(ClientError::Remote {
                    code: ErrorCode::Forbidden,
                    ..
                }) => {}
                other => anyhow::bail!("{req:?} by an agent: {other:?}"),
            }
        }
        client.close().await;
        anyhow::Ok(())
    })?;
    // An operator may, and the snapshot is gone.
    coordinator
        .cli(&["delete", &id.to_string()])?
        .ensure_success()?;
    let after = coordinator.snapshots_json(&[])?;
    assert!(after.iter().all(|s| s["id"] != id.to_string().as_str()));
    Ok(())
}

#[test]
fn backups_beyond_the_concurrency_limit_wait_as_pending() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    let config = coordinator.data_dir().join("coordinator.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(
        "max_concurrent_backups = 1\n\n[[jobs]]\nname = \"manual\"\nagents = [\"host-*\"]\nschedule = \"0 0 1 1 *\"\n",
    );
    std::fs::write(&config, text)?;
    coordinator.serve()?;
    let mut links = Vec::new();
    let mut agents = Vec::new();
    for n in ["host-1", "host-2", "host-3"] {
        let a = coordinator.agent(n)?;
        a.add_command_source(&CommandSource {
            name: "slow".into(),
            backup_command: "sleep 1; head -c 100000 /dev/urandom".into(),
            ..CommandSource::default()
        })?;
        links.push(a.run()?);
        agents.push(a);
    }
    let data_dir = coordinator.data_dir().to_path_buf();
    let run = std::thread::spawn(move || {
        fleetvault_tests::run(
            std::process::Command::new(fleetvault_tests::bin("fleetvault-coordinator")?)
                .args(["run", "manual", "--json", "--data-dir"])
                .arg(&data_dir),
            fleetvault_tests::COMMAND_TIMEOUT,
        )
    });
    wait_until("a pending run", Duration::from_secs(30), || {
        Ok(!coordinator
            .snapshots_json(&["--status", "pending"])?
            .is_empty())
    })?;
    let out = run.join().expect("run thread")?.ensure_success()?;
    let reports = out.json()?;
    assert_eq!(reports.as_array().map(Vec::len), Some(3), "{reports}");
    assert!(coordinator
        .snapshots_json(&["--status", "pending"])?
        .is_empty());
    assert_eq!(
        coordinator
            .snapshots_json(&["--job", "manual", "--status", "completed"])?
            .len(),
        3
    );
    Ok(())
}

#[test]
fn a_broken_config_on_reload_is_reported_and_the_previous_one_stays() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let config = coordinator.data_dir().join("coordinator.toml");
    let good = std::fs::read_to_string(&config)?;
    let serve = coordinator.serve_process().expect("serving");
    for (broken, want) in [
        (
            format!("{good}\n[[jobs]]\nname = \"x\"\nagents = [\"a\"]\nschedule = \"every day\"\n"),
            "key `schedule`",
        ),
        (
            format!("{good}\n[[jobs]]\nname = \"x\"\nagentz = [\"a\"]\n"),
            "line",
        ),
    ] {
        std::fs::write(&config, broken)?;
        serve.signal("HUP")?;
        let line = serve.wait_for_line("configuration not reloaded", Duration::from_secs(20))?;
        assert!(line.contains("coordinator.toml"), "{line}");
        assert!(line.contains(want), "{want:?} not in {line}");
        coordinator.snapshots_json(&[])?;
    }
    Ok(())
}
