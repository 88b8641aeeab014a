//! `[[jobs]]` tables and the cron schedules of jobs, GC, verification and replicas: parsed and
//! checked when `coordinator.toml` is loaded.

use std::str::FromStr;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// One `[[jobs]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobConfig {
    pub(crate) name: String,
    pub(crate) agents: Vec<String>,
    #[serde(default = "all")]
    pub(crate) sources: Vec<String>,
    pub(crate) schedule: String,
    #[serde(default)]
    pub(crate) retention: Policy,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

/// The globs of `key`, compiled.
pub(crate) fn globs(patterns: &[String], key: &'static str) -> Result<GlobSet, ConfigError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| ConfigError::Value {
            key,
            reason: format!("bad glob {p:?}: {e}"),
        })?);
    }
    b.build().map_err(|e| ConfigError::Value {
        key,
        reason: e.to_string(),
    })
}

impl JobConfig {
    /// Checks the schedule and the globs.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        parse_schedule(&self.schedule).map_err(|source| ConfigError::Schedule {
            key: "schedule",
            source,
        })?;
        if self.agents.is_empty() {
            return Err(ConfigError::Empty("agents"));
        }
        globs(&self.agents, "agents")?;
        globs(&self.sources, "sources")?;
        Ok(())
    }

    /// Whether this job backs up `source` of `agent`.
    pub(crate) fn matches(&self, agent: &str, source: &str) -> bool {
        let (Ok(a), Ok(s)) = (
            globs(&self.agents, "agents"),
            globs(&self.sources, "sources"),
        ) else {
            return false;
        };
        a.is_match(agent) && s.is_match(source)
    }

    /// Whether this job names `agent` at all.
    pub(crate) fn matches_agent(&self, agent: &str) -> bool {
        globs(&self.agents, "agents").is_ok_and(|a| a.is_match(agent))
    }
}

/// A cron expression that is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScheduleError {
    /// Not 5 or 6 fields.
    #[error("{expr:?} has {fields} fields; expected 5, or 6 with seconds first")]
    Fields { expr: String, fields: usize },
    /// A weekday number over 7.
    #[error("weekday {0} is not 0-7")]
    Weekday(u32),
    /// What the cron crate refuses, the last line of its message.
    #[error("{expr:?}: {why}")]
    Cron { expr: String, why: String },
}

/// Parses a cron expression: 5 fields (minute hour day month weekday), or 6 with seconds
/// first. Weekdays are 0-7 with 0 and 7 Sunday, or names, as in crontab(5).
pub(crate) fn parse_schedule(expr: &str) -> Result<cron::Schedule, ScheduleError> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let mut fields: Vec<String> = match fields.len() {
        5 => std::iter::once("0")
            .chain(fields)
            .map(str::to_owned)
            .collect(),
        6 => fields.into_iter().map(str::to_owned).collect(),
        n => {
            return Err(ScheduleError::Fields {
                expr: expr.to_owned(),
                fields: n,
            })
        }
    };
    fields[5] = crontab_weekdays(&fields[5])?;
    cron::Schedule::from_str(&fields.join(" ")).map_err(|e| {
        // The cron crate's message repeats the expression with a caret line; its last line
        // says what is wrong.
        let e = e.to_string();
        let why = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        ScheduleError::Cron {
            expr: expr.to_owned(),
            why: why.trim().to_owned(),
        }
    })
}

/// The next run of `schedule` after `from` (the last run, or the scheduler's start); an
/// occurrence already missed (coordinator down or busy) is skipped for the next one from `now`.
pub(crate) fn next_due(
    schedule: &cron::Schedule,
    from: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = schedule.after(&from).next()?;
    if t + chrono::Duration::seconds(1) < now {
        schedule.after(&now).next()
    } else {
        Some(t)
    }
}

/// crontab weekdays (0-7, Sunday 0 or 7) to the cron crate's (1-7, Sunday 1).
fn crontab_weekdays(field: &str) -> Result<String, ScheduleError> {
    let map = |n: &str| -> Result<String, ScheduleError> {
        match n.parse::<u32>() {
            Ok(d) if d <= 7 => Ok(((d % 7) + 1).to_string()),
            Ok(d) => Err(ScheduleError::Weekday(d)),
            Err(_) => Ok(n.to_owned()),
        }
    };
    field
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((a, b)) => format!("{}-{}", map(a)?, map(b)?),
                None => map(range)?,
            };
            Ok(match step {
                Some(s) => format!("{range}/{s}"),
                None => range,
            })
        })
        .collect::<Result<Vec<_>, ScheduleError>>()
        .map(|v| v.join(","))
}

/// A job's `[jobs.retention]` table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Policy {
    #[serde(default)]
    pub(crate) keep_last: u32,
    #[serde(default)]
    pub(crate) keep_hourly: u32,
    #[serde(default)]
    pub(crate) keep_daily: u32,
    #[serde(default)]
    pub(crate) keep_weekly: u32,
    #[serde(default)]
    pub(crate) keep_monthly: u32,
    #[serde(default)]
    pub(crate) keep_yearly: u32,
}

impl Policy {
    /// Whether no rule is set (everything is kept).
    pub(crate) fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Utc};

    #[test]
    fn schedules_with_five_and_six_fields() {
        let t = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        let s = parse_schedule("0 2 * * *").unwrap();
        let next = s.after(&t).next().unwrap();
        assert_eq!((next.day(), next.hour(), next.minute()), (2, 2, 0));
        let s = parse_schedule("*/5 * * * * *").unwrap();
        assert_eq!(s.after(&t).next().unwrap().second(), 5);
        // crontab weekday 1 is Monday; 2026-12-07 is a Monday.
        let s = parse_schedule("30 4 * * 1").unwrap();
        let next = s.after(&t).next().unwrap();
        assert_eq!((next.day(), next.weekday()), (7, chrono::Weekday::Mon));
        assert!(parse_schedule("0 2 * *").is_err());
        assert!(parse_schedule("0 2 * * 9").is_err());
        let e = parse_schedule("0 99 * * *").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("99"), "{e}");
    }

    #[test]
    fn jobs_match_agents_and_sources_by_glob() {
        let job = JobConfig {
            name: "nightly".into(),
            agents: vec!["chat-*".into()],
            sources: vec!["*-db".into()],
            schedule: "0 2 * * *".into(),
            retention: Policy::default(),
        };
        assert!(job.validate().is_ok());
        assert!(job.matches("chat-01", "mattermost-db"));
        assert!(!job.matches("web-01", "mattermost-db"));
        assert!(!job.matches("chat-01", "uploads"));
    }
}
