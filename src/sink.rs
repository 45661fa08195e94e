//! Redis: the stream and the per-entity state, written only through the two
//! embedded Lua scripts (run by EVALSHA; redis-rs reloads them on NOSCRIPT,
//! e.g. after a Redis restart emptied the script cache).
//!
//! The sink promises that a chunk is applied atomically (dedup state and
//! stream entries together) and that the watermark moves only through
//! [`Sink::commit`], after a whole window was read.

use std::collections::HashMap;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use crate::connection::Connection;

use crate::change::Change;
use crate::config::{mask_url, EntitySettings, RedisSettings};

const DEDUP_LUA: &str = include_str!("../lua/dedup.lua");
/// The stream's retention, a function the commit and retain scripts call.
const RETENTION_LUA: &str = include_str!("../lua/retention.lua");
const COMMIT_LUA: &str = concat!(
    include_str!("../lua/retention.lua"),
    include_str!("../lua/commit.lua")
);
const RETAIN_LUA: &str = concat!(
    include_str!("../lua/retention.lua"),
    include_str!("../lua/retain.lua")
);
const BEGIN_LUA: &str = include_str!("../lua/begin.lua");
/// Members trimmed per call of the commit script.
const TRIM_BATCH: usize = 10_000;

/// An error talking to Redis, with what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("redis ({url}): cannot connect")]
    Connect {
        url: String,
        #[source]
        error: redis::RedisError,
    },
    #[error("{}redis: {action} failed", entity_prefix(entity))]
    Command {
        entity: String,
        action: &'static str,
        #[source]
        error: redis::RedisError,
    },
    #[error(
        "{}redis answered {action} with an unexpected reply: {reply}",
        entity_prefix(entity)
    )]
    Reply {
        entity: String,
        action: &'static str,
        reply: String,
    },
    /// The state hash the cycle started from is gone: Redis lost the
    /// entity's state during the cycle. Nothing was written.
    #[error(
        "entity {entity}: its state vanished from redis during the cycle ({action} wrote nothing)"
    )]
    StateVanished {
        entity: String,
        action: &'static str,
    },
    /// The caller's lease is not the entity's current one: another agent
    /// holds it (`holder`, its lease value) or nobody does (`None`).
    /// Nothing was written.
    #[error("entity {entity}: {action} was refused: this agent no longer holds the lease ({})", holder.as_deref().unwrap_or("it expired"))]
    Fenced {
        entity: String,
        action: &'static str,
        holder: Option<String>,
    },
    /// A chunk reached the dedup script before the chunk it follows was
    /// applied (that one failed, or was overtaken). Nothing was written.
    #[error("entity {entity}: {action} was refused: the chunk before it was not applied (the last applied is {})", last.as_deref().unwrap_or("none"))]
    OutOfOrder {
        entity: String,
        action: &'static str,
        last: Option<String>,
    },
    /// The cycle's writes reached fewer replicas than `wait_for_replicas`
    /// within the timeout: a failover now could roll them back, so the
    /// cycle does not count as done (the next one goes on from it).
    #[error("entity {entity}: the cycle's writes reached {acked} of the {wanted} replica(s) wait_for_replicas asks for within {}: not counted as done (a failover now could roll them back)", humantime::format_duration(*timeout))]
    NotReplicated {
        entity: String,
        acked: u32,
        wanted: u32,
        timeout: Duration,
    },
}

/// `entity NAME: ` for errors about one entity; nothing for the agent's own
/// calls (leases, INFO), which have none.
fn entity_prefix(entity: &str) -> String {
    if entity.is_empty() {
        String::new()
    } else {
        format!("entity {entity}: ")
    }
}

impl SinkError {
    /// Worth retrying unchanged: the network, a restart, LOADING, a failover,
    /// a full memory (OOM) that consumers will drain.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Connect { error, .. } | SinkError::Command { error, .. } => {
                is_transient_redis(error)
            }
            SinkError::Reply { .. } => false,
            // The next cycle finds the state missing and acts per on_state_loss.
            SinkError::StateVanished { .. } => true,
            // The agent stands by; a lease it takes later writes again.
            SinkError::Fenced { .. } => true,
            // The next cycle re-reads the window.
            SinkError::OutOfOrder { .. } => true,
            // A replica catching up, or a failover under way.
            SinkError::NotReplicated { .. } => true,
        }
    }

    /// Redis refused a write because `maxmemory` is reached.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            SinkError::Connect { error, .. } | SinkError::Command { error, .. } => {
                error.code() == Some("OOM")
            }
            SinkError::Reply { .. }
            | SinkError::StateVanished { .. }
            | SinkError::Fenced { .. }
            | SinkError::OutOfOrder { .. }
            | SinkError::NotReplicated { .. } => false,
        }
    }
}

fn is_transient_redis(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                | redis::ErrorKind::MasterDown
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::ReadOnly
                // A cluster mid-failover: redirections redis-rs gave up
                // following, a node it has no connection to yet.
                | redis::ErrorKind::Moved
                | redis::ErrorKind::Ask
                | redis::ErrorKind::ClusterConnectionNotFound
        )
        || matches!(error.code(), Some("OOM" | "LOADING" | "BUSY"))
        // WAIT sent to a node that has just become a replica (a failover
        // under way; the slot map catches up).
        || error
            .detail()
            .is_some_and(|d| d.starts_with("WAIT cannot be used with replica"))
}

/// Every script highwater runs, by file: a command a script calls that Redis
/// 7.0 refuses is named only by the script's SHA1 and the line. The commit
/// and retain scripts begin with lua/retention.lua.
const SCRIPT_FILES: [(&str, &str); 6] = [
    ("lua/dedup.lua", DEDUP_LUA),
    ("lua/commit.lua", COMMIT_LUA),
    ("lua/retain.lua", RETAIN_LUA),
    ("lua/begin.lua", BEGIN_LUA),
    ("lua/lease.lua", include_str!("../lua/lease.lua")),
    ("lua/agents.lua", include_str!("../lua/agents.lua")),
];

/// Redis refused a command because the user's ACL does not allow it (the
/// command, a key or a channel). Never transient: the same call is refused
/// until someone changes the rule.
///
/// A command sent directly answers `NOPERM`; one called by a script fails
/// the script with `ERR` and a sentence (Redis 7.0: "The user executing the
/// script can't ...", 7.2 and later: "ACL failure in script: ..."), and
/// redis-rs reports a refused `SELECT` at connect as `ERR` with Redis's text:
/// for those the text is all there is to go by.
pub fn is_acl_refusal(error: &redis::RedisError) -> bool {
    match (error.code(), error.detail()) {
        (Some("NOPERM"), _) => true,
        (Some("ERR"), Some(detail)) => {
            detail.starts_with("The user executing the script can't")
                || detail.starts_with("ACL failure in script")
                || detail.contains("no permissions to")
        }
        _ => false,
    }
}

/// A Redis error as the user reads it. An ACL refusal names the command
/// (the one Redis names, else the one the refused script line calls) and
/// points at the rule in the README; any other error as redis-rs says it.
pub fn describe(error: &redis::RedisError) -> String {
    if !is_acl_refusal(error) {
        return error.to_string();
    }
    let detail = error.detail().unwrap_or_default();
    // Redis names the command in quotes: "... to run the 'xadd' command".
    let named = detail
        .split_once("to run the '")
        .and_then(|(_, rest)| rest.split('\'').next())
        .map(str::to_uppercase);
    let command = match (named, script_line(detail)) {
        (Some(command), Some((file, line, _))) => {
            format!("the command {command} at {file} line {line}")
        }
        (Some(command), None) => format!("the command {command}"),
        (None, Some((file, line, calls))) if !calls.is_empty() => {
            format!("the command {} at {file} line {line}", calls.join(" or "))
        }
        _ => "a command".to_owned(),
    };
    let reply = match error.code() {
        Some("NOPERM") => format!("NOPERM {detail}"),
        _ => detail.to_owned(),
    };
    format!(
        "redis refused {command} ({reply}): the user lacks an ACL permission; highwater needs the ACL rule in README \"Redis ACL (least privilege)\""
    )
}

/// The script file and line a refusal names (`script: <sha1>, on
/// @user_script:<line>`), with the commands that line calls.
fn script_line(detail: &str) -> Option<(&'static str, usize, Vec<String>)> {
    let (_, rest) = detail.rsplit_once("script: ")?;
    let (sha, rest) = rest.split_once(", on @user_script:")?;
    let line: usize = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let (file, source) = SCRIPT_FILES
        .iter()
        .find(|(_, source)| Script::new(source).get_hash() == sha.trim())?;
    let text = source.lines().nth(line.checked_sub(1)?)?;
    let shared = RETENTION_LUA.lines().count();
    let (file, line) = match source.starts_with(RETENTION_LUA) {
        true if line <= shared => ("lua/retention.lua", line),
        true => (*file, line - shared),
        false => (*file, line),
    };
    let calls = text
        .split("redis.call(")
        .skip(1)
        .filter_map(|call| {
            let quote = call.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            Some(call[1..].split(quote).next()?.to_uppercase())
        })
        .collect();
    Some((file, line, calls))
}

/// The Redis keys of one entity. All share one hash slot: the state keys
/// carry the stream key's slot tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityKeys {
    pub stream: String,
    pub seen: String,
    pub digest: String,
    pub state: String,
    /// Who may write the entity now (lua/lease.lua).
    pub lease: String,
    /// The last lease token issued; never expires.
    pub tokens: String,
    /// Per consumer group of the stream, how many entries the hard cap
    /// dropped before the group acknowledged them (lua/retention.lua).
    pub dropped: String,
}

impl EntityKeys {
    pub fn new(prefix: &str, entity: &str, stream: &str) -> EntityKeys {
        let tag = slot_tag(stream);
        EntityKeys {
            stream: stream.to_owned(),
            seen: format!("{prefix}:{{{tag}}}:seen:{entity}"),
            digest: format!("{prefix}:{{{tag}}}:digest:{entity}"),
            state: format!("{prefix}:{{{tag}}}:state:{entity}"),
            lease: format!("{prefix}:{{{tag}}}:lease:{entity}"),
            tokens: format!("{prefix}:{{{tag}}}:tokens:{entity}"),
            dropped: format!("{prefix}:{{{tag}}}:dropped:{stream}"),
        }
    }
}

/// The part of a key Redis Cluster hashes: the text inside the first
/// non-empty `{...}`, else the whole key.
pub fn slot_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// What a cycle finds in Redis before it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSnapshot {
    /// The state hash exists (it is created by the first chunk that emits).
    pub exists: bool,
    pub watermark: Option<i64>,
    /// Keys the dedup state tracked after the last commit.
    pub tracked: u64,
    /// Keys in the digest hash now.
    pub digests: u64,
    /// How many chunks ever emitted for this entity (the dedup script counts).
    pub writes: i64,
    /// What became of the caller's lease.
    pub lease: LeaseRenewal,
    /// What the last commits left for the window (src/window.rs).
    pub window: crate::window::Remembered,
    /// The `partitions` the last commit recorded (`None`: before partitions).
    pub partitions: Option<u32>,
}

/// The lease a cycle started with, as lua/begin.lua found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LeaseRenewal {
    /// No lease was given (unfenced).
    #[default]
    NotAsked,
    /// The caller holds it; it lasts another lease from now.
    Renewed,
    /// Another agent holds it (its lease value), or nobody does.
    Lost { holder: Option<String> },
}

impl StateSnapshot {
    /// The dedup hash vanished although the last commit left keys in it.
    pub fn digests_vanished(&self) -> bool {
        self.exists && self.tracked > 0 && self.digests == 0
    }
}

/// What a cycle leaves in the state hash for `status` and for people.
#[derive(Debug, Clone, Default)]
pub struct CycleFigures {
    pub started_at_ms: i64,
    pub duration_ms: u64,
    pub rows: u64,
    pub emitted: u64,
    /// Rows whose version was already on the stream (`last_skipped`).
    pub skipped: u64,
    /// The database's clock at cycle start, time cursors (`last_db_now`):
    /// with `last_started_at_ms` it gives `status` the clock difference.
    pub db_now: Option<i64>,
    /// How much earlier than `W - lookback` the window started, and the
    /// oldest open transaction seen (`horizon`, the next window reaches it).
    pub extension: i64,
    pub horizon: Option<crate::source::OpenTransaction>,
    /// The entity's `partitions`, recorded so that a change is refused.
    pub partitions: u32,
}

/// What a cycle commits (see [`Sink::commit`]).
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    /// The watermark candidate (`None`: keep the old one).
    pub candidate: Option<i64>,
    /// Trim the dedup state below this epoch (`None`: nothing).
    pub trim_below: Option<i64>,
    pub figures: &'a CycleFigures,
    /// As for [`Sink::apply_chunk`].
    pub expect_state: bool,
    /// The caller's lease value (`None`: unfenced).
    pub fence: Option<&'a str>,
    /// The cycle's last chunk ([`Link::name`]), which must be the last one
    /// applied (`None`: no check): a failover that rolled it back makes the
    /// commit fail with [`SinkError::OutOfOrder`] rather than advance the
    /// watermark past rows that are on no stream.
    pub last_chunk: Option<&'a str>,
    /// Replicas that must hold the commit, and every write before it on its
    /// node, before it counts ([`Sink::replicas_wanted`]; 0: none).
    pub replicas: u32,
}

/// What [`Sink::commit`] left: the watermark now stored (`None`: never set)
/// and the sizes after the trim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub watermark: Option<i64>,
    /// Keys in the dedup set.
    pub dedup_keys: u64,
    /// Entries in the stream (all variants).
    pub stream_entries: u64,
    /// What the stream's retention did, and the consumer groups.
    pub retained: crate::retention::Retained,
}

/// Where a chunk stands among the chunks of its cycle that are in flight
/// together (lua/dedup.lua ARGV[6], ARGV[7]): the script applies a chunk
/// only right after the one it names as `after`, so a chunk whose
/// predecessor failed, or overtook it, writes nothing
/// ([`SinkError::OutOfOrder`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Link<'a> {
    /// The chunk that must be the last one applied (`None`: no check).
    pub after: Option<&'a str>,
    /// This chunk's name, recorded in the state hash when it is applied
    /// (`None`: nothing recorded). Only with `expect_state`.
    pub name: Option<&'a str>,
}

/// A script's call as [`Sink::query_script`] sends it: an EVALSHA, or a
/// pipeline that starts with one.
pub(crate) trait ScriptCall {
    fn send<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send;
}

impl ScriptCall for redis::Cmd {
    fn send<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl ScriptCall for redis::Pipeline {
    fn send<T: redis::FromRedisValue>(
        &self,
        conn: &mut Connection,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

/// The connection to Redis and the scripts.
#[derive(Clone)]
pub struct Sink {
    conn: Connection,
    /// Replicas that must acknowledge a cycle's writes; `None`: as many as
    /// the entity's shard has (at most one), on a cluster.
    wait_replicas: Option<u32>,
    wait_timeout: Duration,
    /// The last `CLUSTER NODES` read, and when (shared by the entities).
    topology: std::sync::Arc<tokio::sync::Mutex<Option<(std::time::Instant, String)>>>,
    prefix: String,
    dedup: Script,
    commit: Script,
    retain: Script,
    begin: Script,
}

impl Sink {
    /// Connects (bounded by the configured timeout); afterwards the
    /// connection reconnects by itself.
    pub async fn connect(settings: &RedisSettings) -> Result<Sink, SinkError> {
        let connect_error = |error| SinkError::Connect {
            url: mask_url(&settings.url),
            error,
        };
        let conn = Connection::open(settings).await.map_err(connect_error)?;
        let wait_replicas = match settings.wait_for_replicas {
            Some(n) => Some(n),
            None if conn.is_cluster() => None,
            None => Some(0),
        };
        Ok(Sink {
            conn,
            wait_replicas,
            // Below the reply timeout, so that a WAIT short of replicas
            // answers how many it reached before the client gives up on it.
            wait_timeout: settings.timeout * 3 / 4,
            topology: Default::default(),
            prefix: settings.key_prefix.clone(),
            dedup: Script::new(DEDUP_LUA),
            commit: Script::new(COMMIT_LUA),
            retain: Script::new(RETAIN_LUA),
            begin: Script::new(BEGIN_LUA),
        })
    }

    /// The keys of an entity.
    pub fn keys(&self, entity: &EntitySettings) -> EntityKeys {
        EntityKeys::new(&self.prefix, &entity.name, &entity.stream)
    }

    /// The keys of each partition of an entity (one: its own keys).
    pub fn partition_keys(&self, entity: &EntitySettings) -> Vec<EntityKeys> {
        crate::partition::keys(&self.prefix, entity)
    }

    /// With one partition configured and no state of its own: the
    /// `partitions` recorded by partition 0's state, if the entity ran
    /// partitioned before.
    pub async fn partitions_written(
        &self,
        entity: &EntitySettings,
    ) -> Result<Option<u32>, SinkError> {
        let keys = EntityKeys::new(&self.prefix, &entity.name, &format!("{}:0", entity.stream));
        let mut conn = self.conn.clone();
        let written: Option<String> =
            conn.hget(&keys.state, "partitions")
                .await
                .map_err(|error| SinkError::Command {
                    entity: entity.name.clone(),
                    action: "reading the state",
                    error,
                })?;
        Ok(written.and_then(|n| n.parse().ok()))
    }

    /// How many replicas must hold a cycle's writes to the node of the
    /// entity's keys before the cycle counts as done: `wait_for_replicas`;
    /// on a cluster, unless configured, one when the entity's shard has any
    /// (and one while no live master is seen serving the slot: a failover
    /// under way is not taken for a shard without replicas).
    pub async fn replicas_wanted(
        &self,
        entity: &EntitySettings,
        keys: &EntityKeys,
    ) -> Result<u32, SinkError> {
        if let Some(n) = self.wait_replicas {
            return Ok(n);
        }
        let mut conn = self.conn.clone();
        let nodes = self
            .topology(&mut conn)
            .await
            .map_err(|error| SinkError::Command {
                entity: entity.name.clone(),
                action: "reading the cluster's nodes",
                error,
            })?;
        let slot = crate::connection::slot_of(&keys.stream);
        Ok(crate::connection::master_of_slot(&nodes, slot).map_or(1, |m| m.replicas.min(1)))
    }

    /// `CLUSTER NODES`, read at most once a second for all entities.
    async fn topology(&self, conn: &mut Connection) -> redis::RedisResult<String> {
        let mut cached = self.topology.lock().await;
        if let Some((at, nodes)) = cached.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return Ok(nodes.clone());
            }
        }
        let nodes = conn.cluster_nodes().await?.unwrap_or_default();
        *cached = Some((std::time::Instant::now(), nodes.clone()));
        Ok(nodes)
    }

    /// A connection handle (cheap clone of the managed connection).
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// The entity's state hash (watermark, figures), empty if it never ran.
    pub async fn state(
        &self,
        entity: &str,
        keys: &EntityKeys,
    ) -> Result<HashMap<String, String>, SinkError> {
        let mut conn = self.conn.clone();
        conn.hgetall(&keys.state)
            .await
            .map_err(|error| SinkError::Command {
                entity: entity.to_owned(),
                action: "reading the state",
                error,
            })
    }

    /// Reads what a cycle needs to start, in one call of lua/begin.lua: the
    /// state hash, the size of the digest hash, and, given the caller's
    /// lease value, the lease renewed for `lease` (or found lost). For a
    /// partition, `token` instead: the partition's fence raised to it (or
    /// the partition found taken by a newer holder: lost).
    pub async fn snapshot(
        &self,
        entity: &str,
        keys: &EntityKeys,
        lease: Option<(&str, Duration)>,
        token: Option<u64>,
    ) -> Result<StateSnapshot, SinkError> {
        let mut cmd = redis::cmd("EVALSHA");
        let (value, ms) = lease.map_or(("", 0), |(value, lease)| (value, lease.as_millis()));
        cmd.arg(self.begin.get_hash())
            .arg(3)
            .arg(&keys.state)
            .arg(&keys.digest)
            .arg(&keys.lease)
            .arg(value)
            .arg(ms as u64)
            .arg(token.map(|t| t.to_string()).unwrap_or_default());
        let (state, digests, renewal, current): (HashMap<String, String>, u64, String, String) =
            self.query_script(&self.begin, &cmd)
                .await
                .map_err(|error| SinkError::Command {
                    entity: entity.to_owned(),
                    action: "reading the state",
                    error,
                })?;
        let lease = match renewal.as_str() {
            "renewed" => LeaseRenewal::Renewed,
            "lost" => LeaseRenewal::Lost {
                holder: Some(current).filter(|c| !c.is_empty()),
            },
            _ => LeaseRenewal::NotAsked,
        };
        Ok(StateSnapshot {
            exists: !state.is_empty(),
            watermark: state.get("watermark").and_then(|w| w.parse().ok()),
            tracked: state
                .get("tracked")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            digests,
            writes: state
                .get("writes")
                .and_then(|w| w.parse().ok())
                .unwrap_or(0),
            lease,
            window: crate::window::Remembered {
                horizon: state.get("horizon").and_then(|h| h.parse().ok()),
                trimmed: state.get("trimmed").and_then(|t| t.parse().ok()),
            },
            partitions: state.get("partitions").and_then(|n| n.parse().ok()),
        })
    }

    /// Sends a script's EVALSHA; when Redis forgot the script (a restart
    /// emptied its cache: NOSCRIPT), loads it and sends the command again.
    /// `cmd` may be a pipeline that starts with the EVALSHA: the NOSCRIPT
    /// reply fails it as a whole, and it is sent again whole.
    pub(crate) async fn query_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        cmd: &impl ScriptCall,
    ) -> Result<T, redis::RedisError> {
        let mut conn = self.conn.clone();
        match cmd.send(&mut conn).await {
            Err(error) if error.kind() == redis::ErrorKind::NoScriptError => {
                script.prepare_invoke().load_async(&mut conn).await?;
                cmd.send(&mut conn).await
            }
            other => other,
        }
    }

    /// Does the stream hold a message of this variant among its latest
    /// `depth` entries? (Evidence that the entity ran before.)
    pub async fn stream_has_variant(
        &self,
        entity: &str,
        keys: &EntityKeys,
        variant: &str,
        depth: usize,
    ) -> Result<bool, SinkError> {
        let mut conn = self.conn.clone();
        let entries: redis::streams::StreamRangeReply = conn
            .xrevrange_count(&keys.stream, "+", "-", depth)
            .await
            .map_err(|error| SinkError::Command {
                entity: entity.to_owned(),
                action: "reading the stream",
                error,
            })?;
        Ok(entries.ids.iter().any(|entry| {
            matches!(entry.map.get("variant"), Some(redis::Value::BulkString(v)) if v.as_slice() == variant.as_bytes())
        }))
    }

    /// `used_memory / maxmemory`, or `None` when Redis has no memory limit;
    /// on a cluster, that of the fullest primary (a stream fills the node
    /// that serves it, and a cycle may write to any).
    pub async fn memory_ratio(&self) -> Result<Option<f64>, SinkError> {
        let mut conn = self.conn.clone();
        let infos: Vec<(String, String)> = conn
            .on_every_primary(redis::cmd("INFO").arg("memory"))
            .await
            .map_err(|error| SinkError::Command {
                entity: String::new(),
                action: "INFO memory",
                error,
            })?;
        Ok(infos
            .iter()
            .filter_map(|(_, info)| memory_ratio(info))
            .max_by(f64::total_cmp))
    }

    /// Applies one chunk through the dedup script; returns how many rows
    /// were emitted and the state's write counter afterwards.
    /// `expect_state`: the state hash exists (the cycle started from it, or
    /// an earlier chunk created it); if it has vanished, nothing is applied
    /// and the error is [`SinkError::StateVanished`].
    pub async fn apply_chunk(
        &self,
        entity: &EntitySettings,
        keys: &EntityKeys,
        chunk: &[Change],
        expect_state: bool,
        fence: Option<&str>,
    ) -> Result<(u64, i64), SinkError> {
        let cmd = self.chunk_command(entity, keys, chunk, expect_state, fence, Link::default());
        self.send_chunk(entity, cmd).await
    }

    /// The dedup script's call for one chunk, to send with
    /// [`Sink::send_chunk`]: built apart from sending, so that the call in
    /// flight owns its arguments while the next chunk is read into the
    /// buffers this one was read into. `link`: see [`Link`].
    pub fn chunk_command(
        &self,
        entity: &EntitySettings,
        keys: &EntityKeys,
        chunk: &[Change],
        expect_state: bool,
        fence: Option<&str>,
        link: Link<'_>,
    ) -> redis::Cmd {
        // EVALSHA built as one command: every argument goes straight into
        // the command's single buffer. (A `ScriptInvocation` allocates each
        // argument on its own and copies them all into a command again.)
        let bytes: usize = chunk
            .iter()
            .map(|c| c.pkey.len() + c.payload.as_ref().map_or(0, String::len) + 48)
            .sum();
        let mut cmd = redis::Cmd::with_capacity(15 + 5 * chunk.len(), 320 + bytes);
        cmd.arg("EVALSHA")
            .arg(self.dedup.get_hash())
            .arg(5)
            .arg(&keys.seen)
            .arg(&keys.digest)
            .arg(&keys.stream)
            .arg(&keys.state)
            .arg(&keys.lease)
            .arg(entity.max_stream_length)
            .arg(&entity.variant)
            .arg(if entity.payload == crate::config::PayloadMode::Row {
                "1"
            } else {
                "0"
            })
            .arg(if expect_state { "1" } else { "0" })
            .arg(fence.unwrap_or(""))
            .arg(link.after.unwrap_or(""))
            .arg(link.name.unwrap_or(""));
        let mut digest = [0u8; 16];
        for change in chunk {
            cmd.arg(&change.pkey)
                .arg(change.epoch)
                .arg(hex16(change.digest, &mut digest))
                .arg(change.op.as_str())
                .arg(change.payload.as_deref().unwrap_or(""));
        }
        cmd
    }

    /// Sends a chunk's call (see [`Sink::chunk_command`]); returns how many
    /// rows were emitted and the state's write counter afterwards. Calls
    /// sent one after the other without waiting travel in that order on the
    /// one connection (a pipeline).
    pub async fn send_chunk(
        &self,
        entity: &EntitySettings,
        cmd: redis::Cmd,
    ) -> Result<(u64, i64), SinkError> {
        let applied: Option<(u64, i64)> = self
            .query_script(&self.dedup, &cmd)
            .await
            .map_err(|error| fenced_or(&entity.name, "the dedup script", error))?;
        applied.ok_or_else(|| SinkError::StateVanished {
            entity: entity.name.clone(),
            action: "the dedup script",
        })
    }

    /// Advances the watermark to max(old, `candidate`) (`None`: keep it),
    /// records the cycle's figures and trims the dedup state below
    /// `trim_below` (`None`: nothing), which the caller guarantees no later
    /// window can reach, all fenced with the caller's lease. Returns the
    /// watermark now stored, with the sizes of the dedup set and the stream.
    pub async fn commit(
        &self,
        entity: &EntitySettings,
        keys: &EntityKeys,
        commit: &Commit<'_>,
    ) -> Result<Committed, SinkError> {
        let Commit {
            candidate,
            trim_below,
            figures,
            expect_state,
            fence,
            last_chunk,
            replicas,
        } = *commit;
        let candidate = candidate.map(|c| c.to_string()).unwrap_or_default();
        let trim_below = trim_below.map(|c| c.to_string()).unwrap_or_default();
        let mut first = true;
        let mut retained = crate::retention::Retained::default();
        loop {
            // EVALSHA built as one command, so that it can travel with the
            // WAIT below.
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.commit.get_hash())
                .arg(6)
                .arg(&keys.state)
                .arg(&keys.seen)
                .arg(&keys.digest)
                .arg(&keys.lease)
                .arg(&keys.stream)
                .arg(&keys.dropped)
                .arg(&candidate)
                .arg(&trim_below)
                .arg(TRIM_BATCH)
                .arg(if expect_state || !first { "1" } else { "0" })
                .arg(fence.unwrap_or(""))
                .arg(last_chunk.unwrap_or(""))
                .arg(&crate::retention::args(entity)[..]);
            if first {
                cmd.arg("last_started_at_ms")
                    .arg(figures.started_at_ms)
                    .arg("last_duration_ms")
                    .arg(figures.duration_ms)
                    .arg("last_rows")
                    .arg(figures.rows)
                    .arg("last_emitted")
                    .arg(figures.emitted)
                    .arg("last_skipped")
                    .arg(figures.skipped);
                if let Some(db_now) = figures.db_now {
                    cmd.arg("last_db_now").arg(db_now);
                }
                let horizon = figures.horizon.as_ref();
                cmd.arg("window_extension_us")
                    .arg(figures.extension)
                    .arg("horizon")
                    .arg(horizon.map(|t| t.since.to_string()).unwrap_or_default())
                    .arg("partitions")
                    .arg(figures.partitions)
                    .arg("horizon_who")
                    .arg(
                        horizon
                            .map(|t| format!("{}, user {}", t.who, t.user))
                            .unwrap_or_default(),
                    );
            }
            type Reply = (
                Option<String>,
                usize,
                u64,
                u64,
                u64,
                u8,
                Vec<crate::retention::RawGroup>,
            );
            // With replicas to wait for, the WAIT goes in one pipeline with
            // the commit: on the same connection, right after it, so that it
            // counts the replicas holding this commit (and every write
            // before it on that node). A WAIT of its own could be answered
            // by another node, or over a new connection that wrote nothing
            // (the cluster client sends a command whose node is unreachable
            // to a random one, and reconnects): it would count replicas that
            // lack the commit.
            let (committed, acked): (Option<Reply>, u32) = if replicas > 0 {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd)
                    .cmd("WAIT")
                    .arg(replicas)
                    .arg(self.wait_timeout.as_millis().max(1) as u64);
                self.query_script(&self.commit, &pipe).await
            } else {
                self.query_script(&self.commit, &cmd)
                    .await
                    .map(|committed| (committed, 0))
            }
            .map_err(|error| fenced_or(&entity.name, "the commit script", error))?;
            if acked < replicas {
                // The topology may have changed (a failover): read it again.
                *self.topology.lock().await = None;
                return Err(SinkError::NotReplicated {
                    entity: entity.name.clone(),
                    acked,
                    wanted: replicas,
                    timeout: self.wait_timeout,
                });
            }
            let (watermark, trimmed, dedup_keys, stream_entries, stream_trimmed, more, groups) =
                committed.ok_or_else(|| SinkError::StateVanished {
                    entity: entity.name.clone(),
                    action: "the commit script",
                })?;
            first = false;
            retained.add(stream_trimmed, groups);
            if trimmed < TRIM_BATCH && more == 0 {
                let watermark = watermark
                    .map(|w| {
                        w.parse::<i64>().map_err(|_| SinkError::Reply {
                            entity: entity.name.clone(),
                            action: "the commit script",
                            reply: w.clone(),
                        })
                    })
                    .transpose()?;
                return Ok(Committed {
                    watermark,
                    dedup_keys,
                    stream_entries,
                    retained,
                });
            }
        }
    }

    /// Applies the stream's retention alone (lua/retain.lua), as the commit
    /// does: while polling is paused no cycle commits, and entries the
    /// groups acknowledge must still go for Redis memory to come down.
    /// Unfenced: the retention only removes what its rules allow, whoever
    /// applies them.
    pub async fn retain(
        &self,
        entity: &EntitySettings,
        keys: &EntityKeys,
    ) -> Result<crate::retention::Retained, SinkError> {
        let mut conn = self.conn.clone();
        let mut retained = crate::retention::Retained::default();
        loop {
            let (trimmed, more, groups): (u64, u8, Vec<crate::retention::RawGroup>) = self
                .retain
                .key(&keys.stream)
                .key(&keys.dropped)
                .arg(&crate::retention::args(entity)[..])
                .arg(TRIM_BATCH)
                .invoke_async(&mut conn)
                .await
                .map_err(|error| SinkError::Command {
                    entity: entity.name.clone(),
                    action: "the retain script",
                    error,
                })?;
            retained.add(trimmed, groups);
            if more == 0 {
                return Ok(retained);
            }
        }
    }
}

/// `used_memory / maxmemory` from `INFO memory`; `None` without `maxmemory`.
fn memory_ratio(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (field("used_memory"), field("maxmemory")) {
        (Some(used), Some(max)) if max > 0.0 => Some(used / max),
        _ => None,
    }
}

/// A client for the configured Redis: `rediss://` trusts `ca_file` (else
/// the system's roots) and shows `client_cert` when configured.
pub fn client(settings: &RedisSettings) -> redis::RedisResult<redis::Client> {
    match tls_certificates(settings) {
        None => redis::Client::open(settings.url.as_str()),
        Some(certificates) => redis::Client::build_with_tls(settings.url.as_str(), certificates),
    }
}

/// The configured CA and client certificate, for one server's client and a
/// cluster's alike (`None`: neither is configured).
pub fn tls_certificates(settings: &RedisSettings) -> Option<redis::TlsCertificates> {
    if settings.tls.ca.is_none() && settings.tls.client.is_none() {
        return None;
    }
    Some(redis::TlsCertificates {
        client_tls: settings
            .tls
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: settings.tls.ca.clone(),
    })
}

/// The error of a script call: [`SinkError::Fenced`] when the script
/// refused a stale lease (`HWFENCED <current lease value>`),
/// [`SinkError::OutOfOrder`] when it refused a chunk whose predecessor was
/// not applied (`HWCHAIN <last chunk applied>`).
fn fenced_or(entity: &str, action: &'static str, error: redis::RedisError) -> SinkError {
    // What the script named after its code: the last chunk applied, or the
    // lease's current value ("" when none).
    let detail = || {
        error
            .detail()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
    };
    if error.code() == Some("HWCHAIN") {
        return SinkError::OutOfOrder {
            entity: entity.to_owned(),
            action,
            last: detail(),
        };
    }
    if error.code() == Some("HWFENCED") {
        return SinkError::Fenced {
            entity: entity.to_owned(),
            action,
            holder: detail(),
        };
    }
    SinkError::Command {
        entity: entity.to_owned(),
        action,
        error,
    }
}

/// A digest as 16 lowercase hex digits, without allocating.
fn hex16(value: u64, out: &mut [u8; 16]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((value >> ((15 - i) * 4)) & 0xf) as usize];
    }
    std::str::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys_share_the_stream_slot() {
        let keys = EntityKeys::new("highwater", "customers", "customers");
        assert_eq!(keys.seen, "highwater:{customers}:seen:customers");
        assert_eq!(keys.digest, "highwater:{customers}:digest:customers");
        assert_eq!(keys.state, "highwater:{customers}:state:customers");
        let tagged = EntityKeys::new("hw", "orders", "shop:{eu}:orders");
        assert_eq!(tagged.seen, "hw:{eu}:seen:orders");
        assert_eq!(slot_tag("a{}b"), "a{}b");
    }

    #[test]
    fn digests_are_sixteen_hex_digits() {
        let mut buf = [0u8; 16];
        assert_eq!(hex16(0xab, &mut buf), "00000000000000ab");
        assert_eq!(hex16(u64::MAX, &mut buf), "ffffffffffffffff");
    }

    fn refused(code: &str, detail: &str) -> redis::RedisError {
        match code {
            "ERR" => redis::RedisError::from((
                redis::ErrorKind::ResponseError,
                "An error was signalled by the server",
                detail.to_owned(),
            )),
            _ => redis::make_extension_error(code.to_owned(), Some(detail.to_owned())),
        }
    }

    #[test]
    fn an_acl_refusal_names_the_command_and_the_rule_and_is_not_retried() {
        let direct = refused(
            "NOPERM",
            "this user has no permissions to run the 'hgetall' command",
        );
        assert_eq!(
            describe(&direct),
            "redis refused the command HGETALL (NOPERM this user has no permissions to run the 'hgetall' command): the user lacks an ACL permission; highwater needs the ACL rule in README \"Redis ACL (least privilege)\""
        );
        let failed = SinkError::Command {
            entity: "customers".into(),
            action: "reading the state",
            error: direct,
        };
        assert!(!failed.is_transient());

        // Redis 7.0 names only the script and the line: the line of
        // dedup.lua that calls XADD.
        let sha = Script::new(DEDUP_LUA).get_hash().to_owned();
        let xadd = 1 + DEDUP_LUA
            .lines()
            .position(|l| l.contains("redis.call('XADD'"))
            .expect("an XADD line");
        let in_script = refused(
            "ERR",
            &format!("The user executing the script can't run this command or subcommand script: {sha}, on @user_script:{xadd}."),
        );
        assert!(describe(&in_script).starts_with(&format!(
            "redis refused the command XADD at lua/dedup.lua line {xadd} (The user executing the script"
        )));
        // The commit script begins with lua/retention.lua: a line is named
        // in the file it comes from.
        let sha = Script::new(COMMIT_LUA).get_hash().to_owned();
        let shared = RETENTION_LUA.lines().count();
        let xtrim = 1 + RETENTION_LUA
            .lines()
            .position(|l| l.contains("redis.call('XTRIM', stream, 'MAXLEN'"))
            .expect("an XTRIM line");
        let zcard = 1 + include_str!("../lua/commit.lua")
            .lines()
            .position(|l| l.contains("redis.call('ZCARD'"))
            .expect("a ZCARD line");
        for (line, says) in [
            (
                xtrim,
                format!("the command XTRIM at lua/retention.lua line {xtrim} ("),
            ),
            (
                shared + zcard,
                format!("the command ZCARD at lua/commit.lua line {zcard} ("),
            ),
        ] {
            let refusal = refused(
                "ERR",
                &format!("The user executing the script can't run this command or subcommand script: {sha}, on @user_script:{line}."),
            );
            assert!(describe(&refusal).contains(&says), "{}", describe(&refusal));
        }
        // Redis 7.2 names the command too.
        let newer = refused(
            "ERR",
            &format!("ACL failure in script: User highwater has no permissions to run the 'time' command script: {}, on @user_script:23.", Script::new(SCRIPT_FILES[5].1).get_hash()),
        );
        assert!(describe(&newer)
            .starts_with("redis refused the command TIME at lua/agents.lua line 23 (ACL failure"));
        let key = refused(
            "NOPERM",
            "this user has no permissions to access one of the keys used as arguments",
        );
        assert!(describe(&key).starts_with("redis refused a command (NOPERM this user"));

        let other = refused("ERR", "wrong number of arguments for 'get' command");
        assert!(!is_acl_refusal(&other));
        assert_eq!(describe(&other), other.to_string());
    }
}
