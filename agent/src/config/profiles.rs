//! Application profiles: a bundle described by the application's own configuration.
//!
//! - `mattermost`: `ROOT/config/config.json`: `SqlSettings.DriverName` (`postgres` or `mysql`)
//!   and `SqlSettings.DataSource` give the database, `FileSettings.Directory` the files; plus
//!   `config/`, `plugins/` and `client/plugins/`. Hooks: stop and start the `mattermost`
//!   service.
//! - `chatwoot`: `ROOT/.env`: `DATABASE_URL`, or `POSTGRES_HOST`/`_PORT`/`_USERNAME`/
//!   `_PASSWORD`/`_DATABASE`; plus `storage/` and the `.env` file. Hooks: the `chatwoot`
//!   service.
//! - `rocketchat`: `MONGO_URL` from `ROOT/.env` (or `mongo_url`), uploads in `ROOT/uploads`.
//!   Hooks stop the app server only (MongoDB keeps running for the dump, as in seed 000).
//!
//! Credentials read here go into the generated database source and nowhere else: they are
//! never logged nor shown by `fleetvault-agent bundles`.
//!
//! One cohesive thing (about 430 lines of code and its tests): each profile's reading of its
//! application's configuration and the clone's rewrite of that same file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{DbSource, Engine, PgFormat, Secret};

/// What a profile found: the database and the file parts, in backup order after it.
#[derive(Debug)]
pub(crate) struct Expanded {
    pub(crate) database: DbSource,
    /// `(suffix, paths)`: each becomes a files source `BUNDLE-SUFFIX`.
    pub(crate) files: Vec<(&'static str, Vec<PathBuf>)>,
    /// The app's service name for the default hooks.
    pub(crate) service: &'static str,
    /// The configuration file a clone rewrites.
    pub(crate) config_file: PathBuf,
}

/// A database URL `scheme://user:password@host:port/name?params`, percent-decoded.
#[derive(Debug, Default, PartialEq)]
struct Url {
    user: Option<String>,
    password: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: String,
}

/// `s` with its `%XX` escapes decoded (an invalid escape is kept as it is; invalid UTF-8
/// becomes U+FFFD).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_url(url: &str, what: &str) -> anyhow::Result<Url> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .with_context(|| format!("{what} is not a URL (scheme://user:password@host/db)"))?;
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut u = Url::default();
    if let Some(ui) = userinfo {
        let (user, pass) = match ui.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (ui, None),
        };
        u.user = Some(percent_decode(user)).filter(|s| !s.is_empty());
        u.password = pass.map(percent_decode);
    }
    let hostport = hostport.split(',').next().unwrap_or("");
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (h, Some(p)),
        _ => (hostport, None),
    };
    u.host = Some(percent_decode(host)).filter(|s| !s.is_empty());
    if let Some(p) = port {
        u.port = Some(
            p.parse()
                .with_context(|| format!("{what}: port {p:?} is not a number"))?,
        );
    }
    u.database = percent_decode(path);
    if u.database.is_empty() {
        bail!("{what} names no database");
    }
    Ok(u)
}

/// Mattermost's MySQL DSN: `user:password@tcp(host:port)/db?params` (or `unix(/sock)`).
fn parse_mysql_dsn(dsn: &str) -> anyhow::Result<Url> {
    let what = "SqlSettings.DataSource";
    let (userinfo, rest) = dsn
        .rsplit_once('@')
        .with_context(|| format!("{what} is not user:password@tcp(host:port)/database"))?;
    let (user, password) = match userinfo.split_once(':') {
        Some((a, b)) => (a.to_owned(), Some(b.to_owned())),
        None => (userinfo.to_owned(), None),
    };
    let addr_end = match rest.find(")/") {
        Some(i) if rest.starts_with("tcp(") || rest.starts_with("unix(") => i + 1,
        _ => rest
            .find('/')
            .with_context(|| format!("{what} names no database"))?,
    };
    let (addr, path) = (&rest[..addr_end], &rest[addr_end + 1..]);
    let database = path.split('?').next().unwrap_or("").to_owned();
    if database.is_empty() {
        bail!("{what} names no database");
    }
    let mut u = Url {
        user: Some(user).filter(|s| !s.is_empty()),
        password,
        database,
        ..Url::default()
    };
    if let Some(inner) = addr.strip_prefix("tcp(").and_then(|a| a.strip_suffix(')')) {
        match inner.rsplit_once(':') {
            Some((h, p)) => {
                u.host = Some(h.to_owned());
                u.port = Some(
                    p.parse()
                        .with_context(|| format!("{what}: bad port {p:?}"))?,
                );
            }
            None => u.host = Some(inner.to_owned()),
        }
    } else if let Some(sock) = addr.strip_prefix("unix(").and_then(|a| a.strip_suffix(')')) {
        u.host = Some(sock.to_owned());
    } else if !addr.is_empty() {
        bail!("{what}: address {addr:?} is neither tcp(host:port) nor unix(/socket)");
    }
    Ok(u)
}

fn database(engine: Engine, u: Url) -> DbSource {
    DbSource {
        engine,
        database: u.database,
        host: u.host,
        port: u.port,
        user: u.user,
        password_file: None,
        password: u.password.map(Secret),
        uri: None,
        format: PgFormat::Tables,
        restore_jobs: 2,
        restrict_key: None,
        pg_tls: Default::default(),
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The directories among `rels` (under `root`) that exist.
fn existing(root: &Path, rels: &[&str]) -> Vec<PathBuf> {
    rels.iter()
        .map(|r| root.join(r))
        .filter(|p| p.is_dir())
        .collect()
}

/// Mattermost under `root`.
pub(crate) fn mattermost(root: &Path) -> anyhow::Result<Expanded> {
    let path = root.join("config").join("config.json");
    let text = read(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    let key = |section: &str, k: &str| -> anyhow::Result<String> {
        v[section][k].as_str().map(str::to_owned).with_context(|| {
            format!(
                "{}: key `{section}.{k}` is missing or not a string",
                path.display()
            )
        })
    };
    let driver = key("SqlSettings", "DriverName")?;
    let source = key("SqlSettings", "DataSource")?;
    let at =
        |e: anyhow::Error| e.context(format!("{}: key `SqlSettings.DataSource`", path.display()));
    let database = match driver.as_str() {
        "postgres" => database(
            Engine::Postgres,
            parse_url(&source, "SqlSettings.DataSource").map_err(at)?,
        ),
        "mysql" => database(Engine::Mysql, parse_mysql_dsn(&source).map_err(at)?),
        other => bail!(
            "{}: key `SqlSettings.DriverName`: {other:?} is not \"postgres\" or \"mysql\"",
            path.display()
        ),
    };
    let dir = v["FileSettings"]["Directory"]
        .as_str()
        .unwrap_or("./data/")
        .to_owned();
    let data: PathBuf = root.join(&dir).components().collect();
    let mut files = vec![("data", vec![data]), ("config", vec![root.join("config")])];
    let plugins = existing(root, &["plugins", "client/plugins"]);
    if !plugins.is_empty() {
        files.push(("plugins", plugins));
    }
    Ok(Expanded {
        database,
        files,
        service: "mattermost",
        config_file: path,
    })
}

/// `KEY=value` lines of a dotenv file (quotes removed, comments and blanks skipped).
pub(crate) fn dotenv(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// Chatwoot under `root`.
pub(crate) fn chatwoot(root: &Path) -> anyhow::Result<Expanded> {
    let path = root.join(".env");
    let env = dotenv(&read(&path)?);
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let u = match get("DATABASE_URL").filter(|v| !v.is_empty()) {
        Some(url) => parse_url(&url, "DATABASE_URL")
            .map_err(|e| e.context(format!("{}: key `DATABASE_URL`", path.display())))?,
        None => {
            let rails = get("RAILS_ENV").unwrap_or_else(|| "production".into());
            Url {
                user: get("POSTGRES_USERNAME"),
                password: get("POSTGRES_PASSWORD"),
                host: get("POSTGRES_HOST"),
                port: match get("POSTGRES_PORT") {
                    Some(p) => Some(p.parse().with_context(|| {
                        format!(
                            "{}: key `POSTGRES_PORT`: {p:?} is not a number",
                            path.display()
                        )
                    })?),
                    None => None,
                },
                database: get("POSTGRES_DATABASE")
                    .filter(|d| !d.is_empty())
                    .unwrap_or(format!("chatwoot_{rails}")),
            }
        }
    };
    Ok(Expanded {
        database: database(Engine::Postgres, u),
        files: vec![
            ("storage", vec![root.join("storage")]),
            ("env", vec![path.clone()]),
        ],
        service: "chatwoot",
        config_file: path,
    })
}

/// Rocket.Chat under `root`; `mongo_url` overrides `MONGO_URL` of `ROOT/.env`.
pub(crate) fn rocketchat(root: &Path, mongo_url: Option<&str>) -> anyhow::Result<Expanded> {
    let path = root.join(".env");
    let url = match mongo_url {
        Some(u) => u.to_owned(),
        None => dotenv(&read(&path)?)
            .into_iter()
            .rev()
            .find(|(k, _)| k == "MONGO_URL")
            .map(|(_, v)| v)
            .with_context(|| format!("{}: key `MONGO_URL` is missing", path.display()))?,
    };
    let u = parse_url(&url, "MONGO_URL")?;
    // The database goes to the tools separately (`--db`): the URI keeps only the server.
    let server_uri = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
            let query = tail
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{scheme}://{authority}/{query}")
        }
        None => url.clone(),
    };
    let database = DbSource {
        engine: Engine::Mongodb,
        database: u.database,
        host: None,
        port: None,
        user: None,
        password_file: None,
        password: None,
        uri: Some(server_uri),
        format: PgFormat::Plain,
        restore_jobs: 1,
        restrict_key: None,
        pg_tls: Default::default(),
    };
    Ok(Expanded {
        database,
        files: vec![("uploads", vec![root.join("uploads")])],
        service: "rocketchat-server",
        config_file: path,
    })
}

/// Expands `profile` under `root`. When the application's configuration file does not exist
/// (a host the app is restored onto), the parts are the profile's default layout and the
/// database is left unknown (`database` empty) until the restored configuration names it.
pub(crate) fn expand(
    profile: &str,
    root: &Path,
    mongo_url: Option<&str>,
) -> anyhow::Result<Expanded> {
    let found = match profile {
        "mattermost" => mattermost(root),
        "chatwoot" => chatwoot(root),
        "rocketchat" => rocketchat(root, mongo_url),
        other => bail!("{other:?} is not one of \"mattermost\", \"rocketchat\", \"chatwoot\""),
    };
    let config_file = match profile {
        "mattermost" => root.join("config").join("config.json"),
        _ => root.join(".env"),
    };
    if found.is_ok() || config_file.exists() {
        return found;
    }
    let unknown = |engine| DbSource {
        engine,
        database: String::new(),
        host: None,
        port: None,
        user: None,
        password_file: None,
        password: None,
        uri: mongo_url.map(str::to_owned),
        format: if engine == Engine::Postgres {
            PgFormat::Tables
        } else {
            PgFormat::Plain
        },
        restore_jobs: 2,
        restrict_key: None,
        pg_tls: Default::default(),
    };
    Ok(match profile {
        "mattermost" => Expanded {
            database: unknown(Engine::Postgres),
            files: vec![
                ("data", vec![root.join("data")]),
                ("config", vec![root.join("config")]),
                (
                    "plugins",
                    vec![root.join("plugins"), root.join("client/plugins")],
                ),
            ],
            service: "mattermost",
            config_file,
        },
        "chatwoot" => Expanded {
            database: unknown(Engine::Postgres),
            files: vec![
                ("storage", vec![root.join("storage")]),
                ("env", vec![config_file.clone()]),
            ],
            service: "chatwoot",
            config_file,
        },
        _ => Expanded {
            database: unknown(Engine::Mongodb),
            files: vec![("uploads", vec![root.join("uploads")])],
            service: "rocketchat-server",
            config_file,
        },
    })
}

/// Rewrites the app's configuration text for a clone: the database name `old_db` becomes
/// `new_db`, and absolute paths under `old_root` move under `new_root`.
pub(crate) fn rewrite_config(
    profile: &str,
    text: &str,
    old_db: &str,
    new_db: Option<&str>,
    old_root: &Path,
    new_root: &Path,
) -> anyhow::Result<String> {
    let (old_r, new_r) = (old_root.to_string_lossy(), new_root.to_string_lossy());
    let mut out = text.to_owned();
    if let Some(new_db) = new_db {
        match profile {
            "mattermost" => {
                let v: serde_json::Value = serde_json::from_str(text).context("config.json")?;
                let ds = v["SqlSettings"]["DataSource"].as_str().unwrap_or_default();
                let new_ds = replace_db_in_source(ds, old_db, new_db);
                // Replaced as encoded JSON strings, so the file's layout stays as it was.
                out = out.replace(
                    &serde_json::to_string(ds)?,
                    &serde_json::to_string(&new_ds)?,
                );
            }
            _ => {
                let mut lines = Vec::new();
                let mut named = false;
                for line in out.lines() {
                    let key = line.split('=').next().unwrap_or("").trim();
                    if key == "DATABASE_URL" || key == "MONGO_URL" {
                        lines.push(replace_db_in_source(line, old_db, new_db));
                    } else if key == "POSTGRES_DATABASE" {
                        named = true;
                        lines.push(format!("POSTGRES_DATABASE={new_db}"));
                    } else {
                        lines.push(line.to_owned());
                    }
                }
                if profile == "chatwoot" && !named && !out.contains("DATABASE_URL=") {
                    lines.push(format!("POSTGRES_DATABASE={new_db}"));
                }
                out = lines.join("\n") + "\n";
            }
        }
    }
    Ok(out.replace(&format!("{old_r}/"), &format!("{new_r}/")))
}

/// `…/old_db?…` or `…/old_db` at the end of a URL or DSN becomes `…/new_db`.
fn replace_db_in_source(s: &str, old_db: &str, new_db: &str) -> String {
    for end in ["?", "\"", "'", ""] {
        let pat = format!("/{old_db}{end}");
        if end.is_empty() {
            if let Some(prefix) = s.strip_suffix(&pat) {
                return format!("{prefix}/{new_db}");
            }
        } else if let Some(i) = s.rfind(&pat) {
            return format!("{}/{new_db}{end}{}", &s[..i], &s[i + pat.len()..]);
        }
    }
    s.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_dsns_parse() {
        let u = parse_url(
            "postgres://mm%40user:p%3Ass@db.local:5433/mattermost?sslmode=disable",
            "x",
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("mm@user"));
        assert_eq!(u.password.as_deref(), Some("p:ss"));
        assert_eq!((u.host.as_deref(), u.port), (Some("db.local"), Some(5433)));
        assert_eq!(u.database, "mattermost");
        let m =
            parse_mysql_dsn("mmuser:secret@tcp(127.0.0.1:3306)/mattermost?charset=utf8mb4,utf8")
                .unwrap();
        assert_eq!(
            (m.user.as_deref(), m.password.as_deref()),
            (Some("mmuser"), Some("secret"))
        );
        assert_eq!(
            (m.host.as_deref(), m.port, m.database.as_str()),
            (Some("127.0.0.1"), Some(3306), "mattermost")
        );
        let s = parse_mysql_dsn("u:p@unix(/run/mysqld/mysqld.sock)/mm").unwrap();
        assert_eq!(s.host.as_deref(), Some("/run/mysqld/mysqld.sock"));
        assert!(parse_url("postgres://host/", "DATABASE_URL")
            .unwrap_err()
            .to_string()
            .contains("DATABASE_URL"));
    }

    #[test]
    fn percent_escapes_decode_and_bad_ones_stay() {
        assert_eq!(percent_decode("a%41%zz%4"), "aA%zz%4");
        assert_eq!(percent_decode("p%C3%A9%3A"), "pé:");
    }

    #[test]
    fn rocketchat_takes_the_database_out_of_the_mongo_url() {
        let dir = tempfile::tempdir().unwrap();
        let e = rocketchat(
            dir.path(),
            Some("mongodb://u:p@db:27017/rocketchat?replicaSet=rs0"),
        )
        .unwrap();
        assert_eq!(e.database.database, "rocketchat");
        assert_eq!(
            e.database.uri.as_deref(),
            Some("mongodb://u:p@db:27017/?replicaSet=rs0")
        );
        assert_eq!(e.service, "rocketchat-server");
    }

    #[test]
    fn dotenv_reads_quotes_comments_and_exports() {
        let env = dotenv("# c\nA=1\nexport B=\"two words\"\n\nC='x=y'\n");
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x=y".into())
            ]
        );
    }

    #[test]
    fn clone_rewrites_point_at_the_new_database_and_root() {
        let json = "{\n  \"SqlSettings\": {\n    \"DriverName\": \"postgres\",\n    \"DataSource\": \"postgres://u:p@h/mattermost?sslmode=disable\"\n  },\n  \"FileSettings\": {\"Directory\": \"/opt/mm/data/\"}\n}\n";
        let out = rewrite_config(
            "mattermost",
            json,
            "mattermost",
            Some("mm_staging"),
            Path::new("/opt/mm"),
            Path::new("/srv/staging"),
        )
        .unwrap();
        assert!(
            out.contains("postgres://u:p@h/mm_staging?sslmode=disable"),
            "{out}"
        );
        assert!(out.contains("/srv/staging/data/"), "{out}");
        let env = "DATABASE_URL=postgres://u:p@h:5432/chatwoot\nSECRET_KEY_BASE=x\n";
        let out = rewrite_config(
            "chatwoot",
            env,
            "chatwoot",
            Some("cw2"),
            Path::new("/a"),
            Path::new("/b"),
        )
        .unwrap();
        assert!(
            out.contains("DATABASE_URL=postgres://u:p@h:5432/cw2\n"),
            "{out}"
        );
        let env = "POSTGRES_HOST=h\nRAILS_ENV=production\n";
        let out = rewrite_config(
            "chatwoot",
            env,
            "chatwoot_production",
            Some("cw2"),
            Path::new("/a"),
            Path::new("/b"),
        )
        .unwrap();
        assert!(out.contains("POSTGRES_DATABASE=cw2"), "{out}");
    }
}
