//! One cycle of one entity: read the watermark, read the database's clock,
//! stream the window `cursor >= W - lookback` through the dedup script in
//! chunks, then commit the new watermark.
//!
//! The watermark moves only after the whole window was read: a cycle that
//! fails or is stopped half-way leaves it where it was, and the next cycle
//! re-reads the same window (the dedup state filters what was already sent).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::change::Change;
use crate::config::{CursorKind, EntitySettings, OnStateLoss, Start};
use crate::sink::{CycleFigures, Sink, SinkError};
use crate::source::{Prepared, Source, SourceError, BEGINNING};

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("entity {entity}: Redis lost this entity's state ({evidence}); not starting over silently. Restore Redis (and run it with persistence), or set on_state_loss = \"resnapshot\" to re-read everything the query returns")]
    StateLost { entity: String, evidence: String },
}

impl CycleError {
    /// Worth retrying unchanged (see the source and sink classifications).
    pub fn is_transient(&self) -> bool {
        match self {
            CycleError::Source(e) => e.is_transient(),
            CycleError::Sink(e) => e.is_transient(),
            CycleError::StateLost { .. } => false,
        }
    }
}

/// How many of a stream's latest entries are searched for an entity's own
/// messages when its state is missing.
const LOSS_EVIDENCE_DEPTH: usize = 1000;

/// What an entity's poller remembers between cycles of one process.
#[derive(Debug, Default)]
pub struct EntityMemory {
    /// A cycle of this process found or created the entity's state in Redis.
    pub had_state: bool,
}

/// What one cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub entity: String,
    /// Rows the query returned.
    pub rows: u64,
    /// Rows written to the stream.
    pub emitted: u64,
    /// Rows whose version was already on the stream.
    pub skipped: u64,
    /// Rows the query returned although their cursor is before the window
    /// (the query does not filter on `:since`): ignored, they may have been trimmed.
    pub below_window: u64,
    pub duration: Duration,
    /// The window's start epoch.
    pub since: i64,
    /// The watermark after the cycle (`None`: not committed or never set).
    pub watermark: Option<i64>,
    /// Stopped between chunks by a shutdown: the watermark did not move.
    pub interrupted: bool,
}

/// Runs one cycle. `stop` turning true ends the cycle after the chunk in
/// flight, without committing.
pub async fn run_cycle(
    entity: &EntitySettings,
    source: &Source,
    prepared: &Prepared,
    sink: &Sink,
    stop: &watch::Receiver<bool>,
    memory: &mut EntityMemory,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let started_at_ms = chrono::Utc::now().timestamp_millis();
    let keys = sink.keys(entity);

    let state = sink.snapshot(&entity.name, &keys).await?;
    let mut watermark = state.watermark;
    let lost = if state.digests_vanished() {
        Some(format!(
            "its digest hash is empty although the last cycle left {} keys in it",
            state.tracked
        ))
    } else if state.exists {
        None
    } else if memory.had_state {
        Some("its state keys vanished while this agent was running".to_owned())
    } else if sink
        .stream_has_variant(&entity.name, &keys, &entity.variant, LOSS_EVIDENCE_DEPTH)
        .await?
    {
        Some(format!(
            "its state keys are missing but stream {} holds its messages",
            keys.stream
        ))
    } else {
        None
    };
    let mut resnapshot = false;
    if let Some(evidence) = lost {
        match entity.on_state_loss {
            OnStateLoss::Fail => {
                return Err(CycleError::StateLost {
                    entity: entity.name.clone(),
                    evidence,
                })
            }
            OnStateLoss::Resnapshot => {
                tracing::error!(
                    entity = %entity.name,
                    evidence = %evidence,
                    "redis lost this entity's state: re-reading everything the query returns (on_state_loss = \"resnapshot\"); consumers will see rows again"
                );
                resnapshot = true;
                watermark = None;
            }
        }
    }
    // The clock is read before the window's snapshot is taken: every change
    // committed after the snapshot carries a cursor >= T0 - (transaction length).
    let t0 = match entity.cursor_kind {
        CursorKind::Time => Some(source.now().await?),
        CursorKind::Version => None,
    };
    let since = if resnapshot {
        BEGINNING
    } else {
        window_start(entity, watermark, t0)
    };

    let mut report = CycleReport {
        entity: entity.name.clone(),
        rows: 0,
        emitted: 0,
        skipped: 0,
        below_window: 0,
        duration: Duration::ZERO,
        since,
        watermark,
        interrupted: false,
    };
    let mut max_epoch: Option<i64> = None;
    let mut chunk: Vec<Change> = Vec::with_capacity(entity.chunk_rows);
    let mut chunks = 0u64;
    let mut rows = source.changes(prepared, since);
    while let Some(change) = rows.next().await {
        let change = change?;
        report.rows += 1;
        if change.epoch < since {
            report.below_window += 1;
            continue;
        }
        max_epoch = Some(max_epoch.map_or(change.epoch, |m| m.max(change.epoch)));
        chunk.push(change);
        if chunk.len() >= entity.chunk_rows {
            report.emitted += sink.apply_chunk(entity, &keys, &chunk).await?;
            // A chunk that emitted created the state hash.
            memory.had_state |= report.emitted > 0;
            chunks += 1;
            crate::fault::after_chunk(chunks);
            chunk.clear();
            if *stop.borrow() {
                report.interrupted = true;
                break;
            }
        }
    }
    drop(rows);
    if !report.interrupted && !chunk.is_empty() {
        report.emitted += sink.apply_chunk(entity, &keys, &chunk).await?;
    }
    report.skipped = report.rows - report.below_window - report.emitted;
    if report.below_window > 0 {
        tracing::warn!(
            entity = %entity.name,
            rows = report.below_window,
            "the query returned rows whose cursor is before the window start: they were ignored; filter with `cursor >= :since`"
        );
    }

    if !report.interrupted {
        crate::fault::before_commit();
        let candidate = match entity.cursor_kind {
            CursorKind::Time => t0,
            CursorKind::Version => max_epoch,
        };
        let figures = CycleFigures {
            started_at_ms,
            duration_ms: started.elapsed().as_millis() as u64,
            rows: report.rows,
            emitted: report.emitted,
        };
        report.watermark = sink.commit(entity, &keys, candidate, &figures).await?;
        memory.had_state = true;
    } else {
        memory.had_state |= report.emitted > 0;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Where the window starts: `W - lookback`, or per `start` before the first commit.
fn window_start(entity: &EntitySettings, watermark: Option<i64>, t0: Option<i64>) -> i64 {
    match (watermark, entity.start) {
        (Some(w), _) => w.saturating_sub(entity.lookback),
        (None, Start::Beginning) => BEGINNING,
        (None, Start::At(at)) => at,
        // No clock for versions: "now" reads from the beginning.
        (None, Start::Now) => t0.map_or(BEGINNING, |t0| t0.saturating_sub(entity.lookback)),
    }
}
