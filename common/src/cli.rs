//! What both command lines share besides their commands: parsing with `--json` usage errors,
//! man pages from the clap definitions, and the signals that stop a foreground daemon.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Writes one man page per command and subcommand of `cmd` into `dir` (`NAME.1`,
/// `NAME-SUB.1`, ...), as `man -l DIR/NAME.1` reads them; `json` prints the files written as
/// a JSON array instead of one line each.
pub fn write_man_pages(cmd: clap::Command, dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut cmd = cmd;
    // Global arguments (`--json`) reach the subcommands' pages only once built.
    cmd.build();
    let name = cmd.get_name().to_owned();
    write_page(cmd, name.clone(), name, dir, &mut written)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&written)?);
    } else {
        for w in &written {
            println!("{w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_page(
    cmd: clap::Command,
    name: String,
    invoked_as: String,
    dir: &Path,
    written: &mut Vec<String>,
) -> anyhow::Result<()> {
    let cmd = cmd.name(name.clone()).bin_name(invoked_as.clone());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("rendering the man page of {name}"))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path.display().to_string());
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub_name = sub.get_name().to_owned();
        write_page(
            sub.clone(),
            format!("{name}-{sub_name}"),
            format!("{invoked_as} {sub_name}"),
            dir,
            written,
        )?;
    }
    Ok(())
}

/// Parses the command line like `T::parse()`, except that a usage error with `--json`
/// somewhere on the line also prints the one JSON failure document scripts expect.
pub fn parse<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let wants_json = std::env::args_os().any(|a| a == "--json");
            if wants_json && e.use_stderr() {
                let doc = serde_json::json!({
                    "status": "failed",
                    "error": e.to_string().lines().next().unwrap_or("usage error").trim_start_matches("error: "),
                    "exit_code": crate::exit::USAGE,
                    "snapshot_id": null,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
                );
            }
            e.exit()
        }
    }
}
/// Resolves on SIGINT or SIGTERM: when a foreground daemon (`serve`, `run`) should stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
