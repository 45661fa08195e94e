//! A Redis Cluster master failing over under a model run: the master that
//! serves the entity's slot killed with SIGKILL and one of its replicas
//! promoted, in the middle of a cycle or after the replicas were locked out
//! of it (so that the promoted one lacks the master's last writes); what
//! the promoted replica kept of the stream is measured, and how the agent
//! got through it.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::cluster::{lock_out_replicas, node_conn, PrivateCluster};
use crate::model::agent;
use crate::model::consumer::parse_entries;
use crate::model::run::{ModelRun, ENTITY};
use crate::model::workload;

/// How long the kill waits for a chunk to land on the master.
// With the replicas shut out, each cycle's WAIT for them takes the agent's
// Redis timeout (5 s in the model's config) before the cycle fails, and
// the agent's next writes to that node queue behind it.
const GROWTH_DEADLINE: Duration = Duration::from_secs(20);

/// How long after the failover the agent may take to complete a cycle.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);

/// The stream entries read from the master just before the kill, to tell
/// which of them the promoted replica lacks: more than a failover can roll
/// back here (the writes of well under a second).
const SNAPSHOT: usize = 1_000;

/// The password that locks the replicas out of a master
/// ([`FailoverKind::LaggingReplica`]).
const LOCKOUT: &str = "model-replicas-locked-out";

/// How the entity's master is failed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverKind {
    /// Killed right after a chunk landed on it (a cycle in flight), its
    /// replicas as up to date as asynchronous replication keeps them on
    /// one machine: whatever they lack is rolled back.
    MidCycle,
    /// The master first drops its replicas' connections (`CLIENT KILL TYPE
    /// replica`) and refuses their reconnections (a `requirepass` they do
    /// not know; connections open now, the agent's, keep working), then is
    /// killed once a chunk landed on it alone, its writes paused for the
    /// last instant (`CLIENT PAUSE WRITE`): the promoted replica lacks
    /// that chunk and everything after the lock-out. The slot's keys roll
    /// back together (stream, dedup state, watermark, lease), as a
    /// replication lag makes them roll back.
    LaggingReplica,
}

/// What one failover did.
#[derive(Clone, Debug)]
pub struct Failover {
    pub kind: FailoverKind,
    /// The killed master's port and the promoted replica's.
    pub old: u16,
    pub new: u16,
    /// Stream entries the old master held just before the kill and the
    /// promoted replica did not, as `pkey:v` (exact for
    /// [`FailoverKind::LaggingReplica`]; a lower bound otherwise, as the
    /// agent may write between the read and the kill).
    pub rolled_back: Vec<String>,
    /// From the kill until every live node agreed on the promoted master.
    pub took: Duration,
    /// From the kill until the end of the first completed cycle that
    /// started after the failover.
    pub recovered: Duration,
    /// `cycle failed` (transient) events of agent 0 from the kill to that
    /// cycle.
    pub failed: usize,
    /// `cycle failed; fix the query, data or config` (not transient)
    /// events in the same span.
    pub fatal: usize,
}

impl ModelRun {
    /// Kills the master serving the entity's slot as `kind` says, waits
    /// for its replica's promotion, then for a cycle of agent 0 that
    /// started after it to complete.
    ///
    /// `restart_agent`: agent 0 is killed with kill -9 right after the
    /// master and started again while the cluster is still failing over.
    pub async fn fail_over_entity_master(
        &mut self,
        kind: FailoverKind,
        restart_agent: bool,
    ) -> Failover {
        let slot = PrivateCluster::slot_of(ENTITY);
        let old = self.redis.cluster_mut().master_of_slot(slot).await;
        let mut master = node_conn(old).await;
        let lagging = kind == FailoverKind::LaggingReplica;
        if lagging {
            lock_out_replicas(&mut master, LOCKOUT).await;
        }
        wait_for_growth(&mut master, self.seed).await;
        if lagging {
            let () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(10_000)
                .arg("WRITE")
                .query_async(&mut master)
                .await
                .expect("CLIENT PAUSE WRITE");
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut master)
                .await
                .expect("INFO replication");
            assert!(
                info.lines().any(|l| l.trim() == "connected_slaves:0"),
                "a replica got back to master {old} while locked out of it:\n{info}"
            );
        }
        let snapshot = parse_entries(
            redis::cmd("XREVRANGE")
                .arg(ENTITY)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(SNAPSHOT)
                .query_async(&mut master)
                .await
                .expect("XREVRANGE on the master"),
        );

        let from = self.log.len();
        let started = Instant::now();
        self.redis.cluster_mut().kill_master_of_slot(slot).await;
        if restart_agent {
            self.agent().kill9();
            self.count_fault("kill9_during_failover");
            let down = self.random_ms(0, 1000);
            tokio::time::sleep(down).await;
            self.start_agent(None);
        }
        let new = self.redis.cluster_mut().wait_for_failover(slot).await;
        let took = started.elapsed();
        let failed_over_at = workload::now_micros();

        // What the promoted replica kept of the old master's last entries
        // (the agent's entries since the promotion come after them).
        let rolled_back = match (snapshot.last(), snapshot.first()) {
            (Some(oldest), Some(newest)) => {
                let mut promoted = node_conn(new).await;
                let kept: HashSet<String> = parse_entries(
                    redis::cmd("XRANGE")
                        .arg(ENTITY)
                        .arg(&oldest.id)
                        .arg(&newest.id)
                        .query_async(&mut promoted)
                        .await
                        .expect("XRANGE on the promoted master"),
                )
                .into_iter()
                .map(|m| m.id)
                .collect();
                snapshot
                    .iter()
                    .rev()
                    .filter(|m| !kept.contains(&m.id))
                    .map(|m| {
                        let v = m.payload.as_ref().and_then(|p| p["v"].as_i64());
                        format!("{}:{}", m.pkey, v.unwrap_or(-1))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };

        self.wait_for_events(from, "cycle", 1, RECOVERY_DEADLINE, |e| {
            let start = agent::timestamp(e).zip(e["duration_ms"].as_i64());
            e["interrupted"] != true
                && start.is_some_and(|(end, ms)| end - (ms + 1) * 1000 > failed_over_at)
        })
        .await;
        let recovered = started.elapsed();
        let failed = self.log.named_since(from, "cycle failed").len();
        let fatal = self
            .log
            .named_since(from, "cycle failed; fix the query, data or config")
            .len();
        self.count_fault(match kind {
            FailoverKind::MidCycle => "failover_mid_cycle",
            FailoverKind::LaggingReplica => "failover_lagging_replica",
        });
        Failover {
            kind,
            old,
            new,
            rolled_back,
            took,
            recovered,
            failed,
            fatal,
        }
    }

    /// Agent 0's warnings and errors, by level and message, with counts.
    pub fn warnings_and_errors(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for event in self.log.events_since(0) {
            let level = event["level"].as_str().unwrap_or_default();
            if level == "WARN" || level == "ERROR" {
                let message = event["message"].as_str().unwrap_or_default();
                *counts.entry(format!("{level} {message}")).or_default() += 1;
            }
        }
        counts
    }
}

/// Waits until the stream on `master` grows (a chunk landed), polling
/// every 2 ms.
async fn wait_for_growth(master: &mut redis::aio::MultiplexedConnection, seed: u64) {
    let mut xlen = redis::cmd("XLEN");
    xlen.arg(ENTITY);
    let before: usize = xlen.query_async(master).await.expect("XLEN");
    let started = Instant::now();
    loop {
        let now: usize = xlen.query_async(master).await.expect("XLEN");
        if now > before {
            return;
        }
        assert!(
            started.elapsed() < GROWTH_DEADLINE,
            "no chunk landed on the entity's master within {GROWTH_DEADLINE:?} (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
