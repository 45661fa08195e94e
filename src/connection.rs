//! One Redis server or a Redis Cluster behind one connection type. On a
//! cluster every command and script goes to the node serving its first
//! key's slot (redis-rs follows MOVED and ASK and refreshes the slot map
//! after a failover); what is about a node rather than a key (`INFO`) goes
//! to the node that serves a given key, or to every primary.
//!
//! The contract for callers: a connection is cheap to clone and reconnects
//! by itself; commands sent one after the other without waiting keep their
//! order per node on one server's connection and, on a cluster, as far as
//! redis-rs's dispatch keeps it (the dedup script's chunk chain refuses,
//! and so makes transient, any chunk that overtook its predecessor).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisSettings;

/// A connection to one server or to a cluster.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A reply of one node: its address (`host:port`; the configured URL's on
/// one server) and what it answered.
pub type NodeReply<T> = (String, T);

impl Connection {
    /// Connects to what `settings` names: a cluster when `cluster = true`,
    /// one server when `false`, and when left out whatever the server says
    /// it is (`INFO cluster`). Connects and waits for replies up to the
    /// configured timeout.
    pub async fn open(settings: &RedisSettings) -> RedisResult<Connection> {
        Connection::open_with(settings, settings.timeout, settings.timeout).await
    }

    /// [`Connection::open`] with its own timeouts: a blocking read
    /// (`XREAD BLOCK`) needs a reply timeout beyond the longest block.
    pub async fn open_with(
        settings: &RedisSettings,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Connection> {
        let connect = async {
            let client = crate::sink::client(settings)?;
            let cluster = match settings.cluster {
                Some(cluster) => cluster,
                None => is_cluster(&client, connect_timeout).await?,
            };
            if cluster {
                let conn = cluster_client(settings, connect_timeout, response_timeout)?
                    .get_async_connection()
                    .await?;
                return Ok(Connection::Cluster(conn));
            }
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(response_timeout)
                .set_number_of_retries(1)
                .set_max_delay(1000);
            Ok(Connection::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        };
        tokio::time::timeout(connect_timeout + Duration::from_secs(1), connect)
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// Sends `cmd` to every primary: each one's address and reply (one
    /// server: `[("", reply)]`).
    pub async fn on_every_primary<T: redis::FromRedisValue>(
        &mut self,
        cmd: &Cmd,
    ) -> RedisResult<Vec<NodeReply<T>>> {
        match self {
            Connection::Single(conn) => Ok(vec![(String::new(), cmd.query_async(conn).await?)]),
            Connection::Cluster(conn) => {
                let value = conn
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                let replies: Vec<(String, Value)> = match value {
                    Value::Map(pairs) => pairs
                        .into_iter()
                        .map(|(node, reply)| Ok((redis::from_redis_value(&node)?, reply)))
                        .collect::<RedisResult<_>>()?,
                    other => vec![(String::new(), other)],
                };
                let mut out = Vec::with_capacity(replies.len());
                for (node, reply) in replies {
                    out.push((node, redis::from_redis_value(&reply)?));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
        }
    }

    /// Sends `cmds` (each with the key it is routed by) and returns their
    /// replies in order: one pipeline on one server; on a cluster, which
    /// refuses a pipeline over several slots, one pipeline per slot, all at
    /// once. A command that fails fails the whole call.
    pub async fn pipelined<T: redis::FromRedisValue>(
        &mut self,
        cmds: Vec<(&str, Cmd)>,
    ) -> RedisResult<Vec<T>> {
        let mut groups: Vec<(u16, Vec<usize>, Pipeline)> = Vec::new();
        for (i, (key, cmd)) in cmds.into_iter().enumerate() {
            let slot = if self.is_cluster() { slot_of(key) } else { 0 };
            let at = match groups.iter().position(|(s, ..)| *s == slot) {
                Some(at) => at,
                None => {
                    groups.push((slot, Vec::new(), redis::pipe()));
                    groups.len() - 1
                }
            };
            groups[at].1.push(i);
            groups[at].2.add_command(cmd);
        }
        let replies = futures_util::future::try_join_all(groups.iter().map(|(_, _, pipe)| {
            let mut conn = self.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        }))
        .await?;
        let total = groups.iter().map(|(_, at, _)| at.len()).sum();
        let mut out: Vec<Option<Value>> = vec![None; total];
        for ((_, at, _), values) in groups.iter().zip(replies) {
            for (&i, value) in at.iter().zip(values) {
                out[i] = Some(value);
            }
        }
        out.into_iter()
            .map(|v| redis::from_redis_value(&v.unwrap_or(Value::Nil)))
            .collect()
    }

    /// `CLUSTER NODES` of the cluster (any node's view); `None` on one server.
    pub async fn cluster_nodes(&mut self) -> RedisResult<Option<String>> {
        let Connection::Cluster(conn) = self else {
            return Ok(None);
        };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
        Ok(Some(nodes))
    }
}

/// The master serving `slot` in a `CLUSTER NODES` text, and how many
/// replicas of it the text lists and does not mark failed: connected or
/// not, they are meant to hold its writes (a replica cut off for a while
/// still counts, so that a cycle waits for it rather than count on a copy
/// nobody has). `None` when no master the text does not mark failed serves
/// the slot (a failover under way, as this node sees it).
pub fn master_of_slot(nodes: &str, slot: u16) -> Option<SlotMaster<'_>> {
    let fields: Vec<Vec<&str>> = nodes
        .lines()
        .map(|line| line.split(' ').collect())
        .filter(|f: &Vec<&str>| f.len() >= 8)
        .collect();
    let flags = |f: &Vec<&str>, flag: &str| f[2].split(',').any(|x| x == flag);
    let serves = |f: &Vec<&str>| {
        f[8..].iter().any(|range| {
            let mut ends = range.splitn(2, '-');
            let first = ends.next().and_then(|a| a.parse::<u16>().ok());
            let last = ends.next().map_or(first, |b| b.parse::<u16>().ok());
            matches!((first, last), (Some(a), Some(b)) if (a..=b).contains(&slot))
        })
    };
    let master = fields
        .iter()
        .find(|f| flags(f, "master") && !flags(f, "fail") && serves(f))?;
    let replicas = fields
        .iter()
        .filter(|f| {
            (flags(f, "slave") || flags(f, "replica")) && !flags(f, "fail") && f[3] == master[0]
        })
        .count();
    Some(SlotMaster {
        // `ip:port@cport[,hostname]`
        address: master[1].split('@').next().unwrap_or(master[1]),
        replicas: replicas as u32,
    })
}

/// See [`master_of_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMaster<'a> {
    /// `host:port`, as the cluster announces it.
    pub address: &'a str,
    pub replicas: u32,
}

/// Does the server at the URL run in cluster mode (`INFO cluster`:
/// `cluster_enabled:1`)?
async fn is_cluster(client: &redis::Client, timeout: Duration) -> RedisResult<bool> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let info: String = match redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await
    {
        Ok(info) => info,
        // A server that refuses INFO (renamed, or not in the user's ACL)
        // is taken for one server, as before clusters were supported; on a
        // cluster its first command then fails with MOVED, and `cluster =
        // true` says what it is.
        Err(error)
            if error.kind() == redis::ErrorKind::ResponseError
                || crate::sink::is_acl_refusal(&error) =>
        {
            tracing::warn!(error = %error, "redis refused INFO cluster: taken for one server (set [redis] cluster = true for a Redis Cluster)");
            return Ok(false);
        }
        Err(error) => return Err(error),
    };
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// The cluster client for the configured URL (any node; the others are
/// discovered), with the same timeouts and certificates as one server's.
fn cluster_client(
    settings: &RedisSettings,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> RedisResult<redis::cluster::ClusterClient> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(vec![settings.url.as_str()])
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout)
        .retries(3)
        .min_retry_wait(100)
        .max_retry_wait(1000);
    if let Some(certificates) = crate::sink::tls_certificates(settings) {
        builder = builder.certs(certificates);
    }
    builder.build()
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text in
/// the first non-empty `{...}`, else the whole key), modulo 16384.
pub fn slot_of(key: &str) -> u16 {
    crc16(crate::sink::slot_tag(key).as_bytes()) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_counted_per_shard_without_the_failed_ones() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b1 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c1 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected
c2 127.0.0.1:7005@17005 master - 0 0 7 connected 10923-16383
a2 127.0.0.1:7003@17003 slave a1 0 0 1 connected
b2 127.0.0.1:7004@17004 slave b1 0 0 2 disconnected
b3 127.0.0.1:7006@17006 slave,fail b1 0 0 2 disconnected
";
        let replicas = |slot| master_of_slot(nodes, slot).map(|m| m.replicas);
        assert_eq!(
            master_of_slot(nodes, 100),
            Some(SlotMaster {
                address: "127.0.0.1:7000",
                replicas: 1
            })
        );
        assert_eq!(
            replicas(6000),
            Some(1),
            "a cut-off replica counts, a failed one not"
        );
        assert_eq!(replicas(16000), Some(0), "promoted, its old master failed");
        assert_eq!(
            master_of_slot(nodes, 16000).map(|m| m.address),
            Some("127.0.0.1:7005")
        );
        let failing_over = "\
a1 127.0.0.1:7000@17000 master,fail - 0 0 1 disconnected 0-5460
a2 127.0.0.1:7003@17003 myself,slave a1 0 0 1 connected
";
        assert_eq!(
            master_of_slot(failing_over, 100),
            None,
            "its master failed, no replica promoted yet"
        );
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of("123456789"), 12739);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{foo}bar"), slot_of("foo"));
        assert_eq!(slot_of("a{foo}b{c}"), slot_of("foo"));
        assert_eq!(slot_of("{}foo"), slot_of("{}foo"));
        assert_ne!(slot_of("{}foo"), slot_of("foo"));
        assert_eq!(slot_of("{bar"), crc16(b"{bar") % 16384);
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
    }
}
