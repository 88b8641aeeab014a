//! Retention: which snapshots of one agent and source a policy keeps, and why.
//!
//! The rule is restic's `forget` policy, on the times the coordinator stamped (never a time an
//! agent sent), in UTC:
//!
//! - Completed snapshots are taken newest first.
//! - `keep_last = n` keeps the `n` newest.
//! - `keep_hourly`, `keep_daily`, `keep_weekly` (ISO weeks), `keep_monthly`, `keep_yearly`
//!   `= n`: going from newest to oldest, the first snapshot seen in each hour (day, week, …)
//!   is kept, until `n` such periods have been kept. Periods without a snapshot do not count.
//! - A snapshot is kept when any rule keeps it (a snapshot can be the daily and the weekly
//!   one), and always when it is protected. Everything else is forgotten.
//! - A policy with no rule set keeps everything. Snapshots that are not completed (running,
//!   failed) are never decided here.

use serde::{Deserialize, Serialize};

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

/// One snapshot as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Candidate<Id> {
    pub(crate) id: Id,
    /// Coordinator-stamped time, unix milliseconds.
    pub(crate) time_ms: u64,
    pub(crate) protected: bool,
}

/// What the policy decided for one snapshot, with the reasons it is kept (empty: forgotten).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Decision<Id> {
    pub(crate) id: Id,
    pub(crate) reasons: Vec<String>,
}

impl<Id> Decision<Id> {
    pub(crate) fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// The period keys of a time for each bucketed rule (hour, day, ISO week, month, year; UTC).
fn buckets(time_ms: u64) -> [i64; 5] {
    use chrono::Datelike;
    let secs = (time_ms / 1000) as i64;
    let date = utc_date(time_ms);
    let week = date.iso_week();
    [
        secs.div_euclid(3600),
        secs.div_euclid(86_400),
        i64::from(week.year()) * 100 + i64::from(week.week()),
        i64::from(date.year()) * 100 + i64::from(date.month()),
        i64::from(date.year()),
    ]
}

fn utc_date(time_ms: u64) -> chrono::NaiveDate {
    chrono::DateTime::from_timestamp_millis(i64::try_from(time_ms).unwrap_or(i64::MAX))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
        .date_naive()
}

/// Applies `policy`; returns one decision per candidate, newest first.
pub(crate) fn apply<Id: Copy>(policy: &Policy, candidates: &[Candidate<Id>]) -> Vec<Decision<Id>> {
    let mut sorted: Vec<&Candidate<Id>> = candidates.iter().collect();
    sorted.sort_by_key(|c| std::cmp::Reverse(c.time_ms));
    let names = ["hourly", "daily", "weekly", "monthly", "yearly"];
    let mut left = [
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
        policy.keep_yearly,
    ];
    let mut last_bucket: [Option<i64>; 5] = [None; 5];
    let mut last_left = policy.keep_last;
    let keep_all = policy.is_empty();
    sorted
        .into_iter()
        .map(|c| {
            let mut reasons = Vec::new();
            if c.protected {
                reasons.push("protected".to_owned());
            }
            if keep_all {
                reasons.push("no retention rule".to_owned());
            }
            if last_left > 0 {
                last_left -= 1;
                reasons.push("last".to_owned());
            }
            for (i, b) in buckets(c.time_ms).into_iter().enumerate() {
                if left[i] > 0 && last_bucket[i] != Some(b) {
                    left[i] -= 1;
                    last_bucket[i] = Some(b);
                    reasons.push(names[i].to_owned());
                }
            }
            Decision { id: c.id, reasons }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    /// 2024-01-01T00:00:00Z.
    const START: u64 = 1_704_067_200_000;

    fn candidates(times: &[u64]) -> Vec<Candidate<usize>> {
        times
            .iter()
            .enumerate()
            .map(|(id, &time_ms)| Candidate {
                id,
                time_ms,
                protected: false,
            })
            .collect()
    }

    fn kept(policy: &Policy, c: &[Candidate<usize>]) -> Vec<usize> {
        let mut k: Vec<usize> = apply(policy, c)
            .into_iter()
            .filter(|d| d.keep())
            .map(|d| d.id)
            .collect();
        k.sort();
        k
    }

    #[test]
    fn buckets_use_iso_weeks_and_calendar_months() {
        let at = |y, m, d| {
            let date = chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap();
            date.and_hms_opt(12, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis() as u64
        };
        assert_eq!(buckets(at(2024, 2, 29))[1], 19_782);
        assert_eq!(buckets(at(2024, 2, 29))[3], 202_402);
        // 2021-01-03 is in ISO week 53 of 2020; 2024-12-30 in week 1 of 2025.
        assert_eq!(buckets(at(2021, 1, 3))[2], 202_053);
        assert_eq!(buckets(at(2024, 12, 30))[2], 202_501);
        assert_eq!(buckets(at(2024, 12, 30))[4], 2024);
        assert_eq!(buckets(at(2026, 12, 1))[2], 202_649);
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let c = candidates(&[START, START + 1, START + 2, START + 3, START + 4]);
        let policy = Policy {
            keep_last: 3,
            ..Policy::default()
        };
        assert_eq!(kept(&policy, &c), [2, 3, 4]);
    }

    #[test]
    fn daily_weekly_monthly_over_three_years_of_hourly_snapshots() {
        // A snapshot every 6 hours for three years (2024-2026).
        let times: Vec<u64> = (0..3 * 366 * 4).map(|i| START + i * 6 * HOUR).collect();
        let c = candidates(&times);
        let policy = Policy {
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 12,
            keep_yearly: 3,
            ..Policy::default()
        };
        let decisions = apply(&policy, &c);
        let keep: Vec<&Decision<usize>> = decisions.iter().filter(|d| d.keep()).collect();
        // Each kept snapshot is the newest of its period; periods overlap (the newest is
        // daily, weekly, monthly and yearly at once).
        let newest = times.len() - 1;
        assert_eq!(keep[0].id, newest);
        assert_eq!(keep[0].reasons, ["daily", "weekly", "monthly", "yearly"]);
        let count = |r: &str| {
            keep.iter()
                .filter(|d| d.reasons.iter().any(|x| x == r))
                .count()
        };
        assert_eq!(count("daily"), 7);
        assert_eq!(count("weekly"), 4);
        assert_eq!(count("monthly"), 12);
        assert_eq!(count("yearly"), 3);
        // Every daily one is the last snapshot of its day (18:00).
        for d in keep
            .iter()
            .filter(|d| d.reasons.iter().any(|x| x == "daily"))
        {
            assert_eq!((times[d.id] - START) % DAY, 18 * HOUR);
        }
        // The yearly ones are the last of each year.
        let yearly: Vec<u64> = keep
            .iter()
            .filter(|d| d.reasons.iter().any(|x| x == "yearly"))
            .map(|d| times[d.id])
            .collect();
        for t in &yearly[1..] {
            let date = utc_date(*t);
            assert_eq!(
                (date.month(), date.day()),
                (12, 31),
                "yearly snapshot on {date}"
            );
        }
        assert!(keep.len() < 7 + 4 + 12 + 3);
    }

    #[test]
    fn periods_without_snapshots_do_not_count_and_protected_stay() {
        // Daily snapshots with a 10-day gap in the middle.
        let mut times: Vec<u64> = (0..5).map(|i| START + i * DAY).collect();
        times.extend((15..20).map(|i| START + i * DAY));
        let mut c = candidates(&times);
        c[0].protected = true;
        let policy = Policy {
            keep_daily: 7,
            ..Policy::default()
        };
        // The 7 newest days with a snapshot: 5 after the gap and 2 before it, plus protected 0.
        assert_eq!(kept(&policy, &c), [0, 3, 4, 5, 6, 7, 8, 9]);
        let d = apply(&policy, &c);
        let first = d.iter().find(|d| d.id == 0).unwrap();
        assert_eq!(first.reasons, ["protected"]);
    }

    #[test]
    fn an_empty_policy_keeps_everything() {
        let c = candidates(&[START, START + DAY]);
        assert_eq!(kept(&Policy::default(), &c), [0, 1]);
    }
}
