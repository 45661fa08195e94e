//! A private `redis-server` per scenario, on a free port, so that a test may
//! kill it, restart it, flush it or fill its memory without touching anyone
//! else's data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the private server runs.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// AOF with `appendfsync always`: a restart (even after `kill -9`) keeps
    /// every acknowledged write. Without it a restart starts empty.
    pub persistent: bool,
    /// `maxmemory` in bytes, with `noeviction`.
    pub maxmemory: Option<u64>,
    /// Renames `INFO` (to [`HIDDEN_INFO`]): the agent cannot read the memory
    /// figures, as on a server that restricts `INFO`.
    pub hide_info: bool,
}

/// What `INFO` is called on a server started with `hide_info`.
pub const HIDDEN_INFO: &str = "model-info";

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start(options: RedisOptions) -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            options,
            child: None,
        };
        server.launch().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the process and waits until it answers PING (after loading its AOF).
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let dir = self.dir.path();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--save", ""]);
        if self.options.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(bytes) = self.options.maxmemory {
            command
                .args(["--maxmemory", &bytes.to_string()])
                .args(["--maxmemory-policy", "noeviction"]);
        }
        if self.options.hide_info {
            command.args(["--rename-command", "INFO", HIDDEN_INFO]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? ./scripts/test installs it)");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(mut conn) = self.try_conn().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server on port {} did not answer PING within 20s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` of the server: whatever was not written to the AOF is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        })
    }

    /// A connection (the server must be running).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn()
            .await
            .unwrap_or_else(|e| panic!("connect to the private redis-server: {e}"))
    }

    /// `used_memory` and `maxmemory` from `INFO memory`.
    pub async fn memory(&self) -> (u64, u64) {
        let mut conn = self.conn().await;
        let command = if self.options.hide_info {
            HIDDEN_INFO
        } else {
            "INFO"
        };
        let info: String = redis::cmd(command)
            .arg("memory")
            .query_async(&mut conn)
            .await
            .expect("INFO memory");
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in INFO memory"))
        };
        (field("used_memory"), field("maxmemory"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
