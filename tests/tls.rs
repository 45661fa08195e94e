//! TLS on the network paths, through the real binary: Redis over
//! `rediss://` with a private CA (and mutual TLS), PostgreSQL over
//! `sslmode=verify-full` with the session encrypted as the server reports
//! it, and the one-line errors a user gets for a CA that did not sign the
//! server's certificate, a missing client certificate, a host name that does
//! not match and a server without TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// Runs the openssl CLI in `dir`, failing with its stderr.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and, signed by it, a certificate for `cn` with these subject
/// alternative names: `<name>-ca.pem`, `<name>.pem`, `<name>.key` in `dir`.
fn certificates(dir: &Path, name: &str, cn: &str, san: &str, days: &str) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName = {san}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A private `redis-server` listening with TLS only.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    /// Certificates and the server's working directory.
    dir: tempfile::TempDir,
}

impl TlsRedis {
    /// `auth_clients`: ask for client certificates (`--tls-auth-clients yes`).
    async fn start(auth_clients: bool) -> TlsRedis {
        TlsRedis::start_with(auth_clients, "2").await
    }

    /// `server_days`: how long the server's certificate is valid ("-1":
    /// it expired yesterday).
    async fn start_with(auth_clients: bool, server_days: &str) -> TlsRedis {
        let dir = tempfile::tempdir().expect("temp dir");
        certificates(
            dir.path(),
            "server",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            server_days,
        );
        certificates(dir.path(), "client", "highwater", "DNS:highwater", "2");
        let port = free_port();
        let path = |file: &str| dir.path().join(file).to_str().unwrap().to_owned();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &path("server.pem")])
            .args(["--tls-key-file", &path("server.key")])
            // Clients are checked against the client CA.
            .args(["--tls-ca-cert-file", &path("client-ca.pem")])
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server with TLS");
        let redis = TlsRedis { child, port, dir };
        eventually(DEADLINE, "the TLS redis-server to listen", || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        redis
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[redis]` lines for this server; `extra` adds keys (ca_file ...).
    fn section(&self, prefix: &str, extra: &str) -> String {
        format!(
            "[redis]\nurl = \"rediss://127.0.0.1:{}/0\"\nkey_prefix = \"{prefix}\"\n{extra}\n",
            self.port
        )
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with `redis` as its `[redis]` table and one SQLite entity
/// polling a 3-row table, written in `env`'s directory.
async fn sqlite_config(env: &Env, redis: &str, entity: &str) -> PathBuf {
    let db = env.dir.path().join("app.db");
    let pool = sqlite(&db).await;
    sqlite_exec(
        &pool,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL DEFAULT (datetime('now'))); \
         INSERT INTO t (id) VALUES (1), (2), (3)",
    )
    .await;
    pool.close().await;
    let path = env.dir.path().join("tls.toml");
    std::fs::write(
        &path,
        format!(
            "{redis}\n[http]\nlisten = \"\"\n\n[sources.app]\nurl = \"{}\"\n\n[entities.{entity}]\nsource = \"app\"\n\
             query = \"SELECT id, updated_at FROM t WHERE updated_at >= :since\"\nkey = \"id\"\n\
             cursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1s\"\nstart = \"beginning\"\n",
            sqlite_url(&db)
        ),
    )
    .unwrap();
    path
}

fn once(config: &Path) -> (bool, String, String) {
    let out = highwater(&["once", "--config", config.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error lines (`error: ...`) of a failed command: exactly one is wanted.
fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "one line, no chain of debug output: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0]
}

#[tokio::test]
async fn redis_over_tls_trusts_the_configured_ca_and_refuses_another() {
    let redis = TlsRedis::start(false).await;
    let env = Env::new();
    let entity = unique("tls_redis");
    let ca = redis.file("server-ca.pem");
    let section = redis.section(&env.prefix, &format!("ca_file = \"{}\"", ca.display()));
    let config = sqlite_config(&env, &section, &entity).await;
    let (ok, stdout, stderr) = once(&config);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("3 rows read, 3 emitted"), "{stdout}");

    // status reads the same Redis over TLS: the three messages are there.
    let out = highwater(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["entities"][0]["stream_length"], 3, "{status}");

    let out = highwater(&["check", "--config", config.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("ok: redis: encrypted (TLS"), "{report}");

    // The client CA did not sign the server's certificate.
    let wrong = redis.section(
        &env.prefix,
        &format!("ca_file = \"{}\"", redis.file("client-ca.pem").display()),
    );
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&section, &wrong),
    )
    .unwrap();
    let (ok, _, stderr) = once(&config);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(&format!("redis (rediss://127.0.0.1:{}/0)", redis.port)),
        "{line}"
    );
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
}

#[tokio::test]
async fn an_expired_redis_certificate_is_refused_in_one_line() {
    let redis = TlsRedis::start_with(false, "-1").await;
    let env = Env::new();
    let entity = unique("tls_expired");
    let ca = format!("ca_file = \"{}\"", redis.file("server-ca.pem").display());
    let config = sqlite_config(&env, &redis.section(&env.prefix, &ca), &entity).await;
    let (ok, _, stderr) = once(&config);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(line.contains("redis (rediss://"), "{line}");
    assert!(line.contains("invalid peer certificate: Expired"), "{line}");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let redis = TlsRedis::start(true).await;
    let env = Env::new();
    let entity = unique("tls_mutual");
    let ca = format!("ca_file = \"{}\"", redis.file("server-ca.pem").display());
    let config = sqlite_config(&env, &redis.section(&env.prefix, &ca), &entity).await;
    let (ok, _, stderr) = once(&config);
    assert!(!ok, "without a client certificate the server refuses");
    let line = one_error_line(&stderr);
    assert!(line.contains("redis (rediss://"), "{line}");

    let with_cert = format!(
        "{ca}\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        redis.file("client.pem").display(),
        redis.file("client.key").display()
    );
    let env = Env::new();
    let config = sqlite_config(&env, &redis.section(&env.prefix, &with_cert), &entity).await;
    let (ok, stdout, stderr) = once(&config);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("3 emitted"), "{stdout}");
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_config_errors_naming_the_field() {
    let env = Env::new();
    let missing = env.dir.path().join("no-such-ca.pem");
    let not_pem = env.file("not.pem", "hello\n");
    let cases = [
        (
            format!(
                "url = \"rediss://127.0.0.1:1/0\"\nca_file = \"{}\"",
                missing.display()
            ),
            format!("redis.ca_file: cannot read {}", missing.display()),
        ),
        (
            format!(
                "url = \"rediss://127.0.0.1:1/0\"\nca_file = \"{}\"",
                not_pem.display()
            ),
            format!("redis.ca_file: {} is not a PEM file", not_pem.display()),
        ),
        (
            format!(
                "url = \"rediss://127.0.0.1:1/0\"\nclient_cert = \"{}\"",
                not_pem.display()
            ),
            "redis.client_cert: set client_key too".to_owned(),
        ),
        (
            format!(
                "url = \"redis://127.0.0.1:1/0\"\nca_file = \"{}\"",
                not_pem.display()
            ),
            "is not a TLS URL, but ca_file, client_cert or client_key is set: write rediss://"
                .to_owned(),
        ),
    ];
    for (redis, expected) in cases {
        let entity = unique("tls_conf");
        let own = Env::new();
        let config = sqlite_config(&own, &format!("[redis]\n{redis}\n"), &entity).await;
        let (ok, _, stderr) = once(&config);
        assert!(!ok);
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in {stderr}"
        );
    }
}

/// The certificate the PostgreSQL server presents (self-signed: its own CA),
/// as `scripts/test` makes sure: `ssl = on`, valid for `localhost`.
async fn pg_server_certificate() -> String {
    let pool = pg().await;
    let (ssl, cert): (String, String) =
        sqlx::query_as("SELECT current_setting('ssl'), current_setting('ssl_cert_file')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        ssl, "on",
        "the test PostgreSQL runs without TLS (scripts/test turns it on)"
    );
    cert
}

#[tokio::test]
async fn postgres_over_verify_full_is_encrypted_as_the_server_reports_it() {
    let cert = pg_server_certificate().await;
    let env = Env::new();
    let pool = pg().await;
    let table = unique("tls_pg");
    pg_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now()); \
             INSERT INTO {table} (id) SELECT generate_series(1, 5)"
        ),
    )
    .await;
    let url = format!(
        "postgres://postgres@localhost:5432/test?sslmode=verify-full&sslrootcert={cert}&application_name={table}"
    );
    let config = env.config(&format!(
        "[http]\nlisten = \"\"\n\n[sources.pg]\nurl = \"{url}\"\n\n[entities.{table}]\nsource = \"pg\"\n\
         query = \"SELECT id, updated_at FROM {table} WHERE updated_at >= :since\"\nkey = \"id\"\n\
         cursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"200ms\"\nstart = \"beginning\"\n"
    ));
    let mut agent = Agent::start(&config);
    eventually(DEADLINE, "the agent's first cycle", || async {
        !agent.cycles(Some(&table)).is_empty()
    })
    .await;
    // The agent's own sessions, as the server sees them.
    let sessions: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = $1",
    )
    .bind(&table)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!sessions.is_empty(), "no session of the agent found");
    for (ssl, version) in &sessions {
        assert!(
            *ssl,
            "a session of the agent is not encrypted: {sessions:?}"
        );
        assert!(
            version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
            "{sessions:?}"
        );
    }
    assert_eq!(read_stream(&table).await.len(), 5);
    agent.signal("TERM");
    assert!(agent.wait_exit(DEADLINE).await.success());

    let out = highwater(&["check", "--config", config.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("ok: source pg: encrypted (TLSv1."),
        "{report}"
    );
}

#[tokio::test]
async fn postgres_refuses_a_host_name_the_certificate_does_not_name() {
    let cert = pg_server_certificate().await;
    let env = Env::new();
    let table = unique("tls_pg_name");
    // 127.0.0.1 is the same server, but its certificate names localhost.
    let url =
        format!("postgres://postgres@127.0.0.1:5432/test?sslmode=verify-full&sslrootcert={cert}");
    let config = env.config(&format!(
        "[sources.pg]\nurl = \"{url}\"\n\n[entities.{table}]\nsource = \"pg\"\n\
         query = \"SELECT 1 AS id, now() AS updated_at WHERE now() >= :since\"\nkey = \"id\"\n\
         cursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1s\"\n"
    ));
    let (ok, _, stderr) = once(&config);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("source pg (postgres://postgres@127.0.0.1:5432/test?sslmode=verify-full"),
        "{line}"
    );
    assert!(
        line.contains("certificate not valid for name \"127.0.0.1\""),
        "{line}"
    );
}

#[tokio::test]
async fn a_mysql_url_that_requires_tls_names_a_server_without_it() {
    let env = Env::new();
    let table = unique("tls_my");
    let config = env.config(&format!(
        "[sources.my]\nurl = \"{}?ssl-mode=required\"\n\n[entities.{table}]\nsource = \"my\"\n\
         query = \"SELECT 1 AS id, NOW() AS updated_at FROM DUAL WHERE NOW() >= :since\"\nkey = \"id\"\n\
         cursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1s\"\n",
        mysql_url()
    ));
    let pool = mysql().await;
    let (_, have_ssl): (String, String) = sqlx::query_as("SHOW VARIABLES LIKE 'have_ssl'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (ok, stdout, stderr) = once(&config);
    if have_ssl == "YES" {
        // A server with TLS: the session is encrypted, and check says so.
        assert!(ok, "{stdout}{stderr}");
        let out = highwater(&["check", "--config", config.to_str().unwrap()]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("ok: source my: encrypted (TLSv1."),
            "{report}"
        );
        return;
    }
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains(&format!("source my ({}?ssl-mode=required)", mysql_url())),
        "{line}"
    );
    assert!(line.contains("server does not support TLS"), "{line}");
}

/// A private MariaDB server with TLS (its own data directory, a
/// certificate for localhost signed by a CA of its own), on a free port.
struct TlsMariaDb {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsMariaDb {
    async fn start() -> TlsMariaDb {
        let dir = tempfile::tempdir().expect("temp dir");
        certificates(
            dir.path(),
            "server",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
            "2",
        );
        let data = dir.path().join("data");
        let install = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=normal"])
            .arg("--skip-test-db")
            .output()
            .expect("run mariadb-install-db");
        assert!(
            install.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let port = free_port();
        let path = |file: &str| dir.path().join(file).display().to_string();
        // Debian puts it in /usr/sbin, which a user's PATH may lack.
        let mariadbd = ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mariadbd");
        let child = Command::new(mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--bind-address=127.0.0.1", "--skip-log-bin"])
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", path("mysqld.sock")))
            .arg(format!("--pid-file={}", path("mysqld.pid")))
            .arg(format!("--ssl-cert={}", path("server.pem")))
            .arg(format!("--ssl-key={}", path("server.key")))
            .arg("--innodb-buffer-pool-size=16M")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let server = TlsMariaDb { child, port, dir };
        let url = format!("mysql://root@127.0.0.1:{port}/mysql");
        eventually(DEADLINE, "the private mariadbd to answer", || {
            let url = url.clone();
            async move {
                match sqlx::MySqlPool::connect(&url).await {
                    Ok(pool) => {
                        let created = sqlx::query("CREATE DATABASE IF NOT EXISTS app")
                            .execute(&pool)
                            .await
                            .is_ok();
                        pool.close().await;
                        created
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        server
    }
}

impl Drop for TlsMariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn mariadb_over_verify_identity_is_encrypted_and_a_wrong_ca_is_refused() {
    let server = TlsMariaDb::start().await;
    let env = Env::new();
    let table = unique("tls_my");
    let plain = format!("mysql://root@127.0.0.1:{}/app", server.port);
    let pool = sqlx::MySqlPool::connect(&plain).await.unwrap();
    mysql_exec(
        &pool,
        &format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)); \
             INSERT INTO {table} (id) VALUES (1), (2)"
        ),
    )
    .await;
    let ca = server.dir.path().join("server-ca.pem");
    let config_with = |ca: &Path| {
        env.config(&format!(
            "[sources.my]\nurl = \"mysql://root@localhost:{}/app?ssl-mode=VERIFY_IDENTITY&ssl-ca={}\"\n\n\
             [entities.{table}]\nsource = \"my\"\n\
             query = \"SELECT id, updated_at FROM {table} WHERE updated_at >= :since\"\nkey = \"id\"\n\
             cursor = \"updated_at\"\nlookback = \"5m\"\nevery = \"1s\"\nstart = \"beginning\"\n",
            server.port,
            ca.display()
        ))
    };
    let config = config_with(&ca);
    let (ok, stdout, stderr) = once(&config);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 rows read, 2 emitted"), "{stdout}");
    let out = highwater(&["check", "--config", config.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("ok: source my: encrypted (TLSv1."),
        "{report}"
    );

    // A CA of its own, which did not sign the server's certificate.
    let other = env.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    certificates(&other, "other", "localhost", "DNS:localhost", "2");
    let config = config_with(&other.join("other-ca.pem"));
    let (ok, _, stderr) = once(&config);
    assert!(!ok);
    let line = one_error_line(&stderr);
    assert!(
        line.contains("source my (mysql://root@localhost:"),
        "{line}"
    );
    assert!(line.contains("invalid peer certificate"), "{line}");
    pool.close().await;
}
