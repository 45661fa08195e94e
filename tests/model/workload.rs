//! The randomized workload and its ground truth.
//!
//! Writers change a table of the test's own through short transactions:
//! inserts, updates, soft deletes, bursts of updates to one row (several in
//! one second on MariaDB's 1-second `DATETIME`), transactions held open,
//! rows stamped slightly in the future, transactions spanning rows,
//! rollbacks, and where a scenario asks for them transactions held open
//! longer than the look-back (covered only by the window's reach back to
//! open transactions). Every write bumps the row's version column `v`
//! (under the row lock, so per row `v` order is commit order) and copies the
//! new row into an audit table in the same transaction: the audit table
//! holds every committed version, nothing that rolled back. The writers
//! also note when each commit was sent and when it returned, which bounds
//! when a version became visible and when it was replaced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{mysql_url, pg_url, unique};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MariaDb,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::MariaDb => "mariadb",
        }
    }

    /// The test server's URL.
    pub fn url(self) -> String {
        match self {
            Backend::Postgres => pg_url(),
            Backend::MariaDb => mysql_url(),
        }
    }

    /// The server's address (for the proxy).
    pub fn address(self) -> SocketAddr {
        let url = self.url();
        let (host, port) = host_port(&url).expect("host and port in the test URL");
        let port = port.unwrap_or(match self {
            Backend::Postgres => 5432,
            Backend::MariaDb => 3306,
        });
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        format!("{host}:{port}")
            .parse()
            .expect("the test database URL names an IP address")
    }
}

/// `host` and `port` of `scheme://[user[:pw]@]host[:port][/...]`.
fn host_port(url: &str) -> Option<(&str, Option<u16>)> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let hostport = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
    match hostport.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok())),
        None => Some((hostport, None)),
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").expect("a URL") + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = match authority.rfind('@') {
        Some(at) => &authority[..=at],
        None => "",
    };
    format!(
        "{}{userinfo}{addr}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    )
}

/// A connection pool on one of the test databases.
#[derive(Clone)]
pub enum Db {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

impl Db {
    pub async fn connect(backend: Backend, connections: u32) -> Db {
        match backend {
            Backend::Postgres => Db::Pg(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(connections)
                    .connect(&pg_url())
                    .await
                    .expect("connect to PostgreSQL"),
            ),
            Backend::MariaDb => Db::My(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(connections)
                    .connect(&mysql_url())
                    .await
                    .expect("connect to MariaDB"),
            ),
        }
    }

    async fn exec(&self, sql: &str) {
        let result = match self {
            Db::Pg(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
            Db::My(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// The test's table and its audit table.
#[derive(Clone, Debug)]
pub struct Tables {
    pub table: String,
    pub audit: String,
}

impl Tables {
    /// Creates both tables: `id`, `v` (version, bumped by every write),
    /// `name`, `deleted` (soft delete), `updated_at` (the cursor:
    /// `timestamptz` on PostgreSQL, a 1-second `DATETIME` on MariaDB).
    pub async fn create(db: &Db, prefix: &str) -> Tables {
        let table = unique(prefix);
        let audit = format!("{table}_audit");
        match db {
            Db::Pg(_) => {
                db.exec(&format!(
                    "CREATE TABLE {table} (id bigint PRIMARY KEY, v bigint NOT NULL, name text NOT NULL, \
                     deleted boolean NOT NULL, updated_at timestamptz NOT NULL)"
                ))
                .await;
                db.exec(&format!("CREATE INDEX ON {table} (updated_at)"))
                    .await;
                db.exec(&format!(
                    "CREATE TABLE {audit} (seq bigserial PRIMARY KEY, id bigint NOT NULL, v bigint NOT NULL, \
                     name text NOT NULL, deleted boolean NOT NULL, updated_at timestamptz NOT NULL)"
                ))
                .await;
            }
            Db::My(_) => {
                db.exec(&format!(
                    "CREATE TABLE {table} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL, name VARCHAR(64) NOT NULL, \
                     deleted TINYINT(1) NOT NULL, updated_at DATETIME NOT NULL, KEY (updated_at)) ENGINE=InnoDB"
                ))
                .await;
                db.exec(&format!(
                    "CREATE TABLE {audit} (seq BIGINT AUTO_INCREMENT PRIMARY KEY, id BIGINT NOT NULL, \
                     v BIGINT NOT NULL, name VARCHAR(64) NOT NULL, deleted TINYINT(1) NOT NULL, \
                     updated_at DATETIME NOT NULL) ENGINE=InnoDB"
                ))
                .await;
            }
        }
        Tables { table, audit }
    }

    /// The polling query, as a user would write it.
    pub fn query(&self) -> String {
        format!(
            "SELECT id, v, name, deleted, updated_at FROM {} WHERE updated_at >= :since",
            self.table
        )
    }

    pub async fn drop_all(&self, db: &Db) {
        db.exec(&format!("DROP TABLE IF EXISTS {}", self.table))
            .await;
        db.exec(&format!("DROP TABLE IF EXISTS {}", self.audit))
            .await;
    }
}

/// One committed version of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowVersion {
    pub id: i64,
    pub v: i64,
    pub name: String,
    pub deleted: bool,
    /// `updated_at` in microseconds since 1970 UTC.
    pub epoch: i64,
}

/// When a commit was sent and when it returned, microseconds since 1970
/// (the machine's clock, which the agent's log lines use too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitTiming {
    pub sent: i64,
    pub done: i64,
}

/// Commit timings by (id, v).
pub type Timings = Arc<Mutex<HashMap<(i64, i64), CommitTiming>>>;

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// What the writers do.
#[derive(Clone, Debug)]
pub struct WorkloadSettings {
    /// Concurrent writer tasks.
    pub writers: usize,
    /// Rows inserted at most (the writers insert until then).
    pub max_keys: i64,
    /// Share of transactions held open for a while.
    pub hold_probability: f64,
    /// The longest a transaction stays open, BEGIN to COMMIT (held time and
    /// lock waits included): a transaction that would take longer rolls back.
    /// Must stay below the look-back (minus 1 s of `DATETIME` truncation)
    /// unless the window reaches back to open transactions.
    pub transaction_max: Duration,
    /// Longest pause of a writer between two operations.
    pub pause_max: Duration,
    /// Writer tasks besides `writers` whose every transaction is held open
    /// *long*: for a time drawn from `long_hold`, past the look-back (only
    /// the window's reach back to open transactions, up to `max_lookback`,
    /// covers them). Half take their cursor early and hold before writing
    /// (PostgreSQL: a read first, then the hold, then the writes and the
    /// commit at once: `now()` is the transaction's start), half write first
    /// and hold before the commit. Their budget is the hold plus
    /// `transaction_max`. They write rows of their own mostly, so that what
    /// they commit stays the row's state for a while (a version replaced at
    /// once is not required on the stream).
    pub long_writers: usize,
    /// The shortest and longest hold of a long transaction.
    pub long_hold: (Duration, Duration),
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        WorkloadSettings {
            writers: 4,
            max_keys: 60,
            hold_probability: 0.15,
            transaction_max: Duration::from_millis(2000),
            pause_max: Duration::from_millis(25),
            long_writers: 0,
            long_hold: (Duration::ZERO, Duration::ZERO),
        }
    }
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct WriterCounts {
    pub committed: AtomicU64,
    pub held: AtomicU64,
    pub rolled_back: AtomicU64,
    /// Transactions that failed (lock timeout, or over `transaction_max`).
    pub aborted: AtomicU64,
    pub bursts: AtomicU64,
    pub future: AtomicU64,
    /// Long transactions that committed (read first and held before
    /// writing, or wrote first and held before committing).
    pub long_read_first: AtomicU64,
    pub long_write_first: AtomicU64,
}

impl WriterCounts {
    pub fn summary(&self) -> String {
        format!(
            "txs={} held={} long_read_first={} long_write_first={} rolled_back={} aborted={} bursts={} future_stamped={}",
            self.committed.load(Ordering::Relaxed),
            self.held.load(Ordering::Relaxed),
            self.long_read_first.load(Ordering::Relaxed),
            self.long_write_first.load(Ordering::Relaxed),
            self.rolled_back.load(Ordering::Relaxed),
            self.aborted.load(Ordering::Relaxed),
            self.bursts.load(Ordering::Relaxed),
            self.future.load(Ordering::Relaxed),
        )
    }
}

/// One row write of a transaction.
#[derive(Clone, Debug)]
enum Write {
    Insert {
        id: i64,
        name: String,
        future_ms: i64,
    },
    Update {
        id: i64,
        name: String,
        deleted: bool,
        future_ms: i64,
    },
}

/// The writers, running until [`Workload::stop`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub counts: Arc<WriterCounts>,
}

/// State the writers share.
struct Shared {
    db: Db,
    tables: Tables,
    settings: WorkloadSettings,
    /// Ids whose insert committed.
    keys: Mutex<Vec<i64>>,
    next_id: AtomicI64,
    timings: Timings,
    counts: Arc<WriterCounts>,
}

/// Inserts `rows` rows (ids 1..=rows) in one transaction, with their audit
/// rows, before the agent starts.
pub async fn preload(db: &Db, tables: &Tables, rows: i64, timings: &Timings) {
    if rows == 0 {
        return;
    }
    let (t, a) = (&tables.table, &tables.audit);
    let sent;
    match db {
        Db::Pg(pool) => {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query(&format!(
                "INSERT INTO {t} (id, v, name, deleted, updated_at) \
                 SELECT i, 1, 'p' || i, false, now() FROM generate_series(1, $1) AS i"
            ))
            .bind(rows)
            .execute(&mut *tx)
            .await
            .expect("preload");
            sqlx::query(&format!(
                "INSERT INTO {a} (id, v, name, deleted, updated_at) SELECT id, v, name, deleted, updated_at FROM {t} ORDER BY id"
            ))
            .execute(&mut *tx)
            .await
            .expect("preload audit");
            sent = now_micros();
            tx.commit().await.expect("commit preload");
        }
        Db::My(pool) => {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query(&format!(
                "INSERT INTO {t} (id, v, name, deleted, updated_at) \
                 SELECT seq, 1, CONCAT('p', seq), 0, NOW() FROM seq_1_to_{rows}"
            ))
            .execute(&mut *tx)
            .await
            .expect("preload");
            sqlx::query(&format!(
                "INSERT INTO {a} (id, v, name, deleted, updated_at) SELECT id, v, name, deleted, updated_at FROM {t} ORDER BY id"
            ))
            .execute(&mut *tx)
            .await
            .expect("preload audit");
            sent = now_micros();
            tx.commit().await.expect("commit preload");
        }
    }
    let done = now_micros();
    let mut timings = timings.lock().unwrap();
    for id in 1..=rows {
        timings.insert((id, 1), CommitTiming { sent, done });
    }
}

impl Workload {
    /// Starts the writers on a table whose rows 1..=`existing` exist (the
    /// preload); new rows get the next ids.
    pub fn start(
        db: Db,
        tables: Tables,
        settings: WorkloadSettings,
        seed: u64,
        existing: i64,
        timings: Timings,
    ) -> Workload {
        let counts = Arc::new(WriterCounts::default());
        let shared = Arc::new(Shared {
            db,
            tables,
            keys: Mutex::new((1..=existing).collect()),
            next_id: AtomicI64::new(existing + 1),
            settings,
            timings,
            counts: Arc::clone(&counts),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let writers = shared.settings.writers;
        let tasks = (0..writers + shared.settings.long_writers)
            .map(|i| {
                let rng = StdRng::seed_from_u64(
                    seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)),
                );
                let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                if i < writers {
                    tokio::spawn(writer(shared, stop, rng))
                } else {
                    tokio::spawn(long_writer(shared, stop, rng))
                }
            })
            .collect();
        Workload {
            stop,
            tasks,
            counts,
        }
    }

    /// Stops the writers after their transaction in flight.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            task.await.expect("writer task panicked");
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A random name that changes the row's content.
fn name(rng: &mut StdRng) -> String {
    format!("n{}", rng.random_range(0..1_000_000))
}

async fn writer(shared: Arc<Shared>, stop: Arc<AtomicBool>, mut rng: StdRng) {
    let settings = shared.settings.clone();
    while !stop.load(Ordering::SeqCst) {
        let key_count = shared.keys.lock().unwrap().len() as i64;
        let roll: f64 = rng.random();
        if key_count == 0 || (roll < 0.2 && key_count < settings.max_keys) {
            let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
            let write = Write::Insert {
                id,
                name: name(&mut rng),
                future_ms: future_ms(&mut rng, &shared),
            };
            if transact(&shared, &mut rng, vec![write], true, false).await {
                shared.keys.lock().unwrap().push(id);
            }
        } else if roll < 0.3 {
            // A burst: several commits to one row in quick succession.
            shared.counts.bursts.fetch_add(1, Ordering::Relaxed);
            let id = pick_key(&shared, &mut rng);
            for _ in 0..rng.random_range(3..=8) {
                let write = update(&shared, &mut rng, id);
                transact(&shared, &mut rng, vec![write], false, false).await;
            }
        } else if roll < 0.4 {
            // Several rows in one transaction, locked in id order (no deadlocks).
            let mut ids: Vec<i64> = (0..rng.random_range(2..=3))
                .map(|_| pick_key(&shared, &mut rng))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let writes = ids
                .iter()
                .map(|&id| update(&shared, &mut rng, id))
                .collect();
            transact(&shared, &mut rng, writes, true, false).await;
        } else {
            let id = pick_key(&shared, &mut rng);
            let write = update(&shared, &mut rng, id);
            transact(&shared, &mut rng, vec![write], true, false).await;
        }
        let pause = rng.random_range(0..=settings.pause_max.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Rows of its own each writer of long transactions inserts first.
const LONG_WRITER_ROWS: usize = 3;

/// A writer of long transactions (see [`WorkloadSettings::long_writers`]):
/// it inserts [`LONG_WRITER_ROWS`] rows of its own, which no other writer
/// touches (so that a version it commits stays the row's state until its
/// next transaction on the row, seconds later: the checker requires it on
/// the stream), then updates one of them, or one in four times a row of the
/// other writers picked uniformly.
async fn long_writer(shared: Arc<Shared>, stop: Arc<AtomicBool>, mut rng: StdRng) {
    let settings = shared.settings.clone();
    let mut own: Vec<i64> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if own.len() < LONG_WRITER_ROWS {
            let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
            let write = Write::Insert {
                id,
                name: name(&mut rng),
                future_ms: future_ms(&mut rng, &shared),
            };
            if transact(&shared, &mut rng, vec![write], true, true).await {
                own.push(id);
            }
        } else {
            let shared_row = rng.random_bool(0.25).then(|| {
                let keys = shared.keys.lock().unwrap();
                (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())])
            });
            let id = shared_row
                .flatten()
                .unwrap_or_else(|| own[rng.random_range(0..own.len())]);
            let write = update(&shared, &mut rng, id);
            transact(&shared, &mut rng, vec![write], true, true).await;
        }
        let pause = rng.random_range(0..=settings.pause_max.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Half of the writes go to a few hot rows, so that transactions on one row
/// overlap and bursts collide.
fn pick_key(shared: &Shared, rng: &mut StdRng) -> i64 {
    let keys = shared.keys.lock().unwrap();
    let hot = keys.len().min(8);
    if rng.random_bool(0.5) {
        keys[rng.random_range(0..hot)]
    } else {
        keys[rng.random_range(0..keys.len())]
    }
}

/// One row in ten is stamped up to 1.5 s in the future (a writer whose
/// clock runs ahead).
fn future_ms(rng: &mut StdRng, shared: &Shared) -> i64 {
    if rng.random_bool(0.1) {
        shared.counts.future.fetch_add(1, Ordering::Relaxed);
        rng.random_range(100..=1500)
    } else {
        0
    }
}

fn update(shared: &Shared, rng: &mut StdRng, id: i64) -> Write {
    Write::Update {
        id,
        name: name(rng),
        // Soft deletes, and rows coming back.
        deleted: rng.random_bool(0.12),
        future_ms: future_ms(rng, shared),
    }
}

/// The shape of a long transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Long {
    /// A read, the hold, then the writes and the commit.
    ReadFirst,
    /// The writes, then the hold, then the commit.
    WriteFirst,
}

/// How a transaction spends its time.
#[derive(Clone, Copy, Debug)]
struct Plan {
    hold_before: Duration,
    hold_after: Duration,
    /// A read of the table before the hold (the transaction's first
    /// statement after its settings).
    read_first: bool,
    rollback: bool,
    began: Instant,
    /// BEGIN to COMMIT at most, else it rolls back.
    budget: Duration,
}

/// Runs one transaction: BEGIN, maybe a read, maybe wait, the writes (each
/// with its audit row), maybe wait, COMMIT (or ROLLBACK). `long`: held for a
/// time drawn from `long_hold`, in one of the two shapes. Records the
/// commit's timing for each version written. Returns whether it committed.
async fn transact(
    shared: &Shared,
    rng: &mut StdRng,
    writes: Vec<Write>,
    may_hold: bool,
    long: bool,
) -> bool {
    let settings = &shared.settings;
    let max_ms = settings.transaction_max.as_millis() as u64;
    let long = long.then(|| {
        let (shortest, longest) = settings.long_hold;
        let hold = Duration::from_millis(
            rng.random_range(shortest.as_millis() as u64..=longest.as_millis() as u64),
        );
        let shape = if rng.random_bool(0.5) {
            Long::ReadFirst
        } else {
            Long::WriteFirst
        };
        (shape, hold)
    });
    let (hold_before, hold_after) = if let Some((shape, hold)) = long {
        match shape {
            Long::ReadFirst => (hold, Duration::ZERO),
            Long::WriteFirst => (Duration::ZERO, hold),
        }
    } else if may_hold && rng.random_bool(settings.hold_probability) {
        shared.counts.held.fetch_add(1, Ordering::Relaxed);
        // The held time takes up to 70 % of the budget; lock waits the rest.
        let total = rng.random_range(0..=max_ms * 7 / 10);
        let before = rng.random_range(0..=total);
        (
            Duration::from_millis(before),
            Duration::from_millis(total - before),
        )
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let rollback = rng.random_bool(0.05);
    let plan = Plan {
        hold_before,
        hold_after,
        read_first: long.is_some_and(|(shape, _)| shape == Long::ReadFirst),
        rollback,
        began: Instant::now(),
        budget: settings.transaction_max + long.map_or(Duration::ZERO, |(_, hold)| hold),
    };
    let outcome = match &shared.db {
        Db::Pg(pool) => pg_transaction(pool, &shared.tables, &writes, plan).await,
        Db::My(pool) => my_transaction(pool, &shared.tables, &writes, plan).await,
    };
    match outcome {
        Ok(Some((versions, timing))) => {
            shared.counts.committed.fetch_add(1, Ordering::Relaxed);
            if let Some((shape, _)) = long {
                let count = match shape {
                    Long::ReadFirst => &shared.counts.long_read_first,
                    Long::WriteFirst => &shared.counts.long_write_first,
                };
                count.fetch_add(1, Ordering::Relaxed);
            }
            let mut timings = shared.timings.lock().unwrap();
            for (id, v) in versions {
                timings.insert((id, v), timing);
            }
            true
        }
        Ok(None) => {
            shared.counts.rolled_back.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(_) => {
            shared.counts.aborted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// The versions a committed transaction wrote, and when it committed.
type Committed = Option<(Vec<(i64, i64)>, CommitTiming)>;

#[derive(Debug)]
struct TooLong;

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("transaction over its time budget")
    }
}

impl std::error::Error for TooLong {}

async fn pg_transaction(
    pool: &sqlx::PgPool,
    tables: &Tables,
    writes: &[Write],
    plan: Plan,
) -> Result<Committed, Box<dyn std::error::Error + Send + Sync>> {
    let (t, a) = (&tables.table, &tables.audit);
    // PostgreSQL's now() is the transaction's start: the cursor is stamped at BEGIN.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '500ms'")
        .execute(&mut *tx)
        .await?;
    if plan.read_first {
        // The writes to come stamp this transaction's start, long before
        // they commit.
        sqlx::query(&format!("SELECT count(*) FROM {t}"))
            .execute(&mut *tx)
            .await?;
    }
    tokio::time::sleep(plan.hold_before).await;
    let mut versions = Vec::new();
    for write in writes {
        let v: i64 = match write {
            Write::Insert {
                id,
                name,
                future_ms,
            } => {
                sqlx::query_scalar(&format!(
                    "WITH w AS (INSERT INTO {t} (id, v, name, deleted, updated_at) \
                     VALUES ($1, 1, $2, false, now() + $3::float8 * interval '1 millisecond') \
                     RETURNING id, v, name, deleted, updated_at) \
                     INSERT INTO {a} (id, v, name, deleted, updated_at) SELECT * FROM w RETURNING v"
                ))
                .bind(id)
                .bind(name)
                .bind(*future_ms as f64)
                .fetch_one(&mut *tx)
                .await?
            }
            Write::Update {
                id,
                name,
                deleted,
                future_ms,
            } => {
                sqlx::query_scalar(&format!(
                    "WITH w AS (UPDATE {t} SET v = v + 1, name = $2, deleted = $3, \
                     updated_at = now() + $4::float8 * interval '1 millisecond' WHERE id = $1 \
                     RETURNING id, v, name, deleted, updated_at) \
                     INSERT INTO {a} (id, v, name, deleted, updated_at) SELECT * FROM w RETURNING v"
                ))
                .bind(id)
                .bind(name)
                .bind(deleted)
                .bind(*future_ms as f64)
                .fetch_one(&mut *tx)
                .await?
            }
        };
        versions.push((write_id(write), v));
    }
    tokio::time::sleep(plan.hold_after).await;
    if plan.rollback {
        tx.rollback().await?;
        return Ok(None);
    }
    if plan.began.elapsed() >= plan.budget {
        tx.rollback().await?;
        return Err(Box::new(TooLong));
    }
    let sent = now_micros();
    tx.commit().await?;
    let done = now_micros();
    Ok(Some((versions, CommitTiming { sent, done })))
}

async fn my_transaction(
    pool: &sqlx::MySqlPool,
    tables: &Tables,
    writes: &[Write],
    plan: Plan,
) -> Result<Committed, Box<dyn std::error::Error + Send + Sync>> {
    let (t, a) = (&tables.table, &tables.audit);
    let mut tx = pool.begin().await?;
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 1")
        .execute(&mut *tx)
        .await?;
    if plan.read_first {
        // Opens InnoDB's read view; the writes after the hold stamp their
        // own statements' time.
        sqlx::query(&format!("SELECT COUNT(*) FROM {t}"))
            .execute(&mut *tx)
            .await?;
    }
    tokio::time::sleep(plan.hold_before).await;
    let mut versions = Vec::new();
    for write in writes {
        // MariaDB's NOW() is the statement's start, in whole seconds here.
        match write {
            Write::Insert {
                id,
                name,
                future_ms,
            } => {
                sqlx::query(&format!(
                    "INSERT INTO {t} (id, v, name, deleted, updated_at) \
                     VALUES (?, 1, ?, 0, NOW() + INTERVAL ? SECOND)"
                ))
                .bind(id)
                .bind(name)
                .bind(future_ms.div_euclid(500))
                .execute(&mut *tx)
                .await?;
            }
            Write::Update {
                id,
                name,
                deleted,
                future_ms,
            } => {
                sqlx::query(&format!(
                    "UPDATE {t} SET v = v + 1, name = ?, deleted = ?, \
                     updated_at = NOW() + INTERVAL ? SECOND WHERE id = ?"
                ))
                .bind(name)
                .bind(deleted)
                .bind(future_ms.div_euclid(500))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        let id = write_id(write);
        sqlx::query(&format!(
            "INSERT INTO {a} (id, v, name, deleted, updated_at) \
             SELECT id, v, name, deleted, updated_at FROM {t} WHERE id = ?"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let v: i64 = sqlx::query_scalar(&format!("SELECT v FROM {t} WHERE id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        versions.push((id, v));
    }
    tokio::time::sleep(plan.hold_after).await;
    if plan.rollback {
        tx.rollback().await?;
        return Ok(None);
    }
    if plan.began.elapsed() >= plan.budget {
        tx.rollback().await?;
        return Err(Box::new(TooLong));
    }
    let sent = now_micros();
    tx.commit().await?;
    let done = now_micros();
    Ok(Some((versions, CommitTiming { sent, done })))
}

fn write_id(write: &Write) -> i64 {
    match write {
        Write::Insert { id, .. } | Write::Update { id, .. } => *id,
    }
}

/// Every committed version in audit (commit) order, and the rows as they are now.
pub async fn read_truth(db: &Db, tables: &Tables) -> (Vec<RowVersion>, Vec<RowVersion>) {
    let audit = format!(
        "SELECT id, v, name, deleted, updated_at FROM {} ORDER BY seq",
        tables.audit
    );
    let rows = format!(
        "SELECT id, v, name, deleted, updated_at FROM {} ORDER BY id",
        tables.table
    );
    match db {
        Db::Pg(pool) => {
            let read = |sql: String| async move {
                let rows: Vec<(i64, i64, String, bool, chrono::DateTime<chrono::Utc>)> =
                    sqlx::query_as(&sql)
                        .fetch_all(pool)
                        .await
                        .expect("read truth");
                rows.into_iter()
                    .map(|(id, v, name, deleted, at)| RowVersion {
                        id,
                        v,
                        name,
                        deleted,
                        epoch: at.timestamp_micros(),
                    })
                    .collect::<Vec<_>>()
            };
            (read(audit).await, read(rows).await)
        }
        Db::My(pool) => {
            let read = |sql: String| async move {
                let rows: Vec<(i64, i64, String, bool, chrono::NaiveDateTime)> =
                    sqlx::query_as(&sql)
                        .fetch_all(pool)
                        .await
                        .expect("read truth");
                rows.into_iter()
                    .map(|(id, v, name, deleted, at)| RowVersion {
                        id,
                        v,
                        name,
                        deleted,
                        epoch: at.and_utc().timestamp_micros(),
                    })
                    .collect::<Vec<_>>()
            };
            (read(audit).await, read(rows).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redirected_to_the_proxy() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(
            url_via("postgres://postgres@127.0.0.1:5432/test", addr),
            "postgres://postgres@127.0.0.1:7000/test"
        );
        assert_eq!(
            url_via("mysql://root:pw@db/test", addr),
            "mysql://root:pw@127.0.0.1:7000/test"
        );
        assert_eq!(host_port("mysql://root@db/x"), Some(("db", None)));
    }
}
