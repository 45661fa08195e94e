//! Logging: `tracing` to stderr, as text or JSON lines, filtered by
//! `HIGHWATER_LOG` (e.g. `info`, `highwater=debug`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; `default_level` applies when
/// `HIGHWATER_LOG` is unset, with the Redis client's own warnings left out
/// (during a cluster failover it warns of every reconnection attempt, tens
/// a second; the cycles' own errors say what failed and that it resumes):
/// `HIGHWATER_LOG=info,redis=warn` shows them.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("HIGHWATER_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},redis=error")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through the progress lines, so a log line never garbles a live one.
        .with_writer(crate::progress::log_writer)
        .with_target(false)
        // Colours on a terminal only: not into journald or a log file.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
