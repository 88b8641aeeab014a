//! The [`Coordinator`] guard: a data dir made by `init`, a `serve` child on a fixed port, and the
//! operator commands (`snapshots`, `agents`, `backup`, `restore`) run against it.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::process::{run, Output, Proc, COMMAND_TIMEOUT};
use crate::{bin, Agent};

/// How long `serve` may take to print its readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The line `serve` prints on stderr once it accepts connections.
const READY_LINE: &str = "fleetvault-coordinator listening on";

/// A coordinator data dir in a temp dir, and its `serve` process while it runs.
pub struct Coordinator {
    serve: Option<Proc>,
    port: u16,
    starts: u32,
    data_dir: PathBuf,
    logs: PathBuf,
    /// A tmpfs mounted on the data dir ([`Coordinator::init_on_small_disk`]), unmounted on drop.
    mounted: bool,
    root: Option<tempfile::TempDir>,
}

/// A UDP port that was free a moment ago. The coordinator must come back on the same port after
/// a restart (agents' configs name it), so the harness picks it rather than asking for port 0.
fn free_udp_port() -> anyhow::Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket")?;
    Ok(socket.local_addr()?.port())
}

impl Coordinator {
    /// `init` a data dir listening on a free port on 127.0.0.1, without serving.
    pub fn init() -> anyhow::Result<Self> {
        Self::init_with(None)
    }

    /// `init` on a data dir that is a tmpfs of `mib` MiB, to fill the coordinator's disk.
    /// Needs root (`mount`); the error says so otherwise.
    pub fn init_on_small_disk(mib: u64) -> anyhow::Result<Self> {
        Self::init_with(Some(mib))
    }

    fn init_with(small_disk_mib: Option<u64>) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("fv-coordinator-")
            .tempdir()?;
        let data_dir = root.path().join("data");
        let logs = root.path().join("logs");
        std::fs::create_dir(&logs)?;
        let port = free_udp_port()?;
        eprintln!("coordinator dir {} port {port}", root.path().display());
        let mut c = Self {
            serve: None,
            port,
            starts: 0,
            data_dir,
            logs,
            mounted: false,
            root: Some(root),
        };
        if let Some(mib) = small_disk_mib {
            std::fs::create_dir(&c.data_dir)?;
            run(
                Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={mib}m,mode=0700"),
                        "tmpfs",
                    ])
                    .arg(&c.data_dir),
                COMMAND_TIMEOUT,
            )?
            .ensure_success()
            .context("mounting a small tmpfs for the data dir (the full-disk test runs as root)")?;
            c.mounted = true;
        }
        run(
            Command::new(bin("fleetvault-coordinator")?)
                .arg("init")
                .arg("--data-dir")
                .arg(&c.data_dir)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}")),
            COMMAND_TIMEOUT,
        )?
        .ensure_success()?;
        Ok(c)
    }

    /// `init` and `serve`: a ready coordinator.
    pub fn start() -> anyhow::Result<Self> {
        let mut c = Self::init()?;
        c.serve()?;
        Ok(c)
    }

    /// Starts `serve` and waits for its readiness line.
    pub fn serve(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.serve.is_none(), "coordinator is already serving");
        self.starts += 1;
        let n = self.starts;
        let proc = Proc::spawn(
            Command::new(bin("fleetvault-coordinator")?)
                .arg("serve")
                .arg("--data-dir")
                .arg(&self.data_dir),
            &format!("coordinator serve #{n}"),
            &self.logs.join(format!("serve-{n}.log")),
            &self.logs.join(format!("serve-{n}.stdout")),
        )?;
        let line = proc.wait_for_line(READY_LINE, READY_TIMEOUT)?;
        anyhow::ensure!(
            line.contains(&format!(":{}", self.port)),
            "coordinator listens elsewhere than port {}: {line}",
            self.port
        );
        self.serve = Some(proc);
        Ok(())
    }

    /// SIGKILL the `serve` process (a crash).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let mut proc = self.serve.take().context("coordinator is not serving")?;
        proc.kill9()
    }

    /// Crash and start again on the same port and data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9()?;
        self.serve()
    }

    /// SIGTERM the `serve` process and return its exit status (it must exit within a minute).
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_with("TERM")
    }

    /// Sends `signal` (e.g. `INT`) to `serve` and returns its exit status (within a minute).
    pub fn stop_with(&mut self, signal: &str) -> anyhow::Result<ExitStatus> {
        let mut proc = self.serve.take().context("coordinator is not serving")?;
        proc.stop_with(signal, Duration::from_secs(60))
    }

    /// The `serve` process, while it runs.
    pub fn serve_process(&self) -> Option<&Proc> {
        self.serve.as_ref()
    }

    /// What the running `serve` process has logged so far (empty when it is not running).
    pub fn serve_log(&self) -> String {
        self.serve
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    /// Waits up to 10 s for a line of the `serve` log that matches `line`. Some lines are
    /// written just after the peer sees the effect they describe, so tests await them.
    pub fn wait_for_log_line(&self, what: &str, line: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        crate::wait_until(what, Duration::from_secs(10), || {
            Ok(self.serve_log().lines().any(&line))
        })
        .map_err(|e| anyhow::anyhow!("{e}; the coordinator's log:\n{}", self.serve_log()))
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The UDP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The fleet CA certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    /// `store/chunks/`, where chunk files live.
    pub fn chunks_dir(&self) -> PathBuf {
        self.data_dir.join("store").join("chunks")
    }

    /// Every chunk file in the store.
    pub fn chunk_files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let dir = self.chunks_dir();
        if !dir.exists() {
            return Ok(files);
        }
        for fan in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let fan = fan?.path();
            if !fan.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&fan)? {
                let f = f?.path();
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    files.push(f);
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// Damages the largest chunk file (stream data, not a small manifest): inverts 16 bytes in
    /// the middle of its payload, as a failing disk would. Returns its path.
    pub fn damage_largest_chunk(&self) -> anyhow::Result<PathBuf> {
        use std::io::{Read, Seek, SeekFrom, Write};
        /// A chunk file's envelope header; the payload follows it.
        const HEADER: u64 = 8;
        let mut largest: Option<(u64, PathBuf)> = None;
        for c in self.chunk_files()? {
            let len = std::fs::metadata(&c)?.len();
            if largest.as_ref().is_none_or(|(l, _)| len > *l) {
                largest = Some((len, c));
            }
        }
        let (len, path) = largest
            .with_context(|| format!("no chunk files under {}", self.chunks_dir().display()))?;
        anyhow::ensure!(len > HEADER + 16, "chunk file {} too small", path.display());
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let at = HEADER + (len - HEADER - 16) / 2;
        let mut buf = [0u8; 16];
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
        for b in &mut buf {
            *b = !*b;
        }
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&buf)?;
        f.sync_all()?;
        Ok(path)
    }

    /// Runs `fleetvault-coordinator ARGS --data-dir DIR`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(
            Command::new(bin("fleetvault-coordinator")?)
                .args(args)
                .arg("--data-dir")
                .arg(&self.data_dir),
            COMMAND_TIMEOUT,
        )
    }

    /// Issues agent `name` (`issue-agent`) into a temp dir of its own.
    pub fn agent(&self, name: &str) -> anyhow::Result<Agent> {
        Agent::issue(self, name)
    }

    /// `coordinator.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.data_dir.join("coordinator.toml")
    }

    /// Appends raw TOML to `coordinator.toml` (read at the next `serve` or SIGHUP).
    pub fn append_config(&self, text: &str) -> anyhow::Result<()> {
        let path = self.config_path();
        let mut config = std::fs::read_to_string(&path)?;
        config.push_str(text);
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// Makes `primary` replicate here as replica `replica`, the way the README says: on this
    /// coordinator `issue-peer PEER --replica-name REPLICA --out DIR`, DIR copied to the
    /// primary's `replicas/REPLICA/`, its `replica.toml` appended to the primary's config
    /// (without the schedule; `extra` lines are added to the table). Returns the issue-peer
    /// output dir.
    pub fn add_as_replica_of(
        &self,
        primary: &Coordinator,
        peer: &str,
        replica: &str,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let out = self
            .root
            .as_ref()
            .context("root")?
            .path()
            .join(format!("peer-{peer}"));
        let out_s = out.to_str().context("temp path is not UTF-8")?;
        self.cli(&[
            "issue-peer",
            peer,
            "--replica-name",
            replica,
            "--out",
            out_s,
        ])?
        .ensure_success()?;
        let dest = primary.data_dir().join("replicas").join(replica);
        std::fs::create_dir_all(&dest)?;
        for f in ["ca.pem", "peer.pem", "peer.key"] {
            std::fs::copy(out.join(f), dest.join(f))?;
        }
        let table = std::fs::read_to_string(out.join("replica.toml"))?;
        let table: String = table
            .lines()
            .filter(|l| !l.starts_with("schedule"))
            .map(|l| format!("{l}\n"))
            .collect();
        primary.append_config(&format!("\n{table}{extra}\n"))?;
        Ok(out)
    }

    /// `replicate [--replica NAME] --json`: the per-replica reports (success not required).
    pub fn replicate(&self, replica: Option<&str>) -> anyhow::Result<Output> {
        let mut args = vec!["replicate", "--json"];
        if let Some(r) = replica {
            args.extend_from_slice(&["--replica", r]);
        }
        self.cli(&args)
    }

    /// `replicas --json`.
    pub fn replicas_json(&self) -> anyhow::Result<Vec<Value>> {
        match self
            .cli(&["replicas", "--json"])?
            .ensure_success()?
            .json()?
        {
            Value::Array(a) => Ok(a),
            other => bail!("replicas --json printed a non-array: {other}"),
        }
    }

    /// `snapshots --json`, optionally with extra filter arguments.
    pub fn snapshots_json(&self, filter: &[&str]) -> anyhow::Result<Vec<Value>> {
        let mut args = vec!["snapshots", "--json"];
        args.extend_from_slice(filter);
        let v = self.cli(&args)?.ensure_success()?.json()?;
        match v {
            Value::Array(a) => Ok(a),
            other => bail!("snapshots --json printed a non-array: {other}"),
        }
    }

    /// `agents --json`.
    pub fn agents_json(&self) -> anyhow::Result<Vec<Value>> {
        match self.cli(&["agents", "--json"])?.ensure_success()?.json()? {
            Value::Array(a) => Ok(a),
            other => bail!("agents --json printed a non-array: {other}"),
        }
    }

    /// Polls `agents --json` until agent `name` is listed as connected.
    pub fn wait_agent_connected(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let agents = self.agents_json()?;
            if agents
                .iter()
                .any(|a| a["name"] == name && a["connected"] == true)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("agent {name} not connected within {timeout:?}; agents: {agents:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls `snapshots --json` until `pred` holds for some snapshot, and returns it.
    pub fn wait_snapshot(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.snapshots_json(&[])?;
            if let Some(s) = list.iter().find(|s| pred(s)) {
                return Ok(s.clone());
            }
            if Instant::now() >= deadline {
                bail!("no matching snapshot within {timeout:?}; snapshots: {list:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `backup --agent A --source S --json` pushed to a running agent; must succeed.
    pub fn push_backup(&self, agent: &str, source: &str) -> anyhow::Result<Value> {
        self.cli(&["backup", "--agent", agent, "--source", source, "--json"])?
            .ensure_success()?
            .json()
    }

    /// `restore ID --agent A [--target T] --json` pushed to a running agent; must succeed.
    pub fn push_restore(
        &self,
        id: &str,
        agent: &str,
        target: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut args = vec!["restore", id, "--agent", agent, "--json"];
        if let Some(t) = target {
            args.extend_from_slice(&["--target", t]);
        }
        self.cli(&args)?.ensure_success()?.json()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // The log tail is printed by the Proc guard; only the dir is left to handle.
        drop(self.serve.take());
        if self.mounted {
            let _ = Command::new("umount").arg(&self.data_dir).status();
        }
        if let Some(root) = self.root.take() {
            crate::keep_or_remove(root);
        }
    }
}
