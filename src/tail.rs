//! Reading the streams back as a consumer does: a stream entry decoded into
//! an [`Entry`], shown as one compact line (the demo) or as pretty JSON (`highwater tail`),
//! and a [`Follower`] that reads new entries with `XREAD BLOCK`.
//!
//! The follower reads on a connection of its own: a blocking read holds its
//! connection until an entry arrives or the block ends, and the connection's
//! response timeout is set longer than the block so that redis-rs never
//! abandons a read Redis is still answering.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::Value;

use crate::connection::Connection;

use crate::change::format_timestamp;
use crate::config::{mask_url, CursorKind, RedisSettings};

/// Why entries could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("redis ({url}): cannot connect")]
    Connect {
        url: String,
        #[source]
        error: redis::RedisError,
    },
    #[error("redis ({url}): reading stream {streams} failed")]
    Read {
        url: String,
        streams: String,
        #[source]
        error: redis::RedisError,
    },
    /// What was asked cannot be done as asked.
    #[error("{0}")]
    Usage(String),
}

impl TailError {
    /// The network or a restarting Redis: worth reconnecting and reading on.
    pub fn is_transient(&self) -> bool {
        let (TailError::Connect { error, .. } | TailError::Read { error, .. }) = self else {
            return false;
        };
        error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.kind() == redis::ErrorKind::BusyLoadingError
    }
}

/// A stream entry that is not a highwater message (another producer wrote
/// to the stream, or a field is malformed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream {stream}, entry {id}: {problem}")]
pub struct DecodeError {
    pub stream: String,
    pub id: String,
    pub problem: String,
}

/// One message, as a consumer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub stream: String,
    /// The stream entry ID (`<milliseconds>-<sequence>`).
    pub id: String,
    pub pkey: String,
    pub epoch: i64,
    /// The epoch as an RFC 3339 time, when it is a timestamp epoch.
    pub changed_at: Option<String>,
    pub variant: String,
    /// `upsert` or `delete`.
    pub op: String,
    /// The payload field as stored (compact JSON), `None` when absent (`payload = "key"`).
    pub payload: Option<String>,
}

/// Keys shorter than this are padded in [`Entry::compact`], so that
/// payloads line up.
pub const PKEY_WIDTH: usize = 4;

/// Epochs from 1990 to 2200 in microseconds: what a timestamp cursor gives.
/// A version counter is far below this range in practice.
const TIME_EPOCHS: std::ops::RangeInclusive<i64> = 631_152_000_000_000..=7_258_118_400_000_000;

impl Entry {
    /// Decodes the fields of one entry. `cursor` says what the epoch counts;
    /// `None` (the entity is not known) takes epochs in 1990..2200 as
    /// microsecond timestamps and anything else as a version.
    pub fn decode(
        stream: &str,
        id: &str,
        fields: &HashMap<String, Value>,
        cursor: Option<CursorKind>,
    ) -> Result<Entry, DecodeError> {
        let problem = |problem: String| DecodeError {
            stream: stream.to_owned(),
            id: id.to_owned(),
            problem,
        };
        let text = |name: &str| -> Result<Option<String>, DecodeError> {
            match fields.get(name) {
                None => Ok(None),
                Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone())
                    .map(Some)
                    .map_err(|_| problem(format!("field {name} is not UTF-8"))),
                Some(Value::SimpleString(s)) => Ok(Some(s.clone())),
                Some(Value::Int(i)) => Ok(Some(i.to_string())),
                Some(other) => Err(problem(format!("field {name} holds {other:?}"))),
            }
        };
        let required = |name: &str| {
            text(name)?.ok_or_else(|| problem(format!("no {name} field (not a highwater message)")))
        };
        let epoch_text = required("epoch")?;
        let epoch: i64 = epoch_text
            .parse()
            .map_err(|_| problem(format!("epoch {epoch_text:?} is not an integer")))?;
        let is_time = match cursor {
            Some(CursorKind::Time) => true,
            Some(CursorKind::Version) => false,
            None => TIME_EPOCHS.contains(&epoch),
        };
        Ok(Entry {
            stream: stream.to_owned(),
            id: id.to_owned(),
            pkey: required("pkey")?,
            epoch,
            changed_at: is_time.then(|| format_timestamp(epoch)),
            variant: required("variant")?,
            op: required("op")?,
            payload: text("payload")?,
        })
    }

    /// When Redis added the entry (the time part of its ID).
    pub fn added_at(&self) -> Option<DateTime<Utc>> {
        let millis = self.id.split('-').next()?.parse().ok()?;
        DateTime::from_timestamp_millis(millis)
    }

    /// One line: the time Redis added it (UTC), stream, op, pkey and the
    /// payload as stored. `stream_width` pads the stream column; short keys
    /// are padded to [`PKEY_WIDTH`].
    ///
    /// `19:40:01.123  shop:customers  upsert  42  {"id":42,"name":"Ada"}`
    pub fn compact(&self, stream_width: usize) -> String {
        let time = self
            .added_at()
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| self.id.clone());
        let mut line = format!(
            "{time}  {:<stream_width$}  {:<6}  {:<PKEY_WIDTH$}",
            self.stream, self.op, self.pkey
        );
        match &self.payload {
            Some(payload) => {
                line.push_str("  ");
                line.push_str(payload);
            }
            None => line.truncate(line.trim_end().len()),
        }
        line
    }

    /// The entry as an indented JSON object, fields in a fixed order and the
    /// payload's columns in the query's order.
    pub fn pretty(&self) -> String {
        let mut json = String::from("{");
        let mut field = |name: &str, value: String| {
            if json.len() > 1 {
                json.push(',');
            }
            let _ = write!(json, "{}:{value}", quote(name));
        };
        field("stream", quote(&self.stream));
        field("id", quote(&self.id));
        if let Some(added) = self.added_at() {
            field(
                "added_at",
                quote(&added.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            );
        }
        field("pkey", quote(&self.pkey));
        field("op", quote(&self.op));
        field("variant", quote(&self.variant));
        field("epoch", self.epoch.to_string());
        if let Some(changed_at) = &self.changed_at {
            field("changed_at", quote(changed_at));
        }
        if let Some(payload) = &self.payload {
            // A payload that is not JSON (written by someone else) shows as a string.
            let valid = serde_json::from_str::<serde::de::IgnoredAny>(payload).is_ok();
            field(
                "payload",
                if valid {
                    payload.clone()
                } else {
                    quote(payload)
                },
            );
        }
        json.push('}');
        indent_json(&json)
    }
}

fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Re-indents valid compact JSON with two spaces, leaving every token as
/// written (serde_json would sort the payload's keys without `preserve_order`).
fn indent_json(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = compact.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let closing = if c == '{' { '}' } else { ']' };
                if chars.peek() == Some(&closing) {
                    // Keep `{}` and `[]` on one line.
                    out.push(closing);
                    chars.next();
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// Where a [`Follower`] starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Every entry the streams hold.
    Beginning,
    /// Only entries added after the follower connected.
    End,
}

/// How long one `XREAD` blocks in [`follow`].
pub const BLOCK: Duration = Duration::from_millis(1000);
/// Added to the block for the connection's response timeout.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);
/// How often streams spread over cluster slots are read while waiting.
const SPREAD_POLL: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection a follower reads with, opened on first use (and again
/// after an error cleared `slot`). Its response timeout outlasts the longest
/// BLOCK, so redis-rs never gives up on a read Redis is still holding.
async fn blocking_connection(
    redis: &RedisSettings,
    url: &str,
    slot: &mut Option<Connection>,
) -> Result<Connection, TailError> {
    if let Some(conn) = slot {
        return Ok(conn.clone());
    }
    let conn = Connection::open_with(
        redis,
        CONNECT_TIMEOUT,
        BLOCK.max(Duration::from_secs(60)) + RESPONSE_MARGIN,
    )
    .await
    .map_err(|error| TailError::Connect {
        url: url.to_owned(),
        error,
    })?;
    *slot = Some(conn.clone());
    Ok(conn)
}

/// Reads new entries of some streams, in order per stream, on a dedicated
/// connection. Its positions only advance over entries it returned, so a
/// read that is cancelled or fails is simply repeated.
pub struct Follower {
    redis: RedisSettings,
    url: String,
    conn: Option<Connection>,
    /// Per stream: the ID of the last entry returned.
    positions: Vec<(String, String)>,
    cursor: Option<CursorKind>,
}

impl Follower {
    /// Connects and fixes the start position of each stream (with
    /// [`StartAt::End`], the stream's last entry now). `cursor` says how
    /// epochs are shown (see [`Entry::decode`]).
    pub async fn connect(
        redis: &RedisSettings,
        streams: &[String],
        start: StartAt,
        cursor: Option<CursorKind>,
    ) -> Result<Follower, TailError> {
        let mut follower = Follower {
            redis: redis.clone(),
            url: mask_url(&redis.url),
            conn: None,
            positions: streams
                .iter()
                .map(|s| (s.clone(), "0-0".to_owned()))
                .collect(),
            cursor,
        };
        let mut conn = follower.connection().await?;
        if start == StartAt::End {
            for (stream, position) in &mut follower.positions {
                let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
                    .arg(&*stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|error| TailError::Read {
                        url: follower.url.clone(),
                        streams: stream.clone(),
                        error,
                    })?;
                if let Some(entry) = last.ids.first() {
                    *position = entry.id.clone();
                }
            }
        }
        Ok(follower)
    }

    /// The streams followed.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.positions.iter().map(|(s, _)| s.as_str())
    }

    async fn connection(&mut self) -> Result<Connection, TailError> {
        blocking_connection(&self.redis, &self.url, &mut self.conn).await
    }

    /// Returns the entries added since the last read, waiting up to `block`
    /// (at most a minute) for one to arrive; `None` returns at once. Empty
    /// when none came. After an error the next read reconnects.
    pub async fn read(
        &mut self,
        block: Option<Duration>,
    ) -> Result<Vec<Result<Entry, DecodeError>>, TailError> {
        let mut conn = self.connection().await?;
        let block = block.map(|b| b.min(Duration::from_secs(60)));
        // One XREAD may name keys of one cluster slot only: streams spread
        // over slots are read slot by slot without blocking, and the wait
        // is short sleeps until one of them has something.
        let mut by_slot: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, (stream, _)) in self.positions.iter().enumerate() {
            let slot = if conn.is_cluster() {
                crate::connection::slot_of(stream)
            } else {
                0
            };
            match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, streams)) => streams.push(i),
                None => by_slot.push((slot, vec![i])),
            }
        }
        let started = std::time::Instant::now();
        let replies = loop {
            let one_read = by_slot.len() == 1;
            let mut replies = Vec::new();
            for (_, streams) in &by_slot {
                let mut options = StreamReadOptions::default().count(1000);
                if let (Some(block), true) = (block, one_read) {
                    options = options.block(block.as_millis().max(1) as usize);
                }
                let keys: Vec<&str> = streams
                    .iter()
                    .map(|&i| self.positions[i].0.as_str())
                    .collect();
                let ids: Vec<&str> = streams
                    .iter()
                    .map(|&i| self.positions[i].1.as_str())
                    .collect();
                let reply: Option<StreamReadReply> = match redis::cmd("XREAD")
                    .arg(&options)
                    .arg("STREAMS")
                    .arg(&keys)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
                {
                    Ok(reply) => reply,
                    Err(error) => {
                        self.conn = None;
                        return Err(TailError::Read {
                            url: self.url.clone(),
                            streams: keys.join(", "),
                            error,
                        });
                    }
                };
                replies.extend(reply.map(|r| r.keys).unwrap_or_default());
            }
            let waited = started.elapsed();
            match block {
                Some(block) if !one_read && replies.is_empty() && waited < block => {
                    tokio::time::sleep(SPREAD_POLL.min(block - waited)).await;
                }
                _ => break replies,
            }
        };
        let mut entries = Vec::new();
        for key in replies {
            for raw in key.ids {
                entries.push(Entry::decode(&key.key, &raw.id, &raw.map, self.cursor));
                if let Some((_, position)) = self.positions.iter_mut().find(|(s, _)| *s == key.key)
                {
                    *position = raw.id;
                }
            }
        }
        Ok(entries)
    }
}

/// Hands every new entry to `on_entry` until `shutdown` resolves. A lost
/// connection is retried with backoff (and reported once per failure on
/// stderr through `tracing`); entries are neither skipped nor repeated.
pub async fn follow(
    follower: &mut Follower,
    shutdown: impl Future<Output = ()>,
    mut on_entry: impl FnMut(Result<Entry, DecodeError>),
) -> Result<(), TailError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failures = 0;
    loop {
        let read = tokio::select! {
            () = &mut shutdown => return Ok(()),
            read = follower.read(Some(BLOCK)) => read,
        };
        match read {
            Ok(entries) => {
                failures = 0;
                entries.into_iter().for_each(&mut on_entry);
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                let wait = crate::agent::backoff(failures);
                tracing::warn!(error = %crate::agent::error_chain(&e), retry_in = ?wait, "cannot read the streams");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// Consumer groups and the `highwater tail` command.
// ---------------------------------------------------------------------------

/// Reads one stream as a consumer of a consumer group (`XREADGROUP`):
/// first this consumer's own pending entries (delivered before, never
/// acknowledged: a previous run died between showing and acknowledging),
/// then new ones. The caller acknowledges what it handled with [`GroupFollower::ack`].
pub struct GroupFollower {
    redis: RedisSettings,
    url: String,
    conn: Option<Connection>,
    stream: String,
    group: String,
    consumer: String,
    cursor: Option<CursorKind>,
    /// Still re-reading this consumer's pending entries (ID `0`), not new ones (`>`).
    backlog: bool,
}

impl GroupFollower {
    /// Connects and creates the group if it does not exist, positioned at
    /// the stream's end ([`StartAt::End`]) or start; an existing group keeps
    /// its position. Returns whether the group was created.
    pub async fn connect(
        redis: &RedisSettings,
        stream: &str,
        group: &str,
        consumer: &str,
        start: StartAt,
        cursor: Option<CursorKind>,
    ) -> Result<(GroupFollower, bool), TailError> {
        let mut follower = GroupFollower {
            redis: redis.clone(),
            url: mask_url(&redis.url),
            conn: None,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            cursor,
            backlog: true,
        };
        let mut conn = follower.connection().await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(if start == StartAt::Beginning {
                "0"
            } else {
                "$"
            })
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        let created = match created {
            Ok(()) => true,
            Err(error) if error.code() == Some("BUSYGROUP") => false,
            Err(error) => return Err(follower.read_error(error)),
        };
        Ok((follower, created))
    }

    fn read_error(&self, error: redis::RedisError) -> TailError {
        TailError::Read {
            url: self.url.clone(),
            streams: self.stream.clone(),
            error,
        }
    }

    async fn connection(&mut self) -> Result<Connection, TailError> {
        blocking_connection(&self.redis, &self.url, &mut self.conn).await
    }

    /// The next entries for this consumer, waiting up to `block` (at most a
    /// minute) for new ones once its pending entries are delivered.
    pub async fn read(
        &mut self,
        block: Duration,
    ) -> Result<Vec<Result<Entry, DecodeError>>, TailError> {
        let mut conn = self.connection().await?;
        let mut options = StreamReadOptions::default()
            .group(&self.group, &self.consumer)
            .count(1000);
        if !self.backlog {
            let millis = block.min(Duration::from_secs(60)).as_millis().max(1);
            options = options.block(millis as usize);
        }
        let id = if self.backlog { "0" } else { ">" };
        let reply: Option<StreamReadReply> = match redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(id)
            .query_async(&mut conn)
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                self.conn = None;
                // After a reconnect, pending entries may have been delivered
                // without an answer reaching us: read them again first.
                self.backlog = true;
                return Err(self.read_error(error));
            }
        };
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for raw in key.ids {
                entries.push(Entry::decode(&key.key, &raw.id, &raw.map, self.cursor));
            }
        }
        if self.backlog && entries.is_empty() {
            self.backlog = false;
        }
        Ok(entries)
    }

    /// Acknowledges entries (`XACK`): they leave the group's pending list.
    pub async fn ack(&mut self, ids: &[String]) -> Result<(), TailError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let acked: redis::RedisResult<u64> = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(ids)
            .query_async(&mut conn)
            .await;
        acked.map(|_| ()).map_err(|error| {
            self.conn = None;
            self.read_error(error)
        })
    }
}

/// Like [`follow`], for a group consumer: each entry that `on_entry`
/// handled (returned true for) is acknowledged after its batch; one it did
/// not handle stays pending and ends the loop.
pub async fn follow_group(
    follower: &mut GroupFollower,
    shutdown: impl Future<Output = ()>,
    mut on_entry: impl FnMut(&Result<Entry, DecodeError>) -> bool,
) -> Result<(), TailError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failures = 0;
    loop {
        let read = tokio::select! {
            () = &mut shutdown => return Ok(()),
            read = follower.read(BLOCK) => read,
        };
        let result = match read {
            Ok(entries) => {
                let mut handled = Vec::new();
                let mut stopped = false;
                for entry in &entries {
                    if !on_entry(entry) {
                        stopped = true;
                        break;
                    }
                    handled.push(match entry {
                        Ok(entry) => entry.id.clone(),
                        Err(e) => e.id.clone(),
                    });
                }
                let acked = follower.ack(&handled).await;
                if stopped {
                    return acked;
                }
                acked
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => failures = 0,
            Err(e) if e.is_transient() => {
                failures += 1;
                let wait = crate::agent::backoff(failures);
                tracing::warn!(error = %crate::agent::error_chain(&e), retry_in = ?wait, "cannot read the stream");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// What `highwater tail` follows and how.
pub struct TailOptions {
    /// An entity name (its stream, epochs shown per its cursor) or a stream key.
    pub target: String,
    /// Every entry the stream holds, not only new ones (for a new group: its start position).
    pub from_start: bool,
    /// Read as this consumer group (`XREADGROUP` + `XACK`).
    pub group: Option<String>,
    /// The consumer's name within the group.
    pub consumer: String,
}

/// `highwater tail`: prints each entry as pretty JSON on stdout as it
/// arrives, until `shutdown` (or stdout closes). Says on stderr what it
/// follows once it is positioned, so nothing added after that line is missed.
pub async fn tail(
    config: &crate::config::Config,
    options: &TailOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TailError> {
    use std::io::Write as _;

    // An entity over several partitions: all its streams (a group reads one
    // stream: name the partition's stream, `<stream>:<n>`).
    let (streams, cursor) = match config.entities.get(&options.target) {
        Some(entity) => (
            (0..entity.partitions.max(1) as usize)
                .map(|p| crate::partition::stream(entity, p))
                .collect::<Vec<_>>(),
            Some(entity.cursor_kind),
        ),
        None => (vec![options.target.clone()], None),
    };
    let stream = streams[0].clone();
    let start = if options.from_start {
        StartAt::Beginning
    } else {
        StartAt::End
    };
    let from = if options.from_start {
        "from its first entry"
    } else {
        "from its end (new entries only)"
    };
    // A closed stdout (`| head`) ends the tail instead of a panic.
    let (closed_tx, mut closed) = tokio::sync::watch::channel(false);
    let print = move |entry: &Result<Entry, DecodeError>| -> bool {
        let text = match entry {
            Ok(entry) => entry.pretty(),
            Err(e) => format!("{{\"error\": {}}}", quote(&e.to_string())),
        };
        let mut out = std::io::stdout().lock();
        let written = writeln!(out, "{text}").and_then(|()| out.flush()).is_ok();
        if !written {
            let _ = closed_tx.send(true);
        }
        written
    };
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    };
    match &options.group {
        None => {
            let mut follower = Follower::connect(&config.redis, &streams, start, cursor).await?;
            eprintln!(
                "following stream{} {} {from}; Ctrl-C stops",
                if streams.len() > 1 { "s" } else { "" },
                streams.join(", ")
            );
            follow(&mut follower, shutdown, |entry| {
                print(&entry);
            })
            .await
        }
        Some(_) if streams.len() > 1 => Err(TailError::Usage(format!(
            "entity {} is spread over {} streams ({}): a consumer group reads one stream; tail the partition's stream, e.g. `highwater tail {} --group ...`",
            options.target,
            streams.len(),
            streams.join(", "),
            streams[0]
        ))),
        Some(group) => {
            let (mut follower, created) = GroupFollower::connect(
                &config.redis,
                &stream,
                group,
                &options.consumer,
                start,
                cursor,
            )
            .await?;
            let position = if created {
                format!("created group {group} {from}")
            } else {
                format!("group {group} exists: continuing where it stands")
            };
            eprintln!(
                "following stream {stream} as consumer {} of group {group} ({position}); entries are acknowledged once printed; Ctrl-C stops",
                options.consumer
            );
            follow_group(&mut follower, shutdown, print).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
            .collect()
    }

    fn customer() -> Entry {
        Entry::decode(
            "shop:customers",
            "1764099601123-0",
            &fields(&[
                ("pkey", "42"),
                ("epoch", "1764099600000000"),
                ("variant", "customers"),
                ("op", "upsert"),
                (
                    "payload",
                    r#"{"id":42,"name":"Ada, \"the\" first","tags":[],"a":{}}"#,
                ),
            ]),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_timestamp_epoch_is_shown_as_an_rfc3339_time() {
        let entry = customer();
        assert_eq!(entry.pkey, "42");
        assert_eq!(entry.epoch, 1_764_099_600_000_000);
        assert_eq!(entry.changed_at.as_deref(), Some("2025-11-25T19:40:00Z"));
        assert_eq!(entry.op, "upsert");
        assert_eq!(entry.variant, "customers");
        assert_eq!(
            entry.added_at().unwrap().to_rfc3339(),
            "2025-11-25T19:40:01.123+00:00"
        );
    }

    #[test]
    fn a_version_epoch_stays_a_number() {
        let version = fields(&[
            ("pkey", "7"),
            ("epoch", "1764099600000000"),
            ("variant", "v"),
            ("op", "upsert"),
        ]);
        let entry = Entry::decode("s", "1-0", &version, Some(CursorKind::Version)).unwrap();
        assert_eq!(entry.changed_at, None);
        let small = fields(&[
            ("pkey", "7"),
            ("epoch", "12"),
            ("variant", "v"),
            ("op", "delete"),
        ]);
        let entry = Entry::decode("s", "1-0", &small, None).unwrap();
        assert_eq!(entry.changed_at, None);
        assert_eq!(entry.payload, None);
    }

    #[test]
    fn an_entry_without_highwater_fields_is_a_named_decode_error() {
        let foreign = fields(&[("event", "signup")]);
        let err = Entry::decode("s", "5-1", &foreign, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream s, entry 5-1: no epoch field (not a highwater message)"
        );
        let bad = fields(&[
            ("pkey", "1"),
            ("epoch", "soon"),
            ("variant", "v"),
            ("op", "upsert"),
        ]);
        let err = Entry::decode("s", "5-1", &bad, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream s, entry 5-1: epoch \"soon\" is not an integer"
        );
    }

    #[test]
    fn the_compact_form_is_one_line_with_the_payload_as_stored() {
        let entry = customer();
        assert_eq!(
            entry.compact(16),
            r#"19:40:01.123  shop:customers    upsert  42    {"id":42,"name":"Ada, \"the\" first","tags":[],"a":{}}"#
        );
        let mut deleted = entry.clone();
        deleted.op = "delete".into();
        deleted.payload = None;
        assert_eq!(
            deleted.compact(0),
            "19:40:01.123  shop:customers  delete  42"
        );
    }

    #[test]
    fn the_pretty_form_is_indented_json_keeping_the_column_order() {
        let pretty = customer().pretty();
        assert_eq!(
            pretty,
            r#"{
  "stream": "shop:customers",
  "id": "1764099601123-0",
  "added_at": "2025-11-25T19:40:01.123Z",
  "pkey": "42",
  "op": "upsert",
  "variant": "customers",
  "epoch": 1764099600000000,
  "changed_at": "2025-11-25T19:40:00Z",
  "payload": {
    "id": 42,
    "name": "Ada, \"the\" first",
    "tags": [],
    "a": {}
  }
}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(parsed["payload"]["name"], "Ada, \"the\" first");
    }

    #[test]
    fn a_payload_that_is_not_json_is_shown_as_a_string() {
        let mut entry = customer();
        entry.payload = Some("not {json".into());
        let parsed: serde_json::Value = serde_json::from_str(&entry.pretty()).unwrap();
        assert_eq!(parsed["payload"], "not {json");
    }
}
