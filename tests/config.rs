//! Configuration and command-line errors, as the user reads them on stderr:
//! each names the file, the entity and the field (or the line), and no
//! password from a URL ever reaches the terminal.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// A valid entity `orders` on source `db`; tests break one field at a time.
/// Its database `app.db` is placed in the test's directory by [`own_database`].
const ORDERS: &str = r#"
[sources.db]
url = "sqlite://app.db"

[entities.orders]
source = "db"
query = "SELECT id, updated_at FROM orders WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "10s"
"#;

/// `highwater once` on `config`, expected to fail: its stderr, which must be
/// exactly one `error: ` line.
fn error_of(config: &Path) -> String {
    let stderr = once_err(config);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

/// `body` with its SQLite database `app.db` in the test's own directory, where
/// no test creates it: a relative path would open whatever `app.db` the
/// working directory holds.
fn own_database(env: &Env, body: &str) -> String {
    let db = env.dir.path().join("app.db");
    body.replace("sqlite://app.db", &format!("sqlite://{}", db.display()))
}

/// Writes the config with `from` replaced by `to` in [`ORDERS`].
fn orders_with(env: &Env, from: &str, to: &str) -> PathBuf {
    assert!(ORDERS.contains(from), "{from:?} is not in the base config");
    env.config(&own_database(env, &ORDERS.replacen(from, to, 1)))
}

/// The 1-based line of the first line containing `needle`.
fn line_of(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {}", path.display()))
        + 1
}

fn run_with_env(args: &[&str], var: &str, value: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args(args)
        .env_remove("HIGHWATER_LOG")
        .env(var, value)
        .output()
        .expect("run highwater")
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let env = Env::new();
    let config = orders_with(&env, "every = \"10s\"", "shedule = \"*/5 * * * *\"");
    let error = error_of(&config);
    let line = line_of(&config, "shedule");
    assert!(error.contains(&config.display().to_string()), "{error}");
    assert!(error.contains(&format!("line {line}:")), "{error}");
    assert!(error.contains("unknown field `shedule`"), "{error}");
}

#[test]
fn a_missing_environment_variable_is_named_with_its_line() {
    let env = Env::new();
    let var = unique("NOPE").to_uppercase();
    let config = orders_with(
        &env,
        "url = \"sqlite://app.db\"",
        &format!("url = \"postgres://app:${{{var}}}@db/shop\""),
    );
    let error = error_of(&config);
    let line = line_of(&config, &var);
    assert!(
        error.contains(&format!(
            "{}:{line}: environment variable {var} is not set",
            config.display()
        )),
        "{error}"
    );
}

#[test]
fn a_bad_cron_expression_names_the_field_and_what_is_wrong() {
    let env = Env::new();
    let config = orders_with(&env, "every = \"10s\"", "schedule = \"*/5 * *\"");
    let error = error_of(&config);
    assert!(error.contains(&config.display().to_string()), "{error}");
    assert!(
        error.contains(r#"entities.orders.schedule: "*/5 * *" is not a cron expression"#),
        "{error}"
    );
    assert!(error.contains("expected 5 or 6 fields"), "{error}");
}

#[test]
fn a_bad_duration_names_the_field() {
    let env = Env::new();
    let config = orders_with(&env, "lookback = \"5m\"", "lookback = \"5 parsecs\"");
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.lookback: "5 parsecs" is not a duration"#),
        "{error}"
    );
}

#[test]
fn a_max_lookback_shorter_than_lookback_or_on_a_version_cursor_is_refused() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "lookback = \"5m\"",
        "lookback = \"5m\"\nmax_lookback = \"1m\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.max_lookback: "1m" is shorter than lookback (5m)"#),
        "{error}"
    );
    let config = orders_with(
        &env,
        "lookback = \"5m\"",
        "lookback = \"5m\"\nmax_lookback = \"an hour\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.max_lookback: "an hour" is not a duration"#),
        "{error}"
    );
    let config = orders_with(
        &env,
        "lookback = \"5m\"",
        "lookback = 10\nmax_lookback = \"1h\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains("entities.orders.max_lookback: applies to time cursors only"),
        "{error}"
    );
}

#[test]
fn an_unknown_source_names_it_and_the_configured_ones() {
    let env = Env::new();
    let config = orders_with(&env, "source = \"db\"", "source = \"warehouse\"");
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.source: no source named "warehouse" (configured: db)"#),
        "{error}"
    );
}

#[test]
fn a_stream_name_whose_braces_hold_no_hash_tag_is_refused() {
    // Its state keys could not share its Redis Cluster slot.
    let env = Env::new();
    let config = orders_with(
        &env,
        "every = \"10s\"",
        "every = \"10s\"\nstream = \"ops{}braces\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.stream: "ops{}braces" has braces but no hash tag"#),
        "{error}"
    );
    let tagged = orders_with(
        &env,
        "every = \"10s\"",
        "every = \"10s\"\nstream = \"orders{eu}\"",
    );
    let error = error_of(&tagged);
    assert!(
        !error.contains("stream"),
        "a tagged stream is fine: {error}"
    );
}

#[test]
fn query_and_query_file_together_are_refused() {
    let env = Env::new();
    env.file("queries/orders.sql", "SELECT 1");
    let config = orders_with(
        &env,
        "key = \"id\"",
        "query_file = \"queries/orders.sql\"\nkey = \"id\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains("entities.orders: set either query or query_file, not both"),
        "{error}"
    );
}

#[test]
fn a_missing_query_file_is_named_with_its_path() {
    let env = Env::new();
    let query = "query = \"SELECT id, updated_at FROM orders WHERE updated_at >= :since\"";
    let config = orders_with(&env, query, "query_file = \"queries/nope.sql\"");
    let error = error_of(&config);
    let path = env.dir.path().join("queries/nope.sql");
    assert!(
        error.contains(&format!(
            "entities.orders.query_file: cannot read {}",
            path.display()
        )),
        "{error}"
    );
}

#[test]
fn an_entity_without_schedule_or_every_is_refused() {
    let env = Env::new();
    let config = orders_with(&env, "every = \"10s\"", "");
    let error = error_of(&config);
    assert!(
        error.contains("entities.orders: missing schedule (cron) or every (interval)"),
        "{error}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let env = Env::new();
    let body = ORDERS
        .replacen("every = \"10s\"", "schedule = \"*/5 * *\"", 1)
        .replacen("source = \"db\"", "source = \"warehouse\"", 1);
    let config = env.config(&own_database(&env, &body));
    let stderr = once_err(&config);
    assert!(stderr.contains("entities.orders.schedule"), "{stderr}");
    assert!(stderr.contains("entities.orders.source"), "{stderr}");
}

#[test]
fn an_unknown_entity_on_the_command_line_names_the_configured_ones() {
    let env = Env::new();
    let customers = ORDERS
        .split("[entities.orders]")
        .nth(1)
        .unwrap()
        .replace("FROM orders", "FROM customers");
    let body = format!("{ORDERS}\n[entities.customers]{customers}");
    let config = env.config(&own_database(&env, &body));
    let out = highwater(&[
        "once",
        "--config",
        config.to_str().unwrap(),
        "--entity",
        "nope",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"no entity named "nope" (configured: customers, orders)"#),
        "{stderr}"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let env = Env::new();
    let path = env.dir.path().join("nowhere.toml");
    let error = error_of(&path);
    assert!(
        error.contains(&format!("cannot read config file {}", path.display())),
        "{error}"
    );
}

#[tokio::test]
async fn environment_variables_are_interpolated() {
    let env = Env::new();
    let name = unique("cfg_env");
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL DEFAULT (datetime('now')));
         INSERT INTO t (id) VALUES (7)",
    )
    .await;
    let config = env.config(&format!(
        r#"
[sources.db]
url = "sqlite://${{HW_TEST_DB}}"

[entities.{name}]
source = "db"
query = "SELECT id, updated_at FROM t WHERE updated_at >= :since"
key = "id"
cursor = "updated_at"
lookback = "5m"
every = "10s"
"#
    ));
    let out = run_with_env(
        &["once", "--config", config.to_str().unwrap()],
        "HW_TEST_DB",
        db.to_str().unwrap(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages = read_stream(&name).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].pkey, "7");
}

/// Runs a config holding the secret `s3cretpw` and checks the run failed
/// with an error that does not show it.
fn assert_fails_without_secret(config: &Path, secret_var: Option<&str>) -> String {
    let args = ["once", "--config", config.to_str().unwrap()];
    let out = match secret_var {
        Some(var) => run_with_env(&args, var, "s3cretpw"),
        None => highwater(&args),
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(
        !stderr.contains("s3cretpw"),
        "the password leaked:\n{stderr}"
    );
    stderr
}

#[test]
fn a_database_password_never_reaches_stderr() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "url = \"sqlite://app.db\"",
        "url = \"postgres://postgres:s3cretpw@127.0.0.1:1/test\"\ntimeout = \"2s\"",
    );
    let stderr = assert_fails_without_secret(&config, None);
    assert!(stderr.contains("source db"), "{stderr}");
}

#[test]
fn a_redis_password_never_reaches_stderr() {
    let env = Env::new();
    let config = env.file(
        "highwater.toml",
        &own_database(
            &env,
            &format!(
                "[redis]\nurl = \"redis://:s3cretpw@127.0.0.1:1/0\"\ntimeout = \"2s\"\n{ORDERS}"
            ),
        ),
    );
    let stderr = assert_fails_without_secret(&config, None);
    assert!(stderr.contains("redis"), "{stderr}");
}

#[test]
fn a_password_in_a_url_with_an_unknown_scheme_never_reaches_stderr() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "url = \"sqlite://app.db\"",
        "url = \"oracle://scott:s3cretpw@db/orcl\"",
    );
    let stderr = assert_fails_without_secret(&config, None);
    assert!(stderr.contains("sources.db.url"), "{stderr}");
}

#[test]
fn an_interpolated_password_on_a_line_that_does_not_parse_never_reaches_stderr() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "url = \"sqlite://app.db\"",
        "url = \"postgres://app:${HW_TEST_PW}@db/shop\" max_connections = 2",
    );
    let stderr = assert_fails_without_secret(&config, Some("HW_TEST_PW"));
    let line = line_of(&config, "HW_TEST_PW");
    assert!(stderr.contains(&format!("line {line}")), "{stderr}");
}

// ---------------------------------------------------------------------------
// Secrets from files: `${file:path}`, relative to the config file's directory.
// ---------------------------------------------------------------------------

/// The start of the secret in [`a_password_from_a_secret_file_reaches_no_output`].
/// Letters and digits survive percent-encoding, so finding it nowhere means
/// neither the raw nor the encoded password leaked.
const SECRET_START: &str = "Zq7Sekr3t";

/// stdout and stderr of `highwater <command> --config <config>`, labelled.
fn output_of(command: &str, config: &Path) -> String {
    let out = highwater(&[command, "--config", config.to_str().unwrap()]);
    format!(
        "{command} --config {}\nstdout:\n{}\nstderr:\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_missing_secret_file_is_named_with_the_config_line() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "url = \"sqlite://app.db\"",
        "url = \"postgres://app:${file:secrets/nope}@db/shop\"",
    );
    let error = error_of(&config);
    let line = line_of(&config, "secrets/nope");
    let secret = env.dir.path().join("secrets/nope");
    assert!(
        error.contains(&format!(
            "{}:{line}: cannot read secret file {} (${{file:...}}): No such file or directory",
            config.display(),
            secret.display()
        )),
        "{error}"
    );
}

#[tokio::test]
async fn a_password_with_reserved_characters_is_read_from_a_file_and_logs_in() {
    // As Docker mounts it: the password itself (the database's container
    // reads the same file), one trailing newline.
    let env = Env::new();
    let password = "Zq7-p@ss/w:rd?#%";
    env.file("secrets/db_password", &format!("{password}\n"));
    let table = unique("secret_login");
    let user = table.clone();
    let pool = mysql().await;
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, \
             updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6));
             INSERT INTO {table} (id) VALUES (7);
             CREATE USER '{user}'@'%' IDENTIFIED BY '{password}';
             GRANT SELECT ON {table} TO '{user}'@'%'"
        ),
    )
    .await;
    let secret = "${file:secrets/db_password}";
    let source_url = mysql_url().replacen("root@", &format!("{user}:{secret}@"), 1);
    assert_ne!(source_url, mysql_url(), "the test server's URL names root");
    // Redis's default user without a password takes any: the URL must parse.
    let redis = redis_url().replacen("redis://", &format!("redis://default:{secret}@"), 1);
    let config = env.file(
        "highwater.toml",
        &format!(
            "[redis]\nurl = \"{redis}\"\nkey_prefix = \"{}\"\n\n\
             [sources.db]\nurl = \"{source_url}\"\n\n\
             [entities.{table}]\nsource = \"db\"\n\
             query = \"SELECT id, updated_at FROM {table} WHERE updated_at >= :since\"\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"10s\"\n",
            env.prefix
        ),
    );
    let (stdout, stderr) = once_logged(&config);
    let messages = read_stream(&table).await;
    mysql_exec(
        &pool,
        &format!("DROP USER '{user}'@'%'; DROP TABLE {table}"),
    )
    .await;
    assert_eq!(messages.len(), 1, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(messages[0].pkey, "7");
}

#[tokio::test]
async fn a_password_from_a_secret_file_reaches_no_output() {
    let env = Env::new();
    env.file("secrets/password", &format!("{SECRET_START}@pw/x:y\n"));
    let secret = "${file:secrets/password}";
    let entity = |name: &str, source: &str| {
        format!(
            "[entities.{name}]\nsource = \"{source}\"\n\
             query = \"SELECT id, updated_at FROM t WHERE updated_at >= :since\"\n\
             key = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1s\"\n"
        )
    };
    let (pg_entity, my_entity) = (unique("secret_pg"), unique("secret_my"));
    // PostgreSQL on a closed port; MariaDB's root, which has no password, refuses one.
    let my_url = mysql_url().replacen("root@", &format!("root:{secret}@"), 1);
    assert_ne!(my_url, mysql_url(), "the test server's URL names root");
    let sources = format!(
        "[sources.pg]\nurl = \"postgres://postgres:{secret}@127.0.0.1:1/test\"\ntimeout = \"2s\"\n\n\
         [sources.my]\nurl = \"{my_url}\"\ntimeout = \"2s\"\n\n{}\n{}",
        entity(&pg_entity, "pg"),
        entity(&my_entity, "my"),
    );
    let with_redis = |file: &str, redis: &str| {
        env.file(
            file,
            &format!(
                "[redis]\nurl = \"{redis}\"\nkey_prefix = \"{}\"\ntimeout = \"2s\"\n\n{sources}",
                env.prefix
            ),
        )
    };
    let reachable = with_redis(
        "highwater.toml",
        &redis_url().replacen("redis://", &format!("redis://default:{secret}@"), 1),
    );
    let unreachable = with_redis(
        "unreachable.toml",
        &format!("redis://default:{secret}@127.0.0.1:1/0"),
    );

    let mut outputs = Vec::new();
    for config in [&reachable, &unreachable] {
        for command in ["check", "once", "status"] {
            outputs.push(output_of(command, config));
        }
    }
    // `run` logs each source's URL, then stops: a refused password is fatal.
    let mut agent = Agent::start(&reachable);
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    let stderr = agent.stderr().join("\n");
    assert!(!status.success(), "run should have stopped: {stderr}");
    assert!(stderr.contains("Access denied"), "{stderr}");
    outputs.push(format!("run\nstderr:\n{stderr}"));

    let all = outputs.join("\n\n");
    assert!(!all.contains(SECRET_START), "the secret leaked:\n{all}");
    // The URLs were printed, masked as passwords.
    for masked in [
        "postgres://postgres:***@127.0.0.1:1/test",
        "root:***@",
        "redis://default:***@127.0.0.1:1/0",
    ] {
        assert!(all.contains(masked), "{masked} not printed:\n{all}");
    }
}

/// [`ORDERS`] and a second entity `refunds` on the same stream, each with
/// its own extra lines.
fn two_on_one_stream(env: &Env, orders: &str, refunds: &str) -> PathBuf {
    let body = format!(
        "{}stream = \"sales\"\n{orders}\n\n[entities.refunds]\nsource = \"db\"\nquery = \"SELECT id, updated_at FROM refunds WHERE updated_at >= :since\"\nkey = \"id\"\ncursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"10s\"\nstream = \"sales\"\n{refunds}\n",
        ORDERS
    );
    env.config(&own_database(env, &body))
}

#[test]
fn entities_on_one_stream_with_different_retention_are_refused_naming_both() {
    let env = Env::new();
    let config = two_on_one_stream(&env, "max_stream_length = 1000", "max_stream_length = 5000");
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.max_stream_length = 1000 and entities.refunds.max_stream_length = 5000 differ, but both entities feed the stream "sales""#),
        "{error}"
    );
    let config = two_on_one_stream(&env, "max_age = \"7d\"", "max_age = \"1d\"");
    let error = error_of(&config);
    assert!(
        error.contains(
            r#"entities.orders.max_age = "7days" and entities.refunds.max_age = "1day" differ"#
        ),
        "{error}"
    );
}

#[test]
fn a_retention_setting_written_on_one_entity_of_a_stream_applies_to_all_of_them() {
    let env = Env::new();
    // The same age written two ways is the same setting.
    let path = two_on_one_stream(
        &env,
        "max_stream_length = 1000\nmax_age = \"7d\"\nhard_max_stream_length = 5000",
        "max_age = \"168h\"",
    );
    let config = highwater::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    for name in ["orders", "refunds"] {
        let e = &config.entities[name];
        assert_eq!(e.max_stream_length, 1000, "{name}");
        assert_eq!(e.max_age, Some(Duration::from_secs(7 * 86_400)), "{name}");
        assert_eq!(e.hard_max_stream_length, Some(5000), "{name}");
    }
}

#[test]
fn a_hard_cap_below_max_stream_length_or_a_bad_max_age_is_refused() {
    let env = Env::new();
    let config = orders_with(
        &env,
        "every = \"10s\"",
        "every = \"10s\"\nmax_stream_length = 1000\nhard_max_stream_length = 500",
    );
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.hard_max_stream_length: 500 is below max_stream_length (1000) of the stream "orders""#),
        "{error}"
    );
    let config = orders_with(
        &env,
        "every = \"10s\"",
        "every = \"10s\"\nmax_age = \"a week\"",
    );
    let error = error_of(&config);
    assert!(
        error.contains(r#"entities.orders.max_age: "a week" is not a duration"#),
        "{error}"
    );
    let config = orders_with(
        &env,
        "every = \"10s\"",
        "every = \"10s\"\nhard_max_stream_length = 0",
    );
    let error = error_of(&config);
    assert!(
        error.contains("entities.orders.hard_max_stream_length: must be at least 1"),
        "{error}"
    );
}
