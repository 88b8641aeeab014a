//! `coordinator.toml` is checked, every key of it, when `serve` starts (exit code 2 and one
//! line naming file, line and key) and on SIGHUP (one error line; the previous configuration
//! stays in force, all of it); a valid reload applies the schedules and
//! `max_concurrent_backups`, and names the keys that need a restart.

use std::time::Duration;

use fleetvault_tests::data::{write_random_file, MIB};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{scratch, shell_quote, wait_until, CommandSource, Coordinator};

#[test]
fn every_invalid_key_is_refused_at_start_with_exit_code_2() -> anyhow::Result<()> {
    let job = "[[jobs]]\nname = \"nightly\"\nagents = [\"*\"]\n";
    // (appended to the config `init` wrote, the key to blame, its line counted from the end)
    let cases: Vec<(String, &str)> = vec![
        (
            "verify_schedule = \"every sunday\"\n".into(),
            "verify_schedule",
        ),
        ("gc_schedule = \"0 2 * *\"\n".into(), "gc_schedule"),
        (
            "max_concurrent_backups = 0\n".into(),
            "max_concurrent_backups",
        ),
        ("gc_min_age_secs = 999999999999\n".into(), "gc_min_age_secs"),
        ("job_timeout_secs = 0\n".into(), "job_timeout_secs"),
        ("advertise = \"backup.example.com\"\n".into(), "advertise"),
        (format!("\n{job}schedule = \"every day\"\n"), "schedule"),
    ];
    for (extra, key) in cases {
        let coordinator = Coordinator::init()?;
        coordinator.append_config(&extra)?;
        let text = std::fs::read_to_string(coordinator.config_path())?;
        let line = text.lines().count();
        let out = coordinator.cli(&["serve"])?;
        assert_eq!(out.status.code(), Some(2), "{key}: {out}");
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(errors.len(), 1, "{key}: one line expected: {out}");
        let e = errors[0];
        assert!(e.starts_with("error: invalid config "), "{e}");
        assert!(e.contains("coordinator.toml: "), "{e}");
        assert!(e.contains(&format!("line {line}: ")), "line {line}: {e}");
        assert!(e.contains(&format!("key `{key}`")), "{key}: {e}");
    }
    Ok(())
}

#[test]
fn an_invalid_config_on_sighup_keeps_the_previous_one_in_force() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config("verify_schedule = \"*/2 * * * * *\"\n")?;
    coordinator.serve()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("reload")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, 2 * MIB, 3)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let _link = agent.run()?;
    coordinator.wait_agent_connected("db-01", Duration::from_secs(30))?;

    // A new job every second, and a verify_schedule that is not a schedule: none of it applies.
    let good = std::fs::read_to_string(coordinator.config_path())?;
    let broken = good.replace("\"*/2 * * * * *\"", "\"every sunday\"")
        + "\n[[jobs]]\nname = \"new\"\nagents = [\"*\"]\nschedule = \"* * * * * *\"\n";
    let at = 1 + broken
        .lines()
        .position(|l| l.contains("every sunday"))
        .expect("the broken line");
    std::fs::write(coordinator.config_path(), broken)?;
    let serve = coordinator.serve_process().expect("serving");
    serve.signal("HUP")?;
    let line = serve.wait_for_line("configuration not reloaded", Duration::from_secs(20))?;
    assert!(line.contains("coordinator.toml"), "{line}");
    assert!(
        line.contains(&format!("line {at}: key `verify_schedule`")),
        "{line}"
    );

    // The old verify_schedule still fires: a damaged chunk gets its snapshot tagged.
    let id = snapshot_id(&coordinator.push_backup("db-01", "dump")?)?;
    coordinator.damage_largest_chunk()?;
    coordinator.wait_snapshot(Duration::from_secs(60), |s| {
        s["id"] == id.as_str()
            && s["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "damaged"))
    })?;
    // The job of the refused file never ran.
    assert!(coordinator.snapshots_json(&["--job", "new"])?.is_empty());
    Ok(())
}

#[test]
fn a_reload_lowering_max_concurrent_backups_makes_the_next_backups_wait() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config(
        "\n[[jobs]]\nname = \"manual\"\nagents = [\"host-*\"]\nschedule = \"0 0 1 1 *\"\n",
    )?;
    coordinator.serve()?;
    let mut links = Vec::new();
    let mut agents = Vec::new();
    for n in ["host-1", "host-2"] {
        let a = coordinator.agent(n)?;
        a.add_command_source(&CommandSource {
            name: "slow".into(),
            backup_command: "sleep 3; head -c 100000 /dev/urandom".into(),
            ..CommandSource::default()
        })?;
        links.push(a.run()?);
        coordinator.wait_agent_connected(n, Duration::from_secs(30))?;
        agents.push(a);
    }
    // From the default 4 slots to 1, by SIGHUP.
    let text = std::fs::read_to_string(coordinator.config_path())?;
    std::fs::write(
        coordinator.config_path(),
        format!("max_concurrent_backups = 1\n{text}"),
    )?;
    let serve = coordinator.serve_process().expect("serving");
    serve.signal("HUP")?;
    let line = serve.wait_for_line("configuration reloaded", Duration::from_secs(20))?;
    assert!(line.contains("max_concurrent_backups=1"), "{line}");

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
    let reports = run.join().expect("run thread")?.ensure_success()?.json()?;
    assert_eq!(reports.as_array().map(Vec::len), Some(2), "{reports}");
    assert_eq!(
        coordinator
            .snapshots_json(&["--job", "manual", "--status", "completed"])?
            .len(),
        2
    );

    // `listen` only changes with a restart, and the reload says so.
    let text = std::fs::read_to_string(coordinator.config_path())?;
    let port = coordinator.port();
    std::fs::write(
        coordinator.config_path(),
        text.replace(
            &format!(":{port}\""),
            &format!(":{}\"", port.wrapping_add(1)),
        ),
    )?;
    serve.signal("HUP")?;
    let line = serve.wait_for_line("configuration reloaded", Duration::from_secs(20))?;
    assert!(
        line.contains("listen changed: takes effect after a restart"),
        "{line}"
    );
    Ok(())
}
