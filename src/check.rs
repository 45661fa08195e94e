//! `highwater check`: every problem of a configuration at once, one line
//! each, against the real servers. Errors stop the agent from working
//! (unparsable config, unreachable server, a query that cannot work);
//! warnings are risks (an evicting Redis, a full table scan per cycle, a write
//! transaction longer than the look-back, clock skew).
//!
//! Nothing is written anywhere: the checks read server state, prepare the
//! queries and `EXPLAIN` them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::agent::error_chain;
use crate::config::{mask_url, Backend, Config, ConfigError, CursorKind, EntitySettings};
use crate::sink::{describe, EntityKeys, Sink};
use crate::source::placeholder::rewrite_since;
use crate::source::{Clock, OpenTransaction, Pool, Prepared, Sessions, SinceBinding, Source};

/// A clock difference above this between this machine and a database is a warning.
const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(1);
/// The oldest Redis highwater supports.
const MIN_REDIS: (u32, u32) = (6, 2);

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Not checked because something it depends on failed.
    Skipped,
    Warning,
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Skipped => "skipped",
            Level::Warning => "warning",
            Level::Error => "error",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.level, self.text)
    }
}

/// The findings in report order: config, Redis, each source, each entity.
#[derive(Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, text: impl Into<String>) {
        self.findings.push(Finding {
            level,
            text: text.into(),
        });
    }

    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// Any finding is an error.
    pub fn failed(&self) -> bool {
        self.count(Level::Error) > 0
    }

    /// `N ok, N warnings, N errors[, N skipped]`.
    pub fn summary(&self) -> String {
        let plural = |n: usize, word: &str| {
            if n == 1 {
                format!("{n} {word}")
            } else {
                format!("{n} {word}s")
            }
        };
        let mut text = format!(
            "{} ok, {}, {}",
            self.count(Level::Ok),
            plural(self.count(Level::Warning), "warning"),
            plural(self.count(Level::Error), "error")
        );
        let skipped = self.count(Level::Skipped);
        if skipped > 0 {
            text.push_str(&format!(", {skipped} skipped"));
        }
        text
    }
}

/// Loads the configuration at `path` and checks everything it names.
pub async fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(ConfigError::Invalid { path, problems }) => {
            for problem in problems {
                report.push(Level::Error, format!("{}: {problem}", path.display()));
            }
            return report;
        }
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            return report;
        }
    };
    report.push(
        Level::Ok,
        format!(
            "config {}: {} source(s), {} entit{}",
            path.display(),
            config.sources.len(),
            config.entities.len(),
            if config.entities.len() == 1 {
                "y"
            } else {
                "ies"
            }
        ),
    );

    let (redis, sources) = tokio::join!(
        check_redis(&config),
        futures_util::future::join_all(
            config
                .sources
                .keys()
                .map(|name| check_source(&config, name))
        )
    );
    let (redis_findings, redis_cluster) = redis;
    report.findings.extend(redis_findings);
    for findings in sources {
        report.findings.extend(findings);
    }
    for entity in config.entities.values() {
        for (level, text) in slot_findings(&config, entity, redis_cluster) {
            report.push(level, text);
        }
    }
    report
}

/// Redis: reachable, version, eviction policy, persistence. Returns whether
/// it is a cluster (`None`: unknown).
async fn check_redis(config: &Config) -> (Vec<Finding>, Option<bool>) {
    let mut report = Report::default();
    let url = mask_url(&config.redis.url);
    let sink = match Sink::connect(&config.redis).await {
        Ok(sink) => sink,
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            return (report.findings, None);
        }
    };
    let mut conn = sink.connection();
    let infos: redis::RedisResult<Vec<(String, String)>> = conn
        .on_every_primary(
            redis::cmd("INFO")
                .arg("server")
                .arg("memory")
                .arg("persistence")
                .arg("replication")
                .arg("cluster"),
        )
        .await;
    let infos = match infos {
        Ok(infos) => infos,
        Err(e) => {
            report.push(
                Level::Error,
                format!("redis ({url}): INFO failed: {}", describe(&e)),
            );
            return (report.findings, None);
        }
    };
    let cluster = conn.is_cluster();
    if cluster {
        let nodes: Vec<&str> = infos.iter().map(|(node, _)| node.as_str()).collect();
        report.push(
            Level::Ok,
            format!(
                "redis ({url}): a Redis Cluster of {} primaries: {}",
                nodes.len(),
                nodes.join(", ")
            ),
        );
    }
    // CONFIG GET may be refused (the README's ACL rule leaves it out).
    let saves: Vec<(String, Vec<String>)> = conn
        .on_every_primary(redis::cmd("CONFIG").arg("GET").arg("save"))
        .await
        .unwrap_or_default();
    for (node, info) in &infos {
        let save = saves
            .iter()
            .find(|(n, _)| n == node)
            .and_then(|(_, pair)| pair.get(1).cloned());
        check_redis_node(&mut report, &config.redis.url, node, info, save);
    }
    // The stream key of each entity must be a stream (or not exist yet).
    for (entity, keys) in config
        .entities
        .values()
        .flat_map(|e| sink.partition_keys(e).into_iter().map(move |k| (e, k)))
    {
        let kind: redis::RedisResult<String> = redis::cmd("TYPE")
            .arg(&keys.stream)
            .query_async(&mut conn)
            .await;
        match kind {
            Ok(kind) if kind == "stream" || kind == "none" => {}
            Ok(kind) => report.push(
                Level::Error,
                format!(
                    "entity {}: redis key {} is a {kind}, not a stream: choose another stream name",
                    entity.name, keys.stream
                ),
            ),
            Err(e) => report.push(
                Level::Warning,
                format!(
                    "entity {}: cannot read the type of key {}: {}",
                    entity.name,
                    keys.stream,
                    describe(&e)
                ),
            ),
        }
    }
    let wanted = config.redis.wait_for_replicas;
    if !cluster {
        if let (Some(wanted @ 1..), Some((_, info))) = (wanted, infos.first()) {
            // `slave0:ip=...,port=...,state=online,...`: a replica still
            // syncing acknowledges nothing yet.
            let connected = info_field(info, "connected_slaves")
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0);
            let online = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .count() as u32;
            if online < wanted {
                report.push(
                    Level::Error,
                    format!("redis ({url}): wait_for_replicas = {wanted}, but the server has {online} replica(s) in sync ({connected} connected): every cycle would fail as not replicated"),
                );
            } else {
                report.push(
                    Level::Ok,
                    format!("redis ({url}): {online} replica(s) in sync; each cycle waits until {wanted} hold its writes (wait_for_replicas)"),
                );
            }
        }
    }
    if cluster {
        // One `CLUSTER NODES` names every slot's master and its replicas.
        let topology = conn.cluster_nodes().await.map(Option::unwrap_or_default);
        for (entity, keys) in config
            .entities
            .values()
            .flat_map(|e| sink.partition_keys(e).into_iter().map(move |k| (e, k)))
        {
            let slot = crate::connection::slot_of(&keys.stream);
            let cannot_tell = |why: String| {
                (
                    Level::Warning,
                    format!(
                        "entity {}: cannot tell which node serves stream {} (slot {slot}): {why}",
                        entity.name, keys.stream
                    ),
                )
            };
            let (level, text) = match &topology {
                Ok(nodes) => match crate::connection::master_of_slot(nodes, slot) {
                    Some(master) => replication_finding(
                        format!(
                            "entity {}: stream {} is in slot {slot}, served by {}",
                            entity.name, keys.stream, master.address
                        ),
                        master.replicas,
                        wanted,
                    ),
                    None => cannot_tell(
                        "CLUSTER NODES names no live master for it (a failover under way?)".into(),
                    ),
                },
                Err(e) => cannot_tell(describe(e)),
            };
            report.push(level, text);
        }
    }
    (report.findings, Some(cluster))
}

/// A field of an `INFO` reply (`name:value` lines).
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// What a cycle of a partition served by a cluster node waits for, by the
/// node's replicas and `wait_for_replicas` (`None`: one when the node has
/// any).
fn replication_finding(served: String, replicas: u32, wanted: Option<u32>) -> (Level, String) {
    match (replicas, wanted) {
        (0, None | Some(0)) => (
            Level::Ok,
            format!("{served}, which has no replica: cycles do not wait for one, and a failure of that node stops the entity until it is back"),
        ),
        (n, None) => (
            Level::Ok,
            format!("{served}, which has {n} replica(s): each cycle waits until one holds its writes (WAIT; wait_for_replicas)"),
        ),
        (n, Some(0)) => (
            Level::Warning,
            format!("{served}, which has {n} replica(s), but wait_for_replicas = 0: a failover may roll back a cycle's writes, and a version overwritten meanwhile is lost"),
        ),
        (n, Some(w)) if n < w => (
            Level::Error,
            format!("{served}, which has {n} replica(s), but wait_for_replicas = {w}: every cycle would fail as not replicated"),
        ),
        (n, Some(w)) => (
            Level::Ok,
            format!("{served}, which has {n} replica(s): each cycle waits until {w} hold its writes (wait_for_replicas)"),
        ),
    }
}

/// One Redis server's (or cluster primary's) version, eviction policy and
/// persistence, from its `INFO` and `CONFIG GET save` (`None`: refused).
fn check_redis_node(
    report: &mut Report,
    configured: &str,
    node: &str,
    info: &str,
    save: Option<String>,
) {
    let url = mask_url(configured);
    // One server: "redis (<url>)" and "redis"; a cluster: its node each time.
    let (named, short) = if node.is_empty() {
        (format!("redis ({url})"), "redis".to_owned())
    } else {
        (format!("redis node {node}"), format!("redis node {node}"))
    };
    let field = |name: &str| info_field(info, name);
    let version = field("redis_version").unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= MIN_REDIS {
        report.push(Level::Ok, format!("{named}: connected, Redis {version}"));
        if node.is_empty() {
            report.findings.push(redis_encryption(configured));
        }
    } else {
        report.push(
            Level::Error,
            format!(
                "{named}: Redis {version} is too old: highwater needs {}.{} or later",
                MIN_REDIS.0, MIN_REDIS.1
            ),
        );
    }

    let policy = field("maxmemory_policy").unwrap_or_else(|| "unknown".to_owned());
    if policy.starts_with("allkeys-") {
        report.push(
            Level::Warning,
            format!(
                "{short}: maxmemory-policy is {policy}: under memory pressure Redis evicts any key, and an evicted dedup set or watermark makes highwater emit rows again (duplicates); use noeviction"
            ),
        );
    } else {
        report.push(
            Level::Ok,
            format!("{short}: maxmemory-policy {policy} (never evicts highwater's keys, which have no TTL)"),
        );
    }

    let aof = field("aof_enabled").as_deref() == Some("1");
    match (aof, save.as_deref()) {
        (true, _) => report.push(Level::Ok, format!("{short}: persistence: append-only file")),
        (false, Some("")) => report.push(
            Level::Warning,
            format!("{short}: no persistence (appendonly no, save \"\"): a restart loses the watermarks and dedup sets; highwater then stops (on_state_loss = \"fail\") or re-sends everything (\"resnapshot\")"),
        ),
        (false, Some(points)) => report.push(
            Level::Ok,
            format!("{short}: persistence: RDB snapshots (save {points}); a crash loses the writes since the last snapshot, which highwater detects"),
        ),
        (false, None) => report.push(
            Level::Ok,
            format!("{short}: persistence: AOF off, RDB save points unknown (CONFIG GET not allowed)"),
        ),
    }
}

/// A source: connects, its version, its clock, open write transactions, then
/// each entity polling it.
async fn check_source(config: &Config, name: &str) -> Vec<Finding> {
    let mut report = Report::default();
    let settings = &config.sources[name];
    let entities: Vec<&EntitySettings> = config
        .entities
        .values()
        .filter(|e| e.source == name)
        .collect();
    let source = match Source::new(settings) {
        Ok(source) => source,
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            return report.findings;
        }
    };
    let url = source.masked_url().to_owned();
    match source.server_version().await {
        Ok(version) => {
            // PostgreSQL's version() goes on about the compiler.
            let version = version.split(" on ").next().unwrap_or(&version).to_owned();
            let version = if version.starts_with(&settings.backend.to_string())
                || version.starts_with("PostgreSQL")
                || version.starts_with("SQLite")
            {
                version
            } else {
                format!("{} {version}", settings.backend)
            };
            report.push(
                Level::Ok,
                format!("source {name} ({url}): connected, {version}"),
            );
            if let Some(finding) = source_encryption(&source, name, &url).await {
                report.findings.push(finding);
            }
        }
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            for entity in entities {
                report.push(
                    Level::Skipped,
                    format!(
                        "entity {}: query not checked: source {name} is unreachable",
                        entity.name
                    ),
                );
            }
            source.close().await;
            return report.findings;
        }
    }

    let db_now = match clock_skew(&source).await {
        Ok((db_now, skew_us)) => {
            let skew = Duration::from_micros(skew_us.unsigned_abs());
            let direction = if skew_us >= 0 { "ahead of" } else { "behind" };
            let text = format!(
                "source {name}: clock {:.3}s {direction} this machine's",
                skew.as_secs_f64()
            );
            if skew > CLOCK_SKEW_WARNING {
                report.push(
                    Level::Warning,
                    format!("{text}: `status` lag figures are off by as much, and writers that stamp rows with their own clock need a lookback that covers their difference"),
                );
            } else {
                report.push(Level::Ok, text);
            }
            db_now
        }
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            Utc::now().timestamp_micros()
        }
    };

    // The oldest open transaction, read as every cycle reads it (with the
    // clock), against each entity's look-back and max_lookback.
    let transaction = match source.clock(true).await {
        Ok(Clock {
            now,
            sessions: Sessions::Seen(oldest),
        }) => {
            match &oldest {
                None => report.push(
                    Level::Ok,
                    format!("source {name}: no transaction open right now; windows reach back to open ones (up to max_lookback)"),
                ),
                Some(t) => report.push(
                    Level::Ok,
                    format!(
                        "source {name}: oldest open transaction: {:.3}s ({}, user {})",
                        age_of(t, now).as_secs_f64(),
                        t.who,
                        t.user
                    ),
                ),
            }
            oldest.map(|t| (age_of(&t, now), t))
        }
        Ok(_) if source.backend == Backend::Sqlite => {
            report.push(
                Level::Ok,
                format!("source {name}: SQLite shows no other connections' transactions (it has one writer at a time): lookback must cover the longest write transaction"),
            );
            None
        }
        Ok(_) => {
            let why = source
                .sessions_hidden()
                .map_or_else(|| "not asked".to_owned(), |h| h.reason);
            report.push(
                Level::Warning,
                format!("source {name}: open transactions of other sessions are not visible ({why}); windows keep their fixed lookback, and a write transaction longer than it can be missed"),
            );
            None
        }
        Err(e) => {
            report.push(
                Level::Warning,
                format!(
                    "source {name}: cannot read open transactions: {}",
                    error_chain(&e)
                ),
            );
            None
        }
    };

    for entity in entities {
        check_entity(&mut report, &source, entity, db_now, transaction.as_ref()).await;
    }
    source.close().await;
    report.findings
}

/// How many times the clock is read; the reading with the shortest round
/// trip is the most precise.
const CLOCK_SAMPLES: usize = 3;

/// The database's clock and its difference to this machine's (database
/// minus here), microseconds: `now()` against the middle of the round trip.
/// Whether the Redis connection is encrypted, by the URL's scheme; a
/// plaintext connection to a host that is not this machine is a warning.
fn redis_encryption(url: &str) -> Finding {
    if url.starts_with("rediss://") {
        return Finding {
            level: Level::Ok,
            text: "redis: encrypted (TLS, rediss://; the server's certificate verified)".to_owned(),
        };
    }
    let host = url_host(url);
    if is_local(&host) {
        Finding {
            level: Level::Ok,
            text: format!("redis: not encrypted (redis://), a local connection to {host}"),
        }
    } else {
        Finding {
            level: Level::Warning,
            text: format!("redis: not encrypted: redis:// to {host}, which is not this machine; passwords and rows cross the network in clear text (use rediss:// and [redis] ca_file)"),
        }
    }
}

/// Whether the source's session is encrypted, as the server reports it
/// (PostgreSQL `pg_stat_ssl`, MySQL `Ssl_version`); `None` for SQLite.
async fn source_encryption(source: &Source, name: &str, url: &str) -> Option<Finding> {
    let work = async {
        match source.pool() {
            Pool::Postgres(pool) => {
                let row: Option<(bool, Option<String>)> = sqlx::query_as(
                    "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                )
                .fetch_optional(pool)
                .await?;
                Ok(row.and_then(|(ssl, version)| ssl.then(|| version.unwrap_or_default())))
            }
            Pool::MySql(pool) => {
                let row: Option<(String, String)> =
                    sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_version'")
                        .fetch_optional(pool)
                        .await?;
                Ok(row.map(|(_, v)| v).filter(|v| !v.is_empty()))
            }
            Pool::Sqlite(_) => Err(None),
        }
    };
    let found: Result<Option<String>, Option<sqlx::Error>> =
        match tokio::time::timeout(source.timeout(), work).await {
            Ok(result) => result.map_err(|e: Option<sqlx::Error>| e),
            Err(_) => return None,
        };
    let host = url_host(url);
    Some(match found {
        Ok(Some(version)) => Finding {
            level: Level::Ok,
            text: format!("source {name}: encrypted ({version})"),
        },
        Ok(None) if is_local(&host) => Finding {
            level: Level::Ok,
            text: format!("source {name}: not encrypted, a local connection to {host}"),
        },
        Ok(None) => Finding {
            level: Level::Warning,
            text: format!(
                "source {name}: not encrypted: {host} is not this machine; passwords and rows cross the network in clear text (set sslmode=verify-full for PostgreSQL, ssl-mode=VERIFY_IDENTITY for MySQL)"
            ),
        },
        Err(None) => return None,
        Err(Some(e)) => Finding {
            level: Level::Warning,
            text: format!("source {name}: cannot tell whether the connection is encrypted: {e}"),
        },
    })
}

/// The host of a URL (`user:pw@host:port/...`), brackets of IPv6 removed;
/// a `host=` query parameter (a socket directory) wins.
fn url_host(url: &str) -> String {
    if let Some((_, query)) = url.split_once('?') {
        if let Some(host) = query.split('&').find_map(|kv| kv.strip_prefix("host=")) {
            return host.to_owned();
        }
    }
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.to_owned()
}

/// This machine: loopback names and addresses, or a Unix socket.
fn is_local(host: &str) -> bool {
    host.is_empty()
        || host == "localhost"
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn clock_skew(source: &Source) -> Result<(i64, i64), crate::source::SourceError> {
    let mut best: Option<(i64, i64, i64)> = None;
    for _ in 0..CLOCK_SAMPLES {
        let before = Utc::now().timestamp_micros();
        let db_now = source.now().await?;
        let after = Utc::now().timestamp_micros();
        let round_trip = after - before;
        if best.is_none_or(|(rt, _, _)| round_trip < rt) {
            best = Some((round_trip, db_now, db_now - (before + round_trip / 2)));
        }
    }
    let (_, db_now, skew) = best.unwrap_or_default();
    Ok((db_now, skew))
}

/// How long a transaction has been open at `now`.
fn age_of(t: &OpenTransaction, now: i64) -> Duration {
    Duration::from_micros(now.saturating_sub(t.since).max(0).unsigned_abs())
}

/// An entity: its query prepares with key and cursor, its window query uses
/// an index, its look-back covers the open transactions.
async fn check_entity(
    report: &mut Report,
    source: &Source,
    entity: &EntitySettings,
    db_now: i64,
    transaction: Option<&(Duration, OpenTransaction)>,
) {
    let name = &entity.name;
    let prepared = match source.prepare(entity).await {
        Ok(prepared) => prepared,
        Err(e) => {
            report.push(Level::Error, error_chain(&e));
            return;
        }
    };
    let type_of = |column: &str| {
        prepared
            .shape
            .columns
            .iter()
            .position(|c| c == column)
            .and_then(|i| prepared.column_types.get(i))
            .map_or_else(|| "?".to_owned(), |t| t.to_lowercase())
    };
    let keys = entity
        .key
        .iter()
        .map(|k| format!("{k} ({})", type_of(k)))
        .collect::<Vec<_>>()
        .join(", ");
    report.push(
        Level::Ok,
        format!(
            "entity {name}: query prepares on source {}: key {keys}, cursor {} ({})",
            entity.source,
            entity.cursor,
            type_of(&entity.cursor)
        ),
    );

    match full_scans(source, entity, &prepared, db_now).await {
        Ok(tables) if tables.is_empty() => report.push(
            Level::Ok,
            format!("entity {name}: the window query uses an index (EXPLAIN shows no full table scan)"),
        ),
        Ok(tables) => report.push(
            Level::Warning,
            format!(
                "entity {name}: the window query reads table {} in full every cycle (EXPLAIN shows a full scan): index its cursor column {}",
                tables.join(", "),
                entity.cursor
            ),
        ),
        Err(why) => report.push(
            Level::Warning,
            format!("entity {name}: cannot EXPLAIN the window query: {why}"),
        ),
    }

    if entity.cursor_kind == CursorKind::Time {
        let lookback = Duration::from_micros(entity.lookback.unsigned_abs());
        let max_lookback = Duration::from_micros(entity.max_lookback.unsigned_abs());
        if let Some((age, t)) = transaction {
            let seconds = age.as_secs_f64();
            let who = format!("{}, user {}", t.who, t.user);
            let (level, text) = if *age <= lookback {
                (
                    Level::Ok,
                    format!(
                        "entity {name}: lookback {} covers the oldest open transaction ({seconds:.3}s)",
                        humantime::format_duration(lookback)
                    ),
                )
            } else if *age <= max_lookback && crate::window::extends(entity) {
                (
                    Level::Ok,
                    format!(
                        "entity {name}: a transaction has been open for {seconds:.3}s ({who}), longer than lookback {}: the window reaches back to it (max_lookback {})",
                        humantime::format_duration(lookback),
                        humantime::format_duration(max_lookback)
                    ),
                )
            } else {
                (
                    Level::Warning,
                    format!(
                        "entity {name}: a transaction has been open on source {} for {seconds:.3}s ({who}), longer than max_lookback {}: rows it stamped before the window are missed if it commits",
                        entity.source,
                        humantime::format_duration(max_lookback)
                    ),
                )
            };
            report.push(level, text);
        }
    }
}

/// Tables the window query reads in full, per the database's own plan for
/// a window starting `lookback` before now.
async fn full_scans(
    source: &Source,
    entity: &EntitySettings,
    prepared: &Prepared,
    db_now: i64,
) -> Result<Vec<String>, String> {
    let since = match entity.cursor_kind {
        CursorKind::Time => db_now.saturating_sub(entity.lookback),
        CursorKind::Version => 0,
    };
    let literal = since_literal(prepared.since, since);
    let sql = entity.query.trim().trim_end_matches(';').trim_end();
    let sql = rewrite_since(sql, source.backend, &literal).sql;
    let work = async {
        match source.pool() {
            Pool::Postgres(pool) => {
                // With sequential scans priced out, the planner still picks
                // one only where no index can serve: the plan then shows
                // what an index is missing for, not what is cheapest on a
                // small table.
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                let plan: serde_json::Value =
                    sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {sql}"))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| e.to_string())?;
                let _ = tx.rollback().await;
                let mut tables = Vec::new();
                pg_seq_scans(&plan, &mut tables);
                Ok(tables)
            }
            Pool::MySql(pool) => {
                let rows = sqlx::query(&format!("EXPLAIN {sql}"))
                    .fetch_all(pool)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut tables = Vec::new();
                for row in rows {
                    let text = |column: &str| -> Option<String> {
                        row.try_get::<Option<String>, _>(column)
                            .ok()
                            .flatten()
                            .or_else(|| {
                                row.try_get::<Option<Vec<u8>>, _>(column)
                                    .ok()
                                    .flatten()
                                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                            })
                    };
                    let table = text("table").unwrap_or_default();
                    let access = text("type").unwrap_or_default();
                    // ALL is a table scan, index a scan of a whole index. With
                    // possible keys the optimizer merely preferred a scan
                    // (a small table); without, no index can serve.
                    if (access == "ALL" || access == "index")
                        && text("possible_keys").is_none()
                        && !table.starts_with('<')
                        && !tables.contains(&table)
                    {
                        tables.push(table);
                    }
                }
                Ok(tables)
            }
            Pool::Sqlite(pool) => {
                let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(pool)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut tables = Vec::new();
                for row in rows {
                    let detail: String = row.try_get("detail").map_err(|e| e.to_string())?;
                    if let Some(rest) = detail.strip_prefix("SCAN ") {
                        let table = rest.split(' ').next().unwrap_or(rest).to_owned();
                        if !rest.contains("USING")
                            && !rest.starts_with("CONSTANT")
                            && !table.starts_with('(')
                        {
                            tables.push(table);
                        }
                    }
                }
                Ok(tables)
            }
        }
    };
    match tokio::time::timeout(source.timeout(), work).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(source.timeout())
        )),
    }
}

/// `:since` as an SQL literal the database types from its context.
fn since_literal(binding: SinceBinding, since: i64) -> String {
    let time = DateTime::<Utc>::from_timestamp_micros(since).unwrap_or(DateTime::<Utc>::MIN_UTC);
    match binding {
        SinceBinding::Integer => since.to_string(),
        SinceBinding::UnixSeconds => since.div_euclid(1_000_000).to_string(),
        SinceBinding::Date => format!("'{}'", time.format("%Y-%m-%d")),
        SinceBinding::Utc | SinceBinding::Naive | SinceBinding::Text | SinceBinding::SqliteText => {
            format!("'{}'", time.format("%Y-%m-%d %H:%M:%S"))
        }
    }
}

/// Relations under `Seq Scan` nodes of a PostgreSQL JSON plan.
fn pg_seq_scans(plan: &serde_json::Value, tables: &mut Vec<String>) {
    match plan {
        serde_json::Value::Array(items) => items.iter().for_each(|i| pg_seq_scans(i, tables)),
        serde_json::Value::Object(node) => {
            if node.get("Node Type").and_then(|t| t.as_str()) == Some("Seq Scan") {
                if let Some(table) = node.get("Relation Name").and_then(|t| t.as_str()) {
                    if !tables.iter().any(|t| t == table) {
                        tables.push(table.to_owned());
                    }
                }
            }
            node.values().for_each(|v| pg_seq_scans(v, tables));
        }
        _ => {}
    }
}

/// The entity's keys must hash to one cluster slot (the Lua scripts touch
/// them together). On a single Redis a mismatch works; on a cluster every
/// script call fails with CROSSSLOT.
fn slot_findings(
    config: &Config,
    entity: &EntitySettings,
    cluster: Option<bool>,
) -> Vec<(Level, String)> {
    let keys = EntityKeys::new(&config.redis.key_prefix, &entity.name, &entity.stream);
    let slots: BTreeMap<u16, Vec<&str>> = [&keys.stream, &keys.seen, &keys.digest, &keys.state]
        .into_iter()
        .fold(BTreeMap::new(), |mut by_slot, key| {
            by_slot
                .entry(crate::connection::slot_of(key))
                .or_insert_with(Vec::new)
                .push(key.as_str());
            by_slot
        });
    if slots.len() == 1 {
        let slot = slots.keys().next().copied().unwrap_or_default();
        return vec![(
            Level::Ok,
            format!(
                "entity {}: stream and state keys share cluster slot {slot}",
                entity.name
            ),
        )];
    }
    let spread = slots
        .iter()
        .map(|(slot, keys)| format!("slot {slot}: {}", keys.join(", ")))
        .collect::<Vec<_>>()
        .join("; ");
    let level = if cluster == Some(true) {
        Level::Error
    } else {
        Level::Warning
    };
    vec![(
        level,
        format!(
            "entity {}: stream {:?} and its state keys fall in different cluster slots ({spread}): on Redis Cluster every cycle fails with CROSSSLOT; use a stream name without braces, or with one {{tag}}",
            entity.name, entity.stream
        ),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitions_replication_is_judged_by_its_replicas_and_wait_for_replicas() {
        let level = |replicas, wanted| replication_finding("s".into(), replicas, wanted).0;
        assert_eq!(level(0, None), Level::Ok);
        assert_eq!(level(1, None), Level::Ok);
        assert_eq!(level(2, Some(2)), Level::Ok);
        assert_eq!(level(1, Some(2)), Level::Error);
        assert_eq!(level(1, Some(0)), Level::Warning);
        let (_, text) = replication_finding("s".into(), 1, Some(2));
        assert!(
            text.contains("every cycle would fail as not replicated"),
            "{text}"
        );
    }

    #[test]
    fn hosts_are_read_from_urls_and_loopback_is_local() {
        assert_eq!(
            url_host("postgres://app:***@db.internal:5432/shop?sslmode=require"),
            "db.internal"
        );
        assert_eq!(url_host("redis://127.0.0.1:6379/0"), "127.0.0.1");
        assert_eq!(url_host("rediss://u:p@[::1]:6380"), "::1");
        assert_eq!(
            url_host("postgres:///shop?host=/var/run/postgresql"),
            "/var/run/postgresql"
        );
        assert!(is_local("127.0.0.2") && is_local("::1") && is_local("localhost"));
        assert!(!is_local("10.0.0.5") && !is_local("db.internal"));
    }

    #[test]
    fn since_literals_are_typed_by_context() {
        let t = 1_700_000_000_123_456;
        assert_eq!(since_literal(SinceBinding::Utc, t), "'2023-11-14 22:13:20'");
        assert_eq!(since_literal(SinceBinding::Date, t), "'2023-11-14'");
        assert_eq!(since_literal(SinceBinding::UnixSeconds, t), "1700000000");
        assert_eq!(since_literal(SinceBinding::Integer, 42), "42");
    }
}
