//! A hostile agent with a valid certificate cannot exhaust the coordinator: its connections,
//! request streams, stalled hellos and requests, oversized strings, never-ending pushed jobs
//! and piles of failed runs are each refused or cut off with the reason (and a log line naming
//! it), while an honest agent's backups keep succeeding.

use std::time::{Duration, Instant};

use fleetvault_common::protocol::frame::{read_frame, write_frame};
use fleetvault_common::protocol::{
    close, Begin, ErrorCode, ReadPart, Request, Response, SourceInfo,
};
use fleetvault_common::{
    ChunkId, ChunkerParams, Client, ClientError, Credentials, ReadItem, SnapshotId,
};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{bin, run, Agent, CommandSource, Coordinator, COMMAND_TIMEOUT};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn creds(agent: &Agent) -> anyhow::Result<Credentials> {
    let dir = agent.conf_dir();
    Ok(Credentials::load(
        &dir.join("ca.pem"),
        &dir.join("agent.pem"),
        &dir.join("agent.key"),
    )?)
}

fn addr(coordinator: &Coordinator) -> anyhow::Result<std::net::SocketAddr> {
    Ok(format!("127.0.0.1:{}", coordinator.port()).parse()?)
}

async fn connect(coordinator: &Coordinator, agent: &Agent) -> Result<Client, ClientError> {
    let creds = creds(agent).map_err(|e| ClientError::Connect(e.to_string()))?;
    let addr = addr(coordinator).map_err(|e| ClientError::Connect(e.to_string()))?;
    Client::connect(&creds, addr, "localhost", "hostile-limits/0").await
}

fn begin(source: &str, kind: &str, job: Option<&str>, tags: Vec<String>) -> Request {
    Request::Begin(Begin {
        source: source.into(),
        kind: kind.into(),
        chunker: ChunkerParams::default(),
        job: job.map(str::to_owned),
        tags,
    })
}

/// A refused request's message.
async fn refused(client: &Client, req: &Request) -> anyhow::Result<String> {
    match client.call(req).await {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            Ok(message)
        }
        other => anyhow::bail!("request not refused: {other:?}"),
    }
}

fn honest_agent(coordinator: &Coordinator, name: &str) -> anyhow::Result<Agent> {
    let honest = coordinator.agent(name)?;
    honest.add_command_source(&CommandSource {
        name: "data".into(),
        backup_command: "head -c 3000000 /dev/urandom".into(),
        ..CommandSource::default()
    })?;
    Ok(honest)
}

#[test]
fn one_certificate_cannot_exhaust_connections_streams_or_hellos() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let evil = coordinator.agent("evil-01")?;
    let honest = honest_agent(&coordinator, "honest-01")?;
    let rt = runtime()?;
    let held = rt.block_on(async {
        // Connections: up to the per-identity limit, then refused with the reason.
        let mut held = Vec::new();
        let refusal = loop {
            match connect(&coordinator, &evil).await {
                Ok(c) => held.push(c),
                Err(e) => break e.to_string(),
            }
            anyhow::ensure!(held.len() <= 64, "64 connections of one identity accepted");
        };
        assert_eq!(held.len(), 16, "connections accepted before the refusal");
        assert!(
            refusal.contains("too many connections for agent/evil-01"),
            "{refusal}"
        );

        // A hello that never completes: the connection is closed within the hello deadline.
        // (One held connection makes room for it first.)
        held.pop().expect("connections held").close().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let endpoint = fleetvault_common::client_endpoint(&creds(&evil)?)?;
        let raw = fleetvault_common::connect(&endpoint, addr(&coordinator)?, "localhost").await?;
        let (mut send, _recv) = raw.open_bi().await?;
        send.write_all(&[3, 0]).await?;
        let closed = tokio::time::timeout(Duration::from_secs(30), raw.closed()).await?;
        match &closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, quinn::VarInt::from_u32(close::LIMIT_REACHED));
                let reason = String::from_utf8_lossy(&c.reason);
                assert!(reason.contains("no hello within"), "{reason}");
            }
            other => anyhow::bail!("stalled hello not closed with the reason: {other}"),
        }

        // Request streams: at most 64 at once per connection. Each stream here sends one byte
        // of a length prefix and stalls; the client cannot open more than the limit.
        let client = &held[0];
        let conn = client.connection();
        let mut stalled = Vec::new();
        while stalled.len() < 300 {
            let Ok(opened) = tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
            else {
                break;
            };
            let (mut send, recv) = opened?;
            send.write_all(&[1]).await?;
            stalled.push((send, recv));
        }
        assert!(
            (60..=64).contains(&stalled.len()),
            "{} concurrent streams opened on one connection",
            stalled.len()
        );

        // The stalled requests are cut off after the first-frame deadline, each told why.
        for (_send, recv) in &mut stalled {
            let reply =
                tokio::time::timeout(Duration::from_secs(40), read_frame::<Response, _>(recv))
                    .await??;
            match reply {
                Some(Response::Error { message, .. }) => {
                    assert!(message.contains("no complete request within"), "{message}")
                }
                other => anyhow::bail!("stalled stream not cut off with a reason: {other:?}"),
            }
        }
        drop(stalled);
        // The connection itself still serves requests.
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            client.call(&Request::ListSnapshots(Default::default())),
        )
        .await??;
        assert!(matches!(reply, Response::Snapshots(_)), "{reply:?}");

        // Oversized strings are refused with the reason.
        let long = "k".repeat(10_000);
        let message = refused(client, &begin("s", &long, None, Vec::new())).await?;
        assert!(
            message.contains("snapshot kind of 10000 bytes is too long"),
            "{message}"
        );
        let message = refused(client, &begin("s", "command", Some(&long), Vec::new())).await?;
        assert!(message.contains("job name of 10000 bytes"), "{message}");
        let tags = vec!["t".to_owned(); 1000];
        let message = refused(client, &begin("s", "command", None, tags)).await?;
        assert!(message.contains("1000 tags"), "{message}");
        let sources = (0..5000)
            .map(|i| SourceInfo {
                name: format!("s{i}"),
                kind: "command".into(),
            })
            .collect();
        let message = refused(client, &Request::Register { sources }).await?;
        assert!(message.contains("5000 sources"), "{message}");
        // A request frame over the limit closes that connection as a protocol error.
        let sources: Vec<SourceInfo> = (0..300)
            .map(|i| SourceInfo {
                name: format!("{i:0>40000}"),
                kind: "command".into(),
            })
            .collect();
        let victim = held.pop().expect("connections held");
        let (mut send, _recv) = victim.connection().open_bi().await?;
        let _ = write_frame(&mut send, &Request::Register { sources }).await;
        let closed =
            tokio::time::timeout(Duration::from_secs(20), victim.connection().closed()).await?;
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == quinn::VarInt::from_u32(close::PROTOCOL_ERROR)
                    && String::from_utf8_lossy(&c.reason).contains("exceeds the limit")),
            "oversized request not refused: {closed}"
        );
        anyhow::Ok(held)
    })?;

    // Meanwhile (the hostile connections still open) an honest agent backs up and restores.
    let report = honest.backup_json("data")?;
    assert_eq!(report["status"], "completed", "{report}");
    let id = snapshot_id(&report)?;
    let out = tempfile::NamedTempFile::new()?;
    honest
        .restore_to_stdout(&id, out.path())?
        .ensure_success()?;
    assert_eq!(std::fs::metadata(out.path())?.len(), 3_000_000);
    rt.block_on(async {
        for c in held {
            c.close().await;
        }
    });

    let log = coordinator.serve_log();
    for line in [
        "too many connections for agent/evil-01",
        "request stream cut off",
        "request refused: over a limit",
        "no hello within",
    ] {
        assert!(
            log.contains(line),
            "no {line:?} in the coordinator's log:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("connection refused") && l.contains("agent/evil-01")),
        "the refusal does not name the identity:\n{log}"
    );
    Ok(())
}

#[test]
fn a_pushed_job_past_its_deadline_frees_its_backup_slot() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config("max_concurrent_backups = 1\njob_timeout_secs = 4\n")?;
    coordinator.serve()?;
    let evil = coordinator.agent("evil-02")?;
    let honest = honest_agent(&coordinator, "honest-02")?;
    let _link = honest.run()?;
    let rt = runtime()?;
    // The hostile agent registers a source and accepts pushed jobs, never answering them.
    let client = rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let sources = vec![SourceInfo {
            name: "db".into(),
            kind: "command".into(),
        }];
        client.register(sources).await?;
        anyhow::Ok(client)
    })?;
    let conn = client.connection().clone();
    rt.spawn(async move {
        let mut hold = Vec::new();
        while let Ok(stream) = conn.accept_bi().await {
            hold.push(stream);
        }
    });
    coordinator.wait_agent_connected("evil-02", Duration::from_secs(30))?;
    coordinator.wait_agent_connected("honest-02", Duration::from_secs(60))?;

    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(bin("fleetvault-coordinator")?);
        cmd.args(["backup", "--agent", "evil-02", "--source", "db", "--json"])
            .arg("--data-dir")
            .arg(coordinator.data_dir());
        let stuck = scope.spawn(move || run(&mut cmd, COMMAND_TIMEOUT));
        // Let the stuck job take the only slot, then ask for an honest backup.
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let report = coordinator.push_backup("honest-02", "data")?;
        assert_eq!(report["status"], "completed", "{report}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "honest backup waited {:?}",
            started.elapsed()
        );
        let out = stuck.join().expect("cli thread")?;
        let message = out.ensure_failure()?;
        assert!(
            message.contains("did not finish the job within 4 s"),
            "{message}"
        );
        Ok(())
    })?;
    coordinator.wait_for_log_line("a log line naming the agent", |l| {
        l.contains("pushed job timed out") && l.contains("evil-02")
    })?;
    rt.block_on(client.close());
    Ok(())
}

#[test]
fn a_bad_job_timeout_is_refused_at_start() -> anyhow::Result<()> {
    let coordinator = Coordinator::init()?;
    coordinator.append_config("job_timeout_secs = 0\n")?;
    let err = coordinator.cli(&["serve"])?.ensure_failure()?;
    assert!(
        err.contains("key `job_timeout_secs`: 0 is not between 1 and 2592000 seconds"),
        "{err}"
    );
    Ok(())
}

#[test]
fn retention_prunes_failed_runs_and_gc_prunes_chunk_refs() -> anyhow::Result<()> {
    let mut coordinator = Coordinator::init()?;
    coordinator.append_config(
        "\n[[jobs]]\nname = \"nightly\"\nagents = [\"evil-*\"]\nschedule = \"0 2 * * *\"\n[jobs.retention]\nkeep_last = 2\n",
    )?;
    coordinator.serve()?;
    let evil = honest_agent(&coordinator, "evil-03")?;
    let rt = runtime()?;
    // A completed snapshot whose chunks the agent then proves it holds.
    let report = evil.backup_json("data")?;
    let id: SnapshotId = snapshot_id(&report)?.parse()?;
    let ids = rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let (_, mut chunks) = client.read(id, ReadPart::All).await?;
        let mut ids: Vec<ChunkId> = Vec::new();
        loop {
            match chunks.next().await? {
                ReadItem::Chunk { id, .. } => ids.push(id),
                ReadItem::End => break,
                ReadItem::Missing(_) => {}
            }
        }
        // 25 failed runs of one source under the job's name, 4 of another under no job.
        for i in 0..29 {
            let (source, job) = if i < 25 {
                ("s", Some("nightly"))
            } else {
                ("t", None)
            };
            let Response::Begun { snapshot, .. } = client
                .call(&begin(source, "command", job, Vec::new()))
                .await?
            else {
                anyhow::bail!("no Begun");
            };
            client.abort(snapshot, format!("run {i} failed")).await?;
        }
        let missing = client.missing(ids.clone()).await?;
        assert!(missing.is_empty(), "the agent's own chunks are asked again");
        client.close().await;
        anyhow::Ok(ids)
    })?;
    assert!(!ids.is_empty());

    coordinator
        .cli(&["forget", "--job", "nightly", "--json"])?
        .ensure_success()?;
    let list = coordinator.snapshots_json(&["--agent", "evil-03"])?;
    let failed = |source: &str| -> Vec<String> {
        list.iter()
            .filter(|s| s["status"] == "failed" && s["source"] == source)
            .map(|s| s["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(failed("s").len(), 10, "{list:?}");
    assert_eq!(failed("t").len(), 4, "{list:?}");
    // The newest failures are the ones kept.
    let listed = serde_json::to_string(&list)?;
    assert!(listed.contains("run 24 failed"), "{listed}");
    assert!(!listed.contains("run 0 failed"), "{listed}");

    // Once its snapshot is deleted, a collection forgets that the agent held those chunks:
    // asked again, they are missing (to be uploaded anew), not "present".
    coordinator
        .cli(&["delete", &id.to_string()])?
        .ensure_success()?;
    coordinator.cli(&["gc", "--json"])?.ensure_success()?;
    rt.block_on(async {
        let client = connect(&coordinator, &evil).await?;
        let missing = client.missing(ids.clone()).await?;
        assert_eq!(
            missing.len(),
            ids.len(),
            "refs of a deleted snapshot survived GC"
        );
        client.close().await;
        anyhow::Ok(())
    })?;
    let log = coordinator.serve_log();
    assert!(log.contains("chunk refs no snapshot needs pruned"), "{log}");
    Ok(())
}
