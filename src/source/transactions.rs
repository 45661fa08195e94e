//! Open transactions, read with the clock: the oldest transaction of
//! another session that can still commit a row stamped before a window
//! began (PostgreSQL, MySQL/MariaDB), so that the window can reach back to
//! it (see `crate::window`).
//!
//! Which sessions count, per backend (the README's "Long transactions" has
//! the argument):
//!
//! - PostgreSQL stamps `now()` with the transaction's start, and a
//!   transaction gets an xid only at its first write: every client
//!   transaction open in the database counts from `xact_start`, also one
//!   that has only read so far (it may write its ten-minute-old `now()` and
//!   commit within a second, between two cycles).
//! - MySQL/MariaDB stamp `NOW()` with the statement's start: a transaction
//!   counts from `trx_started` once it modified rows, and every running
//!   statement from its own start (a statement waiting for a lock has
//!   stamped already, before InnoDB lists it as modifying anything).
//!
//! The agent's own window queries carry [`WINDOW_MARKER`] and never count:
//! they only read.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The comment every window query starts with, so that the agent's own
/// reads are told apart from the sessions that can write.
pub const WINDOW_MARKER: &str = "/* highwater window */";

/// How often a source whose sessions could not be seen is asked again
/// (MySQL: the `PROCESS` grant may have been added since).
const RETRY_HIDDEN: Duration = Duration::from_secs(300);

/// The oldest transaction (or running statement) of another session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTransaction {
    /// The earliest cursor value it may still commit, epoch microseconds:
    /// its start, floored to what the server reports.
    pub since: i64,
    /// `pid 1234` (PostgreSQL), `thread 56` (MySQL/MariaDB).
    pub who: String,
    /// The database user it runs as.
    pub user: String,
}

impl OpenTransaction {
    /// Tells one transaction from another (the session and its start).
    pub fn identity(&self) -> String {
        format!("{} {}", self.who, self.since)
    }
}

/// The database's clock, read at the start of a cycle, with what the same
/// statement saw of other sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    /// Microseconds since 1970 UTC.
    pub now: i64,
    pub sessions: Sessions,
}

/// What a clock read saw of other sessions' transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sessions {
    /// Not asked (SQLite, an extension turned off), or the source cannot
    /// show them (a missing grant, a standby): the window keeps its look-back.
    Unseen,
    /// Seen: the oldest open transaction that counts, if any.
    Seen(Option<OpenTransaction>),
}

/// Why a source cannot show other sessions, with what would fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    pub reason: String,
}

/// Whether a source shows other sessions, as last found, so that a source
/// that cannot is not asked every cycle and is reported once.
#[derive(Debug, Default)]
pub(crate) struct Visibility {
    state: Mutex<VisibilityState>,
}

#[derive(Debug, Default)]
struct VisibilityState {
    /// When the sessions were last found hidden, and why.
    hidden: Option<(Instant, Hidden)>,
    /// The last reason reported (logged again only when it changes).
    reported: Option<Hidden>,
}

impl Visibility {
    /// Should this clock read ask for the sessions? A source found hidden
    /// is asked again after [`RETRY_HIDDEN`].
    pub(crate) fn worth_asking(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .hidden
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= RETRY_HIDDEN)
    }

    /// Records that the sessions could not be seen; `Some(reason)` the
    /// first time (or when the reason changed): the caller logs it.
    pub(crate) fn hidden(&self, why: Hidden) -> Option<Hidden> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.hidden = Some((Instant::now(), why.clone()));
        if state.reported.as_ref() == Some(&why) {
            return None;
        }
        state.reported = Some(why.clone());
        Some(why)
    }

    /// Records that the sessions were seen; `true` when they had been
    /// reported hidden before (the caller says the extension is on again).
    pub(crate) fn seen(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.hidden = None;
        state.reported.take().is_some()
    }

    /// Why the sessions are hidden, as last found.
    pub(crate) fn reason(&self) -> Option<Hidden> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.hidden.as_ref().map(|(_, why)| why.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_source_is_reported_once_per_reason_and_again_after_it_was_seen() {
        let visibility = Visibility::default();
        assert!(visibility.worth_asking());
        let why = Hidden {
            reason: "no grant".to_owned(),
        };
        assert_eq!(visibility.hidden(why.clone()), Some(why.clone()));
        assert!(!visibility.worth_asking());
        assert_eq!(visibility.hidden(why.clone()), None);
        assert!(visibility.seen());
        assert!(!visibility.seen());
        assert_eq!(visibility.hidden(why.clone()), Some(why));
    }
}
