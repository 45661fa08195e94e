//! The core guarantees on MariaDB (MySQL protocol), through the real binary:
//! every change once and in order, restarts, late commits, second-precision
//! ties, skewed clocks, the type mapping, time zones, a real legacy schema
//! (sakila), version cursors and the errors a user sees.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(20);
/// The sakila sample schema (BSD, tests/data/sakila/LICENSE).
const SAKILA_SCHEMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/sakila/mysql-sakila-schema.sql"
);

// ---------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------

/// A config polling MariaDB at `url` (`source_extra`: more `[sources.db]`
/// lines) with one entity named `entity`, whose settings (`query`, `key`,
/// `cursor`, `lookback`, ...) are the TOML lines `settings`. Polls every
/// second unless `settings` says otherwise.
fn config_at(env: &Env, url: &str, source_extra: &str, entity: &str, settings: &str) -> PathBuf {
    let schedule = if settings.contains("every") || settings.contains("schedule") {
        ""
    } else {
        "every = \"1s\"\n"
    };
    env.config(&format!(
        "[sources.db]\nurl = \"{url}\"\n{source_extra}\n\n[entities.{entity}]\nsource = \"db\"\n{schedule}{settings}\n"
    ))
}

/// [`config_at`] on the test database.
fn config(env: &Env, entity: &str, settings: &str) -> PathBuf {
    config_at(env, &mysql_url(), "", entity, settings)
}

/// Creates `table` (id, name, updated_at DATETIME(6) stamped by the server on
/// insert and update) and returns a config polling it with a 5-minute
/// look-back; `extra` adds entity settings.
async fn items(env: &Env, pool: &sqlx::MySqlPool, table: &str, extra: &str) -> PathBuf {
    mysql_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(100), \
             updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
        ),
    )
    .await;
    config(
        env,
        table,
        &format!(
            "query = '''SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since'''\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\n{extra}"
        ),
    )
}

/// Creates `table` (id, name, updated_at as a 1-second `DATETIME` the test
/// sets) and returns a config polling it; `settings` adds entity lines
/// (the look-back at least).
async fn seconds_table(env: &Env, pool: &sqlx::MySqlPool, table: &str, settings: &str) -> PathBuf {
    mysql_exec(
        pool,
        &format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(20), updated_at DATETIME NOT NULL)"),
    )
    .await;
    config(
        env,
        table,
        &format!(
            "query = '''SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since'''\n\
             key = \"id\"\ncursor = \"updated_at\"\n{settings}"
        ),
    )
}

/// Inserts rows `1..=n` named `n<id>` into an [`items`] table.
async fn insert_items(pool: &sqlx::MySqlPool, table: &str, n: u32) {
    mysql_exec(
        pool,
        &format!("INSERT INTO {table} (id, name) SELECT seq, CONCAT('n', seq) FROM seq_1_to_{n}"),
    )
    .await;
}

/// The `name` of each message of `pkey`, in stream order.
fn names(messages: &[Message], pkey: &str) -> Vec<String> {
    of_key(messages, pkey)
        .iter()
        .map(|m| {
            m.payload.as_ref().expect("payload")["name"]
                .as_str()
                .unwrap_or("<not text>")
                .to_owned()
        })
        .collect()
}

/// How many distinct keys the messages carry.
fn distinct_keys(messages: &[Message]) -> usize {
    messages
        .iter()
        .map(|m| &m.pkey)
        .collect::<BTreeSet<_>>()
        .len()
}

/// The database's clock as `YYYY-MM-DD HH:MM:SS` (a second-precision DATETIME literal).
async fn db_now_seconds(pool: &sqlx::MySqlPool) -> String {
    sqlx::query_scalar("SELECT CAST(NOW() AS CHAR)")
        .fetch_one(pool)
        .await
        .expect("SELECT NOW()")
}

/// Microseconds since 1970 of an RFC 3339 time.
fn micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339")
        .timestamp_micros()
}

/// `once` that fails: its stderr, which must be exactly one line.
fn one_error_line(config: &Path) -> String {
    let stderr = once_err(config);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected, got:\n{stderr}");
    lines[0].to_owned()
}

/// Turns off the agent's HTTP listener (by default `run` serves `/metrics` on
/// 127.0.0.1:9187, where another test's agent may already listen).
fn without_http_listener(config: &Path) {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(config)
        .and_then(|mut file| file.write_all(b"\n[http]\nlisten = \"\"\n"))
        .expect("append [http] to the config");
}

/// The error line carries `essentials` first (more context may follow).
fn assert_error_starts(line: &str, essentials: &str) {
    assert!(
        line.starts_with(essentials),
        "expected the error to start with\n  {essentials}\ngot\n  {line}"
    );
}

/// `highwater run` as a child process; killed if the test ends while it runs.
struct RunningAgent {
    child: Child,
    log: PathBuf,
}

impl RunningAgent {
    /// Starts `highwater run`, its log going to `log`.
    fn start(config: &Path, log: PathBuf) -> RunningAgent {
        let log_file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("HIGHWATER_LOG")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn highwater run");
        RunningAgent { child, log }
    }

    /// Sends SIGTERM with the `kill` command and waits (with a deadline) for the exit.
    async fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for highwater run") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "highwater run did not exit within {DEADLINE:?} of SIGTERM; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "log of highwater run ({}):\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The `mariadb` command-line client for the test server.
fn mariadb_cli() -> Command {
    let url = mysql_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("root", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
    let mut cli = Command::new("mariadb");
    cli.args(["-h", host, "-P", port, "-u", user]);
    if !password.is_empty() {
        cli.arg(format!("-p{password}"));
    }
    cli
}

/// A database of the test's own, dropped when the test ends (also on panic).
struct ScratchDatabase {
    name: String,
}

impl ScratchDatabase {
    fn url(&self) -> String {
        let url = mysql_url();
        let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
        format!("{base}/{}", self.name)
    }

    /// Runs SQL through the `mariadb` client (which understands `DELIMITER`).
    fn run_sql(&self, sql: &str) {
        use std::io::Write as _;
        let mut child = mariadb_cli()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the mariadb client");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .expect("feed the mariadb client");
        let out = child.wait_with_output().expect("mariadb client");
        assert!(
            out.status.success(),
            "mariadb client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let _ = mariadb_cli()
            .args(["-e", &format!("DROP DATABASE IF EXISTS {}", self.name)])
            .status();
    }
}

// ---------------------------------------------------------------------------
// Every change once, in order
// ---------------------------------------------------------------------------

#[tokio::test]
async fn thousand_inserts_arrive_once_and_a_second_cycle_adds_nothing() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_ins");
    let config = items(&env, &pool, &table, "").await;
    insert_items(&pool, &table, 1000).await;

    let out = once_ok(&config);
    assert!(out.contains("1000 rows read, 1000 emitted"), "{out}");
    assert_eq!(read_stream(&table).await.len(), 1000);

    let out = once_ok(&config);
    assert!(out.contains("1000 rows read, 0 emitted"), "{out}");
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 1000);
    assert_eq!(distinct_keys(&messages), 1000, "every key exactly once");
    let first = &messages[0];
    assert_eq!(
        (first.variant.as_str(), first.op.as_str()),
        (table.as_str(), "upsert")
    );
    assert_eq!(
        first.payload.as_ref().unwrap()["name"],
        format!("n{}", first.pkey)
    );
}

#[tokio::test]
async fn updates_arrive_once_each_and_in_update_order() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_upd");
    let config = items(&env, &pool, &table, "").await;
    insert_items(&pool, &table, 100).await;
    once_ok(&config);

    mysql_exec(
        &pool,
        &format!("UPDATE {table} SET name = CONCAT(name, '-v2') WHERE id <= 10"),
    )
    .await;
    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 110, "exactly the 10 updates are new");
    for id in 1..=10 {
        assert_eq!(
            names(&messages, &id.to_string()),
            [format!("n{id}"), format!("n{id}-v2")]
        );
    }

    for version in ["a", "b", "c"] {
        mysql_exec(
            &pool,
            &format!("UPDATE {table} SET name = '{version}' WHERE id = 50"),
        )
        .await;
        once_ok(&config);
    }
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "50"), ["n50", "a", "b", "c"]);
    assert_eq!(messages.len(), 113);
}

#[tokio::test]
async fn restart_after_sigterm_emits_nothing_twice() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_restart");
    let config = items(&env, &pool, &table, "every = \"200ms\"").await;
    without_http_listener(&config);
    insert_items(&pool, &table, 50).await;
    let stream = table.as_str();

    let mut agent = RunningAgent::start(&config, env.dir.path().join("run1.log"));
    eventually(DEADLINE, "all 50 rows on the stream", || async move {
        read_stream(stream).await.len() >= 50
    })
    .await;
    let status = agent.terminate().await;
    assert!(status.success(), "first run exited with {status}");

    let before = state_field(&env, &table, "last_started_at_ms").await;
    assert!(before.is_some(), "the first run committed a cycle");
    let mut agent = RunningAgent::start(&config, env.dir.path().join("run2.log"));
    let seen = std::cell::RefCell::new(BTreeSet::new());
    let (seen, env_ref, before) = (&seen, &env, &before);
    eventually(DEADLINE, "two cycles after the restart", || async move {
        let now = state_field(env_ref, stream, "last_started_at_ms").await;
        if now != *before {
            seen.borrow_mut().insert(now);
        }
        seen.borrow().len() >= 2
    })
    .await;
    let status = agent.terminate().await;
    assert!(status.success(), "second run exited with {status}");

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 50, "nothing new after the restart");
    assert_eq!(distinct_keys(&messages), 50);
}

// ---------------------------------------------------------------------------
// The cases that break "emit iff epoch > last epoch"
// ---------------------------------------------------------------------------

#[tokio::test]
async fn late_commit_within_lookback_is_emitted_once() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_late");
    let config = items(&env, &pool, &table, "").await;
    insert_items(&pool, &table, 1).await;
    once_ok(&config);

    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "UPDATE {table} SET name = 'late', updated_at = NOW(6) WHERE id = 1"
    ))
    .execute(&mut *tx)
    .await
    .expect("update in the open transaction");
    once_ok(&config);
    assert_eq!(
        read_stream(&table).await.len(),
        1,
        "the open transaction is invisible"
    );
    let watermark_while_open = watermark(&env, &table).await;
    tx.commit().await.expect("commit");

    once_ok(&config);
    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "1"), ["n1", "late"]);
    assert!(
        messages[1].epoch < watermark_while_open,
        "the late row is stamped before the watermark it was committed after, so only the look-back finds it"
    );
}

/// A window whose start falls inside a second, on a 1-second `DATETIME`
/// column: the agent asks from the start of that second and treats the
/// whole second as in the window. A row committed late in that second is
/// emitted once; rows of that second the last cycle sent are not sent again
/// (the trim kept them); no warning.
#[tokio::test]
async fn a_row_in_the_window_s_first_second_is_emitted_once_without_a_warning() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_edge");
    let config = seconds_table(
        &env,
        &pool,
        &table,
        "lookback = \"3500ms\"\nstart = \"beginning\"",
    )
    .await;
    // One row per second over the last half minute.
    mysql_exec(
        &pool,
        &format!(
            "INSERT INTO {table} SELECT seq, CONCAT('n', seq), UTC_TIMESTAMP() - INTERVAL (31 - seq) SECOND FROM seq_1_to_31"
        ),
    )
    .await;
    let (out, log) = once_logged(&config);
    assert!(out.contains("31 rows read, 31 emitted"), "{out}");
    assert!(!log.contains(BELOW_WINDOW_WARNING), "{log}");

    // The next window starts 3.5 s before the watermark, inside a second.
    let boundary = next_window_second(&env, &table, 3_500_000).await;
    mysql_exec(
        &pool,
        &format!("INSERT INTO {table} VALUES (100, 'late', '{boundary}')"),
    )
    .await;
    only_the_late_row_is_emitted_without_a_warning(&config);

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 32, "31 rows and the late one, each once");
    assert_eq!(names(&messages, "100"), ["late"]);
    assert_eq!(distinct_keys(&messages), 32, "no key twice");
}

#[tokio::test]
async fn two_updates_in_the_same_second_are_both_emitted_in_order() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_tie");
    let config = seconds_table(&env, &pool, &table, "lookback = \"5m\"").await;
    // Every version carries the same second, as writes within one second do.
    let second = db_now_seconds(&pool).await;
    mysql_exec(
        &pool,
        &format!("INSERT INTO {table} VALUES (1, 'v0', '{second}')"),
    )
    .await;
    once_ok(&config);
    for version in ["v1", "v2"] {
        mysql_exec(
            &pool,
            &format!("UPDATE {table} SET name = '{version}', updated_at = '{second}' WHERE id = 1"),
        )
        .await;
        once_ok(&config);
    }

    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "1"), ["v0", "v1", "v2"]);
    assert!(
        messages.iter().all(|m| m.epoch == messages[0].epoch),
        "one epoch for all: {messages:?}"
    );
}

#[tokio::test]
async fn a_row_stamped_in_the_future_does_not_hide_later_changes() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_future");
    let config = items(&env, &pool, &table, "").await;
    insert_items(&pool, &table, 2).await;
    mysql_exec(
        &pool,
        &format!("UPDATE {table} SET updated_at = NOW(6) + INTERVAL 1 DAY WHERE id = 1"),
    )
    .await;
    once_ok(&config);

    mysql_exec(
        &pool,
        &format!("UPDATE {table} SET name = 'changed' WHERE id = 2"),
    )
    .await;
    once_ok(&config);
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "2"), ["n2", "changed"]);
    assert_eq!(
        names(&messages, "1"),
        ["n1"],
        "the future row is not re-emitted"
    );
    let future_epoch = of_key(&messages, "1")[0].epoch;
    assert!(
        watermark(&env, &table).await < future_epoch,
        "the watermark follows the database clock"
    );
}

// ---------------------------------------------------------------------------
// Shapes and types
// ---------------------------------------------------------------------------

#[tokio::test]
async fn composite_key_is_a_json_array_and_null_columns_are_null() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_lines");
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (order_id VARCHAR(20), line INT, note VARCHAR(50) NULL, \
             updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6), \
             PRIMARY KEY (order_id, line)); \
             INSERT INTO {table} (order_id, line, note) VALUES ('o-1', 1, NULL), ('o-1', 2, 'gift'), ('o-2', 1, NULL)"
        ),
    )
    .await;
    let config = config(
        &env,
        &table,
        &format!(
            "query = '''SELECT order_id, line, note, updated_at FROM {table} WHERE updated_at >= :since'''\n\
             key = [\"order_id\", \"line\"]\ncursor = \"updated_at\"\nlookback = \"5m\""
        ),
    );
    once_ok(&config);
    mysql_exec(
        &pool,
        &format!("UPDATE {table} SET note = 'rush' WHERE order_id = 'o-1' AND line = 1"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    let keys: BTreeSet<_> = messages.iter().map(|m| m.pkey.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([r#"["o-1",1]"#, r#"["o-1",2]"#, r#"["o-2",1]"#])
    );
    let notes: Vec<_> = of_key(&messages, r#"["o-1",1]"#)
        .iter()
        .map(|m| m.payload.as_ref().unwrap()["note"].clone())
        .collect();
    assert_eq!(notes, [Value::Null, json!("rush")]);
    let payload = of_key(&messages, r#"["o-2",1]"#)[0]
        .payload
        .clone()
        .unwrap();
    assert_eq!(
        (&payload["order_id"], &payload["line"], &payload["note"]),
        (&json!("o-2"), &json!(1), &Value::Null)
    );
}

#[tokio::test]
async fn json_columns_nest_mariadb_json_in_the_payload() {
    // MariaDB's JSON is a LONGTEXT alias: without json_columns it arrives as a string.
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_json");
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, doc JSON, note TEXT, \
             updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)); \
             INSERT INTO {table} (id, doc, note) VALUES (1, '{{\"a\": [1, 2.5, null]}}', '{{\"b\": 1}}')"
        ),
    )
    .await;
    let config = config(
        &env,
        &table,
        &format!(
            "query = \"SELECT id, doc, note, updated_at FROM {table} WHERE updated_at >= :since\"\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\njson_columns = [\"doc\"]"
        ),
    );
    once_ok(&config);
    let messages = read_stream(&table).await;
    let payload = messages[0].payload.as_ref().unwrap();
    assert_eq!(payload["doc"], json!({"a": [1, 2.5, null]}));
    assert_eq!(
        payload["note"],
        json!("{\"b\": 1}"),
        "columns not listed stay strings"
    );
}

/// Columns of the types table, with the SQL value of the full row and the
/// JSON a consumer receives.
fn type_cases() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    vec![
        ("i8", "TINYINT", "-128", json!(-128)),
        ("i16", "SMALLINT", "-32768", json!(-32768)),
        ("i24", "MEDIUMINT", "8388607", json!(8388607)),
        ("i32", "INT", "-2147483648", json!(-2147483648i64)),
        ("i64", "BIGINT", "-9223372036854775808", json!(i64::MIN)),
        (
            "u64",
            "BIGINT UNSIGNED",
            "18446744073709551615",
            json!(u64::MAX),
        ),
        (
            "dec30",
            "DECIMAL(30,10)",
            "12345678901234567890.0123456789",
            json!("12345678901234567890.0123456789"),
        ),
        ("f32", "FLOAT", "0.1", json!(0.1)),
        (
            "f64",
            "DOUBLE",
            "0.30000000000000004",
            json!(0.30000000000000004),
        ),
        ("flag", "BOOLEAN", "TRUE", json!(true)),
        ("tiny1", "TINYINT(1)", "0", json!(false)),
        (
            "vc",
            "VARCHAR(50)",
            "'héllo ✓ \"q\"'",
            json!("héllo ✓ \"q\""),
        ),
        ("txt", "TEXT", "'line1\\nline2'", json!("line1\nline2")),
        ("d", "DATE", "'2024-02-29'", json!("2024-02-29")),
        (
            "dt",
            "DATETIME(6)",
            "'2024-03-01 12:34:56.789012'",
            json!("2024-03-01T12:34:56.789012Z"),
        ),
        (
            "ts",
            "TIMESTAMP(6) NULL",
            "'2024-03-01 12:34:56.000001'",
            json!("2024-03-01T12:34:56.000001Z"),
        ),
        // MariaDB's JSON is LONGTEXT with a json_valid check: the text arrives as a string.
        (
            "doc",
            "JSON",
            r#"'{"a": [1, 2.5, null]}'"#,
            json!(r#"{"a": [1, 2.5, null]}"#),
        ),
        ("blb", "BLOB", "x'00FF10'", json!("AP8Q")),
        ("vb", "VARBINARY(16)", "x'C328'", json!("wyg=")),
        ("e", "ENUM('small','large')", "'large'", json!("large")),
        ("s", "SET('a','b','c')", "'a,c'", json!("a,c")),
        ("y", "YEAR", "2024", json!(2024)),
        ("tm", "TIME", "'25:00:01'", json!("25:00:01")),
        ("tm_short", "TIME", "'08:05:00'", json!("08:05:00")),
        ("tm_neg", "TIME(3)", "'-01:02:03.5'", json!("-01:02:03.5")),
        ("b", "BIT(8)", "b'101'", json!(5)),
        ("pt", "POINT", "POINT(1, 2)", json!("POINT(1 2)")),
        (
            "g",
            "GEOMETRY",
            "ST_GeomFromText('LINESTRING(0 0,1 1)')",
            json!("LINESTRING(0 0,1 1)"),
        ),
    ]
}

#[tokio::test]
async fn every_column_type_maps_to_its_documented_json() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_types");
    let cases = type_cases();
    let columns: Vec<String> = cases
        .iter()
        .map(|(name, ty, _, _)| format!("{name} {ty}"))
        .collect();
    let names: Vec<&str> = cases.iter().map(|(name, ..)| *name).collect();
    let values: Vec<&str> = cases.iter().map(|(_, _, sql, _)| *sql).collect();
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, {}, updated_at DATETIME(6) NOT NULL); \
             INSERT INTO {table} (id, {}, updated_at) VALUES (1, {}, '2024-03-01 12:00:00.5'); \
             INSERT INTO {table} (id, updated_at) VALUES (2, '2024-03-01 12:00:00')",
            columns.join(", "),
            names.join(", "),
            values.join(", ")
        ),
    )
    .await;
    let config = config(
        &env,
        &table,
        &format!(
            "query = '''SELECT * FROM {table} WHERE updated_at >= :since'''\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nstart = \"beginning\""
        ),
    );
    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 2);

    let full = of_key(&messages, "1")[0];
    assert_eq!(full.epoch, micros("2024-03-01T12:00:00.5Z"));
    let mut expected = serde_json::Map::new();
    expected.insert("id".into(), json!(1));
    for (name, _, _, value) in &cases {
        expected.insert((*name).into(), value.clone());
    }
    expected.insert("updated_at".into(), json!("2024-03-01T12:00:00.500Z"));
    let payload = full.payload.clone().unwrap();
    for (name, value) in &expected {
        assert_eq!(payload.get(name), Some(value), "column {name}");
    }
    assert_eq!(payload, Value::Object(expected), "the whole row");

    let nulls = of_key(&messages, "2")[0].payload.clone().unwrap();
    for name in &names {
        assert_eq!(nulls[name], Value::Null, "NULL {name}");
    }
}

#[tokio::test]
async fn source_time_zone_applies_to_datetime_but_not_to_timestamp() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_berlin");
    // The test connection's session runs in UTC: the TIMESTAMP literals are UTC instants.
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, local_at DATETIME(6) NOT NULL, stamped_at TIMESTAMP(6) NULL); \
             INSERT INTO {table} VALUES (1, '2024-07-01 12:00:00', '2024-07-01 12:00:00'), \
                                        (2, '2024-01-15 12:00:00', '2024-01-15 12:00:00')"
        ),
    )
    .await;
    let config = config_at(
        &env,
        &mysql_url(),
        "timezone = \"Europe/Berlin\"",
        &table,
        &format!(
            "query = '''SELECT id, local_at, stamped_at FROM {table} WHERE local_at >= :since'''\n\
             key = \"id\"\ncursor = \"local_at\"\nlookback = \"5m\"\nstart = \"beginning\""
        ),
    );
    once_ok(&config);

    // A row written now by an application whose clock runs in Berlin time.
    let db_now: chrono::NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
        .fetch_one(&pool)
        .await
        .expect("UTC_TIMESTAMP");
    let berlin_now = db_now
        .and_utc()
        .with_timezone(&chrono_tz::Europe::Berlin)
        .naive_local();
    mysql_exec(
        &pool,
        &format!("INSERT INTO {table} (id, local_at) VALUES (3, '{berlin_now}')"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    let summer = of_key(&messages, "1")[0];
    assert_eq!(
        summer.epoch,
        micros("2024-07-01T10:00:00Z"),
        "CEST is UTC+2"
    );
    assert_eq!(
        summer.payload,
        Some(
            json!({"id": 1, "local_at": "2024-07-01T10:00:00Z", "stamped_at": "2024-07-01T12:00:00Z"})
        )
    );
    let winter = of_key(&messages, "2")[0];
    assert_eq!(winter.epoch, micros("2024-01-15T11:00:00Z"), "CET is UTC+1");
    assert_eq!(
        winter.payload.as_ref().unwrap()["stamped_at"],
        "2024-01-15T12:00:00Z"
    );
    let live = of_key(&messages, "3");
    assert_eq!(
        live.len(),
        1,
        "the Berlin-stamped row inside the window arrives"
    );
    assert_eq!(live[0].epoch, db_now.and_utc().timestamp_micros());
}

// ---------------------------------------------------------------------------
// A real legacy schema
// ---------------------------------------------------------------------------

#[tokio::test]
async fn select_star_on_sakila_film_delivers_every_film() {
    let env = Env::new();
    let db = ScratchDatabase {
        name: unique("hw_sakila"),
    };
    let schema = std::fs::read_to_string(SAKILA_SCHEMA).expect("read the sakila schema");
    // The file drops, creates and uses `sakila` (and names it in a view): point it at our database.
    let schema = schema
        .replace("DROP SCHEMA IF EXISTS sakila;", "")
        .replace(
            "CREATE SCHEMA sakila;",
            &format!("CREATE DATABASE {};", db.name),
        )
        .replace("sakila.", &format!("{}.", db.name))
        .replace("USE sakila;", &format!("USE {};", db.name));
    db.run_sql(&schema);
    db.run_sql(&format!(
        "USE {};
         INSERT INTO language (language_id, name) VALUES (1, 'English'), (2, 'Italian');
         INSERT INTO film (film_id, title, description, release_year, language_id, original_language_id,
                           rental_duration, rental_rate, length, replacement_cost, rating, special_features)
         VALUES (1, 'ACADEMY DINOSAUR', 'A Epic Drama of a Feminist', 2006, 1, NULL, 6, 0.99, 86, 20.99,
                 'PG', 'Deleted Scenes,Behind the Scenes'),
                (2, 'ACE GOLDFINGER', 'A Astounding Epistle', 2006, 1, NULL, 3, 4.99, 48, 12.99, 'G', 'Trailers'),
                (3, 'ADAPTATION HOLES', NULL, NULL, 2, 1, 7, 2.99, NULL, 18.99, 'NC-17', NULL);",
        db.name
    ));
    let config = config_at(
        &env,
        &db.url(),
        "",
        "film",
        &format!(
            "stream = \"{}\"\nquery = '''SELECT * FROM film WHERE last_update >= :since'''\n\
             key = \"film_id\"\ncursor = \"last_update\"\nlookback = \"5m\"\nstart = \"beginning\"",
            db.name
        ),
    );
    let out = once_ok(&config);
    assert!(out.contains("3 rows read, 3 emitted"), "{out}");

    let messages = read_stream(&db.name).await;
    let keys: Vec<_> = messages
        .iter()
        .map(|m| m.pkey.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(keys, ["1", "2", "3"]);
    assert_eq!(messages.len(), 3);
    let mut first = of_key(&messages, "1")[0].payload.clone().unwrap();
    let last_update = first
        .as_object_mut()
        .unwrap()
        .remove("last_update")
        .unwrap();
    assert_eq!(
        last_update.as_str().map(micros),
        Some(of_key(&messages, "1")[0].epoch),
        "the epoch is the TIMESTAMP cursor"
    );
    assert_eq!(
        first,
        json!({
            "film_id": 1, "title": "ACADEMY DINOSAUR", "description": "A Epic Drama of a Feminist",
            "release_year": 2006, "language_id": 1, "original_language_id": null, "rental_duration": 6,
            "rental_rate": "0.99", "length": 86, "replacement_cost": "20.99", "rating": "PG",
            "special_features": "Deleted Scenes,Behind the Scenes"
        })
    );
    let third = of_key(&messages, "3")[0].payload.clone().unwrap();
    assert_eq!(
        (
            &third["rating"],
            &third["special_features"],
            &third["release_year"]
        ),
        (&json!("NC-17"), &Value::Null, &Value::Null)
    );
    delete_key(&db.name).await;
}

// ---------------------------------------------------------------------------
// Version cursors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn integer_version_cursor_reads_back_lookback_versions() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_version");
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(20), version BIGINT NOT NULL); \
             INSERT INTO {table} SELECT seq, CONCAT('n', seq), seq FROM seq_1_to_5"
        ),
    )
    .await;
    let config = config(
        &env,
        &table,
        &format!(
            "query = '''SELECT id, name, version FROM {table} WHERE version >= :since'''\n\
             key = \"id\"\ncursor = \"version\"\nlookback = 2"
        ),
    );
    let out = once_ok(&config);
    assert!(out.contains("5 rows read, 5 emitted"), "{out}");
    assert_eq!(watermark(&env, &table).await, 5);

    // Row 1 moves to version 6; a slow writer commits row 6 with version 4,
    // below the watermark but within the look-back of 2 (window: version >= 3).
    mysql_exec(
        &pool,
        &format!("UPDATE {table} SET name = 'v6', version = 6 WHERE id = 1; INSERT INTO {table} VALUES (6, 'late', 4)"),
    )
    .await;
    let out = once_ok(&config);
    assert!(
        out.contains("5 rows read, 2 emitted"),
        "window is version >= 3: {out}"
    );
    let out = once_ok(&config);
    assert!(
        out.contains("4 rows read, 0 emitted"),
        "window is version >= 4: {out}"
    );

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 7);
    assert_eq!(names(&messages, "1"), ["n1", "v6"]);
    assert_eq!(of_key(&messages, "1")[1].epoch, 6);
    assert_eq!(names(&messages, "6"), ["late"]);
    assert_eq!(of_key(&messages, "6")[0].epoch, 4);
}

// ---------------------------------------------------------------------------
// Errors a user sees
// ---------------------------------------------------------------------------

/// A table whose key and cursor may be NULL, and a config polling it with `query`.
async fn nullable(env: &Env, pool: &sqlx::MySqlPool, table: &str, query: &str) -> PathBuf {
    mysql_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id BIGINT NULL, name VARCHAR(20), updated_at DATETIME(6) NULL)"
        ),
    )
    .await;
    config(
        env,
        table,
        &format!(
            "query = '''{}'''\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nstart = \"beginning\"",
            query.replace("TABLE", table)
        ),
    )
}

#[tokio::test]
async fn missing_key_column_is_named() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_nokey");
    let config = nullable(
        &env,
        &pool,
        &table,
        "SELECT name, updated_at FROM TABLE WHERE updated_at >= :since",
    )
    .await;
    assert_eq!(
        one_error_line(&config),
        format!(
            "error: entity {table}: query (inline): the query returns no key column \"id\" (it returns: name, updated_at)"
        )
    );
}

#[tokio::test]
async fn missing_cursor_column_is_named() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_nocursor");
    let config = nullable(
        &env,
        &pool,
        &table,
        "SELECT id, name FROM TABLE WHERE updated_at >= :since",
    )
    .await;
    assert_eq!(
        one_error_line(&config),
        format!(
            "error: entity {table}: query (inline): the query returns no cursor column \"updated_at\" (it returns: id, name)"
        )
    );
}

#[tokio::test]
async fn null_key_is_an_error_naming_entity_and_column() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_nullkey");
    let config = nullable(
        &env,
        &pool,
        &table,
        "SELECT id, name, updated_at FROM TABLE WHERE updated_at >= :since",
    )
    .await;
    mysql_exec(
        &pool,
        &format!("INSERT INTO {table} VALUES (NULL, 'x', NOW(6))"),
    )
    .await;
    // What follows the essentials may show the row itself.
    assert_error_starts(
        &one_error_line(&config),
        &format!("error: entity {table}: row 1 of the window: key column id is NULL"),
    );
    assert!(read_stream(&table).await.is_empty());
}

#[tokio::test]
async fn null_cursor_is_an_error_naming_entity_column_and_key() {
    let env = Env::new();
    let pool = mysql().await;
    let table = unique("my_nullcursor");
    let config = nullable(
        &env,
        &pool,
        &table,
        "SELECT id, name, updated_at FROM TABLE WHERE updated_at >= :since OR updated_at IS NULL",
    )
    .await;
    mysql_exec(&pool, &format!("INSERT INTO {table} VALUES (7, 'x', NULL)")).await;
    assert_error_starts(
        &one_error_line(&config),
        &format!("error: entity {table}: row 1 of the window: cursor column updated_at is NULL in the row with key 7"),
    );
    assert!(read_stream(&table).await.is_empty());
}

/// A config polling a port where no MariaDB listens, failing fast.
fn unreachable(env: &Env, entity: &str) -> PathBuf {
    config_at(
        env,
        "mysql://root@127.0.0.1:1/test",
        "timeout = \"2s\"",
        entity,
        "query = '''SELECT id, updated_at FROM t WHERE updated_at >= :since'''\n\
         key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"",
    )
}

#[tokio::test]
async fn unreachable_mysql_fails_with_one_line_naming_the_source() {
    let env = Env::new();
    let config = unreachable(&env, &unique("my_down"));
    let line = one_error_line(&config);
    assert!(line.starts_with("error: "), "{line}");
    assert!(line.contains("source db"), "names the source: {line}");
}

#[tokio::test]
async fn unreachable_mysql_error_says_why() {
    let env = Env::new();
    let config = unreachable(&env, &unique("my_down"));
    let line = one_error_line(&config);
    assert!(
        line.to_lowercase().contains("connection refused"),
        "says why: {line}"
    );
}
