//! The store's integrity against unlucky moments and hostile peers (issue 14, hole 9):
//!
//! - an incremental files backup reuses its parent's chunk lists without asking `Missing`;
//!   the parent is deleted and collected while the backup runs, and the backup still commits
//!   a snapshot that verifies;
//! - an operator's and a scheduled garbage collection never run at once (the second is refused
//!   or skipped, with a clear message);
//! - a coordinator that dies between a commit's store record and its catalog entry comes back
//!   with the snapshot completed, garbage collection keeps its chunks, and `rebuild-catalog`
//!   agrees with the catalog;
//! - a peer cannot push a snapshot id that the replica's id counter cannot go past;
//! - the store's and catalog's files and directories are private to the coordinator's user.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use fleetvault_common::chunk::seal;
use fleetvault_common::protocol::{Begin, Commit, Request, Response};
use fleetvault_common::{
    ChunkId, ChunkRef, ChunkerParams, Client, ClientError, Credentials, EntryKind, Manifest,
    SnapshotId, SnapshotRecord, StreamManifest, TreeEntry, TreeManifest,
};
use fleetvault_tests::data::{hash_command_output, Rng, MIB};
use fleetvault_tests::report::{find_snapshot, snapshot_id, str_field, u64_field};
use fleetvault_tests::{scratch, wait_until, CommandSource, Coordinator};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// A raw client holding the certificate in `dir` (`ca.pem`, `NAME.pem`, `NAME.key`).
async fn connect(coordinator: &Coordinator, dir: &Path, name: &str) -> anyhow::Result<Client> {
    let creds = Credentials::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )?;
    let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
    Ok(Client::connect(&creds, addr, "localhost", "hostile-test/0").await?)
}

/// A coordinator whose collections delete every unreferenced chunk, however young.
fn coordinator_with_gc_age_zero(extra: &str) -> anyhow::Result<Coordinator> {
    let c = Coordinator::init()?;
    c.append_config(&format!("gc_min_age_secs = 0\n{extra}"))?;
    Ok(c)
}

/// Restarts `c` with fault switch `var=value` in its environment.
fn serve_with_fault(c: &mut Coordinator, var: &str, value: &str) -> anyhow::Result<()> {
    std::env::set_var(var, value);
    let served = c.serve();
    std::env::remove_var(var);
    served
}

async fn begin(
    client: &Client,
    source: &str,
) -> anyhow::Result<(SnapshotId, Option<SnapshotRecord>)> {
    let begin = Begin {
        source: source.into(),
        kind: "files".into(),
        chunker: ChunkerParams::default(),
        job: None,
        tags: Vec::new(),
    };
    Ok(client.begin(begin).await?)
}

async fn put(client: &Client, snapshot: SnapshotId, chunks: &[&[u8]]) -> anyhow::Result<()> {
    let sealed = chunks
        .iter()
        .map(|c| (ChunkId::of(c), seal(c, 1)))
        .collect();
    client.put_chunks(snapshot, sealed).await?;
    Ok(())
}

/// Uploads a one-file tree manifest whose file is `data` (its chunk NOT uploaded here) and
/// commits it.
async fn commit_tree(
    client: &Client,
    snapshot: SnapshotId,
    data: &[u8],
    mtime: i64,
) -> Result<Response, ClientError> {
    let tree = TreeManifest {
        entries: vec![TreeEntry {
            path: b"srv/data.bin".to_vec(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: 0,
            size: data.len() as u64,
            inode: 42,
            target: None,
            chunks: vec![ChunkRef {
                id: ChunkId::of(data),
                len: data.len() as u32,
            }],
        }],
    };
    let bytes = Manifest::Tree(tree).encode();
    put(client, snapshot, &[&bytes])
        .await
        .map_err(|e| client.lost(e))?;
    let commit = Commit {
        snapshot,
        root: StreamManifest {
            chunks: vec![ChunkRef {
                id: ChunkId::of(&bytes),
                len: bytes.len() as u32,
            }],
            len: bytes.len() as u64,
            checksum: *blake3::hash(&bytes).as_bytes(),
        },
        checksum: None,
        logical_bytes: data.len() as u64,
        chunks: 1,
        warnings: Vec::new(),
    };
    client.call(&Request::Commit(commit)).await
}

fn chunk_file(c: &Coordinator, id: &ChunkId) -> std::path::PathBuf {
    let hex = id.to_hex();
    c.chunks_dir().join(&hex[..2]).join(hex)
}

#[test]
fn gc_keeps_what_a_running_incremental_backup_reuses_from_a_parent_deleted_meanwhile(
) -> anyhow::Result<()> {
    let mut coordinator = coordinator_with_gc_age_zero("")?;
    coordinator.serve()?;
    let agent = coordinator.agent("inc-01")?;
    let data = Rng::new(9).bytes(256 << 10);
    let data_id = ChunkId::of(&data);
    let rt = runtime()?;
    let (parent, second) = rt.block_on(async {
        let client = connect(&coordinator, agent.conf_dir(), "agent").await?;
        let (parent, _) = begin(&client, "tree").await?;
        put(&client, parent, &[&data]).await?;
        let done = commit_tree(&client, parent, &data, 1).await?;
        anyhow::ensure!(matches!(done, Response::Committed(_)), "{done:?}");

        // The next backup is given that parent; its file is unchanged, so the agent reuses
        // the chunk list without asking `Missing` or uploading.
        let (second, given) = begin(&client, "tree").await?;
        anyhow::ensure!(given.as_ref().map(|p| p.id) == Some(parent), "{given:?}");

        // Meanwhile an operator (or retention) deletes the parent, and a collection runs.
        coordinator
            .cli(&["delete", &parent.to_string()])?
            .ensure_success()?;
        let gc = coordinator
            .cli(&["gc", "--json"])?
            .ensure_success()?
            .json()?;
        eprintln!("collection during the backup: {gc}");
        anyhow::ensure!(
            chunk_file(&coordinator, &data_id).exists(),
            "the collection deleted a chunk the running backup reuses from its parent: {gc}"
        );

        let done = commit_tree(&client, second, &data, 2).await;
        anyhow::ensure!(
            matches!(done, Ok(Response::Committed(_))),
            "the incremental backup was refused: {done:?}"
        );
        client.close().await;
        anyhow::Ok((parent, second))
    })?;

    // The deleted parent's own manifest is garbage now; the reused data chunk is not.
    let gc = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(u64_field(&gc, "deleted_chunks")?, 1, "{gc}");
    assert!(chunk_file(&coordinator, &data_id).exists());
    let list = coordinator.snapshots_json(&["--agent", "inc-01"])?;
    assert!(
        find_snapshot(&list, &parent.to_string()).is_err(),
        "{list:?}"
    );
    coordinator
        .cli(&["verify", "--snapshot", &second.to_string()])?
        .ensure_success()?;
    // And after a restart (the catalog and the store agree), it is still whole.
    coordinator.restart()?;
    coordinator
        .cli(&["verify", "--snapshot", &second.to_string()])?
        .ensure_success()?;
    Ok(())
}

#[test]
fn operator_and_scheduled_gc_never_run_at_once() -> anyhow::Result<()> {
    let mut coordinator = coordinator_with_gc_age_zero("gc_schedule = \"* * * * * *\"\n")?;
    let work = scratch("gc-lock")?;
    let hold = work.path().join("hold");
    std::fs::write(&hold, b"")?;
    serve_with_fault(
        &mut coordinator,
        "FLEETVAULT_FAULT_GC_HOLD_WHILE",
        hold.to_str().expect("utf-8 temp path"),
    )?;
    let serve = coordinator.serve_process().expect("serving");
    // A scheduled collection starts and is held (the lock taken, nothing marked yet).
    serve.wait_for_line("FLEETVAULT_FAULT_GC_HOLD_WHILE", Duration::from_secs(30))?;
    let refused = coordinator.cli(&["gc"])?.ensure_failure()?;
    assert!(
        refused.contains("a garbage collection is already running"),
        "{refused}"
    );
    // The next scheduled occurrences find it running too, and are skipped with a log line.
    wait_until(
        "a skipped scheduled collection",
        Duration::from_secs(30),
        || {
            Ok(serve
                .log_text()
                .contains("garbage collection already running"))
        },
    )?;
    std::fs::remove_file(&hold)?;
    // Free again: an operator's collection runs (it may meet a scheduled one, and retries).
    wait_until("an operator's collection", Duration::from_secs(60), || {
        let out = coordinator.cli(&["gc", "--json"])?;
        if out.success() {
            return Ok(true);
        }
        let text = out.to_string();
        anyhow::ensure!(text.contains("already running"), "{text}");
        Ok(false)
    })?;
    Ok(())
}

#[test]
fn crash_between_store_record_and_catalog_leaves_them_agreeing() -> anyhow::Result<()> {
    let mut coordinator = coordinator_with_gc_age_zero("")?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("commit-crash")?;
    let file = work.path().join("dump.bin");
    fleetvault_tests::data::write_random_file(&file, 3 * MIB, 5)?;
    let command = format!(
        "cat {}",
        fleetvault_tests::shell_quote(&file.to_string_lossy())
    );
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: command.clone(),
        ..CommandSource::default()
    })?;
    serve_with_fault(&mut coordinator, "FLEETVAULT_FAULT_COMMIT_CRASH", "1")?;
    let out = agent.backup("dump")?;
    assert!(!out.success(), "the commit should have been cut off: {out}");
    coordinator
        .serve_process()
        .expect("serving")
        .wait_for_line("FLEETVAULT_FAULT_COMMIT_CRASH", Duration::from_secs(30))?;
    let _ = coordinator.kill9();
    coordinator.serve()?;

    // The store has the snapshot's record: the catalog says completed, not failed.
    let list = coordinator.snapshots_json(&["--source", "dump"])?;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["status"], "completed", "{list:?}");
    let id = str_field(&list[0], "id")?.to_owned();
    // A collection keeps its chunks, and it restores to the original bytes.
    let gc = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(u64_field(&gc, "deleted_chunks")?, 0, "{gc}");
    let restored = work.path().join("restored.bin");
    agent.restore_to_stdout(&id, &restored)?.ensure_success()?;
    let (expected, _) = hash_command_output(&command)?;
    assert_eq!(fleetvault_tests::data::hash_file(&restored)?, expected);
    // The next backup of the same data is incremental against it and completes.
    let next = snapshot_id(&agent.backup_json("dump")?)?;

    // A catalog rebuilt from the store alone lists the same completed snapshots.
    let completed = |c: &Coordinator| -> anyhow::Result<Vec<String>> {
        let mut ids: Vec<String> = c
            .snapshots_json(&["--status", "completed"])?
            .iter()
            .map(|s| str_field(s, "id").map(str::to_owned))
            .collect::<anyhow::Result<_>>()?;
        ids.sort();
        Ok(ids)
    };
    let before = completed(&coordinator)?;
    assert_eq!(before, {
        let mut v = vec![id, next];
        v.sort();
        v
    });
    coordinator.stop()?;
    coordinator.cli(&["rebuild-catalog"])?.ensure_success()?;
    coordinator.serve()?;
    assert_eq!(completed(&coordinator)?, before);
    Ok(())
}

#[test]
fn peer_snapshot_ids_the_counter_cannot_pass_are_refused() -> anyhow::Result<()> {
    let replica = Coordinator::start()?;
    let work = scratch("peer-ids")?;
    let out = work.path().join("peer");
    replica
        .cli(&[
            "issue-peer",
            "main",
            "--replica-name",
            "offsite",
            "--out",
            out.to_str().expect("utf-8 temp path"),
        ])?
        .ensure_success()?;
    let rt = runtime()?;
    rt.block_on(async {
        let client = connect(&replica, &out, "peer").await?;
        let far = SnapshotId((u64::MAX >> 12) << 12);
        for id in [SnapshotId(u64::MAX), far] {
            match client.replica_begin(id).await {
                Err(ClientError::Remote { message, .. }) => {
                    assert!(message.contains("out of range"), "{message}");
                    assert!(message.contains(&id.to_string()), "{message}");
                }
                other => anyhow::bail!("snapshot id {id} accepted: {other:?}"),
            }
        }
        client.close().await;
        anyhow::Ok(())
    })?;
    // The replica's own ids still work.
    let agent = replica.agent("local-01")?;
    agent.add_command_source(&CommandSource {
        name: "small".into(),
        backup_command: "head -c 100000 /dev/urandom".into(),
        ..CommandSource::default()
    })?;
    snapshot_id(&agent.backup_json("small")?)?;
    Ok(())
}

#[test]
fn store_and_catalog_are_private_to_the_coordinator() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("priv-01")?;
    agent.add_command_source(&CommandSource {
        name: "small".into(),
        backup_command: "head -c 300000 /dev/urandom".into(),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("small")?)?;
    let mode = |p: &Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777)
    };
    let data = coordinator.data_dir();
    let store = data.join("store");
    for dir in [
        store.clone(),
        store.join("chunks"),
        store.join("chunks").join("00"),
        store.join("chunks").join("ff"),
        store.join("snapshots"),
        store.join("tmp"),
        data.join("catalog"),
    ] {
        assert_eq!(mode(&dir)?, 0o700, "{}", dir.display());
    }
    let chunks = coordinator.chunk_files()?;
    assert!(!chunks.is_empty());
    for f in chunks {
        assert_eq!(mode(&f)?, 0o600, "{}", f.display());
    }
    let record = store.join("snapshots").join(format!("{id}.snap"));
    assert_eq!(mode(&record)?, 0o600, "{}", record.display());
    Ok(())
}
