//! A private Redis Cluster: real `redis-server` processes of the test's own,
//! each on free ports (client port and cluster bus port = port + 10000) with
//! its own temp dir, formed here (slots, MEET, REPLICATE) and waited for until
//! every node agrees; masters can be killed and their replicas' promotion
//! waited for. Every process is killed on drop.
//!
//! Nothing is fixed or shared (ports, dirs), so parallel tests (nextest runs
//! each in its own process) can each start clusters of their own.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::Value;

use super::free_port;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `cluster-node-timeout` (ms): short so a killed master is failed over in a
/// few seconds, long enough that a node of a busy test machine is not
/// thought failed. `extra_args` can override it.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// The cluster bus port is the client port plus this.
const BUS_OFFSET: u16 = 10000;

/// How long forming the cluster may take before the test fails.
const FORM_DEADLINE: Duration = Duration::from_secs(20);

/// How long a failover may take before the test fails.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(25);

/// How long one probe (connect or command) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starting a node again on other ports when it did not come up (a port
/// taken between choosing and binding it).
const START_ATTEMPTS: usize = 6;

/// One `redis-server --cluster-enabled yes`.
struct Node {
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its cluster node id (`CLUSTER MYID`).
    id: String,
}

impl Node {
    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The end of its log file, for failure messages.
    fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A master the harness killed, and the slot ranges it served then.
struct Killed {
    port: u16,
    ranges: Vec<(u16, u16)>,
}

/// A Redis Cluster of the test's own; every process is killed on drop.
pub struct PrivateCluster {
    nodes: Vec<Node>,
    /// The masters as last seen: as formed, less the killed ones, plus the
    /// replicas [`PrivateCluster::wait_for_failover`] saw promoted.
    masters: Mutex<Vec<u16>>,
    killed: Vec<Killed>,
}

impl PrivateCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each
    /// (every node with `extra_args` added after the harness's own, so they
    /// can override them), gives the masters equal shares of the 16384
    /// slots, and waits until every node says `cluster_state:ok`, knows
    /// every other node with the intended roles and no failure flags, and
    /// every replica's link to its master is up.
    ///
    /// A failover needs a majority of the masters to vote: at least 3
    /// masters for one killed master.
    pub async fn start(
        masters: usize,
        replicas_per_master: usize,
        extra_args: &[&str],
    ) -> PrivateCluster {
        assert!(masters >= 1, "a cluster needs a master");
        assert!(
            masters <= SLOTS as usize,
            "more masters than slots: {masters}"
        );
        let started = Instant::now();
        let total = masters * (1 + replicas_per_master);

        let nodes = start_nodes(total, extra_args).await;
        let mut cluster = PrivateCluster {
            masters: Mutex::new(nodes[..masters].iter().map(|n| n.port).collect()),
            nodes,
            killed: Vec::new(),
        };
        cluster.form(masters).await;
        cluster.wait_formed(masters, started).await;
        cluster
    }

    /// Slots, epochs, MEET and REPLICATE: nodes `0..masters` are the masters,
    /// then each master's replicas in turn (master `i` has nodes
    /// `masters + i * r .. masters + (i + 1) * r`).
    async fn form(&mut self, masters: usize) {
        for node in &mut self.nodes {
            let mut conn = node_conn(node.port).await;
            node.id = redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async(&mut conn)
                .await
                .expect("CLUSTER MYID");
        }
        for (i, node) in self.nodes[..masters].iter().enumerate() {
            let mut conn = node_conn(node.port).await;
            // Distinct config epochs, as `redis-cli --cluster create` sets
            // them: no epoch collisions to resolve later.
            let () = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER SET-CONFIG-EPOCH");
            let (first, last) = slot_share(i, masters);
            let () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        // Every node meets the first one; gossip introduces the rest.
        let first = self.nodes[0].port;
        for node in &self.nodes[1..] {
            let mut conn = node_conn(node.port).await;
            let () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(first)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER MEET");
        }
        let total = self.nodes.len();
        let ports = self.ports();
        let mut probe = Probe::default();
        wait_until(
            FORM_DEADLINE,
            "every node to know every other node",
            async || {
                for &port in &ports {
                    let Some(view) = probe.cluster_nodes(port).await else {
                        return Err(format!("{port}: no CLUSTER NODES"));
                    };
                    let known = view.iter().filter(|n| !n.has_flag("handshake")).count();
                    if known != total {
                        return Err(format!("{port} knows {known} of {total} nodes"));
                    }
                }
                Ok(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));

        let replicas = (total - masters) / masters;
        for i in 0..masters {
            let master_id = self.nodes[i].id.clone();
            for k in 0..replicas {
                let port = self.nodes[masters + i * replicas + k].port;
                let mut conn = node_conn(port).await;
                let () = redis::cmd("CLUSTER")
                    .arg("REPLICATE")
                    .arg(&master_id)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{port}: CLUSTER REPLICATE {master_id}: {e}"));
            }
        }
    }

    async fn wait_formed(&self, masters: usize, started: Instant) {
        let total = self.nodes.len();
        let replicas = (total - masters) / masters;
        // node id -> the id of its master ("-" for a master).
        let mut expected: HashMap<String, String> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let master = if i < masters {
                "-".to_owned()
            } else {
                self.nodes[(i - masters) / replicas].id.clone()
            };
            expected.insert(node.id.clone(), master);
        }
        let ports = self.ports();
        let replica_ports: Vec<u16> = ports[masters..].to_vec();
        let mut probe = Probe::default();
        wait_until(FORM_DEADLINE, "the cluster to form", async || {
            for &port in &ports {
                let info = probe.text(port, &["CLUSTER", "INFO"]).await;
                let info = info.ok_or_else(|| format!("{port}: no CLUSTER INFO"))?;
                for want in [
                    "cluster_state:ok".to_owned(),
                    format!("cluster_slots_assigned:{SLOTS}"),
                    format!("cluster_slots_ok:{SLOTS}"),
                    format!("cluster_known_nodes:{total}"),
                ] {
                    if !info.lines().any(|l| l.trim() == want) {
                        return Err(format!("{port}: CLUSTER INFO lacks {want}"));
                    }
                }
                let view = probe
                    .cluster_nodes(port)
                    .await
                    .ok_or_else(|| format!("{port}: no CLUSTER NODES"))?;
                for line in &view {
                    if let Some(flag) = ["fail", "fail?", "handshake", "noaddr"]
                        .into_iter()
                        .find(|f| line.has_flag(f))
                    {
                        return Err(format!("{port} sees {} as {flag}", line.port));
                    }
                    if line.link != "connected" {
                        return Err(format!("{port}: link to {} {}", line.port, line.link));
                    }
                    match expected.get(&line.id) {
                        Some(master) if *master == line.master => {}
                        _ => {
                            return Err(format!(
                                "{port} sees {} with master {} (not yet as formed)",
                                line.port, line.master
                            ))
                        }
                    }
                }
            }
            for &port in &replica_ports {
                let info = probe
                    .text(port, &["INFO", "replication"])
                    .await
                    .ok_or_else(|| format!("{port}: no INFO replication"))?;
                if !info.lines().any(|l| l.trim() == "master_link_status:up") {
                    return Err(format!("replica {port}: master link not up"));
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e} (after {:?})\n{}", started.elapsed(), self.logs()));
    }

    /// The client ports of the live nodes, masters first as formed.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.port)
            .collect()
    }

    /// `redis://127.0.0.1:<port>` of the first master (of
    /// [`PrivateCluster::master_ports`]).
    pub fn url(&self) -> String {
        let port = *self.master_ports().first().expect("a live master");
        format!("redis://127.0.0.1:{port}")
    }

    /// The URLs of every live node.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The masters' ports as the harness last saw them: as formed, less the
    /// ones it killed, with the replicas it saw promoted in their place. Ask
    /// [`PrivateCluster::master_of_slot`] for what the cluster says now.
    pub fn master_ports(&self) -> Vec<u16> {
        self.masters.lock().unwrap().clone()
    }

    /// The slot ranges and their masters' ports (first, last, port), as
    /// `CLUSTER SLOTS` of the first live node that answers says (during a
    /// failover, possibly naming the failed master still).
    pub async fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let mut probe = Probe::default();
        for port in self.ports() {
            if let Some(ranges) = probe.cluster_slots(port).await {
                let mut ranges: Vec<_> = ranges
                    .into_iter()
                    .map(|r| (r.first, r.last, r.master))
                    .collect();
                ranges.sort_unstable();
                return ranges;
            }
        }
        panic!("no live node answered CLUSTER SLOTS\n{}", self.logs());
    }

    /// The port of the master serving `slot`, as
    /// [`PrivateCluster::slot_ranges`] says.
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        assert!(slot < SLOTS, "slot {slot} out of range");
        self.slot_ranges()
            .await
            .into_iter()
            .find(|&(first, last, _)| (first..=last).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// A connection to the whole cluster, as a consumer has it.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster urls")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }

    /// Kills (SIGKILL) the master serving `slot` now.
    pub async fn kill_master_of_slot(&mut self, slot: u16) {
        let port = self.master_of_slot(slot).await;
        let ranges = self
            .slot_ranges()
            .await
            .into_iter()
            .filter(|&(_, _, master)| master == port)
            .map(|(first, last, _)| (first, last))
            .collect();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port && n.alive())
            .unwrap_or_else(|| panic!("slot {slot} is served by {port}, not a live node"));
        node.kill();
        self.masters.lock().unwrap().retain(|&p| p != port);
        self.killed.push(Killed { port, ranges });
    }

    /// After [`PrivateCluster::kill_master_of_slot`]: waits until every live
    /// node says `cluster_state:ok` and that `slot` is served by the same
    /// live master (a promoted replica), which says `role:master`, and every
    /// live replica's link to a live master is up (the killed master's other
    /// replicas follow the promoted one). Returns the new master's port.
    pub async fn wait_for_failover(&self, slot: u16) -> u16 {
        let started = Instant::now();
        let old = self
            .killed
            .iter()
            .rev()
            .find(|k| k.ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|k| k.port)
            .unwrap_or_else(|| panic!("slot {slot}: no master of it was killed"));
        let ports = self.ports();
        let killed: Vec<u16> = self.killed.iter().map(|k| k.port).collect();
        let mut probe = Probe::default();
        let new_master = wait_until(FAILOVER_DEADLINE, "the failover", async || {
            let mut owners = Vec::new();
            for &port in &ports {
                let info = probe
                    .text(port, &["CLUSTER", "INFO"])
                    .await
                    .ok_or_else(|| format!("{port}: no CLUSTER INFO"))?;
                if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    return Err(format!("{port}: cluster_state not ok"));
                }
                let ranges = probe
                    .cluster_slots(port)
                    .await
                    .ok_or_else(|| format!("{port}: no CLUSTER SLOTS"))?;
                owners.push(owner(&ranges, slot));
            }
            let first = owners[0].ok_or_else(|| format!("slot {slot} unserved"))?;
            if owners.iter().any(|&o| o != Some(first)) {
                return Err(format!("nodes disagree on slot {slot}: {owners:?}"));
            }
            if first == old || killed.contains(&first) || !ports.contains(&first) {
                return Err(format!("slot {slot} still served by {first} (killed)"));
            }
            for &port in &ports {
                let info = probe
                    .text(port, &["INFO", "replication"])
                    .await
                    .ok_or_else(|| format!("{port}: no INFO replication"))?;
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix(name))
                        .map(str::to_owned)
                };
                let role = field("role:").unwrap_or_default();
                if port == first && role != "master" {
                    return Err(format!("{port} serves slot {slot} but is {role}"));
                }
                if role == "slave" {
                    let master: u16 = field("master_port:")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    if master == old {
                        return Err(format!("replica {port} still follows {old}"));
                    }
                    if !killed.contains(&master)
                        && field("master_link_status:").as_deref() != Some("up")
                    {
                        return Err(format!("replica {port}: link to {master} not up"));
                    }
                }
            }
            Ok(first)
        })
        .await
        .unwrap_or_else(|e| panic!("{e} (after {:?})\n{}", started.elapsed(), self.logs()));
        let mut masters = self.masters.lock().unwrap();
        if !masters.contains(&new_master) {
            masters.push(new_master);
        }
        new_master
    }

    /// The hash slot of a key, as highwater computes it
    /// (`highwater::connection::slot_of`; tests/cluster_harness.rs checks
    /// it against `CLUSTER KEYSLOT`).
    pub fn slot_of(key: &str) -> u16 {
        highwater::connection::slot_of(key)
    }

    /// Every node's log tail, for failure messages.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} log:\n{}", n.port, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Master `i` of `masters`: its share of the slots, first and last.
fn slot_share(i: usize, masters: usize) -> (u16, u16) {
    let slots = SLOTS as usize;
    let first = i * slots / masters;
    let last = (i + 1) * slots / masters - 1;
    (first as u16, last as u16)
}

/// A direct connection to one node (no cluster redirections followed).
pub async fn node_conn(port: u16) -> redis::aio::MultiplexedConnection {
    try_node_conn(port)
        .await
        .unwrap_or_else(|e| panic!("connect to cluster node {port}: {e}"))
}

/// Locks a master's replicas out of it: drops their connections (`CLIENT
/// KILL TYPE replica`) and refuses their reconnections (a `requirepass`
/// they do not know). Connections open now, `master` and the agent's, go
/// on working, so the master takes writes its replicas never get, as a
/// replication lag leaves them.
pub async fn lock_out_replicas(master: &mut redis::aio::MultiplexedConnection, password: &str) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query_async(master)
        .await
        .expect("CONFIG SET requirepass");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(master)
        .await
        .expect("CLIENT KILL TYPE replica");
}

async fn try_node_conn(port: u16) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .map_err(|e| format!("redis url: {e}"))?;
    match tokio::time::timeout(PROBE_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {PROBE_TIMEOUT:?}")),
    }
}

/// Two ports for a node: `port` and `port + 10000` (its cluster bus) both
/// free right now, neither in `taken`.
fn node_ports(taken: &[u16]) -> u16 {
    loop {
        let port = free_port();
        if port == 0 || port >= u16::MAX - BUS_OFFSET {
            continue;
        }
        let bus = port + BUS_OFFSET;
        if [port, bus].iter().any(|p| taken.contains(p)) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

fn spawn_node(port: u16, extra_args: &[&str]) -> Node {
    let dir = tempfile::tempdir().expect("temp dir");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(dir.path().join("redis.log"))
        .args(["--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        // A replica's full sync starts at once (the default waits 5 s for
        // more replicas to share the transfer).
        .args(["--repl-diskless-sync-delay", "0"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (is it installed? ./scripts/test installs it)");
    Node {
        port,
        child: Some(child),
        dir,
        id: String::new(),
    }
}

/// Starts `count` nodes at once, each on ports of its own; a node that does
/// not come up (its port taken meanwhile by someone else) is started again
/// on other ports.
async fn start_nodes(count: usize, extra_args: &[&str]) -> Vec<Node> {
    let mut taken = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..count {
        let port = node_ports(&taken);
        taken.extend([port, port + BUS_OFFSET]);
        nodes.push(spawn_node(port, extra_args));
    }
    for node in &mut nodes {
        let mut failures = Vec::new();
        loop {
            match wait_up(node).await {
                Ok(()) => break,
                Err(e) => {
                    failures.push(e);
                    assert!(
                        failures.len() < START_ATTEMPTS,
                        "a cluster node did not start:\n{}",
                        failures.join("\n")
                    );
                    let port = node_ports(&taken);
                    taken.extend([port, port + BUS_OFFSET]);
                    *node = spawn_node(port, extra_args); // the old one is killed
                }
            }
        }
    }
    nodes
}

/// Waits until the node answers PING and is the process we started (not
/// another test's server that got the port first).
async fn wait_up(node: &mut Node) -> Result<(), String> {
    let start = Instant::now();
    let pid = node.child.as_ref().expect("a live node").id();
    loop {
        if let Some(status) = node.child.as_mut().unwrap().try_wait().expect("try_wait") {
            node.child = None;
            return Err(format!(
                "redis-server on {} exited ({status}):\n{}",
                node.port,
                node.log_tail()
            ));
        }
        if let Ok(mut conn) = try_node_conn(node.port).await {
            let info = tokio::time::timeout(
                PROBE_TIMEOUT,
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn),
            )
            .await;
            if let Ok(Ok(info)) = info {
                let theirs = info
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("process_id:"))
                    .and_then(|p| p.parse::<u32>().ok());
                if theirs == Some(pid) {
                    return Ok(());
                }
                // Someone else's server holds the port: ours will fail to bind.
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            node.kill();
            return Err(format!(
                "redis-server on {} did not answer within 10 s:\n{}",
                node.port,
                node.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` every 50 ms until it is `Ok`, or returns its last error
/// (with `what`) after `deadline`.
async fn wait_until<T>(
    deadline: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if start.elapsed() > deadline {
            return Err(format!(
                "timed out after {deadline:?} waiting for {what}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, `-` for a master.
    master: String,
    link: String,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn parse_cluster_nodes(text: &str) -> Option<Vec<NodeLine>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let addr = fields[1].split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().unwrap_or(0);
            Some(NodeLine {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master: fields[3].to_owned(),
                link: fields[7].to_owned(),
            })
        })
        .collect()
}

/// A range of `CLUSTER SLOTS`: its slots and its master's port.
#[derive(Debug)]
struct SlotRange {
    first: u16,
    last: u16,
    master: u16,
}

fn owner(ranges: &[SlotRange], slot: u16) -> Option<u16> {
    ranges
        .iter()
        .find(|r| (r.first..=r.last).contains(&slot))
        .map(|r| r.master)
}

fn parse_cluster_slots(value: &Value) -> Option<Vec<SlotRange>> {
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let Value::Array(ranges) = value else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else {
                return None;
            };
            let Value::Array(master) = fields.get(2)? else {
                return None;
            };
            Some(SlotRange {
                first: int(fields.first()?)?,
                last: int(fields.get(1)?)?,
                master: int(master.get(1)?)?,
            })
        })
        .collect()
}

/// Connections to nodes kept across the polls of a wait, reconnected after
/// an error; every answer `None` on failure or timeout.
#[derive(Default)]
struct Probe {
    conns: HashMap<u16, redis::aio::MultiplexedConnection>,
}

impl Probe {
    async fn value(&mut self, port: u16, args: &[&str]) -> Option<Value> {
        let conn = match self.conns.get_mut(&port) {
            Some(conn) => conn,
            None => {
                let conn = try_node_conn(port).await.ok()?;
                self.conns.entry(port).or_insert(conn)
            }
        };
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        match tokio::time::timeout(PROBE_TIMEOUT, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(value)) => Some(value),
            _ => {
                self.conns.remove(&port);
                None
            }
        }
    }

    async fn text(&mut self, port: u16, args: &[&str]) -> Option<String> {
        match self.value(port, args).await? {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Value::VerbatimString { text, .. } => Some(text),
            Value::SimpleString(text) => Some(text),
            _ => None,
        }
    }

    async fn cluster_nodes(&mut self, port: u16) -> Option<Vec<NodeLine>> {
        parse_cluster_nodes(&self.text(port, &["CLUSTER", "NODES"]).await?)
    }

    async fn cluster_slots(&mut self, port: u16) -> Option<Vec<SlotRange>> {
        parse_cluster_slots(&self.value(port, &["CLUSTER", "SLOTS"]).await?)
    }
}

/// (pkey, payload `v`) of every entry of a stream, in stream order, for
/// tests whose rows carry a version column `v`; `cluster`: read through a
/// cluster connection, else from the local Redis.
pub async fn stream_versions(cluster: Option<&PrivateCluster>, stream: &str) -> Vec<(i64, i64)> {
    let mut xrange = redis::cmd("XRANGE");
    xrange.arg(stream).arg("-").arg("+");
    let reply: redis::streams::StreamRangeReply = match cluster {
        Some(cluster) => xrange.query_async(&mut cluster.conn().await).await,
        None => {
            xrange
                .query_async(&mut crate::common::redis_conn().await)
                .await
        }
    }
    .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let text = |field: &str| match entry.map.get(field) {
                Some(redis::Value::BulkString(v)) => String::from_utf8_lossy(v).into_owned(),
                other => panic!("entry {} has no {field}: {other:?}", entry.id),
            };
            let payload: serde_json::Value =
                serde_json::from_str(&text("payload")).expect("payload is JSON");
            (
                text("pkey").parse().expect("integer keys"),
                payload["v"].as_i64().expect("v"),
            )
        })
        .collect()
}
