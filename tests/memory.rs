//! A running agent remembers the rows it confirmed and skips them on the
//! next re-scan without decoding them or asking Redis. These tests check
//! that the memory never hides a change: what a running agent emits is what
//! Redis's digests alone would decide, as after a restart.

// The harness's XRANGE reply type trips clippy's type_complexity.
#[allow(clippy::type_complexity)]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// One entity named after `table`, polled every `every`.
fn config(env: &Env, url: &str, table: &str, query: &str, every: &str) -> PathBuf {
    env.config(&format!(
        "[http]\nlisten = \"\"\n\n[sources.db]\nurl = \"{url}\"\n\n[entities.{table}]\nsource = \"db\"\nquery = \"{query}\"\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"10m\"\nevery = \"{every}\"\nstream = \"{table}\"\n"
    ))
}

/// The `name` field of each message of key `pkey`, in stream order.
fn names(messages: &[Message], field: &str, pkey: &str) -> Vec<String> {
    of_key(messages, pkey)
        .iter()
        .map(|m| m.payload.as_ref().expect("payload")[field].to_string())
        .collect()
}

async fn wait_for_messages(stream: &str, count: usize) {
    eventually(WAIT, &format!("{count} messages on {stream}"), || async {
        read_stream(stream).await.len() >= count
    })
    .await;
}

/// Waits for a cycle that started after this call and emitted nothing: from
/// then on the agent's memory holds the table as it is now.
async fn wait_for_quiet_cycle(agent: &Agent, entity: &str) {
    let seen = agent.cycles(Some(entity)).len();
    // The first cycle to finish may have started before the call; the
    // second cannot (cycles of an entity never overlap).
    eventually(WAIT, "a cycle that emitted nothing", || async {
        let cycles = agent.cycles(Some(entity));
        cycles.len() > seen + 1 && cycles[seen + 1..].iter().any(|c| c["emitted"] == 0)
    })
    .await;
}

/// A test database holding tables of one shape: `id`, `name`, and an
/// `updated_at` cursor that defaults to now.
enum Database {
    Postgres(sqlx::PgPool),
    MariaDb(sqlx::MySqlPool),
    Sqlite {
        pool: sqlx::SqlitePool,
        path: PathBuf,
        /// Holds the file while the test runs.
        _dir: tempfile::TempDir,
    },
}

impl Database {
    async fn postgres() -> Database {
        Database::Postgres(pg().await)
    }

    async fn mariadb() -> Database {
        Database::MariaDb(mysql().await)
    }

    async fn sqlite() -> Database {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("shop.db");
        Database::Sqlite {
            pool: sqlite(&path).await,
            path,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        match self {
            Database::Postgres(_) => pg_url(),
            Database::MariaDb(_) => mysql_url(),
            Database::Sqlite { path, .. } => sqlite_url(path),
        }
    }

    async fn exec(&self, sql: &str) {
        match self {
            Database::Postgres(pool) => pg_exec(pool, sql).await,
            Database::MariaDb(pool) => mysql_exec(pool, sql).await,
            Database::Sqlite { pool, .. } => sqlite_exec(pool, sql).await,
        }
    }

    /// Creates `table` and inserts rows `1..=rows` named `a<id>`.
    async fn table(&self, table: &str, rows: u32) {
        let columns = match self {
            Database::Postgres(_) => "id bigint PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now()",
            Database::MariaDb(_) => "id BIGINT PRIMARY KEY, name VARCHAR(20), updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
            Database::Sqlite { .. } => "id INTEGER PRIMARY KEY, name TEXT, updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))",
        };
        self.exec(&format!("CREATE TABLE {table} ({columns})"))
            .await;
        let values: Vec<String> = (1..=rows).map(|id| format!("({id}, 'a{id}')")).collect();
        self.exec(&format!(
            "INSERT INTO {table} (id, name) VALUES {}",
            values.join(", ")
        ))
        .await;
    }
}

/// A row changed A → B → A (its cursor untouched, so A's bytes are exactly
/// what the agent saw two cycles ago) arrives three times.
async fn changed_back(db: Database) {
    let env = Env::new();
    let table = &unique("mem_back");
    db.table(table, 4).await;
    let query = format!("SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since");
    let mut agent = Agent::start(&config(&env, &db.url(), table, &query, "100ms"));
    wait_for_messages(table, 4).await;
    wait_for_quiet_cycle(&agent, table).await;

    db.exec(&format!("UPDATE {table} SET name = 'B' WHERE id = 2"))
        .await;
    wait_for_messages(table, 5).await;
    wait_for_quiet_cycle(&agent, table).await;

    db.exec(&format!("UPDATE {table} SET name = 'a2' WHERE id = 2"))
        .await;
    wait_for_messages(table, 6).await;
    wait_for_quiet_cycle(&agent, table).await;

    let skipped: Vec<_> = agent
        .cycles(Some(table))
        .iter()
        .filter(|c| c["emitted"] == 0)
        .map(|c| (c["rows"].clone(), c["skipped"].clone()))
        .collect();
    assert!(
        skipped
            .iter()
            .all(|(rows, skipped)| rows == 4 && skipped == 4),
        "quiet cycles read and skipped the 4 rows: {skipped:?}"
    );
    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).await.success());
    let messages = read_stream(table).await;
    assert_eq!(names(&messages, "name", "2"), ["\"a2\"", "\"B\"", "\"a2\""]);
    assert_eq!(messages.len(), 6, "only row 2 changed: {messages:?}");
}

#[tokio::test]
async fn postgres_a_row_changed_back_while_running_is_emitted_each_time() {
    changed_back(Database::postgres().await).await;
}

#[tokio::test]
async fn mariadb_a_row_changed_back_while_running_is_emitted_each_time() {
    changed_back(Database::mariadb().await).await;
}

/// Another agent emits B while a running one is paused past its lease (and
/// so loses it), then the row goes back to A, which the running agent
/// confirmed before: once it holds the entity again, its memory must be
/// dropped (the state's write counter moved), and A sent again.
#[tokio::test]
async fn a_change_emitted_by_another_agent_drops_the_running_agents_memory() {
    let env = Env::new();
    let db = Database::postgres().await;
    let table = unique("mem_foreign");
    db.table(&table, 3).await;
    let query = format!("SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since");
    let config = config(&env, &db.url(), &table, &query, "2s");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[agent]\nlease = \"1s\"\n")).unwrap();
    let mut agent = Agent::start(&config);
    wait_for_messages(&table, 3).await;
    wait_for_quiet_cycle(&agent, &table).await;

    // A paused VM: the other agent takes the entity over once the lease expires.
    agent.signal("STOP");
    db.exec(&format!("UPDATE {table} SET name = 'B' WHERE id = 2"))
        .await;
    let out = highwater(&["once", "--wait", "--config", config.to_str().unwrap()]);
    agent.signal("CONT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("1 emitted"),
        "the other agent emits B: {stdout}"
    );
    db.exec(&format!("UPDATE {table} SET name = 'a2' WHERE id = 2"))
        .await;
    wait_for_messages(&table, 5).await;
    wait_for_quiet_cycle(&agent, &table).await;

    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).await.success());
    let messages = read_stream(&table).await;
    assert_eq!(names(&messages, "name", "2"), ["\"a2\"", "\"B\"", "\"a2\""]);
    assert_eq!(messages.len(), 5, "{messages:?}");
}

/// A renamed column changes every payload (its key in the JSON) without
/// changing a byte of the rows, and an added one adds a field: a running
/// agent re-emits every row each time, as a restarted one comparing digests
/// in Redis would, and its statements prepared before are not reused.
async fn altered_table(db: Database) {
    let env = Env::new();
    let table = &unique("mem_alter");
    db.table(table, 3).await;
    let query = format!("SELECT * FROM {table} WHERE updated_at >= :since");
    let mut agent = Agent::start(&config(&env, &db.url(), table, &query, "100ms"));
    wait_for_messages(table, 3).await;
    wait_for_quiet_cycle(&agent, table).await;

    db.exec(&format!("ALTER TABLE {table} RENAME COLUMN name TO title"))
        .await;
    wait_for_messages(table, 6).await;
    wait_for_quiet_cycle(&agent, table).await;
    db.exec(&format!(
        "ALTER TABLE {table} ADD COLUMN extra INT DEFAULT 7"
    ))
    .await;
    wait_for_messages(table, 9).await;
    wait_for_quiet_cycle(&agent, table).await;

    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).await.success());
    let messages = read_stream(table).await;
    assert_eq!(messages.len(), 9, "{messages:?}");
    for key in ["1", "2", "3"] {
        let name = format!("\"a{key}\"");
        assert_eq!(
            names(&messages, "name", key),
            [name.as_str(), "null", "null"]
        );
        assert_eq!(
            names(&messages, "title", key),
            ["null", name.as_str(), name.as_str()]
        );
        assert_eq!(names(&messages, "extra", key), ["null", "null", "7"]);
    }
}

#[tokio::test]
async fn postgres_an_altered_table_re_emits_every_row_with_its_new_columns() {
    altered_table(Database::postgres().await).await;
}

#[tokio::test]
async fn mariadb_an_altered_table_re_emits_every_row_with_its_new_columns() {
    altered_table(Database::mariadb().await).await;
}

#[tokio::test]
async fn sqlite_an_altered_table_re_emits_every_row_with_its_new_columns() {
    altered_table(Database::sqlite().await).await;
}
