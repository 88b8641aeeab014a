//! Offsite replication between real coordinators: incremental syncs, a primary that crashes
//! mid-sync or sends a corrupted chunk, history kept on the replica, a peer certificate that
//! may add snapshots and nothing else, and the disaster: the primary's data dir gone, the
//! fleet restored from the replica, which is promoted and seeds a new replica.

use std::path::Path;
use std::time::Duration;

use fleetvault_tests::data::write_random_file;
use fleetvault_tests::databases::Postgres;
use fleetvault_tests::report::{snapshot_id, str_field, u64_field};
use fleetvault_tests::tree::{build_odd_tree, ensure_same, restored_path, scan, ODD_TREE_EXCLUDE};
use fleetvault_tests::{scratch, Coordinator};
use serde_json::Value;

/// The ids of the completed snapshots a coordinator lists.
fn completed(c: &Coordinator) -> anyhow::Result<Vec<String>> {
    Ok(c.snapshots_json(&["--status", "completed"])?
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect())
}

/// `replicate --json` that must succeed; its one report.
fn replicate_ok(primary: &Coordinator, replica: &str) -> anyhow::Result<Value> {
    let v = primary.replicate(Some(replica))?.ensure_success()?.json()?;
    let report = v[0].clone();
    anyhow::ensure!(report["status"] == "completed", "{v}");
    eprintln!("sync report: {report}");
    Ok(report)
}

/// Restarts `c` with the fault switch `var=value` in its environment.
fn serve_with_fault(c: &mut Coordinator, var: &str, value: &str) -> anyhow::Result<()> {
    c.stop()?;
    std::env::set_var(var, value);
    let served = c.serve();
    std::env::remove_var(var);
    served
}

#[test]
fn replica_syncs_incrementally_resumes_after_a_crash_and_refuses_a_corrupted_chunk(
) -> anyhow::Result<()> {
    let mut primary = Coordinator::init()?;
    let replica = Coordinator::start()?;
    replica.add_as_replica_of(&primary, "main", "offsite", "")?;
    primary.serve()?;
    let work = scratch("replication")?;
    let tree_a = work.path().join("a");
    let tree_b = work.path().join("b");
    build_odd_tree(&tree_a, 51)?;
    write_random_file(&tree_a.join("big.bin"), 8 << 20, 52)?;
    std::fs::create_dir_all(&tree_b)?;
    write_random_file(&tree_b.join("uploads.bin"), 4 << 20, 53)?;
    let a = primary.agent("chat-a")?;
    let b = primary.agent("chat-b")?;
    a.add_files_source("files", &[&tree_a], &[ODD_TREE_EXCLUDE])?;
    b.add_files_source("files", &[&tree_b], &[])?;
    let a1 = snapshot_id(&a.backup_json("files")?)?;
    let b1 = snapshot_id(&b.backup_json("files")?)?;

    // Day 1: everything travels, and lands listed and complete.
    let r0 = replica.chunk_files()?.len();
    let day1 = replicate_ok(&primary, "offsite")?;
    assert_eq!(u64_field(&day1, "snapshots")?, 2, "{day1}");
    let sent1 = u64_field(&day1, "chunks")?;
    assert_eq!(
        sent1 as usize,
        replica.chunk_files()?.len() - r0,
        "every chunk sent once"
    );
    let on_replica = completed(&replica)?;
    assert!(
        on_replica.contains(&a1) && on_replica.contains(&b1),
        "{on_replica:?}"
    );
    let status = &replica_status(&primary, "offsite")?;
    assert_eq!(status["lag_snapshots"], 0, "{status}");
    assert!(
        status["last_error"].is_null() && status["last_success"].is_string(),
        "{status}"
    );

    // Day 2: one new file; only its chunks (and the new manifest) travel.
    write_random_file(&tree_a.join("day2.bin"), 1 << 20, 54)?;
    let a2 = snapshot_id(&a.backup_json("files")?)?;
    let status = &replica_status(&primary, "offsite")?;
    assert_eq!(status["lag_snapshots"], 1, "{status}");
    let r1 = replica.chunk_files()?.len();
    let day2 = replicate_ok(&primary, "offsite")?;
    assert_eq!(u64_field(&day2, "snapshots")?, 1, "{day2}");
    assert_eq!(u64_field(&day2, "already_present")?, 2, "{day2}");
    let (bytes1, bytes2) = (u64_field(&day1, "bytes")?, u64_field(&day2, "bytes")?);
    eprintln!("day-1 sync {bytes1} bytes, day-2 sync {bytes2} bytes");
    assert!(
        bytes2 * 5 < bytes1,
        "day 2 sent {bytes2} bytes against {bytes1}"
    );
    assert_eq!(
        u64_field(&day2, "chunks")? as usize,
        replica.chunk_files()?.len() - r1
    );
    assert!(completed(&replica)?.contains(&a2));

    // Deleted on the primary (and its chunks collected): still on the replica.
    primary.cli(&["delete", &b1])?.ensure_success()?;
    assert!(!completed(&primary)?.contains(&b1));
    let nothing = replicate_ok(&primary, "offsite")?;
    assert_eq!(u64_field(&nothing, "chunks")?, 0, "{nothing}");
    assert!(
        completed(&replica)?.contains(&b1),
        "history is kept on the replica"
    );

    // Day 3: a large file; the primary dies after the first acknowledged group of chunks.
    write_random_file(&tree_a.join("day3.bin"), 64 << 20, 55)?;
    let a3 = snapshot_id(&a.backup_json("files")?)?;
    serve_with_fault(&mut primary, "FLEETVAULT_FAULT_SYNC_ABORT_AFTER", "1")?;
    let r2 = replica.chunk_files()?.len();
    let cut = primary.replicate(Some("offsite"))?;
    assert!(!cut.success(), "the sync should have been cut off: {cut}");
    primary.restart()?;
    let before_resume = replica.chunk_files()?.len() - r2;
    assert!(
        before_resume > 0,
        "nothing reached the replica before the crash"
    );
    assert!(
        !replica
            .snapshots_json(&[])?
            .iter()
            .any(|s| s["id"] == a3.as_str()),
        "a half-sent snapshot is visible on the replica"
    );
    let resumed = replicate_ok(&primary, "offsite")?;
    let sent3 = u64_field(&resumed, "chunks")? as usize;
    let total3 = replica.chunk_files()?.len() - r2;
    eprintln!("day 3: {before_resume} chunks before the crash, {sent3} after, {total3} in all");
    assert_eq!(
        before_resume + sent3,
        total3,
        "chunks were sent twice or lost"
    );
    assert!(sent3 < total3, "the resumed sync sent everything again");
    assert!(completed(&replica)?.contains(&a3));

    // Day 4 from a faulty primary: the corrupted chunk is refused, nothing is listed, the
    // failure shows in `replicas`, and a healthy primary completes the sync.
    write_random_file(&tree_b.join("day4.bin"), 1 << 20, 56)?;
    let b4 = snapshot_id(&b.backup_json("files")?)?;
    serve_with_fault(&mut primary, "FLEETVAULT_FAULT_SYNC_CORRUPT", "1")?;
    let bad = primary.replicate(Some("offsite"))?;
    let stderr = bad.ensure_failure()?;
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(!completed(&replica)?.contains(&b4));
    let status = replica_status(&primary, "offsite")?;
    assert_eq!(status["failures"], 1, "{status}");
    assert!(
        str_field(&status, "last_error")?.contains("refused"),
        "{status}"
    );
    assert!(status["next_retry"].is_string(), "{status}");
    assert_eq!(status["lag_snapshots"], 1, "{status}");
    primary.stop()?;
    primary.serve()?;
    replicate_ok(&primary, "offsite")?;
    assert!(completed(&replica)?.contains(&b4));
    let status = replica_status(&primary, "offsite")?;
    assert!(
        status["last_error"].is_null() && status["failures"] == 0,
        "{status}"
    );
    let verified = replica.cli(&["verify"])?;
    verified.ensure_success()?;
    Ok(())
}

fn replica_status(primary: &Coordinator, name: &str) -> anyhow::Result<Value> {
    primary
        .replicas_json()?
        .into_iter()
        .find(|r| r["name"] == name)
        .ok_or_else(|| anyhow::anyhow!("replica {name} not listed"))
}

/// A data dir that makes `fleetvault-coordinator` commands present the peer certificate in
/// `peer_dir` (from `issue-peer`) to `replica`, as a stolen peer key would be used.
fn as_peer(replica: &Coordinator, peer_dir: &Path, root: &Path) -> anyhow::Result<()> {
    let tls = root.join("tls");
    std::fs::create_dir_all(&tls)?;
    std::fs::copy(peer_dir.join("ca.pem"), tls.join("ca.pem"))?;
    std::fs::copy(peer_dir.join("peer.pem"), tls.join("operator.pem"))?;
    std::fs::copy(peer_dir.join("peer.key"), tls.join("operator.key"))?;
    std::fs::write(
        root.join("coordinator.toml"),
        format!(
            "listen = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n",
            replica.port()
        ),
    )?;
    Ok(())
}

#[test]
fn after_losing_the_primary_the_fleet_restores_from_the_replica_which_is_promoted(
) -> anyhow::Result<()> {
    let mut primary = Coordinator::init()?;
    let mut replica = Coordinator::start()?;
    let peer_dir = replica.add_as_replica_of(&primary, "main", "offsite", "")?;
    primary.serve()?;
    let work = scratch("disaster")?;
    let pg_a = Postgres::start("dr-a")?;
    let pg_b = Postgres::start("dr-b")?;
    pg_a.sql("postgres", "CREATE DATABASE chat")?;
    pg_a.sql("chat", crate::postgres::DAY_ONE)?;
    pg_b.sql("postgres", "CREATE DATABASE chat")?;
    let tree = work.path().join("uploads");
    let stats = build_odd_tree(&tree, 61)?;
    let mut expected = scan(&tree)?;
    for rel in &stats.excluded {
        expected.remove(rel.as_os_str().as_encoded_bytes());
    }
    let host_a = primary.agent("host-a")?;
    host_a.add_files_source("uploads", &[&tree], &[ODD_TREE_EXCLUDE])?;
    host_a.append_config(&pg_a.source_toml("chat", "chat", "tables"))?;
    let files_id = snapshot_id(&host_a.backup_json("uploads")?)?;
    let db_id = snapshot_id(&host_a.backup_json("chat")?)?;
    let db_content = pg_a.content("chat")?;
    replicate_ok(&primary, "offsite")?;
    let listed = completed(&primary)?;

    // A peer certificate may add snapshots, nothing else.
    let stolen = work.path().join("stolen-peer");
    as_peer(&replica, &peer_dir, &stolen)?;
    let as_peer_cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--data-dir", stolen.to_str().unwrap_or_default()]);
        primary_cli_without_dir(&all)
    };
    for args in [
        vec!["snapshots"],
        vec!["delete", &files_id],
        vec!["download", &files_id, "--out", "/tmp/fv-peer-download"],
        vec!["restore", &files_id, "--agent", "host-a"],
        vec!["gc"],
    ] {
        let err = as_peer_cli(&args)?.ensure_failure()?;
        assert!(err.contains("may not"), "{args:?}: {err}");
    }
    assert_eq!(completed(&replica)?, listed);

    // The disaster: the primary and its whole data dir are gone.
    primary.stop()?;
    std::fs::remove_dir_all(primary.data_dir())?;
    // The replica's catalog comes back from its store alone.
    replica.stop()?;
    replica.cli(&["rebuild-catalog"])?.ensure_success()?;
    replica.serve()?;
    assert_eq!(completed(&replica)?, listed);

    // Agents get configs re-issued by the replica and restore their own snapshots.
    let new_a = replica.agent("host-a")?;
    new_a.add_files_source("uploads", &[&tree], &[ODD_TREE_EXCLUDE])?;
    let theirs = new_a.snapshots_json()?;
    assert!(
        theirs.iter().any(|s| s["id"] == files_id.as_str()),
        "{theirs:?}"
    );
    let target = work.path().join("restored");
    new_a.restore_json(&files_id, Some(&target))?;
    ensure_same(&expected, &scan(&restored_path(&target, &tree))?)?;
    // ... and back up here incrementally: the replicated chunks count as theirs.
    let next = new_a.backup_json("uploads")?;
    assert!(
        u64_field(&next, "new_chunks")? <= 1,
        "at most a new manifest: {next}"
    );

    // The database, pushed from the replica onto another host's server.
    let new_b = replica.agent("host-b")?;
    new_b.append_config(&pg_b.source_toml("chat", "chat", "tables"))?;
    let _link = new_b.run()?;
    replica.wait_agent_connected("host-b", Duration::from_secs(60))?;
    replica
        .cli(&[
            "restore", &db_id, "--agent", "host-b", "--source", "chat", "--json",
        ])?
        .ensure_success()?;
    assert_eq!(
        pg_b.content("chat")?,
        db_content,
        "PostgreSQL restored from the replica differs"
    );

    // Promotion retires the old primary's peer certificate and seeds a new replica.
    let out = replica.cli(&["promote"])?.ensure_success()?;
    assert!(out.stdout.contains("main"), "{}", out.stdout);
    assert!(out.stdout.contains("issue-agent host-a"), "{}", out.stdout);
    let err = as_peer_cli(&["snapshots"])?.ensure_failure()?;
    assert!(
        err.contains("not allowed"),
        "a retired peer certificate still connects: {err}"
    );
    let second = Coordinator::start()?;
    second.add_as_replica_of(&replica, "dr-primary", "offsite-2", "")?;
    replica.stop()?;
    replica.serve()?;
    let seeded = replicate_ok(&replica, "offsite-2")?;
    assert_eq!(
        u64_field(&seeded, "snapshots")? as usize,
        completed(&replica)?.len(),
        "{seeded}"
    );
    let from_second = second.agent("host-a")?;
    let target2 = work.path().join("restored-2");
    from_second.restore_json(&files_id, Some(&target2))?;
    ensure_same(&expected, &scan(&restored_path(&target2, &tree))?)?;
    Ok(())
}

/// `fleetvault-coordinator ARGS` with the data dir given in ARGS.
fn primary_cli_without_dir(args: &[&str]) -> anyhow::Result<fleetvault_tests::Output> {
    fleetvault_tests::run(
        std::process::Command::new(fleetvault_tests::bin("fleetvault-coordinator")?).args(args),
        fleetvault_tests::COMMAND_TIMEOUT,
    )
}

#[test]
fn scheduled_sync_retries_a_refused_primary_and_the_replica_applies_its_own_retention(
) -> anyhow::Result<()> {
    let mut primary = Coordinator::init()?;
    let mut replica = Coordinator::init()?;
    replica.append_config("\n[[peers]]\nname = \"main\"\n[peers.retention]\nkeep_last = 1\n")?;
    replica.serve()?;
    replica.add_as_replica_of(
        &primary,
        "main",
        "offsite",
        "schedule = \"*/2 * * * * *\"\nretry_base_secs = 1\n",
    )?;
    // The replica does not accept this primary yet: its peer certificate is set aside.
    let allowed = replica.data_dir().join("tls/peers/main.pem");
    let aside = replica.data_dir().join("main.pem.aside");
    std::fs::copy(&allowed, &aside)?;
    std::fs::remove_file(&allowed)?;
    let work = scratch("replica-schedule")?;
    let tree = work.path().join("t");
    std::fs::create_dir_all(&tree)?;
    let a = primary.agent("chat-a")?;
    a.add_files_source("files", &[&tree], &[])?;
    primary.serve()?;
    let mut ids = Vec::new();
    for day in 0..3 {
        write_random_file(&tree.join(format!("day{day}.bin")), 256 << 10, 70 + day)?;
        ids.push(snapshot_id(&a.backup_json("files")?)?);
    }

    // Failures are reported, with the next retry, and retried by themselves.
    fleetvault_tests::wait_until("a failed scheduled sync", Duration::from_secs(60), || {
        let s = replica_status(&primary, "offsite")?;
        Ok(s["failures"].as_u64().unwrap_or(0) >= 2)
    })?;
    let status = replica_status(&primary, "offsite")?;
    eprintln!("while refused: {status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not allowed")),
        "{status}"
    );
    assert!(
        status["next_retry"].is_string() && status["last_success"].is_null(),
        "{status}"
    );
    assert_eq!(status["lag_snapshots"], 3, "{status}");
    let table = primary.cli(&["replicas"])?.ensure_success()?;
    assert!(table.stdout.contains("not allowed"), "{}", table.stdout);

    std::fs::copy(&aside, &allowed)?;
    fleetvault_tests::wait_until(
        "a successful scheduled sync",
        Duration::from_secs(60),
        || {
            let s = replica_status(&primary, "offsite")?;
            Ok(s["last_error"].is_null() && s["lag_snapshots"] == 0)
        },
    )?;
    let status = replica_status(&primary, "offsite")?;
    assert_eq!(status["failures"], 0, "{status}");

    // keep_last = 1 on the replica: only the newest stays there; the primary keeps all three
    // and does not send the forgotten ones again.
    assert_eq!(completed(&replica)?, vec![ids[2].clone()]);
    assert_eq!(completed(&primary)?, ids);
    let again = replicate_ok(&primary, "offsite")?;
    assert_eq!(u64_field(&again, "already_present")?, 3, "{again}");
    assert_eq!(u64_field(&again, "chunks")?, 0, "{again}");
    Ok(())
}
