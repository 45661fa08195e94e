//! Least privilege in Redis: every command of highwater runs as a user with
//! exactly the ACL rule the README gives (read from the README itself, so the
//! two cannot drift), against a private `redis-server` whose `ACL LOG` must
//! stay empty; and a rule missing one permission fails with an error that
//! names the command and points at the README.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{node_conn, PrivateCluster};
use common::*;

const DEADLINE: Duration = Duration::from_secs(30);
/// The password every test user gets in place of the README's placeholder.
const PASSWORD: &str = "pw";
/// How the README is referred to in a refusal.
const POINTER: &str = "highwater needs the ACL rule in README \"Redis ACL (least privilege)\"";

/// The README's rules: user name -> rule (everything after the name), as
/// given by its `ACL SETUSER` lines, which must match its `users.acl` lines.
fn readme_rules() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let start = readme
        .find("<!-- acl-rules")
        .expect("README holds <!-- acl-rules ... -->");
    let end = readme[start..]
        .find("<!-- /acl-rules -->")
        .expect("README closes the acl-rules block")
        + start;
    let (mut setuser, mut file) = (BTreeMap::new(), BTreeMap::new());
    for line in readme[start..end].lines() {
        let (target, rest) = if let Some(rest) = line.strip_prefix("ACL SETUSER ") {
            (&mut setuser, rest)
        } else if let Some(rest) = line.strip_prefix("user ") {
            (&mut file, rest)
        } else {
            continue;
        };
        let (name, rule) = rest.split_once(' ').expect("a user name and a rule");
        target.insert(name.to_owned(), rule.to_owned());
    }
    assert_eq!(
        setuser.keys().collect::<Vec<_>>(),
        ["highwater", "highwater-reader"],
        "the README's users"
    );
    assert_eq!(
        setuser, file,
        "the README's ACL SETUSER and users.acl lines say the same"
    );
    setuser
}

/// A rule as applied here: the password is ours; on Redis 7.2 and later
/// `+client|setinfo` is added, as the README says.
fn applied(rule: &str, redis_version: (u32, u32)) -> String {
    let mut words: Vec<String> = rule
        .split_whitespace()
        .map(|w| {
            if w.starts_with('>') {
                format!(">{PASSWORD}")
            } else {
                w.to_owned()
            }
        })
        .collect();
    if redis_version >= (7, 2) {
        words.push("+client|setinfo".to_owned());
    }
    words.join(" ")
}

/// The commands a rule allows (`+name`, lowercase).
fn allowed(rule: &str) -> BTreeSet<String> {
    rule.split_whitespace()
        .filter_map(|w| w.strip_prefix('+'))
        .map(str::to_lowercase)
        .collect()
}

/// `redis-server`'s version, as `(major, minor)`.
fn redis_server_version() -> (u32, u32) {
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .expect("run redis-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .expect("redis-server --version says v=<version>");
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// An `aclfile` of the README's users (each rule with `additions[user]`
/// appended), besides the default user the test administers Redis with.
fn readme_users_file(env: &Env, additions: &[(&str, &str)]) -> PathBuf {
    let version = redis_server_version();
    let mut users = String::from("user default on nopass ~* &* +@all\n");
    for (name, rule) in readme_rules() {
        let added = additions
            .iter()
            .filter(|(user, _)| *user == name)
            .map(|(_, words)| format!(" {words}"))
            .collect::<String>();
        users.push_str(&format!("user {name} {}{added}\n", applied(&rule, version)));
    }
    env.file("users.acl", &users)
}

/// A private Redis whose users are the README's (`users.acl` form), besides
/// the default user the test administers it with.
async fn redis_with_readme_users(env: &Env) -> PrivateRedis {
    let aclfile = readme_users_file(env, &[]);
    PrivateRedis::start(&["--aclfile", aclfile.to_str().unwrap()]).await
}

/// What Redis refused since the last call, as `(reason, object)`, then
/// forgets it (`ACL LOG`, `ACL LOG RESET`).
async fn refusals(redis: &PrivateRedis) -> Vec<(String, String)> {
    refusals_on(&mut redis.admin().await).await
}

/// [`refusals`] of one server, through an administrator's connection.
async fn refusals_on(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String)> {
    let entries: Vec<BTreeMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(conn)
        .await
        .expect("ACL LOG");
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .expect("ACL LOG RESET");
    let text = |entry: &BTreeMap<String, redis::Value>, field: &str| match entry.get(field) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    entries
        .iter()
        .map(|e| (text(e, "reason"), text(e, "object")))
        .collect()
}

/// Redis refused nothing during `step`, except the commands in `except`.
async fn nothing_refused(redis: &PrivateRedis, step: &str, except: &[&str]) {
    assert_none_refused(refusals(redis).await, step, except);
}

/// No node of the cluster refused anything during `step`, except the
/// commands in `except`.
async fn nothing_refused_on_cluster(cluster: &PrivateCluster, step: &str, except: &[&str]) {
    for port in cluster.ports() {
        let refused = refusals_on(&mut node_conn(port).await).await;
        assert_none_refused(refused, &format!("{step}, node {port}"), except);
    }
}

fn assert_none_refused(refused: Vec<(String, String)>, step: &str, except: &[&str]) {
    let refused: Vec<_> = refused
        .into_iter()
        .filter(|(reason, object)| !(reason == "command" && except.contains(&object.as_str())))
        .collect();
    assert!(
        refused.is_empty(),
        "{step}: the README's rule lacks a permission; ACL LOG (reason, object): {refused:?}"
    );
}

/// The config of these tests for `user`: the default key prefix and the
/// entities `customers` and `orders` (streams of the same names), as the
/// README's rule assumes, polling this test's own tables.
fn config_as(env: &Env, redis: &PrivateRedis, user: &str, tables: &(String, String)) -> PathBuf {
    config_at(env, &redis.url_as(user, PASSWORD), user, tables)
}

/// [`config_as`] for a Redis at `url` (with the user in it).
fn config_at(env: &Env, url: &str, user: &str, tables: &(String, String)) -> PathBuf {
    let entity = |name: &str, table: &str| {
        format!(
            "[entities.{name}]\nsource = \"shop\"\n\
             query = \"SELECT id, note, updated_at FROM {table} WHERE updated_at >= :since\"\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"200ms\"\n\
             start = \"beginning\"\n\
             max_stream_length = 1\nmax_age = \"1h\"\nhard_max_stream_length = 1000\n\n"
        )
    };
    env.file(
        &format!("{user}.toml"),
        &format!(
            "[redis]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[agent]\nlease = \"2s\"\n\n\
             [http]\nlisten = \"\"\n\n[sources.shop]\nurl = \"{}\"\n\n{}{}",
            url,
            pg_url(),
            entity("customers", &tables.0),
            entity("orders", &tables.1)
        ),
    )
}

/// Two tables of this test, each with a row changed an hour ago (outside
/// the look-back: the first commit trims it from the dedup state) and one
/// changed now.
async fn shop_tables(pool: &sqlx::PgPool) -> (String, String) {
    let tables = (unique("acl_customers"), unique("acl_orders"));
    for table in [&tables.0, &tables.1] {
        pg_exec(
            pool,
            &format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, note text NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
                 INSERT INTO {table} (id, note, updated_at) VALUES (1, 'old', now() - interval '1 hour'); \
                 INSERT INTO {table} (id, note) VALUES (2, 'new')"
            ),
        )
        .await;
    }
    tables
}

/// Runs `highwater <args> --config <config>`: (success, stdout, stderr).
fn run(args: &[&str], config: &Path) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    let out = highwater(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed with no ACL refusal in its output;
/// returns stdout.
fn run_ok(args: &[&str], config: &Path) -> String {
    let (ok, stdout, stderr) = run(args, config);
    assert!(
        ok,
        "highwater {args:?} failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
    no_refusal(&format!("highwater {args:?}"), &format!("{stdout}{stderr}"));
    stdout
}

fn no_refusal(what: &str, output: &str) {
    for word in [
        "NOPERM",
        "ACL permission",
        "can't run this command",
        "ACL failure",
    ] {
        assert!(!output.contains(word), "{what} was refused: {output}");
    }
}

/// `highwater tail` as a child process, its stdout and stderr collected.
struct Tail {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Tail {
    fn start(args: &[&str], config: &Path) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .arg("tail")
            .args(args)
            .args(["--config", config.to_str().unwrap()])
            .env_remove("HIGHWATER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start highwater tail");
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("piped stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("piped stderr")));
        Tail {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    /// Waits until it says on stderr that it follows the stream (anything
    /// added from then on is printed).
    async fn wait_until_following(&mut self) {
        let start = Instant::now();
        while !self
            .stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("following stream"))
        {
            assert!(
                self.child.try_wait().expect("poll tail").is_none(),
                "highwater tail exited early; {}",
                self.output()
            );
            assert!(
                start.elapsed() < DEADLINE,
                "timed out after {DEADLINE:?} waiting for tail to follow the stream; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until it printed the entry of `pkey` (`"pkey": "<pkey>"`).
    async fn wait_for_entry(&mut self, pkey: &str) {
        let line = format!("\"pkey\": \"{pkey}\"");
        let start = Instant::now();
        while !self
            .stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&line))
        {
            assert!(
                self.child.try_wait().expect("poll tail").is_none(),
                "highwater tail exited early; {}",
                self.output()
            );
            assert!(
                start.elapsed() < DEADLINE,
                "timed out after {DEADLINE:?} waiting for tail to print key {pkey}; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ctrl-C, as an operator stops it: it must exit 0; returns its output.
    async fn interrupt(mut self) -> String {
        let status = Command::new("kill")
            .args(["-s", "INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s INT failed");
        let start = Instant::now();
        let exit = loop {
            if let Some(exit) = self.child.try_wait().expect("wait for tail") {
                break exit;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "highwater tail did not exit on SIGINT; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let the reader threads drain the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let output = self.output();
        assert!(exit.success(), "highwater tail exited {exit}; {output}");
        output
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A consumer group's pending entries on a stream (`XPENDING` summary).
async fn pending(redis: &PrivateRedis, stream: &str, group: &str) -> u64 {
    let mut conn = redis.admin().await;
    let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    summary.0
}

#[tokio::test]
async fn every_command_runs_as_the_users_of_the_readme_rules_and_redis_refuses_nothing() {
    let env = Env::new();
    let redis = redis_with_readme_users(&env).await;
    let pool = pg().await;
    let tables = shop_tables(&pool).await;
    let agent = config_as(&env, &redis, "highwater", &tables);
    let reader = config_as(&env, &redis, "highwater-reader", &tables);

    // Before starting: both may check (CONFIG GET is left out on purpose).
    for config in [&agent, &reader] {
        let report = run_ok(&["check"], config);
        assert!(
            report.contains("RDB save points unknown (CONFIG GET not allowed)"),
            "{report}"
        );
    }
    nothing_refused(&redis, "check", &["config|get"]).await;

    let out = run_ok(&["once"], &agent);
    assert!(out.contains("customers: 2 rows read, 2 emitted"), "{out}");
    assert!(out.contains("orders: 2 rows read, 2 emitted"), "{out}");
    nothing_refused(&redis, "once", &[]).await;
    // The first commit trimmed the hour-old rows from the dedup state.
    let mut admin = redis.admin().await;
    let tracked: u64 = redis::cmd("ZCARD")
        .arg("highwater:{customers}:seen:customers")
        .query_async(&mut admin)
        .await
        .expect("ZCARD");
    assert_eq!(tracked, 1, "the hour-old row was trimmed");

    for config in [&agent, &reader] {
        let text = run_ok(&["status"], config);
        assert!(
            text.contains("stream        customers: 2 entries"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&run_ok(&["status", "--json"], config)).expect("status --json");
        assert_eq!(json["entities"][1]["stream_length"], 2, "{json}");
    }
    nothing_refused(&redis, "status", &[]).await;

    // A live agent: it takes both leases and cycles; meanwhile the reader
    // waits for a cycle and tails the stream, alone and as a group.
    let mut running = Agent::start(&agent);
    for entity in ["customers", "orders"] {
        running
            .wait_for_event(
                DEADLINE,
                &format!("the agent to take {entity}'s lease"),
                // "took the lease on entity E", or "took over entity E from
                // agent A" (`once` held it last).
                |e| {
                    e["entity"] == entity
                        && e["message"].as_str().is_some_and(|m| m.starts_with("took"))
                },
            )
            .await;
    }
    eventually(DEADLINE, "three cycles of orders", || {
        let cycles = running.cycles(Some("orders")).len();
        async move { cycles >= 3 }
    })
    .await;
    for config in [&agent, &reader] {
        let out = run_ok(&["wait", "--timeout", "20s"], config);
        assert!(out.contains("customers: cycle started"), "{out}");
    }
    let status = run_ok(&["status"], &reader);
    assert!(status.contains("held by"), "{status}");

    let mut plain = Tail::start(&["customers"], &reader);
    let mut group = Tail::start(&["orders", "--from-start", "--group", "acl"], &reader);
    plain.wait_until_following().await;
    group.wait_for_entry("1").await;
    pg_exec(
        &pool,
        &format!(
            "INSERT INTO {} (id, note) VALUES (3, 'tailed'); INSERT INTO {} (id, note) VALUES (3, 'tailed')",
            tables.0, tables.1
        ),
    )
    .await;
    plain.wait_for_entry("3").await;
    group.wait_for_entry("3").await;
    eventually(
        DEADLINE,
        "the group to acknowledge what tail printed",
        || async { pending(&redis, "orders", "acl").await == 0 },
    )
    .await;
    // The retention trims what the group acknowledged (XRANGE, XTRIM).
    eventually(
        DEADLINE,
        "the agent to trim orders to max_stream_length = 1",
        || async {
            let mut admin = redis.admin().await;
            let len: u64 = redis::cmd("XLEN")
                .arg("orders")
                .query_async(&mut admin)
                .await
                .expect("XLEN");
            len == 1
        },
    )
    .await;
    let output = plain.interrupt().await;
    no_refusal("highwater tail", &output);
    let output = group.interrupt().await;
    no_refusal("highwater tail --group", &output);

    // A failed cycle is recorded for status (the table is gone).
    pg_exec(&pool, &format!("DROP TABLE {}", tables.1)).await;
    running
        .wait_for_event(DEADLINE, "a failed cycle of orders", |e| {
            e["entity"] == "orders"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cycle failed"))
        })
        .await;
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--json"], &reader)).expect("status --json");
    let orders = &json["entities"][1];
    assert_eq!(orders["entity"], "orders");
    assert_eq!(orders["last_outcome"], "failed", "{orders}");
    no_refusal(
        "the failed cycle",
        &orders["last_failure"]["error"].to_string(),
    );

    running.signal("TERM");
    let exit = running.wait_exit(DEADLINE).await;
    assert!(
        exit.success(),
        "run exited {exit}; stderr:\n{}",
        running.stderr().join("\n")
    );
    no_refusal("highwater run", &running.stderr().join("\n"));
    assert!(
        running
            .events()
            .iter()
            .any(|e| e["message"] == "released the leases: other agents take the entities over"),
        "run released its leases at SIGTERM; stderr:\n{}",
        running.stderr().join("\n")
    );
    nothing_refused(&redis, "run, wait, tail", &[]).await;
    pg_exec(&pool, &format!("DROP TABLE {}", tables.0)).await;
}

#[tokio::test]
async fn a_permission_missing_from_the_rule_fails_naming_the_command_and_the_readme() {
    let env = Env::new();
    let redis = redis_with_readme_users(&env).await;
    let pool = pg().await;
    let tables = shop_tables(&pool).await;
    // The agent's rule without XADD, which only the dedup script calls.
    let rule = applied(&readme_rules()["highwater"], redis_server_version());
    let without_xadd: Vec<&str> = rule.split_whitespace().filter(|w| *w != "+xadd").collect();
    assert_eq!(without_xadd.len() + 1, rule.split_whitespace().count());
    let mut admin = redis.admin().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("highwater")
        .arg(&without_xadd)
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let agent = config_as(&env, &redis, "highwater", &tables);

    let (ok, stdout, stderr) = run(&["once"], &agent);

    assert!(!ok, "once succeeded without XADD:\n{stdout}");
    for entity in ["customers", "orders"] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("error: entity {entity}: ")))
            .unwrap_or_else(|| panic!("no error line for {entity}: {stderr}"));
        assert!(
            line.contains("the dedup script failed: redis refused the command XADD"),
            "{line}"
        );
        assert!(line.contains("the user lacks an ACL permission"), "{line}");
        assert!(line.ends_with(POINTER), "{line}");
    }
    let refused = refusals(&redis).await;
    assert!(
        refused
            .iter()
            .all(|(reason, object)| reason == "command" && object == "xadd"),
        "only XADD was refused: {refused:?}"
    );
    assert!(!refused.is_empty(), "Redis logged the refusal");
    pg_exec(
        &pool,
        &format!("DROP TABLE {}; DROP TABLE {}", tables.0, tables.1),
    )
    .await;
}

/// Every command the scripts call is in the agent's rule (Redis checks them
/// against the caller's rule), and neither rule grants everything.
#[test]
fn the_rules_name_every_command_the_scripts_call_and_grant_nothing_wholesale() {
    let rules = readme_rules();
    let agent = allowed(&rules["highwater"]);
    let lua = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua");
    let mut scripts = 0;
    for file in std::fs::read_dir(&lua).expect("read lua/") {
        let path = file.expect("a lua/ entry").path();
        let source = std::fs::read_to_string(&path).expect("read a script");
        scripts += 1;
        for call in source.split("redis.call(").skip(1) {
            let quote = call.chars().next().expect("a command name");
            assert!(
                quote == '\'' || quote == '"',
                "{}: a command name that is not a literal: {call:.40}",
                path.display()
            );
            let mut command = call[1..].split(quote).next().unwrap().to_lowercase();
            // A container command is granted per subcommand: XINFO GROUPS
            // is `xinfo|groups`.
            if command == "xinfo" {
                let sub = call[1..]
                    .split(quote)
                    .nth(2)
                    .expect("XINFO's subcommand, a literal");
                command = format!("xinfo|{}", sub.to_lowercase());
            }
            assert!(
                agent.contains(&command),
                "{} calls {command}, which the agent's rule does not allow",
                path.display()
            );
        }
    }
    assert_eq!(scripts, 7, "the scripts in lua/");
    for (name, rule) in &rules {
        for word in rule.split_whitespace() {
            assert!(
                !matches!(
                    word,
                    "allkeys" | "allchannels" | "allcommands" | "~*" | "&*"
                ) && !word.starts_with("+@"),
                "{name}'s rule grants {word}"
            );
        }
        assert!(
            rule.contains(" -@all") || rule.starts_with("reset "),
            "{name}: {rule}"
        );
    }
}

/// What the README says to add to each rule on a Redis Cluster.
const CLUSTER_ADDITIONS: [(&str, &str); 2] = [
    ("highwater", "+cluster|slots +cluster|nodes +wait +ping"),
    ("highwater-reader", "+cluster|slots +cluster|nodes +ping"),
];

#[tokio::test]
async fn on_a_cluster_the_readme_rules_with_the_cluster_additions_are_enough() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (user, words) in CLUSTER_ADDITIONS {
        assert!(
            readme.contains(&format!("`{words}` to `{user}`")),
            "the README's ACL section names the cluster additions for {user}: {words}"
        );
    }
    let env = Env::new();
    let aclfile = readme_users_file(&env, &CLUSTER_ADDITIONS);
    // A replica per master: the cycles WAIT for it.
    let cluster = PrivateCluster::start(3, 1, &["--aclfile", aclfile.to_str().unwrap()]).await;
    let pool = pg().await;
    let tables = shop_tables(&pool).await;
    let url = |user: &str| {
        format!(
            "redis://{user}:{PASSWORD}@127.0.0.1:{}",
            cluster.master_ports()[0]
        )
    };
    let agent = config_at(&env, &url("highwater"), "highwater", &tables);
    let reader = config_at(&env, &url("highwater-reader"), "highwater-reader", &tables);

    for config in [&agent, &reader] {
        let report = run_ok(&["check"], config);
        assert!(
            report.contains("a Redis Cluster of 3 primaries"),
            "{report}"
        );
        assert!(
            report.contains("which has 1 replica(s): each cycle waits until one holds its writes"),
            "{report}"
        );
    }
    nothing_refused_on_cluster(&cluster, "check", &["config|get"]).await;

    let out = run_ok(&["once"], &agent);
    assert!(out.contains("customers: 2 rows read, 2 emitted"), "{out}");
    assert!(out.contains("orders: 2 rows read, 2 emitted"), "{out}");
    nothing_refused_on_cluster(&cluster, "once", &[]).await;

    for config in [&agent, &reader] {
        let text = run_ok(&["status"], config);
        assert!(text.contains("stream        orders: 2 entries"), "{text}");
    }
    nothing_refused_on_cluster(&cluster, "status", &[]).await;

    // A live agent (leases, the changes channel, the memory watch), and
    // the reader waiting for its cycles.
    let mut running = Agent::start(&agent);
    eventually(DEADLINE, "two cycles of orders", || {
        let cycles = running.cycles(Some("orders")).len();
        async move { cycles >= 2 }
    })
    .await;
    let out = run_ok(&["wait", "--timeout", "20s"], &reader);
    assert!(out.contains("orders: cycle started"), "{out}");
    running.signal("TERM");
    let exit = running.wait_exit(DEADLINE).await;
    assert!(
        exit.success(),
        "run exited {exit}; stderr:\n{}",
        running.stderr().join("\n")
    );
    no_refusal("highwater run", &running.stderr().join("\n"));
    nothing_refused_on_cluster(&cluster, "run, wait", &[]).await;
    for table in [&tables.0, &tables.1] {
        pg_exec(&pool, &format!("DROP TABLE {table}")).await;
    }
}
