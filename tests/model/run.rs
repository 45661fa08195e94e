//! One scenario's run: its database tables and writers, its private Redis
//! (one server, or a cluster), maybe a proxy in front of the database, the
//! agents' config, the agent processes (one, or several sharing the config
//! through leases, each restarted as often as the scenario likes, each with
//! its own log), and at the end the catch-up, the check and the one-line
//! report.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::cluster::PrivateCluster;
use crate::common::Message;
use crate::model::agent::{self, AgentLog, AgentProcess};
use crate::model::checker::{self, Counts};
use crate::model::consumer::{parse_entries, GroupConsumer, GROUP};
use crate::model::proxy::Proxy;
use crate::model::redis_server::{ModelRedis, RedisOptions, RedisServer};
use crate::model::workload::{
    self, url_via, Backend, Db, Tables, Timings, Workload, WorkloadSettings,
};

/// The entity (and stream) name in every scenario.
pub const ENTITY: &str = "items";

/// `HIGHWATER_SOAK=1`: more faults, longer runs.
pub fn soak() -> bool {
    std::env::var("HIGHWATER_SOAK").is_ok_and(|v| v == "1")
}

/// `normal` faults, or `soak` with `HIGHWATER_SOAK=1`.
pub fn faults(normal: usize, soak_faults: usize) -> usize {
    if soak() {
        soak_faults
    } else {
        normal
    }
}

/// What a scenario changes in the defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    pub scenario: &'static str,
    pub backend: Backend,
    pub lookback: &'static str,
    /// The entity's `max_lookback`, if set (else the agent's default, 1h):
    /// how far back an open transaction may stretch the window; equal to
    /// `lookback` it turns the extension off.
    pub max_lookback: Option<&'static str>,
    pub chunk_rows: Option<usize>,
    pub on_state_loss: &'static str,
    /// The source's `timeout`.
    pub source_timeout: &'static str,
    pub redis: RedisOptions,
    /// A private Redis Cluster (3 masters, [`Settings::cluster_replicas`]
    /// replicas each) instead of the private server; `redis` is ignored.
    /// What only one server does (restarts, `FLUSHALL`, memory, a slow
    /// group) is not available.
    pub cluster: bool,
    /// Replicas per master of the cluster: each lets the entity's slot
    /// fail over once more.
    pub cluster_replicas: usize,
    pub pause_at_memory: Option<f64>,
    /// The agent reaches the database through a [`Proxy`].
    pub through_proxy: bool,
    /// Rows inserted before the agent starts.
    pub preload: i64,
    pub workload: WorkloadSettings,
    /// How long [`ModelRun::finish`] waits for the agent to catch up.
    pub catch_up: Duration,
    /// Agents running the config side by side, each a process with its own
    /// log (slots `0..agents`).
    pub agents: usize,
    /// `[agent] lease`, if set.
    pub lease: Option<&'static str>,
    /// Every agent runs with `HIGHWATER_UNFENCED=1`: no leases, every agent
    /// writes the entity (the honesty check of the fence).
    pub unfenced: bool,
    /// Appended to the polling query (`AND ...`): a per-row sleep makes
    /// cycles long, so that pauses land in their middle.
    pub query_filter: &'static str,
    /// The entity's `max_stream_length` (0: no cap).
    pub max_stream_length: u64,
    /// The entity's `hard_max_stream_length`, if set: the cap that drops
    /// entries whether the groups acknowledged them or not.
    pub hard_max_stream_length: Option<u64>,
    /// A consumer group on the stream, created before the agent starts and
    /// read slowly through the whole run by a [`GroupConsumer`]: the
    /// checker judges what the group was delivered, not the stream (which
    /// the retention trims).
    pub slow_group: bool,
    /// The entity's `partitions` (1: one stream, `items`, and no
    /// `partitions` line in the config): above 1, the rows go to the
    /// streams `items:0` … by CRC-32 of the key, and the checker reads
    /// them all.
    pub partitions: u32,
}

impl Settings {
    pub fn new(scenario: &'static str, backend: Backend) -> Settings {
        Settings {
            scenario,
            backend,
            // Longer than the longest transaction (2 s) plus 1 s of
            // DATETIME truncation, with a margin.
            lookback: "4s",
            max_lookback: None,
            chunk_rows: None,
            on_state_loss: "fail",
            source_timeout: "5s",
            redis: RedisOptions::default(),
            cluster: false,
            cluster_replicas: 1,
            pause_at_memory: None,
            through_proxy: false,
            preload: 0,
            workload: WorkloadSettings::default(),
            catch_up: Duration::from_secs(if soak() { 90 } else { 45 }),
            agents: 1,
            lease: None,
            unfenced: false,
            query_filter: "",
            max_stream_length: 0,
            hard_max_stream_length: None,
            slow_group: false,
            partitions: 1,
        }
    }
}

/// The seed: `HIGHWATER_SEED`, else a fresh one.
fn seed() -> u64 {
    match std::env::var("HIGHWATER_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("HIGHWATER_SEED={text:?} is not a number")),
        Err(_) => rand::rng().random_range(1..1_000_000_000),
    }
}

pub struct ModelRun {
    pub settings: Settings,
    pub seed: u64,
    /// Decides the scenario's faults and timings (the writers have their own).
    pub rng: StdRng,
    pub db: Db,
    pub tables: Tables,
    pub redis: ModelRedis,
    pub proxy: Option<Proxy>,
    pub config: PathBuf,
    /// The log of agent 0 (every run of it), the only one of most scenarios.
    pub log: AgentLog,
    /// Each agent slot's log: every run of that slot.
    pub logs: Vec<AgentLog>,
    /// Each slot's process, once started.
    agents: Vec<Option<AgentProcess>>,
    /// When each slot's process was paused (SIGSTOP to SIGCONT, µs since
    /// 1970): its cycles around a pause are not given to the checker.
    pauses: Vec<Vec<(i64, i64)>>,
    /// Poll interval of the entity (milliseconds), drawn from the seed.
    pub every_ms: u64,
    pub chunk_rows: usize,
    workload: Option<Workload>,
    timings: Timings,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Scenario facts for the report line (`mid_cycle=3`).
    notes: Vec<String>,
    /// Messages read so far by [`ModelRun::drain`], for scenarios where
    /// Redis loses the stream.
    collected: Vec<Message>,
    last_id: String,
    /// The slow consumer group of [`Settings::slow_group`].
    group: Option<GroupConsumer>,
    /// Where [`ModelRun::save_log`] writes (a file per agent), created by
    /// its first call.
    log_files: OnceLock<Vec<PathBuf>>,
    /// Messages found on another stream than their key's partition (or on
    /// the entity's own stream while it is partitioned), by
    /// [`ModelRun::read_partitions`], and a few of them.
    misplaced: usize,
    misplaced_examples: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The result of a scenario.
pub struct Report {
    pub line: String,
    pub counts: Counts,
    /// The last agents' exit status after SIGTERM: the first that is not
    /// success, if any (`None`: one did not exit).
    pub exit: Option<ExitStatus>,
    pub log_tail: String,
    /// What the agents' logs say about leases (runs of several agents).
    pub leases: LeaseCounts,
    /// The slow consumer group's figures (runs with [`Settings::slow_group`]).
    pub group: Option<GroupFigures>,
}

/// What became of the slow consumer group and of the stream it reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupFigures {
    /// Entries the group was delivered (and acknowledged): the messages
    /// the checker judged.
    pub read: usize,
    /// Entries ever added to the stream (XINFO STREAM `entries-added`).
    pub added: u64,
    /// The most entries the group had yet to be delivered at one of its
    /// reads: how far behind the stream's head it fell.
    pub max_lag: u64,
    /// The most entries the stream held at one of the group's reads.
    pub max_len: u64,
    /// Entries delivered after the last cycle the end waited for (its
    /// retention could not trim them yet).
    pub late: usize,
    /// Entries left on the stream at the end.
    pub stream_left: usize,
    /// Entries delivered and never acknowledged, at the end.
    pub pending: u64,
    /// Entries the agent counts as dropped before the group acknowledged
    /// them (the hard cap's count, in the stream's dropped hash).
    pub dropped: u64,
}

/// Lease events in all agents' logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaseCounts {
    /// `took over entity`: a lease taken whose last holder was another agent.
    pub takeovers: usize,
    /// `lost the lease on entity`.
    pub lost: usize,
    /// `the fence refused its write`: a stale holder's cycle stopped by the
    /// fence in its middle.
    pub refused: usize,
}

impl Report {
    /// 0 lost, 0 duplicated, 0 out of order, every message a committed
    /// version, every row's last message its final state, exit 0 on SIGTERM.
    pub fn assert_clean(&self) {
        self.assert_no_loss();
        assert_eq!(
            self.counts.duplicated,
            0,
            "{}\n{}\nagent log:\n{}",
            self.line,
            self.counts.examples.join("\n"),
            self.log_tail
        );
    }

    /// As [`Report::assert_clean`] but duplicates are allowed (Redis lost the
    /// dedup state and the agent re-read everything).
    pub fn assert_no_loss(&self) {
        let c = &self.counts;
        assert!(
            c.lost == 0
                && c.out_of_order == 0
                && c.phantom == 0
                && c.final_mismatch == 0
                && c.misplaced == 0,
            "{}\n{}\nagent log:\n{}",
            self.line,
            c.examples.join("\n"),
            self.log_tail
        );
        assert!(
            self.exit.is_some_and(|s| s.success()),
            "the agent did not exit 0 on SIGTERM: {:?}\n{}\nagent log:\n{}",
            self.exit,
            self.line,
            self.log_tail
        );
    }
}

impl ModelRun {
    /// Sets everything up (tables, preload, Redis, proxy, config) and
    /// starts the writers; the agent is not started.
    pub async fn new(settings: Settings) -> ModelRun {
        let seed = seed();
        println!(
            "model: scenario={} backend={} seed={seed} (replay: HIGHWATER_SEED={seed})",
            settings.scenario,
            settings.backend.name()
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let every_ms = rng.random_range(100..=300);
        let chunk_rows = settings
            .chunk_rows
            .unwrap_or_else(|| rng.random_range(2..=10));

        let writers = settings.workload.writers + settings.workload.long_writers;
        let db = Db::connect(settings.backend, writers as u32 + 2).await;
        let tables = Tables::create(&db, &format!("model_{}", settings.scenario)).await;
        let timings: Timings = Arc::new(Mutex::new(HashMap::new()));
        workload::preload(&db, &tables, settings.preload, &timings).await;

        assert!(
            settings.partitions == 1 || !settings.slow_group,
            "the slow consumer group reads one stream, not partitions"
        );
        let redis = if settings.cluster {
            assert!(
                !settings.slow_group,
                "the slow consumer group reads one server"
            );
            ModelRedis::Cluster(PrivateCluster::start(3, settings.cluster_replicas, &[]).await)
        } else {
            ModelRedis::Server(RedisServer::start(settings.redis.clone()).await)
        };
        let redis_url = redis.config_url(ENTITY).await;
        let proxy = if settings.through_proxy {
            Some(Proxy::start(settings.backend.address()).await)
        } else {
            None
        };
        let source_url = match &proxy {
            Some(proxy) => url_via(&settings.backend.url(), proxy.addr),
            None => settings.backend.url(),
        };

        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("highwater.toml");
        let pause = settings
            .pause_at_memory
            .map(|p| format!("pause_at_memory = {p}\n"))
            .unwrap_or_default();
        let agent = settings
            .lease
            .map(|lease| format!("[agent]\nlease = \"{lease}\"\n\n"))
            .unwrap_or_default();
        let text = format!(
            r#"{agent}[redis]
url = "{redis}"
key_prefix = "hw"
timeout = "5s"
{pause}
[http]
listen = ""

[sources.db]
url = "{source_url}"
max_connections = 2
timeout = "{source_timeout}"

[entities.{ENTITY}]
source = "db"
query = "{query}{filter}"
key = "id"
cursor = "updated_at"
lookback = "{lookback}"
{max_lookback}every = "{every_ms}ms"
start = "beginning"
chunk_rows = {chunk_rows}
{partitions}max_stream_length = {max_stream_length}
{hard_max}delete_column = "deleted"
on_state_loss = "{on_state_loss}"
"#,
            redis = redis_url,
            source_timeout = settings.source_timeout,
            query = tables.query(),
            filter = settings.query_filter,
            lookback = settings.lookback,
            max_lookback = settings
                .max_lookback
                .map(|m| format!("max_lookback = \"{m}\"\n"))
                .unwrap_or_default(),
            on_state_loss = settings.on_state_loss,
            max_stream_length = settings.max_stream_length,
            partitions = if settings.partitions > 1 {
                format!("partitions = {}\n", settings.partitions)
            } else {
                String::new()
            },
            hard_max = settings
                .hard_max_stream_length
                .map(|n| format!("hard_max_stream_length = {n}\n"))
                .unwrap_or_default(),
        );
        std::fs::write(&config, text).expect("write config");
        let group = if settings.slow_group {
            let group_seed = rng.random();
            Some(GroupConsumer::start(redis.server().conn().await, ENTITY, group_seed).await)
        } else {
            None
        };

        let workload = Workload::start(
            db.clone(),
            tables.clone(),
            settings.workload.clone(),
            seed,
            settings.preload,
            Arc::clone(&timings),
        );
        let logs: Vec<AgentLog> = (0..settings.agents.max(1))
            .map(|_| AgentLog::default())
            .collect();
        ModelRun {
            seed,
            rng,
            db,
            tables,
            redis,
            proxy,
            config,
            log: logs[0].clone(),
            agents: logs.iter().map(|_| None).collect(),
            pauses: logs.iter().map(|_| Vec::new()).collect(),
            logs,
            settings,
            every_ms,
            chunk_rows,
            workload: Some(workload),
            timings,
            faults: BTreeMap::new(),
            notes: Vec::new(),
            collected: Vec::new(),
            last_id: "0".into(),
            group,
            log_files: OnceLock::new(),
            misplaced: 0,
            misplaced_examples: Vec::new(),
            _dir: dir,
        }
    }

    /// Starts agent 0 (its previous process must have exited).
    pub fn start_agent(&mut self, crash_at: Option<&str>) {
        self.start_agent_at(0, crash_at);
    }

    /// Starts agent `slot` (its previous process must have exited).
    pub fn start_agent_at(&mut self, slot: usize, crash_at: Option<&str>) {
        if let Some(agent) = &mut self.agents[slot] {
            assert!(
                agent.exited().is_some(),
                "start_agent_at({slot}) while its previous process runs"
            );
        }
        self.agents[slot] = Some(self.launch(slot, crash_at));
    }

    fn launch(&self, slot: usize, crash_at: Option<&str>) -> AgentProcess {
        let env: &[(&str, &str)] = if self.settings.unfenced {
            &[("HIGHWATER_UNFENCED", "1")]
        } else {
            &[]
        };
        AgentProcess::start(&self.config, &self.logs[slot], crash_at, env)
    }

    /// Agent 0's process.
    pub fn agent(&mut self) -> &mut AgentProcess {
        self.agent_at(0)
    }

    pub fn agent_at(&mut self, slot: usize) -> &mut AgentProcess {
        self.agents[slot].as_mut().expect("the agent was started")
    }

    /// Whether agent `slot`'s process runs.
    pub fn running(&mut self, slot: usize) -> bool {
        self.agents[slot]
            .as_mut()
            .is_some_and(|agent| agent.exited().is_none())
    }

    /// A rolling restart of agent `slot`: its successor starts, then the
    /// old process gets SIGTERM, which must exit 0 promptly.
    pub async fn roll_agent(&mut self, slot: usize) {
        let successor = self.launch(slot, None);
        let mut old = self.agents[slot]
            .replace(successor)
            .expect("the agent was started");
        old.sigterm();
        let status = old.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "SIGTERM of agent {slot} (rolling restart) must exit 0 promptly, got {status:?} (seed {}); its log:\n{}",
            self.seed,
            self.logs[slot].tail(30)
        );
    }

    /// Pauses agent `slot` (SIGSTOP) for `length`, then resumes it (SIGCONT).
    pub async fn pause_agent(&mut self, slot: usize, length: Duration) {
        let from = workload::now_micros();
        self.agent_at(slot).pause();
        tokio::time::sleep(length).await;
        self.agent_at(slot).resume();
        self.pauses[slot].push((from, workload::now_micros()));
    }

    /// Pauses agent `slot` (SIGSTOP) until agent `successor`'s log says it
    /// took the entity over, then `extra` longer, and resumes it (SIGCONT):
    /// the paused holder goes on with its cycle while its successor's
    /// first one runs. Returns how long it was paused.
    pub async fn pause_agent_past_takeover(
        &mut self,
        slot: usize,
        successor: usize,
        extra: Duration,
    ) -> Duration {
        let from = workload::now_micros();
        let started = Instant::now();
        let lines = self.logs[successor].len();
        self.agent_at(slot).pause();
        let deadline = Duration::from_secs(15);
        while !self.logs[successor].lines()[lines..]
            .iter()
            .any(|l| l.contains("took over entity"))
        {
            if started.elapsed() > deadline {
                self.agent_at(slot).resume();
                panic!(
                    "timed out after {deadline:?} waiting for agent {successor} to take over from paused agent {slot} (seed {}); logs in {}",
                    self.seed,
                    self.save_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(extra).await;
        self.agent_at(slot).resume();
        self.pauses[slot].push((from, workload::now_micros()));
        started.elapsed()
    }

    /// Which agent slot holds the entity's lease now (its value ends with
    /// the holder's id, `<hostname>-<pid>`).
    pub async fn holder(&mut self) -> Option<usize> {
        let value: Option<String> = self
            .redis_query(redis::cmd("GET").arg(format!("hw:{{{ENTITY}}}:lease:{ENTITY}")))
            .await;
        let value = value?;
        (0..self.agents.len()).find(|&slot| {
            self.agents[slot]
                .as_ref()
                .is_some_and(|a| value.ends_with(&format!("-{}", a.pid())))
        })
    }

    /// Waits until a running agent holds the entity's lease.
    pub async fn wait_for_holder(&mut self, deadline: Duration) -> usize {
        let started = Instant::now();
        loop {
            if let Some(slot) = self.holder().await {
                if self.running(slot) {
                    return slot;
                }
            }
            assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for a running agent to hold the lease (seed {}); logs in {}",
                self.seed,
                self.save_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many lines of all agents' logs contain `text`.
    pub fn count_in_logs(&self, text: &str) -> usize {
        self.logs.iter().map(|l| l.count_containing(text)).sum()
    }

    /// Waits until an agent's polling query runs on the database: a cycle
    /// is reading its window (PostgreSQL's `pg_stat_activity`).
    pub async fn wait_polling_query(&self, deadline: Duration) {
        let Db::Pg(pool) = &self.db else {
            panic!("wait_polling_query reads PostgreSQL's pg_stat_activity");
        };
        // The polling query; none of the writers' statements has this.
        let pattern = format!("%FROM {} WHERE%", self.tables.table);
        let started = Instant::now();
        loop {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE $1",
            )
            .bind(&pattern)
            .fetch_one(pool)
            .await
            .expect("read pg_stat_activity");
            if running > 0 {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for an agent's polling query to run (seed {}); logs in {}",
                self.seed,
                self.save_log()
            );
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }

    pub fn count_fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    pub fn note(&mut self, fact: String) {
        self.notes.push(fact);
    }

    pub fn total_faults(&self) -> usize {
        self.faults.values().sum()
    }

    /// A random duration in `[min_ms, max_ms]` from the scenario's seed.
    pub fn random_ms(&mut self, min_ms: u64, max_ms: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(min_ms..=max_ms))
    }

    /// Writes each agent's whole log (every run) to a file kept after the
    /// test, for a failure message: returns their paths.
    pub fn save_log(&self) -> String {
        let paths = self.log_files.get_or_init(|| {
            (0..self.logs.len())
                .map(|slot| {
                    // A name of its own, not only the seed's: a replay of
                    // this seed running beside it (HIGHWATER_SEED) keeps its
                    // own log.
                    let agent = if self.logs.len() > 1 {
                        format!("agent{slot}-")
                    } else {
                        String::new()
                    };
                    tempfile::Builder::new()
                        .prefix(&format!(
                            "highwater-model-{}-{}-{}-{agent}",
                            self.settings.scenario,
                            self.settings.backend.name(),
                            self.seed
                        ))
                        .suffix(".log")
                        .tempfile()
                        .expect("create the log file")
                        .into_temp_path()
                        .keep()
                        .expect("keep the log file")
                })
                .collect()
        });
        for (path, log) in paths.iter().zip(&self.logs) {
            let _ = std::fs::write(path, log.lines().join("\n"));
        }
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The last `n` lines of each agent's log, for failure messages.
    fn logs_tail(&self, n: usize) -> String {
        if self.logs.len() == 1 {
            return self.log.tail(n);
        }
        self.logs
            .iter()
            .enumerate()
            .map(|(slot, log)| format!("--- agent {slot}:\n{}", log.tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A random integer in `[min, max]` from the scenario's seed.
    pub fn rng_range(&mut self, min: u64, max: u64) -> u64 {
        self.rng.random_range(min..=max)
    }

    pub fn rng_bool(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("a scenario with a proxy")
    }

    /// Runs a command on the private Redis (on a cluster, on the node that
    /// serves its key).
    pub async fn redis_query<T: redis::FromRedisValue>(&self, command: &mut redis::Cmd) -> T {
        let mut conn = self.redis.conn().await;
        command
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("redis command on the private redis: {e}"))
    }

    /// The SHA1 under which the agent's dedup script is cached (computed by
    /// Redis without loading the script).
    pub async fn dedup_script_sha(&self) -> String {
        let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/dedup.lua"))
            .expect("read lua/dedup.lua");
        self.redis_query(
            redis::cmd("EVAL")
                .arg("return redis.sha1hex(ARGV[1])")
                .arg(0)
                .arg(script),
        )
        .await
    }

    /// Waits until the stream grows (a chunk landed), polling every 2 ms.
    pub async fn wait_stream_growth(&self, deadline: Duration) {
        let mut conn = self.redis.conn().await;
        let mut xlen = redis::cmd("XLEN");
        xlen.arg(ENTITY);
        let start: usize = xlen.query_async(&mut conn).await.expect("XLEN");
        let started = Instant::now();
        loop {
            let now: usize = match xlen.query_async(&mut conn).await {
                Ok(n) => n,
                Err(_) => {
                    conn = self.redis.conn().await;
                    continue;
                }
            };
            if now > start {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for the stream to grow (seed {}); log:\n{}",
                self.seed,
                self.log.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Fills Redis with a filler key until `used_memory` is about `ratio`
    /// of `maxmemory` (above 1: every write is refused with OOM).
    pub async fn fill_memory(&self, ratio: f64) {
        let (used, max) = self.redis.server().memory().await;
        let target = (max as f64 * ratio) as u64;
        assert!(target > used, "Redis already uses {used} of {max} bytes");
        let _: i64 = self
            .redis_query(
                redis::cmd("SETRANGE")
                    .arg("model-filler")
                    .arg(target - used)
                    .arg("x"),
            )
            .await;
    }

    pub async fn free_memory(&self) {
        let _: i64 = self
            .redis_query(redis::cmd("DEL").arg("model-filler"))
            .await;
    }

    /// The dedup state agrees with the stream: the sorted set holds exactly
    /// the keys on the stream, each scored with its last message's epoch,
    /// and the digest hash as many keys (for look-backs that trim nothing).
    pub async fn assert_state_matches_stream(&self) {
        let messages: Vec<Message> = parse_entries(
            self.redis_query(redis::cmd("XRANGE").arg(ENTITY).arg("-").arg("+"))
                .await,
        );
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for m in &messages {
            last.insert(m.pkey.clone(), m.epoch);
        }
        let seen: Vec<(String, f64)> = self
            .redis_query(
                redis::cmd("ZRANGE")
                    .arg(format!("hw:{{{ENTITY}}}:seen:{ENTITY}"))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
            )
            .await;
        let seen: BTreeMap<String, i64> = seen.into_iter().map(|(k, s)| (k, s as i64)).collect();
        let digests: usize = self
            .redis_query(redis::cmd("HLEN").arg(format!("hw:{{{ENTITY}}}:digest:{ENTITY}")))
            .await;
        assert!(
            seen == last && digests == seen.len(),
            "the dedup state disagrees with the stream: {} keys on the stream, {} in seen, {digests} digests; first differences: {:?}",
            last.len(),
            seen.len(),
            last.iter()
                .filter(|(k, e)| seen.get(*k) != Some(e))
                .take(5)
                .collect::<Vec<_>>()
        );
    }

    /// Ends a scenario that does not check the stream (it was lost on
    /// purpose): stops the writers and the agent, prints the report line.
    pub async fn close(mut self, facts: &str) -> String {
        if let Some(workload) = self.workload.as_mut() {
            workload.stop().await;
        }
        for agent in self.agents.iter_mut().flatten() {
            if agent.exited().is_none() {
                agent.kill9();
            }
        }
        let faults = self
            .faults
            .iter()
            .map(|(kind, n)| format!(" {kind}={n}"))
            .collect::<String>();
        let line = format!(
            "model: scenario={} backend={} seed={} faults={}{faults} {facts}",
            self.settings.scenario,
            self.settings.backend.name(),
            self.seed,
            self.total_faults(),
        );
        println!("{line}");
        self.tables.drop_all(&self.db).await;
        line
    }

    /// The agent is still running; panics with its log if it exited.
    pub fn assert_agent_running(&mut self, when: &str) {
        let log = self.log.clone();
        if let Some(status) = self.agent().exited() {
            panic!(
                "the agent exited ({status}) {when}; it must keep running\n{}",
                log.tail(40)
            );
        }
    }

    /// Waits until the log has `count` events named `message` from line
    /// `from` on that satisfy `check`; panics with the log after `deadline`.
    pub async fn wait_for_events(
        &self,
        from: usize,
        message: &str,
        count: usize,
        deadline: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let started = Instant::now();
        loop {
            let found: Vec<_> = self
                .log
                .named_since(from, message)
                .into_iter()
                .filter(|e| check(e))
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                started.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {count} {message:?} events (seed {}); whole log in {}; its end:\n{}",
                self.seed,
                self.save_log(),
                self.log.tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A field of the entity's state hash.
    pub async fn state_field(&self, field: &str) -> Option<String> {
        let mut conn = self.redis.conn().await;
        redis::cmd("HGET")
            .arg(format!("hw:{{{ENTITY}}}:state:{ENTITY}"))
            .arg(field)
            .query_async(&mut conn)
            .await
            .expect("HGET state")
    }

    /// Reads the stream's new messages into the collection (as a consumer
    /// would); returns how many it read.
    pub async fn drain(&mut self) -> usize {
        let mut conn = self.redis.conn().await;
        let entries: redis::Value = redis::cmd("XRANGE")
            .arg(ENTITY)
            .arg(format!("({}", self.last_id))
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        self.collect(entries)
    }

    fn collect(&mut self, entries: redis::Value) -> usize {
        let messages = parse_entries(entries);
        if let Some(last) = messages.last() {
            self.last_id = last.id.clone();
        }
        let n = messages.len();
        self.collected.extend(messages);
        n
    }

    /// Redis loses everything at once (`FLUSHALL`), a consumer having read
    /// the stream up to that instant (read and flush in one MULTI/EXEC).
    /// Returns the stream's length at that instant.
    pub async fn flushall_after_draining(&mut self) -> usize {
        // One server: a cluster has no MULTI across nodes for FLUSHALL.
        let mut conn = self.redis.server().conn().await;
        let (length, entries, _): (usize, redis::Value, redis::Value) = redis::pipe()
            .atomic()
            .cmd("XLEN")
            .arg(ENTITY)
            .cmd("XRANGE")
            .arg(ENTITY)
            .arg(format!("({}", self.last_id))
            .arg("+")
            .cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("MULTI XLEN XRANGE FLUSHALL EXEC");
        self.collect(entries);
        // The new stream's ids may be lower than the last one read.
        self.last_id = "0".into();
        length
    }

    /// Redis restarts without persistence (empty), a consumer having read
    /// the stream up to that instant: writes are paused, the stream read,
    /// then the server killed and started again. Returns the stream's
    /// length at that instant.
    pub async fn restart_empty_after_draining(&mut self) -> usize {
        assert!(!self.settings.redis.persistent);
        let mut conn = self.redis.server().conn().await;
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(10_000)
            .arg("WRITE")
            .query_async(&mut conn)
            .await
            .expect("CLIENT PAUSE");
        let length: usize = redis::cmd("XLEN")
            .arg(ENTITY)
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        self.drain().await;
        self.redis.server_mut().restart().await;
        self.last_id = "0".into();
        length
    }

    /// The streams the entity writes: `items`, or `items:0` … with
    /// partitions.
    pub fn streams(&self) -> Vec<String> {
        if self.settings.partitions > 1 {
            (0..self.settings.partitions)
                .map(|p| format!("{ENTITY}:{p}"))
                .collect()
        } else {
            vec![ENTITY.to_owned()]
        }
    }

    /// Every message of every partition stream, partition after partition,
    /// each in its stream's order; counts those that are not on the stream
    /// their key's CRC-32 names, and any entry on the entity's own stream
    /// (a partitioned entity writes none there). Duplicates and order are
    /// judged per row, and a row's messages all come from one stream (else
    /// they are counted here), so the concatenation is as good as any merge.
    async fn read_partitions(&mut self) -> Vec<Message> {
        let mut conn = self.redis.conn().await;
        let mut streams = Vec::new();
        for stream in self.streams() {
            let entries: redis::Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .expect("XRANGE");
            streams.push(parse_entries(entries));
        }
        let unpartitioned: usize = redis::cmd("XLEN")
            .arg(ENTITY)
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        let (misplaced, mut examples) = checker::misplaced(&streams);
        if unpartitioned > 0 {
            examples.push(format!(
                "{unpartitioned} entries on the stream {ENTITY} itself, which a partitioned entity must leave alone"
            ));
        }
        self.note(format!(
            "partition_entries={}",
            streams
                .iter()
                .map(|m| m.len().to_string())
                .collect::<Vec<_>>()
                .join("/")
        ));
        self.misplaced = misplaced + unpartitioned;
        self.misplaced_examples = examples;
        streams.into_iter().flatten().collect()
    }

    /// Stops the writers, lets the agent catch up, stops it with SIGTERM,
    /// checks the stream against the truth and prints the report line.
    /// `from_collection`: use what [`ModelRun::drain`] collected (the stream
    /// was lost on the way) instead of the stream as it is now. With a slow
    /// group, what the group was delivered is checked instead (see
    /// [`ModelRun::settle_group`] for how its end goes).
    pub async fn finish(mut self, from_collection: bool) -> Report {
        let writers = {
            let workload = self.workload.as_mut().expect("writers running");
            workload.stop().await;
            workload.counts.summary()
        };
        let (_, finals) = workload::read_truth(&self.db, &self.tables).await;

        let running = (0..self.agents.len()).any(|slot| self.running(slot));
        if !running {
            self.start_agent(None);
        }
        // Catch up: every row's final version on the stream.
        let deadline = self.settings.catch_up;
        let started = Instant::now();
        let final_versions: HashMap<i64, i64> = finals.iter().map(|r| (r.id, r.v)).collect();
        let mut present: HashMap<i64, bool> = HashMap::new();
        let streams = self.streams();
        let mut stream_read_to = vec!["0".to_owned(); streams.len()];
        let mut group_read_to = 0;
        loop {
            let fresh = if let Some(group) = &self.group {
                // The stream is trimmed behind the group: what it was delivered.
                let fresh = group.received_since(group_read_to);
                group_read_to += fresh.len();
                fresh
            } else if from_collection {
                let before = self.collected.len();
                self.drain().await;
                self.collected[before..].to_vec()
            } else {
                let mut conn = self.redis.conn().await;
                let mut fresh = Vec::new();
                for (stream, read_to) in streams.iter().zip(&mut stream_read_to) {
                    let entries: redis::Value = redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(format!("({read_to}"))
                        .arg("+")
                        .query_async(&mut conn)
                        .await
                        .expect("XRANGE");
                    let messages = parse_entries(entries);
                    if let Some(last) = messages.last() {
                        *read_to = last.id.clone();
                    }
                    fresh.extend(messages);
                }
                fresh
            };
            for message in fresh {
                if let Some(v) = message.payload.as_ref().and_then(|p| p["v"].as_i64()) {
                    if let Ok(id) = message.pkey.parse::<i64>() {
                        if final_versions.get(&id) == Some(&v) {
                            present.insert(id, true);
                        }
                    }
                }
            }
            if present.len() == final_versions.len() {
                break;
            }
            if started.elapsed() > deadline {
                println!(
                    "model: scenario={} seed={}: the agents did not catch up within {deadline:?} ({} of {} rows current)",
                    self.settings.scenario,
                    self.seed,
                    present.len(),
                    final_versions.len()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        if self.group.is_some() {
            self.settle_group().await;
        }

        // Every agent still running gets SIGTERM at once (they hand the
        // entity over as they go); each must exit 0. One that exited by
        // itself (not killed by the scenario) reports its status too.
        for agent in self.agents.iter_mut().flatten() {
            if agent.exited().is_none() {
                agent.sigterm();
            }
        }
        let mut exits = Vec::new();
        for agent in self.agents.iter_mut().flatten() {
            if !agent.killed() {
                exits.push(agent.wait_exit(Duration::from_secs(30)).await);
            }
        }
        let exit = exits
            .iter()
            .copied()
            .find(|e| !e.is_some_and(|s| s.success()))
            .unwrap_or_else(|| exits.first().copied().flatten());

        let group = match self.group.as_mut() {
            Some(group) => {
                let late = group.drain().await;
                let pending = group.pending().await;
                let read = group.received_len();
                let added = group.added().await;
                let (max_lag, max_len, stalls) = (group.max_lag(), group.max_len(), group.stalls());
                let stream_left: usize = self.redis_query(redis::cmd("XLEN").arg(ENTITY)).await;
                let dropped: Option<u64> = self
                    .redis_query(
                        redis::cmd("HGET")
                            .arg(format!("hw:{{{ENTITY}}}:dropped:{ENTITY}"))
                            .arg(GROUP),
                    )
                    .await;
                let figures = GroupFigures {
                    read,
                    added,
                    max_lag,
                    max_len,
                    late,
                    stream_left,
                    pending,
                    dropped: dropped.unwrap_or(0),
                };
                self.note(format!(
                    "stream_added={added} group_read={read} group_max_lag={max_lag} stream_max_len={max_len} group_stalls={stalls} group_pending={pending} stream_left={stream_left} late={late} dropped_unacked={}",
                    figures.dropped
                ));
                Some(figures)
            }
            None => None,
        };
        let messages = if let Some(group) = &self.group {
            group.take_received()
        } else if from_collection {
            self.drain().await;
            std::mem::take(&mut self.collected)
        } else if self.settings.partitions > 1 {
            self.read_partitions().await
        } else {
            let mut conn = self.redis.conn().await;
            let entries: redis::Value = redis::cmd("XRANGE")
                .arg(ENTITY)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .expect("XRANGE");
            parse_entries(entries)
        };
        let leases = LeaseCounts {
            takeovers: self.count_in_logs("took over entity"),
            lost: self.count_in_logs("lost the lease on entity"),
            refused: self.count_in_logs("the fence refused its write"),
        };
        if self.logs.len() > 1 {
            self.note(format!(
                "agents={} takeovers={} leases_lost={} writes_refused={}",
                self.logs.len(),
                leases.takeovers,
                leases.lost,
                leases.refused
            ));
        }
        let (audit, finals) = workload::read_truth(&self.db, &self.tables).await;
        let timings = self.timings.lock().unwrap().clone();
        // Every agent's cycles, but not those around a pause of their agent:
        // a cycle's start is taken as its log line's time minus its
        // duration, and a pause between the two would shift it later than
        // the cycle's real start.
        let cycles: Vec<_> = self
            .logs
            .iter()
            .zip(&self.pauses)
            .flat_map(|(log, pauses)| {
                log.completed_cycles().into_iter().filter(|c| {
                    !pauses
                        .iter()
                        .any(|&(from, until)| from < c.end && until > c.start)
                })
            })
            .collect();
        let mut counts = checker::check(&audit, &finals, &timings, &messages, &cycles);
        counts.misplaced = self.misplaced;
        counts
            .examples
            .extend(std::mem::take(&mut self.misplaced_examples));
        if self.settings.partitions > 1 {
            self.note(format!(
                "partitions={} misplaced={}",
                self.settings.partitions, counts.misplaced
            ));
        }

        let faults = self
            .faults
            .iter()
            .map(|(kind, n)| format!(" {kind}={n}"))
            .collect::<String>();
        let notes = self
            .notes
            .iter()
            .map(|n| format!(" {n}"))
            .collect::<String>();
        let line = format!(
            "model: scenario={} backend={} seed={} faults={}{faults}{notes} {} every={}ms chunk_rows={} {writers}",
            self.settings.scenario,
            self.settings.backend.name(),
            self.seed,
            self.total_faults(),
            counts.figures(),
            self.every_ms,
            self.chunk_rows,
        );
        println!("{line}");
        println!("model: the agents' logs are in {}", self.save_log());
        let clean = counts.lost == 0
            && counts.misplaced == 0
            && counts.duplicated == 0
            && counts.out_of_order == 0
            && counts.phantom == 0
            && counts.final_mismatch == 0;
        if clean {
            self.tables.drop_all(&self.db).await;
        }
        Report {
            line,
            counts,
            exit,
            log_tail: self.logs_tail(60),
            leases,
            group,
        }
    }

    /// The end of a run with a slow group, the agent still polling: the
    /// slow reader stops, the group is drained (every entry delivered and
    /// acknowledged), and a cycle that started after that completes, so
    /// that its retention saw the group with nothing left to read.
    async fn settle_group(&mut self) {
        let group = self.group.as_mut().expect("a slow group");
        group.stop().await;
        group.drain().await;
        let from = self.log.len();
        let drained_at = workload::now_micros();
        self.wait_for_events(from, "cycle", 1, Duration::from_secs(30), |e| {
            let start = agent::timestamp(e).zip(e["duration_ms"].as_i64());
            e["interrupted"] != true
                && start.is_some_and(|(end, ms)| end - (ms + 1) * 1000 > drained_at)
        })
        .await;
    }
}
