//! Operating highwater, through the real binary against the real servers:
//! `check`, `status`, `tail`, `wait`, `run`'s `/metrics` and `/healthz`,
//! JSON logs, progress lines and password masking.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;

const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_cli(args: &[&str]) -> (Output, String, String) {
    let out = highwater(args);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    (out, stdout, stderr)
}

/// `highwater check --config <config>`: exit status and stdout.
fn check(config: &Path) -> (bool, String) {
    let (out, stdout, _) = run_cli(&["check", "--config", config.to_str().unwrap()]);
    (out.status.success(), stdout)
}

/// The report line that starts with `level: ` and contains every `needle`.
fn line_with<'a>(report: &'a str, level: &str, needles: &[&str]) -> Option<&'a str> {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{level}: ")) && needles.iter().all(|n| l.contains(n)))
}

fn assert_line(report: &str, level: &str, needles: &[&str]) {
    assert!(
        line_with(report, level, needles).is_some(),
        "no `{level}:` line containing {needles:?} in:\n{report}"
    );
}

/// Polls `path` until `check` accepts the answer; returns it.
async fn http_until(
    port: u16,
    path: &str,
    what: &str,
    check: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok((status, body)) = http_get(port, path) {
            if check(status, &body) {
                return (status, body);
            }
            last = Some((status, body));
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}; last answer: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A child process whose stdout and stderr are collected as they come.
struct Child {
    child: std::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Child {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_highwater"));
        command
            .args(args)
            .env_remove("HIGHWATER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start highwater");
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let buffer = Arc::new(Mutex::new(String::new()));
            let sink = Arc::clone(&buffer);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buffer
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Child {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&str, &str) -> bool) {
        let start = Instant::now();
        while !check(&self.stdout(), &self.stderr()) {
            assert!(
                start.elapsed() < DEADLINE,
                "timed out after {DEADLINE:?} waiting for {what};\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON values printed one after another (`tail`'s output).
fn json_values(text: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<serde_json::Value>()
        .map_while(Result::ok)
        .collect()
}

/// A PostgreSQL table `(id bigint, name text, updated_at timestamptz)`,
/// with an index on the cursor when `indexed`.
async fn pg_table(pool: &sqlx::PgPool, table: &str, indexed: bool) {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now())"
        ),
    )
    .await;
    if indexed {
        pg_exec(pool, &format!("CREATE INDEX ON {table} (updated_at)")).await;
    }
}

/// A MariaDB table `(id, name, changed_at datetime(6))`.
async fn mysql_table(pool: &sqlx::MySqlPool, table: &str, indexed: bool) {
    let index = if indexed { ", KEY (changed_at)" } else { "" };
    mysql_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name varchar(50), changed_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6){index})"
        ),
    )
    .await;
}

/// An `[entities.<name>]` table polling PostgreSQL table `table`.
fn pg_entity(name: &str, source: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
[entities.{name}]
source = "{source}"
query = "SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
{extra}
"#
    )
}

fn mysql_entity(name: &str, source: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
[entities.{name}]
source = "{source}"
query = "SELECT id, name, changed_at FROM {table} WHERE changed_at >= :since"
key = "id"
cursor = "changed_at"
lookback = "5m"
every = "1s"
{extra}
"#
    )
}

fn source(name: &str, url: &str) -> String {
    format!("\n[sources.{name}]\nurl = \"{url}\"\n")
}

const NO_HTTP: &str = "\n[http]\nlisten = \"\"\n";

/// A PostgreSQL table with an index, and a config with one entity on it.
async fn pg_setup(env: &Env, prefix: &str, extra: &str) -> (sqlx::PgPool, String, PathBuf) {
    let pool = pg().await;
    let table = unique(prefix);
    pg_table(&pool, &table, true).await;
    let config = env.config(&format!(
        "{NO_HTTP}{}{}",
        source("db", &pg_url()),
        pg_entity(&table, "db", &table, extra)
    ));
    (pool, table, config)
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[tokio::test]
async fn check_passes_a_sound_config_and_names_each_server_version() {
    let env = Env::new();
    let (pg, my) = (pg().await, mysql().await);
    let (pg_t, my_t) = (unique("chk_pg_ok"), unique("chk_my_ok"));
    pg_table(&pg, &pg_t, true).await;
    mysql_table(&my, &my_t, true).await;
    let config = env.config(&format!(
        "{}{}{}{}",
        source("pg", &pg_url()),
        source("my", &mysql_url()),
        pg_entity(&pg_t, "pg", &pg_t, ""),
        mysql_entity(&my_t, "my", &my_t, "")
    ));

    let (ok, report) = check(&config);

    assert!(ok, "a sound config passes:\n{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("error: ")),
        "{report}"
    );
    assert_line(&report, "ok", &["redis (", "connected, Redis "]);
    assert_line(&report, "ok", &["source pg (", "connected, PostgreSQL "]);
    assert_line(&report, "ok", &["source my (", "connected, ", "MariaDB"]);
    assert_line(&report, "ok", &["source pg: clock", "this machine's"]);
    assert_line(&report, "ok", &["source my: clock"]);
    for (entity, key_type, cursor_type) in [
        (&pg_t, "id (int8)", "updated_at (timestamptz)"),
        (&my_t, "id (bigint)", "changed_at (datetime)"),
    ] {
        assert_line(
            &report,
            "ok",
            &[
                &format!("entity {entity}: query prepares"),
                key_type,
                cursor_type,
            ],
        );
        assert_line(
            &report,
            "ok",
            &[&format!("entity {entity}: the window query uses an index")],
        );
        assert_line(
            &report,
            "ok",
            &[&format!(
                "entity {entity}: stream and state keys share cluster slot"
            )],
        );
    }
    assert!(
        report.lines().last().unwrap().ends_with(", 0 errors"),
        "{report}"
    );
}

#[tokio::test]
async fn check_warns_about_an_unindexed_cursor_naming_the_table() {
    let env = Env::new();
    let (pg, my) = (pg().await, mysql().await);
    let (pg_t, my_t) = (unique("chk_pg_noidx"), unique("chk_my_noidx"));
    pg_table(&pg, &pg_t, false).await;
    mysql_table(&my, &my_t, false).await;
    let config = env.config(&format!(
        "{}{}{}{}",
        source("pg", &pg_url()),
        source("my", &mysql_url()),
        pg_entity(&pg_t, "pg", &pg_t, ""),
        mysql_entity(&my_t, "my", &my_t, "")
    ));

    let (ok, report) = check(&config);

    assert!(ok, "warnings alone do not fail the check:\n{report}");
    assert_line(
        &report,
        "warning",
        &[
            &format!("entity {pg_t}: the window query reads table {pg_t} in full"),
            "index its cursor column updated_at",
        ],
    );
    assert_line(
        &report,
        "warning",
        &[
            &format!("entity {my_t}: the window query reads table {my_t} in full"),
            "index its cursor column changed_at",
        ],
    );
}

#[tokio::test]
async fn check_reports_a_query_missing_its_cursor_column_as_an_error() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("chk_nocol");
    pg_table(&pool, &table, true).await;
    let config = env.config(&format!(
        r#"{}
[entities.{table}]
source = "pg"
query = "SELECT id, name FROM {table} WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        source("pg", &pg_url())
    ));

    let (ok, report) = check(&config);

    assert!(!ok, "an error fails the check:\n{report}");
    assert_line(
        &report,
        "error",
        &[
            &format!("entity {table}: query (inline)"),
            "no cursor column \"updated_at\"",
            "it returns: id, name",
        ],
    );
}

#[tokio::test]
async fn check_reports_an_unreachable_source_and_skips_its_entities() {
    let env = Env::new();
    let port = free_port();
    let config = env.config(&format!(
        "{}{}",
        source("down", &format!("postgres://app@127.0.0.1:{port}/app")),
        pg_entity("invoices", "down", "invoices", "")
    ));

    let (ok, report) = check(&config);

    assert!(!ok, "{report}");
    assert_line(
        &report,
        "error",
        &[&format!(
            "source down (postgres://app@127.0.0.1:{port}/app): cannot connect"
        )],
    );
    assert_line(
        &report,
        "skipped",
        &["entity invoices: query not checked: source down is unreachable"],
    );
}

#[tokio::test]
async fn check_reports_every_problem_at_once_one_line_each() {
    let env = Env::new();
    let (pg, my) = (pg().await, mysql().await);
    let good = unique("chk_all_good");
    let unindexed = unique("chk_all_noidx");
    let broken = unique("chk_all_broken");
    pg_table(&pg, &good, true).await;
    pg_table(&pg, &broken, true).await;
    mysql_table(&my, &unindexed, false).await;
    let port = free_port();
    let config = env.config(&format!(
        r#"{}{}{}{}{}{}
[entities.{broken}]
source = "pg"
query = "SELECT id, updated_at FROM {broken} WHERE updated_at >= :since"
key = "customer_id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        source("pg", &pg_url()),
        source("my", &mysql_url()),
        source("down", &format!("mysql://root@127.0.0.1:{port}/x")),
        pg_entity(&good, "pg", &good, ""),
        mysql_entity(&unindexed, "my", &unindexed, ""),
        mysql_entity("ghost", "down", "ghost", ""),
    ));

    let (ok, report) = check(&config);

    assert!(!ok, "{report}");
    assert_line(
        &report,
        "ok",
        &[&format!("entity {good}: the window query uses an index")],
    );
    assert_line(
        &report,
        "warning",
        &[&format!("reads table {unindexed} in full")],
    );
    assert_line(
        &report,
        "error",
        &[
            &format!("entity {broken}: query (inline)"),
            "no key column \"customer_id\"",
        ],
    );
    assert_line(&report, "error", &["source down (", "cannot connect"]);
    assert_line(&report, "skipped", &["entity ghost: query not checked"]);
    let summary = report.lines().last().unwrap();
    assert!(
        summary.contains(", 2 errors") && summary.contains("1 skipped"),
        "{summary}"
    );
}

#[tokio::test]
async fn check_lists_each_config_problem_on_its_own_line() {
    let env = Env::new();
    let config = env.config(
        r#"
[sources.pg]
url = "postgres://x@127.0.0.1/x"

[entities.a]
source = "nowhere"
query = "SELECT 1"
key = "id"
cursor = "t"
lookback = "5m"
schedule = "*/5 * *"
"#,
    );

    let (ok, report) = check(&config);

    assert!(!ok, "{report}");
    let errors: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 2, "{report}");
    assert!(
        errors[0].contains("entities.a.source: no source named \"nowhere\""),
        "{report}"
    );
    assert!(
        errors[1].contains("entities.a.schedule: \"*/5 * *\" is not a cron expression"),
        "{report}"
    );
}

#[tokio::test]
async fn check_says_whether_the_window_reaches_back_to_an_open_transaction() {
    let env = Env::new();
    let (pg, my) = (pg().await, mysql().await);
    let (pg_t, my_t) = (unique("chk_pg_tx"), unique("chk_my_tx"));
    pg_table(&pg, &pg_t, true).await;
    mysql_table(&my, &my_t, true).await;
    pg_exec(
        &pg,
        &format!("INSERT INTO {pg_t} (id, name) VALUES (1, 'a')"),
    )
    .await;
    mysql_exec(
        &my,
        &format!("INSERT INTO {my_t} (id, name) VALUES (1, 'a')"),
    )
    .await;
    // lookback 1ms: any write transaction open while check runs is older.
    // The PostgreSQL entity turns the window's extension off
    // (max_lookback = lookback); the MariaDB one keeps the default.
    let config = env.config(&format!(
        "{}{}{}{}",
        source("pg", &pg_url()),
        source("my", &mysql_url()),
        pg_entity(&pg_t, "pg", &pg_t, "").replace(
            "lookback = \"5m\"",
            "lookback = \"1ms\"\nmax_lookback = \"1ms\""
        ),
        mysql_entity(&my_t, "my", &my_t, "").replace("lookback = \"5m\"", "lookback = \"1ms\""),
    ));
    let mut pg_tx = pg.begin().await.unwrap();
    sqlx::query(&format!("UPDATE {pg_t} SET name = 'b'"))
        .execute(&mut *pg_tx)
        .await
        .unwrap();
    let mut my_tx = my.begin().await.unwrap();
    sqlx::query(&format!("UPDATE {my_t} SET name = 'b'"))
        .execute(&mut *my_tx)
        .await
        .unwrap();
    // InnoDB refreshes what information_schema.INNODB_TRX shows at most
    // every 0.1 s: another session's read just before could hide this one.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (ok, report) = check(&config);
    pg_tx.rollback().await.unwrap();
    my_tx.rollback().await.unwrap();

    assert!(ok, "{report}");
    assert_line(
        &report,
        "ok",
        &["source pg: oldest open transaction:", "(pid ", ", user "],
    );
    assert_line(
        &report,
        "ok",
        &["source my: oldest open transaction:", "(thread ", ", user "],
    );
    assert_line(
        &report,
        "warning",
        &[
            &format!("entity {pg_t}: a transaction has been open on source pg for"),
            "longer than max_lookback 1ms",
        ],
    );
    assert_line(
        &report,
        "ok",
        &[
            &format!("entity {my_t}: a transaction has been open for"),
            "longer than lookback 1ms: the window reaches back to it (max_lookback 1h)",
        ],
    );
}

#[tokio::test]
async fn check_warns_about_an_evicting_redis_without_persistence() {
    let redis = PrivateRedis::start(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory-policy",
        "allkeys-lru",
    ])
    .await;
    let env = Env::new();
    let pool = pg().await;
    let table = unique("chk_evict");
    pg_table(&pool, &table, true).await;
    let config = env.file(
        "evicting.toml",
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{}/0\"\n{}{}",
            redis.port,
            source("pg", &pg_url()),
            pg_entity(&table, "pg", &table, "")
        ),
    );

    let (ok, report) = check(&config);

    assert!(ok, "{report}");
    assert_line(
        &report,
        "warning",
        &[
            "redis: maxmemory-policy is allkeys-lru",
            "duplicates",
            "noeviction",
        ],
    );
    assert_line(&report, "warning", &["redis: no persistence"]);
}

#[tokio::test]
async fn wait_for_replicas_on_one_server_is_checked_and_waited_for() {
    let primary = PrivateRedis::start(&[]).await;
    let env = Env::new();
    let pool = pg().await;
    let table = unique("chk_replicas");
    pg_table(&pool, &table, true).await;
    sqlx::query(&format!(
        "INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b')"
    ))
    .execute(&pool)
    .await
    .expect("insert");
    let config = env.file(
        "replicated.toml",
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{}/0\"\nwait_for_replicas = 1\ntimeout = \"1s\"\n{}{}",
            primary.port,
            source("pg", &pg_url()),
            pg_entity(&table, "pg", &table, "")
        ),
    );
    let config_arg = config.to_str().unwrap();

    // No replica yet: check says every cycle would fail, and a cycle does.
    let (ok, report) = check(&config);
    assert!(!ok, "{report}");
    assert_line(
        &report,
        "error",
        &["wait_for_replicas = 1, but the server has 0 replica(s) in sync (0 connected)"],
    );
    let (out, _, stderr) = run_cli(&["once", "--config", config_arg]);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "the cycle's writes reached 0 of the 1 replica(s) wait_for_replicas asks for"
        ),
        "{stderr}"
    );

    // With a replica: check is content, and the cycle goes through (the
    // rows the failed cycle wrote were not counted as done: nothing lost).
    let _replica =
        PrivateRedis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]).await;
    let deadline = Instant::now() + DEADLINE;
    let report = loop {
        let (ok, report) = check(&config);
        if ok {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never connected:\n{report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_line(
        &report,
        "ok",
        &["1 replica(s) in sync; each cycle waits until 1 hold its writes"],
    );
    let (out, stdout, stderr) = run_cli(&["once", "--config", config_arg]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("2 rows read"), "{stdout}");
}

#[tokio::test]
async fn check_reports_an_unreachable_redis_as_an_error() {
    let env = Env::new();
    let port = free_port();
    let config = env.file(
        "no-redis.toml",
        &format!(
            "[redis]\nurl = \"redis://:hunter2@127.0.0.1:{port}/0\"\ntimeout = \"2s\"\n{}{}",
            source("pg", &pg_url()),
            pg_entity("x", "pg", "x", "")
        ),
    );

    let (ok, report) = check(&config);

    assert!(!ok, "{report}");
    assert_line(
        &report,
        "error",
        &[&format!(
            "redis (redis://:***@127.0.0.1:{port}/0): cannot connect"
        )],
    );
    assert!(!report.contains("hunter2"), "{report}");
}

// ---------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------

fn status_json(config: &Path) -> serde_json::Value {
    let (out, stdout, stderr) =
        run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "status failed: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --json is JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn status_shows_each_consumer_group_with_its_lag_and_pending_entries() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "st_groups", "start = \"beginning\"").await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')"),
    )
    .await;
    once_ok(&config);
    let mut conn = redis_conn().await;
    // `indexer` read two entries and acknowledged none; `cache` joined at
    // the end and has read nothing since.
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", table.as_str(), "indexer", "0"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", table.as_str(), "cache", "$"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "indexer",
            "worker-1",
            "COUNT",
            "2",
            "STREAMS",
            table.as_str(),
            ">",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let messages = read_stream(&table).await;

    let json = status_json(&config);
    let groups = json["entities"][0]["consumer_groups"]
        .as_array()
        .expect("consumer_groups")
        .clone();
    let by_name = |name: &str| {
        groups
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("group {name} in {groups:?}"))
            .clone()
    };
    let indexer = by_name("indexer");
    assert_eq!(indexer["lag"], 2, "{indexer}");
    assert_eq!(indexer["pending"], 2, "{indexer}");
    assert_eq!(indexer["consumers"], 1, "{indexer}");
    assert_eq!(indexer["last_delivered_id"], messages[1].id.as_str());
    let age = indexer["oldest_pending_age_seconds"]
        .as_f64()
        .expect("an age");
    assert!((0.0..60.0).contains(&age), "{age}");
    let cache = by_name("cache");
    assert_eq!(cache["lag"], 0, "{cache}");
    assert_eq!(cache["pending"], 0, "{cache}");
    assert!(cache["oldest_pending_age_seconds"].is_null(), "{cache}");

    let (ok, text, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(ok.status.success(), "{text}");
    assert!(
        text.contains("  group         indexer: lag 2, 2 pending (oldest ")
            && text.contains(&format!(
                "s old), 1 consumers, last delivered {}\n",
                messages[1].id
            )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  group         cache: lag 0, 0 pending, 0 consumers, last delivered {}\n",
            messages[3].id
        )),
        "{text}"
    );

    // An entry deleted in a group's unread range: Redis can no longer count
    // the lag, and status says so rather than show a number.
    let _: () = redis::cmd("XDEL")
        .arg(&[table.as_str(), messages[2].id.as_str()])
        .query_async(&mut conn)
        .await
        .unwrap();
    let json = status_json(&config);
    let groups = json["entities"][0]["consumer_groups"]
        .as_array()
        .unwrap()
        .clone();
    let indexer = groups.iter().find(|g| g["name"] == "indexer").unwrap();
    assert!(indexer["lag"].is_null(), "{indexer}");
    let (_, text, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        text.contains("  group         indexer: lag unknown (entries were trimmed or deleted in its unread range), 2 pending"),
        "{text}"
    );
}

#[tokio::test]
async fn status_shows_the_last_cycle_as_text_and_json() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "st_ok", "start = \"beginning\"").await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')"),
    )
    .await;
    once_ok(&config);
    pg_exec(
        &pool,
        &format!("UPDATE {table} SET name = 'B', updated_at = now() WHERE id = 2"),
    )
    .await;
    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 4);

    let json = status_json(&config);
    let s = &json["entities"][0];
    assert_eq!(s["entity"], table.as_str());
    assert_eq!(s["source"], "db");
    assert_eq!(s["stream"], table.as_str());
    assert_eq!(s["cursor"], "time");
    assert_eq!(s["last_outcome"], "ok");
    assert_eq!(s["last_success"]["rows"], 3);
    assert_eq!(s["last_success"]["emitted"], 1);
    assert_eq!(s["last_success"]["skipped"], 2);
    assert_eq!(s["dedup_keys"], 3);
    assert_eq!(s["stream_length"], 4);
    assert_eq!(s["last_entry_id"], messages[3].id.as_str());
    assert!(s["last_failure"].is_null());
    let watermark = s["watermark"].as_str().expect("watermark is a time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(watermark).is_ok(),
        "{watermark}"
    );
    let lag = s["lag_seconds"].as_f64().expect("lag in seconds");
    assert!(lag >= 0.0, "{lag}");

    let (out, text, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!(
            "agents          none running\n\n{table} (source db)\n  lease         not held (no agent polls it now)\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  stream        {table}: 4 entries, last id {}\n",
            messages[3].id
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("  watermark     {watermark} (lag ")),
        "{text}"
    );
    assert!(text.contains("  last cycle    ok, started "), "{text}");
    assert!(
        text.contains("3 rows read, 1 emitted, 2 skipped in "),
        "{text}"
    );
    assert!(text.contains("  dedup set     3 keys\n"), "{text}");
}

#[tokio::test]
async fn status_of_an_entity_that_never_ran_says_so() {
    let env = Env::new();
    let (_pool, table, config) = pg_setup(&env, "st_never", "").await;

    let json = status_json(&config);
    let s = &json["entities"][0];
    assert_eq!(s["entity"], table.as_str());
    assert!(s["last_outcome"].is_null());
    assert!(s["watermark"].is_null());
    assert_eq!(s["stream_length"], 0);
    assert!(s["last_entry_id"].is_null());

    let (_, text, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        text.contains("  watermark     none yet (no cycle committed)\n"),
        "{text}"
    );
    assert!(text.contains("  last cycle    none yet\n"), "{text}");
}

#[tokio::test]
async fn status_shows_a_failing_entity_with_its_error_recorded_by_run() {
    let env = Env::new();
    let port = free_port();
    let entity = unique("st_fail");
    let config = env.config(&format!(
        "{NO_HTTP}{}{}",
        source(
            "down",
            &format!("postgres://app:hunter2@127.0.0.1:{port}/app")
        ),
        pg_entity(&entity, "down", "invoices", "")
    ));
    let agent = Agent::start(&config);
    agent
        .wait_for_event(DEADLINE, "a failed cycle", |e| {
            e["message"] == "cycle failed" && e["entity"] == entity.as_str()
        })
        .await;
    eventually(DEADLINE, "status to show the failure", || {
        let config = config.clone();
        async move { status_json(&config)["entities"][0]["last_outcome"] == "failed" }
    })
    .await;

    let s = status_json(&config)["entities"][0].clone();
    let failure = &s["last_failure"];
    let error = failure["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "source down (postgres://app:***@127.0.0.1:{port}/app): cannot connect"
        )),
        "{error}"
    );
    assert_eq!(failure["transient"], true);
    assert!(failure["count"].as_u64().unwrap() >= 1);
    assert!(s["last_success"].is_null());
    let (_, text, _) = run_cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(text.contains("  last cycle    failed "), "{text}");
    assert!(text.contains("(retrying)"), "{text}");
    assert!(text.contains("  last success  none yet"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

// ---------------------------------------------------------------------------
// tail
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tail_prints_new_messages_decoded_as_they_arrive() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "tail_new", "").await;
    // Already on the stream before tail starts: not shown without --from-start.
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'old')"),
    )
    .await;
    once_ok(&config);

    let tail = Child::spawn(&["tail", "--config", config.to_str().unwrap(), &table], &[]);
    tail.wait_for("tail to say it follows the stream", |_, err| {
        err.contains(&format!("following stream {table} from its end"))
    })
    .await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (2, 'Ada'), (3, 'Grace')"),
    )
    .await;
    once_ok(&config);
    tail.wait_for("two messages printed", |out, _| json_values(out).len() >= 2)
        .await;

    let printed = json_values(&tail.stdout());
    let stream = read_stream(&table).await;
    assert_eq!(printed.len(), 2, "only the new messages: {}", tail.stdout());
    let mut names = Vec::new();
    for (message, on_stream) in printed.iter().zip(&stream[1..]) {
        assert_eq!(message["id"], on_stream.id.as_str());
        assert_eq!(message["pkey"], on_stream.pkey.as_str());
        assert_eq!(message["op"], "upsert");
        assert_eq!(message["epoch"], on_stream.epoch);
        let changed_at = message["changed_at"].as_str().unwrap();
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(changed_at)
                .unwrap()
                .timestamp_micros(),
            on_stream.epoch
        );
        assert_eq!(Some(&message["payload"]), on_stream.payload.as_ref());
        names.push(message["payload"]["name"].as_str().unwrap().to_owned());
    }
    names.sort();
    assert_eq!(names, ["Ada", "Grace"]);
    assert!(
        tail.stdout().contains("\n  \"payload\": {\n    \"id\": "),
        "pretty JSON: {}",
        tail.stdout()
    );
}

#[tokio::test]
async fn tail_from_start_prints_what_the_stream_already_holds() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "tail_start", "start = \"beginning\"").await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b')"),
    )
    .await;
    once_ok(&config);

    let tail = Child::spawn(
        &[
            "tail",
            "--config",
            config.to_str().unwrap(),
            &table,
            "--from-start",
        ],
        &[],
    );
    tail.wait_for("the two stored messages", |out, _| {
        json_values(out).len() >= 2
    })
    .await;
    let keys: Vec<String> = json_values(&tail.stdout())
        .iter()
        .map(|m| m["pkey"].as_str().unwrap().to_owned())
        .collect();
    let stream: Vec<String> = read_stream(&table)
        .await
        .into_iter()
        .map(|m| m.pkey)
        .collect();
    assert_eq!(keys, stream);
}

#[tokio::test]
async fn tail_with_a_group_reads_with_xreadgroup_and_acknowledges_what_it_printed() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "tail_group", "").await;
    let group = unique("g");

    let tail = Child::spawn(
        &[
            "tail",
            "--config",
            config.to_str().unwrap(),
            &table,
            "--group",
            &group,
            "--consumer",
            "c1",
        ],
        &[],
    );
    tail.wait_for("tail to create the group", |_, err| {
        err.contains(&format!("as consumer c1 of group {group} (created group"))
    })
    .await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')"),
    )
    .await;
    once_ok(&config);
    tail.wait_for("three messages printed", |out, _| {
        json_values(out).len() >= 3
    })
    .await;

    let mut conn = redis_conn().await;
    eventually(DEADLINE, "the group's pending list to empty", || {
        let (mut conn, table, group) = (conn.clone(), table.clone(), group.clone());
        async move {
            let pending: redis::streams::StreamPendingReply =
                conn.xpending(&table, &group).await.expect("XPENDING");
            pending.count() == 0
        }
    })
    .await;
    let groups: redis::streams::StreamInfoGroupsReply =
        conn.xinfo_groups(&table).await.expect("XINFO GROUPS");
    let info = groups
        .groups
        .iter()
        .find(|g| g.name == group)
        .expect("the group exists");
    let stream = read_stream(&table).await;
    assert_eq!(
        info.last_delivered_id, stream[2].id,
        "delivered through the last entry"
    );
    assert_eq!(info.pending, 0);
    let printed: Vec<String> = json_values(&tail.stdout())
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let ids: Vec<String> = stream.iter().map(|m| m.id.clone()).collect();
    assert_eq!(printed, ids);
}

// ---------------------------------------------------------------------------
// wait
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wait_returns_once_a_running_agent_completed_a_cycle_that_started_after_it() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "wait_ok", "").await;
    let agent = Agent::start(&config);
    agent
        .wait_for_event(DEADLINE, "the first cycle", |e| e["message"] == "cycle")
        .await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (7, 'late')"),
    )
    .await;

    let (out, stdout, stderr) = run_cli(&[
        "wait",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "30s",
    ]);

    assert!(out.status.success(), "wait failed: {stderr}");
    assert!(
        stdout.starts_with(&format!("{table}: cycle started ")),
        "{stdout}"
    );
    // What was committed before `wait` started is on the stream when it returns.
    let messages = read_stream(&table).await;
    assert_eq!(of_key(&messages, "7").len(), 1, "{messages:?}");
}

#[tokio::test]
async fn wait_times_out_non_zero_when_no_agent_runs() {
    let env = Env::new();
    let (_pool, table, config) = pg_setup(&env, "wait_none", "").await;
    once_ok(&config);

    let (out, stdout, stderr) = run_cli(&[
        "wait",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "1s",
    ]);

    assert!(!out.status.success(), "{stdout}");
    assert_eq!(
        stderr.trim(),
        format!("error: timed out after 1s waiting for a cycle of: {table}")
    );
}

// ---------------------------------------------------------------------------
// run: /metrics, /healthz, logs
// ---------------------------------------------------------------------------

#[tokio::test]
async fn metrics_say_when_polling_pauses_for_redis_memory() {
    // maxmemory 8 MB holds a fresh Redis at ~10 %: above a pause_at_memory
    // of 5 %, the agent pauses from the start.
    let redis = PrivateRedis::start(&["--maxmemory", "8mb"]).await;
    let env = Env::new();
    let pool = pg().await;
    let table = unique("paused");
    pg_table(&pool, &table, true).await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a')"),
    )
    .await;
    let port = free_port();
    let config = env.file(
        "paused.toml",
        &format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\npause_at_memory = 0.05\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n{}{}",
            redis.url(),
            env.prefix,
            source("db", &pg_url()),
            pg_entity(&table, "db", &table, "start = \"beginning\"")
        ),
    );
    let _agent = Agent::start(&config);
    let (_, body) = http_until(port, "/metrics", "the pause", |_, body| {
        samples(body).get("highwater_polling_paused").copied() == Some(1.0)
    })
    .await;
    let ratio = samples(&body)["highwater_redis_memory_ratio"];
    assert!(ratio > 0.05 && ratio < 1.0, "used / maxmemory: {ratio}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, body) = http_get(port, "/metrics").unwrap();
    let m = samples(&body);
    assert_eq!(m["highwater_polling_paused"], 1.0);
    assert_eq!(
        m[&format!("highwater_cycles_total{{entity=\"{table}\",outcome=\"ok\"}}")],
        0.0,
        "no cycle while paused"
    );
}

#[tokio::test]
async fn run_serves_prometheus_metrics_and_a_healthy_healthz() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("metrics");
    pg_table(&pool, &table, true).await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')"),
    )
    .await;
    let port = free_port();
    let config = env.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:{port}\"\n{}{}",
        source("db", &pg_url()),
        pg_entity(&table, "db", &table, "start = \"beginning\"")
    ));
    let _agent = Agent::start(&config);

    let ok = format!("highwater_cycles_total{{entity=\"{table}\",outcome=\"ok\"}}");
    let (status, body) = http_until(port, "/metrics", "two committed cycles", |_, body| {
        samples(body).get(&ok).copied().unwrap_or(0.0) >= 2.0
    })
    .await;
    assert_eq!(status, 200);
    let m = samples(&body);
    let of = |name: &str| {
        m.get(&format!("{name}{{entity=\"{table}\"}}"))
            .copied()
            .unwrap_or_else(|| panic!("no {name} for the entity in:\n{body}"))
    };
    assert_eq!(of("highwater_rows_emitted_total"), 3.0);
    assert!(of("highwater_rows_read_total") >= 6.0, "3 rows per cycle");
    assert!(of("highwater_rows_skipped_total") >= 3.0);
    assert_eq!(of("highwater_dedup_keys"), 3.0);
    assert_eq!(of("highwater_stream_entries"), 3.0);
    assert!(of("highwater_cycle_duration_seconds_count") >= 2.0);
    assert!(of("highwater_lag_seconds") >= 0.0);
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((of("highwater_watermark_seconds") - now).abs() < 600.0);
    assert!((of("highwater_last_success_timestamp_seconds") - now).abs() < 600.0);
    assert_eq!(
        m[&format!("highwater_cycles_total{{entity=\"{table}\",outcome=\"error\"}}")],
        0.0
    );
    assert_eq!(
        m["highwater_source_connection_errors_total{source=\"db\"}"],
        0.0
    );
    assert_eq!(m["highwater_polling_paused"], 0.0, "not paused");
    for name in [
        "highwater_cycles_total",
        "highwater_rows_read_total",
        "highwater_rows_emitted_total",
        "highwater_rows_skipped_total",
        "highwater_cycle_duration_seconds",
        "highwater_watermark_seconds",
        "highwater_lag_seconds",
        "highwater_dedup_keys",
        "highwater_last_success_timestamp_seconds",
        "highwater_source_connection_errors_total",
    ] {
        assert!(
            body.contains(&format!("\n# TYPE {name} ")),
            "no TYPE of {name}"
        );
    }

    let (status, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok\n"), "{body}");
    assert!(
        body.contains(&format!("{table}: ok (last cycle completed ")),
        "{body}"
    );
    let (status, _) = http_get(port, "/nothing").unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn healthz_turns_unhealthy_when_an_entity_completes_no_cycle() {
    let env = Env::new();
    let port = free_port();
    let down = free_port();
    let entity = unique("unhealthy");
    let config = env.config(&format!(
        "\n[http]\nlisten = \"127.0.0.1:{port}\"\nunhealthy_after_intervals = 2\n{}{}",
        source("down", &format!("postgres://app@127.0.0.1:{down}/app")),
        pg_entity(&entity, "down", "invoices", "").replace("every = \"1s\"", "every = \"200ms\"")
    ));
    let _agent = Agent::start(&config);

    let (status, body) = http_until(port, "/healthz", "an unhealthy answer", |status, _| {
        status == 503
    })
    .await;
    assert!(body.starts_with("unhealthy\n"), "{body}");
    assert!(
        body.contains(&format!("{entity}: unhealthy (no cycle completed yet")),
        "{body}"
    );
    assert_eq!(status, 503);
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    let m = samples(&metrics);
    assert!(m["highwater_source_connection_errors_total{source=\"down\"}"] >= 1.0);
    assert!(
        m[&format!("highwater_cycles_total{{entity=\"{entity}\",outcome=\"transient_error\"}}")]
            >= 1.0
    );
}

#[tokio::test]
async fn json_logs_have_one_cycle_line_with_entity_rows_emitted_and_duration() {
    let env = Env::new();
    let (pool, table, config) = pg_setup(&env, "jsonlog", "start = \"beginning\"").await;
    pg_exec(
        &pool,
        &format!("INSERT INTO {table} (id, name) VALUES (1, 'a'), (2, 'b')"),
    )
    .await;
    let agent = Agent::start(&config);
    agent
        .wait_for_event(DEADLINE, "a cycle line of the entity", |e| {
            e["message"] == "cycle" && e["entity"] == table.as_str()
        })
        .await;

    let cycle = agent.cycles(Some(&table)).remove(0);
    assert_eq!(cycle["level"], "INFO");
    assert_eq!(cycle["rows"], 2);
    assert_eq!(cycle["emitted"], 2);
    assert!(cycle["duration_ms"].is_u64(), "{cycle}");
    assert!(cycle["timestamp"].is_string(), "{cycle}");
    for line in agent.stderr() {
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("every log line is JSON ({e}): {line}"));
    }
}

#[tokio::test]
async fn passwords_in_urls_never_reach_logs_or_output() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("mask");
    pg_table(&pool, &table, true).await;
    let secret = unique("pw");
    let down = free_port();
    // PostgreSQL trusts local connections: the password is accepted and ignored.
    let good_url = pg_url().replacen("postgres@", &format!("postgres:{secret}@"), 1);
    assert!(good_url.contains(&secret), "test setup: {good_url}");
    let config = env.config(&format!(
        "{NO_HTTP}{}{}{}{}",
        source("db", &good_url),
        source(
            "down",
            &format!("postgres://app:{secret}@127.0.0.1:{down}/app")
        ),
        pg_entity(&table, "db", &table, ""),
        pg_entity("invoices", "down", "invoices", ""),
    ));
    let path = config.to_str().unwrap();

    let (_, check_out) = check(&config);
    let (_, once_out, once_err) = run_cli(&["once", "--config", path]);
    let (_, status_out, status_err) = run_cli(&["status", "--config", path, "--json"]);
    let agent = Agent::start(&config);
    agent
        .wait_for_event(DEADLINE, "a failed cycle of the unreachable source", |e| {
            e["message"] == "cycle failed" && e["entity"] == "invoices"
        })
        .await;
    let logs = agent.stderr().join("\n");

    for (what, output) in [
        ("check", &check_out),
        ("once stdout", &once_out),
        ("once stderr", &once_err),
        ("status", &status_out),
        ("status stderr", &status_err),
        ("run logs", &logs),
    ] {
        assert!(
            !output.contains(&secret),
            "{what} shows the password:\n{output}"
        );
    }
    assert!(
        check_out.contains("postgres://postgres:***@"),
        "{check_out}"
    );
    assert!(once_err.contains("postgres://app:***@"), "{once_err}");
    assert!(logs.contains("postgres://app:***@"), "{logs}");
    assert!(logs.contains("postgres://postgres:***@"), "{logs}");
}

// ---------------------------------------------------------------------------
// progress
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_long_cycle_without_a_terminal_logs_progress_lines() {
    let env = Env::new();
    let (pool, table, config) =
        pg_setup(&env, "progress", "start = \"beginning\"\nchunk_rows = 500").await;
    pg_exec(
        &pool,
        &format!(
            "INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 5000) g"
        ),
    )
    .await;

    let out = Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args([
            "once",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .env("HIGHWATER_LOG", "info")
        // A line at every chunk that ends 1 ms or more after the last line.
        .env("HIGHWATER_PROGRESS_EVERY", "1ms")
        .output()
        .expect("run highwater once");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let progress: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["message"] == "cycle in progress")
        .collect();
    assert!(
        !progress.is_empty(),
        "no progress line: {}",
        text(&out.stderr)
    );
    let rows: Vec<u64> = progress
        .iter()
        .map(|e| e["rows"].as_u64().unwrap())
        .collect();
    assert!(rows.windows(2).all(|w| w[0] <= w[1]), "rows grow: {rows:?}");
    assert!(rows.iter().all(|&r| r > 0 && r <= 5000), "{rows:?}");
    for e in &progress {
        assert_eq!(e["entity"], table.as_str());
        assert!(
            e["rows_per_second"].is_u64() && e["emitted"].is_u64(),
            "{e}"
        );
    }
    assert!(text(&out.stdout).contains("5000 rows read, 5000 emitted"));
}
