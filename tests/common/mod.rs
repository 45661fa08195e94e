//! Shared test harness: real servers (PostgreSQL, MariaDB, Redis, SQLite
//! files), each test with its own tables, key prefix and stream names, and
//! the real `highwater` binary run as a user runs it.
//!
//! Servers default to the local ones; override with `HIGHWATER_TEST_PG`,
//! `HIGHWATER_TEST_MYSQL`, `HIGHWATER_TEST_REDIS`.

#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

pub fn pg_url() -> String {
    std::env::var("HIGHWATER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn mysql_url() -> String {
    std::env::var("HIGHWATER_TEST_MYSQL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

pub fn redis_url() -> String {
    std::env::var("HIGHWATER_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A name no other test (or earlier run) uses: `prefix_<pid>_<n>_<time>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{prefix}_{}_{n}_{t}", std::process::id())
}

/// One message as a consumer reads it from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: String,
    pub pkey: String,
    pub epoch: i64,
    pub variant: String,
    pub op: String,
    /// The parsed payload, `None` when the field is absent.
    pub payload: Option<serde_json::Value>,
}

/// A test's own corner: a temp dir for its config, its own Redis key prefix.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub prefix: String,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
            prefix: unique("hwtest"),
        }
    }

    /// Writes `highwater.toml` with a `[redis]` table for this test's prefix
    /// followed by `body` (sources and entities), and returns its path.
    pub fn config(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("highwater.toml");
        let text = format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n\n{body}",
            redis_url(),
            self.prefix
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Writes a file next to the config (e.g. `queries/x.sql`).
    pub fn file(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, contents).expect("write file");
        path
    }
}

/// Runs the `highwater` binary with these arguments.
pub fn highwater(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args(args)
        .env_remove("HIGHWATER_LOG")
        .output()
        .expect("run highwater")
}

/// `highwater once --config <path>`; panics with stdout/stderr if it fails.
pub fn once_ok(config: &Path) -> String {
    let out = highwater(&["once", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "highwater once failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// [`once_ok`], returning stdout and stderr (the agent's log lines).
pub fn once_logged(config: &Path) -> (String, String) {
    let out = highwater(&["once", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "highwater once failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The warning a cycle logs when its query returned rows below the window.
pub const BELOW_WINDOW_WARNING: &str = "cursor is before the window start";

/// `highwater once` expected to fail: returns stderr.
pub fn once_err(config: &Path) -> String {
    let out = highwater(&["once", "--config", config.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "highwater once should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Entries of an XRANGE reply (or of one stream in an XREADGROUP reply):
/// (id, field-value pairs) per entry.
type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// An XRANGE reply as messages.
pub fn parse_entries(reply: redis::Value) -> Vec<Message> {
    let entries: Entries =
        redis::FromRedisValue::from_redis_value(&reply).expect("an XRANGE reply");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            Message {
                id,
                pkey: get("pkey").expect("pkey field"),
                epoch: get("epoch")
                    .expect("epoch field")
                    .parse()
                    .expect("epoch is an integer"),
                variant: get("variant").expect("variant field"),
                op: get("op").expect("op field"),
                payload: get("payload").map(|p| serde_json::from_str(&p).expect("payload is JSON")),
            }
        })
        .collect()
}

/// Every message of a stream, oldest first.
pub async fn read_stream(stream: &str) -> Vec<Message> {
    let mut conn = redis_conn().await;
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    parse_entries(reply)
}

/// A field of the state hash of an entity whose stream has its name
/// (`<prefix>:{<entity>}:state:<entity>`).
pub async fn state_field(env: &Env, entity: &str, field: &str) -> Option<String> {
    let mut conn = redis_conn().await;
    redis::cmd("HGET")
        .arg(format!("{}:{{{entity}}}:state:{entity}", env.prefix))
        .arg(field)
        .query_async(&mut conn)
        .await
        .expect("HGET state")
}

pub async fn watermark(env: &Env, entity: &str) -> i64 {
    state_field(env, entity, "watermark")
        .await
        .expect("a watermark after a cycle")
        .parse()
        .expect("the watermark is an integer")
}

/// The second (`YYYY-MM-DD HH:MM:SS`, UTC) in which the next window of an
/// entity starts: `lookback_us` before its watermark, floored.
pub async fn next_window_second(env: &Env, entity: &str, lookback_us: i64) -> String {
    let start = watermark(env, entity).await - lookback_us;
    chrono::DateTime::from_timestamp_micros(start.div_euclid(1_000_000) * 1_000_000)
        .expect("a watermark in chrono's range")
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Two more `once` cycles after a late row landed in the window's first
/// second: the first emits only it, the second nothing; neither warns.
pub fn only_the_late_row_is_emitted_without_a_warning(config: &Path) {
    let (out, log) = once_logged(config);
    assert!(
        out.contains(" 1 emitted"),
        "only the late row is new: {out}"
    );
    assert!(!log.contains(BELOW_WINDOW_WARNING), "{log}");
    let (out, log) = once_logged(config);
    assert!(out.contains(" 0 emitted"), "{out}");
    assert!(!log.contains(BELOW_WINDOW_WARNING), "{log}");
}

/// Deletes a stream (tests that reuse a name across runs).
pub async fn delete_key(key: &str) {
    let mut conn = redis_conn().await;
    let _: () = conn.del(key).await.expect("DEL");
}

/// Messages of one key, in stream order.
pub fn of_key<'a>(messages: &'a [Message], pkey: &str) -> Vec<&'a Message> {
    messages.iter().filter(|m| m.pkey == pkey).collect()
}

/// Waits until `check` is true, failing with `what` after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn pg() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url())
        .await
        .expect("connect to PostgreSQL (is it running? ./scripts/test starts it)")
}

pub async fn mysql() -> sqlx::MySqlPool {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&mysql_url())
        .await
        .expect("connect to MariaDB (is it running? ./scripts/test starts it)")
}

/// Runs each `;`-separated statement (no literals containing `;`).
pub async fn pg_exec(pool: &sqlx::PgPool, sql: &str) {
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::query(statement)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

pub async fn mysql_exec(pool: &sqlx::MySqlPool, sql: &str) {
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::query(statement)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

// ---------------------------------------------------------------------------
// SQLite files and `highwater run` as a child process (tests/sqlite.rs, tests/run.rs).
// ---------------------------------------------------------------------------

/// A SQLite database file, created if missing, in WAL mode so that the agent
/// reads a committed snapshot while the test writes.
pub async fn sqlite(path: &Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("open SQLite file {}: {e}", path.display()))
}

/// The source URL of a SQLite file, as a user writes it in the config.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

pub async fn sqlite_exec(pool: &sqlx::SqlitePool, sql: &str) {
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::query(statement)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// `highwater run` as a child process, logging JSON lines at `info` to a
/// pipe that a thread collects, so tests can wait for log lines and signal it.
/// Dropping it kills the process if it still runs.
pub struct Agent {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `highwater run --config <config> --log-format json`.
    pub fn start(config: &Path) -> Agent {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(["--log-format", "json"])
            .env("HIGHWATER_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start highwater run");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Agent { child, lines }
    }

    /// The process id (agents are named `<hostname>-<pid>` by default).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The stderr lines that are JSON log events, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stderr()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The `cycle` events (one per finished cycle), optionally of one entity.
    pub fn cycles(&self, entity: Option<&str>) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["message"] == "cycle")
            .filter(|e| entity.is_none_or(|name| e["entity"] == name))
            .collect()
    }

    /// Waits until a log event satisfies `check`, failing with `what` after `deadline`.
    pub async fn wait_for_event(
        &self,
        deadline: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let start = Instant::now();
        while !self.events().iter().any(&check) {
            assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; stderr:\n{}",
                self.stderr().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`TERM`, `INT`) with the `kill` command, as an operator would.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for highwater run")
    }

    /// Waits for the process to exit, failing after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "highwater run did not exit within {deadline:?}; stderr:\n{}",
                self.stderr().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// A private `redis-server`, for tests that set the server up themselves
// (users and their ACLs, persistence, memory).
// ---------------------------------------------------------------------------

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A `redis-server` of the test's own on a free port, with its own temp dir
/// as `--dir` and no persistence; killed on drop.
pub struct PrivateRedis {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts it with `args` added (e.g. `--aclfile <path>`) and waits until
    /// the default user's PING is answered.
    pub async fn start(args: &[&str]) -> PrivateRedis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? ./scripts/test installs it)");
        let server = PrivateRedis {
            child,
            port,
            _dir: dir,
        };
        let url = server.url();
        eventually(
            Duration::from_secs(20),
            "the private redis-server to answer PING",
            || {
                let url = url.clone();
                async move {
                    let Ok(client) = redis::Client::open(url) else {
                        return false;
                    };
                    match client.get_multiplexed_async_connection().await {
                        Ok(mut conn) => redis::cmd("PING")
                            .query_async::<String>(&mut conn)
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
        server
    }

    /// Its URL for the default user.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its URL for `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// A connection as the default user.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the private redis-server")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-request HTTP/1.1 GET to 127.0.0.1: status code and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
