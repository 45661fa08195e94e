//! Crash points for fault-injection tests: with `HIGHWATER_CRASH_AT` set to
//! `after-chunk:N` (after the N-th chunk of a cycle was applied) or
//! `before-commit` (after the last chunk, before the commit script), the
//! process aborts there, like `kill -9` at the worst moment. Unset, each
//! check is one read of a value parsed once. `HIGHWATER_UNFENCED=1` turns
//! the leases off (see [`unfenced`]).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashPoint {
    AfterChunk(u64),
    BeforeCommit,
}

fn crash_point() -> Option<CrashPoint> {
    static POINT: OnceLock<Option<CrashPoint>> = OnceLock::new();
    *POINT.get_or_init(|| {
        let value = std::env::var("HIGHWATER_CRASH_AT").ok()?;
        match value.as_str() {
            "before-commit" => Some(CrashPoint::BeforeCommit),
            other => other
                .strip_prefix("after-chunk:")
                .and_then(|n| n.parse().ok())
                .map(CrashPoint::AfterChunk),
        }
    })
}

fn crash(point: &str) -> ! {
    eprintln!("HIGHWATER_CRASH_AT: aborting {point}");
    std::process::abort()
}

/// Called after the `n`-th chunk (1-based) of a cycle was applied.
pub fn after_chunk(n: u64) {
    if crash_point() == Some(CrashPoint::AfterChunk(n)) {
        crash(&format!("after chunk {n}"));
    }
}

/// Called after the last chunk of a cycle, before the commit script.
pub fn before_commit() {
    if crash_point() == Some(CrashPoint::BeforeCommit) {
        crash("before the commit");
    }
}

/// `HIGHWATER_UNFENCED=1`: `run` takes no leases and writes every entity
/// unfenced, as highwater did before leases. Only for the model test's
/// honesty check, which must see two such agents break the order guarantee.
pub fn unfenced() -> bool {
    static UNFENCED: OnceLock<bool> = OnceLock::new();
    *UNFENCED.get_or_init(|| std::env::var("HIGHWATER_UNFENCED").is_ok_and(|v| v == "1"))
}
