//! Where a cycle's window starts and how much of the dedup state its commit
//! may trim: `W - lookback`, reaching further back to the oldest open
//! transaction that can still commit into it (never before
//! `W - max_lookback`), and never below what an earlier commit trimmed.
//!
//! Why it holds (time cursors; `T` is a cycle's clock read, which also saw
//! the sessions, before the cycle's snapshot):
//!
//! - A transaction that commits after cycle k's snapshot was either open
//!   at `T_k`, so cycle k saw it (or an older one) and stored its start as
//!   the entity's horizon, or it started after `T_k`, so it stamps at or
//!   after `T_k`. Cycle k+1 starts no later than the horizon stored by
//!   cycle k, nor than what it sees itself, nor than `W - lookback`
//!   (`W >= T_k`): its window holds that transaction's rows, whether the
//!   transaction is still open when cycle k+1 looks or committed in between.
//!   The horizon is kept in Redis, so a restarted agent still knows it.
//! - What the commit of cycle k trims is below every later window: those
//!   start at or after `min(W_k - lookback, horizon_k, T_k) - margin`
//!   (a transaction a later cycle sees was open at `T_k`, so it is no
//!   older than the horizon, or it started after `T_k`), and never before
//!   `W_k - max_lookback`. Nothing trimmed is read again, so nothing is sent
//!   twice.
//! - The highest trim bound is stored with the state, and a window never
//!   starts below it: a cycle that could not see the sessions (a grant
//!   missing for a while), a `lookback` raised in the config, never make a
//!   window re-read what was trimmed.

use crate::config::{CursorKind, EntitySettings, Start};
use crate::source::{OpenTransaction, Sessions, BEGINNING};

/// How much earlier than an open transaction's reported start the window
/// begins: the server reports starts in whole seconds (MySQL) and a
/// PostgreSQL transaction takes its timestamp an instant before it shows.
pub const MARGIN_US: i64 = 1_000_000;

/// What the entity's state remembers for the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remembered {
    /// The start of the oldest open transaction the last committed cycle
    /// saw, epoch microseconds.
    pub horizon: Option<i64>,
    /// The highest bound the dedup state was trimmed below.
    pub trimmed: Option<i64>,
}

/// A cycle's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The start epoch, before the bound parameter's precision.
    pub since: i64,
    /// How much earlier than `W - lookback` it starts (microseconds, 0 when
    /// not extended).
    pub extension: i64,
    /// A transaction seen open since before `W - max_lookback`: the window
    /// stops short of it.
    pub beyond_max: Option<OpenTransaction>,
}

/// Asks for the sessions at all? Only time cursors whose `max_lookback`
/// exceeds `lookback` can use them.
pub fn extends(entity: &EntitySettings) -> bool {
    entity.cursor_kind == CursorKind::Time && entity.max_lookback > entity.lookback
}

/// The window of a cycle that found `watermark` and `remembered` in Redis
/// and read the clock `t0` (time cursors) with `sessions`.
pub fn start(
    entity: &EntitySettings,
    watermark: Option<i64>,
    t0: Option<i64>,
    remembered: &Remembered,
    sessions: &Sessions,
) -> Window {
    // The window the look-back alone gives, and how far back it may reach.
    let (plain, limit) = match (watermark, entity.start, t0) {
        (Some(w), _, _) => (w.saturating_sub(entity.lookback), Some(w)),
        (None, Start::Beginning, _) => (BEGINNING, None),
        (None, Start::At(at), _) => (at, None),
        (None, Start::Now, Some(t0)) => (t0.saturating_sub(entity.lookback), Some(t0)),
        // No clock for versions: "now" reads from the beginning.
        (None, Start::Now, None) => (BEGINNING, None),
    };
    let mut window = Window {
        since: plain,
        extension: 0,
        beyond_max: None,
    };
    if let Some(reference) = limit.filter(|_| extends(entity)) {
        let limit = reference.saturating_sub(entity.max_lookback);
        let seen = horizon(sessions);
        let reach = remembered
            .horizon
            .into_iter()
            .chain(seen.map(|t| t.since))
            .min()
            .map(|since| since.saturating_sub(MARGIN_US));
        if let Some(reach) = reach {
            window.since = plain.min(reach).max(limit);
        }
        window.beyond_max = seen
            .filter(|t| t.since.saturating_sub(MARGIN_US) < limit)
            .cloned();
    }
    if let Some(trimmed) = remembered.trimmed {
        window.since = window.since.max(trimmed);
    }
    window.extension = plain.saturating_sub(window.since).max(0);
    window
}

/// Below which epoch the commit of a cycle may trim the dedup state, given
/// the watermark it leaves (`w_new`), before the bound parameter's precision.
pub fn trim_below(
    entity: &EntitySettings,
    w_new: i64,
    t0: Option<i64>,
    sessions: &Sessions,
) -> i64 {
    let plain = w_new.saturating_sub(entity.lookback);
    let (Some(t0), Sessions::Seen(oldest), true) = (t0, sessions, extends(entity)) else {
        return plain;
    };
    let reach = oldest
        .as_ref()
        .map_or(t0, |t| t.since.min(t0))
        .saturating_sub(MARGIN_US);
    plain
        .min(reach)
        .max(w_new.saturating_sub(entity.max_lookback))
}

/// The horizon a commit stores: the start of the oldest open transaction
/// this cycle saw (none when it saw none or could not look).
pub fn horizon(sessions: &Sessions) -> Option<&OpenTransaction> {
    match sessions {
        Sessions::Seen(oldest) => oldest.as_ref(),
        Sessions::Unseen => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn entity(lookback: i64, max_lookback: i64) -> EntitySettings {
        let config = crate::config::Config::from_text(
            std::path::Path::new("/tmp/highwater-window-test.toml"),
            &format!(
                r#"
[redis]
url = "redis://127.0.0.1:6379"
[sources.db]
url = "postgres://localhost/test"
[entities.orders]
source = "db"
query = "SELECT id, updated_at FROM orders WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "{lookback}s"
max_lookback = "{max_lookback}s"
every = "1s"
"#
            ),
            |_| None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        config.entities.into_values().next().expect("one entity")
    }

    fn open(since: i64) -> Sessions {
        Sessions::Seen(Some(OpenTransaction {
            since,
            who: "pid 7".to_owned(),
            user: "app".to_owned(),
        }))
    }

    #[test]
    fn without_open_transactions_the_window_is_the_lookback() {
        let e = entity(3, 60);
        let w = start(
            &e,
            Some(100 * S),
            Some(101 * S),
            &Remembered::default(),
            &Sessions::Seen(None),
        );
        assert_eq!((w.since, w.extension), (97 * S, 0));
    }

    #[test]
    fn an_open_transaction_pulls_the_window_back_to_its_start_minus_the_margin() {
        let e = entity(3, 60);
        let w = start(
            &e,
            Some(100 * S),
            Some(101 * S),
            &Remembered::default(),
            &open(80 * S),
        );
        assert_eq!(w.since, 79 * S);
        assert_eq!(w.extension, 18 * S);
        assert_eq!(w.beyond_max, None);
    }

    #[test]
    fn a_horizon_remembered_from_the_last_cycle_counts_after_its_transaction_ended() {
        let e = entity(3, 60);
        let remembered = Remembered {
            horizon: Some(80 * S),
            trimmed: None,
        };
        let w = start(
            &e,
            Some(100 * S),
            Some(101 * S),
            &remembered,
            &Sessions::Seen(None),
        );
        assert_eq!(w.since, 79 * S);
    }

    #[test]
    fn the_window_stops_at_max_lookback_and_names_the_transaction_beyond() {
        let e = entity(3, 10);
        let w = start(
            &e,
            Some(100 * S),
            Some(101 * S),
            &Remembered::default(),
            &open(50 * S),
        );
        assert_eq!(w.since, 90 * S);
        assert_eq!(w.beyond_max.map(|t| t.since), Some(50 * S));
    }

    #[test]
    fn the_window_never_starts_below_what_was_trimmed() {
        let e = entity(3, 60);
        let remembered = Remembered {
            horizon: None,
            trimmed: Some(95 * S),
        };
        let w = start(&e, Some(100 * S), Some(101 * S), &remembered, &open(80 * S));
        assert_eq!((w.since, w.extension), (95 * S, 2 * S));
    }

    #[test]
    fn the_trim_keeps_what_the_next_window_can_still_read() {
        let e = entity(3, 60);
        // An open transaction since 80 s: the next window reaches 79 s.
        assert_eq!(
            trim_below(&e, 101 * S, Some(101 * S), &open(80 * S)),
            79 * S
        );
        // None open: the next one may see a transaction started just after
        // the clock read, reported a margin early; the look-back is wider.
        assert_eq!(
            trim_below(&e, 101 * S, Some(101 * S), &Sessions::Seen(None)),
            98 * S
        );
        // Not seen: the look-back alone (the stored trim bound guards the rest).
        assert_eq!(
            trim_below(&e, 101 * S, Some(101 * S), &Sessions::Unseen),
            98 * S
        );
        // Bounded by max_lookback.
        assert_eq!(
            trim_below(&e, 101 * S, Some(101 * S), &open(10 * S)),
            41 * S
        );
    }

    #[test]
    fn every_later_window_starts_at_or_after_the_trim() {
        // Brute force over small worlds: a cycle at t0 = w sees a
        // transaction (or none), commits; the next cycle, later, sees one
        // that was open then or started after.
        for (lookback, max) in [(3, 60), (1, 5), (3, 3)] {
            let e = entity(lookback, max);
            for seen_at in [None, Some(40), Some(90), Some(99)] {
                let sessions = match seen_at {
                    None => Sessions::Seen(None),
                    Some(at) => open(at * S),
                };
                let trim = trim_below(&e, 100 * S, Some(100 * S), &sessions);
                let remembered = Remembered {
                    horizon: seen_at.map(|at| at * S),
                    trimmed: Some(trim),
                };
                for later in [100, 101, 130] {
                    let candidates =
                        seen_at
                            .into_iter()
                            .chain([100, 100 + (later - 100) / 2, later]);
                    for next_seen in candidates {
                        let w = start(
                            &e,
                            Some(100 * S),
                            Some(later * S),
                            &remembered,
                            &open(next_seen * S),
                        );
                        let unclamped = Remembered {
                            trimmed: None,
                            ..remembered.clone()
                        };
                        let free = start(
                            &e,
                            Some(100 * S),
                            Some(later * S),
                            &unclamped,
                            &open(next_seen * S),
                        );
                        assert!(
                            w.since >= trim,
                            "lookback {lookback} max {max} seen {seen_at:?} next {next_seen}"
                        );
                        // The stored trim bound never cuts a window the rule wants.
                        assert_eq!(
                            w.since, free.since,
                            "lookback {lookback} max {max} seen {seen_at:?} next {next_seen}"
                        );
                    }
                }
            }
        }
    }
}
