//! Application bundles on the real on-disk layouts of Mattermost and Chatwoot (their config
//! file formats, a real PostgreSQL or MariaDB database, uploads of mixed sizes), with a
//! stand-in service that the hooks stop and start: backed up, destroyed, restored on another
//! agent, cloned beside the original; hooks in order also when a part fails or hangs.

use std::path::{Path, PathBuf};

use fleetvault_tests::data::write_random_file;
use fleetvault_tests::databases::{MariaDb, Postgres, DB_PASSWORD};
use fleetvault_tests::report::{snapshot_id, str_field};
use fleetvault_tests::tree::{ensure_same, scan};

use fleetvault_tests::{scratch, Agent, Coordinator};
use serde_json::Value;

/// A stand-in for the app's service: `svc stop|start` records `ACTION PHASE STATUS MS` and
/// keeps a pid file while "running".
fn service_script(dir: &Path) -> anyhow::Result<PathBuf> {
    let script = dir.join("svc");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\necho \"$1 $FLEETVAULT_PHASE ${{FLEETVAULT_STATUS:-none}} $(date +%s%3N) ${{FLEETVAULT_SNAPSHOT_IDS:-}}\" >> {events}\nif [ \"$1\" = stop ]; then rm -f {pid}; else echo running > {pid}; fi\necho \"service $1 for $FLEETVAULT_BUNDLE\"\n",
            events = dir.join("events").display(),
            pid = dir.join("svc.pid").display(),
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::write(dir.join("svc.pid"), "running\n")?;
    Ok(script)
}

/// `(action, phase, status, ms)` lines the stand-in service recorded.
fn events(dir: &Path) -> anyhow::Result<Vec<(String, String, String, u64)>> {
    let text = std::fs::read_to_string(dir.join("events")).unwrap_or_default();
    Ok(text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].to_owned(),
                f[3].parse().unwrap_or(0),
            )
        })
        .collect())
}

/// Uploads of mixed sizes and kinds under `dir`.
fn uploads(dir: &Path, seed: u64) -> anyhow::Result<()> {
    for (i, len) in [0u64, 17, 4096, 300_000, 2_500_000].into_iter().enumerate() {
        let d = dir.join(format!("team-{}/channel-{}", i % 2, i));
        std::fs::create_dir_all(&d)?;
        write_random_file(&d.join(format!("upload-{i}.bin")), len, seed + i as u64)?;
        std::fs::write(
            d.join(format!("note-{i}.txt")),
            "héllo chat ".repeat(i * 100 + 1),
        )?;
    }
    Ok(())
}

/// A Mattermost install under `root`: config/config.json with `SqlSettings` and
/// `FileSettings`, data/, plugins/ and client/plugins/.
fn mattermost_layout(root: &Path, driver: &str, data_source: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("config"))?;
    let config = serde_json::json!({
        "ServiceSettings": {"SiteURL": "https://chat.example.com", "ListenAddress": ":8065"},
        "SqlSettings": {
            "DriverName": driver,
            "DataSource": data_source,
            "DataSourceReplicas": [],
            "MaxIdleConns": 20,
        },
        "FileSettings": {"DriverName": "local", "Directory": "./data/"},
        "PluginSettings": {"Enable": true, "Directory": "./plugins", "ClientDirectory": "./client/plugins"},
    });
    std::fs::write(
        root.join("config/config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    uploads(&root.join("data"), 7)?;
    std::fs::create_dir_all(root.join("plugins/com.example.todo"))?;
    std::fs::write(
        root.join("plugins/com.example.todo/plugin.json"),
        "{\"id\": \"todo\"}",
    )?;
    std::fs::create_dir_all(root.join("client/plugins/com.example.todo"))?;
    std::fs::write(
        root.join("client/plugins/com.example.todo/main.js"),
        "console.log(1)",
    )?;
    Ok(())
}

/// A `[[bundles]]` table for `profile` under `root`, hooks through the stand-in service.
fn bundle_toml(name: &str, profile: &str, root: &Path, svc: &Path, extra: &str) -> String {
    format!(
        "\n[[bundles]]\nname = \"{name}\"\nprofile = \"{profile}\"\nroot = \"{}\"\nbefore = [\"{svc} stop\"]\nafter = [{{ command = \"{svc} start\", timeout_secs = 30 }}]\n{extra}",
        root.display(),
        svc = svc.display()
    )
}

fn pg_url(pg: &Postgres, db: &str) -> String {
    let host = pg.host().display().to_string().replace('/', "%2F");
    format!(
        "postgres://postgres:{DB_PASSWORD}@{host}:{}/{db}?sslmode=disable&connect_timeout=10",
        pg.port()
    )
}

/// The app's tree without the directories no part holds (the root, and `client/` above
/// `client/plugins`): their mtimes are not backed up.
fn app_tree(root: &Path) -> anyhow::Result<fleetvault_tests::tree::Tree> {
    let mut t = scan(root)?;
    t.remove(b"".as_slice());
    t.remove(b"client".as_slice());
    Ok(t)
}

fn snapshot_of(c: &Coordinator, id: &str) -> anyhow::Result<Value> {
    c.snapshots_json(&[])?
        .into_iter()
        .find(|s| s["id"] == id)
        .ok_or_else(|| anyhow::anyhow!("snapshot {id} not listed"))
}

/// Backs up `bundle` on `agent` and checks the hooks bracketed every part.
fn backup_bundle(
    c: &Coordinator,
    agent: &Agent,
    bundle: &str,
    dir: &Path,
) -> anyhow::Result<Value> {
    let before = events(dir)?.len();
    let report = agent.backup_json(bundle)?;
    let id = snapshot_id(&report)?;
    let listed = snapshot_of(c, &id)?;
    assert_eq!(listed["kind"], "bundle");
    for part in report["parts"].as_array().into_iter().flatten() {
        let tag = format!(
            "part:{}={}",
            str_field(part, "name")?,
            str_field(part, "snapshot_id")?
        );
        assert!(
            listed["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x == tag.as_str())),
            "{listed}"
        );
    }
    let ev = events(dir)?.split_off(before);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!((ev[0].0.as_str(), ev[0].1.as_str()), ("stop", "before"));
    assert_eq!(
        (ev[1].0.as_str(), ev[1].1.as_str(), ev[1].2.as_str()),
        ("start", "after", "ok")
    );
    for part in report["parts"].as_array().into_iter().flatten() {
        assert_eq!(part["status"], "completed", "{report}");
        let s = snapshot_of(c, str_field(part, "snapshot_id")?)?;
        let (started, ended) = (
            s["started_ms"].as_u64().unwrap_or(0),
            s["ended_ms"].as_u64().unwrap_or(u64::MAX),
        );
        assert!(
            ev[0].3 <= started && ended <= ev[1].3,
            "part {part} ran outside the service's stop..start"
        );
    }
    let hooks = report["hooks"].as_array().cloned().unwrap_or_default();
    assert!(
        hooks[0]["output"]
            .as_str()
            .is_some_and(|o| o.contains("service stop")),
        "{report}"
    );
    Ok(report)
}

#[test]
fn mattermost_on_postgres_restores_on_another_agent_and_clones_to_staging() -> anyhow::Result<()> {
    let pg = Postgres::start("mm")?;
    pg.sql("postgres", "CREATE DATABASE mattermost")?;
    pg.sql("mattermost", crate::postgres::DAY_ONE)?;
    let content = pg.content("mattermost")?;
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-mm")?;
    let root = work.path().join("opt/mattermost");
    mattermost_layout(&root, "postgres", &pg_url(&pg, "mattermost"))?;
    let files = app_tree(&root)?;
    let svc = service_script(work.path())?;
    let a = coordinator.agent("chat-a")?;
    a.append_config(&bundle_toml("mm", "mattermost", &root, &svc, ""))?;

    // What the profile expanded to, without running anything and without the password.
    let shown = a.cli("bundles", &[])?.ensure_success()?.stdout;
    for want in [
        "mm-db (postgres)",
        "database mattermost",
        "mm-data (files)",
        "mm-config",
        "mm-plugins",
        "svc stop",
        "svc start",
        "password (set, not shown)",
    ] {
        assert!(shown.contains(want), "{want:?} missing from:\n{shown}");
    }
    assert!(
        !shown.contains(DB_PASSWORD),
        "the password is shown:\n{shown}"
    );

    let report = backup_bundle(&coordinator, &a, "mm", work.path())?;
    let id = snapshot_id(&report)?;
    let parts: Vec<&str> = report["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(parts, ["mm-db", "mm-data", "mm-config", "mm-plugins"]);

    // Everything destroyed; another agent with the same bundle restores it all.
    pg.sql("postgres", "DROP DATABASE mattermost")?;
    std::fs::remove_dir_all(&root)?;
    let b = coordinator.agent("chat-b")?;
    b.append_config(&bundle_toml("mm", "mattermost", &root, &svc, ""))?;
    // Another host's snapshot: the operator pushes the restore (the coordinator grants the
    // bundle's parts with it).
    let _link = b.run()?;
    coordinator.wait_agent_connected("chat-b", std::time::Duration::from_secs(60))?;
    let restored = coordinator
        .cli(&["restore", &id, "--agent", "chat-b", "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(restored["status"], "completed", "{restored}");
    assert_eq!(
        pg.content("mattermost")?,
        content,
        "database differs after the restore"
    );
    ensure_same(&files, &app_tree(&root)?)?;
    let ev = events(work.path())?;
    let last: Vec<(&str, &str)> = ev
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|e| (e.0.as_str(), e.1.as_str()))
        .collect();
    assert_eq!(
        last,
        [("stop", "restore-before"), ("start", "restore-after")]
    );

    // A clone to staging: new root, new database, config pointing at both; the original stays.
    let staging = work.path().join("srv/mm-staging");
    let clone = a
        .cli(
            "restore",
            &[
                &id,
                "--root",
                staging.to_str().unwrap_or_default(),
                "--database",
                "mm_staging",
                "--json",
            ],
        )?
        .ensure_success()?
        .json()?;
    assert_eq!(clone["status"], "completed", "{clone}");
    assert_eq!(pg.content("mm_staging")?, content);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(
        staging.join("config/config.json"),
    )?)?;
    let ds = str_field(&cfg["SqlSettings"], "DataSource")?;
    assert!(ds.contains("/mm_staging?"), "{ds}");
    let orig: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("config/config.json"))?)?;
    assert!(str_field(&orig["SqlSettings"], "DataSource")?.contains("/mattermost?"));
    let mut cloned = app_tree(&staging)?;
    let mut expected = files.clone();
    // The rewritten configuration (and its directory's mtime) differ by design.
    for rewritten in [b"config/config.json".as_slice(), b"config"] {
        cloned.remove(rewritten);
        expected.remove(rewritten);
    }
    ensure_same(&expected, &cloned)?;

    // The same clone pushed by the operator onto the other host (`--target` is the new root).
    let pushed = work.path().join("srv/mm-staging-b");
    coordinator
        .cli(&[
            "restore",
            &id,
            "--agent",
            "chat-b",
            "--target",
            pushed.to_str().unwrap_or_default(),
            "--database",
            "mm_staging_b",
            "--json",
        ])?
        .ensure_success()?;
    assert_eq!(pg.content("mm_staging_b")?, content);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(pushed.join("config/config.json"))?)?;
    assert!(str_field(&cfg["SqlSettings"], "DataSource")?.contains("/mm_staging_b?"));
    Ok(())
}

#[test]
fn mattermost_on_mariadb_and_chatwoot_round_trip() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-apps")?;
    let svc = service_script(work.path())?;
    let a = coordinator.agent("apps-a")?;
    let b = coordinator.agent("apps-b")?;

    let maria = MariaDb::start("mm")?;
    maria.sql(None, "CREATE DATABASE mattermost")?;
    maria.sql(Some("mattermost"), crate::mariadb::DAY_ONE)?;
    let maria_content = maria.content("mattermost")?;
    let mm_root = work.path().join("mm");
    let dsn = format!(
        "root:{DB_PASSWORD}@unix({})/mattermost?charset=utf8mb4,utf8&writeTimeout=30s",
        maria.socket().display()
    );
    mattermost_layout(&mm_root, "mysql", &dsn)?;
    let mm_files = app_tree(&mm_root)?;

    let pg = Postgres::start("cw")?;
    pg.sql("postgres", "CREATE DATABASE chatwoot_production")?;
    pg.sql("chatwoot_production", crate::postgres::DAY_ONE)?;
    let cw_content = pg.content("chatwoot_production")?;
    let cw_root = work.path().join("chatwoot");
    uploads(&cw_root.join("storage"), 11)?;
    std::fs::write(
        cw_root.join(".env"),
        format!(
            "# Chatwoot\nSECRET_KEY_BASE=replace_with_lengthy_secure_hex\nFRONTEND_URL=http://0.0.0.0:3000\nRAILS_ENV=production\nPOSTGRES_HOST={}\nPOSTGRES_PORT={}\nPOSTGRES_USERNAME=postgres\nPOSTGRES_PASSWORD={DB_PASSWORD}\nREDIS_URL=redis://redis:6379\n",
            pg.host().display(),
            pg.port()
        ),
    )?;
    let cw_files = app_tree(&cw_root)?;
    for agent in [&a, &b] {
        agent.append_config(&bundle_toml("mm", "mattermost", &mm_root, &svc, ""))?;
        agent.append_config(&bundle_toml("cw", "chatwoot", &cw_root, &svc, ""))?;
    }
    let shown = a.cli("bundles", &["--json"])?.ensure_success()?.stdout;
    assert!(
        !shown.contains(DB_PASSWORD) && shown.contains("chatwoot_production"),
        "{shown}"
    );

    let mm = snapshot_id(&backup_bundle(&coordinator, &a, "mm", work.path())?)?;
    let cw = snapshot_id(&backup_bundle(&coordinator, &a, "cw", work.path())?)?;
    maria.sql(None, "DROP DATABASE mattermost")?;
    pg.sql("postgres", "DROP DATABASE chatwoot_production")?;
    std::fs::remove_dir_all(&mm_root)?;
    std::fs::remove_dir_all(&cw_root)?;
    let _link = b.run()?;
    coordinator.wait_agent_connected("apps-b", std::time::Duration::from_secs(60))?;
    for id in [&mm, &cw] {
        coordinator
            .cli(&["restore", id, "--agent", "apps-b", "--json"])?
            .ensure_success()?;
    }
    assert_eq!(maria.content("mattermost")?, maria_content);
    assert_eq!(pg.content("chatwoot_production")?, cw_content);
    ensure_same(&mm_files, &app_tree(&mm_root)?)?;
    ensure_same(&cw_files, &app_tree(&cw_root)?)?;

    // A Chatwoot clone: its .env names the new database.
    let staging = work.path().join("chatwoot-staging");
    a.cli(
        "restore",
        &[
            &cw,
            "--root",
            staging.to_str().unwrap_or_default(),
            "--database",
            "cw_staging",
        ],
    )?
    .ensure_success()?;
    assert_eq!(pg.content("cw_staging")?, cw_content);
    let env = std::fs::read_to_string(staging.join(".env"))?;
    assert!(
        env.contains("POSTGRES_DATABASE=cw_staging") && env.contains("SECRET_KEY_BASE="),
        "{env}"
    );
    Ok(())
}

#[test]
fn a_failing_part_or_a_hung_hook_fails_the_bundle_and_the_after_hook_still_runs(
) -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-fail")?;
    let svc = service_script(work.path())?;
    let a = coordinator.agent("hooks-a")?;
    let tree = work.path().join("files");
    uploads(&tree, 3)?;
    a.add_files_source("files", &[&tree], &[])?;
    a.append_config(&format!(
        "\n[[sources]]\nname = \"broken\"\nkind = \"command\"\nbackup_command = \"echo partial; exit 3\"\n\
         \n[[bundles]]\nname = \"app\"\nparts = [\"files\", \"broken\"]\nbefore = [\"{svc} stop\"]\nafter = [\"{svc} start\"]\n\
         \n[[bundles]]\nname = \"afterfail\"\nparts = [\"files\"]\nafter = [\"echo cannot start; exit 9\"]\n\
         \n[[bundles]]\nname = \"hung\"\nparts = [\"files\"]\nbefore = [{{ command = \"sleep 60\", timeout_secs = 1 }}]\nafter = [\"{svc} start\"]\n",
        svc = svc.display()
    ))?;

    let out = a.backup("app")?;
    let err = out.ensure_failure()?;
    assert!(err.contains("part broken") && err.contains("exit"), "{err}");
    let ev = events(work.path())?;
    let tail: Vec<(&str, &str, &str)> = ev
        .iter()
        .map(|e| (e.0.as_str(), e.1.as_str(), e.2.as_str()))
        .collect();
    assert_eq!(
        tail,
        [("stop", "before", "none"), ("start", "after", "failed")]
    );
    let line = std::fs::read_to_string(work.path().join("events"))?;
    let files_id = line
        .lines()
        .nth(1)
        .and_then(|l| l.split(' ').nth(4))
        .unwrap_or("");
    assert_eq!(
        files_id.len(),
        16,
        "the after hook did not get the part taken: {line}"
    );
    assert!(
        work.path().join("svc.pid").exists(),
        "the service was not started again"
    );
    let failed: Vec<Value> = coordinator
        .snapshots_json(&["--source", "app"])?
        .into_iter()
        .filter(|s| s["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "the failed bundle is listed failed");
    assert!(
        str_field(&failed[0], "reason")?.contains("part broken"),
        "{failed:?}"
    );

    // An after hook that fails: the data is taken and recorded, and the failure reported as a
    // warning with exit code 3 (completed with warnings).
    let out = a.backup("afterfail")?;
    let v = out.json()?;
    assert_eq!(out.status.code(), Some(3), "{out}");
    let err = out.stderr.clone();
    assert!(err.lines().any(|l| l.starts_with("warning: ")), "{err}");
    assert!(
        err.contains("exited with status 9") && err.contains("cannot start"),
        "{err}"
    );
    assert_eq!(v["status"], "completed-with-errors", "{v}");
    assert_eq!(
        snapshot_of(&coordinator, str_field(&v, "snapshot_id")?)?["status"],
        "completed"
    );

    let started = std::time::Instant::now();
    let err = a.backup("hung")?.ensure_failure()?;
    assert!(
        err.contains("timed out") && err.contains("sleep 60"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let ev = events(work.path())?;
    assert_eq!(
        (ev[2].0.as_str(), ev[2].1.as_str(), ev[2].2.as_str()),
        ("start", "after", "failed")
    );
    Ok(())
}

#[test]
fn rocketchat_profile_reads_mongo_url_and_keeps_mongodb_running() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-rc")?;
    let root = work.path().join("rocketchat");
    uploads(&root.join("uploads"), 21)?;
    std::fs::write(
        root.join(".env"),
        "ROOT_URL=https://chat.example.com\nMONGO_URL=mongodb://rc:s3cret@127.0.0.1:27017/rocketchat?replicaSet=rs0\nPORT=3000\n",
    )?;
    let a = coordinator.agent("rc-a")?;
    a.append_config(&format!(
        "\n[[bundles]]\nname = \"rc\"\nprofile = \"rocketchat\"\nroot = \"{}\"\n",
        root.display()
    ))?;
    let shown: Value = a.cli("bundles", &["--json"])?.ensure_success()?.json()?;
    let b = &shown[0];
    let parts: Vec<&str> = b["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(parts, ["mongodb", "files"], "{shown}");
    assert_eq!(b["parts"][0]["database"], "rocketchat", "{shown}");
    // Seed 000: the app server is stopped, MongoDB keeps running for the dump.
    assert_eq!(
        b["before"][0]["command"], "systemctl stop rocketchat-server",
        "{shown}"
    );
    assert_eq!(
        b["after"][0]["command"], "systemctl start rocketchat-server",
        "{shown}"
    );
    assert!(
        !shown.to_string().contains("s3cret"),
        "the MongoDB password is shown: {shown}"
    );
    Ok(())
}

#[test]
#[ignore = "needs mongod, mongodump, mongorestore and mongosh on PATH (no Debian package)"]
fn rocketchat_bundle_round_trips_with_a_live_mongod() -> anyhow::Result<()> {
    crate::mongodb::require_mongo_tools()?;
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-rc-live")?;
    rocketchat_round_trip(&coordinator, &work)
}

/// Seed 000 with a live `mongod`: the app server stopped, MongoDB running, dump and uploads
/// in one bundle; the database dropped and the uploads removed; both restored.
fn rocketchat_round_trip(
    coordinator: &Coordinator,
    work: &fleetvault_tests::Scratch,
) -> anyhow::Result<()> {
    use crate::mongodb::mongosh;
    let (_mongod, server) = crate::mongodb::start_mongod(work.path())?;
    mongosh(
        &format!("{server}/rocketchat"),
        "for (let i = 0; i < 500; i++) db.rocketchat_message.insertOne({i, msg: 'héllo ' + i})",
    )?;
    let svc = service_script(work.path())?;
    let root = work.path().join("rc-live");
    uploads(&root.join("uploads"), 31)?;
    std::fs::write(
        root.join(".env"),
        format!("MONGO_URL={server}/rocketchat\n"),
    )?;
    let files = app_tree(&root)?;
    let a = coordinator.agent("rc-live")?;
    a.append_config(&bundle_toml("rc", "rocketchat", &root, &svc, ""))?;
    let id = snapshot_id(&backup_bundle(coordinator, &a, "rc", work.path())?)?;
    mongosh(&format!("{server}/rocketchat"), "db.dropDatabase()")?;
    std::fs::remove_dir_all(root.join("uploads"))?;
    a.restore_json(&id, None)?;
    assert_eq!(
        mongosh(
            &format!("{server}/rocketchat"),
            "db.rocketchat_message.countDocuments()"
        )?,
        "500"
    );
    ensure_same(&files, &app_tree(&root)?)?;
    Ok(())
}

#[test]
fn a_bundle_is_protected_verified_and_deleted_with_its_parts() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let work = scratch("bundle-unit")?;
    let tree = work.path().join("files");
    uploads(&tree, 5)?;
    let a = coordinator.agent("unit-a")?;
    a.add_files_source("files", &[&tree], &[])?;
    a.append_config(
        "\n[[sources]]\nname = \"dump\"\nkind = \"command\"\nbackup_command = \"seq 1 100000\"\n\
         \n[[bundles]]\nname = \"app\"\nparts = [\"dump\", \"files\"]\n",
    )?;
    let report = a.backup_json("app")?;
    let id = snapshot_id(&report)?;
    let parts: Vec<String> = report["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["snapshot_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(parts.len(), 2, "{report}");
    let is = |sid: &str, key: &str| -> anyhow::Result<Value> {
        Ok(snapshot_of(&coordinator, sid)?[key].clone())
    };

    coordinator.cli(&["protect", &id])?.ensure_success()?;
    for p in &parts {
        assert_eq!(
            is(p, "protected")?,
            true,
            "part {p} not protected with its bundle"
        );
    }
    let err = coordinator.cli(&["delete", &id])?.ensure_failure()?;
    assert!(err.contains("protected"), "{err}");
    coordinator.cli(&["unprotect", &id])?.ensure_success()?;

    let verified = coordinator
        .cli(&["verify", "--snapshot", &id, "--json"])?
        .ensure_success()?
        .json()?;
    let ids: Vec<&str> = verified
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert!(
        parts.iter().all(|p| ids.contains(&p.as_str())) && ids.contains(&id.as_str()),
        "{verified}"
    );

    // One tar holding the index and every part: the dump as a file, the tree as a directory.
    let tar = work.path().join("app.tar");
    coordinator
        .cli(&["download", &id, "--out", tar.to_str().unwrap_or_default()])?
        .ensure_success()?;
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked)?;
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&unpacked)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: Value = serde_json::from_slice(&std::fs::read(unpacked.join("bundle.json"))?)?;
    assert_eq!(index["bundle"], "app");
    let seq: String = (1..=100000).map(|n| format!("{n}\n")).collect();
    assert_eq!(std::fs::read_to_string(unpacked.join("dump.dump"))?, seq);
    // tar keeps whole seconds: compare names and contents.
    let inner = unpacked.join("files").join(tree.strip_prefix("/")?);
    let (expected, got) = (scan(&tree)?, scan(&inner)?);
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for rel in expected.keys() {
        let rel = std::path::Path::new(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(rel),
        );
        if tree.join(rel).is_file() {
            assert_eq!(
                std::fs::read(tree.join(rel))?,
                std::fs::read(inner.join(rel))?,
                "{}",
                rel.display()
            );
        }
    }

    coordinator.cli(&["delete", &id])?.ensure_success()?;
    let left: Vec<Value> = coordinator.snapshots_json(&[])?;
    for gone in parts.iter().chain([&id]) {
        assert!(
            !left.iter().any(|s| s["id"] == gone.as_str()),
            "{gone} still listed: {left:?}"
        );
    }
    Ok(())
}

#[test]
fn a_job_targets_a_bundle_like_a_source() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config(
        "\n[[jobs]]\nname = \"nightly\"\nagents = [\"job-a\"]\nsources = [\"app\"]\nschedule = \"0 3 1 1 *\"\n",
    )?;
    coordinator.serve()?;
    let work = scratch("bundle-job")?;
    let svc = service_script(work.path())?;
    let tree = work.path().join("files");
    uploads(&tree, 9)?;
    let a = coordinator.agent("job-a")?;
    a.add_files_source("files", &[&tree], &[])?;
    a.append_config(&format!(
        "\n[[bundles]]\nname = \"app\"\nparts = [\"files\"]\nbefore = [\"{svc} stop\"]\nafter = [\"{svc} start\"]\n",
        svc = svc.display()
    ))?;
    let _link = a.run()?;
    coordinator.wait_agent_connected("job-a", std::time::Duration::from_secs(60))?;
    let reports = coordinator
        .cli(&["run", "nightly", "--json"])?
        .ensure_success()?
        .json()?;
    let report = &reports[0];
    assert_eq!(report["status"], "completed", "{reports}");
    let bundle = snapshot_of(&coordinator, &snapshot_id(report)?)?;
    assert_eq!(
        (bundle["kind"].as_str(), bundle["job"].as_str()),
        (Some("bundle"), Some("nightly"))
    );
    let ev = events(work.path())?;
    assert_eq!(ev.len(), 2, "{ev:?}");
    Ok(())
}
