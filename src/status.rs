//! What the agent left in Redis, for people and deploy scripts: `status`
//! (per entity: watermark, lag, the last cycle, dedup set, stream) and
//! `wait` (until every entity completed a cycle that started after the
//! command did). Both read Redis alone: they work wherever Redis is reachable.
//!
//! The last *successful* cycle's figures are in the state hash (written by
//! `lua/commit.lua`); the last *failed* cycle is recorded by the agent in a
//! separate hash, `<prefix>:{<tag>}:failure:<entity>`, so that the state hash
//! keeps meaning "a cycle committed" (the state-loss detection relies on it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::agent::error_chain;
use crate::change::format_timestamp;
use crate::config::{Config, CursorKind, EntitySettings};
use crate::poller::CycleError;
use crate::sink::{slot_tag, EntityKeys, Sink, SinkError};

/// Why `status` or `wait` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("entity {entity}: redis: reading the status failed")]
    Read {
        entity: String,
        #[source]
        error: redis::RedisError,
    },
    #[error("{0}")]
    Usage(String),
    #[error("timed out after {} waiting for a cycle of: {}", humantime::format_duration(*.waited), .entities.join(", "))]
    TimedOut {
        waited: Duration,
        entities: Vec<String>,
    },
}

/// How long recording a failed cycle may take.
const RECORD_TIMEOUT: Duration = Duration::from_secs(1);

/// The key of the hash recording an entity's last failed cycle.
pub fn failure_key(prefix: &str, entity: &EntitySettings) -> String {
    format!(
        "{prefix}:{{{}}}:failure:{}",
        slot_tag(&entity.stream),
        entity.name
    )
}

/// Records a failed cycle for `status` (best effort: Redis may be the
/// reason the cycle failed).
pub async fn record_failure(
    sink: &Sink,
    prefix: &str,
    entity: &EntitySettings,
    error: &CycleError,
) {
    let mut conn = sink.connection();
    let key = failure_key(prefix, entity);
    let mut pipe = redis::pipe();
    pipe.hset_multiple(
        &key,
        &[
            ("at_ms", Utc::now().timestamp_millis().to_string()),
            ("error", error_chain(error)),
            ("transient", u8::from(error.is_transient()).to_string()),
        ],
    )
    .ignore()
    .hincr(&key, "count", 1)
    .ignore();
    let write = pipe.query_async::<()>(&mut conn);
    // Redis may be why the cycle failed: do not hold up the retry for it.
    match tokio::time::timeout(RECORD_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(entity = %entity.name, error = %e, "cannot record the failed cycle")
        }
        Err(_) => tracing::debug!(entity = %entity.name, "recording the failed cycle timed out"),
    }
}

/// One entity, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EntityStatus {
    /// Which partition of the entity this is (`partitions` > 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    pub entity: String,
    pub source: String,
    pub stream: String,
    /// `time` or `version`.
    pub cursor: &'static str,
    /// The watermark as RFC 3339 (time cursors) or the version; `None` before the first commit.
    pub watermark: Option<String>,
    /// The watermark as stored: microseconds since 1970 or the version.
    pub watermark_epoch: Option<i64>,
    /// The database's clock now (estimated from the last cycle) minus the watermark.
    pub lag_seconds: Option<f64>,
    /// `ok` or `failed`: how the most recent cycle ended; `None` when none ran.
    pub last_outcome: Option<&'static str>,
    pub last_success: Option<LastSuccess>,
    pub last_failure: Option<LastFailure>,
    /// Keys in the dedup set.
    pub dedup_keys: u64,
    /// Entries in the stream (all variants).
    pub stream_length: u64,
    pub last_entry_id: Option<String>,
    /// Who writes the entity now; `None` when no agent holds its lease.
    pub lease: Option<LeaseStatus>,
    /// How far the last committed cycle's window reached back (time cursors).
    pub window: Option<WindowStatus>,
    /// The consumer groups of the entity's stream.
    pub consumer_groups: Vec<GroupStatus>,
}

/// A consumer group of a stream, as `XINFO GROUPS` and `XPENDING` report it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub name: String,
    /// Entries not yet delivered to the group; `None` when Redis cannot
    /// tell (entries were deleted or trimmed in the group's unread range,
    /// or Redis is older than 7.0).
    pub lag: Option<u64>,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// How long ago the oldest pending entry was added (by its id's time).
    pub oldest_pending_age_seconds: Option<f64>,
    pub consumers: u64,
    pub last_delivered_id: String,
    /// Entries `hard_max_stream_length` dropped before the group
    /// acknowledged them, ever (kept in Redis).
    pub dropped: u64,
}

/// The last committed cycle's window: the look-back, and how much an open
/// transaction stretched it.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStatus {
    pub lookback_seconds: f64,
    pub max_lookback_seconds: f64,
    /// How much earlier than `watermark - lookback` it started.
    pub extended_by_seconds: f64,
    /// The oldest open transaction that cycle saw: the next window reaches
    /// back to its start.
    pub open_transaction: Option<OpenTransactionStatus>,
}

/// An open transaction, as a cycle saw it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenTransactionStatus {
    /// Since when it has been open (RFC 3339).
    pub since: String,
    /// `pid 1234, user app`, `thread 56, user app`.
    pub who: String,
}

/// An entity's lease: the agent that polls it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    /// The holder's agent id.
    pub holder: String,
    /// The fencing token the holder's writes carry.
    pub token: Option<u64>,
    /// Until the lease expires unless renewed.
    pub expires_in_seconds: f64,
}

/// A live agent, registered under the config's key prefix.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub id: String,
    /// Until its registration expires unless it renews it.
    pub expires_in_seconds: f64,
}

/// What `status` reports: the live agents, then the entities.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub agents: Vec<AgentStatus>,
    pub entities: Vec<EntityStatus>,
}

/// The last cycle that committed.
#[derive(Debug, Clone, Serialize)]
pub struct LastSuccess {
    pub started_at: String,
    pub started_at_ms: i64,
    pub duration_seconds: f64,
    pub rows: u64,
    pub emitted: u64,
    pub skipped: u64,
}

/// The last cycle that failed.
#[derive(Debug, Clone, Serialize)]
pub struct LastFailure {
    pub at: String,
    pub at_ms: i64,
    pub error: String,
    /// Retried with backoff (true) or needs a fix (false).
    pub transient: bool,
    /// Failed cycles recorded so far.
    pub count: u64,
}

/// Reads the live agents and the status of the selected entities.
pub async fn status(config: &Config, only: Option<&str>) -> Result<Status, StatusError> {
    let entities = config.select_entities(only).map_err(StatusError::Usage)?;
    let sink = Sink::connect(&config.redis).await?;
    let agents = crate::lease::Leases::new(&sink, config)
        .live_agents()
        .await?
        .into_iter()
        .map(|a| AgentStatus {
            id: a.id,
            expires_in_seconds: a.expires_in.as_secs_f64(),
        })
        .collect();
    let mut out = Vec::new();
    for entity in entities {
        let own = sink.keys(entity);
        let parts = sink.partition_keys(entity);
        let partitioned = entity.partitions > 1;
        for (p, keys) in parts.iter().enumerate() {
            let mut status = entity_status(config, &sink, entity, keys, &own).await?;
            if partitioned {
                status.partition = Some(p as u32);
            }
            out.push(status);
        }
    }
    Ok(Status {
        agents,
        entities: out,
    })
}

/// One entity's (or one partition's, `keys`) status; `own`: the entity's
/// own keys, which hold its lease.
async fn entity_status(
    config: &Config,
    sink: &Sink,
    entity: &EntitySettings,
    keys: &EntityKeys,
    own: &EntityKeys,
) -> Result<EntityStatus, StatusError> {
    let keys = keys.clone();
    let mut conn = sink.connection();
    type Reply = (
        HashMap<String, String>,
        HashMap<String, String>,
        u64,
        u64,
        redis::streams::StreamRangeReply,
        Option<String>,
        i64,
    );
    let failure = failure_key(&config.redis.key_prefix, entity);
    let cmd = |name: &str, key: &str, rest: &[&str]| {
        let mut cmd = redis::cmd(name);
        cmd.arg(key).arg(rest);
        cmd
    };
    // A partition's keys and the entity's lease are in different slots:
    // one pipeline per slot (on one server, one pipeline).
    let read = async {
        let replies: Vec<redis::Value> = conn
            .pipelined(vec![
                (keys.state.as_str(), cmd("HGETALL", &keys.state, &[])),
                (failure.as_str(), cmd("HGETALL", &failure, &[])),
                (keys.seen.as_str(), cmd("ZCARD", &keys.seen, &[])),
                (keys.stream.as_str(), cmd("XLEN", &keys.stream, &[])),
                (
                    keys.stream.as_str(),
                    cmd("XREVRANGE", &keys.stream, &["+", "-", "COUNT", "1"]),
                ),
                (own.lease.as_str(), cmd("GET", &own.lease, &[])),
                (own.lease.as_str(), cmd("PTTL", &own.lease, &[])),
            ])
            .await?;
        redis::from_redis_value::<Reply>(&redis::Value::Array(replies))
    };
    let (state, failure, dedup_keys, stream_length, last, lease, lease_ms): Reply =
        read.await.map_err(|error| StatusError::Read {
            entity: entity.name.clone(),
            error,
        })?;
    let int = |map: &HashMap<String, String>, field: &str| -> Option<i64> {
        map.get(field).and_then(|v| v.parse().ok())
    };
    let watermark_epoch = int(&state, "watermark");
    let last_success = int(&state, "last_started_at_ms").map(|started_at_ms| LastSuccess {
        started_at: format_timestamp(started_at_ms.saturating_mul(1000)),
        started_at_ms,
        duration_seconds: int(&state, "last_duration_ms").unwrap_or(0) as f64 / 1000.0,
        rows: int(&state, "last_rows").unwrap_or(0) as u64,
        emitted: int(&state, "last_emitted").unwrap_or(0) as u64,
        skipped: int(&state, "last_skipped").map_or_else(
            || {
                (int(&state, "last_rows").unwrap_or(0) - int(&state, "last_emitted").unwrap_or(0))
                    .max(0) as u64
            },
            |s| s as u64,
        ),
    });
    let last_failure = int(&failure, "at_ms").map(|at_ms| LastFailure {
        at: format_timestamp(at_ms.saturating_mul(1000)),
        at_ms,
        error: failure.get("error").cloned().unwrap_or_default(),
        transient: failure.get("transient").map(String::as_str) == Some("1"),
        count: int(&failure, "count").unwrap_or(0) as u64,
    });
    let last_outcome = match (&last_success, &last_failure) {
        (None, None) => None,
        (Some(_), None) => Some("ok"),
        (None, Some(_)) => Some("failed"),
        (Some(s), Some(f)) => Some(if f.at_ms > s.started_at_ms {
            "failed"
        } else {
            "ok"
        }),
    };
    let (cursor, watermark, lag_seconds) = match entity.cursor_kind {
        CursorKind::Time => {
            // The database's clock minus this machine's, from the last cycle.
            let offset_us = match (
                int(&state, "last_db_now"),
                int(&state, "last_started_at_ms"),
            ) {
                (Some(db_now), Some(started_ms)) => db_now - started_ms.saturating_mul(1000),
                _ => 0,
            };
            let now_us = Utc::now().timestamp_micros() + offset_us;
            (
                "time",
                watermark_epoch.map(format_timestamp),
                watermark_epoch.map(|w| ((now_us - w) as f64 / 1e6).max(0.0)),
            )
        }
        CursorKind::Version => ("version", watermark_epoch.map(|w| w.to_string()), None),
    };
    Ok(EntityStatus {
        entity: entity.name.clone(),
        partition: None,
        source: entity.source.clone(),
        stream: keys.stream.clone(),
        cursor,
        watermark,
        watermark_epoch,
        lag_seconds,
        last_outcome,
        last_success,
        last_failure,
        dedup_keys,
        stream_length,
        last_entry_id: last.ids.first().map(|entry| entry.id.clone()),
        consumer_groups: consumer_groups(&mut conn, &keys).await.map_err(|error| {
            StatusError::Read {
                entity: entity.name.clone(),
                error,
            }
        })?,
        window: (entity.cursor_kind == CursorKind::Time && watermark_epoch.is_some()).then(|| {
            WindowStatus {
                lookback_seconds: entity.lookback as f64 / 1e6,
                max_lookback_seconds: entity.max_lookback as f64 / 1e6,
                extended_by_seconds: int(&state, "window_extension_us").unwrap_or(0) as f64 / 1e6,
                open_transaction: int(&state, "horizon").map(|since| OpenTransactionStatus {
                    since: format_timestamp(since),
                    who: state.get("horizon_who").cloned().unwrap_or_default(),
                }),
            }
        }),
        lease: lease.map(|value| {
            let (token, holder) = crate::lease::parse_value(&value);
            LeaseStatus {
                holder: holder.to_owned(),
                token,
                expires_in_seconds: lease_ms.max(0) as f64 / 1000.0,
            }
        }),
    })
}

/// The consumer groups of `stream` (none when the stream does not exist;
/// `check` reports a key that is not a stream).
async fn consumer_groups(
    conn: &mut crate::connection::Connection,
    keys: &crate::sink::EntityKeys,
) -> Result<Vec<GroupStatus>, redis::RedisError> {
    let stream = &keys.stream;
    let kind: String = redis::cmd("TYPE").arg(stream).query_async(conn).await?;
    if kind != "stream" {
        return Ok(Vec::new());
    }
    let dropped: HashMap<String, u64> = redis::AsyncCommands::hgetall(conn, &keys.dropped).await?;
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let now_ms = Utc::now().timestamp_millis();
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let text = |field: &str| -> String {
            group
                .get(field)
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .unwrap_or_default()
        };
        let number = |field: &str| -> Option<u64> {
            group
                .get(field)
                .and_then(|v| redis::from_redis_value::<Option<u64>>(v).ok())
                .flatten()
        };
        let name = text("name");
        let pending = number("pending").unwrap_or(0);
        let oldest_pending_age_seconds = if pending > 0 {
            let summary: (u64, Option<String>, Option<String>, redis::Value) =
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .query_async(conn)
                    .await?;
            summary
                .1
                .as_deref()
                .and_then(|id| id.split('-').next())
                .and_then(|ms| ms.parse::<i64>().ok())
                .map(|added| (now_ms - added).max(0) as f64 / 1000.0)
        } else {
            None
        };
        out.push(GroupStatus {
            lag: number("lag"),
            pending,
            oldest_pending_age_seconds,
            consumers: number("consumers").unwrap_or(0),
            last_delivered_id: text("last-delivered-id"),
            dropped: dropped.get(&name).copied().unwrap_or(0),
            name,
        });
    }
    Ok(out)
}

/// `status --json`: `{"agents": [...], "entities": [...]}`, fields in a fixed order.
pub fn render_json(status: &Status) -> String {
    serde_json::to_string_pretty(status).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `status` as text: the live agents, then a block per entity.
pub fn render_text(status: &Status) -> String {
    let now_ms = Utc::now().timestamp_millis();
    let ago = |at_ms: i64| format!("{:.1}s ago", (now_ms - at_ms).max(0) as f64 / 1000.0);
    let mut out = String::new();
    let agents: Vec<String> = status
        .agents
        .iter()
        .map(|a| format!("{} (expires in {:.1}s)", a.id, a.expires_in_seconds))
        .collect();
    out.push_str(&format!(
        "agents          {}\n\n",
        if agents.is_empty() {
            "none running".to_owned()
        } else {
            agents.join(", ")
        }
    ));
    for (i, s) in status.entities.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let partition = s
            .partition
            .map_or_else(String::new, |p| format!(", partition {p}"));
        out.push_str(&format!("{} (source {}){partition}\n", s.entity, s.source));
        let lease = match &s.lease {
            Some(l) => format!(
                "held by {} (token {}, expires in {:.1}s unless renewed)",
                l.holder,
                l.token.map_or_else(|| "?".to_owned(), |t| t.to_string()),
                l.expires_in_seconds
            ),
            None => "not held (no agent polls it now)".to_owned(),
        };
        out.push_str(&format!("  lease         {lease}\n"));
        let last_id = s.last_entry_id.as_deref().unwrap_or("none");
        out.push_str(&format!(
            "  stream        {}: {} entries, last id {last_id}\n",
            s.stream, s.stream_length
        ));
        for g in &s.consumer_groups {
            let lag = g.lag.map_or_else(
                || "lag unknown (entries were trimmed or deleted in its unread range)".to_owned(),
                |lag| format!("lag {lag}"),
            );
            let oldest = g
                .oldest_pending_age_seconds
                .map_or_else(String::new, |age| format!(" (oldest {age:.1}s old)"));
            let dropped = match g.dropped {
                0 => String::new(),
                n => format!("; {n} dropped unacknowledged by hard_max_stream_length"),
            };
            out.push_str(&format!(
                "  group         {}: {lag}, {} pending{oldest}, {} consumers, last delivered {}{dropped}\n",
                g.name, g.pending, g.consumers, g.last_delivered_id
            ));
        }
        let watermark = match (&s.watermark, s.lag_seconds) {
            (Some(w), Some(lag)) => format!("{w} (lag {lag:.1}s)"),
            (Some(w), None) => w.clone(),
            (None, _) => "none yet (no cycle committed)".to_owned(),
        };
        out.push_str(&format!("  watermark     {watermark}\n"));
        if let Some(w) = &s.window {
            let seconds =
                |s: f64| humantime::format_duration(Duration::from_millis((s * 1000.0) as u64));
            let mut line = format!(
                "lookback {} (max_lookback {})",
                seconds(w.lookback_seconds),
                seconds(w.max_lookback_seconds)
            );
            if w.extended_by_seconds > 0.0 {
                line.push_str(&format!(", extended by {:.1}s", w.extended_by_seconds));
            }
            if let Some(t) = &w.open_transaction {
                line.push_str(&format!(
                    "; oldest open transaction since {} ({})",
                    t.since, t.who
                ));
            }
            out.push_str(&format!("  window        {line}\n"));
        }
        let success = s.last_success.as_ref().map(|c| {
            format!(
                "started {} ({}): {} rows read, {} emitted, {} skipped in {:.3}s",
                c.started_at,
                ago(c.started_at_ms),
                c.rows,
                c.emitted,
                c.skipped,
                c.duration_seconds
            )
        });
        let failure = s.last_failure.as_ref().map(|f| {
            format!(
                "{} ({}, {} failed cycles so far): {}{}",
                f.at,
                ago(f.at_ms),
                f.count,
                f.error,
                if f.transient { " (retrying)" } else { "" }
            )
        });
        match (s.last_outcome, success, failure) {
            (Some("failed"), success, Some(failure)) => {
                out.push_str(&format!("  last cycle    failed {failure}\n"));
                out.push_str(&format!(
                    "  last success  {}\n",
                    success.as_deref().unwrap_or("none yet")
                ));
            }
            (_, Some(success), failure) => {
                out.push_str(&format!("  last cycle    ok, {success}\n"));
                if let Some(failure) = failure {
                    out.push_str(&format!("  last failure  {failure}\n"));
                }
            }
            _ => out.push_str("  last cycle    none yet\n"),
        }
        out.push_str(&format!("  dedup set     {} keys\n", s.dedup_keys));
    }
    out
}

/// How often `wait` reads the state.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Waits until every selected entity has completed a cycle that started
/// after this call did, or `timeout` passed. `say` gets a line per entity as
/// it completes, and a line when a cycle fails meanwhile.
///
/// "Started after" compares the agent's clock (recorded by the cycle) with
/// this machine's: run `wait` where the agent runs, or keep clocks in sync.
pub async fn wait(
    config: &Config,
    only: Option<&str>,
    timeout: Option<Duration>,
    mut say: impl FnMut(&str),
) -> Result<(), StatusError> {
    let entities = config.select_entities(only).map_err(StatusError::Usage)?;
    let begun = Instant::now();
    let since_ms = Utc::now().timestamp_millis();
    let sink = Sink::connect(&config.redis).await?;
    let mut pending: Vec<(&EntitySettings, EntityKeys, String)> = entities
        .into_iter()
        .map(|e| {
            let failure = failure_key(&config.redis.key_prefix, e);
            // Every partition commits the cycle's figures: the first one's say it.
            (e, sink.partition_keys(e).swap_remove(0), failure)
        })
        .collect();
    let mut told_failure: HashMap<String, i64> = HashMap::new();
    loop {
        let mut still = Vec::new();
        for (entity, keys, failure) in pending {
            let mut conn = sink.connection();
            // last_started_at_ms, last_rows, last_emitted; failure at_ms, error.
            type Read = (Vec<Option<i64>>, Option<i64>, Option<String>);
            let mut state = redis::cmd("HMGET");
            state
                .arg(&keys.state)
                .arg(&["last_started_at_ms", "last_rows", "last_emitted"]);
            let mut at = redis::cmd("HGET");
            at.arg(&failure).arg("at_ms");
            let mut error = redis::cmd("HGET");
            error.arg(&failure).arg("error");
            let read: redis::RedisResult<Read> = conn
                .pipelined::<redis::Value>(vec![
                    (keys.state.as_str(), state),
                    (failure.as_str(), at),
                    (failure.as_str(), error),
                ])
                .await
                .and_then(|replies| redis::from_redis_value(&redis::Value::Array(replies)));
            match read {
                Ok((figures, failed_at, error)) => {
                    if let Some(started) = figures[0].filter(|&s| s > since_ms) {
                        say(&format!(
                            "{}: cycle started {} completed: {} rows read, {} emitted",
                            entity.name,
                            format_timestamp(started.saturating_mul(1000)),
                            figures[1].unwrap_or(0),
                            figures[2].unwrap_or(0)
                        ));
                        continue;
                    }
                    if let Some(at) = failed_at.filter(|&at| at > since_ms) {
                        if told_failure.get(&entity.name) != Some(&at) {
                            told_failure.insert(entity.name.clone(), at);
                            say(&format!(
                                "{}: a cycle failed, still waiting: {}",
                                entity.name,
                                error.unwrap_or_default()
                            ));
                        }
                    }
                }
                // Refused reads stay refused: waiting on cannot end well.
                Err(error) if crate::sink::is_acl_refusal(&error) => {
                    return Err(StatusError::Read {
                        entity: entity.name.clone(),
                        error,
                    });
                }
                Err(e) => {
                    tracing::warn!(entity = %entity.name, error = %e, "cannot read the state; retrying")
                }
            }
            still.push((entity, keys, failure));
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if let Some(timeout) = timeout {
            if begun.elapsed() >= timeout {
                return Err(StatusError::TimedOut {
                    waited: timeout,
                    entities: pending.iter().map(|(e, _, _)| e.name.clone()).collect(),
                });
            }
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}
