//! The core guarantees on SQLite files, through the real binary: inserts and
//! updates arrive once and in order, restarts re-emit nothing, a late commit
//! is caught, values map to JSON as documented, and errors say where.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// A test's SQLite file with a table `t` (id, name, updated_at as SQLite's
/// text time), and a config polling it as entity and stream `name`.
struct Fixture {
    /// Owns the temp dir holding the database and the config.
    env: Env,
    pool: sqlx::SqlitePool,
    name: String,
    config: PathBuf,
}

async fn fixture(prefix: &str) -> Fixture {
    let env = Env::new();
    let name = unique(prefix);
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, \
         updated_at TEXT NOT NULL DEFAULT (datetime('now')))",
    )
    .await;
    let config = env.config(&format!(
        r#"
[sources.app]
url = "{}"

[entities.{name}]
source = "app"
query = "SELECT id, name, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        sqlite_url(&db)
    ));
    Fixture {
        env,
        pool,
        name,
        config,
    }
}

/// Inserts rows `first..=last` named `n<id>`, stamped now.
async fn insert(pool: &sqlx::SqlitePool, first: i64, last: i64) {
    sqlx::query(
        "WITH RECURSIVE g(n) AS (SELECT ?1 UNION ALL SELECT n + 1 FROM g WHERE n < ?2) \
         INSERT INTO t (id, name) SELECT n, 'n' || n FROM g",
    )
    .bind(first)
    .bind(last)
    .execute(pool)
    .await
    .expect("insert rows");
}

fn names(messages: &[&Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            m.payload.as_ref().unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The error lines of a failed run's stderr.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test]
async fn thousand_inserts_arrive_once_and_a_second_cycle_adds_nothing() {
    let f = fixture("sl_ins").await;
    insert(&f.pool, 1, 1000).await;

    let out = once_ok(&f.config);
    assert!(out.contains("1000 rows read, 1000 emitted"), "{out}");
    assert_eq!(read_stream(&f.name).await.len(), 1000);

    let out = once_ok(&f.config);
    assert!(out.contains("1000 rows read, 0 emitted"), "{out}");
    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 1000);
    let mut keys: Vec<_> = messages.iter().map(|m| m.pkey.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 1000, "every key exactly once");
    let first = &messages[0];
    assert_eq!(first.variant, f.name);
    assert_eq!(first.op, "upsert");
    let payload = first.payload.as_ref().unwrap();
    assert_eq!(payload["name"], format!("n{}", first.pkey));
    assert_eq!(payload["id"], first.pkey.parse::<i64>().unwrap());
}

#[tokio::test]
async fn updates_arrive_once_each_and_in_order_even_within_one_second() {
    let f = fixture("sl_upd").await;
    insert(&f.pool, 1, 100).await;
    once_ok(&f.config);

    sqlite_exec(
        &f.pool,
        "UPDATE t SET name = name || '-v2', updated_at = datetime('now') WHERE id <= 10",
    )
    .await;
    let out = once_ok(&f.config);
    assert!(out.contains("100 rows read, 10 emitted"), "{out}");
    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 110);
    let mut updated: Vec<_> = messages[100..].iter().map(|m| m.pkey.clone()).collect();
    updated.sort_by_key(|k| k.parse::<i64>().unwrap());
    assert_eq!(updated, (1..=10).map(|i| i.to_string()).collect::<Vec<_>>());

    // Three updates within one second: SQLite's text time has second
    // precision, so they share a cursor value and only the digest tells
    // them apart. The second is taken once so that the tie is certain.
    let now: String = sqlx::query_scalar("SELECT datetime('now')")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    for version in ["a", "b", "c"] {
        sqlx::query("UPDATE t SET name = ?1, updated_at = ?2 WHERE id = 5")
            .bind(format!("five-{version}"))
            .bind(&now)
            .execute(&f.pool)
            .await
            .unwrap();
        let out = once_ok(&f.config);
        assert!(out.contains("1 emitted"), "{out}");
    }
    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 113);
    let five = of_key(&messages, "5");
    assert_eq!(
        names(&five),
        ["n5", "n5-v2", "five-a", "five-b", "five-c"],
        "every version of row 5 once, in commit order"
    );
    assert!(five.windows(2).all(|w| w[0].epoch <= w[1].epoch));
    assert!(
        five[2..].iter().all(|m| m.epoch == five[2].epoch),
        "the three versions share one epoch"
    );
}

#[tokio::test]
async fn restarting_the_agent_re_emits_nothing() {
    let f = fixture("sl_rst").await;
    insert(&f.pool, 1, 50).await;

    let out = once_ok(&f.config);
    assert!(out.contains("50 rows read, 50 emitted"), "{out}");
    let out = once_ok(&f.config);
    assert!(out.contains("50 rows read, 0 emitted"), "{out}");

    let mut agent = Agent::start(&f.config);
    agent
        .wait_for_event(Duration::from_secs(20), "a cycle of `run`", |e| {
            e["message"] == "cycle" && e["entity"] == f.name.as_str()
        })
        .await;
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "run exited with {status}");

    let cycle = &agent.cycles(Some(&f.name))[0];
    assert_eq!(cycle["rows"], 50, "the restarted agent read the window");
    assert_eq!(cycle["emitted"], 0);
    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 50, "nothing emitted twice across restarts");
}

#[tokio::test]
async fn late_commit_within_lookback_is_emitted_once() {
    let f = fixture("sl_late").await;
    insert(&f.pool, 1, 3).await;
    once_ok(&f.config);

    // A writer stamps row 2 and keeps its transaction open while a cycle
    // runs: WAL lets the agent read the snapshot before the update.
    let mut writer = f.pool.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query("UPDATE t SET name = 'late', updated_at = datetime('now') WHERE id = 2")
        .execute(&mut *writer)
        .await
        .unwrap();
    let out = once_ok(&f.config);
    assert!(out.contains("3 rows read, 0 emitted"), "{out}");

    sqlx::query("COMMIT").execute(&mut *writer).await.unwrap();
    drop(writer);
    let out = once_ok(&f.config);
    assert!(out.contains("1 emitted"), "{out}");
    once_ok(&f.config);

    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 4);
    assert_eq!(names(&of_key(&messages, "2")), ["n2", "late"]);
}

#[tokio::test]
async fn a_row_stamped_tomorrow_does_not_hold_back_the_others() {
    let f = fixture("sl_fut").await;
    sqlite_exec(
        &f.pool,
        "INSERT INTO t (id, name, updated_at) VALUES (1, 'tomorrow', datetime('now', '+1 day'));
         INSERT INTO t (id, name) VALUES (2, 'today')",
    )
    .await;
    let out = once_ok(&f.config);
    assert!(out.contains("2 emitted"), "{out}");

    sqlite_exec(
        &f.pool,
        "INSERT INTO t (id, name) VALUES (3, 'later');
         UPDATE t SET name = 'today-2', updated_at = datetime('now') WHERE id = 2",
    )
    .await;
    let out = once_ok(&f.config);
    assert!(out.contains("2 emitted"), "{out}");
    once_ok(&f.config);

    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert_eq!(names(&of_key(&messages, "1")), ["tomorrow"]);
    assert_eq!(names(&of_key(&messages, "2")), ["today", "today-2"]);
    assert_eq!(names(&of_key(&messages, "3")), ["later"]);
}

#[tokio::test]
async fn an_integer_version_cursor_reads_back_lookback_versions() {
    let env = Env::new();
    let name = unique("sl_ver");
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE v (id INTEGER PRIMARY KEY, name TEXT, version INTEGER NOT NULL)",
    )
    .await;
    sqlx::query(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 20) \
         INSERT INTO v SELECT n, 'n' || n, n FROM g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let config = env.config(&format!(
        r#"
[sources.app]
url = "{}"

[entities.{name}]
source = "app"
query = "SELECT id, name, version FROM v WHERE version >= :since"
key = "id"
cursor = "version"
lookback = 10
every = "1s"
"#,
        sqlite_url(&db)
    ));

    let out = once_ok(&config);
    assert!(out.contains("20 rows read, 20 emitted"), "{out}");

    // The watermark is now version 20: the window is version >= 10, so a
    // late version 15 is caught and a late version 5 is out of reach.
    sqlite_exec(&pool, "INSERT INTO v VALUES (21, 'late', 15)").await;
    let out = once_ok(&config);
    assert!(out.contains("12 rows read, 1 emitted"), "{out}");
    sqlite_exec(&pool, "INSERT INTO v VALUES (22, 'too late', 5)").await;
    let out = once_ok(&config);
    assert!(out.contains("12 rows read, 0 emitted"), "{out}");

    sqlite_exec(
        &pool,
        "UPDATE v SET name = 'n3-v2', version = 21 WHERE id = 3",
    )
    .await;
    let out = once_ok(&config);
    assert!(out.contains("13 rows read, 1 emitted"), "{out}");

    let messages = read_stream(&name).await;
    assert_eq!(messages.len(), 22);
    let late = of_key(&messages, "21");
    assert_eq!(late.len(), 1);
    assert_eq!(
        late[0].epoch, 15,
        "the epoch of a version cursor is the version"
    );
    let three = of_key(&messages, "3");
    assert_eq!(names(&three), ["n3", "n3-v2"]);
    assert_eq!(three[1].epoch, 21);
    assert!(of_key(&messages, "22").is_empty());
}

#[tokio::test]
async fn values_map_to_json_as_documented() {
    let env = Env::new();
    let name = unique("sl_types");
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE ty (id INTEGER PRIMARY KEY, born DATETIME, flag BOOLEAN, score REAL, \
         data BLOB, note TEXT, updated_at DATETIME NOT NULL DEFAULT (datetime('now')));
         INSERT INTO ty (id, born, flag, score, data, note) \
         VALUES (1, '2024-02-29 13:45:07', 1, 2.5, x'00ff10', NULL);
         INSERT INTO ty (id, born, flag, score, data, note) \
         VALUES (2, '1999-12-31 23:59:59.250', 0, -0.125, x'', 'text')",
    )
    .await;
    let config = env.config(&format!(
        r#"
[sources.app]
url = "{}"

[entities.{name}]
source = "app"
query = "SELECT id, born, flag, score, data, note, updated_at FROM ty WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        sqlite_url(&db)
    ));
    let out = once_ok(&config);
    assert!(out.contains("2 rows read, 2 emitted"), "{out}");

    let messages = read_stream(&name).await;
    let one = of_key(&messages, "1")[0].payload.clone().unwrap();
    assert_eq!(one["id"], 1);
    assert_eq!(one["born"], "2024-02-29T13:45:07Z");
    assert_eq!(one["flag"], true);
    assert_eq!(one["score"], 2.5);
    assert_eq!(one["data"], "AP8Q");
    assert_eq!(one["note"], serde_json::Value::Null);
    let updated_at = one["updated_at"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(updated_at)
        .unwrap_or_else(|e| panic!("updated_at {updated_at:?} is not RFC 3339: {e}"));
    assert!(updated_at.ends_with('Z'), "{updated_at} is in UTC");
    assert_eq!(
        of_key(&messages, "1")[0].epoch,
        parsed.timestamp_micros(),
        "the epoch is the cursor in microseconds"
    );

    let two = of_key(&messages, "2")[0].payload.clone().unwrap();
    assert_eq!(two["born"], "1999-12-31T23:59:59.250Z");
    assert_eq!(two["flag"], false);
    assert_eq!(two["score"], -0.125);
    assert_eq!(two["data"], "");
    assert_eq!(two["note"], "text");
}

#[tokio::test]
async fn a_query_without_the_key_or_cursor_column_is_refused_naming_it() {
    let f = fixture("sl_cols").await;
    let text = std::fs::read_to_string(&f.config).unwrap();

    std::fs::write(&f.config, text.replace("key = \"id\"", "key = \"code\"")).unwrap();
    let stderr = once_err(&f.config);
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(&format!("entity {}", f.name)), "{stderr}");
    assert!(
        lines[0].contains("no key column \"code\" (it returns: id, name, updated_at)"),
        "{stderr}"
    );

    std::fs::write(
        &f.config,
        text.replace("cursor = \"updated_at\"", "cursor = \"changed_at\""),
    )
    .unwrap();
    let stderr = once_err(&f.config);
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&format!("entity {}", f.name)), "{stderr}");
    assert!(
        lines[0].contains("no cursor column \"changed_at\" (it returns: id, name, updated_at)"),
        "{stderr}"
    );
    assert!(read_stream(&f.name).await.is_empty());
}

#[tokio::test]
async fn a_null_key_is_an_error_naming_entity_and_column() {
    let env = Env::new();
    let name = unique("sl_nullkey");
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE k (code TEXT, updated_at TEXT NOT NULL DEFAULT (datetime('now')));
         INSERT INTO k (code) VALUES ('a');
         INSERT INTO k (code) VALUES (NULL)",
    )
    .await;
    let config = env.config(&format!(
        r#"
[sources.app]
url = "{}"

[entities.{name}]
source = "app"
query = "SELECT code, updated_at FROM k WHERE updated_at >= :since ORDER BY rowid"
key = "code"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        sqlite_url(&db)
    ));
    let stderr = once_err(&config);
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&format!("entity {name}")), "{stderr}");
    assert!(lines[0].contains("row 2"), "{stderr}");
    assert!(lines[0].contains("key column code is NULL"), "{stderr}");
}

#[tokio::test]
async fn a_database_file_that_does_not_exist_fails_naming_the_source() {
    let env = Env::new();
    let name = unique("sl_nofile");
    let missing = env.dir.path().join("no-such.db");
    let config = env.config(&format!(
        r#"
[sources.legacy]
url = "{}"

[entities.{name}]
source = "legacy"
query = "SELECT id, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        sqlite_url(&missing)
    ));
    let stderr = once_err(&config);
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains("source legacy"), "{stderr}");
    assert!(
        lines[0].contains("unable to open database file"),
        "{stderr}"
    );
    assert!(!missing.exists(), "the agent must not create the database");
}

/// A window whose start falls inside a second, on a text cursor bound as
/// `YYYY-MM-DD HH:MM:SS`: the database is asked from the start of that
/// second, so the agent treats the whole second as in the window. A row
/// committed late in that second is emitted once; rows of that second sent
/// by the last cycle are not sent again (the trim kept them); no warning.
#[tokio::test]
async fn a_row_in_the_window_s_first_second_is_emitted_once_without_a_warning() {
    let f = fixture("sl_edge").await;
    let config = f.config.with_file_name("edge.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&f.config).unwrap().replace(
            "lookback = \"5m\"",
            "lookback = \"3500ms\"\nstart = \"beginning\"",
        ),
    )
    .unwrap();
    // One row per second over the last half minute, in whole seconds.
    sqlite_exec(
        &f.pool,
        "WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 30) \
         INSERT INTO t (id, name, updated_at) \
         SELECT n + 1, 'n' || (n + 1), datetime('now', '-' || (30 - n) || ' seconds') FROM g",
    )
    .await;
    let (out, log) = once_logged(&config);
    assert!(out.contains("31 rows read, 31 emitted"), "{out}");
    assert!(!log.contains(BELOW_WINDOW_WARNING), "{log}");

    // The next window starts 3.5 s before the watermark, inside a second.
    let boundary = next_window_second(&f.env, &f.name, 3_500_000).await;
    sqlx::query("INSERT INTO t (id, name, updated_at) VALUES (100, 'late', ?1)")
        .bind(&boundary)
        .execute(&f.pool)
        .await
        .unwrap();
    only_the_late_row_is_emitted_without_a_warning(&config);

    let messages = read_stream(&f.name).await;
    assert_eq!(messages.len(), 32, "31 rows and the late one, each once");
    assert_eq!(of_key(&messages, "100").len(), 1);
    let mut keys: Vec<_> = messages.iter().map(|m| m.pkey.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 32, "no key twice");
}

/// A query that ignores `:since` really returns rows older than the window:
/// those are ignored and the warning says so.
#[tokio::test]
async fn a_query_that_does_not_filter_on_since_is_warned_about() {
    let f = fixture("sl_nofilter").await;
    insert(&f.pool, 1, 3).await;
    once_ok(&f.config);
    sqlite_exec(
        &f.pool,
        "INSERT INTO t (id, name, updated_at) VALUES (4, 'old', datetime('now', '-1 hour'))",
    )
    .await;
    let config = f.config.with_file_name("unfiltered.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&f.config)
            .unwrap()
            .replace(" WHERE updated_at >= :since", ""),
    )
    .unwrap();
    let (out, log) = once_logged(&config);
    assert!(out.contains("4 rows read, 0 emitted"), "{out}");
    assert!(log.contains(BELOW_WINDOW_WARNING), "{log}");
    assert!(
        log.contains("rows=1"),
        "one row is before the window: {log}"
    );
}
