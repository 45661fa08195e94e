//! Several agents on one config, through the real binary on PostgreSQL: each
//! entity has one writer at a time, a paused holder's late writes are
//! refused (nothing goes back in time, nothing is doubled), a killed holder
//! is replaced within the lease, a SIGTERM hands over at once, the entities
//! spread over the live agents, `once` never writes beside a live holder,
//! and a stale token writes nothing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The lease of these tests: short, so that takeovers are quick.
const LEASE: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(200);
const DEADLINE: Duration = Duration::from_secs(30);

/// A table `name` (id, ver bumped by every update, updated_at) with `rows`
/// rows, and the `[entities.<name>]` section polling it.
async fn versioned_table(pool: &sqlx::PgPool, name: &str, rows: u32, chunk_rows: u32) -> String {
    versioned_table_with(pool, name, rows, chunk_rows, "").await
}

/// [`versioned_table`] whose query also applies `filter` (`AND ...`).
async fn versioned_table_with(
    pool: &sqlx::PgPool,
    name: &str,
    rows: u32,
    chunk_rows: u32,
    filter: &str,
) -> String {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, ver int NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
             INSERT INTO {name} (id, ver) SELECT g, 1 FROM generate_series(1, {rows}) g"
        ),
    )
    .await;
    format!(
        "[entities.{name}]\nsource = \"pg\"\n\
         query = \"SELECT id, ver, updated_at FROM {name} WHERE updated_at >= :since{filter}\"\n\
         key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5s\"\nevery = \"{}ms\"\n\
         start = \"beginning\"\nchunk_rows = {chunk_rows}\n\n",
        EVERY.as_millis()
    )
}

fn lease_config(env: &Env, entities: &str) -> PathBuf {
    env.config(&format!(
        "[agent]\nlease = \"{}ms\"\n\n[http]\nlisten = \"\"\n\n[sources.pg]\nurl = \"{}\"\n\n{entities}",
        LEASE.as_millis(),
        pg_url()
    ))
}

/// Bumps `ver` of random rows until stopped; returns the number of updates.
fn start_writer(
    pool: sqlx::PgPool,
    table: &str,
    rows: u32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let sql =
        format!("UPDATE {table} SET ver = ver + 1, updated_at = clock_timestamp() WHERE id = $1");
    tokio::spawn(async move {
        let mut updates = 0;
        let mut n: u64 = 0x9e37_79b9;
        while !stop.load(Ordering::Relaxed) {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (n >> 33) as u32 % rows + 1;
            sqlx::query(&sql)
                .bind(id as i32)
                .execute(&pool)
                .await
                .expect("update a row");
            updates += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        updates
    })
}

/// The lease value of an entity whose stream has its name, if held.
async fn lease_of(env: &Env, entity: &str) -> Option<String> {
    let mut conn = redis_conn().await;
    redis::cmd("GET")
        .arg(format!("{}:{{{entity}}}:lease:{entity}", env.prefix))
        .query_async(&mut conn)
        .await
        .expect("GET lease")
}

/// Which of `agents` holds the entity's lease now.
async fn holder(env: &Env, entity: &str, agents: &[Agent]) -> Option<usize> {
    let value = lease_of(env, entity).await?;
    agents
        .iter()
        .position(|a| value.ends_with(&format!("-{}", a.pid())))
}

/// What the stream says, checked against the table: versions out of order
/// per key, (key, version) pairs seen twice, keys whose last message is not
/// the row's version.
struct Verdict {
    messages: usize,
    out_of_order: usize,
    duplicated: usize,
    stale_last: Vec<String>,
}

async fn verdict(pool: &sqlx::PgPool, table: &str) -> Verdict {
    let messages = read_stream(table).await;
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen: HashMap<(String, i64), u32> = HashMap::new();
    let mut out_of_order = 0;
    for m in &messages {
        let ver = m.payload.as_ref().unwrap()["ver"].as_i64().unwrap();
        if let Some(previous) = last.insert(m.pkey.clone(), ver) {
            if ver < previous {
                out_of_order += 1;
            }
        }
        *seen.entry((m.pkey.clone(), ver)).or_default() += 1;
    }
    let rows: Vec<(i32, i32)> = sqlx::query_as(&format!("SELECT id, ver FROM {table}"))
        .fetch_all(pool)
        .await
        .unwrap();
    let stale_last = rows
        .iter()
        .filter(|(id, ver)| last.get(&id.to_string()) != Some(&i64::from(*ver)))
        .map(|(id, ver)| format!("{id}: row v{ver}, stream {:?}", last.get(&id.to_string())))
        .collect();
    Verdict {
        messages: messages.len(),
        out_of_order,
        duplicated: seen.values().filter(|&&n| n > 1).count(),
        stale_last,
    }
}

/// Waits until every row's last message is the row's version.
async fn converged(pool: &sqlx::PgPool, table: &str) -> Verdict {
    let started = Instant::now();
    loop {
        let v = verdict(pool, table).await;
        if v.stale_last.is_empty() {
            return v;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the stream did not catch up with the table: {:?}",
            &v.stale_last[..v.stale_last.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -s {name} {pid}");
}

/// Several agents, one config, a writer bumping versions; the holder is
/// paused (SIGSTOP) past its lease again and again, mostly in the middle of
/// a cycle (windows of hundreds of rows in chunks of 5), and resumed while
/// another agent writes: its late writes must be refused.
async fn paused_holders_write_nothing_stale(agents: usize) {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("lease_pause");
    let rows = 300;
    // Each row takes 2 ms to read: a cycle lasts long enough that most
    // pauses land between two of its chunks.
    let section =
        versioned_table_with(&pool, &table, rows, 5, " AND pg_sleep(0.002)::text = ''").await;
    let config = lease_config(&env, &section);
    let mut running = vec![Agent::start(&config)];
    eventually(DEADLINE, "the first agent's first cycle", || async {
        !running[0].cycles(Some(&table)).is_empty()
    })
    .await;
    for _ in 1..agents {
        running.push(Agent::start(&config));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(pool.clone(), &table, rows, Arc::clone(&stop));

    let mut pauses = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        if let Some(i) = holder(&env, &table, &running).await {
            signal(running[i].pid(), "STOP");
            tokio::time::sleep(LEASE + Duration::from_millis(700)).await;
            signal(running[i].pid(), "CONT");
            pauses += 1;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let updates = writer.await.unwrap();
    let v = converged(&pool, &table).await;

    let logs: Vec<String> = running.iter().flat_map(Agent::stderr).collect();
    let lost = logs
        .iter()
        .filter(|l| l.contains("lost the lease on entity"))
        .count();
    let takeovers = logs
        .iter()
        .filter(|l| l.contains("took over entity"))
        .count();
    let refused = logs
        .iter()
        .filter(|l| l.contains("cycle stopped: the fence refused its write"))
        .count();
    println!(
        "leases: agents={agents} pauses={pauses} updates={updates} messages={} out_of_order={} duplicated={} takeovers={takeovers} leases_lost={lost} writes_refused={refused}",
        v.messages, v.out_of_order, v.duplicated
    );
    assert!(pauses >= 3, "the holder was paused {pauses} times");
    assert!(
        takeovers >= 1,
        "no agent took over a paused holder's entity"
    );
    assert!(lost >= 1, "no paused holder noticed it lost the lease");
    assert!(
        refused >= 1,
        "no paused holder resumed in the middle of a cycle (its next write refused)"
    );
    assert_eq!(
        v.out_of_order, 0,
        "versions went back in time on the stream"
    );
    assert_eq!(v.duplicated, 0, "versions arrived twice");
    for agent in &running {
        agent.signal("TERM");
    }
    for agent in &mut running {
        assert!(agent.wait_exit(DEADLINE).await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_a_paused_holder_send_nothing_out_of_order_or_twice() {
    paused_holders_write_nothing_stale(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_with_a_paused_holder_send_nothing_out_of_order_or_twice() {
    paused_holders_write_nothing_stale(3).await;
}

/// Starts agents on one entity until the first holds it; returns them and
/// the holder's index.
async fn holder_and_standby(env: &Env, config: &Path, table: &str) -> (Vec<Agent>, usize) {
    let first = Agent::start(config);
    eventually(DEADLINE, "the first agent's first cycle", || async {
        !first.cycles(Some(table)).is_empty()
    })
    .await;
    let agents = vec![first, Agent::start(config)];
    // The second registers and stands by.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let i = holder(env, table, &agents).await.expect("a holder");
    (agents, i)
}

/// Inserts row `id` and waits until it is on the stream; returns how long that took.
async fn time_to_stream(pool: &sqlx::PgPool, table: &str, id: i32) -> Duration {
    let inserted = Instant::now();
    sqlx::query(&format!("INSERT INTO {table} (id, ver) VALUES ($1, 1)"))
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    let pkey = id.to_string();
    loop {
        if read_stream(table).await.iter().any(|m| m.pkey == pkey) {
            return inserted.elapsed();
        }
        assert!(
            inserted.elapsed() < DEADLINE,
            "row {id} never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_within_the_lease() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("lease_kill");
    let section = versioned_table(&pool, &table, 20, 500).await;
    let config = lease_config(&env, &section);
    let (mut agents, i) = holder_and_standby(&env, &config, &table).await;

    signal(agents[i].pid(), "KILL");
    let took = time_to_stream(&pool, &table, 1000).await;
    println!("leases: kill -9 of the holder: the standby emitted the next change after {took:?} (lease {LEASE:?}, every {EVERY:?})");
    assert!(
        took <= LEASE + EVERY + Duration::from_secs(1),
        "the takeover took {took:?}"
    );
    let standby = &agents[1 - i];
    assert!(
        standby
            .stderr()
            .iter()
            .any(|l| l.contains(&format!("took over entity {table} from agent"))),
        "{}",
        standby.stderr().join("\n")
    );
    let v = verdict(&pool, &table).await;
    assert_eq!((v.out_of_order, v.duplicated), (0, 0));
    assert!(v.stale_last.is_empty(), "{:?}", v.stale_last);
    agents.remove(i);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_entity_over_in_under_a_second() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("lease_roll");
    let rows = 50;
    let section = versioned_table(&pool, &table, rows, 500).await;
    let config = lease_config(&env, &section);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(pool.clone(), &table, rows, Arc::clone(&stop));
    let (mut agents, i) = holder_and_standby(&env, &config, &table).await;

    // A rolling restart: the old pod gets SIGTERM while the new one runs.
    agents[i].signal("TERM");
    assert!(agents[i].wait_exit(DEADLINE).await.success());
    let took = time_to_stream(&pool, &table, 1000).await;
    println!("leases: SIGTERM of the holder: the new agent emitted the next change after {took:?}");
    assert!(took < Duration::from_secs(1), "the handover took {took:?}");
    assert!(agents[i]
        .stderr()
        .iter()
        .any(|l| l.contains("released the leases")));

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let v = converged(&pool, &table).await;
    assert_eq!(
        (v.out_of_order, v.duplicated),
        (0, 0),
        "nothing doubled or reordered"
    );
}

/// How many of `entities` each agent holds, by pid.
async fn held_per_agent(env: &Env, entities: &[String], agents: &[&Agent]) -> Vec<usize> {
    let mut counts = vec![0; agents.len()];
    for entity in entities {
        if let Some(value) = lease_of(env, entity).await {
            if let Some(i) = agents
                .iter()
                .position(|a| value.ends_with(&format!("-{}", a.pid())))
            {
                counts[i] += 1;
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_entities_spread_over_three_agents_and_over_two_when_one_dies() {
    let env = Env::new();
    let pool = pg().await;
    let mut sections = String::new();
    let mut entities = Vec::new();
    for _ in 0..10 {
        let table = unique("lease_share");
        sections.push_str(&versioned_table(&pool, &table, 3, 500).await);
        entities.push(table);
    }
    let config = lease_config(&env, &sections);
    let mut agents = vec![
        Agent::start(&config),
        Agent::start(&config),
        Agent::start(&config),
    ];
    let mut counts = Vec::new();
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        counts = held_per_agent(&env, &entities, &agents.iter().collect::<Vec<_>>()).await;
        let mut sorted = counts.clone();
        sorted.sort_unstable();
        if sorted == [3, 3, 4] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [3, 3, 4], "leases per agent: {counts:?}");

    // `status` names every holder and the three agents.
    let out = highwater(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["agents"].as_array().unwrap().len(), 3, "{status}");
    for e in status["entities"].as_array().unwrap() {
        let lease = &e["lease"];
        assert!(lease["holder"].as_str().is_some(), "{e}");
        assert!(lease["token"].as_u64().is_some(), "{e}");
        let left = lease["expires_in_seconds"].as_f64().unwrap();
        assert!(left > 0.0 && left <= LEASE.as_secs_f64(), "{e}");
    }

    let dead = agents.remove(0);
    signal(dead.pid(), "KILL");
    let killed = Instant::now();
    let alive: Vec<&Agent> = agents.iter().collect();
    loop {
        counts = held_per_agent(&env, &entities, &alive).await;
        if counts == [5, 5] {
            break;
        }
        assert!(
            killed.elapsed() < LEASE + EVERY + Duration::from_secs(3),
            "after the kill, leases per agent: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "leases: 10 entities on 3 agents, one killed: 5 and 5 after {:?}",
        killed.elapsed()
    );
    // Every entity keeps flowing with its new holder.
    for (i, entity) in entities.iter().enumerate() {
        time_to_stream(&pool, entity, 100 + i as i32).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_skips_an_entity_another_agent_holds_and_waits_for_it_with_wait() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("lease_once");
    let section = versioned_table(&pool, &table, 5, 500).await;
    let config = lease_config(&env, &section);
    let mut agent = Agent::start(&config);
    eventually(DEADLINE, "the agent's first cycle", || async {
        !agent.cycles(Some(&table)).is_empty()
    })
    .await;
    let before = read_stream(&table).await.len();

    let out = highwater(&["once", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(75), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{table}: held by agent {}",
            lease_of(&env, &table)
                .await
                .unwrap()
                .split_once(' ')
                .unwrap()
                .1
        )),
        "{stdout}"
    );
    assert!(stdout.contains("skipped"), "{stdout}");

    // With --wait it runs once the holder is gone.
    let waiting = {
        let config = config.clone();
        std::thread::spawn(move || {
            highwater(&["once", "--wait", "--config", config.to_str().unwrap()])
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The holder stops renewing (a paused VM); the change waits for `once`.
    agent.signal("STOP");
    pg_exec(
        &pool,
        &format!("UPDATE {table} SET ver = 2, updated_at = clock_timestamp() WHERE id = 1"),
    )
    .await;
    let out = waiting.join().unwrap();
    agent.signal("CONT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 emitted"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("waiting for it"));
    assert_eq!(read_stream(&table).await.len(), before + 1);
    agent.signal("TERM");
    agent.wait_exit(DEADLINE).await;
}

// ---------------------------------------------------------------------------
// The fence, at the scripts.
// ---------------------------------------------------------------------------

fn script(name: &str) -> redis::Script {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{}/lua/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    // The commit script begins with the retention it calls (src/sink.rs).
    match name {
        "commit.lua" => redis::Script::new(&(read("retention.lua") + &read(name))),
        _ => redis::Script::new(&read(name)),
    }
}

struct Keys {
    stream: String,
    seen: String,
    digest: String,
    state: String,
    lease: String,
    tokens: String,
}

fn keys(env: &Env, entity: &str) -> Keys {
    let key = |kind: &str| format!("{}:{{{entity}}}:{kind}:{entity}", env.prefix);
    Keys {
        stream: entity.to_owned(),
        seen: key("seen"),
        digest: key("digest"),
        state: key("state"),
        lease: key("lease"),
        tokens: key("tokens"),
    }
}

async fn acquire(k: &Keys, agent: &str) -> String {
    let mut conn = redis_conn().await;
    let (status, value, _, _): (String, String, i64, String) = script("lease.lua")
        .key(&k.lease)
        .key(&k.tokens)
        .arg("acquire")
        .arg("")
        .arg(agent)
        .arg(60_000)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(status, "acquired");
    value
}

/// Everything the scripts write, to compare before and after.
async fn written(
    k: &Keys,
) -> (
    Vec<String>,
    BTreeMap<String, String>,
    Vec<String>,
    BTreeMap<String, String>,
) {
    let mut conn = redis_conn().await;
    let stream: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&k.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let digests: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&k.digest)
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen: Vec<String> = redis::cmd("ZRANGE")
        .arg(&k.seen)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    let state: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&k.state)
        .query_async(&mut conn)
        .await
        .unwrap();
    (
        stream.into_iter().map(|(id, _)| id).collect(),
        digests,
        seen,
        state,
    )
}

async fn dedup(k: &Keys, lease: &str, pkey: &str, digest: &str) -> redis::RedisResult<(i64, i64)> {
    dedup_chunk(k, lease, pkey, digest, None).await
}

/// A one-row chunk; `named`: this chunk's name, recorded (the state hash
/// must exist then), and the chunk that must be the last one applied.
async fn dedup_chunk(
    k: &Keys,
    lease: &str,
    pkey: &str,
    digest: &str,
    named: Option<(&str, &str)>,
) -> redis::RedisResult<(i64, i64)> {
    let mut conn = redis_conn().await;
    let (name, after) = named.unwrap_or_default();
    script("dedup.lua")
        .key(&k.seen)
        .key(&k.digest)
        .key(&k.stream)
        .key(&k.state)
        .key(&k.lease)
        .arg(0)
        .arg("v")
        .arg("1")
        .arg(if named.is_some() { "1" } else { "0" })
        .arg(lease)
        .arg(after)
        .arg(name)
        .arg(pkey)
        .arg(1_000_000)
        .arg(digest)
        .arg("upsert")
        .arg("{}")
        .invoke_async(&mut conn)
        .await
}

/// The commit script's reply: watermark, trimmed, tracked, stream length,
/// then the retention's three values.
type CommitReply = (Option<String>, i64, i64, i64, i64, i64, Vec<redis::Value>);

async fn commit(k: &Keys, lease: &str) -> redis::RedisResult<CommitReply> {
    commit_after(k, lease, "", 5_000_000).await
}

/// A commit whose cycle's last chunk is `last_chunk` ("": no check), with
/// `candidate` as the watermark candidate.
async fn commit_after(
    k: &Keys,
    lease: &str,
    last_chunk: &str,
    candidate: i64,
) -> redis::RedisResult<CommitReply> {
    let mut conn = redis_conn().await;
    script("commit.lua")
        .key(&k.state)
        .key(&k.seen)
        .key(&k.digest)
        .key(&k.lease)
        .key(&k.stream)
        .key(format!("{}:dropped", k.state))
        .arg(candidate)
        .arg(10_000_000)
        .arg(1000)
        .arg("1")
        .arg(lease)
        .arg(last_chunk)
        .arg(0)
        .arg(0)
        .arg(0)
        .arg("last_rows")
        .arg(1)
        .invoke_async(&mut conn)
        .await
}

#[tokio::test]
async fn a_script_call_with_a_stale_lease_writes_nothing() {
    let env = Env::new();
    let entity = unique("lease_fence");
    let k = keys(&env, &entity);
    let old = acquire(&k, "agent-a").await;
    assert_eq!(dedup(&k, &old, "1", "aaaa").await.unwrap(), (1, 1));
    // agent-a's lease expires; agent-b takes the entity over.
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("DEL")
        .arg(&k.lease)
        .query_async(&mut conn)
        .await
        .unwrap();
    let new = acquire(&k, "agent-b").await;
    let (old_token, new_token) = (token(&old), token(&new));
    assert!(new_token > old_token, "{old} then {new}");
    let before = written(&k).await;

    let refused = dedup(&k, &old, "2", "bbbb").await.unwrap_err();
    assert_eq!(refused.code(), Some("HWFENCED"), "{refused}");
    assert!(refused.to_string().contains("agent-b"), "{refused}");
    let refused = commit(&k, &old).await.unwrap_err();
    assert_eq!(refused.code(), Some("HWFENCED"), "{refused}");
    assert_eq!(written(&k).await, before, "a stale call changed something");

    // The holder's calls go through.
    assert_eq!(dedup(&k, &new, "2", "bbbb").await.unwrap(), (1, 2));
    assert!(commit(&k, &new).await.is_ok());
}

/// A failover that rolls back a cycle's last chunk (the promoted replica
/// lacked it) and then receives the cycle's commit: the commit names the
/// chunk it follows, is refused, and changes nothing, so the watermark does
/// not pass rows that are on no stream.
#[tokio::test]
async fn a_commit_whose_last_chunk_is_missing_changes_nothing() {
    let env = Env::new();
    let entity = unique("commit_chain");
    let k = keys(&env, &entity);
    let lease = acquire(&k, "agent-a").await;
    assert_eq!(dedup(&k, &lease, "1", "aaaa").await.unwrap(), (1, 1));
    assert_eq!(
        dedup_chunk(&k, &lease, "2", "bbbb", Some(("cycle-1:1", "")))
            .await
            .unwrap(),
        (1, 2)
    );
    // The cycle's second chunk, "cycle-1:2", is what the failover lost.
    let before = written(&k).await;
    let refused = commit_after(&k, &lease, "cycle-1:2", 20_000_000)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("HWCHAIN"), "{refused}");
    assert!(refused.to_string().contains("cycle-1:1"), "{refused}");
    assert_eq!(
        written(&k).await,
        before,
        "a refused commit changed something"
    );

    let (watermark, ..) = commit_after(&k, &lease, "cycle-1:1", 20_000_000)
        .await
        .unwrap();
    assert_eq!(watermark.as_deref(), Some("20000000"));
}

fn token(value: &str) -> u64 {
    value.split_once(' ').unwrap().0.parse().unwrap()
}

/// Redis losing its data takes the token counter with it: the next token
/// restarts from Redis's clock, above every token issued before, so a stale
/// holder's lease value can never be current again.
#[tokio::test]
async fn after_redis_lost_the_leases_a_stale_token_stays_stale() {
    let env = Env::new();
    let entity = unique("lease_loss");
    let k = keys(&env, &entity);
    let mut values = vec![acquire(&k, "agent-a").await];
    let mut conn = redis_conn().await;
    for _ in 0..3 {
        // A loss: every key of the entity gone (as FLUSHALL or a restart
        // without persistence would), then another agent takes it.
        let _: () = redis::cmd("DEL")
            .arg(&k.lease)
            .arg(&k.tokens)
            .arg(&k.state)
            .query_async(&mut conn)
            .await
            .unwrap();
        values.push(acquire(&k, "agent-a").await);
    }
    let tokens: Vec<u64> = values.iter().map(|v| token(v)).collect();
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    let current = values.last().unwrap();
    for stale in &values[..values.len() - 1] {
        let refused = dedup(&k, stale, "1", "aaaa").await.unwrap_err();
        assert_eq!(refused.code(), Some("HWFENCED"), "{refused}");
    }
    assert_eq!(dedup(&k, current, "1", "aaaa").await.unwrap(), (1, 1));
}
