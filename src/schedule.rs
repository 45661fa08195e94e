//! When an entity polls: a cron expression (5 fields, or 6 with seconds) or a
//! fixed interval. Ticks missed while a cycle ran are skipped, never queued.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// An entity's schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Cron in UTC; `expr` is what the user wrote.
    Cron {
        expr: String,
        parsed: Box<cron::Schedule>,
    },
    /// Every so often, counted from the agent's start.
    Every(Duration),
}

impl Schedule {
    /// Parses a cron expression of 5 fields (minute precision) or 6 (with a
    /// leading seconds field). Day-of-week numbers follow classic cron
    /// (0 or 7 = Sunday); names (MON-FRI) work too.
    pub fn cron(expr: &str) -> Result<Schedule, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let mut six: Vec<String> = match fields.len() {
            5 => std::iter::once("0")
                .chain(fields.iter().copied())
                .map(str::to_owned)
                .collect(),
            6 => fields.iter().map(|f| (*f).to_owned()).collect(),
            n => return Err(format!("expected 5 or 6 fields, found {n}")),
        };
        six[5] = classic_day_of_week(&six[5])?;
        let parsed = cron::Schedule::from_str(&six.join(" ")).map_err(|e| e.to_string())?;
        if parsed.upcoming(Utc).next().is_none() {
            return Err("it never fires".to_owned());
        }
        Ok(Schedule::Cron {
            expr: expr.to_owned(),
            parsed: Box::new(parsed),
        })
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>, origin: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Cron { parsed, .. } => parsed
                .after(&after)
                .next()
                // A schedule that fires no more (a past year): wait a year rather than spin.
                .unwrap_or(after + chrono::Duration::days(365)),
            Schedule::Every(every) => {
                let every = chrono::Duration::from_std(*every).unwrap_or(chrono::Duration::MAX);
                let every_us = every.num_microseconds().unwrap_or(i64::MAX).max(1);
                let elapsed = (after - origin).num_microseconds().unwrap_or(0).max(0);
                let ticks = elapsed / every_us + 1;
                origin + chrono::Duration::microseconds(ticks.saturating_mul(every_us))
            }
        }
    }

    /// The nominal time between ticks (for cron: between the next two).
    pub fn nominal_interval(&self) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron { parsed, .. } => {
                let mut upcoming = parsed.upcoming(Utc);
                match (upcoming.next(), upcoming.next()) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
                    _ => Duration::from_secs(60),
                }
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Cron { expr, .. } => write!(f, "cron {expr:?}"),
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
        }
    }
}

/// The cron crate numbers days 1-7 from Sunday; classic cron 0-7 with 0 and
/// 7 both Sunday. Rewrites the numbers (not steps) of a day-of-week field.
fn classic_day_of_week(field: &str) -> Result<String, String> {
    let map = |n: &str| -> Result<u32, String> {
        let d: u32 = n
            .parse()
            .map_err(|_| format!("day of week {n:?} is not a number or name"))?;
        if d > 7 {
            return Err(format!("day of week {d} is outside 0-7"));
        }
        Ok(d % 7 + 1)
    };
    let mut parts = Vec::new();
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        let is_numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let mapped = match range.split_once('-') {
            Some((a, b)) if is_numeric(a) && is_numeric(b) => {
                let (a, b) = (map(a)?, map(b)?);
                if a <= b {
                    format!("{a}-{b}")
                } else if step.is_none() {
                    // e.g. 5-7 (Fri-Sun) becomes 6-7,1
                    parts.push(format!("{a}-7"));
                    format!("1-{b}")
                } else {
                    return Err(format!(
                        "day-of-week range {range:?} wraps around Sunday; split it"
                    ));
                }
            }
            None if is_numeric(range) => map(range)?.to_string(),
            _ => range.to_owned(),
        };
        parts.push(match step {
            Some(s) => format!("{mapped}/{s}"),
            None => mapped,
        });
    }
    Ok(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, h, m, s).unwrap()
    }

    #[test]
    fn five_fields_fire_on_the_minute() {
        let s = Schedule::cron("*/5 * * * *").unwrap();
        assert_eq!(s.next_after(at(10, 1, 30), at(0, 0, 0)), at(10, 5, 0));
    }

    #[test]
    fn six_fields_have_seconds() {
        let s = Schedule::cron("*/10 * * * * *").unwrap();
        assert_eq!(s.next_after(at(10, 1, 30), at(0, 0, 0)), at(10, 1, 40));
    }

    #[test]
    fn wrong_field_count_is_named() {
        let err = Schedule::cron("*/5 * *").unwrap_err();
        assert_eq!(err, "expected 5 or 6 fields, found 3");
        assert!(Schedule::cron("61 * * * *").is_err());
    }

    #[test]
    fn classic_sunday_is_zero_or_seven() {
        // 2026-11-29 is a Sunday.
        let sunday = Utc.with_ymd_and_hms(2026, 11, 29, 0, 0, 0).unwrap();
        for expr in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN", "0 0 * * 5-7"] {
            let s = Schedule::cron(expr).unwrap();
            let next = s.next_after(at(1, 0, 0), at(0, 0, 0));
            assert!(next <= sunday, "{expr} -> {next}");
        }
        let weekdays = Schedule::cron("0 0 * * 1-5").unwrap();
        // Wednesday 25th, after midnight -> Thursday 26th.
        assert_eq!(
            weekdays.next_after(at(1, 0, 0), at(0, 0, 0)),
            Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn interval_skips_missed_ticks() {
        let s = Schedule::Every(Duration::from_secs(10));
        let origin = at(10, 0, 0);
        assert_eq!(s.next_after(at(10, 0, 0), origin), at(10, 0, 10));
        // A cycle that ran 35 s: the next tick is 10:00:40, not the three missed ones.
        assert_eq!(s.next_after(at(10, 0, 35), origin), at(10, 0, 40));
    }
}
