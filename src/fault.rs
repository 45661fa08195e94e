//! Crash points for fault-injection tests: with `HIGHWATER_CRASH_AT` set to
//! `after-chunk:N` (after the N-th chunk of a cycle was applied) or
//! `before-commit` (after the last chunk, before the commit script) or
//! `before-partition-commit:N` (partitions 0..N committed, N not yet), the
//! process aborts there, like `kill -9` at the worst moment. Unset, each
//! check is one read of a value parsed once. `HIGHWATER_UNFENCED=1` turns
//! the leases off (see [`unfenced`]).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrashPoint {
    AfterChunk(u64),
    BeforeCommit,
    /// After partition `n - 1`'s commit, before partition `n`'s.
    BetweenPartitions(usize),
}

fn crash_point() -> Option<CrashPoint> {
    static POINT: OnceLock<Option<CrashPoint>> = OnceLock::new();
    *POINT.get_or_init(|| {
        let value = std::env::var("HIGHWATER_CRASH_AT").ok()?;
        match value.as_str() {
            "before-commit" => Some(CrashPoint::BeforeCommit),
            other => match other.strip_prefix("before-partition-commit:") {
                Some(n) => n.parse().ok().map(CrashPoint::BetweenPartitions),
                None => other
                    .strip_prefix("after-chunk:")
                    .and_then(|n| n.parse().ok())
                    .map(CrashPoint::AfterChunk),
            },
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

/// Called before partition `p`'s commit (`p` > 0): the ones before it committed.
pub fn between_partition_commits(p: usize) {
    if crash_point() == Some(CrashPoint::BetweenPartitions(p)) {
        crash(&format!("before the commit of partition {p}"));
    }
}

/// A crash between two partitions' commits is asked for: they commit one
/// after the other, so that the crash falls between two of them.
pub fn crash_between_partitions() -> bool {
    matches!(crash_point(), Some(CrashPoint::BetweenPartitions(_)))
}

/// `HIGHWATER_UNFENCED=1`: `run` takes no leases and writes every entity
/// unfenced, as highwater did before leases. Only for the model test's
/// honesty check, which must see two such agents break the order guarantee.
pub fn unfenced() -> bool {
    static UNFENCED: OnceLock<bool> = OnceLock::new();
    *UNFENCED.get_or_init(|| std::env::var("HIGHWATER_UNFENCED").is_ok_and(|v| v == "1"))
}
