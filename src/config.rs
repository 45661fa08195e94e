//! Configuration: the TOML file, `${VAR}` interpolated from the environment
//! and `${file:/path}` from secret files, parsed into raw serde types, then validated into the settings the agent runs on.
//!
//! Every error names the file and the dotted path of the field
//! (`entities.customers.schedule: ...`); validation collects every problem
//! at once so that one edit fixes them all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::schedule::Schedule;

/// Default Redis key prefix for the state keys (never for the stream key).
pub const DEFAULT_KEY_PREFIX: &str = "highwater";
/// Default rows per call of the dedup script.
pub const DEFAULT_CHUNK_ROWS: usize = 500;
/// How far back an open transaction may stretch a window unless configured
/// (never less than the entity's lookback).
pub const DEFAULT_MAX_LOOKBACK_US: i64 = 3_600_000_000;
/// The most partitions an entity may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Default approximate cap of a stream's length (`XADD MAXLEN ~`).
pub const DEFAULT_MAX_STREAM_LENGTH: u64 = 1_000_000;
/// Default connections per source pool.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;
/// Default time a connect, a query's next row or a Redis reply may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default share of Redis `maxmemory` above which polling pauses.
pub const DEFAULT_PAUSE_AT_MEMORY: f64 = 0.9;
/// Default address of `run`'s `/metrics` and `/healthz` endpoint.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9187";
/// Default number of intervals without a completed cycle after which
/// `/healthz` reports an entity unhealthy.
pub const DEFAULT_UNHEALTHY_AFTER_INTERVALS: u32 = 3;
/// How long an entity stays with an agent that stopped renewing its lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest lease: renewals run a few times per lease.
pub const MIN_LEASE: Duration = Duration::from_millis(500);

/// A configuration error: which file, and what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: environment variable {var} is not set (write $${{...}} for a literal ${{...}})")]
    MissingEnv {
        path: PathBuf,
        line: usize,
        var: String,
    },
    #[error("{path}:{line}: unterminated ${{...}} (write $${{ for a literal ${{)")]
    BadInterpolation { path: PathBuf, line: usize },
    #[error("{path}:{line}: cannot read secret file {} (${{file:...}})", file.display())]
    SecretFile {
        path: PathBuf,
        line: usize,
        /// As resolved: a relative path is relative to the config file's directory.
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", problems.join(&format!("\n{}: ", path.display())))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

// ---------------------------------------------------------------------------
// The file as written (serde). Doc comments here are the config reference.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Where the streams and the agent's state live.
    redis: RawRedis,
    /// Databases to poll, by name.
    #[serde(default)]
    sources: BTreeMap<String, RawSource>,
    /// Polling queries, by entity name.
    #[serde(default)]
    entities: BTreeMap<String, RawEntity>,
    /// The HTTP endpoint of `highwater run` (`/metrics`, `/healthz`).
    http: Option<RawHttp>,
    /// This agent among others running the same config (leases).
    agent: Option<RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// Name of this agent in `status`, logs and metrics; default `<hostname>-<pid>`. Unique per running agent.
    id: Option<String>,
    /// How long an entity stays with an agent that stopped renewing (killed, cut off, paused) before another takes it over.
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Address `run` serves `/metrics` and `/healthz` on, `ip:port`; `""` turns it off.
    listen: Option<String>,
    /// `/healthz` reports an entity unhealthy when it has not completed a cycle within this many of its intervals.
    unhealthy_after_intervals: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    /// `redis://[user:password@]host:port/db` or `rediss://...`.
    url: String,
    /// Prefix of the state keys (`<prefix>:{stream}:seen:<entity>` ...).
    key_prefix: Option<String>,
    /// How long a connect or a reply may take before the cycle is abandoned.
    timeout: Option<String>,
    /// Share of `maxmemory` (0 < x <= 1) above which polling pauses until consumers drain streams.
    pause_at_memory: Option<f64>,
    /// PEM file of the CA(s) to trust for `rediss://` (else the system's roots); relative to the config file.
    ca_file: Option<PathBuf>,
    /// PEM certificate for mutual TLS (with `client_key`).
    client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    client_key: Option<PathBuf>,
    /// `true`: a Redis Cluster (the URL names any node; the others are
    /// discovered); `false`: one server. Left out: asked of the server.
    cluster: Option<bool>,
    /// Replicas that must hold a cycle's writes before it counts as done
    /// (`WAIT`); left out: 1 on a Redis Cluster with replicas, else 0.
    wait_for_replicas: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    /// `postgres://`, `mysql://` (MariaDB too) or `sqlite://path`.
    url: String,
    /// Connections in this source's pool; bounds how many entities poll it at once.
    max_connections: Option<u32>,
    /// IANA zone (or `UTC`) in which naive timestamps (`timestamp`, `DATETIME`) are read.
    timezone: Option<String>,
    /// How long a connect or the wait for the next row may take.
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawKey {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawLookback {
    Duration(String),
    Count(i64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStart {
    Text(String),
    Version(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    /// Name of a `[sources.*]` table.
    source: String,
    /// The polling query inline; exactly one of `query` and `query_file`.
    query: Option<String>,
    /// Path of the polling query, relative to the config file.
    query_file: Option<PathBuf>,
    /// Key column, or columns for a composite key.
    key: RawKey,
    /// Column saying when (timestamp) or in which version (integer) a row last changed.
    cursor: String,
    /// How far each window reaches back: a duration for timestamp cursors, a count for integer ones.
    lookback: RawLookback,
    /// How far back an open transaction may stretch the window (time cursors).
    max_lookback: Option<String>,
    /// Cron expression, 5 or 6 fields (with seconds), evaluated in UTC.
    schedule: Option<String>,
    /// Fixed interval instead of `schedule`.
    every: Option<String>,
    /// Redis stream key, used verbatim.
    stream: Option<String>,
    /// Spread the entity over this many streams `<stream>:0` ... (and
    /// Redis Cluster shards), by a hash of the key.
    partitions: Option<u32>,
    /// Value of the `variant` field of each message.
    variant: Option<String>,
    /// Where the first cycle starts: `now`, `beginning`, an RFC 3339 time or a version.
    start: Option<RawStart>,
    /// `row` (the selected columns as JSON) or `key` (no payload field).
    payload: Option<String>,
    /// Rows per call of the dedup script.
    chunk_rows: Option<usize>,
    /// How many entries the stream keeps (of those every consumer group
    /// acknowledged); 0 = no cap.
    max_stream_length: Option<u64>,
    /// How old an entry may get (once every consumer group acknowledged it).
    max_age: Option<String>,
    /// Beyond this many entries the oldest go even if a group has not
    /// acknowledged them (counted per group).
    hard_max_stream_length: Option<u64>,
    /// Column whose true / non-zero / non-NULL value marks the row deleted (`op = delete`).
    delete_column: Option<String>,
    /// Text columns holding JSON, nested in the payload as JSON (MariaDB's `JSON`, SQLite, legacy TEXT).
    #[serde(default)]
    json_columns: Vec<String>,
    /// What to do when Redis lost this entity's state: `fail` (stop, default) or `resnapshot`.
    on_state_loss: Option<String>,
}

// ---------------------------------------------------------------------------
// Validated settings.
// ---------------------------------------------------------------------------

/// The validated configuration.
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    pub redis: RedisSettings,
    pub sources: BTreeMap<String, SourceSettings>,
    pub entities: BTreeMap<String, EntitySettings>,
    pub http: HttpSettings,
    pub agent: AgentSettings,
}

/// This agent among the agents running one config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Shown in `status`, logs and metrics; `<hostname>-<pid>` unless configured.
    pub id: String,
    /// How long a lease lasts without renewal (on Redis's clock).
    pub lease: Duration,
}

/// The HTTP endpoint of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Where to listen; `None` when turned off (`listen = ""`).
    pub listen: Option<std::net::SocketAddr>,
    /// `listen` was written in the file (a taken port then stops the start;
    /// the default address being taken only costs the endpoint).
    pub listen_configured: bool,
    /// `/healthz` is unhealthy when an entity has not completed a cycle for
    /// this many of its intervals.
    pub unhealthy_after_intervals: u32,
}

#[derive(Clone)]
pub struct RedisSettings {
    /// The URL, secrets included: never log it, use [`mask_url`].
    pub url: String,
    /// Certificates for `rediss://`, read at load.
    pub tls: RedisTls,
    pub key_prefix: String,
    pub timeout: Duration,
    /// Polling pauses while `used_memory / maxmemory` is above this.
    pub pause_at_memory: f64,
    /// A Redis Cluster (`Some(true)`), one server (`Some(false)`), or ask
    /// the server (`None`: `INFO cluster`).
    pub cluster: Option<bool>,
    /// Replicas that must acknowledge a cycle's writes (`WAIT`) before it
    /// counts as done; `None`: 1 on a Redis Cluster that has replicas, else 0.
    pub wait_for_replicas: Option<u32>,
}

impl RedisSettings {
    /// Settings for `url` with every default (no TLS files), for tools and tests.
    pub fn for_url(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.to_owned(),
            tls: RedisTls::default(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            pause_at_memory: DEFAULT_PAUSE_AT_MEMORY,
            cluster: None,
            wait_for_replicas: None,
        }
    }
}

/// What a `rediss://` connection trusts and shows: PEM bytes read from the
/// configured files (`None`: the system's roots, no client certificate).
#[derive(Clone, Default)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    /// Certificate and private key for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Which SQL database a source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MySQL/MariaDB",
            Backend::Sqlite => "SQLite",
        })
    }
}

pub struct SourceSettings {
    pub name: String,
    /// The URL, secrets included: never log it, use [`mask_url`].
    pub url: String,
    pub backend: Backend,
    pub max_connections: u32,
    pub timezone: chrono_tz::Tz,
    pub timeout: Duration,
}

/// What the cursor column counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorKind {
    /// A timestamp or date; epochs are microseconds since 1970, look-back a duration.
    Time,
    /// An integer version; epochs are the integer, look-back a count.
    Version,
}

/// Where the first cycle of an entity (no watermark yet) starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The window before the first cycle: `now - lookback`.
    Now,
    /// Everything the query returns.
    Beginning,
    /// From this epoch on.
    At(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadMode {
    Row,
    Key,
}

/// What a cycle does when Redis lost the entity's state (watermark and
/// dedup sets gone while the stream shows the entity ran before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStateLoss {
    /// Stop with an error: an operator decides.
    Fail,
    /// Re-read everything the query returns (consumers see every row again).
    Resnapshot,
}

pub struct EntitySettings {
    pub name: String,
    pub source: String,
    /// The polling query text, `:since` not yet rewritten.
    pub query: String,
    /// Where the query came from, for error messages (`queries/x.sql` or `inline`).
    pub query_origin: String,
    pub key: Vec<String>,
    pub cursor: String,
    pub cursor_kind: CursorKind,
    /// In epoch units: microseconds for time cursors, versions for integer ones.
    pub lookback: i64,
    /// How far back an open transaction may stretch the window, microseconds
    /// (time cursors; `lookback` itself turns the extension off). Equal to
    /// `lookback` for version cursors.
    pub max_lookback: i64,
    pub schedule: Schedule,
    pub stream: String,
    /// Streams the entity is spread over (`<stream>:0` ...); 1: the stream itself.
    pub partitions: u32,
    pub variant: String,
    pub start: Start,
    pub payload: PayloadMode,
    pub chunk_rows: usize,
    /// The stream's retention (the same for every entity on the stream):
    /// entries kept, of those every consumer group acknowledged; 0 = no cap.
    pub max_stream_length: u64,
    /// Acknowledged entries older than this go.
    pub max_age: Option<Duration>,
    /// Beyond this many entries the oldest go, acknowledged or not.
    pub hard_max_stream_length: Option<u64>,
    pub delete_column: Option<String>,
    /// Text columns whose content is nested in the payload as JSON.
    pub json_columns: Vec<String>,
    pub on_state_loss: OnStateLoss,
}

impl Config {
    /// Reads, interpolates, parses and validates the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_text(path, &text, |var| std::env::var(var).ok())
    }

    /// Parses configuration text as if read from `path`; `env` resolves `${VAR}`.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = interpolate(path, text, env)?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&text, &e),
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        validate(path, base_dir, raw)
    }

    /// The entities to work on: all of them, or the one named.
    pub fn select_entities(&self, only: Option<&str>) -> Result<Vec<&EntitySettings>, String> {
        match only {
            None => Ok(self.entities.values().collect()),
            Some(name) => match self.entities.get(name) {
                Some(e) => Ok(vec![e]),
                None => Err(format!(
                    "{}: no entity named {name:?} (configured: {})",
                    self.file.display(),
                    self.entities.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            },
        }
    }
}

impl fmt::Debug for SourceSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSettings")
            .field("name", &self.name)
            .field("url", &mask_url(&self.url))
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The URL with its password replaced by `***`, for logs and messages.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The user info ends at the last `@` before the query, not at the first
    // `/`: a password with a raw `/` (an invalid URL, but a typo a user
    // makes) must not be printed half.
    let query_start = rest.find('?').unwrap_or(rest.len());
    match rest[..query_start].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let masked = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None => userinfo.to_owned(),
            };
            format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Replaces `${VAR}` with the environment's value and `${file:/path}` with
/// the file's content ([`read_secret`]); `$${` stays a literal `${`.
/// Lines that are whole comments are left alone, so a commented-out example
/// does not demand its variable or its file.
fn interpolate(
    path: &Path,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let line_start = out.len();
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos..];
            if let Some(literal) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = literal;
            } else if let Some(body) = after.strip_prefix("${") {
                let Some(end) = body.find('}') else {
                    return Err(ConfigError::BadInterpolation {
                        path: path.to_owned(),
                        line: index + 1,
                    });
                };
                let var = &body[..end];
                rest = &body[end + 1..];
                if let Some(file) = var.strip_prefix("file:") {
                    let secret = read_secret(path, index + 1, file)?;
                    if in_url_userinfo(&out[line_start..], rest) {
                        push_percent_encoded(&mut out, &secret);
                    } else {
                        out.push_str(&secret);
                    }
                    continue;
                }
                match env(var) {
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(ConfigError::MissingEnv {
                            path: path.to_owned(),
                            line: index + 1,
                            var: var.to_owned(),
                        })
                    }
                }
            } else {
                out.push('$');
                rest = &after[1..];
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// The content of the file a `${file:...}` on line `line` names, without one
/// trailing newline (Docker and Kubernetes secrets end with one). A relative
/// path is relative to the config file's directory, like `query_file`.
fn read_secret(path: &Path, line: usize, written: &str) -> Result<String, ConfigError> {
    let file = path.parent().unwrap_or(Path::new(".")).join(written);
    let mut secret = std::fs::read_to_string(&file).map_err(|source| ConfigError::SecretFile {
        path: path.to_owned(),
        line,
        file,
        source,
    })?;
    if secret.ends_with('\n') {
        secret.pop();
        if secret.ends_with('\r') {
            secret.pop();
        }
    }
    Ok(secret)
}

/// Whether a value placed between `before` and `after` on a line is the user
/// or password of a URL (`scheme://user:HERE@host`). There a secret file holds
/// the password itself, as the database's own container reads it
/// (`POSTGRES_PASSWORD_FILE`), so it is percent-encoded: an `@` or `/` in it
/// would otherwise end the password early, fail to parse and defeat
/// [`mask_url`].
fn in_url_userinfo(before: &str, after: &str) -> bool {
    const ENDS: &[char] = &['@', '/', '?', '#', '"', '\'', ' ', '\t', '\r', '\n'];
    let Some(scheme_end) = before.rfind("://") else {
        return false;
    };
    if before[scheme_end + 3..].contains(ENDS) {
        return false;
    }
    // The userinfo ends at an `@`; another `${...}` before it (a user name
    // from a file) may hold a `/` of its own path.
    let mut rest = after;
    while let Some(i) = rest.find(|c| c == '$' || ENDS.contains(&c)) {
        let tail = &rest[i..];
        if let Some(body) = tail.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                return false;
            };
            rest = &body[end + 1..];
        } else if let Some(tail) = tail.strip_prefix('$') {
            rest = tail;
        } else {
            return tail.starts_with('@');
        }
    }
    false
}

/// Appends `value` with every byte but the unreserved ones (RFC 3986:
/// letters, digits, `-._~`) written as `%XX`.
fn push_percent_encoded(out: &mut String, value: &str) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

/// `line N: message` from a TOML error, without echoing the (interpolated,
/// possibly secret) line itself.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().to_owned();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

fn validate(path: &Path, base_dir: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();

    let tls = validate_redis_tls(&mut problems, base_dir, &raw.redis);
    let redis = RedisSettings {
        tls,
        key_prefix: raw
            .redis
            .key_prefix
            .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned()),
        timeout: duration_or(
            &mut problems,
            "redis.timeout",
            raw.redis.timeout.as_deref(),
            DEFAULT_TIMEOUT,
        ),
        pause_at_memory: raw.redis.pause_at_memory.unwrap_or(DEFAULT_PAUSE_AT_MEMORY),
        cluster: raw.redis.cluster,
        wait_for_replicas: raw.redis.wait_for_replicas,
        url: raw.redis.url,
    };
    if !(redis.pause_at_memory > 0.0 && redis.pause_at_memory <= 1.0) {
        problems.push(format!(
            "redis.pause_at_memory: {} is not a share of maxmemory in (0, 1]",
            redis.pause_at_memory
        ));
    }
    if !(redis.url.starts_with("redis://")
        || redis.url.starts_with("rediss://")
        || redis.url.starts_with("unix://")
        || redis.url.starts_with("redis+unix://"))
    {
        problems.push(format!(
            "redis.url: {:?} is not a Redis URL (expected redis://host:port/db)",
            mask_url(&redis.url)
        ));
    }

    let mut sources = BTreeMap::new();
    for (name, s) in raw.sources {
        let field = format!("sources.{name}");
        let backend = match s.url.split("://").next() {
            Some("postgres" | "postgresql") if s.url.contains("://") => Some(Backend::Postgres),
            Some("mysql" | "mariadb") if s.url.contains("://") => Some(Backend::MySql),
            Some("sqlite") if s.url.contains(':') => Some(Backend::Sqlite),
            _ if s.url.starts_with("sqlite:") => Some(Backend::Sqlite),
            _ => {
                problems.push(format!(
                    "{field}.url: {:?} names no supported database (expected postgres://, mysql:// or sqlite://)",
                    mask_url(&s.url)
                ));
                None
            }
        };
        let timezone = match s.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(tz) => match tz.parse::<chrono_tz::Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    problems.push(format!(
                        "{field}.timezone: {tz:?} is not an IANA time zone (e.g. \"UTC\", \"Europe/Berlin\")"
                    ));
                    chrono_tz::UTC
                }
            },
        };
        let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            problems.push(format!("{field}.max_connections: must be at least 1"));
        }
        let timeout = duration_or(
            &mut problems,
            &format!("{field}.timeout"),
            s.timeout.as_deref(),
            DEFAULT_TIMEOUT,
        );
        if let Some(backend) = backend {
            sources.insert(
                name.clone(),
                SourceSettings {
                    name,
                    url: s.url,
                    backend,
                    max_connections,
                    timezone,
                    timeout,
                },
            );
        }
    }

    let http = validate_http(&mut problems, raw.http);
    let agent = validate_agent(&mut problems, raw.agent);

    let mut entities = BTreeMap::new();
    let mut retention = BTreeMap::new();
    for (name, e) in raw.entities {
        let written = StreamRetention::written(&mut problems, &name, &e);
        if let Some(entity) = validate_entity(&mut problems, base_dir, &sources, &name, e) {
            retention.insert(name.clone(), written);
            entities.insert(name, entity);
        }
    }
    share_retention(&mut problems, &mut entities, &retention);
    if entities.is_empty() && problems.is_empty() {
        problems.push("no [entities.*] configured: nothing to poll".to_owned());
    }

    if problems.is_empty() {
        Ok(Config {
            file: path.to_owned(),
            redis,
            sources,
            entities,
            http,
            agent,
        })
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

fn validate_entity(
    problems: &mut Vec<String>,
    base_dir: &Path,
    sources: &BTreeMap<String, SourceSettings>,
    name: &str,
    e: RawEntity,
) -> Option<EntitySettings> {
    let field = format!("entities.{name}");
    let before = problems.len();

    if !sources.contains_key(&e.source) {
        problems.push(format!(
            "{field}.source: no source named {:?} (configured: {})",
            e.source,
            if sources.is_empty() {
                "none".to_owned()
            } else {
                sources.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        ));
    }

    let (query, query_origin) = match (e.query, e.query_file) {
        (Some(q), None) => (q, "inline".to_owned()),
        (None, Some(file)) => {
            let full = base_dir.join(&file);
            match std::fs::read_to_string(&full) {
                Ok(q) => (q, full.display().to_string()),
                Err(err) => {
                    problems.push(format!(
                        "{field}.query_file: cannot read {}: {err}",
                        full.display()
                    ));
                    (String::new(), full.display().to_string())
                }
            }
        }
        (Some(_), Some(_)) => {
            problems.push(format!("{field}: set either query or query_file, not both"));
            (String::new(), String::new())
        }
        (None, None) => {
            problems.push(format!("{field}: missing query (or query_file)"));
            (String::new(), String::new())
        }
    };
    if query.trim().is_empty() && problems.len() == before {
        problems.push(format!("{field}: the query is empty"));
    }

    let key = match e.key {
        RawKey::One(k) => vec![k],
        RawKey::Many(ks) => ks,
    };
    if key.is_empty() || key.iter().any(|k| k.trim().is_empty()) {
        problems.push(format!("{field}.key: name at least one column, none empty"));
    }
    for (i, k) in key.iter().enumerate() {
        if key[..i].contains(k) {
            problems.push(format!("{field}.key: column {k:?} is named twice"));
        }
    }
    if e.cursor.trim().is_empty() {
        problems.push(format!("{field}.cursor: must name a column"));
    }

    let (cursor_kind, lookback) = match e.lookback {
        RawLookback::Count(n) if n >= 0 => (CursorKind::Version, n),
        RawLookback::Count(n) => {
            problems.push(format!("{field}.lookback: {n} is negative"));
            (CursorKind::Version, 0)
        }
        RawLookback::Duration(text) => match humantime::parse_duration(&text) {
            Ok(d) => (
                CursorKind::Time,
                i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            ),
            Err(err) => {
                problems.push(format!(
                    "{field}.lookback: {text:?} is not a duration ({err}); write e.g. \"5m\", or an integer for a version cursor"
                ));
                (CursorKind::Time, 0)
            }
        },
    };

    let max_lookback = match (cursor_kind, e.max_lookback) {
        (CursorKind::Version, None) => lookback,
        (CursorKind::Version, Some(_)) => {
            problems.push(format!(
                "{field}.max_lookback: applies to time cursors only (this entity's lookback is a count of versions)"
            ));
            lookback
        }
        (CursorKind::Time, None) => lookback.max(DEFAULT_MAX_LOOKBACK_US),
        (CursorKind::Time, Some(text)) => match humantime::parse_duration(&text) {
            Ok(d) => {
                let max = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
                if max < lookback {
                    problems.push(format!(
                        "{field}.max_lookback: {text:?} is shorter than lookback ({}); set it to lookback to turn the extension off",
                        humantime::format_duration(Duration::from_micros(lookback.unsigned_abs()))
                    ));
                }
                max.max(lookback)
            }
            Err(err) => {
                problems.push(format!(
                    "{field}.max_lookback: {text:?} is not a duration ({err}); write e.g. \"1h\""
                ));
                lookback
            }
        },
    };

    let schedule = match (e.schedule, e.every) {
        (Some(expr), None) => match Schedule::cron(&expr) {
            Ok(s) => Some(s),
            Err(why) => {
                problems.push(format!(
                    "{field}.schedule: {expr:?} is not a cron expression ({why})"
                ));
                None
            }
        },
        (None, Some(every)) => match humantime::parse_duration(&every) {
            Ok(d) if d >= Duration::from_millis(10) => Some(Schedule::Every(d)),
            Ok(_) => {
                problems.push(format!("{field}.every: {every:?} is shorter than 10ms"));
                None
            }
            Err(err) => {
                problems.push(format!(
                    "{field}.every: {every:?} is not a duration ({err}); write e.g. \"10s\""
                ));
                None
            }
        },
        (Some(_), Some(_)) => {
            problems.push(format!("{field}: set either schedule or every, not both"));
            None
        }
        (None, None) => {
            problems.push(format!(
                "{field}: missing schedule (cron) or every (interval)"
            ));
            None
        }
    };

    let start = match (e.start, cursor_kind) {
        (None, _) => Start::Now,
        (Some(RawStart::Text(t)), _) if t == "now" => Start::Now,
        (Some(RawStart::Text(t)), _) if t == "beginning" => Start::Beginning,
        (Some(RawStart::Version(v)), CursorKind::Version) => Start::At(v),
        (Some(RawStart::Text(t)), CursorKind::Time) => {
            match chrono::DateTime::parse_from_rfc3339(&t) {
                Ok(at) => Start::At(at.timestamp_micros()),
                Err(err) => {
                    problems.push(format!(
                    "{field}.start: {t:?} is neither \"now\", \"beginning\" nor an RFC 3339 time ({err})"
                ));
                    Start::Now
                }
            }
        }
        (Some(RawStart::Text(t)), CursorKind::Version) => {
            problems.push(format!(
                "{field}.start: {t:?} is neither \"now\", \"beginning\" nor a version number"
            ));
            Start::Now
        }
        (Some(RawStart::Version(v)), CursorKind::Time) => {
            problems.push(format!(
                "{field}.start: {v} is a number but the cursor is a time (lookback is a duration); write an RFC 3339 time"
            ));
            Start::Now
        }
    };

    let payload = match e.payload.as_deref() {
        None | Some("row") => PayloadMode::Row,
        Some("key") => PayloadMode::Key,
        Some(other) => {
            problems.push(format!(
                "{field}.payload: {other:?} is not \"row\" or \"key\""
            ));
            PayloadMode::Row
        }
    };

    let on_state_loss = match e.on_state_loss.as_deref() {
        None | Some("fail") => OnStateLoss::Fail,
        Some("resnapshot") => OnStateLoss::Resnapshot,
        Some(other) => {
            problems.push(format!(
                "{field}.on_state_loss: {other:?} is not \"fail\" or \"resnapshot\""
            ));
            OnStateLoss::Fail
        }
    };

    let chunk_rows = e.chunk_rows.unwrap_or(DEFAULT_CHUNK_ROWS);
    if !(1..=100_000).contains(&chunk_rows) {
        problems.push(format!(
            "{field}.chunk_rows: {chunk_rows} is outside 1..=100000"
        ));
    }

    let stream = e.stream.unwrap_or_else(|| name.to_owned());
    if stream.is_empty() {
        problems.push(format!("{field}.stream: must not be empty"));
    } else if crate::sink::slot_tag(&stream).contains(['{', '}']) {
        // The state keys carry the stream's slot tag in braces; a tag that
        // itself holds a brace cannot be written so that Redis Cluster hashes
        // it the same, and every cycle would fail with CROSSSLOT.
        problems.push(format!(
            "{field}.stream: {stream:?} has braces but no hash tag: use a non-empty {{tag}} (e.g. \"orders{{eu}}\") or no braces"
        ));
    }

    let partitions = e.partitions.unwrap_or(1);
    if !(1..=MAX_PARTITIONS).contains(&partitions) {
        problems.push(format!(
            "{field}.partitions: {partitions} is outside 1..={MAX_PARTITIONS}"
        ));
    }

    if problems.len() > before {
        return None;
    }
    Some(EntitySettings {
        partitions,
        name: name.to_owned(),
        source: e.source,
        query,
        query_origin,
        key,
        cursor: e.cursor,
        cursor_kind,
        lookback,
        max_lookback,
        schedule: schedule?,
        variant: e.variant.unwrap_or_else(|| name.to_owned()),
        stream,
        start,
        payload,
        chunk_rows,
        // Settled across the entities of the stream by share_retention().
        max_stream_length: DEFAULT_MAX_STREAM_LENGTH,
        max_age: None,
        hard_max_stream_length: None,
        delete_column: e.delete_column,
        json_columns: e.json_columns,
        on_state_loss,
    })
}

fn validate_http(problems: &mut Vec<String>, raw: Option<RawHttp>) -> HttpSettings {
    let (listen, intervals) = match raw {
        Some(h) => (h.listen, h.unhealthy_after_intervals),
        None => (None, None),
    };
    let listen_configured = listen.is_some();
    let listen = listen.unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_owned());
    let listen = if listen.is_empty() {
        None
    } else {
        match listen.parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "http.listen: {listen:?} is not an address (write \"ip:port\", e.g. \"127.0.0.1:9187\", or \"\" to turn it off)"
                ));
                None
            }
        }
    };
    let unhealthy_after_intervals = intervals.unwrap_or(DEFAULT_UNHEALTHY_AFTER_INTERVALS);
    if unhealthy_after_intervals == 0 {
        problems.push("http.unhealthy_after_intervals: must be at least 1".to_owned());
    }
    HttpSettings {
        listen,
        listen_configured,
        unhealthy_after_intervals,
    }
}

/// Reads the `[redis]` TLS files; each problem names the field and the file.
fn validate_redis_tls(problems: &mut Vec<String>, base_dir: &Path, raw: &RawRedis) -> RedisTls {
    let mut read = |field: &str, file: &Option<PathBuf>| -> Option<Vec<u8>> {
        let file = file.as_ref()?;
        let full = base_dir.join(file);
        match std::fs::read(&full) {
            Ok(bytes) if bytes.windows(11).any(|w| w == b"-----BEGIN ") => Some(bytes),
            Ok(_) => {
                problems.push(format!(
                    "redis.{field}: {} is not a PEM file (no -----BEGIN line)",
                    full.display()
                ));
                None
            }
            Err(e) => {
                problems.push(format!(
                    "redis.{field}: cannot read {}: {e}",
                    full.display()
                ));
                None
            }
        }
    };
    let ca = read("ca_file", &raw.ca_file);
    let cert = read("client_cert", &raw.client_cert);
    let key = read("client_key", &raw.client_key);
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => {
            match (&raw.client_cert, &raw.client_key) {
                (Some(_), None) => problems.push(
                    "redis.client_cert: set client_key too (the certificate's private key)"
                        .to_owned(),
                ),
                (None, Some(_)) => problems.push(
                    "redis.client_key: set client_cert too (the key's certificate)".to_owned(),
                ),
                _ => {}
            }
            None
        }
    };
    let configured = raw.ca_file.is_some() || raw.client_cert.is_some() || raw.client_key.is_some();
    if configured && !raw.url.starts_with("rediss://") {
        problems.push(format!(
            "redis.url: {:?} is not a TLS URL, but ca_file, client_cert or client_key is set: write rediss://",
            mask_url(&raw.url)
        ));
    }
    RedisTls { ca, client }
}

fn validate_agent(problems: &mut Vec<String>, raw: Option<RawAgent>) -> AgentSettings {
    let (id, lease) = match raw {
        Some(a) => (a.id, a.lease),
        None => (None, None),
    };
    let id = match id {
        Some(id) if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) => {
            problems.push(format!(
                "agent.id: {id:?} is not a name (1 to 200 characters, no control characters)"
            ));
            id
        }
        Some(id) => id,
        None => default_agent_id(),
    };
    let lease = duration_or(problems, "agent.lease", lease.as_deref(), DEFAULT_LEASE);
    if lease < MIN_LEASE {
        problems.push(format!(
            "agent.lease: {} is too short (at least {}: it is renewed a few times per lease)",
            humantime::format_duration(lease),
            humantime::format_duration(MIN_LEASE)
        ));
    }
    AgentSettings { id, lease }
}

/// `<hostname>-<pid>`: unique among the agents of one machine, and says where to look.
pub fn default_agent_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "highwater".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The retention settings an entity wrote (`None`: left out).
#[derive(Default)]
struct StreamRetention {
    max_stream_length: Option<u64>,
    max_age: Option<Duration>,
    hard_max_stream_length: Option<u64>,
}

impl StreamRetention {
    fn written(problems: &mut Vec<String>, name: &str, e: &RawEntity) -> StreamRetention {
        let field = format!("entities.{name}");
        let max_age = e.max_age.as_deref().and_then(|text| {
            match humantime::parse_duration(text) {
                Ok(d) if d >= Duration::from_millis(1) => Some(d),
                Ok(_) => {
                    problems.push(format!(
                        "{field}.max_age: {text:?} is shorter than a millisecond (stream ids count milliseconds); leave it out to keep entries of any age"
                    ));
                    None
                }
                Err(err) => {
                    problems.push(format!(
                        "{field}.max_age: {text:?} is not a duration ({err}); write e.g. \"7d\""
                    ));
                    None
                }
            }
        });
        if e.hard_max_stream_length == Some(0) {
            problems.push(format!(
                "{field}.hard_max_stream_length: must be at least 1; leave it out for no hard cap"
            ));
        }
        StreamRetention {
            max_stream_length: e.max_stream_length,
            max_age,
            hard_max_stream_length: e.hard_max_stream_length.filter(|&n| n > 0),
        }
    }
}

/// A stream's retention is one for all the entities that feed it: a value
/// one of them writes applies to all; two of them writing different values
/// is an error naming both; none writing it, the default.
fn share_retention(
    problems: &mut Vec<String>,
    entities: &mut BTreeMap<String, EntitySettings>,
    written: &BTreeMap<String, StreamRetention>,
) {
    /// The value entities of `stream` wrote for one setting, and who wrote it.
    fn agreed<T: PartialEq + fmt::Debug + Copy>(
        problems: &mut Vec<String>,
        stream: &str,
        setting: &str,
        values: impl Iterator<Item = (String, Option<T>)>,
        show: impl Fn(T) -> String,
    ) -> Option<T> {
        let mut first: Option<(String, T)> = None;
        for (name, value) in values {
            let Some(value) = value else { continue };
            match &first {
                None => first = Some((name, value)),
                Some((other, v)) if *v != value => {
                    problems.push(format!(
                        "entities.{other}.{setting} = {} and entities.{name}.{setting} = {} differ, but both entities feed the stream {stream:?}, which has one retention: write it on one of them, or the same on both",
                        show(*v),
                        show(value)
                    ));
                }
                Some(_) => {}
            }
        }
        first.map(|(_, v)| v)
    }
    let mut streams: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, e) in entities.iter() {
        streams
            .entry(e.stream.clone())
            .or_default()
            .push(name.clone());
    }
    for (stream, names) in streams {
        let of = |pick: fn(&StreamRetention) -> Option<u64>| {
            names
                .iter()
                .map(move |n| (n.clone(), written.get(n).and_then(pick)))
        };
        let max_length = agreed(
            problems,
            &stream,
            "max_stream_length",
            of(|r| r.max_stream_length),
            |v| v.to_string(),
        )
        .unwrap_or(DEFAULT_MAX_STREAM_LENGTH);
        let hard = agreed(
            problems,
            &stream,
            "hard_max_stream_length",
            of(|r| r.hard_max_stream_length),
            |v| v.to_string(),
        );
        let max_age = agreed(
            problems,
            &stream,
            "max_age",
            names
                .iter()
                .map(|n| (n.clone(), written.get(n).and_then(|r| r.max_age))),
            |v| format!("{:?}", humantime::format_duration(v).to_string()),
        );
        if let Some(hard) = hard.filter(|&h| max_length > 0 && h < max_length) {
            let by = names
                .iter()
                .find(|n| {
                    written
                        .get(*n)
                        .and_then(|r| r.hard_max_stream_length)
                        .is_some()
                })
                .cloned()
                .unwrap_or_default();
            problems.push(format!(
                "entities.{by}.hard_max_stream_length: {hard} is below max_stream_length ({max_length}) of the stream {stream:?}: the hard cap must leave room for what the stream keeps"
            ));
        }
        for name in &names {
            if let Some(e) = entities.get_mut(name) {
                e.max_stream_length = max_length;
                e.max_age = max_age;
                e.hard_max_stream_length = hard;
            }
        }
    }
}

fn duration_or(
    problems: &mut Vec<String>,
    field: &str,
    text: Option<&str>,
    default: Duration,
) -> Duration {
    match text {
        None => default,
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                problems.push(format!("{field}: must be longer than zero"));
                default
            }
            Err(err) => {
                problems.push(format!(
                    "{field}: {t:?} is not a duration ({err}); write e.g. \"30s\""
                ));
                default
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_a_password_holding_a_raw_slash_or_at() {
        assert_eq!(
            mask_url("postgres://app:pa/ss@w@db:5432/shop?sslmode=require"),
            "postgres://app:***@db:5432/shop?sslmode=require"
        );
        assert_eq!(mask_url("sqlite:///data/a@b.db"), "sqlite:///data/a@b.db");
    }

    #[test]
    fn masks_the_password_only() {
        assert_eq!(
            mask_url("postgres://app:s3cret@db/shop"),
            "postgres://app:***@db/shop"
        );
        assert_eq!(
            mask_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(mask_url("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(mask_url("sqlite://demo.db"), "sqlite://demo.db");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    }

    #[test]
    fn interpolation_names_the_missing_variable_and_line() {
        let text = "a = 1\n# b = \"${NOT_NEEDED}\"\nurl = \"x${MISSING}y\"\n";
        let err = interpolate(Path::new("h.toml"), text, |_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "h.toml:3: environment variable MISSING is not set (write $${...} for a literal ${...})"
        );
        let ok = interpolate(Path::new("h.toml"), "u = \"${A}:$${B}\"", |v| {
            (v == "A").then(|| "1".into())
        })
        .unwrap();
        assert_eq!(ok, "u = \"1:${B}\"");
    }

    /// A fresh directory holding these secret files, and the path of a
    /// config file `h.toml` in it.
    fn beside_secrets(secrets: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in secrets {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let config = dir.path().join("h.toml");
        (dir, config)
    }

    #[test]
    fn a_secret_file_is_inserted_without_one_trailing_newline() {
        let (dir, config) =
            beside_secrets(&[("pw", b"s3cret\n"), ("two", b"a\n\n"), ("crlf", b"b\r\n")]);
        let absolute = dir.path().join("two");
        let text = format!(
            "a = \"${{file:pw}}\"\nb = \"${{file:{}}}\"\nc = \"${{file:crlf}}\"\n\
             # d = \"${{file:nowhere}}\"\ne = \"$${{file:pw}}\"\n",
            absolute.display()
        );
        let out = interpolate(&config, &text, |_| None).unwrap();
        assert_eq!(
            out,
            "a = \"s3cret\"\nb = \"a\n\"\nc = \"b\"\n# d = \"${file:nowhere}\"\ne = \"${file:pw}\"\n"
        );
    }

    #[test]
    fn a_secret_in_the_user_or_password_of_a_url_is_percent_encoded() {
        let (_dir, config) = beside_secrets(&[
            ("pw", b"p@ss/w:rd %#?\n"),
            ("user", b"app@eu\n"),
            ("url", b"postgres://app:p%40ss@db/shop\n"),
            ("host", b"db:5432\n"),
        ]);
        let pw = "p%40ss%2Fw%3Ard%20%25%23%3F";
        for (written, expected) in [
            (
                "postgres://app:${file:pw}@db/shop",
                format!("postgres://app:{pw}@db/shop"),
            ),
            (
                "redis://:${file:pw}@127.0.0.1:6379/0",
                format!("redis://:{pw}@127.0.0.1:6379/0"),
            ),
            (
                "mysql://${file:user}:${file:pw}@db/shop",
                format!("mysql://app%40eu:{pw}@db/shop"),
            ),
            // A whole URL, a host: the file holds URL text, inserted as is.
            ("${file:url}", "postgres://app:p%40ss@db/shop".to_owned()),
            (
                "postgres://app:x@${file:host}/shop",
                "postgres://app:x@db:5432/shop".to_owned(),
            ),
            ("x ${file:pw}", "x p@ss/w:rd %#?".to_owned()),
        ] {
            let out = interpolate(&config, &format!("u = \"{written}\""), |_| None).unwrap();
            assert_eq!(out, format!("u = \"{expected}\""), "{written}");
        }
        let out = interpolate(&config, "postgres://app:${file:pw}@db/shop", |_| None).unwrap();
        assert_eq!(mask_url(&out), "postgres://app:***@db/shop");
    }

    #[test]
    fn an_unreadable_secret_file_names_the_config_line_and_the_file() {
        let (dir, config) = beside_secrets(&[("latin1", b"caf\xe9\n")]);
        for (name, kind) in [
            ("nope", std::io::ErrorKind::NotFound),
            ("latin1", std::io::ErrorKind::InvalidData),
        ] {
            let text = format!("a = 1\nb = \"${{file:{name}}}\"\n");
            let err = interpolate(&config, &text, |_| None).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{}:2: cannot read secret file {} (${{file:...}})",
                    config.display(),
                    dir.path().join(name).display()
                )
            );
            let ConfigError::SecretFile { source, .. } = err else {
                panic!("not a secret file error: {err}");
            };
            assert_eq!(source.kind(), kind, "{name}: {source}");
        }
    }
}
