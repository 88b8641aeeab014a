//! A hostile agent that sends lying data, driven by hand over a real mTLS connection: a
//! bundle index naming another host's snapshot is refused at commit; commit replies and
//! upload counts are the same whether or not another host stored a chunk; a manifest whose
//! chunk lengths or checksum lie is refused at commit, and the chunks it shares with other
//! hosts stay healthy; one snapshot whose manifest cannot be read stops no one else's garbage
//! collection.

use fleetvault_common::chunk::seal;
use fleetvault_common::protocol::{Begin, Commit, ErrorCode, Request, Response};
use fleetvault_common::{
    ChunkId, ChunkRef, ChunkerParams, Client, ClientError, Credentials, Manifest, SnapshotId,
    SnapshotRecord, StreamManifest,
};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{Agent, CommandSource, Coordinator};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

async fn connect(coordinator: &Coordinator, agent: &Agent) -> anyhow::Result<Client> {
    let dir = agent.conf_dir();
    let creds = Credentials::load(
        &dir.join("ca.pem"),
        &dir.join("agent.pem"),
        &dir.join("agent.key"),
    )?;
    let addr = format!("127.0.0.1:{}", coordinator.port()).parse()?;
    Ok(Client::connect(&creds, addr, "localhost", "hostile-trust-test/0").await?)
}

/// An honest agent's one-chunk command source printing `data`, backed up once.
fn honest_backup(agent: &Agent, source: &str, data: &str) -> anyhow::Result<String> {
    agent.add_command_source(&CommandSource {
        name: source.into(),
        backup_command: format!("printf '%s' '{data}'"),
        ..CommandSource::default()
    })?;
    snapshot_id(&agent.backup_json(source)?)
}

/// A one-chunk stream of `data`, as an agent describes it.
fn stream(data: &[u8]) -> StreamManifest {
    StreamManifest {
        chunks: vec![ChunkRef {
            id: ChunkId::of(data),
            len: data.len() as u32,
        }],
        len: data.len() as u64,
        checksum: *blake3::hash(data).as_bytes(),
    }
}

async fn begin(client: &Client, source: &str, kind: &str) -> anyhow::Result<SnapshotId> {
    let begin = Begin {
        source: source.into(),
        kind: kind.into(),
        chunker: ChunkerParams::default(),
        job: None,
        tags: Vec::new(),
    };
    Ok(client.begin(begin).await?.0)
}

/// Uploads `chunks` (each its own content's chunk); returns what `Stored` says is new.
async fn put(client: &Client, snapshot: SnapshotId, chunks: &[&[u8]]) -> anyhow::Result<u32> {
    let sealed = chunks
        .iter()
        .map(|c| (ChunkId::of(c), seal(c, 3)))
        .collect();
    Ok(client.put_chunks(snapshot, sealed).await?)
}

async fn commit(
    client: &Client,
    snapshot: SnapshotId,
    root: StreamManifest,
    checksum: Option<[u8; 32]>,
) -> Result<Response, ClientError> {
    client
        .call(&Request::Commit(Commit {
            snapshot,
            root,
            checksum,
            logical_bytes: 0,
            chunks: 0,
            warnings: Vec::new(),
        }))
        .await
}

/// Uploads `manifest`'s encoding as the snapshot's one manifest chunk and commits it.
async fn commit_manifest(
    client: &Client,
    snapshot: SnapshotId,
    manifest: &Manifest,
    checksum: Option<[u8; 32]>,
) -> anyhow::Result<Result<Response, ClientError>> {
    let encoded = manifest.encode();
    put(client, snapshot, &[&encoded]).await?;
    Ok(commit(client, snapshot, stream(&encoded), checksum).await)
}

/// The refusal of a commit, which must be a `BadRequest`.
fn refusal(reply: Result<Response, ClientError>) -> anyhow::Result<String> {
    match reply {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            Ok(message)
        }
        other => anyhow::bail!("commit not refused: {other:?}"),
    }
}

fn committed(reply: Result<Response, ClientError>) -> anyhow::Result<SnapshotRecord> {
    match reply {
        Ok(Response::Committed(rec)) => Ok(rec),
        other => anyhow::bail!("commit refused: {other:?}"),
    }
}

/// Backs up `data` as a stream snapshot of `source`, honestly; returns the record.
async fn own_stream(
    client: &Client,
    source: &str,
    kind: &str,
    data: &[u8],
) -> anyhow::Result<SnapshotRecord> {
    let s = begin(client, source, kind).await?;
    put(client, s, &[data]).await?;
    let m = stream(data);
    let sum = m.checksum;
    committed(commit_manifest(client, s, &Manifest::Stream(m), Some(sum)).await?)
}

fn bundle_index(ids: &[String]) -> Vec<u8> {
    let parts: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| serde_json::json!({ "name": format!("part{i}"), "kind": "command", "snapshot_id": id }))
        .collect();
    serde_json::to_vec(&serde_json::json!({ "bundle": "app", "parts": parts }))
        .expect("json serialises")
}

#[test]
fn a_bundle_naming_another_hosts_snapshot_is_refused_at_commit() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let victim = coordinator.agent("victim-01")?;
    let victim_id = honest_backup(&victim, "db", "the victim database")?;
    let evil = coordinator.agent("evil-01")?;
    let rt = runtime()?;
    let bundle_id = rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let own = own_stream(&client, "own", "command", b"evil's own part").await?;
        let own_id = own.id.to_string();
        let ghost = SnapshotId(victim_id.parse::<SnapshotId>()?.0 + 1_000_000).to_string();
        let mut refusals = Vec::new();
        for listed in [&victim_id, &ghost] {
            let index = bundle_index(&[own_id.clone(), listed.clone()]);
            let s = begin(&client, "app", "bundle").await?;
            put(&client, s, &[&index]).await?;
            let m = stream(&index);
            let sum = m.checksum;
            let message =
                refusal(commit_manifest(&client, s, &Manifest::Stream(m), Some(sum)).await?)?;
            assert!(
                message.contains(listed.as_str())
                    && message.contains("not a completed snapshot of agent evil-01"),
                "{message}"
            );
            refusals.push(
                message
                    .replace(&s.to_string(), "S")
                    .replace(listed.as_str(), "P"),
            );
        }
        // Another host's snapshot and one that does not exist: the same refusal.
        assert_eq!(refusals[0], refusals[1]);
        // A bundle of the agent's own parts is accepted.
        let index = bundle_index(&[own_id]);
        let s = begin(&client, "app", "bundle").await?;
        put(&client, s, &[&index]).await?;
        let m = stream(&index);
        let sum = m.checksum;
        let bundle =
            committed(commit_manifest(&client, s, &Manifest::Stream(m), Some(sum)).await?)?;
        client.close().await;
        anyhow::Ok(bundle.id.to_string())
    })?;
    // The operator deletes the hostile agent's bundle: the other host's snapshot stays, whole.
    coordinator.cli(&["delete", &bundle_id])?.ensure_success()?;
    let listed = coordinator.snapshots_json(&["--agent", "victim-01"])?;
    assert!(
        listed
            .iter()
            .any(|s| s["id"] == victim_id.as_str() && s["status"] == "completed"),
        "{listed:?}"
    );
    let refused = coordinator.snapshots_json(&["--agent", "evil-01", "--source", "app"])?;
    assert!(
        refused.iter().all(|s| s["status"] != "completed"),
        "{refused:?}"
    );
    coordinator
        .cli(&["verify", "--snapshot", &victim_id])?
        .ensure_success()?;
    Ok(())
}

#[test]
fn replies_are_the_same_whether_or_not_another_host_stored_a_chunk() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let victim = coordinator.agent("victim-01")?;
    let secret = "victim secret: the payroll file";
    honest_backup(&victim, "payroll", secret)?;
    let stored = ChunkId::of(secret.as_bytes());
    let absent = ChunkId::of(b"no host ever stored this");
    let evil = coordinator.agent("evil-01")?;
    let rt = runtime()?;
    rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let len = secret.len() as u32;
        let normal = |m: &str, s: SnapshotId, id: ChunkId| {
            m.replace(&s.to_string(), "S").replace(&id.to_hex(), "C")
        };
        // The chunk named as the manifest's own, and as the manifest's data.
        let mut as_root = Vec::new();
        let mut as_data = Vec::new();
        for id in [stored, absent] {
            let s = begin(&client, "probe", "command").await?;
            let root = StreamManifest {
                chunks: vec![ChunkRef { id, len }],
                len: u64::from(len),
                checksum: *blake3::hash(secret.as_bytes()).as_bytes(),
            };
            let m = refusal(commit(&client, s, root, None).await)?;
            as_root.push(normal(&m, s, id));

            let s = begin(&client, "probe", "command").await?;
            let data = StreamManifest {
                chunks: vec![ChunkRef { id, len }],
                len: u64::from(len),
                checksum: *blake3::hash(secret.as_bytes()).as_bytes(),
            };
            let sum = data.checksum;
            let m =
                refusal(commit_manifest(&client, s, &Manifest::Stream(data), Some(sum)).await?)?;
            as_data.push(normal(&m, s, id));
        }
        assert_eq!(as_root[0], as_root[1]);
        assert_eq!(as_data[0], as_data[1]);

        // Uploading content another host stored counts as new for this agent, as content
        // nobody stored does; once proven it is not new again.
        let s = begin(&client, "upload", "command").await?;
        assert_eq!(put(&client, s, &[secret.as_bytes()]).await?, 1);
        assert_eq!(put(&client, s, &[b"content nobody stored"]).await?, 1);
        assert_eq!(put(&client, s, &[secret.as_bytes()]).await?, 0);
        // (Its manifest is the one the probes above uploaded already on this connection.)
        let m = Manifest::Stream(stream(secret.as_bytes()));
        let sum = stream(secret.as_bytes()).checksum;
        let rec = committed(commit_manifest(&client, s, &m, Some(sum)).await?)?;
        assert_eq!(rec.new_chunks, 2, "{rec:?}");
        assert_eq!(
            rec.new_bytes,
            (secret.len() + b"content nobody stored".len()) as u64,
            "{rec:?}"
        );
        client.close().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn lying_chunk_lengths_and_checksums_are_refused_at_commit() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let victim = coordinator.agent("victim-01")?;
    let shared = "shared: a file every host has";
    let victim_id = honest_backup(&victim, "etc", shared)?;
    let evil = coordinator.agent("evil-01")?;
    let rt = runtime()?;
    rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let honest = stream(shared.as_bytes());

        // A data chunk said to be longer than it is (the stream's length agreeing).
        let s = begin(&client, "etc", "command").await?;
        put(&client, s, &[shared.as_bytes()]).await?;
        let mut lie = honest.clone();
        lie.chunks[0].len += 5;
        lie.len += 5;
        let sum = lie.checksum;
        let m = refusal(commit_manifest(&client, s, &Manifest::Stream(lie), Some(sum)).await?)?;
        assert!(m.contains("holds"), "{m}");

        // The manifest's own chunk said to be longer than it is.
        let s = begin(&client, "etc", "command").await?;
        put(&client, s, &[shared.as_bytes()]).await?;
        let encoded = Manifest::Stream(honest.clone()).encode();
        put(&client, s, &[&encoded]).await?;
        let mut root = stream(&encoded);
        root.chunks[0].len += 1;
        let m = refusal(commit(&client, s, root, Some(honest.checksum)).await)?;
        assert!(m.contains("holds"), "{m}");

        // A checksum that is not the manifest's.
        let s = begin(&client, "etc", "command").await?;
        put(&client, s, &[shared.as_bytes()]).await?;
        let m = refusal(
            commit_manifest(&client, s, &Manifest::Stream(honest.clone()), Some([7; 32])).await?,
        )?;
        assert!(m.contains("checksum"), "{m}");

        // The truth is accepted.
        let s = begin(&client, "etc", "command").await?;
        put(&client, s, &[shared.as_bytes()]).await?;
        let sum = honest.checksum;
        committed(commit_manifest(&client, s, &Manifest::Stream(honest), Some(sum)).await?)?;
        client.close().await;
        anyhow::Ok(())
    })?;
    // Every snapshot verifies and the shared chunk is where it was.
    coordinator.cli(&["verify"])?.ensure_success()?;
    let hex = ChunkId::of(shared.as_bytes()).to_hex();
    assert!(coordinator.chunks_dir().join(&hex[..2]).join(&hex).exists());
    let out = victim.restore_to_stdout(&victim_id, &coordinator.data_dir().join("etc.out"))?;
    out.ensure_success()?;
    assert_eq!(
        std::fs::read_to_string(coordinator.data_dir().join("etc.out"))?,
        shared
    );
    Ok(())
}

#[test]
fn gc_collects_for_everyone_else_when_one_snapshots_manifest_is_unreadable() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config("gc_min_age_secs = 0\n")?;
    coordinator.serve()?;
    let broken = coordinator.agent("broken-01")?;
    let data = "the broken host data";
    let before = coordinator.chunk_files()?;
    let broken_id = honest_backup(&broken, "db", data)?;
    let data_hex = ChunkId::of(data.as_bytes()).to_hex();
    // Its manifest chunk goes (a disk lost it, or a hostile record never had a readable one).
    let manifest_chunk = coordinator
        .chunk_files()?
        .into_iter()
        .find(|p| !before.contains(p) && !p.ends_with(&data_hex))
        .ok_or_else(|| anyhow::anyhow!("no manifest chunk"))?;
    std::fs::remove_file(&manifest_chunk)?;

    let other = coordinator.agent("other-01")?;
    let before = coordinator.chunk_files()?;
    let gone = honest_backup(&other, "tmp", "data deleted since")?;
    let garbage: Vec<_> = coordinator
        .chunk_files()?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(garbage.len(), 2, "{garbage:?}");
    coordinator.cli(&["delete", &gone])?.ensure_success()?;

    let report = coordinator
        .cli(&["gc", "--json"])?
        .ensure_success()?
        .json()?;
    assert_eq!(
        report["unreadable"],
        serde_json::json!([broken_id.clone()]),
        "{report}"
    );
    assert!(report["deleted_chunks"].as_u64() >= Some(2), "{report}");
    assert!(garbage.iter().all(|p| !p.exists()), "garbage left");
    // What the unreadable snapshot may still need is kept.
    let hex = &data_hex;
    assert!(coordinator.chunks_dir().join(&hex[..2]).join(hex).exists());
    Ok(())
}
