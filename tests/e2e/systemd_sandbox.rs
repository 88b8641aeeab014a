//! The shipped agent unit makes the whole system read-only (`ProtectSystem=strict`,
//! `ProtectHome=read-only`) except its `ReadWritePaths=`. The drop-in `fleetvault-agent
//! systemd-dropin` prints must make an in-place restore of a bundle work, and without it the
//! restore must fail. There is no running systemd here, so the sandbox is reproduced with the
//! same kernel mechanism systemd uses: a private mount namespace (`unshare -m`) where the tree
//! standing in for `/` is bind-mounted read-only and each `ReadWritePaths=` entry is
//! bind-mounted writable on top of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use fleetvault_tests::data::write_random_file;
use fleetvault_tests::report::snapshot_id;
use fleetvault_tests::tree::{ensure_same, scan};
use fleetvault_tests::{bin, run, scratch, Agent, Output, COMMAND_TIMEOUT};

/// `fleetvault-agent restore ID` inside a mount namespace where `system` is read-only except
/// `writable` (as `ProtectSystem=strict` with `ReadWritePaths=`).
fn sandboxed_restore(
    agent: &Agent,
    id: &str,
    system: &Path,
    writable: &[PathBuf],
) -> anyhow::Result<Output> {
    let script = r#"set -e
mount --make-rprivate /
mount --bind "$SYSTEM" "$SYSTEM"
for p in "$@"; do
  [ "$p" = -- ] && break
  mount --bind "$p" "$p"
done
mount -o remount,bind,ro "$SYSTEM"
while [ "$1" != -- ]; do shift; done
shift
exec "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", script, "sh"])
        .env("SYSTEM", system)
        .args(writable)
        .arg("--")
        .arg(bin("fleetvault-agent")?)
        .args(["restore", "--config"])
        .arg(agent.config())
        .args([id, "--json"]);
    run(&mut cmd, COMMAND_TIMEOUT)
}

/// The paths of the `ReadWritePaths=` lines of a drop-in.
fn read_write_paths(dropin: &str) -> Vec<PathBuf> {
    dropin
        .lines()
        .filter_map(|l| l.strip_prefix("ReadWritePaths="))
        .map(|v| PathBuf::from(v.trim_start_matches('-')))
        .collect()
}

#[test]
fn an_in_place_restore_works_under_the_units_sandbox_with_the_dropin_and_fails_without(
) -> anyhow::Result<()> {
    let probe = run(
        Command::new("unshare").args(["-m", "true"]),
        COMMAND_TIMEOUT,
    )?;
    anyhow::ensure!(
        probe.success(),
        "this test needs `unshare -m` (root, util-linux): {}",
        probe.stderr.trim()
    );
    let coordinator = fleetvault_tests::Coordinator::start()?;
    let agent = coordinator.agent("chat-01")?;
    let work = scratch("sandbox")?;
    // `system` stands in for `/`; the application lives in system/opt/chat.
    let system = work.path().join("system");
    let app = system.join("opt/chat");
    for (i, len) in [0u64, 4096, 300_000].into_iter().enumerate() {
        let d = app.join(format!("data/team-{i}"));
        std::fs::create_dir_all(&d)?;
        write_random_file(&d.join(format!("upload-{i}.bin")), len, i as u64)?;
    }
    std::fs::create_dir_all(app.join("config"))?;
    std::fs::write(app.join("config/app.conf"), "db = chat\n")?;
    agent.append_config(&format!(
        "\n[[sources]]\nname = \"chat-data\"\nkind = \"files\"\npaths = [\"{0}/data\"]\n\n\
         [[sources]]\nname = \"chat-config\"\nkind = \"files\"\npaths = [\"{0}/config/app.conf\"]\n\n\
         [[bundles]]\nname = \"chat\"\nparts = [\"chat-data\", \"chat-config\"]\n",
        app.display()
    ))?;
    let before = scan(&app)?;
    let id = snapshot_id(&agent.backup_json("chat")?)?;

    let dropin = agent.cli("systemd-dropin", &[])?.ensure_success()?.stdout;
    let writable = read_write_paths(&dropin);
    assert_eq!(writable, [app.join("config"), app.join("data")], "{dropin}");

    // The data is lost: the directories stay, their contents and the config file are gone.
    for i in 0..3 {
        std::fs::remove_dir_all(app.join(format!("data/team-{i}")))?;
    }
    std::fs::remove_file(app.join("config/app.conf"))?;
    let lost = scan(&app)?;

    let out = sandboxed_restore(&agent, &id, &system, &[])?;
    assert!(
        !out.success(),
        "restored with the system read-only: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    // A restore that failed wrote nothing (directory mtimes aside, which it puts back).
    let after_failure = scan(&app)?;
    assert_eq!(
        after_failure.keys().collect::<Vec<_>>(),
        lost.keys().collect::<Vec<_>>()
    );

    let out = sandboxed_restore(&agent, &id, &system, &writable)?;
    assert!(out.success(), "{}\n{}", out.stdout, out.stderr);
    // config/ itself is not backed up (only its file): its mtime is the restore's.
    let (mut before, mut restored) = (before, scan(&app)?);
    before.remove(b"config".as_slice());
    restored.remove(b"config".as_slice());
    ensure_same(&before, &restored)?;
    Ok(())
}
