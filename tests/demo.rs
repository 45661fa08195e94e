//! `highwater demo` as a user runs it: what it prints, what lands in Redis,
//! and that the streams end in the database's final state.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sqlx::Row;

/// What one `highwater demo` run left behind.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `highwater demo` running as a child process, its output collected by threads.
struct Demo {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Demo {
    /// Starts `highwater demo <args>` against the test Redis.
    fn start(args: &[&str]) -> Demo {
        Demo::start_with(&redis_url(), args)
    }

    /// Starts `highwater demo --redis-url <url> <args>`.
    fn start_with(url: &str, args: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .arg("demo")
            .args(["--redis-url", url])
            .args(args)
            .env_remove("HIGHWATER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start highwater demo");
        let collect = |mut pipe: Box<dyn Read + Send>, text: &Arc<Mutex<String>>| {
            let text = Arc::clone(text);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                    text.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            })
        };
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(
                Box::new(child.stdout.take().expect("piped stdout")),
                &stdout,
            ),
            collect(
                Box::new(child.stderr.take().expect("piped stderr")),
                &stderr,
            ),
        ];
        Demo {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until stdout satisfies `check`, failing with `what` after `deadline`.
    fn wait_for_output(&self, deadline: Duration, what: &str, check: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while !check(&self.stdout()) {
            assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; stdout:\n{}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal with the `kill` command, as a terminal's Ctrl-C would.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits for the exit, killing the process and failing after `deadline`.
    fn finish(mut self, deadline: Duration) -> Run {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for highwater demo") {
                break status;
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "highwater demo did not exit within {deadline:?}; stdout:\n{}",
                    self.stdout()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Run {
            status,
            stdout: self.stdout(),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `highwater demo <args>` to its end, failing after `deadline`.
fn demo(args: &[&str], deadline: Duration) -> Run {
    Demo::start(args).finish(deadline)
}

/// One message line of the demo's output.
#[derive(Debug, Clone, PartialEq)]
struct Printed {
    stream: String,
    op: String,
    pkey: String,
    payload: Value,
}

/// The message lines (`HH:MM:SS.mmm  stream  op  pkey  {payload}`) of these streams.
fn printed(stdout: &str, streams: &[&str]) -> Vec<Printed> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let time = words.next()?;
            let is_time =
                time.len() == 12 && time.as_bytes()[2] == b':' && time.as_bytes()[8] == b'.';
            let stream = words.next()?;
            if !is_time || !streams.contains(&stream) {
                return None;
            }
            let payload = &line[line.find('{')?..];
            Some(Printed {
                stream: stream.to_owned(),
                op: words.next()?.to_owned(),
                pkey: words.next()?.to_owned(),
                payload: serde_json::from_str(payload)
                    .unwrap_or_else(|e| panic!("payload of {line:?} is not JSON: {e}")),
            })
        })
        .collect()
}

/// The messages of the streams as the demo prints them, read from Redis.
async fn on_streams(streams: &[&str]) -> Vec<Printed> {
    let mut all = Vec::new();
    for stream in streams {
        for m in read_stream(stream).await {
            all.push(Printed {
                stream: stream.to_string(),
                op: m.op,
                pkey: m.pkey,
                payload: m.payload.expect("the demo sends payloads"),
            });
        }
    }
    all
}

fn of_stream<'a>(messages: &'a [Printed], stream: &str) -> Vec<&'a Printed> {
    messages.iter().filter(|m| m.stream == stream).collect()
}

/// The last message of each key, by key.
fn latest<'a>(messages: &[&'a Printed]) -> std::collections::BTreeMap<String, &'a Printed> {
    messages.iter().map(|m| (m.pkey.clone(), *m)).collect()
}

async fn shop(path: &Path) -> sqlx::SqlitePool {
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .read_only(true),
        )
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The last message of every row is that row as it is in the database now
/// (and every key on the streams is a row of it).
async fn assert_streams_hold_the_final_state(
    database: &Path,
    customers: &[&Printed],
    orders: &[&Printed],
) {
    let db = shop(database).await;
    let rows = sqlx::query("SELECT id, name, email, deleted_at, updated_at FROM customers")
        .fetch_all(&db)
        .await
        .expect("read customers");
    let last_customers = latest(customers);
    assert_eq!(last_customers.len(), rows.len(), "one key per customer row");
    for row in &rows {
        let id: i64 = row.get("id");
        let deleted_at: Option<String> = row.get("deleted_at");
        let last = last_customers[&id.to_string()];
        assert_eq!(
            last.payload,
            json!({
                "id": id,
                "name": row.get::<String, _>("name"),
                "email": row.get::<String, _>("email"),
                "deleted_at": deleted_at,
                "updated_at": row.get::<String, _>("updated_at"),
            }),
            "customer {id}"
        );
        let op = if deleted_at.is_some() {
            "delete"
        } else {
            "upsert"
        };
        assert_eq!(last.op, op, "customer {id}");
    }
    let rows = sqlx::query(
        "SELECT o.id, o.customer_id, c.name, c.email, o.total_cents, o.status,
                max(o.updated_at, c.updated_at) AS changed_at
         FROM orders o JOIN customers c ON c.id = o.customer_id",
    )
    .fetch_all(&db)
    .await
    .expect("read orders");
    let last_orders = latest(orders);
    assert_eq!(last_orders.len(), rows.len(), "one key per order row");
    for row in &rows {
        let id: i64 = row.get("id");
        assert_eq!(
            last_orders[&id.to_string()].payload,
            json!({
                "id": id,
                "customer_id": row.get::<i64, _>("customer_id"),
                "customer_name": row.get::<String, _>("name"),
                "customer_email": row.get::<String, _>("email"),
                "total_cents": row.get::<i64, _>("total_cents"),
                "status": row.get::<String, _>("status"),
                "changed_at": row.get::<String, _>("changed_at"),
            }),
            "order {id}"
        );
    }
}

#[tokio::test]
async fn the_demo_streams_both_entities_changing_and_ends_in_the_database_state() {
    let env = Env::new();
    let dir = env.dir.path().join("demo");
    let run = demo(
        &[
            "--duration",
            "6s",
            "--dir",
            dir.to_str().unwrap(),
            "--prefix",
            &env.prefix,
        ],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "{}", run.describe());
    // Nothing went wrong, so the screen holds changes only: no log line.
    assert_eq!(run.stderr, "", "{}", run.describe());

    let customers = format!("{}:customers", env.prefix);
    let orders = format!("{}:orders", env.prefix);
    let streams = [customers.as_str(), orders.as_str()];
    assert!(
        run.stdout
            .contains(&format!("streams {customers} and {orders}")),
        "the header names the streams: {}",
        run.describe()
    );
    let shown = printed(&run.stdout, &streams);
    let shown_customers = of_stream(&shown, &customers);
    let shown_orders = of_stream(&shown, &orders);

    // The seed first: customers 1..5 and orders 1..8, as upserts.
    assert!(
        shown_customers.len() >= 5 && shown_orders.len() >= 8,
        "{}",
        run.describe()
    );
    assert_eq!(
        shown_customers[..5]
            .iter()
            .map(|m| m.pkey.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"]
    );
    assert_eq!(
        shown_customers[0].payload,
        json!({
            "id": 1,
            "name": "Ada Lovelace",
            "email": "ada.lovelace@example.com",
            "deleted_at": null,
            "updated_at": shown_customers[0].payload["updated_at"],
        })
    );
    assert_eq!(
        shown_orders[..8]
            .iter()
            .map(|m| m.pkey.as_str())
            .collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5", "6", "7", "8"]
    );
    assert_eq!(shown_orders[0].payload["customer_name"], "Ada Lovelace");

    // The writer's work after start: a key seen again (an update) or a soft delete.
    let changed_later = |messages: &[&Printed]| {
        messages.iter().enumerate().any(|(i, m)| {
            m.op == "delete" || messages[..i].iter().any(|earlier| earlier.pkey == m.pkey)
        })
    };
    assert!(
        changed_later(&shown_customers) || changed_later(&shown_orders),
        "no update or delete made by the writer was shown:\n{}",
        run.describe()
    );

    // Every message on the streams was printed, in stream order, and nothing else.
    let on_redis = on_streams(&streams).await;
    for stream in streams {
        assert_eq!(
            of_stream(&shown, stream),
            of_stream(&on_redis, stream),
            "{stream}: printed vs. on the stream"
        );
    }

    // The streams end in the database's final state.
    assert_streams_hold_the_final_state(&dir.join("shop.db"), &shown_customers, &shown_orders)
        .await;
    assert!(
        run.stdout.contains("stopped. The writer made"),
        "{}",
        run.describe()
    );
}

#[tokio::test]
async fn a_second_demo_run_in_the_same_place_starts_clean() {
    let env = Env::new();
    let dir = env.dir.path().join("demo");
    let args = [
        "--duration",
        "2s",
        "--dir",
        dir.to_str().unwrap(),
        "--prefix",
        &env.prefix,
    ];
    let first = demo(&args, Duration::from_secs(60));
    assert!(first.status.success(), "{}", first.describe());
    assert!(
        first.stdout.contains("(0 deleted now)"),
        "{}",
        first.describe()
    );

    let second = demo(&args, Duration::from_secs(60));
    assert!(second.status.success(), "{}", second.describe());
    // Two streams and three state keys per entity were left by the first run.
    assert!(
        second.stdout.contains("(8 deleted now)"),
        "{}",
        second.describe()
    );

    let customers = format!("{}:customers", env.prefix);
    let orders = format!("{}:orders", env.prefix);
    let streams = [customers.as_str(), orders.as_str()];
    let on_redis = on_streams(&streams).await;
    let shown = printed(&second.stdout, &streams);
    for stream in streams {
        assert_eq!(
            of_stream(&shown, stream),
            of_stream(&on_redis, stream),
            "{stream} holds the second run's messages only"
        );
    }
    let seed: Vec<&str> = of_stream(&on_redis, &customers)[..5]
        .iter()
        .map(|m| m.pkey.as_str())
        .collect();
    assert_eq!(seed, ["1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn the_demo_leaves_a_directory_with_someone_elses_config_alone() {
    let env = Env::new();
    let config = env.file("highwater.toml", "[redis]\nurl = \"redis://prod:6379\"\n");
    let run = demo(
        &[
            "--duration",
            "1s",
            "--dir",
            env.dir.path().to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "error: {}: a config that `highwater demo` did not write; choose another --dir",
            config.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[redis]\nurl = \"redis://prod:6379\"\n"
    );
    assert!(!env.dir.path().join("shop.db").exists());
}

#[tokio::test]
async fn ctrl_c_stops_the_demo_cleanly_after_a_last_poll() {
    let env = Env::new();
    let dir = env.dir.path().join("demo");
    let running = Demo::start(&["--dir", dir.to_str().unwrap(), "--prefix", &env.prefix]);
    let orders = format!("{}:orders", env.prefix);
    running.wait_for_output(Duration::from_secs(30), "the seeded orders", |out| {
        printed(out, &[&orders]).len() >= 8
    });
    running.signal("INT");
    let run = running.finish(Duration::from_secs(30));
    assert!(run.status.success(), "{}", run.describe());
    assert!(
        run.stdout.contains("\nstopped. The writer made"),
        "{}",
        run.describe()
    );
    // A last poll ran after the writer stopped.
    let customers = format!("{}:customers", env.prefix);
    let shown = printed(&run.stdout, &[&customers, &orders]);
    assert_streams_hold_the_final_state(
        &dir.join("shop.db"),
        &of_stream(&shown, &customers),
        &of_stream(&shown, &orders),
    )
    .await;
}

#[tokio::test]
async fn a_follower_started_at_the_end_reads_only_new_entries_in_order() {
    use highwater::tail::{Follower, StartAt};
    let stream = unique("hwtail");
    let mut conn = redis_conn().await;
    let add = |pkey: &str| {
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(&["pkey", pkey, "epoch", "7", "variant", "v", "op", "upsert"])
            .clone()
    };
    let _: String = add("old").query_async(&mut conn).await.expect("XADD");
    let mut follower = Follower::connect(
        &highwater::config::RedisSettings::for_url(&redis_url()),
        std::slice::from_ref(&stream),
        StartAt::End,
        None,
    )
    .await
    .expect("connect the follower");
    let blocked = tokio::spawn(async move {
        let first = follower.read(Some(Duration::from_secs(20))).await;
        (follower, first)
    });
    // Whether the read blocks already or not, it returns exactly the entries
    // added after connect: the position was fixed then. (The pause makes
    // the blocking path the likely one.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: String = add("new-1").query_async(&mut conn).await.expect("XADD");
    let _: String = add("new-2").query_async(&mut conn).await.expect("XADD");
    let (mut follower, first) = tokio::time::timeout(Duration::from_secs(30), blocked)
        .await
        .expect("the blocked read returns")
        .expect("the read task");
    let mut keys: Vec<String> = first
        .expect("read")
        .into_iter()
        .map(|e| e.expect("a highwater entry").pkey)
        .collect();
    if keys.len() < 2 {
        let rest = follower.read(None).await.expect("read");
        keys.extend(rest.into_iter().map(|e| e.expect("a highwater entry").pkey));
    }
    assert_eq!(keys, ["new-1", "new-2"]);
    assert!(follower.read(None).await.expect("read").is_empty());
    delete_key(&stream).await;
}

#[tokio::test]
async fn without_redis_the_demo_names_the_url_and_how_to_get_one() {
    let env = Env::new();
    let dir = env.dir.path().join("demo");
    let run = Demo::start_with(
        "redis://127.0.0.1:1/0",
        &["--duration", "5s", "--dir", dir.to_str().unwrap()],
    )
    .finish(Duration::from_secs(30));
    assert_eq!(run.status.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.starts_with(
            "error: redis (redis://127.0.0.1:1/0): cannot connect (is Redis running? ./scripts/demo starts one; or pass --redis-url): "
        ),
        "{}",
        run.describe()
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
}
