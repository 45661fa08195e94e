//! Stream retention with consumer groups (lua/retention.lua): nothing a group
//! has not both been delivered and acknowledged is trimmed; within that,
//! max_stream_length and max_age decide; the hard cap drops, counting and
//! logging what each group loses; without groups the stream is capped as
//! XADD MAXLEN ~ always did. Real SQLite files, the real binary, the local
//! Redis (a private one for the memory pause).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use highwater::config::Config;
use highwater::sink::Sink;

/// A SQLite table `t` of its own and one entity over it, whose stream is
/// named after the entity; `extra` goes into the entity's table.
struct Fixture {
    _env: Env,
    pool: sqlx::SqlitePool,
    entity: String,
    config: PathBuf,
    next_id: std::cell::Cell<u64>,
}

impl Fixture {
    async fn new(extra: &str) -> Fixture {
        Fixture::with_redis(extra, None).await
    }

    /// `redis`: a `[redis]` table of its own (a private server), else the local one.
    async fn with_redis(extra: &str, redis: Option<&str>) -> Fixture {
        let env = Env::new();
        let entity = unique("retained");
        let db = env.dir.path().join("source.db");
        let pool = sqlite(&db).await;
        sqlite_exec(
            &pool,
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, updated_at TEXT NOT NULL DEFAULT (datetime('now')))",
        )
        .await;
        let body = format!(
            r#"
[http]
listen = ""

[sources.db]
url = "{url}"

[entities.{entity}]
source = "db"
query = "SELECT id, name, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "10m"
every = "200ms"
start = "beginning"
{extra}
"#,
            url = sqlite_url(&db)
        );
        let config = match redis {
            None => env.config(&body),
            Some(redis) => env.file("highwater.toml", &format!("{redis}\n{body}")),
        };
        Fixture {
            _env: env,
            pool,
            entity,
            config,
            next_id: std::cell::Cell::new(1),
        }
    }

    /// Inserts `n` new rows (each a change on the stream) with `name`.
    async fn insert(&self, n: u64, name: &str) {
        let first = self.next_id.get();
        self.next_id.set(first + n);
        sqlite_exec(
            &self.pool,
            &format!(
                "INSERT INTO t (id, name) WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < {n}) SELECT {first} + x, '{name}' FROM c"
            ),
        )
        .await;
    }

    fn once(&self) -> (String, String) {
        once_logged(&self.config)
    }

    fn stream(&self) -> &str {
        &self.entity
    }
}

/// `XGROUP CREATE <stream> <group> 0 MKSTREAM`: a group that will read
/// everything from the stream's start.
async fn create_group(stream: &str, group: &str) {
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
}

/// `XREADGROUP` of up to `count` new entries for `group`: their ids and pkeys.
async fn read_group(stream: &str, group: &str, count: usize) -> Vec<(String, String)> {
    let mut conn = redis_conn().await;
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("consumer-1")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|entry| {
            let pkey = match entry.map.get("pkey") {
                Some(redis::Value::BulkString(v)) => String::from_utf8_lossy(v).into_owned(),
                other => panic!("entry {} without a pkey: {other:?}", entry.id),
            };
            (entry.id, pkey)
        })
        .collect()
}

/// Everything a group can still read, in batches, as a consumer drains it.
async fn read_all(stream: &str, group: &str) -> Vec<(String, String)> {
    let mut all = Vec::new();
    loop {
        let batch = read_group(stream, group, 1000).await;
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

async fn ack(stream: &str, group: &str, entries: &[(String, String)]) {
    let mut conn = redis_conn().await;
    for slice in entries.chunks(1000) {
        let ids: Vec<&str> = slice.iter().map(|(id, _)| id.as_str()).collect();
        let _: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .expect("XACK");
    }
}

async fn xlen(stream: &str) -> u64 {
    let mut conn = redis_conn().await;
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .expect("XLEN")
}

/// The stream's ids, oldest first.
async fn ids(stream: &str) -> Vec<String> {
    read_stream(stream)
        .await
        .into_iter()
        .map(|m| m.id)
        .collect()
}

fn pkeys(entries: &[(String, String)]) -> Vec<u64> {
    entries
        .iter()
        .map(|(_, k)| k.parse().expect("integer keys"))
        .collect()
}

#[tokio::test]
async fn a_group_that_has_read_nothing_reads_every_change_and_the_stream_shrinks_once_it_acknowledged(
) {
    // The issue's case: a consumer being redeployed, max_stream_length = 100,
    // 2,000 changes. Before, the group could read 111 of them.
    let f = Fixture::new("max_stream_length = 100").await;
    create_group(f.stream(), "indexer").await;
    for _ in 0..4 {
        f.insert(500, "a").await;
        f.once();
    }
    assert_eq!(
        xlen(f.stream()).await,
        2000,
        "nothing trimmed past the group"
    );

    let read = read_all(f.stream(), "indexer").await;
    assert_eq!(
        pkeys(&read),
        (1..=2000).collect::<Vec<_>>(),
        "every change, once, in order"
    );

    // Delivered but not acknowledged: still kept.
    f.once();
    assert_eq!(xlen(f.stream()).await, 2000, "pending entries are kept");

    ack(f.stream(), "indexer", &read).await;
    f.once();
    let kept = ids(f.stream()).await;
    assert_eq!(
        kept.len(),
        100,
        "back to max_stream_length once acknowledged"
    );
    assert_eq!(
        kept.last(),
        read.last().map(|(id, _)| id),
        "the newest kept"
    );
}

#[tokio::test]
async fn entries_delivered_but_not_acknowledged_are_kept_from_the_oldest_pending_one() {
    let f = Fixture::new("max_stream_length = 10").await;
    create_group(f.stream(), "indexer").await;
    f.insert(300, "a").await;
    f.once();
    let read = read_all(f.stream(), "indexer").await;
    assert_eq!(read.len(), 300);
    // Everything acknowledged but entries 50..60 (a consumer crashed on them).
    ack(f.stream(), "indexer", &read[..50]).await;
    ack(f.stream(), "indexer", &read[60..]).await;
    f.once();
    let kept = ids(f.stream()).await;
    assert_eq!(
        kept.first(),
        Some(&read[50].0),
        "kept from the oldest pending entry"
    );
    assert_eq!(kept.len(), 250);

    ack(f.stream(), "indexer", &read[50..60]).await;
    f.once();
    assert_eq!(xlen(f.stream()).await, 10);
}

#[tokio::test]
async fn with_a_fast_and_a_slow_group_the_trim_follows_the_slow_one() {
    let f = Fixture::new("max_stream_length = 50").await;
    create_group(f.stream(), "fast").await;
    create_group(f.stream(), "slow").await;
    f.insert(500, "a").await;
    f.once();
    let fast = read_all(f.stream(), "fast").await;
    ack(f.stream(), "fast", &fast).await;
    let slow = read_group(f.stream(), "slow", 100).await;
    ack(f.stream(), "slow", &slow).await;

    f.once();
    let kept = ids(f.stream()).await;
    assert_eq!(kept.len(), 400, "what the slow group has not read is kept");
    assert_eq!(kept.first(), Some(&fast[100].0));

    let rest = read_all(f.stream(), "slow").await;
    assert_eq!(
        pkeys(&rest),
        (101..=500).collect::<Vec<_>>(),
        "the slow group loses nothing"
    );
    ack(f.stream(), "slow", &rest).await;
    f.once();
    assert_eq!(xlen(f.stream()).await, 50, "back to max_stream_length");
}

#[tokio::test]
async fn max_age_trims_old_entries_once_every_group_acknowledged_them() {
    let f = Fixture::new("max_stream_length = 0\nmax_age = \"2s\"").await;
    create_group(f.stream(), "done").await;
    create_group(f.stream(), "late").await;
    f.insert(100, "old").await;
    f.once();
    let done = read_all(f.stream(), "done").await;
    ack(f.stream(), "done", &done).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    f.insert(10, "new").await;
    f.once();
    assert_eq!(
        xlen(f.stream()).await,
        110,
        "the late group has read none of the old entries"
    );

    let late = read_all(f.stream(), "late").await;
    assert_eq!(late.len(), 110);
    ack(f.stream(), "late", &late).await;
    let more = read_all(f.stream(), "done").await;
    ack(f.stream(), "done", &more).await;
    f.once();
    let kept = read_stream(f.stream()).await;
    assert_eq!(kept.len(), 10, "only entries younger than max_age are left");
    assert!(kept
        .iter()
        .all(|m| m.payload.as_ref().unwrap()["name"] == "new"));
}

#[tokio::test]
async fn the_hard_cap_drops_and_counts_per_group_what_it_had_not_acknowledged() {
    let f = Fixture::new("max_stream_length = 100\nhard_max_stream_length = 200").await;
    create_group(f.stream(), "idle").await; // reads nothing
    create_group(f.stream(), "reader").await; // reads, never acknowledges
    create_group(f.stream(), "done").await; // reads and acknowledges
    f.insert(250, "a").await;
    let (_, log) = f.once();
    assert_eq!(xlen(f.stream()).await, 200, "the hard cap holds");
    // The oldest 50 went before any group had read them.
    for group in ["idle", "reader", "done"] {
        assert!(
            log.lines().any(|l| l.contains("hard_max_stream_length")
                && l.contains(&format!("group={group}"))
                && l.contains("dropped=50")),
            "{log}"
        );
    }

    let reader = read_all(f.stream(), "reader").await;
    assert_eq!(pkeys(&reader), (51..=250).collect::<Vec<_>>());
    let done = read_all(f.stream(), "done").await;
    ack(f.stream(), "done", &done).await;
    f.insert(300, "b").await;
    let (_, log) = f.once();
    assert_eq!(xlen(f.stream()).await, 200);
    // Entries 51..350 went: idle had read none of them; reader had 200
    // pending and 100 unread; done had acknowledged 51..250 and not read the rest.
    let warned = |group: &str, n: u64| {
        log.lines().any(|l| {
            l.contains("hard_max_stream_length")
                && l.contains(&format!("group={group}"))
                && l.contains(&format!("dropped={n}"))
        })
    };
    assert!(warned("idle", 300), "{log}");
    assert!(warned("reader", 300), "{log}");
    assert!(warned("done", 100), "{log}");

    let out = highwater(&["status", "--config", f.config.to_str().unwrap()]);
    let status = String::from_utf8_lossy(&out.stdout);
    let line = |group: &str| {
        status
            .lines()
            .find(|l| l.trim_start().starts_with("group") && l.contains(&format!(" {group}:")))
            .unwrap_or_else(|| panic!("no line for group {group}:\n{status}"))
            .to_owned()
    };
    for (group, n) in [("idle", 350), ("reader", 350), ("done", 150)] {
        assert!(
            line(group).ends_with(&format!(
                "; {n} dropped unacknowledged by hard_max_stream_length"
            )),
            "{status}"
        );
    }
    // What is left, each group reads: the newest 200, nothing twice.
    let rest = read_all(f.stream(), "done").await;
    assert_eq!(pkeys(&rest), (351..=550).collect::<Vec<_>>());
}

#[tokio::test]
async fn without_groups_the_stream_is_capped_as_before() {
    let f = Fixture::new("max_stream_length = 100").await;
    for _ in 0..4 {
        f.insert(500, "a").await;
        f.once();
    }
    let len = xlen(f.stream()).await;
    // XADD MAXLEN ~ trims whole nodes (100 entries each by default).
    assert!((100..=200).contains(&len), "about max_stream_length: {len}");
    let messages = read_stream(f.stream()).await;
    assert_eq!(messages.last().map(|m| m.pkey.as_str()), Some("2000"));
}

#[tokio::test]
async fn without_groups_max_age_trims_what_is_older() {
    let f = Fixture::new("max_stream_length = 0\nmax_age = \"1s\"").await;
    f.insert(50, "old").await;
    f.once();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.insert(5, "new").await;
    f.once();
    let kept = read_stream(f.stream()).await;
    assert_eq!(kept.len(), 5);
}

/// The ids of a stream the test wrote itself (no highwater fields).
async fn raw_ids(stream: &str) -> Vec<String> {
    let mut conn = redis_conn().await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    reply.ids.into_iter().map(|e| e.id).collect()
}

/// The retention through the library, on a stream the test writes itself.
async fn retain_on(stream: &str, extra: &str) -> highwater::retention::Retained {
    let env = Env::new();
    let db = env.dir.path().join("unused.db");
    let path = env.config(&format!(
        "[sources.s]\nurl = \"{}\"\n\n[entities.e]\nsource = \"s\"\nquery = \"SELECT id, updated_at FROM t WHERE updated_at >= :since\"\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1h\"\nstream = \"{stream}\"\n{extra}\n",
        sqlite_url(&db)
    ));
    let config = Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let sink = Sink::connect(&config.redis).await.expect("connect");
    let entity = &config.entities["e"];
    sink.retain(entity, &sink.keys(entity))
        .await
        .unwrap_or_else(|e| panic!("retain: {e}"))
}

#[tokio::test]
async fn ids_compare_as_ids_within_one_millisecond_and_across_digit_counts() {
    let stream = unique("same_ms");
    let mut conn = redis_conn().await;
    // 999-1 .. 999-3, then 1000-1 .. 1000-12: as strings "1000-10" < "1000-9"
    // and "1000-1" < "999-1".
    for ms in [999, 1000] {
        for seq in 1..=(if ms == 999 { 3 } else { 12 }) {
            let id = format!("{ms}-{seq}");
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg(&id)
                .arg("pkey")
                .arg(&id)
                .query_async(&mut conn)
                .await
                .expect("XADD");
        }
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("1000-9")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");

    // Delivered up to 1000-9, nothing pending: everything up to and
    // including 1000-9 may go; max_stream_length 1 wants all but one.
    let retained = retain_on(&stream, "max_stream_length = 1").await;
    assert_eq!(retained.trimmed, 12);
    assert_eq!(raw_ids(&stream).await, ["1000-10", "1000-11", "1000-12"]);
    assert_eq!(retained.groups[0].last_delivered_id, "1000-9");
    // Created at an id, the group has no read counter: Redis cannot tell its lag.
    assert_eq!(retained.groups[0].lag, None);

    // 1000-10 delivered, not acknowledged: the oldest pending entry holds.
    let read = read_group(&stream, "g", 2).await;
    assert_eq!(read[0].0, "1000-10");
    ack(&stream, "g", &read[1..]).await;
    let retained = retain_on(&stream, "max_stream_length = 1").await;
    assert_eq!(retained.trimmed, 0);
    assert_eq!(retained.groups[0].pending, 1);
    assert!(retained.groups[0].oldest_pending_age_ms.is_some());
    ack(&stream, "g", &read[..1]).await;
    let retained = retain_on(&stream, "max_stream_length = 1").await;
    assert_eq!(retained.trimmed, 2, "1000-10 and 1000-11 acknowledged");
    assert_eq!(raw_ids(&stream).await, ["1000-12"]);
    delete_key(&stream).await;
}

#[tokio::test]
async fn a_long_backlog_is_trimmed_in_batches_in_one_commit() {
    // More than one batch (10,000 entries) to trim after a slow group
    // acknowledged its backlog: the commit repeats until done.
    let f = Fixture::new("max_stream_length = 10").await;
    create_group(f.stream(), "slow").await;
    f.insert(25_000, "a").await;
    f.once();
    assert_eq!(xlen(f.stream()).await, 25_000);
    let read = read_all(f.stream(), "slow").await;
    ack(f.stream(), "slow", &read).await;
    f.once();
    assert_eq!(xlen(f.stream()).await, 10);
}

#[tokio::test]
async fn polling_pauses_at_pause_at_memory_instead_of_dropping_and_resumes_once_the_group_acknowledged(
) {
    // A private Redis of 16 MB, polling paused above half of it; a group that
    // reads nothing while a first load of 10,000 rows of 1 kB fills the stream.
    let redis = PrivateRedis::start(&["--maxmemory", "16mb"]).await;
    let port = free_port();
    let f = Fixture::with_redis(
        "max_stream_length = 100",
        Some(&format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"hw\"\npause_at_memory = 0.5\n",
            redis.url()
        )),
    )
    .await;
    // The fixture's [http] turns the endpoint off; this test wants it.
    let text = std::fs::read_to_string(&f.config)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(&f.config, text).unwrap();
    let mut admin = redis.admin().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(f.stream())
        .arg("indexer")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .expect("XGROUP CREATE");
    let big = "x".repeat(1000);
    f.insert(10_000, &big).await;

    let agent = Agent::start(&f.config);
    agent
        .wait_for_event(Duration::from_secs(60), "polling paused", |e| {
            e["message"] == "polling paused"
        })
        .await;
    // Changes made while paused wait in the database.
    f.insert(100, "during").await;
    let lag = format!(
        "highwater_consumer_group_lag{{stream=\"{}\",group=\"indexer\"}} 10000",
        f.stream()
    );
    eventually(
        Duration::from_secs(10),
        "the group's lag in /metrics",
        || async { http_get(port, "/metrics").is_ok_and(|(_, body)| body.contains(&lag)) },
    )
    .await;

    // The consumer catches up; the agent trims what it acknowledged, memory
    // comes down, polling resumes and the changes made meanwhile arrive.
    let mut read = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read.len() < 10_100 {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of 10,100",
            read.len()
        );
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("indexer")
            .arg("c")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(f.stream())
            .arg(">")
            .query_async(&mut admin)
            .await
            .expect("XREADGROUP");
        for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
            let _: u64 = redis::cmd("XACK")
                .arg(f.stream())
                .arg("indexer")
                .arg(&entry.id)
                .query_async(&mut admin)
                .await
                .expect("XACK");
            let pkey = match entry.map.get("pkey") {
                Some(redis::Value::BulkString(v)) => String::from_utf8_lossy(v).into_owned(),
                other => panic!("no pkey: {other:?}"),
            };
            read.push(pkey);
        }
    }
    agent
        .wait_for_event(Duration::from_secs(30), "polling resumed", |e| {
            e["message"] == "polling resumed"
        })
        .await;
    let expected: Vec<String> = (1..=10_100).map(|k| k.to_string()).collect();
    assert_eq!(
        read, expected,
        "every change, once, in order: nothing dropped"
    );
}
