//! `highwater demo`: a small SQLite shop created on the spot, a writer task
//! that keeps changing it, the agent polling it in-process, and every message
//! printed as it lands in Redis.
//!
//! Everything the demo runs is what a user would write: the config file and
//! the example queries of `queries/` are written into the demo's directory and
//! loaded like any other config. The demo's Redis keys (two streams and their
//! state) are deleted at start, so every run starts clean under the same names.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::watch;

use crate::agent::{self, AgentError};
use crate::config::{mask_url, Config, ConfigError};
use crate::sink::EntityKeys;
use crate::tail::{self, DecodeError, Entry, Follower, StartAt, TailError};

/// The example queries, as in the repository's `queries/`.
pub const CUSTOMERS_SQL: &str = include_str!("../queries/customers.sql");
pub const ORDERS_SQL: &str = include_str!("../queries/orders.sql");

/// The first line of the config the demo writes: a directory whose
/// `highwater.toml` lacks it is someone else's and is left alone.
const MARKER: &str = "# Written by `highwater demo`";
const DATABASE_FILE: &str = "shop.db";
const CONFIG_FILE: &str = "highwater.toml";
/// How often the writer changes something, on average.
const WRITE_INTERVAL_MS: std::ops::RangeInclusive<u64> = 200..=400;

/// What `highwater demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the database, the config and the queries are written.
    pub dir: PathBuf,
    /// The Redis the agent writes to (its password never printed).
    pub redis_url: String,
    /// Stop after this long; `None`: at shutdown only.
    pub duration: Option<Duration>,
    /// Redis key prefix; the streams are `<prefix>:customers` and `<prefix>:orders`.
    pub prefix: String,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{}: cannot {action}", path.display())]
    File {
        path: PathBuf,
        action: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("{}: {why}; choose another --dir", path.display())]
    Occupied { path: PathBuf, why: &'static str },
    #[error("demo database {}: cannot {action}", path.display())]
    Database {
        path: PathBuf,
        action: &'static str,
        #[source]
        error: sqlx::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("redis ({url}): cannot {action} (is Redis running? ./scripts/demo starts one; or pass --redis-url)")]
    Redis {
        url: String,
        action: &'static str,
        #[source]
        error: redis::RedisError,
    },
    /// Boxed: an agent error is large and the demo's errors are rare.
    #[error(transparent)]
    Agent(Box<AgentError>),
    #[error(transparent)]
    Tail(#[from] TailError),
    #[error("the agent task failed: {0}")]
    AgentTask(String),
}

impl From<AgentError> for DemoError {
    fn from(error: AgentError) -> DemoError {
        DemoError::Agent(Box::new(error))
    }
}

/// Runs the demo until `shutdown` resolves or the duration is over, then
/// stops the writer and the agent, prints what was still arriving and a
/// summary.
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    let dir = &options.dir;
    let files = write_files(&options)?;
    let (pool, seeded) = create_database(&files.database).await?;
    let config_text = std::fs::read_to_string(&files.config).map_err(|error| DemoError::File {
        path: files.config.clone(),
        action: "read the config back",
        error,
    })?;
    let url = options.redis_url.clone();
    let config = Config::from_text(&files.config, &config_text, |var| {
        (var == "REDIS_URL").then(|| url.clone())
    })?;

    let streams: Vec<String> = config.entities.values().map(|e| e.stream.clone()).collect();
    let deleted = reset_redis(&config).await?;
    let mut follower = Follower::connect(
        &config.redis,
        &streams,
        StartAt::Beginning,
        Some(crate::config::CursorKind::Time),
    )
    .await?;

    say("highwater demo: a shop database changing under a running agent");
    say(format!(
        "  database  {} (SQLite, created just now: {} customers, {} orders)",
        files.database_shown.display(),
        seeded.customers,
        seeded.orders
    ));
    say(format!(
        "  config    {} (queries in {})",
        dir.join(CONFIG_FILE).display(),
        dir.join("queries").display()
    ));
    say(format!(
        "  redis     {}, streams {}",
        mask_url(&options.redis_url),
        streams.join(" and ")
    ));
    say(format!(
        "            the demo's keys are deleted at start so that every run starts clean ({deleted} deleted now)"
    ));
    say("  a writer inserts, updates or soft-deletes a row every ~300 ms; the agent polls every second");
    say(match options.duration {
        Some(d) => format!(
            "  stopping after {} (or Ctrl-C)",
            humantime::format_duration(d)
        ),
        None => "  Ctrl-C stops".to_owned(),
    });
    say("");
    let width = streams.iter().map(String::len).max().unwrap_or(0);
    say(format!(
        "{:<12}  {:<width$}  {:<6}  {:<pkey$}  payload",
        "time (UTC)",
        "stream",
        "op",
        "pkey",
        pkey = tail::PKEY_WIDTH
    ));

    let (stop_tx, stop) = watch::channel(false);
    let writer = tokio::spawn(write_continuously(pool.clone(), stop.clone()));
    let mut agent_stop = stop.clone();
    let mut agent = tokio::spawn(agent::run(config, async move {
        let _ = agent_stop.wait_for(|stopped| *stopped).await;
    }));

    // A closed stdout (`| head`) stops the demo like Ctrl-C.
    let (closed_tx, mut closed) = watch::channel(false);
    let mut shown = Shown::new(&streams, width, closed_tx);
    let mut agent_ended = None;
    let until = async {
        let deadline = async {
            match options.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => {}
            () = deadline => {}
            _ = closed.wait_for(|closed| *closed) => {}
            ended = &mut agent => agent_ended = Some(ended),
        }
    };
    let followed = tail::follow(&mut follower, until, |entry| shown.print(entry)).await;

    let _ = stop_tx.send(true);
    let writes = writer.await.unwrap_or_default();
    let agent_result = match agent_ended {
        Some(ended) => ended,
        None => agent.await,
    };
    // One last cycle after the writer stopped: the streams end in the
    // database's final state.
    let last_cycle = if agent_result.as_ref().is_ok_and(Result::is_ok) {
        last_cycle(&files.config, &config_text, &options.redis_url).await
    } else {
        Ok(())
    };
    if followed.is_ok() {
        loop {
            match follower.read(None).await {
                Ok(entries) if entries.is_empty() => break,
                Ok(entries) => entries.into_iter().for_each(|e| shown.print(e)),
                Err(e) => {
                    tracing::warn!(error = %agent::error_chain(&e), "cannot read the last messages");
                    break;
                }
            }
        }
    }
    pool.close().await;

    say("");
    say(format!(
        "stopped. The writer made {} ({}, {}, {}); {} arrived ({}).",
        count(writes.inserts + writes.updates + writes.deletes, "change"),
        count(writes.inserts, "insert"),
        count(writes.updates, "update"),
        count(writes.deletes, "soft delete"),
        count(shown.total(), "message"),
        shown.per_stream()
    ));
    say("(a row changed several times between two polls arrives once, in its latest state)");
    if let Some(first) = streams.first() {
        say(format!(
            "read them again: redis-cli -c -u {} XRANGE {first} - +",
            mask_url(&options.redis_url)
        ));
    }
    say(format!(
        "the database, config and queries stay in {}: highwater once --config {}",
        dir.display(),
        dir.join(CONFIG_FILE).display()
    ));

    followed?;
    match agent_result {
        Ok(result) => result?,
        Err(join) => return Err(DemoError::AgentTask(join.to_string())),
    }
    last_cycle
}

/// Writes a line to stdout; false when stdout is closed (no panic, unlike `println!`).
fn say(line: impl std::fmt::Display) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// `1 insert`, `2 inserts`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs one cycle of each entity (as `highwater once` does).
async fn last_cycle(config_file: &Path, text: &str, redis_url: &str) -> Result<(), DemoError> {
    let config = Config::from_text(config_file, text, |var| {
        (var == "REDIS_URL").then(|| redis_url.to_owned())
    })?;
    // The demo's agent has stopped and released its leases: waiting never lasts.
    for (_, result) in agent::once(&config, None, true).await? {
        result?;
    }
    Ok(())
}

/// Prints entries and counts them per stream.
struct Shown {
    counts: Vec<(String, u64)>,
    width: usize,
    /// Told when stdout is closed.
    closed: watch::Sender<bool>,
}

impl Shown {
    fn new(streams: &[String], width: usize, closed: watch::Sender<bool>) -> Shown {
        Shown {
            counts: streams.iter().map(|s| (s.clone(), 0)).collect(),
            width,
            closed,
        }
    }

    fn print(&mut self, entry: Result<Entry, DecodeError>) {
        let line = match entry {
            Ok(entry) => {
                if let Some((_, n)) = self.counts.iter_mut().find(|(s, _)| *s == entry.stream) {
                    *n += 1;
                }
                entry.compact(self.width)
            }
            Err(e) => format!("?  {e}"),
        };
        if !say(line) {
            let _ = self.closed.send(true);
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    fn per_stream(&self) -> String {
        self.counts
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The files the demo writes, and how to show the database's path.
struct DemoFiles {
    database: PathBuf,
    database_shown: PathBuf,
    config: PathBuf,
}

/// Writes the queries and the config into the directory, and removes a
/// database left by an earlier run. Refuses a directory whose config or
/// database the demo did not write.
fn write_files(options: &DemoOptions) -> Result<DemoFiles, DemoError> {
    let dir = &options.dir;
    let file_error = |path: &Path, action| {
        let path = path.to_owned();
        move |error| DemoError::File {
            path,
            action,
            error,
        }
    };
    let config = dir.join(CONFIG_FILE);
    let database_shown = dir.join(DATABASE_FILE);
    match std::fs::read_to_string(&config) {
        Ok(text) if !text.starts_with(MARKER) => {
            return Err(DemoError::Occupied {
                path: config,
                why: "a config that `highwater demo` did not write",
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if database_shown.exists() {
                return Err(DemoError::Occupied {
                    path: database_shown,
                    why: "a database that `highwater demo` did not create",
                });
            }
        }
        Err(e) => return Err(file_error(&config, "read the existing config")(e)),
    }
    std::fs::create_dir_all(dir.join("queries"))
        .map_err(file_error(&dir.join("queries"), "create the directory"))?;

    let absolute = std::fs::canonicalize(dir).map_err(file_error(dir, "resolve the directory"))?;
    let database = absolute.join(DATABASE_FILE);
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", database.display()));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(file_error(&path, "remove the earlier run's database")(e))
            }
            _ => {}
        }
    }
    for (name, text) in [("customers.sql", CUSTOMERS_SQL), ("orders.sql", ORDERS_SQL)] {
        let path = dir.join("queries").join(name);
        std::fs::write(&path, text).map_err(file_error(&path, "write the query"))?;
    }
    std::fs::write(&config, config_text(options, &database))
        .map_err(file_error(&config, "write the config"))?;
    Ok(DemoFiles {
        database,
        database_shown,
        config,
    })
}

/// The demo's config. A Redis URL with a password is not written to disk:
/// the file reads it from `${REDIS_URL}`.
fn config_text(options: &DemoOptions, database: &Path) -> String {
    let redis_url = if mask_url(&options.redis_url) == options.redis_url {
        toml_string(&options.redis_url.replace("${", "$${"))
    } else {
        "\"${REDIS_URL}\"".to_owned()
    };
    let sqlite_url = format!(
        "sqlite://{}",
        database
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('?', "%3F")
            .replace('#', "%23")
    );
    let prefix = &options.prefix;
    let stream = |entity: &str| toml_string(&format!("{prefix}:{entity}"));
    format!(
        r#"{MARKER}: a shop database that a writer task
# changes while the agent polls it. Each run of the demo rewrites this directory.

[redis]
url = {redis_url}
key_prefix = {key_prefix}

# No /metrics endpoint: the demo must not take a port a real agent may use.
[http]
listen = ""

[sources.shop]
url = {sqlite_url}

[entities.customers]
source = "shop"
query_file = "queries/customers.sql"
key = "id"
cursor = "updated_at"
delete_column = "deleted_at"
lookback = "10s"
every = "1s"
start = "beginning"
stream = {customers}

[entities.orders]
source = "shop"
query_file = "queries/orders.sql"
key = "id"
cursor = "changed_at"
lookback = "10s"
every = "1s"
start = "beginning"
stream = {orders}
"#,
        key_prefix = toml_string(prefix),
        sqlite_url = toml_string(&sqlite_url),
        customers = stream("customers"),
        orders = stream("orders"),
    )
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Deletes the demo's streams and state keys (exactly those, nothing
/// matched by pattern); returns how many existed.
async fn reset_redis(config: &Config) -> Result<u64, DemoError> {
    let redis_error = |action| {
        let url = mask_url(&config.redis.url);
        move |error| DemoError::Redis { url, action, error }
    };
    let mut conn = crate::connection::Connection::open_with(
        &config.redis,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .await
    .map_err(redis_error("connect"))?;
    let mut deleted = 0;
    for entity in config.entities.values() {
        let keys = EntityKeys::new(&config.redis.key_prefix, &entity.name, &entity.stream);
        // One entity's keys share a hash slot, so one DEL also works on a cluster.
        let n: u64 = redis::cmd("DEL")
            .arg(&keys.stream)
            .arg(&keys.seen)
            .arg(&keys.digest)
            .arg(&keys.state)
            .arg(&keys.dropped)
            .query_async(&mut conn)
            .await
            .map_err(redis_error("delete the keys of an earlier demo run"))?;
        deleted += n;
    }
    Ok(deleted)
}

/// How many rows the seed wrote.
struct Seeded {
    customers: usize,
    orders: usize,
}

const SEED_CUSTOMERS: [(&str, &str); 5] = [
    ("Ada Lovelace", "ada.lovelace@example.com"),
    ("Grace Hopper", "grace.hopper@example.com"),
    ("Alan Turing", "alan.turing@example.com"),
    ("Edsger Dijkstra", "edsger.dijkstra@example.com"),
    ("Barbara Liskov", "barbara.liskov@example.com"),
];
/// (customer id, total in cents)
const SEED_ORDERS: [(i64, i64); 8] = [
    (1, 2_499),
    (1, 1_250),
    (2, 9_900),
    (3, 450),
    (3, 12_000),
    (4, 3_375),
    (5, 780),
    (5, 15_990),
];

/// Creates the shop: `customers` (soft-deleted via `deleted_at`) and
/// `orders`, both stamped by `updated_at`, seeded with a few rows.
async fn create_database(path: &Path) -> Result<(SqlitePool, Seeded), DemoError> {
    let db_error = |action| {
        let path = path.to_owned();
        move |error| DemoError::Database {
            path,
            action,
            error,
        }
    };
    // WAL: the agent reads while the writer writes, neither waits.
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(db_error("create it"))?;
    let schema = "
        CREATE TABLE customers (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            email TEXT NOT NULL,
            deleted_at TEXT,
            updated_at TEXT NOT NULL DEFAULT (datetime('now'))
        );
        CREATE TABLE orders (
            id INTEGER PRIMARY KEY,
            customer_id INTEGER NOT NULL REFERENCES customers (id),
            total_cents INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'new',
            updated_at TEXT NOT NULL DEFAULT (datetime('now'))
        );
        CREATE INDEX customers_updated_at ON customers (updated_at);
        CREATE INDEX orders_updated_at ON orders (updated_at);
    ";
    sqlx::raw_sql(schema)
        .execute(&pool)
        .await
        .map_err(db_error("create the tables"))?;
    for (name, email) in SEED_CUSTOMERS {
        sqlx::query("INSERT INTO customers (name, email) VALUES (?, ?)")
            .bind(name)
            .bind(email)
            .execute(&pool)
            .await
            .map_err(db_error("seed the customers"))?;
    }
    for (customer, total) in SEED_ORDERS {
        sqlx::query("INSERT INTO orders (customer_id, total_cents) VALUES (?, ?)")
            .bind(customer)
            .bind(total)
            .execute(&pool)
            .await
            .map_err(db_error("seed the orders"))?;
    }
    Ok((
        pool,
        Seeded {
            customers: SEED_CUSTOMERS.len(),
            orders: SEED_ORDERS.len(),
        },
    ))
}

/// What the writer did.
#[derive(Debug, Default, Clone, Copy)]
struct Writes {
    inserts: u64,
    updates: u64,
    deletes: u64,
}

const FIRST_NAMES: [&str; 10] = [
    "Ken", "Margaret", "Dennis", "Frances", "John", "Radia", "Donald", "Sophie", "Niklaus", "Annie",
];
const LAST_NAMES: [&str; 10] = [
    "Thompson", "Hamilton", "Ritchie", "Allen", "Backus", "Perlman", "Knuth", "Wilson", "Wirth",
    "Easley",
];
const DOMAINS: [&str; 4] = ["example.com", "example.org", "example.net", "mail.example"];

/// Every ~300 ms, one plausible change: a new customer or order, an order
/// moving on (new → paid → shipped), a customer's new email address, or a
/// customer soft-deleted. Every write stamps `updated_at`.
async fn write_continuously(pool: SqlitePool, mut stop: watch::Receiver<bool>) -> Writes {
    let mut rng = StdRng::from_os_rng();
    let mut writes = Writes::default();
    loop {
        let wait = Duration::from_millis(rng.random_range(WRITE_INTERVAL_MS));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return writes,
        }
        match write_once(&pool, &mut rng).await {
            Ok(Write::Insert) => writes.inserts += 1,
            Ok(Write::Update) => writes.updates += 1,
            Ok(Write::Delete) => writes.deletes += 1,
            Err(e) => tracing::warn!(error = %e, "the demo's writer failed to change the database"),
        }
    }
}

enum Write {
    Insert,
    Update,
    Delete,
}

async fn write_once(pool: &SqlitePool, rng: &mut StdRng) -> Result<Write, sqlx::Error> {
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.random_range(0..list.len())];
    let roll = rng.random_range(0..100);
    if roll < 30 {
        let status = sqlx::query(
            "UPDATE orders SET status = CASE status WHEN 'new' THEN 'paid' ELSE 'shipped' END,
                               updated_at = datetime('now')
             WHERE id = (SELECT id FROM orders WHERE status IN ('new', 'paid') ORDER BY random() LIMIT 1)",
        )
        .execute(pool)
        .await?;
        if status.rows_affected() > 0 {
            return Ok(Write::Update);
        }
    } else if roll < 48 {
        let email = sqlx::query(
            "UPDATE customers SET email = lower(replace(name, ' ', '.')) || '@' || ?,
                                  updated_at = datetime('now')
             WHERE id = (SELECT id FROM customers WHERE deleted_at IS NULL ORDER BY random() LIMIT 1)",
        )
        .bind(pick(rng, &DOMAINS))
        .execute(pool)
        .await?;
        if email.rows_affected() > 0 {
            return Ok(Write::Update);
        }
    } else if roll < 56 {
        let deleted = sqlx::query(
            "UPDATE customers SET deleted_at = datetime('now'), updated_at = datetime('now')
             WHERE id = (SELECT id FROM customers WHERE deleted_at IS NULL ORDER BY random() LIMIT 1)
               AND (SELECT count(*) FROM customers WHERE deleted_at IS NULL) > 3",
        )
        .execute(pool)
        .await?;
        if deleted.rows_affected() > 0 {
            return Ok(Write::Delete);
        }
    } else if roll < 72 {
        let (first, last) = (pick(rng, &FIRST_NAMES), pick(rng, &LAST_NAMES));
        sqlx::query("INSERT INTO customers (name, email) VALUES (?, ?)")
            .bind(format!("{first} {last}"))
            .bind(format!(
                "{}.{}@{}",
                first.to_lowercase(),
                last.to_lowercase(),
                pick(rng, &DOMAINS)
            ))
            .execute(pool)
            .await?;
        return Ok(Write::Insert);
    }
    // A new order (also when the change rolled had nothing to change).
    sqlx::query(
        "INSERT INTO orders (customer_id, total_cents)
         SELECT id, ? FROM customers WHERE deleted_at IS NULL ORDER BY random() LIMIT 1",
    )
    .bind(rng.random_range(300..20_000_i64))
    .execute(pool)
    .await?;
    Ok(Write::Insert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_a_password_out_of_the_file() {
        // Its own empty directory: the working directory may hold a demo's queries.
        let dir = tempfile::tempdir().expect("temp dir");
        let options = DemoOptions {
            dir: dir.path().to_owned(),
            redis_url: "redis://:s3cret@127.0.0.1:6379/0".into(),
            duration: None,
            prefix: "highwater-demo".into(),
        };
        let text = config_text(&options, Path::new("/tmp/a b/shop.db"));
        assert!(text.starts_with(MARKER));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("url = \"${REDIS_URL}\""), "{text}");
        assert!(
            text.contains("url = \"sqlite:///tmp/a b/shop.db\""),
            "{text}"
        );
        let config = Config::from_text(&options.dir.join(CONFIG_FILE), &text, |var| {
            (var == "REDIS_URL").then(|| options.redis_url.clone())
        });
        // The query files are not there; every other field validates.
        let Err(ConfigError::Invalid { problems, .. }) = config else {
            panic!("expected only the missing query files to be reported");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems
            .iter()
            .all(|p| p.contains(".query_file: cannot read")));
    }
}
