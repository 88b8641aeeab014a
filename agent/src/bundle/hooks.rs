//! Bundle hooks: shell commands run before and after a bundle's parts, with a clean
//! environment, their output captured, and killed (their whole process group) at a timeout.
//!
//! Environment: `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, `HOME=/`,
//! and `FLEETVAULT_BUNDLE`, `FLEETVAULT_PHASE` (`before`, `after`, `restore-before`,
//! `restore-after`), `FLEETVAULT_PARTS` (the part names, space-separated), `FLEETVAULT_PART`
//! (the part that was running when the bundle stopped, in `after` phases), `FLEETVAULT_STATUS`
//! (`ok` or `failed`, in `after` phases), `FLEETVAULT_SNAPSHOT_IDS` (the parts' snapshots
//! taken, in `after`) and `FLEETVAULT_SNAPSHOT_ID` (the bundle snapshot restored, in restore
//! phases).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// The most output kept per hook.
const MAX_OUTPUT: usize = 64 << 10;

/// One configured hook.
#[derive(Debug, Clone)]
pub(crate) struct Hook {
    pub(crate) command: String,
    pub(crate) timeout: Duration,
}

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
            if let Some(pid) = child.id() {
                // The whole group: a hung `systemctl` or its children must not outlive it.
                let _ = std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(format!("kill -KILL -- -{pid}"))
                    .status();
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
