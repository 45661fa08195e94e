//! The core guarantees on PostgreSQL, through the real binary.

mod common;

use common::*;

/// Creates `table` (id, name, updated_at timestamptz) and a config polling it.
async fn setup(env: &Env, pool: &sqlx::PgPool, table: &str) -> std::path::PathBuf {
    pg_exec(
        pool,
        &format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, name text, updated_at timestamptz NOT NULL DEFAULT now())"
        ),
    )
    .await;
    env.config(&format!(
        r#"
[sources.db]
url = "{}"

[entities.{table}]
source = "db"
query = "SELECT id, name, updated_at FROM {table} WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "1s"
"#,
        pg_url()
    ))
}

#[tokio::test]
async fn thousand_inserts_arrive_once_and_a_second_cycle_adds_nothing() {
    let env = Env::new();
    let pool = pg().await;
    let table = unique("pg_ins");
    let config = setup(&env, &pool, &table).await;
    pg_exec(
        &pool,
        &format!(
            "INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(1, 1000) g"
        ),
    )
    .await;

    let out = once_ok(&config);
    assert!(out.contains("1000 rows read, 1000 emitted"), "{out}");
    assert_eq!(read_stream(&table).await.len(), 1000);

    once_ok(&config);
    let messages = read_stream(&table).await;
    assert_eq!(messages.len(), 1000);
    let mut keys: Vec<_> = messages.iter().map(|m| m.pkey.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 1000, "every key exactly once");
    let first = &messages[0];
    assert_eq!(first.variant, table);
    assert_eq!(first.op, "upsert");
    let payload = first.payload.as_ref().unwrap();
    assert_eq!(payload["name"], format!("n{}", first.pkey));
}
