//! Running other programs: a shell command or a tool as a pipe stage ([`ShellCommand`]: the
//! `command` source and sink, the database dump and restore tools), and bundle hooks ([`run`],
//! [`run_all`]): a clean environment, output captured, killed with their process group at a
//! timeout.
//!
//! A [`ShellCommand`]'s stderr is kept (the last few KiB) so that a failure can say why; a
//! non-zero exit fails the backup or restore.
//!
//! Hook environment: `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
//! `HOME=/`, and `FLEETVAULT_BUNDLE`, `FLEETVAULT_PHASE` (`before`, `after`, `restore-before`,
//! `restore-after`), `FLEETVAULT_PARTS` (the part names, space-separated), `FLEETVAULT_PART`
//! (the part that was running when the bundle stopped, in `after` phases), `FLEETVAULT_STATUS`
//! (`ok` or `failed`, in `after` phases), `FLEETVAULT_SNAPSHOT_IDS` (the parts' snapshots
//! taken, in `after`) and `FLEETVAULT_SNAPSHOT_ID` (the bundle snapshot restored, in restore
//! phases).
//!
//! May import `config` only.

use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

pub(crate) use crate::config::Hook;

/// The pipe size asked for a command's stdout (Linux's default `pipe-max-size`; the default
/// pipe holds 64 KiB, so every 64 KiB would wake the reader).
const PIPE_SIZE: usize = 1 << 20;

/// How much of a command's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// A running shell command.
pub(crate) struct ShellCommand {
    what: &'static str,
    command: String,
    child: Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl ShellCommand {
    /// Starts `/bin/sh -c command`, with stdin and stdout as given.
    pub(crate) fn spawn(
        what: &'static str,
        command: &str,
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Self, String> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(command);
        Self::spawn_command(what, command, cmd, stdin, stdout)
    }

    /// Starts `cmd` (shown in errors as `shown`: never put a secret in it).
    pub(crate) fn spawn_command(
        what: &'static str,
        shown: &str,
        mut cmd: Command,
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Self, String> {
        let command = shown;
        let mut child = cmd
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what} `{command}`: {e}"))?;
        let stderr = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                tail
            })
        });
        Ok(Self {
            what,
            command: command.to_owned(),
            child,
            stderr,
        })
    }

    /// The command's stdout, when it was piped. Its pipe is widened to [`PIPE_SIZE`] where the
    /// system allows it: a dump then crosses in fewer, larger reads.
    pub(crate) fn take_stdout(&mut self) -> Option<ChildStdout> {
        let stdout = self.child.stdout.take()?;
        let _ = rustix::pipe::fcntl_setpipe_size(&stdout, PIPE_SIZE);
        Some(stdout)
    }

    /// The command's stdin, when it was piped.
    pub(crate) fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits for the command; a non-zero exit is an error carrying its stderr.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for {} `{}`: {e}", self.what, self.command))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&stderr).trim().to_owned();
        if text.len() > STDERR_TAIL {
            let cut = text.len() - STDERR_TAIL;
            let cut = (cut..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text = format!("…{}", &text[cut..]);
        }
        let text = text.replace('\n', " | ");
        Err(format!(
            "{} `{}` failed ({status}){}",
            self.what,
            self.command,
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        ))
    }

    /// Whether the command has already exited (a restore tool that stopped reading).
    pub(crate) fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the command (its consumer must not see a clean end of stream) and reaps it.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ShellCommand {
    fn drop(&mut self) {
        // A command not finished or killed explicitly is killed: never leave a dump running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Feeds a restore tool through `write`, then waits for it. When `write` fails because a
/// chunk is damaged, the tool is killed before its stdin closes, so it never sees a clean end
/// of a bad stream; when it fails because the tool stopped reading, the tool's own error
/// (exit status and stderr) is the one reported.
pub(crate) fn feed_tool(
    mut child: ShellCommand,
    write: impl FnOnce(&mut ChildStdin) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(mut stdin) = child.take_stdin() else {
        return Err(anyhow!("the restore tool has no stdin"));
    };
    match write(&mut stdin) {
        Ok(()) => {
            drop(stdin);
            child.finish().map_err(|e| anyhow!(e))
        }
        Err(e) if exits_soon(&mut child) => {
            drop(stdin);
            match child.finish() {
                Err(msg) => Err(anyhow!(msg)),
                Ok(()) => Err(e),
            }
        }
        Err(e) => {
            child.kill();
            drop(stdin);
            Err(e)
        }
    }
}

/// Whether the tool exits within a moment (it closed its stdin: a broken pipe). A tool still
/// running after that is waiting for more input, which must not arrive.
fn exits_soon(child: &mut ShellCommand) -> bool {
    for _ in 0..40 {
        if child.has_exited() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// The most output kept per hook.
const MAX_OUTPUT: usize = 64 << 10;

/// What a hook did, as kept in the bundle's index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HookLog {
    pub(crate) phase: String,
    pub(crate) command: String,
    pub(crate) exit_code: Option<i32>,
    pub(crate) timed_out: bool,
    pub(crate) duration_ms: u64,
    pub(crate) output: String,
}

impl HookLog {
    pub(crate) fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// Why the hook failed, in one line.
    pub(crate) fn failure(&self) -> String {
        let how = if self.timed_out {
            format!(
                "timed out after {:.0} s and was killed",
                self.duration_ms as f64 / 1000.0
            )
        } else {
            match self.exit_code {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            }
        };
        let last = self.output.lines().last().unwrap_or("").trim();
        let last = if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        };
        format!("{} hook `{}` {how}{last}", self.phase, self.command)
    }
}

/// Runs `hooks` in order (until one fails, if `stop_on_failure`: `before` phases; `after`
/// phases run every hook); returns the logs and the first failure, described.
pub(crate) async fn run_all(
    hooks: &[Hook],
    phase: &str,
    vars: &[(&str, String)],
    stop_on_failure: bool,
) -> (Vec<HookLog>, Option<String>) {
    let mut logs = Vec::new();
    let mut failure = None;
    for h in hooks {
        let log = run(h, phase, vars).await;
        let ok = log.ok();
        if ok {
            tracing::info!(phase, command = %h.command, "hook finished");
        } else {
            tracing::warn!(phase, failure = %log.failure(), "hook failed");
            failure.get_or_insert_with(|| log.failure());
        }
        logs.push(log);
        if !ok && stop_on_failure {
            break;
        }
    }
    (logs, failure)
}

/// Runs one hook to its end or its timeout.
pub(crate) async fn run(hook: &Hook, phase: &str, vars: &[(&str, String)]) -> HookLog {
    let started = Instant::now();
    let mut log = HookLog {
        phase: phase.to_owned(),
        command: hook.command.clone(),
        exit_code: None,
        timed_out: false,
        duration_ms: 0,
        output: String::new(),
    };
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("exec 2>&1\n{}", hook.command))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .env("FLEETVAULT_PHASE", phase)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log.output = format!("cannot start /bin/sh: {e}");
            return log;
        }
    };
    let mut stdout = child.stdout.take();
    let mut buf = Vec::new();
    let work = async {
        if let Some(out) = stdout.as_mut() {
            let mut chunk = [0u8; 8192];
            loop {
                match out.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = MAX_OUTPUT.saturating_sub(buf.len());
                        buf.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
        }
        child.wait().await
    };
    let status = tokio::time::timeout(hook.timeout, work).await;
    match status {
        Ok(Ok(s)) => log.exit_code = s.code(),
        Ok(Err(e)) => log.output = format!("waiting for the hook: {e}"),
        Err(_) => {
            log.timed_out = true;
            // The whole group: a hung `systemctl` or its children must not outlive it.
            let group = child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id.try_into().ok()?));
            if let Some(pid) = group {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
        }
    }
    if log.output.is_empty() {
        log.output = String::from_utf8_lossy(&buf).into_owned();
    }
    log.duration_ms = started.elapsed().as_millis() as u64;
    log
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn hook(command: &str, secs: u64) -> Hook {
        Hook {
            command: command.into(),
            timeout: Duration::from_secs(secs),
        }
    }

    #[tokio::test]
    async fn hooks_get_a_clean_environment_and_their_output_is_kept() {
        std::env::set_var("FLEETVAULT_TEST_LEAK", "leaked");
        let log = run(
            &hook(
                "echo \"b=$FLEETVAULT_BUNDLE l=${FLEETVAULT_TEST_LEAK:-none}\"; echo err >&2",
                10,
            ),
            "before",
            &[("FLEETVAULT_BUNDLE", "mm".into())],
        )
        .await;
        assert!(log.ok(), "{log:?}");
        assert_eq!(log.output, "b=mm l=none\nerr\n");
    }

    #[tokio::test]
    async fn a_hung_hook_and_its_children_are_killed_at_the_timeout() {
        let started = Instant::now();
        let log = run(&hook("sleep 30 & sleep 30", 1), "before", &[]).await;
        assert!(log.timed_out && !log.ok(), "{log:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(log.failure().contains("timed out"), "{}", log.failure());
        let hooks = [hook("exit 3", 5), hook("echo next", 5)];
        let (logs, failed) = run_all(&hooks, "before", &[], true).await;
        assert!(failed.is_some() && logs.len() == 1 && logs[0].exit_code == Some(3));
        let (logs, failed) = run_all(&hooks, "after", &[], false).await;
        assert!(failed.is_some() && logs.len() == 2 && logs[1].ok());
    }
}
