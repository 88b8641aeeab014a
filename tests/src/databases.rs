//! Throwaway database servers for the end-to-end tests: [`Postgres`] and [`MariaDb`] guards,
//! each a real server started in its own temporary directory on a free port, with a password
//! for its superuser, stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root: `initdb` and `postgres` run as the `postgres` user
//! (`runuser`), in a directory that user owns, with its socket in that directory. MariaDB runs
//! as `mysql` with `--no-defaults`, so the machine's own configuration never leaks in.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::process::{run, Output, Proc, COMMAND_TIMEOUT};

/// The superuser password of every test server.
pub const DB_PASSWORD: &str = "fleetvault-test-pw";

fn free_tcp_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a TCP socket")?;
    Ok(l.local_addr()?.port())
}

fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
    run(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(path),
        COMMAND_TIMEOUT,
    )?
    .ensure_success()?;
    Ok(())
}

/// The newest installed PostgreSQL server's `bin` directory.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "PostgreSQL is not installed (apt-get install postgresql): no /usr/lib/postgresql",
        )?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL server with initdb under /usr/lib/postgresql")
}

/// The certificate and key of a TLS-only test server.
struct ServerTls {
    cert_pem: String,
    key_pem: String,
}

/// A PostgreSQL server of its own.
pub struct Postgres {
    proc: Option<Proc>,
    port: u16,
    root: Option<tempfile::TempDir>,
    password_file: PathBuf,
}

impl Postgres {
    /// `initdb` (scram-sha-256 passwords) and start; ready when it accepts connections.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, None)
    }

    /// A server that accepts TCP connections on 127.0.0.1 only over TLS (`hostssl`, and
    /// `hostnossl … reject`), with a certificate for `localhost` and `127.0.0.1` issued by
    /// the returned CA (PEM, a fresh one per server). The socket still accepts `psql` for
    /// the test's own SQL.
    pub fn start_tls_only(name: &str) -> anyhow::Result<(Self, String)> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("fleetvault test db CA {name}"),
        );
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &*ca)?;
        let tls = ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok((Self::start_with(name, Some(tls))?, ca.pem()))
    }

    fn start_with(name: &str, tls: Option<ServerTls>) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let root = tempfile::Builder::new()
            .prefix(&format!("fv-pg-{name}-"))
            .tempdir()?;
        let dir = root.path();
        let pwfile = dir.join("initdb-pw");
        std::fs::write(&pwfile, format!("{DB_PASSWORD}\n"))?;
        chown(dir, "postgres")?;
        let data = dir.join("data");
        run(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["-E", "UTF8", "--locale=C.UTF-8"]),
            COMMAND_TIMEOUT,
        )?
        .ensure_success()
        .context("initdb")?;
        // The agent (root) reads its password from a file only it may read.
        let password_file = root.path().join("../").join(format!(
            "{}.pw",
            root.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("pg")
        ));
        write_private(&password_file, DB_PASSWORD)?;
        let port = free_tcp_port()?;
        let mut settings = vec![
            "listen_addresses=".to_owned(),
            "fsync=off".to_owned(),
            "max_connections=50".to_owned(),
        ];
        if let Some(tls) = &tls {
            std::fs::write(data.join("server.crt"), &tls.cert_pem)?;
            write_private(&data.join("server.key"), &tls.key_pem)?;
            chown(&data, "postgres")?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all scram-sha-256\n\
                 hostnossl all all 0.0.0.0/0 reject\n\
                 hostnossl all all ::/0 reject\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n",
            )?;
            settings[0] = "listen_addresses=127.0.0.1".to_owned();
            settings.extend(
                [
                    "ssl=on",
                    "ssl_cert_file=server.crt",
                    "ssl_key_file=server.key",
                ]
                .map(String::from),
            );
        }
        let logs = dir.join("server.log");
        let proc = Proc::spawn(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(dir)
                .args(settings.iter().flat_map(|s| ["-c", s.as_str()])),
            &format!("postgres {name}"),
            &logs,
            &dir.join("server.stdout"),
        )?;
        proc.wait_for_line("ready to accept connections", Duration::from_secs(60))?;
        eprintln!("postgres {name} dir {} port {port}", dir.display());
        Ok(Self {
            proc: Some(proc),
            port,
            root: Some(root),
            password_file,
        })
    }

    /// The socket directory (the `host` of a source).
    pub fn host(&self) -> &Path {
        self.root
            .as_ref()
            .map_or(Path::new("/nonexistent"), |r| r.path())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A file holding the superuser's password, mode 0600.
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// A `[[sources]]` table for database `db` (`format` = tables, plain or custom).
    pub fn source_toml(&self, name: &str, db: &str, format: &str) -> String {
        format!(
            "\n[[sources]]\nname = \"{name}\"\nkind = \"postgres\"\ndatabase = \"{db}\"\nhost = \"{}\"\nport = {}\nuser = \"postgres\"\npassword_file = \"{}\"\nformat = \"{format}\"\n",
            self.host().display(),
            self.port,
            self.password_file.display()
        )
    }

    /// Runs SQL with psql in `db`; returns its unaligned, tuples-only output.
    pub fn sql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = self.psql(db, sql)?;
        if !out.success() {
            bail!("psql in {db} failed: {}\n{sql}", out.stderr.trim());
        }
        Ok(out.stdout.trim_end().to_owned())
    }

    /// Runs SQL with psql, whatever the outcome.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<Output> {
        run(
            Command::new("psql")
                .env("PGPASSWORD", DB_PASSWORD)
                .arg("-h")
                .arg(self.host())
                .arg("-p")
                .arg(self.port.to_string())
                .args([
                    "-U",
                    "postgres",
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                ])
                .arg("-d")
                .arg(db)
                .arg("-c")
                .arg(sql),
            COMMAND_TIMEOUT,
        )
    }

    /// A digest of every user table's rows (sorted), every sequence's value and the row
    /// counts, to compare databases by content.
    pub fn content(&self, db: &str) -> anyhow::Result<String> {
        let tables = self.sql(
            db,
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        )?;
        let mut out = String::new();
        for t in tables.lines() {
            let digest = self.sql(
                db,
                &format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '-') FROM {t} x"
                ),
            )?;
            out.push_str(&format!("{t}: {digest}\n"));
        }
        let seqs = self.sql(
            db,
            "SELECT format('%I.%I', schemaname, sequencename) || ' ' || coalesce(last_value::text, 'unset')
             FROM pg_sequences ORDER BY 1",
        )?;
        out.push_str(&seqs);
        out.push('\n');
        // Objects without rows: indexes, constraints, views, functions, large objects.
        for q in [
            "SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'",
            "SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
            "SELECT string_agg(viewname, ',' ORDER BY viewname) FROM pg_views WHERE schemaname = 'public'",
            "SELECT string_agg(proname, ',' ORDER BY proname) FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid)), '-') FROM pg_largeobject_metadata",
        ] {
            out.push_str(&self.sql(db, q)?);
            out.push('\n');
        }
        Ok(out)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // runuser does not pass a SIGKILL on: stop the server itself first.
        if let (Ok(bin), Some(root)) = (pg_bin(), self.root.as_ref()) {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(root.path().join("data"))
                .args(["stop", "-m", "immediate", "-w"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        drop(self.proc.take());
        let _ = std::fs::remove_file(&self.password_file);
        if let Some(root) = self.root.take() {
            crate::keep_or_remove(root);
        }
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A MariaDB server of its own.
pub struct MariaDb {
    proc: Option<Proc>,
    port: u16,
    root: Option<tempfile::TempDir>,
    password_file: PathBuf,
}

impl MariaDb {
    /// `mariadb-install-db` and start; sets the root password.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix(&format!("fv-maria-{name}-"))
            .tempdir()?;
        let dir = root.path();
        let data = dir.join("data");
        std::fs::create_dir(&data)?;
        // Its own temporary directory: another process cleaning /tmp must not delete a temp
        // table's file under a running query (seen once as "Error on delete of '/tmp/#sql-...'").
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp)?;
        chown(dir, "mysql")?;
        run(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args([
                    "--user=mysql",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ]),
            COMMAND_TIMEOUT,
        )?
        .ensure_success()
        .context("mariadb-install-db (is mariadb-server installed?)")?;
        let port = free_tcp_port()?;
        let socket = dir.join("mysqld.sock");
        let proc = Proc::spawn(
            Command::new("mariadbd")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .arg(format!("--port={port}"))
                .args([
                    "--bind-address=127.0.0.1",
                    "--user=mysql",
                    "--skip-name-resolve",
                    "--innodb-flush-log-at-trx-commit=0",
                    "--innodb-buffer-pool-size=64M",
                ])
                .arg(format!("--pid-file={}", dir.join("mysqld.pid").display())),
            &format!("mariadb {name}"),
            &dir.join("server.log"),
            &dir.join("server.stdout"),
        )?;
        proc.wait_for_line("ready for connections", Duration::from_secs(90))?;
        let password_file = root.path().join("../").join(format!(
            "{}.pw",
            root.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("maria")
        ));
        write_private(&password_file, DB_PASSWORD)?;
        let m = Self {
            proc: Some(proc),
            port,
            root: Some(root),
            password_file,
        };
        let out = m.client(
            None,
            &format!("ALTER USER root@localhost IDENTIFIED BY '{DB_PASSWORD}'; FLUSH PRIVILEGES"),
            false,
        )?;
        if !out.success() {
            bail!("setting the root password: {}", out.stderr);
        }
        eprintln!("mariadb {name} dir {} port {port}", m.dir().display());
        Ok(m)
    }

    fn dir(&self) -> &Path {
        self.root
            .as_ref()
            .map_or(Path::new("/nonexistent"), |r| r.path())
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's socket (the `host` of a source).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("mysqld.sock")
    }

    /// A file holding root's password, mode 0600.
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// A `[[sources]]` table for database `db`.
    pub fn source_toml(&self, name: &str, db: &str) -> String {
        format!(
            "\n[[sources]]\nname = \"{name}\"\nkind = \"mysql\"\ndatabase = \"{db}\"\nhost = \"{}\"\nuser = \"root\"\npassword_file = \"{}\"\n",
            self.socket().display(),
            self.password_file.display()
        )
    }

    fn client(&self, db: Option<&str>, sql: &str, password: bool) -> anyhow::Result<Output> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql]);
        if password {
            cmd.env("MYSQL_PWD", DB_PASSWORD);
        }
        if let Some(d) = db {
            cmd.arg(d);
        }
        run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// Runs SQL (in `db` when given); returns the tab-separated output.
    pub fn sql(&self, db: Option<&str>, sql: &str) -> anyhow::Result<String> {
        let out = self.client(db, sql, true)?;
        if !out.success() {
            bail!("mariadb failed: {}\n{sql}", out.stderr.trim());
        }
        Ok(out.stdout.trim_end().to_owned())
    }

    /// A digest of every table's rows (`CHECKSUM TABLE` plus counts), views and routines.
    pub fn content(&self, db: &str) -> anyhow::Result<String> {
        let tables = self.sql(
            None,
            &format!(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1"
            ),
        )?;
        let mut out = String::new();
        for t in tables.lines() {
            let count = self.sql(Some(db), &format!("SELECT COUNT(*) FROM `{t}`"))?;
            let sum = self.sql(Some(db), &format!("CHECKSUM TABLE `{t}` EXTENDED"))?;
            let sum = sum.split('\t').nth(1).unwrap_or("").to_owned();
            out.push_str(&format!("{t}: {count} rows, checksum {sum}\n"));
        }
        out.push_str(&self.sql(
            None,
            &format!(
                "SELECT CONCAT(TABLE_NAME, ' view') FROM information_schema.VIEWS WHERE TABLE_SCHEMA = '{db}' ORDER BY 1"
            ),
        )?);
        out.push('\n');
        out.push_str(&self.sql(
            None,
            &format!(
                "SELECT CONCAT(ROUTINE_NAME, ' ', ROUTINE_TYPE) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{db}' ORDER BY 1"
            ),
        )?);
        Ok(out)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_file(&self.password_file);
        if let Some(root) = self.root.take() {
            crate::keep_or_remove(root);
        }
    }
}
