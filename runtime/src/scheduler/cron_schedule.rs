//! Cron expressions of `ExecutionMode::Scheduled` agents, through the `cron` crate.
//!
//! Accepted: six fields `sec min hour day-of-month month day-of-week` (an optional seventh
//! field is the year) and the classic five fields `min hour day-of-month month day-of-week`,
//! read as firing at second 0. Times are UTC.

use std::str::FromStr;
use std::time::SystemTime;

use chrono::{DateTime, Utc};

use super::SchedulerError;

/// A parsed cron schedule.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expression: String,
    schedule: cron::Schedule,
}

/// Parses a five-, six- or seven-field cron expression (SCHED_009 when invalid).
pub fn parse_cron(expression: &str) -> Result<CronSchedule, SchedulerError> {
    let fields = expression.split_whitespace().count();
    let normalized = match fields {
        5 => format!("0 {}", expression.trim()),
        6 | 7 => expression.trim().to_string(),
        n => {
            return Err(SchedulerError::InvalidSchedule {
                expression: expression.to_string(),
                reason: format!("expected 5, 6 or 7 fields, found {n}"),
            })
        }
    };
    let schedule =
        cron::Schedule::from_str(&normalized).map_err(|e| SchedulerError::InvalidSchedule {
            expression: expression.to_string(),
            reason: e.to_string(),
        })?;
    Ok(CronSchedule {
        expression: expression.to_string(),
        schedule,
    })
}

impl CronSchedule {
    /// The expression as written.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first firing time strictly after `after`, if any.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let after: DateTime<Utc> = after.into();
        self.schedule.after(&after).next().map(SystemTime::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn six_field_expression_fires_every_ten_seconds() {
        let s = parse_cron("*/10 * * * * *").expect("valid");
        assert_eq!(s.next_after(at(1_000_000_003)), Some(at(1_000_000_010)));
        assert_eq!(s.next_after(at(1_000_000_010)), Some(at(1_000_000_020)));
    }

    #[test]
    fn five_field_expression_fires_at_second_zero() {
        let s = parse_cron("*/5 * * * *").expect("valid");
        // 1_000_000_020 is 01:46:40 + 20s... next multiple of five minutes at :00.
        let next = s.next_after(at(1_000_000_020)).expect("has next");
        let secs = next
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        assert_eq!(secs % 300, 0);
        assert!(secs > 1_000_000_020 && secs <= 1_000_000_320);
    }

    #[test]
    fn invalid_expressions_are_sched_009() {
        for bad in ["", "* * *", "61 * * * * *", "a b c d e"] {
            let err = parse_cron(bad).expect_err(bad);
            assert_eq!(err.code(), "SCHED_009", "{bad}");
        }
    }
}
