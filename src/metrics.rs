//! Prometheus metrics: every metric name (a constant, prefixed `highwater_`),
//! the process-wide registry the agent records into, and the text exposition
//! that `run` serves on `/metrics`.
//!
//! Labels are the entity and the source, never a row key, so the number of
//! series is bounded by the configuration. The registry is global (like the
//! registries of most Prometheus clients) so that the poller's progress and
//! the agent's retries record without a handle threaded through every call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::CursorKind;
use crate::poller::{CycleError, CycleReport};
use crate::source::SourceError;

/// Cycles finished, by `outcome` (see [`Outcome`]). Counter; labels entity, outcome.
pub const CYCLES_TOTAL: &str = "highwater_cycles_total";
/// Rows the polling queries returned. Counter; label entity.
pub const ROWS_READ_TOTAL: &str = "highwater_rows_read_total";
/// Rows written to the stream (new versions). Counter; label entity.
pub const ROWS_EMITTED_TOTAL: &str = "highwater_rows_emitted_total";
/// Rows whose version was already on the stream. Counter; label entity.
pub const ROWS_SKIPPED_TOTAL: &str = "highwater_rows_skipped_total";
/// How long cycles take. Histogram; label entity.
pub const CYCLE_DURATION_SECONDS: &str = "highwater_cycle_duration_seconds";
/// The watermark of a timestamp cursor, Unix seconds. Gauge; label entity.
pub const WATERMARK_SECONDS: &str = "highwater_watermark_seconds";
/// The watermark of an integer (version) cursor. Gauge; label entity.
pub const WATERMARK_VERSION: &str = "highwater_watermark_version";
/// The database's clock now minus the watermark (timestamp cursors). Gauge; label entity.
pub const LAG_SECONDS: &str = "highwater_lag_seconds";
/// Keys in the dedup set after the last cycle. Gauge; label entity.
pub const DEDUP_KEYS: &str = "highwater_dedup_keys";
/// Entries in the entity's stream after the last cycle. Gauge; label entity.
pub const STREAM_ENTRIES: &str = "highwater_stream_entries";
/// When the last cycle that committed finished, Unix seconds. Gauge; label entity.
pub const LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "highwater_last_success_timestamp_seconds";
/// Rows read so far by the cycle in progress (0 between cycles). Gauge; label entity.
pub const CYCLE_ROWS_IN_PROGRESS: &str = "highwater_cycle_rows_in_progress";
/// Cycles that failed to connect to or hear back from a database. Counter; label source.
pub const SOURCE_CONNECTION_ERRORS_TOTAL: &str = "highwater_source_connection_errors_total";
/// Failed attempts to connect to Redis at start. Counter.
pub const REDIS_CONNECTION_ERRORS_TOTAL: &str = "highwater_redis_connection_errors_total";
/// Always 1; label version. Gauge.
pub const BUILD_INFO: &str = "highwater_build_info";
/// Always 1; label agent (this agent's id). Gauge.
pub const AGENT_INFO: &str = "highwater_agent_info";
/// 1 while this agent holds the entity's lease (it polls the entity), 0 while it stands by. Gauge; label entity.
pub const LEASE_HELD: &str = "highwater_lease_held";
/// Leases this agent took over from another agent. Counter; label entity.
pub const LEASE_TAKEOVERS_TOTAL: &str = "highwater_lease_takeovers_total";
/// Leases this agent lost to another agent or to expiry while it held them. Counter; label entity.
pub const LEASES_LOST_TOTAL: &str = "highwater_leases_lost_total";

/// How much earlier than `W - lookback` the last window started, because a
/// transaction was open (0 when not extended). Gauge; label entity.
pub const WINDOW_EXTENSION_SECONDS: &str = "highwater_window_extension_seconds";
/// When the oldest open transaction the last cycle saw started, Unix
/// seconds (no sample when none was open or the source shows none). Gauge; label entity.
pub const OPEN_TRANSACTION_START_SECONDS: &str =
    "highwater_open_transaction_start_timestamp_seconds";
/// Transactions seen open longer than `max_lookback` (the window stopped
/// short of their start). Counter; label entity.
pub const LONG_TRANSACTIONS_TOTAL: &str = "highwater_long_transactions_total";

/// 1 while polling is paused because Redis memory is above
/// `pause_at_memory`, else 0. Gauge.
pub const POLLING_PAUSED: &str = "highwater_polling_paused";
/// Redis `used_memory / maxmemory`, as the memory watch last read it (no
/// sample without `maxmemory`). Gauge.
pub const REDIS_MEMORY_RATIO: &str = "highwater_redis_memory_ratio";

/// Entries of the stream not yet delivered to the group (`XINFO GROUPS`
/// `lag`; no sample while Redis cannot tell). Gauge; labels stream, group.
pub const GROUP_LAG: &str = "highwater_consumer_group_lag";
/// Entries delivered to the group but not acknowledged. Gauge; labels stream, group.
pub const GROUP_PENDING: &str = "highwater_consumer_group_pending";
/// Age of the group's oldest pending entry, by its id (0 when none is
/// pending). Gauge; labels stream, group.
pub const GROUP_OLDEST_PENDING_AGE_SECONDS: &str =
    "highwater_consumer_group_oldest_pending_age_seconds";
/// Consumers in the group. Gauge; labels stream, group.
pub const GROUP_CONSUMERS: &str = "highwater_consumer_group_consumers";
/// Entries the hard cap (`hard_max_stream_length`) dropped before the group
/// acknowledged them. Counter; labels stream, group.
pub const STREAM_DROPPED_TOTAL: &str = "highwater_stream_entries_dropped_total";
/// Entries the retention trimmed from the stream. Counter; label stream.
pub const STREAM_TRIMMED_TOTAL: &str = "highwater_stream_entries_trimmed_total";

/// Upper bounds of the cycle duration histogram's buckets, seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How a cycle ended, the `outcome` label of [`CYCLES_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Committed.
    Ok,
    /// Stopped by a shutdown between chunks; nothing committed.
    Interrupted,
    /// Failed with an error worth retrying (network, timeouts, Redis loading).
    TransientError,
    /// Failed with an error that needs a fix (query, data, config, lost state).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Interrupted,
        Outcome::TransientError,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Interrupted => "interrupted",
            Outcome::TransientError => "transient_error",
            Outcome::Error => "error",
        }
    }
}

/// The registry.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    entities: BTreeMap<String, EntityMetrics>,
    source_connection_errors: BTreeMap<String, u64>,
    redis_connection_errors: u64,
    agent: Option<String>,
    /// When the lease keeper last heard from Redis.
    leases_checked: Option<Instant>,
    /// The memory watch's last reading: paused, and the ratio.
    paused: bool,
    memory_ratio: Option<f64>,
    /// Per stream, what its retention did and found.
    streams: BTreeMap<String, StreamMetrics>,
}

#[derive(Default)]
struct StreamMetrics {
    /// The entities that recorded it: its groups are shown while this agent
    /// holds one of their leases (a former holder's reading goes stale).
    entities: std::collections::BTreeSet<String>,
    trimmed: u64,
    /// The groups as last read (a group that was deleted goes).
    groups: Vec<crate::retention::GroupFigures>,
    /// Entries dropped unacknowledged, per group, since the agent started.
    dropped: BTreeMap<String, u64>,
}

#[derive(Default)]
struct EntityMetrics {
    cursor: Option<CursorKind>,
    cycles: [u64; 4],
    rows: u64,
    emitted: u64,
    skipped: u64,
    /// Cumulative counts per bucket of [`DURATION_BUCKETS`], then +Inf.
    duration_buckets: [u64; DURATION_BUCKETS.len() + 1],
    duration_sum: f64,
    watermark: Option<i64>,
    /// Database clock minus this machine's clock, microseconds, from the last cycle.
    clock_offset_us: i64,
    dedup_keys: Option<u64>,
    stream_entries: Option<u64>,
    last_success: Option<(SystemTime, Instant)>,
    rows_in_progress: u64,
    lease_held: bool,
    takeovers: u64,
    leases_lost: u64,
    /// From the last committed cycle: the window's extension (µs) and the
    /// oldest open transaction's start.
    window_extension_us: i64,
    open_transaction_since: Option<i64>,
    long_transactions: u64,
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// The source whose connection a cycle error is about, if it is a
/// connection problem (refused, reset, timed out) rather than a query's.
pub fn connection_error_source(error: &CycleError) -> Option<&str> {
    match error {
        CycleError::Source(SourceError::Connect { source_name, .. })
        | CycleError::Source(SourceError::Timeout { source_name, .. }) => Some(source_name),
        CycleError::Source(SourceError::Query {
            source_name,
            error:
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ..
        }) => Some(source_name),
        _ => None,
    }
}

impl Metrics {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain numbers: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes an entity's series exist (at zero) before its first cycle.
    pub fn register_entity(&self, entity: &str, cursor: CursorKind) {
        self.registry()
            .entities
            .entry(entity.to_owned())
            .or_default()
            .cursor = Some(cursor);
    }

    /// Makes a source's series exist before its first error.
    pub fn register_source(&self, source: &str) {
        self.registry()
            .source_connection_errors
            .entry(source.to_owned())
            .or_default();
    }

    /// Records a cycle that returned a report (committed or interrupted).
    pub fn record_cycle(&self, report: &CycleReport) {
        let mut registry = self.registry();
        let m = registry.entities.entry(report.entity.clone()).or_default();
        let outcome = if report.interrupted {
            Outcome::Interrupted
        } else {
            Outcome::Ok
        };
        m.cycles[outcome as usize] += 1;
        m.rows += report.rows;
        m.emitted += report.emitted;
        m.skipped += report.skipped;
        let seconds = report.duration.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                m.duration_buckets[i] += 1;
            }
        }
        m.duration_buckets[DURATION_BUCKETS.len()] += 1;
        m.duration_sum += seconds;
        m.rows_in_progress = 0;
        if report.interrupted {
            return;
        }
        m.watermark = report.watermark;
        m.window_extension_us = report.extension;
        m.open_transaction_since = report.horizon.as_ref().map(|t| t.since);
        m.long_transactions += u64::from(report.beyond_max);
        if let Some(db_now) = report.db_now {
            // The database read its clock shortly after the cycle started.
            let started_us = unix_micros(SystemTime::now())
                - i64::try_from(report.duration.as_micros()).unwrap_or(i64::MAX);
            m.clock_offset_us = db_now - started_us;
        }
        m.last_success = Some((SystemTime::now(), Instant::now()));
    }

    /// Records a failed cycle, and a connection error of its source if it was one.
    pub fn record_failure(&self, entity: &str, error: &CycleError) {
        let mut registry = self.registry();
        let outcome = if error.is_transient() {
            Outcome::TransientError
        } else {
            Outcome::Error
        };
        let m = registry.entities.entry(entity.to_owned()).or_default();
        m.cycles[outcome as usize] += 1;
        m.rows_in_progress = 0;
        if let Some(source) = connection_error_source(error) {
            *registry
                .source_connection_errors
                .entry(source.to_owned())
                .or_default() += 1;
        }
    }

    /// Records a failed attempt to connect to Redis.
    pub fn record_redis_connection_error(&self) {
        self.registry().redis_connection_errors += 1;
    }

    /// Records the memory watch's reading: Redis's memory ratio (`None`:
    /// no `maxmemory`, or unknown) and whether polling is paused.
    pub fn record_memory(&self, ratio: Option<f64>, paused: bool) {
        let mut registry = self.registry();
        registry.memory_ratio = ratio;
        registry.paused = paused;
    }

    /// Records what a stream's retention did, and its consumer groups.
    pub fn record_retention(
        &self,
        entity: &str,
        stream: &str,
        retained: &crate::retention::Retained,
    ) {
        let mut registry = self.registry();
        let m = registry.streams.entry(stream.to_owned()).or_default();
        m.entities.insert(entity.to_owned());
        m.trimmed += retained.trimmed;
        for g in &retained.groups {
            *m.dropped.entry(g.name.clone()).or_default() += g.dropped;
        }
        m.groups = retained.groups.clone();
    }

    /// Records the sizes of an entity's dedup set and stream.
    pub fn record_sizes(&self, entity: &str, dedup_keys: u64, stream_entries: u64) {
        let mut registry = self.registry();
        let m = registry.entities.entry(entity.to_owned()).or_default();
        m.dedup_keys = Some(dedup_keys);
        m.stream_entries = Some(stream_entries);
    }

    /// Records how many rows the cycle in progress has read.
    pub fn record_progress(&self, entity: &str, rows: u64) {
        let mut registry = self.registry();
        if let Some(m) = registry.entities.get_mut(entity) {
            m.rows_in_progress = rows;
        }
    }

    /// This agent's id, for [`AGENT_INFO`].
    pub fn register_agent(&self, agent: &str) {
        self.registry().agent = Some(agent.to_owned());
    }

    /// This agent took (`true`) or gave up or lost (`false`) the entity's lease.
    pub fn record_lease_held(&self, entity: &str, held: bool) {
        if let Some(m) = self.registry().entities.get_mut(entity) {
            m.lease_held = held;
        }
    }

    /// This agent took the entity over from another agent.
    pub fn record_takeover(&self, entity: &str) {
        if let Some(m) = self.registry().entities.get_mut(entity) {
            m.takeovers += 1;
        }
    }

    /// This agent lost the entity's lease while it held it.
    pub fn record_lease_lost(&self, entity: &str) {
        if let Some(m) = self.registry().entities.get_mut(entity) {
            m.leases_lost += 1;
        }
    }

    /// The lease keeper's round succeeded: what it knows of the leases is current.
    pub fn record_leases_checked(&self) {
        self.registry().leases_checked = Some(Instant::now());
    }

    /// How long ago the lease keeper last heard from Redis.
    pub fn leases_checked_ago(&self) -> Option<Duration> {
        self.registry().leases_checked.map(|at| at.elapsed())
    }

    /// Does this agent hold the entity's lease (poll it)?
    pub fn lease_held(&self, entity: &str) -> bool {
        self.registry()
            .entities
            .get(entity)
            .is_some_and(|m| m.lease_held)
    }

    /// When the entity last completed a cycle (committed), on the monotonic clock.
    pub fn last_success(&self, entity: &str) -> Option<Instant> {
        self.registry()
            .entities
            .get(entity)
            .and_then(|m| m.last_success.map(|(_, at)| at))
    }

    /// Rows read so far by the entity's cycle in progress.
    pub fn rows_in_progress(&self, entity: &str) -> u64 {
        self.registry()
            .entities
            .get(entity)
            .map_or(0, |m| m.rows_in_progress)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let registry = self.registry();
        let now_us = unix_micros(SystemTime::now());
        let mut out = String::new();
        let entities = &registry.entities;

        header(
            &mut out,
            BUILD_INFO,
            "gauge",
            "Always 1; the version label says which highwater runs.",
        );
        let _ = writeln!(
            out,
            "{BUILD_INFO}{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        if let Some(agent) = &registry.agent {
            header(
                &mut out,
                AGENT_INFO,
                "gauge",
                "Always 1; the agent label is this agent's id.",
            );
            let _ = writeln!(out, "{AGENT_INFO}{{agent=\"{}\"}} 1", escape(agent));
        }

        header(
            &mut out,
            CYCLES_TOTAL,
            "counter",
            "Cycles finished, by outcome (ok, interrupted, transient_error, error).",
        );
        for (name, m) in entities {
            for outcome in Outcome::ALL {
                let _ = writeln!(
                    out,
                    "{CYCLES_TOTAL}{{entity=\"{}\",outcome=\"{}\"}} {}",
                    escape(name),
                    outcome.as_str(),
                    m.cycles[outcome as usize]
                );
            }
        }

        type Counter = (&'static str, &'static str, fn(&EntityMetrics) -> u64);
        let counters: [Counter; 6] = [
            (ROWS_READ_TOTAL, "Rows the polling query returned.", |m| {
                m.rows
            }),
            (
                ROWS_EMITTED_TOTAL,
                "Rows written to the stream as new versions.",
                |m| m.emitted,
            ),
            (
                ROWS_SKIPPED_TOTAL,
                "Rows skipped because their version was already on the stream.",
                |m| m.skipped,
            ),
            (
                LEASE_TAKEOVERS_TOTAL,
                "Leases this agent took over from another agent.",
                |m| m.takeovers,
            ),
            (
                LEASES_LOST_TOTAL,
                "Leases this agent lost to another agent or to expiry while it held them.",
                |m| m.leases_lost,
            ),
            (
                LONG_TRANSACTIONS_TOTAL,
                "Transactions seen open longer than max_lookback: the window stopped short of their start.",
                |m| m.long_transactions,
            ),
        ];
        for (metric, help, value) in counters {
            header(&mut out, metric, "counter", help);
            for (name, m) in entities {
                let _ = writeln!(out, "{metric}{{entity=\"{}\"}} {}", escape(name), value(m));
            }
        }

        header(
            &mut out,
            CYCLE_DURATION_SECONDS,
            "histogram",
            "How long cycles took (committed or interrupted).",
        );
        for (name, m) in entities {
            let name = escape(name);
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{CYCLE_DURATION_SECONDS}_bucket{{entity=\"{name}\",le=\"{bound}\"}} {}",
                    m.duration_buckets[i]
                );
            }
            let count = m.duration_buckets[DURATION_BUCKETS.len()];
            let _ = writeln!(
                out,
                "{CYCLE_DURATION_SECONDS}_bucket{{entity=\"{name}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "{CYCLE_DURATION_SECONDS}_sum{{entity=\"{name}\"}} {}",
                m.duration_sum
            );
            let _ = writeln!(
                out,
                "{CYCLE_DURATION_SECONDS}_count{{entity=\"{name}\"}} {count}"
            );
        }

        let time_cursor = |m: &EntityMetrics| m.cursor != Some(CursorKind::Version);
        gauge(
            &mut out,
            WATERMARK_SECONDS,
            "The watermark of a timestamp cursor, Unix seconds.",
            entities,
            |m| {
                m.watermark
                    .filter(|_| time_cursor(m))
                    .map(|w| w as f64 / 1e6)
            },
        );
        gauge(
            &mut out,
            WATERMARK_VERSION,
            "The watermark of an integer (version) cursor.",
            entities,
            |m| {
                m.watermark
                    .filter(|_| m.cursor == Some(CursorKind::Version))
                    .map(|w| w as f64)
            },
        );
        gauge(
            &mut out,
            LAG_SECONDS,
            "The database's clock now minus the watermark: changes younger than this may not be on the stream yet.",
            entities,
            |m| {
                m.watermark
                    .filter(|_| time_cursor(m))
                    .map(|w| ((now_us + m.clock_offset_us - w) as f64 / 1e6).max(0.0))
            },
        );
        gauge(
            &mut out,
            WINDOW_EXTENSION_SECONDS,
            "How much earlier than watermark - lookback the last window started, because a transaction was open.",
            entities,
            |m| Some(m.window_extension_us as f64 / 1e6).filter(|_| time_cursor(m)),
        );
        gauge(
            &mut out,
            OPEN_TRANSACTION_START_SECONDS,
            "When the oldest open transaction the last cycle saw started, Unix seconds.",
            entities,
            |m| m.open_transaction_since.map(|t| t as f64 / 1e6),
        );
        gauge(
            &mut out,
            LEASE_HELD,
            "1 while this agent holds the entity's lease and polls it, 0 while it stands by.",
            entities,
            |m| Some(if m.lease_held { 1.0 } else { 0.0 }),
        );
        gauge(
            &mut out,
            DEDUP_KEYS,
            "Keys in the dedup set after the last cycle.",
            entities,
            |m| m.dedup_keys.map(|n| n as f64),
        );
        gauge(
            &mut out,
            STREAM_ENTRIES,
            "Entries in the entity's stream after the last cycle.",
            entities,
            |m| m.stream_entries.map(|n| n as f64),
        );
        gauge(
            &mut out,
            LAST_SUCCESS_TIMESTAMP_SECONDS,
            "When the last committed cycle finished, Unix seconds.",
            entities,
            |m| m.last_success.map(|(at, _)| unix_micros(at) as f64 / 1e6),
        );
        gauge(
            &mut out,
            CYCLE_ROWS_IN_PROGRESS,
            "Rows read so far by the cycle in progress (0 between cycles).",
            entities,
            |m| Some(m.rows_in_progress as f64),
        );

        header(
            &mut out,
            SOURCE_CONNECTION_ERRORS_TOTAL,
            "counter",
            "Cycles that could not connect to, or hear back from, the source's database.",
        );
        for (source, n) in &registry.source_connection_errors {
            let _ = writeln!(
                out,
                "{SOURCE_CONNECTION_ERRORS_TOTAL}{{source=\"{}\"}} {n}",
                escape(source)
            );
        }
        render_streams(&mut out, &registry.streams, entities);
        header(
            &mut out,
            POLLING_PAUSED,
            "gauge",
            "1 while polling is paused because Redis memory is above pause_at_memory.",
        );
        let _ = writeln!(out, "{POLLING_PAUSED} {}", u8::from(registry.paused));
        header(
            &mut out,
            REDIS_MEMORY_RATIO,
            "gauge",
            "Redis used_memory / maxmemory, as last read (no sample without maxmemory).",
        );
        if let Some(ratio) = registry.memory_ratio {
            let _ = writeln!(out, "{REDIS_MEMORY_RATIO} {ratio}");
        }
        header(
            &mut out,
            REDIS_CONNECTION_ERRORS_TOTAL,
            "counter",
            "Failed attempts to connect to Redis at start.",
        );
        let _ = writeln!(
            out,
            "{REDIS_CONNECTION_ERRORS_TOTAL} {}",
            registry.redis_connection_errors
        );
        out
    }
}

/// The streams' retention and consumer groups.
fn render_streams(
    out: &mut String,
    streams: &BTreeMap<String, StreamMetrics>,
    entities: &BTreeMap<String, EntityMetrics>,
) {
    let current = |m: &StreamMetrics| {
        m.entities
            .iter()
            .any(|e| entities.get(e).is_some_and(|e| e.lease_held))
    };
    type Value = fn(&crate::retention::GroupFigures) -> Option<f64>;
    let gauges: [(&str, &str, Value); 4] = [
        (
            GROUP_LAG,
            "Entries of the stream not yet delivered to the consumer group (no sample while Redis cannot tell).",
            |g| g.lag.map(|l| l as f64),
        ),
        (
            GROUP_PENDING,
            "Entries delivered to the consumer group but not acknowledged.",
            |g| Some(g.pending as f64),
        ),
        (
            GROUP_OLDEST_PENDING_AGE_SECONDS,
            "Age of the consumer group's oldest pending entry, by its id (0 when none is pending).",
            |g| Some(g.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0),
        ),
        (
            GROUP_CONSUMERS,
            "Consumers in the consumer group.",
            |g| Some(g.consumers as f64),
        ),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help);
        for (stream, m) in streams.iter().filter(|(_, m)| current(m)) {
            for g in &m.groups {
                if let Some(v) = value(g) {
                    let _ = writeln!(
                        out,
                        "{name}{{stream=\"{}\",group=\"{}\"}} {v}",
                        escape(stream),
                        escape(&g.name)
                    );
                }
            }
        }
    }
    header(
        out,
        STREAM_DROPPED_TOTAL,
        "counter",
        "Entries hard_max_stream_length dropped before the consumer group acknowledged them.",
    );
    for (stream, m) in streams {
        for (group, n) in &m.dropped {
            let _ = writeln!(
                out,
                "{STREAM_DROPPED_TOTAL}{{stream=\"{}\",group=\"{}\"}} {n}",
                escape(stream),
                escape(group)
            );
        }
    }
    header(
        out,
        STREAM_TRIMMED_TOTAL,
        "counter",
        "Entries the retention trimmed from the stream (max_stream_length, max_age, hard_max_stream_length).",
    );
    for (stream, m) in streams {
        let _ = writeln!(
            out,
            "{STREAM_TRIMMED_TOTAL}{{stream=\"{}\"}} {}",
            escape(stream),
            m.trimmed
        );
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A gauge per entity; entities without a value are left out.
fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    entities: &BTreeMap<String, EntityMetrics>,
    value: impl Fn(&EntityMetrics) -> Option<f64>,
) {
    header(out, name, "gauge", help);
    for (entity, m) in entities {
        if let Some(v) = value(m) {
            let _ = writeln!(out, "{name}{{entity=\"{}\"}} {v}", escape(entity));
        }
    }
}

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros()
        .try_into()
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entity: &str, rows: u64, emitted: u64, millis: u64) -> CycleReport {
        CycleReport {
            entity: entity.to_owned(),
            rows,
            emitted,
            skipped: rows - emitted,
            below_window: 0,
            duration: Duration::from_millis(millis),
            since: 0,
            watermark: Some(1_700_000_000_000_000),
            db_now: Some(1_700_000_000_000_000),
            interrupted: false,
            started_at_ms: 1_700_000_000_000,
            sizes: Some((rows, rows)),
            retained: Vec::new(),
            extension: 0,
            horizon: None,
            beyond_max: false,
        }
    }

    #[test]
    fn a_cycle_counts_rows_and_fills_the_histogram_cumulatively() {
        let metrics = Metrics::default();
        metrics.register_entity("orders", CursorKind::Time);
        metrics.record_cycle(&report("orders", 10, 4, 30));
        metrics.record_cycle(&report("orders", 5, 0, 700));
        let text = metrics.render();
        for line in [
            "highwater_cycles_total{entity=\"orders\",outcome=\"ok\"} 2",
            "highwater_cycles_total{entity=\"orders\",outcome=\"error\"} 0",
            "highwater_rows_read_total{entity=\"orders\"} 15",
            "highwater_rows_emitted_total{entity=\"orders\"} 4",
            "highwater_rows_skipped_total{entity=\"orders\"} 11",
            "highwater_cycle_duration_seconds_bucket{entity=\"orders\",le=\"0.025\"} 0",
            "highwater_cycle_duration_seconds_bucket{entity=\"orders\",le=\"0.05\"} 1",
            "highwater_cycle_duration_seconds_bucket{entity=\"orders\",le=\"1\"} 2",
            "highwater_cycle_duration_seconds_bucket{entity=\"orders\",le=\"+Inf\"} 2",
            "highwater_cycle_duration_seconds_count{entity=\"orders\"} 2",
            "highwater_watermark_seconds{entity=\"orders\"} 1700000000",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(!text.contains("highwater_watermark_version{"));
    }

    #[test]
    fn a_streams_groups_show_while_the_agent_holds_an_entity_that_feeds_it() {
        let metrics = Metrics::default();
        metrics.register_entity("orders", CursorKind::Time);
        let group = |dropped| crate::retention::GroupFigures {
            name: "indexer".to_owned(),
            lag: Some(7),
            pending: 3,
            oldest_pending_age_ms: Some(2500),
            consumers: 2,
            last_delivered_id: "1-1".to_owned(),
            dropped,
        };
        let retained = |dropped| crate::retention::Retained {
            trimmed: 10,
            groups: vec![group(dropped)],
        };
        metrics.record_lease_held("orders", true);
        metrics.record_retention("orders", "sales", &retained(4));
        metrics.record_retention("orders", "sales", &retained(1));
        let text = metrics.render();
        for line in [
            "highwater_consumer_group_lag{stream=\"sales\",group=\"indexer\"} 7",
            "highwater_consumer_group_pending{stream=\"sales\",group=\"indexer\"} 3",
            "highwater_consumer_group_oldest_pending_age_seconds{stream=\"sales\",group=\"indexer\"} 2.5",
            "highwater_consumer_group_consumers{stream=\"sales\",group=\"indexer\"} 2",
            "highwater_stream_entries_dropped_total{stream=\"sales\",group=\"indexer\"} 5",
            "highwater_stream_entries_trimmed_total{stream=\"sales\"} 20",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // Another agent took the entity over: this one's reading is stale.
        metrics.record_lease_held("orders", false);
        let text = metrics.render();
        assert!(!text.contains("highwater_consumer_group_lag{"), "{text}");
        assert!(text.contains(
            "highwater_stream_entries_dropped_total{stream=\"sales\",group=\"indexer\"} 5"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
