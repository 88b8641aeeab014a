//! `download`: an operator takes a snapshot straight from the coordinator, without an agent: a
//! stream as its original bytes, a file tree as a tar archive that unpacks to the same tree.

use fleetvault_tests::data::{hash_file, write_random_file, MIB};
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::tree::{build_odd_tree, ensure_same, scan, Tree, ODD_TREE_EXCLUDE};
use fleetvault_tests::{run, scratch, shell_quote, CommandSource, Coordinator, COMMAND_TIMEOUT};

/// Tar keeps whole seconds only.
fn seconds_only(mut t: Tree) -> Tree {
    for e in t.values_mut() {
        e.mtime.1 = 0;
    }
    t
}

#[test]
fn snapshots_download_as_the_dump_and_as_a_tar_archive() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("web-01")?;
    let work = scratch("download")?;
    let dump = work.path().join("dump.bin");
    write_random_file(&dump, 5 * MIB, 3)?;
    agent.add_command_source(&CommandSource {
        name: "dump".into(),
        backup_command: format!("cat {}", shell_quote(&dump.to_string_lossy())),
        ..CommandSource::default()
    })?;
    let src = work.path().join("uploads");
    let stats = build_odd_tree(&src, 4)?;
    agent.add_files_source("uploads", &[&src], &[ODD_TREE_EXCLUDE])?;
    let stream_id = snapshot_id(&agent.backup_json("dump")?)?;
    let tree_id = snapshot_id(&agent.backup_json("uploads")?)?;

    let out = work.path().join("dump.out");
    let out_s = out.to_string_lossy().into_owned();
    coordinator
        .cli(&["download", &stream_id, "--out", &out_s])?
        .ensure_success()?;
    assert_eq!(hash_file(&out)?, hash_file(&dump)?);
    // Never over an existing file.
    coordinator
        .cli(&["download", &stream_id, "--out", &out_s])?
        .ensure_failure()?;

    let archive = work.path().join("uploads.tar");
    let archive_s = archive.to_string_lossy().into_owned();
    coordinator
        .cli(&["download", &tree_id, "--out", &archive_s])?
        .ensure_success()?;
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked)?;
    run(
        std::process::Command::new("tar")
            .arg("-xpf")
            .arg(&archive)
            .arg("-C")
            .arg(&unpacked),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    let mut expected = scan(&src)?;
    for rel in &stats.excluded {
        expected.remove(rel.as_os_str().as_encoded_bytes());
    }
    let got = scan(&fleetvault_tests::tree::restored_path(&unpacked, &src))?;
    ensure_same(&seconds_only(expected), &seconds_only(got))?;
    fleetvault_tests::tree::make_writable(work.path());
    Ok(())
}
