//! Stream retention: what of a stream to keep so that no consumer group
//! loses an entry it has not acknowledged (lua/retention.lua decides, in the
//! commit and, while polling is paused, in lua/retain.lua; the sink calls
//! them). Here: the scripts' arguments, what they report, and the warning
//! when the hard cap dropped entries a group had not acknowledged.

use crate::config::EntitySettings;

/// What the stream's retention (lua/retention.lua) did, and what it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retained {
    /// Entries trimmed from the stream.
    pub trimmed: u64,
    /// The stream's consumer groups, as they were before the trim.
    pub groups: Vec<GroupFigures>,
}

/// A consumer group of a stream, as the retention read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFigures {
    pub name: String,
    /// Entries not yet delivered (`XINFO GROUPS` `lag`); `None` when Redis
    /// cannot tell (entries were deleted or trimmed in the unread range).
    pub lag: Option<u64>,
    /// Delivered but not acknowledged.
    pub pending: u64,
    /// How long ago the oldest pending entry was added, by Redis's clock.
    pub oldest_pending_age_ms: Option<u64>,
    pub consumers: u64,
    pub last_delivered_id: String,
    /// Entries the hard cap dropped in this call before the group
    /// acknowledged them.
    pub dropped: u64,
}

/// One group as lua/retention.lua returns it: name, lag (-1: unknown),
/// pending, oldest pending age in ms (-1: none), consumers, last-delivered
/// id, dropped.
pub type RawGroup = (String, i64, u64, i64, u64, String, u64);

impl Retained {
    /// Adds one call's reply; the groups are those of the first call.
    pub fn add(&mut self, trimmed: u64, groups: Vec<RawGroup>) {
        self.trimmed += trimmed;
        if self.groups.is_empty() {
            self.groups = groups
                .into_iter()
                .map(
                    |(name, lag, pending, age, consumers, last_delivered_id, dropped)| {
                        GroupFigures {
                            name,
                            lag: u64::try_from(lag).ok(),
                            pending,
                            oldest_pending_age_ms: u64::try_from(age).ok(),
                            consumers,
                            last_delivered_id,
                            dropped,
                        }
                    },
                )
                .collect();
        } else {
            for (name, .., dropped) in groups {
                if let Some(g) = self.groups.iter_mut().find(|g| g.name == name) {
                    g.dropped += dropped;
                }
            }
        }
    }
}

/// The retention arguments of the commit and retain scripts:
/// max_stream_length, max_age in ms, hard_max_stream_length (0 = none).
pub fn args(entity: &EntitySettings) -> [u64; 3] {
    [
        entity.max_stream_length,
        entity
            .max_age
            .map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        entity.hard_max_stream_length.unwrap_or(0),
    ]
}

/// Warns of every entry the hard cap dropped before a group acknowledged it.
pub fn log_dropped(entity: &EntitySettings, stream: &str, retained: &Retained) {
    for g in retained.groups.iter().filter(|g| g.dropped > 0) {
        tracing::warn!(
            entity = %entity.name,
            stream = %stream,
            group = %g.name,
            dropped = g.dropped,
            hard_max_stream_length = entity.hard_max_stream_length.unwrap_or(0),
            "the stream is at hard_max_stream_length: entries the group had not acknowledged were dropped"
        );
    }
}
