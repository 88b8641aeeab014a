//! A chunk damaged on the coordinator's disk is reported on restore, naming the snapshot, and
//! never restored silently wrong.

use std::io::{Read, Seek, SeekFrom, Write};

use fleetvault_tests::data::{write_random_file, MIB};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::{scratch, shell_quote, CommandSource, Coordinator};

/// Size of a chunk file's envelope header; the payload follows it.
const ENVELOPE_HEADER: u64 = 8;

/// Inverts 16 bytes in the middle of the payload of the chunk file at `path`.
fn flip_payload_bytes(path: &std::path::Path) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    anyhow::ensure!(
        len > ENVELOPE_HEADER + 16,
        "chunk file {} too small",
        path.display()
    );
    let at = ENVELOPE_HEADER + (len - ENVELOPE_HEADER - 16) / 2;
    let mut buf = [0u8; 16];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut buf)?;
    for b in &mut buf {
        *b = !*b;
    }
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&buf)?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn corrupted_chunk_is_reported_on_restore() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("corrupt")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, 8 * MIB, 99)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("dump")?)?;

    // The largest chunk file holds stream data (the manifest is small).
    let chunks = coordinator.chunk_files()?;
    let mut largest = None;
    let mut largest_len = 0;
    for c in &chunks {
        let len = std::fs::metadata(c)?.len();
        if len > largest_len {
            largest_len = len;
            largest = Some(c.clone());
        }
    }
    let Some(victim) = largest else {
        anyhow::bail!(
            "no chunk files under {}",
            coordinator.chunks_dir().display()
        );
    };
    flip_payload_bytes(&victim)?;

    for target in ["restored.bin", "-"] {
        let out = if target == "-" {
            agent.restore_to_stdout(&id, &work.path().join("stdout.bin"))?
        } else {
            agent.restore(&id, Some(&work.path().join(target)))?
        };
        let stderr = out.ensure_failure()?;
        let lower = stderr.to_lowercase();
        assert!(
            stderr.contains(&id),
            "the error should name snapshot {id}: {stderr}"
        );
        assert!(
            lower.contains("damaged") || lower.contains("chunk"),
            "the error should say a chunk is damaged: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn verify_finds_and_quarantines_a_damaged_chunk_and_the_next_backup_heals_it() -> anyhow::Result<()>
{
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("verify")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, 8 * MIB, 5)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("dump")?)?;
    coordinator.cli(&["verify"])?.ensure_success()?;

    let mut chunks = coordinator.chunk_files()?;
    chunks.sort_by_key(|c| std::fs::metadata(c).map(|m| m.len()).unwrap_or(0));
    let victim = chunks.last().expect("chunks").clone();
    let victim_id = victim
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_owned();
    flip_payload_bytes(&victim)?;

    let stderr = coordinator.cli(&["verify"])?.ensure_failure()?;
    assert!(stderr.contains("damaged"), "{stderr}");
    let report = coordinator.cli(&["verify", "--json"])?;
    let json = report.json()?;
    assert_eq!(json[0]["id"], id.as_str(), "{json}");
    assert_eq!(json[0]["ok"], false, "{json}");
    assert!(!victim.exists(), "the damaged chunk was not quarantined");
    assert!(coordinator
        .data_dir()
        .join("store/quarantine")
        .join(&victim_id)
        .exists());
    let listed = coordinator.snapshots_json(&[])?;
    let snap = listed
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("listed");
    assert!(
        snap["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "damaged")),
        "{snap}"
    );

    // The same data again: the store lacks the quarantined chunk, so it is uploaded anew.
    let again = agent.backup_json("dump")?;
    assert!(again["new_chunks"].as_u64().unwrap_or(0) >= 1, "{again}");
    coordinator.cli(&["verify"])?.ensure_success()?;
    let restored = work.path().join("healed.bin");
    agent.restore(&id, Some(&restored))?.ensure_success()?;
    assert_eq!(
        fleetvault_tests::data::hash_file(&restored)?,
        fleetvault_tests::data::hash_file(&data)?
    );
    let listed = coordinator.snapshots_json(&[])?;
    let snap = listed
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("listed");
    assert!(
        snap["tags"]
            .as_array()
            .is_some_and(|t| t.iter().all(|t| t != "damaged")),
        "{snap}"
    );
    Ok(())
}
