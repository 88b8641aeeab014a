//! The operator's command line as a new user meets it: the human tables show every column
//! (status and reason of a failed backup), `--json` prints one document also on failure,
//! `download` writes private files or stdout, snapshots are named by prefix or `latest`,
//! `snapshot show`, exit codes, the agent's default config, completions and man pages, and
//! `issue-agent` after a wildcard `init` writes an address other hosts can reach.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{bin, run, scratch, CommandSource, Coordinator, COMMAND_TIMEOUT};
use serde_json::Value;

/// A source whose backup always fails after writing a little.
fn failing_source() -> CommandSource {
    CommandSource {
        name: "broken".into(),
        backup_command: "echo partial; echo 'pg_dump: connection refused' >&2; exit 3".into(),
        ..CommandSource::default()
    }
}

fn good_source() -> CommandSource {
    CommandSource {
        name: "dump".into(),
        backup_command: "head -c 300000 /dev/urandom".into(),
        restore_command: Some("cat > /dev/null".into()),
        ..CommandSource::default()
    }
}

/// The exit code of a finished command.
fn code(out: &fleetvault_tests::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// The one JSON document on stdout (fails when there is none, or more than one).
fn one_document(out: &fleetvault_tests::Output) -> anyhow::Result<Value> {
    let mut docs = serde_json::Deserializer::from_str(&out.stdout).into_iter::<Value>();
    let first = docs
        .next()
        .ok_or_else(|| anyhow::anyhow!("no JSON document on stdout: {out}"))??;
    anyhow::ensure!(docs.next().is_none(), "more than one JSON document: {out}");
    Ok(first)
}

fn is_rfc3339_utc(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    s.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
}

#[test]
fn the_snapshots_table_shows_status_and_reason_of_a_failed_backup() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&failing_source())?;
    agent.add_command_source(&good_source())?;
    agent.backup_json("dump")?;
    let failed = agent.backup("broken")?;
    assert_eq!(code(&failed), 1, "{failed}");

    for (who, out) in [
        (
            "coordinator",
            coordinator.cli(&["snapshots"])?.ensure_success()?,
        ),
        ("agent", agent.cli("snapshots", &[])?.ensure_success()?),
    ] {
        let lines: Vec<&str> = out.stdout.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        for column in ["ID", "STATUS", "REASON", "JOB", "DEDUP", "COMPRESSION"] {
            assert!(
                header.contains(&column),
                "{who}: no {column} column: {}",
                lines[0]
            );
        }
        let status_at = lines[0].find("STATUS").expect("STATUS column");
        let reason_at = lines[0].find("REASON").expect("REASON column");
        let row = lines
            .iter()
            .find(|l| l.contains("broken"))
            .unwrap_or_else(|| panic!("{who}: no row of the failed backup:\n{}", out.stdout));
        assert_eq!(
            row.get(status_at..status_at + 6),
            Some("failed"),
            "{who}: STATUS column of the failed row:\n{}",
            out.stdout
        );
        let reason = row.get(reason_at..).unwrap_or_default();
        assert!(
            reason.contains("exit") || reason.contains("status 3"),
            "{who}: REASON column does not say why: {reason:?}\n{}",
            out.stdout
        );
        let ok = lines
            .iter()
            .find(|l| l.contains(" dump "))
            .expect("completed row");
        assert_eq!(
            ok.get(status_at..status_at + 9),
            Some("completed"),
            "{}",
            out.stdout
        );
    }

    // The agents table: every header has its column, the last backup names the failure.
    let out = coordinator.cli(&["agents"])?.ensure_success()?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    for column in [
        "NAME",
        "STATE",
        "LAST SEEN (UTC)",
        "VERSION",
        "LAST BACKUP",
        "SOURCES",
    ] {
        assert!(
            lines[0].contains(column),
            "agents: no {column} column: {}",
            out.stdout
        );
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("chat-01"))
        .expect("agent row");
    let state_at = lines[0].find("STATE").expect("STATE");
    assert_eq!(
        row.get(state_at..state_at + 7),
        Some("offline"),
        "{}",
        out.stdout
    );
    let last_at = lines[0].find("LAST BACKUP").expect("LAST BACKUP");
    assert!(
        row.get(last_at..)
            .is_some_and(|l| l.contains("broken failed")),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn json_is_one_document_also_on_failure_with_the_failed_record() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&failing_source())?;
    agent.add_command_source(&good_source())?;

    // An unknown source: nothing was recorded, a usage error.
    let out = agent.backup("no-such-source")?;
    assert_eq!(code(&out), 2, "{out}");
    let doc = one_document(&out)?;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-source")),
        "{doc}"
    );
    assert!(doc["snapshot_id"].is_null(), "{doc}");

    // A failing backup: the failed record's id.
    let out = agent.backup("broken")?;
    assert_eq!(code(&out), 1, "{out}");
    let doc = one_document(&out)?;
    assert_eq!(doc["status"], "failed", "{doc}");
    let id = doc["snapshot_id"]
        .as_str()
        .expect("the failed record's id")
        .to_owned();
    let listed = coordinator.snapshots_json(&["--status", "failed"])?;
    assert!(
        listed.iter().any(|s| s["id"] == id.as_str()),
        "{id} not among {listed:?}"
    );
    assert!(
        out.stderr.lines().any(|l| l.starts_with("error: ")),
        "{out}"
    );

    // The same pushed through the coordinator to a running agent.
    let _link = agent.run()?;
    let out = coordinator.cli(&[
        "backup", "--agent", "chat-01", "--source", "broken", "--json",
    ])?;
    assert_eq!(code(&out), 1, "{out}");
    let doc = one_document(&out)?;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(
        doc["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{doc}"
    );
    let pushed = doc["snapshot_id"].as_str().unwrap_or_default();
    assert_eq!(pushed.len(), 16, "no failed record id in {doc}");

    // A failing restore (a snapshot that does not exist) on both command lines.
    let out = coordinator.cli(&[
        "restore",
        "0123456789abcdef",
        "--agent",
        "chat-01",
        "--json",
    ])?;
    assert_ne!(code(&out), 0, "{out}");
    let doc = one_document(&out)?;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(doc["error"].is_string(), "{doc}");
    let out = agent.restore(
        "0123456789abcdef",
        Some(std::path::Path::new("/tmp/nowhere")),
    )?;
    assert_ne!(code(&out), 0, "{out}");
    assert_eq!(one_document(&out)?["status"], "failed", "{out}");

    // An unknown filter value is a usage error, not an empty list; with --json, a document.
    let out = coordinator.cli(&["snapshots", "--status", "bogus"])?;
    assert_eq!(code(&out), 2, "{out}");
    assert!(
        out.stdout.is_empty() && out.stderr.contains("bogus"),
        "{out}"
    );
    let out = coordinator.cli(&["snapshots", "--status", "bogus", "--json"])?;
    assert_eq!(code(&out), 2, "{out}");
    let doc = one_document(&out)?;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(
        doc["error"].as_str().is_some_and(|e| e.contains("bogus")),
        "{doc}"
    );

    // Times in JSON carry their zone.
    let ok = agent.backup_json("dump")?;
    let rec = coordinator
        .snapshots_json(&["--source", "dump"])?
        .into_iter()
        .find(|s| s["id"] == ok["snapshot_id"])
        .expect("listed");
    assert!(is_rfc3339_utc(&rec["started"]), "{}", rec["started"]);
    assert!(is_rfc3339_utc(&rec["ended"]), "{}", rec["ended"]);
    let agents = coordinator.agents_json()?;
    assert!(is_rfc3339_utc(&agents[0]["last_seen"]), "{agents:?}");
    Ok(())
}

#[test]
fn snapshots_by_prefix_latest_and_show() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&good_source())?;
    let first = snapshot_id(&agent.backup_json("dump")?)?;
    let second = snapshot_id(&agent.backup_json("dump")?)?;

    // A prefix names one snapshot on both command lines. Ids are allocated in time order, so
    // the shortest unique prefix reaches the first digit where the two differ.
    let common = first
        .bytes()
        .zip(second.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let unique = (common + 1).max(4);
    let prefix = &second[..unique];
    let out = coordinator.cli(&["snapshot", "show", &second[..common.max(4)]])?;
    if common >= 4 {
        assert_eq!(code(&out), 2, "an ambiguous prefix is a usage error: {out}");
        assert!(
            out.stderr.contains(&first) && out.stderr.contains(&second),
            "candidates listed: {out}"
        );
    }
    let shown = coordinator
        .cli(&["snapshot", "show", prefix, "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(shown["id"], second.as_str(), "{shown}");
    let text = coordinator
        .cli(&["snapshot", "show", prefix])?
        .ensure_success()?
        .stdout;
    for field in [
        "agent",
        "source",
        "kind",
        "status",
        "started",
        "duration",
        "chunks",
        "compression",
        "dedup",
        "checksum",
        "parent",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(field)),
            "show lacks {field}:\n{text}"
        );
    }
    assert!(
        text.contains(&second) && text.contains("chat-01") && text.contains("completed"),
        "{text}"
    );
    assert!(
        text.contains(&format!("parent       {first}")) || text.contains(&first),
        "the parent is the first backup:\n{text}"
    );
    let agent_view = run(
        Command::new(bin("fleetvault-agent")?)
            .args(["snapshot", "show", &first[..unique], "--json", "--config"])
            .arg(agent.config()),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?
    .json()?;
    assert_eq!(agent_view["id"], first.as_str(), "{agent_view}");

    // `latest` is the newest completed snapshot of the source.
    let latest = coordinator
        .cli(&[
            "snapshot", "show", "latest", "--agent", "chat-01", "--source", "dump", "--json",
        ])?
        .ensure_success()?
        .json()?;
    assert_eq!(latest["id"], second.as_str(), "{latest}");
    let work = scratch("latest")?;
    let out = work.path().join("latest.bin");
    agent
        .cli(
            "restore",
            &[
                "latest",
                "--source",
                "dump",
                "--target",
                out.to_str().expect("utf-8"),
            ],
        )?
        .ensure_success()?;
    assert!(out.metadata()?.len() == 300_000, "restored size");

    // Errors: `latest` without a source, an unknown prefix, a non-id.
    let out = coordinator.cli(&["snapshot", "show", "latest"])?;
    assert_eq!(code(&out), 2, "{out}");
    assert!(out.stderr.contains("--source"), "{out}");
    let unknown = if first.starts_with("ffff") || second.starts_with("ffff") {
        "eeee"
    } else {
        "ffff"
    };
    let out = coordinator.cli(&["protect", unknown])?;
    assert_eq!(code(&out), 1, "{out}");
    assert!(
        out.stderr
            .contains(&format!("no snapshot id starts with {unknown}")),
        "{out}"
    );
    let out = coordinator.cli(&["delete", "xyz"])?;
    assert_eq!(code(&out), 2, "{out}");
    // A prefix works for protect.
    coordinator
        .cli(&["protect", &first[..unique]])?
        .ensure_success()?;
    let rec = coordinator
        .cli(&["snapshot", "show", &first, "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(rec["protected"], true, "{rec}");
    Ok(())
}

#[test]
fn download_streams_to_stdout_and_writes_private_files_without_overwriting() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    let work = scratch("download")?;
    let data = work.path().join("secret.env");
    std::fs::write(&data, "DB_PASSWORD=hunter2\n".repeat(1000))?;
    agent.add_command_source(&CommandSource {
        name: "env".into(),
        backup_command: format!("cat {}", data.display()),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("env")?)?;

    // --out - is stdout, not a file named "-".
    let out = run(
        Command::new(bin("fleetvault-coordinator")?)
            .current_dir(work.path())
            .args(["download", &id, "--out", "-", "--data-dir"])
            .arg(coordinator.data_dir()),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    assert_eq!(
        out.stdout.as_bytes(),
        std::fs::read(&data)?,
        "stdout is the snapshot"
    );
    assert!(
        !work.path().join("-").exists(),
        "a file named - was created"
    );

    // A file: 0600 whatever the umask, never overwritten without --force.
    let file = work.path().join("out.env");
    let path = file.to_str().expect("utf-8");
    run(
        Command::new("sh")
            .arg("-c")
            .arg("umask 022; exec \"$@\"")
            .arg("sh")
            .arg(bin("fleetvault-coordinator")?)
            .args(["download", &id[..6], "--out", path, "--data-dir"])
            .arg(coordinator.data_dir()),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "downloaded file mode {mode:o}");
    std::fs::write(&file, "mine")?;
    let again = coordinator.cli(&["download", &id, "--out", path])?;
    assert_eq!(code(&again), 2, "{again}");
    assert!(
        again.stderr.contains("already exists") && again.stderr.contains("--force"),
        "{again}"
    );
    assert_eq!(
        std::fs::read_to_string(&file)?,
        "mine",
        "the existing file was touched"
    );
    coordinator
        .cli(&["download", &id, "--out", path, "--force"])?
        .ensure_success()?;
    assert_eq!(std::fs::read(&file)?, std::fs::read(&data)?);
    Ok(())
}

#[test]
fn exit_codes_tell_usage_warnings_unreachable_and_refused_apart() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&good_source())?;
    let id = snapshot_id(&agent.backup_json("dump")?)?;

    // 2: a broken config, an unknown flag.
    let work = scratch("exit-codes")?;
    let broken = work.path().join("agent.toml");
    std::fs::write(&broken, "[coordinator]\naddress = 12\n")?;
    let out = run(
        Command::new(bin("fleetvault-agent")?)
            .args(["snapshots", "--config"])
            .arg(&broken),
        COMMAND_TIMEOUT,
    )?;
    assert_eq!(code(&out), 2, "{out}");
    let out = coordinator.cli(&["snapshots", "--no-such-flag"])?;
    assert_eq!(code(&out), 2, "{out}");

    // 3: verify found damage.
    coordinator.damage_largest_chunk()?;
    let out = coordinator.cli(&["verify", "--snapshot", &id])?;
    assert_eq!(code(&out), 3, "{out}");

    // 11: a certificate the coordinator no longer accepts.
    let old = work.path().join("old-conf");
    copy_dir(agent.conf_dir(), &old)?;
    agent.reissue(&coordinator)?.ensure_success()?;
    let out = run(
        Command::new(bin("fleetvault-agent")?)
            .args(["snapshots", "--config"])
            .arg(old.join("agent.toml")),
        COMMAND_TIMEOUT,
    )?;
    assert_eq!(code(&out), 11, "{out}");

    // 10: the coordinator is down.
    coordinator.stop()?;
    let out = agent.cli("snapshots", &[])?;
    assert_eq!(code(&out), 10, "{out}");
    let out = coordinator.cli(&["agents"])?;
    assert_eq!(code(&out), 10, "{out}");
    Ok(())
}

/// `issue-agent NAME --out OUT --data-dir DIR`; must succeed.
fn issue_agent(dir: &std::path::Path, name: &str, out: &std::path::Path) -> anyhow::Result<()> {
    run(
        Command::new(bin("fleetvault-coordinator")?)
            .args(["issue-agent", name, "--out"])
            .arg(out)
            .arg("--data-dir")
            .arg(dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn the_agent_finds_its_config_without_the_flag() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    agent.add_command_source(&good_source())?;
    let out = run(
        Command::new(bin("fleetvault-agent")?)
            .args(["backup", "--source", "dump", "--json"])
            .env("FLEETVAULT_CONFIG", agent.config()),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    assert_eq!(out.json()?["status"], "completed", "{out}");
    // Without either, the error names the default path.
    let out = run(
        Command::new(bin("fleetvault-agent")?)
            .args(["snapshots"])
            .env_remove("FLEETVAULT_CONFIG"),
        COMMAND_TIMEOUT,
    )?;
    if !std::path::Path::new("/etc/fleetvault/agent.toml").exists() {
        assert_eq!(code(&out), 2, "{out}");
        assert!(out.stderr.contains("/etc/fleetvault/agent.toml"), "{out}");
    }
    Ok(())
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() -> anyhow::Result<()> {
    let work = scratch("completions")?;
    for binary in ["fleetvault-agent", "fleetvault-coordinator"] {
        let bash = run(
            Command::new(bin(binary)?).args(["completions", "bash"]),
            COMMAND_TIMEOUT,
        )?
        .ensure_success()?;
        let script = work.path().join(format!("{binary}.bash"));
        std::fs::write(&script, &bash.stdout)?;
        run(Command::new("bash").arg("-n").arg(&script), COMMAND_TIMEOUT)?.ensure_success()?;
        assert!(
            bash.stdout.contains("snapshots") && bash.stdout.contains("restore"),
            "{binary}"
        );
        // Loaded into bash, it completes the subcommands.
        let probe = format!(
            "source {script}; COMP_WORDS=({binary} snap); COMP_CWORD=1; _{fn_name} {binary} snap {binary}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script = script.display(),
            fn_name = binary.replace('-', "__"),
        );
        let done =
            run(Command::new("bash").arg("-c").arg(&probe), COMMAND_TIMEOUT)?.ensure_success()?;
        assert!(
            done.stdout.lines().any(|l| l == "snapshots"),
            "bash completion of `snap`: {done}"
        );
        for shell in ["zsh", "fish", "elvish"] {
            let out = run(
                Command::new(bin(binary)?).args(["completions", shell]),
                COMMAND_TIMEOUT,
            )?
            .ensure_success()?;
            assert!(out.stdout.contains("snapshots"), "{binary} {shell}");
        }
        let man = work.path().join(format!("man-{binary}"));
        run(
            Command::new(bin(binary)?).args(["man", "--out"]).arg(&man),
            COMMAND_TIMEOUT,
        )?
        .ensure_success()?;
        let top = std::fs::read_to_string(man.join(format!("{binary}.1")))?;
        assert!(
            top.contains(".TH") && top.contains("snapshots"),
            "{binary}.1"
        );
        let sub = std::fs::read_to_string(man.join(format!("{binary}-restore.1")))?;
        assert!(
            sub.contains(".TH") && sub.contains("\\-\\-json"),
            "{binary}-restore.1:\n{sub}"
        );
    }
    Ok(())
}

#[test]
fn issue_agent_after_a_wildcard_init_writes_an_address_other_hosts_can_reach() -> anyhow::Result<()>
{
    let work = scratch("advertise")?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let port = socket.local_addr()?.port();
    drop(socket);
    let coordinator = bin("fleetvault-coordinator")?;

    // Wildcard listen, no advertise: the server name and the listen port.
    let dir = work.path().join("wild");
    run(
        Command::new(&coordinator)
            .args([
                "init",
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--server-name",
                "backup.example.com",
                "--data-dir",
            ])
            .arg(&dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let out = work.path().join("db-01");
    let issued = run(
        Command::new(&coordinator)
            .args(["issue-agent", "db-01", "--json", "--out"])
            .arg(&out)
            .arg("--data-dir")
            .arg(&dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?
    .json()?;
    let text = std::fs::read_to_string(out.join("agent.toml"))?;
    let want = format!("address = \"backup.example.com:{port}\"");
    assert!(text.contains(&want), "agent.toml has no {want}:\n{text}");
    assert_eq!(
        issued["address"],
        format!("backup.example.com:{port}"),
        "{issued}"
    );

    // --advertise is stored in coordinator.toml and used.
    let dir = work.path().join("adv");
    run(
        Command::new(&coordinator)
            .args([
                "init",
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--server-name",
                "backup.example.com",
                "--advertise",
                "10.0.0.5:7443",
                "--data-dir",
            ])
            .arg(&dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let config = std::fs::read_to_string(dir.join("coordinator.toml"))?;
    assert!(config.contains("advertise = \"10.0.0.5:7443\""), "{config}");
    let out = work.path().join("db-02");
    issue_agent(&dir, "db-02", &out)?;
    let text = std::fs::read_to_string(out.join("agent.toml"))?;
    assert!(text.contains("address = \"10.0.0.5:7443\""), "{text}");
    let bad = run(
        Command::new(&coordinator)
            .args([
                "init",
                "--listen",
                "0.0.0.0:7443",
                "--advertise",
                "no-port",
                "--data-dir",
            ])
            .arg(work.path().join("bad")),
        COMMAND_TIMEOUT,
    )?;
    assert_eq!(code(&bad), 2, "{bad}");

    // A wildcard coordinator named localhost: the written address really works, and the
    // operator commands on the coordinator's host reach it too.
    let dir = work.path().join("real");
    run(
        Command::new(&coordinator)
            .args([
                "init",
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--server-name",
                "localhost",
                "--data-dir",
            ])
            .arg(&dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let serve = fleetvault_tests::Proc::spawn(
        Command::new(&coordinator)
            .args(["serve", "--data-dir"])
            .arg(&dir),
        "wildcard coordinator",
        &work.path().join("serve.log"),
        &work.path().join("serve.out"),
    )?;
    serve.wait_for_line("listening on", std::time::Duration::from_secs(60))?;
    let out = work.path().join("db-03");
    issue_agent(&dir, "db-03", &out)?;
    let text = std::fs::read_to_string(out.join("agent.toml"))?;
    assert!(
        text.contains(&format!("address = \"localhost:{port}\"")),
        "{text}"
    );
    run(
        Command::new(bin("fleetvault-agent")?)
            .args(["snapshots", "--config"])
            .arg(out.join("agent.toml")),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    run(
        Command::new(&coordinator)
            .args(["agents", "--data-dir"])
            .arg(&dir),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    Ok(())
}
