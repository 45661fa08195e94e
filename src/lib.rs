//! highwater: a polling change detector. It runs a SQL query per entity on a
//! schedule and turns the rows that changed into Redis stream messages, each
//! change once, in order per row (see `DESIGN.md` and the README).

/// The scheduler loop, `once` and `run`, shutdown and backoff.
pub mod agent;
/// Row → change: key, cursor epoch, digest, JSON payload.
pub mod change;
/// `highwater check`: every configuration problem at once, against the real servers.
pub mod check;
/// The TOML configuration, parsed and validated with named errors.
pub mod config;
/// Redis: one server or a cluster behind one connection, and what goes to one node.
pub mod connection;
/// `highwater demo`: a SQLite shop changing under an in-process agent.
pub mod demo;
/// Crash points for fault-injection tests (`HIGHWATER_CRASH_AT`).
pub mod fault;
/// `run`'s HTTP endpoint: `/metrics` and `/healthz`.
pub mod http;
/// Who may write an entity: fenced leases, and the agents sharing the entities.
pub mod lease;
/// Metric names (`highwater_*`), the registry and its Prometheus text.
pub mod metrics;
/// One entity over several streams: which partition a key goes to, and their keys.
pub mod partition;
/// One cycle of one entity: window, chunks, commit.
pub mod poller;
/// Progress of long cycles: a live line on a terminal, log lines otherwise.
pub mod progress;
/// Stream retention that waits for consumer groups: the scripts' arguments and reports.
pub mod retention;
/// Cron and interval schedules.
pub mod schedule;
/// Redis: the dedup and commit scripts, the stream, the state keys.
pub mod sink;
/// The databases: PostgreSQL, MySQL/MariaDB, SQLite.
pub mod source;
/// `status` and `wait`: what the agent left in Redis.
pub mod status;
/// systemd's `Type=notify`: READY once up, STATUS lines, the watchdog, STOPPING.
pub mod systemd;
/// Reading streams back: decode, format and follow entries (`XREAD BLOCK`).
pub mod tail;
/// Logging setup.
pub mod telemetry;
/// Where a window starts: the look-back, stretched back to open transactions, and what a commit may trim.
pub mod window;
