//! highwater on a real Redis Cluster (`redis-server` processes of the test's
//! own, tests/common/cluster.rs): every command works, with the entities'
//! keys on different nodes; a restart and a lost state behave as on one
//! server; a master killed mid-run fails over and the agent goes on with
//! nothing lost, doubled or reordered.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::cluster::PrivateCluster;
use common::*;

/// A SQLite table `items` (id, v, updated_at) of its own, and two entities
/// over it on a cluster: `items` and `others`, whose streams fall on
/// different nodes.
struct Fixture {
    env: Env,
    pool: sqlx::SqlitePool,
    config: PathBuf,
}

/// The stream of an entity: its hash tag puts `items` (tag `b`, slot 3300)
/// and `others` (tag `a`, slot 15495) on the first and the third of three
/// masters, whatever the test's prefix.
fn stream_of(env: &Env, entity: &str) -> String {
    let tag = if entity == "items" { "b" } else { "a" };
    format!("{}:{entity}{{{tag}}}", env.prefix)
}

async fn fixture(cluster: &PrivateCluster, every: &str) -> Fixture {
    let env = Env::new();
    let db = env.dir.path().join("source.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')))",
    )
    .await;
    let entity = |name: &str| {
        format!(
            "[entities.{name}]\nsource = \"db\"\nquery = \"SELECT id, v, updated_at FROM items WHERE updated_at >= :since\"\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"10m\"\nevery = \"{every}\"\nstart = \"beginning\"\nstream = \"{}\"\n\n",
            stream_of(&env, name)
        )
    };
    let config = env.file(
        "highwater.toml",
        &format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\ntimeout = \"5s\"\n\n[agent]\nlease = \"2s\"\n\n[http]\nlisten = \"\"\n\n[sources.db]\nurl = \"{}\"\n\n{}{}",
            cluster.url(),
            env.prefix,
            sqlite_url(&db),
            entity("items"),
            entity("others"),
        ),
    );
    Fixture { env, pool, config }
}

impl Fixture {
    fn stream(&self, entity: &str) -> String {
        stream_of(&self.env, entity)
    }

    fn run(&self, command: &[&str]) -> (bool, String, String) {
        let mut args = command.to_vec();
        args.extend(["--config", self.config.to_str().unwrap()]);
        let out = highwater(&args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn run_ok(&self, command: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(command);
        assert!(
            ok,
            "highwater {command:?} failed:\nstdout: {stdout}\nstderr: {stderr}"
        );
        stdout
    }
}

/// The stream as (pkey, v) in stream order.
async fn versions(cluster: &PrivateCluster, stream: &str) -> Vec<(i64, i64)> {
    common::cluster::stream_versions(Some(cluster), stream).await
}

async fn insert(pool: &sqlx::SqlitePool, from: i64, to: i64) {
    sqlite_exec(
        pool,
        &format!(
            "INSERT INTO items (id, v) WITH RECURSIVE c(x) AS (SELECT {from} UNION ALL SELECT x + 1 FROM c WHERE x < {to}) SELECT x, 1 FROM c"
        ),
    )
    .await;
}

#[tokio::test]
async fn once_on_a_cluster_emits_every_insert_once_then_nothing_and_updates_in_order() {
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    let f = fixture(&cluster, "1h").await;
    let (a, b) = (
        PrivateCluster::slot_of(&f.stream("items")),
        PrivateCluster::slot_of(&f.stream("others")),
    );
    assert_ne!(
        cluster.master_of_slot(a).await,
        cluster.master_of_slot(b).await,
        "the two streams are on different nodes (else pick other names)"
    );
    insert(&f.pool, 1, 1000).await;
    let out = f.run_ok(&["once"]);
    assert!(out.contains("items: 1000 rows read, 1000 emitted"), "{out}");
    assert!(
        out.contains("others: 1000 rows read, 1000 emitted"),
        "{out}"
    );
    let out = f.run_ok(&["once"]);
    assert!(out.contains("items: 1000 rows read, 0 emitted"), "{out}");

    for v in 2..=11 {
        sqlite_exec(
            &f.pool,
            &format!("UPDATE items SET v = {v}, updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = 7"),
        )
        .await;
        let out = f.run_ok(&["once"]);
        assert!(out.contains("items: 1000 rows read, 1 emitted"), "{out}");
    }
    for entity in ["items", "others"] {
        let all = versions(&cluster, &f.stream(entity)).await;
        assert_eq!(all.len(), 1010, "{entity}");
        let of_7: Vec<i64> = all
            .iter()
            .filter(|(k, _)| *k == 7)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(
            of_7,
            (1..=11).collect::<Vec<_>>(),
            "{entity}: every version once, in order"
        );
    }
}

#[tokio::test]
async fn check_status_wait_and_tail_work_on_a_cluster() {
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    let f = fixture(&cluster, "200ms").await;
    insert(&f.pool, 1, 5).await;

    let report = f.run_ok(&["check"]);
    assert!(
        report.contains("a Redis Cluster of 3 primaries"),
        "{report}"
    );
    let node = cluster
        .master_of_slot(PrivateCluster::slot_of(&f.stream("items")))
        .await;
    assert!(
        report.contains(&format!(
            "entity items: stream {} is in slot {}, served by 127.0.0.1:{node}, which has no replica: cycles do not wait for one",
            f.stream("items"),
            PrivateCluster::slot_of(&f.stream("items"))
        )),
        "{report}"
    );
    assert!(!report.contains("error:"), "{report}");

    let agent = Agent::start(&f.config);
    let out = f.run_ok(&["wait", "--timeout", "20s"]);
    assert!(out.contains("items: cycle started"), "{out}");
    let status = f.run_ok(&["status"]);
    assert!(
        status.contains(&format!("stream        {}: 5 entries", f.stream("items"))),
        "{status}"
    );
    assert!(status.contains("held by"), "{status}");

    // tail, as a consumer group: the five rows and one more.
    let config = f.config.to_str().unwrap().to_owned();
    let tail = std::thread::spawn(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_highwater"))
            .args([
                "tail",
                "--config",
                &config,
                "items",
                "--from-start",
                "--group",
                "g",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start tail");
        std::thread::sleep(Duration::from_secs(4));
        let _ = std::process::Command::new("kill")
            .args(["-s", "INT", &out.id().to_string()])
            .status();
        out.wait_with_output().expect("tail output")
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlite_exec(&f.pool, "INSERT INTO items (id, v) VALUES (6, 1)").await;
    let out = tail.join().expect("tail thread");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.matches("\"pkey\"").count(),
        6,
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = f.run_ok(&["status"]);
    assert!(
        status.contains("group         g: lag 0, 0 pending"),
        "{status}"
    );
    drop(agent);
}

#[tokio::test]
async fn an_agent_killed_on_a_cluster_resumes_where_it_stopped() {
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    let f = fixture(&cluster, "200ms").await;
    insert(&f.pool, 1, 300).await;
    let mut agent = Agent::start(&f.config);
    agent
        .wait_for_event(Duration::from_secs(30), "a cycle of items", |e| {
            e["message"] == "cycle" && e["entity"] == "items"
        })
        .await;
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    insert(&f.pool, 301, 400).await;
    let _agent = Agent::start(&f.config);
    let stream = f.stream("items");
    eventually(
        Duration::from_secs(30),
        "400 rows on the stream",
        || async { versions(&cluster, &stream).await.len() >= 400 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut keys: Vec<i64> = versions(&cluster, &stream)
        .await
        .iter()
        .map(|(k, _)| *k)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, (1..=400).collect::<Vec<_>>(), "each row once");
}

#[tokio::test]
async fn a_lost_state_on_a_cluster_node_is_detected() {
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    let f = fixture(&cluster, "1h").await;
    insert(&f.pool, 1, 10).await;
    f.run_ok(&["once"]);
    // The node serving `items` loses the entity's dedup state (the stream
    // survives: it shows the entity ran before).
    let mut conn = cluster.conn().await;
    let stream = f.stream("items");
    let tag = highwater::sink::slot_tag(&stream);
    for kind in ["seen", "digest", "state"] {
        let _: u64 = redis::cmd("DEL")
            .arg(format!("{}:{{{tag}}}:{kind}:items", f.env.prefix))
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
    let (ok, _, stderr) = f.run(&["once"]);
    assert!(!ok, "once went on over a lost state: {stderr}");
    assert!(
        stderr.contains("entity items") && stderr.contains("state"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_run_fails_over_and_nothing_is_lost_doubled_or_reordered() {
    let mut cluster = PrivateCluster::start(3, 1, &[]).await;
    let f = fixture(&cluster, "100ms").await;
    let stream = f.stream("items");
    let slot = PrivateCluster::slot_of(&stream);
    insert(&f.pool, 1, 50).await;
    // Before: check says the cycles wait for the shard's replica.
    let report = f.run_ok(&["check"]);
    assert!(
        report.contains(&format!(
            "served by 127.0.0.1:{}, which has 1 replica(s): each cycle waits until one holds its writes",
            cluster.master_of_slot(slot).await
        )),
        "{report}"
    );
    let agent = Agent::start(&f.config);

    // A writer bumps random rows' versions for the whole test.
    let pool = f.pool.clone();
    let writer = tokio::spawn(async move {
        let mut n: u64 = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(12);
        while std::time::Instant::now() < deadline {
            n += 1;
            let id = 1 + (n * 7919) % 50;
            sqlite_exec(
                &pool,
                &format!("UPDATE items SET v = v + 1, updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = {id}"),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = cluster.master_of_slot(slot).await;
    cluster.kill_master_of_slot(slot).await;
    let new = cluster.wait_for_failover(slot).await;
    assert_ne!(old, new);
    let cycles_at_failover = agent.cycles(Some("items")).len();
    writer.await.expect("writer");

    // Every row's final version arrives; no version twice; in order per row.
    let finals: Vec<(i64, i64)> = sqlx::query_as("SELECT id, v FROM items ORDER BY id")
        .fetch_all(&f.pool)
        .await
        .expect("read the table");
    // Generous: on a loaded machine the cluster's view of the failover
    // converges slowly; the log says what the agent did if it never does.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let seen = versions(&cluster, &stream).await;
        if finals.iter().all(|(id, v)| seen.contains(&(*id, *v))) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = agent.stderr();
            panic!(
                "timed out after 120s waiting for every row's final version on the stream; the agent's log ends:\n{}",
                log[log.len().saturating_sub(60)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = versions(&cluster, &stream).await;
    let mut last: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    for (id, v) in &seen {
        if let Some(before) = last.insert(*id, *v) {
            assert!(
                before < *v,
                "row {id}: version {v} after {before} (duplicate or out of order)"
            );
        }
    }
    let fatal: Vec<serde_json::Value> = agent
        .events()
        .into_iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cycle failed; fix"))
        })
        .collect();
    assert!(fatal.is_empty(), "a failover is transient: {fatal:?}");
    assert!(
        agent.cycles(Some("items")).len() > cycles_at_failover,
        "the agent went on after the failover"
    );
}

#[tokio::test]
async fn a_large_window_on_a_cluster_is_applied_with_chunks_in_flight_and_nothing_refused() {
    // 20,000 rows: the second cycle's 40 chunks of 500 travel several at a
    // time (the state exists), each chained to the one before it.
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    let f = fixture(&cluster, "1h").await;
    insert(&f.pool, 1, 20_000).await;
    let out = f.run_ok(&["once"]);
    assert!(
        out.contains("items: 20000 rows read, 20000 emitted"),
        "{out}"
    );
    sqlite_exec(
        &f.pool,
        "UPDATE items SET v = 2, updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now')",
    )
    .await;
    let (ok, out, log) = f.run(&["once"]);
    assert!(ok, "{out}\n{log}");
    assert!(
        out.contains("items: 20000 rows read, 20000 emitted"),
        "{out}\n{log}"
    );
    let all = versions(&cluster, &f.stream("items")).await;
    assert_eq!(all.len(), 40_000);
    let second: Vec<i64> = all[20_000..].iter().map(|(k, _)| *k).collect();
    let mut sorted = second.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=20_000).collect::<Vec<_>>());
    assert!(all[20_000..].iter().all(|(_, v)| *v == 2));
}

/// The master of an entity's slot killed while a cycle waits for its
/// replica, the replicas locked out of it before the cycle's chunks (so
/// that the one promoted lacks them): no cycle of that time counts as
/// done, and after the failover the rows are read again and arrive once.
/// (The model's lagging-replica scenario, tests/model.rs, found a `WAIT`
/// sent again after the master died answered by another master, which
/// counted its own replica; the `WAIT` now travels with the commit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_whose_master_dies_before_its_replica_has_the_writes_is_not_done() {
    let mut cluster = PrivateCluster::start(3, 1, &[]).await;
    let f = fixture(&cluster, "100ms").await;
    let stream = f.stream("items");
    let slot = PrivateCluster::slot_of(&stream);
    insert(&f.pool, 1, 20).await;
    let agent = Agent::start(&f.config);
    eventually(Duration::from_secs(30), "the agent's first cycles", || {
        let n = agent.cycles(Some("items")).len();
        async move { n >= 3 }
    })
    .await;
    let state = format!("{}:{{b}}:state:items", f.env.prefix);
    let old = cluster.master_of_slot(slot).await;
    let mut master = common::cluster::node_conn(old).await;
    let last_commit = |master: &mut redis::aio::MultiplexedConnection| {
        let mut master = master.clone();
        let state = state.clone();
        async move {
            let at: Option<String> = redis::cmd("HGET")
                .arg(&state)
                .arg("last_started_at_ms")
                .query_async(&mut master)
                .await
                .expect("HGET the state");
            at
        }
    };

    let locked_out = chrono::Utc::now();
    common::cluster::lock_out_replicas(&mut master, "replicas-locked-out").await;
    let before = last_commit(&mut master).await;
    insert(&f.pool, 21, 40).await;
    // A commit landed on the master alone (the cycles wait for the replica
    // that cannot get it, and fail, one after the other).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last_commit(&mut master).await == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no commit reached the master after the lock-out"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = chrono::Utc::now();
    cluster.kill_master_of_slot(slot).await;
    let new = cluster.wait_for_failover(slot).await;
    assert_ne!(old, new);

    // After the failover the rows are read again and arrive, each once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = versions(&cluster, &stream).await;
        let ids: Vec<i64> = seen.iter().map(|&(id, _)| id).collect();
        if ids.len() >= 40 {
            assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "{seen:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows missing after the failover: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No cycle that ran while the replica was locked out counted as done.
    let done_unreplicated: Vec<serde_json::Value> = agent
        .cycles(Some("items"))
        .into_iter()
        .filter(|c| {
            c["started_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > locked_out && t < killed)
        })
        .collect();
    assert!(
        done_unreplicated.is_empty(),
        "cycles counted as done whose writes no replica held: {done_unreplicated:?}"
    );
}
