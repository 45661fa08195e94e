//! lua/dedup.lua through the sink's calling side, against the local Redis:
//! a chunk's state is looked up and written once per chunk, with the same
//! outcome as deciding its rows one after the other (a key twice in one
//! chunk, new and known keys mixed), the checks before any write (fence,
//! vanished state, a chunk whose predecessor was not applied), and the
//! stream in row order.

mod common;

use std::collections::BTreeMap;

use common::*;
use highwater::change::{Change, Op};
use highwater::config::{Config, EntitySettings};
use highwater::sink::{EntityKeys, Link, Sink, SinkError};

/// A sink and one entity of its own (stream, state keys), nothing written yet.
struct Fixture {
    _env: Env,
    sink: Sink,
    entity: EntitySettings,
    keys: EntityKeys,
}

async fn fixture(prefix: &str) -> Fixture {
    let env = Env::new();
    let entity = unique(prefix);
    let db = env.dir.path().join("unused.db");
    let path = env.config(&format!(
        r#"
[sources.s]
url = "{url}"

[entities.{entity}]
source = "s"
query = "SELECT id, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1h"
"#,
        url = sqlite_url(&db)
    ));
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let sink = Sink::connect(&config.redis)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let entity = config.entities.remove(&entity).expect("the entity");
    let keys = sink.keys(&entity);
    Fixture {
        _env: env,
        sink,
        entity,
        keys,
    }
}

/// A row version: key, epoch, digest; the payload names all three.
fn row(pkey: &str, epoch: i64, digest: u64) -> Change {
    Change {
        pkey: pkey.to_owned(),
        epoch,
        digest,
        op: Op::Upsert,
        payload: Some(format!(
            r#"{{"id":"{pkey}","epoch":{epoch},"digest":{digest}}}"#
        )),
    }
}

impl Fixture {
    async fn apply(&self, chunk: &[Change], expect_state: bool) -> Result<(u64, i64), SinkError> {
        self.sink
            .apply_chunk(&self.entity, &self.keys, chunk, expect_state, None)
            .await
    }

    /// The stream as (pkey, epoch) in stream order.
    async fn stream(&self) -> Vec<(String, i64)> {
        read_stream(&self.keys.stream)
            .await
            .into_iter()
            .map(|m| {
                let digest = m.payload.as_ref().expect("payload")["epoch"].as_i64();
                assert_eq!(digest, Some(m.epoch), "the payload is the row's");
                (m.pkey, m.epoch)
            })
            .collect()
    }

    /// pkey -> (score in the seen set, digest), and the state hash.
    async fn state(&self) -> (BTreeMap<String, (i64, String)>, BTreeMap<String, String>) {
        let mut conn = redis_conn().await;
        let seen: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(&self.keys.seen)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .expect("ZRANGE");
        let digests: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(&self.keys.digest)
            .query_async(&mut conn)
            .await
            .expect("HGETALL digest");
        assert_eq!(
            seen.len(),
            digests.len(),
            "seen {seen:?} and digests {digests:?} track different keys"
        );
        let keys = seen
            .into_iter()
            .map(|(pkey, score)| {
                let digest = digests.get(&pkey).cloned().expect("a digest per seen key");
                (pkey, (score, digest))
            })
            .collect();
        let state: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(&self.keys.state)
            .query_async(&mut conn)
            .await
            .expect("HGETALL state");
        (keys, state)
    }

    async fn cleanup(self) {
        for key in [
            &self.keys.stream,
            &self.keys.seen,
            &self.keys.digest,
            &self.keys.state,
            &self.keys.lease,
        ] {
            delete_key(key).await;
        }
    }
}

fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

fn pairs(list: &[(&str, i64)]) -> Vec<(String, i64)> {
    list.iter().map(|(k, e)| (k.to_string(), *e)).collect()
}

#[tokio::test]
async fn a_key_twice_in_one_chunk_with_different_digests_is_emitted_twice_and_keeps_the_last() {
    let f = fixture("dedup_twice").await;
    let chunk = [row("1", 10, 0xa), row("2", 11, 0xb), row("1", 12, 0xc)];
    assert_eq!(f.apply(&chunk, false).await.unwrap(), (3, 1));
    assert_eq!(f.stream().await, pairs(&[("1", 10), ("2", 11), ("1", 12)]));
    let (keys, state) = f.state().await;
    assert_eq!(
        keys["1"],
        (12, hex(0xc)),
        "the last emitted version of key 1"
    );
    assert_eq!(keys["2"], (11, hex(0xb)));
    assert_eq!(state["writes"], "1");

    // A -> B -> A within one chunk, against a stored A: the first A is
    // known, B and the second A are new versions.
    let chunk = [row("1", 20, 0xc), row("1", 21, 0xd), row("1", 22, 0xc)];
    assert_eq!(f.apply(&chunk, true).await.unwrap(), (2, 2));
    assert_eq!(
        f.stream().await,
        pairs(&[("1", 10), ("2", 11), ("1", 12), ("1", 21), ("1", 22)])
    );
    assert_eq!(f.state().await.0["1"], (22, hex(0xc)));

    // What the state now holds is known: nothing more is emitted.
    assert_eq!(f.apply(&[row("1", 23, 0xc)], true).await.unwrap(), (0, 2));
    f.cleanup().await;
}

#[tokio::test]
async fn a_key_twice_in_one_chunk_with_equal_digests_is_emitted_once_with_its_first_epoch() {
    let f = fixture("dedup_equal").await;
    let chunk = [row("7", 100, 0xe), row("8", 101, 0xf), row("7", 102, 0xe)];
    assert_eq!(f.apply(&chunk, false).await.unwrap(), (2, 1));
    assert_eq!(f.stream().await, pairs(&[("7", 100), ("8", 101)]));
    // The score is the emitted version's epoch, not the later duplicate's.
    assert_eq!(f.state().await.0["7"], (100, hex(0xe)));
    f.cleanup().await;
}

#[tokio::test]
async fn a_chunk_mixing_new_and_known_keys_emits_the_new_versions_in_row_order() {
    let f = fixture("dedup_mixed").await;
    assert_eq!(
        f.apply(&[row("a", 1, 1), row("b", 2, 2), row("c", 3, 3)], false)
            .await
            .unwrap(),
        (3, 1)
    );
    // a unchanged, d new, b changed, c unchanged, e new.
    let chunk = [
        row("a", 4, 1),
        row("d", 5, 4),
        row("b", 6, 22),
        row("c", 7, 3),
        row("e", 8, 5),
    ];
    assert_eq!(f.apply(&chunk, true).await.unwrap(), (3, 2));
    assert_eq!(
        f.stream().await,
        pairs(&[("a", 1), ("b", 2), ("c", 3), ("d", 5), ("b", 6), ("e", 8)])
    );
    let (keys, state) = f.state().await;
    let expected: BTreeMap<String, (i64, String)> = [
        ("a", 1, 1),
        ("b", 6, 22),
        ("c", 3, 3),
        ("d", 5, 4),
        ("e", 8, 5),
    ]
    .into_iter()
    .map(|(k, e, d)| (k.to_owned(), (e, hex(d))))
    .collect();
    assert_eq!(keys, expected);
    assert_eq!(state["writes"], "2");
    // A chunk of known versions only leaves the write counter alone.
    assert_eq!(f.apply(&chunk, true).await.unwrap(), (0, 2));
    assert_eq!(f.state().await.1["writes"], "2");
    f.cleanup().await;
}

/// More rows than the script passes to one command (it slices by 1,000):
/// the stream holds the emitted rows in row order, the state the last
/// emitted version of each key.
#[tokio::test]
async fn a_chunk_larger_than_a_command_slice_keeps_row_order_and_the_last_versions() {
    let f = fixture("dedup_large").await;
    // 1,200 keys in a scrambled order, each twice (the second a new version
    // every third key, else the same), then 300 known from the first half.
    let keys: Vec<u64> = (0..1200u64).map(|i| (i * 7919) % 1200).collect();
    let mut chunk = Vec::new();
    let mut epoch = 0;
    for &k in &keys {
        epoch += 1;
        chunk.push(row(&k.to_string(), epoch, k));
    }
    for &k in &keys {
        epoch += 1;
        let digest = if k % 3 == 0 { k + 10_000 } else { k };
        chunk.push(row(&k.to_string(), epoch, digest));
    }
    let mut expected_stream = Vec::new();
    let mut expected_state = BTreeMap::new();
    for change in &chunk {
        let last = expected_state
            .get(&change.pkey)
            .map(|(_, d): &(i64, String)| d.clone());
        if last.as_deref() != Some(hex(change.digest).as_str()) {
            expected_stream.push((change.pkey.clone(), change.epoch));
            expected_state.insert(change.pkey.clone(), (change.epoch, hex(change.digest)));
        }
    }
    assert_eq!(expected_stream.len(), 1600);
    assert_eq!(f.apply(&chunk, false).await.unwrap(), (1600, 1));
    assert_eq!(f.stream().await, expected_stream);
    assert_eq!(f.state().await.0, expected_state);
    f.cleanup().await;
}

#[tokio::test]
async fn the_fence_refuses_a_batched_chunk_and_it_writes_nothing() {
    let f = fixture("dedup_fence").await;
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("SET")
        .arg(&f.keys.lease)
        .arg("5 agent-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = [row("1", 1, 1), row("2", 2, 2)];
    let applied = f
        .sink
        .apply_chunk(&f.entity, &f.keys, &first, false, Some("5 agent-b"))
        .await;
    assert_eq!(applied.unwrap(), (2, 1));
    let before = (f.stream().await, f.state().await);

    // A stale holder's chunk: new keys, a changed key, a key twice.
    let chunk = [
        row("3", 3, 3),
        row("1", 4, 11),
        row("3", 5, 33),
        row("2", 6, 2),
    ];
    let refused = f
        .sink
        .apply_chunk(&f.entity, &f.keys, &chunk, true, Some("4 agent-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SinkError::Fenced { holder: Some(h), .. } if h == "5 agent-b"),
        "{refused:?}"
    );
    assert_eq!(
        (f.stream().await, f.state().await),
        before,
        "a fenced chunk wrote"
    );

    // The state the cycle started from vanished: nothing is applied either.
    delete_key(&f.keys.state).await;
    let before = (f.stream().await, f.state().await);
    let vanished = f
        .sink
        .apply_chunk(&f.entity, &f.keys, &chunk, true, Some("5 agent-b"))
        .await
        .unwrap_err();
    assert!(
        matches!(vanished, SinkError::StateVanished { .. }),
        "{vanished:?}"
    );
    assert_eq!(
        (f.stream().await, f.state().await),
        before,
        "the chunk wrote into a lost state"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn a_chunk_whose_predecessor_was_not_applied_writes_nothing() {
    let f = fixture("dedup_chain").await;
    let send = |chunk: Vec<Change>, after: Option<&'static str>, name: &'static str| {
        let cmd = f.sink.chunk_command(
            &f.entity,
            &f.keys,
            &chunk,
            true,
            None,
            Link {
                after,
                name: Some(name),
            },
        );
        f.sink.send_chunk(&f.entity, cmd)
    };
    assert_eq!(f.apply(&[row("0", 1, 1)], false).await.unwrap(), (1, 1));
    assert_eq!(
        send(vec![row("1", 2, 2)], None, "c:1").await.unwrap(),
        (1, 2)
    );
    assert_eq!(f.state().await.1["chunk"], "c:1");
    let before = (f.stream().await, f.state().await);

    // Chunk 3 arrives while chunk 2 never was applied.
    let refused = send(vec![row("3", 4, 4), row("1", 5, 5)], Some("c:2"), "c:3")
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SinkError::OutOfOrder { last: Some(l), .. } if l == "c:1"),
        "{refused:?}"
    );
    assert!(refused.is_transient());
    assert_eq!(
        (f.stream().await, f.state().await),
        before,
        "an out-of-order chunk wrote"
    );

    // In order, both apply; a chunk that emits nothing still advances the chain.
    assert_eq!(
        send(vec![row("1", 2, 2)], Some("c:1"), "c:2")
            .await
            .unwrap(),
        (0, 2)
    );
    assert_eq!(
        send(vec![row("3", 4, 4), row("1", 5, 5)], Some("c:2"), "c:3")
            .await
            .unwrap(),
        (2, 3)
    );
    assert_eq!(
        f.stream().await,
        pairs(&[("0", 1), ("1", 2), ("3", 4), ("1", 5)])
    );
    assert_eq!(f.state().await.1["chunk"], "c:3");
    f.cleanup().await;
}

/// A first cycle of many small chunks, pipelined: a query that returns
/// every key twice (two versions, in separate chunks) puts both on the
/// stream, the older first; the chunks were applied one after the other,
/// each after the one it named.
#[tokio::test]
async fn a_pipelined_first_cycle_keeps_each_keys_versions_in_order() {
    let env = Env::new();
    let entity = unique("dedup_pipelined");
    let db = env.dir.path().join(format!("{entity}.db"));
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE v (id INTEGER NOT NULL, version INTEGER NOT NULL, name TEXT, \
         updated_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (id, version))",
    )
    .await;
    sqlite_exec(
        &pool,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 150) \
         INSERT INTO v (id, version, name) SELECT i, w, 'n' || i || 'v' || w FROM n, (SELECT 1 AS w UNION ALL SELECT 2)",
    )
    .await;
    let config = env.config(&format!(
        r#"
[sources.{entity}]
url = "{url}"

[entities.{entity}]
source = "{entity}"
query = "SELECT id, name, updated_at FROM v WHERE updated_at >= :since ORDER BY version, id"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1h"
start = "beginning"
chunk_rows = 7
"#,
        url = sqlite_url(&db)
    ));
    let out = once_ok(&config);
    assert!(out.contains("300 rows read, 300 emitted"), "{out}");

    let messages = read_stream(&entity).await;
    assert_eq!(messages.len(), 300);
    let names: Vec<String> = messages
        .iter()
        .map(|m| {
            m.payload.as_ref().expect("payload")["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (1..=2)
        .flat_map(|w| (1..=150).map(move |i| format!("n{i}v{w}")))
        .collect();
    assert_eq!(names, expected, "the stream is not in the query's order");
    // 43 chunks: the first one alone (it creates the state), the others
    // chained; the last one applied is the 43rd.
    let last = state_field(&env, &entity, "chunk")
        .await
        .expect("a chained chunk");
    assert!(last.ends_with(":43"), "{last}");
}
