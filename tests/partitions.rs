//! One entity spread over `partitions = N` streams (`<stream>:0` …), on one
//! Redis and on a Redis Cluster: every key in exactly the partition its
//! CRC-32 names, the union is the table, per-key order holds, a crash
//! between two partitions' commits loses and doubles nothing, and changing
//! `partitions` of an entity with state is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::{stream_versions, PrivateCluster};
use common::*;

struct Fixture {
    env: Env,
    pool: sqlx::SqlitePool,
    redis: String,
    db: PathBuf,
}

impl Fixture {
    async fn new(redis: &str) -> Fixture {
        let env = Env::new();
        let db = env.dir.path().join("source.db");
        let pool = sqlite(&db).await;
        sqlite_exec(
            &pool,
            "CREATE TABLE items (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, updated_at TEXT NOT NULL DEFAULT (datetime('now')))",
        )
        .await;
        Fixture {
            env,
            pool,
            redis: redis.to_owned(),
            db,
        }
    }

    fn stream(&self) -> String {
        format!("{}:items", self.env.prefix)
    }

    /// The config with `partitions` and `lookback`.
    fn config(&self, partitions: u32, lookback: &str) -> PathBuf {
        self.env.file(
            "highwater.toml",
            &format!(
                "[redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\ntimeout = \"5s\"\n\n[agent]\nlease = \"1s\"\n\n[http]\nlisten = \"\"\n\n[sources.db]\nurl = \"{}\"\n\n[entities.items]\nsource = \"db\"\nquery = \"SELECT id, v, updated_at FROM items WHERE updated_at >= :since\"\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"{lookback}\"\nmax_lookback = \"{lookback}\"\nevery = \"1h\"\nstart = \"beginning\"\nstream = \"{}\"\npartitions = {partitions}\n",
                self.redis,
                self.env.prefix,
                sqlite_url(&self.db),
                self.stream()
            ),
        )
    }

    async fn insert(&self, from: i64, to: i64) {
        sqlite_exec(
            &self.pool,
            &format!(
                "INSERT INTO items (id, v) WITH RECURSIVE c(x) AS (SELECT {from} UNION ALL SELECT x + 1 FROM c WHERE x < {to}) SELECT x, 1 FROM c"
            ),
        )
        .await;
    }
}

/// Every partition's stream: partition -> (pkey, v) in stream order.
async fn by_partition(
    cluster: Option<&PrivateCluster>,
    stream: &str,
    partitions: u32,
) -> BTreeMap<u32, Vec<(i64, i64)>> {
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        out.insert(p, stream_versions(cluster, &format!("{stream}:{p}")).await);
    }
    out
}

/// The partition a consumer computes for a key: zlib's CRC-32 of the pkey
/// text, modulo the partitions (written here from the README's definition,
/// not taken from highwater).
fn partition_of(pkey: i64, partitions: u32) -> u32 {
    let mut crc = !0u32;
    for b in pkey.to_string().bytes() {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc % partitions
}

fn run(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args(["once", "--config", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .env_remove("HIGHWATER_LOG")
        .output()
        .expect("run highwater");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 1,000 rows and 10 updates of one key over `partitions` streams.
async fn spread_once_in_order(cluster: Option<&PrivateCluster>, redis: &str, partitions: u32) {
    let f = Fixture::new(redis).await;
    let config = f.config(partitions, "10m");
    f.insert(1, 1000).await;
    let out = once_ok(&config);
    assert!(out.contains("items: 1000 rows read, 1000 emitted"), "{out}");
    let out = once_ok(&config);
    assert!(out.contains("items: 1000 rows read, 0 emitted"), "{out}");
    for v in 2..=11 {
        sqlite_exec(
            &f.pool,
            &format!("UPDATE items SET v = {v}, updated_at = datetime('now') WHERE id = 7"),
        )
        .await;
        let out = once_ok(&config);
        assert!(out.contains("1 emitted"), "{out}");
    }
    let streams = by_partition(cluster, &f.stream(), partitions).await;
    let mut union = BTreeSet::new();
    for (p, entries) in &streams {
        assert!(!entries.is_empty(), "partition {p} got keys");
        for (key, _) in entries {
            assert_eq!(
                partition_of(*key, partitions),
                *p,
                "key {key} is in the partition its CRC-32 names"
            );
            union.insert(*key);
        }
    }
    assert_eq!(
        union,
        (1..=1000).collect::<BTreeSet<_>>(),
        "the union is the table"
    );
    let total: usize = streams.values().map(Vec::len).sum();
    assert_eq!(total, 1010, "each version once");
    let of_7: Vec<i64> = streams[&partition_of(7, partitions)]
        .iter()
        .filter(|(k, _)| *k == 7)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(of_7, (1..=11).collect::<Vec<_>>(), "key 7 in order");

    if let Some(cluster) = cluster {
        // check: which node serves each partition.
        let out = highwater(&["check", "--config", config.to_str().unwrap()]);
        let report = String::from_utf8_lossy(&out.stdout);
        for p in 0..partitions {
            let stream = format!("{}:{p}", f.stream());
            let slot = PrivateCluster::slot_of(&stream);
            let node = cluster.master_of_slot(slot).await;
            assert!(
                report.contains(&format!(
                    "entity items: stream {stream} is in slot {slot}, served by 127.0.0.1:{node}"
                )),
                "{report}"
            );
        }
    }

    // status: a block per partition; tail: every partition's stream.
    let out = highwater(&["status", "--config", config.to_str().unwrap()]);
    let status = String::from_utf8_lossy(&out.stdout);
    for p in 0..partitions {
        assert!(
            status.contains(&format!("items (source db), partition {p}\n")),
            "{status}"
        );
        assert!(
            status.contains(&format!(
                "stream        {}:{p}: {} entries",
                f.stream(),
                streams[&p].len()
            )),
            "{status}"
        );
    }
    let printed_to = f.env.dir.path().join("tail.out");
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args([
            "tail",
            "--config",
            config.to_str().unwrap(),
            "items",
            "--from-start",
        ])
        .stdout(std::fs::File::create(&printed_to).expect("tail's stdout file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tail");
    let count = || {
        std::fs::read_to_string(&printed_to)
            .unwrap_or_default()
            .matches("\"pkey\"")
            .count()
    };
    eventually(
        Duration::from_secs(30),
        "tail to print 1,010 entries",
        || async { count() >= 1010 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tail.kill();
    let _ = tail.wait();
    let printed = std::fs::read_to_string(&printed_to).unwrap_or_default();
    assert_eq!(
        printed.matches("\"pkey\"").count(),
        1010,
        "tail reads every partition"
    );
}

#[tokio::test]
async fn on_one_redis_every_key_lands_once_in_its_partition_in_order() {
    spread_once_in_order(None, &redis_url(), 4).await;
}

#[tokio::test]
async fn on_a_cluster_every_key_lands_once_in_its_partition_in_order() {
    let cluster = PrivateCluster::start(3, 0, &[]).await;
    spread_once_in_order(Some(&cluster), &cluster.url(), 3).await;
}

#[tokio::test]
async fn a_crash_between_two_partitions_commits_loses_and_doubles_nothing() {
    // lookback 2 s: the partitions that committed trim their dedup state
    // past rows that the next window, from the partitions that did not,
    // reads again; those partitions must skip them, not send them twice.
    let f = Fixture::new(&redis_url()).await;
    let config = f.config(4, "2s");
    f.insert(1, 200).await;
    once_ok(&config);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    f.insert(201, 400).await;
    sqlite_exec(
        &f.pool,
        "UPDATE items SET v = 2, updated_at = datetime('now') WHERE id <= 20",
    )
    .await;
    let (ok, _, stderr) = run(
        &config,
        &[("HIGHWATER_CRASH_AT", "before-partition-commit:2")],
    );
    assert!(!ok, "the crash point was not reached: {stderr}");
    assert!(
        stderr.contains("before the commit of partition 2"),
        "{stderr}"
    );
    // Meanwhile more changes, and the crashed process's lease runs out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sqlite_exec(
        &f.pool,
        "UPDATE items SET v = 3, updated_at = datetime('now') WHERE id > 390",
    )
    .await;
    let out = once_ok(&config);
    assert!(out.contains("items: "), "{out}");
    let out = once_ok(&config);
    assert!(out.contains(" 0 emitted"), "nothing more: {out}");

    let streams = by_partition(None, &f.stream(), 4).await;
    let mut seen: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    for entries in streams.values() {
        for version in entries {
            *seen.entry(*version).or_default() += 1;
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "versions sent twice: {doubled:?}");
    let mut expected = BTreeSet::new();
    for id in 1..=400 {
        expected.insert((id, 1));
    }
    for id in 1..=20 {
        expected.insert((id, 2));
    }
    for id in 391..=400 {
        expected.insert((id, 3));
    }
    let got: BTreeSet<(i64, i64)> = seen.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    assert!(missing.is_empty(), "versions lost: {missing:?}");
}

#[tokio::test]
async fn changing_partitions_of_an_entity_with_state_is_refused() {
    let f = Fixture::new(&redis_url()).await;
    f.insert(1, 10).await;
    once_ok(&f.config(4, "10m"));
    for now in [2, 1] {
        let (ok, _, stderr) = run(&f.config(now, "10m"), &[]);
        assert!(!ok, "partitions = {now} was accepted");
        assert!(
            stderr.contains(&format!(
                "entity items: its state in Redis was written with partitions = 4, the config says {now}"
            )),
            "{stderr}"
        );
    }
    // And from one stream to several.
    let g = Fixture::new(&redis_url()).await;
    g.insert(1, 10).await;
    once_ok(&g.config(1, "10m"));
    let (ok, _, stderr) = run(&g.config(3, "10m"), &[]);
    assert!(!ok);
    assert!(
        stderr.contains("written with partitions = 1, the config says 3"),
        "{stderr}"
    );
}
