//! Restores that a compromised host cannot turn against another: a bundle's files part, made
//! by hand with the hostile agent's certificate, is restored in place on an honest agent only
//! inside the paths that agent backs up under that part's name (nothing outside is created,
//! not through a symlink of the snapshot nor one already on the host); and two restores that
//! used to lose data: names of 236-255 bytes round-trip, and a stream restore that fails
//! midway leaves nothing under its target name.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use fleetvault_common::chunk::seal;
use fleetvault_common::protocol::{Begin, Commit, ReadPart};
use fleetvault_common::{
    ChunkId, ChunkRef, ChunkerParams, Client, Credentials, EntryKind, Manifest, SnapshotId,
    StreamManifest, TreeEntry, TreeManifest,
};
use fleetvault_tests::data::{write_random_file, MIB};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::tree::{ensure_same, restored_path, scan};
use fleetvault_tests::{scratch, shell_quote, Agent, CommandSource, Coordinator};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// A raw protocol client holding `agent`'s certificate.
async fn connect(coordinator: &Coordinator, agent: &Agent) -> anyhow::Result<Client> {
    let dir = agent.conf_dir();
    let creds = Credentials::load(
        &dir.join("ca.pem"),
        &dir.join("agent.pem"),
        &dir.join("agent.key"),
    )?;
    let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
    Ok(Client::connect(&creds, addr, "localhost", "hostile-files-test/0").await?)
}

fn chunk_ref(data: &[u8]) -> ChunkRef {
    ChunkRef {
        id: ChunkId::of(data),
        len: data.len() as u32,
    }
}

/// Commits a snapshot whose manifest and data chunks the test chose (what a compromised host
/// can send): every chunk uploaded, then the manifest as one chunk.
async fn commit(
    client: &Client,
    source: &str,
    kind: &str,
    tags: Vec<String>,
    manifest: &Manifest,
    data: &[&[u8]],
    checksum: Option<[u8; 32]>,
) -> anyhow::Result<SnapshotId> {
    let begin = Begin {
        source: source.into(),
        kind: kind.into(),
        chunker: ChunkerParams::default(),
        job: None,
        tags,
    };
    let (snapshot, _) = client.begin(begin).await?;
    let encoded = manifest.encode();
    let mut chunks: Vec<&[u8]> = data.to_vec();
    chunks.push(&encoded);
    chunks.sort();
    chunks.dedup();
    let sealed = chunks
        .iter()
        .map(|c| (ChunkId::of(c), seal(c, 3)))
        .collect();
    client.put_chunks(snapshot, sealed).await?;
    let commit = Commit {
        snapshot,
        root: StreamManifest {
            chunks: vec![chunk_ref(&encoded)],
            len: encoded.len() as u64,
            checksum: *blake3::hash(&encoded).as_bytes(),
        },
        checksum,
        logical_bytes: 0,
        chunks: data.len() as u64,
        warnings: Vec::new(),
    };
    Ok(client.commit(commit).await?.id)
}

/// The manifest path of an absolute path (its bytes without the leading `/`).
fn mpath(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes()[1..].to_vec()
}

fn tree_entry(path: &Path, kind: EntryKind, content: &[u8], target: Option<&Path>) -> TreeEntry {
    TreeEntry {
        path: mpath(path),
        kind,
        mode: match kind {
            EntryKind::Dir => 0o777,
            EntryKind::File => 0o644,
            EntryKind::Symlink => 0o777,
        },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size: if kind == EntryKind::File {
            content.len() as u64
        } else {
            0
        },
        inode: 0,
        target: target.map(|t| t.as_os_str().as_bytes().to_vec()),
        chunks: if kind == EntryKind::File {
            vec![chunk_ref(content)]
        } else {
            Vec::new()
        },
    }
}

/// Commits, as the hostile agent, a files part `app-data` holding `entries` and a bundle `app`
/// whose index names it; returns the bundle snapshot's id.
async fn hostile_bundle(
    client: &Client,
    entries: Vec<TreeEntry>,
    content: &[u8],
) -> anyhow::Result<SnapshotId> {
    let tree = Manifest::Tree(TreeManifest { entries });
    let part = commit(
        client,
        "app-data",
        "files",
        vec!["bundle:app".into()],
        &tree,
        &[content],
        None,
    )
    .await?;
    let index = serde_json::json!({
        "bundle": "app",
        "profile": null,
        "root": null,
        "config_file": null,
        "parts": [{
            "name": "app-data",
            "kind": "files",
            "snapshot_id": part.to_string(),
            "status": "completed",
            "error": null,
            "bytes_read": content.len(),
            "bytes_uploaded": content.len(),
            "chunks": 1,
            "new_chunks": 1,
            "files_unchanged": 0,
            "database": null,
        }],
        "hooks": [],
    });
    let index = serde_json::to_vec_pretty(&index)?;
    let checksum = *blake3::hash(&index).as_bytes();
    let stream = Manifest::Stream(StreamManifest {
        chunks: vec![chunk_ref(&index)],
        len: index.len() as u64,
        checksum,
    });
    commit(
        client,
        "app",
        "bundle",
        vec!["bundle".into(), format!("part:app-data={part}")],
        &stream,
        &[&index],
        Some(checksum),
    )
    .await
}

/// Everything under `dir`, as paths relative to it.
fn listing(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            out.push(p.strip_prefix(dir)?.display().to_string());
            if std::fs::symlink_metadata(&p)?.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn a_hostile_bundle_files_part_writes_nothing_outside_the_restoring_agents_paths(
) -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let evil = coordinator.agent("evil-01")?;
    let honest = coordinator.agent("honest-01")?;
    let work = scratch("hostile-bundle")?;
    let data = work.path().join("app/data");
    std::fs::create_dir_all(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750))?;
    // Stands for /etc/cron.d on the honest host.
    let outside = work.path().join("etc/cron.d");
    std::fs::create_dir_all(&outside)?;
    // A symlink the honest host itself has inside its tree, leading out of it.
    std::fs::create_dir_all(data.join("var"))?;
    std::os::unix::fs::symlink(&outside, data.join("var/spool"))?;
    honest.add_files_source("app-data", &[&data], &[])?;
    honest.append_config("\n[[bundles]]\nname = \"app\"\nparts = [\"app-data\"]\n")?;

    let evil_job: &[u8] = b"* * * * * root touch /tmp/pwned\n";
    let cases: Vec<(&str, Vec<TreeEntry>, String)> = vec![
        (
            "an entry outside the part's paths",
            vec![
                tree_entry(&data, EntryKind::Dir, b"", None),
                tree_entry(&data.join("ok.txt"), EntryKind::File, evil_job, None),
                tree_entry(&outside.join("evil"), EntryKind::File, evil_job, None),
            ],
            format!("{}", outside.join("evil").display()),
        ),
        (
            "a symlink of the snapshot, then a file through it",
            vec![
                tree_entry(&data, EntryKind::Dir, b"", None),
                tree_entry(&data.join("a"), EntryKind::Symlink, b"", Some(&outside)),
                tree_entry(&data.join("a/evil"), EntryKind::File, evil_job, None),
            ],
            "goes through a symlink".into(),
        ),
        (
            "a file through a symlink already on the host",
            vec![
                tree_entry(&data, EntryKind::Dir, b"", None),
                tree_entry(
                    &data.join("var/spool/evil"),
                    EntryKind::File,
                    evil_job,
                    None,
                ),
            ],
            "not a directory".into(),
        ),
    ];
    let rt = runtime()?;
    let ids = rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let mut ids = Vec::new();
        for (_, entries, _) in &cases {
            ids.push(hostile_bundle(&client, entries.clone(), evil_job).await?);
        }
        client.close().await;
        anyhow::Ok(ids)
    })?;

    let _link = honest.run()?;
    coordinator.wait_agent_connected("honest-01", Duration::from_secs(60))?;
    for ((what, _, why), id) in cases.iter().zip(&ids) {
        let id = id.to_string();
        let stderr = coordinator
            .cli(&["restore", &id, "--agent", "honest-01", "--json"])?
            .ensure_failure()?;
        assert!(stderr.contains(why.as_str()), "{what}: {stderr}");
        assert!(
            listing(&outside)?.is_empty(),
            "{what}: wrote outside: {:?}",
            listing(&outside)?
        );
        // Refused before anything was written, and the existing directory kept its mode.
        assert_eq!(listing(&data)?, ["var", "var/spool"], "{what}");
        let mode = std::fs::metadata(&data)?.permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750, "{what}: the existing directory's mode changed");
    }
    Ok(())
}

#[test]
fn file_names_of_236_to_255_bytes_round_trip() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("names-01")?;
    let work = scratch("long-names")?;
    let src = work.path().join("src");
    let deep = src.join("d".repeat(255));
    std::fs::create_dir_all(&deep)?;
    for len in [236, 250, 255] {
        for dir in [&src, &deep] {
            let name = format!("{len}-{}", "n".repeat(len - 4));
            std::fs::write(dir.join(&name), format!("a name of {len} bytes\n"))?;
        }
    }
    agent.add_files_source("long", &[&src], &[])?;
    let id = snapshot_id(&agent.backup_json("long")?)?;
    let target = work.path().join("restored");
    agent.restore_json(&id, Some(&target))?;
    ensure_same(&scan(&src)?, &scan(&restored_path(&target, &src))?)?;
    Ok(())
}

#[test]
fn a_stream_restore_that_fails_midway_leaves_nothing_under_the_target_name() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("partial")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, 8 * MIB, 41)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("dump")?)?;

    // The stream's last chunk vanishes from the store: the restore fails after writing the rest.
    let snapshot: SnapshotId = id.parse()?;
    let last = runtime()?.block_on(async {
        let client = connect(&coordinator, &agent).await?;
        let read = client.read_snapshot(snapshot, ReadPart::Manifest).await?;
        client.close().await;
        let Manifest::Stream(stream) = read.manifest else {
            anyhow::bail!("not a stream");
        };
        anyhow::ensure!(stream.chunks.len() > 2, "too few chunks: {stream:?}");
        stream
            .chunks
            .last()
            .map(|c| c.id)
            .ok_or_else(|| anyhow::anyhow!("no chunks"))
    })?;
    let victim = coordinator
        .chunk_files()?
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == last.to_hex().as_str()))
        .ok_or_else(|| anyhow::anyhow!("chunk {last} is not in the store"))?;
    std::fs::remove_file(&victim)?;

    let out = work.path().join("out");
    std::fs::create_dir(&out)?;
    let target = out.join("restored.bin");
    let stderr = agent.restore(&id, Some(&target))?.ensure_failure()?;
    assert!(stderr.contains(&last.to_hex()), "{stderr}");
    assert!(
        !target.exists(),
        "a partial file is left under {}",
        target.display()
    );
    assert!(
        listing(&out)?.is_empty(),
        "left behind: {:?}",
        listing(&out)?
    );

    // The same restore with the chunk back (the next backup uploads it again) succeeds whole.
    agent.backup_json("dump")?;
    agent.restore_json(&id, Some(&target))?;
    assert_eq!(std::fs::read(&target)?, std::fs::read(&data)?);
    assert_eq!(listing(&out)?, ["restored.bin"]);
    Ok(())
}
