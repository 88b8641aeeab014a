//! Files sources: a tree with every awkward entry round-trips exactly, and a second backup of an
//! unchanged tree neither re-reads nor re-uploads it.

use anyhow::Context;
use fleetvault_tests::report::{find_snapshot, snapshot_id, u64_field};
use fleetvault_tests::tree::{
    build_odd_tree, ensure_same, restored_path, scan, Tree, TreeStats, ODD_TREE_EXCLUDE,
};
use fleetvault_tests::{scratch, Coordinator};

/// The scanned source tree without the entries the source's exclude pattern leaves out.
fn expected_tree(src: &std::path::Path, stats: &TreeStats) -> anyhow::Result<Tree> {
    let mut tree = scan(src)?;
    for rel in &stats.excluded {
        let key = rel.as_os_str().as_encoded_bytes().to_vec();
        tree.remove(&key)
            .with_context(|| format!("excluded {} not in the tree", rel.display()))?;
    }
    Ok(tree)
}

#[test]
fn file_tree_with_odd_names_links_modes_and_mtimes_round_trips_exactly() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("web-01")?;
    let work = scratch("tree")?;
    let src = work.path().join("uploads");
    let stats = build_odd_tree(&src, 1)?;
    agent.add_files_source("uploads", &[&src], &[ODD_TREE_EXCLUDE])?;
    let expected = expected_tree(&src, &stats)?;

    let report = agent.backup_json("uploads")?;
    let id = snapshot_id(&report)?;
    let target = work.path().join("restore");
    agent.restore_json(&id, Some(&target))?;

    ensure_same(&expected, &scan(&restored_path(&target, &src))?)?;
    let listed = agent.snapshots_json()?;
    let snap = find_snapshot(&listed, &id)?;
    assert_eq!(snap["status"], "completed", "{snap}");
    assert_eq!(snap["kind"], "files", "{snap}");
    Ok(())
}

#[test]
fn unchanged_tree_is_neither_reread_nor_uploaded_again() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("web-01")?;
    let work = scratch("tree")?;
    let src = work.path().join("uploads");
    let stats = build_odd_tree(&src, 2)?;
    agent.add_files_source("uploads", &[&src], &[ODD_TREE_EXCLUDE])?;
    let expected = expected_tree(&src, &stats)?;

    let first = agent.backup_json("uploads")?;
    let first_id = snapshot_id(&first)?;
    let second = agent.backup_json("uploads")?;
    let second_id = snapshot_id(&second)?;
    assert_ne!(first_id, second_id);

    assert_eq!(
        u64_field(&second, "files_unchanged")?,
        stats.files,
        "every file should be recognised as unchanged: {second}"
    );
    // Only the tree's manifest may be new, and it did not change either.
    let listed = agent.snapshots_json()?;
    let snap = find_snapshot(&listed, &second_id)?;
    let manifest_chunks = snap["manifest_chunks"].as_u64().unwrap_or(1);
    assert!(
        u64_field(&second, "new_chunks")? <= manifest_chunks,
        "second backup uploaded data chunks: {second}"
    );
    assert!(
        u64_field(&second, "bytes_uploaded")? < stats.bytes / 100,
        "second backup uploaded more than 1% of {} bytes: {second}",
        stats.bytes
    );
    assert_eq!(snap["parent"], first_id.as_str(), "{snap}");

    // The second snapshot, made of references to the first's chunks, restores the same tree.
    let target = work.path().join("restore");
    agent.restore_json(&second_id, Some(&target))?;
    ensure_same(&expected, &scan(&restored_path(&target, &src))?)?;
    Ok(())
}

#[test]
fn changed_file_is_backed_up_and_unchanged_ones_are_reused() -> anyhow::Result<()> {
    let coordinator = Coordinator::start()?;
    let agent = coordinator.agent("web-01")?;
    let work = scratch("tree")?;
    let src = work.path().join("uploads");
    let stats = build_odd_tree(&src, 3)?;
    agent.add_files_source("uploads", &[&src], &[ODD_TREE_EXCLUDE])?;
    agent.backup_json("uploads")?;

    // A new version of one file (new size and mtime), and a new file.
    std::fs::write(src.join("plain.txt"), b"hello fleetvault, second version\n")?;
    std::fs::write(src.join("nested/a/b/new.txt"), b"new\n")?;
    let expected = expected_tree(&src, &stats)?;

    let report = agent.backup_json("uploads")?;
    assert_eq!(
        u64_field(&report, "files_unchanged")?,
        stats.files - 1,
        "{report}"
    );
    let id = snapshot_id(&report)?;
    let target = work.path().join("restore");
    agent.restore_json(&id, Some(&target))?;
    ensure_same(&expected, &scan(&restored_path(&target, &src))?)?;
    Ok(())
}
