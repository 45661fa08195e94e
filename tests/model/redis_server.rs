//! A private `redis-server` per scenario, on a free port, so that a test may
//! kill it, restart it, flush it or fill its memory without touching anyone
//! else's data; or a private Redis Cluster ([`PrivateCluster`]) whose
//! masters a scenario fails over, read through a cluster connection.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::common::cluster::PrivateCluster;

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

/// A scenario's Redis: one private server, or a private cluster.
pub enum ModelRedis {
    Server(RedisServer),
    Cluster(PrivateCluster),
}

impl ModelRedis {
    /// The URL for the agents' config. On a cluster, a master that does not
    /// serve `stream`'s slot: the node stays up when the scenario kills the
    /// entity's masters, so that agents restarted after a kill still reach
    /// the cluster through it.
    pub async fn config_url(&self, stream: &str) -> String {
        match self {
            ModelRedis::Server(server) => server.url(),
            ModelRedis::Cluster(cluster) => {
                let entity_master = cluster
                    .master_of_slot(PrivateCluster::slot_of(stream))
                    .await;
                let port = cluster
                    .master_ports()
                    .into_iter()
                    .find(|&port| port != entity_master)
                    .expect("a cluster of several masters");
                format!("redis://127.0.0.1:{port}")
            }
        }
    }

    /// A new connection: to the server, or to the cluster (commands go to
    /// the node serving their key, MOVED is followed; connected through
    /// the live nodes, so a connection made after a failover knows the
    /// promoted master).
    pub async fn conn(&self) -> ModelConn {
        match self {
            ModelRedis::Server(server) => ModelConn::Server(server.conn().await),
            ModelRedis::Cluster(cluster) => {
                let client = redis::cluster::ClusterClientBuilder::new(cluster.urls())
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(5))
                    .build()
                    .expect("cluster urls");
                let conn =
                    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
                        .await
                        .unwrap_or_else(|_| panic!("no cluster connection within 10 s"))
                        .unwrap_or_else(|e| panic!("connect to the private cluster: {e}"));
                ModelConn::Cluster(conn)
            }
        }
    }

    /// The private server, for what only a single server does (restarts,
    /// `FLUSHALL`, memory figures, a consumer group's connection).
    pub fn server(&self) -> &RedisServer {
        match self {
            ModelRedis::Server(server) => server,
            ModelRedis::Cluster(_) => panic!("this scenario runs on a cluster, not one server"),
        }
    }

    pub fn server_mut(&mut self) -> &mut RedisServer {
        match self {
            ModelRedis::Server(server) => server,
            ModelRedis::Cluster(_) => panic!("this scenario runs on a cluster, not one server"),
        }
    }

    pub fn cluster_mut(&mut self) -> &mut PrivateCluster {
        match self {
            ModelRedis::Cluster(cluster) => cluster,
            ModelRedis::Server(_) => panic!("this scenario runs on one server, not a cluster"),
        }
    }
}

/// A connection to the scenario's Redis: commands run on it as on either.
pub enum ModelConn {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for ModelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            ModelConn::Server(conn) => conn.req_packed_command(cmd),
            ModelConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            ModelConn::Server(conn) => conn.req_packed_commands(cmd, offset, count),
            ModelConn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ModelConn::Server(conn) => conn.get_db(),
            ModelConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
