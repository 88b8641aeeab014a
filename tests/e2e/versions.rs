//! Protocol versions: a coordinator serves an agent one version behind (the fleet is upgraded
//! one host at a time) and refuses a peer outside its range in one line naming both versions.
//!
//! The version-1 agent is played by a test client built from the message definitions version 1
//! still has in `protocol` (its restore push shapes are kept as [`PushFrame::V1Restore`] and
//! [`PushFrame::V1RestoreInto`]): building the real agent of the last version-1 commit would
//! cost a second full build of the workspace, far more than CI's budget for one test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fleetvault_common::protocol::frame::{read_frame, write_frame};
use fleetvault_common::protocol::{
    PushFrame, PushReply, SourceInfo, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use fleetvault_common::{Client, ClientError, Credentials, JobReport, SnapshotId};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{scratch, Coordinator};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Connects with the agent certificate in `dir`, saying `protocol` in the hello.
async fn connect_speaking(dir: &Path, port: u16, protocol: u32) -> Result<Client, ClientError> {
    let creds = Credentials::load(
        &dir.join("ca.pem"),
        &dir.join("agent.pem"),
        &dir.join("agent.key"),
    )
    .map_err(|e| ClientError::Connect(e.to_string()))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    Client::connect_speaking(&creds, addr, "localhost", "agent-v1-test/0", protocol).await
}

/// A version-1 agent: registers, answers `pushes` pushed restores as version 1 did (progress,
/// then a completed report) and returns the frames it was sent.
fn version_1_agent(
    dir: PathBuf,
    port: u16,
    pushes: usize,
    registered: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<PushFrame>> {
    runtime()?.block_on(async {
        let client = connect_speaking(&dir, port, 1).await?;
        anyhow::ensure!(client.protocol() == 1, "spoken: {}", client.protocol());
        let files = SourceInfo {
            name: "files".into(),
            kind: "files".into(),
        };
        client.register(vec![files]).await?;
        registered.send(())?;
        let mut seen = Vec::new();
        for _ in 0..pushes {
            let accepted = client.connection().accept_bi();
            let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(60), accepted)
                .await
                .context("no push within 60 s")??;
            let push: PushFrame = read_frame(&mut recv).await?.context("empty push")?;
            let snapshot = match &push {
                PushFrame::V1Restore { snapshot, .. }
                | PushFrame::V1RestoreInto { snapshot, .. } => *snapshot,
                other => anyhow::bail!("not a version-1 restore: {other:?}"),
            };
            let progress = fleetvault_common::protocol::Progress {
                bytes: 1,
                total: Some(1),
            };
            write_frame(&mut send, &PushReply::Progress(progress)).await?;
            let report = JobReport {
                snapshot_id: snapshot.to_string(),
                status: "completed".into(),
                agent: "legacy-01".into(),
                restored_to: Some("version 1".into()),
                ..JobReport::default()
            };
            write_frame(&mut send, &PushReply::Done(report)).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            seen.push(push);
        }
        client.close().await;
        Ok(seen)
    })
}

#[test]
fn an_agent_one_version_behind_answers_restore_pushes_in_its_own_shapes() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let current = coordinator.agent("current-01")?;
    let legacy = coordinator.agent("legacy-01")?;
    let work = scratch("versions")?;
    let tree = work.path().join("data");
    std::fs::create_dir_all(&tree)?;
    std::fs::write(tree.join("a.txt"), b"one version behind")?;
    current.add_files_source("files", &[&tree], &[])?;
    let id = snapshot_id(&current.backup_json("files")?)?;

    let (registered, ready) = std::sync::mpsc::channel();
    let (dir, port) = (legacy.conf_dir().to_owned(), coordinator.port());
    let v1 = std::thread::spawn(move || version_1_agent(dir, port, 2, registered));
    ready
        .recv_timeout(Duration::from_secs(60))
        .context("the version-1 agent did not register")?;

    // The plain form, then one with options: version 1 had a message for each.
    let target = work.path().join("restored").to_string_lossy().into_owned();
    let plain = coordinator.push_restore(&id, "legacy-01", Some(&target))?;
    assert_eq!(plain["status"], "completed", "{plain}");
    let into = coordinator
        .cli(&[
            "restore",
            &id,
            "--agent",
            "legacy-01",
            "--source",
            "files",
            "--json",
        ])?
        .ensure_success()?
        .json()?;
    assert_eq!(into["status"], "completed", "{into}");

    let seen = v1.join().expect("version-1 agent thread")?;
    let snapshot: SnapshotId = id.parse()?;
    assert_eq!(
        seen,
        vec![
            PushFrame::V1Restore {
                snapshot,
                target: Some(target),
            },
            PushFrame::V1RestoreInto {
                snapshot,
                options: fleetvault_common::protocol::RestoreOptions {
                    source: Some("files".into()),
                    ..Default::default()
                },
            },
        ]
    );
    Ok(())
}

#[test]
fn peers_outside_the_version_range_are_refused_naming_both_versions() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("outside-01")?;
    let rt = runtime()?;
    for version in [PROTOCOL_VERSION + 1, MIN_PROTOCOL_VERSION - 1] {
        let refused = rt.block_on(connect_speaking(
            agent.conf_dir(),
            coordinator.port(),
            version,
        ));
        let Err(err) = refused else {
            anyhow::bail!("version {version} was served");
        };
        assert_eq!(
            err.exit_class(),
            Some(fleetvault_common::exit::REFUSED),
            "{err}"
        );
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.contains(&format!("protocol version {version} "))
                && text.contains(&PROTOCOL_VERSION.to_string()),
            "{text}"
        );
    }
    Ok(())
}
