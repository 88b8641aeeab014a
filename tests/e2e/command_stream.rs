//! Command sources: a 200 MiB stream round-trips byte-exactly, and a 1% change to it uploads
//! only a few percent of it again.

use fleetvault_tests::data::{hash_file, overwrite_regions, write_random_file, MIB};
use fleetvault_tests::report::{find_snapshot, snapshot_id, u64_field};
use fleetvault_tests::{scratch, shell_quote, CommandSource, Coordinator};

/// Size of the streams: big enough for hundreds of chunks.
const STREAM_LEN: u64 = 200 * MIB;

/// The chunk sizes of the change test's source, so that a 1% change is measured in chunks.
const CHUNK_SIZES: [u32; 3] = [16_384, 65_536, 262_144];

#[test]
fn command_stream_of_200_mib_round_trips_byte_exactly() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("stream")?;
    let data = work.path().join("dump.bin");
    write_random_file(&data, STREAM_LEN, 42)?;
    let data_hash = hash_file(&data)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        ..CommandSource::default()
    })?;

    let report = agent.backup_json("dump")?;
    assert_eq!(u64_field(&report, "bytes_read")?, STREAM_LEN, "{report}");
    let id = snapshot_id(&report)?;
    let listed = coordinator.snapshots_json(&["--agent", "db-01"])?;
    let snap = find_snapshot(&listed, &id)?;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["kind"], "command", "{snap}");
    assert_eq!(snap["logical_bytes"], STREAM_LEN, "{snap}");
    assert_eq!(
        snap["checksum"],
        data_hash.as_str(),
        "stream checksum is BLAKE3: {snap}"
    );

    let out = work.path().join("restored-stdout.bin");
    agent.restore_to_stdout(&id, &out)?.ensure_success()?;
    assert_eq!(hash_file(&out)?, data_hash, "restored stream differs");
    Ok(())
}

#[test]
fn one_percent_change_to_a_stream_uploads_under_five_percent() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let work = scratch("stream")?;
    let data = work.path().join("dump.bin");
    let restored = work.path().join("restored-by-command.bin");
    write_random_file(&data, STREAM_LEN, 7)?;
    let original_hash = hash_file(&data)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&data.to_string_lossy())),
        restore_command: Some(format!(
            "cat > {}",
            shell_quote(&restored.to_string_lossy())
        )),
        chunk_sizes: Some(CHUNK_SIZES),
    })?;
    let first = agent.backup_json("dump")?;
    let first_id = snapshot_id(&first)?;

    // Ten scattered regions of 0.1% each: 1% of the stream changes.
    let changed = overwrite_regions(&data, 10, STREAM_LEN.div_ceil(1000), 8)?;
    assert!(changed * 100 >= STREAM_LEN);
    let changed_hash = hash_file(&data)?;

    let second = agent.backup_json("dump")?;
    let read = u64_field(&second, "bytes_read")?;
    let uploaded = u64_field(&second, "bytes_uploaded")?;
    assert_eq!(read, STREAM_LEN, "{second}");
    assert!(
        uploaded * 20 < read,
        "a 1% change uploaded {uploaded} of {read} bytes (>= 5%): {second}"
    );

    // The new version through the source's restore_command, the old one into a file.
    let second_id = snapshot_id(&second)?;
    agent.restore_json(&second_id, None)?;
    assert_eq!(
        hash_file(&restored)?,
        changed_hash,
        "second version differs"
    );
    let old = work.path().join("first-version.bin");
    agent.restore_json(&first_id, Some(&old))?;
    assert_eq!(hash_file(&old)?, original_hash, "first version differs");
    Ok(())
}

#[test]
fn failing_or_missing_dump_and_restore_commands_fail_with_their_stderr() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("db-01")?;
    let sources = [
        (
            "wrong-password",
            "printf 'partial dump'; echo 'pg_dump: error: FATAL: password authentication failed for user \"app\"' >&2; exit 1",
            "password authentication failed",
        ),
        ("missing-tool", "pg_dump_not_installed_here app", "not found"),
    ];
    for (name, command, _) in sources {
        agent.add_command_source(&CommandSource {
            name: name.into(),
            backup_command: command.into(),
            ..CommandSource::default()
        })?;
    }
    for (name, _, want) in sources {
        let stderr = agent.backup(name)?.ensure_failure()?;
        assert!(stderr.contains(want), "{name}: {want:?} not in {stderr}");
        let listed = coordinator.snapshots_json(&["--source", name])?;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["status"], "failed", "{}", listed[0]);
        let reason = listed[0]["reason"].as_str().unwrap_or("");
        assert!(reason.contains(want), "{name}: reason {reason:?}");
    }

    agent.add_command_source(&CommandSource {
        name: "restore-fails".into(),
        backup_command: "printf 'a small dump'".into(),
        restore_command: Some(
            "cat > /dev/null; echo 'psql: error: database \"chat\" does not exist' >&2; exit 2"
                .into(),
        ),
        ..CommandSource::default()
    })?;
    let id = snapshot_id(&agent.backup_json("restore-fails")?)?;
    let stderr = agent.restore(&id, None)?.ensure_failure()?;
    assert!(
        stderr.contains("database \"chat\" does not exist"),
        "{stderr}"
    );
    Ok(())
}
