//! highwater: a polling change detector. It runs a SQL query per entity on a
//! schedule and turns the rows that changed into Redis stream messages, each
//! change once, in order per row (see `DESIGN.md` and the README).

/// The scheduler loop, `once` and `run`, shutdown and backoff.
pub mod agent;
/// Row → change: key, cursor epoch, digest, JSON payload.
pub mod change;
/// The TOML configuration, parsed and validated with named errors.
pub mod config;
/// Crash points for fault-injection tests (`HIGHWATER_CRASH_AT`).
pub mod fault;
/// One cycle of one entity: window, chunks, commit.
pub mod poller;
/// Cron and interval schedules.
pub mod schedule;
/// Redis: the dedup and commit scripts, the stream, the state keys.
pub mod sink;
/// The databases: PostgreSQL, MySQL/MariaDB, SQLite.
pub mod source;
/// Logging setup.
pub mod telemetry;
