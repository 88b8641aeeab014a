//! A hostile or broken agent, driven by hand over a real mTLS connection: a chunk whose content
//! does not match its id is refused, and a malformed or oversized frame closes only that
//! connection, with the reason, while the coordinator keeps serving everyone else.

use std::time::Duration;

use fleetvault_common::chunk::seal;
use fleetvault_common::protocol::frame::read_frame;
use fleetvault_common::protocol::{close, Begin, ErrorCode, Request, Response};
use fleetvault_common::{ChunkId, ChunkerParams, Client, ClientError, Credentials};
use fleetvault_tests::{Agent, Coordinator};

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
    Ok(Client::connect(&creds, addr, "localhost", "hostile-test/0").await?)
}

/// Sends `bytes` raw on a new stream and returns how the coordinator closed the connection.
async fn send_raw(client: &Client, bytes: &[u8]) -> anyhow::Result<quinn::ConnectionError> {
    let conn = client.connection();
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await?;
    Ok(closed)
}

fn is_protocol_close(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == quinn::VarInt::from_u32(close::PROTOCOL_ERROR))
}

#[test]
fn forged_chunk_is_refused_and_malformed_frames_close_only_that_connection() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let evil = coordinator.agent("evil-01")?;
    let honest = coordinator.agent("honest-01")?;
    let rt = runtime()?;
    rt.block_on(async {
        // A chunk sent under another chunk's id.
        let client = connect(&coordinator, &evil).await?;
        let begin = Begin {
            source: "forged".into(),
            kind: "command".into(),
            chunker: ChunkerParams::default(),
            job: None,
            tags: Vec::new(),
        };
        let (snapshot, _) = client.begin(begin).await?;
        let claimed = ChunkId::of(b"what other hosts store");
        let forged = vec![(claimed, seal(b"something else entirely", 3))];
        match client.put_chunks(snapshot, forged).await {
            Err(ClientError::Remote { code, message }) => {
                assert_eq!(code, ErrorCode::HashMismatch, "{message}");
                assert!(message.contains(&claimed.to_hex()), "{message}");
            }
            other => anyhow::bail!("forged chunk not refused: {other:?}"),
        }
        // The connection survives a refused chunk; the forged id was not stored.
        let ids = client.missing(vec![claimed]).await?;
        assert_eq!(ids, vec![claimed]);
        client.close().await;

        // A length prefix far over the limit, a body that is not a message, trailing bytes.
        let mut trailing = fleetvault_common::protocol::frame::encode(&Request::ListAgents);
        trailing.push(0);
        let len = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        let cases: [(&str, Vec<u8>); 3] = [
            ("oversized", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
            ("garbage", vec![5, 0, 0, 0, 0xee, 0xee, 0xee, 0xee, 0xee]),
            ("trailing bytes", trailing),
        ];
        for (what, bytes) in cases {
            let client = connect(&coordinator, &evil).await?;
            let closed = send_raw(&client, &bytes).await?;
            assert!(
                is_protocol_close(&closed),
                "{what}: connection not closed as a protocol error: {closed}"
            );
        }

        // Everyone else is still served, on a fresh connection and from the command line.
        let client = connect(&coordinator, &honest).await?;
        let (mut send, mut recv) = client
            .open(&Request::ListSnapshots(Default::default()))
            .await?;
        let _ = send.finish();
        let reply: Option<Response> = read_frame(&mut recv).await?;
        assert!(matches!(reply, Some(Response::Snapshots(_))), "{reply:?}");
        client.close().await;
        anyhow::Ok(())
    })?;
    honest.snapshots_json()?;
    coordinator.wait_for_log_line("a logged reason for the close", |l| {
        l.contains("malformed frame; closing the connection")
    })?;
    // The forged backup never completed.
    let list = coordinator.snapshots_json(&["--agent", "evil-01"])?;
    assert!(list.iter().all(|s| s["status"] != "completed"), "{list:?}");
    Ok(())
}
