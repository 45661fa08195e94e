//! The core guarantees on PostgreSQL, through the real binary: what arrives
//! on the stream, how many times, in which order, and what the errors say.

// The harness's XRANGE reply type trips clippy's type_complexity.
#[allow(clippy::type_complexity)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

// ---------------------------------------------------------------------------
// Configuration: one source on the test database, one entity.
// ---------------------------------------------------------------------------

/// One entity polling the test database, as TOML settings a test adjusts
/// with [`EntityConfig::set`] (values are TOML literals).
struct EntityConfig {
    name: String,
    redis_url: Option<String>,
    source: Vec<(&'static str, String)>,
    entity: Vec<(&'static str, String)>,
}

impl EntityConfig {
    /// `query` keyed by `id`, cursor `updated_at`, five minutes of look-back.
    fn new(name: &str, query: &str) -> EntityConfig {
        EntityConfig {
            name: name.to_owned(),
            redis_url: None,
            source: vec![("url", toml_string(&pg_url()))],
            entity: vec![
                ("source", toml_string("db")),
                ("query", toml_string(query)),
                ("key", toml_string("id")),
                ("cursor", toml_string("updated_at")),
                ("lookback", toml_string("5m")),
                ("every", toml_string("1s")),
            ],
        }
    }

    /// Sets (or replaces) an entity setting.
    fn set(mut self, field: &'static str, toml_value: &str) -> EntityConfig {
        set_field(&mut self.entity, field, toml_value);
        self
    }

    /// Sets (or replaces) a setting of the source `db`.
    fn source(mut self, field: &'static str, toml_value: &str) -> EntityConfig {
        set_field(&mut self.source, field, toml_value);
        self
    }

    /// Points the agent at another Redis.
    fn redis(mut self, url: &str) -> EntityConfig {
        self.redis_url = Some(url.to_owned());
        self
    }

    /// Writes the config file into the test's directory.
    fn write(&self, env: &Env) -> PathBuf {
        let lines = |fields: &[(&str, String)]| {
            fields
                .iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect::<String>()
        };
        let body = format!(
            "[sources.db]\n{}\n[entities.{}]\n{}",
            lines(&self.source),
            self.name,
            lines(&self.entity)
        );
        match &self.redis_url {
            None => env.config(&body),
            Some(url) => env.file(
                "highwater.toml",
                &format!(
                    "[redis]\nurl = {}\nkey_prefix = {}\n\n{body}",
                    toml_string(url),
                    toml_string(&env.prefix)
                ),
            ),
        }
    }
}

fn set_field(fields: &mut Vec<(&'static str, String)>, field: &'static str, value: &str) {
    match fields.iter_mut().find(|(k, _)| *k == field) {
        Some(slot) => slot.1 = value.to_owned(),
        None => fields.push((field, value.to_owned())),
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The query of a table with an `updated_at` cursor.
fn since_query(table: &str) -> String {
    format!("SELECT * FROM {table} WHERE updated_at >= :since")
}

// ---------------------------------------------------------------------------
// Table shapes: one setup per shape, each returning the entity's settings.
// ---------------------------------------------------------------------------

/// Creates `table` (id, name, updated_at timestamptz) and a config polling it.
async fn setup(env: &Env, pool: &sqlx::PgPool, table: &str) -> PathBuf {
    plain_table(pool, table).await.write(env)
}

/// Creates `table` (id, name, updated_at timestamptz); the entity polls it
/// with `SELECT id, name, updated_at`.
async fn plain_table(pool: &sqlx::PgPool, table: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now())"
        ),
    )
    .await;
    EntityConfig::new(
        table,
        &format!("SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since"),
    )
}

/// Inserts rows `1..=n` named `n<id>`, stamped now.
async fn insert_named(pool: &sqlx::PgPool, table: &str, n: u32) {
    pg_exec(
        pool,
        &format!(
            "INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, {n}) g"
        ),
    )
    .await;
}

/// `UPDATE table SET name = 'name', updated_at = now() WHERE id = id`.
async fn rename(pool: &sqlx::PgPool, table: &str, id: i64, name: &str) {
    sqlx::query(&format!(
        "UPDATE {table} SET name = $1, updated_at = now() WHERE id = $2"
    ))
    .bind(name)
    .bind(id)
    .execute(pool)
    .await
    .expect("update");
}

/// A table without constraints, so that keys and cursors can be NULL; the
/// query returns NULL cursors too, in key order (NULL keys last).
async fn unconstrained_table(pool: &sqlx::PgPool, table: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!("CREATE TABLE {table} (id bigint, name text, updated_at timestamptz)"),
    )
    .await;
    EntityConfig::new(
        table,
        &format!(
            "SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since OR updated_at IS NULL ORDER BY id NULLS LAST"
        ),
    )
}

/// Order lines keyed by (order_id text, line_no int).
async fn order_lines_table(pool: &sqlx::PgPool, table: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (order_id text, line_no int, qty int NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (order_id, line_no))"
        ),
    )
    .await;
    EntityConfig::new(table, &since_query(table)).set("key", r#"["order_id", "line_no"]"#)
}

/// Rows with an integer version cursor (look-back 10 versions) polled from the beginning.
async fn versioned_table(pool: &sqlx::PgPool, table: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, version bigint NOT NULL)"
        ),
    )
    .await;
    EntityConfig::new(
        table,
        &format!("SELECT id, name, version FROM {table} WHERE version >= :since"),
    )
    .set("cursor", &toml_string("version"))
    .set("lookback", "10")
    .set("start", &toml_string("beginning"))
}

/// Rows with a boolean soft-delete flag as the delete column.
async fn soft_delete_table(pool: &sqlx::PgPool, table: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, deleted boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now())"
        ),
    )
    .await;
    EntityConfig::new(table, &since_query(table)).set("delete_column", &toml_string("deleted"))
}

/// A naive `timestamp` cursor, read in the source's `timezone`.
async fn naive_time_table(pool: &sqlx::PgPool, table: &str, timezone: &str) -> EntityConfig {
    pg_exec(
        pool,
        &format!("CREATE TABLE {table} (id bigint PRIMARY KEY, ts timestamp NOT NULL)"),
    )
    .await;
    EntityConfig::new(
        table,
        &format!("SELECT id, ts FROM {table} WHERE ts >= :since"),
    )
    .set("cursor", &toml_string("ts"))
    .source("timezone", &toml_string(timezone))
}

// ---------------------------------------------------------------------------
// Reading what arrived.
// ---------------------------------------------------------------------------

/// The `name` of each message of `pkey`, in stream order.
fn names(messages: &[Message], pkey: &str) -> Vec<String> {
    of_key(messages, pkey)
        .iter()
        .map(|m| {
            let payload = m.payload.as_ref().expect("payload");
            payload["name"]
                .as_str()
                .unwrap_or("<not a string>")
                .to_owned()
        })
        .collect()
}

/// The keys of the messages, in stream order.
fn pkeys(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.pkey.clone()).collect()
}

/// One field of the entity's state hash.
async fn state_field(env: &Env, stream: &str, entity: &str, field: &str) -> Option<String> {
    let mut conn = redis_conn().await;
    redis::cmd("HGET")
        .arg(format!("{}:{{{stream}}}:state:{entity}", env.prefix))
        .arg(field)
        .query_async(&mut conn)
        .await
        .expect("HGET state")
}

/// Microseconds since 1970 of an RFC 3339 time.
fn epoch_of(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339")
        .timestamp_micros()
}

// ---------------------------------------------------------------------------
// `highwater run` as a child process.
// ---------------------------------------------------------------------------

/// A running `highwater run`; killed if the test fails while it runs.
struct RunningAgent {
    child: Child,
    log: PathBuf,
}

impl RunningAgent {
    fn start(env: &Env, config: &Path) -> RunningAgent {
        let log = env.dir.path().join(format!("{}.log", unique("run")));
        let child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("HIGHWATER_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log file"))
            .spawn()
            .expect("start highwater run");
        RunningAgent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most 10 s) for the agent to exit, which it must with status 0.
    async fn terminate(mut self) {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for highwater run") {
                assert!(
                    status.success(),
                    "SIGTERM must end highwater run with status 0, got {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "highwater run did not exit within 10 s of SIGTERM; log:\n{}",
                self.log()
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
    }
}

// ---------------------------------------------------------------------------
// Inserts, updates and their order.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn thousand_inserts_arrive_once_and_a_second_cycle_adds_nothing() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_ins");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 1000).await;

    let out = once_ok(&config);
    assert!(out.contains("1000 rows read, 1000 emitted"), "{out}");
    assert_eq!(read_stream(&table).await.len(), 1000);

    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 1000);
    let mut keys: Vec<_> = messages.iter().map(|m| m.pkey.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 1000, "every key exactly once");
    let first = &messages[0];
    assert_eq!(first.variant, table);
    assert_eq!(first.op, "upsert");
    let payload = first.payload.as_ref().unwrap();
    assert_eq!(payload["name"], format!("n{}", first.pkey));
}

#[tokio::test]
async fn updating_ten_of_a_hundred_rows_emits_exactly_those_ten() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_upd");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 100).await;
    once_ok(&config);

    pg_exec(
        &pool,
        &format!("UPDATE {table} SET name = 'u' || id, updated_at = now() WHERE id % 10 = 0"),
    )
    .await;
    let out = once_ok(&config);
    assert!(
        out.contains("100 rows read, 10 emitted, 90 skipped"),
        "{out}"
    );

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 110);
    let new = &messages[100..];
    let expected: Vec<String> = (1..=10).map(|i| (i * 10).to_string()).collect();
    let mut keys = pkeys(new);
    keys.sort_by_key(|k| k.parse::<i64>().unwrap());
    assert_eq!(keys, expected);
    for m in new {
        assert_eq!(m.payload.as_ref().unwrap()["name"], format!("u{}", m.pkey));
    }
}

#[tokio::test]
async fn successive_updates_of_a_row_arrive_in_update_order() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_order");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 10).await;
    once_ok(&config);

    for version in ["v1", "v2", "v3"] {
        rename(&pool, &table, 5, version).await;
        once_ok(&config);
    }

    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "5"), ["n5", "v1", "v2", "v3"]);
    assert_eq!(messages.len(), 13, "only row 5 changed");
    let epochs: Vec<i64> = of_key(&messages, "5").iter().map(|m| m.epoch).collect();
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
}

// ---------------------------------------------------------------------------
// Restarts.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn restarting_the_agent_with_the_same_redis_emits_nothing_again() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_restart");
    let config = plain_table(&pool, &table)
        .await
        .set("every", &toml_string("200ms"))
        .write(&env);
    insert_named(&pool, &table, 20).await;

    let agent = RunningAgent::start(&env, &config);
    eventually(
        Duration::from_secs(20),
        "all 20 rows on the stream",
        || async { read_stream(&table).await.len() >= 20 },
    )
    .await;
    agent.terminate().await;
    let before = read_stream(&table).await;
    assert_eq!(before.len(), 20);

    // Let the restarted agent run two cycles: the recorded cycle start time changes twice.
    let last_started = || state_field(&env, &table, &table, "last_started_at_ms");
    let mut last = last_started().await;
    assert!(last.is_some(), "the first run recorded its cycles");
    let agent = RunningAgent::start(&env, &config);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut cycles = 0;
    while cycles < 2 {
        assert!(
            Instant::now() < deadline,
            "timed out after 20 s waiting for two cycles of the restarted agent; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = last_started().await;
        if now != last {
            cycles += 1;
            last = now;
        }
    }
    agent.terminate().await;

    let after = read_stream(&table).await;
    assert_eq!(
        after.len(),
        before.len(),
        "the restart re-emitted keys {:?}",
        pkeys(&after[before.len().min(after.len())..])
    );
    assert_eq!(after, before);
}

// ---------------------------------------------------------------------------
// Transactions and clocks.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn late_commit_within_lookback_is_emitted_once() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_late");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 3).await;
    once_ok(&config);

    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "UPDATE {table} SET name = 'late', updated_at = now() WHERE id = 2"
    ))
    .execute(&mut *tx)
    .await
    .expect("update in transaction");
    let out = once_ok(&config);
    assert!(out.contains("3 rows read, 0 emitted"), "uncommitted: {out}");

    tx.commit().await.expect("commit");
    let out = once_ok(&config);
    assert!(out.contains("1 emitted"), "after the commit: {out}");
    let out = once_ok(&config);
    assert!(out.contains("0 emitted"), "a third cycle: {out}");

    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "2"), ["n2", "late"]);
    assert_eq!(messages.len(), 4);
}

#[tokio::test]
async fn a_version_committed_after_a_newer_stamped_one_is_emitted_last() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_commit_order");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 1).await;
    once_ok(&config);

    // A's now() is fixed at its start, before B runs.
    let mut a = pool.begin().await.expect("begin A");
    sqlx::query("SELECT now()")
        .execute(&mut *a)
        .await
        .expect("A: now()");
    rename(&pool, &table, 1, "B").await;
    once_ok(&config);
    sqlx::query(&format!(
        "UPDATE {table} SET name = 'A', updated_at = now() WHERE id = 1"
    ))
    .execute(&mut *a)
    .await
    .expect("A: update");
    a.commit().await.expect("commit A");
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "1"), ["n1", "B", "A"]);
    let row = of_key(&messages, "1");
    let (b, a) = (row[1].epoch, row[2].epoch);
    assert!(a < b, "A's stamp ({a}) is older than B's ({b})");
}

#[tokio::test]
async fn a_row_stamped_in_the_future_does_not_hide_later_changes() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_future");
    let config = setup(&env, &pool, &table).await;
    insert_named(&pool, &table, 3).await;
    pg_exec(
        &pool,
        &format!("UPDATE {table} SET updated_at = now() + interval '1 day' WHERE id = 1"),
    )
    .await;
    let out = once_ok(&config);
    assert!(out.contains("3 emitted"), "{out}");

    for (id, name) in [(2, "x2"), (3, "x3"), (2, "y2")] {
        rename(&pool, &table, id, name).await;
        let out = once_ok(&config);
        assert!(out.contains("1 emitted"), "update of {id}: {out}");
    }
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (4, 'n4')"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(of_key(&messages, "1").len(), 1, "the future row once");
    assert_eq!(names(&messages, "2"), ["n2", "x2", "y2"]);
    assert_eq!(names(&messages, "3"), ["n3", "x3"]);
    assert_eq!(names(&messages, "4"), ["n4"]);
}

// ---------------------------------------------------------------------------
// Keys, payloads, deletes.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_composite_key_is_a_json_array() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_lines");
    let config = order_lines_table(&pool, &table).await.write(&env);
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (order_id, line_no, qty) VALUES ('o-1', 3, 7)"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(pkeys(&messages), [r#"["o-1",3]"#]);
    let payload = messages[0].payload.as_ref().unwrap();
    assert_eq!(payload["order_id"], "o-1");
    assert_eq!(payload["line_no"], 3);
    assert_eq!(payload["qty"], 7);
}

#[tokio::test]
async fn null_in_a_column_is_null_in_the_payload() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_null");
    let config = setup(&env, &pool, &table).await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, NULL)"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    let payload = messages[0].payload.as_ref().unwrap();
    assert!(payload.get("name").is_some(), "{payload}");
    assert_eq!(payload["name"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_soft_deleted_row_arrives_with_op_delete() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_softdel");
    let config = soft_delete_table(&pool, &table).await.write(&env);
    insert_named(&pool, &table, 3).await;
    once_ok(&config);
    pg_exec(
        &pool,
        &format!("UPDATE {table} SET deleted = true, updated_at = now() WHERE id = 2"),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    let ops: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m.pkey.as_str(), m.op.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("1", "upsert"),
            ("2", "upsert"),
            ("3", "upsert"),
            ("2", "delete")
        ]
    );
    assert_eq!(messages[3].payload.as_ref().unwrap()["deleted"], true);
}

#[tokio::test]
async fn payload_key_sends_messages_without_a_payload() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_keyonly");
    let config = plain_table(&pool, &table)
        .await
        .set("payload", &toml_string("key"))
        .write(&env);
    insert_named(&pool, &table, 2).await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(pkeys(&messages), ["1", "2"]);
    assert!(messages.iter().all(|m| m.payload.is_none()), "{messages:?}");
}

// ---------------------------------------------------------------------------
// Types.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_mapped_column_type_arrives_as_its_json_value() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_types");
    pg_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (
                id int PRIMARY KEY,
                c_smallint smallint, c_int int, c_bigint bigint, c_numeric numeric(30,10),
                c_real real, c_double double precision, c_bool boolean,
                c_text text, c_varchar varchar(20),
                c_timestamptz timestamptz, c_timestamp timestamp, c_date date, c_uuid uuid,
                c_json json, c_jsonb jsonb, c_bytea bytea,
                updated_at timestamptz NOT NULL)"
        ),
    )
    .await;
    pg_exec(
        &pool,
        &format!(
            r#"INSERT INTO {table} VALUES (1,
                -32768, 2147483647, 9007199254740993, 12345678901234567890.1234567890,
                0.1, -1.0000000000000002, true,
                'é "quoted"\', 'hello',
                '2024-03-01 12:00:00.123456+00', '2024-03-01 12:00:00.5', '2024-02-29',
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                '{{"a": [1, 2, {{"b": null}}]}}', '{{"k": {{"n": 1.5, "s": "x"}}}}', '\x00ff10',
                '2024-03-01 12:00:00+00')"#
        ),
    )
    .await;
    let config = EntityConfig::new(&table, &since_query(&table))
        .set("start", &toml_string("beginning"))
        .write(&env);
    once_ok(&config);

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].epoch, epoch_of("2024-03-01T12:00:00Z"));
    assert_eq!(
        messages[0].payload.as_ref().unwrap(),
        &json!({
            "id": 1,
            "c_smallint": -32768,
            "c_int": 2147483647,
            "c_bigint": 9007199254740993i64,
            "c_numeric": "12345678901234567890.1234567890",
            "c_real": 0.1,
            "c_double": -1.0000000000000002,
            "c_bool": true,
            "c_text": "é \"quoted\"\\",
            "c_varchar": "hello",
            "c_timestamptz": "2024-03-01T12:00:00.123456Z",
            "c_timestamp": "2024-03-01T12:00:00.500Z",
            "c_date": "2024-02-29",
            "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "c_json": {"a": [1, 2, {"b": null}]},
            "c_jsonb": {"k": {"n": 1.5, "s": "x"}},
            "c_bytea": "AP8Q",
            "updated_at": "2024-03-01T12:00:00Z",
        })
    );
}

#[tokio::test]
async fn naive_timestamps_are_read_in_the_source_time_zone() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_berlin");
    let config = naive_time_table(&pool, &table, "Europe/Berlin")
        .await
        .set("start", &toml_string("beginning"))
        .write(&env);
    // Summer time (UTC+2) and winter time (UTC+1).
    pg_exec(
        &pool,
        &format!(
            "INSERT INTO {table} VALUES (1, '2024-07-01 14:00:00'), (2, '2024-01-15 14:00:00')"
        ),
    )
    .await;
    once_ok(&config);

    let messages = read_stream(&table).await;
    let summer = of_key(&messages, "1")[0];
    assert_eq!(summer.epoch, epoch_of("2024-07-01T12:00:00Z"));
    assert_eq!(
        summer.payload.as_ref().unwrap()["ts"],
        "2024-07-01T12:00:00Z"
    );
    let winter = of_key(&messages, "2")[0];
    assert_eq!(winter.epoch, epoch_of("2024-01-15T13:00:00Z"));
    assert_eq!(
        winter.payload.as_ref().unwrap()["ts"],
        "2024-01-15T13:00:00Z"
    );
}

/// In a zone behind UTC, a window bound as UTC wall-clock time would start
/// hours after the local time of a fresh change and miss it.
#[tokio::test]
async fn naive_cursor_windows_are_bound_in_the_source_time_zone() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_newyork");
    let config = naive_time_table(&pool, &table, "America/New_York")
        .await
        .write(&env);
    let insert_local_now = |id: i64| {
        format!("INSERT INTO {table} VALUES ({id}, now() AT TIME ZONE 'America/New_York')")
    };
    pg_exec(&pool, &insert_local_now(1)).await;
    once_ok(&config);
    pg_exec(&pool, &insert_local_now(2)).await;
    once_ok(&config);

    assert_eq!(pkeys(&read_stream(&table).await), ["1", "2"]);
}

#[tokio::test]
async fn other_types_arrive_as_their_text_form() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_other");
    let (mood, positive) = (format!("{table}_mood"), format!("{table}_pos"));
    pg_exec(
        &pool,
        &format!(
            "CREATE TYPE {mood} AS ENUM ('sad', 'happy');
             CREATE DOMAIN {positive} AS integer CHECK (VALUE > 0);
             CREATE TABLE {table} (
                id int PRIMARY KEY, c_enum {mood}, c_array text[], c_domain {positive},
                c_tsvector tsvector, c_interval interval, c_inet inet, c_money money,
                updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO {table} (id, c_enum, c_array, c_domain, c_tsvector, c_interval, c_inet, c_money)
             VALUES (1, 'happy', ARRAY['a', 'b c'], 5, to_tsvector('simple', 'hello world'),
                     '1 day 02:03:04', '192.168.0.1/24', 12.34)"
        ),
    )
    .await;
    // Money's text form follows the server's lc_monetary.
    let money: String = sqlx::query_scalar("SELECT 12.34::money::text")
        .fetch_one(&pool)
        .await
        .expect("money text");
    let config = EntityConfig::new(&table, &since_query(&table)).write(&env);
    once_ok(&config);

    let messages = read_stream(&table).await;
    let payload = messages[0].payload.as_ref().unwrap();
    assert_eq!(payload["c_enum"], "happy");
    assert_eq!(payload["c_array"], r#"{a,"b c"}"#);
    // PostgreSQL describes a domain column by its base type: an integer.
    assert_eq!(payload["c_domain"], 5);
    assert_eq!(payload["c_tsvector"], "'hello':1 'world':2");
    assert_eq!(payload["c_interval"], "1 day 02:03:04");
    assert_eq!(payload["c_inet"], "192.168.0.1/24");
    assert_eq!(payload["c_money"], money);
}

/// A database of the sakila sample, dropped when the test ends.
struct SakilaDatabase {
    name: String,
}

impl SakilaDatabase {
    /// The sakila sample (BSD, tests/data/sakila/LICENSE).
    const DIR: &'static str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sakila");

    fn load() -> SakilaDatabase {
        let db = SakilaDatabase {
            name: unique("hw_sakila"),
        };
        psql(&pg_url(), &["-c", &format!("CREATE DATABASE {}", db.name)]);
        for file in [
            "postgres-sakila-schema.sql",
            "postgres-sakila-insert-data-using-copy.sql",
        ] {
            psql(&db.url(), &["-f", &format!("{}/{file}", Self::DIR)]);
        }
        db
    }

    fn url(&self) -> String {
        let url = pg_url();
        let (server, _) = url.rsplit_once('/').expect("a database in the URL");
        format!("{server}/{}", self.name)
    }
}

impl Drop for SakilaDatabase {
    fn drop(&mut self) {
        psql(
            &pg_url(),
            &[
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ],
        );
    }
}

/// Runs psql quietly, stopping at the first error.
fn psql(url: &str, args: &[&str]) {
    let out = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", url])
        .args(args)
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_sakila_film_arrives_with_select_star() {
    let env = Env::new();
    let sakila = SakilaDatabase::load();
    let stream = unique("pg_sakila_film");
    let config = EntityConfig::new("film", "SELECT * FROM film WHERE last_update >= :since")
        .source("url", &toml_string(&sakila.url()))
        .set("key", &toml_string("film_id"))
        .set("cursor", &toml_string("last_update"))
        .set("start", &toml_string("beginning"))
        .set("stream", &toml_string(&stream))
        .write(&env);
    let out = once_ok(&config);
    assert!(out.contains("1000 rows read, 1000 emitted"), "{out}");

    let messages = read_stream(&stream).await;
    let mut keys: Vec<i64> = messages.iter().map(|m| m.pkey.parse().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, (1..=1000).collect::<Vec<_>>());
    let film = of_key(&messages, "1")[0];
    assert_eq!(film.epoch, epoch_of("2006-02-15T05:03:42Z"));
    let payload = film.payload.as_ref().unwrap();
    assert_eq!(payload["title"], "ACADEMY DINOSAUR");
    assert_eq!(payload["release_year"], 2006);
    assert_eq!(payload["rental_rate"], "0.99");
    assert_eq!(payload["rating"], "PG");
    assert_eq!(
        payload["special_features"],
        r#"{"Deleted Scenes","Behind the Scenes"}"#
    );
    assert_eq!(payload["last_update"], "2006-02-15T05:03:42Z");
    let fulltext = payload["fulltext"].as_str().expect("tsvector as text");
    assert!(fulltext.contains("'dinosaur':2"), "{fulltext}");
}

// ---------------------------------------------------------------------------
// Integer cursors.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn integer_cursor_emits_inserts_and_version_bumps_once() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_version");
    let config = versioned_table(&pool, &table).await.write(&env);
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} SELECT g, 'n' || g, g FROM generate_series(1, 30) g"),
    )
    .await;
    let out = once_ok(&config);
    assert!(out.contains("30 rows read, 30 emitted"), "{out}");

    // The window is now version >= 20: rows 20..=30 are read again and skipped.
    let out = once_ok(&config);
    assert!(out.contains("11 rows read, 0 emitted"), "{out}");

    pg_exec(
        &pool,
        &format!(
            "UPDATE {table} SET name = 'bumped', version = 31 WHERE id = 3;
             INSERT INTO {table} VALUES (31, 'n31', 32)"
        ),
    )
    .await;
    let out = once_ok(&config);
    assert!(out.contains("2 emitted"), "{out}");
    let out = once_ok(&config);
    assert!(out.contains("0 emitted"), "{out}");

    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 32);
    assert_eq!(names(&messages, "3"), ["n3", "bumped"]);
    assert_eq!(of_key(&messages, "3")[1].epoch, 31);
    assert_eq!(names(&messages, "31"), ["n31"]);
}

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_query_without_the_key_column_is_refused_naming_entity_and_column() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_nokey");
    let config = plain_table(&pool, &table)
        .await
        .set(
            "query",
            &toml_string(&format!(
                "SELECT name, updated_at FROM {table} WHERE updated_at >= :since"
            )),
        )
        .write(&env);
    let stderr = once_err(&config);
    assert!(stderr.contains(&format!("entity {table}")), "{stderr}");
    assert!(stderr.contains(r#"no key column "id""#), "{stderr}");
}

#[tokio::test]
async fn a_query_without_the_cursor_column_is_refused_naming_it() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_nocursor");
    let config = plain_table(&pool, &table)
        .await
        .set(
            "query",
            &toml_string(&format!(
                "SELECT id, name FROM {table} WHERE updated_at >= :since"
            )),
        )
        .write(&env);
    let stderr = once_err(&config);
    assert!(stderr.contains(&format!("entity {table}")), "{stderr}");
    assert!(
        stderr.contains(r#"no cursor column "updated_at""#),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_null_key_fails_the_cycle_naming_entity_column_and_row() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_nullkey");
    let config = unconstrained_table(&pool, &table).await.write(&env);
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} VALUES (1, 'a', now()), (NULL, 'b', now())"),
    )
    .await;
    let stderr = once_err(&config);
    assert!(
        stderr.contains(&format!("entity {table}: row 2 of the window")),
        "{stderr}"
    );
    assert!(stderr.contains("key column id is NULL"), "{stderr}");
}

#[tokio::test]
async fn a_null_cursor_fails_the_cycle_naming_column_and_key() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_nullcursor");
    let config = unconstrained_table(&pool, &table).await.write(&env);
    pg_exec(&pool, &format!("INSERT INTO {table} VALUES (7, 'a', NULL)")).await;
    let stderr = once_err(&config);
    assert!(stderr.contains(&format!("entity {table}")), "{stderr}");
    assert!(
        stderr.contains("cursor column updated_at is NULL in the row with key 7"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_database_fails_with_one_line_naming_the_source() {
    let env = Env::new();
    let config = EntityConfig::new("items", "SELECT 1 AS id, now() AS updated_at")
        .source("url", &toml_string("postgres://postgres@127.0.0.1:1/test"))
        .source("timeout", &toml_string("2s"))
        .write(&env);
    let stderr = once_err(&config);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("source db"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_database_is_reported_as_a_refused_connection() {
    let env = Env::new();
    let config = EntityConfig::new("items", "SELECT 1 AS id, now() AS updated_at")
        .source("url", &toml_string("postgres://postgres@127.0.0.1:1/test"))
        .source("timeout", &toml_string("2s"))
        .write(&env);
    let stderr = once_err(&config);
    assert!(
        stderr.contains("source db (postgres://postgres@127.0.0.1:1/test): cannot connect"),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_unreachable_redis_fails_with_one_line() {
    let env = Env::new();
    let config = EntityConfig::new("items", "SELECT 1 AS id, now() AS updated_at")
        .redis("redis://127.0.0.1:1/0")
        .write(&env);
    let stderr = once_err(&config);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: redis (redis://127.0.0.1:1/0)"),
        "{stderr}"
    );
}
