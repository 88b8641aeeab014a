//! Naming a snapshot on the command line as people do with restic and git: the full id, any
//! unique prefix of at least four hex digits, or `latest` (the newest completed snapshot of
//! a source).

use crate::exit::UsageError;
use crate::protocol::SnapshotFilter;
use crate::{Client, SnapshotId, SnapshotRecord};

/// The fewest hex digits a prefix must have.
pub const MIN_PREFIX: usize = 4;

/// Turns `spec` into a snapshot id, asking the coordinator when it is not a full id. `agent`
/// and `source` narrow the search (`latest` needs `source`). An unknown or ambiguous name is
/// an error that says so (ambiguous: listing the candidates).
pub async fn resolve(
    client: &Client,
    spec: &str,
    agent: Option<&str>,
    source: Option<&str>,
) -> anyhow::Result<SnapshotId> {
    let query = Query::parse(spec)?;
    if let Query::Full(id) = query {
        return Ok(id);
    }
    let filter = SnapshotFilter {
        agent: agent.map(str::to_owned),
        source: source.map(str::to_owned),
        status: None,
        job: None,
    };
    let list = client.list_snapshots(filter).await?;
    pick(&query, &list, agent, source)
}

/// A parsed snapshot name.
#[derive(Debug, PartialEq)]
enum Query {
    Full(SnapshotId),
    Prefix(String),
    Latest,
}

impl Query {
    fn parse(spec: &str) -> Result<Self, UsageError> {
        if spec == "latest" {
            return Ok(Query::Latest);
        }
        if let Ok(id) = spec.parse() {
            return Ok(Query::Full(id));
        }
        let hex = spec.to_ascii_lowercase();
        if hex.len() >= MIN_PREFIX && hex.len() < 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Query::Prefix(hex));
        }
        Err(UsageError(format!(
            "{spec:?} is not a snapshot id: give the 16 hex digits, a unique prefix of at least {MIN_PREFIX}, or `latest`"
        )))
    }
}

fn pick(
    query: &Query,
    list: &[SnapshotRecord],
    agent: Option<&str>,
    source: Option<&str>,
) -> anyhow::Result<SnapshotId> {
    match query {
        Query::Full(id) => Ok(*id),
        Query::Latest => {
            let Some(source) = source else {
                return Err(UsageError(
                    "`latest` needs --source (the newest completed snapshot of which source?)"
                        .into(),
                )
                .into());
            };
            list.iter()
                .filter(|r| r.status == crate::SnapshotStatus::Completed && r.source == source)
                .filter(|r| agent.is_none_or(|a| r.agent == a))
                .max_by_key(|r| (r.started_ms, r.id.to_string()))
                .map(|r| r.id)
                .ok_or_else(|| {
                    let whose = agent.map(|a| format!(" of agent {a}")).unwrap_or_default();
                    anyhow::anyhow!("no completed snapshot of source {source}{whose}")
                })
        }
        Query::Prefix(p) => {
            let found: Vec<&SnapshotRecord> = list
                .iter()
                .filter(|r| r.id.to_string().starts_with(p.as_str()))
                .collect();
            match found.as_slice() {
                [one] => Ok(one.id),
                [] => anyhow::bail!("no snapshot id starts with {p}"),
                many => {
                    let shown: Vec<String> = many
                        .iter()
                        .take(10)
                        .map(|r| {
                            format!(
                                "{} ({}/{}, {})",
                                r.id,
                                r.agent,
                                r.source,
                                crate::report::format_time(r.started_ms)
                            )
                        })
                        .collect();
                    let more = if many.len() > 10 {
                        format!(" and {} more", many.len() - 10)
                    } else {
                        String::new()
                    };
                    Err(UsageError(format!(
                        "snapshot prefix {p} is ambiguous: {}{more}",
                        shown.join(", ")
                    ))
                    .into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SnapshotStatus;
    use crate::ChunkerParams;

    fn rec(
        id: &str,
        agent: &str,
        source: &str,
        started_ms: u64,
        status: SnapshotStatus,
    ) -> SnapshotRecord {
        SnapshotRecord::new(
            id.parse().expect("id"),
            agent,
            source,
            "files",
            ChunkerParams::default(),
            started_ms,
            status,
        )
    }

    #[test]
    fn prefixes_latest_and_ambiguity() {
        let list = vec![
            rec("abcd000000000001", "a", "db", 10, SnapshotStatus::Completed),
            rec("abcd000000000002", "a", "db", 20, SnapshotStatus::Completed),
            rec(
                "ef01000000000003",
                "a",
                "db",
                30,
                SnapshotStatus::Failed { reason: "x".into() },
            ),
            rec("ef02000000000004", "b", "db", 40, SnapshotStatus::Completed),
        ];
        let q = |s: &str| Query::parse(s).expect("parses");
        assert_eq!(
            pick(&q("ef01"), &list, None, None)
                .expect("unique")
                .to_string(),
            "ef01000000000003"
        );
        let err = pick(&q("abcd"), &list, None, None).expect_err("ambiguous");
        assert!(err.is::<UsageError>(), "{err}");
        assert!(
            format!("{err}").contains("abcd000000000001")
                && format!("{err}").contains("abcd000000000002"),
            "{err}"
        );
        assert!(pick(&q("9999"), &list, None, None).is_err());
        // latest: completed only, newest first, narrowed by agent.
        assert_eq!(
            pick(&Query::Latest, &list, Some("a"), Some("db"))
                .expect("latest")
                .to_string(),
            "abcd000000000002"
        );
        assert_eq!(
            pick(&Query::Latest, &list, None, Some("db"))
                .expect("latest")
                .to_string(),
            "ef02000000000004"
        );
        assert!(pick(&Query::Latest, &list, None, None)
            .expect_err("needs source")
            .is::<UsageError>());
        assert!(Query::parse("abc").is_err(), "3 digits are too few");
        assert!(Query::parse("zzzz").is_err());
        assert_eq!(
            Query::parse("ABCD").expect("upper case"),
            Query::Prefix("abcd".into())
        );
    }
}
