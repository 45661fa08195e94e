//! `highwater run` under systemd's `Type=notify`, through the real binary:
//! each test binds the notification socket itself (a Unix datagram socket in
//! its own temp dir), passes it as `NOTIFY_SOCKET` and reads what the agent
//! says: READY=1 only once Redis answers (a database that is down does not
//! hold it back), WATCHDOG=1 at half of `WATCHDOG_USEC` while it polls,
//! STOPPING=1 on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// The agent's stderr, next to the notification socket.
const LOG: &str = "agent.log";

/// The notification socket: every line of every datagram, with when it came.
struct NotifySocket {
    path: std::path::PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicBool>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (sink, stop) = (Arc::clone(&lines), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buffer) else {
                    continue;
                };
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                let mut lines = sink.lock().unwrap();
                lines.extend(text.lines().map(|l| (at, l.to_owned())));
            }
        });
        NotifySocket { path, lines, done }
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// When `line` first came, if it did.
    fn first(&self, line: &str) -> Option<Instant> {
        self.lines()
            .into_iter()
            .find(|(_, l)| l == line)
            .map(|(at, _)| at)
    }

    fn all(&self) -> String {
        self.lines()
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until a line satisfies `check`, failing with `what` after `deadline`.
    async fn wait_for(
        &self,
        deadline: Duration,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> Instant {
        let start = Instant::now();
        loop {
            if let Some((at, _)) = self.lines().into_iter().find(|(_, l)| check(l)) {
                return at;
            }
            assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; the agent said:\n{}\nits log:\n{}",
                self.all(),
                std::fs::read_to_string(self.path.with_file_name(LOG)).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// `highwater run` with `NOTIFY_SOCKET` (and `WATCHDOG_USEC` when given);
/// killed on drop.
struct Run(std::process::Child);

impl Run {
    fn start(config: &Path, socket: &NotifySocket, watchdog_usec: Option<u64>) -> Run {
        // Its log beside the socket, for the failure messages.
        let log = std::fs::File::create(socket.path.with_file_name(LOG)).expect("create the log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_highwater"));
        command
            .args(["run", "--config", config.to_str().unwrap()])
            .env("HIGHWATER_LOG", "info")
            .env("NOTIFY_SOCKET", &socket.path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(usec) = watchdog_usec {
            command.env("WATCHDOG_USEC", usec.to_string());
        }
        Run(command.spawn().expect("start highwater run"))
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-s", "TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s TERM failed");
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("wait for highwater run") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "highwater run did not exit within {DEADLINE:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A config for `redis_url`: one entity on a SQLite file of the test's own,
/// `extra` appended (more sources and entities), no HTTP endpoint.
async fn config(env: &Env, redis_url: &str, extra: &str) -> std::path::PathBuf {
    let db = env.dir.path().join("shop.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, \
         updated_at TEXT NOT NULL DEFAULT (datetime('now'))); \
         INSERT INTO t (id, name) VALUES (1, 'a')",
    )
    .await;
    pool.close().await;
    let entity = unique("notify");
    let text = format!(
        r#"[redis]
url = "{redis_url}"
key_prefix = "{prefix}"

[http]
listen = ""

[sources.shop]
url = "{url}"

[entities.{entity}]
source = "shop"
query = "SELECT id, name, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
{extra}"#,
        prefix = env.prefix,
        url = sqlite_url(&db)
    );
    let path = env.dir.path().join("highwater.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test]
async fn run_says_ready_feeds_the_watchdog_at_half_its_timeout_and_says_stopping_on_sigterm() {
    let env = Env::new();
    let socket = NotifySocket::bind(env.dir.path());
    let config = config(&env, &redis_url(), "").await;
    let watchdog = Duration::from_secs(2);
    let mut run = Run::start(&config, &socket, Some(watchdog.as_micros() as u64));

    let ready = socket
        .wait_for(DEADLINE, "READY=1", |l| l == "READY=1")
        .await;
    let status = socket
        .wait_for(DEADLINE, "a STATUS line saying it polls", |l| {
            l.starts_with("STATUS=polling as agent ")
        })
        .await;
    assert!(status >= ready, "{}", socket.all());

    // WATCHDOG=1 keeps coming, each within the watchdog's timeout of the last.
    let watched = Duration::from_secs(5);
    tokio::time::sleep(watched).await;
    let pings: Vec<Instant> = socket
        .lines()
        .into_iter()
        .filter(|(_, l)| l == "WATCHDOG=1")
        .map(|(at, _)| at)
        .collect();
    assert!(
        pings.len() >= 4,
        "{} WATCHDOG=1 in {watched:?} with WATCHDOG_USEC of {watchdog:?} (one per second expected):\n{}",
        pings.len(),
        socket.all()
    );
    assert!(
        pings.first().is_some_and(|first| *first >= ready),
        "the watchdog is fed once ready"
    );
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap < watchdog,
            "{gap:?} between two WATCHDOG=1, longer than WATCHDOG_USEC"
        );
    }

    run.terminate();
    let stopping = socket
        .wait_for(DEADLINE, "STOPPING=1 after SIGTERM", |l| l == "STOPPING=1")
        .await;
    assert!(
        run.wait_exit().await.success(),
        "a clean exit after SIGTERM"
    );
    assert!(stopping > ready);
    let lines = socket.lines();
    assert_eq!(
        lines.iter().filter(|(_, l)| l == "READY=1").count(),
        1,
        "READY=1 once: {}",
        socket.all()
    );
    assert!(
        lines
            .iter()
            .any(|(at, l)| *at >= stopping && l.starts_with("STATUS=shutting down")),
        "{}",
        socket.all()
    );
}

#[tokio::test]
async fn ready_waits_for_redis_but_not_for_a_database_that_is_down() {
    let env = Env::new();
    let socket = NotifySocket::bind(env.dir.path());
    let redis_port = free_port();
    let down = free_port();
    // A second entity on a PostgreSQL nobody listens for: it must not keep
    // the agent from being ready (`run` waits for databases by design).
    let extra = format!(
        r#"
[sources.legacy]
url = "postgres://postgres@127.0.0.1:{down}/test"

[entities.invoices]
source = "legacy"
query = "SELECT id, updated_at FROM invoices WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#
    );
    let config = config(&env, &format!("redis://127.0.0.1:{redis_port}/0"), &extra).await;
    let mut run = Run::start(&config, &socket, Some(2_000_000));

    // Redis does not answer: the start goes on (EXTEND_TIMEOUT_USEC, a
    // STATUS saying why), and no READY.
    socket
        .wait_for(DEADLINE, "a STATUS line saying it waits for Redis", |l| {
            l.starts_with("STATUS=waiting for Redis (")
        })
        .await;
    socket
        .wait_for(DEADLINE, "EXTEND_TIMEOUT_USEC while Redis is down", |l| {
            l.starts_with("EXTEND_TIMEOUT_USEC=")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        socket.first("READY=1"),
        None,
        "READY=1 before Redis answered:\n{}",
        socket.all()
    );
    assert_eq!(
        socket.first("WATCHDOG=1"),
        None,
        "no watchdog while starting"
    );

    // Redis comes up on that port: READY follows, with the database still down.
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let mut redis = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(redis_dir.path())
        .args(["--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (is it installed? ./scripts/test installs it)");
    let redis_up = Instant::now();
    let ready = socket
        .wait_for(DEADLINE, "READY=1 once Redis answers", |l| l == "READY=1")
        .await;
    assert!(ready > redis_up);
    socket
        .wait_for(DEADLINE, "WATCHDOG=1 once ready", |l| l == "WATCHDOG=1")
        .await;

    run.terminate();
    socket
        .wait_for(DEADLINE, "STOPPING=1 after SIGTERM", |l| l == "STOPPING=1")
        .await;
    assert!(
        run.wait_exit().await.success(),
        "a clean exit after SIGTERM"
    );
    let _ = redis.kill();
    let _ = redis.wait();
}
