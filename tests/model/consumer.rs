//! Reading the stream as its consumers do: entries as messages (an XRANGE
//! or XREADGROUP reply), and a consumer group that reads slowly, falls
//! behind and stalls, keeping every entry it was delivered, in order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use redis::FromRedisValue;

pub use crate::common::parse_entries;
use crate::common::Message;

/// The consumer group's name.
pub const GROUP: &str = "model";

/// The group's one consumer.
const CONSUMER: &str = "c";

/// Entries per read: a small batch, as a consumer that processes each.
const COUNT: usize = 20;

/// What the consumer task and the harness share.
#[derive(Default)]
struct Shared {
    /// Every entry the group was delivered, in delivery order.
    received: Mutex<Vec<Message>>,
    /// The most entries the group had yet to be delivered, seen before one
    /// of its reads (XINFO GROUPS `lag`).
    max_lag: AtomicU64,
    /// The most entries the stream held, seen before one of its reads.
    max_len: AtomicU64,
    /// Stalls of the consumer (a slow downstream), before a read or between
    /// a read and its acknowledgement.
    stalls: AtomicU64,
}

/// A consumer group on the stream and a task reading it through the whole
/// scenario: `COUNT` entries at a time, each batch acknowledged after its
/// "processing" (0 to 100 ms: the entries are pending meanwhile), 50 to
/// 300 ms between reads, and now and then a stall of 1 to 3 s, before a
/// read (entries wait undelivered) or before the acknowledgement (entries
/// wait pending), so that it falls well behind what the agent emits.
pub struct GroupConsumer {
    stream: String,
    conn: MultiplexedConnection,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl GroupConsumer {
    /// Creates the group on `stream` (`XGROUP CREATE <stream> model 0
    /// MKSTREAM`: from the stream's first entry, creating the stream) and
    /// starts reading; `seed` decides the pauses.
    pub async fn start(conn: MultiplexedConnection, stream: &str, seed: u64) -> GroupConsumer {
        let mut create = conn.clone();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut create)
            .await
            .expect("XGROUP CREATE");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(read_slowly(
            conn.clone(),
            stream.to_owned(),
            StdRng::seed_from_u64(seed),
            Arc::clone(&stop),
            Arc::clone(&shared),
        ));
        GroupConsumer {
            stream: stream.to_owned(),
            conn,
            stop,
            shared,
            task: Some(task),
        }
    }

    /// How many entries the group was delivered so far.
    pub fn received_len(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// The entries delivered from the `from`th on.
    pub fn received_since(&self, from: usize) -> Vec<Message> {
        let received = self.shared.received.lock().unwrap();
        received[from.min(received.len())..].to_vec()
    }

    /// Every entry delivered, in order, taken out.
    pub fn take_received(&self) -> Vec<Message> {
        std::mem::take(&mut *self.shared.received.lock().unwrap())
    }

    pub fn max_lag(&self) -> u64 {
        self.shared.max_lag.load(Ordering::Relaxed)
    }

    pub fn max_len(&self) -> u64 {
        self.shared.max_len.load(Ordering::Relaxed)
    }

    pub fn stalls(&self) -> u64 {
        self.shared.stalls.load(Ordering::Relaxed)
    }

    /// Stops the slow reader once its batch in hand is acknowledged; a
    /// panic of the reader is raised here.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }

    /// Reads (and acknowledges) everything not yet delivered to the group,
    /// at full speed (the reader must be stopped); returns how many entries.
    pub async fn drain(&mut self) -> usize {
        assert!(self.task.is_none(), "drain() while the slow reader runs");
        let mut conn = self.conn.clone();
        let mut drained = 0;
        loop {
            let batch = read_batch(&mut conn, &self.stream, 1000).await;
            if batch.is_empty() {
                return drained;
            }
            acknowledge(&mut conn, &self.stream, &batch).await;
            drained += batch.len();
            self.shared.received.lock().unwrap().extend(batch);
        }
    }

    /// How many entries were ever added to the stream (XINFO STREAM
    /// `entries-added`), trimmed or not.
    pub async fn added(&self) -> u64 {
        let mut conn = self.conn.clone();
        let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await
            .expect("XINFO STREAM");
        u64::from_redis_value(info.get("entries-added").expect("entries-added (Redis 7)"))
            .expect("entries-added is a number")
    }

    /// How many entries the group has delivered and not had acknowledged.
    pub async fn pending(&self) -> u64 {
        let mut conn = self.conn.clone();
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        let redis::Value::Array(fields) = summary else {
            panic!("XPENDING's summary is an array: {summary:?}");
        };
        u64::from_redis_value(&fields[0]).expect("XPENDING's count")
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The slow reader's loop, until `stop`.
async fn read_slowly(
    mut conn: MultiplexedConnection,
    stream: String,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let stall = |rng: &mut StdRng| {
        if rng.random_bool(0.1) {
            Some(Duration::from_millis(rng.random_range(1000..=3000)))
        } else {
            None
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if let Some(lag) = lag(&mut conn, &stream).await {
            shared.max_lag.fetch_max(lag, Ordering::Relaxed);
        }
        let length: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        shared.max_len.fetch_max(length, Ordering::Relaxed);
        let batch = read_batch(&mut conn, &stream, COUNT).await;
        if !batch.is_empty() {
            let processing = match stall(&mut rng) {
                Some(stalled) => {
                    shared.stalls.fetch_add(1, Ordering::Relaxed);
                    stalled
                }
                None => Duration::from_millis(rng.random_range(0..=100)),
            };
            tokio::time::sleep(processing).await;
            acknowledge(&mut conn, &stream, &batch).await;
            shared.received.lock().unwrap().extend(batch);
        }
        let pause = match stall(&mut rng) {
            Some(stalled) => {
                shared.stalls.fetch_add(1, Ordering::Relaxed);
                stalled
            }
            None => Duration::from_millis(rng.random_range(50..=300)),
        };
        // Stops promptly even in the middle of a stall.
        let until = tokio::time::Instant::now() + pause;
        while tokio::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20).min(until - tokio::time::Instant::now()))
                .await;
        }
    }
}

/// `XREADGROUP GROUP model c COUNT <count> STREAMS <stream> >`: up to
/// `count` entries never delivered to the group.
async fn read_batch(conn: &mut MultiplexedConnection, stream: &str, count: usize) -> Vec<Message> {
    let reply: Option<Vec<(String, redis::Value)>> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(CONSUMER)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .expect("XREADGROUP");
    reply
        .into_iter()
        .flatten()
        .flat_map(|(_, entries)| parse_entries(entries))
        .collect()
}

async fn acknowledge(conn: &mut MultiplexedConnection, stream: &str, batch: &[Message]) {
    let acked: usize = redis::cmd("XACK")
        .arg(stream)
        .arg(GROUP)
        .arg(batch.iter().map(|m| m.id.as_str()).collect::<Vec<_>>())
        .query_async(conn)
        .await
        .expect("XACK");
    assert_eq!(acked, batch.len(), "XACK acknowledged fewer than delivered");
}

/// The group's `lag` (entries not yet delivered) from XINFO GROUPS, when
/// Redis can tell.
async fn lag(conn: &mut MultiplexedConnection, stream: &str) -> Option<u64> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XINFO GROUPS");
    let name = |g: &std::collections::HashMap<String, redis::Value>| {
        g.get("name").and_then(|n| String::from_redis_value(n).ok())
    };
    let group = groups.iter().find(|g| name(g).as_deref() == Some(GROUP))?;
    // Nil when Redis cannot tell.
    u64::from_redis_value(group.get("lag")?).ok()
}
