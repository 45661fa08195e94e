//! The scheduler, through `highwater run` as a child process on SQLite
//! files: entities poll concurrently, a slow cycle never overlaps the next
//! and skips the ticks it outlasted, signals stop the agent cleanly, and a
//! failing database or an absent Redis keeps the agent alive.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;

/// One entity polling table `t` (id, name, updated_at) of its own SQLite file.
struct Table {
    entity: String,
    pool: sqlx::SqlitePool,
}

/// Creates `<entity>.db` with table `t` and returns the config section of a
/// source of the same name and an entity polling it with `query`.
async fn table(env: &Env, prefix: &str, every: &str, query: &str) -> (Table, String) {
    let entity = unique(prefix);
    let db = env.dir.path().join(format!("{entity}.db"));
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, \
         updated_at TEXT NOT NULL DEFAULT (datetime('now')))",
    )
    .await;
    let section = format!(
        r#"
[sources.{entity}]
url = "{url}"

[entities.{entity}]
source = "{entity}"
query = "{query}"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "{every}"
"#,
        url = sqlite_url(&db)
    );
    (Table { entity, pool }, section)
}

const PLAIN_QUERY: &str = "SELECT id, name, updated_at FROM t WHERE updated_at >= :since";

async fn insert(pool: &sqlx::SqlitePool, id: i64) {
    sqlx::query("INSERT INTO t (id, name) VALUES (?1, 'n' || ?1)")
        .bind(id)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("insert {id}: {e}"));
}

/// Waits until the stream holds exactly the keys `ids`; fails at once if a
/// key arrives twice or a key not in `ids` arrives.
async fn wait_for_keys(stream: &str, ids: impl IntoIterator<Item = i64>) {
    let mut want: Vec<String> = ids.into_iter().map(|i| i.to_string()).collect();
    want.sort();
    let what = format!("keys {want:?} on stream {stream}");
    eventually(Duration::from_secs(20), &what, || {
        let want = want.clone();
        async move {
            let mut got: Vec<String> = read_stream(stream)
                .await
                .into_iter()
                .map(|m| m.pkey)
                .collect();
            got.sort();
            assert!(
                got.windows(2).all(|w| w[0] != w[1]) && got.iter().all(|k| want.contains(k)),
                "{stream} holds {got:?}, expected each of {want:?} once"
            );
            got == want
        }
    })
    .await;
}

/// A finished cycle as its log line tells: when it started and ended.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

/// The cycles of `entity` from the agent's log, in order. The log line is
/// written after the cycle ends, so `timestamp - duration_ms` is never
/// earlier than the cycle's real start.
fn cycles(agent: &Agent, entity: &str) -> Vec<Cycle> {
    agent
        .cycles(Some(entity))
        .iter()
        .map(|e| {
            let end: DateTime<Utc> = e["timestamp"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .unwrap_or_else(|| panic!("cycle event without timestamp: {e}"))
                .into();
            let duration = e["duration_ms"]
                .as_i64()
                .unwrap_or_else(|| panic!("cycle event without duration_ms: {e}"));
            Cycle {
                start: end - chrono::Duration::milliseconds(duration),
                end,
            }
        })
        .collect()
}

fn config(env: &Env, sections: &[&str]) -> PathBuf {
    env.config(&sections.concat())
}

#[tokio::test]
async fn two_entities_on_two_sources_both_keep_emitting_new_rows() {
    let env = Env::new();
    let (a, a_section) = table(&env, "run_a", "200ms", PLAIN_QUERY).await;
    let (b, b_section) = table(&env, "run_b", "200ms", PLAIN_QUERY).await;
    let mut agent = Agent::start(&config(&env, &[&a_section, &b_section]));
    for name in [&a.entity, &b.entity] {
        agent
            .wait_for_event(Duration::from_secs(20), "a first cycle", |e| {
                e["message"] == "cycle" && e["entity"] == name.as_str()
            })
            .await;
    }

    // Ten rows per table over about two seconds, while the agent polls.
    for id in 1..=10 {
        insert(&a.pool, id).await;
        insert(&b.pool, 100 + id).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_keys(&a.entity, 1..=10).await;
    wait_for_keys(&b.entity, 101..=110).await;

    for name in [&a.entity, &b.entity] {
        let emitting = agent
            .cycles(Some(name))
            .iter()
            .filter(|e| e["emitted"].as_u64().unwrap_or(0) > 0)
            .count();
        assert!(
            emitting >= 2,
            "{name} emitted in {emitting} cycle(s): rows should arrive as they are inserted"
        );
    }
    assert!(agent.exited().is_none(), "the agent stopped on its own");
}

#[tokio::test]
async fn a_slow_cycle_never_overlaps_the_next_and_skips_missed_ticks() {
    let env = Env::new();
    // While `ctl.slow` is 1 the query burns two seconds or more of CPU
    // in a recursive CTE; afterwards it takes milliseconds.
    let slow_query = "SELECT id, name, updated_at FROM t WHERE updated_at >= :since AND \
        (CASE WHEN (SELECT slow FROM ctl) = 1 THEN \
        (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 6000000) \
        SELECT count(*) FROM c) ELSE 0 END) >= 0";
    let (slow, slow_section) = table(&env, "run_slow", "200ms", slow_query).await;
    sqlite_exec(
        &slow.pool,
        "CREATE TABLE ctl (slow INTEGER NOT NULL); INSERT INTO ctl VALUES (1)",
    )
    .await;
    insert(&slow.pool, 1).await;
    let (fast, fast_section) = table(&env, "run_fast", "200ms", PLAIN_QUERY).await;

    let mut agent = Agent::start(&config(&env, &[&slow_section, &fast_section]));
    let deadline = Duration::from_secs(30);
    let started = Instant::now();
    while cycles(&agent, &slow.entity).len() < 2 {
        assert!(
            started.elapsed() < deadline,
            "no two slow cycles within {deadline:?}:\n{}",
            agent.stderr().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlite_exec(&slow.pool, "UPDATE ctl SET slow = 0").await;

    // Run until a cycle ended more than a second after the last slow one.
    let slow_phase_end = |cycles: &[Cycle]| {
        cycles
            .iter()
            .filter(|c| c.end - c.start >= chrono::Duration::milliseconds(1000))
            .map(|c| c.end)
            .max()
    };
    loop {
        let seen = cycles(&agent, &slow.entity);
        let end = slow_phase_end(&seen).expect("slow cycles");
        if seen
            .last()
            .is_some_and(|c| c.end > end + chrono::Duration::milliseconds(1100))
        {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the fast phase did not last a second within {deadline:?}:\n{}",
            agent.stderr().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "run exited with {status}");

    let all = cycles(&agent, &slow.entity);
    for pair in all.windows(2) {
        assert!(
            pair[1].start >= pair[0].end,
            "cycle starting {} overlaps the one ending {}",
            pair[1].start,
            pair[0].end
        );
    }

    // Ticks missed during the slow cycles (200 ms each) are skipped: after
    // the slow phase the entity polls on its schedule, at most ~5 times a
    // second, instead of running the missed ticks back to back.
    let end = slow_phase_end(&all).unwrap();
    let slow_cycles: Vec<&Cycle> = all.iter().filter(|c| c.end <= end).collect();
    let missed: i64 = slow_cycles
        .iter()
        .map(|c| (c.end - c.start).num_milliseconds() / 200)
        .sum();
    assert!(
        missed >= 10,
        "the slow phase should outlast many ticks (missed {missed})"
    );
    let next_second = all
        .iter()
        .filter(|c| c.start > end && c.start <= end + chrono::Duration::seconds(1))
        .count();
    assert!(
        next_second <= 7,
        "{next_second} cycles in the second after the slow phase (which missed {missed} ticks): \
         missed ticks were queued, not skipped"
    );
    assert!(
        all.len() < 20,
        "{} cycles ran in about four seconds of 200 ms ticks",
        all.len()
    );

    // The other entity kept polling while the slow query ran.
    let slow_cycle = slow_cycles.last().unwrap();
    let inside = cycles(&agent, &fast.entity)
        .iter()
        .filter(|c| c.start >= slow_cycle.start && c.end <= slow_cycle.end)
        .count();
    assert!(
        inside >= 1,
        "no cycle of {} ran during a slow cycle of {}",
        fast.entity,
        slow.entity
    );
}

/// Starts an agent polling one idle entity hourly and waits for its first cycle.
async fn idle_agent(env: &Env) -> Agent {
    let (t, section) = table(env, "run_idle", "1h", PLAIN_QUERY).await;
    let agent = Agent::start(&config(env, &[&section]));
    agent
        .wait_for_event(Duration::from_secs(20), "the first cycle", |e| {
            e["message"] == "cycle" && e["entity"] == t.entity.as_str()
        })
        .await;
    agent
}

#[tokio::test]
async fn sigterm_while_idle_exits_zero() {
    let env = Env::new();
    let mut agent = idle_agent(&env).await;
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "run exited with {status}");
}

#[tokio::test]
async fn sigint_while_idle_exits_zero() {
    let env = Env::new();
    let mut agent = idle_agent(&env).await;
    agent.signal("INT");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "run exited with {status}");
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().unwrap().port()
}

fn write_config(env: &Env, redis_url: &str, body: &str) -> PathBuf {
    env.file(
        "highwater.toml",
        &format!(
            "[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{}\"\n{body}",
            env.prefix
        ),
    )
}

#[tokio::test]
async fn redis_down_at_start_keeps_the_agent_running_and_says_so() {
    let env = Env::new();
    let (_t, section) = table(&env, "run_noredis", "200ms", PLAIN_QUERY).await;
    let url = format!("redis://:s3cretpw@127.0.0.1:{}/0", closed_port());
    let config: &Path = &write_config(&env, &url, &section);
    let started = Instant::now();
    let mut agent = Agent::start(config);

    agent
        .wait_for_event(
            Duration::from_secs(10),
            "a log that Redis is unreachable",
            |e| e["message"] == "redis unreachable" && e["level"] == "ERROR",
        )
        .await;
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(agent.exited(), None, "the agent gave up without Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.exited(), None, "the agent gave up without Redis");

    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "run exited with {status}");
    let stderr = agent.stderr().join("\n");
    assert!(
        !stderr.contains("s3cretpw"),
        "the password leaked:\n{stderr}"
    );
}

#[tokio::test]
async fn a_failing_entity_does_not_stop_the_others_and_recovers() {
    let env = Env::new();
    let (broken, broken_section) = table(&env, "run_broken", "200ms", PLAIN_QUERY).await;
    let (healthy, healthy_section) = table(&env, "run_healthy", "200ms", PLAIN_QUERY).await;
    insert(&broken.pool, 1).await;
    insert(&healthy.pool, 1).await;
    let mut agent = Agent::start(&config(&env, &[&broken_section, &healthy_section]));
    wait_for_keys(&broken.entity, [1]).await;
    wait_for_keys(&healthy.entity, [1]).await;

    sqlite_exec(&broken.pool, "DROP TABLE t").await;
    agent
        .wait_for_event(
            Duration::from_secs(20),
            "an error naming the failing entity",
            |e| {
                e["level"] == "ERROR"
                    && e["entity"] == broken.entity.as_str()
                    && e["error"]
                        .as_str()
                        .is_some_and(|m| m.contains("no such table: t"))
            },
        )
        .await;

    insert(&healthy.pool, 2).await;
    insert(&healthy.pool, 3).await;
    wait_for_keys(&healthy.entity, 1..=3).await;

    sqlite_exec(
        &broken.pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, \
         updated_at TEXT NOT NULL DEFAULT (datetime('now')));
         INSERT INTO t (id, name) VALUES (2, 'n2');
         INSERT INTO t (id, name) VALUES (3, 'n3')",
    )
    .await;
    wait_for_keys(&broken.entity, 1..=3).await;
    assert_eq!(agent.exited(), None, "the agent stopped");
}
