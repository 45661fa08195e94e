//! Transactions longer than the look-back, on PostgreSQL and MariaDB,
//! through the real binary: the window reaches back to the oldest open
//! transaction (up to `max_lookback`), so its change arrives once; the
//! traps (a PostgreSQL transaction that reads first, a commit between two
//! cycles, an agent restarted meanwhile); a transaction older than
//! `max_lookback` is named once; without the grant to see other sessions
//! the agent says so and keeps the fixed look-back.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// Every test's look-back; its transactions stay open for 3x as long.
const LOOKBACK: Duration = Duration::from_secs(1);
const HELD: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Postgres,
    MariaDb,
}

/// The test database of one backend, through the test's own pool.
enum Db {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

/// A transaction the test holds open.
enum Tx {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    My(sqlx::Transaction<'static, sqlx::MySql>),
}

impl Db {
    async fn new(kind: Kind) -> Db {
        match kind {
            Kind::Postgres => Db::Pg(pg().await),
            Kind::MariaDb => Db::My(mysql().await),
        }
    }

    fn url(&self) -> String {
        match self {
            Db::Pg(_) => pg_url(),
            Db::My(_) => mysql_url(),
        }
    }

    async fn exec(&self, sql: &str) {
        match self {
            Db::Pg(pool) => pg_exec(pool, sql).await,
            Db::My(pool) => mysql_exec(pool, sql).await,
        }
    }

    /// A table `name` (id, name, updated_at stamped by the database) with
    /// rows 1..=rows.
    async fn table(&self, name: &str, rows: u32) {
        let cursor = match self {
            Db::Pg(_) => "timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
            Db::My(_) => "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
        };
        self.exec(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id INT PRIMARY KEY, name VARCHAR(40) NOT NULL, updated_at {cursor})"
        ))
        .await;
        for id in 1..=rows {
            self.insert(name, id).await;
        }
    }

    async fn insert(&self, table: &str, id: u32) {
        self.exec(&format!(
            "INSERT INTO {table} (id, name) VALUES ({id}, 'n{id}')"
        ))
        .await;
    }

    async fn begin(&self) -> Tx {
        match self {
            Db::Pg(pool) => Tx::Pg(pool.begin().await.expect("begin")),
            Db::My(pool) => Tx::My(pool.begin().await.expect("begin")),
        }
    }
}

impl Tx {
    async fn exec(&mut self, sql: &str) {
        match self {
            Tx::Pg(tx) => sqlx::query(sql).execute(&mut **tx).await.map(drop),
            Tx::My(tx) => sqlx::query(sql).execute(&mut **tx).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Renames row `id` and stamps it with the database's clock (the
    /// transaction's start on PostgreSQL, the statement's on MariaDB).
    async fn rename(&mut self, table: &str, id: u32, name: &str) {
        self.exec(&format!(
            "UPDATE {table} SET name = '{name}', updated_at = CURRENT_TIMESTAMP(6) WHERE id = {id}"
        ))
        .await;
    }

    /// The server's id of this session: the pid / thread id a warning names.
    async fn session_id(&mut self) -> i64 {
        match self {
            Tx::Pg(tx) => sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&mut **tx)
                .await
                .map(i64::from),
            Tx::My(tx) => sqlx::query_scalar::<_, u64>("SELECT CONNECTION_ID()")
                .fetch_one(&mut **tx)
                .await
                .map(|id| id as i64),
        }
        .expect("session id")
    }

    async fn commit(self) {
        match self {
            Tx::Pg(tx) => tx.commit().await,
            Tx::My(tx) => tx.commit().await,
        }
        .expect("commit");
    }
}

/// A config polling `table` every 200 ms with a 1 s look-back; `extra` is
/// appended to the entity (e.g. `max_lookback = "2s"`), `http` is the
/// `[http] listen` address ("" for none).
fn config(env: &Env, url: &str, table: &str, extra: &str, http: &str) -> PathBuf {
    env.config(&format!(
        r#"[http]
listen = "{http}"

[sources.db]
url = "{url}"

[entities.{table}]
source = "db"
query = "SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "{}ms"
every = "200ms"
{extra}
"#,
        LOOKBACK.as_millis()
    ))
}

/// The `name` payload field of the messages of `pkey`, in stream order.
fn names(messages: &[Message], pkey: &str) -> Vec<String> {
    of_key(messages, pkey)
        .iter()
        .map(|m| {
            m.payload.as_ref().expect("payload")["name"]
                .as_str()
                .expect("name")
                .to_owned()
        })
        .collect()
}

async fn wait_for_name(table: &str, pkey: &str, name: &str) {
    eventually(
        DEADLINE,
        &format!("{pkey} = {name:?} on {table}"),
        || async {
            names(&read_stream(table).await, pkey)
                .iter()
                .any(|n| n == name)
        },
    )
    .await;
}

/// The window's extension the last commit recorded, microseconds.
async fn extension(env: &Env, table: &str) -> i64 {
    state_field(env, table, "window_extension_us")
        .await
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// A transaction open for 3x the look-back.
// ---------------------------------------------------------------------------

async fn a_long_transaction_is_emitted_once_while_others_keep_flowing(kind: Kind) {
    let env = Env::new();
    let db = Db::new(kind).await;
    let table = unique("long_tx");
    db.table(&table, 2).await;
    let config = config(&env, &db.url(), &table, "", "");
    let mut agent = Agent::start(&config);
    eventually(DEADLINE, "the first two rows", || async {
        read_stream(&table).await.len() == 2
    })
    .await;

    let mut tx = db.begin().await;
    tx.rename(&table, 1, "long").await;
    // Meanwhile other changes arrive within a few intervals each.
    for id in 10..13 {
        tokio::time::sleep(HELD / 3).await;
        db.insert(&table, id).await;
        eventually(
            Duration::from_secs(3),
            &format!("row {id} while the transaction is open"),
            || async { !of_key(&read_stream(&table).await, &id.to_string()).is_empty() },
        )
        .await;
    }
    let stretched = extension(&env, &table).await;
    assert!(
        stretched > LOOKBACK.as_micros() as i64,
        "after {HELD:?} the window reaches back to the open transaction: extended by {stretched} µs"
    );
    let status = highwater(&["status", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout);
    let session = match kind {
        Kind::Postgres => "(pid ",
        Kind::MariaDb => "(thread ",
    };
    assert!(
        text.lines().any(|l| l
            .starts_with("  window        lookback 1s (max_lookback 1h), extended by ")
            && l.contains("; oldest open transaction since ")
            && l.contains(session)),
        "status shows the window's extension and since when:\n{text}"
    );
    tx.commit().await;

    wait_for_name(&table, "1", "long").await;
    // A few more cycles re-read the window: nothing is sent again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "1"), ["n1", "long"]);
    assert_eq!(messages.len(), 6, "{messages:?}");
    assert!(agent.exited().is_none(), "the agent keeps running");
    let warnings: Vec<_> = agent
        .events()
        .into_iter()
        .filter(|e| e["level"] == "WARN")
        .collect();
    assert!(warnings.is_empty(), "no warning: {warnings:?}");
}

#[tokio::test]
async fn a_postgres_transaction_open_three_lookbacks_is_emitted_once_while_others_keep_flowing() {
    a_long_transaction_is_emitted_once_while_others_keep_flowing(Kind::Postgres).await;
}

#[tokio::test]
async fn a_mariadb_transaction_open_three_lookbacks_is_emitted_once_while_others_keep_flowing() {
    a_long_transaction_is_emitted_once_while_others_keep_flowing(Kind::MariaDb).await;
}

// ---------------------------------------------------------------------------
// The traps.
// ---------------------------------------------------------------------------

/// PostgreSQL's `now()` is the transaction's start: one that only reads for
/// 3x the look-back (no xid yet), then writes and commits at once, stamps a
/// time long before any cycle saw it write.
#[tokio::test]
async fn a_postgres_transaction_that_reads_for_three_lookbacks_then_writes_and_commits_is_emitted_once(
) {
    let env = Env::new();
    let db = Db::new(Kind::Postgres).await;
    let table = unique("read_then_write");
    db.table(&table, 2).await;
    let _agent = Agent::start(&config(&env, &db.url(), &table, "", ""));
    eventually(DEADLINE, "the first two rows", || async {
        read_stream(&table).await.len() == 2
    })
    .await;

    let mut tx = db.begin().await;
    let Tx::Pg(pg_tx) = &mut tx else {
        unreachable!("a PostgreSQL transaction")
    };
    let started: i64 = sqlx::query_scalar(&format!(
        "SELECT (extract(epoch FROM now()) * 1000000)::int8 FROM {table} LIMIT 1"
    ))
    .fetch_one(&mut **pg_tx)
    .await
    .expect("read in the transaction");
    tokio::time::sleep(HELD).await;
    tx.rename(&table, 2, "late").await;
    tx.commit().await;

    wait_for_name(&table, "2", "late").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "2"), ["n2", "late"]);
    assert_eq!(
        of_key(&messages, "2")[1].epoch,
        started,
        "the row carries the transaction's start, {HELD:?} before it wrote"
    );
    assert_eq!(messages.len(), 3);
}

/// A transaction seen open by one cycle that commits before the next one
/// looks: the next cycle is the first to see its row, and only the horizon
/// the first one stored tells it to reach back. Each `once` is a new
/// process, so the horizon comes from Redis.
async fn a_commit_between_two_cycles_is_seen_by_the_next(kind: Kind) {
    let env = Env::new();
    let db = Db::new(kind).await;
    let table = unique("between");
    db.table(&table, 3).await;
    let config = config(&env, &db.url(), &table, "", "");
    let out = once_ok(&config);
    assert!(out.contains("3 emitted"), "{out}");

    let mut tx = db.begin().await;
    tx.rename(&table, 2, "late").await;
    tokio::time::sleep(HELD).await;
    let out = once_ok(&config);
    assert!(out.contains("0 emitted"), "still uncommitted: {out}");
    assert!(
        state_field(&env, &table, "horizon")
            .await
            .is_some_and(|h| !h.is_empty()),
        "the cycle stored the open transaction's start"
    );
    tx.commit().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (out, log) = once_logged(&config);
    assert!(
        out.contains("1 emitted"),
        "the commit landed between two cycles: {out}"
    );
    assert!(!log.contains("WARN"), "{log}");
    let out = once_ok(&config);
    assert!(out.contains("0 emitted"), "a later cycle: {out}");
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "2"), ["n2", "late"]);
    assert_eq!(messages.len(), 4);
}

#[tokio::test]
async fn a_postgres_commit_between_two_cycles_is_seen_by_the_next() {
    a_commit_between_two_cycles_is_seen_by_the_next(Kind::Postgres).await;
}

#[tokio::test]
async fn a_mariadb_commit_between_two_cycles_is_seen_by_the_next() {
    a_commit_between_two_cycles_is_seen_by_the_next(Kind::MariaDb).await;
}

/// The agent is killed while a long transaction is open, the transaction
/// commits while no agent runs, and a new agent starts: it never saw the
/// transaction, yet its first window reaches back to it.
#[tokio::test]
async fn an_agent_restarted_while_a_long_transaction_was_open_emits_it_once() {
    let env = Env::new();
    let db = Db::new(Kind::Postgres).await;
    let table = unique("restart_tx");
    db.table(&table, 2).await;
    let config = config(&env, &db.url(), &table, "", "");
    let first = Agent::start(&config);
    eventually(DEADLINE, "the first two rows", || async {
        read_stream(&table).await.len() == 2
    })
    .await;

    let mut tx = db.begin().await;
    tx.rename(&table, 1, "long").await;
    tokio::time::sleep(HELD / 2).await;
    first.signal("KILL");
    drop(first);
    tokio::time::sleep(HELD / 2).await;
    tx.commit().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let _second = Agent::start(&config);
    wait_for_name(&table, "1", "long").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "1"), ["n1", "long"]);
    assert_eq!(messages.len(), 3);
}

// ---------------------------------------------------------------------------
// Beyond max_lookback.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_transaction_older_than_max_lookback_is_named_once_and_the_window_stops_there() {
    let env = Env::new();
    // A database of its own: other tests' transactions elsewhere on the
    // server do not count here, so the warning and the counter are this
    // transaction's.
    let admin = pg().await;
    let database = unique("hw_beyond");
    pg_exec(&admin, &format!("CREATE DATABASE {database}")).await;
    let url = pg_url().replacen("/test", &format!("/{database}"), 1);
    assert!(
        url.ends_with(&database),
        "the test URL names its database: {url}"
    );
    let db = Db::Pg(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect to the test's database"),
    );
    let table = unique("beyond_max");
    db.table(&table, 2).await;
    let port = free_port();
    let config = config(
        &env,
        &url,
        &table,
        "max_lookback = \"2s\"",
        &format!("127.0.0.1:{port}"),
    );
    let agent = Agent::start(&config);
    eventually(DEADLINE, "the first two rows", || async {
        read_stream(&table).await.len() == 2
    })
    .await;

    let mut tx = db.begin().await;
    let pid = tx.session_id().await;
    tx.rename(&table, 1, "too late").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warnings: Vec<_> = agent
        .events()
        .into_iter()
        .filter(|e| e["level"] == "WARN")
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for one transaction: {warnings:?}"
    );
    let warning = &warnings[0];
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("longer than max_lookback")),
        "{warning}"
    );
    assert_eq!(warning["transaction"], format!("pid {pid}"), "{warning}");
    assert_eq!(warning["user"], "postgres", "{warning}");
    assert_eq!(warning["max_lookback"], "2s", "{warning}");
    assert!(
        warning["started"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{warning}"
    );
    // The window reaches back max_lookback, no further.
    assert_eq!(
        extension(&env, &table).await,
        1_000_000,
        "max_lookback 2s - lookback 1s"
    );
    let (_, metrics) = http_get(port, "/metrics").expect("GET /metrics");
    for line in [
        format!("highwater_long_transactions_total{{entity=\"{table}\"}} 1"),
        format!("highwater_window_extension_seconds{{entity=\"{table}\"}} 1"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    tx.commit().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = read_stream(&table).await;
    assert_eq!(
        names(&messages, "1"),
        ["n1"],
        "a transaction older than max_lookback is missed, as the warning said"
    );
    drop(agent);
    if let Db::Pg(pool) = db {
        pool.close().await;
    }
    pg_exec(&admin, &format!("DROP DATABASE {database} WITH (FORCE)")).await;
}

// ---------------------------------------------------------------------------
// Without the grant to see other sessions.
// ---------------------------------------------------------------------------

/// The agent runs as `account`, which cannot see other sessions; the
/// writer runs as the test's admin user.
async fn without_the_grant(kind: Kind, grant: &str) {
    let env = Env::new();
    let db = Db::new(kind).await;
    let table = unique("no_grant");
    db.table(&table, 3).await;
    let user = unique("hw_np");
    let url = match kind {
        Kind::Postgres => {
            db.exec(&format!(
                "CREATE ROLE {user} LOGIN; GRANT SELECT ON {table} TO {user}"
            ))
            .await;
            pg_url().replacen("postgres@", &format!("{user}@"), 1)
        }
        Kind::MariaDb => {
            db.exec(&format!(
                "CREATE USER '{user}'@'%'; GRANT SELECT ON test.{table} TO '{user}'@'%'"
            ))
            .await;
            mysql_url().replacen("root@", &format!("{user}@"), 1)
        }
    };
    assert!(url.contains(&user), "the test URL names its user: {url}");
    let config = config(&env, &url, &table, "", "");
    let out = once_ok(&config);
    assert!(out.contains("3 emitted"), "{out}");

    let mut tx = db.begin().await;
    tx.rename(&table, 2, "late").await;
    tokio::time::sleep(HELD).await;
    let (_, log) = once_logged(&config);
    let hidden: Vec<_> = log
        .lines()
        .filter(|l| l.contains("open transactions of other sessions are not visible"))
        .collect();
    assert_eq!(hidden.len(), 1, "said once: {log}");
    assert!(
        hidden[0].contains(grant),
        "names the grant {grant:?}: {}",
        hidden[0]
    );
    tx.commit().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = once_ok(&config);
    assert!(
        out.contains("0 emitted"),
        "with the fixed look-back the late commit is missed, as before: {out}"
    );

    let checked = highwater(&["check", "--config", config.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(
        report.lines().any(|l| l.starts_with(
            "warning: source db: open transactions of other sessions are not visible"
        ) && l.contains(grant)),
        "check names the grant {grant:?}:\n{report}"
    );

    match kind {
        Kind::Postgres => {
            db.exec(&format!("DROP TABLE {table}; DROP ROLE {user}"))
                .await
        }
        Kind::MariaDb => db.exec(&format!("DROP USER '{user}'@'%'")).await,
    }
}

#[tokio::test]
async fn a_postgres_role_without_pg_read_all_stats_is_told_so_and_keeps_the_fixed_lookback() {
    // The role's name is unique; the grant names it.
    without_the_grant(Kind::Postgres, "GRANT pg_read_all_stats TO hw_np").await;
}

#[tokio::test]
async fn a_mariadb_user_without_process_is_told_so_and_keeps_the_fixed_lookback() {
    without_the_grant(
        Kind::MariaDb,
        "lacks the PROCESS privilege: GRANT PROCESS ON *.* TO 'hw_np",
    )
    .await;
}
